//! The error model carried over from AegisIPC: one enum a caller can match on, with
//! messages that name the service, instance or resource involved, and the seed's codes.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One attempt of a call (failures that span attempts list every one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub instance: String,
    pub error: String,
    pub duration: Duration,
}

fn attempts_text(a: &[Attempt]) -> String {
    a.iter()
        .map(|a| format!("{}: {} after {:?}", a.instance, a.error, a.duration))
        .collect::<Vec<_>>()
        .join("; ")
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// 503: the service has no healthy instance.
    #[error("no available instance of service '{service}'")]
    NoAvailableInstance { service: String },
    /// 503: this caller's circuit breaker for the service is open (its recent calls all
    /// timed out): the call failed at once, without being sent. See [`crate::session::breaker`].
    #[error("circuit breaker for service '{service}' is open (recent calls timed out); retry in {retry_in:?}")]
    CircuitOpen { service: String, retry_in: Duration },
    /// 504: the deadline passed. `trace_id` is the call's (every attempt carried it).
    #[error("call to service '{service}' (trace {trace_id:#x}) timed out after {elapsed:?} [{}]", attempts_text(.attempts))]
    Timeout {
        service: String,
        elapsed: Duration,
        attempts: Vec<Attempt>,
        trace_id: u64,
    },
    /// 400: an invalid name, id, method or undecodable payload.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// 404: no instance owns the resource.
    #[error("resource '{resource}' is not owned by any instance")]
    ResourceNotFound { resource: String },
    /// 409: the resource is already owned.
    #[error("resource '{resource}' is already owned by instance '{owner}'")]
    ResourceConflict { resource: String, owner: String },
    /// 503: the resource's owner exists but is not healthy.
    #[error("resource '{resource}' is owned by instance '{owner}', which is {status:?}")]
    OwnerUnavailable {
        resource: String,
        owner: String,
        status: crate::model::Status,
    },
    /// 403: release/transfer of something one does not own.
    #[error("not owner: {0}")]
    NotOwner(String),
    /// 409: an instance id held by another live process.
    #[error(
        "instance '{instance_id}' of service '{service}' is already registered by pid {holder_pid}"
    )]
    Conflict {
        service: String,
        instance_id: String,
        holder_pid: u32,
    },
    /// 403: the broker's access policy does not let this uid serve or call the service
    /// (the message names the rule).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// 429: a capacity or per-instance limit.
    #[error("limit exceeded: {0}")]
    LimitExceeded(String),
    /// 508: nested calls went deeper than the hop limit.
    #[error("loop detected: {hops} hops, the limit is {limit}")]
    LoopDetected { hops: u8, limit: u8 },
    /// 413: payload over the service's maximum message size.
    #[error("message of {size} bytes is over the {max}-byte maximum of service '{service}'")]
    MessageTooLarge {
        service: String,
        size: u64,
        max: u64,
    },
    /// 502: the broker's control socket cannot be reached.
    #[error("broker unavailable at {}: {reason}", .path.display())]
    BrokerUnavailable { path: PathBuf, reason: String },
    /// The handler of the instance returned an error (application code, message).
    #[error("instance '{instance}' answered with error {code}: {message}")]
    Remote {
        instance: String,
        code: u16,
        message: String,
    },
    /// Client and broker disagree on the protocol or layout version.
    #[error("incompatible with the broker: {0}")]
    Incompatible(String),
    /// A segment that could not be opened (the layout's own error, as text: this module
    /// sits below the layout and knows nothing of it).
    #[error("{0}")]
    Layout(String),
    /// The broker or a peer sent something that does not follow the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The call's [`crate::CallOptions::interrupt`] check stopped it (a signal arrived).
    #[error("call interrupted while waiting for its reply")]
    Interrupted,
    /// An object inherited across `fork()` was used in the child: a connection, instance
    /// or call belongs to the process that made it.
    #[error("{0} was made by the parent process before fork(); connect again in this process")]
    Forked(&'static str),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Status codes (the seed's HTTP-style numbers) used on the wire and in mailboxes.
pub mod code {
    pub const OK: u16 = 0;
    pub const BAD_REQUEST: u16 = 400;
    pub const NOT_OWNER: u16 = 403;
    pub const RESOURCE_NOT_FOUND: u16 = 404;
    pub const CONFLICT: u16 = 409;
    pub const MESSAGE_TOO_LARGE: u16 = 413;
    pub const INCOMPATIBLE: u16 = 426;
    pub const LIMIT_EXCEEDED: u16 = 429;
    pub const INTERNAL: u16 = 500;
    pub const BROKER_UNAVAILABLE: u16 = 502;
    pub const NO_AVAILABLE_INSTANCE: u16 = 503;
    pub const TIMEOUT: u16 = 504;
    pub const LOOP_DETECTED: u16 = 508;
}

impl Error {
    /// The seed's numeric code for this error.
    pub fn code(&self) -> u16 {
        match self {
            Error::NoAvailableInstance { .. }
            | Error::OwnerUnavailable { .. }
            | Error::CircuitOpen { .. } => code::NO_AVAILABLE_INSTANCE,
            Error::Timeout { .. } => code::TIMEOUT,
            Error::BadRequest(_) => code::BAD_REQUEST,
            Error::ResourceNotFound { .. } => code::RESOURCE_NOT_FOUND,
            Error::ResourceConflict { .. } | Error::Conflict { .. } => code::CONFLICT,
            Error::NotOwner(_) | Error::PermissionDenied(_) => code::NOT_OWNER,
            Error::LimitExceeded(_) => code::LIMIT_EXCEEDED,
            Error::LoopDetected { .. } => code::LOOP_DETECTED,
            Error::MessageTooLarge { .. } => code::MESSAGE_TOO_LARGE,
            Error::BrokerUnavailable { .. } => code::BROKER_UNAVAILABLE,
            Error::Remote { code, .. } => *code,
            Error::Incompatible(_) => code::INCOMPATIBLE,
            Error::Layout(_) | Error::Protocol(_) | Error::Io(_) | Error::Interrupted => {
                code::INTERNAL
            }
            Error::Forked(_) => code::BAD_REQUEST,
        }
    }

    /// A handler's answer that is one of the bus's own errors, as the kind a caller would
    /// have had itself, with the instance's text: 413 (its reply was over the maximum) is
    /// `MessageTooLarge`, 508 (its own nested call found a loop) `LoopDetected` — not one
    /// "answered with error 508:" prefix per hop. `None` for every other error. The
    /// bindings (C, Python) map these to their own statuses and classes.
    pub fn remote_as_local(&self) -> Option<(&'static str, &str)> {
        match self {
            Error::Remote { code, message, .. } => match *code {
                code::MESSAGE_TOO_LARGE => Some(("MessageTooLarge", message)),
                code::LOOP_DETECTED => Some(("LoopDetected", message)),
                _ => None,
            },
            _ => None,
        }
    }

    /// The stable name of the error kind (`NoAvailableInstance`, `Timeout`, …) for JSON output.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::NoAvailableInstance { .. } => "NoAvailableInstance",
            Error::Timeout { .. } => "Timeout",
            Error::CircuitOpen { .. } => "CircuitOpen",
            Error::BadRequest(_) => "BadRequest",
            Error::ResourceNotFound { .. } => "ResourceNotFound",
            Error::OwnerUnavailable { .. } => "OwnerUnavailable",
            Error::ResourceConflict { .. } => "ResourceConflict",
            Error::NotOwner(_) => "NotOwner",
            Error::Conflict { .. } => "Conflict",
            Error::LimitExceeded(_) => "LimitExceeded",
            Error::LoopDetected { .. } => "LoopDetected",
            Error::MessageTooLarge { .. } => "MessageTooLarge",
            Error::BrokerUnavailable { .. } => "BrokerUnavailable",
            Error::PermissionDenied(_) => "PermissionDenied",
            Error::Remote { .. } => "Remote",
            Error::Incompatible(_) => "Incompatible",
            Error::Layout(_) => "Layout",
            Error::Protocol(_) => "Protocol",
            Error::Io(_) => "Io",
            Error::Interrupted => "Interrupted",
            Error::Forked(_) => "Forked",
        }
    }
}

/// An error as the broker sends it over the control socket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum WireError {
    BadRequest(String),
    Conflict {
        service: String,
        instance_id: String,
        holder_pid: u32,
    },
    LimitExceeded(String),
    NotOwner(String),
    PermissionDenied(String),
    Incompatible(String),
    ResourceNotFound {
        resource: String,
    },
    ResourceConflict {
        resource: String,
        owner: String,
    },
    NoAvailableInstance {
        service: String,
    },
    Internal(String),
}

impl From<WireError> for Error {
    fn from(w: WireError) -> Error {
        match w {
            WireError::BadRequest(m) => Error::BadRequest(m),
            WireError::Conflict {
                service,
                instance_id,
                holder_pid,
            } => Error::Conflict {
                service,
                instance_id,
                holder_pid,
            },
            WireError::LimitExceeded(m) => Error::LimitExceeded(m),
            WireError::NotOwner(m) => Error::NotOwner(m),
            WireError::PermissionDenied(m) => Error::PermissionDenied(m),
            WireError::Incompatible(m) => Error::Incompatible(m),
            WireError::NoAvailableInstance { service } => Error::NoAvailableInstance { service },
            WireError::ResourceNotFound { resource } => Error::ResourceNotFound { resource },
            WireError::ResourceConflict { resource, owner } => {
                Error::ResourceConflict { resource, owner }
            }
            WireError::Internal(m) => Error::Protocol(format!("broker: {m}")),
        }
    }
}

/// What a handler returns to fail a request: a code (400 for undecodable input, or any
/// application code) and a message, delivered to the caller as [`Error::Remote`] (or
/// [`Error::BadRequest`] for 400).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceError {
    pub code: u16,
    pub message: String,
}

impl ServiceError {
    pub fn new(code: u16, message: impl Into<String>) -> ServiceError {
        ServiceError {
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> ServiceError {
        ServiceError::new(code::BAD_REQUEST, message)
    }
}

impl std::fmt::Display for ServiceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (code {})", self.message, self.code)
    }
}

impl std::error::Error for ServiceError {}
