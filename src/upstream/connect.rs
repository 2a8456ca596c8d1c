//! An upstream: its pool of backends, its queue, and connecting for a client: take a
//! slot (waiting in the queue when every backend is at its limit), connect (TCP, then
//! the PROXY header, then TLS) under a timeout, and on failure try another backend, up
//! to `retries` more times.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::{Instant, sleep, timeout};
use tokio_util::sync::CancellationToken;

use crate::config::{self, ProxyVersion};
use crate::edge::proxy_protocol;
use crate::edge::tls::Origination;
use crate::metrics::{ConnectFailure, Metrics, UpstreamMetrics};
use crate::stream::BackendStream;
use crate::upstream::backend::Backend;
use crate::upstream::pool::Pool;
use crate::upstream::queue::{Queue, QueueError, Slots};

/// Idle time before the first keepalive probe (TCP_KEEPIDLE).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(120);
/// Time between unanswered probes (TCP_KEEPINTVL).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
/// Unanswered probes before the connection is given up (TCP_KEEPCNT).
const KEEPALIVE_PROBES: u32 = 4;

/// Keepalive on both sides of a proxied connection, so a peer that vanished without a
/// FIN (a rebooted host, a dropped NAT entry) is noticed within about three minutes.
/// The client side inherits all of it from the listening socket; the backend side gets
/// it from its relay, with [`backend_keepalive`].
pub const KEEPALIVE: socket2::TcpKeepalive = socket2::TcpKeepalive::new()
    .with_time(KEEPALIVE_IDLE)
    .with_interval(KEEPALIVE_INTERVAL)
    .with_retries(KEEPALIVE_PROBES);

/// How long a plain relay runs, at most, before it calls [`backend_keepalive`] on its
/// backend socket: its timer's first firing, earlier if the idle or lifetime deadline
/// is. It must stay below [`KEEPALIVE_IDLE`]: no probe is due before that much idle
/// time, so until then the socket loses nothing by having no keepalive yet.
pub const BACKEND_KEEPALIVE_AFTER: Duration = Duration::from_secs(60);
const _: () = assert!(BACKEND_KEEPALIVE_AFTER.as_secs() < KEEPALIVE_IDLE.as_secs());

/// [`KEEPALIVE`] on a backend socket, set by a plain relay after
/// [`BACKEND_KEEPALIVE_AFTER`] (a TLS relay sets it at its start) rather than at
/// connect, so the many plain connections that end sooner make none of these four
/// system calls; until session 14 the connect made the first two (BENCHMARKS.md,
/// "Backend keepalive from the relay (session 14)").
///
/// The first probe still goes out after exactly [`KEEPALIVE_IDLE`] of silence, as if
/// all of it had been set at connect: with SO_KEEPALIVE already on, setting
/// TCP_KEEPIDLE makes the kernel re-arm the timer for the idle time minus the time
/// since the last segment it received (`tcp_sock_set_keepidle_locked`). The order
/// matters: TCP_KEEPIDLE first and SO_KEEPALIVE after would start a full idle time
/// from now, up to a minute late. The interval and count are read only once probing
/// starts. Setting them all again later is harmless.
pub fn backend_keepalive(socket: &TcpStream) {
    use rustix::net::sockopt;
    // Only fails on a socket the kernel already closed (nothing left to probe).
    let _ = sockopt::set_socket_keepalive(socket, true);
    let _ = sockopt::set_tcp_keepidle(socket, KEEPALIVE_IDLE);
    let _ = sockopt::set_tcp_keepintvl(socket, KEEPALIVE_INTERVAL);
    let _ = sockopt::set_tcp_keepcnt(socket, KEEPALIVE_PROBES);
}

/// A named group of backends that serves one kind of traffic.
pub struct Upstream {
    pub name: String,
    /// The backends, their balancer and their per-backend limit.
    pub pool: Arc<Pool>,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub retries: u32,
    /// Carried from snapshot to snapshot under the upstream's name; used for waiting
    /// only while the pool has a per-backend limit.
    pub queue: Arc<Queue<Pool>>,
    pub health_check: Option<config::HealthCheck>,
    passive_ejection: Option<config::PassiveEjection>,
    pub max_lifetime: Option<config::Lifetime>,
    pub on_backend_removed: config::BackendRemoved,
    /// TLS towards backends, loaded with the snapshot.
    tls: Option<Arc<Origination>>,
    send_proxy_protocol: Option<ProxyVersion>,
    pub metrics: UpstreamMetrics,
}

/// What an upstream takes over from the snapshot before, found by the snapshot diff.
#[derive(Default)]
pub struct Carried {
    /// The queue of the upstream of the same name.
    pub queue: Option<Arc<Queue<Pool>>>,
    /// Backends the config still has (or has again, if retired): the same objects.
    pub backends: Vec<Arc<Backend>>,
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

/// A connection slot on a backend; dropping it frees the slot for the next waiter.
pub struct Lease {
    backend: Arc<Backend>,
    /// Where the freed slot goes next.
    queue: Arc<Queue<Pool>>,
    /// The backend's sessions token when the slot was taken: an operator's close after
    /// that ends this connection too, even while it is still connecting.
    sessions: Arc<CancellationToken>,
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
    /// Builds the upstream for `cfg`, taking over the queue and backends of the snapshot
    /// before as `carried` says; the rest is new.
    pub fn new(
        cfg: &config::Upstream,
        metrics: &Metrics,
        carried: Carried,
        tls: Option<Arc<Origination>>,
        cut: &CancellationToken,
    ) -> Upstream {
        let m = metrics.upstream(&cfg.name);
        // A reload (the upstream existed before) that adds an endpoint found by DNS, with
        // checks on: no traffic until the checks pass it, as `rise` says.
        let checked_first = carried.queue.is_some() && cfg.health_check.is_some();
        // Slow start ramps a backend this upstream did not have in service: one a
        // reload added or revived, or whose weight rose from 0. Not at start, nor in an
        // upstream that is new, where every backend is new alike.
        let existed = carried.queue.is_some();
        let backends: Vec<Arc<Backend>> = cfg
            .backends
            .iter()
            .map(
                |b| match carried.backends.iter().find(|old| old.address == b.address) {
                    Some(old) => {
                        old.set_slow_start(cfg.slow_start);
                        let was_zero = old.configured_weight() == 0 && b.weight > 0;
                        old.set_weight(b.weight);
                        if old.is_retired() {
                            old.revive();
                            old.start_ramp();
                        } else if was_zero {
                            old.start_ramp();
                        }
                        Arc::clone(old)
                    }
                    None => {
                        let new = Backend::new(
                            b.address,
                            b.weight,
                            metrics.backend(&cfg.name, &b.address.to_string()),
                            cut,
                        );
                        if checked_first && b.entry.is_some() {
                            new.health.set_up(false);
                            new.metrics.up.set(0);
                        }
                        new.set_slow_start(cfg.slow_start);
                        if existed {
                            new.start_ramp();
                        }
                        Arc::new(new)
                    }
                },
            )
            .collect();
        // SRV priorities: the backends of each, lowest first, when there is more than one.
        let mut priorities: Vec<u16> = cfg.backends.iter().map(|b| b.priority).collect();
        priorities.sort_unstable();
        priorities.dedup();
        let tiers = match priorities.len() {
            1 | 0 => Vec::new(),
            _ => priorities
                .iter()
                .map(|&p| {
                    (0..cfg.backends.len())
                        .filter(|&i| cfg.backends[i].priority == p)
                        .map(|i| Arc::clone(&backends[i]))
                        .collect()
                })
                .collect(),
        };
        // Built from the effective weights: a kept backend keeps an operator's override.
        let pool = Arc::new(
            Pool::new(backends, cfg.balance, cfg.max_connections_per_backend).with_tiers(tiers),
        );
        let queue = match carried.queue {
            Some(q) => {
                q.set_bounds(cfg.queue.max, cfg.queue.timeout);
                q
            }
            None => Arc::new(Queue::new(
                cfg.queue.max,
                cfg.queue.timeout,
                m.queue_length.clone(),
                m.queue_wait.clone(),
                Arc::clone(&pool),
            )),
        };
        Upstream {
            name: cfg.name.clone(),
            pool,
            connect_timeout: cfg.connect_timeout,
            idle_timeout: cfg.idle_timeout,
            retries: cfg.retries,
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

    /// TLS towards the backends, as loaded with this snapshot.
    pub fn tls(&self) -> Option<&Arc<Origination>> {
        self.tls.as_ref()
    }

    /// The backends, in config order.
    pub fn backends(&self) -> &[Arc<Backend>] {
        &self.pool.backends
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
            let slot = if self.pool.is_limited() {
                self.queue
                    .acquire(&self.pool, client, &tried, &mut cursor)
                    .await
                    .map_err(ConnectError::from)?
            } else {
                let slot = self.pool.take(client, &tried, &mut cursor);
                if slot.is_none() && tried.is_empty() {
                    return Err(ConnectError::NoHealthyBackend);
                }
                slot
            };
            let Some(backend) = slot else { break };
            let lease = Lease {
                sessions: backend.sessions(),
                backend,
                queue: Arc::clone(&self.queue),
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

    /// A backend went up or down: update its gauge and let waiters use new room.
    pub fn availability_changed(&self, b: &Backend) {
        b.metrics.up.set(i64::from(b.up()));
        self.queue.dispatch();
    }

    fn ejected(self: &Arc<Self>, b: &Arc<Backend>, length: Duration) {
        b.metrics.ejections.inc();
        tracing::warn!(upstream = %self.name, backend = %b.address, seconds = length.as_secs_f64(), "backend ejected after consecutive connect failures");
        self.availability_changed(b);
        let (upstream, b) = (Arc::clone(self), Arc::clone(b));
        tokio::spawn(async move {
            sleep(length).await;
            b.start_ramp();
            upstream.availability_changed(&b);
        });
    }
}

impl Lease {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }

    /// What the relay waits on for an operator's close (see [`Backend::close_sessions`]).
    pub fn sessions(&self) -> &CancellationToken {
        &self.sessions
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.backend.release();
        self.queue.dispatch();
    }
}

impl From<QueueError> for ConnectError {
    fn from(e: QueueError) -> ConnectError {
        match e {
            QueueError::NoHealthyBackend => ConnectError::NoHealthyBackend,
            QueueError::Full => ConnectError::QueueFull,
            QueueError::Timeout => ConnectError::QueueTimeout,
        }
    }
}

/// A TCP connection to `address`, with TCP_NODELAY set (keepalive comes from the
/// relay: [`backend_keepalive`]). tokio's own connect learns the outcome with
/// `getsockopt(SO_ERROR)` once the socket is writable; here the readiness event itself
/// tells it: EPOLLOUT alone is an established connection, and only a failure
/// (EPOLLERR, EPOLLHUP) costs the `getsockopt` that reads its cause. One system call fewer per connection (BENCHMARKS.md, "The
/// connect's outcome and the waiting client, without a system call").
async fn connect_to(address: SocketAddr) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    use tokio::io::Interest;
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM.nonblocking().cloexec(),
        None,
    )?;
    socket.set_tcp_nodelay(true)?;
    match socket.connect(&address.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INPROGRESS.raw_os_error()) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    // A socket still connecting is never writable, and its registration starts with
    // no readiness, so the first event is the connect's outcome.
    let ready = stream.ready(Interest::WRITABLE | Interest::ERROR).await?;
    if ready.is_error() || ready.is_write_closed() {
        return Err(stream.take_error()?.unwrap_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the connection closed while connecting",
            )
        }));
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn upstream(backends: &[SocketAddr], extra: &str) -> Arc<Upstream> {
        let mut text = format!(
            "[[listener]]\nname = \"l\"\nbind = [\"127.0.0.1:0\"]\nupstream = \"u\"\n\
             [[upstream]]\nname = \"u\"\nbalance = \"round_robin\"\n{extra}\n"
        );
        for b in backends {
            text.push_str(&format!("[[upstream.backend]]\naddress = \"{b}\"\n"));
        }
        let config = Config::parse(&text, std::path::Path::new("t.toml")).unwrap();
        let metrics = Metrics::new().unwrap();
        let u = Upstream::new(
            &config.upstreams[0],
            &metrics,
            Carried::default(),
            None,
            &CancellationToken::new(),
        );
        Arc::new(u)
    }

    /// An address nothing listens on: bound, then closed.
    fn refusing() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }

    fn ends() -> Ends {
        let a = SocketAddr::from(([127, 0, 0, 1], 1));
        Ends {
            client: a,
            local: a,
        }
    }

    /// Seconds until the keepalive timer of the IPv4 socket `s` fires, from
    /// /proc/net/tcp (`tr` 2 is the keepalive timer; `tm->when` is in 1/100 s).
    fn keepalive_timer(s: &TcpStream) -> Option<f64> {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
        let local = format!(":{:04X}", s.local_addr().unwrap().port());
        let remote = format!(":{:04X}", s.peer_addr().unwrap().port());
        table.lines().skip(1).find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if !(fields[1].ends_with(&local) && fields[2].ends_with(&remote)) {
                return None;
            }
            let (timer, when) = fields[5].split_once(':')?;
            (timer == "02")
                .then(|| u64::from_str_radix(when, 16).ok())?
                .map(|ticks| ticks as f64 / 100.0)
        })
    }

    /// Keepalive turned on late (as the relay does, a minute in) still probes after
    /// KEEPALIVE_IDLE of silence counted from the last segment received, not from the
    /// call: the kernel's timer is re-armed for what is left of it. Set in the other
    /// order, a full idle time would start at the call. Real time: the socket is idle
    /// for two seconds before the call.
    #[tokio::test]
    async fn late_keepalive_counts_the_idle_time_from_the_last_byte() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (client, accepted) = tokio::join!(
            connect_to(listener.local_addr().unwrap()),
            listener.accept()
        );
        let (client, (_server, _)) = (client.unwrap(), accepted.unwrap());
        assert_eq!(keepalive_timer(&client), None, "no keepalive at connect");
        let idle = Duration::from_secs(2);
        tokio::time::sleep(idle).await;

        backend_keepalive(&client);

        let left = keepalive_timer(&client).expect("a keepalive timer");
        let expected = (KEEPALIVE_IDLE - idle).as_secs_f64();
        assert!(
            (expected - 5.0..=expected + 0.5).contains(&left),
            "{left} s left, not about {expected} s"
        );
    }

    #[tokio::test]
    async fn a_refused_connect_is_counted_and_the_next_backend_is_tried() {
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = refusing();
        let u = upstream(&[dead, live.local_addr().unwrap()], "retries = 1");
        let (_stream, lease) = u.connect(ends()).await.expect("the second backend");
        assert_eq!(lease.backend().address, live.local_addr().unwrap());
        let refused = &u.backends()[0];
        assert_eq!(
            refused.metrics.connect_error(ConnectFailure::Refused).get(),
            1
        );
        assert_eq!(refused.active(), 0, "the failed attempt's slot was freed");
        assert_eq!(lease.backend().active(), 1);
        let backend = Arc::clone(lease.backend());
        drop(lease);
        assert_eq!(backend.active(), 0, "dropping the lease frees the slot");
    }

    #[tokio::test]
    async fn when_every_attempt_fails_the_error_names_the_last_backend() {
        let dead = refusing();
        let u = upstream(&[dead], "retries = 2");
        match u.connect(ends()).await {
            Err(ConnectError::Unavailable {
                attempts, backend, ..
            }) => {
                // One backend: once tried, nothing untried is left.
                assert_eq!((attempts, backend), (1, dead));
            }
            other => panic!("expected Unavailable, got {:?}", other.map(|_| ())),
        }
        u.backends()[0].set_weight(0);
        assert!(matches!(
            u.connect(ends()).await,
            Err(ConnectError::NoHealthyBackend)
        ));
    }
}
