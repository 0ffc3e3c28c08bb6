//! The broker's HTTP listener (`--http-listen ADDR`, off unless configured): `/metrics` in
//! the Prometheus text format, and the seed's read-only admin API returning the same JSON
//! as `aegisctl … --json`:
//!
//! * `GET /api/v1/admin/services` — every service with its instances
//! * `GET /api/v1/admin/services/{service_name}` — one service (404 if unknown)
//! * `GET /api/v1/admin/resources?service=&instance=&type=&tag=&limit=&offset=`
//! * `GET /api/v1/admin/health[?service=]`
//!
//! hyper (HTTP/1.1) on the broker's own tokio runtime; each request locks the state for
//! the microseconds it takes to read it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use aegis_client::proto::{ResourceQuery, Response as Wire};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use parking_lot::Mutex;
use tokio::net::TcpListener;

use crate::state::State;

/// Binds the listener (an address in use is an error naming it, before the broker serves).
pub(crate) async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen for HTTP on {addr} (http_listen): {e}"))
}

/// Accepts HTTP connections until the runtime stops.
pub(crate) async fn serve(listener: TcpListener, state: Arc<Mutex<State>>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("http accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, req)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await
            {
                tracing::debug!("http connection: {e}");
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

fn route(state: &Mutex<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return error(StatusCode::METHOD_NOT_ALLOWED, "only GET is served");
    }
    let path = req.uri().path().trim_end_matches('/').to_owned();
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
            json(&state.lock().query_resources(&query))
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
