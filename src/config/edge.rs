//! The config of what happens at the edges of a connection before bytes are relayed:
//! a listener's TLS termination, PROXY protocol acceptance and SNI passthrough routes,
//! and an upstream's TLS and PROXY header towards its backends.
//!
//! File paths are resolved against the config file's directory, so a config and its
//! certificates move together (and a Kubernetes volume works as mounted).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::Invalid;
use super::values::{DurationValue, positive};

/// A client must finish its TLS handshake within this long.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A trusted peer must send its whole PROXY header within this long.
pub const DEFAULT_PROXY_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest PROXY header accepted: v1 needs 107 bytes; v2 TLVs from cloud load
/// balancers stay well under this. A longer header closes the connection.
pub const PROXY_MAX_HEADER: usize = 4096;
/// A passthrough client must send its whole ClientHello within this long.
pub const DEFAULT_HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes buffered while waiting for a ClientHello: room for post-quantum key shares
/// (about 1,800 bytes today) many times over, yet bounded.
pub const DEFAULT_MAX_HELLO_SIZE: usize = 16_384;
pub const MAX_HELLO_SIZE_LIMIT: usize = 65_536;
/// Sessions a TLS listener remembers by session ID, for TLS 1.2 clients that resume
/// without tickets (and every client when `session_tickets = false`). rustls reserves
/// the table up front (about 0.2 MB resident for this default, BENCHMARKS.md), a few
/// hundred bytes a session once filled.
pub const DEFAULT_SESSION_CACHE_SIZE: usize = 10_000;
pub const MAX_SESSION_CACHE_SIZE: usize = 1_000_000;

/// TLS termination on a listener.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ListenerTls {
    /// Chosen by the client's SNI among the names each certificate covers; the first is
    /// the default for a client without SNI or with a name no certificate covers.
    pub certificates: Vec<CertificateFiles>,
    #[serde(serialize_with = "super::duration_text")]
    pub handshake_timeout: Duration,
    /// Protocols offered in ALPN, in order of preference; empty offers none.
    pub alpn: Vec<String>,
    pub min_version: TlsVersion,
    /// Client certificates (mTLS); `None` asks for none.
    pub client_auth: Option<ClientAuth>,
    /// Stateless session tickets (TLS 1.3, and TLS 1.2 clients that ask for them),
    /// encrypted with keys held once per process and kept across reloads.
    pub session_tickets: bool,
    /// Sessions remembered by ID (TLS 1.2 without tickets); 0 remembers none.
    pub session_cache_size: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct CertificateFiles {
    /// PEM: the certificate first, then its chain.
    pub cert: PathBuf,
    /// PEM: PKCS#8, PKCS#1 or SEC1 private key.
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
pub enum TlsVersion {
    #[default]
    #[serde(rename = "1.2")]
    V1_2,
    #[serde(rename = "1.3")]
    V1_3,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ClientAuth {
    /// PEM bundle of the CAs that client certificates must chain to.
    pub ca: PathBuf,
    /// `false` lets a client without a certificate in; one that presents an invalid
    /// certificate is still refused.
    pub required: bool,
}

/// Accepting a PROXY protocol header (v1 or v2) on a listener.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ProxyAccept {
    /// Peers that must send a header; a connection from anyone else is closed.
    pub trusted: Vec<Cidr>,
    #[serde(serialize_with = "super::duration_text")]
    pub timeout: Duration,
}

/// An IP network, `10.0.0.0/8` or `::1/128`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is inside; an IPv4 peer seen on an IPv6 socket (`::ffff:a.b.c.d`)
    /// counts as that IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }

    fn parse(s: &str) -> Option<Cidr> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip.parse::<IpAddr>().ok()?, p.parse::<u8>().ok()?),
            None => {
                let ip = s.parse::<IpAddr>().ok()?;
                (ip, if ip.is_ipv4() { 32 } else { 128 })
            }
        };
        let max = if ip.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Cidr {
            network: ip,
            prefix,
        })
    }
}

impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}/{}", self.network, self.prefix))
    }
}

/// SNI passthrough: the listener reads the ClientHello, routes on its server name and
/// relays the TLS bytes untouched.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Passthrough {
    pub routes: Vec<SniRoute>,
    #[serde(serialize_with = "super::duration_text")]
    pub hello_timeout: Duration,
    pub max_hello_size: usize,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SniRoute {
    pub sni: Vec<SniPattern>,
    pub upstream: String,
}

/// A server name to match: exact, or `*.example.com` for any one or more labels in
/// front of `example.com`. Stored lowercase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SniPattern {
    Exact(String),
    /// The suffix with its leading dot: `.example.com`.
    Wildcard(String),
}

impl SniPattern {
    pub fn matches(&self, name: &str) -> bool {
        match self {
            SniPattern::Exact(n) => n == name,
            SniPattern::Wildcard(suffix) => name.len() > suffix.len() && name.ends_with(suffix),
        }
    }

    fn parse(s: &str) -> Option<SniPattern> {
        let s = s.trim_end_matches('.').to_ascii_lowercase();
        let host = s.strip_prefix("*.").unwrap_or(&s);
        let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_');
        if host.is_empty()
            || host.len() > 253
            || !host
                .split('.')
                .all(|l| !l.is_empty() && l.chars().all(plain))
        {
            return None;
        }
        Some(match s.strip_prefix('*') {
            Some(suffix) => SniPattern::Wildcard(suffix.to_string()),
            None => SniPattern::Exact(s),
        })
    }
}

impl serde::Serialize for SniPattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            SniPattern::Exact(n) => s.serialize_str(n),
            SniPattern::Wildcard(suffix) => s.serialize_str(&format!("*{suffix}")),
        }
    }
}

/// TLS from sluice to an upstream's backends; health checks use it too.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct UpstreamTls {
    /// Name sent in SNI and verified in the backend's certificate; `None` verifies the
    /// backend's IP address instead and sends no SNI.
    pub sni: Option<String>,
    /// PEM bundle of the CAs the backend's certificate must chain to; required unless
    /// `verify` is off.
    pub ca: Option<PathBuf>,
    /// Presented to backends that ask for a client certificate.
    pub client_certificate: Option<CertificateFiles>,
    /// `false` accepts any certificate: for testing only, and logged as a warning.
    pub verify: bool,
    pub alpn: Vec<String>,
}

/// Which PROXY protocol header to send to backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProxyVersion {
    V1,
    V2,
}

// ---- the file as written -------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListenerTls {
    certificates: Spanned<Vec<RawCertificate>>,
    handshake_timeout: Option<Spanned<DurationValue>>,
    #[serde(default)]
    alpn: Vec<String>,
    #[serde(default)]
    min_version: TlsVersion,
    client_auth: Option<RawClientAuth>,
    #[serde(default = "yes")]
    session_tickets: bool,
    session_cache_size: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertificate {
    cert: Spanned<PathBuf>,
    key: Spanned<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClientAuth {
    ca: Spanned<PathBuf>,
    #[serde(default = "yes")]
    required: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProxyAccept {
    trusted: Spanned<Vec<Spanned<String>>>,
    timeout: Option<Spanned<DurationValue>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSniRoute {
    sni: Spanned<Vec<Spanned<String>>>,
    pub(super) upstream: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstreamTls {
    sni: Option<Spanned<String>>,
    ca: Option<Spanned<PathBuf>>,
    certificate: Option<Spanned<PathBuf>>,
    key: Option<Spanned<PathBuf>>,
    #[serde(default = "yes")]
    verify: bool,
    #[serde(default)]
    alpn: Vec<String>,
}

fn yes() -> bool {
    true
}

/// Resolves the file paths a config names against its directory, and remembers where
/// in the file each one is named, so that a file that cannot be loaded is reported at
/// the key that names it.
pub(super) struct Paths {
    dir: PathBuf,
    named: std::cell::RefCell<Vec<(PathBuf, std::ops::Range<usize>)>>,
}

impl Paths {
    /// For the config file at `config`.
    pub(super) fn new(config: &Path) -> Paths {
        Paths {
            dir: config.parent().unwrap_or(Path::new(".")).to_path_buf(),
            named: Default::default(),
        }
    }

    /// A path as written, made relative to the config file's directory.
    fn resolve(&self, p: Spanned<PathBuf>) -> PathBuf {
        let span = p.span();
        let p = p.into_inner();
        let resolved = if p.is_absolute() { p } else { self.dir.join(p) };
        self.named.borrow_mut().push((resolved.clone(), span));
        resolved
    }

    /// Every path resolved, with the span of the value that named it.
    pub(super) fn into_named(self) -> Vec<(PathBuf, std::ops::Range<usize>)> {
        self.named.into_inner()
    }
}

impl RawListenerTls {
    pub(super) fn validate(self, base: &Paths) -> Result<ListenerTls, Invalid> {
        if self.certificates.get_ref().is_empty() {
            return Err((
                self.certificates.span(),
                "`certificates` is empty: expected at least one { cert = \"...pem\", key = \"...key\" }".to_string(),
            ));
        }
        Ok(ListenerTls {
            certificates: self
                .certificates
                .into_inner()
                .into_iter()
                .map(|c| CertificateFiles {
                    cert: base.resolve(c.cert),
                    key: base.resolve(c.key),
                })
                .collect(),
            handshake_timeout: positive(
                self.handshake_timeout,
                DEFAULT_HANDSHAKE_TIMEOUT,
                "handshake_timeout",
            )?,
            alpn: self.alpn,
            min_version: self.min_version,
            client_auth: self.client_auth.map(|a| ClientAuth {
                ca: base.resolve(a.ca),
                required: a.required,
            }),
            session_tickets: self.session_tickets,
            session_cache_size: session_cache_size(self.session_cache_size)?,
        })
    }
}

/// Checks a TLS listener's `session_cache_size`.
fn session_cache_size(value: Option<Spanned<u64>>) -> Result<usize, Invalid> {
    match value {
        None => Ok(DEFAULT_SESSION_CACHE_SIZE),
        Some(v) => {
            let n = usize::try_from(*v.get_ref()).unwrap_or(usize::MAX);
            if n > MAX_SESSION_CACHE_SIZE {
                return Err((
                    v.span(),
                    format!(
                        "`session_cache_size` must be at most {MAX_SESSION_CACHE_SIZE} sessions (0 keeps none)"
                    ),
                ));
            }
            Ok(n)
        }
    }
}

impl RawProxyAccept {
    pub(super) fn validate(self) -> Result<ProxyAccept, Invalid> {
        if self.trusted.get_ref().is_empty() {
            return Err((
                self.trusted.span(),
                "`trusted` is empty: expected the addresses of the load balancers that send PROXY headers, like [\"10.0.0.0/8\"]".to_string(),
            ));
        }
        let mut trusted = Vec::new();
        for t in self.trusted.get_ref() {
            trusted.push(Cidr::parse(t.get_ref()).ok_or_else(|| {
                (
                    t.span(),
                    format!(
                        "invalid network {:?}: expected an IP address or CIDR, like \"10.0.0.0/8\" or \"::1\"",
                        t.get_ref()
                    ),
                )
            })?);
        }
        Ok(ProxyAccept {
            trusted,
            timeout: positive(
                self.timeout,
                DEFAULT_PROXY_TIMEOUT,
                "proxy_protocol.timeout",
            )?,
        })
    }
}

impl RawSniRoute {
    /// Validates the names; the caller checks the upstream exists.
    pub(super) fn validate(self) -> Result<SniRoute, Invalid> {
        if self.sni.get_ref().is_empty() {
            return Err((
                self.sni.span(),
                "`sni` is empty: expected names like [\"db.example.com\", \"*.internal\"]"
                    .to_string(),
            ));
        }
        let mut sni = Vec::new();
        for name in self.sni.get_ref() {
            sni.push(SniPattern::parse(name.get_ref()).ok_or_else(|| {
                (
                    name.span(),
                    format!(
                        "invalid server name {:?}: expected a DNS name like \"db.example.com\" or a wildcard like \"*.example.com\"",
                        name.get_ref()
                    ),
                )
            })?);
        }
        Ok(SniRoute {
            sni,
            upstream: self.upstream.into_inner(),
        })
    }
}

impl RawUpstreamTls {
    pub(super) fn validate(
        self,
        base: &Paths,
        span: std::ops::Range<usize>,
    ) -> Result<UpstreamTls, Invalid> {
        let client_certificate = match (self.certificate, self.key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(CertificateFiles {
                cert: base.resolve(cert),
                key: base.resolve(key),
            }),
            _ => {
                return Err((
                    span,
                    "upstream `tls` needs both `certificate` and `key` for a client certificate, or neither".to_string(),
                ));
            }
        };
        if self.verify && self.ca.is_none() {
            return Err((
                span,
                "upstream `tls` needs `ca`, the CA bundle that backend certificates are verified against (or `verify = false`, which accepts any certificate)".to_string(),
            ));
        }
        let sni = match self.sni {
            None => None,
            Some(s) => match SniPattern::parse(s.get_ref()) {
                Some(SniPattern::Exact(name)) => Some(name),
                _ => {
                    return Err((
                        s.span(),
                        format!(
                            "invalid `sni` {:?}: expected a DNS name like \"db.internal\"",
                            s.get_ref()
                        ),
                    ));
                }
            },
        };
        Ok(UpstreamTls {
            sni,
            ca: self.ca.map(|c| base.resolve(c)),
            client_certificate,
            verify: self.verify,
            alpn: self.alpn,
        })
    }
}

/// Checks a passthrough listener's size limit.
pub(super) fn hello_size(value: Option<Spanned<u64>>) -> Result<usize, Invalid> {
    match value {
        None => Ok(DEFAULT_MAX_HELLO_SIZE),
        Some(v) => {
            let n = usize::try_from(*v.get_ref()).unwrap_or(usize::MAX);
            if !(512..=MAX_HELLO_SIZE_LIMIT).contains(&n) {
                return Err((
                    v.span(),
                    format!(
                        "`max_hello_size` must be between 512 and {MAX_HELLO_SIZE_LIMIT} bytes"
                    ),
                ));
            }
            Ok(n)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_contains() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        let one = Cidr::parse("::1").unwrap();
        assert!(one.contains("::1".parse().unwrap()));
        assert!(!one.contains("::2".parse().unwrap()));
        let all = Cidr::parse("0.0.0.0/0").unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        assert!(!all.contains("::2".parse().unwrap()));
        for bad in ["10.0.0.0/33", "::/129", "10.0.0/8", "x", "10.0.0.0/"] {
            assert!(Cidr::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn sni_patterns() {
        let w = SniPattern::parse("*.Example.com.").unwrap();
        assert!(w.matches("a.example.com"));
        assert!(w.matches("a.b.example.com"));
        assert!(!w.matches("example.com"));
        assert!(!w.matches("aexample.com"));
        let e = SniPattern::parse("db.example.com").unwrap();
        assert!(e.matches("db.example.com"));
        assert!(!e.matches("x.db.example.com"));
        for bad in ["", "*", "*.", "a..b", "a b", "*.*.x", "a.*.b"] {
            assert!(SniPattern::parse(bad).is_none(), "{bad:?}");
        }
    }
}
