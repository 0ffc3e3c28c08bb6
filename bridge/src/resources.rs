//! Resource ownership across hosts, through a JetStream key-value bucket.
//!
//! **Why a bucket:** the seed's `ipc.resource.*` subjects have one authority answering
//! them (the AegisIPC router); bridges are peers. A bucket gives every host the same map
//! with an atomic "create if absent", so the first claim of an id on any host wins, and a
//! watch that tells every other host at once. The seed's subjects are served on top of it
//! (`resource_api`).
//!
//! * **Local → bucket.** Ids owned by exported local instances are written as
//!   `{resource_id, host, service, instance_id}` (key `r` + the id in hex: bucket keys
//!   allow few characters). A create that finds another host's live entry loses: the
//!   winner's ownership is mirrored here, which takes the id from the local owner (logged).
//!   An entry of a host silent for 5 heartbeat intervals is taken over. Ids that stop being
//!   owned here are deleted (only if the entry is still ours), also those released while
//!   the bridge was down (its entries are read back from the bucket when it returns).
//! * **Bucket → local.** Every other host's id is claimed on the local bus by the stand-in
//!   of its owner, so a local claim of it fails with `ResourceConflict` naming the remote
//!   owner — exactly as a local conflict — and `call_resource` reaches the stand-in, which
//!   forwards to the owner's host.
//!
//! The window between a local claim and its bucket write (milliseconds) is where two hosts
//! can both believe they own a fresh id; the bucket settles it and the loser's bridge takes
//! the id back from its local owner.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aegis_client::proto::{BulkOptions, ResourceQuery, ResourceSpec};
use async_nats::jetstream::kv;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::bridge::Shared;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Owner {
    pub resource_id: String,
    pub host: String,
    pub service: String,
    /// The owner's NATS instance id.
    pub instance_id: String,
    /// The writing host's signature of the fields above (with trusted hosts configured).
    #[serde(default)]
    pub sig: String,
    /// When it was claimed (ISO 8601, UTC); empty in entries of older bridges.
    #[serde(default)]
    pub registered_at: String,
    /// The seed's `ResourceMetadata`, for ids an AegisIPC instance registered through
    /// `ipc.resource.*` (not signed: shown only where no trusted hosts are configured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<rmpv::Value>,
    /// Written through `ipc.resource.*` for an AegisIPC instance on NATS (not by the
    /// bridge of the owner's host for a bus instance).
    #[serde(default)]
    pub seed: bool,
}

impl Owner {
    fn fields(&self) -> [&str; 4] {
        [
            &self.resource_id,
            &self.host,
            &self.service,
            &self.instance_id,
        ]
    }
    /// Whether this entry may be believed: always without trusted hosts; with them, only
    /// when signed by the host it names, for an instance of that host.
    fn believed(&self, sh: &Shared) -> bool {
        !sh.trust.checking()
            || (self.instance_id.ends_with(&format!("@{}", self.host))
                && sh
                    .trust
                    .check(&sh.cfg.name, &self.host, "owner", &self.fields(), &self.sig))
    }
}

#[derive(Default)]
pub struct Mirror {
    store: Mutex<Option<kv::Store>>,
    watch: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Ids this host wrote: id -> (owner's local id, revision).
    published: Mutex<HashMap<String, (String, u64)>>,
    /// Other hosts' ids, from the bucket.
    remote: Mutex<HashMap<String, Owner>>,
    /// Every believed entry of the bucket, in id order (what `ipc.resource.query` pages).
    pub all: Mutex<std::collections::BTreeMap<String, Owner>>,
    /// This host's entries as the bucket has them (id -> revision), written by this run or
    /// an earlier one: an id released while the bridge was down is deleted on its return.
    ours: Mutex<HashMap<String, u64>>,
    /// Since when the bucket is usable (entries of hosts silent longer may be taken over).
    since: Mutex<Option<Instant>>,
    /// The bucket could not be opened (JetStream off?): said once per connection.
    warned: std::sync::atomic::AtomicBool,
    /// Mirrored claims the local broker refused (a bridge without administrator rights may
    /// not force claims), and since when: not asked again for [`REFUSED_BACKOFF`], and
    /// logged once.
    refused: Mutex<HashMap<String, Instant>>,
}

/// How long a refused mirrored claim is left alone before it is tried again.
const REFUSED_BACKOFF: Duration = Duration::from_secs(60);

pub fn key(id: &str) -> String {
    let mut k = String::with_capacity(1 + 2 * id.len());
    k.push('r');
    for b in id.bytes() {
        k.push_str(&format!("{b:02x}"));
    }
    k
}

fn id_of(key: &str) -> Option<String> {
    let hex = key.strip_prefix('r')?;
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

impl Mirror {
    /// Called when the connection drops: the bucket is reopened after it comes back.
    pub fn disconnected(&self) {
        if let Some(w) = self.watch.lock().unwrap().take() {
            w.abort();
        }
        *self.store.lock().unwrap() = None;
        *self.since.lock().unwrap() = None;
        self.all.lock().unwrap().clear();
        self.warned.store(false, Ordering::Relaxed);
    }
}

/// The bucket, opened if it is not yet (None without `kv_bucket` or JetStream).
pub fn store(sh: &Arc<Shared>) -> Option<kv::Store> {
    open(sh, sh.cfg.kv_bucket.as_deref()?)
}

/// Opens (or creates) the bucket and starts watching it.
fn open(sh: &Arc<Shared>, bucket: &str) -> Option<kv::Store> {
    let m = &sh.resources;
    if let Some(s) = m.store.lock().unwrap().clone() {
        let finished = m
            .watch
            .lock()
            .unwrap()
            .as_ref()
            .is_none_or(|w| w.is_finished());
        if !finished {
            return Some(s);
        }
    }
    let js = async_nats::jetstream::new(sh.nats.clone());
    let opened = sh.wait("opening the resource bucket", async {
        match js.get_key_value(bucket).await {
            Ok(s) => Ok(s),
            Err(_) => {
                js.create_key_value(kv::Config {
                    bucket: bucket.to_owned(),
                    history: 1,
                    ..Default::default()
                })
                .await
            }
        }
    });
    let store = match opened? {
        Ok(s) => s,
        Err(e) => {
            if !m.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(bucket, "resource routing across hosts is off: cannot open the JetStream bucket ({e}); is JetStream enabled?");
            }
            return None;
        }
    };
    let watcher = sh.rt.spawn(watch(sh.clone(), store.clone()));
    *m.watch.lock().unwrap() = Some(watcher);
    *m.store.lock().unwrap() = Some(store.clone());
    m.since.lock().unwrap().get_or_insert_with(Instant::now);
    Some(store)
}

/// Follows the bucket: other hosts' ids into `remote`.
async fn watch(sh: Arc<Shared>, store: kv::Store) {
    // Every current entry first, then changes.
    let mut w = match store.watch_with_history(">").await {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!("watching the resource bucket: {e}");
            return;
        }
    };
    while let Some(entry) = w.next().await {
        let e = match entry {
            Ok(e) => e,
            Err(err) => {
                tracing::debug!("resource bucket watch: {err}");
                continue;
            }
        };
        tracing::trace!(key = %e.key, op = ?e.operation, "resource bucket entry");
        let Some(id) = id_of(&e.key) else { continue };
        let owner = match e.operation {
            kv::Operation::Put => crate::model::decode::<Owner>(&e.value)
                .ok()
                .filter(|o| {
                    let ok = o.believed(&sh) && id == o.resource_id;
                    if !ok {
                        tracing::warn!(resource = %id, host = %o.host, "ignoring a resource entry not signed by its host");
                    }
                    ok
                }),
            kv::Operation::Delete | kv::Operation::Purge => None,
        };
        {
            let m = &sh.resources;
            match &owner {
                Some(o) => m.all.lock().unwrap().insert(id.clone(), o.clone()),
                None => m.all.lock().unwrap().remove(&id),
            };
            let (mut remote, mut ours) = (m.remote.lock().unwrap(), m.ours.lock().unwrap());
            match owner {
                Some(o) if o.host != sh.cfg.name => {
                    ours.remove(&id);
                    remote.insert(id, o);
                }
                Some(_) => {
                    remote.remove(&id);
                    ours.insert(id, e.revision);
                }
                None => {
                    remote.remove(&id);
                    ours.remove(&id);
                }
            }
        }
        sh.poke();
    }
}

/// Ids owned here by exported (non-stand-in) instances: id -> (service, owner's local id).
fn local_ids(sh: &Shared) -> Option<HashMap<String, (String, String)>> {
    let proxies: std::collections::HashSet<String> =
        sh.state.lock().unwrap().proxies.keys().cloned().collect();
    let mut out = HashMap::new();
    let mut offset = 0;
    loop {
        let page = sh
            .bus
            .resources(&ResourceQuery {
                limit: 1000,
                offset,
                ..Default::default()
            })
            .map_err(|e| tracing::warn!("listing local resources: {e}"))
            .ok()?;
        let n = page.items.len() as u32;
        for r in page.items {
            if !proxies.contains(&r.instance_id)
                && sh
                    .cfg
                    .export
                    .iter()
                    .any(|p| crate::config::glob(p, &r.service))
            {
                out.insert(r.id, (r.service, r.instance_id));
            }
        }
        if !page.has_more || n == 0 {
            return Some(out);
        }
        offset += n;
    }
}

/// One round: publish ours, mirror theirs.
pub fn sync(sh: &Arc<Shared>) {
    let Some(bucket) = sh.cfg.kv_bucket.clone() else {
        return;
    };
    let Some(store) = open(sh, &bucket) else {
        return;
    };
    tracing::trace!("resource bucket open");
    if let Some(local) = local_ids(sh) {
        tracing::trace!(ids = local.len(), "local resources");
        publish(sh, &store, local);
    }
    apply_remote(sh);
}

fn publish(sh: &Shared, store: &kv::Store, local: HashMap<String, (String, String)>) {
    let m = &sh.resources;
    let silent_limit = sh.cfg.heartbeat * 5;
    let settled = m
        .since
        .lock()
        .unwrap()
        .is_some_and(|t| t.elapsed() > silent_limit);
    // Entries of ours (this run's writes, or the bucket's word for them) no longer owned
    // here; the bucket's revision is the newer where both know one.
    let mut gone: HashMap<String, u64> = m
        .published
        .lock()
        .unwrap()
        .iter()
        .filter(|(id, _)| !local.contains_key(*id))
        .map(|(id, (_, rev))| (id.clone(), *rev))
        .collect();
    gone.extend(
        m.ours
            .lock()
            .unwrap()
            .iter()
            .filter(|(id, _)| !local.contains_key(*id))
            .map(|(id, rev)| (id.clone(), *rev)),
    );
    for (id, rev) in gone {
        let r = sh.wait(
            "deleting a resource entry",
            store.delete_expect_revision(key(&id), Some(rev)),
        );
        if let Some(Err(e)) = r {
            tracing::debug!(resource = %id, "not deleting its entry (no longer ours?): {e}");
        }
        m.published.lock().unwrap().remove(&id);
        m.ours.lock().unwrap().remove(&id);
    }
    for (id, (service, owner)) in local {
        if m.published
            .lock()
            .unwrap()
            .get(&id)
            .is_some_and(|(o, _)| *o == owner)
        {
            continue;
        }
        let mut entry = Owner {
            resource_id: id.clone(),
            host: sh.cfg.name.clone(),
            service,
            instance_id: sh.nats_id(&owner),
            sig: String::new(),
            registered_at: crate::model::now_iso(),
            metadata: None,
            seed: false,
        };
        entry.sig = sh.trust.sign("owner", &entry.fields()).unwrap_or_default();
        let value = crate::model::encode(&entry);
        let k = key(&id);
        let Some(created) = sh.wait(
            "writing a resource entry",
            store.create(&k, value.clone().into()),
        ) else {
            continue;
        };
        tracing::trace!(resource = %id, ok = created.is_ok(), "resource entry written");
        let rev = match created {
            Ok(rev) => Some(rev),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                let entry = sh
                    .wait("reading a resource entry", store.entry(&k))
                    .and_then(Result::ok)
                    .flatten();
                let theirs = entry
                    .as_ref()
                    .and_then(|e| crate::model::decode::<Owner>(&e.value).ok());
                match (entry, theirs) {
                    // Ours, or one nobody trusted signed (forged): written over.
                    (Some(e), Some(o)) if o.host == sh.cfg.name || !o.believed(sh) => sh
                        .wait(
                            "updating a resource entry",
                            store.update(&k, value.into(), e.revision),
                        )
                        .and_then(Result::ok),
                    (Some(e), Some(o)) => {
                        let alive = sh
                            .state
                            .lock()
                            .unwrap()
                            .directory
                            .values()
                            .any(|r| r.host == o.host);
                        if alive || !settled {
                            tracing::warn!(resource = %id, owner = %o.instance_id,
                                "claimed here but already owned on host {}: the first claim wins, the id goes to it", o.host);
                            None
                        } else {
                            tracing::info!(resource = %id, "taking over from silent host {}", o.host);
                            sh.wait(
                                "updating a resource entry",
                                store.update(&k, value.into(), e.revision),
                            )
                            .and_then(Result::ok)
                        }
                    }
                    // Deleted meanwhile (or unreadable): try again next round.
                    _ => None,
                }
            }
            Err(e) => {
                tracing::warn!(resource = %id, "writing its owner to the bucket: {e}");
                None
            }
        };
        if let Some(rev) = rev {
            m.published.lock().unwrap().insert(id, (owner, rev));
        }
    }
}

/// For one stand-in: ids to claim on it, ids to release from it, its id.
type Mirroring = (
    Arc<aegis_client::Instance>,
    Vec<String>,
    Vec<String>,
    String,
);

/// Claims other hosts' ids on their owners' stand-ins; releases what they no longer own.
fn apply_remote(sh: &Shared) {
    let remote = sh.resources.remote.lock().unwrap().clone();
    let work: Vec<Mirroring> = {
        let st = sh.state.lock().unwrap();
        st.proxies
            .iter()
            .map(|(pid, p)| {
                let refused = sh.resources.refused.lock().unwrap();
                let want: Vec<String> = remote
                    .iter()
                    .filter(|(id, o)| o.instance_id == *pid && !p.claimed.contains(*id))
                    .filter(|(id, _)| {
                        refused
                            .get(*id)
                            .is_none_or(|t| t.elapsed() >= REFUSED_BACKOFF)
                    })
                    .map(|(id, _)| id.clone())
                    .collect();
                drop(refused);
                let drop: Vec<String> = p
                    .claimed
                    .iter()
                    .filter(|id| remote.get(*id).is_none_or(|o| o.instance_id != *pid))
                    .cloned()
                    .collect();
                (p.inst.clone(), want, drop, pid.clone())
            })
            .filter(|(_, w, d, _)| !w.is_empty() || !d.is_empty())
            .collect()
    };
    for (inst, want, drop, pid) in work {
        if !want.is_empty() {
            // A plain claim first (what a bridge without administrator rights may do, and
            // all an id nobody here holds needs); force only the ids a local instance
            // holds (two hosts raced for them and the bucket says the other won).
            let plain = BulkOptions {
                mode: aegis_client::BulkMode::ContinueOnError,
                ..Default::default()
            };
            let specs = want
                .iter()
                .map(|id| ResourceSpec::new(id.as_str()))
                .collect();
            let (conflicting, mut failures): (Vec<String>, Vec<_>) =
                match inst.claim_with(specs, plain) {
                    Ok(r) => {
                        let (c, other): (Vec<_>, Vec<_>) = r
                            .failures
                            .into_iter()
                            .partition(|f| f.code == aegis_client::error::code::CONFLICT);
                        (c.into_iter().map(|f| f.id).collect(), other)
                    }
                    Err(_) => (want.clone(), Vec::new()),
                };
            let specs = conflicting
                .iter()
                .map(|id| ResourceSpec::new(id.as_str()))
                .collect();
            let opts = BulkOptions {
                force: true,
                mode: aegis_client::BulkMode::ContinueOnError,
                ..Default::default()
            };
            let forced = if conflicting.is_empty() {
                Ok(Default::default())
            } else {
                inst.claim_with(specs, opts)
            };
            match forced {
                Ok(report) => {
                    failures.extend(report.failures);
                    let failed: std::collections::HashSet<&str> =
                        failures.iter().map(|f| f.id.as_str()).collect();
                    let mut st = sh.state.lock().unwrap();
                    if let Some(p) = st.proxies.get_mut(&pid) {
                        p.claimed.extend(
                            want.iter()
                                .filter(|id| !failed.contains(id.as_str()))
                                .cloned(),
                        );
                    }
                    std::mem::drop(st);
                    let mut refused = sh.resources.refused.lock().unwrap();
                    for f in &failures {
                        // Logged once per id (then at debug): a refusal repeats itself.
                        if refused.insert(f.id.clone(), Instant::now()).is_none() {
                            tracing::warn!(resource = %f.id, instance = %pid, "cannot mirror the remote claim (asked again every {REFUSED_BACKOFF:?}): {}", f.reason);
                        } else {
                            tracing::debug!(resource = %f.id, instance = %pid, "mirroring the remote claim refused again: {}", f.reason);
                        }
                    }
                    for id in &want {
                        if !failed.contains(id.as_str()) {
                            refused.remove(id);
                        }
                    }
                }
                Err(e) => tracing::warn!(instance = %pid, "mirroring remote claims: {e}"),
            }
        }
        if !drop.is_empty() {
            let ids: Vec<&str> = drop.iter().map(String::as_str).collect();
            let opts = BulkOptions {
                mode: aegis_client::BulkMode::ContinueOnError,
                ..Default::default()
            };
            if let Err(e) = inst.release_with(&ids, opts) {
                tracing::warn!(instance = %pid, "releasing mirrored claims: {e}");
            }
            let mut st = sh.state.lock().unwrap();
            if let Some(p) = st.proxies.get_mut(&pid) {
                for id in &drop {
                    p.claimed.remove(id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_round_trip() {
        for id in ["doc-1", "a b/c", "ünï", "x.y"] {
            let k = super::key(id);
            assert!(k.chars().all(|c| c.is_ascii_alphanumeric()), "{k}");
            assert_eq!(super::id_of(&k).as_deref(), Some(id));
        }
    }
}
