//! Prometheus metrics with the seed's names and labels, rendered when `/metrics` is scraped.
//!
//! Nothing here is on the call path. Figures of the data path are relaxed counters in
//! shared memory, summed when scraped:
//!
//! * per instance, in the instance's own segment: requests answered and failed
//!   (`InstanceCounters`), request durations from the caller's send to the reply (a
//!   histogram the instance fills after each reply is out, from the clock reading the
//!   caller's call already made); and load-balancer selections (the requests it answered
//!   plus those waiting in its channels, each channel's capped at its slot count, so that
//!   a caller faking its channel's positions adds at most that, once);
//! * per caller and service, in the caller's own client segment (`CallerStats`): errors by
//!   type, retries by attempt number, and its circuit breaker. A departed caller's counts
//!   are kept in `Counters::retired` so no counter goes down.
//!
//! The broker's own figures (health checks, resource operations, metadata sizes,
//! transitions) are counted as it changes its records. Label sets are bounded by services
//! and instances: a resource id is never a label (resource metrics are totals, per
//! operation, per service or per instance).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;

use aegis_client::layout::{
    CallerStats, Histogram, Status, BREAKER_CLOSED, BREAKER_HALF_OPEN, BREAKER_OPEN, ERROR_TYPES,
    HISTOGRAM_BOUNDS_NS,
};
use aegis_client::proto::BreakerStates;

use crate::state::{ClientRec, State};

/// A caller's failure counters for one service, summed.
#[derive(Default, Clone, Copy)]
pub(crate) struct CallerTotals {
    pub(crate) errors: [u64; ERROR_TYPES.len()],
    pub(crate) retries: [u64; 4],
}

impl CallerTotals {
    /// Sums saturate: one caller's huge numbers can pin a total, never wrap it to zero.
    fn add(&mut self, s: &CallerStats) {
        for (t, c) in self.errors.iter_mut().zip(&s.errors) {
            *t = t.saturating_add(c.load(Relaxed));
        }
        for (t, c) in self.retries.iter_mut().zip(&s.retries) {
            *t = t.saturating_add(c.load(Relaxed));
        }
    }
    fn merge(&mut self, o: &CallerTotals) {
        for (a, b) in self.errors.iter_mut().zip(o.errors) {
            *a = a.saturating_add(b);
        }
        for (a, b) in self.retries.iter_mut().zip(o.retries) {
            *a = a.saturating_add(b);
        }
    }
}

/// A connected caller's statistics for the services the policy lets it call; nothing for
/// the others, whatever it wrote there.
pub(crate) fn counted_stats<'a>(
    st: &'a State,
    c: &'a ClientRec,
) -> impl Iterator<Item = (u32, &'a CallerStats)> + 'a {
    st.services.iter().enumerate().filter_map(move |(i, s)| {
        let s = s.as_ref()?;
        st.permit(c.conn, c.peer, &s.name, crate::policy::Action::Call)
            .ok()?;
        Some((i as u32, c.stats.caller_stats(i as u32)?))
    })
}

/// [`counted_stats`] as totals, the services with nothing to count left out.
pub(crate) fn counted_totals(st: &State, c: &ClientRec) -> Vec<(u32, CallerTotals)> {
    counted_stats(st, c)
        .filter_map(|(i, s)| {
            let mut t = CallerTotals::default();
            t.add(s);
            t.errors
                .iter()
                .chain(&t.retries)
                .any(|&n| n > 0)
                .then_some((i, t))
        })
        .collect()
}

/// Upper bounds of the metadata-size histogram, bytes.
const SIZE_BOUNDS: [u64; 7] = [64, 128, 256, 512, 1024, 4096, 16384];

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
    /// Per service index, the counts of callers that have disconnected.
    pub(crate) retired: BTreeMap<u32, CallerTotals>,
    /// Per instance id, how long the broker's liveness check of it took.
    pub(crate) healthcheck: BTreeMap<String, Histogram>,
    /// Per resource operation (claim, release, transfer, query), how long the broker took.
    pub(crate) resource_ops: BTreeMap<&'static str, Histogram>,
    /// Per service, the encoded sizes of claimed resources' metadata: (buckets, sum).
    pub(crate) metadata_sizes: BTreeMap<String, ([u64; SIZE_BOUNDS.len() + 1], u64)>,
}

impl Counters {
    /// Folds a departing caller's counts into the totals.
    pub(crate) fn retire_caller(&mut self, counted: Vec<(u32, CallerTotals)>) {
        for (i, t) in counted {
            self.retired.entry(i).or_default().merge(&t);
        }
    }

    pub(crate) fn observe_metadata(&mut self, service: &str, bytes: u64) {
        let (b, sum) = self.metadata_sizes.entry(service.to_owned()).or_default();
        b[SIZE_BOUNDS.partition_point(|&x| x < bytes)] += 1;
        *sum += bytes;
    }

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
    render_data_path(st, &mut out);
    render_broker_histograms(m, &mut out);
    out
}

fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Writes one histogram's series (`labels` without braces, may be empty): cumulative
/// buckets with `le` in `unit`s per bound, `_sum`, `_count`.
fn histogram(
    out: &mut String,
    name: &str,
    labels: &str,
    bounds: &[f64],
    buckets: &[u64],
    sum: f64,
) {
    let sep = if labels.is_empty() { "" } else { "," };
    let mut acc = 0;
    for (i, n) in buckets.iter().enumerate() {
        acc += n;
        let le = bounds.get(i).map_or("+Inf".to_owned(), |b| format!("{b}"));
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {acc}");
    }
    let braces = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let _ = writeln!(out, "{name}_sum{braces} {sum}");
    let _ = writeln!(out, "{name}_count{braces} {acc}");
}

/// A shared-memory duration histogram in seconds.
fn seconds_histogram(out: &mut String, name: &str, labels: &str, h: &Histogram) {
    let bounds: Vec<f64> = HISTOGRAM_BOUNDS_NS
        .iter()
        .map(|&b| b as f64 / 1e9)
        .collect();
    let (buckets, sum_ns) = h.snapshot();
    histogram(out, name, labels, &bounds, &buckets, sum_ns as f64 / 1e9);
}

/// Per service index, how many connected callers' breakers are in each state.
pub(crate) fn breaker_counts(st: &State) -> Vec<BreakerStates> {
    let mut v = vec![BreakerStates::default(); st.services.len()];
    for c in st.clients.iter().flatten() {
        for (i, b) in v.iter_mut().enumerate() {
            if st.services[i].is_none() {
                continue;
            }
            // A breaker counts only for a service the policy lets the caller call.
            let stats = st.services[i]
                .as_ref()
                .filter(|s| {
                    st.permit(c.conn, c.peer, &s.name, crate::policy::Action::Call)
                        .is_ok()
                })
                .and_then(|_| c.stats.caller_stats(i as u32));
            match stats.map(|s| s.breaker.load(Relaxed)) {
                Some(BREAKER_OPEN) => b.open += 1,
                Some(BREAKER_HALF_OPEN) => b.half_open += 1,
                Some(BREAKER_CLOSED) | None => b.closed += 1,
                Some(_) => b.closed += 1, // a caller's garbage reads as closed
            }
        }
    }
    v
}

/// The figures kept in shared memory by instances and callers.
fn render_data_path(st: &State, out: &mut String) {
    head(out, "ipc_router_request_duration_seconds", "histogram",
        "From the caller sending a request to the instance's reply being out, per instance (observed by the instance).");
    for r in st.instances.iter().flatten() {
        let Some(svc) = st.services[r.service as usize].as_ref() else {
            continue;
        };
        let labels = format!(
            "service_name=\"{}\",instance_id=\"{}\"",
            esc(&svc.name),
            esc(&r.id)
        );
        seconds_histogram(
            out,
            "ipc_router_request_duration_seconds",
            &labels,
            r.seg.durations(),
        );
    }
    head(out, "ipc_router_loadbalancer_selections", "counter",
        "Requests routed to each instance: those it answered and those waiting in its channels (withdrawn ones not counted).");
    for r in st.instances.iter().flatten() {
        let Some(svc) = st.services[r.service as usize].as_ref() else {
            continue;
        };
        let n = crate::liveness::selections(r);
        let _ = writeln!(
            out,
            "ipc_router_loadbalancer_selections{{service_name=\"{}\",instance_id=\"{}\"}} {n}",
            esc(&svc.name),
            esc(&r.id)
        );
    }
    let mut totals = st.metrics.retired.clone();
    for c in st.clients.iter().flatten() {
        for (i, s) in counted_stats(st, c) {
            totals.entry(i).or_default().add(s);
        }
    }
    let named = |i: &u32| {
        st.services
            .get(*i as usize)
            .and_then(Option::as_ref)
            .map(|s| esc(&s.name))
    };
    head(
        out,
        "ipc_router_errors_total",
        "counter",
        "Failed calls, by the error the caller got.",
    );
    for (i, t) in &totals {
        let Some(name) = named(i) else { continue };
        for (kind, n) in ERROR_TYPES.iter().zip(t.errors) {
            let _ = writeln!(
                out,
                "ipc_router_errors_total{{service_name=\"{name}\",error_type=\"{kind}\"}} {n}"
            );
        }
    }
    head(out, "ipc_router_retries_total", "counter",
        "Calls that needed more than one attempt, by the attempt that ended them (5 means 5 or more).");
    for (i, t) in &totals {
        let Some(name) = named(i) else { continue };
        for (a, n) in t.retries.iter().enumerate() {
            let _ = writeln!(
                out,
                "ipc_router_retries_total{{service_name=\"{name}\",attempt_number=\"{}\"}} {n}",
                a + 2
            );
        }
    }
    head(out, "ipc_router_circuit_breaker_state", "gauge",
        "Connected callers whose circuit breaker for the service is in each state (each caller has its own).");
    for (i, b) in st.breakers.iter().enumerate() {
        let Some(name) = named(&(i as u32)) else {
            continue;
        };
        for (state, n) in [
            ("closed", b.closed),
            ("open", b.open),
            ("half_open", b.half_open),
        ] {
            let _ = writeln!(
                out,
                "ipc_router_circuit_breaker_state{{service_name=\"{name}\",state=\"{state}\"}} {n}"
            );
        }
    }
}

/// Durations and sizes the broker observes itself.
fn render_broker_histograms(m: &Counters, out: &mut String) {
    head(out, "ipc_healthcheck_duration_seconds", "histogram",
        "How long the broker's liveness check of each instance took (process, progress and heartbeat; every 100 ms).");
    for (id, h) in &m.healthcheck {
        seconds_histogram(
            out,
            "ipc_healthcheck_duration_seconds",
            &format!("instance_id=\"{}\"", esc(id)),
            h,
        );
    }
    head(
        out,
        "ipc_resource_operation_duration_seconds",
        "histogram",
        "How long the broker took for each resource request, by operation.",
    );
    for (op, h) in &m.resource_ops {
        seconds_histogram(
            out,
            "ipc_resource_operation_duration_seconds",
            &format!("operation=\"{op}\""),
            h,
        );
    }
    head(
        out,
        "ipc_resource_metadata_size_bytes",
        "histogram",
        "Encoded size of claimed resources' metadata, per service.",
    );
    let bounds: Vec<f64> = SIZE_BOUNDS.iter().map(|&b| b as f64).collect();
    for (svc, (b, sum)) in &m.metadata_sizes {
        histogram(
            out,
            "ipc_resource_metadata_size_bytes",
            &format!("service_name=\"{}\"", esc(svc)),
            &bounds,
            b,
            *sum as f64,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_sizes_land_in_their_buckets_up_to_inf() {
        let mut c = Counters::default();
        // On each bound (le is inclusive), just above it, and past the last one.
        for bytes in [0, 64, 65, 16384, 16385, 1 << 20] {
            c.observe_metadata("s", bytes);
        }
        let (b, sum) = c.metadata_sizes["s"];
        // Bounds 64, 128, 256, 512, 1024, 4096, 16384, then +Inf.
        assert_eq!(b, [2, 1, 0, 0, 0, 0, 1, 2]);
        assert_eq!(sum, 64 + 65 + 16384 + 16385 + (1 << 20));
        let mut out = String::new();
        histogram(&mut out, "m", "x=\"1\"", &[64.0, 128.0], &[2, 1, 3], 9.0);
        assert_eq!(
            out,
            "m_bucket{x=\"1\",le=\"64\"} 2\nm_bucket{x=\"1\",le=\"128\"} 3\n\
             m_bucket{x=\"1\",le=\"+Inf\"} 6\nm_sum{x=\"1\"} 9\nm_count{x=\"1\"} 6\n"
        );
    }

    #[test]
    fn nanosecond_histograms_are_shown_in_seconds() {
        let h = Histogram::default();
        h.observe(3_000); // under the first bound, 5 µs
        h.observe(1_500_000); // 1.5 ms: in the 2.5 ms bucket
        let mut out = String::new();
        seconds_histogram(&mut out, "d", "", &h);
        let line = |prefix: &str| {
            out.lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix} in {out}"))
                .rsplit(' ')
                .next()
                .unwrap()
                .to_owned()
        };
        assert_eq!(line("d_bucket{le=\"0.000005\"}"), "1");
        assert_eq!(line("d_bucket{le=\"0.001\"}"), "1");
        assert_eq!(line("d_bucket{le=\"0.0025\"}"), "2");
        assert_eq!(line("d_bucket{le=\"+Inf\"}"), "2");
        assert_eq!(line("d_sum"), "0.001503");
        assert_eq!(line("d_count"), "2");
    }

    #[test]
    fn departed_callers_are_summed_per_service_with_saturation() {
        let mut c = Counters::default();
        let mut t = CallerTotals::default();
        t.errors[1] = 3;
        t.retries[0] = u64::MAX - 1;
        c.retire_caller(vec![(7, t), (2, t)]);
        c.retire_caller(vec![(7, t)]);
        assert_eq!(c.retired[&7].errors[1], 6);
        assert_eq!(c.retired[&7].retries[0], u64::MAX, "saturates, never wraps");
        assert_eq!(c.retired[&2].errors[1], 3);
        assert_eq!(c.retired.len(), 2);
    }

    #[test]
    fn transitions_to_unhealthy_or_offline_count_as_failures_by_reason() {
        let mut c = Counters::default();
        c.transition(
            "i",
            Status::Online,
            Status::Unhealthy,
            "no progress for 5 s",
        );
        c.transition("i", Status::Unhealthy, Status::Online, "progress again");
        c.transition("i", Status::Online, Status::Offline, "process exited");
        c.transition("i", Status::Online, Status::Offline, "connection closed");
        c.transition("i", Status::Online, Status::Unhealthy, "a caller said so");
        c.transition("i", Status::Online, Status::Offline, "unregistered");
        c.transition("j", Status::Online, Status::Offline, "unregistered");
        c.transition("j", Status::Unhealthy, Status::Online, "progress again");
        let f = |why| c.healthcheck_failures.get(&("i".to_owned(), why)).copied();
        assert_eq!(f("no_progress"), Some(1));
        assert_eq!(f("process_exited"), Some(1));
        assert_eq!(f("connection_closed"), Some(1));
        assert_eq!(f("reported"), Some(1));
        assert_eq!(
            c.healthcheck_failures.len(),
            4,
            "an unregistration is no failure"
        );
        assert!(c.healthcheck_failures.keys().all(|(id, _)| id == "i"));
        let key = ("i".to_owned(), "Online".to_owned(), "Offline".to_owned());
        assert_eq!(c.transitions[&key], 3);
    }
}
