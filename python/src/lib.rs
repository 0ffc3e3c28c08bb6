//! `aegis_ipc._native`: the Rust client bound with PyO3. The Python package (`aegis_ipc`)
//! re-exports these classes and adds the asyncio face and the exception classes.
//!
//! The GIL is released whenever a call waits (calls, receiving, watching); a serving
//! thread takes it only to run the handler.

use std::sync::Mutex;
use std::time::Duration;

use aegis_client::{
    Bus as RBus, BusOptions, CallOptions, Error, Instance as RInstance, Pending, Receiver,
    RegisterOptions, Request, ResourceQuery, ServiceError,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

/// The Python exception for a bus error: a class of `aegis_ipc.errors` with `.code`.
fn to_py(e: Error) -> PyErr {
    let (class, code) = match &e {
        Error::NoAvailableInstance { .. } => ("NoAvailableInstance", 503),
        Error::OwnerUnavailable { .. } => ("OwnerUnavailable", 503),
        Error::CircuitOpen { .. } => ("CircuitOpen", 503),
        Error::Timeout { .. } => ("Timeout", 504),
        Error::BadRequest(_) => ("BadRequest", 400),
        Error::ResourceNotFound { .. } => ("ResourceNotFound", 404),
        Error::ResourceConflict { .. } => ("ResourceConflict", 409),
        Error::Conflict { .. } => ("InstanceConflict", 409),
        Error::NotOwner(_) => ("NotOwner", 403),
        Error::PermissionDenied(_) => ("PermissionDenied", 403),
        Error::LimitExceeded(_) => ("LimitExceeded", 429),
        Error::LoopDetected { .. } => ("LoopDetected", 508),
        Error::MessageTooLarge { .. } => ("MessageTooLarge", 413),
        Error::BrokerUnavailable { .. } => ("BrokerUnavailable", 502),
        Error::Incompatible(_) => ("Incompatible", 426),
        Error::Remote { code, .. } => ("RemoteError", *code),
        _ => ("InternalError", 500),
    };
    let text = e.to_string();
    Python::with_gil(|py| {
        let made = (|| -> PyResult<PyErr> {
            let cls = py.import("aegis_ipc.errors")?.getattr(class)?;
            let exc = cls.call1((text.clone(),))?;
            exc.setattr("code", code)?;
            Ok(PyErr::from_value(exc))
        })();
        made.unwrap_or_else(|e| e)
    })
}

thread_local! {
    /// The request this thread's handler is running (hops, trace id): a call made from a
    /// handler is a nested call, one hop further on the same trace, so a loop of services
    /// calling each other ends in `LoopDetected` as it does from Rust.
    static CURRENT: std::cell::Cell<Option<(u8, u64)>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with `req` as this thread's current request.
fn within<R>(req: &Request<'_>, f: impl FnOnce() -> R) -> R {
    let before = CURRENT.with(|c| c.replace(Some((req.hops(), req.trace_id()))));
    let r = f();
    CURRENT.with(|c| c.set(before));
    r
}

fn options(
    timeout: Option<f64>,
    attempt_timeout: Option<f64>,
    idempotent: bool,
    exclude: Vec<String>,
) -> PyResult<CallOptions> {
    let secs = |s: f64, name: &str| {
        Duration::try_from_secs_f64(s)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                PyValueError::new_err(format!("{name} must be a positive number of seconds"))
            })
    };
    let mut o = CallOptions::default();
    if let Some((hops, trace)) = CURRENT.with(|c| c.get()) {
        o.hops = hops.saturating_add(1);
        o.trace_id = Some(trace);
    }
    if let Some(t) = timeout {
        o.timeout = secs(t, "timeout")?;
        o.attempt_timeout = o.attempt_timeout.min(o.timeout);
    }
    if let Some(t) = attempt_timeout {
        o.attempt_timeout = secs(t, "attempt_timeout")?;
    }
    o.idempotent = idempotent;
    o.exclude = exclude;
    Ok(o)
}

/// A reply: its bytes and the instance that answered.
#[pyclass(frozen, module = "aegis_ipc")]
pub struct Reply {
    #[pyo3(get)]
    payload: Py<PyBytes>,
    #[pyo3(get)]
    instance_id: String,
}

#[pymethods]
impl Reply {
    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "Reply(instance_id={:?}, payload={} bytes)",
            self.instance_id,
            self.payload.bind(py).as_bytes().len()
        )
    }
}

/// A connection to the bus. Thread-safe.
#[pyclass(subclass, module = "aegis_ipc")]
pub struct Bus {
    bus: RBus,
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
            opts.mailboxes = m;
        }
        py.allow_threads(|| RBus::connect_with(opts))
            .map(|bus| Bus { bus })
            .map_err(to_py)
    }

    /// How many calls this connection can have in flight at once.
    #[getter]
    fn mailboxes(&self) -> u32 {
        self.bus.mailbox_count()
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
        let mut out = Vec::new();
        let info = py
            .allow_threads(|| {
                self.bus
                    .call_into(service, method, payload, &opts, &mut out)
            })
            .map_err(to_py)?;
        Ok(Reply {
            payload: PyBytes::new(py, &out).unbind(),
            instance_id: self.bus.instance_id(info),
        })
    }

    #[pyo3(signature = (resource, method, payload, *, timeout=None, idempotent=false))]
    fn call_resource(
        &self,
        py: Python<'_>,
        resource: &str,
        method: &str,
        payload: &[u8],
        timeout: Option<f64>,
        idempotent: bool,
    ) -> PyResult<Reply> {
        let opts = options(timeout, None, idempotent, Vec::new())?;
        let mut out = Vec::new();
        let info = py
            .allow_threads(|| {
                self.bus
                    .call_resource_into(resource, method, payload, &opts, &mut out)
            })
            .map_err(to_py)?;
        Ok(Reply {
            payload: PyBytes::new(py, &out).unbind(),
            instance_id: self.bus.instance_id(info),
        })
    }

    /// Sends a call and returns at once (the asyncio face is built on this).
    #[pyo3(signature = (service, method, payload, *, timeout=None, idempotent=false, exclude=Vec::new()))]
    #[allow(clippy::too_many_arguments)]
    fn submit(
        slf: Bound<'_, Self>,
        service: &str,
        method: &str,
        payload: &[u8],
        timeout: Option<f64>,
        idempotent: bool,
        exclude: Vec<String>,
    ) -> PyResult<PendingCall> {
        let opts = options(timeout, None, idempotent, exclude)?;
        let this = slf.borrow();
        let p = this
            .bus
            .submit(service, method, payload, &opts)
            .map_err(to_py)?;
        p.notify_event_fd().map_err(to_py)?;
        // SAFETY: the pending call borrows the bus, which `owner` keeps alive (a strong
        // reference to the Python object holding it) for as long as the PendingCall lives;
        // the field order drops the call first.
        let p: Pending<'static> = unsafe { std::mem::transmute(p) };
        Ok(PendingCall {
            pending: Mutex::new(Some(p)),
            owner: slf.clone().into_any().unbind(),
        })
    }

    /// `submit` that never waits for room in a full ring: `None` says to try again later
    /// (the call began `waited` seconds ago; past its deadline the answer is `Timeout`).
    #[pyo3(signature = (service, method, payload, waited, *, timeout=None, idempotent=false, exclude=Vec::new()))]
    #[allow(clippy::too_many_arguments)]
    fn _try_submit(
        slf: Bound<'_, Self>,
        service: &str,
        method: &str,
        payload: &[u8],
        waited: f64,
        timeout: Option<f64>,
        idempotent: bool,
        exclude: Vec<String>,
    ) -> PyResult<Option<PendingCall>> {
        let opts = options(timeout, None, idempotent, exclude)?;
        let now = std::time::Instant::now();
        let start = std::time::Duration::try_from_secs_f64(waited)
            .ok()
            .and_then(|w| now.checked_sub(w))
            .unwrap_or(now);
        let this = slf.borrow();
        let Some(p) = this
            .bus
            .try_submit(start, service, method, payload, &opts)
            .map_err(to_py)?
        else {
            return Ok(None);
        };
        p.notify_event_fd().map_err(to_py)?;
        // SAFETY: as in `submit`: `owner` keeps the bus alive for as long as the
        // PendingCall lives, and the field order drops the call first.
        let p: Pending<'static> = unsafe { std::mem::transmute(p) };
        Ok(Some(PendingCall {
            pending: Mutex::new(Some(p)),
            owner: slf.clone().into_any().unbind(),
        }))
    }

    /// The event fd for event loops: readable when a submitted call is done; read 8 bytes
    /// to reset it.
    fn event_fd(&self) -> PyResult<i32> {
        use std::os::fd::AsRawFd;
        self.bus.event_fd().map(|f| f.as_raw_fd()).map_err(to_py)
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
        let inst = py
            .allow_threads(|| self.bus.register_with(service, instance_id, opts))
            .map_err(to_py)?;
        Ok(Instance {
            rx: Mutex::new(None),
            inst: Some(inst),
        })
    }

    /// Every service with its instances, as JSON (parsed by the package).
    fn _services_json(&self, py: Python<'_>) -> PyResult<String> {
        let s = py.allow_threads(|| self.bus.services()).map_err(to_py)?;
        serde_json::to_string(&s).map_err(|e| PyValueError::new_err(e.to_string()))
    }

    fn _service_json(&self, py: Python<'_>, name: &str) -> PyResult<String> {
        let s = py.allow_threads(|| self.bus.service(name)).map_err(to_py)?;
        serde_json::to_string(&s).map_err(|e| PyValueError::new_err(e.to_string()))
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
        let p = py.allow_threads(|| self.bus.resources(&q)).map_err(to_py)?;
        serde_json::to_string(&p).map_err(|e| PyValueError::new_err(e.to_string()))
    }

    /// Sleeps until an instance of `service` joins, leaves or changes health, or `timeout`
    /// seconds pass; returns the service's generation (pass it back as `seen`).
    #[pyo3(signature = (service, seen=0, timeout=1.0))]
    fn watch(&self, py: Python<'_>, service: &str, seen: u32, timeout: f64) -> u32 {
        let t = Duration::from_secs_f64(timeout.max(0.0));
        py.allow_threads(|| self.bus.watch(service, seen, t))
    }
}

/// A call sent with `Bus.submit`.
#[pyclass(module = "aegis_ipc")]
pub struct PendingCall {
    pending: Mutex<Option<Pending<'static>>>,
    #[allow(dead_code)]
    owner: PyObject,
}

#[pymethods]
impl PendingCall {
    /// Whether collecting the reply would not wait.
    fn ready(&self) -> bool {
        self.pending
            .lock()
            .unwrap()
            .as_ref()
            .is_none_or(|p| p.is_ready())
    }

    /// The reply (waits if not ready); raises the call's error.
    fn result(&self, py: Python<'_>) -> PyResult<Reply> {
        let p = self
            .pending
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| PyValueError::new_err("this call's result was already taken"))?;
        let info = p.instance();
        let mut out = Vec::new();
        let owner = self.owner.bind(py).downcast::<Bus>()?.borrow();
        py.allow_threads(|| p.wait(&mut out)).map_err(to_py)?;
        Ok(Reply {
            payload: PyBytes::new(py, &out).unbind(),
            instance_id: owner.bus.instance_id(info),
        })
    }
}

impl Drop for PendingCall {
    fn drop(&mut self) {
        // Cancels an uncollected call before the bus reference goes.
        self.pending.get_mut().map(|p| p.take()).ok();
    }
}

/// State of pull-style serving: the receiver and the request being answered.
struct Pull {
    // The request borrows the receiver: it is dropped first (field order).
    req: Option<Request<'static>>,
    rx: Box<Receiver<'static>>,
}

/// A registered instance.
#[pyclass(module = "aegis_ipc")]
pub struct Instance {
    // Dropped before the instance it borrows.
    rx: Mutex<Option<Pull>>,
    inst: Option<RInstance>,
}

impl Instance {
    fn get(&self) -> PyResult<&RInstance> {
        self.inst
            .as_ref()
            .ok_or_else(|| PyValueError::new_err("the instance was unregistered"))
    }
}

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
    /// code); a non-bytes return value is an error too.
    fn serve(&self, py: Python<'_>, handler: PyObject) -> PyResult<()> {
        let inst = self.get()?;
        py.allow_threads(|| {
            inst.serve(|req, out| {
                within(req, || {
                    Python::with_gil(|py| {
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
                    })
                })
            })
        })
        .map_err(to_py)
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
        let mut guard = self.rx.lock().unwrap();
        let pull = guard.get_or_insert_with(|| {
            // SAFETY: the receiver borrows the instance, which this object owns and drops
            // after `rx` (field order); it does not move while the Python object lives.
            let inst: &'static RInstance = unsafe { &*(inst as *const RInstance) };
            Pull {
                req: None,
                rx: Box::new(inst.receiver()),
            }
        });
        pull.req = None;
        let t = timeout.map(|t| Duration::from_secs_f64(t.max(0.0)));
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

    /// Answers the request `receive` returned.
    fn reply(&self, data: &[u8]) -> PyResult<()> {
        let req = self.take_request()?;
        req.reply(data).map_err(to_py)
    }

    /// Answers the request `receive` returned with an error code and message.
    fn reply_error(&self, code: u16, message: &str) -> PyResult<()> {
        let req = self.take_request()?;
        req.reply_error(code, message).map_err(to_py)
    }

    /// Claims resource ids (all or none).
    fn claim(&self, py: Python<'_>, ids: Vec<String>) -> PyResult<()> {
        let inst = self.get()?;
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        py.allow_threads(|| inst.claim(&ids)).map_err(to_py)
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

    /// Leaves the bus (also when the object is garbage-collected).
    fn unregister(&mut self, py: Python<'_>) -> PyResult<()> {
        *self.rx.lock().unwrap() = None;
        match self.inst.take() {
            Some(i) => py.allow_threads(|| i.unregister()).map_err(to_py),
            None => Ok(()),
        }
    }
}

impl Instance {
    fn take_request(&self) -> PyResult<Request<'static>> {
        self.rx
            .lock()
            .unwrap()
            .as_mut()
            .and_then(|p| p.req.take())
            .ok_or_else(|| PyValueError::new_err("no received request to answer"))
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Bus>()?;
    m.add_class::<Instance>()?;
    m.add_class::<Reply>()?;
    m.add_class::<PendingCall>()?;
    Ok(())
}
