//! Chat server configuration: the `[server]` section of the config file, or
//! `CHAT_SERVER__<KEY>` environment variables.

//!
//! Durations stay whole numbers in the unit their key names (`u64`, as the
//! server's modules read them); the accessors below give them as
//! [`Duration`]s.

use std::net::SocketAddr;
use std::time::Duration;

use chat_admin::members::{Dns, Members};
use serde::Deserialize;

use crate::error::Error;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Client listener (the line protocol), `ip:port`.
    pub listen: SocketAddr,
    /// Admin listener: /metrics, /healthz, /readyz.
    pub admin_listen: SocketAddr,
    /// `[server.admin_http]`: time and connection bounds of the admin listener.
    pub admin_http: chat_admin::HttpLimits,
    /// Base URL of the dbproxy HTTP API. `https://` dials it over mutual TLS
    /// with this server's `tls` identity and requires the dbproxy's
    /// certificate to carry the name `chat-dbproxy`.
    pub dbproxy_url: String,
    /// Bearer token sent on every dbproxy request (one of the dbproxy's
    /// `api_tokens`). Prefer `dbproxy_token_file`; never logged.
    pub dbproxy_token: chat_tls::Secret,
    /// File holding the bearer token (a mounted Secret), re-read when it
    /// changes so a rotated token is used without a restart; overrides
    /// `dbproxy_token`.
    pub dbproxy_token_file: String,
    /// Connections this server keeps open to one dbproxy at most (busy and
    /// idle), and requests in flight to storage. Every server's pool must
    /// fit the dbproxy's `max_connections`: servers × this ≤ it.
    pub dbproxy_pool_max: usize,
    /// A pooled dbproxy connection unused this long is closed. Keep it below
    /// the dbproxy's `idle_timeout_ms` (60 s), so the pool closes it first.
    pub dbproxy_pool_idle_ms: u64,
    /// Longest client line in bytes (terminator excluded); longer lines are discarded.
    pub max_line_bytes: usize,
    /// Lines queued for one client before it counts as a slow consumer and is
    /// disconnected. 1024 lines covers bursts of a busy room without letting one
    /// stalled reader pin megabytes.
    pub send_queue_lines: usize,
    /// A connection that sends nothing for this long is closed.
    pub idle_timeout_secs: u64,
    /// How often the tokens of open connections are marked used, so they do
    /// not expire while in use. Token expiry itself is the dbproxy's
    /// `token_idle_ttl_secs` (default 86400): keep this well below half of it.
    pub token_touch_interval_ms: u64,
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
    /// A connection that has not sent its first line (login, or a peer's
    /// `PEER`) after this long gets `ERR BAD_FIRST_LINE` and is closed, so
    /// silent sockets do not hold connection slots for `idle_timeout_secs`.
    pub first_line_timeout_secs: u64,
    /// Address blocks (`10.0.0.0/8`, `fd00::/8`, or single addresses) of the
    /// proxies whose connections may open with a PROXY protocol v1 line naming
    /// the client's address. A PROXY line from any other address is refused;
    /// without one the socket's peer is the client's address. Empty (the
    /// default): no one is trusted.
    pub trust_proxy_line: Vec<String>,
    /// `[server.tls]`: this server's certificate (name `chat-server`), key
    /// and the CA its callers' certificates chain to. When set, the client
    /// port takes mutual TLS: proxies (`chat-proxy`) and other servers
    /// (`chat-server`) must present a certificate from the CA, links to the
    /// other servers are dialed over TLS, and a `PROXY` line is believed
    /// only from a proxy's certificate. Files are re-read when they change.
    pub tls: Option<chat_tls::TlsIdentity>,
    /// With `tls` set, also take plain TCP connections on the client port
    /// (clients only, never `PEER` or a `PROXY` line): for a rolling
    /// migration to TLS.
    pub tls_allow_plain: bool,
    /// How often the `tls` files are checked for changes (a rotated Secret
    /// is used from the next handshake on; open connections keep theirs).
    pub reload_interval_ms: u64,
    /// The other chat servers: rooms and DMs across servers.
    pub cluster: ClusterConfig,
}

/// `[server.cluster]`: which chat servers form the cluster and how their
/// server-to-server links behave. With no peers (the default) the server is a
/// cluster of one.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// This server's id on the hash ring: its client address as the proxies
    /// list it (`10.0.3.7:7000`). Empty: the address the client listener bound.
    pub advertise: String,
    /// Client addresses of the chat servers (this one may be listed too).
    /// Peers connect to each other's client port and open with `PEER`.
    pub peers: Vec<String>,
    /// DNS name listing the chat servers (a Kubernetes headless Service), at
    /// `dns_port`; when set, `peers` is ignored.
    pub dns_name: Option<String>,
    /// Client port of the servers found through `dns_name`.
    pub dns_port: u16,
    /// How often `dns_name` is resolved again.
    pub dns_refresh_secs: u64,
    /// Shared secret every server presents when it opens a link. Required
    /// once there are peers; never logged.
    pub secret: chat_tls::Secret,
    /// Ring points per server; must match the proxies' `vnodes`.
    pub vnodes: u32,
    /// How often an idle link sends a heartbeat.
    pub heartbeat_ms: u64,
    /// A link that hears nothing for this long is dropped and its server
    /// leaves this server's ring until the link is back.
    pub peer_timeout_ms: u64,
    /// Frames queued for one peer; a peer that stays full for
    /// `peer_timeout_ms` is disconnected (it resynchronises on reconnect).
    pub peer_queue: usize,
    /// A message forwarded to a room's owner that gets no answer in this long
    /// is answered `ERR UNAVAILABLE` (the client resends it with its id).
    pub request_timeout_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            advertise: String::new(),
            peers: Vec::new(),
            dns_name: None,
            dns_port: 7000,
            dns_refresh_secs: 5,
            secret: chat_tls::Secret::default(),
            vnodes: chat_ring::DEFAULT_VNODES,
            heartbeat_ms: 250,
            peer_timeout_ms: 2000,
            peer_queue: 65_536,
            request_timeout_ms: 5000,
        }
    }
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("advertise", &self.advertise)
            .field("peers", &self.peers)
            .field("dns_name", &self.dns_name)
            .field("dns_port", &self.dns_port)
            .field("secret", &self.secret)
            .field("vnodes", &self.vnodes)
            .field("heartbeat_ms", &self.heartbeat_ms)
            .field("peer_timeout_ms", &self.peer_timeout_ms)
            .field("peer_queue", &self.peer_queue)
            .finish_non_exhaustive()
    }
}

impl ClusterConfig {
    /// Whether other servers are configured at all.
    pub fn is_clustered(&self) -> bool {
        self.dns_name.is_some() || !self.peers.is_empty()
    }

    /// Where the peers come from: `dns_name` when set (resolved every
    /// `dns_refresh_secs`), else `peers`.
    pub fn members(&self) -> Members<String> {
        let dns = self.dns_name.as_ref().map(|name| Dns {
            name: name.clone(),
            port: self.dns_port,
            refresh: Duration::from_secs(self.dns_refresh_secs),
        });
        Members::from_config(self.peers.clone(), dns)
    }

    /// [`ClusterConfig::heartbeat_ms`].
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }

    /// [`ClusterConfig::peer_timeout_ms`].
    pub fn peer_timeout(&self) -> Duration {
        Duration::from_millis(self.peer_timeout_ms)
    }

    /// [`ClusterConfig::request_timeout_ms`].
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    fn validate(&self) -> Result<(), Error> {
        let c = self;
        if !c.advertise.is_empty() && !is_host_port(&c.advertise) {
            return bad("cluster.advertise", "must be host:port");
        }
        for (i, p) in c.peers.iter().enumerate() {
            if !is_host_port(p) {
                return bad(&format!("cluster.peers[{i}]"), "must be host:port");
            }
        }
        if c.dns_name.as_deref().is_some_and(|n| n.trim().is_empty()) {
            return bad("cluster.dns_name", "must not be empty");
        }
        if c.is_clustered() && c.secret.len() < 16 {
            return bad(
                "cluster.secret",
                "set a shared secret of at least 16 characters when peers are configured",
            );
        }
        let cluster_positive = [
            ("cluster.dns_refresh_secs", c.dns_refresh_secs),
            ("cluster.vnodes", c.vnodes.into()),
            ("cluster.heartbeat_ms", c.heartbeat_ms),
            ("cluster.peer_queue", c.peer_queue as u64),
            ("cluster.request_timeout_ms", c.request_timeout_ms),
        ];
        for (key, v) in cluster_positive {
            if v == 0 {
                return bad(key, "must be greater than 0");
            }
        }
        if c.peer_timeout_ms < 2 * c.heartbeat_ms {
            return bad(
                "cluster.peer_timeout_ms",
                "must be at least 2 × heartbeat_ms",
            );
        }
        Ok(())
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 7000)),
            admin_http: chat_admin::HttpLimits::default(),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9101)),
            dbproxy_url: "http://127.0.0.1:7100".into(),
            dbproxy_token: chat_tls::Secret::default(),
            dbproxy_token_file: String::new(),
            dbproxy_pool_max: 256,
            dbproxy_pool_idle_ms: 30_000,
            max_line_bytes: 4096,
            send_queue_lines: 1024,
            idle_timeout_secs: 300,
            token_touch_interval_ms: 60_000,
            rate_per_sec: 50,
            rate_burst: 100,
            rate_limit_kick: 1000,
            max_inflight_per_conn: 64,
            max_connections: 100_000,
            max_rooms_per_user: 1000,
            room_queue: 4096,
            room_batch_max: 256,
            shutdown_grace_secs: 10,
            first_line_timeout_secs: 10,
            trust_proxy_line: Vec::new(),
            tls: None,
            tls_allow_plain: false,
            reload_interval_ms: 10_000,
            cluster: ClusterConfig::default(),
        }
    }
}

impl Config {
    /// How the server pools its dbproxy connections.
    pub fn dbproxy_pool(&self) -> chat_storage_client::PoolOptions {
        chat_storage_client::PoolOptions {
            max_per_host: self.dbproxy_pool_max,
            idle_timeout: Duration::from_millis(self.dbproxy_pool_idle_ms),
        }
    }

    /// [`Config::shutdown_grace_secs`].
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    /// [`Config::idle_timeout_secs`].
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }

    /// [`Config::first_line_timeout_secs`].
    pub fn first_line_timeout(&self) -> Duration {
        Duration::from_secs(self.first_line_timeout_secs)
    }

    /// [`Config::token_touch_interval_ms`].
    pub fn token_touch_interval(&self) -> Duration {
        Duration::from_millis(self.token_touch_interval_ms)
    }

    /// [`Config::reload_interval_ms`].
    pub fn reload_interval(&self) -> Duration {
        Duration::from_millis(self.reload_interval_ms)
    }

    pub fn validate(&self) -> Result<(), Error> {
        if let Err((key, why)) = self.admin_http.validate() {
            return bad(&format!("admin_http.{key}"), why);
        }
        self.validate_hops()?;
        self.validate_limits()?;
        self.cluster.validate()
    }

    /// The storage URL, TLS and the files re-read while running.
    fn validate_hops(&self) -> Result<(), Error> {
        if self.dbproxy_url.starts_with("https://") {
            if self.tls.is_none() {
                return bad(
                    "dbproxy_url",
                    "an https:// URL needs [server.tls] (the certificate this server presents)",
                );
            }
        } else if !self.dbproxy_url.starts_with("http://") {
            return bad("dbproxy_url", "must be an http:// or https:// URL");
        }
        if let Some(tls) = &self.tls {
            if let Some(field) = tls.empty_field() {
                return bad(&format!("tls.{field}"), "must name a PEM file");
            }
        } else if self.tls_allow_plain {
            return bad(
                "tls_allow_plain",
                "only means something with [server.tls] set",
            );
        }
        if !(100..=3_600_000).contains(&self.reload_interval_ms) {
            return bad("reload_interval_ms", "must be 100..=3600000");
        }
        Ok(())
    }

    /// The per-connection and per-server bounds.
    fn validate_limits(&self) -> Result<(), Error> {
        if !(64..=1 << 20).contains(&self.max_line_bytes) {
            return bad("max_line_bytes", "must be between 64 and 1048576");
        }
        if !(1..=65_536).contains(&self.dbproxy_pool_max) {
            return bad("dbproxy_pool_max", "must be 1..=65536");
        }
        if !(100..=3_600_000).contains(&self.dbproxy_pool_idle_ms) {
            return bad("dbproxy_pool_idle_ms", "must be 100..=3600000");
        }
        let positive = [
            ("send_queue_lines", self.send_queue_lines as u64),
            ("idle_timeout_secs", self.idle_timeout_secs),
            ("token_touch_interval_ms", self.token_touch_interval_ms),
            ("rate_per_sec", self.rate_per_sec.into()),
            ("rate_burst", self.rate_burst.into()),
            ("rate_limit_kick", self.rate_limit_kick.into()),
            ("max_inflight_per_conn", self.max_inflight_per_conn as u64),
            ("max_connections", self.max_connections as u64),
            ("max_rooms_per_user", self.max_rooms_per_user as u64),
            ("room_queue", self.room_queue as u64),
            ("room_batch_max", self.room_batch_max as u64),
            ("first_line_timeout_secs", self.first_line_timeout_secs),
        ];
        for (key, v) in positive {
            if v == 0 {
                return bad(key, "must be greater than 0");
            }
        }
        if self.first_line_timeout_secs > 3600 {
            return bad("first_line_timeout_secs", "must be at most 3600");
        }
        for (i, block) in self.trust_proxy_line.iter().enumerate() {
            if crate::source::Cidr::parse(block).is_none() {
                return bad(
                    &format!("trust_proxy_line[{i}]"),
                    "must be an address or address/prefix (10.0.0.0/8, fd00::/8)",
                );
            }
        }
        Ok(())
    }
}

/// A config error naming `server.<key>`.
fn bad(key: &str, why: &str) -> Result<(), Error> {
    Err(Error::Config(format!("server.{key}: {why}")))
}

/// `host:port` with a non-empty host and a numeric port.
fn is_host_port(s: &str) -> bool {
    matches!(s.rsplit_once(':'), Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_come_from_dns_when_named_else_from_the_list() {
        let mut c = ClusterConfig {
            peers: vec!["10.0.0.1:7000".into()],
            ..ClusterConfig::default()
        };
        assert_eq!(c.members(), Members::Static(vec!["10.0.0.1:7000".into()]));
        c.dns_name = Some("chat-server.chat.svc".into());
        assert_eq!(
            c.members(),
            Members::Dns(Dns {
                name: "chat-server.chat.svc".into(),
                port: 7000,
                refresh: Duration::from_secs(5),
            })
        );
        assert_eq!(c.heartbeat(), Duration::from_millis(250));
    }

    #[test]
    fn listeners_are_socket_addresses() {
        Config::default().validate().unwrap();
        let r: Result<Config, _> = serde_json::from_str(r#"{"listen":"localhost:7000"}"#);
        assert!(r.is_err());
        let c: Config = serde_json::from_str(r#"{"admin_listen":"0.0.0.0:9101"}"#).unwrap();
        assert_eq!(c.admin_listen.port(), 9101);
    }
}
