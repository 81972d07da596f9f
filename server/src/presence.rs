//! Who is online on this server and where they are present: each user's
//! sessions, tokens and rooms, and the rooms as this server's clients see
//! them ([`LocalRoom`]: the members present here and the room's owner).
//!
//! Pure state: what must be told to other servers (a room to enter at its
//! owner, a user to locate) is returned to the caller, never sent from here.
//!
//! A room's members hold their user's session list, shared with the online
//! map, so fan-out to a room locks that room and each member's own list,
//! never the map of everyone online. Lock order: `online`, then `local`,
//! then a room's `members` or `owner`, then a user's sessions. `std` locks,
//! held only to update a map or to `try_send` encoded bytes, never across
//! `.await`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;

use crate::batch::Batch;
use crate::cluster::wire::NodeId;
use crate::metrics::Metrics;
use crate::outbound::{Out, SessionHandle};
use chat_admin::sync::{lock, read, write};

/// The sessions of one user on this server.
type Sessions = Mutex<Vec<SessionHandle>>;

struct OnlineUser {
    sessions: Arc<Sessions>,
    rooms: HashSet<String>,
    tokens: Vec<String>,
}

/// A room as this server's clients see it.
pub struct LocalRoom {
    pub name: String,
    members: Mutex<HashMap<Arc<str>, Arc<Sessions>>>,
    /// The server this room's presence was announced to.
    owner: Mutex<NodeId>,
}

impl LocalRoom {
    fn new(name: &str, owner: NodeId) -> LocalRoom {
        LocalRoom {
            name: name.to_string(),
            members: Mutex::new(HashMap::new()),
            owner: Mutex::new(owner),
        }
    }

    pub fn has_member(&self, user: &str) -> bool {
        lock(&self.members).contains_key(user)
    }

    pub fn member_names(&self) -> Vec<String> {
        lock(&self.members).keys().map(|u| u.to_string()).collect()
    }

    pub fn owner(&self) -> NodeId {
        lock(&self.owner).clone()
    }
}

/// A local room whose owner changed on the ring.
pub struct Moved {
    pub room: Arc<LocalRoom>,
    pub old: NodeId,
    pub new: NodeId,
}

pub struct Presence {
    online: RwLock<HashMap<Arc<str>, OnlineUser>>,
    local: Mutex<HashMap<String, Arc<LocalRoom>>>,
    metrics: Metrics,
}

impl Presence {
    pub fn new(metrics: Metrics) -> Presence {
        Presence {
            online: RwLock::new(HashMap::new()),
            local: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// Adds a session (its rooms are the user's); true if it is the user's
    /// first here (the user's hash owner must hear where the user is).
    pub fn add_session(&self, session: SessionHandle, token: String) -> bool {
        let mut online = write(&self.online);
        let u = online
            .entry(session.user.clone())
            .or_insert_with(|| OnlineUser {
                sessions: Arc::default(),
                rooms: HashSet::new(),
                tokens: Vec::new(),
            });
        if !u.tokens.contains(&token) {
            // Most users have one session and one token: no spare capacity.
            u.tokens.reserve_exact(1);
            u.tokens.push(token);
        }
        let mut sessions = lock(&u.sessions);
        sessions.reserve_exact(1);
        sessions.push(session);
        sessions.len() == 1
    }

    /// Removes a session. If it was the user's last, the user leaves every
    /// room they were present in: returns those rooms with their owners
    /// (each must hear the `Leave`), else `None`.
    pub fn remove_session(&self, session: &SessionHandle) -> Option<Vec<(String, NodeId)>> {
        let mut online = write(&self.online);
        let u = online.get_mut(&session.user)?;
        {
            let mut sessions = lock(&u.sessions);
            sessions.retain(|s| s.id != session.id);
            if !sessions.is_empty() {
                return None;
            }
        }
        let rooms = online.remove(&session.user)?.rooms;
        let left = rooms
            .into_iter()
            .filter_map(|room| {
                let owner = self.leave_local(&room, &session.user)?;
                Some((room, owner))
            })
            .collect();
        Some(left)
    }

    /// Marks `user` present in `room` (all of their sessions receive it from
    /// now on); `owner` names the room's owner should the room be new here.
    /// Returns the owner when the user was not present before (it must hear
    /// the `Enter`); `None` also when the user is not online.
    pub fn enter(&self, user: &str, room: &str, owner: impl FnOnce() -> NodeId) -> Option<NodeId> {
        let mut online = write(&self.online);
        let (name, u) = online.get_key_value(user)?;
        let (name, sessions) = (name.clone(), u.sessions.clone());
        online.get_mut(user)?.rooms.insert(room.to_string());
        let mut local = lock(&self.local);
        let r = local
            .entry(room.to_string())
            .or_insert_with(|| Arc::new(LocalRoom::new(room, owner())))
            .clone();
        self.metrics.rooms_active.set(local.len() as i64);
        let added = lock(&r.members).insert(name, sessions).is_none();
        added.then(|| r.owner())
    }

    /// Explicit PART: the user is no longer present (nor a member). Returns
    /// the room's owner if they were present.
    pub fn leave(&self, user: &str, room: &str) -> Option<NodeId> {
        let mut online = write(&self.online);
        if let Some(u) = online.get_mut(user) {
            u.rooms.remove(room);
        }
        self.leave_local(room, user)
    }

    /// Takes `user` out of the local room; drops the room when nobody here is
    /// present. Returns the room's owner if the user was present.
    fn leave_local(&self, room: &str, user: &str) -> Option<NodeId> {
        let mut local = lock(&self.local);
        let r = local.get(room)?.clone();
        let (removed, empty) = {
            let mut members = lock(&r.members);
            (members.remove(user).is_some(), members.is_empty())
        };
        if empty {
            local.remove(room);
            self.metrics.rooms_active.set(local.len() as i64);
        }
        removed.then(|| r.owner())
    }

    /// The local room, if `user` is present in it.
    pub fn present_room(&self, user: &str, room: &str) -> Option<Arc<LocalRoom>> {
        let r = lock(&self.local).get(room).cloned();
        r.filter(|r| r.has_member(user))
    }

    /// How many rooms `user` is present in (after login: every room they are
    /// a member of).
    pub fn rooms_of(&self, user: &str) -> usize {
        read(&self.online).get(user).map_or(0, |u| u.rooms.len())
    }

    /// Tokens of everyone online, to keep them from expiring.
    pub fn online_tokens(&self) -> Vec<String> {
        let online = read(&self.online);
        online
            .values()
            .flat_map(|u| u.tokens.iter().cloned())
            .collect()
    }

    /// Everyone online here.
    pub fn users(&self) -> Vec<Arc<str>> {
        read(&self.online).keys().cloned().collect()
    }

    /// The local rooms whose owner is `node`.
    pub fn rooms_owned_by(&self, node: &NodeId) -> Vec<Arc<LocalRoom>> {
        let local = lock(&self.local);
        local
            .values()
            .filter(|r| r.owner() == *node)
            .cloned()
            .collect()
    }

    /// Gives every local room the owner `owner_of` names now; returns the
    /// rooms whose owner changed (their presence moves to the new owner).
    pub fn reassign(&self, owner_of: impl Fn(&str) -> NodeId) -> Vec<Moved> {
        let rooms: Vec<Arc<LocalRoom>> = lock(&self.local).values().cloned().collect();
        let mut moved = Vec::new();
        for room in rooms {
            let new = owner_of(&room.name);
            let old = {
                let mut owner = lock(&room.owner);
                if *owner == new {
                    continue;
                }
                std::mem::replace(&mut *owner, new.clone())
            };
            moved.push(Moved { room, old, new });
        }
        moved
    }

    /// Queues a room's lines to every session of every member present here,
    /// except each line's excluded session.
    ///
    /// `pos` is the storage position of the write being delivered: every
    /// recipient session adopts it, so a client that has seen a message also
    /// finds it in `HISTORY` even when a lagging replica serves the read.
    pub fn deliver(&self, room: &str, batch: &Batch, pos: Option<&String>) {
        let Some(r) = lock(&self.local).get(room).cloned() else {
            return;
        };
        let members = lock(&r.members);
        let mut n = 0;
        for sessions in members.values() {
            for s in lock(sessions).iter() {
                // Before the line is queued: once the client can see it,
                // its reads must too.
                if pos.is_some() {
                    s.wrote(pos.cloned());
                }
                let Some((bytes, count)) = batch.for_session(s.id) else {
                    continue;
                };
                let out = if count == 1 && batch.lines().len() == 1 {
                    Out::Line(bytes)
                } else {
                    Out::Lines(bytes, count)
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
        let Some(sessions) = self.sessions(user) else {
            return false;
        };
        for s in lock(&sessions).iter() {
            s.line(bytes.clone());
        }
        true
    }

    /// Hands a DM to every session of the recipient here; false if none.
    pub fn deliver_dm(&self, user: &str, bytes: &Bytes, id: i64, pos: Option<&String>) -> bool {
        let Some(sessions) = self.sessions(user) else {
            return false;
        };
        let sessions = lock(&sessions);
        for s in sessions.iter() {
            if pos.is_some() {
                s.wrote(pos.cloned());
            }
            if s.send(Out::Dm(bytes.clone(), id)) {
                self.metrics.deliveries_total.inc();
            }
        }
        !sessions.is_empty()
    }

    fn sessions(&self, user: &str) -> Option<Arc<Sessions>> {
        read(&self.online).get(user).map(|u| u.sessions.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Line;
    use crate::outbound::{channel, Rx};

    fn presence() -> Presence {
        Presence::new(Metrics::new(&prometheus::Registry::new()).unwrap())
    }

    fn session(p: &Presence, id: u64, user: &str) -> (SessionHandle, Rx) {
        let (handle, rx) = channel(id, Arc::from(user), 16);
        p.add_session(handle.clone(), format!("token-{user}"));
        (handle, rx)
    }

    fn node(id: &str) -> NodeId {
        Arc::from(id)
    }

    /// The bytes of every item queued, in order.
    fn drain(rx: &mut Rx) -> Vec<Bytes> {
        std::iter::from_fn(|| rx.try_recv())
            .map(|out| match out {
                Out::Line(b) | Out::Lines(b, _) | Out::Dm(b, _) | Out::Close(b) => b,
            })
            .collect()
    }

    fn one_line(line: &'static [u8], except: Option<u64>) -> Batch {
        let meta = vec![Line {
            len: line.len() as u32,
            except,
        }];
        Batch::new(Bytes::from_static(line), meta).unwrap()
    }

    #[test]
    fn the_first_session_of_a_user_is_announced_once() {
        let p = presence();
        let (a1, _rx1) = channel(1, Arc::from("ann"), 16);
        let (a2, _rx2) = channel(2, Arc::from("ann"), 16);
        assert!(p.add_session(a1, "t".into()));
        assert!(!p.add_session(a2, "t".into()));
        assert_eq!(p.online_tokens(), vec!["t".to_string()], "one token, once");
    }

    #[test]
    fn entering_tells_the_owner_only_the_first_time() {
        let p = presence();
        let (_a, _rx) = session(&p, 1, "ann");
        let owner = node("o:1");
        assert_eq!(p.enter("ann", "r", || owner.clone()), Some(owner.clone()));
        assert_eq!(p.enter("ann", "r", || node("other:1")), None);
        assert_eq!(p.rooms_of("ann"), 1);
        assert!(p.present_room("ann", "r").is_some());
        assert!(p.present_room("bob", "r").is_none());
        assert_eq!(
            p.enter("bob", "r", || owner.clone()),
            None,
            "bob is offline"
        );
    }

    #[test]
    fn every_session_gets_a_rooms_lines_except_the_senders_own() {
        let p = presence();
        let (a1, mut rx1) = session(&p, 1, "ann");
        let (_a2, mut rx2) = session(&p, 2, "ann");
        let (_b, mut rx3) = session(&p, 3, "bob");
        p.enter("ann", "r", || node("me:1"));
        p.enter("bob", "r", || node("me:1"));
        let pos = "0-1-9".to_string();
        p.deliver(
            "r",
            &one_line(b"MSG r 1 0 ann hi\n", Some(a1.id)),
            Some(&pos),
        );
        assert!(
            drain(&mut rx1).is_empty(),
            "the sender's own session skips it"
        );
        assert_eq!(
            drain(&mut rx2),
            vec![Bytes::from_static(b"MSG r 1 0 ann hi\n")]
        );
        assert_eq!(
            drain(&mut rx3),
            vec![Bytes::from_static(b"MSG r 1 0 ann hi\n")]
        );
        assert_eq!(a1.read_pos(), Some(pos), "every member adopts the position");
        p.deliver("elsewhere", &one_line(b"x\n", None), None);
        assert!(drain(&mut rx3).is_empty());
    }

    #[test]
    fn a_session_that_logs_in_later_receives_its_users_rooms() {
        let p = presence();
        let (_a1, _rx1) = session(&p, 1, "ann");
        p.enter("ann", "r", || node("me:1"));
        let (_a2, mut rx2) = session(&p, 2, "ann");
        p.deliver("r", &one_line(b"JOIN r bob\n", None), None);
        assert_eq!(drain(&mut rx2).len(), 1);
    }

    #[test]
    fn the_last_session_leaves_every_room() {
        let p = presence();
        let (a1, _rx1) = session(&p, 1, "ann");
        let (a2, _rx2) = session(&p, 2, "ann");
        let (_b, _rx3) = session(&p, 3, "bob");
        p.enter("ann", "r", || node("o:1"));
        p.enter("ann", "s", || node("o:2"));
        p.enter("bob", "s", || node("o:2"));
        assert!(p.remove_session(&a1).is_none(), "ann is still online");
        assert_eq!(p.rooms_of("ann"), 2);
        let mut left = p.remove_session(&a2).unwrap();
        left.sort();
        assert_eq!(
            left,
            vec![
                ("r".to_string(), node("o:1")),
                ("s".to_string(), node("o:2"))
            ]
        );
        assert_eq!(p.rooms_of("ann"), 0);
        assert!(p.present_room("ann", "s").is_none());
        assert!(p.present_room("bob", "s").is_some());
        // `r` had only ann: it is gone, and comes back with its new owner.
        let (_a3, _rx4) = session(&p, 4, "ann");
        assert_eq!(p.enter("ann", "r", || node("o:3")), Some(node("o:3")));
    }

    #[test]
    fn part_leaves_one_room_and_tells_its_owner() {
        let p = presence();
        let (_a, _rx) = session(&p, 1, "ann");
        p.enter("ann", "r", || node("o:1"));
        assert_eq!(p.leave("ann", "r"), Some(node("o:1")));
        assert_eq!(p.leave("ann", "r"), None, "no longer present");
        assert_eq!(p.rooms_of("ann"), 0);
    }

    #[test]
    fn a_ring_change_moves_only_the_rooms_whose_owner_changed() {
        let p = presence();
        let (_a, _rx) = session(&p, 1, "ann");
        p.enter("ann", "r", || node("a:1"));
        p.enter("ann", "s", || node("b:1"));
        let moved = p.reassign(|room| {
            if room == "r" {
                node("c:1")
            } else {
                node("b:1")
            }
        });
        assert_eq!(moved.len(), 1);
        let m = &moved[0];
        assert_eq!(
            (m.room.name.as_str(), &*m.old, &*m.new),
            ("r", "a:1", "c:1")
        );
        assert_eq!(m.room.member_names(), vec!["ann".to_string()]);
        assert_eq!(p.present_room("ann", "r").unwrap().owner(), node("c:1"));
        assert!(p
            .reassign(|room| if room == "r" {
                node("c:1")
            } else {
                node("b:1")
            })
            .is_empty());
        assert_eq!(p.rooms_owned_by(&node("b:1")).len(), 1);
    }

    #[test]
    fn dms_reach_every_session_of_an_online_recipient() {
        let p = presence();
        let (_a1, mut rx1) = session(&p, 1, "ann");
        let (_a2, mut rx2) = session(&p, 2, "ann");
        let dm = Bytes::from_static(b"DM 7 0 bob hi\n");
        assert!(p.deliver_dm("ann", &dm, 7, None));
        assert!(matches!(rx1.try_recv(), Some(Out::Dm(_, 7))));
        assert!(matches!(rx2.try_recv(), Some(Out::Dm(_, 7))));
        assert!(!p.deliver_dm("bob", &dm, 8, None));
        assert!(p.send_to_user("ann", &dm));
        assert!(!p.send_to_user("bob", &dm));
    }
}
