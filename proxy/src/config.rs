//! Proxy configuration: the `[proxy]` section of the config file, or
//! `CHAT_PROXY__<KEY>` environment variables.

use std::net::SocketAddr;
use std::time::Duration;

use chat_admin::members::{Dns, Members};
use chat_admin::units::{millis, secs};
use serde::Deserialize;

use crate::error::Error;

/// One chat server: where clients connect and where its `/readyz` is.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerAddr {
    /// The chat server's client listener, `host:port`. Also the server's id on
    /// the hash ring, so renaming it moves that server's users.
    pub client: String,
    /// The chat server's admin listener (`/readyz`), `host:port`.
    pub admin: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Client listener (the line protocol), `ip:port`.
    pub listen: SocketAddr,
    /// Admin listener: /metrics, /healthz, /readyz.
    pub admin_listen: SocketAddr,
    /// `[proxy.admin_http]`: time and connection bounds of the admin listener.
    pub admin_http: chat_admin::HttpLimits,
    /// Static list of chat servers, used when `dns_name` is not set. The
    /// default is one chat server at its own default addresses.
    pub servers: Vec<ServerAddr>,
    /// DNS name listing the chat servers, e.g. a Kubernetes headless Service
    /// (`chat-server.chat.svc.cluster.local`): every address it resolves to is a
    /// server, at `dns_port` (clients) and `dns_admin_port` (`/readyz`).
    /// When set, `servers` is ignored.
    pub dns_name: Option<String>,
    /// Client port of the servers found through `dns_name`.
    pub dns_port: u16,
    /// Admin port of the servers found through `dns_name`.
    pub dns_admin_port: u16,
    /// How often `dns_name` is resolved again.
    #[serde(deserialize_with = "secs")]
    pub dns_refresh_secs: Duration,
    /// Hash ring points per server. 160 keeps the busiest of ten servers
    /// within about 1.1× the mean before bounded loads.
    pub vnodes: u32,
    /// Bounded-load factor `c`: no server takes a new connection while it holds
    /// more than `c` times the mean. `0` (TOML has no null) or absent in code
    /// (`None`) routes by the plain ring.
    pub bounded_load: Option<f64>,
    /// How often each server's `/readyz` is checked.
    #[serde(deserialize_with = "millis")]
    pub health_interval_ms: Duration,
    /// How long one `/readyz` check may take.
    #[serde(deserialize_with = "millis")]
    pub health_timeout_ms: Duration,
    /// Failures in a row (checks or connects) after which a server leaves the
    /// ring; one passing check brings it back.
    pub eject_after_failures: u32,
    /// How long connecting to a chat server may take before the next one is tried.
    #[serde(deserialize_with = "millis")]
    pub connect_timeout_ms: Duration,
    /// A client that has not sent its first line after this long is closed.
    #[serde(deserialize_with = "secs")]
    pub first_line_timeout_secs: Duration,
    /// Longest first line in bytes (terminator excluded); the same limit as the
    /// chat servers' so both answer alike.
    pub max_line_bytes: usize,
    /// Concurrent client connections; further connects wait in the backlog.
    pub max_connections: usize,
    /// How long draining may take on shutdown.
    #[serde(deserialize_with = "secs")]
    pub shutdown_grace_secs: Duration,
    /// Send each chat server a PROXY protocol v1 line (`PROXY TCP4 <client ip>
    /// …`) ahead of the client's first line, so the server limits failed
    /// logins per client address rather than per proxy. The servers must list
    /// this proxy's address in `trust_proxy_line`, or they refuse the line.
    pub send_proxy_line: bool,
    /// `[proxy.upstream_tls]`: this proxy's certificate (name `chat-proxy`),
    /// key and the CA the chat servers' certificates chain to. When set,
    /// client connections are carried to the chat servers over mutual TLS,
    /// and each server must present a certificate named `chat-server`.
    /// Health checks stay on the servers' plain admin port. Files are
    /// re-read when they change.
    pub upstream_tls: Option<chat_tls::TlsIdentity>,
    /// How often the `upstream_tls` files are checked for changes (a
    /// rotated Secret is used from the next connection on; open ones keep
    /// theirs).
    #[serde(deserialize_with = "millis")]
    pub reload_interval_ms: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 7001)),
            admin_http: chat_admin::HttpLimits::default(),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9102)),
            servers: vec![ServerAddr {
                client: "127.0.0.1:7000".into(),
                admin: "127.0.0.1:9101".into(),
            }],
            dns_name: None,
            dns_port: 7000,
            dns_admin_port: 9101,
            dns_refresh_secs: Duration::from_secs(5),
            vnodes: crate::ring::DEFAULT_VNODES,
            bounded_load: Some(crate::ring::DEFAULT_LOAD_FACTOR),
            health_interval_ms: Duration::from_millis(500),
            health_timeout_ms: Duration::from_millis(500),
            eject_after_failures: 2,
            connect_timeout_ms: Duration::from_millis(1000),
            first_line_timeout_secs: Duration::from_secs(10),
            max_line_bytes: 4096,
            max_connections: 100_000,
            shutdown_grace_secs: Duration::from_secs(10),
            send_proxy_line: true,
            upstream_tls: None,
            reload_interval_ms: Duration::from_secs(10),
        }
    }
}

impl Config {
    /// Checks every field; the error names the first bad key.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |key: &str, why: &str| Err(Error::Config(format!("proxy.{key}: {why}")));
        if let Err((key, why)) = self.admin_http.validate() {
            return bad(&format!("admin_http.{key}"), why);
        }
        match (&self.dns_name, self.servers.is_empty()) {
            (None, true) => return bad("servers", "list at least one server, or set dns_name"),
            (Some(name), true) if name.trim().is_empty() => {
                return bad("dns_name", "must not be empty")
            }
            _ => {}
        }
        for (i, s) in self.servers.iter().enumerate() {
            for (field, addr) in [("client", &s.client), ("admin", &s.admin)] {
                if !is_host_port(addr) {
                    return bad(&format!("servers[{i}].{field}"), "must be host:port");
                }
            }
            if self.servers[..i].iter().any(|o| o.client == s.client) {
                return bad(&format!("servers[{i}].client"), "listed twice");
            }
        }
        if self.dns_name.is_some() {
            if self.dns_port == 0 {
                return bad("dns_port", "must be greater than 0");
            }
            if self.dns_admin_port == 0 {
                return bad("dns_admin_port", "must be greater than 0");
            }
        }
        if !(1..=10_000).contains(&self.vnodes) {
            return bad("vnodes", "must be between 1 and 10000");
        }
        if let Some(c) = self.bounded_load {
            if !(c == 0.0 || (1.0..=100.0).contains(&c)) {
                return bad("bounded_load", "must be 0 (off) or between 1.0 and 100.0");
            }
        }
        if !(64..=1 << 20).contains(&self.max_line_bytes) {
            return bad("max_line_bytes", "must be between 64 and 1048576");
        }
        if let Some(field) = self.upstream_tls.as_ref().and_then(|t| t.empty_field()) {
            return bad(&format!("upstream_tls.{field}"), "must name a PEM file");
        }
        if !(Duration::from_millis(100)..=Duration::from_secs(3600))
            .contains(&self.reload_interval_ms)
        {
            return bad("reload_interval_ms", "must be 100..=3600000");
        }
        let positive = [
            ("dns_refresh_secs", self.dns_refresh_secs),
            ("health_interval_ms", self.health_interval_ms),
            ("health_timeout_ms", self.health_timeout_ms),
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("first_line_timeout_secs", self.first_line_timeout_secs),
        ];
        for (key, v) in positive {
            if v.is_zero() {
                return bad(key, "must be greater than 0");
            }
        }
        for (key, v) in [
            ("eject_after_failures", self.eject_after_failures as usize),
            ("max_connections", self.max_connections),
        ] {
            if v == 0 {
                return bad(key, "must be greater than 0");
            }
        }
        Ok(())
    }

    /// Where the chat servers come from: `dns_name` when set, else `servers`.
    pub fn members(&self) -> Members<ServerAddr> {
        let dns = self.dns_name.as_ref().map(|name| Dns {
            name: name.clone(),
            port: self.dns_port,
            refresh: self.dns_refresh_secs,
        });
        Members::from_config(self.servers.clone(), dns)
    }

    /// The bounded-load factor in effect, if any.
    pub fn load_factor(&self) -> Option<f64> {
        self.bounded_load.filter(|c| *c >= 1.0)
    }
}

fn is_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_server() -> Config {
        Config {
            servers: vec![ServerAddr {
                client: "127.0.0.1:7000".into(),
                admin: "chat-0:9101".into(),
            }],
            ..Config::default()
        }
    }

    fn err_of(c: &Config) -> String {
        c.validate().unwrap_err().to_string()
    }

    #[test]
    fn servers_or_dns_are_needed() {
        Config::default().validate().unwrap();
        let none = Config {
            servers: Vec::new(),
            ..Config::default()
        };
        assert!(err_of(&none).contains("proxy.servers"));
        with_server().validate().unwrap();
        let dns = Config {
            dns_name: Some("chat.svc".into()),
            ..Config::default()
        };
        dns.validate().unwrap();
    }

    #[test]
    fn names_the_bad_key() {
        let mut c = with_server();
        c.servers.push(ServerAddr {
            client: "x:1".into(),
            admin: "nope".into(),
        });
        assert!(err_of(&c).contains("proxy.servers[1].admin"));
        let c = Config {
            bounded_load: Some(0.5),
            ..with_server()
        };
        assert!(err_of(&c).contains("proxy.bounded_load"));
        let c = Config {
            eject_after_failures: 0,
            ..with_server()
        };
        assert!(err_of(&c).contains("proxy.eject_after_failures"));
        let r: Result<Config, _> = serde_json::from_str(r#"{"listen":"localhost"}"#);
        assert!(r.is_err(), "listen must be an ip:port socket address");
        let mut c = with_server();
        c.admin_http.header_timeout_ms = 0;
        assert!(err_of(&c).contains("proxy.admin_http.header_timeout_ms"));
    }

    #[test]
    fn bounded_load_zero_is_off() {
        let c = Config {
            bounded_load: Some(0.0),
            ..with_server()
        };
        c.validate().unwrap();
        assert_eq!(c.load_factor(), None);
        assert_eq!(with_server().load_factor(), Some(1.25));
    }

    #[test]
    fn rejects_unknown_fields() {
        let r: Result<Config, _> = serde_json::from_str(r#"{"listen":"127.0.0.1:1","nope":1}"#);
        assert!(r.is_err());
        let c: Config =
            serde_json::from_str(r#"{"servers":[{"client":"a:1","admin":"a:2"}],"vnodes":10}"#)
                .unwrap();
        assert_eq!(c.vnodes, 10);
        assert_eq!(c.health_interval_ms, Duration::from_millis(500));
    }
}
