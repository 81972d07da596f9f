//! SQLite backend: writes go through the group-commit writer (`writer.rs`),
//! reads through a small pool of read-only connections (`read_pool`); both
//! in `spawn_blocking`. `identity` holds the SQL of the identity rules
//! (`crate::identity`), `messages` stores room messages and DMs inside a
//! batch.
//! `pos` is always `None` and `min_pos` is ignored: with one file every read
//! sees every committed write.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::auth;
use crate::backend::{clamp_page, Backend, ROOM_INFO_COLUMNS};
use crate::config::Config;
use crate::error::{no_such_room, no_such_user, too_many_rooms, DbProxyError};
use crate::hashing::HashPool;
use crate::metrics::Metrics;
use crate::schema;
use crate::writer::{self, WriterHandle};
use chat_storage_api::*;

mod identity;
mod messages;
mod read_pool;

use messages::{append_all, per_item, send_dm};
use read_pool::ReadPool;

/// How often the checkpointer copies the WAL into the database. Often
/// enough that the WAL stays small (it restarts from its beginning once
/// everything in it was copied), rarely enough to cost nothing when idle.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

pub(crate) struct SqliteBackend {
    writer: WriterHandle,
    readers: ReadPool,
    hashing: Arc<HashPool>,
    /// `token_idle_ttl_secs` in ms.
    ttl_ms: i64,
    max_rooms_per_user: i64,
    stop: CancellationToken,
    // std Mutex: only taken once, in `close`, to move the handles out.
    writer_task: Mutex<Option<JoinHandle<()>>>,
    checkpoint_task: Mutex<Option<JoinHandle<()>>>,
}

impl SqliteBackend {
    /// Opens (and migrates) the database and starts the writer.
    pub(crate) fn open(
        config: &Config,
        metrics: Arc<Metrics>,
        hashing: Arc<HashPool>,
    ) -> Result<Self, DbProxyError> {
        let path = PathBuf::from(&config.sqlite_path);
        let db_err = |source| DbProxyError::Database {
            path: config.sqlite_path.clone(),
            source,
        };
        let conn = schema::open_writer(&path).map_err(db_err)?;
        let readers = ReadPool::open(&path, config.read_connections).map_err(db_err)?;
        let checkpointer = schema::open_checkpointer(&path).map_err(db_err)?;
        let stop = CancellationToken::new();
        let checkpoint_task = tokio::spawn(checkpoint_loop(checkpointer, stop.clone()));
        let (writer, task) = writer::spawn(
            conn,
            config.write_queue,
            config.batch_max_items,
            metrics,
            stop.clone(),
        );
        Ok(SqliteBackend {
            writer,
            readers,
            hashing,
            ttl_ms: config.token_idle_ttl_ms(),
            max_rooms_per_user: config.max_rooms_per_user as i64,
            stop,
            writer_task: Mutex::new(Some(task)),
            checkpoint_task: Mutex::new(Some(checkpoint_task)),
        })
    }
}

/// Checkpoints every [`CHECKPOINT_EVERY`] until `stop`, so that commits do
/// not (see `schema::open_writer`).
async fn checkpoint_loop(conn: Connection, stop: CancellationToken) {
    let mut conn = Some(conn);
    let mut tick = chat_admin::tick::Ticker::new(CHECKPOINT_EVERY, stop);
    while tick.tick().await {
        let Some(c) = conn.take() else { return };
        match tokio::task::spawn_blocking(move || {
            let r = schema::checkpoint(&c);
            (c, r)
        })
        .await
        {
            Ok((c, r)) => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "checkpoint failed; the next one retries");
                }
                conn = Some(c);
            }
            Err(e) => {
                tracing::error!(error = %e, "checkpoint task failed; the writer checkpoints alone");
                return;
            }
        }
    }
}

fn user_id(c: &Connection, name: &str) -> rusqlite::Result<Option<i64>> {
    c.prepare_cached("SELECT id FROM users WHERE name = ?1")?
        .query_row(params![name], |r| r.get(0))
        .optional()
}

fn room_id(c: &Connection, name: &str) -> rusqlite::Result<Option<i64>> {
    c.prepare_cached("SELECT id FROM rooms WHERE name = ?1")?
        .query_row(params![name], |r| r.get(0))
        .optional()
}

fn is_member(c: &Connection, room: &str, user: i64) -> rusqlite::Result<bool> {
    c.prepare_cached(
        "SELECT EXISTS(SELECT 1 FROM memberships m JOIN rooms r ON r.id = m.room_id
         WHERE r.name = ?1 AND m.user_id = ?2)",
    )?
    .query_row(params![room, user], |r| r.get(0))
}

fn rooms_of(c: &Connection, user: i64) -> rusqlite::Result<i64> {
    c.prepare_cached("SELECT COUNT(*) FROM memberships WHERE user_id = ?1")?
        .query_row(params![user], |r| r.get(0))
}

fn room_info_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RoomInfo> {
    Ok(RoomInfo {
        room: r.get(0)?,
        last_seq: r.get::<_, i64>(1)? as u64,
        members: r.get::<_, i64>(2)? as u64,
    })
}

#[async_trait]
impl Backend for SqliteBackend {
    async fn login(&self, req: LoginReq) -> Result<Identity, ApiError> {
        crate::identity::login(self, &self.hashing, req).await
    }

    async fn guest(&self, req: GuestReq) -> Result<Identity, ApiError> {
        let token = auth::new_token(&req.name);
        let (name, t, ttl) = (req.name.clone(), token.clone(), self.ttl_ms);
        self.writer
            .submit(1, move |c, b| identity::take_guest(c, b, &name, ttl, &t))
            .await?;
        Ok(Identity {
            user: req.name,
            token,
            guest: true,
            pos: None,
        })
    }

    async fn resume(&self, req: ResumeReq) -> Result<Identity, ApiError> {
        let hash = auth::token_hash(&req.token);
        let ttl = self.ttl_ms;
        let (user, guest) = self
            .writer
            .submit(1, move |c, b| identity::resume(c, b, &hash, ttl))
            .await?;
        Ok(Identity {
            user,
            token: req.token,
            guest,
            pos: None,
        })
    }

    async fn touch(&self, req: TouchReq) -> Result<WriteAck, ApiError> {
        if req.tokens.is_empty() {
            return Ok(WriteAck::default());
        }
        let hashes: Vec<Vec<u8>> = req.tokens.iter().map(|t| auth::token_hash(t)).collect();
        self.writer
            .submit(hashes.len(), move |c, b| {
                let mut stmt = c.prepare_cached(
                    "UPDATE tokens SET last_used_ms = MAX(last_used_ms, ?2) WHERE token_hash = ?1",
                )?;
                for h in &hashes {
                    stmt.execute(params![h, b.now])?;
                }
                Ok(Ok(()))
            })
            .await?;
        Ok(WriteAck::default())
    }

    async fn join(&self, req: JoinReq) -> Result<JoinResp, ApiError> {
        let max = self.max_rooms_per_user;
        let last_seq = self
            .writer
            .submit(1, move |c, b| {
                let Some(user) = user_id(c, &req.user)? else {
                    return Ok(Err(no_such_user(&req.user)));
                };
                if !is_member(c, &req.room, user)? && rooms_of(c, user)? >= max {
                    return Ok(Err(too_many_rooms(max)));
                }
                c.prepare_cached(
                    "INSERT OR IGNORE INTO rooms (name, last_seq, created_at) VALUES (?1, 0, ?2)",
                )?
                .execute(params![req.room, b.now])?;
                let (room, last_seq): (i64, i64) = c
                    .prepare_cached("SELECT id, last_seq FROM rooms WHERE name = ?1")?
                    .query_row(params![req.room], |r| Ok((r.get(0)?, r.get(1)?)))?;
                c.prepare_cached(
                    "INSERT OR IGNORE INTO memberships (room_id, user_id, joined_at) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![room, user, b.now])?;
                Ok(Ok(last_seq as u64))
            })
            .await?;
        Ok(JoinResp {
            last_seq,
            pos: None,
        })
    }

    async fn part(&self, req: PartReq) -> Result<WriteAck, ApiError> {
        self.writer
            .submit(1, move |c, _| {
                c.prepare_cached(
                    "DELETE FROM memberships
                     WHERE room_id = (SELECT id FROM rooms WHERE name = ?1)
                       AND user_id = (SELECT id FROM users WHERE name = ?2)",
                )?
                .execute(params![req.room, req.user])?;
                Ok(Ok(()))
            })
            .await?;
        Ok(WriteAck::default())
    }

    async fn user_rooms(&self, req: UserRoomsReq) -> Result<RoomList, ApiError> {
        self.readers
            .read(move |c| {
                let sql = format!(
                    "SELECT {ROOM_INFO_COLUMNS} FROM rooms r
                     JOIN memberships me ON me.room_id = r.id
                     JOIN users u ON u.id = me.user_id
                     WHERE u.name = ?1 ORDER BY r.name"
                );
                let rooms = c
                    .prepare_cached(&sql)?
                    .query_map(params![req.user], room_info_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok(Ok(RoomList { rooms }))
            })
            .await
    }

    async fn rooms(&self, req: RoomsReq) -> Result<RoomList, ApiError> {
        self.readers
            .read(move |c| {
                let sql =
                    format!("SELECT {ROOM_INFO_COLUMNS} FROM rooms r ORDER BY r.name LIMIT ?1");
                let rooms = c
                    .prepare_cached(&sql)?
                    .query_map(params![clamp_page(req.limit)], room_info_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok(Ok(RoomList { rooms }))
            })
            .await
    }

    async fn room_info(&self, req: RoomInfoReq) -> Result<RoomInfo, ApiError> {
        self.readers
            .read(move |c| {
                let sql = format!("SELECT {ROOM_INFO_COLUMNS} FROM rooms r WHERE r.name = ?1");
                let info = c
                    .prepare_cached(&sql)?
                    .query_row(params![req.room], room_info_row)
                    .optional()?;
                Ok(info.ok_or_else(|| no_such_room(&req.room)))
            })
            .await
    }

    async fn append(&self, req: AppendReq) -> Result<AppendResp, ApiError> {
        let items = req.items;
        if items.is_empty() {
            return Ok(AppendResp {
                results: Vec::new(),
                pos: None,
            });
        }
        let results = self
            .writer
            .submit(items.len(), move |c, b| append_all(c, b, &items).map(Ok))
            .await?;
        Ok(AppendResp { results, pos: None })
    }

    async fn history(&self, req: HistoryReq) -> Result<HistoryResp, ApiError> {
        self.readers
            .read(move |c| {
                let Some(room) = room_id(c, &req.room)? else {
                    return Ok(Err(no_such_room(&req.room)));
                };
                let after = i64::try_from(req.after).unwrap_or(i64::MAX);
                let messages = c
                    .prepare_cached(
                        "SELECT m.seq, m.sent_at_ms, u.name, m.body FROM messages m
                         JOIN users u ON u.id = m.sender_id
                         WHERE m.room_id = ?1 AND m.seq > ?2 ORDER BY m.seq LIMIT ?3",
                    )?
                    .query_map(params![room, after, clamp_page(req.limit)], |r| {
                        Ok(StoredMessage {
                            room: req.room.clone(),
                            seq: r.get::<_, i64>(0)? as u64,
                            ts: r.get(1)?,
                            sender: r.get(2)?,
                            body: r.get(3)?,
                        })
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok(Ok(HistoryResp { messages }))
            })
            .await
    }

    async fn send_dms(&self, req: SendDmsReq) -> Result<SendDmsResp, ApiError> {
        let items = req.items;
        if items.is_empty() {
            return Ok(SendDmsResp {
                results: Vec::new(),
                pos: None,
            });
        }
        let results = self
            .writer
            .submit(items.len(), move |c, b| {
                per_item(c, b, &items, send_dm).map(Ok)
            })
            .await?;
        Ok(SendDmsResp { results, pos: None })
    }

    async fn pending_dms(&self, req: PendingDmsReq) -> Result<PendingDmsResp, ApiError> {
        self.readers
            .read(move |c| {
                let dms = c
                    .prepare_cached(
                        "SELECT m.id, m.sent_at_ms, s.name, m.body FROM messages m
                         JOIN users s ON s.id = m.sender_id
                         WHERE m.recipient_id = (SELECT id FROM users WHERE name = ?1)
                           AND m.received_at_ms IS NULL
                         ORDER BY m.id LIMIT ?2",
                    )?
                    .query_map(params![req.user, clamp_page(req.limit)], |r| {
                        Ok(StoredDm {
                            id: r.get(0)?,
                            ts: r.get(1)?,
                            sender: r.get(2)?,
                            recipient: req.user.clone(),
                            body: r.get(3)?,
                        })
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok(Ok(PendingDmsResp { dms }))
            })
            .await
    }

    async fn mark_received(&self, req: MarkReceivedReq) -> Result<WriteAck, ApiError> {
        if req.ids.is_empty() {
            return Ok(WriteAck::default());
        }
        let ids = req.ids;
        self.writer
            .submit(ids.len(), move |c, b| {
                let mut stmt = c.prepare_cached(
                    "UPDATE messages SET received_at_ms = ?2
                     WHERE id = ?1 AND recipient_id IS NOT NULL AND received_at_ms IS NULL",
                )?;
                for id in &ids {
                    stmt.execute(params![id, b.now])?;
                }
                Ok(Ok(()))
            })
            .await?;
        Ok(WriteAck::default())
    }

    async fn ready(&self) -> Result<(), ApiError> {
        self.readers
            .read(|c| {
                let _: i64 = c.query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| r.get(0))?;
                Ok(Ok(()))
            })
            .await?;
        self.writer.probe().await
    }

    async fn close(&self) {
        self.stop.cancel();
        let task = self.writer_task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "writer task failed");
            }
        }
        let task = self.checkpoint_task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The readiness probe needs a read connection: with every one of them
    /// held (by reads that never end, or lost as they used to be), it fails;
    /// it passes again once one is back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ready_needs_a_read_connection_and_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            sqlite_path: dir.path().join("chat.db").to_string_lossy().into_owned(),
            read_connections: 2,
            ..Config::default()
        };
        let registry = prometheus::Registry::new();
        let metrics = Arc::new(Metrics::register(&registry).unwrap());
        let hashing = Arc::new(HashPool::start(1, 1, metrics.password_hashes.clone()).unwrap());
        let backend = tokio::task::spawn_blocking(move || {
            SqliteBackend::open(&config, metrics, hashing).unwrap()
        })
        .await
        .unwrap();
        backend.ready().await.unwrap();
        let held = backend
            .readers
            .permits
            .clone()
            .acquire_many_owned(2)
            .await
            .unwrap();
        let probe = tokio::time::timeout(std::time::Duration::from_millis(300), backend.ready());
        assert!(probe.await.is_err(), "ready without a read connection");
        drop(held);
        backend.ready().await.unwrap();
        // A writer that stopped fails the probe at once.
        backend.close().await;
        let e = backend.ready().await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unavailable);
    }
}
