//! Prometheus metrics: requests by route and status, attestation latency, releases and
//! refusals by reason.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
    reason: String,
}

/// The broker's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    outcomes: Family<OutcomeLabels, Counter>,
    latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("broker");
        let requests = Family::<RequestLabels, Counter>::default();
        let outcomes = Family::<OutcomeLabels, Counter>::default();
        // 0.25 ms .. ~4 s
        let latency = Histogram::new(exponential_buckets(0.00025, 2.0, 15));
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            requests.clone(),
        );
        registry.register(
            "attestations",
            "Attestation outcomes (released or refused) by reason",
            outcomes.clone(),
        );
        registry.register(
            "attestation_duration_seconds",
            "Time to verify, decide and seal one attestation",
            latency.clone(),
        );
        Metrics {
            registry,
            requests,
            outcomes,
            latency,
        }
    }

    /// Counts a request.
    pub fn request(&self, route: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.to_string(),
                status: status.to_string(),
            })
            .inc();
    }

    /// Counts an attestation outcome.
    pub fn outcome(&self, outcome: &str, reason: &str) {
        self.outcomes
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Records an attestation's duration.
    pub fn attest_latency(&self, d: Duration) {
        self.latency.observe(d.as_secs_f64());
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
