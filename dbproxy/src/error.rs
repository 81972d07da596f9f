//! Errors at the crate boundary: [`DbProxyError`] for starting and running the
//! service; request failures travel as [`ApiError`] (the contract's, in
//! `chat_storage_api`), built by the constructors here so that both backends
//! word them alike.

use chat_storage_api::{ApiError, ErrorKind};

#[derive(Debug, thiserror::Error)]
pub enum DbProxyError {
    /// A configuration value is invalid (operator error).
    #[error("config key `{key}`: {message}")]
    Config { key: &'static str, message: String },
    /// Socket or filesystem failure.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// Opening or migrating the database failed.
    #[error("database {path}: {source}")]
    Database {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    /// Metric registration failed (e.g. registered twice on one registry).
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The API's TLS certificates could not be loaded.
    #[error("tls: {0}")]
    Tls(#[from] chat_tls::TlsError),
    /// A MySQL/MariaDB server could not be used at start (no primary, migration).
    #[error("mysql {addr}: {message}")]
    Mysql { addr: String, message: String },
}

pub(crate) fn unavailable(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::Unavailable, message)
}

pub(crate) fn internal(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::Internal, message)
}

pub(crate) fn no_such_user(name: &str) -> ApiError {
    ApiError::new(ErrorKind::NoSuchUser, format!("no such user {name}"))
}

pub(crate) fn no_such_room(name: &str) -> ApiError {
    ApiError::new(ErrorKind::NoSuchRoom, format!("no such room {name}"))
}

pub(crate) fn name_taken(name: &str) -> ApiError {
    ApiError::new(ErrorKind::NameTaken, format!("name {name} is taken"))
}

pub(crate) fn too_many_rooms(max: i64) -> ApiError {
    ApiError::new(
        ErrorKind::TooManyRooms,
        format!("at most {max} rooms per user; PART one first"),
    )
}

/// Transient SQLite conditions (busy, full disk, I/O) are retryable; anything
/// else is a fault of ours.
pub(crate) fn from_sqlite(e: &rusqlite::Error) -> ApiError {
    use rusqlite::ErrorCode as C;
    match e.sqlite_error_code() {
        Some(
            C::DatabaseBusy
            | C::DatabaseLocked
            | C::DiskFull
            | C::SystemIoFailure
            | C::CannotOpen
            | C::OutOfMemory,
        ) => unavailable(format!("storage: {e}")),
        _ => internal(format!("storage: {e}")),
    }
}
