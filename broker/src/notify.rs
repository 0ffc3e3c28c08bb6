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

    fn send(states: &[NotifyState<'_>]) {
        if let Err(e) = sd_notify::notify(false, states) {
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
