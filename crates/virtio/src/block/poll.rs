//! Adaptive polling for the block device thread. After the device interrupts the driver
//! (used buffers, §2.7.10), a driver that keeps its queue busy answers with new requests: the
//! device thread keeps looking at the available ring for a short window instead of going to
//! sleep, so the answer is served without a notification (no kick, no thread wake-up). While
//! it polls it also reaps finished transfers.
//!
//! The window adapts to how long the driver takes to answer, measured whether the thread
//! polled or slept meanwhile (in the spirit of QEMU's `poll-max-ns`/`poll-grow`/`poll-shrink`):
//! an answer later than the window but within the maximum doubles the window (from
//! [`PollWindow::INITIAL`] up to the maximum); an answer later than the maximum (or a full
//! window at the maximum without one) stops polling (window zero) until quick answers come
//! back. Losing the CPU while polling (something else wants it, perhaps the driver) stops it
//! for [`PollWindow::COOLDOWN`]. Requests that no interrupt
//! asked for (a driver that sends without waiting) teach nothing and are never polled for.

use std::time::{Duration, Instant};

/// The polling window and what it learns from the driver's answers.
#[derive(Debug, Clone)]
pub(crate) struct PollWindow {
    window: Duration,
    max: Duration,
    /// The first interrupt the driver has not answered with new requests yet.
    unanswered: Option<Instant>,
    /// The latest interrupt.
    last_interrupt: Option<Instant>,
    /// No polling before this: the thread lost its CPU while it polled.
    cooldown_until: Option<Instant>,
}

impl PollWindow {
    /// The first window after a quick answer.
    pub const INITIAL: Duration = Duration::from_micros(4);
    /// How long polling stays off after the thread lost its CPU while polling.
    pub const COOLDOWN: Duration = Duration::from_millis(50);
    /// A gap this long between two looks at the rings means the thread lost its CPU.
    pub const PREEMPTED: Duration = Duration::from_micros(20);

    /// A window of at most `max` (zero: never poll).
    pub fn new(max: Duration) -> Self {
        PollWindow {
            window: Duration::ZERO,
            max,
            unanswered: None,
            last_interrupt: None,
            cooldown_until: None,
        }
    }

    /// How long the device waits for an answer now.
    #[cfg(test)]
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The device interrupted the driver at `now`.
    pub fn interrupted(&mut self, now: Instant) {
        self.unanswered.get_or_insert(now);
        self.last_interrupt = Some(now);
    }

    /// A poll for the latest interrupt ran its full window without an answer: at the
    /// maximum window, the answer will be too late anyway.
    pub fn expired(&mut self) {
        if self.window >= self.max {
            self.window = Duration::ZERO;
        }
    }

    /// The thread lost its CPU while it polled (found at `now`): something else needs the
    /// CPU, perhaps the driver itself, so polling is not free. Stop polling for
    /// [`PollWindow::COOLDOWN`].
    pub fn contended(&mut self, now: Instant) {
        self.window = Duration::ZERO;
        self.cooldown_until = Some(now + Self::COOLDOWN);
    }

    /// The device found new requests at `now`: if they answer an interrupt, adapt the window
    /// to how long the answer took.
    pub fn answered(&mut self, now: Instant) {
        self.last_interrupt = None;
        let Some(at) = self.unanswered.take() else {
            return;
        };
        if self.cooldown_until.is_some_and(|t| now < t) {
            return;
        }
        self.cooldown_until = None;
        let took = now.saturating_duration_since(at);
        if took > self.max {
            self.window = Duration::ZERO;
        } else if took > self.window {
            self.window = (self.window * 2).max(Self::INITIAL).min(self.max);
        }
    }

    /// Until when to poll for the answer to the latest interrupt (None: do not poll).
    pub fn poll_until(&self) -> Option<Instant> {
        if self.window.is_zero() {
            return None;
        }
        self.last_interrupt.map(|t| t + self.window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_micros(50);

    /// Interrupt at `t`, answer `us` later; returns the time of the answer.
    fn round(p: &mut PollWindow, t: Instant, us: u64) -> Instant {
        p.interrupted(t);
        let answer = t + Duration::from_micros(us);
        p.answered(answer);
        answer
    }

    /// A window that has learned from three answers 20 µs after their interrupts.
    fn polling() -> (PollWindow, Instant) {
        let mut p = PollWindow::new(MAX);
        let mut t = Instant::now();
        for _ in 0..3 {
            t = round(&mut p, t, 20);
        }
        (p, t)
    }

    /// Answers 40 µs late until the window is at the maximum; the time of the last one.
    fn grow_to_max(p: &mut PollWindow, mut t: Instant) -> Instant {
        for _ in 0..10 {
            t = round(p, t, 40);
        }
        assert_eq!(p.window(), MAX);
        t
    }

    #[test]
    fn quick_answers_grow_the_window_up_to_the_maximum() {
        let mut p = PollWindow::new(MAX);
        let mut t = Instant::now();
        p.interrupted(t);
        assert_eq!(p.poll_until(), None, "no polling before it is known to pay");
        t = round(&mut p, t, 10);
        assert_eq!(p.window(), PollWindow::INITIAL);
        t = round(&mut p, t, 10);
        assert_eq!(p.window(), Duration::from_micros(8));
        t = round(&mut p, t, 10);
        assert_eq!(p.window(), Duration::from_micros(16));
        // An answer the window already covers leaves it alone.
        t = round(&mut p, t, 10);
        assert_eq!(p.window(), Duration::from_micros(16));
        t = grow_to_max(&mut p, t);
        // Poll until the window after the latest interrupt, and not once answered.
        p.interrupted(t);
        let later = t + Duration::from_micros(3);
        p.interrupted(later);
        assert_eq!(p.poll_until(), Some(later + MAX));
        p.answered(later);
        assert_eq!(p.poll_until(), None);
    }

    #[test]
    fn slow_answers_stop_polling_and_unasked_requests_teach_nothing() {
        let (mut p, t) = polling();
        let w = p.window();
        assert!(w > Duration::ZERO);
        // Requests without an interrupt before them: unchanged.
        p.answered(t + Duration::from_millis(5));
        assert_eq!(p.window(), w);
        // The answer is measured from the first unanswered interrupt.
        p.interrupted(t);
        p.interrupted(t + Duration::from_micros(40));
        p.answered(t + Duration::from_micros(60));
        assert_eq!(p.window(), Duration::ZERO);
        p.interrupted(t);
        assert_eq!(p.poll_until(), None);
    }

    #[test]
    fn a_full_window_at_the_maximum_without_an_answer_stops_polling() {
        let (mut p, t) = polling();
        let w = p.window();
        p.expired();
        assert_eq!(p.window(), w, "below the maximum: wait for the answer");
        grow_to_max(&mut p, t);
        p.expired();
        assert_eq!(p.window(), Duration::ZERO);
    }

    #[test]
    fn losing_the_cpu_stops_polling_for_a_while() {
        let (mut p, mut t) = polling();
        assert!(p.window() > Duration::ZERO);
        p.contended(t);
        assert_eq!(p.window(), Duration::ZERO);
        // Quick answers during the cool-down do not bring polling back...
        t = round(&mut p, t, 10);
        assert_eq!(p.window(), Duration::ZERO);
        p.interrupted(t);
        assert_eq!(p.poll_until(), None);
        p.answered(t);
        // ...after it they do.
        round(&mut p, t + PollWindow::COOLDOWN, 10);
        assert_eq!(p.window(), PollWindow::INITIAL);
    }

    #[test]
    fn a_zero_maximum_never_polls() {
        let mut p = PollWindow::new(Duration::ZERO);
        let t = Instant::now();
        round(&mut p, t, 1);
        p.interrupted(t);
        assert_eq!(p.poll_until(), None);
    }
}
