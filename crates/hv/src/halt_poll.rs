//! Adaptive halt polling, KVM's (`kvm_vcpu_halt` in Linux's `virt/kvm/kvm_main.c`,
//! `Documentation/virt/kvm/halt-polling.rst`): a vCPU that halts polls for a wake-up for up
//! to its window before it gives up its CPU, and the window adapts to how long its halts
//! last, up to the `halt_poll_ns` module parameter (200 µs by default on x86).
//!
//! The emulator's vCPUs halt this way ([`crate::emu`]), so the software backend wakes from
//! an interrupt as a KVM vCPU does; bench/disk's driver thread, which plays a vCPU, too.
//!
//! The window adapts rather than being fixed because a fixed window charges every long halt
//! (an idle guest's, a slow disk's) its full length of CPU for nothing. The rules are KVM's
//! with its default parameters (`halt_poll_ns_grow` 2, `halt_poll_ns_grow_start` 10 µs,
//! `halt_poll_ns_shrink` 2, which older kernels had at 0: reset to no polling), applied to the
//! whole halt (polling and sleep):
//! - the halt ended within the window (the polling found the wake-up): no change;
//! - it lasted longer than the limit: the window halves, to 0 below 10 µs;
//! - it was longer than the window but shorter than the limit: the window doubles, to
//!   10 µs at least and the limit at most.
//!
//! KVM also stops polling as soon as another task wants its CPU (`need_resched`). A thread
//! cannot see that, so a poller gives its CPU away (`sched_yield`, see [`HaltPoll::poll`])
//! each time it reads the clock, and polls on when it gets it back. Without that, on a small
//! busy host the spinning thread delays the very thread that would wake it.

use std::time::{Duration, Instant};

/// KVM's default `halt_poll_ns` on x86.
pub const DEFAULT_HALT_POLL: Duration = Duration::from_micros(200);

/// One vCPU's (or driver's) halt-polling state.
#[derive(Debug, Clone)]
pub struct HaltPoll {
    /// The limit (`halt_poll_ns`); zero disables polling.
    max: Duration,
    /// The current window (`vcpu->halt_poll_ns`).
    window: Duration,
    /// Halts so far, and how many of them the polling ended.
    waits: u64,
    hits: u64,
}

impl HaltPoll {
    /// `halt_poll_ns_grow_start`.
    pub const GROW_START: Duration = Duration::from_micros(10);

    /// Polling up to `max` (zero: never).
    pub fn new(max: Duration) -> HaltPoll {
        HaltPoll {
            max,
            window: Duration::ZERO,
            waits: 0,
            hits: 0,
        }
    }

    /// Whether polling is on at all.
    pub fn enabled(&self) -> bool {
        !self.max.is_zero()
    }

    /// The current window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Halts so far, and how many of them the polling ended.
    pub fn counts(&self) -> (u64, u64) {
        (self.waits, self.hits)
    }

    /// Spin on `ready` until it returns `Some` or `until` passes; `ready` is checked 16
    /// times between clock reads, and at each clock read the CPU is offered to anything
    /// else runnable on it (KVM's `need_resched` check).
    pub fn poll<T>(until: Instant, mut ready: impl FnMut() -> Option<T>) -> Option<T> {
        loop {
            for _ in 0..16 {
                if let Some(v) = ready() {
                    return Some(v);
                }
                std::hint::spin_loop();
            }
            if Instant::now() >= until {
                return None;
            }
            std::thread::yield_now(); // sched_yield
        }
    }

    /// Poll `ready` (as [`HaltPoll::poll`]) for the current window from `start`, the halt's
    /// beginning, stopping early at `deadline`; `None` at once when the window is zero.
    pub fn poll_window<T>(
        &self,
        start: Instant,
        deadline: Option<Instant>,
        ready: impl FnMut() -> Option<T>,
    ) -> Option<T> {
        if self.window.is_zero() {
            return None;
        }
        let end = start + self.window;
        Self::poll(deadline.map_or(end, |d| d.min(end)), ready)
    }

    /// Adapt the window to a halt of `halt` (polling included); `hit` when the polling ended
    /// it.
    pub fn adapt(&mut self, halt: Duration, hit: bool) {
        self.waits += 1;
        self.hits += u64::from(hit);
        if halt <= self.window {
            // The window was long enough: kept.
        } else if !self.window.is_zero() && halt > self.max {
            // shrink_halt_poll_ns
            self.window /= 2;
            if self.window < Self::GROW_START {
                self.window = Duration::ZERO;
            }
        } else if self.window < self.max && halt < self.max {
            // grow_halt_poll_ns
            self.window = (self.window * 2).max(Self::GROW_START).min(self.max);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halt_poll_window_adapts_as_kvm() {
        let us = Duration::from_micros;
        let mut p = HaltPoll::new(us(200));
        // Short halts grow the window from 10 µs, doubling, up to the limit.
        let mut windows = Vec::new();
        for _ in 0..6 {
            p.adapt(us(190), false);
            windows.push(p.window().as_micros());
        }
        assert_eq!(windows, [10, 20, 40, 80, 160, 200]);
        // A halt within the window leaves it, as one the polling ended does.
        p.adapt(us(150), false);
        assert_eq!(p.window(), us(200));
        // A halt the polling ended leaves it.
        p.adapt(us(30), true);
        assert_eq!(p.window(), us(200));
        // Long halts halve it, to nothing below 10 µs.
        let mut windows = Vec::new();
        for _ in 0..6 {
            p.adapt(us(1000), false);
            windows.push(p.window().as_micros());
        }
        assert_eq!(windows, [100, 50, 25, 12, 0, 0]);
        assert_eq!(p.counts(), (14, 1));
        // Disabled: never grows.
        let mut off = HaltPoll::new(Duration::ZERO);
        off.adapt(us(5), false);
        assert!(!off.enabled());
        assert_eq!(off.window(), Duration::ZERO);
    }

    #[test]
    fn poll_returns_what_is_ready_or_gives_up_at_the_deadline() {
        let mut n = 0;
        let got = HaltPoll::poll(Instant::now() + Duration::from_secs(5), || {
            n += 1;
            (n == 40).then_some(n)
        });
        assert_eq!(got, Some(40));
        let start = Instant::now();
        let none: Option<()> = HaltPoll::poll(start + Duration::from_millis(2), || None);
        assert!(none.is_none());
        assert!(start.elapsed() >= Duration::from_millis(2));
        // A zero window does not poll at all; a window does, and ends at the deadline.
        let mut p = HaltPoll::new(Duration::from_micros(200));
        assert_eq!(p.poll_window(Instant::now(), None, || Some(1)), None);
        p.adapt(Duration::from_micros(50), false);
        assert_eq!(p.poll_window(Instant::now(), None, || Some(1)), Some(1));
        let start = Instant::now();
        let none: Option<()> = p.poll_window(start, Some(start), || None);
        assert!(none.is_none());
    }
}
