//! Tables the emulator reads on every block or memory access (the jump cache, exit memos, the
//! software TLB), each on its own 2 MiB-aligned anonymous mapping advised `MADV_HUGEPAGE`.
//!
//! They are 0.2-1 MiB each and read at random: on 4 KiB pages every such read can miss the
//! host's TLB, which costs most under nested paging (a VMM in a VM). On a 2 MiB page a table
//! needs one host TLB entry. (A heap allocation of this size is an `mmap` of its own, never
//! 2 MiB-aligned, so the heap cannot give this.) Where THP is off the mapping keeps 4 KiB
//! pages and nothing else changes.

use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Huge-page size the mappings are aligned to.
const HUGE: usize = 2 << 20;

/// A slice of `len` `T`s on its own mapping (see the module doc). `T` must not need `Drop`.
pub struct HugeSlice<T> {
    ptr: NonNull<T>,
    len: usize,
    /// Bytes mapped at `ptr` (a multiple of [`HUGE`]).
    mapped: usize,
}

// SAFETY: the slice owns its elements like a `Box<[T]>` does.
unsafe impl<T: Send> Send for HugeSlice<T> {}
// SAFETY: as above; shared access only hands out `&[T]`.
unsafe impl<T: Sync> Sync for HugeSlice<T> {}

impl<T> HugeSlice<T> {
    /// `len` elements, element `i` = `init(i)`. Panics when the host cannot map the memory,
    /// as a heap allocation of the same size would abort.
    pub fn new(len: usize, mut init: impl FnMut(usize) -> T) -> HugeSlice<T> {
        const { assert!(!std::mem::needs_drop::<T>()) };
        assert!(std::mem::align_of::<T>() <= HUGE);
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .expect("table size overflows");
        let mapped = bytes.max(1).div_ceil(HUGE) * HUGE;
        // SAFETY: a new private anonymous mapping (the kernel picks the address); nothing
        // else refers to it. `mapped + HUGE` leaves room to align.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped + HUGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert!(
            raw != libc::MAP_FAILED,
            "mapping {mapped} bytes for an emulator table: {}",
            std::io::Error::last_os_error()
        );
        let start = raw as usize;
        let aligned = start.next_multiple_of(HUGE);
        let (head, tail) = (aligned - start, start + mapped + HUGE - (aligned + mapped));
        // SAFETY: both ranges are the parts of the mapping just made outside
        // [aligned, aligned + mapped), which is kept; `madvise` only changes how the kernel
        // backs the kept part.
        unsafe {
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap((aligned + mapped) as *mut libc::c_void, tail);
            }
            libc::madvise(aligned as *mut libc::c_void, mapped, libc::MADV_HUGEPAGE);
        }
        let ptr = aligned as *mut T;
        for i in 0..len {
            // SAFETY: element `i` is inside the mapping (`bytes <= mapped`), aligned (the
            // mapping is, and `size_of` is a multiple of `align_of`) and not yet initialized.
            unsafe { ptr.add(i).write(init(i)) };
        }
        HugeSlice {
            // SAFETY: `aligned` is inside a successful mapping, so not null.
            ptr: unsafe { NonNull::new_unchecked(ptr) },
            len,
            mapped,
        }
    }
}

impl<T> Deref for HugeSlice<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `len` initialized elements at `ptr`, owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T> DerefMut for HugeSlice<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T> Drop for HugeSlice<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping `new` kept; its elements need no drop (checked in `new`).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.mapped) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_slice_is_aligned_initialized_and_advised() {
        let mut s = HugeSlice::new(3 << 17, |i| i as u64);
        assert_eq!(s.len(), 3 << 17);
        assert_eq!(s.as_ptr() as usize % HUGE, 0);
        assert_eq!(s[5], 5);
        assert_eq!(s[(3 << 17) - 1], (3 << 17) - 1);
        s[7] = 70;
        // s[7] and s[70].
        assert_eq!(s.iter().filter(|&&v| v == 70).count(), 2);
        crate::assert_advised_huge(s.as_ptr() as usize);
        let empty: HugeSlice<u8> = HugeSlice::new(0, |_| 0);
        assert!(empty.is_empty());
    }
}
