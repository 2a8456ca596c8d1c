//! Backends by name, against a real DNS server (dnsmasq on a loopback port): A/AAAA and
//! SRV answers become endpoints; a change of answers goes through the reload pipeline
//! (identity, carry, retire, checks); failures keep the last good set; NXDOMAIN empties
//! it only after `hold`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `[resolver]` pointed at `dns`, re-resolving quickly, with `hold`.
fn resolver(dns: &Dns, hold: &str) -> String {
    format!(
        "[resolver]\nnameservers = [\"{}\"]\ntimeout = \"500ms\"\nattempts = 1\nmin_interval = \"100ms\"\nmax_interval = \"1s\"\nhold = \"{hold}\"",
        dns.addr
    )
}

/// Listener `front` before upstream `app` whose one backend entry is `name` (host:port),
/// with `keys` (more upstream keys) and the `[resolver]` table `resolver`.
fn by_name(resolver: &str, name: &str, keys: &str) -> Fixture {
    Fixture::new()
        .table(resolver)
        .listener("front")
        .upstream("app")
        .upstream_keys(&format!("backend = [{{ address = \"{name}\" }}]"))
        .upstream_keys(keys)
}

/// Backends tagged with the last byte of their IP, one on each of `ips`, all on one port
/// (a name's addresses share the entry's port).
async fn on_one_port(ips: &[&str]) -> (u16, Vec<Backend>) {
    'again: loop {
        let first = Backend::start_on(&format!("{}:0", ips[0]), tag_echo(ips[0])).await;
        let port = first.addr.port();
        let mut all = vec![first];
        for ip in &ips[1..] {
            let addr = format!("{ip}:{port}");
            if std::net::TcpListener::bind(&addr).is_err() {
                continue 'again;
            }
            all.push(Backend::start_on(&addr, tag_echo(ip)).await);
        }
        return (port, all);
    }
}

/// Serves each connection by sending its tag byte, then echoing.
fn tag_echo(
    ip: &str,
) -> impl Fn(TcpStream) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
+ Send
+ Sync
+ 'static {
    let tag = tag_of(ip);
    move |mut s: TcpStream| {
        Box::pin(async move {
            if s.write_all(&[tag]).await.is_ok() {
                echo(s).await;
            }
        })
    }
}

fn tag_of(ip: &str) -> u8 {
    match ip.parse::<IpAddr>().unwrap() {
        IpAddr::V4(v4) => v4.octets()[3],
        IpAddr::V6(v6) => v6.octets()[15],
    }
}

/// One client: connects, reads the backend's tag, sends `len` bytes and checks that the
/// same bytes come back (length and hash). `Err` says what went wrong.
async fn client(addr: SocketAddr, len: usize, seed: u64) -> Result<u8, String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let mut tag = [0u8; 1];
    match tokio::time::timeout(STUCK, s.read_exact(&mut tag)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(format!("no tag: {e}")),
        Err(_) => return Err("no tag in time".to_string()),
    }
    let sent = data(len, seed);
    let got = exchange_on(&mut s, &sent).await;
    if got.len() != sent.len() || sha256(&got) != sha256(&sent) {
        return Err(format!(
            "{} bytes back of {}, hashes differ",
            got.len(),
            sent.len()
        ));
    }
    Ok(tag[0])
}

/// The tags `n` clients in a row reached.
async fn tags(addr: SocketAddr, n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(client(addr, 1024, i as u64).await.unwrap());
    }
    out
}

/// Waits until `n` clients in a row reach only backends tagged in `want`, and each
/// of them at least once.
async fn reach_exactly(addr: SocketAddr, want: &[u8], n: usize) {
    let want: HashSet<u8> = want.iter().copied().collect();
    eventually(&format!("clients to reach exactly {want:?}"), async || {
        let seen: HashSet<u8> = tags(addr, n).await.into_iter().collect();
        if seen == want {
            Ok(())
        } else {
            Err(format!("{seen:?}"))
        }
    })
    .await;
}

/// A client refused for want of a backend: closed without a tag.
async fn refused(addr: SocketAddr) -> bool {
    client(addr, 16, 0).await.is_err()
}

#[tokio::test]
async fn every_address_of_a_name_is_an_endpoint_with_data_intact() {
    let (port, _b) = on_one_port(&["127.0.0.2", "127.0.0.3"]).await;
    let dns = Dns::start(&["127.0.0.2 web.test", "127.0.0.3 web.test"], &[], 60).await;
    let sluice = Sluice::start(by_name(
        &resolver(&dns, "30s"),
        &format!("web.test:{port}"),
        "",
    ))
    .await;
    let front = sluice.addr("front");
    reach_exactly(front, &[2, 3], 8).await;
    // Bigger payloads, byte-exact.
    for i in 0..4 {
        client(front, 256 * 1024, 100 + i).await.unwrap();
    }
    let m = sluice.metrics().await;
    let name = format!("web.test:{port}");
    let labels = [("upstream", "app"), ("name", name.as_str())];
    assert_eq!(m.value("sluice_discovery_endpoints", &labels), 2.0);
    assert!(m.value("sluice_discovery_last_success_timestamp_seconds", &labels) > 0.0);
    assert_eq!(
        m.value("sluice_discovery_failing_since_timestamp_seconds", &labels),
        0.0
    );
    // /config shows the name with its addresses and their TTL.
    let (code, body) = sluice.get("/config").await;
    assert_eq!(code, 200);
    let config: serde_json::Value = serde_json::from_str(&body).unwrap();
    let names = config["discovery"].as_array().unwrap();
    assert_eq!(names.len(), 1, "{body}");
    assert_eq!(names[0]["name"], name.as_str());
    let endpoints: Vec<(String, u64)> = names[0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["address"].as_str().unwrap().to_string(),
                e["ttl"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        endpoints,
        vec![
            (format!("127.0.0.2:{port}"), 60),
            (format!("127.0.0.3:{port}"), 60)
        ]
    );
    let backends = config["config"]["upstreams"][0]["backends"]
        .as_array()
        .unwrap();
    assert!(
        backends.iter().all(|b| b["entry"] == name.as_str()),
        "{body}"
    );
}

/// Clients connecting without pause, each checked end to end; counts what they saw.
struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Result<usize, String>>>,
    seen: Arc<Mutex<BTreeMap<u8, usize>>>,
}

impl Load {
    fn start(addr: SocketAddr, workers: usize) -> Load {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(BTreeMap::new()));
        let tasks = (0..workers)
            .map(|w| {
                let (stop, seen) = (Arc::clone(&stop), Arc::clone(&seen));
                tokio::spawn(async move {
                    // Bounded: at most 5,000 clients per worker.
                    for n in 0..5_000u64 {
                        if stop.load(Ordering::Relaxed) {
                            return Ok(n as usize);
                        }
                        let tag = client(addr, 8 * 1024, w as u64 * 100_000 + n)
                            .await
                            .map_err(|e| format!("client {n} of worker {w}: {e}"))?;
                        *seen.lock().unwrap().entry(tag).or_default() += 1;
                    }
                    Ok(5_000)
                })
            })
            .collect();
        Load { stop, tasks, seen }
    }

    /// How many clients reached `tag` so far.
    fn reached(&self, tag: u8) -> usize {
        self.seen.lock().unwrap().get(&tag).copied().unwrap_or(0)
    }

    async fn stop(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = 0;
        for t in self.tasks {
            total += t.await.unwrap().unwrap();
        }
        total
    }
}

#[tokio::test]
async fn addresses_added_removed_and_changed_under_load_fail_no_client() {
    let (port, _b) = on_one_port(&["127.0.0.2", "127.0.0.3", "127.0.0.4"]).await;
    let dns = Dns::start(&["127.0.0.2 web.test"], &[], 1).await;
    let sluice = Sluice::start(by_name(
        &resolver(&dns, "30s"),
        &format!("web.test:{port}"),
        "",
    ))
    .await;
    let front = sluice.addr("front");
    let load = Load::start(front, 4);
    eventually("the load to reach .2", async || load.reached(2) > 0).await;

    // Added.
    dns.hosts(
        &["127.0.0.2 web.test", "127.0.0.3 web.test"],
        "web.test",
        Some("127.0.0.3"),
    )
    .await;
    sluice
        .wait_log(&format!("endpoint 127.0.0.3:{port} of app added (dns)"))
        .await;
    eventually("the load to reach .3", async || load.reached(3) > 0).await;

    // Changed: .2 and .3 replaced by .4.
    dns.hosts(&["127.0.0.4 web.test"], "web.test", Some("127.0.0.4"))
        .await;
    sluice
        .wait_log(&format!("endpoint 127.0.0.2:{port} of app removed (dns)"))
        .await;
    sluice
        .wait_log(&format!("endpoint 127.0.0.3:{port} of app removed (dns)"))
        .await;
    // The line is logged once the new snapshot is in force: from then on only a client
    // accepted before it (one per worker at most) can still reach .2 or .3.
    let removed_at = load.reached(2) + load.reached(3);
    eventually("the load to reach .4", async || load.reached(4) > 0).await;
    let after_change = load.reached(4);
    eventually("more clients to reach .4", async || {
        load.reached(4) >= after_change + 20
    })
    .await;
    let late = load.reached(2) + load.reached(3) - removed_at;
    let total = load.stop().await;
    assert!(total > 0);
    assert!(
        late <= 4,
        "{late} clients reached a removed endpoint after its removal"
    );
    assert_eq!(tags(front, 10).await, vec![4; 10]);
    let m = sluice.metrics().await;
    assert_eq!(
        m.value("sluice_connections_rejected_total", &[]),
        0.0,
        "{m}"
    );
}

#[tokio::test]
async fn srv_records_give_endpoints_by_priority_then_weight() {
    let a = Backend::start(move |s| tag_echo("0.0.0.1")(s)).await;
    let b = Backend::start(move |s| tag_echo("0.0.0.2")(s)).await;
    let c = Backend::start(move |s| tag_echo("0.0.0.3")(s)).await;
    let srv = [
        format!("_app._tcp.svc.test,a.test,{},10,3", a.addr.port()),
        format!("_app._tcp.svc.test,b.test,{},10,1", b.addr.port()),
        format!("_app._tcp.svc.test,c.test,{},20,1", c.addr.port()),
    ];
    let srv: Vec<&str> = srv.iter().map(String::as_str).collect();
    let dns = Dns::start(&["127.0.0.1 a.test b.test c.test"], &srv, 60).await;
    let config = Fixture::new()
        .table(&resolver(&dns, "30s"))
        .listener("front")
        .upstream("app")
        .upstream_keys("discover = { srv = \"_app._tcp.svc.test\" }");
    let sluice = Sluice::start(config).await;
    let front = sluice.addr("front");
    // Round robin over priority 10 only, 3 : 1 by the SRV weights: ten whole cycles.
    let seen = tags(front, 40).await;
    let count = |t: u8| seen.iter().filter(|&&x| x == t).count();
    assert_eq!((count(1), count(2), count(3)), (30, 10, 0), "{seen:?}");

    // Priority 10 gone: clients fail over to priority 20, none is refused.
    let gone = (a.addr, b.addr);
    drop((a, b));
    until_refused(gone.0).await;
    until_refused(gone.1).await;
    for seed in 0..10 {
        assert_eq!(client(front, 4096, seed).await, Ok(3));
    }
    let m = sluice.metrics().await;
    assert_eq!(
        m.value("sluice_connections_rejected_total", &[]),
        0.0,
        "{m}"
    );
}

#[tokio::test]
async fn a_long_ttl_is_not_re_resolved_per_connection() {
    let (port, _b) = on_one_port(&["127.0.0.2"]).await;
    let dns = Dns::start(&["127.0.0.2 web.test"], &[], 3600).await;
    let table = resolver(&dns, "30s").replace("max_interval = \"1s\"", "max_interval = \"1h\"");
    let sluice = Sluice::start(by_name(&table, &format!("web.test:{port}"), "")).await;
    let front = sluice.addr("front");
    assert_eq!(tags(front, 50).await, vec![2; 50]);
    let m = sluice.metrics().await;
    assert_eq!(
        m.value("sluice_discovery_resolutions_total", &[("result", "ok")]),
        1.0,
        "one resolution at start, none per connection: {m}"
    );
}

#[tokio::test]
async fn a_short_ttl_is_followed_and_max_interval_bounds_a_long_one() {
    let (port, _b) = on_one_port(&["127.0.0.2", "127.0.0.3"]).await;
    // TTL 1 s with max_interval 1 h: the TTL is what brings the change.
    let short = Dns::start(&["127.0.0.2 web.test"], &[], 1).await;
    let table = resolver(&short, "30s").replace("max_interval = \"1s\"", "max_interval = \"1h\"");
    let by_ttl = Sluice::start(by_name(&table, &format!("web.test:{port}"), "")).await;
    // TTL 1 h with max_interval 1 s: the bound is.
    let long = Dns::start(&["127.0.0.2 web.test"], &[], 3600).await;
    let by_bound = Sluice::start(by_name(
        &resolver(&long, "30s"),
        &format!("web.test:{port}"),
        "",
    ))
    .await;
    assert_eq!(tags(by_ttl.addr("front"), 3).await, vec![2; 3]);
    assert_eq!(tags(by_bound.addr("front"), 3).await, vec![2; 3]);
    short
        .hosts(&["127.0.0.3 web.test"], "web.test", Some("127.0.0.3"))
        .await;
    long.hosts(&["127.0.0.3 web.test"], "web.test", Some("127.0.0.3"))
        .await;
    reach_exactly(by_ttl.addr("front"), &[3], 4).await;
    reach_exactly(by_bound.addr("front"), &[3], 4).await;
}

#[tokio::test]
async fn a_stopped_nameserver_keeps_the_last_good_set_and_recovery_applies_new_answers() {
    let (port, _b) = on_one_port(&["127.0.0.2", "127.0.0.3"]).await;
    let mut dns = Dns::start(&["127.0.0.2 web.test"], &[], 1).await;
    let sluice = Sluice::start(by_name(
        &resolver(&dns, "1s"),
        &format!("web.test:{port}"),
        "",
    ))
    .await;
    let front = sluice.addr("front");
    assert_eq!(tags(front, 3).await, vec![2; 3]);
    dns.stop();
    let name = format!("web.test:{port}");
    let labels = [("upstream", "app"), ("name", name.as_str())];
    sluice
        .wait_metrics("three failed resolutions", |m| {
            m.value("sluice_discovery_resolutions_total", &[("result", "error")]) >= 3.0
        })
        .await;
    // Longer than hold, and still the last good set: failures are not NXDOMAIN.
    assert_eq!(tags(front, 5).await, vec![2; 5]);
    let m = sluice.metrics().await;
    assert!(
        m.value("sluice_discovery_failing_since_timestamp_seconds", &labels) > 0.0,
        "{m}"
    );
    assert_eq!(m.value("sluice_discovery_endpoints", &labels), 1.0);
    let warned = sluice
        .log()
        .iter()
        .filter(|l| l.contains("cannot resolve backend name"))
        .count();
    assert_eq!(
        warned,
        1,
        "logged once per state change: {:?}",
        sluice.log()
    );

    // Back, with a new answer.
    dns.write_hosts(&["127.0.0.3 web.test"]);
    dns.restart().await;
    sluice.wait_log("backend name resolves again").await;
    reach_exactly(front, &[3], 4).await;
    sluice
        .wait_metrics("failing_since back to 0", |m| {
            m.value("sluice_discovery_failing_since_timestamp_seconds", &labels) == 0.0
        })
        .await;
}

#[tokio::test]
async fn nxdomain_shorter_than_hold_keeps_the_endpoints() {
    let (port, _b) = on_one_port(&["127.0.0.2"]).await;
    let dns = Dns::start(&["127.0.0.2 web.test"], &[], 1).await;
    let sluice = Sluice::start(by_name(
        &resolver(&dns, "1h"),
        &format!("web.test:{port}"),
        "",
    ))
    .await;
    let front = sluice.addr("front");
    assert_eq!(tags(front, 2).await, vec![2; 2]);
    dns.hosts(&["127.0.0.9 other.test"], "web.test", None).await;
    sluice
        .wait_metrics("three empty answers", |m| {
            m.value("sluice_discovery_resolutions_total", &[("result", "empty")]) >= 3.0
        })
        .await;
    assert_eq!(tags(front, 3).await, vec![2; 3]);
    dns.hosts(&["127.0.0.2 web.test"], "web.test", Some("127.0.0.2"))
        .await;
    sluice.wait_log("backend name resolves again").await;
    assert_eq!(tags(front, 3).await, vec![2; 3]);
    assert!(
        !sluice.log().iter().any(|l| l.contains("removed (dns)")),
        "{:?}",
        sluice.log()
    );
}

#[tokio::test]
async fn nxdomain_longer_than_hold_empties_the_upstream_until_the_name_is_back() {
    let (port, _b) = on_one_port(&["127.0.0.2"]).await;
    let dns = Dns::start(&["127.0.0.2 web.test"], &[], 1).await;
    let sluice = Sluice::start(by_name(
        &resolver(&dns, "1s"),
        &format!("web.test:{port}"),
        "",
    ))
    .await;
    let front = sluice.addr("front");
    assert_eq!(tags(front, 2).await, vec![2; 2]);
    dns.hosts(&["127.0.0.9 other.test"], "web.test", None).await;
    sluice
        .wait_log(&format!("endpoint 127.0.0.2:{port} of app removed (dns)"))
        .await;
    assert!(refused(front).await);
    sluice
        .wait_metrics("a refused client counted", |m| {
            m.value(
                "sluice_connections_rejected_total",
                &[("reason", "no_healthy_backend")],
            ) >= 1.0
        })
        .await;
    dns.hosts(&["127.0.0.2 web.test"], "web.test", Some("127.0.0.2"))
        .await;
    sluice
        .wait_log(&format!("endpoint 127.0.0.2:{port} of app added (dns)"))
        .await;
    reach_exactly(front, &[2], 3).await;
}

#[tokio::test]
async fn a_name_that_resolves_only_after_start() {
    let (port, _b) = on_one_port(&["127.0.0.2"]).await;
    let dns = Dns::start(&["127.0.0.9 other.test"], &[], 1).await;
    let sluice = Sluice::start(by_name(
        &resolver(&dns, "1s"),
        &format!("web.test:{port}"),
        "",
    ))
    .await;
    let front = sluice.addr("front");
    let (code, _) = sluice.get("/readyz").await;
    assert_eq!(code, 200, "sluice is up, the upstream is not");
    assert!(refused(front).await);
    dns.hosts(&["127.0.0.2 web.test"], "web.test", Some("127.0.0.2"))
        .await;
    sluice
        .wait_log(&format!("endpoint 127.0.0.2:{port} of app added (dns)"))
        .await;
    reach_exactly(front, &[2], 3).await;
}

#[tokio::test]
async fn ipv6_answers_are_endpoints() {
    let b = Backend::start_on("[::1]:0", tag_echo("::1")).await;
    let dns = Dns::start(&["::1 six.test"], &[], 60).await;
    let sluice = Sluice::start(by_name(
        &resolver(&dns, "30s"),
        &format!("six.test:{}", b.addr.port()),
        "",
    ))
    .await;
    assert_eq!(client(sluice.addr("front"), 64 * 1024, 7).await, Ok(1));
    let (_, body) = sluice.get("/config").await;
    assert!(body.contains(&format!("[::1]:{}", b.addr.port())), "{body}");
}

#[tokio::test]
async fn health_and_open_connections_are_carried_across_a_re_resolution() {
    let (port, _b) = on_one_port(&["127.0.0.2", "127.0.0.3"]).await;
    let dns = Dns::start(&["127.0.0.2 web.test"], &[], 1).await;
    let checks = "health_check = { interval = \"200ms\", timeout = \"100ms\", rise = 2, fall = 2 }";
    let sluice = Sluice::start(by_name(
        &resolver(&dns, "30s"),
        &format!("web.test:{port}"),
        checks,
    ))
    .await;
    let front = sluice.addr("front");
    let two = format!("127.0.0.2:{port}");
    let three = format!("127.0.0.3:{port}");
    sluice
        .wait_metrics(".2 checked twice", |m| {
            m.value("sluice_health_checks_total", &[("backend", two.as_str())]) >= 2.0
        })
        .await;
    // A connection held open across the change.
    let mut held = TcpStream::connect(front).await.unwrap();
    assert_eq!(read_n(&mut held, 1).await, vec![2]);
    let checks_before = sluice
        .metrics()
        .await
        .value("sluice_health_checks_total", &[("backend", two.as_str())]);

    dns.hosts(
        &["127.0.0.2 web.test", "127.0.0.3 web.test"],
        "web.test",
        Some("127.0.0.3"),
    )
    .await;
    sluice
        .wait_log(&format!("endpoint {three} of app added (dns)"))
        .await;
    // The new endpoint starts down, as checks dictate, and comes up after `rise` passes.
    sluice
        .wait_metrics(".3 up after its checks", |m| {
            m.value("sluice_backend_up", &[("backend", three.as_str())]) == 1.0
                && m.value("sluice_health_checks_total", &[("backend", three.as_str())]) >= 2.0
        })
        .await;
    let m = sluice.metrics().await;
    // .2 kept its check task (its count went on, not from 0) and its open connection.
    assert!(m.value("sluice_health_checks_total", &[("backend", two.as_str())]) >= checks_before);
    assert_eq!(
        m.value(
            "sluice_backend_connections_active",
            &[("backend", two.as_str())]
        ),
        1.0,
        "{m}"
    );
    let sent = data(32 * 1024, 9);
    assert_eq!(exchange_on(&mut held, &sent).await, sent);
    reach_exactly(front, &[2, 3], 8).await;
}

#[tokio::test]
async fn two_sluices_agree_on_maglev_picks() {
    let ips = [
        "127.0.0.2",
        "127.0.0.3",
        "127.0.0.4",
        "127.0.0.5",
        "127.0.0.6",
    ];
    let (port, _b) = on_one_port(&ips).await;
    // Each dnsmasq lists the addresses in its own file order.
    let one = Dns::start(
        &ips.map(|ip| format!("{ip} web.test"))
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        &[],
        60,
    )
    .await;
    let reversed: Vec<String> = ips
        .iter()
        .rev()
        .map(|ip| format!("{ip} web.test"))
        .collect();
    let two = Dns::start(
        &reversed.iter().map(String::as_str).collect::<Vec<_>>(),
        &[],
        60,
    )
    .await;
    let name = format!("web.test:{port}");
    let a = Sluice::start(by_name(
        &resolver(&one, "30s"),
        &name,
        "balance = \"maglev\"",
    ))
    .await;
    let b = Sluice::start(by_name(
        &resolver(&two, "30s"),
        &name,
        "balance = \"maglev\"",
    ))
    .await;
    let mut picks = Vec::new();
    for i in 0..40u8 {
        let source: IpAddr = format!("127.0.1.{}", i + 1).parse().unwrap();
        let (_, ta) = connect_tagged(a.addr("front"), Some(source)).await;
        let (_, tb) = connect_tagged(b.addr("front"), Some(source)).await;
        assert_eq!(ta, tb, "client {source}");
        picks.push(ta);
    }
    let spread: HashSet<u8> = picks.into_iter().collect();
    assert!(spread.len() >= 3, "the clients spread: {spread:?}");
}

#[tokio::test]
async fn check_resolve_tries_the_names() {
    let dns = Dns::start(&["127.0.0.2 web.test"], &[], 60).await;
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    let table = resolver(&dns, "30s");
    std::fs::write(&good, by_name(&table, "web.test:80", "").toml()).unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, by_name(&table, "missing.test:80", "").toml()).unwrap();
    let run = |file: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["check", "--resolve"])
            .arg(file)
            .output()
            .unwrap()
    };
    let ok = run(&good);
    let out = String::from_utf8_lossy(&ok.stdout).into_owned();
    assert_eq!(ok.status.code(), Some(0), "{out}");
    assert!(
        out.contains("web.test:80 resolves to 127.0.0.2:80 (ttl 60s)"),
        "{out}"
    );
    let failed = run(&bad);
    let out = String::from_utf8_lossy(&failed.stdout).into_owned();
    assert_eq!(failed.status.code(), Some(69), "{out}");
    assert!(out.contains("missing.test:80 has no records"), "{out}");
    // Without --resolve a name is only checked for form.
    let plain = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("check")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(plain.status.code(), Some(0));
}

#[tokio::test]
async fn a_dns_change_does_not_hide_a_failed_reload() {
    let (port, _b) = on_one_port(&["127.0.0.2", "127.0.0.3"]).await;
    let dns = Dns::start(&["127.0.0.2 web.test"], &[], 1).await;
    let table = resolver(&dns, "30s");
    let sluice = Sluice::start(by_name(&table, &format!("web.test:{port}"), "")).await;
    sluice.rewrite("this is not toml");
    sluice
        .wait_metrics("the failed reload", |m| {
            m.value("sluice_config_last_reload_successful", &[]) == 0.0
        })
        .await;
    dns.hosts(&["127.0.0.3 web.test"], "web.test", Some("127.0.0.3"))
        .await;
    sluice
        .wait_log(&format!("endpoint 127.0.0.3:{port} of app added (dns)"))
        .await;
    let m = sluice.wait_generation(1).await;
    assert_eq!(m.value("sluice_config_last_reload_successful", &[]), 0.0);
    assert_eq!(
        m.value("sluice_config_reloads_total", &[("result", "success")]),
        0.0
    );
    reach_exactly(sluice.addr("front"), &[3], 4).await;
}

#[tokio::test]
async fn an_endpoint_dns_removes_follows_on_backend_removed() {
    let (port, _b) = on_one_port(&["127.0.0.2", "127.0.0.3"]).await;
    let dns = Dns::start(&["127.0.0.2 web.test", "127.0.0.3 web.test"], &[], 1).await;
    let keys = "balance = \"least_connections\"\non_backend_removed = \"close\"";
    let sluice = Sluice::start(by_name(
        &resolver(&dns, "30s"),
        &format!("web.test:{port}"),
        keys,
    ))
    .await;
    let front = sluice.addr("front");
    // One connection held on each endpoint (least connections puts the second beside
    // the first).
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(front).await.unwrap();
        let tag = read_n(&mut s, 1).await[0];
        held.push((tag, s));
    }
    let mut tags_held: Vec<u8> = held.iter().map(|(t, _)| *t).collect();
    tags_held.sort();
    assert_eq!(tags_held, vec![2, 3]);
    dns.hosts(&["127.0.0.3 web.test"], "web.test", Some("127.0.0.3"))
        .await;
    sluice
        .wait_log(&format!("endpoint 127.0.0.2:{port} of app removed (dns)"))
        .await;
    for (tag, mut s) in held {
        if tag == 2 {
            // Closed by sluice, as a removal by config edit with "close" does.
            tokio::time::timeout(PROMPTLY, until_closed(&mut s))
                .await
                .expect("the removed endpoint's connection is closed")
                .ok();
        } else {
            let sent = data(4096, 3);
            assert_eq!(exchange_on(&mut s, &sent).await, sent);
        }
    }
    sluice.wait_log("reason=\"backend_removed\"").await;
}
