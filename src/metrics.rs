//! Prometheus metrics, in a registry owned by the application (no process-wide state, so several services
//! in one process, as in the tests, keep separate counts). Served at `GET /metrics`.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Latency buckets in seconds, from 0.5 ms to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

pub struct Metrics {
    registry: Registry,
    /// GraphQL operations executed, by their root fields (`pushMessage`, `dialogs+messages`, ...).
    pub operations: IntCounterVec,
    pub operation_seconds: HistogramVec,
    /// Errors returned to clients, by `extensions.code`.
    pub errors: IntCounterVec,
    /// Operations by how they were validated: see `crate::execution`.
    pub validations: IntCounterVec,
    pub lanes: IntCounterVec,
    /// Consent decisions recorded, by value.
    pub consents: IntCounterVec,
    pub store_seconds: HistogramVec,
    pub buffer_dialogs: IntGauge,
    pub buffer_messages: IntGauge,
    pub buffer_bytes: IntGauge,
    /// Undecided dialogs and their messages discarded by the retention sweeper.
    pub expired_dialogs: IntCounter,
    pub expired_messages: IntCounter,
    /// Removed data that may still be on the store's disk (see `Store::scrub_status`).
    pub store_scrub_pending: IntGauge,
    pub store_scrub_failures: IntCounter,
    /// Subscriptions open on this replica.
    pub live_subscriptions: IntGauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry =
            Registry::new_custom(Some("dataapi".to_owned()), None).expect("a valid metrics prefix");
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("unique metric");
            metric
        };
        let histogram_vec = |name: &str, help: &str, labels: &[&str]| {
            let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
            let metric = HistogramVec::new(opts, labels).expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("unique metric");
            metric
        };
        let gauge = |name: &str, help: &str| {
            let metric = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("unique metric");
            metric
        };
        let counter = |name: &str, help: &str| {
            let metric = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("unique metric");
            metric
        };
        Self {
            operations: counter_vec(
                "graphql_operations_total",
                "GraphQL operations executed, by their root fields",
                &["operation"],
            ),
            operation_seconds: histogram_vec(
                "graphql_operation_duration_seconds",
                "Time to execute a GraphQL operation, by its root fields",
                &["operation"],
            ),
            errors: counter_vec(
                "graphql_errors_total",
                "Errors returned to clients, by extensions.code",
                &["code"],
            ),
            validations: counter_vec(
                "graphql_validations_total",
                "GraphQL operations by validation: full (a new document, or variables not certainly \
                 valid) or prevalidated (a document that passed full validation before)",
                &["validation"],
            ),
            lanes: counter_vec(
                "graphql_lane_operations_total",
                "GraphQL operations by where they ran: main (known light documents) or heavy (new \
                 documents, and those that once cost more than a light one: a thread of low priority)",
                &["lane"],
            ),
            consents: counter_vec("consents_total", "Consent decisions recorded", &["value"]),
            live_subscriptions: gauge(
                "live_subscriptions",
                "GraphQL subscriptions open on this replica",
            ),
            store_seconds: histogram_vec(
                "store_call_duration_seconds",
                "Time of one store call, by call",
                &["call"],
            ),
            buffer_dialogs: gauge("buffer_dialogs", "Undecided dialogs in the buffer"),
            buffer_messages: gauge("buffer_messages", "Messages in the buffer"),
            buffer_bytes: gauge(
                "buffer_bytes",
                "Estimated memory of the buffered messages, in bytes",
            ),
            expired_dialogs: counter(
                "buffer_expired_dialogs_total",
                "Undecided dialogs discarded after BUFFER_TTL",
            ),
            expired_messages: counter(
                "buffer_expired_messages_total",
                "Messages of undecided dialogs discarded after BUFFER_TTL",
            ),
            store_scrub_pending: gauge(
                "store_scrub_pending",
                "1 while removed (withdrawn or erased) data may still be in SQLite's write-ahead log: \
                 truncating it is being retried",
            ),
            store_scrub_failures: counter(
                "store_scrub_failures_total",
                "Attempts to truncate SQLite's write-ahead log after a removal that did not finish",
            ),
            registry,
        }
    }

    /// The metrics in Prometheus' text format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding never fails");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}
