//! Resource ownership: the broker's records, and the only writer of the shared-memory
//! resource map that callers read lock-free to route `call_resource`.
//!
//! The map is open addressing with tombstones (ids are hashed with the same function the
//! readers use). Claims and releases are processed a batch at a time under the state
//! mutex; an all-or-nothing request keeps an undo log and rolls everything back on the
//! first failure. A transfer rewrites the owner of each id in one seqlock write section, so
//! a concurrent lookup sees the old owner or the new one, never neither.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use aegis_client::error::{code, WireError};
use aegis_client::layout::{self, Status, RESOURCE_EMPTY, RESOURCE_LIVE};
use aegis_client::names;
use aegis_client::proto::{
    ResourceFailure, ResourceInfo, ResourceMetadata, ResourcePage, ResourceQuery, ResourceSpec,
    Response,
};
use aegis_client::sys;

use crate::state::{ConnId, Peer, Reply, State};

const DEFAULT_PAGE: u32 = 100;
/// Entries one step of a stepwise listing reads under the state lock.
const STEP: usize = 4096;
const MAX_PAGE: u32 = 10_000;

#[derive(Default)]
pub(crate) struct Resources {
    /// Ordered by id: a page of the admin API is a walk from the start, never a sort.
    by_id: std::collections::BTreeMap<String, ResourceRec>,
    /// Live entries in the shared map.
    live: u32,
    /// Which id each live map slot holds (to fix up records when a delete shifts entries).
    slot_ids: HashMap<u32, String>,
    /// TTL deadlines: (deadline, id, version at claim). An entry leaves with its resource
    /// (release, expiry, owner gone), so claim/release churn leaves nothing behind.
    ttl: BTreeSet<(Instant, String, u64)>,
    next_version: u64,
}

#[derive(Clone)]
pub(crate) struct ResourceRec {
    slot: u32,
    owner: u32,
    incarnation: u64,
    metadata: ResourceMetadata,
    claimed_at_ms: u64,
    expires_at_ms: Option<u64>,
    version: u64,
    /// This resource's key in `Resources::ttl`, if it has a TTL.
    ttl_key: Option<(Instant, u64)>,
}

/// A transfer request: `from` is the caller's own instance, `None` an administrator's.
pub(crate) struct Transfer<'a> {
    pub ids: &'a [String],
    pub from: Option<(u32, u64)>,
    pub to_service: &'a str,
    pub to_instance: &'a str,
    pub reason: &'a str,
}

/// What an all-or-nothing request must undo if it fails.
///
/// Batches run under separate lock sections, so others may change an id in between: each
/// step is undone only if the id is still exactly as this request left it (`version`).
pub(crate) enum Undo {
    Claimed {
        id: String,
        version: u64,
    },
    TookOver {
        id: String,
        prev: ResourceRec,
        version: u64,
    },
    Released {
        id: String,
        prev: ResourceRec,
    },
}

fn failure(id: &str, code: u16, reason: String, owner: Option<String>) -> ResourceFailure {
    ResourceFailure {
        id: id.to_owned(),
        code,
        reason,
        owner,
    }
}

fn check_metadata(m: &ResourceMetadata) -> Result<(), String> {
    let long = |s: &String| s.len() > 256;
    if m.tags.len() > 32 || m.attributes.len() > 32 {
        return Err("metadata: at most 32 tags and 32 attributes".into());
    }
    if long(&m.resource_type)
        || long(&m.created_by)
        || m.tags.iter().any(long)
        || m.attributes.iter().any(|(k, v)| long(k) || v.len() > 4096)
    {
        return Err("metadata: strings up to 256 bytes (attribute values 4096)".into());
    }
    Ok(())
}

impl State {
    fn instance_name(&self, index: u32) -> String {
        self.instances
            .get(index as usize)
            .and_then(Option::as_ref)
            .map_or_else(|| format!("#{index}"), |r| r.id.clone())
    }

    fn limit_reached(&self, index: u32) -> Option<String> {
        let r = self.instances[index as usize].as_ref()?;
        let limit = self.cfg.max_resources_per_instance as usize;
        (r.owned.len() >= limit).then(|| {
            format!(
                "instance '{}' already owns the maximum of {limit} resources",
                r.id
            )
        })
    }

    // --- the shared-memory map (single writer: the state mutex holder) ---
    //
    // Linear probing without tombstones: a delete shifts later members of the probe chain
    // back into the hole (Knuth's algorithm R), so chains stay as short as the live ids
    // make them however much churn there is. Every write is one section of the map-wide
    // seqlock; readers retry a lookup that overlapped one.

    fn write_entry(
        &self,
        slot: u32,
        id: &str,
        hash: u64,
        owner: u32,
        incarnation: u64,
        version: u64,
    ) {
        let e = self.registry.resource(slot).expect("slot in range");
        e.hash.store(hash, Relaxed);
        e.id.store(id);
        e.owner.store(owner, Relaxed);
        e.incarnation.store(incarnation, Relaxed);
        e.version.store(version, Relaxed);
        e.state.store(RESOURCE_LIVE, Relaxed);
    }

    fn map_insert(&mut self, id: &str, owner: u32, incarnation: u64, version: u64) -> Option<u32> {
        let cap = self.registry.layout.max_resources;
        // Keep probe chains short: refuse past 7/8 of the slots.
        if self.resources.live + 1 > cap / 8 * 7 {
            return None;
        }
        let h = layout::name_hash(id);
        let mut i = (h as u32) & (cap - 1);
        while self.registry.resource(i)?.state.load(Relaxed) != RESOURCE_EMPTY {
            i = (i + 1) & (cap - 1);
        }
        let lock = &self.registry.control().resources;
        let s = lock.write_begin();
        self.write_entry(i, id, h, owner, incarnation, version);
        lock.write_end(s);
        self.resources.live += 1;
        self.resources.slot_ids.insert(i, id.to_owned());
        Some(i)
    }

    fn map_set_owner(&self, slot: u32, owner: u32, incarnation: u64, version: u64) {
        let e = self.registry.resource(slot).expect("slot in range");
        let lock = &self.registry.control().resources;
        let s = lock.write_begin();
        e.owner.store(owner, Relaxed);
        e.incarnation.store(incarnation, Relaxed);
        e.version.store(version, Relaxed);
        lock.write_end(s);
    }

    /// Empties `slot` and shifts the rest of its probe chain back over the hole.
    fn map_remove(&mut self, slot: u32) {
        let cap = self.registry.layout.max_resources;
        let mask = cap - 1;
        let lock = &self.registry.control().resources;
        let s = lock.write_begin();
        let mut hole = slot;
        let mut j = slot;
        loop {
            j = (j + 1) & mask;
            let e = self.registry.resource(j).expect("slot in range");
            if e.state.load(Relaxed) != RESOURCE_LIVE {
                break;
            }
            let home = (e.hash.load(Relaxed) as u32) & mask;
            // The entry at j may move into the hole unless its home lies cyclically in (hole, j].
            let stays = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if stays {
                continue;
            }
            let id = self
                .resources
                .slot_ids
                .remove(&j)
                .expect("live slot has an id");
            let (h, o, inc, v) = (
                e.hash.load(Relaxed),
                e.owner.load(Relaxed),
                e.incarnation.load(Relaxed),
                e.version.load(Relaxed),
            );
            self.write_entry(hole, &id, h, o, inc, v);
            if let Some(rec) = self.resources.by_id.get_mut(&id) {
                rec.slot = hole;
            }
            self.resources.slot_ids.insert(hole, id);
            hole = j;
        }
        self.registry
            .resource(hole)
            .expect("slot in range")
            .state
            .store(RESOURCE_EMPTY, Relaxed);
        self.resources.slot_ids.remove(&hole);
        lock.write_end(s);
        self.resources.live -= 1;
    }

    /// Whether `id` is still owned as of `version` (nobody changed it since).
    fn at_version(&self, id: &str, version: u64) -> bool {
        self.resources
            .by_id
            .get(id)
            .is_some_and(|r| r.version == version)
    }

    fn next_version(&mut self) -> u64 {
        self.resources.next_version += 1;
        self.resources.next_version
    }

    fn insert_rec(
        &mut self,
        id: &str,
        owner: u32,
        metadata: ResourceMetadata,
    ) -> Result<(), String> {
        let incarnation = self.instances[owner as usize].as_ref().unwrap().incarnation;
        let version = self.next_version();
        let slot = self
            .map_insert(id, owner, incarnation, version)
            .ok_or_else(|| {
                format!(
                    "the resource map is full ({} slots, broker --max-resources)",
                    self.registry.layout.max_resources
                )
            })?;
        let now = sys::unix_millis();
        // After a broker restart an owner claims its ids again with no metadata: what the
        // previous run journaled for this very owner comes back, expiry included.
        let restored = (metadata == ResourceMetadata::default())
            .then(|| {
                let (svc, inst) = self.owner_names(owner);
                self.journal.as_mut()?.take_recovered(id, &svc, &inst)
            })
            .flatten();
        let (metadata, claimed_at_ms, expires_at_ms) = match restored {
            Some(o) => (o.metadata, o.claimed_at_ms, o.expires_at_ms),
            None => {
                let exp = metadata.ttl_ms.map(|t| now.saturating_add(t));
                (metadata, now, exp)
            }
        };
        let ttl_key = expires_at_ms.map(|exp| {
            let at = Instant::now() + Duration::from_millis(exp.saturating_sub(now));
            self.resources.ttl.insert((at, id.to_owned(), version));
            (at, version)
        });
        let rec = ResourceRec {
            slot,
            owner,
            incarnation,
            metadata,
            claimed_at_ms,
            expires_at_ms,
            version,
            ttl_key,
        };
        self.resources.by_id.insert(id.to_owned(), rec);
        self.instances[owner as usize]
            .as_mut()
            .unwrap()
            .owned
            .insert(id.to_owned());
        self.journal_own(id);
        Ok(())
    }

    /// (service name, instance id) of instance `index`.
    fn owner_names(&self, index: u32) -> (String, String) {
        let inst = self.instances[index as usize].as_ref();
        (
            inst.and_then(|i| self.services[i.service as usize].as_ref())
                .map_or_else(String::new, |s| s.name.clone()),
            inst.map_or_else(String::new, |i| i.id.clone()),
        )
    }

    /// Journals `id` as it now stands (see `journal`).
    pub(crate) fn journal_own(&mut self, id: &str) {
        if self.journal.is_none() {
            return;
        }
        let Some(entry) = self
            .resources
            .by_id
            .get(id)
            .map(|r| self.journal_entry(id, r))
        else {
            return;
        };
        if let Some(j) = self.journal.as_mut() {
            j.record(&entry);
        }
    }

    fn journal_entry(&self, id: &str, r: &ResourceRec) -> crate::journal::Entry {
        let (service, instance) = self.owner_names(r.owner);
        crate::journal::Entry::Own {
            id: id.to_owned(),
            owned: crate::journal::Owned {
                service,
                instance,
                metadata: r.metadata.clone(),
                claimed_at_ms: r.claimed_at_ms,
                expires_at_ms: r.expires_at_ms,
            },
        }
    }

    pub(crate) fn journal_entries_len(&self) -> usize {
        self.resources.by_id.len()
    }

    /// Every live resource as a journal entry (for compaction).
    pub(crate) fn journal_entries(&self) -> Vec<crate::journal::Entry> {
        self.resources
            .by_id
            .iter()
            .map(|(id, r)| self.journal_entry(id, r))
            .collect()
    }

    fn remove_rec(&mut self, id: &str) -> Option<ResourceRec> {
        let slot = self.resources.by_id.get(id)?.slot;
        self.map_remove(slot);
        let rec = self.resources.by_id.remove(id)?;
        if let Some((at, version)) = rec.ttl_key {
            self.resources.ttl.remove(&(at, id.to_owned(), version));
        }
        if let Some(inst) = self.instances[rec.owner as usize].as_mut() {
            inst.owned.remove(id);
        }
        if let Some(j) = self.journal.as_mut() {
            j.record(&crate::journal::Entry::Drop { id: id.to_owned() });
        }
        Some(rec)
    }

    fn set_owner(&mut self, id: &str, owner: u32) {
        let version = self.next_version();
        let incarnation = self.instances[owner as usize].as_ref().unwrap().incarnation;
        let rec = self.resources.by_id.get_mut(id).unwrap();
        let prev = std::mem::replace(&mut rec.owner, owner);
        rec.incarnation = incarnation;
        rec.version = version;
        let slot = rec.slot;
        if let Some(p) = self.instances[prev as usize].as_mut() {
            p.owned.remove(id);
        }
        self.instances[owner as usize]
            .as_mut()
            .unwrap()
            .owned
            .insert(id.to_owned());
        self.map_set_owner(slot, owner, incarnation, version);
        self.journal_own(id);
    }

    // --- requests ---

    /// One batch of a claim. `Err` refuses the whole request (not authorised).
    pub(crate) fn claim_batch(
        &mut self,
        conn: ConnId,
        peer: Peer,
        (index, inc): (u32, u64),
        specs: &[ResourceSpec],
        force: bool,
        undo: &mut Vec<Undo>,
    ) -> Result<(u32, Vec<ResourceFailure>), WireError> {
        let service = self.acts_for(conn, peer, index, inc).map(|r| r.service)?;
        if let Some(name) = self.services[service as usize]
            .as_ref()
            .map(|s| s.name.clone())
        {
            self.permit(conn, peer, &name, crate::policy::Action::Serve)?;
        }
        if force && !self.is_admin(peer) {
            return Err(WireError::NotOwner(format!(
                "force takes over other instances' resources and is for administrators; uid {} is not one",
                peer.uid
            )));
        }
        let me = self.instance_name(index);
        let (mut ok, mut failed) = (0, Vec::new());
        let uid = self.instances[index as usize]
            .as_ref()
            .map_or(peer.uid, |r| r.peer.uid);
        let uid_cap = self.cfg.max_resources_per_uid(uid) as usize;
        let mut uid_owned: usize = self
            .instances
            .iter()
            .flatten()
            .filter(|r| r.peer.uid == uid)
            .map(|r| r.owned.len())
            .sum();
        for spec in specs {
            let id = spec.id.as_str();
            if let Err(e) = names::resource_id(id) {
                failed.push(failure(id, code::BAD_REQUEST, e.to_string(), None));
                continue;
            }
            if let Err(e) = check_metadata(&spec.metadata) {
                failed.push(failure(id, code::BAD_REQUEST, e, None));
                continue;
            }
            match self.resources.by_id.get(id).map(|r| r.owner) {
                Some(owner) if owner == index => ok += 1,
                Some(owner) if !force => {
                    let o = self.instance_name(owner);
                    let why = format!("resource '{id}' is already owned by instance '{o}'");
                    failed.push(failure(id, code::CONFLICT, why, Some(o)));
                }
                existing => {
                    if let Some(why) = self.limit_reached(index) {
                        failed.push(failure(id, code::LIMIT_EXCEEDED, why, None));
                        continue;
                    }
                    if uid_owned >= uid_cap {
                        let why = format!(
                            "the instances of uid {uid} own {uid_owned} resources (broker --max-resources-per-uid {uid_cap})"
                        );
                        failed.push(failure(id, code::LIMIT_EXCEEDED, why, None));
                        continue;
                    }
                    uid_owned += 1;
                    if let Some(owner) = existing {
                        let prev = self.resources.by_id[id].clone();
                        self.set_owner(id, index);
                        self.resources.by_id.get_mut(id).unwrap().metadata = spec.metadata.clone();
                        self.journal_own(id);
                        tracing::info!(resource = id, from = %self.instance_name(owner), to = %me,
                            uid = peer.uid, "resource taken over by force");
                        let version = self.resources.by_id[id].version;
                        undo.push(Undo::TookOver {
                            id: id.to_owned(),
                            prev,
                            version,
                        });
                        ok += 1;
                        continue;
                    }
                    match self.insert_rec(id, index, spec.metadata.clone()) {
                        Ok(()) => {
                            if let Some(svc) = self.services[service as usize].as_ref() {
                                let size = aegis_client::proto::encode(&spec.metadata)
                                    .map_or(0, |v| v.len());
                                let name = svc.name.clone();
                                self.metrics.observe_metadata(&name, size as u64);
                            }
                            let version = self.resources.by_id[id].version;
                            undo.push(Undo::Claimed {
                                id: id.to_owned(),
                                version,
                            });
                            ok += 1;
                        }
                        Err(why) => failed.push(failure(id, code::LIMIT_EXCEEDED, why, None)),
                    }
                }
            }
        }
        self.changed();
        self.metrics.resource_registrations += ok as u64;
        self.metrics.resource_conflicts +=
            failed.iter().filter(|f| f.code == code::CONFLICT).count() as u64;
        if specs.len() > 1 {
            self.metrics.resource_bulk_operations += 1;
        }
        Ok((ok, failed))
    }

    /// One batch of a release; `owner: None` is an administrator's release.
    pub(crate) fn release_batch(
        &mut self,
        conn: ConnId,
        peer: Peer,
        owner: Option<(u32, u64)>,
        ids: &[String],
        undo: &mut Vec<Undo>,
    ) -> Result<(u32, Vec<ResourceFailure>), WireError> {
        match owner {
            Some((index, inc)) => {
                self.acts_for(conn, peer, index, inc)?;
            }
            None if !self.is_admin(peer) => {
                return Err(WireError::NotOwner(format!(
                    "releasing other instances' resources is for administrators; uid {} is not one",
                    peer.uid
                )));
            }
            None => {}
        }
        let (mut ok, mut failed) = (0, Vec::new());
        for id in ids {
            match self.resources.by_id.get(id).map(|r| r.owner) {
                None => failed.push(failure(
                    id,
                    code::RESOURCE_NOT_FOUND,
                    format!("resource '{id}' is not owned by any instance"),
                    None,
                )),
                Some(o) if owner.is_some_and(|(me, _)| me != o) => {
                    let name = self.instance_name(o);
                    let why = format!("resource '{id}' is owned by instance '{name}'");
                    failed.push(failure(id, code::NOT_OWNER, why, Some(name)));
                }
                Some(_) => {
                    let prev = self.remove_rec(id).expect("present");
                    undo.push(Undo::Released {
                        id: id.clone(),
                        prev,
                    });
                    ok += 1;
                }
            }
        }
        self.changed();
        self.metrics.resource_releases += ok as u64;
        if ids.len() > 1 {
            self.metrics.resource_bulk_operations += 1;
        }
        Ok((ok, failed))
    }

    /// Undoes an all-or-nothing request, newest step first.
    pub(crate) fn rollback(&mut self, undo: Vec<Undo>) {
        let alive = |st: &Self, r: &ResourceRec| {
            st.instances[r.owner as usize]
                .as_ref()
                .is_some_and(|i| i.incarnation == r.incarnation)
        };
        for u in undo.into_iter().rev() {
            match u {
                Undo::Claimed { id, version } => {
                    if self.at_version(&id, version) {
                        self.remove_rec(&id);
                    }
                }
                Undo::TookOver { id, prev, version } => {
                    if !self.at_version(&id, version) {
                        continue; // changed hands since: not ours to undo
                    }
                    if alive(self, &prev) {
                        self.set_owner(&id, prev.owner);
                        if let Some(r) = self.resources.by_id.get_mut(&id) {
                            r.metadata = prev.metadata;
                        }
                        self.journal_own(&id);
                    } else {
                        self.remove_rec(&id);
                    }
                }
                Undo::Released { id, prev } => {
                    if alive(self, &prev) && !self.resources.by_id.contains_key(&id) {
                        let _ = self.insert_rec(&id, prev.owner, prev.metadata);
                    }
                }
            }
        }
        self.changed();
    }

    /// Moves `t.ids` to instance `t.to_instance` of `t.to_service`, all or none.
    pub(crate) fn transfer(&mut self, conn: ConnId, peer: Peer, t: Transfer<'_>) -> Reply {
        let Transfer {
            ids,
            from,
            to_service,
            to_instance,
            reason,
        } = t;
        let refuse = |e: WireError| (Response::Error(e), Vec::new());
        match from {
            Some((index, inc)) => {
                if let Err(e) = self.acts_for(conn, peer, index, inc) {
                    return refuse(e);
                }
            }
            None if !self.is_admin(peer) => {
                return refuse(WireError::NotOwner(format!(
                "transferring other instances' resources is for administrators; uid {} is not one",
                peer.uid
            )))
            }
            None => {}
        }
        let Some(target) = self.find_instance(to_service, to_instance) else {
            return refuse(WireError::BadRequest(format!(
                "transfer target: no instance '{to_instance}' of service '{to_service}'"
            )));
        };
        let st = self.status(target);
        if st != Status::Online {
            return refuse(WireError::BadRequest(format!(
                "transfer target '{to_instance}' is {st:?}, not Online"
            )));
        }
        let mut moving = Vec::new();
        for id in ids {
            match self.resources.by_id.get(id).map(|r| r.owner) {
                None => {
                    return refuse(WireError::ResourceNotFound {
                        resource: id.clone(),
                    })
                }
                Some(o) if from.is_some_and(|(me, _)| me != o) => {
                    return refuse(WireError::NotOwner(format!(
                        "resource '{id}' is owned by instance '{}'",
                        self.instance_name(o)
                    )))
                }
                Some(o) if o == target => {}
                Some(o) => moving.push((id, o)),
            }
        }
        let limit = self.cfg.max_resources_per_instance as usize;
        let have = self.instances[target as usize]
            .as_ref()
            .map_or(0, |r| r.owned.len());
        if have + moving.len() > limit {
            return refuse(WireError::LimitExceeded(format!(
                "instance '{to_instance}' owns {have} resources; {} more would pass the limit of {limit}",
                moving.len()
            )));
        }
        self.metrics.resource_transfers += moving.len() as u64;
        for (id, old) in moving {
            let from_name = self.instance_name(old);
            self.set_owner(id, target);
            tracing::info!(resource = %id, from = %from_name, to = to_instance, reason, uid = peer.uid, "resource transferred");
        }
        self.changed();
        (Response::Done, Vec::new())
    }

    /// A page of resources. `viewer`, when a control connection asks: only resources of
    /// services its peer may call or serve are listed (everything for administrators and
    /// the broker's uid); `None` (the authenticated admin API) lists all.
    pub(crate) fn query_resources(
        &mut self,
        q: &ResourceQuery,
        viewer: Option<(crate::state::ConnId, crate::state::Peer)>,
    ) -> ResourcePage {
        self.metrics.resource_lookups += 1;
        let visible: Option<HashSet<u32>> = viewer
            .map(|(conn, peer)| {
                use crate::policy::Action;
                self.services
                    .iter()
                    .enumerate()
                    .filter_map(|(i, s)| {
                        let s = s.as_ref()?;
                        (self.permit(conn, peer, &s.name, Action::Call).is_ok()
                            || self.permit(conn, peer, &s.name, Action::Serve).is_ok())
                        .then_some(i as u32)
                    })
                    .collect::<HashSet<u32>>()
            })
            .filter(|v| v.len() < self.services.iter().flatten().count());
        let limit = page_limit(q);
        let ids: HashSet<&str> = q.ids.iter().map(String::as_str).collect();
        let unfiltered = visible.is_none() && filters_nothing(q);
        let keep = |(id, r): &(&String, &ResourceRec)| {
            self.resource_matches(q, &ids, visible.as_ref(), id, r)
        };
        // Where the query names ids, an instance or a service, the candidates are those
        // ids, or what the named owners hold (each instance keeps its set), sorted: the
        // page costs what the query names, not the whole map.
        let narrowed: Option<Vec<&str>> = if !ids.is_empty() {
            Some(ids.iter().copied().collect())
        } else if q.instance.is_some() || q.service.is_some() {
            Some(
                self.instances
                    .iter()
                    .flatten()
                    .filter(|i| {
                        q.instance.as_ref().is_none_or(|n| &i.id == n)
                            && q.service.as_ref().is_none_or(|s| {
                                self.services[i.service as usize]
                                    .as_ref()
                                    .is_some_and(|v| &v.name == s)
                            })
                    })
                    .flat_map(|i| i.owned.iter().map(String::as_str))
                    .collect(),
            )
        } else {
            None
        };
        let (total, items) = match narrowed {
            Some(mut candidates) => {
                candidates.sort_unstable();
                candidates.dedup();
                let hits: Vec<(&String, &ResourceRec)> = candidates
                    .into_iter()
                    .filter_map(|id| self.resources.by_id.get_key_value(id))
                    .filter(|h| keep(h))
                    .collect();
                (
                    hits.len() as u64,
                    self.page(hits.into_iter(), q.offset, limit),
                )
            }
            None => {
                // In id order already (a BTreeMap): a page is skip + take, and without
                // filters the total is the map's length, so a page costs its offset plus
                // its size, not the map.
                let hits = self.resources.by_id.iter().filter(|h| keep(h));
                let total = if unfiltered {
                    self.resources.by_id.len() as u64
                } else {
                    hits.clone().count() as u64
                };
                (total, self.page(hits, q.offset, limit))
            }
        };
        let has_more = q.offset as u64 + (items.len() as u64) < total;
        ResourcePage {
            items,
            total,
            has_more,
        }
    }

    /// Whether resource `id` passes `q`'s filters: `ids` (if any), the services a viewer
    /// may see (`visible`), service, instance, type and tags.
    fn resource_matches(
        &self,
        q: &ResourceQuery,
        ids: &HashSet<&str>,
        visible: Option<&HashSet<u32>>,
        id: &str,
        r: &ResourceRec,
    ) -> bool {
        let inst = self.instances[r.owner as usize].as_ref();
        let svc = inst.and_then(|i| self.services[i.service as usize].as_ref());
        (ids.is_empty() || ids.contains(id))
            && visible.is_none_or(|v| inst.is_some_and(|i| v.contains(&i.service)))
            && q.service
                .as_ref()
                .is_none_or(|s| svc.is_some_and(|v| &v.name == s))
            && q.instance
                .as_ref()
                .is_none_or(|s| inst.is_some_and(|i| &i.id == s))
            && q.resource_type
                .as_ref()
                .is_none_or(|t| &r.metadata.resource_type == t)
            && q.tags.iter().all(|t| r.metadata.tags.contains(t))
    }

    /// One step of [`stepwise_resources`]: at most [`STEP`] entries after `from`, counting
    /// matches into `matched` and keeping the ids of those on the page. The key to resume
    /// after, or `None` at the end of the map.
    fn resource_step(
        &self,
        q: &ResourceQuery,
        from: &std::ops::Bound<String>,
        matched: &mut u64,
        page: &mut Vec<String>,
        limit: usize,
    ) -> Option<String> {
        // `stepwise_resources` walks only queries naming no ids.
        let none = HashSet::new();
        let range = (from.clone(), std::ops::Bound::Unbounded);
        for (n, (id, r)) in self.resources.by_id.range(range).enumerate() {
            if n == STEP {
                return Some(id.clone());
            }
            if self.resource_matches(q, &none, None, id, r) {
                if *matched >= u64::from(q.offset) && page.len() < limit {
                    page.push(id.clone());
                }
                *matched += 1;
            }
        }
        None
    }

    /// `limit` resources of `hits` from `offset`, as the admin API shows them.
    fn page<'a>(
        &self,
        hits: impl Iterator<Item = (&'a String, &'a ResourceRec)>,
        offset: u32,
        limit: usize,
    ) -> Vec<ResourceInfo> {
        hits.skip(offset as usize)
            .take(limit)
            .map(|(id, r)| {
                let inst = self.instances[r.owner as usize].as_ref();
                let status = self.status(r.owner);
                ResourceInfo {
                    id: id.clone(),
                    service: inst
                        .and_then(|i| self.services[i.service as usize].as_ref())
                        .map_or_else(String::new, |s| s.name.clone()),
                    instance_id: inst.map_or_else(String::new, |i| i.id.clone()),
                    owner_index: r.owner,
                    owner_status: status,
                    owner_healthy: status == Status::Online,
                    metadata: r.metadata.clone(),
                    claimed_at_ms: r.claimed_at_ms,
                    expires_at_ms: r.expires_at_ms,
                }
            })
            .collect()
    }

    /// Releases everything an instance that is going away owned.
    pub(crate) fn release_all(&mut self, owned: &HashSet<String>, reason: &str) {
        for id in owned {
            self.remove_rec(id);
        }
        if !owned.is_empty() {
            tracing::info!(
                count = owned.len(),
                reason,
                "released the resources of a departing instance"
            );
            self.changed();
        }
    }

    /// Releases resources whose TTL has passed.
    pub(crate) fn expire_resources(&mut self) {
        debug_assert!(self.resources.ttl.len() <= self.resources.by_id.len());
        let now = Instant::now();
        let mut any = false;
        while let Some((at, _, _)) = self.resources.ttl.first() {
            if *at > now {
                break;
            }
            let (_, id, _) = self.resources.ttl.pop_first().expect("first() was Some");
            if self.remove_rec(&id).is_some() {
                self.metrics.resource_releases += 1;
                tracing::info!(resource = %id, "resource released: TTL expired");
                any = true;
            }
        }
        if any {
            self.changed();
        }
    }
}

/// The page size a query asks for, within bounds.
fn page_limit(q: &ResourceQuery) -> usize {
    let n = match q.limit {
        0 => DEFAULT_PAGE,
        n => n.min(MAX_PAGE),
    };
    n as usize
}

/// Whether a query lists every resource (no ids, service, instance, type or tag).
fn filters_nothing(q: &ResourceQuery) -> bool {
    q.ids.is_empty()
        && q.service.is_none()
        && q.instance.is_none()
        && q.resource_type.is_none()
        && q.tags.is_empty()
}

/// The admin API's resource listing (all services: an authenticated administrator), read
/// in steps of at most [`STEP`] map entries with the state lock released between them:
/// a listing filtered by type or tags over 100,000 resources, or paged deep, never holds
/// the broker for the whole walk. Pages of a map changing meanwhile are a snapshot of
/// each step, not of one instant (a resource claimed or released during the walk may be
/// counted or not). An unfiltered first page stays a single short look.
pub(crate) fn stepwise_resources(
    state: &parking_lot::Mutex<State>,
    q: &ResourceQuery,
) -> ResourcePage {
    // Named ids are looked up one by one, never walked.
    if (filters_nothing(q) && (q.offset as usize) < STEP) || !q.ids.is_empty() {
        return state.lock().query_resources(q, None);
    }
    let limit = page_limit(q);
    let (mut from, mut matched, mut page) = (std::ops::Bound::Unbounded, 0u64, Vec::new());
    loop {
        let st = state.lock();
        match st.resource_step(q, &from, &mut matched, &mut page, limit) {
            Some(next) => from = std::ops::Bound::Included(next),
            None => break,
        }
    }
    let mut st = state.lock();
    st.metrics.resource_lookups += 1;
    let hits: Vec<(&String, &ResourceRec)> = page
        .iter()
        .filter_map(|id| st.resources.by_id.get_key_value(id))
        .collect();
    let items = st.page(hits.into_iter(), 0, limit);
    let has_more = u64::from(q.offset) + (items.len() as u64) < matched;
    ResourcePage {
        items,
        total: matched,
        has_more,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// Random claims and releases on a 16-slot map (long collision chains, constant
    /// shifting): after every step each live id is found at its owner by the readers'
    /// probe, each released id is not found, and only live ids have TTL entries.
    #[test]
    fn backward_shift_deletion_keeps_every_live_id_reachable() {
        let cfg = crate::BrokerConfig::parse_from([
            "aegis-broker",
            "--max-resources",
            "16",
            "--max-instances",
            "4",
        ]);
        let mut st = State::new(cfg, crate::identities::Identities::starting_at(1, 1)).unwrap();
        let peer = Peer {
            pid: std::process::id(),
            uid: 0,
            gid: 0,
        };
        let (owner, inc) = st.register_small(1, peer, "i");
        let mut live: HashSet<String> = HashSet::new();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for step in 0..5000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let id = format!("r{}", x % 24);
            let mut undo = Vec::new();
            if live.contains(&id) {
                let (ok, _) = st
                    .release_batch(
                        1,
                        peer,
                        Some((owner, inc)),
                        std::slice::from_ref(&id),
                        &mut undo,
                    )
                    .unwrap();
                assert_eq!(ok, 1);
                live.remove(&id);
            } else {
                let (ok, f) = st
                    .claim_batch(
                        1,
                        peer,
                        (owner, inc),
                        &[ResourceSpec {
                            id: id.clone(),
                            metadata: ResourceMetadata {
                                ttl_ms: Some(3_600_000),
                                ..Default::default()
                            },
                        }],
                        false,
                        &mut undo,
                    )
                    .unwrap();
                if ok == 1 {
                    live.insert(id);
                } else {
                    assert_eq!(f[0].code, code::LIMIT_EXCEEDED, "step {step}: {f:?}");
                }
            }
            // A released id takes its TTL entry with it: churn leaves nothing behind.
            assert_eq!(st.resources.ttl.len(), live.len(), "step {step}");
            for n in 0..24 {
                let id = format!("r{n}");
                let found = st.registry.find_resource(&id);
                assert_eq!(found.is_some(), live.contains(&id), "step {step}: {id}");
                if let Some((o, i)) = found {
                    assert_eq!((o, i), (owner, inc));
                    assert_eq!(
                        st.resources.by_id[&id].slot,
                        st.resources
                            .slot_ids
                            .iter()
                            .find(|(_, v)| **v == id)
                            .map(|(k, _)| *k)
                            .unwrap()
                    );
                }
            }
        }
    }

    #[test]
    fn a_rollback_never_undoes_what_others_did_between_batches() {
        let cfg = crate::BrokerConfig::parse_from(["aegis-broker", "--max-instances", "4"]);
        let mut st = State::new(cfg, crate::identities::Identities::starting_at(1, 1)).unwrap();
        let reg = |st: &mut State, conn: u64, id: &str| {
            let peer = Peer {
                pid: std::process::id(),
                uid: 0,
                gid: 0,
            };
            st.register_small(conn, peer, id)
        };
        let a = reg(&mut st, 1, "a");
        let c = reg(&mut st, 2, "c");
        let peer = Peer {
            pid: std::process::id(),
            uid: 0,
            gid: 0,
        };
        let mut undo_a = Vec::new();
        st.claim_batch(1, peer, a, &[ResourceSpec::new("x")], false, &mut undo_a)
            .unwrap();
        // Between A's batches: an administrator releases x and C claims it.
        st.release_batch(3, peer, None, &["x".to_string()], &mut Vec::new())
            .unwrap();
        st.claim_batch(
            2,
            peer,
            c,
            &[ResourceSpec::new("x")],
            false,
            &mut Vec::new(),
        )
        .unwrap();
        // A's request fails later and rolls back: C's claim must survive.
        st.rollback(undo_a);
        assert_eq!(st.registry.find_resource("x"), Some(c));
    }
}
