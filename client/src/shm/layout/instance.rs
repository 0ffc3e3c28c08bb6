//! An instance's segments: the ring (written by callers) and its own memory (counters,
//! progress, durations, reply heap), written by the instance alone.

use std::mem::size_of;
use std::os::fd::OwnedFd;

use super::*;
use crate::shm::sync::{AtomicU32, AtomicU64, Ordering};

// Instance segments: the ring (written by callers) and the instance's own memory
// (counters, progress, durations, reply heap: written by the instance alone).

/// Written by the instance, read by the broker (liveness, admin view).
#[repr(C, align(64))]
pub struct InstanceCounters {
    /// Replies sent, errors included.
    pub requests_served: AtomicU64,
    /// Advanced by the serving loop itself (progress, not a timer): hang detection.
    pub progress: AtomicU64,
    /// Of `requests_served`, the error replies (counted only on that path: the success
    /// path pays nothing for it). Summed by the broker into its metrics when scraped.
    pub requests_failed: AtomicU64,
}

/// Upper bounds (nanoseconds) of a [`Histogram`]'s buckets; the last bucket counts the rest.
pub const HISTOGRAM_BOUNDS_NS: [u64; 16] = [
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    1_000_000_000,
];

/// The upper bound (ns) of the bucket holding quantile `q` of `buckets` (counts per bucket
/// of [`HISTOGRAM_BOUNDS_NS`], the last over every bound: `u64::MAX`), `None` if empty.
pub fn histogram_quantile(buckets: &[u64], q: f64) -> Option<u64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
    let mut seen = 0;
    buckets.iter().enumerate().find_map(|(i, &n)| {
        seen += n;
        (seen >= rank).then(|| HISTOGRAM_BOUNDS_NS.get(i).copied().unwrap_or(u64::MAX))
    })
}

/// A latency histogram of relaxed counters (Prometheus buckets from
/// [`HISTOGRAM_BOUNDS_NS`]): kept in shared memory by the one side that observes, read by
/// the broker when scraped, and also used by the broker for its own durations. A reader
/// may see a bucket and the sum from slightly different moments (relaxed, no pairing):
/// tolerated by every Prometheus consumer.
#[repr(C, align(64))]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last is over every bound.
    pub buckets: [AtomicU64; 17],
    pub sum_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Histogram {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, ns: u64) {
        let b = HISTOGRAM_BOUNDS_NS.partition_point(|&bound| bound < ns);
        self.buckets[b].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }
    /// Bucket counts and the sum, as read now.
    pub fn snapshot(&self) -> ([u64; 17], u64) {
        (
            std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)),
            self.sum_ns.load(Ordering::Relaxed),
        )
    }
}

/// Ring positions. Producer and consumer words sit on separate 128-byte lines (adjacent
/// line prefetch makes 64 too few on x86).
#[repr(C, align(128))]
pub struct RingIndices {
    /// Next position a producer will claim (Vyukov's `enqueue_pos`); in an instance's
    /// ring segment, its doorbell's `scanning` word ([`crate::channel::ring::Doorbell`]).
    pub enqueue_pos: AtomicU64,
    _p0: [u8; 120],
    /// Next position a consumer will take.
    pub dequeue_pos: AtomicU64,
    _p1: [u8; 120],
    /// Futex word consumers sleep on; bumped by a producer that saw `sleepers > 0`.
    pub wake: AtomicU32,
    /// Consumers asleep or about to sleep on `wake`.
    pub sleepers: AtomicU32,
    /// In an instance's ring segment, its doorbell's "may have work" bits, one per channel
    /// id modulo 64 ([`crate::channel::ring::Doorbell`]); on a channel's reply side, the
    /// instance's "taken up" word ([`super::ChannelSeg::taken_up`]); on a channel's request
    /// side, the caller's "moved on" word ([`super::ChannelSeg::moved_on`]). A channel
    /// uses `enqueue_pos` on its request side and `dequeue_pos` on its reply side only.
    pub hint: AtomicU64,
    _p2: [u8; 112],
}

/// Control words at the start of every ring slot.
impl RingIndices {
    /// An empty ring's indices (the broker gets the same from a zeroed segment).
    pub fn new() -> RingIndices {
        RingIndices {
            enqueue_pos: AtomicU64::new(0),
            _p0: [0; 120],
            dequeue_pos: AtomicU64::new(0),
            _p1: [0; 120],
            wake: AtomicU32::new(0),
            sleepers: AtomicU32::new(0),
            hint: AtomicU64::new(0),
            _p2: [0; 112],
        }
    }
}

impl Default for RingIndices {
    fn default() -> Self {
        RingIndices::new()
    }
}

#[repr(C)]
pub struct SlotCtl {
    /// The producer's half of Vyukov's sequence (on the request side of a channel): `pos +
    /// 1` once the message of position `pos` is published. The consumer's half (`pos +
    /// slot_count` once it took it) is the slot's [`FreedSlot`] on the reply side.
    pub seq: AtomicU64,
    pub _pad: u64,
}

/// The consumer's half of a ring slot's sequence, on the reply side of a channel (which
/// only the instance writes): `pos + slot_count` once the consumer took position `pos`
/// (the slot is free for the producer of the next lap). One cache line each.
#[repr(C, align(64))]
pub struct FreedSlot {
    pub seq: AtomicU64,
}
// SAFETY: repr(C), one atomic.
unsafe impl ShmSafe for FreedSlot {}

impl FreedSlot {
    pub fn new() -> FreedSlot {
        FreedSlot {
            seq: AtomicU64::new(0),
        }
    }
}

impl Default for FreedSlot {
    fn default() -> Self {
        FreedSlot::new()
    }
}

/// Request metadata written by the producer between claim and publish (plain memory,
/// owned by the producer until it publishes; copied and validated by the consumer).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MsgHeader {
    pub client_index: u32,
    pub client_gen: u32,
    pub mailbox: u32,
    pub mailbox_gen: u32,
    pub trace_id: u64,
    pub payload_len: u64,
    /// Offset in the channel's request heap when `kind == PAYLOAD_HEAP`.
    pub heap_off: u64,
    pub method_len: u16,
    pub hops: u8,
    pub kind: u8,
    /// W3C trace flags ([`crate::trace::TraceContext::flags`]).
    pub trace_flags: u8,
    pub _pad: [u8; 3],
    /// Random per call, also stored in the caller's mailbox ([`MailboxHeader::nonce`]): an
    /// instance takes and completes the mailbox only when the two match, so a forged or
    /// stale header (generation wrap-around) cannot deliver a reply to another call.
    pub nonce: u64,
    /// The caller's per-connection secret (chosen at `Hello`). Nothing checks it any more
    /// (instances used to show it to be handed the caller's segment, `OpenClient`, which
    /// channels replaced); what binds a request to its mailbox is the nonce.
    pub secret: u64,
    /// When the caller sent the request (`CLOCK_MONOTONIC` nanoseconds, from the clock
    /// read its call already made), 0 if unknown: the instance observes the time from here
    /// to its reply into [`InstanceSeg::durations`]. Only a metric trusts it.
    pub sent_ns: u64,
    /// The high 64 bits of the W3C trace id (`trace_id` holds the low 64).
    pub trace_hi: u64,
    /// The W3C span id of this call (the handler's parent span).
    pub span_id: u64,
    /// When the caller stops waiting for the whole call (`CLOCK_MONOTONIC` nanoseconds,
    /// the same clock in every process of the host), 0 if unknown: the handler sees it as
    /// `Request::deadline`, and calls it makes inherit it.
    pub deadline_ns: u64,
}

#[repr(C, align(64))]
pub struct SlotHeader {
    pub ctl: SlotCtl,
    /// Plain data written through a shared reference by the producer that owns the slot
    /// (hence the cell): see [`crate::channel::ring::Claim::set_header`].
    pub msg: std::cell::UnsafeCell<MsgHeader>,
}

impl SlotHeader {
    pub fn new() -> SlotHeader {
        SlotHeader {
            ctl: SlotCtl {
                seq: AtomicU64::new(0),
                _pad: 0,
            },
            msg: std::cell::UnsafeCell::new(MsgHeader::default()),
        }
    }
}

impl Default for SlotHeader {
    fn default() -> Self {
        SlotHeader::new()
    }
}

// SAFETY: repr(C), atomics and plain integers only.
unsafe impl ShmSafe for InstanceCounters {}
// SAFETY: repr(C), atomics only.
unsafe impl ShmSafe for Histogram {}
// SAFETY: as above.
unsafe impl ShmSafe for RingIndices {}
// SAFETY: `msg` is plain data written only by the producer that owns the slot (between
// claim and publish) and read by consumers only after an Acquire of `ctl.seq`.
unsafe impl ShmSafe for SlotHeader {}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InstanceLayout {
    /// Inline bytes per slot (method name + payload).
    pub slot_size: u32,
    pub slot_count: u32,
    /// Bytes of each reply heap of this instance's channels (twice the service's largest
    /// message); since layout 13 no segment of the instance's own holds a heap.
    pub heap_size: u64,
}

impl InstanceLayout {
    /// In the own segment.
    const COUNTERS: usize = 64;
    const DURATIONS: usize = 128;
    /// Bytes of the own segment: a page (header, counters, durations).
    const OWN: usize = PAGE;
    /// In the ring segment.
    pub(super) const RING: usize = 128;
    pub(super) fn slots_off(&self) -> usize {
        Self::RING + size_of::<RingIndices>()
    }
    pub fn slot_stride(&self) -> usize {
        size_of::<SlotHeader>() + self.slot_size as usize
    }
    /// Bytes of the ring segment (callers write it).
    pub fn ring_size(&self) -> usize {
        round_up(
            self.slots_off() + self.slot_count as usize * self.slot_stride(),
            PAGE,
        )
    }
    /// Bytes of the instance's own segment.
    pub fn own_size(&self) -> usize {
        Self::OWN
    }
    /// Both segments: what the instance costs its uid's shared-memory quota.
    pub fn total_size(&self) -> usize {
        self.ring_size() + self.own_size()
    }
    pub fn validate(&self) -> Result<(), String> {
        if !(MIN_SLOT_SIZE..=MAX_SLOT_SIZE).contains(&self.slot_size) || self.slot_size % 64 != 0 {
            return Err(format!(
                "slot size {} is not a multiple of 64 in {MIN_SLOT_SIZE}..={MAX_SLOT_SIZE}",
                self.slot_size
            ));
        }
        if !self.slot_count.is_power_of_two() || !(2..=MAX_SLOT_COUNT).contains(&self.slot_count) {
            return Err(format!(
                "slot count {} is not a power of two in 2..={MAX_SLOT_COUNT}",
                self.slot_count
            ));
        }
        if self.heap_size > 2 * MAX_MAX_MESSAGE {
            return Err(format!(
                "heap size {} is over {}",
                self.heap_size,
                2 * MAX_MAX_MESSAGE
            ));
        }
        Ok(())
    }
    pub fn params(&self, index: u32, incarnation: u64) -> [u64; 4] {
        [
            self.slot_size as u64 | (self.slot_count as u64) << 32,
            self.heap_size,
            incarnation,
            index as u64,
        ]
    }
}

/// One instance's two segments as mapped by its owner, the broker or a caller: the ring
/// (read-write for everyone who has it) and the instance's own memory (writable only in
/// the instance's process, which mapped it before sealing it; read-only everywhere else).
pub struct InstanceSeg {
    pub map: Mapping,
    pub own: Mapping,
    pub layout: InstanceLayout,
    pub index: u32,
    pub incarnation: u64,
    /// A caller's channel to this instance (`None` in the instance and the broker).
    pub channel: Option<std::sync::Arc<ChannelSeg>>,
}

impl InstanceSeg {
    /// Creates an instance's own segment (counters, durations; `heap_size`: the bytes of
    /// its channels' reply heaps, stated in the header): mapped writable here, then sealed so that no other mapping can ever write it
    /// (`F_SEAL_FUTURE_WRITE`). Returns the descriptor (for the broker) and our mapping.
    pub fn create_own(epoch: u64, heap_size: u64) -> io::Result<(OwnedFd, Mapping)> {
        let size = InstanceLayout {
            slot_size: MIN_SLOT_SIZE,
            slot_count: 2,
            heap_size,
        }
        .own_size() as u64;
        let fd = crate::shm::sys::memfd("aegis-own", size)?;
        let map = Mapping::map(&fd, true)?;
        map.write_header(SegmentKind::InstanceOwn, size, epoch, [heap_size, 0, 0, 0]);
        crate::shm::sys::seal_read_only(&fd)?;
        Ok((fd, map))
    }

    /// Maps an instance's own segment read-only (a caller or the broker) after checking
    /// that nobody can map it writable any more, and returns the size of its channels' reply
    /// heaps.
    pub fn open_own(fd: &OwnedFd) -> Result<(Mapping, u64), LayoutError> {
        let invalid = |what: String| LayoutError::Invalid {
            kind: SegmentKind::InstanceOwn,
            what,
        };
        crate::shm::sys::check_write_sealed(fd).map_err(invalid)?;
        let (map, h) = Mapping::open(fd, SegmentKind::InstanceOwn, false, None)?;
        let heap = h.params[0];
        if heap > 2 * MAX_MAX_MESSAGE {
            return Err(invalid(format!("reply heap of {heap} bytes is too large")));
        }
        let want = InstanceLayout {
            slot_size: MIN_SLOT_SIZE,
            slot_count: 2,
            heap_size: heap,
        }
        .own_size();
        if want != map.len() {
            return Err(invalid("size does not match its parameters".into()));
        }
        Ok((map, heap))
    }

    /// Opens an instance's ring segment and checks it is the one the registry names and
    /// that `own` (from [`InstanceSeg::create_own`] or [`InstanceSeg::open_own`]) has the
    /// reply heap the ring's header states.
    pub fn open(
        fd: &OwnedFd,
        own: Mapping,
        epoch: u64,
        index: u32,
        incarnation: u64,
    ) -> Result<InstanceSeg, LayoutError> {
        let (map, h) = Mapping::open(fd, SegmentKind::Instance, true, Some(epoch))?;
        let p = h.params;
        let layout = InstanceLayout {
            slot_size: p[0] as u32,
            slot_count: (p[0] >> 32) as u32,
            heap_size: p[1],
        };
        let invalid = |what: String| LayoutError::Invalid {
            kind: SegmentKind::Instance,
            what,
        };
        layout.validate().map_err(invalid)?;
        if p[2] != incarnation || p[3] != index as u64 {
            return Err(invalid(format!(
                "is instance {}/{} , expected {index}/{incarnation}",
                p[3], p[2]
            )));
        }
        Self::assemble(map, own, layout, (index, incarnation))
    }

    /// Instance `(index, incarnation)`'s segments, mapped, as a segment of `layout`: their
    /// sizes must be its.
    fn assemble(
        map: Mapping,
        own: Mapping,
        layout: InstanceLayout,
        (index, incarnation): (u32, u64),
    ) -> Result<InstanceSeg, LayoutError> {
        let invalid = |what: String| LayoutError::Invalid {
            kind: SegmentKind::Instance,
            what,
        };
        if layout.ring_size() != map.len() {
            return Err(invalid("size does not match its parameters".into()));
        }
        if layout.own_size() != own.len() {
            return Err(invalid(format!(
                "its own segment has {} bytes, the ring states a {}-byte reply heap",
                own.len(),
                layout.heap_size
            )));
        }
        Ok(InstanceSeg {
            map,
            own,
            layout,
            index,
            incarnation,
            channel: None,
        })
    }
    /// Maps an instance's ring segment writable as a segment of `layout` (known from
    /// elsewhere than its header, which is not read): its size, sealed, must be
    /// `layout`'s. (A caller, with the registry's sizing; a broker, with the layout it
    /// stamped or adopted.)
    pub fn open_ring_as(
        ring: &OwnedFd,
        own: Mapping,
        layout: InstanceLayout,
        index: u32,
        incarnation: u64,
    ) -> Result<InstanceSeg, LayoutError> {
        layout.validate().map_err(|what| LayoutError::Invalid {
            kind: SegmentKind::Instance,
            what,
        })?;
        let map = Mapping::open_sized(ring, SegmentKind::Instance, true, layout.ring_size())?;
        Self::assemble(map, own, layout, (index, incarnation))
    }

    /// Opens what a caller with `mailboxes` is handed for an instance: its ring segment
    /// (the doorbell) read-write, its own memory read-only, and the caller's channel to it
    /// (request side writable, reply side read-only; it must hold all of the caller's
    /// mailboxes).
    ///
    /// `sizing` is the slot size and count of the instance's service as the broker's
    /// registry (sealed, broker-written) states them. The ring segment's own header is then
    /// not read: every caller of the instance maps that segment writable, so any of them
    /// can have rewritten it, and a caller that trusted it failed to open the instance
    /// (`tests/isolation.rs`, `a_caller_scribbling_an_instance_s_doorbell_header_…`). The
    /// layout comes from the registry and the instance's own segment (sealed); the
    /// segment's size, sealed, must be the one they give. Without `sizing` (the registry no
    /// longer shows that incarnation: it is leaving), the header is read as before.
    pub fn open_for_caller(
        fds: &[OwnedFd],
        epoch: u64,
        (index, incarnation): (u32, u64),
        mailboxes: &ClientLayout,
        sizing: Option<(u32, u32)>,
    ) -> Result<InstanceSeg, LayoutError> {
        let [ring, own, req, rep] = fds else {
            return Err(LayoutError::Invalid {
                kind: SegmentKind::Instance,
                what: format!(
                    "{} descriptors, expected ring, own and the channel's two sides",
                    fds.len()
                ),
            });
        };
        let (own, heap_size) = Self::open_own(own)?;
        let channel = ChannelSeg::open(
            req,
            rep,
            epoch,
            Some((index, incarnation)),
            super::Party::Caller,
        )?;
        let mut seg = match sizing {
            Some((slot_size, slot_count)) => {
                let layout = InstanceLayout {
                    slot_size,
                    slot_count,
                    heap_size,
                };
                Self::open_ring_as(ring, own, layout, index, incarnation)?
            }
            None => Self::open(ring, own, epoch, index, incarnation)?,
        };
        if channel.layout.slot_size != seg.layout.slot_size {
            return Err(LayoutError::Invalid {
                kind: SegmentKind::Channel,
                what: format!(
                    "slots of {} bytes, the instance's of {}",
                    channel.layout.slot_size, seg.layout.slot_size
                ),
            });
        }
        let m = &channel.mailboxes;
        if (m.mailboxes, m.mailbox_inline) != (mailboxes.mailboxes, mailboxes.mailbox_inline) {
            return Err(LayoutError::Invalid {
                kind: SegmentKind::Channel,
                what: format!(
                    "{} mailboxes of {} bytes, the connection has {} of {}",
                    m.mailboxes, m.mailbox_inline, mailboxes.mailboxes, mailboxes.mailbox_inline
                ),
            });
        }
        seg.channel = Some(std::sync::Arc::new(channel));
        Ok(seg)
    }
    pub fn counters(&self) -> &InstanceCounters {
        self.own.at(InstanceLayout::COUNTERS)
    }
    pub fn ring_indices(&self) -> &RingIndices {
        self.map.at(InstanceLayout::RING)
    }
    /// Request durations (send to reply), observed by the instance after each reply.
    pub fn durations(&self) -> &Histogram {
        self.own.at(InstanceLayout::DURATIONS)
    }
    /// Base pointer of slot 0; slot `i` is at `i * slot_stride()`.
    pub fn slots_base(&self) -> *mut u8 {
        let len = self.layout.slot_count as u64 * self.layout.slot_stride() as u64;
        self.map
            .range(self.layout.slots_off() as u64, len)
            .expect("validated layout")
    }
}

#[cfg(not(loom))]
const _: () = {
    assert!(size_of::<InstanceCounters>() == 64);
    assert!(size_of::<RingIndices>() == 384 && std::mem::align_of::<RingIndices>() == 128);
    assert!(size_of::<SlotCtl>() == 16);
    assert!(size_of::<MsgHeader>() == 96);
    assert!(size_of::<Histogram>() == 192);
    assert!(InstanceLayout::DURATIONS + size_of::<Histogram>() <= InstanceLayout::OWN);
    assert!(size_of::<SlotHeader>() == 128 && std::mem::align_of::<SlotHeader>() == 64);
    assert!(InstanceLayout::RING % 128 == 0);
};

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_are_bucket_bounds() {
        let h = Histogram::default();
        for ns in [1_000, 7_000, 7_000, 40_000, 2_000_000_000] {
            h.observe(ns);
        }
        let (b, sum) = h.snapshot();
        assert_eq!(sum, 2_000_055_000);
        assert_eq!(histogram_quantile(&b, 0.2), Some(5_000));
        assert_eq!(histogram_quantile(&b, 0.5), Some(10_000));
        assert_eq!(histogram_quantile(&b, 0.8), Some(50_000));
        assert_eq!(histogram_quantile(&b, 0.99), Some(u64::MAX));
        assert_eq!(histogram_quantile(&[0; 17], 0.5), None);
    }
}
