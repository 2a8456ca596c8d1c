//! What applying a config changes against the snapshot in force, computed once and read
//! by everything that cares: the new snapshot's build (state carried over), backend
//! retirement, metric-series cleanup and the log line. A new rule about what survives a
//! reload is written here, once.
//!
//! Identity: a listener and an upstream are their names; a backend is its upstream's
//! name and its address.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use prometheus::IntGauge;

use crate::config::{self, BackendRemoved, Config};
use crate::edge::tls::Material;
use crate::metrics::Series;
use crate::snapshot::Snapshot;
use crate::upstream::{Backend, Carried, Upstream};
use crate::upstream::{pool::Pool, queue::Queue};

/// The difference between the snapshot in force and the config being applied.
pub struct SnapshotDiff {
    listeners: Changes,
    upstreams: Changes,
    /// Backend changes of upstreams both configs have, by upstream name.
    backends: Vec<(String, Changes)>,
    drain_timeout_changed: bool,
    relay_changed: bool,
    /// Anything in the config differs: what the named changes above do not cover is
    /// still a change, so a new top-level key cannot be silently ignored by a reload.
    config_changed: bool,
    /// A certificate, key or CA file's content changed.
    tls_files_changed: bool,
    /// What each upstream of the next config takes over, by name.
    carried: HashMap<String, Carried>,
    /// The next snapshot's retired backends: removed earlier or now, still in use.
    pub retired: Vec<(String, Arc<Backend>)>,
    /// Backends the next config no longer has.
    pub removed_backends: Vec<RemovedBackend>,
    /// Listeners the next config no longer has.
    pub removed_listeners: Vec<RemovedListener>,
    /// Upstreams the next config no longer has.
    pub removed_upstreams: Vec<RemovedUpstream>,
    /// TLS series to drop at once: certificates a kept listener no longer serves (by
    /// listener and certificate name), and the whole TLS scope of a kept listener that
    /// stopped terminating TLS.
    pub certificates_gone: Vec<(String, String)>,
    pub tls_scopes_gone: Vec<Series>,
}

/// Names added, removed and changed, in config order.
#[derive(Default)]
struct Changes {
    added: Vec<String>,
    removed: Vec<String>,
    changed: Vec<String>,
}

pub struct RemovedBackend {
    pub upstream: String,
    pub backend: Arc<Backend>,
    /// What happens to its open connections: the next config's upstream's
    /// `on_backend_removed`, or the old one's if the upstream went too.
    pub policy: BackendRemoved,
}

pub struct RemovedListener {
    pub name: String,
    /// Its open connections: its series go only once this is 0.
    pub active: IntGauge,
    /// Its own scope and, if it terminated TLS, its TLS scope.
    pub series: Vec<Series>,
}

pub struct RemovedUpstream {
    pub name: String,
    pub queue: Arc<Queue<Pool>>,
    pub series: Series,
}

impl SnapshotDiff {
    /// Compares `previous` (the snapshot in force, empty at start) with `next` and the
    /// TLS `material` loaded for it.
    pub fn new(previous: &Snapshot, next: &Config, material: &Material) -> SnapshotDiff {
        let old = &previous.config;
        let mut diff = SnapshotDiff {
            listeners: Changes::of(&old.listeners, &next.listeners, |l: &config::Listener| {
                l.name.clone()
            }),
            upstreams: Changes::of(&old.upstreams, &next.upstreams, |u: &config::Upstream| {
                u.name.clone()
            }),
            backends: Vec::new(),
            drain_timeout_changed: old.drain_timeout != next.drain_timeout,
            relay_changed: old.relay != next.relay,
            config_changed: **old != *next,
            tls_files_changed: previous.tls_fingerprint != material.fingerprint,
            carried: HashMap::new(),
            retired: previous.retired.clone(),
            removed_backends: Vec::new(),
            removed_listeners: Vec::new(),
            removed_upstreams: Vec::new(),
            certificates_gone: Vec::new(),
            tls_scopes_gone: Vec::new(),
        };
        for u in &next.upstreams {
            if let Some(before) = old.upstreams.iter().find(|o| o.name == u.name) {
                let changes = Changes::of(&before.backends, &u.backends, |b| b.address);
                diff.backends.push((u.name.clone(), changes));
            }
            let carried = diff.carry(previous.upstream(&u.name), u);
            diff.carried.insert(u.name.clone(), carried);
        }
        for old_upstream in &previous.upstreams {
            let kept = next.upstreams.iter().find(|u| u.name == old_upstream.name);
            for b in old_upstream.backends() {
                if kept.is_some_and(|u| u.backends.iter().any(|nb| nb.address == b.address)) {
                    continue;
                }
                diff.removed_backends.push(RemovedBackend {
                    upstream: old_upstream.name.clone(),
                    backend: Arc::clone(b),
                    policy: kept.map_or(old_upstream.on_backend_removed, |u| u.on_backend_removed),
                });
                diff.retired
                    .push((old_upstream.name.clone(), Arc::clone(b)));
            }
            if kept.is_none() {
                diff.removed_upstreams.push(RemovedUpstream {
                    name: old_upstream.name.clone(),
                    queue: Arc::clone(&old_upstream.queue),
                    series: old_upstream.metrics.series.clone(),
                });
            }
        }
        // Retired backends with no connection left have nothing to carry.
        diff.retired.retain(|(_, b)| b.active() > 0);
        for route in &previous.listeners {
            let kept = next.listeners.iter().any(|l| l.name == route.listener);
            let old_tls = route.tls.as_ref();
            if !kept {
                let mut series = vec![route.metrics.series.clone()];
                series.extend(old_tls.map(|(_, m)| m.series.clone()));
                diff.removed_listeners.push(RemovedListener {
                    name: route.listener.clone(),
                    active: route.metrics.active.clone(),
                    series,
                });
            }
            let Some((old_tls, old_tls_metrics)) = old_tls else {
                continue;
            };
            let now_tls = material.listeners.get(&route.listener).filter(|_| kept);
            for (certificate, _) in &old_tls.expiries {
                if now_tls.is_none_or(|t| !t.expiries.iter().any(|(c, _)| c == certificate)) {
                    diff.certificates_gone
                        .push((route.listener.clone(), certificate.clone()));
                }
            }
            if kept && now_tls.is_none() {
                diff.tls_scopes_gone.push(old_tls_metrics.series.clone());
            }
        }
        diff
    }

    /// What the next config's upstream `next` takes over: the queue of the upstream of
    /// the same name, and each backend it keeps, or takes back from the retired unless
    /// their connections were already told to close.
    fn carry(&mut self, before: Option<&Arc<Upstream>>, next: &config::Upstream) -> Carried {
        let mut backends = Vec::new();
        for b in &next.backends {
            let kept = before.and_then(|u| u.backends().iter().find(|o| o.address == b.address));
            if let Some(kept) = kept {
                backends.push(Arc::clone(kept));
                continue;
            }
            let revived = self.retired.iter().position(|(u, r)| {
                u == &next.name && r.address == b.address && !r.removed.is_cancelled()
            });
            if let Some(at) = revived {
                backends.push(self.retired.swap_remove(at).1);
            }
        }
        Carried {
            queue: before.map(|u| Arc::clone(&u.queue)),
            backends,
        }
    }

    /// What upstream `name` of the next config takes over (nothing for a new one).
    pub fn carried(&mut self, name: &str) -> Carried {
        self.carried.remove(name).unwrap_or_default()
    }

    /// Whether applying the config changes nothing that a reload applies: listeners,
    /// upstreams, backends, the drain timeout, `[relay]`, the TLS files' content.
    pub fn is_empty(&self) -> bool {
        self.listeners.is_empty()
            && self.upstreams.is_empty()
            && self.backends.iter().all(|(_, c)| c.is_empty())
            && !self.drain_timeout_changed
            && !self.relay_changed
            && !self.config_changed
            && !self.tls_files_changed
    }
}

impl Changes {
    /// Compares two lists of config items identified by `key`.
    fn of<T: PartialEq, K: PartialEq + fmt::Display>(
        old: &[T],
        new: &[T],
        key: impl Fn(&T) -> K,
    ) -> Changes {
        let find = |list: &[T], k: &K| list.iter().position(|x| &key(x) == k);
        let mut c = Changes::default();
        for n in new {
            match find(old, &key(n)) {
                None => c.added.push(key(n).to_string()),
                Some(i) if old[i] != *n => c.changed.push(key(n).to_string()),
                Some(_) => {}
            }
        }
        for o in old {
            if find(new, &key(o)).is_none() {
                c.removed.push(key(o).to_string());
            }
        }
        c
    }

    fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }

    fn describe(&self, what: &str, parts: &mut Vec<String>) {
        parts.extend(self.added.iter().map(|n| format!("{what} {n} added")));
        parts.extend(self.removed.iter().map(|n| format!("{what} {n} removed")));
        parts.extend(self.changed.iter().map(|n| format!("{what} {n} changed")));
    }
}

/// The log line's `changes`: what changed, in one line.
impl fmt::Display for SnapshotDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        self.listeners.describe("listener", &mut parts);
        self.upstreams.describe("upstream", &mut parts);
        for (upstream, changes) in &self.backends {
            changes.describe(&format!("backend of {upstream}"), &mut parts);
        }
        if self.drain_timeout_changed {
            parts.push("drain_timeout changed".to_string());
        }
        if self.relay_changed {
            parts.push("[relay] changed".to_string());
        }
        if self.tls_files_changed {
            parts.push("TLS files changed".to_string());
        }
        if parts.is_empty() && self.config_changed {
            f.write_str("settings changed")
        } else if parts.is_empty() {
            f.write_str("no effective change")
        } else {
            f.write_str(&parts.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use tokio_util::sync::CancellationToken;

    fn config(listeners: &[&str], backends: &[u16]) -> Config {
        let mut text = String::new();
        for l in listeners {
            text.push_str(&format!(
                "[[listener]]\nname = \"{l}\"\nbind = [\"127.0.0.1:0\"]\nupstream = \"u\"\n"
            ));
        }
        text.push_str("[[upstream]]\nname = \"u\"\n");
        for b in backends {
            text.push_str(&format!(
                "[[upstream.backend]]\naddress = \"127.0.0.1:{b}\"\n"
            ));
        }
        Config::parse(&text, std::path::Path::new("t.toml")).unwrap()
    }

    fn material() -> Material {
        crate::edge::tls::load(&config(&["l"], &[1])).unwrap()
    }

    /// Applies `next` to `previous` as the control plane does; returns the snapshot and
    /// what the diff said.
    fn apply(previous: &Snapshot, next: Config, metrics: &Metrics) -> (Snapshot, SnapshotDiff) {
        let diff = SnapshotDiff::new(previous, &next, &material());
        Snapshot::build(
            Arc::new(next),
            previous.generation + 1,
            metrics,
            diff,
            None,
            material(),
            &CancellationToken::new(),
        )
    }

    fn backend(s: &Snapshot, port: u16) -> Arc<Backend> {
        let u = s.upstream("u").unwrap();
        Arc::clone(
            u.backends()
                .iter()
                .find(|b| b.address.port() == port)
                .unwrap(),
        )
    }

    #[test]
    fn kept_backends_carry_their_state_removed_ones_retire_and_come_back() {
        let metrics = Metrics::new().unwrap();
        let first = config(&["l"], &[1, 2]);
        let empty = Snapshot::empty(&first, &metrics);
        let (s1, d1) = apply(&empty, first, &metrics);
        assert_eq!(
            d1.to_string(),
            "listener l added; upstream u added",
            "start is a diff against the empty snapshot"
        );
        let one = backend(&s1, 1);
        one.take(); // a connection open to 127.0.0.1:1

        let (s2, d2) = apply(&s1, config(&["l", "m"], &[2, 3]), &metrics);
        assert_eq!(
            d2.to_string(),
            "listener m added; upstream u changed; backend of u 127.0.0.1:3 added; backend of u 127.0.0.1:1 removed"
        );
        assert!(
            Arc::ptr_eq(&backend(&s1, 2), &backend(&s2, 2)),
            "kept: the same object"
        );
        assert!(Arc::ptr_eq(
            &s1.upstream("u").unwrap().queue,
            &s2.upstream("u").unwrap().queue
        ));
        assert_eq!(d2.removed_backends.len(), 1);
        assert_eq!(d2.removed_backends[0].backend.address.port(), 1);
        assert_eq!(
            s2.retired.len(),
            1,
            "removed but in use: retired, not forgotten"
        );

        let (s3, d3) = apply(&s2, config(&["l"], &[1, 2, 3]), &metrics);
        assert!(
            Arc::ptr_eq(&one, &backend(&s3, 1)),
            "re-added: taken back with its count"
        );
        assert_eq!(backend(&s3, 1).active(), 1);
        assert!(s3.retired.is_empty());
        assert_eq!(d3.removed_listeners.len(), 1);
        assert_eq!(d3.removed_listeners[0].name, "m");

        let (_, d4) = apply(&s3, config(&["l"], &[1, 2, 3]), &metrics);
        assert!(d4.is_empty());
        assert_eq!(d4.to_string(), "no effective change");
    }
}
