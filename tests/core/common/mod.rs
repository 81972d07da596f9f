//! Shared helpers: a [`Stack`] (dbproxy + chat server, both in-process on
//! `127.0.0.1:0`), a line-protocol [`Client`] and [`wait_until`].
//!
//! The dbproxy's backend is SQLite in a temp dir, or, when the environment
//! variable `CHAT_TEST_BACKEND=mariadb` is set (scripts/test runs the suite a
//! second time so), a real MariaDB primary + GTID replica started for the
//! stack by the shared harness (`chat_mariadb_harness`), so every test of the client
//! protocol also runs against the MySQL backend, reads routed to the replica.
//!
//! Every wait is bounded: a test that hangs fails with a message naming what it
//! waited for instead of stalling the suite.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chat_protocol::ServerLine;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub mod cluster;
pub mod tls;

pub use chat_mariadb_harness as mariadb;

pub use chat_protocol::ErrorCode;
pub use chat_protocol::PartReason;

/// How long a single expected line may take before the test fails.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a tier may take to start, stop or become ready.
const TIER_TIMEOUT: Duration = Duration::from_secs(15);

// ---- waiting -------------------------------------------------------------

pub use chat_testkit::{wait_until, within};

// ---- the stack -----------------------------------------------------------

/// The storage behind the dbproxy of every [`Stack`] in this run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestBackend {
    Sqlite,
    Mariadb,
}

/// `CHAT_TEST_BACKEND`: unset or `sqlite` → SQLite, `mariadb` (or `mysql`) →
/// MariaDB. Anything else fails the test rather than silently testing SQLite.
pub fn test_backend() -> TestBackend {
    match std::env::var("CHAT_TEST_BACKEND").as_deref() {
        Err(_) | Ok("") | Ok("sqlite") => TestBackend::Sqlite,
        Ok("mariadb") | Ok("mysql") => TestBackend::Mariadb,
        Ok(other) => panic!("CHAT_TEST_BACKEND={other:?}: expected sqlite or mariadb"),
    }
}

/// Server config for tests: generous limits so that only tests that mean to
/// hit a limit do.
pub fn test_server_config() -> chat_server::Config {
    chat_server::Config {
        max_line_bytes: 4096,
        send_queue_lines: 1024,
        idle_timeout_secs: 300,
        rate_per_sec: 100_000,
        rate_burst: 100_000,
        rate_limit_kick: 1_000_000,
        max_inflight_per_conn: 64,
        max_connections: 10_000,
        shutdown_grace_secs: 2,
        // The proxies of the tests run here and send a PROXY line.
        trust_proxy_line: vec!["127.0.0.1".into()],
        ..Default::default()
    }
}

type TierTask = JoinHandle<Result<(), String>>;

struct Tier {
    cancel: CancellationToken,
    task: TierTask,
}

impl Tier {
    /// Cancels the tier and waits (bounded) for its `run` to return.
    async fn stop(self, name: &str) {
        self.cancel.cancel();
        let abort = self.task.abort_handle();
        match tokio::time::timeout(TIER_TIMEOUT, self.task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => panic!("{name} run returned an error on shutdown: {e}"),
            Ok(Err(e)) if e.is_cancelled() => {}
            Ok(Err(e)) => panic!("{name} task panicked: {e}"),
            Err(_) => {
                abort.abort();
                panic!("{name} did not stop within {TIER_TIMEOUT:?} of its shutdown token");
            }
        }
    }
}

/// A tier's `run`, given its shutdown token, as a task.
fn spawn_tier<F, E>(run: impl FnOnce(CancellationToken) -> F) -> Tier
where
    F: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display,
{
    let cancel = CancellationToken::new();
    let running = run(cancel.clone());
    let task = tokio::spawn(async move { running.await.map_err(|e| e.to_string()) });
    Tier { cancel, task }
}

/// `chat_server::run` on bound listeners, as a task.
fn spawn_server(client: TcpListener, admin: TcpListener, config: chat_server::Config) -> Tier {
    let listeners = chat_server::Listeners { client, admin };
    spawn_tier(|token| chat_server::run(listeners, config, prometheus::Registry::new(), token))
}

/// `chat_proxy::run` on bound listeners, as a task.
fn spawn_proxy(client: TcpListener, admin: TcpListener, config: chat_proxy::Config) -> Tier {
    let listeners = chat_proxy::Listeners { client, admin };
    spawn_tier(|token| chat_proxy::run(listeners, config, prometheus::Registry::new(), token))
}

/// dbproxy + chat server in this process. Dropping it cancels both.
pub struct Stack {
    /// Holds the SQLite file; removed when the stack is dropped.
    dir: TempDir,
    pub sqlite_path: String,
    /// With `CHAT_TEST_BACKEND=mariadb`: the servers the dbproxy uses instead
    /// of the SQLite file (a restarted dbproxy finds the same data there).
    /// The servers are killed when the stack is dropped (after `Drop` has
    /// cancelled the tiers), also when the test panics.
    pub mariadb: Option<mariadb::Pair>,
    /// The dbproxy's API address; a restarted dbproxy binds it again.
    pub db_addr: SocketAddr,
    /// The dbproxy's admin address (/metrics, /healthz, /readyz); a fresh
    /// port at every (re)start.
    pub db_admin_addr: SocketAddr,
    /// Where clients connect (changes when the server is restarted).
    pub addr: SocketAddr,
    /// The server's admin listener (/metrics, /healthz, /readyz).
    pub admin_addr: SocketAddr,
    pub server_config: chat_server::Config,
    /// Applied to the dbproxy's config at every (re)start.
    pub configure_dbproxy: fn(&mut chat_dbproxy::Config),
    db: Option<Tier>,
    server: Option<Tier>,
}

impl Stack {
    pub async fn start() -> Stack {
        Stack::start_with(|_| {}).await
    }

    /// Starts a stack whose server config is [`test_server_config`] changed by `configure`.
    pub async fn start_with(configure: impl FnOnce(&mut chat_server::Config)) -> Stack {
        Stack::start_configured(|_| {}, configure).await
    }

    /// Starts a stack whose dbproxy config is changed by `dbproxy` and whose
    /// server config is [`test_server_config`] changed by `server`.
    pub async fn start_configured(
        dbproxy: fn(&mut chat_dbproxy::Config),
        server: impl FnOnce(&mut chat_server::Config),
    ) -> Stack {
        let mut stack = Stack::storage_with(dbproxy).await;
        server(&mut stack.server_config);
        stack.start_server().await;
        stack
    }

    /// Only the dbproxy (chat servers are started by the caller, e.g. as
    /// processes); `server_config` is [`test_server_config`] pointed at it.
    pub async fn storage() -> Stack {
        Stack::storage_with(|_| {}).await
    }

    /// [`Stack::storage`] with the dbproxy's config changed by `configure`.
    pub async fn storage_with(configure: fn(&mut chat_dbproxy::Config)) -> Stack {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter("warn")
            .try_init();
        let dir = tempfile::tempdir().expect("temp dir");
        let sqlite_path = dir
            .path()
            .join("chat.sqlite")
            .to_str()
            .expect("utf-8 temp path")
            .to_string();
        let db_listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind dbproxy");
        let db_addr = db_listener.local_addr().unwrap();
        let mut server_config = test_server_config();
        server_config.dbproxy_url = format!("http://{db_addr}");
        let mariadb = match test_backend() {
            TestBackend::Sqlite => None,
            // Starting servers blocks (processes, polling): off the runtime.
            TestBackend::Mariadb => Some(
                tokio::task::spawn_blocking(mariadb::Pair::start)
                    .await
                    .expect("starting MariaDB primary + replica"),
            ),
        };
        let mut stack = Stack {
            dir,
            sqlite_path,
            mariadb,
            db_addr,
            db_admin_addr: db_addr,
            addr: db_addr,
            admin_addr: db_addr,
            server_config,
            configure_dbproxy: configure,
            db: None,
            server: None,
        };
        stack.spawn_dbproxy(db_listener).await;
        stack
    }

    fn dbproxy_config(&self) -> chat_dbproxy::Config {
        let mut config = match &self.mariadb {
            Some(pair) => chat_dbproxy::Config {
                listen: self.db_addr,
                backend: chat_dbproxy::StorageKind::Mysql,
                shutdown_grace_secs: Duration::from_secs(1),
                mysql: pair.mysql_config(),
                ..Default::default()
            },
            None => chat_dbproxy::Config {
                listen: self.db_addr,
                backend: chat_dbproxy::StorageKind::Sqlite,
                sqlite_path: self.sqlite_path.clone(),
                shutdown_grace_secs: Duration::from_secs(1),
                ..Default::default()
            },
        };
        (self.configure_dbproxy)(&mut config);
        config
    }

    async fn spawn_dbproxy(&mut self, api: TcpListener) {
        assert!(self.db.is_none(), "dbproxy already running");
        let admin = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind dbproxy admin");
        self.db_admin_addr = admin.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let config = self.dbproxy_config();
        let token = cancel.clone();
        let task = tokio::spawn(async move {
            let listeners = chat_dbproxy::Listeners { api, admin };
            chat_dbproxy::run(listeners, config, prometheus::Registry::new(), token)
                .await
                .map_err(|e| e.to_string())
        });
        self.db = Some(Tier { cancel, task });
        let addr = self.db_addr;
        self.wait_ready("dbproxy", addr, |s| s.db.as_ref()).await;
    }

    /// Stops the dbproxy alone (its `run` returns; its port is free).
    pub async fn stop_dbproxy(&mut self) {
        let tier = self.db.take().expect("dbproxy not running");
        tier.stop("dbproxy").await;
    }

    /// Starts the dbproxy again on the same SQLite file (or the same MariaDB
    /// servers) and the same port, so
    /// the server's `dbproxy_url` stays right. The port was just freed, so the
    /// bind is retried for a bounded time.
    pub async fn start_dbproxy(&mut self) {
        let addr = self.db_addr;
        let end = Instant::now() + TIER_TIMEOUT;
        let listener = loop {
            match TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) if Instant::now() < end => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("could not bind the dbproxy again on {addr}: {e}"),
            }
        };
        self.spawn_dbproxy(listener).await;
    }

    /// Starts the chat server on fresh ports (`addr`, `admin_addr` change).
    pub async fn start_server(&mut self) {
        assert!(self.server.is_none(), "server already running");
        let client = TcpListener::bind("127.0.0.1:0").await.expect("bind client");
        let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
        self.addr = client.local_addr().unwrap();
        self.admin_addr = admin.local_addr().unwrap();
        self.server = Some(spawn_server(client, admin, self.server_config.clone()));
        let admin_addr = self.admin_addr;
        self.wait_ready("server", admin_addr, |s| s.server.as_ref())
            .await;
    }

    pub async fn stop_server(&mut self) {
        let tier = self.server.take().expect("server not running");
        tier.stop("server").await;
    }

    /// Stops both tiers and starts them again on the same SQLite file.
    pub async fn restart_all(&mut self) {
        self.stop_server().await;
        self.stop_dbproxy().await;
        self.start_dbproxy().await;
        self.start_server().await;
    }

    /// Waits until `GET /readyz` answers 200, failing early (with the error) if
    /// the tier's `run` returned.
    async fn wait_ready(&self, name: &str, addr: SocketAddr, tier: fn(&Stack) -> Option<&Tier>) {
        let end = Instant::now() + TIER_TIMEOUT;
        loop {
            if let Some(t) = tier(self) {
                if t.task.is_finished() {
                    panic!(
                        "{name} run returned during startup (see its error above or in the log)"
                    );
                }
            }
            if let Ok(Ok((200, _))) =
                tokio::time::timeout(Duration::from_secs(2), try_http_get(addr, "/readyz")).await
            {
                return;
            }
            if Instant::now() >= end {
                panic!(
                    "{name} on {addr} was not ready (GET /readyz = 200) within {TIER_TIMEOUT:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn connect(&self, label: &str) -> Client {
        Client::connect(self.addr, label).await
    }

    /// `LOGIN user password`; returns the client (after `OK LOGIN`) and its token.
    pub async fn login(&self, user: &str, password: &str) -> (Client, String) {
        Client::login(self.addr, user, password).await
    }

    /// Seed-style guest start `JOIN room name`; returns after `OK JOIN room`.
    pub async fn guest(&self, room: &str, name: &str) -> (Client, String) {
        Client::guest(self.addr, room, name).await
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for tier in [self.server.take(), self.db.take()].into_iter().flatten() {
            tier.cancel.cancel();
            tier.task.abort();
        }
    }
}

// ---- HTTP (admin endpoints) ----------------------------------------------

pub async fn try_http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad HTTP answer: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// `GET path` over plain HTTP/1.1; returns the status and (raw) body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    within(RECV_TIMEOUT, &format!("GET {path} on {addr}"), async {
        try_http_get(addr, path)
            .await
            .unwrap_or_else(|e| panic!("GET {path} on {addr} failed: {e}"))
    })
    .await
}

/// The sum of every series of metric `name` on `addr`'s `/metrics`.
pub async fn metric(addr: SocketAddr, name: &str) -> f64 {
    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200, "GET /metrics on {addr}");
    body.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// ---- the client ----------------------------------------------------------

/// What reading the next line produced.
#[derive(Debug)]
pub enum Next {
    Line(ServerLine),
    Closed,
    Timeout,
}

/// A line-protocol client over a real TCP connection (plain or TLS).
pub struct Client {
    pub label: String,
    reader: BufReader<chat_tls::ReadHalf>,
    writer: chat_tls::WriteHalf,
    /// Bytes of a line not yet complete (kept across timeouts: read_until is cancel safe).
    partial: Vec<u8>,
    /// The last lines received, shown when an expectation fails.
    recent: VecDeque<String>,
    ping_seq: u64,
}

impl Client {
    pub async fn connect(addr: SocketAddr, label: &str) -> Client {
        let stream = within(
            RECV_TIMEOUT,
            &format!("{label}: connect to {addr}"),
            TcpStream::connect(addr),
        )
        .await
        .unwrap_or_else(|e| panic!("{label}: connect to {addr}: {e}"));
        Client::from_stream(stream, label)
    }

    pub fn from_stream(stream: TcpStream, label: &str) -> Client {
        stream.set_nodelay(true).ok();
        Client::from_any(chat_tls::Stream::Plain(stream), label)
    }

    /// A client over a stream that may be TLS (see [`tls::connect`]).
    pub fn from_any(stream: chat_tls::Stream, label: &str) -> Client {
        let (r, w) = stream.into_split();
        Client {
            label: label.to_string(),
            reader: BufReader::new(r),
            writer: w,
            partial: Vec::new(),
            recent: VecDeque::new(),
            ping_seq: 0,
        }
    }

    pub async fn login(addr: SocketAddr, user: &str, password: &str) -> (Client, String) {
        let mut c = Client::connect(addr, user).await;
        c.send(&format!("LOGIN {user} {password}")).await;
        match c.recv().await {
            ServerLine::OkLogin { user: u, token } => {
                assert_eq!(u, user, "OK LOGIN names the user");
                assert_token(&token);
                (c, token)
            }
            other => panic!("{user}: LOGIN {user} answered {other}, expected OK LOGIN"),
        }
    }

    pub async fn guest(addr: SocketAddr, room: &str, name: &str) -> (Client, String) {
        let mut c = Client::connect(addr, name).await;
        c.send(&format!("JOIN {room} {name}")).await;
        let token = match c.recv().await {
            ServerLine::OkLogin { user, token } => {
                assert_eq!(user, name, "OK LOGIN names the guest");
                assert_token(&token);
                token
            }
            other => panic!("{name}: JOIN {room} {name} answered {other}, expected OK LOGIN"),
        };
        c.expect(
            &format!("OK JOIN {room}"),
            |l| matches!(l, ServerLine::OkJoin { room: r, .. } if r == room),
        )
        .await;
        (c, token)
    }

    /// Sends one line (the `\n` is added).
    pub async fn send(&mut self, line: &str) {
        let mut b = Vec::with_capacity(line.len() + 1);
        b.extend_from_slice(line.as_bytes());
        b.push(b'\n');
        self.send_raw(&b).await;
    }

    /// Sends raw bytes as they are.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        let label = self.label.clone();
        within(
            RECV_TIMEOUT,
            &format!("{label}: write {} bytes", bytes.len()),
            self.try_send_raw(bytes),
        )
        .await
        .unwrap_or_else(|e| panic!("{label}: write failed: {e}"));
    }

    /// Like [`Client::send_raw`] but returns the error (the server may have closed).
    pub async fn try_send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(bytes).await?;
        // TLS holds what it encrypted until flushed; plain TCP has nothing to flush.
        self.writer.flush().await
    }

    /// Reads the next line, waiting at most `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Next {
        let read =
            tokio::time::timeout(timeout, self.reader.read_until(b'\n', &mut self.partial)).await;
        match read {
            Err(_) => Next::Timeout,
            Ok(Ok(0)) => Next::Closed,
            Ok(Err(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::ConnectionAborted
                        // TLS: closed without close_notify, or by an alert.
                        | std::io::ErrorKind::UnexpectedEof
                        | std::io::ErrorKind::InvalidData
                ) =>
            {
                Next::Closed
            }
            Ok(Err(e)) => panic!("{}: read failed: {e}", self.label),
            Ok(Ok(_)) => {
                if self.partial.last() != Some(&b'\n') {
                    // EOF in the middle of a line.
                    self.partial.clear();
                    return Next::Closed;
                }
                let raw = std::mem::take(&mut self.partial);
                let mut text = String::from_utf8(raw).unwrap_or_else(|e| {
                    panic!("{}: server sent a line that is not UTF-8: {e}", self.label)
                });
                text.pop();
                if text.ends_with('\r') {
                    text.pop();
                }
                if self.recent.len() == 20 {
                    self.recent.pop_front();
                }
                self.recent.push_back(text.clone());
                let line = text.parse::<ServerLine>().unwrap_or_else(|e| {
                    panic!("{}: server sent an unparsable line: {e}", self.label)
                });
                Next::Line(line)
            }
        }
    }

    fn recent_lines(&self) -> String {
        self.recent.iter().map(|l| format!("\n    {l}")).collect()
    }

    /// The next line, failing the test if none comes within [`RECV_TIMEOUT`].
    pub async fn recv(&mut self) -> ServerLine {
        self.recv_within(RECV_TIMEOUT).await
    }

    pub async fn recv_within(&mut self, timeout: Duration) -> ServerLine {
        match self.next(timeout).await {
            Next::Line(l) => l,
            Next::Closed => panic!(
                "{}: connection closed while waiting for a line; last lines:{}",
                self.label,
                self.recent_lines()
            ),
            Next::Timeout => panic!(
                "{}: no line within {timeout:?}; last lines:{}",
                self.label,
                self.recent_lines()
            ),
        }
    }

    /// Reads lines, skipping those `pred` rejects, until one matches (within [`RECV_TIMEOUT`]).
    pub async fn expect(
        &mut self,
        what: &str,
        pred: impl FnMut(&ServerLine) -> bool,
    ) -> ServerLine {
        self.expect_within(RECV_TIMEOUT, what, pred).await
    }

    pub async fn expect_within(
        &mut self,
        timeout: Duration,
        what: &str,
        mut pred: impl FnMut(&ServerLine) -> bool,
    ) -> ServerLine {
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Next::Line(l) if pred(&l) => return l,
                Next::Line(_) => {}
                Next::Closed => panic!(
                    "{}: connection closed while waiting for {what}; last lines:{}",
                    self.label,
                    self.recent_lines()
                ),
                Next::Timeout => panic!(
                    "{}: no {what} within {timeout:?}; last lines:{}",
                    self.label,
                    self.recent_lines()
                ),
            }
        }
    }

    /// Waits for an `ERR code` (skipping other lines) and returns its detail.
    pub async fn expect_err(&mut self, code: ErrorCode) -> String {
        match self
            .expect(&format!("ERR {code}"), |l| {
                matches!(l, ServerLine::Err { .. })
            })
            .await
        {
            ServerLine::Err { code: c, detail } => {
                assert_eq!(
                    c, code,
                    "{}: wrong error code (detail {detail:?})",
                    self.label
                );
                detail
            }
            _ => unreachable!(),
        }
    }

    /// Reads until the server closes the connection (within [`RECV_TIMEOUT`]);
    /// returns the lines that came before the close.
    pub async fn expect_closed(&mut self) -> Vec<ServerLine> {
        self.expect_closed_within(RECV_TIMEOUT).await
    }

    pub async fn expect_closed_within(&mut self, timeout: Duration) -> Vec<ServerLine> {
        let end = Instant::now() + timeout;
        let mut lines = Vec::new();
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Next::Line(l) => lines.push(l),
                Next::Closed => return lines,
                Next::Timeout => panic!(
                    "{}: connection still open after {timeout:?}, expected the server to close it; last lines:{}",
                    self.label,
                    self.recent_lines()
                ),
            }
        }
    }

    /// Sends `PING <unique word>` and returns every line received before its `PONG`.
    pub async fn sync(&mut self) -> Vec<ServerLine> {
        self.ping_seq += 1;
        let word = format!("sync{}", self.ping_seq);
        self.send(&format!("PING {word}")).await;
        let mut before = Vec::new();
        let end = Instant::now() + RECV_TIMEOUT;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Next::Line(ServerLine::Pong { word: Some(w) }) if w == word => return before,
                Next::Line(l) => before.push(l),
                Next::Closed => panic!(
                    "{}: connection closed while waiting for PONG {word}; last lines:{}",
                    self.label,
                    self.recent_lines()
                ),
                Next::Timeout => panic!(
                    "{}: no PONG {word} within {RECV_TIMEOUT:?}; last lines:{}",
                    self.label,
                    self.recent_lines()
                ),
            }
        }
    }

    /// `JOIN room`; returns the last seq from `OK JOIN`.
    pub async fn join(&mut self, room: &str) -> u64 {
        self.send(&format!("JOIN {room}")).await;
        match self
            .expect(&format!("OK JOIN {room} or ERR"), |l| {
                matches!(l, ServerLine::OkJoin { room: r, .. } if r == room)
                    || matches!(l, ServerLine::Err { .. })
            })
            .await
        {
            ServerLine::OkJoin { last_seq, .. } => last_seq,
            other => panic!("{}: JOIN {room} answered {other}", self.label),
        }
    }

    /// Sends `MSG id=<cid> room text`, without waiting.
    pub async fn send_msg(&mut self, room: &str, cid: &str, text: &str) {
        self.send(&format!("MSG id={cid} {room} {text}")).await;
    }

    /// Waits for the answer to the `MSG`/`DM` that carried `cid`: `Ok((seq or
    /// dm-id, ts))` or `Err((code, detail))`.
    pub async fn msg_answer(&mut self, cid: &str) -> Result<(u64, i64), (ErrorCode, String)> {
        let want = format!("id={cid}");
        let line = self
            .expect(&format!("the answer to id={cid}"), |l| match l {
                ServerLine::OkMsg { cid: Some(c), .. } | ServerLine::OkDm { cid: Some(c), .. } => {
                    c == cid
                }
                ServerLine::Err { detail, .. } => {
                    detail == &want || detail.starts_with(&format!("{want} "))
                }
                _ => false,
            })
            .await;
        match line {
            ServerLine::OkMsg { seq, ts, .. } => Ok((seq, ts)),
            ServerLine::OkDm { id, ts, .. } => Ok((id as u64, ts)),
            ServerLine::Err { code, detail } => Err((code, detail)),
            _ => unreachable!(),
        }
    }

    /// `MSG id=<cid> room text` that must be acknowledged; returns (seq, ts).
    pub async fn msg(&mut self, room: &str, cid: &str, text: &str) -> (u64, i64) {
        self.send_msg(room, cid, text).await;
        match self.msg_answer(cid).await {
            Ok((seq, ts)) => (seq, ts),
            Err((code, detail)) => panic!(
                "{}: MSG id={cid} {room} answered ERR {code} {detail}",
                self.label
            ),
        }
    }

    /// `HISTORY room after [limit]`; returns the `HIST` lines as
    /// (seq, ts, sender, text) and checks the count in `OK HISTORY`.
    pub async fn history(
        &mut self,
        room: &str,
        after: u64,
        limit: Option<u32>,
    ) -> Vec<(u64, i64, String, String)> {
        match limit {
            Some(n) => self.send(&format!("HISTORY {room} {after} {n}")).await,
            None => self.send(&format!("HISTORY {room} {after}")).await,
        }
        let mut out = Vec::new();
        loop {
            match self.recv().await {
                ServerLine::Hist {
                    room: r,
                    seq,
                    ts,
                    sender,
                    text,
                } => {
                    assert_eq!(r, room, "{}: HIST for the wrong room", self.label);
                    out.push((seq, ts, sender, text));
                }
                ServerLine::OkHistory { room: r, count } => {
                    assert_eq!(r, room, "{}: OK HISTORY names the room", self.label);
                    assert_eq!(
                        count as usize,
                        out.len(),
                        "{}: OK HISTORY count must equal the HIST lines sent",
                        self.label
                    );
                    return out;
                }
                ServerLine::Err { code, detail } => {
                    panic!(
                        "{}: HISTORY {room} {after} answered ERR {code} {detail}",
                        self.label
                    )
                }
                // Events (MSG, JOIN, PART, DM) may interleave with the reply.
                _ => {}
            }
        }
    }
}

pub fn assert_token(token: &str) {
    assert!(
        chat_protocol::names::is_token(token),
        "a token is <user>.<32 lower-case hex digits>, got {token:?}"
    );
}

/// Milliseconds since the Unix epoch, to check server timestamps.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Asserts `ts` is a plausible server timestamp for something that just happened.
pub fn assert_recent_ts(ts: i64) {
    let now = now_ms();
    assert!(
        (now - 120_000..=now + 120_000).contains(&ts),
        "ts {ts} is not milliseconds since the epoch close to now ({now})"
    );
}

/// The process's soft limit on open files, from /proc/self/limits.
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}
