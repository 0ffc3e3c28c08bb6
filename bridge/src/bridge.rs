//! The bridge's state and its loops.
//!
//! * **Export.** Local instances of services matching an `--export` pattern are announced on
//!   NATS as `{instance}@{host}` (the seed's `ipc.service.register`, then
//!   `ipc.service.heartbeat` every interval, `ipc.service.unregister` when they leave) and
//!   answer on their inbox `ipc.instance.{instance}@{host}.inbox`. Every bridge also answers
//!   `ipc.route.request` in the queue group `aegis-bridge` (any bridge can route any
//!   request: a service it does not have locally is reached through its stand-ins for
//!   remote instances), and each exported service answers raw bytes on
//!   `aegis.call.{service}.{method}` (queue group too) for clients that do not speak the
//!   AegisIPC models.
//! * **Import.** Instances other hosts announce (other bridges, or AegisIPC instances
//!   registering on NATS) whose service matches an `--import` pattern get a local stand-in:
//!   an instance of the same id registered on the local bus with metadata
//!   `aegis.remote = HOST`, which routing picks only when no local instance is online, and
//!   whose serving threads forward each call to the remote inbox. A remote instance not
//!   heard from for 5 heartbeat intervals, or an unregistered one, leaves; so does every
//!   stand-in while NATS is unreachable (calls fail fast with `NoAvailableInstance`), and
//!   all of them at once if the bridge dies (its bus connection closes).
//! * **Resources** (see `resources`).
//!
//! Calls between two aegis bridges travel as raw bytes with the method, trace id and hop
//! count in headers (`Aegis-*`); an AegisIPC instance gets the seed's `RouteRequest`.
//! Hops make a call that bounces between hosts end with `LoopDetected`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aegis_client::layout::REMOTE_METADATA_KEY;
use aegis_client::{Bus, CallOptions, Instance, RegisterOptions, Selection, ServiceError};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::StreamExt;

use crate::config::{glob, Settings};
use crate::model::{self, RouteRequest, RouteResponse};

/// Queue group of `ipc.route.request` and the plain subjects.
pub const QUEUE_GROUP: &str = "aegis-bridge";
/// Serving threads per stand-in (calls it forwards at once).
const PROXY_THREADS: usize = 4;
/// Stand-ins for one remote host at most (so at most this many times PROXY_THREADS
/// forwarding threads): a host announcing more gets no more.
const MAX_STANDINS_PER_HOST: usize = 64;
/// Stand-ins of one service at most: the other half of its member slots stays for local
/// instances, which are never refused because of stand-ins.
const MAX_STANDINS_PER_SERVICE: usize = aegis_client::layout::MAX_MEMBERS / 2;
/// How long a forwarded call may take on the other host.
const REMOTE_TIMEOUT: Duration = Duration::from_secs(5);

pub const H_METHOD: &str = "Aegis-Method";
pub const H_TRACE: &str = "Aegis-Trace";
pub const H_HOPS: &str = "Aegis-Hops";
pub const H_TIMEOUT_MS: &str = "Aegis-Timeout-Ms";
/// The W3C trace context of a forwarded call.
pub const H_TRACEPARENT: &str = "traceparent";
pub const H_ERROR_CODE: &str = "Aegis-Error-Code";
pub const H_ERROR_TYPE: &str = "Aegis-Error-Type";

/// A remote instance as heard of on NATS.
#[derive(Clone, Debug)]
pub struct Remote {
    pub service: String,
    pub host: String,
    /// Its announced metadata, as text, for its stand-in.
    pub metadata: Vec<(String, String)>,
    pub last_seen: Instant,
    /// Announced by an aegis bridge (raw calls) rather than an AegisIPC instance (models).
    pub aegis: bool,
}

/// A local stand-in for a remote instance.
pub struct Proxy {
    pub service: String,
    pub inst: Arc<Instance>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Resource ids claimed on it (mirrored from the ownership bucket).
    pub claimed: HashSet<String>,
}

/// An exported local instance.
struct Exported {
    service: String,
    inbox: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
pub struct State {
    /// Remote instances, by their NATS instance id.
    pub directory: HashMap<String, Remote>,
    /// Stand-ins, by the remote's NATS instance id (= their local id).
    pub proxies: HashMap<String, Proxy>,
    exported: HashMap<String, Exported>,
    /// Plain-subject subscriptions per exported service.
    plain: HashMap<String, tokio::task::JoinHandle<()>>,
    /// Set on every (re)connect: announce every exported instance again.
    pub reannounce: bool,
    /// Every service any host announced lately (imported or not), and when: the plain
    /// subject's fallback stays silent for these.
    pub announced: HashMap<String, Instant>,
    /// Every instance any host announced lately (imported or not), by NATS id, at most
    /// [`MAX_SEEN`]: whom the seed's `ipc.resource.*` requests may name (see `resource_api`).
    pub seen: HashMap<String, Remote>,
    /// AegisIPC instances on NATS that unregistered or went silent since the last sync
    /// round: their resource ids are released (the seed's "an instance going offline
    /// releases all its resources").
    pub departed: Vec<String>,
}

/// Instances remembered in [`State::seen`] at most (a flood of announcements cannot grow
/// the bridge without bound; beyond it, new names are not remembered until others leave).
pub const MAX_SEEN: usize = 65_536;

pub struct Shared {
    pub bus: Bus,
    pub nats: async_nats::Client,
    pub cfg: Settings,
    pub rt: tokio::runtime::Handle,
    pub state: Mutex<State>,
    pub online: AtomicBool,
    /// Notified when the NATS connection drops: forwarded calls waiting for an answer
    /// fail at once instead of waiting out their timeout.
    pub lost: tokio::sync::Notify,
    /// Wakes the sync loop (something changed).
    pub poke: Mutex<mpsc::Sender<()>>,
    pub resources: crate::resources::Mirror,
    pub trust: crate::trust::Trust,
}

impl Shared {
    pub fn poke(&self) {
        let _ = self.poke.lock().unwrap().send(());
    }

    /// Exported instances: (NATS id, service).
    pub fn exported_list(&self) -> Vec<(String, String)> {
        let st = self.state.lock().unwrap();
        st.exported
            .iter()
            .map(|(k, e)| (k.clone(), e.service.clone()))
            .collect()
    }

    fn exports(&self, service: &str) -> bool {
        self.cfg.export.iter().any(|p| glob(p, service))
    }

    fn imports(&self, service: &str) -> bool {
        self.cfg.import.iter().any(|p| glob(p, service))
    }

    /// The NATS id of a local instance.
    pub fn nats_id(&self, local_id: &str) -> String {
        format!("{local_id}@{}", self.cfg.name)
    }

    /// Local ids of the stand-ins of `service` (never the target of a call that came from
    /// NATS for a local instance: that could bounce back).
    fn proxy_ids(&self, service: &str) -> Vec<String> {
        let st = self.state.lock().unwrap();
        st.proxies
            .iter()
            .filter(|(_, p)| p.service == service)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Runs `f` on the runtime from a blocking thread, for at most 5 s (a NATS or
    /// JetStream operation that never answers must not wedge the sync loop).
    pub fn wait<F: std::future::Future>(&self, what: &str, f: F) -> Option<F::Output> {
        let r = self
            .rt
            .block_on(async move { tokio::time::timeout(Duration::from_secs(5), f).await });
        if r.is_err() {
            tracing::warn!("{what}: no answer from NATS within 5 s");
        }
        r.ok()
    }

    pub fn publish(&self, subject: String, payload: Vec<u8>) {
        if let Err(e) = self.rt.block_on(self.nats.publish(subject, payload.into())) {
            tracing::debug!("publish: {e}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// The sync loop: exports, heartbeats, stand-ins, resources.

/// Runs until the process ends: reconciles what is announced and what stands in with the
/// bus and the directory, on every change and every heartbeat interval.
pub fn sync_loop(sh: Arc<Shared>, pokes: mpsc::Receiver<()>) {
    let mut next_beat = Instant::now();
    loop {
        let wait = next_beat.saturating_duration_since(Instant::now());
        match pokes.recv_timeout(wait) {
            Ok(()) => while pokes.try_recv().is_ok() {},
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        let online = sh.online.load(Ordering::Acquire);
        tracing::trace!(online, "sync round");
        if online {
            sync_exports(&sh);
        }
        expire_remotes(&sh);
        sync_proxies(&sh);
        if online {
            crate::resources::sync(&sh);
            crate::resource_api::release_departed(&sh);
        }
        if Instant::now() >= next_beat {
            if online {
                heartbeats(&sh);
            }
            next_beat = Instant::now() + sh.cfg.heartbeat;
        }
    }
}

/// Wakes the sync loop whenever the local registry changes.
pub fn registry_watch(sh: Arc<Shared>) {
    let mut seen = sh.bus.registry_generation();
    loop {
        let g = sh.bus.wait_registry_change(seen, Duration::from_secs(1));
        if g != seen {
            seen = g;
            sh.poke();
        }
    }
}

/// Local instances to export: NATS id -> (service, local id).
fn wanted_exports(sh: &Shared) -> Option<HashMap<String, (String, String)>> {
    let services = match sh.bus.services() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("listing local services: {e}");
            return None;
        }
    };
    Some(
        services
            .into_iter()
            .filter(|s| sh.exports(&s.name))
            .flat_map(|s| {
                let name = s.name.clone();
                s.instances
                    .into_iter()
                    .filter(|i| !i.metadata.iter().any(|(k, _)| k == REMOTE_METADATA_KEY))
                    // An unhealthy instance leaves other hosts' routing as it leaves ours.
                    .filter(|i| i.status == aegis_client::Status::Online)
                    .map(move |i| (sh.nats_id(&i.id), (name.clone(), i.id)))
            })
            .collect(),
    )
}

fn registration(sh: &Shared, nats_id: &str, service: &str) -> model::ServiceRegistration {
    model::ServiceRegistration {
        service_name: service.to_owned(),
        instance_id: nats_id.to_owned(),
        timestamp: model::now_iso().into(),
        metadata: announce_metadata(sh, ANNOUNCE, service, nats_id),
    }
}

/// What announcements (register, heartbeat) and unregistrations are signed as.
const ANNOUNCE: &str = "announce";
const UNREGISTER: &str = "unregister";

/// Host, bridge and, with a signing key, the signature of (service, id, host).
fn announce_metadata(
    sh: &Shared,
    kind: &str,
    service: &str,
    nats_id: &str,
) -> std::collections::BTreeMap<String, rmpv::Value> {
    let mut m: std::collections::BTreeMap<String, rmpv::Value> = [
        (model::META_HOST.to_owned(), sh.cfg.name.as_str().into()),
        (model::META_BRIDGE.to_owned(), "aegis-bridge".into()),
    ]
    .into_iter()
    .collect();
    if let Some(sig) = sh.trust.sign(kind, &[service, nats_id, &sh.cfg.name]) {
        m.insert(model::META_SIG.to_owned(), sig.into());
    }
    m
}

fn sync_exports(sh: &Arc<Shared>) {
    let Some(wanted) = wanted_exports(sh) else {
        return;
    };
    let (gone, new, reannounce): (Vec<_>, Vec<_>, bool) = {
        let mut st = sh.state.lock().unwrap();
        let gone: Vec<(String, Exported)> = st
            .exported
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .cloned()
            .collect::<Vec<_>>()
            .into_iter()
            .filter_map(|k| st.exported.remove(&k).map(|e| (k, e)))
            .collect();
        let new = wanted
            .iter()
            .filter(|(k, _)| !st.exported.contains_key(*k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        (gone, new, std::mem::take(&mut st.reannounce))
    };
    for (nats_id, e) in gone {
        e.inbox.abort();
        tracing::info!(instance = %nats_id, service = %e.service, "no longer exported");
        sh.publish(
            model::UNREGISTER_SUBJECT.into(),
            model::encode(&model::ServiceRegistration {
                metadata: announce_metadata(sh, UNREGISTER, &e.service, &nats_id),
                ..registration(sh, &nats_id, &e.service)
            }),
        );
    }
    for (nats_id, (service, local_id)) in new {
        let sub = match sh.wait(
            "subscribing an inbox",
            sh.nats.subscribe(model::inbox(&nats_id)),
        ) {
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                tracing::warn!(instance = %nats_id, "subscribing to its inbox: {e}");
                continue;
            }
            None => continue,
        };
        let task = sh.rt.spawn(serve_subscription(
            sh.clone(),
            sub,
            Target::Inbox {
                service: service.clone(),
                local_id: local_id.clone(),
            },
        ));
        tracing::info!(instance = %nats_id, service = %service, "exported");
        sh.publish(
            model::REGISTER_SUBJECT.into(),
            model::encode(&registration(sh, &nats_id, &service)),
        );
        sh.state.lock().unwrap().exported.insert(
            nats_id,
            Exported {
                service,
                inbox: task,
            },
        );
    }
    if reannounce {
        for (nats_id, service) in sh.exported_list() {
            sh.publish(
                model::REGISTER_SUBJECT.into(),
                model::encode(&registration(sh, &nats_id, &service)),
            );
        }
    }
    // Plain subjects follow the exported services. (The state lock is never held across
    // a wait on the runtime: its workers take the lock too.)
    let services: HashSet<String> = wanted.values().map(|(s, _)| s.clone()).collect();
    let missing: Vec<String> = {
        let mut st = sh.state.lock().unwrap();
        st.plain.retain(|s, task| {
            let keep = services.contains(s);
            if !keep {
                task.abort();
            }
            keep
        });
        services
            .into_iter()
            .filter(|s| !st.plain.contains_key(s))
            .collect()
    };
    for s in missing {
        if s.contains(['*', '>']) {
            tracing::warn!(service = %s, "no plain subject: the name contains a NATS wildcard");
            continue;
        }
        let subject = model::plain_subject(&s, "*");
        match sh.wait(
            "subscribing a plain subject",
            sh.nats.queue_subscribe(subject, QUEUE_GROUP.into()),
        ) {
            Some(Ok(sub)) => {
                let task = sh.rt.spawn(serve_subscription(
                    sh.clone(),
                    sub,
                    Target::Plain { service: s.clone() },
                ));
                sh.state.lock().unwrap().plain.insert(s, task);
            }
            Some(Err(e)) => tracing::warn!(service = %s, "subscribing its plain subject: {e}"),
            None => {}
        }
    }
}

fn heartbeats(sh: &Shared) {
    for (nats_id, service) in sh.exported_list() {
        let metadata = announce_metadata(sh, ANNOUNCE, &service, &nats_id);
        sh.publish(
            model::HEARTBEAT_SUBJECT.into(),
            model::encode(&model::Heartbeat {
                service_name: service,
                instance_id: nats_id,
                timestamp: model::now_iso().into(),
                // The seed's ServiceStatus names.
                status: "ONLINE".into(),
                metadata,
            }),
        );
    }
}

fn expire_remotes(sh: &Shared) {
    let limit = sh.cfg.remote_timeout;
    let mut st = sh.state.lock().unwrap();
    let silent: Vec<String> = st
        .seen
        .iter()
        .filter(|(_, r)| r.last_seen.elapsed() >= limit)
        .map(|(id, _)| id.clone())
        .collect();
    for id in silent {
        tracing::info!(instance = %id, "instance silent past its heartbeat timeout: forgotten");
        forget(&mut st, &id);
    }
    st.directory.retain(|id, r| {
        let fresh = r.last_seen.elapsed() < limit;
        if !fresh {
            tracing::info!(instance = %id, host = %r.host, "remote instance silent: leaves local routing");
        }
        fresh
    });
}

/// Registers stand-ins for the directory's instances and drops the others.
fn sync_proxies(sh: &Arc<Shared>) {
    let online = sh.online.load(Ordering::Acquire);
    let (gone, new): (Vec<Proxy>, Vec<(String, Remote)>) = {
        let mut st = sh.state.lock().unwrap();
        let st = &mut *st;
        let dir = &st.directory;
        let gone_ids: Vec<String> = st
            .proxies
            .keys()
            .filter(|id| !online || !dir.contains_key(*id))
            .cloned()
            .collect();
        let gone = gone_ids
            .iter()
            .filter_map(|id| st.proxies.remove(id))
            .collect();
        let new = if online {
            dir.iter()
                .filter(|(id, _)| !st.proxies.contains_key(*id))
                .map(|(id, r)| (id.clone(), r.clone()))
                .collect()
        } else {
            Vec::new()
        };
        (gone, new)
    };
    for p in gone {
        tracing::info!(instance = %p.inst.id(), service = %p.service, "remote stand-in leaves");
        p.inst.stop_handle().stop();
        for t in p.threads {
            let _ = t.join();
        }
        if let Ok(i) = Arc::try_unwrap(p.inst) {
            let _ = i.unregister();
        }
    }
    let (mut per_host, mut per_service) = {
        let st = sh.state.lock().unwrap();
        let mut h: HashMap<String, usize> = HashMap::new();
        let mut s: HashMap<String, usize> = HashMap::new();
        for (id, p) in &st.proxies {
            if let Some(r) = st.directory.get(id) {
                *h.entry(r.host.clone()).or_default() += 1;
            }
            *s.entry(p.service.clone()).or_default() += 1;
        }
        (h, s)
    };
    for (id, r) in new {
        let (nh, ns) = (
            per_host.entry(r.host.clone()).or_default(),
            per_service.entry(r.service.clone()).or_default(),
        );
        if *nh >= MAX_STANDINS_PER_HOST || *ns >= MAX_STANDINS_PER_SERVICE {
            tracing::debug!(instance = %id, host = %r.host, "no stand-in: the host or the service has its maximum");
            continue;
        }
        *nh += 1;
        *ns += 1;
        let opts = RegisterOptions {
            metadata: vec![
                (REMOTE_METADATA_KEY.to_owned(), r.host.clone()),
                ("nats.instance_id".to_owned(), id.clone()),
            ]
            .into_iter()
            // What the remote instance announced, as text (our keys win).
            .chain(
                r.metadata
                    .iter()
                    .filter(|(k, _)| {
                        k.as_str() != REMOTE_METADATA_KEY && k.as_str() != "nats.instance_id"
                    })
                    .cloned(),
            )
            .take(64)
            .collect(),
            ..Default::default()
        };
        let inst = match sh.bus.register_with(&r.service, &id, opts) {
            Ok(i) => Arc::new(i),
            Err(e) => {
                tracing::warn!(instance = %id, service = %r.service, "cannot stand in for the remote instance: {e}");
                continue;
            }
        };
        let threads = (0..PROXY_THREADS)
            .map(|_| {
                let (sh, inst, id, r) = (sh.clone(), inst.clone(), id.clone(), r.clone());
                std::thread::spawn(move || {
                    let served = inst.serve(|req, out| forward(&sh, &id, &r, req, out));
                    if let Err(e) = served {
                        tracing::warn!(instance = %id, "stand-in stopped serving: {e}");
                    }
                })
            })
            .collect();
        tracing::info!(instance = %id, service = %r.service, host = %r.host, "remote instance stands in locally");
        sh.state.lock().unwrap().proxies.insert(
            id,
            Proxy {
                service: r.service,
                inst,
                threads,
                claimed: HashSet::new(),
            },
        );
    }
}

// ---------------------------------------------------------------------------------------
// Import: the directory.

/// Listens to other hosts' announcements.
pub async fn directory_loop(sh: Arc<Shared>) {
    let subs = futures_util::future::try_join3(
        sh.nats.subscribe(model::REGISTER_SUBJECT),
        sh.nats.subscribe(model::HEARTBEAT_SUBJECT),
        sh.nats.subscribe(model::UNREGISTER_SUBJECT),
    )
    .await;
    let (reg, beat, unreg) = match subs {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("subscribing to announcements: {e}");
            return;
        }
    };
    let mut all = futures_util::stream::select(
        futures_util::stream::select(reg.map(|m| (true, m)), beat.map(|m| (true, m))),
        unreg.map(|m| (false, m)),
    );
    while let Some((alive, msg)) = all.next().await {
        let verdict = heard(&sh, alive, &msg.payload);
        // The seed's registration is request-reply: answer it (success, 409 or 400).
        if let (Some(reply), true) = (
            msg.reply.clone(),
            msg.subject.as_str() == model::REGISTER_SUBJECT,
        ) {
            let body = model::encode(&verdict);
            if let Err(e) = sh.nats.publish(reply, body.into()).await {
                tracing::debug!("answering a registration: {e}");
            }
        }
    }
}

/// What an announcement did, as the answer to a registration request.
fn heard(sh: &Shared, alive: bool, payload: &[u8]) -> model::RegistrationReply {
    // Registrations and heartbeats share the fields that matter here.
    let (service, id, meta) = match model::decode::<model::ServiceRegistration>(payload) {
        Ok(r) => (r.service_name, r.instance_id, r.metadata),
        Err(e) => {
            tracing::debug!("ignoring an announcement: {e}");
            return model::RegistrationReply::refused(
                400,
                format!("invalid registration: {e}"),
                "",
                "",
            );
        }
    };
    if alive && !service.is_empty() {
        sh.state
            .lock()
            .unwrap()
            .announced
            .insert(service.clone(), Instant::now());
    }
    if service.is_empty() || id.is_empty() {
        return model::RegistrationReply::refused(
            400,
            "service_name and instance_id must not be empty".into(),
            &service,
            &id,
        );
    }
    // An id this bridge announces for a local instance is ours: another announcement of it
    // is a conflict, never a stand-in.
    if sh.exported_list().iter().any(|(nats_id, _)| *nats_id == id) {
        return model::RegistrationReply::refused(
            409,
            format!("instance {id} is registered on host {}", sh.cfg.name),
            &service,
            &id,
        );
    }
    let host = meta
        .get(model::META_HOST)
        .and_then(|v| v.as_str())
        .unwrap_or("nats")
        .to_owned();
    // Ids ending in "@" and this host's name are the ones this bridge exports: from
    // another host, a conflict whether or not it has exported that one yet (a bridge just
    // started has not looked at the bus yet; before, such an id got a stand-in).
    if host != sh.cfg.name && id.ends_with(&format!("@{}", sh.cfg.name)) {
        return model::RegistrationReply::refused(
            409,
            format!(
                "instance ids ending in @{0} are host {0}'s, and {id} is not one of its instances",
                sh.cfg.name
            ),
            &service,
            &id,
        );
    }
    if host == sh.cfg.name {
        // Our own announcements come back to us; anyone else's naming this host is a lie.
        return if alive
            && id.ends_with(&format!("@{host}"))
            && !sh.exported_list().iter().any(|(n, _)| *n == id)
        {
            model::RegistrationReply::refused(
                409,
                format!("host {host} has no instance {id}"),
                &service,
                &id,
            )
        } else {
            model::RegistrationReply::ok(&service, &id)
        };
    }
    let aegis = meta.get(model::META_BRIDGE).and_then(|v| v.as_str()) == Some("aegis-bridge");
    if !sh.imports(&service) {
        // Only remembered (for `ipc.resource.*`), never stood in for.
        let mut st = sh.state.lock().unwrap();
        if let Some(existing) = st
            .seen
            .get(&id)
            .filter(|e| alive && (e.host != host || e.service != service))
        {
            return registered_elsewhere(existing, &service, &id);
        }
        if alive {
            let r = Remote {
                service: service.clone(),
                host,
                metadata: Vec::new(),
                last_seen: Instant::now(),
                aegis,
            };
            remember_in(&mut st, &id, &r);
        } else {
            forget(&mut st, &id);
        }
        return model::RegistrationReply::ok(&service, &id);
    }
    // With trusted hosts: a trusted host's announcement must carry its signature and name
    // one of its own instances; others only if unsigned ones are accepted.
    if sh.trust.checking() {
        let sig = meta
            .get(model::META_SIG)
            .and_then(|v| v.as_str())
            .unwrap_or("");
        let kind = if alive { ANNOUNCE } else { UNREGISTER };
        let trusted_host = sh.cfg.trusted_hosts.contains_key(&host);
        let believed = if trusted_host {
            id.ends_with(&format!("@{host}"))
                && sh.trust.verify(&host, kind, &[&service, &id, &host], sig)
        } else {
            sh.trust.accept_unsigned && sig.is_empty()
        };
        if !believed {
            tracing::debug!(instance = %id, host = %host, "ignoring an announcement not signed by a trusted host");
            return model::RegistrationReply::refused(
                403,
                format!("announcement of {id} is not signed by a trusted host"),
                &service,
                &id,
            );
        }
    }
    let mut st = sh.state.lock().unwrap();
    if let Some(existing) = st
        .directory
        .get(&id)
        .filter(|e| alive && (e.host != host || e.service != service))
    {
        return registered_elsewhere(existing, &service, &id);
    }
    let changed = if alive {
        let r = Remote {
            service: service.clone(),
            host,
            metadata: metadata_text(&meta),
            last_seen: Instant::now(),
            aegis,
        };
        remember_in(&mut st, &id, &r);
        st.directory.insert(id.clone(), r).is_none()
    } else {
        forget(&mut st, &id);
        st.directory.remove(&id).is_some()
    };
    drop(st);
    if changed {
        sh.poke();
    }
    model::RegistrationReply::ok(&service, &id)
}

/// The 409 for an announcement of an id known for another service or host.
fn registered_elsewhere(existing: &Remote, service: &str, id: &str) -> model::RegistrationReply {
    model::RegistrationReply::refused(
        409,
        format!(
            "instance {id} is registered for service {} on host {}",
            existing.service, existing.host
        ),
        service,
        id,
    )
}

/// Announced metadata as text (bounded: long keys and values are left out).
fn metadata_text(meta: &std::collections::BTreeMap<String, rmpv::Value>) -> Vec<(String, String)> {
    meta.iter()
        .filter(|(k, v)| k.len() <= 256 && v.to_string().len() <= 4096)
        .map(|(k, v)| {
            let text = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
            (k.clone(), text)
        })
        .collect()
}

/// An instance unregistered: an AegisIPC one's resource ids are to be released.
fn forget(st: &mut State, id: &str) {
    if let Some(r) = st.seen.remove(id) {
        if !r.aegis {
            st.departed.push(id.to_owned());
        }
    }
}

/// Records an announced instance in [`State::seen`] (without its metadata), within
/// [`MAX_SEEN`].
fn remember_in(st: &mut State, id: &str, r: &Remote) {
    if st.seen.len() < MAX_SEEN || st.seen.contains_key(id) {
        let mut r = r.clone();
        r.metadata = Vec::new();
        st.seen.insert(id.to_owned(), r);
    }
}

// ---------------------------------------------------------------------------------------
// Serving requests that arrive on NATS.

#[derive(Clone)]
enum Target {
    /// `ipc.route.request`: any service, by name or resource.
    Route,
    /// One exported instance's inbox.
    Inbox { service: String, local_id: String },
    /// `aegis.call.{service}.{method}`: raw bytes.
    Plain { service: String },
}

/// Serves a subscription: each request on a blocking thread (bus calls block).
async fn serve_subscription(sh: Arc<Shared>, mut sub: async_nats::Subscriber, target: Target) {
    while let Some(msg) = sub.next().await {
        let (sh, target) = (sh.clone(), target.clone());
        tokio::task::spawn_blocking(move || answer(&sh, &target, msg));
    }
}

/// The plain subject of a service no host serves: every bridge listens on
/// `aegis.call.*.*` in a queue group of its own, so one of them hears each plain request,
/// and answers 503 when neither this bridge nor any announcement it heard knows the
/// service (the bridge that exports it answers otherwise, as before). Without this such a
/// request got NATS's "no responders".
pub async fn plain_fallback_loop(sh: Arc<Shared>) {
    use futures_util::StreamExt;
    let mut sub = match sh
        .nats
        .queue_subscribe(model::plain_subject("*", "*"), PLAIN_FALLBACK_GROUP.into())
        .await
    {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("subscribing to the plain subjects' fallback: {e}");
            return;
        }
    };
    while let Some(msg) = sub.next().await {
        let Some(reply) = msg.reply.clone() else {
            continue;
        };
        let mut parts = msg.subject.as_str().split('.');
        let service = parts.nth(2).unwrap_or("").to_owned();
        let known = {
            let st = sh.state.lock().unwrap();
            st.plain.contains_key(&service)
                || st
                    .announced
                    .get(&service)
                    .is_some_and(|t| t.elapsed() < sh.cfg.remote_timeout)
        };
        if known {
            continue;
        }
        let text = format!("no instance of service '{service}' on any host");
        let h = error_headers(503, "NoAvailableInstanceError", &text);
        if let Err(e) = sh.nats.publish_with_headers(reply, h, text.into()).await {
            tracing::debug!("answering an unknown plain subject: {e}");
        }
    }
}

/// The queue group of [`plain_fallback_loop`] (not the bridges' own: both groups hear a
/// request, the exporter's answers it).
const PLAIN_FALLBACK_GROUP: &str = "aegis-bridge-unknown";

pub async fn route_loop(sh: Arc<Shared>) {
    match sh
        .nats
        .queue_subscribe(model::ROUTE_SUBJECT, QUEUE_GROUP.into())
        .await
    {
        Ok(sub) => serve_subscription(sh, sub, Target::Route).await,
        Err(e) => tracing::error!("subscribing to {}: {e}", model::ROUTE_SUBJECT),
    }
}

fn header<'a>(msg: &'a async_nats::Message, name: &str) -> Option<&'a str> {
    msg.headers.as_ref()?.get(name).map(|v| v.as_str())
}

fn answer(sh: &Shared, target: &Target, msg: async_nats::Message) {
    let Some(reply) = msg.reply.clone() else {
        tracing::debug!(subject = %msg.subject, "a request without a reply subject: nothing to answer");
        return;
    };
    let raw_method = match target {
        Target::Plain { .. } => msg.subject.rsplit('.').next().map(str::to_owned),
        _ => header(&msg, H_METHOD).map(str::to_owned),
    };
    // A raw caller reads errors from headers; a model caller from the model.
    let raw = raw_method.is_some();
    // The instance that answered a model call: named also when its reply cannot be sent.
    let mut answered_by = None;
    let (payload, headers) = match raw_method {
        Some(method) => raw_call(sh, target, &msg, &method),
        None => {
            let resp = model_call(sh, target, &msg.payload);
            answered_by.clone_from(&resp.instance_id);
            (model::encode(&resp), None)
        }
    };
    let max = sh.nats.server_info().max_payload;
    let (payload, headers) = if payload.len() > max {
        let text = format!(
            "reply of {} bytes is over NATS's max payload of {max}",
            payload.len()
        );
        if raw {
            let h = error_headers(413, "MessageTooLarge", &text);
            (text.into_bytes(), Some(h))
        } else {
            let trace = model::decode::<RouteRequest>(&msg.payload)
                .map(|r| r.trace_id)
                .unwrap_or_default();
            let resp = RouteResponse {
                instance_id: answered_by,
                ..error_response(413, "MessageTooLargeError", text, &trace)
            };
            (model::encode(&resp), None)
        }
    } else {
        (payload, headers)
    };
    let sent = match headers {
        Some(h) => sh
            .rt
            .block_on(sh.nats.publish_with_headers(reply, h, payload.into())),
        None => sh.rt.block_on(sh.nats.publish(reply, payload.into())),
    };
    if let Err(e) = sent {
        tracing::debug!("answering: {e}");
    }
}

fn error_headers(code: u16, kind: &str, message: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(H_ERROR_CODE, code.to_string().as_str());
    h.insert(H_ERROR_TYPE, kind);
    // The NATS services convention, for generic clients.
    h.insert("Nats-Service-Error-Code", code.to_string().as_str());
    h.insert(
        "Nats-Service-Error",
        message.replace(['\r', '\n'], " ").as_str(),
    );
    h
}

/// Options for a call that came from NATS to `target`.
fn options(sh: &Shared, target: &Target, timeout: Duration, trace: Option<u64>) -> CallOptions {
    let mut o = CallOptions {
        timeout,
        attempt_timeout: timeout.min(CallOptions::default().attempt_timeout),
        trace_id: trace,
        ..Default::default()
    };
    if let Target::Inbox { service, local_id } = target {
        // This instance, or another local one: never back out through a stand-in.
        o.selection = Selection::Preferred(local_id.clone());
        o.exclude = sh.proxy_ids(service);
    }
    if let Target::Plain { service } = target {
        o.exclude = sh.proxy_ids(service);
    }
    o
}

/// A call in raw form (bridge to bridge, or a plain subject): bytes in, bytes out, errors
/// in headers.
fn raw_call(
    sh: &Shared,
    target: &Target,
    msg: &async_nats::Message,
    method: &str,
) -> (Vec<u8>, Option<HeaderMap>) {
    let timeout = header(msg, H_TIMEOUT_MS)
        .and_then(|v| v.parse().ok())
        .map_or(REMOTE_TIMEOUT, Duration::from_millis);
    let trace = header(msg, H_TRACE).and_then(|t| u64::from_str_radix(t, 16).ok());
    let mut opts = options(sh, target, timeout, trace);
    opts.trace = header(msg, H_TRACEPARENT).and_then(aegis_client::TraceContext::parse);
    opts.hops = header(msg, H_HOPS)
        .and_then(|h| h.parse().ok())
        .unwrap_or(0);
    let service = match target {
        Target::Inbox { service, .. } | Target::Plain { service } => service.as_str(),
        Target::Route => "",
    };
    match sh.bus.call(service, method, &msg.payload, &opts) {
        Ok(r) => (r.payload, None),
        Err(e) => {
            let text = e.to_string();
            (
                text.clone().into_bytes(),
                Some(error_headers(e.code(), e.kind(), &text)),
            )
        }
    }
}

fn error_response(code: u16, kind: &str, message: String, trace: &str) -> RouteResponse {
    RouteResponse {
        success: false,
        result: None,
        error: Some(model::ErrorInfo {
            code,
            kind: kind.to_owned(),
            message,
        }),
        instance_id: None,
        trace_id: trace.to_owned(),
        duration_ms: 0.0,
    }
}

/// A call in the AegisIPC model: `RouteRequest` in, `RouteResponse` out.
fn model_call(sh: &Shared, target: &Target, body: &[u8]) -> RouteResponse {
    let t0 = Instant::now();
    let req: RouteRequest = match model::decode(body) {
        Ok(r) => r,
        Err(e) => return error_response(400, "SerializationError", e, ""),
    };
    if !(req.timeout.is_finite() && req.timeout > 0.0) {
        return error_response(
            400,
            "SerializationError",
            format!(
                "timeout {} is not a positive number of seconds",
                req.timeout
            ),
            &req.trace_id,
        );
    }
    let mut opts = options(
        sh,
        target,
        Duration::from_secs_f64(req.timeout.min(3600.0)),
        model::trace_to_u64(&req.trace_id),
    );
    // Excluded ids in the form this bridge announces (`id@host`) name local instances too.
    let here = format!("@{}", sh.cfg.name);
    for x in &req.excluded_instances {
        opts.exclude.push(x.clone());
        if let Some(local) = x.strip_suffix(&here) {
            opts.exclude.push(local.to_owned());
        }
    }
    let payload = model::params_to_payload(&req.params);
    let r = match &req.resource_id {
        Some(rid) => sh.bus.call_resource(rid, &req.method, &payload, &opts),
        None => sh.bus.call(&req.service_name, &req.method, &payload, &opts),
    };
    let duration_ms = t0.elapsed().as_secs_f64() * 1e3;
    match r {
        Ok(reply) => RouteResponse {
            success: true,
            result: Some(model::reply_to_result(&reply.payload)),
            error: None,
            instance_id: Some(local_to_nats(sh, &reply.instance_id)),
            trace_id: req.trace_id,
            duration_ms,
        },
        Err(e) => RouteResponse {
            duration_ms,
            // The instance that answered with an error, or the last one tried.
            instance_id: error_instance(&e).map(|i| local_to_nats(sh, &i)),
            ..error_response(
                e.code(),
                model::seed_error_type(&e),
                e.to_string(),
                &req.trace_id,
            )
        },
    }
}

/// The instance an error names: the one that answered it, or the last one tried.
fn error_instance(e: &aegis_client::Error) -> Option<String> {
    match e {
        aegis_client::Error::Remote { instance, .. } => Some(instance.clone()),
        aegis_client::Error::Timeout { attempts, .. } => {
            attempts.last().map(|a| a.instance.clone())
        }
        _ => None,
    }
}

/// A local instance id as NATS knows it (stand-ins already carry the remote id).
fn local_to_nats(sh: &Shared, id: &str) -> String {
    if sh.state.lock().unwrap().proxies.contains_key(id) {
        id.to_owned()
    } else {
        sh.nats_id(id)
    }
}

// ---------------------------------------------------------------------------------------
// Stand-ins forwarding local calls to remote instances.

fn forward(
    sh: &Shared,
    remote_id: &str,
    r: &Remote,
    req: &aegis_client::Request<'_>,
    out: &mut Vec<u8>,
) -> Result<(), ServiceError> {
    let subject = model::inbox(remote_id);
    let trace = format!("{:x}", req.trace_id());
    // The remote instance gets what is left of our caller's deadline (5 s when the caller
    // gave none); past it, nobody waits for the answer.
    let timeout = match req.deadline() {
        None => REMOTE_TIMEOUT,
        Some(d) => d.saturating_duration_since(std::time::Instant::now()),
    };
    if timeout.is_zero() {
        return Err(ServiceError::new(
            504,
            format!("remote instance {remote_id}: the caller's deadline passed before forwarding"),
        ));
    }
    let request = if r.aegis {
        let mut h = HeaderMap::new();
        h.insert(H_METHOD, req.method());
        h.insert(H_TRACE, trace.as_str());
        h.insert(H_TRACEPARENT, req.traceparent().as_str());
        h.insert(H_HOPS, (req.hops() + 1).to_string().as_str());
        h.insert(
            H_TIMEOUT_MS,
            timeout.as_millis().max(1).to_string().as_str(),
        );
        async_nats::Request::new()
            .headers(h)
            .payload(Bytes::copy_from_slice(req.payload()))
    } else {
        let body = model::encode(&RouteRequest {
            service_name: r.service.clone(),
            method: req.method().to_owned(),
            params: model::payload_to_params(req.payload()),
            timeout: timeout.as_secs_f64(),
            trace_id: trace,
            resource_id: None,
            excluded_instances: Vec::new(),
        });
        async_nats::Request::new().payload(body.into())
    };
    let lost = || {
        ServiceError::new(
            503,
            format!("remote instance {remote_id}: the NATS connection is down"),
        )
    };
    let dropped = sh.lost.notified();
    if !sh.online.load(Ordering::Acquire) {
        return Err(lost());
    }
    let asked = sh.rt.block_on(async {
        tokio::select! {
            r = sh.nats.send_request(subject, request.timeout(Some(timeout))) => Some(r),
            _ = dropped => None,
        }
    });
    let msg = asked.ok_or_else(lost)?.map_err(|e| {
        use async_nats::client::RequestErrorKind as K;
        let (code, what) = match e.kind() {
            K::NoResponders => (503, "no one answers for it on NATS"),
            K::TimedOut => (504, "no answer over NATS in time"),
            K::Other => (502, "NATS request failed"),
        };
        ServiceError::new(code, format!("remote instance {remote_id}: {what}: {e}"))
    })?;
    if r.aegis {
        if let Some(code) = header(&msg, H_ERROR_CODE).and_then(|c| c.parse().ok()) {
            return Err(ServiceError::new(
                code,
                String::from_utf8_lossy(&msg.payload).into_owned(),
            ));
        }
        out.extend_from_slice(&msg.payload);
        return Ok(());
    }
    let resp: RouteResponse = model::decode(&msg.payload).map_err(|e| {
        ServiceError::new(502, format!("remote instance {remote_id} answered: {e}"))
    })?;
    if resp.success {
        out.extend(model::result_to_reply(
            resp.result.as_ref().unwrap_or(&rmpv::Value::Nil),
        ));
        Ok(())
    } else {
        let e = resp.error.unwrap_or(model::ErrorInfo {
            code: 500,
            kind: "Internal".into(),
            message: "failed without an error".into(),
        });
        Err(ServiceError::new(e.code, e.message))
    }
}
