//! `make bench`: sluice against a direct connection on loopback, the same workload
//! alternated direct / sluice for several rounds, medians reported.
//!
//! Targets: the direct path, sluice, and HAProxy and nginx (stream) with equivalent
//! configs (benches/peers.rs), each started on loopback by the benchmark.
//!
//! Workloads: bulk throughput (one stream into a sink), new connections per second (with
//! sluice's CPU time per connection), 64-byte ping-pong latency on one connection, and
//! sluice's resident memory per idle proxied connection. The load generator and the
//! backends run in this process, on the same two cores as sluice: figures are for
//! comparison within one run, not absolute capacity.
//!
//! `SLUICE_BENCH_QUICK=1` shortens every workload. Results go to stdout and to
//! `target/bench/results.md`.
//!
//! For iteration, `SLUICE_BENCH_ONLY=wrk,ping` runs only the named workloads (`iperf`,
//! `wrk`, `bulk`, `conns`, `ping`, `idle`, `scale`), and `SLUICE_BENCH_ALSO=copy`
//! adds sluice variants as extra columns, each a second sluice process with one more
//! config line (see [`VARIANTS`]); the ratio column stays the default sluice's.
//! `SLUICE_BENCH_ALSO=limits` adds one with every listener's access lists and per-client
//! limits on ([`LIMITS`]): `make bench-quick` with limits off and on, side by side.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;
mod peers;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Backend, Fixture, Sluice};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Plan {
    rounds: usize,
    bulk_bytes: u64,
    connections: usize,
    workers: usize,
    pings: usize,
    idle: usize,
    /// Length of each wrk and iperf3 run.
    seconds: u32,
    /// Connections held through sluice at once in the scale run, and its rounds.
    scale: usize,
    scale_rounds: usize,
}

const FULL: Plan = Plan {
    rounds: 5,
    bulk_bytes: 2 << 30,
    connections: 10_000,
    workers: 16,
    pings: 20_000,
    idle: 8_000,
    seconds: 2,
    scale: 9_000,
    scale_rounds: 10,
};

const QUICK: Plan = Plan {
    rounds: 3,
    bulk_bytes: 256 << 20,
    connections: 2_000,
    workers: 16,
    pings: 5_000,
    idle: 1_000,
    seconds: 1,
    scale: 2_000,
    scale_rounds: 3,
};

/// Extra sluice targets for `SLUICE_BENCH_ALSO`: a name and the top-level config it adds.
const VARIANTS: &[(&str, &str)] = &[
    ("copy", "[relay]\nsplice = false\n"),
    ("splice", "[relay]\nsplice = true\n"),
    ("per_core", "[runtime]\nmode = \"per_core\"\n"),
    ("multi_thread", "[runtime]\nmode = \"multi_thread\"\n"),
];

/// `SLUICE_BENCH_ALSO=limits`: every listener with `allow`/`deny` and both per-client
/// limits on, set high enough that the benchmark's one client address is never refused,
/// so the run measures what admission costs (issue 17: limits on and off).
const LIMITS: &str = "allow = [\"127.0.0.0/8\", \"::1\"]\ndeny = [\"192.0.2.0/24\"]\nmax_connections_per_client = 100000\nclient_rate = { per_second = 1000000, burst = 1000000 }";

/// Whether `SLUICE_BENCH_ONLY` (unset: every workload) names `workload`.
fn runs(workload: &str) -> bool {
    std::env::var("SLUICE_BENCH_ONLY")
        .map_or(true, |only| only.split(',').any(|w| w.trim() == workload))
}

fn main() {
    // `cargo bench` passes --bench; nothing here is filtered.
    let plan = if std::env::var_os("SLUICE_BENCH_QUICK").is_some() {
        QUICK
    } else {
        FULL
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let report = runtime.block_on(run(plan));
    print!("{report}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("results.md"), &report).unwrap();
    eprintln!("written to {}", dir.join("results.md").display());
}

/// A proxy under test, or the direct path, with where its routes listen.
struct Target {
    name: &'static str,
    echo: SocketAddr,
    sink: SocketAddr,
    iperf: SocketAddr,
    http: SocketAddr,
    /// The process whose tree's CPU and memory are measured; `None` for direct.
    pid: Option<u32>,
}

impl Target {
    fn new(name: &'static str, routes: &[(&'static str, SocketAddr)], pid: Option<u32>) -> Target {
        let at = |route: &str| {
            routes
                .iter()
                .find(|(n, _)| *n == route)
                .map(|(_, a)| *a)
                .unwrap()
        };
        Target {
            name,
            echo: at("echo"),
            sink: at("sink"),
            iperf: at("iperf"),
            http: at("http"),
            pid,
        }
    }
}

async fn run(plan: Plan) -> String {
    let echo = Backend::echo().await;
    let sink = Backend::start(sink).await;
    let iperf = peers::iperf3_server();
    let http = peers::http_backend();
    let routes: Vec<(&'static str, SocketAddr)> = vec![
        ("echo", echo.addr),
        ("sink", sink.addr),
        iperf.routes[0],
        http.routes[0],
    ];
    let build = |listener_keys: &str| {
        let mut config = Fixture::new();
        for (name, _) in &routes {
            config = config
                .listener(name)
                .to(name)
                .listener_keys("max_connections = 9000")
                .listener_keys(listener_keys);
        }
        for (name, backend) in &routes {
            config = config.upstream(name).backend(*backend);
        }
        config
    };
    let config = build("");
    let sluice = Sluice::with(&config).quiet().start().await;
    let through = |s: &Sluice| -> Vec<(&'static str, SocketAddr)> {
        routes.iter().map(|(n, _)| (*n, s.addr(n))).collect()
    };
    let mut targets = vec![
        Target::new("direct", &routes, None),
        Target::new("sluice", &through(&sluice), Some(sluice.pid())),
    ];
    // Variants before the peers: `table_row` takes every column after them as a peer.
    let also = std::env::var("SLUICE_BENCH_ALSO").unwrap_or_default();
    let mut variants = Vec::new();
    for name in also.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let variant_config = if name == "limits" {
            build(LIMITS)
        } else {
            let (_, extra) = VARIANTS
                .iter()
                .find(|(n, _)| *n == name)
                .unwrap_or_else(|| panic!("SLUICE_BENCH_ALSO: no variant {name:?}; see VARIANTS"));
            config.clone().table(extra)
        };
        let name = VARIANTS
            .iter()
            .map(|(n, _)| *n)
            .chain(["limits"])
            .find(|n| *n == name)
            .unwrap_or("limits");
        let variant = Sluice::with(variant_config).quiet().start().await;
        targets.push(Target::new(name, &through(&variant), Some(variant.pid())));
        variants.push(variant);
    }
    let first_peer = targets.len();
    let peers = peers::start(&routes).await;
    for p in &peers {
        targets.push(Target::new(p.name, &p.routes, Some(p.pid())));
    }

    let n = targets.len();
    let mut bulk = vec![Vec::new(); n];
    let mut conns = vec![Vec::new(); n];
    let mut cpu = vec![Vec::new(); n];
    let mut p50 = vec![Vec::new(); n];
    let mut p99 = vec![Vec::new(); n];
    let mut iperf1 = vec![Vec::new(); n];
    let mut iperf4 = vec![Vec::new(); n];
    let mut keepalive = vec![Vec::new(); n];
    let mut keepalive_cpu = vec![Vec::new(); n];
    let mut per_request = vec![Vec::new(); n];
    let mut per_request_cpu = vec![Vec::new(); n];
    for round in 0..plan.rounds {
        eprintln!("round {}/{}", round + 1, plan.rounds);
        for (i, t) in targets.iter().enumerate() {
            if runs("iperf") {
                iperf1[i].push(iperf3_gbit(t.iperf, 1, plan.seconds));
                iperf4[i].push(iperf3_gbit(t.iperf, 4, plan.seconds));
            }
            if runs("wrk") {
                let (rate, cpu_us) = wrk(t.http, t.pid, false, plan.seconds);
                keepalive[i].push(rate);
                keepalive_cpu[i].extend(cpu_us);
                let (rate, cpu_us) = wrk(t.http, t.pid, true, plan.seconds);
                per_request[i].push(rate);
                per_request_cpu[i].extend(cpu_us);
            }
            if runs("bulk") {
                bulk[i].push(bulk_gbit(t.sink, plan.bulk_bytes).await);
            }
            if runs("conns") {
                let before = t.pid.map(tree_cpu_seconds);
                conns[i].push(connections_per_sec(t.echo, plan.connections, plan.workers).await);
                if let (Some(pid), Some(before)) = (t.pid, before) {
                    cpu[i].push((tree_cpu_seconds(pid) - before) * 1e6 / plan.connections as f64);
                }
            }
            if runs("ping") {
                let (a, b) = ping_pong(t.echo, plan.pings).await;
                p50[i].push(a);
                p99[i].push(b);
            }
        }
    }
    let mut idle = vec![f64::NAN; n];
    for (i, t) in targets.iter().enumerate() {
        if let Some(pid) = t.pid
            && runs("idle")
        {
            idle[i] = idle_memory(pid, t.echo, plan.idle).await;
        }
    }

    let scaled = if runs("scale") {
        scale(
            sluice.pid(),
            sluice.addr("echo"),
            plan.scale,
            plan.scale_rounds,
        )
        .await
    } else {
        "Scale: not run (SLUICE_BENCH_ONLY).".to_string()
    };

    let names: Vec<&str> = targets.iter().map(|t| t.name).collect();
    let mut out = String::new();
    writeln!(
        out,
        "| workload | {} | sluice / best peer |",
        names.join(" | ")
    )
    .unwrap();
    writeln!(out, "|---|{}---|", "---|".repeat(n)).unwrap();
    let medians = |v: &mut Vec<Vec<f64>>| -> Vec<f64> {
        v.iter_mut()
            .map(|x| if x.is_empty() { f64::NAN } else { median(x) })
            .collect()
    };
    let s = plan.seconds;
    let rows: [(String, &mut Vec<Vec<f64>>, usize, bool); 6] = [
        (
            format!("HTTP keep-alive, wrk -t1 -c64 -d{s}s to nginx: req/s"),
            &mut keepalive,
            0,
            true,
        ),
        (
            "proxy CPU per request (µs)".to_string(),
            &mut keepalive_cpu,
            2,
            false,
        ),
        (
            format!("new connection per request, wrk -t1 -c64 -d{s}s, Connection: close: conn/s"),
            &mut per_request,
            0,
            true,
        ),
        (
            "proxy CPU per connection, wrk (µs)".to_string(),
            &mut per_request_cpu,
            1,
            false,
        ),
        (
            format!("bulk, iperf3 1 stream, {s} s: Gbit/s"),
            &mut iperf1,
            1,
            true,
        ),
        (
            format!("bulk, iperf3 4 streams, {s} s: Gbit/s"),
            &mut iperf4,
            1,
            true,
        ),
    ];
    for (label, values, digits, higher) in rows {
        table_row(
            &mut out,
            &label,
            &medians(values),
            first_peer,
            digits,
            higher,
        );
    }
    table_row(
        &mut out,
        "bulk, 1 stream: Gbit/s",
        &medians(&mut bulk),
        first_peer,
        1,
        true,
    );
    let label = format!(
        "new connection per exchange ({} workers): conn/s",
        plan.workers
    );
    table_row(&mut out, &label, &medians(&mut conns), first_peer, 0, true);
    table_row(
        &mut out,
        "proxy CPU per connection (µs)",
        &medians(&mut cpu),
        first_peer,
        1,
        false,
    );
    table_row(
        &mut out,
        "ping-pong 64 B, p50 (µs)",
        &medians(&mut p50),
        first_peer,
        1,
        false,
    );
    table_row(
        &mut out,
        "ping-pong 64 B, p99 (µs)",
        &medians(&mut p99),
        first_peer,
        1,
        false,
    );
    let label = format!(
        "proxy memory per idle proxied connection ({} held, KiB)",
        plan.idle
    );
    table_row(&mut out, &label, &idle, first_peer, 1, false);
    writeln!(
        out,
        "\nMedians of {} rounds, each running every target in turn. {} cores; {}. Peers: {}.",
        plan.rounds,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
        peers
            .iter()
            .map(|p| p.version.as_str())
            .collect::<Vec<_>>()
            .join("; ")
    )
    .unwrap();
    writeln!(out, "\n{scaled}").unwrap();
    out
}

/// One row: the targets' values (direct first, sluice second, then any variants, then
/// the peers from `first_peer` on), and
/// sluice's value over the best peer's.
fn table_row(
    out: &mut String,
    name: &str,
    values: &[f64],
    first_peer: usize,
    decimals: usize,
    higher_is_better: bool,
) {
    let cells: Vec<String> = values
        .iter()
        .map(|v| {
            if v.is_nan() {
                "–".to_string()
            } else {
                format!("{v:.decimals$}")
            }
        })
        .collect();
    let peers = values[first_peer..].iter().copied().filter(|v| !v.is_nan());
    let best = if higher_is_better {
        peers.fold(f64::NAN, f64::max)
    } else {
        peers.fold(f64::NAN, f64::min)
    };
    let ratio = if best.is_nan() {
        "–".to_string()
    } else {
        format!("{:.2}", values[1] / best)
    };
    writeln!(out, "| {name} | {} | {ratio} |", cells.join(" | ")).unwrap();
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Reads everything, then answers with the byte count.
async fn sink(mut s: TcpStream) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total: u64 = 0;
    loop {
        match s.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(_) => return,
        }
    }
    let _ = s.write_all(&total.to_le_bytes()).await;
}

async fn bulk_gbit(addr: SocketAddr, bytes: u64) -> f64 {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let chunk = vec![0x5au8; 256 * 1024];
    let started = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        s.write_all(&chunk[..n]).await.unwrap();
        left -= n as u64;
    }
    s.shutdown().await.unwrap();
    let mut count = [0u8; 8];
    s.read_exact(&mut count).await.unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(
        u64::from_le_bytes(count),
        bytes,
        "the sink received every byte"
    );
    bytes as f64 * 8.0 / elapsed / 1e9
}

async fn connections_per_sec(addr: SocketAddr, total: usize, workers: usize) -> f64 {
    let started = Instant::now();
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let n = total / workers + usize::from(w < total % workers);
            tokio::spawn(async move {
                let mut buf = [0u8; 32];
                for _ in 0..n {
                    let mut s = TcpStream::connect(addr).await.unwrap();
                    s.write_all(&[7u8; 32]).await.unwrap();
                    s.read_exact(&mut buf).await.unwrap();
                    // Linger 0: the client side leaves no TIME_WAIT, so repeated rounds do
                    // not run out of loopback ports.
                    s.set_zero_linger().unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    total as f64 / started.elapsed().as_secs_f64()
}

/// p50 and p99 round-trip times in microseconds.
async fn ping_pong(addr: SocketAddr, count: usize) -> (f64, f64) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let msg = [42u8; 64];
    let mut buf = [0u8; 64];
    let mut rtts = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        s.write_all(&msg).await.unwrap();
        s.read_exact(&mut buf).await.unwrap();
        rtts.push(started.elapsed().as_secs_f64() * 1e6);
    }
    rtts.sort_by(|a, b| a.total_cmp(b));
    (rtts[count / 2], rtts[count * 99 / 100])
}

/// Opens `n` proxied connections, each proven established by one echoed byte, and
/// returns the growth of the proxy's resident memory (its whole process tree) per
/// connection in KiB.
async fn idle_memory(pid: u32, addr: SocketAddr, n: usize) -> f64 {
    let before = tree_rss_kib(pid);
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"i").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        held.push(s);
    }
    // Let the relays go back to waiting, then measure.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = tree_rss_kib(pid);
    drop(held);
    tokio::time::sleep(Duration::from_millis(500)).await;
    (after - before) / n as f64
}

/// Holds `n` proxied connections through sluice at once and, `rounds` times, sends 64
/// bytes on every one and checks the echo. Reports errors and sluice's resident memory
/// after each round: it must stay flat while the same connections keep working.
async fn scale(pid: u32, addr: SocketAddr, n: usize, rounds: usize) -> String {
    let before = rss_kib(pid);
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    let mut errors = 0usize;
    let mut rss = Vec::new();
    let started = Instant::now();
    for round in 0..rounds {
        let message = [round as u8; 64];
        // In batches, so the burst stays within the kernel's socket buffers.
        for batch in held.chunks_mut(500) {
            for s in batch.iter_mut() {
                if s.write_all(&message).await.is_err() {
                    errors += 1;
                }
            }
            for s in batch.iter_mut() {
                let mut got = [0u8; 64];
                let ok = tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got))
                    .await
                    .is_ok_and(|r| r.is_ok());
                if !ok || got != message {
                    errors += 1;
                }
            }
        }
        rss.push(rss_kib(pid));
    }
    let elapsed = started.elapsed();
    drop(held);
    let rounds_kib: Vec<String> = rss.iter().map(|r| format!("{r:.0}")).collect();
    format!(
        "Scale: {n} proxied connections held through sluice, {rounds} rounds of a 64-byte echo on every one ({} exchanges in {:.1} s): {errors} errors. sluice RSS {before:.0} KiB before; after each round (KiB): {}.",
        n * rounds,
        elapsed.as_secs_f64(),
        rounds_kib.join(", ")
    )
}

/// Throughput of `iperf3 -c` through `addr` with `streams` parallel streams for
/// `seconds`, as the receiver counted it.
fn iperf3_gbit(addr: SocketAddr, streams: u32, seconds: u32) -> f64 {
    let out = std::process::Command::new("iperf3")
        .args(["-c", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(["-P", &streams.to_string(), "-t", &seconds.to_string(), "-J"])
        .output()
        .expect("run iperf3 (make bench installs it)");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON");
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("iperf3 failed: {v}"));
    bps / 1e9
}

/// `wrk -t1 -c64` against `addr` for `seconds` (with `Connection: close` when `close`):
/// requests per second, and the proxy's CPU time per request in µs when `pid` is set.
/// Non-2xx answers or socket errors fail the benchmark rather than count.
fn wrk(addr: SocketAddr, pid: Option<u32>, close: bool, seconds: u32) -> (f64, Option<f64>) {
    let before = pid.map(tree_cpu_seconds);
    let mut command = std::process::Command::new("wrk");
    command.args(["-t1", "-c64", &format!("-d{seconds}s")]);
    if close {
        command.args(["-H", "Connection: close"]);
    }
    let out = command
        .arg(format!("http://{addr}/"))
        .output()
        .expect("run wrk (make bench installs it)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let cpu = pid.zip(before).map(|(p, b)| tree_cpu_seconds(p) - b);
    assert!(
        !text.contains("Non-2xx") && !text.contains("Socket errors: connect"),
        "wrk saw errors through {addr}:\n{text}"
    );
    let field = |prefix: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
    };
    let rate = field("Requests/sec:").expect("wrk's Requests/sec");
    let requests = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse::<f64>().ok())
        .expect("wrk's request count");
    (rate, cpu.map(|c| c * 1e6 / requests))
}

/// `pid` and its children (nginx's workers).
fn tree(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        if rest.split(' ').nth(1).and_then(|p| p.parse::<u32>().ok()) == Some(pid) {
            pids.push(child);
        }
    }
    pids
}

fn tree_rss_kib(pid: u32) -> f64 {
    tree(pid).into_iter().map(rss_kib).sum()
}

fn tree_cpu_seconds(pid: u32) -> f64 {
    tree(pid).into_iter().map(cpu_seconds).sum()
}

fn rss_kib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// User plus system CPU time of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // USER_HZ is 100 on Linux.
    ticks / 100.0
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string())
}
