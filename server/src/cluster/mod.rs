//! The other chat servers: membership, the hash ring over the reachable ones,
//! and one long-lived link to each.
//!
//! Every server dials every peer it knows (static `peers`, or a DNS name) and
//! keeps that link up ([`link::dial_loop`]). A peer is in this server's ring
//! while its link is up and it has not announced that it is draining; the
//! ring decides which server owns a room (`ring.pick(room)`) and which is a
//! user's hash owner (`ring.pick(user)`: the proxies' placement, before
//! bounded loads). Each ring change is published on a watch channel; the hub
//! then moves its rooms' presence to their new owners ([`Hub::resync`]).
//!
//! Frames to a peer go through a bounded queue per link. Fan-out never waits:
//! a peer whose queue is full is disconnected, and resynchronises when it
//! reconnects (its clients see a gap and use `HISTORY`). A message forwarded
//! to a room's owner waits for room in the queue, then for the answer, at
//! most `request_timeout_ms`; when the link drops first the client gets
//! `ERR UNAVAILABLE` and resends with its id (the store deduplicates).

pub mod link;
pub mod wire;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chat_ring::Ring;
use chat_storage_api::{ApiError, Appended, ErrorKind};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::config::ClusterConfig;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::room::{Origin, Publish};
use wire::PeerMsg;

/// A server's id: its client address as the proxies list it.
pub type NodeId = Arc<str>;

/// A frame waiting for a link's writer, with when its fan-out started.
pub struct Queued {
    pub msg: PeerMsg,
    pub fanout_started: Option<Instant>,
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

enum Pending {
    Publish {
        node: NodeId,
        at: Instant,
        p: Publish,
    },
    Who {
        node: NodeId,
        at: Instant,
        tx: oneshot::Sender<Vec<String>>,
    },
}

impl Pending {
    fn node(&self) -> &NodeId {
        match self {
            Pending::Publish { node, .. } | Pending::Who { node, .. } => node,
        }
    }

    fn at(&self) -> Instant {
        match self {
            Pending::Publish { at, .. } | Pending::Who { at, .. } => *at,
        }
    }
}

pub struct Cluster {
    pub me: NodeId,
    pub config: ClusterConfig,
    metrics: Metrics,
    peers: Mutex<HashMap<NodeId, Peer>>,
    ring: watch::Sender<Arc<Ring>>,
    pending: Mutex<HashMap<u64, Pending>>,
    next_req: AtomicU64,
    /// This server is draining: it is no longer in its own ring either.
    leaving: AtomicBool,
    /// Closes every link. Cancelled after the client sessions have drained,
    /// so their last messages still reach (and hear from) the rooms' owners.
    stop: CancellationToken,
    /// Refused PEER handshakes are logged through this (at most one line a second).
    pub(crate) refusals: chat_admin::throttle::LogThrottle,
}

impl Cluster {
    pub fn new(
        me: String,
        config: ClusterConfig,
        metrics: Metrics,
        stop: CancellationToken,
    ) -> Arc<Cluster> {
        let ring = Ring::with_vnodes(&[(me.clone(), 1)], config.vnodes);
        Arc::new(Cluster {
            me: Arc::from(me),
            config,
            metrics,
            peers: Mutex::new(HashMap::new()),
            ring: watch::Sender::new(Arc::new(ring)),
            pending: Mutex::new(HashMap::new()),
            next_req: AtomicU64::new(1),
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
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
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

    /// Replaces the membership: dials new peers, stops dialling removed ones.
    pub fn set_members(self: &Arc<Self>, hub: &Arc<Hub>, list: &[String]) {
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
            hub.tasks.spawn(link::dial_loop(hub.clone(), node, stop));
            changed = true;
        }
        if changed {
            self.rebuild(&peers);
        }
    }

    /// A link to `node` is up: frames go to `tx` until `conn` is cancelled.
    pub(crate) fn link_up(&self, node: &NodeId, tx: mpsc::Sender<Queued>, conn: CancellationToken) {
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
    pub(crate) fn link_down(&self, hub: &Hub, node: &NodeId) {
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
        self.fail_pending(
            hub,
            |p| p.node() == node,
            "lost the link to the room's server",
        );
    }

    /// The link `node` opened to us closed: what we forwarded to it will not
    /// be answered.
    pub(crate) fn peer_gone(&self, hub: &Hub, node: &NodeId) {
        self.fail_pending(
            hub,
            |p| p.node() == node,
            "lost the link from the room's server",
        );
    }

    /// `node` announced it is draining: take it out of the ring now.
    pub(crate) fn peer_draining(&self, node: &NodeId) {
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
        self.enqueue(
            node,
            Queued {
                msg,
                fanout_started: None,
            },
        )
    }

    /// [`Cluster::send`] for a fan-out started at `started` (its latency is
    /// observed when the frame is written).
    pub fn send_timed(&self, node: &str, msg: PeerMsg, started: Instant) -> bool {
        self.enqueue(
            node,
            Queued {
                msg,
                fanout_started: Some(started),
            },
        )
    }

    /// [`Cluster::send`] that gives the frame back when the link is not up.
    pub fn try_send(&self, node: &str, msg: PeerMsg) -> Result<(), PeerMsg> {
        let Some((tx, conn)) = self.queue(node) else {
            return Err(msg);
        };
        let q = Queued {
            msg,
            fanout_started: None,
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

    fn enqueue(&self, node: &str, q: Queued) -> bool {
        let Some((tx, conn)) = self.queue(node) else {
            return false;
        };
        match tx.try_send(q) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(peer = %node, "link queue full; dropping the link");
                conn.cancel();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    fn next_req(&self) -> u64 {
        self.next_req.fetch_add(1, Ordering::Relaxed)
    }

    /// Forwards a local client's message to the room's owner. The answer
    /// arrives as [`PeerMsg::Published`] on the owner's link to this server
    /// ([`Cluster::published`]). Gives the
    /// message back when it could not be sent.
    pub async fn forward(&self, node: &NodeId, p: Publish) -> Result<(), Publish> {
        let Some((tx, conn)) = self.queue(node) else {
            return Err(p);
        };
        let Origin::Local { session, .. } = &p.origin else {
            return Err(p);
        };
        let req = self.next_req();
        let msg = PeerMsg::Publish {
            req,
            room: p.room.clone(),
            sender: p.sender.to_string(),
            session: session.id,
            cid: p.cid.clone(),
            text: p.text.clone(),
        };
        self.pending().insert(
            req,
            Pending::Publish {
                node: node.clone(),
                at: Instant::now(),
                p,
            },
        );
        let q = Queued {
            msg,
            fanout_started: None,
        };
        let patience = Duration::from_millis(self.config.peer_timeout_ms);
        match tokio::time::timeout(patience, tx.send(q)).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(_)) => {}
            Err(_) => {
                tracing::warn!(peer = %node, "link queue stayed full; dropping the link");
                conn.cancel();
            }
        }
        match self.pending().remove(&req) {
            Some(Pending::Publish { p, .. }) => Err(p),
            _ => Ok(()), // answered or failed meanwhile
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Pending>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The owner's answer to a forwarded message.
    pub(crate) fn published(
        &self,
        hub: &Hub,
        req: u64,
        result: Result<Appended, ApiError>,
        pos: Option<String>,
    ) {
        if let Some(Pending::Publish { p, .. }) = self.pending().remove(&req) {
            p.answer(hub, result, pos);
        }
    }

    /// Asks `node` who is present in `room`; `None` without an answer.
    pub async fn who(&self, node: &NodeId, room: &str) -> Option<Vec<String>> {
        let req = self.next_req();
        let (tx, rx) = oneshot::channel();
        self.pending().insert(
            req,
            Pending::Who {
                node: node.clone(),
                at: Instant::now(),
                tx,
            },
        );
        let msg = PeerMsg::Who {
            req,
            room: room.to_string(),
        };
        if !self.send(node, msg) {
            self.pending().remove(&req);
            return None;
        }
        let patience = Duration::from_millis(self.config.request_timeout_ms);
        let answer = tokio::time::timeout(patience, rx).await;
        self.pending().remove(&req);
        answer.ok()?.ok()
    }

    pub(crate) fn members(&self, req: u64, users: Vec<String>) {
        if let Some(Pending::Who { tx, .. }) = self.pending().remove(&req) {
            let _ = tx.send(users);
        }
    }

    fn fail_pending(&self, hub: &Hub, which: impl Fn(&Pending) -> bool, why: &str) {
        let failed: Vec<Pending> = {
            let mut pending = self.pending();
            let ids: Vec<u64> = pending
                .iter()
                .filter(|(_, p)| which(p))
                .map(|(id, _)| *id)
                .collect();
            ids.iter().filter_map(|id| pending.remove(id)).collect()
        };
        for p in failed {
            if let Pending::Publish { p, .. } = p {
                let e = ApiError::new(
                    ErrorKind::Unavailable,
                    format!("{why}; the message may or may not be stored, resend it with its id"),
                );
                p.answer(hub, Err(e), None);
            }
            // A dropped `Who` sender ends its wait with no answer.
        }
    }

    /// Answers requests that waited longer than `request_timeout_ms`.
    pub(crate) fn expire_pending(&self, hub: &Hub) {
        let limit = Duration::from_millis(self.config.request_timeout_ms);
        self.fail_pending(
            hub,
            |p| p.at().elapsed() > limit,
            "no answer from the room's server",
        );
    }

    /// Updates the queue-depth gauges.
    pub(crate) fn observe_queues(&self) {
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

/// Keeps the membership, follows ring changes and expires requests until
/// `stop`.
pub async fn run(hub: Arc<Hub>, stop: CancellationToken) {
    let cluster = hub.cluster.clone();
    let cfg = cluster.config.clone();
    if cfg.dns_name.is_none() {
        cluster.set_members(&hub, &cfg.peers);
    }
    let mut ring = cluster.subscribe();
    let mut tick = tokio::time::interval(Duration::from_millis(cfg.heartbeat_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let dns_every = Duration::from_secs(cfg.dns_refresh_secs);
    let mut dns_next = Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = ring.changed() => {
                if changed.is_err() {
                    return;
                }
                ring.borrow_and_update();
                hub.resync();
            }
            _ = tick.tick() => {
                cluster.expire_pending(&hub);
                cluster.observe_queues();
                if let Some(name) = cfg.dns_name.as_deref() {
                    if Instant::now() >= dns_next {
                        dns_next = Instant::now() + dns_every;
                        let found = tokio::select! {
                            r = tokio::net::lookup_host((name, cfg.dns_port)) => r,
                            _ = stop.cancelled() => return,
                        };
                        match found {
                            Ok(addrs) => {
                                let mut list: Vec<String> = addrs.map(|a| a.to_string()).collect();
                                list.sort();
                                list.dedup();
                                if list.is_empty() {
                                    tracing::warn!(%name, "DNS returned no chat servers; keeping the last list");
                                } else {
                                    cluster.set_members(&hub, &list);
                                }
                            }
                            Err(e) => tracing::warn!(%name, error = %e, "DNS lookup failed; keeping the last list"),
                        }
                    }
                }
            }
        }
    }
}
