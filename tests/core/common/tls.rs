//! A stack with TLS on the internal hops: the [`Stack`]'s dbproxy (plain),
//! chat servers in-process that take mutual TLS on their client port and
//! link to each other over it, and a proxy that dials them over TLS.
//! Certificates come from `chat_tls::dev` in the stack's temp dir.
//!
//! Everything is cancelled when the [`TlsStack`] is dropped, also when the
//! test panics.

use std::net::SocketAddr;
use std::time::Duration;

use chat_tls::{dev, names, Stream, TlsIdentity};
use tokio::net::{TcpListener, TcpStream};

use super::{http_get, metric, test_server_config, wait_until, within, Client, Stack, Tier};
use super::{RECV_TIMEOUT, TIER_TIMEOUT};

/// The cluster secret of TLS stacks.
pub const SECRET: &str = "tls-test-cluster-secret-0123";

/// A name only the rotated server certificate carries, so a test can tell
/// which one a server presents.
pub const ROTATED_NAME: &str = "rotated.chat.test";

/// The identities of a TLS stack.
pub struct Certs {
    /// What the servers present (`chat-server`).
    pub server: TlsIdentity,
    /// Another `chat-server` certificate from the same CA, also valid for
    /// [`ROTATED_NAME`]: what a rotation installs.
    pub server_next: TlsIdentity,
    /// What the proxy presents (`chat-proxy`).
    pub proxy: TlsIdentity,
    /// Valid for both roles but issued by another CA; trusts our CA, so
    /// only the server's check of the client certificate can refuse it.
    pub foreign: TlsIdentity,
}

impl Certs {
    fn make(dir: &std::path::Path) -> Certs {
        let (ids, _) = dev::ensure(
            &dir.join("certs"),
            &[
                dev::Leaf {
                    stem: "server",
                    names: &[names::SERVER],
                },
                dev::Leaf {
                    stem: "server-next",
                    names: &[names::SERVER, ROTATED_NAME],
                },
                dev::Leaf {
                    stem: "proxy",
                    names: &[names::PROXY],
                },
            ],
        )
        .expect("development certificates");
        let (other, _) = dev::ensure(
            &dir.join("foreign"),
            &[dev::Leaf {
                stem: "intruder",
                names: &[names::SERVER, names::PROXY],
            }],
        )
        .expect("foreign certificates");
        let server = ids["server"].clone();
        let foreign = TlsIdentity {
            ca: server.ca.clone(),
            ..other["intruder"].clone()
        };
        Certs {
            server_next: ids["server-next"].clone(),
            proxy: ids["proxy"].clone(),
            server,
            foreign,
        }
    }
}

/// One in-process chat server of a [`TlsStack`].
pub struct TlsServer {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub config: chat_server::Config,
    tier: Option<Tier>,
}

pub struct TlsProxy {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    tier: Option<Tier>,
}

pub struct TlsStack {
    /// The dbproxy (plain HTTP) and the temp dir.
    pub stack: Stack,
    pub certs: Certs,
    pub servers: Vec<TlsServer>,
    pub proxy: TlsProxy,
}

impl TlsStack {
    /// `n` chat servers with TLS (clustered when `n > 1`), each config
    /// changed by `configure`, and a proxy with `upstream_tls` in front of
    /// them. Returns once the proxy sees every server healthy and every
    /// server links to all the others.
    pub async fn start(n: usize, configure: impl Fn(&mut chat_server::Config)) -> TlsStack {
        let stack = Stack::storage().await;
        let certs = Certs::make(stack.dir.path());
        let mut bound = Vec::new();
        for _ in 0..n {
            let client = TcpListener::bind("127.0.0.1:0").await.expect("bind client");
            let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
            bound.push((client, admin));
        }
        let ids: Vec<String> = bound
            .iter()
            .map(|(c, _)| c.local_addr().unwrap().to_string())
            .collect();
        let mut servers = Vec::new();
        for (i, (client, admin)) in bound.into_iter().enumerate() {
            let mut config = test_server_config();
            config.dbproxy_url = stack.server_config.dbproxy_url.clone();
            config.tls = Some(certs.server.clone());
            // Rotations are noticed within a test's patience.
            config.reload_interval_ms = 100;
            if n > 1 {
                config.cluster.advertise = ids[i].clone();
                config.cluster.peers = ids.clone();
                config.cluster.secret = SECRET.into();
            }
            configure(&mut config);
            servers.push(spawn_server(client, admin, config));
        }
        let proxy = spawn_proxy(&servers, &certs).await;
        let tls = TlsStack {
            stack,
            certs,
            servers,
            proxy,
        };
        for s in &tls.servers {
            tls.wait_ready(s.admin_addr).await;
        }
        tls.wait_ready(tls.proxy.admin_addr).await;
        tls.wait_converged().await;
        tls
    }

    async fn wait_ready(&self, admin: SocketAddr) {
        wait_until(TIER_TIMEOUT, &format!("{admin} ready"), || async move {
            matches!(
                tokio::time::timeout(
                    Duration::from_secs(1),
                    super::try_http_get(admin, "/readyz")
                )
                .await,
                Ok(Ok((200, _)))
            )
        })
        .await;
    }

    async fn wait_converged(&self) {
        let proxy = self.proxy.admin_addr;
        let servers: Vec<(String, SocketAddr)> = self
            .servers
            .iter()
            .map(|s| (s.addr.to_string(), s.admin_addr))
            .collect();
        let servers = &servers;
        wait_until(
            TIER_TIMEOUT,
            "the proxy sees every server and the servers link to each other",
            || async move {
                let (_, body) = http_get(proxy, "/metrics").await;
                for (id, _) in servers {
                    let want = format!("chat_proxy_upstream_healthy{{upstream=\"{id}\"}} 1");
                    if !body.contains(&want) {
                        return false;
                    }
                }
                for (_, admin) in servers {
                    if metric(*admin, "chat_cluster_peers").await as usize != servers.len() - 1 {
                        return false;
                    }
                }
                true
            },
        )
        .await;
    }

    /// The ring the proxy and the servers agree on once converged.
    pub fn ring(&self) -> chat_ring::Ring {
        let nodes: Vec<(String, u32)> = self
            .servers
            .iter()
            .map(|s| (s.addr.to_string(), 1))
            .collect();
        chat_ring::Ring::new(&nodes)
    }

    /// A name the ring places on server `i` (the first one with `prefix`).
    pub fn name_on(&self, i: usize, prefix: &str) -> String {
        let ring = self.ring();
        let id = self.servers[i].addr.to_string();
        (0..100_000)
            .map(|k| format!("{prefix}{k}"))
            .find(|u| ring.pick(u.as_bytes()) == Some(id.as_str()))
            .expect("a name for the server")
    }

    /// `chat_tls_refused_total{reason}` on server `i`.
    pub async fn refused(&self, i: usize, reason: &str) -> f64 {
        let name = format!("chat_tls_refused_total{{reason=\"{reason}\"}}");
        metric(self.servers[i].admin_addr, &name).await
    }

    /// Waits until server `i` has counted `n` refusals for `reason`.
    pub async fn wait_refused(&self, i: usize, reason: &str, n: f64) {
        let what = format!("server {i} counted {n} refusals ({reason})");
        wait_until(RECV_TIMEOUT, &what, || async {
            self.refused(i, reason).await == n
        })
        .await;
    }

    /// Stops the proxy, then the servers, each bounded.
    pub async fn stop(mut self) {
        if let Some(t) = self.proxy.tier.take() {
            t.stop("proxy").await;
        }
        for s in &mut self.servers {
            if let Some(t) = s.tier.take() {
                t.stop("server").await;
            }
        }
    }
}

impl Drop for TlsStack {
    fn drop(&mut self) {
        let tiers = self.servers.iter_mut().map(|s| s.tier.take());
        for tier in tiers.chain([self.proxy.tier.take()]).flatten() {
            tier.cancel.cancel();
            tier.task.abort();
        }
    }
}

fn spawn_server(client: TcpListener, admin: TcpListener, config: chat_server::Config) -> TlsServer {
    TlsServer {
        addr: client.local_addr().unwrap(),
        admin_addr: admin.local_addr().unwrap(),
        tier: Some(super::spawn_server(client, admin, config.clone())),
        config,
    }
}

async fn spawn_proxy(servers: &[TlsServer], certs: &Certs) -> TlsProxy {
    let client = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = client.local_addr().unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let config = chat_proxy::Config {
        servers: servers
            .iter()
            .map(|s| chat_proxy::ServerAddr {
                client: s.addr.to_string(),
                admin: s.admin_addr.to_string(),
            })
            .collect(),
        // The plain ring, so a test can tell where a user is.
        bounded_load: None,
        health_interval_ms: Duration::from_millis(100),
        upstream_tls: Some(certs.proxy.clone()),
        reload_interval_ms: Duration::from_millis(100),
        ..Default::default()
    };
    TlsProxy {
        addr,
        admin_addr,
        tier: Some(super::spawn_proxy(client, admin, config)),
    }
}

/// A TLS connection to `addr` presenting `identity`, the server's
/// certificate checked for `name`; the handshake's error if it fails.
pub async fn try_connect(
    addr: SocketAddr,
    identity: &TlsIdentity,
    name: &str,
) -> std::io::Result<Stream> {
    let connector = chat_tls::Connector::new(identity).expect("connector");
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    within(
        RECV_TIMEOUT,
        &format!("TLS handshake with {addr}"),
        connector.connect(name, tcp),
    )
    .await
}

/// A client over TLS to a chat server (its certificate checked for
/// `chat-server`), presenting `identity`.
pub async fn connect(addr: SocketAddr, identity: &TlsIdentity, label: &str) -> Client {
    let stream = try_connect(addr, identity, names::SERVER)
        .await
        .unwrap_or_else(|e| panic!("{label}: TLS to {addr}: {e}"));
    Client::from_any(stream, label)
}
