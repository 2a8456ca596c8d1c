//! Protecting a backend that takes few connections: the per-backend limit, the FIFO
//! queue, and max connection lifetime.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn queued(m: &Metrics) -> f64 {
    m.value("sluice_queue_length", &[("upstream", "app")])
}

fn rejected(m: &Metrics, reason: &str) -> f64 {
    m.value("sluice_connections_rejected_total", &[("reason", reason)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_clients_share_two_slots_and_the_backend_never_sees_more() {
    // Slots are handed out oldest first, but two clients handed slots in turn then race
    // each other to the backend (wake, connect, send), so the backend's order is not a
    // strict test of FIFO with two slots; the one-slot test below is.
    let order = clients_through_slots(2).await;
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        (0..20).collect::<Vec<_>>(),
        "every client served once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_slot_clients_are_served_exactly_in_arrival_order() {
    // The next client gets the slot only after the previous connection has closed, so
    // the backend sees exactly the order in which the queue handed out the slot.
    let order = clients_through_slots(1).await;
    assert_eq!(order, (0..20).collect::<Vec<_>>());
}

/// Twenty clients arrive one at a time at a backend limited to `slots` connections,
/// then all exchange data at once. Returns the order in which the backend saw them,
/// after checking every byte and that the backend never saw more than `slots`.
async fn clients_through_slots(slots: u32) -> Vec<u32> {
    const CLIENTS: u32 = 20;
    let current = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let order = Arc::new(Mutex::new(Vec::new()));
    let (c, m, o) = (Arc::clone(&current), Arc::clone(&most), Arc::clone(&order));
    let backend = Backend::start(move |mut s: TcpStream| {
        let (current, most, order) = (Arc::clone(&c), Arc::clone(&m), Arc::clone(&o));
        async move {
            let now = current.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            let mut id = [0u8; 4];
            s.read_exact(&mut id).await.unwrap();
            order.lock().unwrap().push(u32::from_le_bytes(id));
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await.unwrap();
            s.write_all(&rest).await.unwrap();
            // Done before the FIN: sluice cannot reuse the slot any earlier.
            current.fetch_sub(1, Ordering::SeqCst);
            s.shutdown().await.unwrap();
        }
    })
    .await;
    let sluice = Sluice::start(Fixture::front(&[backend.addr]).upstream_keys(&format!(
        "max_connections_per_backend = {slots}\nqueue = {{ max = 100, timeout = \"60s\" }}"
    )))
    .await;

    // Arrive one at a time: two are served, the rest queue in this order.
    let mut clients = Vec::new();
    for id in 0..CLIENTS {
        let mut s = TcpStream::connect(sluice.addr("front")).await.unwrap();
        s.write_all(&id.to_le_bytes()).await.unwrap();
        clients.push(s);
        let waiting = f64::from((id + 1).saturating_sub(slots));
        sluice
            .wait_metrics("the client in place", |m| {
                m.value("sluice_backend_connections_active", &[]) == f64::from((id + 1).min(slots))
                    && queued(m) == waiting
            })
            .await;
    }
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut s)| {
            tokio::spawn(async move {
                let sent = data(256 * 1024, i as u64);
                let got = exchange_on(&mut s, &sent).await;
                assert_eq!(sha256(&got), sha256(&sent), "client {i}");
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }

    assert_eq!(
        most.load(Ordering::SeqCst),
        slots as usize,
        "the backend never saw more"
    );
    let m = sluice.metrics().await;
    assert_eq!(queued(&m), 0.0);
    assert_eq!(
        m.value("sluice_queue_wait_duration_seconds_count", &[]),
        f64::from(CLIENTS - slots)
    );
    let order = order.lock().unwrap().clone();
    assert_eq!(order.len(), CLIENTS as usize);
    order
}

/// One slot, held by the returned client, and the config for it.
async fn one_slot(queue: &str) -> (Backend, Sluice, TcpStream) {
    let backend = tagged(b't').await;
    let sluice = Sluice::start(
        Fixture::front(&[backend.addr])
            .upstream_keys(&format!("max_connections_per_backend = 1\nqueue = {queue}")),
    )
    .await;
    let (holder, tag) = connect_tagged(sluice.addr("front"), None).await;
    assert_eq!(tag, b't');
    (backend, sluice, holder)
}

async fn enqueue(sluice: &Sluice, expect_queued: f64) -> TcpStream {
    let s = TcpStream::connect(sluice.addr("front")).await.unwrap();
    sluice
        .wait_metrics("the client queued", |m| queued(m) == expect_queued)
        .await;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_waiting_past_the_queue_timeout_is_closed_and_counted() {
    let (_b, sluice, _holder) = one_slot("{ max = 10, timeout = \"300ms\" }").await;
    let started = Instant::now();
    let mut waiting = enqueue(&sluice, 1.0).await;

    assert_eq!(until_closed(&mut waiting).await.unwrap(), 0);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    let m = sluice
        .wait_metrics("the timeout counted", |m| {
            rejected(m, "queue_timeout") == 1.0
        })
        .await;
    assert_eq!(queued(&m), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_arriving_at_a_full_queue_is_closed_and_counted() {
    let (_b, sluice, holder) = one_slot("{ max = 1, timeout = \"60s\" }").await;
    let mut second = enqueue(&sluice, 1.0).await;
    let mut third = TcpStream::connect(sluice.addr("front")).await.unwrap();

    assert_eq!(until_closed(&mut third).await.unwrap(), 0);
    sluice
        .wait_metrics("queue_full counted", |m| rejected(m, "queue_full") == 1.0)
        .await;
    drop(holder);
    assert_eq!(
        read_n(&mut second, 1).await,
        b"t",
        "the queued client is served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_client_that_leaves_frees_its_place_at_once() {
    let (backend, sluice, holder) = one_slot("{ max = 10, timeout = \"60s\" }").await;
    let leaving = enqueue(&sluice, 1.0).await;

    drop(leaving);
    let m = sluice
        .wait_metrics("the place freed", |m| queued(m) == 0.0)
        .await;
    assert_eq!(rejected(&m, "client_left"), 1.0);
    let mut next = enqueue(&sluice, 1.0).await;
    drop(holder);
    assert_eq!(read_n(&mut next, 1).await, b"t");
    assert_eq!(
        backend.accepted(),
        2,
        "the client that left never reached the backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_client_that_half_closes_keeps_its_place() {
    let (_b, sluice, holder) = one_slot("{ max = 10, timeout = \"60s\" }").await;
    let mut waiting = enqueue(&sluice, 1.0).await;
    waiting.write_all(b"request").await.unwrap();
    waiting.shutdown().await.unwrap();

    drop(holder);
    let mut got = Vec::new();
    tokio::time::timeout(STUCK, waiting.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"trequest");
}

/// Behind a PROXY listener the header is read before the queue, so the socket's
/// readiness no longer tells whether data came after it: a queued client that sent its
/// header and then FIN is still seen to leave, and one that sent data after its header
/// and then FIN keeps its place and gets its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_proxy_header_a_client_that_leaves_is_told_from_one_that_half_closes() {
    const HEADER: &[u8] = b"PROXY TCP4 192.0.2.1 192.0.2.2 1000 80\r\n";
    let backend = tagged(b't').await;
    let sluice = Sluice::start(
        Fixture::front(&[backend.addr])
            .listener_keys("proxy_protocol = { trusted = [\"127.0.0.1/32\"] }")
            .upstream_keys(
                "max_connections_per_backend = 1\nqueue = { max = 10, timeout = \"60s\" }",
            ),
    )
    .await;
    let front = sluice.addr("front");
    let mut holder = TcpStream::connect(front).await.unwrap();
    holder.write_all(HEADER).await.unwrap();
    assert_eq!(read_n(&mut holder, 1).await, b"t");

    let mut leaving = TcpStream::connect(front).await.unwrap();
    leaving.write_all(HEADER).await.unwrap();
    sluice
        .wait_metrics("the client queued", |m| queued(m) == 1.0)
        .await;
    leaving.shutdown().await.unwrap();
    let m = sluice
        .wait_metrics("the place freed", |m| queued(m) == 0.0)
        .await;
    assert_eq!(rejected(&m, "client_left"), 1.0);

    let mut staying = TcpStream::connect(front).await.unwrap();
    staying.write_all(HEADER).await.unwrap();
    staying.write_all(b"request").await.unwrap();
    sluice
        .wait_metrics("the client queued", |m| queued(m) == 1.0)
        .await;
    staying.shutdown().await.unwrap();
    drop(holder);
    let mut got = Vec::new();
    tokio::time::timeout(STUCK, staying.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"trequest");
    assert_eq!(rejected(&sluice.metrics().await, "client_left"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_closed_at_its_max_lifetime_plus_jitter() {
    let backend = tagged(b't').await;
    let sluice = Sluice::start(
        Fixture::front(&[backend.addr])
            .upstream_keys("max_lifetime = \"500ms\"\nmax_lifetime_jitter = \"200ms\""),
    )
    .await;
    let started = Instant::now();
    let (mut s, _) = connect_tagged(sluice.addr("front"), None).await;

    // Busy all along, so only the lifetime can end it: a byte out, and its echo read
    // for at most 50 ms (the pace of the traffic), until the connection closes.
    eventually("the connection closed at its lifetime", async || {
        if s.write_all(b"p").await.is_err() {
            return true;
        }
        let mut b = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(50), s.read(&mut b)).await {
            Ok(Ok(1)) | Err(_) => false,
            Ok(_) => true,
        }
    })
    .await;
    let lived = started.elapsed();
    assert!(lived >= Duration::from_millis(500), "{lived:?}");
    assert!(
        lived < Duration::from_millis(700) + Duration::from_secs(1),
        "{lived:?}"
    );
    sluice.wait_log("reason=\"max_lifetime\"").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_client_that_sent_data_then_reset_leaves_at_once() {
    let (_b, sluice, _holder) = one_slot("{ max = 10, timeout = \"60s\" }").await;
    let mut leaving = enqueue(&sluice, 1.0).await;
    leaving.write_all(b"startup message").await.unwrap();
    leaving.set_zero_linger().unwrap();
    drop(leaving);

    let m = sluice
        .wait_metrics("the place freed", |m| queued(m) == 0.0)
        .await;
    assert_eq!(rejected(&m, "client_left"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raising_the_limit_by_reload_lets_a_waiting_client_in_at_once() {
    let backend = tagged(b't').await;
    let text = |limit: u32| {
        Fixture::front(&[backend.addr]).upstream_keys(&format!(
            "max_connections_per_backend = {limit}\nqueue = {{ max = 10, timeout = \"60s\" }}"
        ))
    };
    let sluice = Sluice::start(text(1)).await;
    let (_holder, _) = connect_tagged(sluice.addr("front"), None).await;
    let mut waiting = enqueue(&sluice, 1.0).await;

    sluice.rewrite(text(2));
    sluice.wait_generation(1).await;
    assert_eq!(
        read_n(&mut waiting, 1).await,
        b"t",
        "served without a slot being freed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_added_by_reload_holds_and_slots_freed_by_older_connections_are_handed_on() {
    let backend = tagged(b't').await;
    let sluice = Sluice::start(Fixture::front(&[backend.addr])).await;
    // Two connections from before the reload, when there was no limit.
    let (first, _) = connect_tagged(sluice.addr("front"), None).await;
    let (second, _) = connect_tagged(sluice.addr("front"), None).await;
    sluice.rewrite(
        Fixture::front(&[backend.addr]).upstream_keys(
            "max_connections_per_backend = 1\nqueue = { max = 10, timeout = \"60s\" }",
        ),
    );
    sluice.wait_generation(1).await;

    let mut waiting = enqueue(&sluice, 1.0).await;
    drop(first);
    let m = sluice
        .wait_metrics("one old connection closed", |m| {
            m.value("sluice_backend_connections_active", &[]) == 1.0
        })
        .await;
    assert_eq!(
        queued(&m),
        1.0,
        "still over the new limit of 1: the client waits"
    );
    drop(second);
    assert_eq!(
        read_n(&mut waiting, 1).await,
        b"t",
        "the slot an old connection freed is handed on"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_held_back_by_what_it_tried_does_not_block_the_line() {
    // b1 refuses at first; b2 takes one connection at a time.
    let b1 = refusing();
    let b2 = tagged(b'2').await;
    // The two configs differ in the queue's timeout only: enough for a reload to apply.
    let text = |timeout: &str| {
        Fixture::front(&[b1.addr, b2.addr]).upstream_keys(&format!(
            "retries = 1\nmax_connections_per_backend = 1\nqueue = {{ max = 10, timeout = \"{timeout}\" }}\npassive_ejection = {{ failures = 0 }}"
        ))
    };
    let sluice = Sluice::start(text("60s")).await;
    // The holder: b1 refuses, so it lands on b2 and fills it.
    let (_holder, tag) = connect_tagged(sluice.addr("front"), None).await;
    assert_eq!(tag, b'2');
    // x tries b1 (refused), finds b2 full, and waits, having tried b1.
    let _x = enqueue(&sluice, 1.0).await;
    // y finds someone waiting and lines up behind x, having tried nothing.
    let mut y = enqueue(&sluice, 2.0).await;

    // b1 comes to life; a reload makes the queue look again.
    b1.listen_and_tag(b'1');
    sluice.rewrite(text("61s"));
    sluice.wait_generation(1).await;

    assert_eq!(
        read_n(&mut y, 1).await,
        b"1",
        "y got b1 although x, ahead of it, could not"
    );
    let m = sluice.metrics().await;
    assert_eq!(queued(&m), 1.0, "x still waits for b2");
}
