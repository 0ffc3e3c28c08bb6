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

[[policy]]
services = ["pub"]
serve_uids = [65534]

[[policy]]
services = ["vault"]
"#;

/// A bus whose socket uid 65534 may reach, with the policy above, and the address of its
/// HTTP listener (for `/metrics`).
fn policed_bus() -> Option<(TestBus, String)> {
    policed_bus_with(&[])
}

fn policed_bus_with(extra: &[&str]) -> Option<(TestBus, String)> {
    if !support::root("needs root to run the attacker under another uid") {
        return None;
    }
    let dir = tempfile::Builder::new()
        .prefix("aegis-test-")
        .tempdir()
        .unwrap();
    std::fs::write(dir.path().join("broker.toml"), POLICY).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (broker, addr) = policed_broker(dir.path(), extra);
    Some((TestBus { dir, broker }, addr))
}

/// Starts the broker of a policed bus in `dir` (its policy written there).
fn policed_broker(dir: &Path, extra: &[&str]) -> (support::Reaped, String) {
    let mut c = Command::new(support::broker_bin());
    c.arg("--dir")
        .arg(dir)
        .arg("--config")
        .arg(dir.join("broker.toml"))
        .args([
            "--log",
            "warn",
            "--http-listen",
            "127.0.0.1:0",
            "--http-metrics-open",
        ])
        .args(extra);
    support::start_http_broker(c)
}

/// `/metrics`, as text.
fn metrics(addr: &str) -> String {
    let (status, body) = support::http_get(addr, "/metrics", None);
    assert_eq!(status, 200, "{body}");
    body
}

/// The value of the sample line starting with `prefix` (0 when there is none).
fn sample(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// Runs `attack` in a child of this binary under uid 65534 (no supplementary groups).
fn run_attacker(dir: &Path, attack: &str, targets: &str) -> Output {
    attacker_command(dir, attack, targets).output().unwrap()
}

fn attacker_command(dir: &Path, attack: &str, targets: &str) -> Command {
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
    c
}

/// The attacker's `RESULT key=value …` line as pairs.
fn result_of(o: &Output) -> Vec<(String, String)> {
    result_of_text(&String::from_utf8_lossy(&o.stdout))
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
    victim_calls_of(bus, n, tag, 0)
}

/// As [`victim_calls`], each payload padded to at least `size` bytes.
fn victim_calls_of(bus: &Bus, n: usize, tag: &str, size: usize) {
    victim_calls_within(bus, n, tag, size, Duration::from_secs(5))
}

/// As [`victim_calls_of`], each call within `deadline`.
fn victim_calls_within(bus: &Bus, n: usize, tag: &str, size: usize, deadline: Duration) {
    let opts = CallOptions::timeout(deadline);
    let mut out = Vec::new();
    for i in 0..n {
        let mut p = format!("to=alice amount=0010 {tag} #{i}").into_bytes();
        if p.len() < size {
            p.resize(size, b'.');
        }
        bus.call_into("bank", "echo", &p, &opts, &mut out)
            .unwrap_or_else(|e| panic!("victim call {tag} #{i} failed: {e}"));
        assert!(
            out == p,
            "victim call {tag} #{i} got another payload: {:?}",
            String::from_utf8_lossy(&out[..out.len().min(64)])
        );
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
    let Some((bus, _banks, victim)) = bank_bus() else {
        return;
    };
    // The victim keeps calling while the attacker works (it writes for 1 s if it can).
    let (r, _) = attack_while_calling(
        &bus,
        &victim,
        ("instance-own", bank_targets(&victim)),
        5,
        Some(Duration::from_millis(1500)),
    );
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

/// Runs `attack` (name, targets) under the attacker's uid while the victim calls `bank` in
/// rounds of `per` checked calls, for at most `until` when given; asserts the attacker
/// ended well and returns its `RESULT` and the victim's rounds.
fn attack_while_calling(
    bus: &TestBus,
    victim: &Bus,
    (attack, targets): (&str, String),
    per: usize,
    until: Option<Duration>,
) -> (Vec<(String, String)>, usize) {
    let dir = bus.path().to_owned();
    let attack = attack.to_owned();
    let attacker = std::thread::spawn(move || run_attacker(&dir, &attack, &targets));
    let end = until.map(|u| Instant::now() + u);
    let mut rounds = 0;
    while end.is_none_or(|e| Instant::now() < e) && !attacker.is_finished() {
        victim_calls(victim, per, &format!("during {rounds}"));
        rounds += 1;
    }
    let out = attacker.join().unwrap();
    assert!(
        out.status.success(),
        "attacker failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    (result_of(&out), rounds)
}

/// A policed bus with two `bank` instances and a victim connection that has called it
/// (`None` without root, see `policed_bus`).
fn bank_bus() -> Option<(TestBus, [support::Served; 2], Bus)> {
    let (bus, _) = policed_bus()?;
    let banks = [bus.serve("bank", "b1", &[]), bus.serve("bank", "b2", &[])];
    let victim = bus.connect();
    victim_calls(&victim, 10, "before");
    Some((bus, banks, victim))
}

/// `bank`'s instances as `index:incarnation` targets for the attacker.
fn bank_targets(victim: &Bus) -> String {
    let info = victim.service("bank").unwrap();
    let t: Vec<String> = info
        .instances
        .iter()
        .map(|i| format!("{}:{}", i.index, instance_incarnation(victim, i.index)))
        .collect();
    assert_eq!(t.len(), 2);
    t.join(",")
}

/// Row "a co-caller of `echo` rewrites the victim's queued request in the shared ring
/// after it was published": the attacker (who may call `bank`) opens both instances as
/// any caller does, maps everything it is handed writable where it can (the instance's
/// ring segment, its own channel) and for 2 s rewrites every request it finds there that
/// reads `to=alice amount=0010` into `to=mallo amount=9999`, while the victim calls
/// `bank`. The victim's requests travel in the victim's own channels, which the attacker
/// has no mapping of: it finds none, and every victim call comes back with its own
/// payload. (Before channels, the victim's requests lay in the instances' shared ring,
/// which every caller maps writable: the attacker rewrote them, and the victim's check
/// "got another payload" failed.)
#[test]
fn a_co_caller_of_another_uid_cannot_rewrite_a_queued_request() {
    let Some((bus, _banks, victim)) = bank_bus() else {
        return;
    };
    let targets = bank_targets(&victim);
    let (r, rounds) = attack_while_calling(&bus, &victim, ("rewrite", targets), 20, None);
    assert_eq!(value(&r, "opened"), "2", "{r:?}");
    assert!(
        rounds > 10,
        "the victim hardly called during the attack: {rounds}"
    );
    assert_eq!(value(&r, "rewritten"), "0", "{r:?}");
    victim_calls(&victim, 10, "after");
}

/// Row "a caller claims one slot in every instance's ring and never publishes": the
/// attacker (who may call `bank`) claims a slot in each of its own channels (the instance
/// ring segments carry no requests any more), publishes none, and holds them while the victim calls.
/// Its claims hold up only its own channels: every victim call succeeds at once. (Before
/// channels, all callers shared each instance's ring: a claimed, unpublished slot of a
/// live producer held every later request, and every call to the service timed out.)
#[test]
fn a_caller_of_another_uid_holding_slots_holds_up_no_one_else() {
    let Some((bus, _banks, victim)) = bank_bus() else {
        return;
    };
    let (child, r) = attacker_holding(bus.path(), "hold", &bank_targets(&victim));
    assert_eq!(
        value(&r, "held"),
        "2",
        "a slot in each of its 2 channels: {r:?}"
    );
    // Each call well within the 5 s a held ring used to cost it.
    victim_calls_while_held(&victim, child, "held");
}

/// Makes 50 checked victim calls of `bank`, each within 1 s, while `attacker` (started by
/// [`attacker_holding`]) still holds what it did; then lets it go (its stdin closes).
fn victim_calls_while_held(victim: &Bus, mut attacker: std::process::Child, tag: &str) {
    victim_calls_within(victim, 50, tag, 0, Duration::from_secs(1));
    assert!(
        attacker.try_wait().unwrap().is_none(),
        "the attacker let go early"
    );
    drop(attacker.stdin.take());
    assert!(attacker.wait().unwrap().success());
}

/// The doorbell's `scanning` word (issue 18, property 3): a permitted caller says, falsely,
/// that `bank`'s instances look at every channel on every look (so callers set no hint
/// bit), and keeps clearing the hint bits, while each instance has more than `SCAN_MAX`
/// channels and so does not scan. The victim's calls are found at the instance's next full
/// sweep at the latest (5 ms): all 50 succeed, each within a 1 s deadline.
#[test]
fn a_caller_that_says_the_instances_scan_delays_others_by_at_most_a_full_sweep() {
    let Some((bus, _banks, victim)) = bank_bus() else {
        return;
    };
    // More than SCAN_MAX (8) channels at each instance: ten more connections, each
    // calling both instances.
    let others: Vec<Bus> = (0..10).map(|_| bus.connect()).collect();
    for (i, b) in others.iter().enumerate() {
        victim_calls(b, 4, &format!("other {i}"));
    }
    let (child, r) = attacker_holding(bus.path(), "false-scan", &bank_targets(&victim));
    assert_eq!(value(&r, "opened"), "2", "{r:?}");
    victim_calls_while_held(&victim, child, "unhinted");
}

/// The shared segment (the spin seats), the one segment every member maps writable: the
/// attacker (who may call `bank`) maps it and overwrites every byte of it, header and
/// seats, with 0xa5 over and over while the victim calls `bank` over its two instances.
/// Its writes steer no caller's picks (the victim's calls still go round the two instances
/// exactly: its round-robin counter is its own), fail no call, and keep no one from
/// connecting (a connection made during the attack calls as usual).
#[test]
fn a_member_scribbling_the_shared_segment_steers_no_picks_and_locks_no_one_out() {
    let Some((bus, _banks, victim)) = bank_bus() else {
        return;
    };
    let (mut child, r) = attacker_holding(bus.path(), "shared", "");
    assert_eq!(value(&r, "mapped"), "writable", "{r:?}");
    // No call moves on to the other instance for a slow take (the host is busy with the
    // attacker): where each call went is the round robin's doing alone.
    let opts = CallOptions {
        stall_bound: Duration::from_secs(4),
        ..CallOptions::timeout(Duration::from_secs(5))
    };
    let mut out = Vec::new();
    let mut picks = std::collections::HashMap::<u32, usize>::new();
    for i in 0..100 {
        let p = format!("to=alice amount=0010 shared #{i}").into_bytes();
        let info = victim
            .call_into("bank", "echo", &p, &opts, &mut out)
            .unwrap_or_else(|e| panic!("victim call #{i} failed: {e}"));
        assert_eq!(out, p, "victim call #{i} got another payload");
        *picks.entry(info.instance).or_default() += 1;
    }
    let counts: Vec<usize> = picks.values().copied().collect();
    assert_eq!(
        counts,
        [50, 50],
        "the victim's 100 calls by instance, while the attacker wrote the shared segment: {picks:?}"
    );
    let late = Bus::connect_dir(bus.path())
        .unwrap_or_else(|e| panic!("a connection made during the attack failed: {e}"));
    victim_calls(&late, 10, "late");
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
}

/// An instance's ring segment (its doorbell), which every caller of the instance maps
/// writable: the attacker (who may call `bank`) overwrites its 64-byte header with 0xa5,
/// again and again, at both of `bank`'s instances. A caller that connects during the
/// attack opens them and calls as usual: what a caller checks a doorbell against comes from
/// the registry (sealed) and the instance's own segment (sealed), not from that header.
/// Then the broker is killed and restarted, the attack going on: the instances hand their
/// rings to the new broker, which adopts them by the sizing they state and their own
/// segments, not by the header, and both callers call both instances again. (Before: the
/// late caller's first call failed, "Instance segment: bad magic 0xa5a5a5a5a5a5a5a5"; and
/// a restarted broker refused to adopt a ring whose header had been rewritten.)
#[test]
fn a_caller_scribbling_an_instance_s_doorbell_header_locks_no_new_caller_out() {
    let Some((mut bus, _banks, victim)) = bank_bus() else {
        return;
    };
    let targets = bank_targets(&victim);
    let (mut child, r) = attacker_holding(bus.path(), "doorbell-header", &targets);
    assert_eq!(value(&r, "written"), "2", "{r:?}");
    victim_calls(&victim, 10, "during");
    let late = Bus::connect_dir(bus.path())
        .unwrap_or_else(|e| panic!("a connection made during the attack failed: {e}"));
    victim_calls(&late, 10, "late");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(bus.broker.id() as libc::pid_t, libc::SIGKILL) };
    support::wait_deadline(&mut bus.broker);
    bus.broker = policed_broker(bus.path(), &[]).0;
    // Asked of the new broker (calls meanwhile may route by the previous one's view).
    support::wait_for("both bank instances registered with the new broker", || {
        victim.service("bank").is_ok_and(|s| {
            s.instances
                .iter()
                .filter(|i| i.status == Status::Online)
                .count()
                == 2
        })
    });
    let opts = CallOptions::timeout(Duration::from_secs(5));
    for (who, bus) in [("victim", &victim), ("late", &late)] {
        let mut seen = std::collections::HashSet::new();
        for i in 0..6 {
            let p = format!("after the restart {who} #{i}").into_bytes();
            let r = bus
                .call("bank", "echo", &p, &opts)
                .unwrap_or_else(|e| panic!("{who}'s call #{i} after the restart failed: {e}"));
            assert_eq!(r.payload, p);
            seen.insert(r.instance_id);
        }
        assert_eq!(
            seen.len(),
            2,
            "{who}'s calls after the restart reached {seen:?}"
        );
    }
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
}

/// Writes 0xa5 over the header of each target's ring segment every 20 µs until its stdin
/// closes.
fn attack_doorbell_header(dir: &Path, targets: &[(u32, u64)]) {
    let mut raw = Raw::connect(dir).unwrap();
    let opened = open_as_caller(&mut raw, targets);
    let headers: Vec<usize> = opened
        .iter()
        .map(|(ring, _)| ring.map.range(0, 64).unwrap() as usize)
        .collect();
    let scribble = || {
        for &h in &headers {
            // SAFETY: the first 64 bytes of our writable mapping of the ring segment.
            unsafe { std::ptr::write_bytes(h as *mut u8, 0xa5, 64) };
        }
    };
    scribble();
    let written = format!("written={}", headers.len());
    repeat_until_stdin_closes(&written, Duration::from_micros(20), scribble);
}

/// Maps the shared segment its connection was handed writable and writes 0xa5 over all of
/// it, again and again, until its stdin closes.
fn attack_shared(dir: &Path) {
    let raw = Raw::connect(dir).unwrap();
    // The Welcome's descriptors: the registry, the shared segment, the client segment.
    let fd = &raw.1[1];
    let len = aegis_client::sys::file_size(fd).unwrap() as usize;
    let (ptr, _, _) = map_writable(fd).expect("mapping the shared segment writable");
    let scribble = || {
        // SAFETY: `len` bytes of our mapping; another process's concurrent writes to the
        // same pages are what this attack is about (bytes, no references kept).
        unsafe { std::ptr::write_bytes(ptr as *mut u8, 0xa5, len) };
    };
    scribble();
    // Often enough to undo between any two of the victim's calls what they did there; not
    // a core's worth.
    let mapped = format!("mapped=writable len={len}");
    repeat_until_stdin_closes(&mapped, Duration::from_micros(20), scribble);
}

/// Says `result` (the attacker's `RESULT` line) and then does `act` every `every` until
/// its stdin closes (the test is done with it).
fn repeat_until_stdin_closes(result: &str, every: Duration, act: impl Fn()) {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    println!("\nRESULT {result}");
    std::io::stdout().flush().unwrap();
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
            done.store(true, Ordering::Relaxed);
        });
        while !done.load(Ordering::Relaxed) {
            act();
            std::thread::sleep(every);
        }
    });
}

/// Sets each target's `scanning` word and clears its hint bits every 100 µs until its
/// stdin closes.
fn attack_false_scan(dir: &Path, targets: &[(u32, u64)]) {
    use std::sync::atomic::Ordering;
    let mut raw = Raw::connect(dir).unwrap();
    let opened = open_as_caller(&mut raw, targets);
    let set = |on: &[(
        aegis_client::layout::InstanceSeg,
        aegis_client::layout::ChannelSeg,
    )]| {
        for (ring, _) in on {
            let b = ring.ring_indices();
            b.enqueue_pos.store(1, Ordering::Relaxed);
            b.hint.store(0, Ordering::Relaxed);
        }
    };
    set(&opened);
    let said = format!("opened={}", opened.len());
    repeat_until_stdin_closes(&said, Duration::from_micros(100), || set(&opened));
}

/// Runs `attack` under the attacker's uid until it prints its `RESULT` (it then holds
/// what it did until its stdin closes): the attacker and its result.
fn attacker_holding(
    dir: &Path,
    attack: &str,
    targets: &str,
) -> (std::process::Child, Vec<(String, String)>) {
    let mut child = attacker_command(dir, attack, targets)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    // The attacker says when it holds what it did (or fails and closes its output).
    while !line.contains("RESULT") {
        line.clear();
        if std::io::BufRead::read_line(&mut stdout, &mut line).unwrap() == 0 {
            panic!("the attacker ended before its result: {:?}", child.wait());
        }
    }
    // The rest of its output is read (and dropped), so that it never writes into a closed
    // pipe.
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    (child, result_of_text(&line))
}

/// A caller cannot inflate `ipc_router_loadbalancer_selections` of the instances it
/// calls: the attacker (allowed to call `bank`) sets the enqueue position of its channel
/// to each `bank` instance to 2^40 (its channel is writable to it), while connected and
/// after it left. The two instances' selections grow by at most 16 each (a faked full
/// channel adds at most its slot count). (Before, selections summed the channels' enqueue
/// positions: 2^40.)
#[test]
fn a_caller_cannot_inflate_an_instance_s_selections() {
    let Some((bus, addr)) = policed_bus() else {
        return;
    };
    let _banks = [bus.serve("bank", "b1", &[]), bus.serve("bank", "b2", &[])];
    let victim = bus.connect();
    victim_calls(&victim, 10, "before");
    let selections = || {
        let text = metrics(&addr);
        ["b1", "b2"]
            .map(|b| {
                sample(
                    &text,
                    &format!(
                        "ipc_router_loadbalancer_selections{{service_name=\"bank\",instance_id=\"{b}\"}}"
                    ),
                )
            })
            .iter()
            .sum::<f64>()
    };
    let targets = bank_targets(&victim);
    let before = selections();
    let (mut child, r) = attacker_holding(bus.path(), "selections", &targets);
    assert_eq!(value(&r, "written"), "2", "{r:?}");
    let during = selections();
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
    let after = selections();
    assert!(
        before >= 10.0 && (before..=before + 2.0 * 16.0).contains(&during) && (before..=during).contains(&after),
        "selections of bank's instances: {before} before the attack, {during} while the attacker was connected, {after} after"
    );
}

/// Sets the enqueue position of its channel to each target to 2^40, says so, and stays
/// connected until its stdin closes.
fn attack_selections(dir: &Path, targets: &[(u32, u64)]) {
    use std::io::Write;
    let mut raw = Raw::connect(dir).unwrap();
    let opened = open_as_caller(&mut raw, targets);
    for (_, chan) in &opened {
        chan.request_indices()
            .enqueue_pos
            .store(1 << 40, std::sync::atomic::Ordering::Relaxed);
    }
    println!("\nRESULT written={}", opened.len());
    std::io::stdout().flush().unwrap();
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
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

/// Row "the owner of a low-value service `pub` that the victim also calls writes the
/// victim's circuit-breaker words": the attacker serves `pub` (the policy lets it), the
/// victim calls `pub`, so the attacker's process maps what the bus hands an instance of the
/// victim; it writes "open" into every breaker it finds there. The victim's breakers are
/// in its own caller segment, which no instance is ever given: its `bank` calls all
/// succeed and no breaker of `bank` is open. (Before: the breakers were in the client
/// segment every instance the victim called maps, and `bank` calls failed with
/// `CircuitOpen` for 30 s.)
#[test]
fn an_instance_owner_cannot_open_a_caller_s_circuit_breakers() {
    let Some((bus, _)) = policed_bus() else {
        return;
    };
    let _b1 = bus.serve("bank", "b1", &[]);
    let victim = bus.connect();
    victim_calls(&victim, 3, "before");
    // The victim calls the attacker's `pub`; the attacker (in its handler) writes what it
    // can find.
    let (mut attacker, lines) = attacker_serving_pub(&bus, &victim, "breakers");
    let r = attacker_result(&mut attacker, lines);
    eprintln!("attacker: {r:?}");
    // Every victim call to `bank` succeeds: no breaker of ours was opened.
    victim_calls(&victim, 20, "after");
    let info = victim.service("bank").unwrap();
    assert_eq!(
        info.circuit_breaker.open, 0,
        "a breaker for bank is open: {:?} (attacker: {r:?})",
        info.circuit_breaker
    );
}

/// Runs `attack` under the attacker's uid, which serves `pub`; once it does, the victim
/// calls `pub` (so that the attacker's instance is handed what an instance of a service
/// the victim calls gets: the victim's client and heap segments and its channel to
/// `pub`). Returns the attacker and the rest of its output.
fn attacker_serving_pub(
    bus: &TestBus,
    victim: &Bus,
    attack: &str,
) -> (
    support::Reaped,
    std::io::BufReader<std::process::ChildStdout>,
) {
    let mut attacker = run_attacker_spawn(bus.path(), attack, "");
    let mut line = String::new();
    let mut lines = std::io::BufReader::new(attacker.stdout.take().unwrap());
    loop {
        line.clear();
        assert!(
            std::io::BufRead::read_line(&mut lines, &mut line).unwrap() > 0,
            "the attacker ended before serving"
        );
        if line.contains("SERVING") {
            break;
        }
    }
    // What `pub` answers is the attacker's business (its forger may answer this very call,
    // which it owns): only that it answers.
    // 64 KiB: larger than a ring slot, so the victim's channel to `pub` has a request heap
    // (the attacker maps it; the alter attack checks that it finds nothing else there).
    let opts = CallOptions::timeout(Duration::from_secs(5));
    victim
        .call("pub", "echo", &b"news?".repeat(13 << 10), &opts)
        .unwrap();
    (attacker, lines)
}

/// Makes checked victim calls of `bank` (payloads of at least `size` bytes) in rounds of
/// 20 while `attacker` runs; returns the rounds made.
fn victim_calls_while_running(victim: &Bus, attacker: &mut support::Reaped, size: usize) -> usize {
    let mut rounds = 0;
    while attacker.try_wait().unwrap().is_none() {
        victim_calls_of(victim, 20, &format!("during {rounds}"), size);
        rounds += 1;
    }
    rounds
}

/// Waits for an attacker started by [`attacker_serving_pub`], asserts it ended well, and
/// returns its `RESULT`.
fn attacker_result(
    attacker: &mut support::Reaped,
    mut lines: std::io::BufReader<std::process::ChildStdout>,
) -> Vec<(String, String)> {
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut lines, &mut rest).unwrap();
    let status = attacker.wait().unwrap();
    assert!(status.success(), "attacker failed: {rest}");
    result_of_text(&rest)
}

/// Row "the owner of a low-value service `pub` that the victim also calls answers the
/// victim's calls to `bank`": the attacker serves `pub`, the victim calls it once, and
/// for 3 s the attacker completes, with a forged reply, every mailbox-shaped word that
/// waits for a reply (phase pending or taken, a nonce set) in every client or channel
/// segment it has mapped writable, while the victim calls `bank` and checks each reply.
/// The victim's mailboxes for `bank` lie in its channels to `bank`'s instances, which the
/// attacker has no mapping of: every victim call comes back with its own payload.
/// (Before, the mailboxes lay in the victim's client segment, which every instance the
/// victim called maps writable.)
#[test]
fn an_instance_owner_cannot_answer_a_caller_s_calls_to_another_service() {
    let Some((bus, _banks, victim)) = bank_bus() else {
        return;
    };
    let (mut attacker, lines) = attacker_serving_pub(&bus, &victim, "forge");
    let rounds = victim_calls_while_running(&victim, &mut attacker, 0);
    let r = attacker_result(&mut attacker, lines);
    eprintln!("attacker: {r:?}, victim rounds: {rounds}");
    assert!(
        value(&r, "segments").parse::<u32>().unwrap() > 0,
        "the attacker mapped no segment of the victim's: {r:?}"
    );
    assert!(rounds > 0, "the victim made no call during the attack");
    victim_calls(&victim, 20, "after");
}

/// Rows "read" and "alter" of property 2 (the victim's large requests to another
/// service): the attacker serves `pub`, the victim calls it once, and for 3 s the attacker
/// looks for the victim's request bytes (`to=alice amount=0010`) in every client or heap
/// segment it has mapped, makes each mapping where it finds them writable if it can
/// (`mprotect`), and rewrites them into `to=mallo amount=9999` as fast as it can, while the
/// victim calls `bank` with 64 KiB requests (larger than a ring slot: they lie in a request
/// heap, where `bank`'s instance reads them in place). Each channel has its own request
/// heap, handed to its instance only: the attacker maps the victim's heap of its channel
/// to `pub`, never the one to `bank`, so it never even sees those bytes. (Before, one
/// request heap per connection went to every instance the victim called: the attacker
/// read them, `found_in=1`; and before that, the heap was in the client segment, which
/// every such instance mapped writable, and it rewrote them.)
#[test]
fn an_instance_owner_cannot_alter_a_caller_s_large_requests_to_another_service() {
    let Some((bus, _banks, victim)) = bank_bus() else {
        return;
    };
    let (mut attacker, lines) = attacker_serving_pub(&bus, &victim, "alter");
    let rounds = victim_calls_while_running(&victim, &mut attacker, 64 << 10);
    let r = attacker_result(&mut attacker, lines);
    eprintln!("attacker: {r:?}, victim rounds: {rounds}");
    assert!(
        value(&r, "heaps").parse::<u32>().unwrap() > 0,
        "the attacker mapped no request heap of the victim's (the test would prove nothing): {r:?}"
    );
    assert_eq!(
        value(&r, "found_in"),
        "0",
        "the attacker read the victim's requests to another service: {r:?}"
    );
    assert_eq!(
        value(&r, "writable"),
        "0",
        "the attacker could write the victim's request memory: {r:?}"
    );
    assert!(rounds > 0, "the victim made no call during the attack");
    victim_calls_of(&victim, 20, "after", 64 << 10);
}

/// One writer per page in the channels, the caller's side: the attacker (who may call
/// `bank`) opens both instances as any caller does and tries every way to write the
/// reply side of its own channel to each (where the instance moves the ring's head, frees
/// slots and writes its answers): a writable `mmap`, `mprotect` of a read-only one,
/// `write(2)`, and reopening the descriptor writable through `/proc/self/fd`. All are
/// refused; `bank` stays `Online` and every victim call succeeds. (At ac1db13 a channel was
/// one segment the caller was handed writable, head and answers included: with the
/// broker's read-only reopen replaced by a duplicate of the writable descriptor, this test
/// sees "writable=8".)
#[test]
fn a_caller_of_another_uid_cannot_write_the_instance_s_side_of_its_channel() {
    let Some((bus, _banks, victim)) = bank_bus() else {
        return;
    };
    let (r, _) = attack_while_calling(
        &bus,
        &victim,
        ("reply-side", bank_targets(&victim)),
        5,
        None,
    );
    assert_eq!(
        value(&r, "segments"),
        "2",
        "a reply side per instance: {r:?}"
    );
    assert_eq!(
        value(&r, "writable"),
        "0",
        "the attacker could write an instance's side of its channel: {r:?}"
    );
    assert_eq!(
        value(&r, "refused"),
        "8",
        "each reply side: mmap, mprotect, write(2), reopen refused: {r:?}"
    );
    victim_calls(&victim, 10, "after");
    for i in &victim.service("bank").unwrap().instances {
        assert_eq!(i.status, Status::Online, "{i:?}");
    }
}

/// One writer per page in the channels, the instance's side: the attacker serves `pub`,
/// the victim calls it, and the attacker's serving process (which maps the victim's
/// channel to `pub`) tries every way to write that channel's request side (the victim's
/// requests, its slots' published words, its call words): its mapping made writable with
/// `mprotect`, and a writable open of it through `/proc/self/map_files` (its descriptor was
/// closed once mapped). Both are refused, and the victim's calls go on. (At ac1db13 the
/// instance mapped the channel's one segment writable: with the read-only reopen replaced
/// by a duplicate of the writable descriptor, this test sees "writable=1": the mprotect).
#[test]
fn an_instance_owner_of_another_uid_cannot_write_a_caller_s_side_of_its_channel() {
    let Some((bus, _banks, victim)) = bank_bus() else {
        return;
    };
    let (mut attacker, lines) = attacker_serving_pub(&bus, &victim, "request-side");
    let rounds = victim_calls_while_running(&victim, &mut attacker, 0);
    let r = attacker_result(&mut attacker, lines);
    eprintln!("attacker: {r:?}, victim rounds: {rounds}");
    assert_eq!(
        value(&r, "segments"),
        "1",
        "the victim's channel to pub: {r:?}"
    );
    assert_eq!(
        value(&r, "writable"),
        "0",
        "the attacker could write a caller's side of its channel: {r:?}"
    );
    assert_eq!(
        value(&r, "refused"),
        "2",
        "mprotect and reopen refused: {r:?}"
    );
    victim_calls(&victim, 10, "after");
}

/// An instance owner maps no memory of its callers' but its channels: the attacker serves
/// `pub`, the victim calls it, and the attacker looks for any mapping of a client segment
/// in its process,
/// overwriting those it may write. Before layout 12 every instance a caller opened mapped
/// its client segment writable (the async doorbell word was there): on that code this
/// test failed with "the attacker maps 1 client segment(s)", and the attacker could ring
/// the victim's doorbell (spurious wake-ups) or rewrite its header. Now an async waiter
/// sleeps on the answer word of its own mailbox, which only the instance of that call
/// writes. Then the victim calls a `vault` instance it never called before, and `bank`
/// async: all succeed.
#[test]
fn an_instance_owner_maps_no_memory_of_a_caller_s_but_its_channels() {
    let Some((bus, _banks, victim)) = bank_bus() else {
        return;
    };
    let (mut attacker, lines) = attacker_serving_pub(&bus, &victim, "scribble");
    let r = attacker_result(&mut attacker, lines);
    assert_eq!(
        value(&r, "client_segments"),
        "0",
        "the attacker maps {} client segment(s): {r:?}",
        value(&r, "client_segments")
    );
    let _v = bus.serve("vault", "v1", &[]);
    let opts = CallOptions::timeout(Duration::from_secs(5));
    let reply = victim
        .call("vault", "echo", b"first contact", &opts)
        .unwrap_or_else(|e| panic!("the victim's first call to vault failed: {e}"));
    assert_eq!(reply.payload, b"first contact");
    victim_calls(&victim, 10, "after");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for i in 0..10 {
        let p = format!("async {i}");
        let r = rt
            .block_on(victim.call_async("bank", "echo", p.as_bytes(), &opts))
            .unwrap_or_else(|e| panic!("the victim's async call to bank failed: {e}"));
        assert_eq!(r.payload, p.as_bytes());
    }
}

/// Counts the client segments of others this process maps (any mode: all of them but
/// the one of its own connection, the only one it has), overwriting the header of every
/// client segment it maps writable (its own connection reads its header only when it
/// connects).
fn scribble_client_headers(_: Duration) -> String {
    let (mut mapped, mut scribbled) = (0usize, 0);
    for m in bus_mappings(&["memfd:aegis-"]) {
        if m.kind == SegmentKind::Client as u32 {
            mapped += 1;
            if m.writable {
                // SAFETY: the first 64 bytes of a live writable mapping of ours.
                unsafe { std::ptr::write_bytes(m.start as *mut u8, 0xa5, 64) };
                scribbled += 1;
            }
        }
    }
    format!(
        "client_segments={} scribbled={scribbled}",
        mapped.saturating_sub(1)
    )
}

/// Serves `pub`; on the first request, starts `attack` for 3 s in a thread, and stops
/// serving (and prints its `RESULT`) when it ends.
fn serve_pub_while(dir: &Path, attack: fn(Duration) -> String) {
    let bus = Bus::connect_dir(dir).expect("the attacker may connect");
    let inst = bus
        .register("pub", "p1", &[])
        .expect("the attacker may serve pub");
    let stop = inst.stop_handle();
    println!("\nSERVING");
    let mut running = None;
    inst.serve(|req, reply| {
        reply.extend_from_slice(req.payload());
        if running.is_none() {
            let stop = stop.clone();
            running = Some(std::thread::spawn(move || {
                let r = attack(Duration::from_secs(3));
                stop.stop();
                r
            }));
        }
        Ok(())
    })
    .ok();
    let result = running.expect("pub was called").join().unwrap();
    println!("\nRESULT {result}");
}

/// For `how_long`, rewrites the victim's request bytes wherever it finds them in a
/// client or heap segment of this process (see
/// `an_instance_owner_cannot_alter_a_caller_s_large_requests_to_another_service`).
fn alter_requests(how_long: Duration) -> String {
    const VICTIM: &[u8] = b"to=alice amount=0010";
    const FORGED: &[u8] = b"to=mallo amount=9999";
    const SCAN: usize = 2 << 20;
    let end = Instant::now() + how_long;
    // Each mapping the victim's bytes were found in, and whether we can write it.
    let mut found_in: std::collections::HashMap<usize, bool> = Default::default();
    let mut heaps = std::collections::HashSet::new();
    let mut rewritten = 0u64;
    let mut copy = vec![0u8; SCAN];
    while Instant::now() < end {
        for m in bus_mappings(&["memfd:aegis-client", "memfd:aegis-heap"]) {
            if m.kind == aegis_client::layout::SegmentKind::Heap as u32 {
                heaps.insert(m.start);
            }
            let n = m.len.min(SCAN);
            // SAFETY: `n` bytes of a live mapping of ours, copied out (the victim may be
            // writing them: what we read is whatever was there).
            unsafe { std::ptr::copy_nonoverlapping(m.start as *const u8, copy.as_mut_ptr(), n) };
            let hits: Vec<usize> = copy[..n]
                .windows(VICTIM.len())
                .enumerate()
                .filter(|(_, w)| *w == VICTIM)
                .map(|(i, _)| i)
                .collect();
            if hits.is_empty() {
                continue;
            }
            let can_write = *found_in.entry(m.start).or_insert_with(|| {
                // SAFETY: mprotect of a whole mapping of ours, which nothing else in this
                // process relies on being read-only.
                m.writable
                    || unsafe {
                        libc::mprotect(
                            m.start as *mut libc::c_void,
                            m.len,
                            libc::PROT_READ | libc::PROT_WRITE,
                        )
                    } == 0
            });
            if !can_write {
                continue;
            }
            // Keep rewriting where the victim's bytes were, for 50 ms: its next request
            // lands in the same heap block.
            let burst = Instant::now() + Duration::from_millis(50);
            while Instant::now() < burst {
                for &i in &hits {
                    let at = (m.start + i) as *mut u8;
                    // SAFETY: inside the mapping (found there above), which is writable
                    // (it was, or mprotect made it so).
                    unsafe {
                        if std::ptr::read_volatile(at.add(3)) == b'a' {
                            std::ptr::copy_nonoverlapping(FORGED.as_ptr(), at, FORGED.len());
                            rewritten += 1;
                        }
                    }
                }
            }
        }
    }
    let writable = found_in.values().filter(|w| **w).count();
    let refused = found_in.len() - writable;
    format!(
        "heaps={} found_in={} writable={writable} refused={refused} rewritten={rewritten}",
        heaps.len(),
        found_in.len()
    )
}

/// For `how_long`, completes every mailbox that waits for a reply in every writable client
/// or channel mapping of this process with the reply `balance=0 (forged)`, found by shape
/// (any layout): a 64-byte-aligned state word in phase pending (1) or taken (2) with a
/// nonce 40 bytes on. Returns the segments looked at, the waiting mailboxes seen and the
/// replies forged.
fn forge_replies(how_long: Duration) -> String {
    use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
    const FORGED: &[u8] = b"balance=0 (forged)";
    let end = Instant::now() + how_long;
    let (mut segments, mut waiting, mut forged) = (0, 0, 0);
    while Instant::now() < end {
        let maps: Vec<_> = writable_bus_mappings()
            .into_iter()
            .filter(|m| {
                m.kind == SegmentKind::Client as u32
                    || m.kind == SegmentKind::Channel as u32
                    || m.kind == SegmentKind::Reply as u32
            })
            .collect();
        segments = segments.max(maps.len());
        let round = Instant::now() + Duration::from_millis(100);
        while Instant::now() < round {
            for m in &maps {
                for off in (128..m.len.saturating_sub(64 + FORGED.len())).step_by(64) {
                    let at = |o: usize| (m.start + off + o) as *mut u8;
                    // SAFETY: `off + 64 + FORGED.len()` is inside the live mapping (bound
                    // above); words at 64-byte-aligned offsets are aligned for atomics.
                    let (state, nonce) = unsafe {
                        (
                            &*(at(0) as *const AtomicU32),
                            &*(at(40) as *const AtomicU64),
                        )
                    };
                    let s = state.load(Ordering::Acquire);
                    if !matches!(s & 0xf, 1 | 2) || nonce.load(Ordering::Relaxed) == 0 {
                        continue;
                    }
                    waiting += 1;
                    // SAFETY: as above: reply bytes, length, kind and status of the
                    // mailbox-shaped header at `off`.
                    unsafe {
                        std::ptr::copy_nonoverlapping(FORGED.as_ptr(), at(64), FORGED.len());
                        (*(at(16) as *const AtomicU64))
                            .store(FORGED.len() as u64, Ordering::Relaxed);
                        (*(at(12) as *const AtomicU32)).store(0, Ordering::Relaxed);
                        (*(at(4) as *const AtomicU32)).store(0, Ordering::Relaxed);
                    }
                    let ready = (s & !0xff) | 3;
                    if state
                        .compare_exchange(s, ready, Ordering::Release, Ordering::Relaxed)
                        .is_ok()
                    {
                        forged += 1;
                        // SAFETY: FUTEX_WAKE on a word of a live mapping.
                        unsafe {
                            libc::syscall(libc::SYS_futex, at(0), libc::FUTEX_WAKE, i32::MAX);
                        }
                    }
                }
            }
        }
    }
    format!("segments={segments} waiting={waiting} forged={forged}")
}

/// Serves `vault` (which the attacker may not call), lets the victim call it once, then
/// runs `attack` against its instance: the instance, the victim and the attacker's result.
fn attack_vault(bus: &TestBus, attack: &str) -> (support::Served, Bus, Vec<(String, String)>) {
    let v = bus.serve("vault", "v1", &[]);
    let victim = bus.connect();
    let opts = CallOptions::timeout(Duration::from_secs(5));
    let mut out = Vec::new();
    let info = victim
        .call_into("vault", "echo", b"x", &opts, &mut out)
        .unwrap();
    let attacked = run_attacker(
        bus.path(),
        attack,
        &format!("{}:{}", info.instance, info.incarnation),
    );
    assert!(
        attacked.status.success(),
        "attacker failed: {}",
        String::from_utf8_lossy(&attacked.stdout)
    );
    (v, victim, result_of(&attacked))
}

/// Row "a uid with no call right writes its own caller stats": the attacker (who may not
/// call `vault`) writes 10^12 errors and an open breaker for every service into the
/// statistics memory it was given, asks the broker to count them (a `Grant` of vault's
/// instance), writes again so that a sum would wrap, and leaves. `vault`'s
/// `ipc_router_errors_total` and open-breaker gauge stay 0, during and after.
#[test]
fn a_caller_s_statistics_count_only_for_services_it_may_call() {
    let Some((bus, http)) = policed_bus() else {
        return;
    };
    let (_v, victim, r) = attack_vault(&bus, "own-stats");
    assert!(
        value(&r, "written").parse::<u32>().unwrap() > 0,
        "the attacker found its statistics to write: {r:?}"
    );
    let text = metrics(&http);
    let errors: f64 = text
        .lines()
        .filter(|l| l.starts_with("ipc_router_errors_total{service_name=\"vault\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(errors, 0.0, "vault errors forged by the attacker ({r:?})");
    let open = sample(
        &text,
        "ipc_router_circuit_breaker_state{service_name=\"vault\",state=\"open\"} ",
    );
    assert_eq!(open, 0.0, "vault breaker forged open ({r:?})");
    assert_eq!(victim.service("vault").unwrap().circuit_breaker.open, 0);
}

/// Property 4 ("a caller's unhealthy report, and `Grant`, count only from a process the
/// policy lets call that service"): the attacker, who may call `bank` but not `vault`,
/// grants itself vault's instance, reports it unhealthy and asks for its segments. All
/// refused; the instance stays `Online` and the victim's vault calls succeed. (Before the
/// `Grant` was filtered by the policy, the grant stood and the report made the instance
/// `Unhealthy`; the report is also checked against the policy itself now, for a grant
/// kept across a broker restart while the instance was not back yet.)
#[test]
fn a_caller_without_call_rights_cannot_report_an_instance_unhealthy() {
    let Some((bus, _)) = policed_bus() else {
        return;
    };
    let (_v, victim, r) = attack_vault(&bus, "report");
    let opts = CallOptions::timeout(Duration::from_secs(5));
    let mut out = Vec::new();
    assert_eq!(value(&r, "report"), "refused", "{r:?}");
    assert_eq!(value(&r, "open"), "refused", "{r:?}");
    let svc = victim.service("vault").unwrap();
    assert_eq!(svc.instances[0].status, Status::Online, "{r:?}");
    victim
        .call_into("vault", "echo", b"still", &opts, &mut out)
        .unwrap();
    assert_eq!(out, b"still");
}

/// Row "one uid with no call rights opens connections: it takes every client slot and
/// every instance slot under the default caps": with 8 client and 8 instance slots, uid
/// 65534 gets a quarter of each (2), and the victim (root) still connects and registers.
#[test]
fn one_uid_takes_at_most_a_quarter_of_the_slots_by_default() {
    let Some((bus, _)) = policed_bus_with(&["--max-clients", "8", "--max-instances", "8"]) else {
        return;
    };
    let out = run_attacker(bus.path(), "slots", "");
    assert!(
        out.status.success(),
        "attacker failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let r = result_of(&out);
    assert_eq!(value(&r, "connections"), "2", "{r:?}");
    assert_eq!(value(&r, "instances"), "2", "{r:?}");
    assert!(
        value(&r, "refusal").contains("max-clients-per-uid"),
        "{r:?}"
    );
    // The victim: six more processes and instances of its own fit.
    let victims: Vec<Bus> = (0..6).map(|_| bus.connect()).collect();
    let insts: Vec<_> = victims
        .iter()
        .enumerate()
        .map(|(i, b)| b.register("bank", &format!("b{i}"), &[]).unwrap())
        .collect();
    assert_eq!(insts.len(), 6);
}

/// `--max-resources-per-uid` and `--max-shm-per-uid` hold for another uid: its instances
/// own at most 3 resources together, and a second channel (each with its 32 MiB request
/// heap) that would pass its 40 MiB of shared memory is refused; each refusal names the cap
/// and its value.
#[test]
fn another_uid_stays_within_its_resource_and_shared_memory_quotas() {
    let Some((bus, _)) = policed_bus_with(&[
        "--max-resources-per-uid",
        "3",
        "--max-shm-per-uid",
        &(40u64 << 20).to_string(),
    ]) else {
        return;
    };
    let _bank = bus.serve("bank", "b1", &[]);
    let out = run_attacker(bus.path(), "quota", "");
    assert!(
        out.status.success(),
        "attacker failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let r = result_of(&out);
    assert_eq!(value(&r, "claimed"), "3", "{r:?}");
    let claim = value(&r, "claim_refusal");
    assert!(claim.contains("max-resources-per-uid_3"), "{r:?}");
    let conn = value(&r, "connect_refusal");
    assert!(conn.contains("max-shm-per-uid"), "{r:?}");
    // The quota is per uid: another uid's (root's) connection still fits.
    let _mine = bus.connect();
}

/// Row "a group member with no rights asks the control socket for resources": a caller
/// sees the resources of services it may call or serve, not the others'.
#[test]
fn a_caller_lists_only_the_resources_of_services_it_may_call() {
    let Some((bus, _)) = policed_bus() else {
        return;
    };
    let _bank = bus.serve("bank", "b1", &["--claim", "bank-doc-1"]);
    let _vault = bus.serve("vault", "v1", &["--claim", "vault-secret-1"]);
    let out = run_attacker(bus.path(), "list-resources", "");
    assert!(
        out.status.success(),
        "attacker failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let r = result_of(&out);
    let seen = value(&r, "ids");
    assert!(seen.contains("bank-doc-1"), "{r:?}");
    assert!(
        !seen.contains("vault-secret-1"),
        "another service's ids listed: {r:?}"
    );
    assert_eq!(value(&r, "total"), "1", "{r:?}");
}

/// Row "each unfinished 1 MiB control frame: +1 MiB broker RSS, held": 64 connections
/// each announce a frame of 1 MiB and send 16 bytes of it; the broker's memory grows by
/// what came (not 64 MiB), and each connection is closed once the frame is late.
#[test]
fn unfinished_control_frames_cost_what_was_sent_and_are_timed_out() {
    use std::io::{Read, Write};
    let bus = TestBus::start();
    let rss = || -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", bus.broker.id()))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap()
    };
    let before = rss();
    let mut conns: Vec<std::os::unix::net::UnixStream> = (0..64)
        .map(|_| {
            let mut s =
                std::os::unix::net::UnixStream::connect(bus.path().join("control.sock")).unwrap();
            s.write_all(&((1u32 << 20) - 1).to_le_bytes()).unwrap();
            s.write_all(&[0u8; 16]).unwrap();
            s
        })
        .collect();
    // Wait until the broker has read every announced length (its answers come at the
    // timeout); meanwhile its memory must not have grown by the announced sizes.
    std::thread::sleep(Duration::from_millis(300));
    let grown = rss().saturating_sub(before);
    assert!(
        grown < 16 * 1024,
        "broker RSS grew by {grown} kB for 64 unfinished frames"
    );
    let t = Instant::now();
    for s in &mut conns {
        s.set_read_timeout(Some(support::DEADLINE)).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        assert!(
            t.elapsed() < support::DEADLINE,
            "an unfinished frame was held open"
        );
    }
    eprintln!(
        "64 unfinished frames: +{grown} kB, closed after {:?}",
        t.elapsed()
    );
    // The bus still serves.
    let _e = bus.serve("echo", "e1", &[]);
    let b = bus.connect();
    assert_eq!(
        b.call(
            "echo",
            "m",
            b"x",
            &CallOptions::timeout(Duration::from_secs(5))
        )
        .unwrap()
        .payload,
        b"x"
    );
}

/// `identities` (and the journal) written by another uid, in a directory shared with
/// `--allow-shared-dir`, is not trusted: the broker refuses to start, naming the file.
#[test]
fn identities_owned_by_another_uid_are_not_trusted() {
    if !support::root("needs root to make a file of another uid") {
        return;
    }
    for file in ["identities", "resources.journal"] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let planted = dir.path().join(file);
        std::fs::write(&planted, "").unwrap();
        std::os::unix::fs::chown(&planted, Some(ATTACKER), Some(ATTACKER)).unwrap();
        let out = Command::new(support::broker_bin())
            .arg("--dir")
            .arg(dir.path())
            .args(["--allow-shared-dir", "--log", "warn"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "the broker trusted a {file} of uid {ATTACKER}"
        );
        assert!(err.contains(file) && err.contains("not trusted"), "{err}");
    }
}

/// Row "a caller fills an instance's reply heap with replies it never reads": `bank` has
/// one instance with a 4 MiB maximum message, so 8 MiB reply heaps. The attacker
/// (allowed to call `bank`) submits 1 MiB calls and never collects their replies, while
/// it lives and after it is killed. Its replies go to its own channel's reply heap: once
/// that is full its further calls are refused (429 "the replies not yet read in this
/// caller's channel fill its reply heap"), and every 1 MiB call of the victim succeeds
/// with its own payload — the victim's of another uid, and also another process of the
/// attacker's own uid while the attacker hoards. Once it is killed, its channel and its
/// replies are gone. (With one reply heap per instance: at first the attacker's eight
/// unread replies filled it and the victim's calls got 429 "reply heap is full" for 60 s;
/// then, with a uid's unread replies capped at half of it, another process of the
/// attacker's uid got 429 "replies not yet read by uid 65534" while the attacker lived.)
#[test]
fn a_caller_that_never_reads_its_replies_fills_only_its_own_channel_s_reply_heap() {
    let Some((bus, _)) = policed_bus() else {
        return;
    };
    let _b = bus.serve("bank", "b1", &["--max-message", "4194304"]);
    let victim = bus.connect();
    let opts = CallOptions::timeout(Duration::from_secs(5));
    let big = |tag: u8| vec![tag; 1 << 20];
    let mut out = Vec::new();
    let victim_big_calls = |round: u8, out: &mut Vec<u8>| {
        for i in 0..6u8 {
            let p = big(round * 16 + i);
            victim
                .call_into("bank", "echo", &p, &opts, out)
                .unwrap_or_else(|e| panic!("victim 1 MiB call {round}/{i} failed: {e}"));
            assert!(*out == p, "victim call {round}/{i} got another payload");
        }
    };
    victim_big_calls(0, &mut out);
    let mut attacker = run_attacker_spawn(bus.path(), "hoard", "");
    let mut lines = std::io::BufReader::new(attacker.stdout.take().unwrap());
    let mut line = String::new();
    let r = loop {
        line.clear();
        assert!(
            std::io::BufRead::read_line(&mut lines, &mut line).unwrap() > 0,
            "the attacker ended before hoarding"
        );
        if line.contains("RESULT ") {
            break result_of_text(&line);
        }
    };
    eprintln!("attacker: {r:?}");
    victim_big_calls(1, &mut out);
    // A process of the attacker's uid, calling while the attacker hoards.
    let same_uid = result_of(&run_attacker(bus.path(), "large-call", ""));
    assert_eq!(
        value(&same_uid, "call"),
        "ok",
        "the hoarder's unread replies held up another process of its uid: {same_uid:?}"
    );
    // Killed, its unread replies are still not the victim's problem.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(attacker.id() as libc::pid_t, libc::SIGKILL) };
    let _ = attacker.wait();
    victim_big_calls(2, &mut out);
    assert!(
        value(&r, "refusal").contains("not_yet_read_in_this_caller's_channel_fill"),
        "the attacker's further calls were not refused for its unread replies: {r:?}"
    );
    // Its replies went with it (before the channels, they were held for the 60 s
    // unread-reply expiry and that uid's calls got 429).
    let again = run_attacker(bus.path(), "large-call", "");
    let r = result_of(&again);
    assert_eq!(
        value(&r, "call"),
        "ok",
        "the killed attacker's unread replies still hold its uid's share: {r:?}"
    );
}

/// Property 6 across a broker restart. A caller's channel made by the previous broker
/// stays in use after a restart (calls in flight through it, and new ones until its
/// instance is back). The attacker (uid 65534) has eight 1 MiB calls of `bank` in flight
/// through such a channel, whose replies it never reads; a second process of the same
/// uid has one in flight too, sent a little later. `bank` answers each 1.5 s after taking
/// it, after the broker was killed and started again. Each large reply goes through its
/// own channel's reply heap (handed to the new broker under the channel's token, which
/// only the channel's caller and instance can read), so the hoarder fills only its own,
/// and the other process's call returns its own bytes. (Before, replies through a
/// previous broker's channel went to the instance's shared reply heap, where a uid's
/// unread replies may hold half of it: the hoarder's held its uid's share, and the other
/// process's call failed with 429 "replies not yet read by uid 65534".)
#[test]
fn after_a_broker_restart_a_caller_s_unread_replies_cost_only_that_caller() {
    let Some((mut bus, _)) = policed_bus() else {
        return;
    };
    let _b = bus.serve(
        "bank",
        "b1",
        &[
            "--max-message",
            "4194304",
            "--threads",
            "12",
            "--delay-ms",
            "1500",
        ],
    );
    let read_until = |child: &mut support::Reaped, what: &str| {
        let out = child.stdout.as_mut().unwrap();
        let mut all = String::new();
        let mut byte = [0u8; 1];
        while !all.contains(what) {
            match std::io::Read::read(out, &mut byte) {
                Ok(1) => all.push(byte[0] as char),
                _ => panic!("the attacker ended before saying {what}: {all}"),
            }
        }
    };
    let go = |child: &mut support::Reaped| {
        use std::io::Write;
        let input = child.stdin.as_mut().unwrap();
        input.write_all(b"go\n").unwrap();
        input.flush().unwrap();
    };
    let spawn = |attack: &str| {
        let mut c = attacker_command(bus.path(), attack, "");
        support::Reaped(c.stdin(Stdio::piped()).spawn().unwrap())
    };
    // Both ready to call (channel, request heap, the instance told of both), then the
    // hoarder's calls, then the other's, then the restart.
    let mut hoarder = spawn("hoard-across-restart");
    let mut other = spawn("large-call-across-restart");
    read_until(&mut hoarder, "READY");
    read_until(&mut other, "READY");
    go(&mut hoarder);
    read_until(&mut hoarder, "SUBMITTED");
    go(&mut other);
    read_until(&mut other, "CALLING");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(bus.broker.id() as libc::pid_t, libc::SIGKILL) };
    support::wait_deadline(&mut bus.broker);
    bus.broker = policed_broker(bus.path(), &[]).0;
    let r = result_of(&other.wait_with_output().unwrap());
    eprintln!("other process of the attacker's uid: {r:?}");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(hoarder.id() as libc::pid_t, libc::SIGKILL) };
    let _ = hoarder.wait();
    assert_eq!(
        value(&r, "call"),
        "ok",
        "the hoarder's unread replies after the restart held up another caller: {r:?}"
    );
}

/// Gets a channel to `bank` with a request heap the instance has been told of: a small
/// call, a 1 MiB loan (its heap handed over) dropped unsent, and another small call (the
/// instance fetches the heap's news as it serves on). Then says READY and waits for "go"
/// on stdin.
fn ready_for_large_calls(bus: &Bus, opts: &CallOptions) {
    bus.call("bank", "echo", b"x", opts).unwrap();
    drop(bus.loan("bank", 1 << 20).unwrap());
    bus.call("bank", "echo", b"y", opts).unwrap();
    say("READY");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
}

/// Prints `what` on a line of its own, at once.
fn say(what: &str) {
    use std::io::Write;
    println!("\n{what}");
    let _ = std::io::stdout().flush();
}

/// When told to, submits eight 1 MiB calls of `bank` and never reads their replies.
fn attack_hoard_across_restart(dir: &Path) {
    let bus = Bus::connect_dir(dir).expect("the attacker may connect");
    let opts = CallOptions::timeout(Duration::from_secs(20));
    ready_for_large_calls(&bus, &opts);
    let payload = vec![0xeeu8; 1 << 20];
    let held: Vec<_> = (0..8)
        .map(|_| bus.submit("bank", "echo", &payload, &opts).unwrap())
        .collect();
    say("SUBMITTED");
    std::thread::sleep(Duration::from_secs(600));
    drop(held);
}

/// When told to, makes one 1 MiB call of `bank` (a loan: the call itself needs no
/// broker), and says how it went.
fn attack_large_call_across_restart(dir: &Path) {
    let bus = Bus::connect_dir(dir).expect("the attacker may connect");
    let opts = CallOptions::timeout(Duration::from_secs(20));
    ready_for_large_calls(&bus, &opts);
    let mut loan = bus.loan("bank", 1 << 20).unwrap();
    loan.fill(0xdd);
    say("CALLING");
    let call = match bus.call_loan("bank", "echo", loan, &opts) {
        Ok(r) if r.len() == 1 << 20 && r.iter().all(|&b| b == 0xdd) => "ok".to_owned(),
        Ok(_) => "other_payload".to_owned(),
        Err(e) => e.to_string().replace(' ', "_"),
    };
    println!("\nRESULT call={call}");
}

/// The reply heap handover (`Request::ReplyHeap`), attacked by the owner of another
/// service's instance: the attacker serves `pub` and hands the broker a well-formed reply
/// heap (sealed, of `bank`'s size, a mapping of it kept writable) for every channel id up
/// to 256, the victim's channel to `bank` among them (made by a small call, no reply heap
/// yet). Taken for the victim's channel, the attacker's heap would be where `bank`'s large
/// replies to the victim are read from, and `bank`'s own heap would be refused. The broker
/// takes a channel's reply heap only from a serving connection of that channel's instance:
/// every handover is refused, and the victim's 1 MiB calls come back with their own bytes.
/// (Without the owner check in `State::reply_heap`, 1 of the attacker's heaps was taken.)
/// Each id is also tried as a previous broker's channel under a guessed token: refused
/// (nobody claimed such a token).
#[test]
fn an_instance_owner_cannot_hand_over_a_reply_heap_for_another_instance_s_channel() {
    let Some((bus, _)) = policed_bus() else {
        return;
    };
    let _b = bus.serve("bank", "b1", &["--max-message", "4194304"]);
    let victim = bus.connect();
    victim_calls(&victim, 1, "before");
    let r = result_of(&run_attacker(bus.path(), "plant-reply-heaps", ""));
    eprintln!("attacker: {r:?}");
    victim_calls_of(&victim, 6, "after", 1 << 20);
    assert_eq!(value(&r, "taken"), "0", "a reply heap was taken: {r:?}");
    assert!(
        value(&r, "refusal").contains("is_not_one_of_your_instances'"),
        "{r:?}"
    );
}

/// Registers `pub` on a raw connection, then hands a reply heap of `bank`'s size over for
/// each channel id below 256.
fn attack_plant_reply_heaps(dir: &Path) {
    use aegis_client::layout::{ChannelHeap, HeapSide};
    let mut raw = Raw::connect(dir).expect("the attacker may connect");
    let r = raw_register_pub(&mut raw, "p1");
    assert!(matches!(r, Response::Registered { .. }), "{r:?}");
    let (mut taken, mut refusal) = (0, String::new());
    // Each channel id as the current broker's, and as a previous broker's under a guessed
    // token (it has no way to read the victim's).
    let asks = (0..256u64).flat_map(|channel| {
        [(raw.2, [0, 0]), (raw.2 ^ 1, [channel, 7])].map(|(epoch, token)| (channel, epoch, token))
    });
    for (channel, epoch, token) in asks.collect::<Vec<_>>() {
        // `bank`'s heap: twice its largest message; our writable mapping is `_heap`.
        let (fd, _heap) =
            ChannelHeap::create(epoch, 2 * 4194304, channel, HeapSide::Reply).unwrap();
        match raw
            .ask_with_fds(
                &Request::ReplyHeap {
                    channel,
                    epoch,
                    token,
                },
                &[fd.as_fd()],
            )
            .unwrap()
        {
            Response::Done => taken += 1,
            // The refusal of the current broker's channels is the one the test checks.
            Response::Error(e) if epoch == raw.2 => {
                refusal = aegis_client::error::Error::from(e).to_string()
            }
            Response::Error(_) => {}
            other => panic!("{other:?}"),
        }
    }
    println!(
        "\nRESULT taken={taken} refusal={}",
        refusal.replace(' ', "_")
    );
}

/// The reply heap fetch (`Request::OpenReplyHeap`), attacked by a permitted caller: after
/// the victim's 1 MiB call of `bank` (so its channel has a reply heap, with the reply in
/// it), the attacker asks for the reply heap of every channel id up to 256. The broker
/// hands a channel's reply heap only to that channel's caller: none is opened. (Without
/// the caller check in `State::open_reply_heap`, the attacker got the victim's.) Each id
/// is also asked for as a previous broker's channel under a guessed token, and so is its
/// request heap (`OpenRequestHeap`): none opened.
#[test]
fn a_caller_cannot_open_another_caller_s_reply_heap() {
    let Some((bus, _)) = policed_bus() else {
        return;
    };
    let _b = bus.serve("bank", "b1", &["--max-message", "4194304"]);
    let victim = bus.connect();
    victim_calls_of(&victim, 2, "before", 1 << 20);
    let r = result_of(&run_attacker(bus.path(), "open-reply-heaps", ""));
    eprintln!("attacker: {r:?}");
    assert_eq!(
        value(&r, "opened"),
        "0",
        "a reply heap was handed out: {r:?}"
    );
    assert!(
        value(&r, "refusal").contains("is_not_one_of_yours"),
        "{r:?}"
    );
    victim_calls_of(&victim, 2, "after", 1 << 20);
}

/// Registers an instance `id` of `pub` (4 KiB messages) on a raw connection, its own
/// segment made here; the broker's answer.
fn raw_register_pub(raw: &mut Raw, id: &str) -> Response {
    let (own, _map) = aegis_client::layout::InstanceSeg::create_own(0, 2 * 4096).unwrap();
    raw.ask_with_fds(
        &Request::Register {
            service: "pub".into(),
            instance_id: id.into(),
            metadata: Vec::new(),
            config: aegis_client::ServiceConfig {
                max_message: Some(4096),
                ..Default::default()
            },
            heartbeat: Default::default(),
            resume: None,
        },
        &[own.as_fd()],
    )
    .unwrap()
}

/// Asks for the reply heap of each channel id below 256 on a raw caller connection.
fn attack_open_reply_heaps(dir: &Path) {
    let mut raw = Raw::connect(dir).expect("the attacker may connect");
    let (mut opened, mut refusal) = (0, String::new());
    let epoch = raw.2;
    for channel in 0..256u64 {
        // As the current broker's channel, and as a previous broker's under a guessed token.
        let previous = Request::OpenReplyHeap {
            channel,
            epoch: epoch ^ 1,
            token: [channel, 7],
        };
        if let (Response::Opened, fds) = raw.ask_fds(&previous).unwrap() {
            opened += fds.len();
        }
        // And a previous broker's channel's request heap, as if it served the instance.
        let request_heap = Request::OpenRequestHeap {
            channel,
            token: [channel, 7],
        };
        if let (Response::Opened, fds) = raw.ask_fds(&request_heap).unwrap() {
            opened += fds.len();
        }
        let open = Request::OpenReplyHeap {
            channel,
            epoch,
            token: [0, 0],
        };
        match raw.ask_fds(&open).unwrap() {
            (Response::Opened, fds) if !fds.is_empty() => opened += 1,
            (Response::Error(e), _) => refusal = aegis_client::error::Error::from(e).to_string(),
            (other, _) => panic!("{other:?}"),
        }
    }
    println!(
        "\nRESULT opened={opened} refusal={}",
        refusal.replace(' ', "_")
    );
}

/// Makes one 1 MiB call of `bank` and says how it went.
fn attack_large_call(dir: &Path) {
    let bus = Bus::connect_dir(dir).expect("the attacker may connect");
    let opts = CallOptions::timeout(Duration::from_secs(5));
    let payload = vec![0xeeu8; 1 << 20];
    let mut out = Vec::new();
    let call = match bus.call_into("bank", "echo", &payload, &opts, &mut out) {
        Ok(_) if out == payload => "ok".to_owned(),
        Ok(_) => "other_payload".to_owned(),
        Err(e) => e.to_string().replace(' ', "_"),
    };
    println!("\nRESULT call={call}");
}

/// As [`run_attacker`], but spawned with its stdout piped for the test to read as it goes.
fn run_attacker_spawn(dir: &Path, attack: &str, targets: &str) -> support::Reaped {
    let mut c = attacker_command(dir, attack, targets);
    support::Reaped(c.spawn().unwrap())
}

fn result_of_text(out: &str) -> Vec<(String, String)> {
    let line = out
        .lines()
        .find_map(|l| l.split_once("RESULT ").map(|(_, r)| r))
        .unwrap_or_else(|| panic!("attacker printed no RESULT: {out}"));
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
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
        "breakers" => attack_breakers(Path::new(&dir)),
        "slots" => attack_slots(Path::new(&dir)),
        "quota" => attack_quota(Path::new(&dir)),
        "list-resources" => attack_list_resources(Path::new(&dir)),
        "own-stats" => attack_own_stats(Path::new(&dir), &targets),
        "report" => attack_report(Path::new(&dir), &targets),
        "hoard" => attack_hoard(Path::new(&dir)),
        "large-call" => attack_large_call(Path::new(&dir)),
        "hoard-across-restart" => attack_hoard_across_restart(Path::new(&dir)),
        "large-call-across-restart" => attack_large_call_across_restart(Path::new(&dir)),
        "plant-reply-heaps" => attack_plant_reply_heaps(Path::new(&dir)),
        "open-reply-heaps" => attack_open_reply_heaps(Path::new(&dir)),
        "rewrite" => attack_rewrite(Path::new(&dir), &targets),
        "hold" => attack_hold(Path::new(&dir), &targets),
        "false-scan" => attack_false_scan(Path::new(&dir), &targets),
        "shared" => attack_shared(Path::new(&dir)),
        "doorbell-header" => attack_doorbell_header(Path::new(&dir), &targets),
        "selections" => attack_selections(Path::new(&dir), &targets),
        "forge" => serve_pub_while(Path::new(&dir), forge_replies),
        "alter" => serve_pub_while(Path::new(&dir), alter_requests),
        "scribble" => serve_pub_while(Path::new(&dir), scribble_client_headers),
        "reply-side" => attack_reply_side(Path::new(&dir), &targets),
        "request-side" => serve_pub_while(Path::new(&dir), write_request_sides),
        other => panic!("unknown attack {other}"),
    }
}

/// What a permitted caller is handed for each target instance: its ring segment (the
/// doorbell) mapped writable, and its own channel, as a raw connection gets them.
fn open_as_caller(
    raw: &mut Raw,
    targets: &[(u32, u64)],
) -> Vec<(
    aegis_client::layout::InstanceSeg,
    aegis_client::layout::ChannelSeg,
)> {
    use aegis_client::layout::{ChannelSeg, InstanceSeg, Mapping};
    let mut out = Vec::new();
    for &(instance, incarnation) in targets {
        let (resp, fds) = raw
            .ask_fds(&Request::OpenInstance {
                instance,
                incarnation,
            })
            .unwrap();
        let Response::OpenedInstances(ids) = resp else {
            panic!("{resp:?}");
        };
        let Some(k) = ids.iter().position(|&i| i == (instance, incarnation)) else {
            continue;
        };
        let fds = &fds[4 * k..4 * k + 4];
        let (_, h) = Mapping::open(&fds[0], SegmentKind::Instance, true, None).unwrap();
        // The ring segment alone matters; a private stand-in for the instance's own
        // segment (read-only to us) completes it.
        let (_, own) = InstanceSeg::create_own(h.bus_epoch, h.params[1]).unwrap();
        let ring = InstanceSeg::open(&fds[0], own, h.bus_epoch, instance, incarnation).unwrap();
        let chan = ChannelSeg::open(
            &fds[2],
            &fds[3],
            h.bus_epoch,
            Some((instance, incarnation)),
            aegis_client::layout::Party::Caller,
        )
        .unwrap();
        out.push((ring, chan));
    }
    out
}

/// Every slot of a ring (`base`, `count` slots of `stride`): rewrites the payload bytes
/// `to=alice amount=0010` into `to=mallo amount=9999`; returns how many it rewrote.
fn rewrite_slots(base: *mut u8, stride: usize, count: usize) -> usize {
    const FROM: &[u8] = b"to=alice amount=0010";
    const TO: &[u8] = b"to=mallo amount=9999";
    let mut n = 0;
    for i in 0..count {
        // SAFETY: slot `i` lies inside the mapping (i < count); we read and write its
        // bytes as a hostile peer would, with volatile accesses.
        unsafe {
            let slot = base.add(i * stride);
            for off in (128..stride - FROM.len()).take(256) {
                let p = slot.add(off);
                if (0..FROM.len()).all(|k| p.add(k).read_volatile() == FROM[k]) {
                    for (k, b) in TO.iter().enumerate() {
                        p.add(k).write_volatile(*b);
                    }
                    n += 1;
                }
            }
        }
    }
    n
}

/// Rewrites for 2 s every request it can find in what it is handed (see the test).
fn attack_rewrite(dir: &Path, targets: &[(u32, u64)]) {
    let mut raw = Raw::connect(dir).unwrap();
    let opened = open_as_caller(&mut raw, targets);
    let mut rewritten = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        for (ring, chan) in &opened {
            rewritten += rewrite_slots(
                ring.slots_base(),
                ring.layout.slot_stride(),
                ring.layout.slot_count as usize,
            );
            rewritten += rewrite_slots(
                chan.slots_base(),
                chan.layout.slot_stride(),
                chan.layout.slot_count as usize,
            );
        }
    }
    println!("\nRESULT opened={} rewritten={rewritten}", opened.len());
}

/// Claims a slot in every ring and channel it is handed, publishes none, says so, and
/// holds them until its stdin closes.
fn attack_hold(dir: &Path, targets: &[(u32, u64)]) {
    use std::io::Write;
    let mut raw = Raw::connect(dir).unwrap();
    let opened = open_as_caller(&mut raw, targets);
    let mut claims = Vec::new();
    for (_, chan) in &opened {
        claims.extend(chan.ring().try_claim().ok());
    }
    println!("\nRESULT held={}", claims.len());
    std::io::stdout().flush().unwrap();
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
    // Never published: forgotten, not dropped (a dropped claim publishes as aborted).
    std::mem::forget(claims);
}

/// A real caller of `bank` (so the broker knows us as its client), and what a raw
/// connection of ours is handed for each target (`OpenInstance`, which a permitted caller
/// may ask): both connections (keep them while attacking: the channels live as long as
/// the raw one) and each target's descriptors.
fn bank_caller_opening(dir: &Path, targets: &[(u32, u64)]) -> ((Bus, Raw), Vec<Vec<OwnedFd>>) {
    let bus = Bus::connect_dir(dir).expect("the attacker may connect");
    bus.call(
        "bank",
        "echo",
        b"hello",
        &CallOptions::timeout(Duration::from_secs(5)),
    )
    .expect("the attacker may call bank");
    let mut raw = Raw::connect(dir).unwrap();
    let opened = targets
        .iter()
        .map(|&(instance, incarnation)| {
            let (resp, fds) = raw_open(&mut raw, instance, incarnation);
            assert!(
                matches!(resp, Response::OpenedInstances(_)),
                "OpenInstance refused: {resp:?}"
            );
            fds
        })
        .collect();
    ((bus, raw), opened)
}

/// Asks the broker for each target's segments (a permitted caller may), then tries every
/// way to write the instance-written words (served, progress and failed counters at
/// offsets 64, 72 and 80 of the segment holding them, in the previous design as now).
fn attack_instance_own(dir: &Path, targets: &[(u32, u64)]) {
    let (bus, opened) = bank_caller_opening(dir, targets);
    let mut tally = Tally::default();
    for ((instance, _), fds) in targets.iter().zip(opened) {
        let instance = *instance;
        for fd in fds {
            // The segment holding the counters: the instance's own segment now, the one
            // instance segment before.
            let kind = segment_kind(&fd);
            if kind != Some(SegmentKind::InstanceOwn as u32)
                && !(kind == Some(SegmentKind::Instance as u32) && fd_count_was_one(instance))
            {
                continue;
            }
            tally.add(try_writes(&fd));
        }
    }
    // What an attacker does with a writable mapping: pin the progress word and forge the
    // counters, for a second.
    let until = Instant::now() + Duration::from_secs(1);
    while !tally.maps.is_empty() && Instant::now() < until {
        for &m in &tally.maps {
            // SAFETY: writable shared mappings of at least a page (segments are larger);
            // offsets 64..88 are inside.
            unsafe {
                std::ptr::write_volatile((m + 72) as *mut u64, 7);
                std::ptr::write_volatile((m + 80) as *mut u64, 999_999_999_999);
            }
        }
    }
    println!("\nRESULT {}", tally.report("own_segments"));
    drop(bus);
}

/// Every way to write a segment through a descriptor we were handed (see [`try_writes`]),
/// and a writable reopen through `/proc/self/fd`.
fn try_writes_and_reopen(fd: &OwnedFd) -> Writes {
    let mut w = try_writes(fd);
    let reopened = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    w.record("reopen", reopened.map(drop));
    w
}

/// Opens each target as a caller and tries to write the reply side of its channel to it
/// (the segment holding the instance's ring head and answers: the `Reply` segment now; the
/// one `Channel` segment before it was split).
fn attack_reply_side(dir: &Path, targets: &[(u32, u64)]) {
    let (bus, opened) = bank_caller_opening(dir, targets);
    let mut tally = Tally::default();
    for fds in opened {
        let split = fds
            .iter()
            .any(|fd| segment_kind(fd) == Some(SegmentKind::Reply as u32));
        let holding = if split {
            SegmentKind::Reply
        } else {
            SegmentKind::Channel
        };
        for fd in fds
            .iter()
            .filter(|fd| segment_kind(fd) == Some(holding as u32))
        {
            tally.add(try_writes_and_reopen(fd));
        }
    }
    println!("\nRESULT {}", tally.report("segments"));
    drop(bus);
}

/// Tries every way to write each channel request side this (serving) process maps: its
/// callers' requests (the `Channel` segments among our mappings; the descriptors were
/// closed once mapped): a mapping that is writable already, `mprotect` to make it
/// writable, and a writable open of it through `/proc/self/map_files`.
fn write_request_sides(_: Duration) -> String {
    let mut tally = Tally::default();
    for m in bus_mappings(&["memfd:aegis-channel"]) {
        if m.kind != SegmentKind::Channel as u32 {
            continue;
        }
        let mut w = Writes::default();
        // SAFETY: mprotect of a whole mapping of ours, which nothing relies on staying
        // read-only if the kernel lets it become writable (the test then fails).
        let r = unsafe {
            libc::mprotect(
                m.start as *mut libc::c_void,
                m.len,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        let made_writable = if m.writable || r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        };
        w.record("mprotect", made_writable);
        let path = format!("/proc/self/map_files/{:x}-{:x}", m.start, m.start + m.len);
        let reopened = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path);
        w.record("reopen", reopened.map(drop));
        tally.add(w);
    }
    tally.report("segments")
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

/// Writes "open, 10^12 failures" into every [`CallerStats`] of `seg` from offset `at`
/// (`n` entries); returns how many it wrote.
fn forge_stats(map: usize, at: usize, n: usize, gens: &[u32]) -> usize {
    use aegis_client::layout::{CallerStats, BREAKER_OPEN};
    for k in 0..n {
        // SAFETY: the caller passes a writable mapping holding `n` CallerStats at `at`.
        let s = unsafe { &*((map + at + k * size_of::<CallerStats>()) as *const CallerStats) };
        s.breaker
            .store(BREAKER_OPEN, std::sync::atomic::Ordering::Relaxed);
        s.opened_ns.store(
            aegis_client::sys::monotonic_ns(),
            std::sync::atomic::Ordering::Relaxed,
        );
        s.failures_in_row
            .store(1000, std::sync::atomic::Ordering::Relaxed);
        // The service's current generation: a breaker opened before the last membership
        // change would let a probe through.
        let gen = gens.get(k).copied().unwrap_or(0);
        s.opened_gen
            .store(gen, std::sync::atomic::Ordering::Relaxed);
        for e in &s.errors {
            e.store(u64::MAX / 2 + 1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    n
}

/// Where the statistics of a segment of `kind` with `params` are, if it holds any: in a
/// caller segment now; in the client segment in the previous design (services in the top
/// half of `params[0]`, after the mailboxes).
fn stats_region(kind: u32, params: [u64; 4]) -> Option<(usize, usize)> {
    if kind == SegmentKind::Caller as u32 {
        return Some((64, params[0] as usize));
    }
    let services = (params[0] >> 32) as usize;
    if kind == SegmentKind::Client as u32 && services > 0 {
        let mailboxes = (params[0] & 0xffff_ffff) as usize;
        return Some((128 + mailboxes * (64 + params[1] as usize), services));
    }
    None
}

/// Maps `fd` writable if it can; with its header's kind and params.
fn map_writable(fd: &OwnedFd) -> Option<(usize, u32, [u64; 4])> {
    let len = aegis_client::sys::file_size(fd).ok()? as usize;
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
    if p == libc::MAP_FAILED || len < 64 {
        return None;
    }
    // SAFETY: the header is the first 64 bytes of the mapping.
    let h = unsafe { std::ptr::read_volatile(p as *const aegis_client::layout::SegmentHeader) };
    Some((p as usize, h.kind, h.params))
}

/// Serves `pub`; in the handler of the first request, writes "open" into every breaker
/// in every segment this process has mapped from the bus (found by name in /proc/self/fd
/// and /proc/self/maps): the victim's client segment among them.
fn attack_breakers(dir: &Path) {
    let bus = Bus::connect_dir(dir).expect("the attacker may connect");
    let inst = bus
        .register("pub", "p1", &[])
        .expect("the attacker may serve pub");
    let stop = inst.stop_handle();
    // The registry (read-only to everyone) tells each service's generation.
    let raw = Raw::connect(dir).unwrap();
    let reg = aegis_client::layout::RegistryView::open(&raw.1[0], false).unwrap();
    let gens: Vec<u32> = (0..reg.layout.max_services)
        .map(|i| {
            reg.service(i).map_or(0, |e| {
                e.generation.load(std::sync::atomic::Ordering::Relaxed)
            })
        })
        .collect();
    println!("\nSERVING");
    let (mut written, mut segments) = (0, 0);
    let mut once = false;
    inst.serve(|req, reply| {
        reply.extend_from_slice(req.payload());
        if !once {
            once = true;
            for m in writable_bus_mappings() {
                segments += 1;
                if let Some((at, n)) = stats_region(m.kind, m.params) {
                    written += forge_stats(m.start, at, n, &gens);
                }
            }
        }
        stop.stop();
        Ok(())
    })
    .ok();
    println!("\nRESULT segments={segments} written={written}");
}

/// Connects (as a caller with no right to `vault`), writes its own statistics for every
/// service, grants itself vault's instance `target`, writes again, and leaves.
fn attack_own_stats(dir: &Path, targets: &[(u32, u64)]) {
    let mut raw = Raw::connect(dir).unwrap();
    let mut written = 0;
    for _ in 0..2 {
        for fd in &raw.1 {
            if let Some((m, kind, params)) = map_writable(fd) {
                if let Some((at, n)) = stats_region(kind, params) {
                    written += forge_stats(m, at, n, &[]);
                }
            }
        }
        let r = raw.ask(&Request::Grant {
            instances: targets.to_vec(),
        });
        eprintln!("grant: {r:?}");
    }
    println!("\nRESULT written={written}");
}

/// Grants itself each target, reports it unhealthy and asks for its segments.
fn attack_report(dir: &Path, targets: &[(u32, u64)]) {
    let mut raw = Raw::connect(dir).unwrap();
    let verdict = |r: &Response| match r {
        Response::Error(_) => "refused",
        _ => "accepted",
    };
    let grant = raw.ask(&Request::Grant {
        instances: targets.to_vec(),
    });
    eprintln!("grant: {grant:?}");
    let (mut report, mut open) = ("refused", "refused");
    for &(instance, incarnation) in targets {
        let r = raw
            .ask(&Request::ReportUnhealthy {
                instance,
                incarnation,
                reason: "forged".into(),
            })
            .unwrap();
        eprintln!("report: {r:?}");
        if verdict(&r) == "accepted" {
            report = "accepted";
        }
        let (r, _) = raw_open(&mut raw, instance, incarnation);
        eprintln!("open: {r:?}");
        if verdict(&r) == "accepted" {
            open = "accepted";
        }
    }
    println!("\nRESULT report={report} open={open}");
}

/// A shared mapping of a bus segment in this process.
struct BusMapping {
    start: usize,
    len: usize,
    writable: bool,
    kind: u32,
    params: [u64; 4],
}

/// Every writable shared mapping of a bus segment (memfd named `aegis-*`) in this
/// process.
fn writable_bus_mappings() -> Vec<BusMapping> {
    let mut v = bus_mappings(&["memfd:aegis-"]);
    v.retain(|m| m.writable);
    v
}

/// Every shared mapping, at offset 0, of a memfd whose name starts with one of `names`
/// (e.g. `memfd:aegis-heap`) in this process.
fn bus_mappings(names: &[&str]) -> Vec<BusMapping> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter(|l| names.iter().any(|n| l.contains(&format!("/{n}"))))
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let range = f.next()?;
            let perms = f.next()?;
            let offset = u64::from_str_radix(f.next()?, 16).ok()?;
            if offset != 0 {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            let start = usize::from_str_radix(start, 16).ok()?;
            let end = usize::from_str_radix(end, 16).ok()?;
            // SAFETY: a live mapping of ours at offset 0 of a segment: its first 64 bytes
            // are the segment header.
            let h = unsafe {
                std::ptr::read_volatile(start as *const aegis_client::layout::SegmentHeader)
            };
            Some(BusMapping {
                start,
                len: end - start,
                writable: perms.starts_with("rw"),
                kind: h.kind,
                params: h.params,
            })
        })
        .collect()
}

/// Opens control connections and registers `pub` instances until refused.
fn attack_slots(dir: &Path) {
    let mut conns = Vec::new();
    let mut refusal = String::new();
    for _ in 0..16 {
        match Raw::connect(dir) {
            Ok(r) => conns.push(r),
            Err(e) => {
                refusal = e.to_string();
                break;
            }
        }
    }
    let mut instances = 0;
    if let Some(raw) = conns.first_mut() {
        for i in 0..16 {
            match raw_register_pub(raw, &format!("p{i}")) {
                Response::Registered { .. } => instances += 1,
                _ => break,
            }
        }
    }
    println!(
        "\nRESULT connections={} instances={instances} refusal={}",
        conns.len(),
        refusal.replace(' ', "_")
    );
}

/// Asks the control socket for every resource.
fn attack_list_resources(dir: &Path) {
    let mut raw = Raw::connect(dir).unwrap();
    let page = match raw
        .ask(&Request::QueryResources(Default::default()))
        .unwrap()
    {
        Response::Resources(p) => p,
        other => panic!("{other:?}"),
    };
    let ids: Vec<String> = page.items.iter().map(|r| r.id.clone()).collect();
    println!("\nRESULT total={} ids={}", page.total, ids.join(","));
}

/// What the three ways to write a segment did: `mmap(PROT_WRITE)`, `mprotect` of a
/// read-only mapping, `pwrite` (at offset 80).
#[derive(Default)]
struct Writes {
    writable: usize,
    errors: Vec<String>,
    /// The writable mappings obtained (addresses).
    maps: Vec<usize>,
}

impl Writes {
    /// One way of writing tried: let through, or refused with the error named `what`.
    fn record(&mut self, what: &str, r: std::io::Result<()>) {
        match r {
            Ok(()) => self.writable += 1,
            Err(e) => self.errors.push(format!("{what}:{e}")),
        }
    }
}

/// The ways of writing an attacker tried on each segment, summed for its `RESULT` line.
#[derive(Default)]
struct Tally {
    segments: usize,
    writable: usize,
    errors: Vec<String>,
    maps: Vec<usize>,
}

impl Tally {
    fn add(&mut self, w: Writes) {
        self.segments += 1;
        self.writable += w.writable;
        self.errors.extend(w.errors);
        self.maps.extend(w.maps);
    }

    /// `<segments>=N writable=N refused=N errors=…`, the segment count under `segments`.
    fn report(&self, segments: &str) -> String {
        format!(
            "{segments}={} writable={} refused={} errors={}",
            self.segments,
            self.writable,
            self.errors.len(),
            self.errors.join(",").replace(' ', "_")
        )
    }
}

fn try_writes(fd: &OwnedFd) -> Writes {
    let len = aegis_client::sys::file_size(fd).unwrap() as usize;
    let mut w = Writes::default();
    let map = |prot| {
        // SAFETY: mmap of a descriptor we hold; the result is checked by the caller.
        unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        }
    };
    // 1. A new writable shared mapping.
    let p = map(libc::PROT_READ | libc::PROT_WRITE);
    if p == libc::MAP_FAILED {
        w.errors
            .push(format!("mmap:{}", std::io::Error::last_os_error()));
    } else {
        w.writable += 1;
        w.maps.push(p as usize);
    }
    // 2. A read-only mapping made writable afterwards.
    let ro = map(libc::PROT_READ);
    assert_ne!(ro, libc::MAP_FAILED, "a read-only mapping is allowed");
    // SAFETY: mprotect of the mapping made just above.
    if unsafe { libc::mprotect(ro, len, libc::PROT_READ | libc::PROT_WRITE) } != 0 {
        w.errors
            .push(format!("mprotect:{}", std::io::Error::last_os_error()));
    } else {
        w.writable += 1;
        w.maps.push(ro as usize);
    }
    // 3. write(2).
    let forged = 999_999_999_999u64.to_le_bytes();
    // SAFETY: pwrite from a local buffer.
    let written = unsafe { libc::pwrite(fd.as_raw_fd(), forged.as_ptr().cast(), 8, 80) };
    w.record(
        "pwrite",
        if written < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        },
    );
    w
}

/// The registry a client is handed is sealed read-only: even a process of the broker's own
/// uid can neither map it writable, make its mapping writable, nor write(2) to it.
#[test]
fn the_registry_cannot_be_written_by_anyone_but_the_broker() {
    let bus = TestBus::start();
    let raw = Raw::connect(bus.path()).unwrap();
    let registry = &raw.1[0];
    assert_eq!(segment_kind(registry), Some(SegmentKind::Registry as u32));
    let w = try_writes(registry);
    assert_eq!(w.writable, 0, "the registry was writable: {:?}", w.errors);
    assert_eq!(w.errors.len(), 3, "{:?}", w.errors);
}

/// Claims resources and opens connections until refused.
fn attack_quota(dir: &Path) {
    let bus = Bus::connect_dir(dir).expect("a first connection fits the quota");
    let inst = bus
        .register_with(
            "pub",
            "q1",
            aegis_client::RegisterOptions {
                config: aegis_client::ServiceConfig {
                    max_message: Some(4096),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .expect("the attacker may serve pub");
    let mut claimed = 0;
    let mut claim_refusal = String::new();
    for i in 0..5 {
        match inst.claim(&[&format!("q-{i}")]) {
            Ok(()) => claimed += 1,
            Err(e) => {
                claim_refusal = e.to_string();
                break;
            }
        }
    }
    // Connections cost a page or two; each one's channel to `bank` costs its request heap
    // (32 MiB): the second one does not fit in 40 MiB.
    let mut conns = Vec::new();
    let mut connect_refusal = "none".to_owned();
    for _ in 0..3 {
        let opened = Bus::connect_dir(dir).and_then(|b| {
            drop(b.loan("bank", 8)?);
            Ok(b)
        });
        match opened {
            Ok(b) => conns.push(b),
            Err(e) => {
                connect_refusal = e.to_string();
                break;
            }
        }
    }
    println!(
        "\nRESULT claimed={claimed} claim_refusal={} connect_refusal={}",
        claim_refusal.replace(' ', "_"),
        connect_refusal.replace(' ', "_")
    );
}

/// Submits twelve 1 MiB calls to `bank`, one after another, each once its reply is in, and
/// never reads the replies: each lands in the instance's reply heap and stays there while
/// unread. Collects only the last one (an error reply, once refused, is small) and prints
/// why it failed, then holds the rest until killed.
fn attack_hoard(dir: &Path) {
    let bus = Bus::connect_dir(dir).expect("the attacker may connect");
    let opts = CallOptions::timeout(Duration::from_secs(5));
    let payload = vec![0xeeu8; 1 << 20];
    let mut held = Vec::new();
    for _ in 0..12 {
        let p = bus.submit("bank", "echo", &payload, &opts).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !p.is_ready() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        held.push(p);
    }
    let last = held.pop().unwrap();
    let mut out = Vec::new();
    let refusal = match last.wait(&mut out) {
        Ok(_) => "none".to_owned(),
        Err(e) => e.to_string().replace(' ', "_"),
    };
    println!("\nRESULT held={} refusal={refusal}", held.len());
    use std::io::Write;
    let _ = std::io::stdout().flush();
    std::thread::sleep(Duration::from_secs(600));
    drop(held);
}
