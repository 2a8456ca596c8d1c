//! The control plane: everything that changes what the data plane runs, or answers
//! operators. One [`Server`]: start applies the first config to the empty snapshot,
//! a reload applies a config to the running one (`apply.rs`, the same pipeline); the
//! server loop reads one stream of [`signals::Event`]s (signals and file changes).
//!
//! | file | what |
//! |---|---|
//! | `signals.rs` | signals and reload requests as one event stream |
//! | `watch.rs` | the config (and TLS) files' directories watched with inotify |
//! | `drain.rs` | the drain under a deadline; systemd notifications |
//! | `retire.rs` | what a reload removed: backends out of service, metric series forgotten |
//! | `apply.rs` | apply a config: bind, diff, build, retire, swap, reconcile |
//! | `admin.rs` | the read-only admin endpoint |
//! | `ctl/` | the control socket (`sluice ctl`): runtime overrides, readiness, reload |
//! | `outcome.rs` | the last config load's outcome (start or reload), for its readers |
//! | `status/` | the status page and its JSON twin, collected from the snapshot and atomics |
//! | `discovery.rs` | backends by name: DNS re-resolution feeding each upstream's endpoints |

pub mod admin;
pub mod apply;
pub mod ctl;
pub mod discovery;
pub mod drain;
pub mod outcome;
pub mod retire;
pub mod signals;
pub mod status;
pub mod watch;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access_log::AccessLog;
use crate::config::{Config, RuntimeMode};
use crate::control::admin::Status;
use crate::control::signals::Event;
use crate::data::listener::{self, BindError, Listeners};
use crate::data::runtime::Workers;
use crate::metrics::Metrics;
use crate::shutdown::{self, Shutdown};
use crate::snapshot::{Snapshot, SnapshotDiff, SnapshotHandle};
use crate::upstream::check::{Checks, Current};

/// Why sluice could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("cannot listen for signals, watch the config file or start the access log: {0}")]
    Watch(std::io::Error),
    #[error("{0}")]
    Tls(#[from] crate::edge::tls::TlsError),
    #[error("{0}")]
    Ctl(#[from] ctl::CtlError),
    #[error("{0}")]
    Internal(String),
}

/// The running proxy: what applying a config reconciles.
pub struct Server {
    config_path: PathBuf,
    /// The config text in force, so that events that changed nothing are ignored.
    applied_text: String,
    metrics: Arc<Metrics>,
    snapshots: SnapshotHandle,
    /// Process-wide, started before the first config is applied, in every snapshot.
    access_log: Option<Arc<AccessLog>>,
    listeners: Listeners,
    checks: Checks,
    /// How a check finds its upstream as configured now.
    current: Current,
    /// Stops every health check task at shutdown.
    checks_stop: CancellationToken,
    /// The TLS files watched for changes, updated on each reload.
    file_watch: watch::FileWatch,
    /// The shutdown drain's deadline, parent of every backend's `removed` token.
    cut: CancellationToken,
    /// What the admin endpoint reports: the listening addresses change with a reload.
    status: Arc<Status>,
    /// The control socket's runtime overrides, applied to every snapshot built.
    overrides: Arc<ctl::Overrides>,
    /// The backend names of the config in force and what they resolve to now.
    discovery: discovery::Discovery,
}

/// Runs sluice with `config` (read from `text`) until SIGTERM or SIGINT, reloading
/// on changes to its file and on SIGHUP, then drains and returns.
///
/// Listening sockets, their accept loops and the connections run on `workers`; the rest
/// (reload, admin, health checks, signals) runs on the runtime that polls this future.
pub async fn run(config: Config, text: String, workers: Workers) -> Result<(), Error> {
    let metrics = Arc::new(Metrics::new()?);
    let access_log = match &config.access_log {
        None => None,
        Some(a) => Some(Arc::new(
            AccessLog::start(a, metrics.access_log_dropped.clone()).map_err(Error::Watch)?,
        )),
    };
    // Names resolve first (waited for at most one resolution's timeout): a name that
    // does not resolve leaves its upstream without endpoints, and sluice starts anyway.
    let mut discovery = discovery::Discovery::new(&config.resolver, Arc::clone(&metrics));
    discovery.reconcile(&config).await;
    let mut config = config;
    discovery.expand(&mut config);
    let config = Arc::new(config);
    // Before anything is bound: a certificate that cannot load is a config error.
    let material = apply::load_tls(&config).await?;
    let (events_tx, mut events) = signals::listen().map_err(Error::Watch)?;
    let file_watch = watch::start(&config.source, events_tx).map_err(Error::Watch)?;
    let process_cap = process_cap(&config, &workers);
    metrics
        .process_max_connections
        .set(i64::try_from(process_cap).unwrap_or(i64::MAX));

    let admin_socket = listener::bind(config.admin.bind, 128)
        .and_then(tokio::net::TcpListener::from_std)
        .map_err(|source| BindError {
            what: "the admin endpoint".to_string(),
            address: config.admin.bind,
            source,
        })?;
    let admin_address = admin_socket
        .local_addr()
        .map_or_else(|e| format!("unknown ({e})"), |a| a.to_string());
    tracing::info!(address = %admin_address, "admin listening");
    let overrides =
        ctl::Overrides::load(config.control.as_ref().and_then(|c| c.state_file.clone()))
            .map_err(ctl::CtlError::from)?;
    let control = config.control.as_ref().map(ctl::bind).transpose()?;
    if let Some(c) = &control {
        tracing::info!(socket = %c.path().display(), tcp = ?c.tcp_address(), "control socket listening");
    }

    let shutdown = Shutdown::default();
    let snapshots: SnapshotHandle =
        Arc::new(ArcSwap::from_pointee(Snapshot::empty(&config, &metrics)));
    let tracker = TaskTracker::new();
    let held = Arc::new(crate::data::held::Held::default());
    let status = Arc::new(Status {
        held: Arc::clone(&held),
        metrics: Arc::clone(&metrics),
        snapshots: Arc::clone(&snapshots),
        ready: false.into(),
        listening: Default::default(),
        unready_by_operator: false.into(),
        overrides: Arc::clone(&overrides),
        last_load: outcome::LastLoad::new(outcome::Outcome::new(
            outcome::Cause::Start,
            outcome::LoadResult::Unchanged { generation: 0 },
        )),
        started: status::Started::now(),
        process_cap,
        page: Default::default(),
        discovery: discovery.viewer(),
    });
    let current: Current = {
        let snapshots = Arc::clone(&snapshots);
        Arc::new(move |name| snapshots.load().upstream(name).cloned())
    };
    let mut server = Server {
        config_path: config.source.clone(),
        applied_text: String::new(),
        metrics: Arc::clone(&metrics),
        snapshots: Arc::clone(&snapshots),
        access_log,
        listeners: Listeners::new(
            process_cap,
            Arc::clone(&snapshots),
            shutdown.clone(),
            tracker.clone(),
            workers.clone(),
            held,
        ),
        checks: Checks::default(),
        current,
        checks_stop: CancellationToken::new(),
        file_watch,
        cut: shutdown.cut.clone(),
        status: Arc::clone(&status),
        overrides: Arc::clone(&overrides),
        discovery,
    };
    // The empty snapshot is what start applies the first config to.
    let diff = SnapshotDiff::new(&snapshots.load(), &config, &material);
    // Only the summary: the `Applied` (and the snapshot it holds) goes at once, or the
    // first snapshot would stay alive for as long as sluice runs.
    let changes = match server.apply(Arc::clone(&config), text, material, diff, 0) {
        Ok(applied) => applied.summary,
        Err(e) => {
            // Not left behind for the next start to find stale.
            if let Some(c) = &control {
                let _ = std::fs::remove_file(c.path());
            }
            return Err(e);
        }
    };
    status.last_load.set(outcome::Outcome::new(
        outcome::Cause::Start,
        outcome::LoadResult::Applied {
            generation: 0,
            changes,
        },
    ));

    let admin = tokio::spawn(admin::serve(admin_socket, Arc::clone(&status)));
    let (reloads_tx, mut reloads) = tokio::sync::mpsc::channel::<ctl::ReloadRequest>(4);
    let control_path = control.as_ref().map(|c| c.path().to_path_buf());
    let control = control.map(|bound| {
        let (socket, tcp) = (bound.path().to_path_buf(), bound.tcp_address());
        tokio::spawn(ctl::serve(
            bound,
            Arc::new(ctl::Ctl {
                socket,
                tcp,
                overrides,
                snapshots: Arc::clone(&snapshots),
                status: Arc::clone(&status),
                metrics: Arc::clone(&metrics),
                reloads: reloads_tx,
            }),
        ))
    });
    status.ready.store(true, Ordering::Relaxed);
    // The admin address in STATUS: what `systemctl status` shows, and how the tests find
    // the endpoint that tells them everything else.
    drain::notify_systemd(&format!(
        "READY=1\nSTATUS=ready; admin endpoint on {admin_address}"
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
    drop(config);

    let answers_changed = server.discovery.changed();
    let signal = loop {
        let event = tokio::select! {
            event = events.recv() => event,
            Some(reply) = reloads.recv() => {
                let _ = reply.send(server.reload(signals::Trigger::Ctl).await);
                continue;
            }
            () = answers_changed.notified() => {
                server.rediscover();
                continue;
            }
        };
        match event {
            Some(Event::Reload(trigger)) => {
                // Logged by the reload itself, success or failure.
                let _ = server.reload(trigger).await;
            }
            Some(Event::ReopenAccessLog) => {
                if let Some(log) = &server.access_log {
                    log.reopen();
                }
            }
            Some(Event::Shutdown(signal)) => break signal,
            // The signal task holds a sender for the life of the process.
            None => break "none",
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
    drain::notify_systemd("STOPPING=1\nSTATUS=draining");
    metrics.draining.set(1);
    shutdown::cancel(&shutdown.stop_accepting);
    server.listeners.stopped().await;
    let cut = drain::drain(&tracker, &shutdown, drain_timeout).await;
    tracing::info!(cut, "shutdown complete");
    shutdown::cancel(&server.checks_stop);
    admin.abort();
    if let Some(task) = control {
        task.abort();
    }
    if let Some(path) = control_path {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// What a listener with the default `max_connections` counts as when the start checks
/// the process cap: an open-file limit of a few thousand passes without a warning.
const WARN_DEFAULT_AS: usize = 1024;

/// How many proxied connections the open-file limit allows in all. Per-core workers
/// hold descriptors of their own, which proxied connections must not take either.
/// (Addresses a reload adds later draw on the general reserve, as in multi_thread mode.)
fn process_cap(config: &Config, workers: &Workers) -> usize {
    let extra_fds = match config.runtime.mode {
        RuntimeMode::MultiThread => 0,
        RuntimeMode::PerCore => {
            let addresses = config.listeners.iter().map(|l| l.bind.len()).sum();
            listener::worker_fds(workers.handles().len(), addresses)
        }
    };
    let process_cap = listener::fit_file_limit(extra_fds);
    // A listener left at the default counts as WARN_DEFAULT_AS: the process cap bounds
    // it anyway, and a default should not warn on a common open-file limit.
    let wanted: usize = config
        .listeners
        .iter()
        .map(|l| match l.max_connections_set {
            true => l.max_connections,
            false => WARN_DEFAULT_AS.min(l.max_connections),
        })
        .sum();
    if wanted > process_cap {
        tracing::warn!(
            sum_of_max_connections = wanted,
            process_cap,
            "the open-file limit allows fewer connections than the listeners' max_connections; raise it (LimitNOFILE=, ulimit -n)"
        );
    }
    process_cap
}
