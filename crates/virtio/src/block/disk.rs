//! The host side of a virtio block device: a raw image file or a block device, opened once
//! per VMM (it outlives guest reboots) and locked so that two VMMs cannot both write it.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use vm_memory::{GuestAddress, GuestMemoryBackend as _, VolatileSlice};
use vmm_sys_util::fallocate::{fallocate, FallocateMode};

use crate::sys;
use crate::{Error, Result};
use vireo_hv::GuestMemory;

/// Bytes in a virtio-blk sector (§5.2.6: sector numbers are in 512-byte units).
pub const SECTOR_SIZE: u64 = 512;
/// Bytes of a virtio-blk device ID (§5.2.6, VIRTIO_BLK_T_GET_ID).
pub const SERIAL_LEN: usize = 20;
/// Largest buffer the O_DIRECT bounce path allocates.
const BOUNCE_CHUNK: usize = 1 << 20;
/// Alignment of buffers, offsets and lengths for `direct=on` (O_DIRECT), and the block size
/// the device then advertises.
pub const DIRECT_ALIGN: u64 = 4096;

/// How to open a disk (`--disk path=FILE[,readonly=on][,serial=STR][,direct=on]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskOptions {
    pub path: PathBuf,
    pub readonly: bool,
    /// Up to 20 bytes, reported by VIRTIO_BLK_T_GET_ID (Linux: /sys/block/vdX/serial).
    pub serial: Option<String>,
    /// Bypass the host page cache (O_DIRECT).
    pub direct: bool,
}

impl DiskOptions {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DiskOptions {
            path: path.into(),
            readonly: false,
            serial: None,
            direct: false,
        }
    }
}

/// An open, locked disk image.
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    path: PathBuf,
    size: u64,
    readonly: bool,
    direct: bool,
    serial: [u8; SERIAL_LEN],
}

impl DiskImage {
    /// Open and lock the image: exclusively when read-write, shared when read-only, so a file
    /// another VMM writes cannot be opened, and a file others read cannot be written.
    pub fn open(opts: &DiskOptions) -> Result<DiskImage> {
        let serial = match &opts.serial {
            Some(s) if s.len() > SERIAL_LEN => {
                return Err(Error::Disk(format!(
                    "disk serial '{s}' is {} bytes; at most {SERIAL_LEN} fit",
                    s.len()
                )))
            }
            Some(s) => {
                let mut b = [0u8; SERIAL_LEN];
                b[..s.len()].copy_from_slice(s.as_bytes());
                b
            }
            None => [0u8; SERIAL_LEN],
        };
        let path = &opts.path;
        let mut flags = libc::O_CLOEXEC;
        if opts.direct {
            flags |= libc::O_DIRECT;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(!opts.readonly)
            .custom_flags(flags)
            .open(path)
            .map_err(|e| Error::Disk(format!("cannot open disk {}: {e}", path.display())))?;
        let locked = if opts.readonly {
            file.try_lock_shared()
        } else {
            file.try_lock()
        };
        match locked {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(Error::Disk(format!(
                    "disk {} is in use by another process ({}); \
                     stop it, or use readonly=on if every user only reads it",
                    path.display(),
                    if opts.readonly {
                        "it is open read-write"
                    } else {
                        "it is open"
                    }
                )))
            }
            Err(TryLockError::Error(e)) => {
                return Err(Error::Disk(format!(
                    "cannot lock disk {}: {e}",
                    path.display()
                )))
            }
        }
        let meta = file
            .metadata()
            .map_err(|e| Error::Disk(format!("disk {}: {e}", path.display())))?;
        let ft = meta.file_type();
        let size = if ft.is_block_device() {
            file.seek(SeekFrom::End(0))
                .map_err(|e| Error::Disk(format!("disk {}: size: {e}", path.display())))?
        } else if ft.is_file() {
            meta.len()
        } else {
            return Err(Error::Disk(format!(
                "disk {} is neither a regular file nor a block device",
                path.display()
            )));
        };
        if size % SECTOR_SIZE != 0 {
            tracing::warn!(
                "disk {}: size {size} is not a multiple of {SECTOR_SIZE}; the last {} bytes are not visible",
                path.display(),
                size % SECTOR_SIZE
            );
        }
        Ok(DiskImage {
            file,
            path: path.clone(),
            size: size - size % SECTOR_SIZE,
            readonly: opts.readonly,
            direct: opts.direct,
            serial,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Release the image's lock (live migration: the destination opens the same shared file
    /// while this process still holds it open). [`DiskImage::relock`] takes it back.
    pub fn unlock(&self) -> std::io::Result<()> {
        self.file.unlock()
    }

    /// Take the lock again after [`DiskImage::unlock`] (shared when read-only); fails when
    /// another process took it meanwhile.
    pub fn relock(&self) -> std::io::Result<()> {
        let r = if self.readonly {
            self.file.try_lock_shared()
        } else {
            self.file.try_lock()
        };
        r.map_err(|e| match e {
            TryLockError::WouldBlock => std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                format!("disk {} is locked by another process", self.path.display()),
            ),
            TryLockError::Error(e) => e,
        })
    }

    /// The open file (for asynchronous I/O on it).
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Usable size in bytes (whole sectors).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    pub fn direct(&self) -> bool {
        self.direct
    }

    /// The logical block size the device advertises.
    pub fn block_size(&self) -> u32 {
        if self.direct {
            DIRECT_ALIGN as u32
        } else {
            SECTOR_SIZE as u32
        }
    }

    pub fn serial(&self) -> &[u8; SERIAL_LEN] {
        &self.serial
    }

    /// True when `[offset, offset + len)` lies inside the disk.
    pub fn in_bounds(&self, offset: u64, len: u64) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.size)
    }

    /// Read the disk from `offset` into the guest ranges `ranges` (in order).
    pub fn read_into(
        &self,
        mem: &GuestMemory,
        ranges: &[(GuestAddress, usize)],
        offset: u64,
    ) -> std::io::Result<()> {
        self.transfer(mem, ranges, offset, false)
    }

    /// Write the guest ranges `ranges` (in order) to the disk at `offset`.
    pub fn write_from(
        &self,
        mem: &GuestMemory,
        ranges: &[(GuestAddress, usize)],
        offset: u64,
    ) -> std::io::Result<()> {
        if self.readonly {
            return Err(std::io::Error::from_raw_os_error(libc::EROFS));
        }
        self.transfer(mem, ranges, offset, true)
    }

    fn transfer(
        &self,
        mem: &GuestMemory,
        ranges: &[(GuestAddress, usize)],
        offset: u64,
        write: bool,
    ) -> std::io::Result<()> {
        let bad = || std::io::Error::from_raw_os_error(libc::EFAULT);
        let mut slices: Vec<VolatileSlice<'_, _>> = Vec::with_capacity(ranges.len());
        for &(addr, len) in ranges {
            for s in mem.get_slices(addr, len) {
                slices.push(s.map_err(|_| bad())?);
            }
        }
        let total: u64 = slices.iter().map(|s| s.len() as u64).sum();
        if !self.in_bounds(offset, total) {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        if self.direct && !direct_aligned(&slices, offset) {
            return self.bounce(mem, ranges, offset, total, write);
        }
        // Vectored I/O, resumed after a short transfer.
        let mut done = 0u64;
        let mut first = 0usize;
        let mut skip = 0usize;
        while done < total {
            let mut batch: Vec<VolatileSlice<'_, _>> = Vec::new();
            for (i, s) in slices[first..].iter().enumerate().take(sys::IOV_MAX) {
                batch.push(if i == 0 {
                    s.offset(skip).map_err(|_| bad())?
                } else {
                    *s
                });
            }
            let n = if write {
                sys::pwritev(&self.file, &batch, offset + done)?
            } else {
                sys::preadv(&self.file, &batch, offset + done)?
            };
            if n == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
            }
            done += n as u64;
            // Advance (first, skip) by n bytes.
            let mut n = n;
            while n > 0 && first < slices.len() {
                let room = slices[first].len() - skip;
                if n >= room {
                    n -= room;
                    first += 1;
                    skip = 0;
                } else {
                    skip += n;
                    n = 0;
                }
            }
        }
        Ok(())
    }

    /// O_DIRECT with guest buffers that are not aligned: go through an aligned host buffer.
    fn bounce(
        &self,
        mem: &GuestMemory,
        ranges: &[(GuestAddress, usize)],
        offset: u64,
        total: u64,
        write: bool,
    ) -> std::io::Result<()> {
        // A bounded buffer, whatever the request's size: a guest must not make the VMM
        // allocate as much as the disk.
        let chunk_max = (BOUNCE_CHUNK as u64).min(total) as usize;
        let align = DIRECT_ALIGN as usize;
        let mut raw = vec![0u8; chunk_max + align];
        let start = raw.as_ptr().align_offset(align).min(align);
        let buf = &mut raw[start..start + chunk_max];
        let fault = |_| std::io::Error::from_raw_os_error(libc::EFAULT);
        // A cursor over the guest ranges: (range index, bytes of it already done).
        let (mut range, mut within) = (0usize, 0usize);
        let mut done = 0u64;
        while done < total {
            let n = (total - done).min(chunk_max as u64) as usize;
            let chunk = &mut buf[..n];
            if !write {
                self.file.read_exact_at(chunk, offset + done)?;
            }
            let mut at = 0;
            while at < n {
                let Some(&(addr, len)) = ranges.get(range) else {
                    return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
                };
                let step = (len - within).min(n - at);
                let guest = GuestAddress(addr.0.wrapping_add(within as u64));
                if write {
                    vm_memory::Bytes::read_slice(mem, &mut chunk[at..at + step], guest)
                        .map_err(fault)?;
                } else {
                    vm_memory::Bytes::write_slice(mem, &chunk[at..at + step], guest)
                        .map_err(fault)?;
                }
                at += step;
                within += step;
                if within == len {
                    range += 1;
                    within = 0;
                }
            }
            if write {
                self.file.write_all_at(chunk, offset + done)?;
            }
            done += n as u64;
        }
        Ok(())
    }

    /// Make everything written so far durable (fdatasync: data and the metadata needed to
    /// read it back).
    pub fn flush(&self) -> std::io::Result<()> {
        if self.readonly {
            return Ok(());
        }
        self.file.sync_data()
    }

    /// Let the host deallocate `[offset, offset + len)` (discard: the contents become
    /// unspecified; here they read as zero where the file system can punch holes).
    pub fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        if self.readonly {
            return Err(std::io::Error::from_raw_os_error(libc::EROFS));
        }
        match fallocate(&self.file, FallocateMode::PunchHole, true, offset, len) {
            Ok(()) => Ok(()),
            // Discard is a hint: a host that cannot deallocate just keeps the data.
            Err(e) if e.errno() == libc::EOPNOTSUPP || e.errno() == libc::ENOTTY => Ok(()),
            Err(e) => Err(std::io::Error::from_raw_os_error(e.errno())),
        }
    }

    /// Make `[offset, offset + len)` read as zeroes; with `unmap`, deallocating it if the host
    /// can.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> std::io::Result<()> {
        if self.readonly {
            return Err(std::io::Error::from_raw_os_error(libc::EROFS));
        }
        if unmap && fallocate(&self.file, FallocateMode::PunchHole, true, offset, len).is_ok() {
            return Ok(());
        }
        if fallocate(&self.file, FallocateMode::ZeroRange, true, offset, len).is_ok() {
            return Ok(());
        }
        // Neither: write zeroes, a bounded buffer at a time (aligned for O_DIRECT).
        let chunk_max = (1u64 << 20).min(len) as usize;
        let mut raw = vec![0u8; chunk_max + DIRECT_ALIGN as usize];
        let start = raw
            .as_ptr()
            .align_offset(DIRECT_ALIGN as usize)
            .min(DIRECT_ALIGN as usize);
        let zeroes = &mut raw[start..start + chunk_max];
        let mut at = offset;
        let mut left = len;
        while left > 0 {
            let chunk = left.min(chunk_max as u64) as usize;
            self.file.write_all_at(&zeroes[..chunk], at)?;
            at += chunk as u64;
            left -= chunk as u64;
        }
        Ok(())
    }
}

/// O_DIRECT needs the file offset and every buffer address and length aligned.
fn direct_aligned<B: vm_memory::bitmap::BitmapSlice>(
    slices: &[VolatileSlice<'_, B>],
    offset: u64,
) -> bool {
    offset.is_multiple_of(DIRECT_ALIGN)
        && slices.iter().all(|s| {
            (s.ptr_guard().as_ptr() as usize as u64).is_multiple_of(DIRECT_ALIGN)
                && (s.len() as u64).is_multiple_of(DIRECT_ALIGN)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use vm_memory::Bytes;

    #[test]
    fn a_read_write_disk_is_locked_against_every_other_opener() {
        let f = TempFile::new("lock", 1 << 20);
        let rw = DiskImage::open(&DiskOptions::new(f.path())).unwrap();
        let e = DiskImage::open(&DiskOptions::new(f.path())).unwrap_err();
        assert!(e.to_string().contains("in use by another process"), "{e}");
        let ro = DiskOptions {
            readonly: true,
            ..DiskOptions::new(f.path())
        };
        assert!(DiskImage::open(&ro).is_err());
        drop(rw);
        // Readers share; a writer is then refused.
        let r1 = DiskImage::open(&ro).unwrap();
        let r2 = DiskImage::open(&ro).unwrap();
        assert!(DiskImage::open(&DiskOptions::new(f.path())).is_err());
        drop((r1, r2));
        DiskImage::open(&DiskOptions::new(f.path())).unwrap();
    }

    #[test]
    fn bad_disks_are_refused_clearly() {
        let e = DiskImage::open(&DiskOptions::new("/nonexistent/disk.img")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/disk.img"), "{e}");
        let e = DiskImage::open(&DiskOptions::new("/dev/null")).unwrap_err();
        assert!(e.to_string().contains("neither"), "{e}");
        let f = TempFile::new("serial", 4096);
        let e = DiskImage::open(&DiskOptions {
            serial: Some("x".repeat(21)),
            ..DiskOptions::new(f.path())
        })
        .unwrap_err();
        assert!(e.to_string().contains("20"), "{e}");
    }

    #[test]
    fn size_is_whole_sectors() {
        let f = TempFile::new("size", 4096 + 100);
        let d = DiskImage::open(&DiskOptions::new(f.path())).unwrap();
        assert_eq!(d.size(), 4096);
        assert_eq!(d.sectors(), 8);
        assert!(d.in_bounds(4096 - 512, 512));
        assert!(!d.in_bounds(4096 - 512, 513));
        assert!(!d.in_bounds(u64::MAX, 2));
    }

    /// An unaligned O_DIRECT request bigger than the bounce buffer goes through in pieces, the
    /// pieces splitting guest ranges at arbitrary points.
    #[test]
    fn direct_bounce_is_chunked() {
        let len = 2 * BOUNCE_CHUNK + 3 * 4096;
        let f = TempFile::new("bounce", 4 << 20);
        let mem = guest_memory();
        let d = DiskImage::open(&DiskOptions {
            direct: true,
            ..DiskOptions::new(f.path())
        })
        .unwrap();
        let pattern: Vec<u8> = (0..len as u32).map(|i| (i ^ (i >> 9)) as u8).collect();
        // Three unaligned guest ranges of unequal sizes.
        let sizes = [700_000usize, 1_000_000, len - 1_700_000];
        let mut ranges = Vec::new();
        let mut addr = DATA + 512;
        for (i, &n) in sizes.iter().enumerate() {
            let at: usize = sizes[..i].iter().sum();
            mem.write_slice(&pattern[at..at + n], GuestAddress(addr))
                .unwrap();
            ranges.push((GuestAddress(addr), n));
            addr += n as u64 + 4096 + 512;
        }
        d.write_from(&mem, &ranges, 4096).unwrap();
        let mut back = vec![0u8; len];
        std::fs::File::open(f.path())
            .unwrap()
            .read_exact_at(&mut back, 4096)
            .unwrap();
        assert!(back == pattern, "written data differs");
        for &(a, n) in &ranges {
            mem.write_slice(&vec![0u8; n], a).unwrap();
        }
        d.read_into(&mem, &ranges, 4096).unwrap();
        let mut got = Vec::new();
        for &(a, n) in &ranges {
            let mut b = vec![0u8; n];
            mem.read_slice(&mut b, a).unwrap();
            got.extend_from_slice(&b);
        }
        assert!(got == pattern, "read data differs");
    }

    #[test]
    fn scattered_reads_and_writes_and_direct_bounce() {
        let f = TempFile::new("rw", 1 << 20);
        let mem = guest_memory();
        for direct in [false, true] {
            let d = DiskImage::open(&DiskOptions {
                direct,
                ..DiskOptions::new(f.path())
            })
            .unwrap();
            let pattern: Vec<u8> = (0..8192u32)
                .map(|i| (i * 7 + u32::from(direct)) as u8)
                .collect();
            mem.write_slice(&pattern[..4096], GuestAddress(DATA))
                .unwrap();
            mem.write_slice(&pattern[4096..], GuestAddress(DATA + 0x10000))
                .unwrap();
            let ranges = [
                (GuestAddress(DATA), 4096),
                (GuestAddress(DATA + 0x10000), 4096),
            ];
            d.write_from(&mem, &ranges, 8192).unwrap();
            let mut back = vec![0u8; 8192];
            std::fs::File::open(f.path())
                .unwrap()
                .read_exact_at(&mut back, 8192)
                .unwrap();
            assert_eq!(back, pattern);
            // Read back into odd places (not 4 KiB aligned: the bounce path with direct=on).
            let odd = [
                (GuestAddress(DATA + 0x20000 + 512), 1024),
                (GuestAddress(DATA + 0x30000), 7168),
            ];
            d.read_into(&mem, &odd, 8192).unwrap();
            let mut got = vec![0u8; 8192];
            mem.read_slice(&mut got[..1024], odd[0].0).unwrap();
            mem.read_slice(&mut got[1024..], odd[1].0).unwrap();
            assert_eq!(got, pattern);
            // Past the end, or guest ranges outside RAM: errors, nothing touched.
            assert!(d.read_into(&mem, &ranges, (1 << 20) - 4096).is_err());
            assert!(d
                .read_into(&mem, &[(GuestAddress(MEM_SIZE - 100), 4096)], 0)
                .is_err());
        }
    }

    #[test]
    fn flush_discard_and_write_zeroes() {
        let f = TempFile::new("dz", 1 << 20);
        let d = DiskImage::open(&DiskOptions::new(f.path())).unwrap();
        d.file.write_all_at(&[0xaa; 65536], 0).unwrap();
        d.flush().unwrap();
        d.discard(0, 4096).unwrap();
        d.write_zeroes(8192, 4096, false).unwrap();
        d.write_zeroes(16384, 4096, true).unwrap();
        let mut b = vec![0u8; 65536];
        d.file.read_exact_at(&mut b, 0).unwrap();
        assert!(b[8192..12288].iter().all(|&x| x == 0));
        assert!(b[16384..20480].iter().all(|&x| x == 0));
        assert!(b[4096..8192].iter().all(|&x| x == 0xaa));
        assert!(b[12288..16384].iter().all(|&x| x == 0xaa));
        // Read-only refuses every write.
        drop(d);
        let ro = DiskImage::open(&DiskOptions {
            readonly: true,
            ..DiskOptions::new(f.path())
        })
        .unwrap();
        let mem = guest_memory();
        assert!(ro
            .write_from(&mem, &[(GuestAddress(DATA), 512)], 0)
            .is_err());
        assert!(ro.discard(0, 512).is_err());
        assert!(ro.write_zeroes(0, 512, false).is_err());
        ro.flush().unwrap();
    }
}
