//! The config file: raw TOML (serde, `deny_unknown_fields`) parsed into a validated
//! [`Config`] that cannot hold an invalid value. Everything after this module trusts it.
//!
//! Every error names the file, line and column and says what was expected.
//! `config/sluice.toml` documents each key; the defaults below are the same values.

use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod client;
mod control;
mod discovery;
mod edge;
mod raw;
mod upstream;
mod values;
pub use client::*;
pub use control::{Control, DEFAULT_CONTROL_SOCKET};
pub use discovery::{
    DEFAULT_HOLD, DEFAULT_MAX_INTERVAL, DEFAULT_MIN_INTERVAL, DEFAULT_RESOLVER_ATTEMPTS,
    DEFAULT_RESOLVER_TIMEOUT, Discovered, DnsName, Resolver,
};
pub use edge::*;
pub use values::parse_duration;

use raw::RawConfig;
use values::{bytes_text, duration_text};

/// Admin (metrics and status) address: loopback, so nothing is exposed by accident.
pub const DEFAULT_ADMIN_BIND: &str = "127.0.0.1:9555";
/// How long in-flight connections may finish after SIGTERM before they are cut.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the new process of a binary upgrade has to report ready before it is killed
/// and the upgrade fails (the old process serving on).
pub const DEFAULT_UPGRADE_TIMEOUT: Duration = Duration::from_secs(60);
/// Per-listener cap on open client connections (each proxied one costs two descriptors).
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Kernel accept queue length for each listening socket.
pub const DEFAULT_BACKLOG: u32 = 1024;
/// How long one connect attempt to a backend may take.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A connection with no bytes moving either way for this long is closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Further backends tried after a failed connect.
pub const DEFAULT_RETRIES: u32 = 2;
pub const DEFAULT_WEIGHT: u32 = 1;
pub const MAX_WEIGHT: u32 = 1000;
pub const MAX_RETRIES: u32 = 16;
pub const DEFAULT_QUEUE_MAX: usize = 1000;
pub const DEFAULT_ACCESS_LOG_BUFFER: usize = 65_536;
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(2);
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_RISE: u32 = 2;
pub const DEFAULT_FALL: u32 = 3;
pub const DEFAULT_EJECT_FAILURES: u32 = 5;
pub const DEFAULT_EJECT_DURATION: Duration = Duration::from_secs(10);
pub const DEFAULT_EJECT_MAX_DURATION: Duration = Duration::from_secs(300);
/// Whether plain relays use splice(2) unless the config says: see BENCHMARKS.md.
pub const DEFAULT_SPLICE: bool = false;
/// Most worker threads `[runtime] worker_threads` may ask for: more is a typo, not a
/// machine (and each per-core worker binds a socket per listening address).
pub const MAX_WORKER_THREADS: usize = 1024;

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Config {
    /// The file this was read from, for logs and `/config`.
    pub source: PathBuf,
    #[serde(serialize_with = "duration_text")]
    pub drain_timeout: Duration,
    #[serde(serialize_with = "duration_text")]
    pub upgrade_timeout: Duration,
    pub admin: Admin,
    /// Read at start only; a reload keeps the one in force.
    pub runtime: Runtime,
    /// `None`: connections are recorded only in the main log.
    pub access_log: Option<AccessLogConfig>,
    pub relay: Relay,
    pub listeners: Vec<Listener>,
    pub upstreams: Vec<Upstream>,
    /// The control socket (`[control]`); read at start only.
    pub control: Option<Control>,
    /// How backend names are resolved (`[resolver]`).
    pub resolver: Resolver,
    /// Where each certificate, key and CA file is named in the file.
    #[serde(skip)]
    pub named_files: NamedFiles,
}

/// The file paths a config names, each with where in the config file it is named.
/// Not part of what the config means: two configs that differ only in these are equal,
/// so a comment that moves lines changes nothing.
#[derive(Debug, Clone, Default)]
pub struct NamedFiles(pub Vec<NamedFile>);

impl PartialEq for NamedFiles {
    fn eq(&self, _: &NamedFiles) -> bool {
        true
    }
}

#[derive(Debug, Clone)]
pub struct NamedFile {
    /// Resolved against the config's directory.
    pub path: PathBuf,
    span: Range<usize>,
    pub line: usize,
    pub column: usize,
}

impl NamedFiles {
    /// Where `path` is named, as `line:column`.
    pub fn place(&self, path: &Path) -> Option<(usize, usize)> {
        self.0
            .iter()
            .find(|f| f.path == path)
            .map(|f| (f.line, f.column))
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AccessLogConfig {
    /// `None` writes to standard output.
    pub path: Option<PathBuf>,
    pub format: LogFormat,
    /// Lines queued for the writer at most; more are dropped and counted.
    pub buffer: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Logfmt,
    Json,
}

/// How plain (non-TLS) connections move bytes.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Relay {
    /// Through a pipe with splice(2) rather than through a user-space buffer.
    pub splice: bool,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Admin {
    pub bind: SocketAddr,
}

/// How connections are spread over threads. The default: `per_core`, one worker thread
/// per CPU core.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Runtime {
    pub mode: RuntimeMode,
    /// 0: one per CPU core the process may use.
    pub worker_threads: usize,
}

impl Runtime {
    /// The number of worker threads to start: `worker_threads`, or with 0 the CPU cores
    /// this process may run on (its affinity and cgroup quota included).
    pub fn threads(&self) -> usize {
        match self.worker_threads {
            0 => std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            n => n,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeMode {
    /// One tokio multi-thread runtime: its workers share the listening sockets and move
    /// tasks between them.
    MultiThread,
    /// One current-thread runtime per worker thread, each with its own SO_REUSEPORT
    /// socket per listening address; a connection stays on the thread that accepted it.
    /// The default: less CPU per request in every run (BENCHMARKS.md).
    #[default]
    PerCore,
}

impl RuntimeMode {
    /// As written in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeMode::MultiThread => "multi_thread",
            RuntimeMode::PerCore => "per_core",
        }
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Listener {
    pub name: String,
    pub bind: Vec<SocketAddr>,
    /// Name of an upstream that exists in the same config. Always set unless the
    /// listener has passthrough routes, where it takes what no route matches.
    pub upstream: Option<String>,
    pub max_connections: usize,
    /// `max_connections` was written in the file (not the default): at start, a default
    /// counts for less when compared with the process cap (see `control::process_cap`).
    #[serde(skip)]
    pub max_connections_set: bool,
    pub backlog: u32,
    /// Terminate TLS; `None` relays the bytes as they come.
    pub tls: Option<ListenerTls>,
    /// Expect a PROXY header from trusted peers (and only them).
    pub proxy_protocol: Option<ProxyAccept>,
    /// Route TLS by SNI without terminating it. Never set together with `tls`.
    pub passthrough: Option<Passthrough>,
    /// `allow` and `deny`; `None`: every client may connect.
    pub access: Option<Access>,
    /// `max_connections_per_client`, `client_rate`; `None`: no per-client limit.
    pub client_limits: Option<ClientLimits>,
    /// A reload that changes `allow` or `deny` closes the open connections the new
    /// lists deny (default: only new connections are checked).
    pub close_denied_on_reload: bool,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Upstream {
    pub name: String,
    pub balance: Balance,
    #[serde(serialize_with = "duration_text")]
    pub connect_timeout: Duration,
    #[serde(serialize_with = "duration_text")]
    pub idle_timeout: Duration,
    pub retries: u32,
    /// The endpoints: the IP-literal entries in config order, then those the names in
    /// `discovered` resolve to now (see `control/discovery.rs`). Addresses are unique
    /// within the upstream. Empty only while no name has resolved.
    pub backends: Vec<Backend>,
    /// Backend entries written as `"host:port"`, and the upstream's `discover` SRV name.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub discovered: Vec<Discovered>,
    /// Most connections open to each backend at once; `None` is no limit.
    pub max_connections_per_backend: Option<u64>,
    /// Where clients wait while every backend is at `max_connections_per_backend`.
    pub queue: Queue,
    /// Active checks; `None` means backends are taken as up unless ejected.
    pub health_check: Option<HealthCheck>,
    /// Ejection after consecutive connect failures of real traffic; `None` is off.
    pub passive_ejection: Option<PassiveEjection>,
    /// Connections are closed after this long (plus up to `max_lifetime_jitter`).
    pub max_lifetime: Option<Lifetime>,
    /// What happens to open connections to a backend a reload removes.
    pub on_backend_removed: BackendRemoved,
    /// TLS towards the backends (and their health checks).
    pub tls: Option<UpstreamTls>,
    /// A PROXY header sent first on every backend connection, carrying the client.
    pub send_proxy_protocol: Option<ProxyVersion>,
    /// A backend that becomes eligible (up after down, added or revived by a reload)
    /// has its weight ramped up over this window; `None` gives it its share at once.
    #[serde(serialize_with = "values::optional_duration_text")]
    pub slow_start: Option<Duration>,
}

/// What happens to the open connections of a backend that a reload removes. New
/// connections never go to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendRemoved {
    /// They continue until they close by themselves.
    #[default]
    Keep,
    /// They continue for the top-level `drain_timeout`, then are closed.
    Drain,
    /// They are closed at once.
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Queue {
    /// Clients waiting at most; one more is closed with `queue_full`.
    pub max: usize,
    /// Longest wait; then the client is closed with `queue_timeout`.
    #[serde(serialize_with = "duration_text")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HealthCheck {
    #[serde(serialize_with = "duration_text")]
    pub interval: Duration,
    #[serde(serialize_with = "duration_text")]
    pub timeout: Duration,
    /// Consecutive passes that bring a down backend up.
    pub rise: u32,
    /// Consecutive failures that take an up backend down.
    pub fall: u32,
    /// Bytes sent once connected.
    #[serde(serialize_with = "bytes_text")]
    pub send: Vec<u8>,
    /// The reply must start with these bytes; empty means a connect is enough.
    #[serde(serialize_with = "bytes_text")]
    pub expect: Vec<u8>,
    /// Send the upstream's PROXY header version (as LOCAL: no client) before checking.
    pub send_proxy_protocol: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct PassiveEjection {
    /// Consecutive failed connects that eject a backend.
    pub failures: u32,
    /// First ejection's length; each further one without a success in between doubles it.
    #[serde(serialize_with = "duration_text")]
    pub duration: Duration,
    #[serde(serialize_with = "duration_text")]
    pub max_duration: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Lifetime {
    #[serde(serialize_with = "duration_text")]
    pub max: Duration,
    #[serde(serialize_with = "duration_text")]
    pub jitter: Duration,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Backend {
    pub address: SocketAddr,
    /// 0 means the backend takes no new connections.
    pub weight: u32,
    /// The name this endpoint was resolved from; `None` for an IP literal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entry: Option<DnsName>,
    /// SRV priority: only the lowest priority with an available endpoint takes
    /// connections. 0 for everything not from SRV.
    #[serde(skip_serializing_if = "is_zero")]
    pub priority: u16,
}

fn is_zero(p: &u16) -> bool {
    *p == 0
}

/// How an upstream picks a backend for a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Smooth weighted round robin.
    #[default]
    RoundRobin,
    /// Fewest active connections relative to weight.
    LeastConnections,
    /// Two random backends, the one with fewer active connections relative to weight.
    PowerOfTwo,
    /// Weighted random.
    Random,
    /// Consistent hashing on the client's IP address (Maglev).
    Maglev,
}

/// A config that could not be read or is invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read config: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(Box<Located>),
}

/// An error at a place in the file, shown as `file:line:col: message` and the line itself.
#[derive(Debug)]
pub struct Located {
    pub path: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
    /// The offending line of the file, shown under the message.
    pub text: String,
}

impl fmt::Display for Located {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let gutter = self.line.to_string().len();
        write!(
            f,
            "{}:{}:{}: {}\n{:gutter$} |\n{} | {}\n{:gutter$} | {:>col$}",
            self.path.display(),
            self.line,
            self.column,
            self.message,
            "",
            self.line,
            self.text,
            "",
            "^",
            col = self.column,
        )
    }
}

impl Config {
    /// Read and validate a config file. Blocking: call it off the event loop.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Validate config text; `path` is used only in error messages and [`Config::source`].
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let at = |span: Range<usize>, message: String| locate(text, path, span, message);
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            at(span, e.message().trim_end().to_string())
        })?;
        let mut config = raw
            .validate(path)
            .map_err(|(span, message)| at(span, message))?;
        for f in &mut config.named_files.0 {
            (f.line, f.column) = line_column(text, f.span.start);
        }
        Ok(config)
    }
}

/// The 1-based line and column (in characters) of byte `at` of `text`.
fn line_column(text: &str, at: usize) -> (usize, usize) {
    let start = at.min(text.len());
    let before = &text[..start];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (
        before.matches('\n').count() + 1,
        text[line_start..start].chars().count() + 1,
    )
}

fn locate(text: &str, path: &Path, span: Range<usize>, message: String) -> ConfigError {
    let (line, column) = line_column(text, span.start);
    let start = span.start.min(text.len());
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let text = text[line_start..].lines().next().unwrap_or("").to_string();
    ConfigError::Invalid(Box::new(Located {
        path: path.to_path_buf(),
        line,
        column,
        message,
        text,
    }))
}

type Invalid = (Range<usize>, String);

#[cfg(test)]
mod tests {
    use super::*;

    /// One listener in front of one upstream with one backend, every other key default.
    const MINIMAL: &str = r#"
[[listener]]
name = "front"
bind = ["127.0.0.1:0"]
upstream = "app"

[[upstream]]
name = "app"
[[upstream.backend]]
address = "127.0.0.1:1"
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let text = MINIMAL;
        let c = Config::parse(text, Path::new("t.toml")).expect("valid");
        assert_eq!(c.drain_timeout, DEFAULT_DRAIN_TIMEOUT);
        assert_eq!(c.upgrade_timeout, DEFAULT_UPGRADE_TIMEOUT);
        assert_eq!(c.admin.bind.to_string(), DEFAULT_ADMIN_BIND);
        assert_eq!(c.listeners[0].max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(c.runtime.mode, RuntimeMode::PerCore);
        assert_eq!(c.runtime.worker_threads, 0);
        assert!(c.runtime.threads() >= 1);
        let u = &c.upstreams[0];
        assert_eq!(u.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(u.idle_timeout, DEFAULT_IDLE_TIMEOUT);
        assert_eq!(u.retries, DEFAULT_RETRIES);
        assert_eq!(u.backends[0].weight, DEFAULT_WEIGHT);
    }

    #[test]
    fn port_zero_may_be_bound_by_several_listeners() {
        let text = r#"
[[listener]]
name = "a"
bind = ["127.0.0.1:0"]
upstream = "app"
[[listener]]
name = "b"
bind = ["127.0.0.1:0"]
upstream = "app"
[[upstream]]
name = "app"
[[upstream.backend]]
address = "127.0.0.1:1"
"#;
        let c = Config::parse(text, Path::new("t.toml")).expect("valid");
        assert_eq!(c.listeners.len(), 2);
    }

    #[test]
    fn error_points_at_line_and_column() {
        let text = "[admin]\nbind = \"127.0.0.1:9555\"\n\n[[upstream]]\nname = \"a\"\nconnect_timeout = \"3 s\"\n";
        let err = Config::parse(text, Path::new("x.toml")).expect_err("invalid");
        let ConfigError::Invalid(located) = err else {
            panic!("expected a located error")
        };
        assert_eq!((located.line, located.column), (6, 19));
        assert!(located.message.contains("invalid duration"), "{located}");
    }

    #[test]
    fn runtime_table() {
        let text = &format!("[runtime]\nmode = \"multi_thread\"\nworker_threads = 3\n\n{MINIMAL}");
        let c = Config::parse(text, Path::new("t.toml")).expect("valid");
        // Not the default, so the key was read.
        assert_eq!(c.runtime.mode, RuntimeMode::MultiThread);
        assert_eq!(c.runtime.worker_threads, 3);
        assert_eq!(c.runtime.threads(), 3);
        let mode_only = text.replace("worker_threads = 3\n", "");
        let c = Config::parse(&mode_only, Path::new("t.toml")).expect("valid");
        assert_eq!(c.runtime.worker_threads, 0);
    }

    #[test]
    fn a_port_out_of_range_is_named_as_such() {
        let text = MINIMAL.replace("127.0.0.1:1\"", "127.0.0.1:99999\"");
        let err = Config::parse(&text, Path::new("t.toml")).expect_err("invalid");
        let ConfigError::Invalid(located) = err else {
            panic!("expected a located error")
        };
        assert_eq!((located.line, located.column), (10, 11));
        assert!(
            located
                .message
                .contains("port 99999 is out of range (0 to 65535)"),
            "{located}"
        );
        for other in ["[::1]:70000", "db.internal:99999", "127.0.0.1:x"] {
            let text = MINIMAL.replace("127.0.0.1:1\"", &format!("{other}\""));
            let message = Config::parse(&text, Path::new("t.toml"))
                .expect_err("invalid")
                .to_string();
            // A host name may be a backend address now: its port is checked too.
            let range = other.starts_with('[') || other.starts_with("db.");
            assert_eq!(
                message.contains("out of range"),
                range,
                "{other}: {message}"
            );
        }
    }
}
