//! Which server is primary, which replicas may serve reads, and the pooled
//! connections to each. One health task probes every server each
//! `health_interval_ms`: `@@read_only` (the one with `read_only = 0` is the
//! primary, so a promotion is followed without configuration), the heartbeat
//! row (written on the primary by the same task, read everywhere for lag) and
//! the pool size.

use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder, Pool, PoolConstraints, PoolOpts};
use prometheus::{
    exponential_buckets, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry,
};
use tokio_util::sync::CancellationToken;

use super::config::{MysqlConfig, Password};
use super::db_err;
use crate::error::unavailable;
use crate::writer::now_ms;
use chat_storage_api::ApiError;

const NONE: usize = usize::MAX;

/// Metrics of the MySQL backend, on the registry passed to `run`.
pub(crate) struct MysqlMetrics {
    pub pool_connections: IntGaugeVec,
    pub query_duration: HistogramVec,
    pub replica_lag: GaugeVec,
    pub causal_fallbacks: IntCounter,
    pub route: IntCounterVec,
    pub primary_known: IntGauge,
    pub replicas_unhealthy: Gauge,
}

impl MysqlMetrics {
    fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = MysqlMetrics {
            pool_connections: IntGaugeVec::new(
                Opts::new(
                    "chat_dbproxy_pool_connections",
                    "Open connections per MySQL server",
                ),
                &["backend"],
            )?,
            query_duration: HistogramVec::new(
                HistogramOpts::new(
                    "chat_dbproxy_query_duration_seconds",
                    "Time spent on a MySQL connection per request, by route",
                )
                .buckets(exponential_buckets(0.0001, 2.5, 14)?),
                &["route"],
            )?,
            replica_lag: GaugeVec::new(
                Opts::new(
                    "chat_dbproxy_replica_lag_seconds",
                    "Age of the heartbeat row as seen on each server",
                ),
                &["backend"],
            )?,
            causal_fallbacks: IntCounter::new(
                "chat_dbproxy_causal_fallbacks_total",
                "Reads with min_pos sent to the primary because no replica had applied it",
            )?,
            route: IntCounterVec::new(
                Opts::new(
                    "chat_dbproxy_route_total",
                    "Requests served per route (primary|replica) and server",
                ),
                &["route", "backend"],
            )?,
            primary_known: IntGauge::new(
                "chat_dbproxy_primary_known",
                "1 while a writable MySQL server is known",
            )?,
            replicas_unhealthy: Gauge::new(
                "chat_dbproxy_replicas_unhealthy",
                "Replicas currently not eligible for reads",
            )?,
        };
        registry.register(Box::new(m.pool_connections.clone()))?;
        registry.register(Box::new(m.query_duration.clone()))?;
        registry.register(Box::new(m.replica_lag.clone()))?;
        registry.register(Box::new(m.causal_fallbacks.clone()))?;
        registry.register(Box::new(m.route.clone()))?;
        registry.register(Box::new(m.primary_known.clone()))?;
        registry.register(Box::new(m.replicas_unhealthy.clone()))?;
        Ok(m)
    }
}

#[derive(Clone, Copy, Default)]
struct NodeState {
    up: bool,
    read_only: bool,
    /// Heartbeat timestamp read on this server, ms since the epoch.
    heartbeat_ms: Option<i64>,
    lag_ms: Option<i64>,
}

pub(crate) struct Node {
    pub addr: String,
    pool: Pool,
    // std Mutex: a copy in or out, never held across an await.
    state: Mutex<NodeState>,
}

impl Node {
    fn state(&self) -> NodeState {
        self.state.lock().map(|s| *s).unwrap_or_default()
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Route {
    Primary,
    Replica,
}

impl Route {
    fn as_str(self) -> &'static str {
        match self {
            Route::Primary => "primary",
            Route::Replica => "replica",
        }
    }
}

/// A connection checked out for one request; records the time it was held.
pub(crate) struct Routed<'a> {
    pub conn: Conn,
    pub route: Route,
    started: Instant,
    metrics: &'a MysqlMetrics,
}

impl Drop for Routed<'_> {
    fn drop(&mut self) {
        self.metrics
            .query_duration
            .with_label_values(&[self.route.as_str()])
            .observe(self.started.elapsed().as_secs_f64());
    }
}

pub(crate) struct Topology {
    pub nodes: Vec<Node>,
    primary: AtomicUsize,
    next_replica: AtomicUsize,
    /// Last heartbeat written on the primary (lag reference while it is down).
    last_heartbeat_ms: AtomicI64,
    pub metrics: MysqlMetrics,
    lag_budget_ms: i64,
    acquire_timeout: Duration,
    connect_timeout: Duration,
    causal_wait: Duration,
}

impl Topology {
    pub(crate) fn new(
        cfg: &MysqlConfig,
        password: &Password,
        ssl: Option<mysql_async::SslOpts>,
        registry: &Registry,
    ) -> Result<Self, prometheus::Error> {
        let constraints = PoolConstraints::new(cfg.pool_min, cfg.pool_max)
            .unwrap_or_else(|| PoolConstraints::new(1, 16).expect("static bounds are valid"));
        let addrs = std::iter::once(&cfg.primary).chain(cfg.replicas.iter());
        let nodes = addrs
            .map(|addr| {
                let (host, port) = addr.rsplit_once(':').unwrap_or((addr, "3306"));
                let opts = OptsBuilder::default()
                    .ip_or_hostname(host)
                    .tcp_port(port.parse().unwrap_or(3306))
                    .user(Some(cfg.user.clone()))
                    .pass(password.0.clone())
                    .db_name(Some(cfg.database.clone()))
                    .prefer_socket(false)
                    .ssl_opts(ssl.clone())
                    .pool_opts(PoolOpts::default().with_constraints(constraints));
                Node {
                    addr: addr.clone(),
                    pool: Pool::new(opts),
                    state: Mutex::new(NodeState::default()),
                }
            })
            .collect();
        Ok(Topology {
            nodes,
            primary: AtomicUsize::new(NONE),
            next_replica: AtomicUsize::new(0),
            last_heartbeat_ms: AtomicI64::new(0),
            metrics: MysqlMetrics::register(registry)?,
            lag_budget_ms: cfg.lag_budget_ms as i64,
            acquire_timeout: cfg.acquire_timeout(),
            connect_timeout: cfg.connect_timeout(),
            causal_wait: Duration::from_millis(cfg.causal_wait_ms),
        })
    }

    pub(crate) fn primary_index(&self) -> Option<usize> {
        match self.primary.load(Ordering::Acquire) {
            NONE => None,
            i => Some(i),
        }
    }

    async fn acquire(&self, i: usize, timeout: Duration) -> Result<Conn, ApiError> {
        let node = &self.nodes[i];
        match tokio::time::timeout(timeout, node.pool.get_conn()).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(db_err(e)),
            Err(_) => Err(unavailable(format!(
                "no connection to {} within {timeout:?}",
                node.addr
            ))),
        }
    }

    fn routed(&self, conn: Conn, route: Route, i: usize) -> Routed<'_> {
        self.metrics
            .route
            .with_label_values(&[route.as_str(), &self.nodes[i].addr])
            .inc();
        Routed {
            conn,
            route,
            started: Instant::now(),
            metrics: &self.metrics,
        }
    }

    /// A connection to the primary; fails fast with `Unavailable` while none is known.
    pub(crate) async fn primary(&self) -> Result<Routed<'_>, ApiError> {
        let (i, conn) = self.primary_conn().await?;
        Ok(self.routed(conn, Route::Primary, i))
    }

    /// The primary's index and a connection to it, for a caller that keeps
    /// the connection across requests (the append writer) and reports each
    /// request with [`Topology::record_primary`].
    pub(crate) async fn primary_conn(&self) -> Result<(usize, Conn), ApiError> {
        let Some(i) = self.primary_index() else {
            return Err(unavailable("no writable MySQL server"));
        };
        Ok((i, self.acquire(i, self.acquire_timeout).await?))
    }

    /// Counts one request served on primary `i` since `started`, as a
    /// [`Routed`] does when dropped.
    pub(crate) fn record_primary(&self, i: usize, started: Instant) {
        let route = Route::Primary.as_str();
        self.metrics
            .route
            .with_label_values(&[route, &self.nodes[i].addr])
            .inc();
        self.metrics
            .query_duration
            .with_label_values(&[route])
            .observe(started.elapsed().as_secs_f64());
    }

    /// Replicas fit for reads, starting at a rotating offset.
    fn read_candidates(&self) -> Vec<usize> {
        let primary = self.primary_index();
        let n = self.nodes.len();
        let start = self.next_replica.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|k| (start + k) % n)
            .filter(|&i| Some(i) != primary)
            .filter(|&i| {
                let s = self.nodes[i].state();
                s.up && s.read_only && s.lag_ms.is_some_and(|l| l <= self.lag_budget_ms)
            })
            .collect()
    }

    /// A connection for a read that may be served by a replica: one within the
    /// lag budget that has applied `min_pos`, else the primary.
    pub(crate) async fn reader(&self, min_pos: Option<&str>) -> Result<Routed<'_>, ApiError> {
        let mut fell_back = false;
        for i in self.read_candidates() {
            let Ok(mut conn) = self.acquire(i, self.connect_timeout).await else {
                continue;
            };
            if let Some(pos) = min_pos.filter(|p| !p.is_empty()) {
                let waited: Result<Option<Option<i64>>, _> = conn
                    .exec_first(
                        "SELECT MASTER_GTID_WAIT(?, ?)",
                        (pos, self.causal_wait.as_secs_f64()),
                    )
                    .await;
                if !matches!(waited, Ok(Some(Some(0)))) {
                    fell_back = true;
                    continue;
                }
            }
            return Ok(self.routed(conn, Route::Replica, i));
        }
        if fell_back {
            self.metrics.causal_fallbacks.inc();
        }
        self.primary().await
    }

    /// One round of the health loop.
    pub(crate) async fn probe_all(self: &Arc<Self>) {
        let mut probes = tokio::task::JoinSet::new();
        for i in 0..self.nodes.len() {
            let topo = self.clone();
            probes.spawn(async move { (i, topo.probe(i).await) });
        }
        let mut states = vec![NodeState::default(); self.nodes.len()];
        while let Some(r) = probes.join_next().await {
            if let Ok((i, s)) = r {
                states[i] = s;
            }
        }
        let current = self.primary_index();
        let writable = |i: &usize| states[*i].up && !states[*i].read_only;
        let primary = current
            .filter(writable)
            .or_else(|| (0..states.len()).find(writable));
        if primary != current {
            match primary {
                Some(i) => tracing::info!(primary = %self.nodes[i].addr, "primary changed"),
                None => tracing::warn!("no writable MySQL server"),
            }
        }
        if let Some(p) = primary {
            let now = now_ms();
            match self.write_heartbeat(p, now).await {
                Ok(()) => self.last_heartbeat_ms.store(now, Ordering::Relaxed),
                Err(e) => tracing::debug!(error = %e, "heartbeat write failed"),
            }
        }
        self.primary
            .store(primary.unwrap_or(NONE), Ordering::Release);
        self.metrics.primary_known.set(i64::from(primary.is_some()));
        // With the primary down nothing new can reach a replica: lag is then
        // measured against the last heartbeat we wrote, so reads continue.
        let reference = if primary.is_some() {
            now_ms()
        } else {
            self.last_heartbeat_ms.load(Ordering::Relaxed)
        };
        let mut unhealthy = 0.0;
        for (i, mut s) in states.into_iter().enumerate() {
            let node = &self.nodes[i];
            s.lag_ms = if Some(i) == primary {
                Some(0)
            } else {
                s.heartbeat_ms.map(|hb| (reference - hb).max(0))
            };
            if Some(i) != primary && !(s.up && s.lag_ms.is_some_and(|l| l <= self.lag_budget_ms)) {
                unhealthy += 1.0;
            }
            let lag = s.lag_ms.map_or(f64::INFINITY, |l| l as f64 / 1000.0);
            self.metrics
                .replica_lag
                .with_label_values(&[&node.addr])
                .set(lag);
            let open = node.pool.metrics().connection_count.load(Ordering::Relaxed);
            self.metrics
                .pool_connections
                .with_label_values(&[&node.addr])
                .set(open as i64);
            if let Ok(mut st) = node.state.lock() {
                *st = s;
            }
        }
        self.metrics.replicas_unhealthy.set(unhealthy);
    }

    /// Why a connection to server `i` cannot be had now, if it cannot.
    pub(crate) async fn connect_error(&self, i: usize) -> Option<String> {
        self.acquire(i, self.connect_timeout)
            .await
            .err()
            .map(|e| e.message)
    }

    async fn probe(&self, i: usize) -> NodeState {
        let down = NodeState::default();
        let Ok(mut conn) = self.acquire(i, self.connect_timeout).await else {
            return down;
        };
        let q = async {
            let ro: Option<i64> = conn.query_first("SELECT @@global.read_only").await?;
            // The table may not exist yet on a replica that is catching up.
            let hb: Option<i64> = conn
                .query_first("SELECT ts_ms FROM heartbeat WHERE id = 1")
                .await
                .unwrap_or(None);
            Ok::<_, mysql_async::Error>((ro.unwrap_or(1) != 0, hb))
        };
        match tokio::time::timeout(self.connect_timeout, q).await {
            Ok(Ok((read_only, heartbeat_ms))) => NodeState {
                up: true,
                read_only,
                heartbeat_ms,
                lag_ms: None,
            },
            _ => down,
        }
    }

    async fn write_heartbeat(&self, i: usize, now: i64) -> Result<(), ApiError> {
        let mut conn = self.acquire(i, self.connect_timeout).await?;
        conn.exec_drop(
            "INSERT INTO heartbeat (id, ts_ms) VALUES (1, ?)
             ON DUPLICATE KEY UPDATE ts_ms = GREATEST(ts_ms, VALUES(ts_ms))",
            (now,),
        )
        .await
        .map_err(db_err)
    }

    /// Runs the health loop until `stop`.
    pub(crate) async fn run_health(self: Arc<Self>, interval: Duration, stop: CancellationToken) {
        let mut tick = chat_admin::tick::Ticker::new(interval, stop);
        while tick.tick().await {
            self.probe_all().await;
        }
    }

    pub(crate) async fn disconnect(&self) {
        for node in &self.nodes {
            if let Err(e) = node.pool.clone().disconnect().await {
                tracing::debug!(backend = %node.addr, error = %e, "pool disconnect failed");
            }
        }
    }
}
