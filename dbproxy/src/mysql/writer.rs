//! Group commit of appends on the primary. Every append request waits on one
//! bounded queue; one task takes everything waiting (up to `batch_max_items`)
//! and stores it in ONE transaction: rooms locked with `SELECT … FOR UPDATE`,
//! seqs assigned in request order, multi-row INSERTs (at most `CHUNK` rows per
//! statement), `UPDATE rooms SET last_seq`, commit, `@@last_gtid`. The row
//! locks keep seq dense and unique with any number of dbproxies writing one
//! room; the UNIQUE keys make the database enforce it.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::topology::Topology;
use super::{db_err, last_gtid, no_such_room, no_such_user};
use crate::api::{ApiError, AppendItem, Appended, ErrorKind};
use crate::error::unavailable;
use crate::metrics::Metrics;
use crate::writer::now_ms;

/// Rows (or IN-list entries) per statement: keeps placeholders well under the
/// 65535 limit and packets small.
pub(crate) const CHUNK: usize = 500;

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
    loop {
        // `biased`: after `stop`, whatever is queued is still committed.
        let first = tokio::select! {
            biased;
            job = rx.recv() => job,
            _ = stop.cancelled() => None,
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
        let started = std::time::Instant::now();
        let all: Vec<&AppendItem> = jobs.iter().flat_map(|j| j.items.iter()).collect();
        let outcome = commit_batch(&topo, &all).await;
        drop(all);
        match outcome {
            Ok((mut results, pos, stored)) => {
                metrics.batch_items.observe(items as f64);
                metrics
                    .commit_duration
                    .observe(started.elapsed().as_secs_f64());
                metrics.messages_stored.inc_by(stored);
                for job in jobs {
                    let rest = results.split_off(job.items.len());
                    let mine = std::mem::replace(&mut results, rest);
                    let _ = job.reply.send(Ok((mine, pos.clone())));
                }
            }
            Err(e) => {
                for job in jobs {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }
    tracing::debug!("mysql append writer stopped");
}

/// Commits the batch, retrying once on a lost race (another dbproxy stored the
/// same (sender, client_id) in between, or a deadlock).
async fn commit_batch(
    topo: &Topology,
    items: &[&AppendItem],
) -> Result<(Results, Option<String>, u64), ApiError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut w = topo.primary().await?;
        let now = now_ms();
        match apply(&mut w.conn, items, now).await {
            Ok((results, stored)) => match w.conn.query_drop("COMMIT").await {
                Ok(()) => {
                    let pos = last_gtid(&mut w.conn).await;
                    return Ok((results, pos, stored));
                }
                Err(e) => return Err(db_err(e)),
            },
            Err(e) => {
                let _ = w.conn.query_drop("ROLLBACK").await;
                let retry =
                    matches!(&e, mysql_async::Error::Server(s) if s.code == 1062 || s.code == 1213);
                if retry && attempt < 3 {
                    tracing::debug!(error = %e, "append batch lost a race; retrying");
                    continue;
                }
                tracing::warn!(error = %e, "append batch failed");
                let err = db_err(e);
                // Nothing was written: callers may retry.
                return Err(if err.kind == ErrorKind::Internal {
                    err
                } else {
                    unavailable(err.message)
                });
            }
        }
    }
}

fn placeholders(n: usize, one: &str) -> String {
    vec![one; n].join(",")
}

/// `SELECT <cols> … WHERE <col> IN (…)` over `keys`, in chunks.
async fn select_in<T: mysql_async::prelude::FromRow + Send + 'static>(
    c: &mut Conn,
    head: &str,
    tail: &str,
    keys: &[&str],
) -> mysql_async::Result<Vec<T>> {
    let mut out = Vec::new();
    for chunk in keys.chunks(CHUNK) {
        let sql = format!("{head} ({}) {tail}", placeholders(chunk.len(), "?"));
        let params: Vec<Value> = chunk.iter().map(|k| Value::from(*k)).collect();
        out.extend(c.exec::<T, _, _>(sql, params).await?);
    }
    Ok(out)
}

struct Room {
    id: i64,
    last_seq: i64,
    changed: bool,
}

/// Everything but the commit; `Ok` leaves the transaction open.
async fn apply(
    c: &mut Conn,
    items: &[&AppendItem],
    now: i64,
) -> mysql_async::Result<(Results, u64)> {
    // READ COMMITTED: the duplicate check below must see rows committed by
    // other dbproxies after our room locks were granted.
    c.query_drop("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
        .await?;
    c.query_drop("START TRANSACTION").await?;
    let senders: Vec<&str> = items
        .iter()
        .map(|i| i.sender.as_str())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let users: HashMap<String, i64> =
        select_in::<(String, i64)>(c, "SELECT name, id FROM users WHERE name IN", "", &senders)
            .await?
            .into_iter()
            .collect();
    let room_names: Vec<&str> = items
        .iter()
        .map(|i| i.room.as_str())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    // Locked in id order by one statement per chunk, so two dbproxies locking
    // overlapping rooms cannot deadlock on them.
    let mut rooms: HashMap<String, Room> = select_in::<(String, i64, i64)>(
        c,
        "SELECT name, id, last_seq FROM rooms WHERE name IN",
        "ORDER BY id FOR UPDATE",
        &room_names,
    )
    .await?
    .into_iter()
    .map(|(name, id, last_seq)| {
        (
            name,
            Room {
                id,
                last_seq,
                changed: false,
            },
        )
    })
    .collect();
    // (sender_id, client_id) → (seq, ts) of what is already stored.
    let keyed: Vec<(i64, &str)> = items
        .iter()
        .filter_map(|i| Some((*users.get(&i.sender)?, i.client_id.as_deref()?)))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut prior: HashMap<(i64, String), (Option<i64>, i64)> = HashMap::new();
    for chunk in keyed.chunks(CHUNK) {
        let sql = format!(
            "SELECT sender_id, client_id, seq, sent_at_ms FROM messages
             WHERE (sender_id, client_id) IN ({})",
            placeholders(chunk.len(), "(?,?)")
        );
        let params: Vec<Value> = chunk
            .iter()
            .flat_map(|(s, cid)| [Value::from(*s), Value::from(*cid)])
            .collect();
        let rows: Vec<(i64, String, Option<i64>, i64)> = c.exec(sql, params).await?;
        for (s, cid, seq, ts) in rows {
            prior.insert((s, cid), (seq, ts));
        }
    }
    let mut results = Vec::with_capacity(items.len());
    let mut rows: Vec<[Value; 6]> = Vec::new();
    for item in items {
        let Some(&sender) = users.get(&item.sender) else {
            results.push(Err(no_such_user(&item.sender)));
            continue;
        };
        if let Some(cid) = &item.client_id {
            match prior.get(&(sender, cid.clone())) {
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
        let Some(room) = rooms.get_mut(&item.room) else {
            results.push(Err(no_such_room(&item.room)));
            continue;
        };
        room.last_seq += 1;
        room.changed = true;
        if let Some(cid) = &item.client_id {
            // A retry inside the same batch is a duplicate of the first copy.
            prior.insert((sender, cid.clone()), (Some(room.last_seq), now));
        }
        rows.push([
            Value::from(room.id),
            Value::from(room.last_seq),
            Value::from(sender),
            Value::from(item.client_id.as_deref()),
            Value::from(now),
            Value::from(item.body.as_str()),
        ]);
        results.push(Ok(Appended {
            seq: room.last_seq as u64,
            ts: now,
            duplicate: false,
        }));
    }
    let stored = rows.len() as u64;
    for chunk in rows.chunks(CHUNK) {
        let sql = format!(
            "INSERT INTO messages (room_id, seq, sender_id, client_id, sent_at_ms, body) VALUES {}",
            placeholders(chunk.len(), "(?,?,?,?,?,?)")
        );
        let params: Vec<Value> = chunk.iter().flat_map(|r| r.iter().cloned()).collect();
        c.exec_drop(sql, params).await?;
    }
    let updates: Vec<(i64, i64)> = rooms
        .values()
        .filter(|r| r.changed)
        .map(|r| (r.last_seq, r.id))
        .collect();
    if !updates.is_empty() {
        c.exec_batch("UPDATE rooms SET last_seq = ? WHERE id = ?", updates)
            .await?;
    }
    Ok((results, stored))
}
