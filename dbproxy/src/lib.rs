//! dbproxy: the storage tier, the only code that knows SQL. The chat servers
//! call it over HTTP/JSON ([`api`], through [`client::DbClient`]).
//!
//! Modules: [`api`] (the contract), [`client`] (typed client; `coalesce`
//! gathers concurrent appends and DMs into few requests), [`config`],
//! [`error`], `http` (accept loop and router), `backend` (the storage trait),
//! `sqlite` (the SQLite backend), `mysql` (the MySQL/MariaDB backend:
//! primary + replicas, routing, heartbeat, GTID read-your-writes), `writer`
//! (group commit), `schema` (connections and migrations), `auth` (argon2id,
//! tokens), `credential` (the bearer tokens callers must present, re-read
//! from their file), `tls` (mutual TLS on the API listener, chat servers
//! only), `hashing` (the argon2 threads), `fuzzing` (the harness of the `dbproxy_request` fuzz target), `front` (every request's checks:
//! `validate`, the protocol's rules for what is stored, and `limiter`, the
//! failed-login limits), `metrics`. `config.backend` picks `sqlite` or
//! `mysql`. `/readyz` follows a probe of the backend every second.
//!
//! Data path of a write: accept → `http::serve` (`chat_admin::http::serve`:
//! one task per connection, time and connection bounds; the TLS handshake
//! and the caller's role in `tls`) → `http::handle` (bearer token) → `front::Checked` → `Backend` method → `writer` queue → one batch per
//! transaction → SQLite commit (or, for mysql, a transaction on the current
//! primary) → each request answered. Reads skip the writer and run on a pool
//! of read-only connections (mysql: a replica within the lag budget that has
//! reached the request's `min_pos`, else the primary).

pub mod api;
mod auth;
mod backend;
mod bearer;
pub mod client;
mod coalesce;
pub mod config;
mod credential;
pub mod error;
mod front;
#[doc(hidden)]
pub mod fuzzing;
mod hashing;
mod http;
mod limiter;
mod metrics;
mod mysql;
mod pool;
mod schema;
mod sqlite;
mod tls;
mod validate;
mod writer;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use client::DbClient;
pub use config::{Config, StorageKind};
pub use error::DbProxyError;

use crate::backend::Backend;
use crate::limiter::{Limits, LoginLimiter};
use crate::metrics::Metrics;
use chat_admin::Readiness;

/// How often storage is probed for `/readyz`, and how long a probe may take
/// before it counts as failed.
const READY_PROBE_EVERY: Duration = Duration::from_secs(1);
const READY_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The sockets the dbproxy serves, bound by the caller (port 0 in tests).
pub struct Listeners {
    /// The API (plus `/readyz`, `/healthz`): the chat servers' port.
    pub api: TcpListener,
    /// `/metrics`, `/healthz`, `/readyz`: Prometheus' and the kubelet's port.
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds both (tests bind `127.0.0.1:0` twice).
    pub async fn bind(api: &str, admin: &str) -> std::io::Result<Listeners> {
        Ok(Listeners {
            api: TcpListener::bind(api).await?,
            admin: TcpListener::bind(admin).await?,
        })
    }
}

/// Serves the API on `listeners.api` and /metrics, /healthz, /readyz on
/// `listeners.admin` until `shutdown` is cancelled, then finishes in-flight
/// requests and pending batches within `config.shutdown_grace_secs`.
/// Opens/migrates the database before accepting.
pub async fn run(
    listeners: Listeners,
    config: Config,
    registry: prometheus::Registry,
    shutdown: CancellationToken,
) -> Result<(), DbProxyError> {
    config.validate()?;
    let metrics = Arc::new(metrics::Metrics::register(&registry)?);
    let tokens = load_tokens(&config)?;
    let acceptor = config.tls.as_ref().map(chat_tls::Acceptor::new);
    let acceptor = acceptor.transpose()?;
    let backend = open_backend(&config, metrics.clone(), &registry).await?;
    // Certificates and the token file are re-read while serving; these
    // tasks stop last, once the API has drained.
    let reloads = Reloads::start(&config, &tokens, acceptor.as_ref());
    let tls = acceptor.map(|a| tls::ApiTls::new(a, metrics.tls_refused.clone()));
    let health = chat_admin::Health::default();
    let probe_stop = CancellationToken::new();
    let probe = tokio::spawn(follow_storage(
        backend.clone(),
        (health.clone(), metrics.clone()),
        probe_stop.clone(),
    ));
    log_serving(&config, &listeners, tls.is_some(), tokens.required());
    let shared = Arc::new(http::Shared {
        backend: backend.clone(),
        metrics,
        health: health.clone(),
        max_body_bytes: config.max_body_bytes,
        tokens,
        unauthorized_log: Default::default(),
    });
    let grace = config.shutdown_grace_secs;
    let serve_shutdown = CancellationToken::new();
    // The admin port answers until the API has drained, so a probe sees
    // `draining` rather than a refused connection.
    let admin = tokio::spawn(chat_admin::serve(
        listeners.admin,
        registry,
        health.clone(),
        config.admin_http,
        serve_shutdown.clone(),
        grace,
    ));
    let server = http::serve(
        listeners.api,
        shared,
        config.api_http(),
        tls,
        serve_shutdown.clone(),
        grace,
    );
    tokio::pin!(server);
    let draining = tokio::select! {
        _ = &mut server => false,
        _ = shutdown.cancelled() => true,
    };
    // The probe must not turn readiness back on while we drain.
    probe_stop.cancel();
    let _ = probe.await;
    if draining {
        health.set(Readiness::Draining);
    }
    let started = Instant::now();
    serve_shutdown.cancel();
    if draining {
        server.await;
        // Whatever is still queued is committed before we return.
        let left = grace
            .saturating_sub(started.elapsed())
            .max(Duration::from_secs(1));
        if tokio::time::timeout(left, backend.close()).await.is_err() {
            tracing::warn!("writer did not drain within the grace period");
        }
    }
    let _ = admin.await;
    reloads.stop().await;
    if draining {
        tracing::info!("dbproxy stopped");
    } else {
        backend.close().await;
    }
    Ok(())
}

/// The accepted API tokens (a WARN when there are none).
fn load_tokens(config: &Config) -> Result<Arc<credential::Tokens>, DbProxyError> {
    let tokens = Arc::new(credential::Tokens::load(config)?);
    if !tokens.required() {
        tracing::warn!(
            "no api_tokens or api_tokens_file: the API serves whoever reaches it (set a token)"
        );
    }
    Ok(tokens)
}

/// The tasks that re-read the token file and the TLS files.
struct Reloads {
    tasks: tokio_util::task::TaskTracker,
    stop: CancellationToken,
}

impl Reloads {
    fn start(
        config: &Config,
        tokens: &Arc<credential::Tokens>,
        acceptor: Option<&chat_tls::Acceptor>,
    ) -> Reloads {
        let stop = CancellationToken::new();
        let tasks = tokio_util::task::TaskTracker::new();
        let every = config.reload_interval_ms;
        tasks.spawn(credential::watch(tokens.clone(), every, stop.clone()));
        if let Some(acceptor) = acceptor {
            tasks.spawn(chat_tls::watch(
                vec![Arc::new(acceptor.clone())],
                every,
                stop.clone(),
            ));
        }
        tasks.close();
        Reloads { tasks, stop }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.tasks.wait().await;
    }
}

/// One line saying what is served where; the password never appears in
/// it, only where the servers are.
fn log_serving(config: &Config, listeners: &Listeners, tls: bool, tokens: bool) {
    let db = if config.backend == StorageKind::Mysql {
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
        addr = ?listeners.api.local_addr().ok(),
        admin = ?listeners.admin.local_addr().ok(),
        backend = %config.backend,
        %db,
        tls,
        tokens,
        "dbproxy serving"
    );
}

/// The configured backend behind the checks of [`front::Checked`].
async fn open_backend(
    config: &Config,
    metrics: Arc<Metrics>,
    registry: &prometheus::Registry,
) -> Result<Arc<dyn Backend>, DbProxyError> {
    let hashing = Arc::new(hashing::HashPool::start(
        config.hashing_threads(),
        config.hash_queue,
        metrics.password_hashes.clone(),
    )?);
    let inner: Arc<dyn Backend> = if config.backend == StorageKind::Mysql {
        Arc::new(mysql::MysqlBackend::open(config, metrics.clone(), registry, hashing).await?)
    } else {
        // Opening and migrating does blocking file I/O.
        let (cfg, m) = (config.clone(), metrics.clone());
        let backend =
            tokio::task::spawn_blocking(move || sqlite::SqliteBackend::open(&cfg, m, hashing))
                .await
                .map_err(|e| DbProxyError::Io(std::io::Error::other(e)))??;
        Arc::new(backend)
    };
    let limiter = LoginLimiter::new(
        Limits {
            window: config.login_failure_window_secs,
            per_account: config.login_failures_per_account,
            per_source: config.login_failures_per_source,
            capacity: config.login_limiter_entries,
        },
        metrics.login_rate_limited.clone(),
    );
    Ok(Arc::new(front::Checked::new(
        inner,
        config.max_text_bytes,
        limiter,
    )))
}

/// Sets readiness from a probe of storage every [`READY_PROBE_EVERY`] until
/// `stop`: ready while the backend can serve reads and writes.
async fn follow_storage(
    backend: Arc<dyn Backend>,
    (health, metrics): (chat_admin::Health, Arc<Metrics>),
    stop: CancellationToken,
) {
    let mut tick = chat_admin::tick::Ticker::new(READY_PROBE_EVERY, stop);
    let mut was: Option<bool> = None;
    while tick.tick().await {
        let probe = tokio::time::timeout(READY_PROBE_TIMEOUT, backend.ready());
        let Some(probe) = tick.unless_stopped(probe).await else {
            return;
        };
        let result = probe.unwrap_or_else(|_| {
            Err(error::unavailable(format!(
                "storage probe took longer than {READY_PROBE_TIMEOUT:?}"
            )))
        });
        let ok = result.is_ok();
        match (&result, was) {
            (Err(e), Some(true) | None) => {
                tracing::warn!(error = %e.message, "storage not ready")
            }
            (Ok(()), Some(false)) => tracing::info!("storage ready again"),
            _ => {}
        }
        was = Some(ok);
        metrics.storage_ready.set(i64::from(ok));
        health.set(if ok {
            Readiness::Ready
        } else {
            Readiness::StorageUnavailable
        });
    }
}
