//! The `[[upstream]]` table as written (serde, `deny_unknown_fields`) and its validation
//! into an [`Upstream`]: backends, queue, health checks, passive ejection and lifetimes.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::discovery::{Discovered, host_port};
use super::edge::{Paths, ProxyVersion, RawUpstreamTls};
use super::values::{DurationValue, address, at_least_one, count, positive};
use super::{
    Backend, BackendRemoved, Balance, DEFAULT_CHECK_INTERVAL, DEFAULT_CHECK_TIMEOUT,
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_EJECT_DURATION, DEFAULT_EJECT_FAILURES,
    DEFAULT_EJECT_MAX_DURATION, DEFAULT_FALL, DEFAULT_IDLE_TIMEOUT, DEFAULT_QUEUE_MAX,
    DEFAULT_QUEUE_TIMEOUT, DEFAULT_RETRIES, DEFAULT_RISE, DEFAULT_WEIGHT, HealthCheck, Invalid,
    Lifetime, MAX_RETRIES, MAX_WEIGHT, PassiveEjection, Queue, Upstream,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    pub(super) name: Spanned<String>,
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
    slow_start: Option<Spanned<DurationValue>>,
    #[serde(default, rename = "backend")]
    backends: Vec<RawBackend>,
    /// Endpoints from SRV records (`control/discovery.rs`).
    discover: Option<super::discovery::RawDiscover>,
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

impl RawUpstream {
    pub(super) fn validate(self, name: String, base: &Paths) -> Result<Upstream, Invalid> {
        if self.backends.is_empty() && self.discover.is_none() {
            return Err((
                self.name.span(),
                format!(
                    "upstream {name:?} has no backends: expected at least one [[upstream.backend]] with an `address`, or `discover = {{ srv = \"...\" }}`"
                ),
            ));
        }
        let mut backends: Vec<Backend> = Vec::with_capacity(self.backends.len());
        let mut discovered: Vec<Discovered> = Vec::new();
        for raw in self.backends {
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
            // An IP literal as before; anything else must be a well-formed "host:port".
            let literal = address(&raw.address);
            let named = literal.is_err().then(|| host_port(raw.address.get_ref()));
            match (literal, named) {
                (Ok(address), _) => {
                    if backends.iter().any(|b| b.address == address) {
                        return Err((
                            raw.address.span(),
                            format!("backend {address} appears twice in upstream {name:?}"),
                        ));
                    }
                    backends.push(Backend {
                        address,
                        weight,
                        entry: None,
                        priority: 0,
                    });
                }
                (Err(_), Some(Ok(dns))) => {
                    if discovered.iter().any(|d| d.name == dns) {
                        return Err((
                            raw.address.span(),
                            format!("backend {dns} appears twice in upstream {name:?}"),
                        ));
                    }
                    discovered.push(Discovered { name: dns, weight });
                }
                (Err(e), named) => {
                    // An IP address with a bad port keeps the IP error; a name says
                    // what is wrong with the name.
                    let text = raw.address.get_ref();
                    let looks_ip = text.starts_with('[')
                        || text.parse::<std::net::IpAddr>().is_ok()
                        || text
                            .rsplit_once(':')
                            .is_some_and(|(h, _)| h.parse::<std::net::IpAddr>().is_ok());
                    return Err(match named {
                        Some(Err(why)) if !looks_ip => (
                            raw.address.span(),
                            format!(
                                "invalid address {text:?}: {why} (a backend address is an IP address and port, like \"10.0.0.1:5432\", or a host name and port, like \"db.internal:5432\")"
                            ),
                        ),
                        _ => e,
                    });
                }
            }
        }
        if let Some(d) = &self.discover {
            discovered.push(Discovered {
                name: d.validate()?,
                weight: DEFAULT_WEIGHT,
            });
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
            discovered,
            slow_start: match self.slow_start {
                None => None,
                Some(s) => Some(positive(Some(s), Duration::ZERO, "slow_start")?),
            },
        })
    }
}
