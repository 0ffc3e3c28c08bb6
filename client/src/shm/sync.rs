//! Atomics used by the shared-memory types, swapped for loom's under `cfg(loom)` so the
//! lock-free core (ring, mailbox state machine) can be model-checked in process.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicU32, AtomicU64};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicU32, AtomicU64};

pub(crate) use std::sync::atomic::Ordering;

/// Spin-loop hint (a no-op yield to the loom scheduler under loom).
#[inline]
pub(crate) fn spin_hint() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    std::hint::spin_loop();
}
