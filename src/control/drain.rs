//! Graceful shutdown's last phase: let connections in flight finish until
//! `drain_timeout`, then cut what remains; and telling systemd where sluice stands.

use std::time::Duration;

use tokio::time::timeout;
use tokio_util::task::TaskTracker;

use crate::shutdown::{Shutdown, cancel};

/// How long cut connections get to finish closing after the drain deadline.
const CUT_GRACE: Duration = Duration::from_secs(5);

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
