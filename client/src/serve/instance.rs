//! `Instance`: this process serving a service — taking requests out of its callers'
//! channels and replying into the callers' mailboxes.
//!
//! Serving threads each own a [`Receiver`] (its reusable buffers and its sweep over the
//! channels, see [`crate::serve::sweep`]); any number of them may serve the same instance.
//! `serve` is the handler-style loop over a receiver; `recv`/`reply` is the pull style.

use std::borrow::Cow;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{de::DeserializeOwned, Serialize};

use crate::channel::mailbox;
use crate::channel::ring::{Doorbell, Taken, KIND_ABORTED};
use crate::channel::wait::{Backoff, Seats, Spin, Waiter};
use crate::error::{code, Error, Result, ServiceError};
use crate::names;
use crate::serve::sweep::{Chan, Channels, Sweep, REPLY_HEAP_RETRY};
use crate::session::bus::{Bus, Registration};
use crate::session::control::expect_fds;
use crate::session::proto::{
    BulkOptions, BulkReport, Heartbeat, Request as Ctl, ResourceSpec, Response, ServiceConfig,
};
use crate::shm::layout::{
    InstanceSeg, Mb, MsgHeader, MAX_METHOD, PAYLOAD_CHANNEL_HEAP, PAYLOAD_HEAP, PAYLOAD_INLINE,
};
use crate::shm::sync::Ordering;
use crate::trace::TraceContext;
use crate::CallContext;

/// How an instance registers and serves.
#[derive(Debug, Clone)]
pub struct RegisterOptions {
    pub metadata: Vec<(String, String)>,
    /// Ring/slot sizing; the first instance of a service sets it.
    pub config: ServiceConfig,
    /// How an idle serving thread spends the time before it sleeps on the ring's futex.
    pub spin: Spin,
    pub heartbeat: Heartbeat,
}

impl Default for RegisterOptions {
    fn default() -> Self {
        RegisterOptions {
            metadata: Vec::new(),
            config: ServiceConfig::default(),
            spin: Spin::Adaptive,
            heartbeat: Heartbeat::default(),
        }
    }
}

/// A registered instance. Dropping it (or [`Instance::unregister`]) takes it out of routing.
pub struct Instance {
    inner: Arc<InstanceInner>,
}

pub(crate) struct InstanceInner {
    bus: Bus,
    service: String,
    id: String,
    seg: InstanceSeg,
    /// The ring and own segments' memfds, handed to a restarted broker to adopt them.
    seg_fd: (OwnedFd, OwnedFd),
    /// Registry index and incarnation as the current broker knows them (a restarted broker
    /// may assign new ones).
    index: AtomicU32,
    incarnation: AtomicU64,
    /// What registration carried, to register again after a broker restart.
    reg: RegisterOptions,
    /// Replies sent through a channel's reply heap, freed once their caller has read them.
    pending: Mutex<Vec<PendingReply>>,
    max_message: u64,
    spin: Mutex<Spin>,
    heartbeat: Heartbeat,
    stopping: AtomicBool,
    unregistered: AtomicBool,
    /// Its callers' channels (from the broker, `Request::Channels`).
    channels: Channels,
}

struct PendingReply {
    chan: Arc<Chan>,
    mailbox: u32,
    gen: u32,
    /// The block in `chan`'s reply heap.
    block: Block,
}

/// A block of reply memory: `len` bytes at `off` of a channel's reply heap.
#[derive(Clone, Copy)]
struct Block {
    off: u64,
    len: u64,
}

/// Instances this process holds a live handle of: (bus directory, service, instance id).
static LIVE: Mutex<Vec<(std::path::PathBuf, String, String)>> = Mutex::new(Vec::new());

/// How long a large reply waits at most for its channel's reply heap while the broker is
/// away or the channel's caller has yet to claim it after a restart (as long as callers
/// route on a previous broker's view); less when the call's deadline comes first.
const REPLY_HEAP_WAIT: Duration = crate::session::bus::RESTART_BRIDGE;

/// Stops `serve`/`recv` loops from another thread (or a signal-handling thread).
#[derive(Clone)]
pub struct StopHandle {
    inner: Weak<InstanceInner>,
}

impl StopHandle {
    pub fn stop(&self) {
        if let Some(i) = self.inner.upgrade() {
            i.stopping.store(true, Ordering::Release);
            i.doorbell().wake_all();
        }
    }
}

impl Instance {
    pub(crate) fn new(
        bus: Bus,
        service: &str,
        id: &str,
        seg: InstanceSeg,
        seg_fd: (OwnedFd, OwnedFd),
        max_message: u64,
        opts: RegisterOptions,
    ) -> Instance {
        let inner = Arc::new(InstanceInner {
            bus: bus.clone(),
            service: service.to_owned(),
            id: id.to_owned(),
            index: AtomicU32::new(seg.index),
            incarnation: AtomicU64::new(seg.incarnation),
            seg,
            seg_fd,
            reg: opts.clone(),
            pending: Mutex::new(Vec::new()),
            max_message,
            spin: Mutex::new(opts.spin),
            heartbeat: opts.heartbeat,
            stopping: AtomicBool::new(false),
            unregistered: AtomicBool::new(false),
            channels: Channels::default(),
        });
        let reg: Weak<dyn Registration> = Arc::downgrade(&inner) as Weak<InstanceInner>;
        bus.inner.registered.lock().push(reg);
        Instance { inner }
    }

    pub fn service(&self) -> &str {
        &self.inner.service
    }
    pub fn id(&self) -> &str {
        &self.inner.id
    }
    /// Registry index (what [`crate::CallInfo::instance`] reports).
    pub fn index(&self) -> u32 {
        self.inner.ident().0
    }
    /// Requests this instance has answered.
    pub fn requests_served(&self) -> u64 {
        self.inner
            .seg
            .counters()
            .requests_served
            .load(Ordering::Relaxed)
    }
    /// Requests waiting in its callers' channels.
    pub fn queued(&self) -> u64 {
        self.inner.channels.queued()
    }
    /// Changes how idle serving threads wait before they sleep.
    pub fn set_spin(&self, spin: Spin) {
        *self.inner.spin.lock() = spin;
    }

    /// Whether [`StopHandle::stop`] was called: serving loops return, receivers say `None`.
    pub fn is_stopped(&self) -> bool {
        self.inner.stopping.load(Ordering::Acquire)
    }

    pub fn stop_handle(&self) -> StopHandle {
        StopHandle {
            inner: Arc::downgrade(&self.inner),
        }
    }

    /// A receiver for one serving thread.
    pub fn receiver(&self) -> Receiver<'_> {
        Receiver {
            inst: &self.inner,
            method: String::with_capacity(MAX_METHOD),
            payload: Vec::with_capacity(self.inner.seg.layout.slot_size as usize),
            waiter: Waiter::new(*self.inner.spin.lock(), Backoff::server(), Seats::none()),
            sweep: Sweep::default(),
            seen_word: None,
            next_moved_on_check: Instant::now(),
        }
    }

    /// Serves requests on this thread until [`StopHandle::stop`]. The handler writes its
    /// reply into the buffer it is given (reused between requests) or returns an error.
    pub fn serve<F>(&self, mut handler: F) -> Result<()>
    where
        F: FnMut(&Request<'_>, &mut Vec<u8>) -> std::result::Result<(), ServiceError>,
    {
        let mut rx = self.receiver();
        let mut out = Vec::with_capacity(self.inner.seg.layout.slot_size as usize);
        loop {
            let Some(req) = rx.recv(None)? else {
                return Ok(());
            };
            out.clear();
            let traceparent = req.trace_context();
            match handler(&req, &mut out) {
                // A reply over the maximum reached its caller as error 413; serving goes on.
                Ok(()) => {
                    if let Err(e) = req.reply(&out) {
                        tracing::warn!(service = %self.inner.service, instance = %self.inner.id,
                            %traceparent, "{e}");
                    }
                }
                Err(e) => {
                    tracing::debug!(service = %self.inner.service, instance = %self.inner.id,
                        %traceparent, code = e.code, "handler answered an error: {}", e.message);
                    req.reply_error(e.code, &e.message)?
                }
            }
        }
    }

    /// Claims resource ids for this instance, all or none: on any failure nothing is
    /// claimed and the first failure is returned (`ResourceConflict` names the owner).
    pub fn claim(&self, ids: &[&str]) -> Result<()> {
        let specs = ids.iter().map(|id| ResourceSpec::new(*id)).collect();
        first_failure(self.claim_with(specs, BulkOptions::default())?)
    }

    /// Claims resources with metadata, in batches, all-or-nothing or continue-on-error.
    pub fn claim_with(
        &self,
        resources: Vec<ResourceSpec>,
        options: BulkOptions,
    ) -> Result<BulkReport> {
        for r in &resources {
            crate::names::resource_id(&r.id)?;
        }
        self.inner.bus.inner.bulk(Ctl::ClaimResources {
            instance: self.inner.ident().0,
            incarnation: self.inner.ident().1,
            resources,
            options,
        })
    }

    /// Releases ids this instance owns, all or none (`NotOwner` names the real owner).
    pub fn release(&self, ids: &[&str]) -> Result<()> {
        first_failure(self.release_with(ids, BulkOptions::default())?)
    }

    pub fn release_with(&self, ids: &[&str], options: BulkOptions) -> Result<BulkReport> {
        self.inner
            .bus
            .inner
            .release(Some(self.inner.ident()), ids, options)
    }

    /// Moves ids this instance owns to instance `to_instance` of `to_service`, atomically:
    /// every call for them goes to this instance before and to the target after.
    pub fn transfer(
        &self,
        ids: &[&str],
        to_service: &str,
        to_instance: &str,
        reason: &str,
    ) -> Result<()> {
        let from = Some(self.inner.ident());
        self.inner
            .bus
            .inner
            .transfer(ids, from, to_service, to_instance, reason)
    }

    /// Takes the instance out of routing now (dropping it does the same, ignoring errors).
    pub fn unregister(self) -> Result<()> {
        self.inner.unregister()
    }
}

impl Bus {
    /// Registers this process as instance `instance_id` of `service`.
    pub fn register(
        &self,
        service: &str,
        instance_id: &str,
        metadata: &[(&str, &str)],
    ) -> Result<Instance> {
        let opts = RegisterOptions {
            metadata: metadata
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        self.register_with(service, instance_id, opts)
    }

    pub fn register_with(
        &self,
        service: &str,
        instance_id: &str,
        opts: RegisterOptions,
    ) -> Result<Instance> {
        names::service(service)?;
        names::instance_id(instance_id)?;
        // The broker takes a second registration by the same process as the same one (a
        // reconnect); two live handles would then unregister each other. Refused here.
        let key = (
            self.inner.dir.clone(),
            service.to_owned(),
            instance_id.to_owned(),
        );
        let mut live = LIVE.lock();
        if live.contains(&key) {
            return Err(Error::Conflict {
                service: service.into(),
                instance_id: instance_id.into(),
                holder_pid: std::process::id(),
            });
        }
        // Our own memory (counters, progress, reply heap): mapped writable here, sealed
        // before it leaves, so callers and the broker can only read it. Its reply heap is
        // sized for the service's maximum message, as far as we can tell it beforehand (the
        // broker refuses a mismatch, naming the size).
        let session = self.inner.session();
        let max_message = opts
            .config
            .max_message
            .or_else(|| {
                let (_, e) = session.find_service(service)?;
                Some(e.max_message.load(Ordering::Relaxed)).filter(|&m| m > 0)
            })
            .unwrap_or(session.max_message);
        let (own_fd, own) = InstanceSeg::create_own(session.epoch, 2 * max_message)?;
        let (resp, fds) = self.inner.control.lock().request_with_fds(
            &Ctl::Register {
                service: service.into(),
                instance_id: instance_id.into(),
                metadata: opts.metadata.clone(),
                config: opts.config.clone(),
                heartbeat: opts.heartbeat,
                resume: None,
            },
            &[own_fd.as_fd()],
        )?;
        let Response::Registered {
            instance,
            incarnation,
            max_message,
            ..
        } = resp
        else {
            return Err(Error::Protocol(format!(
                "expected Registered, got {resp:?}"
            )));
        };
        let mut fds = expect_fds(fds, 1, "Registered")?;
        let seg = InstanceSeg::open(&fds[0], own, session.epoch, instance, incarnation)?;
        let seg_fd = (fds.pop().expect("one descriptor"), own_fd);
        #[cfg(feature = "test-hooks")]
        crate::test_hooks::fork_control_holder();
        live.push(key);
        Ok(Instance::new(
            self.clone(),
            service,
            instance_id,
            seg,
            seg_fd,
            max_message,
            opts,
        ))
    }
}

impl Registration for InstanceInner {
    fn ident(&self) -> (u32, u64) {
        InstanceInner::ident(self)
    }
    fn resume(&self, owned: Vec<String>) -> Result<()> {
        InstanceInner::resume(self, owned)
    }
    fn channels(&self) -> &Channels {
        &self.channels
    }
    fn doorbell(&self) -> Doorbell<'_> {
        InstanceInner::doorbell(self)
    }
}

impl InstanceInner {
    pub(crate) fn ident(&self) -> (u32, u64) {
        (
            self.index.load(Ordering::Acquire),
            self.incarnation.load(Ordering::Acquire),
        )
    }

    /// Registers again with a restarted broker, handing it this instance's segment so it
    /// adopts the same ring, then claims again the resources `owned` (as the last registry
    /// of the old broker showed them).
    pub(crate) fn resume(&self, owned: Vec<String>) -> Result<()> {
        if self.unregistered.load(Ordering::Acquire) {
            return Ok(());
        }
        let req = Ctl::Register {
            service: self.service.clone(),
            instance_id: self.id.clone(),
            metadata: self.reg.metadata.clone(),
            // The sizing of the ring handed over for adoption: the broker takes it from here
            // (and the own segment), not from the ring's header, which callers can write.
            config: ServiceConfig {
                slot_size: Some(self.seg.layout.slot_size),
                slot_count: Some(self.seg.layout.slot_count),
                max_message: Some(self.seg.layout.heap_size / 2),
            },
            heartbeat: self.reg.heartbeat,
            resume: Some(self.ident()),
        };
        let (resp, _fds) = self
            .bus
            .inner
            .control()
            .request_with_fds(&req, &[self.seg_fd.0.as_fd(), self.seg_fd.1.as_fd()])?;
        let Response::Registered {
            instance,
            incarnation,
            ..
        } = resp
        else {
            return Err(Error::Protocol(format!(
                "expected Registered, got {resp:?}"
            )));
        };
        self.index.store(instance, Ordering::Release);
        self.incarnation.store(incarnation, Ordering::Release);
        if !owned.is_empty() {
            let r = self.bus.inner.bulk(Ctl::ClaimResources {
                instance,
                incarnation,
                resources: owned.into_iter().map(ResourceSpec::new).collect(),
                options: BulkOptions {
                    mode: crate::session::proto::BulkMode::ContinueOnError,
                    ..Default::default()
                },
            })?;
            if r.failed > 0 {
                tracing::warn!(instance = %self.id, failed = r.failed, "resources not reclaimed after a broker restart");
            }
        }
        tracing::info!(service = %self.service, instance = %self.id, index = instance, "registered again after a broker restart");
        Ok(())
    }

    fn doorbell(&self) -> Doorbell<'_> {
        Doorbell(self.seg.ring_indices())
    }

    fn unregister(&self) -> Result<()> {
        if self.unregistered.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        LIVE.lock()
            .retain(|(d, s, i)| (d, s, i) != (&self.bus.inner.dir, &self.service, &self.id));
        let r = self.bus.inner.control().request(&Ctl::Unregister {
            instance: self.ident().0,
            incarnation: self.ident().1,
        });
        match r {
            Ok((Response::Done, _)) => Ok(()),
            Ok((other, _)) => Err(Error::Protocol(format!("expected Done, got {other:?}"))),
            Err(e) => Err(e),
        }
    }

    /// Validates a slot taken from `chan` and, if it is a live request, claims its mailbox
    /// (in the segment of the caller the channel belongs to, whatever the header says) and
    /// copies method and payload out. `None`: nothing to deliver (aborted, or cancelled);
    /// `Err`: invalid, to be answered with the error once the slot is freed.
    fn accept(
        &self,
        t: &Taken<'_>,
        chan: &Arc<Chan>,
        method: &mut String,
        payload: &mut Vec<u8>,
    ) -> Option<std::result::Result<Delivery, Rejected>> {
        let h = t.header();
        if h.kind == KIND_ABORTED {
            return None;
        }
        let (mb, _) = chan.seg.mailbox(h.mailbox).or_else(|| {
            tracing::warn!(service = %self.service, trace_id = h.trace_id, "dropping request naming mailbox {} out of range", h.mailbox);
            None
        })?;
        if !mailbox::take(mb, h.mailbox_gen, h.nonce) {
            // Cancelled by its caller (deadline passed) before we got to it, or a header
            // that is not the armed call's (forged, stale): do not run it.
            return None;
        }
        let mut d = Delivery {
            chan: chan.clone(),
            mailbox: h.mailbox,
            gen: h.mailbox_gen,
            nonce: h.nonce,
            trace_id: h.trace_id,
            hops: h.hops,
            sent_ns: h.sent_ns,
            trace_hi: h.trace_hi,
            span_id: h.span_id,
            trace_flags: h.trace_flags,
            deadline_ns: h.deadline_ns,
            heap_payload: None,
        };
        let malformed_payload = || {
            let msg = format!(
                "malformed request payload (kind {}, {} bytes)",
                h.kind, h.payload_len
            );
            Cow::Owned(msg.into_bytes())
        };
        let shape = match request_shape(&h, t.data_len(), self.max_message) {
            Ok(s) => s,
            Err(BadShape::Method) => {
                return Some(Err((d, Cow::Borrowed(b"malformed method name"))));
            }
            Err(BadShape::Payload) => return Some(Err((d, malformed_payload()))),
        };
        let mlen = shape.method_len;
        let mut mbuf = [0u8; MAX_METHOD];
        let name = t
            .read_into(0, &mut mbuf[..mlen])
            .and_then(|()| std::str::from_utf8(&mbuf[..mlen]).ok());
        let Some(name) = name else {
            return Some(Err((d, Cow::Borrowed(b"malformed method name"))));
        };
        method.clear();
        method.push_str(name);
        let ok = match shape.payload {
            PayloadAt::Inline { off, len } => t.copy_data(off, len, payload).is_some(),
            // Read in place (`Request::payload`): no copy of a large request.
            PayloadAt::Heap { off, len } => {
                if d.chan.seg.heap.get().is_none() {
                    // The channel's first large request: its heap may have been handed to
                    // the broker after our last look (a round trip, once per channel).
                    if let Err(e) = self.fetch_request_heap(&d) {
                        tracing::warn!(service = %self.service, trace_id = d.trace_id, "{e}");
                    }
                }
                let inside = d.chan.seg.heap_range(off, len).is_some();
                if inside {
                    d.heap_payload = Some((off, len));
                }
                inside
            }
        };
        if !ok {
            return Some(Err((d, malformed_payload())));
        }
        Some(Ok(d))
    }

    /// Writes a reply (or error message, when `status != 0`) into the caller's mailbox and
    /// wakes the caller.
    fn send_reply(&self, d: Delivery, status: u32, data: &[u8]) {
        let (mb, inline) = d.chan.seg.mailbox(d.mailbox).expect("validated in accept");
        if !mailbox::still_taken(mb, d.gen, d.nonce) {
            // The caller gave up on this call and (its taker presumed dead) recycled the
            // mailbox: write nothing into it.
            tracing::debug!(service = %self.service, trace_id = d.trace_id, "reply dropped: mailbox no longer ours");
            return;
        }
        let cap = d.chan.seg.mailboxes.mailbox_inline as usize;
        let too_large;
        let refused;
        let (mut status, mut data) = (status, data);
        if data.len() as u64 > self.max_message {
            too_large = format!(
                "reply of {} bytes is over the {}-byte maximum of service '{}'",
                data.len(),
                self.max_message,
                self.service
            );
            (status, data) = (code::MESSAGE_TOO_LARGE as u32, too_large.as_bytes());
        }
        if status != 0 {
            data = &data[..data.len().min(cap)];
        }
        let (kind, off) = if data.len() <= cap {
            // SAFETY: `inline` is `cap` bytes of the mailbox; we own it while it is TAKEN.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), inline, data.len()) };
            (PAYLOAD_INLINE, 0)
        } else {
            match self.reply_block(&d, data.len()) {
                Ok((block, dst)) => {
                    // SAFETY: `dst` is `data.len()` bytes of the block allocated to this reply.
                    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
                    self.hold_until_read(&d, block);
                    (PAYLOAD_CHANNEL_HEAP, block.off)
                }
                Err(why) => {
                    refused = why;
                    let msg = refused.as_bytes();
                    // SAFETY: as above; at most `cap` bytes of the message.
                    unsafe {
                        std::ptr::copy_nonoverlapping(msg.as_ptr(), inline, msg.len().min(cap))
                    };
                    status = code::LIMIT_EXCEEDED as u32;
                    data = &msg[..msg.len().min(cap)];
                    (PAYLOAD_INLINE, 0)
                }
            }
        };
        self.publish(&d, mb, status, kind, off, data.len() as u64);
    }

    /// Sends a reply written in place in our reply heap (a [`ReplyLoan`] made for `d`).
    fn send_loaned_reply(&self, d: Delivery, loan: ReplyLoan<'_>) {
        let (mb, _) = d.chan.seg.mailbox(d.mailbox).expect("validated in accept");
        if !mailbox::still_taken(mb, d.gen, d.nonce) {
            tracing::debug!(service = %self.service, trace_id = d.trace_id, "reply dropped: mailbox no longer ours");
            return; // the loan frees its block
        }
        let mut loan = loan;
        // The block is the reply's now: freed once its caller has read it.
        loan.sent = true;
        self.hold_until_read(&d, loan.block);
        self.publish(
            &d,
            mb,
            0,
            PAYLOAD_CHANNEL_HEAP,
            loan.block.off,
            loan.len as u64,
        );
    }

    /// Fills in the reply's place in the caller's mailbox, counts it, wakes the caller
    /// and times the call.
    fn publish(&self, d: &Delivery, mb: Mb<'_>, status: u32, kind: u8, off: u64, len: u64) {
        let ans = mb.ans;
        ans.status.store(status, Ordering::Relaxed);
        let (index, incarnation) = self.ident();
        ans.instance.store(index, Ordering::Relaxed);
        ans.incarnation.store(incarnation, Ordering::Relaxed);
        ans.reply_kind.store(kind as u32, Ordering::Relaxed);
        ans.reply_len.store(len, Ordering::Relaxed);
        ans.heap_off.store(off, Ordering::Relaxed);
        // Counted before the reply is published (complete's Release): whoever has seen the
        // reply, and asks after it, sees the count include it.
        let counters = self.seg.counters();
        counters.requests_served.fetch_add(1, Ordering::Relaxed);
        if status != 0 {
            counters.requests_failed.fetch_add(1, Ordering::Relaxed);
        }
        mailbox::complete(mb, d.gen);
        // Timed after the reply is out: the caller does not wait for our clock read. A
        // stamp from the future (a lying caller) is not observed.
        if d.sent_ns != 0 {
            let now = Instant::now();
            crate::serve::sweep::replied_at(now);
            if let Some(ns) = crate::session::breaker::mono_ns(now).checked_sub(d.sent_ns) {
                self.seg.durations().observe(ns);
            }
        }
    }

    /// A block of `len` bytes of the reply heap of `d`'s channel (made the first time it
    /// is needed), or why there is none.
    fn alloc_in_channel(&self, d: &Delivery, len: u64) -> std::result::Result<u64, String> {
        let chan = &d.chan;
        self.channel_reply_heap(d)?;
        if let Some((off, _)) = chan.seg.reply_heap_alloc(len) {
            return Ok(off);
        }
        // Blocks of replies read since the last look come back first.
        self.sweep_pending();
        match chan.seg.reply_heap_alloc(len) {
            Some((off, _)) => Ok(off),
            None => Err(format!(
                "the replies not yet read in this caller's channel fill its {}-byte reply heap; read them, or retry later",
                chan.seg.reply_heap.get().map_or(0, |h| h.size)
            )),
        }
    }

    /// Makes sure `chan` has its own reply heap: the first time, it is made here, sealed,
    /// and handed to the broker for the caller (charged to the caller's uid). A channel a
    /// previous broker made is named by its token, and the current broker takes its heap
    /// once its caller has claimed it (`Request::ClaimChannels`) and this instance has
    /// registered again: until then, and while the broker is away, this waits, at most
    /// until the call's deadline (past it nobody reads the reply) or [`REPLY_HEAP_WAIT`],
    /// whichever comes first. `Err`: why there is none (the caller's uid over its quota,
    /// the broker away or the channel unclaimed past that).
    fn channel_reply_heap(&self, d: &Delivery) -> std::result::Result<(), String> {
        let chan = &d.chan;
        if chan.seg.reply_heap.get().is_some() {
            return Ok(());
        }
        // One maker per channel (serving threads may meet its first large reply at once);
        // a wait for the broker below holds up no other channel's.
        let _one_maker = chan.reply_heap_maker.lock();
        if chan.seg.reply_heap.get().is_some() {
            return Ok(());
        }
        if let Some((at, why)) = &*chan.reply_heap_refused.lock() {
            if at.elapsed() < REPLY_HEAP_RETRY {
                return Err(why.clone());
            }
        }
        let (fd, heap) = crate::shm::layout::ChannelHeap::create(
            chan.seg.epoch,
            self.seg.layout.heap_size,
            chan.seg.id,
            crate::shm::layout::HeapSide::Reply,
        )
        .map_err(|e| format!("making a reply heap: {e}"))?;
        let until = d.heap_wait_until();
        let inner = &self.bus.inner;
        let mut broker = 0;
        // `NotOwner`: a previous broker's channel whose caller has not claimed it yet, or
        // ours not registered again yet.
        let asked = inner.ask_broker_until_owned(until, || {
            // The broker this goes to, but for a restart in between (then the idle thread
            // hands the heap again, and hears it is there already).
            broker = inner.session().epoch;
            inner
                .control
                .lock()
                .request_with_fds(&reply_heap_request(chan), &[fd.as_fd()])
        });
        match asked {
            Ok((crate::session::proto::Response::Done, _)) => {
                let _ = chan.seg.reply_heap.set(heap);
                *chan.reply_heap_fd.lock() = Some((fd, broker));
                Ok(())
            }
            Ok((other, _)) => Err(format!("ReplyHeap: expected Done, got {other:?}")),
            Err(Error::LimitExceeded(m)) => {
                *chan.reply_heap_refused.lock() = Some((Instant::now(), m.clone()));
                Err(m)
            }
            Err(e) => Err(format!("no reply heap for this channel: {e}")),
        }
    }

    /// Fetches the request heap of `d`'s channel, which its first request too large for a
    /// slot needs. The broker that made the channel hands it with `Channels` (the caller
    /// may have handed it over after our last look). A channel a previous broker made has
    /// its heap from the current one, handed over again by its caller under the channel's
    /// token (the previous broker may have died before we fetched it): waited for (the
    /// caller reconnecting, this instance registering again) at most until the call's
    /// deadline or [`REPLY_HEAP_WAIT`], whichever comes first, as for a reply heap.
    fn fetch_request_heap(&self, d: &Delivery) -> std::result::Result<(), String> {
        use crate::session::proto::{Request as Ask, Response};
        let chan = &d.chan;
        let inner = &self.bus.inner;
        let until = d.heap_wait_until();
        let fds = inner
            .ask_broker_until_owned(until, || {
                if inner.session().epoch == chan.seg.epoch {
                    // (A broker that died unnoticed fails this, and the next pass asks
                    // its successor by the token.)
                    inner.fetch_channels()?;
                    return Ok(None);
                }
                let ask = Ask::OpenRequestHeap {
                    channel: chan.seg.id,
                    token: chan.seg.token(),
                };
                match inner.control.lock().request(&ask)? {
                    (Response::Opened, fds) => Ok(Some(fds)),
                    (other, _) => Err(Error::Protocol(format!(
                        "OpenRequestHeap: expected Opened, got {other:?}"
                    ))),
                }
            })
            .map_err(|e| format!("fetching a request heap: {e}"))?;
        let Some(mut fds) = fds else {
            return Ok(());
        };
        let Some(fd) = fds.pop().filter(|_| fds.is_empty()) else {
            return Err("OpenRequestHeap: expected one descriptor".into());
        };
        chan.seg
            .adopt_heap(&fd, crate::shm::layout::HeapSide::Request)
            .map_err(|e| format!("a previous broker's channel's request heap: {e}"))
    }

    /// Frees reply blocks whose replies their callers have read (or abandoned for a newer
    /// call, or left unread in a channel that closed). A block waits for its caller however
    /// long it takes: it is in that caller's channel's heap, and holds nobody else's memory.
    fn sweep_pending(&self) {
        self.pending.lock().retain(|p| {
            // A closed channel's caller is gone: nobody reads its replies any more.
            let unread = !p.chan.is_closed()
                && p.chan
                    .seg
                    .mailbox(p.mailbox)
                    .is_some_and(|(mb, _)| mailbox::still_unread(mb, p.gen));
            if !unread {
                self.free_block(&p.chan, p.block);
                // Read (or given up), so its caller has the heap: no broker needs it again.
                *p.chan.reply_heap_fd.lock() = None;
            }
            unread
        });
    }

    /// Hands the current broker, under each channel's token, the reply heaps that were
    /// handed to a broker since gone and that their callers may not have fetched yet (no
    /// reply there has been read): a caller meeting such a reply after a restart asks the
    /// current broker for the heap, and waits for it. One try per channel and call: a
    /// channel whose caller has not claimed it yet is tried again at the next call.
    fn hand_reply_heaps_again(&self) {
        let inner = &self.bus.inner;
        let epoch = inner.session().epoch;
        for chan in self.channels.list().iter() {
            let mut kept = chan.reply_heap_fd.lock();
            let Some((fd, handed)) = kept.as_mut() else {
                continue;
            };
            if *handed == epoch {
                continue;
            }
            let asked = inner
                .control
                .lock()
                .request_with_fds(&reply_heap_request(chan), &[fd.as_fd()]);
            match asked {
                Ok(_) => *handed = epoch,
                Err(Error::NotOwner(_) | Error::BrokerUnavailable { .. }) => {}
                Err(Error::BadRequest(m)) if m.contains("already") => *handed = epoch,
                Err(e) => {
                    tracing::warn!(service = %self.service, channel = chan.seg.id, "handing a reply heap to a new broker: {e}");
                    *kept = None;
                }
            }
        }
    }

    fn free_block(&self, chan: &Chan, b: Block) {
        chan.seg.reply_heap_free(b.off, b.len);
    }

    /// A block of its channel's reply heap for `len` bytes of a reply to `d`, its tag (the
    /// call's nonce) written first: the block and where the bytes go, or why there is
    /// none. A caller copying a reply out of a block since reused for another call notices
    /// by the tag (`call::read_reply`).
    fn reply_block(
        &self,
        d: &Delivery,
        len: usize,
    ) -> std::result::Result<(Block, *mut u8), String> {
        let block_len = len as u64 + crate::call::HEAP_TAG;
        let block = Block {
            off: self.alloc_in_channel(d, block_len)?,
            len: block_len,
        };
        let at = d
            .chan
            .seg
            .reply_heap_range(block.off, block_len)
            .expect("allocator stays in the heap");
        // SAFETY: `at` is `block_len` bytes of a heap we write, allocated to this reply,
        // 64-aligned (the allocator's unit, on a page-aligned heap).
        let tag = unsafe { &*(at as *const crate::shm::sync::AtomicU64) };
        tag.store(d.nonce, Ordering::Relaxed);
        // SYNC POINT: the tag before the bytes: pairs with the caller's Acquire fence after
        // its copy.
        crate::shm::sync::fence(Ordering::Release);
        // SAFETY: the bytes after the tag, inside the same allocated block.
        Ok((block, unsafe { at.add(crate::call::HEAP_TAG as usize) }))
    }

    /// Keeps reply `block` of a reply to `d` until its caller has read it.
    fn hold_until_read(&self, d: &Delivery, block: Block) {
        self.pending.lock().push(PendingReply {
            chan: d.chan.clone(),
            mailbox: d.mailbox,
            gen: d.gen,
            block,
        });
    }
}

impl Drop for InstanceInner {
    fn drop(&mut self) {
        if let Err(e) = self.unregister() {
            tracing::debug!(service = %self.service, instance = %self.id, "unregister on drop: {e}");
        }
    }
}

/// The handover of `chan`'s reply heap (its descriptor goes with it): the broker takes a
/// channel of another broker run by its token.
fn reply_heap_request(chan: &Chan) -> Ctl {
    Ctl::ReplyHeap {
        channel: chan.seg.id,
        epoch: chan.seg.epoch,
        token: chan.seg.token(),
    }
}

/// A single-shot (all-or-nothing) bulk result as `Ok(())` or its first failure.
fn first_failure(r: BulkReport) -> Result<()> {
    match r.failures.first() {
        Some(f) => Err(f.to_error()),
        None => Ok(()),
    }
}

struct Delivery {
    /// The channel the request came through: its caller's mailboxes for this instance,
    /// and the caller's segment (request heap, uid).
    chan: Arc<Chan>,
    mailbox: u32,
    gen: u32,
    nonce: u64,
    trace_id: u64,
    hops: u8,
    /// When the caller sent it ([`crate::shm::layout::MsgHeader::sent_ns`]).
    sent_ns: u64,
    trace_hi: u64,
    span_id: u64,
    trace_flags: u8,
    /// [`crate::shm::layout::MsgHeader::deadline_ns`].
    deadline_ns: u64,
    /// A payload in the caller's request heap (offset, length; checked against the heap):
    /// read there, in place.
    heap_payload: Option<(u64, u64)>,
}

impl Delivery {
    /// How long a serving thread waits for this call's channel's heap (reply or request)
    /// while the broker is away or a previous broker's channel is not claimed yet: until
    /// the call's deadline, but never longer than a broker restart takes to settle
    /// ([`REPLY_HEAP_WAIT`]): a caller that states an hour and never claims its channel
    /// holds the thread 5 s.
    fn heap_wait_until(&self) -> Instant {
        let cap = Instant::now() + REPLY_HEAP_WAIT;
        self.deadline().map_or(cap, |t| t.min(cap))
    }

    /// [`Request::deadline`].
    fn deadline(&self) -> Option<Instant> {
        let ns = self.deadline_ns;
        if ns == 0 {
            return None;
        }
        let now = Instant::now();
        let now_ns = crate::shm::sys::monotonic_ns();
        Some(match ns.checked_sub(now_ns) {
            Some(ahead) => now + Duration::from_nanos(ahead),
            None => now
                .checked_sub(Duration::from_nanos(now_ns - ns))
                .unwrap_or(now),
        })
    }
}

/// One serving thread's view of the ring, with buffers reused across requests.
pub struct Receiver<'a> {
    inst: &'a InstanceInner,
    method: String,
    payload: Vec<u8>,
    /// This thread's spin policy, learned budget and spin seat.
    waiter: Waiter<'a>,
    /// This thread's view of the channels and where it stands in them.
    sweep: Sweep,
    /// The registry's channel word of this instance as last acted on (broker epoch, value).
    seen_word: Option<(u64, u32)>,
    /// When this thread next looks for channels of a previous broker whose callers moved on.
    next_moved_on_check: Instant,
}

/// How often an idle serving thread looks for channels of a previous broker whose callers
/// moved on ([`crate::shm::layout::ChannelSeg::moved_on`]).
const MOVED_ON_CHECK: Duration = Duration::from_millis(100);

/// Where a request's method and payload are, as its (untrusted) header says, checked
/// against the slot's data area and the service's maximum message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestShape {
    /// The method name is the first `method_len` bytes of the slot's data.
    pub method_len: usize,
    pub payload: PayloadAt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadAt {
    /// In the slot's data, after the method name.
    Inline { off: usize, len: usize },
    /// In the caller's request heap (the range is checked against the heap when read).
    Heap { off: u64, len: u64 },
}

/// What is wrong with a request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadShape {
    Method,
    Payload,
}

/// Checks a request header taken from a ring slot with `slot_data` data bytes: the pure
/// part of an instance's request parsing (fuzzed: `fuzz/fuzz_targets/request_header.rs`).
pub fn request_shape(
    h: &MsgHeader,
    slot_data: usize,
    max_message: u64,
) -> std::result::Result<RequestShape, BadShape> {
    let method_len = h.method_len as usize;
    if method_len == 0 || method_len > MAX_METHOD || method_len > slot_data {
        return Err(BadShape::Method);
    }
    let payload = match h.kind {
        PAYLOAD_INLINE => {
            let len = usize::try_from(h.payload_len).map_err(|_| BadShape::Payload)?;
            if len > slot_data - method_len {
                return Err(BadShape::Payload);
            }
            PayloadAt::Inline {
                off: method_len,
                len,
            }
        }
        PAYLOAD_HEAP if h.payload_len <= max_message => PayloadAt::Heap {
            off: h.heap_off,
            len: h.payload_len,
        },
        _ => return Err(BadShape::Payload),
    };
    Ok(RequestShape {
        method_len,
        payload,
    })
}

impl<'a> Receiver<'a> {
    /// The next request, or `None` when `timeout` passes or the instance is stopping.
    pub fn recv(&mut self, timeout: Option<Duration>) -> Result<Option<Request<'_>>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let inst = self.inst;
        // A fork child must not take the parent's requests.
        inst.bus.inner.not_forked()?;
        let bell = inst.doorbell();
        let stopping = || inst.stopping.load(Ordering::Acquire);
        loop {
            // The heartbeat: advanced by this loop itself, so a stuck loop stops it. A load
            // and a store, not an RMW (a locked instruction, on the request's path right
            // after the wait): every reader only asks whether the word moved, and two
            // serving threads racing here still move it (at worst back to an older value,
            // which is a move too).
            let progress = &inst.seg.counters().progress;
            progress.store(
                progress.load(Ordering::Relaxed).wrapping_add(1),
                Ordering::Relaxed,
            );
            self.fetch_channels_if_announced();
            self.sweep.refresh(&inst.channels);
            if let Some(i) = self.sweep.next(bell) {
                let chan = self.sweep.chan(i);
                chan.seg.prefetch_request();
                let Some(t) = chan.seg.ring().try_pop() else {
                    // Another serving thread took it first.
                    continue;
                };
                self.waiter.working();
                let d = inst.accept(&t, chan, &mut self.method, &mut self.payload);
                // The slot is freed before any reply to its request is published: a caller
                // that has seen the reply knows the slot free without reading the freed
                // word (`ChannelSeg::note_freed`).
                drop(t);
                let d = match d {
                    Some(Ok(d)) => Some(d),
                    Some(Err((d, why))) => {
                        inst.send_reply(d, code::BAD_REQUEST as u32, &why);
                        None
                    }
                    None => None,
                };
                if let Some(d) = d {
                    return Ok(Some(Request {
                        inst,
                        method: &self.method,
                        payload: &self.payload,
                        delivery: Some(d),
                    }));
                }
                continue;
            }
            if stopping() {
                return Ok(None);
            }
            let now = Instant::now();
            if now >= self.next_moved_on_check {
                // No broker will ever say a previous broker's channel closed: its caller
                // does, when it lets go of it.
                self.next_moved_on_check = now + MOVED_ON_CHECK;
                inst.channels
                    .drop_moved_on(inst.bus.inner.session().epoch, bell);
                inst.hand_reply_heaps_again();
            }
            let mut wait = Duration::from_millis(inst.heartbeat.interval_ms.max(1));
            if let Some(d) = deadline {
                match d.checked_duration_since(now) {
                    Some(l) if !l.is_zero() => wait = wait.min(l),
                    _ => return Ok(None),
                }
            }
            self.waiter.policy = *inst.spin.lock();
            // The current broker's seats (a restarted broker hands out a new shared segment).
            let sess = inst.bus.inner.session();
            self.waiter.set_seats(Seats::new(sess.shared.spin_seats()));
            let word = sess.registry.instance(inst.ident().0).map(|e| &e.channels);
            let seen = self.seen_word.map(|(_, w)| w);
            let announced = || word.is_some_and(|w| Some(w.load(Ordering::Relaxed)) != seen);
            let sweep = &self.sweep;
            let ready = || announced() || sweep.worth_a_look(&inst.channels);
            bell.wait(&mut self.waiter, wait, ready, stopping);
        }
    }

    /// When the broker announced channel changes for this instance (the registry word),
    /// fetches them. A failure is logged and retried at the next announcement.
    fn fetch_channels_if_announced(&mut self) {
        let inst = self.inst;
        let sess = inst.bus.inner.session();
        let Some(e) = sess.registry.instance(inst.ident().0) else {
            return;
        };
        // Acquire: pairs with the broker's Release bump after it queued the news.
        let now = (sess.epoch, e.channels.load(Ordering::Acquire));
        if self.seen_word == Some(now) {
            return;
        }
        self.seen_word = Some(now);
        if let Err(e) = inst.bus.inner.fetch_channels() {
            tracing::warn!(service = %inst.service, instance = %inst.id, "fetching channels: {e}");
        }
    }
}

/// A request refused by `accept` (its mailbox taken), with the error to answer it with.
type Rejected = (Delivery, Cow<'static, [u8]>);

/// A request being handled. Reply with [`Request::reply`] or [`Request::reply_error`];
/// dropping it unanswered sends the caller an error rather than leaving it waiting.
pub struct Request<'r> {
    inst: &'r InstanceInner,
    method: &'r str,
    payload: &'r [u8],
    delivery: Option<Delivery>,
}

impl<'r> Request<'r> {
    pub fn method(&self) -> &str {
        self.method
    }
    /// The request's bytes: for a request larger than a ring slot, in place in the
    /// channel's request heap, which only its caller writes (no copy), else a copy out of
    /// the slot.
    pub fn payload(&self) -> &[u8] {
        let Some((d, (off, len))) = self
            .delivery
            .as_ref()
            .and_then(|d| Some((d, d.heap_payload?)))
        else {
            return self.payload;
        };
        match d.chan.seg.heap_range(off, len) {
            // SAFETY: `len` bytes inside the caller's heap (range checked), mapped for as
            // long as `d.chan` lives, i.e. as long as `self`; the caller keeps the block
            // allocated to this call until our reply (its mailbox is TAKEN, and quarantined
            // with the block if it gives up). A misbehaving caller may change the bytes
            // meanwhile, as it could before it sent them; they stay in bounds.
            Some(p) => unsafe { std::slice::from_raw_parts(p, len as usize) },
            None => &[],
        }
    }
    pub fn trace_id(&self) -> u64 {
        self.delivery.as_ref().map_or(0, |d| d.trace_id)
    }
    /// Hops the request has made so far (nested calls pass `hops + 1` on).
    pub fn hops(&self) -> u8 {
        self.delivery.as_ref().map_or(0, |d| d.hops)
    }
    /// The caller's W3C trace context: its trace id, the span of its call, its flags.
    pub fn trace_context(&self) -> TraceContext {
        self.delivery
            .as_ref()
            .map_or_else(TraceContext::default, |d| TraceContext {
                trace_id: (d.trace_hi as u128) << 64 | d.trace_id as u128,
                span_id: d.span_id,
                flags: d.trace_flags,
            })
    }
    /// [`Request::trace_context`] as a `traceparent` header value.
    pub fn traceparent(&self) -> String {
        self.trace_context().traceparent()
    }
    /// When the caller stops waiting for the reply (its attempt's deadline), if it said:
    /// work past it is wasted. Calls made with [`crate::CallOptions::nested`] end by it.
    pub fn deadline(&self) -> Option<Instant> {
        self.delivery.as_ref()?.deadline()
    }
    /// What a call made while handling this request inherits (hops, trace, deadline).
    pub fn context(&self) -> CallContext {
        CallContext {
            hops: self.hops(),
            trace: self.trace_context(),
            deadline: self.deadline(),
        }
    }
    /// Decodes a typed (bincode) payload; a failure is the caller's `BadRequest`.
    pub fn decode<T: DeserializeOwned>(&self) -> std::result::Result<T, ServiceError> {
        crate::codec::decode(self.payload()).map_err(|e| {
            ServiceError::bad_request(format!("undecodable {} request: {e}", self.method))
        })
    }
    /// The largest reply the service allows (its maximum message size).
    pub fn max_reply(&self) -> u64 {
        self.inst.max_message
    }

    /// Answers the request. A reply over [`Request::max_reply`] is not sent: the caller
    /// gets error 413 naming the sizes, and this returns `MessageTooLarge`.
    pub fn reply(mut self, data: &[u8]) -> Result<()> {
        let d = self.delivery.take().expect("replied once");
        self.inst.send_reply(d, 0, data);
        if data.len() as u64 > self.inst.max_message {
            return Err(Error::MessageTooLarge {
                service: self.inst.service.clone(),
                size: data.len() as u64,
                max: self.inst.max_message,
            });
        }
        Ok(())
    }
    /// A buffer of `len` bytes in this instance's reply heap, to write the reply in place
    /// and send with [`Request::reply_loan`]: the caller reads it where it was written
    /// ([`crate::Bus::call_loan`], [`crate::Bus::call_borrowed`]) or copies it out, and the
    /// bus copies nothing. `MessageTooLarge` over [`Request::max_reply`]; `LimitExceeded`
    /// while the heap is full of replies not yet read. Dropped unsent, the memory goes back.
    pub fn loan_reply(&self, len: usize) -> Result<ReplyLoan<'r>> {
        let inst = self.inst;
        let d = self
            .delivery
            .as_ref()
            .ok_or_else(|| Error::BadRequest("the request was already answered".into()))?;
        if len as u64 > inst.max_message {
            return Err(Error::MessageTooLarge {
                service: inst.service.clone(),
                size: len as u64,
                max: inst.max_message,
            });
        }
        // Tagged before the handler writes, as a copied reply's block is.
        let (block, ptr) = inst.reply_block(d, len).map_err(Error::LimitExceeded)?;
        Ok(ReplyLoan {
            inst,
            chan: d.chan.clone(),
            block,
            sent: false,
            off: block.off,
            len,
            ptr,
            nonce: d.nonce,
        })
    }

    /// Answers the request with a reply written in place ([`Request::loan_reply`]). A loan
    /// made for another request is refused with `BadRequest`; the request, consumed, is
    /// then answered like one dropped unanswered (the caller gets an internal error).
    pub fn reply_loan(mut self, loan: ReplyLoan<'_>) -> Result<()> {
        let d = self.delivery.take().expect("replied once");
        if loan.nonce != d.nonce || !std::ptr::eq(loan.inst, self.inst) {
            self.delivery = Some(d);
            return Err(Error::BadRequest(
                "the reply loan was made for another request".into(),
            ));
        }
        self.inst.send_loaned_reply(d, loan);
        Ok(())
    }

    pub fn reply_typed<T: Serialize>(self, v: &T) -> Result<()> {
        let body = crate::codec::encode(v)
            .map_err(|e| Error::BadRequest(format!("reply could not be encoded: {e}")))?;
        self.reply(&body)
    }
    pub fn reply_error(mut self, code: u16, message: &str) -> Result<()> {
        let d = self.delivery.take().expect("replied once");
        self.inst
            .send_reply(d, code.max(1) as u32, message.as_bytes());
        Ok(())
    }
}

/// A buffer in an instance's reply heap ([`Request::loan_reply`]): write the reply in
/// place, then send it with [`Request::reply_loan`].
pub struct ReplyLoan<'r> {
    inst: &'r InstanceInner,
    /// The channel of the call it answers, and the block (tag, then bytes) in its reply
    /// heap (or the shared one).
    chan: Arc<Chan>,
    block: Block,
    /// Sent as the reply: the block is no longer the loan's to free.
    sent: bool,
    off: u64,
    len: usize,
    ptr: *mut u8,
    /// The call it answers.
    nonce: u64,
}

crate::call::loan::loaned_buffer!(ReplyLoan<'_>, "ReplyLoan");

impl Drop for ReplyLoan<'_> {
    fn drop(&mut self) {
        if !self.sent {
            self.inst.free_block(&self.chan, self.block);
        }
    }
}

impl Drop for Request<'_> {
    fn drop(&mut self) {
        if let Some(d) = self.delivery.take() {
            self.inst.send_reply(
                d,
                code::INTERNAL as u32,
                b"the instance dropped the request without replying",
            );
        }
    }
}
