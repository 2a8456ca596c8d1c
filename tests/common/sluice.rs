//! The real `sluice` binary as a test drives it: started on a config with every address
//! on port 0, and then asked (through its admin endpoint) where it listens.
//!
//! Readiness is what systemd would see: the harness binds a Unix datagram socket, names
//! it in `NOTIFY_SOCKET`, and waits for `READY=1`, whose `STATUS=` names the admin
//! endpoint; `GET /listeners` there gives every listener's bound addresses. Log text is
//! read only where a test asserts what sluice logs.

use std::fmt::Display;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::eventually::eventually;
use super::io::http_get;
use super::metrics::Metrics;

/// How to start sluice: built by [`Sluice::with`] or [`Sluice::with_file`], run by
/// [`Launch::start`] (or [`Launch::start_fails`] for a start that must fail).
pub struct Launch {
    config: Source,
    nofile: Option<u32>,
    env: Vec<(String, String)>,
    /// A `[runtime]` table added to the config text (and to each rewrite of it).
    runtime: Option<String>,
    quiet: bool,
}

enum Source {
    Text(String),
    /// A file the test laid out itself in a directory it hands over.
    File(tempfile::TempDir, PathBuf),
}

impl Launch {
    /// The process's open-file limit (`ulimit -n`).
    pub fn nofile(mut self, limit: u32) -> Launch {
        self.nofile = Some(limit);
        self
    }

    /// An environment variable for the process.
    pub fn env(mut self, key: &str, value: &str) -> Launch {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// `[runtime] mode = "per_core"` with `threads` workers.
    pub fn per_core(self, threads: usize) -> Launch {
        self.runtime(format!(
            "[runtime]\nmode = \"per_core\"\nworker_threads = {threads}\n"
        ))
    }

    /// `[runtime] mode = "multi_thread"`, one worker per core.
    pub fn multi_thread(self) -> Launch {
        self.runtime("[runtime]\nmode = \"multi_thread\"\n".to_string())
    }

    fn runtime(mut self, table: String) -> Launch {
        self.runtime = Some(table);
        self
    }

    /// Logs at sluice's production level (info), without echoing it: for benchmarks.
    pub fn quiet(mut self) -> Launch {
        self.quiet = true;
        self
    }

    /// Starts sluice and waits until it reports ready; panics, with its log, if it
    /// exits first or takes too long.
    pub async fn start(self) -> Sluice {
        let (process, config_path) = self.spawn();
        let ready = eventually("sluice to notify READY=1", async || {
            if let Some(status) = process.try_wait() {
                panic!(
                    "sluice exited with {status} before it was ready; output:\n{}",
                    process.output.lines().join("\n")
                );
            }
            let found = process
                .notifications()
                .into_iter()
                .find(|n| n.starts_with("READY=1"));
            found.ok_or_else(|| {
                format!(
                    "no READY=1 yet; output so far:\n{}",
                    process.output.lines().join("\n")
                )
            })
        })
        .await;
        let admin = admin_address(&ready);
        let mut sluice = Sluice {
            process,
            admin,
            listening: Listening::default(),
            config_path,
        };
        sluice.listening = sluice.listening().await;
        sluice
    }

    /// Starts sluice where it must not start, and waits for it to exit; panics if it
    /// becomes ready instead.
    pub async fn start_fails(self) -> Exited {
        let (mut process, _) = self.spawn();
        let status = eventually("sluice to exit", async || {
            if let Some(ready) = process
                .notifications()
                .into_iter()
                .find(|n| n.starts_with("READY=1"))
            {
                panic!("sluice started where it should have failed: {ready:?}");
            }
            process.try_wait()
        })
        .await;
        process.drain_output();
        Exited {
            status,
            stdout: process.output.stdout(),
            stderr: process.output.stderr(),
        }
    }

    fn spawn(self) -> (Process, PathBuf) {
        let (dir, config_path) = match self.config {
            Source::Text(text) => {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("sluice.toml");
                std::fs::write(&path, complete(&text, self.runtime.as_deref())).unwrap();
                (dir, path)
            }
            Source::File(dir, path) => {
                assert!(
                    self.runtime.is_none(),
                    "a runtime for a config file the test wrote: write it into the file"
                );
                (dir, path)
            }
        };
        // Beside the config, not in its directory: sluice watches that one.
        let notify_dir = tempfile::tempdir().unwrap();
        let notify_path = notify_dir.path().join("notify.sock");
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        notify.set_nonblocking(true).unwrap();

        let mut command = match self.nofile {
            None => Command::new(env!("CARGO_BIN_EXE_sluice")),
            Some(n) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                    .arg(env!("CARGO_BIN_EXE_sluice"));
                c
            }
        };
        // Tests read the per-connection line, which is at debug; benchmarks (quiet) run
        // at the production default. SLUICE_LOG overrides both, to measure the cost of
        // logging in benchmarks.
        let level = std::env::var("SLUICE_LOG").unwrap_or_else(|_| {
            if self.quiet {
                "info"
            } else {
                "info,sluice::conn=debug"
            }
            .to_string()
        });
        let mut child = command
            .args(["run", "--config"])
            .arg(&config_path)
            .env("NOTIFY_SOCKET", &notify_path)
            .env("RUST_LOG", level)
            .envs(self.env)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sluice");
        let output = Output::default();
        let readers = vec![
            output.read(child.stdout.take().unwrap(), false, !self.quiet),
            output.read(child.stderr.take().unwrap(), true, !self.quiet),
        ];
        let process = Process {
            child: Mutex::new(child),
            output,
            readers,
            notify,
            notified: Mutex::new(Vec::new()),
            runtime: self.runtime,
            _dirs: (dir, notify_dir),
        };
        (process, config_path)
    }
}

/// A sluice that exited, as [`Launch::start_fails`] saw it.
pub struct Exited {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Every listener's bound addresses, as `GET /listeners` reports them.
#[derive(Debug, Default, Clone)]
pub struct Listening {
    /// The config generation in use when they were reported.
    pub generation: u64,
    /// By listener, in config order; each listener's addresses in config order.
    pub listeners: Vec<(String, Vec<SocketAddr>)>,
}

impl Listening {
    pub fn addrs(&self, name: &str) -> Option<&[SocketAddr]> {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| a.as_slice())
    }
}

/// A running sluice process, killed (by its own pid) when dropped.
pub struct Sluice {
    process: Process,
    pub admin: SocketAddr,
    /// As reported once sluice was ready.
    listening: Listening,
    pub config_path: PathBuf,
}

impl Sluice {
    /// How to start sluice on `config` (text, or a [`super::fixture::Fixture`]); an
    /// `[admin]` table on 127.0.0.1:0 is added when it has none.
    pub fn with(config: impl Display) -> Launch {
        Launch {
            config: Source::Text(config.to_string()),
            nofile: None,
            env: Vec::new(),
            runtime: None,
            quiet: false,
        }
    }

    /// How to start sluice on a config file the test laid out in `dir`, used as it is.
    pub fn with_file(dir: tempfile::TempDir, config_path: PathBuf) -> Launch {
        Launch {
            config: Source::File(dir, config_path),
            ..Sluice::with("")
        }
    }

    /// Starts sluice on `config` with nothing else set: [`Sluice::with`] and
    /// [`Launch::start`].
    pub async fn start(config: impl Display) -> Sluice {
        Sluice::with(config).start().await
    }

    /// The first address of the listener named `name`, as bound at start.
    pub fn addr(&self, name: &str) -> SocketAddr {
        self.addrs(name)[0]
    }

    /// Every address of the listener named `name`, as bound at start, in config order.
    pub fn addrs(&self, name: &str) -> &[SocketAddr] {
        self.listening
            .addrs(name)
            .unwrap_or_else(|| panic!("no listener {name} in {:?}", self.listening))
    }

    /// What `GET /listeners` reports now.
    pub async fn listening(&self) -> Listening {
        let (code, body) = self.get("/listeners").await;
        assert_eq!(code, 200, "/listeners: {body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        let listeners = json["listeners"]
            .as_array()
            .unwrap_or_else(|| panic!("no listeners in {body}"))
            .iter()
            .map(|l| {
                let name = l["name"].as_str().unwrap().to_string();
                let addresses = l["addresses"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_str().unwrap().parse().unwrap())
                    .collect();
                (name, addresses)
            })
            .collect();
        Listening {
            generation: json["generation"].as_u64().unwrap(),
            listeners,
        }
    }

    /// The address of the `nth` (from 0) address of listener `name`, once it is bound
    /// (after a reload that added it, say).
    pub async fn wait_listening(&self, name: &str, nth: usize) -> SocketAddr {
        eventually(
            &format!("listener {name} bound (address {nth})"),
            async || {
                let now = self.listening().await;
                let found = now.addrs(name).and_then(|a| a.get(nth)).copied();
                found.ok_or_else(|| format!("{now:?}"))
            },
        )
        .await
    }

    pub fn pid(&self) -> u32 {
        self.process.child.lock().unwrap().id()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits for the process to exit; every line it wrote is in [`Sluice::log`] then.
    pub async fn exited(&mut self) -> ExitStatus {
        let process = &self.process;
        let status = eventually("sluice to exit", async || process.try_wait()).await;
        self.process.drain_output();
        status
    }

    /// Every log line so far, standard output and error.
    pub fn log(&self) -> Vec<String> {
        self.process.output.lines()
    }

    /// Waits until a log line contains `needle`, and returns it.
    pub async fn wait_log(&self, needle: &str) -> String {
        self.wait_log_where(&format!("a log line with {needle:?}"), |l| {
            l.contains(needle)
        })
        .await
    }

    /// Waits until a log line satisfies `pred`, and returns it.
    pub async fn wait_log_where(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        eventually(what, async || {
            let log = self.log();
            log.iter()
                .find(|l| pred(l))
                .cloned()
                .ok_or_else(|| log.join("\n"))
        })
        .await
    }

    /// Every state sluice sent to `$NOTIFY_SOCKET` so far, as systemd would read them.
    pub fn notifications(&self) -> Vec<String> {
        self.process.notifications()
    }

    /// Waits for a notification that starts with `prefix` (such as `STOPPING=1`).
    pub async fn wait_notification(&self, prefix: &str) -> String {
        eventually(&format!("a notification {prefix:?}"), async || {
            let all = self.notifications();
            all.iter()
                .find(|n| n.starts_with(prefix))
                .cloned()
                .ok_or_else(|| format!("{all:?}"))
        })
        .await
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
        eventually(&format!("metrics to show {what}"), async || {
            let m = self.metrics().await;
            if pred(&m) { Ok(m) } else { Err(m) }
        })
        .await
    }

    /// Waits until the config generation in use is `generation`.
    pub async fn wait_generation(&self, generation: u64) -> Metrics {
        self.wait_metrics(&format!("config generation {generation}"), |m| {
            m.value("sluice_config_generation", &[]) == generation as f64
        })
        .await
    }

    /// Waits until reload `generation` applied and logged that it did: every line that
    /// reload logged before (a warning about it, say) is in [`Sluice::log`] then.
    pub async fn wait_reloaded(&self, generation: u64) -> Metrics {
        let m = self.wait_generation(generation).await;
        self.wait_log(&format!("config reloaded generation={generation} "))
            .await;
        m
    }

    /// Rewrites the config file in place (truncate, then write), as `>` in a shell does.
    pub fn rewrite(&self, config: impl Display) {
        std::fs::write(&self.config_path, self.complete(config)).unwrap();
    }

    /// Writes a new file beside the config and renames it over it, as editors save.
    pub fn save_by_rename(&self, config: impl Display) {
        let tmp = self.config_path.with_extension("toml.tmp");
        std::fs::write(&tmp, self.complete(config)).unwrap();
        std::fs::rename(&tmp, &self.config_path).unwrap();
    }

    /// `config` with what the start added: the admin table and the runtime, unless it
    /// has its own.
    fn complete(&self, config: impl Display) -> String {
        complete(&config.to_string(), self.process.runtime.as_deref())
    }

    /// Open file descriptors of the sluice process.
    pub fn open_files(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    /// What each open descriptor is, one per line, as `ls -l /proc/PID/fd` shows it.
    pub fn describe_open_files(&self) -> String {
        let out = Command::new("ls")
            .arg("-l")
            .arg(format!("/proc/{}/fd", self.pid()))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn open_targets(&self) -> Vec<PathBuf> {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .collect()
    }

    /// Waits until sluice holds `path` open. The access log's writer thread opens its
    /// file a moment after start, perhaps after READY: a descriptor count taken before
    /// that would see the file as a leak.
    pub async fn wait_holds_open(&self, path: &Path) {
        let what = format!("sluice to hold {} open", path.display());
        eventually(&what, async || {
            self.open_targets().iter().any(|t| t == path)
        })
        .await
    }

    /// Waits until sluice holds at most `n` descriptors. The count is polled: closing is
    /// sluice's own business, with no event to wait on.
    pub async fn wait_open_files_at_most(&self, n: usize) {
        eventually(&format!("at most {n} open files"), async || {
            let open = self.open_files();
            if open <= n {
                Ok(())
            } else {
                Err(format!("{open} open:\n{}", self.describe_open_files()))
            }
        })
        .await
    }

    /// Pipes sluice holds open (its stdout and stderr to the test are pipes too).
    pub fn open_pipes(&self) -> usize {
        self.open_targets()
            .iter()
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

/// `text` with an admin endpoint on a port of the kernel's choosing and `runtime`,
/// each unless it has its own.
fn complete(text: &str, runtime: Option<&str>) -> String {
    let mut config = text.to_string();
    match runtime {
        Some(runtime) if !config.contains("[runtime]") => {
            config.push('\n');
            config.push_str(runtime);
        }
        _ => {}
    }
    if !config.contains("[admin]") {
        config.push_str("\n[admin]\nbind = \"127.0.0.1:0\"\n");
    }
    config
}

/// The admin address from READY's `STATUS=ready; admin endpoint on ADDRESS`.
fn admin_address(ready: &str) -> SocketAddr {
    ready
        .lines()
        .find_map(|l| l.strip_prefix("STATUS="))
        .and_then(|s| s.rsplit_once(" on "))
        .and_then(|(_, a)| a.trim().parse().ok())
        .unwrap_or_else(|| panic!("no admin address in the READY notification {ready:?}"))
}

/// The child process and what it wrote; killed when dropped, so that a start that
/// fails its wait leaves nothing running.
struct Process {
    child: Mutex<Child>,
    output: Output,
    readers: Vec<JoinHandle<()>>,
    notify: UnixDatagram,
    /// Every datagram received on `notify` so far.
    notified: Mutex<Vec<String>>,
    runtime: Option<String>,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

impl Process {
    fn try_wait(&self) -> Option<ExitStatus> {
        self.child.lock().unwrap().try_wait().unwrap()
    }

    fn notifications(&self) -> Vec<String> {
        let mut notified = self.notified.lock().unwrap();
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.notify.recv(&mut buf) {
            notified.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        notified.clone()
    }

    /// After the exit: waits until every line the process wrote has been read.
    fn drain_output(&mut self) {
        for r in self.readers.drain(..) {
            r.join().unwrap();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Lines from the child's stdout and stderr, in the order they were read.
#[derive(Clone, Default)]
struct Output(Arc<Mutex<Vec<(bool, String)>>>);

impl Output {
    /// Reads `stream` (stderr if `is_stderr`) line by line on a thread of its own.
    fn read(
        &self,
        stream: impl std::io::Read + Send + 'static,
        is_stderr: bool,
        echo: bool,
    ) -> JoinHandle<()> {
        let lines = Arc::clone(&self.0);
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if echo {
                    eprintln!("[sluice] {line}");
                }
                lines.lock().unwrap().push((is_stderr, line));
            }
        })
    }

    fn lines(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, l)| l.clone())
            .collect()
    }

    fn of(&self, stderr: bool) -> String {
        let lines = self.0.lock().unwrap();
        let mine: Vec<&str> = lines
            .iter()
            .filter(|(e, _)| *e == stderr)
            .map(|(_, l)| l.as_str())
            .collect();
        mine.join("\n")
    }

    fn stdout(&self) -> String {
        self.of(false)
    }

    fn stderr(&self) -> String {
        self.of(true)
    }
}
