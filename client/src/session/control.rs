//! The client's end of the control socket: blocking request/response with descriptors.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::session::proto::{self, Request, Response};

/// Environment variable naming further broker uids to trust (comma-separated).
pub const BROKER_UID_ENV: &str = "AEGIS_IPC_BROKER_UID";

/// How long a broker may take to answer one control request.
const BROKER_REPLY_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) struct ControlConn {
    stream: UnixStream,
    path: PathBuf,
    /// [`crate::shm::sys::fork_generation`] when connected: a child of a fork must not speak on
    /// its parent's socket (the broker would take it for the parent).
    forks: u64,
}

impl ControlConn {
    /// Connects to the broker at `path`, refusing one that runs as a uid other than ours,
    /// root's, or one of `trusted` (plus those in `AEGIS_IPC_BROKER_UID`).
    pub fn connect(path: &Path, trusted: &[u32]) -> Result<ControlConn> {
        let stream = UnixStream::connect(path).map_err(|e| Error::BrokerUnavailable {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let cred =
            nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
                .map_err(|e| Error::BrokerUnavailable {
                    path: path.to_owned(),
                    reason: format!("cannot read the broker's credentials (SO_PEERCRED): {e}"),
                })?;
        let me = nix::unistd::geteuid().as_raw();
        let from_env: Vec<u32> = std::env::var(BROKER_UID_ENV)
            .unwrap_or_default()
            .split(',')
            .filter_map(|u| u.trim().parse().ok())
            .collect();
        let uid = cred.uid();
        if uid != me && uid != 0 && !trusted.contains(&uid) && !from_env.contains(&uid) {
            return Err(Error::BrokerUnavailable {
                path: path.to_owned(),
                reason: format!(
                    "refusing the broker listening there: it runs as uid {uid}, not as ours ({me}) or root; trust it with BusOptions::broker_uids or {BROKER_UID_ENV}={uid}"
                ),
            });
        }
        stream.set_read_timeout(Some(BROKER_REPLY_TIMEOUT))?;
        stream.set_write_timeout(Some(BROKER_REPLY_TIMEOUT))?;
        Ok(ControlConn {
            stream,
            path: path.to_owned(),
            forks: crate::shm::sys::fork_generation(),
        })
    }

    fn lost(&self, reason: impl std::fmt::Display) -> Error {
        Error::BrokerUnavailable {
            path: self.path.clone(),
            reason: reason.to_string(),
        }
    }

    /// A second handle on the socket, for a thread that watches it for the broker's end.
    pub fn watch_handle(&self) -> Result<UnixStream> {
        Ok(self.stream.try_clone()?)
    }

    /// Sends one request and waits for its response and descriptors. A broker-side error
    /// comes back as the matching [`Error`].
    pub fn request(&mut self, req: &Request) -> Result<(Response, Vec<OwnedFd>)> {
        self.request_with_fds(req, &[])
    }

    /// Like [`ControlConn::request`], handing `fds` to the broker with the request.
    pub fn request_with_fds(
        &mut self,
        req: &Request,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<(Response, Vec<OwnedFd>)> {
        if crate::shm::sys::forks_seen() != self.forks {
            return Err(Error::Forked("this connection"));
        }
        let f = proto::frame(req)?;
        let mut sent = 0;
        if !fds.is_empty() {
            sent = proto::send_with_fds(self.stream.as_fd(), &f, fds).map_err(|e| self.lost(e))?;
        }
        self.stream
            .write_all(&f[sent..])
            .map_err(|e| self.lost(e))?;
        let mut hdr = [0u8; 4];
        let mut got = 0;
        let mut fds = Vec::new();
        while got < 4 {
            let n = proto::recv_with_fds::<{ proto::MAX_RESPONSE_FDS }>(
                self.stream.as_fd(),
                &mut hdr[got..],
                &mut fds,
            )
            .map_err(|e| self.lost(e))?;
            if n == 0 {
                return Err(self.lost("the broker closed the control connection"));
            }
            got += n;
        }
        let len = proto::frame_len(hdr).map_err(|e| Error::Protocol(e.to_string()))?;
        let mut body = vec![0u8; len];
        self.stream
            .read_exact(&mut body)
            .map_err(|e| self.lost(e))?;
        match proto::decode::<Response>(&body).map_err(|e| Error::Protocol(e.to_string()))? {
            Response::Error(w) => Err(w.into()),
            r => Ok((r, fds)),
        }
    }
}

/// Takes exactly `n` descriptors from a response or fails with a protocol error.
pub(crate) fn expect_fds(fds: Vec<OwnedFd>, n: usize, what: &str) -> Result<Vec<OwnedFd>> {
    if fds.len() != n {
        return Err(Error::Protocol(format!(
            "{what}: expected {n} descriptors from the broker, got {}",
            fds.len()
        )));
    }
    Ok(fds)
}
