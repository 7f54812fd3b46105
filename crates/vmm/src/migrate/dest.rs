//! The receiving side: memory first, then the state, then the commit.

use std::io::{BufReader, BufWriter, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use vireo_hv::GuestMemory;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::proto::{self, Kind, PAGE};
use super::{MigrateError, Offer};
use crate::machine::Machine;
use crate::snapshot::{self, MachineState};

/// How long the destination waits for the next frame from the source.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// What the VMM does for an incoming migration.
pub(crate) trait Destination {
    /// Check the offer (configuration, backend) and give fresh memory for it.
    fn accept(&mut self, offer: &Offer) -> Result<GuestMemory, String>;
    /// Open the disks and rebuild the machine from `state` around `mem`, paused.
    fn build(&mut self, state: &MachineState, mem: GuestMemory) -> Result<Machine, String>;
    /// Run the guest.
    fn start(&mut self, m: &mut Machine) -> Result<(), String>;
    /// Tear down a machine that will not run (the source gave up, or the link broke).
    fn discard(&mut self, m: Machine);
    /// The migration failed before a machine was built: release what `accept` opened (the
    /// TAPs, so that the next attempt, or another VMM, can have them).
    fn release(&mut self);
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> MigrateError {
    move |source| MigrateError::Io { what, source }
}

struct Conn {
    r: BufReader<TcpStream>,
    w: BufWriter<TcpStream>,
    buf: Vec<u8>,
}

impl Conn {
    fn reply(&mut self, kind: Kind, payload: &[u8]) -> Result<(), MigrateError> {
        proto::write_frame(&mut self.w, kind, 0, payload)?;
        self.w.flush().map_err(io("sending"))
    }

    /// Tell the source why (best effort) and give the error back.
    fn refuse(&mut self, e: MigrateError) -> MigrateError {
        let _ = self.reply(Kind::Refused, e.to_string().as_bytes());
        e
    }
}

/// Receive one VM on `stream`. On success it runs here; on failure nothing is left of it.
pub(crate) fn receive(stream: TcpStream, d: &mut dyn Destination) -> Result<Machine, MigrateError> {
    stream.set_nodelay(true).map_err(io("socket set-up"))?;
    stream
        .set_read_timeout(Some(READ_TIMEOUT))
        .map_err(io("socket set-up"))?;
    let mut s = stream.try_clone().map_err(io("socket set-up"))?;
    proto::hello_server(&mut s)?;
    let mut c = Conn {
        r: BufReader::with_capacity(1 << 20, s),
        w: BufWriter::new(stream),
        buf: Vec::new(),
    };
    proto::expect(&mut c.r, &mut c.buf, Kind::Offer)?;
    let offer: Offer = match serde_json::from_slice(&c.buf) {
        Ok(o) => o,
        Err(e) => return Err(c.refuse(MigrateError::Protocol(format!("bad offer: {e}")))),
    };
    let mem = match d.accept(&offer) {
        Ok(m) => m,
        Err(e) => return Err(c.refuse(MigrateError::Vmm(e))),
    };
    let built = (|| {
        let regions: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        if regions != offer.regions {
            return Err(c.refuse(MigrateError::Protocol(format!(
                "the source's RAM layout {:x?} differs from this one's {regions:x?}",
                offer.regions
            ))));
        }
        c.reply(Kind::Ready, &[])?;
        let state = match receive_memory(&mut c, &mem) {
            Ok(s) => s,
            Err(e @ MigrateError::Peer(_)) | Err(e @ MigrateError::Io { .. }) => return Err(e),
            Err(e) => return Err(c.refuse(e)),
        };
        let t = Instant::now();
        let m = d
            .build(&state, mem)
            .map_err(|e| c.refuse(MigrateError::Vmm(e)))?;
        tracing::info!(
            "migration: machine rebuilt in {:.1} ms",
            t.elapsed().as_secs_f64() * 1e3
        );
        Ok(m)
    })();
    let mut m = match built {
        Ok(m) => m,
        Err(e) => {
            d.release();
            return Err(e);
        }
    };
    let r = (|| {
        c.reply(Kind::Restored, &[])?;
        proto::expect(&mut c.r, &mut c.buf, Kind::Commit)?;
        d.start(&mut m).map_err(MigrateError::Vmm)?;
        Ok(())
    })();
    match r {
        Ok(()) => {
            // The guest runs here now; the source ends its copy when it reads this.
            if let Err(e) = c.reply(Kind::Running, &[]) {
                tracing::warn!("migration: the source did not hear that the guest runs here: {e}");
            }
            Ok(m)
        }
        Err(e) => {
            let e = match e {
                MigrateError::Vmm(_) => c.refuse(e),
                e => e,
            };
            d.discard(m);
            Err(e)
        }
    }
}

/// Pages until the state arrives; returns the state (checked: version and SHA-256).
fn receive_memory(c: &mut Conn, mem: &GuestMemory) -> Result<MachineState, MigrateError> {
    let zeros = vec![0u8; 64 * PAGE as usize];
    loop {
        let (kind, arg) = proto::read_frame(&mut c.r, &mut c.buf)?;
        match kind {
            Kind::Pages => {
                if !arg.is_multiple_of(PAGE) || !(c.buf.len() as u64).is_multiple_of(PAGE) {
                    return Err(MigrateError::Protocol(format!(
                        "corrupted stream: pages at {arg:#x}, {} bytes",
                        c.buf.len()
                    )));
                }
                mem.write_slice(&c.buf, GuestAddress(arg)).map_err(|e| {
                    MigrateError::Protocol(format!("corrupted stream: pages at {arg:#x}: {e}"))
                })?;
            }
            Kind::Zeros => {
                let mut a = [0u8; 8];
                if c.buf.len() != 8 {
                    return Err(MigrateError::Protocol(
                        "corrupted stream: zeros frame".into(),
                    ));
                }
                a.copy_from_slice(&c.buf);
                let addr = u64::from_le_bytes(a);
                let n = arg;
                let end = n
                    .checked_mul(PAGE)
                    .and_then(|l| l.checked_add(addr))
                    .filter(|_| addr.is_multiple_of(PAGE) && n <= 1 << 40)
                    .ok_or_else(|| MigrateError::Protocol("corrupted stream: zero pages".into()))?;
                let mut at = addr;
                while at < end {
                    let l = ((end - at) as usize).min(zeros.len());
                    mem.write_slice(&zeros[..l], GuestAddress(at))
                        .map_err(|e| {
                            MigrateError::Protocol(format!(
                                "corrupted stream: zero pages at {at:#x}: {e}"
                            ))
                        })?;
                    at += l as u64;
                }
            }
            Kind::State => {
                let t = Instant::now();
                let s = snapshot::decode_state(super::source::stream_path(), &c.buf)
                    .map_err(|e| MigrateError::Protocol(e.to_string()));
                tracing::info!(
                    "migration: state ({} KiB) checked and decoded in {:.1} ms",
                    c.buf.len() / 1024,
                    t.elapsed().as_secs_f64() * 1e3
                );
                return s;
            }
            Kind::Abort => {
                return Err(MigrateError::Peer(
                    String::from_utf8_lossy(&c.buf).into_owned(),
                ))
            }
            k => {
                return Err(MigrateError::Protocol(format!(
                    "corrupted stream: unexpected {k:?} frame"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A VMM that counts what the receiving side asked of it and builds no machine.
    #[derive(Default)]
    struct Fake {
        accepted: u32,
        built: u32,
        released: u32,
        mem: Option<GuestMemory>,
    }

    impl Destination for Fake {
        fn accept(&mut self, offer: &Offer) -> Result<GuestMemory, String> {
            self.accepted += 1;
            let ranges: Vec<(GuestAddress, usize)> = offer
                .regions
                .iter()
                .map(|&(a, l)| (GuestAddress(a), l as usize))
                .collect();
            let mem = GuestMemory::from_ranges(&ranges).map_err(|e| e.to_string())?;
            self.mem = Some(mem.clone());
            Ok(mem)
        }
        fn build(&mut self, _: &MachineState, _: GuestMemory) -> Result<Machine, String> {
            self.built += 1;
            Err("no machine in this test".into())
        }
        fn start(&mut self, _: &mut Machine) -> Result<(), String> {
            Err("no machine in this test".into())
        }
        fn discard(&mut self, _: Machine) {}
        fn release(&mut self) {
            self.released += 1;
        }
    }

    /// Run `source` against [`receive`] over loopback TCP; returns the receiver's outcome,
    /// the fake VMM, and what the source thread returned.
    fn session<T: Send + 'static>(
        source: impl FnOnce(TcpStream) -> T + Send + 'static,
    ) -> (Result<(), MigrateError>, Fake, T) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let src = std::thread::spawn(move || source(TcpStream::connect(addr).unwrap()));
        let (s, _) = l.accept().unwrap();
        let mut fake = Fake::default();
        let r = receive(s, &mut fake).map(drop);
        (r, fake, src.join().unwrap())
    }

    /// Handshake and offer one 1 MiB region at 0; returns once `Ready` came back.
    fn offer(s: &mut TcpStream) {
        proto::hello_client(s).unwrap();
        let o = Offer {
            config: crate::config::VmConfig::new("/k"),
            backend: "emu".into(),
            regions: vec![(0, 1 << 20)],
        };
        proto::write_frame(s, Kind::Offer, 0, &serde_json::to_vec(&o).unwrap()).unwrap();
        proto::expect(s, &mut Vec::new(), Kind::Ready).unwrap();
    }

    #[test]
    fn pages_land_in_memory_and_an_abort_releases_what_was_opened() {
        let (r, fake, ()) = session(|mut s| {
            offer(&mut s);
            proto::write_frame(&mut s, Kind::Pages, 0x3000, &[0xab; 4096]).unwrap();
            proto::write_frame(&mut s, Kind::Abort, 0, b"changed my mind").unwrap();
        });
        let e = r.unwrap_err();
        assert!(e.to_string().contains("changed my mind"), "{e}");
        assert_eq!((fake.accepted, fake.built, fake.released), (1, 0, 1));
        let mut page = [0u8; 4096];
        fake.mem
            .unwrap()
            .read_slice(&mut page, GuestAddress(0x3000))
            .unwrap();
        assert_eq!(page, [0xab; 4096]);
    }

    #[test]
    fn a_link_dropped_mid_copy_releases_and_builds_nothing() {
        let (r, fake, ()) = session(|mut s| {
            offer(&mut s);
            proto::write_frame(&mut s, Kind::Pages, 0, &[1; 4096]).unwrap();
        });
        assert!(matches!(r, Err(MigrateError::Io { .. })), "{r:?}");
        assert_eq!((fake.built, fake.released), (0, 1));
    }

    #[test]
    fn pages_outside_ram_and_a_bad_state_are_refused_with_the_reason() {
        for (kind, arg, payload) in [
            (Kind::Pages, 1u64 << 20, vec![0u8; 4096]),
            (Kind::Pages, 0x1001, vec![0u8; 4096]),
            (Kind::Zeros, u64::MAX, 0u64.to_le_bytes().to_vec()),
            (Kind::State, 0, b"not a state".to_vec()),
            (Kind::Commit, 0, Vec::new()),
        ] {
            let (r, fake, reason) = session(move |mut s| {
                offer(&mut s);
                proto::write_frame(&mut s, kind, arg, &payload).unwrap();
                proto::expect(&mut s, &mut Vec::new(), Kind::Ready).unwrap_err()
            });
            assert!(
                matches!(r, Err(MigrateError::Protocol(_))),
                "{kind:?}: {r:?}"
            );
            assert!(
                matches!(reason, MigrateError::Peer(_)),
                "{kind:?}: the source hears why: {reason}"
            );
            assert_eq!((fake.built, fake.released), (0, 1), "{kind:?}");
        }
    }
}
