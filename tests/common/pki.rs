//! Certificates made in the test by the `openssl` command, and `openssl s_server` /
//! `s_client` as real TLS peers.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A directory of test certificates.
pub struct Pki {
    pub dir: tempfile::TempDir,
}

/// A certificate and its key on disk.
#[derive(Clone)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A new unencrypted P-256 key, written to the file named next.
const NEW_KEY: [&str; 6] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:P-256",
    "-nodes",
    "-keyout",
];

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pki {
    pub fn new() -> Pki {
        Pki {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A self-signed CA named `name` (files `name.pem`, `name.key`).
    pub fn ca(&self, name: &str) -> Issued {
        let key = format!("{name}.key");
        openssl(
            &[
                &["req", "-x509"][..],
                &NEW_KEY,
                &[
                    &key,
                    "-out",
                    &format!("{name}.pem"),
                    "-days",
                    "30",
                    "-subj",
                    &format!("/CN={name}"),
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign",
                ],
            ]
            .concat(),
            self.dir.path(),
        );
        self.issued(name)
    }

    /// A leaf certificate for `names` (DNS names or IP addresses), issued by the CA
    /// `ca`, valid for `days`. Its common name is the first name.
    pub fn leaf(&self, ca: &str, file: &str, names: &[&str], days: u32) -> Issued {
        let san: Vec<String> = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(_) => format!("IP:{n}"),
                Err(_) => format!("DNS:{n}"),
            })
            .collect();
        let ext = self.path(&format!("{file}.ext"));
        std::fs::write(
            &ext,
            format!(
                "subjectAltName={}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth,clientAuth\n",
                san.join(",")
            ),
        )
        .unwrap();
        let (key, csr, subject) = (
            format!("{file}.key"),
            format!("{file}.csr"),
            format!("/CN={}", names[0]),
        );
        openssl(
            &[
                &["req", "-new"][..],
                &NEW_KEY,
                &[&key, "-out", &csr, "-subj", &subject],
            ]
            .concat(),
            self.dir.path(),
        );
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                &format!("{file}.csr"),
                "-CA",
                &format!("{ca}.pem"),
                "-CAkey",
                &format!("{ca}.key"),
                "-CAcreateserial",
                "-out",
                &format!("{file}.pem"),
                "-days",
                &days.to_string(),
                "-extfile",
                &format!("{file}.ext"),
            ],
            self.dir.path(),
        );
        self.issued(file)
    }

    fn issued(&self, name: &str) -> Issued {
        let key = self.path(&format!("{name}.key"));
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        Issued {
            cert: self.path(&format!("{name}.pem")),
            key,
        }
    }
}

/// The notAfter of a certificate file, as Unix time, read by `openssl x509`.
pub fn not_after(cert: &Path) -> i64 {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-enddate", "-dateopt", "iso_8601", "-in"])
        .arg(cert)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    // notAfter=2026-12-25 10:18:00Z
    let date = text.trim().trim_start_matches("notAfter=").to_string();
    let out = Command::new("date")
        .args(["-u", "-d", &date, "+%s"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("date +%s")
}

/// An `openssl s_server` on a port of its choosing, stopped (by its pid) when dropped.
pub struct SServer {
    child: Child,
    pub addr: SocketAddr,
}

impl SServer {
    /// Starts `openssl s_server` with `cert` and `extra` arguments (like `-rev`, which
    /// answers each line reversed).
    pub fn start(cert: &Issued, extra: &[&str]) -> SServer {
        let mut child = Command::new("openssl")
            .args(["s_server", "-accept", "127.0.0.1:0", "-cert"])
            .arg(&cert.cert)
            .arg("-key")
            .arg(&cert.key)
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start openssl s_server");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let deadline = Instant::now() + Duration::from_secs(20);
        let addr = loop {
            assert!(Instant::now() < deadline, "s_server did not start");
            let line = lines.next().expect("s_server output").unwrap();
            if let Some(a) = line.strip_prefix("ACCEPT ") {
                break a.trim().parse().expect("s_server address");
            }
        };
        // Keep draining its output so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        SServer { child, addr }
    }
}

impl Drop for SServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `openssl s_client` against `addr` with `args`, sending nothing, and returns
/// (success, stdout + stderr).
pub fn s_client(addr: SocketAddr, args: &[&str]) -> (bool, String) {
    let out = Command::new("timeout")
        .arg("20")
        .args(["openssl", "s_client", "-connect", &addr.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl s_client");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The subject common name of the certificate a server presented, from s_client's
/// output (`subject=CN = name`).
pub fn served_name(s_client_output: &str) -> Option<String> {
    s_client_output
        .lines()
        .find_map(|l| l.strip_prefix("subject=CN = "))
        .map(str::to_string)
}

/// A rustls client config trusting `ca`, presenting `client` if given.
pub fn client_config(ca: &Path, client: Option<&Issued>) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some(c) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(&c.cert)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_file(&c.key).unwrap(),
            )
            .unwrap(),
    };
    std::sync::Arc::new(config)
}

/// A TLS client session over `io` for server name `name`.
pub async fn tls_over<IO>(
    io: IO,
    config: std::sync::Arc<rustls::ClientConfig>,
    name: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<IO>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let name = rustls_pki_types::ServerName::try_from(name.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(name, io)
        .await
}

/// The common name of the certificate the server presented in `session`.
pub fn peer_name(session: &rustls::CommonState) -> String {
    let der = &session.peer_certificates().expect("a peer certificate")[0];
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap()
        .to_string()
}

/// A stream that writes at most one byte per write call (with TCP_NODELAY), so a peer
/// receives a ClientHello in many small segments.
pub struct OneByteWrites(pub tokio::net::TcpStream);

impl tokio::io::AsyncRead for OneByteWrites {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for OneByteWrites {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let one = &buf[..buf.len().min(1)];
        std::pin::Pin::new(&mut self.0).poll_write(cx, one)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
