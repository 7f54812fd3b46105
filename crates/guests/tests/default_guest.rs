//! Building the default guest for real: needs apt and Debian's mirror (skips without them);
//! the boot check also needs `qemu-system-x86_64` (skips without it).

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vireo_guests::default_guest::{
    self, command_param, cpio, modules, DefaultGuest, Error, Options, EXIT_STATUS_PREFIX,
    READY_LINE, VIRTIO_MODULES,
};

fn temp_cache(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vireo-dg-it-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    d
}

/// `ensure`, or `None` (with a message) when the host cannot fetch Debian packages.
fn ensure_or_skip(cache: &Path) -> Option<DefaultGuest> {
    match default_guest::ensure(cache, &Options::default()) {
        Ok(g) => Some(g),
        Err(
            e @ (Error::ToolMissing { .. } | Error::ResolveKernel { .. } | Error::Download { .. }),
        ) => {
            let _ = std::io::Write::write_fmt(
                &mut std::io::stderr(),
                format_args!("SKIP: cannot fetch the default guest's packages here: {e}\n"),
            );
            let _ = fs::remove_dir_all(cache);
            None
        }
        Err(e) => panic!("ensure failed: {e}"),
    }
}

fn initrd_files(g: &DefaultGuest) -> BTreeMap<String, cpio::Entry> {
    let bytes = fs::read(&g.initrd).unwrap();
    cpio::parse_newc(&bytes).unwrap().into_iter().collect()
}

fn file<'a>(files: &'a BTreeMap<String, cpio::Entry>, path: &str) -> &'a [u8] {
    match &files
        .get(path)
        .unwrap_or_else(|| panic!("{path} missing"))
        .node
    {
        cpio::Node::File(d) => d,
        other => panic!("{path} is {other:?}"),
    }
}

#[test]
fn ensure_builds_then_verifies_then_rebuilds_damage() {
    let cache = temp_cache("cycle");
    let t0 = Instant::now();
    let Some(g) = ensure_or_skip(&cache) else {
        return;
    };
    eprintln!("first build: {:?}", t0.elapsed());

    // The kernel is a bzImage (Linux boot protocol: "HdrS" at 0x202).
    let kernel = fs::read(&g.kernel).unwrap();
    assert_eq!(&kernel[0x202..0x206], b"HdrS");
    assert!(g.cmdline.contains("console=ttyS0"));
    assert!(g.kernel_version.starts_with(|c: char| c.is_ascii_digit()));

    // The initramfs has busybox, init, and every wanted module that is not built in.
    let files = initrd_files(&g);
    assert!(file(&files, "bin/busybox").starts_with(b"\x7fELF"));
    assert!(matches!(
        files["bin/sh"].node,
        cpio::Node::Symlink(ref t) if t == "/bin/busybox"
    ));
    let init = String::from_utf8(file(&files, "init").to_vec()).unwrap();
    assert!(init.contains(READY_LINE));
    let moddir = format!("lib/modules/{}", g.kernel_version);
    let dep = String::from_utf8(file(&files, &format!("{moddir}/modules.dep")).to_vec()).unwrap();
    let mut by_name = BTreeMap::new();
    for line in dep.lines() {
        let (path, _) = line.split_once(':').unwrap();
        let image = file(&files, &format!("{moddir}/{path}"));
        let info = modules::parse_modinfo(image).unwrap();
        let name = info.name.clone().unwrap();
        // Every dependency is in the archive and loads earlier in /init.
        for d in &info.depends {
            let dpath = dep
                .lines()
                .map(|l| l.split_once(':').unwrap().0)
                .find(|p| modules::normalize(p).ends_with(&format!("/{d}.ko")))
                .unwrap_or_else(|| panic!("{name} needs {d}, not in initramfs"));
            assert!(init.find(dpath).unwrap() < init.find(path).unwrap());
        }
        by_name.insert(name, info);
    }
    for m in VIRTIO_MODULES {
        assert!(by_name.contains_key(*m), "{m} missing from the initramfs");
    }
    assert!(by_name["virtio_pci"]
        .depends
        .contains(&"virtio_ring".to_string()));
    compare_with_depmod(&files, &moddir, &g.kernel_version, &dep);

    // Second call: only verifies (no rebuild, so the files are the same inodes), quickly.
    let ino = fs::metadata(&g.initrd).unwrap().ino();
    let t1 = Instant::now();
    let g2 = default_guest::ensure(&cache, &Options::default()).unwrap();
    let verify_time = t1.elapsed();
    eprintln!("verify: {verify_time:?}");
    assert_eq!(g2, g);
    assert_eq!(
        fs::metadata(&g.initrd).unwrap().ino(),
        ino,
        "rebuilt needlessly"
    );
    assert!(verify_time < Duration::from_secs(5), "{verify_time:?}");

    // A damaged initrd (same size) is rebuilt.
    let mut bytes = fs::read(&g.initrd).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&g.initrd, &bytes).unwrap();
    let g3 = default_guest::ensure(&cache, &Options::default()).unwrap();
    assert_eq!(g3, g);
    assert_ne!(fs::metadata(&g.initrd).unwrap().ino(), ino, "not rebuilt");
    assert_ne!(fs::read(&g3.initrd).unwrap(), bytes);
    assert_eq!(initrd_files(&g3).len(), files.len());

    // No build directories are left behind.
    let leftovers: Vec<_> = fs::read_dir(&cache)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".build"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    fs::remove_dir_all(&cache).unwrap();
}

/// Our `modules.dep` says what the host's `depmod` (kmod) says about the same modules.
fn compare_with_depmod(
    files: &BTreeMap<String, cpio::Entry>,
    moddir: &str,
    version: &str,
    ours: &str,
) {
    let root = temp_cache("depmod");
    for (path, e) in files {
        if let (Some(rel), cpio::Node::File(data)) = (path.strip_prefix(moddir), &e.node) {
            if rel.ends_with(".ko") {
                let p = root.join(format!("lib/modules/{version}{rel}"));
                fs::create_dir_all(p.parent().unwrap()).unwrap();
                fs::write(p, data).unwrap();
            }
        }
    }
    let depmod = ["/usr/sbin/depmod", "/sbin/depmod", "depmod"]
        .into_iter()
        .find_map(|d| {
            Command::new(d)
                .arg("-b")
                .arg(&root)
                .arg(version)
                .output()
                .ok()
        });
    let Some(out) = depmod else {
        eprintln!("not comparing with depmod: not installed");
        return;
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs = fs::read_to_string(root.join(format!("lib/modules/{version}/modules.dep")));
    fs::remove_dir_all(&root).unwrap();
    let sorted = |s: &str| {
        let mut v: Vec<String> = s.lines().map(String::from).collect();
        v.sort();
        v
    };
    assert_eq!(sorted(ours), sorted(&theirs.unwrap()));
}

#[test]
fn concurrent_callers_share_one_build() {
    let cache = temp_cache("concurrent");
    let handles: Vec<_> = (0..3)
        .map(|_| {
            let c = cache.clone();
            std::thread::spawn(move || ensure_or_skip(&c))
        })
        .collect();
    let results: Vec<Option<DefaultGuest>> =
        handles.into_iter().map(|h| h.join().unwrap()).collect();
    if results.iter().any(Option::is_none) {
        let _ = fs::remove_dir_all(&cache);
        return;
    }
    let first = results[0].clone().unwrap();
    for r in &results {
        assert_eq!(r.as_ref(), Some(&first));
    }
    fs::remove_dir_all(&cache).unwrap();
}

/// Boots the kernel and initramfs under QEMU TCG and runs a command through `vireo.cmd=`:
/// init must come up, load every module without an error line, run the command with its
/// arguments intact, report its exit status and power the machine off.
#[test]
fn boots_under_qemu_and_runs_the_command() {
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        let _ = std::io::Write::write_fmt(
            &mut std::io::stderr(),
            format_args!("SKIP: qemu-system-x86_64 not installed\n"),
        );
        return;
    }
    let cache = temp_cache("qemu");
    let Some(g) = ensure_or_skip(&cache) else {
        return;
    };
    let args: Vec<String> = [
        "sh",
        "-c",
        "echo \"arg=[$0]\"; lsmod | cut -d' ' -f1 | sort | tr '\\n' ' '; echo; \
         hostname; modprobe virtio_blk && echo modprobe-ok; exit 7",
        "two words",
    ]
    .map(String::from)
    .to_vec();
    let append = format!("{} {}", g.cmdline, command_param(&args).unwrap());
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-M", "pc", "-accel", "tcg", "-m", "256", "-smp", "1"])
        .args([
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(&g.kernel)
        .arg("-initrd")
        .arg(&g.initrd)
        .arg("-append")
        .arg(&append)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("guest did not power off within 300 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    eprintln!("--- guest console ---\n{out}\n---");
    assert!(status.success(), "qemu: {status}");
    assert!(out.contains(READY_LINE), "init never got ready");
    assert!(!out.contains("insmod"), "a module failed to load");
    assert!(out.contains("arg=[two words]"));
    assert!(
        out.contains("\nvireo\r\n") || out.contains("\nvireo\n"),
        "hostname"
    );
    assert!(out.contains("modprobe-ok"));
    for m in [
        "virtio_pci",
        "virtio_net",
        "virtio_blk",
        "vmw_vsock_virtio_transport",
    ] {
        assert!(out.contains(&format!("{m} ")), "{m} not loaded");
    }
    assert!(out.contains(&format!("{EXIT_STATUS_PREFIX}7")));
    fs::remove_dir_all(&cache).unwrap();
}
