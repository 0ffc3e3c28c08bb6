//! A connected process's segments: the client segment (its async doorbell), its request
//! heap (a segment of its own, sealed read-only for everyone else once the process mapped
//! it), its caller segment (breakers and failure counters, mapped by it and the broker only).

use std::mem::size_of;
use std::os::fd::OwnedFd;

use super::*;
use crate::shm::sync::{AtomicU32, AtomicU64};

// Reply mailboxes (in each channel), the client segment (doorbell) and the request heap.

/// Mailbox state word: `generation << 8 | waiter << 4 | phase`.
///
/// SYNC POINT: the instance publishes a reply with a Release swap to `READY`; the caller
/// reads the reply after an Acquire load that sees `READY`.
#[repr(C, align(64))]
pub struct MailboxHeader {
    pub state: AtomicU32,
    /// 0 on success, else an error code (see `error::Code`).
    pub status: AtomicU32,
    /// Registry index of the instance that took the request.
    pub instance: AtomicU32,
    pub reply_kind: AtomicU32,
    pub reply_len: AtomicU64,
    /// Offset in the instance's heap when `reply_kind == PAYLOAD_HEAP`.
    pub heap_off: AtomicU64,
    pub incarnation: AtomicU64,
    /// The current call's nonce ([`MsgHeader::nonce`]), written by the caller before it
    /// arms the mailbox.
    pub nonce: AtomicU64,
    /// Pid of the process that took the request (written before its take): a caller whose
    /// call timed out keeps the mailbox quarantined while that process lives.
    pub taker_pid: AtomicU32,
    pub _pad: u32,
}
// SAFETY: repr(C), atomics only.
unsafe impl ShmSafe for MailboxHeader {}

/// The client segment's control words, in the 64 bytes after its header.
#[repr(C, align(64))]
pub struct ClientControl {
    /// Bumped (and futex-woken) by an instance that completes a mailbox an async waiter
    /// sleeps on (`mailbox::ASYNC`): the connection's doorbell thread waits on it.
    pub doorbell: AtomicU32,
}
// SAFETY: repr(C), one atomic.
unsafe impl ShmSafe for ClientControl {}

/// Circuit-breaker states ([`CallerStats::breaker`]).
pub const BREAKER_CLOSED: u32 = 0;
pub const BREAKER_OPEN: u32 = 1;
pub const BREAKER_HALF_OPEN: u32 = 2;

/// The `error_type` label of each [`CallerStats::errors`] counter.
pub const ERROR_TYPES: [&str; 10] = [
    "NoAvailableInstance",
    "Timeout",
    "BadRequest",
    "Remote",
    "MessageTooLarge",
    "LimitExceeded",
    "OwnerUnavailable",
    "ResourceNotFound",
    "CircuitOpen",
    "Other",
];

/// One service as seen by one connected caller, in that caller's [`CallerSeg`] (one per
/// registry service index): its circuit breaker and its failure counters, written by the
/// caller's threads with relaxed atomics (failure paths only; a successful call reads
/// `breaker` and `failures_in_row`), read by the broker when scraped or ticking. No other
/// process maps it. A caller that lies here misleads only the metrics about its own calls:
/// the broker counts them only for services the caller opened (so the policy let it call
/// them), with saturating sums.
#[repr(C, align(64))]
pub struct CallerStats {
    /// `BREAKER_*`.
    pub breaker: AtomicU32,
    /// Calls that failed in a row for the bus's reasons (every attempt timed out).
    pub failures_in_row: AtomicU32,
    /// When the breaker last opened (`CLOCK_MONOTONIC` nanoseconds).
    pub opened_ns: AtomicU64,
    /// The service's generation when it opened: a membership or health change lets a probe
    /// through before the open period ends.
    pub opened_gen: AtomicU32,
    pub _pad: u32,
    /// Failed calls by `ERROR_TYPES`.
    pub errors: [AtomicU64; 10],
    /// Calls that needed attempt 2, 3, 4 and 5 or more.
    pub retries: [AtomicU64; 4],
}
// SAFETY: repr(C), atomics only.
unsafe impl ShmSafe for CallerStats {}

/// A connection's mailboxes (how many, inline bytes each: the same in each of its
/// channels) and its request heap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientLayout {
    pub mailboxes: u32,
    pub mailbox_inline: u32,
    pub heap_size: u64,
}

impl ClientLayout {
    const CONTROL: usize = 64;
    /// The end of the control words (mailboxes were here before they moved to channels).
    const MAILBOXES: usize = 128;
    pub fn mailbox_stride(&self) -> usize {
        size_of::<MailboxHeader>() + self.mailbox_inline as usize
    }
    /// Bytes of the client segment (header, control words).
    pub fn client_size(&self) -> usize {
        round_up(Self::MAILBOXES, PAGE)
    }
    /// Where the heap starts in the heap segment (after its header page).
    pub fn heap_off(&self) -> usize {
        PAGE
    }
    /// Bytes of the heap segment.
    pub fn heap_seg_size(&self) -> usize {
        self.heap_off() + round_up(self.heap_size as usize, PAGE)
    }
    /// Both segments: what a connection costs its uid's shared-memory quota (with its
    /// caller segment and channels).
    pub fn total_size(&self) -> usize {
        self.client_size() + self.heap_seg_size()
    }
    /// The layout `params` describe (index and generation aside), checked for range.
    pub fn from_params(p: [u64; 4]) -> Result<ClientLayout, String> {
        let mailboxes = p[0];
        if mailboxes == 0 || mailboxes > 1 << 16 || p[1] % 64 != 0 || p[1] > MAX_SLOT_SIZE as u64 {
            return Err(format!("bad mailbox parameters {p:?}"));
        }
        if p[2] > 2 * MAX_MAX_MESSAGE {
            return Err(format!("heap size {} too large", p[2]));
        }
        Ok(ClientLayout {
            mailboxes: mailboxes as u32,
            mailbox_inline: p[1] as u32,
            heap_size: p[2],
        })
    }
    pub fn params(&self, index: u32, gen: u32) -> [u64; 4] {
        [
            self.mailboxes as u64,
            self.mailbox_inline as u64,
            self.heap_size,
            index as u64 | (gen as u64) << 32,
        ]
    }
}

pub struct ClientSeg {
    /// The client segment: header and control words (its async doorbell).
    pub map: Mapping,
    /// The request heap segment: writable in its process only (sealed
    /// `F_SEAL_FUTURE_WRITE` once that process mapped it); read-only everywhere else.
    pub heap: Mapping,
    pub layout: ClientLayout,
    pub index: u32,
    pub gen: u32,
    /// The uid of the connection's peer as the broker saw it (set by an instance that was
    /// handed this caller's segment; [`ClientSeg::UID_UNKNOWN`] otherwise).
    pub uid: u32,
}

impl ClientSeg {
    /// Creates a connection's client and heap segments (broker): headers written, sizes
    /// sealed. The heap is left for its process to seal against writing (it must map it
    /// writable first): [`ClientSeg::open`] with `own` does.
    pub fn create(
        epoch: u64,
        layout: ClientLayout,
        index: u32,
        gen: u32,
    ) -> io::Result<(OwnedFd, OwnedFd)> {
        let make = |name: &str, kind, size: usize| -> io::Result<OwnedFd> {
            let fd = crate::shm::sys::memfd(name, size as u64)?;
            Mapping::map(&fd, true)?.write_header(
                kind,
                size as u64,
                epoch,
                layout.params(index, gen),
            );
            crate::shm::sys::add_seals(&fd, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW)?;
            Ok(fd)
        };
        let client = make("aegis-client", SegmentKind::Client, layout.client_size())?;
        // No one seals the client segment against writers (instances ring its doorbell);
        // F_SEAL_SEAL keeps it so.
        crate::shm::sys::seal_size(&client)?;
        let heap = make("aegis-heap", SegmentKind::Heap, layout.heap_seg_size())?;
        Ok((client, heap))
    }

    /// Maps a connection's client segment (read-write) and heap segment: writable and then
    /// sealed against any other writer when `own` (its own process, once, at connect),
    /// read-only otherwise. Its own process reads the layout from the client segment's
    /// header and checks `(index, gen)` and `epoch` when given; anyone else reads it from
    /// the heap's header, which no one but that process could ever write, and takes the
    /// client segment by its sealed size only: every instance the process opened maps
    /// the client segment writable (its doorbell word), so its header is not to be
    /// trusted (a hostile instance rewriting it must not keep the others from mapping
    /// it).
    pub fn open(
        (client, heap): (&OwnedFd, &OwnedFd),
        epoch: Option<u64>,
        ident: Option<(u32, u32)>,
        own: bool,
    ) -> Result<ClientSeg, LayoutError> {
        let invalid = |kind, what: String| LayoutError::Invalid { kind, what };
        if !own {
            crate::shm::sys::check_write_sealed(heap).map_err(|e| invalid(SegmentKind::Heap, e))?;
        }
        let (heap_map, hh) = Mapping::open(heap, SegmentKind::Heap, own, None)?;
        if own {
            // From here on only this mapping can write the heap: whoever else is handed it
            // (the instances this process opens) can only read it.
            crate::shm::sys::seal_read_only(heap)
                .map_err(|e| invalid(SegmentKind::Heap, format!("sealing against writers: {e}")))?;
        }
        let layout =
            ClientLayout::from_params(hh.params).map_err(|e| invalid(SegmentKind::Heap, e))?;
        if layout.heap_seg_size() != heap_map.len() {
            return Err(invalid(
                SegmentKind::Heap,
                "size does not match its parameters".into(),
            ));
        }
        let map = if own {
            let (map, h) = Mapping::open(client, SegmentKind::Client, true, epoch)?;
            if h.params[..3] != hh.params[..3] {
                return Err(invalid(
                    SegmentKind::Client,
                    "does not match its heap segment".into(),
                ));
            }
            if let Some((index, gen)) = ident {
                if h.params[3] != (index as u64 | (gen as u64) << 32) {
                    return Err(invalid(
                        SegmentKind::Client,
                        format!("is client {}, expected {index}/{gen}", h.params[3]),
                    ));
                }
            }
            map
        } else {
            crate::shm::sys::check_size_sealed(client, Some(layout.client_size() as u64))
                .map_err(|e| invalid(SegmentKind::Client, e))?;
            Mapping::map(client, true)?
        };
        if layout.client_size() != map.len() {
            return Err(invalid(
                SegmentKind::Client,
                "size does not match its parameters".into(),
            ));
        }
        let (index, gen) = ident.unwrap_or((hh.params[3] as u32, (hh.params[3] >> 32) as u32));
        Ok(ClientSeg {
            map,
            heap: heap_map,
            layout,
            index,
            gen,
            uid: Self::UID_UNKNOWN,
        })
    }

    /// [`ClientSeg::uid`] when the broker did not say.
    pub const UID_UNKNOWN: u32 = u32::MAX;

    /// This segment, its peer's uid known.
    pub fn with_uid(mut self, uid: u32) -> ClientSeg {
        self.uid = uid;
        self
    }
    /// The connection's doorbell (see [`ClientControl`]).
    pub fn doorbell(&self) -> &AtomicU32 {
        &self.map.at::<ClientControl>(ClientLayout::CONTROL).doorbell
    }
    /// `len` bytes at `off` of the request heap (read-only outside its own process).
    pub fn heap_range(&self, off: u64, len: u64) -> Option<*mut u8> {
        if off.checked_add(len)? > self.layout.heap_size {
            return None;
        }
        self.heap.range(self.layout.heap_off() as u64 + off, len)
    }
}

/// A connected caller's breakers and failure counters, one [`CallerStats`] per registry
/// service index: created by the broker at `Hello` (one per broker run, so service indices
/// always mean this run's services) and handed to that caller only.
pub struct CallerSeg {
    pub map: Mapping,
    pub services: u32,
}

impl CallerSeg {
    const STATS: usize = 64;
    /// Bytes of a caller segment for `services` services.
    pub fn size(services: u32) -> usize {
        round_up(
            Self::STATS + services as usize * size_of::<CallerStats>(),
            PAGE,
        )
    }
    pub fn open(fd: &OwnedFd, epoch: u64) -> Result<CallerSeg, LayoutError> {
        let (map, h) = Mapping::open(fd, SegmentKind::Caller, true, Some(epoch))?;
        let services = h.params[0];
        if services > 1 << 16 || Self::size(services as u32) != map.len() {
            return Err(LayoutError::Invalid {
                kind: SegmentKind::Caller,
                what: format!("{} bytes for {services} services", map.len()),
            });
        }
        Ok(CallerSeg {
            map,
            services: services as u32,
        })
    }
    /// This caller's breaker and counters for registry service `service`, or `None` past
    /// the segment's capacity.
    pub fn caller_stats(&self, service: u32) -> Option<&CallerStats> {
        (service < self.services).then(|| {
            self.map
                .at(Self::STATS + service as usize * size_of::<CallerStats>())
        })
    }
}

#[cfg(not(loom))]
const _: () = {
    assert!(size_of::<CallerStats>() == 192);
    assert!(size_of::<MailboxHeader>() == 64);
    assert!(ClientLayout::MAILBOXES % 64 == 0 && MAILBOX_INLINE % 64 == 0);
    assert!(size_of::<ClientControl>() == 64);
    assert!(ClientLayout::CONTROL + size_of::<ClientControl>() <= ClientLayout::MAILBOXES);
};
