//! Clients through the real proxy in front of a real chat server: the proxy
//! routes by the first line, passes everything else through, routes RESUME by
//! the user its token names, and tells clients to reconnect when their server
//! fails.

use std::net::SocketAddr;
use std::time::Duration;

use chat_protocol::{ErrorCode, ServerLine};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::common::{http_get, within, Client, Next, Stack};

pub(crate) struct Proxy {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.task.abort();
    }
}

pub(crate) async fn start_proxy(stack: &Stack) -> Proxy {
    let client = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = client.local_addr().unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let config = chat_proxy::Config {
        servers: vec![chat_proxy::ServerAddr {
            client: stack.addr.to_string(),
            admin: stack.admin_addr.to_string(),
        }],
        health_interval_ms: Duration::from_millis(100),
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
    crate::common::wait_until(Duration::from_secs(10), "proxy ready", || async move {
        matches!(
            tokio::time::timeout(Duration::from_secs(1), http_get(admin_addr, "/readyz")).await,
            Ok((200, _))
        )
    })
    .await;
    Proxy {
        addr,
        admin_addr,
        cancel,
        task,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_and_resume_through_the_proxy() {
    let stack = Stack::start().await;
    let proxy = start_proxy(&stack).await;

    let (mut alice, token) = Client::login(proxy.addr, "alice", "pw").await;
    alice.join("lobby").await;
    let (mut bob, _) = Client::guest(proxy.addr, "lobby", "bob").await;
    let (seq, _) = alice.msg("lobby", "a1", "hello via proxy").await;
    bob.expect("alice's MSG", |l| {
        matches!(l, ServerLine::Msg { seq: s, sender, text, .. }
            if *s == seq && sender == "alice" && text == "hello via proxy")
    })
    .await;

    // Drop alice without a word; she comes back with RESUME through the proxy.
    drop(alice);
    bob.expect(
        "alice goes offline",
        |l| matches!(l, ServerLine::Parted { user, .. } if user == "alice"),
    )
    .await;
    let mut again = Client::connect(proxy.addr, "alice-again").await;
    again.send(&format!("RESUME {token}")).await;
    match again.recv().await {
        ServerLine::OkResume { user, .. } => assert_eq!(user, "alice"),
        other => panic!("RESUME through the proxy answered {other}"),
    }
    again
        .expect("alice's room is restored", |l| {
            matches!(l, ServerLine::OkJoin { room, last_seq } if room == "lobby" && *last_seq == seq)
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_server_means_reconnect_then_unavailable() {
    let mut stack = Stack::start().await;
    let proxy = start_proxy(&stack).await;
    let (mut alice, _) = Client::login(proxy.addr, "alice", "pw").await;

    stack.stop_server().await;
    // The proxy sees the server fail and tells its client to move (or the
    // server's own BYE arrives first); either way the connection ends.
    let lines = within(
        Duration::from_secs(10),
        "alice's connection ends",
        alice.expect_closed_within(Duration::from_secs(10)),
    )
    .await;
    assert!(
        lines
            .iter()
            .any(|l| matches!(l, ServerLine::Reconnect { .. } | ServerLine::Bye { .. })),
        "the client is told why its connection ends: {lines:?}"
    );

    // With no healthy server the proxy refuses new clients clearly.
    crate::common::wait_until(
        Duration::from_secs(5),
        "the proxy ejects the server",
        || {
            let addr = proxy.addr;
            async move {
                let mut c = Client::connect(addr, "late").await;
                c.send("LOGIN late pw").await;
                matches!(
                    c.next(Duration::from_secs(2)).await,
                    Next::Line(ServerLine::Err {
                        code: ErrorCode::Unavailable,
                        ..
                    })
                )
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_down_everywhere_keeps_clients_connected() {
    let mut stack = Stack::start().await;
    let proxy = start_proxy(&stack).await;
    let (mut alice, _) = Client::login(proxy.addr, "alice", "pw").await;
    alice.join("lobby").await;

    // The only server loses its storage: it turns not ready, saying why, and
    // the proxy keeps routing to it instead of ejecting everyone.
    stack.stop_dbproxy().await;
    crate::common::wait_until(
        Duration::from_secs(10),
        "the server says its storage is unavailable",
        || async {
            http_get(stack.admin_addr, "/readyz").await
                == (503, "not ready: storage unavailable\n".into())
        },
    )
    .await;
    // Several health rounds (100 ms) pass: more than enough to eject.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    alice.send("MSG id=m1 lobby while storage is down").await;
    match alice.msg_answer("m1").await {
        Err((code, _)) => assert_eq!(code, ErrorCode::Unavailable),
        Ok(seq) => panic!("a message was acked without storage: {seq:?}"),
    }
    alice.send("PING still-here").await;
    alice
        .expect(
            "alice stays connected",
            |l| matches!(l, ServerLine::Pong { word: Some(w) } if w == "still-here"),
        )
        .await;

    // A new client still reaches the server (and gets its honest error).
    let mut late = Client::connect(proxy.addr, "late").await;
    late.send("LOGIN late pw").await;
    match late.next(Duration::from_secs(5)).await {
        Next::Line(ServerLine::Err { code, .. }) => assert_eq!(code, ErrorCode::Unavailable),
        other => panic!("a login with storage down answered {other:?}"),
    }

    // Storage back: the resend is stored, nobody was moved.
    stack.start_dbproxy().await;
    crate::common::wait_until(Duration::from_secs(10), "storage back", || async {
        http_get(stack.admin_addr, "/readyz").await.0 == 200
    })
    .await;
    alice.send("MSG id=m1 lobby while storage is down").await;
    alice.msg_answer("m1").await.expect("the resend is stored");
}
