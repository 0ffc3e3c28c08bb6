//! The shared segment: spin seats, writable by every member. (It held the bus's
//! round-robin counters until stop 38; each connection keeps its own now.)

use std::mem::size_of;
use std::os::fd::OwnedFd;

use super::*;
use crate::shm::sync::AtomicU32;

// Shared (writable by all members) segment.

/// One spin seat (see [`crate::channel::wait`]): the pid of the process whose thread spins in it, or
/// 0 when free. Each on its own cache line, so a holder's stores never disturb another's.
#[repr(C, align(64))]
pub struct SpinSeat {
    pub holder: AtomicU32,
}
// SAFETY: repr(C), one atomic.
unsafe impl ShmSafe for SpinSeat {}

/// Spin seats in the shared segment: at most this many threads of the whole bus spin at once
/// (each process uses as many as it has cores, up to this).
pub const SPIN_SEATS: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedLayout {
    pub max_services: u32,
}

impl SharedLayout {
    /// After the 64-byte segment header.
    const SEATS: usize = 64;
    pub fn total_size(&self) -> usize {
        round_up(Self::SEATS + SPIN_SEATS * size_of::<SpinSeat>(), PAGE)
    }
    pub fn params(&self) -> [u64; 4] {
        [self.max_services as u64, 0, 0, 0]
    }
}

pub struct SharedView {
    map: Mapping,
}

impl SharedView {
    /// Maps the shared segment a broker handed over in its `Welcome`, of the size its
    /// registry's capacities give (`max_services`, read from the sealed registry).
    ///
    /// Its header is not read: every member maps this segment writable, so any of them can
    /// have rewritten it (with a bad magic or epoch there, every later connection failed to
    /// open it: `tests/isolation.rs`, `a_member_scribbling_the_shared_segment_…`). What
    /// identifies it is where it came from (the broker, over the control socket, in the
    /// reply that also names the registry) and its size, sealed against change.
    pub fn open(fd: &OwnedFd, max_services: u32) -> Result<SharedView, LayoutError> {
        let size = SharedLayout { max_services }.total_size();
        let map = Mapping::open_sized(fd, SegmentKind::Shared, true, size)?;
        Ok(SharedView { map })
    }
    /// The bus's spin seats.
    pub fn spin_seats(&self) -> &[SpinSeat] {
        let first: &SpinSeat = self.map.at(SharedLayout::SEATS);
        // SAFETY: SPIN_SEATS consecutive seats start at SEATS, inside the mapping (the
        // layout's total size covers them and `at` checked the first); SpinSeat is ShmSafe.
        unsafe { std::slice::from_raw_parts(first, SPIN_SEATS) }
    }
}

#[cfg(not(loom))]
const _: () = {
    assert!(size_of::<SpinSeat>() == 64);
};
