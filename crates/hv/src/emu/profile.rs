//! A sampling profiler of guest code, for finding where emulated time goes: with
//! `VIREO_EMU_PROFILE=PATH` in the environment, every vCPU records its RIP every few thousand
//! blocks and, when the vCPU is dropped, appends `vcpu rip count` lines to PATH. Symbolize
//! them against the guest kernel's `System.map` (Debian ships it in the `-dbg` package).

use std::collections::HashMap;
use std::io::Write;

/// RIP samples of one vCPU.
pub struct Profile {
    path: String,
    samples: HashMap<u64, u32>,
}

impl Profile {
    /// A profile when `VIREO_EMU_PROFILE` is set.
    pub fn from_env() -> Option<Box<Profile>> {
        let path = std::env::var("VIREO_EMU_PROFILE").ok()?;
        Some(Box::new(Profile {
            path,
            samples: HashMap::new(),
        }))
    }

    pub fn sample(&mut self, rip: u64) {
        *self.samples.entry(rip).or_default() += 1;
    }

    /// Append the samples of vCPU `id` to the profile file.
    pub fn write(&self, id: u32) {
        let mut out = String::new();
        for (rip, n) in &self.samples {
            out.push_str(&format!("{id} {rip:#x} {n}\n"));
        }
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| f.write_all(out.as_bytes()));
        if let Err(e) = written {
            tracing::warn!("VIREO_EMU_PROFILE: cannot write {}: {e}", self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_counted_and_written() {
        let path = std::env::temp_dir().join(format!("vireo-profile-{}", std::process::id()));
        let mut p = Profile {
            path: path.to_string_lossy().into_owned(),
            samples: HashMap::new(),
        };
        p.sample(0x1000);
        p.sample(0x1000);
        p.sample(0x2000);
        p.write(3);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("3 0x1000 2\n"));
        assert!(text.contains("3 0x2000 1\n"));
        std::fs::remove_file(path).unwrap();
    }
}
