//! MySQL/MariaDB backend: a primary and replicas found by `@@read_only`
//! (`topology`), appends group-committed on the primary (`writer`), other
//! writes in one transaction each on the primary, reads on a replica within
//! the lag budget that has applied the request's `min_pos` (else the primary).
//! Every write answers `pos` = `@@last_gtid` of its commit.
//!
//! Semantics match the SQLite backend (`crate::sqlite`): same tables, tokens
//! stored as SHA-256, argon2id passwords, per-item errors, and the identity
//! rules of `crate::identity` (their SQL in `identity`). `rooms` holds the
//! join and DM transactions, `writer` the appends.

pub mod config;
mod identity;
mod rooms;
mod schema;
mod topology;
mod writer;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use mysql_async::prelude::Queryable;
use mysql_async::Conn;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::auth;
use crate::backend::{clamp_page, Backend, ROOM_INFO_COLUMNS};
use crate::config::Config;
use crate::error::{internal, no_such_room, unavailable, DbProxyError};
use crate::hashing::HashPool;
use crate::metrics::Metrics;
use crate::writer::now_ms;
use chat_storage_api::*;
use rooms::{join_tx, send_dms_tx};
use topology::{Routed, Topology};

/// Server errors that mean "try again" (nothing was written): read-only
/// server (a demoted primary), lock wait timeout, deadlock, too many
/// connections, shutdown in progress.
const RETRYABLE: &[u16] = &[1290, 1836, 1205, 1213, 1040, 1053, 1927];

pub(crate) fn db_err(e: mysql_async::Error) -> ApiError {
    match &e {
        mysql_async::Error::Server(s) if !RETRYABLE.contains(&s.code) => {
            internal(format!("storage: {e}"))
        }
        mysql_async::Error::Url(_) => internal(format!("storage: {e}")),
        _ => unavailable(format!("storage: {e}")),
    }
}

/// `@@last_gtid` of the connection's last commit (`None` without binlog).
pub(crate) async fn last_gtid(c: &mut Conn) -> Option<String> {
    let gtid: Option<Option<String>> = c.query_first("SELECT @@last_gtid").await.ok()?;
    gtid.flatten().filter(|g| !g.is_empty())
}

type Tx<T> = mysql_async::Result<Result<T, ApiError>>;

/// Commits when the body succeeded, rolls back otherwise; answers the body's
/// value and the commit's GTID.
async fn finish<T>(w: &mut Routed<'_>, body: Tx<T>) -> Result<(T, Option<String>), ApiError> {
    match body {
        Ok(Ok(v)) => {
            w.conn.query_drop("COMMIT").await.map_err(db_err)?;
            Ok((v, last_gtid(&mut w.conn).await))
        }
        Ok(Err(e)) => {
            let _ = w.conn.query_drop("ROLLBACK").await;
            Err(e)
        }
        Err(e) => {
            let _ = w.conn.query_drop("ROLLBACK").await;
            tracing::warn!(error = %e, "write failed");
            Err(db_err(e))
        }
    }
}

/// The body of one write transaction, given the connection it runs on.
type TxFuture<'c, T> = std::pin::Pin<Box<dyn std::future::Future<Output = Tx<T>> + Send + 'c>>;

/// How often a write transaction is tried when InnoDB picks it as a deadlock
/// victim. Concurrent first logins of new names take gap locks (`FOR UPDATE`
/// on a missing row, then `INSERT`) and deadlock under load; InnoDB has rolled
/// the victim back and asks for a retry, which nearly always succeeds at once.
const DEADLOCK_ATTEMPTS: u32 = 5;

fn is_deadlock(e: &mysql_async::Error) -> bool {
    matches!(e, mysql_async::Error::Server(s) if s.code == 1213)
}

async fn begin(w: &mut Routed<'_>) -> Result<(), ApiError> {
    w.conn.query_drop("START TRANSACTION").await.map_err(db_err)
}

fn room_info((room, last_seq, members): (String, i64, i64)) -> RoomInfo {
    RoomInfo {
        room,
        last_seq: last_seq as u64,
        members: members as u64,
    }
}

pub(crate) struct MysqlBackend {
    topo: Arc<Topology>,
    writer: writer::AppendWriter,
    hashing: Arc<HashPool>,
    /// `token_idle_ttl_secs` in ms.
    ttl_ms: i64,
    max_rooms_per_user: i64,
    stop: CancellationToken,
    // std Mutex: only taken once, in `close`, to move the handles out.
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl MysqlBackend {
    /// Finds the primary, migrates the schema there, starts the health loop
    /// and the append writer.
    pub(crate) async fn open(
        config: &Config,
        metrics: Arc<Metrics>,
        registry: &prometheus::Registry,
        hashing: Arc<HashPool>,
    ) -> Result<Self, DbProxyError> {
        let cfg = &config.mysql;
        let password = cfg.password()?;
        let topo = Arc::new(Topology::new(cfg, &password, cfg.ssl_opts()?, registry)?);
        let startup_err = |message: String| DbProxyError::Mysql {
            addr: cfg.primary.clone(),
            message,
        };
        // Servers may still be starting: wait up to the acquire timeout.
        let deadline = tokio::time::Instant::now() + cfg.acquire_timeout();
        while topo.primary_index().is_none() {
            topo.probe_all().await;
            if topo.primary_index().is_some() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                // Say why the primary is out of reach (a refused login, TLS
                // the server requires or the certificate not trusted), not
                // only that it is.
                let why = match topo.connect_error(0).await {
                    // MariaDB refuses a plain login to a server with
                    // require_secure_transport as "access denied" (1045),
                    // which reads like a wrong password.
                    Some(e) if cfg.ssl_mode == "disabled" && e.contains("1045") => format!(
                        "no writable server found; {}: {e} (mysql.ssl_mode = disabled: \
                         if the server requires TLS, set ssl_mode)",
                        cfg.primary
                    ),
                    Some(e) => format!("no writable server found; {}: {e}", cfg.primary),
                    None => "no writable server found".into(),
                };
                return Err(startup_err(why));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        {
            let mut w = topo.primary().await.map_err(|e| startup_err(e.message))?;
            schema::migrate(&mut w.conn)
                .await
                .map_err(|e| startup_err(format!("migration: {e}")))?;
        }
        topo.probe_all().await;
        let stop = CancellationToken::new();
        let health = tokio::spawn(
            topo.clone()
                .run_health(Duration::from_millis(cfg.health_interval_ms), stop.clone()),
        );
        let (writer, writer_task) = writer::spawn(
            topo.clone(),
            config.write_queue,
            config.batch_max_items,
            metrics,
            stop.clone(),
        );
        Ok(MysqlBackend {
            topo,
            writer,
            hashing,
            ttl_ms: config.token_idle_ttl_ms(),
            max_rooms_per_user: config.max_rooms_per_user as i64,
            stop,
            tasks: Mutex::new(vec![writer_task, health]),
        })
    }

    async fn write<'a>(&'a self) -> Result<Routed<'a>, ApiError> {
        let mut w = self.topo.primary().await?;
        begin(&mut w).await?;
        Ok(w)
    }

    /// Runs `body` in a transaction on the primary and commits it (see
    /// [`finish`]), running it again when it was a deadlock victim.
    async fn write_tx<T, F>(&self, mut body: F) -> Result<(T, Option<String>), ApiError>
    where
        T: Send,
        F: for<'c> FnMut(&'c mut Conn) -> TxFuture<'c, T> + Send,
    {
        let mut attempt = 1;
        loop {
            let mut w = self.write().await?;
            match body(&mut w.conn).await {
                Err(e) if is_deadlock(&e) && attempt < DEADLOCK_ATTEMPTS => {
                    let _ = w.conn.query_drop("ROLLBACK").await;
                    tracing::debug!(attempt, "deadlock victim, retrying the transaction");
                    attempt += 1;
                }
                result => return finish(&mut w, result).await,
            }
        }
    }
}

#[async_trait]
impl Backend for MysqlBackend {
    async fn login(&self, req: LoginReq) -> Result<Identity, ApiError> {
        crate::identity::login(self, &self.hashing, req).await
    }

    async fn guest(&self, req: GuestReq) -> Result<Identity, ApiError> {
        let token = auth::new_token(&req.name);
        let ttl = self.ttl_ms;
        let (name, t) = (req.name.clone(), token.clone());
        let ((), pos) = self
            .write_tx(|c| {
                let (name, t) = (name.clone(), t.clone());
                Box::pin(async move { identity::take_guest(c, &name, ttl, &t).await })
            })
            .await?;
        Ok(Identity {
            user: req.name,
            token,
            guest: true,
            pos,
        })
    }

    async fn resume(&self, req: ResumeReq) -> Result<Identity, ApiError> {
        let hash = auth::token_hash(&req.token);
        let ttl = self.ttl_ms;
        let ((user, guest), pos) = self
            .write_tx(|c| {
                let hash = hash.clone();
                Box::pin(async move { identity::resume(c, &hash, ttl).await })
            })
            .await?;
        Ok(Identity {
            user,
            token: req.token,
            guest,
            pos,
        })
    }

    async fn touch(&self, req: TouchReq) -> Result<WriteAck, ApiError> {
        if req.tokens.is_empty() {
            return Ok(WriteAck::default());
        }
        let now = now_ms();
        let params: Vec<(i64, Vec<u8>)> = req
            .tokens
            .iter()
            .map(|t| (now, auth::token_hash(t)))
            .collect();
        let ((), pos) = self
            .write_tx(|c| {
                let params = params.clone();
                Box::pin(async move {
                    c.exec_batch(
                        "UPDATE tokens SET last_used_ms = GREATEST(last_used_ms, ?) WHERE token_hash = ?",
                        params,
                    )
                    .await
                    .map(Ok)
                })
            })
            .await?;
        Ok(WriteAck { pos })
    }

    async fn join(&self, req: JoinReq) -> Result<JoinResp, ApiError> {
        let (room, user) = (req.room, req.user);
        let max = self.max_rooms_per_user;
        let (last_seq, pos) = self
            .write_tx(|c| {
                let (room, user) = (room.clone(), user.clone());
                Box::pin(async move { join_tx(c, &room, &user, now_ms(), max).await })
            })
            .await?;
        Ok(JoinResp { last_seq, pos })
    }

    async fn part(&self, req: PartReq) -> Result<WriteAck, ApiError> {
        let (room, user) = (req.room, req.user);
        let ((), pos) = self
            .write_tx(|c| {
                let (room, user) = (room.clone(), user.clone());
                Box::pin(async move {
                    c.exec_drop(
                        "DELETE FROM memberships
                         WHERE room_id = (SELECT id FROM rooms WHERE name = ?)
                           AND user_id = (SELECT id FROM users WHERE name = ?)",
                        (room, user),
                    )
                    .await
                    .map(Ok)
                })
            })
            .await?;
        Ok(WriteAck { pos })
    }

    async fn user_rooms(&self, req: UserRoomsReq) -> Result<RoomList, ApiError> {
        let mut r = self.topo.reader(req.min_pos.as_deref()).await?;
        let sql = format!(
            "SELECT {ROOM_INFO_COLUMNS} FROM rooms r
             JOIN memberships me ON me.room_id = r.id
             JOIN users u ON u.id = me.user_id
             WHERE u.name = ? ORDER BY r.name"
        );
        let rows: Vec<(String, i64, i64)> = r
            .conn
            .exec(sql, (req.user.as_str(),))
            .await
            .map_err(db_err)?;
        Ok(RoomList {
            rooms: rows.into_iter().map(room_info).collect(),
        })
    }

    async fn rooms(&self, req: RoomsReq) -> Result<RoomList, ApiError> {
        let mut r = self.topo.reader(req.min_pos.as_deref()).await?;
        let sql = format!("SELECT {ROOM_INFO_COLUMNS} FROM rooms r ORDER BY r.name LIMIT ?");
        let rows: Vec<(String, i64, i64)> = r
            .conn
            .exec(sql, (clamp_page(req.limit),))
            .await
            .map_err(db_err)?;
        Ok(RoomList {
            rooms: rows.into_iter().map(room_info).collect(),
        })
    }

    async fn room_info(&self, req: RoomInfoReq) -> Result<RoomInfo, ApiError> {
        let mut r = self.topo.reader(req.min_pos.as_deref()).await?;
        let sql = format!("SELECT {ROOM_INFO_COLUMNS} FROM rooms r WHERE r.name = ?");
        let row: Option<(String, i64, i64)> = r
            .conn
            .exec_first(sql, (req.room.as_str(),))
            .await
            .map_err(db_err)?;
        row.map(room_info).ok_or_else(|| no_such_room(&req.room))
    }

    async fn append(&self, req: AppendReq) -> Result<AppendResp, ApiError> {
        if req.items.is_empty() {
            return Ok(AppendResp {
                results: Vec::new(),
                pos: None,
            });
        }
        let (results, pos) = self.writer.append(req.items).await?;
        Ok(AppendResp { results, pos })
    }

    async fn history(&self, req: HistoryReq) -> Result<HistoryResp, ApiError> {
        let mut r = self.topo.reader(req.min_pos.as_deref()).await?;
        let room: Option<i64> = r
            .conn
            .exec_first("SELECT id FROM rooms WHERE name = ?", (req.room.as_str(),))
            .await
            .map_err(db_err)?;
        let Some(room) = room else {
            return Err(no_such_room(&req.room));
        };
        let after = i64::try_from(req.after).unwrap_or(i64::MAX);
        let rows: Vec<(i64, i64, String, String)> = r
            .conn
            .exec(
                "SELECT m.seq, m.sent_at_ms, u.name, m.body FROM messages m
                 JOIN users u ON u.id = m.sender_id
                 WHERE m.room_id = ? AND m.seq > ? ORDER BY m.seq LIMIT ?",
                (room, after, clamp_page(req.limit)),
            )
            .await
            .map_err(db_err)?;
        let messages = rows
            .into_iter()
            .map(|(seq, ts, sender, body)| StoredMessage {
                room: req.room.clone(),
                seq: seq as u64,
                ts,
                sender,
                body,
            })
            .collect();
        Ok(HistoryResp { messages })
    }

    async fn send_dms(&self, req: SendDmsReq) -> Result<SendDmsResp, ApiError> {
        if req.items.is_empty() {
            return Ok(SendDmsResp {
                results: Vec::new(),
                pos: None,
            });
        }
        let items = Arc::new(req.items);
        let (results, pos) = self
            .write_tx(|c| {
                let items = items.clone();
                Box::pin(async move { send_dms_tx(c, &items, now_ms()).await })
            })
            .await?;
        Ok(SendDmsResp { results, pos })
    }

    async fn pending_dms(&self, req: PendingDmsReq) -> Result<PendingDmsResp, ApiError> {
        let mut r = self.topo.primary().await?;
        let rows: Vec<(i64, i64, String, String)> = r
            .conn
            .exec(
                "SELECT m.id, m.sent_at_ms, s.name, m.body FROM messages m
                 JOIN users s ON s.id = m.sender_id
                 WHERE m.recipient_id = (SELECT id FROM users WHERE name = ?)
                   AND m.received_at_ms IS NULL
                 ORDER BY m.id LIMIT ?",
                (req.user.as_str(), clamp_page(req.limit)),
            )
            .await
            .map_err(db_err)?;
        let dms = rows
            .into_iter()
            .map(|(id, ts, sender, body)| StoredDm {
                id,
                ts,
                sender,
                recipient: req.user.clone(),
                body,
            })
            .collect();
        Ok(PendingDmsResp { dms })
    }

    async fn mark_received(&self, req: MarkReceivedReq) -> Result<WriteAck, ApiError> {
        if req.ids.is_empty() {
            return Ok(WriteAck::default());
        }
        let now = now_ms();
        let params: Vec<(i64, i64)> = req.ids.iter().map(|id| (now, *id)).collect();
        let ((), pos) = self
            .write_tx(|c| {
                let params = params.clone();
                Box::pin(async move {
                    c.exec_batch(
                        "UPDATE messages SET received_at_ms = ?
                         WHERE id = ? AND recipient_id IS NOT NULL AND received_at_ms IS NULL",
                        params,
                    )
                    .await
                    .map(Ok)
                })
            })
            .await?;
        Ok(WriteAck { pos })
    }

    async fn ready(&self) -> Result<(), ApiError> {
        // The health loop finds the primary every `health_interval_ms`;
        // reads fall back to it, so without one nothing can be served.
        match self.topo.primary_index() {
            Some(_) => Ok(()),
            None => Err(unavailable("no writable MySQL server")),
        }
    }

    async fn close(&self) {
        self.stop.cancel();
        let tasks = self
            .tasks
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default();
        for task in tasks {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "mysql backend task failed");
            }
        }
        self.topo.disconnect().await;
    }
}
