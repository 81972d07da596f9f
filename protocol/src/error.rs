use std::fmt;

/// Stable error codes of `ERR <CODE> <detail>` lines. The string forms are part
/// of the protocol: never rename one, only add.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    BadFirstLine,
    AuthFailed,
    NameTaken,
    TokenInvalid,
    LineTooLong,
    BadUtf8,
    UnknownCommand,
    BadArgs,
    AlreadyLoggedIn,
    NotMember,
    NoSuchRoom,
    NoSuchUser,
    RateLimited,
    TooManyRooms,
    Unavailable,
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 16] = [
        ErrorCode::BadFirstLine,
        ErrorCode::AuthFailed,
        ErrorCode::NameTaken,
        ErrorCode::TokenInvalid,
        ErrorCode::LineTooLong,
        ErrorCode::BadUtf8,
        ErrorCode::UnknownCommand,
        ErrorCode::BadArgs,
        ErrorCode::AlreadyLoggedIn,
        ErrorCode::NotMember,
        ErrorCode::NoSuchRoom,
        ErrorCode::NoSuchUser,
        ErrorCode::RateLimited,
        ErrorCode::TooManyRooms,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFirstLine => "BAD_FIRST_LINE",
            ErrorCode::AuthFailed => "AUTH_FAILED",
            ErrorCode::NameTaken => "NAME_TAKEN",
            ErrorCode::TokenInvalid => "TOKEN_INVALID",
            ErrorCode::LineTooLong => "LINE_TOO_LONG",
            ErrorCode::BadUtf8 => "BAD_UTF8",
            ErrorCode::UnknownCommand => "UNKNOWN_COMMAND",
            ErrorCode::BadArgs => "BAD_ARGS",
            ErrorCode::AlreadyLoggedIn => "ALREADY_LOGGED_IN",
            ErrorCode::NotMember => "NOT_MEMBER",
            ErrorCode::NoSuchRoom => "NO_SUCH_ROOM",
            ErrorCode::NoSuchUser => "NO_SUCH_USER",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::TooManyRooms => "TOO_MANY_ROOMS",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::Internal => "INTERNAL",
        }
    }

    pub fn from_code(s: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A line that could not be understood, with the code the server answers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code} {detail}")]
pub struct ParseError {
    pub code: ErrorCode,
    pub detail: String,
}

impl ParseError {
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> Self {
        ParseError {
            code,
            detail: detail.into(),
        }
    }

    pub fn bad_args(detail: impl Into<String>) -> Self {
        ParseError::new(ErrorCode::BadArgs, detail)
    }
}
