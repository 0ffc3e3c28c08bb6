//! Zero-copy calls. A [`Loan`] is a buffer in the request heap of this connection's
//! channel to one instance of a service (picked when the loan is made, as a call would
//! pick it): the caller writes its request there and that instance's handler reads it in
//! place ([`crate::Request::payload`]); no other instance can read it. A
//! [`BorrowedReply`] is a reply read where the instance wrote it (its reply heap, or the
//! mailbox for a small one) until the guard drops. With
//! [`crate::Request::loan_reply`] on the other side, no byte of a payload is copied by the
//! transport in either direction.
//!
//! Lifetimes of the memory involved:
//! * a loan's block belongs to the loan until [`Bus::call_loan`] takes it; the call frees
//!   it once the instance has answered (it is then done reading), or hands it to the
//!   quarantined mailbox of an attempt that was taken and not answered (freed when the late
//!   reply lands or its taker exits, as for a copied request);
//! * a borrowed reply keeps its mailbox, and so its block of the channel's reply heap,
//!   until it drops: the instance reuses a block only once its caller has let go of the
//!   mailbox (since layout 13 there is no shared reply heap whose unread blocks expired).

use std::sync::Arc;

use super::{check_options, check_size, Sent};
use crate::channel::mailbox;
use crate::error::{Error, Result};
use crate::names;
use crate::session::breaker;
use crate::session::bus::{Bus, BusInner, CallInfo};
use crate::shm::layout::{ChannelSeg, InstanceSeg};
use crate::shm::sync::Ordering;

/// A call's request: bytes to copy (into the ring slot, or the channel's request heap
/// when larger), or a loan's block of one channel's request heap, already written: sent in
/// place through that channel, copied when the call goes elsewhere.
#[derive(Clone, Copy)]
pub(crate) enum Body<'a> {
    Bytes(&'a [u8]),
    Loaned {
        bytes: &'a [u8],
        /// Offset and length in `chan`'s request heap.
        block: (u64, u64),
        chan: &'a Arc<ChannelSeg>,
    },
}

impl<'a> Body<'a> {
    pub(crate) fn bytes(&self) -> &'a [u8] {
        match *self {
            Body::Bytes(b) | Body::Loaned { bytes: b, .. } => b,
        }
    }
}

/// Where a call's reply goes: copied into a buffer, or kept in place for a
/// [`BorrowedReply`].
pub(crate) struct Sink<'a> {
    /// `None`: keep the reply in place (`kept`).
    pub(crate) out: Option<&'a mut Vec<u8>>,
    pub(crate) kept: Option<Kept>,
    /// A quarantined mailbox took the loaned request block (the instance took the request
    /// and did not answer in time): the quarantine frees it, the loan must not.
    pub(crate) block_held: bool,
}

impl<'a> Sink<'a> {
    pub(crate) fn copy(out: &'a mut Vec<u8>) -> Sink<'a> {
        Sink {
            out: Some(out),
            kept: None,
            block_held: false,
        }
    }

    pub(crate) fn keep() -> Sink<'static> {
        Sink {
            out: None,
            kept: None,
            block_held: false,
        }
    }
}

/// A ready reply left in place: its mailbox (not yet released) and where its bytes are.
pub(crate) struct Kept {
    pub(crate) sent: Sent<'static>,
    pub(crate) ptr: *const u8,
    pub(crate) len: usize,
    /// The answering instance's segment, mapped for as long as the reply is read.
    pub(crate) seg: Option<Arc<InstanceSeg>>,
}

/// A writable buffer in the request heap of this connection's channel to one instance
/// ([`Bus::loan`]): write the request in place, then send it with [`Bus::call_loan`]; no
/// copy is made on either side. Dropped unsent, its memory goes back to the heap.
pub struct Loan {
    bus: Arc<BusInner>,
    /// The service it was made for, and the channel (to one of its instances) it lies in.
    service: String,
    /// The resource whose owner it was made for ([`Bus::loan_resource`]).
    resource: Option<String>,
    chan: Arc<ChannelSeg>,
    off: u64,
    len: usize,
    ptr: *mut u8,
    /// Whether dropping it frees the block: not once a quarantined attempt took it.
    owned: bool,
}

/// The byte-buffer face of a loan ([`Loan`], [`crate::ReplyLoan`]): a type with `ptr`,
/// `len` and `off` fields that is the only handle on `len` bytes at `ptr`, a block of a
/// heap allocated to it alone, in a mapping it keeps alive (its `Drop` frees the block).
macro_rules! loaned_buffer {
    ($t:ty, $name:literal) => {
        // SAFETY: the only handle on its block, in a mapping that outlives it.
        unsafe impl Send for $t {}
        // SAFETY: a shared reference only reads the block.
        unsafe impl Sync for $t {}

        impl $t {
            /// The buffer's length (what is sent).
            pub fn len(&self) -> usize {
                self.len
            }

            pub fn is_empty(&self) -> bool {
                self.len == 0
            }

            /// The buffer, for writing in place.
            pub fn as_mut_slice(&mut self) -> &mut [u8] {
                // SAFETY: `len` bytes allocated to this loan alone, mapped while it lives;
                // `&mut self` makes this the only reference.
                unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
            }

            pub fn as_slice(&self) -> &[u8] {
                // SAFETY: as in `as_mut_slice`, shared.
                unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
            }
        }

        impl std::ops::Deref for $t {
            type Target = [u8];
            fn deref(&self) -> &[u8] {
                self.as_slice()
            }
        }

        impl std::ops::DerefMut for $t {
            fn deref_mut(&mut self) -> &mut [u8] {
                self.as_mut_slice()
            }
        }

        impl std::fmt::Debug for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct($name)
                    .field("offset", &self.off)
                    .field("len", &self.len)
                    .finish()
            }
        }
    };
}
pub(crate) use loaned_buffer;

loaned_buffer!(Loan, "Loan");

impl Loan {
    /// Its block now belongs to a quarantined mailbox (the instance took the request and
    /// has not answered): freed when the late reply lands, not by the loan.
    pub(crate) fn disown(&mut self) {
        self.owned = false;
    }

    /// Checks that the loan may be sent on `bus` as a call to `service` (a loan for a
    /// resource: to `resource`).
    fn check_for(
        &self,
        bus: &Arc<BusInner>,
        service: Option<&str>,
        resource: Option<&str>,
    ) -> Result<()> {
        if !Arc::ptr_eq(&self.bus, bus) {
            return Err(Error::BadRequest(
                "the loan was made by another bus connection".into(),
            ));
        }
        if let Some(service) = service.filter(|s| *s != self.service) {
            return Err(Error::BadRequest(format!(
                "the loan was made for service '{}', not '{service}'",
                self.service
            )));
        }
        if resource != self.resource.as_deref() {
            return Err(Error::BadRequest(match (&self.resource, resource) {
                (Some(mine), Some(r)) => {
                    format!("the loan was made for resource '{mine}', not '{r}'")
                }
                (Some(mine), None) => format!(
                    "the loan was made for resource '{mine}': send it with call_resource_loan"
                ),
                (None, _) => format!(
                    "the loan was made for service '{}': make one with loan_resource",
                    self.service
                ),
            }));
        }
        Ok(())
    }

    /// The loan as a call's request body.
    fn body(&self) -> Body<'_> {
        Body::Loaned {
            bytes: self.as_slice(),
            block: (self.off, self.len as u64),
            chan: &self.chan,
        }
    }
}

impl Drop for Loan {
    fn drop(&mut self) {
        if self.owned {
            self.chan.heap_free(self.off, self.len as u64);
        }
    }
}

/// A reply read in place, where the instance wrote it. Derefs to its bytes; dropping it
/// gives its memory back (the mailbox to this connection, the reply heap block to the
/// instance). Hold it briefly: see [`BorrowedReply::is_intact`].
pub struct BorrowedReply {
    bus: Arc<BusInner>,
    kept: Kept,
    info: CallInfo,
}

// SAFETY: the bytes are in mappings held by `bus` (the mailbox) and `kept.seg` (the reply
// heap), and only read; the mailbox stays ours until drop.
unsafe impl Send for BorrowedReply {}
// SAFETY: as above; `&BorrowedReply` only reads.
unsafe impl Sync for BorrowedReply {}

impl BorrowedReply {
    /// The reply's bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `len` bytes checked against the mailbox or the channel's reply heap when
        // the reply was found ready, in mappings this guard keeps (`kept.sent.chan`,
        // `kept.seg`); the instance does not reuse them until the guard releases the
        // mailbox (an instance that does anyway changes the bytes, which stay in bounds).
        unsafe { std::slice::from_raw_parts(self.kept.ptr, self.kept.len) }
    }

    /// Which instance answered.
    pub fn instance(&self) -> CallInfo {
        self.info
    }

    /// The answering instance's id.
    pub fn instance_id(&self) -> String {
        self.bus.instance_name(self.info.instance)
    }

    /// Whether the reply's bytes are still this call's (the block's tag still names the
    /// call). An instance keeps a block until its caller lets go of the mailbox, so this
    /// is false only if the instance broke that rule (a bug, or an instance that rewrites
    /// its own replies): what it wrote there is what the guard shows.
    pub fn is_intact(&self) -> bool {
        // An inline reply (in our own mailbox, which nobody reuses while we hold it) has no
        // tag, and passes.
        self.kept.seg.as_ref().is_none_or(|seg| {
            self.bus
                .locate_reply(&self.kept.sent, seg)
                .and_then(|at| at.check_tag(self.kept.sent.nonce))
                .is_ok()
        })
    }
}

impl std::ops::Deref for BorrowedReply {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.bytes()
    }
}

impl AsRef<[u8]> for BorrowedReply {
    fn as_ref(&self) -> &[u8] {
        self.bytes()
    }
}

impl std::fmt::Debug for BorrowedReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BorrowedReply")
            .field("len", &self.kept.len)
            .field("instance", &self.info)
            .finish()
    }
}

impl Drop for BorrowedReply {
    fn drop(&mut self) {
        release(&self.bus, &self.kept.sent);
    }
}

/// A call's result as a [`BorrowedReply`] (its reply kept in `sink`); a reply kept by a
/// call that failed after all goes back.
pub(crate) fn borrowed(
    bus: &Arc<BusInner>,
    r: Result<CallInfo>,
    sink: Sink<'_>,
) -> Result<BorrowedReply> {
    match (r, sink.kept) {
        (Ok(info), Some(kept)) => Ok(BorrowedReply {
            bus: Arc::clone(bus),
            kept,
            info,
        }),
        (Ok(_), None) => Err(Error::Protocol("a reply read in place was not kept".into())),
        (Err(e), kept) => {
            if let Some(k) = kept {
                release(bus, &k.sent);
            }
            Err(e)
        }
    }
}

/// Gives a kept reply's mailbox back (and with it, to the instance, its reply heap block).
fn release(bus: &BusInner, s: &Sent) {
    mailbox::release(s.mb().0, s.gen);
    bus.pool.put(s.mailbox, s.chan.id);
}

impl Bus {
    /// A writable buffer of `len` bytes for a request to `service`, written in place and
    /// sent with [`Bus::call_loan`] without a copy. It lies in the request heap of this
    /// connection's channel to the instance the next call would go to (round-robin), which
    /// the call then goes to first: only that instance can read it. Should the call go to
    /// another instance (that one left, or failed), the bytes are copied there.
    /// `MessageTooLarge` over the service's largest message; each channel's heap holds
    /// twice the bus's largest message (`--max-message`), and `LimitExceeded` says when it
    /// has no room left (loans and large requests in flight hold it).
    pub fn loan(&self, service: &str, len: usize) -> Result<Loan> {
        let inner = &self.inner;
        inner.not_forked()?;
        names::service(service)?;
        let no_instance = || Error::NoAvailableInstance {
            service: service.to_owned(),
        };
        let sess = inner.routing_session(service);
        let (svc_idx, svc) = sess.find_service(service).ok_or_else(no_instance)?;
        let max = svc.seq.read(|| svc.max_message.load(Ordering::Relaxed));
        check_size(service, len, max)?;
        let target = inner
            .pick_target(sess, (svc_idx, svc), &crate::Selection::RoundRobin, |_| {
                false
            })
            .ok_or_else(no_instance)?;
        self.loan_in(service, None, target, len)
    }

    /// [`Bus::loan`] for a call by resource id: a buffer in the request heap of this
    /// connection's channel to the instance that owns `resource` now, sent with
    /// [`Bus::call_resource_loan`]. Should the resource move to another owner before the
    /// call, the bytes are copied there. `ResourceNotFound` and `OwnerUnavailable` as
    /// [`Bus::call_resource`] says them.
    pub fn loan_resource(&self, resource: &str, len: usize) -> Result<Loan> {
        let (target, _, service, max) = self.online_owner(resource)?;
        check_size(&service, len, max)?;
        self.loan_in(&service, Some(resource), target, len)
    }

    /// A loan of `len` bytes in this connection's channel to instance `target` of
    /// `service`.
    fn loan_in(
        &self,
        service: &str,
        resource: Option<&str>,
        target: CallInfo,
        len: usize,
    ) -> Result<Loan> {
        let inner = &self.inner;
        let seg = inner.loan_target(service, target)?;
        let chan = seg
            .channel
            .clone()
            .ok_or_else(|| Error::Protocol("instance opened without a channel".into()))?;
        // Blocks of abandoned calls whose late replies have landed come back first, before
        // this loan is placed (placed first, it could split the heap around them).
        inner.pool.reclaim_if_any();
        let (off, ptr) = chan.heap_alloc(len as u64).ok_or_else(|| {
            Error::LimitExceeded(format!(
                "request heap of {} bytes to {service}'s instance has no room for a loan of {len} more",
                chan.heap_size()
            ))
        })?;
        Ok(Loan {
            bus: Arc::clone(inner),
            service: service.to_owned(),
            resource: resource.map(str::to_owned),
            chan,
            off,
            len,
            ptr,
            owned: true,
        })
    }

    /// Calls `method` of `service` (round-robin, failover, as [`Bus::call`]) with a request
    /// written in a [`Loan`], and returns the reply read in place. Neither the request nor
    /// the reply is copied by the bus. The loan is spent either way.
    ///
    /// One difference from a copied call: an attempt that an instance took and did not
    /// answer in time ends the call even when it is idempotent (the request's memory stays
    /// with that attempt until its late reply lands, so it is not sent again).
    pub fn call_loan(
        &self,
        service: &str,
        method: &str,
        mut loan: Loan,
        opts: &crate::CallOptions,
    ) -> Result<BorrowedReply> {
        loan.check_for(&self.inner, Some(service), None)?;
        let mut sink = Sink::keep();
        let r = self.call_with(service, method, loan.body(), opts, &mut sink);
        // Dropped at the end: the instance has answered (it is done reading), or the call
        // gave up on an attempt that was never taken; a quarantine that holds the block
        // frees it when the late reply lands.
        loan.owned = !sink.block_held;
        borrowed(&self.inner, r, sink)
    }

    /// [`Bus::call_resource`] with a request written in a loan made for `resource`
    /// ([`Bus::loan_resource`]), the reply read in place: neither is copied while the
    /// resource stays with the owner the loan was made for. The loan is spent either way.
    pub fn call_resource_loan(
        &self,
        resource: &str,
        method: &str,
        mut loan: Loan,
        opts: &crate::CallOptions,
    ) -> Result<BorrowedReply> {
        loan.check_for(&self.inner, None, Some(resource))?;
        let mut sink = Sink::keep();
        let r = self.call_resource_with(resource, method, loan.body(), opts, &mut sink);
        loan.owned = !sink.block_held;
        borrowed(&self.inner, r, sink)
    }

    /// [`Bus::submit`] with a request written in a [`Loan`] for `service`: the call goes to
    /// the loan's instance while it is routable (else the bytes are copied to the one
    /// picked), and the [`Pending`](crate::Pending) keeps the loan until the call settles;
    /// [`Pending::wait_borrowed`](crate::Pending::wait_borrowed) reads the reply in place.
    pub fn submit_loan(
        &self,
        service: &str,
        method: &str,
        loan: Loan,
        opts: &crate::CallOptions,
    ) -> Result<crate::Pending<'_>> {
        loan.check_for(&self.inner, Some(service), None)?;
        let start = std::time::Instant::now();
        let mut pending = self
            .submit_from(start, service, method, loan.body(), opts, true)
            .map_err(|e| match e {
                super::Submit::Failed(e) | super::Submit::RingFull(e) => e,
            })?;
        pending.keep_loan(loan);
        Ok(pending)
    }

    /// Like [`Bus::call`], but the reply is read in place ([`BorrowedReply`]) instead of
    /// copied out; the request is copied as usual.
    pub fn call_borrowed(
        &self,
        service: &str,
        method: &str,
        payload: &[u8],
        opts: &crate::CallOptions,
    ) -> Result<BorrowedReply> {
        let mut sink = Sink::keep();
        let r = self.call_with(service, method, Body::Bytes(payload), opts, &mut sink);
        borrowed(&self.inner, r, sink)
    }

    /// The call path shared by [`Bus::call_into`] and the zero-copy calls: validates,
    /// routes under the service's circuit breaker, and leaves the reply in `sink`.
    pub(crate) fn call_with(
        &self,
        service: &str,
        method: &str,
        body: Body<'_>,
        opts: &crate::CallOptions,
        sink: &mut Sink<'_>,
    ) -> Result<CallInfo> {
        let start = crate::shm::sys::fast_now();
        names::service(service)?;
        names::method(method)?;
        check_options(opts)?;
        let inner = &*self.inner;
        inner.not_forked()?;
        let sess = inner.routing_session(service);
        // A service nobody ever registered fails here, logged like any failed call.
        let (svc_idx, svc) = sess.find_service(service).ok_or_else(|| {
            super::failed_call(
                Error::NoAvailableInstance {
                    service: service.to_owned(),
                },
                inner.trace_of(opts),
            )
        })?;
        let stats = sess.stats.caller_stats(svc_idx);
        let cfg = &inner.opts.circuit_breaker;
        breaker::guarded(cfg, stats, svc, service, |sent| {
            self.route(
                (start, sess, svc_idx, svc),
                service,
                method,
                body,
                opts,
                sink,
                sent,
            )
        })
    }
}
