//! Graceful shutdown on SIGTERM / SIGINT.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const MIB: usize = 1024 * 1024;

async fn wait_not_ready(sluice: &Sluice) {
    eventually("/readyz to fail", async || {
        sluice.get("/readyz").await.0 == 503
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_stream_in_flight_finish_and_refuses_new_connections() {
    let backend = Backend::echo().await;
    let sluice =
        Sluice::start(Fixture::front(&[backend.addr]).set("drain_timeout = \"60s\"")).await;
    assert_eq!(sluice.get("/readyz").await.0, 200);
    let addr = sluice.addr("front");
    let sent = data(8 * MIB, 30);
    let (first, second) = sent.split_at(4 * MIB);
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(first).await.unwrap();
    let mut got = read_n(&mut s, first.len()).await;

    sluice.signal("TERM");
    wait_not_ready(&sluice).await;
    until_refused(addr).await;
    assert_eq!(sluice.get("/healthz").await.0, 200, "alive while draining");
    let m = sluice.metrics().await;
    assert_eq!(m.value("sluice_draining", &[]), 1.0);
    got.extend(exchange_on(&mut s, second).await);

    assert_eq!(got.len(), sent.len());
    assert_eq!(sha256(&got), sha256(&sent));
    let status = sluice.exited().await;
    assert_eq!(status.code(), Some(0));
    assert!(
        sluice
            .log()
            .iter()
            .any(|l| l.contains("shutdown complete cut=0"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_longer_than_drain_timeout_is_cut_at_the_deadline() {
    let backend = Backend::echo().await;
    let sluice = Sluice::start(Fixture::front(&[backend.addr]).set("drain_timeout = \"1s\"")).await;
    let mut s = TcpStream::connect(sluice.addr("front")).await.unwrap();
    s.write_all(b"still here").await.unwrap();
    assert_eq!(read_n(&mut s, 10).await, b"still here");

    let signalled = Instant::now();
    sluice.signal("INT");
    let closed = until_closed(&mut s).await;
    let waited = signalled.elapsed();

    assert!(closed.is_err() || closed.unwrap() == 0);
    assert!(waited >= Duration::from_secs(1), "cut after {waited:?}");
    let status = sluice.exited().await;
    assert_eq!(status.code(), Some(0));
    let log = sluice.log();
    assert!(
        log.iter().any(|l| l.contains("reason=\"shutdown\"")),
        "{log:?}"
    );
    assert!(
        log.iter().any(|l| l.contains("shutdown complete cut=1")),
        "{log:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let backend = Backend::echo().await;
    let sluice = Sluice::start(Fixture::front(&[backend.addr]).set("drain_timeout = \"1h\"")).await;
    let mut s = TcpStream::connect(sluice.addr("front")).await.unwrap();
    s.write_all(b"x").await.unwrap();
    assert_eq!(read_n(&mut s, 1).await, b"x");

    sluice.signal("TERM");
    sluice.wait_log("shutting down").await;
    sluice.signal("TERM");

    let status = sluice.exited().await;
    assert_eq!(status.code(), Some(130));
    assert_eq!(
        until_closed(&mut s).await.ok(),
        Some(0),
        "the kernel closes its sockets"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_is_told_ready_then_stopping() {
    // The harness names its own socket in NOTIFY_SOCKET, and starts no test before
    // READY=1 came: here, what sluice sent it.
    let backend = Backend::echo().await;
    let sluice = Sluice::start(Fixture::front(&[backend.addr])).await;
    let ready = format!("READY=1\nSTATUS=ready; admin endpoint on {}", sluice.admin);
    assert_eq!(sluice.notifications(), [ready], "READY=1 once listening");
    let sent = data(1000, 1);
    assert_eq!(
        exchange(sluice.addr("front"), &sent).await,
        sent,
        "listening when ready"
    );

    sluice.signal("TERM");
    let stopping = sluice.wait_notification("STOPPING=1").await;
    assert_eq!(
        stopping, "STOPPING=1\nSTATUS=draining",
        "STOPPING=1 when draining"
    );
    assert_eq!(sluice.exited().await.code(), Some(0));
}
