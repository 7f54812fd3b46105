//! Busybox user space on the default guest, on every backend that boots Linux here (the
//! emulator everywhere): scripts, `sha256sum` of a generated file checked against the host,
//! `gzip`/`gzip -d`, `sort` of a large file, `awk` floating point — with 1 and 2 vCPUs.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{default_guest, full_backends, run, vireo};

/// What the guest does: build a file, hash it, compress and decompress it, sort it, compute.
const SCRIPT: &str = "seq 1 200000 > /tmp/f; \
    echo sha: $(sha256sum /tmp/f); \
    gzip -c /tmp/f > /tmp/f.gz; gzip -dc /tmp/f.gz | cmp - /tmp/f && echo gzip: ok; \
    sort -r /tmp/f | head -n 3 | tr '\\n' ' ' | sed 's/^/sorted: /'; echo; \
    echo awk: $(awk 'BEGIN { s = 0; for (i = 1; i <= 1000; i++) s += 1 / i; printf \"%.6f\", s }'); \
    n=0; i=0; while [ $i -lt 1000 ]; do n=$((n + i * i)); i=$((i + 1)); done; echo loop: $n";

fn host_sha256_of_seq() -> String {
    let data: String = (1..=200_000).map(|i| format!("{i}\n")).collect();
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha256sum");
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(data.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn busybox_workload_gives_the_hosts_answers() {
    let test = "busybox_workload_gives_the_hosts_answers";
    if default_guest(test).is_none() {
        return;
    }
    let sha = host_sha256_of_seq();
    // Harmonic number H(1000), and the sum of squares 0..999.
    let awk = "7.485471";
    let squares: u64 = (0..1000u64).map(|i| i * i).sum();
    for accel in full_backends(test) {
        for cpus in ["1", "2"] {
            let mut cmd = vireo();
            cmd.args([
                "run", "--accel", accel, "--cpus", cpus, "--memory", "256M", "--",
            ])
            .args(["sh", "-c", SCRIPT]);
            let o = run(cmd, Duration::from_secs(600), None);
            o.assert_clean();
            assert_eq!(o.code(), Some(0), "{accel} {cpus}: {o}");
            assert!(
                o.stdout.contains(&format!("sha: {sha}")),
                "{accel} {cpus}: {o}"
            );
            assert!(o.stdout.contains("gzip: ok"), "{accel} {cpus}: {o}");
            assert!(
                o.stdout.contains("sorted: 99999 99998 99997"),
                "{accel} {cpus}: {o}"
            );
            assert!(
                o.stdout.contains(&format!("awk: {awk}")),
                "{accel} {cpus}: {o}"
            );
            assert!(
                o.stdout.contains(&format!("loop: {squares}")),
                "{accel} {cpus}: no loop: {squares}\n{o}"
            );
        }
    }
}
