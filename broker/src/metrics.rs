//! Prometheus metrics with the seed's names and labels, rendered when `/metrics` is scraped.
//!
//! Nothing here is on the call path: per-instance request counts are the relaxed counters
//! each instance keeps in its own segment (`InstanceCounters`), summed when scraped; the
//! rest are counts the broker keeps as it changes its records. Label sets are bounded by
//! services and instances (a resource id is never a label: resource metrics are totals, or
//! per instance).
//!
//! Not emitted yet (they need per-call figures on the caller's side, which the call path
//! does not keep today): `ipc_router_request_duration_seconds`,
//! `ipc_router_loadbalancer_selections`, `ipc_router_errors_total`,
//! `ipc_router_retries_total`, `ipc_router_circuit_breaker_state`,
//! `ipc_healthcheck_duration_seconds`, `ipc_resource_operation_duration_seconds`,
//! `ipc_resource_metadata_size_bytes`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;

use aegis_client::layout::Status;

use crate::state::State;

/// Counts the broker keeps as it changes its records.
#[derive(Default)]
pub(crate) struct Counters {
    /// (instance id, from, to) -> transitions.
    pub(crate) transitions: BTreeMap<(String, String, String), u64>,
    /// (instance id, reason) -> times it became Unhealthy or Offline.
    pub(crate) healthcheck_failures: BTreeMap<(String, &'static str), u64>,
    pub(crate) resource_registrations: u64,
    pub(crate) resource_releases: u64,
    pub(crate) resource_conflicts: u64,
    pub(crate) resource_transfers: u64,
    pub(crate) resource_bulk_operations: u64,
    pub(crate) resource_lookups: u64,
}

impl Counters {
    pub(crate) fn transition(&mut self, id: &str, from: Status, to: Status, reason: &str) {
        *self
            .transitions
            .entry((id.to_owned(), format!("{from:?}"), format!("{to:?}")))
            .or_default() += 1;
        let why = if reason.contains("no progress") {
            Some("no_progress")
        } else if reason.contains("exited") || reason.contains("no longer running") {
            Some("process_exited")
        } else if reason.contains("connection closed") {
            Some("connection_closed")
        } else if to == Status::Unhealthy {
            Some("reported")
        } else {
            None // an instance that unregistered, or came back
        };
        if let Some(why) = why.filter(|_| matches!(to, Status::Unhealthy | Status::Offline)) {
            *self
                .healthcheck_failures
                .entry((id.to_owned(), why))
                .or_default() += 1;
        }
    }
}

/// A label value in the exposition format's escaping.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The exposition-format text of every metric.
pub(crate) fn render(st: &State) -> String {
    let mut out = String::new();
    let head = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    head(
        &mut out,
        "ipc_router_requests_total",
        "counter",
        "Requests answered by each instance, by status (success, error).",
    );
    let mut active: BTreeMap<&str, u64> = BTreeMap::new();
    let mut unhealthy: BTreeMap<&str, u64> = BTreeMap::new();
    let mut owned = Vec::new();
    for r in st.instances.iter().flatten() {
        let Some(svc) = st.services[r.service as usize].as_ref() else {
            continue;
        };
        let c = r.seg.counters();
        let (served, failed) = (
            c.requests_served.load(Relaxed),
            c.requests_failed.load(Relaxed),
        );
        let failed = failed.min(served);
        let (s, i) = (esc(&svc.name), esc(&r.id));
        let _ = writeln!(
            out,
            "ipc_router_requests_total{{service_name=\"{s}\",instance_id=\"{i}\",status=\"success\"}} {}",
            served - failed
        );
        let _ = writeln!(
            out,
            "ipc_router_requests_total{{service_name=\"{s}\",instance_id=\"{i}\",status=\"error\"}} {failed}"
        );
        match r.live.status {
            Status::Online => *active.entry(&svc.name).or_default() += 1,
            Status::Unhealthy => *unhealthy.entry(&svc.name).or_default() += 1,
            _ => {}
        }
        owned.push((i, r.owned.len()));
    }
    for (name, help, map) in [
        (
            "ipc_router_active_instances",
            "Instances Online, per service.",
            &active,
        ),
        (
            "ipc_router_unhealthy_instances",
            "Instances Unhealthy, per service.",
            &unhealthy,
        ),
    ] {
        head(&mut out, name, "gauge", help);
        for svc in st.services.iter().flatten() {
            let n = map.get(svc.name.as_str()).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}{{service_name=\"{}\"}} {n}", esc(&svc.name));
        }
    }
    let m = &st.metrics;
    head(
        &mut out,
        "ipc_instance_state_transitions",
        "counter",
        "Status changes of each instance.",
    );
    for ((id, from, to), n) in &m.transitions {
        let _ = writeln!(
            out,
            "ipc_instance_state_transitions{{instance_id=\"{}\",from_state=\"{from}\",to_state=\"{to}\"}} {n}",
            esc(id)
        );
    }
    head(
        &mut out,
        "ipc_healthcheck_failures_total",
        "counter",
        "Times an instance became Unhealthy or Offline, by reason.",
    );
    for ((id, why), n) in &m.healthcheck_failures {
        let _ = writeln!(
            out,
            "ipc_healthcheck_failures_total{{instance_id=\"{}\",reason=\"{why}\"}} {n}",
            esc(id)
        );
    }
    for (name, help, v) in [
        ("ipc_resource_registrations_total", "Resource ids claimed.", m.resource_registrations),
        ("ipc_resource_releases_total", "Resource ids released (by owners, administrators or TTL).", m.resource_releases),
        ("ipc_resource_conflicts_total", "Claims refused because another instance owns the id.", m.resource_conflicts),
        ("ipc_resource_transfers_total", "Resource ids moved to another instance.", m.resource_transfers),
        ("ipc_resource_bulk_operations_total", "Claims and releases of more than one id.", m.resource_bulk_operations),
        ("ipc_resource_lookups_total", "Resource queries answered by the broker (calls by resource look up the shared map without it).", m.resource_lookups),
    ] {
        head(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name} {v}");
    }
    head(
        &mut out,
        "ipc_resources_per_instance",
        "gauge",
        "Resource ids each instance owns.",
    );
    for (i, n) in owned {
        let _ = writeln!(out, "ipc_resources_per_instance{{instance_id=\"{i}\"}} {n}");
    }
    out
}
