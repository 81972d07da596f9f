//! The history checker: the JSONL records of every client host (what was
//! sent, acknowledged, delivered) against what the database holds at the end.
//!
//! It proves, or reports as lost / duplicated / a problem:
//! 1. every acked message is stored exactly once, where the ack said (room
//!    and seq, or DM id);
//! 2. per room, seq is dense from 1 with no duplicates, and `rooms.last_seq`
//!    matches;
//! 3. every member (all stay joined) received every room message after its
//!    join seq — live, through HISTORY, or as the ack of its own — with the
//!    stored text;
//! 4. every acked DM was delivered to its recipient, or is still pending
//!    (unreceived) in storage;
//! 5. nothing stored or delivered was never sent (texts carry the client id);
//!
//! plus: every send ends acked, every read-your-writes probe saw its message,
//! every client finished its run.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;

use chat_bench::record::{self, Ack, Entry, Kind, Record, Via};

use super::mariadb::Db;

#[derive(Debug, Default)]
pub struct Outcome {
    pub sent: usize,
    pub acked: usize,
    pub delivered: usize,
    /// Of `delivered`: DMs received.
    pub delivered_dms: usize,
    /// Of `delivered`: room messages received live (`MSG`), not through `HISTORY`.
    pub delivered_live: usize,
    pub lost: usize,
    pub duplicated: usize,
    /// Longest send → ack wait among messages in flight at or after the fault.
    pub recovery_secs: Option<f64>,
    pub dms_pending: usize,
    pub ryw_probes: usize,
    pub reconnects: usize,
    /// `ERR UNAVAILABLE` answers seen (retried).
    pub unavailable: usize,
    pub problems: Vec<String>,
}

/// One row of the `messages` table: a room message (`room` set) or a DM.
pub struct Stored {
    pub room: String,
    pub seq: u64,
    pub sender: String,
    pub cid: String,
    pub body: String,
    pub recipient: String,
    pub id: i64,
    pub received: bool,
}

fn dump(db: &Db) -> (Vec<Stored>, HashMap<String, u64>) {
    let rows = db.sql(
        "SELECT IFNULL(r.name, ''), IFNULL(m.seq, 0), s.name, IFNULL(m.client_id, ''), m.body,
                IFNULL(u.name, ''), m.id, m.received_at_ms IS NOT NULL
         FROM chat.messages m JOIN chat.users s ON s.id = m.sender_id
         LEFT JOIN chat.rooms r ON r.id = m.room_id
         LEFT JOIN chat.users u ON u.id = m.recipient_id
         ORDER BY m.id",
    );
    let stored = rows
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f.len(), 8, "bad row {l:?}");
            Stored {
                room: f[0].into(),
                seq: f[1].parse().expect("seq"),
                sender: f[2].into(),
                cid: f[3].into(),
                body: f[4].into(),
                recipient: f[5].into(),
                id: f[6].parse().expect("id"),
                received: f[7] == "1",
            }
        })
        .collect();
    let last = db
        .sql("SELECT name, last_seq FROM chat.rooms")
        .lines()
        .filter_map(|l| {
            let (n, s) = l.split_once('\t')?;
            Some((n.to_owned(), s.parse().ok()?))
        })
        .collect();
    (stored, last)
}

fn records(paths: &[PathBuf]) -> Vec<Record> {
    paths
        .iter()
        .flat_map(|p| record::read(p).unwrap_or_else(|e| panic!("{e:#}")))
        .collect()
}

/// Checks the run; `fault_ms` is when the fault was injected (Unix ms).
pub fn check(paths: &[PathBuf], db: &Db, users: usize, fault_ms: Option<u64>) -> Outcome {
    let recs = records(paths);
    let (stored, last_seq) = dump(db);
    check_data(&recs, &stored, &last_seq, users, fault_ms)
}

/// [`check`] on data already read: the records, the stored messages and each
/// room's `last_seq`.
pub fn check_data(
    recs: &[Record],
    stored: &[Stored],
    last_seq: &HashMap<String, u64>,
    users: usize,
    fault_ms: Option<u64>,
) -> Outcome {
    let mut o = Outcome::default();
    let problem = |o: &mut Outcome, p: String| {
        if o.problems.len() < 50 {
            o.problems.push(p);
        }
    };

    // What each client did.
    let mut sends: HashMap<(String, String), (Kind, String, String, u64)> = HashMap::new();
    let mut acks: HashMap<(String, String), (Kind, String, u64, u64)> = HashMap::new();
    let mut joins: Vec<(String, String, u64)> = Vec::new();
    let mut got_msgs: HashMap<(String, String), BTreeMap<u64, String>> = HashMap::new();
    let mut got_dms: HashMap<String, HashMap<i64, (String, String)>> = HashMap::new();
    let mut ended = HashSet::new();
    let mut down_since: HashMap<String, u64> = HashMap::new();
    let mut outages: Vec<u64> = Vec::new();
    for r in recs {
        let u = r.u.clone();
        match &r.entry {
            Entry::Send { k, to, cid, text } => {
                sends
                    .entry((u, cid.clone()))
                    .or_insert((*k, to.clone(), text.clone(), r.t));
            }
            Entry::Ack(ack) => {
                let (kind, to, id) = match ack {
                    Ack::Msg { to, seq, .. } => (Kind::Msg, to, *seq),
                    Ack::Dm { to, id, .. } => (Kind::Dm, to, *id as u64),
                };
                acks.insert((u, ack.cid().to_owned()), (kind, to.clone(), id, r.t));
            }
            Entry::Join { room, seq } => joins.push((u, room.clone(), *seq)),
            Entry::Msg {
                room,
                seq,
                from,
                text,
                via,
            } => {
                let text = format!("{from}\u{0}{text}");
                got_msgs
                    .entry((u, room.clone()))
                    .or_default()
                    .insert(*seq, text);
                o.delivered += 1;
                if *via == Via::Live {
                    o.delivered_live += 1;
                }
            }
            Entry::Dm { id, from, text } => {
                got_dms
                    .entry(u)
                    .or_default()
                    .insert(*id, (from.clone(), text.clone()));
                o.delivered += 1;
                o.delivered_dms += 1;
            }
            Entry::Ryw { room, seq, ok } => {
                o.ryw_probes += 1;
                if !ok {
                    let p = format!("read-your-writes: {u} did not read back {room} #{seq}");
                    problem(&mut o, p);
                }
            }
            Entry::Down { .. } => {
                o.reconnects += 1;
                down_since.entry(u).or_insert(r.t);
            }
            Entry::Up { .. } => {
                if let Some(t) = down_since.remove(&u) {
                    if fault_ms.is_some_and(|f| t >= f) {
                        outages.push(r.t.saturating_sub(t));
                    }
                }
            }
            Entry::Err { code, detail, .. } => match code.as_str() {
                "UNAVAILABLE" => o.unavailable += 1,
                "RATE_LIMITED" | "NO_SUCH_USER" => {}
                other => {
                    let detail = detail.as_deref().unwrap_or_default();
                    let p = format!("{u}: error {other} {detail}");
                    problem(&mut o, p);
                }
            },
            Entry::End { unacked, .. } => {
                ended.insert(u.clone());
                if *unacked > 0 {
                    let p = format!("{u}: {unacked} sends never acked");
                    problem(&mut o, p);
                }
            }
        }
    }
    o.sent = sends.len();
    o.acked = acks.len();
    if ended.len() != users {
        let p = format!("{} of {users} clients finished their run", ended.len());
        problem(&mut o, p);
    }

    // 5. Nothing stored that was never sent; duplicates by sender and id, or by text.
    let mut by_key: HashMap<(String, String), Vec<&Stored>> = HashMap::new();
    let mut texts = HashSet::new();
    for m in stored {
        by_key
            .entry((m.sender.clone(), m.cid.clone()))
            .or_default()
            .push(m);
        if !texts.insert(m.body.clone()) {
            o.duplicated += 1;
            let p = format!("text stored twice: {:?}", m.body);
            problem(&mut o, p);
        }
        match sends.get(&(m.sender.clone(), m.cid.clone())) {
            Some((_, _, text, _)) if *text == m.body => {}
            _ => {
                let p = format!(
                    "stored but never sent: {} {:?} {:?}",
                    m.sender, m.cid, m.body
                );
                problem(&mut o, p);
            }
        }
    }

    // 1. Every ack stored exactly once, where it said.
    for ((u, cid), (kind, to, id, _)) in &acks {
        let rows = by_key
            .get(&(u.clone(), cid.clone()))
            .map_or(&[][..], |v| &v[..]);
        match rows.len() {
            0 => {
                o.lost += 1;
                let p = format!("acked but not stored: {u} {cid}");
                problem(&mut o, p);
            }
            k => {
                o.duplicated += k - 1;
                let m = rows[0];
                let same = if *kind == Kind::Msg {
                    m.room == *to && m.seq == *id
                } else {
                    m.recipient == *to && m.id as u64 == *id
                };
                if !same {
                    let p = format!("ack of {u} {cid} ({kind} {to} {id}) differs from storage");
                    problem(&mut o, p);
                }
            }
        }
    }

    // 2. Dense, unique seqs per room.
    let mut rooms: HashMap<String, BTreeMap<u64, String>> = HashMap::new();
    for m in stored.iter().filter(|m| !m.room.is_empty()) {
        let text = format!("{}\u{0}{}", m.sender, m.body);
        if rooms
            .entry(m.room.clone())
            .or_default()
            .insert(m.seq, text)
            .is_some()
        {
            o.duplicated += 1;
            let p = format!("{} seq {} stored twice", m.room, m.seq);
            problem(&mut o, p);
        }
    }
    for (room, seqs) in &rooms {
        let n = seqs.len() as u64;
        if seqs.keys().next() != Some(&1) || seqs.keys().last() != Some(&n) {
            let p = format!("{room}: seqs not dense 1..={n}");
            problem(&mut o, p);
        }
        if last_seq.get(room) != Some(&n) {
            let p = format!("{room}: last_seq {:?} but {n} messages", last_seq.get(room));
            problem(&mut o, p);
        }
    }

    // 3. Every member got every message after its join.
    let mut own: HashMap<(String, String), BTreeSet<u64>> = HashMap::new();
    for ((u, _), (kind, to, seq, _)) in &acks {
        if *kind == Kind::Msg {
            own.entry((u.clone(), to.clone())).or_default().insert(*seq);
        }
    }
    let empty_map = BTreeMap::new();
    let empty_set = BTreeSet::new();
    for (u, room, base) in &joins {
        let key = (u.clone(), room.clone());
        let got = got_msgs.get(&key).unwrap_or(&empty_map);
        let mine = own.get(&key).unwrap_or(&empty_set);
        let all = rooms.get(room).unwrap_or(&empty_map);
        let missing: Vec<u64> = all
            .range(base + 1..)
            .map(|(s, _)| *s)
            .filter(|s| !got.contains_key(s) && !mine.contains(s))
            .collect();
        if !missing.is_empty() {
            o.lost += missing.len();
            let p = format!("{u} in {room} never received seqs {missing:?}");
            problem(&mut o, p);
        }
        for (seq, text) in got {
            if all.get(seq) != Some(text) {
                let p = format!(
                    "{u} got {room} #{seq} {text:?}, storage has {:?}",
                    all.get(seq)
                );
                problem(&mut o, p);
            }
        }
    }

    // 4. Acked DMs delivered or pending.
    let by_id: HashMap<i64, &Stored> = stored
        .iter()
        .filter(|m| m.room.is_empty())
        .map(|m| (m.id, m))
        .collect();
    for ((u, cid), (kind, to, id, _)) in &acks {
        if *kind != Kind::Dm {
            continue;
        }
        let id = *id as i64;
        match got_dms.get(to).and_then(|d| d.get(&id)) {
            Some((from, text)) => {
                let ok = by_id
                    .get(&id)
                    .is_some_and(|m| m.sender == *from && m.body == *text);
                if !ok || from != u {
                    let p =
                        format!("DM {id} to {to} delivered as {from} {text:?}, sent by {u} {cid}");
                    problem(&mut o, p);
                }
            }
            None if by_id.get(&id).is_some_and(|m| !m.received) => o.dms_pending += 1,
            None => {
                o.lost += 1;
                let p = format!("DM {id} ({u} {cid}) to {to}: neither delivered nor pending");
                problem(&mut o, p);
            }
        }
    }
    for (to, dms) in &got_dms {
        for (id, (from, text)) in dms {
            match by_id.get(id) {
                Some(m) if m.recipient == *to && m.sender == *from && m.body == *text => {}
                _ => {
                    let p =
                        format!("{to} got DM {id} from {from} {text:?} that storage does not hold");
                    problem(&mut o, p);
                }
            }
        }
    }

    // Recovery: the longest a client waited, after the fault, for an ack
    // (from the first send of that message) or to be logged in again (from
    // losing its connection).
    if let Some(f) = fault_ms {
        o.recovery_secs = acks
            .iter()
            .filter_map(|(k, (_, _, _, acked_at))| {
                let sent_at = sends.get(k)?.3;
                (*acked_at >= f).then(|| acked_at.saturating_sub(sent_at))
            })
            .chain(outages)
            .max()
            .map(|ms| ms as f64 / 1000.0);
    }
    o
}

pub fn table_header() -> String {
    format!(
        "| {:<26} | {:>5} | {:>5} | {:>9} | {:>4} | {:>10} | {:>8} | {:>10} |",
        "scenario", "sent", "acked", "delivered", "lost", "duplicated", "recovery", "reconnects"
    ) + "\n|"
        + &"-".repeat(28)
        + "|------:|------:|----------:|-----:|-----------:|---------:|-----------:|"
}

pub fn table_row(name: &str, o: &Outcome) -> String {
    let rec = o
        .recovery_secs
        .map_or("-".to_string(), |r| format!("{r:.2} s"));
    format!(
        "| {:<26} | {:>5} | {:>5} | {:>9} | {:>4} | {:>10} | {:>8} | {:>10} |",
        name, o.sent, o.acked, o.delivered, o.lost, o.duplicated, rec, o.reconnects
    )
}
