//! `vireo container`: a busybox root file system in a jail. Namespaces, limits, escape
//! attempts, networking, list/stop/update, and that nothing is left behind — also when vireo
//! is killed. All need root; they skip with a message otherwise.

mod common;

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{busybox_rootfs, run, skip_unless_root, vireo, Outcome};
use vireo_jail::container::State;

const TIMEOUT: Duration = Duration::from_secs(60);

fn name(test: &str) -> String {
    format!("{test}-{}", std::process::id())
}

/// `vireo container run --rootfs ROOT ARGS -- CMD...` to completion.
fn container(root: &Path, args: &[&str], cmd: &[&str]) -> Outcome {
    let mut c = vireo();
    c.args(["container", "run", "--rootfs"])
        .arg(root)
        .args(args)
        .arg("--")
        .args(cmd);
    let o = run(c, TIMEOUT, None);
    o.assert_clean();
    o
}

/// `sh -c script` in a container.
fn sh(root: &Path, args: &[&str], script: &str) -> Outcome {
    container(root, args, &["sh", "-c", script])
}

/// Kills a background vireo on drop and lets the next vireo sweep what it left.
struct Background(Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = vireo().args(["container", "list"]).output();
    }
}

fn state_file(name: &str) -> PathBuf {
    Path::new(vireo_jail::container::STATE_DIR)
        .join(name)
        .join("state.json")
}

/// Waits for container `name` to be running and returns its state.
fn wait_running(name: &str) -> State {
    let start = Instant::now();
    loop {
        if let Ok(text) = std::fs::read(state_file(name)) {
            if let Ok(s) = serde_json::from_slice::<State>(&text) {
                return s;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "container {name} did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Every cgroup directory vireo could have made for `name`.
fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
        for e in entries.flatten() {
            let d = e.path().join("vireo").join(name);
            if d.exists() {
                v.push(d);
            }
        }
    }
    v
}

fn assert_nothing_left(name: &str, rootfs: &Path) {
    assert!(
        cgroup_dirs(name).is_empty(),
        "cgroups left: {:?}",
        cgroup_dirs(name)
    );
    assert!(!state_file(name).exists(), "state left for {name}");
    assert!(
        !Path::new(vireo_jail::record::RECORD_DIR)
            .join(format!("{name}.json"))
            .exists(),
        "jail record left for {name}"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let root = rootfs.to_string_lossy();
    assert!(
        !mounts.contains(root.as_ref()),
        "a mount of {root} is visible on the host"
    );
}

#[test]
fn every_namespace_is_new_pid_one_and_hostname() {
    let test = "every_namespace_is_new_pid_one_and_hostname";
    if skip_unless_root(test) {
        return;
    }
    let root = busybox_rootfs("ns");
    let kinds = ["cgroup", "ipc", "mnt", "net", "pid", "time", "user", "uts"];
    let script = format!(
        "echo pid=$$; hostname; for n in {}; do readlink /proc/self/ns/$n; done",
        kinds.join(" ")
    );
    let o = sh(root.path(), &["--hostname", "boxhost"], &script);
    assert_eq!(o.code(), Some(0), "{o}");
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_eq!(lines[0], "pid=1", "{o}");
    assert_eq!(lines[1], "boxhost", "{o}");
    for (kind, inside) in kinds.iter().zip(&lines[2..]) {
        let host = std::fs::read_link(format!("/proc/self/ns/{kind}")).unwrap();
        let host = host.to_string_lossy();
        assert!(inside.starts_with(&format!("{kind}:[")), "{inside}");
        if *kind == "user" {
            assert_eq!(*inside, host, "no user namespace unless asked");
        } else {
            assert_ne!(*inside, host, "{kind} namespace is the host's");
        }
    }
    // With --userns the user namespace is new too, root inside being uid 100000 outside.
    let o = sh(
        root.path(),
        &["--userns"],
        "readlink /proc/self/ns/user; cat /proc/self/uid_map; id -u",
    );
    assert_eq!(o.code(), Some(0), "{o}");
    let host_user = std::fs::read_link("/proc/self/ns/user").unwrap();
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_ne!(lines[0], host_user.to_string_lossy(), "{o}");
    let map: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(map, ["0", "100000", "65536"], "{o}");
    assert_eq!(lines[2], "0");
}

#[test]
fn stdio_and_exit_status_pass_through() {
    let test = "stdio_and_exit_status_pass_through";
    if skip_unless_root(test) {
        return;
    }
    let root = busybox_rootfs("stdio");
    let mut c = vireo();
    c.args(["container", "run", "--rootfs"])
        .arg(root.path())
        .args(["--", "sh", "-c", "tr a-z A-Z; echo err >&2; exit 7"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello from the host\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "HELLO FROM THE HOST\n"
    );
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    assert_eq!(out.status.code(), Some(7));
    // A command that is not there: 127, as in a shell.
    let o = container(root.path(), &[], &["/bin/no-such-program"]);
    assert_eq!(o.code(), Some(127), "{o}");
    assert!(o.stderr.contains("no-such-program"), "{o}");
    // Environment and working directory.
    let o = container(
        root.path(),
        &["--env", "GREETING=hi there", "--workdir", "/tmp"],
        &["sh", "-c", "echo \"$GREETING\"; pwd"],
    );
    assert_eq!(o.stdout, "hi there\n/tmp\n", "{o}");
}

#[test]
fn bad_input_gets_a_clear_error() {
    let test = "bad_input_gets_a_clear_error";
    if skip_unless_root(test) {
        return;
    }
    let root = busybox_rootfs("badinput");
    let expect = |args: &[&str], rootfs: &Path, needle: &str| {
        let o = container(rootfs, args, &["true"]);
        assert_eq!(o.code(), Some(125), "{args:?}: {o}");
        assert!(
            o.stderr.contains(needle),
            "{args:?}: expected {needle:?}\n{o}"
        );
        assert!(o.stderr.starts_with("vireo: error:"), "{o}");
    };
    expect(
        &[],
        Path::new("/nonexistent/rootfs"),
        "/nonexistent/rootfs does not exist",
    );
    expect(&["--memory", "100T"], root.path(), "this host has only");
    expect(&["--memory", "1M"], root.path(), "minimum");
    expect(&["--cpus", "512"], root.path(), "CPUs");
    expect(
        &["--cpuset", "0-4095"],
        root.path(),
        "is not available here",
    );
    expect(
        &["--memory-swap", "1G"],
        root.path(),
        "needs a memory limit",
    );
    expect(
        &["--net", "ip=10.0.0.1/32"],
        root.path(),
        "no room for a host address",
    );
    expect(
        &["--name", "../escape"],
        root.path(),
        "invalid container name",
    );
    expect(&["--cap-add", "FLY"], root.path(), "unknown capability");
    // Flag syntax is checked by the parser (status 2).
    let mut c = vireo();
    c.args(["container", "run", "--rootfs"])
        .arg(root.path())
        .args(["--memory", "lots", "--", "true"]);
    let o = run(c, TIMEOUT, None);
    assert_eq!(o.code(), Some(2), "{o}");
    assert!(o.stderr.contains("invalid size 'lots'"), "{o}");
}

#[test]
fn memory_hog_is_oom_killed_inside_the_container() {
    let test = "memory_hog_is_oom_killed_inside_the_container";
    if skip_unless_root(test) {
        return;
    }
    let root = busybox_rootfs("oom");
    // awk doubles a string until the kernel's OOM killer ends it at the 32 MiB limit.
    let o = container(
        root.path(),
        &["--memory", "32M", "--memory-swap", "0"],
        &["awk", "BEGIN { s = \"x\"; while (1) s = s s }"],
    );
    assert_eq!(o.code(), Some(128 + 9), "killed by SIGKILL\n{o}");
    assert!(o.stderr.contains("memory limit (32M) was reached"), "{o}");
}

#[test]
fn fork_bomb_stops_at_the_pid_limit() {
    let test = "fork_bomb_stops_at_the_pid_limit";
    if skip_unless_root(test) {
        return;
    }
    let root = busybox_rootfs("forkbomb");
    // After starting the bomb, PID 1 only uses shell builtins (a fork of its own could be
    // refused too): a counting loop to give the bomb time, then the number of processes in
    // the container.
    let o = sh(
        root.path(),
        &["--pids", "16"],
        "bomb() { bomb | bomb & }; (bomb) & \
         i=0; while [ $i -lt 30000 ]; do i=$((i + 1)); done; \
         set -- /proc/[0-9]*; echo procs=$#",
    );
    assert_eq!(o.code(), Some(0), "{o}");
    let procs: usize = o
        .stdout
        .trim()
        .strip_prefix("procs=")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{o}"));
    assert!(procs <= 16, "{procs} processes under a limit of 16\n{o}");
    assert!(o.stderr.contains("can't fork"), "{o}");
    assert!(
        o.stderr.contains("process limit (16) refused"),
        "vireo reports the refused forks\n{o}"
    );
}

#[test]
fn cpu_max_caps_a_busy_loop() {
    let test = "cpu_max_caps_a_busy_loop";
    if skip_unless_root(test) {
        return;
    }
    let root = busybox_rootfs("cpumax");
    // A busy loop for 3 s of wall time under a cap of 0.2 CPU, then the CPU time the shell's
    // waited-for children used (fields 16 and 17 of /proc/<pid>/stat, in clock ticks).
    let wall = 3.0;
    let o = sh(
        root.path(),
        &["--cpus", "0.2"],
        "timeout -s KILL 3 sh -c 'while :; do :; done'; cat /proc/$$/stat; true",
    );
    assert_eq!(o.code(), Some(0), "{o}");
    let stat = o.stdout.trim();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    // Field 16 is index 16 - 3 after the command name.
    let ticks: f64 = fields[13].parse::<f64>().unwrap() + fields[14].parse::<f64>().unwrap();
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let used = ticks / hz / wall;
    assert!(
        (0.02..=0.3).contains(&used),
        "CPU use {used:.3} of one CPU, expected about 0.2\n{o}"
    );
}

#[test]
fn escape_attempts_fail() {
    let test = "escape_attempts_fail";
    if skip_unless_root(test) {
        return;
    }
    let root = busybox_rootfs("escape");
    // A file on the host, outside the root file system.
    let outside = common::TempDir::new("escape-outside");
    let marker = outside.path().join("host-secret");
    std::fs::write(&marker, "secret").unwrap();
    let m = marker.to_string_lossy();
    let script = format!(
        r#"
        echo "procs: $(ls /proc | grep -E '^[0-9]+$' | tr '\n' ' ')"
        cd /; cd ..; cd ../../..; echo "dotdot: $(pwd) $(ls | tr '\n' ' ')"
        cat {m} 2>/dev/null && echo "LEAK direct"
        cat /../../..{m} 2>/dev/null && echo "LEAK dotdot"
        cat /proc/1/root/../../..{m} 2>/dev/null && echo "LEAK proc-root"
        echo "proc1root: $(ls /proc/1/root/.. | tr '\n' ' ')"
        echo "fds: $(ls /proc/self/fd | tr '\n' ' ')"
        ls /proc/self/fd/7/ 2>/dev/null && echo "LEAK fd"
        mount -t tmpfs none /tmp 2>/dev/null && echo "LEAK mount"
        umount /proc 2>/dev/null && echo "LEAK umount"
        chroot / true 2>/dev/null && echo "LEAK chroot"
        unshare -m true 2>/dev/null && echo "LEAK unshare"
        mknod /tmp/sda b 8 0 2>/dev/null && echo "LEAK mknod"
        echo h 2>/dev/null > /proc/sysrq-trigger && echo "LEAK sysrq"
        v=$(cat /proc/sys/kernel/randomize_va_space); echo $v 2>/dev/null > /proc/sys/kernel/randomize_va_space && echo "LEAK sysctl"
        echo "masked: $(cat /proc/timer_list /proc/kallsyms /proc/keys | wc -c)"
        grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status
        read -r stat < /proc/self/stat; set -- ${{stat##*) }}; echo "tty: $5"
        echo done
        "#
    );
    // fd 7 is the host's root directory, left open (not close-on-exec) by the shell that
    // starts vireo.
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg("exec 7</; exec \"$@\"")
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_vireo"))
        .args(["container", "run", "--rootfs"])
        .arg(root.path())
        .args(["--", "sh", "-c", &script])
        .stdin(Stdio::null());
    let o = run(c, TIMEOUT, None);
    o.assert_clean();
    assert_eq!(o.code(), Some(0), "{o}");
    assert!(!o.stdout.contains("LEAK"), "escaped:\n{o}");
    assert!(o.stdout.contains("done"), "{o}");
    let line = |prefix: &str| {
        o.stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix} line\n{o}"))
            .trim()
            .to_string()
    };
    // Only the container's own processes: sh (1) and the few it started.
    let pids: Vec<u32> = line("procs:")
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert!(pids.contains(&1) && pids.len() <= 8, "{pids:?}");
    assert!(pids.iter().all(|&p| p < 20), "host PIDs visible: {pids:?}");
    // `..` from the root is the root: what is listed is the root file system's top level.
    let mut top: Vec<String> = std::fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert_eq!(line("dotdot:"), format!("/ {}", top.join(" ")), "{o}");
    assert_eq!(line("proc1root:"), top.join(" "), "{o}");
    // Only stdio is inherited.
    let fds = line("fds:");
    assert!(
        !fds.split_whitespace().any(|f| f == "7"),
        "fd 7 leaked: {fds}"
    );
    // Kernel state in /proc is behind /dev/null (the host's timer_list alone has kilobytes).
    assert!(std::fs::metadata("/proc/timer_list").is_ok());
    assert_eq!(
        line("masked:"),
        "0",
        "/proc/timer_list, kallsyms, keys are masked"
    );
    assert!(o.stdout.contains("CapEff:\t0000000000000000"), "{o}");
    assert!(o.stdout.contains("CapBnd:\t0000000000000000"), "{o}");
    assert!(o.stdout.contains("NoNewPrivs:\t1"), "{o}");
    assert!(o.stdout.contains("Seccomp:\t2"), "{o}");
    // No controlling terminal (field 7 of /proc/self/stat): no TIOCSTI into the host's.
    assert_eq!(line("tty:"), "0", "{o}");
}

#[test]
fn veth_pair_reaches_the_host_and_is_removed() {
    let test = "veth_pair_reaches_the_host_and_is_removed";
    if skip_unless_root(test) {
        return;
    }
    let root = busybox_rootfs("net");
    let n = name("net");
    let subnet = 100 + std::process::id() % 150;
    let host_ip = format!("10.213.{subnet}.1");
    let net = format!("ip=10.213.{subnet}.2/24");
    // The container connects to a listener on the host (through the host end of its veth
    // pair), then waits for a line on stdin before it exits.
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut c = vireo();
    c.args(["container", "run", "--name", &n, "--net", &net, "--rootfs"])
        .arg(root.path())
        .args([
            "--",
            "sh",
            "-c",
            &format!(
                "ip route | grep default; ip -4 addr show eth0 | grep inet; \
                 echo hello-host | nc {host_ip} {port}; read line"
            ),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = c.spawn().unwrap();
    let mut guard = Background(child);
    let state = wait_running(&n);
    let host_if = state.net.as_ref().unwrap().host_if.clone();
    let (conn, peer) = listener.accept().unwrap();
    assert_eq!(peer.ip().to_string(), format!("10.213.{subnet}.2"));
    let mut got = String::new();
    std::io::BufReader::new(&conn).read_line(&mut got).unwrap();
    assert_eq!(got, "hello-host\n");
    // busybox nc leaves when the host closes the connection.
    drop(conn);
    assert!(link_exists(&host_if), "{host_if} missing while running");
    guard.0.stdin.take().unwrap().write_all(b"bye\n").unwrap();
    let status = guard.0.wait().unwrap();
    let mut out = String::new();
    guard
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(status.success(), "{out}");
    assert!(out.contains(&format!("default via {host_ip}")), "{out}");
    assert!(out.contains(&format!("inet 10.213.{subnet}.2/24")), "{out}");
    wait_until("the veth pair to go", Duration::from_secs(10), || {
        !link_exists(&host_if)
    });
    assert_nothing_left(&n, root.path());
}

#[test]
fn list_update_and_stop_a_running_container() {
    let test = "list_update_and_stop_a_running_container";
    if skip_unless_root(test) {
        return;
    }
    let root = busybox_rootfs("liststop");
    let n = name("ls");
    let mut c = vireo();
    c.args([
        "container",
        "run",
        "--name",
        &n,
        "--memory",
        "64M",
        "--pids",
        "20",
        "--rootfs",
    ])
    .arg(root.path())
    .args([
        "--",
        "sh",
        "-c",
        "trap 'echo got TERM; exit 3' TERM; while :; do sleep 0.1; done",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    let mut guard = Background(c.spawn().unwrap());
    let state = wait_running(&n);
    assert!(pid_alive(state.init.pid));

    // list: a table line and JSON.
    let o = run(
        {
            let mut l = vireo();
            l.args(["container", "list"]);
            l
        },
        TIMEOUT,
        None,
    );
    let row = o
        .stdout
        .lines()
        .find(|l| l.starts_with(&n))
        .unwrap_or_else(|| panic!("{n} not listed\n{o}"));
    assert!(row.contains(&state.init.pid.to_string()), "{row}");
    assert!(row.contains("while"), "{row}");
    let mut j = vireo();
    j.args(["container", "list", "--json"]);
    let o = run(j, TIMEOUT, None);
    let all: Vec<serde_json::Value> = serde_json::from_str(&o.stdout).unwrap();
    let me = all.iter().find(|c| c["id"] == n.as_str()).unwrap();
    assert!(me["stats"]["pids_current"].as_u64().unwrap() >= 1);

    // update: the limits change on the host while it runs; a CPU cap, which it did not have,
    // brings the cpu controller in with its processes.
    let mut u = vireo();
    u.args([
        "container",
        "update",
        &n,
        "--pids",
        "5",
        "--memory",
        "48M",
        "--cpus",
        "0.5",
    ]);
    let o = run(u, TIMEOUT, None);
    assert_eq!(o.code(), Some(0), "{o}");
    assert!(o.stderr.contains("memory 48M, pids 5, cpus 0.5"), "{o}");
    let updated: State = serde_json::from_slice(&std::fs::read(state_file(&n)).unwrap()).unwrap();
    let cg = updated.cgroup.as_ref().unwrap();
    let mut cpu_limited = false;
    for d in cg.dirs() {
        for (file, want) in [("cpu.cfs_quota_us", "50000"), ("cpu.max", "50000 100000")] {
            if let Ok(v) = std::fs::read_to_string(d.join(file)) {
                assert_eq!(v.trim(), want, "{}", d.join(file).display());
                let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap();
                assert!(
                    procs.lines().any(|p| p == state.init.pid.to_string()),
                    "init not moved into {}",
                    d.display()
                );
                cpu_limited = true;
            }
        }
    }
    assert!(cpu_limited, "no cpu cgroup after update: {cg:?}");
    let cg = state.cgroup.as_ref().unwrap();
    for d in cg.dirs() {
        for (file, want) in [
            ("pids.max", "5"),
            ("memory.limit_in_bytes", "50331648"),
            ("memory.max", "50331648"),
        ] {
            if let Ok(v) = std::fs::read_to_string(d.join(file)) {
                assert_eq!(v.trim(), want, "{}", d.join(file).display());
            }
        }
    }

    // stop: SIGTERM reaches the trap; the container's vireo exits with its status.
    let mut s = vireo();
    s.args(["container", "stop", &n, "--time", "10"]);
    let o = run(s, TIMEOUT, None);
    assert_eq!(o.code(), Some(0), "{o}");
    let status = guard.0.wait().unwrap();
    assert_eq!(status.code(), Some(3));
    let mut out = String::new();
    guard
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(out.contains("got TERM"), "{out}");
    assert!(!pid_alive(state.init.pid));
    assert_nothing_left(&n, root.path());
    // Stopping it again: a clear error.
    let mut s = vireo();
    s.args(["container", "stop", &n]);
    let o = run(s, TIMEOUT, None);
    assert_eq!(o.code(), Some(1), "{o}");
    assert!(o.stderr.contains("no running container"), "{o}");
}

#[test]
fn sigkill_of_vireo_leaves_nothing_behind() {
    let test = "sigkill_of_vireo_leaves_nothing_behind";
    if skip_unless_root(test) {
        return;
    }
    let root = busybox_rootfs("sigkill");
    let n = name("kill");
    let subnet = 100 + (std::process::id() + 7) % 150;
    let mut c = vireo();
    c.args([
        "container",
        "run",
        "--name",
        &n,
        "--memory",
        "64M",
        "--pids",
        "20",
    ])
    .args(["--net", &format!("ip=10.214.{subnet}.2/24"), "--rootfs"])
    .arg(root.path())
    .args(["--", "sh", "-c", "sleep 1000 & sleep 1000"])
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let mut guard = Background(c.spawn().unwrap());
    let state = wait_running(&n);
    let host_if = state.net.as_ref().unwrap().host_if.clone();
    assert!(!cgroup_dirs(&n).is_empty());
    assert!(link_exists(&host_if));
    // SIGKILL: vireo cannot clean up itself.
    guard.0.kill().unwrap();
    guard.0.wait().unwrap();
    // The container's init dies with its parent, and the PID namespace with it ...
    wait_until(
        "the container's init to die",
        Duration::from_secs(10),
        || !pid_alive(state.init.pid),
    );
    // ... the network namespace goes, and the kernel deletes the veth pair ...
    wait_until("the veth pair to go", Duration::from_secs(20), || {
        !link_exists(&host_if)
    });
    // ... and the next vireo removes the empty cgroups and the state.
    let mut l = vireo();
    l.args(["container", "list"]);
    let o = run(l, TIMEOUT, None);
    assert!(!o.stdout.contains(&n), "{o}");
    assert_nothing_left(&n, root.path());
}

#[test]
fn cpuset_pins_the_container() {
    let test = "cpuset_pins_the_container";
    if skip_unless_root(test) {
        return;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let last = (cpus - 1).to_string();
    let root = busybox_rootfs("cpuset");
    let o = sh(
        root.path(),
        &["--cpuset", &last, "--cpu-weight", "50"],
        "grep Cpus_allowed_list /proc/self/status",
    );
    assert_eq!(o.code(), Some(0), "{o}");
    assert_eq!(
        o.stdout.trim(),
        format!("Cpus_allowed_list:\t{last}"),
        "{o}"
    );
}

#[test]
fn read_only_root_with_a_writable_tmp() {
    let test = "read_only_root_with_a_writable_tmp";
    if skip_unless_root(test) {
        return;
    }
    let root = busybox_rootfs("readonly");
    let o = sh(
        root.path(),
        &["--read-only", "--user", "65534:65534"],
        "touch /etc/x 2>/dev/null && echo LEAK; echo data > /tmp/f && cat /tmp/f; id -u",
    );
    assert_eq!(o.code(), Some(0), "{o}");
    assert_eq!(o.stdout, "data\n65534\n", "{o}");
    assert!(!root.path().join("etc/x").exists());
}

/// Run from a terminal, the container gets the terminal as stdio but not as its controlling
/// terminal (a session of its own): it cannot push keystrokes into the shell outside
/// (TIOCSTI) or take over its job control.
#[test]
fn no_controlling_terminal_inside() {
    let test = "no_controlling_terminal_inside";
    if skip_unless_root(test) {
        return;
    }
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::process::CommandExt;
    let root = busybox_rootfs("ctty");
    let (mut m, mut s) = (0, 0);
    // SAFETY: openpty writes two new descriptors; null name/termios/winsize.
    let r = unsafe {
        libc::openpty(
            &mut m,
            &mut s,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0);
    // SAFETY: fresh descriptors owned by nobody else.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) };
    let mut c = vireo();
    c.args(["container", "run", "--rootfs"])
        .arg(root.path())
        .args([
            "--",
            "sh",
            "-c",
            "read -r stat < /proc/self/stat; set -- ${stat##*) }; echo \"tty=$5\"; read x",
        ])
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::null());
    // SAFETY: setsid and ioctl(TIOCSCTTY) between fork and exec: vireo gets the pty as its
    // controlling terminal, as from an interactive shell.
    unsafe {
        c.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = Background(c.spawn().unwrap());
    drop(slave);
    let mut out = std::fs::File::from(master);
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&got).contains('\n') {
        let n = out.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "EOF before output: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got).into_owned();
    // vireo itself has the terminal as its controlling terminal ...
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.0.id())).unwrap();
    let tty_nr: i64 = stat[stat.rfind(')').unwrap() + 2..]
        .split(' ')
        .nth(4)
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(
        tty_nr, 0,
        "vireo has no controlling terminal: the test proves nothing"
    );
    // ... the container's command does not.
    assert!(text.contains("tty=0"), "{text:?}");
    out.write_all(b"\n").unwrap();
    let mut child = child;
    let status = child.0.wait().unwrap();
    assert!(status.success());
}
