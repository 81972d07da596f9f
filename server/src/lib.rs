//! The chat server: speaks the client line protocol (docs/PROTOCOL.md) and keeps
//! every piece of state that must survive in storage, through dbproxy.
//!
//! accept ([`run`]) → `session::run` (first line: login) → `Session::apply`
//! per command → `Hub` (who is online, which rooms they are in) → `Room`
//! (orders a room's messages: batch → dbproxy append → fan-out in seq order)
//! → each recipient's bounded queue → `outbound::write_loop` → socket.
//! Direct messages are stored, then handed to the recipient's sessions; the
//! writer reports each DM it wrote to the session, which counts it received
//! as written or once the client acknowledges it (`ACK`); `receipts` marks
//! them received in storage.

pub mod cluster;
pub mod config;
pub mod error;
mod hub;
pub mod metrics;
mod outbound;
mod room;
mod session;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chat_admin::accept::{Accepted, Acceptor};
use chat_admin::Health;
use chat_dbproxy::DbClient;
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use config::Config;
pub use error::Error;

use cluster::Cluster;
use hub::Hub;
use metrics::Metrics;

/// The sockets a chat server serves, bound by the caller (port 0 in tests).
pub struct Listeners {
    pub client: TcpListener,
    pub admin: TcpListener,
}

/// Receipts waiting to be written; when full, a DM simply stays pending and is
/// delivered again at the next login (delivery is at-least-once).
const RECEIPT_QUEUE: usize = 16_384;
const RECEIPT_BATCH: usize = 1000;

/// Runs the chat server until `shutdown` is cancelled, then drains: stops
/// accepting, answers in-flight messages, says `BYE shutdown` to every client
/// and returns within `shutdown_grace_secs` (plus the farewell timeouts).
pub async fn run(
    listeners: Listeners,
    config: Config,
    registry: Registry,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    config.validate()?;
    let metrics = Metrics::new(&registry)?;
    let db = DbClient::new(&config.dbproxy_url);
    let tasks = TaskTracker::new();
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    let health = Health::default();

    let admin = tokio::spawn(chat_admin::serve(
        listeners.admin,
        registry.clone(),
        health.clone(),
        shutdown.clone(),
        grace,
    ));

    let client_addr = listeners.client.local_addr()?;
    let me = if config.cluster.advertise.is_empty() {
        client_addr.to_string()
    } else {
        config.cluster.advertise.clone()
    };

    // Client sessions drain first; background work (receipts, token touches,
    // server links) stops after them.
    let background = CancellationToken::new();
    let cluster = Cluster::new(
        me,
        config.cluster.clone(),
        metrics.clone(),
        background.clone(),
    );
    let hub = Hub::new(
        config.clone(),
        db.clone(),
        metrics.clone(),
        tasks.clone(),
        shutdown.clone(),
        cluster.clone(),
    );
    let (receipts_tx, receipts_rx) = mpsc::channel(RECEIPT_QUEUE);
    tasks.spawn(receipts_loop(db.clone(), receipts_rx, background.clone()));
    tasks.spawn(touch_loop(hub.clone(), background.clone()));
    tasks.spawn(cluster::run(hub.clone(), background.clone()));

    health.set_ready(true);
    let acceptor = Acceptor::new(listeners.client, config.max_connections);
    tracing::info!(addr = %client_addr, id = %cluster.me, "chat server listening");
    let conn_ids = AtomicU64::new(1);
    let conns = TaskTracker::new();
    while let Some(Accepted {
        stream,
        peer,
        permit,
    }) = acceptor.next(&shutdown).await
    {
        let id = conn_ids.fetch_add(1, Ordering::Relaxed);
        metrics.connections_total.inc();
        metrics.connections_active.inc();
        // Only what the task needs: it lives as long as the connection.
        let (hub, receipts) = (hub.clone(), receipts_tx.clone());
        let active = metrics.connections_active.clone();
        let span = tracing::info_span!("conn", id, %peer);
        conns.spawn(
            async move {
                session::run(hub, stream, peer, id, receipts).await;
                active.dec();
                drop(permit);
            }
            .instrument(span),
        );
    }

    // Drain: not ready, no new connections; sessions answer what they read,
    // say BYE shutdown and close.
    health.set_ready(false);
    drop(acceptor);
    // Peers move this server's rooms away now; messages still in flight here
    // go to the rooms' new owners.
    cluster.announce_draining();
    cluster.leave_ring();
    tracing::info!("draining");
    conns.close();
    let _ = tokio::time::timeout(grace + Duration::from_secs(2), conns.wait()).await;
    background.cancel();
    tasks.close();
    let _ = tokio::time::timeout(grace, tasks.wait()).await;
    let _ = admin.await;
    drop(hub);
    Ok(())
}

/// Marks delivered DMs as received, many per request.
async fn receipts_loop(db: DbClient, mut rx: mpsc::Receiver<i64>, stop: CancellationToken) {
    let mut ids = Vec::with_capacity(RECEIPT_BATCH);
    loop {
        let n = tokio::select! {
            n = rx.recv_many(&mut ids, RECEIPT_BATCH) => n,
            _ = stop.cancelled() => {
                while ids.len() < RECEIPT_BATCH {
                    match rx.try_recv() {
                        Ok(id) => ids.push(id),
                        Err(_) => break,
                    }
                }
                if !ids.is_empty() {
                    let _ = db.mark_received(std::mem::take(&mut ids)).await;
                }
                return;
            }
        };
        if n == 0 {
            return;
        }
        if let Err(e) = db.mark_received(std::mem::take(&mut ids)).await {
            // The DMs stay pending and are delivered again at the next login.
            tracing::warn!(error = %e, "marking DMs received failed");
        }
    }
}

/// Keeps the tokens of connected users alive (they expire only when unused).
async fn touch_loop(hub: Arc<Hub>, stop: CancellationToken) {
    let ttl = hub.config.token_idle_ttl_secs;
    let every = Duration::from_secs((ttl / 3).clamp(1, 60));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let tokens = hub.online_tokens();
        for chunk in tokens.chunks(1000) {
            if let Err(e) = hub.db.touch(chunk.to_vec()).await {
                tracing::debug!(error = %e, "touching tokens failed");
            }
        }
    }
}
