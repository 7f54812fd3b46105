//! Facts about the host that decide which backend to use.

use std::path::Path;

/// The KVM device node.
pub const KVM_PATH: &str = "/dev/kvm";

/// True when the host's KVM is KVM-PVM (`/sys/module/kvm_pvm`): guest user mode runs natively,
/// guest kernel mode is emulated by the host, so guest kernels run very slowly.
pub fn kvm_is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}
