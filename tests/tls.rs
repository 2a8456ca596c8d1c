//! TLS termination (SNI certificates, mTLS), TLS to backends, and bad input on a TLS
//! port, against real peers: `openssl s_client`, `openssl s_server` and `curl`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::process::Command;

use common::pki::{self, Issued, Pki, SServer};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A listener `tls` terminating TLS with `certs` (the first is the default) in front of
/// `backend`, plus `tls_extra` lines inside the listener's `tls` table.
fn tls_config(certs: &[&Issued], tls_extra: &str, backend: SocketAddr) -> Fixture {
    let list: Vec<String> = certs
        .iter()
        .map(|c| format!("{{ cert = {:?}, key = {:?} }}", c.cert, c.key))
        .collect();
    Fixture::new()
        .listener("tls")
        .listener_table(
            "tls",
            &format!("certificates = [{}]\n{tls_extra}", list.join(", ")),
        )
        .upstream("app")
        .backend(backend)
}

/// Answers one HTTP request with a body naming the request's path.
async fn http_backend() -> Backend {
    Backend::start(|mut s: TcpStream| async move {
        let mut req = Vec::new();
        let mut buf = [0u8; 1024];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => req.extend_from_slice(&buf[..n]),
            }
        }
        let line = String::from_utf8_lossy(&req)
            .lines()
            .next()
            .unwrap_or("")
            .to_string();
        let body = format!("you asked: {line}\n");
        let reply = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = s.write_all(reply.as_bytes()).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_chooses_the_certificate_and_data_passes_byte_exact() {
    let pki = Pki::new();
    pki.ca("ca");
    let first = pki.leaf("ca", "first", &["first.test"], 30);
    let second = pki.leaf("ca", "second", &["second.test"], 30);
    let wild = pki.leaf("ca", "wild", &["*.wild.test"], 30);
    let backend = Backend::echo().await;
    let sluice = Sluice::start(tls_config(&[&first, &second, &wild], "", backend.addr)).await;
    let addr = sluice.addr("tls");

    let ca = pki.path("ca.pem");
    let ca = ca.to_str().unwrap();
    for (sni, expected) in [
        (Some("second.test"), "second.test"),
        (Some("first.test"), "first.test"),
        (Some("x.wild.test"), "*.wild.test"),
        (Some("unknown.test"), "first.test"),
        (None, "first.test"),
    ] {
        let mut args = vec!["-CAfile", ca, "-verify_return_error"];
        match sni {
            Some(n) => args.extend(["-servername", n]),
            None => args.push("-noservername"),
        }
        let (_, out) = pki::s_client(addr, &args);
        assert_eq!(
            pki::served_name(&out).as_deref(),
            Some(expected),
            "SNI {sni:?}:\n{out}"
        );
    }

    // 4 MiB each way through TLS termination to a plain echo backend.
    let config = pki::client_config(&pki.path("ca.pem"), None);
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = pki::tls_over(tcp, config, "second.test").await.unwrap();
    assert_eq!(pki::peer_name(tls.get_ref().1), "second.test");
    let payload = data(4 << 20, 7);
    let (mut rx, mut tx) = tokio::io::split(tls);
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        tx.write_all(&sent).await.unwrap();
        tx.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    tokio::time::timeout(STUCK, rx.read_to_end(&mut got))
        .await
        .expect("echo finished")
        .unwrap();
    writer.await.unwrap();
    assert_eq!(got.len(), payload.len());
    assert_eq!(sha256(&got), sha256(&payload));

    let m = sluice
        .wait_metrics("handshakes counted", |m| {
            m.value(
                "sluice_tls_handshakes_total",
                &[("listener", "tls"), ("result", "success")],
            ) >= 6.0
        })
        .await;
    let c2b = m.value(
        "sluice_bytes_total",
        &[("listener", "tls"), ("direction", "client_to_backend")],
    );
    assert!(c2b >= payload.len() as f64, "{c2b}");
    for cert in [&first, &second, &wild] {
        let label = cert.cert.display().to_string();
        let expiry = m.value(
            "sluice_tls_certificate_expiry_timestamp_seconds",
            &[("listener", "tls"), ("certificate", &label)],
        );
        assert_eq!(expiry as i64, pki::not_after(&cert.cert), "{label}");
    }
    assert!(m.0.contains("sluice_tls_handshake_duration_seconds_count{listener=\"tls\"}"));
}

/// A TLS relay turns its backend socket's keepalive on at its start (a plain relay
/// waits a minute): `ss` shows the 2-minute timer at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_connection_has_backend_keepalive_at_once() {
    let pki = Pki::new();
    pki.ca("ca");
    let cert = pki.leaf("ca", "srv", &["srv.test"], 30);
    let backend = Backend::echo().await;
    let sluice = Sluice::start(tls_config(&[&cert], "", backend.addr)).await;
    let config = pki::client_config(&pki.path("ca.pem"), None);
    let tcp = TcpStream::connect(sluice.addr("tls")).await.unwrap();
    let mut tls = pki::tls_over(tcp, config, "srv.test").await.unwrap();
    tls.write_all(b"ka").await.unwrap();
    let mut echoed = [0u8; 2];
    tls.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"ka", "the connection is up and stays open");

    let backend_side = one_established(&format!("( dport = :{} )", backend.addr.port()));
    assert!(
        keepalive_of_two_minutes(&backend_side),
        "backend: {backend_side}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_through_tls_termination_to_a_plain_http_backend() {
    let pki = Pki::new();
    pki.ca("ca");
    let cert = pki.leaf("ca", "web", &["web.test"], 30);
    let backend = http_backend().await;
    let sluice = Sluice::start(tls_config(&[&cert], "alpn = [\"http/1.1\"]", backend.addr)).await;
    let addr = sluice.addr("tls");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "--cacert"])
        .arg(pki.path("ca.pem"))
        .args(["--resolve", &format!("web.test:{}:127.0.0.1", addr.port())])
        .arg(format!("https://web.test:{}/hello", addr.port()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "you asked: GET /hello HTTP/1.1\n"
    );

    // Without the CA, curl refuses sluice's certificate, and says so in an alert.
    let refused = Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(["--resolve", &format!("web.test:{}:127.0.0.1", addr.port())])
        .arg(format!("https://web.test:{}/hello", addr.port()))
        .output()
        .unwrap();
    assert!(!refused.status.success());
    sluice
        .wait_metrics("the rejected certificate", |m| {
            m.value(
                "sluice_tls_handshakes_total",
                &[("listener", "tls"), ("result", "certificate_rejected")],
            ) == 1.0
        })
        .await;
}

/// curl to `https://mtls.test:{port}{path}`, trusting the test CA, presenting `client`.
fn curl_mtls(pki: &Pki, port: u16, path: &str, client: Option<&Issued>) -> std::process::Output {
    let mut c = Command::new("curl");
    c.args(["-sS", "--max-time", "20", "--cacert"])
        .arg(pki.path("ca.pem"))
        .args(["--resolve", &format!("mtls.test:{port}:127.0.0.1")]);
    if let Some(id) = client {
        c.arg("--cert").arg(&id.cert).arg("--key").arg(&id.key);
    }
    c.arg(format!("https://mtls.test:{port}{path}"));
    c.output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_requires_a_client_certificate_from_the_ca() {
    let pki = Pki::new();
    pki.ca("ca");
    pki.ca("clients");
    pki.ca("other");
    let server = pki.leaf("ca", "server", &["mtls.test"], 30);
    let good = pki.leaf("clients", "good", &["good-client"], 30);
    let stranger = pki.leaf("other", "stranger", &["stranger"], 30);
    let backend = http_backend().await;
    let extra = format!("client_auth = {{ ca = {:?} }}", pki.path("clients.pem"));
    let sluice = Sluice::start(tls_config(&[&server], &extra, backend.addr)).await;
    let addr = sluice.addr("tls");
    let curl = |client| curl_mtls(&pki, addr.port(), "/who", client);

    let without = curl(None);
    assert!(
        !without.status.success(),
        "no client certificate must be refused"
    );
    let wrong = curl(Some(&stranger));
    assert!(
        !wrong.status.success(),
        "a certificate from another CA must be refused"
    );
    let with = curl(Some(&good));
    assert!(
        with.status.success(),
        "{}",
        String::from_utf8_lossy(&with.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&with.stdout),
        "you asked: GET /who HTTP/1.1\n"
    );

    let m = sluice
        .wait_metrics("refusals counted", |m| {
            m.value(
                "sluice_tls_handshakes_total",
                &[("listener", "tls"), ("result", "client_certificate")],
            ) >= 2.0
        })
        .await;
    assert_eq!(
        m.value(
            "sluice_connections_rejected_total",
            &[("listener", "tls"), ("reason", "tls_handshake")]
        ),
        2.0
    );
    assert_eq!(
        backend.accepted(),
        1,
        "only the good client reached the backend"
    );

    // Optional client certificates: none is fine, a stranger's still is not.
    let extra = format!(
        "client_auth = {{ ca = {:?}, required = false }}",
        pki.path("clients.pem")
    );
    let optional = Sluice::start(tls_config(&[&server], &extra, backend.addr)).await;
    let port = optional.addr("tls").port();
    let curl = |client| curl_mtls(&pki, port, "/optional", client);
    let without = curl(None);
    assert!(
        without.status.success(),
        "{}",
        String::from_utf8_lossy(&without.stderr)
    );
    assert!(!curl(Some(&stranger)).status.success());
    assert!(curl(Some(&good)).status.success());
}

/// `front` in front of upstream `secure`, which speaks TLS (the `tls` table's lines) to
/// `backend` (an `openssl s_server`), with `check` keys.
fn upstream_tls_config(backend: SocketAddr, tls: &str, check: &str) -> Fixture {
    Fixture::new()
        .listener("front")
        .upstream("secure")
        .upstream_keys("retries = 0")
        .upstream_keys(check)
        .upstream_table("tls", tls)
        .backend(backend)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_to_openssl_s_server_and_a_stranger_is_refused() {
    let pki = Pki::new();
    pki.ca("ca");
    pki.ca("other");
    let good = pki.leaf("ca", "good", &["db.internal"], 30);
    let bad = pki.leaf("other", "bad", &["db.internal"], 30);
    let server = SServer::start(&good, &["-rev"]);
    let tls = format!("sni = \"db.internal\"\nca = {:?}", pki.path("ca.pem"));
    let sluice = Sluice::start(upstream_tls_config(server.addr, &tls, "")).await;
    let mut s = TcpStream::connect(sluice.addr("front")).await.unwrap();
    s.write_all(b"hello through tls\n").await.unwrap();
    // s_server -rev answers each line reversed.
    let got = read_n(&mut s, 18).await;
    assert_eq!(&got, b"slt hguorht olleh\n");
    drop(s);

    // The same CA check against a backend whose certificate another CA signed.
    let stranger = SServer::start(&bad, &["-rev"]);
    let sluice = Sluice::start(upstream_tls_config(stranger.addr, &tls, "")).await;
    let mut s = TcpStream::connect(sluice.addr("front")).await.unwrap();
    let closed = tokio::time::timeout(PROMPTLY, until_closed(&mut s)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    let backend = stranger.addr.to_string();
    let m = sluice
        .wait_metrics("tls connect error counted", |m| {
            m.value(
                "sluice_upstream_connect_errors_total",
                &[
                    ("upstream", "secure"),
                    ("backend", &backend),
                    ("reason", "tls"),
                ],
            ) >= 1.0
        })
        .await;
    assert_eq!(
        m.value(
            "sluice_connections_rejected_total",
            &[("listener", "front"), ("reason", "upstream_unavailable")]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_speak_tls_to_the_backend() {
    let pki = Pki::new();
    pki.ca("ca");
    pki.ca("other");
    let good = pki.leaf("ca", "good", &["127.0.0.1"], 30);
    let bad = pki.leaf("other", "bad", &["127.0.0.1"], 30);
    // No `sni`: the backend's IP address is verified, as its certificate names it.
    let tls = format!("ca = {:?}", pki.path("ca.pem"));
    let check = "health_check = { interval = \"100ms\", timeout = \"100ms\", rise = 1, fall = 1, send = \"ping\\n\", expect = \"gnip\" }";
    let trusted = SServer::start(&good, &["-rev"]);
    let untrusted = SServer::start(&bad, &["-rev"]);

    let sluice = Sluice::start(upstream_tls_config(trusted.addr, &tls, check)).await;
    let a = trusted.addr.to_string();
    sluice
        .wait_metrics("a passing TLS check", |m| {
            m.value(
                "sluice_health_checks_total",
                &[
                    ("upstream", "secure"),
                    ("backend", &a),
                    ("result", "success"),
                ],
            ) >= 2.0
        })
        .await;

    let sluice = Sluice::start(upstream_tls_config(untrusted.addr, &tls, check)).await;
    let b = untrusted.addr.to_string();
    let m = sluice
        .wait_metrics("the untrusted backend down", |m| {
            m.value(
                "sluice_backend_up",
                &[("upstream", "secure"), ("backend", &b)],
            ) == 0.0
                && m.value(
                    "sluice_health_checks_total",
                    &[
                        ("upstream", "secure"),
                        ("backend", &b),
                        ("result", "failure"),
                    ],
                ) >= 1.0
        })
        .await;
    assert_eq!(
        m.value(
            "sluice_health_checks_total",
            &[
                ("upstream", "secure"),
                ("backend", &b),
                ("result", "success")
            ]
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_plain_http_and_silence_on_a_tls_port_close_promptly_and_leak_nothing() {
    let pki = Pki::new();
    pki.ca("ca");
    let cert = pki.leaf("ca", "srv", &["srv.test"], 30);
    let backend = Backend::echo().await;
    let sluice = Sluice::start(tls_config(
        &[&cert],
        "handshake_timeout = \"500ms\"",
        backend.addr,
    ))
    .await;
    let addr = sluice.addr("tls");
    let baseline = sluice.open_files();

    let mut garbage = TcpStream::connect(addr).await.unwrap();
    garbage.write_all(&data(4096, 3)).await.unwrap();
    let mut http = TcpStream::connect(addr).await.unwrap();
    http.write_all(b"GET / HTTP/1.1\r\nHost: srv.test\r\n\r\n")
        .await
        .unwrap();
    let mut silent = TcpStream::connect(addr).await.unwrap();
    for s in [&mut garbage, &mut http, &mut silent] {
        let closed = tokio::time::timeout(PROMPTLY, until_closed(s)).await;
        assert!(closed.is_ok(), "the connection must be closed promptly");
    }
    // The active gauge drops as the connection's task returns, a moment after the
    // refusal is counted: wait for both.
    let m = sluice
        .wait_metrics("three refusals, none active", |m| {
            m.value(
                "sluice_connections_rejected_total",
                &[("listener", "tls"), ("reason", "tls_handshake")],
            ) >= 3.0
                && m.value("sluice_connections_active", &[("listener", "tls")]) == 0.0
        })
        .await;
    assert_eq!(
        m.value(
            "sluice_tls_handshakes_total",
            &[("listener", "tls"), ("result", "timeout")]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            "sluice_tls_handshakes_total",
            &[("listener", "tls"), ("result", "protocol_error")]
        ),
        2.0
    );
    assert_eq!(backend.accepted(), 0);
    // The descriptors of the three connections are closed again.
    sluice.wait_open_files_at_most(baseline).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_certificate_names_its_file_and_a_reload_keeps_the_old_one() {
    let pki = Pki::new();
    pki.ca("ca");
    let cert = pki.leaf("ca", "srv", &["srv.test"], 30);
    let other = pki.leaf("ca", "other", &["other.test"], 30);
    // A key that belongs to another certificate is refused by `sluice check`.
    let mismatched = Issued {
        cert: cert.cert.clone(),
        key: other.key.clone(),
    };
    let backend = Backend::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, tls_config(&[&mismatched], "", backend.addr).toml()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("check")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&other.key.display().to_string()) && err.contains("does not fit"),
        "{err}"
    );

    // Rotating the certificate file in place reloads it, with no change to the config.
    let sluice = Sluice::start(tls_config(&[&cert], "", backend.addr)).await;
    let addr = sluice.addr("tls");
    let ca = pki.path("ca.pem");
    let ca = ca.to_str().unwrap();
    let args = ["-CAfile", ca, "-servername", "srv.test"];
    assert_eq!(
        pki::served_name(&pki::s_client(addr, &args).1).as_deref(),
        Some("srv.test")
    );
    std::fs::copy(&other.cert, &cert.cert).unwrap();
    std::fs::copy(&other.key, &cert.key).unwrap();
    sluice.wait_generation(1).await;
    assert_eq!(
        pki::served_name(&pki::s_client(addr, &args).1).as_deref(),
        Some("other.test")
    );

    // A broken certificate file fails the reload and the last good one stays.
    std::fs::write(&cert.cert, "not a certificate\n").unwrap();
    sluice
        .wait_metrics("the failed reload", |m| {
            m.value("sluice_config_last_reload_successful", &[]) == 0.0
        })
        .await;
    let line = sluice.wait_log("config reload failed").await;
    assert!(line.contains(&cert.cert.display().to_string()), "{line}");
    assert_eq!(
        pki::served_name(&pki::s_client(addr, &args).1).as_deref(),
        Some("other.test")
    );

    // Restoring the file that runs is not a reload, but the failure is over.
    std::fs::copy(&other.cert, &cert.cert).unwrap();
    let m = sluice
        .wait_metrics("the failure cleared", |m| {
            m.value("sluice_config_last_reload_successful", &[]) == 1.0
        })
        .await;
    assert_eq!(m.value("sluice_config_generation", &[]), 1.0);

    // A config naming files that do not exist yet fails, and applies once they appear.
    let third = pki.leaf("ca", "third", &["srv.test"], 30);
    let later = Issued {
        cert: pki.path("later.pem"),
        key: pki.path("later.key"),
    };
    sluice.rewrite(tls_config(&[&later], "", backend.addr));
    sluice
        .wait_metrics("the reload refused", |m| {
            m.value("sluice_config_last_reload_successful", &[]) == 0.0
        })
        .await;
    std::fs::copy(&third.key, &later.key).unwrap();
    std::fs::copy(&third.cert, &later.cert).unwrap();
    sluice.wait_generation(2).await;
    let out = pki::s_client(addr, &args).1;
    assert_eq!(pki::served_name(&out).as_deref(), Some("srv.test"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_version_refuses_older_clients_and_a_readable_key_is_warned_about() {
    let pki = Pki::new();
    pki.ca("ca");
    let cert = pki.leaf("ca", "srv", &["srv.test"], 30);
    let backend = Backend::echo().await;
    let config = tls_config(&[&cert], "min_version = \"1.3\"", backend.addr);
    let sluice = Sluice::start(&config).await;
    let addr = sluice.addr("tls");
    let ca = pki.path("ca.pem");
    let ca = ca.to_str().unwrap();
    let (_, out) = pki::s_client(addr, &["-CAfile", ca, "-servername", "srv.test", "-tls1_3"]);
    assert!(
        out.contains("Protocol  : TLSv1.3") || out.contains("TLSv1.3"),
        "{out}"
    );
    let (_, out) = pki::s_client(addr, &["-CAfile", ca, "-servername", "srv.test", "-tls1_2"]);
    assert_eq!(
        pki::served_name(&out),
        None,
        "a TLS 1.2 client must be refused:\n{out}"
    );
    sluice
        .wait_metrics("the refusal", |m| {
            m.value(
                "sluice_tls_handshakes_total",
                &[("listener", "tls"), ("result", "incompatible")],
            ) == 1.0
        })
        .await;

    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&cert.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, config.toml()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("check")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "a warning, not an error");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("readable by group or others")
            && err.contains(&cert.key.display().to_string()),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_check_fails_when_the_backend_refuses_sluices_client_certificate() {
    let pki = Pki::new();
    pki.ca("ca");
    pki.ca("clients");
    let server = pki.leaf("ca", "server", &["127.0.0.1"], 30);
    let trusted = pki.leaf("clients", "trusted", &["sluice-trusted"], 30);
    let stranger = pki.leaf("ca", "stranger", &["sluice-stranger"], 30);
    // s_server demands a client certificate from the `clients` CA. Under TLS 1.3 it
    // refuses a bad one only after sluice's side of the handshake is complete.
    let clients_ca = pki.path("clients.pem");
    let backend = SServer::start(
        &server,
        &[
            "-rev",
            "-Verify",
            "1",
            "-verify_return_error",
            "-CAfile",
            clients_ca.to_str().unwrap(),
        ],
    );
    let check = "health_check = { interval = \"300ms\", timeout = \"300ms\", rise = 1, fall = 1 }";
    let b = backend.addr.to_string();
    for (client, up) in [(&stranger, 0.0), (&trusted, 1.0)] {
        let tls = format!(
            "ca = {:?}\ncertificate = {:?}\nkey = {:?}",
            pki.path("ca.pem"),
            client.cert,
            client.key
        );
        let sluice = Sluice::start(upstream_tls_config(backend.addr, &tls, check)).await;
        let verdict = if up == 0.0 { "failure" } else { "success" };
        let m = sluice
            .wait_metrics("three checks with one verdict", |m| {
                m.value(
                    "sluice_health_checks_total",
                    &[("upstream", "secure"), ("backend", &b), ("result", verdict)],
                ) >= 3.0
            })
            .await;
        assert_eq!(
            m.value(
                "sluice_backend_up",
                &[("upstream", "secure"), ("backend", &b)]
            ),
            up
        );
    }
}

/// `openssl s_client` sending one HTTP request and reading until the server closes (so
/// the TLS 1.3 tickets sent after the handshake arrive before the session is saved),
/// with `args`; returns its output.
fn s_client_request(addr: SocketAddr, args: &[&str]) -> String {
    use std::io::Write;
    let mut child = Command::new("timeout")
        .arg("20")
        .args([
            "openssl",
            "s_client",
            "-ign_eof",
            "-connect",
            &addr.to_string(),
        ])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run openssl s_client");
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(b"GET /resumed HTTP/1.0\r\nHost: srv.test\r\n\r\n")
        .unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Whether `out` (of `s_client_request`) resumed a session and got the backend's answer.
fn resumed(out: &str) -> bool {
    assert!(
        out.contains("you asked: GET /resumed HTTP/1.0"),
        "the request did not pass:\n{out}"
    );
    out.lines().any(|l| l.starts_with("Reused,"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_resume_on_every_worker_and_across_reloads_but_not_after_client_auth_changes() {
    let pki = Pki::new();
    pki.ca("ca");
    pki.ca("clients");
    let cert = pki.leaf("ca", "srv", &["srv.test"], 30);
    let backend = http_backend().await;
    // Four workers: the kernel spreads the connections below over their sockets by
    // their ports, so a session made on one worker resumes on the others.
    let config = |extra: &str| {
        tls_config(&[&cert], extra, backend.addr).table("[runtime]\nworker_threads = 4")
    };
    let sluice = Sluice::start(config("")).await;
    let addr = sluice.addr("tls");
    let ca = pki.path("ca.pem");
    let ca = ca.to_str().unwrap();
    // TLS 1.3 tickets, TLS 1.2 tickets, TLS 1.2 session IDs (the cache).
    let kinds: [&[&str]; 3] = [&["-tls1_3"], &["-tls1_2"], &["-tls1_2", "-no_ticket"]];
    let sessions: Vec<std::path::PathBuf> = (0..kinds.len())
        .map(|i| pki.path(&format!("session{i}.pem")))
        .collect();
    let base = |session: &std::path::Path, kind: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = ["-CAfile", ca, "-servername", "srv.test", "-sess_in"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.push(session.display().to_string());
        a.extend(kind.iter().map(|s| s.to_string()));
        a
    };
    for (kind, session) in kinds.iter().zip(&sessions) {
        let mut args = vec!["-CAfile", ca, "-servername", "srv.test", "-sess_out"];
        let path = session.display().to_string();
        args.push(&path);
        args.extend(kind.iter());
        let out = s_client_request(addr, &args);
        assert!(
            !resumed(&out),
            "a first connection is a full handshake:\n{out}"
        );
        for _ in 0..8 {
            let args = base(session, kind);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = s_client_request(addr, &args);
            assert!(resumed(&out), "{kind:?} did not resume:\n{out}");
        }
    }

    // A reload that changes the listener keeps the sessions.
    sluice.rewrite(config("alpn = [\"http/1.1\"]"));
    sluice.wait_generation(1).await;
    for (kind, session) in kinds.iter().zip(&sessions) {
        let args = base(session, kind);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = s_client_request(addr, &args);
        assert!(
            resumed(&out),
            "{kind:?} did not resume after a reload:\n{out}"
        );
    }

    // Asking for client certificates (even optional ones) refuses every session made
    // before: none was verified against those CAs.
    let clients = pki.path("clients.pem");
    sluice.rewrite(config(&format!(
        "alpn = [\"http/1.1\"]\nclient_auth = {{ ca = {clients:?}, required = false }}"
    )));
    sluice.wait_generation(2).await;
    for (kind, session) in kinds.iter().zip(&sessions) {
        let args = base(session, kind);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = s_client_request(addr, &args);
        assert!(!resumed(&out), "{kind:?} resumed past client auth:\n{out}");
    }
}
