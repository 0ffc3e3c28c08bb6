//! The registry segment: written by the broker alone (sealed read-only before it leaves it), read by everyone.

use std::mem::size_of;
use std::os::fd::OwnedFd;

use super::*;
use crate::shm::sync::{AtomicU32, AtomicU64, Ordering};

// Registry segment.

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
    /// Bumped (Release) by the broker when a channel to this instance opens or closes: its
    /// serving loop then asks for them (`Request::Channels`).
    pub channels: AtomicU32,
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

#[cfg(not(loom))]
const _: () = {
    assert!(size_of::<RegistryControl>() == 64);
    assert!(size_of::<ServiceEntry>() == 1216 && std::mem::align_of::<ServiceEntry>() == 64);
    assert!(size_of::<InstanceEntry>() == 192 && std::mem::align_of::<InstanceEntry>() == 64);
    assert!(size_of::<ResourceEntry>() == 320 && std::mem::align_of::<ResourceEntry>() == 64);
    assert!(RESOURCE_ID_WORDS * 8 > MAX_RESOURCE_ID);
};
