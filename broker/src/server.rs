//! The control socket: startup (directory, lock, stale socket), the accept loop, one task
//! per connection, periodic work, and shutdown on SIGTERM/SIGINT.

use std::fs::{self, File};
use std::io::{Read, Seek, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aegis_client::error::WireError;
use aegis_client::proto::{
    self, BatchReport, BulkMode, BulkOptions, BulkReport, Request, ResourceSpec, Response,
};
use aegis_client::{dirs, layout};
use nix::fcntl::{Flock, FlockArg};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{signal, SignalKind};

use crate::config::BrokerConfig;
use crate::identities::Identities;
use crate::resources::Transfer;
use crate::state::{ConnId, Peer, Registration, Reply, State};

/// Changes the log filter while the broker runs (SIGHUP); `None` where logging cannot be
/// reconfigured.
pub type LogReload = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Runs a broker until SIGTERM or SIGINT. Errors are one-line reasons for the operator.
pub fn run(cfg: BrokerConfig) -> Result<(), String> {
    run_with(cfg, None)
}

/// [`run`], with a way to change the log filter on SIGHUP.
pub fn run_with(cfg: BrokerConfig, log_reload: Option<LogReload>) -> Result<(), String> {
    let mode = cfg.validate()?;
    let dir = cfg.dir.clone().unwrap_or_else(dirs::broker_dir);
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| format!("cannot create bus directory {}: {e}", dir.display()))?;
    }
    check_dir(&dir, cfg.allow_shared_dir)?;
    let _lock = lock_dir(&dir)?;
    let sock = dir.join(dirs::SOCKET);
    // We hold the lock, so a socket file here is a leftover of a broker that died (not
    // following a symlink: removing one removes the link, nothing it points to).
    if fs::symlink_metadata(&sock).is_ok() {
        tracing::info!(path = %sock.display(), "removing stale control socket of a previous broker");
        fs::remove_file(&sock)
            .map_err(|e| format!("cannot remove stale {}: {e}", sock.display()))?;
    }
    raise_fd_limit();
    let ids = Identities::load(&dir)?;
    let mut state =
        State::new(cfg, ids).map_err(|e| format!("cannot create the bus's shared memory: {e}"))?;
    state.open_journal(&dir)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let http = state.cfg.http_listen;
    let access = crate::http::Access {
        token: state.cfg.http_token()?,
        metrics_open: state.cfg.http_metrics_open,
    };
    let r = rt.block_on(async {
        let state = Arc::new(Mutex::new(state));
        if let Some(addr) = http {
            let bound = crate::http::start(addr, state.clone(), access)?;
            tracing::info!(%bound, "serving /metrics and /api/v1/admin over HTTP");
            println!("aegis-broker http {bound}");
        }
        serve(state, &sock, mode, log_reload).await
    });
    let _ = fs::remove_file(&sock);
    let _ = fs::remove_file(dir.join(dirs::LOCK));
    r
}

/// Every gid of the peer: `SO_PEERGROUPS` (supplementary groups at connect time, Linux
/// 4.13), with the primary gid from `SO_PEERCRED` first.
fn peer_groups(stream: &UnixStream, gid: u32) -> Vec<u32> {
    use std::os::fd::AsRawFd;
    const SO_PEERGROUPS: libc::c_int = 59;
    let mut groups = vec![0 as libc::gid_t; 256];
    let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `groups`, which has that many.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERGROUPS,
            groups.as_mut_ptr().cast(),
            &mut len,
        )
    };
    let n = if r == 0 {
        len as usize / std::mem::size_of::<libc::gid_t>()
    } else {
        0
    };
    let mut all = vec![gid];
    all.extend(groups[..n.min(groups.len())].iter().filter(|&&g| g != gid));
    all
}

/// Raises the soft descriptor limit to the hard one: every client and instance holds a
/// connection and the broker one descriptor per segment.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write only the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::warn!("could not raise the descriptor limit to {}", lim.rlim_max);
            }
        }
    }
}

/// Open control connections, in all and per uid (see `--max-connections`).
#[derive(Default)]
struct Connections {
    total: usize,
    per_uid: std::collections::HashMap<u32, usize>,
}

/// Releases a connection's place in [`Connections`] when its task ends.
struct ConnSlot {
    conns: Arc<Mutex<Connections>>,
    uid: u32,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut c = self.conns.lock();
        c.total -= 1;
        if let Some(n) = c.per_uid.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                c.per_uid.remove(&self.uid);
            }
        }
    }
}

/// Refuses a bus directory that is a symlink, not ours, or writable by others: whoever can
/// write it can replace the control socket and so impersonate the broker to every client.
fn check_dir(dir: &Path, allow_shared: bool) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let md = fs::symlink_metadata(dir)
        .map_err(|e| format!("cannot stat bus directory {}: {e}", dir.display()))?;
    if md.file_type().is_symlink() {
        return Err(format!(
            "bus directory {} is a symlink; give the real path",
            dir.display()
        ));
    }
    if !md.is_dir() {
        return Err(format!(
            "bus directory {} is not a directory",
            dir.display()
        ));
    }
    let me = nix::unistd::geteuid().as_raw();
    if md.uid() != me {
        return Err(format!(
            "bus directory {} is owned by uid {}, not by the broker's uid {me}",
            dir.display(),
            md.uid()
        ));
    }
    let mode = md.mode() & 0o7777;
    if mode & 0o022 != 0 && !allow_shared {
        return Err(format!(
            "bus directory {} is writable by group or others (mode {mode:o}): anyone who can write it can replace the control socket; chmod go-w it, or allow it with --allow-shared-dir",
            dir.display()
        ));
    }
    Ok(())
}

/// How long the accept loop pauses after a failed accept (out of descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Takes the directory's lock file, refusing if another broker holds it.
fn lock_dir(dir: &Path) -> Result<Flock<File>, String> {
    let file = crate::identities::open_bus_file(&dir.join(dirs::LOCK))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(mut f) => {
            let _ = f.set_len(0);
            let _ = f.rewind();
            let _ = writeln!(f, "{}", std::process::id());
            Ok(f)
        }
        Err((mut f, _)) => {
            let mut pid = String::new();
            let _ = f.read_to_string(&mut pid);
            Err(format!(
                "another aegis-broker (pid {}) is already serving {}; not starting a second one",
                pid.trim(),
                dir.display()
            ))
        }
    }
}

/// SIGHUP: re-reads the configuration file and applies what can change while the broker
/// runs; says (in the log) what changed and what needs a restart.
fn reload(state: &Mutex<State>, log_reload: Option<&LogReload>) {
    let mut st = state.lock();
    let new = match st.cfg.reloaded() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("SIGHUP: configuration not reloaded, keeping the running one: {e}");
            return;
        }
    };
    let old = st.cfg.clone();
    let mut needs_restart = Vec::new();
    macro_rules! fixed {
        ($($f:ident),*) => {$(
            if new.$f != old.$f {
                needs_restart.push(stringify!($f));
            }
        )*};
    }
    fixed!(
        dir,
        max_services,
        max_instances,
        max_clients,
        max_resources,
        slot_size,
        slot_count,
        max_message,
        socket_mode,
        exit_detection,
        allow_shared_dir
    );
    let mut applied = Vec::new();
    macro_rules! live {
        ($($f:ident),*) => {$(
            if new.$f != old.$f {
                st.cfg.$f = new.$f.clone();
                applied.push(stringify!($f));
            }
        )*};
    }
    live!(
        policy,
        admin_uids,
        admin_gids,
        max_resources_per_instance,
        max_ring_bytes,
        max_shm_per_uid,
        max_instances_per_uid,
        max_clients_per_uid,
        max_resources_per_uid,
        max_connections
    );
    if new.log != old.log {
        match log_reload.map(|f| f(&new.log)) {
            Some(Ok(())) => {
                st.cfg.log = new.log.clone();
                applied.push("log");
            }
            Some(Err(e)) => tracing::warn!("SIGHUP: log filter {:?} not applied: {e}", new.log),
            None => needs_restart.push("log"),
        }
    }
    tracing::info!(applied = ?applied, "SIGHUP: configuration reloaded");
    if !needs_restart.is_empty() {
        tracing::warn!(
            not_applied = ?needs_restart,
            "SIGHUP: these settings changed but only take effect when the broker restarts"
        );
    }
}

/// A liveness tick taking longer than this is logged (it delays exit detection by polling,
/// resource expiry and the systemd watchdog).
const SLOW_TICK: Duration = Duration::from_millis(50);

async fn serve(
    state: Arc<Mutex<State>>,
    sock: &PathBuf,
    mode: u32,
    log_reload: Option<LogReload>,
) -> Result<(), String> {
    let listener =
        UnixListener::bind(sock).map_err(|e| format!("cannot bind {}: {e}", sock.display()))?;
    fs::set_permissions(sock, fs::Permissions::from_mode(mode))
        .map_err(|e| format!("cannot chmod {}: {e}", sock.display()))?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let next_conn = AtomicU64::new(1);
    let conns = Arc::new(Mutex::new(Connections::default()));
    tracing::info!(socket = %sock.display(), pid = std::process::id(), "aegis-broker ready");
    // Readiness line for scripts and tests (they wait on it instead of polling the socket).
    println!("aegis-broker ready {}", sock.display());
    let _ = std::io::stdout().flush();
    let mut systemd = crate::notify::Systemd::new();
    systemd.ready(&state.lock());
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    let id = next_conn.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(connection(state.clone(), conns.clone(), stream, id));
                }
                Err(e) => {
                    // Out of descriptors (EMFILE/ENFILE) or memory: the pending connection
                    // stays queued, so retrying at once would spin. Back off instead.
                    tracing::warn!("accept: {e}; pausing accepts for {ACCEPT_BACKOFF:?}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break; }
            _ = hup.recv() => reload(&state, log_reload.as_ref()),
            _ = tick.tick() => {
                let t = std::time::Instant::now();
                let mut st = state.lock();
                let locked = t.elapsed();
                st.tick();
                // From the loop that checks liveness: a broker wedged here is restarted.
                systemd.tick(&st);
                if t.elapsed() > SLOW_TICK {
                    tracing::warn!(waited_for_lock = ?locked, took = ?t.elapsed(), "slow liveness tick");
                }
            }
        }
    }
    systemd.stopping();
    Ok(())
}

async fn connection(
    state: Arc<Mutex<State>>,
    conns: Arc<Mutex<Connections>>,
    mut stream: UnixStream,
    id: ConnId,
) {
    let peer = match stream.peer_cred() {
        Ok(c) => Peer {
            pid: c.pid().unwrap_or(0) as u32,
            uid: c.uid(),
            gid: c.gid(),
        },
        Err(e) => {
            tracing::warn!("no peer credentials: {e}");
            return;
        }
    };
    let (max, per_uid) = {
        let st = state.lock();
        (
            st.cfg.max_connections() as usize,
            st.cfg.max_clients_per_uid(peer.uid) as usize,
        )
    };
    let refused = {
        let mut c = conns.lock();
        let mine = c.per_uid.get(&peer.uid).copied().unwrap_or(0);
        if c.total >= max {
            Some(format!(
                "the broker has {max} control connections open (broker --max-connections {max})"
            ))
        } else if mine >= per_uid {
            Some(format!(
                "uid {} has {per_uid} control connections open (broker --max-clients-per-uid {per_uid})",
                peer.uid
            ))
        } else {
            c.total += 1;
            *c.per_uid.entry(peer.uid).or_default() += 1;
            None
        }
    };
    if let Some(why) = refused {
        tracing::warn!(
            pid = peer.pid,
            uid = peer.uid,
            "refusing a connection: {why}"
        );
        // Answer its first request (the Hello, read with a short timeout so an idle
        // connection cannot hold us) with the reason, then close.
        let _ = tokio::time::timeout(Duration::from_secs(1), read_request(&mut stream)).await;
        let resp = Response::Error(WireError::LimitExceeded(why));
        let _ = write_response(&mut stream, &resp, &[]).await;
        return;
    }
    let _slot = ConnSlot {
        conns,
        uid: peer.uid,
    };
    state.lock().connected(id, peer_groups(&stream, peer.gid));
    let mut hello = false;
    loop {
        let (req, mut fds) = match read_request(&mut stream).await {
            Ok(Some(r)) => r,
            Ok(None) => break,
            // The peer died (SIGKILL) with data unread: a close like any other.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => {
                tracing::warn!(pid = peer.pid, "bad control frame, closing connection: {e}");
                let resp = Response::Error(WireError::BadRequest(format!(
                    "undecodable control frame: {e}"
                )));
                let _ = write_response(&mut stream, &resp, &[]).await;
                break;
            }
        };
        let resource_op = match &req {
            Request::ClaimResources { .. } => Some("claim"),
            Request::ReleaseResources { .. } => Some("release"),
            Request::TransferResources { .. } => Some("transfer"),
            Request::QueryResources(_) => Some("query"),
            _ => None,
        };
        let started = std::time::Instant::now();
        let (resp, fds) = {
            let mut st = state.lock();
            match req {
                Request::Hello {
                    protocol,
                    layout: lv,
                    mailboxes,
                    resume,
                    secret,
                } => {
                    if protocol != proto::PROTOCOL_VERSION || lv != layout::LAYOUT_VERSION {
                        (
                            Response::Error(WireError::Incompatible(format!(
                                "client speaks protocol {protocol} / layout {lv}, broker speaks {} / {}",
                                proto::PROTOCOL_VERSION,
                                layout::LAYOUT_VERSION
                            ))),
                            Vec::new(),
                        )
                    } else if peer.pid == 0 || !same_pid_namespace(peer.pid) {
                        // SO_PEERCRED gives pid 0 for a peer in a pid namespace we cannot see
                        // into; one in a child namespace has a pid here but writes its own
                        // namespace's pid (getpid) into ring claims and mailboxes, which
                        // everyone else would read as another process. The bus tells
                        // processes (their liveness, their claims) apart by pid: refused.
                        (
                            Response::Error(WireError::Incompatible(format!(
                                "peer (pid {} here) is in another pid namespace: run it in the broker's pid namespace",
                                peer.pid
                            ))),
                            Vec::new(),
                        )
                    } else if hello {
                        (
                            Response::Error(WireError::BadRequest("hello sent twice".into())),
                            Vec::new(),
                        )
                    } else {
                        hello = true;
                        // A resuming client sends its client segment.
                        let resume = resume.and_then(|r| Some((r, fds.pop()?)));
                        st.hello(id, peer, mailboxes, resume, secret)
                    }
                }
                _ if !hello => (
                    Response::Error(WireError::BadRequest(
                        "the first request must be Hello".into(),
                    )),
                    Vec::new(),
                ),
                Request::Register {
                    service,
                    instance_id,
                    metadata,
                    config,
                    heartbeat,
                    resume,
                } => {
                    // The instance's own segment comes last; a resuming instance sends
                    // its ring before it.
                    let own = fds.pop();
                    let reg = Registration {
                        service: &service,
                        id: &instance_id,
                        metadata,
                        config: &config,
                        heartbeat,
                        own,
                        adopt: resume.and_then(|r| fds.pop().map(|fd| (r, fd))),
                    };
                    st.register(id, peer, reg)
                }
                Request::ReportUnhealthy {
                    instance,
                    incarnation,
                    reason,
                } => match st.may_report(id, peer, instance, incarnation) {
                    Ok(()) => st.report_unhealthy(instance, incarnation, &reason),
                    Err(e) => (Response::Error(e), Vec::new()),
                },
                Request::Health { service } => {
                    (Response::Health(st.health(service.as_deref())), Vec::new())
                }
                Request::Unregister {
                    instance,
                    incarnation,
                } => st.unregister(id, peer, instance, incarnation),
                Request::OpenInstance {
                    instance,
                    incarnation,
                } => st.open_instance(id, peer, instance, incarnation),
                Request::Channels => st.channels_request(id),
                Request::ChannelHeap { channel } => st.channel_heap(id, channel, fds.pop()),
                // A channel of another broker run is named by its token.
                Request::ReplyHeap {
                    channel,
                    epoch,
                    token,
                } => {
                    let previous = (epoch != st.epoch).then_some(token);
                    st.reply_heap(id, channel, previous, fds.pop())
                }
                Request::OpenReplyHeap {
                    channel,
                    epoch,
                    token,
                } => {
                    let previous = (epoch != st.epoch).then_some(token);
                    st.open_reply_heap(id, channel, previous)
                }
                Request::ClaimChannels { channels } => st.claim_channels(id, channels),
                Request::PreviousRequestHeap { token } => {
                    st.previous_request_heap(id, token, fds.pop())
                }
                Request::OpenRequestHeap { channel, token } => {
                    st.open_request_heap(id, channel, token)
                }
                Request::Grant { instances } => st.grant_request(id, peer, instances),
                Request::ListServices => (Response::Services(st.services_info()), Vec::new()),
                Request::DescribeService { name } => st.describe(&name),
                Request::TransferResources {
                    ids,
                    from,
                    to_service,
                    to_instance,
                    reason,
                } => st.transfer(
                    id,
                    peer,
                    Transfer {
                        ids: &ids,
                        from,
                        to_service: &to_service,
                        to_instance: &to_instance,
                        reason: &reason,
                    },
                ),
                Request::QueryResources(q) => (
                    Response::Resources(st.query_resources(&q, Some((id, peer)))),
                    Vec::new(),
                ),
                Request::ClaimResources {
                    instance,
                    incarnation,
                    resources,
                    options,
                } => {
                    drop(st);
                    bulk(
                        &state,
                        id,
                        peer,
                        BulkOp::Claim((instance, incarnation), resources),
                        options,
                    )
                    .await
                }
                Request::ReleaseResources {
                    owner,
                    ids,
                    options,
                } => {
                    drop(st);
                    bulk(&state, id, peer, BulkOp::Release(owner, ids), options).await
                }
            }
        };
        // Watchers lock the state themselves: start them only once our guard is gone.
        let (pending, mode) = {
            let mut st = state.lock();
            // What this request changed is journaled before it is answered.
            st.flush_journal();
            if let Some(op) = resource_op {
                st.metrics
                    .resource_ops
                    .entry(op)
                    .or_default()
                    .observe(started.elapsed().as_nanos() as u64);
            }
            (st.take_pending_watches(), st.cfg.exit_detection)
        };
        for pid in pending {
            watch_exit(state.clone(), pid, mode);
        }
        if let Err(e) = write_response(&mut stream, &resp, &fds).await {
            tracing::debug!(pid = peer.pid, "writing response: {e}");
            break;
        }
    }
    state.lock().disconnect(id);
}

/// Watches `pid` with a pidfd, readable when the process exits; falls back to polling in
/// the tick where pidfds are not available.
/// Must not be called with the state locked (it locks it).
fn watch_exit(state: Arc<Mutex<State>>, pid: u32, mode: crate::config::ExitDetection) {
    if mode == crate::config::ExitDetection::Poll {
        state.lock().poll_pid(pid);
        return;
    }
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if raw < 0 {
        tracing::debug!(
            pid,
            "pidfd_open failed ({}); polling instead",
            std::io::Error::last_os_error()
        );
        state.lock().poll_pid(pid);
        return;
    }
    // SAFETY: the syscall returned a fresh descriptor that nothing else owns.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw as i32) };
    // SAFETY: `fd` is an OwnedFd moved into the AsyncFd: it stays open and the same
    // descriptor for the AsyncFd's whole life.
    let afd =
        match unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, Interest::READABLE) } {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(pid, "cannot register pidfd ({e}); polling instead");
                state.lock().poll_pid(pid);
                return;
            }
        };
    tokio::spawn(async move {
        let _ = afd.readable().await;
        state.lock().process_exited(pid, "pidfd");
    });
}

enum BulkOp {
    Claim((u32, u64), Vec<ResourceSpec>),
    Release(Option<(u32, u64)>, Vec<String>),
}

/// Runs a bulk claim or release a batch at a time (the state lock is taken per batch, so
/// other requests get in between), rolling an all-or-nothing request back on its first
/// failure.
async fn bulk(
    state: &Arc<Mutex<State>>,
    conn: ConnId,
    peer: Peer,
    op: BulkOp,
    options: BulkOptions,
) -> Reply {
    let n = match &op {
        BulkOp::Claim(_, v) => v.len(),
        BulkOp::Release(_, v) => v.len(),
    };
    let size = match options.batch_size {
        0 => n.max(1),
        s => s as usize,
    };
    let mut undo = Vec::new();
    let mut report = BulkReport::default();
    let mut start = 0;
    loop {
        let end = (start + size).min(n);
        let r = {
            let mut st = state.lock();
            match &op {
                BulkOp::Claim(inst, specs) => st.claim_batch(
                    conn,
                    peer,
                    *inst,
                    &specs[start..end],
                    options.force,
                    &mut undo,
                ),
                BulkOp::Release(owner, ids) => {
                    st.release_batch(conn, peer, *owner, &ids[start..end], &mut undo)
                }
            }
        };
        let (ok, failures) = match r {
            Ok(r) => r,
            Err(e) => {
                state.lock().rollback(undo);
                return (Response::Error(e), Vec::new());
            }
        };
        report.batches.push(BatchReport {
            succeeded: ok,
            failed: failures.len() as u32,
        });
        report.succeeded += ok;
        report.failed += failures.len() as u32;
        report.failures.extend(failures);
        if options.mode == BulkMode::AllOrNothing && report.failed > 0 {
            state.lock().rollback(undo);
            report.rolled_back = true;
            report.succeeded = 0;
            break;
        }
        start = end;
        if start >= n {
            break;
        }
        tokio::task::yield_now().await;
    }
    (Response::Bulk(report), Vec::new())
}

/// Reads one request frame; `Ok(None)` at a clean end of stream.
/// Reads one request frame and the descriptors sent with it; `Ok(None)` at a clean end of
/// stream.
async fn read_request(stream: &mut UnixStream) -> std::io::Result<Option<(Request, Vec<OwnedFd>)>> {
    let mut hdr = [0u8; 4];
    let mut got = 0;
    let mut fds = Vec::new();
    while got < 4 {
        let n = stream
            .async_io(Interest::READABLE, || {
                proto::recv_with_fds::<{ proto::MAX_FDS }>(
                    stream.as_fd(),
                    &mut hdr[got..],
                    &mut fds,
                )
            })
            .await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(std::io::ErrorKind::UnexpectedEof.into())
            };
        }
        got += n;
    }
    let len = proto::frame_len(hdr)?;
    // A frame, once begun, must arrive within FRAME_TIMEOUT, and its buffer grows with what
    // arrives (not with what the length word claims): an unfinished frame costs the broker
    // what was sent, and only for that long.
    let mut body = Vec::with_capacity(len.min(FRAME_CHUNK));
    let read = async {
        let mut chunk = vec![0u8; len.min(FRAME_CHUNK)];
        while body.len() < len {
            let want = (len - body.len()).min(chunk.len());
            let n = stream.read(&mut chunk[..want]).await?;
            if n == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
            }
            body.extend_from_slice(&chunk[..n]);
        }
        Ok(())
    };
    match tokio::time::timeout(FRAME_TIMEOUT, read).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "a {len}-byte request frame was not complete after {FRAME_TIMEOUT:?} ({} bytes came)",
                    body.len()
                ),
            ))
        }
    }
    proto::decode(&body).map(|r| Some((r, fds)))
}

/// A request frame must arrive whole within this once its length word has.
const FRAME_TIMEOUT: Duration = Duration::from_secs(5);
/// A frame is read this much at a time (its buffer holds what came).
const FRAME_CHUNK: usize = 64 << 10;

async fn write_response(
    stream: &mut UnixStream,
    resp: &Response,
    fds: &[std::os::fd::OwnedFd],
) -> std::io::Result<()> {
    let frame = proto::frame(resp)?;
    let mut sent = 0;
    if !fds.is_empty() {
        let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        sent = stream
            .async_io(Interest::WRITABLE, || {
                proto::send_with_fds(stream.as_fd(), &frame, &borrowed)
            })
            .await?;
    }
    stream.write_all(&frame[sent..]).await
}

/// Whether process `pid` (as this namespace sees it) is in our pid namespace: its
/// `NSpid:` line in `/proc/PID/status` (world-readable) lists its pid in each namespace from
/// ours down, so one entry means ours, more mean a descendant. True when it cannot be read
/// (the process is gone; the connection ends anyway).
fn same_pid_namespace(pid: u32) -> bool {
    let levels = |path: &str| -> Option<usize> {
        std::fs::read_to_string(path)
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .map(|v| v.split_whitespace().count())
    };
    match (
        levels(&format!("/proc/{pid}/status")),
        levels("/proc/self/status"),
    ) {
        (Some(peer), Some(me)) => peer == me,
        _ => true,
    }
}
