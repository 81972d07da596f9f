//! A dbproxy on 127.0.0.1:0 with a SQLite file in a temp dir, its registry
//! (to read metrics) and a raw HTTP/1.1 exchange independent of `DbClient`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use chat_dbproxy::Config;
use chat_storage_client::DbClient;
pub use chat_testkit::wait_until;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub struct Proxy {
    pub client: DbClient,
    pub base: String,
    /// The admin port's base URL (`/metrics`, `/healthz`, `/readyz`).
    pub admin: String,
    pub registry: prometheus::Registry,
    pub sqlite_path: PathBuf,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), chat_dbproxy::DbProxyError>>,
}

impl Proxy {
    /// `config` with its SQLite file in `dir`; returns once `/readyz` is 200.
    pub async fn start(dir: &Path, config: Config) -> Proxy {
        let proxy = Proxy::spawn(dir, config).await;
        wait_until(Duration::from_secs(10), "dbproxy ready", || async {
            proxy.status("/readyz").await == Some(200)
        })
        .await;
        proxy
    }

    /// [`Proxy::start`] without waiting for readiness (for listeners a
    /// plain request cannot probe).
    pub async fn spawn(dir: &Path, config: Config) -> Proxy {
        let listeners = chat_dbproxy::Listeners::bind("127.0.0.1:0", "127.0.0.1:0")
            .await
            .unwrap();
        let base = format!("http://{}", listeners.api.local_addr().unwrap());
        let admin = format!("http://{}", listeners.admin.local_addr().unwrap());
        let sqlite_path = dir.join("db/chat.db");
        let config = Config {
            sqlite_path: sqlite_path.to_string_lossy().into_owned(),
            shutdown_grace_secs: Duration::from_secs(2),
            ..config
        };
        let registry = prometheus::Registry::new();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(chat_dbproxy::run(
            listeners,
            config,
            registry.clone(),
            shutdown.clone(),
        ));
        Proxy {
            client: DbClient::new(&base),
            base,
            admin,
            registry,
            sqlite_path,
            shutdown,
            task,
        }
    }

    /// The status of `GET path`, `None` if the exchange failed.
    pub async fn status(&self, path: &str) -> Option<u16> {
        raw_request(&self.base, "GET", path, b"")
            .await
            .ok()
            .map(|(s, _)| s)
    }

    /// `POST path` with a JSON body: status and the whole answer.
    pub async fn post(&self, path: &str, body: &str) -> (u16, String) {
        raw_request(&self.base, "POST", path, body.as_bytes())
            .await
            .unwrap()
    }

    /// Sum of a counter's (or gauge's) samples whose labels include `labels`.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric(&self.registry, name, labels)
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("run returns after shutdown")
            .unwrap()
            .unwrap();
    }
}

/// Minimal HTTP/1.1 exchange (connection: close).
pub async fn raw_request(
    base: &str,
    method: &str,
    path: &str,
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    raw_request_with(base, method, path, "", body).await
}

/// [`raw_request`] with extra header lines (each ending in `\r\n`).
pub async fn raw_request_with(
    base: &str,
    method: &str,
    path: &str,
    headers: &str,
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    let addr = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{headers}connection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    let _ = s.write_all(body).await;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, text))
}

/// Sum of a counter's (or gauge's) samples in `registry` whose labels
/// include `labels`.
pub fn metric(registry: &prometheus::Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric().iter())
        .filter(|m| {
            labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            })
        })
        .map(|m| m.get_counter().get_value() + m.get_gauge().get_value())
        .sum()
}
