//! Prometheus metrics, registered on the registry passed to `run`.

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
        let m = Metrics {
            requests: IntCounterVec::new(
                Opts::new(
                    "chat_dbproxy_requests_total",
                    "API requests by path and outcome",
                ),
                &["path", "outcome"],
            )?,
            request_duration: HistogramVec::new(
                HistogramOpts::new(
                    "chat_dbproxy_request_duration_seconds",
                    "API request handling time",
                )
                .buckets(exponential_buckets(0.0001, 2.5, 14)?),
                &["path"],
            )?,
            batch_items: Histogram::with_opts(
                HistogramOpts::new(
                    "chat_dbproxy_batch_items",
                    "Items per committed transaction",
                )
                .buckets(exponential_buckets(1.0, 2.0, 14)?),
            )?,
            commit_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "chat_dbproxy_commit_duration_seconds",
                    "Time to execute and commit one write batch",
                )
                .buckets(exponential_buckets(0.0001, 2.5, 14)?),
            )?,
            write_queue_depth: IntGauge::new(
                "chat_dbproxy_write_queue_depth",
                "Write requests waiting for the writer",
            )?,
            messages_stored: IntCounter::new(
                "chat_dbproxy_messages_stored_total",
                "Room messages and DMs committed (duplicates excluded)",
            )?,
            errors: IntCounterVec::new(
                Opts::new(
                    "chat_dbproxy_errors_total",
                    "Failed API requests by error kind",
                ),
                &["kind"],
            )?,
            login_rate_limited: IntCounterVec::new(
                Opts::new(
                    "chat_dbproxy_login_rate_limited_total",
                    "Logins refused for too many failed logins, by the limit hit (account|source)",
                ),
                &["by"],
            )?,
            password_hashes: IntCounter::new(
                "chat_dbproxy_password_hashes_total",
                "Password hashes computed (argon2id: logins checked, registrations)",
            )?,
            storage_ready: IntGauge::new(
                "chat_dbproxy_storage_ready",
                "1 while the last readiness probe of storage passed (what /readyz answers)",
            )?,
            tls_refused: IntCounterVec::new(
                Opts::new(
                    "chat_dbproxy_tls_refused_total",
                    "API connections refused by TLS, by reason (plain|handshake|role|timeout)",
                ),
                &["reason"],
            )?,
            unauthorized: IntCounterVec::new(
                Opts::new(
                    "chat_dbproxy_unauthorized_total",
                    "API requests answered 401 for their bearer token, by reason (missing|wrong)",
                ),
                &["reason"],
            )?,
        };
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.request_duration.clone()))?;
        registry.register(Box::new(m.batch_items.clone()))?;
        registry.register(Box::new(m.commit_duration.clone()))?;
        registry.register(Box::new(m.write_queue_depth.clone()))?;
        registry.register(Box::new(m.messages_stored.clone()))?;
        registry.register(Box::new(m.errors.clone()))?;
        // Both series exist from the start: a rate over them is 0, not absent.
        for by in ["account", "source"] {
            m.login_rate_limited.with_label_values(&[by]);
        }
        registry.register(Box::new(m.login_rate_limited.clone()))?;
        registry.register(Box::new(m.password_hashes.clone()))?;
        registry.register(Box::new(m.storage_ready.clone()))?;
        for reason in crate::tls::REASONS {
            m.tls_refused.with_label_values(&[reason]);
        }
        registry.register(Box::new(m.tls_refused.clone()))?;
        for reason in ["missing", "wrong"] {
            m.unauthorized.with_label_values(&[reason]);
        }
        registry.register(Box::new(m.unauthorized.clone()))?;
        Ok(m)
    }
}
