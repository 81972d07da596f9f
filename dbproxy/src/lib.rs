//! dbproxy: the storage tier, the only code that knows SQL. The chat servers
//! call it over HTTP/JSON: the contract is `chat_storage_api`, their client
//! `chat_storage_client::DbClient`; this crate is the serving side only.
//!
//! Modules: [`config`], [`error`], `http` (the router, served by
//! `chat_admin::http::serve`), `backend` (the storage trait), `front` (every
//! request's checks: `validate`, the protocol's rules for what is stored,
//! and `limiter`, the failed-login limits), `identity` (the login,
//! guest-name and resume rules both backends follow), `sqlite` (the SQLite
//! backend), `mysql` (the MySQL/MariaDB backend: primary + replicas,
//! routing, heartbeat, GTID read-your-writes), `writer` (group commit),
//! `schema` (connections and migrations), `auth` (argon2id, tokens),
//! `credential` (the bearer tokens callers must present, re-read from their
//! file), `tls` (mutual TLS on the API listener, chat servers only),
//! `hashing` (the argon2 threads), `fuzzing` (the harness of the
//! `dbproxy_request` fuzz target), `metrics`. `config.backend` picks
//! `sqlite` or `mysql`. `/readyz` follows a probe of the backend every
//! second.
//!
//! Data path of a write: accept → `http::serve` (`chat_admin::http::serve`:
//! one task per connection, time and connection bounds; the TLS handshake
//! and the caller's role in `tls`) → `http::handle` (bearer token) →
//! `front::Checked` → `Backend` method → `writer` queue → one batch per
//! transaction → SQLite commit (or, for mysql, a transaction on the current
//! primary) → each request answered. Reads skip the writer and run on a pool
//! of read-only connections (mysql: a replica within the lag budget that has
//! reached the request's `min_pos`, else the primary).

mod auth;
mod backend;
pub mod config;
mod credential;
pub mod error;
mod front;
#[doc(hidden)]
pub mod fuzzing;
mod hashing;
mod http;
mod identity;
mod limiter;
mod metrics;
mod mysql;
mod schema;
mod sqlite;
mod tls;
mod validate;
mod writer;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

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
    let acceptor = config
        .tls
        .as_ref()
        .map(chat_tls::Acceptor::new)
        .transpose()?;
    let backend = open_backend(&config, metrics.clone(), &registry).await?;
    let reloads = Reloads::start(&config, &tokens, acceptor.as_ref());
    let tls = acceptor.map(|a| tls::ApiTls::new(a, metrics.tls_refused.clone()));
    let health = chat_admin::Health::default();
    let probe = StorageProbe::start(&backend, &health, &metrics);
    log_serving(&listeners, &config, tls.is_some(), tokens.required());
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
    let api_http = config.api_http();
    let server = http::serve(
        listeners.api,
        shared,
        api_http,
        tls,
        serve_shutdown.clone(),
        grace,
    );
    tokio::pin!(server);
    tokio::select! {
        _ = &mut server => {}
        _ = shutdown.cancelled() => {
            // The probe must not turn readiness back on while we drain.
            probe.stop().await;
            health.set(Readiness::Draining);
            let started = Instant::now();
            serve_shutdown.cancel();
            server.await;
            // Whatever is still queued is committed before we return.
            let left = grace.saturating_sub(started.elapsed()).max(Duration::from_secs(1));
            if tokio::time::timeout(left, backend.close()).await.is_err() {
                tracing::warn!("writer did not drain within the grace period");
            }
            let _ = admin.await;
            reloads.stop().await;
            tracing::info!("dbproxy stopped");
            return Ok(());
        }
    }
    probe.stop().await;
    serve_shutdown.cancel();
    let _ = admin.await;
    reloads.stop().await;
    backend.close().await;
    Ok(())
}

/// The tokens the API accepts (a warning when it accepts anyone).
fn load_tokens(config: &Config) -> Result<Arc<credential::Tokens>, DbProxyError> {
    let tokens = Arc::new(credential::Tokens::load(config)?);
    if !tokens.required() {
        tracing::warn!(
            "no api_tokens or api_tokens_file: the API serves whoever reaches it (set a token)"
        );
    }
    Ok(tokens)
}

/// The task that keeps `/readyz` following storage ([`follow_storage`]).
struct StorageProbe {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl StorageProbe {
    fn start(
        backend: &Arc<dyn Backend>,
        health: &chat_admin::Health,
        metrics: &Arc<Metrics>,
    ) -> StorageProbe {
        let stop = CancellationToken::new();
        let task = tokio::spawn(follow_storage(
            backend.clone(),
            (health.clone(), metrics.clone()),
            stop.clone(),
        ));
        StorageProbe { stop, task }
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// The tasks that re-read certificates and the token file while serving;
/// they stop last, once the API has drained.
struct Reloads {
    stop: CancellationToken,
    tasks: tokio_util::task::TaskTracker,
}

impl Reloads {
    fn start(
        config: &Config,
        tokens: &Arc<credential::Tokens>,
        tls: Option<&chat_tls::Acceptor>,
    ) -> Reloads {
        let stop = CancellationToken::new();
        let every = config.reload_interval_ms;
        let tasks = tokio_util::task::TaskTracker::new();
        tasks.spawn(credential::watch(tokens.clone(), every, stop.clone()));
        if let Some(acceptor) = tls {
            tasks.spawn(chat_tls::watch(
                vec![Arc::new(acceptor.clone())],
                every,
                stop.clone(),
            ));
        }
        tasks.close();
        Reloads { stop, tasks }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.tasks.wait().await;
    }
}

/// One line saying what is served from what (never the password: only
/// where the servers are).
fn log_serving(listeners: &Listeners, config: &Config, tls: bool, tokens: bool) {
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
