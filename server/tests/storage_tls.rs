//! A chat server's storage client against a dbproxy that takes mutual TLS
//! and a bearer token: with the right token clients log in and the server
//! is ready; with a wrong one the server is not ready ("storage
//! unavailable") and a login answers `ERR UNAVAILABLE`, nothing stored.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use chat_tls::dev::{ensure, ROLES};
use chat_tls::{Secret, TlsIdentity};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

const TOKEN: &str = "server-token-0123456789";

/// A tier running in-process; dropping it stops it (also when a test fails).
struct Running {
    addr: SocketAddr,
    admin: SocketAddr,
    stop: Option<DropGuard>,
    task: JoinHandle<()>,
}

impl Running {
    async fn stop(mut self) {
        drop(self.stop.take());
        tokio::time::timeout(Duration::from_secs(15), &mut self.task)
            .await
            .expect("stops after shutdown")
            .unwrap();
    }
}

async fn dbproxy(dir: &Path, tls: TlsIdentity) -> Running {
    let listeners = chat_dbproxy::Listeners::bind("127.0.0.1:0", "127.0.0.1:0")
        .await
        .unwrap();
    let (addr, admin) = (
        listeners.api.local_addr().unwrap(),
        listeners.admin.local_addr().unwrap(),
    );
    let config = chat_dbproxy::Config {
        sqlite_path: dir.join("chat.db").to_string_lossy().into_owned(),
        tls: Some(tls),
        api_tokens: vec![Secret::new(TOKEN)],
        shutdown_grace_secs: std::time::Duration::from_secs(2),
        ..Default::default()
    };
    let stop = CancellationToken::new();
    let run = chat_dbproxy::run(listeners, config, prometheus::Registry::new(), stop.clone());
    let task = tokio::spawn(async move { run.await.unwrap() });
    Running {
        addr,
        admin,
        stop: Some(stop.drop_guard()),
        task,
    }
}

async fn chat_server(db: &Running, tls: TlsIdentity, token: &str) -> Running {
    let client = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (addr, admin_addr) = (client.local_addr().unwrap(), admin.local_addr().unwrap());
    let config = chat_server::Config {
        dbproxy_url: format!("https://{}", db.addr),
        dbproxy_token: Secret::new(token),
        tls: Some(tls),
        // This test's client speaks plain TCP to the server.
        tls_allow_plain: true,
        shutdown_grace_secs: 1,
        ..Default::default()
    };
    let stop = CancellationToken::new();
    let run = chat_server::run(
        chat_server::Listeners { client, admin },
        config,
        prometheus::Registry::new(),
        stop.clone(),
    );
    let task = tokio::spawn(async move { run.await.unwrap() });
    Running {
        addr,
        admin: admin_addr,
        stop: Some(stop.drop_guard()),
        task,
    }
}

/// `GET path` on a plain HTTP port: status and body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return (0, String::new());
    };
    let head = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    if s.write_all(head.as_bytes()).await.is_err() {
        return (0, String::new());
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// Waits until `/readyz` on `admin` answers `status` with `says` in it.
async fn readyz_becomes(admin: SocketAddr, status: u16, says: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (got, body) = get(admin, "/readyz").await;
        if got == status && body.contains(says) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never {status}: {got} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The first line a server answers to `line`.
async fn first_answer(server: SocketAddr, line: &str) -> String {
    let mut s = TcpStream::connect(server).await.unwrap();
    s.write_all(format!("{line}\n").as_bytes()).await.unwrap();
    let mut reader = BufReader::new(s);
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(15), reader.read_line(&mut answer))
        .await
        .expect("an answer")
        .unwrap();
    answer.trim_end().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_over_mutual_tls_with_a_token_and_a_clear_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let (ids, _) = ensure(&dir.path().join("tls"), &ROLES).unwrap();
    let db = dbproxy(dir.path(), ids["dbproxy"].clone()).await;

    let good = chat_server(&db, ids["server"].clone(), TOKEN).await;
    readyz_becomes(good.admin, 200, "ready").await;
    let answer = first_answer(good.addr, "LOGIN alice password-1").await;
    assert!(answer.starts_with("OK LOGIN alice "), "{answer}");

    let wrong = chat_server(&db, ids["server"].clone(), "not-this-server-token").await;
    readyz_becomes(wrong.admin, 503, "storage unavailable").await;
    let answer = first_answer(wrong.addr, "LOGIN bob password-1").await;
    assert!(answer.starts_with("ERR UNAVAILABLE"), "{answer}");
    // Nothing of bob's was stored: his first login through the good
    // server registers him now.
    let answer = first_answer(good.addr, "LOGIN bob other-password").await;
    assert!(answer.starts_with("OK LOGIN bob "), "{answer}");

    wrong.stop().await;
    good.stop().await;
    db.stop().await;
}
