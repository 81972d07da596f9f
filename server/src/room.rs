//! A room this server owns (the hash ring puts the room's name here): every
//! server with present members (`subs`) and the task that orders the room's
//! messages. One append batch per room is in flight at a time, so fan-out
//! follows the seq order storage assigned, and each batch goes to each
//! destination server as one frame.
//!
//! Publisher → [`Room::publish`] (bounded queue) → batch → dbproxy append (one
//! commit) → fan-out through the [`Fanout`] sink (local members directly;
//! every other server with members in one `Deliver` frame) → each sender's
//! [`Answer`], which tells its session or its server.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use chat_protocol::ServerLine;
use chat_storage_api::{ApiError, AppendItem, Appended, ErrorKind};
use chat_storage_client::DbClient;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::wire::NodeId;
use crate::metrics::Metrics;
use crate::reply::Failed;
use chat_admin::sync::lock;

/// What a message's sender hears: stored (its seq) or why not, and the
/// storage position of the write.
pub struct Answered {
    pub room: String,
    pub cid: Option<String>,
    pub result: Result<Appended, Failed>,
    pub pos: Option<String>,
}

/// Tells a message's sender how it went: its session on this server, or
/// its server over the link. Called once.
pub type Answer = Box<dyn FnOnce(Answered) + Send>;

pub struct Publish {
    pub room: String,
    pub sender: Arc<str>,
    pub cid: Option<String>,
    pub text: String,
    /// The sending session: its server and its id there (it does not
    /// receive its own line).
    pub from: (NodeId, u64),
    pub answer: Answer,
}

impl Publish {
    pub fn answer(self, result: Result<Appended, Failed>, pos: Option<String>) {
        (self.answer)(Answered {
            room: self.room,
            cid: self.cid,
            result,
            pos,
        });
    }
}

/// One line of a fan-out: the encoded line and the session (server, id) that
/// must not receive it.
pub struct Outgoing {
    pub line: Bytes,
    pub except: Option<(NodeId, u64)>,
}

/// Where an owned room's lines go: to every server with present members.
pub trait Fanout: Send + Sync {
    /// `pos`: the storage position of the write the lines report.
    fn fan_out(&self, room: &RoomCore, lines: &[Outgoing], pos: Option<&String>);
}

/// What every owned room's task works with.
pub struct RoomCtx {
    pub db: DbClient,
    pub metrics: Metrics,
    pub fanout: Arc<dyn Fanout>,
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
    /// Pending publishes per room before senders wait.
    pub queue: usize,
    /// Most messages sent to storage in one batch.
    pub batch_max: usize,
}

/// What an owned room's task shares with its handle: the name and the
/// servers with present members. The task does not hold the queue's sender,
/// so once the room is dropped (nobody present anywhere) the task stores and
/// answers what is queued, then ends.
pub struct RoomCore {
    pub name: String,
    subs: Mutex<HashMap<NodeId, HashSet<Arc<str>>>>,
}

impl RoomCore {
    pub fn is_empty(&self) -> bool {
        lock(&self.subs).values().all(HashSet::is_empty)
    }

    /// Everyone present, on every server, sorted.
    pub fn present(&self) -> Vec<String> {
        let subs = lock(&self.subs);
        let mut v: Vec<String> = subs
            .values()
            .flatten()
            .map(|u| u.to_string())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        v.sort();
        v
    }

    pub fn destinations(&self) -> Vec<NodeId> {
        let subs = lock(&self.subs);
        subs.iter()
            .filter(|(_, users)| !users.is_empty())
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// `users` on `node` are present; returns those who were not before.
    pub fn enter(&self, node: &NodeId, users: Vec<String>) -> Vec<String> {
        let mut subs = lock(&self.subs);
        let here = subs.entry(node.clone()).or_default();
        users
            .into_iter()
            .filter(|u| here.insert(Arc::from(u.as_str())))
            .collect()
    }

    /// `user` on `node` left; false if they were not present.
    pub fn leave(&self, node: &NodeId, user: &str) -> bool {
        lock(&self.subs)
            .get_mut(node)
            .is_some_and(|s| s.remove(user))
    }

    /// Forgets everyone on `node`; returns who was present there.
    pub fn drop_node(&self, node: &NodeId) -> HashSet<Arc<str>> {
        lock(&self.subs).remove(node).unwrap_or_default()
    }
}

/// A room this server owns.
pub struct Room {
    core: Arc<RoomCore>,
    tx: mpsc::Sender<Publish>,
}

impl std::ops::Deref for Room {
    type Target = RoomCore;

    fn deref(&self) -> &RoomCore {
        &self.core
    }
}

impl Room {
    pub fn start(ctx: Arc<RoomCtx>, name: String) -> Arc<Room> {
        let (tx, rx) = mpsc::channel(ctx.queue);
        let core = Arc::new(RoomCore {
            name,
            subs: Mutex::new(HashMap::new()),
        });
        let task_core = core.clone();
        ctx.tasks.clone().spawn(publish_loop(ctx, task_core, rx));
        Arc::new(Room { core, tx })
    }

    /// Waits while the room's queue is full (backpressure on the sender's reads).
    pub async fn publish(&self, p: Publish) {
        if let Err(mpsc::error::SendError(p)) = self.tx.send(p).await {
            // The task ended: the server is shutting down.
            p.answer(Err(Failed::unavailable()), None);
        }
    }
}

async fn publish_loop(ctx: Arc<RoomCtx>, room: Arc<RoomCore>, mut rx: mpsc::Receiver<Publish>) {
    loop {
        // A fresh, right-sized batch each time: an idle room keeps none.
        let mut batch = Vec::new();
        let first = tokio::select! {
            p = rx.recv() => p,
            // On shutdown, stop taking new work once the queue is empty.
            _ = ctx.shutdown.cancelled(), if rx.is_empty() => None,
        };
        let Some(first) = first else { break };
        batch.push(first);
        while batch.len() < ctx.batch_max {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        // Boxed: the commit's state exists only while a batch is in flight,
        // so an idle room's task stays small.
        Box::pin(commit_and_fan_out(&ctx, &room, &mut batch)).await;
    }
}

async fn commit_and_fan_out(ctx: &RoomCtx, room: &RoomCore, batch: &mut Vec<Publish>) {
    let items = batch
        .iter()
        .map(|p| AppendItem {
            room: room.name.clone(),
            sender: p.sender.to_string(),
            client_id: p.cid.clone(),
            body: p.text.clone(),
        })
        .collect();
    let started = Instant::now();
    let result = ctx.db.append(items).await;
    ctx.metrics
        .storage_latency
        .with_label_values(&["append"])
        .observe(started.elapsed().as_secs_f64());
    let resp = match result {
        Ok(resp) if resp.results.len() == batch.len() => resp,
        other => {
            let err = match other {
                Err(e) => e,
                Ok(_) => ApiError::new(
                    ErrorKind::Internal,
                    "storage answered a different number of results",
                ),
            };
            let failed = Failed::storage(&err);
            for p in batch.drain(..) {
                p.answer(Err(failed.clone()), None);
            }
            return;
        }
    };
    let mut lines = Vec::new();
    for (p, r) in batch.iter().zip(&resp.results) {
        let Ok(a) = r else { continue };
        if a.duplicate {
            continue;
        }
        ctx.metrics.messages_total.inc();
        let line = ServerLine::Msg {
            room: room.name.clone(),
            seq: a.seq,
            ts: a.ts,
            sender: p.sender.to_string(),
            text: p.text.clone(),
        };
        lines.push(Outgoing {
            line: line.to_bytes(),
            except: Some(p.from.clone()),
        });
    }
    // Members first, then the senders' answers.
    ctx.fanout.fan_out(room, &lines, resp.pos.as_ref());
    for (p, r) in batch.drain(..).zip(resp.results) {
        p.answer(r.map_err(|e| Failed::storage(&e)), resp.pos.clone());
    }
}
