//! Group commit of appends on the primary. Every append request waits on one
//! bounded queue; one task takes everything waiting (up to `batch_max_items`,
//! any mix of rooms) and stores it in ONE transaction of a fixed number of
//! statements, whatever the batch holds: rooms locked (`FOR UPDATE`), senders
//! and earlier copies of the client ids looked up, seqs assigned in request
//! order, the messages inserted, every room's `last_seq` set, commit,
//! `@@last_gtid`. The row locks keep seq dense and unique with any number of
//! dbproxies writing one room; the UNIQUE keys make the database enforce it.
//!
//! Each statement takes the batch's values as ONE parameter, a JSON array
//! unpacked by `JSON_TABLE` (MariaDB ≥ 10.6), so the SQL text never changes:
//! it is prepared once per connection, and a batch costs the same few round
//! trips for 1 room or 500 (a statement per room, or an IN list sized to the
//! batch, would cost a round trip per room or a prepare per batch). The
//! writer keeps its connection across batches for the same reason (a pooled
//! connection is reset, and its statements dropped, whenever it goes back).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use mysql_async::prelude::Queryable;
use mysql_async::Conn;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::topology::Topology;
use super::{db_err, last_gtid};
use crate::error::unavailable;
use crate::error::{no_such_room, no_such_user};
use crate::metrics::Metrics;
use crate::writer::now_ms;
use chat_storage_api::{ApiError, AppendItem, Appended, ErrorKind};

/// Largest JSON document sent as one statement's parameter; a larger batch
/// takes more statements. Well under MariaDB's default `max_allowed_packet`
/// (16 MiB), even for a full 4 MiB request whose bodies escape badly.
const JSON_CHUNK_BYTES: usize = 1 << 20;

/// Batches in flight at once, each on its own connection: while one waits
/// for its commit (fsync), the next is already being written.
const WRITERS: usize = 2;

/// Longest name or client id the schema holds (`VARCHAR(255)`, in
/// characters). `JSON_TABLE` would truncate a longer one silently, so such
/// values are answered before they reach SQL.
const MAX_CHARS: usize = 255;

/// The rooms of the batch, locked in the order of the (sorted) names given:
/// every writer locks in the same order, so two cannot deadlock on them.
/// `STRAIGHT_JOIN` + `FORCE INDEX`: read the list first and look each room up
/// by its unique key, never scan (and lock) rooms not in the list.
const LOCK_ROOMS: &str = "SELECT STRAIGHT_JOIN r.name, r.id, r.last_seq
    FROM JSON_TABLE(?, '$[*]' COLUMNS (
        name VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$')) j
    JOIN rooms r FORCE INDEX (rooms_name) ON r.name = j.name
    FOR UPDATE";

/// Each sender's id. Names come back as stored, so they are compared byte
/// for byte in Rust, as with SQLite.
const USERS: &str = "SELECT STRAIGHT_JOIN u.name, u.id
    FROM JSON_TABLE(?, '$[*]' COLUMNS (
        name VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$')) j
    JOIN users u FORCE INDEX (users_name) ON u.name = j.name";

/// For each `[sender_id, client_id]`, the message already stored under it
/// (a DM has no seq).
const PRIOR: &str = "SELECT STRAIGHT_JOIN m.sender_id, m.client_id, m.seq, m.sent_at_ms
    FROM JSON_TABLE(?, '$[*]' COLUMNS (
        sender_id BIGINT PATH '$[0]',
        client_id VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$[1]')) j
    JOIN messages m FORCE INDEX (messages_client)
        ON m.sender_id = j.sender_id AND m.client_id = j.client_id";

/// Parameters: `sent_at_ms`, then `[[room_id, seq, sender_id, client_id, body], …]`.
const INSERT: &str = "INSERT INTO messages (room_id, seq, sender_id, client_id, sent_at_ms, body)
    SELECT j.room_id, j.seq, j.sender_id, j.client_id, ?, j.body
    FROM JSON_TABLE(?, '$[*]' COLUMNS (
        room_id BIGINT PATH '$[0]',
        seq BIGINT PATH '$[1]',
        sender_id BIGINT PATH '$[2]',
        client_id VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$[3]',
        body LONGTEXT CHARACTER SET utf8mb4 PATH '$[4]')) j";

/// `[[room_id, last_seq], …]`; rooms looked up by primary key only.
const SET_LAST_SEQ: &str = "UPDATE JSON_TABLE(?, '$[*]' COLUMNS (
        id BIGINT PATH '$[0]',
        last_seq BIGINT PATH '$[1]')) j
    STRAIGHT_JOIN rooms r FORCE INDEX (PRIMARY) ON r.id = j.id
    SET r.last_seq = j.last_seq";

type Results = Vec<Result<Appended, ApiError>>;
type Answer = Result<(Results, Option<String>), ApiError>;

struct Job {
    items: Vec<AppendItem>,
    reply: oneshot::Sender<Answer>,
}

#[derive(Clone)]
pub(crate) struct AppendWriter {
    tx: mpsc::Sender<Job>,
}

impl AppendWriter {
    pub(crate) async fn append(&self, items: Vec<AppendItem>) -> Answer {
        let (reply, answer) = oneshot::channel();
        self.tx
            .try_send(Job { items, reply })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => unavailable("write queue full"),
                mpsc::error::TrySendError::Closed(_) => unavailable("shutting down"),
            })?;
        answer
            .await
            .map_err(|_| unavailable("writer stopped before the write committed"))?
    }
}

pub(crate) fn spawn(
    topo: Arc<Topology>,
    queue: usize,
    batch_max_items: usize,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> (AppendWriter, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(queue);
    let task = tokio::spawn(run(topo, rx, batch_max_items, metrics, stop));
    (AppendWriter { tx }, task)
}

async fn run(
    topo: Arc<Topology>,
    mut rx: mpsc::Receiver<Job>,
    batch_max_items: usize,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    // One entry per writer connection not busy with a batch.
    let mut idle: Vec<Option<Session>> = (0..WRITERS).map(|_| None).collect();
    let mut busy = JoinSet::new();
    loop {
        // `biased`: a finished batch frees its writer first; after `stop`,
        // whatever is queued is still committed.
        let first = tokio::select! {
            biased;
            Some(done) = busy.join_next() => {
                // A panicked batch loses its connection; the next one opens another.
                idle.push(done.unwrap_or(None));
                continue;
            }
            job = rx.recv(), if !idle.is_empty() => job,
            _ = stop.cancelled(), if !idle.is_empty() => None,
        };
        let Some(first) = first else { break };
        let mut items = first.items.len();
        let mut jobs = vec![first];
        while items < batch_max_items {
            match rx.try_recv() {
                Ok(job) => {
                    items += job.items.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        let session = idle.pop().flatten();
        busy.spawn(commit_jobs(topo.clone(), session, jobs, metrics.clone()));
    }
    while busy.join_next().await.is_some() {}
    tracing::debug!("mysql append writer stopped");
}

/// Commits one batch and answers its jobs; hands the connection back.
async fn commit_jobs(
    topo: Arc<Topology>,
    mut session: Option<Session>,
    jobs: Vec<Job>,
    metrics: Arc<Metrics>,
) -> Option<Session> {
    let started = Instant::now();
    let all: Vec<&AppendItem> = jobs.iter().flat_map(|j| j.items.iter()).collect();
    let outcome = commit_batch(&topo, &mut session, &all).await;
    let items = all.len();
    drop(all);
    match outcome {
        Ok((results, pos, stored)) => {
            metrics.batch_items.observe(items as f64);
            metrics
                .commit_duration
                .observe(started.elapsed().as_secs_f64());
            metrics.messages_stored.inc_by(stored);
            let mut results = results.into_iter();
            for job in jobs {
                let mine = results.by_ref().take(job.items.len()).collect();
                let _ = job.reply.send(Ok((mine, pos.clone())));
            }
        }
        Err(e) => {
            for job in jobs {
                let _ = job.reply.send(Err(e.clone()));
            }
        }
    }
    session
}

/// The writer's connection to the primary, kept across batches (see the
/// module comment); dropped after an error, and when the primary changes.
struct Session {
    primary: usize,
    conn: Conn,
}

/// The kept connection if it still goes to the primary, else a new one.
async fn session<'s>(
    topo: &Topology,
    held: &'s mut Option<Session>,
) -> Result<&'s mut Session, ApiError> {
    let current = topo.primary_index();
    let s = match held.take() {
        Some(s) if Some(s.primary) == current => s,
        _ => {
            let (primary, mut conn) = topo.primary_conn().await?;
            // READ COMMITTED: the duplicate check in `apply` must see rows
            // committed by other dbproxies after our room locks were granted.
            // The pool resets the session when the connection goes back.
            conn.query_drop("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                .await
                .map_err(db_err)?;
            conn.query_drop("SET SESSION autocommit = 0")
                .await
                .map_err(db_err)?;
            Session { primary, conn }
        }
    };
    Ok(held.insert(s))
}

/// Commits the batch, retrying on a lost race (another dbproxy stored the
/// same (sender, client_id) in between, or a deadlock) and once on a broken
/// kept connection; never after COMMIT was sent.
async fn commit_batch(
    topo: &Topology,
    held: &mut Option<Session>,
    items: &[&AppendItem],
) -> Result<(Results, Option<String>, u64), ApiError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let reused = held.is_some();
        let s = session(topo, held).await?;
        let started = Instant::now();
        let now = now_ms();
        let error = match apply(&mut s.conn, items, now).await {
            Ok((results, stored)) => {
                let committed = s.conn.query_drop("COMMIT").await;
                let pos = match committed {
                    Ok(()) => last_gtid(&mut s.conn).await,
                    Err(_) => None,
                };
                topo.record_primary(s.primary, started);
                return match committed {
                    Ok(()) => Ok((results, pos, stored)),
                    Err(e) => {
                        *held = None;
                        Err(db_err(e))
                    }
                };
            }
            Err(e) => e,
        };
        // Kept only when surely outside a transaction: the next batch would
        // otherwise run inside what is left of this one.
        let rolled_back = s.conn.query_drop("ROLLBACK").await.is_ok();
        topo.record_primary(s.primary, started);
        let (retry, keep) = match &error {
            mysql_async::Error::Server(e) => (e.code == 1062 || e.code == 1213, rolled_back),
            // A kept connection the server closed meanwhile (idle timeout,
            // restart); nothing was committed.
            _ => (reused, false),
        };
        if !keep {
            *held = None;
        }
        if retry && attempt < 3 {
            tracing::debug!(error = %error, "append batch failed before commit; retrying");
            continue;
        }
        tracing::warn!(error = %error, "append batch failed");
        let err = db_err(error);
        // Nothing was written: callers may retry.
        return Err(if err.kind == ErrorKind::Internal {
            err
        } else {
            unavailable(err.message)
        });
    }
}

/// `rows` as JSON arrays of at most about [`JSON_CHUNK_BYTES`] each.
fn json_chunks<T: Serialize>(
    rows: impl IntoIterator<Item = T>,
) -> mysql_async::Result<Vec<Vec<u8>>> {
    let mut chunks = Vec::new();
    let mut doc = vec![b'['];
    for row in rows {
        if doc.len() > JSON_CHUNK_BYTES {
            doc.push(b']');
            chunks.push(std::mem::replace(&mut doc, vec![b'[']));
        }
        if doc.len() > 1 {
            doc.push(b',');
        }
        serde_json::to_writer(&mut doc, &row).map_err(|e| mysql_async::Error::Other(e.into()))?;
    }
    if doc.len() > 1 {
        doc.push(b']');
        chunks.push(doc);
    }
    Ok(chunks)
}

fn too_long(s: &str) -> bool {
    // At most MAX_CHARS bytes is at most MAX_CHARS characters.
    s.len() > MAX_CHARS && s.chars().nth(MAX_CHARS).is_some()
}

/// A locked room: id and `last_seq` as stored.
struct Room {
    id: i64,
    last_seq: i64,
}

/// What is stored under a (sender id, client id): a room message's seq (a DM
/// has none) and its timestamp.
type Prior<'a> = HashMap<(i64, &'a str), (Option<i64>, i64)>;

/// `[room_id, seq, sender_id, client_id, body]`, as [`INSERT`] takes it.
type MessageRow<'a> = (i64, i64, i64, Option<&'a str>, &'a str);

/// The answer to every item, the rows to insert and each changed room's
/// `[id, last_seq]`.
struct Assigned<'a> {
    results: Results,
    rows: Vec<MessageRow<'a>>,
    last_seqs: Vec<(i64, i64)>,
}

/// Everything but the commit; `Ok` leaves the transaction open.
async fn apply(
    c: &mut Conn,
    items: &[&AppendItem],
    now: i64,
) -> mysql_async::Result<(Results, u64)> {
    // No START TRANSACTION: autocommit is off on the writer's session, so
    // the first statement opens the transaction (one round trip less).
    let rooms = lock_rooms(c, items).await?;
    let found = find_senders(c, items).await?;
    let users: HashMap<&str, i64> = found.iter().map(|(n, id)| (n.as_str(), *id)).collect();
    // Optimistically, no client id was used before: the UNIQUE key on
    // (sender, client id) says otherwise by failing the INSERT, which then
    // takes nothing (statement rollback; the room locks stay), and the batch
    // is assigned again knowing what is stored. The INSERT sees, or waits
    // for, whatever other writers stored under our room locks.
    let first = assign(items, &users, &rooms, Prior::new(), now);
    let docs = json_chunks(&first.rows)?;
    let done = match docs.as_slice() {
        [] => Some(first),
        [doc] => match c.exec_drop(INSERT, (now, doc)).await {
            Ok(()) => Some(first),
            Err(mysql_async::Error::Server(e)) if e.code == 1062 => None,
            Err(e) => return Err(e),
        },
        // Several statements would not fail as one: look first.
        _ => None,
    };
    let assigned = match done {
        Some(assigned) => assigned,
        None => assign_knowing_stored(c, items, &users, &rooms, now).await?,
    };
    let mut updated = 0;
    for doc in json_chunks(&assigned.last_seqs)? {
        c.exec_drop(SET_LAST_SEQ, (doc,)).await?;
        updated += c.affected_rows();
    }
    // Every room's last_seq grew; one that did not would hand out its seqs again.
    if updated != assigned.last_seqs.len() as u64 {
        let e = format!(
            "last_seq set on {updated} of {} rooms",
            assigned.last_seqs.len()
        );
        return Err(mysql_async::Error::Other(e.into()));
    }
    Ok((assigned.results, assigned.rows.len() as u64))
}

/// Locks the batch's rooms, in name order so that every writer locks rooms
/// in the same order; their ids and last seqs by name.
async fn lock_rooms(
    c: &mut Conn,
    items: &[&AppendItem],
) -> mysql_async::Result<HashMap<String, Room>> {
    let room_names: BTreeSet<&str> = items
        .iter()
        .map(|i| i.room.as_str())
        .filter(|r| !too_long(r))
        .collect();
    let mut rooms: HashMap<String, Room> = HashMap::with_capacity(room_names.len());
    for doc in json_chunks(&room_names)? {
        let rows: Vec<(String, i64, i64)> = c.exec(LOCK_ROOMS, (doc,)).await?;
        rooms.extend(
            rows.into_iter()
                .map(|(name, id, last_seq)| (name, Room { id, last_seq })),
        );
    }
    Ok(rooms)
}

/// The ids of the batch's senders that exist, with their names.
async fn find_senders(
    c: &mut Conn,
    items: &[&AppendItem],
) -> mysql_async::Result<Vec<(String, i64)>> {
    let senders: BTreeSet<&str> = items
        .iter()
        .map(|i| i.sender.as_str())
        .filter(|s| !too_long(s))
        .collect();
    let mut found: Vec<(String, i64)> = Vec::with_capacity(senders.len());
    for doc in json_chunks(&senders)? {
        found.extend(c.exec::<(String, i64), _, _>(USERS, (doc,)).await?);
    }
    Ok(found)
}

/// The batch assigned again after reading what is stored under its client
/// ids, and its rows inserted.
async fn assign_knowing_stored<'a>(
    c: &mut Conn,
    items: &[&'a AppendItem],
    users: &HashMap<&str, i64>,
    rooms: &HashMap<String, Room>,
    now: i64,
) -> mysql_async::Result<Assigned<'a>> {
    let keys: BTreeSet<(i64, &str)> = items
        .iter()
        .filter_map(|i| {
            let cid = i.client_id.as_deref().filter(|c| !too_long(c))?;
            Some((*users.get(i.sender.as_str())?, cid))
        })
        .collect();
    let mut stored: Vec<(i64, String, Option<i64>, i64)> = Vec::new();
    for doc in json_chunks(&keys)? {
        stored.extend(
            c.exec::<(i64, String, Option<i64>, i64), _, _>(PRIOR, (doc,))
                .await?,
        );
    }
    let prior: Prior = stored
        .iter()
        .map(|(sender, cid, seq, ts)| ((*sender, cid.as_str()), (*seq, *ts)))
        .collect();
    let assigned = assign(items, users, rooms, prior, now);
    for doc in json_chunks(&assigned.rows)? {
        c.exec_drop(INSERT, (now, doc)).await?;
    }
    Ok(assigned)
}

/// Seqs in request order per room, given what is stored under the client ids
/// (`prior`); a client id repeated inside the batch answers its first copy.
fn assign<'a: 'p, 'p>(
    items: &[&'a AppendItem],
    users: &HashMap<&str, i64>,
    rooms: &HashMap<String, Room>,
    mut prior: Prior<'p>,
    now: i64,
) -> Assigned<'a> {
    let mut last_seqs: HashMap<i64, i64> = HashMap::new();
    let mut results = Vec::with_capacity(items.len());
    let mut rows = Vec::with_capacity(items.len());
    for &item in items {
        let Some(&sender) = users.get(item.sender.as_str()) else {
            results.push(Err(no_such_user(&item.sender)));
            continue;
        };
        if let Some(cid) = &item.client_id {
            if too_long(cid) {
                results.push(Err(ApiError::new(
                    ErrorKind::BadRequest,
                    format!("client_id longer than {MAX_CHARS} characters"),
                )));
                continue;
            }
            match prior.get(&(sender, cid.as_str())) {
                Some((Some(seq), ts)) => {
                    results.push(Ok(Appended {
                        seq: *seq as u64,
                        ts: *ts,
                        duplicate: true,
                    }));
                    continue;
                }
                Some((None, _)) => {
                    results.push(Err(ApiError::new(
                        ErrorKind::BadRequest,
                        "client_id already used for a direct message",
                    )));
                    continue;
                }
                None => {}
            }
        }
        let Some(room) = rooms.get(&item.room) else {
            results.push(Err(no_such_room(&item.room)));
            continue;
        };
        let seq = last_seqs.entry(room.id).or_insert(room.last_seq);
        *seq += 1;
        if let Some(cid) = &item.client_id {
            prior.insert((sender, cid), (Some(*seq), now));
        }
        rows.push((
            room.id,
            *seq,
            sender,
            item.client_id.as_deref(),
            item.body.as_str(),
        ));
        results.push(Ok(Appended {
            seq: *seq as u64,
            ts: now,
            duplicate: false,
        }));
    }
    Assigned {
        results,
        rows,
        last_seqs: last_seqs.into_iter().collect(),
    }
}
