//! `bridge_rtt`: what `aegis-bridge` adds on top of NATS. A real `nats-server`, a broker, an
//! echo instance and a bridge (release builds), 1 KiB payloads, one caller, measured in the
//! same run:
//!
//! * `nats_direct`: a NATS request-reply to a plain echo responder (async-nats in this
//!   process) — the floor any bridge sits on;
//! * `nats_to_bus_plain`: a NATS request on `aegis.call.echo.echo`, answered by the local
//!   instance through the bridge (raw bytes);
//! * `nats_to_bus_model`: the same as an AegisIPC client does it: a MessagePack
//!   `RouteRequest` on `ipc.route.request`, a `RouteResponse` back;
//! * `bus_to_bus`: a caller on a second bus ("another host") calling the service by name:
//!   its local stand-in, NATS, the first bus's bridge and instance, and back.
//!
//! Prints p50/p99/p99.9 in microseconds (hdrhistogram of every call). No criterion: each
//! figure is a few thousand sequential round trips, which is what the comparison needs.
//!
//! `cargo bench --bench bridge_rtt`

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use aegis_client::CallOptions;
use futures_util::StreamExt;
use hdrhistogram::Histogram;

const PAYLOAD: usize = 1024;
const CALLS: usize = 5_000;
const WARMUP: usize = 500;

fn report(name: &str, h: &Histogram<u64>) {
    println!(
        "{name:<22} {:>9.1} {:>9.1} {:>9.1}",
        h.value_at_quantile(0.5) as f64 / 1e3,
        h.value_at_quantile(0.99) as f64 / 1e3,
        h.value_at_quantile(0.999) as f64 / 1e3
    );
}

fn measure(mut f: impl FnMut()) -> Histogram<u64> {
    for _ in 0..WARMUP {
        f();
    }
    let mut h = Histogram::new_with_bounds(1, 60_000_000_000, 3).unwrap();
    for _ in 0..CALLS {
        let t = Instant::now();
        f();
        h.record(t.elapsed().as_nanos() as u64).unwrap();
    }
    h
}

#[derive(serde::Serialize)]
struct RouteRequest<'a> {
    service_name: &'a str,
    method: &'a str,
    params: std::collections::BTreeMap<&'a str, serde_bytes_like::Bin<'a>>,
    timeout: f64,
    trace_id: &'a str,
}

/// `{"_raw": <bin>}`: the payload as MessagePack binary (the bridge passes it as it is).
mod serde_bytes_like {
    pub struct Bin<'a>(pub &'a [u8]);
    impl serde::Serialize for Bin<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(self.0)
        }
    }
}

fn main() {
    let nats = support::Nats::start();
    let url = nats.url();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let nc = rt.block_on(async_nats::connect(url.as_str())).unwrap();
    let payload = bytes::Bytes::from(vec![0x5a; PAYLOAD]);

    // A plain NATS echo responder, in this process.
    let responder = nc.clone();
    let mut sub = rt.block_on(nc.subscribe("bench.echo")).unwrap();
    rt.spawn(async move {
        while let Some(m) = sub.next().await {
            if let Some(r) = m.reply {
                let _ = responder.publish(r, m.payload).await;
            }
        }
    });

    let a = support::TestBus::start();
    let _inst = a.serve("echo", "echo-1", &[]);
    let _bridge_a = support::start_bridge(&a, &url, "hosta", &["--export", "*"]);
    let b = support::TestBus::start();
    let _bridge_b = support::start_bridge(&b, &url, "hostb", &["--import", "*"]);
    let caller = b.connect();
    let opts = CallOptions::timeout(Duration::from_secs(5));
    support::wait_for("the bridge to answer and the stand-in to appear", || {
        caller.call("echo", "echo", b"x", &opts).is_ok()
            && rt
                .block_on(nc.request("aegis.call.echo.echo", payload.clone()))
                .is_ok()
    });

    let req = |subject: &'static str, body: bytes::Bytes| {
        let m = rt.block_on(nc.request(subject, body)).unwrap();
        assert!(m.payload.len() >= PAYLOAD);
    };
    let model = rmp_serde::to_vec_named(&RouteRequest {
        service_name: "echo",
        method: "echo",
        params: [("_raw", serde_bytes_like::Bin(&payload))].into(),
        timeout: 5.0,
        trace_id: "bench",
    })
    .unwrap();
    let model = bytes::Bytes::from(model);

    println!("\n1 KiB round trips, one caller (microseconds)");
    println!("{:<22} {:>9} {:>9} {:>9}", "path", "p50", "p99", "p99.9");
    let direct = measure(|| req("bench.echo", payload.clone()));
    report("nats_direct", &direct);
    let plain = measure(|| req("aegis.call.echo.echo", payload.clone()));
    report("nats_to_bus_plain", &plain);
    report(
        "nats_to_bus_model",
        &measure(|| req("ipc.route.request", model.clone())),
    );
    let mut out = Vec::new();
    report(
        "bus_to_bus",
        &measure(|| {
            caller
                .call_into("echo", "echo", &payload, &opts, &mut out)
                .unwrap();
        }),
    );
    println!(
        "the bridge adds {:.1} µs at p50 to a NATS request-reply ({:.2}x)",
        (plain.value_at_quantile(0.5) as f64 - direct.value_at_quantile(0.5) as f64) / 1e3,
        plain.value_at_quantile(0.5) as f64 / direct.value_at_quantile(0.5) as f64
    );
}
