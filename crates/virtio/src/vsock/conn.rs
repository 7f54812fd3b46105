//! One vsock stream connection between a guest socket and a host Unix socket: its state and
//! its credit-based flow control (virtio 1.2 §5.10.6.3).
//!
//! Each side advertises `buf_alloc` (its receive buffer) and `fwd_cnt` (bytes it has passed
//! on to its application) in every packet; a sender may have at most
//! `peer buf_alloc - (tx_cnt - peer fwd_cnt)` bytes outstanding. Counters are free-running
//! `u32`s compared with wrapping arithmetic.
//!
//! The device's receive buffer for each connection is [`CONN_BUF_ALLOC`] bytes: what the guest
//! sends beyond what the host socket takes at once waits there, and a guest that sends more
//! than that (a credit lie) has its connection reset. In the other direction the device reads
//! from the host socket only as much as the guest has credit and buffers for, so nothing
//! waits in the VMM.

use std::collections::VecDeque;
use std::os::unix::net::UnixStream;
use std::time::Instant;

/// The receive buffer the device advertises for each connection (and the most it holds).
pub const CONN_BUF_ALLOC: u32 = 256 << 10;

/// Flow-control counters of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credit {
    /// Our receive buffer.
    pub buf_alloc: u32,
    /// Bytes received from the guest.
    pub rx_cnt: u32,
    /// Bytes of those passed on to the host socket.
    pub fwd_cnt: u32,
    /// `fwd_cnt` as of the last packet we sent the guest (what the guest knows).
    pub fwd_cnt_sent: u32,
    /// The guest's receive buffer and forwarded count, from its latest packet.
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    pub tx_cnt: u32,
}

impl Credit {
    pub fn new(buf_alloc: u32) -> Self {
        Credit {
            buf_alloc,
            rx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
        }
    }

    /// The guest's `buf_alloc` and `fwd_cnt` from a packet header.
    pub fn peer_update(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = fwd_cnt;
    }

    /// Bytes the guest can take now. A guest claiming to have forwarded more than it was
    /// sent, or a window that shrank below what is outstanding, gives no credit (never a
    /// wrapped-around huge one).
    pub fn peer_credit(&self) -> u32 {
        let outstanding = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        if outstanding > self.peer_buf_alloc {
            return 0;
        }
        self.peer_buf_alloc - outstanding
    }

    /// `n` bytes were sent to the guest.
    pub fn sent(&mut self, n: u32) {
        self.tx_cnt = self.tx_cnt.wrapping_add(n);
    }

    /// Bytes received from the guest and not yet forwarded.
    pub fn buffered(&self) -> u32 {
        self.rx_cnt.wrapping_sub(self.fwd_cnt)
    }

    /// The guest sent `len` bytes: false when that is more than the window it was given (the
    /// connection must be reset); otherwise they are counted.
    pub fn receive(&mut self, len: u32) -> bool {
        let window = self
            .buf_alloc
            .saturating_sub(self.rx_cnt.wrapping_sub(self.fwd_cnt));
        if len > window {
            return false;
        }
        self.rx_cnt = self.rx_cnt.wrapping_add(len);
        true
    }

    /// `n` received bytes reached the host socket.
    pub fn forwarded(&mut self, n: u32) {
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n);
    }

    /// `(buf_alloc, fwd_cnt)` for a header going to the guest; the guest will know them.
    pub fn stamp(&mut self) -> (u32, u32) {
        self.fwd_cnt_sent = self.fwd_cnt;
        (self.buf_alloc, self.fwd_cnt)
    }

    /// Should the guest hear about freed buffer space? When what it believes is free has
    /// fallen below a quarter of the buffer and at least that much has been freed since it
    /// last heard (so updates are not sent for every few bytes).
    pub fn update_needed(&self) -> bool {
        let believed_used = self.rx_cnt.wrapping_sub(self.fwd_cnt_sent);
        let believed_free = self.buf_alloc.saturating_sub(believed_used);
        let freed = self.fwd_cnt.wrapping_sub(self.fwd_cnt_sent);
        believed_free < self.buf_alloc / 4 && freed >= self.buf_alloc / 4
    }
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: REQUEST queued or sent, waiting for the guest's RESPONSE until the
    /// deadline.
    Connecting {
        deadline: Instant,
    },
    Established,
    /// The guest shut both directions; the data it sent is flushed to the host socket, then
    /// the connection ends (RST). Gives up at the deadline.
    Closing {
        deadline: Instant,
    },
}

/// A connection.
#[derive(Debug)]
pub struct Conn {
    pub stream: UnixStream,
    /// epoll token of `stream`.
    pub token: u64,
    /// The host side's port (the guest's destination port for guest-initiated connections, an
    /// allocated one for host-initiated ones) and the guest's port.
    pub local_port: u32,
    pub peer_port: u32,
    pub state: ConnState,
    pub credit: Credit,
    /// Data from the guest waiting for the host socket (at most `buf_alloc` bytes).
    pub buf: VecDeque<u8>,
    /// Control packets owed to the guest.
    pub send_request: bool,
    pub send_response: bool,
    pub send_credit_update: bool,
    /// SHUTDOWN flags to send the guest (0: none).
    pub send_shutdown: u32,
    /// SHUTDOWN flags already sent.
    pub shutdown_sent: u32,
    /// SHUTDOWN flags received from the guest.
    pub peer_shutdown: u32,
    /// The host socket may have data: read it when the guest has room.
    pub readable: bool,
    /// The host socket reached end of file.
    pub host_eof: bool,
    /// The host socket hung up: it left the epoll set; what it still holds is read without
    /// waiting for readiness.
    pub hup: bool,
    /// In the device's send queue.
    pub queued: bool,
    /// Events `stream` is registered for (0: not in the epoll set).
    pub interest: u32,
}

impl Conn {
    pub fn new(
        stream: UnixStream,
        token: u64,
        local_port: u32,
        peer_port: u32,
        state: ConnState,
    ) -> Self {
        Conn {
            stream,
            token,
            local_port,
            peer_port,
            state,
            credit: Credit::new(CONN_BUF_ALLOC),
            buf: VecDeque::new(),
            send_request: false,
            send_response: false,
            send_credit_update: false,
            send_shutdown: 0,
            shutdown_sent: 0,
            peer_shutdown: 0,
            readable: false,
            host_eof: false,
            hup: false,
            queued: false,
            interest: 0,
        }
    }

    /// Something to tell the guest that needs no data: control packets come first.
    pub fn has_control(&self) -> bool {
        self.send_request
            || self.send_response
            || self.send_shutdown & !self.shutdown_sent != 0
            || self.send_credit_update
    }

    /// Data to move to the guest, as far as we know.
    pub fn wants_data(&self) -> bool {
        self.state == ConnState::Established
            && (self.readable || self.hup)
            && !self.host_eof
            && self.peer_shutdown & super::packet::VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE == 0
            && self.credit.peer_credit() > 0
    }

    /// Should the host socket be watched for input?
    pub fn wants_input(&self) -> bool {
        self.state == ConnState::Established
            && !self.readable
            && !self.hup
            && !self.host_eof
            && self.peer_shutdown & super::packet::VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE == 0
            && self.credit.peer_credit() > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credit_window_both_ways() {
        let mut c = Credit::new(1000);
        // Nothing known about the guest yet: no credit.
        assert_eq!(c.peer_credit(), 0);
        c.peer_update(4096, 0);
        assert_eq!(c.peer_credit(), 4096);
        c.sent(4000);
        assert_eq!(c.peer_credit(), 96);
        c.sent(96);
        assert_eq!(c.peer_credit(), 0);
        c.peer_update(4096, 1000);
        assert_eq!(c.peer_credit(), 1000);
        // Our window: 1000 bytes.
        assert!(c.receive(600));
        assert!(c.receive(400));
        assert!(!c.receive(1), "beyond the window");
        assert_eq!(c.buffered(), 1000);
        c.forwarded(300);
        assert_eq!(c.buffered(), 700);
        assert!(c.receive(300));
        assert!(!c.receive(1));
    }

    #[test]
    fn credit_lies_give_nothing() {
        let mut c = Credit::new(1000);
        c.sent(100);
        // Forwarded more than it was ever sent: the subtraction would wrap to ~4 GiB.
        c.peer_update(4096, 5000);
        assert_eq!(c.peer_credit(), 0);
        // A window smaller than what is outstanding.
        c.peer_update(50, 0);
        assert_eq!(c.peer_credit(), 0);
        c.peer_update(u32::MAX, 0);
        assert_eq!(c.peer_credit(), u32::MAX - 100);
        // A guest sending without end is stopped at the window, however it splits it.
        let mut c = Credit::new(1000);
        assert!(!c.receive(u32::MAX));
        assert!(c.receive(1000));
        assert!(!c.receive(1));
    }

    #[test]
    fn counters_wrap() {
        let mut c = Credit::new(1000);
        c.tx_cnt = u32::MAX - 10;
        c.peer_update(100, u32::MAX - 10);
        assert_eq!(c.peer_credit(), 100);
        c.sent(50);
        assert_eq!(c.tx_cnt, 39);
        assert_eq!(c.peer_credit(), 50);
        c.peer_update(100, 39);
        assert_eq!(c.peer_credit(), 100);
        c.rx_cnt = u32::MAX - 5;
        c.fwd_cnt = u32::MAX - 5;
        assert!(c.receive(1000));
        assert_eq!(c.buffered(), 1000);
        c.forwarded(1000);
        assert_eq!(c.buffered(), 0);
    }

    #[test]
    fn credit_updates_when_the_guest_would_stall() {
        let mut c = Credit::new(1000);
        assert_eq!(c.stamp(), (1000, 0));
        assert!(c.receive(900));
        assert!(!c.update_needed(), "nothing freed yet");
        c.forwarded(100);
        assert!(!c.update_needed(), "freed too little");
        c.forwarded(800);
        assert!(c.update_needed());
        assert_eq!(c.stamp(), (1000, 900));
        assert!(!c.update_needed(), "the guest knows");
    }
}
