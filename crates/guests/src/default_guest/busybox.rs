//! The default guest's static busybox on the host: for container root file systems in tests
//! and benchmarks.

use std::fs;
use std::io;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{cpio, ensure, Error, Options, Result};

const DIR: &str = "busybox-static";

fn io_err(context: String) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Io { context, source }
}

/// The statically linked busybox of the default guest (Debian's `busybox-static`), taken out
/// of its initramfs into `<cache>/busybox-static/busybox`. Builds the default guest first if
/// needed. Once extracted, later calls return the file without verifying the default guest
/// again (which hashes the kernel and initramfs: slow when many tests ask at once).
pub fn busybox(cache: &Path) -> Result<PathBuf> {
    let path = cache.join(DIR).join("busybox");
    if path.is_file() {
        return Ok(path);
    }
    let guest = ensure(cache, &Options::default())?;
    let initrd =
        fs::read(&guest.initrd).map_err(io_err(format!("reading {}", guest.initrd.display())))?;
    let entries = cpio::parse_newc(&initrd).map_err(|e| Error::Io {
        context: format!("reading {}", guest.initrd.display()),
        source: io::Error::other(e.to_string()),
    })?;
    let image = entries
        .into_iter()
        .find_map(|(p, e)| match e.node {
            cpio::Node::File(data) if p == "bin/busybox" => Some(data),
            _ => None,
        })
        .ok_or(Error::PackageLayout {
            package: super::BUSYBOX_PACKAGE.into(),
            path: "/bin/busybox".into(),
        })?;
    let dir = cache.join(DIR);
    fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
    let tmp = dir.join(format!(".busybox-{}", std::process::id()));
    fs::write(&tmp, &image).map_err(io_err(format!("writing {}", tmp.display())))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))
        .map_err(io_err(format!("chmod {}", tmp.display())))?;
    fs::rename(&tmp, &path).map_err(io_err(format!("renaming to {}", path.display())))?;
    Ok(path)
}

/// Fills `dest` (created if missing) with a minimal root file system: busybox with a link for
/// each applet, `/etc/passwd` and `/etc/group` (root and nobody), and empty `/proc`, `/sys`,
/// `/dev`, `/tmp`, `/root`.
pub fn busybox_rootfs(cache: &Path, dest: &Path) -> Result<()> {
    let bb = busybox(cache)?;
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "root",
    ] {
        let p = dest.join(d);
        fs::create_dir_all(&p).map_err(io_err(format!("creating {}", p.display())))?;
    }
    fs::set_permissions(dest.join("tmp"), fs::Permissions::from_mode(0o1777))
        .map_err(io_err("chmod tmp".into()))?;
    let target = dest.join("bin/busybox");
    fs::copy(&bb, &target).map_err(io_err(format!("copying busybox to {}", target.display())))?;
    let out = Command::new(&bb)
        .arg("--list-full")
        .output()
        .map_err(io_err(format!("running {} --list-full", bb.display())))?;
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet.contains("..") || applet == "bin/busybox" {
            continue;
        }
        let link = dest.join(applet);
        if link.symlink_metadata().is_ok() {
            continue;
        }
        symlink("/bin/busybox", &link).map_err(io_err(format!("linking {}", link.display())))?;
    }
    for (file, text) in [
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        ),
        ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
    ] {
        fs::write(dest.join(file), text).map_err(io_err(format!("writing {file}")))?;
    }
    Ok(())
}
