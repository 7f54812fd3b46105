//! The virtio-net packet header (virtio 1.2 §5.1.6, `struct virtio_net_hdr`): 12 bytes in
//! front of every frame in both directions once VIRTIO_F_VERSION_1 is negotiated, and the
//! same layout the TAP device reads and writes with IFF_VNET_HDR and a header size of 12.
//!
//! Frames the driver transmits are checked here before they reach the host (§5.1.6.2): the
//! checksum and segmentation requests must be ones the device offered and the driver accepted,
//! and every offset must lie inside the frame. Frames the host delivers are adjusted to what
//! the driver accepted (§5.1.6.4): a driver without VIRTIO_NET_F_GUEST_CSUM gets `flags` 0.

use super::features::*;

/// Size of the header with VIRTIO_F_VERSION_1 (`num_buffers` included).
pub const VNET_HDR_LEN: usize = 12;

/// `flags` (§5.1.6).
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
pub const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;
pub const VIRTIO_NET_HDR_F_RSC_INFO: u8 = 4;

/// `gso_type` (§5.1.6).
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
pub const VIRTIO_NET_HDR_GSO_UDP: u8 = 3;
pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
pub const VIRTIO_NET_HDR_GSO_UDP_L4: u8 = 5;
pub const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;

/// An Ethernet header: the shortest frame worth passing on.
pub const ETH_HLEN: usize = 14;
/// The largest frame (without the virtio header) either direction carries: a 64 KiB IP
/// packet (the GSO limit) behind an Ethernet header and a VLAN tag.
pub const MAX_FRAME_LEN: usize = 65535 + ETH_HLEN + 4;

/// `struct virtio_net_hdr`, little-endian on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHeader {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

/// Why a transmitted frame is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TxHeaderError {
    #[error("frame of {0} bytes (must be {ETH_HLEN} to {MAX_FRAME_LEN})")]
    FrameLength(usize),
    #[error("checksum offload requested without VIRTIO_NET_F_CSUM")]
    CsumNotNegotiated,
    #[error("checksum at {start}+{offset} outside a frame of {len} bytes")]
    CsumOutOfFrame { start: u16, offset: u16, len: usize },
    #[error("segmentation type {0:#x} not negotiated or unknown")]
    GsoType(u8),
    #[error("segmentation without a checksum request")]
    GsoWithoutCsum,
    #[error("segmentation with gso_size 0")]
    GsoSizeZero,
    #[error("header length {hdr_len} beyond a frame of {len} bytes")]
    HdrLen { hdr_len: u16, len: usize },
}

impl VnetHeader {
    pub fn from_bytes(b: &[u8; VNET_HDR_LEN]) -> Self {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        VnetHeader {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            num_buffers: u16_at(10),
        }
    }

    pub fn to_bytes(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }

    /// Check the header of a frame of `frame_len` bytes (after the header) the driver wants to
    /// send, with the negotiated `features` (§5.1.6.2.1), and return the header to hand the
    /// host: bits the driver must not set are cleared, `num_buffers` is 0.
    pub fn check_tx(&self, frame_len: usize, features: u64) -> Result<VnetHeader, TxHeaderError> {
        if !(ETH_HLEN..=MAX_FRAME_LEN).contains(&frame_len) {
            return Err(TxHeaderError::FrameLength(frame_len));
        }
        let mut h = *self;
        h.num_buffers = 0;
        // DATA_VALID and RSC_INFO are the device's to set (§5.1.6.2.1).
        h.flags &= VIRTIO_NET_HDR_F_NEEDS_CSUM;
        if h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
            if features & VIRTIO_NET_F_CSUM == 0 {
                return Err(TxHeaderError::CsumNotNegotiated);
            }
            let end = usize::from(h.csum_start) + usize::from(h.csum_offset) + 2;
            if end > frame_len {
                return Err(TxHeaderError::CsumOutOfFrame {
                    start: h.csum_start,
                    offset: h.csum_offset,
                    len: frame_len,
                });
            }
        } else {
            h.csum_start = 0;
            h.csum_offset = 0;
        }
        let ecn = h.gso_type & VIRTIO_NET_HDR_GSO_ECN != 0;
        let kind = h.gso_type & !VIRTIO_NET_HDR_GSO_ECN;
        if kind == VIRTIO_NET_HDR_GSO_NONE {
            if ecn {
                return Err(TxHeaderError::GsoType(h.gso_type));
            }
            h.gso_size = 0;
            // hdr_len is only a hint without segmentation; keep it only when it is sane.
            if usize::from(h.hdr_len) > frame_len {
                h.hdr_len = 0;
            }
            return Ok(h);
        }
        let needed = match kind {
            VIRTIO_NET_HDR_GSO_TCPV4 => VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_HDR_GSO_TCPV6 => VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_HDR_GSO_UDP => VIRTIO_NET_F_HOST_UFO,
            _ => return Err(TxHeaderError::GsoType(h.gso_type)),
        };
        if features & needed == 0 || (ecn && features & VIRTIO_NET_F_HOST_ECN == 0) {
            return Err(TxHeaderError::GsoType(h.gso_type));
        }
        if h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM == 0 {
            return Err(TxHeaderError::GsoWithoutCsum);
        }
        if h.gso_size == 0 {
            return Err(TxHeaderError::GsoSizeZero);
        }
        if usize::from(h.hdr_len) > frame_len {
            return Err(TxHeaderError::HdrLen {
                hdr_len: h.hdr_len,
                len: frame_len,
            });
        }
        Ok(h)
    }

    /// Adjust the header of a frame the host delivers to what the driver accepted
    /// (§5.1.6.4.1): without GUEST_CSUM, `flags` is 0; segmentation offloads the driver did
    /// not accept make the frame undeliverable (`None`: drop it). `num_buffers` is set to
    /// `buffers`.
    pub fn for_rx(&self, features: u64, buffers: u16) -> Option<VnetHeader> {
        let mut h = *self;
        h.num_buffers = buffers;
        h.flags &= VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID;
        if features & VIRTIO_NET_F_GUEST_CSUM == 0 {
            if h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
                return None;
            }
            h.flags = 0;
        }
        let ecn = h.gso_type & VIRTIO_NET_HDR_GSO_ECN != 0;
        let needed = match h.gso_type & !VIRTIO_NET_HDR_GSO_ECN {
            VIRTIO_NET_HDR_GSO_NONE => 0,
            VIRTIO_NET_HDR_GSO_TCPV4 => VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_HDR_GSO_TCPV6 => VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_HDR_GSO_UDP => VIRTIO_NET_F_GUEST_UFO,
            _ => return None,
        };
        if features & needed != needed || (ecn && features & VIRTIO_NET_F_GUEST_ECN == 0) {
            return None;
        }
        Some(h)
    }
}

/// The TAP offload flags (`TUNSETOFFLOAD`) matching the driver's receive features: what the
/// host may hand us knowing the driver takes it. Checksum offload is the base of every
/// segmentation offload (§5.1.3.1), so without GUEST_CSUM nothing is offloaded.
pub fn tap_offloads(features: u64) -> u32 {
    if features & VIRTIO_NET_F_GUEST_CSUM == 0 {
        return 0;
    }
    let mut f = libc::TUN_F_CSUM;
    if features & VIRTIO_NET_F_GUEST_TSO4 != 0 {
        f |= libc::TUN_F_TSO4;
    }
    if features & VIRTIO_NET_F_GUEST_TSO6 != 0 {
        f |= libc::TUN_F_TSO6;
    }
    if features & VIRTIO_NET_F_GUEST_ECN != 0
        && features & (VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6) != 0
    {
        f |= libc::TUN_F_TSO_ECN;
    }
    if features & VIRTIO_NET_F_GUEST_UFO != 0 {
        f |= libc::TUN_F_UFO;
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: u64 = VIRTIO_NET_F_CSUM
        | VIRTIO_NET_F_GUEST_CSUM
        | VIRTIO_NET_F_HOST_TSO4
        | VIRTIO_NET_F_HOST_TSO6
        | VIRTIO_NET_F_HOST_ECN
        | VIRTIO_NET_F_HOST_UFO
        | VIRTIO_NET_F_GUEST_TSO4
        | VIRTIO_NET_F_GUEST_TSO6
        | VIRTIO_NET_F_GUEST_ECN
        | VIRTIO_NET_F_GUEST_UFO;

    fn tso4(csum_start: u16, csum_offset: u16) -> VnetHeader {
        VnetHeader {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
            hdr_len: 66,
            gso_size: 1448,
            csum_start,
            csum_offset,
            num_buffers: 7,
        }
    }

    #[test]
    fn bytes_round_trip_little_endian() {
        let h = tso4(34, 16);
        let b = h.to_bytes();
        assert_eq!(b, [1, 1, 66, 0, 0xa8, 5, 34, 0, 16, 0, 7, 0]);
        assert_eq!(VnetHeader::from_bytes(&b), h);
    }

    #[test]
    fn good_tx_headers_pass_and_are_cleaned() {
        let h = tso4(34, 16).check_tx(65000, ALL).unwrap();
        assert_eq!(h.num_buffers, 0);
        assert_eq!(h.gso_size, 1448);
        // No offload: offsets and size are zeroed, reserved flags cleared.
        let plain = VnetHeader {
            flags: VIRTIO_NET_HDR_F_DATA_VALID | VIRTIO_NET_HDR_F_RSC_INFO,
            csum_start: 999,
            csum_offset: 999,
            gso_size: 5,
            hdr_len: 20,
            ..Default::default()
        };
        let h = plain.check_tx(60, 0).unwrap();
        assert_eq!(
            h,
            VnetHeader {
                hdr_len: 20,
                ..Default::default()
            }
        );
        // Checksum offset exactly at the end of the frame.
        assert!(VnetHeader {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            csum_start: 40,
            csum_offset: 18,
            ..Default::default()
        }
        .check_tx(60, VIRTIO_NET_F_CSUM)
        .is_ok());
    }

    #[test]
    fn absurd_tx_headers_are_refused() {
        use TxHeaderError::*;
        assert_eq!(
            VnetHeader::default().check_tx(13, ALL),
            Err(FrameLength(13))
        );
        assert_eq!(
            VnetHeader::default().check_tx(MAX_FRAME_LEN + 1, ALL),
            Err(FrameLength(MAX_FRAME_LEN + 1))
        );
        // Offsets past the frame, including the u16 extremes.
        for (s, o) in [(59, 0), (40, 19), (u16::MAX, u16::MAX), (0, u16::MAX)] {
            let h = VnetHeader {
                flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
                csum_start: s,
                csum_offset: o,
                ..Default::default()
            };
            assert!(
                matches!(h.check_tx(60, ALL), Err(CsumOutOfFrame { .. })),
                "{s} {o}"
            );
        }
        // Offloads that were not negotiated.
        assert_eq!(tso4(34, 16).check_tx(1000, 0), Err(CsumNotNegotiated));
        assert_eq!(
            tso4(34, 16).check_tx(1000, VIRTIO_NET_F_CSUM),
            Err(GsoType(VIRTIO_NET_HDR_GSO_TCPV4))
        );
        let mut ecn = tso4(34, 16);
        ecn.gso_type |= VIRTIO_NET_HDR_GSO_ECN;
        assert!(ecn.check_tx(1000, ALL).is_ok());
        assert_eq!(
            ecn.check_tx(1000, ALL & !VIRTIO_NET_F_HOST_ECN),
            Err(GsoType(0x81))
        );
        // Unknown types, ECN alone, UDP_L4 (USO is not offered).
        for t in [2u8, 6, 0x7f, 0x80, VIRTIO_NET_HDR_GSO_UDP_L4] {
            let mut h = tso4(34, 16);
            h.gso_type = t;
            assert_eq!(h.check_tx(1000, ALL), Err(GsoType(t)), "{t}");
        }
        let mut h = tso4(34, 16);
        h.flags = 0;
        assert_eq!(h.check_tx(1000, ALL), Err(GsoWithoutCsum));
        let mut h = tso4(34, 16);
        h.gso_size = 0;
        assert_eq!(h.check_tx(1000, ALL), Err(GsoSizeZero));
        let mut h = tso4(34, 16);
        h.hdr_len = 1001;
        assert!(matches!(h.check_tx(1000, ALL), Err(HdrLen { .. })));
    }

    #[test]
    fn rx_headers_follow_the_driver_features() {
        let from_tap = VnetHeader {
            flags: VIRTIO_NET_HDR_F_DATA_VALID,
            ..Default::default()
        };
        // Without GUEST_CSUM the flags are cleared.
        assert_eq!(from_tap.for_rx(0, 1).unwrap().flags, 0);
        assert_eq!(
            from_tap.for_rx(VIRTIO_NET_F_GUEST_CSUM, 3).unwrap(),
            VnetHeader {
                flags: VIRTIO_NET_HDR_F_DATA_VALID,
                num_buffers: 3,
                ..Default::default()
            }
        );
        // A partial checksum or a GSO frame the driver cannot take is dropped.
        let partial = VnetHeader {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            ..Default::default()
        };
        assert_eq!(partial.for_rx(0, 1), None);
        let gso = tso4(34, 16);
        assert_eq!(gso.for_rx(VIRTIO_NET_F_GUEST_CSUM, 1), None);
        assert!(gso
            .for_rx(VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4, 1)
            .is_some());
        let mut odd = gso;
        odd.gso_type = 9;
        assert_eq!(odd.for_rx(ALL, 1), None);
    }

    #[test]
    fn tap_offloads_follow_the_driver() {
        assert_eq!(tap_offloads(0), 0);
        assert_eq!(tap_offloads(VIRTIO_NET_F_GUEST_TSO4), 0, "TSO needs CSUM");
        assert_eq!(tap_offloads(VIRTIO_NET_F_GUEST_CSUM), libc::TUN_F_CSUM);
        assert_eq!(
            tap_offloads(ALL),
            libc::TUN_F_CSUM
                | libc::TUN_F_TSO4
                | libc::TUN_F_TSO6
                | libc::TUN_F_TSO_ECN
                | libc::TUN_F_UFO
        );
        assert_eq!(
            tap_offloads(VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_ECN),
            libc::TUN_F_CSUM,
            "ECN only with TSO"
        );
    }
}
