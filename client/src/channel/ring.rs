//! A channel's request ring: Dmitry Vyukov's bounded MPMC queue, laid out in shared
//! memory, with each slot's sequence split in two words with one writer each.
//!
//! Vyukov's per-slot `seq` is written by both sides: the producer moves it `pos → pos +
//! 1` to publish, the consumer `pos + 1 → pos + count` to free the slot. In a channel the
//! producers are the caller's threads and the consumers the instance's, and each side's
//! words lie in a segment only that side may write. So the word splits: the producer's
//! half, `published` ([`SlotCtl::seq`], request side: `pos + 1` once position `pos` is
//! published), and the consumer's half, `freed` ([`FreedSlot`], reply side: `pos + count`
//! once position `pos` was taken). A producer claims `pos` when `freed == pos` by a CAS on
//! `enqueue_pos` (request side: only the caller's threads contend); a consumer takes `pos`
//! when `published == pos + 1` by a CAS on `dequeue_pos` (reply side: only the instance's
//! threads contend). Both words are stored relative to the slot's index, so zero-filled
//! segments are an empty ring.
//!
//! A producer that claimed a slot always publishes it (a dropped [`Claim`] publishes an
//! aborted message): within a channel every producer is a thread of the one caller
//! process, so a producer that dies mid-claim is a caller that died, and its channel
//! closes with it. A hostile caller can stop only its own channel's ring (the instance's
//! sweep takes one request per channel per turn); a hostile instance only its own.
//!
//! SYNC POINT (slots): a producer's Release store of `published` pairs with the consumer's
//! Acquire load of it in [`RingRef::try_pop`]; the consumer's Release store of `freed`
//! pairs with the producer's Acquire load of it in [`RingRef::try_claim`].

use std::marker::PhantomData;
use std::time::{Duration, Instant};

use crate::channel::wait::{Limit, Poll, Waiter};
use crate::shm::layout::{FreedSlot, MsgHeader, RingIndices, SlotHeader};
use crate::shm::sync::{fence, AtomicU64, Ordering};
use crate::shm::sys;

/// A ring seen through one process's mapping.
#[derive(Clone, Copy)]
pub struct RingRef<'a> {
    /// Next position a producer claims (request side).
    enq: &'a AtomicU64,
    /// Next position a consumer takes (reply side).
    deq: &'a AtomicU64,
    /// The slots (request side).
    base: *mut u8,
    /// The freed words, one per slot (reply side).
    freed: *const FreedSlot,
    /// The producer's own notes of positions it knows slots free for (see
    /// [`crate::shm::layout::ChannelSeg::note_freed`]), when it keeps them.
    known: Option<&'a [AtomicU64]>,
    stride: usize,
    count: u32,
    data_len: usize,
    _life: PhantomData<&'a [u8]>,
}

// SAFETY: a RingRef is a view of memory built for concurrent use by many threads and
// processes: every shared word is an atomic, and slot payloads are owned by one side at a
// time through the sequence protocol above.
unsafe impl Send for RingRef<'_> {}
// SAFETY: as above.
unsafe impl Sync for RingRef<'_> {}

impl crate::shm::layout::ChannelSeg {
    /// The request ring of this channel.
    #[inline]
    pub fn ring(&self) -> RingRef<'_> {
        // SAFETY: validated when opened (`ChannelSeg::open`): the slots and the freed
        // words lie inside the two mappings, which live as long as `self`.
        let ring = unsafe {
            RingRef::new(
                (self.request_indices(), self.reply_indices()),
                (self.slots_base(), self.freed_base()),
                self.layout.slot_stride(),
                self.layout.slot_count,
            )
        };
        ring.with_known_freed(self.known_freed())
    }
}

/// Retries of one `try_claim`/`try_pop` before it gives up: contention among honest peers
/// resolves in a handful; only words another process keeps rewriting get this far.
const MAX_RETRIES: u32 = 1 << 16;

/// The ring is full (the caller decides whether to wait).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

impl<'a> RingRef<'a> {
    /// # Safety
    /// `base` points to `count` slots of `stride` bytes, each starting with a [`SlotHeader`]
    /// followed by `stride - size_of::<SlotHeader>()` data bytes, and `freed` to `count`
    /// [`FreedSlot`]s, valid for `'a`; `count` is a power of two. `enqueue_pos` of the
    /// first indices and `dequeue_pos` of the second are used.
    #[inline]
    pub unsafe fn new(
        (producer, consumer): (&'a RingIndices, &'a RingIndices),
        (base, freed): (*mut u8, *const FreedSlot),
        stride: usize,
        count: u32,
    ) -> Self {
        debug_assert!(count.is_power_of_two());
        RingRef {
            enq: &producer.enqueue_pos,
            deq: &consumer.dequeue_pos,
            base,
            freed,
            known: None,
            stride,
            count,
            data_len: stride - std::mem::size_of::<SlotHeader>(),
            _life: PhantomData,
        }
    }

    /// The same ring, its producer consulting `known` (one word per slot index) before a
    /// slot's freed word: a slot noted free for the position it claims is taken as free.
    #[inline]
    pub fn with_known_freed(self, known: &'a [AtomicU64]) -> Self {
        RingRef {
            known: Some(known),
            ..self
        }
    }

    pub fn capacity(&self) -> u32 {
        self.count
    }

    /// Inline data bytes per slot.
    pub fn data_len(&self) -> usize {
        self.data_len
    }

    fn slot(&self, pos: u64) -> &'a SlotHeader {
        let i = self.index_of(pos) as usize;
        // SAFETY: i < count, so the slot lies inside the region promised to `new`; slots are
        // 64-byte aligned because the stride and the base are.
        unsafe { &*(self.base.add(i * self.stride) as *const SlotHeader) }
    }

    fn freed_word(&self, pos: u64) -> &'a AtomicU64 {
        let i = self.index_of(pos) as usize;
        // SAFETY: i < count, inside the `count` freed words promised to `new`.
        unsafe { &(*self.freed.add(i)).seq }
    }

    /// Both halves are stored relative to the slot's index (`stored = seq - index`), so a
    /// zero-filled ring is already initialised (slot `i` free for position `i`, nothing
    /// published): the broker never touches the slot pages, and they cost memory only once
    /// used.
    fn index_of(&self, pos: u64) -> u64 {
        pos & (self.count as u64 - 1)
    }

    /// The producer's half: `pos + 1` once `pos` is published.
    fn published(&self, pos: u64, order: Ordering) -> u64 {
        self.slot(pos)
            .ctl
            .seq
            .load(order)
            .wrapping_add(self.index_of(pos))
    }

    /// Whether the producer noted the slot of `pos` free for `pos` itself (no shared read).
    fn known_free(&self, pos: u64) -> bool {
        self.known
            .and_then(|k| k.get(self.index_of(pos) as usize))
            // SYNC POINT: Acquire, pairs with the Release in `ChannelSeg::note_freed`.
            .is_some_and(|k| k.load(Ordering::Acquire) == pos)
    }

    /// The consumer's half: `pos` while the slot is free for the producer of position
    /// `pos`.
    fn freed(&self, pos: u64, order: Ordering) -> u64 {
        self.freed_word(pos)
            .load(order)
            .wrapping_add(self.index_of(pos))
    }

    fn data_ptr(&self, pos: u64) -> *mut u8 {
        let i = self.index_of(pos) as usize;
        // SAFETY: as in `slot`; the data area follows the header inside the same stride.
        unsafe {
            self.base
                .add(i * self.stride + std::mem::size_of::<SlotHeader>())
        }
    }

    /// Claims the next free slot for writing. The claim must be published (or dropped,
    /// which publishes it as an aborted message) promptly: consumers wait for it in order.
    ///
    /// Bounded: a ring whose words another process corrupted (a freed word ahead of the
    /// position that should be free, or positions moved under us without end) reads as
    /// full, so the caller's own deadline ends the attempt.
    pub fn try_claim(&self) -> Result<Claim<'a>, Full> {
        let mut pos = self.enq.load(Ordering::Relaxed);
        for _ in 0..MAX_RETRIES {
            let freed = if self.known_free(pos) {
                pos
            } else {
                self.freed(pos, Ordering::Acquire)
            };
            let diff = freed.wrapping_sub(pos) as i64;
            if diff == 0 {
                match self.enq.compare_exchange_weak(
                    pos,
                    pos.wrapping_add(1),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        return Ok(Claim {
                            ring: *self,
                            pos,
                            done: false,
                        })
                    }
                    Err(p) => pos = p,
                }
            } else if diff < 0 {
                return Err(Full);
            } else {
                // The slot was freed for a later lap than `pos`: another producer claimed
                // `pos` (and it was taken since), so `enqueue_pos` has moved on...
                let now = self.enq.load(Ordering::Relaxed);
                if now == pos {
                    // ...unless the freed word was written by no consumer: corruption.
                    return Err(Full);
                }
                pos = now;
            }
        }
        Err(Full)
    }

    /// Takes the next published message, if any.
    ///
    /// Bounded like [`RingRef::try_claim`]: a corrupted ring reads as empty.
    pub fn try_pop(&self) -> Option<Taken<'a>> {
        let mut pos = self.deq.load(Ordering::Relaxed);
        for _ in 0..MAX_RETRIES {
            let published = self.published(pos, Ordering::Acquire);
            let diff = published.wrapping_sub(pos.wrapping_add(1)) as i64;
            if diff == 0 {
                match self.deq.compare_exchange_weak(
                    pos,
                    pos.wrapping_add(1),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => return Some(Taken { ring: *self, pos }),
                    Err(p) => pos = p,
                }
            } else if diff < 0 {
                return None;
            } else {
                // Another consumer took `pos` and moved `dequeue_pos` first.
                let now = self.deq.load(Ordering::Relaxed);
                if now == pos {
                    return None;
                }
                pos = now;
            }
        }
        None
    }

    /// Whether the slot at the consumer position is published (cheap emptiness probe).
    pub fn has_message(&self) -> bool {
        let pos = self.deq.load(Ordering::Relaxed);
        self.published(pos, Ordering::Acquire) == pos.wrapping_add(1)
    }

    /// The mailbox index and payload length the message at the consumer position names,
    /// after asking the cache for the rest of its slot (the header's second line and the
    /// inline bytes it says it uses): `None` when nothing is published there. For a consumer about to
    /// take it: the slot's lines and the mailbox's call word then come from the
    /// producer's core together, while the take runs, rather than one after the other
    /// (the take's fence orders every later load after it). Only hints: what is read
    /// here is read again, and validated, by the take.
    pub fn prefetch_head(&self) -> Option<(u32, u64)> {
        let pos = self.deq.load(Ordering::Relaxed);
        // Relaxed: what follows only picks lines to prefetch; the take acquires.
        if self.published(pos, Ordering::Relaxed) != pos.wrapping_add(1) {
            return None;
        }
        let slot = self.slot(pos);
        let msg = slot.msg.get();
        // SAFETY: a published slot inside the ring (see `slot`); volatile reads of plain
        // fields a hostile producer may be rewriting: any value is only a hint.
        let (mailbox, kind, method_len, payload_len) = unsafe {
            (
                std::ptr::addr_of!((*msg).mailbox).read_volatile(),
                std::ptr::addr_of!((*msg).kind).read_volatile(),
                std::ptr::addr_of!((*msg).method_len).read_volatile() as u64,
                std::ptr::addr_of!((*msg).payload_len).read_volatile(),
            )
        };
        // A payload in the channel's heap is read there, in place: only the method here.
        let in_slot = if kind == crate::shm::layout::PAYLOAD_INLINE {
            method_len.saturating_add(payload_len)
        } else {
            method_len
        };
        let in_slot = in_slot.min(self.data_len as u64) as usize;
        self.prefetch_past_first_line(pos, in_slot, sys::PrefetchFor::Reading);
        Some((mailbox, payload_len))
    }

    /// Asks the cache, for `what`, for the slot of `pos` past its first line (the one the
    /// consumer polls, and reads first): the header's second line and the first `len` bytes
    /// of its inline data (at most the slot's).
    fn prefetch_past_first_line(&self, pos: u64, len: usize, what: sys::PrefetchFor) {
        let slot = self.slot(pos) as *const SlotHeader as *const u8;
        let end = std::mem::size_of::<SlotHeader>() + len.min(self.data_len);
        // `end` is inside the slot (header and data).
        sys::prefetch_range(slot.wrapping_add(64), end.saturating_sub(64), what);
    }

    /// Producer: brings the slot of the position after `pos` into this core's cache for
    /// writing, past its first line (the consumer polls that line for the next message):
    /// the header's second line and `len` bytes of inline data. The next request's writes
    /// there then wait for no line to come back from the consumer's core, and neither does
    /// its publication (stores become visible in order). A hint: any slot, any time.
    pub fn prefetch_next_for_write(&self, pos: u64, len: usize) {
        self.prefetch_past_first_line(pos.wrapping_add(1), len, sys::PrefetchFor::Writing);
    }

    /// Whether the slot after the one at the consumer position is published too: a second
    /// message waiting. Reads slot words only, not the producers' `enqueue_pos`: the
    /// caller writes that word on every claim, so a serving thread that read it on every
    /// take made both sides fetch its line from the other's core on the round trip's path
    /// (the next slot's word the caller wrote a lap ago).
    pub fn has_message_after(&self) -> bool {
        // Relaxed: it only decides the channel's turn; the take acquires.
        let pos = self.deq.load(Ordering::Relaxed).wrapping_add(1);
        self.published(pos, Ordering::Relaxed) == pos.wrapping_add(1)
    }

    /// Messages claimed but not yet taken (approximate while producers/consumers run),
    /// at most the slot count.
    pub fn len(&self) -> u64 {
        let e = self.enq.load(Ordering::Relaxed);
        let d = self.deq.load(Ordering::Relaxed);
        e.wrapping_sub(d).min(self.count as u64)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The consumer's position (reply side): unchanged while the instance takes nothing.
    pub fn taken(&self) -> u64 {
        self.deq.load(Ordering::Relaxed)
    }
}

/// Waits on `idx`'s futex until `ready()`, `stop()`, or `timeout`: spins and yields as
/// `waiter` decides, then sleeps. A waker makes `ready()` true, then (SeqCst fence) reads
/// `sleepers` and wakes if non-zero ([`Doorbell::ring`]).
fn park(
    idx: &RingIndices,
    waiter: &mut Waiter<'_>,
    timeout: Option<Duration>,
    ready: impl Fn() -> bool,
    stop: impl Fn() -> bool,
) -> bool {
    let poll = |_deep| {
        if ready() || stop() {
            Poll::Ready
        } else {
            Poll::Working
        }
    };
    if waiter.spin(timeout.map(Limit::After), poll) {
        waiter.learn(true);
        return ready();
    }
    let deadline = timeout.map(|t| waiter.started() + t);
    waiter.parking();
    loop {
        let w = idx.wake.load(Ordering::Acquire);
        idx.sleepers.fetch_add(1, Ordering::Relaxed);
        // Dekker with the waker: sleepers += 1, this fence, then the re-check.
        fence(Ordering::SeqCst);
        if ready() || stop() {
            idx.sleepers.fetch_sub(1, Ordering::Relaxed);
            waiter.learn(false);
            return ready();
        }
        let left = match deadline {
            Some(d) => match d.checked_duration_since(Instant::now()) {
                Some(l) if !l.is_zero() => Some(l),
                _ => {
                    idx.sleepers.fetch_sub(1, Ordering::Relaxed);
                    waiter.learn(false);
                    return false;
                }
            },
            None => None,
        };
        let _ = sys::futex_wait(&idx.wake, w, left);
        idx.sleepers.fetch_sub(1, Ordering::Relaxed);
        if ready() {
            waiter.learn(false);
            return true;
        }
        if stop() {
            return false;
        }
    }
}

/// An instance's doorbell: the indices of its ring segment, which every caller of the
/// instance maps writable. Callers publish requests in their own channels and then ring
/// it: they set their channel's bit in `hint` and wake a sleeping serving thread. All of it
/// is a hint. A hostile writer can cause spurious wake-ups (setting bits, bumping `wake`),
/// extra wake system calls for callers (a large `sleepers`), or a delayed take (clearing
/// bits): serving threads sleep at most [`FULL_SWEEP`] and look at every channel at least
/// that often whatever the bits say, so no request is lost and none waits longer than that
/// for a hostile hint.
///
/// SYNC POINT (hint): a caller's Release `fetch_or` of its bit pairs with the serving
/// thread's Acquire `swap` in [`Doorbell::take`]: a taker that gets the bit sees the
/// request published before it. The caller sets its bit with an RMW even when it is
/// already set (a load would do, but could read a bit set by someone else that the
/// serving thread has not seen yet: loom found the lost wake-up).
/// SYNC POINT (sleep): the caller's `fetch_or`, SeqCst fence, then load of `sleepers`
/// pair with `sleepers += 1`, the SeqCst fence and the re-check of `hint` in
/// [`Doorbell::wait`] (Dekker: one side sees the other's write).
///
/// **Scanning.** An instance with few channels (at most [`SCAN_MAX`]) has its serving
/// threads look at every channel's ring on every look, spinning or not, and says so in
/// the doorbell's `scanning` word ([`Doorbell::set_scanning`]). A caller that finds it
/// set and no serving thread asleep writes nothing to the doorbell: no hint bit to set,
/// so the doorbell's line does not travel between the caller's core and the instance's
/// on every call (it did: the `fetch_or` and the serving thread's `swap` were a fifth of a
/// spinning round trip's time). The word is a hint like the rest: set falsely by a
/// hostile writer, callers skip their bits and an instance that does not scan finds their
/// requests at its next full sweep ([`FULL_SWEEP`]), as if the bits had been cleared.
/// SYNC POINT (scan): a caller's publish (Release), SeqCst fence, then loads of
/// `scanning` and `sleepers` pair with a sleeping thread's `sleepers += 1`, SeqCst fence,
/// and its look at every ring (so a caller that skipped its bit either finds the sleeper
/// and rings as usual, or the sleeper finds the request); and with the instance's store
/// of "not scanning", SeqCst fence, then a look at every ring ([`Doorbell::set_scanning`]
/// and the full sweep after it): a caller that read "scanning" just before has its
/// request seen by that look.
#[derive(Clone, Copy)]
pub struct Doorbell<'a>(pub &'a RingIndices);

/// Every channel is looked at at least this often, whatever the hint bits say.
pub const FULL_SWEEP: Duration = Duration::from_millis(5);

/// Up to this many channels, an instance's serving threads look at every channel on every
/// look (a ring probe each: two cache lines that stay in the serving core's cache until
/// their caller writes) rather than wait for hint bits.
pub const SCAN_MAX: usize = 8;

/// The value of the doorbell's `scanning` word while the serving threads scan.
const SCANNING: u64 = 1;

impl Doorbell<'_> {
    /// The hint bit of channel `id`.
    pub fn bit(id: u64) -> u64 {
        1 << (id % 64)
    }

    /// Says that the channel with hint bit `bit` has a request (after publishing it) and
    /// wakes a sleeping serving thread; nothing to say to serving threads that scan and
    /// are awake.
    pub fn ring(&self, bit: u64) {
        // The first load only filters (it may be stale); the one after the fence decides.
        // See SYNC POINT (scan).
        if self.0.enqueue_pos.load(Ordering::Relaxed) == SCANNING {
            fence(Ordering::SeqCst);
            if self.0.enqueue_pos.load(Ordering::Relaxed) == SCANNING
                && self.0.sleepers.load(Ordering::Relaxed) == 0
            {
                return;
            }
        }
        // See SYNC POINT (hint) and (sleep).
        self.0.hint.fetch_or(bit, Ordering::Release);
        fence(Ordering::SeqCst);
        if self.0.sleepers.load(Ordering::Relaxed) > 0 {
            self.0.wake.fetch_add(1, Ordering::Relaxed);
            let _ = sys::futex_wake(&self.0.wake, 1);
            crate::channel::wait::woke_a_sleeper();
        }
    }

    /// Takes the hint bits set since the last take (0 when none, without a write).
    pub fn take(&self) -> u64 {
        if self.0.hint.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        self.0.hint.swap(0, Ordering::Acquire)
    }

    /// Hands bits a serving thread will not look at now back to the others.
    pub fn put_back(&self, bits: u64) {
        // As in `ring`.
        self.0.hint.fetch_or(bits, Ordering::Release);
        fence(Ordering::SeqCst);
        if self.0.sleepers.load(Ordering::Relaxed) > 0 {
            self.0.wake.fetch_add(1, Ordering::Relaxed);
            let _ = sys::futex_wake(&self.0.wake, 1);
        }
    }

    /// Says whether this instance's serving threads scan every channel (see SYNC POINT
    /// (scan)): before they stop, the caller looks at every channel once more.
    pub fn set_scanning(&self, on: bool) {
        self.0
            .enqueue_pos
            .store(if on { SCANNING } else { 0 }, Ordering::Relaxed);
        // Then the look at every ring that a caller's skipped bit may rely on.
        fence(Ordering::SeqCst);
    }

    /// Whether any hint bit is set.
    pub fn rung(&self) -> bool {
        self.0.hint.load(Ordering::Relaxed) != 0
    }

    /// Waits until the doorbell rings, `ready()` or `stop()`, or `timeout` (at most
    /// [`FULL_SWEEP`]).
    pub fn wait(
        &self,
        waiter: &mut Waiter<'_>,
        timeout: Duration,
        ready: impl Fn() -> bool,
        stop: impl Fn() -> bool,
    ) -> bool {
        // Under loom the futex never times out (a lost wake-up is a deadlock it reports),
        // and a wall-clock bound would make the model depend on time.
        let timeout = if cfg!(loom) {
            timeout
        } else {
            timeout.min(FULL_SWEEP)
        };
        park(
            self.0,
            waiter,
            Some(timeout),
            || self.rung() || ready(),
            stop,
        )
    }

    /// Wakes every sleeping serving thread (shutdown).
    pub fn wake_all(&self) {
        self.0.wake.fetch_add(1, Ordering::Release);
        let _ = sys::futex_wake(&self.0.wake, u32::MAX);
    }
}

/// A claimed slot: the producer owns its header and data until it publishes.
pub struct Claim<'a> {
    ring: RingRef<'a>,
    pos: u64,
    done: bool,
}

/// Marks an aborted claim: consumers release the slot without delivering it.
pub const KIND_ABORTED: u8 = 0xff;

impl<'a> Claim<'a> {
    pub fn position(&self) -> u64 {
        self.pos
    }
    /// Writes the message header (the producer owns the slot, so no one reads it yet).
    pub fn set_header(&mut self, h: MsgHeader) {
        let msg = self.ring.slot(self.pos).msg.get();
        // SAFETY: between claim and publish this producer is the slot's only writer, and
        // consumers read `msg` only after acquiring the published sequence. Volatile: a
        // hostile peer may read or scribble concurrently; we make no assumption about it.
        unsafe { msg.write_volatile(h) };
    }
    /// The slot's inline data area.
    pub fn data(&mut self) -> &mut [u8] {
        // SAFETY: the data area is `data_len` bytes inside the slot (see `RingRef::new`) and
        // owned exclusively by this producer until publish; `&mut self` prevents aliasing.
        unsafe { std::slice::from_raw_parts_mut(self.ring.data_ptr(self.pos), self.ring.data_len) }
    }
    /// Makes the message visible to consumers.
    pub fn publish(mut self) {
        self.done = true;
        self.store_published();
    }

    fn store_published(&self) {
        let i = self.ring.index_of(self.pos);
        // SYNC POINT (slots): Release, pairs with the consumer's Acquire in `try_pop`.
        self.ring
            .slot(self.pos)
            .ctl
            .seq
            .store(self.pos.wrapping_add(1).wrapping_sub(i), Ordering::Release);
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if !self.done {
            // Never leave a claimed slot unpublished: consumers would wait for it forever.
            self.set_header(MsgHeader {
                kind: KIND_ABORTED,
                ..MsgHeader::default()
            });
            self.done = true;
            self.store_published();
        }
    }
}

/// A taken slot: the consumer owns it until dropped, which frees it for the next lap.
pub struct Taken<'a> {
    ring: RingRef<'a>,
    pos: u64,
}

impl<'a> Taken<'a> {
    /// A copy of the header. It came from another process: validate before use.
    pub fn header(&self) -> MsgHeader {
        let slot = self.ring.slot(self.pos);
        // SAFETY: published slot, acquired in `try_pop`; a volatile copy because a hostile
        // producer could still scribble on it, and we only ever use the validated copy.
        unsafe { slot.msg.get().read_volatile() }
    }
    /// Bytes of inline data in this slot.
    pub fn data_len(&self) -> usize {
        self.ring.data_len
    }
    /// Copies `dst.len()` bytes at `off` of the slot's data into `dst`; `None` if out of range.
    pub fn read_into(&self, off: usize, dst: &mut [u8]) -> Option<()> {
        if off.checked_add(dst.len())? > self.ring.data_len {
            return None;
        }
        // SAFETY: range checked against the slot's data area; `dst` is private memory.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ring.data_ptr(self.pos).add(off),
                dst.as_mut_ptr(),
                dst.len(),
            )
        };
        Some(())
    }

    /// Copies `len` bytes at `off` of the slot's data into `out`; `None` if out of range.
    pub fn copy_data(&self, off: usize, len: usize, out: &mut Vec<u8>) -> Option<()> {
        if off.checked_add(len)? > self.ring.data_len {
            return None;
        }
        out.clear();
        out.reserve(len);
        // SAFETY: range checked against the slot's data area above; `out` has capacity
        // `len` and does not overlap shared memory. The copy tolerates concurrent writes by
        // a misbehaving producer (bytes may be garbage, never out of bounds).
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ring.data_ptr(self.pos).add(off),
                out.as_mut_ptr(),
                len,
            );
            out.set_len(len);
        }
        Some(())
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        let next = self.pos.wrapping_add(self.ring.count as u64);
        let i = self.ring.index_of(self.pos);
        // SYNC POINT (slots): Release, pairs with the producer's Acquire in `try_claim`:
        // the next lap's producer writes the slot only after our reads of it.
        self.ring
            .freed_word(self.pos)
            .store(next.wrapping_sub(i), Ordering::Release);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::shm::layout::MsgHeader;

    #[repr(C, align(128))]
    struct Storage {
        idx: RingIndices,
        freed: [FreedSlot; 64],
    }

    fn make(count: u32, data: usize) -> (Box<Storage>, Vec<u64>, usize) {
        // SAFETY: RingIndices is all atomics/bytes; zero is a valid initial state.
        let idx: Box<Storage> = unsafe { Box::new(std::mem::zeroed()) };
        let stride = std::mem::size_of::<SlotHeader>() + data;
        let words = vec![0u64; stride * count as usize / 8 + 8];
        (idx, words, stride)
    }

    fn ring<'a>(s: &'a Storage, words: &'a mut [u64], stride: usize, count: u32) -> RingRef<'a> {
        let p = words.as_mut_ptr() as *mut u8;
        // SAFETY: aligning to 64 moves at most 63 bytes into the 64 bytes of slack.
        let base = unsafe { p.add(p.align_offset(64)) };
        // Zeroed memory is an initialised ring.
        // SAFETY: the buffer holds count*stride bytes after alignment (sized with slack).
        unsafe { RingRef::new((&s.idx, &s.idx), (base, s.freed.as_ptr()), stride, count) }
    }

    #[test]
    fn full_ring_refuses_then_accepts_after_pop() {
        let (s, mut w, stride) = make(4, 64);
        let r = ring(&s, &mut w, stride, 4);
        for i in 0..4u64 {
            let mut c = r.try_claim().unwrap();
            c.set_header(MsgHeader {
                trace_id: i,
                ..Default::default()
            });
            c.publish();
        }
        assert!(r.try_claim().is_err());
        assert_eq!(r.try_pop().unwrap().header().trace_id, 0);
        assert!(r.try_claim().is_ok());
    }

    #[test]
    fn dropped_claim_is_published_as_aborted_not_wedged() {
        let (s, mut w, stride) = make(4, 64);
        let r = ring(&s, &mut w, stride, 4);
        drop(r.try_claim().unwrap());
        let t = r.try_pop().expect("aborted claim must not wedge the ring");
        assert_eq!(t.header().kind, KIND_ABORTED);
    }

    #[test]
    fn corrupted_sequences_read_as_full_or_empty_never_as_a_hang() {
        let (s, mut w, stride) = make(4, 64);
        let r = ring(&s, &mut w, stride, 4);
        // The instance writes a freed word ahead of the free position: no consumer did that.
        s.freed[0].seq.store(1 << 40, Ordering::Relaxed);
        assert_eq!(r.try_claim().err(), Some(Full));
        // And one behind it: the slot reads as not yet freed.
        s.freed[0].seq.store(u64::MAX - 3, Ordering::Relaxed);
        assert_eq!(r.try_claim().err(), Some(Full));
        s.freed[0].seq.store(0, Ordering::Relaxed);
        // The caller claims a message was published two laps ahead of the consumer.
        r.slot(0).ctl.seq.store(9, Ordering::Relaxed);
        assert!(r.try_pop().is_none());
        // Positions far out of step with the slots end the same way.
        r.slot(0).ctl.seq.store(0, Ordering::Relaxed);
        s.idx.enqueue_pos.store(u64::MAX - 1, Ordering::Relaxed);
        s.idx.dequeue_pos.store(u64::MAX / 2, Ordering::Relaxed);
        let _ = r.try_claim();
        assert!(r.try_pop().is_none());
    }

    #[test]
    fn a_claim_s_data_comes_out_of_the_taken_slot_and_ranges_are_checked() {
        let (s, mut w, stride) = make(4, 64);
        let r = ring(&s, &mut w, stride, 4);
        assert_eq!((r.capacity(), r.data_len()), (4, 64));
        assert!(r.is_empty() && !r.has_message());
        for lap in 0..6u64 {
            let mut c = r.try_claim().unwrap();
            assert_eq!(c.position(), lap);
            let data = c.data();
            assert_eq!(data.len(), 64);
            for (i, b) in data.iter_mut().enumerate() {
                *b = (i as u64 * 3 + lap) as u8;
            }
            c.publish();
            assert_eq!(r.len(), 1);
            assert!(r.has_message() && !r.is_empty());
            let t = r.try_pop().unwrap();
            assert_eq!(t.data_len(), 64);
            let want: Vec<u8> = (0..64u64).map(|i| (i * 3 + lap) as u8).collect();
            let mut dst = [0u8; 10];
            t.read_into(54, &mut dst).unwrap();
            assert_eq!(dst[..], want[54..]);
            assert_eq!(t.read_into(55, &mut dst), None, "one byte past the slot");
            assert_eq!(t.read_into(usize::MAX, &mut dst), None);
            let mut out = vec![7u8; 3];
            t.copy_data(0, 64, &mut out).unwrap();
            assert_eq!(out, want);
            t.copy_data(60, 4, &mut out).unwrap();
            assert_eq!(out, want[60..]);
            assert_eq!(t.copy_data(61, 4, &mut out), None);
            assert_eq!(t.copy_data(usize::MAX, 2, &mut out), None);
            drop(t);
            assert!(r.is_empty());
            assert_eq!(r.taken(), lap + 1);
        }
    }

    #[test]
    fn each_slot_s_data_is_its_own_and_inside_the_ring() {
        const COUNT: u32 = 4;
        let (s, mut w, stride) = make(COUNT, 64);
        // Canary: every byte from the end of the slots to the end of the buffer.
        let p = w.as_mut_ptr() as *mut u8;
        let start = p.align_offset(64) + stride * COUNT as usize;
        let total = w.len() * 8;
        // SAFETY: `start..total` is inside the buffer (`make` leaves 64 bytes of slack,
        // the alignment takes at most 63).
        unsafe { std::ptr::write_bytes(p.add(start), 0xAA, total - start) };
        let r = ring(&s, &mut w, stride, COUNT);
        for lap in 0..3u64 {
            // A full lap in flight at once: every slot holds its own message.
            let claims: Vec<_> = (0..COUNT as u64)
                .map(|k| {
                    let mut c = r.try_claim().unwrap();
                    let pos = c.position();
                    assert_eq!(pos, lap * COUNT as u64 + k);
                    c.data().fill(pos as u8 + 1);
                    c.set_header(MsgHeader {
                        trace_id: pos,
                        ..Default::default()
                    });
                    c
                })
                .collect();
            for c in claims {
                c.publish();
            }
            for _ in 0..COUNT {
                let t = r.try_pop().unwrap();
                let pos = t.header().trace_id;
                let mut out = Vec::new();
                t.copy_data(0, 64, &mut out).unwrap();
                assert_eq!(out, vec![pos as u8 + 1; 64], "message {pos}'s data");
            }
        }
        // SAFETY: as above; the ring is no longer used, nothing writes the buffer.
        let tail = unsafe { std::slice::from_raw_parts(p.add(start), total - start) };
        assert!(
            tail.iter().all(|&b| b == 0xAA),
            "a slot wrote past the ring"
        );
    }

    /// A doorbell's bits: one per channel id modulo 64, set by `ring` and `put_back`,
    /// handed over once by `take`; `ring` and `put_back` wake a serving thread only when
    /// one said it sleeps, and `wait` ends on a ring (true) or its timeout (false).
    #[test]
    fn a_doorbell_hands_over_its_bits_once_and_wakes_only_a_sleeper() {
        use crate::channel::wait::{Backoff, Seats, Spin, Waiter};
        let idx = RingIndices::new();
        let d = Doorbell(&idx);
        assert_eq!((Doorbell::bit(3), Doorbell::bit(64 + 5)), (1 << 3, 1 << 5));
        assert!(!d.rung());
        assert_eq!(d.take(), 0);
        d.ring(Doorbell::bit(3));
        d.ring(Doorbell::bit(9));
        assert!(d.rung());
        assert_eq!(d.take(), 1 << 3 | 1 << 9);
        assert!(!d.rung() && d.take() == 0, "handed over once");
        d.put_back(1 << 7);
        assert_eq!(d.take(), 1 << 7);
        assert_eq!(idx.wake.load(Ordering::Relaxed), 0, "no sleeper, no wake");
        let waiter = || {
            Waiter::new(
                Spin::Fixed(Duration::ZERO),
                Backoff::server(),
                Seats::none(),
            )
        };
        // Nothing rung: the wait times out.
        let t = Instant::now();
        assert!(!d.wait(&mut waiter(), Duration::from_millis(20), || false, || false));
        assert!(t.elapsed() >= Duration::from_millis(4), "{:?}", t.elapsed());
        // A sleeper is woken by `ring`, then by `put_back`, then by `wake_all`.
        for (k, how) in ["ring", "put_back", "wake_all"].iter().enumerate() {
            std::thread::scope(|sc| {
                let sleeper =
                    sc.spawn(|| d.wait(&mut waiter(), Duration::from_secs(30), || false, || false));
                let end = Instant::now() + Duration::from_secs(10);
                while idx.sleepers.load(Ordering::Relaxed) == 0 {
                    assert!(
                        Instant::now() < end,
                        "{how}: the waiter never went to sleep"
                    );
                    std::thread::yield_now();
                }
                match *how {
                    "ring" => d.ring(Doorbell::bit(1)),
                    "put_back" => d.put_back(1 << 2),
                    _ => d.wake_all(),
                }
                let rung = sleeper.join().unwrap();
                assert_eq!(rung, *how != "wake_all", "{how}");
            });
            assert_eq!(
                idx.wake.load(Ordering::Relaxed),
                k as u32 + 1,
                "{how} woke it"
            );
            assert_eq!(idx.sleepers.load(Ordering::Relaxed), 0);
            d.take();
        }
    }

    #[test]
    fn threads_deliver_every_message_exactly_once() {
        const PER: u64 = if cfg!(miri) { 50 } else { 20_000 };
        let (s, mut w, stride) = make(64, 64);
        let r = ring(&s, &mut w, stride, 64);
        let seen = std::sync::Mutex::new(vec![0u8; (4 * PER) as usize]);
        std::thread::scope(|sc| {
            for p in 0..4u64 {
                sc.spawn(move || {
                    for i in 0..PER {
                        loop {
                            if let Ok(mut c) = r.try_claim() {
                                c.set_header(MsgHeader {
                                    trace_id: p * PER + i,
                                    ..Default::default()
                                });
                                c.publish();
                                break;
                            }
                            std::thread::yield_now();
                        }
                    }
                });
            }
            for _ in 0..2 {
                sc.spawn(|| {
                    let mut got = 0;
                    while got < 2 * PER {
                        if let Some(t) = r.try_pop() {
                            seen.lock().unwrap()[t.header().trace_id as usize] += 1;
                            got += 1;
                        } else {
                            std::thread::yield_now();
                        }
                    }
                });
            }
        });
        assert!(seen.lock().unwrap().iter().all(|&n| n == 1));
    }
}

/// Model check of the ring protocol under loom: `RUSTFLAGS="--cfg loom" cargo test -p
/// aegis-client --release --lib loom`.
#[cfg(loom)]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;

    #[repr(C, align(64))]
    struct Slot {
        h: SlotHeader,
        data: [u8; 64],
    }

    /// A channel's ring: the producer's indices and slots (request side), the consumer's
    /// indices and freed words (reply side).
    struct Shared {
        idx: RingIndices,
        consumer: RingIndices,
        slots: Vec<Slot>,
        freed: Vec<FreedSlot>,
    }

    struct Ptr(*mut u8);
    // SAFETY: points into `Shared`, kept alive by the Arc each thread holds.
    unsafe impl Send for Ptr {}

    fn ring<'a>(s: &'a Shared, p: &Ptr) -> RingRef<'a> {
        // SAFETY: `p` points at `s.slots`, 2 slots of size_of::<Slot>() bytes.
        unsafe {
            RingRef::new(
                (&s.idx, &s.consumer),
                (p.0, s.freed.as_ptr()),
                std::mem::size_of::<Slot>(),
                2,
            )
        }
    }

    #[test]
    fn two_producers_one_consumer_deliver_each_message_once() {
        loom::model(|| {
            let mut slots = Vec::new();
            for _ in 0..2 {
                slots.push(Slot {
                    h: SlotHeader::new(),
                    data: [0; 64],
                });
            }
            let s = Arc::new(Shared {
                idx: RingIndices::new(),
                consumer: RingIndices::new(),
                slots,
                freed: vec![FreedSlot::new(), FreedSlot::new()],
            });
            let base = s.slots.as_ptr() as *mut u8;
            let producers: Vec<_> = (1..=2u64)
                .map(|id| {
                    let s = s.clone();
                    let p = Ptr(base);
                    loom::thread::spawn(move || {
                        let r = ring(&s, &p);
                        let mut c = loop {
                            if let Ok(c) = r.try_claim() {
                                break c;
                            }
                            loom::thread::yield_now();
                        };
                        c.set_header(MsgHeader {
                            trace_id: id,
                            ..Default::default()
                        });
                        c.publish();
                    })
                })
                .collect();
            let r = ring(&s, &Ptr(base));
            let mut seen = Vec::new();
            while seen.len() < 2 {
                match r.try_pop() {
                    Some(t) => seen.push(t.header().trace_id),
                    None => loom::thread::yield_now(),
                }
            }
            for p in producers {
                p.join().unwrap();
            }
            seen.sort();
            assert_eq!(seen, vec![1, 2]);
            assert!(r.try_pop().is_none());
        });
    }

    /// The producer's note that a slot is free (`ChannelSeg::note_freed`): caller thread A
    /// sees the reply to the request at position 0 (an answer word the consumer stores,
    /// Release, after it is done with the slot) and notes the slot free for position 2;
    /// caller thread B claims position 2 through that note alone (its view of the freed
    /// words is never written), and must find the consumer done reading the slot.
    #[test]
    fn a_slot_noted_free_after_the_reply_is_claimed_only_after_the_consumer_left_it() {
        loom::model(|| {
            let s = shared();
            let base = s.slots.as_ptr() as *mut u8;
            let r = ring(&s, &Ptr(base));
            for id in 1..=2 {
                let mut c = r.try_claim().unwrap();
                c.set_header(MsgHeader {
                    trace_id: id,
                    ..Default::default()
                });
                c.publish();
            }
            // 0: not yet read; 1: reading; 2: done with the slot.
            let reading = Arc::new(AtomicU64::new(0));
            let answer = Arc::new(AtomicU64::new(0));
            let known: Arc<Vec<AtomicU64>> = Arc::new((0..2).map(|_| AtomicU64::new(0)).collect());
            let consumer = {
                let (s, reading, answer) = (s.clone(), reading.clone(), answer.clone());
                let p = Ptr(base);
                loom::thread::spawn(move || {
                    let r = ring(&s, &p);
                    let t = r.try_pop().unwrap();
                    reading.store(1, Ordering::Relaxed);
                    assert_eq!(t.header().trace_id, 1);
                    reading.store(2, Ordering::Relaxed);
                    drop(t);
                    // READY: Release, after the slot was freed.
                    answer.store(1, Ordering::Release);
                })
            };
            let noter = {
                let (answer, known) = (answer.clone(), known.clone());
                loom::thread::spawn(move || {
                    while answer.load(Ordering::Acquire) == 0 {
                        loom::thread::yield_now();
                    }
                    // `note_freed(0)` with two slots.
                    known[0].store(2, Ordering::Release);
                })
            };
            let never_written = [FreedSlot::new(), FreedSlot::new()];
            // SAFETY: as in `ring`, with freed words of its own that nobody writes.
            let claimer = unsafe {
                RingRef::new(
                    (&s.idx, &s.consumer),
                    (base, never_written.as_ptr()),
                    std::mem::size_of::<Slot>(),
                    2,
                )
            }
            .with_known_freed(&known);
            let c = loop {
                if let Ok(c) = claimer.try_claim() {
                    break c;
                }
                loom::thread::yield_now();
            };
            assert_eq!(c.position(), 2);
            assert_eq!(
                reading.load(Ordering::Relaxed),
                2,
                "claimed while the consumer read"
            );
            drop(c);
            consumer.join().unwrap();
            noter.join().unwrap();
        });
    }

    /// A caller thread that publishes one request (trace id `trace_id`) in the ring of `s`
    /// and rings `bell` with `bit`.
    fn rung_caller(
        s: &Arc<Shared>,
        bell: &Arc<RingIndices>,
        bit: u64,
        trace_id: u64,
    ) -> loom::thread::JoinHandle<()> {
        let (s, bell) = (s.clone(), bell.clone());
        let p = Ptr(s.slots.as_ptr() as *mut u8);
        loom::thread::spawn(move || {
            let r = ring(&s, &p);
            let mut c = r.try_claim().unwrap();
            c.set_header(MsgHeader {
                trace_id,
                ..Default::default()
            });
            c.publish();
            Doorbell(&bell).ring(bit);
        })
    }

    /// A serving thread's waiter that looks once and sleeps (the futex model never times
    /// out, so a lost wake-up is a deadlock loom reports).
    fn sleeping_waiter() -> crate::channel::wait::Waiter<'static> {
        use crate::channel::wait::{Seats, Spin, Waiter};
        Waiter::new(
            Spin::Fixed(Duration::ZERO),
            Default::default(),
            Seats::none(),
        )
    }

    fn shared() -> Arc<Shared> {
        let mut slots = Vec::new();
        for _ in 0..2 {
            slots.push(Slot {
                h: SlotHeader::new(),
                data: [0; 64],
            });
        }
        Arc::new(Shared {
            idx: RingIndices::new(),
            consumer: RingIndices::new(),
            slots,
            freed: vec![FreedSlot::new(), FreedSlot::new()],
        })
    }

    /// Payload bytes as loom sees them: one cell per slot, written by the producer between
    /// claim and publish and read by the consumer between pop and release, so loom checks
    /// that each read happens after its write and before the next lap's write.
    struct Payloads([loom::cell::UnsafeCell<u64>; 2]);
    // SAFETY: access is serialised by the ring protocol under test (and checked by loom).
    unsafe impl Sync for Payloads {}
    // SAFETY: as above.
    unsafe impl Send for Payloads {}

    fn payloads() -> Arc<Payloads> {
        Arc::new(Payloads([
            loom::cell::UnsafeCell::new(0),
            loom::cell::UnsafeCell::new(0),
        ]))
    }

    /// A full ring and its next lap: three messages through two slots, in order, each
    /// payload read before the slot's next producer writes it.
    #[test]
    fn a_full_ring_refuses_then_reuses_its_slots_for_the_next_lap() {
        loom::model(|| {
            let s = shared();
            let cells = payloads();
            let base = s.slots.as_ptr() as *mut u8;
            let producer = {
                let (s, cells, p) = (s.clone(), cells.clone(), Ptr(base));
                loom::thread::spawn(move || {
                    let r = ring(&s, &p);
                    for id in 1..=3u64 {
                        let mut c = loop {
                            match r.try_claim() {
                                Ok(c) => break c,
                                Err(Full) => loom::thread::yield_now(),
                            }
                        };
                        let slot = (c.position() & 1) as usize;
                        // SAFETY: claimed: this producer owns the slot until it publishes.
                        cells.0[slot].with_mut(|v| unsafe { *v = id });
                        c.set_header(MsgHeader {
                            trace_id: id,
                            ..Default::default()
                        });
                        c.publish();
                    }
                })
            };
            let r = ring(&s, &Ptr(base));
            let mut seen = Vec::new();
            while seen.len() < 3 {
                match r.try_pop() {
                    Some(t) => {
                        let slot = (t.pos & 1) as usize;
                        // SAFETY: taken: this consumer owns the slot until it drops `t`.
                        let v = cells.0[slot].with(|v| unsafe { *v });
                        assert_eq!(v, t.header().trace_id);
                        seen.push(v);
                    }
                    None => loom::thread::yield_now(),
                }
            }
            producer.join().unwrap();
            assert_eq!(seen, vec![1, 2, 3]);
        });
    }

    /// A caller's channel and an instance's doorbell: the serving thread (a sweep reduced
    /// to one channel: take the hint bits, look at the channel if its bit came, else sleep
    /// on the doorbell) always takes the caller's request, while a hostile caller sets every
    /// hint bit and bumps the futex word (spurious wake-ups). The futex model never times
    /// out, so a lost wake-up is a deadlock loom reports. (Bounded to 3 preemptions: the
    /// full model of three threads does not finish in minutes.)
    #[test]
    fn a_request_rung_on_the_doorbell_is_always_taken_despite_spurious_hints() {
        let mut model = loom::model::Builder::new();
        model.preemption_bound = Some(3);
        model.check(|| {
            let (s, bell) = (shared(), Arc::new(RingIndices::new()));
            let base = s.slots.as_ptr() as *mut u8;
            let bit = Doorbell::bit(5);
            let caller = rung_caller(&s, &bell, bit, 77);
            let hostile = {
                let bell = bell.clone();
                loom::thread::spawn(move || {
                    bell.hint.fetch_or(u64::MAX, Ordering::Relaxed);
                    bell.wake.fetch_add(1, Ordering::Relaxed);
                    let _ = sys::futex_wake(&bell.wake, u32::MAX);
                })
            };
            let r = ring(&s, &Ptr(base));
            let d = Doorbell(&bell);
            let mut w = sleeping_waiter();
            let got = loop {
                if d.take() & bit != 0 {
                    if let Some(t) = r.try_pop() {
                        break t.header().trace_id;
                    }
                }
                d.wait(&mut w, Duration::from_secs(3600), || false, || false);
            };
            assert_eq!(got, 77);
            caller.join().unwrap();
            hostile.join().unwrap();
        });
    }

    /// An instance that scans (few channels): its caller sets no hint bit and wakes
    /// nobody while the serving thread is awake, and the serving thread (spinning on a
    /// look at the ring, then asleep on the doorbell) always takes the request, while a
    /// hostile writer clears the `scanning` word and sets it again, sets every hint bit
    /// and bumps the futex word. A lost wake-up is a deadlock loom reports (the futex
    /// model never times out).
    #[test]
    fn a_scanning_serving_thread_takes_a_request_whose_caller_set_no_bit() {
        let mut model = loom::model::Builder::new();
        model.preemption_bound = Some(3);
        model.check(|| {
            let (s, bell) = (shared(), Arc::new(RingIndices::new()));
            let base = s.slots.as_ptr() as *mut u8;
            Doorbell(&bell).set_scanning(true);
            let caller = rung_caller(&s, &bell, Doorbell::bit(3), 41);
            let hostile = {
                let bell = bell.clone();
                loom::thread::spawn(move || {
                    Doorbell(&bell).set_scanning(false);
                    bell.hint.fetch_or(u64::MAX, Ordering::Relaxed);
                    Doorbell(&bell).set_scanning(true);
                    bell.wake.fetch_add(1, Ordering::Relaxed);
                    let _ = sys::futex_wake(&bell.wake, u32::MAX);
                })
            };
            let r = ring(&s, &Ptr(base));
            let d = Doorbell(&bell);
            let mut w = sleeping_waiter();
            let got = loop {
                d.take();
                if let Some(t) = r.try_pop() {
                    break t.header().trace_id;
                }
                d.wait(
                    &mut w,
                    Duration::from_secs(3600),
                    || r.has_message(),
                    || false,
                );
            };
            assert_eq!(got, 41);
            caller.join().unwrap();
            hostile.join().unwrap();
        });
    }

    /// An instance that stops scanning (its channels grew past [`SCAN_MAX`]) says so and
    /// then looks at every channel once: a caller that read "scanning" just before and
    /// set no bit has its request found by that look; one that read "not scanning" sets
    /// its bit and wakes the thread, which from then on looks only where the bits say.
    #[test]
    fn a_thread_that_stops_scanning_looks_once_more_and_loses_no_request() {
        loom::model(|| {
            let (s, bell) = (shared(), Arc::new(RingIndices::new()));
            let base = s.slots.as_ptr() as *mut u8;
            let bit = Doorbell::bit(4);
            Doorbell(&bell).set_scanning(true);
            let caller = rung_caller(&s, &bell, bit, 42);
            let r = ring(&s, &Ptr(base));
            let d = Doorbell(&bell);
            let mut w = sleeping_waiter();
            d.set_scanning(false);
            // The look at every channel after the change.
            let mut got = r.try_pop().map(|t| t.header().trace_id);
            while got.is_none() {
                if d.take() & bit != 0 {
                    got = r.try_pop().map(|t| t.header().trace_id);
                    continue;
                }
                d.wait(&mut w, Duration::from_secs(3600), || false, || false);
            }
            assert_eq!(got, Some(42));
            caller.join().unwrap();
        });
    }

    /// A hostile caller that clears the hint bits (stealing the caller's) can delay the
    /// take until the serving thread's periodic look at every channel, never lose it: the
    /// request stays in the channel, and the next full sweep (modelled as every second
    /// turn here) takes it exactly once.
    #[test]
    fn a_stolen_hint_delays_a_request_until_the_full_sweep_and_never_loses_it() {
        loom::model(|| {
            let (s, bell) = (shared(), Arc::new(RingIndices::new()));
            let base = s.slots.as_ptr() as *mut u8;
            let bit = Doorbell::bit(9);
            let caller = rung_caller(&s, &bell, bit, 0);
            let thief = {
                let bell = bell.clone();
                loom::thread::spawn(move || {
                    bell.hint.swap(0, Ordering::Relaxed);
                })
            };
            let r = ring(&s, &Ptr(base));
            let d = Doorbell(&bell);
            let mut turn = 0u32;
            let mut taken = 0;
            while taken == 0 {
                let full = turn % 2 == 1;
                if d.take() & bit != 0 || full {
                    if r.try_pop().is_some() {
                        taken += 1;
                    }
                }
                turn += 1;
                loom::thread::yield_now();
            }
            caller.join().unwrap();
            thief.join().unwrap();
            assert!(r.try_pop().is_none(), "taken exactly once");
        });
    }
}
