//! # aegis-ffi: the C ABI of aegis-ipc
//!
//! `libaegis_ipc.so.0` / `libaegis_ipc.a` and `include/aegis_ipc.h` (generated from this file
//! by cbindgen; `tests/header.rs` fails when the committed header drifts). Processes in any
//! language with a C FFI join the bus through it: connect, call by service or resource,
//! register and serve, resources, listings, watch, submitted calls and the event fd.
//!
//! Conventions (the header repeats them):
//!
//! * Every function returns an [`aegis_status`]; `AEGIS_OK` is 0. After a failure,
//!   [`aegis_last_error`] gives this thread's detail text (the resource's owner, every
//!   failover attempt, …).
//! * Handles are opaque pointers; every `*_free` accepts NULL. Using a handle after its free
//!   is undefined; a NULL handle is `AEGIS_NULL_ARGUMENT`.
//! * Strings are NUL-terminated UTF-8; anything else is `AEGIS_INVALID_ARGUMENT`.
//! * A Rust panic never crosses the boundary: it becomes `AEGIS_PANIC`.
//!
//! Threads: an `aegis_bus` may be used from any number of threads at once; so may an
//! `aegis_instance` (several threads may serve it). `aegis_call_options`, `aegis_receiver`
//! and `aegis_pending` belong to one thread at a time.

#![allow(non_camel_case_types)]
// Every exported function checks its pointers before use; documenting each raw-pointer
// parameter's contract is the header's job, not a `# Safety` section per function.
#![allow(clippy::missing_safety_doc)]

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::os::fd::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use aegis_client::{
    BorrowedReply, Bus, BusOptions, CallInfo, CallOptions, Error, Instance, Loan, Pending,
    Receiver, RegisterOptions, ReplyLoan, Request, ResourceQuery, Selection, ServiceError, Spin,
};

/// What a function did. Values of 400 and up are the seed's codes (`code / 10` for the
/// four-digit ones, which share a seed code with another error: see `aegis_status_code`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum aegis_status {
    AEGIS_OK = 0,
    /// The reply (or text) did not fit; `*needed` says how many bytes it takes. A call's
    /// reply is kept: fetch it with `aegis_last_reply`.
    AEGIS_BUFFER_TOO_SMALL = 1,
    /// A required pointer or handle was NULL.
    AEGIS_NULL_ARGUMENT = 2,
    /// A string was not UTF-8, or a value out of range.
    AEGIS_INVALID_ARGUMENT = 3,
    /// A bug inside the library (a Rust panic, caught at the boundary).
    AEGIS_PANIC = 4,
    /// `aegis_receiver_next`: no request within the timeout.
    AEGIS_NO_REQUEST = 5,
    /// `aegis_receiver_next`: the instance was stopped.
    AEGIS_STOPPED = 6,
    /// `aegis_pending_ready`: not yet. `aegis_try_submit`: the ring is full; try again.
    AEGIS_NOT_READY = 7,
    /// The instance's handler answered with an error: its code is `aegis_last_remote_code`.
    AEGIS_REMOTE = 8,
    /// `aegis_last_reply`: this thread's last call failed (or none was made): no reply.
    AEGIS_NO_REPLY = 9,
    AEGIS_BAD_REQUEST = 400,
    AEGIS_NOT_OWNER = 403,
    AEGIS_PERMISSION_DENIED = 4031,
    AEGIS_RESOURCE_NOT_FOUND = 404,
    AEGIS_RESOURCE_CONFLICT = 409,
    AEGIS_INSTANCE_CONFLICT = 4091,
    AEGIS_MESSAGE_TOO_LARGE = 413,
    AEGIS_INCOMPATIBLE = 426,
    AEGIS_LIMIT_EXCEEDED = 429,
    AEGIS_INTERNAL = 500,
    AEGIS_BROKER_UNAVAILABLE = 502,
    AEGIS_NO_AVAILABLE_INSTANCE = 503,
    AEGIS_OWNER_UNAVAILABLE = 5031,
    /// This connection's circuit breaker for the service is open: failed without sending.
    AEGIS_CIRCUIT_OPEN = 5032,
    AEGIS_TIMEOUT = 504,
    AEGIS_LOOP_DETECTED = 508,
}

use aegis_status::*;

/// A connection to the bus (thread-safe).
pub struct aegis_bus {
    bus: Bus,
}

/// A registered instance (thread-safe; several threads may serve it).
pub struct aegis_instance {
    inst: Instance,
}

/// Options for calls (one thread at a time). Defaults: 15 s timeout, 5 s per attempt, 3
/// attempts, not idempotent, round-robin, adaptive spin.
pub struct aegis_call_options {
    opts: CallOptions,
}

/// A library-owned buffer; free with `aegis_buffer_free`.
#[repr(C)]
pub struct aegis_buffer {
    pub data: *mut u8,
    pub len: usize,
}

/// Where a serving callback writes its answer (valid only during the callback).
pub struct aegis_responder {
    out: *mut Vec<u8>,
    error: Option<ServiceError>,
    /// The service's maximum message size: a larger reply is refused at `aegis_respond`.
    max: u64,
}

/// A request handler: reads `method` (NUL-terminated) and `payload`, answers through
/// `responder` (`aegis_respond` or `aegis_respond_error`; neither = an empty reply). It runs
/// on the serving thread and must not unwind (C++ exceptions) or `longjmp` out.
pub type aegis_handler = Option<
    unsafe extern "C" fn(
        ctx: *mut c_void,
        method: *const c_char,
        payload: *const u8,
        payload_len: usize,
        responder: *mut aegis_responder,
    ),
>;

/// A writable buffer for a request to one service (`aegis_loan`), in the request heap of
/// the bus's channel to one of its instances: written in place, sent without a copy by
/// `aegis_call_loan` (which takes it), or given back by `aegis_loan_free`.
pub struct aegis_request_loan {
    loan: Loan,
}

/// A reply read in place, where the instance wrote it (`aegis_call_loan`,
/// `aegis_call_view`): its bytes stay valid until `aegis_reply_view_free`, which gives its
/// memory back (it is the calling connection's, in its channel to that instance).
pub struct aegis_reply_view {
    reply: BorrowedReply,
}

/// Pull-style serving for one thread (see `aegis_receiver_new`).
pub struct aegis_receiver {
    // Field order matters: the request borrows the receiver, so it is dropped first; a
    // reply loan is the instance's (not the receiver's) and goes before both.
    loan: Option<ReplyLoan<'static>>,
    req: Option<Request<'static>>,
    method: [u8; 65],
    rx: Box<Receiver<'static>>,
    inst: &'static aegis_instance,
}

/// A submitted call whose reply is collected later (one thread at a time).
pub struct aegis_pending {
    pending: Option<Pending<'static>>,
}

/// This thread's last call: its reply buffer (reused: no allocation once it has grown),
/// whether that call succeeded, and who answered the last one that did.
struct LastCall {
    reply: Vec<u8>,
    ok: bool,
    answered_by: Option<CallInfo>,
}

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
    /// Whether the entry point running on this thread has set `LAST_ERROR` yet.
    static ERROR_SET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static LAST_REMOTE_CODE: std::cell::Cell<u16> = const { std::cell::Cell::new(0) };
    static LAST_CALL: RefCell<LastCall> = const {
        RefCell::new(LastCall { reply: Vec::new(), ok: false, answered_by: None })
    };
    /// The request this thread is handling (hops, trace id), in `aegis_serve`'s callback or
    /// between `aegis_receiver_next` and its reply: a call made meanwhile is a nested call,
    /// one hop further on the same trace, so services calling each other in a loop end in
    /// `AEGIS_LOOP_DETECTED`.
    static CURRENT: std::cell::Cell<Option<aegis_client::CallContext>> = const { std::cell::Cell::new(None) };
}

fn set_error(text: String) {
    ERROR_SET.with(|s| s.set(true));
    LAST_ERROR.with(|e| *e.borrow_mut() = text);
}

/// The status of an error, remembering its text for `aegis_last_error`.
fn fail(e: Error) -> aegis_status {
    let s = match &e {
        Error::NoAvailableInstance { .. } => AEGIS_NO_AVAILABLE_INSTANCE,
        Error::OwnerUnavailable { .. } => AEGIS_OWNER_UNAVAILABLE,
        Error::CircuitOpen { .. } => AEGIS_CIRCUIT_OPEN,
        Error::Timeout { .. } => AEGIS_TIMEOUT,
        Error::BadRequest(_) => AEGIS_BAD_REQUEST,
        Error::ResourceNotFound { .. } => AEGIS_RESOURCE_NOT_FOUND,
        Error::ResourceConflict { .. } => AEGIS_RESOURCE_CONFLICT,
        Error::Conflict { .. } => AEGIS_INSTANCE_CONFLICT,
        Error::NotOwner(_) => AEGIS_NOT_OWNER,
        Error::PermissionDenied(_) => AEGIS_PERMISSION_DENIED,
        Error::LimitExceeded(_) => AEGIS_LIMIT_EXCEEDED,
        Error::LoopDetected { .. } => AEGIS_LOOP_DETECTED,
        Error::MessageTooLarge { .. } => AEGIS_MESSAGE_TOO_LARGE,
        Error::BrokerUnavailable { .. } => AEGIS_BROKER_UNAVAILABLE,
        Error::Incompatible(_) => AEGIS_INCOMPATIBLE,
        Error::Remote { code, .. } => {
            LAST_REMOTE_CODE.with(|c| c.set(*code));
            if let Some((kind, message)) = e.remote_as_local() {
                set_error(message.to_owned());
                return if kind == "LoopDetected" {
                    AEGIS_LOOP_DETECTED
                } else {
                    AEGIS_MESSAGE_TOO_LARGE
                };
            }
            AEGIS_REMOTE
        }
        Error::Forked(_) => AEGIS_BAD_REQUEST,
        _ => AEGIS_INTERNAL,
    };
    set_error(e.to_string());
    s
}

/// Runs `f` with panics caught: the boundary never unwinds. A status other than OK always
/// leaves its own text for `aegis_last_error` (a generic one where `f` gave none), never an
/// older unrelated one.
fn guard(f: impl FnOnce() -> aegis_status) -> aegis_status {
    ERROR_SET.with(|s| s.set(false));
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(AEGIS_OK) => AEGIS_OK,
        Ok(s) => {
            if !ERROR_SET.with(|e| e.get()) {
                // SAFETY: `aegis_status_str` returns a static NUL-terminated string.
                let name = unsafe { CStr::from_ptr(aegis_status_str(s as c_int)) };
                set_error(name.to_string_lossy().into_owned());
            }
            s
        }
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown".into());
            set_error(format!("internal error (panic): {what}"));
            AEGIS_PANIC
        }
    }
}

/// A required pointer, or `AEGIS_NULL_ARGUMENT` naming it.
macro_rules! need {
    ($p:expr, $name:literal) => {
        match $p {
            Some(v) => v,
            None => {
                set_error(concat!("argument `", $name, "` is NULL").into());
                return AEGIS_NULL_ARGUMENT;
            }
        }
    };
}

/// The value of a checked argument, or the function returns its status.
macro_rules! arg {
    ($checked:expr) => {
        match $checked {
            Ok(v) => v,
            Err(status) => return status,
        }
    };
}

/// A NUL-terminated UTF-8 argument.
unsafe fn text<'a>(p: *const c_char, name: &str) -> Result<&'a str, aegis_status> {
    if p.is_null() {
        set_error(format!("argument `{name}` is NULL"));
        return Err(AEGIS_NULL_ARGUMENT);
    }
    // SAFETY: the caller passes a NUL-terminated string (the header's contract).
    unsafe { CStr::from_ptr(p) }.to_str().map_err(|_| {
        set_error(format!("argument `{name}` is not UTF-8"));
        AEGIS_INVALID_ARGUMENT
    })
}

/// `len` bytes at `p` (NULL allowed when `len` is 0).
unsafe fn bytes<'a>(p: *const u8, len: usize, name: &str) -> Result<&'a [u8], aegis_status> {
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        set_error(format!("argument `{name}` is NULL with length {len}"));
        return Err(AEGIS_NULL_ARGUMENT);
    }
    // SAFETY: the caller passes `len` readable bytes (the header's contract).
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// Copies `src` into `(buf, cap)`, setting `*needed`; `AEGIS_BUFFER_TOO_SMALL` if it does
/// not fit (nothing is written then).
unsafe fn copy_out(src: &[u8], buf: *mut u8, cap: usize, needed: *mut usize) -> aegis_status {
    // SAFETY: forwarded caller contract.
    let s = unsafe { copy_out_quietly(src, buf, cap, needed) };
    if s == AEGIS_BUFFER_TOO_SMALL {
        set_error(format!(
            "{} bytes do not fit the {cap}-byte buffer",
            src.len()
        ));
    }
    s
}

/// `copy_out` leaving `aegis_last_error`'s text alone (for `aegis_last_error` itself).
unsafe fn copy_out_quietly(
    src: &[u8],
    buf: *mut u8,
    cap: usize,
    needed: *mut usize,
) -> aegis_status {
    if !needed.is_null() {
        // SAFETY: non-NULL `needed` points to a writable size_t (the header's contract).
        unsafe { *needed = src.len() };
    }
    if src.len() > cap || (buf.is_null() && !src.is_empty()) {
        return AEGIS_BUFFER_TOO_SMALL;
    }
    if !src.is_empty() {
        // SAFETY: `buf` has `cap >= src.len()` writable bytes.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), buf, src.len()) };
    }
    AEGIS_OK
}

/// Moves a Vec into a library-owned `aegis_buffer`.
fn to_buffer(v: Vec<u8>, out: &mut aegis_buffer) {
    let b = v.into_boxed_slice();
    out.len = b.len();
    out.data = Box::into_raw(b) as *mut u8;
}

// --- errors -----------------------------------------------------------------------------

/// The status a C integer names, if any (C may pass any int where an enum is declared).
fn status_from(v: c_int) -> Option<aegis_status> {
    const ALL: [aegis_status; 26] = [
        AEGIS_OK,
        AEGIS_BUFFER_TOO_SMALL,
        AEGIS_NULL_ARGUMENT,
        AEGIS_INVALID_ARGUMENT,
        AEGIS_PANIC,
        AEGIS_NO_REQUEST,
        AEGIS_STOPPED,
        AEGIS_NOT_READY,
        AEGIS_REMOTE,
        AEGIS_NO_REPLY,
        AEGIS_BAD_REQUEST,
        AEGIS_NOT_OWNER,
        AEGIS_PERMISSION_DENIED,
        AEGIS_RESOURCE_NOT_FOUND,
        AEGIS_RESOURCE_CONFLICT,
        AEGIS_INSTANCE_CONFLICT,
        AEGIS_MESSAGE_TOO_LARGE,
        AEGIS_INCOMPATIBLE,
        AEGIS_LIMIT_EXCEEDED,
        AEGIS_INTERNAL,
        AEGIS_BROKER_UNAVAILABLE,
        AEGIS_NO_AVAILABLE_INSTANCE,
        AEGIS_OWNER_UNAVAILABLE,
        AEGIS_CIRCUIT_OPEN,
        AEGIS_TIMEOUT,
        AEGIS_LOOP_DETECTED,
    ];
    ALL.into_iter().find(|s| *s as c_int == v)
}

/// A static, human-readable name of `status` (never NULL). Takes any int: a value that is
/// no `aegis_status` is "unknown status".
#[no_mangle]
pub extern "C" fn aegis_status_str(status: c_int) -> *const c_char {
    let Some(status) = status_from(status) else {
        return c"unknown status".as_ptr();
    };
    let s: &'static CStr = match status {
        AEGIS_OK => c"ok",
        AEGIS_BUFFER_TOO_SMALL => c"buffer too small",
        AEGIS_NULL_ARGUMENT => c"null argument",
        AEGIS_INVALID_ARGUMENT => c"invalid argument",
        AEGIS_PANIC => c"internal error (panic)",
        AEGIS_NO_REQUEST => c"no request",
        AEGIS_STOPPED => c"stopped",
        AEGIS_NOT_READY => c"not ready",
        AEGIS_REMOTE => c"remote error",
        AEGIS_NO_REPLY => c"no reply",
        AEGIS_BAD_REQUEST => c"bad request",
        AEGIS_NOT_OWNER => c"not owner",
        AEGIS_PERMISSION_DENIED => c"permission denied",
        AEGIS_RESOURCE_NOT_FOUND => c"resource not found",
        AEGIS_RESOURCE_CONFLICT => c"resource conflict",
        AEGIS_INSTANCE_CONFLICT => c"instance conflict",
        AEGIS_MESSAGE_TOO_LARGE => c"message too large",
        AEGIS_INCOMPATIBLE => c"incompatible",
        AEGIS_LIMIT_EXCEEDED => c"limit exceeded",
        AEGIS_INTERNAL => c"internal error",
        AEGIS_BROKER_UNAVAILABLE => c"broker unavailable",
        AEGIS_NO_AVAILABLE_INSTANCE => c"no available instance",
        AEGIS_OWNER_UNAVAILABLE => c"owner unavailable",
        AEGIS_CIRCUIT_OPEN => c"circuit breaker open",
        AEGIS_TIMEOUT => c"timeout",
        AEGIS_LOOP_DETECTED => c"loop detected",
    };
    s.as_ptr()
}

/// The seed's numeric code of `status` (503 for `AEGIS_OWNER_UNAVAILABLE`, 409 for
/// `AEGIS_INSTANCE_CONFLICT`, …); 0 for statuses of this library alone and for any int
/// that is no `aegis_status`.
#[no_mangle]
pub extern "C" fn aegis_status_code(status: c_int) -> u16 {
    match status_from(status).map(|s| s as u32) {
        Some(s @ 400..=999) => s as u16,
        Some(s @ 1000..) => (s / 10) as u16,
        _ => 0,
    }
}

/// Copies this thread's last error text (UTF-8, NUL-terminated) into `buf`; `*needed` gets
/// its size including the NUL. `AEGIS_BUFFER_TOO_SMALL` if it does not fit.
#[no_mangle]
pub unsafe extern "C" fn aegis_last_error(
    buf: *mut c_char,
    len: usize,
    needed: *mut usize,
) -> aegis_status {
    LAST_ERROR.with(|e| {
        let mut text = e.borrow().clone().into_bytes();
        text.push(0);
        // SAFETY: forwarded caller contract. Quietly: a buffer too small for the text
        // must not replace the text the caller is asking for.
        unsafe { copy_out_quietly(&text, buf as *mut u8, len, needed) }
    })
}

/// Copies the W3C `traceparent` of the request this thread is handling (in an
/// `aegis_handler`, or between `aegis_receiver_next` and the reply) into `buf`, NUL-terminated
/// (56 bytes); `*needed` gets that size. `AEGIS_BAD_REQUEST` when no request is being
/// handled; `AEGIS_BUFFER_TOO_SMALL` if it does not fit. Calls made meanwhile continue it.
#[no_mangle]
pub unsafe extern "C" fn aegis_current_traceparent(
    buf: *mut c_char,
    len: usize,
    needed: *mut usize,
) -> aegis_status {
    let Some(ctx) = CURRENT.with(|c| c.get()) else {
        set_error("no request is being handled on this thread".into());
        return AEGIS_BAD_REQUEST;
    };
    let mut text = ctx.trace.traceparent().into_bytes();
    text.push(0);
    // SAFETY: forwarded caller contract.
    unsafe { copy_out(&text, buf as *mut u8, len, needed) }
}

/// Milliseconds until the caller of the request this thread is handling stops waiting
/// (negative once past) into `*remaining_ms` (required). `AEGIS_BAD_REQUEST` when no
/// request is being handled, `AEGIS_NO_REPLY` when its caller gave no deadline. Calls made
/// meanwhile end by that deadline.
#[no_mangle]
pub unsafe extern "C" fn aegis_current_deadline_ms(remaining_ms: *mut i64) -> aegis_status {
    // SAFETY: forwarded caller contract.
    let out = need!(unsafe { remaining_ms.as_mut() }, "remaining_ms");
    let Some(ctx) = CURRENT.with(|c| c.get()) else {
        set_error("no request is being handled on this thread".into());
        return AEGIS_BAD_REQUEST;
    };
    let Some(d) = ctx.deadline else {
        set_error("the caller gave no deadline".into());
        return AEGIS_NO_REPLY;
    };
    let now = std::time::Instant::now();
    *out = match d.checked_duration_since(now) {
        Some(left) => left.as_millis().min(i64::MAX as u128) as i64,
        None => -(now.duration_since(d).as_millis().min(i64::MAX as u128) as i64),
    };
    AEGIS_OK
}

/// The code the handler answered with, after `AEGIS_REMOTE` on this thread.
#[no_mangle]
pub extern "C" fn aegis_last_remote_code() -> u16 {
    LAST_REMOTE_CODE.with(|c| c.get())
}

// --- connecting ---------------------------------------------------------------------------

/// Connects to the bus in `dir`, or where the broker would be found by default (`AEGIS_IPC_DIR`,
/// `/run/aegis-ipc`, …) when `dir` is NULL, with 128 reply mailboxes (calls in flight at
/// once: see `aegis_connect_with`). `out` is required. Free with `aegis_bus_free`.
#[no_mangle]
pub unsafe extern "C" fn aegis_connect(
    dir: *const c_char,
    out: *mut *mut aegis_bus,
) -> aegis_status {
    // SAFETY: forwarded caller contract.
    unsafe { aegis_connect_with(dir, 0, out) }
}

/// `aegis_connect` with `mailboxes` reply mailboxes (0: the default, 128; at most 65,536):
/// how many calls the connection can have in flight at once, blocking calls of all threads
/// and submitted calls together. A submit past them is `AEGIS_LIMIT_EXCEEDED`
/// (`aegis_try_submit`: `AEGIS_NOT_READY` until one is free).
#[no_mangle]
pub unsafe extern "C" fn aegis_connect_with(
    dir: *const c_char,
    mailboxes: u32,
    out: *mut *mut aegis_bus,
) -> aegis_status {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let out = need!(unsafe { out.as_mut() }, "out");
        *out = std::ptr::null_mut();
        let dir = if dir.is_null() {
            None
        } else {
            // SAFETY: forwarded caller contract.
            Some(std::path::PathBuf::from(arg!(unsafe { text(dir, "dir") })))
        };
        if mailboxes > 1 << 16 {
            set_error(format!(
                "mailboxes {mailboxes} is over the maximum of 65536"
            ));
            return AEGIS_INVALID_ARGUMENT;
        }
        let mut opts = BusOptions {
            dir,
            ..Default::default()
        };
        if mailboxes > 0 {
            opts.mailboxes = mailboxes;
        }
        match Bus::connect_with(opts) {
            Ok(bus) => {
                *out = Box::into_raw(Box::new(aegis_bus { bus }));
                AEGIS_OK
            }
            Err(e) => fail(e),
        }
    })
}

/// Disconnects. Instances registered through this bus must be freed first.
#[no_mangle]
pub unsafe extern "C" fn aegis_bus_free(bus: *mut aegis_bus) {
    if !bus.is_null() {
        // SAFETY: a pointer from `aegis_connect`, freed once (the header's contract).
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(bus) })));
    }
}

// --- call options -------------------------------------------------------------------------

/// New call options with the defaults.
#[no_mangle]
pub extern "C" fn aegis_call_options_new() -> *mut aegis_call_options {
    Box::into_raw(Box::new(aegis_call_options {
        opts: CallOptions::default(),
    }))
}

#[no_mangle]
pub unsafe extern "C" fn aegis_call_options_free(o: *mut aegis_call_options) {
    if !o.is_null() {
        // SAFETY: a pointer from `aegis_call_options_new`, freed once.
        drop(unsafe { Box::from_raw(o) });
    }
}

/// Whole-call timeout and per-attempt timeout in milliseconds (0 leaves one unchanged).
#[no_mangle]
pub unsafe extern "C" fn aegis_call_options_set_timeouts(
    o: *mut aegis_call_options,
    timeout_ms: u64,
    attempt_timeout_ms: u64,
) -> aegis_status {
    // SAFETY: forwarded caller contract.
    let o = need!(unsafe { o.as_mut() }, "options");
    if timeout_ms > 0 {
        o.opts.timeout = Duration::from_millis(timeout_ms);
    }
    if attempt_timeout_ms > 0 {
        o.opts.attempt_timeout = Duration::from_millis(attempt_timeout_ms);
    }
    AEGIS_OK
}

/// At most `attempts` instances are tried (1 or more).
#[no_mangle]
pub unsafe extern "C" fn aegis_call_options_set_max_attempts(
    o: *mut aegis_call_options,
    attempts: u32,
) -> aegis_status {
    // SAFETY: forwarded caller contract.
    let o = need!(unsafe { o.as_mut() }, "options");
    if attempts == 0 {
        set_error("max attempts must be at least 1".into());
        return AEGIS_INVALID_ARGUMENT;
    }
    o.opts.max_attempts = attempts;
    AEGIS_OK
}

/// Continues the W3C trace `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`, e.g. from an
/// incoming HTTP request) in calls made with these options; NULL starts a new trace per
/// call again. A malformed value is `AEGIS_INVALID_ARGUMENT`, naming it.
#[no_mangle]
pub unsafe extern "C" fn aegis_call_options_set_traceparent(
    o: *mut aegis_call_options,
    traceparent: *const c_char,
) -> aegis_status {
    // SAFETY: forwarded caller contract.
    let o = need!(unsafe { o.as_mut() }, "options");
    if traceparent.is_null() {
        o.opts.trace = None;
        o.opts.trace_id = None;
        return AEGIS_OK;
    }
    // SAFETY: non-NULL, a NUL-terminated string (the header's contract).
    let s = unsafe { CStr::from_ptr(traceparent) }.to_string_lossy();
    match aegis_client::TraceContext::parse(&s) {
        Some(t) => {
            o.opts.trace = Some(t);
            o.opts.trace_id = Some(t.id64());
            AEGIS_OK
        }
        None => {
            set_error(format!(
                "'{s}' is not a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)"
            ));
            AEGIS_INVALID_ARGUMENT
        }
    }
}

/// Whether a request an instance took but did not answer may be sent to another one.
#[no_mangle]
pub unsafe extern "C" fn aegis_call_options_set_idempotent(
    o: *mut aegis_call_options,
    idempotent: bool,
) -> aegis_status {
    // SAFETY: forwarded caller contract.
    let o = need!(unsafe { o.as_mut() }, "options");
    o.opts.idempotent = idempotent;
    AEGIS_OK
}

/// Never route to instance `instance_id` (may be called several times).
#[no_mangle]
pub unsafe extern "C" fn aegis_call_options_exclude(
    o: *mut aegis_call_options,
    instance_id: *const c_char,
) -> aegis_status {
    // SAFETY: forwarded caller contract.
    let o = need!(unsafe { o.as_mut() }, "options");
    // SAFETY: forwarded caller contract.
    match unsafe { text(instance_id, "instance_id") } {
        Ok(id) => {
            o.opts.exclude.push(id.to_owned());
            AEGIS_OK
        }
        Err(s) => s,
    }
}

/// Selection among healthy instances: 0 round-robin, 1 random, 2 prefer `preferred` (an
/// instance id; round-robin when it is not healthy).
#[no_mangle]
pub unsafe extern "C" fn aegis_call_options_set_selection(
    o: *mut aegis_call_options,
    selection: c_int,
    preferred: *const c_char,
) -> aegis_status {
    // SAFETY: forwarded caller contract.
    let o = need!(unsafe { o.as_mut() }, "options");
    o.opts.selection = match selection {
        0 => Selection::RoundRobin,
        1 => Selection::Random,
        // SAFETY: forwarded caller contract.
        2 => match unsafe { text(preferred, "preferred") } {
            Ok(id) => Selection::Preferred(id.to_owned()),
            Err(s) => return s,
        },
        n => {
            set_error(format!("selection {n} is not 0, 1 or 2"));
            return AEGIS_INVALID_ARGUMENT;
        }
    };
    AEGIS_OK
}

/// How a waiting caller spends the time before it sleeps: `spin_us` < 0 adaptive (the
/// default), else a fixed budget in microseconds (0 = sleep at once).
#[no_mangle]
pub unsafe extern "C" fn aegis_call_options_set_spin(
    o: *mut aegis_call_options,
    spin_us: i64,
) -> aegis_status {
    // SAFETY: forwarded caller contract.
    let o = need!(unsafe { o.as_mut() }, "options");
    o.opts.spin = Some(if spin_us < 0 {
        Spin::Adaptive
    } else {
        Spin::Fixed(Duration::from_micros(spin_us as u64))
    });
    AEGIS_OK
}

/// The options of a call: the caller's (or the defaults), one hop further on the trace of
/// the request this thread is handling, if any (`CURRENT`). Calls outside a handler borrow
/// the options as they are: no copy, no allocation.
fn options<'a>(
    o: *const aegis_call_options,
    default: &'a CallOptions,
    nested: &'a mut Option<CallOptions>,
) -> &'a CallOptions {
    // SAFETY: NULL or a live `aegis_call_options` (the header's contract), which outlives
    // the call that borrows it.
    let given: &'a CallOptions = match unsafe { o.as_ref() } {
        // SAFETY: as above: the options outlive the call, so `'a` extends nothing.
        Some(o) => unsafe { &*(&o.opts as *const CallOptions) },
        None => default,
    };
    match CURRENT.with(|c| c.get()) {
        None => given,
        Some(ctx) => nested.insert(given.clone().within(&ctx)),
    }
}

// --- calls --------------------------------------------------------------------------------

/// How a call is addressed: a service name or a resource id, as the caller passed it.
enum Target {
    Service(*const c_char),
    Resource(*const c_char),
}

/// Runs one call into this thread's reply buffer; `f` gets the reply.
unsafe fn call_with(
    bus: *const aegis_bus,
    target: Target,
    method: *const c_char,
    payload: *const u8,
    payload_len: usize,
    opts: *const aegis_call_options,
    f: impl FnOnce(&[u8]) -> aegis_status,
) -> aegis_status {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let bus = need!(unsafe { bus.as_ref() }, "bus");
        let (to_resource, name) = match target {
            Target::Service(p) => (false, p),
            Target::Resource(p) => (true, p),
        };
        // SAFETY: forwarded caller contract.
        let name = arg!(unsafe { text(name, if to_resource { "resource" } else { "service" }) });
        // SAFETY: forwarded caller contract.
        let (method, payload) = match unsafe {
            (
                text(method, "method"),
                bytes(payload, payload_len, "payload"),
            )
        } {
            (Ok(m), Ok(p)) => (m, p),
            (Err(s), _) | (_, Err(s)) => return s,
        };
        let default = CallOptions::default();
        let mut nested = None;
        let opts = options(opts, &default, &mut nested);
        LAST_CALL.with(|r| {
            let last = &mut *r.borrow_mut();
            let out = &mut last.reply;
            let res = if to_resource {
                bus.bus.call_resource_into(name, method, payload, opts, out)
            } else {
                bus.bus.call_into(name, method, payload, opts, out)
            };
            match res {
                Ok(i) => {
                    last.ok = true;
                    last.answered_by = Some(i);
                    f(out)
                }
                Err(e) => {
                    // The last *successful* call's instance stays for `aegis_last_instance`.
                    out.clear();
                    last.ok = false;
                    fail(e)
                }
            }
        })
    })
}

/// Calls `method` of `service` (round-robin over its healthy instances, with failover as
/// `opts` allow; NULL `opts` = defaults) and copies the reply into `reply` (`reply_cap`
/// bytes); `*reply_len` gets the reply's length. If it does not fit: `AEGIS_BUFFER_TOO_SMALL`
/// and the reply is kept for `aegis_last_reply`. No allocation once this thread's buffers
/// have grown to the reply size.
#[no_mangle]
pub unsafe extern "C" fn aegis_call(
    bus: *const aegis_bus,
    service: *const c_char,
    method: *const c_char,
    payload: *const u8,
    payload_len: usize,
    opts: *const aegis_call_options,
    reply: *mut u8,
    reply_cap: usize,
    reply_len: *mut usize,
) -> aegis_status {
    // SAFETY: forwarded caller contract.
    unsafe {
        call_with(
            bus,
            Target::Service(service),
            method,
            payload,
            payload_len,
            opts,
            |r| copy_out(r, reply, reply_cap, reply_len),
        )
    }
}

/// `aegis_call` for the one instance that owns `resource`.
#[no_mangle]
pub unsafe extern "C" fn aegis_call_resource(
    bus: *const aegis_bus,
    resource: *const c_char,
    method: *const c_char,
    payload: *const u8,
    payload_len: usize,
    opts: *const aegis_call_options,
    reply: *mut u8,
    reply_cap: usize,
    reply_len: *mut usize,
) -> aegis_status {
    // SAFETY: forwarded caller contract.
    unsafe {
        call_with(
            bus,
            Target::Resource(resource),
            method,
            payload,
            payload_len,
            opts,
            |r| copy_out(r, reply, reply_cap, reply_len),
        )
    }
}

/// `aegis_call` returning the reply in a library-owned buffer (`aegis_buffer_free`).
#[no_mangle]
pub unsafe extern "C" fn aegis_call_alloc(
    bus: *const aegis_bus,
    service: *const c_char,
    method: *const c_char,
    payload: *const u8,
    payload_len: usize,
    opts: *const aegis_call_options,
    reply: *mut aegis_buffer,
) -> aegis_status {
    // SAFETY: forwarded caller contract.
    let Some(reply) = (unsafe { reply.as_mut() }) else {
        set_error("argument `reply` is NULL".into());
        return AEGIS_NULL_ARGUMENT;
    };
    // SAFETY: forwarded caller contract.
    unsafe {
        call_with(
            bus,
            Target::Service(service),
            method,
            payload,
            payload_len,
            opts,
            |r| {
                to_buffer(r.to_vec(), reply);
                AEGIS_OK
            },
        )
    }
}

// --- zero-copy calls ----------------------------------------------------------------------

/// A writable buffer of `len` bytes for a request to `service`: write the request at
/// `*data`, then send it with `aegis_call_loan` to the same service (no copy on either
/// side). It lies in the request heap of the bus's channel to the instance the next call
/// would go to, which only that instance can read (a call that goes elsewhere copies it).
/// Free it with `aegis_loan_free` if it is not sent. `AEGIS_MESSAGE_TOO_LARGE` over the
/// service's largest message, `AEGIS_LIMIT_EXCEEDED` when the heap (twice the bus's
/// largest message) has no room, `AEGIS_NO_AVAILABLE_INSTANCE` when the service has no healthy instance.
#[no_mangle]
pub unsafe extern "C" fn aegis_loan(
    bus: *const aegis_bus,
    service: *const c_char,
    len: usize,
    out: *mut *mut aegis_request_loan,
    data: *mut *mut u8,
) -> aegis_status {
    // SAFETY: forwarded caller contract.
    unsafe { make_loan(bus, (service, "service"), out, data, |b, s| b.loan(s, len)) }
}

/// The body of `aegis_loan` and `aegis_loan_resource`: checks the arguments, makes the
/// loan with `make` (given the bus and `target`, the service or resource named by the
/// argument of that name) and hands it out through `out` and `data`.
unsafe fn make_loan(
    bus: *const aegis_bus,
    (target, what): (*const c_char, &str),
    out: *mut *mut aegis_request_loan,
    data: *mut *mut u8,
    make: impl FnOnce(&Bus, &str) -> aegis_client::Result<Loan>,
) -> aegis_status {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let bus = need!(unsafe { bus.as_ref() }, "bus");
        // SAFETY: forwarded caller contract.
        let (out, data) = match unsafe { (out.as_mut(), data.as_mut()) } {
            (Some(o), Some(d)) => (o, d),
            _ => {
                set_error("arguments `out` and `data` are required".into());
                return AEGIS_NULL_ARGUMENT;
            }
        };
        // SAFETY: forwarded caller contract.
        let target = arg!(unsafe { text(target, what) });
        match make(&bus.bus, target) {
            Ok(mut loan) => {
                *data = loan.as_mut_slice().as_mut_ptr();
                *out = Box::into_raw(Box::new(aegis_request_loan { loan }));
                AEGIS_OK
            }
            Err(e) => fail(e),
        }
    })
}

/// The body of `aegis_call_loan` and `aegis_call_resource_loan`: takes the loan (whatever
/// the status), checks the arguments, calls with `call` (given the bus, `target`, the
/// method, the loan and the options) and returns the reply as a view.
unsafe fn call_with_loan(
    bus: *const aegis_bus,
    (target, what): (*const c_char, &str),
    method: *const c_char,
    loan: *mut aegis_request_loan,
    opts: *const aegis_call_options,
    (view, data, len): (*mut *mut aegis_reply_view, *mut *const u8, *mut usize),
    call: impl FnOnce(&Bus, &str, &str, Loan, &CallOptions) -> aegis_client::Result<BorrowedReply>,
) -> aegis_status {
    guard(|| {
        // SAFETY: forwarded caller contract: a loan from `aegis_loan` or
        // `aegis_loan_resource`, or NULL.
        let loan = need!(unsafe { take_loan(loan) }, "loan");
        // SAFETY: forwarded caller contract.
        let bus = need!(unsafe { bus.as_ref() }, "bus");
        // SAFETY: forwarded caller contract.
        let out = arg!(unsafe { view_out(view, data, len) });
        // SAFETY: forwarded caller contract.
        let (target, method) = match unsafe { (text(target, what), text(method, "method")) } {
            (Ok(t), Ok(m)) => (t, m),
            (Err(s), _) | (_, Err(s)) => return s,
        };
        let default = CallOptions::default();
        let mut nested = None;
        let opts = options(opts, &default, &mut nested);
        give_view(call(&bus.bus, target, method, loan, opts), out)
    })
}

/// The loan behind `loan` (NULL: `None`), taken: the handle is spent.
///
/// # Safety
/// `loan` is NULL or a pointer from `aegis_loan`/`aegis_loan_resource` not yet taken or
/// freed.
unsafe fn take_loan(loan: *mut aegis_request_loan) -> Option<Loan> {
    // SAFETY: the caller's contract: a live, untaken loan handle.
    (!loan.is_null()).then(|| unsafe { Box::from_raw(loan) }.loan)
}

/// Gives an unsent loan's memory back. NULL is ignored.
#[no_mangle]
pub unsafe extern "C" fn aegis_loan_free(loan: *mut aegis_request_loan) {
    if !loan.is_null() {
        // SAFETY: a pointer from `aegis_loan`, not sent, freed once.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(loan) })));
    }
}

/// Calls `method` of `service` with the request written in `loan` (taken: do not use or
/// free it afterwards, whatever the status) and returns the reply in place: `*view` (free
/// with `aegis_reply_view_free`), its bytes at `*data`, `*len` long. Neither side's bytes
/// are copied by the bus. On an error no view is returned.
#[no_mangle]
pub unsafe extern "C" fn aegis_call_loan(
    bus: *const aegis_bus,
    service: *const c_char,
    method: *const c_char,
    loan: *mut aegis_request_loan,
    opts: *const aegis_call_options,
    view: *mut *mut aegis_reply_view,
    data: *mut *const u8,
    len: *mut usize,
) -> aegis_status {
    // SAFETY: forwarded caller contract.
    unsafe {
        call_with_loan(
            bus,
            (service, "service"),
            method,
            loan,
            opts,
            (view, data, len),
            |b, s, m, l, o| b.call_loan(s, m, l, o),
        )
    }
}

/// `aegis_loan` for a call by resource id: the buffer lies in the request heap of the bus's
/// channel to the instance that owns `resource` now; send it with
/// `aegis_call_resource_loan` for the same id. `AEGIS_RESOURCE_NOT_FOUND` and
/// `AEGIS_OWNER_UNAVAILABLE` as `aegis_call_resource` says them.
#[no_mangle]
pub unsafe extern "C" fn aegis_loan_resource(
    bus: *const aegis_bus,
    resource: *const c_char,
    len: usize,
    out: *mut *mut aegis_request_loan,
    data: *mut *mut u8,
) -> aegis_status {
    // SAFETY: forwarded caller contract.
    unsafe {
        make_loan(bus, (resource, "resource"), out, data, |b, r| {
            b.loan_resource(r, len)
        })
    }
}

/// `aegis_call_resource` with the request written in a loan from `aegis_loan_resource` for
/// the same id (taken, as by `aegis_call_loan`), the reply read in place (`*view`, freed
/// with `aegis_reply_view_free`).
#[no_mangle]
pub unsafe extern "C" fn aegis_call_resource_loan(
    bus: *const aegis_bus,
    resource: *const c_char,
    method: *const c_char,
    loan: *mut aegis_request_loan,
    opts: *const aegis_call_options,
    view: *mut *mut aegis_reply_view,
    data: *mut *const u8,
    len: *mut usize,
) -> aegis_status {
    // SAFETY: forwarded caller contract.
    unsafe {
        call_with_loan(
            bus,
            (resource, "resource"),
            method,
            loan,
            opts,
            (view, data, len),
            |b, r, m, l, o| b.call_resource_loan(r, m, l, o),
        )
    }
}

/// `aegis_call` with the reply read in place (`aegis_call_loan`'s view); the request is
/// copied as usual.
#[no_mangle]
pub unsafe extern "C" fn aegis_call_view(
    bus: *const aegis_bus,
    service: *const c_char,
    method: *const c_char,
    payload: *const u8,
    payload_len: usize,
    opts: *const aegis_call_options,
    view: *mut *mut aegis_reply_view,
    data: *mut *const u8,
    len: *mut usize,
) -> aegis_status {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let bus = need!(unsafe { bus.as_ref() }, "bus");
        // SAFETY: forwarded caller contract.
        let out = arg!(unsafe { view_out(view, data, len) });
        // SAFETY: forwarded caller contract.
        let (service, method, payload) = match unsafe {
            (
                text(service, "service"),
                text(method, "method"),
                bytes(payload, payload_len, "payload"),
            )
        } {
            (Ok(s), Ok(m), Ok(p)) => (s, m, p),
            (Err(s), _, _) | (_, Err(s), _) | (_, _, Err(s)) => return s,
        };
        let default = CallOptions::default();
        let mut nested = None;
        let opts = options(opts, &default, &mut nested);
        give_view(bus.bus.call_borrowed(service, method, payload, opts), out)
    })
}

/// Where a view is returned: the handle, its bytes and their length.
type ViewOut<'a> = (
    &'a mut *mut aegis_reply_view,
    &'a mut *const u8,
    &'a mut usize,
);

/// The three out-pointers of a view, all required; NULLed/zeroed until a view is given.
unsafe fn view_out<'a>(
    view: *mut *mut aegis_reply_view,
    data: *mut *const u8,
    len: *mut usize,
) -> Result<ViewOut<'a>, aegis_status> {
    // SAFETY: forwarded caller contract: each is NULL or valid for writes.
    match unsafe { (view.as_mut(), data.as_mut(), len.as_mut()) } {
        (Some(v), Some(d), Some(l)) => {
            (*v, *d, *l) = (std::ptr::null_mut(), std::ptr::null(), 0);
            Ok((v, d, l))
        }
        _ => {
            set_error("arguments `view`, `data` and `len` are required".into());
            Err(AEGIS_NULL_ARGUMENT)
        }
    }
}

fn give_view(
    r: aegis_client::Result<BorrowedReply>,
    (view, data, len): ViewOut<'_>,
) -> aegis_status {
    match r {
        Ok(reply) => {
            LAST_CALL.with(|l| {
                let mut l = l.borrow_mut();
                l.answered_by = Some(reply.instance());
                // The reply is in the view, not in this thread's buffer.
                l.ok = false;
                l.reply.clear();
            });
            *data = reply.bytes().as_ptr();
            *len = reply.len();
            *view = Box::into_raw(Box::new(aegis_reply_view { reply }));
            AEGIS_OK
        }
        Err(e) => fail(e),
    }
}

/// A reply view's bytes again (as `aegis_call_loan` returned them); `AEGIS_NOT_READY` if
/// the instance reused the view's memory for another reply while it was held (it keeps it
/// until the view is freed; one that does not broke the rule, and the bytes cannot be
/// trusted).
#[no_mangle]
pub unsafe extern "C" fn aegis_reply_view_bytes(
    view: *const aegis_reply_view,
    data: *mut *const u8,
    len: *mut usize,
) -> aegis_status {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let view = need!(unsafe { view.as_ref() }, "view");
        // SAFETY: forwarded caller contract.
        let (data, len) = match unsafe { (data.as_mut(), len.as_mut()) } {
            (Some(d), Some(l)) => (d, l),
            _ => {
                set_error("arguments `data` and `len` are required".into());
                return AEGIS_NULL_ARGUMENT;
            }
        };
        *data = view.reply.bytes().as_ptr();
        *len = view.reply.len();
        if !view.reply.is_intact() {
            set_error("the reply's memory was reused: the view was held past the instance's unread-reply expiry".into());
            return AEGIS_NOT_READY;
        }
        AEGIS_OK
    })
}

/// Gives a reply view's memory back (its bytes are no longer valid). NULL is ignored.
#[no_mangle]
pub unsafe extern "C" fn aegis_reply_view_free(view: *mut aegis_reply_view) {
    if !view.is_null() {
        // SAFETY: a pointer from `aegis_call_loan`/`aegis_call_view`, freed once.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(view) })));
    }
}

/// The last reply this thread received (after `AEGIS_BUFFER_TOO_SMALL`, say).
/// `AEGIS_NO_REPLY` when this thread's last call failed or none was made (an empty reply
/// is `AEGIS_OK` with 0 bytes).
#[no_mangle]
pub unsafe extern "C" fn aegis_last_reply(
    buf: *mut u8,
    cap: usize,
    needed: *mut usize,
) -> aegis_status {
    guard(|| {
        LAST_CALL.with(|r| {
            let last = r.borrow();
            if !last.ok {
                if !needed.is_null() {
                    // SAFETY: non-NULL `needed` points to a writable size_t.
                    unsafe { *needed = 0 };
                }
                set_error("this thread's last call failed (or none was made): no reply".into());
                return AEGIS_NO_REPLY;
            }
            // SAFETY: forwarded caller contract.
            unsafe { copy_out(&last.reply, buf, cap, needed) }
        })
    })
}

/// The id of the instance that answered this thread's last successful call (NUL-terminated),
/// also after later failed calls. `AEGIS_NO_REPLY` before any successful call.
#[no_mangle]
pub unsafe extern "C" fn aegis_last_instance(
    bus: *const aegis_bus,
    buf: *mut c_char,
    cap: usize,
    needed: *mut usize,
) -> aegis_status {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let bus = need!(unsafe { bus.as_ref() }, "bus");
        let Some(info) = LAST_CALL.with(|r| r.borrow().answered_by) else {
            set_error("no successful call on this thread yet".into());
            return AEGIS_NO_REPLY;
        };
        let mut id = bus.bus.instance_id(info).into_bytes();
        id.push(0);
        // SAFETY: forwarded caller contract.
        unsafe { copy_out(&id, buf as *mut u8, cap, needed) }
    })
}

/// Frees a buffer the library returned (NULL data is fine); sets it to empty.
#[no_mangle]
pub unsafe extern "C" fn aegis_buffer_free(b: *mut aegis_buffer) {
    // SAFETY: NULL or a buffer this library filled.
    let Some(b) = (unsafe { b.as_mut() }) else {
        return;
    };
    if !b.data.is_null() {
        // SAFETY: `data`/`len` came from `to_buffer` (a boxed slice), freed once.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(b.data, b.len)) });
    }
    b.data = std::ptr::null_mut();
    b.len = 0;
}

// --- submitted calls and the event fd -------------------------------------------------------

/// Sends a call now and returns at once; collect the reply with `aegis_pending_wait` (in any
/// order), or free the handle to cancel it. The bus must outlive the handle.
#[no_mangle]
pub unsafe extern "C" fn aegis_submit(
    bus: *const aegis_bus,
    service: *const c_char,
    method: *const c_char,
    payload: *const u8,
    payload_len: usize,
    opts: *const aegis_call_options,
    out: *mut *mut aegis_pending,
) -> aegis_status {
    // SAFETY: forwarded caller contract.
    unsafe {
        submit(
            bus,
            (service, method, payload, payload_len),
            opts,
            None,
            out,
        )
    }
}

/// `aegis_submit` with the request written in `loan` (from `aegis_loan` for the same
/// service; taken, whatever the status): the call goes to the loan's instance while it is
/// routable, and the handle keeps the loan until the call settles. Collect the reply with
/// `aegis_pending_wait`, or in place with `aegis_pending_wait_view`.
#[no_mangle]
pub unsafe extern "C" fn aegis_submit_loan(
    bus: *const aegis_bus,
    service: *const c_char,
    method: *const c_char,
    loan: *mut aegis_request_loan,
    opts: *const aegis_call_options,
    out: *mut *mut aegis_pending,
) -> aegis_status {
    guard(|| {
        // SAFETY: forwarded caller contract: a loan from `aegis_loan` or
        // `aegis_loan_resource`, or NULL.
        let loan = need!(unsafe { take_loan(loan) }, "loan");
        // SAFETY: forwarded caller contract.
        let bus: &'static aegis_bus = need!(unsafe { bus.as_ref() }, "bus");
        // SAFETY: forwarded caller contract.
        let out = need!(unsafe { out.as_mut() }, "out");
        *out = std::ptr::null_mut();
        // SAFETY: forwarded caller contract.
        let (service, method) = match unsafe { (text(service, "service"), text(method, "method")) }
        {
            (Ok(s), Ok(m)) => (s, m),
            (Err(s), _) | (_, Err(s)) => return s,
        };
        let default = CallOptions::default();
        let mut nested = None;
        let opts = options(opts, &default, &mut nested);
        match bus.bus.submit_loan(service, method, loan, opts) {
            Ok(p) => {
                *out = Box::into_raw(Box::new(aegis_pending { pending: Some(p) }));
                AEGIS_OK
            }
            Err(e) => fail(e),
        }
    })
}

/// `aegis_submit` for an event loop: never waits for room in a full ring. `AEGIS_NOT_READY`
/// (with `*out` NULL) says the instance's ring is full: try again later (a timer, or after
/// the event fd fired), passing in `waited_us` how long ago the first try was (0 on the
/// first). Each try routes the call anew; once the call's deadline has passed with the ring
/// still full, the answer is `AEGIS_TIMEOUT`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn aegis_try_submit(
    bus: *const aegis_bus,
    service: *const c_char,
    method: *const c_char,
    payload: *const u8,
    payload_len: usize,
    opts: *const aegis_call_options,
    waited_us: u64,
    out: *mut *mut aegis_pending,
) -> aegis_status {
    // SAFETY: forwarded caller contract.
    unsafe {
        submit(
            bus,
            (service, method, payload, payload_len),
            opts,
            Some(waited_us),
            out,
        )
    }
}

/// `aegis_submit` (`waited_us` None: wait for room) and `aegis_try_submit` (Some).
///
/// # Safety
/// The callers' contract: valid or NULL pointers, C strings, `payload_len` bytes.
unsafe fn submit(
    bus: *const aegis_bus,
    (service, method, payload, payload_len): (*const c_char, *const c_char, *const u8, usize),
    opts: *const aegis_call_options,
    waited_us: Option<u64>,
    out: *mut *mut aegis_pending,
) -> aegis_status {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let bus: &'static aegis_bus = need!(unsafe { bus.as_ref() }, "bus");
        // SAFETY: forwarded caller contract.
        let out = need!(unsafe { out.as_mut() }, "out");
        *out = std::ptr::null_mut();
        // SAFETY: forwarded caller contract.
        let (service, method, payload) = match unsafe {
            (
                text(service, "service"),
                text(method, "method"),
                bytes(payload, payload_len, "payload"),
            )
        } {
            (Ok(s), Ok(m), Ok(p)) => (s, m, p),
            (Err(s), ..) | (_, Err(s), _) | (.., Err(s)) => return s,
        };
        let default = CallOptions::default();
        let mut nested = None;
        let opts = options(opts, &default, &mut nested);
        let submitted = match waited_us {
            None => bus.bus.submit(service, method, payload, opts).map(Some),
            Some(us) => {
                let now = std::time::Instant::now();
                let start = now
                    .checked_sub(std::time::Duration::from_micros(us))
                    .unwrap_or(now);
                bus.bus.try_submit(start, service, method, payload, opts)
            }
        };
        match submitted {
            Ok(Some(p)) => {
                *out = Box::into_raw(Box::new(aegis_pending { pending: Some(p) }));
                AEGIS_OK
            }
            Ok(None) => {
                set_error(format!(
                    "service '{service}': the ring of the instance picked is full; try again"
                ));
                AEGIS_NOT_READY
            }
            Err(e) => fail(e),
        }
    })
}

/// Waits for a submitted call's reply into a library-owned buffer. The handle is spent
/// (free it afterwards).
#[no_mangle]
pub unsafe extern "C" fn aegis_pending_wait(
    p: *mut aegis_pending,
    reply: *mut aegis_buffer,
) -> aegis_status {
    // SAFETY: forwarded caller contract.
    unsafe { collect(p, reply, true) }
}

/// Waits for a submitted call's reply and returns it in place, as `aegis_call_loan` does:
/// `*view` (free with `aegis_reply_view_free`), its bytes at `*data`, `*len` long. The
/// handle is spent (free it afterwards). On an error no view is returned.
#[no_mangle]
pub unsafe extern "C" fn aegis_pending_wait_view(
    p: *mut aegis_pending,
    view: *mut *mut aegis_reply_view,
    data: *mut *const u8,
    len: *mut usize,
) -> aegis_status {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let p = need!(unsafe { p.as_mut() }, "pending");
        // SAFETY: forwarded caller contract.
        let out = arg!(unsafe { view_out(view, data, len) });
        let Some(pending) = p.pending.take() else {
            set_error("this call was already collected".into());
            return AEGIS_INVALID_ARGUMENT;
        };
        give_view(pending.wait_borrowed(), out)
    })
}

/// Without waiting: settles a submitted call if it is done — the reply into `reply`
/// (`AEGIS_OK`), or the call's error (its deadline passed, its instance left, the handler's
/// error) — and then the handle is spent. `AEGIS_NOT_READY` while it is still under way.
/// The call for an event loop after its fd fired (see the header's "Event loops").
#[no_mangle]
pub unsafe extern "C" fn aegis_pending_poll(
    p: *mut aegis_pending,
    reply: *mut aegis_buffer,
) -> aegis_status {
    // SAFETY: forwarded caller contract.
    unsafe { collect(p, reply, false) }
}

/// `aegis_pending_wait` (`block`) and `aegis_pending_poll`: the reply or the error of a
/// settled call; without `block`, `AEGIS_NOT_READY` while it is under way.
///
/// # Safety
/// The callers' contract: `p` and `reply` valid or NULL.
unsafe fn collect(p: *mut aegis_pending, reply: *mut aegis_buffer, block: bool) -> aegis_status {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let p = need!(unsafe { p.as_mut() }, "pending");
        // SAFETY: forwarded caller contract.
        let reply = need!(unsafe { reply.as_mut() }, "reply");
        let mut out = Vec::new();
        let settled = match p.pending.as_mut() {
            None => {
                set_error("this call was already collected".into());
                return AEGIS_INVALID_ARGUMENT;
            }
            Some(_) if block => p.pending.take().map(|x| x.wait(&mut out)),
            Some(x) => x.try_wait(&mut out),
        };
        let Some(r) = settled else {
            set_error("the call is still under way".into());
            return AEGIS_NOT_READY;
        };
        p.pending = None;
        match r {
            Ok(_) => {
                to_buffer(out, reply);
                AEGIS_OK
            }
            Err(e) => fail(e),
        }
    })
}

/// `AEGIS_OK` if the reply is there (collecting it will not wait), else `AEGIS_NOT_READY`.
#[no_mangle]
pub unsafe extern "C" fn aegis_pending_ready(p: *const aegis_pending) -> aegis_status {
    // SAFETY: forwarded caller contract.
    let p = need!(unsafe { p.as_ref() }, "pending");
    match &p.pending {
        Some(x) if x.is_ready() => AEGIS_OK,
        Some(_) => {
            set_error("the reply is not there yet".into());
            AEGIS_NOT_READY
        }
        None => {
            set_error("this call was already collected".into());
            AEGIS_INVALID_ARGUMENT
        }
    }
}

/// Makes the bus's event fd readable when this call is done (see `aegis_event_fd`).
#[no_mangle]
pub unsafe extern "C" fn aegis_pending_notify(p: *const aegis_pending) -> aegis_status {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let p = need!(unsafe { p.as_ref() }, "pending");
        match p.pending.as_ref().map(|x| x.notify_event_fd()) {
            Some(Ok(())) => AEGIS_OK,
            Some(Err(e)) => fail(e),
            None => AEGIS_INVALID_ARGUMENT,
        }
    })
}

/// Frees a pending call; one not collected is cancelled (not run if not yet taken).
#[no_mangle]
pub unsafe extern "C" fn aegis_pending_free(p: *mut aegis_pending) {
    if !p.is_null() {
        // SAFETY: a pointer from `aegis_submit`, freed once.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(p) })));
    }
}

/// The bus's event fd for poll/epoll/libuv: readable when a call armed with
/// `aegis_pending_notify` is done. Read 8 bytes to reset it, then check the armed calls with
/// `aegis_pending_ready`. Owned by the bus (do not close it).
#[no_mangle]
pub unsafe extern "C" fn aegis_event_fd(bus: *const aegis_bus, fd: *mut c_int) -> aegis_status {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let bus = need!(unsafe { bus.as_ref() }, "bus");
        // SAFETY: forwarded caller contract.
        let fd = need!(unsafe { fd.as_mut() }, "fd");
        match bus.bus.event_fd() {
            Ok(f) => {
                *fd = f.as_raw_fd();
                AEGIS_OK
            }
            Err(e) => fail(e),
        }
    })
}

// --- instances ------------------------------------------------------------------------------

/// Registers instance `instance_id` of `service`. `metadata` is `2 * metadata_pairs`
/// strings: key, value, key, value… (NULL when 0). Free (which unregisters) with
/// `aegis_instance_free`, before the bus. An id this process already holds a live handle
/// of is `AEGIS_INSTANCE_CONFLICT`; another process's is too (the message names its pid).
#[no_mangle]
pub unsafe extern "C" fn aegis_register(
    bus: *const aegis_bus,
    service: *const c_char,
    instance_id: *const c_char,
    metadata: *const *const c_char,
    metadata_pairs: usize,
    out: *mut *mut aegis_instance,
) -> aegis_status {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let bus = need!(unsafe { bus.as_ref() }, "bus");
        // SAFETY: forwarded caller contract.
        let out = need!(unsafe { out.as_mut() }, "out");
        // SAFETY: forwarded caller contract.
        let (service, id) =
            match unsafe { (text(service, "service"), text(instance_id, "instance_id")) } {
                (Ok(s), Ok(i)) => (s, i),
                (Err(s), _) | (_, Err(s)) => return s,
            };
        let mut opts = RegisterOptions::default();
        if metadata_pairs > 0 {
            if metadata.is_null() {
                set_error("argument `metadata` is NULL".into());
                return AEGIS_NULL_ARGUMENT;
            }
            for k in 0..metadata_pairs {
                // SAFETY: `metadata` has 2 * metadata_pairs string pointers.
                let (key, value) = unsafe { (*metadata.add(2 * k), *metadata.add(2 * k + 1)) };
                // SAFETY: each is a NUL-terminated string.
                match unsafe { (text(key, "metadata key"), text(value, "metadata value")) } {
                    (Ok(k), Ok(v)) => opts.metadata.push((k.to_owned(), v.to_owned())),
                    (Err(s), _) | (_, Err(s)) => return s,
                }
            }
        }
        match bus.bus.register_with(service, id, opts) {
            Ok(inst) => {
                *out = Box::into_raw(Box::new(aegis_instance { inst }));
                AEGIS_OK
            }
            Err(e) => fail(e),
        }
    })
}

/// Unregisters and frees. No thread may be serving it any more (stop it and let `aegis_serve`
/// return first).
#[no_mangle]
pub unsafe extern "C" fn aegis_instance_free(inst: *mut aegis_instance) {
    if !inst.is_null() {
        // SAFETY: a pointer from `aegis_register`, freed once.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(inst) })));
    }
}

/// Answers the request being handled with `data`.
#[no_mangle]
pub unsafe extern "C" fn aegis_respond(
    r: *mut aegis_responder,
    data: *const u8,
    len: usize,
) -> aegis_status {
    // SAFETY: forwarded caller contract: `r` is the callback's responder.
    let r = need!(unsafe { r.as_mut() }, "responder");
    // SAFETY: forwarded caller contract.
    let data = arg!(unsafe { bytes(data, len, "data") });
    if data.len() as u64 > r.max {
        set_error(format!(
            "reply of {} bytes is over the service's {}-byte maximum: not sent (answer again)",
            data.len(),
            r.max
        ));
        return AEGIS_MESSAGE_TOO_LARGE;
    }
    // SAFETY: `out` points to the serving loop's buffer for the duration of the callback.
    let out = unsafe { &mut *r.out };
    out.clear();
    out.extend_from_slice(data);
    r.error = None;
    AEGIS_OK
}

/// Answers the request being handled with an error: the caller gets `code` and `message`
/// (400 is the caller's `AEGIS_BAD_REQUEST`, anything else `AEGIS_REMOTE`).
#[no_mangle]
pub unsafe extern "C" fn aegis_respond_error(
    r: *mut aegis_responder,
    code: u16,
    message: *const c_char,
) -> aegis_status {
    // SAFETY: forwarded caller contract.
    let r = need!(unsafe { r.as_mut() }, "responder");
    // SAFETY: forwarded caller contract.
    let message = arg!(unsafe { text(message, "message") });
    r.error = Some(ServiceError::new(code, message));
    AEGIS_OK
}

/// Serves the instance on this thread, calling `handler(ctx, …)` for each request, until
/// `aegis_stop` (from any thread). Several threads may serve one instance.
#[no_mangle]
pub unsafe extern "C" fn aegis_serve(
    inst: *const aegis_instance,
    handler: aegis_handler,
    ctx: *mut c_void,
) -> aegis_status {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let inst = need!(unsafe { inst.as_ref() }, "instance");
        let handler = need!(handler, "handler");
        let r = inst.inst.serve(|req, out| {
            let mut name = [0u8; 65];
            let m = req.method().as_bytes();
            name[..m.len()].copy_from_slice(m);
            let mut responder = aegis_responder {
                out: out as *mut Vec<u8>,
                error: None,
                max: req.max_reply(),
            };
            let p = req.payload();
            let before = CURRENT.with(|c| c.replace(Some(req.context())));
            // SAFETY: the handler's contract: it reads `method` (NUL-terminated, 64 bytes at
            // most) and `payload`, and answers through `responder`, during this call only.
            unsafe {
                handler(
                    ctx,
                    name.as_ptr() as *const c_char,
                    p.as_ptr(),
                    p.len(),
                    &mut responder,
                )
            };
            CURRENT.with(|c| c.set(before));
            match responder.error.take() {
                Some(e) => {
                    out.clear();
                    Err(e)
                }
                None => Ok(()),
            }
        });
        match r {
            Ok(()) => AEGIS_OK,
            Err(e) => fail(e),
        }
    })
}

/// Stops every thread serving the instance (`aegis_serve` returns, `aegis_receiver_next`
/// says `AEGIS_STOPPED`). Safe from any thread and from a signal handler (it takes no lock
/// and allocates nothing: atomic stores and a futex wake).
#[no_mangle]
pub unsafe extern "C" fn aegis_stop(inst: *const aegis_instance) -> aegis_status {
    // SAFETY: forwarded caller contract.
    let inst = need!(unsafe { inst.as_ref() }, "instance");
    inst.inst.stop_handle().stop();
    AEGIS_OK
}

/// Pull-style serving on one thread: `aegis_receiver_next`, then `aegis_receiver_reply` or
/// `aegis_receiver_reply_error`. The instance must outlive the receiver.
#[no_mangle]
pub unsafe extern "C" fn aegis_receiver_new(
    inst: *const aegis_instance,
    out: *mut *mut aegis_receiver,
) -> aegis_status {
    guard(|| {
        // SAFETY: forwarded caller contract; the instance outlives the receiver.
        let inst: &'static aegis_instance = need!(unsafe { inst.as_ref() }, "instance");
        // SAFETY: forwarded caller contract.
        let out = need!(unsafe { out.as_mut() }, "out");
        *out = Box::into_raw(Box::new(aegis_receiver {
            loan: None,
            req: None,
            method: [0; 65],
            rx: Box::new(inst.inst.receiver()),
            inst,
        }));
        AEGIS_OK
    })
}

/// Waits up to `timeout_ms` (negative: forever) for the next request. On `AEGIS_OK`,
/// `*method` (NUL-terminated) and `*payload`/`*payload_len` are valid until the reply. A
/// request not answered before the next `aegis_receiver_next` or the free gets an error reply.
#[no_mangle]
pub unsafe extern "C" fn aegis_receiver_next(
    rx: *mut aegis_receiver,
    timeout_ms: i64,
    method: *mut *const c_char,
    payload: *mut *const u8,
    payload_len: *mut usize,
) -> aegis_status {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let rx = need!(unsafe { rx.as_mut() }, "receiver");
        // SAFETY: forwarded caller contract.
        let (method, payload, payload_len) = match unsafe {
            (method.as_mut(), payload.as_mut(), payload_len.as_mut())
        } {
            (Some(m), Some(p), Some(l)) => (m, p, l),
            _ => {
                set_error("arguments `method`, `payload` and `payload_len` are required".into());
                return AEGIS_NULL_ARGUMENT;
            }
        };
        rx.loan = None;
        rx.req = None;
        CURRENT.with(|c| c.set(None));
        if rx.inst.inst.is_stopped() {
            set_error("the instance was stopped (aegis_stop)".into());
            return AEGIS_STOPPED;
        }
        let timeout = (timeout_ms >= 0).then(|| Duration::from_millis(timeout_ms as u64));
        // SAFETY: the request borrows the receiver, which is boxed (it does not move) and
        // outlives it: `req` is dropped before `rx` (field order) and before every recv.
        let receiver: &'static mut Receiver<'static> =
            unsafe { &mut *(rx.rx.as_mut() as *mut Receiver<'static>) };
        match receiver.recv(timeout) {
            Ok(Some(req)) => {
                let m = req.method().as_bytes();
                rx.method = [0; 65];
                rx.method[..m.len()].copy_from_slice(m);
                *method = rx.method.as_ptr() as *const c_char;
                *payload = req.payload().as_ptr();
                *payload_len = req.payload().len();
                CURRENT.with(|c| c.set(Some(req.context())));
                rx.req = Some(req);
                AEGIS_OK
            }
            Ok(None) if rx.inst.inst.is_stopped() => {
                set_error("the instance was stopped (aegis_stop)".into());
                AEGIS_STOPPED
            }
            Ok(None) => {
                set_error(format!("no request within {timeout_ms} ms"));
                AEGIS_NO_REQUEST
            }
            Err(e) => fail(e),
        }
    })
}

/// Answers the current request of `aegis_receiver_next`.
#[no_mangle]
pub unsafe extern "C" fn aegis_receiver_reply(
    rx: *mut aegis_receiver,
    data: *const u8,
    len: usize,
) -> aegis_status {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let rx = need!(unsafe { rx.as_mut() }, "receiver");
        // SAFETY: forwarded caller contract.
        let data = arg!(unsafe { bytes(data, len, "data") });
        let max = match &rx.req {
            Some(req) => req.max_reply(),
            None => {
                set_error("no request to answer (answered already, or none received)".into());
                return AEGIS_INVALID_ARGUMENT;
            }
        };
        if data.len() as u64 > max {
            // Kept: the request can still be answered (an error, a smaller reply).
            set_error(format!(
                "reply of {} bytes is over the service's {max}-byte maximum: not sent (answer again)",
                data.len()
            ));
            return AEGIS_MESSAGE_TOO_LARGE;
        }
        let req = rx.req.take().expect("checked above");
        rx.loan = None;
        CURRENT.with(|c| c.set(None));
        match req.reply(data) {
            Ok(()) => AEGIS_OK,
            Err(e) => fail(e),
        }
    })
}

/// Answers the current request with an error (see `aegis_respond_error`).
#[no_mangle]
pub unsafe extern "C" fn aegis_receiver_reply_error(
    rx: *mut aegis_receiver,
    code: u16,
    message: *const c_char,
) -> aegis_status {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let rx = need!(unsafe { rx.as_mut() }, "receiver");
        // SAFETY: forwarded caller contract.
        let message = arg!(unsafe { text(message, "message") });
        let Some(req) = rx.req.take() else {
            set_error("no request to answer (answered already, or none received)".into());
            return AEGIS_INVALID_ARGUMENT;
        };
        rx.loan = None;
        CURRENT.with(|c| c.set(None));
        match req.reply_error(code, message) {
            Ok(()) => AEGIS_OK,
            Err(e) => fail(e),
        }
    })
}

/// A buffer of `len` bytes in the instance's reply heap for the current request of
/// `aegis_receiver_next`: write the reply at `*data`, then send it with
/// `aegis_receiver_reply_loan`; the caller reads it where it was written. Asking again
/// replaces the previous buffer (given back). `AEGIS_MESSAGE_TOO_LARGE` over the service's
/// maximum, `AEGIS_LIMIT_EXCEEDED` while the heap is full of replies not yet read.
#[no_mangle]
pub unsafe extern "C" fn aegis_reply_loan(
    rx: *mut aegis_receiver,
    len: usize,
    data: *mut *mut u8,
) -> aegis_status {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let rx = need!(unsafe { rx.as_mut() }, "receiver");
        // SAFETY: forwarded caller contract.
        let data = need!(unsafe { data.as_mut() }, "data");
        rx.loan = None;
        let Some(req) = &rx.req else {
            set_error("no request to answer (answered already, or none received)".into());
            return AEGIS_INVALID_ARGUMENT;
        };
        match req.loan_reply(len) {
            Ok(mut l) => {
                *data = l.as_mut_slice().as_mut_ptr();
                // Borrows the instance as the request does (`'static` by the contract of
                // `aegis_receiver_new`), and is dropped before the receiver.
                rx.loan = Some(l);
                AEGIS_OK
            }
            Err(e) => fail(e),
        }
    })
}

/// Answers the current request with the buffer of `aegis_reply_loan`, as written.
#[no_mangle]
pub unsafe extern "C" fn aegis_receiver_reply_loan(rx: *mut aegis_receiver) -> aegis_status {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let rx = need!(unsafe { rx.as_mut() }, "receiver");
        let Some(loan) = rx.loan.take() else {
            set_error(
                "no reply loan to send (aegis_reply_loan first, after aegis_receiver_next)".into(),
            );
            return AEGIS_INVALID_ARGUMENT;
        };
        // A loan is only ever held beside its request (every answer drops both).
        let req = rx.req.take().expect("a reply loan's request");
        CURRENT.with(|c| c.set(None));
        match req.reply_loan(loan) {
            Ok(()) => AEGIS_OK,
            Err(e) => fail(e),
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn aegis_receiver_free(rx: *mut aegis_receiver) {
    if !rx.is_null() {
        CURRENT.with(|c| c.set(None));
        // SAFETY: a pointer from `aegis_receiver_new`, freed once.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(rx) })));
    }
}

// --- resources ------------------------------------------------------------------------------

/// `count` NUL-terminated ids.
unsafe fn id_list<'a>(
    ids: *const *const c_char,
    count: usize,
) -> Result<Vec<&'a str>, aegis_status> {
    if count > 0 && ids.is_null() {
        set_error("argument `ids` is NULL".into());
        return Err(AEGIS_NULL_ARGUMENT);
    }
    // SAFETY: `ids` has `count` string pointers (the header's contract).
    (0..count)
        .map(|k| unsafe { text(*ids.add(k), "id") })
        .collect()
}

/// Claims `count` resource ids for the instance, all or none (`AEGIS_RESOURCE_CONFLICT`
/// names the owner in `aegis_last_error`).
#[no_mangle]
pub unsafe extern "C" fn aegis_claim(
    inst: *const aegis_instance,
    ids: *const *const c_char,
    count: usize,
) -> aegis_status {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let inst = need!(unsafe { inst.as_ref() }, "instance");
        // SAFETY: forwarded caller contract.
        match unsafe { id_list(ids, count) }.map(|ids| inst.inst.claim(&ids)) {
            Ok(Ok(())) => AEGIS_OK,
            Ok(Err(e)) => fail(e),
            Err(s) => s,
        }
    })
}

/// Releases ids the instance owns, all or none.
#[no_mangle]
pub unsafe extern "C" fn aegis_release(
    inst: *const aegis_instance,
    ids: *const *const c_char,
    count: usize,
) -> aegis_status {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let inst = need!(unsafe { inst.as_ref() }, "instance");
        // SAFETY: forwarded caller contract.
        match unsafe { id_list(ids, count) }.map(|ids| inst.inst.release(&ids)) {
            Ok(Ok(())) => AEGIS_OK,
            Ok(Err(e)) => fail(e),
            Err(s) => s,
        }
    })
}

/// Moves ids the instance owns to instance `to_instance` of `to_service`, all or none. A
/// target that is not registered, or not Online, is `AEGIS_BAD_REQUEST` naming it.
#[no_mangle]
pub unsafe extern "C" fn aegis_transfer(
    inst: *const aegis_instance,
    ids: *const *const c_char,
    count: usize,
    to_service: *const c_char,
    to_instance: *const c_char,
    reason: *const c_char,
) -> aegis_status {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let inst = need!(unsafe { inst.as_ref() }, "instance");
        // SAFETY: forwarded caller contract.
        let args = unsafe {
            (
                id_list(ids, count),
                text(to_service, "to_service"),
                text(to_instance, "to_instance"),
                text(reason, "reason"),
            )
        };
        match args {
            (Ok(ids), Ok(s), Ok(i), Ok(r)) => match inst.inst.transfer(&ids, s, i, r) {
                Ok(()) => AEGIS_OK,
                Err(e) => fail(e),
            },
            (Err(s), ..) | (_, Err(s), ..) | (.., Err(s), _) | (.., Err(s)) => s,
        }
    })
}

// --- listings and watch ----------------------------------------------------------------------

fn json_out(v: &impl serde::Serialize, out: &mut aegis_buffer) -> aegis_status {
    match serde_json::to_vec(v) {
        Ok(b) => {
            to_buffer(b, out);
            AEGIS_OK
        }
        Err(e) => {
            set_error(format!("cannot encode the listing: {e}"));
            AEGIS_INTERNAL
        }
    }
}

/// Every service with its instances, as JSON (the shape of `aegisctl services --json`), in a
/// library-owned buffer.
#[no_mangle]
pub unsafe extern "C" fn aegis_services(
    bus: *const aegis_bus,
    json: *mut aegis_buffer,
) -> aegis_status {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let (bus, out) = match unsafe { (bus.as_ref(), json.as_mut()) } {
            (Some(b), Some(o)) => (b, o),
            _ => return AEGIS_NULL_ARGUMENT,
        };
        match bus.bus.services() {
            Ok(s) => json_out(&s, out),
            Err(e) => fail(e),
        }
    })
}

/// One service with its instances (id, pid, status, counters), as JSON.
#[no_mangle]
pub unsafe extern "C" fn aegis_service(
    bus: *const aegis_bus,
    name: *const c_char,
    json: *mut aegis_buffer,
) -> aegis_status {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let (bus, out) = match unsafe { (bus.as_ref(), json.as_mut()) } {
            (Some(b), Some(o)) => (b, o),
            _ => return AEGIS_NULL_ARGUMENT,
        };
        // SAFETY: forwarded caller contract.
        let name = arg!(unsafe { text(name, "name") });
        match bus.bus.service(name) {
            Ok(s) => json_out(&s, out),
            Err(e) => fail(e),
        }
    })
}

/// Resources of `service` (NULL: all), at most `limit` (0: 100) from `offset`, as JSON.
#[no_mangle]
pub unsafe extern "C" fn aegis_resources(
    bus: *const aegis_bus,
    service: *const c_char,
    limit: u32,
    offset: u32,
    json: *mut aegis_buffer,
) -> aegis_status {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let (bus, out) = match unsafe { (bus.as_ref(), json.as_mut()) } {
            (Some(b), Some(o)) => (b, o),
            _ => return AEGIS_NULL_ARGUMENT,
        };
        let service = if service.is_null() {
            None
        } else {
            // SAFETY: forwarded caller contract.
            match unsafe { text(service, "service") } {
                Ok(s) => Some(s.to_owned()),
                Err(s) => return s,
            }
        };
        let q = ResourceQuery {
            service,
            limit,
            offset,
            ..Default::default()
        };
        match bus.bus.resources(&q) {
            Ok(p) => json_out(&p, out),
            Err(e) => fail(e),
        }
    })
}

/// Sleeps until an instance of `service` joins, leaves or changes health, or `timeout_ms`
/// passes. `*generation`: in, the generation seen (0 at first); out, the one now.
/// `AEGIS_OK` when it moved, `AEGIS_TIMEOUT` when `timeout_ms` passed without a change. A
/// service nobody has registered yet is generation 0: the watch returns when it appears.
#[no_mangle]
pub unsafe extern "C" fn aegis_watch(
    bus: *const aegis_bus,
    service: *const c_char,
    generation: *mut u32,
    timeout_ms: u64,
) -> aegis_status {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let (bus, g) = match unsafe { (bus.as_ref(), generation.as_mut()) } {
            (Some(b), Some(g)) => (b, g),
            _ => return AEGIS_NULL_ARGUMENT,
        };
        // SAFETY: forwarded caller contract.
        let service = arg!(unsafe { text(service, "service") });
        let seen = *g;
        *g = bus
            .bus
            .watch(service, seen, Duration::from_millis(timeout_ms));
        if *g == seen {
            set_error(format!(
                "service '{service}' did not change within {timeout_ms} ms"
            ));
            return AEGIS_TIMEOUT;
        }
        AEGIS_OK
    })
}
