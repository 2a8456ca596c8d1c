//! The snapshot: everything a connection needs, built once from a validated [`Config`]
//! and shared immutably. A connection loads it once and holds the `Arc` for its whole
//! life, so a later config change never alters a connection already in flight.

use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus::IntGauge;

use crate::access_log::AccessLog;
use crate::config::Config;
use crate::metrics::{ListenerMetrics, Metrics};
use crate::upstream::{Backend, Upstream};

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
    retired: Vec<(String, Arc<Backend>)>,
    /// Process-wide, started with the first snapshot and carried to every later one.
    pub access_log: Option<Arc<AccessLog>>,
    /// Counts snapshots alive, so a leak of old ones shows in the metrics.
    alive: IntGauge,
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        self.alive.dec();
    }
}

/// What a listener does with a connection it accepts.
pub struct Route {
    pub listener: String,
    pub upstream: Arc<Upstream>,
    pub metrics: ListenerMetrics,
}

impl Snapshot {
    /// Builds the snapshot for `config`. Backends and queues of `previous` that the new
    /// config keeps are carried over, with their state.
    pub fn build(
        config: Arc<Config>,
        generation: u64,
        metrics: &Metrics,
        previous: Option<&Snapshot>,
        access_log: Option<Arc<AccessLog>>,
    ) -> Snapshot {
        let mut retired = previous.map(|p| p.retired.clone()).unwrap_or_default();
        let upstreams: Vec<Arc<Upstream>> = config
            .upstreams
            .iter()
            .map(|u| {
                let before = previous.and_then(|p| p.upstream(&u.name));
                let upstream = Arc::new(Upstream::new(
                    u,
                    metrics,
                    before.map(|b| &**b),
                    &mut retired,
                ));
                upstream.queue.adopt(&upstream);
                upstream
            })
            .collect();
        // Backends this config drops join the retired; those with no connection left
        // have nothing to carry and are forgotten.
        for old in previous.iter().flat_map(|p| p.upstreams.iter()) {
            for b in &old.backends {
                let kept = upstreams
                    .iter()
                    .any(|u| u.backends.iter().any(|nb| Arc::ptr_eq(nb, b)));
                if !kept {
                    retired.push((old.name.clone(), Arc::clone(b)));
                }
            }
        }
        retired.retain(|(_, b)| b.active() > 0);
        let listeners = config
            .listeners
            .iter()
            .filter_map(|l| {
                // The config guarantees the upstream exists.
                let upstream = upstreams.iter().find(|u| u.name == l.upstream)?;
                Some(Route {
                    listener: l.name.clone(),
                    upstream: Arc::clone(upstream),
                    metrics: metrics.listener(&l.name, l.max_connections),
                })
            })
            .collect();
        metrics.config_generation.set(generation as i64);
        metrics.config_snapshots.inc();
        Snapshot {
            alive: metrics.config_snapshots.clone(),
            generation,
            config,
            loaded_at: crate::reload::unix_now(),
            listeners,
            upstreams,
            access_log,
            retired,
        }
    }

    pub fn upstream(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.upstreams.iter().find(|u| u.name == name)
    }

    pub fn route(&self, listener: &str) -> Option<&Route> {
        self.listeners.iter().find(|r| r.listener == listener)
    }
}
