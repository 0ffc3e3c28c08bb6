//! What a connection keeps for its async waiters (feature `async`): who waits for which
//! mailbox, and the event fd. State only, shared by the connection ([`crate::bus`]) and the
//! futures and doorbell thread ([`crate::future`]).

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::AtomicBool;
use std::sync::OnceLock;
use std::task::Waker;

use parking_lot::Mutex;

/// A connection's async waiters: mailbox index -> (generation, who to wake).
#[derive(Default)]
pub(crate) struct AsyncWaiters {
    pub(crate) waiting: Mutex<HashMap<u32, (u32, Wake)>>,
    /// Futures whose instance's ring was full: woken on the doorbell thread's next pass
    /// (a reply rung, or at most [`crate::mailbox::LIVENESS_CHECK`] later) to try again.
    pub(crate) room: Mutex<Vec<Waker>>,
    pub(crate) thread_started: AtomicBool,
    /// The event fd (created on first use).
    pub(crate) event_fd: OnceLock<OwnedFd>,
}

/// Who learns that a mailbox is done.
pub(crate) enum Wake {
    Future(Waker),
    EventFd,
}

impl AsyncWaiters {
    pub(crate) fn signal_event_fd(&self) {
        if let Some(fd) = self.event_fd.get() {
            let _ = crate::sys::eventfd_signal(fd);
        }
    }
}
