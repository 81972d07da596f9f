//! The `[mysql]` section of the dbproxy config (used when `backend = "mysql"`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::DbProxyError;

/// Where the MySQL/MariaDB servers are and how to reach them. The password is
/// never part of the config itself: it is read from an environment variable or
/// a secret file named here, and `Debug` prints neither source's content.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MysqlConfig {
    /// The server expected to take writes at start (`host:port`). Which server
    /// is primary is decided at run time by `@@read_only`, so after a
    /// promotion this may name a replica.
    pub primary: String,
    /// Replicas serving reads (`host:port` each); may be empty.
    pub replicas: Vec<String>,
    /// Account used for every connection.
    pub user: String,
    /// Name of the environment variable holding the password (empty: unused).
    pub password_env: String,
    /// Path of a file holding the password, trailing newline ignored (empty: unused).
    pub password_file: String,
    /// Database (schema) name; it must exist on the primary.
    pub database: String,
    /// Connections each server's pool keeps open.
    pub pool_min: usize,
    /// Most connections each server's pool opens.
    pub pool_max: usize,
    /// Replicas whose heartbeat is older than this are not read from.
    pub lag_budget_ms: u64,
    /// Longest wait for a new connection (health probes).
    pub connect_timeout_ms: u64,
    /// Longest wait for a pooled connection before a request fails with `Unavailable`.
    pub acquire_timeout_ms: u64,
    /// Period of the health loop: heartbeat write on the primary, `@@read_only`
    /// and lag of every server.
    pub health_interval_ms: u64,
    /// Longest wait (ms) on a replica for a read's `min_pos` before the read
    /// falls back to the primary.
    pub causal_wait_ms: u64,
    /// TLS to the database: `disabled`, `required` (encrypted, certificate
    /// not checked), `verify_ca` (chains to `ssl_ca`, or to the built-in web
    /// roots when `ssl_ca` is empty) or `verify_identity` (also valid for
    /// the host or address of `primary` / `replicas`). Managed databases
    /// usually require one of the last three.
    pub ssl_mode: String,
    /// PEM file of the CA(s) the database's certificate chains to; when set,
    /// only these are trusted. Read at every new connection, so a rotated
    /// file takes effect without a restart. Empty: the built-in web roots.
    pub ssl_ca: String,
}

impl Default for MysqlConfig {
    fn default() -> Self {
        MysqlConfig {
            primary: "127.0.0.1:3306".into(),
            replicas: Vec::new(),
            user: "chat".into(),
            password_env: String::new(),
            password_file: String::new(),
            database: "chat".into(),
            pool_min: 1,
            pool_max: 16,
            lag_budget_ms: 1000,
            connect_timeout_ms: 1000,
            acquire_timeout_ms: 2000,
            health_interval_ms: 200,
            causal_wait_ms: 50,
            ssl_mode: "disabled".into(),
            ssl_ca: String::new(),
        }
    }
}

impl std::fmt::Debug for MysqlConfig {
    // By hand so that no future password field can leak through `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MysqlConfig")
            .field("primary", &self.primary)
            .field("replicas", &self.replicas)
            .field("user", &self.user)
            .field("password_env", &self.password_env)
            .field("password_file", &self.password_file)
            .field("password", &"<redacted>")
            .field("database", &self.database)
            .field("pool_min", &self.pool_min)
            .field("pool_max", &self.pool_max)
            .field("lag_budget_ms", &self.lag_budget_ms)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("acquire_timeout_ms", &self.acquire_timeout_ms)
            .field("health_interval_ms", &self.health_interval_ms)
            .field("causal_wait_ms", &self.causal_wait_ms)
            .field("ssl_mode", &self.ssl_mode)
            .field("ssl_ca", &self.ssl_ca)
            .finish()
    }
}

/// A password read at start; `Debug` never shows it.
#[derive(Clone, Default)]
pub(crate) struct Password(pub(crate) Option<String>);

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

fn bad(key: &'static str, message: impl Into<String>) -> Result<(), DbProxyError> {
    Err(DbProxyError::Config {
        key,
        message: message.into(),
    })
}

fn is_addr(s: &str) -> bool {
    s.rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
}

impl MysqlConfig {
    /// Checks every field; the error names the first bad key.
    pub fn validate(&self) -> Result<(), DbProxyError> {
        if !is_addr(&self.primary) {
            return bad("mysql.primary", "must be host:port");
        }
        if let Some(r) = self.replicas.iter().find(|r| !is_addr(r)) {
            return bad("mysql.replicas", format!("{r:?} is not host:port"));
        }
        if self.user.is_empty() {
            return bad("mysql.user", "must not be empty");
        }
        if !self.password_env.is_empty() && !self.password_file.is_empty() {
            return bad(
                "mysql.password_env",
                "set password_env or password_file, not both",
            );
        }
        if self.database.is_empty()
            || !self
                .database
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return bad("mysql.database", "must be non-empty [A-Za-z0-9_]");
        }
        if self.pool_max == 0 || self.pool_max > 1024 {
            return bad("mysql.pool_max", "must be 1..=1024");
        }
        if self.pool_min > self.pool_max {
            return bad("mysql.pool_min", "must not exceed pool_max");
        }
        if self.lag_budget_ms == 0 {
            return bad("mysql.lag_budget_ms", "must be at least 1");
        }
        if self.connect_timeout_ms == 0 {
            return bad("mysql.connect_timeout_ms", "must be at least 1");
        }
        if self.acquire_timeout_ms == 0 {
            return bad("mysql.acquire_timeout_ms", "must be at least 1");
        }
        if !(10..=10_000).contains(&self.health_interval_ms) {
            return bad("mysql.health_interval_ms", "must be 10..=10000");
        }
        if !["disabled", "required", "verify_ca", "verify_identity"]
            .contains(&self.ssl_mode.as_str())
        {
            return bad(
                "mysql.ssl_mode",
                "must be disabled, required, verify_ca or verify_identity",
            );
        }
        if !self.ssl_ca.is_empty() && self.ssl_mode == "disabled" {
            return bad(
                "mysql.ssl_ca",
                "only used with an ssl_mode other than disabled",
            );
        }
        if self.causal_wait_ms > 10_000 {
            return bad("mysql.causal_wait_ms", "must be at most 10000");
        }
        Ok(())
    }

    /// Reads the password from the configured source (none if neither is set).
    pub(crate) fn password(&self) -> Result<Password, DbProxyError> {
        if !self.password_env.is_empty() {
            return match std::env::var(&self.password_env) {
                Ok(p) => Ok(Password(Some(p))),
                Err(_) => Err(DbProxyError::Config {
                    key: "mysql.password_env",
                    message: format!("environment variable {} is not set", self.password_env),
                }),
            };
        }
        if !self.password_file.is_empty() {
            return match std::fs::read_to_string(&self.password_file) {
                Ok(p) => Ok(Password(Some(p.trim_end_matches(['\r', '\n']).to_owned()))),
                Err(e) => Err(DbProxyError::Config {
                    key: "mysql.password_file",
                    message: format!("reading {}: {e}", self.password_file),
                }),
            };
        }
        Ok(Password(None))
    }

    /// The TLS options of every connection, `None` for `disabled`. Checks
    /// that `ssl_ca` is readable PEM now, so a wrong path stops the start
    /// instead of failing every connect.
    pub(crate) fn ssl_opts(&self) -> Result<Option<mysql_async::SslOpts>, DbProxyError> {
        let opts = match self.ssl_mode.as_str() {
            "required" => mysql_async::SslOpts::default().with_danger_accept_invalid_certs(true),
            // mysql_async 0.37 skips the name check by matching rustls's
            // error text, which rustls 0.23's `NotValidForNameContext` no
            // longer matches: a certificate not valid for the address dialed
            // is still refused (seen against MariaDB). Closed, never open.
            "verify_ca" => mysql_async::SslOpts::default().with_danger_skip_domain_validation(true),
            "verify_identity" => mysql_async::SslOpts::default(),
            _ => return Ok(None),
        };
        if self.ssl_ca.is_empty() {
            return Ok(Some(opts));
        }
        let pem = std::fs::read_to_string(&self.ssl_ca).map_err(|e| DbProxyError::Config {
            key: "mysql.ssl_ca",
            message: format!("reading {}: {e}", self.ssl_ca),
        })?;
        if !pem.contains("-----BEGIN CERTIFICATE-----") {
            return Err(DbProxyError::Config {
                key: "mysql.ssl_ca",
                message: format!("{}: no PEM certificate in the file", self.ssl_ca),
            });
        }
        let path = std::path::PathBuf::from(&self.ssl_ca);
        Ok(Some(
            opts.with_root_certs(vec![path.into()])
                .with_disable_built_in_roots(true),
        ))
    }

    pub(crate) fn acquire_timeout(&self) -> Duration {
        Duration::from_millis(self.acquire_timeout_ms)
    }

    pub(crate) fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid_and_bad_keys_named() {
        MysqlConfig::default().validate().unwrap();
        let c = MysqlConfig {
            replicas: vec!["nope".into()],
            ..MysqlConfig::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("mysql.replicas"));
        let c = MysqlConfig {
            pool_min: 5,
            pool_max: 2,
            ..MysqlConfig::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("mysql.pool_min"));
    }

    #[test]
    fn debug_and_password_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "hunter2\n").unwrap();
        let c = MysqlConfig {
            password_file: path.to_string_lossy().into_owned(),
            ..MysqlConfig::default()
        };
        let pw = c.password().unwrap();
        assert_eq!(pw.0.as_deref(), Some("hunter2"));
        assert!(!format!("{c:?} {pw:?}").contains("hunter2"));
    }
}
