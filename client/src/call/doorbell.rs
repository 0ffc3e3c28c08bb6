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

/// A connection's async waiters: mailbox index -> who waits for it.
#[derive(Default)]
pub(crate) struct AsyncWaiters {
    pub(crate) waiting: Mutex<HashMap<u32, Waiting>>,
    /// Futures whose instance's ring was full: woken on the doorbell thread's next pass
    /// (a reply rung, or at most [`crate::channel::mailbox::LIVENESS_CHECK`] later) to try again.
    pub(crate) room: Mutex<Vec<Waker>>,
    pub(crate) thread_started: AtomicBool,
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

pub(crate) fn signal(fd: &OwnedFd) {
    // EAGAIN (the counter is at its maximum) still leaves the fd readable: nothing lost.
    let _ = crate::shm::sys::eventfd_signal(fd);
}
