//! Listening sockets and the accept loop.
//!
//! The loop takes a `max_connections` permit *before* it accepts. A client over the cap
//! is therefore not refused: the kernel completes its handshake and holds it in the
//! listen backlog (`backlog`), where it waits, data unread, until a slot frees. Once the
//! backlog is full too, the kernel drops new SYNs and clients see their connect time out.
//!
//! Each configured address gets one socket per worker runtime ([`Workers`]): one in
//! `multi_thread` mode, one per thread in `per_core` mode. Several sockets for one
//! address share it through SO_REUSEPORT, and the kernel spreads new connections over
//! them; each socket's accept loop runs on its own worker, and so do the connections
//! it accepts.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustix::net::SocketFlags;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::data::conn;
use crate::data::gate::Gate;
use crate::data::held::{AtCap, Held, Watched};
use crate::data::inherited::{Inherited, listener_key};
use crate::data::runtime::Workers;
use crate::edge::admission::Revocations;
use crate::edge::client_table::ClientTable;
use crate::metrics::AcceptFailure;
use crate::shutdown::{self, Shutdown, Stopped};
use crate::snapshot::SnapshotHandle;

/// First pause after an accept error that needs resources to be freed (EMFILE, ENOMEM).
const MIN_BACKOFF: Duration = Duration::from_millis(5);
/// Longest pause: accepting resumes within this once descriptors are free again.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Descriptors kept free of proxied connections: stdio, the event loop, listening sockets,
/// admin connections, config and log files.
pub const RESERVED_FDS: u64 = 32;
/// Descriptors each per-core worker runtime holds, besides its listening sockets: its
/// reactor's epoll (held twice by tokio), its waker's eventfd and its copy of tokio's
/// signal pipe. Measured with tokio 1.54.
pub const WORKER_FDS: u64 = 4;

/// Descriptors per-core workers need beyond [`RESERVED_FDS`] (sized for one event loop
/// and one socket per address): each worker's event loop and its socket per address.
pub fn worker_fds(workers: usize, addresses: usize) -> u64 {
    (workers as u64).saturating_mul(WORKER_FDS + addresses as u64)
}

/// Raises the soft open-file limit to the hard limit, and returns how many proxied
/// connections (two descriptors each) the process can hold with [`RESERVED_FDS`] and
/// `extra` to spare.
pub fn fit_file_limit(extra: u64) -> usize {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let mut soft = limit.current.unwrap_or(u64::MAX);
    if limit.current.is_some() && limit.current != limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => soft = limit.maximum.unwrap_or(u64::MAX),
            Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
        }
    }
    usize::try_from(soft.saturating_sub(RESERVED_FDS.saturating_add(extra)) / 2)
        .unwrap_or(usize::MAX)
}

/// Binds a listening socket: SO_REUSEADDR so a restart does not wait out TIME_WAIT, and
/// IPV6_V6ONLY so `0.0.0.0:p` and `[::]:p` can be bound side by side.
pub fn bind(address: SocketAddr, backlog: u32) -> io::Result<std::net::TcpListener> {
    bind_shared(address, backlog, false)
}

/// [`bind`], with SO_REUSEPORT when `shared`: then other sockets with it (of the same
/// user) may bind the same address, and the kernel spreads connections over them.
fn bind_shared(
    address: SocketAddr,
    backlog: u32,
    shared: bool,
) -> io::Result<std::net::TcpListener> {
    let socket = unbound(address)?;
    if shared {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    // Accepted sockets inherit these from the listening socket on Linux: set once here,
    // they cost no system call per connection.
    socket.set_tcp_keepalive(&crate::upstream::KEEPALIVE)?;
    socket.set_tcp_nodelay(true)?;
    socket.bind(&address.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok(socket.into())
}

fn unbound(address: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if address.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    Ok(socket)
}

/// Binds one listening socket per worker to `address`, each registered with its
/// worker's reactor. With several workers the sockets share the address through
/// SO_REUSEPORT; with port 0 the first gets a port from the kernel and the rest join it.
///
/// With `adopted` sockets (inherited for this address: see `inherited.rs`), those are
/// used instead, all of them, spread over the workers in turn: every accept queue the
/// old process had keeps being served, even when this process has fewer workers. If it
/// has more, the rest are bound beside them when the adopted sockets share their address
/// (SO_REUSEPORT); otherwise (a socket from systemd without `ReusePort=`) the remaining
/// workers poll descriptors of the adopted sockets, which then share one accept queue.
fn bind_group(
    address: SocketAddr,
    backlog: u32,
    workers: &Workers,
    adopted: Vec<std::net::TcpListener>,
) -> io::Result<(SocketAddr, Vec<WorkerSocket>)> {
    if !adopted.is_empty() {
        return adopt_group(address, backlog, workers, adopted);
    }
    let shared = workers.handles().len() > 1;
    if shared && address.port() != 0 {
        // SO_REUSEPORT would let these sockets join one that another process (of the
        // same user: a second sluice, say) listens on, and share its traffic. A socket
        // without it cannot bind where anything listens, so this bind fails as a
        // plain one would. It is closed before the group binds.
        unbound(address)?.bind(&address.into())?;
    }
    let mut at = address;
    let mut sockets = Vec::with_capacity(workers.handles().len());
    for handle in workers.handles() {
        let socket = bind_shared(at, backlog, shared)?;
        if at.port() == 0 {
            at.set_port(socket.local_addr()?.port());
        }
        // Registers with the reactor of the runtime entered, which must be the worker's:
        // its accept loop polls the socket there.
        let _entered = handle.enter();
        // Deprecated for fds the AsyncFd does not own; this one owns it.
        #[allow(deprecated)]
        let socket = AsyncFd::new(socket)?;
        sockets.push((handle.clone(), Arc::new(socket)));
    }
    Ok((at, sockets))
}

/// [`bind_group`] for inherited sockets.
fn adopt_group(
    address: SocketAddr,
    backlog: u32,
    workers: &Workers,
    adopted: Vec<std::net::TcpListener>,
) -> io::Result<(SocketAddr, Vec<WorkerSocket>)> {
    let handles = workers.handles();
    let local = adopted[0].local_addr()?;
    let shares = Socket::from(adopted[0].try_clone()?).reuse_port()?;
    let mut sockets = Vec::with_capacity(adopted.len().max(handles.len()));
    for (i, listener) in adopted.into_iter().enumerate() {
        let socket = Socket::from(listener);
        socket.set_nonblocking(true)?;
        // listen(2) again on a listening socket sets its backlog: this config's.
        socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
        let handle = &handles[i % handles.len()];
        let _entered = handle.enter();
        #[allow(deprecated)]
        let socket = AsyncFd::new(std::net::TcpListener::from(socket))?;
        sockets.push((handle.clone(), Arc::new(socket)));
    }
    let adopted_count = sockets.len();
    if adopted_count < handles.len() {
        if shares {
            for handle in &handles[adopted_count..] {
                let socket = bind_shared(local, backlog, true)?;
                let _entered = handle.enter();
                #[allow(deprecated)]
                let socket = AsyncFd::new(socket)?;
                sockets.push((handle.clone(), Arc::new(socket)));
            }
        } else {
            tracing::info!(
                address = %address,
                adopted = adopted_count,
                workers = handles.len(),
                "the inherited socket has no SO_REUSEPORT: the workers share its accept queue"
            );
            for (i, handle) in handles[adopted_count..].iter().enumerate() {
                let socket = sockets[i % adopted_count].1.get_ref().try_clone()?;
                let _entered = handle.enter();
                #[allow(deprecated)]
                let socket = AsyncFd::new(socket)?;
                sockets.push((handle.clone(), Arc::new(socket)));
            }
        }
    }
    Ok((local, sockets))
}

/// A listening address that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot bind {what} to {address}: {source}")]
pub struct BindError {
    pub what: String,
    pub address: SocketAddr,
    pub source: io::Error,
}

/// Every bound listening socket, reconciled with each config.
pub struct Listeners {
    /// By listener name and configured address.
    running: HashMap<(String, SocketAddr), Running>,
    /// Each listener's `max_connections`.
    limits: HashMap<String, Arc<Gate>>,
    /// The process-wide cap that keeps descriptors for the admin endpoint: see
    /// [`fit_file_limit`].
    process_limit: Arc<Gate>,
    snapshots: SnapshotHandle,
    shutdown: Shutdown,
    tracker: TaskTracker,
    /// Where accept loops and their connections run: one socket per worker per address.
    workers: Workers,
    /// Each listener's accept queues, time at its cap and per-client table, for the
    /// admin endpoint to sample; the tables and `AtCap`s live here across reloads.
    held: Arc<Held>,
    /// Sockets handed over or passed by systemd, adopted by the first apply.
    inherited: Inherited,
}

/// The accept loops of one configured address, one per worker.
struct Running {
    /// Stops these accept loops alone (a child of the shutdown token).
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// As bound: port 0 resolved. What the admin endpoint's `/listeners` reports.
    local: SocketAddr,
    /// The sockets the accept loops poll, shared with them, for a handover.
    sockets: Vec<Arc<AsyncFd<std::net::TcpListener>>>,
}

/// The sockets bound for one configured address of a listener, not yet serving.
pub struct Bound {
    listener: String,
    /// As configured (the key across reloads), which may have port 0.
    address: SocketAddr,
    /// As bound: port 0 resolved.
    local: SocketAddr,
    sockets: Vec<WorkerSocket>,
}

/// A listening socket registered with a worker's reactor, and that worker. Shared
/// between the accept loop and [`Running`], which hands it over in an upgrade; it
/// closes when both let go.
type WorkerSocket = (Handle, Arc<AsyncFd<std::net::TcpListener>>);

/// What a reconcile changed, for the reload log line.
#[derive(Debug, Default)]
pub struct Changes {
    pub bound: Vec<String>,
    pub closed: Vec<String>,
}

impl Listeners {
    pub fn new(
        process_cap: usize,
        snapshots: SnapshotHandle,
        shutdown: Shutdown,
        tracker: TaskTracker,
        workers: Workers,
        held: Arc<Held>,
    ) -> Listeners {
        Listeners {
            held,
            running: HashMap::new(),
            limits: HashMap::new(),
            process_limit: Gate::new(process_cap),
            snapshots,
            shutdown,
            tracker,
            workers,
            inherited: Inherited::default(),
        }
    }

    /// Sockets for the first apply to adopt before it binds anything.
    pub fn inherit(&mut self, inherited: Inherited) {
        self.inherited = inherited;
    }

    /// Takes an inherited socket for `key` or `address` (see [`Inherited::take`]).
    pub fn take_inherited(&mut self, key: &str, address: SocketAddr) -> Vec<std::net::TcpListener> {
        self.inherited.take(key, address)
    }

    /// Closes the inherited sockets no listener adopted; returns how many.
    pub fn close_inherited(&mut self) -> usize {
        self.inherited.close_rest()
    }

    /// Every listening socket, with its key for the process that takes them over.
    pub fn handover(&self) -> Vec<(String, Arc<AsyncFd<std::net::TcpListener>>)> {
        let mut all = Vec::new();
        for ((name, address), r) in &self.running {
            for socket in &r.sockets {
                all.push((listener_key(name, *address), Arc::clone(socket)));
            }
        }
        all
    }

    /// Binds what `config` adds and resizes limits; returns the sockets to start. Nothing
    /// changes if any bind fails.
    pub fn bind_new(&mut self, config: &Config) -> Result<Vec<Bound>, BindError> {
        let mut bound = Vec::new();
        for l in &config.listeners {
            for &address in &l.bind {
                if self.running.contains_key(&(l.name.clone(), address)) {
                    continue;
                }
                let adopted = self
                    .inherited
                    .take(&listener_key(&l.name, address), address);
                let (local, sockets) = bind_group(address, l.backlog, &self.workers, adopted)
                    .map_err(|source| BindError {
                        what: format!("listener {:?}", l.name),
                        address,
                        source,
                    })?;
                bound.push(Bound {
                    listener: l.name.clone(),
                    address,
                    local,
                    sockets,
                });
            }
        }
        Ok(bound)
    }

    /// Starts the sockets from [`Listeners::bind_new`] and stops those `config` no longer
    /// has. Call after the new snapshot is stored, so new sockets route by it.
    pub fn apply(&mut self, config: &Config, bound: Vec<Bound>) -> Changes {
        let mut changes = Changes::default();
        let mut held = self.held.0.lock().unwrap_or_else(|p| p.into_inner());
        for l in &config.listeners {
            match self.limits.get(&l.name) {
                Some(limit) => limit.resize(l.max_connections),
                None => {
                    self.limits
                        .insert(l.name.clone(), Gate::new(l.max_connections));
                }
            }
            let table_size = l
                .client_limits
                .as_ref()
                .map_or(crate::config::DEFAULT_CLIENT_TABLE_SIZE, |c| c.table_size);
            let w = held.entry(l.name.clone()).or_insert_with(|| Watched {
                at_cap: Arc::new(AtCap::default()),
                clients: ClientTable::new(table_size),
                revocations: Revocations::new(l.access.clone()),
                backlog: l.backlog,
                sockets: HashMap::new(),
            });
            w.clients.resize(table_size);
            w.revocations.update(l.access.as_ref());
            w.backlog = l.backlog;
        }
        for b in bound {
            let (name, local) = (b.listener, b.local);
            // Once per address, however many sockets: tests and operators read this line.
            tracing::info!(listener = %name, address = %local, "listening");
            changes.bound.push(format!("{name}@{local}"));
            let stop = self.shutdown.stop_accepting.child_token();
            let shared_name: Arc<str> = Arc::from(name.as_str());
            // The loop above made one for every listener of the config.
            let Some(watched) = held.get_mut(&name) else {
                continue;
            };
            let inodes = b
                .sockets
                .iter()
                .filter_map(|(_, s)| rustix::fs::fstat(s.get_ref()).ok())
                .map(|st| st.st_ino)
                .collect();
            watched.sockets.insert(b.address, inodes);
            let sockets = b.sockets.iter().map(|(_, s)| Arc::clone(s)).collect();
            let tasks = b
                .sockets
                .into_iter()
                .map(|(worker, socket)| {
                    let acceptor = Acceptor {
                        name: Arc::clone(&shared_name),
                        socket,
                        limit: Arc::clone(&self.limits[&name]),
                        process_limit: Arc::clone(&self.process_limit),
                        at_cap: Arc::clone(&watched.at_cap),
                        clients: Arc::clone(&watched.clients),
                        revocations: Arc::clone(&watched.revocations),
                    };
                    worker.spawn(acceptor.serve(
                        Arc::clone(&self.snapshots),
                        stop.clone(),
                        self.shutdown.cut.clone(),
                        self.tracker.clone(),
                    ))
                })
                .collect();
            self.running.insert(
                (name, b.address),
                Running {
                    stop,
                    tasks,
                    local,
                    sockets,
                },
            );
        }
        let wanted: HashSet<(String, SocketAddr)> = config
            .listeners
            .iter()
            .flat_map(|l| l.bind.iter().map(|a| (l.name.clone(), *a)))
            .collect();
        let gone: Vec<_> = self
            .running
            .keys()
            .filter(|k| !wanted.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            if let Some(w) = held.get_mut(&key.0) {
                w.sockets.remove(&key.1);
            }
            if let Some(r) = self.running.remove(&key) {
                shutdown::cancel(&r.stop);
                tracing::info!(listener = %key.0, address = %key.1, "stopped listening");
                changes.closed.push(format!("{}@{}", key.0, key.1));
            }
        }
        self.limits
            .retain(|name, _| config.listeners.iter().any(|l| &l.name == name));
        held.retain(|name, _| config.listeners.iter().any(|l| &l.name == name));
        changes
    }

    /// The bound address of each listening address of `config`, by listener, in config
    /// order (port 0 resolved).
    pub fn addresses(&self, config: &Config) -> Vec<(String, Vec<SocketAddr>)> {
        config
            .listeners
            .iter()
            .map(|l| {
                let bound = l
                    .bind
                    .iter()
                    .filter_map(|a| self.running.get(&(l.name.clone(), *a)).map(|r| r.local))
                    .collect();
                (l.name.clone(), bound)
            })
            .collect()
    }

    /// Waits for every accept loop to return (after shutdown began).
    pub async fn stopped(&mut self) {
        for (_, r) in self.running.drain() {
            for task in r.tasks {
                // An accept loop only ends by returning; a panic there is already logged.
                let _ = task.await;
            }
        }
    }
}

/// One listening socket of a listener, and what its accept loop shares.
struct Acceptor {
    name: Arc<str>,
    /// Polled for readiness before any permit is taken: see [`Acceptor::serve`].
    socket: Arc<AsyncFd<std::net::TcpListener>>,
    limit: Arc<Gate>,
    process_limit: Arc<Gate>,
    /// The listener's time at its cap: counted while this loop waits for a slot.
    at_cap: Arc<AtCap>,
    clients: Arc<ClientTable>,
    revocations: Arc<Revocations>,
}

impl Acceptor {
    /// Accepts until `stop` (shutdown, or the listener's removal), then returns and so
    /// closes the socket.
    async fn serve(
        self,
        snapshots: SnapshotHandle,
        stop: CancellationToken,
        cut: CancellationToken,
        tracker: TaskTracker,
    ) {
        let mut backoff = MIN_BACKOFF;
        // One wait on `stop` for the loop's life, asked without a lock on each accept.
        let mut stopped = std::pin::pin!(Stopped::new(&stop));
        loop {
            // Wait for a connection to be pending before taking permits: a loop waiting
            // on a quiet address must not hold a slot that another address of the same
            // listener (or another listener) could use.
            let mut ready = tokio::select! {
                r = self.socket.readable() => match r {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(listener = %self.name, error = %e, "listening socket failed");
                        return;
                    }
                },
                () = &mut stopped => return,
            };
            let permit = match self.limit.try_take() {
                Some(p) => p,
                None => {
                    let _waiting = self.at_cap.waiting();
                    tokio::select! {
                        p = self.limit.take() => p,
                        () = &mut stopped => return,
                    }
                }
            };
            let process_permit = match self.process_limit.try_take() {
                Some(p) => p,
                None => {
                    let _waiting = self.at_cap.waiting();
                    tokio::select! {
                        p = self.process_limit.take() => p,
                        () = &mut stopped => return,
                    }
                }
            };
            let accepted = match ready.try_io(|l| accept(l.get_ref())) {
                Ok(a) => a.and_then(|(s, peer)| Ok((TcpStream::from_std(s)?, peer))),
                // The client gave up before we accepted; readiness is cleared.
                Err(_would_block) => continue,
            };
            match accepted {
                Ok((stream, peer)) => {
                    backoff = MIN_BACKOFF;
                    tracker.spawn(conn::handle(Box::new(conn::Accepted {
                        client: stream,
                        peer,
                        snapshot: snapshots.load_full(),
                        listener: Arc::clone(&self.name),
                        stop: cut.clone(),
                        permits: (permit, process_permit),
                        clients: Arc::clone(&self.clients),
                        revocations: Arc::clone(&self.revocations),
                    })));
                }
                Err(e) => {
                    drop((permit, process_permit));
                    let failure = classify(&e);
                    if let Some(route) = snapshots.load().route(&self.name) {
                        route.metrics.accept_error(failure).inc();
                    }
                    if failure == AcceptFailure::Aborted {
                        continue;
                    }
                    tracing::warn!(listener = %self.name, error = %e, pause_ms = backoff.as_millis() as u64, "accept failed; pausing");
                    tokio::select! {
                        () = sleep(backoff) => {},
                        () = &mut stopped => return,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

/// accept4(2) with the new socket non-blocking and close-on-exec from the start:
/// `std`'s `accept` would need another system call (`ioctl`) to make it non-blocking.
fn accept(listener: &std::net::TcpListener) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    let flags = SocketFlags::NONBLOCK | SocketFlags::CLOEXEC;
    let (fd, peer) = rustix::net::acceptfrom_with(listener, flags)?;
    let peer = peer
        .and_then(|p| SocketAddr::try_from(p).ok())
        .ok_or_else(|| io::Error::other("accepted a socket with no IP peer address"))?;
    Ok((std::net::TcpStream::from(fd), peer))
}

fn classify(e: &io::Error) -> AcceptFailure {
    match e.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE) => AcceptFailure::FileLimit,
        Some(libc::ENOBUFS | libc::ENOMEM) => AcceptFailure::Memory,
        Some(libc::ECONNABORTED | libc::ECONNRESET | libc::EPROTO | libc::EPERM | libc::EINTR) => {
            AcceptFailure::Aborted
        }
        _ => AcceptFailure::Other,
    }
}
