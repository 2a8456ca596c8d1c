//! Shared test harness: the real `sluice` binary on port 0, real backends on loopback.
//!
//! sluice logs every address it bound; [`Sluice::start`] reads them from its output, so
//! no test picks a fixed port.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod pki;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Upper bound for anything that should happen "promptly": generous, so a loaded CI
/// machine does not fail a test, yet far below any timeout the tests configure.
pub const PROMPTLY: Duration = Duration::from_secs(10);
/// After this long a transfer is taken to be stuck, and the test fails rather than hangs.
pub const STUCK: Duration = Duration::from_secs(60);

/// A running sluice process, killed (by its own pid) when dropped.
pub struct Sluice {
    child: Child,
    /// Bound addresses by listener name, in config order.
    pub listeners: HashMap<String, Vec<SocketAddr>>,
    pub admin: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
    pub config_path: PathBuf,
}

impl Sluice {
    /// Starts sluice on `config`; an `[admin]` table on port 0 is added when absent.
    pub fn start(config: &str) -> Sluice {
        Sluice::spawn(config, None, true)
    }

    /// Like [`Sluice::start`], with the process's open-file limit set to `nofile`.
    pub fn start_limited(config: &str, nofile: Option<u32>) -> Sluice {
        Sluice::spawn(config, nofile, true)
    }

    /// Like [`Sluice::start`], without echoing sluice's log (for benchmarks).
    pub fn start_quiet(config: &str) -> Sluice {
        Sluice::spawn(config, None, false)
    }

    /// Starts sluice on a config file the test prepared (with `with_admin`) in `dir`.
    pub fn start_file(dir: tempfile::TempDir, config_path: PathBuf) -> Sluice {
        Sluice::spawn_at(dir, config_path, None, true, &[])
    }

    /// Like [`Sluice::start`], with extra environment variables.
    pub fn start_env(config: &str, env: &[(&str, &str)]) -> Sluice {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("sluice.toml");
        std::fs::write(&config_path, with_admin(config)).unwrap();
        Sluice::spawn_at(dir, config_path, None, true, env)
    }

    fn spawn(config: &str, nofile: Option<u32>, echo: bool) -> Sluice {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("sluice.toml");
        std::fs::write(&config_path, with_admin(config)).unwrap();
        Sluice::spawn_at(dir, config_path, nofile, echo, &[])
    }

    fn spawn_at(
        dir: tempfile::TempDir,
        config_path: PathBuf,
        nofile: Option<u32>,
        echo: bool,
        env: &[(&str, &str)],
    ) -> Sluice {
        let mut command = match nofile {
            None => Command::new(env!("CARGO_BIN_EXE_sluice")),
            Some(n) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                    .arg(env!("CARGO_BIN_EXE_sluice"));
                c
            }
        };
        let mut child = command
            .args(["run", "--config"])
            .arg(&config_path)
            .envs(env.iter().copied())
            // SLUICE_LOG overrides the level, to measure the cost of logging in benchmarks.
            .env(
                "RUST_LOG",
                // Tests read the per-connection line, which is at debug; benchmarks
                // (quiet) run at the production default.
                std::env::var("SLUICE_LOG").unwrap_or_else(|_| {
                    let level = if echo {
                        "info,sluice::conn=debug"
                    } else {
                        "info"
                    };
                    level.to_string()
                }),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sluice");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel::<String>();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let log = Arc::clone(&log);
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if echo {
                        eprintln!("[sluice] {line}");
                    }
                    log.lock().unwrap().push(line.clone());
                    let _ = tx.send(line);
                }
            });
        }
        drop(tx);

        let mut listeners: HashMap<String, Vec<SocketAddr>> = HashMap::new();
        let mut admin = None;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(line) => line,
                Err(_) => {
                    // No Sluice exists yet to stop it on drop: stop it here.
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "sluice did not become ready; status {:?}; output:\n{}",
                        child.try_wait(),
                        log.lock().unwrap().join("\n")
                    )
                }
            };
            if line.contains("admin listening") {
                admin = field(&line, "address").and_then(|a| a.parse().ok());
            } else if line.contains(" listening ") {
                let name = field(&line, "listener").expect("listener field");
                let addr = field(&line, "address").expect("address field");
                listeners
                    .entry(name)
                    .or_default()
                    .push(addr.parse().expect("address"));
            } else if line.contains("sluice ready") {
                break;
            }
        }
        Sluice {
            child,
            listeners,
            admin: admin.expect("admin address logged"),
            log,
            _dir: dir,
            config_path,
        }
    }

    /// The first address of the listener named `name`.
    pub fn addr(&self, name: &str) -> SocketAddr {
        self.listeners[name][0]
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits for the process to exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "sluice did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every log line so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Waits until a log line satisfies `pred`, and returns it.
    pub async fn wait_log(&self, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + PROMPTLY;
        loop {
            if let Some(l) = self.log().into_iter().find(|l| pred(l)) {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "no such log line; log:\n{}",
                self.log().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path).await
    }

    pub async fn metrics(&self) -> Metrics {
        let (code, body) = self.get("/metrics").await;
        assert_eq!(code, 200);
        Metrics(body)
    }

    /// Polls `/metrics` until `pred` holds; returns the metrics that satisfied it.
    pub async fn wait_metrics(&self, what: &str, pred: impl Fn(&Metrics) -> bool) -> Metrics {
        let deadline = Instant::now() + PROMPTLY;
        loop {
            let m = self.metrics().await;
            if pred(&m) {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "metrics never showed {what}:\n{}",
                m.0
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Sluice {
    /// Rewrites the config file in place (truncate, then write), as `>` in a shell does.
    pub fn rewrite(&self, config: &str) {
        std::fs::write(&self.config_path, with_admin(config)).unwrap();
    }

    /// Writes a new file beside the config and renames it over it, as editors save.
    pub fn save_by_rename(&self, config: &str) {
        let tmp = self.config_path.with_extension("toml.tmp");
        std::fs::write(&tmp, with_admin(config)).unwrap();
        std::fs::rename(&tmp, &self.config_path).unwrap();
    }

    /// Waits until the config generation in use is `generation`.
    pub async fn wait_generation(&self, generation: u64) -> Metrics {
        self.wait_metrics(&format!("config generation {generation}"), |m| {
            m.value("sluice_config_generation", &[]) == generation as f64
        })
        .await
    }

    /// The address of the `nth` (from 0) socket bound for listener `name`, from the log.
    pub async fn wait_listening(&self, name: &str, nth: usize) -> SocketAddr {
        let deadline = Instant::now() + PROMPTLY;
        loop {
            let found: Vec<SocketAddr> = self
                .log()
                .iter()
                .filter(|l| {
                    l.contains(" listening ") && field(l, "listener").as_deref() == Some(name)
                })
                .filter_map(|l| field(l, "address")?.parse().ok())
                .collect();
            if let Some(a) = found.get(nth) {
                return *a;
            }
            assert!(Instant::now() < deadline, "listener {name} never bound");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Open file descriptors of the sluice process.
    pub fn open_files(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    /// Waits until sluice holds `path` open. The access log's writer thread opens its
    /// file a moment after start, perhaps after "sluice ready": a descriptor count taken
    /// before that would see the file as a leak.
    pub async fn wait_holds_open(&self, path: &std::path::Path) {
        let deadline = Instant::now() + PROMPTLY;
        loop {
            let open = std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
                .unwrap()
                .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .any(|target| target == path);
            if open {
                return;
            }
            assert!(Instant::now() < deadline, "{} never opened", path.display());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until sluice holds at most `n` descriptors; fails after [`PROMPTLY`]. The
    /// count is polled: closing is sluice's own business, with no event to wait on.
    pub async fn wait_open_files_at_most(&self, n: usize) {
        let deadline = Instant::now() + PROMPTLY;
        while self.open_files() > n {
            assert!(
                Instant::now() < deadline,
                "descriptors leaked: {} > {n}",
                self.open_files()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Pipes sluice holds open (its stdout and stderr to the test are pipes too).
    pub fn open_pipes(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|target| target.to_string_lossy().starts_with("pipe:"))
            .count()
    }

    /// Resident memory of the sluice process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}

/// `config` with an admin endpoint on a port of the kernel's choosing, unless it has one.
pub fn with_admin(config: &str) -> String {
    let mut config = config.to_string();
    if !config.contains("[admin]") {
        config.push_str("\n[admin]\nbind = \"127.0.0.1:0\"\n");
    }
    config
}

impl Drop for Sluice {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `key=value` from a log line, without quotes.
fn field(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[start..];
    let end = rest.find(' ').unwrap_or(rest.len());
    Some(rest[..end].trim_matches('"').to_string())
}

/// A Prometheus text exposition.
pub struct Metrics(pub String);

impl Metrics {
    /// The sum of the samples of `name` whose labels include all of `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let (n, rest) = series.split_once('{').unwrap_or((series, ""));
                if n != name {
                    return None;
                }
                let all = labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
                all.then(|| value.parse::<f64>().ok()).flatten()
            })
            .sum()
    }
}

pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    tokio::time::timeout(PROMPTLY, http_get_unbounded(addr, path))
        .await
        .expect("the admin endpoint answered")
}

async fn http_get_unbounded(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: sluice\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    (code, body.to_string())
}

// ---- data ----------------------------------------------------------------------------

/// `len` deterministic pseudo-random bytes (xorshift), different for each seed.
pub fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Sends `payload`, half-closes, and reads until EOF, concurrently.
pub async fn exchange(addr: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    exchange_on(&mut s, payload).await
}

pub async fn exchange_on(s: &mut TcpStream, payload: &[u8]) -> Vec<u8> {
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(payload).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut got = Vec::with_capacity(payload.len());
    let recv = r.read_to_end(&mut got);
    let joined = tokio::time::timeout(STUCK, async { tokio::join!(send, recv) }).await;
    let ((), n) = joined.expect("the exchange finished");
    n.unwrap();
    got
}

/// Reads exactly `n` bytes.
pub async fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    tokio::time::timeout(STUCK, s.read_exact(&mut buf))
        .await
        .expect("the bytes arrived")
        .unwrap();
    buf
}

/// Waits for the peer to close `s`: `Ok(bytes read before EOF)`, or the error (a reset).
pub async fn until_closed(s: &mut TcpStream) -> std::io::Result<usize> {
    let mut total = 0;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(STUCK, s.read(&mut buf)).await {
            Err(_) => panic!("connection was never closed"),
            Ok(Ok(0)) => return Ok(total),
            Ok(Ok(n)) => total += n,
            Ok(Err(e)) => return Err(e),
        }
    }
}

// ---- backends ------------------------------------------------------------------------

/// A backend on loopback; counts the connections it accepted. Stops when dropped.
pub struct Backend {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    /// Serves each connection with `serve` on 127.0.0.1:0.
    pub async fn start<F, Fut>(serve: F) -> Backend
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        Backend::start_on("127.0.0.1:0", serve).await
    }

    pub async fn start_on<F, Fut>(bind: &str, serve: F) -> Backend
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(s));
            }
        });
        Backend {
            addr,
            accepted,
            task,
        }
    }

    /// Echoes every byte; half-closes after the client does.
    pub async fn echo() -> Backend {
        Backend::start(echo).await
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn echo(mut s: TcpStream) {
    let (mut r, mut w) = s.split();
    if tokio::io::copy(&mut r, &mut w).await.is_ok() {
        let _ = w.shutdown().await;
    }
}

/// An address whose connects are refused: a bound socket that never listens, held so
/// the port cannot be reused while the test runs.
pub struct Refusing {
    pub addr: SocketAddr,
    _socket: socket2::Socket,
}

impl Refusing {
    /// Starts listening on the address, tagging each connection like [`tagged`].
    pub fn listen_and_tag(&self, tag: u8) {
        self._socket.listen(128).unwrap();
        self._socket.set_nonblocking(true).unwrap();
        let listener = TcpListener::from_std(self._socket.try_clone().unwrap().into()).unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if s.write_all(&[tag]).await.is_ok() {
                        echo(s).await;
                    }
                });
            }
        });
    }
}

pub fn refusing() -> Refusing {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    Refusing {
        addr,
        _socket: socket,
    }
}

/// A listener whose accept queue is full, so a new connect never completes its handshake
/// (Linux drops the SYN). Holds the queued connections for as long as it lives.
pub struct Blackhole {
    pub addr: SocketAddr,
    _listener: socket2::Socket,
    _queued: Vec<std::net::TcpStream>,
}

pub fn blackhole() -> Blackhole {
    let listener =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    listener
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    // Fill the queue until a connect stops completing; a backlog of 0 holds one or two.
    let mut queued = Vec::new();
    for _ in 0..16 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(s) => queued.push(s),
            Err(_) => {
                return Blackhole {
                    addr,
                    _listener: listener,
                    _queued: queued,
                };
            }
        }
    }
    panic!("the accept queue never filled");
}

/// The config text of listeners named `names`, each on its own port, all in front of
/// upstream `app` with one backend.
pub fn listeners(names: &[&str], backend: SocketAddr) -> String {
    let mut c = String::new();
    for n in names {
        c.push_str(&format!(
            "[[listener]]\nname = \"{n}\"\nbind = [\"127.0.0.1:0\"]\nupstream = \"app\"\n"
        ));
    }
    c.push_str(&format!(
        "[[upstream]]\nname = \"app\"\n[[upstream.backend]]\naddress = \"{backend}\"\n"
    ));
    c
}

/// The config text of one listener in front of one upstream.
pub fn config(upstream_extra: &str, backends: &[SocketAddr]) -> String {
    let mut c = format!(
        "[[listener]]\nname = \"front\"\nbind = [\"127.0.0.1:0\"]\nupstream = \"app\"\n\n[[upstream]]\nname = \"app\"\n{upstream_extra}\n"
    );
    for b in backends {
        c.push_str(&format!("[[upstream.backend]]\naddress = \"{b}\"\n"));
    }
    c
}

/// Sends `tag` on connect, then echoes: tells a client which backend it reached.
pub async fn tagged(tag: u8) -> Backend {
    Backend::start(move |mut s: TcpStream| async move {
        if s.write_all(&[tag]).await.is_ok() {
            echo(s).await;
        }
    })
    .await
}

/// Connects to `addr` from `source` (any 127.0.0.0/8 address works on Linux) and
/// returns the stream and the tag of the backend that answered.
pub async fn connect_tagged(addr: SocketAddr, source: Option<std::net::IpAddr>) -> (TcpStream, u8) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0)).unwrap();
    }
    let mut s = socket.connect(addr).await.unwrap();
    let tag = read_n(&mut s, 1).await[0];
    (s, tag)
}

/// The config text of one listener in front of one upstream with weighted backends.
pub fn weighted(upstream_extra: &str, backends: &[(SocketAddr, u32)]) -> String {
    let mut c = format!(
        "[[listener]]\nname = \"front\"\nbind = [\"127.0.0.1:0\"]\nupstream = \"app\"\n\n[[upstream]]\nname = \"app\"\n{upstream_extra}\n"
    );
    for (b, w) in backends {
        c.push_str(&format!(
            "[[upstream.backend]]\naddress = \"{b}\"\nweight = {w}\n"
        ));
    }
    c
}

/// The lines of a text file (none if it does not exist yet).
pub fn lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Waits until `path` has at least `n` lines (sluice's access log writer is its own
/// thread, with nothing to wait on but the file); fails after [`PROMPTLY`].
pub async fn wait_lines(path: &std::path::Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + PROMPTLY;
    loop {
        let l = lines(path);
        if l.len() >= n {
            return l;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} lines in {}",
            l.len(),
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
