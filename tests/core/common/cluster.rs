//! A cluster on loopback: one dbproxy (in-process, the [`Stack`]'s), chat
//! servers as real `chat server` processes (so a test can `kill -9` one or
//! send it SIGTERM), and proxies in-process in front of them.
//!
//! Every server slot gets its ports up front and every server lists every
//! slot as a peer, so a slot not started yet is simply a peer that is down;
//! starting it later adds a server to the running cluster. Processes are
//! killed when the [`Cluster`] is dropped, also when the test panics.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{http_get, try_http_get, wait_until, Stack};

const START_TIMEOUT: Duration = Duration::from_secs(20);

pub struct ServerSlot {
    pub client: SocketAddr,
    pub admin: SocketAddr,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl ServerSlot {
    /// The server's id on the ring (its client address).
    pub fn id(&self) -> String {
        self.client.to_string()
    }
}

pub struct Proxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

pub struct Cluster {
    pub stack: Stack,
    pub servers: Vec<ServerSlot>,
    pub proxies: Vec<Proxy>,
    dir: TempDir,
}

/// Server `i` of cluster `net` listens on `127.<net>.0.<i+1>`, ports 7000
/// (clients) and 9101 (admin): fixed ids, so the ring, and so every test's
/// placement, is the same on every run. Each test uses its own `net`.
fn server_addrs(net: u8, i: usize) -> (SocketAddr, SocketAddr) {
    let ip = std::net::Ipv4Addr::new(127, net, 0, i as u8 + 1);
    (SocketAddr::from((ip, 7000)), SocketAddr::from((ip, 9101)))
}

impl Cluster {
    /// `slots` server slots of which the first `running` are started, and
    /// `proxies` proxies routing over all slots by the plain ring (no bounded
    /// loads, so a test can tell from the ring where a user is). `net` picks
    /// the loopback addresses (see [`server_addrs`]); unique per test.
    pub async fn start(net: u8, slots: usize, running: usize, proxies: usize) -> Cluster {
        let stack = Stack::storage().await;
        let dir = tempfile::tempdir().expect("temp dir");
        let mut servers = Vec::new();
        for i in 0..slots {
            let (client, admin) = server_addrs(net, i);
            servers.push(ServerSlot {
                client,
                admin,
                config: dir.path().join(format!("server{i}.toml")),
                log: dir.path().join(format!("server{i}.log")),
                child: None,
            });
        }
        let peers: Vec<String> = servers.iter().map(|s| format!("\"{}\"", s.id())).collect();
        let c = &stack.server_config;
        for s in &servers {
            let toml = format!(
                "[log]\nlevel = \"info\"\n\
                 [server]\nlisten = \"{}\"\nadmin_listen = \"{}\"\ndbproxy_url = \"{}\"\n\
                 rate_per_sec = {}\nrate_burst = {}\nrate_limit_kick = {}\n\
                 max_connections = {}\nshutdown_grace_secs = 3\n\
                 trust_proxy_line = [\"127.0.0.0/8\"]\n\
                 [server.cluster]\nadvertise = \"{}\"\npeers = [{}]\n\
                 secret = \"cluster-test-secret-0123456789\"\n",
                s.client,
                s.admin,
                c.dbproxy_url,
                c.rate_per_sec,
                c.rate_burst,
                c.rate_limit_kick,
                c.max_connections,
                s.client,
                peers.join(", "),
            );
            std::fs::write(&s.config, toml).expect("write server config");
        }
        let mut cluster = Cluster {
            stack,
            servers,
            proxies: Vec::new(),
            dir,
        };
        for i in 0..running {
            cluster.start_server(i).await;
        }
        for _ in 0..proxies {
            let p = cluster.spawn_proxy().await;
            cluster.proxies.push(p);
        }
        cluster.wait_converged().await;
        cluster
    }

    /// Ids of the servers running now.
    pub fn running(&self) -> Vec<String> {
        self.servers
            .iter()
            .filter(|s| s.child.is_some())
            .map(|s| s.id())
            .collect()
    }

    /// The ring every proxy and server agrees on once converged.
    pub fn ring(&self) -> chat_ring::Ring {
        let nodes: Vec<(String, u32)> = self.running().into_iter().map(|id| (id, 1)).collect();
        chat_ring::Ring::new(&nodes)
    }

    /// Server slot `i` as a `chat server` process; waits for `/readyz`.
    pub async fn start_server(&mut self, i: usize) {
        let s = &mut self.servers[i];
        assert!(s.child.is_none(), "server {i} already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&s.log)
            .expect("server log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_chat"));
        // Only the file configures it (CHAT_TEST_BACKEND would read as config).
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("CHAT_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd
            .arg("--config")
            .arg(&s.config)
            .arg("server")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn chat server");
        s.child = Some(child);
        let admin = s.admin;
        let end = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Ok((200, _))) =
                tokio::time::timeout(Duration::from_secs(1), try_http_get(admin, "/readyz")).await
            {
                break;
            }
            if let Some(Ok(Some(status))) = self.servers[i].child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "server {i} exited during startup ({status}):\n{}",
                    self.log(i)
                );
            }
            assert!(
                Instant::now() < end,
                "server {i} not ready:\n{}",
                self.log(i)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `kill -9`: no drain, no goodbye.
    pub fn kill(&mut self, i: usize) {
        let mut child = self.servers[i].child.take().expect("server running");
        child.kill().expect("kill -9");
        let _ = child.wait();
    }

    /// SIGTERM, then waits (bounded) for the drained process to exit.
    pub async fn terminate(&mut self, i: usize) {
        let mut child = self.servers[i].child.take().expect("server running");
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .expect("kill -TERM");
        assert!(status.success(), "kill -TERM failed");
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                assert!(
                    status.success(),
                    "server {i} drained with {status}:\n{}",
                    self.log(i)
                );
                return;
            }
            if Instant::now() > end {
                let _ = child.kill();
                panic!(
                    "server {i} did not exit within 15 s of SIGTERM:\n{}",
                    self.log(i)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every byte server `i` has logged so far.
    pub fn log_bytes(&self, i: usize) -> Vec<u8> {
        std::fs::read(&self.servers[i].log).unwrap_or_default()
    }

    /// The tail of a server's log, for failure messages.
    pub fn log(&self, i: usize) -> String {
        let text = std::fs::read_to_string(&self.servers[i].log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    async fn spawn_proxy(&self) -> Proxy {
        let client = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = client.local_addr().unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let config = chat_proxy::Config {
            servers: self
                .servers
                .iter()
                .map(|s| chat_proxy::ServerAddr {
                    client: s.id(),
                    admin: s.admin.to_string(),
                })
                .collect(),
            bounded_load: None,
            health_interval_ms: Duration::from_millis(100),
            health_timeout_ms: Duration::from_secs(1),
            eject_after_failures: 2,
            ..Default::default()
        };
        let cancel = CancellationToken::new();
        let task = tokio::spawn({
            let cancel = cancel.clone();
            async move {
                let listeners = chat_proxy::Listeners { client, admin };
                chat_proxy::run(listeners, config, prometheus::Registry::new(), cancel)
                    .await
                    .expect("proxy run");
            }
        });
        Proxy {
            addr,
            admin: admin_addr,
            cancel,
            task,
        }
    }

    pub fn proxy_addrs(&self) -> Vec<SocketAddr> {
        self.proxies.iter().map(|p| p.addr).collect()
    }

    /// Waits until every proxy has exactly the running servers in its ring
    /// and every running server links to all the others.
    pub async fn wait_converged(&self) {
        let running = self.running();
        let admins: Vec<SocketAddr> = self.proxies.iter().map(|p| p.admin).collect();
        let servers: Vec<SocketAddr> = self
            .servers
            .iter()
            .filter(|s| s.child.is_some())
            .map(|s| s.admin)
            .collect();
        let all: Vec<String> = self.servers.iter().map(|s| s.id()).collect();
        wait_until(
            START_TIMEOUT,
            "proxies and servers agree on the ring",
            || {
                let (admins, servers, running, all) = (&admins, &servers, &running, &all);
                async move {
                    for a in admins {
                        let (_, body) = http_get(*a, "/metrics").await;
                        for id in all {
                            let up = running.contains(id);
                            let want = format!(
                                "chat_proxy_upstream_healthy{{upstream=\"{id}\"}} {}",
                                u8::from(up)
                            );
                            if !body.contains(&want) {
                                return false;
                            }
                        }
                    }
                    for a in servers {
                        let (_, body) = http_get(*a, "/metrics").await;
                        let want = format!("chat_cluster_peers {}", running.len() - 1);
                        if !body.lines().any(|l| l == want) {
                            return false;
                        }
                    }
                    true
                }
            },
        )
        .await;
    }

    /// A user name that the plain ring over the running servers places on
    /// server `i` (the `n`-th such name with this prefix).
    pub fn user_on(&self, i: usize, prefix: &str, n: usize) -> String {
        let ring = self.ring();
        let id = self.servers[i].id();
        (0..100_000)
            .map(|k| format!("{prefix}{k}"))
            .filter(|u| ring.pick(u.as_bytes()) == Some(id.as_str()))
            .nth(n)
            .expect("a user name for the server")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for p in &self.proxies {
            p.cancel.cancel();
            p.task.abort();
        }
        for s in &mut self.servers {
            if let Some(mut c) = s.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = &self.dir;
    }
}
