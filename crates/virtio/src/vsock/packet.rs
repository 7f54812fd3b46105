//! The virtio-vsock packet header (virtio 1.2 §5.10.6, `struct virtio_vsock_hdr`): 44 bytes,
//! little-endian, in front of every packet on the receive and transmit queues.

/// Size of the header.
pub const HDR_LEN: usize = 44;

/// Well-known context IDs (§5.10.4): the host is 2.
pub const VMADDR_CID_HOST: u64 = 2;

/// `type`: stream sockets.
pub const VIRTIO_VSOCK_TYPE_STREAM: u16 = 1;

/// `op` (§5.10.6).
pub const VIRTIO_VSOCK_OP_INVALID: u16 = 0;
pub const VIRTIO_VSOCK_OP_REQUEST: u16 = 1;
pub const VIRTIO_VSOCK_OP_RESPONSE: u16 = 2;
pub const VIRTIO_VSOCK_OP_RST: u16 = 3;
pub const VIRTIO_VSOCK_OP_SHUTDOWN: u16 = 4;
pub const VIRTIO_VSOCK_OP_RW: u16 = 5;
pub const VIRTIO_VSOCK_OP_CREDIT_UPDATE: u16 = 6;
pub const VIRTIO_VSOCK_OP_CREDIT_REQUEST: u16 = 7;

/// `flags` of a SHUTDOWN: the sender will receive / send no more.
pub const VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE: u32 = 1;
pub const VIRTIO_VSOCK_SHUTDOWN_F_SEND: u32 = 2;
pub const VIRTIO_VSOCK_SHUTDOWN_ALL: u32 = 3;

/// Largest payload of one packet either way (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
/// Event id of `struct virtio_vsock_event` (le32): the transport was reset, as after a
/// migration or restore; the driver drops its connections and re-reads `guest_cid`
/// (§5.10.6.7).
pub const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;
/// Bytes of `struct virtio_vsock_event`.
pub const EVENT_LEN: usize = 4;

pub const MAX_PAYLOAD: usize = 64 << 10;

/// `struct virtio_vsock_hdr`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| u64::from(u32_at(i)) | u64::from(u32_at(i + 4)) << 32;
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Why a packet from the driver is ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("source CID {0} is not the guest's")]
    SrcCid(u64),
    #[error("destination CID {0} is not the host")]
    DstCid(u64),
    #[error("socket type {0} is not stream")]
    Type(u16),
    #[error("payload length {len} but {avail} bytes follow the header")]
    Length { len: u32, avail: u64 },
    #[error("payload of {0} bytes is larger than {MAX_PAYLOAD}")]
    TooLong(u32),
    #[error("payload on a {0} packet")]
    PayloadOnControl(u16),
    #[error("unknown operation {0}")]
    Op(u16),
}

impl Header {
    /// Check a packet the driver sent (§5.10.6.3): addressed from `guest_cid` to the host, a
    /// stream packet, a known operation, a payload (RW only) that fits what the chain holds
    /// (`avail` bytes after the header) and the protocol's maximum.
    pub fn check_tx(&self, guest_cid: u64, avail: u64) -> Result<(), PacketError> {
        if self.src_cid != guest_cid {
            return Err(PacketError::SrcCid(self.src_cid));
        }
        if self.dst_cid != VMADDR_CID_HOST {
            return Err(PacketError::DstCid(self.dst_cid));
        }
        if self.type_ != VIRTIO_VSOCK_TYPE_STREAM {
            return Err(PacketError::Type(self.type_));
        }
        if !(VIRTIO_VSOCK_OP_REQUEST..=VIRTIO_VSOCK_OP_CREDIT_REQUEST).contains(&self.op) {
            return Err(PacketError::Op(self.op));
        }
        if self.len as usize > MAX_PAYLOAD {
            return Err(PacketError::TooLong(self.len));
        }
        if u64::from(self.len) > avail {
            return Err(PacketError::Length {
                len: self.len,
                avail,
            });
        }
        if self.len > 0 && self.op != VIRTIO_VSOCK_OP_RW {
            return Err(PacketError::PayloadOnControl(self.op));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw(len: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: VMADDR_CID_HOST,
            src_port: 1025,
            dst_port: 80,
            len,
            type_: VIRTIO_VSOCK_TYPE_STREAM,
            op: VIRTIO_VSOCK_OP_RW,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn header_round_trips_little_endian() {
        let mut h = rw(100);
        h.src_cid = 0x1_0000_0003;
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &[3, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(&b[24..28], &[100, 0, 0, 0]);
        assert_eq!(&b[30..32], &[5, 0]);
        assert_eq!(Header::from_bytes(&b), h);
    }

    #[test]
    fn packets_are_checked() {
        assert_eq!(rw(100).check_tx(3, 100), Ok(()));
        assert_eq!(rw(0).check_tx(3, 0), Ok(()));
        assert_eq!(rw(100).check_tx(4, 100), Err(PacketError::SrcCid(3)));
        let mut h = rw(0);
        h.dst_cid = 1;
        assert_eq!(h.check_tx(3, 0), Err(PacketError::DstCid(1)));
        h.dst_cid = u64::MAX;
        assert!(h.check_tx(3, 0).is_err());
        let mut h = rw(0);
        h.type_ = 2;
        assert_eq!(h.check_tx(3, 0), Err(PacketError::Type(2)));
        for op in [0u16, 8, 0xffff] {
            let mut h = rw(0);
            h.op = op;
            assert_eq!(h.check_tx(3, 0), Err(PacketError::Op(op)));
        }
        assert_eq!(
            rw(101).check_tx(3, 100),
            Err(PacketError::Length {
                len: 101,
                avail: 100
            })
        );
        assert_eq!(
            rw(u32::MAX).check_tx(3, u64::MAX),
            Err(PacketError::TooLong(u32::MAX))
        );
        let mut h = rw(10);
        h.op = VIRTIO_VSOCK_OP_REQUEST;
        assert_eq!(
            h.check_tx(3, 10),
            Err(PacketError::PayloadOnControl(VIRTIO_VSOCK_OP_REQUEST))
        );
    }
}
