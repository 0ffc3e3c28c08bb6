//! A thread's last targets: the segments of the instances its last blocking calls on one
//! connection went to, so that the next call to one of them skips the connection's segment
//! map. Looking a segment up there costs four locked instructions (the map's `RwLock`
//! taken and let go, the segment's `Arc` counted up and down), each waiting for the
//! thread's earlier stores to drain; here the `Arc` moves out of a thread-local list for
//! the call and back in after it, with no atomic instruction at all.
//!
//! A segment is used again only while `BusInner::instances_gen` has not moved since it was
//! looked up: the connection bumps it when a segment leaves its map (the instance left, or
//! its channel was replaced) and when a broker restart swaps the session (the checks a
//! call makes of a segment's channel against the current broker run again: see
//! `BusInner::open_target`). Relaxed is enough on both sides: the `Arc` keeps the mapping
//! alive whatever the word says, and a call that reads the word just before a change uses
//! the segment that a call looking it up just before the change would have used, with the
//! same outcome (its request goes where that call's would; the call's own checks of the
//! reply and of its instance are the same either way).
//!
//! A thread holds segments of one connection only, at most [`MAX_TARGETS`] of them (the
//! latest used); they go when it calls through another connection, when a change of the
//! map is seen by its next call, when the connection is dropped on this thread, and when
//! the thread exits. Until then a segment the map let go of stays mapped (its channel's
//! instance learns that this caller let go of it only then: `ChannelSeg::moved_on`).

use std::cell::RefCell;
use std::sync::Arc;

use crate::session::bus::CallInfo;
use crate::shm::layout::InstanceSeg;

/// Segments a thread keeps: enough for a serial caller going round the instances of a
/// service of up to this many (a list used round-robin by more would miss every time).
const MAX_TARGETS: usize = 8;

struct Targets {
    /// The connection (`BusInner::id`) and its `instances_gen` the segments belong to.
    bus: u64,
    gen: u64,
    /// Oldest first.
    segs: Vec<Arc<InstanceSeg>>,
}

thread_local! {
    static TARGETS: RefCell<Targets> = const {
        RefCell::new(Targets {
            bus: u64::MAX,
            gen: 0,
            segs: Vec::new(),
        })
    };
}

/// The segment of `target`, if this thread kept it on connection `bus` and `gen` (the
/// connection's `instances_gen`, read by this call before anything else) is the one it was
/// kept under.
pub(crate) fn take(bus: u64, gen: u64, target: CallInfo) -> Option<Arc<InstanceSeg>> {
    let mut gone = Vec::new();
    let found = TARGETS
        .try_with(|t| {
            let mut t = t.try_borrow_mut().ok()?;
            if t.bus != bus {
                return None;
            }
            if t.gen != gen {
                // The map changed: what this thread kept goes now, not at its next `keep`
                // (a call whose reply is read in place keeps nothing).
                gone = std::mem::take(&mut t.segs);
                return None;
            }
            let i = t
                .segs
                .iter()
                .position(|s| s.index == target.instance && s.incarnation == target.incarnation)?;
            Some(t.segs.remove(i))
        })
        .ok()
        .flatten();
    drop(gone);
    found
}

/// Keeps `seg` (looked up on connection `bus` after reading `gen`) for this thread's next
/// call, unless `now` (`instances_gen` read again) says the map changed since.
pub(crate) fn keep(bus: u64, gen: u64, now: u64, seg: Arc<InstanceSeg>) {
    let mut gone = Vec::new();
    let _ = TARGETS.try_with(|t| {
        let Ok(mut t) = t.try_borrow_mut() else {
            return;
        };
        if t.bus != bus || t.gen != now {
            gone = std::mem::take(&mut t.segs);
            t.bus = bus;
            t.gen = now;
        }
        if gen == now {
            if t.segs.len() == MAX_TARGETS {
                gone.push(t.segs.remove(0));
            }
            t.segs.push(seg);
        }
    });
    // Dropped outside the borrow: unmapping runs no code of ours that looks here, but
    // nothing needs to hold the cell while it happens.
    drop(gone);
}

/// Lets go of this thread's segments of connection `bus` (it is being dropped).
pub(crate) fn forget(bus: u64) {
    let gone = TARGETS
        .try_with(|t| {
            let mut t = t.try_borrow_mut().ok()?;
            (t.bus == bus).then(|| std::mem::take(&mut t.segs))
        })
        .ok()
        .flatten();
    drop(gone);
}
