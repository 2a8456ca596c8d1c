//! Balancing algorithms, seen from clients of the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_honours_weights() {
    const N: usize = 2000;
    let (a, b) = (tagged(b'a').await, tagged(b'b').await);
    let sluice = Sluice::start(
        Fixture::front_weighted(&[(a.addr, 1), (b.addr, 3)]).upstream_keys("balance = \"random\""),
    )
    .await;
    let mut to_b = 0;
    for _ in 0..N {
        let (_s, tag) = connect_tagged(sluice.addr("front"), None).await;
        to_b += usize::from(tag == b'b');
    }
    // Binomial(2000, 0.75): mean 1500, standard deviation about 19.
    assert!(
        (1400..=1600).contains(&to_b),
        "{to_b} of {N} to the weight-3 backend"
    );
}

/// Opens connections one at a time and returns them with their backends' tags.
async fn open(sluice: &Sluice, n: usize) -> Vec<(tokio::net::TcpStream, u8)> {
    let mut held = Vec::new();
    for _ in 0..n {
        held.push(connect_tagged(sluice.addr("front"), None).await);
    }
    held
}

/// With some connections held on each backend, new ones go where fewer are open.
async fn prefers_the_emptier_backend(balance: &str) {
    let (a, b) = (tagged(b'a').await, tagged(b'b').await);
    let sluice = Sluice::start(
        Fixture::front_weighted(&[(a.addr, 1), (b.addr, 1)])
            .upstream_keys(&format!("balance = \"{balance}\"")),
    )
    .await;
    let mut held = open(&sluice, 10).await;
    let on_a = held.iter().filter(|(_, t)| *t == b'a').count();
    assert_eq!(on_a, 5, "ten held connections split evenly");

    // Close every connection on backend a; the next five all go to a.
    held.retain(|(_, t)| *t != b'a');
    sluice
        .wait_metrics("a's connections closed", |m| {
            m.value(
                "sluice_backend_connections_active",
                &[("backend", &a.addr.to_string())],
            ) == 0.0
        })
        .await;
    let next = open(&sluice, 5).await;
    assert!(
        next.iter().all(|(_, t)| *t == b'a'),
        "{:?}",
        next.iter().map(|(_, t)| *t as char).collect::<String>()
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_prefers_the_emptier_backend() {
    prefers_the_emptier_backend("least_connections").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_of_two_prefers_the_emptier_backend() {
    prefers_the_emptier_backend("power_of_two").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maglev_sends_each_client_address_to_the_same_backend() {
    let backends = [tagged(b'a').await, tagged(b'b').await, tagged(b'c').await];
    let list: Vec<_> = backends.iter().map(|b| (b.addr, 1)).collect();
    let sluice =
        Sluice::start(Fixture::front_weighted(&list).upstream_keys("balance = \"maglev\"")).await;
    let mut per_backend = [0usize; 3];
    for host in 2..=61u8 {
        let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, host));
        let (_s, first) = connect_tagged(sluice.addr("front"), Some(source)).await;
        for _ in 0..3 {
            let (_s, again) = connect_tagged(sluice.addr("front"), Some(source)).await;
            assert_eq!(again, first, "client {source} moved");
        }
        per_backend[usize::from(first - b'a')] += 1;
    }
    // 60 addresses over three equal backends: each gets a real share.
    assert!(per_backend.iter().all(|&n| n >= 8), "{per_backend:?}");
}
