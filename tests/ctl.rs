//! The control socket and `sluice ctl`: drain, maint, weight, close, readiness and
//! reload on a running sluice, with real clients; overrides across reloads and restarts;
//! every bad input refused, counted, and changing nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use common::*;

/// The control table every test here adds: paths relative to the config's directory.
const CONTROL: &str = "[control]\nsocket = \"ctl.sock\"\nstate_file = \"ctl-state.json\"";

fn socket(s: &Sluice) -> PathBuf {
    s.config_path.parent().unwrap().join("ctl.sock")
}

/// `sluice ctl --socket SOCKET ARGS` for `s`.
async fn ctl(s: &Sluice, args: &[&str]) -> Ran {
    ctl_at(&socket(s), args).await
}

/// `sluice ctl`, which must succeed.
async fn ctl_ok(s: &Sluice, args: &[&str]) -> String {
    let ran = ctl(s, args).await;
    assert_eq!(ran.code, 0, "sluice ctl {args:?}: {ran:?}");
    ran.stdout
}

/// One raw HTTP/1.1 request on `stream`: the status and the body as JSON.
async fn raw<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut stream: S,
    head: &str,
    body: &[u8],
) -> (u16, Value) {
    let request = format!(
        "{head}\r\nHost: sluice\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    // An oversized body may be refused before it is all sent: the answer still comes.
    let _ = stream.write_all(body).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(STUCK, stream.read_to_end(&mut answer))
        .await
        .expect("an answer");
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let json = text.split_once("\r\n\r\n").map_or(Value::Null, |(_, b)| {
        serde_json::from_str(b).unwrap_or(Value::Null)
    });
    (status, json)
}

async fn request(path: &Path, head: &str, body: &[u8]) -> (u16, Value) {
    raw(UnixStream::connect(path).await.unwrap(), head, body).await
}

async fn listing(s: &Sluice) -> Value {
    let (code, v) = request(&socket(s), "GET /v1/backends HTTP/1.1", b"").await;
    assert_eq!(code, 200, "{v}");
    v
}

/// The backend `address` of upstream `app` in a listing.
fn backend(listing: &Value, address: std::net::SocketAddr) -> Value {
    listing["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|u| u["backends"].as_array().unwrap())
        .find(|b| b["backend"] == address.to_string())
        .cloned()
        .unwrap_or_else(|| panic!("{address} in {listing:#}"))
}

fn ctl_count(m: &Metrics, route: &str, result: &str) -> f64 {
    m.value(
        "sluice_ctl_requests_total",
        &[("route", route), ("result", result)],
    )
}

fn uid() -> u32 {
    rustix::process::getuid().as_raw()
}

/// A stream through sluice to a tagged backend, which echoes what it is sent.
struct Stream {
    s: TcpStream,
    tag: u8,
    sent: Vec<u8>,
    got: Vec<u8>,
}

impl Stream {
    async fn open(sluice: &Sluice) -> Stream {
        let (s, tag) = connect_tagged(sluice.addr("front"), None).await;
        Stream {
            s,
            tag,
            sent: Vec::new(),
            got: Vec::new(),
        }
    }

    /// Sends a chunk and reads its echo.
    async fn round(&mut self, len: usize, seed: u64) {
        let chunk = data(len, seed);
        self.s.write_all(&chunk).await.unwrap();
        self.got.extend(read_n(&mut self.s, len).await);
        self.sent.extend(chunk);
    }

    fn assert_exact(&self) {
        assert_eq!(self.sent.len(), self.got.len());
        assert_eq!(sha256(&self.sent), sha256(&self.got), "bytes differ");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_is_mode_0600_and_a_change_is_logged_once_with_the_peer_uid() {
    let (a, b) = (tagged(b'a').await, tagged(b'b').await);
    let sluice = Sluice::start(Fixture::front(&[a.addr, b.addr]).table(CONTROL)).await;
    let meta = std::fs::symlink_metadata(socket(&sluice)).unwrap();
    assert!(
        std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()),
        "a socket"
    );
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let addr = a.addr.to_string();
    let out = ctl_ok(&sluice, &["drain", "app", &addr]).await;
    assert_eq!(out, format!("app/{addr}: drain (was ready)\n"));
    let line = sluice.wait_log("backend admin state set").await;
    assert!(line.contains(&format!("by=uid {} (pid ", uid())), "{line}");
    assert!(
        line.contains("state=\"drain\"") && line.contains(&addr),
        "{line}"
    );
    let said = sluice
        .log()
        .iter()
        .filter(|l| l.contains("backend admin state set"))
        .count();
    assert_eq!(said, 1, "logged once");
    let m = sluice.metrics().await;
    let state = |s: &str| {
        m.value(
            "sluice_backend_admin_state",
            &[("backend", &addr), ("state", s)],
        )
    };
    assert_eq!(
        (state("ready"), state("drain"), state("maint")),
        (0.0, 1.0, 0.0)
    );
    // The other backend is untouched.
    assert_eq!(
        m.value(
            "sluice_backend_admin_state",
            &[("backend", &b.addr.to_string()), ("state", "ready")]
        ),
        1.0
    );
    // The socket goes with the process.
    let path = socket(&sluice);
    sluice.signal("TERM");
    assert!(sluice.exited().await.success());
    assert!(!path.exists(), "the socket file is removed at exit");
}

/// Under load: streams open on both backends; draining one sends it no new connection
/// while its open streams carry on, byte-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_backend_sends_it_no_new_connection_while_its_open_streams_finish_byte_exact() {
    let (a, b) = (tagged(b'a').await, tagged(b'b').await);
    let sluice = Sluice::start(
        Fixture::front(&[a.addr, b.addr])
            .upstream_keys("balance = \"round_robin\"")
            .table(CONTROL),
    )
    .await;
    let mut streams = Vec::new();
    for i in 0..8 {
        let mut s = Stream::open(&sluice).await;
        s.round(64 * 1024, i).await;
        streams.push(s);
    }
    let on_a = streams.iter().filter(|s| s.tag == b'a').count();
    assert_eq!(on_a, 4, "round robin split the open streams");
    ctl_ok(&sluice, &["drain", "app", &a.addr.to_string()]).await;
    let accepted_by_a = a.accepted();
    // New clients, each with a transfer of its own, while the open streams go on.
    let mut new = Vec::new();
    for i in 0..40 {
        let mut s = Stream::open(&sluice).await;
        s.round(16 * 1024, 100 + i).await;
        for (k, open) in streams.iter_mut().enumerate() {
            open.round(8 * 1024, 1000 * (i + 1) + k as u64).await;
        }
        new.push(s);
    }
    assert!(
        new.iter().all(|s| s.tag == b'b'),
        "every new client went to b"
    );
    assert_eq!(a.accepted(), accepted_by_a, "a accepted no new connection");
    for s in streams.iter().chain(&new) {
        s.assert_exact();
    }
    let listed = backend(&listing(&sluice).await, a.addr);
    assert_eq!(listed["admin_state"], "drain");
    assert_eq!(listed["active"], 4, "a's streams are still open");
    // Ready again: a takes new connections.
    ctl_ok(&sluice, &["ready", "app", &a.addr.to_string()]).await;
    let tags: Vec<u8> = {
        let mut t = Vec::new();
        for _ in 0..4 {
            t.push(Stream::open(&sluice).await.tag);
        }
        t
    };
    assert!(tags.contains(&b'a'), "{tags:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maint_with_close_ends_open_connections_promptly_and_counts_them() {
    let (a, b) = (tagged(b'a').await, tagged(b'b').await);
    let sluice = Sluice::start(
        Fixture::front(&[a.addr, b.addr])
            .upstream_keys("balance = \"round_robin\"")
            .upstream_table("health_check", "interval = \"100ms\"\ntimeout = \"100ms\"")
            .table(CONTROL),
    )
    .await;
    let mut streams = Vec::new();
    for i in 0..6 {
        let mut s = Stream::open(&sluice).await;
        s.round(4096, i).await;
        streams.push(s);
    }
    let addr = a.addr.to_string();
    let out = ctl_ok(&sluice, &["maint", "app", &addr, "--close"]).await;
    assert_eq!(
        out,
        format!("app/{addr}: maint (was ready), 3 connection(s) closed\n")
    );
    for s in streams.iter_mut() {
        if s.tag == b'a' {
            assert_eq!(
                until_closed(&mut s.s).await.unwrap(),
                0,
                "closed, nothing more"
            );
        } else {
            s.round(4096, 99).await;
            s.assert_exact();
        }
    }
    sluice
        .wait_metrics("a's connections gone", |m| {
            m.value("sluice_backend_connections_active", &[("backend", &addr)]) == 0.0
        })
        .await;
    sluice.wait_log("reason=\"backend_closed\"").await;
    let m = sluice
        .wait_metrics("the three closes counted", |m| {
            m.value(
                "sluice_backend_connections_closed_by_operator_total",
                &[("backend", &addr)],
            ) == 3.0
        })
        .await;
    assert_eq!(ctl_count(&m, "backend/state", "ok"), 1.0);
    assert_eq!(
        m.value(
            "sluice_backend_admin_state",
            &[("backend", &addr), ("state", "maint")]
        ),
        1.0
    );
    // Health checks of a are paused: its count stands still while b's goes on.
    let checks = |m: &Metrics, backend: &str| {
        m.value(
            "sluice_health_checks_total",
            &[("backend", backend), ("result", "success")],
        )
    };
    let (a_before, b_before) = (checks(&m, &addr), checks(&m, &b.addr.to_string()));
    sluice
        .wait_metrics("b checked five more times", |m| {
            checks(m, &b.addr.to_string()) >= b_before + 5.0
        })
        .await;
    let m = sluice.metrics().await;
    assert!(checks(&m, &addr) <= a_before + 1.0, "a's checks paused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_ends_a_backends_connections_now_and_keeps_it_in_service() {
    let a = tagged(b'a').await;
    let sluice = Sluice::start(Fixture::front(&[a.addr]).table(CONTROL)).await;
    let mut held = Vec::new();
    for i in 0..3 {
        let mut s = Stream::open(&sluice).await;
        s.round(1000, i).await;
        held.push(s);
    }
    let out = ctl_ok(&sluice, &["close", "app", &a.addr.to_string()]).await;
    assert_eq!(out, format!("app/{}: 3 connection(s) closed\n", a.addr));
    for s in held.iter_mut() {
        assert_eq!(until_closed(&mut s.s).await.unwrap(), 0);
    }
    // Not retired: a new connection reaches the same backend and moves its bytes.
    let mut s = Stream::open(&sluice).await;
    s.round(100_000, 7).await;
    s.assert_exact();
    assert_eq!(s.tag, b'a');
    // Twice works as well as once.
    ctl_ok(&sluice, &["close", "app", &a.addr.to_string()]).await;
    assert_eq!(until_closed(&mut s.s).await.unwrap(), 0);
}

/// Counts the tags of `n` connections opened one after the other.
async fn split(sluice: &Sluice, n: usize) -> (usize, usize) {
    let mut to_a = 0;
    for _ in 0..n {
        let (_s, tag) = connect_tagged(sluice.addr("front"), None).await;
        to_a += usize::from(tag == b'a');
    }
    (to_a, n - to_a)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weight_change_shifts_the_split_as_set() {
    let (a, b) = (tagged(b'a').await, tagged(b'b').await);
    for balance in ["round_robin", "random"] {
        let sluice = Sluice::start(
            Fixture::front_weighted(&[(a.addr, 1), (b.addr, 1)])
                .upstream_keys(&format!("balance = \"{balance}\""))
                .table(CONTROL),
        )
        .await;
        let out = ctl_ok(&sluice, &["weight", "app", &a.addr.to_string(), "3"]).await;
        assert_eq!(out, format!("app/{}: weight 3\n", a.addr));
        let (to_a, _) = split(&sluice, 800).await;
        match balance {
            // The smooth order of weights 3 and 1 is exact over whole cycles.
            "round_robin" => assert_eq!(to_a, 600),
            // Binomial(800, 0.75): mean 600, standard deviation about 12.2; ±5 of them.
            _ => assert!((539..=661).contains(&to_a), "{to_a} of 800 to a"),
        }
        // Weight 0: no new connection by balancing.
        ctl_ok(&sluice, &["weight", "app", &a.addr.to_string(), "0"]).await;
        assert_eq!(split(&sluice, 50).await, (0, 50), "{balance}");
        let listed = backend(&listing(&sluice).await, a.addr);
        assert_eq!(
            (
                listed["weight"].clone(),
                listed["configured_weight"].clone()
            ),
            (json!(0), json!(1))
        );
        let m = sluice.metrics().await;
        assert_eq!(
            m.value("sluice_backend_weight", &[("backend", &a.addr.to_string())]),
            0.0
        );
        // Back to the configured weight.
        let out = ctl_ok(&sluice, &["weight", "app", &a.addr.to_string(), "config"]).await;
        assert_eq!(out, format!("app/{}: weight 1 (as configured)\n", a.addr));
        let (to_a, _) = split(&sluice, 40).await;
        assert!(to_a > 0, "{balance}: a back in the split");
    }
}

/// Maglev hashes the client's address: weight 0 moves a's clients, and only them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weight_of_zero_moves_maglev_clients_off_the_backend() {
    let (a, b) = (tagged(b'a').await, tagged(b'b').await);
    let sluice = Sluice::start(
        Fixture::front(&[a.addr, b.addr])
            .upstream_keys("balance = \"maglev\"")
            .table(CONTROL),
    )
    .await;
    let sources: Vec<std::net::IpAddr> = (1..=60)
        .map(|i| std::net::Ipv4Addr::new(127, 0, 1, i).into())
        .collect();
    let mut before = Vec::new();
    for ip in &sources {
        before.push(connect_tagged(sluice.addr("front"), Some(*ip)).await.1);
    }
    assert!(
        before.contains(&b'a') && before.contains(&b'b'),
        "{before:?}"
    );
    ctl_ok(&sluice, &["weight", "app", &a.addr.to_string(), "0"]).await;
    for (ip, was) in sources.iter().zip(&before) {
        let now = connect_tagged(sluice.addr("front"), Some(*ip)).await.1;
        assert_eq!(now, b'b', "{ip}");
        if *was == b'b' {
            assert_eq!(now, *was, "b's clients stay");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_override_survives_a_reload_that_changes_other_things_and_goes_with_its_backend() {
    let (a, b, c) = (tagged(b'a').await, tagged(b'b').await, tagged(b'c').await);
    let config = Fixture::front(&[a.addr, b.addr]).table(CONTROL);
    let sluice = Sluice::start(config.clone()).await;
    ctl_ok(&sluice, &["drain", "app", &a.addr.to_string()]).await;
    ctl_ok(&sluice, &["weight", "app", &b.addr.to_string(), "5"]).await;
    // Another backend and another retry count: a reload that changes other things.
    sluice.rewrite(
        Fixture::front(&[a.addr, b.addr, c.addr])
            .upstream_keys("retries = 1")
            .table(CONTROL),
    );
    sluice.wait_reloaded(1).await;
    let listed = listing(&sluice).await;
    assert_eq!(backend(&listed, a.addr)["admin_state"], "drain");
    assert_eq!(backend(&listed, b.addr)["weight"], 5);
    assert_eq!(backend(&listed, b.addr)["configured_weight"], 1);
    assert_eq!(backend(&listed, c.addr)["admin_state"], "ready");
    // `/config` shows the configured values and the overrides beside them.
    let (_, text) = sluice.get("/config").await;
    let shown: Value = serde_json::from_str(&text).unwrap();
    let overrides = shown["overrides"].as_array().unwrap();
    assert_eq!(overrides.len(), 2, "{shown:#}");
    assert!(
        overrides
            .iter()
            .any(|o| o["backend"] == a.addr.to_string() && o["state"] == "drain")
    );
    for _ in 0..10 {
        assert_ne!(connect_tagged(sluice.addr("front"), None).await.1, b'a');
    }
    // a leaves the config: its override goes with it, and is not in the state file.
    sluice.rewrite(Fixture::front(&[b.addr, c.addr]).table(CONTROL));
    sluice.wait_reloaded(2).await;
    sluice
        .wait_log(&format!(
            "runtime override dropped: the backend is no longer in the config backend=app/{}",
            a.addr
        ))
        .await;
    let state =
        std::fs::read_to_string(sluice.config_path.parent().unwrap().join("ctl-state.json"))
            .unwrap();
    assert!(!state.contains(&a.addr.to_string()), "{state}");
    assert!(state.contains(&b.addr.to_string()), "{state}");
    // Back in the config, a is ready.
    sluice.rewrite(Fixture::front(&[a.addr, b.addr, c.addr]).table(CONTROL));
    sluice.wait_reloaded(3).await;
    assert_eq!(
        backend(&listing(&sluice).await, a.addr)["admin_state"],
        "ready"
    );
    // `clear` drops b's weight.
    ctl_ok(&sluice, &["clear", "app", &b.addr.to_string()]).await;
    assert_eq!(backend(&listing(&sluice).await, b.addr)["weight"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overrides_survive_a_restart_through_the_state_file() {
    let a = tagged(b'a').await;
    let b = tagged(b'b').await;
    let state_dir = tempfile::tempdir().unwrap();
    let state = state_dir.path().join("state.json");
    let control = format!(
        "[control]\nsocket = \"ctl.sock\"\nstate_file = \"{}\"",
        state.display()
    );
    let config = Fixture::front(&[a.addr, b.addr]).table(&control);
    let first = Sluice::start(config.clone()).await;
    ctl_ok(&first, &["maint", "app", &a.addr.to_string()]).await;
    ctl_ok(&first, &["weight", "app", &b.addr.to_string(), "7"]).await;
    assert_eq!(
        std::fs::metadata(&state).unwrap().permissions().mode() & 0o777,
        0o600
    );
    first.signal("TERM");
    assert!(first.exited().await.success());
    let second = Sluice::start(config.clone()).await;
    let listed = listing(&second).await;
    assert_eq!(backend(&listed, a.addr)["admin_state"], "maint");
    assert_eq!(backend(&listed, b.addr)["weight"], 7);
    assert!(
        backend(&listed, a.addr)["override"]["by"]
            .as_str()
            .unwrap()
            .starts_with(&format!("uid {}", uid()))
    );
    for _ in 0..5 {
        assert_eq!(connect_tagged(second.addr("front"), None).await.1, b'b');
    }
    second.signal("TERM");
    assert!(second.exited().await.success());
    // A state file that is not what sluice wrote: the start fails and names it.
    std::fs::write(&state, "{ not json").unwrap();
    let failed = Sluice::with(config).start_fails().await;
    assert_eq!(failed.status.code(), Some(1));
    assert!(
        failed.stderr.contains(&format!(
            "the control state file {} is not valid",
            state.display()
        )),
        "{}",
        failed.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unready_makes_readyz_503_while_traffic_continues() {
    let a = Backend::echo().await;
    let sluice = Sluice::start(Fixture::front(&[a.addr]).table(CONTROL)).await;
    let payload = data(200_000, 1);
    let mut held = TcpStream::connect(sluice.addr("front")).await.unwrap();
    held.write_all(&payload[..1000]).await.unwrap();
    assert_eq!(read_n(&mut held, 1000).await, payload[..1000]);
    assert_eq!(sluice.get("/readyz").await.0, 200);
    let out = ctl_ok(&sluice, &["unready"]).await;
    assert!(out.starts_with("not ready"), "{out}");
    assert_eq!(
        sluice.get("/readyz").await,
        (503, "not ready (sluice ctl unready)\n".to_string())
    );
    assert_eq!(sluice.get("/healthz").await.0, 200, "alive all the same");
    // The open connection and new ones are served.
    held.write_all(&payload[1000..]).await.unwrap();
    assert_eq!(
        read_n(&mut held, payload.len() - 1000).await,
        payload[1000..]
    );
    let got = exchange(sluice.addr("front"), &payload).await;
    assert_eq!(sha256(&got), sha256(&payload));
    assert!(
        ctl_ok(&sluice, &["backends"])
            .await
            .contains("process: not ready")
    );
    ctl_ok(&sluice, &["ready-process"]).await;
    assert_eq!(sluice.get("/readyz").await.0, 200);
    let line = sluice.wait_log("process readiness set").await;
    assert!(line.contains(&format!("by=uid {}", uid())), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_returns_the_generation_or_the_error_with_file_line_col() {
    let (a, b) = (Backend::echo().await, Backend::echo().await);
    let sluice = Sluice::start(Fixture::front(&[a.addr]).table(CONTROL)).await;
    assert_eq!(
        ctl_ok(&sluice, &["reload"]).await,
        "reloaded: generation 0\n",
        "nothing changed"
    );
    // Written as it is, without the watch's help: the same text the watch would see.
    sluice.rewrite(Fixture::front(&[a.addr, b.addr]).table(CONTROL));
    let out = ctl_ok(&sluice, &["reload"]).await;
    assert!(out == "reloaded: generation 1\n", "{out}");
    sluice.rewrite(format!(
        "{}\nretries = \"many\"\n",
        Fixture::front(&[a.addr]).table(CONTROL)
    ));
    let ran = ctl(&sluice, &["reload"]).await;
    assert_eq!(ran.code, 1, "{ran:?}");
    let path = sluice.config_path.display().to_string();
    assert!(
        ran.stderr.starts_with(&format!("error: {path}:")),
        "{}",
        ran.stderr
    );
    let place = ran.stderr[format!("error: {path}:").len()..]
        .split(':')
        .take(2)
        .collect::<Vec<_>>();
    assert!(
        place.iter().all(|n| n.parse::<u32>().is_ok()),
        "line:col in {}",
        ran.stderr
    );
    assert_eq!(
        sluice
            .metrics()
            .await
            .value("sluice_config_generation", &[]),
        1.0,
        "unchanged"
    );
    let json = ctl(&sluice, &["--json", "reload"]).await;
    assert_eq!(json.code, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_with_a_reason_counted_and_change_nothing() {
    let (a, b) = (Backend::echo().await, Backend::echo().await);
    let sluice = Sluice::start(Fixture::front(&[a.addr, b.addr]).table(CONTROL)).await;
    let path = socket(&sluice);
    let before = listing(&sluice).await;
    let target = |extra: Value| {
        let mut v = json!({ "upstream": "app", "backend": a.addr.to_string() });
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v.to_string().into_bytes()
    };
    let cases: Vec<(&str, Vec<u8>, u16, &str, &str)> = vec![
        (
            "GET /v1/backend/state HTTP/1.1",
            target(json!({"state": "drain"})),
            405,
            "takes POST",
            "method_not_allowed",
        ),
        (
            "POST /v1/backends HTTP/1.1",
            vec![],
            405,
            "takes GET",
            "method_not_allowed",
        ),
        (
            "POST /v1/backend/state HTTP/1.1",
            b"{\"upstream\": ".to_vec(),
            400,
            "malformed request body",
            "bad_request",
        ),
        (
            "POST /v1/backend/state HTTP/1.1",
            target(json!({"state": "drain", "color": 1})),
            400,
            "unknown field `color`",
            "bad_request",
        ),
        (
            "POST /v1/backend/state HTTP/1.1",
            target(json!({"state": "asleep"})),
            400,
            "unknown state \"asleep\": expected ready, drain or maint",
            "bad_request",
        ),
        (
            "POST /v1/backend/state HTTP/1.1",
            target(json!({"state": "maint", "close_after": "1s"})),
            400,
            "close_after applies only to drain",
            "bad_request",
        ),
        (
            "POST /v1/backend/state HTTP/1.1",
            target(json!({"state": "drain", "close_after": "soon"})),
            400,
            "invalid close_after \"soon\"",
            "bad_request",
        ),
        (
            "POST /v1/backend/weight HTTP/1.1",
            target(json!({"weight": 1001})),
            400,
            "weight 1001 is out of range: 0 to 1000",
            "bad_request",
        ),
        (
            "POST /v1/backend/weight HTTP/1.1",
            target(json!({"weight": -1})),
            400,
            "malformed request body",
            "bad_request",
        ),
        (
            "POST /v1/backend/state HTTP/1.1",
            vec![b' '; 70 * 1024],
            413,
            "larger than 65536 bytes",
            "bad_request",
        ),
        (
            "POST /v1/backend/state HTTP/1.1",
            json!({"upstream": "db", "backend": "x", "state": "drain"})
                .to_string()
                .into_bytes(),
            404,
            "unknown upstream \"db\"; the upstreams are: app",
            "not_found",
        ),
        (
            "POST /v1/backend/state HTTP/1.1",
            json!({"upstream": "app", "backend": "127.0.0.1:1", "state": "drain"})
                .to_string()
                .into_bytes(),
            404,
            &*Box::leak(
                format!(
                    "unknown backend \"127.0.0.1:1\" in upstream \"app\"; its backends are: {}, {}",
                    a.addr, b.addr
                )
                .into_boxed_str(),
            ),
            "not_found",
        ),
        (
            "POST /v1/backend/close HTTP/1.1",
            json!({"upstream": "app", "backend": "nope"})
                .to_string()
                .into_bytes(),
            404,
            "unknown backend \"nope\"",
            "not_found",
        ),
        (
            "GET /v1/nothing HTTP/1.1",
            vec![],
            404,
            "no such route; the routes are /v1/backends",
            "not_found",
        ),
    ];
    for (head, body, code, message, _) in &cases {
        let (got, answer) = request(&path, head, body).await;
        assert_eq!(got, *code, "{head}: {answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(message),
            "{head}: {error:?} lacks {message:?}"
        );
    }
    // Each counted by result; nothing changed.
    let m = sluice.metrics().await;
    for result in ["method_not_allowed", "bad_request", "not_found"] {
        let expected = cases.iter().filter(|c| c.4 == result).count() as f64;
        let counted: f64 = [
            "backends",
            "backend/state",
            "backend/weight",
            "backend/close",
            "unknown",
        ]
        .iter()
        .map(|r| ctl_count(&m, r, result))
        .sum();
        assert_eq!(counted, expected, "{result}");
    }
    let after = listing(&sluice).await;
    assert_eq!(before["upstreams"], after["upstreams"], "nothing changed");
    assert!(
        !sluice
            .config_path
            .parent()
            .unwrap()
            .join("ctl-state.json")
            .exists(),
        "nothing saved"
    );
    // A client that never finishes its headers is dropped (hyper's header timeout), and
    // the socket still serves others meanwhile.
    let mut slow = UnixStream::connect(&path).await.unwrap();
    slow.write_all(b"GET /v1/backends HTTP/1.1\r\n")
        .await
        .unwrap();
    assert_eq!(listing(&sluice).await["upstreams"], after["upstreams"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tcp_socket_needs_the_bearer_token() {
    let a = Backend::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let control = format!(
        "[control]\nsocket = \"ctl.sock\"\ntcp = \"127.0.0.1:0\"\ntoken_file = \"{}\"",
        token_file.display()
    );
    let sluice = Sluice::start(Fixture::front(&[a.addr]).table(&control)).await;
    sluice
        .wait_log("the control token file is readable by other users")
        .await;
    let (_, control) = request(&socket(&sluice), "GET /v1/control HTTP/1.1", b"").await;
    let tcp: std::net::SocketAddr = control["tcp"].as_str().unwrap().parse().unwrap();
    assert!(tcp.ip().is_loopback() && tcp.port() != 0);
    let body = json!({"ready": false}).to_string();
    for auth in [
        "",
        "Authorization: Bearer wrong\r\n",
        "Authorization: s3cret-token\r\n",
        "Authorization: Bearer s3cret-token-and-more\r\n",
    ] {
        let head = format!("POST /v1/readiness HTTP/1.1\r\n{}", auth.trim_end());
        let (code, answer) = raw(
            TcpStream::connect(tcp).await.unwrap(),
            head.trim_end(),
            body.as_bytes(),
        )
        .await;
        assert_eq!(code, 401, "{auth:?}: {answer}");
    }
    assert_eq!(sluice.get("/readyz").await.0, 200, "nothing changed");
    let head = "POST /v1/readiness HTTP/1.1\r\nAuthorization: Bearer s3cret-token";
    let (code, _) = raw(
        TcpStream::connect(tcp).await.unwrap(),
        head,
        body.as_bytes(),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(sluice.get("/readyz").await.0, 503);
    sluice
        .wait_log("process readiness set: /readyz answers 503 by=token")
        .await;
    let m = sluice.metrics().await;
    assert_eq!(ctl_count(&m, "readiness", "unauthorized"), 4.0);
    // sluice ctl over TCP: the right token, then a wrong one (exit 4).
    let args = |file: &Path| {
        vec![
            "--tcp".to_string(),
            tcp.to_string(),
            "--token-file".to_string(),
            file.display().to_string(),
            "ready-process".to_string(),
        ]
    };
    let ran = ctl_args(args(&token_file)).await;
    assert_eq!(ran.code, 0, "{ran:?}");
    assert_eq!(sluice.get("/readyz").await.0, 200);
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "nope\n").unwrap();
    let ran = ctl_args(args(&wrong)).await;
    assert_eq!(ran.code, 4, "{ran:?}");
    assert!(
        ran.stderr.contains("missing or wrong bearer token"),
        "{}",
        ran.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_control_socket_without_a_token_or_off_loopback_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    for (control, message) in [
        ("tcp = \"127.0.0.1:9999\"", "`tcp` needs a `token_file`"),
        (
            "tcp = \"0.0.0.0:9999\"\ntoken_file = \"t\"",
            "`tcp` must be a loopback address",
        ),
        ("socket = \"\"", "`socket` must not be empty"),
        ("sockets = \"x\"", "unknown field `sockets`"),
    ] {
        let path = dir.path().join("c.toml");
        let text = format!(
            "{}\n[control]\n{control}\n",
            Fixture::front(&["127.0.0.1:1".parse().unwrap()])
        );
        std::fs::write(&path, &text).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("check")
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{control}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(message), "{control}: {stderr}");
        assert!(
            stderr.contains(&format!("{}:", path.display())),
            "file:line:col: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_directory_that_is_missing_or_world_writable_fails_the_start() {
    let a = Backend::echo().await;
    let open = tempfile::tempdir().unwrap();
    std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    for (socket, message) in [
        (
            "/nonexistent/sluice/ctl.sock".to_string(),
            "the directory /nonexistent/sluice does not exist",
        ),
        (
            open.path().join("ctl.sock").display().to_string(),
            "is writable by every user",
        ),
    ] {
        let control = format!("[control]\nsocket = \"{socket}\"");
        let failed = Sluice::with(Fixture::front(&[a.addr]).table(&control))
            .start_fails()
            .await;
        assert_eq!(failed.status.code(), Some(1));
        assert!(failed.stderr.contains(message), "{}", failed.stderr);
        assert!(
            !failed.stdout.contains("listening listener="),
            "nothing bound first"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_socket_is_replaced_and_a_live_one_refused() {
    let a = Backend::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl.sock");
    let control = format!("[control]\nsocket = \"{}\"", path.display());
    // Left by a crashed process: the file, nobody listening.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let first = Sluice::start(Fixture::front(&[a.addr]).table(&control)).await;
    first.wait_log("removing a stale control socket").await;
    assert!(
        ctl_args(vec![
            "--socket".into(),
            path.display().to_string(),
            "backends".into()
        ])
        .await
        .code
            == 0
    );
    // A second sluice on the same socket is refused, and the first keeps it.
    let failed = Sluice::with(Fixture::front(&[a.addr]).table(&control))
        .start_fails()
        .await;
    assert!(
        failed.stderr.contains("another sluice is listening on it"),
        "{}",
        failed.stderr
    );
    assert!(
        ctl_args(vec![
            "--socket".into(),
            path.display().to_string(),
            "backends".into()
        ])
        .await
        .code
            == 0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sluice_ctl_exit_codes_say_what_went_wrong() {
    let a = Backend::echo().await;
    let sluice = Sluice::start(Fixture::front(&[a.addr]).table(CONTROL)).await;
    let addr = a.addr.to_string();
    // Done.
    let table = ctl_ok(&sluice, &["backends"]).await;
    let mut lines = table.lines();
    assert!(
        lines.next().unwrap().starts_with("UPSTREAM  BACKEND"),
        "{table}"
    );
    assert!(
        lines
            .next()
            .unwrap()
            .starts_with(&format!("app       {addr}  up      ready")),
        "{table}"
    );
    let json: Value =
        serde_json::from_str(&ctl_ok(&sluice, &["--json", "backends"]).await).unwrap();
    assert_eq!(json["upstreams"][0]["backends"][0]["admin_state"], "ready");
    // Unknown backend or upstream: 3, naming what exists.
    for args in [["drain", "app", "127.0.0.1:1"], ["drain", "db", &addr]] {
        let ran = ctl(&sluice, &args).await;
        assert_eq!(ran.code, 3, "{ran:?}");
        assert!(ran.stderr.contains("are: "), "{}", ran.stderr);
    }
    // A bad value: 64, before anything is sent; out of range: 64 from sluice.
    for weight in ["heavy", "1001"] {
        let ran = ctl(&sluice, &["weight", "app", &addr, weight]).await;
        assert_eq!(ran.code, 64, "{ran:?}");
    }
    // The command line itself: clap's 2.
    assert_eq!(ctl(&sluice, &["drain", "app"]).await.code, 2);
    // Not running: no socket, or a socket nobody listens on.
    let dir = tempfile::tempdir().unwrap();
    let ran = ctl_args(vec![
        "--socket".into(),
        dir.path().join("none.sock").display().to_string(),
        "backends".into(),
    ])
    .await;
    assert_eq!(ran.code, 5, "{ran:?}");
    assert!(
        ran.stderr.contains("cannot reach sluice's control socket"),
        "{}",
        ran.stderr
    );
    // --config finds the socket in the config file.
    let ran = ctl_args(vec![
        "--config".into(),
        sluice.config_path.display().to_string(),
        "backends".into(),
    ])
    .await;
    assert_eq!(ran.code, 0, "{ran:?}");
    // A config without [control]: nothing to talk to.
    let bare = dir.path().join("bare.toml");
    std::fs::write(&bare, Fixture::front(&[a.addr]).toml()).unwrap();
    let ran = ctl_args(vec![
        "--config".into(),
        bare.display().to_string(),
        "backends".into(),
    ])
    .await;
    assert_eq!(ran.code, 5, "{ran:?}");
    assert!(
        ran.stderr.contains("has no [control] table"),
        "{}",
        ran.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_with_close_after_closes_what_is_left_then() {
    let a = tagged(b'a').await;
    let b = tagged(b'b').await;
    let sluice = Sluice::start(
        Fixture::front(&[a.addr, b.addr])
            .upstream_keys("balance = \"round_robin\"")
            .table(CONTROL),
    )
    .await;
    let mut on_a = Vec::new();
    while on_a.len() < 2 {
        let s = Stream::open(&sluice).await;
        if s.tag == b'a' {
            on_a.push(s);
        }
    }
    ctl_ok(
        &sluice,
        &[
            "drain",
            "app",
            &a.addr.to_string(),
            "--close-after",
            "300ms",
        ],
    )
    .await;
    // Nothing else ends them: the close after 300 ms does.
    for s in on_a.iter_mut() {
        assert_eq!(until_closed(&mut s.s).await.unwrap(), 0);
    }
    sluice
        .wait_log("drain's close_after passed: closing the backend's connections")
        .await;
    // A drain replaced before its time is over: ready again.
    ctl_ok(
        &sluice,
        &["drain", "app", &a.addr.to_string(), "--close-after", "1h"],
    )
    .await;
    ctl_ok(&sluice, &["ready", "app", &a.addr.to_string()]).await;
    assert_eq!(
        backend(&listing(&sluice).await, a.addr)["admin_state"],
        "ready"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_are_closed_and_the_socket_serves_again_once_they_go() {
    let a = Backend::echo().await;
    let sluice = Sluice::start(Fixture::front(&[a.addr]).table(CONTROL)).await;
    let path = socket(&sluice);
    // 64 clients that never send a request hold every slot.
    let mut idle = Vec::new();
    for _ in 0..64 {
        idle.push(UnixStream::connect(&path).await.unwrap());
    }
    let mut over = UnixStream::connect(&path).await.unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(STUCK, over.read(&mut buf))
        .await
        .expect("closed");
    assert!(matches!(n, Ok(0) | Err(_)), "the 65th is closed: {n:?}");
    sluice
        .wait_log("control socket: too many connections open")
        .await;
    drop(idle);
    eventually("the socket to serve again", async || {
        let mut s = UnixStream::connect(&path).await.unwrap();
        let _ = s
            .write_all(b"GET /v1/backends HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n")
            .await;
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer).await;
        answer.starts_with(b"HTTP/1.1 200")
    })
    .await;
}

/// The socket's mode is what keeps other users out: with its directory open to all,
/// another uid still cannot connect (exit 4), and nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_user_is_not_permitted() {
    let a = Backend::echo().await;
    let sluice = Sluice::start(Fixture::front(&[a.addr]).table(CONTROL)).await;
    let path = socket(&sluice);
    let dir = path.parent().unwrap().to_path_buf();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    let target = path.display().to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_sluice"))
            .args(["ctl", "--socket", &target, "unready"])
            .output()
            .expect("setpriv (util-linux) is installed")
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("Permission denied"), "{stderr}");
    assert_eq!(sluice.get("/readyz").await.0, 200, "nothing changed");
}

/// Slow start ramps a backend an operator makes ready again, and the listing and the
/// metric show its effective weight below its weight while it ramps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_made_ready_again_is_ramped_by_slow_start() {
    let (a, b) = (tagged(b'a').await, tagged(b'b').await);
    let sluice = Sluice::start(
        Fixture::front(&[a.addr, b.addr])
            .upstream_keys("slow_start = \"1h\"")
            .table(CONTROL),
    )
    .await;
    let listed = backend(&listing(&sluice).await, a.addr);
    assert_eq!(
        listed["effective_weight"], 1.0,
        "no ramp at start: {listed}"
    );
    ctl_ok(&sluice, &["drain", "app", &a.addr.to_string()]).await;
    ctl_ok(&sluice, &["ready", "app", &a.addr.to_string()]).await;
    let listed = backend(&listing(&sluice).await, a.addr);
    let effective = listed["effective_weight"].as_f64().unwrap();
    // An hour's ramp from 10%: just above 0.1 for the first seconds.
    assert!((0.1..0.2).contains(&effective), "{listed}");
    assert_eq!(listed["weight"], 1, "{listed}");
    let m = sluice.metrics().await;
    let a_label = a.addr.to_string();
    let gauge = m.value(
        "sluice_backend_effective_weight",
        &[("backend", a_label.as_str())],
    );
    assert!((0.1..0.2).contains(&gauge), "{gauge}");
    let b_label = b.addr.to_string();
    assert_eq!(
        m.value(
            "sluice_backend_effective_weight",
            &[("backend", b_label.as_str())]
        ),
        1.0,
        "the other backend is not ramped"
    );
}
