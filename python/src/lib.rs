//! `aegis_ipc._native`: the Rust client bound with PyO3. The Python package (`aegis_ipc`)
//! re-exports these classes and adds the asyncio face and the exception classes.
//!
//! The GIL is released whenever a call waits (calls, receiving, watching); a serving
//! thread takes it only to run the handler. On the main thread, a call that sleeps for its
//! reply looks at Python's signals every few milliseconds ([`CallOptions::interrupt`]), and
//! `serve` runs the serving loop on a helper thread while the main thread watches for them,
//! so Ctrl-C ends both promptly.

use std::cell::RefCell;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use aegis_client::{
    BorrowedReply as RBorrowedReply, Bus as RBus, BusOptions, CallInfo, CallOptions, Error,
    EventFd as REventFd, Instance as RInstance, Interrupt, Loan as RLoan, Pending, Receiver,
    RegisterOptions, ReplyLoan as RReplyLoan, Request, ResourceMetadata, ResourceQuery,
    ResourceSpec, ServiceError,
};
use pyo3::exceptions::{PyBufferError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};

thread_local! {
    /// The request this thread's handler is running (hops, trace id): a call made from a
    /// handler is a nested call, one hop further on the same trace, so a loop of services
    /// calling each other ends in `LoopDetected` as it does from Rust.
    static CURRENT: std::cell::Cell<Option<aegis_client::CallContext>> = const { std::cell::Cell::new(None) };
    /// The exception a signal handler raised while this thread's call slept (Ctrl-C's
    /// `KeyboardInterrupt`): raised when the call returns `Interrupted`.
    static SIGNALLED: RefCell<Option<PyErr>> = const { RefCell::new(None) };
    /// Whether this is the process's main thread (the only one Python runs signal
    /// handlers on): its thread id is the process id.
    static MAIN: bool = {
        // SAFETY: gettid and getpid take no arguments and cannot fail.
        unsafe { libc::gettid() == libc::getpid() }
    };
}

/// The exception class of `aegis_ipc.errors` named `class`, built with `message` and the
/// attributes every bus error carries: `code`, `service`, `instance`, `trace_id`,
/// `attempts` (a list of `(instance, error, seconds)`), `None` where unknown.
fn exception(py: Python<'_>, class: &str, message: String, attrs: Attrs) -> PyErr {
    let made = (|| -> PyResult<PyErr> {
        let cls = py.import("aegis_ipc.errors")?.getattr(class)?;
        let exc = cls.call1((message.clone(),))?;
        exc.setattr("code", attrs.code)?;
        exc.setattr("service", attrs.service)?;
        exc.setattr("instance", attrs.instance)?;
        exc.setattr("trace_id", attrs.trace_id)?;
        let attempts = PyList::empty(py);
        for a in attrs.attempts {
            attempts.append(PyTuple::new(
                py,
                [
                    a.instance.into_pyobject(py)?.into_any(),
                    a.error.into_pyobject(py)?.into_any(),
                    a.duration.as_secs_f64().into_pyobject(py)?.into_any(),
                ],
            )?)?;
        }
        exc.setattr("attempts", attempts)?;
        Ok(PyErr::from_value(exc))
    })();
    made.unwrap_or_else(|e| e)
}

#[derive(Default)]
struct Attrs {
    code: u16,
    service: Option<String>,
    instance: Option<String>,
    trace_id: Option<u64>,
    attempts: Vec<aegis_client::Attempt>,
}

/// The Python exception for a bus error: a class of `aegis_ipc.errors`.
fn to_py(e: Error) -> PyErr {
    if let Error::Interrupted = e {
        // The signal handler's own exception (KeyboardInterrupt), kept when it fired.
        if let Some(err) = SIGNALLED.with(|s| s.borrow_mut().take()) {
            return err;
        }
    }
    let mut a = Attrs {
        code: e.code(),
        ..Default::default()
    };
    let (local, text) = match e.remote_as_local() {
        Some((kind, message)) => (Some(kind), message.to_owned()),
        None => (None, e.to_string()),
    };
    let class = match e {
        Error::NoAvailableInstance { service } => {
            a.service = Some(service);
            "NoAvailableInstance"
        }
        Error::OwnerUnavailable { owner, .. } => {
            a.instance = Some(owner);
            "OwnerUnavailable"
        }
        Error::CircuitOpen { service, .. } => {
            a.service = Some(service);
            "CircuitOpen"
        }
        Error::Timeout {
            service,
            attempts,
            trace_id,
            ..
        } => {
            a.service = Some(service);
            a.instance = attempts.last().map(|x| x.instance.clone());
            a.trace_id = Some(trace_id);
            a.attempts = attempts;
            "Timeout"
        }
        Error::BadRequest(_) | Error::Forked(_) => "BadRequest",
        Error::ResourceNotFound { .. } => "ResourceNotFound",
        Error::ResourceConflict { owner, .. } => {
            a.instance = Some(owner);
            "ResourceConflict"
        }
        Error::Conflict {
            service,
            instance_id,
            ..
        } => {
            a.service = Some(service);
            a.instance = Some(instance_id);
            "InstanceConflict"
        }
        Error::NotOwner(_) => "NotOwner",
        Error::PermissionDenied(_) => "PermissionDenied",
        Error::LimitExceeded(_) => "LimitExceeded",
        Error::LoopDetected { .. } => "LoopDetected",
        Error::MessageTooLarge { service, .. } => {
            a.service = Some(service);
            "MessageTooLarge"
        }
        Error::BrokerUnavailable { .. } => "BrokerUnavailable",
        Error::Incompatible(_) => "Incompatible",
        Error::Remote { instance, .. } => {
            a.instance = Some(instance);
            local.unwrap_or("RemoteError")
        }
        _ => "InternalError",
    };
    Python::with_gil(|py| exception(py, class, text, a))
}

fn bad_request(message: String) -> PyErr {
    Python::with_gil(|py| {
        exception(
            py,
            "BadRequest",
            message,
            Attrs {
                code: 400,
                ..Default::default()
            },
        )
    })
}

/// Runs `f` with `req` as this thread's current request.
fn within<R>(req: &Request<'_>, f: impl FnOnce() -> R) -> R {
    let before = CURRENT.with(|c| c.replace(Some(req.context())));
    let r = f();
    CURRENT.with(|c| c.set(before));
    r
}

/// The interrupt check of calls made on the main thread: runs Python's pending signal
/// handlers; one that raised (Ctrl-C) stops the call, and its exception is kept for
/// `to_py`. One shared closure: no allocation per call.
fn interrupt() -> Interrupt {
    static CHECK: OnceLock<Interrupt> = OnceLock::new();
    CHECK
        .get_or_init(|| {
            Interrupt(Arc::new(|| {
                Python::with_gil(|py| match py.check_signals() {
                    Ok(()) => false,
                    Err(e) => {
                        SIGNALLED.with(|s| *s.borrow_mut() = Some(e));
                        true
                    }
                })
            }))
        })
        .clone()
}

/// Seconds as a positive duration, or `BadRequest` naming the parameter.
fn seconds(s: f64, name: &str) -> PyResult<Duration> {
    Duration::try_from_secs_f64(s)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            bad_request(format!(
                "{name} must be a positive number of seconds, not {s}"
            ))
        })
}

fn options(
    timeout: Option<f64>,
    attempt_timeout: Option<f64>,
    idempotent: bool,
    exclude: Vec<String>,
) -> PyResult<CallOptions> {
    let mut o = CallOptions::default();
    if let Some(ctx) = CURRENT.with(|c| c.get()) {
        o = o.within(&ctx);
    }
    if let Some(t) = timeout {
        o.timeout = seconds(t, "timeout")?;
        o.attempt_timeout = o.attempt_timeout.min(o.timeout);
    }
    if let Some(t) = attempt_timeout {
        o.attempt_timeout = seconds(t, "attempt_timeout")?;
    }
    o.idempotent = idempotent;
    o.exclude = exclude;
    if MAIN.with(|m| *m) {
        o.interrupt = Some(interrupt());
    }
    Ok(o)
}

/// A reply: its bytes and the instance that answered (its id looked up when asked for:
/// a call that does not ask pays no string).
#[pyclass(frozen, module = "aegis_ipc")]
pub struct Reply {
    #[pyo3(get)]
    payload: Py<PyBytes>,
    info: CallInfo,
    bus: RBus,
}

#[pymethods]
impl Reply {
    #[getter]
    fn instance_id(&self) -> String {
        self.bus.instance_id(self.info)
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "Reply(instance_id={:?}, payload={} bytes)",
            self.instance_id(),
            self.payload.bind(py).as_bytes().len()
        )
    }
}

fn reply(py: Python<'_>, bus: &RBus, out: &[u8], info: CallInfo) -> Reply {
    Reply {
        payload: PyBytes::new(py, out).unbind(),
        info,
        bus: bus.clone(),
    }
}

/// A connection to the bus. Thread-safe.
#[pyclass(subclass, module = "aegis_ipc")]
pub struct Bus {
    /// `None` once closed.
    bus: RwLock<Option<RBus>>,
}

impl Bus {
    /// The connection, or `BadRequest` once closed; a read lock held for the operation.
    fn with<R>(&self, f: impl FnOnce(&RBus) -> PyResult<R>) -> PyResult<R> {
        let g = self.bus.read().unwrap_or_else(|p| p.into_inner());
        match g.as_ref() {
            Some(b) => f(b),
            None => Err(bad_request("this Bus is closed".into())),
        }
    }

    /// Takes `loan` (refused while memoryviews of it are open) and makes the zero-copy call
    /// `call` with it, the GIL released: its reply as a `BorrowedReply`.
    fn with_loan(
        &self,
        py: Python<'_>,
        loan: &Bound<'_, Loan>,
        call: impl FnOnce(&RBus, RLoan) -> aegis_client::Result<RBorrowedReply> + Send,
    ) -> PyResult<BorrowedReply> {
        let l = take_loan(loan)?;
        self.with(|bus| {
            let r = py.allow_threads(|| call(bus, l)).map_err(to_py)?;
            Ok(BorrowedReply {
                reply: Some(r),
                exports: 0,
            })
        })
    }

    /// A call `submit` makes on this connection (with the GIL released: it may wait for
    /// room in the instance's ring), as a `PendingCall`.
    fn submitted(
        &self,
        py: Python<'_>,
        submit: impl FnOnce(&RBus) -> aegis_client::Result<Pending<'_>> + Send,
    ) -> PyResult<PendingCall> {
        self.with(|bus| {
            let p = py.allow_threads(|| submit(bus)).map_err(to_py)?;
            Ok(Self::pending(bus, Some(p)).expect("a call"))
        })
    }

    fn pending(bus: &RBus, p: Option<Pending<'_>>) -> Option<PendingCall> {
        p.map(|p| {
            let bus = Box::new(bus.clone());
            // SAFETY: the pending call borrows the connection; `PendingCall` owns a boxed
            // clone of it that does not move, and its field order drops the call first. The
            // call borrowed `bus`'s `Arc`, whose `BusInner` is the same one the clone keeps
            // alive.
            let p: Pending<'static> = unsafe { std::mem::transmute(p) };
            PendingCall {
                pending: Mutex::new(Some(p)),
                bus,
            }
        })
    }
}

#[pymethods]
impl Bus {
    #[new]
    #[pyo3(signature = (dir=None, mailboxes=None))]
    fn new(py: Python<'_>, dir: Option<String>, mailboxes: Option<u32>) -> PyResult<Self> {
        let mut opts = BusOptions {
            dir: dir.map(Into::into),
            ..Default::default()
        };
        if let Some(m) = mailboxes {
            if m == 0 {
                return Err(bad_request("mailboxes must be at least 1".into()));
            }
            opts.mailboxes = m;
        }
        py.allow_threads(|| RBus::connect_with(opts))
            .map(|bus| Bus {
                bus: RwLock::new(Some(bus)),
            })
            .map_err(to_py)
    }

    /// How many calls this connection can have in flight at once.
    #[getter]
    fn mailboxes(&self) -> PyResult<u32> {
        self.with(|b| Ok(b.mailbox_count()))
    }

    /// Closes this handle (waits for its calls in progress). Instances registered through
    /// it keep the connection until they are unregistered; submitted calls keep it until
    /// they are collected or dropped.
    fn close(&self, py: Python<'_>) {
        let old = py.allow_threads(|| self.bus.write().unwrap_or_else(|p| p.into_inner()).take());
        py.allow_threads(|| drop(old));
    }

    #[getter]
    fn closed(&self) -> bool {
        self.bus.read().unwrap_or_else(|p| p.into_inner()).is_none()
    }

    #[pyo3(signature = (service, method, payload, *, timeout=None, attempt_timeout=None, idempotent=false, exclude=Vec::new()))]
    #[allow(clippy::too_many_arguments)]
    fn call(
        &self,
        py: Python<'_>,
        service: &str,
        method: &str,
        payload: &[u8],
        timeout: Option<f64>,
        attempt_timeout: Option<f64>,
        idempotent: bool,
        exclude: Vec<String>,
    ) -> PyResult<Reply> {
        let opts = options(timeout, attempt_timeout, idempotent, exclude)?;
        self.with(|bus| {
            let mut out = Vec::new();
            let info = py
                .allow_threads(|| bus.call_into(service, method, payload, &opts, &mut out))
                .map_err(to_py)?;
            Ok(reply(py, bus, &out, info))
        })
    }

    /// A writable buffer of `size` bytes for a request to `service`, in the request heap of
    /// this connection's channel to one of its instances (only that instance can read it):
    /// fill it through `memoryview(loan)` and send it with `call_loan` to that service,
    /// without a copy.
    fn loan(&self, service: &str, size: usize) -> PyResult<Loan> {
        self.with(|bus| {
            Ok(Loan {
                loan: Some(bus.loan(service, size).map_err(to_py)?),
                exports: 0,
            })
        })
    }

    /// `call` with a request written in a `Loan` (spent by the call; its memoryviews must
    /// be released first) and the reply read in place: a `BorrowedReply`, whose
    /// `memoryview` shows the bytes where the instance wrote them. Nothing is copied.
    #[pyo3(signature = (service, method, loan, *, timeout=None, attempt_timeout=None, idempotent=false, exclude=Vec::new()))]
    #[allow(clippy::too_many_arguments)]
    fn call_loan(
        &self,
        py: Python<'_>,
        service: &str,
        method: &str,
        loan: &Bound<'_, Loan>,
        timeout: Option<f64>,
        attempt_timeout: Option<f64>,
        idempotent: bool,
        exclude: Vec<String>,
    ) -> PyResult<BorrowedReply> {
        let opts = options(timeout, attempt_timeout, idempotent, exclude)?;
        self.with_loan(py, loan, |bus, l| bus.call_loan(service, method, l, &opts))
    }

    /// `loan` for a call by resource id: a buffer in the request heap of this connection's
    /// channel to the instance that owns `resource` now; send it with `call_resource_loan`.
    fn loan_resource(&self, resource: &str, size: usize) -> PyResult<Loan> {
        self.with(|bus| {
            Ok(Loan {
                loan: Some(bus.loan_resource(resource, size).map_err(to_py)?),
                exports: 0,
            })
        })
    }

    /// `call_resource` with a request written in a `Loan` from `loan_resource` for the
    /// same id (spent by the call) and the reply read in place (a `BorrowedReply`).
    #[pyo3(signature = (resource, method, loan, *, timeout=None, attempt_timeout=None, idempotent=false))]
    #[allow(clippy::too_many_arguments)]
    fn call_resource_loan(
        &self,
        py: Python<'_>,
        resource: &str,
        method: &str,
        loan: &Bound<'_, Loan>,
        timeout: Option<f64>,
        attempt_timeout: Option<f64>,
        idempotent: bool,
    ) -> PyResult<BorrowedReply> {
        let opts = options(timeout, attempt_timeout, idempotent, Vec::new())?;
        self.with_loan(py, loan, |bus, l| {
            bus.call_resource_loan(resource, method, l, &opts)
        })
    }

    /// `call` with the reply read in place (a `BorrowedReply`); the request is copied.
    #[pyo3(signature = (service, method, payload, *, timeout=None, attempt_timeout=None, idempotent=false, exclude=Vec::new()))]
    #[allow(clippy::too_many_arguments)]
    fn call_view(
        &self,
        py: Python<'_>,
        service: &str,
        method: &str,
        payload: &[u8],
        timeout: Option<f64>,
        attempt_timeout: Option<f64>,
        idempotent: bool,
        exclude: Vec<String>,
    ) -> PyResult<BorrowedReply> {
        let opts = options(timeout, attempt_timeout, idempotent, exclude)?;
        self.with(|bus| {
            let r = py
                .allow_threads(|| bus.call_borrowed(service, method, payload, &opts))
                .map_err(to_py)?;
            Ok(BorrowedReply {
                reply: Some(r),
                exports: 0,
            })
        })
    }

    #[pyo3(signature = (resource, method, payload, *, timeout=None, attempt_timeout=None, idempotent=false))]
    #[allow(clippy::too_many_arguments)]
    fn call_resource(
        &self,
        py: Python<'_>,
        resource: &str,
        method: &str,
        payload: &[u8],
        timeout: Option<f64>,
        attempt_timeout: Option<f64>,
        idempotent: bool,
    ) -> PyResult<Reply> {
        let opts = options(timeout, attempt_timeout, idempotent, Vec::new())?;
        self.with(|bus| {
            let mut out = Vec::new();
            let info = py
                .allow_threads(|| {
                    bus.call_resource_into(resource, method, payload, &opts, &mut out)
                })
                .map_err(to_py)?;
            Ok(reply(py, bus, &out, info))
        })
    }

    /// Sends a call and returns at once; waits for room while the instance's ring is full.
    #[pyo3(signature = (service, method, payload, *, timeout=None, attempt_timeout=None, idempotent=false, exclude=Vec::new()))]
    #[allow(clippy::too_many_arguments)]
    fn submit(
        &self,
        py: Python<'_>,
        service: &str,
        method: &str,
        payload: &[u8],
        timeout: Option<f64>,
        attempt_timeout: Option<f64>,
        idempotent: bool,
        exclude: Vec<String>,
    ) -> PyResult<PendingCall> {
        let opts = options(timeout, attempt_timeout, idempotent, exclude)?;
        self.submitted(py, |bus| bus.submit(service, method, payload, &opts))
    }

    /// `submit` with a request written in a `Loan` for `service` (spent by the call; its
    /// memoryviews must be released first): the call goes to the loan's instance while it
    /// is routable, and the `PendingCall` keeps the loan until the call settles; read the
    /// reply in place with `result_view()`.
    #[pyo3(signature = (service, method, loan, *, timeout=None, attempt_timeout=None, idempotent=false, exclude=Vec::new()))]
    #[allow(clippy::too_many_arguments)]
    fn submit_loan(
        &self,
        py: Python<'_>,
        service: &str,
        method: &str,
        loan: &Bound<'_, Loan>,
        timeout: Option<f64>,
        attempt_timeout: Option<f64>,
        idempotent: bool,
        exclude: Vec<String>,
    ) -> PyResult<PendingCall> {
        let opts = options(timeout, attempt_timeout, idempotent, exclude)?;
        let l = take_loan(loan)?;
        self.submitted(py, |bus| bus.submit_loan(service, method, l, &opts))
    }

    /// `submit` that never waits: `None` says the ring is full or every mailbox is in use;
    /// try again later (the call began `waited` seconds ago; past its deadline the answer
    /// is the error).
    #[pyo3(signature = (service, method, payload, waited, *, timeout=None, attempt_timeout=None, idempotent=false, exclude=Vec::new()))]
    #[allow(clippy::too_many_arguments)]
    fn _try_submit(
        &self,
        service: &str,
        method: &str,
        payload: &[u8],
        waited: f64,
        timeout: Option<f64>,
        attempt_timeout: Option<f64>,
        idempotent: bool,
        exclude: Vec<String>,
    ) -> PyResult<Option<PendingCall>> {
        let opts = options(timeout, attempt_timeout, idempotent, exclude)?;
        let now = std::time::Instant::now();
        let start = Duration::try_from_secs_f64(waited)
            .ok()
            .and_then(|w| now.checked_sub(w))
            .unwrap_or(now);
        self.with(|bus| {
            let p = bus
                .try_submit(start, service, method, payload, &opts)
                .map_err(to_py)?;
            Ok(Self::pending(bus, p))
        })
    }

    /// The connection's event fd for one event loop: readable when a submitted call is
    /// done; read 8 bytes to reset it. Another loop takes its own (`_new_event_fd`).
    fn event_fd(&self) -> PyResult<i32> {
        use std::os::fd::AsRawFd;
        self.with(|b| b.event_fd().map(|f| f.as_raw_fd()).map_err(to_py))
    }

    /// A new event fd of this connection, for one more event loop.
    fn _new_event_fd(&self) -> PyResult<EventFd> {
        self.with(|b| b.new_event_fd().map(|fd| EventFd { fd }).map_err(to_py))
    }

    #[pyo3(signature = (service, instance_id, metadata=None))]
    fn register(
        &self,
        py: Python<'_>,
        service: &str,
        instance_id: &str,
        metadata: Option<Bound<'_, PyDict>>,
    ) -> PyResult<Instance> {
        let mut opts = RegisterOptions::default();
        if let Some(m) = metadata {
            for (k, v) in m.iter() {
                opts.metadata.push((k.extract()?, v.extract()?));
            }
        }
        self.with(|bus| {
            let inst = py
                .allow_threads(|| bus.register_with(service, instance_id, opts))
                .map_err(to_py)?;
            Ok(Instance {
                inst: RwLock::new(Some(Arc::new(inst))),
                rx: Mutex::new(None),
            })
        })
    }

    /// Every service with its instances, as JSON (parsed by the package).
    fn _services_json(&self, py: Python<'_>) -> PyResult<String> {
        self.with(|bus| {
            let s = py.allow_threads(|| bus.services()).map_err(to_py)?;
            serde_json::to_string(&s).map_err(|e| PyValueError::new_err(e.to_string()))
        })
    }

    fn _service_json(&self, py: Python<'_>, name: &str) -> PyResult<String> {
        self.with(|bus| {
            let s = py.allow_threads(|| bus.service(name)).map_err(to_py)?;
            serde_json::to_string(&s).map_err(|e| PyValueError::new_err(e.to_string()))
        })
    }

    #[pyo3(signature = (service=None, limit=100, offset=0))]
    fn _resources_json(
        &self,
        py: Python<'_>,
        service: Option<String>,
        limit: u32,
        offset: u32,
    ) -> PyResult<String> {
        let q = ResourceQuery {
            service,
            limit,
            offset,
            ..Default::default()
        };
        self.with(|bus| {
            let p = py.allow_threads(|| bus.resources(&q)).map_err(to_py)?;
            serde_json::to_string(&p).map_err(|e| PyValueError::new_err(e.to_string()))
        })
    }

    /// Sleeps until an instance of `service` joins, leaves or changes health, or `timeout`
    /// seconds pass; returns the service's generation (pass it back as `seen`). An unknown
    /// service is generation 0: the watch returns when it appears.
    #[pyo3(signature = (service, seen=0, timeout=1.0))]
    fn watch(&self, py: Python<'_>, service: &str, seen: u32, timeout: f64) -> PyResult<u32> {
        let t = if timeout == 0.0 {
            Duration::ZERO
        } else {
            seconds(timeout, "timeout")?
        };
        self.with(|bus| Ok(py.allow_threads(|| bus.watch(service, seen, t))))
    }
}

/// An event fd for one event loop (see `Bus._new_event_fd`).
#[pyclass(frozen, module = "aegis_ipc")]
pub struct EventFd {
    fd: REventFd,
}

#[pymethods]
impl EventFd {
    fn fileno(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.fd.as_fd().as_raw_fd()
    }

    /// Resets the fd; whether it was readable.
    fn clear(&self) -> bool {
        self.fd.clear()
    }
}

/// A call sent with `Bus.submit`.
#[pyclass(module = "aegis_ipc")]
pub struct PendingCall {
    // Dropped before the connection it borrows (field order).
    pending: Mutex<Option<Pending<'static>>>,
    bus: Box<RBus>,
}

impl PendingCall {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Pending<'static>>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[pymethods]
impl PendingCall {
    /// Whether the reply is there (collecting it will not wait).
    fn ready(&self) -> bool {
        self.lock().as_ref().is_none_or(|p| p.is_ready())
    }

    /// The reply (waits if not ready); raises the call's error.
    fn result(&self, py: Python<'_>) -> PyResult<Reply> {
        let p = self
            .lock()
            .take()
            .ok_or_else(|| bad_request("this call's result was already taken".into()))?;
        let mut out = Vec::new();
        let info = py.allow_threads(|| p.wait(&mut out)).map_err(to_py)?;
        Ok(reply(py, &self.bus, &out, info))
    }

    /// The reply read in place (waits if not ready): a `BorrowedReply`, whose `memoryview`
    /// shows the bytes where the instance wrote them; raises the call's error.
    fn result_view(&self, py: Python<'_>) -> PyResult<BorrowedReply> {
        let p = self
            .lock()
            .take()
            .ok_or_else(|| bad_request("this call's result was already taken".into()))?;
        let r = py.allow_threads(|| p.wait_borrowed()).map_err(to_py)?;
        Ok(BorrowedReply {
            reply: Some(r),
            exports: 0,
        })
    }

    /// Without waiting: the reply once the call is settled (replied, past its deadline,
    /// or its instance gone; the error is raised then), else `None`.
    fn poll(&self, py: Python<'_>) -> PyResult<Option<Reply>> {
        let mut g = self.lock();
        let Some(p) = g.as_mut() else {
            return Err(bad_request("this call's result was already taken".into()));
        };
        let mut out = Vec::new();
        match p.try_wait(&mut out) {
            None => Ok(None),
            Some(r) => {
                *g = None;
                drop(g);
                let info = r.map_err(to_py)?;
                Ok(Some(reply(py, &self.bus, &out, info)))
            }
        }
    }

    /// Cancels the call now (a request not yet taken never runs) and frees its mailbox
    /// (at once, or when its instance answers a request it already took).
    fn cancel(&self) {
        let p = self.lock().take();
        drop(p);
    }

    /// Makes `fd` readable when this call is done (and every liveness period until then).
    fn _arm(&self, fd: &EventFd) {
        if let Some(p) = self.lock().as_ref() {
            p.notify(&fd.fd);
        }
    }

    /// Arms the call on its connection's own event fd (`Bus.event_fd`).
    fn notify(&self) -> PyResult<()> {
        match self.lock().as_ref() {
            Some(p) => p.notify_event_fd().map_err(to_py),
            None => Ok(()),
        }
    }
}

impl Drop for PendingCall {
    fn drop(&mut self) {
        // Cancels an uncollected call before the connection reference goes.
        self.pending.get_mut().map(|p| p.take()).ok();
    }
}

/// State of pull-style serving: the receiver and the request being answered.
struct Pull {
    // The request borrows the receiver, which borrows the instance: dropped in this order.
    req: Option<Request<'static>>,
    rx: Box<Receiver<'static>>,
    _inst: Arc<RInstance>,
}

/// A registered instance.
#[pyclass(module = "aegis_ipc")]
pub struct Instance {
    /// `None` once unregistered. Serving threads hold clones of the `Arc`.
    inst: RwLock<Option<Arc<RInstance>>>,
    // Pull-style state (holds its own clone of the instance).
    rx: Mutex<Option<Pull>>,
}

impl Instance {
    fn get(&self) -> PyResult<Arc<RInstance>> {
        self.inst
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| bad_request("the instance was unregistered".into()))
    }

    fn take_request(&self) -> PyResult<Request<'static>> {
        self.rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
            .and_then(|p| p.req.take())
            .ok_or_else(|| bad_request("no received request to answer".into()))
    }
}

/// Runs a Python handler for `req`: its bytes into `out`, or the error to answer with.
fn handle(
    py: Python<'_>,
    handler: &PyObject,
    req: &Request<'_>,
    out: &mut Vec<u8>,
) -> Result<(), ServiceError> {
    let payload = PyBytes::new(py, req.payload());
    match handler.call1(py, (req.method(), payload)) {
        Ok(v) => match v.bind(py).downcast::<PyBytes>() {
            Ok(b) => {
                out.extend_from_slice(b.as_bytes());
                Ok(())
            }
            Err(_) => Err(ServiceError::new(
                500,
                format!(
                    "handler returned {}, not bytes",
                    v.bind(py)
                        .get_type()
                        .name()
                        .map(|n| n.to_string())
                        .unwrap_or_default()
                ),
            )),
        },
        Err(e) => {
            let code = e
                .value(py)
                .getattr("code")
                .and_then(|c| c.extract::<u16>())
                .unwrap_or(500);
            Err(ServiceError::new(code, e.value(py).to_string()))
        }
    }
}

/// How often `serve` on the main thread looks at Python's signals.
const SIGNAL_CHECK: Duration = Duration::from_millis(20);

#[pymethods]
impl Instance {
    #[getter]
    fn id(&self) -> PyResult<String> {
        Ok(self.get()?.id().to_owned())
    }

    #[getter]
    fn service(&self) -> PyResult<String> {
        Ok(self.get()?.service().to_owned())
    }

    /// Serves requests on this thread until `stop()`: `handler(method: str, payload: bytes)`
    /// returns the reply bytes. A handler that raises sends the caller a remote error with
    /// the exception's text (code 500; `aegis_ipc.ServiceError(code, message)` chooses the
    /// code); a non-bytes return value is an error too. A signal handler that raises
    /// (Ctrl-C's `KeyboardInterrupt`) stops serving within milliseconds and its exception
    /// propagates.
    fn serve(&self, py: Python<'_>, handler: PyObject) -> PyResult<()> {
        let inst = self.get()?;
        let run = |inst: &RInstance| {
            inst.serve(|req, out| {
                within(req, || {
                    Python::with_gil(|py| handle(py, &handler, req, out))
                })
            })
        };
        if !MAIN.with(|m| *m) {
            return py.allow_threads(|| run(&inst)).map_err(to_py);
        }
        // On the main thread, the loop runs on a helper thread: this one waits for it and
        // runs Python's signal handlers, which only ever run here.
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        // Only this thread receives; the Mutex makes the receiver shareable with
        // `allow_threads` closures.
        let done_rx = Mutex::new(done_rx);
        let recv = |t: Option<Duration>| {
            let rx = done_rx.lock().unwrap_or_else(|p| p.into_inner());
            match t {
                Some(t) => rx.recv_timeout(t),
                None => rx
                    .recv()
                    .map_err(|_| std::sync::mpsc::RecvTimeoutError::Disconnected),
            }
        };
        std::thread::scope(|s| {
            let inst2 = inst.clone();
            let run = &run;
            s.spawn(move || {
                let r = run(&inst2);
                let _ = done_tx.send(r);
            });
            loop {
                match py.allow_threads(|| recv(Some(SIGNAL_CHECK))) {
                    Ok(r) => return r.map_err(to_py),
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                        return Err(PyValueError::new_err("the serving thread ended"))
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                }
                if let Err(e) = py.check_signals() {
                    inst.stop_handle().stop();
                    let _ = py.allow_threads(|| recv(None));
                    return Err(e);
                }
            }
        })
    }

    /// Stops every thread serving this instance (`serve` returns, `receive` gives None).
    fn stop(&self) -> PyResult<()> {
        self.get()?.stop_handle().stop();
        Ok(())
    }

    /// Pull-style: the next request as `(method, payload)`, or None after `timeout`
    /// seconds (None: wait until stopped). Answer with `reply` or `reply_error` before
    /// the next `receive` (an unanswered request gets an error reply).
    #[pyo3(signature = (timeout=None))]
    fn receive(
        &self,
        py: Python<'_>,
        timeout: Option<f64>,
    ) -> PyResult<Option<(String, Py<PyBytes>)>> {
        let inst = self.get()?;
        let t = match timeout {
            None => None,
            Some(0.0) => Some(Duration::ZERO),
            Some(t) => Some(seconds(t, "timeout")?),
        };
        let mut guard = self.rx.lock().unwrap_or_else(|p| p.into_inner());
        let pull = guard.get_or_insert_with(|| {
            // SAFETY: the receiver borrows the instance, whose `Arc` clone is stored beside
            // it in `Pull` and dropped after it (field order); the `Arc`'s target does not
            // move.
            let r: &'static RInstance = unsafe { &*(Arc::as_ptr(&inst)) };
            Pull {
                req: None,
                rx: Box::new(r.receiver()),
                _inst: inst.clone(),
            }
        });
        pull.req = None;
        // SAFETY: the boxed receiver does not move; the request it hands out is stored
        // beside it and dropped before it (and before every next receive).
        let rx: &'static mut Receiver<'static> =
            unsafe { &mut *(pull.rx.as_mut() as *mut Receiver<'static>) };
        let got = py.allow_threads(|| rx.recv(t)).map_err(to_py)?;
        Ok(got.map(|req| {
            let r = (
                req.method().to_owned(),
                PyBytes::new(py, req.payload()).unbind(),
            );
            pull.req = Some(req);
            r
        }))
    }

    /// Answers the request `receive` returned. A reply over the service's maximum raises
    /// `MessageTooLarge` (the caller gets error 413).
    fn reply(&self, data: &[u8]) -> PyResult<()> {
        let req = self.take_request()?;
        req.reply(data).map_err(to_py)
    }

    /// Answers the request `receive` returned with an error code and message.
    fn reply_error(&self, code: u16, message: &str) -> PyResult<()> {
        let req = self.take_request()?;
        req.reply_error(code, message).map_err(to_py)
    }

    /// A writable buffer of `size` bytes in this instance's reply heap for the request
    /// `receive` returned: fill it through `memoryview(loan)` and answer with
    /// `reply_loan`; the caller reads it where it was written.
    fn loan_reply(&self, size: usize) -> PyResult<ReplyLoan> {
        let inst = self.get()?;
        let guard = self.rx.lock().unwrap_or_else(|p| p.into_inner());
        let req = guard
            .as_ref()
            .and_then(|p| p.req.as_ref())
            .ok_or_else(|| bad_request("no received request to answer".into()))?;
        // Borrows the instance's inner state as the request does (`'static` by `Pull`'s
        // own contract); the `Arc` stored beside it in `ReplyLoan` keeps that alive (field
        // order drops the loan first).
        let loan = req.loan_reply(size).map_err(to_py)?;
        Ok(ReplyLoan {
            loan: Some(loan),
            exports: 0,
            _inst: inst,
        })
    }

    /// Answers the request `receive` returned with a `ReplyLoan` (spent; its memoryviews
    /// must be released first).
    fn reply_loan(&self, loan: &Bound<'_, ReplyLoan>) -> PyResult<()> {
        let l = {
            let mut l = loan.borrow_mut();
            let exports = l.exports;
            take_unexported(&mut l.loan, exports)?
        };
        let req = self.take_request()?;
        req.reply_loan(l).map_err(to_py)
    }

    /// Claims resource ids (all or none), each with `metadata` if given: a dict of
    /// `resource_type`, `version`, `tags`, `attributes`, `created_by`, `ttl` (seconds),
    /// `priority`.
    #[pyo3(signature = (ids, metadata=None))]
    fn claim(
        &self,
        py: Python<'_>,
        ids: Vec<String>,
        metadata: Option<Bound<'_, PyDict>>,
    ) -> PyResult<()> {
        let inst = self.get()?;
        let meta = match metadata {
            Some(m) => resource_metadata(&m)?,
            None => ResourceMetadata::default(),
        };
        let specs = ids
            .into_iter()
            .map(|id| ResourceSpec {
                id,
                metadata: meta.clone(),
            })
            .collect();
        let r = py
            .allow_threads(|| inst.claim_with(specs, Default::default()))
            .map_err(to_py)?;
        match r.failures.into_iter().next() {
            Some(f) => Err(to_py(f.to_error())),
            None => Ok(()),
        }
    }

    fn release(&self, py: Python<'_>, ids: Vec<String>) -> PyResult<()> {
        let inst = self.get()?;
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        py.allow_threads(|| inst.release(&ids)).map_err(to_py)
    }

    #[pyo3(signature = (ids, to_service, to_instance, reason=""))]
    fn transfer(
        &self,
        py: Python<'_>,
        ids: Vec<String>,
        to_service: &str,
        to_instance: &str,
        reason: &str,
    ) -> PyResult<()> {
        let inst = self.get()?;
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        py.allow_threads(|| inst.transfer(&ids, to_service, to_instance, reason))
            .map_err(to_py)
    }

    /// Leaves the bus (also when the object is garbage-collected). Serving threads are
    /// stopped first and waited for (each finishes the request it is handling).
    fn unregister(&self, py: Python<'_>) -> PyResult<()> {
        let Some(mut inst) = self.inst.write().unwrap_or_else(|p| p.into_inner()).take() else {
            return Ok(());
        };
        inst.stop_handle().stop();
        // A thread in `receive` holds this lock until the stop wakes it (it then needs the
        // GIL): wait for it without the GIL.
        py.allow_threads(|| *self.rx.lock().unwrap_or_else(|p| p.into_inner()) = None);
        loop {
            match Arc::try_unwrap(inst) {
                Ok(i) => return py.allow_threads(|| i.unregister()).map_err(to_py),
                Err(still) => {
                    inst = still;
                    // A serving thread is finishing its request: give it the GIL it may
                    // need, then look again.
                    py.allow_threads(|| std::thread::sleep(Duration::from_millis(1)));
                }
            }
        }
    }
}

/// Resource metadata from a Python dict; an unknown key is `BadRequest` naming it.
fn resource_metadata(m: &Bound<'_, PyDict>) -> PyResult<ResourceMetadata> {
    let mut r = ResourceMetadata::default();
    for (k, v) in m.iter() {
        let key: String = k.extract()?;
        match key.as_str() {
            "resource_type" => r.resource_type = v.extract()?,
            "version" => r.version = v.extract()?,
            "tags" => r.tags = v.extract()?,
            "attributes" => {
                let d = v.downcast::<PyDict>()?;
                for (a, b) in d.iter() {
                    r.attributes.push((a.extract()?, b.extract()?));
                }
            }
            "created_by" => r.created_by = v.extract()?,
            "ttl" => {
                let s: f64 = v.extract()?;
                r.ttl_ms = Some(seconds(s, "ttl")?.as_millis() as u64);
            }
            "priority" => r.priority = v.extract()?,
            other => {
                return Err(bad_request(format!(
                    "unknown resource metadata key '{other}' (known: resource_type, version, tags, attributes, created_by, ttl, priority)"
                )))
            }
        }
    }
    Ok(r)
}

/// The W3C `traceparent` of the request this thread's handler is running (`None` outside
/// a handler): its trace continues in the calls the handler makes.
#[pyfunction]
fn current_traceparent() -> Option<String> {
    CURRENT.with(|c| c.get()).map(|ctx| ctx.trace.traceparent())
}

/// Seconds until the caller of the request this thread's handler is running stops waiting
/// (negative once past; `None` outside a handler or when the caller set no deadline).
/// Calls the handler makes end by then.
#[pyfunction]
fn current_deadline() -> Option<f64> {
    let d = CURRENT.with(|c| c.get())?.deadline?;
    let now = std::time::Instant::now();
    Some(match d.checked_duration_since(now) {
        Some(left) => left.as_secs_f64(),
        None => -now.duration_since(d).as_secs_f64(),
    })
}

/// A loan's memory, to send: refused while memoryviews of it are open (they would outlive
/// the memory), or once spent.
/// Takes the Rust loan out of `loan` to send it (refused while memoryviews of it are open,
/// or once sent or released).
fn take_loan(loan: &Bound<'_, Loan>) -> PyResult<RLoan> {
    let mut l = loan.borrow_mut();
    let exports = l.exports;
    take_unexported(&mut l.loan, exports)
}

fn take_unexported<T>(slot: &mut Option<T>, exports: usize) -> PyResult<T> {
    if exports > 0 {
        return Err(PyBufferError::new_err(
            "the loan has memoryviews still open: release them before sending it",
        ));
    }
    slot.take()
        .ok_or_else(|| bad_request("the loan was already sent or released".into()))
}

/// Fills `view` for a buffer of `len` bytes at `ptr` owned by `obj`.
///
/// # Safety
/// `view` is the `Py_buffer` Python passed to `__getbuffer__`; `ptr` stays valid for `len`
/// bytes while the view is exported (the owner refuses to give it up meanwhile).
unsafe fn fill_buffer(
    obj: &Bound<'_, PyAny>,
    view: *mut pyo3::ffi::Py_buffer,
    flags: std::os::raw::c_int,
    (ptr, len): (*const u8, usize),
    readonly: bool,
) -> PyResult<()> {
    // SAFETY: the caller's contract; PyBuffer_FillInfo takes a reference to `obj` into
    // the view and refuses PyBUF_WRITABLE on a read-only buffer (returning -1 with an
    // exception set).
    let r = unsafe {
        pyo3::ffi::PyBuffer_FillInfo(
            view,
            obj.as_ptr(),
            ptr as *mut std::os::raw::c_void,
            len as pyo3::ffi::Py_ssize_t,
            readonly as std::os::raw::c_int,
            flags,
        )
    };
    if r == -1 {
        return Err(PyErr::fetch(obj.py()));
    }
    Ok(())
}

/// A writable buffer in the request heap of a connection's channel to one instance
/// (`Bus.loan`). Write through
/// `memoryview(loan)`; send with `Bus.call_loan`; `release()` gives it back unsent.
#[pyclass(module = "aegis_ipc")]
pub struct Loan {
    loan: Option<RLoan>,
    /// Memoryviews open on it: while any is, it is neither sent nor released.
    exports: usize,
}

#[pymethods]
impl Loan {
    fn __len__(&self) -> usize {
        self.loan.as_ref().map_or(0, |l| l.len())
    }

    /// Gives the memory back without sending it.
    fn release(&mut self) -> PyResult<()> {
        if self.exports > 0 {
            return Err(PyBufferError::new_err(
                "the loan has memoryviews still open: release them first",
            ));
        }
        self.loan = None;
        Ok(())
    }

    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut pyo3::ffi::Py_buffer,
        flags: std::os::raw::c_int,
    ) -> PyResult<()> {
        let mut me = slf.borrow_mut();
        let Some(l) = me.loan.as_mut() else {
            return Err(PyBufferError::new_err(
                "the loan was already sent or released",
            ));
        };
        let at = (l.as_mut_slice().as_mut_ptr() as *const u8, l.len());
        // SAFETY: the block stays allocated while `exports` > 0 (neither sent nor released).
        unsafe { fill_buffer(slf.as_any(), view, flags, at, false)? };
        me.exports += 1;
        Ok(())
    }

    unsafe fn __releasebuffer__(&mut self, _view: *mut pyo3::ffi::Py_buffer) {
        self.exports -= 1;
    }
}

/// A reply read in place (`Bus.call_loan`, `Bus.call_view`): `memoryview(reply)` shows
/// its bytes where the instance wrote them (read-only); `release()` (or leaving a `with`
/// block) gives the memory back. `intact` is false only if the instance reused that
/// memory while the reply was held (it keeps it until release; one that does not broke
/// the rule).
#[pyclass(module = "aegis_ipc")]
pub struct BorrowedReply {
    reply: Option<RBorrowedReply>,
    exports: usize,
}

impl BorrowedReply {
    fn get(&self) -> PyResult<&RBorrowedReply> {
        self.reply
            .as_ref()
            .ok_or_else(|| bad_request("the reply was released".into()))
    }
}

#[pymethods]
impl BorrowedReply {
    fn __len__(&self) -> usize {
        self.reply.as_ref().map_or(0, |r| r.len())
    }

    #[getter]
    fn instance_id(&self) -> PyResult<String> {
        Ok(self.get()?.instance_id())
    }

    /// Whether the bytes are still this call's (see the class).
    #[getter]
    fn intact(&self) -> PyResult<bool> {
        Ok(self.get()?.is_intact())
    }

    /// A copy of the bytes.
    fn tobytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        Ok(PyBytes::new(py, self.get()?.bytes()))
    }

    /// Gives the memory back (the memoryviews must be released first).
    fn release(&mut self) -> PyResult<()> {
        if self.exports > 0 {
            return Err(PyBufferError::new_err(
                "the reply has memoryviews still open: release them first",
            ));
        }
        self.reply = None;
        Ok(())
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &mut self,
        _t: Option<PyObject>,
        _v: Option<PyObject>,
        _tb: Option<PyObject>,
    ) -> PyResult<bool> {
        self.release()?;
        Ok(false)
    }

    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut pyo3::ffi::Py_buffer,
        flags: std::os::raw::c_int,
    ) -> PyResult<()> {
        let mut me = slf.borrow_mut();
        let r = me.get()?;
        let at = (r.bytes().as_ptr(), r.len());
        // SAFETY: the reply's memory stays ours while `exports` > 0 (not released).
        unsafe { fill_buffer(slf.as_any(), view, flags, at, true)? };
        me.exports += 1;
        Ok(())
    }

    unsafe fn __releasebuffer__(&mut self, _view: *mut pyo3::ffi::Py_buffer) {
        self.exports -= 1;
    }
}

/// A writable buffer in an instance's reply heap (`Instance.loan_reply`), sent with
/// `Instance.reply_loan`.
#[pyclass(module = "aegis_ipc")]
pub struct ReplyLoan {
    // Dropped before the instance it borrows.
    loan: Option<RReplyLoan<'static>>,
    exports: usize,
    _inst: Arc<RInstance>,
}

#[pymethods]
impl ReplyLoan {
    fn __len__(&self) -> usize {
        self.loan.as_ref().map_or(0, |l| l.len())
    }

    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut pyo3::ffi::Py_buffer,
        flags: std::os::raw::c_int,
    ) -> PyResult<()> {
        let mut me = slf.borrow_mut();
        let Some(l) = me.loan.as_mut() else {
            return Err(PyBufferError::new_err("the loan was already sent"));
        };
        let at = (l.as_mut_slice().as_mut_ptr() as *const u8, l.len());
        // SAFETY: the block stays allocated while `exports` > 0 (not sent).
        unsafe { fill_buffer(slf.as_any(), view, flags, at, false)? };
        me.exports += 1;
        Ok(())
    }

    unsafe fn __releasebuffer__(&mut self, _view: *mut pyo3::ffi::Py_buffer) {
        self.exports -= 1;
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(current_traceparent, m)?)?;
    m.add_function(wrap_pyfunction!(current_deadline, m)?)?;
    m.add_class::<Bus>()?;
    m.add_class::<Instance>()?;
    m.add_class::<Reply>()?;
    m.add_class::<Loan>()?;
    m.add_class::<BorrowedReply>()?;
    m.add_class::<ReplyLoan>()?;
    m.add_class::<PendingCall>()?;
    m.add_class::<EventFd>()?;
    Ok(())
}
