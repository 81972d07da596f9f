//! What `chat client` remembers across connections, and how it reacts to each
//! server line: no I/O, so every rule below is unit-tested.
//!
//! - the token from `OK LOGIN` / `OK RESUME`, sent back as `RESUME` on reconnect;
//! - per room, which seqs have been shown: everything up to `contiguous`, plus
//!   the seqs above it in `above` (events that jumped a gap). A gap — a `MSG`
//!   past `contiguous + 1`, or an `OK JOIN` announcing more than was seen —
//!   asks `HISTORY <room> <contiguous>`, one request per room at a time, and
//!   asks again while the history answers make progress;
//! - `HIST` and `MSG` are shown once per seq, `DM` once per id;
//! - sends tracked by client id ([`Unacked`]) until acknowledged, resent after
//!   a retryable `ERR … id=<cid>`;
//! - optionally (the bench's checked workload) read-your-writes probes: a
//!   `HISTORY` for an own message right after its ack must return it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use chat_protocol::{ErrorCode, PartReason, ServerLine};

use crate::events::{Event, Stored, Via};
use crate::unacked::Unacked;

/// The server's default `HISTORY` limit: a full page means there may be more.
pub const HISTORY_PAGE: u32 = 100;

/// How many DM ids are remembered for de-duplication. Redelivery happens at the
/// next login, so recent ids are the ones that matter; the bound keeps a
/// long-running client's memory flat.
const MAX_SEEN_DMS: usize = 10_000;

/// What to do with one server line.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reaction {
    /// Show the line to the user (false for duplicates).
    pub show: bool,
    /// Lines to send to the server, in order.
    pub send: Vec<String>,
    /// Drop this connection and connect again (`RECONNECT` from the proxy).
    pub reconnect: bool,
}

impl Reaction {
    fn show() -> Reaction {
        Reaction {
            show: true,
            ..Reaction::default()
        }
    }

    fn hide() -> Reaction {
        Reaction::default()
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct RoomSeqs {
    /// Every seq up to here has been shown (or predates our joining).
    contiguous: u64,
    /// Seqs above `contiguous` that have been shown.
    above: BTreeSet<u64>,
    /// The highest seq known to exist in the room.
    target: u64,
}

impl RoomSeqs {
    fn starting_at(seq: u64) -> RoomSeqs {
        RoomSeqs {
            contiguous: seq,
            above: BTreeSet::new(),
            target: seq,
        }
    }

    /// Records `seq`; false if it was already seen.
    fn record(&mut self, seq: u64) -> bool {
        self.target = self.target.max(seq);
        if seq <= self.contiguous || !self.above.insert(seq) {
            return false;
        }
        while self.above.remove(&(self.contiguous + 1)) {
            self.contiguous += 1;
        }
        true
    }

    fn has_gap(&self) -> bool {
        self.contiguous < self.target
    }
}

/// What a [`ClientState`] does beyond what `chat client` needs; the default is
/// `chat client`.
#[derive(Debug, Clone)]
pub struct Options {
    /// The page size a catch-up `HISTORY` asks for; `None` leaves it to the
    /// server's default ([`HISTORY_PAGE`]).
    pub history_limit: Option<u32>,
    /// After the ack of an own message whose seq is a multiple of this, ask
    /// `HISTORY` for that message at once (a read-your-writes probe).
    pub read_your_writes_every: Option<u64>,
    /// Collect [`Event`]s for [`ClientState::take_events`], which the caller
    /// then drains after every line.
    pub events: bool,
    /// How long a tracked send waits after a retryable `ERR` before it is
    /// sent again.
    pub retry_pause: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            history_limit: None,
            read_your_writes_every: None,
            events: false,
            retry_pause: Duration::from_millis(250),
        }
    }
}

/// A read-your-writes `HISTORY` in flight: the seq it must return.
#[derive(Debug)]
struct Probe {
    seq: u64,
    hit: bool,
}

#[derive(Debug, Default)]
pub struct ClientState {
    options: Options,
    unacked: Unacked,
    probes: HashMap<String, Probe>,
    events: Vec<Event>,
    user: Option<String>,
    token: Option<String>,
    rooms: HashMap<String, RoomSeqs>,
    /// Rooms with a `HISTORY` request of ours in flight, and the seq it asked after.
    history_pending: HashMap<String, u64>,
    /// Rooms whose `HISTORY` the user typed: its `HIST` lines are all shown.
    user_history: HashSet<String>,
    seen_dms: HashSet<i64>,
    seen_dm_order: std::collections::VecDeque<i64>,
    quitting: bool,
}

impl ClientState {
    pub fn new() -> ClientState {
        ClientState::default()
    }

    pub fn with_options(options: Options) -> ClientState {
        ClientState {
            options,
            ..ClientState::default()
        }
    }

    /// The sends tracked by client id, not yet acknowledged.
    pub fn unacked(&mut self) -> &mut Unacked {
        &mut self.unacked
    }

    /// The events since the last call (empty unless [`Options::events`]).
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// An `OK JOIN` for `room` arrived (on this connection or an earlier one).
    pub fn joined(&self, room: &str) -> bool {
        self.rooms.contains_key(room)
    }

    /// Per room, the highest seq received with nothing missing below it.
    pub fn contiguous(&self) -> BTreeMap<String, u64> {
        self.rooms
            .iter()
            .map(|(room, seqs)| (room.clone(), seqs.contiguous))
            .collect()
    }

    /// No room has a known gap and no `HISTORY` of ours is in flight.
    pub fn caught_up(&self) -> bool {
        self.history_pending.is_empty() && self.rooms.values().all(|s| !s.has_gap())
    }

    /// `HISTORY` requests for every room with a gap and no request in flight:
    /// a periodic check, for gaps whose request failed or found too little.
    pub fn history_requests(&mut self) -> Vec<String> {
        let mut rooms: Vec<String> = self.rooms.keys().cloned().collect();
        rooms.sort();
        rooms.iter().filter_map(|r| self.ask_history(r)).collect()
    }

    #[cfg(test)]
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// The user asked to leave (`QUIT`), or the server said goodbye to a `QUIT`.
    pub fn quitting(&self) -> bool {
        self.quitting
    }

    /// Highest seq shown with nothing missing below it.
    #[cfg(test)]
    pub fn last_seen(&self, room: &str) -> Option<u64> {
        self.rooms.get(room).map(|r| r.contiguous)
    }

    /// A new connection is up: the lines that restore the session.
    pub fn on_connected(&mut self) -> Vec<String> {
        // Requests of the previous connection died with it.
        self.history_pending.clear();
        self.user_history.clear();
        self.probes.clear();
        match &self.token {
            // `ACK` first: DMs count as received only once acknowledged.
            Some(token) => vec![format!("RESUME {token}"), "ACK".into()],
            None => Vec::new(),
        }
    }

    /// A line the user typed, about to be sent verbatim; returns what to send
    /// right after it (`ACK` after a login line typed by the user).
    pub fn on_user_line(&mut self, line: &str) -> Option<&'static str> {
        let mut words = line.split_whitespace();
        let keyword = words.next().unwrap_or("").to_ascii_uppercase();
        // The servers' own rule for a first line (exact-case word), so
        // `ACK` follows only a line that can log in.
        let first_line = self.token.is_none()
            && matches!(
                chat_protocol::first::classify(line.as_bytes(), 0),
                Ok(chat_protocol::first::First::Start(_))
            );
        if first_line {
            return Some("ACK");
        }
        match keyword.as_str() {
            "QUIT" | "DISCONNECT" => self.quitting = true,
            "HISTORY" => {
                if let Some(room) = words.next() {
                    self.user_history.insert(room.to_string());
                }
            }
            _ => {}
        }
        None
    }

    pub fn on_line(&mut self, line: &ServerLine) -> Reaction {
        self.on_line_at(line, Instant::now())
    }

    /// [`Self::on_line`] at `now`, which starts the pause of a refused send.
    pub fn on_line_at(&mut self, line: &ServerLine, now: Instant) -> Reaction {
        if let ServerLine::Err { code, detail } = line {
            self.refused(*code, detail, now);
        }
        match line {
            ServerLine::OkLogin { user, token } | ServerLine::OkResume { user, token } => {
                self.on_login(user, token)
            }
            ServerLine::OkJoin { room, last_seq } => self.on_join(room, *last_seq),
            ServerLine::OkPart { room } => {
                self.forget_room(room);
                Reaction::show()
            }
            ServerLine::Parted {
                room,
                user,
                reason: PartReason::Left,
            } if self.user.as_deref() == Some(user) => {
                // Left from another session of ours: no longer a member.
                self.forget_room(room);
                Reaction::show()
            }
            ServerLine::OkMsg { room, seq, cid, .. } => self.on_ok_msg(room, *seq, cid.as_deref()),
            ServerLine::OkDm { to, id, cid, .. } => {
                if let Some(cid) = cid {
                    self.on_ack(cid, Stored::dm(to, *id));
                }
                Reaction::show()
            }
            ServerLine::Msg {
                room,
                seq,
                sender,
                text,
                ..
            } => self.on_msg(room, *seq, sender, text),
            ServerLine::Hist {
                room,
                seq,
                sender,
                text,
                ..
            } => self.on_hist(room, *seq, sender, text),
            ServerLine::OkHistory { room, count } => self.on_ok_history(room, *count),
            ServerLine::Dm {
                id, sender, text, ..
            } => self.on_dm(*id, sender, text),
            ServerLine::OkAck { .. } => Reaction::hide(),
            ServerLine::Err {
                code: ErrorCode::TokenInvalid,
                ..
            } => {
                // The session is gone for good: the user logs in again.
                self.token = None;
                Reaction::show()
            }
            ServerLine::Err {
                code: ErrorCode::NoSuchRoom,
                detail,
            } => {
                // Our own catch-up for a room that vanished: stop asking.
                if let Some(room) = detail.split_whitespace().next() {
                    self.history_pending.remove(room);
                }
                Reaction::show()
            }
            ServerLine::Bye { reason } => {
                if reason == "quit" {
                    self.quitting = true;
                }
                Reaction::show()
            }
            ServerLine::Reconnect { .. } => Reaction {
                show: true,
                reconnect: true,
                ..Reaction::default()
            },
            _ => Reaction::show(),
        }
    }

    fn on_login(&mut self, user: &str, token: &str) -> Reaction {
        if self.user.as_deref() != Some(user) {
            // Someone else now: the rooms we tracked are not theirs.
            self.rooms.clear();
            self.seen_dms.clear();
            self.seen_dm_order.clear();
        }
        self.user = Some(user.to_string());
        self.token = Some(token.to_string());
        Reaction::show()
    }

    fn on_join(&mut self, room: &str, last_seq: u64) -> Reaction {
        let mut reaction = Reaction::show();
        match self.rooms.get_mut(room) {
            Some(seqs) => {
                seqs.target = seqs.target.max(last_seq);
                reaction.send.extend(self.ask_history(room));
            }
            None => {
                self.rooms
                    .insert(room.to_string(), RoomSeqs::starting_at(last_seq));
                self.event(Event::Joined {
                    room: room.to_string(),
                    seq: last_seq,
                });
            }
        }
        reaction
    }

    /// Our own message was stored at `seq`.
    fn on_ok_msg(&mut self, room: &str, seq: u64, cid: Option<&str>) -> Reaction {
        if let Some(cid) = cid {
            let stored = Stored::Room {
                room: room.to_string(),
                seq,
            };
            self.on_ack(cid, stored);
        }
        self.seqs(room, seq).record(seq);
        let mut reaction = Reaction::show();
        reaction.send.extend(self.ask_history(room));
        if reaction.send.is_empty() {
            reaction.send.extend(self.probe(room, seq));
        }
        reaction
    }

    fn on_msg(&mut self, room: &str, seq: u64, sender: &str, text: &str) -> Reaction {
        let fresh = self.seqs(room, seq.saturating_sub(1)).record(seq);
        if fresh {
            self.received(room, seq, sender, text, Via::Live);
        }
        let mut reaction = if fresh {
            Reaction::show()
        } else {
            Reaction::hide()
        };
        reaction.send.extend(self.ask_history(room));
        reaction
    }

    fn on_hist(&mut self, room: &str, seq: u64, sender: &str, text: &str) -> Reaction {
        let user_asked = self.user_history.contains(room);
        if let Some(probe) = self.probes.get_mut(room) {
            probe.hit |= probe.seq == seq;
        }
        let fresh = match self.rooms.get_mut(room) {
            Some(seqs) => {
                let fresh = seqs.record(seq);
                if fresh {
                    self.received(room, seq, sender, text, Via::History);
                }
                fresh
            }
            // History of a room we are not in: nothing to track.
            None => true,
        };
        if fresh || user_asked {
            Reaction::show()
        } else {
            Reaction::hide()
        }
    }

    fn on_ok_history(&mut self, room: &str, count: u32) -> Reaction {
        let user_asked = self.user_history.remove(room);
        let mut reaction = if user_asked {
            Reaction::show()
        } else {
            Reaction::hide()
        };
        if let Some(probe) = self.probes.remove(room) {
            self.history_pending.remove(room);
            self.event(Event::ReadYourWrites {
                room: room.to_string(),
                seq: probe.seq,
                ok: probe.hit,
            });
            reaction.send.extend(self.ask_history(room));
            return reaction;
        }
        let page = self.options.history_limit.unwrap_or(HISTORY_PAGE);
        if let Some(asked_after) = self.history_pending.remove(room) {
            let progressed = self
                .rooms
                .get(room)
                .is_some_and(|s| s.contiguous > asked_after);
            // Ask again only while answers move us forward, so a seq
            // the server no longer has cannot loop us.
            if progressed || count >= page {
                reaction.send.extend(self.ask_history(room));
            }
        }
        reaction
    }

    fn on_dm(&mut self, id: i64, sender: &str, text: &str) -> Reaction {
        let mut reaction = if self.seen_dms.insert(id) {
            self.event(Event::Dm {
                id,
                from: sender.to_string(),
                text: text.to_string(),
            });
            self.seen_dm_order.push_back(id);
            if self.seen_dm_order.len() > MAX_SEEN_DMS {
                if let Some(old) = self.seen_dm_order.pop_front() {
                    self.seen_dms.remove(&old);
                }
            }
            Reaction::show()
        } else {
            Reaction::hide()
        };
        // Shown (now or before): acknowledged, so it stops waiting.
        reaction.send.push(format!("ACK {id}"));
        reaction
    }

    /// The seqs of `room`, starting at `before` if the room is new to us.
    fn seqs(&mut self, room: &str, before: u64) -> &mut RoomSeqs {
        self.rooms
            .entry(room.to_string())
            .or_insert_with(|| RoomSeqs::starting_at(before))
    }

    fn forget_room(&mut self, room: &str) {
        self.rooms.remove(room);
        self.history_pending.remove(room);
    }

    /// `HISTORY <room> <contiguous>` if the room has a gap and no request of
    /// ours is in flight for it.
    fn ask_history(&mut self, room: &str) -> Option<String> {
        let seqs = self.rooms.get(room)?;
        if !seqs.has_gap() || self.history_pending.contains_key(room) {
            return None;
        }
        let after = seqs.contiguous;
        self.history_pending.insert(room.to_string(), after);
        Some(match self.options.history_limit {
            Some(limit) => format!("HISTORY {room} {after} {limit}"),
            None => format!("HISTORY {room} {after}"),
        })
    }

    /// A read-your-writes probe for our own message `seq` in `room`, if one
    /// is due and no `HISTORY` is in flight for the room.
    fn probe(&mut self, room: &str, seq: u64) -> Option<String> {
        let every = self.options.read_your_writes_every?;
        if seq == 0 || seq % every != 0 || self.history_pending.contains_key(room) {
            return None;
        }
        self.history_pending.insert(room.to_string(), seq - 1);
        self.probes
            .insert(room.to_string(), Probe { seq, hit: false });
        Some(format!("HISTORY {room} {} 1", seq - 1))
    }

    fn on_ack(&mut self, cid: &str, stored: Stored) {
        if self.unacked.acked(cid) {
            self.event(Event::Acked {
                cid: cid.to_string(),
                stored,
            });
        }
    }

    /// An `ERR`: a tracked send it names (`id=<cid>`) waits and goes again if
    /// the cause may pass, or is given up; a failed request of ours without
    /// an id (`HISTORY`, `JOIN`) may be asked again.
    fn refused(&mut self, code: ErrorCode, detail: &str, now: Instant) {
        let cid = detail.strip_prefix("id=").and_then(|d| d.split(' ').next());
        match cid {
            Some(cid) => {
                // A DM's recipient may not have registered yet (clients of a
                // run start at about the same time).
                let retry = matches!(
                    code,
                    ErrorCode::Unavailable | ErrorCode::RateLimited | ErrorCode::NoSuchUser
                );
                let at = retry.then(|| now + self.options.retry_pause);
                self.unacked.refused(cid, at);
            }
            None if code == ErrorCode::Unavailable => {
                self.history_pending.clear();
                self.probes.clear();
            }
            None => {}
        }
    }

    fn received(&mut self, room: &str, seq: u64, from: &str, text: &str, via: Via) {
        self.event(Event::Message {
            room: room.to_string(),
            seq,
            from: from.to_string(),
            text: text.to_string(),
            via,
        });
    }

    fn event(&mut self, event: Event) {
        if self.options.events {
            self.events.push(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(s: &str) -> ServerLine {
        s.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    fn feed(state: &mut ClientState, s: &str) -> Reaction {
        state.on_line(&line(s))
    }

    const TOKEN: &str = "alice.0123456789abcdef0123456789abcdef";

    fn logged_in() -> ClientState {
        let mut s = ClientState::new();
        assert!(s.on_connected().is_empty());
        feed(&mut s, &format!("OK LOGIN alice {TOKEN}"));
        s
    }

    #[test]
    fn token_is_kept_and_resumed() {
        let mut s = logged_in();
        assert_eq!(s.token(), Some(TOKEN));
        assert_eq!(s.user(), Some("alice"));
        assert_eq!(
            s.on_connected(),
            vec![format!("RESUME {TOKEN}"), "ACK".into()]
        );
        let other = "ffffffffffffffffffffffffffffffff";
        feed(&mut s, &format!("OK RESUME alice {other}"));
        assert_eq!(
            s.on_connected(),
            vec![format!("RESUME {other}"), "ACK".into()]
        );
    }

    #[test]
    fn invalid_token_is_dropped() {
        let mut s = logged_in();
        let r = feed(&mut s, "ERR TOKEN_INVALID expired");
        assert!(r.show);
        assert!(s.token().is_none());
        assert!(s.on_connected().is_empty());
    }

    #[test]
    fn new_room_starts_at_join_without_history() {
        let mut s = logged_in();
        let r = feed(&mut s, "OK JOIN lobby 5");
        assert!(r.show);
        assert!(r.send.is_empty());
        assert_eq!(s.last_seen("lobby"), Some(5));
    }

    #[test]
    fn consecutive_messages_need_no_history() {
        let mut s = logged_in();
        feed(&mut s, "OK JOIN lobby 0");
        for seq in 1..=3 {
            let r = feed(&mut s, &format!("MSG lobby {seq} 100 bob hi"));
            assert_eq!(r, Reaction::show());
        }
        assert_eq!(s.last_seen("lobby"), Some(3));
    }

    #[test]
    fn own_ok_msg_counts_as_seen() {
        let mut s = logged_in();
        feed(&mut s, "OK JOIN lobby 0");
        assert!(feed(&mut s, "OK MSG lobby 1 100 id=1").send.is_empty());
        assert!(feed(&mut s, "MSG lobby 2 100 bob hi").send.is_empty());
        assert_eq!(s.last_seen("lobby"), Some(2));
    }

    #[test]
    fn gap_in_messages_asks_history_once_and_dedups() {
        let mut s = logged_in();
        feed(&mut s, "OK JOIN lobby 7");
        let r = feed(&mut s, "MSG lobby 10 100 bob ten");
        assert!(r.show);
        assert_eq!(r.send, vec!["HISTORY lobby 7"]);
        // A second event past the gap does not ask again while one is in flight.
        let r = feed(&mut s, "MSG lobby 11 100 bob eleven");
        assert!(r.show && r.send.is_empty());

        assert!(feed(&mut s, "HIST lobby 8 100 bob eight").show);
        assert!(feed(&mut s, "HIST lobby 9 100 bob nine").show);
        assert!(!feed(&mut s, "HIST lobby 10 100 bob ten").show);
        assert!(!feed(&mut s, "HIST lobby 11 100 bob eleven").show);
        let r = feed(&mut s, "OK HISTORY lobby 4");
        assert!(!r.show, "our own catch-up is silent");
        assert!(r.send.is_empty());
        assert_eq!(s.last_seen("lobby"), Some(11));
        // A late duplicate of a live event is dropped.
        assert!(!feed(&mut s, "MSG lobby 11 100 bob eleven").show);
    }

    #[test]
    fn resume_with_newer_room_asks_history() {
        let mut s = logged_in();
        feed(&mut s, "OK JOIN lobby 2");
        feed(&mut s, "MSG lobby 3 100 bob hi");
        // The connection drops; messages 4..=6 are sent meanwhile.
        assert_eq!(
            s.on_connected(),
            vec![format!("RESUME {TOKEN}"), "ACK".into()]
        );
        feed(&mut s, &format!("OK RESUME alice {TOKEN}"));
        let r = feed(&mut s, "OK JOIN lobby 6");
        assert_eq!(r.send, vec!["HISTORY lobby 3"]);
        // Nothing new in another room: no request.
        feed(&mut s, "OK JOIN quiet 0");
        assert!(feed(&mut s, "OK JOIN quiet 0").send.is_empty());
        for seq in 4..=6 {
            assert!(feed(&mut s, &format!("HIST lobby {seq} 100 bob m{seq}")).show);
        }
        assert!(feed(&mut s, "OK HISTORY lobby 3").send.is_empty());
        assert_eq!(s.last_seen("lobby"), Some(6));
    }

    #[test]
    fn full_history_page_asks_for_the_next() {
        let mut s = logged_in();
        feed(&mut s, "OK JOIN big 0");
        s.on_connected();
        let r = feed(&mut s, "OK JOIN big 250");
        assert_eq!(r.send, vec!["HISTORY big 0"]);
        for seq in 1..=100 {
            feed(&mut s, &format!("HIST big {seq} 1 bob m"));
        }
        let r = feed(&mut s, "OK HISTORY big 100");
        assert_eq!(r.send, vec!["HISTORY big 100"]);
    }

    #[test]
    fn history_without_progress_stops_asking() {
        let mut s = logged_in();
        feed(&mut s, "OK JOIN lobby 1");
        assert_eq!(
            feed(&mut s, "MSG lobby 3 1 bob x").send,
            vec!["HISTORY lobby 1"]
        );
        // The server no longer has seq 2: the answer brings only seq 3.
        feed(&mut s, "HIST lobby 3 1 bob x");
        assert!(feed(&mut s, "OK HISTORY lobby 1").send.is_empty());
    }

    #[test]
    fn user_typed_history_is_shown_in_full() {
        let mut s = logged_in();
        feed(&mut s, "OK JOIN lobby 2");
        s.on_user_line("history lobby 0");
        assert!(feed(&mut s, "HIST lobby 1 1 bob a").show);
        assert!(feed(&mut s, "HIST lobby 2 1 bob b").show);
        assert!(feed(&mut s, "OK HISTORY lobby 2").show);
        assert!(!feed(&mut s, "HIST lobby 2 1 bob b").show);
    }

    #[test]
    fn dms_are_shown_once() {
        let mut s = logged_in();
        let first = feed(&mut s, "DM 5 100 bob hello");
        assert!(first.show);
        assert_eq!(first.send, ["ACK 5"], "a DM is acknowledged");
        let again = feed(&mut s, "DM 5 100 bob hello");
        assert!(!again.show);
        assert_eq!(
            again.send,
            ["ACK 5"],
            "and acknowledged again when redelivered"
        );
        assert!(feed(&mut s, "DM 6 100 bob again").show);
        assert!(!feed(&mut s, "OK ACK 1").show);
    }

    #[test]
    fn a_typed_login_is_followed_by_ack() {
        let mut s = ClientState::new();
        assert_eq!(s.on_user_line("LOGIN alice pw"), Some("ACK"));
        assert_eq!(s.on_user_line("JOIN lobby dave"), Some("ACK"));
        // Not a first line for the servers (exact case), so no ACK after it.
        assert_eq!(s.on_user_line("join lobby dave"), None);
        assert_eq!(s.on_user_line(""), None);
        let mut s = logged_in();
        assert_eq!(s.on_user_line("JOIN lobby"), None);
        assert_eq!(s.on_user_line("LOGIN alice pw"), None, "logged in already");
    }

    #[test]
    fn quit_is_remembered() {
        let mut s = logged_in();
        assert!(!s.quitting());
        s.on_user_line("quit");
        assert!(s.quitting());
        let mut s = logged_in();
        feed(&mut s, "BYE quit");
        assert!(s.quitting());
        let mut s = logged_in();
        feed(&mut s, "BYE shutdown");
        assert!(!s.quitting());
    }

    #[test]
    fn reconnect_line_asks_to_reconnect() {
        let mut s = logged_in();
        assert!(feed(&mut s, "RECONNECT rebalance").reconnect);
    }

    #[test]
    fn part_forgets_the_room() {
        let mut s = logged_in();
        feed(&mut s, "OK JOIN lobby 3");
        feed(&mut s, "OK PART lobby");
        assert_eq!(s.last_seen("lobby"), None);
        // Rejoining later starts afresh: no catch-up for the time away.
        assert!(feed(&mut s, "OK JOIN lobby 9").send.is_empty());
        feed(&mut s, "PART lobby alice left");
        assert_eq!(s.last_seen("lobby"), None);
    }

    #[test]
    fn another_user_starts_clean() {
        let mut s = logged_in();
        feed(&mut s, "OK JOIN lobby 3");
        feed(&mut s, "DM 1 1 bob x");
        feed(&mut s, &format!("OK LOGIN carol {TOKEN}"));
        assert_eq!(s.last_seen("lobby"), None);
        assert!(feed(&mut s, "DM 1 1 bob x").show);
    }
}
