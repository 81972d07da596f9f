//! Shared helpers: fake chat servers (echo + a real `chat_admin` `/readyz`),
//! an in-process proxy on port 0, a line client and wait-until.

#![allow(dead_code)] // each test binary uses a different subset

use std::time::Duration;

use chat_admin::Health;
use chat_proxy::{Config, Listeners, ServerAddr};
use prometheus::Registry;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub const TIMEOUT: Duration = Duration::from_secs(5);

/// A stand-in chat server for unit tests of the proxy: on each connection it
/// says `HELLO <its client address>` and then echoes every byte it receives.
/// Its `/readyz` is the real admin endpoint, driven by `health`.
pub struct FakeServer {
    pub addr: String,
    pub admin: String,
    pub health: Health,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl FakeServer {
    pub async fn start(ready: bool) -> FakeServer {
        let client = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = client.local_addr().unwrap().to_string();
        let admin_addr = admin.local_addr().unwrap().to_string();
        let health = Health::default();
        health.set_ready(ready);
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(chat_admin::serve(
            admin,
            Registry::new(),
            health.clone(),
            chat_admin::HttpLimits::default(),
            stop.clone(),
            Duration::from_secs(1),
        ));
        let (name, stop2, tasks2) = (addr.clone(), stop.clone(), tasks.clone());
        tasks.spawn(async move {
            loop {
                let (mut stream, _) = tokio::select! {
                    r = client.accept() => r.unwrap(),
                    _ = stop2.cancelled() => return,
                };
                let (name, stop3) = (name.clone(), stop2.clone());
                tasks2.spawn(async move {
                    let echo = async {
                        stream
                            .write_all(format!("HELLO {name}\n").as_bytes())
                            .await?;
                        let (mut r, mut w) = stream.split();
                        tokio::io::copy(&mut r, &mut w).await?;
                        w.shutdown().await
                    };
                    tokio::select! {
                        _ = echo => {}
                        _ = stop3.cancelled() => {}
                    }
                });
            }
        });
        FakeServer {
            addr,
            admin: admin_addr,
            health,
            stop,
            tasks,
        }
    }

    pub fn server_addr(&self) -> ServerAddr {
        ServerAddr {
            client: self.addr.clone(),
            admin: self.admin.clone(),
        }
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.cancel();
        self.tasks.close();
    }
}

pub struct Proxy {
    pub addr: String,
    pub admin: String,
    pub registry: Registry,
    pub shutdown: CancellationToken,
    pub handle: JoinHandle<Result<(), chat_proxy::Error>>,
}

impl Proxy {
    pub async fn start(servers: &[&FakeServer], tweak: impl FnOnce(&mut Config)) -> Proxy {
        let client = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = client.local_addr().unwrap().to_string();
        let admin_addr = admin.local_addr().unwrap().to_string();
        let mut config = Config {
            servers: servers.iter().map(|s| s.server_addr()).collect(),
            shutdown_grace_secs: Duration::from_secs(2),
            // The stand-in servers echo what they get; the PROXY line is
            // checked by its own test.
            send_proxy_line: false,
            ..Config::default()
        };
        tweak(&mut config);
        let registry = Registry::new();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(chat_proxy::run(
            Listeners { client, admin },
            config,
            registry.clone(),
            shutdown.clone(),
        ));
        Proxy {
            addr,
            admin: admin_addr,
            registry,
            shutdown,
            handle,
        }
    }

    /// Sum of every series of metric `name`, read from the text exposition.
    pub fn metric(&self, name: &str) -> f64 {
        use prometheus::Encoder;
        let mut buf = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .unwrap();
        String::from_utf8(buf)
            .unwrap()
            .lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub struct Client {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Client {
    pub async fn connect(addr: &str) -> Client {
        let stream = tokio::time::timeout(TIMEOUT, TcpStream::connect(addr))
            .await
            .expect("connect timed out")
            .unwrap();
        let (r, w) = stream.into_split();
        Client {
            reader: BufReader::new(r),
            writer: w,
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.unwrap();
    }

    /// This end's address (the one the proxy sees as the client's).
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.writer.local_addr().unwrap()
    }

    /// The next line without its terminator; panics on EOF or timeout.
    pub async fn line(&mut self) -> String {
        let mut s = String::new();
        let n = tokio::time::timeout(TIMEOUT, self.reader.read_line(&mut s))
            .await
            .expect("no line in time")
            .unwrap();
        assert!(n > 0, "EOF while waiting for a line");
        s.trim_end_matches('\n').to_string()
    }

    /// Exactly `n` bytes.
    pub async fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        tokio::time::timeout(TIMEOUT, self.reader.read_exact(&mut buf))
            .await
            .expect("no bytes in time")
            .unwrap();
        buf
    }

    pub async fn expect_eof(&mut self) {
        let mut rest = Vec::new();
        tokio::time::timeout(TIMEOUT, self.reader.read_to_end(&mut rest))
            .await
            .expect("connection not closed in time")
            .unwrap();
        assert!(rest.is_empty(), "unexpected bytes before EOF: {rest:?}");
    }

    /// Connects, sends `LOGIN <user> pw` and returns the server that answered.
    pub async fn login(addr: &str, user: &str) -> (Client, String) {
        let mut c = Client::connect(addr).await;
        c.send(format!("LOGIN {user} pw\n").as_bytes()).await;
        let hello = c.line().await;
        let server = hello
            .strip_prefix("HELLO ")
            .unwrap_or_else(|| panic!("expected HELLO, got {hello:?}"))
            .to_string();
        assert_eq!(c.line().await, format!("LOGIN {user} pw"));
        (c, server)
    }
}
