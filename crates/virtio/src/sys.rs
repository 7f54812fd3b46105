//! The few system calls without a safe wrapper in std or vmm-sys-util: vectored positional
//! I/O straight between a file and guest memory, and the kernel's random number generator.

use std::io;
use std::os::unix::io::AsRawFd;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

/// Most iovecs one call takes (Linux UIO_MAXIOV).
pub const IOV_MAX: usize = 1024;

fn iovecs<B: BitmapSlice>(slices: &[VolatileSlice<'_, B>]) -> Vec<libc::iovec> {
    slices
        .iter()
        .map(|s| libc::iovec {
            iov_base: s.ptr_guard_mut().as_ptr().cast(),
            iov_len: s.len(),
        })
        .collect()
}

/// `preadv(2)` at `offset` into `slices` (at most [`IOV_MAX`]); returns bytes read.
pub fn preadv<B: BitmapSlice>(
    file: &impl AsRawFd,
    slices: &[VolatileSlice<'_, B>],
    offset: u64,
) -> io::Result<usize> {
    let iov = iovecs(&slices[..slices.len().min(IOV_MAX)]);
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: every iovec describes a VolatileSlice of guest memory, which stays mapped while
    // the slices borrow it (for this call); the kernel writes at most iov_len bytes to each.
    // Guest memory is shared with the guest, which may race on it: that only changes data the
    // guest owns, never Rust-visible state.
    let n = unsafe {
        libc::preadv(
            file.as_raw_fd(),
            iov.as_ptr(),
            iov.len() as libc::c_int,
            off,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    mark_filled(slices, n);
    Ok(n)
}

/// Marks the first `n` bytes of `slices` (guest memory the kernel has just filled, behind
/// vm-memory's back: `preadv`, `readv`) in vm-memory's bitmap of VMM writes, which live
/// migration reads as dirty pages and the emulator as device writes into code.
pub(crate) fn mark_filled<'a, B: BitmapSlice + 'a, S: std::borrow::Borrow<VolatileSlice<'a, B>>>(
    slices: impl IntoIterator<Item = S>,
    n: usize,
) {
    let mut left = n;
    for s in slices {
        let s = s.borrow();
        if left == 0 {
            break;
        }
        let done = left.min(s.len());
        s.bitmap().mark_dirty(0, done);
        left -= done;
    }
}

/// [`mark_filled`] for guest ranges (address, length) of `mem`.
pub(crate) fn mark_filled_ranges(
    mem: &vireo_hv::GuestMemory,
    ranges: &[(vm_memory::GuestAddress, usize)],
    n: usize,
) {
    use vm_memory::GuestMemoryBackend as _;
    mark_filled(
        ranges
            .iter()
            .map_while(|&(addr, len)| mem.get_slice(addr, len).ok()),
        n,
    );
}

/// `pwritev(2)` at `offset` from `slices` (at most [`IOV_MAX`]); returns bytes written.
pub fn pwritev<B: BitmapSlice>(
    file: &impl AsRawFd,
    slices: &[VolatileSlice<'_, B>],
    offset: u64,
) -> io::Result<usize> {
    let iov = iovecs(&slices[..slices.len().min(IOV_MAX)]);
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: as in `preadv`; the kernel only reads the guest memory the iovecs describe.
    let n = unsafe {
        libc::pwritev(
            file.as_raw_fd(),
            iov.as_ptr(),
            iov.len() as libc::c_int,
            off,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Fill `buf` from the kernel's random number generator (`getrandom(2)`, the urandom pool).
pub fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes for the call.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _};

    #[test]
    fn vectored_io_between_a_file_and_guest_memory() {
        let mem = vireo_hv::GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let dir = std::env::temp_dir().join(format!("vireo-sys-{}", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&dir)
            .unwrap();
        f.write_all(&(0..=255u8).cycle().take(4096).collect::<Vec<_>>())
            .unwrap();
        let a = mem.get_slice(GuestAddress(0x1000), 10).unwrap();
        let b = mem.get_slice(GuestAddress(0x3000), 6).unwrap();
        assert_eq!(preadv(&f, &[a, b], 100).unwrap(), 16);
        let mut got = [0u8; 16];
        mem.read_slice(&mut got[..10], GuestAddress(0x1000))
            .unwrap();
        mem.read_slice(&mut got[10..], GuestAddress(0x3000))
            .unwrap();
        assert_eq!(got.to_vec(), (100..116).collect::<Vec<u8>>());
        mem.write_slice(&[9; 4], GuestAddress(0x2000)).unwrap();
        let c = mem.get_slice(GuestAddress(0x2000), 4).unwrap();
        assert_eq!(pwritev(&f, &[c], 0).unwrap(), 4);
        let mut first = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut first, 0).unwrap();
        assert_eq!(first, [9; 4]);
        // Past the end of the file: a short read.
        let d = mem.get_slice(GuestAddress(0x4000), 100).unwrap();
        assert_eq!(preadv(&f, &[d], 4090).unwrap(), 6);
        assert!(preadv::<()>(&f, &[], u64::MAX).is_err());
        std::fs::remove_file(&dir).unwrap();
    }

    #[test]
    fn getrandom_fills_buffers() {
        let mut a = [0u8; 64];
        let mut b = [0u8; 64];
        getrandom(&mut a).unwrap();
        getrandom(&mut b).unwrap();
        assert_ne!(a, b);
        assert_ne!(a, [0u8; 64]);
        getrandom(&mut []).unwrap();
    }
}
