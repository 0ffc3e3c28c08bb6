//! `aegisctl` and `aegis-broker` as a user runs them: JSON output, exit codes, one-line
//! errors, broker lifecycle.

mod support;

use std::process::Command;

use support::{start_broker, wait_deadline, TestBus};

fn run(mut c: Command) -> (bool, String, String) {
    let out = c.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn call_json_names_the_instance_and_latency() {
    let bus = TestBus::start();
    let _s = bus.serve("cli", "cli-1", &[]);
    let (ok, out, err) =
        run(bus.aegisctl(&["call", "cli", "hello", "--data", "hi there", "--json"]));
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["reply"], "hi there");
    assert_eq!(v["instance_id"], "cli-1");
    assert!(v["latency_us"].as_f64().unwrap() > 0.0);
    // Plain output is the reply itself.
    let (ok, out, _) = run(bus.aegisctl(&["call", "cli", "hello", "--data", "plain"]));
    assert!(ok);
    assert_eq!(out, "plain\n");
}

#[test]
fn errors_exit_non_zero_with_one_line_reason() {
    let bus = TestBus::start();
    let (ok, out, err) = run(bus.aegisctl(&["call", "missing", "m", "--data", "x"]));
    assert!(!ok);
    assert!(out.is_empty());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("no available instance of service 'missing'"),
        "{err}"
    );
    let (ok, out, _) = run(bus.aegisctl(&["call", "missing", "m", "--json"]));
    assert!(!ok);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["error"], "NoAvailableInstance");
    assert_eq!(v["code"], 503);
    // No broker at all.
    let empty = tempfile::tempdir().unwrap();
    let mut c = Command::new(support::aegisctl_bin());
    c.arg("--dir").arg(empty.path()).arg("services");
    let (ok, _, err) = run(c);
    assert!(!ok);
    assert!(
        err.contains("broker unavailable at") && err.contains("control.sock"),
        "{err}"
    );
}

#[test]
fn services_and_service_show_instances_with_counters() {
    let bus = TestBus::start();
    let s = bus.serve("listed", "l-1", &[]);
    let (ok, _, err) = run(bus.aegisctl(&["call", "listed", "m", "--data", "x"]));
    assert!(ok, "{err}");
    let (ok, out, _) = run(bus.aegisctl(&["services", "--json"]));
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["name"], "listed");
    let (ok, out, _) = run(bus.aegisctl(&["service", "listed", "--json"]));
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let inst = &v["instances"][0];
    assert_eq!(inst["id"], "l-1");
    assert_eq!(inst["pid"], s.pid());
    assert_eq!(inst["status"], "Online");
    assert_eq!(inst["requests_served"], 1);
    let (ok, out, _) = run(bus.aegisctl(&["service", "listed"]));
    assert!(ok);
    assert!(
        out.lines()
            .any(|l| l.starts_with("l-1") && l.contains("Online")),
        "{out}"
    );
}

#[test]
fn broker_shuts_down_cleanly_on_sigterm_and_sigint() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let dir = tempfile::tempdir().unwrap();
        let mut b = start_broker(dir.path(), &[]);
        assert!(dir.path().join("control.sock").exists());
        // SAFETY: kill(2) on our child.
        unsafe { libc::kill(b.id() as libc::pid_t, sig) };
        let st = wait_deadline(&mut b);
        assert!(st.success(), "signal {sig}: {st:?}");
        assert!(
            !dir.path().join("control.sock").exists(),
            "socket left behind"
        );
        assert!(
            !dir.path().join("broker.lock").exists(),
            "lock file left behind"
        );
    }
}

#[test]
fn a_broker_killed_without_cleanup_is_replaced_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = start_broker(dir.path(), &[]);
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(b.id() as libc::pid_t, libc::SIGKILL) };
    wait_deadline(&mut b);
    assert!(
        dir.path().join("control.sock").exists(),
        "SIGKILL leaves the socket file"
    );
    // The next broker takes the lock, removes the stale socket and serves.
    let mut b2 = start_broker(dir.path(), &[]);
    let bus = aegis_client::Bus::connect_dir(dir.path()).unwrap();
    assert!(bus.services().unwrap().is_empty());
    drop(bus);
    support::terminate(&mut b2);
}

#[test]
fn demo_runs_with_only_aegisctl_built() {
    // A copy of aegisctl with no aegis-broker beside it: the demo must run the broker from
    // aegisctl itself (what `cargo run --bin aegisctl -- demo` gets on a fresh clone).
    let lone = tempfile::tempdir().unwrap();
    let exe = lone.path().join("aegisctl");
    std::fs::copy(support::aegisctl_bin(), &exe).unwrap();
    // Exec of a just-written file can fail with ETXTBSY while a child forked by another
    // test thread still holds the copy's write descriptor: retry until that child execs.
    let end = std::time::Instant::now() + support::DEADLINE;
    let output = std::iter::repeat(())
        .take_while(|()| std::time::Instant::now() < end)
        .find_map(
            |()| match Command::new(&exe).args(["demo", "--calls", "300"]).output() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                    std::thread::yield_now();
                    None
                }
                r => Some(r.unwrap()),
            },
        )
        .expect("the copied aegisctl stayed busy");
    let (ok, out, err) = (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    );
    assert!(ok, "demo failed: {err}\n{out}");
    for id in ["echo-1", "echo-2", "echo-3"] {
        assert!(
            out.lines()
                .any(|l| l.trim_start().starts_with(id) && l.contains(" 100 ")),
            "{id} did not get exactly 100 of 300 calls:\n{out}"
        );
    }
}

#[test]
fn top_draws_each_instance_with_its_rates_percentiles_queue_and_state() {
    let bus = TestBus::start();
    let _a = bus.serve("topped", "t-1", &[]);
    let _b = bus.serve("topped", "t-2", &[]);
    let client = bus.connect();
    for _ in 0..10 {
        client
            .call("topped", "m", b"x", &aegis_client::CallOptions::default())
            .unwrap();
    }
    let out = support::succeed(&mut bus.aegisctl(&[
        "top",
        "topped",
        "--iterations",
        "2",
        "--interval",
        "0.2",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("CALLS/S").count(), 2, "two tables: {text}");
    for id in ["t-1", "t-2"] {
        assert!(
            text.lines().any(|l| l.contains(id) && l.contains("Online")),
            "{id} missing: {text}"
        );
    }
    // The first table covers each instance's 5 calls: its p50 and p99 are bucket bounds.
    let first = text.split("CALLS/S").nth(1).unwrap();
    for id in ["t-1", "t-2"] {
        let line = first.lines().find(|l| l.contains(id)).unwrap();
        assert_eq!(line.matches('≤').count(), 2, "p50 and p99 of {id}: {line}");
    }
    let e = bus.aegisctl(&["top", "--interval", "0"]).output().unwrap();
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).contains("--interval 0"));
}
