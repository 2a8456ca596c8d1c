//! Active health checks and passive ejection, with backends that die and come back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CHECKS: &str = "health_check = { interval = \"100ms\", timeout = \"100ms\", rise = 2, fall = 2 }\n\
                      passive_ejection = { failures = 0 }";

fn up(m: &Metrics, backend: &Backend) -> f64 {
    m.value(
        "sluice_backend_up",
        &[("backend", &backend.addr.to_string())],
    )
}

fn errors_for(m: &Metrics, addr: &str) -> f64 {
    m.value("sluice_upstream_connect_errors_total", &[("backend", addr)])
}

async fn tags(sluice: &Sluice, n: usize) -> String {
    let mut out = String::new();
    for _ in 0..n {
        out.push(connect_tagged(sluice.addr("front"), None).await.1 as char);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_backend_goes_down_after_fall_checks_and_returns_after_rise() {
    let a = tagged(b'a').await;
    let b = tagged(b'b').await;
    let a_addr = a.addr;
    let a_label = a_addr.to_string();
    let sluice = Sluice::start(Fixture::front(&[a.addr, b.addr]).upstream_keys(CHECKS)).await;
    sluice
        .wait_metrics("a passing check", |m| {
            m.value(
                "sluice_health_checks_total",
                &[("backend", &a_label), ("result", "success")],
            ) >= 1.0
        })
        .await;

    drop(a);
    let m = sluice
        .wait_metrics("a marked down", |m| {
            up(m, &b) == 1.0 && m.value("sluice_backend_up", &[("backend", &a_label)]) == 0.0
        })
        .await;
    assert!(
        m.value(
            "sluice_health_checks_total",
            &[("backend", &a_label), ("result", "failure")]
        ) >= 2.0
    );
    let line = sluice.wait_log("backend down").await;
    assert!(line.contains("failed 2 checks"), "{line}");
    let errors_before = errors_for(&m, &a_label);
    assert_eq!(
        tags(&sluice, 10).await,
        "bbbbbbbbbb",
        "a down backend gets no connections"
    );
    assert_eq!(
        errors_for(&sluice.metrics().await, &a_label),
        errors_before,
        "and no attempts"
    );

    let a = Backend::start_on(&a_label, |mut s: TcpStream| async move {
        if s.write_all(b"a").await.is_ok() {
            echo(s).await;
        }
    })
    .await;
    sluice.wait_metrics("a back up", |m| up(m, &a) == 1.0).await;
    let line = sluice.wait_log("backend up").await;
    assert!(line.contains("passed 2 checks"), "{line}");
    let spread = tags(&sluice, 10).await;
    assert_eq!(spread.matches('a').count(), 5, "{spread}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_and_expect_fail_a_backend_that_answers_wrongly() {
    async fn answering(reply: &'static [u8]) -> Backend {
        Backend::start(move |mut s: TcpStream| async move {
            let mut request = [0u8; 6];
            if s.read_exact(&mut request).await.is_ok() && &request == b"PING\r\n" {
                let _ = s.write_all(reply).await;
            }
        })
        .await
    }
    let good = answering(b"+PONG\r\n").await;
    let bad = answering(b"-ERR unknown\r\n").await;
    let checks = "health_check = { interval = \"100ms\", timeout = \"100ms\", rise = 1, fall = 1, send = \"PING\\r\\n\", expect = \"+PONG\" }";
    let sluice = Sluice::start(Fixture::front(&[good.addr, bad.addr]).upstream_keys(checks)).await;

    let m = sluice
        .wait_metrics("the wrong answer failing", |m| up(m, &bad) == 0.0)
        .await;
    assert_eq!(up(&m, &good), 1.0);
    assert_eq!(
        m.value(
            "sluice_health_checks_total",
            &[("backend", &good.addr.to_string()), ("result", "failure")]
        ),
        0.0
    );
    let line = sluice.wait_log("backend down").await;
    assert!(line.contains("does not start with the expected"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_backend_is_down_a_client_is_closed_at_once() {
    let a = tagged(b'a').await;
    let a_label = a.addr.to_string();
    let sluice = Sluice::start(Fixture::front(&[a.addr]).upstream_keys(CHECKS)).await;
    drop(a);
    sluice
        .wait_metrics("a marked down", |m| {
            m.value("sluice_backend_up", &[("backend", &a_label)]) == 0.0
        })
        .await;

    let mut s = TcpStream::connect(sluice.addr("front")).await.unwrap();
    assert_eq!(until_closed(&mut s).await.unwrap(), 0);
    let m = sluice
        .wait_metrics("the rejection", |m| {
            m.value(
                "sluice_connections_rejected_total",
                &[("reason", "no_healthy_backend")],
            ) == 1.0
        })
        .await;
    assert_eq!(errors_for(&m, &a_label), 0.0, "no connect was attempted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_connect_failures_eject_a_backend() {
    let dead = refusing();
    let live = tagged(b'l').await;
    let dead_label = dead.addr.to_string();
    let sluice = Sluice::start(
        Fixture::front(&[dead.addr, live.addr])
            .upstream_keys("retries = 1\npassive_ejection = { failures = 2, duration = \"1h\" }"),
    )
    .await;

    assert_eq!(tags(&sluice, 10).await, "llllllllll");

    let m = sluice.metrics().await;
    assert_eq!(
        errors_for(&m, &dead_label),
        2.0,
        "tried until ejected, then never"
    );
    assert_eq!(
        m.value(
            "sluice_backend_ejections_total",
            &[("backend", &dead_label)]
        ),
        1.0
    );
    assert_eq!(
        m.value("sluice_backend_up", &[("backend", &dead_label)]),
        0.0
    );
    sluice.wait_log("backend ejected").await;
}
