//! Active health checks: one task per backend of an upstream with `health_check`,
//! connecting as real traffic does (PROXY header, TLS), optionally sending and expecting
//! a reply, and moving the backend's verdict after `rise` passes or `fall` failures.
//!
//! A check asks for its upstream as configured now through [`Current`], which the
//! control plane gives it, so a reload's TLS or PROXY change applies to the next probe.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{sleep, timeout};
use tokio_util::sync::CancellationToken;

use crate::config;
use crate::metrics::CheckResult;
use crate::shutdown;
use crate::stream::BackendStream;
use crate::upstream::backend::Backend;
use crate::upstream::connect::{Header, Upstream};

/// The upstream of this name as configured now, if the config still has it.
pub type Current = Arc<dyn Fn(&str) -> Option<Arc<Upstream>> + Send + Sync>;

/// How long a TLS check without `expect` waits for an alert after the handshake.
const ALERT_WAIT: Duration = Duration::from_millis(200);

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
    /// Starts, keeps or stops check tasks so that they match `upstreams`. A backend whose
    /// check settings did not change keeps its task, and with it its rise/fall counts.
    pub fn reconcile(
        &mut self,
        upstreams: &[Arc<Upstream>],
        current: &Current,
        stop: &CancellationToken,
    ) {
        let mut wanted = HashSet::new();
        for upstream in upstreams {
            for backend in upstream.backends() {
                let key = (upstream.name.clone(), backend.address);
                let Some(check) = &upstream.health_check else {
                    // Checks were turned off: stop the task first, so that a probe in
                    // flight cannot mark the backend down again, then count it up.
                    if let Some((_, old)) = self.running.remove(&key) {
                        shutdown::cancel(&old);
                    }
                    if !backend.health.is_up() {
                        backend.health.set_up(true);
                        backend.start_ramp();
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
                    Arc::clone(current),
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
    current: Current,
) {
    // A transition may let queued clients in: tell the upstream as it is configured now.
    let changed = |backend: &Backend| match current(&upstream) {
        Some(u) => u.availability_changed(backend),
        None => backend.metrics.up.set(i64::from(backend.up())),
    };
    // Start at a random point of the first interval, and vary each interval by ±10%, so
    // many sluice instances (and many backends) are not checked in step.
    sleep(check.interval.mul_f64(fastrand::f64())).await;
    let (mut passes, mut fails) = (0u32, 0u32);
    loop {
        // Paused while an operator holds the backend in maint: its verdict stays as it was.
        if backend.admin_state() == crate::metrics::AdminState::Maint {
            sleep(check.interval).await;
            continue;
        }
        // The upstream as configured now: its TLS and PROXY settings may have changed.
        let result = match current(&upstream) {
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
        backend
            .health
            .record_check(counted, result.as_ref().err().map(ToString::to_string));
        match result {
            Ok(()) => {
                fails = 0;
                passes = passes.saturating_add(1);
                if !backend.health.is_up() && passes >= check.rise {
                    backend.health.set_up(true);
                    backend.start_ramp();
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
    address: SocketAddr,
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
