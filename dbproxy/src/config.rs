//! dbproxy configuration: one serde struct, defaults for an embedded SQLite
//! setup, checked by [`Config::validate`].

use std::net::SocketAddr;
use std::time::Duration;

use chat_admin::units::{millis, secs};
use serde::Deserialize;

use crate::error::DbProxyError;

pub use crate::mysql::config::MysqlConfig;

/// Where the data lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    /// Embedded SQLite at `sqlite_path`.
    Sqlite,
    /// MySQL/MariaDB servers, `[dbproxy.mysql]`.
    Mysql,
}

impl std::fmt::Display for StorageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StorageKind::Sqlite => "sqlite",
            StorageKind::Mysql => "mysql",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the binary binds the API on, `ip:port` (the chat servers'
    /// port; it also answers `/readyz` and `/healthz`, which the servers
    /// probe).
    pub listen: SocketAddr,
    /// Address the binary binds `/metrics`, `/healthz` and `/readyz` on (the
    /// port Prometheus and the kubelet use).
    pub admin_listen: SocketAddr,
    /// `[dbproxy.admin_http]`: time and connection bounds of the admin listener.
    pub admin_http: chat_admin::HttpLimits,
    /// Storage backend: `sqlite` or `mysql` (MySQL/MariaDB, see `mysql`).
    pub backend: StorageKind,
    /// SQLite database file; missing parent directories are created.
    pub sqlite_path: String,
    /// Most items (messages, DMs, other writes) committed in one transaction.
    pub batch_max_items: usize,
    /// Write requests that may wait for the writer; beyond it writes fail with
    /// `Unavailable` instead of queueing without bound.
    pub write_queue: usize,
    /// Read-only connections serving reads next to the writer (WAL).
    pub read_connections: usize,
    /// Largest request body accepted; larger bodies get `413`.
    pub max_body_bytes: usize,
    /// Most API connections open at once. When full, a new connection takes
    /// the slot of the longest-idle one. Keep it at least the sum of the
    /// chat servers' `dbproxy_pool_max` (docs/OPERATIONS.md).
    pub max_connections: usize,
    /// An API request head must arrive within this long of the connection
    /// opening (or of its first byte after an idle spell).
    pub header_timeout_ms: u64,
    /// An API connection with no request for this long is closed; keep it
    /// above the chat servers' `dbproxy_pool_idle_ms`, so that the pool, not
    /// the dbproxy, closes an idle connection.
    pub idle_timeout_ms: u64,
    /// Longest one API request may take once its head arrived (body and
    /// answer); above the servers' 10 s request timeout.
    pub request_timeout_ms: u64,
    /// Seconds that in-flight requests and queued writes get to finish on shutdown.
    #[serde(deserialize_with = "secs")]
    pub shutdown_grace_secs: Duration,
    /// Longest message text (room message or DM body) stored, in bytes. The
    /// chat server's lines are at most its `max_line_bytes` (4096), so no
    /// text it accepted is longer.
    pub max_text_bytes: usize,
    /// Rooms one user may be a member of; a join beyond it fails with
    /// `TooManyRooms`. Enforced here whatever the caller checked.
    pub max_rooms_per_user: usize,
    /// A token unused for this long expires, and a guest's name is then free
    /// again. The chat servers touch the tokens of open connections every
    /// `token_touch_interval_ms`, which must stay well below this.
    #[serde(deserialize_with = "secs")]
    pub token_idle_ttl_secs: Duration,
    /// Failed logins are counted over a sliding window of this many seconds.
    #[serde(deserialize_with = "secs")]
    pub login_failure_window_secs: Duration,
    /// Failed logins of one account name (existing or not) within the window
    /// after which its logins are refused with `RateLimited`, before any
    /// password hashing.
    pub login_failures_per_account: u32,
    /// Failed logins from one source address (an IPv6 source counts by its
    /// /64) within the window after which its logins are refused.
    pub login_failures_per_source: u32,
    /// Accounts, and separately sources, whose failures are remembered; the
    /// limiter's memory is bounded by this (about 100 bytes an entry).
    pub login_limiter_entries: usize,
    /// Threads computing password hashes (argon2id), each with its own
    /// reused 19 MiB block. 0: one per core.
    pub hash_threads: usize,
    /// Password hashes waiting for a hashing thread; beyond it logins fail
    /// with `Unavailable` instead of queueing without bound.
    pub hash_queue: usize,
    /// `[dbproxy.tls]`: this dbproxy's certificate (name `chat-dbproxy`), key
    /// and the CA its callers' certificates chain to. When set, the API
    /// listener takes mutual TLS only, and only from chat servers (a
    /// certificate named `chat-server`). Files are re-read when they change.
    pub tls: Option<chat_tls::TlsIdentity>,
    /// Bearer tokens the API accepts (`Authorization: Bearer <token>`);
    /// several, so a token can be rotated. Prefer `api_tokens_file`. With
    /// no token configured the API takes every request (a WARN at start).
    pub api_tokens: Vec<chat_tls::Secret>,
    /// File of accepted tokens, one per line (a mounted Secret), re-read
    /// when it changes; its tokens are accepted next to `api_tokens`.
    pub api_tokens_file: String,
    /// How often the token file and the TLS files are checked for changes.
    #[serde(deserialize_with = "millis")]
    pub reload_interval_ms: Duration,
    /// MySQL/MariaDB servers, used when `backend = "mysql"`.
    pub mysql: MysqlConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 7100)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9103)),
            admin_http: chat_admin::HttpLimits::default(),
            backend: StorageKind::Sqlite,
            sqlite_path: "data/chat.db".into(),
            batch_max_items: 512,
            write_queue: 8192,
            read_connections: 4,
            max_body_bytes: 4 * 1024 * 1024,
            max_connections: 1024,
            header_timeout_ms: 5_000,
            idle_timeout_ms: 60_000,
            request_timeout_ms: 30_000,
            shutdown_grace_secs: Duration::from_secs(10),
            max_text_bytes: 4096,
            max_rooms_per_user: 1000,
            token_idle_ttl_secs: Duration::from_secs(86_400),
            login_failure_window_secs: Duration::from_secs(300),
            login_failures_per_account: 10,
            login_failures_per_source: 100,
            login_limiter_entries: 65_536,
            hash_threads: 0,
            hash_queue: 128,
            tls: None,
            api_tokens: Vec::new(),
            api_tokens_file: String::new(),
            reload_interval_ms: Duration::from_secs(10),
            mysql: Default::default(),
        }
    }
}

/// The error naming a bad key.
fn bad(key: &'static str, message: impl Into<String>) -> Result<(), DbProxyError> {
    Err(DbProxyError::Config {
        key,
        message: message.into(),
    })
}

impl Config {
    /// Checks every field; the error names the first bad key.
    pub fn validate(&self) -> Result<(), DbProxyError> {
        if let Err((key, why)) = self.admin_http.validate() {
            let key = match key {
                "header_timeout_ms" => "admin_http.header_timeout_ms",
                "idle_timeout_ms" => "admin_http.idle_timeout_ms",
                "request_timeout_ms" => "admin_http.request_timeout_ms",
                _ => "admin_http.max_connections",
            };
            return bad(key, why);
        }
        if let Err((key, why)) = self.api_http().validate() {
            return bad(key, why);
        }
        if self.backend == StorageKind::Mysql {
            self.mysql.validate()?;
        }
        if let Some(tls) = &self.tls {
            for (key, path) in [
                ("tls.cert", &tls.cert),
                ("tls.key", &tls.key),
                ("tls.ca", &tls.ca),
            ] {
                if path.as_os_str().is_empty() {
                    return bad(key, "must name a PEM file");
                }
            }
        }
        if self
            .api_tokens
            .iter()
            .any(|t| t.expose().trim().chars().count() < crate::credential::MIN_TOKEN_CHARS)
        {
            return bad("api_tokens", "every token must have at least 16 characters");
        }
        if !(Duration::from_millis(100)..=Duration::from_secs(3600))
            .contains(&self.reload_interval_ms)
        {
            return bad("reload_interval_ms", "must be 100..=3600000");
        }
        self.validate_storage()?;
        self.validate_identity()
    }

    /// The storage and request keys.
    fn validate_storage(&self) -> Result<(), DbProxyError> {
        if self.sqlite_path.trim().is_empty() {
            return bad("sqlite_path", "must not be empty");
        }
        if self.batch_max_items == 0 {
            return bad("batch_max_items", "must be at least 1");
        }
        if self.write_queue == 0 {
            return bad("write_queue", "must be at least 1");
        }
        if !(1..=256).contains(&self.read_connections) {
            return bad("read_connections", "must be 1..=256");
        }
        if self.max_body_bytes < 1024 {
            return bad("max_body_bytes", "must be at least 1024");
        }
        if !(1..=1 << 20).contains(&self.max_text_bytes) {
            return bad("max_text_bytes", "must be 1..=1048576");
        }
        Ok(())
    }

    /// Token lifetime, failed-login limits and password hashing.
    fn validate_identity(&self) -> Result<(), DbProxyError> {
        for (key, v) in [
            ("token_idle_ttl_secs", self.token_idle_ttl_secs),
            ("login_failure_window_secs", self.login_failure_window_secs),
        ] {
            if v.is_zero() {
                return bad(key, "must be at least 1");
            }
        }
        let positive = [
            ("max_rooms_per_user", self.max_rooms_per_user as u64),
            (
                "login_failures_per_account",
                self.login_failures_per_account.into(),
            ),
            (
                "login_failures_per_source",
                self.login_failures_per_source.into(),
            ),
            ("login_limiter_entries", self.login_limiter_entries as u64),
            ("hash_queue", self.hash_queue as u64),
        ];
        for (key, v) in positive {
            if v == 0 {
                return bad(key, "must be at least 1");
            }
        }
        // Keeps `now - ttl` and the limiter's arithmetic far from overflow.
        if self.token_idle_ttl_secs > Duration::from_secs(10 * 365 * 86_400) {
            return bad("token_idle_ttl_secs", "must be at most ten years");
        }
        if self.login_failure_window_secs > Duration::from_secs(86_400) {
            return bad("login_failure_window_secs", "must be at most 86400");
        }
        if self.login_limiter_entries > 10_000_000 {
            return bad("login_limiter_entries", "must be at most 10000000");
        }
        if self.hash_threads > 256 {
            return bad("hash_threads", "must be 0..=256");
        }
        Ok(())
    }

    /// The API listener's bounds, from its keys.
    pub fn api_http(&self) -> chat_admin::HttpLimits {
        chat_admin::HttpLimits {
            header_timeout_ms: self.header_timeout_ms,
            idle_timeout_ms: self.idle_timeout_ms,
            request_timeout_ms: self.request_timeout_ms,
            max_connections: self.max_connections,
        }
    }

    /// [`Config::token_idle_ttl_secs`] in ms, as the queries compare it.
    pub fn token_idle_ttl_ms(&self) -> i64 {
        i64::try_from(self.token_idle_ttl_secs.as_millis()).unwrap_or(i64::MAX)
    }

    /// [`Config::hash_threads`] with 0 resolved to the number of cores.
    pub fn hashing_threads(&self) -> usize {
        match self.hash_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn bad_key_is_named() {
        let c = Config {
            batch_max_items: 0,
            ..Config::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("batch_max_items"), "{e}");
        let e = serde_json::from_str::<Config>(r#"{"backend":"oracle"}"#).unwrap_err();
        assert!(e.to_string().contains("`sqlite` or `mysql`"), "{e}");
        for (key, c) in [
            (
                "token_idle_ttl_secs",
                Config {
                    token_idle_ttl_secs: Duration::ZERO,
                    ..Config::default()
                },
            ),
            (
                "max_text_bytes",
                Config {
                    max_text_bytes: 0,
                    ..Config::default()
                },
            ),
            (
                "login_failures_per_source",
                Config {
                    login_failures_per_source: 0,
                    ..Config::default()
                },
            ),
            (
                "hash_queue",
                Config {
                    hash_queue: 0,
                    ..Config::default()
                },
            ),
            (
                "hash_threads",
                Config {
                    hash_threads: 1000,
                    ..Config::default()
                },
            ),
            (
                "admin_http.idle_timeout_ms",
                Config {
                    admin_http: chat_admin::HttpLimits {
                        idle_timeout_ms: 0,
                        ..Default::default()
                    },
                    ..Config::default()
                },
            ),
            (
                "`max_connections`",
                Config {
                    max_connections: 0,
                    ..Config::default()
                },
            ),
            (
                "`header_timeout_ms`",
                Config {
                    header_timeout_ms: 99,
                    ..Config::default()
                },
            ),
            (
                "`request_timeout_ms`",
                Config {
                    request_timeout_ms: 0,
                    ..Config::default()
                },
            ),
        ] {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
    }

    #[test]
    fn unknown_keys_rejected() {
        let r: Result<Config, _> = serde_json::from_str(r#"{"listen":"0.0.0.0:1","bogus":1}"#);
        assert!(r.is_err());
        let r: Result<Config, _> = serde_json::from_str(r#"{"admin_listen":"nowhere"}"#);
        assert!(r.is_err(), "admin_listen must be an ip:port socket address");
        let c: Config = serde_json::from_str(r#"{"write_queue":5}"#).unwrap();
        assert_eq!(c.write_queue, 5);
        assert_eq!(c.batch_max_items, 512);
    }
}
