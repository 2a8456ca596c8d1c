//! `[runtime] mode = "per_core"`: a current-thread runtime per worker thread, each with
//! its own SO_REUSEPORT socket for every listening address.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// The names of the process's threads.
fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim_end().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_connections_are_byte_exact() {
    let backend = Backend::echo().await;
    let sluice = Sluice::with(Fixture::front(&[backend.addr]))
        .per_core(2)
        .start()
        .await;
    let addr = sluice.addr("front");
    // All open at once before any data moves, so the workers really hold them together.
    let mut streams = Vec::new();
    for _ in 0..200 {
        streams.push(TcpStream::connect(addr).await.unwrap());
    }
    let exchanges = streams.into_iter().enumerate().map(|(i, mut s)| {
        tokio::spawn(async move {
            let sent = data(64 * 1024 + i * 517, i as u64);
            let got = exchange_on(&mut s, &sent).await;
            assert_eq!(got.len(), sent.len(), "connection {i}: bytes");
            assert_eq!(sha256(&got), sha256(&sent), "connection {i}: hash");
        })
    });
    for e in exchanges.collect::<Vec<_>>() {
        e.await.unwrap();
    }
    assert_eq!(backend.accepted(), 200);
    sluice
        .wait_metrics("200 connections accepted and closed", |m| {
            m.value(
                "sluice_connections_accepted_total",
                &[("listener", "front")],
            ) == 200.0
                && m.value("sluice_connections_active", &[("listener", "front")]) == 0.0
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_listen_on_three_sockets_per_address() {
    let backend = Backend::echo().await;
    let sluice = Sluice::with(Fixture::front(&[backend.addr]))
        .per_core(3)
        .start()
        .await;
    let addr = sluice.addr("front");
    assert_eq!(listening_sockets(sluice.pid(), addr), 3);
    let names = thread_names(sluice.pid());
    for i in 0..3 {
        let name = format!("sluice-worker-{i}");
        assert!(names.contains(&name), "no thread {name} in {names:?}");
    }
    sluice
        .wait_log_where("sluice ready on per_core with three workers", |l| {
            l.contains("sluice ready")
                && l.contains("runtime=\"per_core\"")
                && l.contains("worker_threads=3")
        })
        .await;
    let sent = data(100_000, 3);
    assert_eq!(exchange(addr, &sent).await, sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_another_sluice_listens_on_is_refused_at_start() {
    let backend = Backend::echo().await;
    let first = Sluice::with(Fixture::front(&[backend.addr]))
        .per_core(2)
        .start()
        .await;
    let taken = first.addr("front");
    // Every socket of both would have SO_REUSEPORT and the same user, so without a
    // check the second would join the first's port and take part of its traffic.
    let second = Fixture::front(&[backend.addr]).bind(&[&taken.to_string()]);
    let out = Sluice::with(second).per_core(2).start_fails().await;
    let stderr = out.stderr;
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot bind listener \"front\" to {taken}")),
        "{stderr}"
    );
    assert_eq!(listening_sockets(first.pid(), taken), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_a_listener_and_leaves_the_runtime_to_a_restart() {
    let backend = Backend::echo().await;
    let sluice = Sluice::with(
        Fixture::new()
            .listener("one")
            .upstream("app")
            .backend(backend.addr),
    )
    .per_core(2)
    .start()
    .await;

    // The new listener applies; the new worker count waits for a restart.
    sluice.rewrite(
        Fixture::new()
            .table("[runtime]\nmode = \"per_core\"\nworker_threads = 3")
            .listener("one")
            .listener("two")
            .upstream("app")
            .backend(backend.addr),
    );
    sluice.wait_generation(1).await;
    sluice
        .wait_log_where("a warning that [runtime] waits for a restart", |l| {
            l.contains("WARN") && l.contains("[runtime] changes take effect at restart")
        })
        .await;

    let two = sluice.wait_listening("two", 0).await;
    let sent = data(200_000, 2);
    assert_eq!(exchange(two, &sent).await, sent, "the new listener serves");
    assert_eq!(
        exchange(sluice.addr("one"), &sent).await,
        sent,
        "the old one still does"
    );
    assert_eq!(
        listening_sockets(sluice.pid(), two),
        2,
        "one per worker in force"
    );
    let (code, body) = sluice.get("/config").await;
    assert_eq!(code, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["config"]["runtime"]["mode"], "per_core");
    assert_eq!(json["config"]["runtime"]["worker_threads"], 2);
    assert_eq!(json["config"]["listeners"][1]["name"], "two");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_stream_in_flight_and_exits_0() {
    const MIB: usize = 1024 * 1024;
    let backend = Backend::echo().await;
    let sluice = Sluice::with(Fixture::front(&[backend.addr]).set("drain_timeout = \"60s\""))
        .per_core(2)
        .start()
        .await;
    let addr = sluice.addr("front");
    let sent = data(8 * MIB, 40);
    let (first, second) = sent.split_at(4 * MIB);
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(first).await.unwrap();
    let mut got = read_n(&mut s, first.len()).await;

    sluice.signal("TERM");
    sluice.wait_log("shutting down").await;
    // Every worker's socket closes: no connect lands on any of them.
    until_refused(addr).await;
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
async fn the_descriptors_of_eight_workers_are_kept_from_proxied_connections() {
    // 96 descriptors: 32 reserved, and 8 workers x (4 for the runtime + 1 socket), so
    // (96 - 32 - 40) / 2 = 12 proxied connections. With only the 32 reserved, the cap
    // would be 32, and the ~50 descriptors sluice holds at start would leave room for
    // about 21: accept would fail with EMFILE before the cap.
    let backend = Backend::echo().await;
    let sluice = Sluice::with(Fixture::front(&[backend.addr]))
        .per_core(8)
        .nofile(96)
        .start()
        .await;
    let addr = sluice.addr("front");
    let mut clients = Vec::new();
    for _ in 0..30 {
        clients.push(TcpStream::connect(addr).await.unwrap());
    }
    let m = sluice
        .wait_metrics("12 connections open", |m| {
            m.value("sluice_connections_active", &[]) == 12.0
        })
        .await;
    assert_eq!(m.value("sluice_process_max_connections", &[]), 12.0);
    assert_eq!(m.value("sluice_accept_errors_total", &[]), 0.0, "no EMFILE");
    // Which 12 were accepted is not arrival order: each worker's socket has a backlog of
    // its own. Once they all leave, a new client is served.
    drop(clients);
    sluice
        .wait_metrics("every connection closed", |m| {
            m.value("sluice_connections_active", &[]) == 0.0
        })
        .await;
    let sent = data(10_000, 8);
    assert_eq!(exchange(addr, &sent).await, sent);
}
