//! Graceful shutdown. On SIGTERM or SIGINT: stop accepting at once, report not ready,
//! let connections in flight finish until `drain_timeout`, then cut what remains.
//! A second signal exits at once.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::time::timeout;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;

/// Exit status when a second signal cuts the drain short.
pub const EXIT_INTERRUPTED: i32 = 130;
/// How long cut connections get to finish closing after the drain deadline.
const CUT_GRACE: Duration = Duration::from_secs(5);

/// The two phases of shutdown, shared by every accept loop and connection.
#[derive(Clone, Default)]
pub struct Shutdown {
    /// Cancelled when the first signal arrives: accept loops return and close their sockets.
    pub stop_accepting: CancellationToken,
    /// Cancelled at the drain deadline: relays still running close their connections.
    pub cut: CancellationToken,
}

/// Token cancellations begun and finished, process-wide: see [`cancel`].
static CANCELS_BEGUN: AtomicU64 = AtomicU64::new(0);
static CANCELS_DONE: AtomicU64 = AtomicU64::new(0);

/// Cancels `token`. Every cancellation in sluice goes through here (clippy.toml
/// disallows `CancellationToken::cancel` elsewhere), so that [`Stopped`] can tell
/// without a lock whether its token may have been cancelled.
#[allow(clippy::disallowed_methods)]
pub fn cancel(token: &CancellationToken) {
    CANCELS_BEGUN.fetch_add(1, Ordering::SeqCst);
    token.cancel();
    CANCELS_DONE.fetch_add(1, Ordering::SeqCst);
}

pin_project_lite::pin_project! {
    /// Waits for a token to be cancelled, like `token.cancelled()`, but asks the token
    /// only on its first poll (which registers the waker) and when a [`cancel`] finished
    /// since it last asked or is under way. Asking a `CancellationToken` takes two
    /// mutexes, and the tokens that connections wait on (a backend's `removed`, the
    /// shutdown cut, a listener's stop) are shared by every connection on every worker
    /// thread, so a wait polled whenever the connection's task wakes would take them
    /// on every poll.
    ///
    /// No cancellation is missed: the token's wake-up comes from inside `token.cancel()`,
    /// when `CANCELS_BEGUN` is already counted and `CANCELS_DONE` not yet, so the poll it
    /// causes sees them differ, or sees `CANCELS_DONE` moved on from what it last saw.
    /// The registration stays good as long as the waker does not change: poll it from
    /// one task only, as every use in sluice does.
    pub struct Stopped<'a> {
        #[pin]
        wait: WaitForCancellationFuture<'a>,
        // `CANCELS_DONE` read before the token was last asked; `u64::MAX` before the
        // first poll.
        seen: u64,
    }
}

impl<'a> Stopped<'a> {
    pub fn new(token: &'a CancellationToken) -> Stopped<'a> {
        Stopped {
            wait: token.cancelled(),
            seen: u64::MAX,
        }
    }
}

impl Future for Stopped<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        // Read before asking the token, as `seen` must be.
        let done = CANCELS_DONE.load(Ordering::SeqCst);
        let begun = CANCELS_BEGUN.load(Ordering::SeqCst);
        if done == *this.seen && begun == done {
            return Poll::Pending;
        }
        if this.wait.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        *this.seen = done;
        Poll::Pending
    }
}

/// Waits for SIGTERM or SIGINT and returns its name.
pub async fn signalled() -> std::io::Result<&'static str> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

/// Waits for the connections in `tracker` to finish, cutting them at `deadline`.
/// Returns how many had to be cut.
pub async fn drain(tracker: &TaskTracker, shutdown: &Shutdown, deadline: Duration) -> usize {
    tracker.close();
    if timeout(deadline, tracker.wait()).await.is_ok() {
        return 0;
    }
    let remaining = tracker.len();
    tracing::info!(
        connections = remaining,
        "drain deadline reached; closing what remains"
    );
    cancel(&shutdown.cut);
    if timeout(CUT_GRACE, tracker.wait()).await.is_err() {
        tracing::warn!(
            connections = tracker.len(),
            "connections still closing after the cut"
        );
    }
    remaining
}

/// Tells systemd (`Type=notify`) about a state change, if sluice runs under it: a
/// datagram to `$NOTIFY_SOCKET`, such as `READY=1` or `STOPPING=1`. Elsewhere, nothing.
pub fn notify_systemd(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name),
        None => SocketAddr::from_pathname(&path),
    };
    let sent = UnixDatagram::unbound()
        .and_then(|socket| addr.and_then(|addr| socket.send_to_addr(state.as_bytes(), &addr)));
    if let Err(e) = sent {
        tracing::warn!(error = %e, state, "cannot notify systemd");
    }
}

/// Exits the process at once when a second signal arrives during the drain.
pub fn exit_on_second_signal() {
    tokio::spawn(async {
        if let Ok(name) = signalled().await {
            tracing::warn!(
                signal = name,
                "second signal: exiting without finishing the drain"
            );
            std::process::exit(EXIT_INTERRUPTED);
        }
    });
}
