//! Per-scope handles: one listener, one listener's TLS, one upstream, one backend.
//! Each scope is resolved in one function, which records every series it creates in the
//! scope's [`Series`]; forgetting the scope (a reload removed it) removes exactly those,
//! so a metric added to a scope cannot be left behind when the scope goes.

use prometheus::{
    Counter, CounterVec, Gauge, GaugeVec, Histogram, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec,
};

use super::Metrics;
use super::labels::{
    AcceptFailure, AdminState, CheckResult, ConnectFailure, Direction, End, HandshakeResult, Label,
    RejectReason, per_value,
};
use strum::EnumCount;

/// The series one scope resolved: family and label values.
#[derive(Clone, Default)]
pub struct Series(Vec<(Family, Vec<String>)>);

#[derive(Clone)]
enum Family {
    Counter(IntCounterVec),
    Gauge(IntGaugeVec),
    Histogram(HistogramVec),
    FloatCounter(CounterVec),
    FloatGauge(GaugeVec),
}

impl Series {
    fn counter(&mut self, family: &IntCounterVec, labels: &[&str]) -> IntCounter {
        self.record(Family::Counter(family.clone()), labels);
        family.with_label_values(labels)
    }

    fn gauge(&mut self, family: &IntGaugeVec, labels: &[&str]) -> IntGauge {
        self.record(Family::Gauge(family.clone()), labels);
        family.with_label_values(labels)
    }

    fn histogram(&mut self, family: &HistogramVec, labels: &[&str]) -> Histogram {
        self.record(Family::Histogram(family.clone()), labels);
        family.with_label_values(labels)
    }

    fn float_counter(&mut self, family: &CounterVec, labels: &[&str]) -> Counter {
        self.record(Family::FloatCounter(family.clone()), labels);
        family.with_label_values(labels)
    }

    fn float_gauge(&mut self, family: &GaugeVec, labels: &[&str]) -> Gauge {
        self.record(Family::FloatGauge(family.clone()), labels);
        family.with_label_values(labels)
    }

    fn record(&mut self, family: Family, labels: &[&str]) {
        self.0
            .push((family, labels.iter().map(|l| (*l).to_string()).collect()));
    }

    /// Removes every recorded series from the exposition.
    pub fn forget(&self) {
        for (family, labels) in &self.0 {
            let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
            // An error means the series is already gone: nothing to do.
            let _ = match family {
                Family::Counter(f) => f.remove_label_values(&labels),
                Family::Gauge(f) => f.remove_label_values(&labels),
                Family::Histogram(f) => f.remove_label_values(&labels),
                Family::FloatCounter(f) => f.remove_label_values(&labels),
                Family::FloatGauge(f) => f.remove_label_values(&labels),
            };
        }
    }

    /// How many series were recorded, for tests.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

/// Handles for one listener.
#[derive(Clone)]
pub struct ListenerMetrics {
    pub accepted: IntCounter,
    pub active: IntGauge,
    rejected: [IntCounter; RejectReason::COUNT],
    closed: [IntCounter; End::COUNT],
    pub duration: Histogram,
    bytes: [IntCounter; Direction::COUNT],
    accept_errors: [IntCounter; AcceptFailure::COUNT],
    /// Sampled at each scrape (`data/held.rs`), never on the connection path.
    pub client_entries: IntGauge,
    pub client_evictions: IntCounter,
    pub accept_queue: IntGauge,
    pub accept_queue_limit: IntGauge,
    pub at_cap: Counter,
    pub series: Series,
}

impl ListenerMetrics {
    pub fn rejected(&self, reason: RejectReason) -> &IntCounter {
        &self.rejected[reason.index()]
    }

    pub fn closed(&self, end: End) -> &IntCounter {
        &self.closed[end.index()]
    }

    pub fn accept_error(&self, failure: AcceptFailure) -> &IntCounter {
        &self.accept_errors[failure.index()]
    }

    pub fn bytes(&self, direction: Direction) -> &IntCounter {
        &self.bytes[direction.index()]
    }
}

/// Handles for one listener that terminates TLS. Its certificates' expiry gauges are
/// in [`TlsMetrics::series`] too.
#[derive(Clone)]
pub struct TlsMetrics {
    handshakes: [IntCounter; HandshakeResult::COUNT],
    pub handshake_duration: Histogram,
    pub series: Series,
}

impl TlsMetrics {
    pub fn handshake(&self, result: HandshakeResult) -> &IntCounter {
        &self.handshakes[result.index()]
    }
}

/// Handles for one upstream.
#[derive(Clone)]
pub struct UpstreamMetrics {
    pub connect_duration: Histogram,
    pub queue_length: IntGauge,
    pub queue_wait: Histogram,
    pub series: Series,
}

/// Handles for one backend of one upstream.
#[derive(Clone)]
pub struct BackendMetrics {
    pub active: IntGauge,
    connect_errors: [IntCounter; ConnectFailure::COUNT],
    pub up: IntGauge,
    health_checks: [IntCounter; CheckResult::COUNT],
    pub ejections: IntCounter,
    /// 1 for the current admin state, 0 for the others.
    admin_state: [IntGauge; AdminState::COUNT],
    /// The effective weight.
    pub weight: IntGauge,
    /// Connections ended by an operator's close.
    pub closed_by_operator: IntCounter,
    /// Bytes of the backend's connections, added when each ends.
    bytes: [IntCounter; Direction::COUNT],
    /// Sampled at each scrape: the weight ramped by slow start.
    pub effective_weight: Gauge,
    pub series: Series,
}

impl BackendMetrics {
    /// Sets the admin-state gauges to `state`.
    pub fn set_admin_state(&self, state: AdminState) {
        for (i, g) in self.admin_state.iter().enumerate() {
            g.set(i64::from(i == state.index()));
        }
    }

    pub fn health_check(&self, result: CheckResult) -> &IntCounter {
        &self.health_checks[result.index()]
    }

    /// Bytes of the backend's connections that ended, in direction `d`.
    pub fn bytes(&self, d: Direction) -> &IntCounter {
        &self.bytes[d.index()]
    }

    pub fn connect_error(&self, failure: ConnectFailure) -> &IntCounter {
        &self.connect_errors[failure.index()]
    }
}

impl Metrics {
    pub fn listener(&self, name: &str, max_connections: usize) -> ListenerMetrics {
        let mut s = Series::default();
        let l = &[name];
        s.gauge(&self.listener_max_connections, l)
            .set(i64::try_from(max_connections).unwrap_or(i64::MAX));
        ListenerMetrics {
            accepted: s.counter(&self.connections_accepted, l),
            active: s.gauge(&self.connections_active, l),
            rejected: per_value(|r: RejectReason| {
                s.counter(&self.connections_rejected, &[name, r.as_str()])
            }),
            closed: per_value(|e: End| s.counter(&self.connections_closed, &[name, e.as_str()])),
            duration: s.histogram(&self.connection_duration, l),
            bytes: per_value(|d: Direction| s.counter(&self.bytes, &[name, d.as_str()])),
            accept_errors: per_value(|f: AcceptFailure| {
                s.counter(&self.accept_errors, &[name, f.as_str()])
            }),
            client_entries: s.gauge(&self.client_table_entries, l),
            client_evictions: s.counter(&self.client_table_evictions, l),
            accept_queue: s.gauge(&self.listener_accept_queue, l),
            accept_queue_limit: s.gauge(&self.listener_accept_queue_limit, l),
            at_cap: s.float_counter(&self.listener_at_cap, l),
            series: s,
        }
    }

    /// Handles for a TLS listener; sets the expiry gauge of each certificate.
    pub fn listener_tls(&self, name: &str, expiries: &[(String, i64)]) -> TlsMetrics {
        let mut s = Series::default();
        for (certificate, not_after) in expiries {
            s.gauge(&self.tls_certificate_expiry, &[name, certificate])
                .set(*not_after);
        }
        TlsMetrics {
            handshakes: per_value(|r: HandshakeResult| {
                s.counter(&self.tls_handshakes, &[name, r.as_str()])
            }),
            handshake_duration: s.histogram(&self.tls_handshake_duration, &[name]),
            series: s,
        }
    }

    /// Drops the expiry gauge of a certificate a listener no longer serves.
    pub fn forget_certificate(&self, listener: &str, certificate: &str) {
        let _ = self
            .tls_certificate_expiry
            .remove_label_values(&[listener, certificate]);
    }

    pub fn upstream(&self, name: &str) -> UpstreamMetrics {
        let mut s = Series::default();
        UpstreamMetrics {
            connect_duration: s.histogram(&self.upstream_connect_duration, &[name]),
            queue_length: s.gauge(&self.queue_length, &[name]),
            queue_wait: s.histogram(&self.queue_wait, &[name]),
            series: s,
        }
    }

    pub fn backend(&self, upstream: &str, address: &str) -> BackendMetrics {
        let mut s = Series::default();
        let b = &[upstream, address];
        BackendMetrics {
            active: s.gauge(&self.backend_connections_active, b),
            connect_errors: per_value(|f: ConnectFailure| {
                s.counter(
                    &self.upstream_connect_errors,
                    &[upstream, address, f.as_str()],
                )
            }),
            up: s.gauge(&self.backend_up, b),
            health_checks: per_value(|r: CheckResult| {
                s.counter(&self.health_checks, &[upstream, address, r.as_str()])
            }),
            ejections: s.counter(&self.backend_ejections, b),
            admin_state: per_value(|a: AdminState| {
                let g = s.gauge(&self.backend_admin_state, &[upstream, address, a.as_str()]);
                g.set(i64::from(a == AdminState::Ready));
                g
            }),
            weight: s.gauge(&self.backend_weight, b),
            closed_by_operator: s.counter(&self.backend_closed_by_operator, b),
            bytes: per_value(|d: Direction| {
                s.counter(&self.backend_bytes, &[upstream, address, d.as_str()])
            }),
            effective_weight: s.float_gauge(&self.backend_effective_weight, b),
            series: s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every series a scope resolves is exported, and forgetting the scope removes all
    /// of them: a metric added to a scope cannot leak after its scope is gone.
    #[test]
    fn a_forgotten_scope_leaves_no_series() {
        let m = Metrics::new().unwrap();
        let before = String::from_utf8(m.encode()).unwrap();
        let listener = m.listener("web", 10);
        let tls = m.listener_tls("web", &[("example.com".to_string(), 1)]);
        let upstream = m.upstream("pool");
        let backend = m.backend("pool", "127.0.0.1:1");
        let series = |text: &str, name: &str| {
            text.lines()
                .filter(|l| !l.starts_with('#') && l.contains(name))
                .count()
        };
        let during = String::from_utf8(m.encode()).unwrap();
        let per_label = RejectReason::COUNT + End::COUNT + AcceptFailure::COUNT + Direction::COUNT;
        assert!(listener.series.len() >= per_label + 4);
        let exported = |name: &str, label: &str, value: &str| {
            during
                .lines()
                .any(|l| l.starts_with(name) && l.contains(&format!("{label}=\"{value}\"")))
        };
        use strum::VariantArray;
        for r in RejectReason::VARIANTS {
            assert!(exported(
                super::super::CONNECTIONS_REJECTED,
                "reason",
                r.as_str()
            ));
        }
        for e in End::VARIANTS {
            assert!(exported(
                super::super::CONNECTIONS_CLOSED,
                "reason",
                e.as_str()
            ));
        }
        for f in AcceptFailure::VARIANTS {
            assert!(exported(super::super::ACCEPT_ERRORS, "reason", f.as_str()));
        }
        for d in Direction::VARIANTS {
            assert!(exported(super::super::BYTES, "direction", d.as_str()));
        }
        for r in HandshakeResult::VARIANTS {
            assert!(exported(super::super::TLS_HANDSHAKES, "result", r.as_str()));
        }
        for f in ConnectFailure::VARIANTS {
            assert!(exported(
                super::super::UPSTREAM_CONNECT_ERRORS,
                "reason",
                f.as_str()
            ));
        }
        for r in CheckResult::VARIANTS {
            assert!(exported(super::super::HEALTH_CHECKS, "result", r.as_str()));
        }
        for scope in [
            &listener.series,
            &tls.series,
            &upstream.series,
            &backend.series,
        ] {
            scope.forget();
        }
        let after = String::from_utf8(m.encode()).unwrap();
        for name in ["web", "pool", "127.0.0.1:1", "example.com"] {
            assert_eq!(series(&before, name), 0);
            assert!(series(&during, name) > 0, "{name} exported");
            assert_eq!(series(&after, name), 0, "{name} left behind:\n{after}");
        }
    }
}
