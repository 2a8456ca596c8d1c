//! Hot reload under load: nothing a client sees may change but what the config says.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Client load against one address: long streams checked by hash, new connections at a
/// steady pace checked by hash, and bare connects that must never be refused.
struct Load {
    stop: CancellationToken,
    streams: Vec<JoinHandle<()>>,
    steady: JoinHandle<usize>,
    connects: JoinHandle<usize>,
}

impl Load {
    async fn start(addr: SocketAddr, streams: usize) -> Load {
        let stop = CancellationToken::new();
        let mut handles = Vec::new();
        for i in 0..streams {
            let s = TcpStream::connect(addr).await.unwrap();
            handles.push(tokio::spawn(stream(s, i as u64, stop.clone())));
        }
        let steady = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.is_cancelled() {
                    let sent = data(1024, 1_000_000 + n as u64);
                    let got = exchange(addr, &sent).await;
                    assert!(
                        got == sent,
                        "steady connection {n}: {} bytes back of {}",
                        got.len(),
                        sent.len()
                    );
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                n
            })
        };
        let connects = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.is_cancelled() {
                    let s = TcpStream::connect(addr)
                        .await
                        .expect("a connect was refused");
                    // A reset leaves no TIME_WAIT behind, so the loop cannot run out of ports.
                    s.set_zero_linger().unwrap();
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                n
            })
        };
        Load {
            stop,
            streams: handles,
            steady,
            connects,
        }
    }

    /// Stops the load; every stream must be byte-exact and no connect refused.
    async fn finish(self) -> (usize, usize) {
        sluice::shutdown::cancel(&self.stop);
        for s in self.streams {
            s.await.expect("a stream failed");
        }
        (self.steady.await.unwrap(), self.connects.await.unwrap())
    }
}

/// Writes 4 KiB every 20 ms until stopped, then half-closes; checks the echo by hash.
async fn stream(mut s: TcpStream, seed: u64, stop: CancellationToken) {
    let (mut r, mut w) = s.split();
    let send = async {
        let mut hash = Sha256::new();
        let mut len = 0usize;
        let mut chunk = 0u64;
        while !stop.is_cancelled() {
            let bytes = data(4096, seed * 1_000_003 + chunk);
            w.write_all(&bytes).await.unwrap();
            hash.update(&bytes);
            len += bytes.len();
            chunk += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        w.shutdown().await.unwrap();
        (hash.finalize(), len)
    };
    let recv = async {
        let mut hash = Sha256::new();
        let mut len = 0usize;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            len += n;
        }
        (hash.finalize(), len)
    };
    let (sent, got) =
        tokio::time::timeout(Duration::from_secs(300), async { tokio::join!(send, recv) })
            .await
            .expect("the stream finished");
    assert_eq!(sent.1, got.1, "stream {seed}: bytes");
    assert_eq!(sent.0, got.0, "stream {seed}: hash");
}

/// The fewest open files seen over a second, ten looks 100 ms apart: a baseline, so the
/// sampling paces itself. Sockets close a moment after their connection's gauge drops, a
/// connect still in the accept queue is taken a moment after the load stops, and each
/// metrics fetch holds an admin socket briefly.
async fn quiet_open_files(sluice: &Sluice) -> usize {
    let mut fewest = usize::MAX;
    for _ in 0..10 {
        fewest = fewest.min(sluice.open_files());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fewest
}

/// Listeners named `names`, each on its own port, all in front of upstream `app` with
/// one backend.
fn listeners(names: &[&str], backend: SocketAddr) -> Fixture {
    names
        .iter()
        .fold(Fixture::new(), |f, n| f.listener(n))
        .upstream("app")
        .backend(backend)
}

/// Reload `i` of the churn: drops one of the four backends on odd turns, and changes
/// every weight each turn.
fn churn_config(backends: &[SocketAddr], i: usize) -> Fixture {
    let list: Vec<(SocketAddr, u32)> = backends
        .iter()
        .enumerate()
        .filter(|(k, _)| i.is_multiple_of(2) || *k != (i / 2) % backends.len())
        .map(|(k, a)| (*a, 1 + ((i + k) % 3) as u32))
        .collect();
    Fixture::front_weighted(&list)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_reloads_under_load_lose_nothing_and_leak_nothing() {
    const STREAMS: usize = 200;
    const RELOADS: usize = 100;
    let backends = [
        Backend::echo().await,
        Backend::echo().await,
        Backend::echo().await,
        Backend::echo().await,
    ];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let sluice = Sluice::with(churn_config(&addrs, 0)).quiet().start().await;
    let addr = sluice.addr("front");
    let idle = |m: &Metrics| m.value("sluice_connections_active", &[]) == 0.0;

    // Warm up with the same load and no reloads: buffer pools and allocator arenas fill,
    // and what remains afterwards is the baseline.
    Load::start(addr, STREAMS).await.finish().await;
    sluice.wait_metrics("the warm-up closed", idle).await;
    let files_before = quiet_open_files(&sluice).await;
    let rss_before = sluice.rss_kib();

    let load = Load::start(addr, STREAMS).await;
    for i in 1..=RELOADS {
        let text = churn_config(&addrs, i);
        if i % 2 == 0 {
            sluice.save_by_rename(text);
        } else {
            sluice.rewrite(text);
        }
        sluice.wait_generation(i as u64).await;
    }
    let (steady, connects) = load.finish().await;

    let m = sluice.wait_metrics("every connection closed", idle).await;
    assert_eq!(m.value("sluice_config_generation", &[]), RELOADS as f64);
    assert_eq!(
        m.value("sluice_config_reloads_total", &[("result", "success")]),
        RELOADS as f64
    );
    assert_eq!(
        m.value("sluice_config_reloads_total", &[("result", "failure")]),
        0.0
    );
    // The connect loop resets each connection at once; when that reset beats the
    // backend connect, sluice counts the client as gone (client_left), which no client
    // sees. Every other reason would be a client turned away.
    let rejected: Vec<&str> =
        m.0.lines()
            .filter(|l| l.starts_with("sluice_connections_rejected_total") && !l.ends_with(" 0"))
            .filter(|l| !l.contains("reason=\"client_left\""))
            .collect();
    let errors: Vec<&str> =
        m.0.lines()
            .filter(|l| l.starts_with("sluice_upstream_connect_errors_total") && !l.ends_with(" 0"))
            .collect();
    assert!(
        rejected.is_empty(),
        "rejections: {rejected:?}; connect errors: {errors:?}; log: {:?}",
        sluice
            .log()
            .iter()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .take(5)
            .collect::<Vec<_>>()
    );
    sluice
        .wait_metrics("old snapshots released", |m| {
            m.value("sluice_config_snapshots", &[]) == 1.0
        })
        .await;
    // Back to the baseline, once what closes a moment late has closed.
    sluice.wait_open_files_at_most(files_before).await;
    let (files_after, rss_after) = (sluice.open_files(), sluice.rss_kib());
    eprintln!(
        "{steady} steady connections, {connects} connects; files {files_before} -> {files_after}, RSS {rss_before} -> {rss_after} KiB"
    );
    assert!(
        rss_after <= rss_before + 4096,
        "RSS {rss_before} -> {rss_after} KiB"
    );
}

/// `front` in front of `backend`, and a listener `load` in front of an echo backend,
/// for [`Load`].
fn with_load_listener(backend: SocketAddr, echo: SocketAddr) -> Fixture {
    Fixture::new()
        .listener("load")
        .to("echo")
        .listener("front")
        .to("app")
        .upstream("echo")
        .backend(echo)
        .upstream("app")
        .backend(backend)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_files_change_nothing_and_a_valid_one_then_applies() {
    let (a, b, echo) = (
        tagged(b'a').await,
        tagged(b'b').await,
        Backend::echo().await,
    );
    let sluice = Sluice::start(with_load_listener(a.addr, echo.addr)).await;
    let addr = sluice.addr("front");
    let load = Load::start(sluice.addr("load"), 20).await;
    let valid_b = with_load_listener(b.addr, echo.addr).toml();
    // Cut inside the last address: an unterminated string, as a writer caught mid-way.
    let half = &valid_b[..valid_b.rfind(':').unwrap()];

    for (n, (what, text)) in [
        ("garbage", "@@@ this is { not toml"),
        ("empty", ""),
        ("half-written", half),
    ]
    .into_iter()
    .enumerate()
    {
        sluice.rewrite(text);
        let m = sluice
            .wait_metrics(&format!("the {what} file refused"), |m| {
                m.value("sluice_config_reloads_total", &[("result", "failure")]) == (n + 1) as f64
            })
            .await;
        assert_eq!(m.value("sluice_config_generation", &[]), 0.0, "{what}");
        assert_eq!(
            m.value("sluice_config_last_reload_successful", &[]),
            0.0,
            "{what}"
        );
        assert_eq!(
            connect_tagged(addr, None).await.1,
            b'a',
            "{what}: the old config serves"
        );
    }
    // The empty file's error is logged.
    sluice.wait_log("sluice.toml:1:1: no [[listener]]").await;

    sluice.rewrite(valid_b);
    // The generation shows as the snapshot is stored, the success gauge a moment later
    // (after the listeners and checks are reconciled): wait for both.
    sluice
        .wait_metrics("generation 1, reloaded successfully", |m| {
            m.value("sluice_config_generation", &[]) == 1.0
                && m.value("sluice_config_last_reload_successful", &[]) == 1.0
        })
        .await;
    assert_eq!(connect_tagged(addr, None).await.1, b'b');
    let (steady, connects) = load.finish().await;
    assert!(steady > 0 && connects > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubernetes_configmap_symlink_swap_is_applied() {
    let (a, b) = (tagged(b'a').await, tagged(b'b').await);
    // The layout kubelet makes: sluice.toml -> ..data/sluice.toml, ..data -> ..v1.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    std::fs::create_dir(root.join("..v1")).unwrap();
    std::fs::write(
        root.join("..v1/sluice.toml"),
        Fixture::front(&[a.addr]).toml(),
    )
    .unwrap();
    std::os::unix::fs::symlink("..v1", root.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/sluice.toml", root.join("sluice.toml")).unwrap();
    let sluice = Sluice::with_file(dir, root.join("sluice.toml"))
        .start()
        .await;
    assert_eq!(connect_tagged(sluice.addr("front"), None).await.1, b'a');

    std::fs::create_dir(root.join("..v2")).unwrap();
    std::fs::write(
        root.join("..v2/sluice.toml"),
        Fixture::front(&[b.addr]).toml(),
    )
    .unwrap();
    std::os::unix::fs::symlink("..v2", root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();

    sluice.wait_generation(1).await;
    assert_eq!(connect_tagged(sluice.addr("front"), None).await.1, b'b');
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads() {
    let (a, b) = (tagged(b'a').await, tagged(b'b').await);
    let sluice = Sluice::start(Fixture::front(&[a.addr])).await;
    // Written behind sluice's back: the watch sees it too, so only count the result.
    sluice.rewrite(Fixture::front(&[b.addr]));
    sluice.signal("HUP");
    sluice.wait_generation(1).await;
    assert_eq!(connect_tagged(sluice.addr("front"), None).await.1, b'b');
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_listener_keeps_its_connections_and_adding_one_accepts_at_once() {
    let backend = Backend::echo().await;
    let sluice = Sluice::start(listeners(&["one", "two"], backend.addr)).await;
    let (one, two) = (sluice.addr("one"), sluice.addr("two"));
    let mut open_on_two = TcpStream::connect(two).await.unwrap();
    open_on_two.write_all(b"before").await.unwrap();
    assert_eq!(read_n(&mut open_on_two, 6).await, b"before");

    sluice.rewrite(listeners(&["one", "three"], backend.addr));
    sluice.wait_generation(1).await;

    let three = sluice.wait_listening("three", 0).await;
    let sent = data(50_000, 1);
    assert_eq!(
        exchange(three, &sent).await,
        sent,
        "the new listener accepts at once"
    );
    assert_eq!(
        exchange(one, &sent).await,
        sent,
        "the unchanged listener still serves"
    );
    let got = exchange_on(&mut open_on_two, b"after").await;
    assert_eq!(got, b"after", "the removed listener's connection continues");
    until_refused(two).await;
    sluice
        .wait_log_where("the reload's summary", |l| {
            l.contains("listener two removed") && l.contains("listener three added")
        })
        .await;
}

/// For each of `policies`, a listener of that name in front of an upstream of that
/// name and `on_backend_removed` policy; a connection through each to backend a, then a
/// reload that replaces a with b in every upstream.
async fn remove_backend(policies: &[&str]) -> (Sluice, Vec<TcpStream>, Backend, Backend) {
    let (a, b) = (tagged(b'a').await, tagged(b'b').await);
    let text = |backend: SocketAddr| {
        let mut f = Fixture::new().set("drain_timeout = \"700ms\"");
        for p in policies {
            f = f.listener(p).to(p);
        }
        for p in policies {
            f = f
                .upstream(p)
                .upstream_keys(&format!("on_backend_removed = \"{p}\""))
                .backend(backend);
        }
        f
    };
    let sluice = Sluice::start(text(a.addr)).await;
    let mut held = Vec::new();
    for p in policies {
        let (s, tag) = connect_tagged(sluice.addr(p), None).await;
        assert_eq!(tag, b'a');
        held.push(s);
    }
    sluice.rewrite(text(b.addr));
    sluice.wait_generation(1).await;
    for p in policies {
        assert_eq!(
            connect_tagged(sluice.addr(p), None).await.1,
            b'b',
            "new connections go to b"
        );
    }
    (sluice, held, a, b)
}

/// Whether `line` is the close of a connection through `listener` for the removal of
/// its backend.
fn closed_for_removal(line: &str, listener: &str) -> bool {
    line.contains(&format!("listener={listener} ")) && line.contains("reason=\"backend_removed\"")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_backend_removed_keep_leaves_open_connections_alone() {
    // Beside it, the same removal under `drain`: once that has closed its connection,
    // the drain timeout is past.
    let (sluice, mut held, _a, _b) = remove_backend(&["keep", "drain"]).await;
    let [keep, drain] = held.as_mut_slice() else {
        unreachable!("one connection per policy")
    };
    keep.write_all(b"?").await.unwrap();
    assert_eq!(read_n(keep, 1).await, b"?");
    let closed = until_closed(drain).await;
    assert!(closed.is_err() || closed.unwrap() == 0);
    sluice
        .wait_log_where("the drained connection closed", |l| {
            closed_for_removal(l, "drain")
        })
        .await;
    // Past the drain timeout, still open.
    keep.write_all(b"!").await.unwrap();
    assert_eq!(read_n(keep, 1).await, b"!");
    assert!(!sluice.log().iter().any(|l| closed_for_removal(l, "keep")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_backend_removed_drain_closes_after_drain_timeout() {
    let started = std::time::Instant::now();
    let (sluice, mut held, _a, _b) = remove_backend(&["drain"]).await;
    let held = &mut held[0];
    held.write_all(b"?").await.unwrap();
    assert_eq!(
        read_n(held, 1).await,
        b"?",
        "still open right after the reload"
    );
    let closed = until_closed(held).await;
    assert!(closed.is_err() || closed.unwrap() == 0);
    assert!(
        started.elapsed() >= Duration::from_millis(700),
        "{:?}",
        started.elapsed()
    );
    sluice
        .wait_log_where("the close for the removal", |l| {
            closed_for_removal(l, "drain")
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_backend_removed_close_closes_at_once() {
    let (sluice, mut held, _a, _b) = remove_backend(&["close"]).await;
    let closed = until_closed(&mut held[0]).await;
    assert!(closed.is_err() || closed.unwrap() == 0);
    sluice
        .wait_log_where("the close for the removal", |l| {
            closed_for_removal(l, "close")
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_things_leave_the_metrics_once_their_last_connection_ends() {
    let (a, b) = (tagged(b'a').await, tagged(b'b').await);
    let sluice = Sluice::start(listeners(&["one", "two"], a.addr)).await;
    let (held, _) = connect_tagged(sluice.addr("two"), None).await;
    let a_label = format!("backend=\"{}\"", a.addr);

    sluice.rewrite(listeners(&["one", "three"], b.addr));
    sluice.wait_generation(1).await;
    let m = sluice.metrics().await;
    assert!(
        m.0.contains("listener=\"two\""),
        "kept while its connection is open"
    );
    assert!(m.0.contains(&a_label), "kept while its connection is open");

    drop(held);
    let m = sluice
        .wait_metrics("the removed series gone", |m| {
            !m.0.contains("listener=\"two\"") && !m.0.contains(&a_label)
        })
        .await;
    assert!(m.0.contains("listener=\"three\"") && m.0.contains(&format!("backend=\"{}\"", b.addr)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_config_is_visible_at_slash_config() {
    let a = Backend::echo().await;
    let sluice = Sluice::start(
        Fixture::front_weighted(&[(a.addr, 4)])
            .upstream_keys("connect_timeout = \"1500ms\"\nbalance = \"maglev\""),
    )
    .await;
    let (code, body) = sluice.get("/config").await;
    assert_eq!(code, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["generation"], 0);
    assert_eq!(json["source"], sluice.config_path.display().to_string());
    assert!(json["loaded_at"].as_f64().unwrap() > 1.7e9);
    let upstream = &json["config"]["upstreams"][0];
    assert_eq!(upstream["balance"], "maglev");
    assert_eq!(upstream["connect_timeout"], "1500ms");
    assert_eq!(upstream["idle_timeout"], "1h");
    assert_eq!(upstream["backends"][0]["address"], a.addr.to_string());
    assert_eq!(upstream["backends"][0]["weight"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_state_survives_a_reload() {
    let (a, b) = (tagged(b'a').await, tagged(b'b').await);
    let dead = tagged(b'd').await;
    let (dead_addr, dead_label) = (dead.addr, dead.addr.to_string());
    let checks = "balance = \"least_connections\"\n\
                  health_check = { interval = \"100ms\", timeout = \"100ms\", rise = 2, fall = 2 }";
    let config = |weight_b: u32| {
        Fixture::front_weighted(&[(a.addr, 1), (b.addr, weight_b), (dead_addr, 1)])
            .upstream_keys(checks)
    };
    let sluice = Sluice::start(config(1)).await;
    drop(dead);
    sluice
        .wait_metrics("the dead backend down", |m| {
            m.value("sluice_backend_up", &[("backend", &dead_label)]) == 0.0
        })
        .await;
    // Four connections held on a and b, two each.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect_tagged(sluice.addr("front"), None).await);
    }
    held.retain(|(_, t)| *t == b'a');
    assert_eq!(held.len(), 2);

    // Change only b's weight; a keeps its 2 open connections, b has none now.
    sluice.rewrite(config(2));
    let m = sluice.wait_generation(1).await;
    assert_eq!(
        m.value("sluice_backend_up", &[("backend", &dead_label)]),
        0.0,
        "still down"
    );
    assert_eq!(
        m.value(
            "sluice_backend_connections_active",
            &[("backend", &a.addr.to_string())]
        ),
        2.0,
        "a's count carried over"
    );
    let mut next = String::new();
    for _ in 0..4 {
        next.push(connect_tagged(sluice.addr("front"), None).await.1 as char);
    }
    // Least connections with b at weight 2: b takes the first four (load 0/2 .. 3/2 < 2/1).
    assert_eq!(
        next, "bbbb",
        "the emptier backend, by counts that survived the reload"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_beside_the_config_do_not_trigger_reloads() {
    let (a, b) = (tagged(b'a').await, tagged(b'b').await);
    let sluice = Sluice::start(Fixture::front(&[a.addr])).await;
    let failures = |m: &Metrics| m.value("sluice_config_reloads_total", &[("result", "failure")]);
    sluice.rewrite("not = [valid");
    sluice
        .wait_metrics("one failure", |m| failures(m) == 1.0)
        .await;

    // A log or an editor's swap file next to the config: were these read as config
    // changes, the invalid file would be read, and fail, once more for each. Paced
    // beyond the reload debounce (100 ms), so that each write would be a read of its
    // own; the valid file after them then shows that none was.
    let neighbour = sluice.config_path.with_file_name("sluice.log");
    for i in 0..5 {
        std::fs::write(&neighbour, format!("line {i}\n")).unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    sluice.rewrite(Fixture::front(&[b.addr]));
    let m = sluice.wait_generation(1).await;
    assert_eq!(failures(&m), 1.0, "neighbour writes caused reloads");
    assert_eq!(connect_tagged(sluice.addr("front"), None).await.1, b'b');
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_removed_and_added_back_keeps_counting_its_open_connections() {
    let (a, b) = (tagged(b'a').await, tagged(b'b').await);
    let limited = "max_connections_per_backend = 1\nqueue = { max = 10, timeout = \"60s\" }";
    let sluice = Sluice::start(Fixture::front(&[a.addr]).upstream_keys(limited)).await;
    let (held, tag) = connect_tagged(sluice.addr("front"), None).await;
    assert_eq!(tag, b'a');

    // Remove a (its connection is kept), then add it back.
    sluice.rewrite(Fixture::front(&[b.addr]).upstream_keys(limited));
    sluice.wait_generation(1).await;
    sluice.rewrite(Fixture::front(&[a.addr]).upstream_keys(limited));
    sluice.wait_generation(2).await;

    // a's one slot is still taken by the connection from before: a newcomer waits.
    let mut newcomer = tokio::net::TcpStream::connect(sluice.addr("front"))
        .await
        .unwrap();
    sluice
        .wait_metrics("the newcomer queued", |m| {
            m.value("sluice_queue_length", &[]) == 1.0
                && m.value(
                    "sluice_backend_connections_active",
                    &[("backend", &a.addr.to_string())],
                ) == 1.0
        })
        .await;
    drop(held);
    assert_eq!(read_n(&mut newcomer, 1).await, b"a");
}

fn capped(max: usize, backend: SocketAddr) -> Fixture {
    Fixture::front(&[backend]).listener_keys(&format!("max_connections = {max}"))
}

/// A client echoed through sluice: proof that it was accepted and relayed.
async fn served(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"x").await.unwrap();
    assert_eq!(read_n(&mut s, 1).await, b"x");
    s
}

/// Whether `s` (which wrote a byte) is kept waiting at `addr`: once the kernel holds
/// it in the accept queue (sluice, at its cap, accepts nothing), it has nothing back.
async fn kept_waiting(addr: SocketAddr, s: &TcpStream) -> bool {
    wait_accept_queue(addr, 1).await;
    nothing_to_read(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_lowered_and_raised_by_reload_with_connections_open() {
    let backend = Backend::echo().await;
    let sluice = Sluice::start(capped(3, backend.addr)).await;
    let addr = sluice.addr("front");
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(served(addr).await);
    }

    // Lowered below the connections open: they stay, and no one new gets in until
    // fewer than the new maximum are open.
    sluice.rewrite(capped(1, backend.addr));
    sluice.wait_generation(1).await;
    let mut waiting = TcpStream::connect(addr).await.unwrap();
    waiting.write_all(b"w").await.unwrap();
    for s in &mut open {
        s.write_all(b"y").await.unwrap();
        assert_eq!(read_n(s, 1).await, b"y", "an open connection was kept");
    }
    open.truncate(1);
    sluice
        .wait_metrics("one connection left open", |m| {
            m.value("sluice_connections_active", &[("listener", "front")]) == 1.0
        })
        .await;
    assert!(
        kept_waiting(addr, &waiting).await,
        "let in over the lowered maximum"
    );
    open.clear();
    assert_eq!(read_n(&mut waiting, 1).await, b"w", "served once below it");

    // Raised: a client waiting at the cap gets in without any connection closing.
    let mut second = TcpStream::connect(addr).await.unwrap();
    second.write_all(b"s").await.unwrap();
    assert!(
        kept_waiting(addr, &second).await,
        "let in over the maximum of 1"
    );
    sluice.rewrite(capped(2, backend.addr));
    sluice.wait_generation(2).await;
    assert_eq!(read_n(&mut second, 1).await, b"s", "let in by the raise");
    let m = sluice.metrics().await;
    assert_eq!(
        m.value("sluice_listener_max_connections", &[("listener", "front")]),
        2.0
    );
    assert_eq!(backend.accepted(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_that_changes_nothing_is_logged_and_keeps_the_generation() {
    let backend = Backend::echo().await;
    let fixture = Fixture::front(&[backend.addr]);
    let sluice = Sluice::start(&fixture).await;
    sluice.signal("HUP");
    sluice
        .wait_log("reload requested (SIGHUP): nothing changed")
        .await;
    // A comment is not a change either.
    sluice.rewrite(fixture.clone().set("# a comment"));
    sluice
        .wait_log("config file changed, but nothing that a reload applies")
        .await;
    let m = sluice.metrics().await;
    assert_eq!(m.value("sluice_config_generation", &[]), 0.0);
    assert_eq!(
        m.value("sluice_config_reloads_total", &[("result", "success")]),
        0.0
    );
    assert_eq!(m.value("sluice_config_last_reload_successful", &[]), 1.0);
    // Then a real change applies as generation 1.
    sluice.rewrite(fixture.listener_keys("backlog = 100"));
    sluice.wait_reloaded(1).await;
}
