//! Upstreams and their backends: pick with the balancer, connect with a timeout, and on
//! failure try another backend, up to `retries` more times.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{Instant, timeout};

use crate::balance::{self, Balance};
use crate::config;
use crate::metrics::{BackendMetrics, ConnectFailure, Metrics, UpstreamMetrics};

/// Keepalive on both sides of a proxied connection, so a peer that vanished without a
/// FIN (a rebooted host, a dropped NAT entry) is noticed within about three minutes.
pub const KEEPALIVE: socket2::TcpKeepalive = socket2::TcpKeepalive::new()
    .with_time(Duration::from_secs(120))
    .with_interval(Duration::from_secs(15))
    .with_retries(4);

/// A named group of backends that serves one kind of traffic.
pub struct Upstream {
    pub name: String,
    pub backends: Vec<Arc<Backend>>,
    balancer: Box<dyn Balance>,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub retries: u32,
    metrics: UpstreamMetrics,
}

/// One backend server and its live state.
pub struct Backend {
    pub address: SocketAddr,
    pub weight: u32,
    /// Connections open or being opened to this backend: the balancers read this count,
    /// and the gauge mirrors it.
    active: AtomicU64,
    metrics: BackendMetrics,
}

/// A connection slot on a backend; dropping it releases the slot.
pub struct Lease {
    backend: Arc<Backend>,
}

/// Why no backend connection could be made for a client.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no backend can take connections (every weight is 0)")]
    NoBackend,
    #[error("{attempts} connect attempt(s) failed, last to {backend}: {cause}")]
    Unavailable {
        attempts: u32,
        backend: SocketAddr,
        cause: String,
    },
}

impl Upstream {
    pub fn new(cfg: &config::Upstream, metrics: &Metrics) -> Upstream {
        Upstream {
            name: cfg.name.clone(),
            backends: cfg
                .backends
                .iter()
                .map(|b| {
                    Arc::new(Backend {
                        address: b.address,
                        weight: b.weight,
                        active: AtomicU64::new(0),
                        metrics: metrics.backend(&cfg.name, &b.address.to_string()),
                    })
                })
                .collect(),
            balancer: balance::for_upstream(cfg.balance, &cfg.backends),
            connect_timeout: cfg.connect_timeout,
            idle_timeout: cfg.idle_timeout,
            retries: cfg.retries,
            metrics: metrics.upstream(&cfg.name),
        }
    }

    /// Connects to a backend for `client`, trying a different backend after each failure.
    pub async fn connect(&self, client: SocketAddr) -> Result<(TcpStream, Lease), ConnectError> {
        // Backends tried for this client; configs are small, so a linear scan is cheapest.
        let mut tried: Vec<usize> = Vec::new();
        let mut last: Option<(SocketAddr, String)> = None;
        let mut cursor = None;
        for _ in 0..=self.retries {
            let eligible = |i: usize| self.backends[i].weight > 0 && !tried.contains(&i);
            let Some(i) = self
                .balancer
                .pick(&self.backends, client, &mut cursor, &eligible)
            else {
                break;
            };
            tried.push(i);
            let backend = &self.backends[i];
            let lease = backend.lease();
            let started = Instant::now();
            let failure = match timeout(self.connect_timeout, connect_to(backend.address)).await {
                Ok(Ok(stream)) => {
                    self.metrics
                        .connect_duration
                        .observe(started.elapsed().as_secs_f64());
                    return Ok((stream, lease));
                }
                Ok(Err(e)) => (ConnectFailure::of(&e), e.to_string()),
                Err(_) => (
                    ConnectFailure::Timeout,
                    format!("connect timed out after {:?}", self.connect_timeout),
                ),
            };
            backend.metrics.connect_error(failure.0).inc();
            tracing::debug!(upstream = %self.name, backend = %backend.address, reason = failure.0.as_str(), error = %failure.1, "connect failed");
            last = Some((backend.address, failure.1));
        }
        match last {
            None => Err(ConnectError::NoBackend),
            Some((backend, cause)) => Err(ConnectError::Unavailable {
                attempts: tried.len() as u32,
                backend,
                cause,
            }),
        }
    }
}

impl Backend {
    fn lease(self: &Arc<Self>) -> Lease {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.metrics.active.inc();
        Lease {
            backend: Arc::clone(self),
        }
    }

    /// Connections open or being opened to this backend now.
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }
}

impl Lease {
    pub fn backend(&self) -> &Backend {
        &self.backend
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.backend.active.fetch_sub(1, Ordering::Relaxed);
        self.backend.metrics.active.dec();
    }
}

async fn connect_to(address: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket2::SockRef::from(&socket).set_tcp_keepalive(&KEEPALIVE)?;
    socket.set_nodelay(true)?;
    socket.connect(address).await
}
