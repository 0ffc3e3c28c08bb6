//! The instance side of the channels: the channels a serving process was handed for one
//! instance, and how each serving thread sweeps them.
//!
//! A serving thread takes the doorbell's hint bits ([`Doorbell::take`]) into its own
//! `pending` set, then looks at the channels whose bit is pending, from where its last
//! take left off, and takes one request from the first that has one. Bits it did not get
//! to go back to the doorbell for the other serving threads. So a flood on one channel
//! delays another channel's request by at most one request per channel; and at least
//! every [`FULL_SWEEP`] every channel is looked at whatever the bits say (a hostile
//! caller clearing them delays a take by at most that).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::RwLock;

use crate::channel::ring::{Doorbell, FULL_SWEEP};
use crate::shm::layout::{ChannelSeg, ClientSeg};

/// One caller's channel to this instance, with the caller's segment its replies go to
/// (which caller sent a request is the channel it came through, not what it says).
pub(crate) struct Chan {
    pub seg: ChannelSeg,
    pub client: Arc<ClientSeg>,
    pub bit: u64,
}

/// The channels of one instance, shared by its serving threads.
#[derive(Default)]
pub(crate) struct Channels {
    list: RwLock<Arc<Vec<Arc<Chan>>>>,
    version: AtomicU64,
}

impl Channels {
    /// Adds `add` and drops the channels of broker run `epoch` whose ids are in `gone`.
    pub fn update(&self, add: Vec<Arc<Chan>>, gone: &[u64], epoch: u64) {
        if add.is_empty() && gone.is_empty() {
            return;
        }
        let mut l = self.list.write();
        let mut v: Vec<Arc<Chan>> = l
            .iter()
            .filter(|c| !(c.seg.epoch == epoch && gone.contains(&c.seg.id)))
            .cloned()
            .collect();
        v.extend(add);
        *l = Arc::new(v);
        // Release: pairs with the Acquire in `Sweep::refresh` (the list is behind a lock
        // anyway; this only tells a thread to look).
        self.version.fetch_add(1, Ordering::Release);
    }

    /// Requests waiting in all channels.
    pub fn queued(&self) -> u64 {
        self.list
            .read()
            .iter()
            .map(|c| c.seg.ring().len())
            .fold(0, u64::saturating_add)
    }
}

/// One serving thread's view of the channels and where its sweep stands.
pub(crate) struct Sweep {
    chans: Arc<Vec<Arc<Chan>>>,
    version: u64,
    /// Bits several channels share (more than 64 channels): never dropped after a take.
    shared: u64,
    pending: u64,
    cursor: usize,
    next_full: Instant,
}

impl Default for Sweep {
    fn default() -> Sweep {
        Sweep {
            chans: Arc::default(),
            version: u64::MAX,
            shared: 0,
            pending: 0,
            cursor: 0,
            next_full: Instant::now(),
        }
    }
}

impl Sweep {
    /// Picks up a changed channel list.
    pub fn refresh(&mut self, table: &Channels) {
        let v = table.version.load(Ordering::Acquire);
        if v == self.version {
            return;
        }
        self.version = v;
        self.chans = table.list.read().clone();
        let mut seen = 0u64;
        self.shared = 0;
        for c in self.chans.iter() {
            self.shared |= seen & c.bit;
            seen |= c.bit;
        }
        // New channels may have been rung before we knew them.
        self.pending = u64::MAX;
    }

    /// The next channel with a request waiting, looked at in turn; `None` when no channel
    /// this thread should look at has one. Its request may still be taken by another
    /// serving thread first.
    pub fn next(&mut self, bell: Doorbell<'_>) -> Option<Arc<Chan>> {
        self.pending |= bell.take();
        if self.pending != u64::MAX {
            let now = Instant::now();
            if now >= self.next_full {
                self.pending = u64::MAX;
                self.next_full = now + FULL_SWEEP;
            }
        }
        let n = self.chans.len();
        if self.pending == 0 || n == 0 {
            self.pending = 0;
            return None;
        }
        for k in 0..n {
            let i = (self.cursor + k) % n;
            let c = &self.chans[i];
            if self.pending & c.bit == 0 || !c.seg.ring().has_message() {
                continue;
            }
            self.cursor = i + 1;
            let mut rest = self.pending;
            // Its bit stays when the channel may hold more, or other channels share it.
            if c.bit & self.shared == 0 && c.seg.ring().len() <= 1 {
                rest &= !c.bit;
            }
            self.pending = 0;
            if rest != 0 {
                bell.put_back(rest);
            }
            return Some(c.clone());
        }
        self.pending = 0;
        None
    }
}
