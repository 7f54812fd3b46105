//! The default guest's root disk: the initramfs tree as an ext4 image (`mkfs.ext4 -d`), for
//! booting with `root=/dev/vda`. The initramfs's init loads the virtio modules, mounts the
//! disk and switches to it; the disk's copy of the same init then runs the command or shell.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::cpio::{self, Node};
use super::{io_err, run, stderr_tail, CacheLock, DefaultGuest, Error, Result, GUEST_DIR};
use super::{LOCK_FILE, ROOTFS_MARKER_INITRAMFS};

/// The pristine image in the cache, and the file recording which initramfs it was made from.
const ROOTFS_FILE: &str = "rootfs.ext4";
const ROOTFS_SOURCE: &str = "rootfs.ext4.source";
/// Size of the image (sparse: the tree takes a few MiB).
const ROOTFS_SIZE: &str = "128M";

/// The pristine root disk image of `guest` in `cache`, built on first use (under the cache
/// lock) and rebuilt when the initramfs changes.
pub fn ensure_root_image(cache: &Path, guest: &DefaultGuest) -> Result<PathBuf> {
    let _lock = CacheLock::acquire(&cache.join(LOCK_FILE))?;
    let dir = cache.join(GUEST_DIR);
    let image = dir.join(ROOTFS_FILE);
    let initrd =
        fs::read(&guest.initrd).map_err(io_err(format!("reading {}", guest.initrd.display())))?;
    let source = super::record(&initrd).sha256;
    let stamp = dir.join(ROOTFS_SOURCE);
    if image.exists() && fs::read_to_string(&stamp).ok().as_deref() == Some(source.as_str()) {
        return Ok(image);
    }
    tracing::info!(image = %image.display(), "building the default guest's root disk");
    let tree_dir = dir.join(".rootfs-tree");
    let _ = fs::remove_dir_all(&tree_dir);
    let built = write_tree(&initrd, &tree_dir).and_then(|()| mkfs(&tree_dir, &image));
    let _ = fs::remove_dir_all(&tree_dir);
    built?;
    fs::write(&stamp, source).map_err(io_err(format!("writing {}", stamp.display())))?;
    Ok(image)
}

/// Give `dest` a fresh copy of the default root disk unless it exists already (then it is
/// used as it is, so a guest's changes persist from run to run).
pub fn prepare_root_disk(cache: &Path, guest: &DefaultGuest, dest: &Path) -> Result<()> {
    if dest.exists() {
        return Ok(());
    }
    let image = ensure_root_image(cache, guest)?;
    sparse_copy(&image, dest).map_err(io_err(format!(
        "copying the root disk to {}",
        dest.display()
    )))
}

/// Unpack the initramfs into `dir` (device nodes are left out: the guest mounts devtmpfs;
/// the initramfs marker too, so the disk's init knows it is not in the initramfs).
fn write_tree(initrd: &[u8], dir: &Path) -> Result<()> {
    let entries = cpio::parse_newc(initrd).map_err(|e| Error::Io {
        context: "reading the initramfs".into(),
        source: io::Error::other(e.to_string()),
    })?;
    fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    for (path, entry) in entries {
        if path == ROOTFS_MARKER_INITRAMFS || path == "." {
            continue;
        }
        let p = dir.join(&path);
        let err = io_err(format!("writing {}", p.display()));
        match &entry.node {
            Node::Dir => fs::create_dir_all(&p).map_err(err)?,
            Node::File(data) => {
                if let Some(parent) = p.parent() {
                    fs::create_dir_all(parent).map_err(io_err("creating a directory"))?;
                }
                fs::write(&p, data).map_err(err)?;
            }
            Node::Symlink(target) => {
                if let Some(parent) = p.parent() {
                    fs::create_dir_all(parent).map_err(io_err("creating a directory"))?;
                }
                std::os::unix::fs::symlink(target, &p).map_err(err)?;
                continue;
            }
            Node::CharDev { .. } => continue,
        }
        fs::set_permissions(&p, fs::Permissions::from_mode(entry.perm & 0o7777))
            .map_err(io_err(format!("setting permissions of {}", p.display())))?;
    }
    Ok(())
}

/// `mkfs.ext4 -d tree image`, written to a temporary name and renamed into place.
fn mkfs(tree: &Path, image: &Path) -> Result<()> {
    let tmp = image.with_extension("ext4.tmp");
    let _ = fs::remove_file(&tmp);
    let out = run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "vireo-root", "-E", "root_owner=0:0", "-d"])
            .arg(tree)
            .arg(&tmp)
            .arg(ROOTFS_SIZE),
        "mkfs.ext4",
        "e2fsprogs",
    )?;
    if !out.status.success() {
        let _ = fs::remove_file(&tmp);
        return Err(Error::Io {
            context: "mkfs.ext4 -d (e2fsprogs 1.43 or later is needed)".into(),
            source: io::Error::other(stderr_tail(&out)),
        });
    }
    fs::rename(&tmp, image).map_err(io_err(format!("renaming into {}", image.display())))
}

/// Copy `src` to a new file `dest`, leaving holes where `src` has all-zero blocks.
fn sparse_copy(src: &Path, dest: &Path) -> io::Result<()> {
    let mut input = fs::File::open(src)?;
    let len = input.metadata()?.len();
    let tmp = dest.with_extension("partial");
    let mut out = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)?;
    let mut buf = vec![0u8; 64 << 10];
    let copied = (|| {
        loop {
            let n = input.read(&mut buf)?;
            if n == 0 {
                break;
            }
            if buf[..n].iter().all(|&b| b == 0) {
                out.seek(SeekFrom::Current(n as i64))?;
            } else {
                out.write_all(&buf[..n])?;
            }
        }
        out.set_len(len)?;
        out.sync_all()
    })();
    match copied {
        Ok(()) => fs::rename(&tmp, dest),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_copy_keeps_content_and_holes() {
        let dir = std::env::temp_dir().join(format!("vireo-sparse-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let src = dir.join("src");
        let mut data = vec![0u8; 4 << 20];
        data[100] = 1;
        data[3 << 20] = 2;
        fs::write(&src, &data).unwrap();
        let dst = dir.join("dst");
        sparse_copy(&src, &dst).unwrap();
        assert_eq!(fs::read(&dst).unwrap(), data);
        use std::os::unix::fs::MetadataExt;
        let blocks = fs::metadata(&dst).unwrap().blocks() * 512;
        assert!(
            blocks < 1 << 20,
            "copy is sparse ({blocks} bytes allocated)"
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn tree_leaves_out_devices_and_the_initramfs_marker() {
        let mut t = cpio::Tree::new();
        t.add("bin", Node::Dir, 0o755).unwrap();
        t.add("bin/busybox", Node::File(b"bb".to_vec()), 0o755)
            .unwrap();
        t.add("bin/sh", Node::Symlink("/bin/busybox".into()), 0o777)
            .unwrap();
        t.add("dev", Node::Dir, 0o755).unwrap();
        t.add("dev/console", Node::CharDev { major: 5, minor: 1 }, 0o600)
            .unwrap();
        t.add(ROOTFS_MARKER_INITRAMFS, Node::File(Vec::new()), 0o644)
            .unwrap();
        let cpio = t.write_newc(Vec::new()).unwrap();
        let dir = std::env::temp_dir().join(format!("vireo-tree-{}", std::process::id()));
        write_tree(&cpio, &dir).unwrap();
        assert_eq!(fs::read(dir.join("bin/busybox")).unwrap(), b"bb");
        assert_eq!(
            fs::read_link(dir.join("bin/sh")).unwrap(),
            PathBuf::from("/bin/busybox")
        );
        assert!(dir.join("dev").is_dir());
        assert!(!dir.join("dev/console").exists());
        assert!(!dir.join(ROOTFS_MARKER_INITRAMFS).exists());
        fs::remove_dir_all(dir).unwrap();
    }
}
