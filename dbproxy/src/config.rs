//! dbproxy configuration: one serde struct, defaults for an embedded SQLite
//! setup, checked by [`Config::validate`].

use serde::{Deserialize, Serialize};

use crate::error::DbProxyError;

pub use crate::mysql::config::MysqlConfig;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the binary binds the API (and `/metrics`, `/healthz`, `/readyz`) on.
    pub listen: String,
    /// Storage backend: `sqlite` or `mysql` (MySQL/MariaDB, see `mysql`).
    pub backend: String,
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
    /// Most HTTP connections served at once; further accepts wait.
    pub max_connections: usize,
    /// Seconds that in-flight requests and queued writes get to finish on shutdown.
    pub shutdown_grace_secs: u64,
    /// MySQL/MariaDB servers, used when `backend = "mysql"`.
    pub mysql: MysqlConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:7100".into(),
            backend: "sqlite".into(),
            sqlite_path: "data/chat.db".into(),
            batch_max_items: 512,
            write_queue: 8192,
            read_connections: 4,
            max_body_bytes: 4 * 1024 * 1024,
            max_connections: 1024,
            shutdown_grace_secs: 10,
            mysql: Default::default(),
        }
    }
}

impl Config {
    /// Checks every field; the error names the first bad key.
    pub fn validate(&self) -> Result<(), DbProxyError> {
        fn bad(key: &'static str, message: impl Into<String>) -> Result<(), DbProxyError> {
            Err(DbProxyError::Config {
                key,
                message: message.into(),
            })
        }
        if self.listen.trim().is_empty() || !self.listen.contains(':') {
            return bad("listen", "must be host:port");
        }
        if self.backend != "sqlite" && self.backend != "mysql" {
            return bad(
                "backend",
                format!(
                    "unsupported backend {:?} (supported: sqlite, mysql)",
                    self.backend
                ),
            );
        }
        if self.backend == "mysql" {
            self.mysql.validate()?;
        }
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
        if self.max_connections == 0 {
            return bad("max_connections", "must be at least 1");
        }
        Ok(())
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
        let c = Config {
            backend: "oracle".into(),
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("backend"));
    }

    #[test]
    fn unknown_keys_rejected() {
        let r: Result<Config, _> = serde_json::from_str(r#"{"listen":"0.0.0.0:1","bogus":1}"#);
        assert!(r.is_err());
        let c: Config = serde_json::from_str(r#"{"write_queue":5}"#).unwrap();
        assert_eq!(c.write_queue, 5);
        assert_eq!(c.batch_max_items, 512);
    }
}
