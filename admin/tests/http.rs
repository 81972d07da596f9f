//! The HTTP serving mechanism over real loopback sockets: slow and silent
//! sockets are closed after the header timeout, idle keep-alive connections
//! after the idle timeout (not the header one), requests after the request
//! timeout, and a full listener makes room for a new client by closing the
//! connection that waited longest.

use std::net::SocketAddr;
use std::time::Duration;

use chat_admin::accept::Acceptor;
use chat_admin::http::{serve, HttpResponse, Plain};
use chat_admin::HttpLimits;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A listener on 127.0.0.1:0 answering `/slow` after 5 s and anything else
/// at once. Cancelled (and so stopped) when dropped.
struct Server {
    addr: SocketAddr,
    stop: tokio_util::sync::DropGuard,
}

async fn start(limits: HttpLimits) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let acceptor = Acceptor::new(listener, limits.max_connections);
    let handler = |req: http::Request<hyper::body::Incoming>| async move {
        if req.uri().path() == "/slow" {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        let r: HttpResponse = chat_admin::text(StatusCode::OK, "ok\n");
        r
    };
    tokio::spawn(serve(
        acceptor,
        limits,
        Plain,
        handler,
        stop.clone(),
        Duration::from_secs(1),
    ));
    Server {
        addr,
        stop: stop.drop_guard(),
    }
}

fn limits(header: u64, idle: u64, request: u64, max: usize) -> HttpLimits {
    HttpLimits {
        header_timeout_ms: header,
        idle_timeout_ms: idle,
        request_timeout_ms: request,
        max_connections: max,
    }
}

/// Reads until EOF or reset; how long that took from `since`. Panics after
/// `within`.
async fn closed_after(s: &mut TcpStream, since: Instant, within: Duration) -> Duration {
    let mut buf = [0u8; 4096];
    let wait = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return since.elapsed(),
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(within, wait)
        .await
        .unwrap_or_else(|_| panic!("still open after {within:?}"))
}

/// One keep-alive request on `s`; the status code.
async fn request(s: &mut TcpStream, path: &str) -> u16 {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    // The answer is "ok\n" with a content-length: read until the body.
    while !got.ends_with(b"ok\n") {
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
            .await
            .expect("answer within 2 s")
            .unwrap();
        assert!(n > 0, "closed before answering");
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    text[9..12].parse().unwrap()
}

#[tokio::test]
async fn silent_socket_is_closed_after_the_header_timeout() {
    let server = start(limits(500, 10_000, 10_000, 8)).await;
    let started = Instant::now();
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let took = closed_after(&mut s, started, Duration::from_secs(5)).await;
    assert!(
        took >= Duration::from_millis(400),
        "closed too early: {took:?}"
    );
    drop(server.stop);
}

#[tokio::test]
async fn header_sent_byte_by_byte_is_closed_after_the_header_timeout() {
    let server = start(limits(1_000, 10_000, 10_000, 8)).await;
    let started = Instant::now();
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    // A header that never ends, one byte every 100 ms: each byte is
    // progress, but the head as a whole must arrive within 1 s.
    let head = b"GET /readyz HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut closed = None;
    for b in head {
        if s.write_all(&[*b]).await.is_err() {
            closed = Some(started.elapsed());
            break;
        }
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = Some(started.elapsed());
                break;
            }
            Ok(Ok(_)) => panic!("answered a request that never ended"),
            Err(_) => {}
        }
    }
    let took = closed.expect("a dribbling header was never closed");
    assert!(
        (Duration::from_millis(900)..Duration::from_millis(3_000)).contains(&took),
        "closed after {took:?}, the header timeout is 1 s"
    );
}

#[tokio::test]
async fn idle_keep_alive_is_closed_after_the_idle_timeout_not_the_header_one() {
    let server = start(limits(300, 1_500, 10_000, 8)).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    assert_eq!(request(&mut s, "/readyz").await, 200);
    let answered = Instant::now();
    // Idle well past the header timeout: still open, and serves again.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(request(&mut s, "/readyz").await, 200);
    let answered_again = Instant::now();
    let took = closed_after(&mut s, answered_again, Duration::from_secs(5)).await;
    assert!(
        (Duration::from_millis(1_300)..Duration::from_millis(3_000)).contains(&took),
        "idle connection closed after {took:?}, the idle timeout is 1.5 s"
    );
    assert!(answered.elapsed() > Duration::from_millis(2_000));
}

#[tokio::test]
async fn a_request_longer_than_the_request_timeout_is_cut() {
    // The header timeout is longer: the request's own bound applies.
    let server = start(limits(5_000, 10_000, 700, 8)).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let took = closed_after(&mut s, started, Duration::from_secs(4)).await;
    assert!(
        (Duration::from_millis(600)..Duration::from_millis(950)).contains(&took),
        "request cut after {took:?}, the request timeout is 0.7 s"
    );
}

#[tokio::test]
async fn a_full_listener_closes_the_longest_waiting_socket_for_a_prober() {
    // Long timeouts: only making room can let the prober in.
    let server = start(limits(30_000, 30_000, 30_000, 4)).await;
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(TcpStream::connect(server.addr).await.unwrap());
    }
    // Let the accept loop take all four.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..20 {
        let started = Instant::now();
        let mut prober = TcpStream::connect(server.addr).await.unwrap();
        assert_eq!(request(&mut prober, "/readyz").await, 200);
        assert!(started.elapsed() < Duration::from_secs(1));
        silent.push(prober);
    }
    // The first silent socket was closed to make room.
    let since = Instant::now();
    closed_after(&mut silent[0], since, Duration::from_secs(2)).await;
}

#[tokio::test]
async fn a_listener_whose_every_connection_is_busy_refuses_at_once() {
    let server = start(limits(30_000, 30_000, 30_000, 2)).await;
    let mut busy = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        s.write_all(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        busy.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let mut extra = TcpStream::connect(server.addr).await.unwrap();
    let took = closed_after(&mut extra, started, Duration::from_secs(2)).await;
    assert!(took < Duration::from_secs(1), "refused after {took:?}");
}

#[tokio::test]
async fn a_header_dribbled_after_an_idle_spell_gets_the_header_timeout() {
    let server = start(limits(500, 10_000, 10_000, 8)).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    assert_eq!(request(&mut s, "/readyz").await, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let mut closed = None;
    for _ in 0..50 {
        if s.write_all(b"G").await.is_err() {
            closed = Some(started.elapsed());
            break;
        }
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = Some(started.elapsed());
                break;
            }
            Ok(Ok(_)) => panic!("answered a request that never ended"),
            Err(_) => {}
        }
    }
    let took = closed.expect("a dribbling header after keep-alive was never closed");
    assert!(
        took < Duration::from_millis(1_500),
        "closed after {took:?}: the idle timeout (10 s) applied, not the header timeout (0.5 s)"
    );
}
