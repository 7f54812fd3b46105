//! Link arguments for the `vireo` binary only (not for test binaries): the start-up order file
//! (`link/startup.ld`, see `scripts/startup-order`) and packed relative relocations. Both
//! shrink what a VM's start-up maps (bench/vmm measures peak RSS; docs/benchmarks.md).

use std::process::Command;

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    let order = format!("{dir}/link/startup.ld");
    println!("cargo:rerun-if-changed=link/startup.ld");
    println!("cargo:rerun-if-changed=build.rs");
    let linux_gnu = std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu");
    if !linux_gnu {
        return;
    }
    if std::path::Path::new(&order).exists() {
        println!("cargo:rustc-link-arg-bins=-Wl,-T,{order}");
    }
    // DT_RELR (`-z pack-relative-relocs`): the static PIE's relocations in 4 KiB instead of
    // 430 KiB, all read at start-up. Needs GNU ld 2.38 and glibc 2.36 (which applies them in
    // a static PIE); older tool chains keep the classic table.
    if glibc_at_least(2, 36) && ld_knows_relr() {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}

fn glibc_at_least(major: u32, minor: u32) -> bool {
    let Ok(out) = Command::new("getconf").arg("GNU_LIBC_VERSION").output() else {
        return false;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(v) = text.split_whitespace().nth(1) else {
        return false;
    };
    let mut it = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (a, b) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    (a, b) >= (major, minor)
}

fn ld_knows_relr() -> bool {
    Command::new("ld")
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("pack-relative-relocs"))
        .unwrap_or(false)
}
