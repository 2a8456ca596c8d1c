//! Every metric sluice exports, named in one place so the dashboard and alert rules stay
//! valid. Labels come from config names only (listener, upstream, backend address, reason),
//! never from a client.
//!
//! Label lookups happen when a snapshot is built (the scopes in `scope.rs`: a listener, its
//! TLS, an upstream, a backend); connections touch only the resolved handles, which are
//! atomics. Label values are the enums of `labels.rs`.

mod discovery;
mod labels;
mod scope;

pub use discovery::{
    DISCOVERY_ENDPOINTS, DISCOVERY_FAILING_SINCE, DISCOVERY_HOLD, DISCOVERY_LAST_SUCCESS,
    DISCOVERY_RESOLUTIONS, DiscoveryMetrics, NameMetrics,
};
pub use labels::{
    AcceptFailure, CheckResult, ConnectFailure, Direction, End, HandshakeResult, Label,
    RejectReason, ResolutionResult,
};
pub use labels::{AdminState, CtlResult};
pub use scope::{BackendMetrics, ListenerMetrics, Series, TlsMetrics, UpstreamMetrics};

use prometheus::{
    CounterVec, Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub const BUILD_INFO: &str = "sluice_build_info";
pub const CONNECTIONS_ACCEPTED: &str = "sluice_connections_accepted_total";
pub const CONNECTIONS_ACTIVE: &str = "sluice_connections_active";
pub const CONNECTIONS_REJECTED: &str = "sluice_connections_rejected_total";
pub const CONNECTIONS_CLOSED: &str = "sluice_connections_closed_total";
pub const CONNECTION_DURATION: &str = "sluice_connection_duration_seconds";
pub const BYTES: &str = "sluice_bytes_total";
pub const LISTENER_MAX_CONNECTIONS: &str = "sluice_listener_max_connections";
pub const ACCEPT_ERRORS: &str = "sluice_accept_errors_total";
pub const BACKEND_CONNECTIONS_ACTIVE: &str = "sluice_backend_connections_active";
pub const UPSTREAM_CONNECT_DURATION: &str = "sluice_upstream_connect_duration_seconds";
pub const UPSTREAM_CONNECT_ERRORS: &str = "sluice_upstream_connect_errors_total";
pub const CONFIG_GENERATION: &str = "sluice_config_generation";
pub const CONFIG_RELOADS: &str = "sluice_config_reloads_total";
pub const CONFIG_LAST_RELOAD_SUCCESSFUL: &str = "sluice_config_last_reload_successful";
pub const CONFIG_LAST_RELOAD_SUCCESS_TIMESTAMP: &str =
    "sluice_config_last_reload_success_timestamp_seconds";
pub const DRAINING: &str = "sluice_draining";
pub const CONFIG_SNAPSHOTS: &str = "sluice_config_snapshots";
pub const ACCESS_LOG_DROPPED: &str = "sluice_access_log_dropped_total";
pub const BACKEND_UP: &str = "sluice_backend_up";
pub const HEALTH_CHECKS: &str = "sluice_health_checks_total";
pub const BACKEND_EJECTIONS: &str = "sluice_backend_ejections_total";
pub const QUEUE_LENGTH: &str = "sluice_queue_length";
pub const QUEUE_WAIT: &str = "sluice_queue_wait_duration_seconds";
pub const PROCESS_MAX_CONNECTIONS: &str = "sluice_process_max_connections";
pub const TLS_HANDSHAKES: &str = "sluice_tls_handshakes_total";
pub const TLS_HANDSHAKE_DURATION: &str = "sluice_tls_handshake_duration_seconds";
pub const TLS_CERTIFICATE_EXPIRY: &str = "sluice_tls_certificate_expiry_timestamp_seconds";
pub const BACKEND_ADMIN_STATE: &str = "sluice_backend_admin_state";
pub const BACKEND_WEIGHT: &str = "sluice_backend_weight";
pub const CTL_REQUESTS: &str = "sluice_ctl_requests_total";
pub const BACKEND_CLOSED_BY_OPERATOR: &str = "sluice_backend_connections_closed_by_operator_total";
pub const BACKEND_BYTES: &str = "sluice_backend_bytes_total";
// Who may connect and how much; clients held back (issue 17).
pub const CLIENT_TABLE_ENTRIES: &str = "sluice_client_table_entries";
pub const CLIENT_TABLE_EVICTIONS: &str = "sluice_client_table_evictions_total";
pub const LISTENER_ACCEPT_QUEUE: &str = "sluice_listener_accept_queue";
pub const LISTENER_ACCEPT_QUEUE_LIMIT: &str = "sluice_listener_accept_queue_limit";
pub const LISTENER_AT_CAP: &str = "sluice_listener_at_cap_seconds_total";
pub const BACKEND_EFFECTIVE_WEIGHT: &str = "sluice_backend_effective_weight";
pub const START_TIME: &str = "sluice_start_time_seconds";
pub const UPGRADES: &str = "sluice_upgrades_total";

/// Connect times: sub-millisecond on a LAN up to the longest sensible connect timeout.
const CONNECT_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Queue waits: from a blink to the longest sensible queue timeout.
const QUEUE_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// TLS handshakes: a loopback handshake takes about a millisecond; a slow client up to
/// the handshake timeout.
const HANDSHAKE_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];
/// Connection lifetimes: a single request up to a day-long database session.
const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.05, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0,
];

/// The registry and every metric family, registered once at start.
pub struct Metrics {
    registry: Registry,
    connections_accepted: IntCounterVec,
    connections_active: IntGaugeVec,
    connections_rejected: IntCounterVec,
    connections_closed: IntCounterVec,
    connection_duration: HistogramVec,
    bytes: IntCounterVec,
    listener_max_connections: IntGaugeVec,
    accept_errors: IntCounterVec,
    backend_connections_active: IntGaugeVec,
    upstream_connect_duration: HistogramVec,
    upstream_connect_errors: IntCounterVec,
    backend_up: IntGaugeVec,
    health_checks: IntCounterVec,
    backend_ejections: IntCounterVec,
    queue_length: IntGaugeVec,
    queue_wait: HistogramVec,
    tls_handshakes: IntCounterVec,
    tls_handshake_duration: HistogramVec,
    tls_certificate_expiry: IntGaugeVec,
    backend_admin_state: IntGaugeVec,
    backend_weight: IntGaugeVec,
    backend_closed_by_operator: IntCounterVec,
    backend_bytes: IntCounterVec,
    /// Control socket requests, by route and result.
    pub ctl_requests: IntCounterVec,
    client_table_entries: IntGaugeVec,
    client_table_evictions: IntCounterVec,
    listener_accept_queue: IntGaugeVec,
    listener_accept_queue_limit: IntGaugeVec,
    listener_at_cap: CounterVec,
    backend_effective_weight: GaugeVec,
    pub config_generation: IntGauge,
    pub config_reloads_success: IntCounter,
    pub config_reloads_failure: IntCounter,
    pub config_last_reload_successful: IntGauge,
    pub config_last_reload_success_timestamp: Gauge,
    pub draining: IntGauge,
    pub process_max_connections: IntGauge,
    pub config_snapshots: IntGauge,
    pub access_log_dropped: IntCounter,
    /// Backends by name: written by the control plane's resolver tasks only.
    pub discovery: DiscoveryMetrics,
    pub start_time: Gauge,
    pub upgrades_success: IntCounter,
    pub upgrades_failure: IntCounter,
    pub upgrades_refused: IntCounter,
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let build_info = IntGaugeVec::new(
            Opts::new(BUILD_INFO, "sluice's version; the value is always 1"),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        registry.register(Box::new(build_info))?;
        // process_open_fds, process_max_fds, process_resident_memory_bytes,
        // process_cpu_seconds_total, process_start_time_seconds (Linux /proc).
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let reloads = counter_vec(
            &registry,
            CONFIG_RELOADS,
            "Config reload attempts, by result (success, failure)",
            &["result"],
        )?;

        let upgrades = counter_vec(
            &registry,
            UPGRADES,
            "Binary upgrades this process started, by result (success: the new process took over; failure; refused: one was already under way)",
            &["result"],
        )?;

        let m = Metrics {
            connections_accepted: counter_vec(
                &registry,
                CONNECTIONS_ACCEPTED,
                "Client connections accepted",
                &["listener"],
            )?,
            connections_active: gauge_vec(
                &registry,
                CONNECTIONS_ACTIVE,
                "Client connections open now",
                &["listener"],
            )?,
            connections_rejected: counter_vec(
                &registry,
                CONNECTIONS_REJECTED,
                "Client connections closed without reaching a backend, by reason",
                &["listener", "reason"],
            )?,
            connections_closed: counter_vec(
                &registry,
                CONNECTIONS_CLOSED,
                "Client connections that reached a backend, by how they ended",
                &["listener", "reason"],
            )?,
            connection_duration: histogram_vec(
                &registry,
                CONNECTION_DURATION,
                "Lifetime of client connections, from accept to close",
                &["listener"],
                DURATION_BUCKETS,
            )?,
            bytes: counter_vec(
                &registry,
                BYTES,
                "Bytes relayed, by direction (client_to_backend, backend_to_client)",
                &["listener", "direction"],
            )?,
            listener_max_connections: gauge_vec(
                &registry,
                LISTENER_MAX_CONNECTIONS,
                "The listener's configured max_connections",
                &["listener"],
            )?,
            accept_errors: counter_vec(
                &registry,
                ACCEPT_ERRORS,
                "Failed accept calls, by reason (file_limit, memory, aborted, other)",
                &["listener", "reason"],
            )?,
            backend_connections_active: gauge_vec(
                &registry,
                BACKEND_CONNECTIONS_ACTIVE,
                "Connections open (or being opened) to a backend now",
                &["upstream", "backend"],
            )?,
            upstream_connect_duration: histogram_vec(
                &registry,
                UPSTREAM_CONNECT_DURATION,
                "Time to open a backend connection, TCP plus any PROXY header and TLS handshake (successful attempts)",
                &["upstream"],
                CONNECT_BUCKETS,
            )?,
            upstream_connect_errors: counter_vec(
                &registry,
                UPSTREAM_CONNECT_ERRORS,
                "Failed connect attempts to a backend, by reason",
                &["upstream", "backend", "reason"],
            )?,
            backend_up: gauge_vec(
                &registry,
                BACKEND_UP,
                "1 when the backend takes new connections as far as its health and the config go (checks pass, not ejected, configured weight above 0), else 0; an operator's drain, maint or weight is in sluice_backend_admin_state and sluice_backend_weight",
                &["upstream", "backend"],
            )?,
            health_checks: counter_vec(
                &registry,
                HEALTH_CHECKS,
                "Active health checks, by result (success, failure, timeout)",
                &["upstream", "backend", "result"],
            )?,
            backend_ejections: counter_vec(
                &registry,
                BACKEND_EJECTIONS,
                "Times a backend was ejected after consecutive connect failures",
                &["upstream", "backend"],
            )?,
            queue_length: gauge_vec(
                &registry,
                QUEUE_LENGTH,
                "Clients waiting for a backend slot now",
                &["upstream"],
            )?,
            queue_wait: histogram_vec(
                &registry,
                QUEUE_WAIT,
                "Time clients waited in the queue before getting a backend slot",
                &["upstream"],
                QUEUE_BUCKETS,
            )?,
            tls_handshakes: counter_vec(
                &registry,
                TLS_HANDSHAKES,
                "TLS handshakes on listeners that terminate TLS, by result (success, timeout, protocol_error, client_certificate, incompatible, certificate_rejected, aborted)",
                &["listener", "result"],
            )?,
            tls_handshake_duration: histogram_vec(
                &registry,
                TLS_HANDSHAKE_DURATION,
                "Time from the first byte of TLS to a completed handshake (successful handshakes)",
                &["listener"],
                HANDSHAKE_BUCKETS,
            )?,
            tls_certificate_expiry: gauge_vec(
                &registry,
                TLS_CERTIFICATE_EXPIRY,
                "notAfter of each certificate a listener serves, as Unix time",
                &["listener", "certificate"],
            )?,
            client_table_entries: gauge_vec(
                &registry,
                CLIENT_TABLE_ENTRIES,
                "Clients the listener's per-client limits track now (sampled at each scrape)",
                &["listener"],
            )?,
            client_table_evictions: counter_vec(
                &registry,
                CLIENT_TABLE_EVICTIONS,
                "Idle clients dropped from a full per-client table before their rate state expired",
                &["listener"],
            )?,
            listener_accept_queue: gauge_vec(
                &registry,
                LISTENER_ACCEPT_QUEUE,
                "Connections the kernel completed that wait in the listener's accept queues, not yet accepted (sampled at each scrape)",
                &["listener"],
            )?,
            listener_accept_queue_limit: gauge_vec(
                &registry,
                LISTENER_ACCEPT_QUEUE_LIMIT,
                "Longest the listener's accept queues may grow in all: backlog (capped by net.core.somaxconn) times its sockets",
                &["listener"],
            )?,
            listener_at_cap: {
                let v = CounterVec::new(
                    Opts::new(
                        LISTENER_AT_CAP,
                        "Time the listener's accept loops spent waiting for a slot under max_connections or the process cap",
                    ),
                    &["listener"],
                )?;
                registry.register(Box::new(v.clone()))?;
                v
            },
            backend_effective_weight: {
                let v = GaugeVec::new(
                    Opts::new(
                        BACKEND_EFFECTIVE_WEIGHT,
                        "The weight the balancer uses now: the configured weight, ramped during slow start (sampled at each scrape)",
                    ),
                    &["upstream", "backend"],
                )?;
                registry.register(Box::new(v.clone()))?;
                v
            },
            config_generation: gauge(
                &registry,
                CONFIG_GENERATION,
                "Generation of the config in use: 0 at start, one more for each applied reload",
            )?,
            config_reloads_success: reloads.with_label_values(&["success"]),
            config_reloads_failure: reloads.with_label_values(&["failure"]),
            config_last_reload_successful: gauge(
                &registry,
                CONFIG_LAST_RELOAD_SUCCESSFUL,
                "1 if the last reload attempt applied (or none was made), 0 if it failed",
            )?,
            config_last_reload_success_timestamp: {
                let g = Gauge::new(
                    CONFIG_LAST_RELOAD_SUCCESS_TIMESTAMP,
                    "Unix time of the last config load that applied (the start counts)",
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            draining: gauge(
                &registry,
                DRAINING,
                "1 while sluice is shutting down and draining connections",
            )?,
            access_log_dropped: {
                let c = IntCounter::new(
                    ACCESS_LOG_DROPPED,
                    "Access log lines dropped because the writer could not keep up",
                )?;
                registry.register(Box::new(c.clone()))?;
                c
            },
            config_snapshots: gauge(
                &registry,
                CONFIG_SNAPSHOTS,
                "Config snapshots in memory: the one in use and older ones still held by open connections",
            )?,
            process_max_connections: gauge(
                &registry,
                PROCESS_MAX_CONNECTIONS,
                "Proxied connections the open-file limit allows in all, keeping descriptors spare for the admin endpoint",
            )?,
            backend_admin_state: gauge_vec(
                &registry,
                BACKEND_ADMIN_STATE,
                "1 for the backend's admin state (ready, drain, maint; set by sluice ctl), 0 for the others",
                &["upstream", "backend", "state"],
            )?,
            backend_weight: gauge_vec(
                &registry,
                BACKEND_WEIGHT,
                "The backend's effective weight: the configured one, or the override set by sluice ctl",
                &["upstream", "backend"],
            )?,
            backend_closed_by_operator: counter_vec(
                &registry,
                BACKEND_CLOSED_BY_OPERATOR,
                "Connections to the backend ended by an operator's close (sluice ctl close, maint --close, a drain's close_after)",
                &["upstream", "backend"],
            )?,
            backend_bytes: counter_vec(
                &registry,
                BACKEND_BYTES,
                "Bytes relayed through the backend's connections, counted when each connection ends (the listener's bytes count as they flow)",
                &["upstream", "backend", "direction"],
            )?,
            ctl_requests: counter_vec(
                &registry,
                CTL_REQUESTS,
                "Control socket requests, by route and result (ok, bad_request, unauthorized, not_found, method_not_allowed, failed)",
                &["route", "result"],
            )?,
            discovery: DiscoveryMetrics::new(&registry)?,
            start_time: {
                let g = Gauge::new(
                    START_TIME,
                    "Unix time this sluice process started (with sluice_build_info's version: which binary runs since when)",
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            upgrades_success: upgrades.with_label_values(&["success"]),
            upgrades_failure: upgrades.with_label_values(&["failure"]),
            upgrades_refused: upgrades.with_label_values(&["refused"]),
            registry,
        };
        Ok(m)
    }

    /// The Prometheus text exposition of everything registered.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec fails only on invalid metric names, which are constants here.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

fn counter_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let v = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(v.clone()))?;
    Ok(v)
}

fn gauge_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntGaugeVec> {
    let v = IntGaugeVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(v.clone()))?;
    Ok(v)
}

fn gauge(r: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
    let g = IntGauge::new(name, help)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn histogram_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> prometheus::Result<HistogramVec> {
    let v = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )?;
    r.register(Box::new(v.clone()))?;
    Ok(v)
}

/// Now as Unix seconds, for the timestamp gauges and `/config`.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
