//! Reload: the config file's directory watched with inotify, and SIGHUP. A change is
//! debounced, the whole file is read (off the event loop) and validated; an invalid
//! file changes nothing. A valid one becomes a new snapshot, swapped in atomically.
//!
//! Watching the directory rather than the file catches every way of saving one: an
//! in-place write, an editor's write-then-rename, and Kubernetes' ConfigMap volumes,
//! where the file is a symlink through `..data`, itself a symlink swapped atomically.
//! Any event in the directory leads to a read; only a change of content is a reload.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tokio::time::timeout;

use crate::config::{self, BackendRemoved, Config};
use crate::control::Server;
use crate::shutdown;
use crate::snapshot::Snapshot;

/// Quiet time after the last event before the file is read: long enough for an editor
/// to finish its write-and-rename, short enough to feel immediate.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    File,
    Signal,
}

/// Updates the set of TLS files watched besides the config file.
pub struct FileWatch {
    files: watch::Sender<Vec<PathBuf>>,
}

impl FileWatch {
    /// Watches these TLS files too (replacing the previous set), so a rotated
    /// certificate reloads even though the config file did not change.
    pub fn watch_files(&self, files: &[PathBuf]) {
        self.files.send_if_modified(|now| {
            let changed = now.as_slice() != files;
            if changed {
                *now = files.to_vec();
            }
            changed
        });
    }
}

/// A file's directory, `.` for a bare name.
fn directory(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn add_watch(fd: &OwnedFd, dir: &Path) -> io::Result<()> {
    inotify::add_watch(
        fd,
        dir,
        WatchFlags::CLOSE_WRITE
            | WatchFlags::MODIFY
            | WatchFlags::MOVED_TO
            | WatchFlags::MOVED_FROM
            | WatchFlags::CREATE
            | WatchFlags::DELETE
            | WatchFlags::ATTRIB,
    )?;
    Ok(())
}

fn file_name(path: &Path) -> Vec<u8> {
    path.file_name()
        .map(|n| n.as_encoded_bytes().to_vec())
        .unwrap_or_default()
}

/// Reload triggers: settled changes in the config file's directory (and those of the
/// TLS files it names), and SIGHUP. The channel holds one pending trigger; more arriving
/// meanwhile coalesce into it.
pub fn triggers(path: &Path) -> io::Result<(mpsc::Receiver<Trigger>, FileWatch)> {
    let (tx, rx) = mpsc::channel(1);
    let fd = inotify::init(CreateFlags::NONBLOCK | CreateFlags::CLOEXEC)?;
    add_watch(&fd, directory(path))?;
    // Deprecated because a registered fd might be closed by someone else while tokio
    // watches it; an OwnedFd moved in here is closed only when the AsyncFd drops. Its
    // replacement, `register`, is `unsafe`, which this crate forbids.
    #[allow(deprecated)]
    let fd = AsyncFd::new(fd)?;
    let file_tx = tx.clone();
    let name = file_name(path);
    let (files, files_rx) = watch::channel(Vec::new());
    tokio::spawn(async move {
        if let Err(e) = watch(fd, name, files_rx, file_tx).await {
            tracing::error!(error = %e, "config file watch stopped; SIGHUP still reloads");
        }
    });
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let _ = tx.try_send(Trigger::Signal);
        }
    });
    Ok((rx, FileWatch { files }))
}

async fn watch(
    fd: AsyncFd<OwnedFd>,
    config_name: Vec<u8>,
    mut files: watch::Receiver<Vec<PathBuf>>,
    tx: mpsc::Sender<Trigger>,
) -> io::Result<()> {
    let mut buf = [MaybeUninit::<u8>::uninit(); 4096];
    // Names that matter in any watched directory. A file of the same name in another
    // watched directory costs a read that finds nothing changed, nothing more.
    let mut names = vec![config_name.clone(), b"..data".to_vec()];
    loop {
        tokio::select! {
            r = next_events(&fd, &names, &mut buf) => r?,
            changed = files.changed() => {
                if changed.is_err() {
                    // The server is gone; nothing more to watch.
                    return Ok(());
                }
                names.truncate(2);
                for f in files.borrow_and_update().iter() {
                    if let Err(e) = add_watch(fd.get_ref(), directory(f)) {
                        tracing::warn!(file = %f.display(), error = %e, "cannot watch a TLS file's directory; SIGHUP reloads it");
                    }
                    names.push(file_name(f));
                }
                continue;
            }
        }
        while let Ok(more) = timeout(DEBOUNCE, next_events(&fd, &names, &mut buf)).await {
            more?;
        }
        // Full means a reload is already pending, and it will read the latest file.
        let _ = tx.try_send(Trigger::File);
    }
}

/// Waits until an event concerns the config file (`name`), Kubernetes' `..data` link,
/// or may have been lost (queue overflow); consumes every queued event. Events for other
/// files in the directory (logs, an editor's swap files) are ignored, so writing beside
/// the config never triggers a reload.
async fn next_events(
    fd: &AsyncFd<OwnedFd>,
    names: &[Vec<u8>],
    buf: &mut [MaybeUninit<u8>],
) -> io::Result<()> {
    loop {
        let mut ready = fd.readable().await?;
        let drained = ready.try_io(|inner| {
            let mut reader = inotify::Reader::new(inner.get_ref(), &mut *buf);
            let mut relevant = 0usize;
            loop {
                match reader.next() {
                    Ok(event) => {
                        let overflow = event.events().contains(ReadFlags::QUEUE_OVERFLOW);
                        let ours = event
                            .file_name()
                            .is_some_and(|n| names.iter().any(|w| w.as_slice() == n.to_bytes()));
                        if overflow || ours {
                            relevant += 1;
                        }
                    }
                    // Nothing of ours: report WouldBlock, which makes tokio clear the
                    // readiness so that the next wait really waits.
                    Err(rustix::io::Errno::WOULDBLOCK) if relevant == 0 => {
                        return Err(io::ErrorKind::WouldBlock.into());
                    }
                    Err(rustix::io::Errno::WOULDBLOCK) => return Ok(relevant),
                    Err(e) => return Err(io::Error::from(e)),
                }
            }
        });
        match drained {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
}

impl Server {
    /// Reads, validates and applies the config file; on any error the running
    /// configuration stays exactly as it was.
    pub async fn reload(&mut self, trigger: Trigger) {
        let path = self.config_path.clone();
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(t) => t,
            Err(e) => {
                return self.reload_failed(&format!("{}: cannot read config: {e}", path.display()));
            }
        };
        let previous = self.snapshots.load_full();
        let same_text = text == self.applied_text;
        let mut config = if same_text {
            (*previous.config).clone()
        } else {
            match Config::parse(&text, &path) {
                Ok(c) => c,
                Err(e) => return self.reload_failed(&e.to_string()),
            }
        };
        keep_restart_only(&mut config, &previous.config);
        let config = Arc::new(config);
        // Watch the files this config names even if it fails to load below: a reload
        // refused for a missing certificate applies once the file appears.
        let mut files = crate::edge::tls::files(&previous.config);
        files.extend(crate::edge::tls::files(&config));
        self.file_watch.watch_files(&files);
        let load = Arc::clone(&config);
        let material =
            match tokio::task::spawn_blocking(move || crate::edge::tls::load(&load)).await {
                Ok(Ok(m)) => m,
                Ok(Err(e)) => return self.reload_failed(&e.to_string()),
                Err(e) => return self.reload_failed(&format!("loading TLS files failed: {e}")),
            };
        if same_text && material.fingerprint == previous.tls_fingerprint {
            // What runs is what is on disk: a file that failed earlier and was restored
            // no longer counts as a failed reload.
            self.metrics.config_last_reload_successful.set(1);
            tracing::debug!(?trigger, "config and TLS files unchanged");
            return;
        }
        let bound = match self.listeners.bind_new(&config) {
            Ok(b) => b,
            Err(e) => return self.reload_failed(&e.to_string()),
        };
        let summary = describe(&previous.config, &config);
        let snapshot = Arc::new(Snapshot::build(
            config,
            previous.generation + 1,
            &self.metrics,
            Some(&previous),
            previous.access_log.clone(),
            material,
            &self.cut,
        ));
        retire_removed(&previous, &snapshot);
        let janitor = Janitor::new(&previous, &snapshot);
        drop(previous);
        self.snapshots.store(Arc::clone(&snapshot));
        // A raised limit or a new backend may let waiters in now.
        for upstream in &snapshot.upstreams {
            upstream.queue.dispatch();
        }
        janitor.spawn(Arc::clone(&self.metrics), Arc::clone(&self.snapshots));
        let changes = self.listeners.apply(&snapshot.config, bound);
        self.status
            .set_listening(self.listeners.addresses(&snapshot.config));
        self.checks
            .reconcile(&snapshot, &self.snapshots, &self.checks_stop);
        self.applied_text = text;
        self.file_watch
            .watch_files(&crate::edge::tls::files(&snapshot.config));
        let m = &self.metrics;
        m.config_reloads_success.inc();
        m.config_last_reload_successful.set(1);
        m.config_last_reload_success_timestamp.set(unix_now());
        tracing::info!(
            generation = snapshot.generation,
            ?trigger,
            changes = %summary,
            listening = ?changes.bound,
            stopped = ?changes.closed,
            "config reloaded"
        );
    }

    fn reload_failed(&self, error: &str) {
        self.metrics.config_reloads_failure.inc();
        self.metrics.config_last_reload_successful.set(0);
        tracing::error!(error = %error, "config reload failed; the running config is unchanged");
    }
}

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `[runtime]`, `[admin]` and `[access_log]` apply only at start: warns about a change
/// to them and keeps what runs in `config`, so that `/config` shows what runs and the
/// next reload compares with it rather than with this file.
fn keep_restart_only(config: &mut Config, running: &Config) {
    if config.runtime != running.runtime {
        tracing::warn!(
            in_force = running.runtime.mode.as_str(),
            worker_threads = running.runtime.worker_threads,
            "[runtime] changes take effect at restart"
        );
        config.runtime = running.runtime.clone();
    }
    if config.admin != running.admin {
        tracing::warn!(in_force = %running.admin.bind, "a change of [admin] applies only after a restart");
        config.admin = running.admin.clone();
    }
    if config.access_log != running.access_log {
        tracing::warn!("a change of [access_log] applies only after a restart");
        config.access_log = running.access_log.clone();
    }
}

/// Takes the backends that `next` no longer has out of service, and deals with their
/// open connections as their upstream's `on_backend_removed` says.
fn retire_removed(previous: &Snapshot, next: &Snapshot) {
    for old in &previous.upstreams {
        let kept = next.upstream(&old.name);
        let policy = kept.map_or(old.on_backend_removed, |u| u.on_backend_removed);
        for backend in &old.backends {
            if kept.is_some_and(|u| u.backends.iter().any(|b| Arc::ptr_eq(b, backend))) {
                continue;
            }
            backend.retire();
            match policy {
                BackendRemoved::Keep => {}
                BackendRemoved::Close => shutdown::cancel(&backend.removed),
                BackendRemoved::Drain => {
                    let (backend, after) = (Arc::clone(backend), next.config.drain_timeout);
                    tokio::spawn(async move {
                        tokio::time::sleep(after).await;
                        // Unless a later reload took it back into service.
                        if backend.is_retired() {
                            shutdown::cancel(&backend.removed);
                        }
                    });
                }
            }
        }
    }
}

/// How often the janitor looks whether removed things are still in use.
const JANITOR_INTERVAL: Duration = Duration::from_secs(1);

/// Removes the metric series of listeners, upstreams and backends that a reload
/// removed, once their last connection has ended, so that a long-running sluice under
/// config churn does not grow its exposition without bound. It holds only their
/// handles, never the old snapshot.
struct Janitor {
    listeners: Vec<(String, prometheus::IntGauge)>,
    upstreams: Vec<(String, Arc<crate::upstream::queue::Queue>)>,
    backends: Vec<(String, Arc<crate::upstream::Backend>)>,
}

impl Janitor {
    fn new(previous: &Snapshot, next: &Snapshot) -> Janitor {
        let listeners = previous
            .listeners
            .iter()
            .filter(|r| next.route(&r.listener).is_none())
            .map(|r| (r.listener.clone(), r.metrics.active.clone()))
            .collect();
        let upstreams = previous
            .upstreams
            .iter()
            .filter(|u| next.upstream(&u.name).is_none())
            .map(|u| (u.name.clone(), u.queue.clone()))
            .collect();
        let backends = previous
            .upstreams
            .iter()
            .flat_map(|u| u.backends.iter().map(move |b| (u, b)))
            .filter(|(u, b)| {
                next.upstream(&u.name)
                    .is_none_or(|n| !n.backends.iter().any(|nb| Arc::ptr_eq(nb, b)))
            })
            .map(|(u, b)| (u.name.clone(), Arc::clone(b)))
            .collect();
        Janitor {
            listeners,
            upstreams,
            backends,
        }
    }

    fn spawn(
        mut self,
        metrics: Arc<crate::metrics::Metrics>,
        snapshots: crate::snapshot::SnapshotHandle,
    ) {
        if self.listeners.is_empty() && self.upstreams.is_empty() && self.backends.is_empty() {
            return;
        }
        tokio::spawn(async move {
            loop {
                let now = snapshots.load();
                // Whatever a later reload brought back owns its series again.
                self.listeners.retain(|(name, active)| {
                    if now.route(name).is_some() {
                        return false;
                    }
                    let idle = active.get() == 0;
                    if idle {
                        metrics.forget_listener(name);
                    }
                    !idle
                });
                self.backends.retain(|(upstream, b)| {
                    let back = now
                        .upstream(upstream)
                        .is_some_and(|u| u.backends.iter().any(|nb| nb.address == b.address));
                    if back {
                        return false;
                    }
                    let idle = b.active() == 0;
                    if idle {
                        metrics.forget_backend(upstream, &b.address.to_string());
                    }
                    !idle
                });
                let backends = &self.backends;
                self.upstreams.retain(|(name, queue)| {
                    if now.upstream(name).is_some() {
                        return false;
                    }
                    let idle = backends.iter().all(|(u, _)| u != name) && queue.is_empty();
                    if idle {
                        metrics.forget_upstream(name);
                    }
                    !idle
                });
                drop(now);
                if self.listeners.is_empty()
                    && self.upstreams.is_empty()
                    && self.backends.is_empty()
                {
                    return;
                }
                tokio::time::sleep(JANITOR_INTERVAL).await;
            }
        });
    }
}

/// What changed between two configs, in one line for the log.
fn describe(old: &Config, new: &Config) -> String {
    let mut parts = Vec::new();
    let names = |ls: &[config::Listener]| ls.iter().map(|l| l.name.clone()).collect::<Vec<_>>();
    diff(
        &mut parts,
        "listener",
        &names(&old.listeners),
        &names(&new.listeners),
        |n| {
            old.listeners.iter().find(|l| &l.name == n)
                != new.listeners.iter().find(|l| &l.name == n)
        },
    );
    let unames = |us: &[config::Upstream]| us.iter().map(|u| u.name.clone()).collect::<Vec<_>>();
    diff(
        &mut parts,
        "upstream",
        &unames(&old.upstreams),
        &unames(&new.upstreams),
        |n| {
            old.upstreams.iter().find(|u| &u.name == n)
                != new.upstreams.iter().find(|u| &u.name == n)
        },
    );
    for u in &new.upstreams {
        let Some(before) = old.upstreams.iter().find(|o| o.name == u.name) else {
            continue;
        };
        let addrs =
            |bs: &[config::Backend]| bs.iter().map(|b| b.address.to_string()).collect::<Vec<_>>();
        let what = format!("backend of {}", u.name);
        diff(
            &mut parts,
            &what,
            &addrs(&before.backends),
            &addrs(&u.backends),
            |a| {
                before.backends.iter().find(|b| &b.address.to_string() == a)
                    != u.backends.iter().find(|b| &b.address.to_string() == a)
            },
        );
    }
    if old.drain_timeout != new.drain_timeout {
        parts.push("drain_timeout changed".to_string());
    }
    if parts.is_empty() {
        "no effective change".to_string()
    } else {
        parts.join("; ")
    }
}

fn diff(
    parts: &mut Vec<String>,
    what: &str,
    old: &[String],
    new: &[String],
    changed: impl Fn(&String) -> bool,
) {
    for n in new.iter().filter(|n| !old.contains(n)) {
        parts.push(format!("{what} {n} added"));
    }
    for n in old.iter().filter(|n| !new.contains(n)) {
        parts.push(format!("{what} {n} removed"));
    }
    for n in new.iter().filter(|n| old.contains(n) && changed(n)) {
        parts.push(format!("{what} {n} changed"));
    }
}
