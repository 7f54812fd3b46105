//! The 8042 PS/2 controller with a keyboard and no mouse: data port at offset 0 (port 0x60),
//! status/command port at offset 4 (port 0x64) of one device registered with length 5.
//!
//! Enough for Linux's `i8042` and `atkbd` drivers to probe without errors or timeouts, and for
//! the reset line: a pulse command (0xF0–0xFE with bit 0 clear, e.g. 0xFE) or an output-port
//! write with bit 0 clear resets the platform. Register and command names follow the IBM
//! PS/2 8042 interface (as Linux `drivers/input/serio/i8042.h` names them).

use std::collections::VecDeque;
use std::sync::Arc;

use tracing::debug;
use vireo_hv::IrqLine;

use super::{read_bytes, write_bytes};
use crate::{BusDevice, EventSink, PlatformEvent};

/// Offset of the data port (0x60).
pub const DATA_OFFSET: u64 = 0;
/// Offset of the status (read) / command (write) port (0x64).
pub const COMMAND_OFFSET: u64 = 4;
/// The length the device is registered with (0x60..=0x64).
pub const I8042_LEN: u64 = 5;

// Status register bits.
const STR_OBF: u8 = 0x01;
const STR_SYS: u8 = 0x04;
/// The last write went to the command port.
const STR_CMD: u8 = 0x08;
/// Keyboard not inhibited (the keylock switch is open).
const STR_KEYLOCK: u8 = 0x10;
const STR_AUXDATA: u8 = 0x20;
const STR_TIMEOUT: u8 = 0x40;

// Controller configuration byte (command byte, RAM byte 0) bits.
const CTR_KBDINT: u8 = 0x01;
const CTR_AUXINT: u8 = 0x02;
const CTR_SYS: u8 = 0x04;
const CTR_KBDDIS: u8 = 0x10;
const CTR_AUXDIS: u8 = 0x20;
const CTR_XLATE: u8 = 0x40;
/// As a BIOS leaves it: both interrupts on, system flag, scan-code translation.
const CTR_DEFAULT: u8 = CTR_KBDINT | CTR_AUXINT | CTR_SYS | CTR_XLATE;

// Controller commands (written to the command port).
const CMD_READ_RAM: u8 = 0x20; // 0x20–0x3f: read RAM byte n (0x20 = CTR)
const CMD_WRITE_RAM: u8 = 0x60; // 0x60–0x7f: write RAM byte n (0x60 = CTR)
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_CTL_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTPUT: u8 = 0xd0;
const CMD_WRITE_OUTPUT: u8 = 0xd1;
const CMD_KBD_LOOP: u8 = 0xd2;
const CMD_AUX_LOOP: u8 = 0xd3;
const CMD_AUX_SEND: u8 = 0xd4;
const CMD_PULSE: u8 = 0xf0; // 0xf0–0xff: pulse the output lines whose bit is 0

// Replies.
const CTL_TEST_OK: u8 = 0x55;
const PORT_TEST_OK: u8 = 0x00;

// Keyboard commands and replies (PS/2 keyboard protocol).
const KBD_CMD_SETLEDS: u8 = 0xed;
const KBD_CMD_ECHO: u8 = 0xee;
const KBD_CMD_SCANSET: u8 = 0xf0;
const KBD_CMD_GETID: u8 = 0xf2;
const KBD_CMD_SETREP: u8 = 0xf3;
const KBD_CMD_RESET: u8 = 0xff;
const KBD_ACK: u8 = 0xfa;
const KBD_BAT_OK: u8 = 0xaa;
/// What a controller returns for a byte sent to an absent device (with the timeout bit).
const NO_DEVICE: u8 = 0xfe;

/// Output port bit 0: system reset, active low.
const OUTPUT_RESET_N: u8 = 0x01;
/// Output port as after power-on: no reset, A20 enabled.
const OUTPUT_DEFAULT: u8 = 0x03;

/// Bytes the output buffer holds before further ones are dropped.
const OUTPUT_LIMIT: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct OutByte {
    value: u8,
    aux: bool,
    timeout: bool,
}

/// The 8042 controller and its keyboard.
pub struct I8042 {
    /// Controller RAM; byte 0 is the configuration byte (CTR).
    ram: [u8; 32],
    output: VecDeque<OutByte>,
    /// A controller command waiting for its parameter on the data port.
    pending_cmd: Option<u8>,
    /// A keyboard command waiting for its parameter.
    pending_kbd: Option<u8>,
    output_port: u8,
    last_was_command: bool,
    kbd_irq: Option<Arc<dyn IrqLine>>,
    aux_irq: Option<Arc<dyn IrqLine>>,
    kbd_level: bool,
    aux_level: bool,
    events: EventSink,
}

/// The controller's state as data (snapshots). Interrupt line levels are recorded, not
/// driven again on restore: the interrupt controllers' own state already has them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042State {
    ram: Vec<u8>,
    output: Vec<OutByte>,
    pending_cmd: Option<u8>,
    pending_kbd: Option<u8>,
    output_port: u8,
    last_was_command: bool,
    kbd_level: bool,
    aux_level: bool,
}

impl I8042 {
    /// The state as data.
    pub fn state(&self) -> I8042State {
        I8042State {
            ram: self.ram.to_vec(),
            output: self.output.iter().copied().collect(),
            pending_cmd: self.pending_cmd,
            pending_kbd: self.pending_kbd,
            output_port: self.output_port,
            last_was_command: self.last_was_command,
            kbd_level: self.kbd_level,
            aux_level: self.aux_level,
        }
    }

    /// Load a state from [`I8042::state`]; a malformed one is refused.
    pub fn restore(&mut self, s: &I8042State) -> Result<(), String> {
        let ram: [u8; 32] = s
            .ram
            .as_slice()
            .try_into()
            .map_err(|_| "i8042: RAM is not 32 bytes".to_string())?;
        if s.output.len() > OUTPUT_LIMIT {
            return Err("i8042: output buffer too long".into());
        }
        self.ram = ram;
        self.output = s.output.iter().copied().collect();
        self.pending_cmd = s.pending_cmd;
        self.pending_kbd = s.pending_kbd;
        self.output_port = s.output_port;
        self.last_was_command = s.last_was_command;
        self.kbd_level = s.kbd_level;
        self.aux_level = s.aux_level;
        Ok(())
    }

    /// A controller reporting resets to `events`, without interrupt lines.
    pub fn new(events: EventSink) -> Self {
        let mut ram = [0u8; 32];
        ram[0] = CTR_DEFAULT;
        I8042 {
            ram,
            output: VecDeque::with_capacity(OUTPUT_LIMIT),
            pending_cmd: None,
            pending_kbd: None,
            output_port: OUTPUT_DEFAULT,
            last_was_command: false,
            kbd_irq: None,
            aux_irq: None,
            kbd_level: false,
            aux_level: false,
            events,
        }
    }

    /// Raise `irq` (ISA IRQ 1) while a keyboard byte waits and CTR.KBDINT is set. Without it,
    /// Linux's `atkbd` cannot talk to the keyboard (its commands wait for IRQ 1) and gives up
    /// after its timeouts.
    pub fn with_kbd_irq(mut self, irq: Arc<dyn IrqLine>) -> Self {
        self.kbd_irq = Some(irq);
        self
    }

    /// Raise `irq` (ISA IRQ 12) while an AUX byte waits and CTR.AUXINT is set. Without it,
    /// Linux's AUX IRQ test waits 250 ms and then skips the (empty) AUX port; with it, the
    /// port registers and the mouse probe fails at once (bytes to the mouse time out).
    pub fn with_aux_irq(mut self, irq: Arc<dyn IrqLine>) -> Self {
        self.aux_irq = Some(irq);
        self
    }

    fn ctr(&self) -> u8 {
        self.ram[0]
    }

    fn status(&self) -> u8 {
        let mut s = STR_KEYLOCK;
        if self.ctr() & CTR_SYS != 0 {
            s |= STR_SYS;
        }
        if self.last_was_command {
            s |= STR_CMD;
        }
        if let Some(b) = self.output.front() {
            s |= STR_OBF;
            if b.aux {
                s |= STR_AUXDATA;
            }
            if b.timeout {
                s |= STR_TIMEOUT;
            }
        }
        s
    }

    fn push(&mut self, value: u8, aux: bool, timeout: bool) {
        if self.output.len() >= OUTPUT_LIMIT {
            debug!("i8042: output buffer full, dropping {value:#04x}");
            return;
        }
        self.output.push_back(OutByte {
            value,
            aux,
            timeout,
        });
        self.update_irqs();
    }

    fn push_kbd(&mut self, value: u8) {
        self.push(value, false, false);
    }

    /// The 8042 drives IRQ 1 / IRQ 12 from "output buffer full" and the CTR enable bits.
    fn update_irqs(&mut self) {
        let head = self.output.front().copied();
        let kbd = matches!(head, Some(b) if !b.aux) && self.ctr() & CTR_KBDINT != 0;
        let aux = matches!(head, Some(b) if b.aux) && self.ctr() & CTR_AUXINT != 0;
        Self::drive(&self.kbd_irq, &mut self.kbd_level, kbd);
        Self::drive(&self.aux_irq, &mut self.aux_level, aux);
    }

    fn drive(line: &Option<Arc<dyn IrqLine>>, current: &mut bool, level: bool) {
        if *current != level {
            *current = level;
            if let Some(line) = line {
                line.set_level(level);
            }
        }
    }

    fn read_data(&mut self) -> u8 {
        match self.output.pop_front() {
            Some(b) => {
                // The output buffer empties before the next byte is loaded: a fresh edge.
                Self::drive(&self.kbd_irq, &mut self.kbd_level, false);
                Self::drive(&self.aux_irq, &mut self.aux_level, false);
                self.update_irqs();
                b.value
            }
            None => 0,
        }
    }

    fn reset(&self) {
        debug!("i8042: reset line pulsed");
        (self.events)(PlatformEvent::Reset);
    }

    fn command(&mut self, cmd: u8) {
        self.last_was_command = true;
        self.pending_cmd = None;
        match cmd {
            0x20..=0x3f => self.push_kbd(self.ram[usize::from(cmd - CMD_READ_RAM)]),
            0x60..=0x7f | CMD_WRITE_OUTPUT | CMD_KBD_LOOP | CMD_AUX_LOOP | CMD_AUX_SEND => {
                self.pending_cmd = Some(cmd)
            }
            CMD_AUX_DISABLE => self.set_ctr(self.ctr() | CTR_AUXDIS),
            CMD_AUX_ENABLE => self.set_ctr(self.ctr() & !CTR_AUXDIS),
            CMD_KBD_DISABLE => self.set_ctr(self.ctr() | CTR_KBDDIS),
            CMD_KBD_ENABLE => self.set_ctr(self.ctr() & !CTR_KBDDIS),
            CMD_AUX_TEST | CMD_KBD_TEST => self.push_kbd(PORT_TEST_OK),
            CMD_CTL_TEST => {
                self.ram[0] |= CTR_SYS;
                self.push_kbd(CTL_TEST_OK)
            }
            CMD_READ_OUTPUT => self.push_kbd(self.output_port),
            CMD_PULSE..=0xff => {
                if cmd & OUTPUT_RESET_N == 0 {
                    self.reset();
                }
            }
            _ => debug!("i8042: unsupported command {cmd:#04x} ignored"),
        }
    }

    fn set_ctr(&mut self, value: u8) {
        self.ram[0] = value;
        self.update_irqs();
    }

    fn write_data(&mut self, value: u8) {
        self.last_was_command = false;
        match self.pending_cmd.take() {
            Some(cmd @ 0x60..=0x7f) => {
                let index = usize::from(cmd - CMD_WRITE_RAM);
                if index == 0 {
                    self.set_ctr(value);
                } else {
                    self.ram[index] = value;
                }
            }
            Some(CMD_WRITE_OUTPUT) => {
                self.output_port = value;
                if value & OUTPUT_RESET_N == 0 {
                    self.reset();
                }
            }
            Some(CMD_KBD_LOOP) => self.push(value, false, false),
            Some(CMD_AUX_LOOP) => self.push(value, true, false),
            // No mouse: the controller times out and says so.
            Some(CMD_AUX_SEND) => self.push(NO_DEVICE, true, true),
            Some(_) | None => self.keyboard(value),
        }
    }

    /// A byte for the keyboard (PS/2 keyboard protocol, scan-code set 2).
    fn keyboard(&mut self, value: u8) {
        if let Some(cmd) = self.pending_kbd.take() {
            self.push_kbd(KBD_ACK);
            if cmd == KBD_CMD_SCANSET && value == 0 {
                // Query: set 2 (as the host sees it through translation, if on).
                let set = if self.ctr() & CTR_XLATE != 0 {
                    0x41
                } else {
                    0x02
                };
                self.push_kbd(set);
            }
            return;
        }
        match value {
            KBD_CMD_SETLEDS | KBD_CMD_SCANSET | KBD_CMD_SETREP => {
                self.pending_kbd = Some(value);
                self.push_kbd(KBD_ACK);
            }
            KBD_CMD_ECHO => self.push_kbd(KBD_CMD_ECHO),
            KBD_CMD_GETID => {
                self.push_kbd(KBD_ACK);
                self.push_kbd(0xab);
                // MF2 keyboard: 0xab 0x83, or 0xab 0x41 through translation.
                self.push_kbd(if self.ctr() & CTR_XLATE != 0 {
                    0x41
                } else {
                    0x83
                });
            }
            KBD_CMD_RESET => {
                self.push_kbd(KBD_ACK);
                self.push_kbd(KBD_BAT_OK);
            }
            _ => self.push_kbd(KBD_ACK),
        }
    }

    fn read_register(&mut self, offset: u64) -> u8 {
        match offset {
            DATA_OFFSET => self.read_data(),
            COMMAND_OFFSET => self.status(),
            _ => 0xff,
        }
    }

    fn write_register(&mut self, offset: u64, value: u8) {
        match offset {
            DATA_OFFSET => self.write_data(value),
            COMMAND_OFFSET => self.command(value),
            _ => {}
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        read_bytes(offset, data, |o| self.read_register(o));
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        write_bytes(offset, data, |o, v| self.write_register(o, v));
    }

    fn name(&self) -> &'static str {
        "i8042"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{hammer, recording_sink, FakeIrq};

    struct Kbc {
        dev: I8042,
        events: Arc<std::sync::Mutex<Vec<PlatformEvent>>>,
        kbd: Arc<FakeIrq>,
        aux: Arc<FakeIrq>,
    }

    fn kbc() -> Kbc {
        let (sink, events) = recording_sink();
        let kbd = Arc::new(FakeIrq::default());
        let aux = Arc::new(FakeIrq::default());
        Kbc {
            dev: I8042::new(sink)
                .with_kbd_irq(kbd.clone())
                .with_aux_irq(aux.clone()),
            events,
            kbd,
            aux,
        }
    }

    impl Kbc {
        fn cmd(&mut self, c: u8) {
            self.dev.write(COMMAND_OFFSET, &[c]);
        }
        fn data(&mut self, v: u8) {
            self.dev.write(DATA_OFFSET, &[v]);
        }
        fn status(&mut self) -> u8 {
            let mut d = [0];
            self.dev.read(COMMAND_OFFSET, &mut d);
            d[0]
        }
        fn read(&mut self) -> u8 {
            let mut d = [0];
            self.dev.read(DATA_OFFSET, &mut d);
            d[0]
        }
        /// Like Linux's `i8042_command`: the reply must be waiting right away.
        fn reply(&mut self) -> u8 {
            assert_ne!(self.status() & STR_OBF, 0, "no reply waiting");
            self.read()
        }
        fn events(&self) -> Vec<PlatformEvent> {
            self.events.lock().unwrap().clone()
        }
    }

    #[test]
    fn empty_controller_status_and_data() {
        let mut k = kbc();
        let s = k.status();
        assert_eq!(s & STR_OBF, 0);
        assert_ne!(s & STR_SYS, 0);
        assert_ne!(s & STR_KEYLOCK, 0);
        assert_eq!(k.read(), 0);
        let mut d = [0u8];
        k.dev.read(2, &mut d);
        assert_eq!(d, [0xff]);
    }

    #[test]
    fn ctr_read_write_and_port_enable_bits() {
        let mut k = kbc();
        k.cmd(0x20);
        assert_eq!(k.reply(), CTR_DEFAULT);
        assert_eq!(k.status() & STR_OBF, 0);
        k.cmd(0x60);
        k.data(0x30); // both ports disabled, no interrupts, SYS clear
        k.cmd(0x20);
        assert_eq!(k.reply(), 0x30);
        assert_eq!(k.status() & STR_SYS, 0);
        k.cmd(CMD_AUX_ENABLE);
        k.cmd(CMD_KBD_ENABLE);
        k.cmd(0x20);
        assert_eq!(k.reply(), 0x00);
        k.cmd(CMD_AUX_DISABLE);
        k.cmd(0x20);
        assert_eq!(k.reply(), CTR_AUXDIS);
        k.cmd(CMD_KBD_DISABLE);
        k.cmd(0x20);
        assert_eq!(k.reply(), CTR_AUXDIS | CTR_KBDDIS);
        // Other RAM bytes are plain storage.
        k.cmd(0x65);
        k.data(0x99);
        k.cmd(0x25);
        assert_eq!(k.reply(), 0x99);
    }

    #[test]
    fn self_tests() {
        let mut k = kbc();
        k.cmd(CMD_CTL_TEST);
        assert_eq!(k.reply(), 0x55);
        k.cmd(CMD_KBD_TEST);
        assert_eq!(k.reply(), 0x00);
        k.cmd(CMD_AUX_TEST);
        assert_eq!(k.reply(), 0x00);
    }

    #[test]
    fn aux_loop_returns_aux_data_and_mux_probe_fails() {
        let mut k = kbc();
        k.cmd(CMD_AUX_LOOP);
        k.data(0x5a);
        assert_ne!(k.status() & STR_AUXDATA, 0);
        assert!(k.aux.is_high());
        assert!(!k.kbd.is_high());
        assert_eq!(k.reply(), 0x5a);
        assert!(!k.aux.is_high());
        // Linux's active-multiplexing probe wants the third byte changed: it is not.
        k.cmd(CMD_AUX_LOOP);
        k.data(0xa4);
        assert_eq!(k.reply(), 0xa4);
    }

    #[test]
    fn bytes_for_the_missing_mouse_time_out() {
        let mut k = kbc();
        k.cmd(CMD_AUX_SEND);
        k.data(0xf2);
        let s = k.status();
        assert_ne!(s & STR_AUXDATA, 0);
        assert_ne!(s & STR_TIMEOUT, 0);
        assert_eq!(k.reply(), NO_DEVICE);
        assert_eq!(k.status() & STR_TIMEOUT, 0);
    }

    #[test]
    fn output_port_read_write_and_reset_through_it() {
        let mut k = kbc();
        k.cmd(CMD_READ_OUTPUT);
        assert_eq!(k.reply(), OUTPUT_DEFAULT);
        k.cmd(CMD_WRITE_OUTPUT);
        k.data(0xdf); // A20 on, no reset
        k.cmd(CMD_READ_OUTPUT);
        assert_eq!(k.reply(), 0xdf);
        assert!(k.events().is_empty());
        k.cmd(CMD_WRITE_OUTPUT);
        k.data(0xde);
        assert_eq!(k.events(), vec![PlatformEvent::Reset]);
    }

    #[test]
    fn pulse_fe_resets_and_ff_does_not() {
        let mut k = kbc();
        k.cmd(0xff);
        assert!(k.events().is_empty());
        k.cmd(0xfe);
        assert_eq!(k.events(), vec![PlatformEvent::Reset]);
    }

    #[test]
    fn keyboard_probe_like_atkbd_with_interrupts() {
        let mut k = kbc();
        // Linux disables the keyboard interrupt during init; no edges then.
        k.cmd(0x60);
        k.data(CTR_SYS | CTR_XLATE | CTR_KBDDIS | CTR_AUXDIS);
        k.data(KBD_CMD_GETID);
        assert_eq!(k.kbd.edges(), 0);
        // Enabling the interrupt with data waiting raises IRQ 1.
        k.cmd(0x60);
        k.data(CTR_SYS | CTR_XLATE | CTR_KBDINT);
        assert_eq!(k.kbd.edges(), 1);
        assert_eq!(k.read(), KBD_ACK);
        assert_eq!(k.kbd.edges(), 2, "a fresh edge per byte");
        assert_eq!(k.read(), 0xab);
        assert_eq!(k.read(), 0x41);
        assert!(!k.kbd.is_high());
        assert_eq!(k.kbd.edges(), 3);
        k.data(KBD_CMD_SETLEDS);
        assert_eq!(k.read(), KBD_ACK);
        k.data(0x07);
        assert_eq!(k.read(), KBD_ACK);
        assert_eq!(
            k.status() & STR_OBF,
            0,
            "the LED parameter gets one ACK only"
        );
        k.data(KBD_CMD_RESET);
        assert_eq!((k.read(), k.read()), (KBD_ACK, KBD_BAT_OK));
        k.data(KBD_CMD_ECHO);
        assert_eq!(k.read(), KBD_CMD_ECHO);
        k.data(0xf4);
        assert_eq!(k.read(), KBD_ACK);
        assert_eq!(k.aux.edges(), 0);
    }

    #[test]
    fn untranslated_id_and_scan_set_query() {
        let mut k = kbc();
        k.cmd(0x60);
        k.data(0);
        k.data(KBD_CMD_GETID);
        assert_eq!([k.read(), k.read(), k.read()], [KBD_ACK, 0xab, 0x83]);
        k.data(KBD_CMD_SCANSET);
        k.data(0);
        assert_eq!([k.read(), k.read(), k.read()], [KBD_ACK, KBD_ACK, 0x02]);
    }

    #[test]
    fn output_buffer_is_bounded() {
        let mut k = kbc();
        for _ in 0..100 {
            k.data(KBD_CMD_GETID);
        }
        let mut n = 0;
        while k.status() & STR_OBF != 0 {
            k.read();
            n += 1;
            assert!(n <= OUTPUT_LIMIT);
        }
        assert_eq!(n, OUTPUT_LIMIT);
    }

    /// Linux's `__i8042_command`: parameter count in bits 15:12, reply count in bits 11:8;
    /// a reply that does not show up within the poll budget is a timeout.
    fn linux_command(k: &mut Kbc, command: u16, params: &[u8]) -> Result<Vec<u8>, &'static str> {
        const STR_IBF: u8 = 0x02;
        assert_eq!(k.status() & STR_IBF, 0);
        k.cmd(command as u8);
        for &p in params.iter().take(usize::from(command >> 12 & 0xf)) {
            k.data(p);
        }
        let mut replies = Vec::new();
        for _ in 0..(command >> 8 & 0xf) {
            if (0..10).all(|_| k.status() & STR_OBF == 0) {
                return Err("timeout");
            }
            if command & 0xff == u16::from(CMD_AUX_LOOP) && k.status() & STR_AUXDATA == 0 {
                return Err("auxerr");
            }
            replies.push(k.read());
        }
        Ok(replies)
    }

    fn flush(k: &mut Kbc) -> usize {
        let mut n = 0;
        while k.status() & STR_OBF != 0 && n < 16 {
            k.read();
            n += 1;
        }
        n
    }

    #[test]
    fn linux_probe_sequence_completes_without_timeouts() {
        const RCTR: u16 = 0x0120;
        const WCTR: u16 = 0x1060;
        const AUX_LOOP: u16 = 0x11d3;
        let mut k = kbc();
        // i8042_controller_check, _selftest, _init.
        assert!(flush(&mut k) < 16);
        assert_eq!(linux_command(&mut k, 0x01aa, &[]), Ok(vec![0x55]));
        let ctr = linux_command(&mut k, RCTR, &[]).unwrap()[0];
        assert_eq!(linux_command(&mut k, RCTR, &[]).unwrap()[0], ctr);
        assert_ne!(k.status() & STR_KEYLOCK, 0, "no 'Keylock active' warning");
        let mut ctr = (ctr | CTR_KBDDIS) & !CTR_KBDINT;
        linux_command(&mut k, WCTR, &[ctr]).unwrap();
        // i8042_check_aux: loop test, AUX disable/enable bit test, AUX IRQ test.
        flush(&mut k);
        assert_eq!(linux_command(&mut k, AUX_LOOP, &[0x5a]), Ok(vec![0x5a]));
        linux_command(&mut k, 0x00a7, &[]).unwrap();
        assert_ne!(linux_command(&mut k, RCTR, &[]).unwrap()[0] & CTR_AUXDIS, 0);
        linux_command(&mut k, 0x00a8, &[]).unwrap();
        assert_eq!(linux_command(&mut k, RCTR, &[]).unwrap()[0] & CTR_AUXDIS, 0);
        ctr = (ctr & !CTR_AUXDIS) | CTR_AUXINT;
        linux_command(&mut k, WCTR, &[ctr]).unwrap();
        let aux_edges = k.aux.edges();
        linux_command(&mut k, AUX_LOOP & 0xf0ff, &[0xa5]).unwrap();
        assert_eq!(k.aux.edges(), aux_edges + 1, "AUX IRQ delivered");
        assert_ne!(k.status() & STR_AUXDATA, 0);
        assert_eq!(k.read(), 0xa5);
        ctr = (ctr | CTR_AUXDIS) & !CTR_AUXINT;
        linux_command(&mut k, WCTR, &[ctr]).unwrap();
        // i8042_check_mux: the third loop byte comes back unchanged, so no multiplexer.
        flush(&mut k);
        assert_eq!(linux_command(&mut k, AUX_LOOP, &[0xf0]), Ok(vec![0xf0]));
        assert_eq!(linux_command(&mut k, AUX_LOOP, &[0x56]), Ok(vec![0x56]));
        assert_eq!(linux_command(&mut k, AUX_LOOP, &[0xa4]), Ok(vec![0xa4]));
        // i8042_enable_aux_port, i8042_enable_kbd_port.
        ctr = (ctr & !(CTR_AUXDIS | CTR_KBDDIS)) | CTR_AUXINT | CTR_KBDINT;
        linux_command(&mut k, WCTR, &[ctr]).unwrap();
        // atkbd_probe: GETID answered through IRQ 1, one edge per byte.
        let kbd_edges = k.kbd.edges();
        k.data(KBD_CMD_GETID);
        let mut id = Vec::new();
        while k.kbd.is_high() {
            id.push(k.read());
        }
        assert_eq!(id, vec![KBD_ACK, 0xab, 0x41]);
        assert_eq!(k.kbd.edges(), kbd_edges + 3);
        // psmouse_probe: GETID to the absent mouse fails at once with a timeout byte.
        linux_command(&mut k, 0x10d4, &[0xf2]).unwrap();
        assert!(k.aux.is_high());
        assert_eq!(
            k.status() & (STR_AUXDATA | STR_TIMEOUT),
            STR_AUXDATA | STR_TIMEOUT
        );
        assert_eq!(k.read(), NO_DEVICE);
        // machine_real_restart / reboot=k: pulse the reset line.
        assert!(k.events().is_empty());
        k.cmd(0xfe);
        assert_eq!(k.events(), vec![PlatformEvent::Reset]);
    }

    #[test]
    fn hostile_accesses_do_not_panic() {
        let mut k = kbc();
        hammer(&mut k.dev, I8042_LEN + 2, 50_000, 0x8042);
    }

    #[test]
    fn state_round_trips_with_queued_output() {
        let (sink, _) = crate::test_util::recording_sink();
        let mut a = I8042::new(sink.clone());
        a.write(4, &[0xaa]); // self test: 0x55 waits in the output buffer
        let st = a.state();
        assert_eq!(st.output.len(), 1);
        let mut b = I8042::new(sink);
        b.restore(&st).unwrap();
        assert_eq!(b.state(), st);
        let mut v = [0u8];
        b.read(0, &mut v);
        assert_eq!(v[0], 0x55);
        let mut bad = st;
        bad.ram.push(0);
        assert!(b.restore(&bad).is_err());
    }
}
