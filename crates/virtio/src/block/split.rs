//! A second thread for half of each large buffered transfer.
//!
//! A buffered read or write (a disk without `direct=on`) whose data is in the host's page
//! cache is a memory copy between the page cache and guest memory, a few GB/s on one CPU:
//! ~300 µs for a 1 MiB request on the build machine, a third of a guest `dd`'s time per
//! request. The guest waits for the whole request, and its vCPU is halted meanwhile, so a
//! second CPU is usually free: the device thread hands the second half of a transfer of at
//! least [`SPLIT_MIN`] bytes to its helper thread and copies the first half itself. Smaller
//! transfers are not worth the hand-over (a thread wake-up, 5-20 µs).
//!
//! O_DIRECT disks do not use it: their transfers go to Linux AIO, which already keeps many
//! in flight.

use std::io;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use vm_memory::GuestAddress;

use super::DiskImage;
use vireo_hv::GuestMemory;

/// Smallest transfer split in two.
pub const SPLIT_MIN: u64 = 256 << 10;

/// Guest ranges, in transfer order.
type Ranges = Vec<(GuestAddress, usize)>;

/// The helper's half of a transfer.
struct Job {
    mem: GuestMemory,
    ranges: Ranges,
    offset: u64,
    write: bool,
}

/// The helper thread of one device thread (its queue, its answers).
pub struct Splitter {
    jobs: Option<mpsc::Sender<Job>>,
    done: mpsc::Receiver<io::Result<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Splitter {
    /// Start the helper (`name` names its thread) for transfers on `disk`. It runs the
    /// device threads' start hook (their seccomp filter) first.
    pub fn spawn(disk: Arc<DiskImage>, name: String) -> io::Result<Splitter> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let (tx, done) = mpsc::channel();
        let thread = crate::worker::spawn_device_thread(name.clone(), move || {
            if !crate::worker::run_start_hook(&name) {
                return; // the device thread then does every transfer itself
            }
            for j in rx {
                let r = if j.write {
                    disk.write_from(&j.mem, &j.ranges, j.offset)
                } else {
                    disk.read_into(&j.mem, &j.ranges, j.offset)
                };
                if tx.send(r).is_err() {
                    return;
                }
            }
        })?;
        Ok(Splitter {
            jobs: Some(jobs),
            done,
            thread: Some(thread),
        })
    }

    /// Move `len` bytes between the guest `ranges` and `disk` at `offset`: the second half
    /// on the helper, the first half here, both done when this returns. Without a helper
    /// (its thread could not start or has stopped) all of it here.
    pub fn transfer(
        &mut self,
        disk: &DiskImage,
        mem: &GuestMemory,
        ranges: &[(GuestAddress, usize)],
        offset: u64,
        len: u64,
        write: bool,
    ) -> io::Result<()> {
        let here = |r: &[(GuestAddress, usize)], at: u64| {
            if write {
                disk.write_from(mem, r, at)
            } else {
                disk.read_into(mem, r, at)
            }
        };
        let half = (len / 2) & !(super::SECTOR_SIZE - 1);
        let (first, second) = split_at(ranges, half);
        let job = Job {
            mem: mem.clone(),
            ranges: second,
            offset: offset + half,
            write,
        };
        let sent = match &self.jobs {
            Some(jobs) => jobs.send(job).map_err(|e| e.0),
            None => Err(job),
        };
        let job = match sent {
            Ok(()) => {
                let mine = here(&first, offset);
                // The helper's answer, even after an error here: its half uses guest memory
                // until then.
                return match self.done.recv() {
                    Ok(theirs) => mine.and(theirs),
                    Err(_) => {
                        self.jobs = None;
                        Err(io::Error::other("the transfer helper thread stopped"))
                    }
                };
            }
            Err(job) => job,
        };
        self.jobs = None;
        here(&first, offset)?;
        here(&job.ranges, job.offset)
    }
}

impl Drop for Splitter {
    fn drop(&mut self) {
        self.jobs = None; // ends the helper's loop
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `ranges` cut at byte `at`: the ranges before it and the ranges from it on (a range that
/// spans `at` is cut in two).
fn split_at(ranges: &[(GuestAddress, usize)], at: u64) -> (Ranges, Ranges) {
    let mut first = Vec::with_capacity(ranges.len());
    let mut second = Vec::with_capacity(ranges.len());
    let mut pos = 0u64;
    for &(addr, len) in ranges {
        let end = pos + len as u64;
        if end <= at {
            first.push((addr, len));
        } else if pos >= at {
            second.push((addr, len));
        } else {
            let k = (at - pos) as usize;
            first.push((addr, k));
            // A range that wraps fails later, in the transfer, as memory outside RAM.
            second.push((GuestAddress(addr.0.wrapping_add(k as u64)), len - k));
        }
        pos = end;
    }
    (first, second)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_at_cuts_the_range_that_spans_the_point() {
        let r = [
            (GuestAddress(0x1000), 0x800),
            (GuestAddress(0x9000), 0x1000),
            (GuestAddress(0x20000), 0x3000),
        ];
        let (a, b) = split_at(&r, 0x1000);
        assert_eq!(
            a,
            vec![(GuestAddress(0x1000), 0x800), (GuestAddress(0x9000), 0x800)]
        );
        assert_eq!(
            b,
            vec![
                (GuestAddress(0x9800), 0x800),
                (GuestAddress(0x20000), 0x3000)
            ]
        );
        let (a, b) = split_at(&r, 0x1800);
        assert_eq!(a, r[..2].to_vec());
        assert_eq!(b, r[2..].to_vec());
        let (a, b) = split_at(&r, 0);
        assert!(a.is_empty());
        assert_eq!(b, r.to_vec());
    }
}
