//! The real `sluice` binary as a test drives it once it runs: where it listens (from
//! its admin endpoint's `GET /listeners`), its metrics, its log, its notifications to
//! systemd, its descriptors, and its config file to rewrite. Log text is read only
//! where a test asserts what sluice logs.

use std::fmt::Display;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use super::eventually::eventually;
use super::io::http_get;
use super::launch::{Launch, Process, Source, complete};
use super::metrics::Metrics;

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
        Launch::new(Source::Text(config.to_string()))
    }

    /// How to start sluice on a config file the test laid out in `dir`, used as it is.
    pub fn with_file(dir: tempfile::TempDir, config_path: PathBuf) -> Launch {
        Launch::new(Source::File(dir, config_path))
    }

    /// The running sluice once it reported ready, with the listeners it reports.
    pub(super) async fn ready(process: Process, admin: SocketAddr, config_path: PathBuf) -> Sluice {
        let mut sluice = Sluice {
            process,
            admin,
            listening: Listening::default(),
            config_path,
        };
        sluice.listening = sluice.listening().await;
        sluice
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
        self.process.pid()
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
    pub async fn exited(&self) -> ExitStatus {
        let status = eventually("sluice to exit", async || self.process.try_wait()).await;
        self.process.drain_output();
        status
    }

    /// Waits for the process to exit, without waiting for its output to end: after an
    /// upgrade its successor writes to the same pipes.
    pub async fn exit_status(&self) -> ExitStatus {
        eventually("sluice to exit", async || self.process.try_wait()).await
    }

    /// Every log line so far, standard output and error.
    pub fn log(&self) -> Vec<String> {
        self.process.lines()
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
        complete(&config.to_string(), self.process.runtime())
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
