//! The storage tier's HTTP/JSON contract: request and response bodies, the
//! paths, the error kinds. The dbproxy serves it (`chat-dbproxy`), a chat
//! server calls it through `chat_storage_client::DbClient`; this crate does
//! no I/O, so each side links only its own half of the storage tier.
//!
//! Every call is `POST <path>` with a JSON body; a success is `200` with the
//! response body, a failure a non-2xx status with [`ErrorBody`]. Names are the
//! identities (user and room names are unique); numeric ids never leave storage,
//! except the ids of direct messages, which clients see.
//!
//! Read-your-writes: every write answer carries `pos`, the storage position
//! of that write (a GTID on MySQL/MariaDB; `None` on SQLite, where every read
//! sees every committed write). A read may carry `min_pos`: the dbproxy then
//! serves it from a backend that has applied that position.
//!
//! What is stored is checked first, with the client protocol's own rules
//! (`chat_protocol::names`, `chat_protocol::text`): user and room names,
//! client ids, tokens, passwords (1..=128 bytes) and message text (allowed
//! characters, at most `max_text_bytes`). A bad single request is
//! `BadRequest` as a whole; in an append or DM batch, each bad item gets its
//! own `BadRequest` result and the others are stored.

use serde::{Deserialize, Serialize};

pub const PATH_LOGIN: &str = "/v1/login";
pub const PATH_GUEST: &str = "/v1/guest";
pub const PATH_RESUME: &str = "/v1/resume";
pub const PATH_TOUCH: &str = "/v1/touch";
pub const PATH_JOIN: &str = "/v1/join";
pub const PATH_PART: &str = "/v1/part";
pub const PATH_USER_ROOMS: &str = "/v1/user_rooms";
pub const PATH_ROOMS: &str = "/v1/rooms";
pub const PATH_ROOM_INFO: &str = "/v1/room_info";
pub const PATH_APPEND: &str = "/v1/append";
pub const PATH_HISTORY: &str = "/v1/history";
pub const PATH_SEND_DMS: &str = "/v1/send_dms";
pub const PATH_PENDING_DMS: &str = "/v1/pending_dms";
pub const PATH_MARK_RECEIVED: &str = "/v1/mark_received";

/// Classified failure. `Unavailable` is the only retryable kind: nothing was
/// written and the same request may be sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    AuthFailed,
    NameTaken,
    TokenInvalid,
    NoSuchRoom,
    NoSuchUser,
    BadRequest,
    /// A join beyond the dbproxy's `max_rooms_per_user`.
    TooManyRooms,
    /// Too many failed logins for the account or from the source; nothing
    /// was checked (the message says when to retry).
    RateLimited,
    Unavailable,
    Internal,
    /// The caller's bearer token is missing or not one the dbproxy accepts
    /// (`api_tokens`); nothing was done. A chat server's `DbClient` reports
    /// it to its own callers as `Unavailable`.
    Unauthorized,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::AuthFailed => "auth_failed",
            ErrorKind::NameTaken => "name_taken",
            ErrorKind::TokenInvalid => "token_invalid",
            ErrorKind::NoSuchRoom => "no_such_room",
            ErrorKind::NoSuchUser => "no_such_user",
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::TooManyRooms => "too_many_rooms",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Internal => "internal",
            ErrorKind::Unauthorized => "unauthorized",
        }
    }

    pub fn http_status(self) -> u16 {
        match self {
            ErrorKind::AuthFailed | ErrorKind::TokenInvalid | ErrorKind::Unauthorized => 401,
            ErrorKind::NameTaken | ErrorKind::TooManyRooms => 409,
            ErrorKind::RateLimited => 429,
            ErrorKind::NoSuchRoom | ErrorKind::NoSuchUser => 404,
            ErrorKind::BadRequest => 400,
            ErrorKind::Unavailable => 503,
            ErrorKind::Internal => 500,
        }
    }

    pub fn retryable(self) -> bool {
        self == ErrorKind::Unavailable
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            message: message.into(),
        }
    }
}

/// Body of every non-2xx answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ApiError,
}

// ---- identities --------------------------------------------------------

/// `PATH_LOGIN`: register on first use, else check the password. Token
/// lifetime is the dbproxy's own `token_idle_ttl_secs`, as for guest and
/// resume: a caller cannot choose it.
#[derive(Clone, Serialize, Deserialize)]
pub struct LoginReq {
    pub user: String,
    pub password: String,
    /// The client's IP address as the chat server knows it (the proxy's
    /// PROXY line, else the connection's peer): what failed-login limits
    /// per source count against. `None` from callers that have no client.
    #[serde(default)]
    pub source: Option<String>,
}

/// `PATH_GUEST`: take a guest name (fails with `NameTaken` if it is registered
/// or a guest holding it still has a live token; an expired guest's name is
/// taken over and the old guest's memberships are dropped).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GuestReq {
    pub name: String,
}

/// `PATH_RESUME`: the identity of a live token; refreshes its last use.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResumeReq {
    pub token: String,
}

impl std::fmt::Debug for LoginReq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginReq")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("source", &self.source)
            .finish()
    }
}

/// Answer of login, guest and resume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub user: String,
    pub token: String,
    pub guest: bool,
    pub pos: Option<String>,
}

/// `PATH_TOUCH`: marks tokens as used now (sent while connections stay open
/// and when they close). Unknown tokens are ignored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TouchReq {
    pub tokens: Vec<String>,
}

/// Answer of writes that return nothing else.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteAck {
    pub pos: Option<String>,
}

// ---- rooms ------------------------------------------------------------

/// `PATH_JOIN`: creates the room if needed and records the membership;
/// `TooManyRooms` when the user is already in the dbproxy's
/// `max_rooms_per_user` other rooms.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinReq {
    pub room: String,
    pub user: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinResp {
    pub last_seq: u64,
    pub pos: Option<String>,
}

/// `PATH_PART`: removes the membership (answers `WriteAck`; parting a room you
/// are not in is not an error).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartReq {
    pub room: String,
    pub user: String,
}

/// `PATH_USER_ROOMS`: the rooms a user is a member of.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserRoomsReq {
    pub user: String,
    pub min_pos: Option<String>,
}

/// `PATH_ROOMS`: rooms by name, at most `limit`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoomsReq {
    pub limit: u32,
    pub min_pos: Option<String>,
}

/// `PATH_ROOM_INFO`: one room; `NoSuchRoom` if it does not exist.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoomInfoReq {
    pub room: String,
    pub min_pos: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomInfo {
    pub room: String,
    pub last_seq: u64,
    /// Stored members (online or not).
    pub members: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomList {
    pub rooms: Vec<RoomInfo>,
}

// ---- room messages ----------------------------------------------------

/// One message to store. The sender must be a member (checked by the chat
/// server, not here: membership can change while a message is in flight).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendItem {
    pub room: String,
    pub sender: String,
    pub client_id: Option<String>,
    pub body: String,
}

/// `PATH_APPEND`: many messages, possibly to many rooms, committed together.
/// Within one room, items are stored in request order (seq ascending).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppendReq {
    pub items: Vec<AppendItem>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Appended {
    pub seq: u64,
    pub ts: i64,
    /// The (sender, client_id) pair was stored before: `seq`/`ts` are the
    /// original message's and nothing new was written.
    pub duplicate: bool,
}

/// One result per item, in request order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendResp {
    pub results: Vec<Result<Appended, ApiError>>,
    pub pos: Option<String>,
}

/// `PATH_HISTORY`: messages with seq > `after`, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryReq {
    pub room: String,
    pub after: u64,
    pub limit: u32,
    pub min_pos: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    pub room: String,
    pub seq: u64,
    pub ts: i64,
    pub sender: String,
    pub body: String,
}

/// `NoSuchRoom` if the room does not exist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryResp {
    pub messages: Vec<StoredMessage>,
}

// ---- direct messages ----------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DmItem {
    pub sender: String,
    pub recipient: String,
    pub client_id: Option<String>,
    pub body: String,
}

/// `PATH_SEND_DMS`: group-committed like appends.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SendDmsReq {
    pub items: Vec<DmItem>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DmSent {
    pub id: i64,
    pub ts: i64,
    pub duplicate: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendDmsResp {
    /// `NoSuchUser` per item when the recipient does not exist.
    pub results: Vec<Result<DmSent, ApiError>>,
    pub pos: Option<String>,
}

/// `PATH_PENDING_DMS`: DMs to `user` not yet marked received, oldest first.
/// Always served by the primary (it is a read on a write path).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingDmsReq {
    pub user: String,
    pub limit: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredDm {
    pub id: i64,
    pub ts: i64,
    pub sender: String,
    pub recipient: String,
    pub body: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingDmsResp {
    pub dms: Vec<StoredDm>,
}

/// `PATH_MARK_RECEIVED`: sets received_at on these DMs if it is not set yet
/// (answers `WriteAck`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MarkReceivedReq {
    pub ids: Vec<i64>,
}

/// Of two write positions, the one that includes the other. Positions are
/// opaque to callers; this is the only operation they need: keep the latest
/// position of a session and send it with its reads. For MariaDB GTIDs
/// (`domain-server-seq`) of one domain the higher seq wins; anything else
/// (unparsable, different domains) prefers the newer argument.
pub fn later_pos(current: Option<String>, new: Option<String>) -> Option<String> {
    fn parts(p: &str) -> Option<(u64, u64)> {
        let mut it = p.split('-');
        let domain = it.next()?.parse().ok()?;
        let _server: u64 = it.next()?.parse().ok()?;
        let seq = it.next()?.parse().ok()?;
        it.next().is_none().then_some((domain, seq))
    }
    match (current, new) {
        (c, None) => c,
        (None, n) => n,
        (Some(c), Some(n)) => match (parts(&c), parts(&n)) {
            (Some((cd, cs)), Some((nd, ns))) if cd == nd && cs > ns => Some(c),
            _ => Some(n),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::later_pos;

    #[test]
    fn later_pos_keeps_the_highest_gtid_of_a_domain() {
        let s = |x: &str| Some(x.to_string());
        assert_eq!(later_pos(None, s("0-1-5")), s("0-1-5"));
        assert_eq!(later_pos(s("0-1-5"), None), s("0-1-5"));
        assert_eq!(later_pos(s("0-1-7"), s("0-1-5")), s("0-1-7"));
        assert_eq!(later_pos(s("0-1-5"), s("0-2-9")), s("0-2-9"));
        assert_eq!(later_pos(s("0-1-5"), s("1-1-2")), s("1-1-2"));
    }
}
