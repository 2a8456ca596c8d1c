//! A backend's health as atomics: the active checks' verdict (written by `check.rs`) and
//! passive ejection after consecutive connect failures of real traffic.
//!
//! A backend is *available* when its active verdict is up and it is not ejected.
//! Connections read that through atomics; only the check tasks and failed connects
//! write it.
//!
//! For the status page (`control/status/`) it also keeps, off the connection path, when
//! the active verdict last changed and the last check's result: the check tasks write
//! those, the admin endpoint reads them.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;

use crate::config::PassiveEjection;
use crate::metrics::CheckResult;

/// The health of one backend.
#[derive(Debug)]
pub struct Health {
    /// The active checks' verdict; always true when the upstream has no checks.
    up: AtomicBool,
    /// Failed connects from real traffic since the last success.
    failures: AtomicU32,
    /// Ejections since the last successful connect: the back-off's exponent.
    ejections: AtomicU32,
    /// End of the current ejection in ms after [`origin`]; 0 when not ejected.
    ejected_until: AtomicU64,
    /// Unix time (ms) of the last change of the active verdict, or of the backend's
    /// creation if it never changed: the status page's "since".
    changed_at: AtomicU64,
    /// The last active check's outcome; written by the check task once per interval.
    last_check: ArcSwapOption<LastCheck>,
}

/// One active check's outcome, as the status page shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastCheck {
    /// Unix time (ms) the check finished.
    pub at_ms: u64,
    pub result: CheckResult,
    /// Why it failed; `None` on success.
    pub error: Option<String>,
}

/// Now as Unix milliseconds.
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Default for Health {
    fn default() -> Health {
        Health {
            up: AtomicBool::new(true),
            failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            changed_at: AtomicU64::new(unix_ms()),
            last_check: ArcSwapOption::empty(),
        }
    }
}

/// Milliseconds since the first call: a cheap monotonic clock that fits an atomic.
fn now_ms() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

impl Health {
    pub fn available(&self) -> bool {
        self.up.load(Ordering::Relaxed) && now_ms() >= self.ejected_until.load(Ordering::Relaxed)
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn connect_succeeded(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.ejections.load(Ordering::Relaxed) != 0 {
            self.ejections.store(0, Ordering::Relaxed);
        }
    }

    /// Records a failed connect; returns the ejection's length if this one ejects.
    pub fn connect_failed(&self, policy: Option<&PassiveEjection>) -> Option<Duration> {
        let policy = policy?;
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < policy.failures {
            return None;
        }
        self.failures.store(0, Ordering::Relaxed);
        let exponent = self.ejections.fetch_add(1, Ordering::Relaxed).min(20);
        let length = policy
            .duration
            .saturating_mul(1 << exponent)
            .min(policy.max_duration);
        self.ejected_until
            .store(now_ms() + length.as_millis() as u64, Ordering::Relaxed);
        Some(length)
    }

    pub(crate) fn set_up(&self, up: bool) {
        if self.up.swap(up, Ordering::Relaxed) != up {
            self.changed_at.store(unix_ms(), Ordering::Relaxed);
        }
    }

    /// Unix time (ms) the active verdict last changed (or the backend was created).
    pub fn changed_at_ms(&self) -> u64 {
        self.changed_at.load(Ordering::Relaxed)
    }

    /// How much longer the current ejection lasts; `None` when not ejected.
    pub fn ejected_for(&self) -> Option<Duration> {
        let until = self.ejected_until.load(Ordering::Relaxed);
        let now = now_ms();
        (until > now).then(|| Duration::from_millis(until - now))
    }

    /// Connect failures of real traffic in a row, since the last success.
    pub fn consecutive_failures(&self) -> u32 {
        self.failures.load(Ordering::Relaxed)
    }

    pub(crate) fn record_check(&self, result: CheckResult, error: Option<String>) {
        self.last_check.store(Some(std::sync::Arc::new(LastCheck {
            at_ms: unix_ms(),
            result,
            error,
        })));
    }

    /// The last active check's outcome, if a check has run.
    pub fn last_check(&self) -> Option<std::sync::Arc<LastCheck>> {
        self.last_check.load_full()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejection_grows_and_resets_after_a_success() {
        let policy = PassiveEjection {
            failures: 2,
            duration: Duration::from_secs(10),
            max_duration: Duration::from_secs(25),
        };
        let h = Health::default();
        assert_eq!(h.connect_failed(Some(&policy)), None);
        assert_eq!(
            h.connect_failed(Some(&policy)),
            Some(Duration::from_secs(10))
        );
        assert!(!h.available());
        h.connect_failed(Some(&policy));
        assert_eq!(
            h.connect_failed(Some(&policy)),
            Some(Duration::from_secs(20))
        );
        h.connect_failed(Some(&policy));
        assert_eq!(
            h.connect_failed(Some(&policy)),
            Some(Duration::from_secs(25)),
            "capped"
        );
        h.connect_succeeded();
        h.connect_failed(Some(&policy));
        assert_eq!(
            h.connect_failed(Some(&policy)),
            Some(Duration::from_secs(10)),
            "reset"
        );
        assert_eq!(Health::default().connect_failed(None), None, "off");
    }
}
