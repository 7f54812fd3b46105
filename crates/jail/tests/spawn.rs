//! Real jails (root only): namespaces, the new root, credentials, seccomp and limits, checked
//! from inside with busybox.

use std::ffi::OsString;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

use vireo_jail::{spawn, Exit, JailSpec, JailedChild, Limits, Mount, Root, SyscallList, Violation};

fn skip(test: &str) -> bool {
    if !vireo_jail::is_root() {
        eprintln!("SKIP {test}: needs root");
        return true;
    }
    false
}

fn busybox() -> PathBuf {
    let cache = vireo_guests::default_guest::cache_dir().unwrap();
    vireo_guests::default_guest::busybox::busybox(&cache).unwrap()
}

/// A spec running `sh -c script` from busybox in an empty tmpfs root.
fn sh(name: &str, script: &str) -> JailSpec {
    let bb = busybox();
    let mut s = JailSpec::new(
        &format!("{name}-{}", std::process::id()),
        vec!["/bin/sh".into(), "-c".into(), script.into()],
    );
    for target in ["/bin/busybox", "/bin/sh"] {
        s.mounts.push(Mount::Bind {
            source: bb.clone(),
            target: target.into(),
            read_only: true,
        });
    }
    s
}

/// Runs the spec with stdout captured through a pipe; returns (exit, stdout, the child).
fn run_child(spec: &JailSpec) -> (Exit, String, JailedChild) {
    let mut fds = [0; 2];
    // SAFETY: a pipe for the test's own use.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh descriptors owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let mut spec = spec.clone();
    spec.stdio[1] = Some(w.as_raw_fd());
    let child = spawn(&spec);
    drop(w);
    let mut child = child.unwrap();
    let mut out = String::new();
    std::fs::File::from(r).read_to_string(&mut out).unwrap();
    (child.wait().unwrap(), out, child)
}

fn run(spec: &JailSpec) -> (Exit, String) {
    let (e, o, _) = run_child(spec);
    (e, o)
}

#[test]
fn pid_one_hostname_and_a_bare_root() {
    if skip("pid_one_hostname_and_a_bare_root") {
        return;
    }
    let mut spec = sh("t-basic", "echo pid=$$; hostname; ls /; ls /dev; cat /proc/self/status | grep -E '^(Uid|CapEff|CapBnd|NoNewPrivs|Seccomp):'");
    spec.hostname = "jailhost".into();
    let (exit, out) = run(&spec);
    assert_eq!(exit, Exit::Code(0), "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "pid=1");
    assert_eq!(lines[1], "jailhost");
    assert!(out.contains("bin\ndev\nproc\n"), "{out}");
    assert!(out.contains("null") && out.contains("urandom"), "{out}");
    assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
    assert!(out.contains("CapBnd:\t0000000000000000"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
}

#[test]
fn unprivileged_ids_and_seccomp() {
    if skip("unprivileged_ids_and_seccomp") {
        return;
    }
    let mut spec = sh(
        "t-ids",
        "id -u; id -g; grep Seccomp: /proc/self/status; mount -t tmpfs x /tmp; echo mount=$?",
    );
    spec.uid = 65534;
    spec.gid = 65534;
    spec.seccomp = Some((
        SyscallList::parse("container", vireo_jail::seccomp::CONTAINER_DEFAULT).unwrap(),
        Violation::Errno(libc::EPERM),
    ));
    let (exit, out) = run(&spec);
    assert_eq!(exit, Exit::Code(0), "{out}");
    assert!(out.starts_with("65534\n65534\nSeccomp:\t2\n"), "{out}");
    assert!(
        out.contains("mount=1") || out.contains("mount=255"),
        "{out}"
    );
}

#[test]
fn missing_command_is_reported() {
    if skip("missing_command_is_reported") {
        return;
    }
    let mut spec = sh("t-nocmd", "");
    spec.argv = vec![OsString::from("no-such-program")];
    let e = spawn(&spec).unwrap_err();
    assert_eq!(e.exec_status(), Some(127), "{e}");
    assert!(e.to_string().contains("no-such-program"), "{e}");
}

#[test]
fn pids_limit_applies() {
    if skip("pids_limit_applies") {
        return;
    }
    // sh is one process; three sleeps fit under 4, the fourth fork is refused (and busybox
    // sh gives up on the script).
    let mut spec = sh(
        "t-pids",
        "for i in 1 2 3 4 5 6 7 8; do sleep 5 & echo started; done; echo all",
    );
    spec.limits = Limits {
        pids_max: Some(4),
        ..Default::default()
    };
    let (exit, out, child) = run_child(&spec);
    assert_ne!(exit, Exit::Code(0), "{out}");
    assert_eq!(out.matches("started").count(), 3, "{out}");
    assert!(!out.contains("all"), "{out}");
    assert!(child.final_stats().unwrap().pids_refused.unwrap() >= 1);
}

#[test]
fn rootfs_directory_root() {
    if skip("rootfs_directory_root") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("vireo-jail-rootfs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cache = vireo_guests::default_guest::cache_dir().unwrap();
    vireo_guests::default_guest::busybox::busybox_rootfs(&cache, &dir).unwrap();
    let mut spec = sh(
        "t-dir",
        "ls /; cat /etc/passwd | head -1; touch /x && echo wrote",
    );
    spec.mounts.clear();
    spec.root = Root::Dir {
        path: dir.clone(),
        read_only: true,
    };
    let (exit, out) = run(&spec);
    assert_ne!(exit, Exit::Code(0), "read-only root: touch fails\n{out}");
    assert!(out.contains("root:x:0:0"), "{out}");
    assert!(!out.contains("wrote"), "{out}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The test harness runs tests on threads of their own: spawn_fn must refuse (its child could
/// inherit a lock another thread held). Its working path is tested through `vireo run --jail`
/// (tests/jail.rs at the workspace root), a single-threaded caller.
#[test]
fn spawn_fn_refuses_a_multi_threaded_caller() {
    if skip("spawn_fn_refuses_a_multi_threaded_caller") {
        return;
    }
    let spec = sh("t-fn", "true");
    let e = vireo_jail::spawn_fn(&spec, || 0).unwrap_err();
    assert!(e.to_string().contains("single-threaded"), "{e}");
}

/// A root file system whose `dev` is a symlink out of it: the jail refuses to mount there
/// (it would otherwise create device nodes on the host), and says why.
#[test]
fn hostile_symlink_in_the_root_is_refused() {
    if skip("hostile_symlink_in_the_root_is_refused") {
        return;
    }
    let base = std::env::temp_dir().join(format!("vireo-jail-hostile-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let (root, outside) = (base.join("root"), base.join("outside"));
    std::fs::create_dir_all(&outside).unwrap();
    let cache = vireo_guests::default_guest::cache_dir().unwrap();
    vireo_guests::default_guest::busybox::busybox_rootfs(&cache, &root).unwrap();
    std::fs::remove_dir(root.join("dev")).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("dev")).unwrap();
    let mut spec = sh("t-hostile", "true");
    spec.mounts.clear();
    spec.root = Root::Dir {
        path: root.clone(),
        read_only: false,
    };
    let e = spawn(&spec).unwrap_err().to_string();
    assert!(e.contains("/dev") && e.contains("symlink"), "{e}");
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "created files outside"
    );
    std::fs::remove_dir_all(&base).unwrap();
}

/// `pass_fds`: the listed descriptors reach the jailed command under their numbers; every
/// other one (here an open directory of the host, a way back to the old root) is closed.
#[test]
fn passed_descriptors_survive_and_others_are_closed() {
    if skip("passed_descriptors_survive_and_others_are_closed") {
        return;
    }
    let mut fds = [0; 2];
    // SAFETY: a pipe for the test's own use.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh descriptors owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let w_fd = w.as_raw_fd();
    // A host directory left open without O_CLOEXEC: must not reach the jail.
    let leak = std::fs::File::open("/").unwrap();
    let leak_fd = leak.as_raw_fd();
    // SAFETY: clearing FD_CLOEXEC on a descriptor this test owns.
    assert_eq!(unsafe { libc::fcntl(leak_fd, libc::F_SETFD, 0) }, 0);
    let script = format!("echo through-the-passed-fd >&{w_fd}; ls /proc/self/fd");
    let mut spec = sh("t-passfd", &script);
    spec.pass_fds = vec![w_fd];
    let (exit, out) = run(&spec);
    drop(w);
    let mut passed = String::new();
    std::fs::File::from(r).read_to_string(&mut passed).unwrap();
    assert_eq!(exit, Exit::Code(0), "{out}");
    assert_eq!(passed, "through-the-passed-fd\n");
    let listed: Vec<i32> = out.lines().filter_map(|l| l.trim().parse().ok()).collect();
    assert!(listed.contains(&w_fd), "{out}");
    assert!(
        !listed.contains(&leak_fd),
        "the host directory leaked in: {out}"
    );
    drop(leak);
    // Descriptors below 3 are stdio's business.
    let mut bad = sh("t-passfd-bad", "true");
    bad.pass_fds = vec![1];
    assert!(spawn(&bad).is_err());
}
