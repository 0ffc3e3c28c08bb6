//! A channel's request heap and reply heap, with a real broker: the request heap made with
//! the channel's first request larger than a ring slot (or first loan), the reply heap with
//! its first reply larger than a mailbox, never for small calls, and both counted to the
//! caller's shared-memory quota. Its own test binary: it counts the heaps mapped in this
//! process, which other tests would make too.

mod support;

use std::time::Duration;

use aegis_client::{CallOptions, Error};

/// The tests count mappings of this process: one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Stops serving when dropped, also when an assertion fails (else the scope that serves
/// waits for ever).
struct StopOnDrop(aegis_client::StopHandle);
impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

fn opts() -> CallOptions {
    CallOptions::timeout(Duration::from_secs(10))
}

/// Request heaps mapped in this process (the caller's and the instance's mappings).
fn heaps() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .matches("memfd:aegis-heap")
        .count()
}

/// Reply heaps mapped in this process.
fn reply_heaps() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .matches("memfd:aegis-reply-heap")
        .count()
}

/// Serves `inst` until stopped, echoing each request.
fn echo(inst: &aegis_client::Instance) {
    inst.serve(|req, out| {
        out.extend_from_slice(req.payload());
        Ok(())
    })
    .unwrap();
}

/// Small calls, up to the exact fit of a ring slot (4,096 bytes of method and payload),
/// map no heap anywhere; the first larger one makes one (mapped by the caller and by the
/// instance); so does the first loan to another instance.
#[test]
fn a_channel_gets_its_request_heap_with_its_first_large_request_only() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let bus = support::TestBus::start();
    let server = bus.connect();
    let (a, b) = (
        server.register("hp", "h1", &[]).unwrap(),
        server.register("hp", "h2", &[]).unwrap(),
    );
    let (stop_a, stop_b) = (a.stop_handle(), b.stop_handle());
    let client = bus.connect();
    std::thread::scope(|s| {
        s.spawn(|| echo(&a));
        s.spawn(|| echo(&b));
        for len in [0usize, 1, 1000, 4096 - 4] {
            let p = vec![1u8; len];
            for _ in 0..2 {
                assert_eq!(client.call("hp", "echo", &p, &opts()).unwrap().payload, p);
            }
        }
        assert_eq!(heaps(), 0, "small calls made a request heap");
        assert_eq!(reply_heaps(), 0, "small replies made a reply heap");
        let large = vec![2u8; 4096 - 3];
        let r = client.call("hp", "echo", &large, &opts()).unwrap();
        assert_eq!(r.payload, large);
        assert_eq!(
            heaps(),
            2,
            "one heap, mapped by its caller and its instance"
        );
        // The reply (4,093 bytes) fits the 4 KiB mailbox: no reply heap yet.
        assert_eq!(reply_heaps(), 0);
        // The next call goes to the other instance (round-robin): its channel's first loan.
        let mut loan = client.loan("hp", 8).unwrap();
        loan.copy_from_slice(b"loanloan");
        let r = client.call_loan("hp", "echo", loan, &opts()).unwrap();
        assert_eq!(&r[..], b"loanloan");
        assert_eq!(heaps(), 4, "a heap per channel");
        // Each large request's block comes back once answered: 24 calls of 6 MiB, 144 MiB
        // in all, go through the two 32 MiB heaps.
        let big = vec![3u8; 6 << 20];
        for i in 0..24 {
            let r = client
                .call("hp", "echo", &big, &opts())
                .unwrap_or_else(|e| panic!("call {i}: {e}"));
            assert_eq!(r.payload.len(), big.len(), "call {i}");
        }
        assert_eq!(heaps(), 4, "no heap more");
        // Their replies went through a reply heap per channel, mapped by the instance
        // (writable) and the caller (read-only).
        assert_eq!(reply_heaps(), 4, "a reply heap per channel");
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let modes: Vec<&str> = maps
            .lines()
            .filter(|l| l.contains("memfd:aegis-reply-heap"))
            .filter_map(|l| l.split_whitespace().nth(1))
            .collect();
        assert_eq!(
            modes.iter().filter(|m| m.starts_with("rw")).count(),
            2,
            "{modes:?}"
        );
        stop_a.stop();
        stop_b.stop();
    });
}

/// A request heap counts to the caller's uid: a bus whose uid quota fits the instance and
/// the channels but not a 32 MiB heap refuses the first large request and the first loan
/// with `LimitExceeded` naming the cap; small calls go on.
#[test]
fn a_request_heap_over_the_uid_s_quota_is_refused_naming_it() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let bus = support::TestBus::start_with(&["--max-shm-per-uid", &(16u64 << 20).to_string()]);
    let server = bus.connect();
    let inst = server.register("hq", "q1", &[]).unwrap();
    let client = bus.connect();
    std::thread::scope(|s| {
        let _stop = StopOnDrop(inst.stop_handle());
        s.spawn(|| echo(&inst));
        assert_eq!(
            client
                .call("hq", "echo", b"small", &opts())
                .unwrap()
                .payload,
            b"small"
        );
        let refused = |e: Error| {
            assert!(
                matches!(e, Error::LimitExceeded(ref m) if m.contains("max-shm-per-uid")),
                "{e:?}"
            )
        };
        refused(
            client
                .call("hq", "echo", &[3u8; 8192], &opts())
                .unwrap_err(),
        );
        refused(client.loan("hq", 8).expect_err("a loan over the quota"));
        assert_eq!(
            client
                .call("hq", "echo", b"still", &opts())
                .unwrap()
                .payload,
            b"still"
        );
    });
}

/// A reply heap counts to the caller's uid: with a quota that fits the instance and the
/// channel but not a 32 MiB heap, a reply larger than a mailbox is answered
/// 429 naming the cap (the broker refused the instance's heap; a second large reply within
/// a second gets the refusal the instance remembered); small replies go on.
#[test]
fn a_reply_heap_over_the_caller_s_quota_is_refused_naming_it() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let bus = support::TestBus::start_with(&["--max-shm-per-uid", &(16u64 << 20).to_string()]);
    let server = bus.connect();
    let inst = server.register("hr", "r1", &[]).unwrap();
    let client = bus.connect();
    std::thread::scope(|s| {
        let _stop = StopOnDrop(inst.stop_handle());
        s.spawn(|| {
            inst.serve(|req, out| {
                // "big": a 64 KiB reply to a small request.
                let n = if req.payload() == b"big" { 64 << 10 } else { 4 };
                out.resize(n, 7);
                Ok(())
            })
            .unwrap()
        });
        assert_eq!(
            client.call("hr", "m", b"x", &opts()).unwrap().payload,
            [7; 4]
        );
        for _ in 0..2 {
            match client.call("hr", "m", b"big", &opts()) {
                Err(Error::Remote {
                    code: 429, message, ..
                }) => {
                    assert!(message.contains("max-shm-per-uid"), "{message}")
                }
                r => panic!("a reply over the caller's quota: {r:?}"),
            }
        }
        assert_eq!(reply_heaps(), 0, "a refused reply heap stayed mapped");
        assert_eq!(
            client.call("hr", "m", b"x", &opts()).unwrap().payload,
            [7; 4]
        );
    });
}
