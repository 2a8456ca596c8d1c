//! The config of who may connect to a listener and how much: `allow` and `deny` lists
//! of networks, and the per-client limits (open connections, a token bucket of new
//! connections) with how clients are grouped (an IPv4 or IPv6 prefix) and the size of
//! the table that tracks them.
//!
//! The networks are `ipnet` values: a well-kept crate that parses and matches both
//! families; the checks here add what it allows and a config should not (host bits
//! set, which usually means a typo of the prefix).

use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use super::Invalid;

/// Clients are grouped by this many leading bits of an IPv4 address: one per address.
pub const DEFAULT_CLIENT_IPV4_PREFIX: u8 = 32;
/// Clients are grouped by this many leading bits of an IPv6 address: one per /64, the
/// smallest network a host is usually given, so that one host cannot pass for many.
pub const DEFAULT_CLIENT_IPV6_PREFIX: u8 = 64;
/// Clients tracked at most per listener (about 100 bytes each), beyond those with
/// connections open, which are always tracked.
pub const DEFAULT_CLIENT_TABLE_SIZE: usize = 100_000;

/// Who may connect to a listener: `None` on a listener without `allow` or `deny`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Access {
    /// Empty: every address not denied may connect. Otherwise only these.
    pub allow: Vec<Network>,
    /// Wins over `allow`.
    pub deny: Vec<Network>,
}

impl Access {
    /// Whether a client at `ip` may connect; `Err` says which rule refused it.
    pub fn check(&self, ip: IpAddr) -> Result<(), String> {
        let ip = ip.to_canonical();
        if let Some(n) = self.deny.iter().find(|n| n.0.contains(&ip)) {
            return Err(format!("{ip} is in deny {n}"));
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|n| n.0.contains(&ip)) {
            return Err(format!("{ip} is not in allow"));
        }
        Ok(())
    }
}

/// A network without host bits, `10.0.0.0/8` or `2001:db8::/32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network(pub IpNet);

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl serde::Serialize for Network {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.to_string())
    }
}

/// Per-client limits on a listener.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ClientLimits {
    /// Most connections one client may have open at once; `None` is no limit.
    pub max_connections: Option<u32>,
    /// New connections per client: a token bucket; `None` is no limit.
    pub rate: Option<ClientRate>,
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    /// Clients without open connections tracked at most.
    pub table_size: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ClientRate {
    /// Tokens added per second: the sustained rate of new connections.
    pub per_second: f64,
    /// The bucket's size: how many connections may come at once after a quiet spell.
    pub burst: u32,
}

// ---- the file as written -------------------------------------------------------------

/// The listener keys of this module, as written (each is `None` when absent).
pub(super) struct RawClientKeys {
    pub(super) allow: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) deny: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) max_connections_per_client: Option<Spanned<i64>>,
    pub(super) client_rate: Option<Spanned<RawClientRate>>,
    pub(super) client_ipv4_prefix: Option<Spanned<i64>>,
    pub(super) client_ipv6_prefix: Option<Spanned<i64>>,
    pub(super) client_table_size: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClientRate {
    per_second: Spanned<f64>,
    burst: Option<Spanned<i64>>,
}

impl RawClientKeys {
    /// The listener's access lists and per-client limits, each `None` when not written.
    pub(super) fn validate(self) -> Result<(Option<Access>, Option<ClientLimits>), Invalid> {
        let access = if self.allow.is_none() && self.deny.is_none() {
            None
        } else {
            Some(Access {
                allow: networks(self.allow, "allow")?,
                deny: networks(self.deny, "deny")?,
            })
        };
        let prefix = |v: Option<Spanned<i64>>, default: u8, max: i64, key: &str| match v {
            None => Ok(default),
            Some(p) if (0..=max).contains(p.get_ref()) => Ok(*p.get_ref() as u8),
            Some(p) => Err((
                p.span(),
                format!(
                    "`{key}` {} is out of range: expected a prefix length from 0 to {max}",
                    p.get_ref()
                ),
            )),
        };
        let ipv4_prefix = prefix(
            self.client_ipv4_prefix,
            DEFAULT_CLIENT_IPV4_PREFIX,
            32,
            "client_ipv4_prefix",
        )?;
        let ipv6_prefix = prefix(
            self.client_ipv6_prefix,
            DEFAULT_CLIENT_IPV6_PREFIX,
            128,
            "client_ipv6_prefix",
        )?;
        let table_size = match self.client_table_size {
            None => DEFAULT_CLIENT_TABLE_SIZE,
            Some(n) if *n.get_ref() >= 1 && *n.get_ref() <= 100_000_000 => *n.get_ref() as usize,
            Some(n) => {
                return Err((
                    n.span(),
                    "`client_table_size` must be from 1 to 100000000".to_string(),
                ));
            }
        };
        let max_connections = match self.max_connections_per_client {
            None => None,
            Some(n) if *n.get_ref() >= 1 && *n.get_ref() <= i64::from(u32::MAX) => {
                Some(*n.get_ref() as u32)
            }
            Some(n) => {
                return Err((
                    n.span(),
                    "`max_connections_per_client` must be at least 1 (leave it out for no limit)"
                        .to_string(),
                ));
            }
        };
        let rate = match self.client_rate {
            None => None,
            Some(r) => Some(r.into_inner().validate()?),
        };
        let limits = (max_connections.is_some() || rate.is_some()).then_some(ClientLimits {
            max_connections,
            rate,
            ipv4_prefix,
            ipv6_prefix,
            table_size,
        });
        Ok((access, limits))
    }
}

impl RawClientRate {
    fn validate(self) -> Result<ClientRate, Invalid> {
        let per_second = *self.per_second.get_ref();
        if !(per_second > 0.0 && per_second <= 1e9) {
            return Err((
                self.per_second.span(),
                format!(
                    "`client_rate.per_second` must be above 0 (leave `client_rate` out for no limit), not {per_second}"
                ),
            ));
        }
        let burst = match self.burst {
            // One second's worth, and at least one connection.
            None => per_second.ceil().clamp(1.0, f64::from(u32::MAX)) as u32,
            Some(b) if *b.get_ref() >= 1 && *b.get_ref() <= i64::from(u32::MAX) => {
                *b.get_ref() as u32
            }
            Some(b) => {
                return Err((
                    b.span(),
                    format!(
                        "`client_rate.burst` must be at least 1, not {}",
                        b.get_ref()
                    ),
                ));
            }
        };
        Ok(ClientRate { per_second, burst })
    }
}

/// The networks of `allow` or `deny`: each a CIDR without host bits, or one address.
fn networks(
    list: Option<Spanned<Vec<Spanned<String>>>>,
    key: &str,
) -> Result<Vec<Network>, Invalid> {
    let Some(list) = list else {
        return Ok(Vec::new());
    };
    if key == "allow" && list.get_ref().is_empty() {
        return Err((
            list.span(),
            "empty `allow` would refuse every client: leave it out to allow everyone".to_string(),
        ));
    }
    list.into_inner()
        .into_iter()
        .map(|v| {
            network(v.get_ref()).map_err(|why| {
                (
                    v.span(),
                    format!("invalid `{key}` entry {:?}: {why}", v.get_ref()),
                )
            })
        })
        .collect()
}

fn network(text: &str) -> Result<Network, String> {
    let expected = "expected a network like \"10.0.0.0/8\" or \"2001:db8::/32\", or one address";
    let Some((ip, prefix)) = text.split_once('/') else {
        let ip = IpAddr::from_str(text).map_err(|_| expected.to_string())?;
        return Ok(Network(IpNet::from(ip)));
    };
    let ip = IpAddr::from_str(ip).map_err(|_| expected.to_string())?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix: u32 = prefix
        .parse()
        .map_err(|_| format!("the prefix length is not a number; {expected}"))?;
    if prefix > max {
        return Err(format!(
            "prefix length {prefix} is over {max}, the most an {} address has",
            if ip.is_ipv4() { "IPv4" } else { "IPv6" }
        ));
    }
    let net = IpNet::new(ip, prefix as u8).map_err(|e| e.to_string())?;
    if net.trunc() != net {
        return Err(format!(
            "host bits are set after the prefix; the network is {}",
            net.trunc()
        ));
    }
    Ok(Network(net))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_parse_strictly_and_match_both_families() {
        assert!(network("10.0.0.0/8").is_ok());
        assert!(network("2001:db8::/32").is_ok());
        assert!(network("::1").is_ok());
        assert!(network("10.0.0.1/8").unwrap_err().contains("10.0.0.0/8"));
        assert!(network("::/129").unwrap_err().contains("over 128"));
        assert!(network("10.0.0.0/33").unwrap_err().contains("over 32"));
        assert!(network("10.0.0.0/x").is_err());
        assert!(network("example.com/8").is_err());
        let a = Access {
            allow: vec![network("127.0.0.0/8").unwrap(), network("::1").unwrap()],
            deny: vec![network("127.0.0.9").unwrap()],
        };
        assert!(a.check("127.0.0.2".parse().unwrap()).is_ok());
        assert!(
            a.check("::ffff:127.0.0.2".parse().unwrap()).is_ok(),
            "mapped"
        );
        assert!(a.check("::1".parse().unwrap()).is_ok());
        assert!(a.check("127.0.0.9".parse().unwrap()).is_err(), "deny wins");
        assert!(a.check("10.0.0.1".parse().unwrap()).is_err(), "not allowed");
        assert!(a.check("::2".parse().unwrap()).is_err());
    }
}
