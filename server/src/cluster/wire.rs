//! The server-to-server protocol: what chat servers say to each other over
//! their links.
//!
//! A link is a TCP connection to a peer's client port. It opens with one text
//! line, `PEER <id> <secret>`, answered `OK PEER <id>`; after that both
//! directions carry frames: a 4-byte big-endian length, then one JSON-encoded
//! [`PeerMsg`]. The dialling server sends requests and events; the accepting
//! server answers `Who` with [`PeerMsg::Members`] on the same connection.
//! Answers to `Publish` ([`PeerMsg::Published`]) travel on the owner's own
//! link, behind its deliveries (on the request's connection when that link
//! is down). Both sides send a heartbeat every
//! `heartbeat_ms`. Each server dials every peer, so each ordered pair of
//! servers has its own connection and a room owner's deliveries to one server
//! arrive in the order it sent them.

use chat_storage_api::{ApiError, Appended};
use serde::{Deserialize, Serialize};
use tokio_util::codec::LengthDelimitedCodec;

/// Largest frame accepted (a batch of deliveries of long lines fits easily).
pub const MAX_FRAME: usize = 16 << 20;

/// First word of the text line that opens a link.
pub const HELLO: &str = "PEER";

pub fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

/// One line for the members of a room, already encoded as the client sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Delivery {
    /// The protocol line, `\n` included.
    pub line: String,
    /// Storage position of the write it reports (read-your-writes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pos: Option<String>,
    /// A session of the receiving server that must not get it (the sender).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub except: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum PeerMsg {
    /// Member's server → room owner: store and fan out this message.
    Publish {
        req: u64,
        room: String,
        sender: String,
        /// The sender's session on the member's server.
        session: u64,
        cid: Option<String>,
        text: String,
    },
    /// Owner → member's server: the answer to `Publish`.
    Published {
        req: u64,
        result: Result<Appended, ApiError>,
        pos: Option<String>,
    },
    /// These users, on the sending server, are present in the room.
    Enter { room: String, users: Vec<String> },
    /// This user, on the sending server, left the room (`reason` as in `PART`).
    Leave {
        room: String,
        user: String,
        reason: String,
    },
    /// The sending server no longer follows the room at this owner (the room
    /// moved on its ring): forget its users there without a `PART`.
    Unsubscribe { room: String },
    /// Who is present in the room, on every server?
    Who { req: u64, room: String },
    /// Answer to `Who`.
    Members { req: u64, users: Vec<String> },
    /// Owner → member's server: lines for the room's local members, in order.
    Deliver { room: String, lines: Vec<Delivery> },
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
    Locate { user: String, here: bool },
    /// Heartbeat of the dialling side, every `heartbeat_ms`.
    Ping,
    /// Heartbeat of the accepting side, every `heartbeat_ms`.
    Pong,
    /// The sending server is draining: take it out of the ring.
    Draining,
}

impl PeerMsg {
    pub fn encode(&self) -> bytes::Bytes {
        // Serialising these plain structs cannot fail.
        bytes::Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    pub fn decode(frame: &[u8]) -> Result<PeerMsg, serde_json::Error> {
        serde_json::from_slice(frame)
    }
}

/// Constant-time comparison of two secrets.
pub fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let m = PeerMsg::Deliver {
            room: "lobby".into(),
            lines: vec![Delivery {
                line: "MSG lobby 3 1700000000000 ann hi\n".into(),
                pos: Some("0-1-7".into()),
                except: Some(9),
            }],
        };
        let back = PeerMsg::decode(&m.encode()).unwrap();
        assert!(
            matches!(back, PeerMsg::Deliver { room, lines } if room == "lobby" && lines[0].except == Some(9))
        );
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
            PeerMsg::decode(&p.encode()).unwrap(),
            PeerMsg::Published { req: 1, result: Ok(a), .. } if a.seq == 4
        ));
        assert!(PeerMsg::decode(b"{\"t\":\"nope\"}").is_err());
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("abcdefgh", "abcdefgh"));
        assert!(!same_secret("abcdefgh", "abcdefgx"));
        assert!(!same_secret("abc", "abcd"));
    }
}
