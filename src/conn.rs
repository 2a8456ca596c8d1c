//! One client connection, from accept to close: pick a backend, connect, relay, record.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::access_log;
use crate::listener::Permit;
use crate::metrics::RejectReason;
use crate::relay::{self, Counters};
use crate::snapshot::Snapshot;
use crate::upstream::{ConnectError, KEEPALIVE};

/// A connection's slots: the listener's `max_connections` and the process-wide cap.
pub type Permits = (Permit, OwnedSemaphorePermit);

/// Serves one accepted client connection to its end. `_permits` are released when this
/// returns.
pub async fn handle(
    client: TcpStream,
    peer: SocketAddr,
    snapshot: Arc<Snapshot>,
    listener: Arc<str>,
    stop: CancellationToken,
    _permits: Permits,
) {
    let Some(route) = snapshot.route(&listener) else {
        // The listener was removed from the config between accept and here.
        return;
    };
    let m = &route.metrics;
    let started = Instant::now();
    m.accepted.inc();
    m.active.inc();
    let _active = scopeguard(|| m.active.dec());

    let sock = socket2::SockRef::from(&client);
    if let Err(e) = sock
        .set_tcp_keepalive(&KEEPALIVE)
        .and_then(|()| client.set_nodelay(true))
    {
        tracing::debug!(listener = %listener, client = %peer, error = %e, "cannot set socket options");
    }

    let upstream = &route.upstream;
    let connected = tokio::select! {
        c = upstream.connect(peer) => c.map_err(Some),
        () = client_gone(&client) => Err(None),
        () = stop.cancelled() => return,
    };
    let (backend, lease) = match connected {
        Ok(c) => c,
        Err(e) => {
            let reason = match &e {
                None => RejectReason::ClientLeft,
                Some(ConnectError::NoHealthyBackend) => RejectReason::NoHealthyBackend,
                Some(ConnectError::QueueFull) => RejectReason::QueueFull,
                Some(ConnectError::QueueTimeout) => RejectReason::QueueTimeout,
                Some(ConnectError::Unavailable { .. }) => RejectReason::UpstreamUnavailable,
            };
            let e = e.map_or_else(
                || "the client closed its connection".to_string(),
                |e| e.to_string(),
            );
            m.rejected(reason).inc();
            m.duration.observe(started.elapsed().as_secs_f64());
            if let Some(log) = &snapshot.access_log {
                log.record(&access_log::Entry {
                    listener: &listener,
                    client: peer,
                    upstream: &upstream.name,
                    backend: None,
                    bytes_in: 0,
                    bytes_out: 0,
                    duration: started.elapsed(),
                    reason: reason.as_str(),
                });
            }
            tracing::warn!(listener = %listener, client = %peer, upstream = %upstream.name, reason = reason.as_str(), error = %e, "connection rejected");
            return;
        }
    };

    // Spread the lifetimes so connections opened together do not all close together.
    let lifetime = upstream
        .max_lifetime
        .map(|l| l.max + l.jitter.mul_f64(fastrand::f64()));
    let outcome = relay::relay(
        &client,
        &backend,
        relay::Limits {
            idle: upstream.idle_timeout,
            lifetime,
        },
        relay::Stops {
            shutdown: &stop,
            removed: &lease.backend().removed,
        },
        Counters {
            client_to_backend: &m.client_to_backend,
            backend_to_client: &m.backend_to_client,
        },
    )
    .await;
    let duration = started.elapsed();
    m.duration.observe(duration.as_secs_f64());
    if let Some(log) = &snapshot.access_log {
        log.record(&access_log::Entry {
            listener: &listener,
            client: peer,
            upstream: &upstream.name,
            backend: Some(lease.backend().address),
            bytes_in: outcome.client_to_backend,
            bytes_out: outcome.backend_to_client,
            duration,
            reason: outcome.end.as_str(),
        });
    }
    tracing::info!(
        listener = %listener,
        client = %peer,
        upstream = %upstream.name,
        backend = %lease.backend().address,
        bytes_in = outcome.client_to_backend,
        bytes_out = outcome.backend_to_client,
        duration_ms = duration.as_millis() as u64,
        reason = outcome.end.as_str(),
        "connection closed"
    );
}

/// Resolves when the client has left before a backend was reached: it reset, or it
/// sent FIN with nothing unread. A FIN after data may be a half-close by a client that
/// still waits for its answer, so that client is kept; while its data waits unread,
/// the check repeats every 250 ms (for a reset, through the socket's pending error)
/// instead of spinning on readiness.
async fn client_gone(client: &TcpStream) {
    let mut probe = [0u8; 1];
    loop {
        match client.peek(&mut probe).await {
            Ok(0) | Err(_) => return,
            // With data unread, peek keeps returning it even after a reset; the socket's
            // pending error shows the reset.
            Ok(_) if !matches!(client.take_error(), Ok(None)) => return,
            Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(250)).await,
        }
    }
}

/// Runs `f` when dropped, so a gauge is restored on every return path.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
