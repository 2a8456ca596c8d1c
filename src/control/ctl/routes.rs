//! The control routes, JSON in and out. Reads are GET, every change is POST (a GET
//! never changes state: a browser or a link cannot make one). Each request is bounded:
//! headers within the connection's header timeout, a body of at most [`MAX_BODY`] read
//! within [`BODY_TIMEOUT`]. Each is counted by route and result.
//!
//! | route | method | body | what |
//! |---|---|---|---|
//! | `/v1/backends` | GET | | upstreams and backends with health, admin state, weights, counts |
//! | `/v1/backend/state` | POST | `upstream`, `backend`, `state`, `close`?, `close_after`? | ready, drain, maint |
//! | `/v1/backend/weight` | POST | `upstream`, `backend`, `weight` (null: the configured one) | |
//! | `/v1/backend/clear` | POST | `upstream`, `backend` | drop the entry's overrides |
//! | `/v1/backend/close` | POST | `upstream`, `backend` | close its connections now |
//! | `/v1/readiness` | GET, POST | `ready` | fail or restore `/readyz` |
//! | `/v1/reload` | POST | | reload the config file; the generation or the error |
//! | `/v1/control` | GET | | where the control sockets are (a TCP port 0 resolved) |
//! | `/v1/upgrade` | POST | `binary`? (default: sluice's own path) | a binary upgrade, as SIGUSR2; answers once the new process is ready, or why it failed |

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use super::overrides::{self, Entry, Override, backends_of, entry_of, parse_state};
use super::{Ctl, Peer};
use crate::config::{MAX_WEIGHT, parse_duration};
use crate::metrics::{AdminState, CtlResult};
use crate::upstream::Upstream;

/// The largest request body: a few names and values.
pub(super) const MAX_BODY: usize = 64 * 1024;
/// A body not complete by then is refused.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a reload may take before the request says so (the reload goes on).
const RELOAD_WAIT: Duration = Duration::from_secs(60);

/// An answer: status, JSON body, and the result it is counted as.
struct Answer(StatusCode, Value);

impl Answer {
    fn ok(body: Value) -> Answer {
        Answer(StatusCode::OK, body)
    }

    fn error(code: StatusCode, message: impl Into<String>) -> Answer {
        Answer(code, json!({ "error": message.into() }))
    }

    fn result(&self) -> CtlResult {
        match self.0 {
            StatusCode::OK => CtlResult::Ok,
            StatusCode::UNAUTHORIZED => CtlResult::Unauthorized,
            StatusCode::NOT_FOUND => CtlResult::NotFound,
            StatusCode::METHOD_NOT_ALLOWED => CtlResult::MethodNotAllowed,
            StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => CtlResult::BadRequest,
            _ => CtlResult::Failed,
        }
    }
}

type Result<T> = std::result::Result<T, Answer>;

/// The routes and the method each takes.
const ROUTES: &[(&str, &[Method])] = &[
    ("/v1/backends", &[Method::GET]),
    ("/v1/backend/state", &[Method::POST]),
    ("/v1/backend/weight", &[Method::POST]),
    ("/v1/backend/clear", &[Method::POST]),
    ("/v1/backend/close", &[Method::POST]),
    ("/v1/readiness", &[Method::GET, Method::POST]),
    ("/v1/reload", &[Method::POST]),
    ("/v1/control", &[Method::GET]),
    ("/v1/upgrade", &[Method::POST]),
];

pub(super) async fn respond(
    ctl: &Ctl,
    peer: Option<Peer>,
    token: Option<&[u8]>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let route = ROUTES.iter().find(|(p, _)| *p == path);
    let label = route.map_or("unknown", |(p, _)| p.trim_start_matches("/v1/"));
    let answer = answer(ctl, peer, token, route, req)
        .await
        .unwrap_or_else(|a| a);
    let result = answer.result();
    ctl.metrics
        .ctl_requests
        .with_label_values(&[label, result.as_str()])
        .inc();
    if result != CtlResult::Ok {
        tracing::info!(route = %path, result = result.as_str(), error = %answer.1["error"], "control request refused");
    }
    let mut r = Response::new(Full::new(Bytes::from(format!("{:#}\n", answer.1))));
    *r.status_mut() = answer.0;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

async fn answer(
    ctl: &Ctl,
    peer: Option<Peer>,
    token: Option<&[u8]>,
    route: Option<&(&str, &[Method])>,
    req: Request<Incoming>,
) -> Result<Answer> {
    // The token first: without it, nothing about the routes is told.
    let peer = match (peer, token) {
        (Some(p), _) => p,
        (None, Some(expected)) => {
            let given = req
                .headers()
                .get(AUTHORIZATION)
                .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
                .unwrap_or_default();
            if !bool::from(given.ct_eq(expected)) {
                let mut a = Answer::error(
                    StatusCode::UNAUTHORIZED,
                    "missing or wrong bearer token (Authorization: Bearer …)",
                );
                a.1["hint"] = json!("sluice ctl --tcp ADDRESS --token-file FILE");
                return Err(a);
            }
            Peer::Token
        }
        (None, None) => return Err(Answer::error(StatusCode::UNAUTHORIZED, "no credentials")),
    };
    let Some((path, methods)) = route else {
        let known: Vec<&str> = ROUTES.iter().map(|(p, _)| *p).collect();
        return Err(Answer::error(
            StatusCode::NOT_FOUND,
            format!("no such route; the routes are {}", known.join(", ")),
        ));
    };
    if !methods.contains(req.method()) {
        let allowed: Vec<&str> = methods.iter().map(Method::as_str).collect();
        return Err(Answer::error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{path} takes {}", allowed.join(" or ")),
        ));
    }
    let method = req.method().clone();
    let body = read_body(req).await?;
    match (*path, method) {
        ("/v1/backends", _) => Ok(Answer::ok(list(ctl))),
        ("/v1/backend/state", _) => set_state(ctl, &peer, parse(&body)?),
        ("/v1/backend/weight", _) => set_weight(ctl, &peer, parse(&body)?),
        ("/v1/backend/clear", _) => clear(ctl, &peer, parse(&body)?),
        ("/v1/backend/close", _) => close(ctl, &peer, parse(&body)?),
        ("/v1/readiness", Method::GET) => Ok(Answer::ok(readiness(ctl))),
        ("/v1/readiness", _) => set_readiness(ctl, &peer, parse(&body)?),
        ("/v1/reload", _) => reload(ctl, &peer).await,
        ("/v1/upgrade", _) => upgrade(ctl, &peer, parse(&body)?).await,
        ("/v1/control", _) => Ok(Answer::ok(json!({
            "socket": ctl.socket.display().to_string(),
            "tcp": ctl.tcp.map(|a| a.to_string()),
        }))),
        _ => Err(Answer::error(StatusCode::NOT_FOUND, "no such route")),
    }
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes> {
    let limited = Limited::new(req.into_body(), MAX_BODY);
    match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
        Err(_) => Err(Answer::error(
            StatusCode::REQUEST_TIMEOUT,
            "the request body did not arrive in time",
        )),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(Answer::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than {MAX_BODY} bytes"),
        )),
        Ok(Err(e)) => Err(Answer::error(StatusCode::BAD_REQUEST, e.to_string())),
        Ok(Ok(b)) => Ok(b.to_bytes()),
    }
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| {
        Answer::error(
            StatusCode::BAD_REQUEST,
            format!("malformed request body: {e}"),
        )
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Target {
    upstream: String,
    backend: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetState {
    upstream: String,
    backend: String,
    state: String,
    #[serde(default)]
    close: bool,
    close_after: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetWeight {
    upstream: String,
    backend: String,
    weight: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetReadiness {
    ready: bool,
}

/// The upstream named, in the snapshot in force, and the entry's backends in it.
fn find<'a>(
    snapshot: &'a crate::snapshot::Snapshot,
    upstream: &str,
    backend: &str,
) -> Result<(&'a Arc<Upstream>, Vec<&'a Arc<crate::upstream::Backend>>)> {
    let Some(u) = snapshot.upstream(upstream) else {
        let names: Vec<&str> = snapshot.upstreams.iter().map(|u| u.name.as_str()).collect();
        return Err(Answer::error(
            StatusCode::NOT_FOUND,
            format!(
                "unknown upstream {upstream:?}; the upstreams are: {}",
                names.join(", ")
            ),
        ));
    };
    let found = backends_of(u, backend);
    if found.is_empty() {
        let names: Vec<String> = u
            .backends()
            .iter()
            .map(|b| entry_of(u, b).backend)
            .collect();
        return Err(Answer::error(
            StatusCode::NOT_FOUND,
            format!(
                "unknown backend {backend:?} in upstream {upstream:?}; its backends are: {}",
                names.join(", ")
            ),
        ));
    }
    Ok((u, found))
}

fn entry(upstream: &str, backend: &str) -> Entry {
    Entry {
        upstream: upstream.to_string(),
        backend: backend.to_string(),
    }
}

/// Runs `change` on the entry's override under the store's lock, applies the result to
/// the entry's backends, saves the store, and answers what is in force now.
fn change(
    ctl: &Ctl,
    peer: &Peer,
    target: Entry,
    change: impl FnOnce(&mut Override),
) -> Result<(Override, Vec<Arc<crate::upstream::Backend>>, Arc<Upstream>)> {
    let mut store = ctl.overrides.lock();
    let snapshot = ctl.snapshots.load();
    let (upstream, backends) = find(&snapshot, &target.upstream, &target.backend)?;
    let o = store.set.entry(target.clone()).or_default();
    change(o);
    o.by = peer.to_string();
    o.epoch = ctl.overrides.next_epoch();
    let set = o.clone();
    if set.is_empty() {
        store.set.remove(&target);
    }
    let weight_changed = backends.iter().any(|b| b.weight_override() != set.weight);
    for b in &backends {
        overrides::set_backend(b, &set);
    }
    if weight_changed {
        upstream.pool.rebalance();
    }
    for b in &backends {
        upstream.availability_changed(b);
    }
    if let Err(e) = store.save() {
        tracing::error!(error = %e, "runtime override in force but not saved");
    }
    let backends = backends.into_iter().cloned().collect();
    Ok((set, backends, Arc::clone(upstream)))
}

fn set_state(ctl: &Ctl, peer: &Peer, req: SetState) -> Result<Answer> {
    let Some(state) = parse_state(&req.state) else {
        return Err(Answer::error(
            StatusCode::BAD_REQUEST,
            format!(
                "unknown state {:?}: expected ready, drain or maint",
                req.state
            ),
        ));
    };
    let close_after = match &req.close_after {
        None => None,
        Some(_) if state != AdminState::Drain => {
            return Err(Answer::error(
                StatusCode::BAD_REQUEST,
                "close_after applies only to drain",
            ));
        }
        Some(text) => match parse_duration(text) {
            Some(d) => Some(d),
            None => {
                return Err(Answer::error(
                    StatusCode::BAD_REQUEST,
                    format!("invalid close_after {text:?}: expected a duration like \"30s\""),
                ));
            }
        },
    };
    if req.close && state == AdminState::Ready {
        return Err(Answer::error(
            StatusCode::BAD_REQUEST,
            "close applies to drain and maint (to close a ready backend's connections, use /v1/backend/close)",
        ));
    }
    let target = entry(&req.upstream, &req.backend);
    let mut before = AdminState::Ready;
    let (set, backends, _) = change(ctl, peer, target.clone(), |o| {
        before = o.state.unwrap_or(AdminState::Ready);
        o.state = (state != AdminState::Ready).then_some(state);
        o.since = crate::metrics::unix_now();
    })?;
    let open: u64 = backends.iter().map(|b| b.active()).sum();
    if req.close {
        for b in &backends {
            b.close_sessions();
        }
    }
    tracing::info!(by = %peer, backend = %target, state = state.as_str(), before = before.as_str(), close = req.close, ?close_after, open_connections = open, "backend admin state set");
    if let Some(after) = close_after {
        let (overrides, snapshots) = (Arc::clone(&ctl.overrides), Arc::clone(&ctl.snapshots));
        let (epoch, target) = (set.epoch, target.clone());
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let store = overrides.lock();
            // Only if this drain still stands: a later change cancels it.
            if store.set.get(&target).map(|o| o.epoch) != Some(epoch) {
                return;
            }
            let snapshot = snapshots.load();
            if let Some(u) = snapshot.upstream(&target.upstream) {
                for b in backends_of(u, &target.backend) {
                    tracing::info!(backend = %target, open_connections = b.active(), "drain's close_after passed: closing the backend's connections");
                    b.close_sessions();
                }
            }
        });
    }
    Ok(Answer::ok(json!({
        "upstream": target.upstream,
        "backend": target.backend,
        "state": state.as_str(),
        "before": before.as_str(),
        "closed": if req.close { open } else { 0 },
    })))
}

fn set_weight(ctl: &Ctl, peer: &Peer, req: SetWeight) -> Result<Answer> {
    if let Some(w) = req.weight
        && w > MAX_WEIGHT
    {
        return Err(Answer::error(
            StatusCode::BAD_REQUEST,
            format!("weight {w} is out of range: 0 to {MAX_WEIGHT}"),
        ));
    }
    let target = entry(&req.upstream, &req.backend);
    let (_, backends, _) = change(ctl, peer, target.clone(), |o| o.weight = req.weight)?;
    let weight = backends.first().map(|b| b.weight());
    tracing::info!(by = %peer, backend = %target, weight = ?req.weight, effective = ?weight, "backend weight set");
    Ok(Answer::ok(json!({
        "upstream": target.upstream,
        "backend": target.backend,
        "weight": weight,
        "override": req.weight,
    })))
}

fn clear(ctl: &Ctl, peer: &Peer, req: Target) -> Result<Answer> {
    let target = entry(&req.upstream, &req.backend);
    change(ctl, peer, target.clone(), |o| {
        o.state = None;
        o.weight = None;
    })?;
    tracing::info!(by = %peer, backend = %target, "backend overrides cleared: ready, configured weight");
    Ok(Answer::ok(
        json!({ "upstream": target.upstream, "backend": target.backend, "state": "ready" }),
    ))
}

fn close(ctl: &Ctl, peer: &Peer, req: Target) -> Result<Answer> {
    let snapshot = ctl.snapshots.load();
    let (_, backends) = find(&snapshot, &req.upstream, &req.backend)?;
    let open: u64 = backends.iter().map(|b| b.active()).sum();
    for b in &backends {
        b.close_sessions();
    }
    let target = entry(&req.upstream, &req.backend);
    tracing::info!(by = %peer, backend = %target, open_connections = open, "backend connections closed");
    Ok(Answer::ok(
        json!({ "upstream": target.upstream, "backend": target.backend, "closed": open }),
    ))
}

fn readiness(ctl: &Ctl) -> Value {
    json!({
        "ready": ctl.status.ready.load(Ordering::Relaxed) && !ctl.status.unready_by_operator.load(Ordering::Relaxed),
        "unready_by_operator": ctl.status.unready_by_operator.load(Ordering::Relaxed),
    })
}

fn set_readiness(ctl: &Ctl, peer: &Peer, req: SetReadiness) -> Result<Answer> {
    let before = !ctl
        .status
        .unready_by_operator
        .swap(!req.ready, Ordering::Relaxed);
    tracing::info!(by = %peer, ready = req.ready, before, "process readiness set: /readyz answers {}", if req.ready { "as sluice's own state says" } else { "503" });
    Ok(Answer::ok(readiness(ctl)))
}

async fn reload(ctl: &Ctl, peer: &Peer) -> Result<Answer> {
    tracing::info!(by = %peer, "reload requested (sluice ctl)");
    let (tx, rx) = tokio::sync::oneshot::channel();
    if ctl.reloads.send(tx).await.is_err() {
        return Err(Answer::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "sluice is shutting down",
        ));
    }
    match tokio::time::timeout(RELOAD_WAIT, rx).await {
        Ok(Ok(Ok(generation))) => Ok(Answer::ok(json!({ "generation": generation }))),
        Ok(Ok(Err(error))) => Err(Answer::error(StatusCode::UNPROCESSABLE_ENTITY, error)),
        Ok(Err(_)) => Err(Answer::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "sluice is shutting down",
        )),
        Err(_) => Err(Answer::error(
            StatusCode::GATEWAY_TIMEOUT,
            "the reload is still running; see the log",
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpgradeBody {
    #[serde(default)]
    binary: Option<std::path::PathBuf>,
}

/// A binary upgrade, as on SIGUSR2: answers once the new process is ready (its pid) or
/// the upgrade failed (why). This process closes its control socket for the upgrade;
/// this connection, already open, still gets the answer.
async fn upgrade(ctl: &Ctl, peer: &Peer, req: UpgradeBody) -> Result<Answer> {
    tracing::info!(by = %peer, binary = ?req.binary, "binary upgrade requested (sluice ctl)");
    let (tx, rx) = tokio::sync::oneshot::channel();
    let gone = || Answer::error(StatusCode::SERVICE_UNAVAILABLE, "sluice is shutting down");
    if ctl.upgrades.send((req.binary, tx)).await.is_err() {
        return Err(gone());
    }
    let started = match rx.await {
        Ok(Ok(started)) => started,
        Ok(Err(refused)) => return Err(Answer::error(StatusCode::CONFLICT, refused)),
        Err(_) => return Err(gone()),
    };
    // The new process has `upgrade_timeout` to be ready; the old one kills it then.
    let wait = ctl.snapshots.load().config.upgrade_timeout + Duration::from_secs(5);
    match tokio::time::timeout(wait, started.outcome).await {
        Ok(Ok(Ok(pid))) => Ok(Answer::ok(json!({ "pid": pid }))),
        Ok(Ok(Err(error))) => Err(Answer::error(StatusCode::UNPROCESSABLE_ENTITY, error)),
        Ok(Err(_)) => Err(gone()),
        Err(_) => Err(Answer::error(
            StatusCode::GATEWAY_TIMEOUT,
            "the upgrade is still running; see the log",
        )),
    }
}

/// Every upstream and backend with its state, as `GET /v1/backends` answers.
fn list(ctl: &Ctl) -> Value {
    let store = ctl.overrides.lock();
    let snapshot = ctl.snapshots.load();
    let upstreams: Vec<Value> = snapshot
        .upstreams
        .iter()
        .map(|u| {
            let backends: Vec<Value> = u
                .backends()
                .iter()
                .map(|b| {
                    let entry = entry_of(u, b);
                    let over = store.set.get(&entry);
                    json!({
                        "backend": entry.backend,
                        "endpoints": [b.address.to_string()],
                        "health": if b.health.is_up() { "up" } else { "down" },
                        "ejected": b.health.is_up() && !b.health.available(),
                        "admin_state": b.admin_state().as_str(),
                        "configured_weight": b.configured_weight(),
                        "weight": b.weight(),
                        "effective_weight": b.effective_weight(),
                        "available": b.available(),
                        "active": b.active(),
                        "override": over.map(|o| json!({
                            "state": o.state.map(AdminState::as_str),
                            "weight": o.weight,
                            "since": o.since,
                            "by": o.by,
                        })),
                    })
                })
                .collect();
            json!({
                "name": u.name,
                "queue_length": u.metrics.queue_length.get(),
                "backends": backends,
            })
        })
        .collect();
    json!({
        "generation": snapshot.generation,
        "ready": readiness(ctl)["ready"],
        "unready_by_operator": ctl.status.unready_by_operator.load(Ordering::Relaxed),
        "upstreams": upstreams,
    })
}
