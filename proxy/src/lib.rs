//! The client-facing proxy tier: reads a client's first line, picks its chat
//! server by consistent hashing and forwards bytes both ways. It never parses
//! past the first line.
//!
//! accept ([`run`]) → `conn::serve` → first line through `LineCodec` (under a
//! timeout) → routing key (user name; a RESUME's token) → `Upstreams::order`
//! ([`ring::Ring`] over the healthy servers, bounded by open connections) →
//! connect (next candidate on failure; mutual TLS with `upstream_tls`) → replay the bytes read → copy both ways
//! until a side closes, the ring moves the user (`RECONNECT moved`) or the
//! proxy drains (`RECONNECT shutdown`).
//!
//! Beside it: `upstreams::health_loop` checks every server's `/readyz` and
//! ejects one after `eject_after_failures` failures in a row (failed connects
//! count too); `upstreams::dns_loop` refreshes the server list from DNS (a
//! Kubernetes headless Service). Each ring change is a new snapshot on a watch
//! channel that every open connection follows.

pub mod config;
mod conn;
pub mod error;
mod metrics;
mod pump;
pub use chat_ring as ring;
mod upstreams;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use chat_admin::accept::{Accepted, Acceptor};
use chat_admin::members::Members;
use chat_admin::{Health, Readiness};
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use config::{Config, ServerAddr};
pub use conn::judge_first;
pub use error::Error;
pub use pump::{read_drained, SpareCapacity};
pub use ring::Ring;

use metrics::Metrics;
use upstreams::Upstreams;

/// The sockets the proxy serves, bound by the caller (port 0 in tests).
pub struct Listeners {
    pub client: TcpListener,
    pub admin: TcpListener,
}

/// Runs the proxy until `shutdown` is cancelled, then drains: stops accepting,
/// tells every open client `RECONNECT shutdown` (they reconnect through
/// another proxy) and returns within `shutdown_grace_secs`.
pub async fn run(
    listeners: Listeners,
    config: Config,
    registry: Registry,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    config.validate()?;
    let upstream_tls = match &config.upstream_tls {
        Some(identity) => Some(chat_tls::Connector::new(identity)?),
        None => None,
    };
    let metrics = Metrics::new(&registry)?;
    let acceptor = Acceptor::new(listeners.client, config.max_connections);
    let addr = acceptor.local_addr()?;
    // Nothing returns early from here on: every task spawned below is
    // tracked and waited for.
    let health = Health::default();
    let tasks = TaskTracker::new();
    tasks.spawn(chat_admin::serve(
        listeners.admin,
        registry,
        health.clone(),
        config.admin_http,
        shutdown.clone(),
        config.shutdown_grace_secs,
    ));
    let background = CancellationToken::new();
    let upstreams = follow_upstreams(&config, &metrics, &upstream_tls, &tasks, &background).await;
    let ctx = Arc::new(conn::Ctx {
        config,
        upstream_tls,
        upstreams,
        metrics,
        shutdown,
    });
    tasks.spawn(follow_ring(
        ctx.upstreams.subscribe(),
        health.clone(),
        background.clone(),
    ));
    tracing::info!(%addr, "chat proxy listening");
    serve(&ctx, acceptor, &health).await;
    background.cancel();
    tasks.close();
    tasks.wait().await;
    Ok(())
}

/// The chat servers, kept current until `stop` by tasks on `tasks`: the
/// membership (DNS), health checks (one round before this returns, so the
/// first clients find a ring) and the TLS files.
async fn follow_upstreams(
    config: &Config,
    metrics: &Metrics,
    upstream_tls: &Option<chat_tls::Connector>,
    tasks: &TaskTracker,
    stop: &CancellationToken,
) -> Arc<Upstreams> {
    let upstreams = Upstreams::new(config, metrics.clone());
    if let Members::Dns(dns) = config.members() {
        if let Some(found) = dns.lookup().await {
            upstreams.set_servers(&upstreams::servers_at(&found, config.dns_admin_port));
        }
        tasks.spawn(upstreams::dns_loop(
            upstreams.clone(),
            dns,
            config.dns_admin_port,
            stop.clone(),
        ));
    }
    let check_timeout = config.health_timeout_ms;
    upstreams::check_all(&upstreams, check_timeout).await;
    tasks.spawn(upstreams::health_loop(
        upstreams.clone(),
        config.health_interval_ms,
        check_timeout,
        stop.clone(),
    ));
    if let Some(connector) = upstream_tls {
        tasks.spawn(chat_tls::watch(
            vec![Arc::new(connector.clone())],
            config.reload_interval_ms,
            stop.clone(),
        ));
    }
    upstreams
}

/// Keeps `/readyz` following the ring until `stop`: ready while there is a
/// chat server to route to (panic routing included), `no chat server`
/// otherwise, so a load balancer sends new clients to a proxy that can
/// place them. Clients that still arrive get `ERR UNAVAILABLE`.
async fn follow_ring(
    mut ring: tokio::sync::watch::Receiver<Arc<upstreams::Snapshot>>,
    health: Health,
    stop: CancellationToken,
) {
    loop {
        let routable = !ring.borrow_and_update().ring.is_empty();
        health.follow(if routable {
            Readiness::Ready
        } else {
            Readiness::NoServer
        });
        tokio::select! {
            changed = ring.changed() => if changed.is_err() { return },
            _ = stop.cancelled() => return,
        }
    }
}

/// Accepts clients until shutdown, then (not ready any more) drains them
/// within the grace period.
async fn serve(ctx: &Arc<conn::Ctx>, acceptor: Acceptor, health: &Health) {
    let conn_ids = AtomicU64::new(1);
    let conns = TaskTracker::new();
    // Cancelled once the grace period is over: ends connections still writing
    // their farewell to a client that does not read.
    let hard_stop = CancellationToken::new();
    while let Some(Accepted {
        stream,
        peer,
        permit,
    }) = acceptor.next(&ctx.shutdown).await
    {
        let id = conn_ids.fetch_add(1, Ordering::Relaxed);
        ctx.metrics.connections_total.inc();
        let (ctx, hard_stop) = (ctx.clone(), hard_stop.clone());
        let span = tracing::info_span!("conn", id, %peer);
        conns.spawn(
            async move {
                tokio::select! {
                    _ = conn::serve(ctx, stream, peer) => {}
                    _ = hard_stop.cancelled() => {}
                }
                drop(permit);
            }
            .instrument(span),
        );
    }
    health.set(chat_admin::Readiness::Draining);
    drop(acceptor);
    tracing::info!("draining");
    conns.close();
    if tokio::time::timeout(ctx.config.shutdown_grace_secs, conns.wait())
        .await
        .is_err()
    {
        hard_stop.cancel();
        conns.wait().await;
    }
}
