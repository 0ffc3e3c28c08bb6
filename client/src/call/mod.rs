//! The call path: a request into an instance's ring, the reply out of one of this
//! connection's mailboxes, failover over instances, and what can go wrong on the way
//! (timeouts, instances that leave or stall, requests in doubt).
//!
//! A call never passes through the broker: the caller picks an instance from the registry
//! (lock-free, [`crate::session::bus`]), writes the request into that instance's ring
//! ([`crate::channel::ring`]), and waits ([`crate::channel::wait`]) on one of its own mailboxes
//! ([`crate::channel::mailbox`]) for the reply.

use std::sync::Arc;
use std::time::{Duration, Instant};

#[cfg(feature = "async")]
pub(crate) mod doorbell;
pub(crate) mod loan;

pub(crate) use loan::{Body, Kept, Sink};
pub use loan::{BorrowedReply, Loan};
#[cfg(feature = "async")]
pub(crate) mod future;

use serde::{de::DeserializeOwned, Serialize};

use crate::channel::mailbox::{self, Cancel, Target, Wait};
use crate::channel::ring::{Doorbell, RingRef};
use crate::channel::wait::{Backoff, Seats, Spin, Waiter};
use crate::error::{code, Attempt, Error, Result};
use crate::names;
use crate::session::breaker;
use crate::session::bus::{Bus, BusInner, CallInfo, Selection, Session};
use crate::session::proto::{Request, Response};
use crate::shm::layout::{
    ChannelSeg, InstanceSeg, Mb, MsgHeader, RegistryView, ServiceEntry, Status,
    PAYLOAD_CHANNEL_HEAP, PAYLOAD_HEAP, PAYLOAD_INLINE,
};
use crate::shm::sync::Ordering;
use crate::trace::TraceContext;

/// Default [`CallOptions::stall_bound`]: four liveness checks of a sleeping caller, far
/// below the heartbeat timeout that would otherwise take a stuck instance out of routing.
pub const DEFAULT_STALL_BOUND: Duration = Duration::from_millis(20);

/// Per-call options. Defaults follow the seed: 5 s per attempt, 15 s in all, up to 3
/// instances.
#[derive(Debug, Clone)]
pub struct CallOptions {
    /// Deadline for the whole call, all attempts included.
    pub timeout: Duration,
    /// Deadline for one attempt on one instance.
    pub attempt_timeout: Duration,
    /// Instances to try at most (different ones).
    pub max_attempts: u32,
    /// Whether the request may run twice. A request an instance never took is always
    /// retried elsewhere; one it took but did not answer (it died or hung) only if this is set.
    pub idempotent: bool,
    /// Instance ids not to use.
    pub exclude: Vec<String>,
    pub selection: Selection,
    /// Overrides the bus's spin policy for this call.
    pub spin: Option<Spin>,
    /// Hops so far (set by nested calls made while handling a request: [`CallOptions::nested`]).
    pub hops: u8,
    /// More hops than this is `LoopDetected`.
    pub max_hops: u8,
    /// Trace id carried to the instance; `None` makes a fresh one. Superseded by `trace`
    /// when that is set (this is its low 64 bits).
    pub trace_id: Option<u64>,
    /// The W3C trace context to continue (a new span of that trace is made for the call);
    /// `None` starts a trace (or continues `trace_id`).
    pub trace: Option<TraceContext>,
    /// A deadline for the whole call besides `timeout` (the earlier one holds): a call
    /// made while handling a request inherits the request's ([`CallOptions::nested`]).
    pub deadline: Option<Instant>,
    /// How long an instance may make no progress while our request waits in its ring,
    /// untaken, before the request is withdrawn and sent to another instance (it never
    /// ran, so this is safe without `idempotent`). Calls from this process then avoid the
    /// instance until it moves again. Calls by resource id wait instead (only the owner
    /// can answer them).
    pub stall_bound: Duration,
    /// Asked while the call sleeps for its reply (at least every
    /// [`mailbox::LIVENESS_CHECK`]): `true` ends the call with [`Error::Interrupted`]
    /// (a request not yet taken is withdrawn; one being handled is abandoned to its
    /// instance). For runtimes that must see signals during a blocking call (Python's
    /// Ctrl-C); `None` (the default) costs nothing.
    pub interrupt: Option<Interrupt>,
}

/// A check a sleeping call makes ([`CallOptions::interrupt`]).
#[derive(Clone)]
pub struct Interrupt(pub std::sync::Arc<dyn Fn() -> bool + Send + Sync>);

impl std::fmt::Debug for Interrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Interrupt(..)")
    }
}

impl Default for CallOptions {
    fn default() -> Self {
        CallOptions {
            timeout: Duration::from_secs(15),
            attempt_timeout: Duration::from_secs(5),
            max_attempts: 3,
            idempotent: false,
            exclude: Vec::new(),
            selection: Selection::RoundRobin,
            spin: None,
            hops: 0,
            max_hops: 8,
            trace_id: None,
            trace: None,
            deadline: None,
            stall_bound: DEFAULT_STALL_BOUND,
            interrupt: None,
        }
    }
}

impl CallOptions {
    /// One budget for the whole call and for each attempt.
    pub fn timeout(timeout: Duration) -> CallOptions {
        CallOptions {
            timeout,
            attempt_timeout: timeout,
            ..Default::default()
        }
    }

    /// Options for a call made while handling `req`: one more hop, the same trace, and
    /// no later than the request's deadline.
    pub fn nested(req: &crate::Request<'_>) -> CallOptions {
        CallOptions::default().within(&req.context())
    }

    /// These options for a call made while handling the request `ctx` describes.
    pub fn within(mut self, ctx: &CallContext) -> CallOptions {
        self.hops = ctx.hops.saturating_add(1);
        self.trace = Some(ctx.trace);
        self.trace_id = Some(ctx.trace.id64());
        self.deadline = match (self.deadline, ctx.deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self
    }

    /// When the whole call ends if it started at `start`.
    fn call_deadline(&self, start: Instant) -> Instant {
        let d = start + self.timeout;
        self.deadline.map_or(d, |x| d.min(x))
    }
}

/// What a call made while handling a request takes from it: hops, trace and deadline
/// ([`crate::Request::context`]; the C and Python faces keep one per serving thread).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallContext {
    pub hops: u8,
    pub trace: TraceContext,
    /// When the request's caller stops waiting for the reply.
    pub deadline: Option<Instant>,
}

/// A reply and who sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub payload: Vec<u8>,
    pub instance_id: String,
}

/// Why a send-and-wait did not produce a reply.
pub(crate) enum Failed {
    /// The request never ran (not taken, ring full, instance gone first): safe to resend.
    NotDelivered(&'static str),
    /// Taken but not answered: it may have run; resend only if idempotent.
    InDoubt(&'static str),
    /// A definite answer (the handler's error, or a local failure).
    Error(Error),
}

impl From<Error> for Failed {
    fn from(e: Error) -> Failed {
        Failed::Error(e)
    }
}

/// One successful call in this many per thread is logged (target `aegis_ipc::route`, level
/// info): a thread-local count and compare is all the fast path pays. Failed calls are
/// logged every time (warn), with their trace id.
pub const ROUTE_LOG_SAMPLE: u32 = 1024;

fn route_log_sampled() -> bool {
    thread_local! {
        static CALLS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    }
    CALLS.with(|c| {
        let n = c.get();
        c.set(n.wrapping_add(1));
        n % ROUTE_LOG_SAMPLE == 0
    })
}

/// Logs a call's failure with its trace id, and returns the error: the bus's own failures
/// (timeouts, no instance) at warn, a handler's answer (an application error) at debug.
fn failed_call(e: Error, trace: u64) -> Error {
    let trace_id = format_args!("{trace:#x}");
    match &e {
        Error::Remote { .. } | Error::BadRequest(_) => {
            tracing::debug!(target: "aegis_ipc::route", %trace_id, "call answered with an error: {e}")
        }
        _ => tracing::warn!(target: "aegis_ipc::route", %trace_id, "call failed: {e}"),
    }
    e
}

/// Bytes before a heap reply: the nonce of the call it answers (see `read_reply`).
pub(crate) const HEAP_TAG: u64 = 8;

/// Why an attempt failed when the instance's ring stayed full.
const RING_FULL: &str = "ring full until the attempt deadline";

/// Why [`Bus::submit_from`] returned without a pending call.
pub(crate) enum Submit {
    Failed(Error),
    /// The ring had no room (only when not waiting for it); the error to give at the
    /// deadline.
    RingFull(Error),
}

impl From<Error> for Submit {
    fn from(e: Error) -> Submit {
        Submit::Failed(e)
    }
}

/// Why an attempt failed when its instance left between being picked and being sent to.
const INSTANCE_LEFT_BEFORE_SEND: &str = "instance left before the request was sent";
/// Why an attempt failed when its request was withdrawn from a stalled instance's ring.
const WITHDRAWN_STALLED: &str =
    "instance made no progress for the stall bound: request withdrawn untaken";
/// Why an attempt failed when a stalled instance's ring had no room for the request.
const FULL_AND_STALLED: &str = "ring full and the instance made no progress for the stall bound";
/// Why an attempt failed when its request was withdrawn untaken from a channel the
/// instance had not taken up when the broker that made it went away (the instance may
/// never learn of it). The next attempt, on any instance, goes through a new channel.
const CHANNEL_NOT_TAKEN_UP: &str =
    "the broker restarted before the instance took up this caller's channel: request withdrawn untaken";

/// Whether an attempt that failed this way used up one of the call's attempts. A request
/// that never reached an instance (it left first, or the request was withdrawn untaken from
/// a stalled one, or never got into its full ring) has not run anywhere: it moves on to
/// another instance without counting. Each instance is tried once per call, so this is
/// bounded by the instances of the service.
fn counts_as_attempt(why: &str) -> bool {
    ![
        INSTANCE_LEFT_BEFORE_SEND,
        WITHDRAWN_STALLED,
        FULL_AND_STALLED,
        CHANNEL_NOT_TAKEN_UP,
    ]
    .contains(&why)
}

/// Consecutive timeouts after which a caller reports an instance unhealthy.
const UNHEALTHY_AFTER_TIMEOUTS: u32 = 3;

/// Rejects options no call can honour.
fn check_options(opts: &CallOptions) -> Result<()> {
    if opts.stall_bound.is_zero() {
        return Err(Error::BadRequest(
            "stall_bound must be longer than zero (it is how long an instance may leave a request untaken before it is sent elsewhere)".into(),
        ));
    }
    check_hops(opts)
}

fn check_hops(opts: &CallOptions) -> Result<()> {
    if opts.hops > opts.max_hops {
        return Err(Error::LoopDetected {
            hops: opts.hops,
            limit: opts.max_hops,
        });
    }
    Ok(())
}

/// Whether sending `body` to `seg` takes its channel's request heap: too large for a ring
/// slot, or a loan made in another channel.
fn needs_heap(body: &Body<'_>, method: &str, seg: &InstanceSeg) -> bool {
    let Some(chan) = seg.channel.as_ref() else {
        return false;
    };
    match *body {
        Body::Loaned { chan: c, .. } => !Arc::ptr_eq(c, chan),
        Body::Bytes(p) => !fits_slot(p, method, &chan.ring()),
    }
}

/// Whether `method` and `payload` fit in one ring slot (else the payload goes through the
/// channel's request heap).
fn fits_slot(payload: &[u8], method: &str, ring: &RingRef<'_>) -> bool {
    payload.len() + method.len() <= ring.data_len()
}

fn check_size(service: &str, len: usize, max: u64) -> Result<()> {
    if len as u64 > max {
        return Err(Error::MessageTooLarge {
            service: service.to_owned(),
            size: len as u64,
            max,
        });
    }
    Ok(())
}

impl Bus {
    /// Calls `method` of `service` on one of its healthy instances (round-robin).
    pub fn call(
        &self,
        service: &str,
        method: &str,
        payload: &[u8],
        opts: &CallOptions,
    ) -> Result<Reply> {
        let mut out = Vec::new();
        let info = self.call_into(service, method, payload, opts, &mut out)?;
        Ok(Reply {
            payload: out,
            instance_id: self.instance_id(info),
        })
    }

    /// Like [`Bus::call`], but writes the reply into `out` (reusing its allocation) and
    /// returns which instance answered: the allocation-free fast path.
    pub fn call_into(
        &self,
        service: &str,
        method: &str,
        payload: &[u8],
        opts: &CallOptions,
        out: &mut Vec<u8>,
    ) -> Result<CallInfo> {
        self.call_with(
            service,
            method,
            Body::Bytes(payload),
            opts,
            &mut Sink::copy(out),
        )
    }

    /// The routing loop of [`Bus::call_into`]: picks instances and makes attempts until
    /// one answers, the attempts run out or the deadline passes. `sent` counts the
    /// instances the request reached (see [`counts_as_attempt`]).
    #[allow(clippy::too_many_arguments)]
    fn route(
        &self,
        (start, sess, svc_idx, svc): (Instant, &Session, u32, &ServiceEntry),
        service: &str,
        method: &str,
        payload: Body<'_>,
        opts: &CallOptions,
        out: &mut Sink<'_>,
        sent: &mut usize,
    ) -> Result<CallInfo> {
        let inner = &*self.inner;
        let no_instance = || Error::NoAvailableInstance {
            service: service.to_owned(),
        };
        let max = svc.seq.read(|| svc.max_message.load(Ordering::Relaxed));
        check_size(service, payload.bytes().len(), max)?;
        let total = opts.call_deadline(start);
        // One trace id for the whole call: every attempt carries it, and so does its error.
        let trace = inner.trace_of(opts);
        let timed_out = |attempts| Error::Timeout {
            service: service.to_owned(),
            elapsed: start.elapsed(),
            attempts,
            trace_id: trace,
        };
        let mut attempts: Vec<Attempt> = Vec::new();
        let mut tried: Vec<u32> = Vec::new();
        loop {
            let skip = |m: u32| {
                tried.contains(&m)
                    || (!opts.exclude.is_empty() && opts.exclude.contains(&sess.instance_name(m)))
            };
            // A loan goes first to the instance whose channel it lies in, if it is routable
            // and not seen stalled.
            let loaned_to = match payload {
                Body::Loaned { chan, .. } if attempts.is_empty() => Some(chan.instance),
                _ => None,
            };
            // Instances seen stalled are avoided while another one is routable.
            let target = loaned_to
                .and_then(|to| {
                    sess.pick(svc_idx, svc, &opts.selection, |m| {
                        m != to || skip(m) || inner.seen_stalled(m)
                    })
                })
                .or_else(|| inner.pick_target(sess, (svc_idx, svc), &opts.selection, skip));
            let Some(target) = target else {
                // Instances that left before we could send are not failures of the call.
                let all_left = attempts
                    .iter()
                    .all(|a| a.error == INSTANCE_LEFT_BEFORE_SEND);
                return Err(failed_call(
                    if all_left {
                        no_instance()
                    } else {
                        timed_out(attempts)
                    },
                    trace,
                ));
            };
            // The first attempt starts when the call did: one clock read fewer per call.
            let t = if attempts.is_empty() {
                start
            } else {
                Instant::now()
            };
            let deadline = (t + opts.attempt_timeout).min(total);
            // Withdrawing a stalled request is worth it only with somewhere else to send it
            // (asked only once the instance has stalled: off the fast path).
            let elsewhere = || sess.any_online(svc_idx, svc, |m| m == target.instance || skip(m));
            let attempt = inner.attempt(
                sess,
                target,
                method,
                payload,
                opts,
                (deadline, trace, t),
                Some(&elsewhere),
                out,
            );
            let failed = match attempt {
                Ok(()) => {
                    *sent = 1 + attempts
                        .iter()
                        .filter(|a| counts_as_attempt(&a.error))
                        .count();
                    inner.note_success(target);
                    if route_log_sampled() {
                        tracing::info!(target: "aegis_ipc::route", service, method,
                            instance = %inner.instance_name(target.instance),
                            trace_id = format_args!("{trace:#x}"), attempts = attempts.len() + 1,
                            "call routed (1 call in {ROUTE_LOG_SAMPLE} per thread is logged)");
                    }
                    return Ok(target);
                }
                Err(Failed::Error(e)) => {
                    *sent = 1 + attempts.len();
                    return Err(failed_call(inner.remote_error(target, e), trace));
                }
                Err(f) => f,
            };
            let (why, in_doubt) = match failed {
                Failed::NotDelivered(w) => (w, false),
                Failed::InDoubt(w) => (w, true),
                Failed::Error(_) => unreachable!("returned above"),
            };
            if why.contains("deadline") {
                inner.note_timeout(target);
            }
            attempts.push(Attempt {
                instance: inner.instance_name(target.instance),
                error: why.to_owned(),
                duration: t.elapsed(),
            });
            // An orphaned channel is replaced before the next attempt, which may go to the
            // same instance (bounded: once per broker restart).
            if why != CHANNEL_NOT_TAKEN_UP {
                tried.push(target.instance);
            }
            *sent = attempts
                .iter()
                .filter(|a| counts_as_attempt(&a.error))
                .count();
            // A loan's block held by a quarantined mailbox is not sent again: only one
            // quarantine may own it.
            if (in_doubt && (!opts.idempotent || out.block_held))
                || *sent as u32 >= opts.max_attempts
                || Instant::now() >= total
            {
                return Err(failed_call(timed_out(attempts), trace));
            }
        }
    }

    /// Calls `method` on the one instance that owns `resource`. The owner is looked up
    /// lock-free in the shared-memory resource map: no broker round trip.
    pub fn call_resource(
        &self,
        resource: &str,
        method: &str,
        payload: &[u8],
        opts: &CallOptions,
    ) -> Result<Reply> {
        let mut out = Vec::new();
        let info = self.call_resource_into(resource, method, payload, opts, &mut out)?;
        Ok(Reply {
            payload: out,
            instance_id: self.instance_id(info),
        })
    }

    /// [`Bus::call_resource`] writing into a reused buffer.
    pub fn call_resource_into(
        &self,
        resource: &str,
        method: &str,
        payload: &[u8],
        opts: &CallOptions,
        out: &mut Vec<u8>,
    ) -> Result<CallInfo> {
        self.call_resource_with(
            resource,
            method,
            Body::Bytes(payload),
            opts,
            &mut Sink::copy(out),
        )
    }

    /// The owner of `resource`, if it is online, with its service (registry index, entry
    /// and name) and the service's largest message.
    pub(crate) fn online_owner(
        &self,
        resource: &str,
    ) -> Result<(CallInfo, (u32, &ServiceEntry), String, u64)> {
        names::resource_id(resource)?;
        let inner = &*self.inner;
        inner.not_forked()?;
        let not_found = || Error::ResourceNotFound {
            resource: resource.to_owned(),
        };
        let target = self.lookup_resource(resource).ok_or_else(not_found)?;
        let e = inner
            .registry()
            .instance(target.instance)
            .ok_or_else(not_found)?;
        let (status, svc_idx, inc) = e.seq.read(|| {
            (
                e.status.load(Ordering::Relaxed),
                e.service.load(Ordering::Relaxed),
                e.incarnation.load(Ordering::Relaxed),
            )
        });
        if inc != target.incarnation {
            // The owner left between the two reads; its ids were released with it.
            return Err(not_found());
        }
        if status != Status::Online as u32 {
            return Err(Error::OwnerUnavailable {
                resource: resource.to_owned(),
                owner: inner.instance_name(target.instance),
                status: Status::from_u32(status),
            });
        }
        let svc = inner.registry().service(svc_idx).ok_or_else(not_found)?;
        let (max, (name, len)) = svc
            .seq
            .read(|| (svc.max_message.load(Ordering::Relaxed), svc.name.load()));
        let service = String::from_utf8_lossy(&name[..len]).into_owned();
        Ok((target, (svc_idx, svc), service, max))
    }

    /// The call path shared by [`Bus::call_resource_into`] and [`Bus::call_resource_loan`]:
    /// one attempt, on the owner, under its service's circuit breaker; the reply in `sink`.
    pub(crate) fn call_resource_with(
        &self,
        resource: &str,
        method: &str,
        body: Body<'_>,
        opts: &CallOptions,
        sink: &mut Sink<'_>,
    ) -> Result<CallInfo> {
        let start = Instant::now();
        names::resource_id(resource)?;
        names::method(method)?;
        let (target, (svc_idx, svc), service, max) = self.online_owner(resource)?;
        check_size(&service, body.bytes().len(), max)?;
        check_options(opts)?;
        let inner = &*self.inner;
        let stats = inner.session().stats.caller_stats(svc_idx);
        let cfg = &inner.opts.circuit_breaker;
        breaker::guarded(cfg, stats, svc, &service, |sent| {
            // One attempt, on the owner.
            *sent = 1;
            let deadline = opts.call_deadline(start).min(start + opts.attempt_timeout);
            let trace = inner.trace_of(opts);
            match inner.attempt(
                inner.session(),
                target,
                method,
                body,
                opts,
                (deadline, trace, start),
                None,
                sink,
            ) {
                Ok(()) => Ok(target),
                Err(Failed::NotDelivered(w) | Failed::InDoubt(w)) if w.contains("left") => {
                    Err(Error::OwnerUnavailable {
                        resource: resource.to_owned(),
                        owner: inner.instance_name(target.instance),
                        status: Status::Offline,
                    })
                }
                Err(f) => Err(inner.one_attempt_error(inner.session(), target, f, (start, trace))),
            }
        })
    }

    /// Sends a call and returns at once, without waiting for its reply, so that one thread
    /// can have many calls in flight (one mailbox each: [`crate::BusOptions::mailboxes`];
    /// past them, `LimitExceeded`). Collect each reply with [`Pending::wait`], in any order.
    ///
    /// A submitted call makes one attempt, on one instance: no failover (a request that
    /// never ran, `Timeout` saying "not taken", can simply be submitted again), and no stall
    /// withdrawal. Dropping a [`Pending`] cancels its call: a request not yet taken never
    /// runs, and the mailbox comes back at once (or when the instance has answered).
    pub fn submit(
        &self,
        service: &str,
        method: &str,
        payload: &[u8],
        opts: &CallOptions,
    ) -> Result<Pending<'_>> {
        self.submit_from(
            Instant::now(),
            service,
            method,
            Body::Bytes(payload),
            opts,
            true,
        )
        .map_err(|e| match e {
            Submit::Failed(e) | Submit::RingFull(e) => e,
        })
    }

    /// [`Bus::submit`] for an event loop: never waits for room in a full ring. `Ok(None)`
    /// says the ring the call was routed to is full, or every reply mailbox of this
    /// connection holds a call in flight; submit it again later (on a timer, or
    /// after a reply arrived) with the same `start`, the moment the call began. Once the
    /// call's deadline (`start` + the shorter of its timeout and attempt timeout) has
    /// passed with the ring still full, the answer is the `Timeout` a waiting
    /// [`Bus::submit`] would have given. Each try picks an instance again, so the call goes
    /// wherever there is room.
    pub fn try_submit(
        &self,
        start: Instant,
        service: &str,
        method: &str,
        payload: &[u8],
        opts: &CallOptions,
    ) -> Result<Option<Pending<'_>>> {
        match self.submit_from(start, service, method, Body::Bytes(payload), opts, false) {
            Ok(p) => Ok(Some(p)),
            Err(Submit::Failed(e)) => Err(e),
            Err(Submit::RingFull(e)) => {
                if Instant::now() >= opts.call_deadline(start).min(start + opts.attempt_timeout) {
                    tracing::warn!(target: "aegis_ipc::route", "call failed: {e}");
                    Err(e)
                } else {
                    Ok(None)
                }
            }
        }
    }

    /// [`Bus::submit`] for a call that started at `start`. With `wait_for_room` false, a
    /// full ring is not waited on: `Submit::RingFull` (carrying the error to give if the
    /// call's deadline passes that way) says to come back when there is room — an async
    /// caller must not block its executor's thread. A loan goes to the instance whose
    /// channel it lies in while that one is routable.
    pub(crate) fn submit_from(
        &self,
        start: Instant,
        service: &str,
        method: &str,
        body: Body<'_>,
        opts: &CallOptions,
        wait_for_room: bool,
    ) -> Result<Pending<'_>, Submit> {
        names::service(service)?;
        names::method(method)?;
        check_options(opts)?;
        let inner = &*self.inner;
        inner.not_forked()?;
        let no_instance = || Error::NoAvailableInstance {
            service: service.to_owned(),
        };
        let sess = inner.routing_session(service);
        let (svc_idx, svc) = sess.find_service(service).ok_or_else(no_instance)?;
        let max = svc.seq.read(|| svc.max_message.load(Ordering::Relaxed));
        check_size(service, body.bytes().len(), max)?;
        // The breaker admits a submitted call; its outcome, collected later, is not
        // counted (see `breaker`).
        breaker::admit(
            &inner.opts.circuit_breaker,
            sess.stats.caller_stats(svc_idx),
            svc,
            service,
        )?;
        let skip =
            |m: u32| !opts.exclude.is_empty() && opts.exclude.contains(&sess.instance_name(m));
        let loaned_to = match body {
            Body::Loaned { chan, .. } => Some(chan.instance),
            Body::Bytes(_) => None,
        };
        let target = loaned_to
            .and_then(|to| {
                sess.pick(svc_idx, svc, &opts.selection, |m| {
                    m != to || skip(m) || inner.seen_stalled(m)
                })
            })
            .or_else(|| inner.pick_target(sess, (svc_idx, svc), &opts.selection, skip))
            .ok_or_else(no_instance)?;
        let deadline = opts.call_deadline(start).min(start + opts.attempt_timeout);
        let trace = inner.trace_of(opts);
        if !wait_for_room && !inner.pool.may_have_free() {
            // Every mailbox holds a call in flight: an event loop comes back when one is done.
            return Err(Submit::RingFull(Error::LimitExceeded(format!(
                "all {} reply mailboxes of this connection are in use (calls in flight) until the call's deadline",
                inner.client.layout.mailboxes
            ))));
        }
        let seg = inner
            .open_target(target, deadline)
            .map_err(|f| inner.one_attempt_error(sess, target, f, (start, trace)))?;
        // Not waiting for room: the ring is tried once (its claim deadline has passed).
        let claim_until = if wait_for_room { deadline } else { start };
        match inner.send(
            &seg,
            method,
            body,
            opts,
            (claim_until, trace, start),
            deadline,
            &mut None,
        ) {
            Err(Failed::NotDelivered(why)) if !wait_for_room && why == RING_FULL => {
                // Not logged: the caller comes back, and logs the error if it gives up.
                Err(Submit::RingFull(Error::Timeout {
                    service: service.to_owned(),
                    elapsed: start.elapsed(),
                    attempts: vec![Attempt {
                        instance: inner.instance_name(target.instance),
                        error: why.to_owned(),
                        duration: start.elapsed(),
                    }],
                    trace_id: trace,
                }))
            }
            Ok(sent) => Ok(Pending {
                loan: None,
                inner: &self.inner,
                sess,
                target,
                sent: Some(sent.to_static()),
                seg,
                spin: opts.spin,
                interrupt: opts.interrupt.clone(),
                deadline,
                start,
                trace,
            }),
            Err(f) => Err(inner
                .one_attempt_error(sess, target, f, (start, trace))
                .into()),
        }
    }

    /// Typed call: `req` and the reply travel as bincode (serde).
    pub fn call_typed<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        service: &str,
        method: &str,
        req: &Req,
        opts: &CallOptions,
    ) -> Result<Resp> {
        let body = crate::codec::encode(req)
            .map_err(|e| Error::BadRequest(format!("request could not be encoded: {e}")))?;
        let mut out = Vec::new();
        let info = self.call_into(service, method, &body, opts, &mut out)?;
        crate::codec::decode(&out).map_err(|e| {
            Error::BadRequest(format!(
                "reply from instance '{}' could not be decoded: {e}",
                self.instance_id(info)
            ))
        })
    }
}

impl BusInner {
    /// One attempt on one instance. With `elsewhere`, a request the instance leaves untaken
    /// for the stall bound is withdrawn (`NotDelivered`) if `elsewhere()` says another
    /// instance could take it.
    #[allow(clippy::too_many_arguments)]
    fn attempt(
        &self,
        sess: &Session,
        target: CallInfo,
        method: &str,
        payload: Body<'_>,
        opts: &CallOptions,
        stamp: (Instant, u64, Instant),
        elsewhere: Option<&dyn Fn() -> bool>,
        out: &mut Sink<'_>,
    ) -> Result<(), Failed> {
        let mut seg = self.open_target(target, stamp.0)?;
        if needs_heap(&payload, method, &seg) {
            seg = self.with_heap(seg, target, stamp.0)?;
        }
        let stall = elsewhere.map(|e| (opts.stall_bound, e));
        self.send_and_wait(sess, &seg, method, payload, opts, stamp, stall, out)?;
        if let Some(k) = &mut out.kept {
            // A reply read in place keeps its instance's reply heap mapped.
            k.seg = Some(seg);
        }
        Ok(())
    }

    /// The target's segment, mapped (asking the broker, waiting for it within `deadline`
    /// if it is restarting). An instance that left since it was picked, or a broker that
    /// stayed away, is a request that was never sent: safe to send elsewhere.
    fn open_target(
        &self,
        target: CallInfo,
        deadline: Instant,
    ) -> Result<std::sync::Arc<InstanceSeg>, Failed> {
        let seg = self.map_target(target, deadline)?;
        if self.orphaned(&seg) {
            // Announced by a broker that died before the instance fetched it: the instance
            // may never learn of it. The current broker makes a new one.
            self.forget_instance_seg(&seg);
            return self.map_target(target, deadline);
        }
        if self.superseded(&seg, target) {
            // Made by a previous broker, whose instance the current one knows again: a new
            // channel replaces it. The old one carries the calls already in it; once this
            // process lets go of it, it says so there and the instance drops it
            // (`ChannelSeg::moved_on`).
            self.forget_instance_seg(&seg);
            return Ok(self.map_target(target, deadline).unwrap_or(seg));
        }
        Ok(seg)
    }

    /// The segment of instance `target` of `service`, for a loan made in its channel
    /// ([`Bus::loan`]): mapped as a call's first attempt would map it.
    pub(crate) fn loan_target(&self, service: &str, target: CallInfo) -> Result<Arc<InstanceSeg>> {
        let deadline = Instant::now() + CallOptions::default().attempt_timeout;
        let seg = self
            .open_target(target, deadline)
            .and_then(|seg| self.with_heap(seg, target, deadline));
        seg.map_err(|f| match f {
            Failed::Error(e) => e,
            Failed::NotDelivered(_) | Failed::InDoubt(_) => Error::NoAvailableInstance {
                service: service.to_owned(),
            },
        })
    }

    /// `seg` (instance `target`), its channel given its request heap ([`Self::ensure_heap`]):
    /// waiting for a restarting broker until `deadline`, and replacing a channel a previous
    /// broker made (the current one cannot take a heap for it: it makes a new channel).
    fn with_heap(
        &self,
        mut seg: Arc<InstanceSeg>,
        target: CallInfo,
        deadline: Instant,
    ) -> Result<Arc<InstanceSeg>, Failed> {
        // Bounded: a channel is replaced at most once per broker restart.
        for _ in 0..4 {
            let chan = seg
                .channel
                .clone()
                .ok_or_else(|| Error::Protocol("instance opened without a channel".into()))?;
            if chan.heap.get().is_some() {
                return Ok(seg);
            }
            if chan.epoch != self.session().epoch {
                // The current broker makes a new channel once the instance has registered
                // with it again (calls meanwhile keep using the old one).
                self.wait_registered(target, deadline)?;
                self.forget_instance_seg(&seg);
                seg = self.map_target(target, deadline)?;
                continue;
            }
            match self.ask_broker(deadline, || self.ensure_heap(&chan)) {
                Ok(()) => return Ok(seg),
                Err(Error::BrokerUnavailable { .. }) => {
                    return Err(Failed::NotDelivered(
                        "broker away and the channel has no request heap yet: not sent",
                    ))
                }
                // The broker restarted meanwhile: the channel is replaced next pass.
                Err(_) if chan.epoch != self.session().epoch => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Failed::NotDelivered(
            "the channel was replaced again and again: not sent",
        ))
    }

    /// Waits until instance `target` is in the current broker's registry (it registers
    /// again after a broker restart), at most until `deadline`: a futex wait on the
    /// registry's generation, no polling.
    fn wait_registered(&self, target: CallInfo, deadline: Instant) -> Result<(), Failed> {
        loop {
            let sess = self.session();
            let g = &sess.registry.control().generation;
            // Acquire: pairs with the broker's Release bump when the registry changed.
            let seen = g.load(Ordering::Acquire);
            if Self::instance_alive(&sess.registry, target.instance, target.incarnation) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Failed::NotDelivered(
                    "the instance has not registered with the restarted broker yet: not sent",
                ));
            }
            // Bounded: a broker restart replaces the registry (and its word) altogether.
            let _ = crate::shm::sys::futex_wait(g, seen, Some(left.min(Duration::from_millis(10))));
        }
    }

    /// Makes sure `chan` has its request heap: the first time this connection needs one
    /// there, it makes it (twice the bus's largest message), maps it, seals it against
    /// every other writer and hands it to the broker for the instance. Small calls never
    /// need one, and so never pay for it.
    pub(crate) fn ensure_heap(&self, chan: &ChannelSeg) -> Result<()> {
        if chan.heap.get().is_some() {
            return Ok(());
        }
        let _one_maker = self.heap_maker.lock();
        if chan.heap.get().is_some() {
            return Ok(());
        }
        let sess = self.session();
        if chan.epoch != sess.epoch {
            // The broker that made it is gone: the current one cannot hand a heap on.
            return Err(Error::Protocol(
                "a channel made by a previous broker gets no request heap".into(),
            ));
        }
        let (fd, heap) = crate::shm::layout::ChannelHeap::create(
            chan.epoch,
            2 * sess.max_message,
            chan.id,
            crate::shm::layout::HeapSide::Request,
        )
        .map_err(|e| Error::Protocol(format!("making a request heap: {e}")))?;
        use std::os::fd::AsFd;
        match self
            .control
            .lock()
            .request_with_fds(&Request::ChannelHeap { channel: chan.id }, &[fd.as_fd()])?
        {
            (Response::Done, _) => {}
            (other, _) => {
                return Err(Error::Protocol(format!(
                    "ChannelHeap: expected Done, got {other:?}"
                )))
            }
        }
        let _ = chan.heap.set(heap);
        let _ = chan.heap_fd.set(fd);
        Ok(())
    }

    /// Maps `chan`'s reply heap (the first reply there that did not fit the mailbox): the
    /// broker hands over what the instance gave it, checked sealed against every writer but
    /// the instance. A channel a previous broker made is named by its token (the instance
    /// handed the heap to the current broker the same way). While the broker is away, waits
    /// for it as long as calls route on a previous broker's view.
    fn open_reply_heap(&self, chan: &ChannelSeg) -> Result<()> {
        let _one_opener = chan.reply_heap_opener.lock();
        if chan.reply_heap.get().is_some() {
            return Ok(());
        }
        // `NotOwner`: a previous broker's channel whose heap its instance has yet to hand
        // to this broker (it had handed it to the previous one).
        let until = Instant::now() + crate::session::bus::RESTART_BRIDGE;
        let (resp, mut fds) = self.ask_broker_until_owned(until, || {
            self.control.lock().request(&Request::OpenReplyHeap {
                channel: chan.id,
                epoch: chan.epoch,
                token: chan.token(),
            })
        })?;
        let (Response::Opened, Some(fd)) = (&resp, fds.pop()) else {
            return Err(Error::Protocol(format!(
                "OpenReplyHeap: expected Opened and a descriptor, got {resp:?}"
            )));
        };
        Ok(chan.adopt_heap(&fd, crate::shm::layout::HeapSide::Reply)?)
    }

    /// Whether `seg`'s channel was made by a previous broker and the current one has the
    /// instance in its registry again (it re-registered): then the current broker can make
    /// a new channel, which unlike the old one can be given a request heap, and whose
    /// closing the current broker will tell the instance. (The old one gets a reply heap
    /// through its token, for the calls still in it: see `open_reply_heap`.)
    fn superseded(&self, seg: &InstanceSeg, target: CallInfo) -> bool {
        seg.channel.as_ref().is_some_and(|c| {
            let sess = self.session();
            c.epoch != sess.epoch
                && Self::instance_alive(&sess.registry, target.instance, target.incarnation)
        })
    }

    /// Whether `seg`'s channel may be unknown to its instance for good: not taken up yet,
    /// and the broker that made it (and holds the news for the instance) is no longer the
    /// one we are connected to.
    fn orphaned(&self, seg: &InstanceSeg) -> bool {
        seg.channel
            .as_ref()
            .is_some_and(|c| !c.taken_up() && c.epoch != self.session().epoch)
    }

    fn map_target(
        &self,
        target: CallInfo,
        deadline: Instant,
    ) -> Result<std::sync::Arc<InstanceSeg>, Failed> {
        match self.instance_seg(target.instance, target.incarnation, deadline) {
            Ok(seg) => Ok(seg),
            Err(Error::NoAvailableInstance { .. }) => {
                Err(Failed::NotDelivered(INSTANCE_LEFT_BEFORE_SEND))
            }
            Err(Error::BrokerUnavailable { .. }) => Err(Failed::NotDelivered(
                "broker away and the instance's segment not yet mapped: not sent",
            )),
            Err(e) => Err(Failed::Error(e)),
        }
    }

    /// An instance of service `svc_idx` to send to (by `selection`, none that `skip`
    /// names): one seen stalled only when no other is routable.
    #[inline]
    pub(crate) fn pick_target(
        &self,
        sess: &Session,
        (svc_idx, svc): (u32, &ServiceEntry),
        selection: &Selection,
        skip: impl Fn(u32) -> bool,
    ) -> Option<CallInfo> {
        sess.pick(svc_idx, svc, selection, |m| skip(m) || self.seen_stalled(m))
            .or_else(|| sess.pick(svc_idx, svc, selection, &skip))
    }

    /// Whether instance `index` was seen stalled and its progress word has not moved since.
    fn seen_stalled(&self, index: u32) -> bool {
        if self
            .stalled_pending
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0
        {
            return false;
        }
        let mut st = self.stalled.lock();
        let Some(&(inc, progress)) = st.get(&index) else {
            return false;
        };
        let still = self.instances.read().get(&index).is_some_and(|seg| {
            seg.incarnation == inc && seg.counters().progress.load(Ordering::Relaxed) == progress
        });
        if !still {
            st.remove(&index);
            self.stalled_pending
                .store(st.len(), std::sync::atomic::Ordering::Relaxed);
        }
        still
    }

    fn note_stalled(&self, seg: &InstanceSeg, progress: u64) {
        let mut st = self.stalled.lock();
        st.insert(seg.index, (seg.incarnation, progress));
        self.stalled_pending
            .store(st.len(), std::sync::atomic::Ordering::Relaxed);
    }

    /// The error of a call that made one attempt (a submitted call, a call by resource).
    fn one_attempt_error(
        &self,
        sess: &Session,
        target: CallInfo,
        f: Failed,
        (start, trace): (Instant, u64),
    ) -> Error {
        failed_call(
            match f {
                Failed::Error(e) => self.remote_error(target, e),
                Failed::NotDelivered(w) | Failed::InDoubt(w) => Error::Timeout {
                    service: sess.service_of(target.instance),
                    elapsed: start.elapsed(),
                    attempts: vec![Attempt {
                        instance: self.instance_name(target.instance),
                        error: w.to_owned(),
                        duration: start.elapsed(),
                    }],
                    trace_id: trace,
                },
            },
            trace,
        )
    }

    /// Gives up on a sent request nobody will wait for: one not yet taken is cancelled
    /// (it never runs) and its mailbox freed; one being handled is quarantined until its
    /// late reply lands. Returns whether that quarantine took a loan's request block (the
    /// loan must then not free it).
    fn abandon(&self, sent: Sent) -> bool {
        let (mb, _) = sent.mb();
        match mailbox::cancel(mb, sent.gen) {
            Cancel::Cancelled | Cancel::Ready => {
                mailbox::release(mb, sent.gen);
                self.free_sent(&sent);
                false
            }
            Cancel::InProgress => {
                let pid = mailbox::taker_pid(mb);
                self.pool
                    .quarantine(&sent.chan, sent.mailbox, sent.gen, sent.heap, pid);
                sent.loaned
            }
        }
    }

    /// A handler's error as the caller sees it (400 is the caller's `BadRequest`).
    fn remote_error(&self, target: CallInfo, e: Error) -> Error {
        match e {
            Error::Remote {
                code: code::BAD_REQUEST,
                message,
                ..
            } => Error::BadRequest(message),
            Error::Remote { code, message, .. } => Error::Remote {
                instance: self.instance_name(target.instance),
                code,
                message,
            },
            e => e,
        }
    }

    /// Whether instance `index` is still the incarnation we sent to, and not `Offline`.
    fn instance_alive(registry: &RegistryView, index: u32, incarnation: u64) -> bool {
        registry.instance(index).is_some_and(|e| {
            let (st, inc) = e.seq.read(|| {
                (
                    e.status.load(Ordering::Relaxed),
                    e.incarnation.load(Ordering::Relaxed),
                )
            });
            inc == incarnation && (st == Status::Online as u32 || st == Status::Unhealthy as u32)
        })
    }

    fn note_success(&self, target: CallInfo) {
        if self
            .timeouts_pending
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
        {
            let mut t = self.timeouts.lock();
            t.remove(&(target.instance, target.incarnation));
            self.timeouts_pending
                .store(t.len(), std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Counts consecutive timeouts per instance; the third is reported to the broker, which
    /// marks the instance `Unhealthy` (the seed's rule).
    fn note_timeout(&self, target: CallInfo) {
        let n = {
            let mut t = self.timeouts.lock();
            let n = t.entry((target.instance, target.incarnation)).or_insert(0);
            *n += 1;
            let n = *n;
            if n >= UNHEALTHY_AFTER_TIMEOUTS {
                t.remove(&(target.instance, target.incarnation));
            }
            self.timeouts_pending
                .store(t.len(), std::sync::atomic::Ordering::Relaxed);
            n
        };
        if n >= UNHEALTHY_AFTER_TIMEOUTS {
            let req = Request::ReportUnhealthy {
                instance: target.instance,
                incarnation: target.incarnation,
                reason: format!("{n} consecutive timeouts seen by pid {}", self.pid),
            };
            if let Err(e) = self.control().request(&req) {
                tracing::debug!("reporting an unhealthy instance: {e}");
            }
        }
    }

    /// A call's nonce: unique per connection (a bijection of a counter), and random-looking
    /// (it doubles as the call's span id). Only this caller and the instance it calls see
    /// it, and only this caller writes the header and the mailbox it binds together
    /// (channels have one writer per side), so it needs no secrecy: splitmix64's mixer
    /// over the counter plus a random key, a handful of multiplies (SipHash here cost
    /// more than the rest of the nonce's part of the call). The counter is taken a block
    /// per thread at a time ([`take_from_block`]).
    fn next_nonce(&self) -> u64 {
        let n = take_from_block(&NONCE_BLOCK, self.nonce_key, &self.nonce_seq);
        let mut z = n
            .wrapping_add(self.nonce_key)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// The trace id (low 64 bits) a call with `opts` carries.
    fn trace_of(&self, opts: &CallOptions) -> u64 {
        opts.trace
            .map(|t| t.id64())
            .or(opts.trace_id)
            .unwrap_or_else(|| self.next_trace_id())
    }

    /// A fresh trace id (low 64 bits): this process's pid over a count of the traces it
    /// started. The count is the process's, not the connection's: two connections of one
    /// process would otherwise give their n-th calls the same id in logs and errors.
    fn next_trace_id(&self) -> u64 {
        static TRACES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = take_from_block(&TRACE_BLOCK, 0, &TRACES);
        (self.pid as u64) << 40 | (n & ((1 << 40) - 1))
    }

    /// Writes the request into the instance's ring and waits for the reply in `out`.
    #[allow(clippy::too_many_arguments)]
    fn send_and_wait(
        &self,
        routed_with: &Session,
        seg: &InstanceSeg,
        method: &str,
        payload: Body<'_>,
        opts: &CallOptions,
        stamp: (Instant, u64, Instant),
        stall: Option<(Duration, &dyn Fn() -> bool)>,
        out: &mut Sink<'_>,
    ) -> Result<(), Failed> {
        let mut watch = stall.map(|(bound, elsewhere)| StallWatch::new(seg, bound, elsewhere));
        let sent = self.send(seg, method, payload, opts, stamp, stamp.0, &mut watch)?;
        let how = (opts.spin, opts.interrupt.as_ref());
        self.wait_sent(routed_with, seg, sent, how, stamp.0, watch, out)
    }

    /// Frees what a sent request held: its request heap block (unless a loan owns it) and
    /// its mailbox.
    fn free_sent(&self, s: &Sent) {
        self.free_request(s);
        self.pool.put(s.mailbox, s.chan.id);
    }

    /// Frees a sent request's heap block, unless it is a loan's (the loan frees it).
    fn free_request(&self, s: &Sent) {
        if let (Some((off, len)), false) = (s.heap, s.loaned) {
            s.chan.heap_free(off, len);
        }
    }

    /// Writes the request into the instance's ring (waiting for a slot while the ring is
    /// full, until `deadline` or until `watch` sees the instance stalled); `reply_by`, when
    /// the caller stops waiting for the reply, travels in the header. `sent_at` is the
    /// call's last clock reading, stamped into the request for the instance's duration
    /// histogram (no clock read of its own here: the fast path has one per attempt).
    #[allow(clippy::too_many_arguments)]
    fn send<'s>(
        &self,
        seg: &'s InstanceSeg,
        method: &str,
        body: Body<'_>,
        opts: &CallOptions,
        (deadline, trace, sent_at): (Instant, u64, Instant),
        reply_by: Instant,
        watch: &mut Option<StallWatch<'_>>,
    ) -> Result<Sent<'s>, Failed> {
        let channel = seg
            .channel
            .as_ref()
            .ok_or_else(|| Error::Protocol("instance opened without a channel".into()))?;
        let (mb_idx, gen) = self.pool.acquire(channel.id).ok_or_else(|| {
            Error::LimitExceeded(format!(
                "all {} reply mailboxes of this connection are in use (calls in flight)",
                self.client.layout.mailboxes
            ))
        })?;
        let (mb, _) = channel
            .mailbox(mb_idx)
            .expect("the pool hands out indices below every channel's mailbox count");
        let ring = channel.ring();
        let payload = body.bytes();
        let (inline, heap_block, loaned) = match body {
            // Written in place by the caller in this channel's heap: sent as it is.
            Body::Loaned { chan, block, .. } if Arc::ptr_eq(chan, channel) => {
                (false, Some(block), true)
            }
            Body::Bytes(p) if fits_slot(p, method, &ring) => (true, None, false),
            // Too large for a slot, or a loan made in another instance's channel (its
            // instance was not routable any more): copied into this channel's heap.
            Body::Bytes(p) | Body::Loaned { bytes: p, .. } => {
                let len = p.len() as u64;
                if let Err(e) = self.ensure_heap(channel) {
                    self.pool.put(mb_idx, channel.id);
                    return Err(e.into());
                }
                let Some((off, dst)) = channel.heap_alloc(len) else {
                    self.pool.put(mb_idx, channel.id);
                    return Err(Error::LimitExceeded(format!(
                        "request heap of {} bytes to this instance has no room for {len} more",
                        channel.heap_size()
                    ))
                    .into());
                };
                // SAFETY: `dst` is `len` bytes inside our heap, allocated to this call only.
                unsafe { std::ptr::copy_nonoverlapping(p.as_ptr(), dst, p.len()) };
                (false, Some((off, len)), false)
            }
        };
        let nonce = self.next_nonce();
        let mut sent = Sent {
            chan: std::borrow::Cow::Borrowed(channel),
            mailbox: mb_idx,
            gen,
            heap: heap_block,
            loaned,
            nonce,
            pos: 0,
        };
        // Armed after the claim: the claim's CAS (a locked instruction) would otherwise wait
        // for the call word's cache line, which the instance read last, to come back to
        // this core; stored after it, the line travels with the request's.
        let Some(mut claim) = claim_slot(&ring, deadline, watch) else {
            self.free_sent(&sent);
            return Err(Failed::NotDelivered(match watch {
                Some(w) if w.stalled() => {
                    self.note_stalled(seg, w.progress);
                    FULL_AND_STALLED
                }
                _ => RING_FULL,
            }));
        };
        sent.pos = claim.position();
        mailbox::arm(mb, gen, nonce);
        #[cfg(feature = "test-hooks")]
        crate::test_hooks::park_after_claim();
        claim.set_header(MsgHeader {
            client_index: self.client_ident().0,
            client_gen: self.client_ident().1,
            mailbox: mb_idx,
            mailbox_gen: gen,
            trace_id: trace,
            payload_len: payload.len() as u64,
            heap_off: heap_block.map_or(0, |(o, _)| o),
            method_len: method.len() as u16,
            hops: opts.hops,
            kind: if inline { PAYLOAD_INLINE } else { PAYLOAD_HEAP },
            trace_flags: opts.trace.map_or(0, |t| t.flags),
            _pad: [0; 3],
            nonce,
            secret: self.secret,
            sent_ns: breaker::mono_ns(sent_at),
            trace_hi: opts
                .trace
                .map_or(self.trace_hi, |t| (t.trace_id >> 64) as u64),
            // The call's random nonce doubles as its span id: no second hash per call, and
            // nothing the instance does not already see in this header.
            span_id: nonce | 1,
            deadline_ns: breaker::mono_ns(reply_by),
        });
        let data = claim.data();
        data[..method.len()].copy_from_slice(method.as_bytes());
        if inline {
            data[method.len()..method.len() + payload.len()].copy_from_slice(payload);
        }
        claim.publish();
        Doorbell(seg.ring_indices()).ring(Doorbell::bit(channel.id));
        // While the reply is on its way: the next request's slot, for writing.
        ring.prefetch_next_for_write(sent.pos, method.len() + payload.len());
        Ok(sent)
    }

    /// Waits for the reply to `sent` and copies it into `out`; on a deadline, a departure or
    /// a stall (`watch`), settles the mailbox: a request never taken is withdrawn
    /// (`NotDelivered`), one taken and unanswered is in doubt and its mailbox quarantined.
    #[allow(clippy::too_many_arguments)]
    fn wait_sent(
        &self,
        routed_with: &Session,
        seg: &InstanceSeg,
        sent: Sent,
        (spin, interrupt): (Option<Spin>, Option<&Interrupt>),
        deadline: Instant,
        mut watch: Option<StallWatch<'_>>,
        out: &mut Sink<'_>,
    ) -> Result<(), Failed> {
        let gen = sent.gen;
        let (mb, _) = sent.mb();
        let mut waiter = Waiter::new(
            spin.unwrap_or(self.opts.spin),
            CALLER_BACKOFF.get(),
            Seats::new(routed_with.shared.spin_seats()),
        );
        // Judged against the registry this call was routed with: a broker restart swapping
        // sessions mid-call is not the instance leaving.
        let alive = || Self::instance_alive(&routed_with.registry, seg.index, seg.incarnation);
        let orphaned = std::cell::Cell::new(false);
        let (outcome, why) = loop {
            let check = || {
                if !alive() {
                    return Target::Gone;
                }
                if self.orphaned(seg) {
                    orphaned.set(true);
                    return Target::Gone;
                }
                if interrupt.is_some_and(|i| (i.0)()) {
                    return Target::Interrupted;
                }
                let stalled =
                    mailbox::is_pending(mb, gen) && watch.as_mut().is_some_and(|w| w.check());
                if stalled {
                    Target::Stalled
                } else {
                    Target::Alive
                }
            };
            match mailbox::wait_ready(mb, gen, &mut waiter, deadline, check) {
                Wait::Ready => break (Cancel::Ready, Why::Deadline),
                Wait::TimedOut => break (mailbox::cancel(mb, gen), Why::Deadline),
                Wait::TargetGone => break (mailbox::cancel(mb, gen), Why::Gone),
                Wait::Interrupted => break (mailbox::cancel(mb, gen), Why::Interrupted),
                Wait::Stalled => match mailbox::cancel(mb, gen) {
                    // Taken at the last moment: it may run now, so wait for it after all.
                    Cancel::InProgress => watch = None,
                    c => break (c, Why::Stalled),
                },
            }
        };
        CALLER_BACKOFF.set(waiter.backoff);
        let why = if orphaned.get() && why == Why::Gone {
            Why::Orphaned
        } else {
            why
        };
        if why == Why::Stalled {
            if let Some(w) = &watch {
                self.note_stalled(seg, w.progress);
            }
        }
        self.settle(seg, &sent, outcome, why, out)
    }

    /// Without blocking: the result of `sent` if it is settled now (the reply is there, or
    /// `deadline` passed, or the instance left), else `None` (ask again later).
    pub(crate) fn poll_sent(
        &self,
        routed_with: &Session,
        seg: &InstanceSeg,
        sent: &Sent,
        deadline: Instant,
        out: &mut Sink<'_>,
    ) -> Option<Result<(), Failed>> {
        let (mb, _) = sent.mb();
        let (outcome, why) = if mailbox::is_ready(mb, sent.gen) {
            (Cancel::Ready, Why::Deadline)
        } else if Instant::now() >= deadline {
            (mailbox::cancel(mb, sent.gen), Why::Deadline)
        } else if !Self::instance_alive(&routed_with.registry, seg.index, seg.incarnation) {
            (mailbox::cancel(mb, sent.gen), Why::Gone)
        } else if self.orphaned(seg) {
            (mailbox::cancel(mb, sent.gen), Why::Orphaned)
        } else {
            return None;
        };
        Some(self.settle(seg, sent, outcome, why, out))
    }

    /// Ends a sent request's life after its wait: reads the reply, or frees (never taken)
    /// or quarantines (taken, unanswered) its mailbox, and says what happened.
    fn settle(
        &self,
        seg: &InstanceSeg,
        sent: &Sent,
        outcome: Cancel,
        why: Why,
        out: &mut Sink<'_>,
    ) -> Result<(), Failed> {
        let gen = sent.gen;
        let (mb, _) = sent.mb();
        let interrupted = || Failed::Error(Error::Interrupted);
        match outcome {
            Cancel::Ready => {
                sent.chan.note_freed(sent.pos);
                let r = match &mut out.out {
                    Some(buf) => self.read_reply(sent, seg, buf),
                    None => self.reply_in_place(sent, seg).map(|(ptr, len)| {
                        out.kept = Some(Kept {
                            sent: sent.to_static(),
                            ptr,
                            len,
                            seg: None,
                        })
                    }),
                };
                if out.kept.is_some() {
                    // The instance has answered: it is done with the request. The mailbox
                    // (and the reply heap block it names) stays ours until the guard drops.
                    self.free_request(sent);
                } else {
                    mailbox::release(mb, gen);
                    self.free_sent(sent);
                }
                r.map_err(Failed::Error)
            }
            Cancel::Cancelled => {
                mailbox::release(mb, gen);
                self.free_sent(sent);
                Err(Failed::NotDelivered(match why {
                    Why::Gone => "instance left before taking the request",
                    Why::Orphaned => CHANNEL_NOT_TAKEN_UP,
                    Why::Deadline => "not taken before the attempt deadline",
                    Why::Stalled => WITHDRAWN_STALLED,
                    Why::Interrupted => return Err(interrupted()),
                }))
            }
            Cancel::InProgress => {
                // The quarantine frees the request block when the late reply lands; a
                // loaned block is then the quarantine's, not the loan's.
                out.block_held |= sent.loaned;
                let pid = mailbox::taker_pid(mb);
                self.pool
                    .quarantine(&sent.chan, sent.mailbox, gen, sent.heap, pid);
                if why == Why::Interrupted {
                    return Err(interrupted());
                }
                Err(Failed::InDoubt(if why == Why::Gone {
                    "instance left while handling the request"
                } else {
                    "taken but not answered before the attempt deadline"
                }))
            }
        }
    }

    /// Where a ready reply to `sent` lies (inline in its mailbox, or a block of the
    /// instance's reply heap with its tag), its length and status; every length and
    /// offset is checked.
    fn locate_reply<'a>(&'a self, sent: &'a Sent, seg: &'a InstanceSeg) -> Result<ReplyAt<'a>> {
        let (Mb { ans: mb, .. }, inline_data) = sent.mb();
        let status = mb.status.load(Ordering::Relaxed);
        let len = mb.reply_len.load(Ordering::Relaxed);
        let bad =
            |what: String| Error::Protocol(format!("reply from instance #{}: {what}", seg.index));
        let (src, tag) = match mb.reply_kind.load(Ordering::Relaxed) as u8 {
            PAYLOAD_INLINE if len <= sent.chan.mailboxes.mailbox_inline as u64 => {
                (inline_data as *const u8, None)
            }
            PAYLOAD_INLINE => {
                return Err(bad(format!("inline length {len} over the mailbox size")))
            }
            PAYLOAD_CHANNEL_HEAP => {
                if sent.chan.reply_heap.get().is_none() {
                    self.open_reply_heap(&sent.chan)
                        .map_err(|e| bad(format!("its reply heap: {e}")))?;
                }
                let off = mb.heap_off.load(Ordering::Relaxed);
                let block = len
                    .checked_add(HEAP_TAG)
                    .filter(|_| off % HEAP_TAG == 0)
                    .and_then(|l| sent.chan.reply_heap_range(off, l))
                    .ok_or_else(|| bad(format!("reply heap range {off}+{len} outside the heap")))?;
                tagged(block)
            }
            k => return Err(bad(format!("unknown reply kind {k}"))),
        };
        Ok(ReplyAt {
            src,
            len: len as usize,
            tag,
            status,
            index: seg.index,
        })
    }

    /// Copies a ready reply to `sent` into `out`.
    fn read_reply(&self, sent: &Sent, seg: &InstanceSeg, out: &mut Vec<u8>) -> Result<()> {
        let nonce = sent.nonce;
        let at = self.locate_reply(sent, seg)?;
        out.clear();
        out.reserve(at.len);
        // SAFETY: `at.src` points to `at.len` readable bytes of a mapping we hold (bounds
        // checked by `locate_reply`); `out` has capacity `len` and is private memory.
        unsafe {
            std::ptr::copy_nonoverlapping(at.src, out.as_mut_ptr(), at.len);
            out.set_len(at.len);
        }
        if let Err(e) = at.check_tag(nonce) {
            out.clear();
            return Err(e);
        }
        if at.status != code::OK as u32 {
            let message = String::from_utf8_lossy(out).into_owned();
            out.clear();
            return Err(at.remote(message));
        }
        Ok(())
    }

    /// A ready reply to `sent`, where it lies (read in place by a [`BorrowedReply`]); an
    /// error answer is copied into the error.
    fn reply_in_place(&self, sent: &Sent, seg: &InstanceSeg) -> Result<(*const u8, usize)> {
        let at = self.locate_reply(sent, seg)?;
        at.check_tag(sent.nonce)?;
        if at.status != code::OK as u32 {
            // SAFETY: as in `read_reply`: `at.len` readable, bounds-checked bytes.
            let bytes = unsafe { std::slice::from_raw_parts(at.src, at.len) };
            return Err(at.remote(String::from_utf8_lossy(bytes).into_owned()));
        }
        Ok((at.src, at.len))
    }
}

/// How many numbers a thread takes from a shared counter at once ([`take_from_block`]).
const BLOCK: u64 = 1024;

thread_local! {
    /// This thread's block of nonces: the connection it is of (its nonce key), the next
    /// one, and the end of the block.
    static NONCE_BLOCK: std::cell::Cell<(u64, u64, u64)> = const { std::cell::Cell::new((0, 0, 0)) };
    /// This thread's block of trace counts (the key is unused: one counter per process).
    static TRACE_BLOCK: std::cell::Cell<(u64, u64, u64)> = const { std::cell::Cell::new((0, 0, 0)) };
}

/// The next number of `counter` (unique among all its takers, as a `fetch_add` of one
/// would give) from this thread's block of them, taking a new block of [`BLOCK`] when the
/// block is used up or belongs to another counter (`key` names it). One atomic RMW per
/// thousand calls instead of one per call: a locked instruction each, which also waits
/// for the core's pending stores, on the call's path.
fn take_from_block(
    block: &'static std::thread::LocalKey<std::cell::Cell<(u64, u64, u64)>>,
    key: u64,
    counter: &std::sync::atomic::AtomicU64,
) -> u64 {
    block.with(|b| {
        let (k, next, end) = b.get();
        if k == key && next < end {
            b.set((k, next + 1, end));
            return next;
        }
        // Relaxed: only uniqueness matters, which the RMW's single order gives.
        let start = counter.fetch_add(BLOCK, std::sync::atomic::Ordering::Relaxed);
        b.set((key, start + 1, start + BLOCK));
        start
    })
}

/// A heap reply's block (at least [`HEAP_TAG`] bytes, bounds-checked, 8-aligned, in a
/// mapping that outlives the reply's use): its tag and where its bytes start.
fn tagged<'a>(block: *mut u8) -> (*const u8, Option<&'a crate::shm::sync::AtomicU64>) {
    // SAFETY: `block` is at least HEAP_TAG bytes inside a mapping, 8-aligned (the heap
    // starts on a page and the offset is a multiple of 8); an AtomicU64 is valid for any
    // bits; the mapping (the instance segment's, or the channel's reply heap) lives as long
    // as the `Sent` or segment the caller borrows it through.
    let tag = unsafe { &*(block as *const crate::shm::sync::AtomicU64) };
    // SAFETY: `block + HEAP_TAG` is inside the same checked range.
    (
        unsafe { block.add(HEAP_TAG as usize) } as *const u8,
        Some(tag),
    )
}

/// A ready reply's place, found by [`BusInner::locate_reply`].
struct ReplyAt<'a> {
    src: *const u8,
    len: usize,
    /// A heap reply's tag: the nonce of the call it answers.
    tag: Option<&'a crate::shm::sync::AtomicU64>,
    status: u32,
    index: u32,
}

impl ReplyAt<'_> {
    /// Checks that a heap reply's block still answers our call (`nonce`), after its bytes
    /// were read (copied out) or before they are (read in place).
    fn check_tag(&self, nonce: u64) -> Result<()> {
        let Some(tag) = self.tag else { return Ok(()) };
        // SYNC POINT: this Acquire fence after the copy pairs with the Release fence an
        // instance puts between a heap block's new tag and its new bytes: if the copy saw
        // any byte of a later reply in a reused block, the tag below is that reply's, not
        // our call's. (Read in place, nothing was read yet: the block is not reused while
        // our mailbox is unreleased, for the instance's unread-reply expiry.)
        crate::shm::sync::fence(Ordering::Acquire);
        if tag.load(Ordering::Relaxed) != nonce {
            return Err(Error::Protocol(format!(
                "reply from instance #{}: heap reply overwritten before it was read (not this call's)",
                self.index
            )));
        }
        Ok(())
    }

    fn remote(&self, message: String) -> Error {
        Error::Remote {
            instance: String::new(),
            code: self.status as u16,
            message,
        }
    }
}

thread_local! {
    /// A calling thread's learned spin budget ([`crate::channel::wait::Backoff`]), kept across calls.
    static CALLER_BACKOFF: std::cell::Cell<Backoff> = std::cell::Cell::new(Backoff::default());
}

/// A call sent by [`Bus::submit`] whose reply has not been collected yet.
#[must_use = "dropping a Pending cancels its call"]
pub struct Pending<'b> {
    inner: &'b std::sync::Arc<BusInner>,
    sess: &'b Session,
    seg: std::sync::Arc<InstanceSeg>,
    target: CallInfo,
    /// `None` once waited for.
    sent: Option<Sent<'static>>,
    spin: Option<Spin>,
    interrupt: Option<Interrupt>,
    deadline: Instant,
    start: Instant,
    /// The call's trace id (its error names it).
    trace: u64,
    /// The request's loan ([`Bus::submit_loan`]): the instance reads it in place, so it is
    /// kept until the call settles.
    loan: Option<Loan>,
}

impl Pending<'_> {
    /// Keeps the request's loan until the call settles ([`Bus::submit_loan`]).
    pub(crate) fn keep_loan(&mut self, loan: Loan) {
        self.loan = Some(loan);
    }

    /// The call has settled: its loan (if any) is done with, and its block goes back to
    /// the heap unless a quarantined mailbox took it (`held`).
    fn settled(&mut self, held: bool) {
        if let Some(mut loan) = self.loan.take() {
            if held {
                loan.disown();
            }
        }
    }

    /// The instance the call went to.
    pub fn instance(&self) -> CallInfo {
        self.target
    }

    /// The connection this call was made on.
    #[cfg_attr(not(feature = "async"), allow(dead_code))]
    pub(crate) fn bus_inner(&self) -> &BusInner {
        self.inner
    }

    /// The connection this call was made on, shared.
    #[cfg_attr(not(feature = "async"), allow(dead_code))]
    pub(crate) fn bus_arc(&self) -> &std::sync::Arc<BusInner> {
        self.inner
    }

    /// This call's mailbox, generation and the channel the mailbox lies in; `None` once
    /// settled.
    #[cfg_attr(not(feature = "async"), allow(dead_code))]
    pub(crate) fn mailbox(&self) -> Option<(u32, u32, Arc<ChannelSeg>)> {
        self.sent
            .as_ref()
            .map(|s| (s.mailbox, s.gen, Arc::clone(&s.chan)))
    }

    /// Without blocking: the call's result if it is settled (replied, past its deadline, or
    /// its instance gone), else `None`.
    pub(crate) fn poll_now(&mut self, out: &mut Vec<u8>) -> Option<Result<CallInfo>> {
        let inner = self.inner;
        let mut sink = Sink::copy(out);
        let r = inner.poll_sent(
            self.sess,
            &self.seg,
            self.sent.as_ref()?,
            self.deadline,
            &mut sink,
        )?;
        self.sent = None;
        self.settled(sink.block_held);
        Some(match r {
            Ok(()) => {
                inner.note_success(self.target);
                Ok(self.target)
            }
            Err(f) => {
                Err(inner.one_attempt_error(self.sess, self.target, f, (self.start, self.trace)))
            }
        })
    }

    /// Without waiting: the call's result once it is settled — the reply arrived, or the
    /// call's deadline passed, or its instance left — else `None` (ask again later, e.g.
    /// when an event fd fires). After `Some`, the call is spent.
    pub fn try_wait(&mut self, out: &mut Vec<u8>) -> Option<Result<CallInfo>> {
        if self.sent.is_none() {
            return Some(Err(Error::BadRequest(
                "this call's result was already collected".into(),
            )));
        }
        self.poll_now(out)
    }

    /// Whether the reply has arrived ([`Pending::wait`] then returns without waiting).
    pub fn is_ready(&self) -> bool {
        self.sent
            .as_ref()
            .is_some_and(|s| mailbox::is_ready(s.mb().0, s.gen))
    }

    /// Waits for the reply (until the call's attempt deadline) and writes it into `out`.
    pub fn wait(mut self, out: &mut Vec<u8>) -> Result<CallInfo> {
        self.wait_with(&mut Sink::copy(out))
    }

    /// Waits for the reply (until the call's attempt deadline) and returns it read in
    /// place ([`BorrowedReply`]), not copied: with [`Bus::submit_loan`], a pipelined call
    /// that copies neither way.
    pub fn wait_borrowed(mut self) -> Result<BorrowedReply> {
        let mut sink = Sink::keep();
        let r = self.wait_with(&mut sink);
        loan::borrowed(self.inner, r, sink)
    }

    fn wait_with(&mut self, sink: &mut Sink<'_>) -> Result<CallInfo> {
        let Some(sent) = self.sent.take() else {
            return Err(Error::BadRequest(
                "this call's result was already collected".into(),
            ));
        };
        let inner = self.inner;
        let r = inner.wait_sent(
            self.sess,
            &self.seg,
            sent,
            (self.spin, self.interrupt.as_ref()),
            self.deadline,
            None,
            sink,
        );
        if let Some(k) = &mut sink.kept {
            // A reply read in place keeps its instance's reply heap mapped.
            k.seg = Some(self.seg.clone());
        }
        self.settled(sink.block_held);
        match r {
            Ok(()) => {
                inner.note_success(self.target);
                Ok(self.target)
            }
            Err(f) => {
                Err(inner.one_attempt_error(self.sess, self.target, f, (self.start, self.trace)))
            }
        }
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.sent.take() {
            let held = self.inner.abandon(s);
            self.settled(held);
        }
    }
}

/// A request in an instance's ring whose reply is awaited in this connection's mailbox
/// `mailbox`, generation `gen`, whose place is in `chan`, the channel it went through;
/// `heap` is its request heap block, if it needed one.
///
/// A blocking call borrows its channel from the instance's segment it holds for the call
/// (no reference count moved per call: two locked instructions on the round trip's path);
/// a submitted call or a reply read in place keeps its own ([`Sent::to_static`]).
#[derive(Clone)]
pub(crate) struct Sent<'c> {
    pub(crate) chan: std::borrow::Cow<'c, Arc<ChannelSeg>>,
    pub(crate) mailbox: u32,
    pub(crate) gen: u32,
    heap: Option<(u64, u64)>,
    /// `heap` is a [`Loan`]'s block: freed by the loan (or a quarantine), not per attempt.
    loaned: bool,
    /// The call's nonce: its mailbox's, and the tag of a heap reply to it.
    nonce: u64,
    /// The ring position the request was published at.
    pos: u64,
}

impl Sent<'_> {
    /// The same, holding its own reference to the channel.
    pub(crate) fn to_static(&self) -> Sent<'static> {
        Sent {
            chan: std::borrow::Cow::Owned(Arc::clone(&self.chan)),
            ..*self
        }
    }

    /// This call's mailbox header and inline reply area, in its channel.
    pub(crate) fn mb(&self) -> (Mb<'_>, *mut u8) {
        self.chan
            .mailbox(self.mailbox)
            .expect("the pool hands out indices below every channel's mailbox count")
    }
}

/// Why a caller stopped waiting for its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    Deadline,
    Gone,
    Stalled,
    /// [`CallOptions::interrupt`] said to stop waiting.
    Interrupted,
    /// The channel was orphaned (see `BusInner::orphaned`).
    Orphaned,
}

/// Watches an instance's progress word while a request of ours waits for it: the instance
/// is stalled when the word has not moved for `bound`.
struct StallWatch<'a> {
    word: &'a crate::shm::sync::AtomicU64,
    bound: Duration,
    /// The progress word at the first look, and when it last moved. Nothing is read when
    /// the watch is made: a call answered within its spin never looks (the word is the
    /// instance's, written on every turn of its serving loop, so reading it on every call
    /// moved its cache line to the caller's core and back, on the round trip's path).
    progress: u64,
    since: Option<Instant>,
    /// Whether another instance could take the request (else a stall is waited out).
    elsewhere: &'a dyn Fn() -> bool,
    stalled: bool,
}

impl<'a> StallWatch<'a> {
    fn new(seg: &'a InstanceSeg, bound: Duration, elsewhere: &'a dyn Fn() -> bool) -> Self {
        StallWatch {
            word: &seg.counters().progress,
            bound,
            progress: 0,
            since: None,
            elsewhere,
            stalled: false,
        }
    }

    /// Looks at the word; true once it has stood still for the bound since the first look
    /// (made when the request outlasts the caller's spin, or finds the ring full) and
    /// another instance could take the request.
    fn check(&mut self) -> bool {
        // Relaxed: a hint for routing; no data is read through it.
        let p = self.word.load(Ordering::Relaxed);
        let since = match self.since {
            Some(t) if p == self.progress => t,
            _ => {
                (self.progress, self.since) = (p, Some(Instant::now()));
                return false;
            }
        };
        self.stalled = since.elapsed() >= self.bound && (self.elsewhere)();
        self.stalled
    }

    fn stalled(&self) -> bool {
        self.stalled
    }
}

/// Claims a ring slot, waiting (spin, yield, then short sleeps) while the ring is full.
/// A full ring means the instance is behind; there is no futex for "space", so this is
/// the one bounded poll in the call path. Gives up at `deadline`, or when `stall` sees the
/// instance make no progress for its bound.
fn claim_slot<'a>(
    ring: &RingRef<'a>,
    deadline: Instant,
    stall: &mut Option<StallWatch<'_>>,
) -> Option<crate::channel::ring::Claim<'a>> {
    let mut tries = 0u32;
    loop {
        if let Ok(c) = ring.try_claim() {
            return Some(c);
        }
        if Instant::now() >= deadline || stall.as_mut().is_some_and(|w| w.check()) {
            return None;
        }
        tries += 1;
        match tries {
            0..=63 => std::hint::spin_loop(),
            64..=127 => std::thread::yield_now(),
            _ => std::thread::sleep(Duration::from_micros(50)),
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// `CallOptions::timeout` is one budget for the call and for each attempt; the rest
    /// stays the default.
    #[test]
    fn a_timeout_is_the_call_s_budget_and_each_attempt_s() {
        let d = Duration::from_millis(1234);
        let o = CallOptions::timeout(d);
        assert_eq!((o.timeout, o.attempt_timeout), (d, d));
        let dflt = CallOptions::default();
        assert_ne!(dflt.timeout, d);
        assert_eq!(o.max_attempts, dflt.max_attempts);
    }

    fn ctx(hops: u8, deadline: Option<Instant>) -> CallContext {
        CallContext {
            hops,
            trace: TraceContext {
                trace_id: 0x1234_5678_9abc_def0_1122_3344_5566_7788,
                span_id: 0x99,
                flags: 1,
            },
            deadline,
        }
    }

    /// A call made while handling a request takes one more hop, the request's trace and
    /// the earlier of the two deadlines; the hop count saturates.
    #[test]
    fn a_nested_call_takes_a_hop_the_trace_and_the_earlier_deadline() {
        let now = Instant::now();
        let (early, late) = (now + Duration::from_secs(1), now + Duration::from_secs(9));
        let o = CallOptions::default().within(&ctx(3, Some(late)));
        assert_eq!(o.hops, 4);
        assert_eq!(o.trace, Some(ctx(3, None).trace));
        assert_eq!(o.trace_id, Some(0x1122_3344_5566_7788));
        assert_eq!(o.deadline, Some(late));
        let mine = CallOptions {
            deadline: Some(early),
            ..Default::default()
        };
        assert_eq!(
            mine.clone().within(&ctx(0, Some(late))).deadline,
            Some(early)
        );
        assert_eq!(mine.within(&ctx(0, None)).deadline, Some(early));
        let none = CallOptions::default().within(&ctx(0, None));
        assert_eq!(none.deadline, None);
        let early_ctx = CallOptions {
            deadline: Some(late),
            ..Default::default()
        };
        assert_eq!(early_ctx.within(&ctx(0, Some(early))).deadline, Some(early));
        assert_eq!(CallOptions::default().within(&ctx(255, None)).hops, 255);
    }

    /// The whole call ends at `start + timeout`, or at an earlier deadline.
    #[test]
    fn a_call_ends_at_its_timeout_or_an_earlier_deadline() {
        let start = Instant::now();
        let o = CallOptions::timeout(Duration::from_secs(2));
        assert_eq!(o.call_deadline(start), start + Duration::from_secs(2));
        let earlier = CallOptions {
            deadline: Some(start + Duration::from_millis(500)),
            ..o.clone()
        };
        assert_eq!(
            earlier.call_deadline(start),
            start + Duration::from_millis(500)
        );
        let later = CallOptions {
            deadline: Some(start + Duration::from_secs(60)),
            ..o
        };
        assert_eq!(later.call_deadline(start), start + Duration::from_secs(2));
    }

    /// Only attempts that may have reached a handler count against `max_attempts`.
    #[test]
    fn only_attempts_that_reached_an_instance_count() {
        for why in [
            INSTANCE_LEFT_BEFORE_SEND,
            WITHDRAWN_STALLED,
            FULL_AND_STALLED,
            CHANNEL_NOT_TAKEN_UP,
        ] {
            assert!(!counts_as_attempt(why), "{why}");
        }
        for why in [
            RING_FULL,
            "deadline passed while the instance ran the request",
        ] {
            assert!(counts_as_attempt(why), "{why}");
        }
    }

    /// Hops over the limit are `LoopDetected` naming both; at the limit the call goes;
    /// a zero stall bound is refused naming the option.
    #[test]
    fn options_no_call_can_honour_are_refused() {
        let at = CallOptions {
            hops: 8,
            max_hops: 8,
            ..Default::default()
        };
        assert!(check_options(&at).is_ok());
        let over = CallOptions { hops: 9, ..at };
        match check_options(&over) {
            Err(Error::LoopDetected { hops: 9, limit: 8 }) => {}
            other => panic!("{other:?}"),
        }
        let zero = CallOptions {
            stall_bound: Duration::ZERO,
            ..Default::default()
        };
        match check_options(&zero) {
            Err(Error::BadRequest(m)) => assert!(m.contains("stall_bound"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    /// A payload of exactly the service's largest message goes; one byte more is
    /// `MessageTooLarge` naming the service, the size and the limit.
    #[test]
    fn a_payload_over_the_largest_message_is_refused_naming_it() {
        assert!(check_size("svc", 100, 100).is_ok());
        match check_size("svc", 101, 100) {
            Err(Error::MessageTooLarge {
                service,
                size: 101,
                max: 100,
            }) => {
                assert_eq!(service, "svc")
            }
            other => panic!("{other:?}"),
        }
    }

    /// One successful call in `ROUTE_LOG_SAMPLE` per thread is logged: the first, then
    /// every 1,024th.
    #[test]
    fn one_routed_call_in_1024_per_thread_is_logged() {
        std::thread::spawn(|| {
            let logged: Vec<u32> = (0..3 * ROUTE_LOG_SAMPLE)
                .filter(|_| route_log_sampled())
                .collect();
            assert_eq!(logged, [0, ROUTE_LOG_SAMPLE, 2 * ROUTE_LOG_SAMPLE]);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn an_interrupt_check_shows_as_such() {
        let i = Interrupt(std::sync::Arc::new(|| false));
        assert_eq!(format!("{i:?}"), "Interrupt(..)");
    }
}
