//! x86-64 platform knowledge: where things live in the guest, how Linux is booted, what the
//! vCPUs see (CPUID, MSRs, registers at entry) and the ACPI tables that describe the machine.

pub mod acpi;
pub mod boot;
pub mod cpu;
pub mod cpuid;
pub mod layout;
pub mod loader;
