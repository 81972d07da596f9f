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
        let m = Metrics {
            connections_total: IntCounter::new(
                "chat_connections_total",
                "Client connections accepted",
            )?,
            connections_active: IntGauge::new(
                "chat_connections_active",
                "Client connections open now",
            )?,
            commands_total: IntCounterVec::new(
                Opts::new("chat_commands_total", "Client commands by keyword"),
                &["command"],
            )?,
            errors_total: IntCounterVec::new(
                Opts::new("chat_errors_total", "ERR replies by code"),
                &["code"],
            )?,
            messages_total: IntCounter::new(
                "chat_messages_total",
                "Room messages acknowledged (stored, not duplicates)",
            )?,
            dms_total: IntCounter::new(
                "chat_dms_total",
                "Direct messages acknowledged (stored, not duplicates)",
            )?,
            deliveries_total: IntCounter::new(
                "chat_deliveries_total",
                "Message lines queued to client sessions",
            )?,
            slow_consumers_total: IntCounter::new(
                "chat_slow_consumer_disconnects_total",
                "Sessions closed because their send queue was full",
            )?,
            ack_latency: Histogram::with_opts(
                HistogramOpts::new(
                    "chat_ack_latency_seconds",
                    "From reading a MSG/DM to queueing its OK (includes the commit)",
                )
                .buckets(prometheus::exponential_buckets(0.0005, 2.0, 14)?),
            )?,
            storage_latency: HistogramVec::new(
                HistogramOpts::new(
                    "chat_storage_request_duration_seconds",
                    "dbproxy requests made by the chat server",
                )
                .buckets(prometheus::exponential_buckets(0.0005, 2.0, 14)?),
                &["op"],
            )?,
            rooms_active: IntGauge::new(
                "chat_rooms_active",
                "Rooms with members present on this server",
            )?,
            rooms_owned: IntGauge::new(
                "chat_rooms_owned",
                "Rooms this server owns (orders and fans out) with members present anywhere",
            )?,
            peers_in_ring: IntGauge::new(
                "chat_cluster_peers",
                "Other chat servers in this server's ring (link up, not draining)",
            )?,
            peer_queue_depth: IntGaugeVec::new(
                Opts::new(
                    "chat_cluster_queue_depth",
                    "Frames queued on the link to each peer",
                ),
                &["peer"],
            )?,
            handshake_failures_total: IntCounterVec::new(
                Opts::new(
                    "chat_cluster_handshake_failures_total",
                    "PEER handshakes refused on the client port, by reason (malformed, auth: wrong secret or not clustered, self: our own id)",
                ),
                &["reason"],
            )?,
            tls_refused_total: IntCounterVec::new(
                Opts::new(
                    "chat_tls_refused_total",
                    "Connections refused on the client port for TLS reasons (tls: handshake failed or timed out; plain_refused: plain TCP on a TLS-only port; role: PEER without a chat-server or PROXY line without a chat-proxy certificate)",
                ),
                &["reason"],
            )?,
            peer_link_drops_total: IntCounterVec::new(
                Opts::new(
                    "chat_cluster_link_drops_total",
                    "Links to a peer that went down (failure, timeout, full queue)",
                ),
                &["peer"],
            )?,
            fanout_latency: Histogram::with_opts(
                HistogramOpts::new(
                    "chat_fanout_latency_seconds",
                    "From a room owner's commit to its lines being queued locally or written to a peer",
                )
                .buckets(prometheus::exponential_buckets(0.0001, 2.0, 16)?),
            )?,
        };
        registry.register(Box::new(m.connections_total.clone()))?;
        registry.register(Box::new(m.connections_active.clone()))?;
        registry.register(Box::new(m.commands_total.clone()))?;
        registry.register(Box::new(m.errors_total.clone()))?;
        registry.register(Box::new(m.messages_total.clone()))?;
        registry.register(Box::new(m.dms_total.clone()))?;
        registry.register(Box::new(m.deliveries_total.clone()))?;
        registry.register(Box::new(m.slow_consumers_total.clone()))?;
        registry.register(Box::new(m.ack_latency.clone()))?;
        registry.register(Box::new(m.storage_latency.clone()))?;
        registry.register(Box::new(m.rooms_active.clone()))?;
        registry.register(Box::new(m.rooms_owned.clone()))?;
        registry.register(Box::new(m.peers_in_ring.clone()))?;
        registry.register(Box::new(m.peer_queue_depth.clone()))?;
        registry.register(Box::new(m.peer_link_drops_total.clone()))?;
        // Every series exists from the start, so alerts see 0 before the first failure.
        for reason in HANDSHAKE_FAILURES {
            m.handshake_failures_total.with_label_values(&[reason]);
        }
        registry.register(Box::new(m.handshake_failures_total.clone()))?;
        for reason in crate::tls::Refusal::ALL {
            m.tls_refused_total.with_label_values(&[reason.as_str()]);
        }
        registry.register(Box::new(m.tls_refused_total.clone()))?;
        registry.register(Box::new(m.fanout_latency.clone()))?;
        Ok(m)
    }
}
