//! One client connection, from accept to close: the edge (PROXY header, then TLS
//! termination or a ClientHello peek for SNI routing), pick a backend, connect, relay,
//! record.

use std::future::Future;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

use crate::access_log;
use crate::config::PROXY_MAX_HEADER;
use crate::data::gate::Slot;
use crate::data::relay::{self, Counters, End, Outcome};
use crate::edge::admission::{self, Revocations};
use crate::edge::client_hello::{self, Peek};
use crate::edge::client_table::{ClientSlot, ClientTable};
use crate::edge::proxy_protocol::{self, Parsed};
use crate::edge::tls;
use crate::metrics::RejectReason;
use crate::metrics::{Direction, HandshakeResult};
use crate::shutdown::Stopped;
use crate::snapshot::{Route, Snapshot};
use crate::stream::{BackendStream, ClientStream, Prefixed, Stream};
use crate::upstream::{ConnectError, Ends, Lease, Upstream};

/// A connection's slots: the listener's `max_connections` and the process-wide cap.
pub type Permits = (Slot, Slot);

/// The target of the per-connection log lines, kept from before the module moved into
/// `data/`: operators filter on it (`RUST_LOG=info,sluice::conn=debug`).
const LOG_TARGET: &str = "sluice::conn";

/// A client connection as the accept loop hands it over.
pub struct Accepted {
    pub client: TcpStream,
    pub peer: SocketAddr,
    /// The snapshot in force at accept: the connection keeps it for its whole life.
    pub snapshot: Arc<Snapshot>,
    pub listener: Arc<str>,
    /// The shutdown drain's deadline.
    pub stop: CancellationToken,
    pub permits: Permits,
    /// The listener's per-client table (kept across reloads, used if the route has
    /// per-client limits).
    pub clients: Arc<ClientTable>,
    /// The listener's lists in force, watched with `close_denied_on_reload`.
    pub revocations: Arc<Revocations>,
}

/// Serves one accepted client connection to its end; its permits are released when
/// this returns.
///
/// An open connection's task holds this future for its whole life, so it is kept
/// small: `accepted` comes boxed and is unpacked inside the boxed setup, whose state
/// (the edge, a TLS handshake, the queue, the connect) is freed when it ends; what is
/// left is the relay ([`Open::relayed`]: on a plain connection the `Relay` itself, in
/// place) and a pointer to one [`Open`] (boxed too: the future of an `.await` keeps
/// its result and the binding it moves to, so an unboxed `Open` would be held twice,
/// measured with `-Zprint-type-sizes`).
pub async fn handle(accepted: Box<Accepted>) {
    if let Some(mut open) = Box::pin(open(accepted)).await {
        let outcome = open.relayed().await;
        open.closed(outcome);
    }
}

/// The edge, a backend, and the bytes the edge read sent on: `None` when the client
/// was refused (and recorded), the listener is gone, or the shutdown cut came first.
async fn open(accepted: Box<Accepted>) -> Option<Box<Open>> {
    let Accepted {
        client,
        peer,
        snapshot,
        listener,
        stop,
        permits,
        clients,
        revocations,
    } = *accepted;
    // `None`: the listener was removed from the config between accept and here.
    let mut record = Record::start(snapshot, &listener)?;
    let Ready {
        client,
        mut backend,
        lease,
        ends,
        upstream,
        preface,
        client_slot,
    } = setup(record.route(), client, peer, &stop, &record, &clients).await?;
    match forward_preface(preface, &mut backend, &upstream, &record.counters()).await {
        Ok(sent) => record.sent = sent,
        Err(outcome) => {
            record.closed(ends.client, &upstream.name, &lease, &outcome);
            return None;
        }
    }
    // Spread the lifetimes so connections opened together do not all close together.
    let lifetime = upstream
        .max_lifetime
        .map(|l| l.max + l.jitter.mul_f64(fastrand::f64()));
    Some(Box::new(Open {
        client,
        lifetime_end: lifetime.map(|l| Instant::now() + l),
        backend,
        peer: ends.client,
        lease,
        upstream,
        record,
        _permits: permits,
        _client: client_slot,
        revocations,
    }))
}

/// A connection with its backend, relaying: everything it holds while open.
struct Open {
    client: ClientStream,
    /// The end of the upstream's `max_lifetime`, if it has one; its `idle_timeout` is
    /// read from `upstream`.
    lifetime_end: Option<Instant>,
    backend: BackendStream,
    /// The client, as a PROXY header named it or as accepted.
    peer: SocketAddr,
    lease: Lease,
    upstream: Arc<Upstream>,
    record: Record,
    _permits: Permits,
    /// Counts this connection against its client's `max_connections_per_client`.
    _client: Option<ClientSlot>,
    revocations: Arc<Revocations>,
}

impl Open {
    /// The relay of this connection. A plain connection on a listener without
    /// `close_denied_on_reload` (most of them) gets the `Relay` itself, awaited in place
    /// in the task: no `async` frame of its own around it, which would keep a second
    /// copy of what the relay was built from (BENCHMARKS.md, "Idle memory (issue 18)").
    /// TLS on either side and the deny-on-reload watch need state only they use, so
    /// they run in a box of their own.
    fn relayed(&mut self) -> Relayed<'_> {
        let Open {
            client,
            backend,
            lifetime_end,
            upstream,
            lease,
            record,
            revocations,
            peer,
            ..
        } = self;
        let route = record.route();
        let limits = relay::Limits {
            idle: upstream.idle_timeout,
            lifetime_end: *lifetime_end,
        };
        let stops = relay::Stops {
            // The cut this process's relays stop at; the backend keeps it.
            shutdown: &lease.backend().cut,
            removed: lease.sessions(),
            retired: &lease.backend().removed,
        };
        match (route.close_denied_on_reload, client, backend) {
            (false, ClientStream::Plain(c), BackendStream::Plain(b)) => {
                let splice = record.snapshot.config.relay.splice;
                Relayed::Plain {
                    relay: relay::relay(c, b, &limits, stops, record.counters(), splice),
                }
            }
            (_, c, b) => {
                let watch = route
                    .close_denied_on_reload
                    .then(|| (&**revocations, peer.ip()));
                Relayed::Boxed {
                    relay: Box::pin(relay_boxed(c, b, limits, stops, record, watch)),
                }
            }
        }
    }

    /// Records the end of the relay.
    fn closed(&self, outcome: Outcome) {
        self.record
            .closed(self.peer, &self.upstream.name, &self.lease, &outcome);
    }
}

/// The relay of a TLS connection, or of one whose listener has `close_denied_on_reload`
/// (`watch`: the listener's lists in force and the client's address).
async fn relay_boxed(
    client: &mut ClientStream,
    backend: &mut BackendStream,
    limits: relay::Limits,
    stops: relay::Stops<'_>,
    record: &Record,
    watch: Option<(&Revocations, std::net::IpAddr)>,
) -> Outcome {
    let counters = record.counters();
    let splice = record.snapshot.config.relay.splice;
    let Some((revocations, ip)) = watch else {
        return relay_either(client, backend, &limits, stops, counters, splice).await;
    };
    // A token of this connection's own, a child of the backend's sessions token (so an
    // operator's close, removal and the cut still reach it), stops the relay when a
    // reload's lists deny the client.
    let sessions = stops.removed;
    let token = sessions.child_token();
    let stops = relay::Stops {
        removed: &token,
        ..stops
    };
    let relayed = relay_either(client, backend, &limits, stops, counters, splice);
    let denied = async {
        revocations.denied(ip).await;
        crate::shutdown::cancel(&token);
        // The relay sees the token and ends, with its counts.
        std::future::pending::<Outcome>().await
    };
    let mut outcome = tokio::select! {
        o = relayed => o,
        o = denied => o,
    };
    if token.is_cancelled() && !sessions.is_cancelled() {
        outcome.end = End::Denied;
    }
    outcome
}

/// The plain relay, or the stream relay with TLS on either side.
async fn relay_either(
    client: &mut ClientStream,
    backend: &mut BackendStream,
    limits: &relay::Limits,
    stops: relay::Stops<'_>,
    counters: Counters<'_>,
    splice: bool,
) -> Outcome {
    match (client, backend) {
        (ClientStream::Plain(c), BackendStream::Plain(b)) => {
            relay::relay(c, b, limits, stops, counters, splice).await
        }
        (c, b) => relay::relay_streams(c, b, limits, stops, counters).await,
    }
}

pin_project_lite::pin_project! {
    /// The future of [`Open::relayed`].
    #[project = RelayedProj]
    enum Relayed<'a> {
        Plain { #[pin] relay: relay::Relay<'a> },
        Boxed { relay: Pin<Box<dyn Future<Output = Outcome> + Send + 'a>> },
    }
}

impl Future for Relayed<'_> {
    type Output = Outcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        match self.project() {
            RelayedProj::Plain { relay } => relay.poll(cx),
            RelayedProj::Boxed { relay } => relay.as_mut().poll(cx),
        }
    }
}

/// A connection ready to relay: both streams, the backend's slot, and what the edge
/// learned and read.
struct Ready {
    client: ClientStream,
    backend: BackendStream,
    lease: Lease,
    ends: Ends,
    upstream: Arc<Upstream>,
    preface: Vec<u8>,
    client_slot: Option<ClientSlot>,
}

/// The edge, then a backend: `None` when the client was refused (and recorded) or the
/// shutdown cut came first.
async fn setup(
    route: &Route,
    client: TcpStream,
    peer: SocketAddr,
    stop: &CancellationToken,
    record: &Record,
    clients: &Arc<ClientTable>,
) -> Option<Ready> {
    let local = if route.sends_proxy_protocol {
        client.local_addr().unwrap_or(peer)
    } else {
        // Read only by a PROXY header sent on, which no upstream here sends.
        SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), 0)
    };
    let ends = Ends {
        client: peer,
        local,
    };
    // One wait on the shared cut for both phases: see `Stopped`.
    let mut stopped = std::pin::pin!(Stopped::new(stop));
    let edge = tokio::select! {
        e = edge(route, client, ends, clients) => e,
        () = &mut stopped => return None,
    };
    let Edge {
        client,
        ends,
        upstream,
        preface,
        client_slot,
    } = match edge {
        Ok(e) => e,
        Err(refusal) => {
            record.refused(&refusal, None);
            return None;
        }
    };

    // Bytes read at the edge, or a TLS session (whose reads may have taken the client's
    // data off the socket already), mean a FIN may be a half-close.
    let sent_data = !preface.is_empty() || matches!(client, ClientStream::Tls(_));
    let untouched = route.proxy_protocol.is_none();
    let connected = tokio::select! {
        c = upstream.connect(ends) => c.map_err(Some),
        () = client_gone(client.tcp(), sent_data, untouched) => Err(None),
        () = &mut stopped => return None,
    };
    match connected {
        Ok((backend, lease)) => Some(Ready {
            client,
            backend,
            lease,
            ends,
            upstream,
            preface,
            client_slot,
        }),
        Err(e) => {
            let reason = match &e {
                None => RejectReason::ClientLeft,
                Some(ConnectError::NoHealthyBackend) => RejectReason::NoHealthyBackend,
                Some(ConnectError::QueueFull) => RejectReason::QueueFull,
                Some(ConnectError::QueueTimeout) => RejectReason::QueueTimeout,
                Some(ConnectError::Unavailable { .. }) => RejectReason::UpstreamUnavailable,
            };
            let error = e.map_or_else(
                || "the client closed its connection".to_string(),
                |e| e.to_string(),
            );
            let refusal = Refusal {
                reason,
                error,
                client: ends.client,
            };
            record.refused(&refusal, Some(&upstream.name));
            None
        }
    }
}

/// What the edge of a connection produced: the client stream to relay (TLS
/// terminated if configured), the client as a PROXY header named it, the upstream, and
/// bytes already read from the client that the backend must receive first.
struct Edge {
    client: ClientStream,
    ends: Ends,
    upstream: Arc<Upstream>,
    preface: Vec<u8>,
    client_slot: Option<ClientSlot>,
}

/// Why a client was closed before it reached a backend.
struct Refusal {
    reason: RejectReason,
    error: String,
    /// The client as known so far (from a PROXY header once one was read).
    client: SocketAddr,
}

/// Runs the stages before a backend is picked: the PROXY header, then admission (allow
/// and deny, per-client limits) on the client's real address, then TLS termination or
/// the ClientHello peek, each reading stage under its own timeout.
async fn edge(
    route: &Route,
    tcp: TcpStream,
    mut ends: Ends,
    clients: &Arc<ClientTable>,
) -> Result<Edge, Refusal> {
    let refuse = |reason, client, error: String| Refusal {
        reason,
        error,
        client,
    };
    let mut preface = Vec::new();
    if let Some(accept) = &route.proxy_protocol {
        if !accept.trusted.iter().any(|c| c.contains(ends.client.ip())) {
            let e = "the peer is not in proxy_protocol.trusted".to_string();
            return Err(refuse(RejectReason::ProxyProtocol, ends.client, e));
        }
        let phase = Phase {
            what: "PROXY header",
            max: PROXY_MAX_HEADER,
            limit: accept.timeout,
        };
        let (header, consumed) = read_until(&tcp, &mut preface, phase, |b| {
            proxy_protocol::parse(b, PROXY_MAX_HEADER).map(|p| match p {
                Parsed::Done { header, consumed } => Some((header, consumed)),
                Parsed::Incomplete => None,
            })
        })
        .await
        .map_err(|e| refuse(RejectReason::ProxyProtocol, ends.client, e))?;
        preface.drain(..consumed);
        // LOCAL (a health check of the load balancer in front) keeps the socket's ends.
        if let (Some(client), Some(local)) = (header.source, header.destination) {
            ends = Ends { client, local };
        }
    }
    let client_slot = admission::admit(
        route.access.as_ref(),
        route.client_limits.as_ref(),
        clients,
        ends.client.ip(),
    )
    .map_err(|(reason, e)| {
        // Closed with a reset: a refused flood leaves no TIME_WAIT sockets behind.
        let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
        refuse(reason, ends.client, e)
    })?;

    if let Some((termination, tm)) = &route.tls {
        let started = Instant::now();
        let handshake = termination
            .acceptor
            .accept(Prefixed::new(std::mem::take(&mut preface), tcp));
        let result = match timeout(termination.handshake_timeout, handshake).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => Err((
                tls::handshake_result(&e),
                format!("TLS handshake failed: {e}"),
            )),
            Err(_) => Err((
                HandshakeResult::Timeout,
                format!(
                    "no TLS handshake within {:?}",
                    termination.handshake_timeout
                ),
            )),
        };
        return match result {
            Ok(stream) => {
                tm.handshake(HandshakeResult::Success).inc();
                tm.handshake_duration
                    .observe(started.elapsed().as_secs_f64());
                Ok(Edge {
                    client: ClientStream::Tls(Box::new(stream)),
                    ends,
                    upstream: default_upstream(route, ends)?,
                    preface,
                    client_slot,
                })
            }
            Err((result, e)) => {
                tm.handshake(result).inc();
                Err(refuse(RejectReason::TlsHandshake, ends.client, e))
            }
        };
    }

    let upstream = match &route.passthrough {
        None => default_upstream(route, ends)?,
        Some(sni) => {
            let phase = Phase {
                what: "ClientHello",
                max: sni.max_hello_size,
                limit: sni.hello_timeout,
            };
            let name = read_until(&tcp, &mut preface, phase, |b| {
                client_hello::server_name(b, sni.max_hello_size).map(|p| match p {
                    Peek::Done(name) => Some(name),
                    Peek::Incomplete => None,
                })
            })
            .await
            .map_err(|e| refuse(RejectReason::ClientHello, ends.client, e))?;
            let routed = name.as_deref().and_then(|n| sni.pick(n));
            match routed.or(route.upstream.as_ref()) {
                Some(u) => Arc::clone(u),
                None => {
                    let e = match name {
                        Some(n) => {
                            format!("no route for server name {n:?} and no default upstream")
                        }
                        None => {
                            "the ClientHello has no server name and there is no default upstream"
                                .to_string()
                        }
                    };
                    return Err(refuse(RejectReason::NoRoute, ends.client, e));
                }
            }
        }
    };
    Ok(Edge {
        client: ClientStream::Plain(tcp),
        ends,
        upstream,
        preface,
        client_slot,
    })
}

fn default_upstream(route: &Route, ends: Ends) -> Result<Arc<Upstream>, Refusal> {
    // The config requires an upstream on every listener without passthrough routes.
    route.upstream.clone().ok_or_else(|| Refusal {
        reason: RejectReason::NoRoute,
        error: "the listener has no upstream".to_string(),
        client: ends.client,
    })
}

/// One stage of the edge that reads a message: what it is, the most bytes it may take,
/// and how long the client has to send them.
struct Phase {
    what: &'static str,
    max: usize,
    limit: Duration,
}

/// Reads from `tcp` into `buf`, never past `phase.max` bytes in all and for no longer
/// than `phase.limit`, until `parse` of the whole buffer gives a result (`Some`) or
/// fails; a failure says why in one line. Each read takes what the socket has, so a
/// header delivered a byte at a time costs a read per byte, a whole one one read.
async fn read_until<T, E: std::fmt::Display>(
    tcp: &TcpStream,
    buf: &mut Vec<u8>,
    phase: Phase,
    parse: impl Fn(&[u8]) -> Result<Option<T>, E>,
) -> Result<T, String> {
    let read = async {
        loop {
            // Bytes left over from an earlier stage may already hold a complete message.
            if let Some(done) = parse(buf).map_err(|e| e.to_string())? {
                return Ok(done);
            }
            if buf.len() >= phase.max {
                // The parsers refuse anything longer than `max` themselves; this keeps
                // the loop finite whatever they do.
                return Err(format!(
                    "{} bytes without a complete {}",
                    buf.len(),
                    phase.what
                ));
            }
            tcp.readable().await.map_err(|e| e.to_string())?;
            let start = buf.len();
            buf.resize(phase.max.min(start + 4096), 0);
            match tcp.try_read(&mut buf[start..]) {
                Ok(0) => {
                    buf.truncate(start);
                    return Err(format!(
                        "the client closed the connection after {start} bytes, before a complete {}",
                        phase.what
                    ));
                }
                Ok(n) => buf.truncate(start + n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => buf.truncate(start),
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    timeout(phase.limit, read).await.unwrap_or_else(|_| {
        Err(format!(
            "no complete {} within {:?}",
            phase.what, phase.limit
        ))
    })
}

/// Sends the bytes read from the client at the edge (the ClientHello of a passthrough
/// connection, or data that followed a PROXY header) before the relay starts, and
/// returns how many. The buffer is freed here: an idle connection keeps none.
async fn forward_preface<B>(
    preface: Vec<u8>,
    backend: &mut B,
    upstream: &Upstream,
    counters: &Counters<'_>,
) -> Result<u32, Outcome>
where
    B: tokio::io::AsyncWrite + Unpin,
{
    if preface.is_empty() {
        return Ok(0);
    }
    let write = async {
        backend.write_all(&preface).await?;
        backend.flush().await
    };
    match timeout(upstream.connect_timeout, write).await {
        Ok(Ok(())) => {
            counters.client_to_backend.inc_by(preface.len() as u64);
            // The edge's reads are bounded (PROXY_MAX_HEADER, max_hello_size).
            Ok(u32::try_from(preface.len()).unwrap_or(u32::MAX))
        }
        _ => Err(Outcome {
            end: End::BackendReset,
            client_to_backend: 0,
            backend_to_client: 0,
        }),
    }
}

/// Records a connection's end in the metrics, the access log and the main log, and
/// keeps the listener's active-connections gauge while it lives.
struct Record {
    snapshot: Arc<Snapshot>,
    started: Instant,
    /// The listener's place in `snapshot.listeners`.
    route: u32,
    /// Bytes the edge read from the client and sent on before the relay (at most a
    /// PROXY header's or a ClientHello's bounded read), counted with the relay's.
    sent: u32,
}

impl Record {
    /// Counts a connection accepted on `listener`; `None` if the snapshot has no such
    /// listener.
    fn start(snapshot: Arc<Snapshot>, listener: &str) -> Option<Record> {
        // A config has far fewer than 2^32 listeners.
        let route = u32::try_from(snapshot.route_index(listener)?).ok()?;
        let record = Record {
            snapshot,
            started: Instant::now(),
            route,
            sent: 0,
        };
        let m = &record.route().metrics;
        m.accepted.inc();
        m.active.inc();
        Some(record)
    }

    fn route(&self) -> &Route {
        // The index came from this snapshot, whose listeners never change.
        &self.snapshot.listeners[self.route as usize]
    }

    /// Where the relay adds the bytes it moves.
    fn counters(&self) -> Counters<'_> {
        let m = &self.route().metrics;
        Counters {
            client_to_backend: m.bytes(Direction::ClientToBackend),
            backend_to_client: m.bytes(Direction::BackendToClient),
        }
    }

    fn refused(&self, r: &Refusal, upstream: Option<&str>) {
        let m = &self.route().metrics;
        let duration = self.started.elapsed();
        m.rejected(r.reason).inc();
        m.duration.observe(duration.as_secs_f64());
        let listener = &self.route().listener;
        let upstream = upstream.unwrap_or("-");
        if let Some(log) = &self.snapshot.access_log {
            log.record(&access_log::Entry {
                listener,
                client: r.client,
                upstream,
                backend: None,
                bytes_in: 0,
                bytes_out: 0,
                duration,
                reason: r.reason.as_str(),
            });
        }
        if matches!(
            r.reason,
            RejectReason::Denied | RejectReason::ClientLimit | RejectReason::ClientRate
        ) {
            // Refusals a hostile client can cause by the thousand a second: counted and
            // in the access log, logged only at debug (formatting a line costs more than
            // the refusal).
            tracing::debug!(target: LOG_TARGET, listener = %listener, client = %r.client, upstream, reason = r.reason.as_str(), error = %r.error, "connection rejected");
        } else {
            tracing::warn!(target: LOG_TARGET, listener = %listener, client = %r.client, upstream, reason = r.reason.as_str(), error = %r.error, "connection rejected");
        }
    }

    fn closed(&self, client: SocketAddr, upstream: &str, lease: &Lease, outcome: &Outcome) {
        let m = &self.route().metrics;
        let duration = self.started.elapsed();
        m.duration.observe(duration.as_secs_f64());
        m.closed(outcome.end).inc();
        let listener = &self.route().listener;
        let backend = lease.backend().address;
        let bm = &lease.backend().metrics;
        // What the edge sent on before the relay counts as the client's.
        let bytes_in = outcome.client_to_backend + u64::from(self.sent);
        if outcome.end == End::BackendClosed {
            bm.closed_by_operator.inc();
        }
        bm.bytes(Direction::ClientToBackend).inc_by(bytes_in);
        bm.bytes(Direction::BackendToClient)
            .inc_by(outcome.backend_to_client);
        if let Some(log) = &self.snapshot.access_log {
            log.record(&access_log::Entry {
                listener,
                client,
                upstream,
                backend: Some(backend),
                bytes_in,
                bytes_out: outcome.backend_to_client,
                duration,
                reason: outcome.end.as_str(),
            });
        }
        // Debug, not info: an ordinary close is expected, and formatting this line was
        // a large share of sluice's user-space instructions per connection (BENCHMARKS.md,
        // "The per-connection path: what the profile showed"). The
        // access log is the per-connection record, through its own writer.
        tracing::debug!(
            target: LOG_TARGET,
            listener = %listener,
            client = %client,
            upstream,
            backend = %backend,
            bytes_in,
            bytes_out = outcome.backend_to_client,
            duration_ms = duration.as_millis() as u64,
            reason = outcome.end.as_str(),
            "connection closed"
        );
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        self.route().metrics.active.dec();
    }
}

/// Resolves when the client has left before a backend was reached: it reset, or it
/// sent FIN without having sent data. A FIN after data (`sent_data`, or bytes still
/// unread) may be a half-close by a client that still waits for its answer, so that
/// client is kept; from then on only a reset ends the wait, seen as the socket's error
/// readiness (EPOLLERR), with no timer and no further system call while it waits.
///
/// `untouched`: nothing was read from the socket before (no PROXY header), so its
/// readiness is the kernel's own: readable without a FIN (EPOLLRDHUP) means data
/// waits, and no `peek` is needed to know it. A `peek` tells data from a bare FIN only
/// when a FIN was seen, or when an earlier read may have left the readiness stale.
async fn client_gone(client: &TcpStream, sent_data: bool, untouched: bool) {
    if !sent_data && left_without_data(client, untouched).await {
        return;
    }
    // Resolves only with the error bit set (a reset, or the readiness's own failure).
    let _ = client.ready(tokio::io::Interest::ERROR).await;
}

/// Waits for the client's first data or FIN: whether it reset, or sent FIN with no
/// data before it. With data unread, `peek` keeps returning it even after a reset; the
/// reset then shows as an error on the socket, which [`client_gone`] waits for.
async fn left_without_data(client: &TcpStream, untouched: bool) -> bool {
    use tokio::io::Interest;
    if untouched {
        match client.ready(Interest::READABLE | Interest::ERROR).await {
            Err(_) => return true,
            Ok(r) if r.is_error() => return true,
            Ok(r) if !r.is_read_closed() => return false,
            // A FIN: only a peek tells whether data came before it.
            Ok(_) => {}
        }
    }
    let mut probe = [0u8; 1];
    matches!(client.peek(&mut probe).await, Err(_) | Ok(0))
}
