//! Reaching backends: refusals, timeouts, retries, and the listener's connection cap.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn errors(m: &Metrics, backend: &str, reason: &str) -> f64 {
    m.value(
        "sluice_upstream_connect_errors_total",
        &[
            ("upstream", "app"),
            ("backend", backend),
            ("reason", reason),
        ],
    )
}

fn rejected(m: &Metrics, reason: &str) -> f64 {
    m.value(
        "sluice_connections_rejected_total",
        &[("listener", "front"), ("reason", reason)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_backend_falls_through_to_the_next() {
    let dead = refusing();
    let live = Backend::echo().await;
    let sluice =
        Sluice::start(Fixture::front(&[dead.addr, live.addr]).upstream_keys("retries = 1")).await;

    for i in 0..10 {
        let sent = data(10_000, i);
        let got = exchange(sluice.addr("front"), &sent).await;
        assert_eq!(sha256(&got), sha256(&sent), "connection {i}");
    }

    assert_eq!(live.accepted(), 10);
    let m = sluice.metrics().await;
    // Round robin over two backends: every other connection tries the dead one first.
    assert_eq!(errors(&m, &dead.addr.to_string(), "refused"), 5.0);
    assert_eq!(rejected(&m, "upstream_unavailable"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_backend_refuses_the_client_is_closed_and_counted() {
    let a = refusing();
    let b = refusing();
    let sluice =
        Sluice::start(Fixture::front(&[a.addr, b.addr]).upstream_keys("retries = 5")).await;
    let mut s = TcpStream::connect(sluice.addr("front")).await.unwrap();

    let closed = until_closed(&mut s).await;

    assert_eq!(closed.unwrap(), 0, "closed without a byte");
    // The active gauge drops as the connection's task returns, a moment after the
    // refusal is counted: wait for both.
    let m = sluice
        .wait_metrics("the rejection, none active", |m| {
            rejected(m, "upstream_unavailable") == 1.0
                && m.value("sluice_connections_active", &[]) == 0.0
        })
        .await;
    // Each backend is tried once, however many retries are allowed.
    assert_eq!(errors(&m, &a.addr.to_string(), "refused"), 1.0);
    assert_eq!(errors(&m, &b.addr.to_string(), "refused"), 1.0);
    assert_eq!(m.value("sluice_backend_connections_active", &[]), 0.0);
    let line = sluice.wait_log("connection rejected").await;
    assert!(
        line.contains("reason=\"upstream_unavailable\"")
            || line.contains("reason=upstream_unavailable"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_never_answers_times_out_at_connect_timeout() {
    let hole = blackhole();
    let sluice = Sluice::start(
        Fixture::front(&[hole.addr]).upstream_keys("connect_timeout = \"500ms\"\nretries = 0"),
    )
    .await;
    // Stamped before connecting: sluice's timer cannot start any earlier.
    let started = Instant::now();
    let mut s = TcpStream::connect(sluice.addr("front")).await.unwrap();

    let closed = until_closed(&mut s).await;
    let waited = started.elapsed();

    assert_eq!(closed.unwrap(), 0);
    assert!(
        waited >= Duration::from_millis(500),
        "closed after {waited:?}"
    );
    // Without the timeout the kernel would retry the SYN for about two minutes.
    assert!(
        waited < Duration::from_millis(500) + PROMPTLY,
        "closed after {waited:?}"
    );
    let m = sluice
        .wait_metrics("the rejection", |m| {
            rejected(m, "upstream_unavailable") == 1.0
        })
        .await;
    assert_eq!(errors(&m, &hole.addr.to_string(), "timeout"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_connect_timeout_the_next_backend_is_tried() {
    let hole = blackhole();
    let live = Backend::echo().await;
    let sluice = Sluice::start(
        Fixture::front(&[hole.addr, live.addr])
            .upstream_keys("connect_timeout = \"300ms\"\nretries = 1"),
    )
    .await;

    for i in 0..2 {
        let sent = data(1000, i);
        assert_eq!(exchange(sluice.addr("front"), &sent).await, sent);
    }

    assert_eq!(live.accepted(), 2);
    let m = sluice.metrics().await;
    assert_eq!(errors(&m, &hole.addr.to_string(), "timeout"), 1.0);
    assert_eq!(
        m.value(
            "sluice_upstream_connect_duration_seconds_count",
            &[("upstream", "app")]
        ),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weight_zero_takes_no_connections() {
    let idle = Backend::echo().await;
    let sluice = Sluice::start(Fixture::front_weighted(&[(idle.addr, 0)])).await;
    let mut s = TcpStream::connect(sluice.addr("front")).await.unwrap();

    assert_eq!(until_closed(&mut s).await.unwrap(), 0);
    sluice
        .wait_metrics("the rejection", |m| {
            rejected(m, "no_healthy_backend") == 1.0
        })
        .await;
    assert_eq!(idle.accepted(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_holds_and_a_waiting_client_is_served_when_a_slot_frees() {
    let backend = Backend::echo().await;
    let sluice =
        Sluice::start(Fixture::front(&[backend.addr]).listener_keys("max_connections = 2")).await;
    let addr = sluice.addr("front");
    let mut first = TcpStream::connect(addr).await.unwrap();
    let mut second = TcpStream::connect(addr).await.unwrap();
    for s in [&mut first, &mut second] {
        s.write_all(b"1").await.unwrap();
        assert_eq!(read_n(s, 1).await, b"1");
    }

    // The third completes its handshake in the kernel's backlog but is not served: the
    // kernel holds it for an accept that does not come.
    let mut third = TcpStream::connect(addr).await.unwrap();
    third.write_all(b"3").await.unwrap();
    wait_accept_queue(addr, 1).await;
    assert!(
        nothing_to_read(&third),
        "the third client was served over the cap"
    );
    let m = sluice.metrics().await;
    assert_eq!(
        m.value(
            "sluice_connections_accepted_total",
            &[("listener", "front")]
        ),
        2.0
    );
    assert_eq!(
        m.value("sluice_connections_active", &[("listener", "front")]),
        2.0
    );
    assert_eq!(
        m.value("sluice_listener_max_connections", &[("listener", "front")]),
        2.0
    );
    assert_eq!(backend.accepted(), 2);

    drop(first);
    assert_eq!(
        read_n(&mut third, 1).await,
        b"3",
        "served once a slot freed"
    );
    assert_eq!(backend.accepted(), 3);
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_process_caps_connections_to_keep_the_admin_endpoint_reachable() {
    // 64 descriptors, 32 reserved: 16 proxied connections at two descriptors each. The
    // multi-thread runtime reserves no descriptors for workers (tests/runtime.rs checks
    // per_core's reserve).
    let backend = Backend::echo().await;
    let sluice = Sluice::with(Fixture::front(&[backend.addr]))
        .multi_thread()
        .nofile(64)
        .start()
        .await;
    let addr = sluice.addr("front");

    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(TcpStream::connect(addr).await.unwrap());
    }
    let m = sluice
        .wait_metrics("16 connections open", |m| {
            m.value("sluice_connections_active", &[]) == 16.0
        })
        .await;
    assert_eq!(m.value("sluice_process_max_connections", &[]), 16.0);
    assert_eq!(m.value("sluice_accept_errors_total", &[]), 0.0, "no EMFILE");
    sluice
        .wait_log("the open-file limit allows fewer connections")
        .await;

    // Closing four lets the four waiting in the backlog in.
    drop(clients.drain(..4));
    for (i, c) in clients.iter_mut().enumerate() {
        let msg = format!("client {i}");
        c.write_all(msg.as_bytes()).await.unwrap();
        assert_eq!(read_n(c, msg.len()).await, msg.as_bytes());
    }
    assert_eq!(backend.accepted(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_accept_loop_survives_running_out_of_file_descriptors() {
    let backend = Backend::echo().await;
    let sluice = Sluice::with(Fixture::front(&[backend.addr]))
        .nofile(64)
        .start()
        .await;
    let addr = sluice.addr("front");

    // Idle admin connections take sluice's spare descriptors until none is left.
    let mut hogs = Vec::new();
    for _ in 0..80 {
        hogs.push(TcpStream::connect(sluice.admin).await.unwrap());
    }
    // Connecting completes in the kernel's backlog; only once the admin endpoint itself
    // has run out are the descriptors surely gone (without this, the client below could
    // be accepted first, under load).
    sluice.wait_log("admin accept failed").await;
    let mut client = TcpStream::connect(addr).await.unwrap();
    let line = sluice
        .wait_log_where("front's accept failing", |l| {
            l.contains("accept failed") && l.contains("listener=front")
        })
        .await;
    assert!(line.contains("os error 24"), "EMFILE: {line}");

    // Free the descriptors: the waiting client is served, and so are new ones.
    drop(hogs);
    client.write_all(b"after").await.unwrap();
    assert_eq!(read_n(&mut client, 5).await, b"after");
    let sent = data(10_000, 99);
    assert_eq!(exchange(addr, &sent).await, sent);
    let m = sluice.metrics().await;
    let emfile = m.value(
        "sluice_accept_errors_total",
        &[("listener", "front"), ("reason", "file_limit")],
    );
    assert!(emfile >= 1.0, "EMFILE counted: {emfile}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_address_does_not_hold_its_listeners_last_slot() {
    let backend = Backend::echo().await;
    let sluice = Sluice::start(
        Fixture::front(&[backend.addr])
            .bind(&["127.0.0.1:0", "127.0.0.2:0"])
            .listener_keys("max_connections = 1"),
    )
    .await;
    for addr in sluice.addrs("front") {
        let sent = data(1000, 7);
        assert_eq!(exchange(*addr, &sent).await, sent, "through {addr}");
    }
}

/// The default max_connections does not warn on a 20,000 open-file limit (2 workers
/// leave a process cap of 9,979, below the default of 10,000); the same value written
/// in the file does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_default_max_connections_fits_a_common_file_limit_without_a_warning() {
    let backend = Backend::echo().await;
    let warning = "the open-file limit allows fewer connections";
    let start = async |fixture: Fixture| {
        Sluice::with(fixture)
            .per_core(2)
            .nofile(20_000)
            .start()
            .await
    };
    let quiet = start(Fixture::front(&[backend.addr])).await;
    let cap = quiet
        .metrics()
        .await
        .value("sluice_process_max_connections", &[]);
    assert!(cap < 10_000.0, "the cap {cap} is below the default");
    // The warning would come before this line: once it is read, its absence counts.
    quiet.wait_log("sluice ready").await;
    assert!(!quiet.log().iter().any(|l| l.contains(warning)));

    let explicit =
        start(Fixture::front(&[backend.addr]).listener_keys("max_connections = 10000")).await;
    explicit.wait_log(warning).await;
}
