//! Mutual TLS on the chat servers' client port and on the hops to it: the
//! proxy dials the servers over TLS, servers link to each other over TLS,
//! and a certificate's role (`chat-server`, `chat-proxy`) decides who may
//! open with `PEER` or a `PROXY` line. Plain TCP is refused with one line,
//! unless `tls_allow_plain`; certificate files are re-read when they change.

use std::time::Duration;

use chat_protocol::{ErrorCode, ServerLine};
use chat_tls::names;

use crate::common::tls::{self, TlsStack, ROTATED_NAME, SECRET};
use crate::common::{wait_until, Client, Next, RECV_TIMEOUT};

/// The refusal a plain connection to a TLS-only port gets.
const TLS_ONLY: &str = "this port takes TLS only";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_across_two_servers_over_tls() {
    let stack = TlsStack::start(2, |_| {}).await;
    let proxy = stack.proxy.addr;
    let alice = stack.name_on(0, "alice");
    let bob = stack.name_on(1, "bob");
    // Owned by bob's server: alice's messages cross the link over TLS.
    let room = stack.name_on(1, "room");

    let (mut a, _) = Client::login(proxy, &alice, "pw").await;
    let (mut b, _) = Client::login(proxy, &bob, "pw").await;
    a.join(&room).await;
    b.join(&room).await;
    let (seq, _) = a.msg(&room, "m1", "over tls").await;
    b.expect("alice's MSG", |l| {
        matches!(l, ServerLine::Msg { seq: s, sender, text, .. }
            if *s == seq && *sender == alice && text == "over tls")
    })
    .await;

    a.send(&format!("DM id=d1 {bob} psst")).await;
    a.msg_answer("d1").await.expect("DM acknowledged");
    b.expect(
        "alice's DM",
        |l| matches!(l, ServerLine::Dm { sender, text, .. } if *sender == alice && text == "psst"),
    )
    .await;

    // A backlog bigger than one TLS record and than the proxy's first
    // read buffers, both ways: partial writes and flushes resume.
    let text = "x".repeat(1000);
    for k in 0..200 {
        a.send_msg(&room, &format!("bulk{k}"), &text).await;
    }
    for k in 0..200 {
        a.msg_answer(&format!("bulk{k}"))
            .await
            .expect("bulk MSG acknowledged");
    }
    let history = b.history(&room, seq, Some(1000)).await;
    assert_eq!(history.len(), 200);
    assert!(history
        .iter()
        .all(|(_, _, sender, t)| *sender == alice && *t == text));

    for i in 0..2 {
        for reason in ["tls", "plain_refused", "role"] {
            assert_eq!(stack.refused(i, reason).await, 0.0, "server {i}: {reason}");
        }
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_tcp_is_refused_with_one_line() {
    let stack = TlsStack::start(1, |_| {}).await;
    let addr = stack.servers[0].addr;
    for first in ["LOGIN mallory pw", &format!("PEER 127.0.0.1:1 {SECRET}")] {
        let mut c = Client::connect(addr, "plain").await;
        c.send(first).await;
        let detail = c.expect_err(ErrorCode::BadFirstLine).await;
        assert_eq!(detail, TLS_ONLY, "answer to {first:?}");
        c.expect_closed().await;
    }
    stack.wait_refused(0, "plain_refused", 2.0).await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_needs_a_server_certificate() {
    let stack = TlsStack::start(1, |c| {
        // Clustered, so that only the certificate can be at fault.
        c.cluster.peers = vec!["127.0.0.1:1".into()];
        c.cluster.secret = SECRET.into();
    })
    .await;
    let addr = stack.servers[0].addr;
    let mut c = tls::connect(addr, &stack.certs.proxy, "proxy-cert").await;
    c.send(&format!("PEER 127.0.0.1:2 {SECRET}")).await;
    let detail = c.expect_err(ErrorCode::AuthFailed).await;
    assert!(detail.contains("chat-server certificate"), "{detail}");
    c.expect_closed().await;
    assert_eq!(stack.refused(0, "role").await, 1.0);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused() {
    let stack = TlsStack::start(1, |_| {}).await;
    let addr = stack.servers[0].addr;
    // In TLS 1.3 the client's handshake may end before the server has
    // checked its certificate: then the refusal shows on the first read.
    if let Ok(stream) = tls::try_connect(addr, &stack.certs.foreign, names::SERVER).await {
        let mut c = Client::from_any(stream, "foreign");
        let _ = c.try_send_raw(b"LOGIN mallory pw\n").await;
        assert!(matches!(c.next(RECV_TIMEOUT).await, Next::Closed));
    }
    stack.wait_refused(0, "tls", 1.0).await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_line_needs_a_proxy_certificate() {
    let stack = TlsStack::start(1, |_| {}).await;
    let addr = stack.servers[0].addr;
    let mut c = tls::connect(addr, &stack.certs.server, "server-cert").await;
    c.send_raw(b"PROXY TCP4 192.0.2.7 127.0.0.1 4000 7000\r\nLOGIN mallory pw\n")
        .await;
    let detail = c.expect_err(ErrorCode::BadFirstLine).await;
    assert!(detail.contains("chat-proxy certificate"), "{detail}");
    c.expect_closed().await;
    assert_eq!(stack.refused(0, "role").await, 1.0);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_plain_takes_clients_but_not_peers() {
    let stack = TlsStack::start(1, |c| {
        c.tls_allow_plain = true;
        c.cluster.peers = vec!["127.0.0.1:1".into()];
        c.cluster.secret = SECRET.into();
    })
    .await;
    let addr = stack.servers[0].addr;
    let (mut plain, _) = Client::login(addr, "carol", "pw").await;
    plain.join("lobby").await;
    plain.sync().await;

    let mut peer = Client::connect(addr, "plain-peer").await;
    peer.send(&format!("PEER 127.0.0.1:2 {SECRET}")).await;
    peer.expect_err(ErrorCode::AuthFailed).await;
    peer.expect_closed().await;

    let mut proxied = Client::connect(addr, "plain-proxy-line").await;
    proxied
        .send_raw(b"PROXY TCP4 192.0.2.7 127.0.0.1 4000 7000\r\nLOGIN mallory pw\n")
        .await;
    proxied.expect_err(ErrorCode::BadFirstLine).await;
    proxied.expect_closed().await;
    assert_eq!(stack.refused(0, "role").await, 2.0);
    assert_eq!(stack.refused(0, "plain_refused").await, 0.0);

    // TLS clients are served too.
    let mut t = tls::connect(addr, &stack.certs.proxy, "tls-client").await;
    t.send("LOGIN dave pw").await;
    assert!(matches!(t.recv().await, ServerLine::OkLogin { .. }));
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificates_are_used_without_dropping_connections() {
    let stack = TlsStack::start(1, |_| {}).await;
    let addr = stack.servers[0].addr;
    let proxy = stack.proxy.addr;
    let (mut direct, _) = {
        let mut c = tls::connect(addr, &stack.certs.proxy, "direct").await;
        c.send("LOGIN erin pw").await;
        let ServerLine::OkLogin { token, .. } = c.recv().await else {
            panic!("LOGIN over TLS refused")
        };
        (c, token)
    };
    let (mut proxied, _) = Client::login(proxy, "frank", "pw").await;
    // (Each refused try below is a failed handshake for the server too.)
    assert!(
        tls::try_connect(addr, &stack.certs.proxy, ROTATED_NAME)
            .await
            .is_err(),
        "the first certificate does not carry the rotated name"
    );

    let (old, new) = (&stack.certs.server, &stack.certs.server_next);
    std::fs::copy(&new.key, &old.key).expect("rotate the key");
    std::fs::copy(&new.cert, &old.cert).expect("rotate the certificate");
    wait_until(
        Duration::from_secs(10),
        "the server presents the new certificate",
        || async {
            tls::try_connect(addr, &stack.certs.proxy, ROTATED_NAME)
                .await
                .is_ok()
        },
    )
    .await;

    // Open connections kept theirs; new ones (the proxy's too) work.
    direct.sync().await;
    proxied.sync().await;
    let (mut again, _) = Client::login(proxy, "grace", "pw").await;
    again.sync().await;
    stack.stop().await;
}
