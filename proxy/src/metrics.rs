//! The proxy's metrics, registered on the registry passed to [`crate::run`].

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

#[derive(Clone)]
pub(crate) struct Metrics {
    /// Open client connections by chat server (`upstream` = its client address).
    pub connections_active: IntGaugeVec,
    /// Client connections accepted.
    pub connections_total: IntCounter,
    /// 1 while a chat server is in the ring, 0 while ejected.
    pub upstream_healthy: IntGaugeVec,
    /// Times a chat server left the ring after failing.
    pub upstream_ejections_total: IntCounterVec,
    /// Failed connects to a chat server (each one counts toward ejection).
    pub upstream_connect_failures_total: IntCounterVec,
    /// Connections told `RECONNECT moved` because the ring changed under them.
    pub rebalance_moves_total: IntCounter,
    /// Connections closed because their first line was missing or invalid.
    pub first_line_errors_total: IntCounter,
    /// 1 while no chat server is ready and the ring is built over the ones
    /// whose storage is unavailable.
    pub panic_routing: IntGauge,
}

impl Metrics {
    pub fn new(registry: &Registry) -> Result<Metrics, prometheus::Error> {
        let m = Metrics {
            connections_active: IntGaugeVec::new(
                Opts::new("chat_proxy_connections_active", "Open proxied connections"),
                &["upstream"],
            )?,
            connections_total: IntCounter::new(
                "chat_proxy_connections_total",
                "Client connections accepted",
            )?,
            upstream_healthy: IntGaugeVec::new(
                Opts::new(
                    "chat_proxy_upstream_healthy",
                    "1 if the chat server is in the ring",
                ),
                &["upstream"],
            )?,
            upstream_ejections_total: IntCounterVec::new(
                Opts::new(
                    "chat_proxy_upstream_ejections_total",
                    "Chat server ejections from the ring",
                ),
                &["upstream"],
            )?,
            upstream_connect_failures_total: IntCounterVec::new(
                Opts::new(
                    "chat_proxy_upstream_connect_failures_total",
                    "Failed connects to a chat server",
                ),
                &["upstream"],
            )?,
            rebalance_moves_total: IntCounter::new(
                "chat_proxy_rebalance_moves_total",
                "Connections sent RECONNECT moved after a ring change",
            )?,
            first_line_errors_total: IntCounter::new(
                "chat_proxy_first_line_errors_total",
                "Connections closed for a missing or invalid first line",
            )?,
            panic_routing: IntGauge::new(
                "chat_proxy_panic_routing",
                "1 while no chat server is ready and users are routed to servers whose storage is down",
            )?,
        };
        registry.register(Box::new(m.connections_active.clone()))?;
        registry.register(Box::new(m.connections_total.clone()))?;
        registry.register(Box::new(m.upstream_healthy.clone()))?;
        registry.register(Box::new(m.upstream_ejections_total.clone()))?;
        registry.register(Box::new(m.upstream_connect_failures_total.clone()))?;
        registry.register(Box::new(m.rebalance_moves_total.clone()))?;
        registry.register(Box::new(m.first_line_errors_total.clone()))?;
        registry.register(Box::new(m.panic_routing.clone()))?;
        Ok(m)
    }
}
