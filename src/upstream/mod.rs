//! Upstreams and their backends: pick with the balancer among available backends, take
//! a connection slot (waiting in the queue when every backend is at its limit), connect
//! with a timeout, and on failure try another backend, up to `retries` more times.

pub mod balance;
pub mod health;
pub mod queue;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use tokio::net::{TcpSocket, TcpStream};

use tokio::time::{Instant, sleep, timeout};

use crate::config::{self, ProxyVersion};
use crate::edge::proxy_protocol;
use crate::edge::tls::Origination;
use crate::metrics::{BackendMetrics, ConnectFailure, Metrics, UpstreamMetrics};
use crate::stream::BackendStream;
use crate::upstream::balance::Balance;
use crate::upstream::health::Health;
use crate::upstream::queue::Queue;

/// Keepalive on both sides of a proxied connection, so a peer that vanished without a
/// FIN (a rebooted host, a dropped NAT entry) is noticed within about three minutes.
pub const KEEPALIVE: socket2::TcpKeepalive = socket2::TcpKeepalive::new()
    .with_time(Duration::from_secs(120))
    .with_interval(Duration::from_secs(15))
    .with_retries(4);

/// A named group of backends that serves one kind of traffic.
pub struct Upstream {
    pub name: String,
    /// Shared with the snapshots before and after this one: see [`Backend`].
    pub backends: Vec<Arc<Backend>>,
    balancer: Box<dyn Balance>,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub retries: u32,
    /// Per-backend cap; `None` for unlimited backends (then there is no queue).
    limit: Option<u64>,
    /// Carried from snapshot to snapshot under the upstream's name; used for waiting
    /// only while the upstream has a per-backend limit.
    pub(crate) queue: Arc<Queue>,
    pub health_check: Option<config::HealthCheck>,
    passive_ejection: Option<config::PassiveEjection>,
    pub max_lifetime: Option<config::Lifetime>,
    pub on_backend_removed: config::BackendRemoved,
    /// TLS towards backends, loaded with the snapshot.
    tls: Option<Arc<Origination>>,
    send_proxy_protocol: Option<ProxyVersion>,
    metrics: UpstreamMetrics,
}

/// Which PROXY header [`Upstream::open`] sends, if the upstream sends them at all.
#[derive(Debug, Clone, Copy)]
pub enum Header {
    /// For a client's connection.
    Client(Ends),
    /// LOCAL (v2) or UNKNOWN (v1): a connection of sluice's own, a health check.
    Local,
    None,
}

/// The two ends of a client's connection as sluice knows them, after any PROXY header:
/// what a PROXY header to the backend carries.
#[derive(Debug, Clone, Copy)]
pub struct Ends {
    pub client: SocketAddr,
    /// The address the client connected to.
    pub local: SocketAddr,
}

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

/// A connection slot on a backend; dropping it frees the slot for the next waiter.
pub struct Lease {
    upstream: Arc<Upstream>,
    backend: Arc<Backend>,
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
    /// Builds the upstream for `cfg`, taking over the backends and the queue of
    /// `previous` (the same upstream in the snapshot before) where they still apply.
    pub fn new(
        cfg: &config::Upstream,
        metrics: &Metrics,
        previous: Option<&Upstream>,
        retired: &mut Vec<(String, Arc<Backend>)>,
        tls: Option<Arc<Origination>>,
        cut: &CancellationToken,
    ) -> Upstream {
        let m = metrics.upstream(&cfg.name);
        let queue = match previous {
            Some(p) => Arc::clone(&p.queue),
            None => Arc::new(Queue::new(
                cfg.queue.max,
                cfg.queue.timeout,
                m.queue_length.clone(),
                m.queue_wait.clone(),
            )),
        };
        queue.set_bounds(cfg.queue.max, cfg.queue.timeout);
        let backends = cfg
            .backends
            .iter()
            .map(|b| {
                let kept = previous
                    .and_then(|p| p.backends.iter().find(|old| old.address == b.address))
                    .cloned()
                    .or_else(|| revive(retired, &cfg.name, b.address));
                match kept {
                    Some(old) => {
                        old.weight.store(b.weight, Ordering::Relaxed);
                        old
                    }
                    None => Arc::new(Backend::new(
                        b.address,
                        b.weight,
                        metrics.backend(&cfg.name, &b.address.to_string()),
                        cut,
                    )),
                }
            })
            .collect();
        Upstream {
            name: cfg.name.clone(),
            backends,
            balancer: balance::for_upstream(cfg.balance, &cfg.backends),
            connect_timeout: cfg.connect_timeout,
            idle_timeout: cfg.idle_timeout,
            retries: cfg.retries,
            limit: cfg.max_connections_per_backend,
            queue,
            health_check: cfg.health_check.clone(),
            passive_ejection: cfg.passive_ejection,
            max_lifetime: cfg.max_lifetime,
            on_backend_removed: cfg.on_backend_removed,
            tls,
            send_proxy_protocol: cfg.send_proxy_protocol,
            metrics: m,
        }
    }

    /// Opens a connection to the backend at `address`: TCP, then the PROXY header if the
    /// upstream sends one and `header` asks for it, then TLS if the upstream speaks it.
    /// No timeout here: callers set their own.
    pub async fn open(
        &self,
        address: SocketAddr,
        header: Header,
    ) -> Result<BackendStream, (ConnectFailure, String)> {
        use tokio::io::AsyncWriteExt;
        let mut tcp = connect_to(address)
            .await
            .map_err(|e| (ConnectFailure::of(&e), e.to_string()))?;
        let version = match self.send_proxy_protocol {
            Some(ProxyVersion::V1) => Some(proxy_protocol::Version::V1),
            Some(ProxyVersion::V2) => Some(proxy_protocol::Version::V2),
            None => None,
        };
        let mut bytes = Vec::new();
        match (version, header) {
            (Some(v), Header::Client(e)) => {
                proxy_protocol::encode(v, e.client, e.local, &mut bytes)
            }
            (Some(v), Header::Local) => proxy_protocol::encode_local(v, &mut bytes),
            (None, _) | (_, Header::None) => {}
        }
        if !bytes.is_empty() {
            tcp.write_all(&bytes)
                .await
                .map_err(|e| (ConnectFailure::of(&e), e.to_string()))?;
        }
        let Some(tls) = &self.tls else {
            return Ok(BackendStream::Plain(tcp));
        };
        // Boxed: a handshake's state is large, and inline it would size every
        // connection's task, TLS or not, for its whole life.
        let handshake = Box::pin(tls.connector.connect(tls.server_name(address), tcp));
        match handshake.await {
            Ok(s) => Ok(BackendStream::Tls(Box::new(s))),
            Err(e) => Err((ConnectFailure::Tls, format!("TLS handshake failed: {e}"))),
        }
    }

    /// Connects to a backend for `client`, trying a different backend after each failure.
    pub async fn connect(
        self: &Arc<Self>,
        ends: Ends,
    ) -> Result<(BackendStream, Lease), ConnectError> {
        let client = ends.client;
        // Backends this client failed to connect to; configs are small, so a linear scan
        // is cheapest. Pushed to only on a failure: a first connect that succeeds
        // allocates nothing here.
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut last: Option<(SocketAddr, String)> = None;
        let mut cursor = None;
        for _ in 0..=self.retries {
            let slot = match self.limit {
                Some(_) => {
                    self.queue
                        .acquire(self, client, &tried, &mut cursor)
                        .await?
                }
                None => {
                    let slot = self.take_slot(client, &tried, &mut cursor);
                    if slot.is_none() && tried.is_empty() {
                        return Err(ConnectError::NoHealthyBackend);
                    }
                    slot
                }
            };
            let Some(backend) = slot else { break };
            let lease = Lease {
                upstream: Arc::clone(self),
                backend,
            };
            let backend = &lease.backend;
            let started = Instant::now();
            let opened = timeout(
                self.connect_timeout,
                self.open(backend.address, Header::Client(ends)),
            );
            let failure = match opened.await {
                Ok(Ok(stream)) => {
                    self.metrics
                        .connect_duration
                        .observe(started.elapsed().as_secs_f64());
                    backend.health.connect_succeeded();
                    return Ok((stream, lease));
                }
                Ok(Err(failure)) => failure,
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
                self.ejected(backend, length);
            }
            tried.push(backend.address);
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
        tried: &[SocketAddr],
        cursor: &mut Option<usize>,
    ) -> Option<Arc<Backend>> {
        let limit = self.limit.unwrap_or(u64::MAX);
        let eligible = |i: usize| {
            let b = &self.backends[i];
            b.available() && b.active() < limit && !tried.contains(&b.address)
        };
        let i = self
            .balancer
            .pick(&self.backends, client, cursor, &eligible)?;
        let b = &self.backends[i];
        b.active.fetch_add(1, Ordering::SeqCst);
        b.metrics.active.inc();
        Some(Arc::clone(b))
    }

    /// Whether any backend not in `tried` could take a connection if it had room.
    pub(crate) fn any_available(&self, tried: &[SocketAddr]) -> bool {
        self.backends
            .iter()
            .any(|b| b.available() && !tried.contains(&b.address))
    }

    /// A backend went up or down: update its gauge and let waiters use new room.
    pub fn availability_changed(&self, b: &Backend) {
        b.metrics.up.set(i64::from(b.available()));
        self.queue.dispatch();
    }

    fn ejected(self: &Arc<Self>, b: &Arc<Backend>, length: Duration) {
        b.metrics.ejections.inc();
        tracing::warn!(upstream = %self.name, backend = %b.address, seconds = length.as_secs_f64(), "backend ejected after consecutive connect failures");
        self.availability_changed(b);
        let (upstream, b) = (Arc::clone(self), Arc::clone(b));
        tokio::spawn(async move {
            sleep(length).await;
            upstream.availability_changed(&b);
        });
    }
}

/// Takes a backend that an earlier reload removed back into service, with its open
/// connections still counted, unless its connections were already told to close.
fn revive(
    retired: &mut Vec<(String, Arc<Backend>)>,
    upstream: &str,
    address: SocketAddr,
) -> Option<Arc<Backend>> {
    let at = retired
        .iter()
        .position(|(u, b)| u == upstream && b.address == address && !b.removed.is_cancelled())?;
    let (_, backend) = retired.swap_remove(at);
    backend.retired.store(false, Ordering::Relaxed);
    backend.metrics.up.set(i64::from(backend.available()));
    Some(backend)
}

impl Backend {
    /// `cut` is the shutdown drain's deadline: [`Backend::removed`] is its child.
    fn new(
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

    /// A backend outside any upstream, with `active` connections, for balancer tests.
    #[cfg(test)]
    pub fn for_test(address: SocketAddr, weight: u32, active: u64) -> Backend {
        let b = Backend::new(
            address,
            weight,
            Metrics::new().expect("a fresh registry").backend("t", "t"),
            &CancellationToken::new(),
        );
        b.active.store(active, Ordering::Relaxed);
        b
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
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

impl Lease {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.backend.release();
        self.upstream.queue.dispatch();
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
