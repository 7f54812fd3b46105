//! Kernel modules: reading `.modinfo` from a `.ko`, finding modules in an unpacked kernel
//! package, ordering them so each loads after its dependencies, and writing `modules.dep`.
//!
//! A `.ko` is an ELF64 relocatable object (System V gABI, "Sections"); its `.modinfo` section
//! holds NUL-separated `key=value` strings written by `MODULE_INFO()`, among them
//! `depends=a,b,c` (filled in by `modpost`) and `name=`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Why a module's `.modinfo` could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModinfoError {
    #[error("not an ELF file")]
    NotElf,
    #[error("unsupported ELF: {0} (only 64-bit little-endian modules are handled)")]
    Unsupported(&'static str),
    #[error("truncated or malformed ELF: {0}")]
    Malformed(&'static str),
    #[error("no .modinfo section")]
    NoModinfo,
}

/// The fields of `.modinfo` that module loading needs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ModInfo {
    /// `name=`: the module name (absent in very old modules).
    pub name: Option<String>,
    /// `depends=`: modules that must be loaded first, normalised (`-` → `_`).
    pub depends: Vec<String>,
}

/// The module name as the kernel spells it: `-` and `_` are the same, `_` is canonical.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

fn read_u16(b: &[u8], off: usize) -> Result<u16, ModinfoError> {
    b.get(off..off + 2)
        .and_then(|s| s.try_into().ok())
        .map(u16::from_le_bytes)
        .ok_or(ModinfoError::Malformed("header out of bounds"))
}

fn read_u32(b: &[u8], off: usize) -> Result<u32, ModinfoError> {
    b.get(off..off + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or(ModinfoError::Malformed("header out of bounds"))
}

fn read_u64(b: &[u8], off: usize) -> Result<u64, ModinfoError> {
    b.get(off..off + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or(ModinfoError::Malformed("header out of bounds"))
}

/// `e_ident` constants (gABI "ELF Identification").
const EI_CLASS: usize = 4;
const EI_DATA: usize = 5;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
/// Special section indices (gABI "Special Section Indexes").
const SHN_UNDEF: u16 = 0;
const SHN_XINDEX: u16 = 0xffff;
/// `sh_type` of a section without file contents.
const SHT_NOBITS: u32 = 8;

/// One ELF64 section header (`Elf64_Shdr`), the fields used here.
struct Shdr {
    name: u32,
    kind: u32,
    link: u32,
    offset: u64,
    size: u64,
}

/// Returns the bytes of the section called `wanted` in an ELF64 little-endian file.
fn find_section<'a>(elf: &'a [u8], wanted: &str) -> Result<Option<&'a [u8]>, ModinfoError> {
    if elf.get(..4) != Some(b"\x7fELF") {
        return Err(ModinfoError::NotElf);
    }
    if elf.get(EI_CLASS) != Some(&ELFCLASS64) {
        return Err(ModinfoError::Unsupported("not ELFCLASS64"));
    }
    if elf.get(EI_DATA) != Some(&ELFDATA2LSB) {
        return Err(ModinfoError::Unsupported("not ELFDATA2LSB"));
    }
    // Elf64_Ehdr: e_shoff @0x28, e_shentsize @0x3a, e_shnum @0x3c, e_shstrndx @0x3e.
    let shoff = read_u64(elf, 0x28)?;
    let shentsize = read_u16(elf, 0x3a)? as usize;
    if shentsize < 64 {
        return Err(ModinfoError::Malformed(
            "e_shentsize below sizeof(Elf64_Shdr)",
        ));
    }
    let shoff = usize::try_from(shoff).map_err(|_| ModinfoError::Malformed("e_shoff"))?;
    let shdr = |i: usize| -> Result<Shdr, ModinfoError> {
        let base = i
            .checked_mul(shentsize)
            .and_then(|o| o.checked_add(shoff))
            .ok_or(ModinfoError::Malformed("section header offset overflows"))?;
        Ok(Shdr {
            name: read_u32(elf, base)?,
            kind: read_u32(elf, base + 4)?,
            link: read_u32(elf, base + 0x28)?,
            offset: read_u64(elf, base + 0x18)?,
            size: read_u64(elf, base + 0x20)?,
        })
    };
    // With 0xff00 sections or more the real counts live in section header 0.
    let mut shnum = read_u16(elf, 0x3c)? as usize;
    let mut shstrndx = read_u16(elf, 0x3e)? as usize;
    if shoff == 0 {
        return Ok(None);
    }
    if shnum == SHN_UNDEF as usize {
        shnum = usize::try_from(shdr(0)?.size).map_err(|_| ModinfoError::Malformed("shnum"))?;
    }
    if shstrndx == SHN_XINDEX as usize {
        shstrndx = shdr(0)?.link as usize;
    }
    // Every header must lie inside the file, which also bounds the loop below.
    let table_len = shnum
        .checked_mul(shentsize)
        .and_then(|l| l.checked_add(shoff))
        .ok_or(ModinfoError::Malformed("section table overflows"))?;
    if table_len > elf.len() || shstrndx >= shnum {
        return Err(ModinfoError::Malformed("section table out of bounds"));
    }
    let contents = |h: &Shdr| -> Result<&'a [u8], ModinfoError> {
        if h.kind == SHT_NOBITS {
            return Ok(&[]);
        }
        let start = usize::try_from(h.offset).map_err(|_| ModinfoError::Malformed("sh_offset"))?;
        let len = usize::try_from(h.size).map_err(|_| ModinfoError::Malformed("sh_size"))?;
        start
            .checked_add(len)
            .and_then(|end| elf.get(start..end))
            .ok_or(ModinfoError::Malformed("section out of bounds"))
    };
    let strtab = contents(&shdr(shstrndx)?)?;
    for i in 0..shnum {
        let h = shdr(i)?;
        let name = strtab
            .get(h.name as usize..)
            .and_then(|s| s.split(|&b| b == 0).next())
            .ok_or(ModinfoError::Malformed("sh_name out of bounds"))?;
        if name == wanted.as_bytes() {
            return contents(&h).map(Some);
        }
    }
    Ok(None)
}

/// Parses the `.modinfo` section of a module image (`.ko`, uncompressed).
pub fn parse_modinfo(elf: &[u8]) -> Result<ModInfo, ModinfoError> {
    let section = find_section(elf, ".modinfo")?.ok_or(ModinfoError::NoModinfo)?;
    let mut info = ModInfo::default();
    for field in section.split(|&b| b == 0) {
        let Ok(field) = std::str::from_utf8(field) else {
            continue; // descriptions may be in any encoding; we need only ASCII keys
        };
        if let Some(v) = field.strip_prefix("depends=") {
            info.depends = v
                .split(',')
                .filter(|d| !d.is_empty())
                .map(normalize)
                .collect();
        } else if let Some(v) = field.strip_prefix("name=") {
            info.name = Some(normalize(v));
        }
    }
    Ok(info)
}

/// The modules shipped in a kernel package's `lib/modules/<version>/` directory.
#[derive(Debug, Default)]
pub struct ModuleIndex {
    /// Module name → path relative to the version directory (`kernel/drivers/...ko`).
    files: BTreeMap<String, String>,
    /// Names from `modules.builtin`: compiled into the kernel, no file to load.
    builtin: BTreeSet<String>,
}

/// Characters allowed in a module path we put into `/init` and `modules.dep`.
fn is_safe_path(p: &str) -> bool {
    !p.is_empty()
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-+/,".contains(&b))
}

/// `kernel/drivers/char/hw_random/virtio-rng.ko` → `virtio_rng`.
fn name_from_path(rel: &str) -> Option<String> {
    let file = rel.rsplit('/').next()?;
    file.strip_suffix(".ko").map(normalize)
}

impl ModuleIndex {
    /// Scans `moddir` (= `<root>/lib/modules/<version>`): every `*.ko` under `kernel/`
    /// (symlinks are not followed) and the names listed in `modules.builtin`.
    pub fn scan(moddir: &Path) -> std::io::Result<Self> {
        let mut index = ModuleIndex::default();
        let mut stack = vec![PathBuf::from("kernel")];
        while let Some(rel_dir) = stack.pop() {
            let mut entries: Vec<_> =
                std::fs::read_dir(moddir.join(&rel_dir))?.collect::<Result<_, _>>()?;
            entries.sort_by_key(|e| e.file_name());
            for e in entries {
                let rel = rel_dir.join(e.file_name());
                let ft = e.file_type()?;
                if ft.is_dir() {
                    stack.push(rel);
                } else if ft.is_file() {
                    let Some(rel) = rel.to_str() else { continue };
                    index.add_file(rel);
                }
            }
        }
        match std::fs::read_to_string(moddir.join("modules.builtin")) {
            Ok(s) => {
                for line in s.lines() {
                    if let Some(n) = name_from_path(line.trim()) {
                        index.builtin.insert(n);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(index)
    }

    /// Records a module file at `rel` (relative to the version directory).
    pub fn add_file(&mut self, rel: &str) {
        let Some(name) = name_from_path(rel) else {
            return; // not a module (or a compressed one, which this kernel does not ship)
        };
        if !is_safe_path(rel) {
            tracing::warn!(
                path = rel,
                "skipping module with unusual characters in its path"
            );
            return;
        }
        if let Some(prev) = self.files.get(&name) {
            tracing::warn!(
                module = name,
                kept = prev,
                ignored = rel,
                "duplicate module name"
            );
            return;
        }
        self.files.insert(name, rel.to_string());
    }

    /// Records a module that is built into the kernel.
    pub fn add_builtin(&mut self, name: &str) {
        self.builtin.insert(normalize(name));
    }

    /// Path of module `name` relative to the version directory, if it is a file.
    pub fn path(&self, name: &str) -> Option<&str> {
        self.files.get(&normalize(name)).map(String::as_str)
    }

    /// Whether `name` is compiled into the kernel.
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&normalize(name))
    }
}

/// One module to put into the initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    pub name: String,
    /// Path relative to `lib/modules/<version>/`.
    pub path: String,
    /// Direct dependencies that are files (built-in ones dropped).
    pub depends: Vec<String>,
}

/// The closure of a set of wanted modules.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    /// Modules in load order: each after everything it depends on.
    pub modules: Vec<Module>,
    /// Wanted or depended-on names that are built into the kernel.
    pub builtin: Vec<String>,
    /// Names that are neither a file nor built in (the kernel lacks them).
    pub missing: Vec<String>,
    /// Dependency edges dropped to break cycles, `(module, dependency)`.
    pub cycles: Vec<(String, String)>,
}

/// Finds `wanted` and everything they depend on in `index`, reading each module's
/// `.modinfo` through `read` (given the path relative to the version directory), and orders
/// the result for loading.
pub fn resolve<E>(
    index: &ModuleIndex,
    wanted: &[&str],
    mut read: impl FnMut(&str) -> Result<Vec<u8>, E>,
) -> Result<Resolved, ResolveError<E>> {
    let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut out = Resolved::default();
    let roots: Vec<String> = wanted.iter().map(|w| normalize(w)).collect();
    let mut queue: Vec<String> = roots.iter().rev().cloned().collect();
    let mut seen = BTreeSet::new();
    while let Some(name) = queue.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        let Some(path) = index.path(&name) else {
            if index.is_builtin(&name) {
                out.builtin.push(name);
            } else {
                out.missing.push(name);
            }
            continue;
        };
        let image = read(path).map_err(|source| ResolveError::Read {
            path: path.to_string(),
            source,
        })?;
        let info = parse_modinfo(&image).map_err(|source| ResolveError::Modinfo {
            path: path.to_string(),
            source,
        })?;
        queue.extend(info.depends.iter().rev().cloned());
        deps.insert(name, info.depends);
    }
    // Keep only dependencies we will load; built-in ones are already there.
    for d in deps.values_mut() {
        d.retain(|n| index.path(n).is_some());
    }
    let (order, cycles) = topo_order(&roots, &deps);
    out.cycles = cycles;
    for name in order {
        let depends = deps.get(&name).cloned().unwrap_or_default();
        if let Some(path) = index.path(&name) {
            out.modules.push(Module {
                path: path.to_string(),
                name,
                depends,
            });
        }
    }
    Ok(out)
}

/// Why module resolution failed.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError<E> {
    #[error("reading module {path}: {source}")]
    Read { path: String, source: E },
    #[error("module {path}: {source}")]
    Modinfo { path: String, source: ModinfoError },
}

/// Orders the nodes reachable from `roots` so that every node comes after its dependencies
/// (depth-first post-order, iterative). Nodes missing from `deps` are left out. An edge that
/// closes a cycle is dropped and reported instead of looping; the result still lists every
/// reachable node exactly once.
pub fn topo_order(
    roots: &[String],
    deps: &BTreeMap<String, Vec<String>>,
) -> (Vec<String>, Vec<(String, String)>) {
    #[derive(Clone, Copy, PartialEq)]
    enum State {
        OnStack,
        Done,
    }
    let mut state: BTreeMap<&str, State> = BTreeMap::new();
    let mut order = Vec::new();
    let mut cycles = Vec::new();
    for root in roots {
        if !deps.contains_key(root) || state.contains_key(root.as_str()) {
            continue;
        }
        // (node, index of the next dependency to visit)
        let mut stack: Vec<(&str, usize)> = vec![(root.as_str(), 0)];
        state.insert(root.as_str(), State::OnStack);
        while let Some((node, next)) = stack.pop() {
            let node_deps = deps.get(node).map(Vec::as_slice).unwrap_or(&[]);
            match node_deps.get(next) {
                None => {
                    state.insert(node, State::Done);
                    order.push(node.to_string());
                }
                Some(dep) => {
                    stack.push((node, next + 1));
                    if !deps.contains_key(dep) {
                        continue;
                    }
                    match state.get(dep.as_str()) {
                        None => {
                            state.insert(dep.as_str(), State::OnStack);
                            stack.push((dep.as_str(), 0));
                        }
                        Some(State::OnStack) => cycles.push((node.to_string(), dep.clone())),
                        Some(State::Done) => {}
                    }
                }
            }
        }
    }
    (order, cycles)
}

/// `modules.dep` in depmod's format for `modules` (in load order): one line per module,
/// `path: dep-path ...`, listing all transitive dependencies such that each comes before the
/// ones it needs itself; modprobe loads the list from the end.
pub fn modules_dep(modules: &[Module]) -> String {
    let pos: BTreeMap<&str, usize> = modules
        .iter()
        .enumerate()
        .map(|(i, m)| (m.name.as_str(), i))
        .collect();
    let mut out = String::new();
    for (own, m) in modules.iter().enumerate() {
        // Transitive closure over the load-ordered list.
        let mut closure = BTreeSet::new();
        let mut work: Vec<&str> = m.depends.iter().map(String::as_str).collect();
        while let Some(d) = work.pop() {
            let Some(&i) = pos.get(d) else { continue };
            if i == own || !closure.insert(i) {
                continue;
            }
            work.extend(modules[i].depends.iter().map(String::as_str));
        }
        out.push_str(&m.path);
        out.push(':');
        for &i in closure.iter().rev() {
            out.push(' ');
            out.push_str(&modules[i].path);
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a minimal ELF64 LE relocatable with a `.modinfo` section holding `modinfo`
    /// (and the mandatory null section and `.shstrtab`).
    pub(crate) fn tiny_module(modinfo: &[u8]) -> Vec<u8> {
        let shstrtab = b"\0.modinfo\0.shstrtab\0";
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[EI_CLASS] = ELFCLASS64;
        elf[EI_DATA] = ELFDATA2LSB;
        elf[6] = 1; // EI_VERSION
        elf[0x10..0x12].copy_from_slice(&1u16.to_le_bytes()); // e_type = ET_REL
        elf[0x12..0x14].copy_from_slice(&62u16.to_le_bytes()); // e_machine = EM_X86_64
        let modinfo_off = elf.len();
        elf.extend_from_slice(modinfo);
        let strtab_off = elf.len();
        elf.extend_from_slice(shstrtab);
        elf.resize(elf.len().next_multiple_of(8), 0);
        let shoff = elf.len();
        let mut shdr = |name: u32, kind: u32, off: usize, size: usize| {
            let mut h = [0u8; 64];
            h[0..4].copy_from_slice(&name.to_le_bytes());
            h[4..8].copy_from_slice(&kind.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
            h[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            elf.extend_from_slice(&h);
        };
        shdr(0, 0, 0, 0);
        shdr(1, 1, modinfo_off, modinfo.len()); // SHT_PROGBITS
        shdr(10, 3, strtab_off, shstrtab.len()); // SHT_STRTAB
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes());
        elf
    }

    #[test]
    fn parses_synthetic_modinfo() {
        let elf = tiny_module(
            b"license=GPL\0description=caf\xc3\xa9 \xff\0depends=virtio,virtio_ring,net-failover\0\
              retpoline=Y\0name=virtio-net\0vermagic=6.1.0 SMP mod_unload\0",
        );
        let info = parse_modinfo(&elf).unwrap();
        assert_eq!(info.name.as_deref(), Some("virtio_net"));
        assert_eq!(info.depends, ["virtio", "virtio_ring", "net_failover"]);
    }

    #[test]
    fn empty_depends_is_no_dependency() {
        let info = parse_modinfo(&tiny_module(b"depends=\0name=virtio\0")).unwrap();
        assert!(info.depends.is_empty());
        assert_eq!(info.name.as_deref(), Some("virtio"));
    }

    #[test]
    fn malformed_elves_are_errors_not_panics() {
        assert_eq!(parse_modinfo(b""), Err(ModinfoError::NotElf));
        assert_eq!(
            parse_modinfo(b"\x7fELF"),
            Err(ModinfoError::Unsupported("not ELFCLASS64"))
        );
        let good = tiny_module(b"depends=a\0");
        // Every truncation and many single-byte corruptions must fail cleanly or parse.
        for len in 0..good.len() {
            let _ = parse_modinfo(&good[..len]);
        }
        for i in 0..good.len() {
            for v in [0x00, 0x7f, 0xff] {
                let mut bad = good.clone();
                bad[i] = v;
                let _ = parse_modinfo(&bad);
            }
        }
        // Section headers pointing past the end of the file.
        let mut bad = good.clone();
        bad[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            parse_modinfo(&bad),
            Err(ModinfoError::Malformed(_))
        ));
        let mut bad = good;
        bad[0x3c..0x3e].copy_from_slice(&0xfff0u16.to_le_bytes());
        assert!(matches!(
            parse_modinfo(&bad),
            Err(ModinfoError::Malformed(_))
        ));
    }

    #[test]
    fn missing_modinfo_section() {
        let mut elf = tiny_module(b"depends=\0");
        // Rename ".modinfo" in .shstrtab.
        let at = elf.windows(8).position(|w| w == b".modinfo").unwrap();
        elf[at + 1] = b'X';
        assert_eq!(parse_modinfo(&elf), Err(ModinfoError::NoModinfo));
    }

    fn graph(edges: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        edges
            .iter()
            .map(|(n, d)| (n.to_string(), d.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    fn assert_topological(order: &[String], deps: &BTreeMap<String, Vec<String>>) {
        for (i, n) in order.iter().enumerate() {
            for d in &deps[n] {
                if let Some(j) = order.iter().position(|x| x == d) {
                    assert!(j < i, "{d} must load before {n}: {order:?}");
                }
            }
        }
    }

    #[test]
    fn topo_order_puts_dependencies_first() {
        let deps = graph(&[
            ("virtio_net", &["virtio_ring", "virtio", "net_failover"]),
            ("net_failover", &["failover"]),
            ("failover", &[]),
            ("virtio", &[]),
            ("virtio_ring", &[]),
            ("virtio_blk", &["virtio", "virtio_ring"]),
        ]);
        let roots: Vec<String> = ["virtio_net", "virtio_blk", "absent"]
            .map(String::from)
            .to_vec();
        let (order, cycles) = topo_order(&roots, &deps);
        assert!(cycles.is_empty());
        assert_eq!(
            order,
            [
                "virtio_ring",
                "virtio",
                "failover",
                "net_failover",
                "virtio_net",
                "virtio_blk"
            ]
        );
        assert_topological(&order, &deps);
    }

    #[test]
    fn topo_order_breaks_cycles() {
        let deps = graph(&[("a", &["b"]), ("b", &["c"]), ("c", &["a", "d"]), ("d", &[])]);
        let roots = vec!["a".to_string(), "c".to_string()];
        let (order, cycles) = topo_order(&roots, &deps);
        assert_eq!(order, ["d", "c", "b", "a"]);
        assert_eq!(cycles, [("c".to_string(), "a".to_string())]);
        // A self-loop is a cycle too.
        let (order, cycles) = topo_order(&["x".to_string()], &graph(&[("x", &["x"])]));
        assert_eq!(order, ["x"]);
        assert_eq!(cycles.len(), 1);
    }

    #[test]
    fn topo_order_handles_long_chains_without_recursion() {
        let n = 100_000;
        let deps: BTreeMap<String, Vec<String>> = (0..n)
            .map(|i| {
                (
                    format!("m{i}"),
                    if i + 1 < n {
                        vec![format!("m{}", i + 1)]
                    } else {
                        vec![]
                    },
                )
            })
            .collect();
        let (order, _) = topo_order(&["m0".to_string()], &deps);
        assert_eq!(order.len(), n);
        assert_eq!(order[0], format!("m{}", n - 1));
    }

    fn sample_index() -> (ModuleIndex, BTreeMap<String, Vec<u8>>) {
        let mut index = ModuleIndex::default();
        let mut files = BTreeMap::new();
        let mut add = |path: &str, modinfo: &[u8]| {
            index.add_file(path);
            files.insert(path.to_string(), tiny_module(modinfo));
        };
        add(
            "kernel/drivers/virtio/virtio.ko",
            b"depends=\0name=virtio\0",
        );
        add(
            "kernel/drivers/virtio/virtio_ring.ko",
            b"depends=\0name=virtio_ring\0",
        );
        add(
            "kernel/drivers/char/hw_random/virtio-rng.ko",
            b"depends=virtio,virtio_ring,rng-core\0name=virtio_rng\0",
        );
        add("kernel/net/core/failover.ko", b"depends=\0");
        add("kernel/drivers/net/net_failover.ko", b"depends=failover\0");
        add(
            "kernel/drivers/net/virtio_net.ko",
            b"depends=virtio_ring,virtio,net_failover\0",
        );
        index.add_builtin("rng_core");
        (index, files)
    }

    #[test]
    fn resolve_handles_builtin_and_missing_modules() {
        let (index, files) = sample_index();
        let r = resolve(&index, &["virtio_net", "virtio-rng", "virtio_mem"], |p| {
            files.get(p).cloned().ok_or("no such file")
        })
        .unwrap();
        let names: Vec<&str> = r.modules.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "virtio_ring",
                "virtio",
                "failover",
                "net_failover",
                "virtio_net",
                "virtio_rng"
            ]
        );
        assert_eq!(r.builtin, ["rng_core"]);
        assert_eq!(r.missing, ["virtio_mem"]);
        let rng = r.modules.iter().find(|m| m.name == "virtio_rng").unwrap();
        assert_eq!(rng.path, "kernel/drivers/char/hw_random/virtio-rng.ko");
        assert_eq!(
            rng.depends,
            ["virtio", "virtio_ring"],
            "built-in dep dropped"
        );
    }

    #[test]
    fn resolve_reports_unreadable_modules() {
        let (index, _) = sample_index();
        let err = resolve(&index, &["virtio"], |_| Err("boom")).unwrap_err();
        assert!(matches!(err, ResolveError::Read { source: "boom", .. }));
        let err = resolve(&index, &["virtio"], |_| Ok::<_, ()>(b"junk".to_vec())).unwrap_err();
        assert!(matches!(
            err,
            ResolveError::Modinfo {
                source: ModinfoError::NotElf,
                ..
            }
        ));
    }

    #[test]
    fn modules_dep_lists_transitive_dependencies_in_depmod_order() {
        let (index, files) = sample_index();
        let r = resolve(&index, &["virtio_net", "virtio_rng"], |p| {
            files.get(p).cloned().ok_or(())
        })
        .unwrap();
        let dep = modules_dep(&r.modules);
        let line = |m: &str| {
            dep.lines()
                .find(|l| l.starts_with(&format!("{m}:")))
                .unwrap()
                .to_string()
        };
        assert_eq!(
            line("kernel/net/core/failover.ko"),
            "kernel/net/core/failover.ko:"
        );
        assert_eq!(
            line("kernel/drivers/net/virtio_net.ko"),
            "kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko \
             kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko \
             kernel/drivers/virtio/virtio_ring.ko"
        );
        assert_eq!(dep.lines().count(), r.modules.len());
    }

    #[test]
    fn index_skips_unsafe_and_non_module_paths() {
        let mut index = ModuleIndex::default();
        index.add_file("kernel/a/good-one.ko");
        index.add_file("kernel/a/bad name.ko");
        index.add_file("kernel/a/evil$(reboot).ko");
        index.add_file("kernel/a/compressed.ko.xz");
        index.add_file("kernel/b/good_one.ko"); // duplicate name after normalisation
        assert_eq!(index.path("good_one"), Some("kernel/a/good-one.ko"));
        assert_eq!(index.path("bad name"), None);
        assert_eq!(index.path("evil$(reboot)"), None);
        assert_eq!(index.path("compressed"), None);
    }
}
