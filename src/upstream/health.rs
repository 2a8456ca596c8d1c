//! Backend health: active checks (connect, optional send/expect, rise/fall) and passive
//! ejection after consecutive connect failures of real traffic.
//!
//! A backend is *available* when its active verdict is up and it is not ejected.
//! Connections read that through atomics; only the check tasks and failed connects
//! write it.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{sleep, timeout};
use tokio_util::sync::CancellationToken;

use crate::config::{self, PassiveEjection};
use crate::metrics::CheckResult;
use crate::shutdown;
use crate::snapshot::{Snapshot, SnapshotHandle};
use crate::stream::BackendStream;
use crate::upstream::{Backend, Header, Upstream};

/// How long a TLS check without `expect` waits for an alert after the handshake.
const ALERT_WAIT: Duration = Duration::from_millis(200);

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
}

impl Default for Health {
    fn default() -> Health {
        Health {
            up: AtomicBool::new(true),
            failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
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

    fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Relaxed);
    }
}

/// Why one active check failed.
#[derive(Debug, thiserror::Error)]
enum CheckFailure {
    #[error("timed out")]
    Timeout,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Connect(String),
    #[error("the upstream was removed")]
    Removed,
    #[error("the backend closed the connection right after the TLS handshake")]
    ClosedAfterHandshake,
    #[error("reply {got:?} does not start with the expected {expected:?}")]
    Mismatch { got: String, expected: String },
}

/// The running check tasks, one per (upstream, backend address) with checks configured.
#[derive(Default)]
pub struct Checks {
    running: HashMap<(String, SocketAddr), (config::HealthCheck, CancellationToken)>,
}

impl Checks {
    /// Starts, keeps or stops check tasks so that they match `snapshot`. A backend whose
    /// check settings did not change keeps its task, and with it its rise/fall counts.
    pub fn reconcile(
        &mut self,
        snapshot: &Snapshot,
        snapshots: &SnapshotHandle,
        stop: &CancellationToken,
    ) {
        let mut wanted = HashSet::new();
        for upstream in &snapshot.upstreams {
            for backend in &upstream.backends {
                let key = (upstream.name.clone(), backend.address);
                let Some(check) = &upstream.health_check else {
                    // Checks were turned off: stop the task first, so that a probe in
                    // flight cannot mark the backend down again, then count it up.
                    if let Some((_, old)) = self.running.remove(&key) {
                        shutdown::cancel(&old);
                    }
                    if !backend.health.is_up() {
                        backend.health.set_up(true);
                        upstream.availability_changed(backend);
                    }
                    continue;
                };
                wanted.insert(key.clone());
                if self.running.get(&key).is_some_and(|(c, _)| c == check) {
                    continue;
                }
                if let Some((_, old)) = self.running.remove(&key) {
                    shutdown::cancel(&old);
                }
                let token = stop.child_token();
                let task = check_loop(
                    Arc::clone(backend),
                    check.clone(),
                    upstream.name.clone(),
                    Arc::clone(snapshots),
                );
                let cancelled = token.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        // Cancellation wins over a probe that finished at the same time.
                        biased;
                        () = cancelled.cancelled() => {},
                        () = task => {},
                    }
                });
                self.running.insert(key, (check.clone(), token));
            }
        }
        self.running.retain(|key, (_, token)| {
            let keep = wanted.contains(key);
            if !keep {
                shutdown::cancel(token);
            }
            keep
        });
    }
}

async fn check_loop(
    backend: Arc<Backend>,
    check: config::HealthCheck,
    upstream: String,
    snapshots: SnapshotHandle,
) {
    // A transition may let queued clients in: tell the upstream as it is configured now.
    let changed = |backend: &Backend| match snapshots.load().upstream(&upstream) {
        Some(u) => u.availability_changed(backend),
        None => backend.metrics.up.set(i64::from(backend.available())),
    };
    // Start at a random point of the first interval, and vary each interval by ±10%, so
    // many sluice instances (and many backends) are not checked in step.
    sleep(check.interval.mul_f64(fastrand::f64())).await;
    let (mut passes, mut fails) = (0u32, 0u32);
    loop {
        // The upstream as configured now: its TLS and PROXY settings may have changed.
        let result = match snapshots.load().upstream(&upstream).cloned() {
            None => Err(CheckFailure::Removed),
            Some(u) => match timeout(check.timeout, probe(&u, backend.address, &check)).await {
                Ok(r) => r,
                Err(_) => Err(CheckFailure::Timeout),
            },
        };
        let counted = match &result {
            Ok(()) => CheckResult::Success,
            Err(CheckFailure::Timeout) => CheckResult::Timeout,
            Err(_) => CheckResult::Failure,
        };
        backend.metrics.health_check(counted).inc();
        match result {
            Ok(()) => {
                fails = 0;
                passes = passes.saturating_add(1);
                if !backend.health.is_up() && passes >= check.rise {
                    backend.health.set_up(true);
                    tracing::info!(upstream = %upstream, backend = %backend.address, "backend up: passed {passes} checks");
                    changed(&backend);
                }
            }
            Err(e) => {
                passes = 0;
                fails = fails.saturating_add(1);
                if backend.health.is_up() && fails >= check.fall {
                    backend.health.set_up(false);
                    tracing::warn!(upstream = %upstream, backend = %backend.address, error = %e, "backend down: failed {fails} checks");
                    changed(&backend);
                } else {
                    tracing::debug!(upstream = %upstream, backend = %backend.address, error = %e, "health check failed");
                }
            }
        }
        sleep(check.interval.mul_f64(0.9 + 0.2 * fastrand::f64())).await;
    }
}

/// One check: connect (with the upstream's PROXY header and TLS), then send and expect
/// a reply prefix if configured.
async fn probe(
    upstream: &Upstream,
    address: std::net::SocketAddr,
    check: &config::HealthCheck,
) -> Result<(), CheckFailure> {
    let header = if check.send_proxy_protocol {
        Header::Local
    } else {
        Header::None
    };
    let mut stream = upstream
        .open(address, header)
        .await
        .map_err(|(_, e)| CheckFailure::Connect(e))?;
    if !check.send.is_empty() {
        stream.write_all(&check.send).await?;
        stream.flush().await?;
    }
    if check.expect.is_empty() && matches!(stream, BackendStream::Tls(_)) {
        // A TLS 1.3 server checks sluice's client certificate after sluice's side of
        // the handshake is done, and refuses it with an alert: give the alert a moment
        // to arrive, so an expired or untrusted client certificate fails the check.
        let mut probe = [0u8; 1];
        match timeout(ALERT_WAIT.min(check.timeout / 2), stream.read(&mut probe)).await {
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok(0)) => return Err(CheckFailure::ClosedAfterHandshake),
            Ok(Ok(_)) | Err(_) => {}
        }
    }
    if !check.expect.is_empty() {
        let mut got = vec![0u8; check.expect.len()];
        let mut filled = 0;
        while filled < got.len() {
            match stream.read(&mut got[filled..]).await? {
                0 => break,
                n => filled += n,
            }
        }
        if got[..filled] != check.expect[..] {
            return Err(CheckFailure::Mismatch {
                got: String::from_utf8_lossy(&got[..filled]).into_owned(),
                expected: String::from_utf8_lossy(&check.expect).into_owned(),
            });
        }
    }
    Ok(())
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
