//! Chaos: 6 instances under 20 paced callers (2,000 calls/s each) for 30 s while an
//! instance is SIGKILLed and replaced every second, the broker is SIGKILLed and restarted
//! every 5 s, and an instance is SIGSTOPped for 2 s now and then. Idempotent calls must all
//! succeed; calls without `idempotent` may fail only when an instance took them and never
//! answered, and their error must say so.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aegis_client::{Bus, CallOptions};
use support::{wait_deadline, Served, TestBus};

const INSTANCES: usize = 6;
const CALLERS: u64 = 20;
const NON_IDEMPOTENT_CALLERS: u64 = 2;
const RATE_PER_CALLER: u64 = 2_000;
const RUN: Duration = Duration::from_secs(30);
/// How long the broker stays down each time it is killed.
const BROKER_DOWN: Duration = Duration::from_millis(300);

fn kill(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a child process of this test.
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    /// Non-idempotent calls that failed for another reason than "taken, never answered".
    wrong_failures: AtomicU64,
}

/// One paced caller with its own connection: a call every 1/rate seconds (as fast as it
/// can when behind), each payload unique, each reply checked to be its own.
fn caller(bus_dir: &std::path::Path, t: u64, idempotent: bool, stop: &AtomicBool, tally: &Tally) {
    let bus = Bus::connect_dir(bus_dir).expect("connect");
    let opts = CallOptions {
        idempotent,
        ..CallOptions::timeout(Duration::from_secs(10))
    };
    let period = Duration::from_nanos(1_000_000_000 / RATE_PER_CALLER);
    let start = Instant::now();
    let mut out = Vec::new();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let due = start + period * i as u32;
        if let Some(ahead) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(ahead);
        }
        let p = [t.to_le_bytes(), i.to_le_bytes()].concat();
        match bus.call_into("chaos", "echo", &p, &opts, &mut out) {
            Ok(_) => {
                assert_eq!(out, p, "caller {t} call {i} got another call's reply");
                tally.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                let text = e.to_string();
                eprintln!("caller {t} (idempotent {idempotent}) call {i} failed: {text}");
                tally.failed.fetch_add(1, Ordering::Relaxed);
                let in_doubt = text.contains("taken but not answered")
                    || text.contains("left while handling the request");
                if idempotent || !in_doubt {
                    tally.wrong_failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        i += 1;
    }
}

#[test]
fn chaos_30s_kills_stops_and_broker_restarts_fail_no_idempotent_call() {
    let mut bus = TestBus::start();
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("chaos seed {seed}");
    let mut rand = move |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    let mut spawned = 0usize;
    let mut serve = |bus: &TestBus| {
        spawned += 1;
        bus.serve("chaos", &format!("c{spawned}"), &[])
    };
    let mut procs: Vec<Served> = (0..INSTANCES).map(|_| serve(&bus)).collect();
    let (stop, idem, plain) = (AtomicBool::new(false), Tally::default(), Tally::default());
    let (mut kills, mut restarts, mut stops) = (0, 0, 0);
    std::thread::scope(|s| {
        let dir = bus.path().to_owned();
        for t in 0..CALLERS + NON_IDEMPOTENT_CALLERS {
            let (dir, stop) = (dir.clone(), &stop);
            let tally = if t < CALLERS { &idem } else { &plain };
            s.spawn(move || caller(&dir, t, t < CALLERS, stop, tally));
        }
        let start = Instant::now();
        let (mut next_kill, mut next_broker, mut next_stop) = (
            Duration::from_secs(1),
            Duration::from_secs(5),
            Duration::from_secs(3),
        );
        let mut stopped: Option<(u32, Instant)> = None;
        while start.elapsed() < RUN {
            let now = start.elapsed();
            if let Some((pid, since)) = stopped {
                if since.elapsed() >= Duration::from_secs(2) {
                    kill(pid, libc::SIGCONT);
                    stopped = None;
                }
            }
            let broker_due = now >= next_broker;
            if now >= next_kill || broker_due {
                next_kill += Duration::from_secs(1);
                // Never the stopped one: it is SIGCONTed by pid above.
                let candidates: Vec<usize> = (0..procs.len())
                    .filter(|&i| stopped.is_none_or(|(pid, _)| procs[i].pid() != pid))
                    .collect();
                let victim = candidates[rand(candidates.len())];
                let mut gone = procs.swap_remove(victim);
                kill(gone.pid(), libc::SIGKILL);
                wait_deadline(&mut gone.child);
                procs.push(serve(&bus));
                kills += 1;
            }
            if broker_due {
                // Right after a new instance joined, before every caller has mapped its
                // segment, and down for a while: callers that pick it must wait for the
                // next broker rather than fail.
                next_broker += Duration::from_secs(5);
                kill(bus.broker.id(), libc::SIGKILL);
                wait_deadline(&mut bus.broker);
                std::thread::sleep(BROKER_DOWN);
                bus.broker = support::start_broker(bus.path(), &[]);
                restarts += 1;
            }
            if now >= next_stop && stopped.is_none() {
                next_stop += Duration::from_secs(4 + rand(4) as u64);
                let pid = procs[rand(procs.len())].pid();
                kill(pid, libc::SIGSTOP);
                stopped = Some((pid, Instant::now()));
                stops += 1;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some((pid, _)) = stopped {
            kill(pid, libc::SIGCONT);
        }
        stop.store(true, Ordering::Relaxed);
    });
    let (ok, failed) = (
        idem.ok.load(Ordering::Relaxed),
        idem.failed.load(Ordering::Relaxed),
    );
    let (pok, pfailed, pwrong) = (
        plain.ok.load(Ordering::Relaxed),
        plain.failed.load(Ordering::Relaxed),
        plain.wrong_failures.load(Ordering::Relaxed),
    );
    println!(
        "{kills} instance kills, {restarts} broker restarts, {stops} stops; idempotent: {ok} ok, \
         {failed} failed; not idempotent: {pok} ok, {pfailed} failed ({pwrong} not in doubt)"
    );
    assert!(kills >= 25 && restarts >= 5 && stops >= 3);
    assert!(ok > 100_000, "the load hardly ran: {ok} calls");
    assert_eq!(failed, 0, "idempotent calls failed");
    assert_eq!(
        pwrong, 0,
        "a call without `idempotent` failed although no instance had taken it"
    );
    drop(procs);
}
