//! Async calls (feature `async`): a future per call, for tokio or any other executor.
//!
//! A future never spins and never blocks its executor's thread on a reply. When its reply
//! is not there yet it registers its waker with the connection and flags its mailbox
//! [`mailbox::ASYNC`]; the instance that completes such a mailbox wakes its answer word
//! (a syscall only when the flag is set). One *doorbell thread* per connection sleeps on
//! the answer words of all the mailboxes its async waiters wait for (`futex_waitv`) and
//! wakes the futures whose mailboxes are done; every [`mailbox::LIVENESS_CHECK`] it wakes
//! them all, so each re-checks its deadline and whether its instance is still there.
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
//! Chosen: the instance wakes a futex word it alone writes (the answer word), and a thread
//! of ours turns that into wakers or the event fd. An eventfd rung by the instance itself
//! would have to travel through the broker to every instance, and a caller could make its
//! instances' `write(2)` block on it (clear `O_NONBLOCK`, fill the counter). One doorbell
//! word per connection in the caller's client segment (until layout 12) let every instance
//! the caller called write it, and so wake the thread or delay it for calls to others.

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
use crate::shm::sync::{AtomicU32, Ordering};
use crate::shm::sys;

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
    let waits = chan
        .mailbox(mb_idx)
        .is_some_and(|(mb, _)| mailbox::flag_async(mb, gen));
    if waits {
        // The doorbell thread sleeps on the answer words it knew of: add this one.
        inner.async_waiters.changed();
    }
    waits
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

/// Sleeps on the answer words of the waiting mailboxes (and on `changed`, for new ones);
/// wakes the futures and signals the event fds whose mailboxes are done. Every liveness
/// period it wakes every future (each re-checks its deadline and instance, and registers
/// again) and signals every event fd with an armed call (whose registrations stay: an
/// event loop re-checks without re-arming), however often it was woken meanwhile. Ends
/// when the connection is gone.
///
/// Each answer word is written by the one instance whose channel holds that mailbox, so
/// an instance can wake this thread only about its own calls (a spurious wake-up: the
/// thread looks and sleeps again) and can delay nobody's. At most
/// [`sys::FUTEX_WAITV_MAX`] words are slept on; with more mailboxes waiting, the thread
/// looks at them all every [`OVERFLOW_PASS`] instead.
fn doorbell_thread(weak: Weak<BusInner>) {
    let mut last_pass = std::time::Instant::now();
    let mut waitv_works = true;
    while let Some(inner) = weak.upgrade() {
        let w = &inner.async_waiters;
        // SYNC POINT: Acquire pairs with the Release bump in `AsyncWaiters::changed`.
        let changed = w.changed.load(Ordering::Acquire);
        let period = crate::channel::wait::recheck(mailbox::LIVENESS_CHECK);
        let pass = last_pass.elapsed() >= period;
        if pass {
            last_pass = std::time::Instant::now();
        }
        let mut futures: Vec<Waker> = Vec::new();
        let mut fds: Vec<Arc<OwnedFd>> = Vec::new();
        // (channel, mailbox, the answer word as read before the look at it)
        let mut words: Vec<(Arc<ChannelSeg>, u32, u32)> = Vec::new();
        let mut overflow = false;
        w.waiting.lock().retain(|&mb, wt| {
            let m = wt.chan.mailbox(mb);
            // SYNC POINT: Acquire pairs with the instance's Release store of READY in
            // `mailbox::complete`. Read before the look below: a READY stored after it
            // changes the word, and the sleep on this value returns at once.
            let seen = m.map(|(m, _)| m.ans.state.load(Ordering::Acquire));
            let done = m.is_none_or(|(m, _)| !mailbox::still_waiting(m, wt.gen));
            let keep = match &wt.wake {
                Wake::Future(f) => {
                    if done || pass {
                        futures.push(f.clone());
                        return false;
                    }
                    true
                }
                Wake::EventFd(fd) => {
                    if (done || pass) && !fds.iter().any(|f| Arc::ptr_eq(f, fd)) {
                        fds.push(fd.clone());
                    }
                    !done
                }
            };
            if let (true, Some(seen)) = (keep, seen) {
                if words.len() < sys::FUTEX_WAITV_MAX - 1 {
                    words.push((wt.chan.clone(), mb, seen));
                } else {
                    overflow = true;
                }
            }
            keep
        });
        let room = std::mem::take(&mut *w.room.lock());
        for f in room.into_iter().chain(futures) {
            f.wake();
        }
        for fd in &fds {
            crate::call::doorbell::signal(fd);
        }
        drop(fds);
        let until_pass = period.saturating_sub(last_pass.elapsed());
        let sleep = if overflow || !waitv_works {
            until_pass.min(OVERFLOW_PASS)
        } else {
            until_pass
        };
        let mut sleep_on: Vec<(&AtomicU32, u32)> = vec![(&w.changed, changed)];
        sleep_on.extend(
            words.iter().filter_map(|(chan, mb, seen)| {
                chan.mailbox(*mb).map(|(m, _)| (&m.ans.state, *seen))
            }),
        );
        if waitv_works {
            if let Err(e) = sys::futex_waitv(&sleep_on, sleep) {
                tracing::warn!(
                    "futex_waitv: {e}; async calls are looked at every {OVERFLOW_PASS:?} instead"
                );
                waitv_works = false;
            }
        } else {
            let _ = sys::futex_wait(&w.changed, changed, Some(sleep));
        }
        drop(sleep_on);
        drop(words);
        drop(inner);
    }
}

/// How often the doorbell thread looks at every waiting mailbox when it cannot sleep on
/// all their answer words (more than [`sys::FUTEX_WAITV_MAX`] of them, or a kernel
/// without `futex_waitv`).
pub const OVERFLOW_PASS: std::time::Duration = std::time::Duration::from_micros(200);
