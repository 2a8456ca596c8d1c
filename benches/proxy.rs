//! `make bench`: sluice against a direct connection on loopback, the same workload
//! alternated direct / sluice for several rounds, medians reported.
//!
//! Workloads: bulk throughput (one stream into a sink), new connections per second (with
//! sluice's CPU time per connection), 64-byte ping-pong latency on one connection, and
//! sluice's resident memory per idle proxied connection. The load generator and the
//! backends run in this process, on the same two cores as sluice: figures are for
//! comparison within one run, not absolute capacity.
//!
//! `SLUICE_BENCH_QUICK=1` shortens every workload. Results go to stdout and to
//! `target/bench/results.md`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Backend, Sluice};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Plan {
    rounds: usize,
    bulk_bytes: u64,
    connections: usize,
    workers: usize,
    pings: usize,
    idle: usize,
}

const FULL: Plan = Plan {
    rounds: 5,
    bulk_bytes: 2 << 30,
    connections: 10_000,
    workers: 16,
    pings: 20_000,
    idle: 8_000,
};

const QUICK: Plan = Plan {
    rounds: 3,
    bulk_bytes: 256 << 20,
    connections: 2_000,
    workers: 16,
    pings: 5_000,
    idle: 1_000,
};

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

async fn run(plan: Plan) -> String {
    let echo = Backend::echo().await;
    let sink = Backend::start(sink).await;
    let config = format!(
        "[[listener]]\nname = \"echo\"\nbind = [\"127.0.0.1:0\"]\nupstream = \"echo\"\n\
         [[listener]]\nname = \"sink\"\nbind = [\"127.0.0.1:0\"]\nupstream = \"sink\"\n\
         [[upstream]]\nname = \"echo\"\n[[upstream.backend]]\naddress = \"{}\"\n\
         [[upstream]]\nname = \"sink\"\n[[upstream.backend]]\naddress = \"{}\"\n",
        echo.addr, sink.addr
    );
    let sluice = Sluice::start_quiet(&config);
    let pid = sluice.pid();
    let (via_echo, via_sink) = (sluice.addr("echo"), sluice.addr("sink"));

    let mut rows = Vec::new();
    let mut bulk = Pair::default();
    let mut conns = Pair::default();
    let mut conn_cpu = Vec::new();
    let mut p50 = Pair::default();
    let mut p99 = Pair::default();
    for round in 0..plan.rounds {
        eprintln!("round {}/{}", round + 1, plan.rounds);
        bulk.direct
            .push(bulk_gbit(sink.addr, plan.bulk_bytes).await);
        bulk.sluice.push(bulk_gbit(via_sink, plan.bulk_bytes).await);

        conns
            .direct
            .push(connections_per_sec(echo.addr, plan.connections, plan.workers).await);
        let cpu_before = cpu_seconds(pid);
        conns
            .sluice
            .push(connections_per_sec(via_echo, plan.connections, plan.workers).await);
        conn_cpu.push((cpu_seconds(pid) - cpu_before) * 1e6 / plan.connections as f64);

        let (a, b) = ping_pong(echo.addr, plan.pings).await;
        p50.direct.push(a);
        p99.direct.push(b);
        let (a, b) = ping_pong(via_echo, plan.pings).await;
        p50.sluice.push(a);
        p99.sluice.push(b);
    }
    rows.push(bulk.row("bulk, 1 stream: Gbit/s", 1));
    rows.push(conns.row(
        &format!(
            "new connection per exchange ({} workers): conn/s",
            plan.workers
        ),
        0,
    ));
    rows.push(format!(
        "| sluice CPU per connection (µs) | – | {:.1} | – |",
        median(&mut conn_cpu)
    ));
    rows.push(p50.row("ping-pong 64 B, p50 (µs)", 1));
    rows.push(p99.row("ping-pong 64 B, p99 (µs)", 1));
    let idle_kib = idle_memory(&sluice, via_echo, plan.idle).await;
    rows.push(format!(
        "| sluice memory per idle proxied connection ({} held, KiB) | – | {idle_kib:.1} | – |",
        plan.idle
    ));

    let mut out = String::new();
    writeln!(out, "| workload | direct | sluice | sluice/direct |").unwrap();
    writeln!(out, "|---|---|---|---|").unwrap();
    for r in rows {
        writeln!(out, "{r}").unwrap();
    }
    writeln!(
        out,
        "\nMedians of {} alternating rounds (direct, then sluice). {} cores; {}.",
        plan.rounds,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model()
    )
    .unwrap();
    out
}

#[derive(Default)]
struct Pair {
    direct: Vec<f64>,
    sluice: Vec<f64>,
}

impl Pair {
    fn row(mut self, name: &str, decimals: usize) -> String {
        let d = median(&mut self.direct);
        let s = median(&mut self.sluice);
        format!(
            "| {name} | {d:.decimals$} | {s:.decimals$} | {:.2} |",
            s / d
        )
    }
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
/// returns sluice's resident memory growth per connection in KiB.
async fn idle_memory(sluice: &Sluice, addr: SocketAddr, n: usize) -> f64 {
    let before = rss_kib(sluice.pid());
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
    let after = rss_kib(sluice.pid());
    drop(held);
    (after - before) / n as f64
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
