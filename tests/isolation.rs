//! Isolation in the data plane, attacked by a real process under another uid.
//!
//! The broker runs as root with an access policy that lets uid 65534 (the attacker) call
//! `bank`; the victim (root, this test) calls `bank` too, and two `bank` instances serve
//! it. The attacker is this test binary run again under uid 65534 (`attacker`, ignored
//! unless asked for by name) and tries to write what another party owns; it prints one
//! `RESULT` line that the test reads. Needs root (to set the attacker's uid); without it,
//! says so and returns.

mod support;

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use aegis_client::layout::{SegmentKind, Status};
use aegis_client::proto::{Request, Response};
use aegis_client::{Bus, CallOptions};
use support::{Raw, TestBus};

const ATTACKER: u32 = 65534;
const ENV_DIR: &str = "AEGIS_ISOLATION_DIR";
const ENV_ATTACK: &str = "AEGIS_ISOLATION_ATTACK";
const ENV_TARGETS: &str = "AEGIS_ISOLATION_TARGETS";

const POLICY: &str = r#"
socket_mode = "666"

[[policy]]
services = ["bank"]
call_uids = [65534]
"#;

/// A bus whose socket uid 65534 may reach, with the policy above.
fn policed_bus() -> Option<TestBus> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to run the attacker under another uid");
        return None;
    }
    let policy = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(policy.path(), POLICY).unwrap();
    let bus = TestBus::start_with(&["--config", policy.path().to_str().unwrap()]);
    std::fs::set_permissions(bus.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    Some(bus)
}

/// Runs `attack` in a child of this binary under uid 65534 (no supplementary groups).
fn run_attacker(dir: &Path, attack: &str, targets: &str) -> Output {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args([
        "attacker",
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads",
        "1",
    ])
    .env(ENV_DIR, dir)
    .env(ENV_ATTACK, attack)
    .env(ENV_TARGETS, targets)
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    // SAFETY: between fork and exec only async-signal-safe calls (setgroups, setgid,
    // setuid) on plain values.
    unsafe {
        c.pre_exec(|| {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(ATTACKER) != 0
                || libc::setuid(ATTACKER) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c.output().unwrap()
}

/// The attacker's `RESULT key=value …` line as pairs.
fn result_of(o: &Output) -> Vec<(String, String)> {
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("attacker printed no RESULT (exit {:?}): {out}", o.status));
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn value(r: &[(String, String)], key: &str) -> String {
    r.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("no {key} in {r:?}"))
}

/// Calls `bank` until `n` calls succeeded, each with its own payload back; any failure
/// fails the test.
fn victim_calls(bus: &Bus, n: usize, tag: &str) {
    let opts = CallOptions::timeout(Duration::from_secs(5));
    let mut out = Vec::new();
    for i in 0..n {
        let p = format!("to=alice amount=0010 {tag} #{i}").into_bytes();
        bus.call_into("bank", "echo", &p, &opts, &mut out)
            .unwrap_or_else(|e| panic!("victim call {tag} #{i} failed: {e}"));
        assert_eq!(out, p, "victim call {tag} #{i} got another payload");
    }
}

/// Rows "a permitted caller pins the instances' progress word" and "a caller writes the
/// instance's counters": the attacker gets both instances' segments from the broker (as
/// any caller does) and tries to map them writable, to write through the read-only
/// mapping it has, and to `write(2)` to them. All of that is refused with EPERM/EACCES for
/// the instance's own segment, so the instances stay `Online`, every victim call succeeds
/// with its own payload, and the counters the broker reports are the instances' own.
///
/// On the previous design (one instance segment, mapped writable by every caller) the
/// attacker got a writable mapping and pinned progress / wrote 999999999999 errors.
#[test]
fn a_caller_of_another_uid_cannot_write_an_instance_s_progress_or_counters() {
    let Some(bus) = policed_bus() else { return };
    let _b1 = bus.serve("bank", "b1", &[]);
    let _b2 = bus.serve("bank", "b2", &[]);
    let victim = bus.connect();
    victim_calls(&victim, 10, "before");
    let info = victim.service("bank").unwrap();
    let targets: Vec<String> = info
        .instances
        .iter()
        .map(|i| {
            let inc = instance_incarnation(&victim, i.index);
            format!("{}:{inc}", i.index)
        })
        .collect();
    assert_eq!(targets.len(), 2);
    let dir = bus.path().to_owned();
    let attacker =
        std::thread::spawn(move || run_attacker(&dir, "instance-own", &targets.join(",")));
    // The victim keeps calling while the attacker works (it writes for 1 s if it can).
    let until = Instant::now() + Duration::from_millis(1500);
    let mut rounds = 0;
    while Instant::now() < until && !attacker.is_finished() {
        victim_calls(&victim, 5, &format!("during {rounds}"));
        rounds += 1;
    }
    let out = attacker.join().unwrap();
    assert!(
        out.status.success(),
        "attacker failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let r = result_of(&out);
    assert_eq!(
        value(&r, "own_segments"),
        "2",
        "the attacker got both instances' own segments to try: {r:?}"
    );
    assert_eq!(
        value(&r, "writable"),
        "0",
        "the attacker could write an instance's own memory: {r:?}"
    );
    let refused = value(&r, "refused");
    assert_eq!(
        refused, "6",
        "each own segment: mmap writable, mprotect writable, write(2) refused: {r:?}"
    );
    victim_calls(&victim, 10, "after");
    let info = victim.service("bank").unwrap();
    for i in &info.instances {
        assert_eq!(i.status, Status::Online, "{i:?}");
        assert_eq!(i.requests_failed, 0, "forged error count: {i:?}");
        assert!(i.requests_served < 1_000_000, "forged served count: {i:?}");
    }
}

/// The incarnation of registry instance `index`, as a call to it reports it.
fn instance_incarnation(bus: &Bus, index: u32) -> u64 {
    let opts = CallOptions::timeout(Duration::from_secs(5));
    let mut out = Vec::new();
    for _ in 0..64 {
        let info = bus
            .call_into("bank", "echo", b"x", &opts, &mut out)
            .unwrap();
        if info.instance == index {
            return info.incarnation;
        }
    }
    panic!("no call reached instance #{index}");
}

/// The attacker (run by the tests above under another uid; does nothing when run as part
/// of the suite).
#[test]
#[ignore = "the attacker process of the isolation tests, run by them under another uid"]
fn attacker() {
    let (Ok(dir), Ok(attack)) = (std::env::var(ENV_DIR), std::env::var(ENV_ATTACK)) else {
        return;
    };
    let targets: Vec<(u32, u64)> = std::env::var(ENV_TARGETS)
        .unwrap_or_default()
        .split(',')
        .filter_map(|t| {
            let (i, inc) = t.split_once(':')?;
            Some((i.parse().ok()?, inc.parse().ok()?))
        })
        .collect();
    assert_eq!(
        nix::unistd::getuid().as_raw(),
        ATTACKER,
        "not dropped to the attacker uid"
    );
    match attack.as_str() {
        "instance-own" => attack_instance_own(Path::new(&dir), &targets),
        other => panic!("unknown attack {other}"),
    }
}

/// Asks the broker for each target's segments (a permitted caller may), then tries every
/// way to write the instance-written words (served, progress and failed counters at
/// offsets 64, 72 and 80 of the segment holding them, in the previous design as now).
fn attack_instance_own(dir: &Path, targets: &[(u32, u64)]) {
    // A real caller first: the broker knows us as a client of `bank`.
    let bus = Bus::connect_dir(dir).expect("the attacker may connect");
    bus.call(
        "bank",
        "echo",
        b"hello",
        &CallOptions::timeout(Duration::from_secs(5)),
    )
    .expect("the attacker may call bank");
    let mut raw = Raw::connect(dir).unwrap();
    let (mut own_segments, mut writable, mut refused) = (0, 0, 0);
    let mut errors = Vec::new();
    let mut maps = Vec::new();
    for &(instance, incarnation) in targets {
        let (resp, fds) = raw_open(&mut raw, instance, incarnation);
        assert!(
            matches!(resp, Response::OpenedInstances(_)),
            "OpenInstance refused: {resp:?}"
        );
        for fd in fds {
            // The segment holding the counters: the instance's own segment now, the one
            // instance segment before.
            let kind = segment_kind(&fd);
            if kind != Some(SegmentKind::InstanceOwn as u32)
                && !(kind == Some(SegmentKind::Instance as u32) && fd_count_was_one(instance))
            {
                continue;
            }
            own_segments += 1;
            let len = aegis_client::sys::file_size(&fd).unwrap() as usize;
            // 1. A new writable shared mapping.
            // SAFETY: mmap of a descriptor we hold; the result is checked.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                refused += 1;
                errors.push(format!("mmap:{}", std::io::Error::last_os_error()));
            } else {
                writable += 1;
                maps.push(p as usize);
            }
            // 2. A read-only mapping made writable afterwards.
            // SAFETY: as above.
            let ro = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    0,
                )
            };
            assert_ne!(ro, libc::MAP_FAILED, "a read-only mapping is allowed");
            // SAFETY: mprotect of the mapping made just above.
            if unsafe { libc::mprotect(ro, len, libc::PROT_READ | libc::PROT_WRITE) } != 0 {
                refused += 1;
                errors.push(format!("mprotect:{}", std::io::Error::last_os_error()));
            } else {
                writable += 1;
                maps.push(ro as usize);
            }
            // 3. write(2) at the counters.
            let forged = 999_999_999_999u64.to_le_bytes();
            // SAFETY: pwrite from a local buffer.
            let n = unsafe { libc::pwrite(fd.as_raw_fd(), forged.as_ptr().cast(), 8, 80) };
            if n < 0 {
                refused += 1;
                errors.push(format!("pwrite:{}", std::io::Error::last_os_error()));
            } else {
                writable += 1;
            }
        }
    }
    // What an attacker does with a writable mapping: pin the progress word and forge the
    // counters, for a second.
    let until = Instant::now() + Duration::from_secs(1);
    while !maps.is_empty() && Instant::now() < until {
        for &m in &maps {
            // SAFETY: writable shared mappings of at least a page (segments are larger);
            // offsets 64..88 are inside.
            unsafe {
                std::ptr::write_volatile((m + 72) as *mut u64, 7);
                std::ptr::write_volatile((m + 80) as *mut u64, 999_999_999_999);
            }
        }
    }
    println!(
        "\nRESULT own_segments={own_segments} writable={writable} refused={refused} errors={}",
        errors.join(",").replace(' ', "_")
    );
    drop(bus);
}

/// Whether the previous design's single instance segment is what the broker sends (one
/// descriptor per instance): set by `raw_open`.
fn fd_count_was_one(_: u32) -> bool {
    ONE_FD.load(std::sync::atomic::Ordering::Relaxed)
}

static ONE_FD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn raw_open(raw: &mut Raw, instance: u32, incarnation: u64) -> (Response, Vec<OwnedFd>) {
    let (resp, fds) = raw
        .ask_fds(&Request::OpenInstance {
            instance,
            incarnation,
        })
        .unwrap();
    if let Response::OpenedInstances(ids) = &resp {
        ONE_FD.store(fds.len() == ids.len(), std::sync::atomic::Ordering::Relaxed);
        // Only the asked instance's descriptors (the batch brings the others too).
        let per = fds.len() / ids.len().max(1);
        let at = ids.iter().position(|&(i, _)| i == instance).unwrap_or(0);
        let mine = fds.into_iter().skip(at * per).take(per).collect();
        return (resp, mine);
    }
    (resp, fds)
}

/// The `kind` word of a segment's header, read through a private read-only mapping.
fn segment_kind(fd: &OwnedFd) -> Option<u32> {
    let m = aegis_client::layout::Mapping::map(fd, false).ok()?;
    let _ = fd.as_fd();
    if m.len() < 64 {
        return None;
    }
    let p = m.range(12, 4)?;
    // SAFETY: 4 bytes inside the mapping (checked by `range`).
    Some(unsafe { std::ptr::read_unaligned(p as *const u32) })
}
