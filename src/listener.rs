//! Listening sockets and the accept loop.
//!
//! The loop takes a `max_connections` permit *before* it accepts. A client over the cap
//! is therefore not refused: the kernel completes its handshake and holds it in the
//! listen backlog (`backlog`), where it waits, data unread, until a slot frees. Once the
//! backlog is full too, the kernel drops new SYNs and clients see their connect time out.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::sleep;
use tokio_util::task::TaskTracker;

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
    socket.bind(&address.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok(socket.into())
}

/// One listening socket of a listener, and what its accept loop shares.
pub struct Acceptor {
    pub name: Arc<str>,
    pub socket: TcpListener,
    /// The listener's `max_connections`, shared by all of its addresses.
    pub limit: Arc<Semaphore>,
    /// The process-wide cap that keeps descriptors for the admin endpoint, shared by all
    /// listeners: see [`fit_file_limit`].
    pub process_limit: Arc<Semaphore>,
}

impl Acceptor {
    /// Accepts until shutdown begins, then returns and so closes the socket.
    pub async fn serve(self, snapshots: SnapshotHandle, shutdown: Shutdown, tracker: TaskTracker) {
        let mut backoff = MIN_BACKOFF;
        loop {
            let permits = tokio::select! {
                p = Arc::clone(&self.limit).acquire_owned() => p,
                () = shutdown.stop_accepting.cancelled() => return,
            };
            let process_permit = tokio::select! {
                p = Arc::clone(&self.process_limit).acquire_owned() => p,
                () = shutdown.stop_accepting.cancelled() => return,
            };
            // The semaphores are never closed, so both permits are always granted.
            let (Ok(permit), Ok(process_permit)) = (permits, process_permit) else {
                return;
            };
            let permit = (permit, process_permit);
            let accepted = tokio::select! {
                a = self.socket.accept() => a,
                () = shutdown.stop_accepting.cancelled() => return,
            };
            match accepted {
                Ok((stream, peer)) => {
                    backoff = MIN_BACKOFF;
                    tracker.spawn(conn::handle(
                        stream,
                        peer,
                        snapshots.load_full(),
                        Arc::clone(&self.name),
                        shutdown.cut.clone(),
                        permit,
                    ));
                }
                Err(e) => {
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
                        () = shutdown.stop_accepting.cancelled() => return,
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
