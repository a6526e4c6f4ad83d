//! Prometheus metrics, served at `/metrics`: what was issued, refused and revoked, how
//! introspection answers, how long calls and store operations take, and how far behind the
//! reaper and the revocation feed run.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CredentialLabels {
    pub kind: String,
    pub scope: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `allowed`, `denied` or `step_up`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScopeLabels {
    pub scope: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RevocationLabels {
    pub scope: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// `rate` or `concurrency`.
    pub limit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub operation: String,
}

type Histograms<Labels> = Family<Labels, Histogram, fn() -> Histogram>;

/// Latency buckets from 50 µs to about 3 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 17))
}

/// Every metric the broker exports, registered once at start.
pub struct Metrics {
    registry: Registry,
    pub credentials_issued: Family<CredentialLabels, Counter>,
    pub credentials_renewed: Family<CredentialLabels, Counter>,
    pub credentials_denied: Family<ScopeLabels, Counter>,
    pub policy_decisions: Family<DecisionLabels, Counter>,
    pub credentials_revoked: Family<RevocationLabels, Counter>,
    pub introspections: Family<ResultLabels, Counter>,
    pub rpc_seconds: Histograms<MethodLabels>,
    /// Calls refused because their caller was over a per-caller limit.
    pub calls_limited: Family<LimitLabels, Counter>,
    pub store_seconds: Histograms<OperationLabels>,
    /// How long after its expiry the last expired lease was marked expired.
    pub reaper_lag_seconds: Gauge<f64, AtomicU64>,
    /// Time from a revocation's commit to its delivery to a live feed subscriber.
    pub feed_delivery_seconds: Histogram,
    pub audit_events_sealed: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("warrant");
        let metrics = Metrics {
            credentials_issued: Family::default(),
            credentials_renewed: Family::default(),
            credentials_denied: Family::default(),
            policy_decisions: Family::default(),
            credentials_revoked: Family::default(),
            introspections: Family::default(),
            rpc_seconds: Family::new_with_constructor(latency_histogram),
            calls_limited: Family::default(),
            store_seconds: Family::new_with_constructor(latency_histogram),
            reaper_lag_seconds: Gauge::default(),
            feed_delivery_seconds: latency_histogram(),
            audit_events_sealed: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "credentials_issued",
            "Credentials issued, by kind and scope",
            metrics.credentials_issued.clone(),
        );
        registry.register(
            "credentials_renewed",
            "Leases renewed, by kind and scope",
            metrics.credentials_renewed.clone(),
        );
        registry.register(
            "credentials_denied",
            "Grant requests refused by policy, by scope",
            metrics.credentials_denied.clone(),
        );
        registry.register(
            "policy_decisions",
            "Policy decisions on grant requests, renewals and retries, by outcome",
            metrics.policy_decisions.clone(),
        );
        registry.register(
            "credentials_revoked",
            "Leases ended by completion, revocation or expiry, by scope and reason",
            metrics.credentials_revoked.clone(),
        );
        registry.register(
            "introspections",
            "Introspection answers, by result",
            metrics.introspections.clone(),
        );
        registry.register(
            "rpc_duration_seconds",
            "gRPC call latency, by method",
            metrics.rpc_seconds.clone(),
        );
        registry.register(
            "calls_limited",
            "Calls refused because their caller was over its rate or concurrency limit, by limit",
            metrics.calls_limited.clone(),
        );
        registry.register(
            "store_duration_seconds",
            "Store operation latency, by operation",
            metrics.store_seconds.clone(),
        );
        registry.register(
            "reaper_lag_seconds",
            "How late the last expiry sweep marked the most overdue lease",
            metrics.reaper_lag_seconds.clone(),
        );
        registry.register(
            "revocation_feed_delivery_seconds",
            "Time from a revocation's commit to its delivery to a live subscriber",
            metrics.feed_delivery_seconds.clone(),
        );
        registry.register(
            "audit_events_sealed",
            "Audit events chained by the sealer (on PostgreSQL; SQLite chains events as it writes them)",
            metrics.audit_events_sealed.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("encode metrics to a String");
        text
    }

    pub fn revoked(&self, scope: &str, reason: &str, count: u64) {
        let labels = RevocationLabels {
            scope: scope.to_owned(),
            reason: reason.to_owned(),
        };
        self.credentials_revoked
            .get_or_create(&labels)
            .inc_by(count);
    }
}
