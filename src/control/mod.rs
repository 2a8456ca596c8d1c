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
//! | `upgrade.rs` | binary upgrade: sockets handed to a new process, which reports ready |

pub mod admin;
pub mod apply;
pub mod ctl;
pub mod discovery;
pub mod drain;
pub mod outcome;
pub mod retire;
pub mod signals;
pub mod status;
pub mod upgrade;
pub mod watch;

use std::net::SocketAddr;
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
    /// A descriptor of the admin endpoint's socket and its configured address, for an
    /// upgrade to hand over.
    admin_handover: Option<(SocketAddr, Arc<std::net::TcpListener>)>,
    /// The binary upgrade under way, if any.
    upgrade: Option<upgrade::InProgress>,
}

/// Why the server loop ended.
enum Stop {
    /// SIGTERM or SIGINT (the signal's name).
    Signal(&'static str),
    /// A new process took over the sockets and is ready (its pid).
    Upgraded(u32),
}

/// Runs sluice with `config` (read from `text`) until SIGTERM or SIGINT, reloading
/// on changes to its file and on SIGHUP, then drains and returns. On SIGUSR2 it
/// upgrades: once a new process has taken over its sockets and is ready, it drains
/// the same way and returns.
///
/// Listening sockets, their accept loops and the connections run on `workers`; the rest
/// (reload, admin, health checks, signals) runs on the runtime that polls this future.
/// Sockets in `handover` (from the process this one replaces, or systemd) are adopted
/// where the config listens on their address, and the rest closed.
pub async fn run(
    config: Config,
    text: String,
    workers: Workers,
    mut handover: upgrade::Handover,
) -> Result<(), Error> {
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

    metrics.start_time.set(crate::metrics::unix_now());
    let mut inherited = std::mem::take(&mut handover.sockets);
    if !inherited.is_empty() {
        tracing::info!(
            sockets = inherited.len(),
            upgrade = handover.is_upgrade(),
            "inherited listening sockets"
        );
    }
    let admin_std = match inherited
        .take(
            &crate::data::inherited::admin_key(config.admin.bind),
            config.admin.bind,
        )
        .into_iter()
        .next()
    {
        Some(adopted) => adopted.set_nonblocking(true).map(|()| adopted),
        None => listener::bind(config.admin.bind, 128),
    };
    let admin_handover = admin_std
        .as_ref()
        .ok()
        .and_then(|s| s.try_clone().ok())
        .map(|s| (config.admin.bind, Arc::new(s)));
    let admin_socket = admin_std
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
        admin_handover,
        upgrade: None,
    };
    server.listeners.inherit(inherited);
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
    server.listeners.close_inherited();

    let admin = tokio::spawn(admin::serve(admin_socket, Arc::clone(&status)));
    let (reloads_tx, mut reloads) = tokio::sync::mpsc::channel::<ctl::ReloadRequest>(4);
    let (upgrades_tx, mut upgrades) = tokio::sync::mpsc::channel::<ctl::UpgradeRequest>(4);
    let mut control = control.zip(config.control.clone()).map(|(bound, config)| {
        let (socket, tcp) = (bound.path().to_path_buf(), bound.tcp_address());
        let ctl = Arc::new(ctl::Ctl {
            socket,
            tcp,
            overrides,
            snapshots: Arc::clone(&snapshots),
            status: Arc::clone(&status),
            metrics: Arc::clone(&metrics),
            reloads: reloads_tx,
            upgrades: upgrades_tx,
            connections: Default::default(),
        });
        ControlSocket {
            task: Some(tokio::spawn(ctl::serve(bound, Arc::clone(&ctl)))),
            config,
            ctl,
        }
    });
    status.ready.store(true, Ordering::Relaxed);
    // The admin address in STATUS: what `systemctl status` shows, and how the tests find
    // the endpoint that tells them everything else.
    // After an upgrade this process becomes the unit's main process (systemd takes
    // MAINPID= from it with NotifyAccess=all; the old process says it too).
    let main_pid = match handover.is_upgrade() {
        true => format!("MAINPID={}\n", std::process::id()),
        false => String::new(),
    };
    drain::notify_systemd(&format!(
        "READY=1\n{main_pid}STATUS=ready; admin endpoint on {admin_address}"
    ));
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        pid = std::process::id(),
        config = %config.source.display(),
        listeners = config.listeners.len(),
        upstreams = config.upstreams.len(),
        process_cap,
        runtime = config.runtime.mode.as_str(),
        worker_threads = workers.threads(),
        "sluice ready"
    );
    // After the log line: the old process reads it as the new one's last word at start.
    handover.ready();
    drop(config);

    let answers_changed = server.discovery.changed();
    // A reload asked for while an upgrade is under way waits for its end: the new
    // process reads the file itself, and the old one's sockets must not change while
    // they are being handed over.
    let mut reload_waiting = None;
    let stop = loop {
        let event = tokio::select! {
            e = events.recv() => e,
            done = server.upgrade_finished() => match done {
                Ok(pid) => break Stop::Upgraded(pid),
                Err(()) => {
                    // The upgrade failed: this process takes the control socket back.
                    if let Some(c) = control.as_mut().filter(|c| c.task.is_none()) {
                        c.start();
                    }
                    match reload_waiting.take() {
                        Some(trigger) => Some(Event::Reload(trigger)),
                        None => continue,
                    }
                }
            },
            Some(reply) = reloads.recv() => {
                let result = match server.upgrade {
                    Some(_) => Err("refused: a binary upgrade is under way; reload after it".to_string()),
                    None => server.reload(signals::Trigger::Ctl).await,
                };
                let _ = reply.send(result);
                continue;
            }
            Some((binary, reply)) = upgrades.recv() => {
                // As on SIGUSR2, the control socket is let go of for the upgrade.
                let idle = server.upgrade.is_none();
                if idle && let Some(c) = &mut control {
                    c.stop().await;
                }
                let started = server.upgrade(binary).map_err(|e| e.to_string());
                if started.is_err() && idle && let Some(c) = &mut control {
                    c.start();
                }
                let _ = reply.send(started);
                continue;
            }
            () = answers_changed.notified() => {
                server.rediscover();
                continue;
            }
        };
        match event {
            Some(Event::Reload(trigger)) if server.upgrade.is_some() => {
                tracing::info!(
                    ?trigger,
                    "reload requested during an upgrade: it waits for the upgrade's end"
                );
                reload_waiting = Some(trigger);
            }
            Some(Event::Reload(trigger)) => {
                // Logged by the reload itself, success or failure.
                let _ = server.reload(trigger).await;
            }
            Some(Event::ReopenAccessLog) => {
                if let Some(log) = &server.access_log {
                    log.reopen();
                }
            }
            Some(Event::Upgrade) => {
                // The new process binds the control socket itself: this one lets go of
                // it for the upgrade, and takes it back if the upgrade fails.
                let idle = server.upgrade.is_none();
                if idle && let Some(c) = &mut control {
                    c.stop().await;
                }
                if server.upgrade(None).is_err()
                    && idle
                    && let Some(c) = &mut control
                {
                    c.start();
                }
            }
            Some(Event::Shutdown(signal)) => break Stop::Signal(signal),
            // The signal task holds a sender for the life of the process.
            None => break Stop::Signal("none"),
        }
    };
    let drain_timeout = snapshots.load().config.drain_timeout;
    status.ready.store(false, Ordering::Relaxed);
    match stop {
        Stop::Signal(signal) => {
            if let Some(running) = server.upgrade.take() {
                running.abandon();
            }
            tracing::info!(
                signal,
                ?drain_timeout,
                connections = tracker.len(),
                "shutting down: no longer accepting, draining"
            );
            drain::notify_systemd("STOPPING=1\nSTATUS=draining");
        }
        Stop::Upgraded(pid) => {
            tracing::info!(
                pid,
                ?drain_timeout,
                connections = tracker.len(),
                "upgrade: the new process is ready; no longer accepting, draining"
            );
            if reload_waiting.is_some() {
                tracing::warn!(
                    "a reload asked for during the upgrade is left to the new process, which read the config file at its start"
                );
            }
            // Not STOPPING=1: the unit is not stopping, its main process changes.
            drain::notify_systemd(&format!(
                "MAINPID={pid}\nSTATUS=handed over to pid {pid}; draining"
            ));
            // The new process serves the admin endpoint alone from now on.
            admin.abort();
            server.admin_handover = None;
        }
    }
    // Asked of a process that drains: refused, and said so, never dropped silently;
    // the access log is still reopened.
    let successor = match stop {
        Stop::Upgraded(pid) => Some(pid),
        Stop::Signal(_) => None,
    };
    let access_log = server.access_log.clone();
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            match (event, successor) {
                // Both processes of an upgrade append to the same file: logrotate's
                // signal reaches each.
                (Event::ReopenAccessLog, _) => {
                    if let Some(log) = &access_log {
                        log.reopen();
                    }
                }
                (Event::Upgrade, Some(pid)) => tracing::warn!(
                    successor = pid,
                    "upgrade refused: this process is draining after an upgrade; signal its successor"
                ),
                (Event::Upgrade, None) => {
                    tracing::warn!("upgrade refused: this process is shutting down")
                }
                (Event::Reload(_), _) => tracing::warn!("reload refused: this process is draining"),
                (Event::Shutdown(signal), Some(_)) => tracing::info!(
                    signal,
                    "already draining after an upgrade; a second signal exits at once"
                ),
                _ => {}
            }
        }
    });
    metrics.draining.set(1);
    shutdown::cancel(&shutdown.stop_accepting);
    server.listeners.stopped().await;
    let cut = drain::drain(&tracker, &shutdown, drain_timeout).await;
    match stop {
        Stop::Signal(_) => tracing::info!(cut, "shutdown complete"),
        Stop::Upgraded(_) => tracing::info!(cut, "drained, exiting"),
    }
    shutdown::cancel(&server.checks_stop);
    admin.abort();
    if let Some(mut c) = control {
        // Answers still being written (`sluice ctl upgrade`'s, above all) go out first.
        c.ctl.connections.close();
        let _ = tokio::time::timeout(CTL_ANSWER_WAIT, c.ctl.connections.wait()).await;
        match stop {
            // Not the socket file: the new process listens on it now.
            Stop::Upgraded(_) => {
                if let Some(task) = c.task.take() {
                    task.abort();
                }
            }
            Stop::Signal(_) => c.stop().await,
        }
    }
    Ok(())
}

/// How long an exiting process waits for control connections to finish their answers.
const CTL_ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The control socket and what serves it: stopped for a binary upgrade (the new process
/// binds it) and started again if the upgrade fails.
struct ControlSocket {
    config: crate::config::Control,
    ctl: Arc<ctl::Ctl>,
    /// `None` while stopped.
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ControlSocket {
    /// Closes the sockets (once the serving task is gone) and removes the socket file.
    async fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
            let _ = std::fs::remove_file(&self.config.socket);
        }
    }

    fn start(&mut self) {
        match ctl::bind(&self.config) {
            Ok(bound) => {
                tracing::info!(socket = %bound.path().display(), tcp = ?bound.tcp_address(), "control socket listening again");
                self.task = Some(tokio::spawn(ctl::serve(bound, Arc::clone(&self.ctl))));
            }
            Err(e) => {
                tracing::error!(error = %e, "the control socket could not be bound again; restart sluice to get it back")
            }
        }
    }
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
