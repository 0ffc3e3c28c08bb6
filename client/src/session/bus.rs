//! `Bus`: a process's connection to the bus — the session of the current broker run and
//! routing over its registry (selection), the segments mapped so far, the queries answered
//! by the broker (services, health, resources), and the bridge over a broker restart.
//! The call path itself is [`crate::call`].
//!
//! The broker is asked only once per service (to hand over its instances' segments) and,
//! on the instance side, once per batch of new callers.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicPtr;
use std::sync::atomic::{AtomicU64 as StdAtomicU64, AtomicUsize};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock};

use crate::channel::wait::Spin;
use crate::error::{Error, Result};
use crate::names;
use crate::session::control::{expect_fds, ControlConn};
use crate::session::pool::MailboxPool;
use crate::session::proto::{
    BulkOptions, BulkReport, Request, ResourcePage, ResourceQuery, Response, ServiceInfo,
};
use crate::shm::layout::{
    self, CallerSeg, ClientSeg, InstanceSeg, RegistryView, ServiceEntry, SharedView, Status,
    MAX_MEMBERS,
};
use crate::shm::sync::Ordering;

/// How a process joins the bus.
#[derive(Debug, Clone)]
pub struct BusOptions {
    /// Bus directory; `None` resolves it like the broker does (`AEGIS_IPC_DIR`, …).
    pub dir: Option<PathBuf>,
    /// Reply mailboxes, i.e. calls this connection can have in flight at once.
    pub mailboxes: u32,
    /// How a waiting caller spends the time before it sleeps ([`Spin::Adaptive`] unless
    /// this process's threads have cores of their own).
    pub spin: Spin,
    /// Uids besides our own and root whose broker we trust (the broker's uid is checked
    /// with `SO_PEERCRED` on every connect); `AEGIS_IPC_BROKER_UID` (comma-separated) adds
    /// to these. A broker running as anyone else is refused: it would be handed our
    /// requests and could give us anyone's memory as a "segment".
    pub broker_uids: Vec<u32>,
    /// This connection's per-service circuit breaker (see [`crate::session::breaker`]): by default
    /// 5 timed-out calls in a row open it for 30 s.
    pub circuit_breaker: crate::CircuitBreaker,
}

impl Default for BusOptions {
    fn default() -> Self {
        BusOptions {
            dir: None,
            mailboxes: layout::DEFAULT_MAILBOXES,
            spin: Spin::Adaptive,
            broker_uids: Vec::new(),
            circuit_breaker: Default::default(),
        }
    }
}

/// How a call picks among a service's healthy instances.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Selection {
    /// The next instance after the last one any process used (a shared counter).
    #[default]
    RoundRobin,
    Random,
    /// This instance id while it is `Online`; round-robin otherwise.
    Preferred(String),
}

/// Which instance answered a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallInfo {
    /// Registry index of the instance.
    pub instance: u32,
    pub incarnation: u64,
}

/// The owner of a resource as the registry shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceOwner {
    pub instance: CallInfo,
    pub instance_id: String,
    pub service: String,
    pub status: Status,
}

/// A connection to the bus. Cheap to clone; share it between threads.
#[derive(Clone)]
pub struct Bus {
    pub(crate) inner: Arc<BusInner>,
}

/// What one broker run handed out: its registry and shared segment. Replaced when the
/// broker restarts; the old one stays mapped until the `Bus` drops, because calls in
/// flight may still be reading it.
pub(crate) struct Session {
    pub registry: RegistryView,
    pub shared: SharedView,
    pub epoch: u64,
    /// The broker's default maximum message.
    pub max_message: u64,
    /// Our breakers and failure counters, by this run's service indices (only we and the
    /// broker map it).
    pub stats: CallerSeg,
    /// This connection's round-robin counters, by service index (process memory, from a
    /// random start). They were the bus's, in the shared segment, until stop 38: every
    /// caller's call then moved the one cache line between the callers' cores (a locked
    /// instruction on a line another core wrote last), and any member could steer
    /// everyone's picks by writing it. Each caller still spreads its own calls evenly.
    pub round_robin: Box<[std::sync::atomic::AtomicU64]>,
}

impl Session {
    /// Opens what a broker's `Welcome` hands over: the session, this client's (index, gen),
    /// and the descriptors (registry, shared, client segment; the caller segment, last, is
    /// opened into the session).
    pub(crate) fn from_welcome(
        resp: Response,
        fds: Vec<OwnedFd>,
    ) -> Result<(Session, u32, u32, Vec<OwnedFd>)> {
        let Response::Welcome {
            bus_epoch,
            client,
            gen,
            max_services,
            max_message,
            ..
        } = resp
        else {
            return Err(Error::Protocol(format!("expected Welcome, got {resp:?}")));
        };
        let mut fds = expect_fds(fds, 4, "Welcome")?;
        let stats = CallerSeg::open(&fds.pop().expect("four descriptors"), bus_epoch)?;
        let registry = RegistryView::open(&fds[0], false)?;
        if registry.epoch != bus_epoch || registry.layout.max_services != max_services {
            return Err(Error::Protocol(
                "registry does not match the broker's Welcome".into(),
            ));
        }
        let shared = SharedView::open(&fds[1], max_services)?;
        let start = random_u64();
        let round_robin = (0..max_services as u64)
            .map(|i| std::sync::atomic::AtomicU64::new(start.wrapping_add(i)))
            .collect();
        Ok((
            Session {
                registry,
                shared,
                epoch: bus_epoch,
                max_message,
                stats,
                round_robin,
            },
            client,
            gen,
            fds,
        ))
    }

    /// Finds a service entry by name (open addressing; entries are never removed).
    pub fn find_service(&self, name: &str) -> Option<(u32, &ServiceEntry)> {
        let cap = self.registry.layout.max_services;
        let mut i = (layout::name_hash(name) as u32) & (cap - 1);
        for _ in 0..cap {
            let e = self.registry.service(i)?;
            // SYNC POINT: Acquire pairs with the broker's Release store of `in_use`.
            if e.in_use.load(Ordering::Acquire) == 0 {
                return None;
            }
            if e.seq.read(|| e.name.eq_str(name)) {
                return Some((i, e));
            }
            i = (i + 1) & (cap - 1);
        }
        None
    }

    /// Picks an `Online` member of the service that `skip` does not rule out.
    pub(crate) fn pick(
        &self,
        svc_idx: u32,
        svc: &ServiceEntry,
        selection: &Selection,
        skip: impl Fn(u32) -> bool,
    ) -> Option<CallInfo> {
        // The member if routable, and whether it stands in for a remote instance.
        let online = |m: u32| -> Option<(CallInfo, bool)> {
            let e = self.registry.instance(m)?;
            let (status, service, inc, flags) = e.seq.read(|| {
                (
                    e.status.load(Ordering::Relaxed),
                    e.service.load(Ordering::Relaxed),
                    e.incarnation.load(Ordering::Relaxed),
                    e.flags.load(Ordering::Relaxed),
                )
            });
            (status == Status::Online as u32 && service == svc_idx && inc != 0 && !skip(m))
                .then_some((
                    CallInfo {
                        instance: m,
                        incarnation: inc,
                    },
                    flags & layout::INSTANCE_REMOTE != 0,
                ))
        };
        let member = |k: u64| {
            svc.seq.read(|| {
                let n = (svc.member_count.load(Ordering::Relaxed) as u64).min(MAX_MEMBERS as u64);
                (n > 0).then(|| svc.members[(k % n) as usize].load(Ordering::Relaxed))
            })
        };
        let n = svc.seq.read(|| svc.member_count.load(Ordering::Relaxed)) as u64;
        let n = n.min(MAX_MEMBERS as u64);
        if let Selection::Preferred(id) = selection {
            for k in 0..n {
                if let Some((c, _)) = member(k)
                    .filter(|&m| self.instance_name(m) == *id)
                    .and_then(online)
                {
                    return Some(c);
                }
            }
        }
        let c = match selection {
            Selection::Random => random_u64(),
            // A load and a store, not an RMW (a locked instruction on every call's path):
            // the counter only spreads load, so two threads of this connection that race
            // here and pick the same member once cost nothing; one thread's calls still go
            // round exactly. Relaxed: no data is published through it.
            _ => {
                let rr = self.round_robin.get(svc_idx as usize)?;
                let c = rr.load(std::sync::atomic::Ordering::Relaxed);
                rr.store(c.wrapping_add(1), std::sync::atomic::Ordering::Relaxed);
                c
            }
        };
        // Local instances always win: a remote stand-in is taken only when none is
        // routable (one pass; the first candidate is the answer in the usual case).
        let mut remote = None;
        for k in 0..n {
            match member(c.wrapping_add(k)).and_then(online) {
                Some((c, false)) => return Some(c),
                Some((c, true)) => remote = remote.or(Some(c)),
                None => {}
            }
        }
        remote
    }

    /// The slot size and count of the service instance `index` (incarnation `incarnation`)
    /// belongs to, as this registry (sealed, broker-written) states them; `None` when the
    /// registry does not show that incarnation there.
    pub(crate) fn sizing_of(&self, index: u32, incarnation: u64) -> Option<(u32, u32)> {
        let e = self.registry.instance(index)?;
        let (svc, inc) = e.seq.read(|| {
            (
                e.service.load(Ordering::Relaxed),
                e.incarnation.load(Ordering::Relaxed),
            )
        });
        if inc != incarnation {
            return None;
        }
        let s = self.registry.service(svc)?;
        Some(s.seq.read(|| {
            (
                s.slot_size.load(Ordering::Relaxed),
                s.slot_count.load(Ordering::Relaxed),
            )
        }))
    }

    pub fn instance_name(&self, index: u32) -> String {
        self.registry
            .instance(index)
            .map(|e| {
                let (b, l) = e.seq.read(|| e.id.load());
                String::from_utf8_lossy(&b[..l]).into_owned()
            })
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| format!("#{index}"))
    }

    /// The name of the service instance `index` belongs to (for messages).
    pub(crate) fn service_of(&self, index: u32) -> String {
        let name = self.registry.instance(index).and_then(|e| {
            let svc = e.seq.read(|| e.service.load(Ordering::Relaxed));
            let s = self.registry.service(svc)?;
            let (b, l) = s.seq.read(|| s.name.load());
            Some(String::from_utf8_lossy(&b[..l]).into_owned())
        });
        name.unwrap_or_else(|| format!("(service of instance #{index})"))
    }

    /// Whether the service has a member routing could use now.
    fn routable(&self, service: &str) -> bool {
        self.find_service(service)
            .is_some_and(|(i, e)| self.pick_read_only(i, e))
    }

    fn pick_read_only(&self, svc_idx: u32, svc: &ServiceEntry) -> bool {
        self.any_online(svc_idx, svc, |_| false)
    }

    /// Whether the service has an `Online` member that `skip` does not rule out (read only:
    /// the round-robin counter does not move).
    pub(crate) fn any_online(
        &self,
        svc_idx: u32,
        svc: &ServiceEntry,
        skip: impl Fn(u32) -> bool,
    ) -> bool {
        let n =
            (svc.seq.read(|| svc.member_count.load(Ordering::Relaxed)) as usize).min(MAX_MEMBERS);
        (0..n).any(|k| {
            let m = svc.seq.read(|| svc.members[k].load(Ordering::Relaxed));
            !skip(m)
                && self.registry.instance(m).is_some_and(|e| {
                    e.seq.read(|| {
                        e.status.load(Ordering::Relaxed) == Status::Online as u32
                            && e.service.load(Ordering::Relaxed) == svc_idx
                    })
                })
        })
    }
}

/// Mapped segments by registry or client index. The indices are small integers handed
/// out by the broker: SipHash (the default, built against hash flooding by whoever chooses
/// the keys) cost more than the rest of a lookup on the call path; one multiply spreads
/// them as well.
pub(crate) type IndexMap<V> = HashMap<u32, V, std::hash::BuildHasherDefault<IndexHasher>>;

#[derive(Default)]
pub(crate) struct IndexHasher(u64);

impl std::hash::Hasher for IndexHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = (n as u64 | 1 << 32).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

pub(crate) struct BusInner {
    pub dir: PathBuf,
    pub(crate) control: Mutex<ControlConn>,
    /// The current session (a leaked `Box`, see [`Session`]); swapped on reconnect.
    pub(crate) session: AtomicPtr<Session>,
    /// Sessions of earlier broker runs (calls in flight may still read them).
    pub(crate) old_sessions: Mutex<Vec<RetiredSession>>,
    /// The session before the last reconnect, and when that was (see `routing_session`).
    pub(crate) previous: AtomicPtr<Session>,
    pub(crate) reconnected_at: Mutex<Option<Instant>>,
    /// Our async doorbell: the same memfd across broker restarts.
    pub client: ClientSeg,
    pub client_fd: OwnedFd,
    /// `index | gen << 32` as the current broker knows this client.
    pub(crate) client_ident: StdAtomicU64,
    /// This connection's secret (see `Request::Hello`), carried by every request.
    pub(crate) secret: u64,
    /// Keys the per-call nonces (`MsgHeader::nonce`): a counter plus this random key,
    /// mixed (see `BusInner::next_nonce`).
    pub(crate) nonce_key: u64,
    pub(crate) nonce_seq: StdAtomicU64,
    /// Instances registered through this connection (re-registered after a broker restart).
    pub(crate) registered: Mutex<Vec<Weak<dyn Registration>>>,
    /// Written on drop to stop the supervisor thread.
    pub(crate) stop_fd: OwnedFd,
    pub(crate) pool: MailboxPool,
    /// Held while a channel's request heap is made (`ensure_heap`), so two threads never
    /// make two for one channel.
    pub(crate) heap_maker: Mutex<()>,
    /// Held through a whole `fetch_channels` (the request and applying its answer): the
    /// broker tells a connection's news once, so a serving thread that asks while another
    /// is still applying what it was told must wait for that, or it would find a new
    /// channel's request heap missing and refuse a large request as malformed.
    pub(crate) channel_fetch: Mutex<()>,
    /// Caller side: mapped instance segments by registry index.
    pub(crate) instances: RwLock<IndexMap<Arc<InstanceSeg>>>,
    /// Bumped (and `control_changed` notified) each time a reconnect after a broker restart
    /// has completed (see `reconnected`).
    pub(crate) control_gen: Mutex<u64>,
    pub(crate) control_changed: Condvar,
    pub opts: BusOptions,
    pub pid: u32,
    /// [`crate::shm::sys::fork_generation`] when connected (see [`BusInner::not_forked`]).
    pub(crate) forks: u64,
    /// The high 64 bits of the W3C trace ids of calls this connection starts (random).
    pub(crate) trace_hi: u64,
    /// Consecutive timeouts per (instance, incarnation), and how many entries (fast check).
    pub(crate) timeouts: Mutex<HashMap<(u32, u64), u32>>,
    pub(crate) timeouts_pending: AtomicUsize,
    /// Instances seen stalled: index -> (incarnation, progress word when seen). Avoided by
    /// routing until the word moves. With its size, for the fast path.
    pub(crate) stalled: Mutex<HashMap<u32, (u64, u64)>>,
    pub(crate) stalled_pending: AtomicUsize,
    /// Futures waiting for replies (feature `async`).
    #[cfg(feature = "async")]
    pub(crate) async_waiters: crate::call::doorbell::AsyncWaiters,
}

/// A registration this connection restores after a broker restart (an instance). Held
/// weakly and through this trait, so the connection does not depend on the instance code.
pub(crate) trait Registration: Send + Sync {
    /// (registry index, incarnation) as the current broker knows it.
    fn ident(&self) -> (u32, u64);
    /// Registers again with a restarted broker, then claims `owned` again (the resources
    /// the old broker's last registry showed it owning).
    fn resume(&self, owned: Vec<String>) -> Result<()>;
    /// Its callers' channels.
    fn channels(&self) -> &crate::serve::sweep::Channels;
    /// Its doorbell (callers ring it; it says whether the serving threads scan).
    fn doorbell(&self) -> crate::channel::ring::Doorbell<'_>;
}

/// Maps the segments of a batched open reply (`(index, identity)` pairs and one descriptor
/// each, from the reply to `request`) and files them in `map` by index; returns the one
/// asked for. Only that one must open (its error is returned); the others are a courtesy,
/// and one already mapped under the same identity is kept as it is (also the one asked
/// for).
fn file_batch<K: Copy + PartialEq + std::fmt::Debug, S>(
    map: &RwLock<IndexMap<Arc<S>>>,
    (ids, fds, request): (Vec<(u32, K)>, Vec<OwnedFd>, &str),
    asked: (u32, K),
    same: impl Fn(&S, K) -> bool,
    open: impl Fn(&[OwnedFd], u32, K) -> std::result::Result<S, layout::LayoutError>,
) -> Result<Arc<S>> {
    // An instance comes as its ring, its own segment and the two sides of our channel.
    let per = if request == "OpenInstance" { 4 } else { 1 };
    let fds = expect_fds(fds, per * ids.len(), request)?;
    let mut found = None;
    let mut map = map.write();
    for ((i, k), fd) in ids.into_iter().zip(fds.chunks(per)) {
        let is_asked = (i, k) == asked;
        // Filed meanwhile (another thread asked too, or it came with another's batch):
        // kept, not mapped again (a channel's request heap can be mapped writable once
        // only: its first mapping sealed it).
        if let Some(s) = map.get(&i).filter(|s| same(s, k)) {
            if is_asked {
                found = Some(s.clone());
            }
            continue;
        }
        let seg = match open(fd, i, k) {
            Ok(s) => Arc::new(s),
            Err(e) if is_asked => return Err(e.into()),
            Err(_) => continue,
        };
        if is_asked {
            found = Some(seg.clone());
        }
        map.insert(i, seg);
    }
    found.ok_or_else(|| {
        Error::Protocol(format!(
            "{request}: the broker did not send the segment asked for, {asked:?}"
        ))
    })
}

/// Wakes this process's threads waiting on `sess`'s registry words (`watch`,
/// `wait_registry_change`), so they move on to the registry that replaced it.
fn wake_registry_waiters(sess: &Session) {
    let reg = &sess.registry;
    let _ = crate::shm::sys::futex_wake(&reg.control().generation, u32::MAX);
    for e in (0..reg.layout.max_services).filter_map(|i| reg.service(i)) {
        let _ = crate::shm::sys::futex_wake(&e.generation, u32::MAX);
    }
}

impl Bus {
    /// The bus directory this connection uses.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The instance owning `resource`, read lock-free from the resource map (allocation-free).
    pub fn lookup_resource(&self, resource: &str) -> Option<CallInfo> {
        let (instance, incarnation) = self.inner.registry().find_resource(resource)?;
        Some(CallInfo {
            instance,
            incarnation,
        })
    }

    /// Who owns `resource` right now (lock-free read of the registry), with names.
    pub fn resource_owner(&self, resource: &str) -> Option<ResourceOwner> {
        let info = self.lookup_resource(resource)?;
        let inner = &*self.inner;
        let e = inner.registry().instance(info.instance)?;
        let (status, svc, inc, (id, id_len)) = e.seq.read(|| {
            (
                e.status.load(Ordering::Relaxed),
                e.service.load(Ordering::Relaxed),
                e.incarnation.load(Ordering::Relaxed),
                e.id.load(),
            )
        });
        if inc != info.incarnation {
            return None;
        }
        let s = inner.registry().service(svc)?;
        let (name, len) = s.seq.read(|| s.name.load());
        Some(ResourceOwner {
            instance: info,
            instance_id: String::from_utf8_lossy(&id[..id_len]).into_owned(),
            service: String::from_utf8_lossy(&name[..len]).into_owned(),
            status: Status::from_u32(status),
        })
    }

    /// Resources matching `query`, with their owners and whether those are healthy.
    pub fn resources(&self, query: &ResourceQuery) -> Result<ResourcePage> {
        match self
            .inner
            .control()
            .request(&Request::QueryResources(query.clone()))?
            .0
        {
            Response::Resources(p) => Ok(p),
            r => Err(Error::Protocol(format!("expected Resources, got {r:?}"))),
        }
    }

    /// Administrator: releases ids whoever owns them.
    pub fn release_resources(&self, ids: &[&str], options: BulkOptions) -> Result<BulkReport> {
        self.inner.release(None, ids, options)
    }

    /// Administrator: moves ids (all or none) to instance `to_instance` of `to_service`.
    pub fn transfer_resources(
        &self,
        ids: &[&str],
        to_service: &str,
        to_instance: &str,
        reason: &str,
    ) -> Result<()> {
        self.inner
            .transfer(ids, None, to_service, to_instance, reason)
    }

    /// How many calls this connection can have in flight at once (its reply mailboxes).
    pub fn mailbox_count(&self) -> u32 {
        self.inner.client.layout.mailboxes
    }

    /// The instance id behind a [`CallInfo`] (its registry index if it has since left).
    pub fn instance_id(&self, info: CallInfo) -> String {
        self.inner.instance_name(info.instance)
    }

    /// All services, with their instances and counters (asks the broker).
    pub fn services(&self) -> Result<Vec<ServiceInfo>> {
        match self.inner.control.lock().request(&Request::ListServices)?.0 {
            Response::Services(s) => Ok(s),
            r => Err(Error::Protocol(format!("expected Services, got {r:?}"))),
        }
    }

    /// One service, with its instances and counters (asks the broker).
    pub fn service(&self, name: &str) -> Result<ServiceInfo> {
        names::service(name)?;
        match self
            .inner
            .control
            .lock()
            .request(&Request::DescribeService { name: name.into() })?
            .0
        {
            Response::Service(s) => Ok(s),
            r => Err(Error::Protocol(format!("expected Service, got {r:?}"))),
        }
    }

    /// Generation of `service`'s membership and health (0 while the service is unknown).
    pub fn service_generation(&self, service: &str) -> u32 {
        self.inner
            .find_service(service)
            .map_or(0, |(_, e)| e.generation.load(Ordering::Acquire))
    }

    /// Sleeps until an instance of `service` joins, leaves or changes health (its
    /// generation moves from `seen`), or `timeout` passes; returns the generation now. A
    /// futex wait on the service's generation word: no polling, no TTL cache.
    pub fn watch(&self, service: &str, seen: u32, timeout: Duration) -> u32 {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.inner.find_service(service) {
                Some((_, e)) => {
                    // SYNC POINT: Acquire pairs with the broker's Release bump in `write_service`.
                    let now = e.generation.load(Ordering::Acquire);
                    if now != seen || left.is_zero() {
                        return now;
                    }
                    let _ = crate::shm::sys::futex_wait(
                        &e.generation,
                        seen,
                        Some(left.min(crate::channel::wait::recheck(WAIT_SLICE))),
                    );
                }
                None => {
                    // Unknown is generation 0: a service seen before and gone since is a
                    // change too.
                    if left.is_zero() || seen != 0 {
                        return 0;
                    }
                    // Not registered yet: wait for any registry change, then look again.
                    let g = self.registry_generation();
                    if self.inner.find_service(service).is_none() {
                        self.wait_registry_change(g, left);
                    }
                }
            }
        }
    }

    /// Instances with their state and recent transitions (asks the broker); departed
    /// instances are listed `Offline` after the live ones.
    pub fn health(
        &self,
        service: Option<&str>,
    ) -> Result<Vec<crate::session::proto::InstanceHealth>> {
        let req = Request::Health {
            service: service.map(str::to_owned),
        };
        match self.inner.control().request(&req)?.0 {
            Response::Health(h) => Ok(h),
            r => Err(Error::Protocol(format!("expected Health, got {r:?}"))),
        }
    }

    /// The registry's change counter (bumped by the broker after every change).
    pub fn registry_generation(&self) -> u32 {
        // SYNC POINT: Acquire pairs with the broker's Release bump in `State::changed`.
        self.inner
            .registry()
            .control()
            .generation
            .load(Ordering::Acquire)
    }

    /// Sleeps until the registry changes from generation `seen` or `timeout` passes;
    /// returns the generation now. A futex wait: no polling, no broker round trip.
    ///
    /// A broker restart counts as a change: the restarted broker's registry replaces the one
    /// waited on.
    pub fn wait_registry_change(&self, seen: u32, timeout: Duration) -> u32 {
        let start: *const Session = self.inner.session();
        let deadline = Instant::now() + timeout;
        loop {
            let sess = self.inner.session();
            let g = &sess.registry.control().generation;
            let now = g.load(Ordering::Acquire);
            let left = deadline.saturating_duration_since(Instant::now());
            if now != seen || left.is_zero() || !std::ptr::eq(sess, start) {
                return now;
            }
            let _ = crate::shm::sys::futex_wait(
                g,
                seen,
                Some(left.min(crate::channel::wait::recheck(WAIT_SLICE))),
            );
        }
    }

    /// Waits (on registry changes, bounded by `timeout`) until `cond` holds; returns whether it did.
    pub fn wait_until(&self, timeout: Duration, mut cond: impl FnMut(&Bus) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.registry_generation();
            if cond(self) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            self.wait_registry_change(seen, left);
        }
    }

    /// Instances of `service` that routing would use right now, read lock-free from the
    /// registry: `(registry index, instance id, status)`.
    pub fn routable_instances(&self, service: &str) -> Vec<(u32, String, Status)> {
        let inner = &*self.inner;
        let Some((_, svc)) = inner.find_service(service) else {
            return Vec::new();
        };
        let members: Vec<u32> = svc.seq.read(|| {
            let n = (svc.member_count.load(Ordering::Relaxed) as usize).min(MAX_MEMBERS);
            svc.members[..n]
                .iter()
                .map(|m| m.load(Ordering::Relaxed))
                .collect()
        });
        members
            .into_iter()
            .filter_map(|m| {
                let e = inner.registry().instance(m)?;
                let (status, (name, len)) = e
                    .seq
                    .read(|| (e.status.load(Ordering::Relaxed), e.id.load()));
                Some((
                    m,
                    String::from_utf8_lossy(&name[..len]).into_owned(),
                    Status::from_u32(status),
                ))
            })
            .collect()
    }
}

/// The longest one futex wait on a registry word lasts. A reconnect wakes those waiting
/// on the previous broker's registry, but a waiter between its check and its sleep misses
/// that wake-up (the old registry is read-only to us, so its words cannot be changed); it
/// then notices the new registry after at most this long.
const WAIT_SLICE: Duration = Duration::from_secs(1);

/// How long after a reconnect a call may still be routed with the previous broker's view.
pub const RESTART_BRIDGE: Duration = Duration::from_secs(5);

/// xorshift64* per thread, seeded from the clock and the thread: random selection only
/// needs spread, not secrecy.
fn random_u64() -> u64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
            let id = &t as *const u64 as u64;
            (t ^ id.rotate_left(32)) | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

impl BusInner {
    pub(crate) fn session(&self) -> &Session {
        // SAFETY: the pointer comes from `Box::into_raw` and its Box is freed only in
        // `Drop for BusInner` (a replaced session moves to `old_sessions`, still alive), so
        // it outlives every `&self`.
        unsafe { &*self.session.load(std::sync::atomic::Ordering::Acquire) }
    }

    pub(crate) fn registry(&self) -> &RegistryView {
        &self.session().registry
    }

    /// The session to route a call to `service` with. Right after a broker restart the
    /// new registry fills up as instances register again; until it has a routable
    /// instance of the service (for at most [`RESTART_BRIDGE`]), the previous broker's last
    /// view is used: those instances were alive when it died, and each call still checks
    /// its target against that view and its deadline.
    pub(crate) fn routing_session(&self, service: &str) -> &Session {
        let cur = self.session();
        let prev = self.previous.load(std::sync::atomic::Ordering::Acquire);
        if prev.is_null() {
            return cur;
        }
        let since = self.reconnected_at.lock().map(|t| t.elapsed());
        if since.is_none_or(|d| d >= RESTART_BRIDGE) {
            // The bridge is over: back to the one-load fast path (unless a newer reconnect
            // has just set up a bridge of its own). Relaxed: nothing is published by null.
            let _ = self.previous.compare_exchange(
                prev,
                std::ptr::null_mut(),
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
            );
            return cur;
        }
        if cur.routable(service) {
            return cur;
        }
        // SAFETY: `previous` points at a retired session, freed only in Drop.
        let prev = unsafe { &*prev };
        if prev.routable(service) {
            prev
        } else {
            cur
        }
    }

    /// Installs the session of a new broker run (after a restart).
    ///
    /// The bridge (`previous`, `reconnected_at`) is set up before the swap, so a call that
    /// sees the new session also sees the previous one to route by.
    pub(crate) fn replace_session(&self, s: Session, client: u32, gen: u32) {
        // Only this (the supervisor's) thread swaps sessions, so the current one is `old`.
        let old = self.session.load(std::sync::atomic::Ordering::Relaxed);
        *self.reconnected_at.lock() = Some(Instant::now());
        // SYNC POINT: Release pairs with the Acquire load in `routing_session`; a reader
        // that sees the new session (below) sees this store too.
        self.previous
            .store(old, std::sync::atomic::Ordering::Release);
        self.client_ident.store(
            client as u64 | (gen as u64) << 32,
            std::sync::atomic::Ordering::Release,
        );
        let new = Box::into_raw(Box::new(s));
        // SYNC POINT: Release pairs with the Acquire load in `session()`.
        self.session
            .store(new, std::sync::atomic::Ordering::Release);
        // Readers may still hold references into `old`: it is retired, freed only on drop.
        // SAFETY: `old` came from `Box::into_raw` and is freed only in `Drop for BusInner`.
        wake_registry_waiters(unsafe { &*old });
        self.old_sessions.lock().push(RetiredSession(old));
    }

    pub(crate) fn client_ident(&self) -> (u32, u32) {
        let v = self.client_ident.load(std::sync::atomic::Ordering::Acquire);
        (v as u32, (v >> 32) as u32)
    }

    pub(crate) fn replace_control(&self, c: ControlConn) {
        *self.control.lock() = c;
    }

    /// The supervisor is done reconnecting: the new control connection is in place and our
    /// instances are registered with the new broker again.
    pub(crate) fn reconnected(&self) {
        *self.control_gen.lock() += 1;
        self.control_changed.notify_all();
    }

    /// Releases `ids` held by `owner` (`None`: any owner, for administrators).
    pub(crate) fn release(
        &self,
        owner: Option<(u32, u64)>,
        ids: &[&str],
        options: BulkOptions,
    ) -> Result<BulkReport> {
        for id in ids {
            names::resource_id(id)?;
        }
        self.bulk(Request::ReleaseResources {
            owner,
            ids: ids.iter().map(|s| s.to_string()).collect(),
            options,
        })
    }

    pub(crate) fn bulk(&self, req: Request) -> Result<BulkReport> {
        match self.control().request(&req)?.0 {
            Response::Bulk(r) => Ok(r),
            r => Err(Error::Protocol(format!("expected Bulk, got {r:?}"))),
        }
    }

    pub(crate) fn transfer(
        &self,
        ids: &[&str],
        from: Option<(u32, u64)>,
        to_service: &str,
        to_instance: &str,
        reason: &str,
    ) -> Result<()> {
        for id in ids {
            names::resource_id(id)?;
        }
        let req = Request::TransferResources {
            ids: ids.iter().map(|s| s.to_string()).collect(),
            from,
            to_service: to_service.into(),
            to_instance: to_instance.into(),
            reason: reason.into(),
        };
        match self.control().request(&req)?.0 {
            Response::Done => Ok(()),
            r => Err(Error::Protocol(format!("expected Done, got {r:?}"))),
        }
    }

    pub fn find_service(&self, name: &str) -> Option<(u32, &ServiceEntry)> {
        self.session().find_service(name)
    }

    pub fn instance_name(&self, index: u32) -> String {
        self.session().instance_name(index)
    }

    /// The mapped segment of instance `index`, asking the broker for it the first time.
    /// While the broker is away (restarting), the ask waits for the reconnect until
    /// `until` (the call's attempt deadline): segments already mapped need no broker, and a
    /// new one is worth waiting for rather than failing the call.
    pub(crate) fn instance_seg(
        &self,
        index: u32,
        incarnation: u64,
        until: Instant,
    ) -> Result<Arc<InstanceSeg>> {
        if let Some(s) = self.instances.read().get(&index) {
            if s.incarnation == incarnation {
                return Ok(s.clone());
            }
        }
        self.ask_broker(until, || {
            let (resp, fds) = self.control.lock().request(&Request::OpenInstance {
                instance: index,
                incarnation,
            })?;
            let Response::OpenedInstances(ids) = resp else {
                return Err(Error::Protocol(format!(
                    "expected OpenedInstances, got {resp:?}"
                )));
            };
            let epoch = self.session().epoch;
            file_batch(
                &self.instances,
                (ids, fds, "OpenInstance"),
                (index, incarnation),
                |seg, inc| seg.incarnation == inc,
                |fds, i, inc| {
                    let sizing = self.session().sizing_of(i, inc);
                    InstanceSeg::open_for_caller(fds, epoch, (i, inc), &self.client.layout, sizing)
                },
            )
        })
    }

    /// Drops our mapping of `seg` (if it is still the one on file): the next call asks the
    /// broker for the instance again.
    pub(crate) fn forget_instance_seg(&self, seg: &Arc<InstanceSeg>) {
        let mut map = self.instances.write();
        if map.get(&seg.index).is_some_and(|s| Arc::ptr_eq(s, seg)) {
            map.remove(&seg.index);
        }
    }

    /// Runs `ask` (one broker request); while it fails with `BrokerUnavailable`, waits for
    /// the supervisor's next reconnect, at most until `until`, and asks again.
    pub(crate) fn ask_broker<T>(
        &self,
        until: Instant,
        mut ask: impl FnMut() -> Result<T>,
    ) -> Result<T> {
        loop {
            let seen = *self.control_gen.lock();
            match ask() {
                Err(e @ Error::BrokerUnavailable { .. }) => {
                    let mut g = self.control_gen.lock();
                    while *g == seen {
                        if self.control_changed.wait_until(&mut g, until).timed_out() {
                            return Err(e);
                        }
                    }
                }
                r => return r,
            }
        }
    }

    /// As [`BusInner::ask_broker`], and while the broker answers `NotOwner` (after a
    /// restart: a previous broker's channel its other party has not claimed or handed
    /// over yet, which comes within moments), asks again after a pause (1 ms, doubling
    /// up to 20 ms), at most until `until`; then the last answer.
    pub(crate) fn ask_broker_until_owned<T>(
        &self,
        until: Instant,
        mut ask: impl FnMut() -> Result<T>,
    ) -> Result<T> {
        let mut pause = Duration::from_millis(1);
        loop {
            match self.ask_broker(until, &mut ask) {
                Err(Error::NotOwner(_)) if Instant::now() + pause <= until => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
                r => return r,
            }
        }
    }

    /// Asks the broker for the new and closed channels of this connection's instances and
    /// files them with their instances (with the callers' segments, where replies go).
    pub(crate) fn fetch_channels(&self) -> Result<()> {
        use crate::serve::sweep::Chan;
        use crate::shm::layout::ChannelSeg;
        let _one_at_a_time = self.channel_fetch.lock();
        loop {
            let (resp, fds) = self.control.lock().request(&Request::Channels)?;
            let Response::Channels {
                channels,
                heaps,
                gone,
                more,
            } = resp
            else {
                return Err(Error::Protocol(format!("expected Channels, got {resp:?}")));
            };
            let fds = expect_fds(fds, 2 * channels.len() + heaps.len(), "Channels")?;
            let (fds, heap_fds) = fds.split_at(2 * channels.len());
            let epoch = self.session().epoch;
            let regs: Vec<Arc<dyn Registration>> = self
                .registered
                .lock()
                .iter()
                .filter_map(Weak::upgrade)
                .collect();
            let mut add: Vec<Vec<Arc<Chan>>> = regs.iter().map(|_| Vec::new()).collect();
            for (info, fds) in channels.iter().zip(fds.chunks(2)) {
                let Some(r) = regs.iter().position(|r| r.ident() == info.instance) else {
                    continue;
                };
                let chan = ChannelSeg::open(
                    &fds[0],
                    &fds[1],
                    epoch,
                    Some(info.instance),
                    layout::Party::Instance,
                )
                .map(Chan::new);
                match chan {
                    Ok(c) => add[r].push(Arc::new(c)),
                    Err(e) => {
                        tracing::warn!(channel = info.id, "a channel could not be mapped: {e}")
                    }
                }
            }
            for (r, add) in regs.iter().zip(add) {
                let up: Vec<Arc<Chan>> = add.clone();
                r.channels().update(add, &gone, epoch, r.doorbell());
                // In the list now: callers may publish.
                for c in up {
                    c.seg.mark_taken_up();
                }
            }
            // Request heaps, of these channels or of ones told before: mapped read-only
            // (and checked sealed against every writer but the caller).
            for (&id, fd) in heaps.iter().zip(heap_fds) {
                let Some(chan) = regs.iter().find_map(|r| r.channels().find(id, epoch)) else {
                    continue;
                };
                if let Err(e) = chan.seg.adopt_heap(fd, layout::HeapSide::Request) {
                    tracing::warn!(channel = id, "a request heap could not be mapped: {e}")
                }
            }
            if !more {
                return Ok(());
            }
        }
    }

    pub(crate) fn control(&self) -> parking_lot::MutexGuard<'_, ControlConn> {
        self.control.lock()
    }
}

/// A session pointer that is no longer current (from `Box::into_raw`), freed in Drop.
pub(crate) struct RetiredSession(*mut Session);
// SAFETY: a Session is Send + Sync (mappings and atomics); the pointer is only read
// through shared references and freed once, in `Drop for BusInner`.
unsafe impl Send for RetiredSession {}

impl BusInner {
    /// `Err(Forked)` in a child of `fork()`: the connection's mailboxes, rings and socket
    /// are the parent's, and using them would race with the parent's own calls.
    #[inline]
    pub(crate) fn not_forked(&self) -> Result<()> {
        if crate::shm::sys::forks_seen() != self.forks {
            return Err(Error::Forked("this connection"));
        }
        Ok(())
    }
}

impl Drop for BusInner {
    fn drop(&mut self) {
        // A fork child's copy shares the parent's stop eventfd: signalling it would stop the
        // parent's supervisor.
        if self.not_forked().is_ok() {
            let _ = crate::shm::sys::eventfd_signal(&self.stop_fd);
        }
        // SAFETY: the last reference to the Bus is going away, so no reader remains; each
        // pointer came from `Box::into_raw` and is freed exactly once here.
        unsafe {
            drop(Box::from_raw(
                self.session.load(std::sync::atomic::Ordering::Acquire),
            ));
            for r in self.old_sessions.get_mut().drain(..) {
                drop(Box::from_raw(r.0));
            }
        }
    }
}
