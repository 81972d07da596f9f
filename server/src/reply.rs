//! Replies that sessions and rooms both send: a storage failure as the
//! client's `ERR` line, and the `id=<cid>` prefix of an answer to a
//! `MSG` / `DM` with a client id.

use chat_protocol::{ErrorCode, ServerLine};
use chat_storage_api::{ApiError, ErrorKind};

use crate::cluster::wire::PeerError;
use crate::metrics::Metrics;

/// Why a message was not stored, as its sender's client is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failed {
    pub code: ErrorCode,
    pub detail: String,
}

impl Failed {
    /// A storage failure: the code the protocol gives its kind, and a
    /// detail that says only what the client can act on.
    pub fn storage(e: &ApiError) -> Failed {
        let code = match e.kind {
            ErrorKind::AuthFailed => ErrorCode::AuthFailed,
            ErrorKind::NameTaken => ErrorCode::NameTaken,
            ErrorKind::TokenInvalid => ErrorCode::TokenInvalid,
            ErrorKind::NoSuchRoom => ErrorCode::NoSuchRoom,
            ErrorKind::NoSuchUser => ErrorCode::NoSuchUser,
            ErrorKind::BadRequest => ErrorCode::BadArgs,
            ErrorKind::TooManyRooms => ErrorCode::TooManyRooms,
            ErrorKind::RateLimited => ErrorCode::RateLimited,
            // Nothing was stored, and the client can retry once the operator
            // fixed this server's token.
            ErrorKind::Unavailable | ErrorKind::Unauthorized => ErrorCode::Unavailable,
            ErrorKind::Internal => ErrorCode::Internal,
        };
        let detail = match e.kind {
            ErrorKind::Unavailable | ErrorKind::Unauthorized => UNAVAILABLE.to_string(),
            ErrorKind::Internal => "storage failed".to_string(),
            _ => e.message.clone(),
        };
        Failed { code, detail }
    }

    /// Nothing was stored and a resend may succeed (storage or the room's
    /// server out of reach, the server shutting down).
    pub fn unavailable() -> Failed {
        Failed {
            code: ErrorCode::Unavailable,
            detail: UNAVAILABLE.to_string(),
        }
    }

    /// The `ERR` line, counted in `chat_errors_total`.
    pub fn line(&self, metrics: &Metrics, cid: &Option<String>) -> ServerLine {
        error_line(metrics, self.code, with_cid(cid, &self.detail))
    }
}

const UNAVAILABLE: &str = "storage unavailable, nothing stored; retry";

/// An `ERR` line, counted in `chat_errors_total`.
pub fn error_line(metrics: &Metrics, code: ErrorCode, detail: impl Into<String>) -> ServerLine {
    metrics
        .errors_total
        .with_label_values(&[code.as_str()])
        .inc();
    ServerLine::err(code, detail)
}

/// Maps a storage failure to the client's `ERR` line.
pub fn storage_error(metrics: &Metrics, e: &ApiError, cid: &Option<String>) -> ServerLine {
    Failed::storage(e).line(metrics, cid)
}

pub fn with_cid(cid: &Option<String>, detail: &str) -> String {
    match cid {
        Some(c) => format!("id={c} {detail}"),
        None => detail.to_string(),
    }
}

impl From<Failed> for PeerError {
    fn from(f: Failed) -> PeerError {
        PeerError {
            code: f.code.as_str().to_string(),
            detail: f.detail,
        }
    }
}

impl From<PeerError> for Failed {
    fn from(e: PeerError) -> Failed {
        Failed {
            code: ErrorCode::from_code(&e.code).unwrap_or(ErrorCode::Internal),
            detail: e.detail,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_failures_say_only_what_the_client_can_act_on() {
        let down = Failed::storage(&ApiError::new(ErrorKind::Unavailable, "db 10.0.0.3 down"));
        assert_eq!(down, Failed::unavailable());
        let refused = Failed::storage(&ApiError::new(ErrorKind::Unauthorized, "bad token"));
        assert_eq!(refused.code, ErrorCode::Unavailable);
        assert!(!refused.detail.contains("token"));
        let internal = Failed::storage(&ApiError::new(ErrorKind::Internal, "sqlite: disk I/O"));
        assert_eq!(internal.detail, "storage failed");
        let bad = Failed::storage(&ApiError::new(ErrorKind::BadRequest, "text too long"));
        assert_eq!(
            (bad.code, bad.detail.as_str()),
            (ErrorCode::BadArgs, "text too long")
        );
    }

    #[test]
    fn a_failure_crosses_the_wire_unchanged() {
        let f = Failed::storage(&ApiError::new(ErrorKind::RateLimited, "slow down"));
        assert_eq!(Failed::from(PeerError::from(f.clone())), f);
        let unknown = PeerError {
            code: "NEW_CODE".into(),
            detail: "x".into(),
        };
        assert_eq!(Failed::from(unknown).code, ErrorCode::Internal);
    }

    #[test]
    fn client_ids_prefix_the_detail() {
        assert_eq!(with_cid(&Some("7".into()), "no"), "id=7 no");
        assert_eq!(with_cid(&None, "no"), "no");
    }
}
