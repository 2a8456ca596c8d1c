//! Backends by name: a backend `address` written as `"host:port"`, an upstream's
//! `discover = { srv = "..." }`, and the top-level `[resolver]` table, as written and
//! validated. What the names resolve to is the control plane's business
//! (`control/discovery.rs`); the config only guarantees that every name is well formed.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::Invalid;
use super::values::{DurationValue, count, positive};

/// How long one DNS query may take before it counts as failed.
pub const DEFAULT_RESOLVER_TIMEOUT: Duration = Duration::from_secs(2);
/// Queries tried per resolution (over every nameserver) before it counts as failed.
pub const DEFAULT_RESOLVER_ATTEMPTS: u32 = 2;
/// A name is re-resolved no sooner than this after the last resolution, whatever its TTL.
pub const DEFAULT_MIN_INTERVAL: Duration = Duration::from_secs(1);
/// A name is re-resolved at least this often, whatever its TTL.
pub const DEFAULT_MAX_INTERVAL: Duration = Duration::from_secs(60);
/// How long NXDOMAIN or an empty answer must persist before a name's endpoints go.
pub const DEFAULT_HOLD: Duration = Duration::from_secs(30);
/// Most attempts `[resolver] attempts` may ask for.
pub(super) const MAX_RESOLVER_ATTEMPTS: u32 = 10;

/// How names are resolved: by default with the nameservers of `/etc/resolv.conf`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Resolver {
    /// Empty: those of `/etc/resolv.conf`.
    pub nameservers: Vec<SocketAddr>,
    #[serde(serialize_with = "super::values::duration_text")]
    pub timeout: Duration,
    pub attempts: u32,
    #[serde(serialize_with = "super::values::duration_text")]
    pub min_interval: Duration,
    #[serde(serialize_with = "super::values::duration_text")]
    pub max_interval: Duration,
    #[serde(serialize_with = "super::values::duration_text")]
    pub hold: Duration,
}

impl Default for Resolver {
    fn default() -> Resolver {
        Resolver {
            nameservers: Vec::new(),
            timeout: DEFAULT_RESOLVER_TIMEOUT,
            attempts: DEFAULT_RESOLVER_ATTEMPTS,
            min_interval: DEFAULT_MIN_INTERVAL,
            max_interval: DEFAULT_MAX_INTERVAL,
            hold: DEFAULT_HOLD,
        }
    }
}

/// A source of endpoints for an upstream: a backend entry whose address is a host name
/// (its A and AAAA records), or the upstream's SRV name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DnsName {
    /// Every address of `host` is an endpoint on `port`.
    Host { host: String, port: u16 },
    /// Every target of the SRV records of `name`, on the record's port.
    Srv { name: String },
}

impl fmt::Display for DnsName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DnsName::Host { host, port } => write!(f, "{host}:{port}"),
            DnsName::Srv { name } => write!(f, "srv:{name}"),
        }
    }
}

/// As the config writes it (`"db.internal:5432"`), or `"srv:_pg._tcp.db"`.
impl serde::Serialize for DnsName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A named source of endpoints in an upstream, with what each endpoint it gives gets.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Discovered {
    pub name: DnsName,
    /// The entry's weight for every address of a host; SRV endpoints take their record's.
    pub weight: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawResolver {
    nameservers: Option<Vec<Spanned<String>>>,
    timeout: Option<Spanned<DurationValue>>,
    attempts: Option<Spanned<u32>>,
    min_interval: Option<Spanned<DurationValue>>,
    max_interval: Option<Spanned<DurationValue>>,
    hold: Option<Spanned<DurationValue>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDiscover {
    pub(super) srv: Spanned<String>,
}

impl RawResolver {
    pub(super) fn validate(self) -> Result<Resolver, Invalid> {
        let mut nameservers = Vec::new();
        for n in self.nameservers.unwrap_or_default() {
            // A bare IP means port 53.
            let text = n.get_ref();
            let parsed = text.parse::<SocketAddr>().ok().or_else(|| {
                text.parse::<std::net::IpAddr>()
                    .ok()
                    .map(|ip| SocketAddr::new(ip, 53))
            });
            match parsed {
                Some(a) => nameservers.push(a),
                None => {
                    return Err((
                        n.span(),
                        format!(
                            "invalid nameserver {text:?}: expected an IP address, with or without a port, like \"10.0.0.2\" or \"127.0.0.1:5353\""
                        ),
                    ));
                }
            }
        }
        let attempts_span = self.attempts.as_ref().map(Spanned::span);
        let attempts = count(self.attempts, DEFAULT_RESOLVER_ATTEMPTS, "attempts")?;
        if attempts > MAX_RESOLVER_ATTEMPTS {
            return Err((
                attempts_span.unwrap_or(0..0),
                format!("`attempts` must be between 1 and {MAX_RESOLVER_ATTEMPTS}"),
            ));
        }
        let max_span = self.max_interval.as_ref().map(Spanned::span);
        let r = Resolver {
            nameservers,
            timeout: positive(self.timeout, DEFAULT_RESOLVER_TIMEOUT, "timeout")?,
            attempts,
            min_interval: positive(self.min_interval, DEFAULT_MIN_INTERVAL, "min_interval")?,
            max_interval: positive(self.max_interval, DEFAULT_MAX_INTERVAL, "max_interval")?,
            hold: match self.hold {
                None => DEFAULT_HOLD,
                Some(h) => h.get_ref().0,
            },
        };
        if r.max_interval < r.min_interval {
            return Err((
                max_span.unwrap_or(0..0),
                "`max_interval` must not be below `min_interval`".to_string(),
            ));
        }
        Ok(r)
    }
}

impl RawDiscover {
    pub(super) fn validate(&self) -> Result<DnsName, Invalid> {
        let name = self.srv.get_ref();
        check_host(name).map_err(|why| {
            (
                self.srv.span(),
                format!("invalid SRV name {name:?}: {why}, like \"_pg._tcp.db.svc.cluster.local\""),
            )
        })?;
        Ok(DnsName::Srv {
            name: name.trim_end_matches('.').to_string(),
        })
    }
}

/// A backend address that is not an IP literal: `"host:port"` with a well-formed host
/// name and a port from 1 to 65535. `Err` explains what is wrong.
pub(super) fn host_port(text: &str) -> Result<DnsName, String> {
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err("expected a port after the host, like \"db.internal:5432\"".to_string());
    };
    if port.is_empty() {
        return Err("the port is missing after ':'".to_string());
    }
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("port {port:?} is not a number"));
    }
    let port = match port.parse::<u16>() {
        Ok(0) | Err(_) => return Err(format!("port {port} is out of range (1 to 65535)")),
        Ok(p) => p,
    };
    check_host(host)?;
    Ok(DnsName::Host {
        host: host.trim_end_matches('.').to_ascii_lowercase(),
        port,
    })
}

/// A DNS name as RFC 1123 allows (with `_` for SRV labels): dot-separated labels of
/// letters, digits, `-` and `_`, each 1 to 63 long, 253 in all, a trailing dot allowed.
fn check_host(host: &str) -> Result<(), String> {
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() {
        return Err("the host name is empty".to_string());
    }
    if name.len() > 253 {
        return Err("the host name is longer than 253 characters".to_string());
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(
                "each part of a host name between dots must be 1 to 63 characters".to_string(),
            );
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(format!(
                "{c:?} is not allowed in a host name (letters, digits, '-', '_' and '.')"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a part of a host name must not start or end with '-'".to_string());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_and_their_errors() {
        assert_eq!(
            host_port("DB.internal.:5432"),
            Ok(DnsName::Host {
                host: "db.internal".into(),
                port: 5432
            })
        );
        for (bad, why) in [
            ("host:", "port is missing"),
            ("host:99999", "out of range"),
            ("host:0", "out of range"),
            ("my host:80", "not allowed"),
            ("host", "expected a port"),
            (":80", "empty"),
            ("a..b:80", "1 to 63"),
            ("-a:80", "start or end"),
            ("host:8o", "not a number"),
        ] {
            let err = host_port(bad).expect_err(bad);
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
