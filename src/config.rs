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

use serde::{Deserialize, Deserializer};
use toml::Spanned;

mod edge;
pub use edge::*;

/// Admin (metrics and status) address: loopback, so nothing is exposed by accident.
pub const DEFAULT_ADMIN_BIND: &str = "127.0.0.1:9555";
/// How long in-flight connections may finish after SIGTERM before they are cut.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
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
    pub admin: Admin,
    /// Read at start only; a reload keeps the one in force.
    pub runtime: Runtime,
    /// `None`: connections are recorded only in the main log.
    pub access_log: Option<AccessLogConfig>,
    pub relay: Relay,
    pub listeners: Vec<Listener>,
    pub upstreams: Vec<Upstream>,
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
    pub backlog: u32,
    /// Terminate TLS; `None` relays the bytes as they come.
    pub tls: Option<ListenerTls>,
    /// Expect a PROXY header from trusted peers (and only them).
    pub proxy_protocol: Option<ProxyAccept>,
    /// Route TLS by SNI without terminating it. Never set together with `tls`.
    pub passthrough: Option<Passthrough>,
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
    /// Never empty; addresses are unique within the upstream.
    pub backends: Vec<Backend>,
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
        raw.validate(path)
            .map_err(|(span, message)| at(span, message))
    }
}

fn locate(text: &str, path: &Path, span: Range<usize>, message: String) -> ConfigError {
    let start = span.start.min(text.len());
    let before = &text[..start];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = text[line_start..start].chars().count() + 1;
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

// ---- the file as written -------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    drain_timeout: Option<Spanned<DurationValue>>,
    admin: Option<RawAdmin>,
    runtime: Option<RawRuntime>,
    access_log: Option<RawAccessLog>,
    relay: Option<RawRelay>,
    #[serde(default, rename = "listener")]
    listeners: Vec<RawListener>,
    #[serde(default, rename = "upstream")]
    upstreams: Vec<RawUpstream>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRelay {
    splice: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    bind: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    #[serde(default)]
    mode: RuntimeMode,
    worker_threads: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccessLog {
    path: Option<PathBuf>,
    #[serde(default)]
    format: LogFormat,
    buffer: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: Spanned<String>,
    bind: Spanned<Vec<Spanned<String>>>,
    upstream: Option<Spanned<String>>,
    max_connections: Option<Spanned<u64>>,
    backlog: Option<Spanned<u32>>,
    tls: Option<Spanned<RawListenerTls>>,
    proxy_protocol: Option<RawProxyAccept>,
    #[serde(default, rename = "route")]
    routes: Vec<RawSniRoute>,
    hello_timeout: Option<Spanned<DurationValue>>,
    max_hello_size: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    name: Spanned<String>,
    #[serde(default)]
    balance: Balance,
    connect_timeout: Option<Spanned<DurationValue>>,
    idle_timeout: Option<Spanned<DurationValue>>,
    retries: Option<Spanned<u32>>,
    max_connections_per_backend: Option<Spanned<u64>>,
    queue: Option<RawQueue>,
    health_check: Option<Spanned<RawHealthCheck>>,
    passive_ejection: Option<RawPassiveEjection>,
    max_lifetime: Option<Spanned<DurationValue>>,
    max_lifetime_jitter: Option<Spanned<DurationValue>>,
    #[serde(default)]
    on_backend_removed: BackendRemoved,
    tls: Option<Spanned<RawUpstreamTls>>,
    send_proxy_protocol: Option<ProxyVersion>,
    #[serde(default, rename = "backend")]
    backends: Vec<RawBackend>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQueue {
    max: Option<Spanned<u64>>,
    timeout: Option<Spanned<DurationValue>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealthCheck {
    interval: Option<Spanned<DurationValue>>,
    timeout: Option<Spanned<DurationValue>>,
    rise: Option<Spanned<u32>>,
    fall: Option<Spanned<u32>>,
    send: Option<String>,
    expect: Option<String>,
    #[serde(default)]
    send_proxy_protocol: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPassiveEjection {
    failures: Option<Spanned<u32>>,
    duration: Option<Spanned<DurationValue>>,
    max_duration: Option<Spanned<DurationValue>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: Spanned<String>,
    weight: Option<Spanned<u32>>,
}

/// A socket address written as a string: `"127.0.0.1:5432"` or `"[::1]:5432"`. Parsed
/// here rather than during deserialization so that an error inside a list points at
/// the element, not the list.
fn address(value: &Spanned<String>) -> Result<SocketAddr, Invalid> {
    value.get_ref().parse().map_err(|_| {
        (
            value.span(),
            format!(
                "invalid address {:?}: expected an IP address and port, like \"127.0.0.1:5432\" or \"[::1]:5432\"",
                value.get_ref()
            ),
        )
    })
}

/// A duration written as a string with a unit.
#[derive(Clone, Copy)]
struct DurationValue(Duration);

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s)
            .map(DurationValue)
            .ok_or_else(|| serde::de::Error::custom(format!(
                "invalid duration {s:?}: expected a whole number with a unit (ms, s, m, h, d), like \"250ms\", \"5s\" or \"1h\""
            )))
    }
}

/// Writes a duration back the way the config file would: `"250ms"`, `"5s"`, `"1h"`.
fn duration_text<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    let ms = d.as_millis();
    let text = [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1_000, "s"),
    ]
    .iter()
    .find(|(unit, _)| ms % unit == 0 && ms > 0)
    .map_or_else(
        || format!("{ms}ms"),
        |(unit, name)| format!("{}{name}", ms / unit),
    );
    s.serialize_str(&text)
}

fn bytes_text<S: serde::Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&String::from_utf8_lossy(b))
}

/// Parses `"250ms"`, `"5s"`, `"10m"`, `"1h"`, `"2d"`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let digits = s.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = s.split_at(digits);
    let n: u64 = number.parse().ok()?;
    let unit_ms: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(unit_ms).map(Duration::from_millis)
}

// ---- validation ----------------------------------------------------------------------

impl RawConfig {
    fn validate(self, path: &Path) -> Result<Config, Invalid> {
        let base = path.parent().unwrap_or(Path::new("."));
        let drain_timeout = positive(self.drain_timeout, DEFAULT_DRAIN_TIMEOUT, "drain_timeout")?;
        let admin_default = DEFAULT_ADMIN_BIND
            .parse()
            .map_err(|_| (0..0, "internal: bad default admin address".to_string()))?;
        let admin = Admin {
            bind: match self.admin.and_then(|a| a.bind) {
                Some(b) => address(&b)?,
                None => admin_default,
            },
        };
        let runtime = self
            .runtime
            .map_or(Ok(Runtime::default()), RawRuntime::validate)?;

        let mut upstreams: Vec<Upstream> = Vec::with_capacity(self.upstreams.len());
        for raw in self.upstreams {
            let name = check_name(&raw.name, "upstream")?;
            if upstreams.iter().any(|u| u.name == name) {
                return Err((
                    raw.name.span(),
                    format!("duplicate upstream name {name:?}: each upstream needs its own name"),
                ));
            }
            upstreams.push(raw.validate(name, base)?);
        }

        if self.listeners.is_empty() {
            return Err((
                0..0,
                "no [[listener]]: expected at least one listener with a `name`, `bind` and `upstream` (an empty file is never a valid config)".to_string(),
            ));
        }
        let mut listeners: Vec<Listener> = Vec::with_capacity(self.listeners.len());
        for raw in self.listeners {
            let name = check_name(&raw.name, "listener")?;
            if listeners.iter().any(|l| l.name == name) {
                return Err((
                    raw.name.span(),
                    format!("duplicate listener name {name:?}: each listener needs its own name"),
                ));
            }
            let defined = |u: &Spanned<String>| -> Result<String, Invalid> {
                let wanted = u.get_ref();
                if upstreams.iter().any(|x| &x.name == wanted) {
                    return Ok(wanted.clone());
                }
                let known: Vec<&str> = upstreams.iter().map(|u| u.name.as_str()).collect();
                Err((
                    u.span(),
                    format!(
                        "listener {name:?} names upstream {wanted:?}, which is not defined; expected one of {known:?}"
                    ),
                ))
            };
            let upstream = raw.upstream.as_ref().map(&defined).transpose()?;
            let passthrough = if raw.routes.is_empty() {
                if upstream.is_none() {
                    return Err((
                        raw.name.span(),
                        format!(
                            "listener {name:?} has no `upstream`: expected the name of an [[upstream]] (or [[listener.route]] entries for SNI routing)"
                        ),
                    ));
                }
                let misplaced = (raw.hello_timeout.as_ref().map(Spanned::span))
                    .or(raw.max_hello_size.as_ref().map(Spanned::span));
                if let Some(span) = misplaced {
                    return Err((span, "`hello_timeout` and `max_hello_size` apply only to a listener with [[listener.route]] entries".to_string()));
                }
                None
            } else {
                if let Some(tls) = &raw.tls {
                    return Err((
                        tls.span(),
                        "a listener either terminates TLS (`tls`) or routes it untouched by SNI ([[listener.route]]), not both".to_string(),
                    ));
                }
                let mut routes = Vec::new();
                for r in raw.routes {
                    defined(&r.upstream)?;
                    routes.push(r.validate()?);
                }
                Some(Passthrough {
                    routes,
                    hello_timeout: positive(
                        raw.hello_timeout,
                        DEFAULT_HELLO_TIMEOUT,
                        "hello_timeout",
                    )?,
                    max_hello_size: edge::hello_size(raw.max_hello_size)?,
                })
            };
            let tls = match raw.tls {
                None => None,
                Some(t) => Some(t.into_inner().validate(base)?),
            };
            let proxy_protocol = raw
                .proxy_protocol
                .map(RawProxyAccept::validate)
                .transpose()?;
            if raw.bind.get_ref().is_empty() {
                return Err((
                    raw.bind.span(),
                    "empty `bind`: expected at least one address, like [\"0.0.0.0:6432\"]"
                        .to_string(),
                ));
            }
            let mut bind = Vec::new();
            for value in raw.bind.get_ref() {
                let a = address(value)?;
                // Port 0 asks the kernel for a fresh port each time: never a clash.
                let taken = a.port() != 0
                    && listeners
                        .iter()
                        .flat_map(|l| l.bind.iter())
                        .chain(bind.iter())
                        .any(|b| *b == a);
                if taken {
                    return Err((value.span(), format!("address {a} is bound twice")));
                }
                bind.push(a);
            }
            let max_connections = match raw.max_connections {
                None => DEFAULT_MAX_CONNECTIONS,
                Some(m) if *m.get_ref() == 0 => {
                    return Err((m.span(), "`max_connections` must be at least 1".to_string()));
                }
                Some(m) => usize::try_from(*m.get_ref())
                    .map_err(|_| (m.span(), "`max_connections` is too large".to_string()))?,
            };
            let backlog = match raw.backlog {
                None => DEFAULT_BACKLOG,
                Some(b) if *b.get_ref() == 0 => {
                    return Err((b.span(), "`backlog` must be at least 1".to_string()));
                }
                Some(b) => *b.get_ref(),
            };
            listeners.push(Listener {
                name,
                bind,
                upstream,
                max_connections,
                backlog,
                tls,
                proxy_protocol,
                passthrough,
            });
        }

        let access_log = match self.access_log {
            None => None,
            Some(a) => Some(AccessLogConfig {
                path: a.path,
                format: a.format,
                buffer: match a.buffer {
                    None => DEFAULT_ACCESS_LOG_BUFFER,
                    Some(b) => usize::try_from(at_least_one(&b, "buffer")?)
                        .map_err(|_| (b.span(), "`buffer` is too large".to_string()))?,
                },
            }),
        };
        let relay = Relay {
            splice: self.relay.and_then(|r| r.splice).unwrap_or(DEFAULT_SPLICE),
        };
        Ok(Config {
            source: path.to_path_buf(),
            drain_timeout,
            admin,
            runtime,
            access_log,
            relay,
            listeners,
            upstreams,
        })
    }
}

impl RawRuntime {
    fn validate(self) -> Result<Runtime, Invalid> {
        let worker_threads = match self.worker_threads {
            None => 0,
            Some(n) => usize::try_from(*n.get_ref())
                .ok()
                .filter(|n| *n <= MAX_WORKER_THREADS)
                .ok_or_else(|| {
                    (
                        n.span(),
                        format!(
                            "`worker_threads` must be between 0 (one per CPU core) and {MAX_WORKER_THREADS}"
                        ),
                    )
                })?,
        };
        Ok(Runtime {
            mode: self.mode,
            worker_threads,
        })
    }
}

impl RawUpstream {
    fn validate(self, name: String, base: &Path) -> Result<Upstream, Invalid> {
        if self.backends.is_empty() {
            return Err((
                self.name.span(),
                format!(
                    "upstream {name:?} has no backends: expected at least one [[upstream.backend]] with an `address`"
                ),
            ));
        }
        let mut backends: Vec<Backend> = Vec::with_capacity(self.backends.len());
        for raw in self.backends {
            let address = address(&raw.address)?;
            if backends.iter().any(|b| b.address == address) {
                return Err((
                    raw.address.span(),
                    format!("backend {address} appears twice in upstream {name:?}"),
                ));
            }
            let weight = match raw.weight {
                None => DEFAULT_WEIGHT,
                Some(w) if *w.get_ref() > MAX_WEIGHT => {
                    return Err((
                        w.span(),
                        format!("`weight` must be between 0 and {MAX_WEIGHT}"),
                    ));
                }
                Some(w) => *w.get_ref(),
            };
            backends.push(Backend { address, weight });
        }
        let retries = match self.retries {
            None => DEFAULT_RETRIES,
            Some(r) if *r.get_ref() > MAX_RETRIES => {
                return Err((
                    r.span(),
                    format!("`retries` must be between 0 and {MAX_RETRIES}"),
                ));
            }
            Some(r) => *r.get_ref(),
        };
        let max_connections_per_backend = match self.max_connections_per_backend {
            None => None,
            Some(m) => Some(at_least_one(&m, "max_connections_per_backend")?),
        };
        let queue = match self.queue {
            None => Queue {
                max: DEFAULT_QUEUE_MAX,
                timeout: DEFAULT_QUEUE_TIMEOUT,
            },
            Some(q) => Queue {
                max: match q.max {
                    None => DEFAULT_QUEUE_MAX,
                    Some(m) => usize::try_from(*m.get_ref())
                        .map_err(|_| (m.span(), "`max` is too large".to_string()))?,
                },
                timeout: positive(q.timeout, DEFAULT_QUEUE_TIMEOUT, "queue.timeout")?,
            },
        };
        let health_check = match self.health_check {
            None => None,
            Some(h) => {
                let span = h.span();
                let h = h.into_inner();
                let check = HealthCheck {
                    interval: positive(h.interval, DEFAULT_CHECK_INTERVAL, "interval")?,
                    timeout: positive(h.timeout, DEFAULT_CHECK_TIMEOUT, "timeout")?,
                    rise: count(h.rise, DEFAULT_RISE, "rise")?,
                    fall: count(h.fall, DEFAULT_FALL, "fall")?,
                    send: h.send.unwrap_or_default().into_bytes(),
                    expect: h.expect.unwrap_or_default().into_bytes(),
                    send_proxy_protocol: h.send_proxy_protocol,
                };
                if check.send_proxy_protocol && self.send_proxy_protocol.is_none() {
                    return Err((
                        span,
                        "health_check `send_proxy_protocol` needs the upstream's `send_proxy_protocol` (\"v1\" or \"v2\")".to_string(),
                    ));
                }
                if check.timeout > check.interval {
                    return Err((
                        span,
                        "health_check `timeout` must not exceed its `interval`".to_string(),
                    ));
                }
                Some(check)
            }
        };
        let passive_ejection = match self.passive_ejection {
            None => Some(PassiveEjection {
                failures: DEFAULT_EJECT_FAILURES,
                duration: DEFAULT_EJECT_DURATION,
                max_duration: DEFAULT_EJECT_MAX_DURATION,
            }),
            // failures = 0 turns passive ejection off.
            Some(RawPassiveEjection {
                failures: Some(f), ..
            }) if *f.get_ref() == 0 => None,
            Some(p) => {
                let e = PassiveEjection {
                    failures: p.failures.map_or(DEFAULT_EJECT_FAILURES, |f| *f.get_ref()),
                    duration: positive(p.duration, DEFAULT_EJECT_DURATION, "duration")?,
                    max_duration: positive(
                        p.max_duration,
                        DEFAULT_EJECT_MAX_DURATION,
                        "max_duration",
                    )?,
                };
                Some(PassiveEjection {
                    max_duration: e.max_duration.max(e.duration),
                    ..e
                })
            }
        };
        let max_lifetime = match self.max_lifetime {
            None => {
                if let Some(j) = self.max_lifetime_jitter {
                    return Err((
                        j.span(),
                        "`max_lifetime_jitter` needs `max_lifetime`".to_string(),
                    ));
                }
                None
            }
            Some(m) => {
                let max = positive(Some(m), Duration::ZERO, "max_lifetime")?;
                let jitter = self.max_lifetime_jitter.map_or(max / 10, |j| j.get_ref().0);
                Some(Lifetime { max, jitter })
            }
        };
        Ok(Upstream {
            name,
            balance: self.balance,
            max_connections_per_backend,
            queue,
            health_check,
            passive_ejection,
            max_lifetime,
            on_backend_removed: self.on_backend_removed,
            tls: match self.tls {
                None => None,
                Some(t) => {
                    let span = t.span();
                    Some(t.into_inner().validate(base, span)?)
                }
            },
            send_proxy_protocol: self.send_proxy_protocol,
            connect_timeout: positive(
                self.connect_timeout,
                DEFAULT_CONNECT_TIMEOUT,
                "connect_timeout",
            )?,
            idle_timeout: positive(self.idle_timeout, DEFAULT_IDLE_TIMEOUT, "idle_timeout")?,
            retries,
            backends,
        })
    }
}

/// Names become metric labels and log fields: keep them short and plain.
fn check_name(name: &Spanned<String>, what: &str) -> Result<String, Invalid> {
    let s = name.get_ref();
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    if s.is_empty() || s.len() > 64 || !s.chars().all(plain) {
        return Err((
            name.span(),
            format!(
                "invalid {what} name {s:?}: expected 1 to 64 characters of letters, digits, '_', '-' or '.'"
            ),
        ));
    }
    Ok(s.clone())
}

fn at_least_one(value: &Spanned<u64>, key: &str) -> Result<u64, Invalid> {
    if *value.get_ref() == 0 {
        return Err((value.span(), format!("`{key}` must be at least 1")));
    }
    Ok(*value.get_ref())
}

fn count(value: Option<Spanned<u32>>, default: u32, key: &str) -> Result<u32, Invalid> {
    match value {
        None => Ok(default),
        Some(v) if *v.get_ref() == 0 => Err((v.span(), format!("`{key}` must be at least 1"))),
        Some(v) => Ok(*v.get_ref()),
    }
}

/// Timeouts are always on: zero is refused rather than read as "never".
fn positive(
    value: Option<Spanned<DurationValue>>,
    default: Duration,
    key: &str,
) -> Result<Duration, Invalid> {
    match value {
        None => Ok(default),
        Some(v) if v.get_ref().0.is_zero() => Err((
            v.span(),
            format!("`{key}` must be greater than zero: timeouts cannot be turned off"),
        )),
        Some(v) => Ok(v.get_ref().0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1d"), Some(Duration::from_secs(86_400)));
        for bad in [
            "",
            "5",
            "s",
            "5 s",
            "1.5s",
            "-1s",
            "5sec",
            "99999999999999999999d",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let text = r#"
[[listener]]
name = "front"
bind = ["127.0.0.1:0"]
upstream = "app"

[[upstream]]
name = "app"
[[upstream.backend]]
address = "127.0.0.1:1"
"#;
        let c = Config::parse(text, Path::new("t.toml")).expect("valid");
        assert_eq!(c.drain_timeout, DEFAULT_DRAIN_TIMEOUT);
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
        let text = r#"
[runtime]
mode = "per_core"
worker_threads = 3

[[listener]]
name = "front"
bind = ["127.0.0.1:0"]
upstream = "app"

[[upstream]]
name = "app"
[[upstream.backend]]
address = "127.0.0.1:1"
"#;
        let c = Config::parse(text, Path::new("t.toml")).expect("valid");
        assert_eq!(c.runtime.mode, RuntimeMode::PerCore);
        assert_eq!(c.runtime.worker_threads, 3);
        assert_eq!(c.runtime.threads(), 3);
        let mode_only = text.replace("worker_threads = 3\n", "");
        let c = Config::parse(&mode_only, Path::new("t.toml")).expect("valid");
        assert_eq!(c.runtime.worker_threads, 0);
    }
}
