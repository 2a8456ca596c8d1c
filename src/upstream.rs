//! Upstreams and their backends: pick with the balancer among available backends, take
//! a connection slot (waiting in the queue when every backend is at its limit), connect
//! with a timeout, and on failure try another backend, up to `retries` more times.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{Instant, sleep, timeout};

use crate::balance::{self, Balance};
use crate::config;
use crate::health::Health;
use crate::metrics::{BackendMetrics, ConnectFailure, Metrics, UpstreamMetrics};
use crate::queue::Queue;

/// Keepalive on both sides of a proxied connection, so a peer that vanished without a
/// FIN (a rebooted host, a dropped NAT entry) is noticed within about three minutes.
pub const KEEPALIVE: socket2::TcpKeepalive = socket2::TcpKeepalive::new()
    .with_time(Duration::from_secs(120))
    .with_interval(Duration::from_secs(15))
    .with_retries(4);

/// A named group of backends that serves one kind of traffic.
pub struct Upstream {
    pub name: String,
    pub backends: Vec<Backend>,
    balancer: Box<dyn Balance>,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub retries: u32,
    /// Per-backend cap; `None` for unlimited backends (then there is no queue).
    limit: Option<u64>,
    queue: Option<Queue>,
    pub health_check: Option<config::HealthCheck>,
    passive_ejection: Option<config::PassiveEjection>,
    pub max_lifetime: Option<config::Lifetime>,
    metrics: UpstreamMetrics,
}

/// One backend server and its live state.
pub struct Backend {
    pub address: SocketAddr,
    pub weight: u32,
    /// Connections open or being opened to this backend: the balancers read this count,
    /// the per-backend limit caps it, and the gauge mirrors it.
    active: AtomicU64,
    pub health: Health,
    pub metrics: BackendMetrics,
}

/// A connection slot on a backend; dropping it frees the slot for the next waiter.
pub struct Lease {
    upstream: Arc<Upstream>,
    index: usize,
}

/// Why no backend connection could be made for a client.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no backend is available (all down, ejected or weight 0)")]
    NoHealthyBackend,
    #[error("every backend is at its connection limit and the queue is full")]
    QueueFull,
    #[error("waited in the queue for longer than its timeout")]
    QueueTimeout,
    #[error("{attempts} connect attempt(s) failed, last to {backend}: {cause}")]
    Unavailable {
        attempts: u32,
        backend: SocketAddr,
        cause: String,
    },
}

impl Upstream {
    pub fn new(cfg: &config::Upstream, metrics: &Metrics) -> Upstream {
        let m = metrics.upstream(&cfg.name);
        let queue = cfg.max_connections_per_backend.map(|_| {
            Queue::new(
                cfg.queue.max,
                cfg.queue.timeout,
                m.queue_length.clone(),
                m.queue_wait.clone(),
            )
        });
        Upstream {
            name: cfg.name.clone(),
            backends: cfg
                .backends
                .iter()
                .map(|b| {
                    let metrics = metrics.backend(&cfg.name, &b.address.to_string());
                    metrics.up.set(1);
                    Backend {
                        address: b.address,
                        weight: b.weight,
                        active: AtomicU64::new(0),
                        health: Health::default(),
                        metrics,
                    }
                })
                .collect(),
            balancer: balance::for_upstream(cfg.balance, &cfg.backends),
            connect_timeout: cfg.connect_timeout,
            idle_timeout: cfg.idle_timeout,
            retries: cfg.retries,
            limit: cfg.max_connections_per_backend,
            queue,
            health_check: cfg.health_check.clone(),
            passive_ejection: cfg.passive_ejection,
            max_lifetime: cfg.max_lifetime,
            metrics: m,
        }
    }

    /// Connects to a backend for `client`, trying a different backend after each failure.
    pub async fn connect(
        self: &Arc<Self>,
        client: SocketAddr,
    ) -> Result<(TcpStream, Lease), ConnectError> {
        // Backends tried for this client; configs are small, so a linear scan is cheapest.
        let mut tried: Vec<usize> = Vec::new();
        let mut last: Option<(SocketAddr, String)> = None;
        let mut cursor = None;
        for _ in 0..=self.retries {
            let slot = match &self.queue {
                Some(q) => q.acquire(self, client, &tried, &mut cursor).await?,
                None => {
                    let slot = self.take_slot(client, &tried, &mut cursor);
                    if slot.is_none() && tried.is_empty() {
                        return Err(ConnectError::NoHealthyBackend);
                    }
                    slot
                }
            };
            let Some(i) = slot else { break };
            let lease = Lease {
                upstream: Arc::clone(self),
                index: i,
            };
            tried.push(i);
            let backend = &self.backends[i];
            let started = Instant::now();
            let failure = match timeout(self.connect_timeout, connect_to(backend.address)).await {
                Ok(Ok(stream)) => {
                    self.metrics
                        .connect_duration
                        .observe(started.elapsed().as_secs_f64());
                    backend.health.connect_succeeded();
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
            if let Some(length) = backend
                .health
                .connect_failed(self.passive_ejection.as_ref())
            {
                self.ejected(i, length);
            }
            last = Some((backend.address, failure.1));
        }
        match last {
            None => Err(ConnectError::NoHealthyBackend),
            Some((backend, cause)) => Err(ConnectError::Unavailable {
                attempts: tried.len() as u32,
                backend,
                cause,
            }),
        }
    }

    /// Picks an available, untried backend with room and takes a slot on it.
    pub(crate) fn take_slot(
        &self,
        client: SocketAddr,
        tried: &[usize],
        cursor: &mut Option<usize>,
    ) -> Option<usize> {
        let limit = self.limit.unwrap_or(u64::MAX);
        let eligible = |i: usize| {
            let b = &self.backends[i];
            b.available() && b.active() < limit && !tried.contains(&i)
        };
        let i = self
            .balancer
            .pick(&self.backends, client, cursor, &eligible)?;
        let b = &self.backends[i];
        b.active.fetch_add(1, Ordering::Relaxed);
        b.metrics.active.inc();
        Some(i)
    }

    /// Frees a slot taken by [`Upstream::take_slot`] (without waking waiters).
    pub(crate) fn return_slot(&self, i: usize) {
        let b = &self.backends[i];
        b.active.fetch_sub(1, Ordering::Relaxed);
        b.metrics.active.dec();
    }

    /// Whether any backend not in `tried` could take a connection if it had room.
    pub(crate) fn any_available(&self, tried: &[usize]) -> bool {
        (0..self.backends.len()).any(|i| self.backends[i].available() && !tried.contains(&i))
    }

    /// A backend went up or down: update its gauge and let waiters use new room.
    pub fn availability_changed(&self, i: usize) {
        let b = &self.backends[i];
        b.metrics.up.set(i64::from(b.health.available()));
        if let Some(q) = &self.queue {
            q.dispatch(self);
        }
    }

    fn ejected(self: &Arc<Self>, i: usize, length: Duration) {
        let b = &self.backends[i];
        b.metrics.ejections.inc();
        tracing::warn!(upstream = %self.name, backend = %b.address, seconds = length.as_secs_f64(), "backend ejected after consecutive connect failures");
        self.availability_changed(i);
        let upstream = Arc::clone(self);
        tokio::spawn(async move {
            sleep(length).await;
            upstream.availability_changed(i);
        });
    }
}

impl Backend {
    /// A backend outside any upstream, with `active` connections, for balancer tests.
    #[cfg(test)]
    pub fn for_test(address: SocketAddr, weight: u32, active: u64) -> Backend {
        let metrics = Metrics::new().expect("a fresh registry").backend("t", "t");
        Backend {
            address,
            weight,
            active: AtomicU64::new(active),
            health: Health::default(),
            metrics,
        }
    }

    /// Connections open or being opened to this backend now.
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    /// Takes new connections: weight above zero, up, not ejected.
    pub fn available(&self) -> bool {
        self.weight > 0 && self.health.available()
    }
}

impl Lease {
    pub fn backend(&self) -> &Backend {
        &self.upstream.backends[self.index]
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.upstream.return_slot(self.index);
        if let Some(q) = &self.upstream.queue {
            q.dispatch(&self.upstream);
        }
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
