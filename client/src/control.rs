//! The client's end of the control socket: blocking request/response with descriptors.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::proto::{self, Request, Response};

/// How long a broker may take to answer one control request.
const BROKER_REPLY_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) struct ControlConn {
    stream: UnixStream,
    path: PathBuf,
}

impl ControlConn {
    pub fn connect(path: &Path) -> Result<ControlConn> {
        let stream = UnixStream::connect(path).map_err(|e| Error::BrokerUnavailable {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        stream.set_read_timeout(Some(BROKER_REPLY_TIMEOUT))?;
        stream.set_write_timeout(Some(BROKER_REPLY_TIMEOUT))?;
        Ok(ControlConn {
            stream,
            path: path.to_owned(),
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
            let n = proto::recv_with_fds::<{ proto::OPEN_BATCH }>(
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
