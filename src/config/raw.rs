//! The top of the file as written (serde, `deny_unknown_fields`) and its validation into
//! a [`Config`]: the admin, runtime, access log and relay tables and each `[[listener]]`.
//! The `[[upstream]]` table is in `upstream.rs`.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::client::{RawClientKeys, RawClientRate};
use super::edge::{
    self, DEFAULT_HELLO_TIMEOUT, Passthrough, Paths, RawListenerTls, RawProxyAccept, RawSniRoute,
};
use super::upstream::RawUpstream;
use super::values::{DurationValue, address, at_least_one, positive};
use super::{
    AccessLogConfig, Admin, Config, DEFAULT_ACCESS_LOG_BUFFER, DEFAULT_ADMIN_BIND, DEFAULT_BACKLOG,
    DEFAULT_DRAIN_TIMEOUT, DEFAULT_MAX_CONNECTIONS, DEFAULT_SPLICE, Invalid, Listener, LogFormat,
    MAX_WORKER_THREADS, NamedFile, NamedFiles, Relay, Runtime, RuntimeMode, Upstream,
};

// ---- the file as written -------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    drain_timeout: Option<Spanned<DurationValue>>,
    upgrade_timeout: Option<Spanned<DurationValue>>,
    admin: Option<RawAdmin>,
    runtime: Option<RawRuntime>,
    access_log: Option<RawAccessLog>,
    relay: Option<RawRelay>,
    control: Option<super::control::RawControl>,
    #[serde(default, rename = "listener")]
    listeners: Vec<RawListener>,
    #[serde(default, rename = "upstream")]
    upstreams: Vec<RawUpstream>,
    resolver: Option<super::discovery::RawResolver>,
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
    // Who may connect and how much (`client.rs`).
    allow: Option<Spanned<Vec<Spanned<String>>>>,
    deny: Option<Spanned<Vec<Spanned<String>>>>,
    close_denied_on_reload: Option<bool>,
    max_connections_per_client: Option<Spanned<i64>>,
    client_rate: Option<Spanned<RawClientRate>>,
    client_ipv4_prefix: Option<Spanned<i64>>,
    client_ipv6_prefix: Option<Spanned<i64>>,
    client_table_size: Option<Spanned<i64>>,
}

// ---- validation ----------------------------------------------------------------------

impl RawConfig {
    pub(super) fn validate(self, path: &Path) -> Result<Config, Invalid> {
        let paths = Paths::new(path);
        let base = &paths;
        let drain_timeout = positive(self.drain_timeout, DEFAULT_DRAIN_TIMEOUT, "drain_timeout")?;
        let upgrade_timeout = positive(
            self.upgrade_timeout,
            crate::config::DEFAULT_UPGRADE_TIMEOUT,
            "upgrade_timeout",
        )?;
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
            let max_connections_set = raw.max_connections.is_some();
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
            let (access, client_limits) = RawClientKeys {
                allow: raw.allow,
                deny: raw.deny,
                max_connections_per_client: raw.max_connections_per_client,
                client_rate: raw.client_rate,
                client_ipv4_prefix: raw.client_ipv4_prefix,
                client_ipv6_prefix: raw.client_ipv6_prefix,
                client_table_size: raw.client_table_size,
            }
            .validate()?;
            listeners.push(Listener {
                name,
                bind,
                upstream,
                max_connections,
                max_connections_set,
                backlog,
                tls,
                proxy_protocol,
                passthrough,
                access,
                client_limits,
                close_denied_on_reload: raw.close_denied_on_reload.unwrap_or(false),
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
        let control = self.control.map(|c| c.validate(path)).transpose()?;
        Ok(Config {
            control,
            source: path.to_path_buf(),
            drain_timeout,
            upgrade_timeout,
            admin,
            runtime,
            access_log,
            relay,
            listeners,
            upstreams,
            resolver: match self.resolver {
                None => super::Resolver::default(),
                Some(r) => r.validate()?,
            },
            named_files: NamedFiles(
                paths
                    .into_named()
                    .into_iter()
                    .map(|(path, span)| NamedFile {
                        path,
                        span,
                        line: 0,
                        column: 0,
                    })
                    .collect(),
            ),
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
