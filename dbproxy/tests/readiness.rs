//! `/readyz` tells whether storage can serve, and the SQLite read pool
//! survives callers that reset their requests mid-read.

mod common;

use std::time::Duration;

use chat_dbproxy::Config;
use chat_storage_api::AppendItem;
use common::{wait_until, Proxy};
use tokio::io::AsyncWriteExt;

/// Callers that reset their HTTP request while its read runs (a chat server
/// whose request timed out, a client gone) used to take the read
/// connection with them: after `read_connections` resets every login,
/// welcome, HISTORY and DM fetch failed with "read pool empty" until a
/// restart, while /readyz still said ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_reset_mid_read_leave_the_read_pool_whole() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        read_connections: 2,
        ..Config::default()
    };
    let p = Proxy::start(dir.path(), config).await;
    let c = &p.client;
    c.guest("w").await.unwrap();
    c.join("big", "w").await.unwrap();
    // Reads of 4 MB of history take long enough for resets to land inside them.
    let body = "x".repeat(4000);
    for batch in 0..10 {
        let items = (0..100)
            .map(|i| AppendItem {
                room: "big".into(),
                sender: "w".into(),
                client_id: Some(format!("{batch}-{i}")),
                body: body.clone(),
            })
            .collect();
        c.append(items).await.unwrap();
    }
    let addr = p.base.trim_start_matches("http://").to_string();
    let request = {
        let json = r#"{"room":"big","after":0,"limit":1000,"min_pos":null}"#;
        format!(
            "POST /v1/history HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{json}",
            json.len()
        )
    };
    for i in 0..200u64 {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        // Spread over the read: from before it starts to after it ended.
        tokio::time::sleep(Duration::from_micros(i * 97 % 12_000)).await;
        // An RST, not a FIN: the server sees the request reset. (Deprecated
        // because a lingering close blocks; with a zero linger it does not.)
        #[allow(deprecated)]
        s.set_linger(Some(Duration::ZERO)).unwrap();
        drop(s);
    }
    for _ in 0..20 {
        let h = c.history("big", 990, 10, None).await.unwrap();
        assert_eq!(h.messages.len(), 10);
    }
    assert_eq!(p.status("/readyz").await, Some(200));
    p.stop().await;
}

/// With the SQLite file's write lock held by someone else (a stuck backup
/// tool, another process on the same file), the writer cannot commit:
/// /readyz turns 503, and 200 again once the lock is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_whether_the_writer_can_commit() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proxy::start(dir.path(), Config::default()).await;
    assert_eq!(
        p.metric("chat_dbproxy_storage_ready", &[]),
        1.0,
        "ready once the first probe passed"
    );
    let blocker = rusqlite::Connection::open(&p.sqlite_path).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    wait_until(
        Duration::from_secs(10),
        "/readyz 503 while the write lock is held",
        || async { p.status("/readyz").await == Some(503) },
    )
    .await;
    assert_eq!(p.metric("chat_dbproxy_storage_ready", &[]), 0.0);
    blocker.execute_batch("ROLLBACK").unwrap();
    wait_until(
        Duration::from_secs(15),
        "/readyz 200 after the lock is released",
        || async { p.status("/readyz").await == Some(200) },
    )
    .await;
    p.client.guest("after").await.unwrap();
    p.stop().await;
}
