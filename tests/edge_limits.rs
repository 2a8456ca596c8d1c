//! Who may connect, and how much: `allow`/`deny` by the client's real address (IPv4,
//! IPv6, through a trusted PROXY header), per-client connection caps and rates with
//! clients bound to many 127/8 source addresses, the client table's bound under 100,000
//! addresses, slow start after a backend recovers, the accept queue of a listener at
//! its cap, and a reload that changes every key.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Instant;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Connects to `to` from `source` (any address of 127/8, or ::1). A refused client is
/// reset at once, which can reach the connect itself.
async fn try_connect_from(source: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if to.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    socket.connect(to).await
}

/// [`try_connect_from`] for a client that is admitted.
async fn connect_from(source: IpAddr, to: SocketAddr) -> TcpStream {
    try_connect_from(source, to).await.unwrap()
}

/// A client at `source` is refused: reset, or closed without a byte.
async fn refused_from(source: IpAddr, to: SocketAddr) {
    match try_connect_from(source, to).await {
        Ok(s) => refused(s).await,
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
}

fn local(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

/// A payload through `s` and back from an echo backend, checked by hash; the
/// connection stays open.
async fn echoes(s: &mut TcpStream, seed: u64) {
    let payload = data(50_000, seed);
    let (mut r, mut w) = s.split();
    let send = async { w.write_all(&payload).await.unwrap() };
    let mut got = vec![0; payload.len()];
    let recv = async { r.read_exact(&mut got).await.unwrap() };
    tokio::time::timeout(STUCK, async { tokio::join!(send, recv) })
        .await
        .expect("the echo came back");
    assert_eq!(sha256(&got), sha256(&payload));
}

/// The connection is closed by sluice without a byte of the backend's.
async fn refused(mut s: TcpStream) {
    match until_closed(&mut s).await {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("{n} bytes from a refused connection"),
    }
}

fn rejected(m: &Metrics, reason: &str) -> f64 {
    m.value(
        "sluice_connections_rejected_total",
        &[("listener", "front"), ("reason", reason)],
    )
}

/// A PROXY v2 header for TCP over IPv4, built from the spec rather than by sluice.
fn v2(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(s), SocketAddr::V4(d)) = (source, destination) else {
        panic!("IPv4 only")
    };
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21);
    h.push(0x11);
    h.extend_from_slice(&12u16.to_be_bytes());
    h.extend_from_slice(&s.ip().octets());
    h.extend_from_slice(&d.ip().octets());
    h.extend_from_slice(&s.port().to_be_bytes());
    h.extend_from_slice(&d.port().to_be_bytes());
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_and_deny_decide_by_the_client_address_over_ipv4_and_ipv6() {
    let backend = Backend::echo().await;
    let config = Fixture::front(&[backend.addr])
        .bind(&["127.0.0.1:0", "[::1]:0"])
        .listener_keys("allow = [\"127.0.0.0/24\", \"::1/128\"]\ndeny = [\"127.0.0.9\"]");
    let sluice = Sluice::start(config).await;
    let [v4, v6] = sluice.addrs("front") else {
        panic!("two addresses")
    };
    let (v4, v6) = (*v4, *v6);

    let mut s = connect_from(local(2), v4).await;
    echoes(&mut s, 1).await;
    let mut v6_open = connect_from("::1".parse().unwrap(), v6).await;
    echoes(&mut v6_open, 2).await;
    // Denied wins over allowed; an address outside `allow` is denied.
    refused_from(local(9), v4).await;
    refused_from("127.0.1.5".parse().unwrap(), v4).await;
    let m = sluice
        .wait_metrics("two denied", |m| rejected(m, "denied") == 2.0)
        .await;
    assert_eq!(
        backend.accepted(),
        2,
        "no backend connection for a denied client"
    );
    assert_eq!(
        m.value("sluice_connections_active", &[("listener", "front")]),
        2.0,
        "the two admitted are open, the denied ones gone"
    );

    // A reload that denies ::1 applies to new connections.
    sluice.rewrite(
        Fixture::front(&[backend.addr])
            .bind(&["127.0.0.1:0", "[::1]:0"])
            .listener_keys("allow = [\"127.0.0.0/24\"]"),
    );
    sluice.wait_reloaded(1).await;
    let v6 = sluice.wait_listening("front", 1).await;
    refused_from("::1".parse().unwrap(), v6).await;
    sluice
        .wait_metrics("the IPv6 client denied", |m| rejected(m, "denied") == 3.0)
        .await;
    // Without close_denied_on_reload, its connection opened before flows on.
    echoes(&mut v6_open, 6).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_trusted_proxy_header_the_real_client_is_checked() {
    let backend = Backend::echo().await;
    let config = Fixture::front(&[backend.addr]).listener_keys(
        "proxy_protocol = { trusted = [\"127.0.0.1/32\"] }\ndeny = [\"203.0.113.0/24\"]\nmax_connections_per_client = 1",
    );
    let sluice = Sluice::start(config).await;
    let addr = sluice.addr("front");
    let dest: SocketAddr = "192.0.2.1:443".parse().unwrap();

    let mut denied = TcpStream::connect(addr).await.unwrap();
    denied
        .write_all(&v2("203.0.113.7:40001".parse().unwrap(), dest))
        .await
        .unwrap();
    refused(denied).await;

    // Two connections from the one trusted peer, for two clients: each has its own cap.
    let mut a = TcpStream::connect(addr).await.unwrap();
    a.write_all(&v2("198.51.100.9:40002".parse().unwrap(), dest))
        .await
        .unwrap();
    echoes(&mut a, 3).await;
    let mut b = TcpStream::connect(addr).await.unwrap();
    b.write_all(&v2("198.51.100.10:40003".parse().unwrap(), dest))
        .await
        .unwrap();
    echoes(&mut b, 4).await;
    // A second connection of 198.51.100.9 while its first is open: over its cap.
    let mut again = TcpStream::connect(addr).await.unwrap();
    again
        .write_all(&v2("198.51.100.9:40004".parse().unwrap(), dest))
        .await
        .unwrap();
    refused(again).await;
    let m = sluice
        .wait_metrics("one denied, one over its cap", |m| {
            rejected(m, "denied") == 1.0 && rejected(m, "client_limit") == 1.0
        })
        .await;
    assert_eq!(rejected(&m, "proxy_protocol"), 0.0);
    assert_eq!(backend.accepted(), 2);
}

/// One address holds thousands of sockets; it is capped, and clients from 198 other
/// addresses are served meanwhile. Their connect-to-first-byte p99 is printed (a figure
/// for the docs, not an assertion).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_over_its_cap_is_closed_while_clients_from_other_addresses_proceed() {
    const CAP: usize = 1000;
    const FLOOD: usize = 3000;
    let backend = tagged(7).await;
    let config = Fixture::front(&[backend.addr])
        .listener_keys(&format!("max_connections_per_client = {CAP}"));
    let sluice = Sluice::start(config).await;
    let addr = sluice.addr("front");

    let flooder = local(2);
    let mut held = Vec::new();
    let mut closed = 0;
    for _ in 0..FLOOD {
        let Ok(mut s) = try_connect_from(flooder, addr).await else {
            closed += 1;
            continue;
        };
        let mut tag = [0u8; 1];
        // Admitted: the backend's tag arrives. Refused: a reset (or EOF).
        match tokio::time::timeout(STUCK, s.read(&mut tag)).await.unwrap() {
            Ok(1) => held.push(s),
            Ok(_) | Err(_) => closed += 1,
        }
    }
    assert_eq!(held.len(), CAP, "the flooder's open connections are capped");
    assert_eq!(closed, FLOOD - CAP);

    let mut latencies = Vec::new();
    for n in 3..=200u8 {
        let started = Instant::now();
        let mut s = connect_from(local(n), addr).await;
        let tag = read_n(&mut s, 1).await;
        latencies.push(started.elapsed());
        assert_eq!(tag, [7]);
        echoes(&mut s, u64::from(n)).await;
    }
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100 - 1];
    eprintln!(
        "FIGURE other clients' connect-to-first-byte with one address holding {} sockets ({CAP} admitted): p50 {:?}, p99 {:?}, max {:?}",
        FLOOD,
        latencies[latencies.len() / 2],
        p99,
        latencies.last().unwrap()
    );
    let m = sluice
        .wait_metrics("the flooder's extra connections counted", |m| {
            rejected(m, "client_limit") == (FLOOD - CAP) as f64
        })
        .await;
    assert_eq!(
        m.value("sluice_connections_active", &[("listener", "front")]),
        CAP as f64
    );
    drop(held);
    // Its slots come back: the flooder is admitted again.
    sluice
        .wait_metrics("the flooder's connections closed", |m| {
            m.value("sluice_connections_active", &[("listener", "front")]) == 0.0
        })
        .await;
    let mut s = connect_from(flooder, addr).await;
    assert_eq!(read_n(&mut s, 1).await, [7]);
}

/// A client reconnecting in a tight loop gets `burst` connections, then the rate; a
/// client at another address is not held back. The refused attempts per second are
/// printed (the reconnect-storm figure).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_holds_a_reconnect_loop() {
    const ATTEMPTS: usize = 400;
    let backend = tagged(3).await;
    let config = Fixture::front(&[backend.addr])
        .listener_keys("client_rate = { per_second = 5, burst = 10 }");
    let sluice = Sluice::start(config).await;
    let addr = sluice.addr("front");

    let started = Instant::now();
    let mut admitted = 0;
    for i in 0..ATTEMPTS {
        if let Ok(mut s) = try_connect_from(local(2), addr).await {
            let mut tag = [0u8; 1];
            if let Ok(Ok(1)) = tokio::time::timeout(STUCK, s.read(&mut tag)).await {
                admitted += 1;
            }
        }
        if i == ATTEMPTS / 2 {
            // Meanwhile, another address is served at once.
            let (_other, tag) = connect_tagged(addr, Some(local(3))).await;
            assert_eq!(tag, 3);
        }
    }
    let elapsed = started.elapsed();
    // The bucket: 10 at once, then 5 a second (an upper bound whatever the pace).
    let most = 10 + (elapsed.as_secs_f64() * 5.0).ceil() as usize + 1;
    assert!(
        (10..=most).contains(&admitted),
        "{admitted} of {ATTEMPTS} admitted in {elapsed:?}"
    );
    eprintln!(
        "FIGURE reconnect storm from one address: {ATTEMPTS} attempts in {elapsed:?} ({:.0}/s), {admitted} admitted, the rest refused (client_rate)",
        ATTEMPTS as f64 / elapsed.as_secs_f64()
    );
    sluice
        .wait_metrics("every refused attempt counted", |m| {
            rejected(m, "client_rate") == (ATTEMPTS - admitted) as f64
        })
        .await;
}

/// 100,000 client addresses, each named by a PROXY v2 header from the trusted loopback
/// peer: the table stays at its bound, evictions are counted, and sluice's memory is
/// printed before and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_table_stays_bounded_under_100000_client_addresses() {
    const CLIENTS: u32 = 100_000;
    const TABLE: usize = 1000;
    const PARALLEL: u32 = 32;
    // A backend that closes each connection at once: each client is admitted, counted,
    // and gone.
    let closing = Backend::start(|s: TcpStream| async move { drop(s) }).await;
    let config = Fixture::front(&[closing.addr])
        .listener_keys(&format!(
            "proxy_protocol = {{ trusted = [\"127.0.0.1/32\"] }}\nclient_rate = {{ per_second = 0.001, burst = 5 }}\nclient_table_size = {TABLE}"
        ));
    let sluice = Sluice::start(config).await;
    let addr = sluice.addr("front");
    let dest: SocketAddr = "192.0.2.1:443".parse().unwrap();

    let run = |from: u32, to: u32| async move {
        let tasks: Vec<_> = (0..PARALLEL)
            .map(|t| {
                tokio::spawn(async move {
                    let mut n = from + t;
                    while n < to {
                        let source = SocketAddr::from((Ipv4Addr::from(0x0a00_0000 + n), 40000));
                        let mut s = TcpStream::connect(addr).await.unwrap();
                        s.write_all(&v2(source, dest)).await.unwrap();
                        let _ = until_closed(&mut s).await;
                        n += PARALLEL;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    };
    run(0, 10_000).await;
    let entries = |m: &Metrics| m.value("sluice_client_table_entries", &[("listener", "front")]);
    let done = |n: f64| {
        move |m: &Metrics| {
            m.value("sluice_connections_accepted_total", &[]) == n
                && m.value("sluice_connections_active", &[]) == 0.0
        }
    };
    let m = sluice
        .wait_metrics("10,000 clients served", done(10_000.0))
        .await;
    let rss_early = sluice.rss_kib();
    assert!(entries(&m) <= (TABLE + 64) as f64, "{}", entries(&m));
    run(10_000, CLIENTS).await;
    let m = sluice
        .wait_metrics("100,000 clients served", done(f64::from(CLIENTS)))
        .await;
    assert_eq!(
        closing.accepted(),
        CLIENTS as usize,
        "every client reached the backend"
    );
    let rss_late = sluice.rss_kib();
    let evictions = m.value(
        "sluice_client_table_evictions_total",
        &[("listener", "front")],
    );
    assert!(entries(&m) <= (TABLE + 64) as f64, "{}", entries(&m));
    assert!(
        evictions >= f64::from(CLIENTS) - (TABLE + 64) as f64,
        "{evictions} evictions"
    );
    eprintln!(
        "FIGURE client table under {CLIENTS} addresses (size {TABLE}): {} entries, {evictions} evictions; RSS {rss_early} KiB after 10,000, {rss_late} KiB after {CLIENTS}",
        entries(&m)
    );
}

/// Slow start: a backend that comes back up gets a small share of new connections,
/// then its full share once the ramp is over; at start there is no ramp.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_start_ramps_a_backend_that_recovers() {
    let a = tagged(1).await;
    let b = refusing();
    let upstream = |slow_start: &str| {
        Fixture::front_weighted(&[(a.addr, 1), (b.addr, 1)])
            .upstream_keys(&format!(
                "balance = \"least_connections\"\nslow_start = \"{slow_start}\"\nretries = 1"
            ))
            .upstream_table(
                "health_check",
                "interval = \"100ms\"\ntimeout = \"100ms\"\nrise = 1\nfall = 1",
            )
    };
    let sluice = Sluice::start(upstream("10m")).await;
    let addr = sluice.addr("front");
    let weight = |m: &Metrics, backend: SocketAddr| {
        m.value(
            "sluice_backend_effective_weight",
            &[("backend", &backend.to_string())],
        )
    };
    let m = sluice.metrics().await;
    assert_eq!(weight(&m, a.addr), 1.0, "no ramp at start");
    let up = |backend: SocketAddr| {
        move |m: &Metrics| m.value("sluice_backend_up", &[("backend", &backend.to_string())]) == 1.0
    };
    sluice.wait_metrics("b down", |m| !up(b.addr)(m)).await;

    b.listen_and_tag(2);
    let m = sluice.wait_metrics("b up", up(b.addr)).await;
    let ramp = weight(&m, b.addr);
    assert!(ramp < 0.2, "b ramps from 10% over 10 minutes: {ramp}");
    let open = |n: usize| async move {
        let mut held = Vec::new();
        let mut on_b = 0;
        for _ in 0..n {
            let (s, tag) = connect_tagged(addr, None).await;
            on_b += usize::from(tag == 2);
            held.push(s);
        }
        (held, on_b)
    };
    // Least connections keeps b near its ramped share of the open connections.
    let (held, on_b) = open(100).await;
    assert!(
        (1..=20).contains(&on_b),
        "{on_b} of 100 on b early in its ramp"
    );
    eprintln!(
        "FIGURE slow start: {on_b} of 100 connections on the recovering backend at weight {ramp}"
    );
    drop(held);

    // A reload that shortens the window ends the ramp: b's full share.
    sluice.rewrite(upstream("1s"));
    sluice.wait_reloaded(1).await;
    sluice
        .wait_metrics("b at full weight", |m| weight(m, b.addr) == 1.0)
        .await;
    sluice
        .wait_metrics("the first 100 closed", |m| {
            m.value("sluice_connections_active", &[("listener", "front")]) == 0.0
        })
        .await;
    let (_held, on_b) = open(100).await;
    assert!(
        (45..=55).contains(&on_b),
        "{on_b} of 100 on b after its ramp"
    );
}

/// A client over `max_connections` waits in the kernel's accept queue: the queue's
/// length and limit are exported, and so is the time the listener spent at its cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_held_back_at_the_cap_are_visible() {
    let backend = tagged(5).await;
    let config = Fixture::front(&[backend.addr]).listener_keys("max_connections = 1\nbacklog = 16");
    let sluice = Sluice::with(config).per_core(2).start().await;
    let addr = sluice.addr("front");
    let (first, _) = connect_tagged(addr, None).await;
    let mut waiting = Vec::new();
    for n in 2..5 {
        waiting.push(connect_from(local(n), addr).await);
    }
    wait_accept_queue(addr, 3).await;
    let queue = |m: &Metrics| m.value("sluice_listener_accept_queue", &[("listener", "front")]);
    let at_cap = |m: &Metrics| {
        m.value(
            "sluice_listener_at_cap_seconds_total",
            &[("listener", "front")],
        )
    };
    let m = sluice
        .wait_metrics("3 clients in the accept queue", |m| queue(m) == 3.0)
        .await;
    let limit = m.value(
        "sluice_listener_accept_queue_limit",
        &[("listener", "front")],
    );
    assert_eq!(limit, 32.0, "backlog 16 on each of 2 sockets");
    let before = at_cap(&m);
    assert!(before > 0.0, "at its cap since the first client");
    sluice
        .wait_metrics("time at the cap growing", |m| at_cap(m) > before)
        .await;
    drop(first);
    // One at a time the waiting clients are accepted and served, in whichever order
    // the sockets' queues give them up: each closes once served, freeing the slot.
    let served: Vec<_> = waiting
        .into_iter()
        .map(|mut s| tokio::spawn(async move { read_n(&mut s, 1).await }))
        .collect();
    for s in served {
        assert_eq!(s.await.unwrap(), [5]);
    }
    let m = sluice
        .wait_metrics("the queue empty", |m| queue(m) == 0.0)
        .await;
    assert_eq!(rejected(&m, "client_limit"), 0.0);
}

/// One reload changes every key of this issue, and each takes effect; with
/// `close_denied_on_reload`, the open connection of a client the new lists deny is
/// closed while the others keep flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_every_key() {
    let backend = Backend::echo().await;
    let before = Fixture::front(&[backend.addr]).listener_keys(
        "allow = [\"127.0.0.0/8\"]\nclose_denied_on_reload = true\nmax_connections_per_client = 5\nclient_rate = { per_second = 100, burst = 100 }\nclient_ipv4_prefix = 32\nclient_ipv6_prefix = 64\nclient_table_size = 100",
    );
    let sluice = Sluice::start(before).await;
    let addr = sluice.addr("front");
    let mut kept = connect_from(local(2), addr).await;
    let mut doomed = connect_from(local(5), addr).await;
    echoes(&mut kept, 1).await;
    echoes(&mut doomed, 2).await;

    let after = Fixture::front(&[backend.addr])
        .upstream_keys("slow_start = \"30s\"")
        .listener_keys(
            "allow = [\"127.0.0.0/24\"]\ndeny = [\"127.0.0.5\"]\nclose_denied_on_reload = true\nmax_connections_per_client = 1\nclient_rate = { per_second = 0.01, burst = 2 }\nclient_ipv4_prefix = 24\nclient_ipv6_prefix = 48\nclient_table_size = 10",
        );
    sluice.rewrite(after);
    sluice.wait_reloaded(1).await;
    // The new deny closes the open connection of 127.0.0.5; 127.0.0.2's flows on.
    refused(doomed).await;
    echoes(&mut kept, 3).await;
    // The new allow: 127.0.1.1 is outside it.
    refused_from("127.0.1.1".parse().unwrap(), addr).await;
    // Clients by /24 now, one connection each: 127.0.0.3 and .4 are one client. (The
    // connection of 127.0.0.2 was counted under its /32 when it was accepted.)
    let mut first = connect_from(local(3), addr).await;
    echoes(&mut first, 4).await;
    refused_from(local(4), addr).await;
    drop(first);
    sluice
        .wait_metrics("only the kept connection open", |m| {
            m.value("sluice_connections_active", &[("listener", "front")]) == 1.0
        })
        .await;
    // The bucket of 2 had one token left; the next is 100 s away.
    let mut second = connect_from(local(6), addr).await;
    echoes(&mut second, 5).await;
    drop(second);
    sluice
        .wait_metrics("that one closed too", |m| {
            m.value("sluice_connections_active", &[("listener", "front")]) == 1.0
        })
        .await;
    refused_from(local(7), addr).await;
    let m = sluice
        .wait_metrics("each refusal under its reason", |m| {
            rejected(m, "denied") == 1.0
                && rejected(m, "client_limit") == 1.0
                && rejected(m, "client_rate") == 1.0
        })
        .await;
    assert_eq!(
        m.value(
            "sluice_connections_accepted_total",
            &[("listener", "front")]
        ),
        7.0
    );
    let (_, config) = sluice.get("/config").await;
    for key in [
        "\"close_denied_on_reload\": true",
        "\"ipv4_prefix\": 24",
        "\"ipv6_prefix\": 48",
        "\"table_size\": 10",
        "\"burst\": 2",
        "\"slow_start\": \"30s\"",
        "\"127.0.0.5/32\"",
    ] {
        assert!(config.contains(key), "{key} in /config:\n{config}");
    }
}
