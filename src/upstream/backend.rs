//! One backend server: its identity (an address within an upstream) and its live state.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use tokio_util::sync::CancellationToken;

use crate::metrics::BackendMetrics;
use crate::upstream::health::Health;

/// One backend server and its live state. Keyed by (upstream, address): a reload that
/// keeps the backend keeps this object, so its health, active count and metric handles
/// carry over into the new snapshot.
pub struct Backend {
    pub address: SocketAddr,
    /// From the latest config; 0 means no new connections.
    weight: AtomicU32,
    /// Connections open or being opened to this backend: the balancers read this count,
    /// the per-backend limit caps it, and the gauge mirrors it.
    active: AtomicU64,
    pub health: Health,
    pub metrics: BackendMetrics,
    /// Set once the backend is no longer in the config: it takes no new connections.
    retired: AtomicBool,
    /// Cancelled when the connections still open to a removed backend must close
    /// (`on_backend_removed`), and, as a child of the shutdown cut, at the drain's
    /// deadline: a relay waits on this one token for both.
    pub removed: CancellationToken,
}

impl Backend {
    /// `cut` is the shutdown drain's deadline: [`Backend::removed`] is its child.
    pub fn new(
        address: SocketAddr,
        weight: u32,
        metrics: BackendMetrics,
        cut: &CancellationToken,
    ) -> Backend {
        metrics.up.set(1);
        Backend {
            address,
            weight: AtomicU32::new(weight),
            active: AtomicU64::new(0),
            health: Health::default(),
            metrics,
            retired: AtomicBool::new(false),
            removed: cut.child_token(),
        }
    }

    /// A backend outside any upstream, with `active` connections, for unit tests.
    #[cfg(test)]
    pub fn for_test(address: SocketAddr, weight: u32, active: u64) -> Backend {
        let b = Backend::new(
            address,
            weight,
            crate::metrics::Metrics::new()
                .expect("a fresh registry")
                .backend("t", "t"),
            &CancellationToken::new(),
        );
        b.active.store(active, Ordering::Relaxed);
        b
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    pub fn set_weight(&self, weight: u32) {
        self.weight.store(weight, Ordering::Relaxed);
    }

    /// Takes a slot: one more connection open or being opened.
    pub(crate) fn take(&self) {
        self.active.fetch_add(1, Ordering::SeqCst);
        self.metrics.active.inc();
    }

    /// Frees a slot (without waking waiters: the caller does that).
    pub(crate) fn release(&self) {
        self.active.fetch_sub(1, Ordering::SeqCst);
        self.metrics.active.dec();
    }

    /// Marks the backend as gone from the config: no new connections.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
        self.metrics.up.set(0);
    }

    /// Takes a retired backend back into service (a later config has it again).
    pub fn revive(&self) {
        self.retired.store(false, Ordering::Relaxed);
        self.metrics.up.set(i64::from(self.available()));
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }

    /// Connections open or being opened to this backend now.
    pub fn active(&self) -> u64 {
        // SeqCst, paired with the queue's `waiting` count: see queue.rs.
        self.active.load(Ordering::SeqCst)
    }

    /// Takes new connections: in the config, weight above zero, up, not ejected.
    pub fn available(&self) -> bool {
        self.weight() > 0 && !self.is_retired() && self.health.available()
    }
}
