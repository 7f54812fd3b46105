//! Thin wrappers over the system calls the jail needs and `libc` (or `std`) offers no safe form
//! of. Every wrapper only passes its arguments through, and none allocates: they are also used
//! in a freshly cloned child, where only async-signal-safe work is allowed (see `spawn`).

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `-1` → the thread's `errno` as an [`io::Error`].
fn check(rc: libc::c_long) -> io::Result<libc::c_long> {
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn check_int(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn ptr_or_null(s: Option<&CStr>) -> *const libc::c_char {
    s.map_or(std::ptr::null(), CStr::as_ptr)
}

/// `clone(2)` with fork semantics (no new stack, `SIGCHLD` on exit): returns 0 in the child and
/// the child's PID in the parent.
///
/// # Safety
/// As with `fork(2)`: in a multi-threaded process the child may only do async-signal-safe
/// work (no allocation, no locks) until it calls `execve` or `_exit`.
pub unsafe fn clone_fork(flags: libc::c_int) -> io::Result<libc::pid_t> {
    // SAFETY: a NULL stack makes the child run on a copy-on-write copy of the caller's stack,
    // like fork(2); no parent/child TID pointers or TLS are passed. The caller upholds the
    // async-signal-safety contract in the child.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    check(rc).map(|pid| pid as libc::pid_t)
}

/// `struct clone_args` (linux/sched.h), `CLONE_ARGS_SIZE_VER2`.
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// `CLONE_INTO_CGROUP` (Linux 5.7).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `clone3(2)` with fork semantics, the child starting in the cgroup v2 directory
/// `cgroup_fd` (`CLONE_INTO_CGROUP`: no migration afterwards, which on cgroup v1/v2 costs an
/// RCU grace period). Returns 0 in the child, its PID in the parent.
///
/// # Safety
/// As [`clone_fork`].
pub unsafe fn clone3_into_cgroup(flags: libc::c_int, cgroup_fd: RawFd) -> io::Result<libc::pid_t> {
    let args = CloneArgs {
        flags: flags as u32 as u64 | CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup_fd as u64,
        ..Default::default()
    };
    // SAFETY: `args` is a valid clone_args of the size passed; stack 0 makes the child run
    // on a copy of the caller's stack, like fork(2). The caller upholds the child's
    // async-signal-safety contract.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    check(rc).map(|pid| pid as libc::pid_t)
}

/// An anonymous stack for a child that shares its parent's memory ([`clone3_vfork`]), with
/// a `PROT_NONE` guard page below it. Unmapped when dropped.
pub struct ChildStack {
    map: *mut libc::c_void,
    map_len: usize,
    guard: usize,
}

impl ChildStack {
    /// Maps `size` bytes (rounded up to pages) plus the guard page. Pages are only backed
    /// once the child touches them.
    pub fn new(size: usize) -> io::Result<ChildStack> {
        // SAFETY: sysconf has no memory-safety requirements.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .ok()
            .filter(|p| p.is_power_of_two())
            .unwrap_or(4096);
        let size = size.div_ceil(page).max(1) * page;
        let map_len = size + page;
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let stack = ChildStack {
            map,
            map_len,
            guard: page,
        };
        // SAFETY: the first page of the mapping made above.
        check_int(unsafe { libc::mprotect(map, page, libc::PROT_NONE) })?;
        Ok(stack)
    }

    /// Lowest usable address and size (`clone_args.stack`, `clone_args.stack_size`).
    fn region(&self) -> (u64, u64) {
        (
            self.map as u64 + self.guard as u64,
            (self.map_len - self.guard) as u64,
        )
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once; the child that used it has
        // executed another program or exited (its parent was suspended until then).
        unsafe { libc::munmap(self.map, self.map_len) };
    }
}

/// `clone3(2)` with `CLONE_VM | CLONE_VFORK`, as `posix_spawn` does: the child runs
/// `child(arg)` on `stack`, in the caller's address space, while the calling thread is
/// suspended until the child calls `execve` or exits. The kernel neither copies the page
/// tables nor write-protects the caller's memory (no copy-on-write faults on either side),
/// and the caller wakes up exactly once, when the child is gone from its memory. With
/// `cgroup_fd`, the child starts in that cgroup v2 directory (`CLONE_INTO_CGROUP`). Returns
/// the child's PID.
///
/// # Safety
/// `child` runs in the caller's memory on `stack`: it must not allocate, take locks, return
/// or write anything but its own stack (other threads of the caller keep running), and must
/// end in `execve` or `_exit`. `arg` must stay valid until this returns, which it does.
pub unsafe fn clone3_vfork(
    flags: libc::c_int,
    cgroup_fd: Option<RawFd>,
    stack: &ChildStack,
    child: extern "C" fn(*mut libc::c_void) -> !,
    arg: *mut libc::c_void,
) -> io::Result<libc::pid_t> {
    let (stack_lo, stack_size) = stack.region();
    let mut f = flags as u32 as u64 | libc::CLONE_VM as u64 | libc::CLONE_VFORK as u64;
    if cgroup_fd.is_some() {
        f |= CLONE_INTO_CGROUP;
    }
    let args = CloneArgs {
        flags: f,
        exit_signal: libc::SIGCHLD as u64,
        stack: stack_lo,
        stack_size,
        cgroup: cgroup_fd.map_or(0, |fd| fd as u64),
        ..Default::default()
    };
    let ret: i64;
    // SAFETY: `args` is a valid clone_args of the size passed. In the parent the system call
    // returns the PID (or -errno) and execution continues after the block. The child starts
    // after `syscall` with rax = 0 and its stack pointer at the (page-aligned, so 16-byte
    // aligned) top of `stack`, where nothing of the parent lives; it calls `child(arg)`,
    // which never returns (`ud2` guards that). r12/r13 are preserved by the kernel in both.
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "mov rdi, r12",
            "call r13",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone3 => ret,
            in("rdi") &args as *const CloneArgs,
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") arg,
            in("r13") child,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    if ret < 0 {
        Err(io::Error::from_raw_os_error((-ret) as i32))
    } else {
        Ok(ret as libc::pid_t)
    }
}

/// `setpgid(0, 0)`: a process group of its own, in the same session.
pub fn setpgid_self() -> io::Result<()> {
    // SAFETY: integer arguments only.
    check_int(unsafe { libc::setpgid(0, 0) }).map(drop)
}

/// `mount(2)`.
pub fn mount(
    source: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> io::Result<()> {
    // SAFETY: every pointer is NULL or a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            ptr_or_null(source),
            target.as_ptr(),
            ptr_or_null(fstype),
            flags,
            ptr_or_null(data).cast(),
        )
    };
    check_int(rc).map(drop)
}

/// `umount2(2)`.
pub fn umount2(target: &CStr, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: `target` is a NUL-terminated string.
    check_int(unsafe { libc::umount2(target.as_ptr(), flags) }).map(drop)
}

/// `pivot_root(2)`.
pub fn pivot_root(new_root: &CStr, put_old: &CStr) -> io::Result<()> {
    // SAFETY: both arguments are NUL-terminated strings.
    let rc = unsafe { libc::syscall(libc::SYS_pivot_root, new_root.as_ptr(), put_old.as_ptr()) };
    check(rc).map(drop)
}

/// `unshare(2)`.
pub fn unshare(flags: libc::c_int) -> io::Result<()> {
    // SAFETY: unshare only takes flags.
    check_int(unsafe { libc::unshare(flags) }).map(drop)
}

/// `setsid(2)`: a new session without a controlling terminal.
pub fn setsid() -> io::Result<()> {
    // SAFETY: no arguments.
    check_int(unsafe { libc::setsid() }).map(drop)
}

/// `sethostname(2)`.
pub fn sethostname(name: &[u8]) -> io::Result<()> {
    // SAFETY: pointer and length describe `name`.
    check_int(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) }).map(drop)
}

/// `setdomainname(2)`.
pub fn setdomainname(name: &[u8]) -> io::Result<()> {
    // SAFETY: pointer and length describe `name`.
    check_int(unsafe { libc::setdomainname(name.as_ptr().cast(), name.len()) }).map(drop)
}

/// `setgroups(2)` for the calling thread: the raw system call, because glibc's wrapper
/// broadcasts the change to every thread it knows of, and in a cloned child it still "knows"
/// the parent's threads and waits for them forever.
pub fn setgroups(groups: &[libc::gid_t]) -> io::Result<()> {
    // SAFETY: pointer and length describe `groups`.
    check(unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) }).map(drop)
}

/// `setresgid(2)` (all three ids), the raw system call (see [`setgroups`]).
pub fn setresgid(gid: libc::gid_t) -> io::Result<()> {
    // SAFETY: plain integer arguments. The raw system call sets the calling thread only; the
    // child that calls it is single-threaded.
    check(unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) }).map(drop)
}

/// `setresuid(2)` (all three ids).
pub fn setresuid(uid: libc::uid_t) -> io::Result<()> {
    // SAFETY: as `setresgid`.
    check(unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) }).map(drop)
}

/// `prctl(2)` with integer arguments.
pub fn prctl(option: libc::c_int, a2: libc::c_ulong, a3: libc::c_ulong) -> io::Result<i32> {
    // SAFETY: only integer-argument prctl options are passed through this wrapper.
    check_int(unsafe { libc::prctl(option, a2, a3, 0 as libc::c_ulong, 0 as libc::c_ulong) })
}

/// `capget`/`capset` header (`struct __user_cap_header_struct`, linux/capability.h).
#[repr(C)]
pub struct CapHeader {
    pub version: u32,
    pub pid: libc::c_int,
}

/// One word of `struct __user_cap_data_struct`; version 3 uses two (64 capabilities).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct CapData {
    pub effective: u32,
    pub permitted: u32,
    pub inheritable: u32,
}

/// `_LINUX_CAPABILITY_VERSION_3`.
pub const CAP_VERSION_3: u32 = 0x2008_0522;

/// `capset(2)` for the calling thread.
pub fn capset(data: &[CapData; 2]) -> io::Result<()> {
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    // SAFETY: header and a two-element data array, the layout `_LINUX_CAPABILITY_VERSION_3`
    // expects; the kernel only reads them.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    check(rc).map(drop)
}

/// `capget(2)` for the calling thread.
pub fn capget() -> io::Result<[CapData; 2]> {
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: header and a two-element array the kernel fills.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    check(rc).map(|_| data)
}

/// `openat(2)` returning an owned descriptor (always `O_CLOEXEC`).
pub fn openat(
    dir: RawFd,
    path: &CStr,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    // SAFETY: `path` is NUL-terminated; the mode is only read with O_CREAT.
    let fd = check_int(unsafe {
        libc::openat(
            dir,
            path.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    })?;
    // SAFETY: `fd` was just returned by openat and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `mkdirat(2)`.
pub fn mkdirat(dir: RawFd, name: &CStr, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated.
    check_int(unsafe { libc::mkdirat(dir, name.as_ptr(), mode) }).map(drop)
}

/// `mknodat(2)`.
pub fn mknodat(dir: RawFd, name: &CStr, mode: libc::mode_t, dev: libc::dev_t) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated.
    check_int(unsafe { libc::mknodat(dir, name.as_ptr(), mode, dev) }).map(drop)
}

/// `symlinkat(2)`.
pub fn symlinkat(target: &CStr, dir: RawFd, name: &CStr) -> io::Result<()> {
    // SAFETY: both strings are NUL-terminated.
    check_int(unsafe { libc::symlinkat(target.as_ptr(), dir, name.as_ptr()) }).map(drop)
}

/// `fchownat(2)` without following a final symlink.
pub fn fchownat(dir: RawFd, name: &CStr, uid: libc::uid_t, gid: libc::gid_t) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated.
    check_int(unsafe { libc::fchownat(dir, name.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) })
        .map(drop)
}

/// `fchmodat(2)`.
pub fn fchmodat(dir: RawFd, name: &CStr, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated.
    check_int(unsafe { libc::fchmodat(dir, name.as_ptr(), mode, 0) }).map(drop)
}

/// `fstat(2)`.
pub fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: all-zero is a valid `stat`; the kernel overwrites it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable `stat`.
    check_int(unsafe { libc::fstat(fd, &mut st) }).map(|_| st)
}

/// `fstatvfs(3)` mount flags (`ST_*`) of the file system holding `fd`.
pub fn mount_flags(fd: RawFd) -> io::Result<libc::c_ulong> {
    // SAFETY: all-zero is a valid `statvfs`; the call overwrites it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable `statvfs`.
    check_int(unsafe { libc::fstatvfs(fd, &mut st) }).map(|_| st.f_flag)
}

/// `fchdir(2)`.
pub fn fchdir(fd: RawFd) -> io::Result<()> {
    // SAFETY: integer argument only.
    check_int(unsafe { libc::fchdir(fd) }).map(drop)
}

/// `chdir(2)`.
pub fn chdir(path: &CStr) -> io::Result<()> {
    // SAFETY: `path` is NUL-terminated.
    check_int(unsafe { libc::chdir(path.as_ptr()) }).map(drop)
}

/// `close_range(2)`: mark (`CLOSE_RANGE_CLOEXEC`) or close descriptors `first..=last`.
pub fn close_range(first: u32, last: u32, flags: u32) -> io::Result<()> {
    // SAFETY: integer arguments only; no descriptor owned by Rust code is in the range the
    // callers pass without CLOSE_RANGE_CLOEXEC.
    check(unsafe { libc::syscall(libc::SYS_close_range, first, last, flags) }).map(drop)
}

/// `dup2(2)` (the copy does not close on exec).
pub fn dup2(from: RawFd, to: RawFd) -> io::Result<()> {
    if from == to {
        // dup2 would keep FD_CLOEXEC; clear it so the descriptor survives exec.
        // SAFETY: fcntl on an integer descriptor.
        return check_int(unsafe { libc::fcntl(from, libc::F_SETFD, 0) }).map(drop);
    }
    // SAFETY: integer arguments only.
    check_int(unsafe { libc::dup2(from, to) }).map(drop)
}

/// `pipe2(2)` with `O_CLOEXEC`: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors.
    check_int(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `read(2)` retrying on `EINTR`.
pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: pointer and length describe `buf`, which is writable.
        let rc = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if rc >= 0 {
            return Ok(rc as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `write(2)` of the whole buffer, retrying on `EINTR` and short writes.
pub fn write_all(fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: pointer and length describe `buf`.
        let rc = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if rc == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf = &buf[rc as usize..];
    }
    Ok(())
}

/// `close(2)` of a descriptor no Rust object owns (errors ignored: nothing to do about them).
pub fn close(fd: RawFd) {
    // SAFETY: the caller passes a descriptor it owns in raw form only.
    unsafe { libc::close(fd) };
}

/// `_exit(2)`: leave without running destructors or `atexit` handlers.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and touches no Rust state.
    unsafe { libc::_exit(code) }
}

/// `kill(2)`.
pub fn kill(pid: libc::pid_t, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: integer arguments only.
    check_int(unsafe { libc::kill(pid, sig) }).map(drop)
}

/// `waitpid(2)` retrying on `EINTR`; `None` with `WNOHANG` when the child still runs.
pub fn waitpid(pid: libc::pid_t, flags: libc::c_int) -> io::Result<Option<libc::c_int>> {
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid, writable int.
        let rc = unsafe { libc::waitpid(pid, &mut status, flags) };
        match rc {
            0 => return Ok(None),
            r if r > 0 => return Ok(Some(status)),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// Set every catchable signal's disposition back to the default and unblock all signals, as
/// a freshly exec'd program expects (ignored signals stay ignored across `execve`).
pub fn reset_signals() {
    for sig in 1..libc::SIGRTMAX() {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: resetting a disposition to SIG_DFL has no memory-safety requirements; errors
        // (for numbers the C library reserves) are ignored.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
        }
    }
    set_signal_mask(&[], libc::SIG_SETMASK);
}

/// `pthread_sigmask(3)` on the calling thread with the given signals.
pub fn set_signal_mask(signals: &[libc::c_int], how: libc::c_int) {
    // SAFETY: `set` is initialised by sigemptyset before use; the pointers are valid.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

/// Wait up to `timeout` for one of `signals` (which the caller blocked); `None` on timeout.
pub fn sigtimedwait(signals: &[libc::c_int], timeout: std::time::Duration) -> Option<i32> {
    // SAFETY: the sigset is initialised before use; timespec and pointers are valid.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        let rc = libc::sigtimedwait(&set, std::ptr::null_mut(), &ts);
        (rc > 0).then_some(rc)
    }
}

/// `execve(2)`: only returns on failure.
pub fn execve(
    path: &CStr,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
) -> io::Error {
    // SAFETY: `argv` and `envp` are NULL-terminated arrays of pointers to NUL-terminated
    // strings (built by `spawn::Plan`), alive for the call.
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    io::Error::last_os_error()
}

/// `socket(2)` with `SOCK_CLOEXEC`.
pub fn socket(domain: libc::c_int, ty: libc::c_int, proto: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: integer arguments only.
    let fd = check_int(unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) })?;
    // SAFETY: fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The interface index of `name` in the caller's network namespace (`SIOCGIFINDEX`).
pub fn if_index(name: &[u8]) -> io::Result<i32> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    let sock = socket(libc::AF_INET, libc::SOCK_DGRAM, 0)?;
    // SAFETY: all-zero is a valid `ifreq`.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in req.ifr_name.iter_mut().zip(name) {
        *dst = src as libc::c_char;
    }
    // SAFETY: SIOCGIFINDEX reads the name and writes the index into `req`, which is valid.
    check_int(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFINDEX, &mut req) })?;
    // SAFETY: the kernel filled the `ifru_ifindex` member for this request.
    Ok(unsafe { req.ifr_ifru.ifru_ifindex })
}

/// `/proc/self/fd/<fd>` as a NUL-terminated path, written into `buf` (no allocation).
pub fn fd_path(fd: RawFd, buf: &mut [u8; 32]) -> &CStr {
    const PREFIX: &[u8] = b"/proc/self/fd/";
    buf[..PREFIX.len()].copy_from_slice(PREFIX);
    let mut digits = [0u8; 12];
    let mut n = fd.unsigned_abs();
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[PREFIX.len() + i] = digits[len - 1 - i];
    }
    buf[PREFIX.len() + len] = 0;
    // The buffer holds exactly one NUL, at the end of what was written.
    CStr::from_bytes_until_nul(&buf[..]).unwrap_or(c"/proc/self/fd/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_paths() {
        let mut buf = [0u8; 32];
        assert_eq!(fd_path(0, &mut buf).to_bytes(), b"/proc/self/fd/0");
        assert_eq!(fd_path(1234, &mut buf).to_bytes(), b"/proc/self/fd/1234");
        assert_eq!(
            fd_path(i32::MAX, &mut buf).to_bytes(),
            b"/proc/self/fd/2147483647"
        );
    }

    #[test]
    fn pipe_and_io() {
        let (r, w) = pipe().unwrap();
        write_all(w.as_raw_fd(), b"abc").unwrap();
        drop(w);
        let mut buf = [0u8; 8];
        assert_eq!(read(r.as_raw_fd(), &mut buf).unwrap(), 3);
        assert_eq!(&buf[..3], b"abc");
        assert_eq!(read(r.as_raw_fd(), &mut buf).unwrap(), 0, "EOF once closed");
    }

    #[test]
    fn loopback_index_is_one() {
        assert_eq!(if_index(b"lo").unwrap(), 1);
        assert!(if_index(b"no-such-if0").is_err());
        assert!(if_index(b"").is_err());
    }

    extern "C" fn store_and_exit(arg: *mut libc::c_void) -> ! {
        // SAFETY: the test passes a pointer to an AtomicU32 that outlives the child.
        let v = unsafe { &*(arg as *const std::sync::atomic::AtomicU32) };
        v.store(7, std::sync::atomic::Ordering::SeqCst);
        exit_now(42)
    }

    #[test]
    fn vfork_child_shares_memory_and_suspends_the_parent() {
        let stack = ChildStack::new(64 << 10).unwrap();
        let v = std::sync::atomic::AtomicU32::new(0);
        // SAFETY: the child writes only the atomic and exits.
        let pid = unsafe {
            clone3_vfork(
                0,
                None,
                &stack,
                store_and_exit,
                &v as *const _ as *mut libc::c_void,
            )
        }
        .unwrap();
        // CLONE_VFORK: the child has exited by now; CLONE_VM: its write is visible here.
        assert_eq!(v.load(std::sync::atomic::Ordering::SeqCst), 7);
        let status = waitpid(pid, 0).unwrap().unwrap();
        assert!(libc::WIFEXITED(status));
        assert_eq!(libc::WEXITSTATUS(status), 42);
    }

    #[test]
    fn child_stack_has_a_guard_page() {
        let s = ChildStack::new(10_000).unwrap();
        let (lo, size) = s.region();
        assert_eq!(lo % 4096, 0);
        assert_eq!(size, 12288, "rounded up to pages");
        assert_eq!(lo - s.map as u64, s.guard as u64);
    }

    #[test]
    fn capget_reads_something() {
        let caps = capget().unwrap();
        // Whatever runs the tests, the permitted set contains the effective one.
        for w in caps {
            assert_eq!(w.effective & !w.permitted, 0);
        }
    }
}
