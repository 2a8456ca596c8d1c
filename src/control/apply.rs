//! Applying a config: one pipeline for start (applied to the empty snapshot) and reload
//! (applied to the running one). Bind what is new; compute the [`SnapshotDiff`] once;
//! build the snapshot from it; retire what it removed; swap; start and stop listeners
//! and health checks to match; watch the files it names.
//!
//! A reload reads the whole file (off the event loop) and validates it first; on any
//! error the running configuration stays exactly as it was.

use std::sync::Arc;

use crate::config::Config;
use crate::control::outcome::{LoadResult, Outcome};
use crate::control::signals::Trigger;
use crate::control::{Error, Server, admin, discovery, retire};
use crate::data::listener::Changes;
use crate::edge::tls::{self, Material};
use crate::snapshot::{Snapshot, SnapshotDiff};

/// What one applied config changed, for its log line.
pub struct Applied {
    pub snapshot: Arc<Snapshot>,
    /// The diff's one-line summary.
    pub summary: String,
    pub listeners: Changes,
}

impl Server {
    /// Applies `config` (read from `text`, TLS files loaded into `material`, compared
    /// with the snapshot in force in `diff`) as `generation`. Nothing changes if a
    /// listening address cannot be bound.
    pub(super) fn apply(
        &mut self,
        config: Arc<Config>,
        text: String,
        material: Material,
        diff: SnapshotDiff,
        generation: u64,
    ) -> Result<Applied, Error> {
        let bound = self.listeners.bind_new(&config)?;
        let (snapshot, mut diff) = Snapshot::build(
            config,
            generation,
            &self.metrics,
            diff,
            self.access_log.clone(),
            material,
            &self.cut,
        );
        let snapshot = Arc::new(snapshot);
        // Held until the swap: an operator's change lands in this snapshot or the next.
        let mut overrides = self.overrides.lock();
        overrides.apply(&snapshot);
        retire::retire_removed(&diff, snapshot.config.drain_timeout);
        retire::forget_tls(&diff, &self.metrics);
        let summary = diff.to_string();
        let janitor = retire::Janitor::new(&mut diff);
        drop(diff);
        self.snapshots.store(Arc::clone(&snapshot));
        drop(overrides);
        // A raised limit or a new backend may let waiters in now.
        for upstream in &snapshot.upstreams {
            upstream.queue.dispatch();
        }
        janitor.spawn(Arc::clone(&self.snapshots));
        let listeners = self.listeners.apply(&snapshot.config, bound);
        self.status.set_listening(admin::Listening {
            generation,
            listeners: self.listeners.addresses(&snapshot.config),
        });
        self.checks
            .reconcile(&snapshot.upstreams, &self.current, &self.checks_stop);
        self.applied_text = text;
        self.file_watch.watch_files(&tls::files(&snapshot.config));
        let m = &self.metrics;
        m.config_last_reload_successful.set(1);
        m.config_last_reload_success_timestamp
            .set(crate::metrics::unix_now());
        Ok(Applied {
            snapshot,
            summary,
            listeners,
        })
    }

    /// Reads, validates and applies the config file; on any error the running
    /// configuration stays exactly as it was. Returns the generation in force after it,
    /// or the error (file:line:col for an invalid config).
    pub async fn reload(&mut self, trigger: Trigger) -> Result<u64, String> {
        let path = self.config_path.clone();
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(t) => t,
            Err(e) => {
                let error = format!("{}: cannot read config: {e}", path.display());
                return self.reload_failed(trigger, &error, None);
            }
        };
        let previous = self.snapshots.load_full();
        let same_text = text == self.applied_text;
        let mut config = if same_text {
            (*previous.config).clone()
        } else {
            match Config::parse(&text, &path) {
                Ok(c) => c,
                Err(e) => return self.reload_failed(trigger, &e.to_string(), Some(&e)),
            }
        };
        keep_restart_only(&mut config, &previous.config);
        // Names the file adds are resolved (briefly waited for) before the config applies.
        self.discovery.reconcile(&config).await;
        self.discovery.expand(&mut config);
        let config = Arc::new(config);
        // Watch the files this config names even if it fails to load below: a reload
        // refused for a missing certificate applies once the file appears.
        let mut files = tls::files(&previous.config);
        files.extend(tls::files(&config));
        self.file_watch.watch_files(&files);
        let material = match load_tls(&config).await {
            Ok(m) => m,
            Err(e) => return self.reload_failed(trigger, &e.to_string(), None),
        };
        let diff = SnapshotDiff::new(&previous, &config, &material);
        if diff.is_empty() {
            // What runs is what is on disk (a file that failed earlier and was restored
            // no longer counts as a failed reload), and nothing that a reload applies
            // changed: the generation counts only changes that took effect.
            self.metrics.config_last_reload_successful.set(1);
            self.applied_text = text;
            let generation = previous.generation;
            let unchanged = LoadResult::Unchanged { generation };
            self.status
                .last_load
                .set(Outcome::new(trigger.into(), unchanged));
            match trigger {
                Trigger::Signal => tracing::info!("reload requested (SIGHUP): nothing changed"),
                Trigger::Ctl => tracing::info!("reload requested (sluice ctl): nothing changed"),
                Trigger::File if !same_text => tracing::info!(
                    "config file changed, but nothing that a reload applies: generation stays"
                ),
                Trigger::File => tracing::debug!("config and TLS files unchanged"),
            }
            return Ok(previous.generation);
        }
        let generation = previous.generation + 1;
        drop(previous);
        match self.apply(config, text, material, diff, generation) {
            Ok(applied) => {
                self.metrics.config_reloads_success.inc();
                self.status.last_load.set(Outcome::new(
                    trigger.into(),
                    LoadResult::Applied {
                        generation: applied.snapshot.generation,
                        changes: applied.summary.clone(),
                    },
                ));
                tracing::info!(
                    generation = applied.snapshot.generation,
                    ?trigger,
                    changes = %applied.summary,
                    listening = ?applied.listeners.bound,
                    stopped = ?applied.listeners.closed,
                    "config reloaded"
                );
                Ok(applied.snapshot.generation)
            }
            Err(e) => self.reload_failed(trigger, &e.to_string(), None),
        }
    }

    /// Applies what the DNS answers say now, through the same pipeline as a reload: the
    /// snapshot's config with each upstream's endpoints from names replaced by the current
    /// answers, and the snapshot's own TLS material (no file is read).
    pub(super) fn rediscover(&mut self) {
        let previous = self.snapshots.load_full();
        let mut config = (*previous.config).clone();
        self.discovery.expand(&mut config);
        if config == *previous.config {
            return;
        }
        // New endpoints first, the ones they replace a moment later (`discovery::OVERLAP`).
        let both = discovery::overlap(&previous.config, &config);
        if both != config && both != *previous.config {
            config = both;
            let changed = self.discovery.changed();
            tokio::spawn(async move {
                tokio::time::sleep(discovery::OVERLAP).await;
                changed.notify_one();
            });
        }
        let config = Arc::new(config);
        let material = previous.material();
        let diff = SnapshotDiff::new(&previous, &config, &material);
        if diff.is_empty() {
            return;
        }
        let generation = previous.generation + 1;
        let text = self.applied_text.clone();
        // `apply` records a successful reload; this is none, and must not hide a failed one.
        let m = &self.metrics;
        let reload_state = (
            m.config_last_reload_successful.get(),
            m.config_last_reload_success_timestamp.get(),
        );
        let applied = self.apply(Arc::clone(&config), text, material, diff, generation);
        let m = &self.metrics;
        m.config_last_reload_successful.set(reload_state.0);
        m.config_last_reload_success_timestamp.set(reload_state.1);
        match applied {
            Ok(applied) => {
                // Once the new snapshot is in force.
                discovery::log_endpoint_changes(&previous.config, &config);
                tracing::info!(
                    generation,
                    changes = %applied.summary,
                    "endpoints changed (dns)"
                );
            }
            Err(e) => {
                tracing::error!(error = %e, "new DNS answers could not be applied; the running endpoints are unchanged")
            }
        }
    }

    /// Counts, records (for the status page) and logs a refused reload; `invalid` is
    /// the config error, when the file itself was at fault.
    fn reload_failed(
        &self,
        trigger: Trigger,
        error: &str,
        invalid: Option<&crate::config::ConfigError>,
    ) -> Result<u64, String> {
        self.metrics.config_reloads_failure.inc();
        self.metrics.config_last_reload_successful.set(0);
        let generation = self.snapshots.load().generation;
        let result = match invalid {
            Some(e) => LoadResult::invalid(generation, e),
            None => LoadResult::failed(generation, error),
        };
        self.status
            .last_load
            .set(Outcome::new(trigger.into(), result));
        tracing::error!(error = %error, "config reload failed; the running config is unchanged");
        Err(error.to_string())
    }
}

/// Reads and parses the TLS files `config` names, off the event loop.
pub(super) async fn load_tls(config: &Arc<Config>) -> Result<Material, Error> {
    let load = Arc::clone(config);
    match tokio::task::spawn_blocking(move || tls::load(&load)).await {
        Ok(loaded) => Ok(loaded?),
        Err(e) => Err(Error::Internal(format!("loading TLS files failed: {e}"))),
    }
}

/// `[runtime]`, `[admin]`, `[access_log]` and `[control]` apply only at start: warns about a change
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
    if config.control != running.control {
        tracing::warn!("a change of [control] applies only after a restart");
        config.control = running.control.clone();
    }
    if config.access_log != running.access_log {
        tracing::warn!("a change of [access_log] applies only after a restart");
        config.access_log = running.access_log.clone();
    }
}
