//! dbproxy: the storage tier, the only code that knows SQL. The chat servers
//! call it over HTTP/JSON ([`api`], through [`client::DbClient`]).
//!
//! Modules: [`api`] (the contract), [`client`] (typed client; `coalesce`
//! gathers concurrent appends and DMs into few requests), [`config`],
//! [`error`], `http` (accept loop and router), `backend` (the storage trait),
//! `sqlite` (the SQLite backend), `mysql` (the MySQL/MariaDB backend:
//! primary + replicas, routing, heartbeat, GTID read-your-writes), `writer`
//! (group commit), `schema` (connections and migrations), `auth` (argon2id,
//! tokens), `metrics`. `config.backend` picks `sqlite` or `mysql`.
//!
//! Data path of a write: accept → `http::serve` (one task per connection) →
//! `http::handle` → `Backend` method → `writer` queue → one batch per
//! transaction → SQLite commit (or, for mysql, a transaction on the current
//! primary) → each request answered. Reads skip the writer and run on a pool
//! of read-only connections (mysql: a replica within the lag budget that has
//! reached the request's `min_pos`, else the primary).

pub mod api;
mod auth;
mod backend;
pub mod client;
mod coalesce;
pub mod config;
pub mod error;
mod http;
mod metrics;
mod mysql;
mod schema;
mod sqlite;
mod writer;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use client::DbClient;
pub use config::Config;
pub use error::DbProxyError;

use crate::backend::Backend;

/// Serves the API plus /metrics, /healthz, /readyz on `listener` until
/// `shutdown` is cancelled, then finishes in-flight requests and pending
/// batches within `config.shutdown_grace_secs`. Opens/migrates the database
/// before accepting.
pub async fn run(
    listener: TcpListener,
    config: Config,
    registry: prometheus::Registry,
    shutdown: CancellationToken,
) -> Result<(), DbProxyError> {
    config.validate()?;
    let metrics = Arc::new(metrics::Metrics::register(&registry)?);
    let cfg = config.clone();
    let m = metrics.clone();
    let backend: Arc<dyn Backend> = if config.backend == "mysql" {
        Arc::new(mysql::MysqlBackend::open(&cfg, m, &registry).await?)
    } else {
        // Opening and migrating does blocking file I/O.
        let backend = tokio::task::spawn_blocking(move || sqlite::SqliteBackend::open(&cfg, m))
            .await
            .map_err(|e| DbProxyError::Io(std::io::Error::other(e)))??;
        Arc::new(backend)
    };
    let health = chat_admin::Health::default();
    health.set_ready(true);
    // The password never appears here: only where the servers are.
    let db = if config.backend == "mysql" {
        format!(
            "mysql://{}/{} (replicas: [{}])",
            config.mysql.primary,
            config.mysql.database,
            config.mysql.replicas.join(",")
        )
    } else {
        config.sqlite_path.clone()
    };
    tracing::info!(
        addr = ?listener.local_addr().ok(),
        backend = %config.backend,
        %db,
        "dbproxy ready"
    );
    let shared = Arc::new(http::Shared {
        backend: backend.clone(),
        metrics,
        registry,
        health: health.clone(),
        max_body_bytes: config.max_body_bytes,
    });
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    let serve_shutdown = CancellationToken::new();
    let server = http::serve(
        listener,
        shared,
        config.max_connections,
        serve_shutdown.clone(),
        grace,
    );
    tokio::pin!(server);
    tokio::select! {
        _ = &mut server => {}
        _ = shutdown.cancelled() => {
            health.set_ready(false);
            let started = Instant::now();
            serve_shutdown.cancel();
            server.await;
            // Whatever is still queued is committed before we return.
            let left = grace.saturating_sub(started.elapsed()).max(Duration::from_secs(1));
            if tokio::time::timeout(left, backend.close()).await.is_err() {
                tracing::warn!("writer did not drain within the grace period");
            }
            tracing::info!("dbproxy stopped");
            return Ok(());
        }
    }
    backend.close().await;
    Ok(())
}
