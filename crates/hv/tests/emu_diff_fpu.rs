//! Differential tests of the x87, MMX and SSE/SSE2 instructions: every form runs natively on
//! the host CPU and in the emulator from the same registers, x87/SSE state (an FXSAVE image)
//! and memory, over random and edge-case operands (NaNs with payloads, signalling NaNs,
//! infinities, denormals, ±0, extreme exponents, integer limits, unsupported 80-bit
//! encodings) under several MXCSR / FCW settings (rounding modes, precision control, DAZ, FTZ,
//! unmasked exceptions). GPRs, flags, XMM, MMX/ST registers (80 bits), FCW, FSW, FTW, MXCSR,
//! memory and the exception raised (#XM, #MF, #GP, ...) must match.
//!
//! Natively, a faulting instruction raises a signal; the handler resumes the trampoline after
//! the body and records the trap number, so unmasked SIMD exceptions and alignment faults are
//! compared too. In the emulator the exception goes through the IDT to a handler that records
//! its vector.
//!
//! Adding a form is one line: a name, the instruction(s), the kind of operands to generate.

mod emu_common;

use std::cell::Cell;
use std::sync::Once;

use emu_common::*;
use iced_x86::code_asm::*;
use iced_x86::{BlockEncoderOptions, IcedError};
use vireo_hv::{FpuState, MpState, Regs, Vcpu};

const CF: u64 = 1;
const PF: u64 = 4;
const AF: u64 = 0x10;
const ZF: u64 = 0x40;
const SF: u64 = 0x80;
const DF: u64 = 0x400;
const OF: u64 = 0x800;
const ARITH: u64 = CF | PF | AF | ZF | SF | OF;

/// Scratch memory; R15 points at its middle (16-byte aligned).
const MEM: usize = 1024;
const MID: u64 = 512;

/// Where the emulator's exception handlers record the vector.
const FAULT_ADDR: u64 = 0x1f_f000;
/// The exception handlers (16 bytes per vector).
const HANDLERS: u64 = 0x2_0000;

/// Offsets in [`St`] used by the trampoline.
const OFF_FLAGS: i32 = 128;
const OFF_FX_IN: i32 = 192;
const OFF_FX_OUT: i32 = 704;
const OFF_HOST: i32 = 1216;

/// State exchanged with the native trampoline.
#[repr(C, align(64))]
#[derive(Clone)]
struct St {
    r: [u64; 16],
    f: u64,
    _pad: [u64; 7],
    fx_in: [u8; 512],
    fx_out: [u8; 512],
    host: [u8; 512],
}

impl Default for St {
    fn default() -> St {
        St {
            r: [0; 16],
            f: 2,
            _pad: [0; 7],
            fx_in: [0; 512],
            fx_out: [0; 512],
            host: [0; 512],
        }
    }
}

#[repr(C, align(64))]
#[derive(Clone)]
struct Scratch([u8; MEM]);

type Body = fn(&mut CodeAssembler) -> Result<(), IcedError>;

/// What to generate.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Gen {
    /// XMM lanes and memory as single-precision values.
    F32,
    /// XMM lanes and memory as double-precision values.
    F64,
    /// Integers: random bytes with edge values.
    Int,
    /// x87 stack of extended values; memory as doubles/singles/ints mixed.
    X87,
    /// As `X87`, most stack values of moderate size (|x| < 2^12) for the trigonometric ones.
    X87Trig,
    /// As `X87`, most stack values in [-1, 1] (F2XM1, FYL2XP1).
    X87Unit,
    /// Integer-valued operands for conversions (floats near integer limits).
    Cvt,
}

struct Form {
    name: &'static str,
    body: Body,
    gen: Gen,
    /// RFLAGS bits the SDM leaves undefined.
    undef: u64,
    /// FSW bits not compared (undefined condition codes).
    fsw_mask: u16,
    /// ST values compared with this relative tolerance (transcendentals), 0 = exact.
    tol: f64,
    /// MXCSR flag bits not compared.
    mx_mask: u32,
    /// Only inputs this accepts are used (operations undefined outside their domain).
    domain: Option<fn(&Case) -> bool>,
    /// Scratch bytes not compared (offset from R15, length): the last x87 instruction pointer
    /// in a saved environment, which the emulator does not track.
    mem_skip: (i64, usize),
    /// What the SDM leaves to the implementation, compared bit for bit only on an Intel
    /// host (the emulated CPU is a `GenuineIntel`).
    vendor: Vendor,
}

/// A result the implementation chooses.
#[derive(Clone, Copy, PartialEq)]
enum Vendor {
    None,
    /// RCP/RSQRT approximations (SDM Vol. 2 RCPPS: relative error at most 1.5 * 2^-12):
    /// elsewhere the XMM lanes are compared within twice that.
    Approx,
    /// An FXSAVE image at this offset from R15: its MXCSR_MASK (bytes 28-31; AMD's has bit 17,
    /// misaligned-SSE mask) is not compared elsewhere.
    FxImage(i64),
}

/// Whether the host CPU is Intel's (`vendor_id` in /proc/cpuinfo).
fn host_is_intel() -> bool {
    static INTEL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *INTEL.get_or_init(|| {
        std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| {
            c.lines()
                .any(|l| l.starts_with("vendor_id") && l.ends_with("GenuineIntel"))
        })
    })
}

/// Two RCP/RSQRT lanes that approximate the same value: equal, or both finite and nonzero
/// within 3 * 2^-12 of each other.
fn approx_lanes_agree(a: u32, b: u32) -> bool {
    let (x, y) = (f32::from_bits(a), f32::from_bits(b));
    a == b
        || (x.is_normal()
            && y.is_normal()
            && x.signum() == y.signum()
            && ((x - y).abs() as f64) <= 3.0 / 4096.0 * (x.abs().max(y.abs()) as f64))
}

fn f(name: &'static str, body: Body, gen: Gen) -> Form {
    Form {
        name,
        body,
        gen,
        undef: 0,
        fsw_mask: 0,
        tol: 0.0,
        mx_mask: 0,
        domain: None,
        mem_skip: (0, 0),
        vendor: Vendor::None,
    }
}

impl Form {
    fn skip_mem(mut self, at: i64, len: usize) -> Form {
        self.mem_skip = (at, len);
        self
    }
    fn domain(mut self, d: fn(&Case) -> bool) -> Form {
        self.domain = Some(d);
        self
    }
    fn vendor(mut self, v: Vendor) -> Form {
        self.vendor = v;
        self
    }
    fn approx(mut self, tol: f64) -> Form {
        self.tol = tol;
        // C1 (rounded up) and the precision flag of an approximation are not compared.
        self.fsw_mask |= 0x0200 | 0x0020;
        self
    }
}

// ---- native execution ------------------------------------------------------------------------------

thread_local! {
    /// Body start, body end, recovery address of the trampoline running on this thread.
    static GUARD: Cell<[u64; 3]> = const { Cell::new([0; 3]) };
    /// Trap number of the fault the handler recovered from (0x100 + trapno), 0 if none.
    static TRAPPED: Cell<u64> = const { Cell::new(0) };
}

extern "C" fn on_fault(sig: libc::c_int, _info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid ucontext_t to an SA_SIGINFO handler; we only touch the
    // saved general registers of the interrupted context.
    unsafe {
        let uc = ctx as *mut libc::ucontext_t;
        let gregs = &mut (*uc).uc_mcontext.gregs;
        let rip = gregs[libc::REG_RIP as usize] as u64;
        let [start, end, recover] = GUARD.with(|g| g.get());
        if rip >= start && rip < end {
            TRAPPED.with(|t| t.set(0x100 | gregs[libc::REG_TRAPNO as usize] as u64));
            gregs[libc::REG_RIP as usize] = recover as i64;
            return;
        }
        // Not ours: crash the normal way.
        libc::signal(sig, libc::SIG_DFL);
    }
}

fn install_handlers() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for sig in [libc::SIGFPE, libc::SIGSEGV, libc::SIGILL, libc::SIGBUS] {
            // SAFETY: installing a handler with a zeroed, then filled sigaction.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_fault as *const () as usize;
                sa.sa_flags = libc::SA_SIGINFO;
                libc::sigemptyset(&mut sa.sa_mask);
                assert_eq!(libc::sigaction(sig, &sa, std::ptr::null_mut()), 0);
            }
        }
    });
}

struct Native {
    page: *mut u8,
    len: usize,
    guard: [u64; 3],
}

impl Native {
    fn new() -> Native {
        install_handlers();
        let len = 1 << 16;
        // SAFETY: an anonymous private mapping; checked for MAP_FAILED below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Native {
            page: p as *mut u8,
            len,
            guard: [0; 3],
        }
    }

    fn load(&mut self, body: Body) {
        let base = self.page as u64;
        let mut a = CodeAssembler::new(64).unwrap();
        let mut l_state = a.create_label();
        let mut l_tmp = a.create_label();
        let mut l_body = a.create_label();
        let mut l_recover = a.create_label();
        for r in [rbx, rbp, r12, r13, r14, r15] {
            a.push(r).unwrap();
        }
        a.mov(qword_ptr(l_state), rdi).unwrap();
        a.fxsave64(ptr(rdi + OFF_HOST)).unwrap();
        a.fxrstor64(ptr(rdi + OFF_FX_IN)).unwrap();
        a.push(qword_ptr(rdi + OFF_FLAGS)).unwrap();
        a.popfq().unwrap();
        let regs = [
            rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15,
        ];
        for (i, r) in regs.iter().enumerate() {
            if i != 4 && i != 7 {
                a.mov(*r, qword_ptr(rdi + 8 * i)).unwrap();
            }
        }
        a.mov(rdi, qword_ptr(rdi + 56)).unwrap();
        a.set_label(&mut l_body).unwrap();
        body(&mut a).unwrap();
        a.set_label(&mut l_recover).unwrap();
        a.pushfq().unwrap();
        a.mov(qword_ptr(l_tmp), rax).unwrap();
        a.mov(rax, qword_ptr(l_state)).unwrap();
        for (i, r) in regs.iter().enumerate() {
            if i != 0 && i != 4 {
                a.mov(qword_ptr(rax + 8 * i), *r).unwrap();
            }
        }
        a.mov(rcx, qword_ptr(l_tmp)).unwrap();
        a.mov(qword_ptr(rax), rcx).unwrap();
        a.pop(rcx).unwrap();
        a.mov(qword_ptr(rax + OFF_FLAGS), rcx).unwrap();
        a.fxsave64(ptr(rax + OFF_FX_OUT)).unwrap();
        a.fxrstor64(ptr(rax + OFF_HOST)).unwrap();
        a.cld().unwrap();
        for r in [r15, r14, r13, r12, rbp, rbx] {
            a.pop(r).unwrap();
        }
        a.ret().unwrap();
        a.set_label(&mut l_state).unwrap();
        a.dq(&[0]).unwrap();
        a.set_label(&mut l_tmp).unwrap();
        a.dq(&[0]).unwrap();
        let res = a
            .assemble_options(base, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
            .unwrap();
        let code = res.inner.code_buffer.clone();
        assert!(code.len() <= self.len);
        self.guard = [
            res.label_ip(&l_body).unwrap(),
            res.label_ip(&l_recover).unwrap(),
            res.label_ip(&l_recover).unwrap(),
        ];
        // SAFETY: the page is ours, writable, and large enough (checked above).
        unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), self.page, code.len()) };
    }

    /// Run; returns the trap number of a fault in the body, if any.
    fn run(&mut self, st: &mut St) -> Option<u64> {
        GUARD.with(|g| g.set(self.guard));
        TRAPPED.with(|t| t.set(0));
        // SAFETY: the page holds the trampoline assembled by `load`, which follows the C ABI:
        // it saves and restores the callee-saved registers and the host's x87/SSE state,
        // leaves RSP balanced and DF clear.
        let f: extern "C" fn(*mut St) = unsafe { std::mem::transmute(self.page) };
        f(st);
        GUARD.with(|g| g.set([0; 3]));
        let t = TRAPPED.with(|t| t.get());
        (t != 0).then_some(t & 0xff)
    }
}

impl Drop for Native {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping created in `new`.
        unsafe { libc::munmap(self.page as *mut libc::c_void, self.len) };
    }
}

// ---- FXSAVE image <-> FpuState ----------------------------------------------------------------------

fn fpu_of(img: &[u8; 512]) -> FpuState {
    let u16_at = |o: usize| u16::from_le_bytes([img[o], img[o + 1]]);
    let u64_at = |o: usize| u64::from_le_bytes(img[o..o + 8].try_into().unwrap());
    let mut s = FpuState {
        fcw: u16_at(0),
        fsw: u16_at(2),
        ftwx: img[4],
        last_opcode: u16_at(6),
        last_ip: u64_at(8),
        last_dp: u64_at(16),
        mxcsr: u32::from_le_bytes(img[24..28].try_into().unwrap()),
        ..Default::default()
    };
    for i in 0..8 {
        s.fpr[i][..10].copy_from_slice(&img[32 + 16 * i..42 + 16 * i]);
    }
    for i in 0..16 {
        s.xmm[i].copy_from_slice(&img[160 + 16 * i..176 + 16 * i]);
    }
    s
}

// ---- input generation ---------------------------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len() as u64) as usize]
    }
}

const F32_EDGES: &[u32] = &[
    0x0000_0000,
    0x8000_0000,
    0x3f80_0000,
    0xbf80_0000,
    0x7f80_0000,
    0xff80_0000,
    0x7fc0_0000,
    0xffc0_0000,
    0x7fc1_2345,
    0x7f80_0001,
    0x7fa0_0000,
    0xff81_2345,
    0x0000_0001,
    0x8000_0001,
    0x007f_ffff,
    0x0080_0000,
    0x8080_0000,
    0x7f7f_ffff,
    0xff7f_ffff,
    0x4f00_0000,
    0xcf00_0000,
    0x4effffff,
    0xcf000001,
    0x5f00_0000,
    0xdf00_0000,
    0x3f00_0000,
    0x3fc0_0000,
    0x4040_0000,
    0x3eaa_aaab,
    0x0040_0000,
    0x0000_0800,
    0x3f7f_ffff,
    0x3380_0000,
    0x7e80_0000,
];

const F64_EDGES: &[u64] = &[
    0,
    0x8000_0000_0000_0000,
    0x3ff0_0000_0000_0000,
    0xbff0_0000_0000_0000,
    0x7ff0_0000_0000_0000,
    0xfff0_0000_0000_0000,
    0x7ff8_0000_0000_0000,
    0xfff8_0000_0000_0000,
    0x7ff8_1234_5678_9abc,
    0x7ff0_0000_0000_0001,
    0x7ff4_0000_0000_0000,
    0xfff1_2345_6789_abcd,
    1,
    0x8000_0000_0000_0001,
    0x000f_ffff_ffff_ffff,
    0x0010_0000_0000_0000,
    0x8010_0000_0000_0000,
    0x7fef_ffff_ffff_ffff,
    0xffef_ffff_ffff_ffff,
    0x41e0_0000_0000_0000, // 2^31
    0xc1e0_0000_0000_0000,
    0x41df_ffff_ffc0_0000, // 2^31 - 1
    0xc1e0_0000_0020_0000, // -2^31 - 1
    0x43e0_0000_0000_0000, // 2^63
    0xc3e0_0000_0000_0000,
    0x3fe0_0000_0000_0000,
    0x3ff8_0000_0000_0000,
    0x4004_0000_0000_0000,
    0x3fd5_5555_5555_5555,
    0x47ef_ffff_e000_0000, // f32::MAX as f64
    0x47f0_0000_0000_0000,
    0x36a0_0000_0000_0000, // f32 denormal range
    0x3810_0000_0000_0000, // f32 min normal
    0x380f_ffff_f000_0000,
    0x3ca0_0000_0000_0000,
    0x0008_0000_0000_0000,
];

fn f32_val(r: &mut Rng) -> u32 {
    let s = ((r.next() & 1) as u32) << 31;
    match r.below(16) {
        0 | 1 => r.pick(F32_EDGES),
        2 => s | (r.next() as u32 & 0x7f_ffff), // denormal
        3 => s | 0x7f80_0000 | (r.next() as u32 & 0x7f_ffff) | 1, // NaN
        4 => s | ((r.below(4) as u32 + 1) << 23) | (r.next() as u32 & 0x7f_ffff),
        5 => s | ((250 + r.below(5) as u32) << 23) | (r.next() as u32 & 0x7f_ffff),
        6 => ((r.below(2000) as i32 - 1000) as f32).to_bits(),
        7..=10 => s | ((107 + r.below(40) as u32) << 23) | (r.next() as u32 & 0x7f_ffff),
        _ => r.next() as u32,
    }
}

fn f64_val(r: &mut Rng) -> u64 {
    let s = (r.next() & 1) << 63;
    match r.below(16) {
        0 | 1 => r.pick(F64_EDGES),
        2 => s | (r.next() & 0xf_ffff_ffff_ffff),
        3 => s | 0x7ff0_0000_0000_0000 | (r.next() & 0xf_ffff_ffff_ffff) | 1,
        4 => s | ((r.below(4) + 1) << 52) | (r.next() & 0xf_ffff_ffff_ffff),
        5 => s | ((2042 + r.below(5)) << 52) | (r.next() & 0xf_ffff_ffff_ffff),
        6 => ((r.below(2000) as i64 - 1000) as f64).to_bits(),
        7 => (f32::from_bits(f32_val(r)) as f64).to_bits(),
        8..=10 => s | ((1003 + r.below(40)) << 52) | (r.next() & 0xf_ffff_ffff_ffff),
        _ => r.next(),
    }
}

/// A double that is a single in disguise (for CVTSD2SS and x87 stores), or near f32 limits.
fn f64_narrow(r: &mut Rng) -> u64 {
    let v = f32::from_bits(f32_val(r));
    if v.is_nan() {
        return f64_val(r);
    }
    let noise = if r.below(2) == 0 {
        r.next() & 0x1fff_ffff
    } else {
        0
    };
    (v as f64).to_bits() ^ noise
}

/// An 80-bit value.
fn f80_val(r: &mut Rng) -> u128 {
    let s = ((r.next() & 1) as u128) << 79;
    let m = r.next();
    let e = |v: u128| v << 64;
    match r.below(24) {
        0 => s,                                                                 // ±0
        1 => s | e(0x7fff) | 1 << 63,                                           // ±inf
        2 => s | e(0x7fff) | 0xc000_0000_0000_0000 | (m as u128 & 0xffff),      // QNaN
        3 => s | e(0x7fff) | 1 << 63 | (m as u128 & 0x3fff_ffff_ffff_ffff) | 1, // SNaN
        4 => s | (m >> 1) as u128,                                              // denormal
        5 => s | (1u128 << 63) | (m as u128 & 0xff),                            // pseudo-denormal
        6 => s | e(1 + r.below(0x7ffe) as u128) | (m >> 1) as u128,             // unnormal
        7 => s | e(0x7fff) | (m >> 2) as u128, // pseudo-NaN / pseudo-inf
        8 => s | e(1 + r.below(3) as u128) | 1 << 63 | m as u128,
        9 => s | e(0x7ffb + r.below(4) as u128) | 1 << 63 | m as u128,
        10 | 11 => {
            // A double or single, exactly.
            let d = f64::from_bits(f64_val(r));
            if d.is_nan() || d.is_infinite() || d == 0.0 || d.abs() < 1e-300 {
                return s | e(0x3fff) | 1 << 63 | m as u128;
            }
            let bits = d.to_bits();
            let ex = ((bits >> 52) & 0x7ff) as u128;
            ((bits >> 63) as u128) << 79
                | e(ex + 16383 - 1023)
                | 1 << 63
                | ((bits & 0xf_ffff_ffff_ffff) << 11) as u128
        }
        12 => {
            let v = r.below(2000) as i64 - 1000;
            if v == 0 {
                return 0;
            }
            let a = v.unsigned_abs();
            let lz = a.leading_zeros();
            ((v < 0) as u128) << 79 | e(16383 + 63 - lz as u128) | (a << lz) as u128
        }
        13 => s | e(0x3fff) | 1 << 63 | (m & 0xffff_ffff_0000_0000) as u128, // short significand
        14 => {
            s | e(0x3f00 + r.below(0x200) as u128) | 1 << 63 | (m & 0xffff_ff00_0000_0000) as u128
        }
        _ => s | e(0x3fbf + r.below(0x80) as u128) | 1 << 63 | m as u128,
    }
}

fn int_val(r: &mut Rng) -> u64 {
    const EDGES: &[u64] = &[
        0,
        1,
        0x7f,
        0x80,
        0xff,
        0x7fff,
        0x8000,
        0xffff,
        0x7fff_ffff,
        0x8000_0000,
        0xffff_ffff,
        0x7fff_ffff_ffff_ffff,
        0x8000_0000_0000_0000,
        u64::MAX,
        0x0101_0101_0101_0101,
        0x8080_8080_8080_8080,
        0x7f7f_7f7f_7f7f_7f7f,
        0x0000_ffff_0000_ffff,
    ];
    match r.below(4) {
        0 => r.pick(EDGES),
        1 => r.next() & 0x00ff_00ff_00ff_00ff,
        _ => r.next(),
    }
}

/// MXCSR values: mostly default, sometimes directed rounding, DAZ/FTZ, sticky flags, and
/// unmasked exceptions.
fn mxcsr_val(r: &mut Rng) -> u32 {
    let rc = (r.below(4) as u32) << 13;
    match r.below(12) {
        0..=2 => 0x1f80,
        3 => 0x1fa0,
        4 => 0x1f80 | rc,
        5 => 0x1f80 | rc | 0x8040, // FTZ + DAZ
        6 => 0x1f80 | 0x8000,
        7 => 0x1f80 | 0x0040,
        8 => 0x1f80 | (r.next() as u32 & 0x3f),
        9 => (0x1f80 & !((r.next() as u32 & 0x3f) << 7)) | rc, // unmasked
        10 => 0x1f80 & !(1 << (7 + r.below(6))),
        _ => 0x1fa0 | rc | (r.next() as u32 & 0x8040),
    }
}

fn fcw_val(r: &mut Rng) -> u16 {
    let rc = (r.below(4) as u16) << 10;
    let pc = r.pick(&[0u16, 2, 3]) << 8;
    match r.below(10) {
        0..=3 => 0x037f,
        4 => 0x007f | pc | rc,
        5 => 0x037f | rc,
        6 => 0x007f | pc,
        7 => (0x037f & !(1 << r.below(6))) | rc,
        8 => 0x0340 | rc | (r.next() as u16 & 0x3f),
        _ => 0x037f | rc | (r.next() as u16 & 0x1000),
    }
}

struct Case {
    st: St,
    mem: Box<Scratch>,
}

fn gen_case(r: &mut Rng, gen: Gen) -> Case {
    let mut st = St::default();
    for v in st.r.iter_mut() {
        *v = int_val(r);
    }
    st.r[4] = 0;
    st.r[15] = MID;
    st.f = 2 | (r.next() & ARITH);
    let mut mem = Box::new(Scratch([0; MEM]));
    // XMM registers and memory lanes.
    let mut lanes = |n: usize, buf: &mut [u8]| match gen {
        Gen::F32 => {
            for c in buf.chunks_mut(4) {
                c.copy_from_slice(&f32_val(r).to_le_bytes());
            }
            let _ = n;
        }
        Gen::F64 | Gen::X87 | Gen::X87Trig | Gen::X87Unit => {
            for c in buf.chunks_mut(8) {
                let v = if r.below(4) == 0 {
                    f64_narrow(r)
                } else {
                    f64_val(r)
                };
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
        Gen::Int => {
            for c in buf.chunks_mut(8) {
                c.copy_from_slice(&int_val(r).to_le_bytes());
            }
        }
        Gen::Cvt => {
            for c in buf.chunks_mut(8) {
                let v = match r.below(4) {
                    0 => int_val(r),
                    1 => f64_val(r),
                    2 => (f32_val(r) as u64) | (f32_val(r) as u64) << 32,
                    _ => {
                        let i = r.next() as i64 >> r.below(64);
                        let d = (i as f64).to_bits();
                        if r.below(2) == 0 {
                            d
                        } else {
                            (i as f32).to_bits() as u64
                                | ((r.next() as i32 as f32).to_bits() as u64) << 32
                        }
                    }
                };
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
    };
    let mut xmm = [0u8; 256];
    lanes(0, &mut xmm);
    lanes(0, &mut mem.0);
    // Often make the second operand close to the first (cancellation, ties).
    if r.below(3) == 0 {
        for i in 0..16 {
            let bit = r.below(if gen == Gen::F32 { 24 } else { 53 }) as usize;
            xmm[16 + i] = xmm[i];
            if i == bit / 8 {
                xmm[16 + i] ^= 1 << (bit % 8);
            }
            mem.0[MID as usize + i] = xmm[i] ^ if i == 0 { 1 } else { 0 };
        }
    }
    st.fx_in[160..416].copy_from_slice(&xmm);
    // x87 state: every form gets a sane one; x87 forms a random stack.
    let x87 = matches!(gen, Gen::X87 | Gen::X87Trig | Gen::X87Unit);
    let (fcw, fsw, ftw) = if x87 {
        let fcw = fcw_val(r);
        let top = r.below(8) as u16;
        // Only masked flags may be pending, so the first instruction does not #MF.
        let flags = (r.next() as u16 & 0x3f) & fcw & if r.below(2) == 0 { 0 } else { 0x3f };
        let cc = r.next() as u16 & 0x4700;
        let ftw = match r.below(4) {
            0 => r.next() as u8,
            1 => 0,
            _ => 0xff,
        };
        (fcw, top << 11 | flags | cc, ftw)
    } else {
        (0x037f, 0, 0)
    };
    st.fx_in[0..2].copy_from_slice(&fcw.to_le_bytes());
    st.fx_in[2..4].copy_from_slice(&fsw.to_le_bytes());
    st.fx_in[4] = ftw;
    for i in 0..8 {
        let v = if x87 {
            let v = f80_val(r);
            let small = r.below(4) != 0;
            match gen {
                Gen::X87Trig if small => {
                    (v & !(0x7fffu128 << 64))
                        | ((0x3fff - 20 + r.below(32) as u128) << 64)
                        | 1 << 63
                }
                Gen::X87Unit if small => {
                    (v & !(0x7fffu128 << 64)) | ((0x3fff - 1 - r.below(70) as u128) << 64) | 1 << 63
                }
                _ => v,
            }
        } else {
            int_val(r) as u128 | 0xffff << 64
        };
        st.fx_in[32 + 16 * i..42 + 16 * i].copy_from_slice(&v.to_le_bytes()[..10]);
    }
    let mx = mxcsr_val(r);
    st.fx_in[24..28].copy_from_slice(&mx.to_le_bytes());
    st.fx_in[28..32].copy_from_slice(&0xffffu32.to_le_bytes());
    if x87 {
        // Memory: a mix of singles, doubles, extended values and integers.
        for k in 0..(MEM / 16) {
            let c = &mut mem.0[16 * k..16 * k + 16];
            let v: u128 = match r.below(4) {
                0 => f32_val(r) as u128 | (f32_val(r) as u128) << 32,
                1 => f64_narrow(r) as u128 | (f64_val(r) as u128) << 64,
                2 => f80_val(r),
                _ => int_val(r) as u128 | (int_val(r) as u128) << 64,
            };
            c.copy_from_slice(&v.to_le_bytes());
        }
    }
    Case { st, mem }
}

// ---- the emulator side --------------------------------------------------------------------------------

struct Emu {
    m: Machine,
    v: Box<dyn Vcpu>,
}

impl Emu {
    fn new() -> Emu {
        let m = Machine::new(1);
        let mut v = m.vcpu(0);
        m.load_long(v.as_mut(), &[0xf4], CODE);
        for vec in 0..32u8 {
            let at = HANDLERS + vec as u64 * 16;
            let code = asm64(at, |a| {
                a.mov(dword_ptr(FAULT_ADDR), 0x100 | vec as u32).unwrap();
                exit(a);
            });
            m.write(at, &code);
            m.set_gate(vec, at, false, 0, 0);
        }
        Emu { m, v }
    }

    fn load(&mut self, body: Body) {
        let code = asm64(CODE, |a| {
            body(a).unwrap();
            exit(a);
        });
        self.m.write(CODE, &code);
    }

    fn run(&mut self, c: &Case) -> Outcome {
        let mut r = c.st.r;
        r[15] = r[15].wrapping_add(DATA);
        self.m.write(DATA, &c.mem.0);
        self.m.w32(FAULT_ADDR, 0);
        self.v
            .set_regs(&Regs {
                rax: r[0],
                rcx: r[1],
                rdx: r[2],
                rbx: r[3],
                rsp: STACK_TOP,
                rbp: r[5],
                rsi: r[6],
                rdi: r[7],
                r8: r[8],
                r9: r[9],
                r10: r[10],
                r11: r[11],
                r12: r[12],
                r13: r[13],
                r14: r[14],
                r15: r[15],
                rip: CODE,
                rflags: c.st.f,
            })
            .unwrap();
        self.v.set_fpu(&fpu_of(&c.st.fx_in)).unwrap();
        self.v.set_mp_state(MpState::Runnable).unwrap();
        let exit = self.v.run(self.m.io.as_ref()).unwrap();
        assert_eq!(exit, vireo_hv::VmExit::Interrupted);
        let g = self.v.regs().unwrap();
        let mut out = St {
            r: [
                g.rax, g.rcx, g.rdx, g.rbx, 0, g.rbp, g.rsi, g.rdi, g.r8, g.r9, g.r10, g.r11,
                g.r12, g.r13, g.r14, g.r15,
            ],
            f: g.rflags,
            ..St::default()
        };
        out.r[15] = out.r[15].wrapping_sub(DATA);
        let fault = self.m.r32(FAULT_ADDR) as u64;
        Outcome {
            st: out,
            mem: self.m.read(DATA, MEM),
            fault: (fault != 0).then_some(fault & 0xff),
            fpu: self.v.fpu().unwrap(),
        }
    }
}

// ---- comparing ---------------------------------------------------------------------------------------

fn ext_to_f64(v: &[u8]) -> f64 {
    let m = u64::from_le_bytes(v[..8].try_into().unwrap());
    let se = u16::from_le_bytes([v[8], v[9]]);
    let e = (se & 0x7fff) as i32 - 16383 - 63;
    let s = if se & 0x8000 != 0 { -1.0 } else { 1.0 };
    s * (m as f64) * 2f64.powi(e)
}

/// What one side produced: registers, scratch memory, the exception raised (vector), the
/// x87/SSE state.
struct Outcome {
    st: St,
    mem: Vec<u8>,
    fault: Option<u64>,
    fpu: FpuState,
}

fn compare(form: &Form, host: &Outcome, emu: &Outcome) -> Vec<String> {
    let (hfault, efault) = (host.fault, emu.fault);
    let (hmem, emem) = (&host.mem, &emu.mem);
    let efpu = &emu.fpu;
    let h = &host.fpu;
    let (host, emu) = (&host.st, &emu.st);
    let mut d = Vec::new();
    if hfault != efault {
        d.push(format!("fault: host {hfault:?} emu {efault:?}"));
    }
    for i in 0..16 {
        if i != 4 && host.r[i] != emu.r[i] {
            d.push(format!("r{i}: host {:#x} emu {:#x}", host.r[i], emu.r[i]));
        }
    }
    let defined = (ARITH | DF) & !form.undef;
    if (host.f ^ emu.f) & defined != 0 {
        d.push(format!(
            "rflags: host {:#x} emu {:#x}",
            host.f & defined,
            emu.f & defined
        ));
    }
    if hmem != emem {
        let at = hmem.iter().zip(emem).position(|(a, b)| a != b).unwrap_or(0);
        d.push(format!(
            "memory at scratch+{at}: host {:02x?} emu {:02x?}",
            &hmem[at & !15..(at & !15) + 16],
            &emem[at & !15..(at & !15) + 16]
        ));
    }
    if h.fcw != efpu.fcw {
        d.push(format!("fcw: host {:#x} emu {:#x}", h.fcw, efpu.fcw));
    }
    if (h.fsw ^ efpu.fsw) & !form.fsw_mask != 0 {
        d.push(format!("fsw: host {:#06x} emu {:#06x}", h.fsw, efpu.fsw));
    }
    if h.ftwx != efpu.ftwx {
        d.push(format!("ftw: host {:#04x} emu {:#04x}", h.ftwx, efpu.ftwx));
    }
    let mxm = 0xffff & !form.mx_mask;
    if (h.mxcsr ^ efpu.mxcsr) & mxm != 0 {
        d.push(format!("mxcsr: host {:#x} emu {:#x}", h.mxcsr, efpu.mxcsr));
    }
    for i in 0..8 {
        let (a, b) = (&h.fpr[i][..10], &efpu.fpr[i][..10]);
        if a != b {
            let close = form.tol > 0.0 && {
                let (x, y) = (ext_to_f64(a), ext_to_f64(b));
                x == y || ((x - y).abs() <= form.tol * x.abs().max(y.abs()))
            };
            if !close {
                d.push(format!(
                    "st{i}: host {:04x}:{:016x} emu {:04x}:{:016x}",
                    u16::from_le_bytes([a[8], a[9]]),
                    u64::from_le_bytes(a[..8].try_into().unwrap()),
                    u16::from_le_bytes([b[8], b[9]]),
                    u64::from_le_bytes(b[..8].try_into().unwrap())
                ));
            }
        }
    }
    let lanes = |x: &[u8; 16]| -> Vec<u32> {
        x.chunks(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    for i in 0..16 {
        let close = form.vendor == Vendor::Approx
            && !host_is_intel()
            && lanes(&h.xmm[i])
                .into_iter()
                .zip(lanes(&efpu.xmm[i]))
                .all(|(a, b)| approx_lanes_agree(a, b));
        if h.xmm[i] != efpu.xmm[i] && !close {
            d.push(format!(
                "xmm{i}: host {:032x} emu {:032x}",
                u128::from_le_bytes(h.xmm[i]),
                u128::from_le_bytes(efpu.xmm[i])
            ));
        }
    }
    d
}

fn describe(c: &Case) -> String {
    let img = &c.st.fx_in;
    let fpu = fpu_of(img);
    let mut s = format!(
        "mxcsr={:#x} fcw={:#x} fsw={:#x} ftw={:#x} xmm0={:032x} xmm1={:032x} mem@r15={:02x?}",
        fpu.mxcsr,
        fpu.fcw,
        fpu.fsw,
        fpu.ftwx,
        u128::from_le_bytes(fpu.xmm[0]),
        u128::from_le_bytes(fpu.xmm[1]),
        &c.mem.0[MID as usize..MID as usize + 16]
    );
    for i in 0..3 {
        s += &format!(
            " st{i}={:04x}:{:016x}",
            u16::from_le_bytes([fpu.fpr[i][8], fpu.fpr[i][9]]),
            u64::from_le_bytes(fpu.fpr[i][..8].try_into().unwrap())
        );
    }
    s += &format!(" r0={:#x} r3={:#x}", c.st.r[0], c.st.r[3]);
    s
}

fn check(forms: Vec<Form>, cases: usize, seed: u64) {
    let mut native = Native::new();
    let mut emu = Emu::new();
    let mut rng = Rng(seed);
    let mut failures = Vec::new();
    for form in &forms {
        native.load(form.body);
        emu.load(form.body);
        let mut bad = 0;
        for _ in 0..cases {
            let mut c = gen_case(&mut rng, form.gen);
            while form.domain.is_some_and(|d| !d(&c)) {
                c = gen_case(&mut rng, form.gen);
            }
            let mut host = c.st.clone();
            let mut hmem = c.mem.clone();
            host.r[15] = host.r[15].wrapping_add(hmem.0.as_mut_ptr() as u64);
            let hfault = native.run(&mut host);
            host.r[15] = host.r[15].wrapping_sub(hmem.0.as_ptr() as u64);
            host.r[4] = 0;
            let mut host = Outcome {
                fpu: fpu_of(&host.fx_out),
                st: host,
                mem: hmem.0.to_vec(),
                fault: hfault,
            };
            let mut emu_out = emu.run(&c);
            let (at, len) = form.mem_skip;
            let at = (MID as i64 + at) as usize;
            for m in [&mut host.mem, &mut emu_out.mem] {
                m[at..at + len].fill(0);
                if let Vendor::FxImage(fx) = form.vendor {
                    if !host_is_intel() {
                        let mask = (MID as i64 + fx + 28) as usize;
                        m[mask..mask + 4].fill(0);
                    }
                }
            }
            let diffs = compare(form, &host, &emu_out);
            if !diffs.is_empty() {
                bad += 1;
                if bad <= 3 {
                    failures.push(format!(
                        "{}: {}\n    => {}",
                        form.name,
                        describe(&c),
                        diffs.join("; ")
                    ));
                }
            }
        }
        if bad > 3 {
            failures.push(format!("{}: {bad} of {cases} cases differ", form.name));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

const CASES: usize = 3000;

// ---- SSE/SSE2 floating point ---------------------------------------------------------------------------

#[test]
fn diff_sse_arith() {
    let forms = vec![
        f("addps xmm0,xmm1", |a| a.addps(xmm0, xmm1), Gen::F32),
        f(
            "addps xmm2,m128",
            |a| a.addps(xmm2, xmmword_ptr(r15)),
            Gen::F32,
        ),
        f("addss xmm0,xmm1", |a| a.addss(xmm0, xmm1), Gen::F32),
        f(
            "addss xmm3,m32",
            |a| a.addss(xmm3, dword_ptr(r15 + 4)),
            Gen::F32,
        ),
        f("addpd xmm0,xmm1", |a| a.addpd(xmm0, xmm1), Gen::F64),
        f(
            "addpd xmm9,m128",
            |a| a.addpd(xmm9, xmmword_ptr(r15)),
            Gen::F64,
        ),
        f("addsd xmm0,xmm1", |a| a.addsd(xmm0, xmm1), Gen::F64),
        f(
            "addsd xmm0,m64",
            |a| a.addsd(xmm0, qword_ptr(r15 + 8)),
            Gen::F64,
        ),
        f("subps xmm0,xmm1", |a| a.subps(xmm0, xmm1), Gen::F32),
        f("subss xmm0,xmm1", |a| a.subss(xmm0, xmm1), Gen::F32),
        f("subpd xmm0,xmm1", |a| a.subpd(xmm0, xmm1), Gen::F64),
        f(
            "subsd xmm0,m64",
            |a| a.subsd(xmm0, qword_ptr(r15)),
            Gen::F64,
        ),
        f("mulps xmm0,xmm1", |a| a.mulps(xmm0, xmm1), Gen::F32),
        f("mulss xmm0,xmm1", |a| a.mulss(xmm0, xmm1), Gen::F32),
        f("mulpd xmm0,xmm1", |a| a.mulpd(xmm0, xmm1), Gen::F64),
        f("mulsd xmm0,xmm1", |a| a.mulsd(xmm0, xmm1), Gen::F64),
        f("divps xmm0,xmm1", |a| a.divps(xmm0, xmm1), Gen::F32),
        f(
            "divss xmm0,m32",
            |a| a.divss(xmm0, dword_ptr(r15)),
            Gen::F32,
        ),
        f("divpd xmm0,xmm1", |a| a.divpd(xmm0, xmm1), Gen::F64),
        f("divsd xmm0,xmm1", |a| a.divsd(xmm0, xmm1), Gen::F64),
        f("sqrtps xmm0,xmm1", |a| a.sqrtps(xmm0, xmm1), Gen::F32),
        f("sqrtss xmm0,xmm1", |a| a.sqrtss(xmm0, xmm1), Gen::F32),
        f(
            "sqrtpd xmm0,m128",
            |a| a.sqrtpd(xmm0, xmmword_ptr(r15)),
            Gen::F64,
        ),
        f("sqrtsd xmm0,xmm1", |a| a.sqrtsd(xmm0, xmm1), Gen::F64),
        f("minps xmm0,xmm1", |a| a.minps(xmm0, xmm1), Gen::F32),
        f("minss xmm0,xmm1", |a| a.minss(xmm0, xmm1), Gen::F32),
        f("minpd xmm0,xmm1", |a| a.minpd(xmm0, xmm1), Gen::F64),
        f(
            "minsd xmm0,m64",
            |a| a.minsd(xmm0, qword_ptr(r15)),
            Gen::F64,
        ),
        f("maxps xmm0,xmm1", |a| a.maxps(xmm0, xmm1), Gen::F32),
        f("maxss xmm0,xmm1", |a| a.maxss(xmm0, xmm1), Gen::F32),
        f("maxpd xmm0,xmm1", |a| a.maxpd(xmm0, xmm1), Gen::F64),
        f("maxsd xmm0,xmm1", |a| a.maxsd(xmm0, xmm1), Gen::F64),
        f("rcpps xmm0,xmm1", |a| a.rcpps(xmm0, xmm1), Gen::F32).vendor(Vendor::Approx),
        f(
            "rcpss xmm0,m32",
            |a| a.rcpss(xmm0, dword_ptr(r15)),
            Gen::F32,
        )
        .vendor(Vendor::Approx),
        f("rsqrtps xmm0,xmm1", |a| a.rsqrtps(xmm0, xmm1), Gen::F32).vendor(Vendor::Approx),
        f("rsqrtss xmm0,xmm1", |a| a.rsqrtss(xmm0, xmm1), Gen::F32).vendor(Vendor::Approx),
        f(
            "addsd chain",
            |a| {
                a.addsd(xmm0, xmm1)?;
                a.mulsd(xmm0, xmm2)?;
                a.divsd(xmm0, xmm3)
            },
            Gen::F64,
        ),
    ];
    check(forms, CASES, 0x5eed_0001);
}

#[test]
fn diff_sse_compare() {
    let forms = vec![
        f("cmpeqps", |a| a.cmpps(xmm0, xmm1, 0), Gen::F32),
        f("cmpltps", |a| a.cmpps(xmm0, xmm1, 1), Gen::F32),
        f("cmpleps", |a| a.cmpps(xmm0, xmm1, 2), Gen::F32),
        f("cmpunordps", |a| a.cmpps(xmm0, xmm1, 3), Gen::F32),
        f("cmpneqps", |a| a.cmpps(xmm0, xmm1, 4), Gen::F32),
        f("cmpnltps", |a| a.cmpps(xmm0, xmm1, 5), Gen::F32),
        f("cmpnleps", |a| a.cmpps(xmm0, xmm1, 6), Gen::F32),
        f(
            "cmpordps m128",
            |a| a.cmpps(xmm0, xmmword_ptr(r15), 7),
            Gen::F32,
        ),
        f("cmpeqpd", |a| a.cmppd(xmm0, xmm1, 0), Gen::F64),
        f("cmpltpd", |a| a.cmppd(xmm0, xmm1, 1), Gen::F64),
        f("cmplepd", |a| a.cmppd(xmm0, xmm1, 2), Gen::F64),
        f("cmpunordpd", |a| a.cmppd(xmm0, xmm1, 3), Gen::F64),
        f("cmpneqpd", |a| a.cmppd(xmm0, xmm1, 4), Gen::F64),
        f("cmpnltpd", |a| a.cmppd(xmm0, xmm1, 5), Gen::F64),
        f("cmpnlepd", |a| a.cmppd(xmm0, xmm1, 6), Gen::F64),
        f("cmpordpd", |a| a.cmppd(xmm0, xmm1, 7), Gen::F64),
        f("cmpltss", |a| a.cmpss(xmm0, xmm1, 1), Gen::F32),
        f(
            "cmpneqss m32",
            |a| a.cmpss(xmm0, dword_ptr(r15), 4),
            Gen::F32,
        ),
        f("cmpeqsd", |a| a.cmpsd_3(xmm0, xmm1, 0), Gen::F64),
        f(
            "cmpnlesd m64",
            |a| a.cmpsd_3(xmm0, qword_ptr(r15), 6),
            Gen::F64,
        ),
        f("comiss", |a| a.comiss(xmm0, xmm1), Gen::F32),
        f("comiss m32", |a| a.comiss(xmm0, dword_ptr(r15)), Gen::F32),
        f("ucomiss", |a| a.ucomiss(xmm0, xmm1), Gen::F32),
        f("comisd", |a| a.comisd(xmm0, xmm1), Gen::F64),
        f("ucomisd", |a| a.ucomisd(xmm0, xmm1), Gen::F64),
        f("ucomisd m64", |a| a.ucomisd(xmm0, qword_ptr(r15)), Gen::F64),
    ];
    check(forms, CASES, 0x5eed_0002);
}

#[test]
fn diff_sse_convert() {
    let forms = vec![
        f("cvtps2pd", |a| a.cvtps2pd(xmm0, xmm1), Gen::F32),
        f(
            "cvtps2pd m64",
            |a| a.cvtps2pd(xmm0, qword_ptr(r15)),
            Gen::F32,
        ),
        f("cvtpd2ps", |a| a.cvtpd2ps(xmm0, xmm1), Gen::F64),
        f("cvtss2sd", |a| a.cvtss2sd(xmm0, xmm1), Gen::F32),
        f(
            "cvtss2sd m32",
            |a| a.cvtss2sd(xmm0, dword_ptr(r15)),
            Gen::F32,
        ),
        f("cvtsd2ss", |a| a.cvtsd2ss(xmm0, xmm1), Gen::F64),
        f("cvtdq2ps", |a| a.cvtdq2ps(xmm0, xmm1), Gen::Int),
        f("cvtdq2pd", |a| a.cvtdq2pd(xmm0, xmm1), Gen::Int),
        f("cvtps2dq", |a| a.cvtps2dq(xmm0, xmm1), Gen::Cvt),
        f("cvttps2dq", |a| a.cvttps2dq(xmm0, xmm1), Gen::Cvt),
        f("cvtpd2dq", |a| a.cvtpd2dq(xmm0, xmm1), Gen::Cvt),
        f(
            "cvttpd2dq m128",
            |a| a.cvttpd2dq(xmm0, xmmword_ptr(r15)),
            Gen::Cvt,
        ),
        f("cvtsi2ss r32", |a| a.cvtsi2ss(xmm0, eax), Gen::Int),
        f("cvtsi2ss r64", |a| a.cvtsi2ss(xmm0, rax), Gen::Int),
        f("cvtsi2sd r32", |a| a.cvtsi2sd(xmm0, ebx), Gen::Int),
        f("cvtsi2sd r64", |a| a.cvtsi2sd(xmm0, rbx), Gen::Int),
        f(
            "cvtsi2sd m32",
            |a| a.cvtsi2sd(xmm0, dword_ptr(r15)),
            Gen::Int,
        ),
        f(
            "cvtsi2ss m64",
            |a| a.cvtsi2ss(xmm0, qword_ptr(r15)),
            Gen::Int,
        ),
        f("cvtss2si r32", |a| a.cvtss2si(eax, xmm1), Gen::Cvt),
        f("cvtss2si r64", |a| a.cvtss2si(rax, xmm1), Gen::Cvt),
        f("cvttss2si r32", |a| a.cvttss2si(eax, xmm1), Gen::Cvt),
        f(
            "cvttss2si r64 m32",
            |a| a.cvttss2si(rax, dword_ptr(r15)),
            Gen::Cvt,
        ),
        f("cvtsd2si r32", |a| a.cvtsd2si(eax, xmm1), Gen::Cvt),
        f("cvtsd2si r64", |a| a.cvtsd2si(rax, xmm1), Gen::Cvt),
        f("cvttsd2si r32", |a| a.cvttsd2si(eax, xmm1), Gen::Cvt),
        f("cvttsd2si r64", |a| a.cvttsd2si(r9, xmm1), Gen::Cvt),
        f("cvtpi2ps mm", |a| a.cvtpi2ps(xmm0, mm1), Gen::Int),
        f(
            "cvtpi2pd m64",
            |a| a.cvtpi2pd(xmm0, qword_ptr(r15)),
            Gen::Int,
        ),
        f("cvtps2pi", |a| a.cvtps2pi(mm0, xmm1), Gen::Cvt),
        f("cvttps2pi", |a| a.cvttps2pi(mm2, xmm1), Gen::Cvt),
        f("cvtpd2pi", |a| a.cvtpd2pi(mm0, xmm1), Gen::Cvt),
        f("cvttpd2pi", |a| a.cvttpd2pi(mm0, xmm1), Gen::Cvt),
    ];
    check(forms, CASES, 0x5eed_0003);
}

#[test]
fn diff_sse_moves() {
    let forms = vec![
        f("movaps xmm,xmm", |a| a.movaps(xmm3, xmm12), Gen::Int),
        f(
            "movaps xmm,m128",
            |a| a.movaps(xmm3, xmmword_ptr(r15 + 16)),
            Gen::Int,
        ),
        f(
            "movaps m128,xmm",
            |a| a.movaps(xmmword_ptr(r15 - 32), xmm7),
            Gen::Int,
        ),
        f(
            "movaps misaligned (#GP)",
            |a| a.movaps(xmm3, xmmword_ptr(r15 + 8)),
            Gen::Int,
        ),
        f(
            "movapd m128,xmm misaligned",
            |a| a.movapd(xmmword_ptr(r15 + 4), xmm1),
            Gen::Int,
        ),
        f(
            "movdqa xmm,m128",
            |a| a.movdqa(xmm0, xmmword_ptr(r15)),
            Gen::Int,
        ),
        f(
            "movdqa m128,xmm",
            |a| a.movdqa(xmmword_ptr(r15 + 48), xmm15),
            Gen::Int,
        ),
        f(
            "movups xmm,m128",
            |a| a.movups(xmm0, xmmword_ptr(r15 + 3)),
            Gen::Int,
        ),
        f(
            "movups m128,xmm",
            |a| a.movups(xmmword_ptr(r15 + 7), xmm2),
            Gen::Int,
        ),
        f(
            "movupd xmm,m128",
            |a| a.movupd(xmm0, xmmword_ptr(r15 - 9)),
            Gen::Int,
        ),
        f(
            "movdqu xmm,m128",
            |a| a.movdqu(xmm8, xmmword_ptr(r15 + 1)),
            Gen::Int,
        ),
        f(
            "movdqu m128,xmm",
            |a| a.movdqu(xmmword_ptr(r15 + 5), xmm8),
            Gen::Int,
        ),
        f(
            "movntps",
            |a| a.movntps(xmmword_ptr(r15 + 32), xmm1),
            Gen::Int,
        ),
        f("movntpd", |a| a.movntpd(xmmword_ptr(r15), xmm1), Gen::Int),
        f(
            "movntdq",
            |a| a.movntdq(xmmword_ptr(r15 + 16), xmm9),
            Gen::Int,
        ),
        f(
            "movnti m32",
            |a| a.movnti(dword_ptr(r15 + 3), eax),
            Gen::Int,
        ),
        f("movnti m64", |a| a.movnti(qword_ptr(r15), rbx), Gen::Int),
        f("movss xmm,xmm", |a| a.movss(xmm0, xmm1), Gen::Int),
        f(
            "movss xmm,m32",
            |a| a.movss(xmm0, dword_ptr(r15 + 4)),
            Gen::Int,
        ),
        f(
            "movss m32,xmm",
            |a| a.movss(dword_ptr(r15 + 4), xmm1),
            Gen::Int,
        ),
        f("movsd xmm,xmm", |a| a.movsd_2(xmm0, xmm1), Gen::Int),
        f(
            "movsd xmm,m64",
            |a| a.movsd_2(xmm0, qword_ptr(r15 + 8)),
            Gen::Int,
        ),
        f(
            "movsd m64,xmm",
            |a| a.movsd_2(qword_ptr(r15 + 1), xmm1),
            Gen::Int,
        ),
        f("movd xmm,r32", |a| a.movd(xmm0, eax), Gen::Int),
        f("movd xmm,m32", |a| a.movd(xmm0, dword_ptr(r15)), Gen::Int),
        f("movd r32,xmm", |a| a.movd(ebx, xmm1), Gen::Int),
        f(
            "movd m32,xmm",
            |a| a.movd(dword_ptr(r15 + 2), xmm1),
            Gen::Int,
        ),
        f("movq xmm,r64", |a| a.movq(xmm0, rax), Gen::Int),
        f("movq r64,xmm", |a| a.movq(rbx, xmm1), Gen::Int),
        f("movq xmm,xmm", |a| a.movq(xmm0, xmm1), Gen::Int),
        f("movq xmm,m64", |a| a.movq(xmm0, qword_ptr(r15)), Gen::Int),
        f(
            "movq m64,xmm",
            |a| a.movq(qword_ptr(r15 + 8), xmm1),
            Gen::Int,
        ),
        f("movd mm,r32", |a| a.movd(mm0, eax), Gen::Int),
        f("movd r32,mm", |a| a.movd(ecx, mm3), Gen::Int),
        f("movq mm,r64", |a| a.movq(mm1, rax), Gen::Int),
        f("movq r64,mm", |a| a.movq(rdx, mm1), Gen::Int),
        f("movq mm,mm", |a| a.movq(mm0, mm7), Gen::Int),
        f("movq mm,m64", |a| a.movq(mm5, qword_ptr(r15 + 3)), Gen::Int),
        f("movq m64,mm", |a| a.movq(qword_ptr(r15 - 8), mm5), Gen::Int),
        f("movntq", |a| a.movntq(qword_ptr(r15), mm2), Gen::Int),
        f("movq2dq", |a| a.movq2dq(xmm0, mm1), Gen::Int),
        f("movdq2q", |a| a.movdq2q(mm0, xmm1), Gen::Int),
        f("movlps load", |a| a.movlps(xmm0, qword_ptr(r15)), Gen::Int),
        f(
            "movlps store",
            |a| a.movlps(qword_ptr(r15 + 8), xmm1),
            Gen::Int,
        ),
        f("movhps load", |a| a.movhps(xmm0, qword_ptr(r15)), Gen::Int),
        f(
            "movhps store",
            |a| a.movhps(qword_ptr(r15 + 8), xmm1),
            Gen::Int,
        ),
        f(
            "movlpd load",
            |a| a.movlpd(xmm0, qword_ptr(r15 + 5)),
            Gen::Int,
        ),
        f("movhpd store", |a| a.movhpd(qword_ptr(r15), xmm1), Gen::Int),
        f("movhlps", |a| a.movhlps(xmm0, xmm1), Gen::Int),
        f("movlhps", |a| a.movlhps(xmm0, xmm1), Gen::Int),
        f("movmskps", |a| a.movmskps(eax, xmm1), Gen::F32),
        f("movmskpd", |a| a.movmskpd(rax, xmm1), Gen::F64),
        f("pmovmskb xmm", |a| a.pmovmskb(eax, xmm1), Gen::Int),
        f("pmovmskb mm", |a| a.pmovmskb(eax, mm1), Gen::Int),
        f(
            "maskmovdqu",
            |a| {
                a.lea(rdi, ptr(r15 - 16))?;
                a.maskmovdqu(xmm0, xmm1)?;
                a.xor(edi, edi)
            },
            Gen::Int,
        ),
        f(
            "maskmovq",
            |a| {
                a.lea(rdi, ptr(r15 + 5))?;
                a.maskmovq(mm0, mm1)?;
                a.xor(edi, edi)
            },
            Gen::Int,
        ),
        f("pextrw xmm", |a| a.pextrw(eax, xmm1, 5), Gen::Int),
        f("pextrw mm", |a| a.pextrw(eax, mm1, 6), Gen::Int),
        f("pinsrw xmm,r32", |a| a.pinsrw(xmm0, eax, 6), Gen::Int),
        f(
            "pinsrw xmm,m16",
            |a| a.pinsrw(xmm0, word_ptr(r15 + 1), 1),
            Gen::Int,
        ),
        f("pinsrw mm,r32", |a| a.pinsrw(mm0, ecx, 3), Gen::Int),
        f(
            "emms",
            |a| {
                a.movq(mm0, rax)?;
                a.emms()
            },
            Gen::Int,
        ),
        f(
            "ldmxcsr",
            |a| {
                a.and(dword_ptr(r15), 0xffff)?;
                a.ldmxcsr(dword_ptr(r15))
            },
            Gen::Int,
        ),
        f(
            "ldmxcsr reserved (#GP)",
            |a| {
                a.or(dword_ptr(r15), 0x10000)?;
                a.ldmxcsr(dword_ptr(r15))
            },
            Gen::Int,
        ),
        f("stmxcsr", |a| a.stmxcsr(dword_ptr(r15 + 4)), Gen::Int),
    ];
    check(forms, 120, 0x5eed_0004);
}

// ---- integer SIMD ---------------------------------------------------------------------------------------

macro_rules! int_forms {
    ($($m:ident),* $(,)?) => {
        vec![$(
            f(concat!(stringify!($m), " xmm,xmm"), |a| a.$m(xmm0, xmm1), Gen::Int),
            f(concat!(stringify!($m), " xmm,m128"), |a| a.$m(xmm2, xmmword_ptr(r15)), Gen::Int),
            f(concat!(stringify!($m), " mm,mm"), |a| a.$m(mm0, mm1), Gen::Int),
            f(concat!(stringify!($m), " mm,m64"), |a| a.$m(mm3, qword_ptr(r15 + 4)), Gen::Int),
        )*]
    };
}

macro_rules! xmm_forms {
    ($($m:ident),* $(,)?) => {
        vec![$(
            f(concat!(stringify!($m), " xmm,xmm"), |a| a.$m(xmm0, xmm1), Gen::Int),
            f(concat!(stringify!($m), " xmm,m128"), |a| a.$m(xmm2, xmmword_ptr(r15)), Gen::Int),
        )*]
    };
}

#[test]
fn diff_simd_integer() {
    let mut forms = int_forms![
        paddb, paddw, paddd, paddq, psubb, psubw, psubd, psubq, paddsb, paddsw, paddusb, paddusw,
        psubsb, psubsw, psubusb, psubusw, pmullw, pmulhw, pmulhuw, pmuludq, pmaddwd, pavgb, pavgw,
        pminub, pmaxub, pminsw, pmaxsw, psadbw, pcmpeqb, pcmpeqw, pcmpeqd, pcmpgtb, pcmpgtw,
        pcmpgtd, packsswb, packssdw, packuswb, punpcklbw, punpcklwd, punpckldq, punpckhbw,
        punpckhwd, punpckhdq, pand, pandn, por, pxor, psllw, pslld, psllq, psrlw, psrld, psrlq,
        psraw, psrad,
    ];
    forms.extend(xmm_forms![
        punpcklqdq, punpckhqdq, unpcklps, unpckhps, unpcklpd, unpckhpd, andps, andnps, orps, xorps,
        andpd, andnpd, orpd, xorpd,
    ]);
    forms.extend(vec![
        f("psllw xmm,imm", |a| a.psllw(xmm0, 3), Gen::Int),
        f("psllw xmm,imm16", |a| a.psllw(xmm0, 16), Gen::Int),
        f("pslld xmm,imm", |a| a.pslld(xmm0, 31), Gen::Int),
        f("psllq xmm,imm", |a| a.psllq(xmm0, 63), Gen::Int),
        f("psrlw xmm,imm", |a| a.psrlw(xmm0, 15), Gen::Int),
        f("psrld xmm,imm", |a| a.psrld(xmm0, 7), Gen::Int),
        f("psrlq xmm,imm", |a| a.psrlq(xmm0, 200), Gen::Int),
        f("psraw xmm,imm", |a| a.psraw(xmm0, 9), Gen::Int),
        f("psrad xmm,imm", |a| a.psrad(xmm0, 40), Gen::Int),
        f("pslldq", |a| a.pslldq(xmm0, 5), Gen::Int),
        f("pslldq 16", |a| a.pslldq(xmm0, 16), Gen::Int),
        f("psrldq", |a| a.psrldq(xmm0, 15), Gen::Int),
        f("psllw mm,imm", |a| a.psllw(mm0, 5), Gen::Int),
        f("psrad mm,imm", |a| a.psrad(mm0, 31), Gen::Int),
        f("psrlq mm,imm", |a| a.psrlq(mm0, 64), Gen::Int),
        f("pshufd", |a| a.pshufd(xmm0, xmm1, 0x1b), Gen::Int),
        f(
            "pshufd m128",
            |a| a.pshufd(xmm0, xmmword_ptr(r15), 0xe4),
            Gen::Int,
        ),
        f("pshufhw", |a| a.pshufhw(xmm0, xmm1, 0x93), Gen::Int),
        f("pshuflw", |a| a.pshuflw(xmm0, xmm1, 0x4e), Gen::Int),
        f("pshufw", |a| a.pshufw(mm0, mm1, 0xb1), Gen::Int),
        f("shufps", |a| a.shufps(xmm0, xmm1, 0x8d), Gen::Int),
        f("shufpd", |a| a.shufpd(xmm0, xmm1, 2), Gen::Int),
        f(
            "shufpd m128",
            |a| a.shufpd(xmm0, xmmword_ptr(r15), 1),
            Gen::Int,
        ),
        f(
            "pcmpeqb misaligned (#GP)",
            |a| a.pcmpeqb(xmm0, xmmword_ptr(r15 + 1)),
            Gen::Int,
        ),
    ]);
    check(forms, 150, 0x5eed_0005);
}

// ---- x87 -----------------------------------------------------------------------------------------------

#[test]
fn diff_x87_load_store() {
    let forms = vec![
        f("fld m32", |a| a.fld(dword_ptr(r15)), Gen::X87),
        f("fld m64", |a| a.fld(qword_ptr(r15 + 8)), Gen::X87),
        f("fld m80", |a| a.fld(tword_ptr(r15 + 16)), Gen::X87),
        f("fld st(3)", |a| a.fld(st3), Gen::X87),
        f("fld st(0)", |a| a.fld(st0), Gen::X87),
        f("fild m16", |a| a.fild(word_ptr(r15 + 2)), Gen::X87),
        f("fild m32", |a| a.fild(dword_ptr(r15 + 4)), Gen::X87),
        f("fild m64", |a| a.fild(qword_ptr(r15 + 8)), Gen::X87),
        f("fld1", |a| a.fld1(), Gen::X87),
        f("fldz", |a| a.fldz(), Gen::X87),
        f("fldpi", |a| a.fldpi(), Gen::X87),
        f("fldl2e", |a| a.fldl2e(), Gen::X87),
        f("fldl2t", |a| a.fldl2t(), Gen::X87),
        f("fldlg2", |a| a.fldlg2(), Gen::X87),
        f("fldln2", |a| a.fldln2(), Gen::X87),
        f("fst m32", |a| a.fst(dword_ptr(r15)), Gen::X87),
        f("fstp m32", |a| a.fstp(dword_ptr(r15 + 4)), Gen::X87),
        f("fst m64", |a| a.fst(qword_ptr(r15 + 8)), Gen::X87),
        f("fstp m64", |a| a.fstp(qword_ptr(r15)), Gen::X87),
        f("fstp m80", |a| a.fstp(tword_ptr(r15 + 6)), Gen::X87),
        f("fst st(2)", |a| a.fst(st2), Gen::X87),
        f("fstp st(1)", |a| a.fstp(st1), Gen::X87),
        f("fstp st(0)", |a| a.fstp(st0), Gen::X87),
        f("fist m16", |a| a.fist(word_ptr(r15)), Gen::X87),
        f("fist m32", |a| a.fist(dword_ptr(r15 + 4)), Gen::X87),
        f("fistp m16", |a| a.fistp(word_ptr(r15 + 2)), Gen::X87),
        f("fistp m32", |a| a.fistp(dword_ptr(r15)), Gen::X87),
        f("fistp m64", |a| a.fistp(qword_ptr(r15 + 8)), Gen::X87),
        f("fisttp m16", |a| a.fisttp(word_ptr(r15)), Gen::X87),
        f("fisttp m32", |a| a.fisttp(dword_ptr(r15)), Gen::X87),
        f("fisttp m64", |a| a.fisttp(qword_ptr(r15)), Gen::X87),
        f("fbld", |a| a.fbld(ptr(r15)), Gen::X87).domain(|c| {
            // Valid BCD digits only (others are undefined).
            c.mem.0[MID as usize..MID as usize + 9]
                .iter()
                .all(|b| b & 0xf < 10 && b >> 4 < 10)
        }),
        f("fbstp", |a| a.fbstp(ptr(r15 + 2)), Gen::X87),
        f(
            "fld m64; fstp m32",
            |a| {
                a.fld(qword_ptr(r15))?;
                a.fstp(dword_ptr(r15 + 16))
            },
            Gen::X87,
        ),
        f(
            "fild m64; fistp m32",
            |a| {
                a.fild(qword_ptr(r15))?;
                a.fistp(dword_ptr(r15 + 16))
            },
            Gen::X87,
        ),
    ];
    check(forms, CASES, 0x5eed_0101);
}

#[test]
fn diff_x87_arith() {
    let forms = vec![
        f("fadd st0,st1", |a| a.fadd_2(st0, st1), Gen::X87),
        f("fadd st3,st0", |a| a.fadd_2(st3, st0), Gen::X87),
        f("faddp st1,st0", |a| a.faddp(st1, st0), Gen::X87),
        f("fadd m32", |a| a.fadd(dword_ptr(r15)), Gen::X87),
        f("fadd m64", |a| a.fadd(qword_ptr(r15 + 8)), Gen::X87),
        f("fiadd m16", |a| a.fiadd(word_ptr(r15)), Gen::X87),
        f("fiadd m32", |a| a.fiadd(dword_ptr(r15 + 4)), Gen::X87),
        f("fsub st0,st2", |a| a.fsub_2(st0, st2), Gen::X87),
        f("fsub st2,st0", |a| a.fsub_2(st2, st0), Gen::X87),
        f("fsubp st1,st0", |a| a.fsubp(st1, st0), Gen::X87),
        f("fsub m64", |a| a.fsub(qword_ptr(r15)), Gen::X87),
        f("fisub m32", |a| a.fisub(dword_ptr(r15)), Gen::X87),
        f("fsubr st0,st1", |a| a.fsubr_2(st0, st1), Gen::X87),
        f("fsubr st1,st0", |a| a.fsubr_2(st1, st0), Gen::X87),
        f("fsubrp st2,st0", |a| a.fsubrp(st2, st0), Gen::X87),
        f("fsubr m32", |a| a.fsubr(dword_ptr(r15)), Gen::X87),
        f("fisubr m16", |a| a.fisubr(word_ptr(r15)), Gen::X87),
        f("fmul st0,st1", |a| a.fmul_2(st0, st1), Gen::X87),
        f("fmul st4,st0", |a| a.fmul_2(st4, st0), Gen::X87),
        f("fmulp st1,st0", |a| a.fmulp(st1, st0), Gen::X87),
        f("fmul m64", |a| a.fmul(qword_ptr(r15)), Gen::X87),
        f("fimul m32", |a| a.fimul(dword_ptr(r15)), Gen::X87),
        f("fdiv st0,st1", |a| a.fdiv_2(st0, st1), Gen::X87),
        f("fdiv st1,st0", |a| a.fdiv_2(st1, st0), Gen::X87),
        f("fdivp st1,st0", |a| a.fdivp(st1, st0), Gen::X87),
        f("fdiv m32", |a| a.fdiv(dword_ptr(r15)), Gen::X87),
        f("fidiv m16", |a| a.fidiv(word_ptr(r15)), Gen::X87),
        f("fdivr st0,st1", |a| a.fdivr_2(st0, st1), Gen::X87),
        f("fdivr st1,st0", |a| a.fdivr_2(st1, st0), Gen::X87),
        f("fdivrp st1,st0", |a| a.fdivrp(st1, st0), Gen::X87),
        f("fdivr m64", |a| a.fdivr(qword_ptr(r15)), Gen::X87),
        f("fidivr m32", |a| a.fidivr(dword_ptr(r15)), Gen::X87),
        f("fchs", |a| a.fchs(), Gen::X87),
        f("fabs", |a| a.fabs(), Gen::X87),
        f("fsqrt", |a| a.fsqrt(), Gen::X87),
        f("frndint", |a| a.frndint(), Gen::X87),
        f(
            "fadd chain (#MF)",
            |a| {
                a.faddp(st1, st0)?;
                a.fmul_2(st0, st1)?;
                a.fdiv_2(st0, st2)
            },
            Gen::X87,
        ),
    ];
    check(forms, CASES, 0x5eed_0102);
}

#[test]
fn diff_x87_compare() {
    let forms = vec![
        f("fcom st1", |a| a.fcom_2(st0, st1), Gen::X87),
        f("fcomp st3", |a| a.fcomp_2(st0, st3), Gen::X87),
        f("fcompp", |a| a.fcompp(), Gen::X87),
        f("fucom st1", |a| a.fucom(st0, st1), Gen::X87),
        f("fucomp st2", |a| a.fucomp(st0, st2), Gen::X87),
        f("fucompp", |a| a.fucompp(), Gen::X87),
        f("fcom m32", |a| a.fcom(dword_ptr(r15)), Gen::X87),
        f("fcomp m64", |a| a.fcomp(qword_ptr(r15)), Gen::X87),
        f("ficom m16", |a| a.ficom(word_ptr(r15)), Gen::X87),
        f("ficomp m32", |a| a.ficomp(dword_ptr(r15)), Gen::X87),
        f("fcomi st1", |a| a.fcomi(st0, st1), Gen::X87),
        f("fcomip st2", |a| a.fcomip(st0, st2), Gen::X87),
        f("fucomi st1", |a| a.fucomi(st0, st1), Gen::X87),
        f("fucomip st3", |a| a.fucomip(st0, st3), Gen::X87),
        f("ftst", |a| a.ftst(), Gen::X87),
        f("fxam", |a| a.fxam(), Gen::X87),
    ];
    check(forms, CASES, 0x5eed_0103);
}

#[test]
fn diff_x87_control() {
    let forms = vec![
        f("fxch st1", |a| a.fxch(st0, st1), Gen::X87),
        f("fxch st5", |a| a.fxch(st0, st5), Gen::X87),
        f("fninit", |a| a.fninit(), Gen::X87),
        f("finit", |a| a.finit(), Gen::X87),
        f("fnclex", |a| a.fnclex(), Gen::X87),
        f("fclex", |a| a.fclex(), Gen::X87),
        f("fnstsw ax", |a| a.fnstsw(ax), Gen::X87),
        f("fstsw ax", |a| a.fstsw(ax), Gen::X87),
        f("fnstsw m16", |a| a.fnstsw(word_ptr(r15 + 2)), Gen::X87),
        f("fnstcw m16", |a| a.fnstcw(word_ptr(r15)), Gen::X87),
        f("fstcw m16", |a| a.fstcw(word_ptr(r15)), Gen::X87),
        f("fldcw m16", |a| a.fldcw(word_ptr(r15)), Gen::X87),
        f(
            "fldcw; fadd",
            |a| {
                a.fldcw(word_ptr(r15))?;
                a.fadd_2(st0, st1)
            },
            Gen::X87,
        ),
        f("ffree st2", |a| a.ffree(st2), Gen::X87),
        f("ffreep st1", |a| a.ffreep(st1), Gen::X87),
        f("fincstp", |a| a.fincstp(), Gen::X87),
        f("fdecstp", |a| a.fdecstp(), Gen::X87),
        f("fnop", |a| a.fnop(), Gen::X87),
        f("fwait", |a| a.wait(), Gen::X87),
        f("fcmovb", |a| a.fcmovb(st0, st1), Gen::X87),
        f("fcmove", |a| a.fcmove(st0, st2), Gen::X87),
        f("fcmovbe", |a| a.fcmovbe(st0, st3), Gen::X87),
        f("fcmovu", |a| a.fcmovu(st0, st1), Gen::X87),
        f("fcmovnb", |a| a.fcmovnb(st0, st4), Gen::X87),
        f("fcmovne", |a| a.fcmovne(st0, st1), Gen::X87),
        f("fcmovnbe", |a| a.fcmovnbe(st0, st7), Gen::X87),
        f("fcmovnu", |a| a.fcmovnu(st0, st1), Gen::X87),
        f("fnstenv", |a| a.fnstenv(ptr(r15 - 64)), Gen::X87),
        f(
            "fstenv (o16)",
            |a| {
                a.db(&[0x66])?;
                a.fnstenv(ptr(r15 - 64))
            },
            Gen::X87,
        ),
        f("fldenv", |a| a.fldenv(ptr(r15 - 64)), Gen::X87),
        f("fnsave", |a| a.fnsave(ptr(r15 - 128)), Gen::X87),
        f("frstor", |a| a.frstor(ptr(r15 - 128)), Gen::X87),
        f(
            "fnsave; frstor",
            |a| {
                a.fnsave(ptr(r15 - 128))?;
                a.frstor(ptr(r15 - 128))
            },
            Gen::X87,
        ),
        f("paddb mm (x87 state)", |a| a.paddb(mm0, mm1), Gen::X87),
        f("movq mm,r64 (x87 state)", |a| a.movq(mm3, rax), Gen::X87),
        f("movq r64,mm (x87 state)", |a| a.movq(rax, mm6), Gen::X87),
        f("emms (x87 state)", |a| a.emms(), Gen::X87),
    ];
    check(forms, CASES, 0x5eed_0104);
}

/// Which instructions report a pending unmasked x87 exception (#MF): the body first makes
/// one pending (1/0 with ZE often unmasked by the generated FCW), then runs the instruction.
#[test]
fn diff_x87_pending() {
    macro_rules! pending {
        ($name:literal, |$a:ident| $e:expr) => {
            f(
                concat!("pending; ", $name),
                |$a| {
                    $a.fld1()?;
                    $a.fldz()?;
                    $a.fdivp(st1, st0)?;
                    $e
                },
                Gen::X87,
            )
        };
    }
    let forms = vec![
        pending!("fldcw", |a| a.fldcw(word_ptr(r15))),
        pending!("fnstcw", |a| a.fnstcw(word_ptr(r15))),
        pending!("fstcw", |a| a.fstcw(word_ptr(r15))),
        pending!("fnstsw", |a| a.fnstsw(ax)),
        pending!("fnclex", |a| a.fnclex()),
        pending!("fninit", |a| a.fninit()),
        pending!("fnstenv", |a| a.fnstenv(ptr(r15 - 64))).skip_mem(-64 + 12, 12),
        pending!("fldenv", |a| a.fldenv(ptr(r15 - 64))),
        pending!("fnsave", |a| a.fnsave(ptr(r15 - 128))).skip_mem(-128 + 12, 12),
        pending!("frstor", |a| a.frstor(ptr(r15 - 128))),
        pending!("fxsave64", |a| a.fxsave64(ptr(r15 - 256)))
            .skip_mem(-256 + 6, 18)
            .vendor(Vendor::FxImage(-256)),
        pending!("fxrstor64", |a| {
            a.and(dword_ptr(r15 - 232), 0xffff)?;
            a.fxrstor64(ptr(r15 - 256))
        }),
        pending!("fwait", |a| a.wait()),
        pending!("fnop", |a| a.fnop()),
        pending!("ffree", |a| a.ffree(st3)),
        pending!("fxch", |a| a.fxch(st0, st1)),
        pending!("emms", |a| a.emms()),
        pending!("paddb mm", |a| a.paddb(mm0, mm1)),
        pending!("addps", |a| a.addps(xmm0, xmm1)),
    ];
    check(forms, CASES / 10, 0x5eed_0107);
}

#[test]
fn diff_x87_math() {
    let forms = vec![
        f("fprem", |a| a.fprem(), Gen::X87),
        f("fprem1", |a| a.fprem1(), Gen::X87),
        f("fscale", |a| a.fscale(), Gen::X87),
        f(
            "fscale by small",
            |a| {
                a.fld(st1)?;
                a.fmul_2(st0, st0)?;
                a.fscale()
            },
            Gen::X87,
        ),
        f("fxtract", |a| a.fxtract(), Gen::X87),
        f("fsin", |a| a.fsin(), Gen::X87Trig).approx(1e-12),
        f("fcos", |a| a.fcos(), Gen::X87Trig).approx(1e-12),
        f("fsincos", |a| a.fsincos(), Gen::X87Trig).approx(1e-12),
        f("fptan", |a| a.fptan(), Gen::X87Trig).approx(1e-12),
        f("fpatan", |a| a.fpatan(), Gen::X87).approx(1e-14),
        f("f2xm1", |a| a.f2xm1(), Gen::X87Unit).approx(1e-14),
        f("fyl2x", |a| a.fyl2x(), Gen::X87).approx(1e-14),
        f("fyl2xp1", |a| a.fyl2xp1(), Gen::X87Unit)
            .approx(1e-14)
            .domain(|c| {
                // Defined for |x| < 1 - sqrt(2)/2: take |x| < 0.25, zeros, NaNs, bad encodings.
                let se = u16::from_le_bytes([c.st.fx_in[40], c.st.fx_in[41]]) & 0x7fff;
                let m = u64::from_le_bytes(c.st.fx_in[32..40].try_into().unwrap());
                se < 0x3ffd || (se == 0x7fff && m << 1 != 0) || (se == 0x7fff && m >> 63 == 0)
            }),
    ];
    check(forms, CASES, 0x5eed_0105);
}

#[test]
fn diff_fxsave() {
    let forms = vec![
        f("fxsave64", |a| a.fxsave64(ptr(r15 - 256)), Gen::X87).vendor(Vendor::FxImage(-256)),
        f("fxsave", |a| a.fxsave(ptr(r15 - 256)), Gen::X87).vendor(Vendor::FxImage(-256)),
        f(
            "fxsave64 misaligned (#GP)",
            |a| a.fxsave64(ptr(r15 - 248)),
            Gen::X87,
        ),
        f(
            "fxrstor64",
            |a| {
                a.and(dword_ptr(r15 - 232), 0xffff)?;
                a.fxrstor64(ptr(r15 - 256))
            },
            Gen::X87,
        ),
        f(
            "fxrstor",
            |a| {
                a.and(dword_ptr(r15 - 232), 0xffff)?;
                a.fxrstor(ptr(r15 - 256))
            },
            Gen::X87,
        ),
        f(
            "fxrstor64 reserved mxcsr (#GP)",
            |a| {
                a.or(dword_ptr(r15 - 232), 0x40000)?;
                a.fxrstor64(ptr(r15 - 256))
            },
            Gen::X87,
        ),
        f(
            "fxsave64; fxrstor64",
            |a| {
                a.fxsave64(ptr(r15 - 256))?;
                a.fninit()?;
                a.fxrstor64(ptr(r15 - 256))
            },
            Gen::X87,
        )
        .vendor(Vendor::FxImage(-256)),
    ];
    check(forms, CASES / 4, 0x5eed_0106);
}

// ---- availability checks, state layout, string loops -------------------------------------------------

/// A machine with exception handlers that record the vector at `FAULT_ADDR` and stop.
fn fault_machine() -> (Machine, Box<dyn Vcpu>) {
    let e = Emu::new();
    (e.m, e.v)
}

/// Run `body` with CR0/CR4 adjusted; returns the vector of the exception raised, if any.
fn run_with_cr(
    cr0_set: u64,
    cr0_clear: u64,
    cr4_clear: u64,
    fpu: &FpuState,
    body: Body,
) -> Option<u8> {
    let (m, mut v) = fault_machine();
    let code = asm64(CODE, |a| {
        a.mov(r15, DATA + MID).unwrap();
        body(a).unwrap();
        exit(a);
    });
    m.load_long(v.as_mut(), &code, CODE);
    let mut s = Machine::long_sregs();
    s.cr0 = (s.cr0 | cr0_set) & !cr0_clear;
    s.cr4 &= !cr4_clear;
    v.set_sregs(&s).unwrap();
    v.set_fpu(fpu).unwrap();
    m.w32(FAULT_ADDR, 0);
    run_to_exit(v.as_mut(), &m.io);
    let f = m.r32(FAULT_ADDR);
    (f != 0).then_some(f as u8)
}

fn default_fpu() -> FpuState {
    FpuState {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

const CR0_MP: u64 = 1 << 1;
const CR0_EM: u64 = 1 << 2;
const CR0_TS: u64 = 1 << 3;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const UD: u8 = 6;
const NM: u8 = 7;
const MF: u8 = 16;
const XM: u8 = 19;

#[test]
fn cr0_ts_is_device_not_available() {
    let f = default_fpu();
    let ts = |b: Body| run_with_cr(CR0_TS, 0, 0, &f, b);
    assert_eq!(ts(|a| a.addps(xmm0, xmm1)), Some(NM), "SSE");
    assert_eq!(ts(|a| a.paddb(mm0, mm1)), Some(NM), "MMX");
    assert_eq!(ts(|a| a.fld1()), Some(NM), "x87");
    assert_eq!(ts(|a| a.fxsave64(ptr(r15))), Some(NM), "FXSAVE");
    assert_eq!(ts(|a| a.fxrstor64(ptr(r15))), Some(NM), "FXRSTOR");
    assert_eq!(ts(|a| a.ldmxcsr(dword_ptr(r15))), Some(NM), "LDMXCSR");
    assert_eq!(ts(|a| a.fnstsw(ax)), Some(NM), "FNSTSW");
    // FWAIT faults only with MP and TS; MOVNTI and fences are not affected.
    assert_eq!(ts(|a| a.wait()), Some(NM), "FWAIT (MP set by the machine)");
    assert_eq!(
        run_with_cr(CR0_TS, CR0_MP, 0, &f, |a| a.wait()),
        None,
        "FWAIT without MP"
    );
    assert_eq!(
        ts(|a| {
            a.movnti(dword_ptr(r15), eax)?;
            a.mfence()
        }),
        None
    );
    // Without TS everything runs.
    assert_eq!(
        run_with_cr(0, 0, 0, &f, |a| {
            a.addps(xmm0, xmm1)?;
            a.fld1()?;
            a.emms()
        }),
        None
    );
}

#[test]
fn cr0_em_and_cr4_osfxsr() {
    let f = default_fpu();
    let em = |b: Body| run_with_cr(CR0_EM, 0, 0, &f, b);
    assert_eq!(em(|a| a.addps(xmm0, xmm1)), Some(UD), "SSE with EM");
    assert_eq!(em(|a| a.paddb(mm0, mm1)), Some(UD), "MMX with EM");
    assert_eq!(em(|a| a.fld1()), Some(NM), "x87 with EM");
    assert_eq!(em(|a| a.fxsave64(ptr(r15))), Some(NM), "FXSAVE with EM");
    let nofx = |b: Body| run_with_cr(0, 0, CR4_OSFXSR, &f, b);
    assert_eq!(
        nofx(|a| a.addps(xmm0, xmm1)),
        Some(UD),
        "SSE without OSFXSR"
    );
    assert_eq!(
        nofx(|a| a.movdqa(xmm0, xmm1)),
        Some(UD),
        "SSE2 without OSFXSR"
    );
    assert_eq!(
        nofx(|a| a.stmxcsr(dword_ptr(r15))),
        Some(UD),
        "STMXCSR without OSFXSR"
    );
    assert_eq!(
        nofx(|a| a.paddb(mm0, mm1)),
        None,
        "MMX does not need OSFXSR"
    );
    assert_eq!(nofx(|a| a.fld1()), None, "x87 does not need OSFXSR");
    assert_eq!(
        nofx(|a| a.fxsave64(ptr(r15))),
        None,
        "FXSAVE does not need OSFXSR"
    );
}

#[test]
fn unmasked_simd_exception_is_xm_or_ud() {
    let mut f = default_fpu();
    f.mxcsr = 0x1f80 & !(1 << 9); // ZE unmasked
                                  // 1 / 0: #XM with OSXMMEXCPT, #UD without; ZE is recorded either way, xmm0 untouched.
    let body: Body = |a| {
        a.mov(eax, 0x3f80_0000)?;
        a.movd(xmm0, eax)?;
        a.pxor(xmm1, xmm1)?;
        a.divss(xmm0, xmm1)
    };
    assert_eq!(run_with_cr(0, 0, 0, &f, body), Some(XM));
    assert_eq!(run_with_cr(0, 0, CR4_OSXMMEXCPT, &f, body), Some(UD));
    // Masked: the IEEE result, no fault.
    assert_eq!(run_with_cr(0, 0, 0, &default_fpu(), body), None);
}

#[test]
fn pending_x87_exception_is_mf_at_next_instruction() {
    let mut f = default_fpu();
    f.fcw = 0x37f & !4; // ZE unmasked
    let body: Body = |a| {
        a.fld1()?;
        a.fldz()?;
        a.fdivp(st1, st0)?; // 1/0: ZE, ES set, no fault yet
        a.fnstsw(ax)?; // non-waiting: no fault
        a.mov(ebx, 1)?;
        a.fld1() // waiting: #MF
    };
    assert_eq!(run_with_cr(0, 0, 0, &f, body), Some(MF));
    let body2: Body = |a| {
        a.fld1()?;
        a.fldz()?;
        a.fdivp(st1, st0)?;
        a.fnclex()?; // cleared: no fault afterwards
        a.fld1()
    };
    assert_eq!(run_with_cr(0, 0, 0, &f, body2), None);
}

/// FXSAVE64 writes the documented layout; FXRSTOR64 of a modified image loads it.
#[test]
fn fxsave_fxrstor_round_trip() {
    let e = Emu::new();
    let (m, mut v) = (e.m, e.v);
    let mut fpu = FpuState {
        fcw: 0x027f,
        fsw: 0x3800 | 0x20,
        ftwx: 0x81,
        last_opcode: 0x123,
        last_ip: 0x1122_3344_5566,
        last_dp: 0x7788_99aa,
        mxcsr: 0x1fa0,
        ..Default::default()
    };
    for i in 0..8 {
        fpu.fpr[i][..10].copy_from_slice(&[i as u8 + 1; 10]);
    }
    for i in 0..16 {
        fpu.xmm[i] = [0x40 + i as u8; 16];
    }
    let code = asm64(CODE, |a| {
        a.mov(r15, DATA).unwrap();
        a.fxsave64(ptr(r15)).unwrap();
        a.fxsave(ptr(r15 + 512)).unwrap();
        // Change the image and load it back.
        a.mov(word_ptr(r15), 0x37f).unwrap();
        a.mov(dword_ptr(r15 + 24), 0x9f80).unwrap();
        a.mov(byte_ptr(r15 + 160 + 16 * 9), 0x99).unwrap();
        a.fxrstor64(ptr(r15)).unwrap();
        exit(a);
    });
    m.write(DATA, &[0xee; 1024]);
    m.load_long(v.as_mut(), &code, CODE);
    v.set_fpu(&fpu).unwrap();
    run_to_exit(v.as_mut(), &m.io);
    // (The 64-bit image had its FCW, MXCSR and one XMM byte changed by the program.)
    let img = m.read(DATA, 512);
    assert_eq!(&img[2..8], &[0x20, 0x38, 0x81, 0, 0x23, 0x01]);
    assert_eq!(
        u64::from_le_bytes(img[8..16].try_into().unwrap()),
        0x1122_3344_5566
    );
    assert_eq!(
        u64::from_le_bytes(img[16..24].try_into().unwrap()),
        0x7788_99aa
    );
    assert_eq!(u32::from_le_bytes(img[28..32].try_into().unwrap()), 0xffff);
    for i in 0..8 {
        assert_eq!(&img[32 + 16 * i..42 + 16 * i], &[i as u8 + 1; 10]);
        assert_eq!(&img[42 + 16 * i..48 + 16 * i], &[0; 6]);
    }
    assert_eq!(&img[160 + 16 * 15..176 + 16 * 15], &[0x4f; 16]);
    assert_eq!(
        &img[416..512],
        &[0xee; 96][..],
        "bytes 416-511 are not written"
    );
    // The 32-bit form stores 32-bit pointers (FCS/FDS zero).
    let img32 = m.read(DATA + 512, 512);
    assert_eq!(&img32[0..8], &[0x7f, 0x02, 0x20, 0x38, 0x81, 0, 0x23, 0x01]);
    assert_eq!(
        u32::from_le_bytes(img32[24..28].try_into().unwrap()),
        0x1fa0
    );
    assert_eq!(
        u32::from_le_bytes(img32[8..12].try_into().unwrap()),
        0x3344_5566
    );
    assert_eq!(&img32[12..16], &[0; 4]);
    let after = v.fpu().unwrap();
    assert_eq!(after.fcw, 0x37f);
    assert_eq!(after.mxcsr, 0x9f80);
    assert_eq!(after.xmm[9][0], 0x99);
    assert_eq!(after.fpr, fpu.fpr);
}

/// An SSE2 strlen in the style of glibc's (aligned 16-byte loads, PCMPEQB, PMOVMSKB, BSF)
/// and a MOVDQU/MOVDQA memcpy loop, run in the emulator.
#[test]
fn sse2_string_loops() {
    let e = Emu::new();
    let (m, mut v) = (e.m, e.v);
    let src = DATA + 0x1003; // misaligned on purpose
    let dst = DATA + 0x3000;
    let text: Vec<u8> = (0..1000u32).map(|i| b'a' + (i % 26) as u8).collect();
    m.write(src, &text);
    m.write(src + text.len() as u64, &[0]);
    let code = asm64(CODE, |a| {
        let mut l_loop = a.create_label();
        let mut l_found = a.create_label();
        let mut l_copy = a.create_label();
        let mut l_tail = a.create_label();
        let mut l_done = a.create_label();
        // strlen(rdi) -> rax
        a.mov(rdi, src).unwrap();
        a.pxor(xmm0, xmm0).unwrap();
        a.mov(rax, rdi).unwrap();
        a.and(rax, -16).unwrap();
        a.mov(ecx, edi).unwrap();
        a.and(ecx, 15).unwrap();
        a.movdqa(xmm1, xmmword_ptr(rax)).unwrap();
        a.pcmpeqb(xmm1, xmm0).unwrap();
        a.pmovmskb(edx, xmm1).unwrap();
        a.shr(edx, cl).unwrap();
        a.test(edx, edx).unwrap();
        a.jz(l_loop).unwrap();
        a.bsf(eax, edx).unwrap();
        a.jmp(l_done).unwrap();
        a.set_label(&mut l_loop).unwrap();
        a.add(rax, 16).unwrap();
        a.movdqa(xmm1, xmmword_ptr(rax)).unwrap();
        a.pcmpeqb(xmm1, xmm0).unwrap();
        a.pmovmskb(edx, xmm1).unwrap();
        a.test(edx, edx).unwrap();
        a.jz(l_loop).unwrap();
        a.set_label(&mut l_found).unwrap();
        a.bsf(edx, edx).unwrap();
        a.add(rax, rdx).unwrap();
        a.sub(rax, rdi).unwrap();
        a.set_label(&mut l_done).unwrap();
        // memcpy(dst, src, rax) with 16-byte unaligned loads and aligned stores.
        a.mov(rbx, rax).unwrap();
        a.mov(rsi, src).unwrap();
        a.mov(rdi, dst).unwrap();
        a.mov(rcx, rax).unwrap();
        a.shr(rcx, 4).unwrap();
        a.set_label(&mut l_copy).unwrap();
        a.test(rcx, rcx).unwrap();
        a.jz(l_tail).unwrap();
        a.movdqu(xmm2, xmmword_ptr(rsi)).unwrap();
        a.movdqa(xmmword_ptr(rdi), xmm2).unwrap();
        a.add(rsi, 16).unwrap();
        a.add(rdi, 16).unwrap();
        a.dec(rcx).unwrap();
        a.jmp(l_copy).unwrap();
        a.set_label(&mut l_tail).unwrap();
        a.mov(rcx, rbx).unwrap();
        a.and(rcx, 15).unwrap();
        a.rep().movsb().unwrap();
        exit(a);
    });
    m.load_long(v.as_mut(), &code, CODE);
    v.set_fpu(&default_fpu()).unwrap();
    run_to_exit(v.as_mut(), &m.io);
    let r = v.regs().unwrap();
    assert_eq!(r.rbx, text.len() as u64, "strlen");
    assert_eq!(m.read(dst, text.len()), text, "memcpy");
}

/// Throughput of FP/SIMD loops and of FXSAVE64/FXRSTOR64 in the emulator. Prints MIPS; run
/// with `cargo test --release -p vireo-hv --test emu_diff_fpu -- --ignored --nocapture`.
#[test]
#[ignore]
fn fpu_throughput() {
    fn mips(name: &str, iters: u32, per_iter: u64, body: fn(&mut CodeAssembler)) {
        let e = Emu::new();
        let (m, mut v) = (e.m, e.v);
        let code = asm64(CODE, |a| {
            a.mov(ecx, iters).unwrap();
            a.mov(r15, DATA).unwrap();
            body(a);
            exit(a);
        });
        m.load_long(v.as_mut(), &code, CODE);
        let mut f = default_fpu();
        f.mxcsr = 0x1fa0;
        v.set_fpu(&f).unwrap();
        let start = std::time::Instant::now();
        run_to_exit(v.as_mut(), &m.io);
        let s = start.elapsed().as_secs_f64();
        println!(
            "{name}: {:.1} MIPS",
            (iters as u64 * per_iter) as f64 / s / 1e6
        );
    }
    mips("addsd/mulsd/divsd loop", 5_000_000, 5, |a| {
        let mut l = a.create_label();
        a.mov(rax, 0x3ff8_0000_0000_0000u64).unwrap();
        a.movq(xmm1, rax).unwrap();
        a.movq(xmm0, rax).unwrap();
        a.set_label(&mut l).unwrap();
        a.addsd(xmm0, xmm1).unwrap();
        a.mulsd(xmm0, xmm1).unwrap();
        a.divsd(xmm0, xmm1).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(l).unwrap();
    });
    mips("movdqa/pcmpeqb/pmovmskb loop", 5_000_000, 5, |a| {
        let mut l = a.create_label();
        a.pxor(xmm0, xmm0).unwrap();
        a.set_label(&mut l).unwrap();
        a.movdqa(xmm1, xmmword_ptr(r15)).unwrap();
        a.pcmpeqb(xmm1, xmm0).unwrap();
        a.pmovmskb(edx, xmm1).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(l).unwrap();
    });
    mips("x87 fadd/fmul loop", 5_000_000, 4, |a| {
        let mut l = a.create_label();
        a.fld1().unwrap();
        a.fld1().unwrap();
        a.set_label(&mut l).unwrap();
        a.fadd_2(st0, st1).unwrap();
        a.fmul_2(st0, st1).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(l).unwrap();
    });
    mips("fxsave64/fxrstor64 loop", 1_000_000, 4, |a| {
        let mut l = a.create_label();
        a.set_label(&mut l).unwrap();
        a.fxsave64(ptr(r15)).unwrap();
        a.fxrstor64(ptr(r15)).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(l).unwrap();
    });
}

/// Extensions CPUID does not advertise (SSE3 and later, AVX) stay #UD.
#[test]
fn newer_extensions_are_undefined() {
    let f = default_fpu();
    let ud = |b: Body| run_with_cr(0, 0, 0, &f, b);
    assert_eq!(ud(|a| a.haddps(xmm0, xmm1)), Some(UD), "SSE3 HADDPS");
    assert_eq!(ud(|a| a.lddqu(xmm0, ptr(r15))), Some(UD), "SSE3 LDDQU");
    assert_eq!(ud(|a| a.pshufb(xmm0, xmm1)), Some(UD), "SSSE3 PSHUFB");
    assert_eq!(ud(|a| a.ptest(xmm0, xmm1)), Some(UD), "SSE4.1 PTEST");
    assert_eq!(ud(|a| a.vaddps(xmm0, xmm1, xmm2)), Some(UD), "AVX VADDPS");
    assert_eq!(ud(|a| a.femms()), Some(UD), "3DNow! FEMMS");
}

/// 32-bit code (compatibility mode): FXSAVE stores XMM0-7 only; SSE and x87 memory operands
/// go through the segments.
#[test]
fn compatibility_mode_fxsave_and_sse() {
    let e = Emu::new();
    let (m, mut v) = (e.m, e.v);
    let code = asm(32, CODE, |a| {
        a.mov(ebx, DATA as u32).unwrap();
        a.fxsave(ptr(ebx)).unwrap();
        a.movaps(xmm1, xmmword_ptr(ebx + 0x400)).unwrap();
        a.addps(xmm1, xmm1).unwrap();
        a.movups(xmmword_ptr(ebx + 0x411), xmm1).unwrap();
        a.fld1().unwrap();
        a.fadd_2(st0, st0).unwrap();
        a.fstp(dword_ptr(ebx + 0x430)).unwrap();
        a.out(EXIT_PORT as i32, al).unwrap();
        a.hlt().unwrap();
    });
    m.load_long(v.as_mut(), &code, CODE);
    let mut s = Machine::long_sregs();
    s.cs = vireo_hv::Segment {
        selector: KERNEL32_CS,
        l: false,
        db: true,
        ..s.cs
    };
    v.set_sregs(&s).unwrap();
    let mut f = default_fpu();
    for i in 0..16 {
        f.xmm[i] = [i as u8 + 1; 16];
    }
    v.set_fpu(&f).unwrap();
    m.write(DATA, &[0xee; 0x400]);
    let ones: Vec<u8> = (0..4).flat_map(|_| 1.0f32.to_le_bytes()).collect();
    m.write(DATA + 0x400, &ones);
    run_to_exit(v.as_mut(), &m.io);
    let img = m.read(DATA, 512);
    for i in 0..8 {
        assert_eq!(&img[160 + 16 * i..176 + 16 * i], &[i as u8 + 1; 16]);
    }
    assert_eq!(
        &img[288..512],
        &[0xee; 224][..],
        "XMM8-15 are not saved outside 64-bit mode"
    );
    let twos: Vec<u8> = (0..4).flat_map(|_| 2.0f32.to_le_bytes()).collect();
    assert_eq!(m.read(DATA + 0x411, 16), twos);
    assert_eq!(m.read(DATA + 0x430, 4), 2.0f32.to_le_bytes());
}
