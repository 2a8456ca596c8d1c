//! One backend server: its identity (an address within an upstream) and its live state.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::metrics::{AdminState, BackendMetrics};
use crate::upstream::health::Health;

/// One backend server and its live state. Keyed by (upstream, address): a reload that
/// keeps the backend keeps this object, so its health, active count and metric handles
/// carry over into the new snapshot.
pub struct Backend {
    pub address: SocketAddr,
    /// From the latest config; 0 means no new connections.
    weight: AtomicU32,
    /// An operator's weight (`sluice ctl weight`), in force over the configured one;
    /// [`NO_OVERRIDE`] when there is none.
    weight_override: AtomicU32,
    /// An operator's [`AdminState`] as its index: anything but ready takes no new
    /// connections, maint also pauses the health checks.
    admin: AtomicU8,
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
    /// The shutdown cut that `removed` is a child of: a relay stopped through
    /// `removed` tells the cut from a removal by asking it. Kept here, once per backend,
    /// so that an open connection need not hold the cut itself.
    pub cut: CancellationToken,
    /// What the relays of connections opened now wait on: a child of `removed`, replaced
    /// by a fresh one each time an operator closes the backend's connections, so that
    /// closing them (`sluice ctl close`, maint with close) does not retire the backend.
    sessions: ArcSwap<CancellationToken>,
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

/// The value of `weight_override` when no operator set a weight.
const NO_OVERRIDE: u32 = u32::MAX;

impl Backend {
    /// `cut` is the shutdown drain's deadline: [`Backend::removed`] is its child.
    pub fn new(
        address: SocketAddr,
        weight: u32,
        metrics: BackendMetrics,
        cut: &CancellationToken,
    ) -> Backend {
        metrics.up.set(1);
        metrics.weight.set(i64::from(weight));
        let removed = cut.child_token();
        Backend {
            address,
            weight: AtomicU32::new(weight),
            weight_override: AtomicU32::new(NO_OVERRIDE),
            admin: AtomicU8::new(AdminState::Ready as u8),
            active: AtomicU64::new(0),
            health: Health::default(),
            metrics,
            retired: AtomicBool::new(false),
            sessions: ArcSwap::from_pointee(removed.child_token()),
            removed,
            cut: cut.clone(),
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

    /// The effective weight: an operator's override, else the configured weight.
    pub fn weight(&self) -> u32 {
        match self.weight_override.load(Ordering::Relaxed) {
            NO_OVERRIDE => self.weight.load(Ordering::Relaxed),
            w => w,
        }
    }

    /// The weight the config gives (what a reload sets).
    pub fn configured_weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    /// Sets the configured weight; an override stays in force over it.
    pub fn set_weight(&self, weight: u32) {
        self.weight.store(weight, Ordering::Relaxed);
        self.metrics.weight.set(i64::from(self.weight()));
    }

    /// The operator's weight, if one is set.
    pub fn weight_override(&self) -> Option<u32> {
        match self.weight_override.load(Ordering::Relaxed) {
            NO_OVERRIDE => None,
            w => Some(w),
        }
    }

    /// Sets or clears the operator's weight. The caller rebuilds the balancer
    /// ([`crate::upstream::pool::Pool::rebalance`]) for the algorithms that keep tables.
    pub fn set_weight_override(&self, weight: Option<u32>) {
        let stored = weight.map_or(NO_OVERRIDE, |w| w.min(NO_OVERRIDE - 1));
        let before = self.weight();
        self.weight_override.store(stored, Ordering::Relaxed);
        self.metrics.weight.set(i64::from(self.weight()));
        if before == 0 && self.weight() > 0 {
            // Back from weight 0: slow start ramps it.
            self.start_ramp();
        }
    }

    pub fn admin_state(&self) -> AdminState {
        match self.admin.load(Ordering::Relaxed) {
            x if x == AdminState::Drain as u8 => AdminState::Drain,
            x if x == AdminState::Maint as u8 => AdminState::Maint,
            _ => AdminState::Ready,
        }
    }

    /// Sets the operator's admin state; returns the state before.
    pub fn set_admin_state(&self, state: AdminState) -> AdminState {
        let before = self.admin_state();
        self.admin.store(state as u8, Ordering::Relaxed);
        self.metrics.set_admin_state(state);
        if before != AdminState::Ready && state == AdminState::Ready {
            // Made ready again: slow start ramps it like a backend that came back up.
            self.start_ramp();
        }
        before
    }

    /// The token a relay opened now waits on (one load, no lock).
    pub fn sessions(&self) -> Arc<CancellationToken> {
        self.sessions.load_full()
    }

    /// Closes every connection open to this backend now, and keeps the backend in
    /// service: later connections wait on a fresh token.
    pub fn close_sessions(&self) {
        let old = self.sessions.swap(Arc::new(self.removed.child_token()));
        crate::shutdown::cancel(&old);
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
        self.metrics.up.set(i64::from(self.up()));
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }

    /// Connections open or being opened to this backend now.
    pub fn active(&self) -> u64 {
        // SeqCst, paired with the queue's `waiting` count: see queue.rs.
        self.active.load(Ordering::SeqCst)
    }

    /// What `sluice_backend_up` exports: in the config with a configured weight above
    /// zero, checks pass, not ejected. An operator's drain, maint or weight is left out
    /// (it has `sluice_backend_admin_state` and `sluice_backend_weight`), so planned
    /// maintenance does not page as a backend down.
    pub fn up(&self) -> bool {
        self.configured_weight() > 0 && !self.is_retired() && self.health.available()
    }

    /// Takes new connections: in the config, weight above zero, admin state ready, up,
    /// not ejected.
    pub fn available(&self) -> bool {
        self.weight() > 0
            && !self.is_retired()
            && self.admin.load(Ordering::Relaxed) == AdminState::Ready as u8
            && self.health.available()
    }
}
