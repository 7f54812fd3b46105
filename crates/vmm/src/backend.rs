//! Choosing the `hv` backend for `--accel`.

use vireo_hv::kvm::KvmHypervisor;
use vireo_hv::Hypervisor;

use crate::config::Accel;
use crate::Error;

/// The backend that will run the VM, and a note for the user (which one `auto` picked and
/// why, or a warning).
pub struct Selected {
    pub hypervisor: Box<dyn Hypervisor>,
    pub note: Option<String>,
}

const PVM_WARNING: &str =
    "warning: this host's KVM is KVM-PVM (/sys/module/kvm_pvm): guest kernel \
     code is emulated by the host and runs very slowly; `--accel emu` is faster for Linux guests";

/// Open the backend `accel` names.
pub fn select_hypervisor(accel: Accel) -> Result<Selected, Error> {
    let pvm = vireo_hv::host::kvm_is_pvm();
    match accel {
        Accel::Kvm => {
            let kvm = KvmHypervisor::new()?;
            Ok(Selected {
                hypervisor: Box::new(kvm),
                note: pvm.then(|| PVM_WARNING.to_string()),
            })
        }
        Accel::Emu => Ok(Selected {
            hypervisor: emulator()?,
            note: None,
        }),
        Accel::Auto => match KvmHypervisor::new() {
            Ok(kvm) if !pvm => Ok(Selected {
                hypervisor: Box::new(kvm),
                note: None,
            }),
            Ok(_) => Ok(Selected {
                hypervisor: emulator()?,
                note: Some(
                    "accelerator: emu (this host's KVM is KVM-PVM, too slow for guest kernels)"
                        .to_string(),
                ),
            }),
            Err(e) => Ok(Selected {
                hypervisor: emulator()?,
                note: Some(format!("accelerator: emu (KVM is not usable: {e})")),
            }),
        },
    }
}

/// Map what the emulator backend must have before seccomp filters go on (its JIT's code
/// memory, unless `VIREO_EMU_JIT=0`): call first thing in a VMM process.
pub fn prepare_emulator() {
    vireo_hv::emu::prepare_jit();
}

fn emulator() -> Result<Box<dyn Hypervisor>, Error> {
    Ok(Box::new(vireo_hv::emu::EmuHypervisor::new()))
}
