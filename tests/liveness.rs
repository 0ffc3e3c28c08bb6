//! End-to-end fault tests: real broker, real instance processes, real signals. Each is
//! bounded by deadlines; none sleeps to wait for something it can wait on.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aegis_client::{Bus, CallOptions, Error, Selection, Status};
use support::{spawn_watched, wait_deadline, TestBus, DEADLINE};

/// Stops serving when dropped, also when an assertion fails (else a scope that serves
/// waits for ever).
struct StopOnDrop(aegis_client::StopHandle);
impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

fn kill(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a child process of this test.
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

fn routable(bus: &Bus, service: &str) -> Vec<String> {
    bus.routable_instances(service)
        .into_iter()
        .map(|(_, id, _)| id)
        .collect()
}

/// Waits on the service's generation futex until `cond` holds.
fn watch_until(bus: &Bus, service: &str, mut cond: impl FnMut(&Bus) -> bool) {
    let end = Instant::now() + DEADLINE;
    loop {
        let seen = bus.service_generation(service);
        if cond(bus) {
            return;
        }
        assert!(
            Instant::now() < end,
            "condition on service {service} not met within {DEADLINE:?}"
        );
        bus.watch(service, seen, end.saturating_duration_since(Instant::now()));
    }
}

/// Echo calls from `threads` threads until stopped, counting successes and failures; a
/// reply that is not the caller's own payload fails the test.
#[derive(Default)]
struct Load {
    stop: AtomicBool,
    ok: AtomicU64,
    failed: AtomicU64,
}

impl Load {
    fn start<'s>(
        &'s self,
        s: &'s std::thread::Scope<'s, '_>,
        client: &'s Bus,
        service: &'s str,
        threads: u64,
    ) {
        let opts = CallOptions {
            idempotent: true,
            ..CallOptions::timeout(Duration::from_secs(10))
        };
        for t in 0..threads {
            let opts = opts.clone();
            s.spawn(move || {
                let mut out = Vec::new();
                let mut i = 0u64;
                while !self.stop.load(Ordering::Relaxed) {
                    let p = [t.to_le_bytes(), i.to_le_bytes()].concat();
                    match client.call_into(service, "echo", &p, &opts, &mut out) {
                        Ok(_) if out == p => self.ok.fetch_add(1, Ordering::Relaxed),
                        Ok(_) => panic!("thread {t} call {i} got another call's reply"),
                        Err(e) => {
                            eprintln!("call failed: {e}");
                            self.failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    i += 1;
                }
            });
        }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Waits until `n` more calls have succeeded.
    fn wait_more(&self, what: &str, n: u64) {
        let base = self.ok();
        support::wait_for(what, || self.ok() >= base + n);
    }
}

#[test]
fn killing_2_of_10_instances_under_load_fails_no_call_and_they_leave_routing_at_once() {
    let bus = TestBus::start();
    let mut procs: Vec<_> = (0..10)
        .map(|i| bus.serve("ten", &format!("t{i}"), &[]))
        .collect();
    let client = bus.connect();
    let load = Load::default();
    let detection = std::thread::scope(|s| {
        load.start(s, &client, "ten", 4);
        load.wait_more("steady load", 2000);
        let victims: Vec<_> = procs.drain(..2).collect();
        let t0 = Instant::now();
        for v in &victims {
            kill(v.pid(), libc::SIGKILL);
        }
        watch_until(&client, "ten", |c| {
            let r = routable(c, "ten");
            !r.contains(&"t0".to_string()) && !r.contains(&"t1".to_string())
        });
        let detection = t0.elapsed();
        // Keep the load on the 8 survivors for a while after the kill.
        load.wait_more("load after the kill", 2000);
        load.stop.store(true, Ordering::Relaxed);
        drop(victims);
        detection
    });
    println!(
        "killed instances left routing {:.2} ms after SIGKILL",
        detection.as_secs_f64() * 1e3
    );
    assert_eq!(load.failed(), 0, "calls failed while instances were killed");
    assert_eq!(routable(&client, "ten").len(), 8);
    // Exit detection by pidfd (measured 1.2–2.4 ms), not the 100 ms polling tick nor a
    // heartbeat timeout (5 s): about 20 times the measured figure.
    assert!(
        detection < Duration::from_millis(50),
        "detection took {detection:?}"
    );
    let health = client.health(Some("ten")).unwrap();
    let departed: Vec<_> = health
        .iter()
        .filter(|h| h.status == Status::Offline)
        .collect();
    assert_eq!(departed.len(), 2);
    // Whichever exit signal the broker saw first: the pidfd or the closed control socket.
    for h in &departed {
        let why = &h.transitions.last().unwrap().reason;
        assert!(
            why.contains("exited") || why.contains("connection closed"),
            "{why}"
        );
    }
}

#[test]
fn a_stopped_instance_becomes_unhealthy_calls_go_elsewhere_and_it_returns_after_sigcont() {
    let bus = TestBus::start();
    let hb = [
        "--heartbeat-interval-ms",
        "50",
        "--heartbeat-timeout-ms",
        "400",
    ];
    let frozen = bus.serve("stop", "frozen", &hb);
    let _other = bus.serve("stop", "other", &hb);
    let client = bus.connect();
    kill(frozen.pid(), libc::SIGSTOP);
    let t0 = Instant::now();
    watch_until(&client, "stop", |c| {
        c.routable_instances("stop")
            .iter()
            .any(|(_, id, st)| id == "frozen" && *st == Status::Unhealthy)
    });
    println!(
        "SIGSTOPped instance Unhealthy after {:.0} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );
    for _ in 0..50 {
        let r = client
            .call(
                "stop",
                "m",
                b"x",
                &CallOptions::timeout(Duration::from_secs(5)),
            )
            .unwrap();
        assert_eq!(r.instance_id, "other");
    }
    kill(frozen.pid(), libc::SIGCONT);
    watch_until(&client, "stop", |c| {
        c.routable_instances("stop")
            .iter()
            .any(|(_, id, st)| id == "frozen" && *st == Status::Online)
    });
    let h = client.health(Some("stop")).unwrap();
    let f = h.iter().find(|h| h.id == "frozen").unwrap();
    let moves: Vec<_> = f.transitions.iter().map(|t| (t.from, t.to)).collect();
    assert_eq!(
        moves,
        vec![
            (Status::Online, Status::Unhealthy),
            (Status::Unhealthy, Status::Online)
        ]
    );
    assert!(
        f.transitions[0].reason.contains("no progress"),
        "{:?}",
        f.transitions[0]
    );
    // The CLI shows the same.
    let out = bus.aegisctl(&["health", "stop"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Online -> Unhealthy") && text.contains("Unhealthy -> Online"),
        "{text}"
    );
}

#[test]
fn a_producer_parked_or_killed_between_claim_and_publish_holds_up_no_other_caller() {
    let bus = TestBus::start();
    let _inst = bus.serve("wedge", "w", &[]);
    // A caller that parks for good right after claiming a slot of its channel to w.
    let mut c = bus.aegisctl(&["call", "wedge", "m", "--data", "never"]);
    c.env("AEGIS_TEST_PARK_AFTER_CLAIM", "1");
    let (mut parked, _, _) = spawn_watched(c).wait_for("parked");
    let client = bus.connect();
    // While it is alive, its claimed slot holds back only its own channel (before
    // channels, this call timed out behind it).
    let opts = CallOptions::timeout(Duration::from_millis(200));
    let r = client.call("wedge", "m", b"not held", &opts).unwrap();
    assert_eq!(r.payload, b"not held");
    kill(parked.id(), libc::SIGKILL);
    wait_deadline(&mut parked);
    // And after it died (its channel closed with its connection).
    for i in 0..100u32 {
        let r = client
            .call(
                "wedge",
                "m",
                &i.to_le_bytes(),
                &CallOptions::timeout(DEADLINE),
            )
            .unwrap();
        assert_eq!(r.payload, i.to_le_bytes());
    }
}

#[test]
fn a_call_on_an_instance_that_dies_while_handling_it_returns_promptly() {
    let bus = TestBus::start();
    // Idle, the loop proves progress every 10 ms; stuck in the 60 s handler, it stops.
    let slow = bus.serve("dies", "d", &support::STUCK_IN_HANDLER);
    let client = bus.connect();
    let t = std::thread::scope(|s| {
        let call = s.spawn(|| {
            let r = client.call(
                "dies",
                "m",
                b"x",
                &CallOptions::timeout(Duration::from_secs(30)),
            );
            (r, Instant::now())
        });
        // Wait until the instance is inside the handler (taken, no progress), then kill it.
        support::wait_for("the request to be taken", || {
            let h = &client.health(Some("dies")).unwrap()[0];
            h.queued == 0 && h.last_progress_ms >= 100
        });
        let killed_at = Instant::now();
        kill(slow.pid(), libc::SIGKILL);
        let (r, returned_at) = call.join().unwrap();
        match r {
            Err(Error::Timeout { attempts, .. }) => {
                assert_eq!(
                    attempts.len(),
                    1,
                    "not idempotent: no retry of a request that may have run"
                );
                assert!(attempts[0].error.contains("left"), "{attempts:?}");
            }
            other => panic!("expected Timeout listing the attempt, got {other:?}"),
        }
        returned_at.duration_since(killed_at)
    });
    println!(
        "call returned {:.1} ms after its instance died",
        t.as_secs_f64() * 1e3
    );
    // The waiting caller re-checks its instance every 5 ms (measured ~5.7 ms after the
    // kill): about 20 times that, far below the 10 s deadline a missed death waits for.
    assert!(
        t < Duration::from_millis(120),
        "waited {t:?}: for the deadline, not for the death"
    );
    drop(slow);
}

#[test]
fn nested_calls_past_the_hop_limit_are_loop_detected() {
    let bus = TestBus::start();
    let server = bus.connect();
    let inst = server.register("loop", "l", &[]).unwrap();
    let stop = inst.stop_handle();
    let caller = bus.connect();
    std::thread::scope(|s| {
        // Each hop is handled by a thread while the previous one waits for it.
        for _ in 0..10 {
            s.spawn(|| {
                inst.serve(|req, out| {
                    // Call ourselves again, one hop deeper, until the bus refuses.
                    match server.call("loop", "again", b"", &CallOptions::nested(req)) {
                        Ok(r) => out.extend_from_slice(&r.payload),
                        Err(Error::LoopDetected { hops, limit }) => out.extend_from_slice(
                            format!("refused at hop {hops} (limit {limit})").as_bytes(),
                        ),
                        Err(e) => out.extend_from_slice(format!("unexpected: {e}").as_bytes()),
                    }
                    Ok(())
                })
                .unwrap()
            });
        }
        let r = caller
            .call("loop", "start", b"", &CallOptions::default())
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&r.payload),
            "refused at hop 9 (limit 8)"
        );
        stop.stop();
    });
}

/// A handler sees its caller's deadline and W3C trace; a call it makes with
/// `CallOptions::nested` continues the trace (a new span) and ends by that deadline even
/// when its own timeout is longer.
#[test]
fn nested_calls_inherit_the_caller_s_deadline_and_trace() {
    let bus = TestBus::start();
    let server = bus.connect();
    let front = server.register("front", "f", &[]).unwrap();
    let back = server.register("back", "b", &[]).unwrap();
    let (stop_f, stop_b) = (front.stop_handle(), back.stop_handle());
    let caller = bus.connect();
    let trace = aegis_client::TraceContext::parse(
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )
    .unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            back.serve(|req, out| {
                let d = req.deadline().expect("a deadline travels with the call");
                let left = d.saturating_duration_since(std::time::Instant::now());
                out.extend_from_slice(
                    format!("{} {}", left.as_millis(), req.traceparent()).as_bytes(),
                );
                Ok(())
            })
            .unwrap()
        });
        s.spawn(|| {
            front
                .serve(|req, out| {
                    let mine = req.trace_context();
                    if req.method() == "slow" {
                        // Past our caller's deadline: the nested call fails at once.
                        std::thread::sleep(req.deadline().unwrap() - std::time::Instant::now());
                    }
                    let opts = CallOptions {
                        timeout: Duration::from_secs(60),
                        ..CallOptions::nested(req)
                    };
                    match server.call("back", "m", b"", &opts) {
                        Ok(r) => out.extend_from_slice(
                            format!(
                                "{} {}",
                                mine.traceparent(),
                                String::from_utf8_lossy(&r.payload)
                            )
                            .as_bytes(),
                        ),
                        Err(e) => out.extend_from_slice(format!("nested failed: {e}").as_bytes()),
                    }
                    Ok(())
                })
                .unwrap()
        });
        let opts = CallOptions {
            trace: Some(trace),
            ..CallOptions::timeout(Duration::from_millis(2000))
        };
        let r = caller.call("front", "m", b"", &opts).unwrap();
        let text = String::from_utf8(r.payload).unwrap();
        let parts: Vec<&str> = text.split(' ').collect();
        assert_eq!(parts.len(), 3, "{text}");
        let front_saw = aegis_client::TraceContext::parse(parts[0]).unwrap();
        let left: u64 = parts[1].parse().unwrap();
        let back_saw = aegis_client::TraceContext::parse(parts[2]).unwrap();
        assert_eq!(
            front_saw.trace_id, trace.trace_id,
            "the handler continues our trace"
        );
        assert_eq!(
            back_saw.trace_id, trace.trace_id,
            "the nested call continues it too"
        );
        assert_ne!(
            back_saw.span_id, front_saw.span_id,
            "each call is its own span"
        );
        assert_eq!((front_saw.flags, back_saw.flags), (1, 1));
        assert!(
            (1..=2000).contains(&left),
            "the nested call's handler saw {left} ms left: the outer 2 s deadline, not its own 60 s"
        );
        // A handler that is already past its caller's deadline: the nested call times out
        // at once instead of waiting 60 s (the outer caller has given up by then).
        let t = std::time::Instant::now();
        let slow = CallOptions {
            attempt_timeout: Duration::from_millis(300),
            ..CallOptions::timeout(Duration::from_millis(300))
        };
        let _ = caller.call("front", "slow", b"", &slow);
        stop_b.stop();
        stop_f.stop();
        // (The front handler's nested call must not hold the stop up for 60 s.)
        assert!(t.elapsed() < Duration::from_secs(5));
    });
}

#[test]
fn selection_strategies_and_exclusions() {
    let bus = TestBus::start();
    let a = bus.serve("sel", "a", &[]);
    let _b = bus.serve("sel", "b", &[]);
    let _c = bus.serve("sel", "c", &[]);
    let client = bus.connect();
    let call = |o: &CallOptions| client.call("sel", "m", b"x", o).unwrap().instance_id;
    let prefer_a = CallOptions {
        selection: Selection::Preferred("a".into()),
        ..Default::default()
    };
    assert!((0..20).all(|_| call(&prefer_a) == "a"));
    let not_b = CallOptions {
        exclude: vec!["b".into()],
        ..Default::default()
    };
    assert!((0..30).all(|_| call(&not_b) != "b"));
    let random = CallOptions {
        selection: Selection::Random,
        ..Default::default()
    };
    let mut seen: Vec<String> = (0..200).map(|_| call(&random)).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen, vec!["a", "b", "c"]);
    // The preferred instance leaves: calls fall back to the others.
    let gen = client.service_generation("sel");
    a.stop();
    client.watch("sel", gen, DEADLINE);
    assert!((0..20).all(|_| call(&prefer_a) != "a"));
    let only_b = CallOptions {
        exclude: vec!["a".into(), "c".into()],
        ..Default::default()
    };
    assert!((0..10).all(|_| call(&only_b) == "b"));
    let none = CallOptions {
        exclude: vec!["b".into(), "c".into()],
        ..Default::default()
    };
    assert!(matches!(
        client.call("sel", "m", b"x", &none),
        Err(Error::NoAvailableInstance { .. })
    ));
}

#[test]
fn watch_wakes_on_membership_changes() {
    let bus = TestBus::start();
    let client = bus.connect();
    let g0 = client.service_generation("w");
    std::thread::scope(|s| {
        let waiter = s.spawn(|| client.watch("w", g0, DEADLINE));
        let inst = bus.serve("w", "w1", &[]);
        let g1 = waiter.join().unwrap();
        assert_ne!(g1, g0, "watch returned without a change");
        assert_eq!(routable(&client, "w"), vec!["w1".to_string()]);
        let g1 = client.service_generation("w");
        let c = &client;
        let waiter = s.spawn(move || c.watch("w", g1, DEADLINE));
        inst.stop();
        assert_ne!(
            waiter.join().unwrap(),
            g1,
            "watch returned without a change"
        );
        assert!(routable(&client, "w").is_empty());
    });
}

#[test]
fn a_killed_broker_stops_no_call_and_instances_register_again_after_a_restart() {
    let mut bus = TestBus::start();
    let procs: Vec<_> = (0..3)
        .map(|i| bus.serve("br", &format!("b{i}"), &["--claim", &format!("res-{i}")]))
        .collect();
    let pids: Vec<u32> = procs.iter().map(|p| p.pid()).collect();
    let client = bus.connect();
    let load = Load::default();
    std::thread::scope(|s| {
        load.start(s, &client, "br", 2);
        load.wait_more("calls before the kill", 1000);
        kill(bus.broker.id(), libc::SIGKILL);
        wait_deadline(&mut bus.broker);
        // The data plane does not pass through the broker.
        load.wait_more("calls while the broker is down", 2000);
        assert_eq!(load.failed(), 0, "calls failed while the broker was down");

        bus.broker = support::start_broker(bus.path(), &[]);
        let restarted = Instant::now();
        let fresh = bus.connect();
        assert!(
            fresh.wait_until(DEADLINE, |b| b.routable_instances("br").len() == 3),
            "instances did not register again"
        );
        let took = restarted.elapsed();
        println!(
            "all 3 instances registered again {:.0} ms after the broker restarted",
            took.as_secs_f64() * 1e3
        );
        assert!(
            took < Duration::from_secs(2),
            "re-registration took {took:?}"
        );
        // Their resources came back with them.
        assert!(fresh.wait_until(DEADLINE, |b| (0..3)
            .all(|i| b.lookup_resource(&format!("res-{i}")).is_some())));
        for i in 0..3 {
            let r = fresh
                .call_resource(&format!("res-{i}"), "get", b"x", &CallOptions::default())
                .unwrap();
            assert_eq!(r.instance_id, format!("b{i}"));
        }
        // Calls kept going through all of it; the load's own connection is back too.
        load.wait_more("calls after the restart", 1000);
        load.stop.store(true, Ordering::Relaxed);
        assert!(client.wait_until(DEADLINE, |c| c.services().is_ok_and(|s| s.len() == 1)));
    });
    assert_eq!(load.failed(), 0);
    // The very same processes, not restarted ones.
    let now: Vec<u32> = bus
        .connect()
        .service("br")
        .unwrap()
        .instances
        .iter()
        .map(|i| i.pid)
        .collect();
    for pid in pids {
        assert!(now.contains(&pid), "instance process {pid} was replaced");
    }
    drop(procs);
}

/// Right after a restart a fresh process can take the client slot a caller had, so the
/// caller resumes under an identity only the new broker knows, and its calls reach an
/// instance that has not reconnected yet (here held back 500 ms). The instance must wait
/// for its own reconnect to resolve that caller, not drop the calls (each would time out).
#[test]
fn calls_from_a_caller_that_resumed_under_a_new_identity_reach_an_instance_still_reconnecting() {
    let mut bus = TestBus::start();
    let _late = bus
        .start_serve_env(
            "late",
            "l",
            &[],
            &[("AEGIS_TEST_RECONNECT_DELAY_MS", "500")],
        )
        .ready();
    let mut load = bus.aegisctl(&[
        "bench",
        "--service",
        "late",
        "--rate",
        "200",
        "--duration",
        "3",
        "--timeout-ms",
        "3000",
        "--verify",
        "--json",
    ]);
    // The load's reconnect is held back too, so fresh clients get to its slot first.
    load.env("AEGIS_TEST_RECONNECT_DELAY_MS", "200")
        .stdout(std::process::Stdio::piped());
    let mut load = support::Reaped(load.spawn().unwrap());
    let probe = bus.connect();
    support::wait_for("the load to reach the instance", || {
        probe.service("late").unwrap().instances[0].requests_served > 50
    });
    drop(probe);
    kill(bus.broker.id(), libc::SIGKILL);
    wait_deadline(&mut bus.broker);
    bus.broker = support::start_broker(bus.path(), &[]);
    // Every slot the old broker had given out (instance process, the load's two
    // connections, the probe) now goes to a fresh client.
    let fresh: Vec<_> = (0..4).map(|_| bus.connect()).collect();
    let st = wait_deadline(&mut load);
    let mut out = String::new();
    std::io::Read::read_to_string(load.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert!(st.success(), "bench failed: {out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let health = fresh[0].health(Some("late"));
    assert_eq!(v["errors"], 0, "{out}\n{health:?}");
    assert_eq!(v["mismatched"], 0, "{out}");
    assert_eq!(v["ok"], 600, "{out}");
    drop(fresh);
}

#[test]
fn three_consecutive_timeouts_mark_an_instance_unhealthy_until_it_makes_progress() {
    let bus = TestBus::start();
    // Answers after 300 ms; the loop is busy (no progress) meanwhile but comes back. Two
    // threads: the third call waits in the ring, which is what lets the broker confirm
    // the caller's report.
    let slow = bus.serve(
        "slowpoke",
        "s",
        &[
            "--delay-ms",
            "300",
            "--threads",
            "2",
            "--heartbeat-interval-ms",
            "50",
            "--heartbeat-timeout-ms",
            "1000",
        ],
    );
    let client = bus.connect();
    let quick = CallOptions::timeout(Duration::from_millis(30));
    // Two timeouts, then an answer: the count starts again. (Counted on, the third timeout
    // below would be reported while nothing waits in the ring, which the broker does not
    // confirm, and the fifth not at all: the instance would never be marked.)
    for i in 0..2 {
        match client.call("slowpoke", "m", b"x", &quick) {
            Err(Error::Timeout { .. }) => {}
            other => panic!("call {i}: expected a timeout, got {other:?}"),
        }
    }
    let answered = client.call("slowpoke", "m", b"between", &CallOptions::default());
    assert_eq!(answered.unwrap().payload, b"between");
    for i in 0..3 {
        match client.call("slowpoke", "m", b"x", &quick) {
            Err(Error::Timeout { .. }) => {}
            other => panic!("call {i}: expected a timeout, got {other:?}"),
        }
    }
    watch_until(&client, "slowpoke", |c| {
        c.routable_instances("slowpoke")
            .iter()
            .any(|(_, _, st)| *st == Status::Unhealthy)
    });
    assert!(matches!(
        client.call("slowpoke", "m", b"x", &quick),
        Err(Error::NoAvailableInstance { .. })
    ));
    let h = client.health(Some("slowpoke")).unwrap();
    assert!(
        h[0].transitions[0]
            .reason
            .contains("3 consecutive timeouts"),
        "{:?}",
        h[0].transitions
    );
    // Held out for one heartbeat timeout, then back once its loop shows progress.
    watch_until(&client, "slowpoke", |c| {
        c.routable_instances("slowpoke")
            .iter()
            .any(|(_, _, st)| *st == Status::Online)
    });
    assert_eq!(
        client
            .call("slowpoke", "m", b"ok", &CallOptions::default())
            .unwrap()
            .payload,
        b"ok"
    );
    drop(slow);
}

#[test]
fn a_caller_killed_mid_load_harms_neither_the_instance_nor_other_callers() {
    let bus = TestBus::start();
    let _inst = bus.serve("crash", "c", &["--threads", "2"]);
    let mut load = bus
        .aegisctl(&[
            "bench",
            "--service",
            "crash",
            "--clients",
            "8",
            "--duration",
            "30",
            "--payload",
            "20000",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .map(support::Reaped)
        .unwrap();
    let client = bus.connect();
    support::wait_for("the load to reach the instance", || {
        client.service("crash").unwrap().instances[0].requests_served > 500
    });
    kill(load.id(), libc::SIGKILL);
    wait_deadline(&mut load);
    // Replies it never read (20 kB: through the instance's heap) are dropped harmlessly.
    let p = vec![7u8; 20_000];
    for _ in 0..200 {
        assert_eq!(
            client
                .call("crash", "m", &p, &CallOptions::timeout(DEADLINE))
                .unwrap()
                .payload,
            p
        );
    }
    assert_eq!(
        client.health(Some("crash")).unwrap()[0].status,
        Status::Online
    );
}

#[test]
fn exit_detection_by_polling_tells_a_recycled_pid_from_the_registered_process() {
    use aegis_broker::liveness::same_process_alive;
    let bus = TestBus::start_with(&["--exit-detection", "poll"]);
    // A child of the instance process holds its control connection open: the broker
    // cannot learn of the death from the socket, only from polling the pid.
    let mut inst = bus
        .start_serve_env("poll", "p", &[], &[("AEGIS_TEST_FORK_HOLDER", "1")])
        .ready();
    let holder = inst.holder.expect("the instance forked a holder");
    let pid = inst.pid();
    let start = aegis_client::sys::process_start_time(pid).unwrap();
    assert!(same_process_alive(pid, Some(start)));
    // The same pid with another start time is what a recycled pid looks like.
    assert!(
        !same_process_alive(pid, Some(start + 1)),
        "a recycled pid was taken for the instance"
    );
    let client = bus.connect();
    assert_eq!(routable(&client, "poll"), vec!["p".to_string()]);
    kill(pid, libc::SIGKILL);
    wait_deadline(&mut inst.child);
    watch_until(&client, "poll", |c| routable(c, "poll").is_empty());
    assert!(!same_process_alive(pid, Some(start)));
    let h = client.health(Some("poll")).unwrap();
    kill(holder, libc::SIGKILL);
    assert_eq!(h[0].status, Status::Offline);
    let reason = &h[0].transitions.last().unwrap().reason;
    assert!(
        reason.contains("no longer running"),
        "not noticed by polling: {reason}"
    );
}

/// Instance flags for the stall tests: a heartbeat timeout far beyond the test, so only the
/// stall bound can move calls away.
const FAR_HEARTBEAT_TIMEOUT: [&str; 4] = [
    "--heartbeat-interval-ms",
    "1000",
    "--heartbeat-timeout-ms",
    "120000",
];

/// A 50 ms stall bound, and an attempt timeout the test would notice: without the
/// withdrawal, a request left in a stopped instance's ring would wait 30 s before going
/// elsewhere.
fn stall_test_options() -> CallOptions {
    CallOptions {
        stall_bound: Duration::from_millis(50),
        attempt_timeout: Duration::from_secs(30),
        timeout: Duration::from_secs(60),
        ..Default::default()
    }
}

#[test]
fn a_stopped_instance_s_untaken_request_is_withdrawn_answered_elsewhere_and_never_run() {
    let bus = TestBus::start();
    let hb = FAR_HEARTBEAT_TIMEOUT;
    let a = bus.serve("stall", "a", &hb);
    let _b = bus.serve("stall", "b", &hb);
    let client = bus.connect();
    let opts = stall_test_options();
    let served = |id: &str| {
        let info = client.service("stall").unwrap();
        let i = info.instances.iter().find(|i| i.id == id).unwrap().clone();
        (i.requests_served, i.queued)
    };
    // Both instances answer (and this client's segments are mapped on both sides).
    let mut by = std::collections::HashMap::new();
    for _ in 0..4 {
        let r = client.call("stall", "m", b"warm", &opts).unwrap();
        *by.entry(r.instance_id).or_insert(0u64) += 1;
    }
    assert_eq!((by["a"], by["b"]), (2, 2), "round-robin over both");
    kill(a.pid(), libc::SIGSTOP);
    support::wait_for("the instance to stop", || support::is_stopped(a.pid()));
    for i in 0..20u32 {
        let payload = format!("call {i}");
        let t = Instant::now();
        let r = client
            .call("stall", "m", payload.as_bytes(), &opts)
            .unwrap();
        assert_eq!(r.instance_id, "b");
        assert_eq!(r.payload, payload.as_bytes());
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "call {i} waited {:?}: it was not withdrawn from the stopped instance",
            t.elapsed()
        );
    }
    // Exactly one request reached the stopped instance's ring; every later call avoided it.
    assert_eq!(served("a"), (2, 1));
    kill(a.pid(), libc::SIGCONT);
    support::wait_for("the resumed instance to drain its ring", || {
        served("a").1 == 0
    });
    // The withdrawn request was taken off the ring but never run (nothing answered it),
    // and each of the 20 ran once, on b.
    assert_eq!(served("a"), (2, 0));
    assert_eq!(served("b").0, 2 + 20);
    // Moving again, the instance is routed to again.
    let ids: Vec<String> = (0..4)
        .map(|_| client.call("stall", "m", b"x", &opts).unwrap().instance_id)
        .collect();
    assert!(ids.iter().any(|i| i == "a"), "{ids:?}");
}

#[test]
fn requests_withdrawn_from_stalled_instances_do_not_use_up_the_call_s_attempts() {
    // Three of four instances stop at once (a host hiccup, or a bad deploy): one call meets
    // all three in turn. Each withdrawal moves a request that never ran, so the call must
    // reach the fourth instance, not fail after its three attempts.
    let bus = TestBus::start();
    let hb = FAR_HEARTBEAT_TIMEOUT;
    let ids = ["a", "b", "c", "d"];
    let instances: Vec<_> = ids.iter().map(|id| bus.serve("stall3", id, &hb)).collect();
    let client = bus.connect();
    let opts = stall_test_options();
    assert_eq!(opts.max_attempts, 3, "the default this test is about");
    // Round-robin warm-up: a connection's calls go to the instances in turn, from wherever
    // its counter starts (a random place); after the one that went to "d", the next call
    // starts at "a", then "b", "c", "d".
    let call = || {
        client
            .call("stall3", "m", b"warm", &opts)
            .unwrap()
            .instance_id
    };
    let mut turn: Vec<String> = (0..4).map(|_| call()).collect();
    let at = turn
        .iter()
        .position(|i| i == "a")
        .expect("a call went to a");
    turn.rotate_left(at);
    assert_eq!(turn, ids, "one call to each, in turn");
    while call() != "d" {}
    for id in ids {
        assert_eq!(call(), id);
    }
    let info = client.service("stall3").unwrap();
    let warm = |id: &str| {
        let i = info.instances.iter().find(|i| i.id == id).unwrap();
        i.requests_served
    };
    let warm: Vec<u64> = ids.iter().map(|id| warm(id)).collect();
    for i in &instances[..3] {
        kill(i.pid(), libc::SIGSTOP);
        support::wait_for("the instance to stop", || support::is_stopped(i.pid()));
    }
    for i in 0..8u32 {
        let payload = format!("call {i}");
        let r = client
            .call("stall3", "m", payload.as_bytes(), &opts)
            .unwrap_or_else(|e| panic!("call {i}: {e}"));
        assert_eq!(
            (r.instance_id.as_str(), &r.payload[..]),
            ("d", payload.as_bytes())
        );
    }
    let info = client.service("stall3").unwrap();
    let served = |id: &str| {
        let i = info.instances.iter().find(|i| i.id == id).unwrap();
        (i.requests_served, i.queued)
    };
    // The first call left one request in each stopped ring; later calls avoided them.
    for (k, id) in ["a", "b", "c"].into_iter().enumerate() {
        assert_eq!(served(id), (warm[k], 1), "{id}");
    }
    assert_eq!(served("d").0, warm[3] + 8);
    for i in &instances[..3] {
        kill(i.pid(), libc::SIGCONT);
    }
    support::wait_for("the resumed instances to drain their rings", || {
        let info = client.service("stall3").unwrap();
        info.instances.iter().all(|i| i.queued == 0)
    });
    // The withdrawn requests never ran.
    let info = client.service("stall3").unwrap();
    for i in &info.instances {
        let k = ids.iter().position(|id| *id == i.id).unwrap();
        let want = warm[k] + if i.id == "d" { 8 } else { 0 };
        assert_eq!(i.requests_served, want, "{}", i.id);
    }
}

#[test]
fn a_zero_stall_bound_is_refused_by_name() {
    let bus = TestBus::start();
    let _a = bus.serve("stall0", "a", &[]);
    let client = bus.connect();
    let opts = CallOptions {
        stall_bound: Duration::ZERO,
        ..Default::default()
    };
    match client.call("stall0", "m", b"x", &opts) {
        Err(Error::BadRequest(m)) => assert!(m.contains("stall_bound"), "{m}"),
        other => panic!("expected BadRequest, got {other:?}"),
    }
}

/// A call that timed out while its instance was running it keeps its mailbox quarantined
/// (a late reply may still land) only as long as that instance's process lives: once it is
/// killed, the mailbox comes back at once, not after the 60 s expiry.
#[test]
fn a_dead_taker_s_quarantined_mailbox_comes_back_at_once() {
    let bus = TestBus::start();
    let slow = bus.serve("q", "slow", &["--delay-ms", "60000"]);
    let client = bus.connect_with(aegis_client::BusOptions {
        mailboxes: 1,
        ..Default::default()
    });
    let opts = CallOptions::timeout(Duration::from_millis(100));
    let e = client.call("q", "echo", b"1", &opts).unwrap_err();
    assert!(e.to_string().contains("taken but not answered"), "{e}");
    // The one mailbox is quarantined: the next call has none while the taker lives.
    let e = client.call("q", "echo", b"2", &opts).unwrap_err();
    assert!(matches!(e, Error::LimitExceeded(_)), "{e}");
    let pid = slow.pid();
    kill(pid, libc::SIGKILL);
    let _fast = bus.serve("q", "fast", &[]);
    let t = Instant::now();
    support::wait_for("the mailbox to come back", || {
        client.call("q", "echo", b"3", &opts).is_ok()
    });
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "quarantine outlived its dead taker by {:?}",
        t.elapsed()
    );
    drop(slow);
}

/// A request an instance took and did not answer within the attempt is in doubt: without
/// `idempotent` the call fails saying so (it may have run; running it twice could be
/// wrong), with it the call goes to another instance and succeeds.
#[test]
fn a_request_in_doubt_is_retried_only_when_idempotent() {
    let bus = TestBus::start();
    let _slow = bus.serve("doubt", "slow", &["--delay-ms", "2000", "--threads", "4"]);
    let _fast = bus.serve("doubt", "fast", &[]);
    let client = bus.connect();
    let opts = |idempotent| CallOptions {
        idempotent,
        attempt_timeout: Duration::from_millis(200),
        selection: Selection::Preferred("slow".into()),
        ..CallOptions::timeout(Duration::from_secs(10))
    };
    let e = client.call("doubt", "m", b"x", &opts(false)).unwrap_err();
    match &e {
        Error::Timeout { attempts, .. } => {
            assert_eq!(attempts.len(), 1, "{e}");
            assert_eq!(attempts[0].instance, "slow");
            assert!(attempts[0].error.contains("taken but not answered"), "{e}");
            // The error names the call's trace id.
            assert!(e.to_string().contains("(trace 0x"), "{e}");
        }
        other => panic!("expected a timeout in doubt, got {other}"),
    }
    let r = client.call("doubt", "m", b"x", &opts(true)).unwrap();
    assert_eq!(r.instance_id, "fast");
    assert_eq!(r.payload, b"x");
}

/// At most `max_attempts` (3 by default) instances are tried, however many there are.
#[test]
fn a_call_tries_at_most_three_instances() {
    let bus = TestBus::start();
    let _slow: Vec<_> = (0..5)
        .map(|i| {
            bus.serve(
                "cap",
                &format!("s{i}"),
                &["--delay-ms", "2000", "--threads", "2"],
            )
        })
        .collect();
    let client = bus.connect();
    let opts = CallOptions {
        idempotent: true,
        attempt_timeout: Duration::from_millis(100),
        ..CallOptions::timeout(Duration::from_secs(10))
    };
    let e = client.call("cap", "m", b"x", &opts).unwrap_err();
    match &e {
        Error::Timeout { attempts, .. } => {
            assert_eq!(attempts.len(), 3, "{e}");
            let mut ids: Vec<_> = attempts.iter().map(|a| a.instance.clone()).collect();
            ids.sort();
            ids.dedup();
            assert_eq!(ids.len(), 3, "an instance was tried twice: {e}");
        }
        other => panic!("expected a timeout after 3 attempts, got {other}"),
    }
}

/// After a broker restart, calls route on the previous broker's view while the new one has
/// no instance of the service yet, for up to 5 s (RESTART_BRIDGE) after the caller
/// reconnected; then they fail with `NoAvailableInstance` until the instance registers
/// again. Its re-registration is held back 8 s here (test hook) so the bridge's end shows.
#[test]
fn after_a_broker_restart_calls_route_on_the_previous_view_for_up_to_5_s() {
    let mut bus = TestBus::start();
    let _inst = bus
        .start_serve_env(
            "bridged",
            "b1",
            &[],
            &[("AEGIS_TEST_RECONNECT_DELAY_MS", "8000")],
        )
        .ready();
    let client = bus.connect();
    let opts = CallOptions::timeout(Duration::from_millis(500));
    client.call("bridged", "m", b"x", &opts).unwrap();
    kill(bus.broker.id(), libc::SIGKILL);
    wait_deadline(&mut bus.broker);
    bus.broker = support::start_broker(bus.path(), &[]);
    // The caller is back once the new broker answers it.
    support::wait_for("the caller reconnected", || client.services().is_ok());
    let reconnected = Instant::now();
    let mut last_ok = Duration::ZERO;
    let first_refused = loop {
        match client.call("bridged", "m", b"x", &opts) {
            Ok(r) => {
                assert_eq!(r.payload, b"x");
                last_ok = reconnected.elapsed();
            }
            Err(Error::NoAvailableInstance { .. }) => break reconnected.elapsed(),
            Err(e) => panic!(
                "unexpected failure {:?} after the restart: {e}",
                reconnected.elapsed()
            ),
        }
        assert!(
            reconnected.elapsed() < DEADLINE,
            "the old view was used forever"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    println!("calls on the old view until {last_ok:?}, refused from {first_refused:?}");
    assert!(
        last_ok >= Duration::from_secs(4) && first_refused <= Duration::from_secs(6),
        "old view used until {last_ok:?}, refused from {first_refused:?}: not the 5 s bridge"
    );
    // And the instance, once registered again, is called through the new broker.
    support::wait_for("the instance registered again", || {
        client.call("bridged", "m", b"x", &opts).is_ok()
    });
}

/// A bus with an echo instance of `big` and a caller whose channel to it has carried one
/// small call only (so it has no heap yet), with 10 s calls.
fn big_echo_bus() -> (TestBus, support::Served, Bus, CallOptions) {
    let bus = TestBus::start();
    let inst = bus.serve("big", "b1", &[]);
    let client = bus.connect();
    let opts = CallOptions::timeout(Duration::from_secs(10));
    assert_eq!(
        client.call("big", "echo", b"small", &opts).unwrap().payload,
        b"small"
    );
    (bus, inst, client, opts)
}

/// A channel the previous broker made, which carried only small calls (so it has no
/// request heap), gets none from the current broker: the first large request and the
/// first loan to its instance after a restart each go through, on a channel the current
/// broker makes. Also when sent while the broker is still away (waited for within the
/// attempt).
#[test]
fn after_a_broker_restart_the_first_large_request_and_loan_go_through() {
    let (mut bus, _inst, client, opts) = big_echo_bus();
    kill(bus.broker.id(), libc::SIGKILL);
    wait_deadline(&mut bus.broker);
    let large = vec![7u8; 64 << 10];
    std::thread::scope(|s| {
        // Sent while the broker is away: waits for it.
        let early = s.spawn(|| client.call("big", "echo", &large, &opts));
        std::thread::sleep(Duration::from_millis(100));
        bus.broker = support::start_broker(bus.path(), &[]);
        let r = early.join().unwrap().unwrap();
        assert_eq!(r.payload, large);
    });
    let r = client.call("big", "echo", &large, &opts).unwrap();
    assert_eq!(r.payload, large);
    let mut loan = client.loan("big", 64 << 10).unwrap();
    loan.fill(9);
    let r = client.call_loan("big", "echo", loan, &opts).unwrap();
    assert!(r.len() == 64 << 10 && r.iter().all(|&b| b == 9));
}

/// A channel the previous broker made cannot be given a reply heap by the current broker
/// (which never made it): after a restart, once the instance has registered again, the
/// caller replaces it with a channel of the current broker, so a large reply (to a small
/// request, which needs no request heap) goes through a reply heap of the new channel's own;
/// and the old channel, once the caller has let go of it, is unmapped by the instance too
/// (no broker will ever tell it that channel closed).
#[test]
fn after_a_broker_restart_a_previous_broker_s_channel_is_replaced_and_let_go() {
    let mut bus = TestBus::start();
    let server = bus.connect();
    let inst = server.register("rh", "r1", &[]).unwrap();
    let client = bus.connect();
    let opts = CallOptions::timeout(Duration::from_secs(10));
    std::thread::scope(|s| {
        let _stop = StopOnDrop(inst.stop_handle());
        s.spawn(|| {
            inst.serve(|req, out| {
                // "big": a 64 KiB reply to a small request.
                match req.payload() {
                    b"big" => out.resize(64 << 10, 5),
                    p => out.extend_from_slice(p),
                }
                Ok(())
            })
            .unwrap()
        });
        let heap_of = |r: &aegis_client::BorrowedReply| {
            assert!(r.len() == 64 << 10 && r.iter().all(|&b| b == 5));
            support::mapping_of(r)
        };
        // A second caller's channel gets its own reply heap.
        let other = bus.connect();
        let r = other.call_borrowed("rh", "m", b"big", &opts).unwrap();
        assert!(
            heap_of(&r).contains("memfd:aegis-reply-heap"),
            "{}",
            heap_of(&r)
        );
        drop(r);
        // Small calls only: this channel has no reply heap when the broker goes.
        assert_eq!(client.call("rh", "m", b"x", &opts).unwrap().payload, b"x");
        // Channels mapped in this process: each caller's (writable) and the instance's
        // (read-only) of each of the two channels.
        let channels = || {
            std::fs::read_to_string("/proc/self/maps")
                .unwrap()
                .matches("memfd:aegis-channel")
                .count()
        };
        assert_eq!(channels(), 4);
        kill(bus.broker.id(), libc::SIGKILL);
        wait_deadline(&mut bus.broker);
        bus.broker = support::start_broker(bus.path(), &[]);
        support::wait_for(
            "the caller reconnected and the instance registered again",
            || {
                client
                    .service("rh")
                    .is_ok_and(|s| s.instances.iter().any(|i| i.id == "r1"))
            },
        );
        let r = client.call_borrowed("rh", "m", b"big", &opts).unwrap();
        assert!(
            heap_of(&r).contains("memfd:aegis-reply-heap"),
            "a large reply after the restart went through {}",
            heap_of(&r)
        );
        drop(r);
        // The replaced channel is let go by both sides: 4 again (the new one's two, and the
        // other caller's old one, which it has not used since).
        support::wait_for(
            "the old channel unmapped by its caller and instance",
            || channels() == 4,
        );
    });
}

/// A large reply through a channel the previous broker made goes through a reply heap of
/// that channel's own, never the instance's memory shared by its callers: the caller
/// claims its old channels by their tokens when it reconnects, and the instance hands the
/// new broker a heap for the channel under the same token. Two calls are in flight
/// through the old channel when the broker is killed; the first one's handler returns
/// while the broker is away (the instance waits for it, within the call's deadline), the
/// second one's after it is back. Both replies are read from `memfd:aegis-reply-heap`
/// (before: from the instance's shared heap in `memfd:aegis-own`).
#[test]
fn a_large_reply_through_a_previous_broker_s_channel_goes_through_that_channel_s_heap() {
    let mut bus = TestBus::start();
    let server = bus.connect();
    let inst = server.register("rh", "r1", &[]).unwrap();
    // Handlers of "held" wait for this to reach their turn (1, then 2).
    let turn = AtomicU64::new(0);
    let started = AtomicU64::new(0);
    let client = bus.connect();
    let opts = CallOptions::timeout(Duration::from_secs(20));
    std::thread::scope(|s| {
        let _stop = StopOnDrop(inst.stop_handle());
        for _ in 0..2 {
            s.spawn(|| {
                inst.serve(|req, out| {
                    if req.method() == "held" {
                        let me = started.fetch_add(1, Ordering::SeqCst) + 1;
                        let deadline = Instant::now() + DEADLINE;
                        while turn.load(Ordering::SeqCst) < me && Instant::now() < deadline {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        out.resize(64 << 10, me as u8);
                    } else {
                        out.extend_from_slice(req.payload());
                    }
                    Ok(())
                })
                .unwrap()
            });
        }
        // Small calls only so far: the channel has no reply heap when the broker goes.
        assert_eq!(client.call("rh", "m", b"x", &opts).unwrap().payload, b"x");
        // Each reply: where it was read from, and its tag.
        let call = || {
            client.call_borrowed("rh", "held", b"", &opts).map(|r| {
                assert!(r.len() == 64 << 10 && r.iter().all(|&b| b == r[0]));
                (support::mapping_of(&r), r[0])
            })
        };
        let calls = [s.spawn(call), s.spawn(call)];
        support::wait_for("both calls taken", || started.load(Ordering::SeqCst) == 2);
        kill(bus.broker.id(), libc::SIGKILL);
        wait_deadline(&mut bus.broker);
        // The first reply is made while the broker is away.
        turn.store(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(200));
        bus.broker = support::start_broker(bus.path(), &[]);
        support::wait_for("the instance registered again", || {
            client
                .service("rh")
                .is_ok_and(|s| s.instances.iter().any(|i| i.id == "r1"))
        });
        turn.store(2, Ordering::SeqCst);
        let mut tags = Vec::new();
        for c in calls {
            let (heap, tag) = c.join().unwrap().unwrap();
            assert!(
                heap.contains("memfd:aegis-reply-heap"),
                "a large reply through the previous broker's channel went through {heap}"
            );
            tags.push(tag);
        }
        tags.sort();
        assert_eq!(tags, [1, 2]);
    });
}

/// The broker dies after an instance handed it a channel's new reply heap and before the
/// caller fetched it (the caller had not read the first large reply there yet): the
/// instance hands the next broker the heap again under the channel's token, and the
/// caller, reading the reply after the restart, gets it from that broker. (Before, that
/// call failed: "reply from instance #0: its reply heap: broker unavailable at …".)
#[test]
fn a_reply_heap_handed_to_a_broker_that_died_is_handed_to_the_next() {
    let (mut bus, _inst, client, opts) = big_echo_bus();
    let large = vec![7u8; 64 << 10];
    let pending = client.submit("big", "echo", &large, &opts).unwrap();
    support::wait_for("the large reply published", || pending.is_ready());
    kill(bus.broker.id(), libc::SIGKILL);
    wait_deadline(&mut bus.broker);
    bus.broker = support::start_broker(bus.path(), &[]);
    let mut out = Vec::new();
    pending.wait(&mut out).unwrap();
    assert!(out == large, "another payload");
}

/// The mirror image for a request: the caller hands a channel's request heap to a broker
/// that dies before the instance fetched it (the instance is stopped meanwhile). The
/// caller hands it to the next broker under the channel's token when it reconnects, and
/// the instance, meeting the request in the previous broker's channel, fetches it there.
/// (Before, the call failed: "bad request: malformed request payload (kind 1, 65536
/// bytes)".)
#[test]
fn a_request_heap_handed_to_a_broker_that_died_is_handed_to_the_next() {
    let (mut bus, inst, client, opts) = big_echo_bus();
    kill(inst.pid(), libc::SIGSTOP);
    let large = vec![7u8; 64 << 10];
    // Published, its heap handed to the broker (`ChannelHeap` answered), not yet fetched.
    let pending = client.submit("big", "echo", &large, &opts).unwrap();
    kill(bus.broker.id(), libc::SIGKILL);
    wait_deadline(&mut bus.broker);
    bus.broker = support::start_broker(bus.path(), &[]);
    kill(inst.pid(), libc::SIGCONT);
    let mut out = Vec::new();
    pending
        .wait(&mut out)
        .unwrap_or_else(|e| panic!("the large call failed: {e}"));
    assert!(out == large, "another payload");
}

/// A call already taken by an instance that then turns `Unhealthy` (its loop shows no
/// progress for the heartbeat timeout while the handler runs) is still waited for: the
/// instance is there, and the reply arrives. Only a departure ends the wait.
#[test]
fn a_call_in_flight_on_an_instance_turned_unhealthy_still_gets_its_reply() {
    let bus = TestBus::start();
    let _slow = bus.serve(
        "sluggish",
        "s",
        &[
            "--delay-ms",
            "1500",
            "--heartbeat-interval-ms",
            "10",
            "--heartbeat-timeout-ms",
            "300",
        ],
    );
    let client = bus.connect();
    std::thread::scope(|s| {
        let call = s.spawn(|| {
            client.call(
                "sluggish",
                "m",
                b"patience",
                &CallOptions::timeout(Duration::from_secs(20)),
            )
        });
        watch_until(&client, "sluggish", |c| {
            c.routable_instances("sluggish")
                .iter()
                .any(|(_, _, st)| *st == Status::Unhealthy)
        });
        let r = call
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("the call failed: {e}"));
        assert_eq!(r.payload, b"patience");
    });
}
