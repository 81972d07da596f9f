//! The rooms this server owns, by name: started on first use (a member's
//! `Enter`, a message), dropped once nobody is present on any server. The
//! owner announces who joins and leaves to every server with members.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chat_protocol::{PartReason, ServerLine};

use crate::cluster::wire::NodeId;
use crate::room::{Outgoing, Publish, Room, RoomCtx};
use chat_admin::sync::lock;

pub struct OwnedRooms {
    rooms: Mutex<HashMap<String, Arc<Room>>>,
    ctx: Arc<RoomCtx>,
}

impl OwnedRooms {
    pub fn new(ctx: Arc<RoomCtx>) -> OwnedRooms {
        OwnedRooms {
            rooms: Mutex::new(HashMap::new()),
            ctx,
        }
    }

    /// The owned room, started on first use. Under the rooms' lock, so a
    /// room is never reaped between lookup and use.
    fn room(&self, name: &str) -> Arc<Room> {
        let mut rooms = lock(&self.rooms);
        if let Some(r) = rooms.get(name) {
            return r.clone();
        }
        let room = Room::start(self.ctx.clone(), name.to_string());
        rooms.insert(name.to_string(), room.clone());
        self.ctx.metrics.rooms_owned.set(rooms.len() as i64);
        room
    }

    /// The room by that name, if it is live.
    fn get(&self, name: &str) -> Option<Arc<Room>> {
        lock(&self.rooms).get(name).cloned()
    }

    /// Drops an owned room nobody is present in; its task ends once the
    /// messages already queued are stored and answered.
    fn reap_if_empty(&self, room: &Arc<Room>) {
        let mut rooms = lock(&self.rooms);
        let current = rooms.get(&room.name).is_some_and(|r| Arc::ptr_eq(r, room));
        if current && room.is_empty() {
            rooms.remove(&room.name);
            self.ctx.metrics.rooms_owned.set(rooms.len() as i64);
        }
    }

    /// A message for a room owned here, from this server or forwarded.
    pub async fn publish(&self, p: Publish) {
        let r = self.room(&p.room);
        r.publish(p).await;
        // A message for a room with nobody present (its members' servers have
        // not announced them yet) still gets stored and answered.
        self.reap_if_empty(&r);
    }

    /// `users` on server `node` are present in `room`: everyone hears
    /// `JOIN` for those who were not.
    pub fn enter(&self, node: &NodeId, room: &str, users: Vec<String>) {
        let r = self.room(room);
        let lines: Vec<Outgoing> = r
            .enter(node, users)
            .into_iter()
            .map(|user| Outgoing {
                line: ServerLine::Joined {
                    room: room.to_string(),
                    user,
                }
                .to_bytes(),
                except: None,
            })
            .collect();
        if !lines.is_empty() {
            self.ctx.fanout.fan_out(&r, &lines, None);
        }
    }

    /// `user` on server `node` left `room`: everyone hears the `PART`.
    pub fn leave(&self, node: &NodeId, room: &str, user: &str, reason: PartReason) {
        let Some(r) = self.get(room) else {
            return;
        };
        if r.leave(node, user) {
            let out = Outgoing {
                line: parted(room, user, reason),
                except: None,
            };
            self.ctx
                .fanout
                .fan_out(&r, std::slice::from_ref(&out), None);
        }
        self.reap_if_empty(&r);
    }

    /// Server `node` no longer follows `room` here: forget its members
    /// without a `PART` (they are announced at the room's new owner).
    pub fn unsubscribe(&self, node: &NodeId, room: &str) {
        let Some(r) = self.get(room) else {
            return;
        };
        r.drop_node(node);
        self.reap_if_empty(&r);
    }

    /// Server `node` left the ring: its users are no longer present in any
    /// room owned here.
    pub fn peer_lost(&self, node: &NodeId) {
        let rooms: Vec<Arc<Room>> = lock(&self.rooms).values().cloned().collect();
        for r in rooms {
            let lines: Vec<Outgoing> = r
                .drop_node(node)
                .into_iter()
                .map(|user| Outgoing {
                    line: parted(&r.name, &user, PartReason::Disconnected),
                    except: None,
                })
                .collect();
            if !lines.is_empty() {
                self.ctx.fanout.fan_out(&r, &lines, None);
            }
            self.reap_if_empty(&r);
        }
    }

    #[cfg(test)]
    pub fn core(&self, room: &str) -> Option<Arc<Room>> {
        self.get(room)
    }

    #[cfg(test)]
    pub fn ctx(&self) -> &RoomCtx {
        &self.ctx
    }

    /// Everyone present in `room`, on every server, sorted.
    pub fn members(&self, room: &str) -> Vec<String> {
        self.get(room).map(|r| r.present()).unwrap_or_default()
    }
}

fn parted(room: &str, user: &str, reason: PartReason) -> bytes::Bytes {
    ServerLine::Parted {
        room: room.to_string(),
        user: user.to_string(),
        reason,
    }
    .to_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::room::{Fanout, RoomCore};
    use chat_storage_client::DbClient;
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    /// One fan-out: the room, its destinations (sorted) and the lines.
    type Fanned = (String, Vec<String>, Vec<String>);

    #[derive(Default)]
    struct Recorder(Mutex<Vec<Fanned>>);

    impl Fanout for Recorder {
        fn fan_out(&self, room: &RoomCore, lines: &[Outgoing], _pos: Option<&String>) {
            let mut to: Vec<String> = room.destinations().iter().map(|n| n.to_string()).collect();
            to.sort();
            let lines = lines
                .iter()
                .map(|o| String::from_utf8_lossy(&o.line).trim_end().to_string())
                .collect();
            lock(&self.0).push((room.name.clone(), to, lines));
        }
    }

    impl Recorder {
        fn take(&self) -> Vec<Fanned> {
            std::mem::take(&mut *lock(&self.0))
        }
    }

    fn owned() -> (OwnedRooms, Arc<Recorder>, Metrics) {
        let metrics = Metrics::new(&prometheus::Registry::new()).unwrap();
        let sink = Arc::new(Recorder::default());
        let ctx = RoomCtx {
            // Never asked: these tests publish nothing.
            db: DbClient::new("http://127.0.0.1:9"),
            metrics: metrics.clone(),
            fanout: sink.clone(),
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            queue: 4,
            batch_max: 4,
        };
        (OwnedRooms::new(Arc::new(ctx)), sink, metrics)
    }

    fn node(id: &str) -> NodeId {
        Arc::from(id)
    }

    fn users(names: &[&str]) -> Vec<String> {
        names.iter().map(|u| u.to_string()).collect()
    }

    #[tokio::test]
    async fn joins_are_announced_once_to_every_server_with_members() {
        let (rooms, sink, metrics) = owned();
        let (a, b) = (node("a:1"), node("b:1"));
        rooms.enter(&a, "r", users(&["ann"]));
        rooms.enter(&b, "r", users(&["bob", "ann"]));
        rooms.enter(&b, "r", users(&["bob"]));
        let got = sink.take();
        assert_eq!(got.len(), 2, "the repeat announces nobody: {got:?}");
        assert_eq!(got[0].1, vec!["a:1"]);
        assert_eq!(got[0].2, vec!["JOIN r ann"]);
        assert_eq!(got[1].1, vec!["a:1", "b:1"]);
        assert_eq!(got[1].2, vec!["JOIN r bob", "JOIN r ann"]);
        assert_eq!(rooms.members("r"), users(&["ann", "bob"]));
        assert_eq!(metrics.rooms_owned.get(), 1);
    }

    #[tokio::test]
    async fn the_last_leave_drops_the_room() {
        let (rooms, sink, metrics) = owned();
        let a = node("a:1");
        rooms.enter(&a, "r", users(&["ann", "bob"]));
        sink.take();
        rooms.leave(&a, "r", "ann", PartReason::Left);
        rooms.leave(&a, "r", "ann", PartReason::Left);
        let got = sink.take();
        assert_eq!(got.len(), 1, "a second leave announces nothing");
        assert_eq!(got[0].2, vec!["PART r ann left"]);
        rooms.leave(&a, "r", "bob", PartReason::Idle);
        assert_eq!(
            sink.take()[0].1,
            Vec::<String>::new(),
            "nobody left to tell"
        );
        assert!(rooms.members("r").is_empty());
        assert_eq!(metrics.rooms_owned.get(), 0);
    }

    #[tokio::test]
    async fn a_room_that_moved_away_is_forgotten_without_parts() {
        let (rooms, sink, metrics) = owned();
        let (a, b) = (node("a:1"), node("b:1"));
        rooms.enter(&a, "r", users(&["ann"]));
        rooms.enter(&b, "r", users(&["bob"]));
        sink.take();
        rooms.unsubscribe(&a, "r");
        assert!(
            sink.take().is_empty(),
            "no PART: ann is still present elsewhere"
        );
        assert_eq!(rooms.members("r"), users(&["bob"]));
        rooms.unsubscribe(&b, "r");
        assert_eq!(metrics.rooms_owned.get(), 0);
        // Back again: a fresh room.
        rooms.enter(&a, "r", users(&["ann"]));
        assert_eq!(sink.take()[0].2, vec!["JOIN r ann"]);
        assert_eq!(metrics.rooms_owned.get(), 1);
    }

    #[tokio::test]
    async fn a_lost_server_s_users_part_as_disconnected() {
        let (rooms, sink, _) = owned();
        let (a, b) = (node("a:1"), node("b:1"));
        rooms.enter(&a, "r", users(&["ann"]));
        rooms.enter(&b, "r", users(&["bob"]));
        rooms.enter(&b, "s", users(&["bob"]));
        sink.take();
        rooms.peer_lost(&b);
        let mut got = sink.take();
        got.sort();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, "r");
        assert_eq!(got[0].1, vec!["a:1"], "told to the servers still there");
        assert_eq!(got[0].2, vec!["PART r bob disconnected"]);
        assert_eq!(rooms.members("r"), users(&["ann"]));
        assert!(rooms.members("s").is_empty());
    }
}
