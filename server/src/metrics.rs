use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// Chat server metrics, registered on the registry the caller passes in.
#[derive(Clone)]
pub struct Metrics {
    pub connections_total: IntCounter,
    pub connections_active: IntGauge,
    pub commands_total: IntCounterVec,
    pub errors_total: IntCounterVec,
    pub messages_total: IntCounter,
    pub dms_total: IntCounter,
    pub deliveries_total: IntCounter,
    pub slow_consumers_total: IntCounter,
    pub ack_latency: Histogram,
    pub storage_latency: HistogramVec,
    pub rooms_active: IntGauge,
    pub rooms_owned: IntGauge,
    pub peers_in_ring: IntGauge,
    pub peer_queue_depth: IntGaugeVec,
    pub peer_link_drops_total: IntCounterVec,
    pub handshake_failures_total: IntCounterVec,
    pub tls_refused_total: IntCounterVec,
    pub fanout_latency: Histogram,
}

/// The `reason` label values of `chat_cluster_handshake_failures_total`.
pub const HANDSHAKE_FAILURES: [&str; 3] = ["malformed", "auth", "self"];

impl Metrics {
    pub fn new(registry: &Registry) -> Result<Metrics, prometheus::Error> {
        let r = Registering(registry);
        let latency = prometheus::exponential_buckets(0.0005, 2.0, 14)?;
        let m = Metrics {
            connections_total: r.counter("chat_connections_total", "Client connections accepted")?,
            connections_active: r.gauge("chat_connections_active", "Client connections open now")?,
            commands_total: r.counters("chat_commands_total", "Client commands by keyword", "command")?,
            errors_total: r.counters("chat_errors_total", "ERR replies by code", "code")?,
            messages_total: r.counter(
                "chat_messages_total",
                "Room messages acknowledged (stored, not duplicates)",
            )?,
            dms_total: r.counter(
                "chat_dms_total",
                "Direct messages acknowledged (stored, not duplicates)",
            )?,
            deliveries_total: r.counter(
                "chat_deliveries_total",
                "Message lines queued to client sessions",
            )?,
            slow_consumers_total: r.counter(
                "chat_slow_consumer_disconnects_total",
                "Sessions closed because their send queue was full",
            )?,
            ack_latency: r.histogram(
                "chat_ack_latency_seconds",
                "From reading a MSG/DM to queueing its OK (includes the commit)",
                latency.clone(),
            )?,
            storage_latency: r.register(HistogramVec::new(
                HistogramOpts::new(
                    "chat_storage_request_duration_seconds",
                    "dbproxy requests made by the chat server",
                )
                .buckets(latency),
                &["op"],
            )?)?,
            rooms_active: r.gauge("chat_rooms_active", "Rooms with members present on this server")?,
            rooms_owned: r.gauge(
                "chat_rooms_owned",
                "Rooms this server owns (orders and fans out) with members present anywhere",
            )?,
            peers_in_ring: r.gauge(
                "chat_cluster_peers",
                "Other chat servers in this server's ring (link up, not draining)",
            )?,
            peer_queue_depth: r.register(IntGaugeVec::new(
                Opts::new("chat_cluster_queue_depth", "Frames queued on the link to each peer"),
                &["peer"],
            )?)?,
            peer_link_drops_total: r.counters(
                "chat_cluster_link_drops_total",
                "Links to a peer that went down (failure, timeout, full queue)",
                "peer",
            )?,
            handshake_failures_total: r.counters(
                "chat_cluster_handshake_failures_total",
                "PEER handshakes refused on the client port, by reason (malformed, auth: wrong secret or not clustered, self: our own id)",
                "reason",
            )?,
            tls_refused_total: r.counters(
                "chat_tls_refused_total",
                "Connections refused on the client port for TLS reasons (tls: handshake failed or timed out; plain_refused: plain TCP on a TLS-only port; role: PEER without a chat-server or PROXY line without a chat-proxy certificate)",
                "reason",
            )?,
            fanout_latency: r.histogram(
                "chat_fanout_latency_seconds",
                "From a room owner's commit to its lines being queued locally or written to a peer",
                prometheus::exponential_buckets(0.0001, 2.0, 16)?,
            )?,
        };
        // Every series exists from the start, so alerts see 0 before the first failure.
        for reason in HANDSHAKE_FAILURES {
            m.handshake_failures_total.with_label_values(&[reason]);
        }
        for reason in crate::tls::Refusal::ALL {
            m.tls_refused_total.with_label_values(&[reason.as_str()]);
        }
        Ok(m)
    }
}

/// Makes each metric and registers it in one step.
struct Registering<'a>(&'a Registry);

impl Registering<'_> {
    fn register<C: prometheus::core::Collector + Clone + 'static>(
        &self,
        c: C,
    ) -> Result<C, prometheus::Error> {
        self.0.register(Box::new(c.clone()))?;
        Ok(c)
    }

    fn counter(&self, name: &str, help: &str) -> Result<IntCounter, prometheus::Error> {
        self.register(IntCounter::new(name, help)?)
    }

    fn gauge(&self, name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
        self.register(IntGauge::new(name, help)?)
    }

    fn counters(
        &self,
        name: &str,
        help: &str,
        label: &str,
    ) -> Result<IntCounterVec, prometheus::Error> {
        self.register(IntCounterVec::new(Opts::new(name, help), &[label])?)
    }

    fn histogram(
        &self,
        name: &str,
        help: &str,
        buckets: Vec<f64>,
    ) -> Result<Histogram, prometheus::Error> {
        let opts = HistogramOpts::new(name, help).buckets(buckets);
        self.register(Histogram::with_opts(opts)?)
    }
}
