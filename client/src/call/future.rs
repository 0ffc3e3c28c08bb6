//! Async calls (feature `async`): a future per call, for tokio or any other executor.
//!
//! A future never spins and never blocks its executor's thread on a reply. When its reply
//! is not there yet it registers its waker with the connection and flags its mailbox
//! [`mailbox::ASYNC`]; the instance that completes such a mailbox rings the connection's
//! *doorbell* (a futex word in the client segment, [`crate::shm::layout::ClientControl`]) —
//! a syscall only when an async waiter sleeps. One doorbell thread per connection sleeps
//! on that word and wakes the futures whose mailboxes are done; every
//! [`mailbox::LIVENESS_CHECK`] without a ring it wakes them all, so each re-checks its
//! deadline and whether its instance is still there.
//!
//! Dropping a future cancels its call like dropping a [`Pending`]: a request not yet taken
//! never runs, and the mailbox comes back (at once, or when the instance has answered).
//!
//! A full ring does not block the executor either: the future tries the ring once, and if
//! it is full waits for the doorbell thread's next pass (a reply, or at most
//! [`mailbox::LIVENESS_CHECK`]) to try again, until the call's deadline.
//!
//! Event loops that are not Rust futures (C, Python's asyncio, libuv) use an *event fd*
//! instead ([`Bus::event_fd`], or one per loop: [`Bus::new_event_fd`]): arm a submitted
//! call with [`Pending::notify_event_fd`] or [`Pending::notify`], poll the fd, and when it
//! is readable, read it and settle the armed calls with [`Pending::try_wait`] (which also
//! ends a call past its deadline or whose instance left). The doorbell thread signals it
//! when an armed call is done, and every liveness period while one is not: an armed call
//! is never forgotten, however long its handler takes.
//!
//! Chosen: the instance rings a futex word, and a thread of ours turns that into wakers or
//! the event fd. An eventfd rung by the instance itself would have to travel through the
//! broker to every instance; a futex word in memory both sides already share needs
//! nothing new, and the thread it takes sleeps.

use std::future::Future;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};

use crate::call::doorbell::{Waiting, Wake};
use crate::call::{CallOptions, Pending, Reply};
use crate::channel::mailbox;
use crate::error::Result;
use crate::session::bus::{Bus, BusInner};
use crate::shm::layout::ChannelSeg;
use crate::shm::sync::Ordering;

impl Bus {
    /// Calls `method` of `service` and awaits the reply: [`Bus::submit`] as a future (one
    /// attempt, no failover). Dropping the future cancels the call.
    pub async fn call_async(
        &self,
        service: &str,
        method: &str,
        payload: &[u8],
        opts: &CallOptions,
    ) -> Result<Reply> {
        // A full ring is waited for here, not inside `submit`: the executor's thread stays
        // free while the instance drains it.
        let start = std::time::Instant::now();
        let pending = loop {
            match self.try_submit(start, service, method, payload, opts)? {
                Some(p) => break p,
                None => {
                    Room {
                        inner: &self.inner,
                        asked: false,
                    }
                    .await
                }
            }
        };
        AsyncReply {
            bus: self,
            pending: Some(pending),
        }
        .await
    }
}

/// Waits for the doorbell thread's next pass (see `AsyncWaiters::room`).
struct Room<'b> {
    inner: &'b Arc<BusInner>,
    asked: bool,
}

impl Future for Room<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.asked {
            return Poll::Ready(());
        }
        self.asked = true;
        start_doorbell_thread(self.inner);
        self.inner
            .async_waiters
            .room
            .lock()
            .push(cx.waker().clone());
        Poll::Pending
    }
}

/// The future of one submitted call.
struct AsyncReply<'b> {
    bus: &'b Bus,
    pending: Option<Pending<'b>>,
}

impl Future for AsyncReply<'_> {
    type Output = Result<Reply>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Reply>> {
        let this = &mut *self;
        let inner = &*this.bus.inner;
        let p = this
            .pending
            .as_mut()
            .expect("an async call polled after it completed");
        let mailbox = p.mailbox();
        let mut out = Vec::new();
        if let Some(r) = p.poll_now(&mut out) {
            if let Some((mb_idx, _, _)) = mailbox {
                inner.async_waiters.waiting.lock().remove(&mb_idx);
            }
            this.pending = None;
            return Poll::Ready(r.map(|info| Reply {
                payload: out,
                instance_id: this.bus.instance_id(info),
            }));
        }
        start_doorbell_thread(&this.bus.inner);
        let armed = mailbox.is_some_and(|(mb_idx, gen, chan)| {
            arm(inner, mb_idx, gen, chan, Wake::Future(cx.waker().clone()))
        });
        if !armed {
            // Done between the look above and the flag: look again at once.
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }
}

impl Drop for AsyncReply<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            if let Some((mb, _, _)) = p.mailbox() {
                self.bus.inner.async_waiters.waiting.lock().remove(&mb);
            }
            drop(p); // cancels the call
        }
    }
}

/// An event fd for one event loop (feature `async`): readable when a call armed with
/// [`Pending::notify`] on it is done, and on every liveness pass
/// ([`mailbox::LIVENESS_CHECK`]) while an armed call is still waiting, so that the loop
/// looks at its deadline and at whether its instance is still there
/// ([`Pending::try_wait`] settles both). Read it (8 bytes) to reset it. Each event loop
/// that shares a connection takes its own ([`Bus::new_event_fd`]): one loop reading a
/// shared fd would swallow the other's wake-ups. Non-blocking, close-on-exec; closed when
/// the last clone is dropped and no call is armed on it any more.
#[derive(Clone)]
pub struct EventFd(Arc<OwnedFd>);

impl EventFd {
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }

    /// Resets the fd (reads its counter); false if it was not readable.
    pub fn clear(&self) -> bool {
        let mut buf = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live buffer from a descriptor we own.
        let n = unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
        n == 8
    }
}

impl Bus {
    /// The connection's own event fd, for event loops that are not Rust futures (C, Python,
    /// libuv): see [`EventFd`]; [`Pending::notify_event_fd`] arms a call on it. Owned by
    /// the connection. One event loop per connection may use it; another loop on the same
    /// connection takes its own with [`Bus::new_event_fd`].
    pub fn event_fd(&self) -> Result<BorrowedFd<'_>> {
        Ok(default_event_fd(&self.inner)?.as_fd())
    }

    /// A new event fd of this connection, for one more event loop.
    pub fn new_event_fd(&self) -> Result<EventFd> {
        let fd = crate::shm::sys::eventfd()?;
        start_doorbell_thread(&self.inner);
        Ok(EventFd(Arc::new(fd)))
    }
}

/// The connection's own event fd, made on first use (and the doorbell thread with it).
fn default_event_fd(inner: &Arc<BusInner>) -> Result<&Arc<OwnedFd>> {
    let w = &inner.async_waiters;
    if w.event_fd.get().is_none() {
        let fd = crate::shm::sys::eventfd()?;
        let _ = w.event_fd.set(Arc::new(fd));
    }
    start_doorbell_thread(inner);
    Ok(w.event_fd.get().expect("set above"))
}

impl Pending<'_> {
    /// Arms this call for the connection's own event fd ([`Bus::event_fd`], created here if
    /// it was not yet): the fd becomes readable once the call is done (at once if it
    /// already is).
    pub fn notify_event_fd(&self) -> Result<()> {
        let fd = default_event_fd(self.bus_arc())?.clone();
        self.arm_fd(fd);
        Ok(())
    }

    /// Arms this call for `fd` (an [`EventFd`] of the same connection).
    pub fn notify(&self, fd: &EventFd) {
        start_doorbell_thread(self.bus_arc());
        self.arm_fd(fd.0.clone());
    }

    fn arm_fd(&self, fd: Arc<OwnedFd>) {
        let Some((mb_idx, gen, chan)) = self.mailbox() else {
            // Already settled: say so at once.
            crate::call::doorbell::signal(&fd);
            return;
        };
        if !arm(
            self.bus_inner(),
            mb_idx,
            gen,
            chan,
            Wake::EventFd(fd.clone()),
        ) {
            crate::call::doorbell::signal(&fd);
        }
    }
}

/// Registers `wake` for mailbox `mb_idx` of generation `gen` (its place in `chan`) and
/// flags the mailbox so that its completion rings the doorbell. False if the mailbox no
/// longer waits (already done): the caller must then wake itself.
fn arm(inner: &BusInner, mb_idx: u32, gen: u32, chan: Arc<ChannelSeg>, wake: Wake) -> bool {
    // Registered before flagged: a completion that follows the flag finds the waiter.
    let waiting = Waiting {
        gen,
        chan: chan.clone(),
        wake,
    };
    inner.async_waiters.waiting.lock().insert(mb_idx, waiting);
    chan.mailbox(mb_idx)
        .is_some_and(|(mb, _)| mailbox::flag_async(mb, gen))
}

fn start_doorbell_thread(inner: &Arc<BusInner>) {
    if inner
        .async_waiters
        .thread_started
        .swap(true, Ordering::Relaxed)
    {
        return;
    }
    let weak = Arc::downgrade(inner);
    let spawned = std::thread::Builder::new()
        .name("aegis-doorbell".into())
        .spawn(move || doorbell_thread(weak));
    if let Err(e) = spawned {
        // Without the thread, futures are still woken every time they are polled again;
        // say so, and let the next future try to start it.
        tracing::warn!("cannot start the doorbell thread: {e}");
        inner
            .async_waiters
            .thread_started
            .store(false, Ordering::Relaxed);
    }
}

/// Sleeps on the doorbell; wakes the futures and signals the event fds whose mailboxes are
/// done. When no ring came for a liveness period, it wakes every future (each re-checks its
/// deadline and instance, and registers again) and signals every event fd with an armed
/// call (whose registrations stay: an event loop re-checks without re-arming). Ends when
/// the connection is gone.
fn doorbell_thread(weak: Weak<BusInner>) {
    let mut rang = true;
    while let Some(inner) = weak.upgrade() {
        let bell = inner.client.doorbell();
        // SYNC POINT: Acquire pairs with the Release increment in `mailbox::complete`.
        let seen = bell.load(Ordering::Acquire);
        let mut futures: Vec<Waker> = Vec::new();
        let mut fds: Vec<Arc<OwnedFd>> = Vec::new();
        inner.async_waiters.waiting.lock().retain(|&mb, w| {
            let done = w
                .chan
                .mailbox(mb)
                .is_none_or(|(m, _)| !mailbox::still_waiting(m, w.gen));
            match &w.wake {
                Wake::Future(w) => {
                    if done || !rang {
                        futures.push(w.clone());
                        return false;
                    }
                    true
                }
                Wake::EventFd(fd) => {
                    if (done || !rang) && !fds.iter().any(|f| Arc::ptr_eq(f, fd)) {
                        fds.push(fd.clone());
                    }
                    !done
                }
            }
        });
        let room = std::mem::take(&mut *inner.async_waiters.room.lock());
        for w in room.into_iter().chain(futures) {
            w.wake();
        }
        for fd in &fds {
            crate::call::doorbell::signal(fd);
        }
        drop(fds);
        let before = std::time::Instant::now();
        let period = crate::channel::wait::recheck(mailbox::LIVENESS_CHECK);
        let _ = crate::shm::sys::futex_wait(bell, seen, Some(period));
        rang = bell.load(Ordering::Relaxed) != seen || before.elapsed() < period;
        drop(inner);
    }
}
