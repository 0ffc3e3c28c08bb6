//! `resources`: the resource map at the seed's scale — 100,000 resources held by 1,000
//! instances — measuring a lookup (lock-free read of shared memory, no broker), a single
//! claim, a bulk claim of 100, and a transfer (broker round trips). p50/p99 from an
//! hdrhistogram of every timed operation are printed at the end.
//!
//! `cargo bench --bench resources`

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use aegis_client::{
    BulkOptions, Heartbeat, Instance, RegisterOptions, ResourceSpec, ServiceConfig,
};
use criterion::{criterion_group, Criterion};
use hdrhistogram::Histogram;

const INSTANCES: usize = 1000;
const PER_INSTANCE: usize = 100;

static RESULTS: Mutex<Vec<(String, Histogram<u64>)>> = Mutex::new(Vec::new());

fn timed(h: &mut Histogram<u64>, f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    let d = t.elapsed();
    let _ = h.record(d.as_nanos().max(1) as u64);
    d
}

fn bench(c: &mut Criterion) {
    let bus =
        support::TestBus::start_with(&["--max-instances", "1100", "--max-resources", "262144"]);
    let client = bus.connect();
    // Tiny rings: these instances only own resources and never run a serving loop, so
    // their heartbeat timeout is set past the benchmark (else they turn Unhealthy at 5 s).
    let opts = || RegisterOptions {
        config: ServiceConfig {
            slot_size: Some(256),
            slot_count: Some(2),
            max_message: Some(4096),
        },
        heartbeat: Heartbeat {
            interval_ms: 3_600_000,
            timeout_ms: 3_600_000,
        },
        ..Default::default()
    };
    let t = Instant::now();
    let instances: Vec<Instance> = (0..INSTANCES)
        .map(|i| {
            client
                .register_with(&format!("svc-{}", i % 10), &format!("inst-{i}"), opts())
                .unwrap()
        })
        .collect();
    for (i, inst) in instances.iter().enumerate() {
        let specs = (0..PER_INSTANCE)
            .map(|k| ResourceSpec::new(format!("res-{i}-{k}")))
            .collect();
        let r = inst.claim_with(specs, BulkOptions::default()).unwrap();
        assert_eq!(r.succeeded as usize, PER_INSTANCE);
    }
    println!(
        "setup: {INSTANCES} instances, {} resources in {:.1} s",
        INSTANCES * PER_INSTANCE,
        t.elapsed().as_secs_f64()
    );
    let ids: Vec<String> = (0..INSTANCES * PER_INSTANCE)
        .map(|n| format!("res-{}-{}", n % INSTANCES, n / INSTANCES))
        .collect();
    let hist = || Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();

    let mut h = hist();
    let mut n = 0usize;
    c.bench_function("resources/lookup", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    n = (n + 7919) % ids.len();
                    timed(&mut h, || {
                        assert!(client.lookup_resource(&ids[n]).is_some())
                    })
                })
                .sum()
        })
    });
    RESULTS.lock().unwrap().push(("lookup".into(), h));

    let claimer = &instances[1];
    let mut h = hist();
    let mut k = 0u64;
    c.bench_function("resources/claim", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    k += 1;
                    let id = format!("fresh-{k}");
                    let d = timed(&mut h, || claimer.claim(&[&id]).unwrap());
                    claimer.release(&[&id]).unwrap();
                    d
                })
                .sum()
        })
    });
    RESULTS.lock().unwrap().push(("claim".into(), h));

    let mut h = hist();
    c.bench_function("resources/bulk_claim_100", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    k += 1;
                    let batch: Vec<String> = (0..100).map(|j| format!("bulk-{k}-{j}")).collect();
                    let specs = batch.iter().map(ResourceSpec::new).collect();
                    let d = timed(&mut h, || {
                        assert_eq!(
                            claimer
                                .claim_with(specs, BulkOptions::default())
                                .unwrap()
                                .succeeded,
                            100
                        )
                    });
                    let refs: Vec<&str> = batch.iter().map(String::as_str).collect();
                    claimer.release(&refs).unwrap();
                    d
                })
                .sum()
        })
    });
    RESULTS.lock().unwrap().push(("bulk claim 100".into(), h));

    let (a, b2) = (&instances[2], &instances[12]); // both of service svc-2
    a.claim(&["moving"]).unwrap();
    let mut h = hist();
    let mut at_a = true;
    c.bench_function("resources/transfer", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let (from, to) = if at_a { (a, "inst-12") } else { (b2, "inst-2") };
                    at_a = !at_a;
                    timed(&mut h, || {
                        from.transfer(&["moving"], "svc-2", to, "bench").unwrap()
                    })
                })
                .sum()
        })
    });
    RESULTS.lock().unwrap().push(("transfer".into(), h));
    drop(instances);
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! { name = benches; config = config(); targets = bench }

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    println!("\nresources summary (100,000 resources, 1,000 instances):");
    println!(
        "{:<16} {:>12} {:>12} {:>14}",
        "operation", "p50", "p99", "seed target"
    );
    let targets = [
        ("lookup", "< 1 ms"),
        ("claim", "< 5 ms"),
        ("bulk claim 100", "< 50 ms"),
        ("transfer", "< 10 ms"),
    ];
    for (name, h) in RESULTS.lock().unwrap().iter() {
        let f = |ns: u64| {
            if ns < 10_000 {
                format!("{:.0} ns", ns)
            } else {
                format!("{:.1} µs", ns as f64 / 1000.0)
            }
        };
        let target = targets.iter().find(|t| t.0 == name).map_or("", |t| t.1);
        println!(
            "{:<16} {:>12} {:>12} {:>14}",
            name,
            f(h.value_at_quantile(0.5)),
            f(h.value_at_quantile(0.99)),
            target
        );
    }
}
