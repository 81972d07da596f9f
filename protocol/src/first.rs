//! The rules for a connection's first line, shared by the proxy (which reads
//! only that line) and the chat server's client port, so both accept and
//! refuse exactly the same lines with the same `ERR`.
//!
//! - Leading empty lines (nothing but whitespace) are skipped, at most
//!   [`MAX_EMPTY_LINES`] of them: a client pasting a blank line first is
//!   served, a client that sends nothing else is refused rather than held.
//! - The command word is matched exactly, in upper case, as the seed
//!   protocol writes it: `LOGIN`, `RESUME`, `JOIN` (and `PEER` for another
//!   chat server). `JoiN lobby ann` is not a first line. After login,
//!   command words are case-insensitive (docs/PROTOCOL.md).
//! - A known word with bad arguments is `BAD_ARGS`; any other line, or a
//!   `JOIN` without a guest name, is `BAD_FIRST_LINE`.

use crate::command::Command;
use crate::error::{ErrorCode, ParseError};

/// Empty lines allowed before the first line. Enough for a person's stray
/// Enter presses; a bound so that the first-line phase cannot be fed forever
/// (the first-line timeout bounds it in time as well).
pub const MAX_EMPTY_LINES: usize = 16;

/// What the detail of a `BAD_FIRST_LINE` says.
pub const USAGE: &str =
    "first line must be LOGIN <user> <password>, RESUME <token> or JOIN <room> <name>";

/// A first line, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum First<'a> {
    /// An empty line: skip it and read the next one.
    Empty,
    /// `LOGIN`, `RESUME` or a guest `JOIN <room> <name>` (always one of those
    /// three `Command` variants).
    Start(Command),
    /// `PEER <id> <secret>`: another chat server opening its link. The line
    /// (leading spaces removed) is for the cluster code to check; the proxy
    /// refuses it.
    Peer(&'a str),
}

impl First<'_> {
    /// The proxy's routing key: the user name (a token's `<user>.` part for
    /// `RESUME`), so a user's connections meet on one chat server.
    pub fn routing_key(&self) -> Option<&[u8]> {
        match self {
            First::Start(Command::Login { user, .. }) => Some(user.as_bytes()),
            First::Start(Command::Join {
                guest: Some(name), ..
            }) => Some(name.as_bytes()),
            First::Start(Command::Resume { token }) => {
                Some(crate::names::token_user(token).unwrap_or(token).as_bytes())
            }
            _ => None,
        }
    }
}

/// Classifies one line read before the first line was found. `line` is
/// without its `\n` (a trailing `\r` is dropped here too); `empty_before` is
/// how many empty lines this connection already sent. Pure: the same bytes
/// always give the same answer.
pub fn classify(line: &[u8], empty_before: usize) -> Result<First<'_>, ParseError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Ok(line) = std::str::from_utf8(line) else {
        return Err(ParseError::new(
            ErrorCode::BadUtf8,
            "first line is not UTF-8",
        ));
    };
    if line.trim().is_empty() {
        if empty_before >= MAX_EMPTY_LINES {
            return Err(ParseError::new(
                ErrorCode::BadFirstLine,
                format!("more than {MAX_EMPTY_LINES} empty lines before the first line"),
            ));
        }
        return Ok(First::Empty);
    }
    let line = line.trim_start_matches(' ');
    let word = line.split(' ').next().unwrap_or("");
    match word {
        "PEER" => Ok(First::Peer(line)),
        "LOGIN" | "RESUME" | "JOIN" => match Command::parse(line) {
            Ok(cmd @ (Command::Login { .. } | Command::Resume { .. })) => Ok(First::Start(cmd)),
            Ok(cmd @ Command::Join { guest: Some(_), .. }) => Ok(First::Start(cmd)),
            Err(e) if e.code == ErrorCode::BadArgs => Err(e),
            _ => Err(ParseError::new(ErrorCode::BadFirstLine, USAGE)),
        },
        _ => Err(ParseError::new(ErrorCode::BadFirstLine, USAGE)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(line: &[u8]) -> ErrorCode {
        classify(line, 0).unwrap_err().code
    }

    #[test]
    fn accepts_the_three_starts_in_exact_case() {
        assert_eq!(
            classify(b"LOGIN ann pw word", 0),
            Ok(First::Start(Command::Login {
                user: "ann".into(),
                password: "pw word".into()
            }))
        );
        assert_eq!(
            classify(b"JOIN cooking ann\r", 0),
            Ok(First::Start(Command::Join {
                room: "cooking".into(),
                guest: Some("ann".into())
            }))
        );
        let token = format!("ann.{}", "a".repeat(32));
        let line = format!("  RESUME {token}");
        let first = classify(line.as_bytes(), 3).unwrap();
        assert_eq!(first, First::Start(Command::Resume { token }));
        assert_eq!(first.routing_key(), Some(&b"ann"[..]));
    }

    #[test]
    fn other_cases_of_the_words_are_not_first_lines() {
        for line in [
            &b"JoiN cooking x"[..],
            b"join cooking x",
            b"Login ann pw",
            b"login ann pw",
            b"resume ann.00000000000000000000000000000000",
            b"peer a b",
        ] {
            assert_eq!(code(line), ErrorCode::BadFirstLine, "{line:?}");
        }
    }

    #[test]
    fn refuses_what_is_not_a_start() {
        assert_eq!(code(b"Not a valid first message"), ErrorCode::BadFirstLine);
        assert_eq!(code(b"MSG lobby hi"), ErrorCode::BadFirstLine);
        assert_eq!(code(b"JOIN lobby"), ErrorCode::BadFirstLine);
        assert_eq!(code(b"QUIT"), ErrorCode::BadFirstLine);
        assert_eq!(code(b"LOGIN ann"), ErrorCode::BadArgs);
        assert_eq!(code(b"JOIN lobby bad/name"), ErrorCode::BadArgs);
        assert_eq!(code(b"RESUME nothex"), ErrorCode::BadArgs);
        assert_eq!(code(b"LOGIN\xff ann pw"), ErrorCode::BadUtf8);
    }

    #[test]
    fn skips_a_bounded_number_of_empty_lines() {
        for line in [&b""[..], b"\r", b"   ", b" \t "] {
            assert_eq!(classify(line, 0), Ok(First::Empty), "{line:?}");
        }
        assert_eq!(classify(b"", MAX_EMPTY_LINES - 1), Ok(First::Empty));
        assert_eq!(
            classify(b"", MAX_EMPTY_LINES).unwrap_err().code,
            ErrorCode::BadFirstLine
        );
        // The bound is on empty lines only: a start after them is a start.
        assert!(matches!(
            classify(b"JOIN r g", MAX_EMPTY_LINES),
            Ok(First::Start(_))
        ));
    }

    #[test]
    fn peer_lines_are_told_apart() {
        assert_eq!(
            classify(b"PEER a:1 s3cret", 0),
            Ok(First::Peer("PEER a:1 s3cret"))
        );
        assert_eq!(First::Peer("PEER x y").routing_key(), None);
    }
}
