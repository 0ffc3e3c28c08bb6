//! What a connection keeps for its async waiters (feature `async`): who waits for which
//! mailbox, and the event fds. State only, shared by the connection ([`crate::session::bus`]) and the
//! futures and doorbell thread ([`crate::call::future`]).

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::task::Waker;

use parking_lot::Mutex;

use crate::shm::layout::ChannelSeg;
use crate::shm::sync::{AtomicU32, Ordering};

/// A connection's async waiters: mailbox index -> who waits for it.
#[derive(Default)]
pub(crate) struct AsyncWaiters {
    pub(crate) waiting: Mutex<HashMap<u32, Waiting>>,
    /// Futures whose instance's ring was full: woken on the doorbell thread's next pass
    /// (a reply rung, or at most [`crate::channel::mailbox::LIVENESS_CHECK`] later) to try again.
    pub(crate) room: Mutex<Vec<Waker>>,
    pub(crate) thread_started: AtomicBool,
    /// Bumped (and woken) when a mailbox is flagged for an async waiter: the doorbell
    /// thread sleeps on it beside the waiting mailboxes' answer words, so that it adds a
    /// new one at once. Process memory: no peer can touch it.
    pub(crate) changed: AtomicU32,
    /// The connection's own event fd ([`crate::Bus::event_fd`], created on first use).
    pub(crate) event_fd: OnceLock<Arc<OwnedFd>>,
}

/// A call an async waiter waits for: its mailbox's generation, the channel the mailbox
/// lies in, and who to wake.
pub(crate) struct Waiting {
    pub(crate) gen: u32,
    pub(crate) chan: Arc<ChannelSeg>,
    pub(crate) wake: Wake,
}

/// Who learns that a mailbox is done.
pub(crate) enum Wake {
    /// A Rust future: woken once, it polls again and registers anew if still waiting.
    Future(Waker),
    /// An event loop's eventfd: signalled when the call is done, and on every liveness
    /// pass while it is not (so the loop can look at deadlines and departed instances);
    /// the registration stays until the call is done or its `Pending` is settled.
    EventFd(Arc<OwnedFd>),
}

impl AsyncWaiters {
    /// Tells the doorbell thread that the waiting set changed (after the change).
    pub(crate) fn changed(&self) {
        // SYNC POINT: Release pairs with the doorbell thread's Acquire load of `changed`
        // before it looks at the waiting set: a thread that sleeps on the value from
        // before this bump returns at once, one that read it after sees the change.
        self.changed.fetch_add(1, Ordering::Release);
        let _ = crate::shm::sys::futex_wake(&self.changed, 1);
    }
}

pub(crate) fn signal(fd: &OwnedFd) {
    // EAGAIN (the counter is at its maximum) still leaves the fd readable: nothing lost.
    let _ = crate::shm::sys::eventfd_signal(fd);
}
