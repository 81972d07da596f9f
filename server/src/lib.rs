//! The chat server: speaks the client line protocol (docs/PROTOCOL.md) and keeps
//! every piece of state that must survive in storage, through dbproxy.
//!
//! accept ([`run`]) → `session::run` (first line: login) → `Session::apply`
//! per command → `Node` (the composition root: `presence` says who is online
//! and present where, `owned` holds the rooms this server orders, `dm` where
//! DMs go, `cluster` the other servers) → `room::Room` (orders a room's
//! messages: batch → dbproxy append → fan-out in seq order) → each
//! recipient's bounded queue (`outbound`) → `outbound::writer` → socket.
//! Direct messages are stored, then handed to the recipient's sessions; the
//! writer reports each DM it wrote to the session, which counts it received
//! as written or once the client acknowledges it (`ACK`); `receipts_loop`
//! marks them received in storage.
//!
//! With `tls` set, `tls::ServerTls::accept` stands between accept and the
//! first line (mutual TLS, the certificate's role decides what the
//! connection may open with), and the links to the other servers are
//! dialed over TLS.

mod batch;
pub mod cluster;
pub mod config;
mod dm;
pub mod error;
mod logs;
pub mod metrics;
mod node;
mod outbound;
mod owned;
mod presence;
mod reply;
mod room;
mod session;
pub mod source;
pub mod tls;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chat_admin::accept::{Accepted, Acceptor};
use chat_admin::tick::Ticker;
use chat_admin::{Health, Readiness};
use chat_storage_client::DbClient;
use chat_storage_client::{BearerToken, ClientOptions, Probe};
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use config::Config;
pub use error::Error;

use cluster::Cluster;
use metrics::Metrics;
use node::Node;

/// The sockets a chat server serves, bound by the caller (port 0 in tests).
pub struct Listeners {
    pub client: TcpListener,
    pub admin: TcpListener,
}

/// How often the dbproxies' `/readyz` is asked, how long one answer may
/// take, and how long without any ready dbproxy makes this server not ready
/// (two probes in a row, so one slow answer does not take it out of the
/// proxies' rings).
const STORAGE_PROBE_EVERY: Duration = Duration::from_secs(1);
const STORAGE_PROBE_TIMEOUT: Duration = Duration::from_secs(1);
const STORAGE_UNREADY_AFTER: Duration = Duration::from_secs(2);

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
    let tasks = TaskTracker::new();
    let grace = config.shutdown_grace();
    let health = Health::default();

    let admin = tasks.spawn(chat_admin::serve(
        listeners.admin,
        registry.clone(),
        health.clone(),
        config.admin_http,
        shutdown.clone(),
        grace,
    ));

    let client_addr = listeners.client.local_addr()?;
    // Client sessions drain first; background work (receipts, token touches,
    // server links) stops after them.
    let background = CancellationToken::new();
    let node = build_node(
        &config,
        &metrics,
        &tasks,
        &shutdown,
        &background,
        client_addr,
    )?;
    let receipts = spawn_background(&node, &background);

    // Ready while some dbproxy is (see `follow_storage`).
    let db = node.db.clone();
    let ready_task = tasks.spawn(follow_storage(db, health.clone(), shutdown.clone()));
    let acceptor = Acceptor::new(listeners.client, config.max_connections);
    tracing::info!(addr = %client_addr, id = %node.cluster.me, "chat server listening");
    let conns = serve_clients(&acceptor, &node, receipts, &shutdown).await;

    // Drain: not ready, no new connections; sessions answer what they read,
    // say BYE shutdown and close. The storage probe has stopped first, so it
    // cannot make the server ready again.
    let _ = ready_task.await;
    health.set(Readiness::Draining);
    drop(acceptor);
    // Peers move this server's rooms away now; messages still in flight here
    // go to the rooms' new owners.
    node.cluster.announce_draining();
    node.cluster.leave_ring();
    tracing::info!("draining");
    conns.close();
    let _ = tokio::time::timeout(grace + Duration::from_secs(2), conns.wait()).await;
    background.cancel();
    tasks.close();
    let _ = tokio::time::timeout(grace, tasks.wait()).await;
    let _ = admin.await;
    drop(node);
    Ok(())
}

/// TLS, the storage client and the cluster, composed into the node. The
/// cluster's links close on `background`.
fn build_node(
    config: &Config,
    metrics: &Metrics,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
    background: &CancellationToken,
    client_addr: std::net::SocketAddr,
) -> Result<Arc<Node>, Error> {
    let tls = match &config.tls {
        Some(identity) => Some(tls::ServerTls::new(
            identity,
            config.tls_allow_plain,
            metrics.tls_refused_total.clone(),
        )?),
        None => None,
    };
    let db = dbproxy_client(config, tls.as_ref().map(|t| &t.connector))?;
    let me = if config.cluster.advertise.is_empty() {
        client_addr.to_string()
    } else {
        config.cluster.advertise.clone()
    };
    let cluster = Cluster::new(
        me,
        config.cluster.clone(),
        metrics.clone(),
        tls.as_ref().map(|t| t.connector.clone()),
        background.clone(),
    );
    Ok(Node::new(
        config.clone(),
        db,
        metrics.clone(),
        tasks.clone(),
        shutdown.clone(),
        cluster,
        tls,
    ))
}

/// Starts the work that outlives the client sessions' drain, on the node's
/// tasks until `background`: certificate reloads, DM receipts, token
/// touches, the cluster's membership. Returns where sessions send receipts.
fn spawn_background(node: &Arc<Node>, background: &CancellationToken) -> mpsc::Sender<i64> {
    let tasks = &node.tasks;
    // The certificates of the client port, the links and the dbproxy
    // client: a rotated Secret is read at the next check.
    if let Some(tls) = &node.tls {
        tasks.spawn(chat_tls::watch(
            tls.reloaders(),
            node.config.reload_interval(),
            background.clone(),
        ));
    }
    let (receipts_tx, receipts_rx) = mpsc::channel(RECEIPT_QUEUE);
    tasks.spawn(receipts_loop(
        node.db.clone(),
        receipts_rx,
        background.clone(),
    ));
    tasks.spawn(touch_loop(node.clone(), background.clone()));
    tasks.spawn(cluster::members::run(
        node.cluster.clone(),
        node.clone(),
        tasks.clone(),
        background.clone(),
    ));
    receipts_tx
}

/// Accepts clients until `shutdown`, one tracked task per connection;
/// returns the tracker, for the drain to wait on.
async fn serve_clients(
    acceptor: &Acceptor,
    node: &Arc<Node>,
    receipts: mpsc::Sender<i64>,
    shutdown: &CancellationToken,
) -> TaskTracker {
    let metrics = &node.metrics;
    let conn_ids = AtomicU64::new(1);
    let conns = TaskTracker::new();
    while let Some(Accepted {
        stream,
        peer,
        permit,
    }) = acceptor.next(shutdown).await
    {
        let id = conn_ids.fetch_add(1, Ordering::Relaxed);
        metrics.connections_total.inc();
        metrics.connections_active.inc();
        // Only what the task needs: it lives as long as the connection.
        let (node, receipts) = (node.clone(), receipts.clone());
        let active = metrics.connections_active.clone();
        let span = tracing::info_span!("conn", id, %peer);
        conns.spawn(
            async move {
                session::run(node, stream, peer, id, receipts).await;
                active.dec();
                drop(permit);
            }
            .instrument(span),
        );
    }
    conns
}

/// The storage client: pooled as configured, over mutual TLS for an
/// `https://` `dbproxy_url` with the server's own connector (the one its
/// links use: one identity, one watched set of files), with the bearer
/// token of `dbproxy_token_file` or `dbproxy_token`.
fn dbproxy_client(
    config: &Config,
    connector: Option<&chat_tls::Connector>,
) -> Result<DbClient, Error> {
    let tls = connector
        .filter(|_| config.dbproxy_url.contains("https://"))
        .cloned();
    let token = if config.dbproxy_token_file.is_empty() {
        BearerToken::fixed(&config.dbproxy_token)
            .map_err(|e| Error::Config(format!("server.dbproxy_token: {e}")))?
    } else {
        BearerToken::file(&config.dbproxy_token_file)
            .map_err(|e| Error::Config(format!("server.dbproxy_token_file: {e}")))?
    };
    let options = ClientOptions {
        pool: config.dbproxy_pool(),
        tls,
        token,
    };
    Ok(DbClient::with_options(&config.dbproxy_url, options))
}

/// Sets readiness from the dbproxies' until `stop`: ready as soon as one
/// answers ready, not ready once none has for [`STORAGE_UNREADY_AFTER`]. A
/// server that cannot store anything should leave the proxies' rings and
/// the Service's endpoints rather than take clients it must refuse.
async fn follow_storage(db: DbClient, health: Health, stop: CancellationToken) {
    let mut tick = Ticker::new(STORAGE_PROBE_EVERY, stop);
    let mut last_ready: Option<tokio::time::Instant> = None;
    while tick.tick().await {
        let Some(probe) = tick.unless_stopped(db.probe(STORAGE_PROBE_TIMEOUT)).await else {
            return;
        };
        let now = tokio::time::Instant::now();
        let state = health.state();
        if probe == Probe::Ready {
            last_ready = Some(now);
            if state != Readiness::Ready {
                tracing::info!("storage ready: serving");
            }
            health.set_ready(true);
        } else if probe == Probe::TokenRefused && state == Readiness::Starting {
            // Never ready yet: say why instead of "starting" (the client
            // logs the refusal itself).
            health.set(Readiness::StorageUnavailable);
        } else if state == Readiness::Ready
            && last_ready.is_none_or(|t| now.duration_since(t) >= STORAGE_UNREADY_AFTER)
        {
            let why = if probe == Probe::TokenRefused {
                "the dbproxy refuses this server's token"
            } else {
                "no dbproxy ready"
            };
            tracing::warn!(
                dbproxies = ?db.bases(),
                "{why} for {STORAGE_UNREADY_AFTER:?}: not ready"
            );
            health.set(Readiness::StorageUnavailable);
        }
    }
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

/// Keeps the tokens of connected users alive (they expire only when unused,
/// after the dbproxy's `token_idle_ttl_secs`).
async fn touch_loop(node: Arc<Node>, stop: CancellationToken) {
    let mut tick = Ticker::new(node.config.token_touch_interval(), stop);
    while tick.tick().await {
        let tokens = node.online_tokens();
        for chunk in tokens.chunks(1000) {
            if let Err(e) = node.db.touch(chunk.to_vec()).await {
                tracing::debug!(error = %e, "touching tokens failed");
            }
        }
    }
}
