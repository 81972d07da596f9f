//! A live room: the set of present members and the task that orders the room's
//! messages. One batch per room is in flight at a time, so fan-out follows
//! the seq order storage assigned.
//!
//! Session → `Room::publish` (bounded queue) → batch → dbproxy append (one
//! commit) → fan-out of each new message, encoded once → `OK MSG` to the sender.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use chat_dbproxy::api::{AppendItem, ErrorKind};
use chat_protocol::{ErrorCode, ServerLine};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use crate::hub::Hub;
use crate::outbound::SessionHandle;
use crate::session::storage_error;

pub struct Publish {
    pub session: SessionHandle,
    pub cid: Option<String>,
    pub text: String,
    pub received: Instant,
    /// Returned when the message is answered: bounds a session's in-flight work.
    pub permit: OwnedSemaphorePermit,
}

/// What a room's task shares with the `Room` handle: its name and who is
/// present. The task does not hold the queue's sender, so once the hub drops a
/// room (nobody present) the task stores and answers what is queued, then ends.
pub struct RoomCore {
    pub name: String,
    pub(crate) members: Mutex<HashSet<Arc<str>>>,
}

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
            members: Mutex::new(HashSet::new()),
        });
        let task_core = core.clone();
        hub.tasks.clone().spawn(async move {
            publish_loop(hub, task_core, rx).await;
        });
        Arc::new(Room { core, tx })
    }

    /// Waits while the room's queue is full (backpressure on the sender's reads).
    pub async fn publish(&self, p: Publish) {
        if let Err(mpsc::error::SendError(p)) = self.tx.send(p).await {
            let line = ServerLine::err(
                ErrorCode::Unavailable,
                with_cid(&p.cid, "server is shutting down, retry"),
            );
            p.session.line(line.to_bytes());
        }
    }
}

impl RoomCore {
    pub(crate) fn add_member(&self, user: Arc<str>) -> bool {
        self.members.lock().expect("members lock").insert(user)
    }

    pub(crate) fn remove_member(&self, user: &str) -> bool {
        self.members.lock().expect("members lock").remove(user)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.members.lock().expect("members lock").is_empty()
    }

    pub fn has_member(&self, user: &str) -> bool {
        self.members.lock().expect("members lock").contains(user)
    }
}

pub fn with_cid(cid: &Option<String>, detail: &str) -> String {
    match cid {
        Some(c) => format!("id={c} {detail}"),
        None => detail.to_string(),
    }
}

async fn publish_loop(hub: Arc<Hub>, room: Arc<RoomCore>, mut rx: mpsc::Receiver<Publish>) {
    let max = hub.config.room_batch_max;
    let mut batch = Vec::with_capacity(max);
    loop {
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
        commit_and_fan_out(&hub, &room, &mut batch).await;
    }
}

async fn commit_and_fan_out(hub: &Hub, room: &RoomCore, batch: &mut Vec<Publish>) {
    let items = batch
        .iter()
        .map(|p| AppendItem {
            room: room.name.clone(),
            sender: p.session.user.to_string(),
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
    match result {
        Ok(resp) if resp.results.len() == batch.len() => {
            for (p, r) in batch.drain(..).zip(resp.results) {
                p.session.wrote(resp.pos.clone());
                let reply = match r {
                    Ok(a) => {
                        if !a.duplicate {
                            hub.metrics.messages_total.inc();
                            let line = ServerLine::Msg {
                                room: room.name.clone(),
                                seq: a.seq,
                                ts: a.ts,
                                sender: p.session.user.to_string(),
                                text: p.text,
                            };
                            hub.broadcast(
                                room,
                                line.to_bytes(),
                                Some(p.session.id),
                                resp.pos.as_ref(),
                            );
                        }
                        ServerLine::OkMsg {
                            room: room.name.clone(),
                            seq: a.seq,
                            ts: a.ts,
                            cid: p.cid,
                        }
                    }
                    Err(e) => storage_error(&hub.metrics, &e, &p.cid),
                };
                if matches!(reply, ServerLine::OkMsg { .. }) {
                    hub.metrics
                        .ack_latency
                        .observe(p.received.elapsed().as_secs_f64());
                }
                p.session.line(reply.to_bytes());
                drop(p.permit);
            }
        }
        other => {
            let err = match other {
                Err(e) => e,
                Ok(_) => chat_dbproxy::api::ApiError::new(
                    ErrorKind::Internal,
                    "storage answered a different number of results",
                ),
            };
            for p in batch.drain(..) {
                let reply = storage_error(&hub.metrics, &err, &p.cid);
                p.session.line(reply.to_bytes());
            }
        }
    }
}
