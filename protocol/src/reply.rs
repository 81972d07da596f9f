//! Lines the server sends: replies (`OK …`, `ERR …`, list items) and events.
//! `Display` is the wire form without the terminator; [`ServerLine::to_bytes`]
//! adds it. `FromStr` is for clients (`chat client`, `chat bench`, tests).

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;

use crate::error::ErrorCode;

/// Why someone left a room (see docs/PROTOCOL.md, Presence).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PartReason {
    Left,
    Quit,
    Disconnected,
    Idle,
    Slow,
    Shutdown,
}

impl PartReason {
    pub fn as_str(self) -> &'static str {
        match self {
            PartReason::Left => "left",
            PartReason::Quit => "quit",
            PartReason::Disconnected => "disconnected",
            PartReason::Idle => "idle",
            PartReason::Slow => "slow",
            PartReason::Shutdown => "shutdown",
        }
    }

    /// The reason named by its wire word (`left`, `quit`, …).
    pub fn parse(s: &str) -> Option<PartReason> {
        [
            PartReason::Left,
            PartReason::Quit,
            PartReason::Disconnected,
            PartReason::Idle,
            PartReason::Slow,
            PartReason::Shutdown,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerLine {
    OkLogin {
        user: String,
        token: String,
    },
    OkResume {
        user: String,
        token: String,
    },
    OkJoin {
        room: String,
        last_seq: u64,
    },
    OkPart {
        room: String,
    },
    OkMsg {
        room: String,
        seq: u64,
        ts: i64,
        cid: Option<String>,
    },
    OkDm {
        to: String,
        id: i64,
        ts: i64,
        cid: Option<String>,
    },
    OkHistory {
        room: String,
        count: u32,
    },
    OkRooms {
        count: u32,
    },
    OkWho {
        room: String,
        count: u32,
    },
    /// How many of an `ACK`'s ids were DMs written to this session and not
    /// acknowledged before.
    OkAck {
        count: u32,
    },
    Hist {
        room: String,
        seq: u64,
        ts: i64,
        sender: String,
        text: String,
    },
    Room {
        room: String,
        last_seq: u64,
        members: u64,
    },
    Member {
        room: String,
        user: String,
    },
    Pong {
        word: Option<String>,
    },
    Bye {
        reason: String,
    },
    Msg {
        room: String,
        seq: u64,
        ts: i64,
        sender: String,
        text: String,
    },
    Dm {
        id: i64,
        ts: i64,
        sender: String,
        text: String,
    },
    Joined {
        room: String,
        user: String,
    },
    Parted {
        room: String,
        user: String,
        reason: PartReason,
    },
    /// The proxy moves the client to another server: reconnect with `RESUME`.
    Reconnect {
        reason: String,
    },
    Err {
        code: ErrorCode,
        detail: String,
    },
}

impl ServerLine {
    pub fn err(code: ErrorCode, detail: impl Into<String>) -> ServerLine {
        ServerLine::Err {
            code,
            detail: detail.into(),
        }
    }

    /// Wire form with the `\n` terminator, ready to be shared by many writers.
    pub fn to_bytes(&self) -> Bytes {
        let mut s = self.to_string();
        s.push('\n');
        Bytes::from(s)
    }
}

fn opt_cid(f: &mut fmt::Formatter<'_>, cid: &Option<String>) -> fmt::Result {
    match cid {
        Some(c) => write!(f, " id={c}"),
        None => Ok(()),
    }
}

impl fmt::Display for ServerLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use ServerLine::*;
        match self {
            OkLogin { user, token } => write!(f, "OK LOGIN {user} {token}"),
            OkResume { user, token } => write!(f, "OK RESUME {user} {token}"),
            OkJoin { room, last_seq } => write!(f, "OK JOIN {room} {last_seq}"),
            OkPart { room } => write!(f, "OK PART {room}"),
            OkMsg { room, seq, ts, cid } => {
                write!(f, "OK MSG {room} {seq} {ts}")?;
                opt_cid(f, cid)
            }
            OkDm { to, id, ts, cid } => {
                write!(f, "OK DM {to} {id} {ts}")?;
                opt_cid(f, cid)
            }
            OkHistory { room, count } => write!(f, "OK HISTORY {room} {count}"),
            OkRooms { count } => write!(f, "OK ROOMS {count}"),
            OkWho { room, count } => write!(f, "OK WHO {room} {count}"),
            OkAck { count } => write!(f, "OK ACK {count}"),
            Hist {
                room,
                seq,
                ts,
                sender,
                text,
            } => write!(f, "HIST {room} {seq} {ts} {sender} {text}"),
            Room {
                room,
                last_seq,
                members,
            } => write!(f, "ROOM {room} {last_seq} {members}"),
            Member { room, user } => write!(f, "MEMBER {room} {user}"),
            Pong { word: None } => f.write_str("PONG"),
            Pong { word: Some(w) } => write!(f, "PONG {w}"),
            Bye { reason } => write!(f, "BYE {reason}"),
            Msg {
                room,
                seq,
                ts,
                sender,
                text,
            } => write!(f, "MSG {room} {seq} {ts} {sender} {text}"),
            Dm {
                id,
                ts,
                sender,
                text,
            } => write!(f, "DM {id} {ts} {sender} {text}"),
            Joined { room, user } => write!(f, "JOIN {room} {user}"),
            Parted { room, user, reason } => write!(f, "PART {room} {user} {}", reason.as_str()),
            Reconnect { reason } => write!(f, "RECONNECT {reason}"),
            Err { code, detail } if detail.is_empty() => write!(f, "ERR {code}"),
            Err { code, detail } => write!(f, "ERR {code} {detail}"),
        }
    }
}

/// A server line that a client could not make sense of.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unrecognised server line: {0}")]
pub struct BadServerLine(pub String);

/// Splits off `n` words and returns them with the rest of the line.
fn take<const N: usize>(s: &str) -> Option<([&str; N], &str)> {
    let mut out = [""; N];
    let mut rest = s;
    for slot in out.iter_mut() {
        if rest.is_empty() {
            return None;
        }
        let (w, r) = match rest.find(' ') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        *slot = w;
        rest = r;
    }
    Some((out, rest))
}

fn cid_of(rest: &str) -> Option<Option<String>> {
    if rest.is_empty() {
        return Some(None);
    }
    rest.strip_prefix("id=").map(|c| Some(c.to_string()))
}

impl FromStr for ServerLine {
    type Err = BadServerLine;

    fn from_str(line: &str) -> Result<ServerLine, BadServerLine> {
        use ServerLine::*;
        let bad = || BadServerLine(line.to_string());
        let n = |s: &str| s.parse::<u64>().map_err(|_| bad());
        let i = |s: &str| s.parse::<i64>().map_err(|_| bad());
        let (kw, rest) = line.split_once(' ').unwrap_or((line, ""));
        let parsed = match kw {
            "OK" => {
                let (sub, rest) = rest.split_once(' ').unwrap_or((rest, ""));
                match sub {
                    "LOGIN" | "RESUME" => {
                        let ([user, token], "") = take::<2>(rest).ok_or_else(bad)? else {
                            return Err(bad());
                        };
                        let (user, token) = (user.into(), token.into());
                        if sub == "LOGIN" {
                            OkLogin { user, token }
                        } else {
                            OkResume { user, token }
                        }
                    }
                    "JOIN" => {
                        let ([room, seq], "") = take::<2>(rest).ok_or_else(bad)? else {
                            return Err(bad());
                        };
                        OkJoin {
                            room: room.into(),
                            last_seq: n(seq)?,
                        }
                    }
                    "PART" => OkPart { room: rest.into() },
                    "MSG" => {
                        let ([room, seq, ts], r) = take::<3>(rest).ok_or_else(bad)?;
                        OkMsg {
                            room: room.into(),
                            seq: n(seq)?,
                            ts: i(ts)?,
                            cid: cid_of(r).ok_or_else(bad)?,
                        }
                    }
                    "DM" => {
                        let ([to, id, ts], r) = take::<3>(rest).ok_or_else(bad)?;
                        OkDm {
                            to: to.into(),
                            id: i(id)?,
                            ts: i(ts)?,
                            cid: cid_of(r).ok_or_else(bad)?,
                        }
                    }
                    "HISTORY" | "WHO" => {
                        let ([room, count], "") = take::<2>(rest).ok_or_else(bad)? else {
                            return Err(bad());
                        };
                        let count = count.parse().map_err(|_| bad())?;
                        if sub == "WHO" {
                            OkWho {
                                room: room.into(),
                                count,
                            }
                        } else {
                            OkHistory {
                                room: room.into(),
                                count,
                            }
                        }
                    }
                    "ROOMS" => OkRooms {
                        count: rest.parse().map_err(|_| bad())?,
                    },
                    "ACK" => OkAck {
                        count: rest.parse().map_err(|_| bad())?,
                    },
                    _ => return Err(bad()),
                }
            }
            "HIST" | "MSG" => {
                let ([room, seq, ts, sender], text) = take::<4>(rest).ok_or_else(bad)?;
                let (room, seq, ts, sender, text) =
                    (room.into(), n(seq)?, i(ts)?, sender.into(), text.into());
                if kw == "HIST" {
                    Hist {
                        room,
                        seq,
                        ts,
                        sender,
                        text,
                    }
                } else {
                    Msg {
                        room,
                        seq,
                        ts,
                        sender,
                        text,
                    }
                }
            }
            "ROOM" => {
                let ([room, seq, members], "") = take::<3>(rest).ok_or_else(bad)? else {
                    return Err(bad());
                };
                Room {
                    room: room.into(),
                    last_seq: n(seq)?,
                    members: n(members)?,
                }
            }
            "MEMBER" => {
                let ([room, user], "") = take::<2>(rest).ok_or_else(bad)? else {
                    return Err(bad());
                };
                Member {
                    room: room.into(),
                    user: user.into(),
                }
            }
            "PONG" => Pong {
                word: (!rest.is_empty()).then(|| rest.to_string()),
            },
            "BYE" => Bye {
                reason: rest.into(),
            },
            "DM" => {
                let ([id, ts, sender], text) = take::<3>(rest).ok_or_else(bad)?;
                Dm {
                    id: i(id)?,
                    ts: i(ts)?,
                    sender: sender.into(),
                    text: text.into(),
                }
            }
            "JOIN" => {
                let ([room, user], "") = take::<2>(rest).ok_or_else(bad)? else {
                    return Err(bad());
                };
                Joined {
                    room: room.into(),
                    user: user.into(),
                }
            }
            "PART" => {
                let ([room, user, reason], "") = take::<3>(rest).ok_or_else(bad)? else {
                    return Err(bad());
                };
                Parted {
                    room: room.into(),
                    user: user.into(),
                    reason: PartReason::parse(reason).ok_or_else(bad)?,
                }
            }
            "RECONNECT" => Reconnect {
                reason: rest.into(),
            },
            "ERR" => {
                let (code, detail) = rest.split_once(' ').unwrap_or((rest, ""));
                Err {
                    code: ErrorCode::from_code(code).ok_or_else(bad)?,
                    detail: detail.into(),
                }
            }
            _ => return Result::Err(bad()),
        };
        Ok(parsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_examples() {
        let lines = [
            ServerLine::OkLogin {
                user: "a".into(),
                token: "0123456789abcdef0123456789abcdef".into(),
            },
            ServerLine::OkMsg {
                room: "r".into(),
                seq: 3,
                ts: 17,
                cid: Some("x".into()),
            },
            ServerLine::OkMsg {
                room: "r".into(),
                seq: 3,
                ts: 17,
                cid: None,
            },
            ServerLine::Msg {
                room: "r".into(),
                seq: 4,
                ts: 18,
                sender: "bob".into(),
                text: "hi  there".into(),
            },
            ServerLine::Dm {
                id: 9,
                ts: 1,
                sender: "c".into(),
                text: "yo".into(),
            },
            ServerLine::Parted {
                room: "r".into(),
                user: "u".into(),
                reason: PartReason::Disconnected,
            },
            ServerLine::err(ErrorCode::BadArgs, "JOIN <room>"),
            ServerLine::err(ErrorCode::Internal, ""),
            ServerLine::Pong { word: None },
            ServerLine::OkRooms { count: 2 },
            ServerLine::OkAck { count: 3 },
            ServerLine::Room {
                room: "r".into(),
                last_seq: 2,
                members: 5,
            },
        ];
        for l in lines {
            let s = l.to_string();
            assert_eq!(s.parse::<ServerLine>().unwrap(), l, "{s}");
        }
        assert!("NOPE x".parse::<ServerLine>().is_err());
    }
}
