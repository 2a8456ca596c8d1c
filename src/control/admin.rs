//! The admin endpoint (hyper, HTTP/1.1), on its own address, loopback by default.
//! Read-only: `/metrics`, `/healthz` (the process is alive), `/readyz` (listeners are
//! bound and sluice is not draining), `/config` (the config in use, as JSON) and
//! `/listeners` (each listener's bound addresses, port 0 resolved, as JSON), and the
//! status page: `/` (or `/status`, HTML) and its JSON twin `/status.json` (`status/`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, HeaderValue, X_CONTENT_TYPE_OPTIONS,
};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::control::outcome::LastLoad;
use crate::control::status::{self, Started};
use crate::data::held::Held;
use crate::metrics::Metrics;
use crate::snapshot::SnapshotHandle;

/// A client that has not sent its request headers by then is dropped (admin endpoint
/// and control socket alike: [`serve_http1`]).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What the admin endpoint reports on.
pub struct Status {
    pub metrics: Arc<Metrics>,
    /// For `/config`: the snapshot in use.
    pub snapshots: SnapshotHandle,
    /// True once every listener is bound; false again when the drain begins.
    pub ready: AtomicBool,
    /// Set by `sluice ctl unready`: `/readyz` answers 503 while sluice keeps serving.
    pub unready_by_operator: AtomicBool,
    /// The control socket's runtime overrides, shown by `/config` beside the config.
    pub overrides: Arc<crate::control::ctl::overrides::Overrides>,
    /// Each listener's bound addresses, and the generation of the config they are for,
    /// updated once the listeners of every applied config are running.
    pub listening: Mutex<Listening>,
    /// For the status page (`status/`): the last config load's outcome.
    pub last_load: LastLoad,
    /// For the status page: when sluice started, and its process-wide connection cap.
    pub started: Started,
    pub process_cap: usize,
    /// The status page's own memory (queue lengths seen), touched only by its requests.
    pub page: status::Memory,
    /// For `/config`: each backend name with its current addresses and their TTL.
    pub discovery: crate::control::discovery::View,
    /// What is sampled at each scrape of `/metrics`: accept queues, time at the cap,
    /// per-client tables, backends' effective weights.
    pub held: Arc<Held>,
}

/// What `/listeners` reports: one generation's bound addresses, by listener.
#[derive(Default)]
pub struct Listening {
    pub generation: u64,
    pub listeners: Vec<(String, Vec<SocketAddr>)>,
}

impl Status {
    pub fn set_listening(&self, listening: Listening) {
        // Every update replaces the whole value, so a poisoned lock holds a complete one.
        *self.listening.lock().unwrap_or_else(|p| p.into_inner()) = listening;
    }
}

/// Serves admin requests until the task is dropped.
pub async fn serve(socket: TcpListener, status: Arc<Status>) {
    loop {
        let stream = match socket.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let status = Arc::clone(&status);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let status = Arc::clone(&status);
                async move {
                    if matches!(
                        req.uri().path(),
                        "/metrics" | "/" | "/status" | "/status.json"
                    ) {
                        // The accept queues, client tables and effective weights these
                        // report: sampling reads /proc/net/tcp and sweeps the client
                        // tables, so off the event loop.
                        let s = Arc::clone(&status);
                        let _ = tokio::task::spawn_blocking(move || {
                            s.held.sample(&s.snapshots.load());
                        })
                        .await;
                    }
                    Ok::<_, Infallible>(respond(&status, &req))
                }
            });
            serve_http1(stream, service, "admin").await;
        });
    }
}

/// Serves one HTTP/1 connection of the admin endpoint or the control socket, dropping a
/// client that has not sent its request headers within [`HEADER_READ_TIMEOUT`]; how the
/// connection ended is logged at debug, under `what` ("admin", "control").
pub(crate) async fn serve_http1<S, Svc>(stream: S, service: Svc, what: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    Svc: hyper::service::HttpService<Incoming, ResBody = Full<Bytes>>,
    Svc::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let served = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(e) = served {
        tracing::debug!(error = %e, "{what} connection ended with an error");
    }
}

fn respond(status: &Status, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "the admin endpoint is read-only\n",
        );
    }
    match req.uri().path() {
        "/metrics" => {
            let mut r = Response::new(Full::new(Bytes::from(status.metrics.encode())));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        "/config" => {
            let snapshot = status.snapshots.load();
            let body = serde_json::json!({
                "generation": snapshot.generation,
                "source": snapshot.config.source.display().to_string(),
                "loaded_at": snapshot.loaded_at,
                "config": &*snapshot.config,
                "overrides": status.overrides.to_json(),
                "discovery": (status.discovery)(),
            });
            json(format!("{body:#}\n"))
        }
        "/listeners" => {
            let body = {
                let listening = status.listening.lock().unwrap_or_else(|p| p.into_inner());
                let listeners = listening
                    .listeners
                    .iter()
                    .map(|(name, addresses)| {
                        serde_json::json!({ "name": name, "addresses": addresses })
                    })
                    .collect::<Vec<_>>();
                serde_json::json!({ "generation": listening.generation, "listeners": listeners })
            };
            json(format!("{body:#}\n"))
        }
        "/" | "/status" => {
            let page = status::render(&report(status));
            let mut r = no_store(Response::new(Full::new(Bytes::from(page))));
            let h = r.headers_mut();
            h.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            if let Ok(csp) = HeaderValue::from_str(&status::CONTENT_SECURITY_POLICY) {
                h.insert(CONTENT_SECURITY_POLICY, csp);
            }
            r
        }
        "/status.json" => {
            let body = serde_json::to_string_pretty(&report(status))
                .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
            no_store(json(body + "\n"))
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if status.unready_by_operator.load(Ordering::Relaxed) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready (sluice ctl unready)\n",
        ),
        "/readyz" if status.ready.load(Ordering::Relaxed) => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /, /status.json, /metrics, /healthz, /readyz, /config or /listeners\n",
        ),
    }
}

/// The status report, collected now from the snapshot in force and the atomics.
fn report(status: &Status) -> status::Report {
    let snapshot = status.snapshots.load();
    let listening = {
        let l = status.listening.lock().unwrap_or_else(|p| p.into_inner());
        l.listeners.clone()
    };
    status::collect(&status::Sources {
        metrics: &status.metrics,
        snapshot: &snapshot,
        listening: &listening,
        last_load: status.last_load.get(),
        started: &status.started,
        process_cap: status.process_cap,
        ready: status.ready.load(Ordering::Relaxed),
        memory: &status.page,
    })
}

/// A page that changes with every request: never cached, never sniffed as another type.
fn no_store(mut r: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    let h = r.headers_mut();
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    r
}

fn text(code: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = code;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json(body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}
