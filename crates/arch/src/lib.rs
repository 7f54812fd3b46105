//! x86-64 platform knowledge: where things live in the guest, how Linux is booted, what the
//! vCPUs see (CPUID, MSRs, registers at entry) and the ACPI tables that describe the machine.

pub mod layout;
