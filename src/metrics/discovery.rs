//! The metrics of backends by name (`control/discovery.rs`): per (upstream, name)
//! series, created when a name is configured and removed when a config drops it. They are
//! written by the resolver tasks of the control plane only, never on a connection's path.

use prometheus::{GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry};
use strum::VariantArray;

use super::labels::ResolutionResult;

pub const DISCOVERY_RESOLUTIONS: &str = "sluice_discovery_resolutions_total";
pub const DISCOVERY_ENDPOINTS: &str = "sluice_discovery_endpoints";
pub const DISCOVERY_LAST_SUCCESS: &str = "sluice_discovery_last_success_timestamp_seconds";
pub const DISCOVERY_FAILING_SINCE: &str = "sluice_discovery_failing_since_timestamp_seconds";
pub const DISCOVERY_HOLD: &str = "sluice_discovery_hold_seconds";

/// The families; a name's handles are resolved once, by [`DiscoveryMetrics::name`].
pub struct DiscoveryMetrics {
    resolutions: IntCounterVec,
    endpoints: IntGaugeVec,
    last_success: GaugeVec,
    failing_since: GaugeVec,
    hold: GaugeVec,
}

/// The handles of one (upstream, name).
pub struct NameMetrics {
    upstream: String,
    name: String,
    resolutions: Vec<prometheus::IntCounter>,
    pub endpoints: prometheus::IntGauge,
    pub last_success: prometheus::Gauge,
    pub failing_since: prometheus::Gauge,
    pub hold: prometheus::Gauge,
}

impl NameMetrics {
    pub fn resolved(&self, result: ResolutionResult) {
        self.resolutions[result as usize].inc();
    }
}

impl DiscoveryMetrics {
    pub(super) fn new(r: &Registry) -> prometheus::Result<DiscoveryMetrics> {
        let labels = &["upstream", "name"];
        let m = DiscoveryMetrics {
            resolutions: IntCounterVec::new(
                Opts::new(
                    DISCOVERY_RESOLUTIONS,
                    "DNS resolutions of backend names, by upstream, name and result (ok, empty: NXDOMAIN or no records, error: timeout, SERVFAIL, no nameserver)",
                ),
                &["upstream", "name", "result"],
            )?,
            endpoints: IntGaugeVec::new(
                Opts::new(
                    DISCOVERY_ENDPOINTS,
                    "Endpoints a backend name gives its upstream now",
                ),
                labels,
            )?,
            last_success: GaugeVec::new(
                Opts::new(
                    DISCOVERY_LAST_SUCCESS,
                    "When a backend name last resolved with records (Unix seconds; 0: never)",
                ),
                labels,
            )?,
            failing_since: GaugeVec::new(
                Opts::new(
                    DISCOVERY_FAILING_SINCE,
                    "When a backend name's resolutions started failing or coming back empty (Unix seconds); 0 while they succeed",
                ),
                labels,
            )?,
            hold: GaugeVec::new(
                Opts::new(
                    DISCOVERY_HOLD,
                    "How long a name's endpoints are kept after NXDOMAIN or an empty answer ([resolver] hold)",
                ),
                labels,
            )?,
        };
        r.register(Box::new(m.resolutions.clone()))?;
        r.register(Box::new(m.endpoints.clone()))?;
        r.register(Box::new(m.last_success.clone()))?;
        r.register(Box::new(m.failing_since.clone()))?;
        r.register(Box::new(m.hold.clone()))?;
        Ok(m)
    }

    /// The handles of `name` in `upstream`, created now (with every result at 0).
    pub fn name(&self, upstream: &str, name: &str) -> NameMetrics {
        let l = &[upstream, name];
        NameMetrics {
            upstream: upstream.to_string(),
            name: name.to_string(),
            resolutions: ResolutionResult::VARIANTS
                .iter()
                .map(|r| {
                    self.resolutions
                        .with_label_values(&[upstream, name, r.as_str()])
                })
                .collect(),
            endpoints: self.endpoints.with_label_values(l),
            last_success: self.last_success.with_label_values(l),
            failing_since: self.failing_since.with_label_values(l),
            hold: self.hold.with_label_values(l),
        }
    }

    /// Removes every series of `m`'s name: the config no longer has it.
    pub fn forget(&self, m: &NameMetrics) {
        let l = &[m.upstream.as_str(), m.name.as_str()];
        for r in ResolutionResult::VARIANTS {
            let _ = self
                .resolutions
                .remove_label_values(&[l[0], l[1], r.as_str()]);
        }
        let _ = self.endpoints.remove_label_values(l);
        let _ = self.last_success.remove_label_values(l);
        let _ = self.failing_since.remove_label_values(l);
        let _ = self.hold.remove_label_values(l);
    }
}
