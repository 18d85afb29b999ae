//! Prometheus metrics: requests by route and status, attestation latency, releases and
//! refusals by reason.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
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
    connections_refused: Family<ReasonLabels, Counter>,
    simulated_root: Gauge,
    ocsp_staple_expiry: Gauge,
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
        let connections_refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections closed at accept: the connection limit (limit) or a source's share of it (per_source)",
            connections_refused.clone(),
        );
        let simulated_root = Gauge::default();
        registry.register(
            "dangerous_simulated_root",
            "1 when this broker trusts a SIMULATED AMD root (attestation.dangerous_trust_simulated_root): never in production",
            simulated_root.clone(),
        );
        let ocsp_staple_expiry = Gauge::default();
        registry.register(
            "tls_ocsp_staple_expiry_timestamp_seconds",
            "The nextUpdate (Unix time) of the OCSP response stapled to the server certificate; 0 when nothing is stapled",
            ocsp_staple_expiry.clone(),
        );
        Metrics {
            registry,
            requests,
            outcomes,
            latency,
            connections_refused,
            simulated_root,
            ocsp_staple_expiry,
        }
    }

    /// Registers the store's group-commit metrics.
    pub fn register_store(&mut self, commits: &crate::store::CommitMetrics) {
        self.registry.register(
            "store_commit_group_size",
            "Release decisions committed together in one store transaction (group commit)",
            commits.group_size.clone(),
        );
        self.registry.register(
            "store_commit_duration_seconds",
            "Time to commit one group of release decisions, the fsync included",
            commits.commit_seconds.clone(),
        );
        self.registry.register(
            "store_stale_decisions",
            "Release decisions decided again because secrets or policies changed before their commit",
            commits.stale.clone(),
        );
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

    /// Counts a connection closed at accept.
    pub fn connection_refused(&self, reason: &str) {
        self.connections_refused
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Marks the broker as trusting a simulated AMD root.
    pub fn set_simulated_root(&self, trusted: bool) {
        self.simulated_root.set(i64::from(trusted));
    }

    /// The gauge the OCSP stapler keeps at the stapled response's nextUpdate.
    pub fn ocsp_staple_expiry(&self) -> Gauge {
        self.ocsp_staple_expiry.clone()
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
