//! A connected process's segments: the client segment (its async doorbell) and its caller
//! segment (breakers and failure counters, mapped by it and the broker only). Its requests
//! and their heaps are in its channels ([`super::channel`]).

use std::mem::size_of;
use std::os::fd::OwnedFd;

use super::*;
use crate::shm::sync::{AtomicU32, AtomicU64};

// Reply mailboxes (in each channel) and the client segment (doorbell).

/// The instance's answer in a reply mailbox, on the reply side of a channel (which only
/// the instance writes): its answer state `generation << 8 | phase` (`READY`, see
/// [`crate::channel::mailbox`]) and the reply, the inline bytes following. The line the
/// caller polls: nothing but the answer is written to it during a call (the take is in the
/// mailbox's [`TakenWord`]). The caller's half is the mailbox's [`CallWord`] on the
/// request side.
///
/// SYNC POINT: the instance publishes a reply with a Release store of `READY`; the caller
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
    /// Offset in the channel's reply heap when `reply_kind == PAYLOAD_CHANNEL_HEAP`.
    pub heap_off: AtomicU64,
    pub incarnation: AtomicU64,
    pub _pad: [u32; 4],
}
// SAFETY: repr(C), atomics only.
unsafe impl ShmSafe for MailboxHeader {}

/// The caller's half of a reply mailbox, on the request side of a channel (which only the
/// caller writes): its call state `generation << 8 | flags | phase` (`PENDING`,
/// `CANCELLED` or `FREE`, the `WAITER` and `ASYNC` flags; see [`crate::channel::mailbox`])
/// and the call's nonce ([`MsgHeader::nonce`]), written before the call is armed.
#[repr(C, align(64))]
pub struct CallWord {
    pub state: AtomicU32,
    pub _pad: u32,
    pub nonce: AtomicU64,
}
// SAFETY: repr(C), atomics only.
unsafe impl ShmSafe for CallWord {}

impl CallWord {
    pub fn new() -> CallWord {
        CallWord {
            state: AtomicU32::new(0),
            _pad: 0,
            nonce: AtomicU64::new(0),
        }
    }
}

impl Default for CallWord {
    fn default() -> Self {
        CallWord::new()
    }
}

/// The instance's take of a reply mailbox, on the reply side of a channel: `generation <<
/// 8 | phase` (`TAKEN`, `DONE` or `DECLINED`, see [`crate::channel::mailbox`]) and the pid
/// of the process that took the request (written before its take: a caller whose call
/// timed out keeps the mailbox quarantined while that process lives). Eight to a cache
/// line, apart from the answers: the caller reads them only when a call outlasts a spin's
/// grace or is cancelled, so a take writes a line no caller core holds.
#[repr(C)]
pub struct TakenWord {
    pub state: AtomicU32,
    pub taker_pid: AtomicU32,
}
// SAFETY: repr(C), atomics only.
unsafe impl ShmSafe for TakenWord {}

impl TakenWord {
    pub fn new() -> TakenWord {
        TakenWord {
            state: AtomicU32::new(0),
            taker_pid: AtomicU32::new(0),
        }
    }
}

impl Default for TakenWord {
    fn default() -> Self {
        TakenWord::new()
    }
}

/// The client segment's control words, in the 64 bytes after its header: none in use
/// since layout 12 (the async doorbell word that was here, which every instance the
/// client called could write, gave way to the mailboxes' own answer words).
#[repr(C, align(64))]
pub struct ClientControl {
    pub _reserved: AtomicU32,
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
/// channels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientLayout {
    pub mailboxes: u32,
    pub mailbox_inline: u32,
}

impl ClientLayout {
    const CONTROL: usize = 64;
    /// The end of the control words (mailboxes were here before they moved to channels).
    const MAILBOXES: usize = 128;
    pub fn mailbox_stride(&self) -> usize {
        size_of::<MailboxHeader>() + self.mailbox_inline as usize
    }
    /// Bytes of the client segment (header, control words): one page.
    pub const fn client_size() -> usize {
        round_up(Self::MAILBOXES, PAGE)
    }
    /// The layout `params` describe (index and generation aside), checked for range.
    pub fn from_params(p: [u64; 4]) -> Result<ClientLayout, String> {
        let mailboxes = p[0];
        if mailboxes == 0 || mailboxes > 1 << 16 || p[1] % 64 != 0 || p[1] > MAX_SLOT_SIZE as u64 {
            return Err(format!("bad mailbox parameters {p:?}"));
        }
        Ok(ClientLayout {
            mailboxes: mailboxes as u32,
            mailbox_inline: p[1] as u32,
        })
    }
    pub fn params(&self, index: u32, gen: u32) -> [u64; 4] {
        [
            self.mailboxes as u64,
            self.mailbox_inline as u64,
            0,
            index as u64 | (gen as u64) << 32,
        ]
    }
}

/// A connection's client segment as its own process maps it: the header, which says its
/// mailboxes, and the async doorbell.
pub struct ClientSeg {
    pub map: Mapping,
    pub layout: ClientLayout,
    pub index: u32,
    pub gen: u32,
}

impl ClientSeg {
    /// Creates a connection's client segment (broker): header written, size sealed. No
    /// one seals it against writers (the instances it calls ring its doorbell);
    /// `F_SEAL_SEAL` keeps it so.
    pub fn create(epoch: u64, layout: ClientLayout, index: u32, gen: u32) -> io::Result<OwnedFd> {
        let fd = crate::shm::sys::memfd("aegis-client", ClientLayout::client_size() as u64)?;
        crate::shm::sys::seal_size(&fd)?;
        Self::stamp(&fd, epoch, layout, index, gen)?;
        Ok(fd)
    }

    /// Writes the header of client segment `fd`: when it is made, and again when a broker
    /// adopts a resuming client's segment (every instance the client opened could write
    /// the old header, so it is not trusted).
    pub fn stamp(
        fd: &OwnedFd,
        epoch: u64,
        layout: ClientLayout,
        index: u32,
        gen: u32,
    ) -> io::Result<()> {
        let size = ClientLayout::client_size() as u64;
        // Size-sealed before it is mapped: a resuming client hands this segment back, and
        // one that could still shrink would SIGBUS the broker writing it.
        crate::shm::sys::check_size_sealed(fd, Some(size)).map_err(io::Error::other)?;
        Mapping::map(fd, true)?.write_header(
            SegmentKind::Client,
            size,
            epoch,
            layout.params(index, gen),
        );
        Ok(())
    }

    /// Maps this process's own client segment and checks that it is client
    /// `(index, gen)` of bus `epoch`, when those are given.
    pub fn open(
        client: &OwnedFd,
        epoch: Option<u64>,
        ident: Option<(u32, u32)>,
    ) -> Result<ClientSeg, LayoutError> {
        let invalid = |what: String| LayoutError::Invalid {
            kind: SegmentKind::Client,
            what,
        };
        let (map, h) = Mapping::open(client, SegmentKind::Client, true, epoch)?;
        let layout = ClientLayout::from_params(h.params).map_err(invalid)?;
        if ClientLayout::client_size() != map.len() {
            return Err(invalid("size does not match its parameters".into()));
        }
        let (index, gen) = (h.params[3] as u32, (h.params[3] >> 32) as u32);
        if ident.is_some_and(|i| i != (index, gen)) {
            return Err(invalid(format!(
                "is client {index}/{gen}, expected {ident:?}"
            )));
        }
        Ok(ClientSeg {
            map,
            layout,
            index,
            gen,
        })
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
