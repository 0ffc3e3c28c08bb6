//! # aegis-broker
//!
//! The daemon that owns a bus: creates every shared-memory segment (memfds, handed to
//! peers over the control socket), is the only writer of the registry, and serves the
//! control socket with tokio. It is not on the data path: calls flow between processes
//! through the segments it handed out.

pub mod config;
mod http;
pub mod identities;
pub mod journal;
pub mod liveness;
mod metrics;
mod notify;
pub mod policy;
mod resources;
mod server;
pub mod state;

pub use config::{BrokerConfig, ExitDetection, LogFormat};
pub use server::{run, run_with, LogReload};
