//! Chat server configuration: the `[server]` section of the config file, or
//! `CHAT_SERVER__<KEY>` environment variables.

use serde::{Deserialize, Serialize};

use crate::error::Error;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Client listener (the line protocol).
    pub listen: String,
    /// Admin listener: /metrics, /healthz, /readyz.
    pub admin_listen: String,
    /// Base URL of the dbproxy HTTP API.
    pub dbproxy_url: String,
    /// Longest client line in bytes (terminator excluded); longer lines are discarded.
    pub max_line_bytes: usize,
    /// Lines queued for one client before it counts as a slow consumer and is
    /// disconnected. 1024 lines covers bursts of a busy room without letting one
    /// stalled reader pin megabytes.
    pub send_queue_lines: usize,
    /// A connection that sends nothing for this long is closed.
    pub idle_timeout_secs: u64,
    /// A token unused for this long expires (and a guest's name is released).
    pub token_idle_ttl_secs: u64,
    /// Commands per second one connection may send (token bucket rate).
    pub rate_per_sec: u32,
    /// Token bucket size: how many commands may arrive at once.
    pub rate_burst: u32,
    /// Rate-limited commands in a row after which the connection is closed.
    pub rate_limit_kick: u32,
    /// MSG/DM commands of one connection waiting for storage at once.
    pub max_inflight_per_conn: usize,
    /// Concurrent client connections; further connects wait in the backlog.
    pub max_connections: usize,
    /// Rooms one user may be a member of: bounds what a login restores and
    /// what one user makes the server track.
    pub max_rooms_per_user: usize,
    /// Pending publishes per room before senders wait.
    pub room_queue: usize,
    /// Most messages one room sends to storage in one batch.
    pub room_batch_max: usize,
    /// How long draining may take on shutdown.
    pub shutdown_grace_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:7000".into(),
            admin_listen: "127.0.0.1:9101".into(),
            dbproxy_url: "http://127.0.0.1:7100".into(),
            max_line_bytes: 4096,
            send_queue_lines: 1024,
            idle_timeout_secs: 300,
            token_idle_ttl_secs: 86_400,
            rate_per_sec: 50,
            rate_burst: 100,
            rate_limit_kick: 1000,
            max_inflight_per_conn: 64,
            max_connections: 100_000,
            max_rooms_per_user: 1000,
            room_queue: 4096,
            room_batch_max: 256,
            shutdown_grace_secs: 10,
        }
    }
}

impl Config {
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |key: &str, why: &str| Err(Error::Config(format!("server.{key}: {why}")));
        for (key, addr) in [
            ("listen", &self.listen),
            ("admin_listen", &self.admin_listen),
        ] {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                return bad(key, "must be an ip:port socket address");
            }
        }
        if !(self.dbproxy_url.starts_with("http://")) {
            return bad("dbproxy_url", "must be an http:// URL");
        }
        if !(64..=1 << 20).contains(&self.max_line_bytes) {
            return bad("max_line_bytes", "must be between 64 and 1048576");
        }
        let positive = [
            ("send_queue_lines", self.send_queue_lines as u64),
            ("idle_timeout_secs", self.idle_timeout_secs),
            ("token_idle_ttl_secs", self.token_idle_ttl_secs),
            ("rate_per_sec", self.rate_per_sec.into()),
            ("rate_burst", self.rate_burst.into()),
            ("rate_limit_kick", self.rate_limit_kick.into()),
            ("max_inflight_per_conn", self.max_inflight_per_conn as u64),
            ("max_connections", self.max_connections as u64),
            ("max_rooms_per_user", self.max_rooms_per_user as u64),
            ("room_queue", self.room_queue as u64),
            ("room_batch_max", self.room_batch_max as u64),
        ];
        for (key, v) in positive {
            if v == 0 {
                return bad(key, "must be greater than 0");
            }
        }
        Ok(())
    }
}
