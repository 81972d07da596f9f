//! The server-to-server protocol: what chat servers say to each other over
//! their links.
//!
//! A link is a TCP connection to a peer's client port. It opens with one text
//! line, `PEER <id> <secret>`, answered `OK PEER <id>`; after that both
//! directions carry frames: a 4-byte big-endian length, then one
//! [`PeerMsg`]. Every frame is JSON except `Deliver`, which carries lines
//! clients receive: `D`, a 4-byte big-endian length, a small JSON head (the
//! room, the storage position, each line's length and excluded session),
//! then the lines' bytes exactly as clients receive them, so they are
//! neither escaped nor parsed on the way. The dialling server sends requests
//! and events; the accepting server answers `Who` with
//! [`PeerMsg::Members`] on the same connection. Answers to `Publish`
//! ([`PeerMsg::Published`]) travel on the owner's own link, behind its
//! deliveries (on the request's connection when that link is down). Both
//! sides send a heartbeat every `heartbeat_ms`. Each server dials every
//! peer, so each ordered pair of servers has its own connection and a room
//! owner's deliveries to one server arrive in the order it sent them.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use chat_storage_api::Appended;
use serde::{Deserialize, Serialize};
use tokio_util::codec::LengthDelimitedCodec;

use crate::batch::{Batch, Line};

/// A server's id: its client address as the proxies list it.
pub type NodeId = Arc<str>;

/// Largest frame accepted (a batch of deliveries of long lines fits easily).
pub const MAX_FRAME: usize = 16 << 20;

/// First word of the text line that opens a link.
pub const HELLO: &str = "PEER";

/// First byte of a `Deliver` frame (a JSON frame starts with `{`).
const DELIVER: u8 = b'D';

pub fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

/// Why the room's owner did not store a forwarded message, as the sender's
/// client is to be told: a protocol `ERR` code and its detail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code} {detail}")]
pub struct PeerError {
    pub code: String,
    pub detail: String,
}

/// A frame that is not a [`PeerMsg`].
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("bad JSON frame: {0}")]
    Json(#[from] serde_json::Error),
    #[error("bad Deliver frame: {0}")]
    Deliver(&'static str),
}

/// Member's server → room owner: store and fan out this message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Forwarded {
    pub req: u64,
    pub room: String,
    pub sender: String,
    /// The sender's session on the member's server.
    pub session: u64,
    pub cid: Option<String>,
    pub text: String,
}

/// The owner's answer to a [`Forwarded`] message.
#[derive(Debug, Clone)]
pub struct Published {
    pub result: Result<Appended, PeerError>,
    /// Storage position of the write (read-your-writes).
    pub pos: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum PeerMsg {
    Publish(Forwarded),
    /// Owner → member's server: the answer to `Publish`.
    Published {
        req: u64,
        result: Result<Appended, PeerError>,
        pos: Option<String>,
    },
    /// These users, on the sending server, are present in the room.
    Enter {
        room: String,
        users: Vec<String>,
    },
    /// This user, on the sending server, left the room (`reason` as in `PART`).
    Leave {
        room: String,
        user: String,
        reason: String,
    },
    /// The sending server no longer follows the room at this owner (the room
    /// moved on its ring): forget its users there without a `PART`.
    Unsubscribe {
        room: String,
    },
    /// Who is present in the room, on every server?
    Who {
        req: u64,
        room: String,
    },
    /// Answer to `Who`.
    Members {
        req: u64,
        users: Vec<String>,
    },
    /// Owner → member's server: lines for the room's local members, in
    /// order, and the storage position of the write they report. Not JSON
    /// (see the module's documentation).
    #[serde(skip)]
    Deliver {
        room: String,
        pos: Option<String>,
        batch: Batch,
    },
    /// A stored direct message for `recipient`. `forwarded` once the
    /// recipient's hash owner has passed it on, so it travels at most twice.
    Dm {
        recipient: String,
        line: String,
        id: i64,
        pos: Option<String>,
        forwarded: bool,
    },
    /// To a user's hash owner: the user is connected here (`here`), or no
    /// longer is. The owner forwards the user's DMs accordingly.
    Locate {
        user: String,
        here: bool,
    },
    /// Heartbeat of the dialling side, every `heartbeat_ms`.
    Ping,
    /// Heartbeat of the accepting side, every `heartbeat_ms`.
    Pong,
    /// The sending server is draining: take it out of the ring.
    Draining,
}

/// The JSON head of a `Deliver` frame.
#[derive(Serialize, Deserialize)]
struct DeliverHead {
    room: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pos: Option<String>,
    lines: Vec<Line>,
}

impl PeerMsg {
    pub fn encode(&self) -> Bytes {
        match self {
            PeerMsg::Deliver { room, pos, batch } => encode_deliver(room, pos, batch),
            // Serialising these plain structs cannot fail.
            _ => Bytes::from(serde_json::to_vec(self).unwrap_or_default()),
        }
    }

    pub fn decode(frame: Bytes) -> Result<PeerMsg, WireError> {
        if frame.first() == Some(&DELIVER) {
            return decode_deliver(frame);
        }
        Ok(serde_json::from_slice(&frame)?)
    }
}

fn encode_deliver(room: &str, pos: &Option<String>, batch: &Batch) -> Bytes {
    let head = DeliverHead {
        room: room.to_string(),
        pos: pos.clone(),
        lines: batch.lines().to_vec(),
    };
    let head = serde_json::to_vec(&head).unwrap_or_default();
    let mut frame = BytesMut::with_capacity(5 + head.len() + batch.bytes().len());
    frame.put_u8(DELIVER);
    frame.put_u32(head.len() as u32);
    frame.extend_from_slice(&head);
    frame.extend_from_slice(batch.bytes());
    frame.freeze()
}

fn decode_deliver(mut frame: Bytes) -> Result<PeerMsg, WireError> {
    if frame.len() < 5 {
        return Err(WireError::Deliver("shorter than its header"));
    }
    let head_len = u32::from_be_bytes([frame[1], frame[2], frame[3], frame[4]]) as usize;
    let _ = frame.split_to(5);
    if head_len > frame.len() {
        return Err(WireError::Deliver("head longer than the frame"));
    }
    let head: DeliverHead = serde_json::from_slice(&frame.split_to(head_len))?;
    let batch = Batch::new(frame, head.lines)
        .ok_or(WireError::Deliver("line lengths do not match the bytes"))?;
    Ok(PeerMsg::Deliver {
        room: head.room,
        pos: head.pos,
        batch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let line = Bytes::from_static(b"MSG lobby 3 1700000000000 ann hi \"there\"\n");
        let batch = Batch::new(
            line.clone(),
            vec![Line {
                len: line.len() as u32,
                except: Some(9),
            }],
        )
        .unwrap();
        let m = PeerMsg::Deliver {
            room: "lobby".into(),
            pos: Some("0-1-7".into()),
            batch,
        };
        let back = PeerMsg::decode(m.encode()).unwrap();
        assert!(
            matches!(&back, PeerMsg::Deliver { room, batch, .. } if room == "lobby" && batch.lines()[0].except == Some(9))
        );
        let PeerMsg::Deliver { pos, batch, .. } = back else {
            unreachable!()
        };
        assert_eq!(pos.as_deref(), Some("0-1-7"));
        assert_eq!(batch.bytes(), &line, "the line's bytes, unescaped");
        let p = PeerMsg::Published {
            req: 1,
            result: Ok(Appended {
                seq: 4,
                ts: 5,
                duplicate: false,
            }),
            pos: None,
        };
        assert!(matches!(
            PeerMsg::decode(p.encode()).unwrap(),
            PeerMsg::Published { req: 1, result: Ok(a), .. } if a.seq == 4
        ));
        let refused = PeerMsg::Published {
            req: 2,
            result: Err(PeerError {
                code: "UNAVAILABLE".into(),
                detail: "retry".into(),
            }),
            pos: None,
        };
        assert!(matches!(
            PeerMsg::decode(refused.encode()).unwrap(),
            PeerMsg::Published { req: 2, result: Err(e), .. } if e.code == "UNAVAILABLE"
        ));
        assert!(PeerMsg::decode(Bytes::from_static(b"{\"t\":\"nope\"}")).is_err());
    }

    #[test]
    fn broken_deliver_frames_are_refused() {
        let good = PeerMsg::Deliver {
            room: "r".into(),
            pos: None,
            batch: Batch::new(
                Bytes::from_static(b"x\n"),
                vec![Line {
                    len: 2,
                    except: None,
                }],
            )
            .unwrap(),
        }
        .encode();
        let cut = good.slice(..good.len() - 1);
        assert!(PeerMsg::decode(cut).is_err(), "lengths beyond the bytes");
        assert!(PeerMsg::decode(Bytes::from_static(b"D\0\0")).is_err());
        assert!(PeerMsg::decode(Bytes::from_static(b"D\0\0\0\x09{}")).is_err());
    }
}
