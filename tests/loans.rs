//! Zero-copy loans with a real broker: a request written in place in the request heap of
//! the caller's channel to one instance ([`Bus::loan`]) is read in place by the handler, a reply written in place in the
//! instance's reply heap ([`Request::loan_reply`]) is read in place by the caller
//! ([`BorrowedReply`]), and every block goes back where it came from.

mod support;

use std::time::Duration;

use aegis_client::{Bus, BusOptions, CallOptions, Error, Instance};
use support::{mapping_of, offset_in_mapping};

fn opts() -> CallOptions {
    CallOptions::timeout(Duration::from_secs(10))
}

/// Byte `i` of a call's pattern.
fn pattern(seed: u8, i: usize) -> u8 {
    (i % 251) as u8 ^ seed
}

/// Serves `n` requests (or until stopped) answering each with a loaned reply: the request's
/// bytes reversed, written in place. Records where the request and the reply lay.
/// Where a request was read: its mapping, its offset in that mapping, and the reply's
/// mapping.
type Seen = std::sync::Mutex<Vec<(String, usize, String)>>;

fn serve_loaned(inst: &Instance, seen: &Seen) {
    let mut rx = inst.receiver();
    while let Some(req) = rx.recv(Some(Duration::from_secs(30))).unwrap() {
        if req.method() == "fail" {
            req.reply_error(418, "asked to fail").unwrap();
            continue;
        }
        let n = req.payload().len();
        let mut loan = req.loan_reply(n).unwrap();
        for (o, i) in loan.iter_mut().zip(req.payload().iter().rev()) {
            *o = *i;
        }
        seen.lock().unwrap().push((
            mapping_of(req.payload()),
            offset_in_mapping(req.payload()),
            mapping_of(&loan),
        ));
        req.reply_loan(loan).unwrap();
    }
}

#[test]
fn a_loaned_request_and_a_loaned_reply_are_read_where_they_were_written() {
    let bus = support::TestBus::start();
    let server = bus.connect();
    let inst = server.register("zc", "z1", &[]).unwrap();
    let stop = inst.stop_handle();
    let client = bus.connect();
    let seen = std::sync::Mutex::new(Vec::new());
    let mut loaned_at = Vec::new();
    std::thread::scope(|s| {
        s.spawn(|| serve_loaned(&inst, &seen));
        // Sizes around the inline limits and far above them, up to the 16 MiB maximum.
        for (k, len) in [0usize, 1, 100, 4096, 256 << 10, 16 << 20]
            .into_iter()
            .enumerate()
        {
            let mut loan = client.loan("zc", len).unwrap();
            assert_eq!(loan.len(), len);
            assert!(
                mapping_of(&loan).contains("memfd:aegis-heap") || len == 0,
                "a loan is not in the caller's request heap: {}",
                mapping_of(&loan)
            );
            for (i, b) in loan.iter_mut().enumerate() {
                *b = pattern(k as u8, i);
            }
            loaned_at.push(offset_in_mapping(&loan));
            let reply = client.call_loan("zc", "rev", loan, &opts()).unwrap();
            assert_eq!(reply.len(), len, "reply length for a {len}-byte request");
            assert!(
                reply
                    .iter()
                    .enumerate()
                    .all(|(i, &b)| b == pattern(k as u8, len - 1 - i)),
                "reply bytes of the {len}-byte call are not the request reversed"
            );
            assert_eq!(reply.instance_id(), "z1");
            // The other faces of the same bytes.
            assert_eq!(AsRef::<[u8]>::as_ref(&reply), reply.bytes());
            assert_eq!(reply.bytes().len(), len);
            let shown = format!("{reply:?}");
            assert!(
                shown.contains("BorrowedReply") && shown.contains(&format!("len: {len}")),
                "{shown}"
            );
            if len > 0 {
                assert!(
                    mapping_of(&reply).contains("memfd:aegis-reply-heap"),
                    "the reply is not read in the channel's reply heap: {}",
                    mapping_of(&reply)
                );
            }
            assert!(reply.is_intact());
        }
        stop.stop();
    });
    let seen = seen.into_inner().unwrap();
    assert_eq!(seen.len(), 6);
    for ((req_at, off, reply_at), loaned) in seen[1..].iter().zip(&loaned_at[1..]) {
        assert!(
            req_at.contains("memfd:aegis-heap"),
            "the handler did not read the loan in place: {req_at}"
        );
        // ...the very bytes the caller wrote, not a copy elsewhere in the heap.
        assert_eq!(
            off, loaned,
            "the loan was copied before the handler read it"
        );
        // ...through a read-only mapping: the caller's heap is sealed against other writers.
        assert!(
            req_at
                .split_whitespace()
                .nth(1)
                .is_some_and(|p| p.starts_with("r-")),
            "the instance maps the caller's heap writable: {req_at}"
        );
        assert!(
            reply_at.contains("memfd:aegis-reply-heap"),
            "the reply loan is not in the channel's reply heap: {reply_at}"
        );
    }
}

#[test]
fn loans_and_borrowed_replies_give_their_memory_back() {
    let bus = support::TestBus::start();
    let server = bus.connect();
    let inst = server.register("zc", "z1", &[]).unwrap();
    let stop = inst.stop_handle();
    // Two mailboxes: a borrowed reply or an error that kept one would run them out.
    let client = bus.connect_with(BusOptions {
        mailboxes: 2,
        ..BusOptions::default()
    });
    let other = bus.connect();
    let seen = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        s.spawn(|| serve_loaned(&inst, &seen));
        // The request heap holds 32 MiB (twice the 16 MiB maximum): a leaked 12 MiB block
        // per call would fail the third loan.
        for i in 0..8u8 {
            let mut loan = client.loan("zc", 12 << 20).unwrap();
            loan[0] = i;
            let r = client.call_loan("zc", "rev", loan, &opts()).unwrap();
            assert_eq!(r[r.len() - 1], i);
        }
        // A loan dropped unsent frees its block too.
        for _ in 0..8 {
            drop(client.loan("zc", 12 << 20).unwrap());
        }
        // Error answers release their mailbox.
        for _ in 0..8 {
            let loan = client.loan("zc", 64).unwrap();
            match client.call_loan("zc", "fail", loan, &opts()) {
                Err(Error::Remote { code, message, .. }) => {
                    assert_eq!((code, message.as_str()), (418, "asked to fail"))
                }
                r => panic!("expected the handler's 418, got {r:?}"),
            }
        }
        // A held reply keeps its bytes while other calls reuse the reply heap; two held
        // replies hold both mailboxes, and dropping one lets the next call through.
        let held = client
            .call_borrowed("zc", "rev", &[7u8; 8192], &opts())
            .unwrap();
        for _ in 0..20 {
            let r = other
                .call_borrowed("zc", "rev", &[9u8; 8192], &opts())
                .unwrap();
            assert!(r.iter().all(|&b| b == 9));
        }
        assert!(held.iter().all(|&b| b == 7) && held.is_intact());
        let second = client
            .call_borrowed("zc", "rev", &[1u8; 100], &opts())
            .unwrap();
        match client.call_borrowed("zc", "rev", &[2u8; 100], &opts()) {
            Err(Error::LimitExceeded(m)) => assert!(m.contains("mailboxes"), "{m}"),
            r => panic!("a third call with both mailboxes held: {r:?}"),
        }
        drop(held);
        let third = client
            .call_borrowed("zc", "rev", &[3u8; 100], &opts())
            .unwrap();
        assert_eq!((&second[..4], &third[..4]), (&[1u8; 4][..], &[3u8; 4][..]));
        stop.stop();
    });
}

#[test]
fn loans_refuse_what_they_cannot_carry() {
    let bus = support::TestBus::start();
    let server = bus.connect();
    let inst = server.register("zc", "z1", &[]).unwrap();
    let stop = inst.stop_handle();
    let client = bus.connect();
    let other: Bus = bus.connect();
    std::thread::scope(|s| {
        s.spawn(|| {
            // Two receivers of one instance: the first request is held while the second
            // is taken.
            let (mut rx1, mut rx2) = (inst.receiver(), inst.receiver());
            let wait = Some(Duration::from_secs(30));
            let req = rx1.recv(wait).unwrap().expect("the too-large call");
            let e = req.loan_reply((16 << 20) + 1).unwrap_err();
            assert!(matches!(e, Error::MessageTooLarge { .. }), "{e:?}");
            req.reply(b"refused").unwrap();
            let held = rx1.recv(wait).unwrap().expect("the first held call");
            let req = rx2.recv(wait).unwrap().expect("the second held call");
            let loan = req.loan_reply(3).unwrap();
            let e = held.reply_loan(loan).unwrap_err();
            assert!(
                matches!(e, Error::BadRequest(ref m) if m.contains("another request")),
                "{e:?}"
            );
            req.reply(b"second").unwrap();
        });
        assert_eq!(
            client
                .call("zc", "too-large", b"x", &opts())
                .unwrap()
                .payload,
            b"refused"
        );
        // A loan belongs to the connection that made it.
        let loan = other.loan("zc", 16).unwrap();
        match client.call_loan("zc", "m", loan, &opts()) {
            Err(Error::BadRequest(m)) => assert!(m.contains("another bus"), "{m}"),
            r => panic!("a foreign loan was sent: {r:?}"),
        }
        // A loan is for the service it was made for.
        let loan = client.loan("zc", 16).unwrap();
        match client.call_loan("other", "m", loan, &opts()) {
            Err(Error::BadRequest(m)) => assert!(m.contains("made for service 'zc'"), "{m}"),
            r => panic!("a loan was sent to another service: {r:?}"),
        }
        // More than the service's largest message; more than the channel's request heap
        // (twice that) holds.
        match client.loan("zc", 64 << 20) {
            Err(Error::MessageTooLarge { size, max, .. }) => {
                assert_eq!((size, max), (64 << 20, 16 << 20))
            }
            r => panic!("a 64 MiB loan: {r:?}"),
        }
        let held = [
            client.loan("zc", 12 << 20).unwrap(),
            client.loan("zc", 12 << 20).unwrap(),
        ];
        match client.loan("zc", 12 << 20) {
            Err(Error::LimitExceeded(m)) => assert!(m.contains("request heap"), "{m}"),
            r => panic!("a third 12 MiB loan: {r:?}"),
        }
        drop(held);
        // Nor is there a loan for a service without instances.
        match client.loan("nobody", 8) {
            Err(Error::NoAvailableInstance { service }) => assert_eq!(service, "nobody"),
            r => panic!("a loan for a service nobody serves: {r:?}"),
        }
        // Two calls in flight: the first is held by the handler while it tries to answer
        // it with the second's loan (refused); the first then gets the internal error of a
        // dropped request, the second its reply.
        let p1 = client.submit("zc", "hold", b"1", &opts()).unwrap();
        let p2 = client.submit("zc", "hold", b"2", &opts()).unwrap();
        let (mut o1, mut o2) = (Vec::new(), Vec::new());
        p2.wait(&mut o2).unwrap();
        assert_eq!(o2, b"second");
        match p1.wait(&mut o1) {
            Err(Error::Remote { code, .. }) => assert_eq!(code, 500),
            r => panic!("the held first request: {r:?}"),
        }
        stop.stop();
    });
}

/// A loan lies in the heap of the channel to the instance the next call would go to, and
/// the call goes there: two loans made in turn go to the service's two instances. When
/// the loan's instance has left by the time of the call, the call goes to the other one,
/// with the bytes copied into that channel's heap (correct, if not zero-copy); so does a
/// call that excludes it.
#[test]
fn a_loan_goes_to_its_instance_or_is_copied_to_another() {
    let bus = support::TestBus::start();
    let server = bus.connect();
    let (a, b) = (
        server.register("zc", "z1", &[]).unwrap(),
        server.register("zc", "z2", &[]).unwrap(),
    );
    let stop_b = b.stop_handle();
    let client = bus.connect();
    let seen = &std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        let stop_a = a.stop_handle();
        // z1 leaves the service once stopped.
        let serving_a = s.spawn(move || {
            serve_loaned(&a, seen);
            a.unregister().unwrap();
        });
        s.spawn(|| serve_loaned(&b, seen));
        let fill = |seed: u8| {
            let mut loan = client.loan("zc", 64 << 10).unwrap();
            for (i, x) in loan.iter_mut().enumerate() {
                *x = pattern(seed, i);
            }
            loan
        };
        let check = |r: &aegis_client::BorrowedReply, seed: u8| {
            let n = r.len();
            assert_eq!(n, 64 << 10);
            assert!(
                r.iter()
                    .enumerate()
                    .all(|(i, &x)| x == pattern(seed, n - 1 - i)),
                "reply to loan {seed} is not its request reversed"
            );
        };
        // In turn: one loan per instance, each answered by the instance it was made for.
        let (l1, l2) = (fill(1), fill(2));
        let (r1, r2) = (
            client.call_loan("zc", "rev", l1, &opts()).unwrap(),
            client.call_loan("zc", "rev", l2, &opts()).unwrap(),
        );
        check(&r1, 1);
        check(&r2, 2);
        assert_ne!(r1.instance_id(), r2.instance_id());
        drop((r1, r2));
        // A loan made for z1 but called with z1 excluded goes to z2 (copied there), as
        // does the one made for z2.
        let away = CallOptions {
            exclude: vec!["z1".into()],
            ..opts()
        };
        let (l5, l6) = (fill(5), fill(6));
        for (l, seed) in [(l5, 5), (l6, 6)] {
            let r = client.call_loan("zc", "rev", l, &away).unwrap();
            check(&r, seed);
            assert_eq!(
                r.instance_id(),
                "z2",
                "loan {seed} went to an excluded instance"
            );
        }
        // Two more; then z1 leaves: both calls are answered by z2.
        let (l3, l4) = (fill(3), fill(4));
        stop_a.stop();
        serving_a.join().unwrap();
        for (l, seed) in [(l3, 3), (l4, 4)] {
            let r = client.call_loan("zc", "rev", l, &opts()).unwrap();
            check(&r, seed);
            assert_eq!(r.instance_id(), "z2");
        }
        stop_b.stop();
    });
}

/// A loaned call in doubt (its instance took it and did not answer in time) is not sent
/// again, even when idempotent: the block is held by the mailbox's quarantine until the
/// late reply lands, and one block has one owner. (Sent again, the late reply would free
/// a block the loan frees too.)
#[test]
fn a_loaned_call_in_doubt_is_not_sent_again_even_when_idempotent() {
    let bus = support::TestBus::start();
    let _slow = bus.serve("lz", "slow", &["--delay-ms", "3000"]);
    let client = bus.connect();
    // Made while only the slow instance serves: the loan lies in its channel.
    let mut loan = client.loan("lz", 64 << 10).unwrap();
    loan.fill(7);
    let _fast = bus.serve("lz", "fast", &[]);
    support::wait_for("the second instance", || {
        client.routable_instances("lz").len() == 2
    });
    let opts = CallOptions {
        idempotent: true,
        // Long enough for the slow instance to take the request even on a loaded host
        // (untaken, it would be withdrawn and rightly sent to the other instance).
        attempt_timeout: Duration::from_secs(1),
        ..opts()
    };
    match client.call_loan("lz", "m", loan, &opts) {
        Err(Error::Timeout { attempts, .. }) => {
            assert_eq!(attempts.len(), 1, "{attempts:?}");
            assert_eq!(attempts[0].instance, "slow");
        }
        other => panic!(
            "expected a Timeout without a second attempt, got {:?}",
            other.map(|r| r.instance_id().to_owned())
        ),
    }
}

/// A loan for a resource ([`Bus::loan_resource`]) lies in the channel to the resource's
/// owner, and [`Bus::call_resource_loan`] takes it there: the owner's handler reads it in
/// place and the reply is read in place. A loan is sent only the way it was made for.
#[test]
fn a_loan_for_a_resource_is_read_in_place_by_its_owner() {
    let bus = support::TestBus::start();
    let server = bus.connect();
    let (a, b) = (
        server.register("zc", "z1", &[]).unwrap(),
        server.register("zc", "z2", &[]).unwrap(),
    );
    b.claim(&["acct-7"]).unwrap();
    let (stop_a, stop_b) = (a.stop_handle(), b.stop_handle());
    let client = bus.connect();
    let seen = &std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        s.spawn(|| serve_loaned(&a, seen));
        s.spawn(|| serve_loaned(&b, seen));
        let len = 256 << 10;
        let mut offsets = Vec::new();
        // Round-robin would alternate: every one of these goes to the owner, z2.
        for seed in 0..4u8 {
            let mut loan = client.loan_resource("acct-7", len).unwrap();
            assert!(mapping_of(&loan).contains("memfd:aegis-heap"));
            for (i, x) in loan.iter_mut().enumerate() {
                *x = pattern(seed, i);
            }
            offsets.push(offset_in_mapping(&loan));
            let r = client
                .call_resource_loan("acct-7", "rev", loan, &opts())
                .unwrap();
            assert_eq!(r.instance_id(), "z2", "loan {seed} missed the owner");
            assert!(
                r.iter()
                    .enumerate()
                    .all(|(i, &x)| x == pattern(seed, len - 1 - i)),
                "reply to resource loan {seed} is not its request reversed"
            );
        }
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 4);
        for ((req_at, off, _), loaned) in seen.iter().zip(&offsets) {
            assert!(req_at.contains("memfd:aegis-heap"), "{req_at}");
            assert_eq!(
                off, loaned,
                "the resource loan was copied before it was read"
            );
        }
        // Each loan goes only the way it was made for.
        let bad = |r: Result<aegis_client::BorrowedReply, Error>, want: &str| match r {
            Err(Error::BadRequest(m)) => assert!(m.contains(want), "{m}"),
            r => panic!("expected BadRequest naming {want:?}, got {r:?}"),
        };
        let for_resource = client.loan_resource("acct-7", 8).unwrap();
        bad(
            client.call_loan("zc", "rev", for_resource, &opts()),
            "call_resource_loan",
        );
        let for_service = client.loan("zc", 8).unwrap();
        bad(
            client.call_resource_loan("acct-7", "rev", for_service, &opts()),
            "loan_resource",
        );
        b.claim(&["acct-8"]).unwrap();
        let for_7 = client.loan_resource("acct-7", 8).unwrap();
        bad(
            client.call_resource_loan("acct-8", "rev", for_7, &opts()),
            "'acct-7', not 'acct-8'",
        );
        match client.loan_resource("acct-none", 8) {
            Err(Error::ResourceNotFound { resource }) => assert_eq!(resource, "acct-none"),
            r => panic!("a loan for an unowned id: {r:?}"),
        }
        stop_a.stop();
        stop_b.stop();
    });
}

/// Loaned requests can be pipelined ([`Bus::submit_loan`]): several in flight at once, each
/// read in place by the handler, each reply read in place
/// ([`aegis_client::Pending::wait_borrowed`]); the request heap gets every block back,
/// also from a pending call dropped unread.
#[test]
fn loaned_requests_are_pipelined_and_their_blocks_come_back() {
    let bus = support::TestBus::start();
    let server = bus.connect();
    let inst = server.register("zc", "z1", &[]).unwrap();
    let stop = inst.stop_handle();
    let client = bus.connect();
    let seen = &std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        s.spawn(|| serve_loaned(&inst, seen));
        let len = 3 << 20;
        for round in 0..4u8 {
            // Eight 3 MiB loans in flight per round, their replies unread until waited for
            // (24 MiB of the channel's 32 MiB reply heap: with one reply heap per
            // instance, a uid's unread replies were capped at 16 MiB and this failed);
            // the ten loans at the end take 30 of the request heap's 32 MiB: a block not
            // given back fails them.
            let mut offsets = Vec::new();
            let pending: Vec<_> = (0..8u8)
                .map(|k| {
                    let seed = round * 8 + k;
                    let mut loan = client.loan("zc", len).unwrap();
                    for (i, x) in loan.iter_mut().enumerate() {
                        *x = pattern(seed, i);
                    }
                    offsets.push(offset_in_mapping(&loan));
                    (
                        seed,
                        client.submit_loan("zc", "rev", loan, &opts()).unwrap(),
                    )
                })
                .collect();
            for (n, (seed, p)) in pending.into_iter().enumerate() {
                if round == 3 && n % 2 == 1 {
                    // Dropped unread: the call is cancelled or its reply discarded, and
                    // its block still comes back.
                    drop(p);
                    continue;
                }
                let r = p.wait_borrowed().unwrap();
                assert!(
                    r.iter()
                        .enumerate()
                        .all(|(i, &x)| x == pattern(seed, len - 1 - i)),
                    "reply to pipelined loan {seed} is not its request reversed"
                );
            }
            let mut seen = seen.lock().unwrap();
            for (req_at, off, _) in seen.drain(..) {
                assert!(req_at.contains("memfd:aegis-heap"), "{req_at}");
                assert!(
                    offsets.contains(&off),
                    "the handler read a copy, at {off}, not one of the loans {offsets:?}"
                );
            }
        }
        // The one serving thread answers in order: once this call is answered, the
        // dropped calls are settled (declined, or answered late).
        client.call("zc", "rev", b"x", &opts()).unwrap();
        // Everything came back: the whole heap's worth of loans again.
        let all: Vec<_> = (0..10).map(|_| client.loan("zc", len).unwrap()).collect();
        drop(all);
        // A loan made for another service is refused.
        let loan = client.loan("zc", 8).unwrap();
        match client.submit_loan("other", "rev", loan, &opts()) {
            Err(Error::BadRequest(m)) => assert!(m.contains("'zc', not 'other'"), "{m}"),
            r => panic!("{:?}", r.map(|_| ())),
        }
        stop.stop();
    });
}
