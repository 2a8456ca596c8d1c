//! The dashboard and alert rules against the real thing: Debian's Prometheus scrapes a
//! real sluice while traffic flows (with rejections, connect errors, a queue, a reload,
//! and TLS handshakes that succeed and fail); every panel query must parse and return
//! data, and every alert rule must load and evaluate. The dashboard's structure is
//! checked field by field.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::pki::{self, Issued, Pki};
use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn dashboard() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards/sluice.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Every panel that is not a row, with its targets' expressions.
fn queries(d: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((
                p["title"].as_str().unwrap().to_string(),
                t["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    out
}

/// The expressions of the panel titled `title`.
fn panel_queries(d: &Value, title: &str) -> Vec<String> {
    let found: Vec<String> = queries(d)
        .into_iter()
        .filter(|(t, _)| t == title)
        .map(|(_, e)| e)
        .collect();
    assert!(!found.is_empty(), "no panel titled {title}");
    found
}

#[test]
fn the_dashboard_has_the_structure_grafana_expects() {
    let d = dashboard();
    let allowed_top = [
        "uid",
        "title",
        "description",
        "tags",
        "timezone",
        "editable",
        "graphTooltip",
        "schemaVersion",
        "version",
        "refresh",
        "time",
        "annotations",
        "templating",
        "panels",
    ];
    for k in d.as_object().unwrap().keys() {
        assert!(
            allowed_top.contains(&k.as_str()),
            "unknown dashboard field {k}"
        );
    }
    assert_eq!(d["uid"], "sluice-overview");
    assert!(d["schemaVersion"].as_u64().unwrap() >= 39);
    let vars: Vec<&str> = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(vars, ["datasource", "job", "instance"]);
    assert!(
        d["templating"]["list"][1]["query"]["query"]
            .as_str()
            .unwrap()
            .contains("sluice_build_info")
    );

    let allowed_panel = [
        "id",
        "type",
        "title",
        "description",
        "datasource",
        "gridPos",
        "fieldConfig",
        "options",
        "targets",
        "transformations",
        "collapsed",
        "panels",
    ];
    let allowed_target = [
        "refId",
        "datasource",
        "expr",
        "legendFormat",
        "range",
        "instant",
        "format",
    ];
    let mut ids = std::collections::HashSet::new();
    let mut rows = Vec::new();
    // (x, y, w, h, title) of every panel so far, to find overlaps.
    let mut placed: Vec<(u64, u64, u64, u64, String)> = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for k in p.as_object().unwrap().keys() {
            assert!(
                allowed_panel.contains(&k.as_str()),
                "unknown panel field {k} in {}",
                p["title"]
            );
        }
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate panel id");
        let g = &p["gridPos"];
        assert!(
            g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() <= 24,
            "{} overflows the grid",
            p["title"]
        );
        let (x, y, w, h) = (
            g["x"].as_u64().unwrap(),
            g["y"].as_u64().unwrap(),
            g["w"].as_u64().unwrap(),
            g["h"].as_u64().unwrap(),
        );
        let title = p["title"].as_str().unwrap().to_string();
        // Listed in reading order, so each panel sits under the row listed before it.
        if let Some(&(px, py, ..)) = placed.last() {
            assert!((y, x) > (py, px), "{title} is listed out of grid order");
        }
        for (ox, oy, ow, oh, other) in &placed {
            let apart = x + w <= *ox || *ox + *ow <= x || y + h <= *oy || *oy + *oh <= y;
            assert!(apart, "{title} overlaps {other}");
        }
        placed.push((x, y, w, h, title));
        let kind = p["type"].as_str().unwrap();
        if kind == "row" {
            rows.push(p["title"].as_str().unwrap().to_string());
            continue;
        }
        assert!(
            ["timeseries", "stat", "table", "heatmap"].contains(&kind),
            "panel type {kind}"
        );
        assert!(
            p["fieldConfig"]["defaults"]["unit"].is_string(),
            "{} has no unit",
            p["title"]
        );
        assert_eq!(p["datasource"]["uid"], "${datasource}");
        for t in p["targets"].as_array().unwrap() {
            for k in t.as_object().unwrap().keys() {
                assert!(
                    allowed_target.contains(&k.as_str()),
                    "unknown target field {k} in {}",
                    p["title"]
                );
            }
            let expr = t["expr"].as_str().unwrap();
            assert!(
                expr.contains("job=~\"$job\"") && expr.contains("instance=~\"$instance\""),
                "{expr}"
            );
            if expr.contains("rate(") {
                assert!(
                    expr.contains("[$__rate_interval]"),
                    "rates use $__rate_interval: {expr}"
                );
            }
        }
    }
    assert_eq!(
        rows,
        [
            "Traffic",
            "Errors",
            "Latency",
            "Saturation",
            "Backends",
            "TLS",
            "Config",
            "Process",
            "Discovery",
            "Clients held back"
        ]
    );
}

#[test]
fn the_dashboard_type_checks_against_grafanas_published_schema() {
    // `const d: Dashboard = {...}` under tsc --strict: a misspelled or misplaced field
    // is an excess property, a missing required one an error.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/grafana-schema");
    let tsc = dir.join("node_modules/.bin/tsc");
    assert!(
        tsc.exists(),
        "make deps-test installs @grafana/schema and typescript into {}",
        dir.display()
    );
    let json = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards/sluice.json"),
    )
    .unwrap();
    let file = dir.join(format!("check-{}.ts", std::process::id()));
    std::fs::write(
        &file,
        format!("import type {{ Dashboard }} from \"@grafana/schema\";\nconst dashboard: Dashboard = {json};\nexport default dashboard;\n"),
    )
    .unwrap();
    let out = Command::new(&tsc)
        .args([
            "--strict",
            "--noEmit",
            "--skipLibCheck",
            "--moduleResolution",
            "node",
            "--module",
            "commonjs",
            "--target",
            "es2020",
        ])
        .arg(&file)
        .current_dir(&dir)
        .output()
        .unwrap();
    std::fs::remove_file(&file).unwrap();
    assert!(
        out.status.success(),
        "tsc:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// How long Prometheus may take to start, scrape and evaluate: it is slower than sluice.
const SLOW: Duration = Duration::from_secs(60);

/// Debian's prometheus on a port of its own choosing, killed (by its pid) when dropped.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards/alerts.yml");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
                 rule_files: [\"{}\"]\n\
                 scrape_configs:\n  - job_name: sluice\n    static_configs: [{{targets: [\"{target}\"]}}]\n",
                rules.display()
            ),
        )
        .unwrap();
        let mut child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg("--web.listen-address=127.0.0.1:0")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("prometheus is installed (make test installs Debian's prometheus)");
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                if line.contains("msg=\"Listening on\"") {
                    let addr = line.rsplit("address=").next().unwrap().trim().to_string();
                    let _ = tx.send(addr);
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("prometheus listening")
            .parse()
            .unwrap();
        Prometheus {
            child,
            addr,
            _dir: dir,
        }
    }

    /// Waits until the storage is open and queries are answered.
    async fn ready(&self) {
        eventually_within("prometheus ready", SLOW, async || {
            http_get(self.addr, "/-/ready").await.0 == 200
        })
        .await
    }

    async fn query(&self, expr: &str) -> Value {
        let (code, body) =
            http_get(self.addr, &format!("/api/v1/query?query={}", encode(expr))).await;
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        assert_eq!(code, 200, "{expr}: {body}");
        v
    }

    /// The labels and values of an instant query's result.
    async fn series(&self, expr: &str) -> Vec<(Value, f64)> {
        let v = self.query(expr).await;
        v["data"]["result"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                let value = r["value"][1].as_str().unwrap().parse().unwrap();
                (r["metric"].clone(), value)
            })
            .collect()
    }

    async fn wait_for(&self, expr: &str) {
        eventually_within(&format!("prometheus to have {expr}"), SLOW, async || {
            let v = self.query(expr).await;
            let found = v["data"]["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty());
            if found { Ok(()) } else { Err(v) }
        })
        .await
    }

    /// The number of samples of sluice Prometheus has scraped so far.
    async fn scrapes(&self) -> f64 {
        let series = self.series("count_over_time(sluice_build_info[1h])").await;
        series.first().map_or(0.0, |(_, n)| *n)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn substitute(expr: &str, instance: &str) -> String {
    expr.replace("$__rate_interval", "15s")
        .replace("$__range", "5m")
        .replace("$job", "sluice")
        .replace("$instance", instance)
}

/// `front` (queueing at one connection per backend) and `broken` (a refusing backend),
/// plus `tls` terminating TLS with `cert` in front of the same echo backend, through an
/// upstream of its own so that its clients never take `front`'s one slot.
/// With an upstream `named` whose backend is a name that `dns` resolves, for the
/// discovery row.
fn traffic_config(
    echo: SocketAddr,
    dead: SocketAddr,
    weight: u32,
    cert: &Issued,
    dns: SocketAddr,
) -> Fixture {
    Fixture::new()
        .table(&format!(
            "[resolver]\nnameservers = [\"{dns}\"]\nmin_interval = \"100ms\"\nmax_interval = \"1s\""
        ))
        .listener("front")
        .to("app")
        .listener("broken")
        .to("dead")
        .listener("tls")
        .to("secured")
        .listener_table(
            "tls",
            &format!(
                "certificates = [{{ cert = {:?}, key = {:?} }}]\nhandshake_timeout = \"10s\"",
                cert.cert, cert.key
            ),
        )
        .upstream("app")
        .upstream_keys("max_connections_per_backend = 1\nqueue = { max = 10, timeout = \"30s\" }")
        .weighted(&[(echo, weight)])
        .upstream("dead")
        .upstream_keys("retries = 0")
        .backend(dead)
        .upstream("secured")
        .backend(echo)
        .upstream("named")
        .upstream_keys(&format!(
            "backend = [{{ address = \"echo.test:{}\" }}]",
            echo.port()
        ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_query_returns_data_from_a_real_prometheus() {
    let pki = Pki::new();
    pki.ca("ca");
    let cert = pki.leaf("ca", "srv", &["srv.test"], 30);
    let client = pki::client_config(&pki.path("ca.pem"), None);
    let echo = tagged(b'e').await;
    let dead = refusing();
    let dns = Dns::start(&["127.0.0.1 echo.test"], &[], 1).await;
    let sluice = Sluice::start(traffic_config(echo.addr, dead.addr, 1, &cert, dns.addr)).await;
    let prometheus = Prometheus::start(sluice.admin);
    let instance = sluice.admin.to_string();
    prometheus.ready().await;
    prometheus.wait_for("sluice_build_info").await;

    // Traffic, rejections and connect errors, a client reset, a queue, a reload, and TLS handshakes
    // (one good, one failed per round), spread over a few scrapes so that rates have
    // samples on both sides.
    for round in 0..3 {
        let (holder, _) = connect_tagged(sluice.addr("front"), None).await;
        let mut queued = tokio::net::TcpStream::connect(sluice.addr("front"))
            .await
            .unwrap();
        sluice
            .wait_metrics("a queued client", |m| {
                m.value("sluice_queue_length", &[]) == 1.0
            })
            .await;
        // Reset, not closed: the panel of connections ended early needs one.
        holder.set_zero_linger().unwrap();
        drop(holder);
        assert_eq!(read_n(&mut queued, 1).await, b"e");
        drop(queued);
        let mut s = tokio::net::TcpStream::connect(sluice.addr("broken"))
            .await
            .unwrap();
        until_closed(&mut s).await.ok();

        // A verified handshake, then the echo backend's tag through TLS.
        let tcp = tokio::net::TcpStream::connect(sluice.addr("tls"))
            .await
            .unwrap();
        let mut tls = pki::tls_over(tcp, client.clone(), "srv.test")
            .await
            .expect("TLS handshake with sluice");
        let mut tag = [0u8; 1];
        tls.read_exact(&mut tag).await.unwrap();
        assert_eq!(&tag, b"e");
        drop(tls);
        // Plain HTTP on the TLS port: a failed handshake (protocol_error), rejected.
        let mut plain = tokio::net::TcpStream::connect(sluice.addr("tls"))
            .await
            .unwrap();
        plain
            .write_all(b"GET / HTTP/1.1\r\nHost: srv.test\r\n\r\n")
            .await
            .unwrap();
        tokio::time::timeout(PROMPTLY, until_closed(&mut plain))
            .await
            .expect("sluice closes a client that does not speak TLS")
            .ok();

        if round == 1 {
            sluice.rewrite(traffic_config(echo.addr, dead.addr, 2, &cert, dns.addr));
            sluice.wait_generation(1).await;
        }
        // Each round's traffic in a scrape of its own (rates need a sample on each
        // side): wait for the scrape after this round, and one more after that.
        let scraped = prometheus.scrapes().await;
        eventually_within("two scrapes after the round", SLOW, async || {
            prometheus.scrapes().await >= scraped + 2.0
        })
        .await;
    }
    prometheus.wait_for("sluice_config_generation == 1").await;
    prometheus
        .wait_for("sluice_queue_wait_duration_seconds_count > 0")
        .await;
    prometheus
        .wait_for("sluice_tls_handshakes_total{listener=\"tls\",result=\"success\"} >= 3")
        .await;
    prometheus
        .wait_for("sluice_tls_handshakes_total{listener=\"tls\",result=\"protocol_error\"} >= 3")
        .await;

    // Data means at least one sample that is a number: a query whose every sample is
    // NaN (a quantile or ratio of nothing) shows an empty panel too.
    let mut failures = Vec::new();
    for (title, expr) in queries(&dashboard()) {
        let q = substitute(&expr, &instance);
        let v = prometheus.query(&q).await;
        let ok = v["status"] == "success"
            && v["data"]["result"].as_array().is_some_and(|r| {
                r.iter().any(|s| {
                    s["value"][1]
                        .as_str()
                        .and_then(|x| x.parse::<f64>().ok())
                        .is_some_and(f64::is_finite)
                })
            });
        if !ok {
            failures.push(format!("{title}: {q}\n  -> {v}"));
        }
    }
    assert!(
        failures.is_empty(),
        "panel queries without data:\n{}",
        failures.join("\n")
    );

    // The TLS panels show what happened: both results, a ratio strictly between 0 and
    // 1, a handshake time, and the certificate's days left as openssl reads them.
    let d = dashboard();
    let tls_series = |title: &str, i: usize| substitute(&panel_queries(&d, title)[i], &instance);
    let by_result = prometheus
        .series(&tls_series("TLS handshakes /s by result", 0))
        .await;
    for result in ["success", "protocol_error"] {
        assert!(
            by_result
                .iter()
                .any(|(m, v)| m["listener"] == "tls" && m["result"] == result && *v > 0.0),
            "no {result} handshakes: {by_result:?}"
        );
    }
    let ratio = prometheus
        .series(&tls_series("TLS handshake failure ratio", 0))
        .await;
    let [(m, r)] = ratio.as_slice() else {
        panic!("one ratio, of listener tls: {ratio:?}")
    };
    assert!(m["listener"] == "tls" && *r > 0.0 && *r < 1.0, "{ratio:?}");
    let p99 = prometheus
        .series(&tls_series("TLS handshake time", 1))
        .await;
    let [(m, t)] = p99.as_slice() else {
        panic!("one p99, of listener tls: {p99:?}")
    };
    assert!(m["listener"] == "tls" && *t > 0.0 && *t < 10.0, "{p99:?}");
    let days = prometheus
        .series(&tls_series("Days until certificate expiry", 0))
        .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let expected = (pki::not_after(&cert.cert) as f64 - now) / 86400.0;
    let label = cert.cert.display().to_string();
    let [(m, left)] = days.as_slice() else {
        panic!("one certificate: {days:?}")
    };
    assert!(
        m["listener"] == "tls" && m["certificate"] == label.as_str(),
        "{days:?}"
    );
    assert!(
        (left - expected).abs() < 0.01,
        "expected {expected} days left for {label}: {days:?}"
    );

    // Every alert rule loaded and evaluated without error.
    eventually_within("every alert rule evaluated", SLOW, async || {
        let (_, body) = http_get(prometheus.addr, "/api/v1/rules").await;
        let v: Value = serde_json::from_str(&body).unwrap();
        let rules: Vec<&Value> = v["data"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap())
            .collect();
        assert_eq!(rules.len(), 9);
        let bad: Vec<String> = rules
            .iter()
            .filter(|r| r["health"] == "err")
            .map(|r| format!("{}: {}", r["name"], r["lastError"]))
            .collect();
        assert!(bad.is_empty(), "alert rules failed: {bad:?}");
        let evaluated = rules.iter().all(|r| r["health"] == "ok");
        if evaluated { Ok(()) } else { Err(body.clone()) }
    })
    .await;
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("promtool is installed");
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
