//! The snapshot directory: `state` (every vCPU, the interrupt controllers, the clock and every
//! device, as data) and `memory` (guest RAM, sparse).
//!
//! `state` is a 48-byte header — magic `VIREOSTA`, format version (u32), payload length
//! (u64), SHA-256 of the payload — followed by the payload, the JSON of [`MachineState`]. A
//! truncated, corrupted or other-version file is refused before anything is created.
//!
//! `memory` starts with one 4 KiB header page — magic `VIREOMEM`, format version (u32), the
//! snapshot id (16 bytes, also in `state`), the RAM size (u64) — and then holds guest RAM, the
//! regions one after the other, page-aligned so a restore can map each region straight from
//! the file (`MAP_PRIVATE`: pages are read when the guest first touches them, and its writes
//! stay in the process). Pages that are zero are not written: the file is sparse, and memory
//! the guest never touched takes no disk. Pages are found without reading untouched memory:
//! `/proc/self/pagemap` tells which pages of an anonymous mapping were ever populated (RAM
//! that is itself mapped from an earlier snapshot is read whole).
//!
//! Both files are written under temporary names and renamed into place, `memory` first, so a
//! snapshot directory holds either the old pair or the new one; the shared id catches a
//! `state` paired with another snapshot's `memory`.
//!
//! Live migration (`migrate/`) streams the same [`MachineState`] and the same pages over TCP.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vireo_hv::GuestMemory;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap,
    MmapRegion,
};

use crate::config::VmConfig;

/// Version of both file formats; a snapshot of another version is refused.
pub const FORMAT_VERSION: u32 = 1;
const STATE_MAGIC: &[u8; 8] = b"VIREOSTA";
const MEMORY_MAGIC: &[u8; 8] = b"VIREOMEM";
const STATE_HEADER_LEN: usize = 8 + 4 + 8 + 32;
/// RAM starts after one header page.
pub const MEMORY_DATA_OFFSET: u64 = 4096;
const PAGE: u64 = 4096;
/// The largest state file accepted (a sanity bound: real ones are tens of KiB per vCPU).
const MAX_STATE_LEN: u64 = 256 << 20;

pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";

/// Errors reading or writing a snapshot, worded for the user.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a usable vireo snapshot: {why}")]
    Invalid { path: PathBuf, why: String },
    #[error(
        "{path} is a snapshot of format version {found}; this vireo reads version {FORMAT_VERSION}"
    )]
    Version { path: PathBuf, found: u32 },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn invalid(path: &Path, why: impl Into<String>) -> SnapshotError {
    SnapshotError::Invalid {
        path: path.to_path_buf(),
        why: why.into(),
    }
}

/// One RAM region and where it is in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegion {
    pub guest_addr: u64,
    pub len: u64,
    pub file_offset: u64,
}

/// Devices owned by the VMM (everything but the vCPUs and the backend's own state).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevicesState {
    pub serial: vireo_devices::legacy::serial::SerialState,
    pub i8042: vireo_devices::legacy::i8042::I8042State,
    pub cmos: vireo_devices::legacy::cmos::CmosState,
    /// The userspace interrupt controllers and PIT (backends without in-kernel ones).
    pub irqchip: Option<vireo_devices::irqchip::IrqChipState>,
    /// virtio-pci functions in PCI slot order, with their names.
    pub virtio: Vec<(String, vireo_virtio::VirtioPciState)>,
}

/// Everything a snapshot holds besides RAM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineState {
    /// Random; the memory file carries the same.
    pub id: String,
    /// The configuration the VM was built from (disk paths may be replaced at restore).
    pub config: VmConfig,
    /// The backend that ran it (`kvm` or `emu`): a snapshot restores on the same one.
    pub backend: String,
    pub memory: Vec<MemoryRegion>,
    pub vm: vireo_hv::VmState,
    pub vcpus: Vec<vireo_hv::VcpuState>,
    pub devices: DevicesState,
}

/// A fresh random snapshot id (hex).
pub fn new_id() -> String {
    let mut b = [0u8; 16];
    let ok = File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok();
    if !ok {
        // Time and pid are unique enough to pair two files.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b = (t ^ u128::from(std::process::id()) << 64).to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn id_bytes(id: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = id
            .get(2 * i..2 * i + 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .unwrap_or(0);
    }
    out
}

// ---- host paths of a jailed VMM -----------------------------------------------------------------

/// The files of a jailed VMM: each path it sees inside the jail, with the host's path of the
/// same file. Set once, by the jailed child before the VMM starts.
static HOST_PATHS: std::sync::OnceLock<Vec<(PathBuf, PathBuf)>> = std::sync::OnceLock::new();

/// Tell this process (a VMM in a jail) where the files it sees at the first path of each
/// pair are on the host (the second): snapshots and migrations record the host's paths, so
/// that the VM can be restored outside the jail (or in another one). Once per process; later
/// calls are ignored.
pub fn set_host_paths(map: Vec<(PathBuf, PathBuf)>) {
    let _ = HOST_PATHS.set(map);
}

/// `config` with the paths of this process's files as the host names them (unchanged outside
/// a jail).
pub fn host_config(config: &VmConfig) -> VmConfig {
    match HOST_PATHS.get() {
        Some(map) => config_on_host(config, map),
        None => config.clone(),
    }
}

fn config_on_host(config: &VmConfig, map: &[(PathBuf, PathBuf)]) -> VmConfig {
    config.with_paths_mapped(|p| {
        map.iter()
            .find(|(inside, _)| inside == p)
            .map(|(_, host)| host.clone())
    })
}

// ---- state file -------------------------------------------------------------------------------

/// The bytes of a state file for `state`. Its configuration names files by their host paths
/// ([`set_host_paths`]), also when written by a jailed VMM.
pub fn encode_state(state: &MachineState) -> Result<Vec<u8>, serde_json::Error> {
    let payload = match HOST_PATHS.get() {
        Some(map) => {
            let mut on_host = state.clone();
            on_host.config = config_on_host(&state.config, map);
            serde_json::to_vec(&on_host)?
        }
        None => serde_json::to_vec(state)?,
    };
    let mut out = Vec::with_capacity(STATE_HEADER_LEN + payload.len());
    out.extend_from_slice(STATE_MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(&payload));
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Check and parse the bytes of a state file (`path` names it in errors).
pub fn decode_state(path: &Path, bytes: &[u8]) -> Result<MachineState, SnapshotError> {
    if bytes.len() < STATE_HEADER_LEN || &bytes[..8] != STATE_MAGIC {
        return Err(invalid(path, "no vireo state header"));
    }
    let mut v = [0u8; 4];
    v.copy_from_slice(&bytes[8..12]);
    let version = u32::from_le_bytes(v);
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            path: path.to_path_buf(),
            found: version,
        });
    }
    let mut l = [0u8; 8];
    l.copy_from_slice(&bytes[12..20]);
    let len = u64::from_le_bytes(l);
    let payload = &bytes[STATE_HEADER_LEN..];
    if payload.len() as u64 != len {
        return Err(invalid(
            path,
            format!(
                "the state is {} bytes long, its header says {len} (truncated?)",
                payload.len()
            ),
        ));
    }
    if Sha256::digest(payload).as_slice() != &bytes[20..52] {
        return Err(invalid(
            path,
            "checksum mismatch: the state file is corrupted",
        ));
    }
    serde_json::from_slice(payload).map_err(|e| invalid(path, format!("state: {e}")))
}

/// Read and check `dir/state`.
pub fn read_state(dir: &Path) -> Result<MachineState, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let mut f = File::open(&path).map_err(io_err(&path))?;
    let size = f.metadata().map_err(io_err(&path))?.len();
    if size > MAX_STATE_LEN {
        return Err(invalid(
            &path,
            format!("{size} bytes is too large for a state file"),
        ));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    f.read_to_end(&mut bytes).map_err(io_err(&path))?;
    decode_state(&path, &bytes)
}

/// Write `dir/state` (through a temporary file and a rename).
pub fn write_state(dir: &Path, state: &MachineState) -> Result<(), SnapshotError> {
    let path = dir.join(STATE_FILE);
    let bytes = encode_state(state).map_err(|e| invalid(&path, e.to_string()))?;
    let tmp = dir.join(format!(".{STATE_FILE}.tmp"));
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(&bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err(&path))
}

// ---- memory file ------------------------------------------------------------------------------

fn memory_header(id: &str, ram: u64) -> Vec<u8> {
    let mut h = vec![0u8; MEMORY_DATA_OFFSET as usize];
    h[..8].copy_from_slice(MEMORY_MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..28].copy_from_slice(&id_bytes(id));
    h[28..36].copy_from_slice(&ram.to_le_bytes());
    h
}

/// Which pages of a host mapping were ever populated, from `/proc/self/pagemap` (bit 63:
/// present, bit 62: swapped; Linux `Documentation/admin-guide/mm/pagemap.rst`). `None` when
/// the file cannot be read: then every page is read.
pub(crate) struct PageMap(Option<File>);

impl PageMap {
    pub(crate) fn open() -> Self {
        PageMap(File::open("/proc/self/pagemap").ok())
    }

    /// For pages `[first, first + n)` of the host address space: true when populated.
    pub(crate) fn populated(&self, host_page: u64, n: usize, out: &mut Vec<bool>) {
        out.clear();
        let Some(f) = &self.0 else {
            out.resize(n, true);
            return;
        };
        let mut buf = vec![0u8; n * 8];
        if f.read_exact_at(&mut buf, host_page * 8).is_err() {
            out.resize(n, true);
            return;
        }
        out.extend(buf.chunks_exact(8).map(|e| {
            let mut b = [0u8; 8];
            b.copy_from_slice(e);
            let v = u64::from_le_bytes(b);
            v & (3 << 62) != 0
        }));
    }
}

/// What [`write_memory`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryStats {
    /// Bytes of RAM.
    pub ram: u64,
    /// Bytes written (non-zero pages).
    pub written: u64,
}

/// Write guest RAM to `dir/memory` (through a temporary file and a rename). Returns where
/// each region is in the file. The VM must be paused.
pub fn write_memory(
    dir: &Path,
    mem: &GuestMemory,
    id: &str,
) -> Result<(Vec<MemoryRegion>, MemoryStats), SnapshotError> {
    let path = dir.join(MEMORY_FILE);
    let tmp = dir.join(format!(".{MEMORY_FILE}.tmp"));
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    let mut regions = Vec::new();
    let mut offset = MEMORY_DATA_OFFSET;
    for r in mem.iter() {
        regions.push(MemoryRegion {
            guest_addr: r.start_addr().0,
            len: r.len(),
            file_offset: offset,
        });
        offset += r.len().next_multiple_of(PAGE);
    }
    let ram: u64 = regions.iter().map(|r| r.len).sum();
    f.set_len(offset).map_err(io_err(&tmp))?;
    f.write_all_at(&memory_header(id, ram), 0)
        .map_err(io_err(&tmp))?;
    let pagemap = PageMap::open();
    let mut stats = MemoryStats { ram, written: 0 };
    // Chunks of 2 MiB: one pagemap read and one guest-memory read per populated run.
    const CHUNK: u64 = 2 << 20;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut populated = Vec::new();
    for (region, r) in regions.iter().zip(mem.iter()) {
        let host = r.as_ptr() as u64;
        // A region mapped from a snapshot has data in pages it never populated: read it all.
        let from_file = r.file_offset().is_some();
        let mut at = 0u64;
        while at < region.len {
            let n = (region.len - at).min(CHUNK);
            let pages = n.div_ceil(PAGE) as usize;
            if from_file {
                populated.clear();
                populated.resize(pages, true);
            } else {
                pagemap.populated((host + at) / PAGE, pages, &mut populated);
            }
            let mut p = 0;
            while p < pages {
                if !populated[p] {
                    p += 1;
                    continue;
                }
                let start = p;
                while p < pages && populated[p] {
                    p += 1;
                }
                let off = at + start as u64 * PAGE;
                let len = ((p - start) as u64 * PAGE).min(region.len - off) as usize;
                let data = &mut buf[..len];
                mem.read_slice(data, GuestAddress(region.guest_addr + off))
                    .map_err(|e| invalid(&tmp, format!("reading guest memory: {e}")))?;
                write_nonzero(&f, &tmp, data, region.file_offset + off, &mut stats)?;
            }
            at += n;
        }
    }
    f.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
    Ok((regions, stats))
}

/// Write the non-zero pages of `data` (file offset `at`), coalescing runs.
fn write_nonzero(
    f: &File,
    path: &Path,
    data: &[u8],
    at: u64,
    stats: &mut MemoryStats,
) -> Result<(), SnapshotError> {
    let pages: Vec<&[u8]> = data.chunks(PAGE as usize).collect();
    let mut i = 0;
    while i < pages.len() {
        if pages[i].iter().all(|&b| b == 0) {
            i += 1;
            continue;
        }
        let start = i;
        while i < pages.len() && pages[i].iter().any(|&b| b != 0) {
            i += 1;
        }
        let from = start * PAGE as usize;
        let to = (i * PAGE as usize).min(data.len());
        f.write_all_at(&data[from..to], at + from as u64)
            .map_err(io_err(path))?;
        stats.written += (to - from) as u64;
    }
    Ok(())
}

/// Check `dir/memory` against `state`: magic, version, the snapshot id, and a size that holds
/// every region. Returns the open file.
pub fn check_memory(dir: &Path, state: &MachineState) -> Result<File, SnapshotError> {
    let path = dir.join(MEMORY_FILE);
    let f = File::open(&path).map_err(io_err(&path))?;
    let mut h = vec![0u8; 36];
    f.read_exact_at(&mut h, 0)
        .map_err(|_| invalid(&path, "no memory header (truncated?)"))?;
    if &h[..8] != MEMORY_MAGIC {
        return Err(invalid(&path, "no vireo memory header"));
    }
    let mut v = [0u8; 4];
    v.copy_from_slice(&h[8..12]);
    let version = u32::from_le_bytes(v);
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            path,
            found: version,
        });
    }
    if h[12..28] != id_bytes(&state.id) {
        return Err(invalid(
            &path,
            "the memory file belongs to another snapshot than the state file",
        ));
    }
    let size = f.metadata().map_err(io_err(&path))?.len();
    for r in &state.memory {
        let end = r
            .file_offset
            .checked_add(r.len)
            .ok_or_else(|| invalid(&path, "region out of range"))?;
        if end > size || r.file_offset % PAGE != 0 || r.file_offset < MEMORY_DATA_OFFSET {
            return Err(invalid(
                &path,
                format!("the file is {size} bytes, too short for its RAM (truncated?)"),
            ));
        }
    }
    Ok(f)
}

/// Check `dir/memory` ([`check_memory`]) and map guest RAM from it: private mappings of the
/// file, read lazily as the guest touches pages.
pub fn map_memory(dir: &Path, state: &MachineState) -> Result<GuestMemory, SnapshotError> {
    let f = check_memory(dir, state)?;
    let path = dir.join(MEMORY_FILE);
    let mut ranges = Vec::new();
    for r in &state.memory {
        let len = usize::try_from(r.len).map_err(|_| invalid(&path, "region too large"))?;
        let region = MmapRegion::<vm_memory::bitmap::AtomicBitmap>::build(
            Some(FileOffset::new(
                f.try_clone().map_err(io_err(&path))?,
                r.file_offset,
            )),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| invalid(&path, format!("mapping RAM: {e}")))?;
        ranges.push(
            GuestRegionMmap::new(region, GuestAddress(r.guest_addr))
                .ok_or_else(|| invalid(&path, "region out of range"))?,
        );
    }
    GuestMemory::from_regions(ranges).map_err(|e| invalid(&path, format!("RAM layout: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vireo-snap-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn sample_state(mem: &[MemoryRegion]) -> MachineState {
        MachineState {
            id: new_id(),
            config: VmConfig::new("/k"),
            backend: "emu".into(),
            memory: mem.to_vec(),
            vm: vireo_hv::VmState::default(),
            vcpus: Vec::new(),
            devices: DevicesState {
                serial: serde_json::from_str(
                    r#"{"baud_divisor_low":12,"baud_divisor_high":0,"interrupt_enable":0,
                    "interrupt_identification":1,"line_control":3,"line_status":96,
                    "modem_control":8,"modem_status":176,"scratch":0,"fifo":[],"pending_input":[]}"#,
                )
                .unwrap(),
                i8042: serde_json::from_str(
                    &format!(r#"{{"ram":{:?},"output":[],"pending_cmd":null,"pending_kbd":null,
                    "output_port":3,"last_was_command":false,"kbd_level":false,"aux_level":false}}"#,
                    vec![0u8; 32]),
                )
                .unwrap(),
                cmos: serde_json::from_str(&format!(
                    r#"{{"index":0,"data":{:?},"offset_secs":0,"irq_level":false,"flags":0}}"#,
                    vec![0u8; 128]
                ))
                .unwrap(),
                irqchip: None,
                virtio: Vec::new(),
            },
        }
    }

    #[test]
    fn memory_is_sparse_and_maps_back_privately() {
        let dir = scratch("mem");
        let mem = GuestMemory::from_ranges(&[
            (GuestAddress(0), 8 << 20),
            (GuestAddress(1 << 32), 4 << 20),
        ])
        .unwrap();
        mem.write_slice(b"hello", GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[0xab; 8192], GuestAddress((1 << 32) + 0x20_0000))
            .unwrap();
        // A page written with zeroes is populated but not worth writing.
        mem.write_slice(&[0; 4096], GuestAddress(0x40_0000))
            .unwrap();
        let id = new_id();
        let (regions, stats) = write_memory(&dir, &mem, &id).unwrap();
        assert_eq!(stats.ram, 12 << 20);
        assert_eq!(stats.written, 3 * 4096);
        let file = dir.join(MEMORY_FILE);
        // Sparse: only the header page and the three data pages take blocks.
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&file).unwrap().blocks() * 512;
        assert!(blocks <= 64 * 1024, "{blocks} bytes allocated");

        let mut state = sample_state(&regions);
        state.id = id;
        let back = map_memory(&dir, &state).unwrap();
        let mut b = [0u8; 5];
        back.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(&b, b"hello");
        let mut c = [0u8; 8192];
        back.read_slice(&mut c, GuestAddress((1 << 32) + 0x20_0000))
            .unwrap();
        assert!(c.iter().all(|&x| x == 0xab));
        // Writes stay in this process: the file does not change.
        back.write_slice(b"HELLO", GuestAddress(0x1000)).unwrap();
        let again = map_memory(&dir, &state).unwrap();
        again.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(&b, b"hello");

        // Another snapshot's id, or a truncated file, is refused.
        let mut other = state.clone();
        other.id = new_id();
        assert!(map_memory(&dir, &other)
            .unwrap_err()
            .to_string()
            .contains("another snapshot"));
        let f = OpenOptions::new().write(true).open(&file).unwrap();
        f.set_len(8 << 20).unwrap();
        assert!(map_memory(&dir, &state)
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn state_file_detects_truncation_corruption_and_versions() {
        let dir = scratch("state");
        let s = sample_state(&[]);
        write_state(&dir, &s).unwrap();
        let back = read_state(&dir).unwrap();
        assert_eq!(back.id, s.id);
        let path = dir.join(STATE_FILE);
        let good = std::fs::read(&path).unwrap();
        // Every single flipped byte is caught.
        for i in (0..good.len()).step_by(7) {
            let mut bad = good.clone();
            bad[i] ^= 0x20;
            assert!(decode_state(&path, &bad).is_err(), "byte {i}");
        }
        let e = decode_state(&path, &good[..good.len() - 1]).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        let mut v2 = good.clone();
        v2[8] = 2;
        let e = decode_state(&path, &v2).unwrap_err();
        assert!(matches!(e, SnapshotError::Version { found: 2, .. }), "{e}");
        assert!(decode_state(&path, b"hello").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn jailed_config() -> VmConfig {
        let mut c = VmConfig::new("/vm/kernel");
        c.initrd = Some("/vm/initrd".into());
        c.disks = vec![
            "path=/vm/disk0".parse().unwrap(),
            "path=/vm/disk1,readonly=on".parse().unwrap(),
        ];
        c.vsock = Some("cid=3,socket=/run/v/vm.sock".parse().unwrap());
        c
    }

    fn jail_map() -> Vec<(PathBuf, PathBuf)> {
        [
            ("/vm/kernel", "/boot/vmlinuz"),
            ("/vm/initrd", "/srv/i.cpio"),
            ("/vm/disk1", "/srv/ro.img"),
            ("/vm/disk0", "/srv/rw.img"),
        ]
        .iter()
        .map(|(a, b)| (PathBuf::from(a), PathBuf::from(b)))
        .collect()
    }

    #[test]
    fn jailed_paths_become_host_paths() {
        let c = config_on_host(&jailed_config(), &jail_map());
        assert_eq!(c.kernel, Path::new("/boot/vmlinuz"));
        assert_eq!(c.initrd.as_deref(), Some(Path::new("/srv/i.cpio")));
        let disks: Vec<_> = c
            .disks
            .iter()
            .map(|d| (d.path.clone(), d.readonly))
            .collect();
        assert_eq!(
            disks,
            [
                (PathBuf::from("/srv/rw.img"), false),
                (PathBuf::from("/srv/ro.img"), true)
            ]
        );
        // A path the map does not name (the vsock socket, bound at its host path) stays.
        assert_eq!(
            c.vsock.as_ref().unwrap().socket,
            Path::new("/run/v/vm.sock")
        );
        let mut rest = c.clone();
        rest.kernel = "/vm/kernel".into();
        assert_eq!(config_on_host(&rest, &[]).kernel, Path::new("/vm/kernel"));
    }

    /// In a process told its host paths (a jailed VMM), the state file records those; the
    /// state in memory keeps the jail's. In a child, since the paths are set once per process.
    #[test]
    fn a_jailed_vmm_writes_host_paths_into_its_state() {
        const ENV: &str = "VIREO_SNAPSHOT_HOST_PATHS_CHILD";
        if std::env::var_os(ENV).is_some() {
            assert_eq!(
                host_config(&jailed_config()),
                jailed_config(),
                "none set yet"
            );
            set_host_paths(jail_map());
            let dir = scratch("hostpaths");
            let mut s = sample_state(&[]);
            s.config = jailed_config();
            write_state(&dir, &s).unwrap();
            assert_eq!(s.config.kernel, Path::new("/vm/kernel"));
            let back = read_state(&dir).unwrap();
            assert_eq!(back.config, config_on_host(&jailed_config(), &jail_map()));
            assert_eq!(host_config(&s.config), back.config);
            std::fs::remove_dir_all(&dir).unwrap();
            std::process::exit(0);
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "snapshot::tests::a_jailed_vmm_writes_host_paths_into_its_state",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ENV, "1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
