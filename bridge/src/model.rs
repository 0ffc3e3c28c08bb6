//! The AegisIPC messages on NATS, MessagePack-encoded with field names (as the seed's
//! Pydantic models serialize), and how a MessagePack `params`/`result` maps onto the local
//! bus's byte payloads.
//!
//! The seed fixes the request model (`service_name`, `method`, `params`, `timeout`,
//! `trace_id`, plus `resource_id` and `excluded_instances` from its later stories) but not
//! the reply; ours is `{success, result, error: {code, type, message}, instance_id,
//! trace_id, duration_ms}` with the seed's numeric codes (503, 504, 404, 409, 413, …) and
//! the error kind names of this project (`NoAvailableInstance`, `Timeout`, …).

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub const ROUTE_SUBJECT: &str = "ipc.route.request";
pub const REGISTER_SUBJECT: &str = "ipc.service.register";
pub const HEARTBEAT_SUBJECT: &str = "ipc.service.heartbeat";
/// Not in the seed's list: said when an exported instance leaves, so other hosts need not
/// wait for its heartbeats to stop.
pub const UNREGISTER_SUBJECT: &str = "ipc.service.unregister";

/// An instance's inbox subject.
pub fn inbox(instance_id: &str) -> String {
    format!("ipc.instance.{instance_id}.inbox")
}

/// The plain subject of a service's method for clients that do not speak the AegisIPC
/// models: raw bytes in, raw bytes out (`aegis.call.{service}.{method}`; the method is the
/// last token).
pub fn plain_subject(service: &str, method: &str) -> String {
    format!("aegis.call.{service}.{method}")
}

fn default_timeout() -> f64 {
    5.0
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouteRequest {
    pub service_name: String,
    pub method: String,
    #[serde(default = "empty_map")]
    pub params: rmpv::Value,
    /// Seconds.
    #[serde(default = "default_timeout")]
    pub timeout: f64,
    #[serde(default)]
    pub trace_id: String,
    #[serde(default)]
    pub resource_id: Option<String>,
    #[serde(default)]
    pub excluded_instances: Vec<String>,
}

fn nil() -> rmpv::Value {
    rmpv::Value::Nil
}

fn empty_map() -> rmpv::Value {
    rmpv::Value::Map(Vec::new())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorInfo {
    pub code: u16,
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouteResponse {
    pub success: bool,
    pub result: Option<rmpv::Value>,
    pub error: Option<ErrorInfo>,
    pub instance_id: Option<String>,
    pub trace_id: String,
    pub duration_ms: f64,
}

/// `ipc.service.register` (and `…unregister`, whose metadata is empty).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceRegistration {
    pub service_name: String,
    pub instance_id: String,
    #[serde(default = "nil")]
    pub timestamp: rmpv::Value,
    #[serde(default)]
    pub metadata: BTreeMap<String, rmpv::Value>,
}

/// `ipc.service.heartbeat`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Heartbeat {
    pub service_name: String,
    pub instance_id: String,
    #[serde(default = "nil")]
    pub timestamp: rmpv::Value,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub metadata: BTreeMap<String, rmpv::Value>,
}

/// Metadata keys a bridge puts on what it announces.
pub const META_HOST: &str = "host";
pub const META_BRIDGE: &str = "bridge";
/// The announcing bridge's signature (see `trust`).
pub const META_SIG: &str = "aegis.sig";

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(v).expect("our models always encode")
}

pub fn decode<'a, T: Deserialize<'a>>(b: &'a [u8]) -> Result<T, String> {
    rmp_serde::from_slice(b).map_err(|e| format!("malformed MessagePack: {e}"))
}

/// The local payload for a request's `params`: the bytes of a `{"_raw": <bin>}` map as
/// they are (how a bridge forwards bytes that are not MessagePack), anything else
/// MessagePack-encoded.
pub fn params_to_payload(params: &rmpv::Value) -> Vec<u8> {
    if let rmpv::Value::Map(m) = params {
        if let [(k, rmpv::Value::Binary(b))] = m.as_slice() {
            if k.as_str() == Some("_raw") {
                return b.clone();
            }
        }
    }
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, params).expect("writing to a Vec");
    out
}

/// The `params` for a local payload: the map it encodes, or `{"_raw": <bin>}`.
pub fn payload_to_params(payload: &[u8]) -> rmpv::Value {
    match whole_value(payload) {
        Some(v @ rmpv::Value::Map(_)) => v,
        _ => rmpv::Value::Map(vec![(
            rmpv::Value::from("_raw"),
            rmpv::Value::Binary(payload.to_vec()),
        )]),
    }
}

/// A reply's `result`: the MessagePack value the bytes are, or the bytes as binary.
pub fn reply_to_result(reply: &[u8]) -> rmpv::Value {
    whole_value(reply).unwrap_or_else(|| rmpv::Value::Binary(reply.to_vec()))
}

/// The local reply bytes for a `result`: binary as it is, anything else encoded.
pub fn result_to_reply(result: &rmpv::Value) -> Vec<u8> {
    match result {
        rmpv::Value::Binary(b) => b.clone(),
        v => {
            let mut out = Vec::new();
            rmpv::encode::write_value(&mut out, v).expect("writing to a Vec");
            out
        }
    }
}

/// The value `b` encodes when it is exactly one MessagePack value.
fn whole_value(b: &[u8]) -> Option<rmpv::Value> {
    if b.is_empty() {
        return None;
    }
    let mut r = b;
    let v = rmpv::decode::read_value(&mut r).ok()?;
    r.is_empty().then_some(v)
}

/// Now as the seed's timestamps read: ISO-8601 UTC (`2026-11-30T02:30:00.123Z`).
pub fn now_iso() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// A trace id as the local bus carries it (64 bits): hexadecimal ids as they are, any
/// other string hashed. `None` for an empty one.
pub fn trace_to_u64(s: &str) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let t = s.trim_start_matches("0x");
    if t.len() <= 16 {
        if let Ok(v) = u64::from_str_radix(t, 16) {
            return Some(v);
        }
    }
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    Some(h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_through_params_and_results() {
        for p in [&b"not msgpack \xc1"[..], b"", &[0x81, 0xa1, b'a', 0x01]] {
            assert_eq!(params_to_payload(&payload_to_params(p)), p);
        }
        for r in [&b"plain text"[..], &[0x93, 1, 2, 3], b""] {
            assert_eq!(result_to_reply(&reply_to_result(r)), r);
        }
    }

    #[test]
    fn iso_timestamps_look_like_the_seeds() {
        let t = now_iso();
        assert_eq!(t.len(), 24, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z') && t.as_bytes()[10] == b'T');
    }

    #[test]
    fn a_route_request_decodes_with_defaults() {
        #[derive(Serialize)]
        struct Min<'a> {
            service_name: &'a str,
            method: &'a str,
        }
        let r: RouteRequest = decode(&encode(&Min {
            service_name: "s",
            method: "m",
        }))
        .unwrap();
        assert_eq!((r.timeout, r.trace_id.as_str()), (5.0, ""));
        assert!(decode::<RouteRequest>(b"\xc1garbage").is_err());
    }
}

/// The seed's error type name for `e` (`NoAvailableInstanceError`, `InstanceTimeoutError`,
/// …), carried in a `RouteResponse`'s `error.type`.
pub fn seed_error_type(e: &aegis_client::Error) -> &'static str {
    use aegis_client::Error as E;
    match e {
        E::NoAvailableInstance { .. } | E::CircuitOpen { .. } => "NoAvailableInstanceError",
        E::Timeout { .. } => "InstanceTimeoutError",
        E::BadRequest(_) => "SerializationError",
        E::MessageTooLarge { .. } => "MessageTooLargeError",
        E::LoopDetected { .. } => "RoutingLoopError",
        E::ResourceConflict { .. } | E::Conflict { .. } => "ResourceConflictError",
        E::ResourceNotFound { .. } => "ResourceNotFoundError",
        E::OwnerUnavailable { .. } => "OwnerUnavailableError",
        E::NotOwner(_) => "ResourceOwnershipError",
        E::LimitExceeded(_) => "ResourceLimitExceededError",
        E::PermissionDenied(_) => "PermissionDeniedError",
        E::Remote { .. } => "RemoteError",
        _ => "InternalError",
    }
}

/// The answer to an `ipc.service.register` request (the seed's request-reply: 200, 409 for
/// an instance id already registered elsewhere, 400 for an invalid registration).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegistrationReply {
    pub success: bool,
    pub status_code: u16,
    pub message: String,
    pub service_name: String,
    pub instance_id: String,
}

impl RegistrationReply {
    pub fn ok(service: &str, id: &str) -> RegistrationReply {
        RegistrationReply {
            success: true,
            status_code: 200,
            message: "registered".into(),
            service_name: service.into(),
            instance_id: id.into(),
        }
    }
    pub fn refused(code: u16, message: String, service: &str, id: &str) -> RegistrationReply {
        RegistrationReply {
            success: false,
            status_code: code,
            message,
            service_name: service.into(),
            instance_id: id.into(),
        }
    }
}
