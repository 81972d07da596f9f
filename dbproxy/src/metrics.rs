//! Prometheus metrics, registered on the registry passed to `run`.

use prometheus::core::Collector;
use prometheus::{
    exponential_buckets, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, Opts, Registry,
};

pub(crate) struct Metrics {
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub batch_items: Histogram,
    pub commit_duration: Histogram,
    pub write_queue_depth: IntGauge,
    pub messages_stored: IntCounter,
    pub errors: IntCounterVec,
    pub login_rate_limited: IntCounterVec,
    pub password_hashes: IntCounter,
    pub storage_ready: IntGauge,
    pub tls_refused: IntCounterVec,
    pub unauthorized: IntCounterVec,
}

impl Metrics {
    pub fn register(registry: &Registry) -> Result<Metrics, prometheus::Error> {
        let r = registry;
        let latency = || exponential_buckets(0.0001, 2.5, 14);
        Ok(Metrics {
            requests: counters(
                r,
                "chat_dbproxy_requests_total",
                "API requests by path and outcome",
                &["path", "outcome"],
                &[],
            )?,
            request_duration: registered(r, {
                let opts = HistogramOpts::new(
                    "chat_dbproxy_request_duration_seconds",
                    "API request handling time",
                );
                HistogramVec::new(opts.buckets(latency()?), &["path"])?
            })?,
            batch_items: histogram(
                r,
                "chat_dbproxy_batch_items",
                "Items per committed transaction",
                exponential_buckets(1.0, 2.0, 14)?,
            )?,
            commit_duration: histogram(
                r,
                "chat_dbproxy_commit_duration_seconds",
                "Time to execute and commit one write batch",
                latency()?,
            )?,
            write_queue_depth: gauge(
                r,
                "chat_dbproxy_write_queue_depth",
                "Write requests waiting for the writer",
            )?,
            messages_stored: counter(
                r,
                "chat_dbproxy_messages_stored_total",
                "Room messages and DMs committed (duplicates excluded)",
            )?,
            errors: counters(
                r,
                "chat_dbproxy_errors_total",
                "Failed API requests by error kind",
                &["kind"],
                &[],
            )?,
            login_rate_limited: counters(
                r,
                "chat_dbproxy_login_rate_limited_total",
                "Logins refused for too many failed logins, by the limit hit (account|source)",
                &["by"],
                &["account", "source"],
            )?,
            password_hashes: counter(
                r,
                "chat_dbproxy_password_hashes_total",
                "Password hashes computed (argon2id: logins checked, registrations)",
            )?,
            storage_ready: gauge(
                r,
                "chat_dbproxy_storage_ready",
                "1 while the last readiness probe of storage passed (what /readyz answers)",
            )?,
            tls_refused: counters(
                r,
                "chat_dbproxy_tls_refused_total",
                "API connections refused by TLS, by reason (plain|handshake|role|timeout)",
                &["reason"],
                &crate::tls::REASONS,
            )?,
            unauthorized: counters(
                r,
                "chat_dbproxy_unauthorized_total",
                "API requests answered 401 for their bearer token, by reason (missing|wrong)",
                &["reason"],
                &["missing", "wrong"],
            )?,
        })
    }
}

fn registered<C: Collector + Clone + 'static>(
    registry: &Registry,
    c: C,
) -> Result<C, prometheus::Error> {
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn counter(registry: &Registry, name: &str, help: &str) -> Result<IntCounter, prometheus::Error> {
    registered(registry, IntCounter::new(name, help)?)
}

fn gauge(registry: &Registry, name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
    registered(registry, IntGauge::new(name, help)?)
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    buckets: Vec<f64>,
) -> Result<Histogram, prometheus::Error> {
    registered(
        registry,
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?,
    )
}

/// A counter per label value; the series of `single_label_values` exist
/// from the start, so a rate over them is 0, not absent.
fn counters(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    single_label_values: &[&str],
) -> Result<IntCounterVec, prometheus::Error> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    for value in single_label_values {
        c.with_label_values(&[value]);
    }
    registered(registry, c)
}
