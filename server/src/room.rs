//! Rooms on one chat server, in two roles.
//!
//! - [`LocalRoom`]: the room as this server's clients see it: who is present
//!   here, and which server owns the room (where presence is announced and
//!   messages are sent). Exists while someone here is present.
//! - [`Room`]: the room this server owns (the hash ring puts the room's name
//!   here): every server with present members (`subs`) and the task that
//!   orders the room's messages. One append batch per room is in flight at a
//!   time, so fan-out follows the seq order storage assigned, and each batch
//!   goes to each destination server as one frame.
//!
//! Publisher → [`Room::publish`] (bounded queue) → batch → dbproxy append (one
//! commit) → fan-out (local members directly; every other server with members
//! in one `Deliver` frame) → `OK MSG` to each sender, local or through its
//! server.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use chat_protocol::ServerLine;
use chat_storage_api::{ApiError, Appended, ErrorKind};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use crate::cluster::wire::PeerMsg;
use crate::cluster::NodeId;
use crate::hub::Hub;
use crate::outbound::SessionHandle;
use crate::session::storage_error;

/// Where a message came from, and so where its answer goes.
pub enum Origin {
    /// A session of this server; the permit bounds its in-flight work.
    Local {
        session: SessionHandle,
        permit: OwnedSemaphorePermit,
    },
    /// A session on another server, which forwarded it as request `req`.
    Peer {
        node: NodeId,
        req: u64,
        session: u64,
        /// The connection the request came on, for the answer when this
        /// server's own link to that server is not up.
        reply: mpsc::Sender<PeerMsg>,
    },
}

pub struct Publish {
    pub origin: Origin,
    pub room: String,
    pub sender: Arc<str>,
    pub cid: Option<String>,
    pub text: String,
    pub received: Instant,
}

impl Publish {
    /// The sending session: which server it is on and its id there.
    fn source(&self, me: &NodeId) -> (NodeId, u64) {
        match &self.origin {
            Origin::Local { session, .. } => (me.clone(), session.id),
            Origin::Peer { node, session, .. } => (node.clone(), *session),
        }
    }

    /// Answers the sender: its own session, or its server over the link.
    pub(crate) fn answer(self, hub: &Hub, result: Result<Appended, ApiError>, pos: Option<String>) {
        match self.origin {
            Origin::Local { session, permit } => {
                session.wrote(pos);
                let reply = match result {
                    Ok(a) => {
                        hub.metrics
                            .ack_latency
                            .observe(self.received.elapsed().as_secs_f64());
                        ServerLine::OkMsg {
                            room: self.room,
                            seq: a.seq,
                            ts: a.ts,
                            cid: self.cid,
                        }
                    }
                    Err(e) => storage_error(&hub.metrics, &e, &self.cid),
                };
                session.line(reply.to_bytes());
                drop(permit);
            }
            Origin::Peer {
                node, req, reply, ..
            } => {
                // On this server's own link to the sender's server, behind the
                // room's deliveries to it: the sender's other sessions and its
                // neighbours see `MSG … n` before its `OK MSG … n`. When that
                // link is down (the other server just restarted), back on the
                // connection the request came on.
                let msg = PeerMsg::Published { req, result, pos };
                if let Err(msg) = hub.cluster.try_send(&node, msg) {
                    let _ = reply.try_send(msg);
                }
            }
        }
    }
}

/// A room as this server's clients see it.
pub struct LocalRoom {
    pub name: String,
    pub(crate) members: Mutex<HashSet<Arc<str>>>,
    /// The server this room's presence was announced to.
    pub(crate) owner: Mutex<NodeId>,
}

impl LocalRoom {
    pub(crate) fn new(name: &str, owner: NodeId) -> LocalRoom {
        LocalRoom {
            name: name.to_string(),
            members: Mutex::new(HashSet::new()),
            owner: Mutex::new(owner),
        }
    }

    pub fn has_member(&self, user: &str) -> bool {
        self.members.lock().expect("members lock").contains(user)
    }

    pub(crate) fn member_names(&self) -> Vec<String> {
        let members = self.members.lock().expect("members lock");
        members.iter().map(|u| u.to_string()).collect()
    }

    pub(crate) fn owner(&self) -> NodeId {
        self.owner.lock().expect("owner lock").clone()
    }
}

/// What an owned room's task shares with its handle: the name and the
/// servers with present members. The task does not hold the queue's sender,
/// so once the hub drops a room (nobody present anywhere) the task stores and
/// answers what is queued, then ends.
pub struct RoomCore {
    pub name: String,
    pub(crate) subs: Mutex<HashMap<NodeId, HashSet<Arc<str>>>>,
}

impl RoomCore {
    pub(crate) fn is_empty(&self) -> bool {
        self.subs
            .lock()
            .expect("subs lock")
            .values()
            .all(HashSet::is_empty)
    }

    /// Everyone present, on every server, sorted.
    pub(crate) fn present(&self) -> Vec<String> {
        let subs = self.subs.lock().expect("subs lock");
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

    pub(crate) fn destinations(&self) -> Vec<NodeId> {
        let subs = self.subs.lock().expect("subs lock");
        subs.iter()
            .filter(|(_, users)| !users.is_empty())
            .map(|(n, _)| n.clone())
            .collect()
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
    pub(crate) fn start(hub: Arc<Hub>, name: String) -> Arc<Room> {
        let (tx, rx) = mpsc::channel(hub.config.room_queue);
        let core = Arc::new(RoomCore {
            name,
            subs: Mutex::new(HashMap::new()),
        });
        let task_core = core.clone();
        hub.tasks.clone().spawn(async move {
            publish_loop(hub, task_core, rx).await;
        });
        Arc::new(Room { core, tx })
    }

    /// Waits while the room's queue is full (backpressure on the sender's reads).
    pub async fn publish(&self, hub: &Hub, p: Publish) {
        if let Err(mpsc::error::SendError(p)) = self.tx.send(p).await {
            let e = ApiError::new(ErrorKind::Unavailable, "server is shutting down");
            p.answer(hub, Err(e), None);
        }
    }
}

pub fn with_cid(cid: &Option<String>, detail: &str) -> String {
    match cid {
        Some(c) => format!("id={c} {detail}"),
        None => detail.to_string(),
    }
}

/// Answers a message that cannot reach its room's owner.
pub(crate) fn refuse(hub: &Hub, p: Publish, why: &str) {
    let e = ApiError::new(ErrorKind::Unavailable, why);
    p.answer(hub, Err(e), None);
}

async fn publish_loop(hub: Arc<Hub>, room: Arc<RoomCore>, mut rx: mpsc::Receiver<Publish>) {
    let max = hub.config.room_batch_max;
    loop {
        // A fresh, right-sized batch each time: an idle room keeps none.
        let mut batch = Vec::new();
        let first = tokio::select! {
            p = rx.recv() => p,
            // On shutdown, stop taking new work once the queue is empty.
            _ = hub.shutdown.cancelled(), if rx.is_empty() => None,
        };
        let Some(first) = first else { break };
        batch.push(first);
        while batch.len() < max {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        // Boxed: the commit's state exists only while a batch is in flight,
        // so an idle room's task stays small.
        Box::pin(commit_and_fan_out(&hub, &room, &mut batch)).await;
    }
}

/// One line of a fan-out: the encoded line and the session (server, id) that
/// must not receive it.
pub(crate) struct Outgoing {
    pub line: Bytes,
    pub except: Option<(NodeId, u64)>,
}

async fn commit_and_fan_out(hub: &Hub, room: &RoomCore, batch: &mut Vec<Publish>) {
    let items = batch
        .iter()
        .map(|p| chat_storage_api::AppendItem {
            room: room.name.clone(),
            sender: p.sender.to_string(),
            client_id: p.cid.clone(),
            body: p.text.clone(),
        })
        .collect();
    let started = Instant::now();
    let result = hub.db.append(items).await;
    hub.metrics
        .storage_latency
        .with_label_values(&["append"])
        .observe(started.elapsed().as_secs_f64());
    let me = hub.cluster.me.clone();
    match result {
        Ok(resp) if resp.results.len() == batch.len() => {
            let mut lines = Vec::new();
            for (p, r) in batch.iter().zip(&resp.results) {
                if let Ok(a) = r {
                    if !a.duplicate {
                        hub.metrics.messages_total.inc();
                        let line = ServerLine::Msg {
                            room: room.name.clone(),
                            seq: a.seq,
                            ts: a.ts,
                            sender: p.sender.to_string(),
                            text: p.text.clone(),
                        };
                        lines.push(Outgoing {
                            line: line.to_bytes(),
                            except: Some(p.source(&me)),
                        });
                    }
                }
            }
            // Members first, then the senders' answers.
            hub.fan_out(room, &lines, resp.pos.as_ref());
            for (p, r) in batch.drain(..).zip(resp.results) {
                p.answer(hub, r, resp.pos.clone());
            }
        }
        other => {
            let err = match other {
                Err(e) => e,
                Ok(_) => ApiError::new(
                    ErrorKind::Internal,
                    "storage answered a different number of results",
                ),
            };
            for p in batch.drain(..) {
                p.answer(hub, Err(err.clone()), None);
            }
        }
    }
}
