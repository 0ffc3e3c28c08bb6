//! A connection's reply mailboxes: the free list, each mailbox's next generation (kept
//! privately, so a peer cannot steer them), and the mailboxes quarantined after a call
//! timed out while its instance was running it.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU32 as StdAtomicU32, AtomicUsize};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use parking_lot::Mutex;

use crate::channel::mailbox;
use crate::shm::layout::ChannelSeg;
use crate::shm::sys;

/// A mailbox whose call timed out while the instance was running it.
struct Quarantined {
    /// The channel the call went through (where its mailbox lies).
    chan: Arc<ChannelSeg>,
    index: u32,
    gen: u32,
    /// Request heap block to free once the late reply lands.
    heap: Option<(u64, u64)>,
    since: Instant,
    /// The process that took the request, as `(pid, start time)`: while it lives its reply
    /// may still land, so the mailbox stays quarantined; once it is gone, it comes back at
    /// once. `None`: unknown (another pid namespace): [`QUARANTINE_EXPIRY`] applies.
    taker: Option<(u32, u64)>,
}

/// How many recently freed mailboxes a serial caller cycles through (see [`MailboxPool`]).
const RECENT: usize = 16;

/// Recently freed mailboxes are kept by the channel they were used in, in this many
/// buckets (channel id modulo `BUCKETS`).
const BUCKETS: usize = 8;

/// How long a mailbox whose taker is unknown waits in quarantine for a late reply before
/// it is recycled (a taker known to be alive keeps it as long as it lives).
const QUARANTINE_EXPIRY: Duration = Duration::from_secs(60);

/// How often quarantined mailboxes' takers are checked for having exited.
const TAKER_CHECK: Duration = Duration::from_millis(5);

/// Free list of this connection's mailboxes, their generations (kept privately, so a
/// peer cannot steer them), and the mailboxes quarantined after a timeout.
///
/// A connection making one call at a time cycles through its [`RECENT`] most recently
/// freed mailboxes, oldest first. Handing out the mailbox just freed (a stack) costs every
/// call: the reply lines the caller has just read sit in its cache, and the instance's
/// next reply into them first has to take them back. Cycling through all of them (a
/// queue) touches every mailbox page, each staying resident in the caller and in every
/// instance that replied into it. Measured on the CI machine: `cargo bench --bench
/// call_rtt`, spin, 1 KiB, p50 1.66–1.73 µs with the last one, 1.57–1.58 µs with 16,
/// 1.51–1.58 µs with all 128 (4: no better than 1); `aegisctl bench --spawn 5 --scenario
/// stress --duration 60` p99.9 2.0 ms with the last one, 2.0 ms with 16, 99 ms with all
/// 128 (their first touches), and PSS 129, 185 and 630 MB.
pub(crate) struct MailboxPool {
    free: ArrayQueue<u32>,
    /// The mailboxes freed last, up to [`RECENT`] in all, by the channel they were used in
    /// (a bucket per channel id modulo [`BUCKETS`]), oldest first in each: a connection
    /// making one call at a time cycles through these few rather than all of them, and a
    /// call to an instance takes one last used with that instance. A mailbox's place is in
    /// the channel of each call it serves, so this bounds the places a serial caller
    /// touches to about [`RECENT`] however many instances it calls (round-robin over 5
    /// instances with one queue: 16 indices × 5 channels = 80 places).
    recent: [ArrayQueue<u32>; BUCKETS],
    /// How many mailboxes `recent` holds (more for a moment while a `put` races). It and
    /// `evict` only steer which mailbox comes next (Relaxed): the queues carry the indices.
    recent_held: AtomicUsize,
    /// The bucket a `put` over the limit evicts from next.
    evict: AtomicUsize,
    gens: Box<[StdAtomicU32]>,
    quarantine: Mutex<(Vec<Quarantined>, Option<Instant>)>,
    quarantined: AtomicUsize,
}

impl MailboxPool {
    pub(crate) fn new(n: u32) -> MailboxPool {
        let free = ArrayQueue::new(n as usize);
        for i in 0..n {
            let _ = free.push(i);
        }
        MailboxPool {
            free,
            recent: std::array::from_fn(|_| ArrayQueue::new(RECENT)),
            recent_held: AtomicUsize::new(0),
            evict: AtomicUsize::new(0),
            gens: (0..n).map(|_| StdAtomicU32::new(0)).collect(),
            quarantine: Mutex::new((Vec::new(), None)),
            quarantined: AtomicUsize::new(0),
        }
    }

    /// A free mailbox for a call through channel `chan`, and its next generation.
    pub(crate) fn acquire(&self, chan: u64) -> Option<(u32, u32)> {
        self.reclaim_if_any();
        let mine = &self.recent[chan as usize % BUCKETS];
        // Any queue may be emptied by another thread between the check and the pop; the
        // last resort takes a recent mailbox of another channel.
        let i = if self.recent_held.load(Relaxed) >= RECENT {
            self.pop_recent(mine).or_else(|| self.free.pop())
        } else {
            self.free.pop().or_else(|| self.pop_recent(mine))
        }
        .or_else(|| self.recent.iter().find_map(|q| self.pop_recent(q)))?;
        // A load and a store, not an RMW: the index is this thread's alone until it is put
        // back, and the queues' push and pop order the uses of it.
        let gen = &self.gens[i as usize];
        let g = gen.load(Relaxed).wrapping_add(1);
        gen.store(g, Relaxed);
        Some((i, g & mailbox::GEN_MASK))
    }

    fn pop_recent(&self, q: &ArrayQueue<u32>) -> Option<u32> {
        let i = q.pop()?;
        self.recent_held.fetch_sub(1, Relaxed);
        Some(i)
    }

    /// Whether [`MailboxPool::acquire`] may find a mailbox (a quarantined one may come back).
    pub(crate) fn may_have_free(&self) -> bool {
        !self.free.is_empty()
            || self.recent_held.load(Relaxed) > 0
            || self.quarantined.load(Relaxed) > 0
    }

    /// Gives back mailbox `i`, last used for a call through channel `chan`.
    pub(crate) fn put(&self, i: u32, chan: u64) {
        if self.recent_held.load(Relaxed) >= RECENT {
            // Room first: the oldest of the next bucket that has one goes to the free list.
            for _ in 0..BUCKETS {
                let k = self.evict.fetch_add(1, Relaxed) % BUCKETS;
                if let Some(old) = self.pop_recent(&self.recent[k]) {
                    let _ = self.free.push(old);
                    break;
                }
            }
        }
        self.recent_held.fetch_add(1, Relaxed);
        if let Err(i) = self.recent[chan as usize % BUCKETS].push(i) {
            self.recent_held.fetch_sub(1, Relaxed);
            // The free list has room for every mailbox: nothing is lost.
            let _ = self.free.push(i);
        }
    }

    /// Quarantines mailbox `i` of `gen` (its place in `chan`), taken by process
    /// `taker_pid` (0: unknown).
    pub(crate) fn quarantine(
        &self,
        chan: &Arc<ChannelSeg>,
        i: u32,
        gen: u32,
        heap: Option<(u64, u64)>,
        taker_pid: u32,
    ) {
        let taker = (taker_pid != 0).then(|| {
            // A start time that cannot be read: the taker has already exited (u64::MAX
            // never matches a live process).
            let start = sys::process_start_time(taker_pid).unwrap_or(u64::MAX);
            (taker_pid, start)
        });
        self.quarantine.lock().0.push(Quarantined {
            chan: chan.clone(),
            index: i,
            gen,
            heap,
            since: Instant::now(),
            taker,
        });
        self.quarantined.fetch_add(1, Relaxed);
    }

    /// [`MailboxPool::reclaim`] when anything is quarantined (one relaxed load otherwise).
    pub(crate) fn reclaim_if_any(&self) {
        if self.quarantined.load(Relaxed) > 0 {
            self.reclaim();
        }
    }

    /// Returns quarantined mailboxes to the free list whose late reply has arrived, whose
    /// request the instance declined after all (it took it, then saw the cancel), or whose
    /// taker has exited (its reply can no longer land: `complete` only moves this
    /// generation's TAKEN, and `release` ends that generation).
    pub(crate) fn reclaim(&self) {
        let mut guard = self.quarantine.lock();
        let (q, checked) = &mut *guard;
        let check_takers = checked.is_none_or(|t| t.elapsed() >= TAKER_CHECK);
        if check_takers {
            *checked = Some(Instant::now());
        }
        q.retain(|m| {
            let Some((mb, _)) = m.chan.mailbox(m.index) else {
                return false;
            };
            let done = mailbox::is_finished(mb, m.gen)
                || match m.taker {
                    Some((pid, start)) => {
                        check_takers && sys::process_start_time(pid).ok() != Some(start)
                    }
                    None => m.since.elapsed() >= QUARANTINE_EXPIRY,
                };
            if !done {
                return true;
            }
            mailbox::release(mb, m.gen);
            if let Some((off, len)) = m.heap {
                m.chan.heap_free(off, len);
            }
            let _ = self.free.push(m.index);
            false
        });
        self.quarantined.store(q.len(), Relaxed);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// A serial caller calling 5 instances in turn touches about [`RECENT`] mailbox places
    /// (index, channel), not 16 per channel; one calling a single instance cycles through
    /// [`RECENT`] mailboxes as before.
    #[test]
    fn a_serial_caller_touches_about_recent_places_however_many_instances_it_calls() {
        for channels in [1u64, 5] {
            let pool = MailboxPool::new(128);
            let mut places = std::collections::HashSet::new();
            for call in 0..10_000u64 {
                let chan = call % channels;
                let (i, _) = pool.acquire(chan).unwrap();
                places.insert((i, chan));
                pool.put(i, chan);
            }
            assert!(
                (RECENT..=RECENT + channels as usize).contains(&places.len()),
                "{channels} channels: {} places",
                places.len()
            );
        }
    }

    /// A quarantined mailbox comes back once its instance answers, and also once the
    /// instance declines the request (it took it, then saw the caller's cancel: the
    /// Dekker pair of `mailbox::take` and `mailbox::cancel` lets both sides see each
    /// other), while its taker lives. (With only an answer ending the quarantine, a
    /// declined call's mailbox stayed quarantined for as long as its instance lived.)
    #[test]
    fn a_quarantined_mailbox_comes_back_when_answered_or_declined() {
        use crate::shm::layout::{ClientLayout, InstanceLayout, Party};
        let il = InstanceLayout {
            slot_size: 256,
            slot_count: 2,
            heap_size: 0,
        };
        let ml = ClientLayout {
            mailboxes: 2,
            mailbox_inline: 64,
        };
        let [req, rep] = ChannelSeg::create(5, il, ml, 1, 2, 9).unwrap();
        let caller = Arc::new(ChannelSeg::open(&req, &rep, 5, None, Party::Caller).unwrap());
        let instance = ChannelSeg::open(&req, &rep, 5, None, Party::Instance).unwrap();
        let pool = MailboxPool::new(2);
        for declined in [false, true] {
            let (i, gen) = pool.acquire(caller.id).unwrap();
            let (mb, _) = caller.mailbox(i).unwrap();
            mailbox::arm(mb, gen, 77);
            let (theirs, _) = instance.mailbox(i).unwrap();
            assert!(mailbox::take(theirs, gen, 77));
            assert_eq!(mailbox::cancel(mb, gen), mailbox::Cancel::InProgress);
            // Taken by this (live) process: only the answer or the decline ends it.
            pool.quarantine(&caller, i, gen, None, std::process::id());
            pool.reclaim();
            assert_eq!(pool.quarantined.load(Relaxed), 1, "declined: {declined}");
            if declined {
                // What `take` does when its re-read finds the cancel after its TAKEN.
                theirs
                    .taken
                    .state
                    .store(mailbox::pack(gen, mailbox::DECLINED), Relaxed);
            } else {
                assert!(mailbox::complete(theirs, gen));
            }
            pool.reclaim();
            assert_eq!(pool.quarantined.load(Relaxed), 0, "declined: {declined}");
        }
    }

    /// Every mailbox can still be had after any mix of channels: none is lost in a bucket.
    #[test]
    fn no_mailbox_is_lost_among_the_buckets() {
        let pool = MailboxPool::new(40);
        let mut held = Vec::new();
        for round in 0..200u64 {
            // Take a varying number through varying channels, give them back elsewhere.
            for k in 0..(round % 37) {
                held.push(pool.acquire(round * 7 + k).unwrap().0);
            }
            for (k, i) in held.drain(..).enumerate() {
                pool.put(i, round + k as u64);
            }
        }
        let all: std::collections::HashSet<u32> = (0..40)
            .map(|k| pool.acquire(k).expect("a mailbox was lost").0)
            .collect();
        assert_eq!(all.len(), 40);
        assert_eq!(pool.acquire(0), None);
    }
}
