//! The peers sluice is compared with, started with configs equivalent to sluice's: two
//! TCP routes (one to an echo backend, one to a byte-counting sink), two threads or
//! workers, generous timeouts, half-close passed on (nginx needs `proxy_half_close on`;
//! HAProxy and sluice do it by default), no logging of each connection.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running peer proxy, stopped (by its own pid) when dropped.
pub struct Peer {
    pub name: &'static str,
    pub version: String,
    pub echo: SocketAddr,
    pub sink: SocketAddr,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Peer {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Peer {
    /// SIGTERM first: nginx's master passes it on to its workers, which SIGKILL to the
    /// master alone would leave running.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port the kernel just had free. HAProxy and nginx cannot report a port of their
/// own choosing, so this small race is accepted for benchmarks.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn version(cmd: &str, arg: &str) -> String {
    let out = Command::new(cmd).arg(arg).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines().next().unwrap_or(cmd).trim().to_string()
}

/// HAProxy and nginx, each in front of `echo` and `sink`; a peer whose binary is
/// missing is left out (make bench installs both).
pub async fn start(echo: SocketAddr, sink: SocketAddr) -> Vec<Peer> {
    let mut peers = Vec::new();
    if Command::new("haproxy").arg("-v").output().is_ok() {
        peers.push(haproxy(echo, sink));
    }
    if Command::new("nginx").arg("-v").output().is_ok() {
        peers.push(nginx(echo, sink));
    }
    peers
}

fn haproxy(echo: SocketAddr, sink: SocketAddr) -> Peer {
    let dir = tempfile::tempdir().unwrap();
    let (e, s) = (free_port(), free_port());
    let config = format!(
        "global\n  nbthread 2\n  maxconn 9000\n\
         defaults\n  mode tcp\n  timeout connect 3s\n  timeout client 1h\n  timeout server 1h\n\
         frontend echo\n  bind 127.0.0.1:{e}\n  default_backend echo\n\
         backend echo\n  server s1 {echo}\n\
         frontend sink\n  bind 127.0.0.1:{s}\n  default_backend sink\n\
         backend sink\n  server s1 {sink}\n"
    );
    let path = dir.path().join("haproxy.cfg");
    std::fs::write(&path, config).unwrap();
    let mut command = Command::new("haproxy");
    command.arg("-db").arg("-f").arg(&path);
    launch("haproxy", version("haproxy", "-v"), command, (e, s), dir)
}

fn nginx(echo: SocketAddr, sink: SocketAddr) -> Peer {
    let dir = tempfile::tempdir().unwrap();
    let (e, s) = (free_port(), free_port());
    let d = dir.path().display();
    let config = format!(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
         daemon off;\nmaster_process on;\nworker_processes 2;\nworker_rlimit_nofile 19000;\n\
         pid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 9000; }}\n\
         stream {{\n  proxy_connect_timeout 3s;\n  proxy_timeout 1h;\n  proxy_half_close on;\n\
           server {{ listen 127.0.0.1:{e}; proxy_pass {echo}; }}\n\
           server {{ listen 127.0.0.1:{s}; proxy_pass {sink}; }}\n}}\n"
    );
    let path = dir.path().join("nginx.conf");
    std::fs::write(&path, config).unwrap();
    let mut command = Command::new("nginx");
    command.arg("-c").arg(&path).arg("-p").arg(dir.path());
    launch("nginx", version("nginx", "-v"), command, (e, s), dir)
}

/// Starts a peer whose config is written, and waits until both of its routes listen.
fn launch(
    name: &'static str,
    version: String,
    mut command: Command,
    (e, s): (u16, u16),
    dir: tempfile::TempDir,
) -> Peer {
    let child = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let peer = Peer {
        name,
        version,
        echo: SocketAddr::from(([127, 0, 0, 1], e)),
        sink: SocketAddr::from(([127, 0, 0, 1], s)),
        child,
        _dir: dir,
    };
    wait_listening(peer.echo);
    wait_listening(peer.sink);
    peer
}
