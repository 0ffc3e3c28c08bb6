//! Every sleep on the bus re-checks its condition after a timeout (5 ms for callers and the
//! async doorbell, 1 s for watchers, the heartbeat interval for serving threads), which
//! would hide a lost futex wake behind a short delay: no other test would fail. Here every
//! such period is 60 s (`AEGIS_TEST_RECHECK_MS`, feature `test-hooks`, and the instance's
//! heartbeat interval) and nobody spins, so each call and watch below depends on its wake
//! arriving. A caller also looks at its mailbox when its attempt deadline passes, so a lost
//! wake would still end in a reply, late: every call is therefore held to [`WOKEN_WITHIN`],
//! far below both the 60 s re-check and the 10 s deadline (calls take microseconds), and a
//! lost wake fails the test at once.

mod support;

use std::time::{Duration, Instant};

use aegis_client::{BusOptions, CallOptions, Spin};
use support::TestBus;

const LONG: &str = "60000";
/// A call that took this long was woken by a deadline, not by its wake.
const WOKEN_WITHIN: Duration = Duration::from_secs(2);

/// Runs one call, failing the test if it errs, answers another payload or is late.
fn timed_call(
    client: &aegis_client::Bus,
    p: &[u8],
    opts: &CallOptions,
    out: &mut Vec<u8>,
    what: &str,
) {
    let t = Instant::now();
    client
        .call_into("lw", "m", p, opts, out)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(out, p, "{what}");
    assert!(
        t.elapsed() < WOKEN_WITHIN,
        "{what} took {:?}: its wake was lost",
        t.elapsed()
    );
}

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
        timed_call(
            &client,
            &i.to_le_bytes(),
            &opts,
            &mut out,
            &format!("call {i}"),
        );
    }
    // Concurrent callers: sleepers on the ring and wakers racing.
    std::thread::scope(|s| {
        for t in 0..4u32 {
            let (client, opts) = (&client, &opts);
            s.spawn(move || {
                let mut out = Vec::new();
                for i in 0..500u32 {
                    let p = [t.to_le_bytes(), i.to_le_bytes()].concat();
                    timed_call(client, &p, opts, &mut out, &format!("thread {t} call {i}"));
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
            let t = Instant::now();
            let r = client
                .call_async("lw", "m", &p, &opts)
                .await
                .unwrap_or_else(|e| panic!("async call {i}: {e}"));
            assert_eq!(r.payload, p);
            assert!(
                t.elapsed() < WOKEN_WITHIN,
                "async call {i} took {:?}",
                t.elapsed()
            );
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
        assert!(took < WOKEN_WITHIN, "woken only after {took:?}");
    });
}
