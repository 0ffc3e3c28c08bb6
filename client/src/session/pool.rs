//! A connection's reply mailboxes: the free list, each mailbox's next generation (kept
//! privately, so a peer cannot steer them), and the mailboxes quarantined after a call
//! timed out while its instance was running it.

use std::cell::{Cell, RefCell};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU32 as StdAtomicU32, AtomicUsize};
use std::sync::{Arc, Weak};
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

/// At most one in this many of a connection's mailboxes are kept by threads between their
/// calls (see [`MailboxPool`]): the others stay in the queues for whoever calls.
const KEPT_SHARE: usize = 2;

/// How many free mailboxes a thread keeps (see [`MailboxPool`]).
const KEEP: usize = 4;

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
///
/// The queues cost four locked instructions per call (a pop and a push, each with its
/// count), about 18 ns of a 0.5 µs spinning round trip here. So a thread keeps the last
/// [`KEEP`] mailboxes it freed ([`KEPT`], thread-local cells) and cycles through them, oldest
/// first, for its calls on that connection: no atomic instruction, and still not the mailbox
/// just freed. A thread with fewer kept takes from the queues (and, when they are empty,
/// from its own). At most one thread per `KEEP * KEPT_SHARE` mailboxes keeps any (a
/// connection with 128 lets 16 threads keep 4 each), so threads that stopped calling hold
/// few of them; a thread's go back to the free queue when it exits. A serial caller
/// round-robining over 5 instances touches 4 × 5 places. Measured on this 2-core VM, head
/// against the queues alone, interleaved: see the README's figures for stop 38.
pub(crate) struct MailboxPool {
    shared: Arc<Shared>,
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

/// What a thread keeping some of the pool's mailboxes needs to give them back when it
/// exits: the free queue, and the count of threads keeping some.
struct Shared {
    free: ArrayQueue<u32>,
    /// Threads whose [`KEPT`] is this pool's (at most `mailboxes / (KEEP * KEPT_SHARE)`).
    keepers: AtomicUsize,
    /// Their limit.
    max_keepers: usize,
}

/// A thread's kept mailboxes: the pool they are of (`pool`, held weakly: a connection
/// closed meanwhile is not kept alive by a thread that once called through it; `at`, its
/// address, unique while the weak reference holds its allocation) and up to [`KEEP`] free
/// mailboxes, oldest first (`ring`, from `head`, `len` of them). Bound to one pool at a
/// time. Cells, so that a call's take and put are a few plain loads and stores.
struct Keep {
    at: Cell<usize>,
    ring: [Cell<u32>; KEEP],
    head: Cell<usize>,
    len: Cell<usize>,
    pool: RefCell<Weak<Shared>>,
}

impl Drop for Keep {
    fn drop(&mut self) {
        // The thread exits: its mailboxes go back to the free queue, which has room for
        // all of them.
        self.unbind();
    }
}

impl Keep {
    /// Gives the kept mailboxes back to their pool (if it lives) and stops keeping any of
    /// it.
    fn unbind(&self) {
        let old = std::mem::take(&mut *self.pool.borrow_mut());
        if let Some(pool) = old.upgrade() {
            while let Some(i) = self.pop() {
                let _ = pool.free.push(i);
            }
            pool.keepers.fetch_sub(1, Relaxed);
        }
        self.at.set(0);
        self.len.set(0);
    }

    /// The oldest kept mailbox.
    #[inline]
    fn pop(&self) -> Option<u32> {
        let len = self.len.get();
        if len == 0 {
            return None;
        }
        let h = self.head.get();
        self.head.set((h + 1) % KEEP);
        self.len.set(len - 1);
        Some(self.ring[h].get())
    }

    /// Keeps `i` as the newest, if there is room.
    #[inline]
    fn push(&self, i: u32) -> bool {
        let len = self.len.get();
        if len == KEEP {
            return false;
        }
        self.ring[(self.head.get() + len) % KEEP].set(i);
        self.len.set(len + 1);
        true
    }
}

thread_local! {
    /// This thread's kept mailboxes (see [`MailboxPool`]).
    static KEPT: Keep = const {
        Keep {
            at: Cell::new(0),
            ring: [const { Cell::new(0) }; KEEP],
            head: Cell::new(0),
            len: Cell::new(0),
            pool: RefCell::new(Weak::new()),
        }
    };
}

impl MailboxPool {
    pub(crate) fn new(n: u32) -> MailboxPool {
        let free = ArrayQueue::new(n as usize);
        for i in 0..n {
            let _ = free.push(i);
        }
        MailboxPool {
            shared: Arc::new(Shared {
                free,
                keepers: AtomicUsize::new(0),
                max_keepers: n as usize / (KEEP * KEPT_SHARE),
            }),
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
        let i = self
            .take_kept(false)
            .or_else(|| self.acquire_queued(chan))
            .or_else(|| self.take_kept(true))?;
        // A load and a store, not an RMW: the index is this thread's alone until it is put
        // back, and the queues' push and pop (or the thread's own keeping) order the uses
        // of it.
        let gen = &self.gens[i as usize];
        let g = gen.load(Relaxed).wrapping_add(1);
        gen.store(g, Relaxed);
        Some((i, g & mailbox::GEN_MASK))
    }

    /// How a thread's [`Keep`] names this pool (`Keep::at`): the address of its shared
    /// part, unique while a weak reference holds the allocation.
    #[inline]
    fn key(&self) -> usize {
        Arc::as_ptr(&self.shared) as usize
    }

    /// This thread's oldest kept mailbox of this pool, if it keeps `KEEP` of them (or, with
    /// `any`, one at all).
    #[inline]
    fn take_kept(&self, any: bool) -> Option<u32> {
        let me = self.key();
        KEPT.try_with(|k| {
            if k.at.get() != me || !(any || k.len.get() == KEEP) {
                return None;
            }
            k.pop()
        })
        .ok()
        .flatten()
    }

    /// Keeps mailbox `i` for this thread's next calls, if the thread keeps fewer than
    /// [`KEEP`] (binding the thread to this pool if it keeps another's mailboxes or none,
    /// and the pool lets one more thread keep some). Whether it did.
    #[inline]
    fn keep(&self, i: u32) -> bool {
        let me = self.key();
        KEPT.try_with(|k| {
            if k.at.get() == me {
                return k.push(i);
            }
            self.bind(k, i)
        })
        .unwrap_or(false)
    }

    /// Binds this thread's [`Keep`] to this pool, keeping `i`, unless it keeps a mailbox of
    /// another live pool (a thread alternating two connections would otherwise rebind on
    /// every call) or this pool has all the keepers it lets have one.
    #[cold]
    fn bind(&self, k: &Keep, i: u32) -> bool {
        let Ok(pool) = k.pool.try_borrow() else {
            return false;
        };
        if k.len.get() > 0 && pool.strong_count() > 0 {
            return false;
        }
        drop(pool);
        let s = &self.shared;
        // Relaxed: a count that only bounds how many threads keep mailboxes (the indices
        // travel through this thread's own cells and the free queue).
        if s.keepers.fetch_add(1, Relaxed) >= s.max_keepers {
            s.keepers.fetch_sub(1, Relaxed);
            return false;
        }
        k.unbind();
        *k.pool.borrow_mut() = Arc::downgrade(s);
        k.at.set(self.key());
        k.push(i)
    }

    /// A mailbox from the queues (see [`MailboxPool`]).
    fn acquire_queued(&self, chan: u64) -> Option<u32> {
        self.reclaim_if_any();
        let mine = &self.recent[chan as usize % BUCKETS];
        // Any queue may be emptied by another thread between the check and the pop; the
        // last resort takes a recent mailbox of another channel.
        if self.recent_held.load(Relaxed) >= RECENT {
            self.pop_recent(mine).or_else(|| self.shared.free.pop())
        } else {
            self.shared.free.pop().or_else(|| self.pop_recent(mine))
        }
        .or_else(|| self.recent.iter().find_map(|q| self.pop_recent(q)))
    }

    fn pop_recent(&self, q: &ArrayQueue<u32>) -> Option<u32> {
        let i = q.pop()?;
        self.recent_held.fetch_sub(1, Relaxed);
        Some(i)
    }

    /// Whether [`MailboxPool::acquire`] may find a mailbox for this thread (one it keeps, a
    /// free one, or a quarantined one that may come back).
    pub(crate) fn may_have_free(&self) -> bool {
        let me = self.key();
        let kept = KEPT
            .try_with(|k| k.at.get() == me && k.len.get() > 0)
            .unwrap_or(false);
        kept || !self.shared.free.is_empty()
            || self.recent_held.load(Relaxed) > 0
            || self.quarantined.load(Relaxed) > 0
    }

    /// Gives back mailbox `i`, last used for a call through channel `chan`.
    pub(crate) fn put(&self, i: u32, chan: u64) {
        if self.keep(i) {
            return;
        }
        if self.recent_held.load(Relaxed) >= RECENT {
            // Room first: the oldest of the next bucket that has one goes to the free list.
            for _ in 0..BUCKETS {
                let k = self.evict.fetch_add(1, Relaxed) % BUCKETS;
                if let Some(old) = self.pop_recent(&self.recent[k]) {
                    let _ = self.shared.free.push(old);
                    break;
                }
            }
        }
        self.recent_held.fetch_add(1, Relaxed);
        if let Err(i) = self.recent[chan as usize % BUCKETS].push(i) {
            self.recent_held.fetch_sub(1, Relaxed);
            // The free list has room for every mailbox: nothing is lost.
            let _ = self.shared.free.push(i);
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
            let _ = self.shared.free.push(m.index);
            false
        });
        self.quarantined.store(q.len(), Relaxed);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// A serial caller cycles through the [`KEEP`] mailboxes it keeps: `KEEP` places per
    /// channel it calls. A thread that keeps another connection's mailboxes calling 5
    /// instances in turn touches
    /// about [`RECENT`] mailbox places (index, channel), not 16 per channel; one calling a
    /// single instance cycles through [`RECENT`] mailboxes as before.
    #[test]
    fn a_serial_caller_touches_keep_places_per_channel_or_about_recent_places() {
        let places = |pool: &MailboxPool, channels: u64| {
            let mut places = std::collections::HashSet::new();
            for call in 0..10_000u64 {
                let chan = call % channels;
                let (i, _) = pool.acquire(chan).unwrap();
                places.insert((i, chan));
                pool.put(i, chan);
            }
            places.len()
        };
        std::thread::spawn(move || {
            for channels in [1u64, 5] {
                assert_eq!(
                    places(&MailboxPool::new(128), channels),
                    KEEP * channels as usize
                );
            }
            // Bound to another live pool's mailboxes: this thread keeps none of these.
            let other = MailboxPool::new(128);
            let (i, _) = other.acquire(0).unwrap();
            other.put(i, 0);
            for channels in [1u64, 5] {
                let n = places(&MailboxPool::new(128), channels);
                assert!(
                    (RECENT..=RECENT + channels as usize).contains(&n),
                    "{channels} channels: {n} places"
                );
            }
        })
        .join()
        .unwrap();
    }

    /// At most one thread per `KEEP * KEPT_SHARE` mailboxes keeps some; a thread's kept
    /// mailboxes are others' again once it exits, and nobody else takes them while it lives.
    #[test]
    fn kept_mailboxes_are_bounded_and_come_back_when_their_thread_exits() {
        let pool = Arc::new(MailboxPool::new((2 * KEEP * KEPT_SHARE) as u32)); // two keepers
        let (keep_going, hold) = std::sync::mpsc::channel::<()>();
        let hold = Arc::new(parking_lot::Mutex::new(hold));
        let (kept_tx, kept_rx) = std::sync::mpsc::channel();
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let (pool, hold, kept_tx) = (pool.clone(), hold.clone(), kept_tx.clone());
                std::thread::spawn(move || {
                    let (i, _) = pool.acquire(0).unwrap();
                    pool.put(i, 0);
                    kept_tx
                        .send(pool.take_kept(true).inspect(|&i| pool.put(i, 0)))
                        .unwrap();
                    // Live until told to exit.
                    let _ = hold.lock().recv();
                })
            })
            .collect();
        let kept: Vec<_> = (0..3).filter_map(|_| kept_rx.recv().unwrap()).collect();
        assert_eq!(kept.len(), 2, "two of three threads keep one: {kept:?}");
        // This thread is the pool's third would-be keeper: it gets all the others, no more.
        let mut mine = Vec::new();
        while let Some((i, _)) = pool.acquire(0) {
            assert!(
                !kept.contains(&i),
                "took mailbox {i}, kept by a live thread"
            );
            mine.push(i);
        }
        assert_eq!(mine.len(), 2 * KEEP * KEPT_SHARE - 2);
        drop(keep_going);
        for t in threads {
            t.join().unwrap();
        }
        let mut back: Vec<_> = std::iter::from_fn(|| pool.acquire(0).map(|(i, _)| i)).collect();
        back.sort_unstable();
        let mut want = kept.clone();
        want.sort_unstable();
        assert_eq!(back, want, "the exited threads' mailboxes are free again");
    }

    /// A thread that kept a closed connection's mailboxes keeps the next connection's:
    /// the dead binding is taken over (a live one is not, see above).
    #[test]
    fn a_thread_keeping_a_closed_connection_s_mailboxes_keeps_the_next_one_s() {
        std::thread::spawn(|| {
            let old = MailboxPool::new(128);
            for _ in 0..KEEP {
                let (i, _) = old.acquire(0).unwrap();
                old.put(i, 0);
            }
            drop(old);
            let new = MailboxPool::new(128);
            let (i, _) = new.acquire(0).unwrap();
            new.put(i, 0);
            assert_eq!(new.take_kept(true), Some(i), "kept by this thread");
            assert_eq!(new.shared.keepers.load(Relaxed), 1);
        })
        .join()
        .unwrap();
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
