//! `aegisctl demo`: the whole bus in one command — a private broker, three instances in
//! separate processes, calls by name, how they were spread, and what they cost.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use aegis_client::{Bus, CallOptions};
use hdrhistogram::Histogram;

use crate::private_bus::PrivateBus;

const SERVICE: &str = "demo.echo";

pub fn run(calls: u64) -> Result<(), String> {
    println!("aegis-ipc demo: shared-memory calls between processes on this host\n");
    let mut bus = PrivateBus::start()?;
    println!(
        "1. started a private broker (pid {}) in {}",
        bus.broker_pid(),
        bus.dir().display()
    );
    for i in 1..=3 {
        let pid = bus.spawn_echo(SERVICE, &format!("echo-{i}"), &[])?;
        println!("2. started instance echo-{i} of '{SERVICE}' as process {pid}");
    }
    let client = Bus::connect_dir(bus.dir()).map_err(|e| e.to_string())?;
    let payload = vec![b'x'; 1024];
    let opts = CallOptions::timeout(Duration::from_secs(5));
    let mut out = Vec::new();
    let mut spread: BTreeMap<String, u64> = BTreeMap::new();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
    let mut failed = 0;
    // Warm up: the first call to each instance maps its segment (one broker round trip).
    for _ in 0..30 {
        client
            .call_into(SERVICE, "echo", &payload, &opts, &mut out)
            .map_err(|e| e.to_string())?;
    }
    let t0 = Instant::now();
    for _ in 0..calls {
        let t = Instant::now();
        match client.call_into(SERVICE, "echo", &payload, &opts, &mut out) {
            Ok(info) if out == payload => {
                let _ = hist.record(t.elapsed().as_nanos().max(1) as u64);
                *spread.entry(client.instance_id(info)).or_default() += 1;
            }
            _ => failed += 1,
        }
    }
    let wall = t0.elapsed();
    println!(
        "3. made {calls} calls by name with a 1 KiB payload ({failed} failed) in {:.1} ms\n",
        wall.as_secs_f64() * 1e3
    );
    println!("   {:<10} {:>7} {:>7}", "INSTANCE", "CALLS", "SHARE");
    for (id, n) in &spread {
        println!(
            "   {:<10} {:>7} {:>6.1}%",
            id,
            n,
            100.0 * *n as f64 / calls.max(1) as f64
        );
    }
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "\n   round-trip latency µs: p50 {:.1} · p90 {:.1} · p99 {:.1} · p99.9 {:.1} · max {:.1}",
        us(0.5),
        us(0.9),
        us(0.99),
        us(0.999),
        hist.max() as f64 / 1000.0
    );
    let info = client.service(SERVICE).map_err(|e| e.to_string())?;
    println!("\n4. the broker's view (aegisctl service {SERVICE}):");
    for i in &info.instances {
        println!(
            "   {:<10} pid {:>7} {:?} served {}",
            i.id, i.pid, i.status, i.requests_served
        );
    }
    drop(client);
    drop(bus);
    println!("\n5. stopped the instances and the broker; the temporary directory is gone.");
    if failed > 0 {
        return Err(format!("{failed} of {calls} calls failed"));
    }
    Ok(())
}
