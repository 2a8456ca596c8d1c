//! sluice: a TCP reverse proxy and load balancer for connection-heavy services.
//!
//! # Layout
//!
//! | module | stage |
//! |---|---|
//! | [`config`] | the TOML file parsed into a validated [`config::Config`]; errors carry file:line:col |
//! | [`snapshot`] | [`snapshot::Snapshot`]: everything a connection needs, built from a config, shared through `ArcSwap` |
//! | [`listener`] | bind (socket2), accept with a `max_connections` permit and EMFILE backoff |
//! | [`conn`] | one connection: pick, connect, relay, record |
//! | [`upstream`] | backends, slots, connect with timeout and retry |
//! | [`queue`] | the FIFO wait queue of an upstream with `max_connections_per_backend` |
//! | [`health`] | active health checks and passive ejection |
//! | [`balance`] | balancing algorithms behind one trait: round robin, least connections, power of two, random, Maglev |
//! | [`relay`] | bidirectional byte relay with half-close, idle timeout, reset propagation |
//! | [`metrics`] | every metric name; handles resolved once per snapshot |
//! | [`admin`] | hyper on its own address: `/metrics`, `/healthz`, `/readyz` |
//! | [`shutdown`] | signals, stop accepting, drain with a deadline |
//!
//! # The life of a connection
//!
//! 1. A listener's accept loop takes a `max_connections` permit, accepts, loads the current
//!    snapshot once and spawns [`conn::handle`] with it; the connection keeps that `Arc`
//!    for its whole life.
//! 2. The listener's route names an upstream; the upstream's balancer picks a backend that
//!    is available (up, not ejected, weight above 0), has room under
//!    `max_connections_per_backend` and was not yet tried. When every such backend is
//!    full, the client waits in the upstream's FIFO [`queue`]. sluice connects under
//!    `connect_timeout` and on failure tries another backend, up to `retries` more
//!    times. A client that cannot be served is closed and counted in
//!    `sluice_connections_rejected_total` with its reason.
//! 3. [`relay::relay`] moves bytes both ways until both sides have closed (a FIN is passed
//!    on as a FIN), either side resets, nothing moves for `idle_timeout`, the connection
//!    reaches `max_lifetime`, or the shutdown drain reaches its deadline.
//! 4. Counters and histograms are recorded through handles resolved when the snapshot was
//!    built, and one log line records the connection.

// Tests may panic on a broken expectation; the data path may not.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
pub mod balance;
pub mod config;
pub mod conn;
pub mod health;
pub mod listener;
pub mod metrics;
pub mod queue;
pub mod relay;
pub mod shutdown;
pub mod snapshot;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::admin::Status;
use crate::config::Config;
use crate::listener::Acceptor;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::snapshot::Snapshot;

/// Why sluice could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot bind {what} to {address}: {source}")]
    Bind {
        what: String,
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("cannot listen for signals: {0}")]
    Signals(std::io::Error),
}

/// Runs sluice with `config` until SIGTERM or SIGINT, then drains and returns.
pub async fn run(config: Config) -> Result<(), Error> {
    let metrics = Arc::new(Metrics::new()?);
    let config = Arc::new(config);
    let snapshots = Arc::new(ArcSwap::from_pointee(Snapshot::build(
        Arc::clone(&config),
        1,
        &metrics,
    )));

    let bind = |what: &str, address: SocketAddr, backlog: u32| {
        listener::bind(address, backlog)
            .and_then(tokio::net::TcpListener::from_std)
            .map_err(|source| Error::Bind {
                what: what.to_string(),
                address,
                source,
            })
    };
    let process_cap = listener::fit_file_limit();
    let wanted: usize = config.listeners.iter().map(|l| l.max_connections).sum();
    if wanted > process_cap {
        tracing::warn!(
            sum_of_max_connections = wanted,
            process_cap,
            "the open-file limit allows fewer connections than the listeners' max_connections; raise it (LimitNOFILE=, ulimit -n)"
        );
    }
    metrics
        .process_max_connections
        .set(i64::try_from(process_cap).unwrap_or(i64::MAX));
    let process_limit = Arc::new(Semaphore::new(process_cap));
    let admin_socket = bind("the admin endpoint", config.admin.bind, 128)?;
    tracing::info!(address = %local_addr(&admin_socket), "admin listening");
    let mut acceptors = Vec::new();
    for l in &config.listeners {
        let name: Arc<str> = Arc::from(l.name.as_str());
        let limit = Arc::new(Semaphore::new(l.max_connections));
        for &address in &l.bind {
            let socket = bind(&format!("listener {:?}", l.name), address, l.backlog)?;
            tracing::info!(listener = %name, address = %local_addr(&socket), "listening");
            acceptors.push(Acceptor {
                name: Arc::clone(&name),
                socket,
                limit: Arc::clone(&limit),
                process_limit: Arc::clone(&process_limit),
            });
        }
    }

    let status = Arc::new(Status {
        metrics: Arc::clone(&metrics),
        ready: false.into(),
    });
    let admin = tokio::spawn(admin::serve(admin_socket, Arc::clone(&status)));
    let shutdown = Shutdown::default();
    let checks = tokio_util::sync::CancellationToken::new();
    let mut health_checks = health::Checks::default();
    health_checks.reconcile(&snapshots.load(), &snapshots, &checks);
    let tracker = TaskTracker::new();
    let accept_loops: Vec<_> = acceptors
        .into_iter()
        .map(|a| tokio::spawn(a.serve(Arc::clone(&snapshots), shutdown.clone(), tracker.clone())))
        .collect();
    status.ready.store(true, Ordering::Relaxed);
    tracing::info!(
        config = %config.source.display(),
        listeners = config.listeners.len(),
        upstreams = config.upstreams.len(),
        process_cap,
        "sluice ready"
    );

    let signal = shutdown::signalled().await.map_err(Error::Signals)?;
    tracing::info!(signal, drain_timeout = ?config.drain_timeout, connections = tracker.len(), "shutting down: no longer accepting, draining");
    status.ready.store(false, Ordering::Relaxed);
    metrics.draining.set(1);
    shutdown::exit_on_second_signal();
    shutdown.stop_accepting.cancel();
    for l in accept_loops {
        // An accept loop only ends by returning; a panic there is already logged.
        let _ = l.await;
    }
    let cut = shutdown::drain(&tracker, &shutdown, config.drain_timeout).await;
    tracing::info!(cut, "shutdown complete");
    checks.cancel();
    admin.abort();
    Ok(())
}

fn local_addr(socket: &tokio::net::TcpListener) -> String {
    socket
        .local_addr()
        .map_or_else(|e| format!("unknown ({e})"), |a| a.to_string())
}
