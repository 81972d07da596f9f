//! Proxy configuration: the `[proxy]` section of the config file, or
//! `CHAT_PROXY__<KEY>` environment variables.

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// One chat server: where clients connect and where its `/readyz` is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerAddr {
    /// The chat server's client listener, `host:port`. Also the server's id on
    /// the hash ring, so renaming it moves that server's users.
    pub client: String,
    /// The chat server's admin listener (`/readyz`), `host:port`.
    pub admin: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Client listener (the line protocol).
    pub listen: String,
    /// Admin listener: /metrics, /healthz, /readyz.
    pub admin_listen: String,
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
    pub dns_refresh_secs: u64,
    /// Hash ring points per server. 160 keeps the busiest of ten servers
    /// within about 1.1× the mean before bounded loads.
    pub vnodes: u32,
    /// Bounded-load factor `c`: no server takes a new connection while it holds
    /// more than `c` times the mean. `0` (TOML has no null) or absent in code
    /// (`None`) routes by the plain ring.
    pub bounded_load: Option<f64>,
    /// How often each server's `/readyz` is checked.
    pub health_interval_ms: u64,
    /// How long one `/readyz` check may take.
    pub health_timeout_ms: u64,
    /// Failures in a row (checks or connects) after which a server leaves the
    /// ring; one passing check brings it back.
    pub eject_after_failures: u32,
    /// How long connecting to a chat server may take before the next one is tried.
    pub connect_timeout_ms: u64,
    /// A client that has not sent its first line after this long is closed.
    pub first_line_timeout_secs: u64,
    /// Longest first line in bytes (terminator excluded); the same limit as the
    /// chat servers' so both answer alike.
    pub max_line_bytes: usize,
    /// Concurrent client connections; further connects wait in the backlog.
    pub max_connections: usize,
    /// How long draining may take on shutdown.
    pub shutdown_grace_secs: u64,
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
    pub reload_interval_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:7001".into(),
            admin_http: chat_admin::HttpLimits::default(),
            admin_listen: "127.0.0.1:9102".into(),
            servers: vec![ServerAddr {
                client: "127.0.0.1:7000".into(),
                admin: "127.0.0.1:9101".into(),
            }],
            dns_name: None,
            dns_port: 7000,
            dns_admin_port: 9101,
            dns_refresh_secs: 5,
            vnodes: crate::ring::DEFAULT_VNODES,
            bounded_load: Some(crate::ring::DEFAULT_LOAD_FACTOR),
            health_interval_ms: 500,
            health_timeout_ms: 500,
            eject_after_failures: 2,
            connect_timeout_ms: 1000,
            first_line_timeout_secs: 10,
            max_line_bytes: 4096,
            max_connections: 100_000,
            shutdown_grace_secs: 10,
            send_proxy_line: true,
            upstream_tls: None,
            reload_interval_ms: 10_000,
        }
    }
}

impl Config {
    /// Checks every field; the error names the first bad key.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |key: &str, why: &str| Err(Error::Config(format!("proxy.{key}: {why}")));
        for (key, addr) in [
            ("listen", &self.listen),
            ("admin_listen", &self.admin_listen),
        ] {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                return bad(key, "must be an ip:port socket address");
            }
        }
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
        if !(100..=3_600_000).contains(&self.reload_interval_ms) {
            return bad("reload_interval_ms", "must be 100..=3600000");
        }
        let positive = [
            ("dns_refresh_secs", self.dns_refresh_secs),
            ("health_interval_ms", self.health_interval_ms),
            ("health_timeout_ms", self.health_timeout_ms),
            ("eject_after_failures", self.eject_after_failures.into()),
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("first_line_timeout_secs", self.first_line_timeout_secs),
            ("max_connections", self.max_connections as u64),
        ];
        for (key, v) in positive {
            if v == 0 {
                return bad(key, "must be greater than 0");
            }
        }
        Ok(())
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
        let c = Config {
            listen: "localhost".into(),
            ..with_server()
        };
        assert!(err_of(&c).contains("proxy.listen"));
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
        assert_eq!(c.health_interval_ms, 500);
    }
}
