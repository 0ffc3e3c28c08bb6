//! A hostile peer process attacks the bus while a well-behaved caller runs echo calls:
//! it truncates and grows every segment it can get hold of, forges requests naming other callers' mailboxes, corrupts a ring it can
//! write, floods unhealthy reports, registers a huge ring, and exhausts client slots and
//! connections. Asserted: the broker lives, every well-behaved call gets its own correct
//! reply, and the attacker gets clear errors.
//!
//! The attacker is this test binary run again (`hostile_peer`, which does nothing unless
//! `AEGIS_HOSTILE_DIR` is set), so it is a real, separate process with the same uid.

mod support;

use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aegis_client::layout::{
    ChannelSeg, InstanceSeg, Mapping, MsgHeader, Party, SegmentKind, PAYLOAD_INLINE,
};
use aegis_client::proto::{Request, Response, ServiceConfig};
use aegis_client::ring::Doorbell;
use aegis_client::{Bus, CallOptions, Error, RegisterOptions};
use support::{Raw, TestBus};

const ENV_DIR: &str = "AEGIS_HOSTILE_DIR";
const ENV_PIDS: &str = "AEGIS_HOSTILE_PIDS";

/// The well-behaved caller and the attacker run side by side; every good call must come
/// back with its own payload.
#[test]
fn a_hostile_peer_crashes_stalls_reads_and_misroutes_nothing() {
    let bus = TestBus::start_with(&["--max-clients", "48", "--max-connections", "96"]);
    let a = bus.serve("echo", "a", &[]);
    let b = bus.serve("echo", "b", &[]);
    let good = bus.connect();
    let (stop, ok, failed) = (AtomicBool::new(false), AtomicU64::new(0), AtomicU64::new(0));
    let report = std::thread::scope(|s| {
        s.spawn(|| {
            let opts = CallOptions {
                attempt_timeout: Duration::from_millis(300),
                ..CallOptions::timeout(Duration::from_secs(10))
            };
            let mut out = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let p = format!("good call {i}").into_bytes();
                match good.call_into("echo", "echo", &p, &opts, &mut out) {
                    Ok(_) => {
                        assert_eq!(out, p, "call {i} got another call's reply");
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        eprintln!("good call {i} failed: {e}");
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                i += 1;
            }
        });
        support::wait_for("good calls before the attack", || {
            ok.load(Ordering::Relaxed) > 100
        });
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "hostile_peer",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(ENV_DIR, bus.path())
            .env(ENV_PIDS, format!("{},{}", a.pid(), b.pid()))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        // The bus still serves after the attacker is gone.
        let base = ok.load(Ordering::Relaxed);
        support::wait_for("good calls after the attack", || {
            ok.load(Ordering::Relaxed) > base + 100
        });
        stop.store(true, Ordering::Relaxed);
        assert!(out.status.success(), "the attacker process failed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    });
    // (The test harness may print its own text before ours on a line.)
    let lines: Vec<&str> = report
        .lines()
        .filter_map(|l| l.find("ATTACK ").map(|i| &l[i..]))
        .collect();
    for l in &lines {
        println!("{l}");
    }
    let line = |name: &str| {
        lines
            .iter()
            .find(|l| l.starts_with(&format!("ATTACK {name}:")))
            .unwrap_or_else(|| panic!("no report for attack {name}: {report}"))
            .to_string()
    };
    assert!(
        line("truncate").contains("0 succeeded"),
        "{}",
        line("truncate")
    );
    assert!(line("forge").contains("published"), "{}", line("forge"));
    assert!(line("corrupt").contains("done"), "{}", line("corrupt"));
    assert!(
        line("reports").contains("rate-limited"),
        "{}",
        line("reports")
    );
    assert!(
        line("huge-ring").contains("--max-ring-bytes"),
        "{}",
        line("huge-ring")
    );
    assert!(
        line("exhaust").contains("--max-clients") || line("exhaust").contains("--max-connections"),
        "{}",
        line("exhaust")
    );
    // The broker lived through it all and answers.
    let fresh = bus.connect();
    assert_eq!(fresh.service("echo").unwrap().instances.len(), 2);
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "well-behaved calls failed"
    );
    println!(
        "{} well-behaved calls, all answered with their own payload",
        ok.load(Ordering::Relaxed)
    );
    drop((a, b));
}

/// The attacker (runs only when started by the test above, which asks for it by name).
#[test]
#[ignore = "the attacker process of the hostile-peer test, run by it"]
fn hostile_peer() {
    let Some(dir) = std::env::var_os(ENV_DIR) else {
        return;
    };
    let dir = Path::new(&dir);
    let pids: Vec<u32> = std::env::var(ENV_PIDS)
        .unwrap()
        .split(',')
        .map(|p| p.parse().unwrap())
        .collect();
    // A legitimate connection first: calling echo maps its instances' segments.
    let me = Bus::connect_dir(dir).unwrap();
    me.call("echo", "echo", b"hi", &CallOptions::default())
        .unwrap();

    // Our own channels, before we map anyone else's.
    let own = echo_channels(&["self".to_string()], Party::Caller);
    // And as their instances map them: we are root here, so we may reopen the read-only
    // reply sides writable (an attacker of another uid cannot: tests/isolation.rs).
    let own_replies = echo_channels(&["self".to_string()], Party::Instance);
    attack_truncate(&pids);
    let rings = echo_rings(&pids);
    let chans = echo_channels(
        &pids.iter().map(u32::to_string).collect::<Vec<_>>(),
        Party::Caller,
    );
    attack_forge(&rings, &chans);
    attack_reports(dir, &rings);
    // Our own channels (the well-behaved caller's we could wreck only because we run as
    // its uid here: tests/isolation.rs has an attacker of another uid).
    attack_corrupt(&rings[0], &own, &own_replies);
    attack_huge_ring(&me);
    attack_exhaust(dir);
    let _ = std::io::stdout().flush();
}

/// Every aegis memfd this process holds, and those of the instance processes (through
/// /proc/PID/fd: we run as the same uid): shrink and grow each.
fn attack_truncate(pids: &[u32]) {
    let (mut tried, mut succeeded) = (0, 0);
    let mut procs = vec!["self".to_string()];
    procs.extend(pids.iter().map(|p| p.to_string()));
    for p in procs {
        for f in memfds_of(&p, "/memfd:aegis-") {
            for len in [0, 1 << 30] {
                tried += 1;
                if f.set_len(len).is_ok() {
                    succeeded += 1;
                }
            }
        }
    }
    assert!(tried > 0, "no segment to attack");
    println!("ATTACK truncate: {tried} resize attempts, {succeeded} succeeded");
}

/// The aegis memfds process `proc` (a pid or `self`) holds open or mapped whose names
/// start with `prefix`, opened read-write through /proc/PROC/fd and /proc/PROC/map_files
/// (as a process of that uid can; map_files also needs CAP_SYS_ADMIN: tests run as root).
/// A memfd mapped several times comes once per mapping.
fn memfds_of(proc: &str, prefix: &str) -> Vec<std::fs::File> {
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for sub in ["fd", "map_files"] {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{proc}/{sub}")) else {
            continue;
        };
        for e in dir.flatten() {
            let Ok(t) = std::fs::read_link(e.path()) else {
                continue;
            };
            if !t.to_string_lossy().starts_with(prefix) {
                continue;
            }
            let Ok(f) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(e.path())
            else {
                continue;
            };
            // One per memfd (by inode).
            use std::os::unix::fs::MetadataExt;
            if f.metadata().is_ok_and(|m| seen.insert(m.ino())) {
                out.push(f);
            }
        }
    }
    out
}

/// The echo instances' rings: their segments opened through /proc/PID/fd of the instance
/// processes (same uid), as any local process of that uid could.
fn echo_rings(pids: &[u32]) -> Vec<InstanceSeg> {
    let mut segs = Vec::new();
    for pid in pids {
        for f in memfds_of(&pid.to_string(), "/memfd:aegis-instance") {
            let fd = OwnedFd::from(f);
            let Ok((_, h)) = Mapping::open(&fd, SegmentKind::Instance, true, None) else {
                continue;
            };
            // The ring alone matters here; a private stand-in for the instance's own
            // segment (which is read-only to everyone but the instance) completes it.
            let (_, own) = InstanceSeg::create_own(h.bus_epoch, h.params[1]).unwrap();
            if let Ok(seg) =
                InstanceSeg::open(&fd, own, h.bus_epoch, h.params[3] as u32, h.params[2])
            {
                segs.push(seg);
            }
        }
    }
    assert_eq!(segs.len(), pids.len(), "echo rings mapped");
    segs
}

/// The channels processes `procs` (pids or `self`) map: for the echo instances every
/// caller's, ours and the well-behaved caller's, their two sides opened through /proc/PID
/// (same uid) and paired by their headers, mapped as `party` maps them (each side
/// writable only by the party that writes it).
fn echo_channels(procs: &[String], party: Party) -> Vec<ChannelSeg> {
    let sides = |name: &str, kind: SegmentKind| {
        let mut found: Vec<(OwnedFd, [u64; 4])> = Vec::new();
        for p in procs {
            for f in memfds_of(p, name) {
                let fd = OwnedFd::from(f);
                if let Ok((_, h)) = Mapping::open(&fd, kind, false, None) {
                    found.push((fd, h.params));
                }
            }
        }
        found
    };
    let reqs = sides("/memfd:aegis-channel", SegmentKind::Channel);
    let reps = sides("/memfd:aegis-reply", SegmentKind::Reply);
    let mut chans: Vec<ChannelSeg> = Vec::new();
    for (req, params) in &reqs {
        let Some((rep, _)) = reps.iter().find(|(_, p)| p == params) else {
            continue;
        };
        let (_, h) = Mapping::open(req, SegmentKind::Channel, false, None).unwrap();
        if let Ok(c) = ChannelSeg::open(req, rep, h.bus_epoch, None, party) {
            if chans.iter().all(|k| k.id != c.id) {
                chans.push(c);
            }
        }
    }
    assert!(chans.len() >= 2, "echo channels mapped: {}", chans.len());
    chans
}

/// The request headers in the channels' slots that a caller wrote (they carry its
/// secret), each read as a volatile copy of whatever the slot holds now.
fn slot_headers(chans: &[ChannelSeg]) -> impl Iterator<Item = MsgHeader> + '_ {
    chans.iter().flat_map(|seg| {
        (0..seg.layout.slot_count as usize).filter_map(move |i| {
            // SAFETY: slot `i` is inside the mapped ring; its header follows the 16 bytes
            // of control words.
            let h: MsgHeader = unsafe {
                (seg.slots_base().add(i * seg.layout.slot_stride() + 16) as *const MsgHeader)
                    .read_volatile()
            };
            (h.secret != 0).then_some(h)
        })
    })
}

/// Requests whose headers name the well-behaved caller's mailboxes (identities read from
/// the channels' slot headers) with the generations its next calls will use, published
/// in every channel we could map (the well-behaved caller's included: we are its uid
/// here), for a second: without nonces an instance would answer one of them into a
/// pending call's mailbox, and that call would get "FORGED" back.
fn attack_forge(rings: &[InstanceSeg], chans: &[ChannelSeg]) {
    let mut published = 0;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(1) {
        let seen: std::collections::HashSet<_> = slot_headers(chans)
            .map(|h| (h.client_index, h.client_gen, h.mailbox, h.mailbox_gen))
            .collect();
        for ch in chans {
            let ring = ch.ring();
            let bell = rings
                .iter()
                .find(|r| r.index == ch.instance)
                .map(|r| Doorbell(r.ring_indices()));
            for &(client, cgen, mailbox, mgen) in &seen {
                for ahead in 0..4 {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let Ok(mut c) = ring.try_claim() else {
                        continue;
                    };
                    let body = b"echoFORGED";
                    c.set_header(MsgHeader {
                        client_index: client,
                        client_gen: cgen,
                        mailbox,
                        mailbox_gen: mgen.wrapping_add(ahead),
                        payload_len: 6,
                        method_len: 4,
                        kind: PAYLOAD_INLINE,
                        nonce: seed,
                        secret: seed.rotate_left(17),
                        ..Default::default()
                    });
                    c.data()[..body.len()].copy_from_slice(body);
                    c.publish();
                    published += 1;
                    if let Some(b) = bell {
                        b.ring(Doorbell::bit(ch.id));
                    }
                }
            }
        }
    }
    println!("ATTACK forge: {published} forged requests published");
}

/// Report both echo instances unhealthy again and again.
fn attack_reports(dir: &Path, rings: &[InstanceSeg]) {
    let mut raw = Raw::connect(dir).unwrap();
    let instances: Vec<(u32, u64)> = rings.iter().map(|s| (s.index, s.incarnation)).collect();
    // Open them on this connection, as a caller would.
    let (mut done, mut refused, mut last) = (0, 0, String::new());
    for i in &instances {
        let _ = raw.ask(&Request::OpenInstance {
            instance: i.0,
            incarnation: i.1,
        });
    }
    for _ in 0..500 {
        for i in &instances {
            match raw
                .ask(&Request::ReportUnhealthy {
                    instance: i.0,
                    incarnation: i.1,
                    reason: "hostile".into(),
                })
                .unwrap()
            {
                Response::Done => done += 1,
                Response::Error(e) => {
                    refused += 1;
                    last = Error::from(e).to_string();
                }
                other => panic!("{other:?}"),
            }
        }
    }
    println!("ATTACK reports: {done} accepted for checking, {refused} rate-limited or refused; last: {last}");
}

/// Garbage into an instance's doorbell (bits, `scanning` word, sleepers, futex) and into
/// every channel's positions and sequences.
fn attack_corrupt(bell: &InstanceSeg, chans: &[ChannelSeg], replies: &[ChannelSeg]) {
    let b = bell.ring_indices();
    b.hint.store(u64::MAX, Ordering::Relaxed);
    // The `scanning` word, flipped: callers then set no bit (or set one needlessly).
    b.enqueue_pos.fetch_xor(1, Ordering::Relaxed);
    b.sleepers.store(u32::MAX, Ordering::Relaxed);
    b.wake.fetch_add(1, Ordering::Relaxed);
    let _ = aegis_client::sys::futex_wake(&b.wake, u32::MAX);
    for seg in chans {
        corrupt_channel(seg, replies.iter().find(|r| r.id == seg.id));
    }
    println!(
        "ATTACK corrupt: done (instance #{} and {} channels)",
        bell.index,
        chans.len()
    );
}

/// Garbage into both sides of a channel: `seg` mapped as its caller (the request side's
/// position and the slots' published words) and `theirs` as its instance (the reply
/// side's position, freed words and the taken-up word), as a peer of both would.
fn corrupt_channel(seg: &ChannelSeg, theirs: Option<&ChannelSeg>) {
    seg.request_indices()
        .enqueue_pos
        .store(0xdead_beef_0000, Ordering::Relaxed);
    // The slot words: every sequence far ahead.
    let base = seg.slots_base();
    for i in 0..seg.layout.slot_count as usize {
        // SAFETY: slot `i` lies inside the mapped ring (i < slot_count); its first word is
        // the atomic sequence, written here as a hostile peer would.
        let seq = unsafe { &*(base.add(i * seg.layout.slot_stride()) as *const AtomicU64) };
        seq.store(0x7777_0000 + i as u64, Ordering::Relaxed);
    }
    if let Some(t) = theirs {
        t.reply_indices()
            .dequeue_pos
            .store(0x0bad_f00d, Ordering::Relaxed);
        for i in 0..t.layout.slot_count as usize {
            // SAFETY: freed word `i` lies inside the mapped reply side (i < slot_count).
            let w = unsafe { &(*t.freed_base().add(i)).seq };
            w.store(0x5555_0000 + i as u64, Ordering::Relaxed);
        }
    }
}

fn attack_huge_ring(me: &Bus) {
    let e = me
        .register_with(
            "huge",
            "h1",
            RegisterOptions {
                config: ServiceConfig {
                    slot_size: Some(1 << 16),
                    slot_count: Some(1 << 16),
                    max_message: None,
                },
                ..Default::default()
            },
        )
        .map(drop)
        .unwrap_err();
    println!("ATTACK huge-ring: refused: {e}");
}

/// Connections until the broker refuses, holding them all.
fn attack_exhaust(dir: &Path) {
    let mut held = Vec::new();
    let mut last = String::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        match Raw::connect(dir) {
            Ok(r) => held.push(r),
            Err(e) => {
                last = e.to_string();
                break;
            }
        }
    }
    println!(
        "ATTACK exhaust: held {} connections; then: {last}",
        held.len()
    );
    drop(held);
}

/// A caller that claims slots of its channel and never publishes (with no pid recorded,
/// or its own live pid) holds up only its own channel: other callers' requests are
/// served at once. (Before channels, every caller shared the instance's ring: a pidless
/// slot held everyone's requests for 1 s, a live producer's for as long as it lived.)
#[test]
fn a_slot_claimed_and_never_published_holds_up_no_other_caller() {
    let bus = TestBus::start();
    let inst = bus.serve("stuck", "s1", &[]);
    let client = bus.connect();
    let opts = CallOptions::timeout(Duration::from_secs(10));
    client.call("stuck", "m", b"warm", &opts).unwrap();
    let rings = echo_rings(&[inst.pid()]);
    // A caller of its own (a raw connection) opens the instance and gets its channel.
    let mut raw = Raw::connect(bus.path()).unwrap();
    let (resp, fds) = raw
        .ask_fds(&Request::OpenInstance {
            instance: rings[0].index,
            incarnation: rings[0].incarnation,
        })
        .unwrap();
    assert!(matches!(resp, Response::OpenedInstances(_)), "{resp:?}");
    let (_, h) = Mapping::open(&fds[2], SegmentKind::Channel, true, None).unwrap();
    let chan = ChannelSeg::open(&fds[2], &fds[3], h.bus_epoch, None, Party::Caller).unwrap();
    let ring = chan.ring();
    let pidless = ring.try_claim().unwrap();
    let live = ring.try_claim().unwrap();
    Doorbell(rings[0].ring_indices()).ring(Doorbell::bit(chan.id));
    // Well under the 1 s a pidless slot held the shared ring.
    let short = CallOptions::timeout(Duration::from_millis(500));
    for i in 0..50u32 {
        let p = format!("past a stuck channel {i}");
        let r = client.call("stuck", "m", p.as_bytes(), &short).unwrap();
        assert_eq!(r.payload, p.as_bytes());
    }
    drop(live);
    std::mem::forget(pidless);
}

/// A resuming `Hello` hands its client segment back for the broker to stamp a fresh header
/// into. One that is not a sealed client segment (here: a memfd of the right size whose
/// size is not sealed, which its sender could shrink under the broker's mapping, and one of
/// the wrong size) is refused with `BadRequest` naming the seal or the size, and the
/// broker goes on serving. (Before the heaps moved into the channels, the broker took the
/// layout from the resumed heap and checked both.)
#[test]
fn a_resuming_client_handing_back_a_segment_that_is_not_its_own_is_refused() {
    use std::os::fd::AsFd;
    let bus = TestBus::start();
    let hello = |resume| Request::Hello {
        protocol: aegis_client::proto::PROTOCOL_VERSION,
        layout: aegis_client::layout::LAYOUT_VERSION,
        mailboxes: 1,
        resume,
        secret: 7,
    };
    let unsealed = aegis_client::sys::memfd("not-a-client", 4096).unwrap();
    let small = aegis_client::sys::memfd("not-a-client", 64).unwrap();
    aegis_client::sys::seal_size(&small).unwrap();
    for (fd, why) in [(&unsealed, "seal"), (&small, "4096")] {
        let mut raw = Raw::open(bus.path()).unwrap();
        match raw
            .ask_with_fds(&hello(Some((0, 1))), &[fd.as_fd()])
            .unwrap()
        {
            Response::Error(e) => {
                let e = format!("{e:?}");
                assert!(e.contains("BadRequest") && e.contains(why), "{e}");
            }
            other => panic!("a resuming client's {why} segment was adopted: {other:?}"),
        }
    }
    // The broker goes on: a client connects and a call goes through.
    let _echo = bus.serve("echo", "e1", &[]);
    let client = bus.connect();
    let r = client
        .call(
            "echo",
            "echo",
            b"still",
            &CallOptions::timeout(Duration::from_secs(10)),
        )
        .unwrap();
    assert_eq!(r.payload, b"still");
}
