//! Graceful shutdown. On SIGTERM or SIGINT: stop accepting at once, report not ready,
//! let connections in flight finish until `drain_timeout`, then cut what remains.
//! A second signal exits at once.

use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
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
    shutdown.cut.cancel();
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
