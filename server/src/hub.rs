//! Shared state of one chat server: who is online here (user → sessions and
//! the rooms they are present in), the rooms as seen here ([`LocalRoom`]),
//! the rooms this server owns ([`Room`]) and, for users whose hash puts them
//! here but who are connected elsewhere, where they are.
//!
//! Placement (see ARCHITECTURE.md): a room's owner is `ring.pick(room)` over
//! the servers this one can reach ([`Cluster`]). Presence goes to the owner
//! (`Enter` / `Leave`), which announces it to every server with members;
//! messages go to the owner, which orders, stores and fans them out. A DM goes
//! to the recipient's hash owner, which forwards it to the server the user is
//! connected to when that is another one.
//!
//! Locks are `std` mutexes: held only for map updates and for queueing bytes
//! with `try_send`, never across `.await`. Lock order: `local` / `owned` maps,
//! then a room's `members` / `subs`, then `online`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use chat_protocol::{PartReason, ServerLine};
use chat_storage_client::DbClient;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::wire::{Delivery, PeerMsg};
use crate::cluster::{Cluster, NodeId};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::outbound::{Out, SessionHandle};
use crate::room::{refuse, LocalRoom, Outgoing, Publish, Room, RoomCore};

#[derive(Default)]
struct OnlineUser {
    sessions: Vec<SessionHandle>,
    rooms: HashSet<String>,
    tokens: Vec<String>,
}

pub struct Hub {
    pub config: Config,
    pub db: DbClient,
    pub metrics: Metrics,
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
    pub cluster: Arc<Cluster>,
    /// `config.trust_proxy_line`, parsed once.
    pub trusted_proxies: crate::source::Trusted,
    /// Set with `config.tls`: the client port and the links take TLS.
    pub tls: Option<crate::tls::ServerTls>,
    online: RwLock<HashMap<Arc<str>, OnlineUser>>,
    local: Mutex<HashMap<String, Arc<LocalRoom>>>,
    owned: Mutex<HashMap<String, Arc<Room>>>,
    /// Users this server is the hash owner of, connected to another server.
    located: Mutex<HashMap<String, NodeId>>,
}

impl Hub {
    pub fn new(
        config: Config,
        db: DbClient,
        metrics: Metrics,
        tasks: TaskTracker,
        shutdown: CancellationToken,
        cluster: Arc<Cluster>,
        tls: Option<crate::tls::ServerTls>,
    ) -> Arc<Hub> {
        Arc::new(Hub {
            trusted_proxies: crate::source::Trusted::new(&config.trust_proxy_line),
            tls,
            config,
            db,
            metrics,
            tasks,
            shutdown,
            cluster,
            online: RwLock::new(HashMap::new()),
            local: Mutex::new(HashMap::new()),
            owned: Mutex::new(HashMap::new()),
            located: Mutex::new(HashMap::new()),
        })
    }

    fn is_me(&self, node: &str) -> bool {
        *self.cluster.me == *node
    }

    // ---- sessions ---------------------------------------------------------

    pub fn add_session(&self, session: SessionHandle, token: String) {
        let first = {
            let mut online = self.online.write().expect("online lock");
            let u = online.entry(session.user.clone()).or_default();
            // Most users have one session and one token: no spare capacity.
            u.sessions.reserve_exact(1);
            u.sessions.push(session.clone());
            if !u.tokens.contains(&token) {
                u.tokens.reserve_exact(1);
                u.tokens.push(token);
            }
            u.sessions.len() == 1
        };
        if first {
            self.locate(&session.user, true);
        }
    }

    /// Tells the user's hash owner, when that is another server, that the user
    /// is (or is no longer) connected here.
    fn locate(&self, user: &str, here: bool) {
        let owner = self.cluster.owner_of(user);
        if !self.is_me(&owner) {
            let msg = PeerMsg::Locate {
                user: user.to_string(),
                here,
            };
            self.cluster.send(&owner, msg);
        }
    }

    /// Removes a session. If it was the user's last, the user leaves every room
    /// they were present in and the members hear `PART … <reason>`.
    pub fn remove_session(self: &Arc<Self>, session: &SessionHandle, reason: PartReason) {
        let rooms = {
            let mut online = self.online.write().expect("online lock");
            let Some(u) = online.get_mut(&session.user) else {
                return;
            };
            u.sessions.retain(|s| s.id != session.id);
            if !u.sessions.is_empty() {
                return;
            }
            online
                .remove(&session.user)
                .map(|u| u.rooms)
                .unwrap_or_default()
        };
        self.locate(&session.user, false);
        for name in rooms {
            if let Some(owner) = self.leave_local(&name, &session.user) {
                self.route_leave(&owner, &name, &session.user, reason);
            }
        }
    }

    // ---- presence ---------------------------------------------------------

    /// Marks `user` present in `room` (all of their sessions receive it from now
    /// on). The owner announces `JOIN room user` if they were not present.
    pub fn enter_room(self: &Arc<Self>, user: &Arc<str>, room_name: &str) {
        {
            let mut online = self.online.write().expect("online lock");
            match online.get_mut(user) {
                Some(u) => {
                    u.rooms.insert(room_name.to_string());
                }
                None => return,
            }
        }
        let (owner, added) = {
            let mut local = self.local.lock().expect("local lock");
            let room = local
                .entry(room_name.to_string())
                .or_insert_with(|| {
                    Arc::new(LocalRoom::new(room_name, self.cluster.owner_of(room_name)))
                })
                .clone();
            self.metrics.rooms_active.set(local.len() as i64);
            let added = room
                .members
                .lock()
                .expect("members lock")
                .insert(user.clone());
            (room.owner(), added)
        };
        if added {
            self.route_enter(&owner, room_name, vec![user.to_string()]);
        }
    }

    /// Explicit PART: the user is no longer present (nor a member).
    pub fn leave_room(self: &Arc<Self>, user: &Arc<str>, room_name: &str) {
        if let Some(u) = self.online.write().expect("online lock").get_mut(user) {
            u.rooms.remove(room_name);
        }
        if let Some(owner) = self.leave_local(room_name, user) {
            self.route_leave(&owner, room_name, user, PartReason::Left);
        }
        // The user's own sessions learn it too (they are no longer members).
        let line = ServerLine::Parted {
            room: room_name.to_string(),
            user: user.to_string(),
            reason: PartReason::Left,
        }
        .to_bytes();
        self.send_to_user(user, &line);
    }

    /// Takes `user` out of the local room; drops the room when nobody here is
    /// present. Returns the room's owner if the user was present.
    fn leave_local(&self, room_name: &str, user: &str) -> Option<NodeId> {
        let mut local = self.local.lock().expect("local lock");
        let room = local.get(room_name)?.clone();
        let (removed, empty) = {
            let mut members = room.members.lock().expect("members lock");
            (members.remove(user), members.is_empty())
        };
        if empty {
            local.remove(room_name);
            self.metrics.rooms_active.set(local.len() as i64);
        }
        removed.then(|| room.owner())
    }

    fn route_enter(self: &Arc<Self>, owner: &NodeId, room: &str, users: Vec<String>) {
        if self.is_me(owner) {
            self.owner_enter(owner, room, users);
        } else {
            let room = room.to_string();
            self.cluster.send(owner, PeerMsg::Enter { room, users });
        }
    }

    fn route_leave(self: &Arc<Self>, owner: &NodeId, room: &str, user: &str, reason: PartReason) {
        if self.is_me(owner) {
            self.owner_leave(owner, room, user, reason);
        } else {
            let msg = PeerMsg::Leave {
                room: room.to_string(),
                user: user.to_string(),
                reason: reason.as_str().to_string(),
            };
            self.cluster.send(owner, msg);
        }
    }

    /// The owned room, started on first use. Under the owned-rooms lock, so a
    /// room is never reaped between lookup and use.
    fn owned_room(self: &Arc<Self>, name: &str) -> Arc<Room> {
        let mut owned = self.owned.lock().expect("owned lock");
        if let Some(r) = owned.get(name) {
            return r.clone();
        }
        let room = Room::start(self.clone(), name.to_string());
        owned.insert(name.to_string(), room.clone());
        self.metrics.rooms_owned.set(owned.len() as i64);
        room
    }

    /// Drops an owned room nobody is present in; its task ends once the
    /// messages already queued are stored and answered.
    fn reap_if_empty(&self, room: &Arc<Room>) {
        let mut owned = self.owned.lock().expect("owned lock");
        let current = owned.get(&room.name).is_some_and(|r| Arc::ptr_eq(r, room));
        if current && room.is_empty() {
            owned.remove(&room.name);
            self.metrics.rooms_owned.set(owned.len() as i64);
        }
    }

    /// Owner side of `Enter`: `users` on server `node` are present.
    pub fn owner_enter(self: &Arc<Self>, node: &NodeId, room_name: &str, users: Vec<String>) {
        let room = self.owned_room(room_name);
        let newly: Vec<String> = {
            let mut subs = room.subs.lock().expect("subs lock");
            let here = subs.entry(node.clone()).or_default();
            users
                .into_iter()
                .filter(|u| here.insert(Arc::from(u.as_str())))
                .collect()
        };
        let lines: Vec<Outgoing> = newly
            .into_iter()
            .map(|user| Outgoing {
                line: ServerLine::Joined {
                    room: room_name.to_string(),
                    user,
                }
                .to_bytes(),
                except: None,
            })
            .collect();
        if !lines.is_empty() {
            self.fan_out(&room, &lines, None);
        }
    }

    /// The room this server owns by that name, if it is live.
    fn owned(&self, name: &str) -> Option<Arc<Room>> {
        self.owned.lock().expect("owned lock").get(name).cloned()
    }

    /// Owner side of `Leave`.
    pub fn owner_leave(&self, node: &NodeId, room_name: &str, user: &str, reason: PartReason) {
        let Some(room) = self.owned(room_name) else {
            return;
        };
        let removed = {
            let mut subs = room.subs.lock().expect("subs lock");
            subs.get_mut(node).is_some_and(|s| s.remove(user))
        };
        if removed {
            let line = ServerLine::Parted {
                room: room_name.to_string(),
                user: user.to_string(),
                reason,
            };
            let out = Outgoing {
                line: line.to_bytes(),
                except: None,
            };
            self.fan_out(&room, std::slice::from_ref(&out), None);
        }
        self.reap_if_empty(&room);
    }

    /// Owner side of `Unsubscribe`: forget `node`'s members without a PART.
    pub fn owner_unsubscribe(&self, node: &NodeId, room_name: &str) {
        let Some(room) = self.owned(room_name) else {
            return;
        };
        room.subs.lock().expect("subs lock").remove(node);
        self.reap_if_empty(&room);
    }

    /// A peer left this server's ring (link lost, or it is draining): its
    /// users are no longer present in the rooms owned here, and it no longer
    /// hosts users for DMs.
    pub fn peer_lost(&self, node: &NodeId) {
        let rooms: Vec<Arc<Room>> = self
            .owned
            .lock()
            .expect("owned lock")
            .values()
            .cloned()
            .collect();
        for room in rooms {
            let gone = room.subs.lock().expect("subs lock").remove(node);
            let lines: Vec<Outgoing> = gone
                .into_iter()
                .flatten()
                .map(|user| Outgoing {
                    line: ServerLine::Parted {
                        room: room.name.clone(),
                        user: user.to_string(),
                        reason: PartReason::Disconnected,
                    }
                    .to_bytes(),
                    except: None,
                })
                .collect();
            if !lines.is_empty() {
                self.fan_out(&room, &lines, None);
            }
            self.reap_if_empty(&room);
        }
        self.located
            .lock()
            .expect("located lock")
            .retain(|_, n| n != node);
    }

    /// After the ring changed: every local room whose owner changed is
    /// announced to its new owner (and dropped at the old one), and users
    /// whose hash owner is another server are located there again.
    pub fn resync(self: &Arc<Self>) {
        let rooms: Vec<Arc<LocalRoom>> = self
            .local
            .lock()
            .expect("local lock")
            .values()
            .cloned()
            .collect();
        for room in rooms {
            let new = self.cluster.owner_of(&room.name);
            let old = {
                let mut owner = room.owner.lock().expect("owner lock");
                if *owner == new {
                    continue;
                }
                std::mem::replace(&mut *owner, new.clone())
            };
            if self.is_me(&old) {
                self.owner_unsubscribe(&old, &room.name);
            } else {
                let msg = PeerMsg::Unsubscribe {
                    room: room.name.clone(),
                };
                self.cluster.send(&old, msg);
            }
            self.route_enter(&new, &room.name, room.member_names());
        }
        self.relocate(None);
    }

    /// A peer (re)connected to this server: whatever it owns of ours is
    /// announced to it again (a restarted server starts with nothing).
    pub fn resync_peer(self: &Arc<Self>, node: &NodeId) {
        let rooms: Vec<Arc<LocalRoom>> = self
            .local
            .lock()
            .expect("local lock")
            .values()
            .filter(|r| r.owner() == *node)
            .cloned()
            .collect();
        for room in rooms {
            self.route_enter(node, &room.name, room.member_names());
        }
        self.relocate(Some(node));
    }

    /// Sends `Locate` to the hash owner of every user connected here whose
    /// owner is another server (only `only`, when given).
    fn relocate(&self, only: Option<&NodeId>) {
        let users: Vec<Arc<str>> = self
            .online
            .read()
            .expect("online lock")
            .keys()
            .cloned()
            .collect();
        for user in users {
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

    // ---- messages -----------------------------------------------------------

    /// The local room, if `user` is present in it.
    pub fn present_room(&self, user: &str, room_name: &str) -> Option<Arc<LocalRoom>> {
        let room = self
            .local
            .lock()
            .expect("local lock")
            .get(room_name)
            .cloned();
        room.filter(|r| r.has_member(user))
    }

    /// Hands a message to its room's owner: this server's room task, or the
    /// owner over its link (the answer comes back through the cluster).
    pub async fn publish(self: &Arc<Self>, room: &LocalRoom, p: Publish) {
        let owner = room.owner();
        if self.is_me(&owner) {
            let r = self.owned_room(&room.name);
            r.publish(self, p).await;
        } else if let Err(p) = self.cluster.forward(&owner, p).await {
            refuse(
                self,
                p,
                "the room's server is unreachable, nothing stored; retry",
            );
        }
    }

    /// Owner side of a forwarded `Publish`.
    pub async fn owner_publish(self: &Arc<Self>, p: Publish) {
        let r = self.owned_room(&p.room);
        r.publish(self, p).await;
        // A message for a room with nobody present (its members' servers have
        // not announced them yet) still gets stored and answered.
        self.reap_if_empty(&r);
    }

    /// Sends lines of an owned room to every server with present members:
    /// local members directly, every other server as one `Deliver` frame.
    pub(crate) fn fan_out(&self, room: &RoomCore, lines: &[Outgoing], pos: Option<&String>) {
        if lines.is_empty() {
            return;
        }
        let started = Instant::now();
        for node in room.destinations() {
            if self.is_me(&node) {
                let local: Vec<(Bytes, Option<u64>)> = lines
                    .iter()
                    .map(|o| (o.line.clone(), except_on(o, &node)))
                    .collect();
                self.deliver_local(&room.name, &local, pos);
            } else {
                let deliveries = lines
                    .iter()
                    .map(|o| Delivery {
                        line: String::from_utf8_lossy(&o.line).into_owned(),
                        pos: pos.cloned(),
                        except: except_on(o, &node),
                    })
                    .collect();
                let msg = PeerMsg::Deliver {
                    room: room.name.clone(),
                    lines: deliveries,
                };
                self.cluster.send_timed(&node, msg, started);
            }
        }
        self.metrics
            .fanout_latency
            .observe(started.elapsed().as_secs_f64());
    }

    /// Queues lines of a room to every session of every member present here,
    /// except each line's excluded session.
    ///
    /// `pos` is the storage position of the write being delivered: every
    /// recipient session adopts it, so a client that has seen a message also
    /// finds it in `HISTORY` even when a lagging replica serves the read.
    pub fn deliver_local(
        &self,
        room_name: &str,
        lines: &[(Bytes, Option<u64>)],
        pos: Option<&String>,
    ) {
        let Some(room) = self
            .local
            .lock()
            .expect("local lock")
            .get(room_name)
            .cloned()
        else {
            return;
        };
        // Encoded once for everyone; only a session that must skip one of
        // the lines (its own message) gets a copy without it.
        let all = if lines.len() == 1 {
            lines[0].0.clone()
        } else {
            let mut buf = BytesMut::with_capacity(lines.iter().map(|(l, _)| l.len()).sum());
            for (line, _) in lines {
                buf.extend_from_slice(line);
            }
            buf.freeze()
        };
        let members = room.members.lock().expect("members lock");
        let online = self.online.read().expect("online lock");
        let mut n = 0;
        for user in members.iter() {
            let Some(u) = online.get(user) else { continue };
            for s in &u.sessions {
                // Before the line is queued: once the client can see it,
                // its reads must too.
                if pos.is_some() {
                    s.wrote(pos.cloned());
                }
                let skips = lines.iter().filter(|(_, e)| *e == Some(s.id)).count();
                let count = lines.len() - skips;
                let out = match (skips, count) {
                    (_, 0) => continue,
                    (0, 1) => Out::Line(all.clone()),
                    (0, _) => Out::Lines(all.clone(), count),
                    _ => {
                        let mut buf = BytesMut::new();
                        for (line, _) in lines.iter().filter(|(_, e)| *e != Some(s.id)) {
                            buf.extend_from_slice(line);
                        }
                        Out::Lines(buf.freeze(), count)
                    }
                };
                if s.send(out) {
                    n += count as u64;
                }
            }
        }
        self.metrics.deliveries_total.inc_by(n);
    }

    /// Queues a line to all sessions of a user; false if none is online.
    pub fn send_to_user(&self, user: &str, bytes: &Bytes) -> bool {
        let online = self.online.read().expect("online lock");
        match online.get(user) {
            Some(u) => {
                for s in &u.sessions {
                    s.line(bytes.clone());
                }
                true
            }
            None => false,
        }
    }

    /// Hands a stored DM to the recipient: directly when they are connected
    /// here, else to their hash owner, which forwards it to the server they
    /// are connected to. Undelivered DMs stay pending for the next login.
    pub fn route_dm(&self, recipient: &str, line: &Bytes, id: i64, pos: Option<String>) {
        if self.deliver_dm(recipient, line, id, pos.as_ref()) {
            return;
        }
        let owner = self.cluster.owner_of(recipient);
        let to = if self.is_me(&owner) {
            let at = self
                .located
                .lock()
                .expect("located lock")
                .get(recipient)
                .cloned();
            match at {
                Some(node) => node,
                None => return,
            }
        } else {
            owner
        };
        let msg = PeerMsg::Dm {
            recipient: recipient.to_string(),
            line: String::from_utf8_lossy(line).into_owned(),
            id,
            pos,
            forwarded: false,
        };
        self.cluster.send(&to, msg);
    }

    /// A DM that arrived from a peer.
    pub fn peer_dm(
        &self,
        recipient: &str,
        line: String,
        id: i64,
        pos: Option<String>,
        forwarded: bool,
    ) {
        let line = Bytes::from(line);
        if self.deliver_dm(recipient, &line, id, pos.as_ref()) || forwarded {
            return;
        }
        let at = self
            .located
            .lock()
            .expect("located lock")
            .get(recipient)
            .cloned();
        if let Some(node) = at.filter(|n| !self.is_me(n)) {
            let msg = PeerMsg::Dm {
                recipient: recipient.to_string(),
                line: String::from_utf8_lossy(&line).into_owned(),
                id,
                pos,
                forwarded: true,
            };
            self.cluster.send(&node, msg);
        }
    }

    /// A peer says `user` is (or is no longer) connected there.
    pub fn peer_locate(&self, node: &NodeId, user: String, here: bool) {
        let mut located = self.located.lock().expect("located lock");
        if here {
            located.insert(user, node.clone());
        } else if located.get(&user) == Some(node) {
            located.remove(&user);
        }
    }

    /// Hands a DM to every session of the recipient here; false if none.
    fn deliver_dm(&self, user: &str, bytes: &Bytes, id: i64, pos: Option<&String>) -> bool {
        let online = self.online.read().expect("online lock");
        match online.get(user) {
            Some(u) if !u.sessions.is_empty() => {
                for s in &u.sessions {
                    if pos.is_some() {
                        s.wrote(pos.cloned());
                    }
                    if s.send(Out::Dm(bytes.clone(), id)) {
                        self.metrics.deliveries_total.inc();
                    }
                }
                true
            }
            _ => false,
        }
    }

    // ---- queries ------------------------------------------------------------

    /// Everyone present in a room, on every server, sorted; `None` when the
    /// room's owner cannot be asked.
    pub async fn present_members(self: &Arc<Self>, room_name: &str) -> Option<Vec<String>> {
        let owner = self.cluster.owner_of(room_name);
        if self.is_me(&owner) {
            Some(self.owner_members(room_name))
        } else {
            self.cluster.who(&owner, room_name).await
        }
    }

    /// Owner side of `Who`.
    pub fn owner_members(&self, room_name: &str) -> Vec<String> {
        self.owned(room_name)
            .map(|r| r.present())
            .unwrap_or_default()
    }

    /// How many rooms `user` is present in (after login: every room they are a
    /// member of).
    pub fn rooms_of(&self, user: &str) -> usize {
        let online = self.online.read().expect("online lock");
        online.get(user).map_or(0, |u| u.rooms.len())
    }

    /// Tokens of everyone online, to keep them from expiring.
    pub fn online_tokens(&self) -> Vec<String> {
        let online = self.online.read().expect("online lock");
        online
            .values()
            .flat_map(|u| u.tokens.iter().cloned())
            .collect()
    }
}

/// The session of `node` that must not receive `o`, if any.
fn except_on(o: &Outgoing, node: &NodeId) -> Option<u64> {
    match &o.except {
        Some((n, id)) if n == node => Some(*id),
        _ => None,
    }
}
