//! `vtool`: a tiny static helper for the default guest (busybox has no vsock tool). Built by
//! the tests and `bench/net` with
//! `rustc -O -C target-feature=+crt-static --target x86_64-unknown-linux-gnu`, std only, and
//! appended to the guest's initramfs as `/bin/vtool`.
//!
//! ```text
//! vtool vsock-echo PORT [N]        listen on vsock PORT, echo each connection until EOF;
//!                                  exit after N connections (default: never)
//! vtool vsock-send CID PORT BYTES  connect, send BYTES of a pattern while reading the echo,
//!                                  check it; prints "vsock-send ok BYTES SECONDS"
//! vtool vsock-sink PORT            accept one connection, read to EOF; prints
//!                                  "vsock-sink BYTES SECONDS"
//! vtool vsock-source CID PORT BYTES  connect, send BYTES; prints "vsock-source BYTES SECONDS"
//! vtool vsock-connects CID PORT N  N connect/close cycles; prints "vsock-connects N SECONDS"
//! vtool tcp-sink PORT              accept one TCP connection, read to EOF; prints
//!                                  "tcp-sink BYTES SECONDS"
//! vtool tcp-source ADDR:PORT BYTES connect, send BYTES; prints "tcp-source BYTES SECONDS"
//! ```

use std::io::{Read, Write};
use std::os::unix::io::{FromRawFd, RawFd};
use std::time::Instant;

const AF_VSOCK: i32 = 40;
const SOCK_STREAM: i32 = 1;
const VMADDR_CID_ANY: u32 = u32::MAX;

#[repr(C)]
struct SockaddrVm {
    family: u16,
    reserved1: u16,
    port: u32,
    cid: u32,
    flags: u8,
    zero: [u8; 3],
}

extern "C" {
    fn socket(domain: i32, ty: i32, protocol: i32) -> i32;
    fn bind(fd: i32, addr: *const SockaddrVm, len: u32) -> i32;
    fn listen(fd: i32, backlog: i32) -> i32;
    fn accept(fd: i32, addr: *mut SockaddrVm, len: *mut u32) -> i32;
    fn connect(fd: i32, addr: *const SockaddrVm, len: u32) -> i32;
    fn shutdown(fd: i32, how: i32) -> i32;
}

fn die(what: &str) -> ! {
    eprintln!("vtool: {what}: {}", std::io::Error::last_os_error());
    std::process::exit(1)
}

fn addr(cid: u32, port: u32) -> SockaddrVm {
    SockaddrVm {
        family: AF_VSOCK as u16,
        reserved1: 0,
        port,
        cid,
        flags: 0,
        zero: [0; 3],
    }
}

fn vsock_socket() -> RawFd {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { socket(AF_VSOCK, SOCK_STREAM, 0) };
    if fd < 0 {
        die("socket(AF_VSOCK)");
    }
    fd
}

fn vsock_connect(cid: u32, port: u32) -> std::fs::File {
    let fd = vsock_socket();
    let a = addr(cid, port);
    // SAFETY: `a` is a valid sockaddr_vm for the call.
    if unsafe { connect(fd, &a, std::mem::size_of::<SockaddrVm>() as u32) } < 0 {
        die("connect");
    }
    // SAFETY: `fd` is a connected socket this function owns.
    unsafe { std::fs::File::from_raw_fd(fd) }
}

fn vsock_listen(port: u32) -> RawFd {
    let fd = vsock_socket();
    let a = addr(VMADDR_CID_ANY, port);
    // SAFETY: `a` is a valid sockaddr_vm for the call.
    if unsafe { bind(fd, &a, std::mem::size_of::<SockaddrVm>() as u32) } < 0 {
        die("bind");
    }
    // SAFETY: listen(2) on our socket.
    if unsafe { listen(fd, 128) } < 0 {
        die("listen");
    }
    fd
}

fn vsock_accept(fd: RawFd) -> std::fs::File {
    let mut a = addr(0, 0);
    let mut len = std::mem::size_of::<SockaddrVm>() as u32;
    // SAFETY: `a` and `len` are valid for accept(2) to fill.
    let c = unsafe { accept(fd, &mut a, &mut len) };
    if c < 0 {
        die("accept");
    }
    // SAFETY: a new connected socket owned from here on.
    unsafe { std::fs::File::from_raw_fd(c) }
}

fn shut_write(f: &std::fs::File) {
    use std::os::unix::io::AsRawFd;
    // SAFETY: shutdown(2) of our socket's sending side (SHUT_WR).
    unsafe { shutdown(f.as_raw_fd(), 1) };
}

/// The pattern byte at offset `i` of a stream (not periodic in any small power of two).
fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(2654435761) >> 13) as u8 ^ (i % 251) as u8
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize) -> T {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| {
            eprintln!("vtool: bad or missing argument {i}; see the source for usage");
            std::process::exit(2)
        })
}

fn echo(mut c: std::fs::File) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if c.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
}

fn sink(mut c: impl Read) -> u64 {
    let mut buf = vec![0u8; 256 << 10];
    let mut n = 0u64;
    loop {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => return n,
            Ok(k) => n += k as u64,
        }
    }
}

/// Send `bytes` of one prefilled buffer over and over (no per-byte work: a throughput source).
fn source_fast(mut c: impl Write, bytes: u64) {
    let buf: Vec<u8> = (0..256u64 << 10).map(pattern).collect();
    let mut sent = 0u64;
    while sent < bytes {
        let k = (bytes - sent).min(buf.len() as u64) as usize;
        if c.write_all(&buf[..k]).is_err() {
            die("write");
        }
        sent += k as u64;
    }
}

/// Send `bytes` of the pattern stream (checkable by the receiver).
fn source(mut c: impl Write, bytes: u64) {
    let mut buf = vec![0u8; 256 << 10];
    let mut sent = 0u64;
    while sent < bytes {
        let k = (bytes - sent).min(buf.len() as u64) as usize;
        for (j, b) in buf[..k].iter_mut().enumerate() {
            *b = pattern(sent + j as u64);
        }
        if c.write_all(&buf[..k]).is_err() {
            die("write");
        }
        sent += k as u64;
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let cmd = args.get(1).map(String::as_str).unwrap_or("");
    let t = Instant::now();
    match cmd {
        "vsock-echo" => {
            let port: u32 = arg(&args, 2);
            let limit: u64 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(u64::MAX);
            let l = vsock_listen(port);
            println!("vsock-echo listening {port}");
            let mut threads = Vec::new();
            for _ in 0..limit {
                let c = vsock_accept(l);
                threads.push(std::thread::spawn(move || echo(c)));
            }
            for t in threads {
                let _ = t.join();
            }
            println!("vsock-echo done");
        }
        "vsock-send" => {
            let (cid, port, bytes): (u32, u32, u64) = (arg(&args, 2), arg(&args, 3), arg(&args, 4));
            let c = vsock_connect(cid, port);
            let mut r = c.try_clone().unwrap_or_else(|_| die("dup"));
            let reader = std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                let mut at = 0u64;
                loop {
                    match r.read(&mut buf) {
                        Ok(0) | Err(_) => return Ok(at),
                        Ok(n) => {
                            for (j, &b) in buf[..n].iter().enumerate() {
                                if b != pattern(at + j as u64) {
                                    return Err(at + j as u64);
                                }
                            }
                            at += n as u64;
                        }
                    }
                }
            });
            source(&c, bytes);
            shut_write(&c);
            match reader.join() {
                Ok(Ok(n)) if n == bytes => {
                    println!("vsock-send ok {bytes} {:.3}", t.elapsed().as_secs_f64())
                }
                Ok(Ok(n)) => {
                    println!("vsock-send short {n} of {bytes}");
                    std::process::exit(1)
                }
                _ => {
                    println!("vsock-send mismatch");
                    std::process::exit(1)
                }
            }
        }
        "vsock-sink" => {
            let l = vsock_listen(arg(&args, 2));
            println!("vsock-sink listening");
            let c = vsock_accept(l);
            let t = Instant::now();
            let n = sink(c);
            println!("vsock-sink {n} {:.3}", t.elapsed().as_secs_f64());
        }
        "vsock-source" => {
            let (cid, port, bytes): (u32, u32, u64) = (arg(&args, 2), arg(&args, 3), arg(&args, 4));
            let c = vsock_connect(cid, port);
            source_fast(&c, bytes);
            drop(c);
            println!("vsock-source {bytes} {:.3}", t.elapsed().as_secs_f64());
        }
        "vsock-connects" => {
            let (cid, port, n): (u32, u32, u64) = (arg(&args, 2), arg(&args, 3), arg(&args, 4));
            for _ in 0..n {
                let mut c = vsock_connect(cid, port);
                let _ = c.write_all(b"x");
                let mut b = [0u8; 1];
                let _ = c.read(&mut b);
            }
            println!("vsock-connects {n} {:.3}", t.elapsed().as_secs_f64());
        }
        "tcp-sink" => {
            let port: u16 = arg(&args, 2);
            let l = std::net::TcpListener::bind(("0.0.0.0", port)).unwrap_or_else(|_| die("bind"));
            println!("tcp-sink listening");
            let (c, _) = l.accept().unwrap_or_else(|_| die("accept"));
            let t = Instant::now();
            let n = sink(c);
            println!("tcp-sink {n} {:.3}", t.elapsed().as_secs_f64());
        }
        "tcp-source" => {
            let to: String = arg(&args, 2);
            let bytes: u64 = arg(&args, 3);
            let c = std::net::TcpStream::connect(&to).unwrap_or_else(|_| die("connect"));
            source_fast(&c, bytes);
            drop(c);
            println!("tcp-source {bytes} {:.3}", t.elapsed().as_secs_f64());
        }
        _ => {
            eprintln!("vtool: unknown command '{cmd}'; see the source for usage");
            std::process::exit(2)
        }
    }
}
