//! # aegis-client
//!
//! Everything a process needs to join an aegis-ipc bus: call services by name over shared
//! memory, or serve as an instance of one.
//!
//! ```no_run
//! use aegis_client::{Bus, CallOptions};
//! let bus = Bus::connect()?;                       // finds the broker via AEGIS_IPC_DIR, …
//! let inst = bus.register("echo", "echo-1", &[])?; // serve: usually in another process
//! std::thread::spawn(move || inst.serve(|req, out| { out.extend_from_slice(req.payload()); Ok(()) }));
//! let reply = bus.call("echo", "ping", b"hello", &CallOptions::default())?;
//! assert_eq!(reply.payload, b"hello");
//! # Ok::<(), aegis_client::Error>(())
//! ```
//!
//! Layers, bottom up: [`sys`] (futex, memfd), [`layout`] (the shared-memory types and
//! offsets), [`ring`] and [`mailbox`] (the lock-free core), [`proto`] (control socket),
//! [`wait`] (spin, yield or sleep), then the connection ([`bus`]: session, routing,
//! queries) and what is built on it, each knowing `bus` and not the reverse: the call path
//! ([`call`]), joining and rejoining (`connect`), serving ([`Instance`]), async calls
//! (`future`, feature `async`).

pub mod breaker;
pub mod bus;
pub mod call;
pub mod codec;
mod connect;
mod control;
pub mod dirs;
#[cfg(feature = "async")]
mod doorbell;
pub mod error;
#[cfg(feature = "async")]
mod future;
#[doc(hidden)]
#[cfg(not(loom))]
pub mod fuzzing;
pub mod heap;
pub mod instance;
pub mod layout;
pub mod mailbox;
pub mod names;
mod pool;
pub mod proto;
pub mod ring;
mod sync;
pub mod sys;
#[cfg(feature = "test-hooks")]
mod test_hooks;
pub mod wait;

pub use breaker::CircuitBreaker;
pub use bus::{Bus, BusOptions, CallInfo, ResourceOwner, Selection};
pub use call::{CallOptions, Interrupt, Pending, Reply};
pub use error::{Attempt, Error, Result, ServiceError};
#[cfg(feature = "async")]
pub use future::EventFd;
pub use instance::{Instance, Receiver, RegisterOptions, Request, StopHandle};
pub use layout::Status;
pub use proto::{
    BulkMode, BulkOptions, BulkReport, Heartbeat, InstanceHealth, InstanceInfo, ResourceInfo,
    ResourceMetadata, ResourcePage, ResourceQuery, ResourceSpec, ServiceConfig, ServiceInfo,
    Transition,
};
pub use wait::Spin;
