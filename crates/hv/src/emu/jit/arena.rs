//! Executable memory for translated blocks: one `memfd` mapped twice, writable at one address
//! and executable at another, so no page is ever writable and executable at once (W^X). The
//! mappings are made when the backend is created, before the VMM installs seccomp filters
//! that refuse `memfd_create` and `PROT_EXEC`; each vCPU then takes a slice ([`Pool::take`]).
//! Pages of the `memfd` are allocated only when code is written to them.

use std::io;
use std::sync::{Arc, Mutex};

/// The two views of the code memory.
struct Mapping {
    rw: *mut u8,
    rx: *const u8,
    size: usize,
}

// SAFETY: the pointers are addresses of mappings that live as long as the `Mapping`; each
// vCPU writes only its own slice of them.
unsafe impl Send for Mapping {}
// SAFETY: as above; `Pool::take` hands out disjoint slices.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: both mappings were made by `Pool::new` with `size` bytes; the last `Arc`
        // (no arena uses them any more) unmaps them once.
        unsafe {
            libc::munmap(self.rw as *mut libc::c_void, self.size);
            libc::munmap(self.rx as *mut libc::c_void, self.size);
        }
    }
}

/// Code memory for the vCPUs of a process, in equal slices.
pub struct Pool {
    map: Mapping,
    slice: usize,
    /// Starts of the slices no arena holds.
    free: Mutex<Vec<usize>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pool({} bytes)", self.map.size)
    }
}

impl Pool {
    /// Map `slices` slices of `slice` bytes of code memory.
    pub fn new(slice: usize, slices: usize) -> io::Result<Pool> {
        let size = slice * slices;
        // SAFETY: plain system calls on a descriptor we own; every result is checked and the
        // descriptor is closed on every path (the mappings keep the memory).
        unsafe {
            let fd = libc::memfd_create(c"vireo-jit".as_ptr(), libc::MFD_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let fail = |e: io::Error| {
                libc::close(fd);
                Err(e)
            };
            if libc::ftruncate(fd, size as libc::off_t) != 0 {
                return fail(io::Error::last_os_error());
            }
            let map = |prot| libc::mmap(std::ptr::null_mut(), size, prot, libc::MAP_SHARED, fd, 0);
            let rw = map(libc::PROT_READ | libc::PROT_WRITE);
            if rw == libc::MAP_FAILED {
                return fail(io::Error::last_os_error());
            }
            let rx = map(libc::PROT_READ | libc::PROT_EXEC);
            if rx == libc::MAP_FAILED {
                let e = io::Error::last_os_error();
                libc::munmap(rw, size);
                return fail(e);
            }
            libc::close(fd);
            Ok(Pool {
                map: Mapping {
                    rw: rw as *mut u8,
                    rx: rx as *const u8,
                    size,
                },
                slice,
                free: Mutex::new((0..slices).rev().map(|i| i * slice).collect()),
            })
        }
    }

    /// A slice for one vCPU (given back when the arena is dropped), or `None` when every
    /// slice is taken.
    pub fn take(self: &Arc<Pool>) -> Option<Arena> {
        let start = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop()?;
        Some(Arena {
            pool: self.clone(),
            start,
            size: self.slice,
            used: 0,
        })
    }
}

/// One vCPU's code memory: `size` bytes of the pool from `start`.
pub struct Arena {
    pool: Arc<Pool>,
    start: usize,
    size: usize,
    used: usize,
}

impl Drop for Arena {
    fn drop(&mut self) {
        let mut free = self.pool.free.lock().unwrap_or_else(|e| e.into_inner());
        free.push(self.start);
    }
}

impl Arena {
    /// Copy `code` (position-independent) in; its executable address, or `None` when the
    /// arena is full.
    pub fn push(&mut self, code: &[u8]) -> Option<usize> {
        let at = self.used;
        let end = at.checked_add(code.len())?;
        if end > self.size {
            return None;
        }
        // SAFETY: `start + at .. start + end` lies inside this arena's slice of the writable
        // mapping, which no other arena and no Rust reference covers.
        unsafe {
            let dst = self.pool.map.rw.add(self.start + at);
            std::ptr::copy_nonoverlapping(code.as_ptr(), dst, code.len());
        }
        // 16-byte aligned starts.
        self.used = (end + 15) & !15;
        Some(self.pool.map.rx as usize + self.start + at)
    }

    /// Forget every block (the block cache was cleared).
    pub fn reset(&mut self) {
        self.used = 0;
    }
}
