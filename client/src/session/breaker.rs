//! The caller's side of the metrics, and the seed's per-service circuit breaker.
//!
//! Both live in the caller's own client segment ([`CallerStats`], one per registry service
//! index), written with relaxed atomics by this process's threads and summed by the broker
//! when `/metrics` is scraped: no syscall, lock or broker on the call path. A successful
//! call pays two relaxed loads of a line only failures write (`breaker`,
//! `failures_in_row`); everything else happens on failure paths.
//!
//! **The breaker is per caller (per [`crate::Bus`]), not per bus.** A shared word every
//! caller could write would let one misbehaving process fail everyone's calls for 30 s;
//! per caller, each process's breaker opens on what it saw itself, and the broker shows
//! how many callers have it open ([`crate::session::proto::ServiceInfo::circuit_breaker`]).
//!
//! Rules (the seed's degradation rules): a call that fails because no instance answered in
//! time (`Timeout`: every attempt it made failed), or because every instance the service
//! has is unhealthy (`NoAvailableInstance` with members), counts; `failures` of them in a
//! row open the breaker; while open, calls fail at once with [`Error::CircuitOpen`] (503) for
//! `open_for`; then one call is let through (half-open): its success closes the breaker,
//! its failure opens it again. A change in the service's membership or health (an
//! instance joining, recovering) lets that probe through early, so a service coming back
//! is never kept closed off. A service with no instances at all does not count (nothing
//! failed), nor do handlers' own errors: like a success, they end a failure run, and a
//! probe that ends that way closes the breaker.

use std::time::{Duration, Instant};

use crate::error::Error;
use crate::shm::layout::{
    CallerStats, ServiceEntry, BREAKER_CLOSED, BREAKER_HALF_OPEN, BREAKER_OPEN, ERROR_TYPES,
};
use crate::shm::sync::Ordering::{Acquire, Relaxed, Release};

/// Circuit-breaker settings of a connection ([`crate::BusOptions::circuit_breaker`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitBreaker {
    /// Timed-out calls in a row that open it; 0 turns the breaker off.
    pub failures: u32,
    /// How long it stays open before one call may probe.
    pub open_for: Duration,
}

impl Default for CircuitBreaker {
    /// The seed's: 5 failures, 30 s.
    fn default() -> Self {
        CircuitBreaker {
            failures: 5,
            open_for: Duration::from_secs(30),
        }
    }
}

/// `CLOCK_MONOTONIC` nanoseconds of `t` (Rust's `Instant` is that clock on Linux, so the
/// value means the same in every process), without reading the clock again.
pub(crate) fn mono_ns(t: Instant) -> u64 {
    static BASE: std::sync::OnceLock<(Instant, u64)> = std::sync::OnceLock::new();
    let &(base, base_ns) = BASE.get_or_init(|| (Instant::now(), crate::shm::sys::monotonic_ns()));
    match t.checked_duration_since(base) {
        Some(d) => base_ns.saturating_add(d.as_nanos() as u64),
        None => base_ns.saturating_sub(base.duration_since(t).as_nanos() as u64),
    }
}

/// Whether a call may go ahead: `Ok` when closed (the fast path: one load), or when this
/// call is the half-open probe; `Err(CircuitOpen)` otherwise.
pub(crate) fn admit(
    cfg: &CircuitBreaker,
    stats: Option<&CallerStats>,
    svc: &ServiceEntry,
    service: &str,
) -> Result<(), Error> {
    let Some(s) = stats else { return Ok(()) };
    // SYNC POINT: Acquire pairs with the Release store of `BREAKER_OPEN` in `record`, so
    // `opened_ns` and `opened_gen` are those of the opening we see (a plain load on x86).
    let state = s.breaker.load(Acquire);
    if state == BREAKER_CLOSED || cfg.failures == 0 {
        return Ok(());
    }
    let open_since = Duration::from_nanos(
        crate::shm::sys::monotonic_ns().saturating_sub(s.opened_ns.load(Relaxed)),
    );
    let moved = svc.generation.load(Relaxed) != s.opened_gen.load(Relaxed);
    if state == BREAKER_OPEN
        && (open_since >= cfg.open_for || moved)
        && s.breaker
            .compare_exchange(BREAKER_OPEN, BREAKER_HALF_OPEN, Relaxed, Relaxed)
            .is_ok()
    {
        tracing::info!(target: "aegis_ipc::route", service, "circuit breaker half-open: one call probes");
        return Ok(());
    }
    Err(Error::CircuitOpen {
        service: service.to_owned(),
        retry_in: cfg.open_for.saturating_sub(open_since),
    })
}

/// Runs `call` under the breaker: refused at once while it is open (the refusal recorded
/// too), else run and its outcome recorded with the number of instances it reached, which
/// `call` sets in its argument.
pub(crate) fn guarded<T>(
    cfg: &CircuitBreaker,
    stats: Option<&CallerStats>,
    svc: &ServiceEntry,
    service: &str,
    call: impl FnOnce(&mut usize) -> crate::error::Result<T>,
) -> crate::error::Result<T> {
    if let Err(e) = admit(cfg, stats, svc, service) {
        record(cfg, stats, svc, service, 0, Some(&e));
        return Err(e);
    }
    let mut attempts = 0;
    let r = call(&mut attempts);
    record(cfg, stats, svc, service, attempts, r.as_ref().err());
    r
}

/// Records a call's outcome: `err` is `None` on success. `attempts` is how many instances
/// the call was sent to.
pub(crate) fn record(
    cfg: &CircuitBreaker,
    stats: Option<&CallerStats>,
    svc: &ServiceEntry,
    service: &str,
    attempts: usize,
    err: Option<&Error>,
) {
    let Some(s) = stats else { return };
    if attempts > 1 {
        s.retries[(attempts - 2).min(3)].fetch_add(1, Relaxed);
    }
    let Some(e) = err else {
        // Success: the fast path reads the two words and writes nothing.
        if s.failures_in_row.load(Relaxed) != 0 {
            s.failures_in_row.store(0, Relaxed);
        }
        if s.breaker.load(Relaxed) != BREAKER_CLOSED {
            s.breaker.store(BREAKER_CLOSED, Relaxed);
            tracing::info!(target: "aegis_ipc::route", service, "circuit breaker closed: the probe call succeeded");
        }
        return;
    };
    let kind = e.kind();
    let t = ERROR_TYPES
        .iter()
        .position(|&k| k == kind)
        .unwrap_or(ERROR_TYPES.len() - 1);
    s.errors[t].fetch_add(1, Relaxed);
    if matches!(e, Error::CircuitOpen { .. }) {
        return; // the breaker's own answer: says nothing about the instances
    }
    let counts = match e {
        Error::Timeout { .. } => true,
        // Instances exist but none is routable (all found unhealthy): they failed too.
        Error::NoAvailableInstance { .. } => svc.member_count.load(Relaxed) > 0,
        _ => false,
    };
    if cfg.failures == 0 {
        return;
    }
    if !counts {
        // Not the instances failing (a handler's own error, nothing to route to): like a
        // success for the breaker, which must not stay half-open with no probe out.
        if s.failures_in_row.load(Relaxed) != 0 {
            s.failures_in_row.store(0, Relaxed);
        }
        if s.breaker.load(Relaxed) == BREAKER_HALF_OPEN {
            s.breaker.store(BREAKER_CLOSED, Relaxed);
        }
        return;
    }
    let n = s.failures_in_row.fetch_add(1, Relaxed) + 1;
    let state = s.breaker.load(Relaxed);
    if state == BREAKER_HALF_OPEN || (state == BREAKER_CLOSED && n >= cfg.failures) {
        // The generation is read before the clock: a change after it lets a probe through.
        s.opened_gen.store(svc.generation.load(Relaxed), Relaxed);
        s.opened_ns.store(crate::shm::sys::monotonic_ns(), Relaxed);
        // SYNC POINT: Release pairs with the Acquire load in `admit`.
        s.breaker.store(BREAKER_OPEN, Release);
        tracing::warn!(target: "aegis_ipc::route", service, failures = n,
            "circuit breaker open: calls fail at once for {:?}", cfg.open_for);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::shm::layout::ShmSafe;

    fn zeroed<T: ShmSafe>() -> Box<T> {
        // SAFETY: `ShmSafe` types are valid for every bit pattern, zero included.
        Box::new(unsafe { std::mem::zeroed() })
    }

    /// A breaker that opens after 3 failures in a row (for 600 s: tests reopen it by a
    /// health change), a caller's zeroed statistics, and a service of `members` members.
    fn three_failures(members: u32) -> (CircuitBreaker, Box<CallerStats>, Box<ServiceEntry>) {
        let cfg = CircuitBreaker {
            failures: 3,
            open_for: Duration::from_secs(600),
        };
        let (s, svc) = (zeroed::<CallerStats>(), zeroed::<ServiceEntry>());
        svc.member_count.store(members, Relaxed);
        (cfg, s, svc)
    }

    #[test]
    fn guarded_runs_a_closed_breaker_s_call_records_it_and_refuses_an_open_one() {
        let (cfg, s, svc) = three_failures(1);
        let (s, svc) = (Some(&*s), &*svc);
        let mut runs = 0;
        for _ in 0..3 {
            let r: crate::error::Result<()> = guarded(&cfg, s, svc, "s", |sent| {
                runs += 1;
                *sent = 2;
                Err(timeout())
            });
            assert!(matches!(r, Err(Error::Timeout { .. })));
        }
        assert_eq!(
            s.unwrap().retries[0].load(Relaxed),
            3,
            "each reached 2 instances"
        );
        assert_eq!(s.unwrap().breaker.load(Relaxed), BREAKER_OPEN);
        let r = guarded(&cfg, s, svc, "s", |_| -> crate::error::Result<()> {
            runs += 1;
            Ok(())
        });
        assert!(matches!(r, Err(Error::CircuitOpen { .. })), "{r:?}");
        assert_eq!(runs, 3, "an open breaker runs nothing");
        let kind = |k: &str| ERROR_TYPES.iter().position(|t| *t == k).unwrap();
        assert_eq!(s.unwrap().errors[kind("CircuitOpen")].load(Relaxed), 1);
        assert_eq!(s.unwrap().errors[kind("Timeout")].load(Relaxed), 3);
    }

    fn timeout() -> Error {
        Error::Timeout {
            service: "s".into(),
            elapsed: Duration::ZERO,
            attempts: Vec::new(),
            trace_id: 1,
        }
    }

    #[test]
    fn opens_after_failures_fails_fast_lets_one_probe_through_and_closes() {
        let (cfg, s, svc) = three_failures(1);
        let (s, svc) = (Some(&*s), &*svc);
        for _ in 0..3 {
            admit(&cfg, s, svc, "s").unwrap();
            record(&cfg, s, svc, "s", 3, Some(&timeout()));
        }
        let state = || s.unwrap().breaker.load(Relaxed);
        assert_eq!(state(), BREAKER_OPEN);
        assert_eq!(
            s.unwrap().retries[1].load(Relaxed),
            3,
            "attempt 3, three times"
        );
        let fast = admit(&cfg, s, svc, "s").unwrap_err();
        assert!(matches!(fast, Error::CircuitOpen { .. }), "{fast}");
        record(&cfg, s, svc, "s", 0, Some(&fast));
        assert_eq!(state(), BREAKER_OPEN, "a fast failure changes nothing");
        // The service's membership moves: exactly one probe goes through.
        svc.generation.fetch_add(1, Relaxed);
        admit(&cfg, s, svc, "s").unwrap();
        assert_eq!(state(), BREAKER_HALF_OPEN);
        let other = admit(&cfg, s, svc, "s").unwrap_err();
        record(&cfg, s, svc, "s", 0, Some(&other));
        assert_eq!(state(), BREAKER_HALF_OPEN, "the probe is still out");
        // A failed probe opens it again; a successful one closes it.
        record(&cfg, s, svc, "s", 1, Some(&timeout()));
        assert_eq!(state(), BREAKER_OPEN);
        svc.generation.fetch_add(1, Relaxed);
        admit(&cfg, s, svc, "s").unwrap();
        record(&cfg, s, svc, "s", 1, None);
        assert_eq!(state(), BREAKER_CLOSED);
        let kind = |k: &str| ERROR_TYPES.iter().position(|&t| t == k).unwrap();
        let errors = &s.unwrap().errors;
        assert_eq!(errors[kind("Timeout")].load(Relaxed), 4);
        assert_eq!(errors[kind("CircuitOpen")].load(Relaxed), 2);
    }

    #[test]
    fn a_handler_error_or_an_empty_service_is_not_the_instances_failing() {
        let cfg = CircuitBreaker::default();
        let (s, svc) = (zeroed::<CallerStats>(), zeroed::<ServiceEntry>());
        let (s, svc) = (Some(&*s), &*svc);
        let none = Error::NoAvailableInstance {
            service: "s".into(),
        };
        let remote = Error::Remote {
            instance: "i".into(),
            code: 500,
            message: "m".into(),
        };
        for _ in 0..20 {
            record(&cfg, s, svc, "s", 0, Some(&none));
            record(&cfg, s, svc, "s", 1, Some(&remote));
        }
        assert_eq!(s.unwrap().breaker.load(Relaxed), BREAKER_CLOSED);
        admit(&cfg, s, svc, "s").unwrap();
    }

    fn no_instance() -> Error {
        Error::NoAvailableInstance {
            service: "s".into(),
        }
    }

    #[test]
    fn mono_ns_is_the_monotonic_clock_in_nanoseconds() {
        let now = Instant::now();
        let (ns, clock) = (mono_ns(now), crate::shm::sys::monotonic_ns());
        assert!(clock >= ns && clock - ns < 1_000_000_000, "{ns} vs {clock}");
        assert_eq!(mono_ns(now + Duration::from_secs(2)) - ns, 2_000_000_000);
        assert_eq!(ns - mono_ns(now - Duration::from_millis(3)), 3_000_000);
    }

    #[test]
    fn retries_are_counted_by_attempt_number() {
        let cfg = CircuitBreaker::default();
        let (s, svc) = (zeroed::<CallerStats>(), zeroed::<ServiceEntry>());
        let (s, svc) = (Some(&*s), &*svc);
        for attempts in [1, 2, 2, 3, 4, 5, 9] {
            record(&cfg, s, svc, "s", attempts, None);
        }
        let r: Vec<u64> = s.unwrap().retries.iter().map(|c| c.load(Relaxed)).collect();
        assert_eq!(r, [2, 1, 1, 2], "attempt 2, 3, 4, and 5 or more");
    }

    #[test]
    fn a_success_or_a_handler_error_resets_the_failure_run() {
        let (cfg, s, svc) = three_failures(1);
        let (s, svc) = (Some(&*s), &*svc);
        let remote = Error::Remote {
            instance: "i".into(),
            code: 500,
            message: "m".into(),
        };
        for between in [None, Some(&remote)] {
            record(&cfg, s, svc, "s", 1, Some(&timeout()));
            record(&cfg, s, svc, "s", 1, Some(&timeout()));
            record(&cfg, s, svc, "s", 1, between);
            assert_eq!(s.unwrap().failures_in_row.load(Relaxed), 0, "{between:?}");
        }
        record(&cfg, s, svc, "s", 1, Some(&timeout()));
        record(&cfg, s, svc, "s", 1, Some(&timeout()));
        assert_eq!(
            s.unwrap().breaker.load(Relaxed),
            BREAKER_CLOSED,
            "two in a row, not three"
        );
    }

    #[test]
    fn no_routable_instance_of_a_populated_service_counts_and_a_handler_error_closes_a_half_open_breaker(
    ) {
        let (cfg, s, svc) = three_failures(1);
        let (s, svc) = (Some(&*s), &*svc);
        for _ in 0..3 {
            record(&cfg, s, svc, "s", 0, Some(&no_instance()));
        }
        let state = || s.unwrap().breaker.load(Relaxed);
        assert_eq!(state(), BREAKER_OPEN, "every instance unhealthy counts");
        svc.generation.fetch_add(1, Relaxed);
        admit(&cfg, s, svc, "s").unwrap();
        assert_eq!(state(), BREAKER_HALF_OPEN);
        let remote = Error::Remote {
            instance: "i".into(),
            code: 409,
            message: "no".into(),
        };
        record(&cfg, s, svc, "s", 1, Some(&remote));
        assert_eq!(
            state(),
            BREAKER_CLOSED,
            "the probe reached an instance: closed"
        );
        // An error of no listed kind is counted as "Other".
        record(&cfg, s, svc, "s", 0, Some(&Error::Interrupted));
        let other = ERROR_TYPES.len() - 1;
        assert_eq!(s.unwrap().errors[other].load(Relaxed), 1);
    }

    #[test]
    fn calls_to_a_service_with_no_instance_at_all_never_open_it() {
        let (cfg, s, svc) = three_failures(0);
        let (s, svc) = (Some(&*s), &*svc);
        for _ in 0..10 {
            record(&cfg, s, svc, "s", 0, Some(&no_instance()));
        }
        assert_eq!(s.unwrap().breaker.load(Relaxed), BREAKER_CLOSED);
        assert_eq!(s.unwrap().failures_in_row.load(Relaxed), 0);
    }
}
