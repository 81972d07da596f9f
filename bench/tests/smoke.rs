//! `chat-bench` smoke run: a dbproxy on SQLite in a temp dir and a chat
//! server, both in-process on `127.0.0.1:0`, then the built binary's
//! `--scenario fanout --json` against the server for two seconds; the
//! JSON report must show acks, deliveries and a non-empty latency histogram.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Polls `GET /readyz` until it answers 200; panics after `deadline`.
async fn wait_ready(admin: SocketAddr, deadline: Duration) {
    let end = Instant::now() + deadline;
    loop {
        if let Ok(mut s) = TcpStream::connect(admin).await {
            let req = "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
            if s.write_all(req.as_bytes()).await.is_ok() {
                let mut buf = Vec::new();
                let _ = tokio::time::timeout(Duration::from_secs(1), s.read_to_end(&mut buf)).await;
                if buf.starts_with(b"HTTP/1.1 200") {
                    return;
                }
            }
        }
        assert!(Instant::now() < end, "server not ready after {deadline:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_smoke_run_acks_and_delivers() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cancel = CancellationToken::new();

    let db_listeners = chat_dbproxy::Listeners::bind("127.0.0.1:0", "127.0.0.1:0")
        .await
        .unwrap();
    let db_addr = db_listeners.api.local_addr().unwrap();
    let db_config = chat_dbproxy::Config {
        listen: db_addr,
        backend: chat_dbproxy::StorageKind::Sqlite,
        sqlite_path: dir.path().join("chat.sqlite").to_str().unwrap().into(),
        shutdown_grace_secs: Duration::from_secs(1),
        ..Default::default()
    };
    let db = tokio::spawn(chat_dbproxy::run(
        db_listeners,
        db_config,
        prometheus::Registry::new(),
        cancel.child_token(),
    ));

    let client = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (addr, admin_addr) = (client.local_addr().unwrap(), admin.local_addr().unwrap());
    let server_config = chat_server::Config {
        dbproxy_url: format!("http://{db_addr}"),
        rate_per_sec: 100_000,
        rate_burst: 100_000,
        rate_limit_kick: 1_000_000,
        send_queue_lines: 16_384,
        shutdown_grace_secs: 1,
        ..Default::default()
    };
    let server_stop = cancel.child_token();
    let server = tokio::spawn(chat_server::run(
        chat_server::Listeners { client, admin },
        server_config,
        prometheus::Registry::new(),
        server_stop.clone(),
    ));
    wait_ready(admin_addr, Duration::from_secs(10)).await;

    let json = dir.path().join("report.json");
    let mut bench = tokio::process::Command::new(env!("CARGO_BIN_EXE_chat-bench"))
        .args(["--scenario", "fanout", "--rooms", "2", "--room-size", "5"])
        .args(["--duration", "2", "--rate", "500", "--target"])
        .arg(addr.to_string())
        .arg("--json")
        .arg(&json)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("run chat-bench");
    let status = tokio::time::timeout(Duration::from_secs(10), bench.wait())
        .await
        .expect("bench finished within 10s")
        .expect("bench exit status");
    assert!(status.success(), "bench failed: {status}");

    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("report written")).unwrap();
    let n = |k: &str| report[k].as_u64().unwrap_or(0);
    assert_eq!(n("connected"), 10, "report: {report}");
    assert!(n("acked") > 0, "nothing acked: {report}");
    assert!(n("delivered") > 0, "nothing delivered: {report}");
    assert!(
        n("delivered") >= n("acked") * 4 * 9 / 10,
        "each message goes to the 4 other members: {report}"
    );
    assert!(
        report["deliver_latency"]["count"].as_u64().unwrap_or(0) > 0,
        "empty latency histogram: {report}"
    );
    assert!(report["deliver_latency"]["p99_ms"].as_f64().is_some());
    assert!(report["ack_latency"]["p50_ms"].as_f64().is_some());

    server_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), db).await;
}
