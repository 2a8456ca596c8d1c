//! The peers sluice is compared with, started with configs equivalent to sluice's: one
//! TCP route per route of the benchmark (echo, sink, iperf3, HTTP, and the TLS and storm
//! routes), two threads or workers, generous timeouts, half-close passed on (nginx needs
//! `proxy_half_close on`; HAProxy and sluice do it by default), no logging of each
//! connection.
//!
//! A TLS route terminates TLS with the benchmark's one certificate ([`Cert`]) and each
//! peer's default session resumption: HAProxy `bind ... ssl crt`, its session cache
//! (`tune.ssl.cachesize`, 20,000) and tickets on; nginx `listen ... ssl` with
//! `ssl_certificate`, tickets on and no `ssl_session_cache` (its default, `none`: no
//! session-ID resumption). nginx 1.22's default `ssl_protocols` leaves TLS 1.3 out (it
//! joined the default in 1.23.4), so the routes say `ssl_protocols TLSv1.2 TLSv1.3`: the
//! versions sluice and HAProxy accept by default. A route with a backlog gets it on its
//! listening socket (HAProxy `bind ... backlog N`, nginx `listen ... backlog=N`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running peer proxy, stopped (by its own pid) when dropped.
pub struct Peer {
    pub name: &'static str,
    pub version: String,
    /// Where each route listens, by the route's name.
    pub routes: Vec<(&'static str, SocketAddr)>,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Peer {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// A route of the benchmark: its name, the backend it leads to, whether the proxy
/// terminates TLS on it, and its listen backlog if the route sets one (otherwise each
/// proxy's default).
#[derive(Clone, Copy)]
pub struct Route {
    pub name: &'static str,
    pub backend: SocketAddr,
    pub tls: bool,
    pub backlog: Option<u32>,
}

impl Route {
    /// A plain TCP route with the proxy's default backlog.
    pub fn plain(name: &'static str, backend: SocketAddr) -> Route {
        Route {
            name,
            backend,
            tls: false,
            backlog: None,
        }
    }
}

/// The certificate every proxy presents on its TLS routes: a PEM certificate and its
/// PEM key.
pub struct Cert {
    pub cert: PathBuf,
    pub key: PathBuf,
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

/// HAProxy and nginx, each with one TCP route per entry of `routes`; a peer whose
/// binary is missing is left out (make bench installs both).
pub async fn start(routes: &[Route], cert: &Cert) -> Vec<Peer> {
    let mut peers = Vec::new();
    if Command::new("haproxy").arg("-v").output().is_ok() {
        peers.push(haproxy(routes, cert));
    }
    if Command::new("nginx").arg("-v").output().is_ok() {
        peers.push(nginx(routes, cert));
    }
    peers
}

/// Each route with the port its frontend will listen on.
fn with_ports(routes: &[Route]) -> Vec<(Route, u16)> {
    routes.iter().map(|&r| (r, free_port())).collect()
}

fn haproxy(routes: &[Route], cert: &Cert) -> Peer {
    let dir = tempfile::tempdir().unwrap();
    let routes = with_ports(routes);
    // HAProxy's `crt` is one file with the certificate and its key.
    let pem = dir.path().join("cert-and-key.pem");
    let both =
        std::fs::read_to_string(&cert.cert).unwrap() + &std::fs::read_to_string(&cert.key).unwrap();
    std::fs::write(&pem, both).unwrap();
    let mut config = String::from(
        "global\n  nbthread 2\n  maxconn 9000\n\
         defaults\n  mode tcp\n  timeout connect 3s\n  timeout client 1h\n  timeout server 1h\n",
    );
    for (route, port) in &routes {
        let (name, backend) = (route.name, route.backend);
        let tls = if route.tls {
            format!(" ssl crt {}", pem.display())
        } else {
            String::new()
        };
        let backlog = route
            .backlog
            .map_or(String::new(), |b| format!(" backlog {b}"));
        config.push_str(&format!(
            "frontend {name}\n  bind 127.0.0.1:{port}{tls}{backlog}\n  default_backend {name}\n\
             backend {name}\n  server s1 {backend}\n"
        ));
    }
    let path = dir.path().join("haproxy.cfg");
    std::fs::write(&path, config).unwrap();
    let mut command = Command::new("haproxy");
    command.arg("-db").arg("-f").arg(&path);
    launch("haproxy", version("haproxy", "-v"), command, &routes, dir)
}

/// nginx's `worker_connections` counts both sides of a proxied connection and binds
/// each worker alone: 18,000 lets one worker hold 9,000 proxied connections, as HAProxy's
/// `maxconn 9000` and sluice's `max_connections = 9000` do, however unevenly the two
/// workers share a reconnect storm (with 9,000 the TLS storm of 8,000 clients lost
/// connections in nginx).
fn nginx(routes: &[Route], cert: &Cert) -> Peer {
    let dir = tempfile::tempdir().unwrap();
    let routes = with_ports(routes);
    let d = dir.path().display();
    let mut config = format!(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
         daemon off;\nmaster_process on;\nworker_processes 2;\nworker_rlimit_nofile 19000;\n\
         pid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 18000; }}\n\
         stream {{\n  proxy_connect_timeout 3s;\n  proxy_timeout 1h;\n  proxy_half_close on;\n"
    );
    for (route, port) in &routes {
        let backend = route.backend;
        let backlog = route
            .backlog
            .map_or(String::new(), |b| format!(" backlog={b}"));
        let ssl = if route.tls { " ssl" } else { "" };
        let certs = if route.tls {
            format!(
                " ssl_certificate {}; ssl_certificate_key {}; ssl_protocols TLSv1.2 TLSv1.3;",
                cert.cert.display(),
                cert.key.display()
            )
        } else {
            String::new()
        };
        config.push_str(&format!(
            "  server {{ listen 127.0.0.1:{port}{ssl}{backlog};{certs} proxy_pass {backend}; }}\n"
        ));
    }
    config.push_str("}\n");
    let path = dir.path().join("nginx.conf");
    std::fs::write(&path, config).unwrap();
    let mut command = Command::new("nginx");
    command.arg("-c").arg(&path).arg("-p").arg(dir.path());
    launch("nginx", version("nginx", "-v"), command, &routes, dir)
}

/// Starts a peer whose config is written, and waits until all of its routes listen.
fn launch(
    name: &'static str,
    version: String,
    mut command: Command,
    routes: &[(Route, u16)],
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
        routes: routes
            .iter()
            .map(|&(r, port)| (r.name, SocketAddr::from(([127, 0, 0, 1], port))))
            .collect(),
        child,
        _dir: dir,
    };
    for (_, addr) in &peer.routes {
        wait_listening(*addr);
    }
    peer
}

/// An nginx HTTP server answering every request with a short body: the backend of the
/// HTTP workloads (wrk), as in the reference figures of issue 6.
pub fn http_backend() -> Peer {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let d = dir.path().display();
    let config = format!(
        "daemon off;\nmaster_process on;\nworker_processes 1;\n\
         pid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{ access_log off;\n  server {{ listen 127.0.0.1:{port}; keepalive_requests 1000000;\n    \
         location / {{ return 200 \"hello\\n\"; }} }} }}\n"
    );
    let path = dir.path().join("nginx.conf");
    std::fs::write(&path, config).unwrap();
    let mut command = Command::new("nginx");
    command.arg("-c").arg(&path).arg("-p").arg(dir.path());
    let backend = SocketAddr::from(([127, 0, 0, 1], port));
    launch(
        "nginx-http",
        version("nginx", "-v"),
        command,
        &[(Route::plain("http", backend), port)],
        dir,
    )
}

/// An iperf3 server: the backend of the iperf3 bulk workloads.
pub fn iperf3_server() -> Peer {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut command = Command::new("iperf3");
    command.args(["-s", "-B", "127.0.0.1", "-p", &port.to_string()]);
    let backend = SocketAddr::from(([127, 0, 0, 1], port));
    launch(
        "iperf3",
        version("iperf3", "-v"),
        command,
        &[(Route::plain("iperf", backend), port)],
        dir,
    )
}
