//! Bad input gets one clear line on stderr and a non-zero exit, never a panic.

mod common;

use std::time::Duration;

use common::{run, vireo, TempDir};

fn expect_error(args: &[&str], needle: &str) {
    let mut cmd = vireo();
    cmd.args(args);
    let o = run(cmd, Duration::from_secs(30), None);
    o.assert_clean();
    assert_ne!(o.code(), Some(0), "expected failure for {args:?}\n{o}");
    assert!(
        o.stderr.contains(needle),
        "expected {needle:?} in stderr for {args:?}\n{o}"
    );
    let lines: Vec<_> = o.stderr.lines().filter(|l| l.contains("error")).collect();
    assert!(!lines.is_empty(), "no error line\n{o}");
}

#[test]
fn missing_kernel_file() {
    expect_error(
        &["run", "--kernel", "/nonexistent/vmlinuz", "--accel", "kvm"],
        "/nonexistent/vmlinuz",
    );
}

#[test]
fn file_that_is_not_a_kernel() {
    let dir = TempDir::new("notakernel");
    let f = dir.path().join("junk");
    std::fs::write(&f, vec![0x42u8; 10_000]).unwrap();
    let f = f.to_str().unwrap();
    // The kernel is checked whichever backend runs; use whichever is available.
    expect_error(&["run", "--kernel", f], "not a Linux kernel");
}

#[test]
fn bad_memory_sizes() {
    expect_error(
        &["run", "--kernel", "/k", "--memory", "lots"],
        "like 256M or 2G",
    );
    expect_error(&["run", "--kernel", "/k", "--memory", "12X"], "12X");
    expect_error(
        &["run", "--kernel", "/k", "--memory", "1M"],
        "less than the minimum",
    );
    expect_error(
        &["run", "--kernel", "/k", "--memory", "100T"],
        "more than this host's",
    );
}

#[test]
fn bad_cpu_counts() {
    expect_error(&["run", "--kernel", "/k", "--cpus", "0"], "at least 1");
    expect_error(&["run", "--kernel", "/k", "--cpus", "1000"], "more than");
    expect_error(&["run", "--kernel", "/k", "--cpus", "two"], "two");
}

#[test]
fn unknown_accelerator() {
    expect_error(
        &["run", "--kernel", "/k", "--accel", "xen"],
        "kvm, emu or auto",
    );
}

#[test]
fn command_needs_the_default_guest() {
    expect_error(&["run", "--kernel", "/k", "--", "uname"], "default guest");
}

#[test]
fn help_documents_every_flag() {
    let mut cmd = vireo();
    cmd.args(["run", "--help"]);
    let o = run(cmd, Duration::from_secs(30), None);
    assert_eq!(o.code(), Some(0), "{o}");
    for flag in [
        "--kernel",
        "--initrd",
        "--cmdline",
        "--cpus",
        "--memory",
        "--accel",
        "--no-reboot",
    ] {
        assert!(o.stdout.contains(flag), "{flag} missing from help\n{o}");
    }
}

/// `vireo run` parses with its own small parser (start-up cost); an unknown flag still gets
/// clap's error in the context of the whole command line.
#[test]
fn unknown_run_flag_is_reported_with_the_full_usage() {
    expect_error(&["run", "--kernal", "/k"], "--kernal");
    let mut cmd = vireo();
    cmd.args(["run", "--kernal", "/k"]);
    let o = run(cmd, Duration::from_secs(30), None);
    assert!(o.stderr.contains("Usage: vireo run"), "{o}");
    let mut cmd = vireo();
    cmd.args(["--version"]);
    let o = run(cmd, Duration::from_secs(30), None);
    assert_eq!(o.code(), Some(0), "{o}");
    assert!(o.stdout.starts_with("vireo "), "{o}");
}

/// A `VIREO_LOG` that is not a filter is named in a warning, and the run goes on.
#[test]
fn bad_log_filter_is_a_warning() {
    let mut cmd = vireo();
    cmd.env("VIREO_LOG", "vireo=loud")
        .args(["run", "--kernel", "/nonexistent/vmlinuz"]);
    let o = run(cmd, Duration::from_secs(30), None);
    o.assert_clean();
    assert!(
        o.stderr.contains("ignoring VIREO_LOG=\"vireo=loud\""),
        "{o}"
    );
    assert!(o.stderr.contains("/nonexistent/vmlinuz"), "{o}");
}
