//! Bytes through sluice: integrity, concurrency, half-close, resets, idle timeout,
//! through both relays (the buffered copy and splice(2)) and both runtimes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MIB: usize = 1024 * 1024;

/// The top-level config of each plain relay: the default (the buffered copy on the
/// per-core runtime), then splice(2) and the buffered copy named explicitly, and the
/// default relay on the multi-thread runtime.
const RELAYS: [&str; 4] = [
    "",
    "[relay]\nsplice = true\n",
    "[relay]\nsplice = false\n",
    "[runtime]\nmode = \"multi_thread\"\n",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_mib_each_way_is_byte_exact() {
    for relay in RELAYS {
        sixteen_mib_each_way(relay).await;
    }
}

async fn sixteen_mib_each_way(relay: &str) {
    let backend = Backend::echo().await;
    let sluice = Sluice::start(Fixture::front(&[backend.addr]).table(relay)).await;
    let sent = data(16 * MIB, 1);

    let got = exchange(sluice.addr("front"), &sent).await;

    assert_eq!(got.len(), sent.len());
    assert_eq!(sha256(&got), sha256(&sent));
    let m = sluice
        .wait_metrics("the connection closed", |m| {
            m.value("sluice_connections_active", &[("listener", "front")]) == 0.0
        })
        .await;
    let bytes = |d| {
        m.value(
            "sluice_bytes_total",
            &[("listener", "front"), ("direction", d)],
        )
    };
    assert_eq!(bytes("client_to_backend"), (16 * MIB) as f64);
    assert_eq!(bytes("backend_to_client"), (16 * MIB) as f64);
    let line = sluice.wait_log("connection closed").await;
    assert!(line.contains(&format!("bytes_in={}", 16 * MIB)), "{line}");
    assert!(line.contains(&format!("bytes_out={}", 16 * MIB)), "{line}");
    assert!(line.contains("reason=\"closed\""), "{line}");
    ended_once_as(&sluice, "closed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_connections_are_byte_exact_and_weighted() {
    const N: usize = 1000;
    let a = Backend::echo().await;
    let b = Backend::echo().await;
    let sluice = Sluice::start(Fixture::front_weighted(&[(a.addr, 3), (b.addr, 1)])).await;
    let addr = sluice.addr("front");

    // Open all connections first, so that all N are proxied at the same time.
    let mut streams = Vec::with_capacity(N);
    for _ in 0..N {
        streams.push(TcpStream::connect(addr).await.unwrap());
    }
    sluice
        .wait_metrics("all connections open at once", |m| {
            m.value("sluice_connections_active", &[("listener", "front")]) == N as f64
        })
        .await;
    let tasks: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, mut s)| {
            tokio::spawn(async move {
                let sent = data(64 * 1024 + i, i as u64);
                let got = exchange_on(&mut s, &sent).await;
                (sha256(&sent), sha256(&got), got.len() == sent.len())
            })
        })
        .collect();
    for t in tasks {
        let (sent, got, same_len) = t.await.unwrap();
        assert!(same_len);
        assert_eq!(sent, got);
    }

    assert_eq!(a.accepted() + b.accepted(), N);
    assert_eq!(a.accepted(), N * 3 / 4, "weight 3 of 4");
    let m = sluice
        .wait_metrics("every connection closed", |m| {
            m.value("sluice_connections_active", &[("listener", "front")]) == 0.0
        })
        .await;
    assert_eq!(
        m.value(
            "sluice_connections_accepted_total",
            &[("listener", "front")]
        ),
        N as f64
    );
    assert_eq!(m.value("sluice_backend_connections_active", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_half_close_still_gets_the_whole_answer() {
    for relay in RELAYS {
        client_half_close(relay).await;
    }
}

async fn client_half_close(relay: &str) {
    // The backend answers only after it has read the client's EOF.
    let answer = data(3 * MIB, 7);
    let expected = answer.clone();
    let backend = Backend::start(move |mut s: TcpStream| {
        let answer = answer.clone();
        async move {
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            s.write_all(&sha256(&got)).await.unwrap();
            s.write_all(&answer).await.unwrap();
            s.shutdown().await.unwrap();
        }
    })
    .await;
    let sluice = Sluice::start(Fixture::front(&[backend.addr]).table(relay)).await;
    let request = data(MIB + 3, 8);

    let got = exchange(sluice.addr("front"), &request).await;

    assert_eq!(got.len(), 32 + expected.len());
    assert_eq!(
        got[..32],
        sha256(&request),
        "the backend saw every byte before EOF"
    );
    assert_eq!(sha256(&got[32..]), sha256(&expected));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_half_close_still_gets_the_whole_request() {
    for relay in RELAYS {
        backend_half_close(relay).await;
    }
}

async fn backend_half_close(relay: &str) {
    // The backend speaks first and half-closes; the client then sends and half-closes.
    let greeting = data(2 * MIB, 9);
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let g = greeting.clone();
    let backend = Backend::start(move |mut s: TcpStream| {
        let g = g.clone();
        let seen = seen_tx.clone();
        async move {
            s.write_all(&g).await.unwrap();
            s.shutdown().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            seen.send(sha256(&got)).unwrap();
        }
    })
    .await;
    let sluice = Sluice::start(Fixture::front(&[backend.addr]).table(relay)).await;
    let mut s = TcpStream::connect(sluice.addr("front")).await.unwrap();

    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!(sha256(&got), sha256(&greeting), "greeting then EOF");
    let request = data(5 * MIB, 10);
    s.write_all(&request).await.unwrap();
    s.shutdown().await.unwrap();

    assert_eq!(seen_rx.recv().await.unwrap(), sha256(&request));
    assert_eq!(
        until_closed(&mut s).await.unwrap(),
        0,
        "closed after both FINs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_reset_resets_the_client_promptly() {
    for relay in RELAYS {
        backend_reset(relay).await;
    }
}

async fn backend_reset(relay: &str) {
    let backend = Backend::start(|mut s: TcpStream| async move {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        s.set_zero_linger().unwrap();
        drop(s);
    })
    .await;
    let sluice = Sluice::start(Fixture::front(&[backend.addr]).table(relay)).await;
    let mut s = TcpStream::connect(sluice.addr("front")).await.unwrap();
    s.write_all(b"x").await.unwrap();

    let closed = until_closed(&mut s).await;

    assert!(
        closed.is_err(),
        "the client sees a reset, not a clean close: {closed:?}"
    );
    let line = sluice.wait_log("connection closed").await;
    assert!(line.contains("reason=\"backend_reset\""), "{line}");
    ended_once_as(&sluice, "backend_reset").await;
}

/// Waits until the listener's one connection is counted as ended with `reason`, and
/// with no other.
async fn ended_once_as(sluice: &Sluice, reason: &str) {
    let ended = |m: &Metrics, r: &[(&str, &str)]| {
        let mut labels = vec![("listener", "front")];
        labels.extend_from_slice(r);
        m.value("sluice_connections_closed_total", &labels)
    };
    sluice
        .wait_metrics(&format!("one connection ended as {reason}"), |m| {
            ended(m, &[("reason", reason)]) == 1.0 && ended(m, &[]) == 1.0
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reset_closes_the_backend_promptly() {
    for relay in RELAYS {
        client_reset(relay).await;
    }
}

async fn client_reset(relay: &str) {
    let (ended_tx, mut ended_rx) = tokio::sync::mpsc::unbounded_channel();
    let backend = Backend::start(move |mut s: TcpStream| {
        let ended = ended_tx.clone();
        async move {
            let mut buf = [0u8; 1024];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => s.write_all(&buf[..n]).await.unwrap(),
                }
            }
            ended.send(()).unwrap();
        }
    })
    .await;
    let sluice = Sluice::start(Fixture::front(&[backend.addr]).table(relay)).await;
    let mut s = TcpStream::connect(sluice.addr("front")).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    assert_eq!(read_n(&mut s, 4).await, b"ping");

    s.set_zero_linger().unwrap();
    drop(s);

    tokio::time::timeout(PROMPTLY, ended_rx.recv())
        .await
        .expect("the backend's connection ends")
        .unwrap();
    let line = sluice.wait_log("connection closed").await;
    assert!(line.contains("reason=\"client_reset\""), "{line}");
    ended_once_as(&sluice, "client_reset").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_closes_an_idle_connection_but_not_a_busy_one() {
    let backend = Backend::echo().await;
    let sluice =
        Sluice::start(Fixture::front(&[backend.addr]).upstream_keys("idle_timeout = \"600ms\""))
            .await;

    // Busy: a byte every 100 ms, for longer than the idle timeout, keeps it open.
    let mut busy = TcpStream::connect(sluice.addr("front")).await.unwrap();
    let busy_task = tokio::spawn(async move {
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(2000) {
            busy.write_all(b"b").await.unwrap();
            assert_eq!(read_n(&mut busy, 1).await, b"b");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });

    // Idle: after one exchange, nothing; sluice closes it.
    let mut idle = TcpStream::connect(sluice.addr("front")).await.unwrap();
    // Stamped before the exchange: sluice's last activity cannot be any earlier.
    let last_activity = Instant::now();
    idle.write_all(b"hello").await.unwrap();
    assert_eq!(read_n(&mut idle, 5).await, b"hello");
    let closed = until_closed(&mut idle).await;
    let waited = last_activity.elapsed();

    assert!(closed.is_err() || closed.unwrap() == 0);
    assert!(
        waited >= Duration::from_millis(600),
        "closed after {waited:?}"
    );
    busy_task
        .await
        .expect("the busy connection stayed open throughout");
    let line = sluice.wait_log("reason=\"idle_timeout\"").await;
    assert!(line.contains("bytes_in=5"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_listener_and_backend() {
    let backend = Backend::start_on("[::1]:0", echo).await;
    let sluice =
        Sluice::start(Fixture::front(&[backend.addr]).bind(&["127.0.0.1:0", "[::1]:0"])).await;
    let addrs = sluice.addrs("front");
    assert_eq!(addrs.len(), 2);
    assert!(addrs[1].is_ipv6());

    for (i, addr) in addrs.iter().enumerate() {
        let sent = data(100_000, 20 + i as u64);
        assert_eq!(sha256(&exchange(*addr, &sent).await), sha256(&sent));
    }
    assert_eq!(backend.accepted(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_timeout_still_delivers_what_was_relayed() {
    // The backend sends 2 MiB and half-closes; sluice relays it all into the kernel's
    // buffers at once, then sees nothing move while the client reads slowly, and its
    // idle timeout fires. Closing must not throw away what the kernel still holds.
    let payload = data(2 * MIB, 40);
    let expected = sha256(&payload);
    let backend = sending(payload).await;
    let sluice =
        Sluice::start(Fixture::front(&[backend.addr]).upstream_keys("idle_timeout = \"150ms\""))
            .await;
    let s = TcpStream::connect(sluice.addr("front")).await.unwrap();
    // A small receive buffer keeps the kernel from absorbing the payload for us.
    socket2::SockRef::from(&s)
        .set_recv_buffer_size(32 * 1024)
        .unwrap();
    let mut s = s;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = tokio::time::timeout(STUCK, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        got.len(),
        2 * MIB,
        "bytes lost when the idle timeout closed"
    );
    assert_eq!(sha256(&got), expected);
    sluice.wait_log("reason=\"idle_timeout\"").await;
}

/// The client side has keepalive from the start; the backend side gets it from its
/// relay a minute in (unit tests in `data/relay.rs` and `upstream/connect.rs` show the
/// options set then and the first probe still due after 120 s of silence).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_side_has_keepalive_at_once_and_the_backend_side_later() {
    let backend = Backend::echo().await;
    let sluice = Sluice::start(Fixture::front(&[backend.addr])).await;
    let front = sluice.addr("front");
    let mut s = TcpStream::connect(front).await.unwrap();
    s.write_all(b"ka").await.unwrap();
    assert_eq!(
        read_n(&mut s, 2).await,
        b"ka",
        "the connection is up and stays open"
    );
    // The accepted client socket (inherited from the listening socket) shows a
    // keepalive timer of about 2 minutes; the backend socket sluice opened none yet.
    let client_side = one_established(&format!("( sport = :{} )", front.port()));
    assert!(
        keepalive_of_two_minutes(&client_side),
        "client: {client_side}"
    );
    let backend_side = one_established(&format!("( dport = :{} )", backend.addr.port()));
    assert!(
        !backend_side.contains("timer:(keepalive,"),
        "backend: {backend_side}"
    );
}

/// A backend that sends `payload` on every connection and half-closes.
async fn sending(payload: Vec<u8>) -> Backend {
    Backend::start(move |mut s: TcpStream| {
        let payload = payload.clone();
        async move {
            let _ = s.write_all(&payload).await;
            let _ = s.shutdown().await;
        }
    })
    .await
}

/// Sluice in front of a backend that sends `payload` and half-closes.
async fn sending_backend(relay: &str, payload: Vec<u8>) -> (Backend, Sluice) {
    let backend = sending(payload).await;
    let sluice = Sluice::start(Fixture::front(&[backend.addr]).table(relay)).await;
    (backend, sluice)
}

/// A client that reads only when told: what the kernel's buffers (about 128 KiB
/// each side before anything is read) cannot take waits in sluice, in a pipe or a
/// buffer. (With the receive buffer shrunk to 16 KiB after connect, 2 of 16 runs
/// stalled for 37 and 53 s, in either relay; zero-window probes backing off are the
/// likely cause.)
async fn slow_client(sluice: &Sluice) -> TcpStream {
    TcpStream::connect(sluice.addr("front")).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splice_parks_what_a_slow_reader_has_not_taken_in_a_pipe_and_delivers_it_all() {
    let payload = data(8 * MIB, 41);
    let expected = sha256(&payload);
    let (_backend, sluice) = sending_backend(RELAYS[1], payload).await;
    // Sluice's stdout and stderr, before any relay took a pipe.
    let baseline = sluice.open_pipes();
    let mut s = slow_client(&sluice).await;

    // The client reads nothing yet: the bytes sluice could not write wait in a pipe.
    eventually("a pipe holding the payload", async || {
        sluice.open_pipes() > baseline
    })
    .await;

    let mut got = Vec::new();
    tokio::time::timeout(STUCK, s.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.len(), 8 * MIB);
    assert_eq!(sha256(&got), expected);
    s.shutdown().await.unwrap();
    sluice
        .wait_log_where("the connection closed cleanly", |l| {
            l.contains("connection closed") && l.contains("reason=\"closed\"")
        })
        .await;
    // Emptied pipes stay pooled for the next connection (at most 16 per worker
    // thread, two descriptors each), never one per connection.
    assert!(
        sluice.open_pipes() <= baseline + 2 * 16 * 2,
        "{} pipes",
        sluice.open_pipes()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_buffered_relay_takes_no_pipe() {
    let payload = data(8 * MIB, 42);
    let expected = sha256(&payload);
    let (_backend, sluice) = sending_backend(RELAYS[2], payload).await;
    let baseline = sluice.open_pipes();
    let mut s = slow_client(&sluice).await;

    sluice
        .wait_metrics("bytes relayed toward the client", |m| {
            m.value(
                "sluice_bytes_total",
                &[("listener", "front"), ("direction", "backend_to_client")],
            ) > 0.0
        })
        .await;
    assert_eq!(
        sluice.open_pipes(),
        baseline,
        "no pipe while bytes are held"
    );

    let mut got = Vec::new();
    tokio::time::timeout(STUCK, s.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sha256(&got), expected);
    // A pipe taken at any point would still be open, in the pool.
    assert_eq!(sluice.open_pipes(), baseline);
}
