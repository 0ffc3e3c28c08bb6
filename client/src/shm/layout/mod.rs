//! The shared-memory layout: every `#[repr(C)]` type that lives in a segment, the
//! offsets between them, and the checks made when a segment is opened. No other module
//! computes an offset into shared memory.
//!
//! A bus has these kinds of segment, all memfds created by the broker (but an instance's
//! own, which it creates and seals itself) and handed to peers
//! over the control socket (`SCM_RIGHTS`):
//!
//! | segment  | one per          | mapped                                   |
//! |----------|------------------|------------------------------------------|
//! | registry | bus              | read-only by everyone (sealed), written by the broker |
//! | shared   | bus              | read-write by every member: spin seats |
//! | ring     | instance         | read-write by its callers: the doorbell (hint bits, futex word; its slots are unused) |
//! | channel  | caller × instance | read-write by that caller and that instance only: the caller's request ring to it, and the mailboxes it answers in |
//! | own      | instance         | written by the instance only (sealed `F_SEAL_FUTURE_WRITE` before it leaves it), read-only to the broker and callers: counters, progress, durations, reply heap |
//! | client   | connected process| read-write by it and the instances it calls: its async doorbell word |
//! | heap     | caller (per channel) | written by the channel's caller only (it makes it, maps it and seals it `F_SEAL_FUTURE_WRITE` before handing it over), read-only to the channel's instance: that caller's large requests and loans to it |
//! | caller   | connected process| read-write by it, read by the broker, by no one else: its breakers and failure counters per service |
//!
//! Every segment starts with a [`SegmentHeader`] (magic, layout version, kind, size, bus
//! epoch, four sizing parameters). Opening a segment re-derives the whole layout from the
//! parameters, checks it against the file size, and from then on uses only that local copy:
//! a peer scribbling on a header later cannot move an offset.

use std::io;
use std::mem::{align_of, size_of};
use std::os::fd::OwnedFd;
use std::ptr;

use crate::shm::sync::{AtomicU32, AtomicU64, Ordering};

pub use crate::model::{Status, MAX_METHOD, MAX_NAME, MAX_RESOURCE_ID};

mod channel;
mod client;
mod instance;
mod registry;
mod shared;

pub use channel::*;
pub use client::*;
pub use instance::*;
pub use registry::*;
pub use shared::*;

/// Bumped whenever any type or offset in this module changes meaning.
pub const LAYOUT_VERSION: u32 = 14;
pub const PAGE: usize = 4096;

const NAME_WORDS: usize = MAX_NAME / 8;
const RESOURCE_ID_WORDS: usize = 32;
/// Instances one service can have at once.
pub const MAX_MEMBERS: usize = 256;

/// Inline payload capacity of a request slot unless the service asks otherwise (the seed's
/// 1 KiB payload plus method fits with room to spare).
pub const DEFAULT_SLOT_SIZE: u32 = 4096;
pub const DEFAULT_SLOT_COUNT: u32 = 256;
pub const MIN_SLOT_SIZE: u32 = 256;
pub const MAX_SLOT_SIZE: u32 = 1 << 20;
pub const MAX_SLOT_COUNT: u32 = 1 << 16;
/// Default largest message (request or reply), and the bus-wide ceiling.
pub const DEFAULT_MAX_MESSAGE: u64 = 16 << 20;
pub const MAX_MAX_MESSAGE: u64 = 1 << 30;
/// Inline reply capacity of a mailbox; larger replies go through the channel's reply heap.
pub const MAILBOX_INLINE: u32 = 4096;
pub const DEFAULT_MAILBOXES: u32 = 128;

/// Payload placement, in [`MsgHeader::kind`] and [`MailboxHeader::reply_kind`].
pub const PAYLOAD_INLINE: u8 = 0;
/// A request in its channel's request heap. (Not a reply kind since layout 13: no
/// instance has a reply heap shared by its callers any more.)
pub const PAYLOAD_HEAP: u8 = 1;
/// A reply in its channel's reply heap ([`ChannelHeap`], [`HeapSide::Reply`]).
pub const PAYLOAD_CHANNEL_HEAP: u8 = 2;

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentKind {
    Registry = 1,
    Shared = 2,
    Instance = 3,
    Client = 4,
    /// An instance's own memory (see [`InstanceSeg::create_own`]).
    InstanceOwn = 5,
    /// A caller's breakers and failure counters (see [`CallerSeg`]).
    Caller = 6,
    /// One caller's requests to one instance: the request side of a channel (see
    /// [`ChannelSeg`]), written by the caller only.
    Channel = 7,
    /// A channel's request or reply heap (see [`ChannelHeap`]): written by one party only.
    Heap = 8,
    /// The reply side of a channel (see [`ChannelSeg`]): written by its instance only.
    Reply = 9,
}

impl SegmentKind {
    fn magic(self) -> u64 {
        u64::from_le_bytes(match self {
            SegmentKind::Registry => *b"AEGISREG",
            SegmentKind::Shared => *b"AEGISSHR",
            SegmentKind::Instance => *b"AEGISINS",
            SegmentKind::Client => *b"AEGISCLI",
            SegmentKind::InstanceOwn => *b"AEGISOWN",
            SegmentKind::Caller => *b"AEGISCAL",
            SegmentKind::Channel => *b"AEGISCHN",
            SegmentKind::Heap => *b"AEGISHEP",
            SegmentKind::Reply => *b"AEGISRPY",
        })
    }
}

/// Types that may be viewed in shared memory.
///
/// # Safety
/// Implementors are `#[repr(C)]`, valid for every bit pattern (zero included), contain no
/// pointers, and are mutated only through atomics or by a single documented writer while
/// no one else can observe them.
pub unsafe trait ShmSafe: Sized {}

/// First 64 bytes of every segment. Written by the broker before the segment's descriptor
/// leaves it; `magic` is written last.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SegmentHeader {
    pub magic: u64,
    pub layout_version: u32,
    pub kind: u32,
    pub total_size: u64,
    /// Random per broker run: a segment of a previous broker is never taken for a current one.
    pub bus_epoch: u64,
    /// Kind-specific sizing, decoded by that kind's layout type.
    pub params: [u64; 4],
}

/// Why a segment could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("{kind:?} segment: bad magic {found:#018x} (not an aegis-ipc segment)")]
    BadMagic { kind: SegmentKind, found: u64 },
    #[error("{kind:?} segment has layout version {found}, this library speaks {LAYOUT_VERSION}: rebuild the client against the broker's aegis-ipc version")]
    Version { kind: SegmentKind, found: u32 },
    #[error("segment is a {found} segment, expected {kind:?}")]
    Kind { kind: SegmentKind, found: u32 },
    #[error("{kind:?} segment: {what}")]
    Invalid { kind: SegmentKind, what: String },
    #[error("mapping segment: {0}")]
    Io(#[from] io::Error),
}

impl From<LayoutError> for crate::error::Error {
    fn from(e: LayoutError) -> Self {
        crate::error::Error::Layout(e.to_string())
    }
}

/// One mapping of a memfd. Raw pointer plus length; the mapping lives as long as this.
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
    _keep: MapKeep,
}

enum MapKeep {
    Rw(#[allow(dead_code)] memmap2::MmapRaw),
    Ro(#[allow(dead_code)] memmap2::Mmap),
}

// SAFETY: the mapping is plain shared memory; all concurrent access to it goes through
// atomics or the single-writer protocols documented on each type.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    pub fn map(fd: &OwnedFd, writable: bool) -> io::Result<Mapping> {
        let file = std::fs::File::from(fd.try_clone()?);
        if writable {
            let m = memmap2::MmapRaw::map_raw(&file)?;
            Ok(Mapping {
                ptr: m.as_mut_ptr(),
                len: m.len(),
                _keep: MapKeep::Rw(m),
            })
        } else {
            // SAFETY: the file may change under us (that is the point of shared memory);
            // we never form `&[u8]` over it, only atomics and volatile copies (see below).
            let m = unsafe { memmap2::Mmap::map(&file)? };
            Ok(Mapping {
                ptr: m.as_ptr() as *mut u8,
                len: m.len(),
                _keep: MapKeep::Ro(m),
            })
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A `T` at `off`. Offsets come from a validated layout, so a failure is a bug in this
    /// module, not bad input: it panics rather than reading outside the mapping.
    pub fn at<T: ShmSafe>(&self, off: usize) -> &T {
        assert!(
            off.checked_add(size_of::<T>())
                .is_some_and(|end| end <= self.len)
                && off % align_of::<T>() == 0,
            "layout bug: {} at {off} outside a {}-byte mapping",
            std::any::type_name::<T>(),
            self.len
        );
        // SAFETY: in bounds and aligned (checked above); T: ShmSafe is valid for any bits
        // and only mutated through atomics, so a shared reference is sound.
        unsafe { &*(self.ptr.add(off) as *const T) }
    }

    /// Raw pointer to `len` bytes at `off`, or `None` if that range is outside the mapping.
    /// Used for payload bytes, whose offsets and lengths may come from untrusted peers.
    pub fn range(&self, off: u64, len: u64) -> Option<*mut u8> {
        let end = off.checked_add(len)?;
        if end > self.len as u64 {
            return None;
        }
        // SAFETY: off + len <= mapping length (checked above).
        Some(unsafe { self.ptr.add(off as usize) })
    }

    fn header(&self) -> Option<SegmentHeader> {
        if self.len < size_of::<SegmentHeader>() {
            return None;
        }
        // SAFETY: the mapping holds at least a header; a volatile copy tolerates a peer
        // writing concurrently (we validate the copy, never the live bytes).
        Some(unsafe { ptr::read_volatile(self.ptr as *const SegmentHeader) })
    }

    /// Writes the header of a freshly created segment, magic last (broker only).
    pub fn write_header(
        &self,
        kind: SegmentKind,
        total_size: u64,
        bus_epoch: u64,
        params: [u64; 4],
    ) {
        assert!(self.len as u64 >= total_size && total_size >= size_of::<SegmentHeader>() as u64);
        let h = self.ptr as *mut SegmentHeader;
        // SAFETY: in bounds (asserted); the segment is not yet shared with anyone, so plain
        // writes race with no one. The fence orders the body before the magic word.
        unsafe {
            ptr::addr_of_mut!((*h).layout_version).write(LAYOUT_VERSION);
            ptr::addr_of_mut!((*h).kind).write(kind as u32);
            ptr::addr_of_mut!((*h).total_size).write(total_size);
            ptr::addr_of_mut!((*h).bus_epoch).write(bus_epoch);
            ptr::addr_of_mut!((*h).params).write(params);
            std::sync::atomic::fence(Ordering::Release);
            ptr::addr_of_mut!((*h).magic).write_volatile(kind.magic());
        }
    }

    /// Writes the header of a freshly created segment through its descriptor (`pwrite`,
    /// no mapping): for a segment its creator never maps (the broker's channel sides).
    pub fn write_header_to(
        fd: &OwnedFd,
        kind: SegmentKind,
        total_size: u64,
        bus_epoch: u64,
        params: [u64; 4],
    ) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let h = SegmentHeader {
            magic: kind.magic(),
            layout_version: LAYOUT_VERSION,
            kind: kind as u32,
            total_size,
            bus_epoch,
            params,
        };
        // SAFETY: SegmentHeader is repr(C) plain integers with no padding (8 + 4 + 4 + 8
        // + 8 + 32 bytes), so its bytes are initialised.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&h as *const SegmentHeader).cast::<u8>(),
                size_of::<SegmentHeader>(),
            )
        };
        std::fs::File::from(fd.try_clone()?).write_all_at(bytes, 0)
    }

    /// Maps `fd`, a segment of `kind` whose size the caller knows from elsewhere, without
    /// reading its header: for segments that several parties map writable, whose header
    /// any of them can have rewritten. It must be sealed against resizing, at `size`
    /// bytes.
    pub fn open_sized(
        fd: &OwnedFd,
        kind: SegmentKind,
        writable: bool,
        size: usize,
    ) -> Result<Mapping, LayoutError> {
        // Size-sealed first, mapped after (as in `open`). Sealed at `size`, the mapping is
        // that long.
        crate::shm::sys::check_size_sealed(fd, Some(size as u64))
            .map_err(|what| LayoutError::Invalid { kind, what })?;
        Ok(Mapping::map(fd, writable)?)
    }

    /// Maps `fd` and validates it as a segment of `kind`. `epoch`, when given, must match.
    pub fn open(
        fd: &OwnedFd,
        kind: SegmentKind,
        writable: bool,
        epoch: Option<u64>,
    ) -> Result<(Mapping, SegmentHeader), LayoutError> {
        let invalid = |what: String| LayoutError::Invalid { kind, what };
        // Size-sealed first, mapped after: a segment that could still shrink would let
        // whoever holds its fd SIGBUS us.
        crate::shm::sys::check_size_sealed(fd, None).map_err(invalid)?;
        let map = Mapping::map(fd, writable)?;
        let h = map
            .header()
            .ok_or_else(|| invalid(format!("{} bytes is too small for a header", map.len)))?;
        if h.magic != kind.magic() {
            // A segment of another kind has another magic: report the kind if we know it.
            return Err(LayoutError::BadMagic {
                kind,
                found: h.magic,
            });
        }
        if h.layout_version != LAYOUT_VERSION {
            return Err(LayoutError::Version {
                kind,
                found: h.layout_version,
            });
        }
        if h.kind != kind as u32 {
            return Err(LayoutError::Kind {
                kind,
                found: h.kind,
            });
        }
        if h.total_size != map.len as u64 {
            return Err(invalid(format!(
                "header says {} bytes, file has {}",
                h.total_size, map.len
            )));
        }
        if let Some(e) = epoch {
            if h.bus_epoch != e {
                return Err(invalid("belongs to another broker run".into()));
            }
        }
        Ok((map, h))
    }
}

const fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

// ---------------------------------------------------------------------------------------
// Names stored as words so a seqlock reader copies them with atomic loads, never racing
// plain reads against the broker's writes.

/// A string of up to `8 * N` bytes stored as words, so a seqlock reader copies it with
/// atomic loads and never races plain reads against the broker's writes.
#[repr(C)]
pub struct Words<const N: usize> {
    len: AtomicU32,
    _pad: u32,
    words: [AtomicU64; N],
}

/// Service names and instance ids.
pub type NameWords = Words<NAME_WORDS>;
/// Resource ids.
pub type ResourceIdWords = Words<RESOURCE_ID_WORDS>;

impl<const N: usize> Words<N> {
    /// Writer side (inside a seqlock write section). Panics on a string longer than the
    /// capacity: callers validate first.
    pub fn store(&self, s: &str) {
        let b = s.as_bytes();
        assert!(b.len() <= 8 * N);
        for (i, w) in self.words.iter().enumerate() {
            let mut chunk = [0u8; 8];
            let lo = (i * 8).min(b.len());
            let hi = (i * 8 + 8).min(b.len());
            chunk[..hi - lo].copy_from_slice(&b[lo..hi]);
            w.store(u64::from_le_bytes(chunk), Ordering::Relaxed);
        }
        self.len.store(b.len() as u32, Ordering::Relaxed);
    }

    /// Reader side: the bytes and their length; only meaningful if the surrounding seqlock
    /// read validates. Always in bounds, whatever the shared length word says.
    pub fn load_into(&self, buf: &mut [u8]) -> usize {
        let len = (self.len.load(Ordering::Relaxed) as usize)
            .min(8 * N)
            .min(buf.len());
        for (w, chunk) in self.words.iter().zip(buf[..len].chunks_mut(8)) {
            let v = w.load(Ordering::Relaxed).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        len
    }

    pub fn load(&self) -> ([u8; MAX_NAME], usize) {
        let mut buf = [0u8; MAX_NAME];
        let len = self.load_into(&mut buf);
        (buf, len)
    }

    /// Compares with `s` word by word, without copying.
    pub fn eq_str(&self, s: &str) -> bool {
        let b = s.as_bytes();
        if self.len.load(Ordering::Relaxed) as usize != b.len() || b.len() > 8 * N {
            return false;
        }
        self.words.iter().zip(b.chunks(8)).all(|(w, c)| {
            let v = w.load(Ordering::Relaxed).to_le_bytes();
            &v[..c.len()] == c
        })
    }
}

/// How long a seqlock word may stay odd and unchanged before readers stop waiting for it.
pub const SEQLOCK_STUCK: std::time::Duration = std::time::Duration::from_millis(100);

/// A seqlock word: odd while the broker is writing the entry.
///
/// SYNC POINT: `write_begin`/`write_end` (Release) pair with `read_begin` (Acquire) and
/// `read_validate` (Acquire fence, then Relaxed re-load).
#[repr(C)]
pub struct SeqLock(AtomicU32);

impl SeqLock {
    pub fn write_begin(&self) -> u32 {
        let s = self.0.load(Ordering::Relaxed);
        self.0.store(s.wrapping_add(1), Ordering::Relaxed);
        // Orders the odd value before the data stores that follow.
        crate::shm::sync::fence(Ordering::Release);
        s
    }
    pub fn write_end(&self, s: u32) {
        self.0.store(s.wrapping_add(2), Ordering::Release);
    }
    /// Returns the sequence to validate against, or `None` while a write is in progress.
    pub fn read_begin(&self) -> Option<u32> {
        let s = self.0.load(Ordering::Acquire);
        (s & 1 == 0).then_some(s)
    }
    pub fn read_validate(&self, s: u32) -> bool {
        // Orders the data loads before the re-check of the sequence.
        crate::shm::sync::fence(Ordering::Acquire);
        self.0.load(Ordering::Relaxed) == s
    }
    /// Runs `f` until it reads a consistent snapshot (the writer holds the lock for well
    /// under a microsecond, so this spins only briefly).
    ///
    /// A broker killed inside a write section leaves the word odd for good. Past
    /// [`SEQLOCK_STUCK`] of an unchanged odd word the writer is dead or frozen, the data is
    /// therefore static, and it is read as it is rather than spinning forever: every user
    /// of a registry read validates what it routes to (incarnations, status) anyway.
    pub fn read<R>(&self, mut f: impl FnMut() -> R) -> R {
        let mut spins = 0u32;
        let mut stuck_since: Option<(u32, std::time::Instant)> = None;
        loop {
            if let Some(s) = self.read_begin() {
                let r = f();
                if self.read_validate(s) {
                    return r;
                }
            }
            spins = spins.wrapping_add(1);
            if spins % 1024 == 0 {
                let now = self.0.load(Ordering::Relaxed);
                match stuck_since {
                    Some((w, t)) if w == now => {
                        if t.elapsed() >= SEQLOCK_STUCK {
                            return f();
                        }
                    }
                    _ => stuck_since = Some((now, std::time::Instant::now())),
                }
            }
            crate::shm::sync::spin_hint();
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_seqlock_left_odd_by_a_dead_writer_does_not_hang_readers() {
        let l = SeqLock(AtomicU32::new(0));
        let _never_ended = l.write_begin();
        let t = std::time::Instant::now();
        assert_eq!(l.read(|| 7), 7);
        assert!(t.elapsed() >= SEQLOCK_STUCK);
    }
}

#[cfg(not(loom))]
const _: () = {
    assert!(size_of::<SegmentHeader>() == 64);
    assert!(size_of::<NameWords>() == 8 + MAX_NAME);
};
