//! The live-migration wire format, over one TCP connection.
//!
//! Handshake: the source sends `VIREOMIG` and its protocol version (u32, little-endian); the
//! destination answers `VIREOMIG`, its own version and one byte, 1 when it accepts. A peer
//! that does not start with the magic is not vireo; a version mismatch is refused by both
//! sides before anything else is sent.
//!
//! Then frames, each a 24-byte header — kind (u8), three zero bytes, payload length (u32),
//! an address or count (u64), CRC-32 of the first 16 header bytes and the payload (u32), four
//! zero bytes — and the payload. A frame whose checksum, kind, length or zero bytes are wrong
//! ends the migration: the stream is corrupted or not ours.

use std::io::{Read, Write};

use super::MigrateError;

pub const MAGIC: &[u8; 8] = b"VIREOMIG";
/// Version of this protocol; both ends must speak the same.
pub const PROTOCOL_VERSION: u32 = 1;
pub const PAGE: u64 = 4096;
/// Pages per `Pages` frame at most.
pub const MAX_FRAME_PAGES: u64 = 64;
/// Largest payload accepted: a state (bounded like a snapshot's state file) or a run of pages.
pub const MAX_PAYLOAD: u32 = 256 << 20;
const HEADER: usize = 24;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Source → destination: the VM's configuration and backend (JSON [`super::Offer`]).
    Offer = 1,
    /// Pages of RAM from guest-physical `arg` (the payload, a multiple of 4 KiB).
    Pages = 2,
    /// `arg` zero pages from the guest-physical address in the payload (u64).
    Zeros = 3,
    /// The machine state: the bytes of a snapshot state file (versioned, SHA-256 checked).
    State = 4,
    /// Start the guest.
    Commit = 5,
    /// The source gives up (payload: why).
    Abort = 6,
    /// Destination → source: the offer is accepted, memory is ready.
    Ready = 0x81,
    /// The machine is rebuilt (paused), waiting for `Commit`.
    Restored = 0x82,
    /// The guest runs at the destination.
    Running = 0x83,
    /// The destination refuses (payload: why).
    Refused = 0x84,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Offer,
            2 => Kind::Pages,
            3 => Kind::Zeros,
            4 => Kind::State,
            5 => Kind::Commit,
            6 => Kind::Abort,
            0x81 => Kind::Ready,
            0x82 => Kind::Restored,
            0x83 => Kind::Running,
            0x84 => Kind::Refused,
            _ => return None,
        })
    }
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> MigrateError {
    move |source| MigrateError::Io { what, source }
}

/// Write one frame.
pub fn write_frame(
    w: &mut impl Write,
    kind: Kind,
    arg: u64,
    payload: &[u8],
) -> Result<(), MigrateError> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&l| l <= MAX_PAYLOAD)
        .ok_or_else(|| {
            MigrateError::Protocol(format!("a {} byte frame is too large", payload.len()))
        })?;
    let mut h = [0u8; HEADER];
    h[0] = kind as u8;
    h[4..8].copy_from_slice(&len.to_le_bytes());
    h[8..16].copy_from_slice(&arg.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h[..16]);
    crc.update(payload);
    h[16..20].copy_from_slice(&crc.finalize().to_le_bytes());
    w.write_all(&h).map_err(io("sending"))?;
    w.write_all(payload).map_err(io("sending"))
}

/// Read one frame into `buf` (its payload); returns the kind and argument. Checks the
/// header's shape and the checksum.
pub fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<(Kind, u64), MigrateError> {
    let mut h = [0u8; HEADER];
    r.read_exact(&mut h).map_err(io("receiving"))?;
    let corrupt = |why: &str| MigrateError::Protocol(format!("corrupted stream: {why}"));
    let kind =
        Kind::from_u8(h[0]).ok_or_else(|| corrupt(&format!("unknown frame kind {:#x}", h[0])))?;
    if h[1..4] != [0; 3] || h[20..24] != [0; 4] {
        return Err(corrupt("bad frame header"));
    }
    let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    if len > MAX_PAYLOAD {
        return Err(corrupt(&format!("{len} byte frame")));
    }
    let mut a = [0u8; 8];
    a.copy_from_slice(&h[8..16]);
    let arg = u64::from_le_bytes(a);
    buf.clear();
    buf.resize(len as usize, 0);
    r.read_exact(buf).map_err(io("receiving"))?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h[..16]);
    crc.update(buf);
    if crc.finalize().to_le_bytes() != h[16..20] {
        return Err(corrupt("checksum mismatch"));
    }
    Ok((kind, arg))
}

/// Read the next frame and insist on `want` (a `Refused` or `Abort` becomes the peer's
/// reason).
pub fn expect(r: &mut impl Read, buf: &mut Vec<u8>, want: Kind) -> Result<u64, MigrateError> {
    match read_frame(r, buf)? {
        (k, arg) if k == want => Ok(arg),
        (Kind::Refused | Kind::Abort, _) => Err(MigrateError::Peer(
            String::from_utf8_lossy(buf).into_owned(),
        )),
        (k, _) => Err(MigrateError::Protocol(format!(
            "expected {want:?}, got {k:?}"
        ))),
    }
}

/// The source's half of the handshake.
pub fn hello_client(s: &mut (impl Read + Write)) -> Result<(), MigrateError> {
    let mut m = Vec::with_capacity(12);
    m.extend_from_slice(MAGIC);
    m.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    s.write_all(&m).map_err(io("handshake"))?;
    s.flush().map_err(io("handshake"))?;
    let mut r = [0u8; 13];
    s.read_exact(&mut r).map_err(io("handshake"))?;
    if &r[..8] != MAGIC {
        return Err(MigrateError::Protocol(
            "the destination is not a vireo migration receiver".into(),
        ));
    }
    let theirs = u32::from_le_bytes([r[8], r[9], r[10], r[11]]);
    if theirs != PROTOCOL_VERSION || r[12] != 1 {
        return Err(MigrateError::Version {
            ours: PROTOCOL_VERSION,
            theirs,
        });
    }
    Ok(())
}

/// The destination's half of the handshake; a foreign or other-version peer is refused.
pub fn hello_server(s: &mut (impl Read + Write)) -> Result<(), MigrateError> {
    let mut r = [0u8; 12];
    s.read_exact(&mut r).map_err(io("handshake"))?;
    if &r[..8] != MAGIC {
        return Err(MigrateError::Protocol(
            "the peer is not a vireo migration source".into(),
        ));
    }
    let theirs = u32::from_le_bytes([r[8], r[9], r[10], r[11]]);
    let ok = theirs == PROTOCOL_VERSION;
    let mut m = Vec::with_capacity(13);
    m.extend_from_slice(MAGIC);
    m.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    m.push(ok as u8);
    s.write_all(&m).map_err(io("handshake"))?;
    s.flush().map_err(io("handshake"))?;
    if !ok {
        return Err(MigrateError::Version {
            ours: PROTOCOL_VERSION,
            theirs,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_every_flipped_bit_is_caught() {
        let mut out = Vec::new();
        write_frame(&mut out, Kind::Pages, 0x1000, &[7u8; 4096]).unwrap();
        let mut buf = Vec::new();
        let (k, a) = read_frame(&mut out.as_slice(), &mut buf).unwrap();
        assert_eq!((k, a), (Kind::Pages, 0x1000));
        assert_eq!(buf, vec![7u8; 4096]);
        for i in (0..out.len()).step_by(97).chain(0..HEADER) {
            let mut bad = out.clone();
            bad[i] ^= 0x10;
            assert!(
                read_frame(&mut bad.as_slice(), &mut buf).is_err(),
                "byte {i}"
            );
        }
        // Truncated.
        assert!(read_frame(&mut &out[..out.len() - 1], &mut buf).is_err());
    }

    #[test]
    fn expect_reports_the_peers_reason() {
        let mut out = Vec::new();
        write_frame(&mut out, Kind::Refused, 0, b"no kvm here").unwrap();
        let e = expect(&mut out.as_slice(), &mut Vec::new(), Kind::Ready).unwrap_err();
        assert!(e.to_string().contains("no kvm here"), "{e}");
    }

    /// A pair of in-memory pipes standing for a socket.
    struct Duplex {
        input: std::io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }
    impl Read for Duplex {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(b)
        }
    }
    impl Write for Duplex {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.output.write(b)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn handshake_refuses_other_versions_and_strangers() {
        let mut hello = MAGIC.to_vec();
        hello.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        let mut s = Duplex {
            input: std::io::Cursor::new(hello.clone()),
            output: Vec::new(),
        };
        hello_server(&mut s).unwrap();
        assert_eq!(s.output[12], 1);
        let mut v2 = MAGIC.to_vec();
        v2.extend_from_slice(&(PROTOCOL_VERSION + 1).to_le_bytes());
        let mut s = Duplex {
            input: std::io::Cursor::new(v2),
            output: Vec::new(),
        };
        let e = hello_server(&mut s).unwrap_err();
        assert!(matches!(e, MigrateError::Version { .. }), "{e}");
        assert_eq!(s.output[12], 0, "the refusal is sent");
        let mut s = Duplex {
            input: std::io::Cursor::new(b"GET / HTTP/1.1\r\n".to_vec()),
            output: Vec::new(),
        };
        assert!(hello_server(&mut s).is_err());
        // The client side sees the refusal as a version mismatch.
        let mut answer = MAGIC.to_vec();
        answer.extend_from_slice(&(PROTOCOL_VERSION + 1).to_le_bytes());
        answer.push(0);
        let mut c = Duplex {
            input: std::io::Cursor::new(answer),
            output: Vec::new(),
        };
        let e = hello_client(&mut c).unwrap_err();
        assert!(e.to_string().contains("version"), "{e}");
    }
}
