//! The ELF64 executable a probe is packaged as: one PT_LOAD segment holding the whole file (headers
//! included) plus the zero-fill area, and one PT_NOTE segment with the Xen PVH entry note.
//!
//! Formats: System V ABI (ELF-64 Object File Format 1.5, "ELF Header", "Program Header", "Note
//! Section"); the PVH note: Xen `public/elfnote.h` (`XEN_ELFNOTE_PHYS32_ENTRY`).

use super::memory::{CODE_OFFSET, LOAD_ADDR};

pub(crate) const EHDR_SIZE: usize = 64;
pub(crate) const PHDR_SIZE: usize = 56;
pub(crate) const PHNUM: usize = 2;
pub(crate) const ET_EXEC: u16 = 2;
pub(crate) const EM_X86_64: u16 = 62;
pub(crate) const PT_LOAD: u32 = 1;
pub(crate) const PT_NOTE: u32 = 4;
const PF_X: u32 = 1;
const PF_W: u32 = 2;
const PF_R: u32 = 4;
/// Note type of the 32-bit physical PVH entry point.
pub(crate) const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// Name of the Xen notes, NUL-terminated (n_namesz = 4).
pub(crate) const XEN_NOTE_NAME: &[u8; 4] = b"Xen\0";
/// File offset of the PVH note (right after the program headers).
pub(crate) const NOTE_OFFSET: usize = EHDR_SIZE + PHNUM * PHDR_SIZE;
/// n_namesz, n_descsz, n_type, name, 4-byte descriptor.
pub(crate) const NOTE_SIZE: usize = 12 + 4 + 4;

/// What goes into the file.
pub(crate) struct Image<'a> {
    /// `e_entry`: the 64-bit (Linux boot protocol style) entry.
    pub entry64: u64,
    /// The PVH (32-bit protected mode, paging off) entry.
    pub pvh_entry: u32,
    /// Code and data, placed at file offset [`CODE_OFFSET`] (address `LOAD_ADDR + CODE_OFFSET`).
    pub body: &'a [u8],
    /// Bytes the segment occupies in memory from [`LOAD_ADDR`] (file plus zero-fill).
    pub mem_size: u64,
}

fn put16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

#[allow(clippy::too_many_arguments)]
fn phdr(
    out: &mut Vec<u8>,
    p_type: u32,
    flags: u32,
    offset: u64,
    addr: u64,
    filesz: u64,
    memsz: u64,
    align: u64,
) {
    put32(out, p_type);
    put32(out, flags);
    put64(out, offset);
    put64(out, addr); // p_vaddr
    put64(out, addr); // p_paddr == p_vaddr: identity-mapped
    put64(out, filesz);
    put64(out, memsz);
    put64(out, align);
}

/// Lays out the file. `body` must fit in front of the zero-fill area (checked by the caller).
pub(crate) fn write(image: &Image<'_>) -> Vec<u8> {
    let file_size = CODE_OFFSET as usize + image.body.len();
    let mut out = Vec::with_capacity(file_size);

    // ELF header.
    out.extend_from_slice(&[0x7f, b'E', b'L', b'F']);
    out.push(2); // EI_CLASS: ELFCLASS64
    out.push(1); // EI_DATA: ELFDATA2LSB
    out.push(1); // EI_VERSION: EV_CURRENT
    out.push(0); // EI_OSABI: System V
    out.extend_from_slice(&[0; 8]); // EI_ABIVERSION + padding
    put16(&mut out, ET_EXEC);
    put16(&mut out, EM_X86_64);
    put32(&mut out, 1); // e_version
    put64(&mut out, image.entry64);
    put64(&mut out, EHDR_SIZE as u64); // e_phoff
    put64(&mut out, 0); // e_shoff: no section headers
    put32(&mut out, 0); // e_flags
    put16(&mut out, EHDR_SIZE as u16);
    put16(&mut out, PHDR_SIZE as u16);
    put16(&mut out, PHNUM as u16);
    put16(&mut out, 64); // e_shentsize
    put16(&mut out, 0); // e_shnum
    put16(&mut out, 0); // e_shstrndx: SHN_UNDEF

    // Program headers.
    phdr(
        &mut out,
        PT_LOAD,
        PF_R | PF_W | PF_X,
        0,
        LOAD_ADDR,
        file_size as u64,
        image.mem_size.max(file_size as u64),
        0x1000,
    );
    let note_addr = LOAD_ADDR + NOTE_OFFSET as u64;
    phdr(
        &mut out,
        PT_NOTE,
        PF_R,
        NOTE_OFFSET as u64,
        note_addr,
        NOTE_SIZE as u64,
        NOTE_SIZE as u64,
        4,
    );

    // The PVH note.
    put32(&mut out, XEN_NOTE_NAME.len() as u32); // n_namesz
    put32(&mut out, 4); // n_descsz: a 32-bit address
    put32(&mut out, XEN_ELFNOTE_PHYS32_ENTRY);
    out.extend_from_slice(XEN_NOTE_NAME);
    put32(&mut out, image.pvh_entry);

    // Zero up to the code (some loaders read the descriptor as a pointer-sized value, so the
    // bytes after it must be zero).
    out.resize(CODE_OFFSET as usize, 0);
    out.extend_from_slice(image.body);
    out
}

#[cfg(test)]
pub(crate) mod parse {
    //! A tiny independent reader of what [`super::write`] produces, for the tests.

    pub(crate) fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }
    pub(crate) fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    pub(crate) fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) struct Phdr {
        pub p_type: u32,
        pub flags: u32,
        pub offset: u64,
        pub vaddr: u64,
        pub paddr: u64,
        pub filesz: u64,
        pub memsz: u64,
        pub align: u64,
    }

    pub(crate) fn phdrs(b: &[u8]) -> Vec<Phdr> {
        let phoff = u64_at(b, 0x20) as usize;
        let entsize = u16_at(b, 0x36) as usize;
        let num = u16_at(b, 0x38) as usize;
        (0..num)
            .map(|i| {
                let o = phoff + i * entsize;
                Phdr {
                    p_type: u32_at(b, o),
                    flags: u32_at(b, o + 4),
                    offset: u64_at(b, o + 8),
                    vaddr: u64_at(b, o + 16),
                    paddr: u64_at(b, o + 24),
                    filesz: u64_at(b, o + 32),
                    memsz: u64_at(b, o + 40),
                    align: u64_at(b, o + 48),
                }
            })
            .collect()
    }

    /// Walks the notes of every PT_NOTE segment; returns the PVH entry if a well-formed one exists.
    pub(crate) fn pvh_entry(b: &[u8]) -> Option<u32> {
        for ph in phdrs(b).into_iter().filter(|p| p.p_type == super::PT_NOTE) {
            let mut o = ph.offset as usize;
            let end = o + ph.filesz as usize;
            while o + 12 <= end {
                let namesz = u32_at(b, o) as usize;
                let descsz = u32_at(b, o + 4) as usize;
                let ty = u32_at(b, o + 8);
                let name = &b[o + 12..o + 12 + namesz];
                let desc = o + 12 + namesz.next_multiple_of(4);
                if ty == super::XEN_ELFNOTE_PHYS32_ENTRY
                    && name == super::XEN_NOTE_NAME
                    && descsz >= 4
                {
                    return Some(u32_at(b, desc));
                }
                o = desc + descsz.next_multiple_of(4);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::parse::*;
    use super::*;

    fn sample() -> Vec<u8> {
        let body = [0x90u8; 40];
        write(&Image {
            entry64: LOAD_ADDR + CODE_OFFSET,
            pvh_entry: 0x20_0110,
            body: &body,
            mem_size: 0x1_d000,
        })
    }

    #[test]
    fn header_identifies_an_x86_64_executable() {
        let b = sample();
        assert_eq!(&b[0..4], b"\x7fELF");
        assert_eq!(b[4], 2, "ELFCLASS64");
        assert_eq!(b[5], 1, "little endian");
        assert_eq!(u16_at(&b, 0x10), ET_EXEC);
        assert_eq!(u16_at(&b, 0x12), EM_X86_64);
        assert_eq!(u64_at(&b, 0x18), LOAD_ADDR + CODE_OFFSET);
        assert_eq!(u16_at(&b, 0x34) as usize, EHDR_SIZE);
        assert_eq!(u16_at(&b, 0x36) as usize, PHDR_SIZE);
        assert_eq!(b.len(), CODE_OFFSET as usize + 40);
        assert_eq!(b[CODE_OFFSET as usize], 0x90);
    }

    #[test]
    fn load_segment_covers_the_file_and_the_zero_fill() {
        let b = sample();
        let ph = phdrs(&b);
        assert_eq!(ph.len(), 2);
        let load = ph[0];
        assert_eq!(load.p_type, PT_LOAD);
        assert_eq!(
            (load.offset, load.vaddr, load.paddr),
            (0, LOAD_ADDR, LOAD_ADDR)
        );
        assert_eq!(load.filesz as usize, b.len());
        assert_eq!(load.memsz, 0x1_d000);
        assert_eq!(load.offset % load.align, load.vaddr % load.align);
        assert!(load.paddr >= 1 << 20);
    }

    #[test]
    fn pvh_note_carries_the_32_bit_entry() {
        let b = sample();
        let note = phdrs(&b)[1];
        assert_eq!(note.p_type, PT_NOTE);
        assert_eq!(note.vaddr, LOAD_ADDR + note.offset);
        assert!(note.offset + note.filesz <= CODE_OFFSET);
        assert_eq!(pvh_entry(&b), Some(0x20_0110));
        // The 4 bytes after the descriptor are zero (an 8-byte read still yields the address).
        let after = NOTE_OFFSET + NOTE_SIZE;
        assert_eq!(u32_at(&b, after), 0);
    }
}
