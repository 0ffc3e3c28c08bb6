//! The broker's HTTP listener (`--http-listen ADDR`, off unless configured): `/metrics` in
//! the Prometheus text format, and the seed's read-only admin API returning the same JSON
//! as `aegisctl … --json`:
//!
//! * `GET /api/v1/admin/services` — every service with its instances
//! * `GET /api/v1/admin/services/{service_name}` — one service (404 if unknown)
//! * `GET /api/v1/admin/resources?service=&instance=&type=&tag=&limit=&offset=`
//! * `GET /api/v1/admin/health[?service=]`
//!
//! Every request carries `Authorization: Bearer TOKEN` (the token of `http_token_file`),
//! except /metrics when `http_metrics_open` is set; anything else is 401 (compared in
//! constant time). hyper (HTTP/1.1) runs on a thread and runtime of its own, so the control
//! socket, the liveness tick and the systemd watchdog never wait behind it; it takes the
//! state lock only to read, one request at a time. Limits: [`MAX_CONNECTIONS`] connections
//! (more are closed at once), a request's headers within [`HEADER_TIMEOUT`] and at most
//! [`MAX_HEADER_BYTES`], a connection at most [`CONNECTION_LIFETIME`], GET only, no body.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use aegis_client::proto::{ResourceQuery, Response as Wire};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use parking_lot::Mutex;
use tokio::net::TcpListener;

use crate::state::State;

/// Connections served at once; more are accepted and closed at once.
pub(crate) const MAX_CONNECTIONS: usize = 64;
/// A request's headers must arrive within this (also the idle time between requests).
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes of request line and headers.
pub(crate) const MAX_HEADER_BYTES: usize = 16 << 10;
/// A connection is closed after this, however busy (clients reconnect).
pub(crate) const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Who may read what.
pub(crate) struct Access {
    /// The bearer token; `None`: no request is authorised but /metrics (if open).
    pub(crate) token: Option<String>,
    pub(crate) metrics_open: bool,
}

impl Access {
    /// Whether `req` may see `path`.
    fn allows(&self, path: &str, req: &Request<Incoming>) -> bool {
        if path == "/metrics" && self.metrics_open {
            return true;
        }
        let Some(token) = &self.token else {
            return false;
        };
        let given = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        // Constant time in the token's contents (the length is not secret).
        given.len() == token.len()
            && given
                .bytes()
                .zip(token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

/// Binds the listener (an address in use is an error naming it, before the broker serves)
/// and starts the HTTP thread; returns the bound address.
pub(crate) fn start(
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    access: Access,
) -> Result<SocketAddr, String> {
    let listener = std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|e| format!("cannot listen for HTTP on {addr} (http_listen): {e}"))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the HTTP runtime: {e}"))?;
    std::thread::Builder::new()
        .name("aegis-http".into())
        .spawn(move || {
            rt.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(l) => serve(l, state, Arc::new(access)).await,
                    Err(e) => tracing::error!("http listener: {e}"),
                }
            })
        })
        .map_err(|e| format!("cannot start the HTTP thread: {e}"))?;
    Ok(bound)
}

/// Accepts HTTP connections until the process ends.
async fn serve(listener: TcpListener, state: Arc<Mutex<State>>, access: Arc<Access>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    // One request reads the state at a time: a flood of HTTP requests queues here, not on
    // the state lock the control socket and the liveness tick take.
    let readers = Arc::new(tokio::sync::Semaphore::new(1));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("http accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::debug!("http: {MAX_CONNECTIONS} connections open; closing a new one");
            drop(stream);
            continue;
        };
        let (state, access, readers) = (state.clone(), access.clone(), readers.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let io = hyper_util::rt::TokioIo::new(stream);
            let svc = hyper::service::service_fn(move |req| {
                let (state, access, readers) = (state.clone(), access.clone(), readers.clone());
                async move {
                    let _turn = readers.acquire().await;
                    Ok::<_, Infallible>(route(&state, &access, req))
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEADER_BYTES.max(8192))
                .serve_connection(io, svc);
            match tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
                Ok(Err(e)) => tracing::debug!("http connection: {e}"),
                Err(_) => tracing::debug!("http connection closed after {CONNECTION_LIFETIME:?}"),
                Ok(Ok(())) => {}
            }
        });
    }
}

fn reply(status: StatusCode, kind: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", kind)
        .body(Full::new(Bytes::from(body)))
        .expect("static headers")
}

fn json(v: &impl serde::Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_string_pretty(v) {
        Ok(s) => reply(StatusCode::OK, "application/json", s),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "error": message, "code": status.as_u16() }).to_string();
    reply(status, "application/json", body)
}

/// `%XX`-decoding (and `+` as space in query strings).
fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    out.push(v);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b'+' if plus_is_space => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The query string's parameters, decoded.
fn params(req: &Request<Incoming>) -> Vec<(String, String)> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k, true), percent_decode(v, true)),
            None => (percent_decode(p, true), String::new()),
        })
        .collect()
}

fn route(state: &Mutex<State>, access: &Access, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return error(StatusCode::METHOD_NOT_ALLOWED, "only GET is served");
    }
    let path = req.uri().path().trim_end_matches('/').to_owned();
    if !access.allows(&path, &req) {
        let mut r = error(
            StatusCode::UNAUTHORIZED,
            "this needs Authorization: Bearer <the token of the broker's http_token_file>",
        );
        r.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            hyper::header::HeaderValue::from_static("Bearer"),
        );
        return r;
    }
    let has_body = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .is_some_and(|v| v != "0")
        || req.headers().contains_key(hyper::header::TRANSFER_ENCODING);
    if has_body {
        return error(StatusCode::PAYLOAD_TOO_LARGE, "a GET carries no body here");
    }
    let q = params(&req);
    let get = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    match path.as_str() {
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            crate::metrics::render(&state.lock()),
        ),
        "/api/v1/admin/services" => json(&state.lock().services_info()),
        "/api/v1/admin/health" => json(&state.lock().health(get("service").as_deref())),
        "/api/v1/admin/resources" => {
            let num = |k: &str| get(k).and_then(|v| v.parse::<u32>().ok()).unwrap_or(0);
            let query = ResourceQuery {
                service: get("service"),
                instance: get("instance"),
                resource_type: get("type"),
                tags: q
                    .iter()
                    .filter(|(k, _)| k == "tag")
                    .map(|(_, v)| v.clone())
                    .collect(),
                limit: num("limit"),
                offset: num("offset"),
                ..Default::default()
            };
            json(&crate::resources::stepwise_resources(state, &query))
        }
        p => match p.strip_prefix("/api/v1/admin/services/") {
            Some(name) if !name.contains('/') => {
                let name = percent_decode(name, false);
                match state.lock().describe(&name).0 {
                    Wire::Service(s) => json(&s),
                    _ => error(StatusCode::NOT_FOUND, &format!("no service '{name}'")),
                }
            }
            _ => error(StatusCode::NOT_FOUND, &format!("no such path: {p}")),
        },
    }
}
