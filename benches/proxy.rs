//! `make bench`: sluice against a direct connection on loopback, the same workload
//! alternated direct / sluice for several rounds, medians reported.
//!
//! Targets: the direct path, sluice, and HAProxy and nginx (stream) with equivalent
//! configs (benches/peers.rs), each started on loopback by the benchmark.
//!
//! Workloads: HTTP through wrk (keep-alive and a new connection per request), bulk
//! throughput (iperf3, and one stream into a sink), new connections per second (with the
//! proxy's CPU time per connection), 64-byte ping-pong latency on one connection, the
//! proxy's resident memory per idle proxied connection, and sluice holding many
//! connections at once (scale). TLS termination, on three more routes that every proxy
//! terminates with the same ECDSA P-256 certificate and its own default session
//! resumption: wrk over https (`tls`), TLS handshakes per second, full and resumed, from
//! an in-process rustls client that counts which handshakes resumed (`handshake`), and a
//! reconnect storm, plain and TLS, of clients all connecting at once (`storm`), whose
//! routes share one listen backlog, [`BACKLOG`]. BENCHMARKS.md, "Workloads", says exactly
//! what each does. The load generator and the backends run in this process, on the same
//! two cores as the proxies: figures are for comparison within one run, not absolute
//! capacity.
//!
//! `SLUICE_BENCH_QUICK=1` shortens every workload. Results go to stdout and to
//! `target/bench/results.md`.
//!
//! For iteration, `SLUICE_BENCH_ONLY=wrk,ping` runs only the named workloads (`iperf`,
//! `wrk`, `bulk`, `conns`, `ping`, `idle`, `scale`, `tls`, `handshake`, `storm`), and
//! `SLUICE_BENCH_ALSO=copy`
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
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Backend, Fixture, Sluice};
use peers::Route;
use rustls::{ClientConfig, HandshakeKind, SupportedProtocolVersion};
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
    /// TLS handshakes per measured run of the handshake workload (each mode), and the
    /// concurrent client tasks that make them.
    handshakes: usize,
    handshake_tasks: usize,
    /// Clients of one reconnect storm, and the storm rounds (after every other workload).
    storm: usize,
    storm_rounds: usize,
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
    handshakes: 4_000,
    handshake_tasks: 32,
    storm: 8_000,
    storm_rounds: 3,
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
    handshakes: 1_000,
    handshake_tasks: 32,
    storm: 2_000,
    storm_rounds: 3,
};

/// The listen backlog of every proxy's TLS and storm routes (sluice `backlog`, HAProxy
/// `bind ... backlog`, nginx `listen ... backlog=`): one value for all, sluice's default.
/// The kernel caps it at `net.core.somaxconn`, which the results' footer shows.
const BACKLOG: u32 = 1024;

/// The listen backlog of each of the echo backend's sockets behind the storm routes:
/// this host's somaxconn.
const STORM_BACKEND_BACKLOG: u32 = 4096;

/// How many SO_REUSEPORT sockets the storm's echo backend listens on, one address: their
/// queues together (4 × 4,097) hold a whole storm of 8,000 with room for the kernel's
/// uneven hash, so the backend's accept queue is never what overflows. With one socket
/// it was: its queue sat full (Recv-Q 4,097) in every storm, through every proxy, and the
/// dropped SYNs' one-second retransmission set the storm's end for all of them alike.
const STORM_BACKEND_SOCKETS: usize = 4;

/// How long one storm client may take, from its connect to the end of its echo, before
/// it counts as an error: the storm always ends.
const STORM_TIMEOUT: Duration = Duration::from_secs(30);

/// The name the TLS clients ask for; the benchmark's certificate covers it.
const TLS_NAME: &str = "localhost";

/// The handshake workload's modes: a label, the one protocol version the client offers,
/// and whether it resumes sessions.
const HANDSHAKE_MODES: [(&str, &SupportedProtocolVersion, bool); 4] = [
    ("TLS 1.3 full", &rustls::version::TLS13, false),
    ("TLS 1.3 resumed", &rustls::version::TLS13, true),
    ("TLS 1.2 full", &rustls::version::TLS12, false),
    ("TLS 1.2 resumed", &rustls::version::TLS12, true),
];

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
    if runs("storm") {
        descriptors_for_storm(plan.storm);
    }
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

/// A storm of `clients` needs a socket per client and one per backend connection in
/// this process, and as many again in a proxy, which inherits the limit: raise the soft
/// open-file limit to the hard one if it is lower than that (with room for the rest), or
/// stop with what to change.
fn descriptors_for_storm(clients: usize) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let needed = 2 * clients as u64 + 1_000;
    let limit = getrlimit(Resource::Nofile);
    if limit.current.is_some_and(|c| c < needed) {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        setrlimit(Resource::Nofile, raised).unwrap();
    }
    let current = getrlimit(Resource::Nofile).current;
    assert!(
        current.is_none_or(|c| c >= needed),
        "the storm of {clients} clients needs {needed} open files; `ulimit -n` allows {current:?}: raise the hard limit"
    );
}

/// A proxy under test, or the direct path, with where its routes listen.
struct Target {
    name: &'static str,
    echo: SocketAddr,
    sink: SocketAddr,
    iperf: SocketAddr,
    http: SocketAddr,
    /// TLS terminated by the proxy in front of the HTTP backend and of the storm's echo
    /// backend; `None` for direct, which has no TLS.
    https: Option<SocketAddr>,
    tls_echo: Option<SocketAddr>,
    /// Plain TCP to the storm's echo backend, with the listen backlog [`BACKLOG`].
    storm: SocketAddr,
    /// The process whose tree's CPU and memory are measured; `None` for direct.
    pid: Option<u32>,
}

impl Target {
    fn new(name: &'static str, routes: &[(&'static str, SocketAddr)], pid: Option<u32>) -> Target {
        let find = |route: &str| routes.iter().find(|(n, _)| *n == route).map(|(_, a)| *a);
        let at = |route: &str| find(route).unwrap();
        Target {
            name,
            echo: at("echo"),
            sink: at("sink"),
            iperf: at("iperf"),
            http: at("http"),
            https: find("https"),
            tls_echo: find("tls_echo"),
            storm: at("storm"),
            pid,
        }
    }
}

async fn run(plan: Plan) -> String {
    let echo = Backend::echo().await;
    let sink = Backend::start(sink).await;
    let storm_echo = storm_backend().await;
    let iperf = peers::iperf3_server();
    let http = peers::http_backend();
    // One ECDSA P-256 certificate (for localhost and 127.0.0.1) from a CA of the run,
    // presented by every proxy; the TLS clients trust that CA.
    let pki = common::pki::Pki::new();
    let ca = pki.ca("bench-ca");
    let leaf = pki.leaf("bench-ca", "bench-server", &[TLS_NAME, "127.0.0.1"], 30);
    let cert = peers::Cert {
        cert: leaf.cert.clone(),
        key: leaf.key.clone(),
    };
    let with_backlog = |name, backend, tls| Route {
        name,
        backend,
        tls,
        backlog: Some(BACKLOG),
    };
    let routes: Vec<Route> = vec![
        Route::plain("echo", echo.addr),
        Route::plain("sink", sink.addr),
        Route::plain(iperf.routes[0].0, iperf.routes[0].1),
        Route::plain(http.routes[0].0, http.routes[0].1),
        with_backlog("https", http.routes[0].1, true),
        with_backlog("tls_echo", storm_echo, true),
        with_backlog("storm", storm_echo, false),
    ];
    let tls_table = format!(
        "certificates = [{{ cert = \"{}\", key = \"{}\" }}]",
        leaf.cert.display(),
        leaf.key.display()
    );
    let build = |listener_keys: &str| {
        let mut config = Fixture::new();
        for route in &routes {
            config = config
                .listener(route.name)
                .to(route.name)
                .listener_keys("max_connections = 9000")
                .listener_keys(listener_keys);
            if let Some(backlog) = route.backlog {
                config = config.listener_keys(&format!("backlog = {backlog}"));
            }
            if route.tls {
                config = config.listener_table("tls", &tls_table);
            }
        }
        for route in &routes {
            config = config.upstream(route.name).backend(route.backend);
        }
        config
    };
    let config = build("");
    let sluice = Sluice::with(&config).quiet().start().await;
    let through = |s: &Sluice| -> Vec<(&'static str, SocketAddr)> {
        routes.iter().map(|r| (r.name, s.addr(r.name))).collect()
    };
    // The direct path: straight to each backend, with no TLS route (the backends speak
    // none).
    let direct: Vec<(&'static str, SocketAddr)> = routes
        .iter()
        .filter(|r| !r.tls)
        .map(|r| (r.name, r.backend))
        .collect();
    let mut targets = vec![
        Target::new("direct", &direct, None),
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
    let peers = peers::start(&routes, &cert).await;
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
    let mut tls_close = vec![Vec::new(); n];
    let mut tls_close_cpu = vec![Vec::new(); n];
    let mut tls_keepalive = vec![Vec::new(); n];
    let mut tls_keepalive_cpu = vec![Vec::new(); n];
    // Per handshake mode: handshakes/s, CPU per handshake, the share that resumed.
    let mut hs_rate = vec![vec![Vec::new(); n]; HANDSHAKE_MODES.len()];
    let mut hs_cpu = vec![vec![Vec::new(); n]; HANDSHAKE_MODES.len()];
    let mut hs_resumed = vec![vec![Vec::new(); n]; HANDSHAKE_MODES.len()];
    // Per storm kind (plain, TLS): all served (s), p99 connect to first byte (ms),
    // errors (summed over rounds), the proxy's CPU for the storm (ms).
    let mut storm_all = vec![vec![Vec::new(); n]; 2];
    let mut storm_p99 = vec![vec![Vec::new(); n]; 2];
    let mut storm_errors = vec![vec![0.0; n]; 2];
    let mut storm_cpu = vec![vec![Vec::new(); n]; 2];
    for round in 0..plan.rounds {
        eprintln!("round {}/{}", round + 1, plan.rounds);
        for (i, t) in targets.iter().enumerate() {
            if runs("iperf") {
                iperf1[i].push(iperf3_gbit(t.iperf, 1, plan.seconds));
                iperf4[i].push(iperf3_gbit(t.iperf, 4, plan.seconds));
            }
            if runs("wrk") {
                let url = format!("http://{}/", t.http);
                let (rate, cpu_us) = wrk(&url, t.pid, false, 64, plan.seconds);
                keepalive[i].push(rate);
                keepalive_cpu[i].extend(cpu_us);
                let (rate, cpu_us) = wrk(&url, t.pid, true, 64, plan.seconds);
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

    // The TLS workloads and the storms after idle and scale, in rounds of their own: their
    // buffers and their many connections grow every proxy's heap, and the idle workload
    // would find that memory already there (it read 0.0 KiB per connection for sluice).
    for round in 0..plan.rounds {
        if !runs("tls") && !runs("handshake") {
            break;
        }
        eprintln!("TLS round {}/{}", round + 1, plan.rounds);
        for (i, t) in targets.iter().enumerate() {
            if runs("tls")
                && let Some(https) = t.https
            {
                let url = format!("https://{https}/");
                let (rate, cpu_us) = wrk(&url, t.pid, true, 32, plan.seconds);
                tls_close[i].push(rate);
                tls_close_cpu[i].extend(cpu_us);
                let (rate, cpu_us) = wrk(&url, t.pid, false, 64, plan.seconds);
                tls_keepalive[i].push(rate);
                tls_keepalive_cpu[i].extend(cpu_us);
            }
            if runs("handshake")
                && let Some(addr) = t.tls_echo
            {
                for (m, (_, version, resume)) in HANDSHAKE_MODES.iter().enumerate() {
                    // A client config, so a session cache, per task: each task is one
                    // client resuming its own sessions, new for each target and round.
                    let clients: Vec<_> = (0..plan.handshake_tasks)
                        .map(|_| tls_client(&ca.cert, version, *resume))
                        .collect();
                    if *resume {
                        // Prime: one handshake per task, so that each has a session to
                        // offer; not measured.
                        handshakes(addr, &clients, plan.handshake_tasks).await;
                    }
                    let before = t.pid.map(tree_cpu_seconds);
                    let (rate, resumed) = handshakes(addr, &clients, plan.handshakes).await;
                    hs_rate[m][i].push(rate);
                    if let (Some(pid), Some(before)) = (t.pid, before) {
                        hs_cpu[m][i]
                            .push((tree_cpu_seconds(pid) - before) * 1e6 / plan.handshakes as f64);
                    }
                    if *resume {
                        hs_resumed[m][i].push(resumed as f64 * 100.0 / plan.handshakes as f64);
                    }
                }
            }
        }
    }
    for round in 0..plan.storm_rounds {
        if !runs("storm") {
            break;
        }
        eprintln!("storm round {}/{}", round + 1, plan.storm_rounds);
        for (i, t) in targets.iter().enumerate() {
            let kinds = [
                Some((t.storm, None)),
                t.tls_echo.map(|a| {
                    (
                        a,
                        Some(tls_client(&ca.cert, &rustls::version::TLS13, false)),
                    )
                }),
            ];
            for (k, kind) in kinds.into_iter().enumerate() {
                let Some((addr, client)) = kind else { continue };
                let before = t.pid.map(tree_cpu_seconds);
                let result = storm(addr, plan.storm, client).await;
                if let (Some(pid), Some(before)) = (t.pid, before) {
                    storm_cpu[k][i].push((tree_cpu_seconds(pid) - before) * 1e3);
                }
                storm_all[k][i].push(result.all_served);
                storm_p99[k][i].push(result.p99_ms);
                storm_errors[k][i] += result.errors as f64;
            }
        }
    }

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
    // One row of medians: see `table_row`.
    let row =
        |out: &mut String, label: &str, v: &mut Vec<Vec<f64>>, digits: usize, higher: bool| {
            table_row(out, label, &medians(v), first_peer, digits, higher);
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
        row(&mut out, &label, values, digits, higher);
    }
    row(&mut out, "bulk, 1 stream: Gbit/s", &mut bulk, 1, true);
    let label = format!(
        "new connection per exchange ({} workers): conn/s",
        plan.workers
    );
    row(&mut out, &label, &mut conns, 0, true);
    row(
        &mut out,
        "proxy CPU per connection (µs)",
        &mut cpu,
        1,
        false,
    );
    row(&mut out, "ping-pong 64 B, p50 (µs)", &mut p50, 1, false);
    row(&mut out, "ping-pong 64 B, p99 (µs)", &mut p99, 1, false);
    let label = format!(
        "proxy memory per idle proxied connection ({} held, KiB)",
        plan.idle
    );
    table_row(&mut out, &label, &idle, first_peer, 1, false);
    let tls_rows: [(String, &mut Vec<Vec<f64>>, usize, bool); 4] = [
        (
            format!("TLS termination, wrk -t1 -c32 -d{s}s, Connection: close: req/s"),
            &mut tls_close,
            0,
            true,
        ),
        (
            "proxy CPU per handshake and request, TLS close (µs)".to_string(),
            &mut tls_close_cpu,
            1,
            false,
        ),
        (
            format!("TLS keep-alive, wrk -t1 -c64 -d{s}s: req/s"),
            &mut tls_keepalive,
            0,
            true,
        ),
        (
            "proxy CPU per request, TLS keep-alive (µs)".to_string(),
            &mut tls_keepalive_cpu,
            2,
            false,
        ),
    ];
    // The new workloads' rows only when they ran (`SLUICE_BENCH_ONLY`).
    for (label, values, digits, higher) in tls_rows.into_iter().filter(|_| runs("tls")) {
        row(&mut out, &label, values, digits, higher);
    }
    for (m, (mode, _, resume)) in HANDSHAKE_MODES
        .iter()
        .enumerate()
        .filter(|_| runs("handshake"))
    {
        let label = format!(
            "handshakes, {mode} ({} tasks, {} each run): handshakes/s",
            plan.handshake_tasks, plan.handshakes
        );
        row(&mut out, &label, &mut hs_rate[m], 0, true);
        let label = format!("proxy CPU per handshake, {mode} (µs)");
        row(&mut out, &label, &mut hs_cpu[m], 1, false);
        if *resume {
            let label = format!("handshakes that resumed, {mode} (%)");
            row(&mut out, &label, &mut hs_resumed[m], 1, true);
        }
    }
    for (k, kind) in ["plain", "TLS 1.3 full handshakes"]
        .iter()
        .enumerate()
        .filter(|_| runs("storm"))
    {
        let c = plan.storm;
        let label = format!("storm, {kind}, {c} clients at once: all served (s)");
        row(&mut out, &label, &mut storm_all[k], 2, false);
        let label = format!("storm, {kind}: p99 connect to first echoed byte (ms)");
        row(&mut out, &label, &mut storm_p99[k], 1, false);
        let label = format!("storm, {kind}: errors, all rounds");
        let errors: Vec<f64> = storm_errors[k]
            .iter()
            .zip(&storm_all[k])
            .map(|(e, ran)| if ran.is_empty() { f64::NAN } else { *e })
            .collect();
        table_row(&mut out, &label, &errors, first_peer, 0, false);
        let label = format!("storm, {kind}: proxy CPU for the storm (ms)");
        row(&mut out, &label, &mut storm_cpu[k], 0, false);
    }
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
    if runs("storm") {
        writeln!(
            out,
            "\nStorms: medians of {} rounds, after the other workloads; errors summed over them. The storm and \
             TLS routes listen with backlog {BACKLOG} in every proxy (the storm's echo \
             backend on {STORM_BACKEND_SOCKETS} SO_REUSEPORT sockets with {STORM_BACKEND_BACKLOG} \
             each); this host: net.core.somaxconn {}, \
             net.ipv4.tcp_max_syn_backlog {}, net.ipv4.tcp_syncookies {}.",
            plan.storm_rounds,
            sysctl("net/core/somaxconn"),
            sysctl("net/ipv4/tcp_max_syn_backlog"),
            sysctl("net/ipv4/tcp_syncookies"),
        )
        .unwrap();
    }
    writeln!(out, "\n{scaled}").unwrap();
    out
}

fn sysctl(name: &str) -> String {
    std::fs::read_to_string(format!("/proc/sys/{name}"))
        .map_or_else(|_| "unknown".to_string(), |v| v.trim().to_string())
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
    let ratio = values[1] / best;
    // No peer value, or 0 over 0 (no errors anywhere): no ratio.
    let ratio = if ratio.is_nan() {
        "–".to_string()
    } else {
        format!("{ratio:.2}")
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

/// An echo server on one 127.0.0.1 port, [`STORM_BACKEND_SOCKETS`] SO_REUSEPORT sockets
/// with listen backlog [`STORM_BACKEND_BACKLOG`] each: the backend of the storm and TLS
/// echo routes. It runs until the benchmark exits.
async fn storm_backend() -> SocketAddr {
    let mut addr = SocketAddr::from(([127, 0, 0, 1], 0));
    for _ in 0..STORM_BACKEND_SOCKETS {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_reuseport(true).unwrap();
        socket.bind(addr).unwrap();
        let listener = socket.listen(STORM_BACKEND_BACKLOG).unwrap();
        addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(common::echo(s));
            }
        });
    }
    addr
}

/// A TLS client trusting the benchmark's CA, offering only `version`, with rustls's
/// default in-memory session cache when `resume` is set and `Resumption::disabled()`
/// otherwise.
fn tls_client(
    ca: &Path,
    version: &'static SupportedProtocolVersion,
    resume: bool,
) -> Arc<ClientConfig> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    if !resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Arc::new(config)
}

/// `total` TLS exchanges through `addr` by one concurrent task per client config in
/// `clients`, each looping: connect, handshake, write 32 bytes, read their echo, close
/// (linger 0, as [`connections_per_sec`]). Returns handshakes per second and how many of
/// them resumed a session (the client connection's `handshake_kind`). Any failure fails
/// the benchmark.
async fn handshakes(addr: SocketAddr, clients: &[Arc<ClientConfig>], total: usize) -> (f64, usize) {
    let started = Instant::now();
    let tasks = clients.len();
    let workers: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(w, client)| {
            let n = total / tasks + usize::from(w < total % tasks);
            let connector = tokio_rustls::TlsConnector::from(Arc::clone(client));
            tokio::spawn(async move {
                let name = rustls_pki_types::ServerName::try_from(TLS_NAME).unwrap();
                let mut resumed = 0;
                let mut buf = [0u8; 32];
                for _ in 0..n {
                    let tcp = TcpStream::connect(addr).await.unwrap();
                    tcp.set_nodelay(true).unwrap();
                    let mut tls = connector
                        .connect(name.clone(), tcp)
                        .await
                        .unwrap_or_else(|e| panic!("TLS handshake through {addr}: {e}"));
                    tls.write_all(&[7u8; 32]).await.unwrap();
                    tls.flush().await.unwrap();
                    tls.read_exact(&mut buf).await.unwrap();
                    assert_eq!(buf, [7u8; 32], "the echo through {addr}");
                    let (tcp, session) = tls.get_ref();
                    if session.handshake_kind() == Some(HandshakeKind::Resumed) {
                        resumed += 1;
                    }
                    tcp.set_zero_linger().unwrap();
                }
                resumed
            })
        })
        .collect();
    let mut resumed = 0;
    for w in workers {
        resumed += w.await.unwrap();
    }
    (total as f64 / started.elapsed().as_secs_f64(), resumed)
}

/// What one reconnect storm gave.
struct StormResult {
    /// From the release of every client until the last was served (or failed), seconds.
    all_served: f64,
    /// p99 over the served clients of the time from connect start to the first echoed
    /// byte, milliseconds.
    p99_ms: f64,
    /// Clients that failed in any way: connect, handshake, write, read, a wrong echo, or
    /// [`STORM_TIMEOUT`].
    errors: usize,
}

/// A reconnect storm: `n` clients, spawned first and then released together (no pacing),
/// each connecting to `addr` (with a full TLS handshake when `tls` is set), writing 32
/// bytes, reading their echo and closing (linger 0).
async fn storm(addr: SocketAddr, n: usize, tls: Option<Arc<ClientConfig>>) -> StormResult {
    let go = Arc::new(tokio::sync::Barrier::new(n + 1));
    let clients: Vec<_> = (0..n)
        .map(|_| {
            let go = Arc::clone(&go);
            let connector = tls.clone().map(tokio_rustls::TlsConnector::from);
            tokio::spawn(async move {
                go.wait().await;
                let started = Instant::now();
                let exchange = async {
                    let tcp = TcpStream::connect(addr).await?;
                    tcp.set_nodelay(true)?;
                    let message = [9u8; 32];
                    let mut got = [0u8; 32];
                    let first = match connector {
                        None => {
                            let mut s = tcp;
                            s.write_all(&message).await?;
                            s.read_exact(&mut got[..1]).await?;
                            let first = started.elapsed();
                            s.read_exact(&mut got[1..]).await?;
                            s.set_zero_linger()?;
                            first
                        }
                        Some(connector) => {
                            let name = rustls_pki_types::ServerName::try_from(TLS_NAME).unwrap();
                            let mut s = connector.connect(name, tcp).await?;
                            s.write_all(&message).await?;
                            s.flush().await?;
                            s.read_exact(&mut got[..1]).await?;
                            let first = started.elapsed();
                            s.read_exact(&mut got[1..]).await?;
                            s.get_ref().0.set_zero_linger()?;
                            first
                        }
                    };
                    if got != message {
                        return Err(std::io::Error::other("wrong echo"));
                    }
                    Ok::<_, std::io::Error>(first)
                };
                tokio::time::timeout(STORM_TIMEOUT, exchange)
                    .await
                    .ok()
                    .and_then(Result::ok)
            })
        })
        .collect();
    go.wait().await;
    let started = Instant::now();
    let mut firsts = Vec::with_capacity(n);
    let mut errors = 0;
    for c in clients {
        match c.await.unwrap() {
            Some(first) => firsts.push(first.as_secs_f64() * 1e3),
            None => errors += 1,
        }
    }
    let all_served = started.elapsed().as_secs_f64();
    firsts.sort_by(|a, b| a.total_cmp(b));
    let p99_ms = firsts
        .get((firsts.len() * 99 / 100).min(firsts.len().saturating_sub(1)))
        .copied()
        .unwrap_or(f64::NAN);
    StormResult {
        all_served,
        p99_ms,
        errors,
    }
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
///
/// A run that never connected a stream is tried again, up to twice. That was seen once
/// in `make bench-quick` (round 1: "unable to receive control message: Connection reset
/// by peer", no stream connected), and not in 60 back-to-back runs direct and through
/// sluice afterwards; `iperf3 -s` serves one test at a time, and through a proxy it may
/// still be ending the last one when the last client has exited. A failure after a
/// stream connected ends the benchmark, as does a third failed start.
fn iperf3_gbit(addr: SocketAddr, streams: u32, seconds: u32) -> f64 {
    for _ in 0..3 {
        let out = std::process::Command::new("iperf3")
            .args(["-c", &addr.ip().to_string(), "-p", &addr.port().to_string()])
            .args(["-P", &streams.to_string(), "-t", &seconds.to_string(), "-J"])
            .output()
            .expect("run iperf3 (make bench installs it)");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON");
        if let Some(bps) = v["end"]["sum_received"]["bits_per_second"].as_f64() {
            return bps / 1e9;
        }
        let started = v["start"]["connected"]
            .as_array()
            .is_some_and(|c| !c.is_empty());
        if started {
            panic!("iperf3 through {addr} failed: {v}");
        }
        eprintln!("iperf3 through {addr} did not start: {v}");
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("iperf3 through {addr} did not start in 3 tries")
}

/// `wrk -t1 -c<connections>` against `url` (http or https) for `seconds` (with
/// `Connection: close` when `close`): requests per second, and the proxy's CPU time per
/// request in µs when `pid` is set. Non-2xx answers or socket errors fail the benchmark
/// rather than count.
fn wrk(
    url: &str,
    pid: Option<u32>,
    close: bool,
    connections: u32,
    seconds: u32,
) -> (f64, Option<f64>) {
    let before = pid.map(tree_cpu_seconds);
    let mut command = std::process::Command::new("wrk");
    command.args(["-t1", &format!("-c{connections}"), &format!("-d{seconds}s")]);
    if close {
        command.args(["-H", "Connection: close"]);
    }
    let out = command
        .arg(url)
        .output()
        .expect("run wrk (make bench installs it)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let cpu = pid.zip(before).map(|(p, b)| tree_cpu_seconds(p) - b);
    assert!(
        !text.contains("Non-2xx") && !text.contains("Socket errors: connect"),
        "wrk saw errors through {url}:\n{text}"
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
