//! Joining the bus ([`Bus::connect`]) and surviving a broker restart. The data plane never
//! needed the broker, so calls keep flowing while it is down; this module restores the
//! control plane when it returns.
//!
//! A supervisor thread per `Bus` waits (in `poll`) for the control socket to hang up. It
//! then reconnects every [`RETRY`], says `Hello` with `resume` and hands over this process's
//! client segment (so every mailbox, including those of calls in flight, stays valid),
//! installs the new broker's registry, and registers every live instance again with its
//! own segment, so the new broker adopts the very same rings; each instance then claims
//! again the resources the old registry showed it owning.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicPtr, AtomicU64 as StdAtomicU64, AtomicUsize};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{Condvar, Mutex, RwLock};

use crate::error::Result;
use crate::session::bus::{Bus, BusInner, BusOptions, IndexMap, Session};
use crate::session::control::ControlConn;
use crate::session::dirs;
use crate::session::pool::MailboxPool;
use crate::session::proto::{self, Request};
use crate::shm::layout;
use crate::shm::layout::ClientSeg;

/// How often a disconnected process tries to reach the broker again.
pub const RETRY: Duration = Duration::from_millis(50);

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
        let mut control = ControlConn::connect(&dir.join(dirs::SOCKET), &opts.broker_uids)?;
        let mailboxes = opts.mailboxes.clamp(1, 1 << 16);
        let secret = crate::shm::sys::random_u64();
        let (resp, fds) = control.request(&Request::Hello {
            protocol: proto::PROTOCOL_VERSION,
            layout: layout::LAYOUT_VERSION,
            mailboxes,
            resume: None,
            secret,
        })?;
        let (session, client, gen, mut fds) = Session::from_welcome(resp, fds)?;
        let client_seg = ClientSeg::open(&fds[2], Some(session.epoch), Some((client, gen)))?;
        let pool = MailboxPool::new(client_seg.layout.mailboxes);
        let session = Box::new(session);
        let watch = control.watch_handle()?;
        let stop_fd = crate::shm::sys::eventfd()?;
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
                heap_maker: Mutex::new(()),
                channel_fetch: Mutex::new(()),
                instances: RwLock::new(IndexMap::default()),
                control_gen: Mutex::new(0),
                control_changed: Condvar::new(),
                opts,
                pid: std::process::id(),
                forks: crate::shm::sys::fork_generation(),
                trace_hi: crate::shm::sys::random_u64(),
                secret,
                nonce_key: crate::shm::sys::random_u64(),
                nonce_seq: StdAtomicU64::new(0),
                timeouts: Mutex::new(HashMap::new()),
                timeouts_pending: AtomicUsize::new(0),
                stalled: Mutex::new(HashMap::new()),
                stalled_pending: AtomicUsize::new(0),
                #[cfg(feature = "async")]
                async_waiters: Default::default(),
            }),
        };
        spawn_supervisor(&bus.inner, watch, stop_watch)?;
        Ok(bus)
    }
}

fn spawn_supervisor(inner: &Arc<BusInner>, sock: UnixStream, stop: OwnedFd) -> Result<()> {
    let weak = Arc::downgrade(inner);
    std::thread::Builder::new()
        .name("aegis-supervisor".into())
        .spawn(move || supervise(weak, sock, stop))?;
    Ok(())
}

enum Woken {
    HangUp,
    Stop,
    Timeout,
}

/// Blocks until the socket hangs up, `stop` is signalled, or `timeout` passes.
fn wait(sock: Option<&UnixStream>, stop: &OwnedFd, timeout: Option<Duration>) -> Woken {
    let mut fds = [
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: sock.map_or(-1, |s| s.as_raw_fd()),
            events: libc::POLLRDHUP,
            revents: 0,
        },
    ];
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    loop {
        // SAFETY: `fds` is a live array of two pollfds; a negative fd is ignored by poll.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
        if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        if fds[0].revents != 0 {
            return Woken::Stop;
        }
        if fds[1].revents != 0 {
            return Woken::HangUp;
        }
        return Woken::Timeout;
    }
}

fn supervise(weak: Weak<BusInner>, mut sock: UnixStream, stop: OwnedFd) {
    loop {
        match wait(Some(&sock), &stop, None) {
            Woken::Stop => return,
            Woken::Timeout => continue,
            Woken::HangUp => {}
        }
        tracing::warn!("lost the broker's control connection; calls keep flowing, reconnecting");
        #[cfg(feature = "test-hooks")]
        if let Some(d) = crate::test_hooks::reconnect_delay() {
            if let Woken::Stop = wait(None, &stop, Some(d)) {
                return;
            }
        }
        loop {
            let Some(inner) = weak.upgrade() else { return };
            match resume(&inner) {
                Ok(s) => {
                    sock = s;
                    break;
                }
                Err(e) => tracing::debug!("broker not back yet: {e}"),
            }
            drop(inner);
            if let Woken::Stop = wait(None, &stop, Some(RETRY)) {
                return;
            }
        }
    }
}

/// Reconnects to a (restarted) broker and restores this process's registrations.
fn resume(inner: &BusInner) -> Result<UnixStream> {
    let mut conn = ControlConn::connect(&inner.dir.join(dirs::SOCKET), &inner.opts.broker_uids)?;
    let hello = Request::Hello {
        protocol: proto::PROTOCOL_VERSION,
        layout: layout::LAYOUT_VERSION,
        mailboxes: inner.client.layout.mailboxes,
        resume: Some(inner.client_ident()),
        secret: inner.secret,
    };
    let (resp, fds) = conn.request_with_fds(&hello, &[inner.client_fd.as_fd()])?;
    let (session, client, gen, _fds) = Session::from_welcome(resp, fds)?;
    // What each live instance owned, read from the old broker's last registry.
    let instances: Vec<_> = inner
        .registered
        .lock()
        .iter()
        .filter_map(Weak::upgrade)
        .collect();
    // The old broker is gone (the new one holds the directory's lock), so its registry is
    // static: one scan for all our instances.
    let idents: Vec<(u32, u64)> = instances.iter().map(|i| i.ident()).collect();
    let owned = inner
        .registry()
        .resources_owned_by_in_dead_registry(&idents);
    // The new broker does not know which instances we had opened: tell it, so that their
    // serving processes (re-registering with the same identities) may map our mailboxes.
    let opened: Vec<(u32, u64)> = inner
        .instances
        .read()
        .iter()
        .map(|(&i, seg)| (i, seg.incarnation))
        .collect();
    if !opened.is_empty() {
        conn.request(&Request::Grant { instances: opened })?;
    }
    // Our channels the previous broker made stay in use (calls in flight through them,
    // and new ones until each instance is back): claim them by their tokens, so that their
    // instances can hand this broker reply heaps for them, charged to us.
    let chans: Vec<_> = inner
        .instances
        .read()
        .values()
        .filter_map(|seg| seg.channel.clone())
        .collect();
    let previous: Vec<proto::PreviousChannel> = chans
        .iter()
        .map(|c| proto::PreviousChannel {
            instance: c.instance,
            incarnation: c.incarnation,
            channel: c.id,
            token: c.token(),
        })
        .collect();
    if !previous.is_empty() {
        // Refused (over the cap), the old channels' large replies wait for their new ones;
        // no reason not to reconnect.
        match conn.request(&Request::ClaimChannels { channels: previous }) {
            Err(e) => tracing::warn!("claiming a previous broker's channels: {e}"),
            // Their request heaps again: the previous broker may have died before an
            // instance fetched one, and the requests in it would be unreadable.
            Ok(_) => {
                for c in &chans {
                    let Some(fd) = c.heap_fd.get() else { continue };
                    use std::os::fd::AsFd;
                    let req = Request::PreviousRequestHeap { token: c.token() };
                    if let Err(e) = conn.request_with_fds(&req, &[fd.as_fd()]) {
                        tracing::warn!(channel = c.id, "handing a request heap over again: {e}");
                    }
                }
            }
        }
    }
    let watch = conn.watch_handle()?;
    inner.replace_control(conn);
    inner.replace_session(session, client, gen);
    for (inst, owned) in instances.iter().zip(owned) {
        if let Err(e) = inst.resume(owned) {
            tracing::warn!("re-registering an instance after a broker restart: {e}");
        }
    }
    inner.registered.lock().retain(|w| w.strong_count() > 0);
    inner.reconnected();
    tracing::info!(client, "reconnected to the broker");
    Ok(watch)
}
