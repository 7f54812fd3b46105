//! A writer for the "new" (SVR4, `newc`) portable cpio format, the format the Linux kernel
//! unpacks as an initramfs (Documentation/driver-api/early-userspace/buffer-format.rst).
//!
//! Each member is a 110-byte ASCII header (`070701` and thirteen 8-digit hex fields), the
//! NUL-terminated name padded to a multiple of 4 bytes, then the data padded to 4 bytes. The
//! archive ends with a member named `TRAILER!!!`. Everything is written with uid/gid 0 and
//! mtime 0, so the same tree always gives the same bytes.

use std::collections::BTreeMap;
use std::io::{self, Write};

/// The `c_magic` of the newc format.
const MAGIC: &[u8; 6] = b"070701";
/// Name of the end-of-archive member.
const TRAILER: &str = "TRAILER!!!";

/// `S_IFMT` file-type bits of `c_mode` (POSIX `<sys/stat.h>`).
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// What a tree entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A directory.
    Dir,
    /// A regular file with its contents.
    File(Vec<u8>),
    /// A symbolic link to the given target.
    Symlink(String),
    /// A character device node with its `rdev` major and minor numbers.
    CharDev { major: u32, minor: u32 },
}

/// One member of the archive: a node and its permission bits (`0o7777` part of `st_mode`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub node: Node,
    pub perm: u32,
}

impl Entry {
    /// The full `c_mode`: file type bits and permission bits.
    pub fn mode(&self) -> u32 {
        let kind = match self.node {
            Node::Dir => S_IFDIR,
            Node::File(_) => S_IFREG,
            Node::Symlink(_) => S_IFLNK,
            Node::CharDev { .. } => S_IFCHR,
        };
        kind | (self.perm & 0o7777)
    }
}

/// A file tree to archive, keyed by relative path (`bin/busybox`, no leading `/`).
///
/// Paths are kept sorted, so every directory is written before its contents, as the kernel's
/// unpacker needs. Adding an entry creates its missing parent directories (mode 0755).
#[derive(Debug, Default, Clone)]
pub struct Tree {
    entries: BTreeMap<String, Entry>,
}

impl Tree {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) `path`. `path` must be relative, without empty, `.` or `..`
    /// components; anything else is rejected so a stray name cannot escape the root.
    pub fn add(&mut self, path: &str, node: Node, perm: u32) -> Result<(), InvalidPath> {
        let comps = components(path)?;
        for i in 1..comps.len() {
            let parent = comps[..i].join("/");
            self.entries.entry(parent).or_insert(Entry {
                node: Node::Dir,
                perm: 0o755,
            });
        }
        self.entries.insert(comps.join("/"), Entry { node, perm });
        Ok(())
    }

    /// The entry at `path`, if any.
    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries.get(path)
    }

    /// All entries in archive order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Entry)> {
        self.entries.iter()
    }

    /// Writes the tree as a newc archive, trailer included, padded to a 512-byte multiple.
    pub fn write_newc<W: Write>(&self, out: W) -> io::Result<W> {
        let mut w = NewcWriter::new(out);
        for (path, entry) in &self.entries {
            w.append(path, entry)?;
        }
        w.finish()
    }
}

/// A path that cannot go into the archive.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid archive path {0:?}: must be relative, without empty, '.' or '..' components")]
pub struct InvalidPath(pub String);

fn components(path: &str) -> Result<Vec<&str>, InvalidPath> {
    let comps: Vec<&str> = path.split('/').collect();
    let bad = path.is_empty()
        || path.contains('\0')
        || comps
            .iter()
            .any(|c| c.is_empty() || *c == "." || *c == "..");
    if bad {
        return Err(InvalidPath(path.to_string()));
    }
    Ok(comps)
}

/// Streams newc members to a writer.
pub struct NewcWriter<W: Write> {
    out: W,
    /// Bytes written so far, for padding.
    offset: u64,
    /// Next `c_ino`; each member gets its own so the unpacker never treats two as hard links.
    next_ino: u32,
}

impl<W: Write> NewcWriter<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            offset: 0,
            next_ino: 1,
        }
    }

    /// Appends one member.
    pub fn append(&mut self, path: &str, entry: &Entry) -> io::Result<()> {
        let (data, nlink, rdev): (&[u8], u32, (u32, u32)) = match &entry.node {
            Node::Dir => (&[], 2, (0, 0)),
            Node::File(d) => (d, 1, (0, 0)),
            Node::Symlink(t) => (t.as_bytes(), 1, (0, 0)),
            Node::CharDev { major, minor } => (&[], 1, (*major, *minor)),
        };
        let ino = self.next_ino;
        self.next_ino = self.next_ino.wrapping_add(1);
        self.member(path, ino, entry.mode(), nlink, data, rdev)
    }

    /// Writes the trailer and pads the archive to a multiple of 512 bytes; returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.member(TRAILER, 0, 0, 1, &[], (0, 0))?;
        let pad = (512 - self.offset % 512) % 512;
        self.write(&vec![0u8; pad as usize])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn member(
        &mut self,
        name: &str,
        ino: u32,
        mode: u32,
        nlink: u32,
        data: &[u8],
        (rdev_major, rdev_minor): (u32, u32),
    ) -> io::Result<()> {
        let too_big = |what| io::Error::new(io::ErrorKind::InvalidInput, what);
        let filesize = u32::try_from(data.len()).map_err(|_| too_big("cpio member over 4 GiB"))?;
        let namesize =
            u32::try_from(name.len() + 1).map_err(|_| too_big("cpio member name too long"))?;
        // c_uid, c_gid, c_mtime, c_devmajor, c_devminor and c_check (unused by newc) are 0.
        let (uid, gid, mtime, devmajor, devminor, check) = (0, 0, 0, 0, 0, 0);
        let fields = [
            ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdev_major,
            rdev_minor, namesize, check,
        ];
        let mut header = Vec::with_capacity(110);
        header.extend_from_slice(MAGIC);
        for f in fields {
            header.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.write(&header)?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad4()?;
        self.write(data)?;
        self.pad4()
    }

    fn pad4(&mut self) -> io::Result<()> {
        let pad = (4 - self.offset % 4) % 4;
        self.write(&[0u8; 3][..pad as usize])
    }

    fn write(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.offset += b.len() as u64;
        Ok(())
    }
}

/// Why an archive could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("cpio member at offset {0}: truncated")]
    Truncated(usize),
    #[error("cpio member at offset {0}: bad magic (only newc \"070701\" is read)")]
    BadMagic(usize),
    #[error("cpio member at offset {0}: malformed header field")]
    BadField(usize),
    #[error("cpio member at offset {0}: name is not NUL-terminated UTF-8")]
    BadName(usize),
    #[error("cpio member at offset {0}: unsupported file type {1:#o}")]
    UnsupportedType(usize, u32),
    #[error("cpio archive has no trailer")]
    NoTrailer,
}

/// Reads a newc archive written by [`Tree::write_newc`] (or any newc archive of directories,
/// regular files, symlinks and character devices) back into `(path, entry)` pairs, in archive
/// order. Bounds are checked everywhere; malformed input is an error, never a panic.
pub fn parse_newc(buf: &[u8]) -> Result<Vec<(String, Entry)>, ParseError> {
    let align4 = |x: usize| x.checked_add(3).map(|v| v & !3);
    let mut out = Vec::new();
    let mut off = 0usize;
    loop {
        let at = off;
        let header = off
            .checked_add(110)
            .and_then(|end| buf.get(off..end))
            .ok_or(if off >= buf.len() {
                ParseError::NoTrailer
            } else {
                ParseError::Truncated(at)
            })?;
        if &header[..6] != MAGIC {
            return Err(ParseError::BadMagic(at));
        }
        let field = |i: usize| -> Result<u32, ParseError> {
            let hex = std::str::from_utf8(&header[6 + 8 * i..14 + 8 * i])
                .map_err(|_| ParseError::BadField(at))?;
            u32::from_str_radix(hex, 16).map_err(|_| ParseError::BadField(at))
        };
        let mode = field(1)?;
        let filesize = field(6)? as usize;
        let rdev = (field(9)?, field(10)?);
        let namesize = field(11)? as usize;
        let name_start = off + 110;
        let name = name_start
            .checked_add(namesize)
            .and_then(|end| buf.get(name_start..end))
            .ok_or(ParseError::Truncated(at))?;
        let name = match name.split_last() {
            Some((0, n)) => std::str::from_utf8(n).map_err(|_| ParseError::BadName(at))?,
            _ => return Err(ParseError::BadName(at)),
        };
        let data_start = align4(name_start + namesize).ok_or(ParseError::Truncated(at))?;
        let data = data_start
            .checked_add(filesize)
            .and_then(|end| buf.get(data_start..end))
            .ok_or(ParseError::Truncated(at))?;
        off = align4(data_start + filesize).ok_or(ParseError::Truncated(at))?;
        if name == TRAILER {
            return Ok(out);
        }
        let node = match mode & 0o170_000 {
            S_IFDIR => Node::Dir,
            S_IFREG => Node::File(data.to_vec()),
            S_IFLNK => Node::Symlink(
                String::from_utf8(data.to_vec()).map_err(|_| ParseError::BadName(at))?,
            ),
            S_IFCHR => Node::CharDev {
                major: rdev.0,
                minor: rdev.1,
            },
            other => return Err(ParseError::UnsupportedType(at, other)),
        };
        out.push((
            name.to_string(),
            Entry {
                node,
                perm: mode & 0o7777,
            },
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Tree {
        let mut t = Tree::new();
        t.add("bin/busybox", Node::File(b"\x7fELF...".to_vec()), 0o755)
            .unwrap();
        t.add("bin/sh", Node::Symlink("/bin/busybox".into()), 0o777)
            .unwrap();
        t.add("dev/console", Node::CharDev { major: 5, minor: 1 }, 0o600)
            .unwrap();
        t.add("tmp", Node::Dir, 0o1777).unwrap();
        t.add("init", Node::File(b"#!/bin/sh\n".to_vec()), 0o755)
            .unwrap();
        t.add("a", Node::File(vec![]), 0o644).unwrap();
        t
    }

    const SAMPLE_NAMES: [&str; 8] = [
        "a",
        "bin",
        "bin/busybox",
        "bin/sh",
        "dev",
        "dev/console",
        "init",
        "tmp",
    ];

    #[test]
    fn round_trip() {
        let tree = sample();
        let bytes = tree.write_newc(Vec::new()).unwrap();
        assert_eq!(bytes.len() % 512, 0);
        let got = parse_newc(&bytes).unwrap();
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, SAMPLE_NAMES);
        for (name, entry) in &got {
            assert_eq!(Some(entry), tree.get(name), "{name}");
        }
        let by = |n: &str| &got.iter().find(|(p, _)| p == n).unwrap().1;
        assert_eq!(by("bin").node, Node::Dir, "parent created implicitly");
        assert_eq!(by("bin").perm, 0o755);
        assert_eq!(by("tmp").perm, 0o1777);
        assert_eq!(by("dev/console").node, Node::CharDev { major: 5, minor: 1 });
    }

    /// Field-level check of one header against the newc layout.
    #[test]
    fn header_layout() {
        let mut t = Tree::new();
        t.add("x", Node::File(b"hello".to_vec()), 0o644).unwrap();
        let bytes = t.write_newc(Vec::new()).unwrap();
        let header = std::str::from_utf8(&bytes[..110]).unwrap();
        assert_eq!(
            header,
            "070701\
             00000001000081a4000000000000000000000001000000000000000500000000\
             00000000000000000000000000000002\
             00000000"
        );
        assert_eq!(&bytes[110..112], b"x\0");
        assert_eq!(&bytes[112..117], b"hello"); // 110 + 2 = 112 is already 4-aligned
        assert_eq!(&bytes[117..120], &[0, 0, 0]);
        assert_eq!(&bytes[120..126], b"070701");
    }

    #[test]
    fn output_is_deterministic() {
        let a = sample().write_newc(Vec::new()).unwrap();
        let b = sample().write_newc(Vec::new()).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn rejects_escaping_paths() {
        let mut t = Tree::new();
        for bad in [
            "",
            "/etc/passwd",
            "a/../b",
            "./a",
            "a//b",
            "a/",
            "..",
            "a\0b",
        ] {
            assert_eq!(
                t.add(bad, Node::Dir, 0o755),
                Err(InvalidPath(bad.to_string())),
                "{bad:?}"
            );
        }
        assert_eq!(t.iter().count(), 0);
    }

    #[test]
    fn parser_rejects_damage_without_panicking() {
        let good = sample().write_newc(Vec::new()).unwrap();
        assert_eq!(parse_newc(&[]), Err(ParseError::NoTrailer));
        assert_eq!(parse_newc(&good[..50]), Err(ParseError::Truncated(0)));
        let mut bad = good.clone();
        bad[0] = b'1';
        assert_eq!(parse_newc(&bad), Err(ParseError::BadMagic(0)));
        let mut bad = good.clone();
        bad[6 + 8 * 6] = b'z'; // c_filesize
        assert_eq!(parse_newc(&bad), Err(ParseError::BadField(0)));
        // Any cut before the end of the trailer's name is an error (padding after it is not
        // needed to read the archive).
        let end = good.windows(10).position(|w| w == b"TRAILER!!!").unwrap() + 11;
        for len in 0..end {
            assert!(parse_newc(&good[..len]).is_err(), "cut at {len}");
        }
        for i in 0..good.len().min(2048) {
            let mut bad = good.clone();
            bad[i] ^= 0x5a;
            let _ = parse_newc(&bad);
        }
    }

    /// The host's GNU cpio (if installed) lists exactly what we wrote.
    #[test]
    fn host_cpio_reads_archive() {
        let dir = std::env::temp_dir().join(format!("vireo-cpio-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("a.cpio");
        std::fs::write(&file, sample().write_newc(Vec::new()).unwrap()).unwrap();
        let cpio = |verbose: bool| {
            std::process::Command::new("cpio")
                .args(["-i", "-t", "--quiet"])
                .args(verbose.then_some("-v"))
                .arg("-F")
                .arg(&file)
                .output()
        };
        let (Ok(plain), Ok(verbose)) = (cpio(false), cpio(true)) else {
            std::fs::remove_dir_all(&dir).unwrap();
            eprintln!("skipping: host `cpio` not installed");
            return;
        };
        std::fs::remove_dir_all(&dir).unwrap();
        for out in [&plain, &verbose] {
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let names = String::from_utf8(plain.stdout).unwrap();
        let names: Vec<&str> = names.lines().collect();
        assert_eq!(names, SAMPLE_NAMES);
        let listed = String::from_utf8(verbose.stdout).unwrap();
        let lines: Vec<&str> = listed.lines().collect();
        let line = |n: &str| lines[SAMPLE_NAMES.iter().position(|x| *x == n).unwrap()];
        assert!(
            line("bin/sh").starts_with("lrwxrwxrwx"),
            "{}",
            line("bin/sh")
        );
        assert!(line("bin/sh").ends_with("bin/sh -> /bin/busybox"));
        assert!(line("dev/console").starts_with("crw-------"));
        assert!(line("tmp").starts_with("drwxrwxrwt"));
        assert!(line("init").starts_with("-rwxr-xr-x"));
    }
}
