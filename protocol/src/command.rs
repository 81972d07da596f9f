//! frames → typed client commands. `Display` prints the canonical wire form, so
//! `parse(print(c)) == c` (checked by a property test).

use std::fmt;

use crate::error::{ErrorCode, ParseError};
use crate::names;

pub const HISTORY_MAX_LIMIT: u32 = 1000;
/// Most DM ids one `ACK` line may carry.
pub const ACK_MAX_IDS: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Login {
        user: String,
        password: String,
    },
    Resume {
        token: String,
    },
    /// `guest` is only allowed (and required) on the first line.
    Join {
        room: String,
        guest: Option<String>,
    },
    Part {
        room: String,
    },
    Msg {
        cid: Option<String>,
        room: String,
        text: String,
    },
    Dm {
        cid: Option<String>,
        to: String,
        text: String,
    },
    History {
        room: String,
        after: u64,
        limit: Option<u32>,
    },
    Rooms,
    Who {
        room: String,
    },
    Ping {
        word: Option<String>,
    },
    /// Acknowledges DMs by id; as a session's first command (ids or not) it
    /// makes that session's DMs count as received only once acknowledged.
    Ack {
        ids: Vec<i64>,
    },
    Quit,
}

impl Command {
    /// The keyword, for metrics labels and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Login { .. } => "LOGIN",
            Command::Resume { .. } => "RESUME",
            Command::Join { .. } => "JOIN",
            Command::Part { .. } => "PART",
            Command::Msg { .. } => "MSG",
            Command::Dm { .. } => "DM",
            Command::History { .. } => "HISTORY",
            Command::Rooms => "ROOMS",
            Command::Who { .. } => "WHO",
            Command::Ping { .. } => "PING",
            Command::Ack { .. } => "ACK",
            Command::Quit => "QUIT",
        }
    }

    /// Parses one line (without terminator). Empty lines are the caller's
    /// business: they are not commands.
    pub fn parse(line: &str) -> Result<Command, ParseError> {
        let line = line.trim_start_matches(' ');
        let (kw, rest) = split_word(line);
        let kw = kw.to_ascii_uppercase();
        match kw.as_str() {
            "LOGIN" => {
                let (user, password) = split_word(rest);
                let password = password.trim_end_matches(' ');
                check(
                    names::is_user(user),
                    "LOGIN <user> <password>: bad user name",
                )?;
                check(
                    !password.is_empty() && password.len() <= names::MAX_PASSWORD,
                    "LOGIN <user> <password>: password must be 1-128 bytes",
                )?;
                Ok(Command::Login {
                    user: user.into(),
                    password: password.into(),
                })
            }
            "RESUME" => {
                let [token] = words::<1>(rest, "RESUME <token>")?;
                check(names::is_token(token), "RESUME <token>: malformed token")?;
                Ok(Command::Resume {
                    token: token.into(),
                })
            }
            "JOIN" => {
                let ws: Vec<&str> = rest.split_whitespace().collect();
                let (room, guest) = match ws.as_slice() {
                    [room] => (*room, None),
                    [room, name] => (*room, Some(*name)),
                    _ => return Err(ParseError::bad_args("JOIN <room> [<name>]")),
                };
                check(names::is_room(room), "JOIN: bad room name")?;
                if let Some(g) = guest {
                    check(names::is_user(g), "JOIN <room> <name>: bad user name")?;
                }
                Ok(Command::Join {
                    room: room.into(),
                    guest: guest.map(Into::into),
                })
            }
            "PART" => Ok(Command::Part {
                room: room_arg(rest, "PART <room>")?,
            }),
            "WHO" => Ok(Command::Who {
                room: room_arg(rest, "WHO <room>")?,
            }),
            "MSG" => {
                let (cid, rest) = cid_arg(rest)?;
                let (room, text) = split_word(rest);
                check(
                    names::is_room(room),
                    "MSG [id=<cid>] <room> <text>: bad room",
                )
                .and_then(|()| check(!text.is_empty(), "MSG [id=<cid>] <room> <text>: empty text"))
                .and_then(|()| text_arg(text))
                .map_err(|e| with_id(&cid, e))?;
                Ok(Command::Msg {
                    cid,
                    room: room.into(),
                    text: text.into(),
                })
            }
            "DM" => {
                let (cid, rest) = cid_arg(rest)?;
                let (to, text) = split_word(rest);
                check(names::is_user(to), "DM [id=<cid>] <user> <text>: bad user")
                    .and_then(|()| {
                        check(!text.is_empty(), "DM [id=<cid>] <user> <text>: empty text")
                    })
                    .and_then(|()| text_arg(text))
                    .map_err(|e| with_id(&cid, e))?;
                Ok(Command::Dm {
                    cid,
                    to: to.into(),
                    text: text.into(),
                })
            }
            "HISTORY" => {
                const USAGE: &str = "HISTORY <room> <after-seq> [<limit>]";
                let ws: Vec<&str> = rest.split_whitespace().collect();
                let (room, after, limit) = match ws.as_slice() {
                    [r, a] => (*r, *a, None),
                    [r, a, l] => (*r, *a, Some(*l)),
                    _ => return Err(ParseError::bad_args(USAGE)),
                };
                check(names::is_room(room), "HISTORY: bad room name")?;
                let after = after
                    .parse::<u64>()
                    .map_err(|_| ParseError::bad_args("HISTORY: after-seq must be a number"))?;
                let limit = match limit {
                    None => None,
                    Some(l) => match l.parse::<u32>() {
                        Ok(n) if (1..=HISTORY_MAX_LIMIT).contains(&n) => Some(n),
                        _ => return Err(ParseError::bad_args("HISTORY: limit must be 1-1000")),
                    },
                };
                Ok(Command::History {
                    room: room.into(),
                    after,
                    limit,
                })
            }
            "ROOMS" => {
                words::<0>(rest, "ROOMS")?;
                Ok(Command::Rooms)
            }
            "PING" => {
                let ws: Vec<&str> = rest.split_whitespace().collect();
                match ws.as_slice() {
                    [] => Ok(Command::Ping { word: None }),
                    [w] if w.len() <= 64 => Ok(Command::Ping {
                        word: Some((*w).into()),
                    }),
                    _ => Err(ParseError::bad_args("PING [<word>]")),
                }
            }
            "ACK" => {
                let usage = "ACK [<dm-id> ...] (at most 256 ids)";
                let ids = rest
                    .split_whitespace()
                    .map(|w| w.parse::<i64>().ok().filter(|id| *id > 0))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| ParseError::bad_args(usage))?;
                check(ids.len() <= ACK_MAX_IDS, usage)?;
                Ok(Command::Ack { ids })
            }
            "QUIT" | "DISCONNECT" => {
                words::<0>(rest, "QUIT")?;
                Ok(Command::Quit)
            }
            // The keyword goes back in `ERR UNKNOWN_COMMAND <kw>`: a CR or an
            // ESC sequence in it would forge lines on the client's screen.
            _ => Err(ParseError::new(
                ErrorCode::UnknownCommand,
                crate::text::escape_controls(&truncate(&kw, names::MAX_ROOM)),
            )),
        }
    }
}

fn check(ok: bool, usage: &str) -> Result<(), ParseError> {
    if ok {
        Ok(())
    } else {
        Err(ParseError::bad_args(usage))
    }
}

/// An error answering a `MSG`/`DM` that carried an id starts with
/// `id=<cid>`, so the client can tell which of its messages was refused.
fn with_id(cid: &Option<String>, e: ParseError) -> ParseError {
    match cid {
        Some(c) => ParseError::new(e.code, format!("id={c} {}", e.detail)),
        None => e,
    }
}

fn text_arg(text: &str) -> Result<(), ParseError> {
    crate::text::check(text).map_err(|e| ParseError::bad_args(e.to_string()))
}

fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// First space-separated word and the rest of the line after the spaces that follow it.
fn split_word(s: &str) -> (&str, &str) {
    match s.find(' ') {
        Some(i) => (&s[..i], s[i..].trim_start_matches(' ')),
        None => (s, ""),
    }
}

fn words<'a, const N: usize>(s: &'a str, usage: &str) -> Result<[&'a str; N], ParseError> {
    let ws: Vec<&str> = s.split_whitespace().collect();
    ws.try_into().map_err(|_| ParseError::bad_args(usage))
}

fn room_arg(rest: &str, usage: &str) -> Result<String, ParseError> {
    let [room] = words::<1>(rest, usage)?;
    check(names::is_room(room), usage)?;
    Ok(room.into())
}

fn cid_arg(rest: &str) -> Result<(Option<String>, &str), ParseError> {
    let (first, after) = split_word(rest);
    match first.strip_prefix("id=") {
        Some(cid) => {
            check(
                names::is_cid(cid),
                "id=<cid>: 1-64 bytes of A-Z a-z 0-9 _ . : -",
            )?;
            Ok((Some(cid.into()), after))
        }
        None => Ok((None, rest)),
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Login { user, password } => write!(f, "LOGIN {user} {password}"),
            Command::Resume { token } => write!(f, "RESUME {token}"),
            Command::Join { room, guest: None } => write!(f, "JOIN {room}"),
            Command::Join {
                room,
                guest: Some(g),
            } => write!(f, "JOIN {room} {g}"),
            Command::Part { room } => write!(f, "PART {room}"),
            Command::Msg { cid, room, text } => {
                f.write_str("MSG ")?;
                if let Some(c) = cid {
                    write!(f, "id={c} ")?;
                }
                write!(f, "{room} {text}")
            }
            Command::Dm { cid, to, text } => {
                f.write_str("DM ")?;
                if let Some(c) = cid {
                    write!(f, "id={c} ")?;
                }
                write!(f, "{to} {text}")
            }
            Command::History { room, after, limit } => {
                write!(f, "HISTORY {room} {after}")?;
                if let Some(l) = limit {
                    write!(f, " {l}")?;
                }
                Ok(())
            }
            Command::Rooms => f.write_str("ROOMS"),
            Command::Who { room } => write!(f, "WHO {room}"),
            Command::Ping { word: None } => f.write_str("PING"),
            Command::Ping { word: Some(w) } => write!(f, "PING {w}"),
            Command::Ack { ids } => {
                f.write_str("ACK")?;
                for id in ids {
                    write!(f, " {id}")?;
                }
                Ok(())
            }
            Command::Quit => f.write_str("QUIT"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> Result<Command, ParseError> {
        Command::parse(s)
    }

    #[test]
    fn refused_msg_and_dm_name_their_id() {
        for line in [
            "MSG id=a1 lobby bad\u{1b}text",
            "MSG id=a1 lobby ",
            "MSG id=a1 bad/room hi",
            "DM id=a1 bob bad\u{202e}text",
            "DM id=a1 bad/user hi",
        ] {
            let e = Command::parse(line).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadArgs, "{line:?}");
            assert!(e.detail.starts_with("id=a1 "), "{line:?}: {}", e.detail);
        }
        let e = Command::parse("MSG lobby bad\u{7}").unwrap_err();
        assert!(!e.detail.starts_with("id="), "{}", e.detail);
    }

    #[test]
    fn parses_commands() {
        assert_eq!(
            p("login alice pass word").unwrap(),
            Command::Login {
                user: "alice".into(),
                password: "pass word".into()
            }
        );
        assert_eq!(
            p("JOIN lobby bob").unwrap(),
            Command::Join {
                room: "lobby".into(),
                guest: Some("bob".into())
            }
        );
        assert_eq!(
            p("MSG id=7 lobby  hello  there ").unwrap(),
            Command::Msg {
                cid: Some("7".into()),
                room: "lobby".into(),
                text: "hello  there ".into()
            }
        );
        assert_eq!(
            p("msg lobby hi").unwrap(),
            Command::Msg {
                cid: None,
                room: "lobby".into(),
                text: "hi".into()
            }
        );
        assert_eq!(
            p("HISTORY r 5 10").unwrap(),
            Command::History {
                room: "r".into(),
                after: 5,
                limit: Some(10)
            }
        );
        assert_eq!(p("disconnect").unwrap(), Command::Quit);
        assert_eq!(p("ACK").unwrap(), Command::Ack { ids: vec![] });
        assert_eq!(p("ack 7  9").unwrap(), Command::Ack { ids: vec![7, 9] });
        assert_eq!(
            p("PING x").unwrap(),
            Command::Ping {
                word: Some("x".into())
            }
        );
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(p("FOO bar").unwrap_err().code, ErrorCode::UnknownCommand);
        assert_eq!(p("JOIN").unwrap_err().code, ErrorCode::BadArgs);
        assert_eq!(p("JOIN a b c").unwrap_err().code, ErrorCode::BadArgs);
        assert_eq!(p("MSG lobby").unwrap_err().code, ErrorCode::BadArgs);
        assert_eq!(p("MSG id= lobby x").unwrap_err().code, ErrorCode::BadArgs);
        assert_eq!(p("HISTORY r x").unwrap_err().code, ErrorCode::BadArgs);
        assert_eq!(p("HISTORY r 1 0").unwrap_err().code, ErrorCode::BadArgs);
        assert_eq!(p("HISTORY r 1 1001").unwrap_err().code, ErrorCode::BadArgs);
        assert_eq!(p("RESUME nothex").unwrap_err().code, ErrorCode::BadArgs);
        assert_eq!(p("LOGIN alice").unwrap_err().code, ErrorCode::BadArgs);
        assert_eq!(p("QUIT now").unwrap_err().code, ErrorCode::BadArgs);
        assert_eq!(p("ACK x").unwrap_err().code, ErrorCode::BadArgs);
        assert_eq!(p("ACK 0").unwrap_err().code, ErrorCode::BadArgs);
        assert_eq!(p("ACK -3").unwrap_err().code, ErrorCode::BadArgs);
        assert_eq!(p("MSG r a\rb").unwrap_err().code, ErrorCode::BadArgs);
        assert_eq!(p("DM bob \u{1b}[2J").unwrap_err().code, ErrorCode::BadArgs);
        assert_eq!(p("MSG r \u{202e}x").unwrap_err().code, ErrorCode::BadArgs);
        let many = format!("ACK{}", " 1".repeat(ACK_MAX_IDS + 1));
        assert_eq!(p(&many).unwrap_err().code, ErrorCode::BadArgs);
    }

    #[test]
    fn unknown_keyword_is_echoed_without_controls() {
        // Found by the `command` fuzz target: the keyword came back raw.
        let e = p("FOO\rOK\u{1b}[2J\0 x").unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownCommand);
        assert_eq!(e.detail, "FOO\\u{000D}OK\\u{001B}[2J\\u{0000}");
        assert!(crate::text::is_text(&e.detail));
        assert_eq!(p("foo x").unwrap_err().detail, "FOO");
    }

    fn word(re: &'static str) -> impl Strategy<Value = String> {
        proptest::string::string_regex(re).unwrap()
    }

    fn arb_command() -> impl Strategy<Value = Command> {
        let user = || word("[A-Za-z0-9_.-]{1,32}");
        let room = || word("[A-Za-z0-9_.#-]{1,64}");
        let text = || {
            word("[^\\r\\n ][^\\r\\n]{0,40}")
                .prop_filter("allowed text", |t| crate::text::is_text(t))
        };
        let cid = || proptest::option::of(word("[A-Za-z0-9_.:-]{1,64}"));
        prop_oneof![
            (user(), word("[!-~]{1,20}"))
                .prop_map(|(user, password)| Command::Login { user, password }),
            word("[A-Za-z0-9_.-]{1,32}\\.[0-9a-f]{32}").prop_map(|token| Command::Resume { token }),
            (room(), proptest::option::of(user()))
                .prop_map(|(room, guest)| Command::Join { room, guest }),
            room().prop_map(|room| Command::Part { room }),
            (cid(), room(), text()).prop_map(|(cid, room, text)| Command::Msg { cid, room, text }),
            (cid(), user(), text()).prop_map(|(cid, to, text)| Command::Dm { cid, to, text }),
            (room(), any::<u64>(), proptest::option::of(1u32..=1000))
                .prop_map(|(room, after, limit)| Command::History { room, after, limit }),
            Just(Command::Rooms),
            room().prop_map(|room| Command::Who { room }),
            proptest::option::of(word("[!-~]{1,64}")).prop_map(|word| Command::Ping { word }),
            proptest::collection::vec(1i64..i64::MAX, 0..8).prop_map(|ids| Command::Ack { ids }),
            Just(Command::Quit),
        ]
    }

    proptest! {
        #[test]
        fn parse_print_roundtrip(cmd in arb_command()) {
            let line = cmd.to_string();
            prop_assert_eq!(Command::parse(&line).unwrap(), cmd);
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,200}") {
            let _ = Command::parse(&s);
        }
    }
}
