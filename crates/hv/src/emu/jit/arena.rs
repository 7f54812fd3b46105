//! Executable memory for translated blocks: one `memfd` mapped twice, writable at one address
//! and executable at another, so no page is ever writable and executable at once (W^X). Both
//! mappings are made when the vCPU is created, before its thread installs a seccomp filter
//! that refuses `PROT_EXEC`.

use std::io;

/// A code arena: `size` bytes, written through `rw` and run from `rx`.
pub struct Arena {
    rw: *mut u8,
    rx: *const u8,
    size: usize,
    used: usize,
}

// SAFETY: the arena is owned by one vCPU's block cache; the raw pointers are only used by the
// thread that owns it (a `&mut` borrow for writes, the block loop for calls).
unsafe impl Send for Arena {}

impl Arena {
    /// Map a new arena of `size` bytes.
    pub fn new(size: usize) -> io::Result<Arena> {
        // SAFETY: plain system calls on a name we own; every result is checked.
        unsafe {
            let fd = libc::memfd_create(c"vireo-jit".as_ptr(), libc::MFD_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let close = |e: io::Error| {
                libc::close(fd);
                Err(e)
            };
            if libc::ftruncate(fd, size as libc::off_t) != 0 {
                return close(io::Error::last_os_error());
            }
            let rw = libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            );
            if rw == libc::MAP_FAILED {
                return close(io::Error::last_os_error());
            }
            let rx = libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_SHARED,
                fd,
                0,
            );
            if rx == libc::MAP_FAILED {
                let e = io::Error::last_os_error();
                libc::munmap(rw, size);
                return close(e);
            }
            libc::close(fd);
            Ok(Arena {
                rw: rw as *mut u8,
                rx: rx as *const u8,
                size,
                used: 0,
            })
        }
    }

    /// Copy `code` (position-independent) in; its executable address, or `None` when the
    /// arena is full.
    pub fn push(&mut self, code: &[u8]) -> Option<usize> {
        // 16-byte aligned starts.
        let start = self.used;
        let end = start.checked_add(code.len())?;
        if end > self.size {
            return None;
        }
        // SAFETY: `start..end` lies inside the writable mapping of `size` bytes, which nothing
        // else aliases as a Rust reference.
        unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), self.rw.add(start), code.len()) };
        self.used = (end + 15) & !15;
        Some(self.rx as usize + start)
    }

    /// Forget every block (the block cache was cleared).
    pub fn reset(&mut self) {
        self.used = 0;
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: both mappings were made by `new` with `size` bytes and are unmapped once.
        unsafe {
            libc::munmap(self.rw as *mut libc::c_void, self.size);
            libc::munmap(self.rx as *mut libc::c_void, self.size);
        }
    }
}
