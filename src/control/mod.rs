//! The control plane: start (apply a config to an empty state), reload (apply to the
//! running state), signals, the file watch and the admin endpoint.

pub mod admin;
pub mod reload;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::control::admin::Status;
use crate::data::listener::Listeners;
use crate::data::runtime::Workers;
use crate::metrics::Metrics;
use crate::shutdown::{self, Shutdown};
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
    Tls(#[from] crate::edge::tls::TlsError),
}

/// The running proxy: what a reload reconciles.
pub struct Server {
    config_path: PathBuf,
    /// The config text in force, so that events that changed nothing are ignored.
    applied_text: String,
    metrics: Arc<Metrics>,
    snapshots: SnapshotHandle,
    listeners: Listeners,
    checks: crate::upstream::health::Checks,
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
            crate::access_log::AccessLog::start(a, metrics.access_log_dropped.clone())
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
    let material = tokio::task::spawn_blocking(move || crate::edge::tls::load(&load))
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
        crate::config::RuntimeMode::MultiThread => 0,
        crate::config::RuntimeMode::PerCore => {
            let addresses = config.listeners.iter().map(|l| l.bind.len()).sum();
            crate::data::listener::worker_fds(workers.handles().len(), addresses)
        }
    };
    let process_cap = crate::data::listener::fit_file_limit(extra_fds);
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

    let admin_socket = crate::data::listener::bind(config.admin.bind, 128)
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
    file_watch.watch_files(&crate::edge::tls::files(&config));

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
        checks: crate::upstream::health::Checks::default(),
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
