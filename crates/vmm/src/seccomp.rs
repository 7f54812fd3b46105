//! Per-thread seccomp filters for a jailed VMM.
//!
//! Each kind of thread has its allow-list checked in as data (`crates/vmm/seccomp/<kind>.txt`,
//! the format of `vireo_jail::seccomp`). After [`enable`], each thread installs its own filter
//! where it starts ([`apply`]): the main thread the `vmm` list, vCPU threads `vcpu`, device
//! workers `device`, virtio-net queue-pair threads `net`, the virtio-vsock thread `vsock`,
//! the API thread `api`. Filters stack — a thread's calls must also pass
//! the filters of the thread that created it — so the lists of threads the main thread starts
//! after installing its own (vCPUs, device workers) are subsets of `vmm`; threads started
//! before (the console, signal and API threads) are not bound by it. The jail around the
//! process allows the union of all lists ([`process_list`]): the VMM is not exec'd into the
//! jail but called in the jailed child (`vireo_jail::spawn_fn`), so it needs no `execve`.
//!
//! A call outside a thread's list raises `SIGSYS` (`SECCOMP_RET_TRAP`); the handler installed
//! by [`enable`] writes which thread made which call to stderr and ends the process with
//! status [`EXIT_SECCOMP`].

use std::cell::Cell;
use std::fmt::Write as _;
use std::sync::OnceLock;

use seccompiler::BpfProgram;
use vireo_jail::seccomp::{self as jail_seccomp, SyscallList, Violation};

/// Exit status after a seccomp violation (128 + `SIGSYS`).
pub const EXIT_SECCOMP: i32 = 128 + libc::SIGSYS;

/// The kinds of VMM threads, each with its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread (building, rebooting and tearing down the VM).
    Vmm,
    /// A vCPU thread.
    Vcpu,
    /// A virtio device's worker thread (started from a vCPU thread at DRIVER_OK, or from the
    /// main thread on resume).
    Device,
    /// A virtio-net queue-pair thread (`virtio-net<N>-<pair>`), started like a worker.
    Net,
    /// The virtio-vsock thread (`virtio-vsock`), started like a worker.
    Vsock,
    /// The console input and signal threads.
    Console,
    /// The API thread (and the blocking-task thread it starts).
    Api,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 7] = [
        ThreadKind::Vmm,
        ThreadKind::Vcpu,
        ThreadKind::Device,
        ThreadKind::Net,
        ThreadKind::Vsock,
        ThreadKind::Console,
        ThreadKind::Api,
    ];

    /// The kind of the device thread named `name` (vireo-virtio names them): `virtio-net*`
    /// threads are [`ThreadKind::Net`], `virtio-vsock*` [`ThreadKind::Vsock`], every other
    /// worker [`ThreadKind::Device`].
    pub fn of_device_thread(name: Option<&str>) -> ThreadKind {
        match name {
            Some(n) if n.starts_with("virtio-net") => ThreadKind::Net,
            Some(n) if n.starts_with("virtio-vsock") => ThreadKind::Vsock,
            _ => ThreadKind::Device,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Device => "device",
            ThreadKind::Net => "net",
            ThreadKind::Vsock => "vsock",
            ThreadKind::Console => "console",
            ThreadKind::Api => "api",
        }
    }

    /// The checked-in allow-list text.
    pub fn list_text(self) -> &'static str {
        match self {
            ThreadKind::Vmm => include_str!("../seccomp/vmm.txt"),
            ThreadKind::Vcpu => include_str!("../seccomp/vcpu.txt"),
            ThreadKind::Device => include_str!("../seccomp/device.txt"),
            ThreadKind::Net => include_str!("../seccomp/net.txt"),
            ThreadKind::Vsock => include_str!("../seccomp/vsock.txt"),
            ThreadKind::Console => include_str!("../seccomp/console.txt"),
            ThreadKind::Api => include_str!("../seccomp/api.txt"),
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A list that does not parse or compile (a bug in the checked-in data), or a filter the
/// kernel refused.
#[derive(Debug, thiserror::Error)]
#[error("seccomp: {0}")]
pub struct SeccompError(String);

impl From<vireo_jail::Error> for SeccompError {
    fn from(e: vireo_jail::Error) -> Self {
        SeccompError(e.to_string())
    }
}

/// The parsed allow-list of `kind`.
pub fn list(kind: ThreadKind) -> Result<SyscallList, SeccompError> {
    Ok(SyscallList::parse(
        &format!("{}.txt", kind.name()),
        kind.list_text(),
    )?)
}

/// Everything any VMM thread may do: the filter of the jail around a VMM.
pub fn process_list() -> Result<SyscallList, SeccompError> {
    let mut all = SyscallList::default();
    for kind in ThreadKind::ALL {
        all = all.union(&list(kind)?);
    }
    Ok(all)
}

static FILTERS: OnceLock<Vec<Vec<BpfProgram>>> = OnceLock::new();

thread_local! {
    /// The kind of filter this thread installed (index + 1; 0: none), for the SIGSYS report.
    static KIND: Cell<u8> = const { Cell::new(0) };
    /// The thread's name, copied when the filter is installed (the handler may not make
    /// system calls the filter forbids, such as prctl(PR_GET_NAME)).
    static NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
}

/// Compiles every thread kind's filter and installs the SIGSYS reporter. From now on
/// [`apply`] installs filters; before, it does nothing.
pub fn enable() -> Result<(), SeccompError> {
    if FILTERS.get().is_some() {
        return Ok(());
    }
    let mut filters = Vec::new();
    for kind in ThreadKind::ALL {
        filters.push(list(kind)?.compile(Violation::Trap)?);
    }
    install_reporter()?;
    // Device threads are started by a thread of their own, created here before any thread
    // filter: they inherit only the process's filter, not a vCPU's or the main thread's.
    vireo_virtio::start_thread_spawner()
        .map_err(|e| SeccompError(format!("starting the device-thread spawner: {e}")))?;
    let _ = FILTERS.set(filters);
    // Device threads are started by vireo-virtio, which knows nothing of filters: it calls
    // this first thing in each of them, and their names tell which list applies.
    vireo_virtio::set_worker_start_hook(|| {
        apply(ThreadKind::of_device_thread(std::thread::current().name()))
            .map_err(|e| e.to_string())
    });
    Ok(())
}

/// Whether [`enable`] was called.
pub fn enabled() -> bool {
    FILTERS.get().is_some()
}

/// Installs `kind`'s filter on the calling thread (when enabled). Call it first thing in a
/// new thread; a thread that cannot install its filter must not run.
pub fn apply(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(filters) = FILTERS.get() else {
        return Ok(());
    };
    let programs = filters
        .get(kind.index())
        .ok_or_else(|| SeccompError(format!("no filter for {}", kind.name())))?;
    let mut name = [0u8; 16];
    if let Some(n) = std::thread::current().name() {
        let n = n.as_bytes();
        let len = n.len().min(15);
        name[..len].copy_from_slice(&n[..len]);
    }
    NAME.with(|c| c.set(name));
    jail_seccomp::apply_to_current_thread(programs)?;
    KIND.with(|k| k.set(kind.index() as u8 + 1));
    tracing::debug!(thread = kind.name(), "seccomp filter installed");
    Ok(())
}

/// A fixed buffer for formatting in the signal handler (no allocation).
struct StackBuf {
    buf: [u8; 256],
    len: usize,
}

impl std::fmt::Write for StackBuf {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// `SIGSYS` from a filter: report the thread kind, its name, the call and its first two
/// arguments on stderr, then end the process.
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // siginfo_t for SIGSYS (asm-generic/siginfo.h): `_call_addr` at offset 16, then
    // `int _syscall` at 24.
    // SAFETY: the kernel passes a valid siginfo_t (128 bytes) to an SA_SIGINFO handler.
    let nr = unsafe { info.cast::<u8>().add(24).cast::<i32>().read_unaligned() };
    let (a0, a1) = if ctx.is_null() {
        (0, 0)
    } else {
        // SAFETY: with SA_SIGINFO the third argument is the interrupted context.
        let uc = unsafe { &*ctx.cast::<libc::ucontext_t>() };
        (
            uc.uc_mcontext.gregs[libc::REG_RDI as usize] as u64,
            uc.uc_mcontext.gregs[libc::REG_RSI as usize] as u64,
        )
    };
    let kind = KIND
        .try_with(Cell::get)
        .ok()
        .and_then(|k| ThreadKind::ALL.get(usize::from(k).wrapping_sub(1)).copied())
        .map_or("unfiltered", ThreadKind::name);
    let name = NAME.try_with(Cell::get).unwrap_or([0; 16]);
    let name_len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    let thread = std::str::from_utf8(&name[..name_len]).unwrap_or("?");
    let call = jail_seccomp::syscall_name(i64::from(nr)).unwrap_or("unknown");
    let mut msg = StackBuf {
        buf: [0; 256],
        len: 0,
    };
    let _ = writeln!(
        msg,
        "\r\nvireo: seccomp: thread `{thread}` ({kind} filter) made a forbidden system call: \
         {call} ({nr}), arguments {a0:#x}, {a1:#x}; stopping the VMM"
    );
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is valid.
    unsafe {
        libc::write(2, msg.buf.as_ptr().cast(), msg.len);
        libc::_exit(EXIT_SECCOMP);
    }
}

fn install_reporter() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is valid; the fields set below describe an SA_SIGINFO
    // handler with an empty mask, and `on_sigsys` only does async-signal-safe work.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            return Err(SeccompError(format!(
                "cannot install the SIGSYS handler: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_list_parses_and_compiles() {
        for kind in ThreadKind::ALL {
            let l = list(kind).unwrap();
            assert!(!l.is_empty(), "{}", kind.name());
            l.compile(Violation::Trap).unwrap();
        }
        let p = process_list().unwrap();
        assert!(!p.allows("execve", [0; 6]), "the jailed VMM never execs");
        assert!(!p.allows("mount", [0; 6]));
        // Sockets: Unix only (vsock's guest connections), never IP, netlink or packet.
        assert_unix_sockets_only(&p);
    }

    /// `l` creates AF_UNIX sockets and no other kind.
    fn assert_unix_sockets_only(l: &vireo_jail::seccomp::SyscallList) {
        for domain in [
            libc::AF_INET,
            libc::AF_INET6,
            libc::AF_NETLINK,
            libc::AF_PACKET,
            0,
        ] {
            assert!(
                !l.allows("socket", [domain as u64, 1, 0, 0, 0, 0]),
                "{domain}"
            );
        }
        assert!(l.allows("socket", [libc::AF_UNIX as u64, 1, 0, 0, 0, 0]));
    }

    #[test]
    fn device_threads_get_the_list_their_name_says() {
        let of = ThreadKind::of_device_thread;
        assert_eq!(of(Some("virtio-net0-0")), ThreadKind::Net);
        assert_eq!(of(Some("virtio-net12-3")), ThreadKind::Net);
        assert_eq!(of(Some("virtio-vsock")), ThreadKind::Vsock);
        assert_eq!(of(Some("virtio-blk0")), ThreadKind::Device);
        assert_eq!(of(Some("virtio-rng")), ThreadKind::Device);
        assert_eq!(of(None), ThreadKind::Device);
    }

    /// TUNSETIFF, TUNSETQUEUE, TUNSETOFFLOAD (linux/if_tun.h).
    const TUNSETIFF: u64 = 0x4004_54ca;
    const TUNSETQUEUE: u64 = 0x4004_54d9;
    const TUNSETOFFLOAD: u64 = 0x4004_54d0;

    /// A net thread moves frames on the TAP it was handed; it cannot open, create sockets,
    /// re-attach the TAP to another device or start threads.
    #[test]
    fn net_threads_only_move_frames() {
        let n = list(ThreadKind::Net).unwrap();
        for call in [
            "readv",
            "writev",
            "read",
            "write",
            "epoll_wait",
            "epoll_ctl",
        ] {
            assert!(n.allows(call, [0; 6]), "{call}");
        }
        assert!(n.allows("ioctl", [5, TUNSETQUEUE, 0, 0, 0, 0]));
        assert!(n.allows("ioctl", [5, 0xae80, 0, 0, 0, 0]), "KVM interrupts");
        assert!(!n.allows("ioctl", [5, TUNSETIFF, 0, 0, 0, 0]));
        assert!(
            !n.allows("ioctl", [5, TUNSETOFFLOAD, 0, 0, 0, 0]),
            "set at activation"
        );
        // Activation (on a vCPU thread) sets offloads and queues, never a new interface.
        let v = list(ThreadKind::Vcpu).unwrap();
        assert!(v.allows("ioctl", [5, TUNSETOFFLOAD, 0, 0, 0, 0]));
        assert!(v.allows("ioctl", [5, TUNSETQUEUE, 0, 0, 0, 0]));
        assert!(!v.allows("ioctl", [5, TUNSETIFF, 0, 0, 0, 0]));
        assert!(!n.allows("ioctl", [5, 0x8914, 0, 0, 0, 0]), "SIOCSIFFLAGS");
        for call in [
            "open", "openat", "socket", "connect", "accept4", "sendto", "clone", "clone3",
            "execve", "mount", "setns", "unshare", "prctl", "seccomp",
        ] {
            assert!(
                !n.allows(call, [libc::AF_UNIX as u64, 0, 0, 0, 0, 0]),
                "{call}"
            );
        }
    }

    /// The vsock thread accepts host connections and connects out to Unix sockets only.
    #[test]
    fn the_vsock_thread_reaches_unix_sockets_only() {
        let v = list(ThreadKind::Vsock).unwrap();
        for call in [
            "accept4", "recvfrom", "sendto", "sendmsg", "connect", "shutdown",
        ] {
            assert!(v.allows(call, [0; 6]), "{call}");
        }
        assert_unix_sockets_only(&v);
        assert!(!v.allows("ioctl", [5, TUNSETIFF, 0, 0, 0, 0]));
        for call in [
            "openat", "bind", "listen", "clone", "execve", "mount", "unlinkat",
        ] {
            assert!(!v.allows(call, [0; 6]), "{call}");
        }
        // Net and plain device threads make no sockets at all.
        for kind in [ThreadKind::Net, ThreadKind::Device] {
            let l = list(kind).unwrap();
            assert!(!l.allows(
                "socket",
                [libc::AF_UNIX as u64, libc::SOCK_STREAM as u64, 0, 0, 0, 0]
            ));
            assert!(!l.allows("connect", [0; 6]), "{}", kind.name());
        }
    }

    /// Filters stack: a thread the main thread starts with a list that is not a subset of
    /// the main thread's would silently get the intersection. Device threads are started by
    /// the device-thread spawner, which has only the process's filter: they are bound by
    /// neither the main thread's list nor a vCPU's.
    #[test]
    fn thread_lists_are_subsets_of_the_main_thread_list() {
        let vmm = list(ThreadKind::Vmm).unwrap();
        let vcpu = list(ThreadKind::Vcpu).unwrap();
        assert!(vcpu.is_subset_of(&vmm), "vcpu allows more than vmm");
        // The vsock thread's sockets are allowed to it alone.
        assert!(!list(ThreadKind::Vsock).unwrap().is_subset_of(&vcpu));
        assert!(!list(ThreadKind::Vsock).unwrap().is_subset_of(&vmm));
        // The API, console and signal threads start before the main thread's filter: not
        // bound by it.
        assert!(!list(ThreadKind::Api).unwrap().is_subset_of(&vmm));
        // The jail allows everything every thread needs.
        let all = process_list().unwrap();
        for kind in ThreadKind::ALL {
            assert!(list(kind).unwrap().is_subset_of(&all), "{}", kind.name());
        }
    }

    #[test]
    fn vcpu_threads_cannot_reach_outside() {
        let v = list(ThreadKind::Vcpu).unwrap();
        // KVM_RUN, KVM_IRQ_LINE are fine.
        assert!(v.allows("ioctl", [5, 0xae80, 0, 0, 0, 0]));
        assert!(v.allows("ioctl", [5, 0x4008_ae61, 0, 0, 0, 0]));
        // TIOCSTI (push input into the terminal), TCSETS: not from a vCPU thread.
        assert!(!v.allows("ioctl", [0, 0x5412, 0, 0, 0, 0]));
        assert!(!v.allows("ioctl", [0, 0x5402, 0, 0, 0, 0]));
        // No sockets: the vsock and net threads are started by the device-thread spawner, so
        // this filter need not allow what they do.
        for domain in [libc::AF_UNIX, libc::AF_INET, libc::AF_NETLINK, 0] {
            assert!(
                !v.allows("socket", [domain as u64, 1, 0, 0, 0, 0]),
                "{domain}"
            );
        }
        for call in [
            "open",
            "openat",
            "execve",
            "execveat",
            "bind",
            "listen",
            "clone",
            "clone3",
            "fork",
            "vfork",
            "ptrace",
            "mount",
            "setuid",
            "kill",
            "prctl",
            "unshare",
            "setns",
            "process_vm_writev",
            "connect",
            "accept4",
            "readv",
        ] {
            assert!(!v.allows(call, [0; 6]), "vcpu thread must not {call}");
        }
        // No executable memory.
        let exec = libc::PROT_READ as u64 | libc::PROT_EXEC as u64;
        assert!(!v.allows("mprotect", [0, 4096, exec, 0, 0, 0]));
        assert!(!v.allows("mmap", [0, 4096, exec, 0, 0, 0]));
        assert!(v.allows("mprotect", [0, 4096, libc::PROT_READ as u64, 0, 0, 0]));
        // Threads (for device workers), never processes or namespaces; clone3 fails so that
        // glibc uses clone, whose flags the filter sees.
        let thread = (libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM) as u64;
        assert!(v.allows("clone", [thread, 0, 0, 0, 0, 0]));
        assert!(
            !v.allows("clone", [libc::SIGCHLD as u64, 0, 0, 0, 0, 0]),
            "fork"
        );
        for ns in [libc::CLONE_NEWUSER, libc::CLONE_NEWNS, libc::CLONE_NEWNET] {
            assert!(!v.allows("clone", [thread | ns as u64, 0, 0, 0, 0, 0]));
        }
        for kind in ThreadKind::ALL {
            let l = list(kind).unwrap();
            if l.allows("clone", [thread, 0, 0, 0, 0, 0]) {
                assert_eq!(
                    l.fails_with("clone3"),
                    Some(libc::ENOSYS),
                    "{}",
                    kind.name()
                );
            }
        }
        assert_eq!(
            process_list().unwrap().fails_with("clone3"),
            Some(libc::ENOSYS)
        );
        let vmm = list(ThreadKind::Vmm).unwrap();
        assert!(!vmm.allows("execve", [0; 6]), "the main thread never execs");
        assert!(!vmm.allows("socket", [libc::AF_INET as u64, 1, 0, 0, 0, 0]));
        assert!(
            !vmm.allows("ioctl", [5, TUNSETIFF, 0, 0, 0, 0]),
            "no new TAP"
        );
        assert!(!vmm.allows("clone", [libc::CLONE_NEWUSER as u64, 0, 0, 0, 0, 0]));
        assert!(!vmm.allows("ioctl", [0, 0x5412, 0, 0, 0, 0]), "no TIOCSTI");
    }

    /// Runs `child` in a fresh copy of this test binary and returns its output.
    fn in_child(test: &str, env: &str) -> std::process::Output {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .env(env, "1")
            .output()
            .unwrap()
    }

    /// A vCPU thread with its filter that makes a forbidden call (opening a file) is stopped
    /// with SIGSYS; the VMM reports which thread and which call, and exits with
    /// EXIT_SECCOMP.
    #[test]
    fn forbidden_call_from_a_vcpu_thread_kills_and_is_reported() {
        const ENV: &str = "VIREO_SECCOMP_CHILD";
        if std::env::var_os(ENV).is_some() {
            enable().unwrap();
            apply(ThreadKind::Vmm).unwrap();
            let t = std::thread::Builder::new()
                .name("vcpu0".into())
                .spawn(|| {
                    apply(ThreadKind::Vcpu).unwrap();
                    // Allowed: a write.
                    let ok = b"vcpu write ok\n";
                    // SAFETY: writing a valid buffer to stderr.
                    unsafe { libc::write(2, ok.as_ptr().cast(), ok.len()) };
                    // Forbidden: opening a file.
                    let _ = std::fs::File::open("/etc/hostname");
                    // Not reached.
                    // SAFETY: as above.
                    unsafe { libc::write(2, b"survived\n".as_ptr().cast(), 9) };
                })
                .unwrap();
            let _ = t.join();
            std::process::exit(0);
        }
        let out = in_child(
            "seccomp::tests::forbidden_call_from_a_vcpu_thread_kills_and_is_reported",
            ENV,
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(EXIT_SECCOMP), "{err}");
        assert!(err.contains("vcpu write ok"), "{err}");
        assert!(!err.contains("survived"), "{err}");
        assert!(
            err.contains("thread `vcpu0` (vcpu filter) made a forbidden system call: openat"),
            "{err}"
        );
    }

    /// The name of a thread of `kind` in the per-kind test: virtio-net and vsock threads
    /// are named as vireo-virtio names them, since the name picks their filter.
    fn test_thread_name(kind: ThreadKind) -> String {
        match kind {
            ThreadKind::Net => "virtio-net0-0".into(),
            ThreadKind::Vsock => "virtio-vsock".into(),
            k => format!("{}-thread", k.name()),
        }
    }

    /// Device, net, vsock, console and API threads are killed and reported the same way:
    /// each in a child, a thread named like the real one installs its kind's filter (device
    /// threads the one their name picks, as the worker start hook does) and opens an IP
    /// socket.
    #[test]
    fn forbidden_calls_from_device_console_and_api_threads_are_reported() {
        const ENV: &str = "VIREO_SECCOMP_CHILD_KIND";
        if let Ok(kind) = std::env::var(ENV) {
            let kind = ThreadKind::ALL
                .into_iter()
                .find(|k| k.name() == kind)
                .unwrap();
            enable().unwrap();
            std::thread::Builder::new()
                .name(test_thread_name(kind))
                .spawn(move || {
                    let kind = match kind {
                        ThreadKind::Net | ThreadKind::Vsock => {
                            ThreadKind::of_device_thread(std::thread::current().name())
                        }
                        k => k,
                    };
                    apply(kind).unwrap();
                    // SAFETY: socket(2) with constant arguments (refused by the filter).
                    unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
                    // SAFETY: writing a valid buffer to stderr.
                    unsafe { libc::write(2, b"survived\n".as_ptr().cast(), 9) };
                })
                .unwrap()
                .join()
                .unwrap();
            std::process::exit(0);
        }
        for kind in [
            ThreadKind::Device,
            ThreadKind::Net,
            ThreadKind::Vsock,
            ThreadKind::Console,
            ThreadKind::Api,
        ] {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "seccomp::tests::forbidden_calls_from_device_console_and_api_threads_are_reported",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(ENV, kind.name())
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(EXIT_SECCOMP),
                "{}: {err}",
                kind.name()
            );
            assert!(!err.contains("survived"), "{err}");
            let want = format!(
                "thread `{}` ({} filter) made a forbidden system call: socket",
                test_thread_name(kind),
                kind.name()
            );
            assert!(err.contains(&want), "{err}");
        }
    }

    /// The vCPU filter refuses a terminal ioctl even though ioctl itself is allowed.
    #[test]
    fn terminal_ioctl_from_a_vcpu_thread_is_refused() {
        const ENV: &str = "VIREO_SECCOMP_CHILD_IOCTL";
        if std::env::var_os(ENV).is_some() {
            enable().unwrap();
            std::thread::Builder::new()
                .name("vcpu1".into())
                .spawn(|| {
                    apply(ThreadKind::Vcpu).unwrap();
                    let c = b'x';
                    // SAFETY: TIOCSTI with a pointer to one byte (refused by the filter).
                    unsafe { libc::ioctl(0, libc::TIOCSTI, &c) };
                })
                .unwrap()
                .join()
                .unwrap();
            std::process::exit(0);
        }
        let out = in_child(
            "seccomp::tests::terminal_ioctl_from_a_vcpu_thread_is_refused",
            ENV,
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(EXIT_SECCOMP), "{err}");
        assert!(err.contains("ioctl (16), arguments 0x0, 0x5412"), "{err}");
    }

    #[test]
    fn apply_without_enable_does_nothing() {
        // This test process never called enable() on this thread's behalf... but another
        // test may have; only check the disabled path in a child.
        const ENV: &str = "VIREO_SECCOMP_CHILD_OFF";
        if std::env::var_os(ENV).is_some() {
            apply(ThreadKind::Vcpu).unwrap();
            assert!(!enabled());
            assert!(std::fs::File::open("/proc/self/status").is_ok());
            std::process::exit(0);
        }
        let out = in_child("seccomp::tests::apply_without_enable_does_nothing", ENV);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
