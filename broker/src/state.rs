//! The broker's state: the authoritative records of services, instances and clients, and
//! the only code that writes the registry segment.
//!
//! Every method runs under one mutex held for microseconds (no I/O but memfd creation),
//! so the registry is written by one thread at a time, as its seqlocks require.

use std::collections::HashMap;
use std::os::fd::OwnedFd;

use aegis_client::error::WireError;
use aegis_client::layout::{
    self, ChannelSeg, ClientLayout, ClientSeg, InstanceLayout, InstanceSeg, Mapping,
    RegistryLayout, RegistryView, SegmentKind, SharedLayout, Status, MAX_MEMBERS,
};
use aegis_client::proto::{
    self, BreakerStates, Heartbeat, InstanceInfo, PreviousChannel, Response, ServiceConfig,
    ServiceInfo,
};
use aegis_client::{names, sys};

use crate::config::BrokerConfig;
use crate::identities::Identities;

pub type ConnId = u64;

/// A caller's unhealthy reports count at most once per this interval.
pub const REPORT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// A registration request.
pub struct Registration<'a> {
    pub service: &'a str,
    pub id: &'a str,
    pub metadata: Vec<(String, String)>,
    pub config: &'a ServiceConfig,
    pub heartbeat: Heartbeat,
    /// After a broker restart: the instance's former (index, incarnation) and its segment,
    /// to adopt rather than create (the ring callers already map stays the same).
    pub adopt: Option<((u32, u64), OwnedFd)>,
    /// The instance's own segment (counters, progress, reply heap), created, mapped and
    /// sealed read-only by the instance before it registers.
    pub own: Option<OwnedFd>,
}

/// The layout of an instance's ring handed over for adoption (a restarted broker taking
/// over the ring the instance had): the slot sizing the instance states in its `Register`
/// (that of the ring it holds) and the reply heap of its own segment (sealed, read from
/// there). The ring's header is not read: every caller of the instance maps the ring
/// writable, and one that rewrote the header made the restarted broker refuse the instance
/// for good (`tests/isolation.rs`, `a_caller_scribbling_an_instance_s_doorbell_header_…`).
/// The header's instance identity was no check either, for the same reason. The ring's
/// size, sealed, must be the one the layout gives.
fn adopted_layout(
    fd: &OwnedFd,
    config: &ServiceConfig,
    own_heap: u64,
) -> Result<InstanceLayout, String> {
    let (Some(slot_size), Some(slot_count)) = (config.slot_size, config.slot_count) else {
        return Err("a resuming Register must state its ring's slot size and count".into());
    };
    let il = InstanceLayout {
        slot_size,
        slot_count,
        heap_size: own_heap,
    };
    il.validate()?;
    sys::check_size_sealed(fd, Some(il.ring_size() as u64))?;
    Ok(il)
}

/// Who is on the other end of a control connection (from `SO_PEERCRED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
}

pub(crate) struct ServiceRec {
    pub(crate) name: String,
    slot_size: u32,
    slot_count: u32,
    max_message: u64,
    members: Vec<u32>,
}

pub(crate) struct InstanceRec {
    pub(crate) service: u32,
    pub(crate) id: String,
    pub(crate) peer: Peer,
    pub(crate) incarnation: u64,
    /// The ring segment.
    fd: OwnedFd,
    /// The instance's own segment, handed to callers beside the ring.
    own_fd: OwnedFd,
    pub(crate) seg: InstanceSeg,
    /// Control connections holding this registration (same process registering twice).
    owners: Vec<ConnId>,
    metadata: Vec<(String, String)>,
    registered_at_ms: u64,
    mirrored_served: u64,
    /// Resource ids this instance owns.
    pub(crate) owned: std::collections::HashSet<String>,
    /// Liveness: status, heartbeat tracking, transitions.
    pub(crate) live: crate::liveness::Live,
    /// Its callers' channels, by channel id, mapped here only to read (queued requests,
    /// whether the head moves).
    pub(crate) channels: HashMap<u64, ChannelSeg>,
    /// The highest `ipc_router_loadbalancer_selections` reported (see
    /// `liveness::selections`).
    pub(crate) selections_reported: std::sync::atomic::AtomicU64,
}

/// One caller's channel to one instance (see [`ChannelSeg`]).
struct ChannelRec {
    /// The caller's client slot and generation.
    client: (u32, u32),
    /// The instance's registry index and incarnation.
    instance: (u32, u64),
    /// Its request side (writable: the caller's descriptor; the instance gets a read-only
    /// reopen) and its reply side (writable: the instance's; the caller gets a read-only
    /// reopen). The broker maps both read-only.
    req: OwnedFd,
    rep: OwnedFd,
    /// Its request heap, once the caller handed one over (`Request::ChannelHeap`): sealed
    /// against every writer but the caller, passed on to the instance.
    heap: Option<OwnedFd>,
    /// Its reply heap, once the instance handed one over (`Request::ReplyHeap`): sealed
    /// against every writer but the instance, passed on to the caller when it asks
    /// (`Request::OpenReplyHeap`).
    reply_heap: Option<OwnedFd>,
    /// Whether the caller has been handed the reply heap.
    reply_heap_fetched: bool,
    /// Bytes of channel and heaps (counted to the caller's uid).
    size: u64,
}

/// A channel a previous broker made, as its caller claimed it (`Request::ClaimChannels`).
struct PreviousRec {
    /// Its id under the broker that made it (the reply heap's header names it).
    channel: u64,
    /// The instance it leads to: only that instance's serving connection may hand over
    /// its reply heap.
    instance: (u32, u64),
    /// The reply heap its instance handed over (its bytes counted to the claiming client
    /// while that client lives), once it did.
    reply_heap: Option<OwnedFd>,
    /// The request heap its caller handed over again (`PreviousRequestHeap`; counted to
    /// the claiming client like the reply heap), for its instance to fetch.
    request_heap: Option<OwnedFd>,
}

/// What a serving connection is told with its next `Channels` reply.
#[derive(Default)]
struct ChannelNews {
    new: Vec<u64>,
    /// Channels told before whose caller has since handed over a request heap.
    heaps: Vec<u64>,
    gone: Vec<u64>,
}

pub(crate) struct ClientRec {
    gen: u32,
    pub(crate) conn: ConnId,
    /// The connecting process's uid (quotas are per uid).
    uid: u32,
    /// Bytes of its segment.
    size: u64,
    /// The instances `(index, incarnation)` this client opened (or, after a broker restart,
    /// says it had opened): only it may report them unhealthy, and its statistics count
    /// for their services.
    grants: std::collections::HashSet<(u32, u64)>,
    /// Who connected (its statistics count only for services the policy lets it call).
    pub(crate) peer: Peer,
    /// Its breakers and failure counters (it writes them; no other process maps them).
    pub(crate) stats: layout::CallerSeg,
    /// When a report of this client last counted (reports are rate-limited).
    last_report: Option<std::time::Instant>,
    /// Its channel id to each instance `(index, incarnation)` it opened.
    channels: HashMap<(u32, u64), u64>,
    /// Reply heaps of its channels that closed before it fetched them (the instance
    /// answered, then left): kept, and counted to its quota, until it asks for them or
    /// leaves, so a last large reply stays readable. Bytes each.
    orphaned_reply_heaps: HashMap<u64, (OwnedFd, u64)>,
    /// The channels a previous broker made that it claimed after this broker started
    /// (`Request::ClaimChannels`), by token: their instances may hand a reply heap over
    /// for them, counted to its quota while it lives.
    previous_channels: HashMap<[u64; 2], PreviousRec>,
    /// Its mailboxes, of which each of its channels has a copy.
    mailboxes: ClientLayout,
}

pub struct State {
    pub cfg: BrokerConfig,
    pub epoch: u64,
    registry_fd: OwnedFd,
    pub(crate) registry: RegistryView,
    shared_fd: OwnedFd,
    pub(crate) services: Vec<Option<ServiceRec>>,
    pub(crate) by_name: HashMap<String, u32>,
    pub(crate) instances: Vec<Option<InstanceRec>>,
    pub(crate) resources: crate::resources::Resources,
    pub(crate) liveness: crate::liveness::Watch,
    pub(crate) clients: Vec<Option<ClientRec>>,
    /// Per service index, how many callers' breakers are in each state (as of the last
    /// tick).
    pub(crate) breakers: Vec<BreakerStates>,
    ids: Identities,
    /// Counts behind the Prometheus metrics (see `metrics`).
    pub(crate) metrics: crate::metrics::Counters,
    /// The resource journal (metadata and TTLs across broker restarts); `None` in unit
    /// tests without a bus directory.
    pub(crate) journal: Option<crate::journal::Journal>,
    /// Every gid (primary and supplementary) of each connection's peer, read when it
    /// connected: the policy's group rules.
    conn_groups: HashMap<ConnId, Vec<u32>>,
    /// Every caller-to-instance channel, by id (unique per broker run, from 1).
    channels: HashMap<u64, ChannelRec>,
    next_channel: u64,
    /// Channels to tell each serving connection about (`Request::Channels`).
    channel_news: HashMap<ConnId, ChannelNews>,
    /// Which client claimed each previous broker's channel, by token (first claim wins).
    previous_tokens: HashMap<[u64; 2], (u32, u32)>,
}

/// A response plus the descriptors that travel with it.
pub type Reply = (Response, Vec<OwnedFd>);

fn err(e: WireError) -> Reply {
    (Response::Error(e), Vec::new())
}

fn dup(fd: &OwnedFd) -> std::io::Result<OwnedFd> {
    fd.try_clone()
}

impl State {
    pub fn new(cfg: BrokerConfig, ids: Identities) -> std::io::Result<State> {
        let epoch = random_u64();
        let rl = RegistryLayout {
            max_services: cfg.max_services,
            max_instances: cfg.max_instances,
            max_resources: cfg.max_resources,
        };
        let registry_fd = sys::memfd("aegis-registry", rl.total_size() as u64)?;
        let map = Mapping::map(&registry_fd, true)?;
        map.write_header(
            SegmentKind::Registry,
            rl.total_size() as u64,
            epoch,
            rl.params(),
        );
        drop(map);
        // Map writable *before* sealing it read-only: this mapping stays the only writable
        // one. Its size is sealed first, as every mapped segment's must be.
        sys::add_seals(&registry_fd, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW)?;
        let registry = RegistryView::open(&registry_fd, true).map_err(std::io::Error::other)?;
        sys::seal_read_only(&registry_fd)?;

        let sl = SharedLayout {
            max_services: cfg.max_services,
        };
        let shared_fd = sys::memfd("aegis-shared", sl.total_size() as u64)?;
        Mapping::map(&shared_fd, true)?.write_header(
            SegmentKind::Shared,
            sl.total_size() as u64,
            epoch,
            sl.params(),
        );
        sys::seal_size(&shared_fd)?;

        Ok(State {
            services: (0..cfg.max_services).map(|_| None).collect(),
            instances: (0..cfg.max_instances).map(|_| None).collect(),
            clients: (0..cfg.max_clients).map(|_| None).collect(),
            breakers: Vec::new(),
            ids,
            channels: HashMap::new(),
            next_channel: 1,
            previous_tokens: HashMap::new(),
            channel_news: HashMap::new(),
            conn_groups: HashMap::new(),
            journal: None,
            metrics: Default::default(),
            by_name: HashMap::new(),
            resources: Default::default(),
            liveness: Default::default(),
            cfg,
            epoch,
            registry_fd,
            registry,
            shared_fd,
        })
    }

    /// A new control connection said hello: give it a client segment, or, for a process
    /// resuming after a broker restart, adopt the one it hands over (`resume`).
    pub fn hello(
        &mut self,
        conn: ConnId,
        peer: Peer,
        mailboxes: u32,
        resume: Option<((u32, u32), OwnedFd)>,
        // The connection's secret: its requests carry it; the broker keeps nothing of it
        // since channels replaced `OpenClient`, where an instance showed it.
        _secret: u64,
    ) -> Reply {
        let cap = self.cfg.max_clients_per_uid(peer.uid);
        if self
            .clients
            .iter()
            .flatten()
            .filter(|c| c.uid == peer.uid)
            .count()
            >= cap as usize
        {
            return err(WireError::LimitExceeded(format!(
                "uid {} already has {cap} connected processes (broker --max-clients-per-uid {cap})",
                peer.uid
            )));
        }
        // A resuming client keeps its (index, gen) where that slot is free (and the gen is
        // one of an earlier run, see `Identities`).
        let wanted = resume
            .as_ref()
            .map(|(c, _)| *c)
            .filter(|&(_, g)| self.ids.is_earlier_gen(g));
        let free_old = wanted
            .map(|(i, _)| i as usize)
            .filter(|&i| i < self.clients.len() && self.clients[i].is_none());
        let Some(index) = free_old.or_else(|| self.clients.iter().position(Option::is_none)) else {
            return err(WireError::LimitExceeded(format!(
                "all {} client slots are in use (broker --max-clients)",
                self.cfg.max_clients
            )));
        };
        let gen = match wanted {
            Some((i, g)) if i as usize == index => g,
            _ => match self.ids.client_gen() {
                Ok(g) => g,
                Err(e) => return err(WireError::Internal(e)),
            },
        };
        let cl = ClientLayout {
            mailboxes: mailboxes.clamp(1, 1 << 16),
            mailbox_inline: layout::MAILBOX_INLINE,
        };
        let resuming = resume.is_some();
        let made = match resume {
            // Adopt: the client segment, which every instance it opened maps writable, gets
            // a fresh header for this run rather than being trusted.
            Some((_, fd)) => ClientSeg::stamp(&fd, self.epoch, cl, index as u32, gen).map(|()| fd),
            None => ClientSeg::create(self.epoch, cl, index as u32, gen),
        };
        let fd = match made {
            Ok(fd) => fd,
            Err(e) if resuming => {
                return err(WireError::BadRequest(format!(
                    "the client segment handed back is not one: {e}"
                )))
            }
            Err(e) => return err(WireError::Internal(format!("creating client segment: {e}"))),
        };
        // The caller's statistics: a new segment each broker run (service indices are
        // this run's), handed to that caller only.
        let stats_size = layout::CallerSeg::size(self.cfg.max_services) as u64;
        let size = sys::file_size(&fd).unwrap_or(0) + stats_size;
        if let Err(e) = self.shm_fits(peer.uid, size) {
            return err(e);
        }
        let made = (|| {
            let fd = sys::memfd("aegis-caller", stats_size)?;
            Mapping::map(&fd, true)?.write_header(
                SegmentKind::Caller,
                stats_size,
                self.epoch,
                [self.cfg.max_services as u64, 0, 0, 0],
            );
            sys::seal_size(&fd)?;
            let seg = layout::CallerSeg::open(&fd, self.epoch).map_err(std::io::Error::other)?;
            Ok::<_, std::io::Error>((fd, seg))
        })();
        let (stats_fd, stats) = match made {
            Ok(x) => x,
            Err(e) => return err(WireError::Internal(format!("creating caller segment: {e}"))),
        };
        // The client segment goes to the client only (since layout 12 no instance is
        // handed it), and the broker keeps no descriptor of it.
        let fds = match (dup(&self.registry_fd), dup(&self.shared_fd)) {
            (Ok(a), Ok(b)) => vec![a, b, fd, stats_fd],
            _ => return err(WireError::Internal("out of descriptors".into())),
        };
        self.clients[index] = Some(ClientRec {
            gen,
            conn,
            grants: Default::default(),
            peer,
            stats,
            last_report: None,
            uid: peer.uid,
            size,
            channels: HashMap::new(),
            orphaned_reply_heaps: HashMap::new(),
            previous_channels: HashMap::new(),
            mailboxes: cl,
        });
        (
            Response::Welcome {
                bus_epoch: self.epoch,
                client: index as u32,
                gen,
                max_services: self.cfg.max_services,
                broker_pid: std::process::id(),
                max_message: self.cfg.max_message,
            },
            fds,
        )
    }

    pub fn register(&mut self, conn: ConnId, peer: Peer, reg: Registration<'_>) -> Reply {
        let Registration {
            service,
            id,
            metadata,
            config,
            heartbeat,
            adopt,
            own,
        } = reg;
        // The instance's own memory: sealed so that only the mapping the instance made
        // before sealing can write it (callers and the broker map it read-only).
        let Some(own_fd) = own else {
            return err(WireError::BadRequest(
                "Register carries no instance segment of its own (counters, reply heap)".into(),
            ));
        };
        let (own_map, own_heap) = match InstanceSeg::open_own(&own_fd) {
            Ok(x) => x,
            Err(e) => {
                return err(WireError::BadRequest(format!(
                    "the instance's own segment: {e}"
                )))
            }
        };
        // An adopted segment dictates the service's sizing.
        let adopted_config;
        let config = match &adopt {
            None => config,
            Some((_, fd)) => match adopted_layout(fd, config, own_heap) {
                Ok(il) => {
                    adopted_config = ServiceConfig {
                        slot_size: Some(il.slot_size),
                        slot_count: Some(il.slot_count),
                        max_message: Some(il.heap_size / 2),
                    };
                    &adopted_config
                }
                Err(e) => {
                    return err(WireError::BadRequest(format!(
                        "cannot adopt the instance segment: {e}"
                    )))
                }
            },
        };
        if heartbeat.interval_ms == 0 || heartbeat.timeout_ms < heartbeat.interval_ms {
            return err(WireError::BadRequest(format!(
                "heartbeat interval {} ms must be positive and at most the timeout {} ms",
                heartbeat.interval_ms, heartbeat.timeout_ms
            )));
        }
        if let Err(e) = names::service(service).and_then(|()| names::instance_id(id)) {
            return err(WireError::BadRequest(
                e.to_string().trim_start_matches("bad request: ").into(),
            ));
        }
        if metadata.len() > 64
            || metadata
                .iter()
                .any(|(k, v)| k.len() > 256 || v.len() > 4096)
        {
            return err(WireError::BadRequest(
                "metadata: at most 64 entries, keys up to 256 and values up to 4096 bytes".into(),
            ));
        }
        if let Err(e) = self.permit(conn, peer, service, crate::policy::Action::Serve) {
            return err(e);
        }
        let svc_idx = match self.service_for(service, config) {
            Ok(i) => i,
            Err(e) => return err(e),
        };
        // Same id already registered?
        if let Some((i, rec)) = self.instances.iter_mut().enumerate().find_map(|(i, r)| {
            r.as_mut()
                .filter(|r| r.service == svc_idx && r.id == id)
                .map(|r| (i, r))
        }) {
            if rec.peer.pid != peer.pid {
                return err(WireError::Conflict {
                    service: service.into(),
                    instance_id: id.into(),
                    holder_pid: rec.peer.pid,
                });
            }
            // The same process again: idempotent, hand back the same registration.
            if !rec.owners.contains(&conn) {
                rec.owners.push(conn);
            }
            return self.registered(i as u32);
        }
        let svc = self.services[svc_idx as usize]
            .as_ref()
            .expect("service_for made it");
        if svc.members.len() >= MAX_MEMBERS {
            return err(WireError::LimitExceeded(format!(
                "service '{service}' already has the maximum of {MAX_MEMBERS} instances"
            )));
        }
        // A re-registering instance keeps its index and incarnation where they are free, so
        // callers' cached mappings stay keyed right.
        let wanted = adopt.as_ref().map(|(c, _)| *c);
        let free_old = wanted
            .map(|(i, _)| i as usize)
            .filter(|&i| i < self.instances.len() && self.instances[i].is_none());
        let Some(index) = free_old.or_else(|| self.instances.iter().position(Option::is_none))
        else {
            return err(WireError::LimitExceeded(format!(
                "all {} instance slots are in use (broker --max-instances)",
                self.cfg.max_instances
            )));
        };
        let il = InstanceLayout {
            slot_size: svc.slot_size,
            slot_count: svc.slot_count,
            heap_size: 2 * svc.max_message,
        };
        if own_heap != il.heap_size {
            return err(WireError::BadRequest(format!(
                "service '{service}' has max message {}: the instance's reply heap must be {} bytes, not {own_heap}",
                svc.max_message, il.heap_size
            )));
        }
        let ring_bytes = il.slot_count as u64 * il.slot_stride() as u64;
        if ring_bytes > self.cfg.max_ring_bytes {
            return err(WireError::LimitExceeded(format!(
                "service '{service}': a ring of {} slots of {} bytes is {ring_bytes} bytes (broker --max-ring-bytes {})",
                il.slot_count, il.slot_size, self.cfg.max_ring_bytes
            )));
        }
        let per_uid = self.cfg.max_instances_per_uid(peer.uid);
        if self
            .instances
            .iter()
            .flatten()
            .filter(|r| r.peer.uid == peer.uid)
            .count()
            >= per_uid as usize
        {
            return err(WireError::LimitExceeded(format!(
                "uid {} already has {per_uid} instances registered (broker --max-instances-per-uid {per_uid})",
                peer.uid
            )));
        }
        if let Err(e) = self.shm_fits(peer.uid, il.total_size() as u64) {
            return err(e);
        }
        let incarnation = match wanted {
            Some((_, inc))
                if self.ids.is_earlier_incarnation(inc)
                    && !self
                        .instances
                        .iter()
                        .flatten()
                        .any(|r| r.incarnation == inc) =>
            {
                inc
            }
            _ => match self.ids.incarnation() {
                Ok(i) => i,
                Err(e) => return err(WireError::Internal(e)),
            },
        };
        let adopting = adopt.is_some();
        let made = (|| {
            let fd = match adopt {
                // The live ring is kept as it is: only the header is stamped for this run.
                Some((_, fd)) => fd,
                None => {
                    let fd = sys::memfd("aegis-instance", il.ring_size() as u64)?;
                    sys::seal_size(&fd)?;
                    fd
                }
            };
            Mapping::map(&fd, true)?.write_header(
                SegmentKind::Instance,
                il.ring_size() as u64,
                self.epoch,
                il.params(index as u32, incarnation),
            );
            // A zero-filled ring is an initialised one (see `ring`): no slot page is touched.
            // As `il`, not as its header says (see `adopted_layout`).
            let seg = InstanceSeg::open_ring_as(&fd, own_map, il, index as u32, incarnation)
                .map_err(std::io::Error::other)?;
            Ok::<_, std::io::Error>((fd, seg))
        })();
        let (fd, seg) = match made {
            Ok(x) => x,
            Err(e) if adopting => {
                return err(WireError::BadRequest(format!(
                    "cannot adopt the instance segment: {e}"
                )))
            }
            Err(e) => {
                return err(WireError::Internal(format!(
                    "creating instance segment: {e}"
                )))
            }
        };
        let rec = InstanceRec {
            service: svc_idx,
            id: id.into(),
            peer,
            incarnation,
            fd,
            own_fd,
            seg,
            owners: vec![conn],
            metadata,
            registered_at_ms: sys::unix_millis(),
            mirrored_served: 0,
            owned: Default::default(),
            channels: HashMap::new(),
            selections_reported: Default::default(),
            live: crate::liveness::Live::new(peer.pid, heartbeat),
        };
        self.install(
            index,
            rec,
            if adopting {
                "adopted after a broker restart"
            } else {
                "registered"
            },
        )
    }

    /// Puts a new instance into the records, the registry and its service's routing.
    fn install(&mut self, index: usize, rec: InstanceRec, how: &str) -> Reply {
        let (svc_idx, pid) = (rec.service, rec.peer.pid);
        tracing::info!(instance = %rec.id, pid, index, incarnation = rec.incarnation, how, "instance joined");
        self.instances[index] = Some(rec);
        self.watch_pid(pid);
        self.write_instance(index as u32);
        self.services[svc_idx as usize]
            .as_mut()
            .unwrap()
            .members
            .push(index as u32);
        self.write_service(svc_idx);
        self.registered(index as u32)
    }

    fn registered(&self, index: u32) -> Reply {
        let rec = self.instances[index as usize].as_ref().unwrap();
        let svc = self.services[rec.service as usize].as_ref().unwrap();
        match dup(&rec.fd) {
            Ok(fd) => (
                Response::Registered {
                    instance: index,
                    incarnation: rec.incarnation,
                    slot_size: svc.slot_size,
                    slot_count: svc.slot_count,
                    max_message: svc.max_message,
                },
                vec![fd],
            ),
            Err(e) => err(WireError::Internal(e.to_string())),
        }
    }

    /// Finds or creates the service, reconciling its sizing with `config`.
    fn service_for(&mut self, name: &str, config: &ServiceConfig) -> Result<u32, WireError> {
        let want = ServiceConfig {
            slot_size: config.slot_size,
            slot_count: config.slot_count,
            max_message: config.max_message,
        };
        let sized = |cur: Option<(u32, u32, u64)>| -> Result<(u32, u32, u64), WireError> {
            let (ds, dc, dm) = cur.unwrap_or((
                self.cfg.slot_size,
                self.cfg.slot_count,
                self.cfg.max_message,
            ));
            let s = want.slot_size.unwrap_or(ds);
            let c = want.slot_count.unwrap_or(dc);
            let m = want.max_message.unwrap_or(dm);
            InstanceLayout {
                slot_size: s,
                slot_count: c,
                heap_size: 2 * m,
            }
            .validate()
            .map_err(|e| WireError::BadRequest(format!("service '{name}': {e}")))?;
            if m == 0 || m > self.cfg.max_message {
                return Err(WireError::BadRequest(format!(
                    "service '{name}': max message {m} is not in 1..={} (broker --max-message)",
                    self.cfg.max_message
                )));
            }
            Ok((s, c, m))
        };
        if let Some(&i) = self.by_name.get(name) {
            let svc = self.services[i as usize].as_mut().unwrap();
            let cur = (svc.slot_size, svc.slot_count, svc.max_message);
            let new = sized(Some(cur))?;
            if new != cur {
                if !svc.members.is_empty() {
                    return Err(WireError::BadRequest(format!(
                        "service '{name}' runs with slot size {}, {} slots, max message {}; \
                         an instance cannot register with {}, {}, {}",
                        cur.0, cur.1, cur.2, new.0, new.1, new.2
                    )));
                }
                (svc.slot_size, svc.slot_count, svc.max_message) = new;
                self.write_service(i);
            }
            return Ok(i);
        }
        let (slot_size, slot_count, max_message) = sized(None)?;
        let cap = self.cfg.max_services;
        let mut i = (layout::name_hash(name) as u32) & (cap - 1);
        for _ in 0..cap {
            if self.services[i as usize].is_none() {
                self.services[i as usize] = Some(ServiceRec {
                    name: name.into(),
                    slot_size,
                    slot_count,
                    max_message,
                    members: Vec::new(),
                });
                self.by_name.insert(name.into(), i);
                self.write_service(i);
                return Ok(i);
            }
            i = (i + 1) & (cap - 1);
        }
        Err(WireError::LimitExceeded(format!(
            "all {cap} service slots are in use (broker --max-services)"
        )))
    }

    pub fn unregister(&mut self, conn: ConnId, peer: Peer, index: u32, incarnation: u64) -> Reply {
        match self.instances.get(index as usize).and_then(Option::as_ref) {
            Some(r) if r.incarnation == incarnation => {
                if !r.owners.contains(&conn) && r.peer.pid != peer.pid && !self.is_admin(peer) {
                    return err(WireError::NotOwner(format!(
                        "instance '{}' belongs to pid {}, not to pid {}",
                        r.id, r.peer.pid, peer.pid
                    )));
                }
                self.remove_instance(index, "unregistered");
                (Response::Done, Vec::new())
            }
            // Already gone: unregistering is idempotent.
            _ => (Response::Done, Vec::new()),
        }
    }

    pub(crate) fn is_admin(&self, peer: Peer) -> bool {
        self.cfg.admin_uids.contains(&peer.uid) || self.cfg.admin_gids.contains(&peer.gid)
    }

    /// Whether `conn`/`peer` may act for instance `index` of incarnation `inc`.
    pub(crate) fn acts_for(
        &self,
        conn: ConnId,
        peer: Peer,
        index: u32,
        inc: u64,
    ) -> Result<&InstanceRec, WireError> {
        match self.instances.get(index as usize).and_then(Option::as_ref) {
            Some(r) if r.incarnation == inc => {
                if r.owners.contains(&conn) || r.peer.pid == peer.pid {
                    Ok(r)
                } else {
                    Err(WireError::NotOwner(format!(
                        "instance '{}' belongs to pid {}, not to pid {}",
                        r.id, r.peer.pid, peer.pid
                    )))
                }
            }
            _ => Err(WireError::BadRequest(format!(
                "instance #{index} is not registered"
            ))),
        }
    }

    /// Index of instance `id` of `service`, if registered.
    pub(crate) fn find_instance(&self, service: &str, id: &str) -> Option<u32> {
        let s = *self.by_name.get(service)?;
        self.instances
            .iter()
            .position(|r| r.as_ref().is_some_and(|r| r.service == s && r.id == id))
            .map(|i| i as u32)
    }

    /// Status of instance `index` as routing sees it.
    pub(crate) fn status(&self, index: u32) -> Status {
        self.registry.instance(index).map_or(Status::Free, |e| {
            Status::from_u32(e.status.load(std::sync::atomic::Ordering::Relaxed))
        })
    }

    /// Tells watchers the registry changed (futex on the control generation word).
    pub(crate) fn changed(&self) {
        let g = &self.registry.control().generation;
        g.fetch_add(1, std::sync::atomic::Ordering::Release);
        let _ = sys::futex_wake(g, u32::MAX);
    }

    /// A caller opens instance `index`: it gets that segment and those of the other
    /// instances of the same service (one round trip per service, not per instance), each
    /// with the caller's channel to it (made here the first time, and announced to the
    /// instance's serving connections).
    pub fn open_instance(
        &mut self,
        conn: ConnId,
        peer: Peer,
        index: u32,
        incarnation: u64,
    ) -> Reply {
        let Some(first) = self
            .instances
            .get(index as usize)
            .and_then(Option::as_ref)
            .filter(|r| r.incarnation == incarnation)
        else {
            return err(WireError::NoAvailableInstance {
                service: format!("(instance #{index} has left)"),
            });
        };
        if let Some(svc) = self.services[first.service as usize].as_ref() {
            if let Err(e) = self.permit(conn, peer, &svc.name, crate::policy::Action::Call) {
                return err(e);
            }
        }
        let members = self.services[first.service as usize]
            .as_ref()
            .map(|s| s.members.clone())
            .unwrap_or_default();
        let batch = std::iter::once(index)
            .chain(members.into_iter().filter(|&m| m != index))
            .take(proto::OPEN_BATCH);
        let Some(caller) = self.client_of(conn) else {
            return err(WireError::BadRequest("OpenInstance before Hello".into()));
        };
        let (mut opened, mut fds) = (Vec::new(), Vec::new());
        for i in batch {
            let Some(r) = self.instances[i as usize].as_ref() else {
                continue;
            };
            let inc = r.incarnation;
            let got = dup(&r.fd)
                .and_then(|ring| Ok([ring, dup(&r.own_fd)?]))
                .map_err(|e| WireError::Internal(e.to_string()))
                .and_then(|[ring, own]| {
                    let [req, rep] = self.channel_for(caller, (i, inc))?;
                    Ok([ring, own, req, rep])
                });
            match got {
                Ok(four) => fds.extend(four),
                Err(e) if i == index => return err(e),
                Err(_) => continue,
            }
            opened.push((i, inc));
        }
        if let Err(e) = self.grant(caller.0, opened.iter().copied()) {
            return err(e);
        }
        (Response::OpenedInstances(opened), fds)
    }

    /// The channel of client `caller` to instance `inst` as its caller gets it (its
    /// request side writable, its reply side read-only), created the first time: counted
    /// to the caller's uid, mapped here read-only to watch it, and announced to the
    /// instance's serving connections (`Request::Channels`, woken through the registry's
    /// [`layout::InstanceEntry::channels`] word).
    fn channel_for(
        &mut self,
        caller: (u32, u32),
        inst: (u32, u64),
    ) -> Result<[OwnedFd; 2], WireError> {
        let internal = |e: String| WireError::Internal(format!("channel: {e}"));
        let c = self.clients[caller.0 as usize]
            .as_ref()
            .ok_or_else(|| internal("caller gone".into()))?;
        let for_caller = |rec: &ChannelRec| -> std::io::Result<[OwnedFd; 2]> {
            Ok([dup(&rec.req)?, sys::reopen_read_only(&rec.rep)?])
        };
        if let Some(id) = c.channels.get(&inst) {
            let rec = self
                .channels
                .get(id)
                .ok_or_else(|| internal("record missing".into()))?;
            return for_caller(rec).map_err(|e| internal(e.to_string()));
        }
        let r = self.instances[inst.0 as usize]
            .as_ref()
            .ok_or_else(|| internal("instance gone".into()))?;
        let cl = ChannelSeg::layout_for(r.seg.layout);
        let size = ChannelSeg::size(&cl, &c.mailboxes) as u64;
        self.shm_fits(c.uid, size)?;
        let id = self.next_channel;
        let [req, rep] = ChannelSeg::create(self.epoch, cl, c.mailboxes, inst.0, inst.1, id)
            .map_err(|e| internal(e.to_string()))?;
        let seg = ChannelSeg::open(&req, &rep, self.epoch, Some(inst), layout::Party::Broker)
            .map_err(|e| internal(e.to_string()))?;
        let rec = ChannelRec {
            client: caller,
            instance: inst,
            req,
            rep,
            heap: None,
            reply_heap: None,
            reply_heap_fetched: false,
            size,
        };
        let handed = for_caller(&rec).map_err(|e| internal(e.to_string()))?;
        self.next_channel += 1;
        let c = self.clients[caller.0 as usize]
            .as_mut()
            .expect("checked above");
        c.channels.insert(inst, id);
        c.size += size;
        let r = self.instances[inst.0 as usize]
            .as_mut()
            .expect("checked above");
        r.channels.insert(id, seg);
        for owner in &r.owners {
            self.channel_news.entry(*owner).or_default().new.push(id);
        }
        self.channels.insert(id, rec);
        self.channels_changed(inst.0);
        Ok(handed)
    }

    /// The caller on connection `conn` hands over the request heap of its channel
    /// `channel`: taken only for a channel of its own without one, sealed against every
    /// other writer (`F_SEAL_FUTURE_WRITE`) and against resizing, twice `--max-message` of
    /// heap, within its uid's quota; then passed on to the instance's serving connections.
    pub fn channel_heap(&mut self, conn: ConnId, channel: u64, fd: Option<OwnedFd>) -> Reply {
        let bad = |m: String| err(WireError::BadRequest(m));
        let Some(fd) = fd else {
            return bad("ChannelHeap carries the heap's descriptor".into());
        };
        let Some(caller) = self.client_of(conn) else {
            return bad("ChannelHeap before Hello".into());
        };
        let Some(rec) = self.channels.get(&channel).filter(|r| r.client == caller) else {
            return bad(format!("channel {channel} is not one of yours"));
        };
        if rec.heap.is_some() {
            return bad(format!("channel {channel} has its request heap already"));
        }
        let size = match check_request_heap(&fd, self.cfg.max_message) {
            Ok(size) => size,
            Err(m) => return bad(m),
        };
        let uid = self.clients[caller.0 as usize]
            .as_ref()
            .map_or(u32::MAX, |c| c.uid);
        if let Err(e) = self.shm_fits(uid, size) {
            return err(e);
        }
        let rec = self.channels.get_mut(&channel).expect("checked above");
        rec.heap = Some(fd);
        rec.size += size;
        let inst = rec.instance;
        if let Some(c) = self.clients[caller.0 as usize].as_mut() {
            c.size += size;
        }
        if let Some(r) = self.instances[inst.0 as usize]
            .as_ref()
            .filter(|r| r.incarnation == inst.1)
        {
            for owner in &r.owners {
                let news = self.channel_news.entry(*owner).or_default();
                // A channel not told yet is told with its heap.
                if !news.new.contains(&channel) {
                    news.heaps.push(channel);
                }
            }
        }
        self.channels_changed(inst.0);
        (Response::Done, Vec::new())
    }

    /// The serving connection `conn` of channel `channel`'s instance hands over the
    /// channel's reply heap: taken only once per channel, sealed against every other
    /// writer and against resizing, twice the service's largest message, charged to the
    /// channel's *caller's* uid (whose calls and unread replies fill it); kept for the
    /// caller, who asks for it when it meets the first reply there (`open_reply_heap`).
    pub fn reply_heap(
        &mut self,
        conn: ConnId,
        channel: u64,
        previous: Option<[u64; 2]>,
        fd: Option<OwnedFd>,
    ) -> Reply {
        let bad = |m: String| err(WireError::BadRequest(m));
        let Some(fd) = fd else {
            return bad("ReplyHeap carries the heap's descriptor".into());
        };
        if let Some(token) = previous {
            return self.previous_reply_heap(conn, channel, token, fd);
        }
        let Some(rec) = self.channels.get(&channel) else {
            return bad(format!("channel {channel} is not one of your instances'"));
        };
        let (caller, inst) = (rec.client, rec.instance);
        let Some(r) = self.instances[inst.0 as usize]
            .as_ref()
            .filter(|r| r.incarnation == inst.1 && r.owners.contains(&conn))
        else {
            return bad(format!("channel {channel} is not one of your instances'"));
        };
        let heap_size = r.seg.layout.heap_size;
        if rec.reply_heap.is_some() {
            return bad(format!("channel {channel} has its reply heap already"));
        }
        let size = match check_reply_heap(&fd, heap_size) {
            Ok(size) => size,
            Err(m) => return bad(m),
        };
        let uid = self.clients[caller.0 as usize]
            .as_ref()
            .filter(|c| c.gen == caller.1)
            .map_or(u32::MAX, |c| c.uid);
        if let Err(e) = self.shm_fits(uid, size) {
            return err(e);
        }
        let rec = self.channels.get_mut(&channel).expect("checked above");
        rec.reply_heap = Some(fd);
        rec.size += size;
        if let Some(c) = self.clients[caller.0 as usize]
            .as_mut()
            .filter(|c| c.gen == caller.1)
        {
            c.size += size;
        }
        (Response::Done, Vec::new())
    }

    /// The claim of channel `channel` of a previous broker under `token`, if a connection of
    /// the instance it names (the claiming caller's word: looked up, not indexed) is `conn`:
    /// the claiming client's slot and uid, the claim, the instance. `Err`: a `NotOwner` reply
    /// saying what is missing (yet).
    fn served_claim(
        &self,
        conn: ConnId,
        channel: u64,
        token: &[u64; 2],
    ) -> std::result::Result<(u32, u32, &PreviousRec, &InstanceRec), Reply> {
        let not_yet = |m: String| err(WireError::NotOwner(m));
        let claim = self.previous_tokens.get(token).and_then(|&(slot, gen)| {
            let c = self.clients[slot as usize]
                .as_ref()
                .filter(|c| c.gen == gen)?;
            let p = c
                .previous_channels
                .get(token)
                .filter(|p| p.channel == channel)?;
            Some((slot, c.uid, p))
        });
        let Some((slot, uid, p)) = claim else {
            return Err(not_yet(format!(
                "channel {channel} of a previous broker has not been claimed by its caller (yet)"
            )));
        };
        let inst = p.instance;
        let Some(r) = self
            .instances
            .get(inst.0 as usize)
            .and_then(Option::as_ref)
            .filter(|r| r.incarnation == inst.1 && r.owners.contains(&conn))
        else {
            return Err(not_yet(format!(
                "channel {channel} of a previous broker leads to instance {}/{}, not (yet) registered by this connection",
                inst.0, inst.1
            )));
        };
        Ok((slot, uid, p, r))
    }

    /// The serving connection `conn` hands over the reply heap of channel `channel` that a
    /// previous broker made, named by its token: taken once, from a serving connection of
    /// the instance the channel's claim names, once its caller has claimed it (until then
    /// `NotOwner`, which the instance waits out), checked as in [`State::reply_heap`] and
    /// charged to the claiming client's uid.
    fn previous_reply_heap(
        &mut self,
        conn: ConnId,
        channel: u64,
        token: [u64; 2],
        fd: OwnedFd,
    ) -> Reply {
        let bad = |m: String| err(WireError::BadRequest(m));
        let (slot, uid, has_heap, heap_size) = match self.served_claim(conn, channel, &token) {
            Ok((slot, uid, p, r)) => (slot, uid, p.reply_heap.is_some(), r.seg.layout.heap_size),
            Err(not_yet) => return not_yet,
        };
        if has_heap {
            return bad(format!("channel {channel} has its reply heap already"));
        }
        let size = match check_reply_heap(&fd, heap_size) {
            Ok(size) => size,
            Err(m) => return bad(m),
        };
        if let Err(e) = self.shm_fits(uid, size) {
            return err(e);
        }
        let c = self.clients[slot as usize].as_mut().expect("found above");
        c.size += size;
        let p = c.previous_channels.get_mut(&token).expect("found above");
        p.reply_heap = Some(fd);
        (Response::Done, Vec::new())
    }

    /// After a broker restart, the client on `conn` claims the channels a previous broker
    /// made that it still uses (see `Request::ClaimChannels`). A token another client
    /// claimed first stays that client's (only the channel's two parties can know it, and
    /// an instance that claims its own channel's token only keeps its large replies from
    /// that channel's caller).
    pub fn claim_channels(&mut self, conn: ConnId, channels: Vec<PreviousChannel>) -> Reply {
        let Some((slot, gen)) = self.client_of(conn) else {
            return err(WireError::BadRequest("ClaimChannels before Hello".into()));
        };
        let cap = 2 * self.cfg.max_instances as usize;
        for ch in channels {
            if ch.token == [0, 0] {
                return err(WireError::BadRequest(format!(
                    "channel {} has no token (made by a broker older than protocol 12)",
                    ch.channel
                )));
            }
            if self.previous_tokens.contains_key(&ch.token) {
                continue;
            }
            let c = self.clients[slot as usize]
                .as_mut()
                .expect("client_of found it");
            if c.previous_channels.len() >= cap {
                return err(WireError::LimitExceeded(format!(
                    "a client may claim at most {cap} channels of a previous broker (2 x broker --max-instances)"
                )));
            }
            c.previous_channels.insert(
                ch.token,
                PreviousRec {
                    channel: ch.channel,
                    instance: (ch.instance, ch.incarnation),
                    reply_heap: None,
                    request_heap: None,
                },
            );
            self.previous_tokens.insert(ch.token, (slot, gen));
        }
        (Response::Done, Vec::new())
    }

    /// The client on `conn` hands over again the request heap of a previous broker's
    /// channel it claimed (by `token`): checked as in [`State::channel_heap`], once per
    /// claim, charged to its uid while it lives.
    pub fn previous_request_heap(
        &mut self,
        conn: ConnId,
        token: [u64; 2],
        fd: Option<OwnedFd>,
    ) -> Reply {
        let bad = |m: String| err(WireError::BadRequest(m));
        let Some(fd) = fd else {
            return bad("PreviousRequestHeap carries the heap's descriptor".into());
        };
        let Some((slot, _)) = self.client_of(conn) else {
            return bad("PreviousRequestHeap before Hello".into());
        };
        let c = self.clients[slot as usize]
            .as_ref()
            .expect("client_of found it");
        let Some(p) = c.previous_channels.get(&token) else {
            return bad("PreviousRequestHeap names no channel you claimed".into());
        };
        if p.request_heap.is_some() {
            return bad(format!(
                "channel {} of a previous broker has its request heap already",
                p.channel
            ));
        }
        let size = match check_request_heap(&fd, self.cfg.max_message) {
            Ok(size) => size,
            Err(m) => return bad(m),
        };
        if let Err(e) = self.shm_fits(c.uid, size) {
            return err(e);
        }
        let c = self.clients[slot as usize].as_mut().expect("found above");
        c.size += size;
        c.previous_channels
            .get_mut(&token)
            .expect("found above")
            .request_heap = Some(fd);
        (Response::Done, Vec::new())
    }

    /// The serving connection `conn` asks for the request heap of channel `channel` that a
    /// previous broker made, named by its `token`: handed only to a serving connection of
    /// the instance the channel's claim names; `NotOwner` until the caller has claimed the
    /// channel and handed the heap over again, and the instance has registered here.
    pub fn open_request_heap(&mut self, conn: ConnId, channel: u64, token: [u64; 2]) -> Reply {
        let p = match self.served_claim(conn, channel, &token) {
            Ok((_, _, p, _)) => p,
            Err(not_yet) => return not_yet,
        };
        let Some(fd) = &p.request_heap else {
            return err(WireError::NotOwner(format!(
                "channel {channel} of a previous broker has no request heap here (yet)"
            )));
        };
        match fd.try_clone() {
            Ok(fd) => (Response::Opened, vec![fd]),
            Err(e) => err(WireError::Internal(format!(
                "duplicating a request heap: {e}"
            ))),
        }
    }

    /// The caller on connection `conn` asks for the reply heap of its channel `channel`
    /// (made by a previous broker, with `previous`: its token).
    pub fn open_reply_heap(
        &mut self,
        conn: ConnId,
        channel: u64,
        previous: Option<[u64; 2]>,
    ) -> Reply {
        let bad = |m: String| err(WireError::BadRequest(m));
        let Some(caller) = self.client_of(conn) else {
            return bad("OpenReplyHeap before Hello".into());
        };
        if let Some(token) = previous {
            let c = self.clients[caller.0 as usize]
                .as_ref()
                .expect("client_of found it");
            let Some(p) = c
                .previous_channels
                .get(&token)
                .filter(|p| p.channel == channel)
            else {
                return bad(format!(
                    "channel {channel} of a previous broker is not one you claimed"
                ));
            };
            let Some(fd) = &p.reply_heap else {
                // Its instance handed it to the previous broker, and hands it to this one
                // when it next looks: the caller waits.
                return err(WireError::NotOwner(format!(
                    "channel {channel} of a previous broker has no reply heap here (yet)"
                )));
            };
            return match fd.try_clone() {
                Ok(fd) => (Response::Opened, vec![fd]),
                Err(e) => err(WireError::Internal(format!(
                    "duplicating a reply heap: {e}"
                ))),
            };
        }
        let Some(rec) = self
            .channels
            .get_mut(&channel)
            .filter(|r| r.client == caller)
        else {
            // Closed since (its instance left): the heap, if kept for us, once.
            let c = self.clients[caller.0 as usize]
                .as_mut()
                .expect("client_of found it");
            return match c.orphaned_reply_heaps.remove(&channel) {
                Some((fd, bytes)) => {
                    c.size = c.size.saturating_sub(bytes);
                    (Response::Opened, vec![fd])
                }
                None => bad(format!("channel {channel} is not one of yours")),
            };
        };
        let Some(fd) = &rec.reply_heap else {
            return bad(format!("channel {channel} has no reply heap"));
        };
        match fd.try_clone() {
            Ok(fd) => {
                rec.reply_heap_fetched = true;
                (Response::Opened, vec![fd])
            }
            Err(e) => err(WireError::Internal(format!(
                "duplicating a reply heap: {e}"
            ))),
        }
    }

    /// Tells instance `index`'s serving process that its channels changed: bumps and
    /// wakes the registry word its serving loop watches.
    fn channels_changed(&self, index: u32) {
        if let Some(e) = self.registry.instance(index) {
            e.channels
                .fetch_add(1, std::sync::atomic::Ordering::Release);
        }
    }

    /// A serving connection asks what changed in its instances' channels: new ones (with
    /// their callers' segments, where the replies go) and closed ones, a batch at a time.
    pub fn channels_request(&mut self, conn: ConnId) -> Reply {
        let news = self.channel_news.entry(conn).or_default();
        let gone = std::mem::take(&mut news.gone);
        let mut heap_ids = std::mem::take(&mut news.heaps);
        let take = news.new.len().min(proto::OPEN_BATCH / 2);
        let ids: Vec<u64> = news.new.drain(..take).collect();
        let mut more = !news.new.is_empty();
        let (mut channels, mut fds) = (Vec::new(), Vec::new());
        for id in ids {
            let Some(rec) = self.channels.get(&id) else {
                continue;
            };
            if self.clients[rec.client.0 as usize]
                .as_ref()
                .is_none_or(|c| c.gen != rec.client.1)
            {
                continue;
            }
            // The request side read-only, the reply side writable: the instance's. Nothing
            // of the caller's client segment: no instance writes or reads it (layout 12).
            let (Ok(req), Ok(rep)) = (sys::reopen_read_only(&rec.req), dup(&rec.rep)) else {
                continue;
            };
            fds.extend([req, rep]);
            channels.push(proto::ChannelInfo {
                id,
                client: rec.client,
                instance: rec.instance,
            });
            if rec.heap.is_some() {
                heap_ids.push(id);
            }
        }
        // The heaps last, after every channel of this reply; at most `OPEN_BATCH` (with
        // the channels, within what a client accepts with one response).
        if heap_ids.len() > proto::OPEN_BATCH {
            let rest = heap_ids.split_off(proto::OPEN_BATCH);
            news.heaps.extend(rest);
            more = true;
        }
        let mut heaps = Vec::new();
        for id in heap_ids {
            let Some(Ok(fd)) = self
                .channels
                .get(&id)
                .and_then(|r| r.heap.as_ref())
                .map(dup)
            else {
                continue;
            };
            fds.push(fd);
            heaps.push(id);
        }
        (
            Response::Channels {
                channels,
                heaps,
                gone,
                more,
            },
            fds,
        )
    }

    /// Closes channel `id`: its serving connections are told, its memory is freed once
    /// both sides unmap it.
    fn close_channel(&mut self, id: u64) {
        let Some(mut rec) = self.channels.remove(&id) else {
            return;
        };
        if let Some(c) = self.clients[rec.client.0 as usize].as_mut() {
            if c.gen == rec.client.1 && c.channels.remove(&rec.instance).is_some() {
                c.size = c.size.saturating_sub(rec.size);
                // A reply heap the caller has not fetched may hold a reply it has yet to
                // read (its instance answered, then left): kept for it.
                if let Some(fd) = rec.reply_heap.take().filter(|_| !rec.reply_heap_fetched) {
                    let bytes = sys::file_size(&fd).unwrap_or(0);
                    c.size += bytes;
                    c.orphaned_reply_heaps.insert(id, (fd, bytes));
                }
            }
        }
        if let Some(r) = self.instances[rec.instance.0 as usize]
            .as_mut()
            .filter(|r| r.incarnation == rec.instance.1)
        {
            r.channels.remove(&id);
            for owner in &r.owners {
                let news = self.channel_news.entry(*owner).or_default();
                // Not fetched yet: nothing to tell. So an instance that never fetches
                // holds news of its live channels only, not of every caller that came
                // and went.
                news.heaps.retain(|&h| h != id);
                match news.new.iter().position(|&n| n == id) {
                    Some(p) => {
                        news.new.swap_remove(p);
                    }
                    None => news.gone.push(id),
                }
            }
            self.channels_changed(rec.instance.0);
        }
    }

    /// Whether `uid` may hold `more` bytes of shared memory besides what it holds.
    fn shm_fits(&self, uid: u32, more: u64) -> Result<(), WireError> {
        let held: u64 = self
            .clients
            .iter()
            .flatten()
            .filter(|c| c.uid == uid)
            .map(|c| c.size)
            .chain(
                self.instances
                    .iter()
                    .flatten()
                    .filter(|r| r.peer.uid == uid)
                    .map(|r| r.seg.layout.total_size() as u64),
            )
            .sum();
        let cap = self.cfg.max_shm_per_uid;
        if held.saturating_add(more) > cap {
            return Err(WireError::LimitExceeded(format!(
                "uid {uid} holds {held} bytes of shared memory; {more} more would pass its cap (broker --max-shm-per-uid {cap})"
            )));
        }
        Ok(())
    }

    /// The client slot and generation of the client on control connection `conn`.
    fn client_of(&self, conn: ConnId) -> Option<(u32, u32)> {
        self.clients.iter().enumerate().find_map(|(i, c)| {
            c.as_ref()
                .filter(|c| c.conn == conn)
                .map(|c| (i as u32, c.gen))
        })
    }

    /// Records that client `slot` opened `instances`. A client grants access to its own
    /// segment only, so it may name instances that have not (re-)registered yet; the set is
    /// capped, dropping grants for instances that no longer exist first.
    fn grant(
        &mut self,
        slot: u32,
        instances: impl IntoIterator<Item = (u32, u64)>,
    ) -> Result<(), WireError> {
        let cap = 2 * self.cfg.max_instances as usize;
        let live: std::collections::HashSet<(u32, u64)> = self
            .instances
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.as_ref().map(|r| (i as u32, r.incarnation)))
            .collect();
        let Some(c) = self.clients[slot as usize].as_mut() else {
            return Ok(());
        };
        for g in instances {
            if c.grants.len() >= cap {
                c.grants.retain(|g| live.contains(g));
                if c.grants.len() >= cap {
                    return Err(WireError::LimitExceeded(format!(
                        "a client may have opened at most {cap} instances (2 x broker --max-instances)"
                    )));
                }
            }
            c.grants.insert(g);
        }
        Ok(())
    }

    /// After a broker restart: a resuming client names the instances it had opened.
    /// Only instances of services the policy lets this peer call count (a grant makes its
    /// unhealthy reports and its caller statistics count).
    pub fn grant_request(&mut self, conn: ConnId, peer: Peer, instances: Vec<(u32, u64)>) -> Reply {
        let Some((slot, _)) = self.client_of(conn) else {
            return err(WireError::BadRequest("Grant before Hello".into()));
        };
        let permitted: Vec<(u32, u64)> = instances
            .into_iter()
            .filter(|&(i, _)| {
                let name = self
                    .instances
                    .get(i as usize)
                    .and_then(Option::as_ref)
                    .and_then(|r| self.services[r.service as usize].as_ref())
                    .map(|s| s.name.as_str());
                // An instance not (yet) back after the restart: kept, checked when used.
                name.is_none_or(|n| {
                    self.permit(conn, peer, n, crate::policy::Action::Call)
                        .is_ok()
                })
            })
            .collect();
        match self.grant(slot, permitted) {
            Ok(()) => (Response::Done, Vec::new()),
            Err(e) => err(e),
        }
    }

    /// Whether the client on `conn` opened instance `(index, incarnation)` and its peer may
    /// call its service; if so, and its last report counted long enough ago, its report
    /// counts now (see [`REPORT_INTERVAL`]).
    pub(crate) fn may_report(
        &mut self,
        conn: ConnId,
        peer: Peer,
        index: u32,
        incarnation: u64,
    ) -> Result<(), WireError> {
        let Some((slot, _)) = self.client_of(conn) else {
            return Err(WireError::BadRequest("ReportUnhealthy before Hello".into()));
        };
        // The policy as it is now: a grant kept across a restart for an instance that was
        // not back yet was never checked against it.
        let service = self
            .instances
            .get(index as usize)
            .and_then(Option::as_ref)
            .and_then(|r| self.services[r.service as usize].as_ref())
            .map(|s| s.name.clone());
        if let Some(name) = service {
            self.permit(conn, peer, &name, crate::policy::Action::Call)?;
        }
        let c = self.clients[slot as usize]
            .as_mut()
            .expect("client_of found it");
        if !c.grants.contains(&(index, incarnation)) {
            return Err(WireError::NotOwner(format!(
                "only a caller of instance #{index} may report it unhealthy"
            )));
        }
        let now = std::time::Instant::now();
        if c.last_report
            .is_some_and(|t| now.duration_since(t) < REPORT_INTERVAL)
        {
            return Err(WireError::LimitExceeded(format!(
                "at most one unhealthy report per {} ms per caller",
                REPORT_INTERVAL.as_millis()
            )));
        }
        c.last_report = Some(now);
        Ok(())
    }

    pub fn services_info(&self) -> Vec<ServiceInfo> {
        let mut v: Vec<_> = self
            .by_name
            .values()
            .map(|&i| self.service_info(i))
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn describe(&self, name: &str) -> Reply {
        match self.by_name.get(name) {
            Some(&i) => (Response::Service(self.service_info(i)), Vec::new()),
            None => err(WireError::NoAvailableInstance {
                service: name.into(),
            }),
        }
    }

    fn service_info(&self, i: u32) -> ServiceInfo {
        let s = self.services[i as usize].as_ref().unwrap();
        ServiceInfo {
            name: s.name.clone(),
            slot_size: s.slot_size,
            slot_count: s.slot_count,
            max_message: s.max_message,
            circuit_breaker: self.breakers.get(i as usize).copied().unwrap_or_default(),
            instances: s
                .members
                .iter()
                .filter_map(|&m| {
                    let r = self.instances[m as usize].as_ref()?;
                    let queued = crate::liveness::queued(r);
                    Some(InstanceInfo {
                        index: m,
                        id: r.id.clone(),
                        pid: r.peer.pid,
                        uid: r.peer.uid,
                        status: r.live.status,
                        requests_served: r
                            .seg
                            .counters()
                            .requests_served
                            .load(std::sync::atomic::Ordering::Relaxed),
                        requests_failed: r
                            .seg
                            .counters()
                            .requests_failed
                            .load(std::sync::atomic::Ordering::Relaxed),
                        queued,
                        registered_at_ms: r.registered_at_ms,
                        metadata: r.metadata.clone(),
                        durations: r.seg.durations().snapshot().0.to_vec(),
                    })
                })
                .collect(),
        }
    }

    /// A control connection closed: its registrations and its client segment go with it.
    /// A new connection's peer groups (see `conn_groups`).
    pub fn connected(&mut self, conn: ConnId, groups: Vec<u32>) {
        self.conn_groups.insert(conn, groups);
    }

    /// Whether the policy lets the peer on `conn` `action` `service`.
    pub(crate) fn permit(
        &self,
        conn: ConnId,
        peer: Peer,
        service: &str,
        action: crate::policy::Action,
    ) -> Result<(), WireError> {
        let primary = [peer.gid];
        let gids = self.conn_groups.get(&conn).map_or(&primary[..], |g| &g[..]);
        let who = crate::policy::Who {
            uid: peer.uid,
            gids,
            admin: self.is_admin(peer) || gids.iter().any(|g| self.cfg.admin_gids.contains(g)),
        };
        let broker_uid = nix::unistd::geteuid().as_raw();
        crate::policy::check(&self.cfg.policy, broker_uid, service, action, &who)
            .map_err(WireError::PermissionDenied)
    }

    pub fn disconnect(&mut self, conn: ConnId) {
        // A departing caller's counts are kept (judged while its groups are still known).
        if let Some((slot, _)) = self.client_of(conn) {
            let c = self.clients[slot as usize]
                .as_ref()
                .expect("client_of found it");
            let counted = crate::metrics::counted_totals(self, c);
            self.metrics.retire_caller(counted);
        }
        self.channel_news.remove(&conn);
        self.conn_groups.remove(&conn);
        if let Some((slot, _)) = self.client_of(conn) {
            let ids: Vec<u64> = self.clients[slot as usize]
                .as_ref()
                .map(|c| c.channels.values().copied().collect())
                .unwrap_or_default();
            for id in ids {
                self.close_channel(id);
            }
        }
        let mut gone = Vec::new();
        for (i, r) in self.instances.iter_mut().enumerate() {
            if let Some(r) = r {
                r.owners.retain(|&c| c != conn);
                if r.owners.is_empty() {
                    gone.push(i as u32);
                }
            }
        }
        for i in gone {
            self.remove_instance(i, "control connection closed");
        }
        for c in self.clients.iter_mut() {
            if let Some(rec) = c.as_ref().filter(|c| c.conn == conn) {
                for token in rec.previous_channels.keys() {
                    self.previous_tokens.remove(token);
                }
                // Its counts stayed in the totals (retired above).
                *c = None;
            }
        }
    }

    pub(crate) fn remove_instance(&mut self, index: u32, reason: &str) {
        // Every departure is a transition to Offline (history, metrics), however noticed.
        if self.instances[index as usize]
            .as_ref()
            .is_some_and(|r| r.live.status != Status::Offline)
        {
            self.set_status(index, Status::Offline, reason);
        }
        let ids: Vec<u64> = self.instances[index as usize]
            .as_ref()
            .map(|r| r.channels.keys().copied().collect())
            .unwrap_or_default();
        for id in ids {
            self.close_channel(id);
        }
        let Some(rec) = self.instances[index as usize].take() else {
            return;
        };
        // Its resources go with it, before routing forgets the instance.
        self.release_all(&rec.owned, reason);
        self.metrics.healthcheck.remove(&rec.id);
        self.record_departure(&rec, reason);
        let e = self.registry.instance(index).expect("index in range");
        let s = e.seq.write_begin();
        e.status
            .store(Status::Free as u32, std::sync::atomic::Ordering::Relaxed);
        e.incarnation.store(0, std::sync::atomic::Ordering::Relaxed);
        e.seq.write_end(s);
        if let Some(svc) = self.services[rec.service as usize].as_mut() {
            svc.members.retain(|&m| m != index);
        }
        self.write_service(rec.service);
        tracing::info!(instance = %rec.id, pid = rec.peer.pid, index, reason, "instance left");
    }

    /// Periodic work: expire resources, mirror per-instance counters into the registry.
    /// Journals resources in `dir` from now on, restoring what a previous run left.
    pub fn open_journal(&mut self, dir: &std::path::Path) -> Result<(), String> {
        let window = std::time::Duration::from_millis(self.cfg.journal_recovery_ms);
        self.journal = Some(crate::journal::Journal::open_with(dir, window)?);
        Ok(())
    }

    /// Writes what the last request journaled (before its response goes out).
    pub fn flush_journal(&mut self) {
        if let Some(j) = self.journal.as_mut() {
            j.flush();
        }
    }

    /// (services, instances, connected processes) right now.
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.services.iter().flatten().count(),
            self.instances.iter().flatten().count(),
            self.clients.iter().flatten().count(),
        )
    }

    /// Sums the callers' circuit breakers per service; a change is logged and wakes
    /// registry watchers (`aegisctl monitor` shows it).
    fn watch_breakers(&mut self) {
        let now = crate::metrics::breaker_counts(self);
        let mut moved = false;
        for (i, svc) in self.services.iter().enumerate() {
            let Some(svc) = svc else { continue };
            let (old, new) = (self.breakers.get(i).copied().unwrap_or_default(), now[i]);
            // Callers coming and going change only `closed`: not an event.
            if (old.open, old.half_open) != (new.open, new.half_open) {
                moved = true;
                tracing::info!(service = %svc.name, open = new.open, half_open = new.half_open,
                    closed = new.closed, "circuit breakers of the service's callers changed");
            }
        }
        self.breakers = now;
        if moved {
            self.changed();
        }
    }

    pub fn tick(&mut self) {
        self.expire_resources();
        let live = self.journal_entries_len();
        if self
            .journal
            .as_mut()
            .is_some_and(|j| j.wants_compaction(live))
        {
            let entries = self.journal_entries();
            if let Some(Err(e)) = self
                .journal
                .as_mut()
                .map(|j| j.compact(entries.into_iter()))
            {
                tracing::error!("resource journal: compaction failed: {e}");
            }
        }
        self.flush_journal();
        self.check_liveness();
        self.watch_breakers();
        for i in 0..self.instances.len() {
            let Some(r) = self.instances[i].as_mut() else {
                continue;
            };
            let served = r
                .seg
                .counters()
                .requests_served
                .load(std::sync::atomic::Ordering::Relaxed);
            if served != r.mirrored_served {
                r.mirrored_served = served;
                let e = self.registry.instance(i as u32).unwrap();
                let s = e.seq.write_begin();
                e.requests_served
                    .store(served, std::sync::atomic::Ordering::Relaxed);
                e.seq.write_end(s);
            }
        }
    }

    fn write_instance(&self, index: u32) {
        use std::sync::atomic::Ordering::Relaxed;
        let r = self.instances[index as usize].as_ref().unwrap();
        let e = self.registry.instance(index).unwrap();
        let s = e.seq.write_begin();
        e.status.store(Status::Online as u32, Relaxed);
        e.service.store(r.service, Relaxed);
        e.pid.store(r.peer.pid, Relaxed);
        e.uid.store(r.peer.uid, Relaxed);
        let remote = r
            .metadata
            .iter()
            .any(|(k, _)| k == layout::REMOTE_METADATA_KEY);
        e.flags
            .store(if remote { layout::INSTANCE_REMOTE } else { 0 }, Relaxed);
        e.incarnation.store(r.incarnation, Relaxed);
        e.registered_at_ms.store(r.registered_at_ms, Relaxed);
        e.requests_served.store(0, Relaxed);
        e.id.store(&r.id);
        e.seq.write_end(s);
    }

    pub(crate) fn write_service(&self, i: u32) {
        use std::sync::atomic::Ordering::{Relaxed, Release};
        let rec = self.services[i as usize].as_ref().unwrap();
        let e = self.registry.service(i).unwrap();
        let s = e.seq.write_begin();
        e.name.store(&rec.name);
        e.slot_size.store(rec.slot_size, Relaxed);
        e.slot_count.store(rec.slot_count, Relaxed);
        e.max_message.store(rec.max_message, Relaxed);
        for (slot, &m) in e.members.iter().zip(&rec.members) {
            slot.store(m, Relaxed);
        }
        e.member_count.store(rec.members.len() as u32, Relaxed);
        e.seq.write_end(s);
        // SYNC POINT: Release pairs with the Acquire load of `in_use` in lookups.
        e.in_use.store(1, Release);
        e.generation.fetch_add(1, Release);
        let _ = sys::futex_wake(&e.generation, u32::MAX);
        self.changed();
    }
}

fn random_u64() -> u64 {
    sys::random_u64()
}

/// Checks a reply heap handed over for an instance whose heaps are `heap_size` bytes:
/// sealed against every writer but its maker and against resizing, of a heap's size. Its
/// bytes, or why not.
fn check_reply_heap(fd: &OwnedFd, heap_size: u64) -> Result<u64, String> {
    check_heap(fd, "reply heap", heap_size)
}

/// A request heap handed over (`ChannelHeap`, `PreviousRequestHeap`): as a reply heap, of
/// twice the bus's largest message.
fn check_request_heap(fd: &OwnedFd, max_message: u64) -> Result<u64, String> {
    check_heap(fd, "request heap", 2 * max_message)
}

/// Sealed against every other writer and against resizing, `heap_size` bytes of heap: the
/// segment's size, or why not.
fn check_heap(fd: &OwnedFd, what: &str, heap_size: u64) -> Result<u64, String> {
    if let Err(e) = sys::check_write_sealed(fd) {
        return Err(format!(
            "seal the {what} against other writers (F_SEAL_FUTURE_WRITE) before handing it over: {e}"
        ));
    }
    let size = layout::ChannelHeap::seg_size(heap_size) as u64;
    if let Err(e) = sys::check_size_sealed(fd, Some(size)) {
        return Err(format!("{what}: {e}"));
    }
    Ok(size)
}

#[cfg(test)]
impl State {
    /// Registers instance `id` of service `svc` (256-byte slots, 2 of them, 1 KiB
    /// messages) for connection `conn`, as unit tests need one: its (index, incarnation).
    pub(crate) fn register_small(&mut self, conn: ConnId, peer: Peer, id: &str) -> (u32, u64) {
        let small = ServiceConfig {
            slot_size: Some(256),
            slot_count: Some(2),
            max_message: Some(1024),
        };
        let reg = Registration {
            service: "svc",
            id,
            metadata: Vec::new(),
            config: &small,
            heartbeat: Default::default(),
            adopt: None,
            own: Some(InstanceSeg::create_own(0, 2048).unwrap().0),
        };
        match self.register(conn, peer, reg).0 {
            Response::Registered {
                instance,
                incarnation,
                ..
            } => (instance, incarnation),
            r => panic!("{r:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// The client's index, generation, and its client segment.
    fn welcome(r: Reply) -> (u32, u32, OwnedFd) {
        match r {
            // The client segment is the third descriptor (the caller segment follows).
            (Response::Welcome { client, gen, .. }, fds) => {
                (client, gen, fds.into_iter().nth(2).unwrap())
            }
            (other, _) => panic!("expected Welcome, got {other:?}"),
        }
    }

    /// The serving connection of [`serving_state`].
    const SERVER: ConnId = 1;

    /// A broker state with `max_clients` client slots and one small instance registered by
    /// connection [`SERVER`] (this process, root): the state, its peer, the instance.
    fn serving_state(max_clients: &str) -> (State, Peer, (u32, u64)) {
        let peer = Peer {
            pid: std::process::id(),
            uid: 0,
            gid: 0,
        };
        let cfg = crate::BrokerConfig::parse_from(["aegis-broker", "--max-clients", max_clients]);
        let mut st = State::new(cfg, Identities::starting_at(1, 1)).unwrap();
        welcome(st.hello(SERVER, peer, 1, None, 1));
        let inst = st.register_small(SERVER, peer, "i");
        (st, peer, inst)
    }

    /// A serving connection is told of a caller's channel once, with the descriptors, and
    /// of its closing; a caller that came and went before the instance asked leaves no
    /// news at all (an instance that never asks holds news of live channels only).
    #[test]
    fn channel_news_tell_each_channel_once_and_forget_those_closed_unfetched() {
        let (mut st, peer, (index, incarnation)) = serving_state("8");
        let open = |st: &mut State, conn: ConnId| {
            welcome(st.hello(conn, peer, 1, None, conn));
            match st.open_instance(conn, peer, index, incarnation) {
                (Response::OpenedInstances(ids), fds) => {
                    assert_eq!((ids.len(), fds.len()), (1, 4));
                }
                (r, _) => panic!("{r:?}"),
            }
        };
        // A caller that leaves before the instance asks: no news of it.
        open(&mut st, 2);
        st.disconnect(2);
        // One that stays: told once, with its client segment and channel.
        open(&mut st, 3);
        let id = match st.channels_request(SERVER) {
            (
                Response::Channels {
                    channels,
                    heaps,
                    gone,
                    more,
                },
                fds,
            ) => {
                assert_eq!(channels.len(), 1, "{channels:?}");
                assert_eq!(channels[0].instance, (index, incarnation));
                assert!(gone.is_empty() && heaps.is_empty() && !more, "{gone:?}");
                assert_eq!(
                    fds.len(),
                    2,
                    "the request side and the reply side, nothing of the client's"
                );
                channels[0].id
            }
            (r, _) => panic!("{r:?}"),
        };
        match st.channels_request(SERVER) {
            (Response::Channels { channels, gone, .. }, _) => {
                assert!(channels.is_empty() && gone.is_empty());
            }
            (r, _) => panic!("{r:?}"),
        }
        // Its request heap, once handed over, is told once too: only sealed against other
        // writers, of the right size, for a channel of the caller's own, and only once.
        let heap_size = 2 * st.cfg.max_message;
        let refused = |r: Reply, why: &str| match r {
            (Response::Error(WireError::BadRequest(m)), _) => assert!(m.contains(why), "{m}"),
            (r, _) => panic!("expected a refusal naming {why:?}, got {r:?}"),
        };
        let total = layout::ChannelHeap::seg_size(heap_size) as u64;
        let unsealed = sys::memfd("aegis-heap", total).unwrap();
        sys::seal_size(&unsealed).unwrap();
        refused(
            st.channel_heap(3, id, Some(unsealed)),
            "F_SEAL_FUTURE_WRITE",
        );
        let small = layout::ChannelHeap::create(st.epoch, 4096, id, layout::HeapSide::Request)
            .unwrap()
            .0;
        refused(st.channel_heap(3, id, Some(small)), "bytes");
        let (fd, _mine) =
            layout::ChannelHeap::create(st.epoch, heap_size, id, layout::HeapSide::Request)
                .unwrap();
        refused(
            st.channel_heap(SERVER, id, Some(fd.try_clone().unwrap())),
            "not one of yours",
        );
        refused(st.channel_heap(3, id, None), "descriptor");
        let held = |st: &State| {
            let c = st.client_of(3).unwrap();
            st.clients[c.0 as usize].as_ref().unwrap().size
        };
        let (before, chan_size) = (held(&st), st.channels[&id].size);
        assert!(matches!(
            st.channel_heap(3, id, Some(fd.try_clone().unwrap())),
            (Response::Done, _)
        ));
        // Counted to the caller's quota, and given back with the channel.
        assert_eq!(held(&st), before + total);
        assert_eq!(st.channels[&id].size, chan_size + total);
        refused(st.channel_heap(3, id, Some(fd)), "already");
        match st.channels_request(SERVER) {
            (
                Response::Channels {
                    channels, heaps, ..
                },
                fds,
            ) => {
                assert!(channels.is_empty());
                assert_eq!((heaps, fds.len()), (vec![id], 1));
                assert!(layout::ChannelHeap::open(
                    &fds[0],
                    st.epoch,
                    id,
                    layout::HeapSide::Request
                )
                .is_ok());
            }
            (r, _) => panic!("{r:?}"),
        }
        match st.channels_request(SERVER) {
            (Response::Channels { heaps, .. }, _) => assert!(heaps.is_empty()),
            (r, _) => panic!("{r:?}"),
        }
        // Its reply heap: handed over only by a serving connection of the channel's
        // instance, sealed, of the service's heap size, once; charged to the caller, and
        // handed to the caller alone.
        let reply_size = st.instances[index as usize]
            .as_ref()
            .unwrap()
            .seg
            .layout
            .heap_size;
        let reply_total = layout::ChannelHeap::seg_size(reply_size) as u64;
        let open_refused = |r: Reply, why: &str| refused(r, why);
        open_refused(st.open_reply_heap(3, id, None), "has no reply heap");
        let (rfd, _theirs) =
            layout::ChannelHeap::create(st.epoch, reply_size, id, layout::HeapSide::Reply).unwrap();
        refused(
            st.reply_heap(3, id, None, Some(rfd.try_clone().unwrap())),
            "not one of your instances'",
        );
        refused(st.reply_heap(SERVER, id + 1000, None, None), "descriptor");
        refused(
            st.reply_heap(SERVER, id + 1000, None, Some(rfd.try_clone().unwrap())),
            "not one of your instances'",
        );
        let unsealed = sys::memfd("aegis-reply-heap", reply_total).unwrap();
        sys::seal_size(&unsealed).unwrap();
        refused(
            st.reply_heap(SERVER, id, None, Some(unsealed)),
            "F_SEAL_FUTURE_WRITE",
        );
        let other =
            layout::ChannelHeap::create(st.epoch, reply_size + 8192, id, layout::HeapSide::Reply)
                .unwrap()
                .0;
        refused(st.reply_heap(SERVER, id, None, Some(other)), "bytes");
        let before = held(&st);
        assert!(matches!(
            st.reply_heap(SERVER, id, None, Some(rfd.try_clone().unwrap())),
            (Response::Done, _)
        ));
        assert_eq!(held(&st), before + reply_total, "charged to the caller");
        refused(st.reply_heap(SERVER, id, None, Some(rfd)), "already");
        open_refused(st.open_reply_heap(SERVER, id, None), "not one of yours");
        match st.open_reply_heap(3, id, None) {
            (Response::Opened, fds) => {
                assert_eq!(fds.len(), 1);
                let h = layout::ChannelHeap::open(&fds[0], st.epoch, id, layout::HeapSide::Reply)
                    .unwrap();
                assert_eq!(h.size, reply_size);
            }
            (r, _) => panic!("{r:?}"),
        }
        // When it leaves, its closing is told.
        st.disconnect(3);
        match st.channels_request(SERVER) {
            (Response::Channels { channels, gone, .. }, _) => {
                assert!(channels.is_empty());
                assert_eq!(gone.len(), 1);
            }
            (r, _) => panic!("{r:?}"),
        }
    }

    /// An instance that answers through a new reply heap and then leaves closes the
    /// channel before its caller fetched the heap: the broker keeps it for the caller
    /// (counted to its quota) and hands it over once, so the last large reply is read.
    #[test]
    fn a_reply_heap_outlives_its_channel_until_its_caller_fetched_it() {
        let (mut st, peer, (index, incarnation)) = serving_state("8");
        welcome(st.hello(3, peer, 1, None, 3));
        let held = |st: &State| {
            let c = st.client_of(3).unwrap();
            st.clients[c.0 as usize].as_ref().unwrap().size
        };
        let base = held(&st);
        assert!(matches!(
            st.open_instance(3, peer, index, incarnation),
            (Response::OpenedInstances(_), _)
        ));
        let id = match st.channels_request(SERVER) {
            (Response::Channels { channels, .. }, _) => channels[0].id,
            (r, _) => panic!("{r:?}"),
        };
        let size = st.instances[index as usize]
            .as_ref()
            .unwrap()
            .seg
            .layout
            .heap_size;
        let (fd, _mine) =
            layout::ChannelHeap::create(st.epoch, size, id, layout::HeapSide::Reply).unwrap();
        assert!(matches!(
            st.reply_heap(SERVER, id, None, Some(fd)),
            (Response::Done, _)
        ));
        // The instance answers, then leaves: its channels close.
        st.disconnect(SERVER);
        assert!(!st.channels.contains_key(&id));
        let total = layout::ChannelHeap::seg_size(size) as u64;
        assert_eq!(held(&st), base + total, "the kept heap is still counted");
        match st.open_reply_heap(3, id, None) {
            (Response::Opened, fds) => {
                assert_eq!(fds.len(), 1);
                layout::ChannelHeap::open(&fds[0], st.epoch, id, layout::HeapSide::Reply).unwrap();
            }
            (r, _) => panic!("{r:?}"),
        }
        assert_eq!(held(&st), base);
        match st.open_reply_heap(3, id, None) {
            (Response::Error(WireError::BadRequest(m)), _) => {
                assert!(m.contains("not one of yours"), "{m}")
            }
            (r, _) => panic!("handed twice: {r:?}"),
        }
    }

    /// A serving state (one instance, served by `SERVER`), two caller clients (connections
    /// 3 and 4), and client 3's claim, not yet sent, of channel `old_id` of a previous broker
    /// leading to that instance under `token`.
    fn two_callers_and_a_claim(
        old_id: u64,
        token: [u64; 2],
    ) -> (State, (u32, u64), PreviousChannel) {
        let (mut st, peer, (index, incarnation)) = serving_state("8");
        welcome(st.hello(3, peer, 1, None, 3));
        welcome(st.hello(4, peer, 1, None, 4));
        let claim = PreviousChannel {
            instance: index,
            incarnation,
            channel: old_id,
            token,
        };
        (st, (index, incarnation), claim)
    }

    /// The shared memory counted to the client on `conn`.
    fn held(st: &State, conn: ConnId) -> u64 {
        let c = st.client_of(conn).unwrap();
        st.clients[c.0 as usize].as_ref().unwrap().size
    }

    fn not_yet(r: Reply, why: &str) {
        match r {
            (Response::Error(WireError::NotOwner(m)), _) => assert!(m.contains(why), "{m}"),
            (r, _) => panic!("expected NotOwner naming {why:?}, got {r:?}"),
        }
    }

    fn refused(r: Reply, why: &str) {
        match r {
            (Response::Error(WireError::BadRequest(m)), _) => assert!(m.contains(why), "{m}"),
            (r, _) => panic!("expected a refusal naming {why:?}, got {r:?}"),
        }
    }

    /// After a restart, a channel a previous broker made gets a reply heap only through a
    /// match of its token: claimed by its caller, handed over by a serving connection of
    /// the instance the claim names, once; charged to the claiming client until it
    /// leaves; handed to that client alone. Before the claim (or from a connection that
    /// has not registered that instance) the handover is `NotOwner`, which the instance
    /// waits out; a token another client claimed first stays that client's.
    #[test]
    fn a_previous_broker_s_channel_gets_a_reply_heap_by_its_token() {
        let (mut st, (index, _), claim) = two_callers_and_a_claim(77, [0x1234, 0x5678]);
        let (old_id, token) = (claim.channel, claim.token);
        let heap_size = st.instances[index as usize]
            .as_ref()
            .unwrap()
            .seg
            .layout
            .heap_size;
        let total = layout::ChannelHeap::seg_size(heap_size) as u64;
        let old_epoch = st.epoch ^ 1;
        let heap = || {
            layout::ChannelHeap::create(old_epoch, heap_size, old_id, layout::HeapSide::Reply)
                .unwrap()
        };
        let (fd, _mine) = heap();
        not_yet(
            st.reply_heap(SERVER, old_id, Some(token), Some(fd.try_clone().unwrap())),
            "not been claimed",
        );
        refused(
            st.claim_channels(
                3,
                vec![PreviousChannel {
                    token: [0, 0],
                    ..claim
                }],
            ),
            "no token",
        );
        assert!(matches!(
            st.claim_channels(3, vec![claim]),
            (Response::Done, _)
        ));
        // Claimed first by client 3: client 4's claim of the same token changes nothing.
        assert!(matches!(
            st.claim_channels(4, vec![claim]),
            (Response::Done, _)
        ));
        // A claim naming an instance index past the registry (the caller's word) is
        // looked up, not indexed: refused like any other instance's.
        let wild = [0x9999, 0x9999];
        assert!(matches!(
            st.claim_channels(
                3,
                vec![PreviousChannel {
                    instance: u32::MAX,
                    token: wild,
                    ..claim
                }]
            ),
            (Response::Done, _)
        ));
        not_yet(
            st.reply_heap(SERVER, old_id, Some(wild), Some(fd.try_clone().unwrap())),
            "not (yet) registered by this connection",
        );
        // Only a serving connection of the named instance; the right channel id; sealed.
        not_yet(
            st.reply_heap(4, old_id, Some(token), Some(fd.try_clone().unwrap())),
            "not (yet) registered by this connection",
        );
        not_yet(
            st.reply_heap(
                SERVER,
                old_id + 1,
                Some(token),
                Some(fd.try_clone().unwrap()),
            ),
            "not been claimed",
        );
        let unsealed = sys::memfd("aegis-reply-heap", total).unwrap();
        sys::seal_size(&unsealed).unwrap();
        refused(
            st.reply_heap(SERVER, old_id, Some(token), Some(unsealed)),
            "F_SEAL_FUTURE_WRITE",
        );
        not_yet(
            st.open_reply_heap(3, old_id, Some(token)),
            "has no reply heap here (yet)",
        );
        let before = held(&st, 3);
        assert!(matches!(
            st.reply_heap(SERVER, old_id, Some(token), Some(fd.try_clone().unwrap())),
            (Response::Done, _)
        ));
        assert_eq!(
            held(&st, 3),
            before + total,
            "charged to the claiming caller"
        );
        refused(
            st.reply_heap(SERVER, old_id, Some(token), Some(fd)),
            "already",
        );
        refused(
            st.open_reply_heap(4, old_id, Some(token)),
            "not one you claimed",
        );
        refused(
            st.open_reply_heap(3, old_id, Some([1, 2])),
            "not one you claimed",
        );
        match st.open_reply_heap(3, old_id, Some(token)) {
            (Response::Opened, fds) => {
                assert_eq!(fds.len(), 1);
                let h =
                    layout::ChannelHeap::open(&fds[0], old_epoch, old_id, layout::HeapSide::Reply)
                        .unwrap();
                assert_eq!(h.size, heap_size);
            }
            (r, _) => panic!("{r:?}"),
        }
        // The claim goes with its client: the token is free again.
        st.disconnect(3);
        assert!(st.previous_tokens.is_empty());
        let (fd, _mine) = heap();
        not_yet(
            st.reply_heap(SERVER, old_id, Some(token), Some(fd)),
            "not been claimed",
        );
    }

    /// A previous broker's channel's request heap, handed over again by its caller
    /// (`PreviousRequestHeap`) and fetched by its instance (`OpenRequestHeap`): only by
    /// the client that claimed the channel, sealed, of the bus's size, once, charged to
    /// that client; only to a serving connection of the instance the claim names, with
    /// the right id and token; `NotOwner` until then.
    #[test]
    fn a_previous_broker_s_channel_gets_its_request_heap_again_by_its_token() {
        let (mut st, _, claim) = two_callers_and_a_claim(78, [0x4321, 0x8765]);
        let (old_id, token) = (claim.channel, claim.token);
        let size = 2 * st.cfg.max_message;
        let total = layout::ChannelHeap::seg_size(size) as u64;
        let old_epoch = st.epoch ^ 1;
        let (fd, _mine) =
            layout::ChannelHeap::create(old_epoch, size, old_id, layout::HeapSide::Request)
                .unwrap();
        not_yet(
            st.open_request_heap(SERVER, old_id, token),
            "not been claimed",
        );
        refused(
            st.previous_request_heap(3, token, Some(fd.try_clone().unwrap())),
            "no channel you claimed",
        );
        assert!(matches!(
            st.claim_channels(3, vec![claim]),
            (Response::Done, _)
        ));
        not_yet(
            st.open_request_heap(SERVER, old_id, token),
            "no request heap here (yet)",
        );
        // Another client's claim of the token was ignored: it cannot hand a heap there.
        assert!(matches!(
            st.claim_channels(4, vec![claim]),
            (Response::Done, _)
        ));
        refused(
            st.previous_request_heap(4, token, Some(fd.try_clone().unwrap())),
            "no channel you claimed",
        );
        let unsealed = sys::memfd("aegis-heap", total).unwrap();
        sys::seal_size(&unsealed).unwrap();
        refused(
            st.previous_request_heap(3, token, Some(unsealed)),
            "F_SEAL_FUTURE_WRITE",
        );
        let before = held(&st, 3);
        assert!(matches!(
            st.previous_request_heap(3, token, Some(fd.try_clone().unwrap())),
            (Response::Done, _)
        ));
        assert_eq!(
            held(&st, 3),
            before + total,
            "charged to the claiming caller"
        );
        refused(st.previous_request_heap(3, token, Some(fd)), "already");
        // Only the named instance's serving connection, the right id and token.
        not_yet(
            st.open_request_heap(4, old_id, token),
            "not (yet) registered by this connection",
        );
        not_yet(
            st.open_request_heap(SERVER, old_id + 1, token),
            "not been claimed",
        );
        not_yet(
            st.open_request_heap(SERVER, old_id, [1, 2]),
            "not been claimed",
        );
        match st.open_request_heap(SERVER, old_id, token) {
            (Response::Opened, fds) => {
                assert_eq!(fds.len(), 1);
                let h = layout::ChannelHeap::open(
                    &fds[0],
                    old_epoch,
                    old_id,
                    layout::HeapSide::Request,
                )
                .unwrap();
                assert_eq!(h.size, size);
            }
            (r, _) => panic!("{r:?}"),
        }
        // The claim goes with its client, and the heap with it.
        st.disconnect(3);
        not_yet(
            st.open_request_heap(SERVER, old_id, token),
            "not been claimed",
        );
    }

    /// A channel's token: 128 bits of the request side, different for every channel.
    #[test]
    fn every_channel_has_its_own_token() {
        let (mut st, peer, (index, incarnation)) = serving_state("8");
        let mut tokens = std::collections::HashSet::new();
        for conn in 3..6 {
            welcome(st.hello(conn, peer, 1, None, conn));
            let fds = match st.open_instance(conn, peer, index, incarnation) {
                (Response::OpenedInstances(_), fds) => fds,
                (r, _) => panic!("{r:?}"),
            };
            let seg =
                ChannelSeg::open(&fds[2], &fds[3], st.epoch, None, layout::Party::Caller).unwrap();
            assert_ne!(seg.token(), [0, 0]);
            assert!(tokens.insert(seg.token()), "a token repeated");
        }
    }

    /// Channel news comes in batches of at most `OPEN_BATCH / 2` channels (two descriptors
    /// each) and `OPEN_BATCH` heaps (one each), within what a client accepts with one
    /// response, `more` saying there is more.
    #[test]
    fn channel_news_come_in_batches() {
        let (mut st, peer, (index, incarnation)) = serving_state("64");
        let n = proto::OPEN_BATCH + 1;
        let callers: Vec<ConnId> = (2..2 + n as ConnId).collect();
        for &conn in &callers {
            welcome(st.hello(conn, peer, 1, None, conn));
            assert!(matches!(
                st.open_instance(conn, peer, index, incarnation),
                (Response::OpenedInstances(_), _)
            ));
        }
        // Bounded: a batch of none with `more` set would ask forever.
        let fetch = |st: &mut State| {
            let mut batches = Vec::new();
            let mut ids = Vec::new();
            for _ in 0..6 {
                match st.channels_request(SERVER) {
                    (
                        Response::Channels {
                            channels,
                            heaps,
                            more,
                            ..
                        },
                        fds,
                    ) => {
                        assert_eq!(fds.len(), 2 * channels.len() + heaps.len());
                        assert!(fds.len() <= proto::MAX_RESPONSE_FDS);
                        batches.push((channels.len(), heaps.len()));
                        ids.extend(channels.iter().map(|c| c.id));
                        if !more {
                            break;
                        }
                    }
                    (r, _) => panic!("{r:?}"),
                }
            }
            (batches, ids)
        };
        let half = proto::OPEN_BATCH / 2;
        let (batches, ids) = fetch(&mut st);
        assert_eq!(batches, [(half, 0), (half, 0), (1, 0)]);
        // Every caller hands over its channel's heap.
        let size = 2 * st.cfg.max_message;
        for (&conn, &id) in callers.iter().zip(&ids) {
            let (fd, _) =
                layout::ChannelHeap::create(st.epoch, size, id, layout::HeapSide::Request).unwrap();
            assert!(matches!(
                st.channel_heap(conn, id, Some(fd)),
                (Response::Done, _)
            ));
        }
        let (batches, _) = fetch(&mut st);
        assert_eq!(batches, [(0, proto::OPEN_BATCH), (0, 1)]);
    }

    /// After a restart a fresh client can take the slot a resuming one had: the resuming
    /// one moves to another slot, and the fresh one gets a generation the previous run
    /// never handed out.
    #[test]
    fn a_client_that_resumes_finds_its_slot_taken_and_moves() {
        const ME: Peer = Peer {
            pid: 1,
            uid: 0,
            gid: 0,
        };
        let dir = tempfile::tempdir().unwrap();
        let cfg = || crate::BrokerConfig::parse_from(["aegis-broker", "--max-clients", "4"]);
        let mut first = State::new(cfg(), Identities::load(dir.path()).unwrap()).unwrap();
        let (index, gen, seg) = welcome(first.hello(1, ME, 8, None, 7));
        drop(first);

        let mut second = State::new(cfg(), Identities::load(dir.path()).unwrap()).unwrap();
        let (fresh_index, fresh_gen, _) = welcome(second.hello(1, ME, 8, None, 7));
        assert_eq!(
            fresh_index, index,
            "the fresh client takes the lowest free slot"
        );
        assert_ne!(
            fresh_gen, gen,
            "a generation of the previous run was handed out again"
        );
        let (moved, moved_gen, _) = welcome(second.hello(2, ME, 8, Some(((index, gen), seg)), 7));
        assert_ne!(moved, index);
        assert_ne!(moved_gen, fresh_gen);
    }
}
