//! `call_rtt`: round trip of a 1 KiB request and 1 KiB reply, one client, one instance in
//! another process, in spin mode (both sides spin) and blocking mode (both sides sleep on
//! futexes at once), against a Unix-domain-socket request/reply baseline between two
//! processes measured in the same run. Criterion reports the mean; p50/p99 come from an
//! hdrhistogram of every timed call and are printed at the end.
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

static RESULTS: Mutex<Vec<(String, Histogram<u64>)>> = Mutex::new(Vec::new());

fn record(name: &str, h: Histogram<u64>) {
    RESULTS.lock().unwrap().push((name.to_owned(), h));
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 10_000_000_000, 3).unwrap()
}

fn bench_bus(c: &mut Criterion, name: &str, spin: Duration) {
    let bus = support::TestBus::start();
    let spin_us = spin.as_micros().to_string();
    let _inst = bus.serve("rtt", "rtt-1", &["--spin-us", &spin_us]);
    let client = bus.connect();
    let opts = CallOptions {
        spin: Some(aegis_client::Spin::Fixed(spin)),
        ..CallOptions::timeout(Duration::from_secs(5))
    };
    let payload = vec![0x5au8; PAYLOAD];
    let mut out = Vec::with_capacity(PAYLOAD);
    for _ in 0..1000 {
        client
            .call_into("rtt", "echo", &payload, &opts, &mut out)
            .unwrap();
    }
    let mut h = hist();
    c.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                let t = Instant::now();
                client
                    .call_into("rtt", "echo", &payload, &opts, &mut out)
                    .unwrap();
                let _ = h.record(t.elapsed().as_nanos() as u64);
            }
            start.elapsed()
        })
    });
    assert_eq!(out, payload);
    record(name, h);
    drop(client);
}

fn spin_mode(c: &mut Criterion) {
    // A spin budget longer than any gap between calls: neither side ever sleeps.
    bench_bus(c, "call_rtt/aegis_spin", Duration::from_secs(10));
}

fn blocking_mode(c: &mut Criterion) {
    bench_bus(c, "call_rtt/aegis_blocking", Duration::ZERO);
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

criterion_group! { name = benches; config = config(); targets = uds_baseline, spin_mode, blocking_mode }

fn main() {
    if let Ok(path) = std::env::var(UDS_SERVER_ENV) {
        uds_server(&path);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
    let results = RESULTS.lock().unwrap();
    let base = results
        .iter()
        .find(|(n, _)| n.ends_with("uds_baseline"))
        .map(|(_, h)| h.value_at_quantile(0.5));
    println!("\ncall_rtt summary (1 KiB request + 1 KiB reply, round trip, µs):");
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
}
