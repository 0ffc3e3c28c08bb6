//! End-to-end tests of resource routing: the real broker, real instance processes, the
//! shared-memory resource map.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aegis_client::{
    BulkMode, BulkOptions, Bus, CallOptions, Error, Instance, ResourceMetadata, ResourceQuery,
    ResourceSpec,
};
use support::{wait_deadline, TestBus, DEADLINE};

fn opts() -> CallOptions {
    CallOptions::timeout(Duration::from_secs(10))
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

fn owner_of(bus: &Bus, id: &str) -> Option<String> {
    bus.resource_owner(id).map(|o| o.instance_id)
}

/// Serves echo on a thread of this process until `stop`.
fn serve_echo<'s>(s: &'s std::thread::Scope<'s, '_>, inst: &'s Instance) {
    s.spawn(move || {
        inst.serve(|req, out| {
            out.extend_from_slice(req.payload());
            Ok(())
        })
        .unwrap()
    });
}

#[test]
fn calls_for_a_resource_always_reach_its_owner() {
    let bus = TestBus::start();
    let mut owners = HashMap::new();
    let mut procs = Vec::new();
    for who in ["a", "b", "c"] {
        let mine = ids(&format!("doc-{who}"), 10);
        let claim = mine.join(",");
        procs.push(bus.serve("docs", who, &["--claim", &claim]));
        for id in mine {
            owners.insert(id, who.to_string());
        }
    }
    let client = bus.connect();
    let all: Vec<&String> = owners.keys().collect();
    let mut misrouted = 0;
    for i in 0..1000 {
        let id = all[i % all.len()];
        let r = client
            .call_resource(id, "get", id.as_bytes(), &opts())
            .unwrap();
        assert_eq!(r.payload, id.as_bytes());
        if r.instance_id != owners[id] {
            misrouted += 1;
        }
    }
    assert_eq!(misrouted, 0);
    // No owner: 404.
    let e = client
        .call_resource("doc-z-1", "get", b"", &opts())
        .unwrap_err();
    assert!(
        matches!(&e, Error::ResourceNotFound { resource } if resource == "doc-z-1"),
        "{e}"
    );
    assert_eq!(e.code(), 404);
    // The CLI names the instance that answered.
    let out = bus
        .aegisctl(&["call", "docs", "get", "--resource", "doc-b-3", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["instance_id"], "b");
}

#[test]
fn two_processes_racing_for_the_same_1000_ids_end_with_each_owned_exactly_once() {
    let bus = TestBus::start();
    let wanted = ids("race", 1000).join(",");
    let args = [
        "--claim",
        wanted.as_str(),
        "--claim-batch",
        "25",
        "--claim-partial",
    ];
    // Both start before either is waited for, so their batches interleave at the broker.
    let a = bus.start_serve("race", "a", &args);
    let b = bus.start_serve("race", "b", &args);
    let (a, b) = (a.ready(), b.ready());
    assert_eq!(
        a.claimed.unwrap() + b.claimed.unwrap(),
        1000,
        "a {:?} b {:?}",
        a.claimed,
        b.claimed
    );
    let client = bus.connect();
    let page = client
        .resources(&ResourceQuery {
            service: Some("race".into()),
            limit: 10_000,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(page.total, 1000);
    let mut seen = HashMap::new();
    for r in &page.items {
        assert!(
            seen.insert(r.id.clone(), r.instance_id.clone()).is_none(),
            "{} listed twice",
            r.id
        );
    }
    for id in ids("race", 1000) {
        let owner = owner_of(&client, &id).unwrap_or_else(|| panic!("{id} has no owner"));
        assert_eq!(owner, seen[&id], "map and broker disagree on {id}");
    }
}

#[test]
fn serve_that_cannot_claim_what_it_was_asked_to_fails_naming_the_owner() {
    let bus = TestBus::start();
    let _d1 = bus.serve("docs", "d1", &["--claim", "doc-1"]);
    let out = bus
        .aegisctl(&[
            "serve",
            "docs",
            "--instance",
            "d3",
            "--echo",
            "--claim",
            "doc-1,doc-9",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "served without doc-1: {stderr}");
    assert!(
        stderr.contains("doc-1") && stderr.contains("'d1'") && stderr.contains("1 of 2"),
        "{stderr}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("ready"));
    // It left the bus (with what it did claim): doc-9 is free for the next claimant.
    let client = bus.connect();
    let svc = client.service("docs").unwrap();
    assert_eq!(svc.instances.len(), 1, "{svc:?}");
    assert_eq!(owner_of(&client, "doc-9"), None);
    // With --claim-partial it serves anyway.
    let d3 = bus.serve("docs", "d3", &["--claim", "doc-1,doc-9", "--claim-partial"]);
    assert_eq!(d3.claimed, Some(1));
    assert_eq!(owner_of(&client, "doc-9").as_deref(), Some("d3"));
}

#[test]
fn release_by_a_non_owner_fails_naming_the_owner_and_changes_nothing() {
    let bus = TestBus::start();
    let _a = bus.serve("rel", "a", &["--claim", "x"]);
    let client = bus.connect();
    let b = client.register("rel", "b", &[]).unwrap();
    match b.release(&["x"]) {
        Err(Error::NotOwner(m)) => assert!(m.contains("owned by instance 'a'"), "{m}"),
        other => panic!("expected NotOwner, got {other:?}"),
    }
    assert_eq!(owner_of(&client, "x").as_deref(), Some("a"));
    // Releasing something nobody owns is ResourceNotFound.
    assert!(matches!(
        b.release(&["nobody"]),
        Err(Error::ResourceNotFound { .. })
    ));
    // The owner can release it.
    b.claim(&["y"]).unwrap();
    b.release(&["y"]).unwrap();
    assert_eq!(owner_of(&client, "y"), None);
}

#[test]
fn bulk_all_or_nothing_leaves_nothing_claimed_on_a_conflict() {
    let bus = TestBus::start();
    let _a = bus.serve("bulk", "a", &["--claim", "c-5"]);
    let client = bus.connect();
    let b = client.register("bulk", "b", &[]).unwrap();
    let specs: Vec<_> = ids("c", 10).into_iter().map(ResourceSpec::new).collect();
    let r = b
        .claim_with(
            specs.clone(),
            BulkOptions {
                mode: BulkMode::AllOrNothing,
                batch_size: 3,
                force: false,
            },
        )
        .unwrap();
    assert!(r.rolled_back);
    assert_eq!(r.succeeded, 0);
    assert_eq!(r.failures.len(), 1);
    assert_eq!(
        (r.failures[0].id.as_str(), r.failures[0].code),
        ("c-5", 409)
    );
    assert_eq!(r.failures[0].owner.as_deref(), Some("a"));
    let mine = client
        .resources(&ResourceQuery {
            instance: Some("b".into()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(mine.total, 0, "left half-claimed: {:?}", mine.items);
    for i in [0, 1, 2, 3, 4, 6, 7, 8, 9] {
        assert_eq!(owner_of(&client, &format!("c-{i}")), None);
    }
    assert_eq!(owner_of(&client, "c-5").as_deref(), Some("a"));
    // Continue-on-error claims the rest and reports per batch.
    let r = b
        .claim_with(
            specs,
            BulkOptions {
                mode: BulkMode::ContinueOnError,
                batch_size: 3,
                force: false,
            },
        )
        .unwrap();
    assert!(!r.rolled_back);
    assert_eq!((r.succeeded, r.failed), (9, 1));
    let per_batch: Vec<(u32, u32)> = r.batches.iter().map(|b| (b.succeeded, b.failed)).collect();
    assert_eq!(per_batch, vec![(3, 0), (2, 1), (3, 0), (1, 0)]);
    // A single conflicting claim is ResourceConflict naming the owner.
    match b.claim(&["c-5"]) {
        Err(Error::ResourceConflict { resource, owner }) => {
            assert_eq!((resource.as_str(), owner.as_str()), ("c-5", "a"))
        }
        other => panic!("expected ResourceConflict, got {other:?}"),
    }
}

#[test]
fn a_transfer_under_continuous_calls_loses_nothing_and_switches_owner_once() {
    let bus = TestBus::start();
    let server = bus.connect();
    let a = server.register("move", "a", &[]).unwrap();
    let b = server.register("move", "b", &[]).unwrap();
    a.claim(&["doc"]).unwrap();
    let (stop_a, stop_b) = (a.stop_handle(), b.stop_handle());
    let client = bus.connect();
    let done = AtomicBool::new(false);
    let seen = std::thread::scope(|s| {
        serve_echo(s, &a);
        serve_echo(s, &b);
        let caller = s.spawn(|| {
            let mut seen = Vec::new();
            while !done.load(Ordering::Acquire) {
                let r = client
                    .call_resource("doc", "get", b"x", &opts())
                    .expect("no call may fail during a transfer");
                seen.push(r.instance_id);
            }
            seen
        });
        // Transfer once calls are flowing; stop once calls have reached the new owner.
        support::wait_for("200 calls to the old owner", || a.requests_served() >= 200);
        a.transfer(&["doc"], "move", "b", "rebalancing").unwrap();
        support::wait_for("200 calls to the new owner", || b.requests_served() >= 200);
        done.store(true, Ordering::Release);
        let seen = caller.join().unwrap();
        stop_a.stop();
        stop_b.stop();
        seen
    });
    let first_b = seen.iter().position(|i| i == "b").expect("calls reached b");
    assert!(first_b >= 200);
    assert!(seen[..first_b].iter().all(|i| i == "a"));
    assert!(
        seen[first_b..].iter().all(|i| i == "b"),
        "a call went back to the old owner after the transfer"
    );
    assert_eq!(owner_of(&bus.connect(), "doc").as_deref(), Some("b"));
}

#[test]
fn a_killed_owners_resources_are_free_again() {
    let bus = TestBus::start();
    let mut a = bus.serve("dead", "a", &["--claim", "k-1,k-2,k-3"]);
    let client = bus.connect();
    assert_eq!(owner_of(&client, "k-2").as_deref(), Some("a"));
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(a.pid() as libc::pid_t, libc::SIGKILL) };
    wait_deadline(&mut a.child);
    assert!(
        client.wait_until(DEADLINE, |c| ["k-1", "k-2", "k-3"]
            .iter()
            .all(|id| c.lookup_resource(id).is_none())),
        "resources of the killed owner were not released"
    );
    let b = client.register("dead", "b", &[]).unwrap();
    b.claim(&["k-1", "k-2", "k-3"]).unwrap();
}

#[test]
fn a_resource_past_its_ttl_is_released() {
    let bus = TestBus::start();
    let client = bus.connect();
    let inst = client.register("ttl", "a", &[]).unwrap();
    let claimed_at = std::time::Instant::now();
    let report = inst
        .claim_with(
            vec![ResourceSpec {
                id: "t-1".into(),
                metadata: ResourceMetadata {
                    ttl_ms: Some(1000),
                    ..Default::default()
                },
            }],
            BulkOptions::default(),
        )
        .unwrap();
    // The claim succeeded (and is seen) well before it can have expired.
    assert_eq!(report.succeeded, 1, "{report:?}");
    let q = ResourceQuery {
        ids: vec!["t-1".into()],
        ..Default::default()
    };
    let page = client.resources(&q).unwrap();
    assert!(
        claimed_at.elapsed() < Duration::from_millis(1000),
        "too slow to tell"
    );
    assert_eq!(page.total, 1, "{page:?}");
    let r = &page.items[0];
    assert_eq!(r.expires_at_ms, Some(r.claimed_at_ms + 1000));
    assert!(client.lookup_resource("t-1").is_some());
    assert!(
        client.wait_until(DEADLINE, |c| c.lookup_resource("t-1").is_none()),
        "TTL never released t-1"
    );
    assert!(
        claimed_at.elapsed() >= Duration::from_millis(1000),
        "released early"
    );
    assert_eq!(client.resources(&q).unwrap().total, 0);
}

#[test]
fn the_per_instance_limit_is_enforced() {
    let bus = TestBus::start_with(&["--max-resources-per-instance", "5"]);
    let client = bus.connect();
    let a = client.register("lim", "a", &[]).unwrap();
    let six: Vec<String> = ids("l", 6);
    let refs: Vec<&str> = six.iter().map(String::as_str).collect();
    match a.claim(&refs) {
        Err(Error::LimitExceeded(m)) => assert!(m.contains("maximum of 5"), "{m}"),
        other => panic!("expected LimitExceeded, got {other:?}"),
    }
    assert_eq!(
        owner_of(&client, "l-0"),
        None,
        "all-or-nothing claim left ids behind"
    );
    let r = a
        .claim_with(
            six.iter().map(ResourceSpec::new).collect(),
            BulkOptions {
                mode: BulkMode::ContinueOnError,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!((r.succeeded, r.failed, r.failures[0].code), (5, 1, 429));
    // A transfer that would push the target past the limit is refused whole.
    let b = client.register("lim", "b", &[]).unwrap();
    b.claim(&["m-0"]).unwrap();
    assert!(matches!(
        b.transfer(&["m-0"], "lim", "a", "full"),
        Err(Error::LimitExceeded(_))
    ));
    assert_eq!(owner_of(&client, "m-0").as_deref(), Some("b"));
}

#[test]
fn force_and_administrative_release_are_for_administrators_only() {
    // Root is not an administrator on this broker.
    let bus = TestBus::start_with(&["--admin-uid", "4242"]);
    let _a = bus.serve("adm", "a", &["--claim", "f-1"]);
    let client = bus.connect();
    let b = client.register("adm", "b", &[]).unwrap();
    let force = BulkOptions {
        force: true,
        ..Default::default()
    };
    match b.claim_with(vec![ResourceSpec::new("f-1")], force) {
        Err(Error::NotOwner(m)) => assert!(m.contains("administrators"), "{m}"),
        other => panic!("expected NotOwner, got {other:?}"),
    }
    assert!(matches!(
        client.release_resources(&["f-1"], BulkOptions::default()),
        Err(Error::NotOwner(_))
    ));
    assert!(matches!(
        client.transfer_resources(&["f-1"], "adm", "b", "x"),
        Err(Error::NotOwner(_))
    ));
    assert_eq!(owner_of(&client, "f-1").as_deref(), Some("a"));

    // With the default policy root is an administrator: force, transfer and release work.
    let bus = TestBus::start();
    let _a = bus.serve("adm", "a", &["--claim", "f-1,f-2"]);
    let client = bus.connect();
    let b = client.register("adm", "b", &[]).unwrap();
    let md = ResourceMetadata {
        resource_type: "doc".into(),
        tags: vec!["hot".into()],
        ..Default::default()
    };
    let r = b
        .claim_with(
            vec![ResourceSpec {
                id: "f-1".into(),
                metadata: md,
            }],
            force,
        )
        .unwrap();
    assert_eq!(r.succeeded, 1);
    assert_eq!(owner_of(&client, "f-1").as_deref(), Some("b"));
    client
        .transfer_resources(&["f-2"], "adm", "b", "operator")
        .unwrap();
    assert_eq!(owner_of(&client, "f-2").as_deref(), Some("b"));
    let tagged = client
        .resources(&ResourceQuery {
            tags: vec!["hot".into()],
            resource_type: Some("doc".into()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        tagged
            .items
            .iter()
            .map(|r| r.id.as_str())
            .collect::<Vec<_>>(),
        vec!["f-1"]
    );
    assert!(tagged.items[0].owner_healthy);
    let st = bus.aegisctl(&["release", "f-1,f-2"]).status().unwrap();
    assert!(st.success());
    assert_eq!(owner_of(&client, "f-1"), None);
}

#[test]
fn queries_page_with_total_and_has_more() {
    let bus = TestBus::start();
    let list = ids("p", 25).join(",");
    let _a = bus.serve("page", "a", &["--claim", &list]);
    let client = bus.connect();
    let q = |offset| ResourceQuery {
        service: Some("page".into()),
        limit: 10,
        offset,
        ..Default::default()
    };
    let p0 = client.resources(&q(0)).unwrap();
    let p1 = client.resources(&q(10)).unwrap();
    let p2 = client.resources(&q(20)).unwrap();
    assert_eq!((p0.items.len(), p0.total, p0.has_more), (10, 25, true));
    assert_eq!((p2.items.len(), p2.total, p2.has_more), (5, 25, false));
    // The pages of a service (from its instances' own sets) are in id order, each id once.
    let paged: Vec<String> = [p0, p1, p2]
        .into_iter()
        .flat_map(|p| p.items.into_iter().map(|r| r.id))
        .collect();
    let mut sorted = ids("p", 25);
    sorted.sort();
    assert_eq!(paged, sorted);
    let out = bus
        .aegisctl(&["resources", "--service", "page", "--limit", "3", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["total"], 25);
    assert_eq!(v["items"].as_array().unwrap().len(), 3);
}

#[test]
fn a_call_for_a_resource_whose_owner_is_unhealthy_names_the_owner() {
    let bus = TestBus::start();
    let owner = bus.serve(
        "uh",
        "keeper",
        &[
            "--claim",
            "doc",
            "--heartbeat-interval-ms",
            "50",
            "--heartbeat-timeout-ms",
            "300",
        ],
    );
    let client = bus.connect();
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(owner.pid() as libc::pid_t, libc::SIGSTOP) };
    assert!(client.wait_until(DEADLINE, |c| c
        .resource_owner("doc")
        .is_some_and(|o| o.status == aegis_client::Status::Unhealthy)));
    match client.call_resource("doc", "get", b"", &opts()) {
        Err(e @ Error::OwnerUnavailable { .. }) => {
            assert!(e.to_string().contains("instance 'keeper'"), "{e}");
            assert_eq!(e.code(), 503);
        }
        other => panic!("expected OwnerUnavailable, got {other:?}"),
    }
    let page = client
        .resources(&ResourceQuery {
            ids: vec!["doc".into()],
            ..Default::default()
        })
        .unwrap();
    assert!(!page.items[0].owner_healthy);
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(owner.pid() as libc::pid_t, libc::SIGCONT) };
    assert!(client.wait_until(DEADLINE, |c| c
        .resource_owner("doc")
        .is_some_and(|o| o.status == aegis_client::Status::Online)));
    assert_eq!(
        client
            .call_resource("doc", "get", b"back", &opts())
            .unwrap()
            .payload,
        b"back"
    );
}

/// A killed broker loses nothing: when the owner claims its ids again from the next
/// broker, their metadata, claim time and expiry come back from the resource journal.
#[test]
fn after_a_broker_restart_resources_come_back_with_their_metadata_and_ttls() {
    let mut bus = TestBus::start();
    let _owner = bus.serve(
        "meta",
        "m1",
        &["--claim", "r-1,r-2", "--claim-ttl-ms", "3600000"],
    );
    let list = |bus: &TestBus| -> serde_json::Value {
        let out =
            support::succeed(&mut bus.aegisctl(&["resources", "--service", "meta", "--json"]));
        let mut v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        // The owner's registry index may differ after the restart; what it owns may not.
        for item in v["items"].as_array_mut().unwrap() {
            item.as_object_mut().unwrap().remove("owner_index");
        }
        v
    };
    let before = list(&bus);
    assert_eq!(before["total"], 2, "{before}");
    assert!(
        before["items"][0]["expires_at_ms"].as_u64().is_some(),
        "{before}"
    );
    assert!(before["items"][0]["metadata"]["created_by"]
        .as_str()
        .unwrap()
        .contains("m1"));

    // SAFETY: kill(2) on our broker child.
    unsafe { libc::kill(bus.broker.id() as libc::pid_t, libc::SIGKILL) };
    support::wait_deadline(&mut bus.broker);
    bus.broker = support::start_broker(bus.path(), &[]);
    let fresh = bus.connect();
    assert!(fresh.wait_until(DEADLINE, |b| ["r-1", "r-2"]
        .iter()
        .all(|id| b.lookup_resource(id).is_some())));
    let after = list(&bus);
    assert_eq!(before, after, "metadata or TTLs changed across the restart");
}

/// Journal entries wait `--journal-recovery-ms` (60 s by default; 1 s here) for their owner:
/// an owner back within it gets its claim time back, one back after it (its reconnect held
/// back 2.5 s by the test hook) claims afresh — the entries were dropped.
#[test]
fn journal_entries_whose_owner_does_not_come_back_in_time_are_dropped() {
    let mut bus = TestBus::start_with(&["--journal-recovery-ms", "1000"]);
    let _prompt = bus.serve("meta", "p1", &["--claim", "p-1"]);
    let _late = bus
        .start_serve_env(
            "meta",
            "l1",
            &["--claim", "l-1"],
            &[("AEGIS_TEST_RECONNECT_DELAY_MS", "2500")],
        )
        .ready();
    let client = bus.connect();
    let claimed_at = |id: &str| -> u64 {
        let page = client
            .resources(&aegis_client::ResourceQuery {
                ids: vec![id.to_owned()],
                ..Default::default()
            })
            .unwrap();
        page.items[0].claimed_at_ms
    };
    let (p_before, l_before) = (claimed_at("p-1"), claimed_at("l-1"));
    // SAFETY: kill(2) on our broker child.
    unsafe { libc::kill(bus.broker.id() as libc::pid_t, libc::SIGKILL) };
    support::wait_deadline(&mut bus.broker);
    bus.broker = support::start_broker(bus.path(), &["--journal-recovery-ms", "1000"]);
    let client = bus.connect();
    assert!(client.wait_until(DEADLINE, |b| ["p-1", "l-1"]
        .iter()
        .all(|id| b.lookup_resource(id).is_some())));
    let claimed_at = |id: &str| -> u64 {
        client
            .resources(&aegis_client::ResourceQuery {
                ids: vec![id.to_owned()],
                ..Default::default()
            })
            .unwrap()
            .items[0]
            .claimed_at_ms
    };
    assert_eq!(
        claimed_at("p-1"),
        p_before,
        "the prompt owner's claim came back"
    );
    assert!(
        claimed_at("l-1") > l_before,
        "the late owner's entry should have been dropped after 1 s"
    );
}

/// A call by resource has one attempt, on the owner. An owner that is still there but
/// answers too late is a `Timeout` listing that attempt; an owner killed while handling
/// the call is `OwnerUnavailable` (offline) naming it, not a timeout.
#[test]
fn a_slow_owner_times_out_and_one_that_dies_mid_call_is_unavailable() {
    let bus = TestBus::start();
    let slow = bus.serve(
        "late",
        "keeper",
        &[&support::STUCK_IN_HANDLER[..], &["--claim", "doc"]].concat(),
    );
    let client = bus.connect();
    let short = CallOptions::timeout(Duration::from_millis(300));
    match client.call_resource("doc", "get", b"x", &short) {
        Err(Error::Timeout { attempts, .. }) => {
            assert_eq!(attempts.len(), 1, "{attempts:?}");
            assert_eq!(attempts[0].instance, "keeper");
        }
        other => panic!("expected Timeout from a slow owner, got {other:?}"),
    }
    std::thread::scope(|s| {
        let call = s.spawn(|| {
            client.call_resource(
                "doc",
                "get",
                b"y",
                &CallOptions::timeout(Duration::from_secs(30)),
            )
        });
        // The first request still holds the only serving thread: wait until the second
        // is queued behind it, then kill the owner.
        support::wait_for("the second request to be queued", || {
            client.health(Some("late")).unwrap()[0].queued >= 1
        });
        // SAFETY: kill(2) on our child.
        unsafe { libc::kill(slow.pid() as libc::pid_t, libc::SIGKILL) };
        match call.join().unwrap() {
            Err(Error::OwnerUnavailable { owner, status, .. }) => {
                assert_eq!(owner, "keeper");
                assert_eq!(status, aegis_client::Status::Offline);
            }
            other => panic!("expected OwnerUnavailable from a dead owner, got {other:?}"),
        }
    });
}
