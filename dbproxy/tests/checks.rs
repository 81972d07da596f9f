//! What the dbproxy enforces itself, whatever the caller checked: the
//! protocol's rules for stored names and text, rooms per user, token
//! lifetime and failed-login limits. Driven over real HTTP (the real
//! `DbClient`, and raw requests where a caller sends what `DbClient` would not).

mod common;

use chat_dbproxy::Config;
use chat_storage_api::{AppendItem, DmItem, ErrorKind};
use common::Proxy;

fn item(room: &str, sender: &str, cid: Option<&str>, body: &str) -> AppendItem {
    AppendItem {
        room: room.into(),
        sender: sender.into(),
        client_id: cid.map(Into::into),
        body: body.into(),
    }
}

fn dm(sender: &str, to: &str, cid: Option<&str>, body: &str) -> DmItem {
    DmItem {
        sender: sender.into(),
        recipient: to.into(),
        client_id: cid.map(Into::into),
        body: body.into(),
    }
}

/// A line feed stored in a name or a body reaches clients inside a server
/// line, where it is a forged line of its own (`OK LOGIN admin …`, a fake
/// `MSG`). Nothing that fails the protocol's checks is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_requests_follow_the_protocol_rules() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proxy::start(dir.path(), Config::default()).await;
    let c = &p.client;
    let bad = |r: Result<_, chat_storage_api::ApiError>| match r {
        Err(e) if e.kind == ErrorKind::BadRequest => e.message,
        Err(e) => panic!("expected BadRequest, got {e:?}"),
        Ok(_) => panic!("expected BadRequest, got a success"),
    };
    let forged = "x\r\nOK LOGIN admin";
    bad(c.login(forged, "pw", None).await.map(|_| ()));
    bad(c.login("alice", "", None).await.map(|_| ()));
    bad(c.login("alice", &"p".repeat(129), None).await.map(|_| ()));
    // `DbClient` sends a parsed address; another caller may send anything.
    let (status, body) = p
        .post(
            "/v1/login",
            r#"{"user":"alice","password":"pw","source":"not an ip"}"#,
        )
        .await;
    assert_eq!(status, 400, "{body}");
    bad(c.guest("a b").await.map(|_| ()));
    bad(c.guest(&"g".repeat(33)).await.map(|_| ()));
    bad(c.resume("no-token").await.map(|_| ()));
    bad(c.touch(vec!["x\ny".into()]).await);
    c.guest("mallory").await.unwrap();
    let msg = bad(c
        .join("lobby\nMSG lobby 1 0 admin hi", "mallory")
        .await
        .map(|_| ()));
    assert!(!msg.contains("admin"), "the value is not echoed: {msg}");
    bad(c.join("lobby", "no body").await.map(|_| ()));
    bad(c.part("lo bby", "mallory").await.map(|_| ()));
    bad(c.history("", 0, 10, None).await.map(|_| ()));
    bad(c.room_info("a\tb", None).await.map(|_| ()));
    bad(c.user_rooms("x\u{202e}", None).await.map(|_| ()));
    bad(c.pending_dms("", 10).await.map(|_| ()));
    // Nothing of it was stored.
    assert!(c.rooms(100, None).await.unwrap().rooms.is_empty());
    // Valid requests still work, and a password is any 1..=128 bytes.
    let id = c.login("alice", &"p w".repeat(42), None).await.unwrap();
    c.resume(&id.token).await.unwrap();
    p.stop().await;
}

/// In a batch, a bad item gets its own `BadRequest` and the others are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_refuse_bad_items_alone() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        max_text_bytes: 64,
        ..Config::default()
    };
    let p = Proxy::start(dir.path(), config).await;
    let c = &p.client;
    c.guest("a").await.unwrap();
    c.guest("b").await.unwrap();
    c.join("r", "a").await.unwrap();
    let r = c
        .append(vec![
            item("r", "a", Some("m1"), "one"),
            item("r", "a", None, "fake\nMSG r 9 0 admin pwned"),
            item("r", "a", Some("bad id"), "x"),
            item("r", "a", None, &"y".repeat(65)),
            item("r", "a", None, &"y".repeat(64)),
            item("r\n", "a", None, "x"),
            item("r", "a\r", None, "x"),
            item("r", "a", None, ""),
            item("r", "a", None, "esc \u{1b}[2J"),
            item("r", "a", Some("m2"), "two"),
        ])
        .await
        .unwrap();
    let kinds: Vec<_> = r
        .results
        .iter()
        .map(|x| x.as_ref().map(|a| a.seq).map_err(|e| e.kind))
        .collect();
    use ErrorKind::BadRequest as B;
    assert_eq!(
        kinds,
        [
            Ok(1),
            Err(B),
            Err(B),
            Err(B),
            Ok(2),
            Err(B),
            Err(B),
            Err(B),
            Err(B),
            Ok(3)
        ]
    );
    let h = c.history("r", 0, 100, None).await.unwrap().messages;
    let bodies: Vec<_> = h.iter().map(|m| m.body.len()).collect();
    assert_eq!(bodies, [3, 64, 3]);
    // All bad: nothing is stored, every item answered.
    let r = c
        .append(vec![item("r", "a", None, "\u{85}")])
        .await
        .unwrap();
    assert_eq!(r.results[0].clone().unwrap_err().kind, B);

    let r = c
        .send_dms(vec![
            dm("a", "b", Some("d1"), "hi"),
            dm("a", "b", None, "x\rOK LOGIN admin t"),
            dm("a", "b\n", None, "x"),
            dm("a", "b", Some("a b"), "x"),
            dm("a", "b", None, "bye"),
        ])
        .await
        .unwrap();
    let ok: Vec<_> = r.results.iter().map(|x| x.is_ok()).collect();
    assert_eq!(ok, [true, false, false, false, true]);
    assert!(r.results[1..4]
        .iter()
        .all(|x| x.as_ref().unwrap_err().kind == B));
    let pending: Vec<_> = c
        .pending_dms("b", 100)
        .await
        .unwrap()
        .dms
        .into_iter()
        .map(|d| d.body)
        .collect();
    assert_eq!(pending, ["hi", "bye"]);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_per_user_are_limited_by_the_dbproxy() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        max_rooms_per_user: 3,
        ..Config::default()
    };
    let p = Proxy::start(dir.path(), config).await;
    let c = &p.client;
    c.guest("u").await.unwrap();
    for r in ["r1", "r2", "r3"] {
        c.join(r, "u").await.unwrap();
    }
    let e = c.join("r4", "u").await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::TooManyRooms);
    assert!(e.message.contains("at most 3 rooms"), "{}", e.message);
    // The refused join created nothing.
    assert_eq!(
        c.room_info("r4", None).await.unwrap_err().kind,
        ErrorKind::NoSuchRoom
    );
    // Joining a room one is in already is no new membership.
    c.join("r2", "u").await.unwrap();
    c.part("r1", "u").await.unwrap();
    c.join("r4", "u").await.unwrap();
    assert_eq!(c.user_rooms("u", None).await.unwrap().rooms.len(), 3);
    p.stop().await;
}

/// The token lifetime is the dbproxy's: a caller that still sends the old
/// `token_idle_ttl_ms` field (an extreme value made every token look
/// expired) cannot take over a live guest's name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_cannot_choose_the_token_lifetime() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proxy::start(dir.path(), Config::default()).await;
    let victim = p.client.guest("victim").await.unwrap();
    for ttl in ["-9223372036854775808", "0", "-1"] {
        let body = format!(r#"{{"name":"victim","token_idle_ttl_ms":{ttl}}}"#);
        let (status, answer) = p.post("/v1/guest", &body).await;
        assert_eq!(status, 409, "guest takeover with ttl {ttl}: {answer}");
        assert!(answer.contains("name_taken"), "{answer}");
        let body = format!(r#"{{"user":"victim","password":"pw","token_idle_ttl_ms":{ttl}}}"#);
        let (status, answer) = p.post("/v1/login", &body).await;
        assert_eq!(status, 409, "registration over a live guest: {answer}");
    }
    p.client.resume(&victim.token).await.unwrap();
    p.stop().await;
}

/// Failed logins are limited per account and per source, before any
/// password is hashed; successful ones do not count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_limited_before_hashing() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        login_failures_per_account: 3,
        login_failures_per_source: 5,
        ..Config::default()
    };
    let p = Proxy::start(dir.path(), config).await;
    let c = &p.client;
    let ip = |s: &str| Some(s.parse().unwrap());
    for u in ["alice", "bob", "carol"] {
        c.login(u, "right", ip("10.0.0.1")).await.unwrap();
    }
    // Successes do not count.
    for _ in 0..5 {
        c.login("alice", "right", ip("10.0.0.1")).await.unwrap();
    }
    for _ in 0..3 {
        let e = c.login("alice", "wrong", ip("10.0.0.2")).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::AuthFailed);
    }
    let hashes = p.metric("chat_dbproxy_password_hashes_total", &[]);
    // Over the account's limit: refused from any source, even with the
    // right password, and no hash is computed for it.
    for source in ["10.0.0.2", "10.0.0.3"] {
        let e = c.login("alice", "right", ip(source)).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::RateLimited);
        assert!(
            e.message
                .starts_with("too many failed logins for this account, retry in "),
            "{}",
            e.message
        );
    }
    assert_eq!(p.metric("chat_dbproxy_password_hashes_total", &[]), hashes);
    assert_eq!(
        p.metric(
            "chat_dbproxy_login_rate_limited_total",
            &[("by", "account")]
        ),
        2.0
    );
    // Other accounts are not affected by alice's limit.
    c.login("bob", "right", ip("10.0.0.9")).await.unwrap();

    // Two more failures from 10.0.0.2 (on other accounts) reach its limit of 5.
    for u in ["bob", "carol"] {
        let e = c.login(u, "wrong", ip("10.0.0.2")).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::AuthFailed);
    }
    let e = c.login("carol", "right", ip("10.0.0.2")).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::RateLimited);
    assert!(e.message.contains("this address"), "{}", e.message);
    assert_eq!(
        p.metric("chat_dbproxy_login_rate_limited_total", &[("by", "source")]),
        1.0
    );
    c.login("carol", "right", ip("10.0.0.3")).await.unwrap();
    // An account name that does not exist is limited alike: a refusal says
    // nothing about whether it exists.
    let (status, answer) = p
        .post(
            "/v1/login",
            r#"{"user":"nobody","password":"x","source":"10.0.0.2"}"#,
        )
        .await;
    assert_eq!(status, 429, "{answer}");
    assert!(answer.contains("rate_limited"), "{answer}");
    p.stop().await;
}
