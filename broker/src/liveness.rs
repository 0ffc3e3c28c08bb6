//! Liveness: which registered processes are alive, which instances make progress.
//!
//! * Exit: every registered process is watched with a pidfd (readable when it exits; the
//!   server runs one task per pid). Where `pidfd_open` is unavailable, the tick checks
//!   `kill(pid, 0)` plus the start time from `/proc/PID/stat`, so a recycled pid is never
//!   taken for the process that registered.
//! * Hang: each instance's serving loop advances a progress word in its segment (also
//!   while idle, every heartbeat interval). No progress for the heartbeat timeout makes it
//!   `Unhealthy` (out of routing); progress again makes it `Online`.
//! * Callers report three consecutive timeouts (`ReportUnhealthy`); that holds the instance
//!   `Unhealthy` for at least one heartbeat timeout.
//!
//! Every status change is recorded (time, from, to, reason) for `aegisctl health`.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use aegis_client::error::WireError;
use aegis_client::layout::Status;
use aegis_client::proto::{Heartbeat, InstanceHealth, Response, Transition};
use aegis_client::sys;

use crate::state::{InstanceRec, Reply, State};

const TRANSITIONS_KEPT: usize = 16;
/// How long a reported instance must show a waiting request and no progress for the
/// report to count.
const REPORT_EVIDENCE: Duration = Duration::from_millis(50);
const DEPARTED_KEPT: usize = 64;

/// Per-instance liveness state (part of the broker's instance record).
pub(crate) struct Live {
    pub status: Status,
    pub heartbeat: Heartbeat,
    /// Start time of the registered process (clock ticks since boot), if readable.
    pub start_time: Option<u64>,
    last_progress: u64,
    last_progress_at: Instant,
    /// A reported-unhealthy instance stays out of routing at least until then.
    hold_until: Option<Instant>,
    /// A caller's report waiting for the broker's own evidence: (consumer position and
    /// progress when reported, reason). See `State::report_unhealthy`.
    reported: Option<(u64, u64, String, Instant)>,
    pub transitions: VecDeque<Transition>,
}

impl Live {
    pub fn new(pid: u32, heartbeat: Heartbeat) -> Live {
        Live {
            status: Status::Online,
            heartbeat,
            start_time: sys::process_start_time(pid).ok(),
            last_progress: 0,
            last_progress_at: Instant::now(),
            hold_until: None,
            reported: None,
            transitions: VecDeque::new(),
        }
    }
}

/// Which pids have a pidfd watcher, and which still need one (the server spawns them).
#[derive(Default)]
pub(crate) struct Watch {
    watched: HashSet<u32>,
    pending: Vec<u32>,
    /// Pids pidfd_open failed for: checked by polling in the tick instead.
    polled: HashSet<u32>,
    departed: VecDeque<InstanceHealth>,
}

/// Whether `pid` is still the process that started at `start_time` (clock ticks since
/// boot, from `/proc/PID/stat`): a recycled pid has another start time.
pub fn same_process_alive(pid: u32, start_time: Option<u64>) -> bool {
    if !sys::process_exists(pid) {
        return false;
    }
    match (start_time, sys::process_start_time(pid)) {
        (Some(then), Ok(now)) => then == now,
        (_, Err(e)) if e.kind() == std::io::ErrorKind::NotFound => false,
        // Cannot compare (no /proc access): existence is all we know.
        _ => true,
    }
}

impl State {
    pub(crate) fn watch_pid(&mut self, pid: u32) {
        if self.liveness.watched.insert(pid) {
            self.liveness.pending.push(pid);
        }
    }

    /// Pids the server should start pidfd watchers for.
    pub fn take_pending_watches(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.liveness.pending)
    }

    /// The server could not open a pidfd for `pid`: fall back to polling it.
    pub fn poll_pid(&mut self, pid: u32) {
        self.liveness.polled.insert(pid);
    }

    /// A registered process exited: its instances go `Offline` and leave at once.
    pub fn process_exited(&mut self, pid: u32, how: &str) {
        self.liveness.watched.remove(&pid);
        self.liveness.polled.remove(&pid);
        let gone: Vec<u32> = (0..self.instances.len() as u32)
            .filter(|&i| {
                self.instances[i as usize]
                    .as_ref()
                    .is_some_and(|r| r.peer.pid == pid)
            })
            .collect();
        for i in gone {
            let reason = format!("process {pid} exited ({how})");
            self.set_status(i, Status::Offline, &reason);
            self.remove_instance(i, &reason);
        }
    }

    /// Changes an instance's status in the registry (routing follows at once) and records it.
    pub(crate) fn set_status(&mut self, index: u32, to: Status, reason: &str) {
        let Some(rec) = self.instances[index as usize].as_mut() else {
            return;
        };
        let from = rec.live.status;
        if from == to {
            return;
        }
        rec.live.status = to;
        self.metrics.transition(&rec.id, from, to, reason);
        rec.live.transitions.push_back(Transition {
            at_ms: sys::unix_millis(),
            from,
            to,
            reason: reason.to_owned(),
        });
        if rec.live.transitions.len() > TRANSITIONS_KEPT {
            rec.live.transitions.pop_front();
        }
        tracing::info!(instance = %rec.id, pid = rec.peer.pid, ?from, ?to, reason, "instance status changed");
        let svc = rec.service;
        let e = self.registry.instance(index).expect("index in range");
        let s = e.seq.write_begin();
        e.status.store(to as u32, Relaxed);
        e.seq.write_end(s);
        // Wakes `watch`ers of the service and of the registry.
        self.write_service(svc);
    }

    /// A caller saw consecutive timeouts from this instance. A report alone changes nothing
    /// (any caller could send one): it counts if, at the next tick, the broker sees for
    /// itself that a request still waits at the same ring position and the serving loop has
    /// made no progress for at least `REPORT_EVIDENCE`. Then the instance is `Unhealthy` and held out for one
    /// heartbeat timeout.
    pub fn report_unhealthy(&mut self, index: u32, incarnation: u64, reason: &str) -> Reply {
        let Some(rec) = self
            .instances
            .get_mut(index as usize)
            .and_then(Option::as_mut)
        else {
            return (Response::Done, Vec::new());
        };
        if rec.incarnation != incarnation || rec.live.status != Status::Online {
            return (Response::Done, Vec::new());
        }
        if reason.len() > 256 {
            return (
                Response::Error(WireError::BadRequest("reason over 256 bytes".into())),
                Vec::new(),
            );
        }
        let head = heads(rec);
        let progress = rec.seg.counters().progress.load(Relaxed);
        rec.live.reported = Some((head, progress, reason.to_owned(), Instant::now()));
        (Response::Done, Vec::new())
    }

    /// Checks a pending report against the instance's own words (see `report_unhealthy`).
    fn confirm_report(&mut self, index: u32) {
        let Some(rec) = self.instances[index as usize].as_mut() else {
            return;
        };
        let Some((head, progress, reason, at)) = rec.live.reported.take() else {
            return;
        };
        if at.elapsed() < REPORT_EVIDENCE {
            // Too soon to tell a stuck loop from one between two requests.
            rec.live.reported = Some((head, progress, reason, at));
            return;
        }
        let stuck = heads(rec) == head
            && queued(rec) > 0
            && rec.seg.counters().progress.load(Relaxed) == progress;
        if !stuck || rec.live.status != Status::Online {
            tracing::debug!(instance = %rec.id, reason, "unhealthy report not confirmed: the instance is moving");
            return;
        }
        rec.live.hold_until =
            Some(Instant::now() + Duration::from_millis(rec.live.heartbeat.timeout_ms));
        self.set_status(index, Status::Unhealthy, &reason);
    }

    /// The tick's liveness work: polled pids, and progress of every instance.
    pub(crate) fn check_liveness(&mut self) {
        let dead: Vec<u32> = self
            .liveness
            .polled
            .iter()
            .copied()
            .filter(|&pid| {
                let start = self
                    .instances
                    .iter()
                    .flatten()
                    .find(|r| r.peer.pid == pid)
                    .and_then(|r| r.live.start_time);
                !same_process_alive(pid, start)
            })
            .collect();
        for pid in dead {
            self.process_exited(pid, "no longer running");
        }
        let now = Instant::now();
        for i in 0..self.instances.len() as u32 {
            if self.instances[i as usize].is_none() {
                continue;
            }
            let t0 = Instant::now();
            self.check_instance(i, now);
            let ns = t0.elapsed().as_nanos() as u64;
            if let Some(rec) = self.instances[i as usize].as_ref() {
                let h = &mut self.metrics.healthcheck;
                match h.get(&rec.id) {
                    Some(h) => h.observe(ns),
                    None => h.entry(rec.id.clone()).or_default().observe(ns),
                }
            }
        }
    }

    /// One instance's check: a report to confirm, progress made or not, for how long.
    fn check_instance(&mut self, i: u32, now: Instant) {
        self.confirm_report(i);
        let Some(rec) = self.instances[i as usize].as_mut() else {
            return;
        };
        let p = rec.seg.counters().progress.load(Relaxed);
        let live = &mut rec.live;
        if p != live.last_progress {
            live.last_progress = p;
            live.last_progress_at = now;
            let held = live.hold_until.is_some_and(|h| now < h);
            if live.status == Status::Unhealthy && !held {
                live.hold_until = None;
                self.set_status(i, Status::Online, "serving loop made progress again");
            }
            return;
        }
        let stalled = now.duration_since(live.last_progress_at);
        if live.status == Status::Online
            && stalled >= Duration::from_millis(live.heartbeat.timeout_ms)
        {
            let queued = queued(rec);
            let reason = format!(
                "serving loop made no progress for {} ms ({queued} requests waiting)",
                stalled.as_millis()
            );
            self.set_status(i, Status::Unhealthy, &reason);
        }
    }

    pub(crate) fn record_departure(&mut self, rec: &InstanceRec, reason: &str) {
        let mut h = self.health_of(rec);
        if h.status != Status::Offline {
            h.transitions.push(Transition {
                at_ms: sys::unix_millis(),
                from: h.status,
                to: Status::Offline,
                reason: reason.to_owned(),
            });
            h.status = Status::Offline;
        }
        self.liveness.departed.push_back(h);
        if self.liveness.departed.len() > DEPARTED_KEPT {
            self.liveness.departed.pop_front();
        }
    }

    fn health_of(&self, r: &InstanceRec) -> InstanceHealth {
        InstanceHealth {
            service: self.services[r.service as usize]
                .as_ref()
                .map_or_else(String::new, |s| s.name.clone()),
            id: r.id.clone(),
            index: r.seg.index,
            pid: r.peer.pid,
            status: r.live.status,
            requests_served: r.seg.counters().requests_served.load(Relaxed),
            queued: queued(r),
            last_progress_ms: r.live.last_progress_at.elapsed().as_millis() as u64,
            heartbeat: r.live.heartbeat,
            transitions: r.live.transitions.iter().cloned().collect(),
        }
    }

    /// Current instances (of `service`, or all), then recently departed ones.
    pub fn health(&self, service: Option<&str>) -> Vec<InstanceHealth> {
        let mut v: Vec<InstanceHealth> = self
            .instances
            .iter()
            .flatten()
            .map(|r| self.health_of(r))
            .collect();
        v.extend(self.liveness.departed.iter().cloned());
        v.retain(|h| service.is_none_or(|s| h.service == s));
        v
    }
}

/// Requests waiting in an instance's channels.
pub(crate) fn queued(r: &InstanceRec) -> u64 {
    r.channels
        .values()
        .map(|c| c.ring().len())
        .fold(0, u64::saturating_add)
}

/// Requests routed to the instance, counted so that no caller can inflate it: the
/// requests it answered (its own counter, which only it writes) plus those waiting in its
/// channels, each channel's count capped at its slot count (a channel's enqueue position
/// is its caller's to write), never less than what was reported before (a counter does
/// not go down while a taken request is being handled). A caller faking a full channel
/// adds at most its slot count, once.
pub(crate) fn selections(r: &InstanceRec) -> u64 {
    let served = r.seg.counters().requests_served.load(Relaxed);
    let now = r
        .channels
        .values()
        .map(|c| c.ring().len().min(c.layout.slot_count as u64))
        .fold(served, u64::saturating_add);
    r.selections_reported.fetch_max(now, Relaxed).max(now)
}

/// The sum of the instance's channels' head positions: unchanged while it takes nothing.
fn heads(r: &InstanceRec) -> u64 {
    r.channels
        .values()
        .map(|c| c.ring().taken())
        .fold(0, u64::wrapping_add)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recycled_pid_with_another_start_time_is_not_the_registered_process() {
        let me = std::process::id();
        let start = sys::process_start_time(me).unwrap();
        assert!(same_process_alive(me, Some(start)));
        // Same pid, different start time: what a recycled pid looks like.
        assert!(!same_process_alive(me, Some(start + 1)));
        // A pid that cannot exist.
        assert!(!same_process_alive(u32::MAX / 2, None));
    }
}
