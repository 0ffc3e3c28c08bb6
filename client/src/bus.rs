//! `Bus`: a process's connection to the bus — calling services by name.
//!
//! A call never passes through the broker: the caller picks an instance from the
//! registry (lock-free), writes the request into that instance's ring, and waits on one
//! of its own mailboxes for the reply. The broker is asked only once per instance (to
//! hand over its segment) and once per new caller on the instance side.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicPtr;
use std::sync::atomic::{AtomicU32 as StdAtomicU32, AtomicU64 as StdAtomicU64, AtomicUsize};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use parking_lot::{Condvar, Mutex, RwLock};
use serde::{de::DeserializeOwned, Serialize};

use crate::control::{expect_fds, ControlConn};
use crate::error::{code, Attempt, Error, Result};
use crate::heap::HeapAlloc;
use crate::instance::{Instance, RegisterOptions};
use crate::layout::{
    self, ClientSeg, InstanceSeg, MsgHeader, RegistryView, ServiceEntry, SharedView, Status,
    MAX_MEMBERS, PAYLOAD_HEAP, PAYLOAD_INLINE,
};
use crate::mailbox::{self, Cancel, Target, Wait};
use crate::proto::{
    self, BulkOptions, BulkReport, Request, ResourcePage, ResourceQuery, Response, ServiceInfo,
};
use crate::ring::RingRef;
use crate::sync::Ordering;
use crate::wait::{Backoff, Seats, Spin, Waiter};
use crate::{dirs, names};

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
}

impl Default for BusOptions {
    fn default() -> Self {
        BusOptions {
            dir: None,
            mailboxes: layout::DEFAULT_MAILBOXES,
            spin: Spin::Adaptive,
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

/// Default [`CallOptions::stall_bound`]: four liveness checks of a sleeping caller, far
/// below the heartbeat timeout that would otherwise take a stuck instance out of routing.
pub const DEFAULT_STALL_BOUND: Duration = Duration::from_millis(20);

/// Per-call options. Defaults follow the seed: 5 s per attempt, 15 s in all, up to 3
/// instances.
#[derive(Debug, Clone)]
pub struct CallOptions {
    /// Deadline for the whole call, all attempts included.
    pub timeout: Duration,
    /// Deadline for one attempt on one instance.
    pub attempt_timeout: Duration,
    /// Instances to try at most (different ones).
    pub max_attempts: u32,
    /// Whether the request may run twice. A request an instance never took is always
    /// retried elsewhere; one it took but did not answer (it died or hung) only if this is set.
    pub idempotent: bool,
    /// Instance ids not to use.
    pub exclude: Vec<String>,
    pub selection: Selection,
    /// Overrides the bus's spin policy for this call.
    pub spin: Option<Spin>,
    /// Hops so far (set by nested calls made while handling a request: [`CallOptions::nested`]).
    pub hops: u8,
    /// More hops than this is `LoopDetected`.
    pub max_hops: u8,
    /// Trace id carried to the instance; `None` makes a fresh one.
    pub trace_id: Option<u64>,
    /// How long an instance may make no progress while our request waits in its ring,
    /// untaken, before the request is withdrawn and sent to another instance (it never
    /// ran, so this is safe without `idempotent`). Calls from this process then avoid the
    /// instance until it moves again. Calls by resource id wait instead (only the owner
    /// can answer them).
    pub stall_bound: Duration,
}

impl Default for CallOptions {
    fn default() -> Self {
        CallOptions {
            timeout: Duration::from_secs(15),
            attempt_timeout: Duration::from_secs(5),
            max_attempts: 3,
            idempotent: false,
            exclude: Vec::new(),
            selection: Selection::RoundRobin,
            spin: None,
            hops: 0,
            max_hops: 8,
            trace_id: None,
            stall_bound: DEFAULT_STALL_BOUND,
        }
    }
}

impl CallOptions {
    /// One budget for the whole call and for each attempt.
    pub fn timeout(timeout: Duration) -> CallOptions {
        CallOptions {
            timeout,
            attempt_timeout: timeout,
            ..Default::default()
        }
    }

    /// Options for a call made while handling `req`: one more hop, the same trace id.
    pub fn nested(req: &crate::Request<'_>) -> CallOptions {
        CallOptions {
            hops: req.hops().saturating_add(1),
            trace_id: Some(req.trace_id()),
            ..Default::default()
        }
    }
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

/// A reply and who sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub payload: Vec<u8>,
    pub instance_id: String,
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
}

impl Session {
    /// Opens what a broker's `Welcome` hands over: the session, this client's (index, gen),
    /// and the descriptors (registry, shared, client segment).
    pub(crate) fn from_welcome(
        resp: Response,
        fds: Vec<OwnedFd>,
    ) -> Result<(Session, u32, u32, Vec<OwnedFd>)> {
        let Response::Welcome {
            bus_epoch,
            client,
            gen,
            max_services,
            ..
        } = resp
        else {
            return Err(Error::Protocol(format!("expected Welcome, got {resp:?}")));
        };
        let fds = expect_fds(fds, 3, "Welcome")?;
        let registry = RegistryView::open(&fds[0], false)?;
        if registry.epoch != bus_epoch || registry.layout.max_services != max_services {
            return Err(Error::Protocol(
                "registry does not match the broker's Welcome".into(),
            ));
        }
        let shared = SharedView::open(&fds[1], bus_epoch, max_services)?;
        Ok((
            Session {
                registry,
                shared,
                epoch: bus_epoch,
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
        let online = |m: u32| -> Option<CallInfo> {
            let e = self.registry.instance(m)?;
            let (status, service, inc) = e.seq.read(|| {
                (
                    e.status.load(Ordering::Relaxed),
                    e.service.load(Ordering::Relaxed),
                    e.incarnation.load(Ordering::Relaxed),
                )
            });
            (status == Status::Online as u32 && service == svc_idx && inc != 0 && !skip(m))
                .then_some(CallInfo {
                    instance: m,
                    incarnation: inc,
                })
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
                if let Some(c) = member(k)
                    .filter(|&m| self.instance_name(m) == *id)
                    .and_then(online)
                {
                    return Some(c);
                }
            }
        }
        let c = match selection {
            Selection::Random => random_u64(),
            // Relaxed: the counter only spreads load; no data is published through it.
            _ => self
                .shared
                .round_robin(svc_idx)?
                .next
                .fetch_add(1, Ordering::Relaxed),
        };
        (0..n).find_map(|k| member(c.wrapping_add(k)).and_then(online))
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

pub(crate) struct BusInner {
    pub dir: PathBuf,
    control: Mutex<ControlConn>,
    /// The current session (a leaked `Box`, see [`Session`]); swapped on reconnect.
    session: AtomicPtr<Session>,
    /// Sessions of earlier broker runs (calls in flight may still read them).
    old_sessions: Mutex<Vec<RetiredSession>>,
    /// The session before the last reconnect, and when that was (see `routing_session`).
    previous: AtomicPtr<Session>,
    reconnected_at: Mutex<Option<Instant>>,
    /// Our mailboxes and request heap: the same memfd across broker restarts.
    pub client: ClientSeg,
    pub client_fd: OwnedFd,
    /// `index | gen << 32` as the current broker knows this client.
    client_ident: StdAtomicU64,
    /// Instances registered through this connection (re-registered after a broker restart).
    pub(crate) registered: Mutex<Vec<Weak<crate::instance::InstanceInner>>>,
    /// Written on drop to stop the supervisor thread.
    stop_fd: OwnedFd,
    pool: MailboxPool,
    heap: HeapAlloc,
    /// Caller side: mapped instance segments by registry index.
    instances: RwLock<HashMap<u32, Arc<InstanceSeg>>>,
    /// Serving side: mapped segments of the clients that called our instances.
    clients: RwLock<HashMap<u32, Arc<ClientSeg>>>,
    /// Bumped (and `control_changed` notified) each time a reconnect after a broker restart
    /// has completed (see `reconnected`).
    control_gen: Mutex<u64>,
    control_changed: Condvar,
    /// The `control_gen` at which waiting for a reconnect last timed out (`u64::MAX`:
    /// never): while it is still current, the broker stays away and nobody waits again.
    gave_up_at: StdAtomicU64,
    pub opts: BusOptions,
    pub pid: u32,
    trace_seq: StdAtomicU64,
    /// Consecutive timeouts per (instance, incarnation), and how many entries (fast check).
    timeouts: Mutex<HashMap<(u32, u64), u32>>,
    timeouts_pending: AtomicUsize,
    /// Instances seen stalled: index -> (incarnation, progress word when seen). Avoided by
    /// routing until the word moves. With its size, for the fast path.
    stalled: Mutex<HashMap<u32, (u64, u64)>>,
    stalled_pending: AtomicUsize,
}

/// Wakes this process's threads waiting on `sess`'s registry words (`watch`,
/// `wait_registry_change`), so they move on to the registry that replaced it.
fn wake_registry_waiters(sess: &Session) {
    let reg = &sess.registry;
    let _ = crate::sys::futex_wake(&reg.control().generation, u32::MAX);
    for e in (0..reg.layout.max_services).filter_map(|i| reg.service(i)) {
        let _ = crate::sys::futex_wake(&e.generation, u32::MAX);
    }
}

impl Bus {
    /// Connects to the bus found like the broker finds it (`AEGIS_IPC_DIR`, …).
    pub fn connect() -> Result<Bus> {
        Bus::connect_with(BusOptions::default())
    }

    /// Connects to the bus in `dir`.
    pub fn connect_dir(dir: impl AsRef<Path>) -> Result<Bus> {
        Bus::connect_with(BusOptions {
            dir: Some(dir.as_ref().to_owned()),
            ..Default::default()
        })
    }

    pub fn connect_with(opts: BusOptions) -> Result<Bus> {
        let dir = opts.dir.clone().unwrap_or_else(dirs::client_dir);
        let mut control = ControlConn::connect(&dir.join(dirs::SOCKET))?;
        let mailboxes = opts.mailboxes.clamp(1, 1 << 16);
        let (resp, fds) = control.request(&Request::Hello {
            protocol: proto::PROTOCOL_VERSION,
            layout: layout::LAYOUT_VERSION,
            mailboxes,
            resume: None,
        })?;
        let (session, client, gen, mut fds) = Session::from_welcome(resp, fds)?;
        let client_seg = ClientSeg::open(&fds[2], session.epoch, client, gen)?;
        let heap = HeapAlloc::new(client_seg.layout.heap_size);
        let pool = MailboxPool::new(client_seg.layout.mailboxes);
        let session = Box::new(session);
        let watch = control.watch_handle()?;
        let stop_fd = crate::sys::eventfd()?;
        let stop_watch = stop_fd.try_clone()?;
        let client_fd = fds.pop().expect("three descriptors");
        let bus = Bus {
            inner: Arc::new(BusInner {
                dir,
                control: Mutex::new(control),
                session: AtomicPtr::new(Box::into_raw(session)),
                old_sessions: Mutex::new(Vec::new()),
                previous: AtomicPtr::new(std::ptr::null_mut()),
                reconnected_at: Mutex::new(None),
                client: client_seg,
                client_fd,
                client_ident: StdAtomicU64::new(client as u64 | (gen as u64) << 32),
                registered: Mutex::new(Vec::new()),
                stop_fd,
                pool,
                heap,
                instances: RwLock::new(HashMap::new()),
                clients: RwLock::new(HashMap::new()),
                control_gen: Mutex::new(0),
                control_changed: Condvar::new(),
                gave_up_at: StdAtomicU64::new(u64::MAX),
                opts,
                pid: std::process::id(),
                trace_seq: StdAtomicU64::new(0),
                timeouts: Mutex::new(HashMap::new()),
                timeouts_pending: AtomicUsize::new(0),
                stalled: Mutex::new(HashMap::new()),
                stalled_pending: AtomicUsize::new(0),
            }),
        };
        crate::reconnect::spawn_supervisor(&bus.inner, watch, stop_watch)?;
        Ok(bus)
    }

    /// The bus directory this connection uses.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Registers this process as instance `instance_id` of `service`.
    pub fn register(
        &self,
        service: &str,
        instance_id: &str,
        metadata: &[(&str, &str)],
    ) -> Result<Instance> {
        let opts = RegisterOptions {
            metadata: metadata
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        self.register_with(service, instance_id, opts)
    }

    pub fn register_with(
        &self,
        service: &str,
        instance_id: &str,
        opts: RegisterOptions,
    ) -> Result<Instance> {
        names::service(service)?;
        names::instance_id(instance_id)?;
        let (resp, fds) = self.inner.control.lock().request(&Request::Register {
            service: service.into(),
            instance_id: instance_id.into(),
            metadata: opts.metadata.clone(),
            config: opts.config.clone(),
            heartbeat: opts.heartbeat,
            resume: None,
        })?;
        let Response::Registered {
            instance,
            incarnation,
            max_message,
            ..
        } = resp
        else {
            return Err(Error::Protocol(format!(
                "expected Registered, got {resp:?}"
            )));
        };
        let mut fds = expect_fds(fds, 1, "Registered")?;
        let seg = InstanceSeg::open(&fds[0], self.inner.session().epoch, instance, incarnation)?;
        let seg_fd = fds.pop().expect("one descriptor");
        Ok(Instance::new(
            self.clone(),
            service,
            instance_id,
            seg,
            seg_fd,
            max_message,
            opts,
        ))
    }

    /// Calls `method` of `service` on one of its healthy instances (round-robin).
    pub fn call(
        &self,
        service: &str,
        method: &str,
        payload: &[u8],
        opts: &CallOptions,
    ) -> Result<Reply> {
        let mut out = Vec::new();
        let info = self.call_into(service, method, payload, opts, &mut out)?;
        Ok(Reply {
            payload: out,
            instance_id: self.instance_id(info),
        })
    }

    /// Like [`Bus::call`], but writes the reply into `out` (reusing its allocation) and
    /// returns which instance answered: the allocation-free fast path.
    pub fn call_into(
        &self,
        service: &str,
        method: &str,
        payload: &[u8],
        opts: &CallOptions,
        out: &mut Vec<u8>,
    ) -> Result<CallInfo> {
        let start = Instant::now();
        names::service(service)?;
        names::method(method)?;
        check_options(opts)?;
        let inner = &*self.inner;
        let no_instance = || Error::NoAvailableInstance {
            service: service.to_owned(),
        };
        let sess = inner.routing_session(service);
        let (svc_idx, svc) = sess.find_service(service).ok_or_else(no_instance)?;
        let max = svc.seq.read(|| svc.max_message.load(Ordering::Relaxed));
        check_size(service, payload, max)?;
        let total = start + opts.timeout;
        let mut attempts: Vec<Attempt> = Vec::new();
        let mut tried: Vec<u32> = Vec::new();
        loop {
            let skip = |m: u32| {
                tried.contains(&m)
                    || (!opts.exclude.is_empty() && opts.exclude.contains(&sess.instance_name(m)))
            };
            // Instances seen stalled are avoided while another one is routable.
            let target = sess
                .pick(svc_idx, svc, &opts.selection, |m| {
                    skip(m) || inner.seen_stalled(m)
                })
                .or_else(|| sess.pick(svc_idx, svc, &opts.selection, skip));
            let Some(target) = target else {
                return Err(if attempts.is_empty() {
                    no_instance()
                } else {
                    Error::Timeout {
                        service: service.to_owned(),
                        elapsed: start.elapsed(),
                        attempts,
                    }
                });
            };
            let t = Instant::now();
            let deadline = (t + opts.attempt_timeout).min(total);
            // Withdrawing a stalled request is worth it only with somewhere else to send it
            // (asked only once the instance has stalled: off the fast path).
            let elsewhere = || sess.any_online(svc_idx, svc, |m| m == target.instance || skip(m));
            let attempt = inner.attempt(
                sess,
                target,
                method,
                payload,
                opts,
                deadline,
                Some(&elsewhere),
                out,
            );
            let failed = match attempt {
                Ok(()) => {
                    inner.note_success(target);
                    return Ok(target);
                }
                Err(Failed::Error(e)) => return Err(inner.remote_error(target, e)),
                Err(f) => f,
            };
            let (why, in_doubt) = match failed {
                Failed::NotDelivered(w) => (w, false),
                Failed::InDoubt(w) => (w, true),
                Failed::Error(_) => unreachable!("returned above"),
            };
            if why.contains("deadline") {
                inner.note_timeout(target);
            }
            attempts.push(Attempt {
                instance: inner.instance_name(target.instance),
                error: why.to_owned(),
                duration: t.elapsed(),
            });
            tried.push(target.instance);
            if (in_doubt && !opts.idempotent)
                || attempts.len() as u32 >= opts.max_attempts
                || Instant::now() >= total
            {
                return Err(Error::Timeout {
                    service: service.to_owned(),
                    elapsed: start.elapsed(),
                    attempts,
                });
            }
        }
    }

    /// Calls `method` on the one instance that owns `resource`. The owner is looked up
    /// lock-free in the shared-memory resource map: no broker round trip.
    pub fn call_resource(
        &self,
        resource: &str,
        method: &str,
        payload: &[u8],
        opts: &CallOptions,
    ) -> Result<Reply> {
        let mut out = Vec::new();
        let info = self.call_resource_into(resource, method, payload, opts, &mut out)?;
        Ok(Reply {
            payload: out,
            instance_id: self.instance_id(info),
        })
    }

    /// [`Bus::call_resource`] writing into a reused buffer.
    pub fn call_resource_into(
        &self,
        resource: &str,
        method: &str,
        payload: &[u8],
        opts: &CallOptions,
        out: &mut Vec<u8>,
    ) -> Result<CallInfo> {
        let start = Instant::now();
        names::resource_id(resource)?;
        names::method(method)?;
        let inner = &*self.inner;
        let not_found = || Error::ResourceNotFound {
            resource: resource.to_owned(),
        };
        let target = self.lookup_resource(resource).ok_or_else(not_found)?;
        let e = inner
            .registry()
            .instance(target.instance)
            .ok_or_else(not_found)?;
        let (status, svc_idx, inc) = e.seq.read(|| {
            (
                e.status.load(Ordering::Relaxed),
                e.service.load(Ordering::Relaxed),
                e.incarnation.load(Ordering::Relaxed),
            )
        });
        if inc != target.incarnation {
            // The owner left between the two reads; its ids were released with it.
            return Err(not_found());
        }
        if status != Status::Online as u32 {
            return Err(Error::OwnerUnavailable {
                resource: resource.to_owned(),
                owner: inner.instance_name(target.instance),
                status: Status::from_u32(status),
            });
        }
        let svc = inner.registry().service(svc_idx).ok_or_else(not_found)?;
        let (max, (name, len)) = svc
            .seq
            .read(|| (svc.max_message.load(Ordering::Relaxed), svc.name.load()));
        let service = std::str::from_utf8(&name[..len]).unwrap_or("?");
        check_size(service, payload, max)?;
        check_options(opts)?;
        let deadline = start + opts.timeout.min(opts.attempt_timeout);
        match inner.attempt(
            inner.session(),
            target,
            method,
            payload,
            opts,
            deadline,
            None,
            out,
        ) {
            Ok(()) => Ok(target),
            Err(Failed::Error(e)) => Err(inner.remote_error(target, e)),
            Err(Failed::NotDelivered(w) | Failed::InDoubt(w)) if w.contains("left") => {
                Err(Error::OwnerUnavailable {
                    resource: resource.to_owned(),
                    owner: inner.instance_name(target.instance),
                    status: Status::Offline,
                })
            }
            Err(Failed::NotDelivered(w) | Failed::InDoubt(w)) => Err(Error::Timeout {
                service: service.to_owned(),
                elapsed: start.elapsed(),
                attempts: vec![Attempt {
                    instance: inner.instance_name(target.instance),
                    error: w.to_owned(),
                    duration: start.elapsed(),
                }],
            }),
        }
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

    /// Typed call: `req` and the reply travel as bincode (serde).
    pub fn call_typed<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        service: &str,
        method: &str,
        req: &Req,
        opts: &CallOptions,
    ) -> Result<Resp> {
        let body = crate::codec::encode(req)
            .map_err(|e| Error::BadRequest(format!("request could not be encoded: {e}")))?;
        let mut out = Vec::new();
        let info = self.call_into(service, method, &body, opts, &mut out)?;
        crate::codec::decode(&out).map_err(|e| {
            Error::BadRequest(format!(
                "reply from instance '{}' could not be decoded: {e}",
                self.instance_id(info)
            ))
        })
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
                    let _ = crate::sys::futex_wait(&e.generation, seen, Some(left.min(WAIT_SLICE)));
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
    pub fn health(&self, service: Option<&str>) -> Result<Vec<crate::proto::InstanceHealth>> {
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
            let _ = crate::sys::futex_wait(g, seen, Some(left.min(WAIT_SLICE)));
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

/// Why a send-and-wait did not produce a reply.
pub(crate) enum Failed {
    /// The request never ran (not taken, ring full, instance gone first): safe to resend.
    NotDelivered(&'static str),
    /// Taken but not answered: it may have run; resend only if idempotent.
    InDoubt(&'static str),
    /// A definite answer (the handler's error, or a local failure).
    Error(Error),
}

impl From<Error> for Failed {
    fn from(e: Error) -> Failed {
        Failed::Error(e)
    }
}

/// How long an instance waits for its own reconnect to resolve a caller only a restarted
/// broker knows; reconnecting takes one 50 ms retry period plus re-registering, a few
/// milliseconds.
pub const RESOLVE_WAIT: Duration = Duration::from_secs(2);

/// The longest one futex wait on a registry word lasts. A reconnect wakes those waiting
/// on the previous broker's registry, but a waiter between its check and its sleep misses
/// that wake-up (the old registry is read-only to us, so its words cannot be changed); it
/// then notices the new registry after at most this long.
const WAIT_SLICE: Duration = Duration::from_secs(1);

/// How long after a reconnect a call may still be routed with the previous broker's view.
pub const RESTART_BRIDGE: Duration = Duration::from_secs(5);

/// Consecutive timeouts after which a caller reports an instance unhealthy.
const UNHEALTHY_AFTER_TIMEOUTS: u32 = 3;

/// Rejects options no call can honour.
fn check_options(opts: &CallOptions) -> Result<()> {
    if opts.stall_bound.is_zero() {
        return Err(Error::BadRequest(
            "stall_bound must be longer than zero (it is how long an instance may leave a request untaken before it is sent elsewhere)".into(),
        ));
    }
    check_hops(opts)
}

fn check_hops(opts: &CallOptions) -> Result<()> {
    if opts.hops > opts.max_hops {
        return Err(Error::LoopDetected {
            hops: opts.hops,
            limit: opts.max_hops,
        });
    }
    Ok(())
}

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

fn check_size(service: &str, payload: &[u8], max: u64) -> Result<()> {
    if payload.len() as u64 > max {
        return Err(Error::MessageTooLarge {
            service: service.to_owned(),
            size: payload.len() as u64,
            max,
        });
    }
    Ok(())
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
    fn routing_session(&self, service: &str) -> &Session {
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

    /// One attempt on one instance. With `elsewhere`, a request the instance leaves untaken
    /// for the stall bound is withdrawn (`NotDelivered`) if `elsewhere()` says another
    /// instance could take it.
    #[allow(clippy::too_many_arguments)]
    fn attempt(
        &self,
        sess: &Session,
        target: CallInfo,
        method: &str,
        payload: &[u8],
        opts: &CallOptions,
        deadline: Instant,
        elsewhere: Option<&dyn Fn() -> bool>,
        out: &mut Vec<u8>,
    ) -> Result<(), Failed> {
        let seg = self.instance_seg(target.instance, target.incarnation)?;
        let stall = elsewhere.map(|e| (opts.stall_bound, e));
        self.send_and_wait(sess, &seg, method, payload, opts, deadline, stall, out)
    }

    /// Whether instance `index` was seen stalled and its progress word has not moved since.
    fn seen_stalled(&self, index: u32) -> bool {
        if self
            .stalled_pending
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0
        {
            return false;
        }
        let mut st = self.stalled.lock();
        let Some(&(inc, progress)) = st.get(&index) else {
            return false;
        };
        let still = self.instances.read().get(&index).is_some_and(|seg| {
            seg.incarnation == inc && seg.counters().progress.load(Ordering::Relaxed) == progress
        });
        if !still {
            st.remove(&index);
            self.stalled_pending
                .store(st.len(), std::sync::atomic::Ordering::Relaxed);
        }
        still
    }

    fn note_stalled(&self, seg: &InstanceSeg, progress: u64) {
        let mut st = self.stalled.lock();
        st.insert(seg.index, (seg.incarnation, progress));
        self.stalled_pending
            .store(st.len(), std::sync::atomic::Ordering::Relaxed);
    }

    /// A handler's error as the caller sees it (400 is the caller's `BadRequest`).
    fn remote_error(&self, target: CallInfo, e: Error) -> Error {
        match e {
            Error::Remote {
                code: code::BAD_REQUEST,
                message,
                ..
            } => Error::BadRequest(message),
            Error::Remote { code, message, .. } => Error::Remote {
                instance: self.instance_name(target.instance),
                code,
                message,
            },
            e => e,
        }
    }

    /// Whether instance `index` is still the incarnation we sent to, and not `Offline`.
    fn instance_alive(registry: &RegistryView, index: u32, incarnation: u64) -> bool {
        registry.instance(index).is_some_and(|e| {
            let (st, inc) = e.seq.read(|| {
                (
                    e.status.load(Ordering::Relaxed),
                    e.incarnation.load(Ordering::Relaxed),
                )
            });
            inc == incarnation && (st == Status::Online as u32 || st == Status::Unhealthy as u32)
        })
    }

    fn note_success(&self, target: CallInfo) {
        if self
            .timeouts_pending
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
        {
            let mut t = self.timeouts.lock();
            t.remove(&(target.instance, target.incarnation));
            self.timeouts_pending
                .store(t.len(), std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Counts consecutive timeouts per instance; the third is reported to the broker, which
    /// marks the instance `Unhealthy` (the seed's rule).
    fn note_timeout(&self, target: CallInfo) {
        let n = {
            let mut t = self.timeouts.lock();
            let n = t.entry((target.instance, target.incarnation)).or_insert(0);
            *n += 1;
            let n = *n;
            if n >= UNHEALTHY_AFTER_TIMEOUTS {
                t.remove(&(target.instance, target.incarnation));
            }
            self.timeouts_pending
                .store(t.len(), std::sync::atomic::Ordering::Relaxed);
            n
        };
        if n >= UNHEALTHY_AFTER_TIMEOUTS {
            let req = Request::ReportUnhealthy {
                instance: target.instance,
                incarnation: target.incarnation,
                reason: format!("{n} consecutive timeouts seen by pid {}", self.pid),
            };
            if let Err(e) = self.control().request(&req) {
                tracing::debug!("reporting an unhealthy instance: {e}");
            }
        }
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
    fn instance_seg(&self, index: u32, incarnation: u64) -> Result<Arc<InstanceSeg>> {
        if let Some(s) = self.instances.read().get(&index) {
            if s.incarnation == incarnation {
                return Ok(s.clone());
            }
        }
        let (resp, fds) = self.control.lock().request(&Request::OpenInstance {
            instance: index,
            incarnation,
        })?;
        let Response::OpenedInstances(ids) = resp else {
            return Err(Error::Protocol(format!(
                "expected OpenedInstances, got {resp:?}"
            )));
        };
        let fds = expect_fds(fds, ids.len(), "OpenInstance")?;
        let epoch = self.session().epoch;
        let mut asked = None;
        let mut map = self.instances.write();
        for ((i, inc), fd) in ids.into_iter().zip(fds) {
            let seg = match InstanceSeg::open(&fd, epoch, i, inc) {
                Ok(s) => Arc::new(s),
                // Only the one asked for must open; the others are a courtesy.
                Err(e) if i == index => return Err(e.into()),
                Err(_) => continue,
            };
            if i == index && inc == incarnation {
                asked = Some(seg.clone());
            } else if map.get(&i).is_some_and(|s| s.incarnation == inc) {
                continue;
            }
            map.insert(i, seg);
        }
        asked.ok_or_else(|| {
            Error::Protocol(format!(
                "OpenInstance: the broker did not send instance #{index}"
            ))
        })
    }

    /// The mapped segment of a client that sent us a request.
    ///
    /// A caller we have not seen before can only be resolved through the broker. Right
    /// after a broker restart its callers may reach the new broker (and so carry an identity
    /// only the new broker knows) before our own supervisor has reconnected: then this
    /// waits, at most [`RESOLVE_WAIT`], for the reconnect instead of dropping the request
    /// (whose caller could only time out). If the broker stays away that long, later
    /// requests do not wait again until it is back.
    pub fn client_seg(&self, index: u32, gen: u32) -> Result<Arc<ClientSeg>> {
        if let Some(s) = self.clients.read().get(&index) {
            if s.gen == gen {
                return Ok(s.clone());
            }
        }
        let mut until = None;
        loop {
            let seen = *self.control_gen.lock();
            match self.open_client(index, gen) {
                Err(Error::BrokerUnavailable { .. })
                    if self.gave_up_at.load(std::sync::atomic::Ordering::Relaxed) != seen =>
                {
                    let until = *until.get_or_insert_with(|| Instant::now() + RESOLVE_WAIT);
                    let mut g = self.control_gen.lock();
                    while *g == seen {
                        if self.control_changed.wait_until(&mut g, until).timed_out() {
                            // Relaxed: a hint that only saves waiting; `control_gen` (under
                            // its mutex) is what decides.
                            self.gave_up_at
                                .store(seen, std::sync::atomic::Ordering::Relaxed);
                            break;
                        }
                    }
                }
                r => return r,
            }
        }
    }

    /// Asks the broker for caller `(index, gen)`'s segment; other callers that have
    /// opened our instances since the last ask come with it and are mapped too.
    fn open_client(&self, index: u32, gen: u32) -> Result<Arc<ClientSeg>> {
        let (resp, fds) = self
            .control
            .lock()
            .request(&Request::OpenClient { client: index, gen })?;
        let Response::OpenedClients(ids) = resp else {
            return Err(Error::Protocol(format!(
                "expected OpenedClients, got {resp:?}"
            )));
        };
        let fds = expect_fds(fds, ids.len(), "OpenClient")?;
        let epoch = self.session().epoch;
        let mut asked = None;
        let mut map = self.clients.write();
        for ((i, g), fd) in ids.into_iter().zip(fds) {
            let seg = match ClientSeg::open(&fd, epoch, i, g) {
                Ok(s) => Arc::new(s),
                Err(e) if (i, g) == (index, gen) => return Err(e.into()),
                Err(_) => continue,
            };
            if (i, g) == (index, gen) {
                asked = Some(seg.clone());
            }
            map.insert(i, seg);
        }
        asked.ok_or_else(|| {
            Error::Protocol(format!(
                "OpenClient: the broker did not send client #{index}/{gen}"
            ))
        })
    }

    pub(crate) fn control(&self) -> parking_lot::MutexGuard<'_, ControlConn> {
        self.control.lock()
    }

    fn next_trace_id(&self) -> u64 {
        (self.pid as u64) << 40
            | (self
                .trace_seq
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                & ((1 << 40) - 1))
    }

    /// Writes the request into the instance's ring and waits for the reply in `out`.
    #[allow(clippy::too_many_arguments)]
    fn send_and_wait(
        &self,
        routed_with: &Session,
        seg: &InstanceSeg,
        method: &str,
        payload: &[u8],
        opts: &CallOptions,
        deadline: Instant,
        stall: Option<(Duration, &dyn Fn() -> bool)>,
        out: &mut Vec<u8>,
    ) -> Result<(), Failed> {
        let (mb_idx, gen) = self.pool.acquire(&self.client, &self.heap).ok_or_else(|| {
            Error::LimitExceeded(format!(
                "all {} reply mailboxes of this connection are in use (calls in flight)",
                self.client.layout.mailboxes
            ))
        })?;
        let (mb, _) = self
            .client
            .mailbox(mb_idx)
            .expect("pool hands out valid indices");
        let ring = seg.ring();
        let inline = payload.len() + method.len() <= ring.data_len();
        let heap_block = if inline {
            None
        } else {
            let len = payload.len() as u64;
            let Some(off) = self.heap.alloc(len) else {
                self.pool.put(mb_idx);
                return Err(Error::LimitExceeded(format!(
                    "request heap of {} bytes has no room for {len} more",
                    self.heap.size()
                ))
                .into());
            };
            let dst = self
                .client
                .heap_range(off, len)
                .expect("allocator stays inside the heap");
            // SAFETY: `dst` is `len` bytes inside our heap, allocated to this call only.
            unsafe { std::ptr::copy_nonoverlapping(payload.as_ptr(), dst, payload.len()) };
            Some((off, len))
        };
        let finish = |this: &Self| {
            if let Some((off, len)) = heap_block {
                this.heap.free(off, len);
            }
            this.pool.put(mb_idx);
        };
        mailbox::arm(mb, gen);
        let mut watch = stall.map(|(bound, elsewhere)| StallWatch::new(seg, bound, elsewhere));
        let Some(mut claim) = claim_slot(&ring, self.pid, deadline, &mut watch) else {
            mailbox::release(mb, gen);
            finish(self);
            return Err(Failed::NotDelivered(match &watch {
                Some(w) if w.stalled() => {
                    self.note_stalled(seg, w.progress);
                    "ring full and the instance made no progress for the stall bound"
                }
                _ => "ring full until the attempt deadline",
            }));
        };
        #[cfg(feature = "test-hooks")]
        crate::test_hooks::park_after_claim();
        claim.set_header(MsgHeader {
            client_index: self.client_ident().0,
            client_gen: self.client_ident().1,
            mailbox: mb_idx,
            mailbox_gen: gen,
            trace_id: opts.trace_id.unwrap_or_else(|| self.next_trace_id()),
            payload_len: payload.len() as u64,
            heap_off: heap_block.map_or(0, |(o, _)| o),
            method_len: method.len() as u16,
            hops: opts.hops,
            kind: if inline { PAYLOAD_INLINE } else { PAYLOAD_HEAP },
            _pad: 0,
        });
        let data = claim.data();
        data[..method.len()].copy_from_slice(method.as_bytes());
        if inline {
            data[method.len()..method.len() + payload.len()].copy_from_slice(payload);
        }
        if claim.publish().is_err() {
            mailbox::release(mb, gen);
            finish(self);
            return Err(Error::Protocol("the instance's ring skipped our request".into()).into());
        }
        ring.notify();
        let mut waiter = Waiter::new(
            opts.spin.unwrap_or(self.opts.spin),
            CALLER_BACKOFF.get(),
            Seats::new(routed_with.shared.spin_seats()),
        );
        // Judged against the registry this call was routed with: a broker restart swapping
        // sessions mid-call is not the instance leaving.
        let alive = || Self::instance_alive(&routed_with.registry, seg.index, seg.incarnation);
        let (outcome, why) = loop {
            let check = || {
                if !alive() {
                    return Target::Gone;
                }
                let stalled =
                    mailbox::is_pending(mb, gen) && watch.as_mut().is_some_and(|w| w.check());
                if stalled {
                    Target::Stalled
                } else {
                    Target::Alive
                }
            };
            match mailbox::wait_ready(mb, gen, &mut waiter, deadline, check) {
                Wait::Ready => break (Cancel::Ready, Why::Deadline),
                Wait::TimedOut => break (mailbox::cancel(mb, gen), Why::Deadline),
                Wait::TargetGone => break (mailbox::cancel(mb, gen), Why::Gone),
                Wait::Stalled => match mailbox::cancel(mb, gen) {
                    // Taken at the last moment: it may run now, so wait for it after all.
                    Cancel::InProgress => watch = None,
                    c => break (c, Why::Stalled),
                },
            }
        };
        CALLER_BACKOFF.set(waiter.backoff);
        match outcome {
            Cancel::Ready => {
                let r = self.read_reply(mb_idx, seg, out);
                mailbox::release(mb, gen);
                finish(self);
                r.map_err(Failed::Error)
            }
            Cancel::Cancelled => {
                mailbox::release(mb, gen);
                finish(self);
                Err(Failed::NotDelivered(match why {
                    Why::Gone => "instance left before taking the request",
                    Why::Deadline => "not taken before the attempt deadline",
                    Why::Stalled => {
                        if let Some(w) = &watch {
                            self.note_stalled(seg, w.progress);
                        }
                        "instance made no progress for the stall bound: request withdrawn untaken"
                    }
                }))
            }
            Cancel::InProgress => {
                self.pool.quarantine(mb_idx, gen, heap_block);
                Err(Failed::InDoubt(if why == Why::Gone {
                    "instance left while handling the request"
                } else {
                    "taken but not answered before the attempt deadline"
                }))
            }
        }
    }

    /// Copies a ready reply out of mailbox `mb_idx`; every length and offset is checked.
    fn read_reply(&self, mb_idx: u32, seg: &InstanceSeg, out: &mut Vec<u8>) -> Result<()> {
        let (mb, inline_data) = self.client.mailbox(mb_idx).expect("valid mailbox");
        let status = mb.status.load(Ordering::Relaxed);
        let len = mb.reply_len.load(Ordering::Relaxed);
        let bad =
            |what: String| Error::Protocol(format!("reply from instance #{}: {what}", seg.index));
        let src = match mb.reply_kind.load(Ordering::Relaxed) as u8 {
            PAYLOAD_INLINE if len <= self.client.layout.mailbox_inline as u64 => inline_data,
            PAYLOAD_INLINE => {
                return Err(bad(format!("inline length {len} over the mailbox size")))
            }
            PAYLOAD_HEAP => {
                if mb.incarnation.load(Ordering::Relaxed) != seg.incarnation {
                    return Err(bad("heap reply from another incarnation".into()));
                }
                let off = mb.heap_off.load(Ordering::Relaxed);
                seg.heap_range(off, len)
                    .ok_or_else(|| bad(format!("heap range {off}+{len} outside the heap")))?
            }
            k => return Err(bad(format!("unknown reply kind {k}"))),
        };
        out.clear();
        out.reserve(len as usize);
        // SAFETY: `src` points to `len` readable bytes of a mapping we hold (bounds checked
        // above); `out` has capacity `len` and is private memory.
        unsafe {
            std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), len as usize);
            out.set_len(len as usize);
        }
        if status != code::OK as u32 {
            let message = String::from_utf8_lossy(out).into_owned();
            out.clear();
            return Err(Error::Remote {
                instance: String::new(),
                code: status as u16,
                message,
            });
        }
        Ok(())
    }
}

thread_local! {
    /// A calling thread's learned spin budget ([`crate::wait::Backoff`]), kept across calls.
    static CALLER_BACKOFF: std::cell::Cell<Backoff> = std::cell::Cell::new(Backoff::default());
}

/// Why a caller stopped waiting for its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    Deadline,
    Gone,
    Stalled,
}

/// Watches an instance's progress word while a request of ours waits for it: the instance
/// is stalled when the word has not moved for `bound`.
struct StallWatch<'a> {
    word: &'a crate::sync::AtomicU64,
    bound: Duration,
    progress: u64,
    since: Instant,
    /// Whether another instance could take the request (else a stall is waited out).
    elsewhere: &'a dyn Fn() -> bool,
    stalled: bool,
}

impl<'a> StallWatch<'a> {
    fn new(seg: &'a InstanceSeg, bound: Duration, elsewhere: &'a dyn Fn() -> bool) -> Self {
        let word = &seg.counters().progress;
        StallWatch {
            word,
            bound,
            // Relaxed: a hint for routing; no data is read through it.
            progress: word.load(Ordering::Relaxed),
            since: Instant::now(),
            elsewhere,
            stalled: false,
        }
    }

    /// Looks at the word again; true once it has stood still for the bound and another
    /// instance could take the request.
    fn check(&mut self) -> bool {
        let p = self.word.load(Ordering::Relaxed);
        if p != self.progress {
            (self.progress, self.since) = (p, Instant::now());
        }
        self.stalled = self.since.elapsed() >= self.bound && (self.elsewhere)();
        self.stalled
    }

    fn stalled(&self) -> bool {
        self.stalled
    }
}

/// Claims a ring slot, waiting (spin, yield, then short sleeps) while the ring is full.
/// A full ring means the instance is behind; there is no futex for "space", so this is
/// the one bounded poll in the call path. Gives up at `deadline`, or when `stall` sees the
/// instance make no progress for its bound.
fn claim_slot<'a>(
    ring: &RingRef<'a>,
    pid: u32,
    deadline: Instant,
    stall: &mut Option<StallWatch<'_>>,
) -> Option<crate::ring::Claim<'a>> {
    let mut tries = 0u32;
    loop {
        if let Ok(c) = ring.try_claim(pid) {
            return Some(c);
        }
        if Instant::now() >= deadline || stall.as_mut().is_some_and(|w| w.check()) {
            return None;
        }
        tries += 1;
        match tries {
            0..=63 => std::hint::spin_loop(),
            64..=127 => std::thread::yield_now(),
            _ => std::thread::sleep(Duration::from_micros(50)),
        }
    }
}

/// A mailbox whose call timed out while the instance was running it: (index, generation,
/// request heap block to free once the late reply lands, quarantined since).
type Quarantined = (u32, u32, Option<(u64, u64)>, Instant);

/// How long a mailbox may wait in quarantine for a late reply before it is recycled.
const QUARANTINE_EXPIRY: Duration = Duration::from_secs(60);

/// Free list of this connection's mailboxes, their generations (kept privately, so a
/// peer cannot steer them), and the mailboxes quarantined after a timeout.
struct MailboxPool {
    free: ArrayQueue<u32>,
    gens: Box<[StdAtomicU32]>,
    quarantine: Mutex<Vec<Quarantined>>,
    quarantined: AtomicUsize,
}

impl MailboxPool {
    fn new(n: u32) -> MailboxPool {
        let free = ArrayQueue::new(n as usize);
        for i in 0..n {
            let _ = free.push(i);
        }
        MailboxPool {
            free,
            gens: (0..n).map(|_| StdAtomicU32::new(0)).collect(),
            quarantine: Mutex::new(Vec::new()),
            quarantined: AtomicUsize::new(0),
        }
    }

    /// A free mailbox and its next generation.
    fn acquire(&self, client: &ClientSeg, heap: &HeapAlloc) -> Option<(u32, u32)> {
        if self.quarantined.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            self.reclaim(client, heap);
        }
        let i = self.free.pop()?;
        let g = self.gens[i as usize]
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .wrapping_add(1)
            & mailbox::GEN_MASK;
        Some((i, g))
    }

    fn put(&self, i: u32) {
        let _ = self.free.push(i);
    }

    fn quarantine(&self, i: u32, gen: u32, heap: Option<(u64, u64)>) {
        self.quarantine.lock().push((i, gen, heap, Instant::now()));
        self.quarantined
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Returns quarantined mailboxes whose late reply has arrived to the free list.
    fn reclaim(&self, client: &ClientSeg, heap: &HeapAlloc) {
        let mut q = self.quarantine.lock();
        q.retain(|&(i, gen, block, since)| {
            let Some((mb, _)) = client.mailbox(i) else {
                return false;
            };
            // Expired: the instance died while running the request (a live one answers
            // or is declared dead long before). Its reply can no longer land: `complete`
            // only moves this generation's TAKEN, and `release` ends that generation.
            if !mailbox::is_ready(mb, gen) && since.elapsed() < QUARANTINE_EXPIRY {
                return true;
            }
            mailbox::release(mb, gen);
            if let Some((off, len)) = block {
                heap.free(off, len);
            }
            let _ = self.free.push(i);
            false
        });
        self.quarantined
            .store(q.len(), std::sync::atomic::Ordering::Relaxed);
    }
}

/// A session pointer that is no longer current (from `Box::into_raw`), freed in Drop.
struct RetiredSession(*mut Session);
// SAFETY: a Session is Send + Sync (mappings and atomics); the pointer is only read
// through shared references and freed once, in `Drop for BusInner`.
unsafe impl Send for RetiredSession {}

impl Drop for BusInner {
    fn drop(&mut self) {
        let _ = crate::sys::eventfd_signal(&self.stop_fd);
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
