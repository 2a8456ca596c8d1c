//! The snapshot: everything a connection needs, built once from a validated [`Config`]
//! and shared immutably. A connection loads it once and holds the `Arc` for its whole
//! life, so a later config change never alters a connection already in flight.

pub mod diff;

use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus::IntGauge;
use tokio_util::sync::CancellationToken;

use crate::access_log::AccessLog;
use crate::config::{Access, ClientLimits, Config, ProxyAccept, SniPattern};
use crate::edge::tls::{self, Termination};
use crate::metrics::{ListenerMetrics, Metrics, TlsMetrics};
use crate::upstream::{Backend, Upstream};

pub use diff::SnapshotDiff;

/// The handle every task reads the current snapshot through.
pub type SnapshotHandle = Arc<ArcSwap<Snapshot>>;

pub struct Snapshot {
    /// 0 for the config sluice started with; each applied reload adds one.
    pub generation: u64,
    pub config: Arc<Config>,
    /// When this snapshot was built (Unix seconds), for `/config`.
    pub loaded_at: f64,
    /// In config order; few enough that a linear search by name beats hashing.
    pub listeners: Vec<Route>,
    pub upstreams: Vec<Arc<Upstream>>,
    /// Backends removed by a reload that still have open connections, by upstream name:
    /// a later config that adds one back takes it over with its counts.
    pub(crate) retired: Vec<(String, Arc<Backend>)>,
    /// Process-wide, started with the first snapshot and carried to every later one.
    pub access_log: Option<Arc<AccessLog>>,
    /// Counts snapshots alive, so a leak of old ones shows in the metrics.
    alive: IntGauge,
    /// Of the TLS files this snapshot was built from: a reload with the same config text
    /// and the same fingerprint changes nothing.
    pub tls_fingerprint: u64,
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        self.alive.dec();
    }
}

/// What a listener does with a connection it accepts.
pub struct Route {
    pub listener: String,
    /// Where connections go; on a passthrough listener, those no SNI route takes
    /// (`None`: they are closed).
    pub upstream: Option<Arc<Upstream>>,
    pub metrics: ListenerMetrics,
    pub proxy_protocol: Option<ProxyAccept>,
    /// TLS termination, with its metric handles.
    pub tls: Option<(Arc<Termination>, TlsMetrics)>,
    pub passthrough: Option<SniRoutes>,
    /// Some upstream this listener reaches sends a PROXY header, which names the address
    /// the client connected to: only then is it looked up (a system call).
    pub sends_proxy_protocol: bool,
    /// `allow` and `deny`, checked on the client's real address before TLS.
    pub access: Option<Access>,
    /// Per-client limits, counted in the listener's `ClientTable`.
    pub client_limits: Option<ClientLimits>,
    /// Open connections watch for a reload whose lists deny them.
    pub close_denied_on_reload: bool,
}

/// A passthrough listener's routes, with their upstreams resolved.
pub struct SniRoutes {
    routes: Vec<(Vec<SniPattern>, Arc<Upstream>)>,
    pub hello_timeout: std::time::Duration,
    pub max_hello_size: usize,
}

impl SniRoutes {
    /// The first route (in config order) with a pattern matching `name`.
    pub fn pick(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.routes
            .iter()
            .find(|(patterns, _)| patterns.iter().any(|p| p.matches(name)))
            .map(|(_, u)| u)
    }
}

impl Snapshot {
    /// The state before any config is applied: no listener, no upstream. Start applies
    /// the first config to it as a reload applies a config to the running snapshot.
    pub fn empty(config: &Config, metrics: &Metrics) -> Snapshot {
        metrics.config_snapshots.inc();
        let config = Config {
            listeners: Vec::new(),
            upstreams: Vec::new(),
            ..config.clone()
        };
        // No listener or upstream names a file: what reading no TLS files gives.
        let tls_fingerprint = tls::load(&config).map_or(0, |m| m.fingerprint);
        Snapshot {
            alive: metrics.config_snapshots.clone(),
            generation: 0,
            config: Arc::new(config),
            loaded_at: crate::metrics::unix_now(),
            listeners: Vec::new(),
            upstreams: Vec::new(),
            access_log: None,
            retired: Vec::new(),
            tls_fingerprint,
        }
    }

    /// Builds the snapshot for `config`, taking over what `diff` says survives from the
    /// snapshot before.
    pub fn build(
        config: Arc<Config>,
        generation: u64,
        metrics: &Metrics,
        mut diff: SnapshotDiff,
        access_log: Option<Arc<AccessLog>>,
        material: tls::Material,
        cut: &CancellationToken,
    ) -> (Snapshot, SnapshotDiff) {
        let upstreams: Vec<Arc<Upstream>> = config
            .upstreams
            .iter()
            .map(|u| {
                let upstream = Arc::new(Upstream::new(
                    u,
                    metrics,
                    diff.carried(&u.name),
                    material.upstreams.get(&u.name).cloned(),
                    cut,
                ));
                upstream.queue.serve(Arc::clone(&upstream.pool));
                upstream
            })
            .collect();
        // The config guarantees that every upstream a listener names exists.
        let find = |name: &str| upstreams.iter().find(|u| u.name == name).cloned();
        let listeners: Vec<Route> = config
            .listeners
            .iter()
            .map(|l| Route {
                sends_proxy_protocol: {
                    let reached = |name: &str| {
                        l.upstream.as_deref() == Some(name)
                            || l.passthrough
                                .iter()
                                .flat_map(|p| &p.routes)
                                .any(|r| r.upstream == name)
                    };
                    config
                        .upstreams
                        .iter()
                        .any(|u| u.send_proxy_protocol.is_some() && reached(&u.name))
                },
                listener: l.name.clone(),
                access: l.access.clone(),
                client_limits: l.client_limits.clone(),
                close_denied_on_reload: l.close_denied_on_reload,
                upstream: l.upstream.as_deref().and_then(find),
                metrics: metrics.listener(&l.name, l.max_connections),
                proxy_protocol: l.proxy_protocol.clone(),
                tls: material
                    .listeners
                    .get(&l.name)
                    .map(|t| (Arc::clone(t), metrics.listener_tls(&l.name, &t.expiries))),
                passthrough: l.passthrough.as_ref().map(|p| SniRoutes {
                    routes: p
                        .routes
                        .iter()
                        .filter_map(|r| Some((r.sni.clone(), find(&r.upstream)?)))
                        .collect(),
                    hello_timeout: p.hello_timeout,
                    max_hello_size: p.max_hello_size,
                }),
            })
            .collect();
        metrics.config_generation.set(generation as i64);
        metrics.config_snapshots.inc();
        let snapshot = Snapshot {
            alive: metrics.config_snapshots.clone(),
            generation,
            config,
            loaded_at: crate::metrics::unix_now(),
            listeners,
            upstreams,
            access_log,
            retired: std::mem::take(&mut diff.retired),
            tls_fingerprint: material.fingerprint,
        };
        (snapshot, diff)
    }

    /// The TLS material this snapshot was built with, for a rebuild that reads no file
    /// (new DNS answers: `control/discovery.rs`).
    pub fn material(&self) -> tls::Material {
        tls::Material {
            listeners: self
                .listeners
                .iter()
                .filter_map(|r| Some((r.listener.clone(), Arc::clone(&r.tls.as_ref()?.0))))
                .collect(),
            upstreams: self
                .upstreams
                .iter()
                .filter_map(|u| Some((u.name.clone(), Arc::clone(u.tls()?))))
                .collect(),
            fingerprint: self.tls_fingerprint,
        }
    }

    pub fn upstream(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.upstreams.iter().find(|u| u.name == name)
    }

    pub fn route(&self, listener: &str) -> Option<&Route> {
        self.route_index(listener).map(|i| &self.listeners[i])
    }

    /// Where `listener` is in `listeners`.
    pub fn route_index(&self, listener: &str) -> Option<usize> {
        self.listeners.iter().position(|r| r.listener == listener)
    }
}
