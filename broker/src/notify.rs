//! systemd integration (`Type=notify`): `READY=1` once the socket serves, `STATUS=` with live
//! counts, `WATCHDOG=1` from the periodic tick that checks instance liveness (a broker wedged
//! there stops sending it and systemd restarts it), `STOPPING=1` on shutdown. Without
//! `NOTIFY_SOCKET` (not under systemd) every call is a no-op.

use std::time::{Duration, Instant};

use sd_notify::NotifyState;

use crate::state::State;

/// How often `STATUS=` is refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(2);

pub(crate) struct Systemd {
    /// Half the watchdog interval systemd asked for (`WATCHDOG_USEC`), if it did.
    watchdog: Option<Duration>,
    last_watchdog: Instant,
    last_status: Option<Instant>,
}

impl Systemd {
    pub(crate) fn new() -> Systemd {
        let mut usec = 0;
        let watchdog =
            sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec) / 2);
        Systemd {
            watchdog,
            last_watchdog: Instant::now(),
            last_status: None,
        }
    }

    /// Sends `states` to `NOTIFY_SOCKET` without ever blocking: a notification that does
    /// not fit the receiver's queue is dropped (and logged at debug). `sd_notify::notify`
    /// sends on a blocking socket, and a receiver that reads late (its datagram queue
    /// holds 10 by default) then stopped the whole event loop: Hello unanswered, SIGTERM
    /// unheeded (seen in `tests/broker_load.rs` under CI load). A dropped `WATCHDOG=1` is
    /// sent again on the next tick, a dropped `STATUS=` within 2 s.
    fn send(states: &[NotifyState<'_>]) {
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
            return;
        };
        let msg: String = states.iter().map(|s| format!("{s}\n")).collect();
        let sent = (|| {
            let sock = std::os::unix::net::UnixDatagram::unbound()?;
            sock.set_nonblocking(true)?;
            sock.connect(&path)?;
            sock.send(msg.as_bytes())
        })();
        if let Err(e) = sent {
            tracing::debug!("sd_notify: {e}");
        }
    }

    pub(crate) fn ready(&mut self, st: &State) {
        Self::send(&[NotifyState::Ready, NotifyState::Status(&status(st))]);
        self.last_status = Some(Instant::now());
    }

    /// Called from the liveness tick.
    pub(crate) fn tick(&mut self, st: &State) {
        if let Some(half) = self.watchdog {
            if self.last_watchdog.elapsed() >= half {
                Self::send(&[NotifyState::Watchdog]);
                self.last_watchdog = Instant::now();
            }
        }
        if self.last_status.is_none_or(|t| t.elapsed() >= STATUS_EVERY) {
            Self::send(&[NotifyState::Status(&status(st))]);
            self.last_status = Some(Instant::now());
        }
    }

    pub(crate) fn stopping(&self) {
        Self::send(&[NotifyState::Stopping, NotifyState::Status("shutting down")]);
    }
}

fn status(st: &State) -> String {
    let (services, instances, clients) = st.counts();
    format!("serving {services} services, {instances} instances, {clients} connected processes")
}
