//! The seed's resource subjects, `ipc.resource.{register, bulk_register, release,
//! bulk_release, transfer, query}`, for AegisIPC instances that live on NATS (registered
//! with `ipc.service.register`), backed by the ownership bucket (see `resources`).
//!
//! The seed has one router answer them; here every bridge listens in the queue group
//! `aegis-bridge` and any one answers, because the bucket is the authority: a claim is the
//! bucket's atomic "create if absent", a release or transfer an update or delete that
//! names the revision it read. Every bridge hears every announcement (`State::seen`), so
//! whichever answers knows the instances a request names.
//!
//! What each may do:
//! * **register / bulk_register** name a live NATS instance of the service; an id owned
//!   by another NATS instance is a conflict (409, naming the owner) unless `force`; an id
//!   owned by a bus instance of a host (written by its bridge) is a conflict even with
//!   `force` — over NATS nobody proves more than the bridge that holds it. A bulk request
//!   without `continue_on_error` stops at the first failure and undoes what it did.
//! * **release / bulk_release** only ids the named instance owns (403 naming the owner;
//!   404 for an id nobody owns).
//! * **transfer** moves ids between two NATS instances of the service (`verify_ownership`:
//!   each id must be `from_instance_id`'s), the target live.
//! * **query** pages the bucket as this bridge mirrors it (in id order, `limit` ≤ 1,000),
//!   filtered by service, instance, ids, `resource_type` and `tags`.
//! * An AegisIPC instance that unregisters or stops heartbeating (`--remote-timeout-ms`)
//!   has its ids released by the bridges that notice ([`release_departed`]).
//!
//! With trusted hosts configured, a bucket entry is believed only when signed by the host
//! it names; nothing on NATS can sign for an AegisIPC instance, so the writing requests
//! are refused (403) and `query` shows no (unsigned) metadata.
//!
//! Every answer carries `status_code` (200, or the first failure's: 409, 403, 404; 400 for
//! a malformed request, 503 without a bucket) and, for a refused request, `error` with the
//! seed's type names, besides the seed's fields.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use async_nats::jetstream::kv;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::bridge::Shared;
use crate::model::{self, ErrorInfo};
use crate::resources::{key, Owner};

/// Ids one request may name at most (larger batches: several requests).
const MAX_IDS: usize = 10_000;
/// Largest `limit` of a query.
const MAX_PAGE: usize = 1_000;
/// Resource requests handled at once (each on a blocking thread).
const MAX_CONCURRENT: usize = 8;

/// Listens on `ipc.resource.*` in the bridges' queue group; each request on a blocking
/// thread (bucket operations wait for NATS).
pub async fn serve(sh: Arc<Shared>) {
    let subject = "ipc.resource.*";
    let mut sub = match sh
        .nats
        .queue_subscribe(subject, crate::bridge::QUEUE_GROUP.into())
        .await
    {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("subscribing to {subject}: {e}");
            return;
        }
    };
    // NATS is untrusted input: at most this many requests are handled at once; the next
    // waits in the subscription for a permit (a flood slows itself down, never grows the
    // bridge's threads).
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT));
    while let Some(msg) = sub.next().await {
        let Some(reply) = msg.reply.clone() else {
            continue;
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let sh = sh.clone();
        tokio::task::spawn_blocking(move || {
            let op = msg.subject.as_str().rsplit('.').next().unwrap_or("");
            let body = answer(&sh, op, &msg.payload);
            sh.publish(reply.to_string(), body);
            drop(permit);
        });
    }
}

/// A refused request: the reason, with the seed's code and type.
struct Refusal(u16, &'static str, String);

impl Refusal {
    fn bad(text: String) -> Refusal {
        Refusal(400, "ValidationError", text)
    }
}

#[derive(Serialize)]
struct Refused<'a> {
    success: bool,
    status_code: u16,
    error: ErrorInfo,
    trace_id: &'a str,
}

fn answer(sh: &Arc<Shared>, op: &str, payload: &[u8]) -> Vec<u8> {
    // The trace id, if the request has one, whatever else is wrong with it.
    #[derive(Deserialize, Default)]
    struct Traced {
        #[serde(default)]
        trace_id: String,
    }
    let trace = model::decode::<Traced>(payload)
        .unwrap_or_default()
        .trace_id;
    let started = Instant::now();
    let result = match op {
        "register" => decode(payload).and_then(|r| register(sh, r)),
        "bulk_register" => decode(payload).and_then(|r| bulk_register(sh, r)),
        "release" => decode(payload).and_then(|r| release(sh, r)),
        "bulk_release" => decode(payload).and_then(|r| bulk_release(sh, r)),
        "transfer" => decode(payload).and_then(|r| transfer(sh, r)),
        "query" => decode(payload).and_then(|r| query(sh, r)),
        other => Err(Refusal::bad(format!(
            "unknown resource operation 'ipc.resource.{other}'"
        ))),
    };
    match result {
        Ok(body) => {
            tracing::debug!(op, trace_id = %trace, ms = started.elapsed().as_secs_f64() * 1e3, "resource request answered");
            body
        }
        Err(Refusal(code, kind, message)) => {
            tracing::info!(op, trace_id = %trace, code, "resource request refused: {message}");
            model::encode(&Refused {
                success: false,
                status_code: code,
                error: ErrorInfo {
                    code,
                    kind: kind.into(),
                    message,
                },
                trace_id: &trace,
            })
        }
    }
}

fn decode<T: for<'a> Deserialize<'a>>(payload: &[u8]) -> Result<T, Refusal> {
    model::decode(payload).map_err(|e| Refusal(400, "SerializationError", e))
}

// ---------------------------------------------------------------------------------------
// The seed's models (field names as its Pydantic models serialize them).

fn yes() -> bool {
    true
}
fn hundred() -> usize {
    100
}

#[derive(Deserialize)]
struct RegisterRequest {
    service_name: String,
    instance_id: String,
    resource_ids: Vec<String>,
    #[serde(default)]
    force: bool,
    #[serde(default)]
    metadata: HashMap<String, rmpv::Value>,
    #[serde(default)]
    trace_id: String,
}

#[derive(Serialize)]
struct RegisterResponse {
    success: bool,
    status_code: u16,
    registered: Vec<String>,
    /// Id -> its current owner.
    conflicts: BTreeMap<String, String>,
    trace_id: String,
}

#[derive(Deserialize)]
struct BulkItem {
    resource_id: String,
    #[serde(default)]
    metadata: Option<rmpv::Value>,
    #[serde(default)]
    force: bool,
}

#[derive(Deserialize)]
struct BulkRegisterRequest {
    service_name: String,
    instance_id: String,
    resources: Vec<BulkItem>,
    #[serde(default = "hundred")]
    batch_size: usize,
    #[serde(default)]
    continue_on_error: bool,
    #[serde(default)]
    trace_id: String,
}

#[derive(Serialize)]
struct Failure {
    resource_id: String,
    reason: String,
    current_owner: Option<String>,
    error_code: String,
}

#[derive(Serialize)]
struct BatchResult {
    batch_number: usize,
    success_count: usize,
    failure_count: usize,
    duration_ms: f64,
}

#[derive(Serialize)]
struct BulkRegisterResponse {
    success: bool,
    status_code: u16,
    total_requested: usize,
    total_registered: usize,
    registered: Vec<String>,
    failed: Vec<Failure>,
    batch_results: Vec<BatchResult>,
    /// Without `continue_on_error`, a failure undoes the request: these were undone.
    rolled_back: Vec<String>,
    trace_id: String,
}

#[derive(Deserialize)]
struct ReleaseRequest {
    service_name: String,
    instance_id: String,
    resource_ids: Vec<String>,
    #[serde(default)]
    trace_id: String,
}

#[derive(Serialize)]
struct ReleaseResponse {
    success: bool,
    status_code: u16,
    released: Vec<String>,
    /// Id -> why not.
    failed: BTreeMap<String, String>,
    trace_id: String,
}

#[derive(Deserialize)]
struct BulkReleaseRequest {
    service_name: String,
    instance_id: String,
    resource_ids: Vec<String>,
    #[serde(default = "hundred")]
    batch_size: usize,
    #[serde(default)]
    continue_on_error: bool,
    #[serde(default)]
    trace_id: String,
}

#[derive(Serialize)]
struct BulkReleaseResponse {
    success: bool,
    status_code: u16,
    total_requested: usize,
    total_released: usize,
    released: Vec<String>,
    failed: Vec<Failure>,
    batch_results: Vec<BatchResult>,
    trace_id: String,
}

#[derive(Deserialize)]
struct TransferRequest {
    service_name: String,
    resource_ids: Vec<String>,
    from_instance_id: String,
    to_instance_id: String,
    #[serde(default = "yes")]
    verify_ownership: bool,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    trace_id: String,
}

#[derive(Serialize)]
struct TransferResponse {
    success: bool,
    status_code: u16,
    transferred: Vec<String>,
    failed: BTreeMap<String, String>,
    transfer_id: String,
    trace_id: String,
}

#[derive(Deserialize)]
struct QueryRequest {
    #[serde(default)]
    service_name: Option<String>,
    #[serde(default)]
    instance_id: Option<String>,
    #[serde(default)]
    resource_ids: Option<Vec<String>>,
    #[serde(default)]
    resource_type: Option<String>,
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default = "yes")]
    include_metadata: bool,
    #[serde(default = "hundred")]
    limit: usize,
    #[serde(default)]
    offset: usize,
    #[serde(default)]
    trace_id: String,
}

#[derive(Serialize)]
struct ResourceInfo {
    resource_id: String,
    owner_instance_id: String,
    service_name: String,
    registered_at: String,
    metadata: Option<rmpv::Value>,
    is_healthy: bool,
}

#[derive(Serialize)]
struct QueryResponse {
    success: bool,
    status_code: u16,
    resources: Vec<ResourceInfo>,
    total_count: usize,
    has_more: bool,
    trace_id: String,
}

// ---------------------------------------------------------------------------------------
// Checks shared by the operations.

/// The bucket, for a request that writes it: refused under trusted hosts (nothing on NATS
/// can sign for an AegisIPC instance) and without a bucket.
fn writable_store(sh: &Arc<Shared>) -> Result<kv::Store, Refusal> {
    if sh.trust.checking() {
        return Err(Refusal(
            403,
            "PermissionDeniedError",
            "this bridge believes only resource entries signed by trusted hosts: AegisIPC instances on NATS cannot claim".into(),
        ));
    }
    crate::resources::store(sh).ok_or_else(|| {
        Refusal(
            503,
            "ServiceUnavailableError",
            "no resource bucket (the bridge has no kv_bucket, or JetStream is off)".into(),
        )
    })
}

/// `id` is a live AegisIPC instance of `service` announced on NATS (not a bus instance a
/// bridge announces: those claim on their own bus).
fn seed_instance(sh: &Shared, service: &str, id: &str) -> Result<String, Refusal> {
    let st = sh.state.lock().unwrap();
    let r = st.seen.get(id).ok_or_else(|| {
        Refusal(
            404,
            "InstanceNotFoundError",
            format!("instance '{id}' is not registered on NATS (or its heartbeats stopped)"),
        )
    })?;
    if r.service != service {
        return Err(Refusal::bad(format!(
            "instance '{id}' serves '{}', not '{service}'",
            r.service
        )));
    }
    if r.aegis {
        return Err(Refusal(
            403,
            "PermissionDeniedError",
            format!(
                "instance '{id}' is a bus instance of host {}: it claims on its own bus",
                r.host
            ),
        ));
    }
    Ok(r.host.clone())
}

fn check_ids<'a>(ids: impl ExactSizeIterator<Item = &'a String>) -> Result<(), Refusal> {
    if ids.len() > MAX_IDS {
        return Err(Refusal::bad(format!(
            "{} resource ids in one request; at most {MAX_IDS}",
            ids.len()
        )));
    }
    for id in ids {
        aegis_client::names::resource_id(id).map_err(|e| Refusal::bad(e.to_string()))?;
    }
    Ok(())
}

/// Whether an entry belongs to a bus instance (written and signed by its host's bridge),
/// which nothing on NATS may change: every entry not written through these subjects.
fn bus_owned(o: &Owner) -> bool {
    !o.seed
}

/// A bucket entry: its owner (if it decodes) and revision.
fn read(sh: &Shared, store: &kv::Store, id: &str) -> Result<Option<(Owner, u64)>, String> {
    let e = sh
        .wait("reading a resource entry", store.entry(key(id)))
        .ok_or("no answer from NATS")?
        .map_err(|e| e.to_string())?;
    Ok(e.filter(|e| e.operation == kv::Operation::Put)
        .and_then(|e| Some((model::decode::<Owner>(&e.value).ok()?, e.revision))))
}

/// Why one id of a request was not done: the seed's code (409, 403, 404, 503), the
/// reason, and the id's current owner where that is the reason.
struct Denied {
    code: u16,
    reason: String,
    owner: Option<String>,
}

fn denied(code: u16, reason: impl Into<String>, owner: Option<String>) -> Denied {
    Denied {
        code,
        reason: reason.into(),
        owner,
    }
}

impl Denied {
    /// As a bulk answer lists it.
    fn failure(self, id: &str) -> Failure {
        Failure {
            resource_id: id.to_owned(),
            reason: self.reason,
            current_owner: self.owner,
            error_code: self.code.to_string(),
        }
    }
}

/// The outcome of a revision-checked bucket write: a write that lost to another one is a
/// 409, no answer from NATS a 503.
fn written<T>(
    r: Option<Result<T, impl std::fmt::Display>>,
    owner: Option<String>,
) -> Result<T, Denied> {
    match r {
        Some(Ok(v)) => Ok(v),
        Some(Err(e)) => Err(denied(409, format!("changed meanwhile: {e}"), owner)),
        None => Err(denied(503, "no answer from NATS", owner)),
    }
}

/// The entry of `id` and its revision, to change over NATS: refused if nobody owns it or
/// a bus instance does (`verb`: what would have been done to it).
fn seed_entry(
    sh: &Shared,
    store: &kv::Store,
    id: &str,
    verb: &str,
) -> Result<(Owner, u64), Denied> {
    match read(sh, store, id) {
        Ok(Some((cur, _))) if bus_owned(&cur) => Err(denied(
            403,
            format!(
                "owned by the bus instance {} (not {verb} over NATS)",
                cur.instance_id
            ),
            Some(cur.instance_id),
        )),
        Ok(Some(c)) => Ok(c),
        Ok(None) => Err(denied(
            404,
            format!("resource '{id}' is not registered"),
            None,
        )),
        Err(e) => Err(denied(503, e, None)),
    }
}

/// What a claim of one id did.
enum Claim {
    /// Written by this request (revision; the previous entry, to undo a forced one).
    Written(u64, Option<Owner>),
    /// The instance owned it already.
    Already,
    Refused(Denied),
}

fn claim_one(sh: &Shared, store: &kv::Store, entry: &Owner, force: bool) -> Claim {
    let k = key(&entry.resource_id);
    let value = model::encode(entry);
    match sh.wait(
        "claiming a resource",
        store.create(&k, value.clone().into()),
    ) {
        None => return Claim::Refused(denied(503, "no answer from NATS", None)),
        Some(Ok(rev)) => return Claim::Written(rev, None),
        Some(Err(e)) if e.kind() != kv::CreateErrorKind::AlreadyExists => {
            return Claim::Refused(denied(503, e.to_string(), None))
        }
        Some(Err(_)) => {}
    }
    let (cur, rev) = match read(sh, store, &entry.resource_id) {
        Ok(Some(c)) => c,
        // Deleted meanwhile: the caller may ask again.
        Ok(None) => return Claim::Refused(denied(409, "released meanwhile: try again", None)),
        Err(e) => return Claim::Refused(denied(503, e, None)),
    };
    if cur.instance_id == entry.instance_id {
        return Claim::Already;
    }
    let owner = Some(cur.instance_id.clone());
    if !force || bus_owned(&cur) {
        let why = if bus_owned(&cur) {
            format!(
                "owned by {} on host {} (a bus instance: not taken over NATS)",
                cur.instance_id, cur.host
            )
        } else {
            format!("owned by {}", cur.instance_id)
        };
        return Claim::Refused(denied(409, why, owner));
    }
    let taken = sh.wait(
        "taking a resource over",
        store.update(&k, value.into(), rev),
    );
    match written(taken, owner) {
        Ok(rev) => Claim::Written(rev, Some(cur)),
        Err(d) => Claim::Refused(d),
    }
}

/// Undoes a claim this request wrote (if nobody changed it since).
fn undo(sh: &Shared, store: &kv::Store, id: &str, rev: u64, previous: Option<Owner>) {
    let k = key(id);
    let r = match previous {
        Some(p) => sh
            .wait(
                "undoing a claim",
                store.update(&k, model::encode(&p).into(), rev),
            )
            .map(|r| r.map(drop).map_err(|e| e.to_string())),
        None => sh
            .wait(
                "undoing a claim",
                store.delete_expect_revision(&k, Some(rev)),
            )
            .map(|r| r.map_err(|e| e.to_string())),
    };
    if let Some(Err(e)) = r {
        tracing::warn!(resource = %id, "not undoing a claim (changed since): {e}");
    }
}

fn entry(service: &str, instance: &str, host: &str, id: &str) -> Owner {
    Owner {
        resource_id: id.to_owned(),
        host: host.to_owned(),
        service: service.to_owned(),
        instance_id: instance.to_owned(),
        sig: String::new(),
        registered_at: model::now_iso(),
        metadata: None,
        seed: true,
    }
}

/// The status of a whole answer: 200, or the first failure's code.
fn status(first_failure: Option<u16>) -> u16 {
    first_failure.unwrap_or(200)
}

/// [`status`] of a bulk answer.
fn bulk_status(failed: &[Failure]) -> u16 {
    status(failed.first().and_then(|f| f.error_code.parse().ok()))
}

// ---------------------------------------------------------------------------------------
// The operations.

fn register(sh: &Arc<Shared>, r: RegisterRequest) -> Result<Vec<u8>, Refusal> {
    check_ids(r.resource_ids.iter())?;
    let host = seed_instance(sh, &r.service_name, &r.instance_id)?;
    let store = writable_store(sh)?;
    let (mut registered, mut conflicts, mut first) = (Vec::new(), BTreeMap::new(), None);
    for id in &r.resource_ids {
        let mut e = entry(&r.service_name, &r.instance_id, &host, id);
        e.metadata = r.metadata.get(id).cloned();
        match claim_one(sh, &store, &e, r.force) {
            Claim::Written(..) | Claim::Already => registered.push(id.clone()),
            Claim::Refused(d) => {
                first.get_or_insert(d.code);
                conflicts.insert(id.clone(), d.owner.unwrap_or(d.reason));
            }
        }
    }
    sh.poke();
    Ok(model::encode(&RegisterResponse {
        success: conflicts.is_empty(),
        status_code: status(first),
        registered,
        conflicts,
        trace_id: r.trace_id,
    }))
}

/// Runs `one` over `items` in batches of `batch_size`: the failures, each batch's counts,
/// and whether it stopped at a failure (without `continue_on_error`).
fn in_batches<T>(
    items: &[T],
    batch_size: usize,
    continue_on_error: bool,
    mut one: impl FnMut(&T) -> Result<(), Failure>,
) -> (Vec<Failure>, Vec<BatchResult>, bool) {
    let (mut failed, mut batches) = (Vec::new(), Vec::new());
    for (n, chunk) in items.chunks(batch_size.clamp(1, MAX_IDS)).enumerate() {
        let t = Instant::now();
        let (mut ok, mut bad, mut stop) = (0, 0, false);
        for item in chunk {
            match one(item) {
                Ok(()) => ok += 1,
                Err(f) => {
                    bad += 1;
                    failed.push(f);
                    stop = !continue_on_error;
                    if stop {
                        break;
                    }
                }
            }
        }
        batches.push(BatchResult {
            batch_number: n + 1,
            success_count: ok,
            failure_count: bad,
            duration_ms: t.elapsed().as_secs_f64() * 1e3,
        });
        if stop {
            return (failed, batches, true);
        }
    }
    (failed, batches, false)
}

fn bulk_register(sh: &Arc<Shared>, r: BulkRegisterRequest) -> Result<Vec<u8>, Refusal> {
    check_ids(
        r.resources
            .iter()
            .map(|i| &i.resource_id)
            .collect::<Vec<_>>()
            .into_iter(),
    )?;
    let host = seed_instance(sh, &r.service_name, &r.instance_id)?;
    let store = writable_store(sh)?;
    let mut registered = Vec::new();
    // What this request wrote, to undo on a failure without continue_on_error.
    let mut written: Vec<(String, u64, Option<Owner>)> = Vec::new();
    let (failed, batches, stopped) =
        in_batches(&r.resources, r.batch_size, r.continue_on_error, |item| {
            let mut e = entry(&r.service_name, &r.instance_id, &host, &item.resource_id);
            e.metadata = item.metadata.clone();
            match claim_one(sh, &store, &e, item.force) {
                Claim::Written(rev, prev) => written.push((item.resource_id.clone(), rev, prev)),
                Claim::Already => {}
                Claim::Refused(d) => return Err(d.failure(&item.resource_id)),
            }
            registered.push(item.resource_id.clone());
            Ok(())
        });
    let mut rolled_back = Vec::new();
    if stopped {
        for (id, rev, prev) in written.into_iter().rev() {
            undo(sh, &store, &id, rev, prev);
            rolled_back.push(id);
        }
        registered.clear();
    }
    sh.poke();
    Ok(model::encode(&BulkRegisterResponse {
        success: failed.is_empty(),
        status_code: bulk_status(&failed),
        total_requested: r.resources.len(),
        total_registered: registered.len(),
        registered,
        failed,
        batch_results: batches,
        rolled_back,
        trace_id: r.trace_id,
    }))
}

/// Releases one id the instance owns.
fn release_one(sh: &Shared, store: &kv::Store, instance: &str, id: &str) -> Result<(), Denied> {
    let (cur, rev) = seed_entry(sh, store, id, "released")?;
    if cur.instance_id != instance {
        return Err(denied(
            403,
            format!("owned by {}, not {instance}", cur.instance_id),
            Some(cur.instance_id),
        ));
    }
    written(
        sh.wait(
            "releasing a resource",
            store.delete_expect_revision(key(id), Some(rev)),
        ),
        None,
    )
}

fn release(sh: &Arc<Shared>, r: ReleaseRequest) -> Result<Vec<u8>, Refusal> {
    check_ids(r.resource_ids.iter())?;
    seed_instance(sh, &r.service_name, &r.instance_id)?;
    let store = writable_store(sh)?;
    let (mut released, mut failed, mut first) = (Vec::new(), BTreeMap::new(), None);
    for id in &r.resource_ids {
        match release_one(sh, &store, &r.instance_id, id) {
            Ok(()) => released.push(id.clone()),
            Err(d) => {
                first.get_or_insert(d.code);
                failed.insert(id.clone(), d.reason);
            }
        }
    }
    sh.poke();
    Ok(model::encode(&ReleaseResponse {
        success: failed.is_empty(),
        status_code: status(first),
        released,
        failed,
        trace_id: r.trace_id,
    }))
}

fn bulk_release(sh: &Arc<Shared>, r: BulkReleaseRequest) -> Result<Vec<u8>, Refusal> {
    check_ids(r.resource_ids.iter())?;
    seed_instance(sh, &r.service_name, &r.instance_id)?;
    let store = writable_store(sh)?;
    let mut released = Vec::new();
    let (failed, batches, _) =
        in_batches(&r.resource_ids, r.batch_size, r.continue_on_error, |id| {
            release_one(sh, &store, &r.instance_id, id).map_err(|d| d.failure(id))?;
            released.push(id.clone());
            Ok(())
        });
    sh.poke();
    Ok(model::encode(&BulkReleaseResponse {
        success: failed.is_empty(),
        status_code: bulk_status(&failed),
        total_requested: r.resource_ids.len(),
        total_released: released.len(),
        released,
        failed,
        batch_results: batches,
        trace_id: r.trace_id,
    }))
}

fn transfer(sh: &Arc<Shared>, r: TransferRequest) -> Result<Vec<u8>, Refusal> {
    check_ids(r.resource_ids.iter())?;
    let host = seed_instance(sh, &r.service_name, &r.to_instance_id)?;
    let store = writable_store(sh)?;
    // A random id (RandomState is seeded from the OS per instance).
    let transfer_id = format!(
        "xfer-{:016x}",
        std::hash::BuildHasher::hash_one(
            &std::collections::hash_map::RandomState::new(),
            Instant::now()
        )
    );
    let (mut transferred, mut failed, mut first) = (Vec::new(), BTreeMap::new(), None);
    for id in &r.resource_ids {
        let outcome = seed_entry(sh, &store, id, "moved").and_then(|(cur, rev)| {
            if cur.service != r.service_name {
                return Err(denied(
                    403,
                    format!("belongs to service '{}'", cur.service),
                    None,
                ));
            }
            if r.verify_ownership && cur.instance_id != r.from_instance_id {
                return Err(denied(
                    403,
                    format!("owned by {}, not {}", cur.instance_id, r.from_instance_id),
                    None,
                ));
            }
            let mut e = entry(&r.service_name, &r.to_instance_id, &host, id);
            e.metadata = cur.metadata;
            written(
                sh.wait(
                    "transferring a resource",
                    store.update(key(id), model::encode(&e).into(), rev),
                ),
                None,
            )
            .map(drop)
        });
        match outcome {
            Ok(()) => transferred.push(id.clone()),
            Err(d) => {
                first.get_or_insert(d.code);
                failed.insert(id.clone(), d.reason);
            }
        }
    }
    tracing::info!(transfer_id = %transfer_id, from = %r.from_instance_id, to = %r.to_instance_id,
        moved = transferred.len(), failed = failed.len(), reason = %r.reason, trace_id = %r.trace_id,
        "resource transfer");
    sh.poke();
    Ok(model::encode(&TransferResponse {
        success: failed.is_empty(),
        status_code: status(first),
        transferred,
        failed,
        transfer_id,
        trace_id: r.trace_id,
    }))
}

/// Releases the ids of AegisIPC instances that unregistered or went silent (the seed
/// releases an offline instance's resources). Every bridge that noticed tries; a delete
/// names the revision it read, so the first wins and a re-registration in between is
/// left alone.
pub fn release_departed(sh: &Arc<Shared>) {
    let departed = std::mem::take(&mut sh.state.lock().unwrap().departed);
    if departed.is_empty() || sh.trust.checking() {
        return;
    }
    let Some(store) = crate::resources::store(sh) else {
        return;
    };
    let owned: Vec<String> = sh
        .resources
        .all
        .lock()
        .unwrap()
        .values()
        .filter(|o| departed.contains(&o.instance_id) && !bus_owned(o))
        .map(|o| o.resource_id.clone())
        .collect();
    let mut released = 0;
    for id in &owned {
        if let Ok(Some((cur, rev))) = read(sh, &store, id) {
            if departed.contains(&cur.instance_id)
                && matches!(
                    sh.wait(
                        "releasing a departed instance's resource",
                        store.delete_expect_revision(key(id), Some(rev))
                    ),
                    Some(Ok(()))
                )
            {
                released += 1;
            }
        }
    }
    if released > 0 {
        tracing::info!(instances = ?departed, released, "released the resources of departed instances");
        sh.poke();
    }
}

fn query(sh: &Arc<Shared>, r: QueryRequest) -> Result<Vec<u8>, Refusal> {
    if let Some(ids) = &r.resource_ids {
        check_ids(ids.iter())?;
    }
    if r.limit > MAX_PAGE {
        return Err(Refusal::bad(format!(
            "limit {} is above {MAX_PAGE}",
            r.limit
        )));
    }
    if crate::resources::store(sh).is_none() {
        return Err(Refusal(
            503,
            "ServiceUnavailableError",
            "no resource bucket (the bridge has no kv_bucket, or JetStream is off)".into(),
        ));
    }
    let show_metadata = r.include_metadata && !sh.trust.checking();
    let live = |id: &str| {
        let st = sh.state.lock().unwrap();
        st.seen.contains_key(id) || st.directory.contains_key(id)
    } || sh.exported_list().iter().any(|(n, _)| n == id);
    let matches = |o: &Owner| {
        let meta = o.metadata.as_ref();
        let field = |name: &str| {
            meta.and_then(|m| m.as_map())
                .and_then(|m| m.iter().find(|(k, _)| k.as_str() == Some(name)))
                .map(|(_, v)| v)
        };
        r.service_name.as_ref().is_none_or(|s| *s == o.service)
            && r.instance_id.as_ref().is_none_or(|i| *i == o.instance_id)
            && r.resource_type
                .as_ref()
                .is_none_or(|t| field("resource_type").and_then(|v| v.as_str()) == Some(t))
            && r.tags.as_ref().is_none_or(|want| {
                let have: Vec<&str> = field("tags")
                    .and_then(|v| v.as_array())
                    .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
                    .unwrap_or_default();
                want.iter().all(|t| have.contains(&t.as_str()))
            })
    };
    let all = sh.resources.all.lock().unwrap();
    let picked: Vec<&Owner> = match &r.resource_ids {
        Some(ids) => ids
            .iter()
            .filter_map(|id| all.get(id))
            .filter(|o| matches(o))
            .collect(),
        None => all.values().filter(|o| matches(o)).collect(),
    };
    let total_count = picked.len();
    let page: Vec<ResourceInfo> = picked
        .into_iter()
        .skip(r.offset)
        .take(r.limit)
        .map(|o| ResourceInfo {
            resource_id: o.resource_id.clone(),
            owner_instance_id: o.instance_id.clone(),
            service_name: o.service.clone(),
            registered_at: o.registered_at.clone(),
            metadata: o.metadata.clone().filter(|_| show_metadata),
            is_healthy: false,
        })
        .collect();
    drop(all);
    let page: Vec<ResourceInfo> = page
        .into_iter()
        .map(|mut i| {
            i.is_healthy = live(&i.owner_instance_id);
            i
        })
        .collect();
    Ok(model::encode(&QueryResponse {
        success: true,
        status_code: 200,
        has_more: r.offset.saturating_add(page.len()) < total_count,
        resources: page,
        total_count,
        trace_id: r.trace_id,
    }))
}
