//! `call_rtt`: round trip of a 1 KiB request and 1 KiB reply, one client, one instance in
//! another process, in spin mode (both sides spin), blocking mode (both sides sleep on
//! futexes at once) and with default settings (the adaptive wait policy), against, in the
//! same run:
//!
//! * a Unix-domain-socket request/reply between two processes (what users compare with);
//! * the physical floors: two processes ping-ponging 1 KiB through shared memory, once
//!   spinning on a sequence word and once sleeping on it with a futex every time. Nothing
//!   can be faster than these on the machine at hand, so the ratios say how close the bus
//!   comes (absolute times drift between machines; ratios hold).
//!
//! `call_rtt/seed_baseline` is the seed's baseline scenario's call path: default settings,
//! three instances, a hundred connections taking turns, one call every 200 µs, so every
//! call finds its instance asleep as at 1,000 calls/s; its p99 is printed against the
//! seed's 5 ms target. Criterion reports the mean; p50/p99 come from an hdrhistogram of
//! every timed call and are printed at the end.
//!
//! `cargo bench --bench call_rtt`

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use aegis_client::CallOptions;
use criterion::{criterion_group, Criterion};
use hdrhistogram::Histogram;

const PAYLOAD: usize = 1024;
const UDS_SERVER_ENV: &str = "AEGIS_BENCH_UDS_SERVER";
/// The floor's partner process: `spin` or `futex`, and the shared memfd's descriptor.
const FLOOR_ENV: &str = "AEGIS_BENCH_FLOOR";
const FLOOR_FD_ENV: &str = "AEGIS_BENCH_FLOOR_FD";
/// The seed's p99 target.
const SEED_P99_NS: u64 = 5_000_000;

static RESULTS: Mutex<Vec<(String, Histogram<u64>)>> = Mutex::new(Vec::new());

fn record(name: &str, h: Histogram<u64>) {
    // A bench left out by a filter (`cargo bench --bench call_rtt -- spin`) recorded nothing.
    if !h.is_empty() {
        RESULTS.lock().unwrap().push((name.to_owned(), h));
    }
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 10_000_000_000, 3).unwrap()
}

fn bench_bus(c: &mut Criterion, name: &str, spin: Option<Duration>) {
    let bus = support::TestBus::start();
    let spin_us = spin.map(|s| s.as_micros().to_string());
    let args: Vec<&str> = spin_us.iter().flat_map(|s| ["--spin-us", s]).collect();
    let _inst = bus.serve("rtt", "rtt-1", &args);
    let client = bus.connect();
    let opts = CallOptions {
        spin: Some(spin.map_or(aegis_client::Spin::Adaptive, aegis_client::Spin::Fixed)),
        ..CallOptions::timeout(Duration::from_secs(5))
    };
    let payload = vec![0x5au8; PAYLOAD];
    let mut out = Vec::with_capacity(PAYLOAD);
    for _ in 0..1000 {
        client
            .call_into("rtt", "echo", &payload, &opts, &mut out)
            .unwrap();
    }
    let h = timed(c, name, &mut || {
        client
            .call_into("rtt", "echo", &payload, &opts, &mut out)
            .unwrap();
    });
    assert_eq!(out, payload);
    record(name, h);
    drop(client);
}

/// An async call (`call_async`, one at a time on a current-thread tokio runtime) against
/// the default instance: the future never spins, so a reply not there at the first poll
/// is awaited through the connection's doorbell thread, which sleeps on the mailbox's
/// answer word, then wakes the future (two thread wake-ups in the caller's process on top
/// of the instance's).
fn async_mode(c: &mut Criterion) {
    let bus = support::TestBus::start();
    let _inst = bus.serve("rtt", "rtt-1", &[]);
    let client = bus.connect();
    let opts = CallOptions::timeout(Duration::from_secs(5));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let payload = vec![0x5au8; PAYLOAD];
    let mut call = || {
        let r = rt
            .block_on(client.call_async("rtt", "echo", &payload, &opts))
            .unwrap();
        assert_eq!(r.payload.len(), PAYLOAD);
    };
    for _ in 0..1000 {
        call();
    }
    let name = "call_rtt/aegis_async";
    let h = timed(c, name, &mut call);
    record(name, h);
}

fn spin_mode(c: &mut Criterion) {
    // A spin budget longer than any gap between calls: neither side ever sleeps.
    bench_bus(c, "call_rtt/aegis_spin", Some(Duration::from_secs(10)));
}

fn blocking_mode(c: &mut Criterion) {
    bench_bus(c, "call_rtt/aegis_blocking", Some(Duration::ZERO));
}

fn default_mode(c: &mut Criterion) {
    bench_bus(c, "call_rtt/aegis_default", None);
}

/// The same call through the C ABI (`aegis_call` into a caller buffer, default options) as
/// a C program makes it, interleaved call by call with the Rust call on the same instance
/// (so both see the same core placement): the cost of the FFI layer.
fn c_abi_default(c: &mut Criterion) {
    use aegis_ipc_ffi::{aegis_bus, aegis_bus_free, aegis_call, aegis_connect, aegis_status};
    let bus = support::TestBus::start();
    let _inst = bus.serve("rtt", "rtt-1", &[]);
    let client = bus.connect();
    let opts = CallOptions::timeout(Duration::from_secs(5));
    let dir = std::ffi::CString::new(bus.path().to_str().unwrap()).unwrap();
    let mut handle: *mut aegis_bus = std::ptr::null_mut();
    // SAFETY: a valid NUL-terminated path and an out pointer, per the header.
    let connected = unsafe { aegis_connect(dir.as_ptr(), &mut handle) };
    assert_eq!(connected, aegis_status::AEGIS_OK);
    let payload = vec![0x5au8; PAYLOAD];
    let (mut reply, mut out) = (vec![0u8; PAYLOAD], Vec::with_capacity(PAYLOAD));
    let mut len = 0usize;
    let mut c_call = || {
        // SAFETY: the handle is live; the buffers are as long as the lengths passed.
        let s = unsafe {
            aegis_call(
                handle,
                c"rtt".as_ptr(),
                c"echo".as_ptr(),
                payload.as_ptr(),
                payload.len(),
                std::ptr::null(),
                reply.as_mut_ptr(),
                reply.len(),
                &mut len,
            )
        };
        assert_eq!(s, aegis_status::AEGIS_OK);
    };
    let mut rust_call = || {
        client
            .call_into("rtt", "echo", &payload, &opts, &mut out)
            .unwrap();
    };
    for _ in 0..1000 {
        c_call();
        rust_call();
    }
    let (mut hc, mut hr) = (hist(), hist());
    c.bench_function("call_rtt/c_abi_and_rust_interleaved", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                let t = Instant::now();
                c_call();
                let m = Instant::now();
                rust_call();
                let _ = hc.record((m - t).as_nanos() as u64);
                let _ = hr.record(m.elapsed().as_nanos() as u64);
            }
            start.elapsed()
        })
    });
    record("call_rtt/c_abi_interleaved", hc);
    record("call_rtt/rust_interleaved", hr);
    // SAFETY: the handle from aegis_connect, freed once.
    unsafe { aegis_bus_free(handle) };
}

fn seed_baseline(c: &mut Criterion) {
    let bus = support::TestBus::start();
    let _inst: Vec<_> = (0..3)
        .map(|i| bus.serve("base", &format!("base-{i}"), &[]))
        .collect();
    let clients: Vec<_> = (0..100).map(|_| bus.connect()).collect();
    let opts = CallOptions::timeout(Duration::from_secs(5));
    let payload = vec![0x5au8; PAYLOAD];
    let mut out = Vec::with_capacity(PAYLOAD);
    for cl in &clients {
        cl.call_into("base", "echo", &payload, &opts, &mut out)
            .unwrap();
    }
    let mut h = hist();
    let mut k = 0usize;
    c.bench_function("call_rtt/seed_baseline", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                // The pause between calls is the scenario's (not timed).
                std::thread::sleep(Duration::from_micros(200));
                k = (k + 1) % clients.len();
                let t = Instant::now();
                clients[k]
                    .call_into("base", "echo", &payload, &opts, &mut out)
                    .unwrap();
                let d = t.elapsed();
                let _ = h.record(d.as_nanos() as u64);
                total += d;
            }
            total
        })
    });
    assert_eq!(out, payload);
    record("call_rtt/seed_baseline", h);
}

/// The floor's shared memory: two sequence words on their own lines, then the request and
/// the reply.
const FLOOR_PING: usize = 0;
const FLOOR_PONG: usize = 64;
const FLOOR_REQ: usize = 128;
const FLOOR_REP: usize = FLOOR_REQ + PAYLOAD;
const FLOOR_SIZE: usize = 4096;

struct FloorMap(*mut u8);

impl FloorMap {
    fn map(fd: i32) -> FloorMap {
        FloorMap::map_len(fd, FLOOR_SIZE)
    }
    fn map_len(fd: i32, len: usize) -> FloorMap {
        // SAFETY: maps `len` bytes of a memfd at least that long, shared.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap of the floor's memfd");
        FloorMap(p.cast())
    }
    fn word(&self, off: usize) -> &std::sync::atomic::AtomicU32 {
        // SAFETY: `off` is 4-aligned inside the mapping, which lives as long as `self`.
        unsafe { &*(self.0.add(off) as *const std::sync::atomic::AtomicU32) }
    }
    /// Copies `src` into the mapping at `off` (the side that owns that area right now).
    fn put(&self, off: usize, src: &[u8]) {
        // SAFETY: in bounds; the ping-pong protocol gives one side the area at a time.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.0.add(off), src.len()) };
    }
    fn get(&self, off: usize, dst: &mut [u8]) {
        // SAFETY: as in `put`.
        unsafe { std::ptr::copy_nonoverlapping(self.0.add(off), dst.as_mut_ptr(), dst.len()) };
    }
}

/// Waits until `word == want`: spinning, or sleeping on the futex every time.
fn floor_wait(word: &std::sync::atomic::AtomicU32, want: u32, futex: bool) {
    use std::sync::atomic::Ordering;
    loop {
        // SYNC POINT: Acquire pairs with the other side's Release store in `floor_post`.
        let v = word.load(Ordering::Acquire);
        if v == want {
            return;
        }
        if futex {
            let _ = aegis_client::sys::futex_wait(word, v, None);
        } else {
            std::hint::spin_loop();
        }
    }
}

fn floor_post(word: &std::sync::atomic::AtomicU32, v: u32, futex: bool) {
    word.store(v, std::sync::atomic::Ordering::Release);
    if futex {
        let _ = aegis_client::sys::futex_wake(word, 1);
    }
}

/// The large-payload floor's layout: the two sequence words and a stop word, then the
/// request and the reply, each `len` bytes, from the second page on.
const BIG_STOP: usize = 128;
const BIG_REQ: usize = 4096;

/// The large-payload floor's partner: reads every byte of each request once and writes it
/// once into the reply (a copy inside the shared mapping), as a handler answering with a
/// loaned reply does.
fn big_floor_partner(len: usize, fd: i32) {
    let m = FloorMap::map_len(fd, BIG_REQ + 2 * len);
    let mut n = 1u32;
    loop {
        floor_wait(m.word(FLOOR_PING), n, false);
        if m.word(BIG_STOP).load(std::sync::atomic::Ordering::Relaxed) != 0 {
            return;
        }
        // SAFETY: both areas are `len` bytes inside the mapping and do not overlap; the
        // ping-pong gives this side the request and the reply until it posts.
        unsafe { std::ptr::copy_nonoverlapping(m.0.add(BIG_REQ), m.0.add(BIG_REQ + len), len) };
        floor_post(m.word(FLOOR_PONG), n, false);
        n = n.wrapping_add(1);
    }
}

/// The write-once floor of a `len`-byte round trip: the caller writes every byte of the
/// request into shared memory once, the partner reads it once and writes the reply once,
/// the caller reads (checks) every byte of the reply once; both sides spin. A zero-copy
/// call doing the same work (`loan_all_*`) cannot beat it.
fn big_floor(c: &mut Criterion, len: usize) {
    use std::os::fd::AsRawFd;
    let size = BIG_REQ + 2 * len;
    let fd = aegis_client::sys::memfd("aegis-bench-floor", size as u64).unwrap();
    // SAFETY: fcntl on a descriptor we own (the partner inherits it across exec).
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) };
    let mut partner = std::process::Command::new(std::env::current_exe().unwrap())
        .env(FLOOR_ENV, format!("big:{len}"))
        .env(FLOOR_FD_ENV, fd.as_raw_fd().to_string())
        .spawn()
        .unwrap();
    let m = FloorMap::map_len(fd.as_raw_fd(), size);
    let pattern = big_pattern(len);
    let mut n = 0u32;
    let mut ok = true;
    let mut round_trip = || {
        n = n.wrapping_add(1);
        m.put(BIG_REQ, &pattern);
        floor_post(m.word(FLOOR_PING), n, false);
        floor_wait(m.word(FLOOR_PONG), n, false);
        // SAFETY: the reply area, `len` bytes inside the mapping, ours until the next post.
        let reply = unsafe { std::slice::from_raw_parts(m.0.add(BIG_REQ + len), len) };
        ok &= reply == &pattern[..];
    };
    for _ in 0..20 {
        round_trip();
    }
    let name = format!("call_rtt/floor_write_once_{}", size_name(len));
    let h = timed(c, &name, &mut round_trip);
    assert!(ok, "the floor's replies did not match");
    m.word(BIG_STOP)
        .store(1, std::sync::atomic::Ordering::Relaxed);
    floor_post(m.word(FLOOR_PING), n.wrapping_add(1), false);
    let _ = partner.wait();
    record(&name, h);
}

/// Times `round_trip` under criterion as benchmark `name`, every call into a histogram.
fn timed(c: &mut Criterion, name: &str, round_trip: &mut dyn FnMut()) -> Histogram<u64> {
    let mut h = hist();
    c.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                let t = Instant::now();
                round_trip();
                let _ = h.record(t.elapsed().as_nanos() as u64);
            }
            start.elapsed()
        })
    });
    h
}

fn big_pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

fn size_name(len: usize) -> String {
    format!("{}MiB", len >> 20)
}

/// Loaned calls of `len` bytes, both sides spinning, against an instance answering with a
/// loaned reply (`aegisctl serve --loan`). With `all`, as the write-once floor: every byte
/// of the request written, copied into the reply by the handler, and checked by the
/// caller. Without, the transport's own cost: only the first and last page are written
/// and checked on each side (`--touch-ends`).
fn bench_loan(c: &mut Criterion, len: usize, all: bool) {
    let bus = support::TestBus::start();
    let mut args = vec!["--spin-us", "10000000", "--loan"];
    if !all {
        args.push("--touch-ends");
    }
    let _inst = bus.serve("zc", "zc-1", &args);
    let client = bus.connect();
    let opts = CallOptions {
        spin: Some(aegis_client::Spin::Fixed(Duration::from_secs(10))),
        ..CallOptions::timeout(Duration::from_secs(5))
    };
    let pattern = big_pattern(len);
    let page = 4096.min(len);
    let mut ok = true;
    let mut call = |seq: u8| {
        let mut loan = client.loan("zc", len).unwrap();
        if all {
            loan.copy_from_slice(&pattern);
        } else {
            loan[..page].fill(seq);
            loan[len - page..].fill(seq);
        }
        let r = client.call_loan("zc", "echo", loan, &opts).unwrap();
        ok &= if all {
            r[..] == pattern[..]
        } else {
            r[..page].iter().chain(&r[len - page..]).all(|&b| b == seq)
        };
    };
    for i in 0..20 {
        call(i);
    }
    let name = format!(
        "call_rtt/loan_{}_{}",
        if all { "all" } else { "ends" },
        size_name(len)
    );
    let mut seq = 0u8;
    let h = timed(c, &name, &mut || {
        seq = seq.wrapping_add(1);
        call(seq)
    });
    assert!(ok, "a loaned reply did not match");
    record(&name, h);
}

fn loans(c: &mut Criterion) {
    for len in [1 << 20, 16 << 20] {
        big_floor(c, len);
        bench_loan(c, len, true);
        bench_loan(c, len, false);
    }
}

/// The floor's partner: copies each request out and the reply back, like an echo instance.
fn floor_partner(kind: &str, fd: i32) {
    let futex = kind == "futex";
    let m = FloorMap::map(fd);
    let mut buf = vec![0u8; PAYLOAD];
    let mut n = 1u32;
    loop {
        floor_wait(m.word(FLOOR_PING), n, futex);
        m.get(FLOOR_REQ, &mut buf);
        if buf[0] == 0xff {
            return;
        }
        m.put(FLOOR_REP, &buf);
        floor_post(m.word(FLOOR_PONG), n, futex);
        n = n.wrapping_add(1);
    }
}

fn floor(c: &mut Criterion, kind: &str) {
    use std::os::fd::AsRawFd;
    let futex = kind == "futex";
    let fd = aegis_client::sys::memfd("aegis-bench-floor", FLOOR_SIZE as u64).unwrap();
    // The partner inherits the descriptor across exec.
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) };
    let mut partner = std::process::Command::new(std::env::current_exe().unwrap())
        .env(FLOOR_ENV, kind)
        .env(FLOOR_FD_ENV, fd.as_raw_fd().to_string())
        .spawn()
        .unwrap();
    let m = FloorMap::map(fd.as_raw_fd());
    let payload = vec![0x5au8; PAYLOAD];
    let mut out = vec![0u8; PAYLOAD];
    let mut n = 0u32;
    let mut round_trip = || {
        n = n.wrapping_add(1);
        m.put(FLOOR_REQ, &payload);
        floor_post(m.word(FLOOR_PING), n, futex);
        floor_wait(m.word(FLOOR_PONG), n, futex);
        m.get(FLOOR_REP, &mut out);
    };
    for _ in 0..1000 {
        round_trip();
    }
    let name = format!("call_rtt/floor_{kind}");
    let h = timed(c, &name, &mut round_trip);
    assert_eq!(out, payload);
    // Stop the partner: a request starting with 0xff.
    n = n.wrapping_add(1);
    m.put(FLOOR_REQ, &[0xff]);
    floor_post(m.word(FLOOR_PING), n, futex);
    let _ = partner.wait();
    record(&name, h);
}

fn floor_spin(c: &mut Criterion) {
    floor(c, "spin");
}

fn floor_futex(c: &mut Criterion) {
    floor(c, "futex");
}

fn uds_baseline(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("echo.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let mut server = std::process::Command::new(std::env::current_exe().unwrap())
        .env(UDS_SERVER_ENV, &path)
        .spawn()
        .unwrap();
    let (mut conn, _) = listener.accept().unwrap();
    let payload = vec![0x5au8; PAYLOAD];
    let mut out = vec![0u8; PAYLOAD];
    let mut h = hist();
    let mut round_trip = |conn: &mut UnixStream| {
        conn.write_all(&(PAYLOAD as u32).to_le_bytes()).unwrap();
        conn.write_all(&payload).unwrap();
        let mut len = [0u8; 4];
        conn.read_exact(&mut len).unwrap();
        conn.read_exact(&mut out).unwrap();
    };
    for _ in 0..1000 {
        round_trip(&mut conn);
    }
    c.bench_function("call_rtt/uds_baseline", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                let t = Instant::now();
                round_trip(&mut conn);
                let _ = h.record(t.elapsed().as_nanos() as u64);
            }
            start.elapsed()
        })
    });
    drop(conn);
    let _ = server.wait();
    record("call_rtt/uds_baseline", h);
}

/// The baseline's server process: length-prefixed echo over a Unix stream socket.
fn uds_server(path: &str) {
    let mut s = UnixStream::connect(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let mut len = [0u8; 4];
        if s.read_exact(&mut len).is_err() {
            return;
        }
        let n = u32::from_le_bytes(len) as usize;
        s.read_exact(&mut buf[..n]).unwrap();
        s.write_all(&len).unwrap();
        s.write_all(&buf[..n]).unwrap();
    }
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
}

fn paced_config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! { name = benches; config = config(); targets = uds_baseline, floor_spin, floor_futex, spin_mode, blocking_mode, default_mode, async_mode, c_abi_default }
criterion_group! { name = paced; config = paced_config(); targets = seed_baseline }
criterion_group! { name = large; config = paced_config(); targets = loans }

fn main() {
    if let Ok(path) = std::env::var(UDS_SERVER_ENV) {
        uds_server(&path);
        return;
    }
    if let (Ok(kind), Ok(fd)) = (std::env::var(FLOOR_ENV), std::env::var(FLOOR_FD_ENV)) {
        if let Some(len) = kind.strip_prefix("big:") {
            big_floor_partner(len.parse().unwrap(), fd.parse().unwrap());
            return;
        }
        floor_partner(&kind, fd.parse().unwrap());
        return;
    }
    benches();
    paced();
    large();
    Criterion::default().configure_from_args().final_summary();
    let results = RESULTS.lock().unwrap();
    let base = results
        .iter()
        .find(|(n, _)| n.ends_with("uds_baseline"))
        .map(|(_, h)| h.value_at_quantile(0.5));
    let p50 = |suffix: &str| {
        results
            .iter()
            .find(|(n, _)| n.ends_with(suffix))
            .map(|(_, h)| h.value_at_quantile(0.5) as f64)
    };
    println!("\ncall_rtt summary (round trip, µs; 1 KiB request and reply unless named):");
    println!(
        "{:<26} {:>9} {:>9} {:>9} {:>14}",
        "mode", "p50", "p99", "p99.9", "p50 vs UDS"
    );
    for (name, h) in results.iter() {
        let p = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        let ratio = base.map_or(String::new(), |b| {
            format!("{:.2}x", h.value_at_quantile(0.5) as f64 / b as f64)
        });
        println!(
            "{:<26} {:>9.2} {:>9.2} {:>9.2} {:>14}",
            name,
            p(0.5),
            p(0.99),
            p(0.999),
            ratio
        );
    }
    let ratio = |a: &str, b: &str| p50(a).zip(p50(b)).map(|(a, b)| a / b);
    if let Some(r) = ratio("aegis_spin", "floor_spin") {
        println!("spin mode / spin floor (p50): {r:.2}x (target <= 2)");
    }
    if let Some(r) = ratio("c_abi_interleaved", "rust_interleaved") {
        println!("C ABI / Rust, default mode (p50): {r:.2}x (target <= 1.1)");
    }
    if let Some(r) = ratio("aegis_blocking", "floor_futex") {
        println!("blocking mode / futex floor (p50): {r:.2}x (target <= 1.2)");
    }
    for size in ["1MiB", "16MiB"] {
        if let Some(r) = ratio(
            &format!("loan_all_{size}"),
            &format!("floor_write_once_{size}"),
        ) {
            println!(
                "{size} loaned call, every byte / write-once floor (p50): {r:.2}x (target <= 1.1)"
            );
        }
    }
    if let Some(r) = ratio("loan_ends_16MiB", "aegis_spin") {
        println!("16 MiB loaned call, first and last page / 1 KiB spin call (p50): {r:.2}x (target <= 2)");
    }
    if let Some((_, h)) = results.iter().find(|(n, _)| n.ends_with("seed_baseline")) {
        let p99 = h.value_at_quantile(0.99);
        println!(
            "seed baseline call path: p99 {:.1} µs against the seed's 5 ms target: {}",
            p99 as f64 / 1000.0,
            if p99 < SEED_P99_NS { "met" } else { "MISSED" }
        );
    }
}
