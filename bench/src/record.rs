//! The JSONL records of the checked workload: one [`Record`] per line, written
//! by the bench (`--record FILE`) and read by the history checker of the fault
//! tests (tests/netns/checker.rs). Both sides use these types, so a field
//! renamed on one side fails to compile instead of reading as zero.
//!
//! A line: `{"t":<Unix ms>,"u":"<user>","e":"<kind>",…}`, e.g.
//! `{"t":1,"u":"ckh0u1","e":"ack","k":"msg","to":"ckr0","cid":"ckh0u1.3","seq":7}`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// When it happened, Unix ms.
    pub t: u64,
    /// The client's user name.
    pub u: String,
    #[serde(flatten)]
    pub entry: Entry,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A room message (`MSG`).
    Msg,
    /// A direct message (`DM`).
    Dm,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Msg => "msg",
            Kind::Dm => "dm",
        })
    }
}

/// How a room message arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    Live,
    Hist,
}

impl From<chat_client::Via> for Via {
    fn from(via: chat_client::Via) -> Via {
        match via {
            chat_client::Via::Live => Via::Live,
            chat_client::Via::History => Via::Hist,
        }
    }
}

/// Where an acknowledged send was stored, as the ack said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "lowercase")]
pub enum Ack {
    Msg { to: String, cid: String, seq: u64 },
    Dm { to: String, cid: String, id: i64 },
}

impl Ack {
    pub fn cid(&self) -> &str {
        match self {
            Ack::Msg { cid, .. } | Ack::Dm { cid, .. } => cid,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "e", rename_all = "lowercase")]
pub enum Entry {
    /// The first `OK JOIN` of a room: every later seq is the client's to receive.
    Join { room: String, seq: u64 },
    /// A new message, sent with client id `cid` (resends are not recorded).
    Send {
        k: Kind,
        to: String,
        cid: String,
        text: String,
    },
    /// The first acknowledgement of a send.
    Ack(Ack),
    /// An `ERR` from the server (`cid` when it names one), or a failure of the
    /// client's own (`GAVE_UP`, `TOKEN_INVALID`, `SWEEP_TIMEOUT`, …).
    Err {
        code: String,
        cid: Option<String>,
        detail: Option<String>,
    },
    /// The first receipt of a room seq.
    Msg {
        room: String,
        seq: u64,
        from: String,
        text: String,
        via: Via,
    },
    /// The first receipt of a DM id.
    Dm { id: i64, from: String, text: String },
    /// A read-your-writes probe: `ok` if a `HISTORY` right after the ack
    /// returned the message.
    Ryw { room: String, seq: u64, ok: bool },
    /// The connection was lost.
    Down { why: String },
    /// Logged in (again) through `target`.
    Up { target: String },
    /// The client finished: per room the last seq received with nothing
    /// missing below it, and the sends never acknowledged.
    End {
        rooms: BTreeMap<String, u64>,
        unacked: usize,
    },
}

impl Entry {
    /// The record of what the client state machine reported.
    pub fn of_event(event: chat_client::Event) -> Entry {
        use chat_client::{Event, Stored};
        match event {
            Event::Joined { room, seq } => Entry::Join { room, seq },
            Event::Message {
                room,
                seq,
                from,
                text,
                via,
            } => Entry::Msg {
                room,
                seq,
                from,
                text,
                via: via.into(),
            },
            Event::Dm { id, from, text } => Entry::Dm { id, from, text },
            Event::Acked {
                cid,
                stored: Stored::Room { room, seq },
            } => Entry::Ack(Ack::Msg { to: room, cid, seq }),
            Event::Acked {
                cid,
                stored: Stored::Dm { to, id },
            } => Entry::Ack(Ack::Dm { to, cid, id }),
            Event::ReadYourWrites { room, seq, ok } => Entry::Ryw { room, seq, ok },
        }
    }
}

/// The records of a JSONL file. Only the last line may be cut short (the
/// bench killed mid-write); it is left out.
pub fn read(path: &Path) -> anyhow::Result<Vec<Record>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&text).with_context(|| path.display().to_string())
}

/// [`read`] on text already read.
pub fn parse(text: &str) -> anyhow::Result<Vec<Record>> {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut records = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_str(line) {
            Ok(r) => records.push(r),
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => {}
            Err(e) => anyhow::bail!("line {}: {e}: {line}", i + 1),
        }
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(entry: Entry) -> Record {
        Record {
            t: 1,
            u: "a".into(),
            entry,
        }
    }

    #[test]
    fn lines_keep_their_format() {
        let ack = rec(Entry::Ack(Ack::Msg {
            to: "r".into(),
            cid: "a.1".into(),
            seq: 7,
        }));
        assert_eq!(
            serde_json::to_string(&ack).unwrap(),
            r#"{"t":1,"u":"a","e":"ack","k":"msg","to":"r","cid":"a.1","seq":7}"#
        );
        let send = rec(Entry::Send {
            k: Kind::Dm,
            to: "b".into(),
            cid: "a.2".into(),
            text: "c=a.2 x".into(),
        });
        assert_eq!(
            serde_json::to_string(&send).unwrap(),
            r#"{"t":1,"u":"a","e":"send","k":"dm","to":"b","cid":"a.2","text":"c=a.2 x"}"#
        );
    }

    #[test]
    fn every_entry_reads_back() {
        let entries = vec![
            Entry::Join {
                room: "r".into(),
                seq: 0,
            },
            Entry::Ack(Ack::Dm {
                to: "b".into(),
                cid: "a.2".into(),
                id: 9,
            }),
            Entry::Err {
                code: "GAVE_UP".into(),
                cid: None,
                detail: None,
            },
            Entry::Msg {
                room: "r".into(),
                seq: 1,
                from: "b".into(),
                text: "x".into(),
                via: Via::Hist,
            },
            Entry::Dm {
                id: 9,
                from: "a".into(),
                text: "y".into(),
            },
            Entry::Ryw {
                room: "r".into(),
                seq: 5,
                ok: true,
            },
            Entry::Down { why: "eof".into() },
            Entry::Up {
                target: "x:1".into(),
            },
            Entry::End {
                rooms: [("r".to_string(), 3)].into(),
                unacked: 0,
            },
        ];
        let text: String = entries
            .iter()
            .map(|e| serde_json::to_string(&rec(e.clone())).unwrap() + "\n")
            .collect();
        let back: Vec<Entry> = parse(&text).unwrap().into_iter().map(|r| r.entry).collect();
        assert_eq!(back, entries);
    }

    #[test]
    fn only_a_cut_last_line_is_left_out() {
        let good = r#"{"t":1,"u":"a","e":"down","why":"eof"}"#;
        assert_eq!(parse(&format!("{good}\n{{\"t\":2,\"u\"")).unwrap().len(), 1);
        assert!(parse(&format!("{{\"t\":2}}\n{good}\n")).is_err());
        // A field the checker needs, under another name: an error, not a zero.
        assert!(
            parse("{\"t\":1,\"u\":\"a\",\"e\":\"join\",\"room\":\"r\",\"sequence\":0}\n").is_err()
        );
    }
}
