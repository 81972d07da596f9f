//! The proxy over real sockets, against fake chat servers (echo + `/readyz`).

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chat_proxy::Ring;
use chat_testkit::poll_until;
use common::{Client, FakeServer, Proxy};

#[tokio::test]
async fn first_line_is_replayed_byte_exact_with_what_follows() {
    let s = FakeServer::start(true).await;
    let proxy = Proxy::start(&[&s], |_| {}).await;
    let mut c = Client::connect(&proxy.addr).await;
    // One write: the line, a CRLF, a second line and a partial third, so bytes
    // after the first line are already buffered when the proxy routes.
    let sent = b"LOGIN alice s3cret pass\r\nPING x\nMSG lobby h\xc3\xa9";
    c.send(sent).await;
    assert_eq!(c.line().await, format!("HELLO {}", s.addr));
    assert_eq!(c.bytes(sent.len()).await, sent.to_vec());
    c.send(b"llo\n").await;
    assert_eq!(c.bytes(4).await, b"llo\n".to_vec());
    assert_eq!(proxy.metric("chat_proxy_connections_total"), 1.0);
}

/// With `send_proxy_line` the server first gets a PROXY v1 line naming the
/// client's address and port, then exactly what the client sent; skipped
/// empty lines are not replayed.
#[tokio::test]
async fn proxy_line_names_the_client_before_the_first_line() {
    let s = FakeServer::start(true).await;
    let proxy = Proxy::start(&[&s], |c| c.send_proxy_line = true).await;
    let mut c = Client::connect(&proxy.addr).await;
    let client_port = c.local_addr().port();
    let proxy_port = proxy.addr.rsplit_once(':').unwrap().1.to_string();
    c.send(b"\r\n\nLOGIN alice pw\nPING x\n").await;
    assert_eq!(c.line().await, format!("HELLO {}", s.addr));
    assert_eq!(
        c.line().await,
        format!("PROXY TCP4 127.0.0.1 127.0.0.1 {client_port} {proxy_port}\r")
    );
    assert_eq!(c.line().await, "LOGIN alice pw");
    assert_eq!(c.line().await, "PING x");
}

/// The first command word is exact, as at a chat server: `JoiN` is refused
/// by the proxy itself (nothing reaches a server), as is `PEER`.
#[tokio::test]
async fn first_line_words_in_another_case_are_refused() {
    let s = FakeServer::start(true).await;
    let proxy = Proxy::start(&[&s], |_| {}).await;
    for line in [
        &b"JoiN cooking x\n"[..],
        b"login a pw\n",
        b"PEER a:1 secret\n",
    ] {
        let mut c = Client::connect(&proxy.addr).await;
        c.send(line).await;
        let got = c.line().await;
        assert!(got.starts_with("ERR BAD_FIRST_LINE "), "{line:?}: {got}");
        c.expect_eof().await;
    }
}

#[tokio::test]
async fn first_line_split_across_writes() {
    let s = FakeServer::start(true).await;
    let proxy = Proxy::start(&[&s], |_| {}).await;
    let mut c = Client::connect(&proxy.addr).await;
    for b in b"JOIN lobby dave\n" {
        c.send(&[*b]).await;
    }
    assert_eq!(c.line().await, format!("HELLO {}", s.addr));
    assert_eq!(c.line().await, "JOIN lobby dave");
}

#[tokio::test]
async fn users_route_consistently_across_proxies() {
    let servers = [
        FakeServer::start(true).await,
        FakeServer::start(true).await,
        FakeServer::start(true).await,
    ];
    let refs: Vec<&FakeServer> = servers.iter().collect();
    // Plain ring: with bounded loads the choice also depends on each proxy's
    // open connections, which is the point of bounded loads.
    let p1 = Proxy::start(&refs, |c| c.bounded_load = None).await;
    let p2 = Proxy::start(&refs, |c| c.bounded_load = None).await;
    let ids: Vec<(String, u32)> = servers.iter().map(|s| (s.addr.clone(), 1)).collect();
    let ring = Ring::new(&ids);
    let mut per_server: HashMap<String, usize> = HashMap::new();
    for i in 0..30 {
        let user = format!("user{i}");
        let (_c1, a) = Client::login(&p1.addr, &user).await;
        let (_c2, b) = Client::login(&p2.addr, &user).await;
        assert_eq!(a, b, "{user} routed differently");
        assert_eq!(Some(a.as_str()), ring.pick(user.as_bytes()));
        // A guest start routes by the name like a LOGIN.
        let mut g = Client::connect(&p2.addr).await;
        g.send(format!("JOIN lobby {user}\n").as_bytes()).await;
        assert_eq!(g.line().await, format!("HELLO {a}"));
        *per_server.entry(a).or_default() += 1;
    }
    assert_eq!(per_server.len(), 3, "30 users on {per_server:?}");
}

#[tokio::test]
async fn invalid_first_line_gets_err_and_close() {
    let s = FakeServer::start(true).await;
    let proxy = Proxy::start(&[&s], |_| {}).await;
    let cases: [(&[u8], &str); 5] = [
        (b"HELLO there\n", "ERR BAD_FIRST_LINE "),
        (b"PING\n", "ERR BAD_FIRST_LINE "),
        (b"JOIN lobby\n", "ERR BAD_FIRST_LINE "),
        (b"LOGIN alice\n", "ERR BAD_ARGS "),
        (b"\xff\xfe\n", "ERR BAD_UTF8 "),
    ];
    for (sent, want) in cases {
        let mut c = Client::connect(&proxy.addr).await;
        c.send(sent).await;
        let line = c.line().await;
        assert!(line.starts_with(want), "{sent:?} → {line:?}");
        c.expect_eof().await;
    }
    let mut c = Client::connect(&proxy.addr).await;
    c.send(&vec![b'x'; 5000]).await;
    assert!(c.line().await.starts_with("ERR LINE_TOO_LONG"));
    c.expect_eof().await;
    assert_eq!(proxy.metric("chat_proxy_first_line_errors_total"), 6.0);
}

#[tokio::test]
async fn first_line_timeout_closes() {
    let s = FakeServer::start(true).await;
    let proxy = Proxy::start(&[&s], |c| {
        c.first_line_timeout_secs = Duration::from_secs(1)
    })
    .await;
    let mut c = Client::connect(&proxy.addr).await;
    c.send(b"LOGIN al").await;
    assert!(c.line().await.starts_with("ERR BAD_FIRST_LINE"));
    c.expect_eof().await;
}

/// Finds a user whose plain pick among `ids` is `want`.
fn user_on(ids: &[&str], want: &str) -> String {
    let ring = Ring::new(&ids.iter().map(|s| (s.to_string(), 1)).collect::<Vec<_>>());
    (0..)
        .map(|i| format!("user{i}"))
        .find(|u| ring.pick(u.as_bytes()) == Some(want))
        .unwrap()
}

#[tokio::test]
async fn unready_server_is_ejected_within_3s_and_traffic_fails_over() {
    let a = FakeServer::start(true).await;
    let b = FakeServer::start(true).await;
    // Default health settings: every 500 ms, out after 2 failures.
    let proxy = Proxy::start(&[&a, &b], |c| c.bounded_load = None).await;
    let user = user_on(&[&a.addr, &b.addr], &a.addr);
    let (mut on_a, server) = Client::login(&proxy.addr, &user).await;
    assert_eq!(server, a.addr);

    a.health.set_ready(false);
    let started = Instant::now();
    let ejected = poll_until(Duration::from_secs(3), || async {
        proxy.metric("chat_proxy_upstream_ejections_total") == 1.0
    })
    .await;
    assert!(ejected, "not ejected within 3 s");
    eprintln!("ejected after {:?}", started.elapsed());
    assert_eq!(proxy.metric("chat_proxy_upstream_healthy"), 1.0);
    // The open connection was on the ejected server: it is told to move.
    assert_eq!(on_a.line().await, "RECONNECT moved");
    on_a.expect_eof().await;
    let (_c, server) = Client::login(&proxy.addr, &user).await;
    assert_eq!(server, b.addr, "new connection did not fail over");

    // Back after one passing check.
    a.health.set_ready(true);
    assert!(
        poll_until(Duration::from_secs(3), || async {
            proxy.metric("chat_proxy_upstream_healthy") == 2.0
        })
        .await
    );
    let (_c, server) = Client::login(&proxy.addr, &user).await;
    assert_eq!(server, a.addr);
}

#[tokio::test]
async fn refused_connects_fail_over_and_eject() {
    let a = FakeServer::start(true).await;
    let b = FakeServer::start(true).await;
    // `dead` answers /readyz but nobody listens on its client port: checks
    // pass, connects fail. Long check interval so only connects count.
    // Bound but not listening: connects are refused, and the port stays ours
    // (a closed listener's port could be taken by a parallel test).
    let reserved = tokio::net::TcpSocket::new_v4().unwrap();
    reserved.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let dead_port = reserved.local_addr().unwrap().to_string();
    let dead = chat_proxy::ServerAddr {
        client: dead_port.clone(),
        admin: b.admin.clone(),
    };
    let proxy = Proxy::start(&[&a], |c| {
        c.servers.push(dead);
        c.bounded_load = None;
        c.health_interval_ms = Duration::from_secs(60);
    })
    .await;
    let user = user_on(&[&a.addr, &dead_port], &dead_port);
    for _ in 0..2 {
        let (_c, server) = Client::login(&proxy.addr, &user).await;
        assert_eq!(server, a.addr);
    }
    assert_eq!(
        proxy.metric("chat_proxy_upstream_connect_failures_total"),
        2.0
    );
    assert_eq!(proxy.metric("chat_proxy_upstream_ejections_total"), 1.0);
}

#[tokio::test]
async fn reconnect_goes_only_to_moved_connections() {
    let a = FakeServer::start(true).await;
    let b = FakeServer::start(false).await;
    let proxy = Proxy::start(&[&a, &b], |c| {
        c.health_interval_ms = Duration::from_millis(100)
    })
    .await;
    let both = Ring::new(&[(a.addr.clone(), 1), (b.addr.clone(), 1)]);
    let mut clients = Vec::new();
    for i in 0..20 {
        let user = format!("user{i}");
        let (c, server) = Client::login(&proxy.addr, &user).await;
        assert_eq!(server, a.addr, "only a is ready");
        clients.push((user, c));
    }

    b.health.set_ready(true);
    let mut moved = 0;
    for (user, c) in &mut clients {
        if both.pick(user.as_bytes()) == Some(b.addr.as_str()) {
            assert_eq!(c.line().await, "RECONNECT moved", "{user}");
            c.expect_eof().await;
            moved += 1;
        }
    }
    assert!(moved > 0 && moved < 20, "moved {moved} of 20");
    for (user, c) in &mut clients {
        if both.pick(user.as_bytes()) == Some(a.addr.as_str()) {
            c.send(b"PING still-here\n").await;
            assert_eq!(c.line().await, "PING still-here", "{user}");
        }
    }
    assert_eq!(
        proxy.metric("chat_proxy_rebalance_moves_total"),
        moved as f64
    );
}

#[tokio::test]
async fn shutdown_sends_reconnect_and_returns() {
    let s = FakeServer::start(true).await;
    let mut proxy = Proxy::start(&[&s], |_| {}).await;
    let (mut c, _) = Client::login(&proxy.addr, "alice").await;
    // Mid-line from the server's side: the RECONNECT still starts a line.
    c.send(b"partial").await;
    assert_eq!(c.bytes(7).await, b"partial".to_vec());
    proxy.shutdown.cancel();
    assert_eq!(c.line().await, "");
    assert_eq!(c.line().await, "RECONNECT shutdown");
    c.expect_eof().await;
    let res = tokio::time::timeout(Duration::from_secs(5), &mut proxy.handle)
        .await
        .expect("run did not return");
    res.unwrap().unwrap();
}

#[tokio::test]
async fn no_ready_server_answers_unavailable() {
    let s = FakeServer::start(false).await;
    let proxy = Proxy::start(&[&s], |_| {}).await;
    let mut c = Client::connect(&proxy.addr).await;
    c.send(b"LOGIN alice pw\n").await;
    assert!(c.line().await.starts_with("ERR UNAVAILABLE"));
    c.expect_eof().await;
}

/// The proxy's own `/readyz`: status code and body.
async fn proxy_readyz(proxy: &Proxy) -> (String, String) {
    let mut admin = Client::connect(&proxy.admin).await;
    admin.send(b"GET /readyz HTTP/1.0\r\n\r\n").await;
    let status = admin.line().await;
    // Headers end with an empty line ("\r" here); the body is one line.
    while admin.line().await != "\r" {}
    (status, admin.line().await)
}

#[tokio::test]
async fn ready_only_while_a_chat_server_is() {
    let s = FakeServer::start(false).await;
    let proxy = Proxy::start(&[&s], |c| {
        c.health_interval_ms = Duration::from_millis(50);
        c.eject_after_failures = 1;
    })
    .await;
    let unready = || async {
        let (status, body) = proxy_readyz(&proxy).await;
        status.contains(" 503 ") && body == "not ready: no chat server"
    };
    assert!(
        poll_until(Duration::from_secs(3), unready).await,
        "a proxy without a chat server to route to says so"
    );
    s.health.set_ready(true);
    let ready = || async {
        let (status, body) = proxy_readyz(&proxy).await;
        status.contains(" 200 ") && body == "ready"
    };
    assert!(
        poll_until(Duration::from_secs(3), ready).await,
        "ready once the server is"
    );
    s.health.set_ready(false);
    assert!(
        poll_until(Duration::from_secs(3), unready).await,
        "not ready again once the server is ejected"
    );
}

#[tokio::test]
async fn servers_from_dns_and_admin_endpoint() {
    let s = FakeServer::start(true).await;
    let port = |a: &str| a.rsplit_once(':').unwrap().1.parse::<u16>().unwrap();
    let (client_port, admin_port) = (port(&s.addr), port(&s.admin));
    // `localhost` may also resolve to ::1, where nothing listens: that address
    // never passes a check and stays out of the ring.
    let proxy = Proxy::start(&[], |c| {
        c.dns_name = Some("localhost".into());
        c.dns_port = client_port;
        c.dns_admin_port = admin_port;
    })
    .await;
    let (_c, server) = Client::login(&proxy.addr, "alice").await;
    assert_eq!(server, s.addr);

    let mut admin = Client::connect(&proxy.admin).await;
    admin.send(b"GET /metrics HTTP/1.0\r\n\r\n").await;
    assert!(admin.line().await.starts_with("HTTP/1.0 200"));
    let body = loop {
        let line = admin.line().await;
        if line.starts_with("chat_proxy_connections_total ") {
            break line;
        }
    };
    assert_eq!(body, "chat_proxy_connections_total 1");
}
