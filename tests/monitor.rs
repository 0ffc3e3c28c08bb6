//! `aegisctl monitor --json` streams events as they happen: an instance joining, claims,
//! and a SIGKILLed instance leaving (the delay from the kill to the event is printed).

mod support;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Instant;

use support::{wait_deadline, TestBus, DEADLINE};

#[test]
fn monitor_streams_joins_claims_and_a_killed_instance_leaving() {
    let bus = TestBus::start();
    let mut mon = Reap(
        bus.aegisctl(&["monitor", "mon", "--json"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = mpsc::channel::<serde_json::Value>();
    let stdout = mon.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(serde_json::from_str(&line).unwrap()).is_err() {
                return;
            }
        }
    });
    let next = |what: &str, want: &dyn Fn(&serde_json::Value) -> bool| -> serde_json::Value {
        let end = Instant::now() + DEADLINE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let ev = rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no {what} event within {DEADLINE:?}"));
            if want(&ev) {
                return ev;
            }
        }
    };
    next("watching", &|e| e["event"] == "watching");
    let mut a = bus.serve("mon", "a", &["--claim", "r-1"]);
    let joined = next("joined", &|e| {
        e["event"] == "joined" && e["instance"] == "a"
    });
    assert_eq!(joined["service"], "mon");
    let claimed = next("claimed", &|e| e["event"] == "claimed");
    assert_eq!(claimed["resource"], "r-1");
    assert_eq!(claimed["instance"], "a");
    let killed_at = Instant::now();
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(a.pid() as libc::pid_t, libc::SIGKILL) };
    // The instance's leaving and its resource's release come from one broker pass; the
    // monitor may print them in either order, so neither is skipped waiting for the other.
    let (mut left, mut released) = (None, None);
    let mut took = None;
    while left.is_none() || released.is_none() {
        let ev = next("left and released", &|e| {
            (e["event"] == "left" && e["instance"] == "a") || e["event"] == "released"
        });
        if ev["event"] == "left" {
            took = Some(killed_at.elapsed());
            left = Some(ev);
        } else {
            released = Some(ev);
        }
    }
    let (left, released, took) = (left.unwrap(), released.unwrap(), took.unwrap());
    println!(
        "SIGKILLed instance reported as left after {:.1} ms",
        took.as_secs_f64() * 1e3
    );
    // Whichever the broker noticed first: the process's exit or its connection closing.
    let reason = left["reason"].as_str().unwrap();
    assert!(
        reason.contains("exited") || reason.contains("connection closed"),
        "{left}"
    );
    assert_eq!(released["resource"], "r-1");
    wait_deadline(&mut a.child);
}

/// The monitor runs until killed: killed when the test ends, passed or failed.
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
