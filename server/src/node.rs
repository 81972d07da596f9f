//! The composition root of a chat server: presence, the rooms it owns, DM
//! routing, the cluster and the storage client, and the operations sessions
//! and peers use, which combine them.
//!
//! Placement (see ARCHITECTURE.md): a room's owner is `ring.pick(room)` over
//! the servers this one can reach ([`Cluster`]). Presence goes to the owner
//! (`Enter` / `Leave`), which announces it to every server with members;
//! messages go to the owner, which orders, stores and fans them out. A DM goes
//! to the recipient's hash owner, which forwards it to the server the user is
//! connected to when that is another one.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use chat_protocol::{PartReason, ServerLine};
use chat_storage_client::DbClient;
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::batch::{Batch, Line};
use crate::cluster::wire::{Forwarded, PeerMsg, Published};
use crate::cluster::{Cluster, Handler, NodeId, Reply};
use crate::config::Config;
use crate::dm::{Arrival, Located};
use crate::metrics::Metrics;
use crate::outbound::SessionHandle;
use crate::owned::OwnedRooms;
use crate::presence::{LocalRoom, Presence};
use crate::reply::Failed;
use crate::room::{Answered, Fanout, Outgoing, Publish, RoomCore, RoomCtx};
use crate::source::Trusted;
use crate::tls::ServerTls;

pub struct Node {
    pub config: Config,
    pub db: DbClient,
    pub metrics: Metrics,
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
    pub cluster: Arc<Cluster>,
    /// `config.trust_proxy_line`, parsed once.
    pub trusted_proxies: Trusted,
    /// Set with `config.tls`: the client port and the links take TLS.
    pub tls: Option<ServerTls>,
    presence: Arc<Presence>,
    rooms: OwnedRooms,
    located: Located,
}

impl Node {
    pub fn new(
        config: Config,
        db: DbClient,
        metrics: Metrics,
        tasks: TaskTracker,
        shutdown: CancellationToken,
        cluster: Arc<Cluster>,
        tls: Option<ServerTls>,
    ) -> Arc<Node> {
        let presence = Arc::new(Presence::new(metrics.clone()));
        let fanout = Arc::new(Sink {
            cluster: cluster.clone(),
            presence: presence.clone(),
            metrics: metrics.clone(),
        });
        let ctx = RoomCtx {
            db: db.clone(),
            metrics: metrics.clone(),
            fanout,
            tasks: tasks.clone(),
            shutdown: shutdown.clone(),
            queue: config.room_queue,
            batch_max: config.room_batch_max,
        };
        Arc::new(Node {
            trusted_proxies: Trusted::new(&config.trust_proxy_line),
            rooms: OwnedRooms::new(Arc::new(ctx)),
            located: Located::default(),
            presence,
            config,
            db,
            metrics,
            tasks,
            shutdown,
            cluster,
            tls,
        })
    }

    fn is_me(&self, node: &str) -> bool {
        *self.cluster.me == *node
    }

    // ---- sessions -----------------------------------------------------------

    pub fn add_session(&self, session: SessionHandle, token: String) {
        let user = session.user.clone();
        if self.presence.add_session(session, token) {
            self.locate(&user, true);
        }
    }

    /// Removes a session. If it was the user's last, the user leaves every room
    /// they were present in and the members hear `PART … <reason>`.
    pub fn remove_session(&self, session: &SessionHandle, reason: PartReason) {
        let Some(left) = self.presence.remove_session(session) else {
            return;
        };
        self.locate(&session.user, false);
        for (room, owner) in left {
            self.route_leave(&owner, &room, &session.user, reason);
        }
    }

    /// Tells the user's hash owner, when that is another server, that the
    /// user is (or is no longer) connected here.
    fn locate(&self, user: &str, here: bool) {
        let owner = self.cluster.owner_of(user);
        if !self.is_me(&owner) {
            let user = user.to_string();
            self.cluster.send(&owner, PeerMsg::Locate { user, here });
        }
    }

    /// [`Node::locate`] for everyone connected here (only the users whose
    /// hash owner is `only`, when given).
    fn locate_all(&self, only: Option<&NodeId>) {
        for user in self.presence.users() {
            let owner = self.cluster.owner_of(&user);
            if self.is_me(&owner) || only.is_some_and(|n| *n != owner) {
                continue;
            }
            let msg = PeerMsg::Locate {
                user: user.to_string(),
                here: true,
            };
            self.cluster.send(&owner, msg);
        }
    }

    // ---- presence -----------------------------------------------------------

    /// Marks `user` present in `room` (all of their sessions receive it from
    /// now on). The owner announces `JOIN room user` if they were not present.
    pub fn enter_room(&self, user: &Arc<str>, room: &str) {
        let owner = self
            .presence
            .enter(user, room, || self.cluster.owner_of(room));
        if let Some(owner) = owner {
            self.route_enter(&owner, room, vec![user.to_string()]);
        }
    }

    /// Explicit PART: the user is no longer present (nor a member).
    pub fn leave_room(&self, user: &Arc<str>, room: &str) {
        if let Some(owner) = self.presence.leave(user, room) {
            self.route_leave(&owner, room, user, PartReason::Left);
        }
        // The user's own sessions learn it too (they are no longer members).
        let line = ServerLine::Parted {
            room: room.to_string(),
            user: user.to_string(),
            reason: PartReason::Left,
        }
        .to_bytes();
        self.presence.send_to_user(user, &line);
    }

    fn route_enter(&self, owner: &NodeId, room: &str, users: Vec<String>) {
        if self.is_me(owner) {
            self.rooms.enter(owner, room, users);
        } else {
            let room = room.to_string();
            self.cluster.send(owner, PeerMsg::Enter { room, users });
        }
    }

    fn route_leave(&self, owner: &NodeId, room: &str, user: &str, reason: PartReason) {
        if self.is_me(owner) {
            self.rooms.leave(owner, room, user, reason);
        } else {
            let msg = PeerMsg::Leave {
                room: room.to_string(),
                user: user.to_string(),
                reason: reason.as_str().to_string(),
            };
            self.cluster.send(owner, msg);
        }
    }

    /// The local room, if `user` is present in it.
    pub fn present_room(&self, user: &str, room: &str) -> Option<Arc<LocalRoom>> {
        self.presence.present_room(user, room)
    }

    /// How many rooms `user` is present in.
    pub fn rooms_of(&self, user: &str) -> usize {
        self.presence.rooms_of(user)
    }

    /// Tokens of everyone online, to keep them from expiring.
    pub fn online_tokens(&self) -> Vec<String> {
        self.presence.online_tokens()
    }

    // ---- messages -----------------------------------------------------------

    /// Hands a message to its room's owner: this server's room task, or the
    /// owner over its link (the answer comes back through the cluster).
    pub async fn publish(&self, room: &LocalRoom, p: Publish) {
        let owner = room.owner();
        if self.is_me(&owner) {
            self.rooms.publish(p).await;
            return;
        }
        let Publish {
            room,
            sender,
            cid,
            text,
            from: (_, session),
            answer,
        } = p;
        let msg = Forwarded {
            req: 0,
            room: room.clone(),
            sender: sender.to_string(),
            session,
            cid: cid.clone(),
            text,
        };
        let done = Box::new(move |published: Option<Published>| {
            let (result, pos) = match published {
                Some(p) => (p.result.map_err(Failed::from), p.pos),
                None => (Err(Failed::unavailable()), None),
            };
            answer(Answered {
                room,
                cid,
                result,
                pos,
            });
        });
        // Not sent: the room's server is unreachable, nothing stored.
        if let Err(done) = self.cluster.forward(&owner, msg, done).await {
            done(None);
        }
    }

    /// Everyone present in a room, on every server, sorted; `None` when the
    /// room's owner cannot be asked.
    pub async fn present_members(&self, room: &str) -> Option<Vec<String>> {
        let owner = self.cluster.owner_of(room);
        if self.is_me(&owner) {
            Some(self.rooms.members(room))
        } else {
            self.cluster.who(&owner, room).await
        }
    }

    /// Hands a stored DM to the recipient: directly when they are connected
    /// here, else to their hash owner, which forwards it to the server they
    /// are connected to. Undelivered DMs stay pending for the next login.
    pub fn route_dm(&self, recipient: &str, line: &Bytes, id: i64, pos: Option<String>) {
        self.deliver_dm(recipient, line, id, pos, Arrival::Sent);
    }

    fn deliver_dm(
        &self,
        recipient: &str,
        line: &Bytes,
        id: i64,
        pos: Option<String>,
        arrival: Arrival,
    ) {
        if self.presence.deliver_dm(recipient, line, id, pos.as_ref()) {
            return;
        }
        let hash_owner = self.cluster.owner_of(recipient);
        let me = &self.cluster.me;
        let Some((to, forwarded)) = self.located.next_hop(recipient, me, &hash_owner, arrival)
        else {
            return;
        };
        let msg = PeerMsg::Dm {
            recipient: recipient.to_string(),
            line: String::from_utf8_lossy(line).into_owned(),
            id,
            pos,
            forwarded,
        };
        self.cluster.send(&to, msg);
    }

    // ---- the cluster --------------------------------------------------------

    /// After the ring changed: every local room whose owner changed is
    /// announced to its new owner (and dropped at the old one), and users
    /// whose hash owner is another server are located there again.
    fn resync(&self) {
        for moved in self.presence.reassign(|room| self.cluster.owner_of(room)) {
            let name = &moved.room.name;
            if self.is_me(&moved.old) {
                self.rooms.unsubscribe(&moved.old, name);
            } else {
                let msg = PeerMsg::Unsubscribe { room: name.clone() };
                self.cluster.send(&moved.old, msg);
            }
            self.route_enter(&moved.new, name, moved.room.member_names());
        }
        self.locate_all(None);
    }
}

impl Handler for Node {
    fn publish(&self, from: &NodeId, msg: Forwarded, reply: Reply) -> BoxFuture<'_, ()> {
        let Forwarded {
            req,
            room,
            sender,
            session,
            cid,
            text,
        } = msg;
        let (cluster, node) = (self.cluster.clone(), from.clone());
        let answer = Box::new(move |a: Answered| {
            let result = a.result.map_err(Into::into);
            cluster.answer(&node, req, Published { result, pos: a.pos }, &reply);
        });
        let p = Publish {
            room,
            sender: Arc::from(sender),
            cid,
            text,
            from: (from.clone(), session),
            answer,
        };
        Box::pin(self.rooms.publish(p))
    }

    fn frame(&self, from: &NodeId, msg: PeerMsg, reply: &Reply) -> bool {
        match msg {
            PeerMsg::Enter { room, users } => self.rooms.enter(from, &room, users),
            PeerMsg::Leave { room, user, reason } => {
                let reason = PartReason::parse(&reason).unwrap_or(PartReason::Disconnected);
                self.rooms.leave(from, &room, &user, reason);
            }
            PeerMsg::Unsubscribe { room } => self.rooms.unsubscribe(from, &room),
            PeerMsg::Who { req, room } => {
                let users = self.rooms.members(&room);
                return reply.try_send(PeerMsg::Members { req, users }).is_ok();
            }
            PeerMsg::Deliver { room, pos, batch } => {
                self.presence.deliver(&room, &batch, pos.as_ref())
            }
            PeerMsg::Dm {
                recipient,
                line,
                id,
                pos,
                forwarded,
            } => {
                let arrival = Arrival::Peer { forwarded };
                self.deliver_dm(&recipient, &Bytes::from(line), id, pos, arrival);
            }
            PeerMsg::Locate { user, here } => self.located.locate(from, user, here),
            _ => tracing::warn!(peer = %from, "unexpected frame on an incoming link"),
        }
        true
    }

    fn linked(&self, node: &NodeId) {
        for room in self.presence.rooms_owned_by(node) {
            self.route_enter(node, &room.name, room.member_names());
        }
        self.locate_all(Some(node));
    }

    fn lost(&self, node: &NodeId) {
        self.rooms.peer_lost(node);
        self.located.forget(node);
    }

    fn ring_changed(&self) {
        self.resync();
    }
}

/// The fan-out of the rooms this server owns: local members through
/// presence, every other server with members as one `Deliver` frame. The
/// batch is encoded once; each server gets the same bytes.
struct Sink {
    cluster: Arc<Cluster>,
    presence: Arc<Presence>,
    metrics: Metrics,
}

impl Fanout for Sink {
    fn fan_out(&self, room: &RoomCore, lines: &[Outgoing], pos: Option<&String>) {
        if lines.is_empty() {
            return;
        }
        let started = Instant::now();
        let bytes = Batch::concat(lines.iter().map(|o| &o.line));
        for node in room.destinations() {
            let meta = lines
                .iter()
                .map(|o| Line {
                    len: o.line.len() as u32,
                    except: except_on(o, &node),
                })
                .collect();
            let Some(batch) = Batch::new(bytes.clone(), meta) else {
                continue;
            };
            if node == self.cluster.me {
                self.presence.deliver(&room.name, &batch, pos);
            } else {
                let msg = PeerMsg::Deliver {
                    room: room.name.clone(),
                    pos: pos.cloned(),
                    batch,
                };
                self.cluster.send_timed(&node, msg, started);
            }
        }
        self.metrics
            .fanout_latency
            .observe(started.elapsed().as_secs_f64());
    }
}

/// The session of `node` that must not receive `o`, if any.
fn except_on(o: &Outgoing, node: &NodeId) -> Option<u64> {
    match &o.except {
        Some((n, id)) if n == node => Some(*id),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::{channel, Out, Rx};

    fn node() -> Arc<Node> {
        let metrics = Metrics::new(&prometheus::Registry::new()).unwrap();
        let config = Config::default();
        let stop = CancellationToken::new();
        let cluster = Cluster::new(
            "me:1".into(),
            config.cluster.clone(),
            metrics.clone(),
            None,
            stop.clone(),
        );
        // Never asked: these tests store nothing.
        let db = DbClient::new("http://127.0.0.1:9");
        Node::new(config, db, metrics, TaskTracker::new(), stop, cluster, None)
    }

    fn login(node: &Node, id: u64, user: &str) -> (SessionHandle, Rx) {
        let (handle, rx) = channel(id, Arc::from(user), 16);
        node.add_session(handle.clone(), format!("t-{user}"));
        (handle, rx)
    }

    fn lines(rx: &mut Rx) -> Vec<String> {
        std::iter::from_fn(|| rx.try_recv())
            .map(|out| match out {
                Out::Line(b) | Out::Lines(b, _) | Out::Dm(b, _) | Out::Close(b) => {
                    String::from_utf8_lossy(&b).into_owned()
                }
            })
            .collect()
    }

    #[tokio::test]
    async fn a_cluster_of_one_owns_its_rooms_and_announces_presence() {
        let node = node();
        let (ann, mut ann_rx) = login(&node, 1, "ann");
        let (bob, mut bob_rx) = login(&node, 2, "bob");
        node.enter_room(&ann.user, "r");
        node.enter_room(&bob.user, "r");
        assert_eq!(lines(&mut ann_rx), vec!["JOIN r ann\n", "JOIN r bob\n"]);
        assert_eq!(lines(&mut bob_rx), vec!["JOIN r bob\n"]);
        assert_eq!(
            node.present_members("r").await,
            Some(vec!["ann".to_string(), "bob".to_string()])
        );
        node.leave_room(&bob.user, "r");
        assert_eq!(lines(&mut ann_rx), vec!["PART r bob left\n"]);
        assert_eq!(lines(&mut bob_rx), vec!["PART r bob left\n"], "told too");
        node.remove_session(&ann, PartReason::Idle);
        assert_eq!(node.present_members("r").await, Some(vec![]));
        assert_eq!(node.metrics.rooms_owned.get(), 0);
    }

    #[tokio::test]
    async fn the_owners_fan_out_skips_the_senders_own_session() {
        let node = node();
        let (ann, mut ann_rx) = login(&node, 1, "ann");
        let (_ann2, mut ann2_rx) = login(&node, 2, "ann");
        node.enter_room(&ann.user, "r");
        lines(&mut ann_rx);
        lines(&mut ann2_rx);
        let core = node.rooms.core("r").unwrap();
        let out = [Outgoing {
            line: Bytes::from_static(b"MSG r 1 0 ann hi\n"),
            except: Some((node.cluster.me.clone(), ann.id)),
        }];
        let sink = &node.rooms.ctx().fanout;
        sink.fan_out(&core, &out, Some(&"0-1-3".to_string()));
        assert!(lines(&mut ann_rx).is_empty());
        assert_eq!(lines(&mut ann2_rx), vec!["MSG r 1 0 ann hi\n"]);
        assert_eq!(ann.read_pos().as_deref(), Some("0-1-3"));
    }

    #[tokio::test]
    async fn a_dm_reaches_a_recipient_online_here() {
        let node = node();
        let (_bob, mut bob_rx) = login(&node, 1, "bob");
        let dm = Bytes::from_static(b"DM 5 0 ann hi\n");
        node.route_dm("bob", &dm, 5, None);
        assert_eq!(lines(&mut bob_rx), vec!["DM 5 0 ann hi\n"]);
        // Not online and this server is everyone's hash owner: it stays pending.
        node.route_dm("carol", &dm, 6, None);
    }
}
