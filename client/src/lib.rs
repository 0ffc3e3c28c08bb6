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
//! Layers, bottom up, one folder each: the error model ([`error`], [`names`], [`model`],
//! [`trace`]: importing nothing above), [`shm`] (segment layouts per kind, futex, memfd),
//! [`channel`] (ring, mailboxes, heap, waiting), [`session`] (the control protocol, the
//! connection, routing, breakers), then [`call`] and [`serve`] on top, each knowing the
//! session and not the reverse.

// The error model, at the bottom: it imports none of the layers above it.
pub mod codec;
pub mod error;
pub mod model;
pub mod names;
pub mod trace;

/// Shared memory: the segment layouts (one module per segment kind), the allocator for a
/// segment's heap of large messages, the futex and memfd calls, and the atomics shim loom
/// swaps in.
pub mod shm {
    pub mod heap;
    pub mod layout;
    pub(crate) mod sync;
    pub mod sys;
}

/// What moves a call through shared memory: the request ring, the reply mailboxes, and
/// waiting (spin, yield or sleep).
pub mod channel {
    pub mod mailbox;
    pub mod ring;
    pub mod wait;
}

/// A connection to the bus: the control protocol and socket, joining and rejoining after a
/// broker restart, routing (`bus`), a connection's mailboxes and its circuit breakers.
pub mod session {
    pub mod breaker;
    pub mod bus;
    pub(crate) mod connect;
    pub(crate) mod control;
    pub mod dirs;
    pub(crate) mod pool;
    pub mod proto;
}

/// Calling: the call path, failover, stalls, `submit` (in `call/mod.rs`), async calls.
pub mod call;

/// Serving: registering instances and their serving loops.
pub mod serve {
    pub mod instance;
    pub(crate) mod sweep;
}

#[doc(hidden)]
#[cfg(not(loom))]
pub mod fuzzing;
#[cfg(feature = "test-hooks")]
mod test_hooks;

// The paths users and the other crates of the workspace name.
pub use channel::{mailbox, ring, wait};
pub use serve::instance;
pub use session::{breaker, bus, dirs, proto};
pub use shm::{heap, layout, sys};

pub use breaker::CircuitBreaker;
pub use bus::{Bus, BusOptions, CallInfo, ResourceOwner, Selection};
#[cfg(feature = "async")]
pub use call::future::EventFd;
pub use call::{BorrowedReply, CallContext, CallOptions, Interrupt, Loan, Pending, Reply};
pub use error::{Attempt, Error, Result, ServiceError};
pub use instance::{Instance, Receiver, RegisterOptions, ReplyLoan, Request, StopHandle};
pub use model::Status;
pub use proto::{
    BulkMode, BulkOptions, BulkReport, Heartbeat, InstanceHealth, InstanceInfo, ResourceInfo,
    ResourceMetadata, ResourcePage, ResourceQuery, ResourceSpec, ServiceConfig, ServiceInfo,
    Transition,
};
pub use trace::TraceContext;
pub use wait::Spin;
