//! Runs the probe guests under QEMU TCG (`-M q35`), through their PVH entry (QEMU `-kernel`
//! starts a PVH ELF only if the note is right) and, with a small shim that plays the part of
//! vireo's 64-bit boot, through their 64-bit entry. Skipped when `qemu-system-x86_64` is missing.

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vireo_guests::probe::{build_for, user_mode_expected, Platform, Probe, HELLO_LINE};

const QEMU: &str = "qemu-system-x86_64";
/// Generous: a probe run takes well under a second of TCG time, but CI machines are slow.
const TIMEOUT: Duration = Duration::from_secs(60);

fn qemu_missing() -> bool {
    let found = Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIP: {QEMU} not found (apt-get install qemu-system-x86)"
        );
    }
    !found
}

struct Run {
    output: String,
    /// `Some` if QEMU ended by itself (guest power-off or, with `-no-reboot`, reset).
    exited: Option<ExitStatus>,
}

/// Boots `image` with `-kernel`; returns once QEMU exits, or `done(output)` has held for a
/// grace period (then QEMU is killed), or on timeout.
fn run(name: &str, image: &[u8], smp: u32, done: impl Fn(&str) -> bool) -> Run {
    let path = std::env::temp_dir().join(format!("vireo-probe-{}-{name}.elf", std::process::id()));
    std::fs::write(&path, image).unwrap();
    let mut child = Command::new(QEMU)
        .args([
            "-M",
            "q35",
            "-accel",
            "tcg",
            "-nographic",
            "-no-reboot",
            "-m",
            "64",
            "-smp",
        ])
        .arg(smp.to_string())
        .arg("-kernel")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let buffer = Arc::new(Mutex::new(Vec::new()));
    let mut stdout = child.stdout.take().unwrap();
    let sink = Arc::clone(&buffer);
    let reader = std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut chunk) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    let start = Instant::now();
    let mut done_since: Option<Instant> = None;
    let exited = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        let text = String::from_utf8_lossy(&buffer.lock().unwrap()).into_owned();
        if done(&text) {
            let since = *done_since.get_or_insert_with(Instant::now);
            // Give the probe time to power off by itself.
            if since.elapsed() > Duration::from_secs(3) {
                break None;
            }
        }
        if start.elapsed() > TIMEOUT {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if exited.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = reader.join();
    let _ = std::fs::remove_file(&path);
    let output = String::from_utf8_lossy(&buffer.lock().unwrap()).into_owned();
    Run { output, exited }
}

/// The output lines starting at the first occurrence of `token` (firmware output precedes it,
/// without a line break).
fn lines_from<'a>(output: &'a str, token: &str) -> Vec<&'a str> {
    match output.find(token) {
        Some(at) => output[at..].lines().collect(),
        None => Vec::new(),
    }
}

fn assert_powered_off(run: &Run) {
    let status = run
        .exited
        .unwrap_or_else(|| panic!("QEMU did not exit; output:\n{}", run.output));
    assert!(
        status.success(),
        "QEMU exit {status:?}; output:\n{}",
        run.output
    );
    assert!(
        !run.output.contains("vireo-probe: exception"),
        "{}",
        run.output
    );
}

fn q35(probe: Probe) -> Vec<u8> {
    build_for(&probe, Platform::QemuQ35)
}

#[test]
fn hello_prints_and_powers_off() {
    if qemu_missing() {
        return;
    }
    let run = run("hello", &q35(Probe::Hello), 1, |o| o.contains(HELLO_LINE));
    assert!(run.output.contains(HELLO_LINE), "{}", run.output);
    assert_powered_off(&run);
}

#[test]
fn first_byte_comes_first() {
    if qemu_missing() {
        return;
    }
    let run = run("first", &q35(Probe::FirstByte), 1, |o| {
        o.contains(HELLO_LINE)
    });
    assert!(
        run.output.contains(&format!("!{HELLO_LINE}")),
        "{}",
        run.output
    );
    assert_powered_off(&run);
}

#[test]
fn power_off_probe() {
    if qemu_missing() {
        return;
    }
    let run = run("poweroff", &q35(Probe::PowerOff), 1, |o| {
        o.contains("poweroff\n")
    });
    assert!(run.output.contains("poweroff\n"), "{}", run.output);
    assert_powered_off(&run);
}

#[test]
fn unknown_io_reads_all_ones_from_ports() {
    if qemu_missing() {
        return;
    }
    let run = run("unknown-io", &q35(Probe::UnknownIo), 1, |o| {
        o.contains("mmio32=")
    });
    let lines = lines_from(&run.output, "unknown-io: ");
    let line = lines
        .first()
        .unwrap_or_else(|| panic!("no line in:\n{}", run.output));
    // QEMU, like vireo, returns all-ones for unclaimed ports; unassigned MMIO reads differ
    // between machines (QEMU q35 gives zeros), so only its format is checked.
    let prefix = "unknown-io: pio8=ff pio16=ffff pio32=ffffffff mmio32=";
    assert!(line.starts_with(prefix), "{line}");
    let mmio = &line[prefix.len()..];
    assert!(
        mmio.len() == 8 && mmio.chars().all(|c| c.is_ascii_hexdigit()),
        "{line}"
    );
    assert_powered_off(&run);
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[test]
fn civil_date_conversion() {
    assert_eq!(days_from_civil(1970, 1, 1), 0);
    assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    assert_eq!(days_from_civil(2026, 11, 29), 20_786);
}

#[test]
fn cmos_time_matches_host_utc() {
    if qemu_missing() {
        return;
    }
    let run = run("cmos", &q35(Probe::CmosTime), 1, |o| {
        o.contains("rtc: ") && o.ends_with('\n')
    });
    let lines = lines_from(&run.output, "rtc: ");
    let line = lines
        .first()
        .unwrap_or_else(|| panic!("no line in:\n{}", run.output));
    // rtc: YYYY-MM-DD HH:MM:SS
    let t = line.strip_prefix("rtc: ").unwrap();
    assert_eq!(t.len(), 19, "{line}");
    let num = |r: std::ops::Range<usize>| t[r].parse::<i64>().unwrap_or_else(|_| panic!("{line}"));
    let (y, mo, d, h, mi, s) = (
        num(0..4),
        num(5..7),
        num(8..10),
        num(11..13),
        num(14..16),
        num(17..19),
    );
    assert_eq!(
        (&t[4..5], &t[7..8], &t[10..11], &t[13..14], &t[16..17]),
        ("-", "-", " ", ":", ":")
    );
    let guest = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + s;
    let host = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((guest - host).abs() < 300, "guest {line} vs host {host}");
    assert_powered_off(&run);
}

/// Checks the SMP probe's lines for `cpus` CPUs.
fn check_smp(output: &str, cpus: usize) {
    let lines = lines_from(output, "cpu ");
    let bsp = lines
        .first()
        .unwrap_or_else(|| panic!("no cpu line in:\n{output}"));
    let bsp_id: u32 = bsp
        .strip_prefix("cpu ")
        .and_then(|r| r.strip_suffix(" bsp"))
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("bad BSP line {bsp:?}"));
    let mut ids = vec![bsp_id];
    let mut total = None;
    for line in &lines[1..] {
        if let Some(n) = line.strip_prefix("cpus ") {
            total = Some(n.parse::<usize>().unwrap());
            break;
        }
        let f: Vec<&str> = line.split(' ').collect();
        assert!(
            f.len() == 3 && f[0] == "cpu",
            "bad AP line {line:?} in:\n{output}"
        );
        let (cpuid, lapic): (u32, u32) = (f[1].parse().unwrap(), f[2].parse().unwrap());
        assert_eq!(cpuid, lapic, "initial APIC ID and LAPIC ID differ: {line}");
        ids.push(cpuid);
    }
    assert_eq!(total, Some(cpus), "{output}");
    let mut unique = ids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), cpus, "APIC IDs {ids:?}");
}

#[test]
fn smp_starts_all_four_cpus() {
    if qemu_missing() {
        return;
    }
    let run = run("smp", &q35(Probe::Smp), 4, |o| o.contains("cpus "));
    check_smp(&run.output, 4);
    assert_powered_off(&run);
}

#[test]
fn user_mode_runs_in_ring_3_and_comes_back() {
    if qemu_missing() {
        return;
    }
    let n = 100_000;
    let run = run("user", &q35(Probe::UserMode { n }), 1, |o| {
        o.contains("back in ring 0")
    });
    let lines = lines_from(&run.output, "user: ");
    assert_eq!(
        lines.first().copied(),
        Some(format!("user: cpl=3 result={:016x}", user_mode_expected(n)).as_str())
    );
    assert_eq!(
        lines.get(1).copied(),
        Some("user: back in ring 0"),
        "{}",
        run.output
    );
    assert_powered_off(&run);
}

#[test]
fn i8042_reset_ends_qemu() {
    if qemu_missing() {
        return;
    }
    let run = run("i8042", &q35(Probe::I8042Reset), 1, |o| {
        o.contains("still-running")
    });
    assert!(run.output.contains("i8042-reset\n"), "{}", run.output);
    assert!(!run.output.contains("still-running"), "{}", run.output);
    assert!(run.exited.is_some(), "-no-reboot: a reset ends QEMU");
}

#[test]
fn acpi_reset_ends_qemu() {
    if qemu_missing() {
        return;
    }
    let run = run("acpi-reset", &q35(Probe::AcpiReset), 1, |o| {
        o.contains("still-running")
    });
    assert!(run.output.contains("acpi-reset\n"), "{}", run.output);
    assert!(!run.output.contains("still-running"), "{}", run.output);
    assert!(run.exited.is_some(), "-no-reboot: a reset ends QEMU");
}

#[test]
fn io_loops_print_start_and_end() {
    if qemu_missing() {
        return;
    }
    for (name, probe) in [
        (
            "pio",
            Probe::PioLoop {
                n: 1000,
                port: 0x80,
            },
        ),
        (
            "pio-read",
            Probe::PioReadLoop {
                n: 1000,
                port: 0x1234,
            },
        ),
        (
            "mmio",
            Probe::MmioLoop {
                n: 1000,
                addr: 0xd000_0000,
            },
        ),
        (
            "mmio-read",
            Probe::MmioReadLoop {
                n: 1000,
                addr: 0xd000_0000,
            },
        ),
    ] {
        let run = run(name, &q35(probe), 1, |o| o.contains("E\n"));
        assert_eq!(
            lines_from(&run.output, "S\n")[..2],
            ["S", "E"],
            "{name}: {}",
            run.output
        );
        assert_powered_off(&run);
    }
}

#[test]
fn exceptions_are_reported() {
    if qemu_missing() {
        return;
    }
    // A write far above the 4 GiB identity map: page fault (14), write to a not-present page.
    let run = run(
        "fault",
        &q35(Probe::MmioLoop {
            n: 1,
            addr: 1 << 40,
        }),
        1,
        |o| o.contains("rip="),
    );
    let lines = lines_from(&run.output, "vireo-probe: exception");
    let line = lines
        .first()
        .unwrap_or_else(|| panic!("no report in:\n{}", run.output));
    assert!(
        line.starts_with("vireo-probe: exception 14 error=00000002 rip=0000000000"),
        "{line}"
    );
    assert!(
        run.exited.is_some_and(|s| s.success()),
        "powered off after the report"
    );
}

// --- The 64-bit entry, behind a shim that boots like vireo ---------------------------------

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

const SHIM: u64 = 0x10_0000;
const SHIM64: u64 = SHIM + 0x200;

/// 32-bit PVH code that sets up what vireo's 64-bit boot gives a guest: a GDT at 0x500 with the
/// Linux boot CS 0x10, page tables at 0x9000 identity-mapping 1 GiB, CR4.PAE|PGE, long mode,
/// RSI = 0x7000; then it jumps to the probe's `e_entry`.
fn shim(entry: u64) -> Vec<u8> {
    use iced_x86::code_asm::*;
    let mut a = CodeAssembler::new(32).unwrap();
    a.cli().unwrap();
    a.cld().unwrap();
    a.mov(edi, 0x9000u32).unwrap();
    a.xor(eax, eax).unwrap();
    a.mov(ecx, 3 * 1024u32).unwrap();
    a.rep().stosd().unwrap();
    a.mov(dword_ptr(0x9000u32), 0xa003u32).unwrap();
    a.mov(dword_ptr(0xa000u32), 0xb003u32).unwrap();
    a.mov(edi, 0xb000u32).unwrap();
    a.mov(eax, 0x83u32).unwrap();
    a.mov(ecx, 512u32).unwrap();
    let mut pd = a.create_label();
    a.set_label(&mut pd).unwrap();
    a.mov(dword_ptr(edi), eax).unwrap();
    a.add(eax, 0x20_0000).unwrap();
    a.add(edi, 8).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(pd).unwrap();
    let gdt: [u64; 4] = [0, 0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
    for (i, d) in gdt.iter().enumerate() {
        a.mov(dword_ptr(0x500u32 + 8 * i as u32), *d as u32)
            .unwrap();
        a.mov(dword_ptr(0x504u32 + 8 * i as u32), (*d >> 32) as u32)
            .unwrap();
    }
    a.mov(word_ptr(0x520u32), 0x1fu32).unwrap();
    a.mov(dword_ptr(0x522u32), 0x500u32).unwrap();
    a.lgdt(ptr(0x520u32)).unwrap();
    a.mov(eax, 0xa0u32).unwrap(); // PAE | PGE
    a.mov(cr4, eax).unwrap();
    a.mov(eax, 0x9000u32).unwrap();
    a.mov(cr3, eax).unwrap();
    a.mov(ecx, 0xc000_0080u32).unwrap();
    a.rdmsr().unwrap();
    a.or(eax, 0x100).unwrap();
    a.wrmsr().unwrap();
    a.mov(eax, 0x8000_0011u32).unwrap();
    a.mov(cr0, eax).unwrap();
    a.jmp_far(0x10, SHIM64 as u32).unwrap();
    let mut code = a.assemble(SHIM).unwrap();
    assert!(code.len() as u64 <= SHIM64 - SHIM);
    code.resize((SHIM64 - SHIM) as usize, 0xcc);

    let mut b = CodeAssembler::new(64).unwrap();
    b.mov(eax, 0x18u32).unwrap();
    b.mov(ds, ax).unwrap();
    b.mov(es, ax).unwrap();
    b.mov(ss, ax).unwrap();
    b.mov(esi, 0x7000u32).unwrap();
    b.mov(rax, entry).unwrap();
    b.jmp(rax).unwrap();
    code.extend(b.assemble(SHIM64).unwrap());
    code
}

/// Wraps a probe ELF: its PT_LOAD unchanged, plus a PT_LOAD with the shim and a PVH note that
/// points at the shim.
fn with_64bit_entry_shim(probe: &[u8]) -> Vec<u8> {
    let entry = u64_at(probe, 0x18);
    let phoff = u64_at(probe, 0x20) as usize;
    assert_eq!(u16_at(probe, 0x38), 2);
    assert_eq!(
        u64_at(probe, phoff + 8),
        0,
        "probe PT_LOAD starts at file offset 0"
    );
    let (paddr, filesz, memsz) = (
        u64_at(probe, phoff + 24),
        u64_at(probe, phoff + 32),
        u64_at(probe, phoff + 40),
    );
    let shim = shim(entry);

    let mut out = Vec::new();
    out.extend_from_slice(&probe[..0x18]); // ident, type, machine, version
    out.extend_from_slice(&entry.to_le_bytes());
    out.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    out.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    out.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for v in [64u16, 56, 3, 64, 0, 0] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    let phdr =
        |out: &mut Vec<u8>, ty: u32, off: u64, addr: u64, filesz: u64, memsz: u64, align: u64| {
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&7u32.to_le_bytes());
            for v in [off, addr, addr, filesz, memsz, align] {
                out.extend_from_slice(&v.to_le_bytes());
            }
        };
    let note_off = 64 + 3 * 56;
    phdr(
        &mut out,
        1,
        0x1000,
        SHIM,
        shim.len() as u64,
        shim.len() as u64,
        0x1000,
    );
    phdr(&mut out, 1, 0x2000, paddr, filesz, memsz, 0x1000);
    phdr(&mut out, 4, note_off as u64, 0, 20, 20, 4);
    for v in [4u32, 4, 18] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(b"Xen\0");
    out.extend_from_slice(&(SHIM as u32).to_le_bytes());
    out.resize(0x1000, 0);
    out.extend_from_slice(&shim);
    out.resize(0x2000, 0);
    out.extend_from_slice(probe);
    out
}

#[test]
fn hello_through_the_64_bit_entry() {
    if qemu_missing() {
        return;
    }
    let image = with_64bit_entry_shim(&q35(Probe::FirstByte));
    let run = run("shim-hello", &image, 1, |o| o.contains(HELLO_LINE));
    assert!(
        run.output.contains(&format!("!{HELLO_LINE}")),
        "{}",
        run.output
    );
    assert_powered_off(&run);
}

#[test]
fn smp_and_user_mode_through_the_64_bit_entry() {
    if qemu_missing() {
        return;
    }
    let run1 = run(
        "shim-smp",
        &with_64bit_entry_shim(&q35(Probe::Smp)),
        2,
        |o| o.contains("cpus "),
    );
    check_smp(&run1.output, 2);
    assert_powered_off(&run1);

    let run2 = run(
        "shim-user",
        &with_64bit_entry_shim(&q35(Probe::UserMode { n: 77 })),
        1,
        |o| o.contains("back in ring 0"),
    );
    let expected = format!(
        "user: cpl=3 result={:016x}\nuser: back in ring 0\n",
        user_mode_expected(77)
    );
    assert!(run2.output.contains(&expected), "{}", run2.output);
    assert_powered_off(&run2);
}
