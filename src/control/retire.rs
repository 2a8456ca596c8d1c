//! What a reload removed, taken out of service: backends stop taking connections and
//! their open ones follow `on_backend_removed`; the metric series of removed listeners,
//! upstreams and backends go once nothing uses them. Both read the [`SnapshotDiff`].

use std::sync::Arc;
use std::time::Duration;

use crate::config::BackendRemoved;
use crate::metrics::{Metrics, Series};
use crate::shutdown;
use crate::snapshot::diff::{RemovedListener, RemovedUpstream};
use crate::snapshot::{SnapshotDiff, SnapshotHandle};
use crate::upstream::Backend;

/// How often the janitor looks whether removed things are still in use.
const JANITOR_INTERVAL: Duration = Duration::from_secs(1);

/// Takes the backends that the next config no longer has out of service, and deals with
/// their open connections as their upstream's `on_backend_removed` says.
pub fn retire_removed(diff: &SnapshotDiff, drain_timeout: Duration) {
    for removed in &diff.removed_backends {
        let backend = &removed.backend;
        backend.retire();
        match removed.policy {
            BackendRemoved::Keep => {}
            BackendRemoved::Close => shutdown::cancel(&backend.removed),
            BackendRemoved::Drain => {
                let backend = Arc::clone(backend);
                tokio::spawn(async move {
                    tokio::time::sleep(drain_timeout).await;
                    // Unless a later reload took it back into service.
                    if backend.is_retired() {
                        shutdown::cancel(&backend.removed);
                    }
                });
            }
        }
    }
}

/// Drops the TLS series that go at once: certificates no longer served, and the TLS
/// scope of a listener that stopped terminating TLS.
pub fn forget_tls(diff: &SnapshotDiff, metrics: &Metrics) {
    for (listener, certificate) in &diff.certificates_gone {
        metrics.forget_certificate(listener, certificate);
    }
    for series in &diff.tls_scopes_gone {
        series.forget();
    }
}

/// Removes the metric series of listeners, upstreams and backends that a reload
/// removed, once their last connection has ended, so that a long-running sluice under
/// config churn does not grow its exposition without bound. It holds only their
/// handles, never the old snapshot.
pub struct Janitor {
    listeners: Vec<RemovedListener>,
    upstreams: Vec<RemovedUpstream>,
    backends: Vec<(String, Arc<Backend>)>,
}

impl Janitor {
    pub fn new(diff: &mut SnapshotDiff) -> Janitor {
        Janitor {
            listeners: std::mem::take(&mut diff.removed_listeners),
            upstreams: std::mem::take(&mut diff.removed_upstreams),
            backends: diff
                .removed_backends
                .iter()
                .map(|r| (r.upstream.clone(), Arc::clone(&r.backend)))
                .collect(),
        }
    }

    fn is_done(&self) -> bool {
        self.listeners.is_empty() && self.upstreams.is_empty() && self.backends.is_empty()
    }

    pub fn spawn(mut self, snapshots: SnapshotHandle) {
        if self.is_done() {
            return;
        }
        tokio::spawn(async move {
            loop {
                self.sweep(&snapshots);
                if self.is_done() {
                    return;
                }
                tokio::time::sleep(JANITOR_INTERVAL).await;
            }
        });
    }

    /// Forgets what is idle; lets go of what a later reload brought back, which owns its
    /// series again.
    fn sweep(&mut self, snapshots: &SnapshotHandle) {
        let now = snapshots.load();
        let forget = |series: &[Series]| series.iter().for_each(Series::forget);
        self.listeners.retain(|l| {
            if now.route(&l.name).is_some() {
                return false;
            }
            let idle = l.active.get() == 0;
            if idle {
                forget(&l.series);
            }
            !idle
        });
        self.backends.retain(|(upstream, b)| {
            let back = now
                .upstream(upstream)
                .is_some_and(|u| u.backends().iter().any(|nb| nb.address == b.address));
            if back {
                return false;
            }
            let idle = b.active() == 0;
            if idle {
                b.metrics.series.forget();
            }
            !idle
        });
        let backends = &self.backends;
        self.upstreams.retain(|u| {
            if now.upstream(&u.name).is_some() {
                return false;
            }
            let idle = backends.iter().all(|(name, _)| name != &u.name) && u.queue.is_empty();
            if idle {
                u.series.forget();
            }
            !idle
        });
    }
}
