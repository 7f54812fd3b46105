//! The default guest: stock Debian cloud kernel + busybox initramfs, built into a cache.
//!
//! [`ensure`] resolves the kernel package that `linux-image-cloud-amd64` depends on, fetches
//! it and `busybox-static` with `apt-get download`, unpacks both with `dpkg-deb -x` and builds,
//! in `<cache>/default-guest/`:
//!
//! - `vmlinuz`: the package's bzImage, as shipped;
//! - `initrd.cpio`: an uncompressed newc initramfs (see [`cpio`]) with busybox and its applet
//!   links, `/init` (see [`init`]), `/etc`, and the virtio modules with everything they depend
//!   on (found through each module's `.modinfo`, see [`modules`]) plus a `modules.dep`;
//! - `manifest.json`: format version, a digest of the recipe, the kernel version, and size and
//!   SHA-256 of both files.
//!
//! Later calls only verify the files against the manifest (no network); a mismatch, a damaged
//! file or a changed recipe (init script, module list, ...) rebuilds. Concurrent callers are
//! serialised by an `flock(2)` on `<cache>/default-guest.lock`; a build happens in a temporary
//! directory inside the cache and is renamed into place, so a reader never sees half a guest.

pub mod busybox;
pub mod cpio;
pub mod extra;
pub mod init;
pub mod modules;
mod rootfs;

use std::ffi::OsString;
use std::fs::{self, File};
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use init::{CMD_PARAM, EXIT_STATUS_PREFIX, READY_LINE};

/// The Debian meta-package whose `Depends:` names the current cloud kernel.
pub const KERNEL_META_PACKAGE: &str = "linux-image-cloud-amd64";
/// The Debian package with a statically linked busybox at `/bin/busybox`.
pub const BUSYBOX_PACKAGE: &str = "busybox-static";

/// Modules `/init` loads (with their dependencies), by kernel module name: the virtio PCI
/// transport and the devices vireo offers.
pub const VIRTIO_MODULES: &[&str] = &[
    "virtio",
    "virtio_ring",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_rng",
    "virtio_console",
    "virtio_balloon",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
    "pvpanic",
    "pvpanic_mmio",
    // The ACPI power button (`\_SB.PWRB`, reported through the GED) and the event devices
    // `acpid` reads it from.
    "evdev",
    "button",
];

/// The base kernel command line for the default guest on a PC-like machine with a 16550 at
/// 0x3f8 and ACPI:
/// - `console=ttyS0`: kernel and init talk on the first UART;
/// - `8250.nr_uarts=1`: probe one legacy UART instead of four (each probe is port I/O, which
///   exits to the VMM);
/// - `reboot=k`: a reboot (and `panic=-1`, an immediate reboot on panic) resets through the
///   i8042 controller, which ends the VM;
/// - `no_timer_check`: skip the IO-APIC timer sanity loop, which only costs time in a VM;
/// - `cryptomgr.notests`: skip the boot-time crypto self-tests (about 0.4 s of a 2 s boot to
///   init under QEMU TCG; more where guest kernel code is emulated); ignored in FIPS mode;
/// - `quiet`: every console byte is an exit; print errors only.
pub const BASE_CMDLINE: &str =
    "console=ttyS0 8250.nr_uarts=1 reboot=k panic=-1 no_timer_check cryptomgr.notests quiet";

/// Bumped when the layout of the cache or the meaning of the manifest changes. Changes to
/// the init script, module list or initramfs contents are caught by [`recipe_digest`].
const FORMAT_VERSION: u32 = 1;

const GUEST_DIR: &str = "default-guest";
const LOCK_FILE: &str = "default-guest.lock";
const BUILD_PREFIX: &str = ".build-";
const MANIFEST: &str = "manifest.json";
const KERNEL_FILE: &str = "vmlinuz";
const INITRD_FILE: &str = "initrd.cpio";

/// Present in the initramfs only: tells `/init` it runs from the initramfs (and may switch to
/// a root disk), not from the root disk made of the same tree.
pub(crate) const ROOTFS_MARKER_INITRAMFS: &str = "etc/vireo-initramfs";

/// Fixed files of the initramfs: `(path, contents, permissions)`.
const ETC_FILES: &[(&str, &str, u32)] = &[
    (ROOTFS_MARKER_INITRAMFS, "", 0o644),
    ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n", 0o644),
    ("etc/group", "root:x:0:\n", 0o644),
    ("etc/hostname", "vireo\n", 0o644),
    // busybox acpid runs `<conf dir>/PWRF/00000080` for the power button (KEY_POWER).
    (
        "etc/acpi/PWRF/00000080",
        "#!/bin/sh\n\
         # The ACPI power button: shut down cleanly.\n\
         echo 'vireo-guest: power button pressed, shutting down' >/dev/console\n\
         sync\n\
         mount -o remount,ro / 2>/dev/null\n\
         poweroff -f\n",
        0o755,
    ),
];
/// Empty directories of the initramfs: `(path, permissions)`.
const DIRS: &[(&str, u32)] = &[
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("tmp", 0o1777),
    ("run", 0o755),
    ("root", 0o700),
    ("bin", 0o755),
    ("sbin", 0o755),
    ("usr/bin", 0o755),
    ("usr/sbin", 0o755),
];

/// What to build.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Also build the ext4 root disk image (see [`root_disk`]).
    pub root_disk: bool,
}

/// A built default guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefaultGuest {
    /// The kernel, a bzImage.
    pub kernel: PathBuf,
    /// The initramfs, an uncompressed newc cpio archive.
    pub initrd: PathBuf,
    /// The base kernel command line ([`BASE_CMDLINE`]); append [`command_param`] to run a
    /// command instead of a shell.
    pub cmdline: String,
    /// The kernel release (`uname -r`), e.g. `6.1.0-48-cloud-amd64`.
    pub kernel_version: String,
}

/// Errors of building the default guest; each says what the user can do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot find a cache directory for the default guest: set VIREO_CACHE (or \
         XDG_CACHE_HOME or HOME)"
    )]
    NoCacheDir,
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "`{tool}` is not installed; the default guest is built from Debian packages and needs \
         it (package `{package}`). On hosts without apt, pass --kernel"
    )]
    ToolMissing {
        tool: &'static str,
        package: &'static str,
    },
    #[error(
        "cannot find the kernel package: `apt-cache depends {KERNEL_META_PACKAGE}` {detail}; \
         run `apt-get update` (Debian/Ubuntu hosts) or pass --kernel"
    )]
    ResolveKernel { detail: String },
    #[error(
        "`apt-get download {package}` failed: {detail}; is apt configured and the mirror \
         reachable? Try `apt-get update`"
    )]
    Download { package: String, detail: String },
    #[error("`dpkg-deb -x {deb}` failed: {detail}; is there enough space in the cache?")]
    Unpack { deb: String, detail: String },
    #[error(
        "package {package} has no {path}: its layout is not the one expected; pass --kernel \
         to use another kernel"
    )]
    PackageLayout { package: String, path: String },
    #[error("kernel module {0}; pass --kernel to use another kernel")]
    Module(String),
    #[error(transparent)]
    Command(#[from] init::CommandError),
}

type Result<T> = std::result::Result<T, Error>;

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// The cache directory: `$VIREO_CACHE`, else `$XDG_CACHE_HOME/vireo`, else
/// `$HOME/.cache/vireo` (XDG Base Directory Specification 0.8).
pub fn cache_dir() -> Result<PathBuf> {
    cache_dir_from(
        std::env::var_os("VIREO_CACHE"),
        std::env::var_os("XDG_CACHE_HOME"),
        std::env::var_os("HOME"),
    )
}

fn cache_dir_from(
    vireo: Option<OsString>,
    xdg: Option<OsString>,
    home: Option<OsString>,
) -> Result<PathBuf> {
    let set = |v: Option<OsString>| v.filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = set(vireo) {
        return Ok(dir);
    }
    // The spec: a relative XDG_CACHE_HOME is invalid and must be ignored.
    if let Some(dir) = set(xdg).filter(|d| d.is_absolute()) {
        return Ok(dir.join("vireo"));
    }
    set(home)
        .map(|h| h.join(".cache").join("vireo"))
        .ok_or(Error::NoCacheDir)
}

/// Kernel command-line parameter that makes the guest's init run `args` (a command and its
/// arguments, as given after `--` on vireo's command line) instead of a shell, then power
/// off. Each argument reaches the command unchanged (they are shell-quoted, then the whole
/// is base64-encoded as `vireo.cmd=...`); for pipes or `;` use `sh -c '...'`.
pub fn command_param(args: &[String]) -> Result<String> {
    Ok(init::command_param(args)?)
}

/// Build (first time) or verify (later) the default guest in `cache`; returns its paths.
pub fn ensure(cache: &Path, opts: &Options) -> Result<DefaultGuest> {
    let guest = ensure_kernel_and_initrd(cache)?;
    if opts.root_disk {
        rootfs::ensure_root_image(cache, &guest)?;
    }
    Ok(guest)
}

/// Give `dest` the default guest's root disk (an ext4 image of the busybox tree) unless it
/// exists: a new disk is a sparse copy of the pristine image in the cache; an existing one is
/// used as it is, so what the guest writes persists. Boot it with `root=/dev/vda` (first disk).
pub fn root_disk(cache: &Path, guest: &DefaultGuest, dest: &Path) -> Result<()> {
    rootfs::prepare_root_disk(cache, guest, dest)
}

fn ensure_kernel_and_initrd(cache: &Path) -> Result<DefaultGuest> {
    fs::create_dir_all(cache).map_err(io_err(format!(
        "creating cache directory {}",
        cache.display()
    )))?;
    let _lock = CacheLock::acquire(&cache.join(LOCK_FILE))?;
    let dest = cache.join(GUEST_DIR);
    match verify(&dest) {
        Ok(guest) => return Ok(guest),
        Err(why) => tracing::info!(dir = %dest.display(), "building the default guest: {why}"),
    }
    remove_stale_builds(cache);
    let work = cache.join(format!(
        "{BUILD_PREFIX}{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    fs::create_dir(&work).map_err(io_err(format!("creating {}", work.display())))?;
    let built = build(&work).and_then(|out| {
        if dest.exists() {
            fs::remove_dir_all(&dest).map_err(io_err(format!("removing {}", dest.display())))?;
        }
        fs::rename(&out, &dest).map_err(io_err(format!("renaming into {}", dest.display())))
    });
    if let Err(e) = fs::remove_dir_all(&work) {
        tracing::warn!(dir = %work.display(), "cannot remove build directory: {e}");
    }
    built?;
    verify(&dest).map_err(|why| Error::Io {
        context: format!("verifying the freshly built guest in {}", dest.display()),
        source: io::Error::other(why),
    })
}

/// An exclusive `flock(2)` on the cache's lock file, released when dropped (the file closes).
pub(crate) struct CacheLock(#[allow(dead_code)] File);

impl CacheLock {
    pub(crate) fn acquire(path: &Path) -> Result<Self> {
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(io_err(format!("opening lock file {}", path.display())))?;
        let lock = |op| loop {
            // SAFETY: flock(2) on a descriptor this function owns; it touches no memory.
            let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
            if rc == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        if let Err(e) = lock(libc::LOCK_EX | libc::LOCK_NB) {
            if e.kind() != io::ErrorKind::WouldBlock {
                return Err(io_err(format!("locking {}", path.display()))(e));
            }
            tracing::info!(lock = %path.display(), "waiting for another vireo building the default guest");
            lock(libc::LOCK_EX).map_err(io_err(format!("locking {}", path.display())))?;
        }
        Ok(CacheLock(file))
    }
}

/// Removes build directories left behind by a crashed build. Only called under the lock,
/// when no build can be running.
fn remove_stale_builds(cache: &Path) {
    let Ok(entries) = fs::read_dir(cache) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(BUILD_PREFIX) {
            tracing::info!(dir = %e.path().display(), "removing stale build directory");
            if let Err(err) = fs::remove_dir_all(e.path()) {
                tracing::warn!(dir = %e.path().display(), "cannot remove: {err}");
            }
        }
    }
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct FileRecord {
    size: u64,
    sha256: String,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Manifest {
    format: u32,
    recipe: String,
    kernel_package: String,
    kernel_version: String,
    kernel: FileRecord,
    initrd: FileRecord,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn record(data: &[u8]) -> FileRecord {
    FileRecord {
        size: data.len() as u64,
        sha256: hex(&Sha256::digest(data)),
    }
}

/// A digest of everything that decides the initramfs contents besides the packages: a change
/// to the init script, module list, fixed files or package names rebuilds existing caches.
fn recipe_digest() -> String {
    let mut h = Sha256::new();
    h.update(FORMAT_VERSION.to_le_bytes());
    for s in [KERNEL_META_PACKAGE, BUSYBOX_PACKAGE] {
        h.update(s.as_bytes());
        h.update([0]);
    }
    for m in VIRTIO_MODULES {
        h.update(m.as_bytes());
        h.update([0]);
    }
    h.update(init::script("@VERSION@", &["@MODULE@".to_string()], false).as_bytes());
    h.update(init::script("@VERSION@", &[], true).as_bytes());
    for (path, contents, perm) in ETC_FILES {
        h.update(format!("{path}\0{contents}\0{perm:o}\0").as_bytes());
    }
    for (path, perm) in DIRS {
        h.update(format!("{path}\0{perm:o}\0").as_bytes());
    }
    hex(&h.finalize())
}

/// Checks the guest in `dir` against its manifest; the error says why it must be rebuilt.
fn verify(dir: &Path) -> std::result::Result<DefaultGuest, String> {
    let text = fs::read(dir.join(MANIFEST)).map_err(|e| format!("no manifest ({e})"))?;
    let m: Manifest =
        serde_json::from_slice(&text).map_err(|e| format!("unreadable manifest ({e})"))?;
    if m.format != FORMAT_VERSION {
        return Err(format!("cache format {} is not {FORMAT_VERSION}", m.format));
    }
    if m.recipe != recipe_digest() {
        return Err("the initramfs recipe changed".into());
    }
    if !is_safe_version(&m.kernel_version) {
        return Err("bad kernel version in manifest".into());
    }
    let check = |name: &str, want: &FileRecord| -> std::result::Result<PathBuf, String> {
        let path = dir.join(name);
        let len = fs::metadata(&path)
            .map_err(|e| format!("{name}: {e}"))?
            .len();
        if len != want.size {
            return Err(format!("{name}: size {len}, manifest says {}", want.size));
        }
        let data = fs::read(&path).map_err(|e| format!("{name}: {e}"))?;
        if record(&data) != *want {
            return Err(format!("{name}: SHA-256 does not match the manifest"));
        }
        Ok(path)
    };
    Ok(DefaultGuest {
        kernel: check(KERNEL_FILE, &m.kernel)?,
        initrd: check(INITRD_FILE, &m.initrd)?,
        cmdline: BASE_CMDLINE.to_string(),
        kernel_version: m.kernel_version,
    })
}

/// A kernel release we are willing to put into paths and `/init`.
fn is_safe_version(v: &str) -> bool {
    !v.is_empty()
        && !v.starts_with(['-', '.'])
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-~".contains(&b))
}

/// Runs `cmd`, mapping "not installed" to [`Error::ToolMissing`]; returns the output.
fn run(
    cmd: &mut Command,
    tool: &'static str,
    package: &'static str,
) -> Result<std::process::Output> {
    tracing::debug!(?cmd, "running");
    cmd.output().map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            Error::ToolMissing { tool, package }
        } else {
            Error::Io {
                context: format!("running {tool}"),
                source: e,
            }
        }
    })
}

/// The last few lines of a tool's stderr, for an error message.
fn stderr_tail(out: &std::process::Output) -> String {
    let text = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.contains("unsandboxed"))
        .collect();
    let tail = lines[lines.len().saturating_sub(3)..].join(" / ");
    if tail.is_empty() {
        format!("exit {}", out.status)
    } else {
        tail
    }
}

/// From `apt-cache depends <meta>` output, the kernel package and its release.
fn parse_kernel_depends(output: &str) -> Option<(String, String)> {
    output.lines().find_map(|line| {
        let pkg = line.trim().strip_prefix("Depends:")?.trim();
        let version = pkg.strip_prefix("linux-image-")?;
        // A `-unsigned` package ships the same kernel release without the suffix.
        let version = version.strip_suffix("-unsigned").unwrap_or(version);
        (pkg != KERNEL_META_PACKAGE && is_safe_version(version) && !pkg.contains('<'))
            .then(|| (pkg.to_string(), version.to_string()))
    })
}

fn resolve_kernel_package() -> Result<(String, String)> {
    let out = run(
        Command::new("apt-cache").args(["depends", KERNEL_META_PACKAGE]),
        "apt-cache",
        "apt",
    )?;
    if !out.status.success() {
        return Err(Error::ResolveKernel {
            detail: format!("failed: {}", stderr_tail(&out)),
        });
    }
    parse_kernel_depends(&String::from_utf8_lossy(&out.stdout)).ok_or(Error::ResolveKernel {
        detail: "names no linux-image-<version> package".into(),
    })
}

/// `apt-get download`s `package` into `dir` and returns the `.deb`'s path.
fn download(dir: &Path, package: &str) -> Result<PathBuf> {
    let out = run(
        Command::new("apt-get")
            .args(["download", "-q", package])
            .current_dir(dir),
        "apt-get",
        "apt",
    )?;
    if !out.status.success() {
        return Err(Error::Download {
            package: package.to_string(),
            detail: stderr_tail(&out),
        });
    }
    let prefix = format!("{package}_");
    fs::read_dir(dir)
        .map_err(io_err(format!("listing {}", dir.display())))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
        .ok_or(Error::Download {
            package: package.to_string(),
            detail: "apt-get reported success but wrote no .deb".into(),
        })
}

/// `dpkg-deb -x deb dir`.
fn unpack(deb: &Path, dir: &Path) -> Result<()> {
    let out = run(
        Command::new("dpkg-deb").arg("-x").arg(deb).arg(dir),
        "dpkg-deb",
        "dpkg",
    )?;
    if !out.status.success() {
        return Err(Error::Unpack {
            deb: deb.display().to_string(),
            detail: stderr_tail(&out),
        });
    }
    Ok(())
}

/// The applet paths (`bin/sh`, `usr/bin/[`, ...) the busybox binary reports, or `None` if it
/// cannot be run on this host (then `/init` installs the links at boot).
fn busybox_applets(busybox: &Path) -> Option<Vec<String>> {
    let out = Command::new(busybox).arg("--list-full").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let applets: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    (!applets.is_empty() && applets.len() < 2000).then_some(applets)
}

/// Builds the guest in `work`; returns the output directory (`work/out`).
fn build(work: &Path) -> Result<PathBuf> {
    let (kernel_package, version) = resolve_kernel_package()?;
    tracing::info!(kernel_package, "fetching the default guest's packages");
    let debs = work.join("debs");
    let kroot = work.join("kernel");
    let broot = work.join("busybox");
    let out = work.join("out");
    for d in [&debs, &kroot, &broot, &out] {
        fs::create_dir(d).map_err(io_err(format!("creating {}", d.display())))?;
    }
    let kdeb = download(&debs, &kernel_package)?;
    let bdeb = download(&debs, BUSYBOX_PACKAGE)?;
    unpack(&kdeb, &kroot)?;
    unpack(&bdeb, &broot)?;

    // Kernel, as shipped.
    let vmlinuz = kroot.join(format!("boot/vmlinuz-{version}"));
    let kernel = fs::read(&vmlinuz).map_err(|_| Error::PackageLayout {
        package: kernel_package.clone(),
        path: format!("/boot/vmlinuz-{version}"),
    })?;

    // Modules: /lib/modules, or /usr/lib/modules on merged-/usr packages.
    let moddir = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| kroot.join(d).join(&version))
        .find(|d| d.is_dir())
        .ok_or(Error::PackageLayout {
            package: kernel_package.clone(),
            path: format!("/lib/modules/{version}"),
        })?;
    let index = modules::ModuleIndex::scan(&moddir)
        .map_err(io_err(format!("scanning modules in {}", moddir.display())))?;
    let resolved = modules::resolve(&index, VIRTIO_MODULES, |rel| fs::read(moddir.join(rel)))
        .map_err(|e| Error::Module(e.to_string()))?;
    if !resolved.missing.is_empty() {
        tracing::warn!(missing = ?resolved.missing, "kernel has neither module nor built-in");
    }
    if !resolved.cycles.is_empty() {
        tracing::warn!(cycles = ?resolved.cycles, "module dependency cycle broken");
    }
    tracing::debug!(builtin = ?resolved.builtin, "built-in modules");

    // Busybox.
    let busybox_path = broot.join("bin/busybox");
    let busybox = fs::read(&busybox_path).map_err(|_| Error::PackageLayout {
        package: BUSYBOX_PACKAGE.into(),
        path: "/bin/busybox".into(),
    })?;
    let applets = busybox_applets(&busybox_path);
    if applets.is_none() {
        tracing::warn!(
            "cannot run busybox on the host; the guest will install its applets at boot"
        );
    }

    let mut module_files = Vec::new();
    for m in &resolved.modules {
        let data =
            fs::read(moddir.join(&m.path)).map_err(io_err(format!("reading module {}", m.path)))?;
        module_files.push((m.path.clone(), data));
    }
    let tree = initramfs_tree(
        &version,
        busybox,
        applets.as_deref(),
        &module_files,
        &modules::modules_dep(&resolved.modules),
    )?;
    let initrd = tree
        .write_newc(Vec::new())
        .map_err(io_err("writing the initramfs"))?;

    let manifest = Manifest {
        format: FORMAT_VERSION,
        recipe: recipe_digest(),
        kernel_package,
        kernel_version: version,
        kernel: record(&kernel),
        initrd: record(&initrd),
    };
    let write = |name: &str, data: &[u8]| {
        let p = out.join(name);
        fs::write(&p, data).map_err(io_err(format!("writing {}", p.display())))
    };
    write(KERNEL_FILE, &kernel)?;
    write(INITRD_FILE, &initrd)?;
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::Io {
        context: "encoding the manifest".into(),
        source: io::Error::other(e),
    })?;
    write(MANIFEST, &json)?;
    Ok(out)
}

/// The initramfs contents. `modules` are `(path relative to /lib/modules/<version>, image)`
/// in load order; `applets` are busybox's `--list-full` paths (`None`: install at boot).
fn initramfs_tree(
    version: &str,
    busybox: Vec<u8>,
    applets: Option<&[String]>,
    modules: &[(String, Vec<u8>)],
    modules_dep: &str,
) -> Result<cpio::Tree> {
    use cpio::Node;
    let bad = |e: cpio::InvalidPath| Error::Module(e.to_string());
    let mut t = cpio::Tree::new();
    for (path, perm) in DIRS {
        t.add(path, Node::Dir, *perm).map_err(bad)?;
    }
    for applet in applets.unwrap_or_default() {
        // Skip odd names rather than fail: they are only convenience links.
        if applet != "bin/busybox" && t.get(applet).is_none() {
            if let Err(e) = t.add(applet, Node::Symlink("/bin/busybox".into()), 0o777) {
                tracing::warn!("skipping busybox applet: {e}");
            }
        }
    }
    t.add("bin/busybox", Node::File(busybox), 0o755)
        .map_err(bad)?;
    // The kernel opens /dev/console for init's stdio before devtmpfs is mounted.
    t.add("dev/console", Node::CharDev { major: 5, minor: 1 }, 0o600)
        .map_err(bad)?;
    t.add("dev/null", Node::CharDev { major: 1, minor: 3 }, 0o666)
        .map_err(bad)?;
    for (path, contents, perm) in ETC_FILES {
        t.add(path, Node::File(contents.as_bytes().to_vec()), *perm)
            .map_err(bad)?;
    }
    let moddir = format!("lib/modules/{version}");
    t.add(&moddir, Node::Dir, 0o755).map_err(bad)?;
    for (path, image) in modules {
        t.add(
            &format!("{moddir}/{path}"),
            Node::File(image.clone()),
            0o644,
        )
        .map_err(bad)?;
    }
    t.add(
        &format!("{moddir}/modules.dep"),
        Node::File(modules_dep.as_bytes().to_vec()),
        0o644,
    )
    .map_err(bad)?;
    let paths: Vec<String> = modules.iter().map(|(p, _)| p.clone()).collect();
    let script = init::script(version, &paths, applets.is_none());
    t.add("init", Node::File(script.into_bytes()), 0o755)
        .map_err(bad)?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(s: &str) -> Option<OsString> {
        Some(OsString::from(s))
    }

    #[test]
    fn cache_dir_resolution_order() {
        assert_eq!(
            cache_dir_from(os("/v"), os("/x"), os("/h")).unwrap(),
            PathBuf::from("/v")
        );
        assert_eq!(
            cache_dir_from(None, os("/x"), os("/h")).unwrap(),
            PathBuf::from("/x/vireo")
        );
        assert_eq!(
            cache_dir_from(os(""), os(""), os("/h")).unwrap(),
            PathBuf::from("/h/.cache/vireo"),
            "empty variables count as unset"
        );
        assert_eq!(
            cache_dir_from(None, os("rel/cache"), os("/h")).unwrap(),
            PathBuf::from("/h/.cache/vireo"),
            "relative XDG_CACHE_HOME is ignored"
        );
        assert!(matches!(
            cache_dir_from(None, None, None),
            Err(Error::NoCacheDir)
        ));
    }

    #[test]
    fn parses_apt_cache_depends() {
        let out = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-48-cloud-amd64\n";
        assert_eq!(
            parse_kernel_depends(out),
            Some((
                "linux-image-6.1.0-48-cloud-amd64".into(),
                "6.1.0-48-cloud-amd64".into()
            ))
        );
        let unsigned = "x\n  Depends: linux-image-6.1.0-9-cloud-amd64-unsigned\n";
        assert_eq!(
            parse_kernel_depends(unsigned).unwrap().1,
            "6.1.0-9-cloud-amd64"
        );
        assert_eq!(
            parse_kernel_depends("x\n  Depends: <linux-image-x>\n"),
            None
        );
        assert_eq!(
            parse_kernel_depends("x\n  Depends: linux-image-$(id)\n"),
            None
        );
        assert_eq!(
            parse_kernel_depends("x\n  Recommends: linux-image-6.1\n"),
            None
        );
        assert_eq!(parse_kernel_depends(""), None);
    }

    #[test]
    fn safe_versions() {
        assert!(is_safe_version("6.1.0-48-cloud-amd64"));
        assert!(is_safe_version("6.8.0-1012+rt~1"));
        for bad in ["", "-x", "../x", "a b", "a/b", "a;b", "a\nb"] {
            assert!(!is_safe_version(bad), "{bad:?}");
        }
    }

    #[test]
    fn recipe_digest_is_stable_hex() {
        let d = recipe_digest();
        assert_eq!(d.len(), 64);
        assert!(d.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(d, recipe_digest());
    }

    #[test]
    fn command_param_error_is_user_readable() {
        let e = command_param(&[]).unwrap_err();
        assert!(e.to_string().contains("no command"), "{e}");
    }

    fn tree() -> cpio::Tree {
        let modules = vec![
            (
                "kernel/drivers/virtio/virtio.ko".to_string(),
                modules::tests::tiny_module(b"depends=\0name=virtio\0"),
            ),
            (
                "kernel/drivers/virtio/virtio_pci.ko".to_string(),
                modules::tests::tiny_module(b"depends=virtio\0name=virtio_pci\0"),
            ),
        ];
        let applets = vec![
            "bin/sh".to_string(),
            "sbin/poweroff".to_string(),
            "usr/bin/[".to_string(),
            "../escape".to_string(),
        ];
        initramfs_tree(
            "6.1.0-48-cloud-amd64",
            b"BUSYBOX".to_vec(),
            Some(&applets),
            &modules,
            "dep\n",
        )
        .unwrap()
    }

    #[test]
    fn initramfs_has_what_init_needs() {
        use cpio::Node;
        let t = tree();
        let file = |p: &str| match &t.get(p).unwrap().node {
            Node::File(d) => String::from_utf8_lossy(d).into_owned(),
            other => panic!("{p}: {other:?}"),
        };
        assert_eq!(file("bin/busybox"), "BUSYBOX");
        assert_eq!(t.get("bin/busybox").unwrap().perm, 0o755);
        assert_eq!(
            t.get("bin/sh").unwrap().node,
            Node::Symlink("/bin/busybox".into())
        );
        assert!(t.get("usr/bin/[").is_some());
        assert!(t.iter().all(|(p, _)| !p.contains("..")));
        assert_eq!(
            t.get("dev/console").unwrap().node,
            Node::CharDev { major: 5, minor: 1 }
        );
        assert_eq!(file("etc/hostname"), "vireo\n");
        assert!(file("etc/passwd").starts_with("root:x:0:0:"));
        assert_eq!(t.get("tmp").unwrap().perm, 0o1777);
        assert_eq!(
            file("lib/modules/6.1.0-48-cloud-amd64/modules.dep"),
            "dep\n"
        );
        let init = file("init");
        assert_eq!(t.get("init").unwrap().perm, 0o755);
        let a = init.find("kernel/drivers/virtio/virtio.ko").unwrap();
        let b = init.find("kernel/drivers/virtio/virtio_pci.ko").unwrap();
        assert!(a < b, "virtio loads before virtio_pci");
        assert!(!init.contains("--install"));
        // The module images are in the archive where /init looks for them.
        let bytes = t.write_newc(Vec::new()).unwrap();
        let parsed = cpio::parse_newc(&bytes).unwrap();
        let (_, e) = parsed
            .iter()
            .find(|(p, _)| {
                p == "lib/modules/6.1.0-48-cloud-amd64/kernel/drivers/virtio/virtio_pci.ko"
            })
            .unwrap();
        let Node::File(image) = &e.node else { panic!() };
        let info = modules::parse_modinfo(image).unwrap();
        assert_eq!(info.depends, ["virtio"]);
    }

    #[test]
    fn initramfs_without_applet_list_installs_at_boot() {
        let t = initramfs_tree("v1", b"BB".to_vec(), None, &[], "").unwrap();
        let cpio::Node::File(init) = &t.get("init").unwrap().node else {
            panic!()
        };
        assert!(String::from_utf8_lossy(init).contains("/bin/busybox --install -s"));
        assert!(t.get("bin/sh").is_none());
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vireo-dg-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    /// A hand-made cache entry verifies; each kind of damage is detected.
    #[test]
    fn verify_detects_damage() {
        let dir = scratch("verify");
        let kernel = b"kernel bytes".to_vec();
        let initrd = b"initrd bytes".to_vec();
        let manifest = |recipe: String, format: u32| Manifest {
            format,
            recipe,
            kernel_package: "linux-image-v1".into(),
            kernel_version: "v1".into(),
            kernel: record(&kernel),
            initrd: record(&initrd),
        };
        let write_all = |m: &Manifest| {
            fs::write(dir.join(KERNEL_FILE), &kernel).unwrap();
            fs::write(dir.join(INITRD_FILE), &initrd).unwrap();
            fs::write(dir.join(MANIFEST), serde_json::to_vec(m).unwrap()).unwrap();
        };
        let good = manifest(recipe_digest(), FORMAT_VERSION);
        write_all(&good);
        let g = verify(&dir).unwrap();
        assert_eq!(g.kernel, dir.join(KERNEL_FILE));
        assert_eq!(g.initrd, dir.join(INITRD_FILE));
        assert_eq!(g.kernel_version, "v1");
        assert_eq!(g.cmdline, BASE_CMDLINE);

        // Same size, different content.
        fs::write(dir.join(INITRD_FILE), b"initrd bytez").unwrap();
        assert!(verify(&dir).unwrap_err().contains("SHA-256"));
        // Truncated.
        fs::write(dir.join(INITRD_FILE), b"initrd").unwrap();
        assert!(verify(&dir).unwrap_err().contains("size"));
        // Missing file.
        write_all(&good);
        fs::remove_file(dir.join(KERNEL_FILE)).unwrap();
        assert!(verify(&dir).unwrap_err().contains(KERNEL_FILE));
        // Old format or recipe.
        write_all(&manifest(recipe_digest(), FORMAT_VERSION + 1));
        assert!(verify(&dir).unwrap_err().contains("format"));
        write_all(&manifest("0".repeat(64), FORMAT_VERSION));
        assert!(verify(&dir).unwrap_err().contains("recipe"));
        // Garbage manifest.
        fs::write(dir.join(MANIFEST), b"{not json").unwrap();
        assert!(verify(&dir).unwrap_err().contains("manifest"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn lock_serialises_holders() {
        let dir = scratch("lock");
        let path = dir.join("l");
        let held = CacheLock::acquire(&path).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let p2 = path.clone();
        let t = std::thread::spawn(move || {
            let _l = CacheLock::acquire(&p2).unwrap();
            tx.send(()).unwrap();
        });
        // flock locks belong to the open file description, so a second open in the same
        // process blocks like another process would.
        assert!(rx
            .recv_timeout(std::time::Duration::from_millis(200))
            .is_err());
        drop(held);
        rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        t.join().unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stale_builds_are_removed() {
        let dir = scratch("stale");
        fs::create_dir_all(dir.join(".build-1-2/out")).unwrap();
        fs::create_dir_all(dir.join(GUEST_DIR)).unwrap();
        remove_stale_builds(&dir);
        assert!(!dir.join(".build-1-2").exists());
        assert!(dir.join(GUEST_DIR).exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
