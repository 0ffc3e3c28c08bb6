//! The control protocol between clients and the broker: request/response messages, the
//! codec (bincode 2, kept behind [`encode`]/[`decode`] so it can be swapped), and framing
//! over a Unix stream socket with file descriptors passed as `SCM_RIGHTS`.
//!
//! Frame: `u32` little-endian length, then the encoded message. Descriptors travel with
//! the first byte of a frame (one `sendmsg`), so a reader that reads the 4-byte length with
//! `recvmsg` receives them.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::error::{code, Error, WireError};
use crate::model::Status;

/// Bumped when a message changes shape; checked in `Hello`.
pub const PROTOCOL_VERSION: u32 = 13;
pub const MAX_FRAME: usize = 1 << 20;
/// Descriptors the broker accepts with one request.
pub const MAX_FDS: usize = 4;
/// Segments the broker hands out with one `OpenInstance` reply (and so the
/// descriptors a client accepts with one response).
pub const OPEN_BATCH: usize = 60;
/// Descriptors a client accepts with one response: an instance comes as four (its ring,
/// its own segment and the two sides of this caller's channel to it), a `Channels`
/// reply's channel as two (the channel's two sides) and a heap as one (at most
/// `OPEN_BATCH / 2` channels and `OPEN_BATCH` heaps).
pub const MAX_RESPONSE_FDS: usize = 4 * OPEN_BATCH;
const _: () =
    assert!(2 * (OPEN_BATCH / 2) + OPEN_BATCH <= MAX_RESPONSE_FDS && MAX_RESPONSE_FDS <= 253);

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceConfig {
    /// Inline bytes per request slot (multiple of 64). `None`: the service's current or the
    /// broker's default.
    pub slot_size: Option<u32>,
    /// Slots per instance ring (power of two).
    pub slot_count: Option<u32>,
    /// Largest request or reply, in bytes.
    pub max_message: Option<u64>,
}

/// A channel a previous broker made, as its caller names it to the current one
/// ([`Request::ClaimChannels`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviousChannel {
    /// The instance it leads to (the same after the instance registers again).
    pub instance: u32,
    pub incarnation: u64,
    /// Its id under the broker that made it.
    pub channel: u64,
    pub token: [u64; 2],
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// `resume`: after a broker restart, the (index, gen) this client had, sent with its
    /// client segment's descriptor so the new broker adopts it (mailboxes stay valid).
    Hello {
        protocol: u32,
        layout: u32,
        mailboxes: u32,
        resume: Option<(u32, u32)>,
        /// This connection's secret, chosen by the client (random, kept across broker
        /// restarts): its requests carry it.
        secret: u64,
    },
    Register {
        service: String,
        instance_id: String,
        metadata: Vec<(String, String)>,
        config: ServiceConfig,
        heartbeat: Heartbeat,
        /// After a broker restart: the (index, incarnation) the instance had, sent with its
        /// segment's descriptor so the new broker adopts the very same ring.
        resume: Option<(u32, u64)>,
    },
    Unregister {
        instance: u32,
        incarnation: u64,
    },
    OpenInstance {
        instance: u32,
        incarnation: u64,
    },
    /// A serving connection asks for its instances' new and closed channels (after the
    /// registry's `InstanceEntry::channels` word of one of them moved).
    Channels,
    /// A caller hands over the request heap of its channel `channel` (one descriptor: a
    /// memfd it made, mapped and sealed `F_SEAL_FUTURE_WRITE`), the first time it needs
    /// one there; the broker checks the seals and size and passes it to the instance.
    ChannelHeap {
        channel: u64,
    },
    /// An instance's serving connection hands over the reply heap of channel `channel` of
    /// one of its instances (one descriptor: a memfd it made, mapped and sealed
    /// `F_SEAL_FUTURE_WRITE`), the first time it answers there with more than a mailbox
    /// holds; the broker checks the seals and size, charges it to the channel's caller's
    /// uid, and keeps it for the caller (`OpenReplyHeap`). `epoch`: the run of the broker
    /// that made the channel; when it is not the current broker's, the channel is named by
    /// its `token` ([`crate::shm::layout::ChannelSeg::token`]), matched against its
    /// caller's [`Request::ClaimChannels`]. (The broker decides which, so a restart between
    /// the sender's look at its session and the request's arrival changes nothing.)
    ReplyHeap {
        channel: u64,
        epoch: u64,
        token: [u64; 2],
    },
    /// A caller asks for the reply heap of its channel `channel` (it met a reply there):
    /// `Opened` with the one descriptor. `epoch`, `token`: as in `ReplyHeap`.
    OpenReplyHeap {
        channel: u64,
        epoch: u64,
        token: [u64; 2],
    },
    /// After a broker restart: the instances (index, incarnation) this client had opened,
    /// so that the new broker counts its unhealthy reports and caller statistics for
    /// their services (if the policy lets it call them). A client grants for itself only.
    Grant {
        instances: Vec<(u32, u64)>,
    },
    /// After a broker restart: the channels a previous broker made that this client still
    /// uses, each named by its token, which only the channel's caller and instance can
    /// read. The new broker never made them; with the claim, their instance can hand it a
    /// reply heap for them (`ReplyHeap` with `previous`), charged to this client's uid.
    ClaimChannels {
        channels: Vec<PreviousChannel>,
    },
    /// After `ClaimChannels`: the request heap of a claimed channel (named by its token),
    /// handed over again with its one descriptor. The previous broker may have died before
    /// the channel's instance fetched it; the requests in it that need it would then be
    /// unreadable. Checked as `ChannelHeap` is, charged to this client's uid.
    PreviousRequestHeap {
        token: [u64; 2],
    },
    /// An instance's serving connection asks for the request heap of channel `channel`
    /// that a previous broker made, named by its `token` (it met a request there that lies
    /// in the heap, and had none): `Opened` with the one descriptor, `NotOwner` until the
    /// caller has handed it over again (`PreviousRequestHeap`) and the instance registered
    /// with this broker.
    OpenRequestHeap {
        channel: u64,
        token: [u64; 2],
    },
    ListServices,
    DescribeService {
        name: String,
    },
    /// Claim ids for an instance this connection registered.
    ClaimResources {
        instance: u32,
        incarnation: u64,
        resources: Vec<ResourceSpec>,
        options: BulkOptions,
    },
    /// Release ids held by `owner`; `None` is an administrator's release of any owner's ids.
    ReleaseResources {
        owner: Option<(u32, u64)>,
        ids: Vec<String>,
        options: BulkOptions,
    },
    /// Move ids (all or none) to instance `to_instance` of `to_service`. `from`: the
    /// caller's own instance; `None` is an administrator's transfer.
    TransferResources {
        ids: Vec<String>,
        from: Option<(u32, u64)>,
        to_service: String,
        to_instance: String,
        reason: String,
    },
    QueryResources(ResourceQuery),
    /// A caller saw consecutive timeouts from this instance.
    ReportUnhealthy {
        instance: u32,
        incarnation: u64,
        reason: String,
    },
    /// Instances (of one service, or all) with state and recent transitions.
    Health {
        service: Option<String>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Response {
    /// With three descriptors: registry, shared segment, this client's segment.
    Welcome {
        bus_epoch: u64,
        client: u32,
        gen: u32,
        max_services: u32,
        broker_pid: u32,
        /// The broker's default maximum message (`--max-message`): an instance sizes its
        /// reply heap from it when its service has no sizing yet.
        max_message: u64,
    },
    /// With one descriptor: the instance segment.
    Registered {
        instance: u32,
        incarnation: u64,
        slot_size: u32,
        slot_count: u32,
        max_message: u64,
    },
    /// With one descriptor: the segment asked for.
    Opened,
    /// Instance segments, one descriptor each, the one asked for first: the other
    /// routable instances of its service come along, so a caller opens a service in one
    /// round trip rather than one per instance.
    OpenedInstances(Vec<(u32, u64)>),
    /// New channels to this connection's instances, two descriptors each (the channel's
    /// request side, read-only; its reply side, writable), then the request heaps of channels `heaps` (of
    /// those or of channels told before), one descriptor each; and the ids of closed ones;
    /// `more`: ask again.
    Channels {
        channels: Vec<ChannelInfo>,
        heaps: Vec<u64>,
        gone: Vec<u64>,
        more: bool,
    },
    Done,
    Services(Vec<ServiceInfo>),
    Service(ServiceInfo),
    Bulk(BulkReport),
    Resources(ResourcePage),
    Health(Vec<InstanceHealth>),
    Error(WireError),
}

/// One caller's channel to an instance, as a serving connection is told of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelInfo {
    pub id: u64,
    /// The caller's client `(index, gen)`: whose mailboxes its requests' replies go to.
    pub client: (u32, u32),
    /// The instance `(index, incarnation)` it leads to.
    pub instance: (u32, u64),
}

/// The seed's `ResourceMetadata`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceMetadata {
    pub resource_type: String,
    pub version: u64,
    pub tags: Vec<String>,
    pub attributes: Vec<(String, String)>,
    pub created_by: String,
    /// Released by the broker this long after the claim.
    pub ttl_ms: Option<u64>,
    pub priority: i32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceSpec {
    pub id: String,
    pub metadata: ResourceMetadata,
}

impl ResourceSpec {
    pub fn new(id: impl Into<String>) -> ResourceSpec {
        ResourceSpec {
            id: id.into(),
            metadata: ResourceMetadata::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum BulkMode {
    /// Any failure rolls back everything the request did: nothing is left half-done.
    #[default]
    AllOrNothing,
    /// Each id succeeds or fails on its own; failures are listed.
    ContinueOnError,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkOptions {
    pub mode: BulkMode,
    /// Ids per batch (0: one batch). The broker lets other requests in between batches.
    pub batch_size: u32,
    /// Take over ids owned by others (administrators only).
    pub force: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchReport {
    pub succeeded: u32,
    pub failed: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceFailure {
    pub id: String,
    /// The seed's code: 400, 403, 404, 409 or 429.
    pub code: u16,
    pub reason: String,
    /// Current owner's instance id, where one exists.
    pub owner: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkReport {
    pub succeeded: u32,
    pub failed: u32,
    pub batches: Vec<BatchReport>,
    pub failures: Vec<ResourceFailure>,
    /// All-or-nothing request that failed: everything it had done was undone.
    pub rolled_back: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceQuery {
    pub service: Option<String>,
    pub instance: Option<String>,
    pub ids: Vec<String>,
    pub resource_type: Option<String>,
    /// Every tag given must be present.
    pub tags: Vec<String>,
    /// 0 means the default of 100.
    pub limit: u32,
    pub offset: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceInfo {
    pub id: String,
    pub service: String,
    pub instance_id: String,
    pub owner_index: u32,
    pub owner_status: Status,
    pub owner_healthy: bool,
    pub metadata: ResourceMetadata,
    pub claimed_at_ms: u64,
    pub expires_at_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourcePage {
    pub items: Vec<ResourceInfo>,
    pub total: u64,
    pub has_more: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub index: u32,
    pub id: String,
    pub pid: u32,
    pub uid: u32,
    pub status: Status,
    pub requests_served: u64,
    /// Of those, answered with an error.
    pub requests_failed: u64,
    /// Requests waiting in its ring when the broker looked.
    pub queued: u64,
    pub registered_at_ms: u64,
    pub metadata: Vec<(String, String)>,
    /// Its request-duration histogram: counts per bucket of
    /// [`crate::shm::layout::HISTOGRAM_BOUNDS_NS`] (the last over every bound), since it
    /// registered.
    #[serde(default)]
    pub durations: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    pub name: String,
    pub slot_size: u32,
    pub slot_count: u32,
    pub max_message: u64,
    /// The connected callers' circuit breakers for this service, by state (each caller
    /// has its own: see [`crate::session::breaker`]).
    #[serde(default)]
    pub circuit_breaker: BreakerStates,
    pub instances: Vec<InstanceInfo>,
}

/// How many callers' circuit breakers for a service are in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakerStates {
    pub closed: u32,
    pub open: u32,
    pub half_open: u32,
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME>()
}

pub fn encode<T: Serialize>(v: &T) -> io::Result<Vec<u8>> {
    bincode::serde::encode_to_vec(v, bincode_config())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
}

pub fn decode<T: DeserializeOwned>(b: &[u8]) -> io::Result<T> {
    let (v, used) = bincode::serde::decode_from_slice(b, bincode_config())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    if used != b.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "trailing bytes in frame",
        ));
    }
    Ok(v)
}

/// Encodes a frame (length prefix + message).
pub fn frame<T: Serialize>(v: &T) -> io::Result<Vec<u8>> {
    let body = encode(v)?;
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Checks a frame length read off the socket.
pub fn frame_len(header: [u8; 4]) -> io::Result<usize> {
    let n = u32::from_le_bytes(header) as usize;
    if n > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {n} bytes is over the {MAX_FRAME}-byte limit"),
        ));
    }
    Ok(n)
}

/// One `sendmsg` of `buf` with `fds` attached; returns the bytes sent.
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    buf: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs = [ControlMessage::ScmRights(&raw)];
    let cm: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsgs };
    loop {
        match sendmsg::<()>(
            sock.as_raw_fd(),
            &[IoSlice::new(buf)],
            cm,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            // A signal handler installed without SA_RESTART (Python's are) ran meanwhile:
            // nothing was sent, send again (as std's `write_all` does).
            Err(nix::errno::Errno::EINTR) => continue,
            r => return r.map_err(io::Error::from),
        }
    }
}

/// One `recvmsg` into `buf`; received descriptors are appended to `fds`. Returns the bytes
/// read (0 at end of stream).
///
/// At most `N` descriptors are accepted; a message with more is an error (and the kernel
/// closes the excess).
pub fn recv_with_fds<const N: usize>(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    let mut space = nix::cmsg_space!([RawFd; N]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = loop {
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            // Interrupted by a signal handler before anything arrived: wait again. Taken
            // for "the broker is gone" it sent the caller into a reconnect.
            Err(nix::errno::Errno::EINTR) => continue,
            r => break r.map_err(io::Error::from)?,
        }
    };
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(rs) = c {
            for r in rs {
                // SAFETY: the kernel just installed this descriptor in our table for us;
                // nobody else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(r) });
            }
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "too many descriptors in one frame",
        ));
    }
    Ok(msg.bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_oversize_is_refused() {
        let f = frame(&Request::DescribeService {
            name: "echo".into(),
        })
        .unwrap();
        let n = frame_len(f[..4].try_into().unwrap()).unwrap();
        match decode::<Request>(&f[4..4 + n]).unwrap() {
            Request::DescribeService { name } => assert_eq!(name, "echo"),
            other => panic!("{other:?}"),
        }
        assert!(frame_len(((MAX_FRAME + 1) as u32).to_le_bytes()).is_err());
        assert!(decode::<Request>(&[0xff, 0xff, 0xff]).is_err());
    }
}

/// Hang detection settings of one instance. The serving loop advances its progress word
/// at least every `interval_ms` (while idle too); no progress for `timeout_ms` makes the
/// instance `Unhealthy` until it makes progress again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub interval_ms: u64,
    pub timeout_ms: u64,
}

impl Default for Heartbeat {
    /// Tighter than the seed's 5 s / 30 s: on one host a heartbeat is a memory write the
    /// broker reads every 100 ms, with no network jitter to allow for.
    fn default() -> Self {
        Heartbeat {
            interval_ms: 1000,
            timeout_ms: 5000,
        }
    }
}

/// A state change of an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub at_ms: u64,
    pub from: Status,
    pub to: Status,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceHealth {
    pub service: String,
    pub id: String,
    pub index: u32,
    pub pid: u32,
    pub status: Status,
    pub requests_served: u64,
    pub queued: u64,
    /// Milliseconds since the serving loop last made progress.
    pub last_progress_ms: u64,
    pub heartbeat: Heartbeat,
    /// Oldest first, the most recent few.
    pub transitions: Vec<Transition>,
}

impl ResourceFailure {
    /// The failure as the error a single-id operation would return.
    pub fn to_error(&self) -> Error {
        match self.code {
            code::CONFLICT => Error::ResourceConflict {
                resource: self.id.clone(),
                owner: self.owner.clone().unwrap_or_default(),
            },
            code::RESOURCE_NOT_FOUND => Error::ResourceNotFound {
                resource: self.id.clone(),
            },
            code::NOT_OWNER => Error::NotOwner(self.reason.clone()),
            code::LIMIT_EXCEEDED => Error::LimitExceeded(self.reason.clone()),
            _ => Error::BadRequest(self.reason.clone()),
        }
    }
}
