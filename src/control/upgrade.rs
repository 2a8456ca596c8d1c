//! Binary upgrade without a refused connection: the running sluice starts the new
//! binary, hands it every listening socket it owns, waits until it reports ready, and
//! only then stops accepting and drains as on SIGTERM (`mod.rs`). A new process that
//! fails in any way (cannot start, exits, crashes, is not ready within
//! `upgrade_timeout`) changes nothing: the old one never stopped accepting.
//!
//! The handover, both sides:
//!
//! 1. The old process listens on a Unix `SOCK_SEQPACKET` socket with an abstract name
//!    (`sluice-upgrade-PID-NANOS`), starts the new binary with the same arguments and
//!    that name in `SLUICE_UPGRADE_SOCKET`, and accepts one connection, from that pid
//!    only (`SO_PEERCRED`).
//! 2. It sends the sockets with SCM_RIGHTS, at most [`FDS_PER_PACKET`] per packet, each
//!    packet a JSON `{"keys": [...], "last": bool}` naming its descriptors in order:
//!    `LISTENER@ADDRESS` and `admin@ADDRESS` with the address as configured (so an
//!    address with port 0 finds its socket), and `stderr`, the old process's standard
//!    error.
//! 3. The new process adopts the sockets its config listens on, closes the rest, binds
//!    what is new, and once ready (after `READY=1` to systemd) sends `ready`, then puts
//!    the old process's standard error in place of its own (until then its standard
//!    error is a pipe the old process copies to its own and keeps the last
//!    [`LAST_LINES`] lines of, for the log line of a failed upgrade).
//!
//! The sockets are the same open sockets in both processes, so their accept queues
//! carry over: nothing is closed and bound again. Only once the old process lets go
//! do they belong to the new one alone.
//!
//! Why hand-written (about 300 lines) rather than a crate: `shellflip` and `ecdysis`
//! bring their own restart coordinator and process model (shellflip a restart thread and
//! its own socket protocol, ecdysis a builder that owns the listeners), where sluice
//! needed its per-worker SO_REUSEPORT groups, its own readiness point and its
//! `forbid(unsafe_code)`; rustix already gives SCM_RIGHTS, `SO_PEERCRED` and
//! `dup2(2)` onto stderr safely. For systemd socket activation (`LISTEN_FDS`, where
//! adopting a descriptor by number needs `unsafe`) sluice uses `listenfd`.

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::net::TcpListener;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::oneshot;
use tokio::time::{Instant, sleep_until};

use crate::control::Server;
use crate::data::inherited::{Inherited, InheritedSocket, admin_key};

/// Where the new process finds the old one's handover socket (an abstract name).
pub const SOCKET_ENV: &str = "SLUICE_UPGRADE_SOCKET";
/// Descriptors per packet: the kernel takes at most 253 (SCM_MAX_FD).
pub const FDS_PER_PACKET: usize = 250;
/// Lines of the new process's standard error kept for a failed upgrade's log line.
pub const LAST_LINES: usize = 20;
/// The key of the old process's standard error in a handover.
const STDERR_KEY: &str = "stderr";
/// The largest packet: the JSON of [`FDS_PER_PACKET`] keys.
const PACKET_BYTES: usize = 256 * 1024;
/// How long the new process waits on the old one while receiving the sockets.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// The message that says the new process is ready.
const READY: &[u8] = b"ready";

#[derive(Serialize, Deserialize)]
struct Packet {
    keys: Vec<String>,
    last: bool,
}

/// Why an upgrade did not happen. The old process serves on in every case.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("an upgrade is already in progress (new process pid {0}); try again once it ends")]
    InProgress(u32),
    #[error("cannot find sluice's own binary: {0}")]
    OwnBinary(io::Error),
    #[error("cannot start {path}: {source}")]
    Spawn { path: PathBuf, source: io::Error },
    #[error("cannot hand over the sockets: {0}")]
    Handover(io::Error),
    #[error(
        "the new process (pid {pid}) exited with {status} before it was ready; its last lines: {lines:?}"
    )]
    Exited {
        pid: u32,
        status: ExitStatus,
        lines: Vec<String>,
    },
    #[error(
        "the new process (pid {pid}) was not ready within {timeout:?} and was killed; its last lines: {lines:?}"
    )]
    NotReady {
        pid: u32,
        timeout: Duration,
        lines: Vec<String>,
    },
}

/// An upgrade under way: the new process's pid, and its outcome once known.
pub struct Started {
    pub pid: u32,
    /// `Ok(pid)` once the new process is ready and the old one drains; the error's text
    /// if it failed. Dropped unsent if the old process shuts down first.
    pub outcome: oneshot::Receiver<Result<u32, String>>,
}

/// The upgrade the server loop waits on.
pub(super) struct InProgress {
    pid: u32,
    task: tokio::task::JoinHandle<Result<(), UpgradeError>>,
    reply: Option<oneshot::Sender<Result<u32, String>>>,
}

impl InProgress {
    /// Stops it (the old process is shutting down): the new process is killed.
    pub(super) fn abandon(self) {
        // Killed before the task (which holds the unreaped child) is dropped, so the
        // pid cannot have been reused.
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
        self.task.abort();
        tracing::warn!(
            pid = self.pid,
            "shutting down during an upgrade: the new process was killed"
        );
    }
}

impl Server {
    /// Upgrades to `binary` (sluice's own path now if `None`: the file there may have
    /// been replaced since this process started), with the same arguments. Refused
    /// while another upgrade is under way. Returns once the new process is started;
    /// the server loop finishes the upgrade ([`Server::upgrade_finished`]), and the
    /// outcome says how it went.
    pub fn upgrade(&mut self, binary: Option<PathBuf>) -> Result<Started, UpgradeError> {
        if let Some(running) = &self.upgrade {
            self.metrics.upgrades_refused.inc();
            let e = UpgradeError::InProgress(running.pid);
            tracing::warn!(error = %e, "upgrade refused");
            return Err(e);
        }
        let started = self.start_upgrade(binary);
        if let Err(e) = &started {
            self.metrics.upgrades_failure.inc();
            tracing::error!(error = %e, "upgrade failed; still serving");
        }
        started
    }

    fn start_upgrade(&mut self, binary: Option<PathBuf>) -> Result<Started, UpgradeError> {
        let path = match binary {
            Some(p) => p,
            None => own_binary().map_err(UpgradeError::OwnBinary)?,
        };
        let mut sockets: Vec<(String, Arc<dyn AsFd + Send + Sync>)> = self
            .listeners
            .handover()
            .into_iter()
            .map(|(k, s)| (k, s as Arc<dyn AsFd + Send + Sync>))
            .collect();
        if let Some((address, admin)) = &self.admin_handover {
            sockets.push((admin_key(*address), Arc::clone(admin) as _));
        }
        let count = sockets.len();
        let timeout = self.snapshots.load().config.upgrade_timeout;
        let (listener, name) = handover_socket().map_err(UpgradeError::Handover)?;
        let mut child = tokio::process::Command::new(&path)
            .args(std::env::args_os().skip(1))
            .env(SOCKET_ENV, &name)
            // systemd's sockets are among those handed over; the variables were for
            // this process alone.
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| UpgradeError::Spawn {
                path: path.clone(),
                source,
            })?;
        let pid = child.id().unwrap_or(0);
        tracing::info!(
            binary = %path.display(),
            "handing over {count} sockets to pid {pid}"
        );
        let lines = Arc::new(Mutex::new(VecDeque::new()));
        let relay = child.stderr.take().map(|stderr| {
            let lines = Arc::clone(&lines);
            tokio::spawn(async move {
                let mut reader = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    eprintln!("{line}");
                    let mut kept = lines.lock().unwrap_or_else(|p| p.into_inner());
                    if kept.len() == LAST_LINES {
                        kept.pop_front();
                    }
                    kept.push_back(line);
                }
            })
        });
        let task = tokio::spawn(async move {
            let result = hand_over(&listener, &mut child, pid, &sockets, timeout).await;
            drop(sockets);
            let Err(failure) = result else {
                return Ok(());
            };
            let status = match failure {
                Failure::Exited(status) => Some(status),
                Failure::NotReady | Failure::Io(_) => {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    None
                }
            };
            // The pipe closes when the process is gone: its last lines are read then.
            if let Some(relay) = relay {
                let _ = tokio::time::timeout(Duration::from_secs(2), relay).await;
            }
            let lines: Vec<String> = lines
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .drain(..)
                .collect();
            Err(match (status, failure) {
                (Some(status), _) => UpgradeError::Exited { pid, status, lines },
                (None, Failure::Io(e)) => UpgradeError::Handover(io::Error::other(format!(
                    "{e}; pid {pid} killed; its last lines: {lines:?}"
                ))),
                (None, _) => UpgradeError::NotReady {
                    pid,
                    timeout,
                    lines,
                },
            })
        });
        let (reply, outcome) = oneshot::channel();
        self.upgrade = Some(InProgress {
            pid,
            task,
            reply: Some(reply),
        });
        Ok(Started { pid, outcome })
    }

    /// Waits for the upgrade under way to end (forever if there is none); `Ok(pid)` when
    /// the new process is ready. A failure is logged and counted here, and the next
    /// upgrade may be tried.
    pub(super) async fn upgrade_finished(&mut self) -> Result<u32, ()> {
        let Some(running) = &mut self.upgrade else {
            return std::future::pending().await;
        };
        let joined = (&mut running.task).await;
        let pid = running.pid;
        let reply = running.reply.take();
        self.upgrade = None;
        let result = match joined {
            Ok(r) => r,
            Err(e) => Err(UpgradeError::Handover(io::Error::other(format!(
                "the handover task failed: {e}"
            )))),
        };
        match result {
            Ok(()) => {
                self.metrics.upgrades_success.inc();
                if let Some(reply) = reply {
                    let _ = reply.send(Ok(pid));
                }
                Ok(pid)
            }
            Err(e) => {
                self.metrics.upgrades_failure.inc();
                tracing::error!(error = %e, "upgrade failed; still serving");
                if let Some(reply) = reply {
                    let _ = reply.send(Err(e.to_string()));
                }
                Err(())
            }
        }
    }
}

/// Why [`hand_over`] did not see the new process ready.
enum Failure {
    Exited(ExitStatus),
    NotReady,
    Io(io::Error),
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Failure {
        Failure::Io(e)
    }
}

impl From<rustix::io::Errno> for Failure {
    fn from(e: rustix::io::Errno) -> Failure {
        Failure::Io(e.into())
    }
}

/// Accepts the new process's connection, sends it the sockets, and waits for `ready`;
/// all before the deadline, and while the process runs.
async fn hand_over(
    listener: &AsyncFd<OwnedFd>,
    child: &mut tokio::process::Child,
    pid: u32,
    sockets: &[(String, Arc<dyn AsFd + Send + Sync>)],
    timeout: Duration,
) -> Result<(), Failure> {
    let deadline = Instant::now() + timeout;
    let conn = loop {
        let accepted = tokio::select! {
            r = listener.readable() => {
                let mut ready = r?;
                match ready.try_io(|l| Ok(rustix::net::accept_with(l, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC)?)) {
                    Ok(a) => a?,
                    Err(_would_block) => continue,
                }
            }
            status = child.wait() => return Err(Failure::Exited(status?)),
            () = sleep_until(deadline) => return Err(Failure::NotReady),
        };
        let peer = rustix::net::sockopt::socket_peercred(&accepted)?;
        if peer.pid.as_raw_nonzero().get() as u32 == pid {
            // Deprecated for fds the AsyncFd does not own; this one owns it.
            #[allow(deprecated)]
            let conn = AsyncFd::new(accepted)?;
            break conn;
        }
        tracing::warn!(
            peer_pid = peer.pid.as_raw_nonzero().get(),
            pid,
            "a handover connection not from the new process; closed"
        );
    };
    let stderr = std::io::stderr();
    let mut all: Vec<(&str, BorrowedFd<'_>)> = sockets
        .iter()
        .map(|(k, s)| (k.as_str(), s.as_fd()))
        .collect();
    all.push((STDERR_KEY, stderr.as_fd()));
    let chunks: Vec<_> = all.chunks(FDS_PER_PACKET).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let packet = Packet {
            keys: chunk.iter().map(|(k, _)| k.to_string()).collect(),
            last: i + 1 == chunks.len(),
        };
        let bytes = serde_json::to_vec(&packet).map_err(io::Error::other)?;
        let fds: Vec<BorrowedFd<'_>> = chunk.iter().map(|(_, fd)| *fd).collect();
        loop {
            let mut ready = tokio::select! {
                r = conn.writable() => r?,
                status = child.wait() => return Err(Failure::Exited(status?)),
                () = sleep_until(deadline) => return Err(Failure::NotReady),
            };
            match ready.try_io(|c| send_packet(c.get_ref(), &bytes, &fds)) {
                Ok(sent) => break sent?,
                Err(_would_block) => continue,
            }
        }
    }
    loop {
        let mut ready = tokio::select! {
            r = conn.readable() => r?,
            status = child.wait() => return Err(Failure::Exited(status?)),
            () = sleep_until(deadline) => return Err(Failure::NotReady),
        };
        let mut buf = [0u8; 64];
        let n = match ready.try_io(|c| Ok(rustix::io::read(c.get_ref(), &mut buf)?)) {
            Ok(n) => n?,
            Err(_would_block) => continue,
        };
        if n == 0 {
            // Closed without a word: the process is ending; its status says why.
            let status = tokio::select! {
                status = child.wait() => status?,
                () = sleep_until(deadline) => return Err(Failure::NotReady),
            };
            return Err(Failure::Exited(status));
        }
        if &buf[..n] == READY {
            return Ok(());
        }
        return Err(Failure::Io(io::Error::other(format!(
            "unexpected message {:?} from the new process",
            String::from_utf8_lossy(&buf[..n])
        ))));
    }
}

fn send_packet(conn: &OwnedFd, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_PACKET))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("too many descriptors for one packet"));
    }
    let sent = rustix::net::sendmsg(
        conn,
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    if sent != bytes.len() {
        return Err(io::Error::other("a handover packet was cut short"));
    }
    Ok(())
}

/// A listening `SOCK_SEQPACKET` socket with a fresh abstract name, and the name as
/// `SOCKET_ENV` gives it (without the leading NUL).
fn handover_socket() -> io::Result<(AsyncFd<OwnedFd>, String)> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let name = format!("sluice-upgrade-{}-{nanos}", std::process::id());
    let socket = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::net::bind(
        &socket,
        &SocketAddrUnix::new_abstract_name(name.as_bytes())?,
    )?;
    rustix::net::listen(&socket, 1)?;
    #[allow(deprecated)]
    let socket = AsyncFd::new(socket)?;
    Ok((socket, name))
}

/// sluice's own binary as its path reads now. `/proc/self/exe` of a binary replaced on
/// disk (as package managers do: a new file renamed over the old) ends in " (deleted)";
/// the path without it is where the new binary is.
fn own_binary() -> io::Result<PathBuf> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let text = exe.to_string_lossy();
    let path = match text.strip_suffix(" (deleted)") {
        Some(p) => PathBuf::from(p),
        None => exe.clone(),
    };
    if !path.exists() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{} no longer exists", path.display()),
        ));
    }
    Ok(path)
}

/// What a starting sluice inherited: the sockets (from the process it replaces, or from
/// systemd) and, in an upgrade, how to tell the old process it is ready.
#[derive(Default)]
pub struct Handover {
    pub sockets: Inherited,
    /// In an upgrade: the connection to the old process, and its standard error.
    from_old: Option<(OwnedFd, OwnedFd)>,
}

impl Handover {
    /// Reads `LISTEN_FDS` (systemd socket activation; the variables are removed, so call
    /// this before any thread starts) and `SLUICE_UPGRADE_SOCKET` (an upgrade: receives
    /// the old process's sockets). Nothing inherited is no error.
    pub fn from_env() -> Result<Handover, String> {
        let mut sockets = Vec::new();
        let mut activated = listenfd::ListenFd::from_env();
        for i in 0..activated.len() {
            let listener = activated
                .take_tcp_listener(i)
                .map_err(|e| format!("LISTEN_FDS: descriptor {}: {e}", 3 + i))?;
            if let Some(socket) = listener {
                let local = socket
                    .local_addr()
                    .map_err(|e| format!("LISTEN_FDS: descriptor {}: {e}", 3 + i))?;
                sockets.push(InheritedSocket {
                    key: None,
                    local,
                    socket,
                });
            }
        }
        let mut from_old = None;
        if let Some(name) = std::env::var_os(SOCKET_ENV) {
            let name = name.to_string_lossy().into_owned();
            let (conn, stderr, handed) = receive(&name).map_err(|e| {
                format!(
                    "cannot take over the sockets of the old process ({SOCKET_ENV}={name}): {e}"
                )
            })?;
            sockets.extend(handed);
            from_old = Some((conn, stderr));
        }
        Ok(Handover {
            sockets: Inherited::new(sockets),
            from_old,
        })
    }

    /// Whether this process takes over from an old one.
    pub fn is_upgrade(&self) -> bool {
        self.from_old.is_some()
    }

    /// Tells the old process this one is ready, and writes to its standard error from
    /// now on, not to the pipe the old process copies.
    pub(super) fn ready(&mut self) {
        let Some((conn, stderr)) = self.from_old.take() else {
            return;
        };
        if let Err(e) = rustix::io::write(&conn, READY) {
            tracing::error!(error = %e, "cannot tell the old process that this one is ready");
        }
        if let Err(e) = rustix::stdio::dup2_stderr(&stderr) {
            tracing::warn!(error = %e, "cannot write to the old process's standard error; keeping the pipe");
        }
    }
}

/// Connects to the old process's handover socket and receives its sockets.
fn receive(name: &str) -> io::Result<(OwnedFd, OwnedFd, Vec<InheritedSocket>)> {
    let conn = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::net::sockopt::set_socket_timeout(
        &conn,
        rustix::net::sockopt::Timeout::Recv,
        Some(RECEIVE_TIMEOUT),
    )?;
    rustix::net::connect(&conn, &SocketAddrUnix::new_abstract_name(name.as_bytes())?)?;
    let peer = rustix::net::sockopt::socket_peercred(&conn)?;
    if Some(peer.pid) != rustix::process::getppid() {
        return Err(io::Error::other(format!(
            "the handover socket belongs to pid {}, not to this process's parent",
            peer.pid.as_raw_nonzero()
        )));
    }
    let mut sockets = Vec::new();
    let mut stderr = None;
    let mut buf = vec![0u8; PACKET_BYTES];
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_PACKET))];
    loop {
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = rustix::net::recvmsg(
            &conn,
            &mut [IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )?;
        if got.bytes == 0 {
            return Err(io::Error::other("the old process closed the handover"));
        }
        if got.flags.contains(rustix::net::ReturnFlags::TRUNC)
            || got.flags.contains(rustix::net::ReturnFlags::CTRUNC)
        {
            return Err(io::Error::other("a handover packet was cut short"));
        }
        let mut fds: Vec<OwnedFd> = Vec::new();
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = message {
                fds.extend(received);
            }
        }
        let packet: Packet = serde_json::from_slice(&buf[..got.bytes]).map_err(io::Error::other)?;
        if packet.keys.len() != fds.len() {
            return Err(io::Error::other(format!(
                "{} keys for {} descriptors",
                packet.keys.len(),
                fds.len()
            )));
        }
        for (key, fd) in packet.keys.into_iter().zip(fds) {
            if key == STDERR_KEY {
                stderr = Some(fd);
                continue;
            }
            let socket = TcpListener::from(fd);
            let local = socket.local_addr()?;
            sockets.push(InheritedSocket {
                key: Some(key),
                local,
                socket,
            });
        }
        if packet.last {
            break;
        }
    }
    let stderr = stderr.ok_or_else(|| io::Error::other("no standard error in the handover"))?;
    Ok((conn, stderr, sockets))
}
