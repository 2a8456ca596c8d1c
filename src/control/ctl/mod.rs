//! The control socket: runtime changes an operator makes with `sluice ctl` (drain,
//! maint, weight, readiness, reload, close). Separate from the read-only admin
//! endpoint: a Unix socket created mode 0600 (the peer's uid, from SO_PEERCRED, is
//! logged with each change) and, if configured, a loopback TCP address that requires a
//! bearer token. JSON in and out; mutations are POST only.
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | binding the sockets (stale socket, directory checks, token file) and serving |
//! | `routes.rs` | the routes, bounded requests, the token check, the operations |
//! | `overrides.rs` | the overrides store by backend entry; applied to every snapshot; the state file |
//! | `client.rs` | `sluice ctl`: the client the binary's `ctl` command runs |

pub mod client;
pub mod overrides;
mod routes;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, oneshot};

use crate::config::Control;
use crate::control::admin::Status;
use crate::metrics::Metrics;
use crate::snapshot::SnapshotHandle;

pub use overrides::Overrides;

/// Control connections open at once, both sockets together; more are closed at once, so
/// a client that opens many (on TCP, even without the token) cannot take sluice's
/// descriptors. An operator's tool opens one at a time.
const MAX_CONNECTIONS: usize = 64;

/// A reload asked for through the control socket: the reply is the generation in force
/// after it, or the error (with file:line:col for a config error).
pub type ReloadRequest = oneshot::Sender<Result<u64, String>>;

/// A binary upgrade asked for on the control socket: the binary (`None`: sluice's own
/// path), and where the server loop answers with the upgrade started (or why not).
pub type UpgradeRequest = (
    Option<PathBuf>,
    oneshot::Sender<Result<crate::control::upgrade::Started, String>>,
);

/// Why the control socket could not be set up at start.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error(
        "control socket {socket}: the directory {dir} does not exist (create it, e.g. RuntimeDirectory=sluice in systemd, or set [control] socket)"
    )]
    NoDirectory { socket: PathBuf, dir: PathBuf },
    #[error(
        "control socket {socket}: the directory {dir} is writable by every user (mode {mode:o}); anyone could replace the socket: use a directory only sluice's user can write"
    )]
    WorldWritable {
        socket: PathBuf,
        dir: PathBuf,
        mode: u32,
    },
    #[error("control socket {0}: another sluice is listening on it")]
    InUse(PathBuf),
    #[error("control socket {0}: the path exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control token file {path}: {message}")]
    Token { path: PathBuf, message: String },
    #[error("control TCP address {address}: {source}")]
    Tcp {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    State(#[from] overrides::StateError),
}

/// What the routes act on.
pub struct Ctl {
    pub overrides: Arc<Overrides>,
    pub snapshots: SnapshotHandle,
    pub status: Arc<Status>,
    pub metrics: Arc<Metrics>,
    pub reloads: mpsc::Sender<ReloadRequest>,
    pub upgrades: mpsc::Sender<UpgradeRequest>,
    /// The connections being served: a process that exits waits a moment for them, so
    /// that the answer to `sluice ctl upgrade` reaches its client.
    pub connections: tokio_util::task::TaskTracker,
    /// Where the control sockets are, for `GET /v1/control` (a TCP port 0 resolved).
    pub socket: PathBuf,
    pub tcp: Option<std::net::SocketAddr>,
}

/// Who made a request, for the log line of each change.
#[derive(Debug, Clone)]
pub enum Peer {
    /// On the Unix socket, from SO_PEERCRED.
    Unix { uid: u32, pid: Option<i32> },
    /// On TCP, with the right bearer token.
    Token,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Unix {
                uid,
                pid: Some(pid),
            } => write!(f, "uid {uid} (pid {pid})"),
            Peer::Unix { uid, pid: None } => write!(f, "uid {uid}"),
            Peer::Token => f.write_str("token"),
        }
    }
}

/// The control sockets, bound at start before the first config is applied.
pub struct Bound {
    unix: UnixListener,
    path: PathBuf,
    tcp: Option<(TcpListener, Arc<[u8]>)>,
}

impl Bound {
    /// Where the Unix socket is, for the log and to remove it at exit.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tcp_address(&self) -> Option<std::net::SocketAddr> {
        self.tcp.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }
}

/// Binds the control sockets `control` names. The Unix socket is bound under a
/// temporary name, set to mode 0600, then renamed into place, so it is never reachable
/// with a wider mode. A socket file left by a crashed sluice (nobody answers on it) is
/// replaced; one that answers is another sluice, and refused.
pub fn bind(control: &Control) -> Result<Bound, CtlError> {
    let path = control.socket.clone();
    let io = |source| CtlError::Io {
        path: path.clone(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let meta = match std::fs::metadata(&dir) {
        Ok(m) if m.is_dir() => m,
        _ => {
            return Err(CtlError::NoDirectory {
                socket: path.clone(),
                dir,
            });
        }
    };
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o002 != 0 {
        return Err(CtlError::WorldWritable {
            socket: path.clone(),
            dir,
            mode,
        });
    }
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                return Err(CtlError::InUse(path.clone()));
            }
            tracing::info!(socket = %path.display(), "removing a stale control socket (nobody listens on it)");
            std::fs::remove_file(&path).map_err(io)?;
        }
        Ok(_) => return Err(CtlError::NotASocket(path.clone())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let name = path
        .file_name()
        .map_or_else(|| "ctl.sock".into(), |n| n.to_string_lossy().into_owned());
    let temporary = dir.join(format!(".{name}.{}", std::process::id()));
    let _ = std::fs::remove_file(&temporary);
    let unix = UnixListener::bind(&temporary).map_err(io)?;
    let placed = std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&temporary, &path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&temporary);
        return Err(io(e));
    }
    let tcp = match (control.tcp, &control.token_file) {
        (Some(address), Some(token_file)) => {
            let token = read_token(token_file)?;
            let socket = std::net::TcpListener::bind(address)
                .and_then(|l| {
                    l.set_nonblocking(true)?;
                    TcpListener::from_std(l)
                })
                .map_err(|source| CtlError::Tcp { address, source })?;
            Some((socket, token))
        }
        _ => None,
    };
    Ok(Bound { unix, path, tcp })
}

/// The bearer token: the file's first line, which must not be empty. A file that
/// others may read is warned about.
fn read_token(path: &Path) -> Result<Arc<[u8]>, CtlError> {
    let err = |message: String| CtlError::Token {
        path: path.to_path_buf(),
        message,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(token_file = %path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777), "the control token file is readable by other users: chmod 600 it");
    }
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let token = text.lines().next().unwrap_or("").trim();
    if token.is_empty() {
        return Err(err(
            "the file is empty: the TCP control socket is refused without a token".to_string(),
        ));
    }
    Ok(Arc::from(token.as_bytes()))
}

/// Serves the control sockets until the task is aborted: both accept loops run in this
/// one task, so aborting it closes both sockets (an upgrade frees them for its new
/// process that way).
pub async fn serve(bound: Bound, ctl: Arc<Ctl>) {
    let Bound { unix, tcp, .. } = bound;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let tcp_loop = async {
        let Some((socket, token)) = tcp else { return };
        loop {
            match socket.accept().await {
                Ok((stream, _)) => {
                    let Some(slot) = take(&slots) else { continue };
                    let _ = stream.set_nodelay(true);
                    let token = Some(Arc::clone(&token));
                    connection(stream, Arc::clone(&ctl), None, token, slot);
                }
                Err(e) => accept_failed(e).await,
            }
        }
    };
    let unix_loop = async {
        loop {
            match unix.accept().await {
                Ok((stream, _)) => {
                    let Some(slot) = take(&slots) else { continue };
                    let peer = match stream.peer_cred() {
                        Ok(c) => Peer::Unix {
                            uid: c.uid(),
                            pid: c.pid(),
                        },
                        Err(e) => {
                            tracing::warn!(error = %e, "control socket: no peer credentials; connection closed");
                            continue;
                        }
                    };
                    connection(stream, Arc::clone(&ctl), Some(peer), None, slot);
                }
                Err(e) => accept_failed(e).await,
            }
        }
    };
    tokio::join!(tcp_loop, unix_loop);
}

/// A connection slot, or `None` (the connection is dropped) when all are taken.
fn take(slots: &Arc<tokio::sync::Semaphore>) -> Option<tokio::sync::OwnedSemaphorePermit> {
    let slot = Arc::clone(slots).try_acquire_owned().ok();
    if slot.is_none() {
        tracing::warn!(
            max = MAX_CONNECTIONS,
            "control socket: too many connections open; closing a new one"
        );
    }
    slot
}

async fn accept_failed(e: std::io::Error) {
    tracing::warn!(error = %e, "control socket accept failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// Serves one connection: `peer` for the Unix socket, `token` (the one expected) for TCP.
fn connection<S>(
    stream: S,
    ctl: Arc<Ctl>,
    peer: Option<Peer>,
    token: Option<Arc<[u8]>>,
    slot: tokio::sync::OwnedSemaphorePermit,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let connections = ctl.connections.clone();
    connections.spawn(async move {
        let service = service_fn(move |req| {
            let (ctl, peer, token) = (Arc::clone(&ctl), peer.clone(), token.clone());
            async move {
                Ok::<_, std::convert::Infallible>(
                    routes::respond(&ctl, peer, token.as_deref(), req).await,
                )
            }
        });
        crate::control::admin::serve_http1(stream, service, "control").await;
        drop(slot);
    });
}
