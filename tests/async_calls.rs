//! Async calls (`Bus::call_async`, feature `async`) from a tokio current-thread runtime,
//! against real instance processes: many at once, and futures dropped mid-call.

mod support;

use std::collections::HashMap;
use std::future::Future;
use std::task::{Context, Waker};
use std::time::Duration;

use aegis_client::{BusOptions, CallOptions};
use support::TestBus;

const N: u32 = 10_000;

#[test]
fn ten_thousand_concurrent_async_calls_then_ten_thousand_dropped_mid_call_leak_no_mailbox() {
    let bus = TestBus::start();
    let _a = bus.serve("async", "a", &[]);
    let _b = bus.serve("async", "b", &[]);
    let client = bus.connect_with(BusOptions {
        mailboxes: N,
        ..Default::default()
    });
    let opts = CallOptions::timeout(Duration::from_secs(60));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // N calls in flight at once from one thread; each reply checked against its request.
    let round = |tag: &'static str| {
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async {
            let handles: Vec<_> = (0..N)
                .map(|i| {
                    let (c, o) = (client.clone(), opts.clone());
                    tokio::task::spawn_local(async move {
                        let p = format!("{tag} {i}");
                        let r = c.call_async("async", "m", p.as_bytes(), &o).await.unwrap();
                        assert_eq!(r.payload, p.as_bytes(), "a reply for another call");
                        r.instance_id
                    })
                })
                .collect();
            let mut by: HashMap<String, u32> = HashMap::new();
            for h in handles {
                *by.entry(h.await.unwrap()).or_default() += 1;
            }
            by
        })
    };
    let by = round("first");
    assert_eq!(by.values().sum::<u32>(), N);
    // Round-robin over both. Not exactly N/2 each: N calls overflow the two 256-slot rings,
    // and a call that found its ring full picks again when it retries (wherever there is
    // room then), so the split depends on which instance drains first. On two cores with
    // both instances, the broker and this process competing, one instance drained four
    // times faster than the other in two of five runs (1,820 and 1,865 of 10,000, also
    // before the doorbell thread slept on the answer words): a tenth each is the bound.
    assert!(
        by["a"] >= N / 10 && by["b"] >= N / 10,
        "round-robin over both: {by:?}"
    );

    // N futures dropped mid-call: each polled once (request sent, waker registered), then
    // dropped before its reply is collected.
    {
        let mut cx = Context::from_waker(Waker::noop());
        let mut futs: Vec<_> = (0..N)
            .map(|_| Box::pin(client.call_async("async", "m", b"dropped", &opts)))
            .collect();
        let mut sent = 0;
        for f in futs.iter_mut() {
            if f.as_mut().poll(&mut cx).is_pending() {
                sent += 1;
            }
        }
        assert!(
            sent > N / 2,
            "most calls were still in flight when dropped ({sent})"
        );
        drop(futs);
    }
    // Every mailbox came back: N calls can be in flight again on the same connection.
    let by = round("after");
    assert_eq!(by.values().sum::<u32>(), N);
}

#[test]
fn an_event_loop_learns_of_armed_calls_through_the_event_fd() {
    use std::os::fd::AsRawFd;
    let bus = TestBus::start();
    let _a = bus.serve("efd", "a", &[]);
    let client = bus.connect();
    let fd = client.event_fd().unwrap().as_raw_fd();
    let opts = CallOptions::timeout(Duration::from_secs(30));
    let payload = |i: u32| format!("event fd call {i}").into_bytes();
    let mut pending: Vec<_> = (0..100u32)
        .map(|i| {
            let p = client.submit("efd", "m", &payload(i), &opts).unwrap();
            p.notify_event_fd().unwrap();
            (i, p)
        })
        .collect();
    let mut out = Vec::new();
    while !pending.is_empty() {
        // Wait for the fd only (bounded): a missing signal fails here.
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, support::DEADLINE.as_millis() as i32) };
        assert_eq!(n, 1, "the event fd did not signal armed calls still open");
        let mut count = [0u8; 8];
        // SAFETY: reads 8 bytes into a live buffer from the connection's eventfd.
        unsafe { libc::read(fd, count.as_mut_ptr().cast(), 8) };
        let (ready, open): (Vec<_>, Vec<_>) = pending.into_iter().partition(|(_, p)| p.is_ready());
        pending = open;
        for (i, p) in ready {
            p.wait(&mut out).unwrap();
            assert_eq!(out, payload(i));
        }
    }
}

/// Two event loops on one connection, each with its own event fd (`new_event_fd`): a
/// call armed on one (`notify`) makes that fd readable, not the other; `clear` reads it
/// (true), and says false when there was nothing to read.
#[test]
fn each_event_loop_s_own_fd_is_signalled_for_its_own_calls() {
    use std::os::fd::AsRawFd;
    let bus = TestBus::start();
    let _a = bus.serve("efd2", "a", &["--delay-ms", "100"]);
    let client = bus.connect();
    let (mine, other) = (
        client.new_event_fd().unwrap(),
        client.new_event_fd().unwrap(),
    );
    assert!(!mine.clear(), "a new event fd was readable");
    let readable = |fd: &aegis_client::EventFd, ms: i32| {
        let mut pfd = libc::pollfd {
            fd: fd.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, ms) == 1 }
    };
    let opts = CallOptions::timeout(Duration::from_secs(30));
    let mut p = client.submit("efd2", "m", b"armed", &opts).unwrap();
    p.notify(&mine);
    assert!(
        readable(&mine, support::DEADLINE.as_millis() as i32),
        "the armed fd was not signalled"
    );
    let mut out = Vec::new();
    support::wait_for("the reply", || p.is_ready());
    assert!(matches!(p.try_wait(&mut out), Some(Ok(_))));
    assert_eq!(out, b"armed");
    assert!(mine.clear(), "the signalled fd read nothing");
    assert!(!readable(&other, 0), "the other loop's fd was signalled");
    assert!(!other.clear());
}

/// A full ring does not block the executor: with the only instance stopped and its
/// 4-slot ring full, more async calls wait for room while the same current-thread runtime
/// goes on running other tasks; once the instance continues, every call is answered.
#[test]
fn a_full_ring_does_not_block_the_runtime() {
    let bus = TestBus::start();
    let inst = bus.serve("tight", "t-1", &["--slot-count", "4"]);
    let client = bus.connect();
    let opts = CallOptions::timeout(Duration::from_secs(20));
    client.call("tight", "m", b"warm", &opts).unwrap();
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(inst.pid() as libc::pid_t, libc::SIGSTOP) };
    support::wait_for("the instance to stop", || support::is_stopped(inst.pid()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    let answered = local.block_on(&rt, async {
        let calls: Vec<_> = (0..16u32)
            .map(|i| {
                let (c, o) = (client.clone(), opts.clone());
                tokio::task::spawn_local(async move {
                    let p = i.to_le_bytes();
                    let r = c.call_async("tight", "m", &p, &o).await.unwrap();
                    assert_eq!(r.payload, p);
                })
            })
            .collect();
        // Let every call try the ring (4 fit, 12 find it full), then see the runtime is
        // free: a blocked thread would hold this timer up for the calls' 20 s deadline.
        tokio::task::yield_now().await;
        let t = std::time::Instant::now();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the runtime was blocked for {:?} by calls waiting for ring room",
            t.elapsed()
        );
        // SAFETY: kill(2) on our child.
        unsafe { libc::kill(inst.pid() as libc::pid_t, libc::SIGCONT) };
        let mut n = 0;
        for c in calls {
            c.await.unwrap();
            n += 1;
        }
        n
    });
    assert_eq!(answered, 16);
}

/// An instance killed while handling calls: an awaiting future and an event loop's armed
/// call both learn of it from the doorbell thread's liveness pass (no reply will ever
/// ring), and end with the attempt's failure well before their 30 s deadline.
#[test]
fn async_callers_of_an_instance_killed_mid_call_are_told_promptly() {
    use std::os::fd::AsRawFd;
    use std::time::Instant;
    let bus = TestBus::start();
    let slow = bus.serve(
        "dies",
        "d",
        &[&support::STUCK_IN_HANDLER[..], &["--threads", "2"]].concat(),
    );
    let client = bus.connect();
    let opts = CallOptions::timeout(Duration::from_secs(30));
    let fd = client.new_event_fd().unwrap();
    let mut armed = client.submit("dies", "m", b"armed", &opts).unwrap();
    armed.notify(&fd);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let killed_at = std::sync::OnceLock::new();
    let (r, returned_at) = rt.block_on(async {
        let call = client.call_async("dies", "m", b"awaited", &opts);
        tokio::pin!(call);
        // Both requests taken (nothing queued, no progress), then the instance dies.
        let mut kill = std::pin::pin!(async {
            loop {
                let h = &client.health(Some("dies")).unwrap()[0];
                if h.queued == 0 && h.last_progress_ms >= 100 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // What the fd says from here on is news of the death (while the call waits,
            // the liveness pass signals it every 5 ms).
            fd.clear();
            killed_at.set(Instant::now()).unwrap();
            // SAFETY: kill(2) on our child.
            unsafe { libc::kill(slow.pid() as libc::pid_t, libc::SIGKILL) };
            std::future::pending::<()>().await
        });
        tokio::select! {
            r = &mut call => (r, Instant::now()),
            _ = &mut kill => unreachable!(),
        }
    });
    let killed_at = *killed_at
        .get()
        .expect("the future returned before the kill");
    match r {
        Err(aegis_client::Error::Timeout { attempts, .. }) => {
            assert!(attempts[0].error.contains("left"), "{attempts:?}")
        }
        other => panic!("expected Timeout naming the departure, got {other:?}"),
    }
    // The liveness pass runs every 5 ms: a second is 200 of them.
    let took = returned_at.duration_since(killed_at);
    assert!(
        took < Duration::from_secs(1),
        "the future learnt of the death after {took:?}"
    );
    // The event loop: its fd is signalled, and the armed call settles with the failure.
    let mut out = Vec::new();
    let until = Instant::now() + Duration::from_secs(1);
    let settled = loop {
        let mut pfd = libc::pollfd {
            fd: fd.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let left = until.saturating_duration_since(Instant::now()).as_millis() as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, left) };
        assert_eq!(
            n, 1,
            "the event fd was not signalled after the instance died"
        );
        fd.clear();
        if let Some(r) = armed.try_wait(&mut out) {
            break r;
        }
    };
    assert!(
        matches!(settled, Err(aegis_client::Error::Timeout { .. })),
        "{settled:?}"
    );
}
