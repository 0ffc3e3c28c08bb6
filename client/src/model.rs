//! The model the error types and names speak of, below every other layer: an instance's
//! status and the limits of names. The shared-memory layout stores these; it does not
//! define them.

/// Longest service name, instance id or resource id, in bytes.
pub const MAX_NAME: usize = 128;
/// Longest resource id, in bytes.
pub const MAX_RESOURCE_ID: usize = 255;
/// Longest method name, in bytes.
pub const MAX_METHOD: usize = 64;

/// Instance status as kept in the registry (the seed's `ServiceStatus`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Status {
    Free = 0,
    Online = 1,
    Unhealthy = 2,
    Offline = 3,
}

impl Status {
    pub fn from_u32(v: u32) -> Status {
        match v {
            1 => Status::Online,
            2 => Status::Unhealthy,
            3 => Status::Offline,
            _ => Status::Free,
        }
    }
}
