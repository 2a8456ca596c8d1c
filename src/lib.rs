//! sluice: a TCP reverse proxy and load balancer for connection-heavy services.
//!
//! # Layout
//!
//! | module | stage |
//! |---|---|
//! | [`config`] | the TOML file parsed into a validated [`config::Config`]; errors carry file:line:col |
//! | [`snapshot`] | [`snapshot::Snapshot`]: everything a connection needs, built from a config, shared through `ArcSwap` |
//! | [`runtime`] | where connections run: one multi-thread runtime, or a current-thread runtime per core |
//! | [`listener`] | bind (socket2; per core, one SO_REUSEPORT socket per worker), accept with a `max_connections` permit and EMFILE backoff |
//! | [`conn`] | one connection: the edge (PROXY header, TLS or ClientHello peek), pick, connect, relay, record |
//! | [`gate`] | the counting limits on connections (`max_connections`, the process cap), lock-free when not waiting |
//! | [`proxy_protocol`] | PROXY v1/v2 parsing (pure, incremental) and encoding |
//! | [`client_hello`] | the SNI of a ClientHello, for passthrough routing (pure, incremental) |
//! | [`tls`] | certificates and keys into rustls configs, SNI certificate choice |
//! | [`stream`] | plain or TLS streams at either end of a relay |
//! | [`upstream`] | backends, slots, connect with timeout and retry |
//! | [`queue`] | the FIFO wait queue of an upstream with `max_connections_per_backend` |
//! | [`health`] | active health checks and passive ejection |
//! | [`balance`] | balancing algorithms behind one trait: round robin, least connections, power of two, random, Maglev |
//! | [`relay`] | bidirectional byte relay with half-close, idle timeout, reset propagation |
//! | [`metrics`] | every metric name; handles resolved once per snapshot |
//! | [`admin`] | hyper on its own address: `/metrics`, `/healthz`, `/readyz` |
//! | [`shutdown`] | signals, stop accepting, drain with a deadline; `cancel` and `Stopped`, token waits without a lock per poll |
//!
//! # The life of a connection
//!
//! 1. A listener's accept loop takes a `max_connections` permit, accepts, loads the current
//!    snapshot once and spawns [`conn::handle`] with it; the connection keeps that `Arc`
//!    for its whole life. In `per_core` mode each worker thread has its own socket and
//!    accept loop for the address, and the connection runs on that thread to its end.
//! 2. At the edge, a trusted peer's PROXY header names the real client; then TLS is
//!    terminated, or on a passthrough listener the ClientHello's server name picks the
//!    upstream. Each stage has its own timeout and its own rejection reason.
//! 3. The listener's route names an upstream; the upstream's balancer picks a backend that
//!    is available (up, not ejected, weight above 0), has room under
//!    `max_connections_per_backend` and was not yet tried. When every such backend is
//!    full, the client waits in the upstream's FIFO [`queue`]. sluice connects under
//!    `connect_timeout` and on failure tries another backend, up to `retries` more
//!    times. A client that cannot be served is closed and counted in
//!    `sluice_connections_rejected_total` with its reason.
//! 4. [`relay::relay`] moves bytes both ways until both sides have closed (a FIN is passed
//!    on as a FIN), either side resets, nothing moves for `idle_timeout`, the connection
//!    reaches `max_lifetime`, or the shutdown drain reaches its deadline.
//! 5. Counters and histograms are recorded through handles resolved when the snapshot was
//!    built, and one log line records the connection.

// Tests may panic on a broken expectation; the data path may not.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod access_log;
pub mod admin;
pub mod balance;
pub mod client_hello;
pub mod config;
pub mod conn;
pub mod gate;
pub mod health;
pub mod listener;
pub mod metrics;
pub mod proxy_protocol;
pub mod queue;
pub mod relay;
pub mod reload;
pub mod runtime;
pub mod shutdown;
pub mod snapshot;
pub mod stream;
pub mod tls;
pub mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::Status;
use crate::config::Config;
use crate::listener::Listeners;
use crate::metrics::Metrics;
use crate::runtime::Workers;
use crate::shutdown::Shutdown;
use crate::snapshot::{Snapshot, SnapshotHandle};

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
    #[error("cannot listen for signals, watch the config file or start the access log: {0}")]
    Watch(std::io::Error),
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
}

/// The running proxy: what a reload reconciles.
pub struct Server {
    config_path: PathBuf,
    /// The config text in force, so that events that changed nothing are ignored.
    applied_text: String,
    metrics: Arc<Metrics>,
    snapshots: SnapshotHandle,
    listeners: Listeners,
    checks: health::Checks,
    /// Stops every health check task at shutdown.
    checks_stop: CancellationToken,
    /// The TLS files watched for changes, updated on each reload.
    file_watch: reload::FileWatch,
    /// The shutdown drain's deadline, parent of every backend's `removed` token.
    cut: CancellationToken,
    /// What the admin endpoint reports: the listening addresses change with a reload.
    status: Arc<Status>,
}

/// Runs sluice with `config` (read from `text`) until SIGTERM or SIGINT, reloading
/// on changes to its file and on SIGHUP, then drains and returns.
///
/// Listening sockets, their accept loops and the connections run on `workers`; the rest
/// (reload, admin, health checks, signals) runs on the runtime that polls this future.
pub async fn run(config: Config, text: String, workers: Workers) -> Result<(), Error> {
    let metrics = Arc::new(Metrics::new()?);
    let config = Arc::new(config);
    let access_log = match &config.access_log {
        None => None,
        Some(a) => Some(Arc::new(
            access_log::AccessLog::start(a, metrics.access_log_dropped.clone())
                .map_err(Error::Watch)?,
        )),
    };
    if let Some(log) = &access_log {
        let log = Arc::clone(log);
        let mut usr1 =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
                .map_err(Error::Watch)?;
        tokio::spawn(async move {
            while usr1.recv().await.is_some() {
                log.reopen();
            }
        });
    }
    let config_path = config.source.clone();
    let load = Arc::clone(&config);
    let material = tokio::task::spawn_blocking(move || tls::load(&load))
        .await
        .map_err(|e| Error::Watch(std::io::Error::other(e)))??;
    let shutdown = Shutdown::default();
    let snapshots: SnapshotHandle = Arc::new(ArcSwap::from_pointee(Snapshot::build(
        Arc::clone(&config),
        0,
        &metrics,
        None,
        access_log,
        material,
        &shutdown.cut,
    )));
    metrics.config_last_reload_successful.set(1);
    metrics
        .config_last_reload_success_timestamp
        .set(reload::unix_now());

    // Per-core workers hold descriptors of their own, which proxied connections must not
    // take either. (Addresses a reload adds later draw on the general reserve, as in
    // multi_thread mode.)
    let extra_fds = match config.runtime.mode {
        config::RuntimeMode::MultiThread => 0,
        config::RuntimeMode::PerCore => {
            let addresses = config.listeners.iter().map(|l| l.bind.len()).sum();
            listener::worker_fds(workers.handles().len(), addresses)
        }
    };
    let process_cap = listener::fit_file_limit(extra_fds);
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

    let admin_socket = listener::bind(config.admin.bind, 128)
        .and_then(tokio::net::TcpListener::from_std)
        .map_err(|source| Error::Bind {
            what: "the admin endpoint".to_string(),
            address: config.admin.bind,
            source,
        })?;
    let admin_address = local_addr(&admin_socket);
    tracing::info!(address = %admin_address, "admin listening");
    let tracker = TaskTracker::new();
    let mut listeners = Listeners::new(
        process_cap,
        Arc::clone(&snapshots),
        shutdown.clone(),
        tracker.clone(),
        workers.clone(),
    );
    let bound = listeners.bind_new(&config)?;
    listeners.apply(&config, bound);
    let (mut triggers, file_watch) = reload::triggers(&config_path).map_err(Error::Watch)?;
    file_watch.watch_files(&tls::files(&config));

    let status = Arc::new(Status {
        metrics: Arc::clone(&metrics),
        snapshots: Arc::clone(&snapshots),
        ready: false.into(),
        listening: Default::default(),
    });
    let admin = tokio::spawn(admin::serve(admin_socket, Arc::clone(&status)));
    let mut server = Server {
        config_path,
        applied_text: text,
        metrics: Arc::clone(&metrics),
        snapshots: Arc::clone(&snapshots),
        listeners,
        checks: health::Checks::default(),
        checks_stop: CancellationToken::new(),
        file_watch,
        cut: shutdown.cut.clone(),
        status: Arc::clone(&status),
    };
    server
        .checks
        .reconcile(&snapshots.load(), &snapshots, &server.checks_stop);
    status.set_listening(server.listeners.addresses(&config));
    status.ready.store(true, Ordering::Relaxed);
    // The admin address in STATUS: what `systemctl status` shows, and how the tests find
    // the endpoint that tells them everything else.
    shutdown::notify_systemd(&format!(
        "READY=1\nSTATUS=ready; admin endpoint on {}",
        admin_address
    ));
    tracing::info!(
        config = %config.source.display(),
        listeners = config.listeners.len(),
        upstreams = config.upstreams.len(),
        process_cap,
        runtime = config.runtime.mode.as_str(),
        worker_threads = workers.threads(),
        "sluice ready"
    );

    let signals = shutdown::signalled();
    tokio::pin!(signals);
    let signal = loop {
        tokio::select! {
            s = &mut signals => break s.map_err(Error::Watch)?,
            Some(trigger) = triggers.recv() => server.reload(trigger).await,
        }
    };
    let drain_timeout = snapshots.load().config.drain_timeout;
    tracing::info!(
        signal,
        ?drain_timeout,
        connections = tracker.len(),
        "shutting down: no longer accepting, draining"
    );
    status.ready.store(false, Ordering::Relaxed);
    shutdown::notify_systemd("STOPPING=1\nSTATUS=draining");
    metrics.draining.set(1);
    shutdown::exit_on_second_signal();
    shutdown::cancel(&shutdown.stop_accepting);
    server.listeners.stopped().await;
    let cut = shutdown::drain(&tracker, &shutdown, drain_timeout).await;
    tracing::info!(cut, "shutdown complete");
    shutdown::cancel(&server.checks_stop);
    admin.abort();
    Ok(())
}

fn local_addr(socket: &tokio::net::TcpListener) -> String {
    socket
        .local_addr()
        .map_or_else(|e| format!("unknown ({e})"), |a| a.to_string())
}
