//! PROXY protocol: accepted (v1 and v2) only from trusted peers, refused when broken,
//! and sent to backends, where nginx (a real peer that speaks it) reads it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// A listener accepting PROXY headers from `trusted`, in front of `backends` (with
/// `extra` upstream keys), with a JSON access log at `log`.
fn accepting(trusted: &str, extra: &str, log: &Path, backends: &[SocketAddr]) -> Fixture {
    Fixture::front(backends)
        .listener_keys(&format!(
            "proxy_protocol = {{ trusted = [{trusted}], timeout = \"500ms\" }}"
        ))
        .upstream_keys("retries = 0")
        .upstream_keys(extra)
        .table(&format!(
            "[access_log]\npath = \"{}\"\nformat = \"json\"",
            log.display()
        ))
}

/// A v2 header for TCP over IPv4, built by hand from the spec rather than by sluice's
/// own encoder.
fn v2(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(s), SocketAddr::V4(d)) = (source, destination) else {
        panic!("IPv4 only")
    };
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY
    h.push(0x11); // AF_INET, STREAM
    h.extend_from_slice(&12u16.to_be_bytes());
    h.extend_from_slice(&s.ip().octets());
    h.extend_from_slice(&d.ip().octets());
    h.extend_from_slice(&s.port().to_be_bytes());
    h.extend_from_slice(&d.port().to_be_bytes());
    h
}

fn field(line: &str, key: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    v[key].as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_and_v2_from_a_trusted_peer_carry_the_client_into_the_access_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let backend = Backend::echo().await;
    let sluice = Sluice::start(accepting("\"127.0.0.1/32\"", "", &log, &[backend.addr])).await;
    let addr = sluice.addr("front");
    let dest: SocketAddr = "192.0.2.1:443".parse().unwrap();

    // v1, whole; the payload follows in the same write and must arrive intact.
    let payload = data(70_000, 5);
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut first = b"PROXY TCP4 203.0.113.7 192.0.2.1 40001 443\r\n".to_vec();
    first.extend_from_slice(&payload[..1000]);
    s.write_all(&first).await.unwrap();
    s.write_all(&payload[1000..]).await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut s, &mut got)
        .await
        .unwrap();
    assert_eq!(sha256(&got), sha256(&payload), "{} bytes back", got.len());

    // v2.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&v2("198.51.100.9:40002".parse().unwrap(), dest))
        .await
        .unwrap();
    assert_eq!(exchange_on(&mut s, b"v2 data").await, b"v2 data");
    drop(s);

    // v1 delivered one byte per write.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    for b in b"PROXY TCP4 203.0.113.8 192.0.2.1 40003 443\r\n" {
        s.write_all(&[*b]).await.unwrap();
    }
    assert_eq!(exchange_on(&mut s, b"slow header").await, b"slow header");
    drop(s);

    let lines = wait_lines(&log, 3).await;
    let clients: Vec<String> = lines.iter().map(|l| field(l, "client")).collect();
    for expected in [
        "203.0.113.7:40001",
        "198.51.100.9:40002",
        "203.0.113.8:40003",
    ] {
        assert!(
            clients.iter().any(|c| c == expected),
            "{expected} not in {clients:?}"
        );
    }
    assert!(
        lines.iter().all(|l| field(l, "reason") == "closed"),
        "{lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_truncated_oversize_malformed_and_slow_headers_are_closed_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let backend = Backend::echo().await;
    let untrusting = Sluice::start(accepting("\"10.0.0.0/8\"", "", &log, &[backend.addr])).await;
    let mut s = TcpStream::connect(untrusting.addr("front")).await.unwrap();
    s.write_all(b"PROXY TCP4 203.0.113.7 192.0.2.1 40001 443\r\nhello")
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(PROMPTLY, until_closed(&mut s))
            .await
            .is_ok()
    );
    untrusting
        .wait_metrics("the untrusted peer refused", |m| {
            m.value(
                "sluice_connections_rejected_total",
                &[("listener", "front"), ("reason", "proxy_protocol")],
            ) == 1.0
        })
        .await;

    let log2 = dir.path().join("access2.log");
    let sluice = Sluice::start(accepting("\"127.0.0.1\"", "", &log2, &[backend.addr])).await;
    let addr = sluice.addr("front");
    sluice.wait_holds_open(&log2).await;
    let baseline = sluice.open_files();
    let mut oversize = v2(
        "198.51.100.9:1".parse().unwrap(),
        "192.0.2.1:2".parse().unwrap(),
    );
    oversize[14..16].copy_from_slice(&5000u16.to_be_bytes());
    let cases: [(&str, Vec<u8>, bool); 5] = [
        (
            "truncated then FIN",
            b"PROXY TCP4 203.0.113.7 192.0".to_vec(),
            true,
        ),
        ("v2 declaring 5,000 bytes", oversize, false),
        (
            "malformed v1",
            b"PROXY TCP4 nonsense here 1 2\r\n".to_vec(),
            false,
        ),
        (
            "no header at all",
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            false,
        ),
        ("partial, then silence", b"PROXY TCP4 ".to_vec(), false),
    ];
    let started = Instant::now();
    for (what, bytes, fin) in &cases {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(bytes).await.unwrap();
        if *fin {
            s.shutdown().await.unwrap();
        }
        let closed = tokio::time::timeout(PROMPTLY, until_closed(&mut s)).await;
        assert!(closed.is_ok(), "{what}: not closed");
    }
    // The silent one waited for the 500 ms header timeout, not for any longer one.
    assert!(started.elapsed() < Duration::from_secs(5));
    // The active gauge drops as the connection's task returns, a moment after the
    // refusal is counted: wait for both.
    sluice
        .wait_metrics("five refusals, none active", |m| {
            m.value(
                "sluice_connections_rejected_total",
                &[("listener", "front"), ("reason", "proxy_protocol")],
            ) == 5.0
                && m.value("sluice_connections_active", &[("listener", "front")]) == 0.0
        })
        .await;
    assert_eq!(backend.accepted(), 0, "no broken header reaches a backend");
    sluice.wait_open_files_at_most(baseline).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maglev_hashes_the_client_named_by_the_header() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let backends = [tagged(1).await, tagged(2).await, tagged(3).await];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let sluice = Sluice::start(accepting(
        "\"127.0.0.1\"",
        "balance = \"maglev\"",
        &log,
        &addrs,
    ))
    .await;
    let addr = sluice.addr("front");
    let mut seen = std::collections::HashMap::new();
    for round in 0..3 {
        for i in 1..=8u8 {
            let client = SocketAddr::from((Ipv4Addr::new(198, 51, 100, i), 1000 + round));
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&v2(client, "192.0.2.1:443".parse().unwrap()))
                .await
                .unwrap();
            let tag = read_n(&mut s, 1).await[0];
            let first = *seen.entry(i).or_insert(tag);
            assert_eq!(first, tag, "client {i} moved between backends");
        }
    }
    let distinct: std::collections::HashSet<u8> = seen.values().copied().collect();
    // Every real connection comes from 127.0.0.1: only the headers' addresses can spread
    // them (with these fixed hashes, over all three backends).
    assert!(distinct.len() >= 2, "{seen:?}");
}

/// nginx's stream module as a backend that reads a PROXY header and answers with the
/// addresses it carried, started on a port that was free a moment before (nginx cannot
/// report a port of its own choosing; a clash is retried).
struct Nginx {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Nginx {
    async fn start() -> Nginx {
        assert!(
            Path::new("/usr/lib/nginx/modules/ngx_stream_module.so").exists(),
            "nginx with its stream module is needed: `make deps-test` installs it"
        );
        for _attempt in 0..5 {
            // Below the ephemeral range: no other test's port 0 takes it meanwhile, so
            // the connect below cannot reach another listener while nginx fails to bind.
            let port = free_port().port();
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path().display();
            let conf = format!(
                "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
                 daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
                 events {{ worker_connections 64; }}\n\
                 stream {{ server {{ listen 127.0.0.1:{port} proxy_protocol;\n\
                 return \"$proxy_protocol_addr:$proxy_protocol_port>$proxy_protocol_server_addr:$proxy_protocol_server_port\\n\"; }} }}\n"
            );
            let path = dir.path().join("nginx.conf");
            std::fs::write(&path, conf).unwrap();
            let mut child = Command::new("nginx")
                .arg("-c")
                .arg(&path)
                .arg("-e")
                .arg(dir.path().join("error.log"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start nginx");
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let listening = eventually("nginx listening", async || {
                if let Ok(Some(_)) = child.try_wait() {
                    return Some(false); // The port was taken meanwhile: try another.
                }
                TcpStream::connect(addr).await.is_ok().then_some(true)
            })
            .await;
            if listening {
                return Nginx {
                    child,
                    addr,
                    _dir: dir,
                };
            }
        }
        panic!("nginx could not bind a free port in five attempts");
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Everything nginx sends before it closes.
async fn answer(s: &mut TcpStream) -> String {
    let mut reply = Vec::new();
    let read = tokio::io::AsyncReadExt::read_to_end(s, &mut reply);
    tokio::time::timeout(PROMPTLY, read)
        .await
        .expect("nginx answers and closes")
        .unwrap();
    String::from_utf8_lossy(&reply).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_reads_the_v1_and_v2_headers_sluice_sends() {
    let nginx = Nginx::start().await;
    for version in ["v1", "v2"] {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("access.log");
        // The client's own PROXY header names it; sluice passes that on in its own.
        let extra = format!("send_proxy_protocol = \"{version}\"");
        let sluice = Sluice::start(accepting("\"127.0.0.1\"", &extra, &log, &[nginx.addr])).await;
        let mut s = TcpStream::connect(sluice.addr("front")).await.unwrap();
        s.write_all(b"PROXY TCP4 203.0.113.7 192.0.2.1 40001 443\r\n")
            .await
            .unwrap();
        assert_eq!(
            answer(&mut s).await,
            "203.0.113.7:40001>192.0.2.1:443\n",
            "{version}"
        );

        // Without an incoming header, the client is the real peer.
        let sluice = Sluice::start(Fixture::front(&[nginx.addr]).upstream_keys(&extra)).await;
        let front = sluice.addr("front");
        let mut s = TcpStream::connect(front).await.unwrap();
        let me = s.local_addr().unwrap();
        assert_eq!(
            answer(&mut s).await,
            format!(
                "{}:{}>{}:{}\n",
                me.ip(),
                me.port(),
                front.ip(),
                front.port()
            ),
            "{version}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_send_a_local_header_that_nginx_accepts() {
    let nginx = Nginx::start().await;
    for version in ["v1", "v2"] {
        let sluice = Sluice::start(Fixture::front(&[nginx.addr]).upstream_keys(&format!(
            "send_proxy_protocol = \"{version}\"\n\
             health_check = {{ interval = \"100ms\", timeout = \"100ms\", rise = 1, fall = 1, send_proxy_protocol = true, expect = \":\" }}"
        )))
        .await;
        let b = nginx.addr.to_string();
        let m = sluice
            .wait_metrics("passing checks", |m| {
                m.value(
                    "sluice_health_checks_total",
                    &[("upstream", "app"), ("backend", &b), ("result", "success")],
                ) >= 2.0
            })
            .await;
        assert_eq!(
            m.value(
                "sluice_health_checks_total",
                &[("upstream", "app"), ("backend", &b), ("result", "failure")]
            ),
            0.0,
            "{version}"
        );
    }
}
