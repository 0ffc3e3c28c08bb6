//! The shared-memory layout: every `#[repr(C)]` type that lives in a segment, the
//! offsets between them, and the checks made when a segment is opened. No other module
//! computes an offset into shared memory.
//!
//! A bus has four kinds of segment, all memfds created by the broker and handed to peers
//! over the control socket (`SCM_RIGHTS`):
//!
//! | segment  | one per          | mapped                                   |
//! |----------|------------------|------------------------------------------|
//! | registry | bus              | read-only by everyone (sealed), written by the broker |
//! | shared   | bus              | read-write by every member: round-robin counters |
//! | ring     | instance         | read-write by its callers: header, request ring |
//! | own      | instance         | written by the instance only (sealed `F_SEAL_FUTURE_WRITE` before it leaves it), read-only to the broker and callers: counters, progress, durations, reply heap |
//! | client   | connected process| read-write by it and the instances it calls: reply mailboxes, request heap |
//!
//! Every segment starts with a [`SegmentHeader`] (magic, layout version, kind, size, bus
//! epoch, four sizing parameters). Opening a segment re-derives the whole layout from the
//! parameters, checks it against the file size, and from then on uses only that local copy:
//! a peer scribbling on a header later cannot move an offset.

use std::io;
use std::mem::{align_of, size_of};
use std::os::fd::OwnedFd;
use std::ptr;

use crate::sync::{AtomicU32, AtomicU64, Ordering};

/// Bumped whenever any type or offset in this module changes meaning.
pub const LAYOUT_VERSION: u32 = 5;
pub const PAGE: usize = 4096;

/// Longest service name, instance id or resource id, in bytes.
pub const MAX_NAME: usize = 128;
const NAME_WORDS: usize = MAX_NAME / 8;
/// Longest resource id, in bytes.
pub const MAX_RESOURCE_ID: usize = 255;
const RESOURCE_ID_WORDS: usize = 32;
/// Longest method name, in bytes.
pub const MAX_METHOD: usize = 64;
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
/// Inline reply capacity of a mailbox; larger replies go through the instance's heap.
pub const MAILBOX_INLINE: u32 = 4096;
pub const DEFAULT_MAILBOXES: u32 = 128;

/// Payload placement, in [`MsgHeader::kind`] and [`MailboxHeader::reply_kind`].
pub const PAYLOAD_INLINE: u8 = 0;
pub const PAYLOAD_HEAP: u8 = 1;

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentKind {
    Registry = 1,
    Shared = 2,
    Instance = 3,
    Client = 4,
    /// An instance's own memory (see [`InstanceSeg::create_own`]).
    InstanceOwn = 5,
}

impl SegmentKind {
    fn magic(self) -> u64 {
        u64::from_le_bytes(match self {
            SegmentKind::Registry => *b"AEGISREG",
            SegmentKind::Shared => *b"AEGISSHR",
            SegmentKind::Instance => *b"AEGISINS",
            SegmentKind::Client => *b"AEGISCLI",
            SegmentKind::InstanceOwn => *b"AEGISOWN",
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
        crate::sys::check_size_sealed(fd, None).map_err(invalid)?;
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

fn round_up(x: usize, to: usize) -> usize {
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
        crate::sync::fence(Ordering::Release);
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
        crate::sync::fence(Ordering::Acquire);
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
            crate::sync::spin_hint();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Registry segment.

/// Instance status as kept in the registry (the seed's `ServiceStatus`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Status {
    Free = 0,
    Online = 1,
    Unhealthy = 2,
    Offline = 3,
}

impl Status {
    pub fn from_u32(v: u32) -> Status {
        match v {
            1 => Status::Online,
            2 => Status::Unhealthy,
            3 => Status::Offline,
            _ => Status::Free,
        }
    }
}

#[repr(C, align(64))]
pub struct RegistryControl {
    /// Bumped (Release) after every registry change; a futex word for "anything changed".
    pub generation: AtomicU32,
    /// Seqlock over the whole resource map. Deleting an id shifts later entries of its
    /// probe chain back (no tombstones), so a reader must see every structural change as
    /// one step: it retries a lookup that overlapped a write.
    pub resources: SeqLock,
}

#[repr(C, align(64))]
pub struct ServiceEntry {
    pub seq: SeqLock,
    /// Non-zero once the slot holds a service; services are never removed while the broker
    /// runs, so a probe chain never breaks.
    pub in_use: AtomicU32,
    /// Bumped after every membership or health change of this service; futex word for watch.
    pub generation: AtomicU32,
    pub slot_size: AtomicU32,
    pub slot_count: AtomicU32,
    pub member_count: AtomicU32,
    pub max_message: AtomicU64,
    pub name: NameWords,
    /// Registry indices of the instances, in registration order.
    pub members: [AtomicU32; MAX_MEMBERS],
}

#[repr(C, align(64))]
pub struct InstanceEntry {
    pub seq: SeqLock,
    pub status: AtomicU32,
    pub service: AtomicU32,
    pub pid: AtomicU32,
    /// Unique per registration on this broker run (never 0 for a live entry): a stale
    /// mapping or reply is told apart from the current incarnation by this.
    pub incarnation: AtomicU64,
    pub registered_at_ms: AtomicU64,
    /// Mirrored by the broker from the instance's own counter.
    pub requests_served: AtomicU64,
    pub uid: AtomicU32,
    /// `INSTANCE_*` bits.
    pub flags: AtomicU32,
    pub id: NameWords,
}

/// [`InstanceEntry::flags`]: the instance stands in for one on another host (registered by
/// `aegis-bridge` with metadata key [`REMOTE_METADATA_KEY`]): routing by name picks it only
/// when no local instance of the service is `Online`.
pub const INSTANCE_REMOTE: u32 = 1;

/// The registration metadata key that marks an instance as remote; its value names the
/// host.
pub const REMOTE_METADATA_KEY: &str = "aegis.remote";

/// Resource map slot state.
pub const RESOURCE_EMPTY: u32 = 0;
pub const RESOURCE_LIVE: u32 = 1;

/// One slot of the resource map (linear probing from `hash`): resource id -> owning
/// instance. Written only inside the map seqlock ([`RegistryControl::resources`]); a
/// transfer rewrites `owner`/`incarnation` in one write section, so a reader sees the old
/// owner or the new one, never neither.
#[repr(C, align(64))]
pub struct ResourceEntry {
    pub state: AtomicU32,
    pub owner: AtomicU32,
    pub _pad: [u32; 2],
    pub hash: AtomicU64,
    /// Incarnation of the owning instance (a stale owner is never mistaken for a new one).
    pub incarnation: AtomicU64,
    /// Bumped on every claim and transfer of this id.
    pub version: AtomicU64,
    pub id: ResourceIdWords,
}

// SAFETY: repr(C), atomics only, any bit pattern valid; written only by the broker.
unsafe impl ShmSafe for RegistryControl {}
// SAFETY: as above.
unsafe impl ShmSafe for ResourceEntry {}
// SAFETY: as above.
unsafe impl ShmSafe for ServiceEntry {}
// SAFETY: as above.
unsafe impl ShmSafe for InstanceEntry {}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegistryLayout {
    pub max_services: u32,
    pub max_instances: u32,
    /// Slots of the resource map (a power of two; keep it about twice the ids in use).
    pub max_resources: u32,
}

impl RegistryLayout {
    const CONTROL: usize = size_of::<SegmentHeader>();
    fn services_off(&self) -> usize {
        round_up(Self::CONTROL + size_of::<RegistryControl>(), 64)
    }
    fn instances_off(&self) -> usize {
        self.services_off() + self.max_services as usize * size_of::<ServiceEntry>()
    }
    fn resources_off(&self) -> usize {
        round_up(
            self.instances_off() + self.max_instances as usize * size_of::<InstanceEntry>(),
            64,
        )
    }
    pub fn total_size(&self) -> usize {
        round_up(
            self.resources_off() + self.max_resources as usize * size_of::<ResourceEntry>(),
            PAGE,
        )
    }
    pub fn params(&self) -> [u64; 4] {
        [
            self.max_services as u64,
            self.max_instances as u64,
            self.max_resources as u64,
            0,
        ]
    }
    pub fn from_params(p: [u64; 4]) -> Result<Self, String> {
        let (s, i) = (p[0], p[1]);
        if s == 0 || !s.is_power_of_two() || s > 1 << 16 {
            return Err(format!(
                "max_services {s} is not a power of two in 1..=65536"
            ));
        }
        if i == 0 || i > 1 << 20 {
            return Err(format!("max_instances {i} is not in 1..=1048576"));
        }
        let r = p[2];
        if r == 0 || !r.is_power_of_two() || r > 1 << 24 {
            return Err(format!(
                "max_resources {r} is not a power of two in 1..=16777216"
            ));
        }
        Ok(RegistryLayout {
            max_services: s as u32,
            max_instances: i as u32,
            max_resources: r as u32,
        })
    }
}

/// The registry as seen through one mapping (read-only in clients, writable in the broker).
pub struct RegistryView {
    pub map: Mapping,
    pub layout: RegistryLayout,
    pub epoch: u64,
}

impl RegistryView {
    pub fn open(fd: &OwnedFd, writable: bool) -> Result<RegistryView, LayoutError> {
        let (map, h) = Mapping::open(fd, SegmentKind::Registry, writable, None)?;
        let layout =
            RegistryLayout::from_params(h.params).map_err(|what| LayoutError::Invalid {
                kind: SegmentKind::Registry,
                what,
            })?;
        if layout.total_size() != map.len() {
            return Err(LayoutError::Invalid {
                kind: SegmentKind::Registry,
                what: "size does not match its capacities".into(),
            });
        }
        Ok(RegistryView {
            map,
            layout,
            epoch: h.bus_epoch,
        })
    }
    pub fn control(&self) -> &RegistryControl {
        self.map.at(RegistryLayout::CONTROL)
    }
    /// The service entry at `i`, or `None` when `i` is out of range.
    pub fn service(&self, i: u32) -> Option<&ServiceEntry> {
        (i < self.layout.max_services).then(|| {
            self.map
                .at(self.layout.services_off() + i as usize * size_of::<ServiceEntry>())
        })
    }
    pub fn instance(&self, i: u32) -> Option<&InstanceEntry> {
        (i < self.layout.max_instances).then(|| {
            self.map
                .at(self.layout.instances_off() + i as usize * size_of::<InstanceEntry>())
        })
    }
}

impl RegistryView {
    /// Owner `(instance index, incarnation)` of resource `id`: one consistent probe of its
    /// chain under the map seqlock. Lock-free; retried only if the broker wrote meanwhile.
    pub fn find_resource(&self, id: &str) -> Option<(u32, u64)> {
        let cap = self.layout.max_resources;
        let h = name_hash(id);
        self.control().resources.read(|| {
            let mut i = (h as u32) & (cap - 1);
            for _ in 0..cap {
                let e = self.resource(i)?;
                if e.state.load(Ordering::Relaxed) != RESOURCE_LIVE {
                    return None;
                }
                if e.hash.load(Ordering::Relaxed) == h && e.id.eq_str(id) {
                    return Some((
                        e.owner.load(Ordering::Relaxed),
                        e.incarnation.load(Ordering::Relaxed),
                    ));
                }
                i = (i + 1) & (cap - 1);
            }
            None
        })
    }

    /// The resource ids each of `owners` (`(index, incarnation)`) owns, in one scan of the
    /// whole map. Only for a registry whose broker is gone: an instance re-registering after
    /// a broker restart reads the old broker's last registry. That registry no longer
    /// changes, so entries are read without the map's seqlock, which a broker killed inside
    /// a write would have left odd for good (a seqlock read would then wait out its stuck
    /// bound on every one of the map's entries). The one entry such a broker was writing may
    /// be torn; ids that are not valid resource ids are skipped, and anything else is only
    /// claimed again, which the new broker checks like any claim.
    pub fn resources_owned_by_in_dead_registry(&self, owners: &[(u32, u64)]) -> Vec<Vec<String>> {
        let mut out = vec![Vec::new(); owners.len()];
        if owners.is_empty() {
            return out;
        }
        let mut buf = vec![0u8; MAX_RESOURCE_ID + 1];
        for e in (0..self.layout.max_resources).map_while(|i| self.resource(i)) {
            // Relaxed: nothing writes this registry any more (see above).
            if e.state.load(Ordering::Relaxed) != RESOURCE_LIVE {
                continue;
            }
            let owner = (
                e.owner.load(Ordering::Relaxed),
                e.incarnation.load(Ordering::Relaxed),
            );
            let Some(k) = owners.iter().position(|&o| o == owner) else {
                continue;
            };
            let len = e.id.load_into(&mut buf);
            if let Some(id) = std::str::from_utf8(&buf[..len])
                .ok()
                .filter(|id| crate::names::resource_id(id).is_ok())
            {
                out[k].push(id.to_owned());
            }
        }
        out
    }

    pub fn resource(&self, i: u32) -> Option<&ResourceEntry> {
        (i < self.layout.max_resources).then(|| {
            self.map
                .at(self.layout.resources_off() + i as usize * size_of::<ResourceEntry>())
        })
    }
}

/// FNV-1a: the probe start of a name in the registry's open-addressed tables.
pub fn name_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

// ---------------------------------------------------------------------------------------
// Shared (writable by all members) segment.

#[repr(C, align(64))]
pub struct RoundRobin {
    pub next: AtomicU64,
}
// SAFETY: repr(C), one atomic.
unsafe impl ShmSafe for RoundRobin {}

/// One spin seat (see [`crate::wait`]): the pid of the process whose thread spins in it, or
/// 0 when free. Each on its own cache line, so a holder's stores never disturb another's.
#[repr(C, align(64))]
pub struct SpinSeat {
    pub holder: AtomicU32,
}
// SAFETY: repr(C), one atomic.
unsafe impl ShmSafe for SpinSeat {}

/// Spin seats in the shared segment: at most this many threads of the whole bus spin at once
/// (each process uses as many as it has cores, up to this).
pub const SPIN_SEATS: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedLayout {
    pub max_services: u32,
}

impl SharedLayout {
    /// After the 64-byte segment header.
    const SEATS: usize = 64;
    const COUNTERS: usize = Self::SEATS + SPIN_SEATS * size_of::<SpinSeat>();
    pub fn total_size(&self) -> usize {
        round_up(
            Self::COUNTERS + self.max_services as usize * size_of::<RoundRobin>(),
            PAGE,
        )
    }
    pub fn params(&self) -> [u64; 4] {
        [self.max_services as u64, 0, 0, 0]
    }
}

pub struct SharedView {
    map: Mapping,
    layout: SharedLayout,
}

impl SharedView {
    pub fn open(fd: &OwnedFd, epoch: u64, max_services: u32) -> Result<SharedView, LayoutError> {
        let (map, h) = Mapping::open(fd, SegmentKind::Shared, true, Some(epoch))?;
        let layout = SharedLayout { max_services };
        if h.params != layout.params() || layout.total_size() != map.len() {
            return Err(LayoutError::Invalid {
                kind: SegmentKind::Shared,
                what: "capacities differ from the registry's".into(),
            });
        }
        Ok(SharedView { map, layout })
    }
    /// The bus's spin seats.
    pub fn spin_seats(&self) -> &[SpinSeat] {
        let first: &SpinSeat = self.map.at(SharedLayout::SEATS);
        // SAFETY: SPIN_SEATS consecutive seats start at SEATS, inside the mapping (the
        // layout's total size covers them and `at` checked the first); SpinSeat is ShmSafe.
        unsafe { std::slice::from_raw_parts(first, SPIN_SEATS) }
    }
    /// Round-robin counter of service `i` (`i` < max_services, else `None`).
    pub fn round_robin(&self, i: u32) -> Option<&RoundRobin> {
        (i < self.layout.max_services).then(|| {
            self.map
                .at(SharedLayout::COUNTERS + i as usize * size_of::<RoundRobin>())
        })
    }
}

// ---------------------------------------------------------------------------------------
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
    /// Next position a producer will claim (Vyukov's `enqueue_pos`).
    pub enqueue_pos: AtomicU64,
    _p0: [u8; 120],
    /// Next position a consumer will take.
    pub dequeue_pos: AtomicU64,
    _p1: [u8; 120],
    /// Futex word consumers sleep on; bumped by a producer that saw `sleepers > 0`.
    pub wake: AtomicU32,
    /// Consumers asleep or about to sleep on `wake`.
    pub sleepers: AtomicU32,
    _p2: [u8; 120],
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
            _p2: [0; 120],
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
    /// Vyukov sequence: `pos` = free for the producer of lap `pos`, `pos + 1` = published
    /// for the consumer at `pos`, `pos + slot_count` = free for the next lap.
    pub seq: AtomicU64,
    /// Pid of the producer that claimed the slot, written right after the claim, so a
    /// slot claimed by a producer that died before publishing can be recognised and skipped.
    pub claimer_pid: AtomicU32,
    pub _pad: u32,
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
    /// Offset in the caller's client segment when `kind == PAYLOAD_HEAP`.
    pub heap_off: u64,
    pub method_len: u16,
    pub hops: u8,
    pub kind: u8,
    pub _pad: u32,
    /// Random per call, also stored in the caller's mailbox ([`MailboxHeader::nonce`]): an
    /// instance takes and completes the mailbox only when the two match, so a forged or
    /// stale header (generation wrap-around) cannot deliver a reply to another call.
    pub nonce: u64,
    /// The caller's per-connection secret (from the broker's `Welcome`): what an instance
    /// shows the broker to be handed this caller's segment (`OpenClient`).
    pub secret: u64,
    /// When the caller sent the request (`CLOCK_MONOTONIC` nanoseconds, from the clock
    /// read its call already made), 0 if unknown: the instance observes the time from here
    /// to its reply into [`InstanceSeg::durations`]. Only a metric trusts it.
    pub sent_ns: u64,
}

#[repr(C, align(64))]
pub struct SlotHeader {
    pub ctl: SlotCtl,
    /// Plain data written through a shared reference by the producer that owns the slot
    /// (hence the cell): see [`crate::ring::Claim::set_header`].
    pub msg: std::cell::UnsafeCell<MsgHeader>,
}

impl SlotHeader {
    pub fn new() -> SlotHeader {
        SlotHeader {
            ctl: SlotCtl {
                seq: AtomicU64::new(0),
                claimer_pid: AtomicU32::new(0),
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
    pub heap_size: u64,
}

impl InstanceLayout {
    /// In the own segment.
    const COUNTERS: usize = 64;
    const DURATIONS: usize = 128;
    const OWN_HEAP: usize = PAGE;
    /// In the ring segment.
    const RING: usize = 128;
    fn slots_off(&self) -> usize {
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
        Self::OWN_HEAP + round_up(self.heap_size as usize, PAGE)
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
}

impl InstanceSeg {
    /// Creates an instance's own segment with a reply heap of `heap_size` bytes: mapped
    /// writable here, then sealed so that no other mapping can ever write it
    /// (`F_SEAL_FUTURE_WRITE`). Returns the descriptor (for the broker) and our mapping.
    pub fn create_own(epoch: u64, heap_size: u64) -> io::Result<(OwnedFd, Mapping)> {
        let size = InstanceLayout {
            slot_size: MIN_SLOT_SIZE,
            slot_count: 2,
            heap_size,
        }
        .own_size() as u64;
        let fd = crate::sys::memfd("aegis-own", size)?;
        let map = Mapping::map(&fd, true)?;
        map.write_header(SegmentKind::InstanceOwn, size, epoch, [heap_size, 0, 0, 0]);
        crate::sys::seal_read_only(&fd)?;
        Ok((fd, map))
    }

    /// Maps an instance's own segment read-only (a caller or the broker) after checking
    /// that nobody can map it writable any more, and returns its reply heap size.
    pub fn open_own(fd: &OwnedFd) -> Result<(Mapping, u64), LayoutError> {
        let invalid = |what: String| LayoutError::Invalid {
            kind: SegmentKind::InstanceOwn,
            what,
        };
        crate::sys::check_write_sealed(fd).map_err(invalid)?;
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
        })
    }
    /// Opens both segments as a caller or the broker: the ring read-write, the instance's
    /// own memory read-only.
    pub fn open_pair(
        fds: &[OwnedFd],
        epoch: u64,
        index: u32,
        incarnation: u64,
    ) -> Result<InstanceSeg, LayoutError> {
        let [ring, own] = fds else {
            return Err(LayoutError::Invalid {
                kind: SegmentKind::Instance,
                what: format!("{} descriptors, expected ring and own", fds.len()),
            });
        };
        let (own, _) = Self::open_own(own)?;
        Self::open(ring, own, epoch, index, incarnation)
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
    /// `len` bytes at `off` inside the reply heap, or `None` when out of the heap's
    /// bounds. Writable only through the instance's own mapping.
    pub fn heap_range(&self, off: u64, len: u64) -> Option<*mut u8> {
        if off.checked_add(len)? > self.layout.heap_size {
            return None;
        }
        self.own.range(InstanceLayout::OWN_HEAP as u64 + off, len)
    }
}

// ---------------------------------------------------------------------------------------
// Client segment: reply mailboxes and the request heap.

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

/// One service as seen by one connected caller, in that caller's own client segment (one
/// per registry service index): its circuit breaker and its failure counters, written by
/// the caller's threads with relaxed atomics (failure paths only; a successful call reads
/// `breaker` and `failures_in_row`), read by the broker when scraped or ticking. A caller
/// that lies here misleads only the metrics about itself.
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientLayout {
    pub mailboxes: u32,
    pub mailbox_inline: u32,
    pub heap_size: u64,
    /// [`CallerStats`] entries (the registry's service capacity when created).
    pub services: u32,
}

impl ClientLayout {
    const CONTROL: usize = 64;
    const MAILBOXES: usize = 128;
    pub fn mailbox_stride(&self) -> usize {
        size_of::<MailboxHeader>() + self.mailbox_inline as usize
    }
    fn stats_off(&self) -> usize {
        Self::MAILBOXES + self.mailboxes as usize * self.mailbox_stride()
    }
    pub fn heap_off(&self) -> usize {
        round_up(
            self.stats_off() + self.services as usize * size_of::<CallerStats>(),
            PAGE,
        )
    }
    pub fn total_size(&self) -> usize {
        self.heap_off() + round_up(self.heap_size as usize, PAGE)
    }
    /// The layout `params` describe (index and generation aside), checked for range.
    pub fn from_params(p: [u64; 4]) -> Result<ClientLayout, String> {
        let (mailboxes, services) = (p[0] & 0xffff_ffff, p[0] >> 32);
        if mailboxes == 0
            || mailboxes > 1 << 16
            || services > 1 << 16
            || p[1] % 64 != 0
            || p[1] > MAX_SLOT_SIZE as u64
        {
            return Err(format!("bad mailbox parameters {p:?}"));
        }
        if p[2] > 2 * MAX_MAX_MESSAGE {
            return Err(format!("heap size {} too large", p[2]));
        }
        Ok(ClientLayout {
            mailboxes: mailboxes as u32,
            mailbox_inline: p[1] as u32,
            heap_size: p[2],
            services: services as u32,
        })
    }
    pub fn params(&self, index: u32, gen: u32) -> [u64; 4] {
        [
            self.mailboxes as u64 | (self.services as u64) << 32,
            self.mailbox_inline as u64,
            self.heap_size,
            index as u64 | (gen as u64) << 32,
        ]
    }
}

pub struct ClientSeg {
    pub map: Mapping,
    pub layout: ClientLayout,
    pub index: u32,
    pub gen: u32,
}

impl ClientSeg {
    pub fn open(fd: &OwnedFd, epoch: u64, index: u32, gen: u32) -> Result<ClientSeg, LayoutError> {
        let (map, h) = Mapping::open(fd, SegmentKind::Client, true, Some(epoch))?;
        let p = h.params;
        let invalid = |what: String| LayoutError::Invalid {
            kind: SegmentKind::Client,
            what,
        };
        let layout = ClientLayout::from_params(p).map_err(invalid)?;
        if p[3] != (index as u64 | (gen as u64) << 32) {
            return Err(invalid(format!(
                "is client {}, expected {index}/{gen}",
                p[3]
            )));
        }
        if layout.total_size() != map.len() {
            return Err(invalid("size does not match its parameters".into()));
        }
        Ok(ClientSeg {
            map,
            layout,
            index,
            gen,
        })
    }
    /// Mailbox `i` and its inline reply area, or `None` when `i` is out of range.
    /// The connection's doorbell (see [`ClientControl`]).
    pub fn doorbell(&self) -> &AtomicU32 {
        &self.map.at::<ClientControl>(ClientLayout::CONTROL).doorbell
    }
    pub fn mailbox(&self, i: u32) -> Option<(&MailboxHeader, *mut u8)> {
        if i >= self.layout.mailboxes {
            return None;
        }
        let off = ClientLayout::MAILBOXES + i as usize * self.layout.mailbox_stride();
        let data = self.map.range(
            (off + size_of::<MailboxHeader>()) as u64,
            self.layout.mailbox_inline as u64,
        )?;
        Some((self.map.at(off), data))
    }
    pub fn heap_range(&self, off: u64, len: u64) -> Option<*mut u8> {
        if off.checked_add(len)? > self.layout.heap_size {
            return None;
        }
        self.map.range(self.layout.heap_off() as u64 + off, len)
    }
    /// Zeroes every [`CallerStats`] (the broker, adopting the segment after a restart:
    /// service indices may mean other services now). A caller's concurrent failure count
    /// may survive it: harmless.
    pub fn reset_caller_stats(&self) {
        for s in (0..self.layout.services).filter_map(|i| self.caller_stats(i)) {
            s.breaker.store(BREAKER_CLOSED, Ordering::Relaxed);
            s.failures_in_row.store(0, Ordering::Relaxed);
            for c in s.errors.iter().chain(&s.retries) {
                c.store(0, Ordering::Relaxed);
            }
        }
    }
    /// This caller's breaker and counters for registry service `service`, or `None` past
    /// the segment's capacity.
    pub fn caller_stats(&self, service: u32) -> Option<&CallerStats> {
        (service < self.layout.services).then(|| {
            self.map
                .at(self.layout.stats_off() + service as usize * size_of::<CallerStats>())
        })
    }
}

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
    assert!(size_of::<RegistryControl>() == 64);
    assert!(size_of::<NameWords>() == 8 + MAX_NAME);
    assert!(size_of::<ServiceEntry>() == 1216 && align_of::<ServiceEntry>() == 64);
    assert!(size_of::<InstanceEntry>() == 192 && align_of::<InstanceEntry>() == 64);
    assert!(size_of::<RoundRobin>() == 64);
    assert!(size_of::<SpinSeat>() == 64);
    assert!(size_of::<ResourceEntry>() == 320 && align_of::<ResourceEntry>() == 64);
    assert!(RESOURCE_ID_WORDS * 8 > MAX_RESOURCE_ID);
    assert!(size_of::<InstanceCounters>() == 64);
    assert!(size_of::<RingIndices>() == 384 && align_of::<RingIndices>() == 128);
    assert!(size_of::<SlotCtl>() == 16);
    assert!(size_of::<MsgHeader>() == 72);
    assert!(size_of::<Histogram>() == 192);
    assert!(InstanceLayout::DURATIONS + size_of::<Histogram>() <= InstanceLayout::OWN_HEAP);
    assert!(size_of::<CallerStats>() == 192);
    assert!(size_of::<SlotHeader>() == 128 && align_of::<SlotHeader>() == 64);
    assert!(size_of::<MailboxHeader>() == 64);
    assert!(InstanceLayout::RING % 128 == 0 && SharedLayout::COUNTERS % 64 == 0);
    assert!(ClientLayout::MAILBOXES % 64 == 0 && MAILBOX_INLINE % 64 == 0);
    assert!(size_of::<ClientControl>() == 64);
    assert!(ClientLayout::CONTROL + size_of::<ClientControl>() <= ClientLayout::MAILBOXES);
};
