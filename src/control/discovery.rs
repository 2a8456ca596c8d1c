//! Backends by name: one task per (upstream, name) re-resolves it when its TTL runs out
//! (bounded by `[resolver] min_interval` and `max_interval`, with jitter) and keeps its
//! current answer here. When an answer changes the endpoint set, the server loop is
//! woken and applies the config with the new endpoints through the same pipeline as a
//! reload (`Server::rediscover` in `apply.rs`): the `SnapshotDiff` carries the endpoints
//! that stay, retires the removed ones per `on_backend_removed`, and the checks are
//! reconciled. Connections never wait for DNS: they read the snapshot in force.
//!
//! Failure semantics (also in config/sluice.toml and docs/operations.md):
//! - a failed resolution (timeout, SERVFAIL, refused, no nameserver) keeps the last good
//!   set, however long it lasts; counted each time, logged once per change of state;
//! - NXDOMAIN or an empty answer empties the set only once it has persisted for `hold`;
//! - a name that never resolved gives no endpoints; its upstream refuses clients
//!   (`no_healthy_backend`) until it does.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::rr::{RData, RecordType};
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::{self, Config, DnsName, MAX_WEIGHT};
use crate::metrics::{Metrics, NameMetrics, ResolutionResult, unix_now};
use crate::shutdown;

/// An (upstream, name) pair: each is followed by its own task.
type Key = (String, DnsName);

/// The names of every upstream, their current answers, and the tasks that follow them.
pub struct Discovery {
    settings: config::Resolver,
    /// `None` until a config names a host, or when no resolver could be built (no usable
    /// `/etc/resolv.conf`): every name then fails, counted, until `[resolver]` changes.
    resolver: Option<Arc<TokioResolver>>,
    /// Why the resolver could not be built.
    resolver_error: String,
    /// Whether building it was tried (with these settings).
    built: bool,
    tasks: HashMap<Key, Task>,
    answers: Answers,
    /// Woken when an answer changed some upstream's endpoint set.
    changed: Arc<Notify>,
    metrics: Arc<Metrics>,
}

struct Task {
    stop: CancellationToken,
    metrics: Arc<NameMetrics>,
}

type Answers = Arc<Mutex<HashMap<Key, Answer>>>;

/// What a name resolves to now, and how its resolutions have gone.
#[derive(Clone, Default)]
struct Answer {
    /// Sorted (priority, address): the order the balancer tables are built in.
    endpoints: Vec<Endpoint>,
    /// Unix seconds of the last answer with records.
    last_success: Option<f64>,
    /// Since when resolutions fail or come back empty (unix seconds), and the last error.
    failing: Option<(f64, String)>,
    /// Since when answers have been NXDOMAIN or empty: the set goes after `hold`.
    empty_since: Option<Instant>,
    /// Consecutive unsuccessful resolutions: the retry's back-off exponent.
    misses: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Endpoint {
    priority: u16,
    address: SocketAddr,
    /// The SRV record's weight (clamped to 1..=MAX_WEIGHT); `None` for A/AAAA answers,
    /// which take the backend entry's weight.
    weight: Option<u32>,
    /// As answered, in seconds (the smallest of the records that led to it).
    ttl: u32,
}

/// How one resolution ended.
enum Outcome {
    /// Records, and the smallest TTL among them.
    Records(Vec<Endpoint>, u32),
    /// NXDOMAIN, or no record of the types asked.
    Empty,
    Failed(String),
}

impl Discovery {
    /// No resolver yet: it is built (reading `/etc/resolv.conf`) when a config first
    /// names a host, so a config without names never reads it.
    pub fn new(settings: &config::Resolver, metrics: Arc<Metrics>) -> Discovery {
        Discovery {
            settings: settings.clone(),
            resolver: None,
            resolver_error: String::new(),
            built: false,
            tasks: HashMap::new(),
            answers: Arc::default(),
            changed: Arc::new(Notify::new()),
            metrics,
        }
    }

    /// Builds the resolver off the event loop (it may read `/etc/resolv.conf`).
    async fn build(&mut self) {
        self.built = true;
        let settings = self.settings.clone();
        let built = tokio::task::spawn_blocking(move || {
            build_resolver(&settings).map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        match built {
            Ok(r) => self.resolver = Some(Arc::new(r)),
            Err(e) => {
                let error = format!("no DNS resolver: {e}");
                tracing::error!(%error, "backend names cannot be resolved");
                self.resolver_error = error;
            }
        }
    }

    /// Notified when an answer changed the endpoints some upstream should have.
    pub fn changed(&self) -> Arc<Notify> {
        Arc::clone(&self.changed)
    }

    /// Follows exactly the names `config` has: starts a task for each new one and waits
    /// (at most one resolution's timeout) for their first answers, stops those of names
    /// it no longer has. A change of `[resolver]` restarts every task.
    pub async fn reconcile(&mut self, config: &Config) {
        if config.resolver != self.settings {
            for (_, task) in self.tasks.drain() {
                shutdown::cancel(&task.stop);
            }
            *self = Discovery {
                tasks: HashMap::new(),
                answers: Arc::clone(&self.answers),
                changed: Arc::clone(&self.changed),
                ..Discovery::new(&config.resolver, Arc::clone(&self.metrics))
            };
        }
        let wanted: HashSet<Key> = config
            .upstreams
            .iter()
            .flat_map(|u| {
                u.discovered
                    .iter()
                    .map(|d| (u.name.clone(), d.name.clone()))
            })
            .collect();
        self.tasks.retain(|key, task| {
            let keep = wanted.contains(key);
            if !keep {
                shutdown::cancel(&task.stop);
                self.metrics.discovery.forget(&task.metrics);
                lock(&self.answers).remove(key);
            }
            keep
        });
        if !wanted.is_empty() && !self.built {
            self.build().await;
        }
        let mut first = Vec::new();
        for key in wanted {
            if self.tasks.contains_key(&key) {
                continue;
            }
            let metrics = Arc::new(self.metrics.discovery.name(&key.0, &key.1.to_string()));
            metrics.hold.set(self.settings.hold.as_secs_f64());
            let stop = CancellationToken::new();
            let (done, answered) = oneshot::channel();
            first.push(answered);
            let follow = Follow {
                key: key.clone(),
                resolver: self.resolver.clone(),
                resolver_error: self.resolver_error.clone(),
                settings: self.settings.clone(),
                answers: Arc::clone(&self.answers),
                changed: Arc::clone(&self.changed),
                metrics: Arc::clone(&metrics),
            };
            let stopped = stop.clone();
            tokio::spawn(async move {
                tokio::select! {
                    biased;
                    () = stopped.cancelled() => {}
                    () = follow.run(done) => {}
                }
            });
            self.tasks.insert(key, Task { stop, metrics });
        }
        // New names start with an answer where one comes in time: a config with names
        // starts (or reloads) with their endpoints rather than without them for a moment.
        let deadline = tokio::time::Instant::now() + resolution_timeout(&self.settings);
        for answered in first {
            let _ = tokio::time::timeout_at(deadline, answered).await;
        }
    }

    /// Sets each upstream's endpoints in `config` to its IP-literal backends followed by
    /// what its names resolve to now, in config order and each name's answer sorted; an
    /// address already present is not added twice. Whatever endpoints `config` had from
    /// names before are replaced, so this can be applied to a config already expanded.
    pub fn expand(&self, config: &mut Config) {
        let answers = lock(&self.answers);
        for upstream in &mut config.upstreams {
            upstream.backends.retain(|b| b.entry.is_none());
            for d in &upstream.discovered {
                let key = (upstream.name.clone(), d.name.clone());
                let Some(answer) = answers.get(&key) else {
                    continue;
                };
                for e in &answer.endpoints {
                    if upstream.backends.iter().any(|b| b.address == e.address) {
                        continue;
                    }
                    upstream.backends.push(config::Backend {
                        address: e.address,
                        weight: e.weight.unwrap_or(d.weight),
                        entry: Some(d.name.clone()),
                        priority: e.priority,
                    });
                }
                if let Some(task) = self.tasks.get(&key) {
                    task.metrics
                        .endpoints
                        .set(i64::try_from(answer.endpoints.len()).unwrap_or(i64::MAX));
                }
            }
        }
    }

    /// For `/config`: each name, its current addresses with their TTL, and its state.
    pub fn viewer(&self) -> View {
        let answers = Arc::clone(&self.answers);
        Arc::new(move || view(&answers))
    }
}

/// What `/config` shows of the names, asked for when it is requested.
pub type View = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

fn view(answers: &Answers) -> serde_json::Value {
    let answers = lock(answers);
    let mut names: Vec<(&Key, &Answer)> = answers.iter().collect();
    names.sort_by(|a, b| a.0.cmp(b.0));
    let names: Vec<serde_json::Value> = names
        .into_iter()
        .map(|((upstream, name), a)| {
            serde_json::json!({
                "upstream": upstream,
                "name": name.to_string(),
                "endpoints": a.endpoints.iter().map(|e| serde_json::json!({
                    "address": e.address,
                    "ttl": e.ttl,
                    "priority": e.priority,
                    "weight": e.weight,
                })).collect::<Vec<_>>(),
                "last_success": a.last_success,
                "failing_since": a.failing.as_ref().map(|f| f.0),
                "error": a.failing.as_ref().map(|f| f.1.clone()),
            })
        })
        .collect();
    serde_json::Value::Array(names)
}

/// How long endpoints that an answer replaced stay beside their replacements. A
/// connection accepted just before a change still picks from the snapshot it was
/// accepted with: were every endpoint of that snapshot retired at once, it would find
/// none available. So a change that both adds and removes applies in two steps: the new
/// endpoints join, and the old ones go this much later.
pub const OVERLAP: std::time::Duration = std::time::Duration::from_secs(1);

/// `target` with the endpoints from names that `previous` has and `target` no longer
/// has put back (after the rest), for the first step of a change that adds and removes.
pub fn overlap(previous: &Config, target: &Config) -> Config {
    let mut both = target.clone();
    for u in &mut both.upstreams {
        let Some(old) = previous.upstreams.iter().find(|o| o.name == u.name) else {
            continue;
        };
        let going: Vec<config::Backend> = old
            .backends
            .iter()
            .filter(|b| b.entry.is_some() && !u.backends.iter().any(|n| n.address == b.address))
            .cloned()
            .collect();
        u.backends.extend(going);
    }
    both
}

/// Logs each endpoint a change of DNS answers added or removed, in the style of the
/// reload's log line: "endpoint 10.0.0.7:5432 of pg added (dns)".
pub fn log_endpoint_changes(before: &Config, after: &Config) {
    for u in &after.upstreams {
        let old = before.upstreams.iter().find(|o| o.name == u.name);
        let had = |a: SocketAddr| old.is_some_and(|o| o.backends.iter().any(|b| b.address == a));
        for b in u.backends.iter().filter(|b| !had(b.address)) {
            let name = b
                .entry
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default();
            tracing::info!(upstream = %u.name, %name, "endpoint {} of {} added (dns)", b.address, u.name);
        }
        for b in old.iter().flat_map(|o| &o.backends) {
            if !u.backends.iter().any(|n| n.address == b.address) {
                let name = b
                    .entry
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default();
                tracing::info!(upstream = %u.name, %name, "endpoint {} of {} removed (dns)", b.address, u.name);
            }
        }
    }
}

/// Resolves every name of `config` once, for `sluice check --resolve`: one line per
/// name, and whether all of them gave records.
pub async fn try_names(config: &Config) -> (Vec<String>, bool) {
    let resolver = match build_resolver(&config.resolver) {
        Ok(r) => r,
        Err(e) => return (vec![format!("no DNS resolver: {e}")], false),
    };
    let mut lines = Vec::new();
    let mut all = true;
    for u in &config.upstreams {
        for d in &u.discovered {
            let outcome = tokio::time::timeout(
                resolution_timeout(&config.resolver),
                resolve(&resolver, &d.name),
            )
            .await
            .unwrap_or_else(|_| Outcome::Failed("timed out".to_string()));
            let line = match outcome {
                Outcome::Records(endpoints, ttl) => {
                    let addresses: Vec<String> =
                        endpoints.iter().map(|e| e.address.to_string()).collect();
                    format!(
                        "upstream {:?}: {} resolves to {} (ttl {ttl}s)",
                        u.name,
                        d.name,
                        addresses.join(", ")
                    )
                }
                Outcome::Empty => {
                    all = false;
                    format!(
                        "upstream {:?}: {} has no records (NXDOMAIN or empty)",
                        u.name, d.name
                    )
                }
                Outcome::Failed(e) => {
                    all = false;
                    format!("upstream {:?}: {} cannot be resolved: {e}", u.name, d.name)
                }
            };
            lines.push(line);
        }
    }
    (lines, all)
}

fn lock(answers: &Answers) -> MutexGuard<'_, HashMap<Key, Answer>> {
    // Every update under the lock is a whole assignment, so a poisoned lock holds a
    // complete value.
    answers.lock().unwrap_or_else(|p| p.into_inner())
}

/// The longest one resolution may take: every attempt timing out, for the SRV records
/// and then their targets' addresses.
fn resolution_timeout(settings: &config::Resolver) -> Duration {
    settings.timeout * settings.attempts * 2 + Duration::from_millis(500)
}

/// A resolver with the `[resolver]` nameservers, or those of `/etc/resolv.conf`; its
/// cache is off because each task keeps its name's answer until its TTL runs out.
fn build_resolver(settings: &config::Resolver) -> Result<TokioResolver, NetError> {
    let mut builder = if settings.nameservers.is_empty() {
        TokioResolver::builder_tokio()?
    } else {
        let servers = settings
            .nameservers
            .iter()
            .map(|a| {
                let mut ns = NameServerConfig::udp_and_tcp(a.ip());
                for c in &mut ns.connections {
                    c.port = a.port();
                }
                ns
            })
            .collect();
        TokioResolver::builder_with_config(
            ResolverConfig::from_parts(None, Vec::new(), servers),
            TokioRuntimeProvider::default(),
        )
        .with_options(ResolverOpts::default())
    };
    let o = builder.options_mut();
    o.timeout = settings.timeout;
    o.attempts = settings.attempts as usize;
    o.cache_size = 0;
    builder.build()
}

/// One name's task: resolve, record, sleep until the answer is due again.
struct Follow {
    key: Key,
    resolver: Option<Arc<TokioResolver>>,
    resolver_error: String,
    settings: config::Resolver,
    answers: Answers,
    changed: Arc<Notify>,
    metrics: Arc<NameMetrics>,
}

impl Follow {
    async fn run(self, first: oneshot::Sender<()>) {
        let mut first = Some(first);
        loop {
            let outcome = match &self.resolver {
                None => Outcome::Failed(self.resolver_error.clone()),
                Some(r) => tokio::time::timeout(
                    resolution_timeout(&self.settings),
                    resolve(r, &self.key.1),
                )
                .await
                .unwrap_or_else(|_| Outcome::Failed("resolution timed out".to_string())),
            };
            let (changed, next) = self.record(outcome);
            if changed {
                self.changed.notify_one();
            }
            if let Some(f) = first.take() {
                let _ = f.send(());
            }
            tokio::time::sleep(next).await;
        }
    }

    /// Records `outcome` in the name's answer: whether its endpoints changed, and when to
    /// resolve again.
    fn record(&self, outcome: Outcome) -> (bool, Duration) {
        let s = &self.settings;
        let (upstream, name) = (&self.key.0, &self.key.1);
        let mut answers = lock(&self.answers);
        let a = answers.entry(self.key.clone()).or_default();
        // What the balancer sees; a TTL counting down is no change.
        let seen = |a: &Answer| {
            a.endpoints
                .iter()
                .map(|e| (e.priority, e.address, e.weight))
                .collect::<Vec<_>>()
        };
        let before = seen(a);
        let now = unix_now();
        let next = match outcome {
            Outcome::Records(endpoints, ttl) => {
                self.metrics.resolved(ResolutionResult::Ok);
                if a.failing.take().is_some() {
                    tracing::info!(%upstream, %name, endpoints = endpoints.len(), "backend name resolves again");
                }
                self.metrics.failing_since.set(0.0);
                self.metrics.last_success.set(now);
                a.last_success = Some(now);
                a.empty_since = None;
                a.misses = 0;
                a.endpoints = endpoints;
                Duration::from_secs(u64::from(ttl)).clamp(s.min_interval, s.max_interval)
            }
            Outcome::Empty => {
                self.metrics.resolved(ResolutionResult::Empty);
                let since = *a.empty_since.get_or_insert_with(Instant::now);
                let held = since.elapsed();
                if a.failing.as_ref().is_none_or(|f| f.1 != EMPTY) {
                    tracing::warn!(%upstream, %name, endpoints = a.endpoints.len(), hold = ?s.hold, "backend name has no records (NXDOMAIN or empty answer); its endpoints are kept until this lasts for hold");
                    self.failing(a, now, EMPTY);
                }
                if held >= s.hold && !a.endpoints.is_empty() {
                    tracing::warn!(%upstream, %name, endpoints = a.endpoints.len(), "backend name has had no records for longer than hold: its endpoints are removed");
                    a.endpoints.clear();
                }
                let retry = self.backoff(a);
                match a.endpoints.is_empty() {
                    true => retry,
                    // Look again when the hold runs out, so the set goes on time.
                    false => retry.min(s.hold.saturating_sub(held).max(Duration::from_millis(10))),
                }
            }
            Outcome::Failed(error) => {
                self.metrics.resolved(ResolutionResult::Error);
                if a.failing.as_ref().is_none_or(|f| f.1 != error) {
                    tracing::warn!(%upstream, %name, %error, endpoints = a.endpoints.len(), "cannot resolve backend name; keeping its last good endpoints");
                    self.failing(a, now, &error);
                }
                self.backoff(a)
            }
        };
        let changed = before != seen(a);
        // ±10%, so many sluices (and many names) do not ask in step.
        (changed, next.mul_f64(0.9 + 0.2 * fastrand::f64()))
    }

    /// Marks the answer failing with `error`, since now unless it already was.
    fn failing(&self, a: &mut Answer, now: f64, error: &str) {
        let since = a.failing.as_ref().map_or(now, |f| f.0);
        self.metrics.failing_since.set(since);
        a.failing = Some((since, error.to_string()));
    }

    /// After an unsuccessful resolution: `min_interval`, doubling, up to `max_interval`.
    fn backoff(&self, a: &mut Answer) -> Duration {
        let s = &self.settings;
        let wait = s.min_interval.saturating_mul(1 << a.misses.min(16));
        a.misses = a.misses.saturating_add(1);
        wait.min(s.max_interval)
    }
}

/// The error text of an empty answer, to tell it from a failure.
const EMPTY: &str = "no records";

/// Resolves `name` once: A and AAAA of a host, or SRV and then its targets' addresses.
async fn resolve(resolver: &TokioResolver, name: &DnsName) -> Outcome {
    match name {
        DnsName::Host { host, port } => match addresses(resolver, host).await {
            Ok((ips, ttl)) if !ips.is_empty() => Outcome::Records(
                sorted(ips.into_iter().map(|ip| Endpoint {
                    priority: 0,
                    address: SocketAddr::new(ip, *port),
                    weight: None,
                    ttl,
                })),
                ttl,
            ),
            Ok(_) => Outcome::Empty,
            Err(e) => Outcome::Failed(e),
        },
        DnsName::Srv { name } => srv(resolver, name).await,
    }
}

async fn srv(resolver: &TokioResolver, name: &str) -> Outcome {
    let records = match resolver.lookup(name, RecordType::SRV).await {
        Ok(lookup) => lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(s) => Some((s.clone(), r.ttl)),
                _ => None,
            })
            .collect::<Vec<_>>(),
        Err(e) if is_empty(&e) => return Outcome::Empty,
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    // Each target's addresses, looked up together.
    let mut lookups = tokio::task::JoinSet::new();
    let targets: HashSet<String> = records.iter().map(|(s, _)| s.target.to_ascii()).collect();
    for target in targets {
        let resolver = resolver.clone();
        lookups.spawn(async move {
            let found = addresses(&resolver, &target).await;
            (target, found)
        });
    }
    let mut found = HashMap::new();
    while let Some(done) = lookups.join_next().await {
        match done {
            Ok((target, Ok(a))) => {
                found.insert(target, a);
            }
            Ok((target, Err(e))) => return Outcome::Failed(format!("SRV target {target}: {e}")),
            Err(e) => return Outcome::Failed(format!("SRV target lookup failed: {e}")),
        }
    }
    let mut endpoints = Vec::new();
    for (s, ttl) in &records {
        let Some((ips, target_ttl)) = found.get(&s.target.to_ascii()) else {
            continue;
        };
        for ip in ips {
            endpoints.push(Endpoint {
                priority: s.priority,
                address: SocketAddr::new(*ip, s.port),
                // RFC 2782's weight 0 ("very small chance") counts as 1: sluice's weight 0
                // would mean no traffic at all.
                weight: Some(u32::from(s.weight).clamp(1, MAX_WEIGHT)),
                ttl: (*ttl).min(*target_ttl),
            });
        }
    }
    let ttl = endpoints.iter().map(|e| e.ttl).min().unwrap_or(0);
    let mut endpoints = sorted(endpoints);
    // The same address from two records: the first (lowest priority) stays.
    endpoints.dedup_by(|b, a| a.address == b.address);
    match endpoints.is_empty() {
        true => Outcome::Empty,
        false => Outcome::Records(endpoints, ttl),
    }
}

/// The A and AAAA addresses of `host` (asked together), with the smallest TTL; empty
/// when neither has records. `Err` when either query failed.
async fn addresses(resolver: &TokioResolver, host: &str) -> Result<(Vec<IpAddr>, u32), String> {
    let (v4, v6) = tokio::join!(
        resolver.lookup(host, RecordType::A),
        resolver.lookup(host, RecordType::AAAA)
    );
    let mut ips = Vec::new();
    let mut ttl = u32::MAX;
    for answer in [v4, v6] {
        match answer {
            Ok(lookup) => {
                for r in lookup.answers() {
                    let ip = match &r.data {
                        RData::A(a) => IpAddr::V4(a.0),
                        RData::AAAA(a) => IpAddr::V6(a.0),
                        _ => continue,
                    };
                    ttl = ttl.min(r.ttl);
                    ips.push(ip);
                }
            }
            Err(e) if is_empty(&e) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok((ips, if ttl == u32::MAX { 0 } else { ttl }))
}

/// NXDOMAIN, or a name without records of the type asked: an answer, not a failure.
fn is_empty(e: &NetError) -> bool {
    matches!(e, NetError::Dns(DnsError::NoRecordsFound(_)))
}

fn sorted(endpoints: impl IntoIterator<Item = Endpoint>) -> Vec<Endpoint> {
    let mut v: Vec<Endpoint> = endpoints.into_iter().collect();
    v.sort();
    v.dedup_by(|b, a| a.address == b.address);
    v
}
