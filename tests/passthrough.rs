//! SNI passthrough: a listener reads the ClientHello, routes on its server name and
//! relays TLS untouched to `openssl s_server` backends, each with its own certificate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::pki::{self, Pki, SServer};
use common::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Listener `sni` routing `a.pass.test` to `a` and `*.b.test` to `b`, with no default
/// upstream.
fn routes(a: SocketAddr, b: SocketAddr) -> Fixture {
    Fixture::new()
        .listener("sni")
        .route(&["a.pass.test"], "a")
        .route(&["*.b.test"], "b")
        .upstream("a")
        .backend(a)
        .upstream("b")
        .backend(b)
}

struct Setup {
    pki: Pki,
    a: SServer,
    b: SServer,
}

fn backends() -> Setup {
    let pki = Pki::new();
    pki.ca("ca");
    let a = pki.leaf("ca", "a", &["a.pass.test"], 30);
    let b = pki.leaf("ca", "b", &["x.b.test"], 30);
    Setup {
        a: SServer::start(&a, &["-rev"]),
        b: SServer::start(&b, &["-rev"]),
        pki,
    }
}

/// A line through a TLS session: s_server -rev answers it reversed.
async fn round_trip<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: S) {
    let mut s = BufReader::new(s);
    s.get_mut().write_all(b"passthrough\n").await.unwrap();
    s.get_mut().flush().await.unwrap();
    let mut line = String::new();
    tokio::time::timeout(STUCK, s.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(line, "hguorhtssap\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_name_reaches_its_own_backend_and_certificate() {
    let setup = backends();
    let sluice = Sluice::start(routes(setup.a.addr, setup.b.addr)).await;
    let addr = sluice.addr("sni");
    let ca = setup.pki.path("ca.pem");
    let ca_arg = ca.to_str().unwrap();
    for (name, expected) in [("a.pass.test", "a.pass.test"), ("x.b.test", "x.b.test")] {
        let (_, out) = pki::s_client(
            addr,
            &[
                "-CAfile",
                ca_arg,
                "-servername",
                name,
                "-verify_return_error",
            ],
        );
        assert_eq!(
            pki::served_name(&out).as_deref(),
            Some(expected),
            "{name}:\n{out}"
        );
    }
    // The TLS session is end to end: data flows, and the client verified the backend.
    let config = pki::client_config(&ca, None);
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = pki::tls_over(tcp, Arc::clone(&config), "x.b.test")
        .await
        .unwrap();
    assert_eq!(pki::peer_name(tls.get_ref().1), "x.b.test");
    round_trip(tls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hello_sent_one_byte_per_write_still_routes() {
    let setup = backends();
    let sluice = Sluice::start(routes(setup.a.addr, setup.b.addr)).await;
    let tcp = TcpStream::connect(sluice.addr("sni")).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let config = pki::client_config(&setup.pki.path("ca.pem"), None);
    let tls = pki::tls_over(pki::OneByteWrites(tcp), config, "a.pass.test")
        .await
        .unwrap();
    assert_eq!(pki::peer_name(tls.get_ref().1), "a.pass.test");
    round_trip(tls).await;
}

/// A client config whose ClientHello carries `n` ALPN names of 60 bytes: a hello as big
/// as a post-quantum one (which rustls with ring does not send).
fn big_hello(ca: &std::path::Path, n: usize) -> Arc<rustls::ClientConfig> {
    let mut config = (*pki::client_config(ca, None)).clone();
    config.alpn_protocols = (0..n).map(|i| format!("{i:060}").into_bytes()).collect();
    Arc::new(config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_hello_routes_and_one_over_the_cap_is_refused() {
    let setup = backends();
    let ca = setup.pki.path("ca.pem");
    let sluice =
        Sluice::start(routes(setup.a.addr, setup.b.addr).listener_keys("max_hello_size = 4096"))
            .await;
    let addr = sluice.addr("sni");

    // About 2,200 bytes: routed.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = pki::tls_over(tcp, big_hello(&ca, 32), "a.pass.test")
        .await
        .unwrap();
    assert_eq!(pki::peer_name(tls.get_ref().1), "a.pass.test");
    round_trip(tls).await;

    // About 6,300 bytes, over the 4,096 cap: closed and counted.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let refused = pki::tls_over(tcp, big_hello(&ca, 100), "a.pass.test").await;
    assert!(refused.is_err());
    sluice
        .wait_metrics("the oversize hello refused", |m| {
            m.value(
                "sluice_connections_rejected_total",
                &[("listener", "sni"), ("reason", "client_hello")],
            ) == 1.0
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_silence_and_unknown_names_are_closed_and_counted() {
    let setup = backends();
    let ca = setup.pki.path("ca.pem");
    let sluice = Sluice::start(
        routes(setup.a.addr, setup.b.addr).listener_keys("hello_timeout = \"300ms\""),
    )
    .await;
    let addr = sluice.addr("sni");
    let baseline = sluice.open_files();

    let mut garbage = TcpStream::connect(addr).await.unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut silent = TcpStream::connect(addr).await.unwrap();
    for s in [&mut garbage, &mut silent] {
        assert!(
            tokio::time::timeout(PROMPTLY, until_closed(s))
                .await
                .is_ok()
        );
    }
    // No route for the name and no default upstream.
    let tcp = TcpStream::connect(addr).await.unwrap();
    assert!(
        pki::tls_over(tcp, pki::client_config(&ca, None), "nobody.test")
            .await
            .is_err()
    );
    // The active gauge drops as the connection's task returns, a moment after the
    // refusal is counted: wait for both.
    sluice
        .wait_metrics("three refusals, none active", |m| {
            m.value(
                "sluice_connections_rejected_total",
                &[("listener", "sni"), ("reason", "client_hello")],
            ) == 2.0
                && m.value(
                    "sluice_connections_rejected_total",
                    &[("listener", "sni"), ("reason", "no_route")],
                ) == 1.0
                && m.value("sluice_connections_active", &[("listener", "sni")]) == 0.0
        })
        .await;
    sluice.wait_open_files_at_most(baseline).await;

    // With a default upstream, an unknown name goes there.
    let sluice = Sluice::start(routes(setup.a.addr, setup.b.addr).to("b")).await;
    let tcp = TcpStream::connect(sluice.addr("sni")).await.unwrap();
    let mut config = (*pki::client_config(&ca, None)).clone();
    // b's certificate does not name `nobody.test`: accept it for this check only by
    // asking for the name it has, through a route that does not match.
    config.enable_sni = false;
    let tls = pki::tls_over(tcp, Arc::new(config), "x.b.test")
        .await
        .unwrap();
    assert_eq!(pki::peer_name(tls.get_ref().1), "x.b.test");
}
