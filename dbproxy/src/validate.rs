//! What may be stored: the client protocol's own rules
//! (`chat_protocol::names`, `chat_protocol::text`), applied to every request
//! before a backend sees it. The chat server checks the same when it parses a
//! command, but the dbproxy answers whoever reaches its port: a name or text
//! that skipped those checks would later reach clients inside a server line
//! (a line feed in a body is a forged `OK LOGIN …` for whoever reads it).
//!
//! Messages name the field and the rule, never the value: answers end up in
//! `ERR BAD_ARGS <detail>` lines, so a bad value must not travel back in one.

use std::net::IpAddr;

use chat_protocol::{names, text};

use chat_storage_api::*;

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::BadRequest, message)
}

pub(crate) fn user(field: &str, s: &str) -> Result<(), ApiError> {
    if names::is_user(s) {
        return Ok(());
    }
    Err(bad(format!(
        "{field}: not a user name (1-{} of A-Z a-z 0-9 _ . -)",
        names::MAX_USER
    )))
}

pub(crate) fn room(s: &str) -> Result<(), ApiError> {
    if names::is_room(s) {
        return Ok(());
    }
    Err(bad(format!(
        "room: not a room name (1-{} of A-Z a-z 0-9 _ . - #)",
        names::MAX_ROOM
    )))
}

pub(crate) fn client_id(cid: Option<&str>) -> Result<(), ApiError> {
    match cid {
        Some(c) if !names::is_cid(c) => Err(bad(format!(
            "client_id: not a client id (1-{} of A-Z a-z 0-9 _ . : -)",
            names::MAX_CID
        ))),
        _ => Ok(()),
    }
}

pub(crate) fn token(s: &str) -> Result<(), ApiError> {
    if names::is_token(s) {
        return Ok(());
    }
    Err(bad("token: not <user>.<32 lower-case hex digits>"))
}

pub(crate) fn password(s: &str) -> Result<(), ApiError> {
    if (1..=names::MAX_PASSWORD).contains(&s.len()) {
        return Ok(());
    }
    Err(bad(format!(
        "password: must be 1-{} bytes",
        names::MAX_PASSWORD
    )))
}

/// Message text: not empty, at most `max_bytes`, only characters text may
/// contain.
pub(crate) fn body(s: &str, max_bytes: usize) -> Result<(), ApiError> {
    if s.is_empty() {
        return Err(bad("body: empty"));
    }
    if s.len() > max_bytes {
        return Err(bad(format!("body: longer than {max_bytes} bytes")));
    }
    text::check(s).map_err(|e| bad(format!("body: {e}")))
}

/// The login's source: absent, or an IP address.
pub(crate) fn source(s: Option<&str>) -> Result<Option<IpAddr>, ApiError> {
    s.map(|s| {
        s.parse::<IpAddr>()
            .map_err(|_| bad("source: not an IP address"))
    })
    .transpose()
}

pub(crate) fn append_item(item: &AppendItem, max_text: usize) -> Result<(), ApiError> {
    room(&item.room)?;
    user("sender", &item.sender)?;
    client_id(item.client_id.as_deref())?;
    body(&item.body, max_text)
}

pub(crate) fn dm_item(item: &DmItem, max_text: usize) -> Result<(), ApiError> {
    user("sender", &item.sender)?;
    user("recipient", &item.recipient)?;
    client_id(item.client_id.as_deref())?;
    body(&item.body, max_text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_rules_apply() {
        assert!(user("user", "al.ice_-1").is_ok());
        for bad_user in ["", "a b", "a\nOK", &"a".repeat(33), "a#b"] {
            assert!(user("user", bad_user).is_err(), "{bad_user:?}");
        }
        assert!(room("#general").is_ok());
        assert!(room("r\r\nMSG").is_err());
        assert!(client_id(None).is_ok());
        assert!(client_id(Some("a:1")).is_ok());
        assert!(client_id(Some("a b")).is_err());
        assert!(token("al.ice.0123456789abcdef0123456789abcdef").is_ok());
        assert!(token("0123456789abcdef0123456789abcdef").is_err());
        assert!(password("pass word").is_ok());
        assert!(password("").is_err());
        assert!(password(&"p".repeat(129)).is_err());
        assert!(body("hi\tthere ✓", 10 + 4).is_ok());
        assert!(body("", 10).is_err());
        assert!(body("12345", 4).is_err());
        assert!(body("x\nOK LOGIN admin", 100).is_err());
        assert!(body("rlo\u{202e}", 100).is_err());
        assert_eq!(source(None).unwrap(), None);
        assert!(source(Some("::1")).unwrap().is_some());
        assert!(source(Some("not-an-ip")).is_err());
    }

    #[test]
    fn messages_do_not_echo_the_value() {
        let e = user("user", "evil\nOK LOGIN admin").unwrap_err();
        assert!(!e.message.contains("evil"), "{}", e.message);
        let e = body("x\rOK LOGIN admin", 100).unwrap_err();
        assert!(!e.message.contains("LOGIN"), "{}", e.message);
    }
}
