//! Shared state of one chat server: who is online (user → sessions and the
//! rooms they are present in) and the live rooms.
//!
//! Locks are `std` mutexes: held only for map updates and for queueing bytes
//! with `try_send`, never across `.await`. Lock order: a room's `members`
//! before `online`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use chat_dbproxy::DbClient;
use chat_protocol::{PartReason, ServerLine};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::outbound::SessionHandle;
use crate::room::{Room, RoomCore};

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
    online: RwLock<HashMap<Arc<str>, OnlineUser>>,
    rooms: Mutex<HashMap<String, Arc<Room>>>,
}

impl Hub {
    pub fn new(
        config: Config,
        db: DbClient,
        metrics: Metrics,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Arc<Hub> {
        Arc::new(Hub {
            config,
            db,
            metrics,
            tasks,
            shutdown,
            online: RwLock::new(HashMap::new()),
            rooms: Mutex::new(HashMap::new()),
        })
    }

    /// Makes `user` present in the live room (started on first use). Under the
    /// rooms lock, so a room is never reaped between lookup and join. Returns
    /// the room and whether the user was not present before.
    fn join_live_room(self: &Arc<Self>, name: &str, user: &Arc<str>) -> (Arc<Room>, bool) {
        let mut rooms = self.rooms.lock().expect("rooms lock");
        let room = match rooms.get(name) {
            Some(r) => r.clone(),
            None => {
                let room = Room::start(self.clone(), name.to_string());
                rooms.insert(name.to_string(), room.clone());
                self.metrics.rooms_active.set(rooms.len() as i64);
                room
            }
        };
        let added = room.add_member(user.clone());
        (room, added)
    }

    /// Drops a live room nobody is present in; its task ends once the messages
    /// already queued are stored and answered. A later JOIN starts a new one.
    fn reap_if_empty(&self, room: &Arc<Room>) {
        let mut rooms = self.rooms.lock().expect("rooms lock");
        let current = rooms.get(&room.name).is_some_and(|r| Arc::ptr_eq(r, room));
        if current && room.is_empty() {
            rooms.remove(&room.name);
            self.metrics.rooms_active.set(rooms.len() as i64);
        }
    }

    pub fn existing_room(&self, name: &str) -> Option<Arc<Room>> {
        self.rooms.lock().expect("rooms lock").get(name).cloned()
    }

    pub fn add_session(&self, session: SessionHandle, token: String) {
        let mut online = self.online.write().expect("online lock");
        let u = online.entry(session.user.clone()).or_default();
        u.sessions.push(session);
        if !u.tokens.contains(&token) {
            u.tokens.push(token);
        }
    }

    /// Removes a session. If it was the user's last, the user leaves every room
    /// they were present in and the members hear `PART … <reason>`.
    pub fn remove_session(&self, session: &SessionHandle, reason: PartReason) {
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
        for name in rooms {
            if let Some(room) = self.existing_room(&name) {
                if room.remove_member(&session.user) {
                    let line = ServerLine::Parted {
                        room: name.clone(),
                        user: session.user.to_string(),
                        reason,
                    };
                    self.broadcast(&room, line.to_bytes(), None, None);
                    self.reap_if_empty(&room);
                }
            }
        }
    }

    /// Marks `user` present in `room` (all of their sessions receive it from now
    /// on). Announces `JOIN room user` to the room if they were not present.
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
        let (room, added) = self.join_live_room(room_name, user);
        if added {
            let line = ServerLine::Joined {
                room: room_name.to_string(),
                user: user.to_string(),
            };
            self.broadcast(&room, line.to_bytes(), None, None);
        }
    }

    /// Explicit PART: the user is no longer present (nor a member).
    pub fn leave_room(&self, user: &Arc<str>, room_name: &str) {
        if let Some(u) = self.online.write().expect("online lock").get_mut(user) {
            u.rooms.remove(room_name);
        }
        let Some(room) = self.existing_room(room_name) else {
            return;
        };
        let line = ServerLine::Parted {
            room: room_name.to_string(),
            user: user.to_string(),
            reason: PartReason::Left,
        }
        .to_bytes();
        if room.remove_member(user) {
            self.broadcast(&room, line.clone(), None, None);
            self.reap_if_empty(&room);
        }
        // The user's own sessions learn it too (they are no longer members).
        self.send_to_user(user, &line);
    }

    /// The live room, if `user` is present in it.
    pub fn present_room(&self, user: &str, room_name: &str) -> Option<Arc<Room>> {
        self.existing_room(room_name).filter(|r| r.has_member(user))
    }

    /// Queues `bytes` to every session of every present member, except one session.
    ///
    /// `pos` is the storage position of the write being delivered: every
    /// recipient session adopts it, so a client that has seen a message also
    /// finds it in `HISTORY` even when a lagging replica serves the read.
    pub fn broadcast(
        &self,
        room: &RoomCore,
        bytes: Bytes,
        except_session: Option<u64>,
        pos: Option<&String>,
    ) {
        let members = room.members.lock().expect("members lock");
        let online = self.online.read().expect("online lock");
        let mut n = 0;
        for user in members.iter() {
            if let Some(u) = online.get(user) {
                for s in &u.sessions {
                    if Some(s.id) == except_session {
                        continue;
                    }
                    // Before the line is queued: once the client can see it,
                    // its reads must too.
                    if pos.is_some() {
                        s.wrote(pos.cloned());
                    }
                    if s.line(bytes.clone()) {
                        n += 1;
                    }
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

    /// Hands a DM to every session of the recipient; false if offline.
    pub fn deliver_dm(&self, user: &str, bytes: &Bytes, id: i64) -> bool {
        let online = self.online.read().expect("online lock");
        match online.get(user) {
            Some(u) if !u.sessions.is_empty() => {
                for s in &u.sessions {
                    if s.send(crate::outbound::Out::Dm(bytes.clone(), id)) {
                        self.metrics.deliveries_total.inc();
                    }
                }
                true
            }
            _ => false,
        }
    }

    /// Online members of a room, sorted.
    pub fn present_members(&self, room_name: &str) -> Option<Vec<String>> {
        let room = self.existing_room(room_name)?;
        let members = room.members.lock().expect("members lock");
        let mut v: Vec<String> = members.iter().map(|u| u.to_string()).collect();
        v.sort();
        Some(v)
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
