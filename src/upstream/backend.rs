//! One backend server: its identity (an address within an upstream) and its live state.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

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
    /// Slow start: the upstream's window in ms (0: off) and when the current ramp
    /// began, in ms on [`ramp_clock`] (0: no ramp).
    slow_start_ms: AtomicU64,
    ramp_started: AtomicU64,
}

/// What [`Backend::balance_weight`] multiplies a weight by, so that a ramp's fraction
/// survives in integer weights (the balancers compare weights only with each other).
pub const RAMP_SCALE: u32 = 1000;
/// A ramp starts at this fraction of the weight (Envoy's default minimum, 10%).
const RAMP_FLOOR: f64 = 0.1;

/// Milliseconds since first use, never 0: a monotonic clock that fits an atomic.
fn ramp_clock() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
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
            slow_start_ms: AtomicU64::new(0),
            ramp_started: AtomicU64::new(0),
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

    /// Sets the upstream's `slow_start` window (from each config).
    pub fn set_slow_start(&self, window: Option<Duration>) {
        let ms = window.map_or(0, |w| u64::try_from(w.as_millis()).unwrap_or(u64::MAX));
        self.slow_start_ms.store(ms, Ordering::Relaxed);
    }

    /// The backend just became eligible (up after down, back from an ejection, added or
    /// revived by a reload): ramp its weight from now, if its upstream has slow start.
    pub fn start_ramp(&self) {
        if self.slow_start_ms.load(Ordering::Relaxed) > 0 {
            self.ramp_started.store(ramp_clock(), Ordering::Relaxed);
        }
    }

    /// The fraction of its weight the backend gets now: from 0.1 up to 1 over the
    /// slow-start window after [`Backend::start_ramp`], else 1.
    pub fn ramp_fraction(&self) -> f64 {
        let started = self.ramp_started.load(Ordering::Relaxed);
        if started == 0 {
            return 1.0;
        }
        let window = self.slow_start_ms.load(Ordering::Relaxed);
        let elapsed = ramp_clock().saturating_sub(started);
        if window == 0 || elapsed >= window {
            // Over: later reads skip the clock.
            self.ramp_started.store(0, Ordering::Relaxed);
            return 1.0;
        }
        (elapsed as f64 / window as f64).max(RAMP_FLOOR)
    }

    /// Scales `weight` by the ramp, in units of 1/[`RAMP_SCALE`]: the one place a
    /// weight becomes what balancers compare. (A runtime weight override composes by
    /// being the `weight` passed here.)
    pub fn ramp(&self, weight: u32) -> u32 {
        let scaled = weight.saturating_mul(RAMP_SCALE);
        let f = self.ramp_fraction();
        if f >= 1.0 || weight == 0 {
            return scaled;
        }
        ((f64::from(scaled) * f) as u32).max(1)
    }

    /// The weight the balancers read: [`Backend::weight`] ramped.
    pub fn balance_weight(&self) -> u32 {
        self.ramp(self.weight())
    }

    /// The weight in use now in the config's units, for the metric.
    pub fn effective_weight(&self) -> f64 {
        f64::from(self.balance_weight()) / f64::from(RAMP_SCALE)
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
