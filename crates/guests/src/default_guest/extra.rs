//! Extra programs for the default guest: a single-file Rust tool built as a static binary, and
//! an initramfs with files appended (tests and benchmarks add their guest-side tools this way).

use std::io;
use std::path::Path;
use std::process::Command;

use super::cpio::{Node, Tree};

/// Compiles the single-file Rust program `src` with the toolchain's `rustc` (`$RUSTC`, else
/// `rustc`) into a static, stripped x86-64 Linux binary at `out`.
pub fn build_static_tool(src: &Path, out: &Path) -> io::Result<()> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let o = Command::new(rustc)
        .args([
            "--edition",
            "2021",
            "-O",
            "-C",
            "target-feature=+crt-static",
            "-C",
            "strip=symbols",
            "--target",
            "x86_64-unknown-linux-gnu",
            "-o",
        ])
        .arg(out)
        .arg(src)
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("running rustc: {e}")))?;
    if !o.status.success() {
        return Err(io::Error::other(format!(
            "building {}: {}",
            src.display(),
            String::from_utf8_lossy(&o.stderr)
        )));
    }
    Ok(())
}

/// Writes to `out` the initramfs `initrd` followed by a newc archive of `files` (path in the
/// guest, host file), each executable: the kernel unpacks concatenated archives in order.
pub fn initrd_with_files(initrd: &Path, files: &[(&str, &Path)], out: &Path) -> io::Result<()> {
    let mut image = std::fs::read(initrd)?;
    let mut t = Tree::new();
    for (inside, host) in files {
        t.add(inside, Node::File(std::fs::read(host)?), 0o755)
            .map_err(|e| io::Error::other(e.to_string()))?;
    }
    image.extend(t.write_newc(Vec::new())?);
    std::fs::write(out, image)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_appended_as_a_second_archive() {
        let dir = std::env::temp_dir().join(format!("vireo-extra-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (base, tool, out) = (dir.join("base"), dir.join("tool"), dir.join("out"));
        std::fs::write(&base, b"BASE-ARCHIVE").unwrap();
        std::fs::write(&tool, b"\x7fELF-tool-bytes").unwrap();
        initrd_with_files(&base, &[("bin/tool", &tool)], &out).unwrap();
        let image = std::fs::read(&out).unwrap();
        assert!(image.starts_with(b"BASE-ARCHIVE"));
        let rest = String::from_utf8_lossy(&image[12..]);
        assert!(rest.starts_with("070701"), "a newc archive follows");
        assert!(rest.contains("bin/tool") && rest.contains("ELF-tool-bytes"));
        assert!(rest.contains("TRAILER!!!"));
        assert!(initrd_with_files(&dir.join("missing"), &[], &out).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
