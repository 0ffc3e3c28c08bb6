//! The broker's HTTP listener over real HTTP: `/metrics` parsed with a real
//! exposition-format parser (N calls to 3 instances sum to N with the round-robin split, in
//! the counters, the duration histograms and the selections; a killed instance shows in
//! its state transitions; a caller's circuit breaker opening and closing), and the admin
//! API's JSON equal to `aegisctl … --json`.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use aegis_client::{CallOptions, Error};
use support::{broker_bin, wait_deadline, TestBus, DEADLINE};

/// The bearer token of the test brokers' `--http-token-file`.
const TOKEN: &str = "test-token-0123456789abcdef";

/// A token file for `--http-token-file` (mode 0600, ours).
fn token_file() -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), format!("{TOKEN}\n")).unwrap();
    f
}

/// A broker with its HTTP listener on an ephemeral port, and that port's address.
fn start() -> (TestBus, String) {
    start_with(&[])
}

fn start_with(extra: &[&str]) -> (TestBus, String) {
    let dir = tempfile::Builder::new()
        .prefix("aegis-test-")
        .tempdir()
        .unwrap();
    let token = token_file();
    let mut c = Command::new(broker_bin());
    c.arg("--dir")
        .arg(dir.path())
        .args(["--log", "warn", "--http-listen", "127.0.0.1:0"])
        .arg("--http-token-file")
        .arg(token.path())
        .args(extra);
    let (broker, addr) = support::start_http_broker(c);
    (TestBus { dir, broker }, addr)
}

/// GET `path` with the test token; the status and body.
fn get(addr: &str, path: &str) -> (u16, String) {
    get_as(addr, path, Some(TOKEN))
}

/// GET `path` with `token` (or none); the status and body.
fn get_as(addr: &str, path: &str, token: Option<&str>) -> (u16, String) {
    support::http_get(addr, path, token)
}

fn scrape(addr: &str) -> prometheus_parse::Scrape {
    let (status, body) = get(addr, "/metrics");
    assert_eq!(status, 200);
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).unwrap()
}

fn value(v: &prometheus_parse::Value) -> f64 {
    match v {
        prometheus_parse::Value::Counter(x)
        | prometheus_parse::Value::Gauge(x)
        | prometheus_parse::Value::Untyped(x) => *x,
        other => panic!("unexpected sample {other:?}"),
    }
}

/// The samples of `metric` carrying every `(label, value)` of `labels`.
fn samples<'a>(
    s: &'a prometheus_parse::Scrape,
    metric: &'a str,
    labels: &'a [(&str, &str)],
) -> impl Iterator<Item = &'a prometheus_parse::Sample> {
    s.samples.iter().filter(move |x| {
        x.metric == metric && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v))
    })
}

/// The samples of `metric` labelled with an instance, sorted by instance id.
fn per_instance<'a>(
    s: &'a prometheus_parse::Scrape,
    metric: &str,
) -> impl Iterator<Item = (String, &'a prometheus_parse::Sample)> {
    let mut v: Vec<_> = s
        .samples
        .iter()
        .filter(|x| x.metric == metric)
        .filter_map(|x| Some((x.labels.get("instance_id")?.to_owned(), x)))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v.into_iter()
}

/// A histogram sample's count (its `+Inf` bucket).
fn histogram_count(v: &prometheus_parse::Value) -> f64 {
    match v {
        prometheus_parse::Value::Histogram(b) => {
            let last = b.last().expect("buckets");
            assert!(last.less_than.is_infinite());
            last.count
        }
        other => panic!("not a histogram: {other:?}"),
    }
}

/// The `state` series of `ipc_router_circuit_breaker_state` for `service`.
fn breaker_gauge(addr: &str, service: &str, state: &str) -> f64 {
    let s = scrape(addr);
    let labels = [("service_name", service), ("state", state)];
    let found = samples(&s, "ipc_router_circuit_breaker_state", &labels)
        .next()
        .map_or(-1.0, |x| value(&x.value));
    found
}

#[test]
fn a_callers_circuit_breaker_opens_on_failures_fails_fast_and_closes_on_recovery() {
    let (bus, addr) = start();
    let inst = bus.serve("brittle", "b-1", &[]);
    let mut monitor = support::Guarded {
        child: bus
            .aegisctl(&["monitor", "brittle", "--json"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
            .into(),
    };
    let mut events = std::io::BufReader::new(monitor.child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut events, &mut line).unwrap();
    assert!(line.contains("\"watching\""), "{line}");
    let client = bus.connect_with(aegis_client::BusOptions {
        circuit_breaker: aegis_client::CircuitBreaker {
            failures: 5,
            open_for: std::time::Duration::from_secs(600),
        },
        ..Default::default()
    });
    let quick = CallOptions {
        timeout: std::time::Duration::from_millis(300),
        attempt_timeout: std::time::Duration::from_millis(100),
        ..Default::default()
    };
    client.call("brittle", "m", b"x", &quick).unwrap();
    // Every connected caller's breaker is counted, ours (closed) among them.
    let mut closed_before = 0.0;
    support::wait_for("our closed breaker in /metrics", || {
        closed_before = breaker_gauge(&addr, "brittle", "closed");
        closed_before >= 1.0
    });
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(inst.pid() as libc::pid_t, libc::SIGSTOP) };
    support::wait_for("the instance to stop", || support::is_stopped(inst.pid()));
    // Timeouts (then, once the broker confirms the reports, "every instance unhealthy")
    // until the breaker opens; from then on calls fail at once without being sent.
    let mut failures = Vec::new();
    let opened = loop {
        match client.call("brittle", "m", b"x", &quick) {
            Err(aegis_client::Error::CircuitOpen { service, .. }) => break service,
            Err(e) => failures.push(e.kind()),
            Ok(_) => panic!("a stopped instance answered"),
        }
        assert!(failures.len() <= 5, "still not open after {failures:?}");
    };
    assert_eq!(opened, "brittle");
    assert_eq!(failures.len(), 5, "{failures:?}");
    let t = std::time::Instant::now();
    let e = client.call("brittle", "m", b"x", &quick).unwrap_err();
    assert_eq!(e.code(), 503, "{e}");
    assert!(
        t.elapsed() < quick.attempt_timeout,
        "failed fast: {:?}",
        t.elapsed()
    );
    support::wait_for("the open breaker in /metrics", || {
        breaker_gauge(&addr, "brittle", "open") == 1.0
    });
    assert_eq!(
        breaker_gauge(&addr, "brittle", "closed"),
        closed_before - 1.0,
        "ours moved from closed to open"
    );
    let svc = client.service("brittle").unwrap();
    assert_eq!(svc.circuit_breaker.open, 1);
    let (_, body) = get(&addr, "/api/v1/admin/services/brittle");
    let api: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(api["circuit_breaker"]["open"], 1, "{api}");
    // The monitor shows it (after the instance's health events).
    let ev = loop {
        line.clear();
        std::io::BufRead::read_line(&mut events, &mut line).unwrap();
        let ev: serde_json::Value = serde_json::from_str(&line).unwrap();
        if ev["event"] == "breaker" {
            break ev;
        }
    };
    assert_eq!(ev["open"], 1, "{ev}");
    let s = scrape(&addr);
    let labels = [("service_name", "brittle"), ("error_type", "CircuitOpen")];
    let errors: f64 = samples(&s, "ipc_router_errors_total", &labels)
        .map(|x| value(&x.value))
        .sum();
    assert!(errors >= 2.0, "the fast failures are counted: {errors}");

    // The instance comes back (a health change): one probe goes through and closes it,
    // long before the 600 s open period.
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(inst.pid() as libc::pid_t, libc::SIGCONT) };
    support::wait_for("the probe call to succeed", || {
        client.call("brittle", "m", b"x", &quick).is_ok()
    });
    client.call("brittle", "m", b"x", &quick).unwrap();
    support::wait_for("the closed breaker in /metrics", || {
        breaker_gauge(&addr, "brittle", "open") == 0.0
    });
}

#[test]
fn metrics_count_every_call_per_instance_and_show_a_killed_instance() {
    let (bus, addr) = start();
    let mut procs: Vec<_> = ["m-1", "m-2", "m-3"]
        .iter()
        .map(|id| bus.serve("metered", id, &[]))
        .collect();
    let client = bus.connect();
    const N: usize = 300;
    for i in 0..N {
        client
            .call("metered", "echo", &i.to_le_bytes(), &CallOptions::default())
            .unwrap();
    }
    let s = scrape(&addr);
    let ok: Vec<_> = samples(&s, "ipc_router_requests_total", &[("status", "success")]).collect();
    assert_eq!(ok.iter().map(|x| value(&x.value)).sum::<f64>(), N as f64);
    for x in &ok {
        assert_eq!(x.labels.get("service_name"), Some("metered"));
        assert_eq!(value(&x.value), (N / 3) as f64, "round-robin split: {x:?}");
    }
    let active = samples(&s, "ipc_router_active_instances", &[])
        .next()
        .unwrap();
    assert_eq!(value(&active.value), 3.0);
    let selections: Vec<f64> = per_instance(&s, "ipc_router_loadbalancer_selections")
        .map(|(_, x)| value(&x.value))
        .collect();
    assert_eq!(selections, vec![(N / 3) as f64; 3]);
    // Each instance observes a call's duration just after its reply is out: the last one
    // may land a moment after our call returned.
    let mut counts = Vec::new();
    support::wait_for("every call's duration observed", || {
        counts = per_instance(&scrape(&addr), "ipc_router_request_duration_seconds")
            .map(|(_, x)| histogram_count(&x.value))
            .collect();
        counts == vec![(N / 3) as f64; 3]
    });
    let s = scrape(&addr);
    let retried: f64 = samples(&s, "ipc_router_retries_total", &[])
        .map(|x| value(&x.value))
        .sum();
    assert_eq!(retried, 0.0, "every call succeeded at its first attempt");

    let mut killed = procs.remove(0);
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(killed.pid() as libc::pid_t, libc::SIGKILL) };
    wait_deadline(&mut killed.child);
    assert!(client.wait_until(DEADLINE, |c| c.routable_instances("metered").len() == 2));
    let s = scrape(&addr);
    let labels = [("instance_id", "m-1"), ("to_state", "Offline")];
    let gone = samples(&s, "ipc_instance_state_transitions", &labels)
        .next()
        .expect("the killed instance's transition");
    assert_eq!(value(&gone.value), 1.0);
    assert!(samples(
        &s,
        "ipc_healthcheck_failures_total",
        &[("instance_id", "m-1")]
    )
    .next()
    .is_some());
}

#[test]
fn the_admin_api_returns_what_aegisctl_json_prints() {
    let (bus, addr) = start();
    let _a = bus.serve("docs", "d-1", &["--claim", "doc-1,doc-2"]);
    let _b = bus.serve("docs", "d-2", &[]);
    let cli = |args: &[&str]| -> serde_json::Value {
        let out = support::succeed(&mut bus.aegisctl(args));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let api = |path: &str| -> serde_json::Value {
        let (status, body) = get(&addr, path);
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    };
    assert_eq!(api("/api/v1/admin/services"), cli(&["services", "--json"]));
    assert_eq!(
        api("/api/v1/admin/services/docs"),
        cli(&["service", "docs", "--json"])
    );
    assert_eq!(
        api("/api/v1/admin/resources?service=docs&limit=1&offset=1"),
        cli(&[
            "resources",
            "--service",
            "docs",
            "--limit",
            "1",
            "--offset",
            "1",
            "--json"
        ])
    );
    // Health carries "milliseconds since the last progress", which moves between the two
    // reads: compare everything else.
    let strip = |mut v: serde_json::Value| {
        for i in v.as_array_mut().unwrap() {
            i.as_object_mut().unwrap().remove("last_progress_ms");
        }
        v
    };
    assert_eq!(
        strip(api("/api/v1/admin/health")),
        strip(cli(&["health", "--json"]))
    );
    let (status, body) = get(&addr, "/api/v1/admin/services/nope");
    assert_eq!(status, 404, "{body}");

    // Past one step of the admin API's stepwise walk (4,096 entries): deep pages and
    // filtered ones are the same as the control socket's single-pass answer.
    // (1,000 per instance: the default per-instance cap.)
    let _many: Vec<_> = (0..9)
        .map(|k| {
            let ids: Vec<String> = (k * 1000..(k + 1) * 1000)
                .map(|i| format!("m-{i:05}"))
                .collect();
            bus.serve("many", &format!("m-{k}"), &["--claim", &ids.join(",")])
        })
        .collect();
    let client = bus.connect();
    support::wait_for("9,000 resources claimed", || {
        client
            .resources(&aegis_client::proto::ResourceQuery {
                service: Some("many".into()),
                limit: 1,
                ..Default::default()
            })
            .is_ok_and(|p| p.total == 9000)
    });
    for (query, args) in [
        (
            "limit=3&offset=8000",
            &["resources", "--limit", "3", "--offset", "8000", "--json"][..],
        ),
        (
            "service=many&limit=2&offset=4095",
            &[
                "resources",
                "--service",
                "many",
                "--limit",
                "2",
                "--offset",
                "4095",
                "--json",
            ][..],
        ),
        (
            "instance=m-8&limit=5&offset=998",
            &[
                "resources",
                "--instance",
                "m-8",
                "--limit",
                "5",
                "--offset",
                "998",
                "--json",
            ][..],
        ),
    ] {
        let from_api = api(&format!("/api/v1/admin/resources?{query}"));
        assert_eq!(from_api, cli(args), "{query}");
        assert!(
            from_api["total"].as_u64().unwrap() >= 1000,
            "{query}: {from_api}"
        );
    }
    let last = api("/api/v1/admin/resources?instance=m-8&limit=5&offset=998");
    let ids: Vec<&str> = last["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["m-08998", "m-08999"]);
    assert_eq!(last["has_more"], false);
}

#[test]
fn a_listener_address_in_use_is_a_one_line_error_naming_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(broker_bin())
        .arg("--dir")
        .arg(dir.path())
        .args([
            "--log",
            "warn",
            "--http-metrics-open",
            "--http-listen",
            &addr,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&addr) && err.contains("http_listen"), "{err}");
}

/// Every metric the packaged alerts and dashboard use exists in a scrape.
#[test]
fn every_metric_in_the_alerts_and_the_dashboard_exists_in_a_scrape() {
    let (bus, addr) = start();
    let _a = bus.serve("docs", "d-1", &["--claim", "doc-1"]);
    bus.connect()
        .call("docs", "m", b"x", &CallOptions::default())
        .unwrap();
    let (_, body) = get(&addr, "/metrics");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for file in [
        "packaging/prometheus/alerts.yml",
        "packaging/grafana/aegis-ipc.json",
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let names: std::collections::BTreeSet<&str> = text
            .match_indices("ipc_")
            .map(|(i, _)| {
                let rest = &text[i..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                &rest[..end]
            })
            .collect();
        assert!(!names.is_empty(), "{file} uses no metric");
        for name in names {
            assert!(
                body.lines()
                    .any(|l| l.starts_with(&format!("# TYPE {name} "))),
                "{file} uses {name}, which /metrics does not have"
            );
        }
    }
}

/// The admin API answers only with the token; /metrics too unless `--http-metrics-open`;
/// a token file others may read, or no token at all, is refused at start naming the key.
#[test]
fn the_admin_api_and_metrics_need_the_bearer_token() {
    let (_bus, addr) = start();
    for path in [
        "/api/v1/admin/services",
        "/api/v1/admin/resources",
        "/metrics",
    ] {
        assert_eq!(get_as(&addr, path, None).0, 401, "{path} without a token");
        assert_eq!(
            get_as(&addr, path, Some("test-token-0123456789abcdeX")).0,
            401,
            "{path} with a wrong token"
        );
        assert_eq!(get(&addr, path).0, 200, "{path} with the token");
    }
    let (_open, addr) = start_with(&["--http-metrics-open"]);
    assert_eq!(get_as(&addr, "/metrics", None).0, 200);
    assert_eq!(get_as(&addr, "/api/v1/admin/services", None).0, 401);

    let refused = |args: &[&str]| {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(broker_bin())
            .arg("--dir")
            .arg(dir.path())
            .args(["--log", "warn", "--http-listen", "127.0.0.1:0"])
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "started with {args:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = refused(&[]);
    assert!(err.contains("http_token_file"), "{err}");
    let loose = token_file();
    std::fs::set_permissions(loose.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = refused(&["--http-token-file", loose.path().to_str().unwrap()]);
    assert!(
        err.contains("mode 644") && err.contains("http_token_file"),
        "{err}"
    );
}

/// Connections that send nothing, or headers that never end, are closed after the header
/// timeout; past the connection cap new ones are closed at once; neither keeps a
/// well-behaved client out for long, and the broker's memory does not follow them.
#[test]
fn idle_and_unfinished_http_connections_are_closed_and_keep_no_one_out() {
    let (bus, addr) = start();
    let mut idle: Vec<TcpStream> = (0..80)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    let mut slow: Vec<TcpStream> = (0..40)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).unwrap();
            let _ = write!(s, "GET /metrics HTTP/1.1\r\nX-Slow: ");
            s
        })
        .collect();
    // A well-behaved client gets through once the idle ones are timed out (5 s).
    let t = std::time::Instant::now();
    support::wait_for(
        "a scrape while 120 idle or unfinished connections are open",
        || std::panic::catch_unwind(|| get(&addr, "/metrics").0 == 200).unwrap_or(false),
    );
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t.elapsed()
    );
    // Each of them was closed by the broker (read sees the end).
    for s in idle.iter_mut().chain(slow.iter_mut()) {
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut buf = [0u8; 512];
        let n = loop {
            match s.read(&mut buf) {
                Ok(0) => break 0,
                Ok(_) => continue, // a 408 or 400 answer before the close
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break 0,
                Err(e) => panic!("connection not closed: {e}"),
            }
        };
        assert_eq!(n, 0);
    }
    let rss = std::fs::read_to_string(format!("/proc/{}/status", bus.broker.id())).unwrap();
    let kb: u64 = rss
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    assert!(
        kb < 100_000,
        "broker RSS {kb} kB after the idle connections"
    );
}

/// A handler's error answer counts in `ipc_router_requests_total{status="error"}` (the
/// HighErrorRate alert is built on it), and its successes in `status="success"`.
#[test]
fn handler_error_answers_count_as_errors_in_requests_total() {
    let (bus, addr) = start();
    let server = bus.connect();
    let inst = server.register("flaky", "f1", &[]).unwrap();
    let stop = inst.stop_handle();
    let client = bus.connect();
    std::thread::scope(|s| {
        s.spawn(|| {
            inst.serve(|req, out| {
                if req.method() == "fail" {
                    return Err(aegis_client::ServiceError::new(409, "no"));
                }
                out.extend_from_slice(req.payload());
                Ok(())
            })
            .unwrap()
        });
        let opts = CallOptions::timeout(Duration::from_secs(5));
        for _ in 0..7 {
            assert!(client.call("flaky", "fail", b"x", &opts).is_err());
        }
        for _ in 0..5 {
            client.call("flaky", "ok", b"x", &opts).unwrap();
        }
        stop.stop();
    });
    let scrape = scrape(&addr);
    let count = |status: &str| -> f64 {
        samples(
            &scrape,
            "ipc_router_requests_total",
            &[
                ("service_name", "flaky"),
                ("instance_id", "f1"),
                ("status", status),
            ],
        )
        .map(|x| value(&x.value))
        .sum()
    };
    assert_eq!(count("error"), 7.0);
    assert_eq!(count("success"), 5.0);
}

/// The resource, health and retry series carry the values of what happened, not just their
/// names: registrations, releases, conflicts, bulk operations, lookups, per-instance
/// counts, operation durations and metadata sizes; an unhealthy instance in
/// `ipc_router_unhealthy_instances`, its checks in `ipc_healthcheck_duration_seconds`; a
/// call that needed a second instance in `ipc_router_retries_total{attempt_number="2"}`.
#[test]
fn resource_health_and_retry_series_count_what_happened() {
    let (bus, addr) = start();
    let server = bus.connect();
    let owner = server.register("docs", "d1", &[]).unwrap();
    let rival = server.register("docs", "d2", &[]).unwrap();
    let spec = |id: &str| aegis_client::ResourceSpec {
        id: id.into(),
        metadata: aegis_client::ResourceMetadata {
            resource_type: "doc".into(),
            tags: vec!["t".into()],
            ..Default::default()
        },
    };
    let report = owner
        .claim_with(
            vec![spec("m-1"), spec("m-2"), spec("m-3")],
            Default::default(),
        )
        .unwrap();
    assert_eq!(report.failed, 0);
    owner.release(&["m-3"]).unwrap();
    assert!(rival.claim(&["m-1"]).is_err(), "a conflict");
    let page = server
        .resources(&aegis_client::ResourceQuery::default())
        .unwrap();
    assert_eq!(page.total, 2);

    // Two instances of `retry`: r1 takes each request and answers after 300 ms, r2 at
    // once; idempotent calls with 100 ms attempts that meet r1 first are answered by r2, on
    // their second attempt.
    let (lazy, quick) = (
        server.register("retry", "r1", &[]).unwrap(),
        server.register("retry", "r2", &[]).unwrap(),
    );
    let (stop_lazy, stop_quick) = (lazy.stop_handle(), quick.stop_handle());
    let client = bus.connect();
    std::thread::scope(|sc| {
        sc.spawn(|| {
            lazy.serve(|req, out| {
                std::thread::sleep(Duration::from_millis(300));
                out.extend_from_slice(req.payload());
                Ok(())
            })
            .unwrap()
        });
        sc.spawn(|| {
            quick
                .serve(|req, out| {
                    out.extend_from_slice(req.payload());
                    Ok(())
                })
                .unwrap()
        });
        let opts = CallOptions {
            attempt_timeout: Duration::from_millis(100),
            idempotent: true,
            ..CallOptions::timeout(Duration::from_secs(5))
        };
        for _ in 0..4 {
            client.call("retry", "m", b"x", &opts).unwrap();
        }
        stop_lazy.stop();
        stop_quick.stop();
    });
    // `slow`: an instance stopped past its heartbeat timeout is Unhealthy.
    let stuck = bus.serve(
        "slow",
        "s1",
        &[
            "--heartbeat-interval-ms",
            "50",
            "--heartbeat-timeout-ms",
            "300",
        ],
    );
    kill(stuck.pid(), libc::SIGSTOP);
    support::wait_for("s1 unhealthy", || {
        client
            .health(Some("slow"))
            .unwrap()
            .iter()
            .any(|h| h.id == "s1" && h.status == aegis_client::Status::Unhealthy)
    });
    let s = scrape(&addr);
    let v = |metric: &str, labels: &[(&str, &str)]| -> f64 {
        samples(&s, metric, labels).map(|x| value(&x.value)).sum()
    };
    assert_eq!(v("ipc_resource_registrations_total", &[]), 3.0);
    assert_eq!(v("ipc_resource_releases_total", &[]), 1.0);
    assert_eq!(v("ipc_resource_conflicts_total", &[]), 1.0);
    assert!(v("ipc_resource_bulk_operations_total", &[]) >= 1.0);
    assert!(v("ipc_resource_lookups_total", &[]) >= 1.0);
    assert_eq!(
        v("ipc_resources_per_instance", &[("instance_id", "d1")]),
        2.0
    );
    let count_of = |name: &str, labels: &[(&str, &str)]| -> f64 {
        s.samples
            .iter()
            .filter(|x| {
                x.metric == name && labels.iter().all(|(k, val)| x.labels.get(k) == Some(*val))
            })
            .map(|x| match &x.value {
                prometheus_parse::Value::Histogram(h) => {
                    h.iter().map(|b| b.count).fold(0.0, f64::max)
                }
                other => value(other),
            })
            .sum()
    };
    assert!(
        count_of(
            "ipc_resource_operation_duration_seconds",
            &[("operation", "claim")]
        ) >= 1.0
    );
    assert!(
        count_of(
            "ipc_resource_metadata_size_bytes",
            &[("service_name", "docs")]
        ) >= 3.0
    );
    assert_eq!(
        v(
            "ipc_router_unhealthy_instances",
            &[("service_name", "slow")]
        ),
        1.0
    );
    assert!(count_of("ipc_healthcheck_duration_seconds", &[("instance_id", "s1")]) >= 1.0);
    assert!(
        v(
            "ipc_router_retries_total",
            &[("service_name", "retry"), ("attempt_number", "2")]
        ) >= 1.0,
        "no call needed a second attempt"
    );
    kill(stuck.pid(), libc::SIGCONT);
}

fn kill(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on a child process of this test.
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

/// The breaker's defaults, unconfigured: 5 failed calls in a row open it, and with nothing
/// changing in the service (its one instance stays stopped and unhealthy) it lets one probe
/// through after the 30 s open period, which fails and opens it again.
#[test]
fn the_default_breaker_opens_after_5_failures_and_probes_after_30_s() {
    let (bus, _) = start();
    let stuck = bus.serve(
        "cb",
        "c1",
        &[
            "--heartbeat-interval-ms",
            "50",
            "--heartbeat-timeout-ms",
            "200",
        ],
    );
    kill(stuck.pid(), libc::SIGSTOP);
    let client = bus.connect();
    support::wait_for("c1 unhealthy", || {
        client.health(Some("cb")).unwrap()[0].status == aegis_client::Status::Unhealthy
    });
    let opts = CallOptions::timeout(Duration::from_millis(100));
    for i in 0..5 {
        match client.call("cb", "m", b"x", &opts) {
            Err(Error::NoAvailableInstance { .. } | Error::Timeout { .. }) => {}
            other => panic!("call {i}: expected a failure of the bus, got {other:?}"),
        }
    }
    let opened = std::time::Instant::now();
    assert!(
        matches!(
            client.call("cb", "m", b"x", &opts),
            Err(Error::CircuitOpen { .. })
        ),
        "open after the default 5 failures"
    );
    let probe_after = loop {
        std::thread::sleep(Duration::from_millis(200));
        match client.call("cb", "m", b"x", &opts) {
            Err(Error::CircuitOpen { .. }) => {
                assert!(
                    opened.elapsed() < Duration::from_secs(40),
                    "never half-open"
                );
            }
            _ => break opened.elapsed(),
        }
    };
    assert!(
        (Duration::from_secs(29)..Duration::from_secs(35)).contains(&probe_after),
        "the probe went through after {probe_after:?}, not after the 30 s open period"
    );
    // The probe failed: open again.
    assert!(matches!(
        client.call("cb", "m", b"x", &opts),
        Err(Error::CircuitOpen { .. })
    ));
    kill(stuck.pid(), libc::SIGCONT);
}

/// A caller's errors and retries stay counted after it disconnects, and two departed
/// callers' counts add up: `ipc_router_errors_total` is a counter (the HighErrorRate alert
/// takes its rate), so a caller leaving must not take its share with it.
#[test]
fn departed_callers_errors_and_retries_stay_counted() {
    // Two client slots: the server's and one caller's, so a new connection succeeds only
    // once the broker has processed the previous caller's departure.
    let (bus, addr) = start_with(&["--max-clients", "2"]);
    let server = bus.connect();
    // Two instances that never take a request: each call fails with Timeout.
    let _quiet = (
        server.register("quiet", "q1", &[]).unwrap(),
        server.register("quiet", "q2", &[]).unwrap(),
    );
    let opts = CallOptions {
        attempt_timeout: Duration::from_millis(50),
        idempotent: true,
        ..CallOptions::timeout(Duration::from_millis(150))
    };
    let series = || {
        let s = scrape(&addr);
        let sum = |metric: &str| -> f64 {
            samples(&s, metric, &[("service_name", "quiet")])
                .map(|x| value(&x.value))
                .sum()
        };
        (
            sum("ipc_router_errors_total"),
            sum("ipc_router_retries_total"),
        )
    };
    let next_caller = || {
        let mut got = None;
        support::wait_for("a client slot (the last caller's departure)", || {
            got = aegis_client::Bus::connect_dir(bus.path()).ok();
            got.is_some()
        });
        got.unwrap()
    };
    let mut caller = next_caller();
    let mut seen = Vec::new();
    for _ in 0..2 {
        for _ in 0..2 {
            assert!(caller.call("quiet", "m", b"x", &opts).is_err());
        }
        let live = series();
        assert!(live.0 >= 2.0, "{live:?}");
        drop(caller);
        caller = next_caller();
        assert_eq!(series(), live, "counts kept after the caller left");
        seen.push(live);
    }
    assert!(
        seen[1].0 >= 2.0 * seen[0].0 && seen[1].1 >= seen[0].1,
        "two departed callers' counts add up: {seen:?}"
    );
}
