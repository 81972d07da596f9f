//! The other chat servers: membership, the hash ring over the reachable ones,
//! and one long-lived link to each.
//!
//! Every server dials every peer it knows (static `peers`, or a DNS name:
//! `members.rs`) and keeps that link up (`link.rs`). A peer is in this
//! server's ring while its link is up and it has not announced that it is
//! draining; the ring decides which server owns a room (`ring.pick(room)`)
//! and which is a user's hash owner (`ring.pick(user)`: the proxies'
//! placement, before bounded loads). Each ring change is published on a
//! watch channel and reported to the [`Handler`], which moves its rooms'
//! presence to their new owners.
//!
//! This module is the transport: it knows frames and servers, never rooms
//! or sessions. What peers say about rooms, users and DMs goes to the
//! [`Handler`] the caller passes in (the node); answers to forwarded
//! messages go to the completion each request carries (`requests.rs`).
//!
//! Frames to a peer go through a bounded queue per link. Fan-out never waits:
//! a peer whose queue is full is disconnected, and resynchronises when it
//! reconnects (its clients see a gap and use `HISTORY`). A message forwarded
//! to a room's owner waits for room in the queue, then for the answer, at
//! most `request_timeout_ms`; when the link drops first the client gets
//! `ERR UNAVAILABLE` and resends with its id (the store deduplicates).

pub mod link;
pub mod members;
pub mod requests;
pub mod wire;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use chat_ring::Ring;
use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::ClusterConfig;
use crate::metrics::Metrics;
use chat_admin::sync::lock;
use requests::{Done, Requests};
pub use wire::NodeId;
use wire::{Forwarded, PeerMsg, Published};

/// A frame waiting for a link's writer, with when its fan-out started.
pub struct Queued {
    pub msg: PeerMsg,
    pub fanout_started: Option<Instant>,
}

/// The connection a peer's request came on, for answers that go back on it.
pub type Reply = mpsc::Sender<PeerMsg>;

/// What the links hand to the rest of the server: the frames peers send
/// about rooms, users and DMs, and the changes of the cluster. The link
/// layer handles heartbeats, draining and the answers to its own requests
/// itself.
pub trait Handler: Send + Sync + 'static {
    /// A message `from` forwarded to this server as its room's owner;
    /// resolves once the room took it (waiting while the room's queue is
    /// full: backpressure on the link). Its answer goes through
    /// [`Cluster::answer`].
    fn publish(&self, from: &NodeId, msg: Forwarded, reply: Reply) -> BoxFuture<'_, ()>;
    /// Any other frame a peer sent on the link it opened; false closes it.
    fn frame(&self, from: &NodeId, msg: PeerMsg, reply: &Reply) -> bool;
    /// `node` opened its link to this server (after a restart it owns
    /// nothing of ours).
    fn linked(&self, node: &NodeId);
    /// This server's link to `node` went down.
    fn lost(&self, node: &NodeId);
    /// The ring changed: rooms and users may have new owners.
    fn ring_changed(&self);
}

struct Peer {
    /// The link's queue while it is up.
    tx: Option<mpsc::Sender<Queued>>,
    /// Cancels the current connection (a full queue, a timeout).
    conn: CancellationToken,
    /// Stops dialling the peer (it left the membership).
    stop: CancellationToken,
    draining: bool,
}

pub struct Cluster {
    pub me: NodeId,
    pub config: ClusterConfig,
    metrics: Metrics,
    peers: Mutex<HashMap<NodeId, Peer>>,
    ring: watch::Sender<Arc<Ring>>,
    requests: Requests,
    /// Set with `tls`: links are dialled over mutual TLS.
    connector: Option<chat_tls::Connector>,
    /// This server is draining: it is no longer in its own ring either.
    leaving: AtomicBool,
    /// Closes every link. Cancelled after the client sessions have drained,
    /// so their last messages still reach (and hear from) the rooms' owners.
    stop: CancellationToken,
    /// Refused PEER handshakes are logged through this (at most one line a second).
    refusals: chat_admin::throttle::LogThrottle,
}

impl Cluster {
    pub fn new(
        me: String,
        config: ClusterConfig,
        metrics: Metrics,
        connector: Option<chat_tls::Connector>,
        stop: CancellationToken,
    ) -> Arc<Cluster> {
        let ring = Ring::with_vnodes(&[(me.clone(), 1)], config.vnodes);
        Arc::new(Cluster {
            me: Arc::from(me),
            config,
            metrics,
            peers: Mutex::new(HashMap::new()),
            ring: watch::Sender::new(Arc::new(ring)),
            requests: Requests::default(),
            connector,
            leaving: AtomicBool::new(false),
            stop,
            refusals: Default::default(),
        })
    }

    /// Cancelled when the links must close.
    pub fn stopped(&self) -> &CancellationToken {
        &self.stop
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, Peer>> {
        lock(&self.peers)
    }

    pub fn ring(&self) -> Arc<Ring> {
        self.ring.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Ring>> {
        self.ring.subscribe()
    }

    /// The server that owns `key` (a room or a user name) on the current ring.
    pub fn owner_of(&self, key: &str) -> NodeId {
        let ring = self.ring.borrow();
        match ring.pick(key.as_bytes()) {
            Some(id) if *id != *self.me => Arc::from(id),
            _ => self.me.clone(),
        }
    }

    /// Rebuilds the ring from the peers whose link is up and that are not
    /// draining; publishes it if it changed.
    fn rebuild(&self, peers: &HashMap<NodeId, Peer>) {
        let mut nodes = Vec::new();
        if !self.leaving.load(Ordering::Relaxed) {
            nodes.push((self.me.to_string(), 1));
        }
        nodes.extend(
            peers
                .iter()
                .filter(|(_, p)| p.tx.is_some() && !p.draining)
                .map(|(id, _)| (id.to_string(), 1)),
        );
        let others = nodes.iter().filter(|(id, _)| **id != *self.me).count();
        self.metrics.peers_in_ring.set(others as i64);
        let same = {
            let cur = self.ring.borrow();
            cur.len() == nodes.len() && nodes.iter().all(|(id, _)| cur.contains(id))
        };
        if !same {
            tracing::info!(servers = nodes.len(), "cluster ring changed");
            let ring = Ring::with_vnodes(&nodes, self.config.vnodes);
            self.ring.send_replace(Arc::new(ring));
        }
    }

    /// Replaces the membership: `dial` starts dialling each new peer until
    /// its token is cancelled; removed peers are no longer dialled.
    pub fn set_members(&self, list: &[String], mut dial: impl FnMut(NodeId, CancellationToken)) {
        let mut peers = self.peers();
        let before = peers.len();
        peers.retain(|id, p| {
            let keep = list.iter().any(|l| **l == **id);
            if !keep {
                tracing::info!(peer = %id, "chat server left the membership");
                p.stop.cancel();
            }
            keep
        });
        let mut changed = peers.len() != before;
        for id in list {
            if **id == *self.me || peers.contains_key(id.as_str()) {
                continue;
            }
            let node: NodeId = Arc::from(id.as_str());
            let stop = self.stop.child_token();
            peers.insert(
                node.clone(),
                Peer {
                    tx: None,
                    conn: CancellationToken::new(),
                    stop: stop.clone(),
                    draining: false,
                },
            );
            self.metrics
                .peer_link_drops_total
                .with_label_values(&[id.as_str()]);
            dial(node, stop);
            changed = true;
        }
        if changed {
            self.rebuild(&peers);
        }
    }

    /// A link to `node` is up: frames go to `tx` until `conn` is cancelled.
    fn link_up(&self, node: &NodeId, tx: mpsc::Sender<Queued>, conn: CancellationToken) {
        let mut peers = self.peers();
        if let Some(p) = peers.get_mut(node) {
            p.tx = Some(tx);
            p.conn = conn;
            p.draining = false;
            tracing::info!(peer = %node, "link to chat server up");
            self.rebuild(&peers);
        }
    }

    /// The link to `node` dropped: out of the ring, and what waited on it fails.
    fn link_down(&self, node: &NodeId) {
        {
            let mut peers = self.peers();
            if let Some(p) = peers.get_mut(node) {
                if p.tx.take().is_some() {
                    tracing::warn!(peer = %node, "link to chat server down");
                    self.metrics
                        .peer_link_drops_total
                        .with_label_values(&[node.as_ref()])
                        .inc();
                }
                self.rebuild(&peers);
            }
        }
        self.metrics
            .peer_queue_depth
            .with_label_values(&[node.as_ref()])
            .set(0);
        self.requests.fail_node(node);
    }

    /// `node` announced it is draining: take it out of the ring now.
    fn peer_draining(&self, node: &NodeId) {
        let mut peers = self.peers();
        if let Some(p) = peers.get_mut(node) {
            p.draining = true;
            tracing::info!(peer = %node, "chat server draining");
            self.rebuild(&peers);
        }
    }

    /// Takes this server out of its own ring (it is draining): rooms it owned
    /// move to the next server, like on every other server.
    pub fn leave_ring(&self) {
        self.leaving.store(true, Ordering::Relaxed);
        let peers = self.peers();
        self.rebuild(&peers);
    }

    /// Tells every peer this server is draining.
    pub fn announce_draining(&self) {
        let ids: Vec<NodeId> = self.peers().keys().cloned().collect();
        for id in ids {
            self.send(&id, PeerMsg::Draining);
        }
    }

    fn queue(&self, node: &str) -> Option<(mpsc::Sender<Queued>, CancellationToken)> {
        let peers = self.peers();
        let p = peers.get(node)?;
        Some((p.tx.clone()?, p.conn.clone()))
    }

    /// Queues a frame for `node` without waiting. A full queue drops the link
    /// (the peer resynchronises when it is back); false if not queued.
    pub fn send(&self, node: &str, msg: PeerMsg) -> bool {
        self.try_queue(node, msg, None).is_ok()
    }

    /// [`Cluster::send`] for a fan-out started at `started` (its latency is
    /// observed when the frame is written).
    pub fn send_timed(&self, node: &str, msg: PeerMsg, started: Instant) -> bool {
        self.try_queue(node, msg, Some(started)).is_ok()
    }

    /// Queues without waiting; gives the frame back when the link is not up
    /// or its queue is full (which drops the link).
    fn try_queue(
        &self,
        node: &str,
        msg: PeerMsg,
        fanout_started: Option<Instant>,
    ) -> Result<(), PeerMsg> {
        let Some((tx, conn)) = self.queue(node) else {
            return Err(msg);
        };
        let q = Queued {
            msg,
            fanout_started,
        };
        match tx.try_send(q) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(q)) => {
                tracing::warn!(peer = %node, "link queue full; dropping the link");
                conn.cancel();
                Err(q.msg)
            }
            Err(mpsc::error::TrySendError::Closed(q)) => Err(q.msg),
        }
    }

    /// Answers a message `node` forwarded as request `req`: on this
    /// server's own link to `node`, behind the room's deliveries to it, so
    /// the sender's other sessions and its neighbours see `MSG … n` before
    /// its `OK MSG … n`. When that link is down (the other server just
    /// restarted), back on the connection the request came on.
    pub fn answer(&self, node: &NodeId, req: u64, answer: Published, reply: &Reply) {
        let msg = PeerMsg::Published {
            req,
            result: answer.result,
            pos: answer.pos,
        };
        if let Err(msg) = self.try_queue(node, msg, None) {
            let _ = reply.try_send(msg);
        }
    }

    /// Forwards a local client's message to the room's owner. The answer
    /// arrives as [`PeerMsg::Published`] on the owner's link to this server
    /// and goes to `done`, as does the news that none will come. Gives
    /// `done` back when the message could not be sent.
    pub async fn forward(&self, node: &NodeId, mut msg: Forwarded, done: Done) -> Result<(), Done> {
        let Some((tx, conn)) = self.queue(node) else {
            return Err(done);
        };
        let req = self.requests.publish(node, done);
        msg.req = req;
        let q = Queued {
            msg: PeerMsg::Publish(msg),
            fanout_started: None,
        };
        let patience = self.config.peer_timeout();
        match tokio::time::timeout(patience, tx.send(q)).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(_)) => {}
            Err(_) => {
                tracing::warn!(peer = %node, "link queue stayed full; dropping the link");
                conn.cancel();
            }
        }
        // `None`: answered or failed meanwhile.
        self.requests.take_publish(req).map_or(Ok(()), Err)
    }

    /// Asks `node` who is present in `room`; `None` without an answer.
    pub async fn who(&self, node: &NodeId, room: &str) -> Option<Vec<String>> {
        let (req, rx) = self.requests.who(node);
        let msg = PeerMsg::Who {
            req,
            room: room.to_string(),
        };
        if !self.send(node, msg) {
            self.requests.forget(req);
            return None;
        }
        let patience = self.config.request_timeout();
        let answer = tokio::time::timeout(patience, rx).await;
        self.requests.forget(req);
        answer.ok()?.ok()
    }

    /// Answers requests that waited longer than `request_timeout_ms`.
    fn expire_requests(&self) {
        let limit = self.config.request_timeout();
        self.requests.expire(limit);
    }

    /// Updates the queue-depth gauges.
    fn observe_queues(&self) {
        let peers = self.peers();
        for (id, p) in peers.iter() {
            let depth =
                p.tx.as_ref()
                    .map_or(0, |tx| tx.max_capacity() - tx.capacity());
            self.metrics
                .peer_queue_depth
                .with_label_values(&[id.as_ref()])
                .set(depth as i64);
        }
    }
}

/// A random cluster secret (for a stack started in one process).
pub fn new_secret() -> String {
    let bytes: [u8; 16] = rand::random();
    hex::encode(bytes)
}
