//! COM port: a 16550A UART (eight registers, registered with length 8) built on
//! `vm_superio::Serial`.
//!
//! Output goes to a host writer; input comes from [`Serial::queue_input`]. The UART's receive
//! FIFO holds 64 bytes, so input waits in a bounded host-side queue and moves into the FIFO
//! whenever there is room (on input and after every guest register read).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io::Write;
use std::sync::Arc;

use tracing::warn;
use vireo_hv::IrqLine;
use vm_superio::serial::{Error as UartError, NoEvents};
use vm_superio::Trigger;

use super::{read_bytes, write_bytes};
use crate::BusDevice;

/// Number of UART registers (offsets 0–7).
pub const SERIAL_REGISTERS: u64 = 8;
/// Host-side input bytes kept while the guest does not read; more are dropped.
pub const INPUT_QUEUE_LIMIT: usize = 64 * 1024;

/// The UART interrupt: an ISA edge, so every event pulses the line.
pub struct IrqTrigger(pub Arc<dyn IrqLine>);

impl Trigger for IrqTrigger {
    type E = Infallible;

    fn trigger(&self) -> Result<(), Infallible> {
        self.0.pulse();
        Ok(())
    }
}

type Uart = vm_superio::Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>;

/// A 16550A UART.
pub struct Serial {
    uart: Uart,
    input: VecDeque<u8>,
    /// Set once input was dropped; cleared when the queue has drained, so each overflow
    /// episode warns once.
    input_overflowed: bool,
    output_error_logged: bool,
}

/// The UART's state as data (snapshots): its registers, receive FIFO and the host input
/// still queued.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub fifo: Vec<u8>,
    pub pending_input: Vec<u8>,
}

impl Serial {
    /// The state as data.
    pub fn state(&self) -> SerialState {
        let u = self.uart.state();
        SerialState {
            baud_divisor_low: u.baud_divisor_low,
            baud_divisor_high: u.baud_divisor_high,
            interrupt_enable: u.interrupt_enable,
            interrupt_identification: u.interrupt_identification,
            line_control: u.line_control,
            line_status: u.line_status,
            modem_control: u.modem_control,
            modem_status: u.modem_status,
            scratch: u.scratch,
            fifo: u.in_buffer,
            pending_input: self.input.iter().copied().collect(),
        }
    }

    /// A UART in state `s` (from [`Serial::state`]), raising `irq` and writing to `out`.
    pub fn from_state(
        s: &SerialState,
        irq: Arc<dyn IrqLine>,
        out: Box<dyn Write + Send>,
    ) -> Result<Self, String> {
        let u = vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.fifo.clone(),
        };
        if s.pending_input.len() > INPUT_QUEUE_LIMIT {
            return Err("serial: input queue too long".into());
        }
        let uart = vm_superio::Serial::from_state(&u, IrqTrigger(irq), NoEvents, out)
            .map_err(|e| format!("serial: {e:?}"))?;
        Ok(Serial {
            uart,
            input: s.pending_input.iter().copied().collect(),
            input_overflowed: false,
            output_error_logged: false,
        })
    }

    /// A UART raising `irq` and writing guest output to `out`.
    pub fn new(irq: Arc<dyn IrqLine>, out: Box<dyn Write + Send>) -> Self {
        Serial {
            uart: vm_superio::Serial::new(IrqTrigger(irq), out),
            input: VecDeque::new(),
            input_overflowed: false,
            output_error_logged: false,
        }
    }

    /// Queue host input for the guest (from the console thread). At most
    /// [`INPUT_QUEUE_LIMIT`] bytes wait; beyond that input is dropped with one warning.
    pub fn queue_input(&mut self, bytes: &[u8]) {
        let room = INPUT_QUEUE_LIMIT.saturating_sub(self.input.len());
        let take = bytes.len().min(room);
        self.input.extend(&bytes[..take]);
        if take < bytes.len() && !self.input_overflowed {
            self.input_overflowed = true;
            warn!(
                "serial: guest is not reading input; dropping {} bytes (and more, silently, until it does)",
                bytes.len() - take
            );
        }
        self.fill_fifo();
    }

    /// Bytes waiting on the host side (not yet in the UART FIFO).
    pub fn pending_input(&self) -> usize {
        self.input.len()
    }

    /// Move queued input into the UART FIFO while it has room.
    fn fill_fifo(&mut self) {
        while !self.input.is_empty() && self.uart.fifo_capacity() > 0 {
            let chunk = self.input.as_slices().0;
            let n = chunk.len().min(self.uart.fifo_capacity());
            match self.uart.enqueue_raw_bytes(&chunk[..n]) {
                // Loopback mode takes nothing: leave the bytes for later.
                Ok(0) | Err(_) => break,
                Ok(k) => {
                    self.input.drain(..k);
                }
            }
        }
        if self.input.is_empty() {
            self.input_overflowed = false;
        }
    }

    fn read_register(&mut self, offset: u64) -> u8 {
        if offset >= SERIAL_REGISTERS {
            return 0xff;
        }
        // `offset < 8`, so the cast is exact.
        let value = self.uart.read(offset as u8);
        self.fill_fifo();
        value
    }

    fn write_register(&mut self, offset: u64, value: u8) {
        if offset >= SERIAL_REGISTERS {
            return;
        }
        // `offset < 8`, so the cast is exact.
        match self.uart.write(offset as u8, value) {
            Ok(()) => {}
            Err(UartError::IOError(e)) => {
                if !self.output_error_logged {
                    self.output_error_logged = true;
                    warn!("serial: cannot write guest output ({e}); dropping it from now on");
                }
            }
            Err(e) => {
                if !self.output_error_logged {
                    self.output_error_logged = true;
                    warn!("serial: {e:?}");
                }
            }
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        read_bytes(offset, data, |o| self.read_register(o));
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        write_bytes(offset, data, |o, v| self.write_register(o, v));
    }

    fn name(&self) -> &'static str {
        "serial"
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::Mutex;

    use super::*;
    use crate::test_util::{hammer, FakeIrq};

    const DATA: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LCR: u64 = 3;
    const MCR: u64 = 4;
    const LSR: u64 = 5;
    const LSR_DR: u8 = 0x01;
    const IER_RDA: u8 = 0x01;

    #[derive(Clone, Default)]
    struct SharedOut(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedOut {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct BrokenPipe;

    impl Write for BrokenPipe {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
    }

    fn serial() -> (Serial, Arc<FakeIrq>, SharedOut) {
        let irq = Arc::new(FakeIrq::default());
        let out = SharedOut::default();
        (Serial::new(irq.clone(), Box::new(out.clone())), irq, out)
    }

    fn rd(s: &mut Serial, offset: u64) -> u8 {
        let mut d = [0u8];
        s.read(offset, &mut d);
        d[0]
    }

    #[test]
    fn output_reaches_the_writer() {
        let (mut s, _, out) = serial();
        for &b in b"hello" {
            s.write(DATA, &[b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hello");
    }

    #[test]
    fn broken_output_does_not_panic_and_still_interrupts() {
        let irq = Arc::new(FakeIrq::default());
        let mut s = Serial::new(irq.clone(), Box::new(BrokenPipe));
        s.write(IER, &[0x02]); // THR empty interrupt
        rd(&mut s, IIR);
        let before = irq.edges();
        for _ in 0..3 {
            s.write(DATA, b"x");
            rd(&mut s, IIR); // acknowledge the THRE interrupt
        }
        assert!(s.output_error_logged);
        assert_eq!(irq.edges(), before + 3);
    }

    #[test]
    fn input_larger_than_the_fifo_is_delivered_in_order() {
        let (mut s, irq, _) = serial();
        s.write(IER, &[IER_RDA]);
        let input: Vec<u8> = (0..200u32).map(|i| i as u8).collect();
        s.queue_input(&input);
        assert!(irq.edges() >= 1, "RDA interrupt on input");
        assert_eq!(s.pending_input(), 200 - 64);
        let mut got = Vec::new();
        while rd(&mut s, LSR) & LSR_DR != 0 {
            got.push(rd(&mut s, DATA));
            assert!(got.len() <= 200);
        }
        assert_eq!(got, input);
        assert_eq!(s.pending_input(), 0);
    }

    #[test]
    fn host_queue_is_bounded() {
        let (mut s, _, _) = serial();
        let chunk = vec![b'a'; 4096];
        for _ in 0..40 {
            s.queue_input(&chunk);
        }
        assert_eq!(s.pending_input(), INPUT_QUEUE_LIMIT);
        assert!(s.input_overflowed);
        // Draining everything re-arms the warning.
        for _ in 0..(INPUT_QUEUE_LIMIT + 64) {
            rd(&mut s, DATA);
        }
        assert_eq!(s.pending_input(), 0);
        assert!(!s.input_overflowed);
        assert_eq!(rd(&mut s, LSR) & LSR_DR, 0);
    }

    #[test]
    fn loopback_mode_keeps_host_input_queued() {
        let (mut s, _, out) = serial();
        s.write(MCR, &[0x10]); // loop
        s.queue_input(b"abc");
        assert_eq!(s.pending_input(), 3);
        s.write(DATA, b"z");
        assert_eq!(rd(&mut s, DATA), b'z');
        assert!(out.0.lock().unwrap().is_empty());
        s.write(MCR, &[0x08]);
        rd(&mut s, LSR);
        assert_eq!(s.pending_input(), 0);
        assert_eq!(rd(&mut s, DATA), b'a');
    }

    #[test]
    fn wide_accesses_are_byte_cycles_and_out_of_range_reads_all_ones() {
        let (mut s, _, _) = serial();
        s.write(LCR, &[0x80, 0x00]); // LCR = DLAB, MCR = 0
        let mut d = [0u8; 2];
        s.write(DATA, &[0x0c, 0x00]); // divisor latch 12
        s.read(DATA, &mut d);
        assert_eq!(d, [0x0c, 0x00]);
        assert_eq!(rd(&mut s, 8), 0xff);
        assert_eq!(rd(&mut s, u64::MAX), 0xff);
        s.write(8, &[1]);
    }

    #[test]
    fn hostile_accesses_do_not_panic() {
        let (mut s, _, _) = serial();
        s.queue_input(&[0x55; 300]);
        hammer(&mut s, SERIAL_REGISTERS + 2, 50_000, 0x5e7a1);
    }

    #[test]
    fn state_round_trips_with_fifo_and_queued_input() {
        let (mut s, _, _) = serial();
        s.write(IER, &[IER_RDA]);
        s.write(7, &[0x5a]); // scratch
        s.queue_input(&[b'x'; 100]);
        let st = s.state();
        assert_eq!(st.fifo.len() + st.pending_input.len(), 100);
        let irq = Arc::new(FakeIrq::default());
        let mut r = Serial::from_state(&st, irq.clone(), Box::new(io::sink())).unwrap();
        assert_eq!(r.state(), st);
        assert_eq!(rd(&mut r, 7), 0x5a);
        assert_eq!(rd(&mut r, DATA), b'x');
        let mut bad = st.clone();
        bad.fifo = vec![0; 65];
        assert!(Serial::from_state(&bad, irq, Box::new(io::sink())).is_err());
    }
}
