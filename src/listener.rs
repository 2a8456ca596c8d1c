//! Listening sockets and the accept loop.
//!
//! The loop takes a `max_connections` permit *before* it accepts. A client over the cap
//! is therefore not refused: the kernel completes its handshake and holds it in the
//! listen backlog (`backlog`), where it waits, data unread, until a slot frees. Once the
//! backlog is full too, the kernel drops new SYNs and clients see their connect time out.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::conn;
use crate::metrics::AcceptFailure;
use crate::shutdown::Shutdown;
use crate::snapshot::SnapshotHandle;

/// First pause after an accept error that needs resources to be freed (EMFILE, ENOMEM).
const MIN_BACKOFF: Duration = Duration::from_millis(5);
/// Longest pause: accepting resumes within this once descriptors are free again.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Descriptors kept free of proxied connections: stdio, the event loop, listening sockets,
/// admin connections, config and log files.
pub const RESERVED_FDS: u64 = 32;

/// Raises the soft open-file limit to the hard limit, and returns how many proxied
/// connections (two descriptors each) the process can hold with [`RESERVED_FDS`] to spare.
pub fn fit_file_limit() -> usize {
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
    usize::try_from(soft.saturating_sub(RESERVED_FDS) / 2)
        .unwrap_or(usize::MAX)
        .min(Semaphore::MAX_PERMITS)
}

/// Binds a listening socket: SO_REUSEADDR so a restart does not wait out TIME_WAIT, and
/// IPV6_V6ONLY so `0.0.0.0:p` and `[::]:p` can be bound side by side.
pub fn bind(address: SocketAddr, backlog: u32) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if address.is_ipv6() {
        socket.set_only_v6(true)?;
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

/// A listener's `max_connections`, resizable by a reload while connections are open.
pub struct Limit {
    semaphore: Arc<Semaphore>,
    max: AtomicUsize,
    /// Permits to withdraw as connections close, after a reload lowered `max` below the
    /// number of permits that were free.
    debt: AtomicUsize,
}

impl Limit {
    pub fn new(max: usize) -> Arc<Limit> {
        Arc::new(Limit {
            semaphore: Arc::new(Semaphore::new(max)),
            max: AtomicUsize::new(max),
            debt: AtomicUsize::new(0),
        })
    }

    pub fn resize(&self, max: usize) {
        let old = self.max.swap(max, Ordering::SeqCst);
        if max > old {
            let mut more = max - old;
            let repaid = self
                .debt
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |d| {
                    Some(d - d.min(more))
                })
                .unwrap_or(0);
            more -= repaid.min(more);
            self.semaphore.add_permits(more);
        } else {
            let fewer = old - max;
            let withdrawn = self.semaphore.forget_permits(fewer);
            self.debt.fetch_add(fewer - withdrawn, Ordering::SeqCst);
        }
    }

    async fn acquire(self: &Arc<Self>) -> Option<Permit> {
        let permit = Arc::clone(&self.semaphore).acquire_owned().await.ok()?;
        Some(Permit {
            permit: Some(permit),
            limit: Arc::clone(self),
        })
    }
}

/// A connection's slot under its listener's [`Limit`].
pub struct Permit {
    permit: Option<OwnedSemaphorePermit>,
    limit: Arc<Limit>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let in_debt = self
            .limit
            .debt
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |d| d.checked_sub(1))
            .is_ok();
        if in_debt && let Some(p) = self.permit.take() {
            p.forget();
        }
    }
}

/// Every bound listening socket, reconciled with each config.
pub struct Listeners {
    /// By listener name and configured address.
    running: HashMap<(String, SocketAddr), Running>,
    limits: HashMap<String, Arc<Limit>>,
    /// The process-wide cap that keeps descriptors for the admin endpoint: see
    /// [`fit_file_limit`].
    process_limit: Arc<Semaphore>,
    snapshots: SnapshotHandle,
    shutdown: Shutdown,
    tracker: TaskTracker,
}

struct Running {
    /// Stops this socket's accept loop alone (a child of the shutdown token).
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// A socket bound for a listener and not yet serving: (listener, configured address, socket).
pub type Bound = (String, SocketAddr, AsyncFd<std::net::TcpListener>);

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
    ) -> Listeners {
        Listeners {
            running: HashMap::new(),
            limits: HashMap::new(),
            process_limit: Arc::new(Semaphore::new(process_cap)),
            snapshots,
            shutdown,
            tracker,
        }
    }

    /// Binds what `config` adds and resizes limits; returns the sockets to start. Nothing
    /// changes if any bind fails.
    pub fn bind_new(&self, config: &Config) -> Result<Vec<Bound>, crate::Error> {
        let mut bound = Vec::new();
        for l in &config.listeners {
            for &address in &l.bind {
                if self.running.contains_key(&(l.name.clone(), address)) {
                    continue;
                }
                let socket = bind(address, l.backlog)
                    // Deprecated for fds the AsyncFd does not own; this one owns it.
                    .and_then(|s| {
                        #[allow(deprecated)]
                        AsyncFd::new(s)
                    })
                    .map_err(|source| crate::Error::Bind {
                        what: format!("listener {:?}", l.name),
                        address,
                        source,
                    })?;
                bound.push((l.name.clone(), address, socket));
            }
        }
        Ok(bound)
    }

    /// Starts the sockets from [`Listeners::bind_new`] and stops those `config` no longer
    /// has. Call after the new snapshot is stored, so new sockets route by it.
    pub fn apply(&mut self, config: &Config, bound: Vec<Bound>) -> Changes {
        let mut changes = Changes::default();
        for l in &config.listeners {
            match self.limits.get(&l.name) {
                Some(limit) => limit.resize(l.max_connections),
                None => {
                    self.limits
                        .insert(l.name.clone(), Limit::new(l.max_connections));
                }
            }
        }
        for (name, address, socket) in bound {
            let local = socket
                .get_ref()
                .local_addr()
                .map_or_else(|_| address.to_string(), |a| a.to_string());
            tracing::info!(listener = %name, address = %local, "listening");
            changes.bound.push(format!("{name}@{local}"));
            let stop = self.shutdown.stop_accepting.child_token();
            let acceptor = Acceptor {
                name: Arc::from(name.as_str()),
                socket,
                limit: Arc::clone(&self.limits[&name]),
                process_limit: Arc::clone(&self.process_limit),
            };
            let task = tokio::spawn(acceptor.serve(
                Arc::clone(&self.snapshots),
                stop.clone(),
                self.shutdown.cut.clone(),
                self.tracker.clone(),
            ));
            self.running.insert((name, address), Running { stop, task });
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
            if let Some(r) = self.running.remove(&key) {
                r.stop.cancel();
                tracing::info!(listener = %key.0, address = %key.1, "stopped listening");
                changes.closed.push(format!("{}@{}", key.0, key.1));
            }
        }
        self.limits
            .retain(|name, _| config.listeners.iter().any(|l| &l.name == name));
        changes
    }

    /// Waits for every accept loop to return (after shutdown began).
    pub async fn stopped(&mut self) {
        for (_, r) in self.running.drain() {
            // An accept loop only ends by returning; a panic there is already logged.
            let _ = r.task.await;
        }
    }
}

/// One listening socket of a listener, and what its accept loop shares.
struct Acceptor {
    name: Arc<str>,
    /// Polled for readiness before any permit is taken: see [`Acceptor::serve`].
    socket: AsyncFd<std::net::TcpListener>,
    limit: Arc<Limit>,
    process_limit: Arc<Semaphore>,
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
                () = stop.cancelled() => return,
            };
            let permit = tokio::select! {
                p = self.limit.acquire() => p,
                () = stop.cancelled() => return,
            };
            let process_permit = tokio::select! {
                p = Arc::clone(&self.process_limit).acquire_owned() => p.ok(),
                () = stop.cancelled() => return,
            };
            // The semaphores are never closed, so both permits are always granted.
            let (Some(permit), Some(process_permit)) = (permit, process_permit) else {
                return;
            };
            let accepted = match ready.try_io(|l| l.get_ref().accept()) {
                Ok(a) => a.and_then(|(s, peer)| {
                    s.set_nonblocking(true)?;
                    Ok((TcpStream::from_std(s)?, peer))
                }),
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
                        () = stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
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
