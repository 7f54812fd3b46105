//! MSI-X (PCI Local Bus Specification 3.0 §6.8.2): the capability, the vector table and the
//! pending-bit array (PBA), with per-vector and function masking.
//!
//! Each table entry owns an [`MsiVector`] from the hypervisor layer. A vector is connected
//! (has a route) exactly while it could fire: MSI-X enabled, function not masked, entry not
//! masked. A trigger while masked sets the entry's pending bit instead; unmasking delivers it
//! and clears the bit (§6.8.2.9).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vireo_hv::{MsiMessage, MsiVector};

use super::config::PciConfiguration;
use super::PciError;

/// Capability ID of MSI-X (PCI Code and ID Assignment spec, Table 2-1).
pub const MSIX_CAP_ID: u8 = 0x11;
/// Bytes of one table entry: address low, address high, data, vector control.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Most entries a table may have (Table Size is 11 bits, N-1 encoded).
pub const MSIX_MAX_VECTORS: usize = 2048;
/// Message Control bits (§6.8.2.3).
const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Vector Control: the per-vector mask bit (§6.8.2.9).
const VECTOR_MASKED: u32 = 1;

/// One table entry as data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixEntry {
    pub address_lo: u32,
    pub address_hi: u32,
    pub data: u32,
    pub vector_control: u32,
}

impl MsixEntry {
    fn masked(&self) -> bool {
        self.vector_control & VECTOR_MASKED != 0
    }

    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: (u64::from(self.address_hi) << 32) | u64::from(self.address_lo),
            data: self.data,
        }
    }
}

/// The MSI-X state of a function, as data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    pub entries: Vec<MsixEntry>,
    pub pending: Vec<bool>,
    pub enabled: bool,
    pub function_mask: bool,
}

/// The MSI-X table, PBA and control bits of one function.
pub struct MsixTable {
    entries: Vec<MsixEntry>,
    pending: Vec<bool>,
    enabled: bool,
    function_mask: bool,
    vectors: Vec<Arc<dyn MsiVector>>,
    /// The route each vector has now (to skip redundant routing updates).
    routes: Vec<Option<MsiMessage>>,
}

impl std::fmt::Debug for MsixTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsixTable")
            .field("entries", &self.entries)
            .field("enabled", &self.enabled)
            .field("function_mask", &self.function_mask)
            .finish()
    }
}

impl MsixTable {
    /// A table with one entry per vector, every entry masked (the reset state, §6.8.2.9).
    pub fn new(vectors: Vec<Arc<dyn MsiVector>>) -> Result<Self, PciError> {
        let n = vectors.len();
        if n == 0 || n > MSIX_MAX_VECTORS {
            return Err(PciError::MsixSize(n));
        }
        Ok(MsixTable {
            entries: vec![
                MsixEntry {
                    vector_control: VECTOR_MASKED,
                    ..Default::default()
                };
                n
            ],
            pending: vec![false; n],
            enabled: false,
            function_mask: false,
            vectors,
            routes: vec![None; n],
        })
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes the table takes in its BAR.
    pub fn table_size(&self) -> u64 {
        self.entries.len() as u64 * MSIX_ENTRY_SIZE
    }

    /// Bytes the PBA takes (a bit per entry, in qwords).
    pub fn pba_size(&self) -> u64 {
        (self.entries.len() as u64).div_ceil(64) * 8
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// True when vector `v` cannot fire now (also for a vector that does not exist).
    pub fn masked(&self, v: usize) -> bool {
        match self.entries.get(v) {
            Some(e) => !self.enabled || self.function_mask || e.masked(),
            None => true,
        }
    }

    /// True when vector `v` has an interrupt pending.
    pub fn pending(&self, v: usize) -> bool {
        self.pending.get(v).copied().unwrap_or(false)
    }

    /// The device signals vector `v`: delivered, or left pending while masked. A vector that
    /// does not exist is ignored (the device checks what the guest gave it).
    pub fn trigger(&mut self, v: usize) {
        if v >= self.entries.len() {
            return;
        }
        if self.masked(v) {
            self.pending[v] = true;
        } else {
            self.vectors[v].trigger();
        }
    }

    /// New Message Control bits (enable, function mask), from the capability.
    pub fn set_control(&mut self, enabled: bool, function_mask: bool) {
        if (enabled, function_mask) == (self.enabled, self.function_mask) {
            return;
        }
        self.enabled = enabled;
        self.function_mask = function_mask;
        for v in 0..self.entries.len() {
            self.update(v);
        }
    }

    /// Re-route vector `v` and deliver its pending interrupt if it is now unmasked.
    fn update(&mut self, v: usize) {
        let route = (!self.masked(v)).then(|| self.entries[v].message());
        if route != self.routes[v] {
            match self.vectors[v].set_route(route) {
                Ok(()) => self.routes[v] = route,
                Err(e) => tracing::warn!("MSI-X vector {v}: routing {route:x?}: {e}"),
            }
        }
        if route.is_some() && self.pending[v] {
            self.pending[v] = false;
            self.vectors[v].trigger();
        }
    }

    /// A guest read of the table at `offset` (any size; outside the table reads zero).
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|at| self.table_byte(at))
                .unwrap_or(0);
        }
    }

    fn table_byte(&self, at: u64) -> Option<u8> {
        let entry = self
            .entries
            .get(usize::try_from(at / MSIX_ENTRY_SIZE).ok()?)?;
        let word = match (at % MSIX_ENTRY_SIZE) / 4 {
            0 => entry.address_lo,
            1 => entry.address_hi,
            2 => entry.data,
            _ => entry.vector_control,
        };
        Some((word >> ((at % 4) * 8)) as u8)
    }

    /// A guest write to the table. Dword and qword writes are what drivers use; narrower ones
    /// are merged byte by byte. Only the mask bit of Vector Control is writable.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let mut touched: Option<(usize, usize)> = None;
        for (i, &b) in data.iter().enumerate() {
            let Some(at) = offset.checked_add(i as u64) else {
                break;
            };
            let Ok(v) = usize::try_from(at / MSIX_ENTRY_SIZE) else {
                break;
            };
            let Some(entry) = self.entries.get_mut(v) else {
                break;
            };
            let shift = (at % 4) * 8;
            let word = match (at % MSIX_ENTRY_SIZE) / 4 {
                0 => &mut entry.address_lo,
                1 => &mut entry.address_hi,
                2 => &mut entry.data,
                _ => &mut entry.vector_control,
            };
            *word = (*word & !(0xff << shift)) | (u32::from(b) << shift);
            entry.vector_control &= VECTOR_MASKED;
            touched = Some(match touched {
                Some((lo, _)) => (lo, v),
                None => (v, v),
            });
        }
        if let Some((lo, hi)) = touched {
            for v in lo..=hi {
                self.update(v);
            }
        }
    }

    /// A guest read of the PBA (read-only: writes are ignored, §6.8.2.10).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let Some(bit0) = offset
                .checked_add(i as u64)
                .and_then(|at| at.checked_mul(8))
            else {
                *b = 0;
                continue;
            };
            *b = (0..8u64)
                .filter(|&j| {
                    usize::try_from(bit0 + j)
                        .map(|v| self.pending(v))
                        .unwrap_or(false)
                })
                .fold(0u8, |acc, j| acc | (1 << j));
        }
    }

    /// The state as data.
    pub fn state(&self) -> MsixState {
        MsixState {
            entries: self.entries.clone(),
            pending: self.pending.clone(),
            enabled: self.enabled,
            function_mask: self.function_mask,
        }
    }

    /// Restore a state of the same size; routes follow.
    pub fn restore(&mut self, s: &MsixState) -> Result<(), PciError> {
        if s.entries.len() != self.entries.len() || s.pending.len() != self.pending.len() {
            return Err(PciError::State("MSI-X table size".into()));
        }
        self.entries = s.entries.clone();
        self.pending = s.pending.clone();
        self.enabled = s.enabled;
        self.function_mask = s.function_mask;
        for v in 0..self.entries.len() {
            self.update(v);
        }
        Ok(())
    }

    /// Back to the reset state: all entries masked, MSI-X disabled, nothing pending.
    pub fn reset(&mut self) {
        for e in &mut self.entries {
            *e = MsixEntry {
                vector_control: VECTOR_MASKED,
                ..Default::default()
            };
        }
        self.pending.fill(false);
        self.enabled = false;
        self.function_mask = false;
        for v in 0..self.entries.len() {
            self.update(v);
        }
    }
}

/// Where the MSI-X capability puts the table and PBA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixLayout {
    /// Table size (entries).
    pub vectors: u16,
    /// BAR (BIR) and offset of the table; the offset must be qword aligned.
    pub table_bar: u8,
    pub table_offset: u32,
    pub pba_bar: u8,
    pub pba_offset: u32,
}

/// Add the MSI-X capability (§6.8.2.1) to `config`; returns its offset. Message Control's
/// enable and function-mask bits become writable.
pub fn add_capability(config: &mut PciConfiguration, l: &MsixLayout) -> Result<u16, PciError> {
    let n = usize::from(l.vectors);
    if n == 0 || n > MSIX_MAX_VECTORS {
        return Err(PciError::MsixSize(n));
    }
    if l.table_bar > 5
        || l.pba_bar > 5
        || !l.table_offset.is_multiple_of(8)
        || !l.pba_offset.is_multiple_of(8)
    {
        return Err(PciError::MsixLayout);
    }
    let control = l.vectors - 1;
    let mut body = Vec::with_capacity(10);
    body.extend_from_slice(&control.to_le_bytes());
    body.extend_from_slice(&(l.table_offset | u32::from(l.table_bar)).to_le_bytes());
    body.extend_from_slice(&(l.pba_offset | u32::from(l.pba_bar)).to_le_bytes());
    let at = config.add_capability(MSIX_CAP_ID, &body)?;
    config.set_writable(
        at + 2,
        &(CONTROL_ENABLE | CONTROL_FUNCTION_MASK).to_le_bytes(),
    );
    Ok(at)
}

/// After a configuration write: pass the capability's Message Control bits to `table`.
pub fn sync_control(config: &PciConfiguration, cap: u16, table: &mut MsixTable) {
    let control = config.u16_at(cap + 2);
    table.set_control(
        control & CONTROL_ENABLE != 0,
        control & CONTROL_FUNCTION_MASK != 0,
    );
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A vector that records its routes and deliveries.
    #[derive(Default)]
    pub struct FakeVector {
        pub route: Mutex<Option<MsiMessage>>,
        pub delivered: Mutex<Vec<MsiMessage>>,
        pub route_changes: Mutex<usize>,
    }

    impl MsiVector for FakeVector {
        fn set_route(&self, msg: Option<MsiMessage>) -> vireo_hv::Result<()> {
            *self.route.lock().unwrap() = msg;
            *self.route_changes.lock().unwrap() += 1;
            Ok(())
        }
        fn trigger(&self) {
            if let Some(m) = *self.route.lock().unwrap() {
                self.delivered.lock().unwrap().push(m);
            }
        }
    }

    fn table(n: usize) -> (MsixTable, Vec<Arc<FakeVector>>) {
        let fakes: Vec<Arc<FakeVector>> = (0..n).map(|_| Arc::new(FakeVector::default())).collect();
        let vectors = fakes
            .iter()
            .map(|f| f.clone() as Arc<dyn MsiVector>)
            .collect();
        (MsixTable::new(vectors).unwrap(), fakes)
    }

    fn program(t: &mut MsixTable, v: u64, addr: u32, data: u32, masked: bool) {
        let base = v * MSIX_ENTRY_SIZE;
        t.write_table(base, &addr.to_le_bytes());
        t.write_table(base + 4, &0u32.to_le_bytes());
        t.write_table(base + 8, &data.to_le_bytes());
        t.write_table(base + 12, &u32::from(masked).to_le_bytes());
    }

    fn pba(t: &MsixTable) -> u64 {
        let mut d = [0u8; 8];
        t.read_pba(0, &mut d);
        u64::from_le_bytes(d)
    }

    #[test]
    fn entries_start_masked_and_triggers_go_pending() {
        let (mut t, f) = table(3);
        assert_eq!(t.table_size(), 48);
        assert_eq!(t.pba_size(), 8);
        let mut d = [0u8; 4];
        t.read_table(12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1);
        t.trigger(1);
        assert!(t.pending(1));
        assert_eq!(pba(&t), 0b010);
        assert!(f[1].delivered.lock().unwrap().is_empty());
        // A vector that does not exist is ignored.
        t.trigger(3);
        t.trigger(usize::MAX);
    }

    #[test]
    fn pending_is_delivered_on_unmask_of_entry_function_and_enable() {
        let (mut t, f) = table(2);
        t.set_control(true, false);
        program(&mut t, 0, 0xfee0_0000, 0x30, true);
        t.trigger(0);
        assert_eq!(pba(&t), 1);
        // Unmasking the entry delivers the pending message once.
        t.write_table(12, &0u32.to_le_bytes());
        assert_eq!(pba(&t), 0);
        let m = MsiMessage {
            address: 0xfee0_0000,
            data: 0x30,
        };
        assert_eq!(*f[0].delivered.lock().unwrap(), vec![m]);
        // Function mask: pending again, delivered when the function is unmasked.
        t.set_control(true, true);
        assert_eq!(*f[0].route.lock().unwrap(), None);
        t.trigger(0);
        t.trigger(0);
        assert_eq!(pba(&t), 1);
        t.set_control(true, false);
        assert_eq!(f[0].delivered.lock().unwrap().len(), 2);
        // MSI-X disabled: pending; enabling delivers.
        t.set_control(false, false);
        t.trigger(0);
        assert!(t.pending(0));
        t.set_control(true, false);
        assert_eq!(f[0].delivered.lock().unwrap().len(), 3);
        assert!(!t.pending(0));
        // Unmasked and enabled: straight through.
        t.trigger(0);
        assert_eq!(f[0].delivered.lock().unwrap().len(), 4);
    }

    #[test]
    fn rewriting_an_entry_mid_flight_reroutes_it() {
        let (mut t, f) = table(1);
        t.set_control(true, false);
        program(&mut t, 0, 0xfee0_0000, 0x30, false);
        t.trigger(0);
        // The guest changes the message without masking first (not allowed, but possible).
        t.write_table(8, &0x31u32.to_le_bytes());
        t.trigger(0);
        let d = f[0].delivered.lock().unwrap().clone();
        assert_eq!(d[0].data, 0x30);
        assert_eq!(d[1].data, 0x31);
        // Reserved Vector Control bits stay zero.
        t.write_table(12, &0xffff_fffeu32.to_le_bytes());
        let mut r = [0u8; 4];
        t.read_table(12, &mut r);
        assert_eq!(u32::from_le_bytes(r), 0);
        // Redundant updates do not re-route.
        let before = *f[0].route_changes.lock().unwrap();
        t.write_table(0, &0xfee0_0000u32.to_le_bytes());
        assert_eq!(*f[0].route_changes.lock().unwrap(), before);
    }

    #[test]
    fn qword_and_odd_accesses_are_safe() {
        let (mut t, _f) = table(4);
        t.write_table(16, &0x0000_0001_fee0_1000u64.to_le_bytes());
        let mut d = [0u8; 8];
        t.read_table(16, &mut d);
        assert_eq!(u64::from_le_bytes(d), 0x0000_0001_fee0_1000);
        // Past the end: ignored / zero.
        t.write_table(64, &[1, 2, 3, 4]);
        t.write_table(u64::MAX - 2, &[1, 2, 3, 4, 5]);
        t.read_table(u64::MAX - 2, &mut d);
        assert_eq!(d, [0; 8]);
        t.read_pba(u64::MAX, &mut d);
        assert_eq!(d, [0; 8]);
        let mut rng = crate::test_util::Rng::new(3);
        let mut buf = [0u8; 9];
        for _ in 0..10_000 {
            let off = rng.below(200);
            let len = rng.below(10) as usize;
            for b in buf.iter_mut() {
                *b = rng.next() as u8;
            }
            match rng.below(4) {
                0 => t.read_table(off, &mut buf[..len]),
                1 => t.write_table(off, &buf[..len]),
                2 => t.trigger(rng.below(6) as usize),
                _ => t.set_control(rng.below(2) == 0, rng.below(2) == 0),
            }
        }
    }

    #[test]
    fn capability_layout_and_control_sync() {
        use super::super::config::{PciConfiguration, PciHeader};
        let mut c = PciConfiguration::new(&PciHeader {
            vendor_id: 1,
            device_id: 2,
            class_code: 0,
            revision_id: 0,
            subsystem_vendor_id: 0,
            subsystem_id: 0,
        });
        let l = MsixLayout {
            vectors: 3,
            table_bar: 0,
            table_offset: 0x4000,
            pba_bar: 0,
            pba_offset: 0x5000,
        };
        let cap = add_capability(&mut c, &l).unwrap();
        assert_eq!(c.u8_at(usize::from(cap)), MSIX_CAP_ID);
        assert_eq!(c.u16_at(cap + 2), 2);
        assert_eq!(c.u32_at(cap + 4), 0x4000);
        assert_eq!(c.u32_at(cap + 8), 0x5000);
        // Table size is read-only; enable and mask are writable.
        c.write(cap + 2, &0xffffu16.to_le_bytes());
        assert_eq!(c.u16_at(cap + 2), 0xc002);
        let (mut t, _f) = table(3);
        sync_control(&c, cap, &mut t);
        assert!(t.enabled());
        assert!(t.masked(0));
        assert!(add_capability(
            &mut c,
            &MsixLayout {
                table_offset: 4,
                ..l
            }
        )
        .is_err());
        assert!(add_capability(&mut c, &MsixLayout { vectors: 0, ..l }).is_err());
    }

    #[test]
    fn reset_masks_everything() {
        let (mut t, f) = table(2);
        t.set_control(true, false);
        program(&mut t, 1, 0xfee0_0000, 0x22, false);
        t.trigger(1);
        t.reset();
        assert!(!t.enabled());
        assert!(t.masked(1));
        assert_eq!(*f[1].route.lock().unwrap(), None);
        let s = t.state();
        assert!(s.entries.iter().all(|e| e.vector_control == 1));
        t.restore(&s).unwrap();
    }
}
