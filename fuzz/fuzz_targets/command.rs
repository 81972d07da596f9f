//! `Command::parse` (`protocol/src/command.rs`) on every line a client can
//! send: the input is split into lines as the codec splits it.
//!
//! Checked: no panic; what parses obeys the protocol's rules (names, ids,
//! message text without refused control characters, the ACK and HISTORY
//! bounds) and prints back to a line that parses to the same command; an
//! error is one of the parse codes and its detail, which the server writes
//! back in `ERR <code> <detail>`, holds no control character.
#![no_main]

use chat_protocol::command::{ACK_MAX_IDS, HISTORY_MAX_LIMIT};
use chat_protocol::{names, text, Command, ErrorCode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for raw in data.split(|&b| b == b'\n') {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if let Ok(line) = std::str::from_utf8(raw) {
            one(line);
        }
    }
});

fn one(line: &str) {
    match Command::parse(line) {
        Ok(cmd) => {
            rules(&cmd);
            let printed = cmd.to_string();
            assert_eq!(
                Command::parse(&printed).as_ref(),
                Ok(&cmd),
                "{line:?} printed as {printed:?}"
            );
        }
        Err(e) => {
            assert!(
                matches!(e.code, ErrorCode::BadArgs | ErrorCode::UnknownCommand),
                "{:?}",
                e.code
            );
            assert!(
                text::is_text(&e.detail),
                "detail with a control character: {:?}",
                e.detail
            );
        }
    }
}

fn rules(cmd: &Command) {
    let msg_text = |t: &str| {
        assert!(!t.is_empty());
        assert!(text::is_text(t), "text {t:?}");
    };
    let cid = |c: &Option<String>| {
        if let Some(c) = c {
            assert!(names::is_cid(c), "cid {c:?}");
        }
    };
    match cmd {
        Command::Login { user, password } => {
            assert!(names::is_user(user));
            assert!((1..=names::MAX_PASSWORD).contains(&password.len()));
        }
        Command::Resume { token } => assert!(names::is_token(token)),
        Command::Join { room, guest } => {
            assert!(names::is_room(room));
            if let Some(g) = guest {
                assert!(names::is_user(g));
            }
        }
        Command::Part { room } | Command::Who { room } => assert!(names::is_room(room)),
        Command::Msg { cid: c, room, text } => {
            cid(c);
            assert!(names::is_room(room));
            msg_text(text);
        }
        Command::Dm { cid: c, to, text } => {
            cid(c);
            assert!(names::is_user(to));
            msg_text(text);
        }
        Command::History { room, limit, .. } => {
            assert!(names::is_room(room));
            if let Some(l) = limit {
                assert!((1..=HISTORY_MAX_LIMIT).contains(l));
            }
        }
        Command::Ping { word } => {
            if let Some(w) = word {
                assert!(!w.is_empty() && w.len() <= 64 && !w.contains(' '));
            }
        }
        Command::Ack { ids } => {
            assert!(ids.len() <= ACK_MAX_IDS);
            assert!(ids.iter().all(|id| *id > 0));
        }
        Command::Rooms | Command::Quit => {}
    }
}
