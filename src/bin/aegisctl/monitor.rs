//! `aegisctl monitor [SERVICE]`: a live stream of what happens on the bus — instances
//! joining and leaving, health transitions with their reasons, resources claimed, released
//! and transferred, callers' circuit breakers opening and closing — as lines, or `--json`
//! lines.
//!
//! Driven by the registry's generation word (a futex every change wakes): the monitor
//! sleeps until something changes, then asks the broker for the instances' health and
//! the resources, and prints the differences. No polling interval delays an event.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use aegis_client::proto::{BreakerStates, InstanceHealth, ResourceQuery};
use aegis_client::{Bus, Status};
use serde_json::json;

use crate::CliError;

#[derive(clap::Args)]
pub struct MonitorArgs {
    /// Only this service's events.
    pub service: Option<String>,
    /// One JSON object per event.
    #[arg(long)]
    pub json: bool,
    /// Stop after this many events (default: run until interrupted).
    #[arg(long)]
    pub count: Option<u64>,
}

/// (service, instance id) -> (status, pid, last transition's reason).
type Instances = BTreeMap<(String, String), (Status, u32, String)>;

fn instances(h: Vec<InstanceHealth>) -> (Instances, BTreeMap<(String, String), String>) {
    let (mut now, mut departed) = (BTreeMap::new(), BTreeMap::new());
    for i in h {
        let reason = i
            .transitions
            .last()
            .map(|t| t.reason.clone())
            .unwrap_or_default();
        let key = (i.service.clone(), i.id.clone());
        if i.status == Status::Offline || i.status == Status::Free {
            departed.insert(key, reason);
        } else {
            now.insert(key, (i.status, i.pid, reason));
        }
    }
    (now, departed)
}

pub fn run(bus: &Bus, a: &MonitorArgs) -> Result<(), CliError> {
    let service = a.service.as_deref();
    let resources = |bus: &Bus| -> Result<BTreeMap<String, (String, String)>, CliError> {
        let page = bus.resources(&ResourceQuery {
            service: a.service.clone(),
            limit: 10_000,
            ..Default::default()
        })?;
        Ok(page
            .items
            .into_iter()
            .map(|r| (r.id, (r.service, r.instance_id)))
            .collect())
    };
    let breakers = |bus: &Bus| -> Result<BTreeMap<String, BreakerStates>, CliError> {
        Ok(bus
            .services()?
            .into_iter()
            .filter(|s| service.is_none_or(|w| w == s.name))
            .map(|s| (s.name, s.circuit_breaker))
            .collect())
    };
    let mut seen = bus.registry_generation();
    let (mut before, _) = instances(bus.health(service)?);
    let mut owned = resources(bus)?;
    let mut broken = breakers(bus)?;
    let printed = std::cell::Cell::new(0u64);
    let out = std::io::stdout();
    let emit = |event: &str,
                service: &str,
                instance: &str,
                detail: serde_json::Value,
                text: String| {
        let at_ms = aegis_client::sys::unix_millis();
        let mut o = out.lock();
        if a.json {
            let mut v =
                json!({"at_ms": at_ms, "event": event, "service": service, "instance": instance});
            if let (Some(m), serde_json::Value::Object(d)) = (v.as_object_mut(), detail) {
                m.extend(d);
            }
            let _ = writeln!(o, "{v}");
        } else {
            let _ = writeln!(o, "{at_ms} {event:<12} {service}/{instance} {text}");
        }
        let _ = o.flush();
        printed.set(printed.get() + 1);
    };
    // Said once the first snapshot is taken: every change from here on is an event.
    if a.json {
        let at_ms = aegis_client::sys::unix_millis();
        println!(
            "{}",
            json!({"at_ms": at_ms, "event": "watching", "service": service})
        );
    } else {
        println!(
            "watching {} (events as they happen; Ctrl-C to stop)",
            service.unwrap_or("every service")
        );
    }
    let _ = std::io::stdout().flush();
    loop {
        if a.count.is_some_and(|c| printed.get() >= c) {
            return Ok(());
        }
        let g = bus.wait_registry_change(seen, Duration::from_secs(1));
        if g == seen {
            continue;
        }
        seen = g;
        let (now, departed) = instances(bus.health(service)?);
        for ((svc, id), (status, pid, reason)) in &now {
            match before.get(&(svc.clone(), id.clone())) {
                None => emit(
                    "joined",
                    svc,
                    id,
                    json!({"pid": pid, "status": format!("{status:?}")}),
                    format!("pid {pid}, {status:?}"),
                ),
                Some((old, _, _)) if old != status => emit(
                    "health",
                    svc,
                    id,
                    json!({"from": format!("{old:?}"), "to": format!("{status:?}"), "reason": reason}),
                    format!("{old:?} -> {status:?}: {reason}"),
                ),
                Some(_) => {}
            }
        }
        for (svc, id) in before.keys().filter(|k| !now.contains_key(*k)) {
            let reason = departed
                .get(&(svc.clone(), id.clone()))
                .cloned()
                .unwrap_or_default();
            emit("left", svc, id, json!({"reason": reason}), reason.clone());
        }
        before = now;
        let now_owned = resources(bus)?;
        for (rid, (svc, inst)) in &now_owned {
            match owned.get(rid) {
                None => emit(
                    "claimed",
                    svc,
                    inst,
                    json!({"resource": rid}),
                    format!("claimed {rid}"),
                ),
                Some((_, old)) if old != inst => emit(
                    "transferred",
                    svc,
                    inst,
                    json!({"resource": rid, "from": old}),
                    format!("{rid} from {old}"),
                ),
                Some(_) => {}
            }
        }
        for (rid, (svc, inst)) in owned.iter().filter(|(r, _)| !now_owned.contains_key(*r)) {
            emit(
                "released",
                svc,
                inst,
                json!({"resource": rid}),
                format!("released {rid}"),
            );
        }
        owned = now_owned;
        let now_broken = breakers(bus)?;
        for (svc, b) in &now_broken {
            let old = broken.get(svc).copied().unwrap_or_default();
            if (old.open, old.half_open) != (b.open, b.half_open) {
                emit(
                    "breaker",
                    svc,
                    "",
                    json!({"open": b.open, "half_open": b.half_open, "closed": b.closed}),
                    format!(
                        "circuit breakers: {} open, {} half-open, {} closed (callers)",
                        b.open, b.half_open, b.closed
                    ),
                );
            }
        }
        broken = now_broken;
    }
}
