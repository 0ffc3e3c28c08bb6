//! `aegis-bridge` end to end: a real `nats-server` (JetStream on) on a free port, two buses
//! in two private directories ("two hosts"), each with its broker, echo instances and a
//! bridge. Calls go both ways by service name and by resource id; a claim conflicts across
//! hosts; local instances win over remote ones; killing nats-server fails no local call
//! while remote calls fail fast and come back with it; a dead bridge takes its stand-ins
//! out of routing at once.

mod support;

use std::time::{Duration, Instant};

use aegis_client::{Bus, CallOptions, Error};
use support::{start_bridge, wait_for, Guarded, Nats, TestBus};

/// Fields drop in order: the bridge stops before its broker does.
struct Host {
    _bridge: Guarded,
    client: Bus,
    bus: TestBus,
}

fn quick() -> CallOptions {
    CallOptions::timeout(Duration::from_secs(5))
}

/// Waits until `client` can call `service` and gets `instance`'s echo of `payload`.
fn wait_routable(client: &Bus, service: &str, instance: &str) {
    wait_for(&format!("{service} reachable as {instance}"), || {
        client
            .call(service, "echo", b"ping", &quick())
            .is_ok_and(|r| r.instance_id == instance && r.payload == b"ping")
    });
}

/// Host `name` with one echo instance `{svc}-1` of `svc` owning `res`, and its bridge
/// exporting and importing everything.
fn host(nats: &Nats, name: &str, svc: &str, res: &str) -> (Host, support::Served) {
    let bus = TestBus::start();
    let inst = bus.serve(svc, &format!("{svc}-1"), &["--claim", res]);
    let bridge = start_bridge(&bus, &nats.url(), name, &["--export", "*", "--import", "*"]);
    let client = bus.connect();
    (
        Host {
            _bridge: bridge,
            client,
            bus,
        },
        inst,
    )
}

#[test]
fn two_hosts_call_each_other_by_name_and_resource_and_conflict_across_hosts() {
    let nats = Nats::start();
    let (a, _alpha) = host(&nats, "hosta", "alpha", "doc-a");
    let (b, _beta) = host(&nats, "hostb", "beta", "doc-b");

    // By name, both ways: the stand-in answers with the remote instance's NATS id.
    wait_routable(&b.client, "alpha", "alpha-1@hosta");
    wait_routable(&a.client, "beta", "beta-1@hostb");
    let big = vec![7u8; 100_000];
    let r = b.client.call("alpha", "echo", &big, &quick()).unwrap();
    assert_eq!(r.payload, big, "bytes cross unchanged");

    // By resource id, both ways.
    wait_for("doc-a routable on host b", || {
        b.client
            .call_resource("doc-a", "echo", b"r", &quick())
            .is_ok_and(|r| r.instance_id == "alpha-1@hosta")
    });
    wait_for("doc-b routable on host a", || {
        a.client
            .call_resource("doc-b", "echo", b"r", &quick())
            .is_ok_and(|r| r.instance_id == "beta-1@hostb")
    });

    // A claim of another host's id conflicts exactly as a local one does.
    let local = b.client.register("gamma", "gamma-1", &[]).unwrap();
    match local.claim(&["doc-a"]) {
        Err(Error::ResourceConflict { resource, owner }) => {
            assert_eq!(
                (resource.as_str(), owner.as_str()),
                ("doc-a", "alpha-1@hosta")
            )
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    // A new id claimed on b is soon routable from a, and then conflicts there.
    local.claim(&["doc-g"]).unwrap();
    let _served = std::thread::spawn(move || {
        local.serve(|req, out| {
            out.extend_from_slice(req.payload());
            Ok(())
        })
    });
    wait_for("doc-g routable on host a", || {
        a.client
            .call_resource("doc-g", "echo", b"g", &quick())
            .is_ok_and(|r| r.instance_id == "gamma-1@hostb")
    });
    let there = a.client.register("delta", "delta-1", &[]).unwrap();
    assert!(matches!(
        there.claim(&["doc-g"]),
        Err(Error::ResourceConflict { .. })
    ));

    // Local instances always win over remote ones.
    let _alpha_b = b.bus.serve("alpha", "alpha-local", &[]);
    for _ in 0..20 {
        let r = b.client.call("alpha", "echo", b"x", &quick()).unwrap();
        assert_eq!(r.instance_id, "alpha-local");
    }

    // `aegisctl service` says which instances are remote and where.
    let out = b.bus.aegisctl(&["service", "alpha"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("alpha-1@hosta"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("remote:hosta"), "{text}");
    let local_line = text.lines().find(|l| l.starts_with("alpha-local")).unwrap();
    assert!(local_line.contains("local"), "{text}");
}

#[test]
fn nats_down_fails_no_local_call_remote_calls_fail_fast_and_come_back() {
    let mut nats = Nats::start();
    let (a, _alpha) = host(&nats, "hosta", "alpha", "doc-a");
    let (b, _beta) = host(&nats, "hostb", "beta", "doc-b");
    wait_routable(&b.client, "alpha", "alpha-1@hosta");

    // Local calls on both hosts keep going through the outage.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let callers: Vec<_> = [(a.client.clone(), "alpha"), (b.client.clone(), "beta")]
        .into_iter()
        .map(|(c, svc)| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let r = c.call(svc, "echo", b"local", &quick());
                    assert!(r.is_ok(), "local call failed during the outage: {r:?}");
                    n += 1;
                }
                n
            })
        })
        .collect();

    nats.kill();
    wait_for("remote calls to fail with NoAvailableInstance", || {
        matches!(
            b.client.call("alpha", "echo", b"x", &quick()),
            Err(Error::NoAvailableInstance { .. })
        )
    });
    let t = Instant::now();
    let e = b.client.call("alpha", "echo", b"x", &quick()).unwrap_err();
    assert!(matches!(e, Error::NoAvailableInstance { .. }), "{e}");
    assert!(
        t.elapsed() < Duration::from_millis(100),
        "a remote call while NATS is down fails fast, took {:?}",
        t.elapsed()
    );

    nats.restart();
    wait_routable(&b.client, "alpha", "alpha-1@hosta");
    wait_routable(&a.client, "beta", "beta-1@hostb");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in callers {
        assert!(c.join().unwrap() > 0, "the local caller made calls");
    }
}

#[test]
fn a_dead_bridge_takes_its_stand_ins_out_of_routing_at_once() {
    let nats = Nats::start();
    let (_a, _alpha) = host(&nats, "hosta", "alpha", "doc-a");
    let (mut b, _beta) = host(&nats, "hostb", "beta", "doc-b");
    wait_routable(&b.client, "alpha", "alpha-1@hosta");
    let _ = b._bridge.child.kill();
    let _ = b._bridge.child.wait();
    assert!(b.client.wait_until(support::DEADLINE, |c| c
        .routable_instances("alpha")
        .is_empty()));
    assert!(matches!(
        b.client.call("alpha", "echo", b"x", &quick()),
        Err(Error::NoAvailableInstance { .. })
    ));
}

#[test]
fn bad_settings_are_one_line_errors() {
    let bus = TestBus::start();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(support::bridge_bin())
            .arg("--dir")
            .arg(bus.path())
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        err
    };
    assert!(run(&["--export", "*"]).contains("--nats"));
    assert!(run(&["--nats", "nats://127.0.0.1:1"]).contains("--export"));
    assert!(run(&["--nats", "x", "--export", "a b"]).contains("pattern"));
    assert!(run(&["--nats", "x", "--export", "*", "--name", "a.b"]).contains("--name"));
    let cfg = bus.path().join("bridge.toml");
    std::fs::write(&cfg, "nats = \"nats://x\"\nexport = [\"*\"]\nexprot = 1\n").unwrap();
    let e = run(&["--config", cfg.to_str().unwrap()]);
    assert!(e.contains("line 3") && e.contains("exprot"), "{e}");
}

#[test]
fn an_id_released_while_its_bridge_was_down_leaves_the_bucket_when_it_returns() {
    let nats = Nats::start();
    let (a, _alpha) = host(&nats, "hosta", "alpha", "doc-a");
    let (b, _beta) = host(&nats, "hostb", "beta", "doc-b");
    wait_for("doc-a routable on host b", || {
        b.client
            .call_resource("doc-a", "echo", b"r", &quick())
            .is_ok_and(|r| r.instance_id == "alpha-1@hosta")
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let bucket = rt.block_on(async {
        let nc = async_nats::connect(nats.url()).await.unwrap();
        async_nats::jetstream::new(nc)
            .get_key_value("aegis_resources")
            .await
            .unwrap()
    });
    let key: String = std::iter::once("r".to_owned())
        .chain(b"doc-a".iter().map(|b| format!("{b:02x}")))
        .collect();
    let entry = || rt.block_on(bucket.get(&key)).unwrap();
    assert!(entry().is_some(), "host a's bridge wrote doc-a's owner");

    // The bridge goes away, the id is released meanwhile, the bridge comes back.
    let Host {
        _bridge: mut bridge,
        client: a_client,
        bus: a_bus,
    } = a;
    let _ = bridge.child.kill();
    let _ = bridge.child.wait();
    support::succeed(&mut a_bus.aegisctl(&["release", "doc-a"]));
    let _back = start_bridge(
        &a_bus,
        &nats.url(),
        "hosta",
        &["--export", "*", "--import", "*"],
    );
    wait_for("the stale doc-a entry to leave the bucket", || {
        entry().is_none()
    });
    // Host b no longer routes it to host a, and may claim it itself.
    wait_for("doc-a free on host b", || {
        matches!(
            b.client.call_resource("doc-a", "echo", b"r", &quick()),
            Err(Error::ResourceNotFound { .. })
        )
    });
    drop(a_client);
}

/// A call forwarded to another host carries what is left of the caller's deadline (not a
/// fixed 5 s) and its W3C trace: the remote handler sees both.
#[test]
fn a_forwarded_call_carries_the_caller_s_deadline_and_trace_to_the_remote_handler() {
    let nats = Nats::start();
    let (a, _alpha) = host(&nats, "hosta", "alpha", "doc-a");
    let (b, _beta) = host(&nats, "hostb", "beta", "doc-b");
    // On host A, an instance of `clock` answering with its request's remaining deadline
    // (ms) and traceparent.
    let inst = a.client.register("clock", "clock-1", &[]).unwrap();
    let stop = inst.stop_handle();
    let server = std::thread::spawn(move || {
        inst.serve(|req, out| {
            let left = req.deadline().map_or(-1, |d| {
                d.saturating_duration_since(std::time::Instant::now())
                    .as_millis() as i64
            });
            out.extend_from_slice(format!("{left} {}", req.traceparent()).as_bytes());
            Ok(())
        })
    });
    wait_for("clock reachable from host b", || {
        b.client.call("clock", "now", b"", &quick()).is_ok()
    });
    let trace = aegis_client::TraceContext::parse(
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    )
    .unwrap();
    let opts = CallOptions {
        trace: Some(trace),
        ..CallOptions::timeout(Duration::from_millis(1500))
    };
    let r = b.client.call("clock", "now", b"", &opts).unwrap();
    let text = String::from_utf8(r.payload).unwrap();
    let (left, traceparent) = text.split_once(' ').unwrap();
    let left: i64 = left.parse().unwrap();
    assert!(
        (1..=1500).contains(&left),
        "the remote handler saw {left} ms left of a 1.5 s call (a fixed 5 s would show ~5000)"
    );
    let seen = aegis_client::TraceContext::parse(traceparent).expect("a valid traceparent");
    assert_eq!(seen.trace_id, trace.trace_id, "the trace crossed hosts");
    assert_eq!(seen.flags, 1);
    stop.stop();
    server.join().unwrap().unwrap();
}

/// With `trusted_hosts` (each bridge signs with its key and trusts the other's public
/// key), a rogue NATS client announcing instances of an imported service (under a trusted
/// host's name, an id of that host, or a host of its own) gets no stand-in and none of the
/// calls, is told 403 when it asks, and an ownership entry it writes to the bucket is not
/// believed. Without signing, the same announcement took half of the calls.
#[test]
fn with_trusted_hosts_a_rogue_nats_client_announces_nothing_and_owns_nothing() {
    let nats = Nats::start();
    let keys = tempfile::tempdir().unwrap();
    let key = |name: &str| {
        let path = keys.path().join(name);
        let out = support::succeed(
            std::process::Command::new(support::bridge_bin())
                .arg("--new-signing-key")
                .arg(&path),
        );
        (
            path,
            String::from_utf8(out.stdout).unwrap().trim().to_owned(),
        )
    };
    let ((ka, pa), (kb, pb)) = (key("hosta.seed"), key("hostb.seed"));
    let trusted = |k: &std::path::Path| {
        vec![
            "--export".to_owned(),
            "*".to_owned(),
            "--import".to_owned(),
            "*".to_owned(),
            "--signing-key-file".to_owned(),
            k.to_str().unwrap().to_owned(),
            "--trust".to_owned(),
            format!("hosta={pa}"),
            "--trust".to_owned(),
            format!("hostb={pb}"),
        ]
    };
    let bus_a = TestBus::start();
    let _alpha = bus_a.serve("alpha", "alpha-1", &["--claim", "doc-a"]);
    let args_a = trusted(&ka);
    let _bridge_a = start_bridge(
        &bus_a,
        &nats.url(),
        "hosta",
        &args_a.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let bus_b = TestBus::start();
    let args_b = trusted(&kb);
    let _bridge_b = start_bridge(
        &bus_b,
        &nats.url(),
        "hostb",
        &args_b.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let b = bus_b.connect();
    wait_routable(&b, "alpha", "alpha-1@hosta");
    // Its id is mirrored separately from its instance (under load, later).
    wait_for("doc-a owned on host b", || {
        b.call_resource("doc-a", "echo", b"r", &quick())
            .is_ok_and(|r| r.instance_id == "alpha-1@hosta")
    });

    // The rogue: announces three instances of alpha and answers their inboxes.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let nc = rt.block_on(async_nats::connect(nats.url())).unwrap();
    let mut verdicts = Vec::new();
    for (id, host) in [
        ("alpha-9@hosta", "hosta"),
        ("alpha-1@hosta", "rogue"),
        ("evil-1@rogue", "rogue"),
    ] {
        let reg = serde_json::json!({
            "service_name": "alpha",
            "instance_id": id,
            "timestamp": "2026-12-06T00:00:00Z",
            "metadata": {"host": host, "bridge": "aegis-bridge", "aegis.sig": "00".repeat(64)},
        });
        let body = rmp_serde::to_vec_named(&reg).unwrap();
        let reply = rt
            .block_on(nc.request("ipc.service.register", body.into()))
            .unwrap();
        let v: serde_json::Value = rmp_serde::from_slice(&reply.payload).unwrap();
        verdicts.push(v["status_code"].as_u64().unwrap());
        let sub = rt
            .block_on(nc.subscribe(format!("ipc.instance.{id}.inbox")))
            .unwrap();
        let nc2 = nc.clone();
        rt.spawn(async move {
            use futures_util::StreamExt;
            let mut sub = sub;
            while let Some(m) = sub.next().await {
                if let Some(r) = m.reply {
                    let _ = nc2.publish(r, "forged".into()).await;
                }
            }
        });
    }
    // Every announcement refused: 403 (not signed by a trusted host) or 409 (our id).
    assert!(
        verdicts.iter().all(|&c| c == 403 || c == 409),
        "{verdicts:?}"
    );
    // A forged ownership entry for a fresh id, naming host a.
    let bucket = rt.block_on(async {
        async_nats::jetstream::new(nc.clone())
            .get_key_value("aegis_resources")
            .await
            .unwrap()
    });
    let forged = rmp_serde::to_vec_named(&serde_json::json!({
        "resource_id": "doc-forged",
        "host": "hosta",
        "service": "alpha",
        "instance_id": "alpha-9@hosta",
        "sig": "11".repeat(64),
    }))
    .unwrap();
    rt.block_on(bucket.put(bucket_key("doc-forged"), forged.into()))
        .unwrap();
    // Host b routes alpha only to the real instance, with real answers, and the forged id
    // nowhere.
    let info = b.service("alpha").unwrap();
    let ids: Vec<&str> = info.instances.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["alpha-1@hosta"], "stand-ins on host b");
    for i in 0..12 {
        let p = format!("call {i}");
        let r = b.call("alpha", "echo", p.as_bytes(), &quick()).unwrap();
        assert_eq!(
            (r.payload, r.instance_id.as_str()),
            (p.into_bytes(), "alpha-1@hosta")
        );
    }
    // The seed's resource subjects write nothing for it (nothing on NATS signs for an
    // AegisIPC instance): a forced claim of doc-a, a transfer of it, a release.
    for (op, req) in [
        (
            "register",
            serde_json::json!({"service_name": "alpha", "instance_id": "evil-1@rogue",
                "resource_ids": ["doc-a", "doc-new"], "force": true, "trace_id": "x"}),
        ),
        (
            "transfer",
            serde_json::json!({"service_name": "alpha", "resource_ids": ["doc-a"],
                "from_instance_id": "alpha-1@hosta", "to_instance_id": "evil-1@rogue",
                "verify_ownership": false, "reason": "mine", "trace_id": "x"}),
        ),
        (
            "release",
            serde_json::json!({"service_name": "alpha", "instance_id": "alpha-1@hosta",
                "resource_ids": ["doc-a"], "trace_id": "x"}),
        ),
    ] {
        let body = rmp_serde::to_vec_named(&req).unwrap();
        let reply = rt
            .block_on(nc.request(format!("ipc.resource.{op}"), body.into()))
            .unwrap();
        let v: serde_json::Value = rmp_serde::from_slice(&reply.payload).unwrap();
        assert_eq!(v["success"], false, "{op}: {v}");
        assert!(
            matches!(v["status_code"].as_u64(), Some(403 | 404)),
            "{op}: {v}"
        );
    }
    let r = b.call_resource("doc-a", "echo", b"r", &quick()).unwrap();
    assert_eq!(r.instance_id, "alpha-1@hosta");
    assert!(
        b.call_resource("doc-forged", "echo", b"r", &quick())
            .is_err(),
        "a forged entry made doc-forged routable"
    );
    let entry = rt.block_on(bucket.get(bucket_key("doc-new"))).unwrap();
    assert!(entry.is_none(), "doc-new was written for the rogue");
}

/// The bucket key of a resource id (as the bridges write it).
fn bucket_key(id: &str) -> String {
    std::iter::once("r".to_owned())
        .chain(id.bytes().map(|b| format!("{b:02x}")))
        .collect()
}

/// Without signing, a NATS client announcing 100 instances of an imported service gets
/// stand-ins for at most 64 of them (so at most 256 forwarding threads), and a local
/// instance of the service still registers.
#[test]
fn a_flood_of_announcements_gets_at_most_64_stand_ins_and_never_a_local_slot() {
    let nats = Nats::start();
    let (b, _beta) = host(&nats, "hostb", "beta", "doc-b");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let nc = rt.block_on(async_nats::connect(nats.url())).unwrap();
    // Announced and kept alive (heartbeats every 500 ms) for as long as the test runs:
    // on a loaded machine making 64 stand-ins can take longer than a silent remote lives.
    let beats = nc.clone();
    rt.spawn(async move {
        loop {
            for i in 0..100 {
                let reg = serde_json::json!({
                    "service_name": "flooded",
                    "instance_id": format!("f{i}@rogue"),
                    "metadata": {"host": "rogue"},
                });
                let body = rmp_serde::to_vec_named(&reg).unwrap();
                let _ = beats.publish("ipc.service.register", body.into()).await;
            }
            let _ = beats.flush().await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let count = || b.client.service("flooded").map_or(0, |s| s.instances.len());
    wait_for("64 stand-ins", || count() >= 64);
    // Give the bridge a few more sync passes: the number stays at the cap.
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(count(), 64);
    }
    let local = b.client.register("flooded", "local-1", &[]).unwrap();
    assert_eq!(count(), 65);
    drop(local);
}

/// A bridge that is no administrator of its bus (as the packaged units run it: a uid the
/// policy lets serve and call, nothing more) still routes resources across hosts: mirrored
/// claims are plain claims, forced only where a local instance holds the id.
#[test]
fn a_bridge_without_administrator_rights_routes_resources_across_hosts() {
    if !support::root("needs root to run the bridge under another uid") {
        return;
    }
    let nats = Nats::start();
    let (a, _alpha) = host(&nats, "hosta", "alpha", "doc-a");
    let policy = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        policy.path(),
        "socket_mode = \"666\"\n[[policy]]\nservices = [\"*\"]\ncall_uids = [65534]\nserve_uids = [65534]\n",
    )
    .unwrap();
    let bus_b = TestBus::start_with(&["--config", policy.path().to_str().unwrap()]);
    std::fs::set_permissions(
        bus_b.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let _bridge_b = support::start_bridge_as(
        &bus_b,
        &nats.url(),
        "hostb",
        &["--export", "*", "--import", "*"],
        Some(65534),
    );
    let b = bus_b.connect();
    wait_for(
        "doc-a routable on host b through a non-admin bridge",
        || {
            b.call_resource("doc-a", "echo", b"r", &quick())
                .is_ok_and(|r| r.instance_id == "alpha-1@hosta")
        },
    );
    drop(a);
}

/// Two services on two hosts calling each other (nested, across the bridges) end in
/// `LoopDetected`, not a timeout: the hop count crosses hosts. And a remote instance that
/// announced itself once and then fell silent leaves host b's routing after
/// `--remote-timeout-ms` (1 s here), not before and not never.
#[test]
fn a_call_bouncing_between_hosts_ends_in_loop_detected_and_a_silent_remote_leaves() {
    let nats = Nats::start();
    let bus_a = TestBus::start();
    let bus_b = TestBus::start();
    let args = [
        "--export",
        "*",
        "--import",
        "*",
        "--remote-timeout-ms",
        "1000",
    ];
    let _bridge_a = start_bridge(&bus_a, &nats.url(), "hosta", &args);
    let _bridge_b = start_bridge(&bus_b, &nats.url(), "hostb", &args);
    let (a, b) = (bus_a.connect(), bus_b.connect());
    let ping = a.register("ping", "ping-1", &[]).unwrap();
    let pong = b.register("pong", "pong-1", &[]).unwrap();
    let (stop_ping, stop_pong) = (ping.stop_handle(), pong.stop_handle());
    std::thread::scope(|s| {
        for (inst, bus, next) in [(&ping, &a, "pong"), (&pong, &b, "ping")] {
            for _ in 0..6 {
                s.spawn(move || {
                    inst.serve(|req, out| {
                        match bus.call(next, "m", b"", &CallOptions::nested(req)) {
                            Ok(r) => out.extend_from_slice(&r.payload),
                            Err(e) => out.extend_from_slice(format!("{e}").as_bytes()),
                        }
                        Ok(())
                    })
                    .unwrap()
                });
            }
        }
        wait_for("pong reachable from host a", || {
            a.service("pong").is_ok_and(|s| !s.instances.is_empty())
        });
        wait_for("ping reachable from host b", || {
            b.service("ping").is_ok_and(|s| !s.instances.is_empty())
        });
        let r = a.call(
            "ping",
            "m",
            b"",
            &CallOptions::timeout(Duration::from_secs(10)),
        );
        let text = match r {
            Ok(r) => String::from_utf8_lossy(&r.payload).into_owned(),
            Err(e) => e.to_string(),
        };
        assert!(text.contains("loop"), "the bounce ended in: {text}");
        stop_ping.stop();
        stop_pong.stop();
    });

    // A ghost: announced once, never again.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let nc = rt.block_on(async_nats::connect(nats.url())).unwrap();
    let reg = serde_json::json!({
        "service_name": "ghost",
        "instance_id": "ghost-1",
        "metadata": {"host": "hostz"},
    });
    rt.block_on(nc.publish(
        "ipc.service.register",
        rmp_serde::to_vec_named(&reg).unwrap().into(),
    ))
    .unwrap();
    rt.block_on(nc.flush()).unwrap();
    let present = || b.service("ghost").is_ok_and(|s| !s.instances.is_empty());
    wait_for("the ghost stands in on host b", present);
    let seen = std::time::Instant::now();
    wait_for("the silent ghost to leave", || !present());
    let gone_after = seen.elapsed();
    assert!(
        gone_after > Duration::from_millis(500),
        "left after {gone_after:?}: before its timeout"
    );
}

/// Two hosts claim the same fresh id at the same moment (both local claims succeed: the
/// bucket has not heard of it yet on either side); the bucket's first write wins, and
/// both hosts end routing the id to that one owner, the loser's local claim taken back.
#[test]
fn two_hosts_racing_for_one_fresh_id_end_with_one_owner() {
    let nats = Nats::start();
    let (a, _alpha) = host(&nats, "hosta", "alpha", "doc-a");
    let (b, _beta) = host(&nats, "hostb", "beta", "doc-b");
    wait_routable(&b.client, "alpha", "alpha-1@hosta");
    wait_routable(&a.client, "beta", "beta-1@hostb");
    let ra = a.client.register("race", "racer-a", &[]).unwrap();
    let rb = b.client.register("race", "racer-b", &[]).unwrap();
    let echo = |i: aegis_client::Instance| {
        std::thread::spawn(move || {
            i.serve(|req, out| {
                out.extend_from_slice(req.payload());
                Ok(())
            })
        })
    };
    let (ra, rb) = (std::sync::Arc::new(ra), std::sync::Arc::new(rb));
    // Race until both local claims of one id succeed (almost always the first id).
    let mut raced = None;
    for n in 0..10 {
        let id = format!("fresh-{n}");
        let gate = std::sync::Barrier::new(2);
        let (ok_a, ok_b) = std::thread::scope(|s| {
            let ta = s.spawn(|| {
                gate.wait();
                ra.claim(&[&id]).is_ok()
            });
            let tb = s.spawn(|| {
                gate.wait();
                rb.claim(&[&id]).is_ok()
            });
            (ta.join().unwrap(), tb.join().unwrap())
        });
        if ok_a && ok_b {
            raced = Some(id);
            break;
        }
    }
    let id = raced.expect("no claim race in 10 tries: both hosts never claimed one id at once");
    let (ra, rb) = (
        std::sync::Arc::into_inner(ra).unwrap(),
        std::sync::Arc::into_inner(rb).unwrap(),
    );
    let (_sa, _sb) = (echo(ra), echo(rb));
    // Each host's view of the owner, as one name: "racer-a" or "racer-b".
    let owner = |c: &Bus| {
        c.call_resource(&id, "echo", b"who", &quick())
            .ok()
            .map(|r| r.instance_id.split('@').next().unwrap().to_owned())
    };
    wait_for("both hosts agree on one owner", || {
        let (oa, ob) = (owner(&a.client), owner(&b.client));
        oa.is_some() && oa == ob
    });
    // And it stays that way (the loser does not take it back).
    let settled = owner(&a.client).unwrap();
    for _ in 0..20 {
        assert_eq!(owner(&a.client).as_deref(), Some(settled.as_str()));
        assert_eq!(owner(&b.client).as_deref(), Some(settled.as_str()));
        std::thread::sleep(Duration::from_millis(20));
    }
}
