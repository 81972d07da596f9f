use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
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
}

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
            rooms_active: IntGauge::new("chat_rooms_active", "Rooms with a live room task")?,
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
        Ok(m)
    }
}
