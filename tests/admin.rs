//! The admin endpoint: status routes and a metrics exposition that a real Prometheus
//! tool accepts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::*;
use tokio::net::TcpStream;

/// The metric names dashboards rely on; each must be exported under exactly this name.
const REQUIRED: &[&str] = &[
    "sluice_build_info",
    "sluice_connections_accepted_total",
    "sluice_connections_active",
    "sluice_connections_rejected_total",
    "sluice_connections_closed_total",
    "sluice_connection_duration_seconds",
    "sluice_bytes_total",
    "sluice_backend_connections_active",
    "sluice_upstream_connect_duration_seconds",
    "sluice_upstream_connect_errors_total",
    "sluice_backend_up",
    "sluice_health_checks_total",
    "sluice_backend_ejections_total",
    "sluice_queue_length",
    "sluice_queue_wait_duration_seconds",
    "sluice_config_reloads_total",
    "sluice_config_last_reload_successful",
    "sluice_config_last_reload_success_timestamp_seconds",
    "sluice_backend_admin_state",
    "sluice_backend_weight",
    "sluice_backend_bytes_total",
    "sluice_listener_accept_queue",
    "sluice_listener_accept_queue_limit",
    "sluice_listener_at_cap_seconds_total",
    "sluice_client_table_entries",
    "sluice_client_table_evictions_total",
    "sluice_backend_effective_weight",
    "process_open_fds",
    "process_max_fds",
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
    "process_start_time_seconds",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_routes() {
    let backend = Backend::echo().await;
    let sluice = Sluice::start(Fixture::front(&[backend.addr])).await;

    assert_eq!(sluice.get("/healthz").await, (200, "ok\n".to_string()));
    assert_eq!(sluice.get("/readyz").await, (200, "ready\n".to_string()));
    assert_eq!(sluice.get("/nope").await.0, 404);
    let mut s = TcpStream::connect(sluice.admin).await.unwrap();
    let (mut r, mut w) = s.split();
    tokio::io::AsyncWriteExt::write_all(
        &mut w,
        b"POST /metrics HTTP/1.0\r\nContent-Length: 0\r\n\r\n",
    )
    .await
    .unwrap();
    let mut reply = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut r, &mut reply)
        .await
        .unwrap();
    assert!(
        reply.starts_with("HTTP/1.0 405") || reply.starts_with("HTTP/1.1 405"),
        "{reply}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_carry_the_required_names() {
    let live = Backend::echo().await;
    let dead = refusing();
    let sluice =
        Sluice::start(Fixture::front(&[live.addr, dead.addr]).upstream_keys("retries = 1")).await;
    for i in 0..4 {
        let sent = data(5000, i);
        assert_eq!(exchange(sluice.addr("front"), &sent).await, sent);
    }
    let m = sluice
        .wait_metrics("four closed connections", |m| {
            m.value(
                "sluice_connection_duration_seconds_count",
                &[("listener", "front")],
            ) == 4.0
        })
        .await;

    for name in REQUIRED {
        assert!(
            m.0.lines().any(|l| l == format!("# TYPE {name} counter")
                || l == format!("# TYPE {name} gauge")
                || l == format!("# TYPE {name} histogram")),
            "{name} missing:\n{}",
            m.0
        );
    }
    assert_eq!(
        m.value(
            "sluice_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            "sluice_upstream_connect_errors_total",
            &[("reason", "refused")]
        ),
        2.0
    );
    assert!(
        !m.0.contains("127.0.0.1:0\""),
        "no client address in labels"
    );

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (make test installs Debian's prometheus)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(m.0.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_and_access_log_changes_wait_for_a_restart_and_config_shows_what_runs() {
    let backend = Backend::echo().await;
    let base = Fixture::front(&[backend.addr]);
    let sluice = Sluice::start(&base).await;
    let moved = base
        .clone()
        .admin("127.0.0.2:0")
        .table("[access_log]\nformat = \"json\"");
    let warnings = |what: &str| {
        let needle = format!("a change of [{what}] applies only after a restart");
        sluice.log().iter().filter(|l| l.contains(&needle)).count()
    };

    // Only restart-only sections changed: warned about, nothing applied, the generation
    // stays (it counts changes that took effect).
    sluice.rewrite(&moved);
    sluice
        .wait_log("config file changed, but nothing that a reload applies")
        .await;
    assert_eq!((warnings("admin"), warnings("access_log")), (1, 1));
    assert_eq!(
        sluice
            .metrics()
            .await
            .value("sluice_config_generation", &[]),
        0.0
    );
    let (_, body) = sluice.get("/config").await;
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["config"]["admin"]["bind"], "127.0.0.1:0", "{body}");
    assert_ne!(json["config"]["access_log"]["format"], "json", "{body}");

    // Each reload compares with what runs: the file still differs, so it warns again.
    sluice.rewrite(moved.listener_keys("backlog = 512"));
    sluice.wait_reloaded(1).await;
    assert_eq!((warnings("admin"), warnings("access_log")), (2, 2));

    // Back to what runs: nothing to warn about.
    sluice.rewrite(base.listener_keys("backlog = 256"));
    sluice.wait_reloaded(2).await;
    assert_eq!((warnings("admin"), warnings("access_log")), (2, 2));
    assert_eq!(
        sluice.get("/healthz").await.0,
        200,
        "the admin endpoint stayed"
    );
}
