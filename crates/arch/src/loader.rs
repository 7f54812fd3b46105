//! Loading the guest kernel (Linux x86 boot protocol, `Documentation/arch/x86/boot.rst`).
//!
//! Accepted images: an ELF executable (a `vmlinux` or a probe guest), entered at `e_entry` in
//! 64-bit mode; or a bzImage. A bzImage whose payload is LZ4 (legacy frame) or gzip is unpacked
//! on the host and its ELF `vmlinux` loaded directly — the guest then skips its own
//! decompressor, which dominates early boot under emulation. Other bzImages are loaded as they
//! are and entered at their 64-bit entry (load address + 0x200).

use std::io::{Cursor, Read};
use std::path::Path;

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader};
use vireo_hv::GuestMemory;
use vm_memory::{Bytes, GuestAddress};

use crate::layout;

/// Kernel loading errors, worded for the person who passed the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read kernel {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a Linux kernel (bzImage) or an x86-64 ELF executable")]
    NotAKernel { path: String },
    #[error(
        "kernel {path} needs the 64-bit boot protocol (boot protocol 2.12+ with XLF_KERNEL_64)"
    )]
    Not64Bit { path: String },
    #[error("cannot unpack the kernel payload of {path}: {reason}")]
    Unpack { path: String, reason: String },
    #[error("kernel {path} does not fit in guest memory ({reason}); give the VM more memory")]
    Load { path: String, reason: String },
    #[error("cannot read initrd {path}: {source}")]
    ReadInitrd {
        path: String,
        source: std::io::Error,
    },
    #[error("initrd {path} ({size} bytes) does not fit in guest memory below {limit:#x} above the kernel; give the VM more memory")]
    InitrdTooLarge { path: String, size: u64, limit: u64 },
}

pub type Result<T> = std::result::Result<T, Error>;

/// How the kernel was loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// An ELF file given as it is.
    Elf,
    /// A bzImage unpacked on the host: its ELF vmlinux was loaded.
    BzImageUnpacked,
    /// A bzImage loaded as it is (the guest decompresses itself).
    BzImage,
}

/// Where the kernel ended up.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// The 64-bit entry point (guest-physical).
    pub entry: u64,
    /// First byte of the loaded image (guest-physical).
    pub start: u64,
    /// First byte after the loaded image (guest-physical).
    pub end: u64,
    /// The bzImage setup header, when there is one (the zero page starts from it).
    pub setup_header: Option<setup_header>,
    pub format: KernelFormat,
}

const SETUP_HEADER_OFFSET: usize = 0x1f1;
const HDRS_MAGIC: u32 = 0x5372_6448; // "HdrS"
const XLF_KERNEL_64: u16 = 1 << 0;
const ELF_MAGIC: &[u8] = b"\x7fELF";
const LZ4_LEGACY_MAGIC: u32 = 0x184c_2102;
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
/// Refuse to unpack payloads claiming more than this (a corrupt size field must not make us
/// allocate without bound).
const MAX_UNPACKED: usize = 1 << 30;

/// Check, cheaply and before anything is built, that `path` is a kernel vireo can load: an
/// ELF file or a bzImage with the 64-bit boot protocol.
pub fn check_kernel(path: &Path) -> Result<()> {
    let name = path.display().to_string();
    let read_err = |source| Error::Read {
        path: name.clone(),
        source,
    };
    let mut head = Vec::with_capacity(1024);
    std::fs::File::open(path)
        .map_err(read_err)?
        .take(1024)
        .read_to_end(&mut head)
        .map_err(read_err)?;
    if head.starts_with(ELF_MAGIC) {
        return Ok(());
    }
    let header =
        parse_setup_header(&head).ok_or_else(|| Error::NotAKernel { path: name.clone() })?;
    if header.version < 0x20c || header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(Error::Not64Bit { path: name });
    }
    Ok(())
}

/// Load the kernel at `path` into `mem`.
pub fn load_kernel(mem: &GuestMemory, path: &Path) -> Result<LoadedKernel> {
    let name = path.display().to_string();
    let image = std::fs::read(path).map_err(|source| Error::Read {
        path: name.clone(),
        source,
    })?;
    load_kernel_bytes(mem, &image, &name)
}

/// Load a kernel image held in memory; `name` is used in error messages.
pub fn load_kernel_bytes(mem: &GuestMemory, image: &[u8], name: &str) -> Result<LoadedKernel> {
    if image.starts_with(ELF_MAGIC) {
        return load_elf(mem, image, name, KernelFormat::Elf, None);
    }
    let header = parse_setup_header(image).ok_or_else(|| Error::NotAKernel {
        path: name.to_string(),
    })?;
    if header.version < 0x20c || header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(Error::Not64Bit {
            path: name.to_string(),
        });
    }
    if let Some(vmlinux) = unpack_payload(image, &header, name)? {
        if vmlinux.starts_with(ELF_MAGIC) {
            return load_elf(
                mem,
                &vmlinux,
                name,
                KernelFormat::BzImageUnpacked,
                Some(header),
            );
        }
    }
    let mut cursor = Cursor::new(image);
    let res = BzImage::load(
        mem,
        None,
        &mut cursor,
        Some(GuestAddress(layout::KERNEL_START)),
    )
    .map_err(|e| Error::Load {
        path: name.to_string(),
        reason: e.to_string(),
    })?;
    Ok(LoadedKernel {
        entry: res.kernel_load.0 + 0x200,
        start: res.kernel_load.0,
        end: res.kernel_load.0 + res.kernel_end,
        setup_header: res.setup_header.or(Some(header)),
        format: KernelFormat::BzImage,
    })
}

fn load_elf(
    mem: &GuestMemory,
    image: &[u8],
    name: &str,
    format: KernelFormat,
    setup_header: Option<setup_header>,
) -> Result<LoadedKernel> {
    let mut cursor = Cursor::new(image);
    let res =
        Elf::load(
            mem,
            None,
            &mut cursor,
            Some(GuestAddress(layout::KERNEL_START)),
        )
        .map_err(|e| match e {
            linux_loader::loader::Error::Elf(
                linux_loader::loader::elf::Error::InvalidElfMagicNumber,
            )
            | linux_loader::loader::Error::Elf(
                linux_loader::loader::elf::Error::BigEndianElfOnLittle,
            )
            | linux_loader::loader::Error::Elf(
                linux_loader::loader::elf::Error::InvalidEntryAddress,
            ) => Error::NotAKernel {
                path: name.to_string(),
            },
            other => Error::Load {
                path: name.to_string(),
                reason: other.to_string(),
            },
        })?;
    Ok(LoadedKernel {
        entry: res.kernel_load.0,
        start: elf_load_start(image).unwrap_or(layout::KERNEL_START),
        end: res.kernel_end,
        setup_header,
        format,
    })
}

/// The lowest physical address of the PT_LOAD segments of an ELF64 image.
fn elf_load_start(image: &[u8]) -> Option<u64> {
    let u16_at = |o: usize| {
        image
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |o: usize| {
        image
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        image
            .get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    (0..phnum)
        .filter_map(|i| {
            let o = phoff.checked_add(i.checked_mul(phentsize)?)?;
            (u32_at(o)? == 1).then(|| u64_at(o + 24)).flatten()
        })
        .min()
}

/// The bzImage setup header at offset 0x1f1, if `image` has one.
pub fn parse_setup_header(image: &[u8]) -> Option<setup_header> {
    let size = std::mem::size_of::<setup_header>();
    let bytes = image.get(SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + size)?;
    let mut header = setup_header::default();
    // Copy through vm-memory's ByteValued view instead of transmuting.
    vm_memory::ByteValued::as_mut_slice(&mut header).copy_from_slice(bytes);
    let magic = header.header;
    (magic == HDRS_MAGIC).then_some(header)
}

/// The decompressed payload of a bzImage (normally an ELF vmlinux), or `None` when its
/// compression is not one we unpack.
pub fn unpack_payload(image: &[u8], header: &setup_header, name: &str) -> Result<Option<Vec<u8>>> {
    if header.version < 0x208 {
        return Ok(None);
    }
    let unpack_err = |reason: String| Error::Unpack {
        path: name.to_string(),
        reason,
    };
    let setup_sects = if header.setup_sects == 0 {
        4
    } else {
        header.setup_sects as usize
    };
    let start = (setup_sects + 1) * 512 + header.payload_offset as usize;
    let len = header.payload_length as usize;
    let payload = start
        .checked_add(len)
        .and_then(|end| image.get(start..end))
        .ok_or_else(|| unpack_err("payload lies outside the file".into()))?;
    if payload.len() < 8 {
        return Ok(None);
    }
    // The kernel build appends the uncompressed size (le32) to every payload.
    let trailer = &payload[payload.len() - 4..];
    let size = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]) as usize;
    if size > MAX_UNPACKED {
        return Err(unpack_err(format!("claims {size} bytes unpacked")));
    }
    if u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]) == LZ4_LEGACY_MAGIC {
        return unlz4_legacy(&payload[..payload.len() - 4], size)
            .map(Some)
            .map_err(unpack_err);
    }
    if payload.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::with_capacity(size);
        flate2::read::GzDecoder::new(payload)
            .take(MAX_UNPACKED as u64)
            .read_to_end(&mut out)
            .map_err(|e| unpack_err(format!("gzip: {e}")))?;
        return Ok(Some(out));
    }
    Ok(None)
}

/// Decode an LZ4 legacy frame (as written by `lz4 -l`): a magic number, then blocks of
/// `le32 compressed size` + data, each unpacking to at most 8 MiB.
fn unlz4_legacy(input: &[u8], size_hint: usize) -> std::result::Result<Vec<u8>, String> {
    let mut out = vec![0u8; size_hint.max(LZ4_LEGACY_BLOCK)];
    let mut pos = 4; // magic
    let mut written = 0;
    while pos + 4 <= input.len() {
        let word = u32::from_le_bytes([input[pos], input[pos + 1], input[pos + 2], input[pos + 3]]);
        pos += 4;
        if word == LZ4_LEGACY_MAGIC {
            continue;
        }
        let block_len = word as usize;
        let block = input
            .get(pos..pos.saturating_add(block_len))
            .ok_or_else(|| format!("LZ4 block at {pos} runs past the end"))?;
        pos += block_len;
        if out.len() < written + LZ4_LEGACY_BLOCK {
            if out.len() >= MAX_UNPACKED {
                return Err("LZ4 payload unpacks to more than 1 GiB".into());
            }
            out.resize(written + LZ4_LEGACY_BLOCK, 0);
        }
        let n =
            lz4_flex::block::decompress_into(block, &mut out[written..written + LZ4_LEGACY_BLOCK])
                .map_err(|e| format!("LZ4 block at {pos}: {e}"))?;
        written += n;
    }
    out.truncate(written);
    Ok(out)
}

/// Load an initrd, page aligned, at the top of RAM below `initrd_addr_max` (and below the MMIO
/// hole) above the kernel, or when that does not fit (small VMs), right below the kernel and
/// above 1 MiB. Returns (address, size).
pub fn load_initrd(
    mem: &GuestMemory,
    path: &Path,
    mem_size: u64,
    kernel: &LoadedKernel,
) -> Result<(u64, u64)> {
    let header = kernel.setup_header.as_ref();
    let name = path.display().to_string();
    let data = std::fs::read(path).map_err(|source| Error::ReadInitrd {
        path: name.clone(),
        source,
    })?;
    let size = data.len() as u64;
    let addr_max = header
        .map(|h| h.initrd_addr_max as u64)
        .filter(|&m| m != 0)
        .unwrap_or(0x37ff_ffff);
    let limit = layout::low_ram_end(mem_size).min(addr_max + 1);
    let too_large = || Error::InitrdTooLarge {
        path: name.clone(),
        size,
        limit,
    };
    let above = limit
        .checked_sub(size)
        .map(|s| s & !0xfff)
        .filter(|&s| s >= kernel.end.next_multiple_of(0x1000));
    let below = kernel
        .start
        .checked_sub(size)
        .map(|s| s & !0xfff)
        .filter(|&s| s >= layout::BIOS_END);
    let start = above.or(below).ok_or_else(too_large)?;
    mem.write_slice(&data, GuestAddress(start))
        .map_err(|_| too_large())?;
    Ok((start, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(size: usize) -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    fn lz4_legacy(data: &[u8]) -> Vec<u8> {
        let mut out = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for chunk in data.chunks(LZ4_LEGACY_BLOCK) {
            let c = lz4_flex::block::compress(chunk);
            out.extend_from_slice(&(c.len() as u32).to_le_bytes());
            out.extend_from_slice(&c);
        }
        out
    }

    #[test]
    fn lz4_legacy_round_trip() {
        let data: Vec<u8> = (0..(9u32 << 20))
            .map(|i| (i % 251) as u8 ^ (i >> 13) as u8)
            .collect();
        let packed = lz4_legacy(&data);
        assert_eq!(unlz4_legacy(&packed, data.len()).unwrap(), data);
    }

    #[test]
    fn lz4_truncated_block_is_an_error() {
        let data = vec![7u8; 100_000];
        let mut packed = lz4_legacy(&data);
        packed.truncate(packed.len() - 10);
        assert!(unlz4_legacy(&packed, data.len()).is_err());
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let m = mem(64 << 20);
        let err = load_kernel_bytes(&m, &[0u8; 4096], "junk").unwrap_err();
        assert!(matches!(err, Error::NotAKernel { .. }), "{err}");
        let err = load_kernel_bytes(&m, b"short", "junk").unwrap_err();
        assert!(matches!(err, Error::NotAKernel { .. }));
    }

    /// A fake bzImage: a setup header and an LZ4 payload that unpacks to a minimal ELF.
    fn fake_bzimage(payload: &[u8], xloadflags: u16) -> Vec<u8> {
        let setup_sects = 1usize;
        let mut img = vec![0u8; (setup_sects + 1) * 512];
        let mut h = setup_header {
            setup_sects: setup_sects as u8,
            boot_flag: 0xaa55,
            header: HDRS_MAGIC,
            version: 0x20f,
            xloadflags,
            payload_offset: 0,
            payload_length: payload.len() as u32,
            ..Default::default()
        };
        h.initrd_addr_max = 0x7fff_ffff;
        let size = std::mem::size_of::<setup_header>();
        img[SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + size]
            .copy_from_slice(vm_memory::ByteValued::as_slice(&h));
        img.extend_from_slice(payload);
        img
    }

    #[test]
    fn bzimage_payload_is_unpacked() {
        let inner = b"\x7fELF-pretend-vmlinux".repeat(1000);
        let mut payload = lz4_legacy(&inner);
        payload.extend_from_slice(&(inner.len() as u32).to_le_bytes());
        let img = fake_bzimage(&payload, XLF_KERNEL_64);
        let h = parse_setup_header(&img).unwrap();
        assert_eq!(unpack_payload(&img, &h, "k").unwrap().unwrap(), inner);
    }

    #[test]
    fn check_kernel_reads_only_the_header() {
        let dir = std::env::temp_dir().join(format!("vireo-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk");
        std::fs::write(&junk, vec![0x42u8; 5000]).unwrap();
        assert!(matches!(check_kernel(&junk), Err(Error::NotAKernel { .. })));
        let img = dir.join("bz");
        std::fs::write(&img, fake_bzimage(&[0u8; 16], XLF_KERNEL_64)).unwrap();
        check_kernel(&img).unwrap();
        std::fs::write(&img, fake_bzimage(&[0u8; 16], 0)).unwrap();
        assert!(matches!(check_kernel(&img), Err(Error::Not64Bit { .. })));
        assert!(matches!(
            check_kernel(&dir.join("missing")),
            Err(Error::Read { .. })
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bzimage_without_64bit_entry_is_refused() {
        let img = fake_bzimage(&[0u8; 16], 0);
        let err = load_kernel_bytes(&mem(64 << 20), &img, "old").unwrap_err();
        assert!(matches!(err, Error::Not64Bit { .. }));
    }

    #[test]
    fn absurd_unpacked_size_is_refused() {
        let mut payload = lz4_legacy(b"hello");
        payload.extend_from_slice(&u32::MAX.to_le_bytes());
        let img = fake_bzimage(&payload, XLF_KERNEL_64);
        let h = parse_setup_header(&img).unwrap();
        assert!(unpack_payload(&img, &h, "k").is_err());
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram() {
        let m = mem(64 << 20);
        let dir = std::env::temp_dir().join(format!("vireo-initrd-{}", std::process::id()));
        std::fs::write(&dir, vec![1u8; 10_000]).unwrap();
        let kernel = |start: u64, end: u64| LoadedKernel {
            entry: start,
            start,
            end,
            setup_header: None,
            format: KernelFormat::Elf,
        };
        let (addr, size) =
            load_initrd(&m, &dir, 64 << 20, &kernel(0x100_0000, 0x200_0000)).unwrap();
        assert_eq!(size, 10_000);
        assert_eq!(addr % 0x1000, 0);
        assert!(addr + size <= 64 << 20);
        assert!(addr >= 0x200_0000);
        // A kernel that ends near the top: the initrd goes right below it.
        let (addr, _) =
            load_initrd(&m, &dir, 64 << 20, &kernel(0x100_0000, (64 << 20) - 0x1000)).unwrap();
        assert!(
            addr >= layout::BIOS_END && addr + 10_000 <= 0x100_0000,
            "{addr:#x}"
        );
        // No room above or below.
        assert!(load_initrd(&m, &dir, 64 << 20, &kernel(0x10_2000, (64 << 20) - 0x1000)).is_err());
        std::fs::remove_file(dir).unwrap();
    }
}
