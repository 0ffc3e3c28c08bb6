//! A channel: one caller connection's request ring to one instance, and the mailboxes
//! that instance answers that caller's calls in.
//!
//! Two segments, each with one writer, made by the broker when a caller opens an
//! instance and handed to that caller and that instance's serving connection only:
//!
//! * the **request side** (`memfd:aegis-channel`): the ring's `enqueue_pos`, its slots
//!   (the producer's half of each slot's sequence, the message header and inline bytes)
//!   and each mailbox's [`CallWord`] (call state, waiter flags, nonce). The caller gets
//!   the writable descriptor; the instance a read-only one.
//! * the **reply side** (`memfd:aegis-reply`): the ring's `dequeue_pos`, the consumer's
//!   half of each slot's sequence ([`FreedSlot`]), the "taken up" word, each mailbox's
//!   [`TakenWord`] (take state, taker pid), and each mailbox's [`MailboxHeader`] (answer
//!   state, reply header) and inline reply bytes. The instance gets the writable
//!   descriptor; the caller a read-only one.
//!
//! The read-only descriptors are reopened by the broker through `/proc/self/fd` after it
//! took the file's mode down to `0400` ([`crate::shm::sys::reopen_read_only`]): the
//! kernel refuses a writable mapping of them, `mprotect(PROT_WRITE)` and `write(2)`, and a
//! peer of another uid cannot reopen the file writable. So a caller cannot write what its
//! instance reads back from the reply side (the ring's head, the answers), and an instance
//! cannot alter a request after it was published or forge a call's state. A co-caller has
//! no mapping of either; another instance the caller opened has none either.
//!
//! Every channel of a connection has all of its mailboxes: mailbox `i` of a connection is
//! one index (one free list, one generation counter, in the caller's
//! [`crate::session::pool::MailboxPool`]) whose place is in the channel of the instance
//! the call went to. Only the places a caller uses are ever touched (a serial caller
//! cycles through 16), so a channel costs its untouched mailboxes' address space, not
//! their memory. Its requests too large for a slot, and its loans, lie in its
//! [`ChannelHeap`], a segment of its own that only the caller writes.

use std::mem::size_of;
use std::os::fd::OwnedFd;

use super::*;
use crate::shm::heap::HeapAlloc;
use crate::shm::sync::Ordering;

/// Slots of one channel (fewer when the service's `slot_count` is smaller). A slot is
/// free again as soon as the instance takes its request (the reply travels through a
/// mailbox), so this bounds requests queued untaken per caller and instance, not calls in
/// flight; and it bounds the memory a channel costs (16 slots of the default 4 KiB).
pub const CHANNEL_SLOTS: u32 = 16;

/// Which party maps a channel, and so which side it may write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Party {
    /// Writes the request side, reads the reply side.
    Caller,
    /// Writes the reply side, reads the request side.
    Instance,
    /// Reads both (liveness, metrics).
    Broker,
}

/// A channel's token ([`ChannelSeg::token`]): written by the broker through the
/// descriptor before the channel leaves it, read by the parties as plain values.
#[repr(C)]
struct ChannelToken([crate::shm::sync::AtomicU64; 2]);
// SAFETY: repr(C), two atomics.
unsafe impl ShmSafe for ChannelToken {}

/// One mailbox of a channel: the caller's half (request side) and the instance's half
/// (reply side).
#[derive(Clone, Copy)]
pub struct Mb<'a> {
    pub call: &'a CallWord,
    pub taken: &'a TakenWord,
    pub ans: &'a MailboxHeader,
}

/// One channel as mapped by its caller, its instance or the broker.
pub struct ChannelSeg {
    /// The request side (writable in the caller only).
    pub req: Mapping,
    /// The reply side (writable in the instance only).
    pub rep: Mapping,
    pub layout: InstanceLayout,
    /// The caller connection's mailboxes (count and inline size).
    pub mailboxes: ClientLayout,
    /// Registry index and incarnation of the instance it leads to.
    pub instance: u32,
    pub incarnation: u64,
    /// Unique per broker run.
    pub id: u64,
    pub epoch: u64,
    /// The caller's note that the instance has taken the channel up (see
    /// [`ChannelSeg::taken_up`]): once seen, never read from shared memory again.
    seen_taken_up: std::sync::atomic::AtomicBool,
    /// The caller's own note, per slot, of a position it knows that slot free for
    /// ([`ChannelSeg::note_freed`]): process memory, not shared.
    known_freed: [crate::shm::sync::AtomicU64; CHANNEL_SLOTS as usize],
    /// Its request heap, once its caller needed one: mapped by the caller (writable, with
    /// the allocator) and the instance (read-only); the broker does not map it.
    pub heap: std::sync::OnceLock<ChannelHeap>,
    /// The caller's descriptor of its request heap, kept to hand it to a new broker should
    /// the one it was handed to die before the instance fetched it
    /// (`Request::PreviousRequestHeap`).
    pub heap_fd: std::sync::OnceLock<OwnedFd>,
    /// Its reply heap, once its instance needed one: mapped by the instance (writable,
    /// with the allocator) and the caller (read-only); the broker does not map it.
    pub reply_heap: std::sync::OnceLock<ChannelHeap>,
    /// Held by the caller while it fetches the reply heap (one fetch per channel; a wait
    /// for the broker there holds up no other channel's).
    pub reply_heap_opener: parking_lot::Mutex<()>,
    /// Which party mapped it (the caller says "moved on" when it drops its mapping), and
    /// the process that did (a fork child that drops its copy says nothing).
    party: Party,
    pid: u32,
    /// Where its ring and mailboxes lie in `req` and `rep`, checked once.
    places: Places,
}

/// Where a channel's ring and mailboxes lie in its two mappings: found, bounds- and
/// alignment-checked, once when the channel is opened ([`Places::locate`]). The accessors
/// a call uses several times on each side ([`ChannelSeg::ring`],
/// [`ChannelSeg::mailbox`]) are then a few instructions each; checking every offset again
/// on every use cost about 320 of the caller's 3,400 instructions per call and 600 of the
/// serving loop's 2,200 per request (callgrind, `aegisctl bench --count 20000`, 1 KiB).
struct Places {
    req_idx: *const RingIndices,
    rep_idx: *const RingIndices,
    /// Slot 0 (request side); slot `i` at `i * layout.slot_stride()`.
    slots: *mut u8,
    /// The freed words (reply side), one per slot.
    freed: *const FreedSlot,
    /// The call words (request side), one per mailbox.
    calls: *const CallWord,
    /// The taken words (reply side), one per mailbox.
    taken: *const TakenWord,
    /// Mailbox 0's header (reply side); mailbox `i` at `i * mailboxes.mailbox_stride()`,
    /// its inline bytes right after its header.
    answers: *mut u8,
}

// SAFETY: the pointers lead into the two mappings of the `ChannelSeg` that holds them and
// are only turned into shared references to `ShmSafe` types (atomics) or payload pointers
// handed out as `ChannelSeg`'s methods always did; `Mapping` is Send and Sync likewise.
unsafe impl Send for Places {}
// SAFETY: as above.
unsafe impl Sync for Places {}

impl Places {
    /// Finds every array a channel of `layout` and `mailboxes` has in `req` and `rep`:
    /// `None` when one does not lie wholly inside its mapping, or is misaligned for its
    /// type (sizes are checked against the parameters before, so that is a bug).
    fn locate(
        req: &Mapping,
        rep: &Mapping,
        layout: &InstanceLayout,
        mailboxes: &ClientLayout,
    ) -> Option<Places> {
        fn array<T>(m: &Mapping, off: usize, count: usize, stride: usize) -> Option<*mut u8> {
            let p = m.range(off as u64, count.checked_mul(stride)? as u64)?;
            (p as usize % align_of::<T>() == 0 && stride % align_of::<T>() == 0).then_some(p)
        }
        let n = mailboxes.mailboxes as usize;
        let slots = layout.slot_count as usize;
        Some(Places {
            req_idx: array::<RingIndices>(req, InstanceLayout::RING, 1, size_of::<RingIndices>())?
                as *const RingIndices,
            rep_idx: array::<RingIndices>(rep, InstanceLayout::RING, 1, size_of::<RingIndices>())?
                as *const RingIndices,
            slots: array::<SlotHeader>(req, layout.slots_off(), slots, layout.slot_stride())?,
            freed: array::<FreedSlot>(rep, ChannelSeg::FREED, slots, size_of::<FreedSlot>())?
                as *const FreedSlot,
            calls: array::<CallWord>(req, layout.ring_size(), n, size_of::<CallWord>())?
                as *const CallWord,
            taken: array::<TakenWord>(
                rep,
                ChannelSeg::taken_off(layout),
                n,
                size_of::<TakenWord>(),
            )? as *const TakenWord,
            answers: array::<MailboxHeader>(
                rep,
                ChannelSeg::answers_off(layout, mailboxes),
                n,
                mailboxes.mailbox_stride(),
            )?,
        })
    }
}

impl Drop for ChannelSeg {
    fn drop(&mut self) {
        if self.party == Party::Caller && self.pid == std::process::id() {
            // Nothing more will be published here: every thread of ours that could has
            // dropped its hold. SYNC POINT: Release pairs with the instance's Acquire in
            // `moved_on`, after which it sees every request we published.
            self.request_indices().hint.store(1, Ordering::Release);
        }
    }
}

impl ChannelSeg {
    /// The layout of a channel to an instance of `service` sizing (broker).
    pub fn layout_for(service: InstanceLayout) -> InstanceLayout {
        InstanceLayout {
            slot_count: service.slot_count.min(CHANNEL_SLOTS),
            ..service
        }
    }

    /// Bytes of the request side: header, `enqueue_pos` and slots (as an instance ring
    /// segment's), then a page-aligned array of [`CallWord`]s.
    pub fn request_size(layout: &InstanceLayout, mailboxes: &ClientLayout) -> usize {
        layout.ring_size() + round_up(mailboxes.mailboxes as usize * size_of::<CallWord>(), PAGE)
    }

    /// Where the [`FreedSlot`]s start on the reply side (after its [`RingIndices`]).
    const FREED: usize = InstanceLayout::RING + size_of::<RingIndices>();

    /// Where the [`TakenWord`]s start on the reply side: after the freed words (64-byte
    /// aligned, as the freed words are).
    fn taken_off(layout: &InstanceLayout) -> usize {
        Self::FREED + layout.slot_count as usize * size_of::<FreedSlot>()
    }

    /// Where the mailboxes start on the reply side: the page after the taken words.
    fn answers_off(layout: &InstanceLayout, mailboxes: &ClientLayout) -> usize {
        round_up(
            Self::taken_off(layout) + mailboxes.mailboxes as usize * size_of::<TakenWord>(),
            PAGE,
        )
    }

    /// Bytes of the reply side: header, `dequeue_pos`, the freed words, the taken words,
    /// then the mailboxes (each a [`MailboxHeader`] and its inline reply bytes).
    pub fn reply_size(layout: &InstanceLayout, mailboxes: &ClientLayout) -> usize {
        Self::answers_off(layout, mailboxes)
            + round_up(
                mailboxes.mailboxes as usize * mailboxes.mailbox_stride(),
                PAGE,
            )
    }

    /// Bytes of both sides (what a channel counts to its caller's quota).
    pub fn size(layout: &InstanceLayout, mailboxes: &ClientLayout) -> usize {
        Self::request_size(layout, mailboxes) + Self::reply_size(layout, mailboxes)
    }

    /// Creates a channel's two sides (broker): zero-filled (an empty ring, free
    /// mailboxes), headers written through their descriptors (the broker never maps them
    /// writable), sizes sealed. Returns `[request, reply]`, both writable: hand the
    /// request side's to the caller and the reply side's to the instance, and each party a
    /// [`crate::shm::sys::reopen_read_only`] of the other's.
    pub fn create(
        epoch: u64,
        layout: InstanceLayout,
        mailboxes: ClientLayout,
        instance: u32,
        incarnation: u64,
        id: u64,
    ) -> io::Result<[OwnedFd; 2]> {
        let params = Self::params(layout, mailboxes, instance, incarnation, id);
        Self::create_with(epoch, params, &layout, &mailboxes)
    }

    /// Both sides of a channel with header parameters `params` (as a peer's header holds
    /// them: decoded and checked first), zero-filled: for the fuzz targets.
    pub fn create_like(epoch: u64, params: [u64; 4]) -> Result<[OwnedFd; 2], String> {
        let (layout, mailboxes) = Self::decode(params)?;
        Self::create_with(epoch, params, &layout, &mailboxes).map_err(|e| e.to_string())
    }

    fn create_with(
        epoch: u64,
        params: [u64; 4],
        layout: &InstanceLayout,
        mailboxes: &ClientLayout,
    ) -> io::Result<[OwnedFd; 2]> {
        let side = |name: &str, kind: SegmentKind, size: usize| -> io::Result<OwnedFd> {
            let fd = crate::shm::sys::memfd(name, size as u64)?;
            Mapping::write_header_to(&fd, kind, size as u64, epoch, params)?;
            crate::shm::sys::seal_size(&fd)?;
            Ok(fd)
        };
        let req = side(
            "aegis-channel",
            SegmentKind::Channel,
            Self::request_size(layout, mailboxes),
        )?;
        let token = [crate::shm::sys::random_u64(), crate::shm::sys::random_u64()];
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&token[0].to_ne_bytes());
        bytes[8..].copy_from_slice(&token[1].to_ne_bytes());
        {
            use std::os::unix::fs::FileExt;
            std::fs::File::from(req.try_clone()?).write_all_at(&bytes, Self::TOKEN as u64)?;
        }
        let rep = side(
            "aegis-reply",
            SegmentKind::Reply,
            Self::reply_size(layout, mailboxes),
        )?;
        Ok([req, rep])
    }

    /// Where the channel's token lies on the request side: after the header, before the
    /// ring (bytes otherwise unused).
    const TOKEN: usize = 64;

    /// The channel's token: 128 random bits the broker that made it wrote on the request
    /// side, which only the channel's caller and instance (and that broker) can read. After
    /// a broker restart the new broker never saw the channel; caller and instance each
    /// name it by its token ([`crate::session::proto::Request::ClaimChannels`],
    /// `ReplyHeap`), and the broker matches the two. Knowing it proves holding the
    /// channel; the caller could overwrite it, which only makes its own channel's claim
    /// fail to match.
    pub fn token(&self) -> [u64; 2] {
        let t: &ChannelToken = self.req.at(Self::TOKEN);
        [
            t.0[0].load(Ordering::Relaxed),
            t.0[1].load(Ordering::Relaxed),
        ]
    }

    /// The ring layout and the mailboxes a channel's header parameters describe.
    fn decode(p: [u64; 4]) -> Result<(InstanceLayout, ClientLayout), String> {
        let layout = InstanceLayout {
            slot_size: p[0] as u32,
            slot_count: (p[0] >> 32) as u8 as u32,
            heap_size: 0,
        };
        layout.validate()?;
        if layout.slot_count > CHANNEL_SLOTS {
            return Err(format!(
                "{} slots, at most {CHANNEL_SLOTS}",
                layout.slot_count
            ));
        }
        let mailboxes = ClientLayout::from_params([p[0] >> 40, p[1] >> 32, 0, 0])?;
        Ok((layout, mailboxes))
    }

    /// `[slot_size | slot_count << 32 | mailboxes << 40, instance | mailbox_inline << 32,
    /// incarnation, id]`.
    fn params(
        layout: InstanceLayout,
        mailboxes: ClientLayout,
        instance: u32,
        incarnation: u64,
        id: u64,
    ) -> [u64; 4] {
        [
            layout.slot_size as u64
                | (layout.slot_count as u64) << 32
                | (mailboxes.mailboxes as u64) << 40,
            instance as u64 | (mailboxes.mailbox_inline as u64) << 32,
            incarnation,
            id,
        ]
    }

    /// Maps a channel's request side `req` and reply side `rep` as `party` (each side
    /// writable only in the party that writes it) and checks that they belong together
    /// and lead to instance `(instance, incarnation)` when that is given.
    pub fn open(
        req: &OwnedFd,
        rep: &OwnedFd,
        epoch: u64,
        expect: Option<(u32, u64)>,
        party: Party,
    ) -> Result<ChannelSeg, LayoutError> {
        let (req, h) = Mapping::open(
            req,
            SegmentKind::Channel,
            party == Party::Caller,
            Some(epoch),
        )?;
        let (rep, hr) = Mapping::open(
            rep,
            SegmentKind::Reply,
            party == Party::Instance,
            Some(epoch),
        )?;
        let p = h.params;
        let invalid = |what: String| LayoutError::Invalid {
            kind: SegmentKind::Channel,
            what,
        };
        if hr.params != p {
            return Err(invalid(
                "its request and reply sides belong to different channels".into(),
            ));
        }
        let (layout, mailboxes) = Self::decode(p).map_err(invalid)?;
        let (instance, incarnation) = (p[1] as u32, p[2]);
        if expect.is_some_and(|e| e != (instance, incarnation)) {
            return Err(invalid(format!(
                "leads to instance {instance}/{incarnation}, expected {expect:?}"
            )));
        }
        if Self::request_size(&layout, &mailboxes) != req.len()
            || Self::reply_size(&layout, &mailboxes) != rep.len()
        {
            return Err(invalid("size does not match its parameters".into()));
        }
        let places = Places::locate(&req, &rep, &layout, &mailboxes)
            .ok_or_else(|| invalid("its ring or mailboxes lie outside it".into()))?;
        Ok(ChannelSeg {
            req,
            rep,
            layout,
            mailboxes,
            instance,
            incarnation,
            id: p[3],
            epoch,
            seen_taken_up: std::sync::atomic::AtomicBool::new(false),
            // 0 for every slot: right for slot 0 (free for position 0), and a position no
            // other slot is ever claimed at.
            known_freed: std::array::from_fn(|_| crate::shm::sync::AtomicU64::new(0)),
            heap: std::sync::OnceLock::new(),
            heap_fd: std::sync::OnceLock::new(),
            reply_heap: std::sync::OnceLock::new(),
            reply_heap_opener: parking_lot::Mutex::new(()),
            party,
            pid: std::process::id(),
            places,
        })
    }

    /// Caller: notes that the request it published at ring position `pos` has been
    /// answered, so its slot is free for position `pos + slot_count` (an instance frees a
    /// slot before it publishes any reply to its request). The next claim of that slot
    /// then need not read the slot's freed word, which the instance wrote last: a cache
    /// line fewer to fetch from the instance's core on the call's path.
    ///
    /// SYNC POINT: the Release store pairs with the Acquire load in
    /// [`crate::channel::ring::RingRef::try_claim`]; the caller read the reply after an
    /// Acquire load of its answer word, which the instance stored (Release) after it was
    /// done with the slot, so a thread that claims the slot through this note writes it
    /// only after the instance's last read of it. An instance that answers before it frees
    /// the slot (it breaks the rule) only lets its caller overwrite a request of its own
    /// channel to that instance.
    pub fn note_freed(&self, pos: u64) {
        let slots = self.layout.slot_count as u64;
        if let Some(k) = self.known_freed.get((pos & (slots - 1)) as usize) {
            k.store(pos.wrapping_add(slots), Ordering::Release);
        }
    }

    /// Instance: asks the cache for the request at the head of the ring and the call word
    /// of the mailbox it names (see [`crate::channel::ring::RingRef::prefetch_head`]).
    pub fn prefetch_request(&self) {
        let Some((i, len)) = self.ring().prefetch_head() else {
            return;
        };
        if let Some((mb, inline)) = self.mailbox(i) {
            crate::shm::sys::prefetch(mb.call as *const CallWord as *const u8);
            // And, for writing, as much of the mailbox's inline reply area as the request
            // is long (an echo's reply; a guess, as any): its lines, which the caller read
            // with the last reply there, then need not come back while the reply is
            // written, and publishing it does not wait for them.
            let inline_len = (len as usize).min(self.mailboxes.mailbox_inline as usize);
            use crate::shm::sys::{prefetch_range, PrefetchFor};
            prefetch_range(inline, inline_len, PrefetchFor::Writing);
        }
    }

    /// Maps the heap behind `fd` as this channel's `side` heap (the other party's: read
    /// only, checked sealed against every other writer, its header naming this channel),
    /// once: a second heap for the same side is dropped.
    pub fn adopt_heap(&self, fd: &OwnedFd, side: HeapSide) -> Result<(), LayoutError> {
        let heap = ChannelHeap::open(fd, self.epoch, self.id, side)?;
        let _ = match side {
            HeapSide::Request => self.heap.set(heap),
            HeapSide::Reply => self.reply_heap.set(heap),
        };
        Ok(())
    }

    /// The notes [`ChannelSeg::note_freed`] keeps, one per slot index.
    pub fn known_freed(&self) -> &[crate::shm::sync::AtomicU64] {
        &self.known_freed
    }

    /// A block of `len` bytes of the request heap (its caller only): its offset and
    /// where it is mapped, or `None` when the heap has no room.
    pub fn heap_alloc(&self, len: u64) -> Option<(u64, *mut u8)> {
        self.heap.get()?.alloc_block(len)
    }

    /// Gives request heap block `(off, len)` back (its caller only).
    pub fn heap_free(&self, off: u64, len: u64) {
        if let Some(h) = self.heap.get() {
            h.free_block(off, len);
        }
    }

    /// Bytes of request heap (0 without one).
    pub fn heap_size(&self) -> u64 {
        self.heap.get().map_or(0, |h| h.size)
    }

    /// `len` bytes at `off` of the request heap, or `None` outside it (or without one).
    pub fn heap_range(&self, off: u64, len: u64) -> Option<*mut u8> {
        self.heap.get()?.range(off, len)
    }

    /// A block of `len` bytes of the reply heap (its instance only): its offset and
    /// where it is mapped, or `None` when the heap has no room (or there is none).
    pub fn reply_heap_alloc(&self, len: u64) -> Option<(u64, *mut u8)> {
        self.reply_heap.get()?.alloc_block(len)
    }

    /// Gives reply heap block `(off, len)` back (its instance only).
    pub fn reply_heap_free(&self, off: u64, len: u64) {
        if let Some(h) = self.reply_heap.get() {
            h.free_block(off, len);
        }
    }

    /// `len` bytes at `off` of the reply heap, or `None` outside it (or without one).
    pub fn reply_heap_range(&self, off: u64, len: u64) -> Option<*mut u8> {
        self.reply_heap.get()?.range(off, len)
    }

    /// Mailbox `i` (both halves) and its inline reply area (on the reply side), or `None`
    /// when `i` is out of range.
    #[inline]
    pub fn mailbox(&self, i: u32) -> Option<(Mb<'_>, *mut u8)> {
        if i >= self.mailboxes.mailboxes {
            return None;
        }
        let (i, p) = (i as usize, &self.places);
        // SAFETY: i < mailboxes, and `Places::locate` checked that every mailbox's call
        // word, taken word, header and inline bytes lie inside the mappings, aligned; the
        // mappings live as long as `self`, and the words are atomics (ShmSafe).
        unsafe {
            let ans = p.answers.add(i * self.mailboxes.mailbox_stride());
            Some((
                Mb {
                    call: &*p.calls.add(i),
                    taken: &*p.taken.add(i),
                    ans: &*(ans as *const MailboxHeader),
                },
                ans.add(size_of::<MailboxHeader>()),
            ))
        }
    }

    /// The instance says it has this channel and sweeps it (after it fetched it from the
    /// broker): it sets the reply side's `hint` word, unused otherwise in a channel.
    pub fn mark_taken_up(&self) {
        // Release: pairs with the Acquire in `taken_up` (nothing is read through it; a
        // request published after it is swept because the channel is in the list).
        self.reply_indices().hint.store(1, Ordering::Release);
    }

    /// Whether the instance has taken this channel up. A caller publishes nothing before:
    /// a channel announced by a broker that died before its instance fetched it would
    /// never be looked at.
    pub fn taken_up(&self) -> bool {
        use std::sync::atomic::Ordering as Local;
        if self.seen_taken_up.load(Local::Relaxed) {
            return true;
        }
        let up = self.reply_indices().hint.load(Ordering::Acquire) != 0;
        if up {
            self.seen_taken_up.store(true, Local::Relaxed);
        }
        up
    }

    /// Whether its caller has dropped it (its process let go of the channel, or replaced it
    /// with one the current broker made): no request will be published here any more. The
    /// request side's `hint` word, unused otherwise in a channel; a hint only (the caller
    /// writes it), so the instance drops a channel on it only once its ring is empty, and
    /// a lying caller loses only its own channel.
    pub fn moved_on(&self) -> bool {
        self.request_indices().hint.load(Ordering::Acquire) != 0
    }

    /// The request side's ring indices (`enqueue_pos`: the caller's).
    #[inline]
    pub fn request_indices(&self) -> &RingIndices {
        // SAFETY: checked inside the mapping and aligned by `Places::locate`; the mapping
        // lives as long as `self`.
        unsafe { &*self.places.req_idx }
    }
    /// The reply side's ring indices (`dequeue_pos`, `hint`: the instance's).
    #[inline]
    pub fn reply_indices(&self) -> &RingIndices {
        // SAFETY: as in `request_indices`.
        unsafe { &*self.places.rep_idx }
    }
    /// Base pointer of slot 0 (request side); slot `i` is at `i * slot_stride()`.
    #[inline]
    pub fn slots_base(&self) -> *mut u8 {
        self.places.slots
    }
    /// The freed words (reply side), one per slot.
    #[inline]
    pub fn freed_base(&self) -> *const FreedSlot {
        self.places.freed
    }
}

/// Which party of a channel writes a [`ChannelHeap`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeapSide {
    /// The caller's requests and loans, read by the instance.
    Request = 0,
    /// The instance's replies and reply loans, read by the caller.
    Reply = 1,
}

/// A heap of one channel, written by one of its two parties and read by the other. Its
/// **request heap** holds the caller's requests too large for a ring slot, and its loans
/// ([`crate::Bus::loan`]); its **reply heap** the instance's replies too large for a
/// mailbox, and its reply loans ([`crate::Request::loan_reply`]). A segment of its own
/// (`memfd:aegis-heap`, `memfd:aegis-reply-heap`), made by its writer the first time it
/// needs one in that channel: it maps it writable and seals it `F_SEAL_FUTURE_WRITE`
/// before handing it to the broker (`Request::ChannelHeap`, `Request::ReplyHeap`), which
/// checks the seal and passes it to the channel's other party and to no one else. So what
/// a caller sends one instance, and what that instance answers it, no other process can
/// read, and no one but its writer can write.
pub struct ChannelHeap {
    pub map: Mapping,
    /// Bytes of heap (after the header page).
    pub size: u64,
    /// The writer's allocator of blocks (`None` in the reader).
    pub alloc: Option<HeapAlloc>,
}

impl ChannelHeap {
    /// Bytes of the segment of a heap of `size` bytes (a header page first).
    pub fn seg_size(size: u64) -> usize {
        PAGE + round_up(size as usize, PAGE)
    }

    /// Makes channel `channel`'s heap of `size` bytes on `side` (its writer): header
    /// written, mapped writable here, then sealed against resizing and any other writer.
    pub fn create(
        epoch: u64,
        size: u64,
        channel: u64,
        side: HeapSide,
    ) -> io::Result<(OwnedFd, ChannelHeap)> {
        let total = Self::seg_size(size) as u64;
        let name = match side {
            HeapSide::Request => "aegis-heap",
            HeapSide::Reply => "aegis-reply-heap",
        };
        let fd = crate::shm::sys::memfd(name, total)?;
        let map = Mapping::map(&fd, true)?;
        map.write_header(
            SegmentKind::Heap,
            total,
            epoch,
            [size, channel, side as u64, 0],
        );
        // From here on only this mapping can write the heap, and no one can resize it.
        crate::shm::sys::seal_read_only(&fd)?;
        let heap = ChannelHeap {
            map,
            size,
            alloc: Some(HeapAlloc::new(size)),
        };
        Ok((fd, heap))
    }

    /// Maps channel `channel`'s heap on `side` read-only (the party that reads it), once
    /// checked sealed against every writer but the one that made it.
    pub fn open(
        fd: &OwnedFd,
        epoch: u64,
        channel: u64,
        side: HeapSide,
    ) -> Result<ChannelHeap, LayoutError> {
        let invalid = |what: String| LayoutError::Invalid {
            kind: SegmentKind::Heap,
            what,
        };
        crate::shm::sys::check_write_sealed(fd).map_err(invalid)?;
        let (map, h) = Mapping::open(fd, SegmentKind::Heap, false, Some(epoch))?;
        let size = h.params[0];
        if size > 2 * MAX_MAX_MESSAGE || Self::seg_size(size) != map.len() {
            return Err(invalid(format!("{} bytes for a heap of {size}", map.len())));
        }
        if h.params[1] != channel {
            return Err(invalid(format!(
                "is channel {}'s, expected channel {channel}'s",
                h.params[1]
            )));
        }
        if h.params[2] != side as u64 {
            return Err(invalid(format!(
                "is the heap of side {}, expected the {side:?} side's",
                h.params[2]
            )));
        }
        Ok(ChannelHeap {
            map,
            size,
            alloc: None,
        })
    }

    /// A block of `len` bytes (its writer only, which has the allocator): its offset and
    /// where it is mapped, or `None` when the heap has no room.
    pub fn alloc_block(&self, len: u64) -> Option<(u64, *mut u8)> {
        let off = self.alloc.as_ref()?.alloc(len)?;
        let ptr = self
            .range(off, len)
            .expect("the allocator stays inside the heap");
        Some((off, ptr))
    }

    /// Gives block `(off, len)` back (its writer only).
    pub fn free_block(&self, off: u64, len: u64) {
        if let Some(a) = &self.alloc {
            a.free(off, len);
        }
    }

    /// `len` bytes at `off` of the heap, or `None` outside it.
    pub fn range(&self, off: u64, len: u64) -> Option<*mut u8> {
        if off.checked_add(len)? > self.size {
            return None;
        }
        self.map.range(PAGE as u64 + off, len)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// The caller makes its heap writable for itself alone: sealed before it leaves, so a
    /// second writable mapping (the instance's, anyone's) is refused; the instance maps
    /// it read-only and sees the caller's bytes; ranges stay inside the heap.
    #[test]
    fn a_request_heap_is_written_by_its_caller_and_read_by_its_instance_only() {
        let (fd, mine) = ChannelHeap::create(5, 3 * PAGE as u64, 9, HeapSide::Request).unwrap();
        assert_eq!(mine.size, 3 * PAGE as u64);
        assert!(mine.alloc.is_some());
        crate::shm::sys::check_write_sealed(&fd).expect("sealed by its caller");
        assert!(
            Mapping::map(&fd, true).is_err(),
            "a second writable mapping"
        );
        let theirs = ChannelHeap::open(&fd, 5, 9, HeapSide::Request).unwrap();
        assert!(theirs.alloc.is_none());
        let p = mine.range(PAGE as u64, 4).unwrap();
        // SAFETY: 4 bytes inside our writable mapping.
        unsafe { std::ptr::copy_nonoverlapping(b"abcd".as_ptr(), p, 4) };
        let q = theirs.range(PAGE as u64, 4).unwrap();
        // SAFETY: 4 bytes inside the read-only mapping of the same file.
        assert_eq!(unsafe { std::slice::from_raw_parts(q, 4) }, b"abcd");
        // Heap byte `off` lies `off` bytes past the header page.
        let at = mine.range(8, 4).unwrap();
        // SAFETY: 4 bytes inside our writable mapping.
        unsafe { std::ptr::copy_nonoverlapping(b"wxyz".as_ptr(), at, 4) };
        let raw = theirs.map.range(PAGE as u64 + 8, 4).unwrap();
        // SAFETY: 4 bytes inside the read-only mapping.
        assert_eq!(unsafe { std::slice::from_raw_parts(raw, 4) }, b"wxyz");
        // Bounds: the whole heap, not a byte past it, no overflow.
        assert!(theirs.range(0, theirs.size).is_some());
        assert!(theirs.range(1, theirs.size).is_none());
        assert!(theirs.range(theirs.size, 1).is_none());
        assert!(theirs.range(u64::MAX, 2).is_none());
    }

    /// An instance takes a heap only sealed against other writers, of its channel and bus
    /// run, and of a size that matches its header.
    #[test]
    fn a_request_heap_unsealed_or_of_another_channel_or_run_is_refused() {
        let (fd, _) = ChannelHeap::create(5, PAGE as u64, 9, HeapSide::Request).unwrap();
        let e = ChannelHeap::open(&fd, 5, 10, HeapSide::Request)
            .err()
            .expect("another channel's");
        assert!(e.to_string().contains("channel 9"), "{e}");
        // A request heap handed on as the reply side's (or the other way round).
        let e = ChannelHeap::open(&fd, 5, 9, HeapSide::Reply)
            .err()
            .expect("the other side's");
        assert!(e.to_string().contains("Reply side"), "{e}");
        let (rfd, _) = ChannelHeap::create(5, PAGE as u64, 9, HeapSide::Reply).unwrap();
        assert!(ChannelHeap::open(&rfd, 5, 9, HeapSide::Request).is_err());
        assert!(ChannelHeap::open(&rfd, 5, 9, HeapSide::Reply).is_ok());
        assert!(
            ChannelHeap::open(&fd, 6, 9, HeapSide::Request).is_err(),
            "another run's"
        );
        // Not sealed against writers: its sender (or whoever else holds it) could still
        // write what the instance reads.
        let total = ChannelHeap::seg_size(PAGE as u64) as u64;
        let open = crate::shm::sys::memfd("aegis-heap", total).unwrap();
        crate::shm::sys::seal_size(&open).unwrap();
        Mapping::map(&open, true).unwrap().write_header(
            SegmentKind::Heap,
            total,
            5,
            [PAGE as u64, 9, 0, 0],
        );
        let e = ChannelHeap::open(&open, 5, 9, HeapSide::Request)
            .err()
            .expect("unsealed");
        assert!(e.to_string().contains("F_SEAL_FUTURE_WRITE"), "{e}");
        // A header claiming a larger heap than the segment holds.
        let big = crate::shm::sys::memfd("aegis-heap", 2 * PAGE as u64).unwrap();
        Mapping::map(&big, true).unwrap().write_header(
            SegmentKind::Heap,
            2 * PAGE as u64,
            5,
            [2 * PAGE as u64, 9, 0, 0],
        );
        crate::shm::sys::seal_read_only(&big).unwrap();
        let e = ChannelHeap::open(&big, 5, 9, HeapSide::Request)
            .err()
            .expect("oversized");
        assert!(e.to_string().contains("for a heap of"), "{e}");
        assert_eq!(
            ChannelHeap::seg_size(PAGE as u64 + 1),
            3 * PAGE,
            "rounded up to pages after the header page"
        );
        // The largest heap a bus may have (twice its largest message) opens; one page more
        // does not, even in a segment of its size (both sparse: nothing is touched).
        for (size, ok) in [
            (2 * MAX_MAX_MESSAGE, true),
            (2 * MAX_MAX_MESSAGE + 4096, false),
        ] {
            let total = ChannelHeap::seg_size(size) as u64;
            let fd = crate::shm::sys::memfd("aegis-heap", total).unwrap();
            Mapping::map(&fd, true).unwrap().write_header(
                SegmentKind::Heap,
                total,
                5,
                [size, 9, 0, 0],
            );
            crate::shm::sys::seal_read_only(&fd).unwrap();
            assert_eq!(
                ChannelHeap::open(&fd, 5, 9, HeapSide::Request).is_ok(),
                ok,
                "a heap of {size}"
            );
        }
    }

    /// A channel's ring has at most [`CHANNEL_SLOTS`] slots, fewer when the service has
    /// fewer, and the service's slot size and heap.
    #[test]
    fn a_channel_s_ring_is_the_service_s_capped_at_channel_slots() {
        let service = |slot_count| InstanceLayout {
            slot_size: 512,
            slot_count,
            heap_size: 1 << 20,
        };
        let l = ChannelSeg::layout_for(service(64));
        assert_eq!(
            (l.slot_size, l.slot_count, l.heap_size),
            (512, CHANNEL_SLOTS, 1 << 20)
        );
        assert_eq!(ChannelSeg::layout_for(service(4)).slot_count, 4);
    }

    /// A channel is two segments with one writer each: what the broker hands the other
    /// party is a read-only descriptor that no writable mapping can be made of; the sides
    /// of two channels do not pair; each side carries the other's parameters.
    #[test]
    fn each_side_of_a_channel_is_writable_through_its_writer_s_descriptor_only() {
        let il = InstanceLayout {
            slot_size: 256,
            slot_count: 4,
            heap_size: 0,
        };
        let ml = ClientLayout {
            mailboxes: 3,
            mailbox_inline: 128,
        };
        let [req, rep] = ChannelSeg::create(5, il, ml, 1, 2, 9).unwrap();
        for (fd, kind) in [(&req, SegmentKind::Channel), (&rep, SegmentKind::Reply)] {
            let ro = crate::shm::sys::reopen_read_only(fd).unwrap();
            let e = Mapping::map(&ro, true).err().expect("a writable mapping");
            assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{kind:?}: {e}");
            assert!(Mapping::open(&ro, kind, false, Some(5)).is_ok(), "{kind:?}");
        }
        // The caller with the reply side read-only, the instance with the request side.
        let rep_ro = crate::shm::sys::reopen_read_only(&rep).unwrap();
        let req_ro = crate::shm::sys::reopen_read_only(&req).unwrap();
        assert!(ChannelSeg::open(&req, &rep_ro, 5, Some((1, 2)), Party::Caller).is_ok());
        assert!(ChannelSeg::open(&req_ro, &rep, 5, Some((1, 2)), Party::Instance).is_ok());
        assert!(
            ChannelSeg::open(&req, &rep_ro, 5, None, Party::Instance).is_err(),
            "the instance mapping a reply side it was given read-only"
        );
        assert!(ChannelSeg::open(&req_ro, &rep, 5, None, Party::Broker).is_ok());
        // Sides swapped, or of another channel.
        assert!(ChannelSeg::open(&rep, &req, 5, None, Party::Broker).is_err());
        let [_, other] = ChannelSeg::create(5, il, ml, 1, 2, 10).unwrap();
        let e = ChannelSeg::open(&req, &other, 5, None, Party::Broker)
            .err()
            .expect("sides of two channels");
        assert!(e.to_string().contains("different channels"), "{e}");
        // What lies where: the request side holds the call words, the reply side the
        // answers; a mailbox index past the count has neither.
        let c = ChannelSeg::open(&req, &rep, 5, None, Party::Caller).unwrap();
        assert_eq!(c.req.len(), ChannelSeg::request_size(&il, &ml));
        assert_eq!(c.rep.len(), ChannelSeg::reply_size(&il, &ml));
        let (mb, inline) = c.mailbox(2).unwrap();
        let inside = |m: &Mapping, p: *const u8, len: usize| {
            let base = m.range(0, 0).unwrap() as usize;
            (base..=base + m.len() - len).contains(&(p as usize))
        };
        assert!(inside(&c.req, (mb.call as *const CallWord).cast(), 64));
        assert!(inside(&c.rep, (mb.ans as *const MailboxHeader).cast(), 64));
        assert!(inside(&c.rep, (mb.taken as *const TakenWord).cast(), 8));
        assert_ne!(
            mb.taken as *const TakenWord as usize / 64,
            mb.ans as *const MailboxHeader as usize / 64,
            "the take shares no line with the answer the caller polls"
        );
        assert!(inside(&c.rep, inline, 128));
        assert!(c.mailbox(3).is_none());
    }

    /// A channel's caller allocates and frees blocks in its heap; its instance cannot; a
    /// channel without a heap has no room at all.
    #[test]
    fn only_the_caller_allocates_in_a_channel_s_heap() {
        let il = InstanceLayout {
            slot_size: 256,
            slot_count: 4,
            heap_size: 0,
        };
        let ml = ClientLayout {
            mailboxes: 2,
            mailbox_inline: 64,
        };
        let [req, rep] = ChannelSeg::create(5, il, ml, 1, 2, 9).unwrap();
        let caller = ChannelSeg::open(&req, &rep, 5, Some((1, 2)), Party::Caller).unwrap();
        let instance = ChannelSeg::open(&req, &rep, 5, None, Party::Instance).unwrap();
        assert_eq!(caller.heap_size(), 0);
        assert!(caller.heap_range(0, 1).is_none() && caller.heap_alloc(1).is_none());
        let (hfd, heap) = ChannelHeap::create(5, 4096, 9, HeapSide::Request).unwrap();
        assert!(caller.heap.set(heap).is_ok());
        assert!(instance
            .heap
            .set(ChannelHeap::open(&hfd, 5, 9, HeapSide::Request).unwrap())
            .is_ok());
        assert_eq!((caller.heap_size(), instance.heap_size()), (4096, 4096));
        let (a, _) = caller.heap_alloc(4000).unwrap();
        assert!(caller.heap_alloc(200).is_none(), "over the heap");
        assert!(instance.heap_alloc(1).is_none(), "the instance allocated");
        caller.heap_free(a, 4000);
        assert_eq!(caller.heap_alloc(4096).map(|b| b.0), Some(0));
        assert!(instance.heap_range(0, 4096).is_some());
    }
}
