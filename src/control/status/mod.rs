//! The status page (`GET /`) and its JSON twin (`GET /status.json`): one [`Report`]
//! collected per request from the snapshot in force, the metric handles' atomics and the
//! control plane's own state, then either serialized (serde) or rendered (`html.rs`).
//! Both come from the same value, so a script reads exactly what the page shows.
//!
//! Nothing here runs on the connection path, and nothing here takes a lock a connection
//! takes: counters and gauges are atomics, backend health and the queue's oldest wait
//! are atomics kept for this, the last check and the last reload are behind `ArcSwap`s
//! written by the check tasks and the control loop. The only lock is [`Memory`]'s, the
//! page's own.
//!
//! A column is added to the page by adding a field to [`ListenerRow`] or [`BackendRow`]
//! (the JSON twin) and one entry to `LISTENER_COLUMNS` or `BACKEND_COLUMNS` in `html.rs`.

mod html;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::control::outcome::Outcome;
use crate::metrics::{ConnectFailure, Direction, End, Label, Metrics, RejectReason};
use crate::snapshot::{Route, Snapshot};
use crate::upstream::{Backend, Upstream};

pub use html::{CONTENT_SECURITY_POLICY, render};

/// How long the page waits between two refreshes when JavaScript is on.
pub const REFRESH: Duration = Duration::from_secs(2);

/// A queue counts as growing when it is longer now than it was at least this long ago
/// (and at most [`TREND_WINDOW`] ago), as seen by page loads.
const TREND_MIN: Duration = Duration::from_secs(1);
const TREND_WINDOW: Duration = Duration::from_secs(10);

/// When sluice started.
pub struct Started {
    at: Instant,
    unix: f64,
}

impl Started {
    pub fn now() -> Started {
        Started {
            at: Instant::now(),
            unix: crate::metrics::unix_now(),
        }
    }
}

/// What the page remembers between requests: each upstream's queue lengths as seen by
/// earlier page loads, to tell a growing queue from a steady one.
#[derive(Default)]
pub struct Memory {
    queues: Mutex<HashMap<String, Vec<(Instant, usize)>>>,
}

impl Memory {
    /// Records `length` for `upstream` and says whether the queue grew: longer now than
    /// at a look between [`TREND_MIN`] and [`TREND_WINDOW`] ago.
    fn growing(&self, upstream: &str, length: usize, now: Instant) -> bool {
        // Only page loads take this lock, and each replaces whole values.
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        let seen = queues.entry(upstream.to_string()).or_default();
        seen.retain(|(at, _)| now.duration_since(*at) <= TREND_WINDOW);
        let growing = length > 0
            && seen
                .iter()
                .any(|(at, l)| now.duration_since(*at) >= TREND_MIN && *l < length);
        // One look per quarter second is plenty to see a trend over a few seconds.
        if seen
            .last()
            .is_none_or(|(at, _)| now.duration_since(*at) >= Duration::from_millis(250))
        {
            seen.push((now, length));
        }
        growing
    }

    /// Forgets upstreams the config no longer has.
    fn keep_only(&self, names: &[&str]) {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        queues.retain(|name, _| names.contains(&name.as_str()));
    }
}

/// What a report is collected from.
pub struct Sources<'a> {
    pub metrics: &'a Metrics,
    pub snapshot: &'a Snapshot,
    /// Each listener's bound addresses (port 0 resolved).
    pub listening: &'a [(String, Vec<SocketAddr>)],
    pub last_load: Arc<Outcome>,
    pub started: &'a Started,
    pub process_cap: usize,
    pub ready: bool,
    pub memory: &'a Memory,
}

/// Everything the page shows; `/status.json` is this, serialized.
#[derive(Debug, Serialize)]
pub struct Report {
    pub version: &'static str,
    pub build: Build,
    /// Unix time (seconds) of this report.
    pub now: f64,
    pub started_at: f64,
    pub uptime_seconds: u64,
    /// Every listener is bound and sluice is not draining (what `/readyz` says).
    pub ready: bool,
    pub draining: bool,
    /// The generation of the config in force: 0 at start, one more per applied reload.
    pub generation: u64,
    pub config_file: String,
    /// The last config load (the start or a reload), whether or not it applied.
    pub last_reload: Outcome,
    pub process: Process,
    /// Every problem the report shows, one sentence each; empty when all is well.
    pub problems: Vec<String>,
    pub listeners: Vec<ListenerRow>,
    pub upstreams: Vec<UpstreamRow>,
}

#[derive(Debug, Serialize)]
pub struct Build {
    pub version: &'static str,
    /// CPU architecture and OS, e.g. `x86_64-linux`.
    pub target: String,
    /// `release` or `debug`.
    pub profile: &'static str,
}

#[derive(Debug, Serialize)]
pub struct Process {
    /// Client connections open now, all listeners together.
    pub connections: u64,
    /// The process-wide connection cap derived from the open-file limit.
    pub max_connections: usize,
    /// The soft open-file limit (`None` if unreadable). The descriptors open now are
    /// not counted here: that reads every entry of /proc/self/fd, which took 19 ms of
    /// the admin thread with 9,000 connections open; `process_open_fds` in `/metrics`
    /// has it.
    pub open_files_limit: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct ListenerRow {
    pub name: String,
    pub addresses: Vec<SocketAddr>,
    /// `tcp` (bytes relayed as they come), `tls` (terminated) or `passthrough` (SNI).
    pub mode: &'static str,
    pub proxy_protocol: bool,
    /// The upstream it sends to (on a passthrough listener, the default one, if any).
    pub upstream: Option<String>,
    pub active: u64,
    pub max_connections: usize,
    /// `active` has reached `max_connections`: new clients wait in the kernel's backlog.
    pub full: bool,
    pub accepted: u64,
    /// Closed without reaching a backend, by reason (every reason, zeros included).
    pub rejected: BTreeMap<&'static str, u64>,
    pub rejected_total: u64,
    /// Relayed connections that ended, by how (every reason, zeros included).
    pub closed: BTreeMap<&'static str, u64>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Clients the kernel holds unaccepted in the listener's accept queues now (sluice at
    /// `max_connections` or the process cap), and the queues' limit.
    pub accept_queue: i64,
    pub accept_queue_limit: i64,
}

#[derive(Debug, Serialize)]
pub struct UpstreamRow {
    pub name: String,
    pub balance: String,
    pub health_checks: bool,
    pub max_connections_per_backend: Option<u64>,
    /// Only upstreams with `max_connections_per_backend` have one.
    pub queue: Option<QueueRow>,
    pub backends: Vec<BackendRow>,
    /// Backends that take new connections now.
    pub available: usize,
}

#[derive(Debug, Serialize)]
pub struct QueueRow {
    pub length: usize,
    pub max: usize,
    pub timeout_seconds: f64,
    pub oldest_wait_seconds: Option<f64>,
    /// Longer now than at an earlier page load 1 to 10 seconds ago.
    pub growing: bool,
}

#[derive(Debug, Serialize)]
pub struct BackendRow {
    pub address: SocketAddr,
    /// `up`, `down` (failing its active checks), `ejected` (after connect failures of
    /// real traffic) or `weight_0` (configured to take nothing new).
    pub state: &'static str,
    /// The active checks' verdict (always true without checks).
    pub up: bool,
    /// Unix time (seconds) of the last up/down change, or since the backend was added.
    pub since: f64,
    pub ejected_for_seconds: Option<f64>,
    /// The operator's admin state (`sluice ctl`): `ready`, `drain` or `maint`.
    pub admin_state: &'static str,
    /// The weight in force: the operator's override if one is set, else the configured one.
    pub weight: u32,
    pub configured_weight: u32,
    pub weight_override: Option<u32>,
    /// `weight` as balancing uses it now: less while slow start ramps the backend up.
    pub effective_weight: f64,
    pub active: u64,
    pub limit: Option<u64>,
    /// Bytes of this backend's connections that have ended (client to backend, and
    /// back); a connection's bytes are added when it closes.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Failed connect attempts of real traffic, by reason (every reason, zeros included).
    pub connect_errors: BTreeMap<&'static str, u64>,
    pub connect_errors_total: u64,
    /// Connect failures in a row since the last success (passive ejection counts them).
    pub consecutive_failures: u32,
    pub last_check: Option<CheckRow>,
}

#[derive(Debug, Serialize)]
pub struct CheckRow {
    pub at: f64,
    /// `success`, `failure` or `timeout`.
    pub result: &'static str,
    pub error: Option<String>,
}

/// Collects a report; reads only atomics, the snapshot and the control plane's state.
pub fn collect(s: &Sources<'_>) -> Report {
    let now = Instant::now();
    let snapshot = s.snapshot;
    let listeners: Vec<ListenerRow> = snapshot
        .listeners
        .iter()
        .map(|route| listener_row(route, snapshot, s.listening))
        .collect();
    let upstreams: Vec<UpstreamRow> = snapshot
        .upstreams
        .iter()
        .map(|u| upstream_row(u, snapshot, s.memory, now))
        .collect();
    s.memory.keep_only(
        &upstreams
            .iter()
            .map(|u| u.name.as_str())
            .collect::<Vec<_>>(),
    );
    let draining = s.metrics.draining.get() != 0;
    let connections = listeners.iter().map(|l| l.active).sum();
    let process = Process {
        connections,
        max_connections: s.process_cap,
        open_files_limit: open_files_limit(),
    };
    let mut report = Report {
        version: env!("CARGO_PKG_VERSION"),
        build: Build {
            version: env!("CARGO_PKG_VERSION"),
            target: format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS),
            profile: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
        },
        now: crate::metrics::unix_now(),
        started_at: s.started.unix,
        uptime_seconds: s.started.at.elapsed().as_secs(),
        ready: s.ready,
        draining,
        generation: snapshot.generation,
        config_file: snapshot.config.source.display().to_string(),
        last_reload: (*s.last_load).clone(),
        process,
        problems: Vec::new(),
        listeners,
        upstreams,
    };
    report.problems = problems(&report);
    report
}

fn listener_row(
    route: &Route,
    snapshot: &Snapshot,
    listening: &[(String, Vec<SocketAddr>)],
) -> ListenerRow {
    let config = snapshot
        .config
        .listeners
        .iter()
        .find(|l| l.name == route.listener);
    let m = &route.metrics;
    let rejected = by_label(|r: RejectReason| m.rejected(r).get());
    let max_connections = config.map_or(0, |c| c.max_connections);
    let active = u64::try_from(m.active.get()).unwrap_or(0);
    ListenerRow {
        name: route.listener.clone(),
        addresses: listening
            .iter()
            .find(|(name, _)| *name == route.listener)
            .map(|(_, a)| a.clone())
            .unwrap_or_else(|| config.map(|c| c.bind.clone()).unwrap_or_default()),
        mode: match (&route.tls, &route.passthrough) {
            (Some(_), _) => "tls",
            (None, Some(_)) => "passthrough",
            (None, None) => "tcp",
        },
        proxy_protocol: route.proxy_protocol.is_some(),
        upstream: route.upstream.as_ref().map(|u| u.name.clone()),
        active,
        max_connections,
        full: max_connections > 0 && active >= max_connections as u64,
        accepted: m.accepted.get(),
        rejected_total: rejected.values().sum(),
        rejected,
        closed: by_label(|e: End| m.closed(e).get()),
        bytes_in: m.bytes(Direction::ClientToBackend).get(),
        bytes_out: m.bytes(Direction::BackendToClient).get(),
        accept_queue: route.metrics.accept_queue.get(),
        accept_queue_limit: route.metrics.accept_queue_limit.get(),
    }
}

fn upstream_row(u: &Upstream, snapshot: &Snapshot, memory: &Memory, now: Instant) -> UpstreamRow {
    let config = snapshot.config.upstreams.iter().find(|c| c.name == u.name);
    let limit = config.and_then(|c| c.max_connections_per_backend);
    let queue = match (limit, config) {
        (Some(_), Some(c)) => {
            let length = u.queue.len();
            Some(QueueRow {
                length,
                max: c.queue.max,
                timeout_seconds: c.queue.timeout.as_secs_f64(),
                oldest_wait_seconds: u.queue.oldest_wait().map(|d| d.as_secs_f64()),
                growing: memory.growing(&u.name, length, now),
            })
        }
        _ => None,
    };
    let backends: Vec<BackendRow> = u.backends().iter().map(|b| backend_row(b, limit)).collect();
    UpstreamRow {
        name: u.name.clone(),
        balance: config
            .and_then(|c| serde_json::to_value(c.balance).ok())
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        health_checks: u.health_check.is_some(),
        max_connections_per_backend: limit,
        queue,
        available: backends
            .iter()
            .filter(|b| b.state == "up" && b.admin_state == "ready")
            .count(),
        backends,
    }
}

fn backend_row(b: &Backend, limit: Option<u64>) -> BackendRow {
    let connect_errors = by_label(|f: ConnectFailure| b.metrics.connect_error(f).get());
    let ejected = b.health.ejected_for();
    let up = b.health.is_up();
    BackendRow {
        address: b.address,
        state: match (up, ejected, b.weight()) {
            (false, _, _) => "down",
            (true, Some(_), _) => "ejected",
            (true, None, 0) => "weight_0",
            (true, None, _) => "up",
        },
        up,
        since: b.health.changed_at_ms() as f64 / 1000.0,
        ejected_for_seconds: ejected.map(|d| d.as_secs_f64()),
        admin_state: b.admin_state().into(),
        weight: b.weight(),
        configured_weight: b.configured_weight(),
        weight_override: b.weight_override(),
        effective_weight: b.effective_weight(),
        active: b.active(),
        limit,
        bytes_in: b.metrics.bytes(Direction::ClientToBackend).get(),
        bytes_out: b.metrics.bytes(Direction::BackendToClient).get(),
        connect_errors_total: connect_errors.values().sum(),
        connect_errors,
        consecutive_failures: b.health.consecutive_failures(),
        last_check: b.health.last_check().map(|c| CheckRow {
            at: c.at_ms as f64 / 1000.0,
            result: c.result.as_str(),
            error: c.error.clone(),
        }),
    }
}

/// One sentence per problem, each starting with its marker word in capitals, so that a
/// problem reads as one without colour.
fn problems(r: &Report) -> Vec<String> {
    let mut out = Vec::new();
    if r.draining {
        out.push("DRAINING: sluice is shutting down; new connections are refused".to_string());
    }
    if r.last_reload.failed()
        && let crate::control::outcome::LoadResult::Failed { error, .. } = &r.last_reload.result
    {
        let first = error.lines().next().unwrap_or_default();
        out.push(format!(
            "RELOAD FAILED: {first} (generation {} still runs)",
            r.generation
        ));
    }
    if r.process.connections >= r.process.max_connections as u64 && r.process.max_connections > 0 {
        out.push(format!(
            "FULL: {} connections open, the process cap is {}",
            r.process.connections, r.process.max_connections
        ));
    }
    for l in &r.listeners {
        if l.full {
            out.push(format!(
                "FULL: listener {} has {} of {} connections open",
                l.name, l.active, l.max_connections
            ));
        }
    }
    for u in &r.upstreams {
        if u.available == 0 {
            out.push(format!(
                "NO BACKEND: upstream {} has no backend taking connections",
                u.name
            ));
        }
        for b in &u.backends {
            match b.state {
                "down" => out.push(format!(
                    "DOWN: backend {} of upstream {} fails its health checks",
                    b.address, u.name
                )),
                "ejected" => out.push(format!(
                    "EJECTED: backend {} of upstream {} after connect failures, for {:.0}s more",
                    b.address,
                    u.name,
                    b.ejected_for_seconds.unwrap_or(0.0)
                )),
                _ => {}
            }
            if b.admin_state != "ready" {
                out.push(format!(
                    "{}: backend {} of upstream {} was set to {} by an operator (sluice ctl)",
                    b.admin_state.to_uppercase(),
                    b.address,
                    u.name,
                    b.admin_state
                ));
            }
        }
        if let Some(q) = &u.queue
            && q.length > 0
        {
            let trend = if q.growing { "growing" } else { "waiting" };
            out.push(format!(
                "QUEUE {}: {} client(s) wait for upstream {}, the oldest for {:.1}s (timeout {}s)",
                trend.to_uppercase(),
                q.length,
                u.name,
                q.oldest_wait_seconds.unwrap_or(0.0),
                q.timeout_seconds
            ));
        }
    }
    out
}

/// The soft open-file limit.
fn open_files_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

/// Every value of label `L` with its count: the JSON maps of counts by reason, zeros
/// included.
fn by_label<L: Label>(count: impl Fn(L) -> u64) -> BTreeMap<&'static str, u64> {
    L::VARIANTS.iter().map(|&v| (v.into(), count(v))).collect()
}
