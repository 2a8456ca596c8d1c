//! TLS material: certificates, keys and CA bundles read from their files into rustls
//! configs, for listeners that terminate TLS and upstreams that speak TLS to backends.
//!
//! Loading reads files, so it runs off the event loop (`spawn_blocking`) at start and on
//! every reload. A reload whose files fail to load changes nothing: the old material
//! stays in use. The material carries a fingerprint of every byte read, so a reload
//! triggered by a rotated certificate applies even though the config text is unchanged.

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::server::{
    ClientHello, NoServerSessionStorage, ProducesTickets, ResolvesServerCert,
    ServerSessionMemoryCache, StoresServerSessions, WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::{self, CertificateFiles, Config, TlsVersion};
use crate::metrics::HandshakeResult;

/// Why TLS material could not be loaded; always names the file, and the config file,
/// line and column of the key that names it.
#[derive(Debug, thiserror::Error)]
#[error("{}{}: {what}", named_at(config, *place), path.display())]
pub struct TlsError {
    pub path: PathBuf,
    pub what: String,
    /// The config file that names `path`, and where (line, column).
    pub config: PathBuf,
    pub place: Option<(usize, usize)>,
}

/// `config.toml:12:9: ` (or `config.toml: ` when the place is unknown).
fn named_at(config: &Path, place: Option<(usize, usize)>) -> String {
    match place {
        _ if config.as_os_str().is_empty() => String::new(),
        Some((line, column)) => format!("{}:{line}:{column}: ", config.display()),
        None => format!("{}: ", config.display()),
    }
}

fn error(path: &Path, what: impl std::fmt::Display) -> TlsError {
    TlsError {
        path: path.to_path_buf(),
        what: what.to_string(),
        config: PathBuf::new(),
        place: None,
    }
}

/// Everything TLS that a snapshot needs, loaded from the files a config names.
#[derive(Default)]
pub struct Material {
    /// By listener name, for listeners with `tls`.
    pub listeners: HashMap<String, Arc<Termination>>,
    /// By upstream name, for upstreams with `tls`.
    pub upstreams: HashMap<String, Arc<Origination>>,
    /// Hash of every byte read: equal fingerprints mean nothing changed on disk.
    pub fingerprint: u64,
}

/// Every certificate, key and CA file `config` names, and the target of each one that
/// is a symlink: what the reload watcher watches besides the config file.
pub fn files(config: &Config) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for tls in config.listeners.iter().filter_map(|l| l.tls.as_ref()) {
        for c in &tls.certificates {
            files.extend([c.cert.clone(), c.key.clone()]);
        }
        files.extend(tls.client_auth.iter().map(|a| a.ca.clone()));
    }
    for tls in config.upstreams.iter().filter_map(|u| u.tls.as_ref()) {
        if let Some(c) = &tls.client_certificate {
            files.extend([c.cert.clone(), c.key.clone()]);
        }
        files.extend(tls.ca.iter().cloned());
    }
    let targets: Vec<PathBuf> = files
        .iter()
        .filter(|f| f.is_symlink())
        .filter_map(|f| std::fs::canonicalize(f).ok())
        .collect();
    files.extend(targets);
    files.sort();
    files.dedup();
    files
}

/// A listener's TLS termination.
pub struct Termination {
    pub acceptor: TlsAcceptor,
    pub handshake_timeout: Duration,
    /// (certificate file, notAfter as Unix seconds), for the expiry gauge.
    pub expiries: Vec<(String, i64)>,
    /// Held so that the registry keeps it while a snapshot uses it (see [`resumption`]).
    _resumption: Arc<Resumption>,
}

/// TLS 1.3 tickets sent after each handshake (rustls sends 2 by default). One lets a
/// client that reconnects one connection at a time resume every time, since each
/// resumption brings a new ticket; see BENCHMARKS.md, "TLS handshakes (issue 18)".
const TLS13_TICKETS: usize = 2;

/// A listener's session resumption state: the ticket keys (rustls's rotating ticketer:
/// a new key every 6 hours, the one before still accepted, so a ticket lives 12 hours)
/// and the session-ID cache. Every worker uses the one listener config, so a session
/// made on one worker resumes on any other.
struct Resumption {
    ticketer: Arc<dyn ProducesTickets>,
    cache: Arc<dyn StoresServerSessions>,
}

/// What a listener's resumption state is kept by across reloads. rustls resumes a
/// session without verifying the client again (a resumed session keeps the client
/// certificate verified when it was made), so a session may resume only where the same
/// verification holds: on the same listener, with the same client CAs (their bytes)
/// and the same `required`. A change to either starts new keys and an empty cache, and
/// every session made before is refused (a full handshake follows). A new server
/// certificate keeps them: the client already authenticated the server.
#[derive(Clone, PartialEq, Eq, Hash)]
struct ResumptionKey {
    listener: String,
    /// (hash of the CA file's bytes, required).
    client_auth: Option<(u64, bool)>,
    cache_size: usize,
}

/// The resumption state of every listener, once per process; see [`resumption`].
static RESUMPTION: LazyLock<Mutex<HashMap<ResumptionKey, Arc<Resumption>>>> =
    LazyLock::new(Default::default);

/// The resumption state for `key`: the one already held if any (so tickets and cached
/// sessions survive a reload), else new. What no snapshot holds any more (besides the
/// ones in `keep`, which the load in progress uses) is dropped.
fn resumption(key: ResumptionKey, keep: &[ResumptionKey]) -> Result<Arc<Resumption>, String> {
    let mut held = RESUMPTION.lock().unwrap_or_else(PoisonError::into_inner);
    held.retain(|k, r| Arc::strong_count(r) > 1 || *k == key || keep.contains(k));
    if let Some(r) = held.get(&key) {
        return Ok(Arc::clone(r));
    }
    let ticketer = rustls::crypto::ring::Ticketer::new()
        .map_err(|e| format!("cannot make session ticket keys: {e}"))?;
    let cache: Arc<dyn StoresServerSessions> = match key.cache_size {
        0 => Arc::new(NoServerSessionStorage {}),
        n => ServerSessionMemoryCache::new(n),
    };
    let r = Arc::new(Resumption { ticketer, cache });
    held.insert(key, Arc::clone(&r));
    Ok(r)
}

/// An upstream's TLS towards its backends.
pub struct Origination {
    pub connector: TlsConnector,
    /// `None`: verify each backend's IP address, send no SNI.
    pub server_name: Option<ServerName<'static>>,
}

impl Origination {
    /// The name a backend at `address` is verified against.
    pub fn server_name(&self, address: std::net::SocketAddr) -> ServerName<'static> {
        self.server_name
            .clone()
            .unwrap_or_else(|| ServerName::IpAddress(address.ip().into()))
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate, key and CA file `config` names. Blocking: call from
/// `spawn_blocking` on a running server.
pub fn load(config: &Config) -> Result<Material, TlsError> {
    load_named(config).map_err(|mut e| {
        e.place = config.named_files.place(&e.path);
        e.config = config.source.clone();
        e
    })
}

fn load_named(config: &Config) -> Result<Material, TlsError> {
    let mut reader = Reader {
        hash: Default::default(),
        provider: provider(),
        resumption: Vec::new(),
    };
    let mut material = Material::default();
    for l in &config.listeners {
        if let Some(tls) = &l.tls {
            let t = termination(&l.name, tls, &mut reader)?;
            material.listeners.insert(l.name.clone(), Arc::new(t));
        }
    }
    for u in &config.upstreams {
        if let Some(tls) = &u.tls {
            let o = origination(tls, &mut reader)?;
            material.upstreams.insert(u.name.clone(), Arc::new(o));
        }
    }
    material.fingerprint = reader.hash.finish();
    Ok(material)
}

/// Reads files, hashing what it reads; holds the one crypto provider a load uses.
struct Reader {
    hash: std::collections::hash_map::DefaultHasher,
    provider: Arc<CryptoProvider>,
    /// The resumption state this load has taken so far.
    resumption: Vec<ResumptionKey>,
}

impl Reader {
    fn read(&mut self, path: &Path) -> Result<Vec<u8>, TlsError> {
        let bytes = std::fs::read(path).map_err(|e| error(path, format!("cannot read: {e}")))?;
        path.hash(&mut self.hash);
        bytes.hash(&mut self.hash);
        Ok(bytes)
    }

    fn certificates(&mut self, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let bytes = self.read(path)?;
        pem_certificates(path, &bytes)
    }

    fn key(&mut self, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
        let bytes = self.read(path)?;
        warn_if_readable(path);
        PrivateKeyDer::from_pem_slice(&bytes)
            .map_err(|e| error(path, format!("no usable PEM private key: {e}")))
    }

    /// The CAs in `path`, and a hash of the file's bytes.
    fn roots(&mut self, path: &Path) -> Result<(Arc<RootCertStore>, u64), TlsError> {
        let mut roots = RootCertStore::empty();
        let bytes = self.read(path)?;
        let mut digest = std::collections::hash_map::DefaultHasher::new();
        bytes.hash(&mut digest);
        for cert in pem_certificates(path, &bytes)? {
            roots
                .add(cert)
                .map_err(|e| error(path, format!("invalid CA certificate: {e}")))?;
        }
        Ok((Arc::new(roots), digest.finish()))
    }

    fn certified(&mut self, files: &CertificateFiles) -> Result<Arc<CertifiedKey>, TlsError> {
        let chain = self.certificates(&files.cert)?;
        let key = self.key(&files.key)?;
        let certified = CertifiedKey::from_der(chain, key, &self.provider).map_err(|e| {
            error(
                &files.key,
                format!("does not fit {}: {e}", files.cert.display()),
            )
        })?;
        Ok(Arc::new(certified))
    }
}

/// The certificates in `bytes`, read from `path`: at least one.
fn pem_certificates(path: &Path, bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(path, format!("invalid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(error(path, "no PEM certificate (BEGIN CERTIFICATE) found"));
    }
    Ok(certs)
}

/// A private key that group or others can read is worth a warning, not a refusal: some
/// deployments mount keys through a group on purpose.
fn warn_if_readable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path)
        && m.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(key = %path.display(), mode = format!("{:o}", m.permissions().mode() & 0o777), "private key is readable by group or others; chmod 600 it");
    }
}

fn termination(
    listener: &str,
    tls: &config::ListenerTls,
    reader: &mut Reader,
) -> Result<Termination, TlsError> {
    let mut resolver = SniResolver::default();
    let mut expiries = Vec::new();
    for files in &tls.certificates {
        let key = reader.certified(files)?;
        let leaf = key
            .end_entity_cert()
            .map_err(|e| error(&files.cert, e))?
            .to_vec();
        let (names, not_after) = describe(&leaf).map_err(|e| error(&files.cert, e))?;
        expiries.push((files.cert.display().to_string(), not_after));
        resolver.add(&names, key);
    }
    let provider = Arc::clone(&reader.provider);
    let versions: &[&rustls::SupportedProtocolVersion] = match tls.min_version {
        TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V1_3 => &[&rustls::version::TLS13],
    };
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(versions)
        .map_err(|e| error(&tls.certificates[0].cert, e))?;
    let mut client_auth = None;
    let builder = match &tls.client_auth {
        None => builder.with_no_client_auth(),
        Some(auth) => {
            let (roots, digest) = reader.roots(&auth.ca)?;
            client_auth = Some((digest, auth.required));
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider);
            let verifier = if auth.required {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier.build().map_err(|e| error(&auth.ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut server = builder.with_cert_resolver(Arc::new(resolver));
    server.alpn_protocols = tls.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    let key = ResumptionKey {
        listener: listener.to_string(),
        client_auth,
        cache_size: tls.session_cache_size,
    };
    let resumption = resumption(key.clone(), &reader.resumption)
        .map_err(|e| error(&tls.certificates[0].cert, e))?;
    reader.resumption.push(key);
    server.session_storage = Arc::clone(&resumption.cache);
    if tls.session_tickets {
        server.ticketer = Arc::clone(&resumption.ticketer);
        server.send_tls13_tickets = TLS13_TICKETS;
    }
    Ok(Termination {
        acceptor: TlsAcceptor::from(Arc::new(server)),
        handshake_timeout: tls.handshake_timeout,
        expiries,
        _resumption: resumption,
    })
}

fn origination(tls: &config::UpstreamTls, reader: &mut Reader) -> Result<Origination, TlsError> {
    let provider = Arc::clone(&reader.provider);
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| error(Path::new("upstream tls"), e))?;
    let builder = match (&tls.ca, tls.verify) {
        (Some(ca), true) => builder.with_root_certificates(reader.roots(ca)?.0),
        _ => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider))),
    };
    let mut client = match &tls.client_certificate {
        None => builder.with_no_client_auth(),
        Some(files) => {
            let chain = reader.certificates(&files.cert)?;
            let key = reader.key(&files.key)?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                error(
                    &files.key,
                    format!("does not fit {}: {e}", files.cert.display()),
                )
            })?
        }
    };
    client.alpn_protocols = tls.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    let server_name = match &tls.sni {
        None => None,
        Some(name) => Some(
            ServerName::try_from(name.clone())
                .map_err(|e| error(Path::new(name), format!("invalid server name: {e}")))?,
        ),
    };
    Ok(Origination {
        connector: TlsConnector::from(Arc::new(client)),
        server_name,
    })
}

/// The DNS names a certificate covers (subjectAltName, else the common name) and its
/// notAfter time.
fn describe(der: &[u8]) -> Result<(Vec<String>, i64), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("cannot parse the certificate: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        names.extend(
            cert.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(str::to_ascii_lowercase),
        );
    }
    Ok((names, cert.validity().not_after.timestamp()))
}

/// Picks a listener's certificate by the client's SNI: an exact name first, then a
/// wildcard covering the name's first label, then the default (the first configured).
#[derive(Debug, Default)]
struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// By the suffix after `*.`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

impl SniResolver {
    fn add(&mut self, names: &[String], key: Arc<CertifiedKey>) {
        for name in names {
            let map = match name.strip_prefix("*.") {
                Some(_) => &mut self.wildcard,
                None => &mut self.exact,
            };
            let name = name.strip_prefix("*.").unwrap_or(name);
            // The first certificate listed for a name wins, as the config reads.
            map.entry(name.to_string())
                .or_insert_with(|| Arc::clone(&key));
        }
        self.default.get_or_insert(key);
    }

    fn pick(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = name {
            // rustls hands the name over lowercased already: no copy in the usual case.
            let name = match name.bytes().any(|b| b.is_ascii_uppercase()) {
                true => Cow::Owned(name.to_ascii_lowercase()),
                false => Cow::Borrowed(name),
            };
            let name: &str = &name;
            if let Some(k) = self.exact.get(name) {
                return Some(Arc::clone(k));
            }
            if let Some((_, parent)) = name.split_once('.')
                && let Some(k) = self.wildcard.get(parent)
            {
                return Some(Arc::clone(k));
            }
        }
        self.default.clone()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pick(hello.server_name())
    }
}

/// `verify = false`: accepts any backend certificate, but still checks the handshake's
/// signatures so the session keys belong to whoever holds the certificate's key.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Classifies a failed handshake's error (tokio-rustls wraps rustls errors in io).
pub fn handshake_result(e: &std::io::Error) -> HandshakeResult {
    use rustls::Error as E;
    match e.get_ref().and_then(|inner| inner.downcast_ref::<E>()) {
        Some(E::NoCertificatesPresented | E::InvalidCertificate(_)) => {
            HandshakeResult::ClientCertificate
        }
        Some(E::PeerIncompatible(_) | E::NoApplicationProtocol) => HandshakeResult::Incompatible,
        Some(E::AlertReceived(alert)) => {
            use rustls::AlertDescription as A;
            match alert {
                A::BadCertificate
                | A::UnsupportedCertificate
                | A::CertificateRevoked
                | A::CertificateExpired
                | A::CertificateUnknown
                | A::UnknownCA => HandshakeResult::CertificateRejected,
                A::ProtocolVersion | A::HandshakeFailure | A::InsufficientSecurity => {
                    HandshakeResult::Incompatible
                }
                _ => HandshakeResult::Aborted,
            }
        }
        Some(
            E::InvalidMessage(_)
            | E::InappropriateMessage { .. }
            | E::InappropriateHandshakeMessage { .. }
            | E::PeerMisbehaved(_)
            | E::DecryptError,
        ) => HandshakeResult::Protocol,
        _ => HandshakeResult::Aborted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolver_prefers_exact_then_wildcard_then_default() {
        let provider = provider();
        // Keys are never used by `pick`; any signing key will do as a marker.
        let key = |n: u8| {
            let pkcs8 = test_key();
            Arc::new(CertifiedKey::new(
                vec![CertificateDer::from(vec![n])],
                provider
                    .key_provider
                    .load_private_key(pkcs8)
                    .expect("test key"),
            ))
        };
        let (a, b, c) = (key(1), key(2), key(3));
        let mut r = SniResolver::default();
        r.add(&["a.example.com".into()], Arc::clone(&a));
        r.add(&["*.example.com".into()], Arc::clone(&b));
        r.add(
            &["c.example.com".into(), "a.example.com".into()],
            Arc::clone(&c),
        );
        let picked = |n: Option<&str>| r.pick(n).map(|k| k.cert[0].as_ref()[0]);
        assert_eq!(picked(Some("A.example.com")), Some(1));
        assert_eq!(picked(Some("x.example.com")), Some(2));
        assert_eq!(
            picked(Some("x.y.example.com")),
            Some(1),
            "a wildcard covers one label"
        );
        assert_eq!(picked(Some("c.example.com")), Some(3));
        assert_eq!(picked(None), Some(1));
    }

    /// A fixed P-256 PKCS#8 key (made with `openssl genpkey`), so the test needs no key
    /// generator.
    fn test_key() -> PrivateKeyDer<'static> {
        const PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgFelz8ya/xyB7uH+V
fDCOCLoyv8kxTL8s2LQMbX6u01WhRANCAAR4Y2QeoO1iiL2dpcw0R4vvwD5j6vVg
E2kjvux2G39cI9LUriWEDeCFG0dL68gfaiM8+K/Dj9cfV+c3Eh9TpGs0
-----END PRIVATE KEY-----
";
        PrivateKeyDer::from_pem_slice(PEM.as_bytes()).expect("test key")
    }
}
