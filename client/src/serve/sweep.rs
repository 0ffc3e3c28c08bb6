//! The instance side of the channels: the channels a serving process was handed for one
//! instance, and how each serving thread sweeps them.
//!
//! A serving thread takes the doorbell's hint bits ([`Doorbell::take`]), looks once at
//! every channel whose bit came and queues those with a request waiting, then serves its
//! queue one request per channel per turn (a channel with more goes to the back). Only
//! when its queue is empty does it take the bits again. So a flood on one channel delays
//! another channel's request by at most one request per channel. After a look that
//! queued several channels it hands their bits back to the doorbell, so that an idle
//! serving thread can help. At least every [`FULL_SWEEP`] it looks at every channel whatever the
//! bits say (a hostile caller clearing them delays a take by at most that).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::RwLock;

use crate::channel::ring::{Doorbell, FULL_SWEEP, SCAN_MAX};
use crate::shm::layout::ChannelSeg;

/// One caller's channel to this instance (which caller sent a request is the channel it
/// came through, not what it says).
pub(crate) struct Chan {
    pub seg: ChannelSeg,
    pub bit: u64,
    /// The broker said the channel closed (its caller left, or the instance did): the
    /// replies in it nobody will read (their reply heap blocks are freed at once).
    pub closed: AtomicBool,
    /// When and why the broker last refused this channel's reply heap (its caller's uid
    /// was over its quota): asked again only after [`REPLY_HEAP_RETRY`], so a caller over
    /// its quota does not cost the serving thread a broker round trip per large reply.
    pub reply_heap_refused: parking_lot::Mutex<Option<(std::time::Instant, String)>>,
    /// Its reply heap's descriptor and the epoch of the broker it was handed to, kept until
    /// the caller has surely fetched the heap (a reply there was read): should that broker
    /// die first, the next one is handed the heap again under the channel's token
    /// (`InstanceInner::hand_reply_heaps_again`).
    pub reply_heap_fd: parking_lot::Mutex<Option<(std::os::fd::OwnedFd, u64)>>,
    /// Held while making its reply heap (serving threads may meet its first large reply
    /// at once).
    pub reply_heap_maker: parking_lot::Mutex<()>,
}

/// How long a refused reply heap is not asked for again.
pub(crate) const REPLY_HEAP_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

impl Chan {
    pub fn new(seg: ChannelSeg) -> Chan {
        Chan {
            bit: Doorbell::bit(seg.id),
            seg,
            closed: AtomicBool::new(false),
            reply_heap_refused: parking_lot::Mutex::new(None),
            reply_heap_fd: parking_lot::Mutex::new(None),
            reply_heap_maker: parking_lot::Mutex::new(()),
        }
    }

    /// Whether the broker said this channel closed.
    pub fn is_closed(&self) -> bool {
        // Relaxed: a stale `false` only keeps a reply block until the next look.
        self.closed.load(Ordering::Relaxed)
    }
}

/// The channels of one instance, shared by its serving threads.
#[derive(Default)]
pub(crate) struct Channels {
    list: RwLock<Arc<Vec<Arc<Chan>>>>,
    version: AtomicU64,
}

impl Channels {
    /// The channels now.
    pub fn list(&self) -> Arc<Vec<Arc<Chan>>> {
        self.list.read().clone()
    }

    /// Channel `id` of broker run `epoch`, if it is in the list.
    pub fn find(&self, id: u64, epoch: u64) -> Option<Arc<Chan>> {
        let l = self.list.read();
        l.iter()
            .find(|c| c.seg.id == id && c.seg.epoch == epoch)
            .cloned()
    }

    /// Adds `add` and drops the channels of broker run `epoch` whose ids are in `gone`;
    /// tells callers through `bell` whether the serving threads now scan every channel
    /// (at most [`SCAN_MAX`]): "no" before the threads learn of the new list (each then
    /// looks at every channel once), "yes" after.
    pub fn update(&self, add: Vec<Arc<Chan>>, gone: &[u64], epoch: u64, bell: Doorbell<'_>) {
        if add.is_empty() && gone.is_empty() {
            return;
        }
        let mut l = self.list.write();
        let mut v: Vec<Arc<Chan>> = Vec::with_capacity(l.len() + add.len());
        for c in l.iter() {
            if c.seg.epoch == epoch && gone.contains(&c.seg.id) {
                c.closed.store(true, Ordering::Relaxed);
            } else {
                v.push(c.clone());
            }
        }
        v.extend(add);
        let scan = v.len() <= SCAN_MAX;
        if !scan {
            bell.set_scanning(false);
        }
        *l = Arc::new(v);
        // Release: pairs with the Acquire in `Sweep::refresh` (the list is behind a lock
        // anyway; this only tells a thread to look).
        self.version.fetch_add(1, Ordering::Release);
        if scan {
            bell.set_scanning(true);
        }
    }

    /// Whether the list changed since version `seen`.
    pub fn changed_since(&self, seen: u64) -> bool {
        self.version.load(Ordering::Relaxed) != seen
    }

    /// Drops the channels a previous broker made (of another epoch than `current`) whose
    /// callers have moved on ([`crate::shm::layout::ChannelSeg::moved_on`]) and whose rings
    /// are empty: no broker will ever say they closed, so without this each would stay
    /// mapped until the instance exits. Their unread replies are freed as for any closed
    /// channel.
    pub fn drop_moved_on(&self, current: u64, bell: Doorbell<'_>) {
        let gone: Vec<(u64, u64)> = self
            .list
            .read()
            .iter()
            .filter(|c| c.seg.epoch != current && c.seg.moved_on() && c.seg.ring().is_empty())
            .map(|c| (c.seg.id, c.seg.epoch))
            .collect();
        for (id, epoch) in gone {
            self.update(Vec::new(), &[id], epoch, bell);
        }
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

thread_local! {
    /// When this thread last published a reply (its duration histogram read the clock),
    /// taken by its next sweep for the full-sweep check in place of a clock read of its
    /// own: that read would sit between noticing a request and taking it. Taken once, so
    /// a sweep uses it only right after the reply; any later sweep reads the clock.
    static LAST_REPLY_AT: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
}

/// Tells this thread's next sweep the time a reply was just published.
pub(crate) fn replied_at(t: Instant) {
    LAST_REPLY_AT.set(Some(t));
}

/// One serving thread's view of the channels and where its sweep stands.
pub(crate) struct Sweep {
    chans: Arc<Vec<Arc<Chan>>>,
    version: u64,
    /// Channels (indices into `chans`) seen with a request waiting, in turn.
    ready: VecDeque<usize>,
    next_full: Instant,
    /// The next look is at every channel, whatever the time (the list changed).
    full_due: bool,
    /// At most [`SCAN_MAX`] channels: every look is at all of them (the doorbell's bits
    /// and the full-sweep clock are not needed).
    scan: bool,
    /// The channels (indices into `chans`) of each hint bit: a look for one bit reads the
    /// rings of its channels only, not a word of every channel. (With a thousand channels,
    /// in the stress scenario, the sweep took 38–44 % of an instance's CPU samples walking
    /// all of them for each look, 21–29 % with this; most of the rest is the full sweep.)
    by_bit: Vec<Vec<u32>>,
}

impl Default for Sweep {
    fn default() -> Sweep {
        Sweep {
            chans: Arc::default(),
            version: u64::MAX,
            ready: VecDeque::new(),
            next_full: Instant::now(),
            full_due: true,
            scan: false,
            by_bit: Vec::new(),
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
        self.scan = self.chans.len() <= SCAN_MAX;
        self.by_bit = index_by_bit(self.chans.iter().map(|c| c.bit));
        self.ready.clear();
        // New channels may have been rung before we knew them, and callers may have set no
        // bit while we scanned: look at all of them now.
        self.full_due = true;
    }

    /// Whether a look now would find a request: with the list changed since this thread
    /// last took it, yes (it must look at the new list); when scanning, whether any
    /// channel has one; else nothing to go by but the doorbell.
    pub fn worth_a_look(&self, table: &Channels) -> bool {
        table.changed_since(self.version)
            || (self.scan && self.chans.iter().any(|c| c.seg.ring().has_message()))
    }

    /// Channel `i` of this thread's list (an index [`Sweep::next`] returned).
    pub fn chan(&self, i: usize) -> &Arc<Chan> {
        &self.chans[i]
    }

    /// The next channel with a request waiting, in turn (its index in this thread's list:
    /// no reference count to move per request); `None` when no channel this thread should
    /// look at has one. Its request may still be taken by another serving thread first.
    pub fn next(&mut self, bell: Doorbell<'_>) -> Option<usize> {
        loop {
            while let Some(i) = self.ready.pop_front() {
                let c = &self.chans[i];
                let ring = c.seg.ring();
                if !ring.has_message() {
                    continue;
                }
                if ring.has_message_after() {
                    // More after this one: its next turn is after the others'.
                    self.ready.push_back(i);
                }
                return Some(i);
            }
            let mut bits = bell.take();
            if self.scan || std::mem::take(&mut self.full_due) {
                bits = u64::MAX;
            } else {
                // The reply this thread just published read the clock: no second read.
                let now = LAST_REPLY_AT.take().unwrap_or_else(Instant::now);
                if now >= self.next_full {
                    bits = u64::MAX;
                    self.next_full = now + FULL_SWEEP;
                }
            }
            if bits == 0 {
                return None;
            }
            if bits == u64::MAX {
                for (i, c) in self.chans.iter().enumerate() {
                    if c.seg.ring().has_message() {
                        self.ready.push_back(i);
                    }
                }
            } else {
                for i in hinted(&self.by_bit, bits) {
                    if self.chans[i].seg.ring().has_message() {
                        self.ready.push_back(i);
                    }
                }
            }
            if self.ready.len() > 1 {
                // An idle serving thread may help with all but the first.
                let bits = self
                    .ready
                    .iter()
                    .skip(1)
                    .fold(0, |b, &j| b | self.chans[j].bit);
                bell.put_back(bits);
            }
            if self.ready.is_empty() {
                return None;
            }
        }
    }
}

/// For each of the 64 hint bits, the indices of the channels (in the order of `bits`, one
/// hint bit each) that ring it.
fn index_by_bit(bits: impl Iterator<Item = u64>) -> Vec<Vec<u32>> {
    let mut by_bit = vec![Vec::new(); 64];
    for (i, bit) in bits.enumerate() {
        // One bit of 64 (`Doorbell::bit`): its index is below 64 (0 for a zero word).
        by_bit[bit.trailing_zeros() as usize % 64].push(i as u32);
    }
    by_bit
}

/// The indices of the channels whose hint bits are set in `bits`.
fn hinted(by_bit: &[Vec<u32>], bits: u64) -> impl Iterator<Item = usize> + '_ {
    (0..64usize)
        .filter(move |b| bits >> b & 1 == 1)
        .flat_map(move |b| by_bit.get(b).into_iter().flatten().map(|&i| i as usize))
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_look_for_some_bits_finds_exactly_the_channels_that_ring_them() {
        // Channel ids 0..200 as `Chans` in a list (ids 64 apart share a bit).
        let ids: Vec<u64> = (0..200).collect();
        let by_bit = index_by_bit(ids.iter().map(|&id| Doorbell::bit(id)));
        let bits = Doorbell::bit(3) | Doorbell::bit(60);
        let mut got: Vec<usize> = hinted(&by_bit, bits).collect();
        got.sort_unstable();
        let want: Vec<usize> = (0..200).filter(|i| i % 64 == 3 || i % 64 == 60).collect();
        assert_eq!(got, want);
        assert_eq!(hinted(&by_bit, 0).count(), 0);
        assert_eq!(hinted(&by_bit, u64::MAX).count(), 200, "every channel once");
    }
}
