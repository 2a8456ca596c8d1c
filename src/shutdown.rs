//! The shutdown tokens every accept loop and connection shares, and waiting on a token
//! without a lock per poll. The procedure (signals, drain, deadline) is the control
//! plane's: `control/signals.rs` and `control/drain.rs`.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

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
