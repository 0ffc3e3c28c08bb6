//! Every sleep on the bus re-checks its condition after a timeout (5 ms for callers and the
//! async doorbell, 1 s for watchers, the heartbeat interval for serving threads), which
//! would hide a lost futex wake behind a short delay: no other test would fail. Here every
//! such period is 60 s (`AEGIS_TEST_RECHECK_MS`, feature `test-hooks`, and the instance's
//! heartbeat interval) and nobody spins, so each call and watch below depends on its wake
//! arriving: one lost wake makes it miss its 10 s deadline and the test fail.

mod support;

use std::time::{Duration, Instant};

use aegis_client::{BusOptions, CallOptions, Spin};
use support::TestBus;

const LONG: &str = "60000";

#[test]
fn no_wake_up_is_lost_when_nothing_re_checks() {
    // Before anything reads it (read once per process).
    std::env::set_var("AEGIS_TEST_RECHECK_MS", LONG);
    let bus = TestBus::start();
    let _inst = bus
        .start_serve_env(
            "lw",
            "a",
            &[
                "--spin-us",
                "0",
                "--threads",
                "2",
                "--heartbeat-interval-ms",
                LONG,
                "--heartbeat-timeout-ms",
                "120000",
            ],
            &[("AEGIS_TEST_RECHECK_MS", LONG)],
        )
        .ready();
    let client = bus.connect_with(BusOptions {
        spin: Spin::Fixed(Duration::ZERO),
        ..Default::default()
    });
    let opts = CallOptions::timeout(Duration::from_secs(10));

    // Sequential blocking calls: the ring's and the mailbox's waiter handshakes, one at a
    // time, thousands of times.
    let mut out = Vec::new();
    for i in 0..3000u32 {
        let p = i.to_le_bytes();
        client
            .call_into("lw", "m", &p, &opts, &mut out)
            .unwrap_or_else(|e| panic!("call {i}: {e}"));
        assert_eq!(out, p);
    }
    // Concurrent callers: sleepers on the ring and wakers racing.
    std::thread::scope(|s| {
        for t in 0..4u32 {
            let (client, opts) = (&client, &opts);
            s.spawn(move || {
                let mut out = Vec::new();
                for i in 0..500u32 {
                    let p = [t.to_le_bytes(), i.to_le_bytes()].concat();
                    client
                        .call_into("lw", "m", &p, opts, &mut out)
                        .unwrap_or_else(|e| panic!("thread {t} call {i}: {e}"));
                    assert_eq!(out, p);
                }
            });
        }
    });
    // Async calls: the doorbell.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for i in 0..500u32 {
            let p = i.to_le_bytes();
            let r = client
                .call_async("lw", "m", &p, &opts)
                .await
                .unwrap_or_else(|e| panic!("async call {i}: {e}"));
            assert_eq!(r.payload, p);
        }
    });
    // A watcher is woken by a membership change, not by its re-check.
    let seen = client.service_generation("lw");
    std::thread::scope(|s| {
        let w = s.spawn(|| {
            let t = Instant::now();
            let g = client.watch("lw", seen, Duration::from_secs(30));
            (g, t.elapsed())
        });
        let _b = bus.serve("lw", "b", &[]);
        let (g, took) = w.join().unwrap();
        assert_ne!(g, seen, "the watch timed out");
        assert!(took < Duration::from_secs(10), "woken only after {took:?}");
    });
}
