//! The first line: LOGIN, RESUME, guest start, tokens and guest names.

use std::time::{Duration, Instant};

use chat_protocol::ServerLine;

use crate::common::{Client, ErrorCode, Stack};

/// Asserts the connection got exactly one `ERR code` and was then closed.
pub async fn assert_one_err_then_closed(c: &mut Client, code: ErrorCode, what: &str) {
    let lines = c.expect_closed().await;
    assert!(
        matches!(lines.as_slice(), [ServerLine::Err { code: c, .. }] if *c == code),
        "{what}: expected exactly one `ERR {code}` and then the close, got {:?}",
        lines.iter().map(|l| l.to_string()).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_registers_then_authenticates() {
    let stack = Stack::start().await;

    let (mut first, token1) = stack.login("alice", "s3cret pass").await;
    let (mut second, token2) = stack.login("alice", "s3cret pass").await;
    assert_ne!(token1, token2, "each LOGIN issues its own token");
    // Both sessions are usable.
    first.sync().await;
    second.sync().await;

    let mut wrong = stack.connect("alice-wrong").await;
    wrong.send("LOGIN alice s3cret").await;
    assert_one_err_then_closed(
        &mut wrong,
        ErrorCode::AuthFailed,
        "LOGIN with a wrong password",
    )
    .await;

    // The password is the whole rest of the line, spaces included.
    let mut wrong = stack.connect("alice-wrong2").await;
    wrong.send("LOGIN alice s3cret  pass").await;
    assert_one_err_then_closed(
        &mut wrong,
        ErrorCode::AuthFailed,
        "LOGIN with a wrong password",
    )
    .await;

    // A second user registers independently.
    let (_bob, _) = stack.login("bob", "other").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_with_token_and_already_logged_in() {
    let stack = Stack::start().await;
    let (mut alice, token) = stack.login("alice", "pw").await;

    let mut resumed = stack.connect("alice-resume").await;
    resumed.send(&format!("RESUME {token}")).await;
    match resumed.recv().await {
        ServerLine::OkResume { user, token: t } => {
            assert_eq!(user, "alice");
            crate::common::assert_token(&t);
        }
        other => panic!("RESUME answered {other}, expected OK RESUME alice <token>"),
    }
    resumed.sync().await;

    // LOGIN / RESUME after login: ERR ALREADY_LOGGED_IN and the connection stays open.
    resumed.send("LOGIN alice pw").await;
    resumed.expect_err(ErrorCode::AlreadyLoggedIn).await;
    resumed.send(&format!("RESUME {token}")).await;
    resumed.expect_err(ErrorCode::AlreadyLoggedIn).await;
    alice.send("login bob pw").await;
    alice.expect_err(ErrorCode::AlreadyLoggedIn).await;
    resumed.sync().await;
    alice.sync().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_unknown_token_is_rejected() {
    let stack = Stack::start().await;
    let (_alice, _token) = stack.login("alice", "pw").await;
    let mut c = stack.connect("resume-unknown").await;
    c.send("RESUME alice.0123456789abcdef0123456789abcdef")
        .await;
    assert_one_err_then_closed(
        &mut c,
        ErrorCode::TokenInvalid,
        "RESUME with an unknown token",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_expires_after_idle_ttl() {
    // The lifetime is the dbproxy's; the server touches open connections' tokens.
    let stack = Stack::start_configured(
        |db| db.token_idle_ttl_secs = Duration::from_secs(1),
        |s| s.token_touch_interval_ms = 200,
    )
    .await;
    let (mut alice, token) = stack.login("alice", "pw").await;
    alice.send("QUIT").await;
    alice.expect_closed().await;

    // Polling with RESUME would refresh the token, so wait out the TTL instead.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut c = stack.connect("resume-expired").await;
    c.send(&format!("RESUME {token}")).await;
    assert_one_err_then_closed(
        &mut c,
        ErrorCode::TokenInvalid,
        "RESUME with an expired token",
    )
    .await;

    // The account itself is not affected.
    let (_alice, _) = stack.login("alice", "pw").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_connection_keeps_token_alive() {
    let stack = Stack::start_configured(
        |db| db.token_idle_ttl_secs = Duration::from_secs(1),
        |s| s.token_touch_interval_ms = 200,
    )
    .await;
    let (mut alice, token) = stack.login("alice", "pw").await;
    // "a token is used ... while one of its connections is open".
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        alice.sync().await;
    }
    let mut c = stack.connect("resume-live").await;
    c.send(&format!("RESUME {token}")).await;
    match c.recv().await {
        ServerLine::OkResume { user, .. } => assert_eq!(user, "alice"),
        other => panic!("RESUME of a token with an open connection answered {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_start_logs_in_and_joins() {
    let stack = Stack::start().await;
    let mut dave = stack.connect("dave").await;
    dave.send("JOIN lobby dave").await;
    match dave.recv().await {
        ServerLine::OkLogin { user, token } => {
            assert_eq!(user, "dave");
            crate::common::assert_token(&token);
        }
        other => panic!("guest start answered {other}, expected OK LOGIN dave <token> first"),
    }
    let mut lines = Vec::new();
    while !lines.iter().any(|l| matches!(l, ServerLine::OkJoin { .. })) {
        lines.push(dave.recv().await);
    }
    let shown: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    assert!(
        lines.contains(&ServerLine::OkJoin {
            room: "lobby".into(),
            last_seq: 0
        }),
        "expected OK JOIN lobby 0, got {shown:?}"
    );
    let mut rest = dave.sync().await;
    lines.append(&mut rest);
    assert!(
        lines.contains(&ServerLine::Joined {
            room: "lobby".into(),
            user: "dave".into()
        }),
        "the guest sees its own `JOIN lobby dave`, got {shown:?}"
    );
    // The guest is a member: it can post.
    let (seq, _) = dave.msg("lobby", "g1", "hi from a guest").await;
    assert_eq!(seq, 1);

    // A live guest holds its name.
    let mut other = stack.connect("dave2").await;
    other.send("JOIN lobby dave").await;
    assert_one_err_then_closed(
        &mut other,
        ErrorCode::NameTaken,
        "guest start with a live guest's name",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_name_of_registered_user_is_taken() {
    let stack = Stack::start().await;
    let (mut bob, _) = stack.login("bob", "pw").await;
    bob.send("QUIT").await;
    bob.expect_closed().await;
    let mut fake = stack.connect("fake-bob").await;
    fake.send("JOIN lobby bob").await;
    assert_one_err_then_closed(
        &mut fake,
        ErrorCode::NameTaken,
        "guest start with a registered name",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_guest_name_is_released() {
    let stack = Stack::start_configured(
        |db| db.token_idle_ttl_secs = Duration::from_secs(1),
        |s| s.token_touch_interval_ms = 200,
    )
    .await;
    let (mut ghost, old_token) = stack.guest("haunt", "ghost").await;
    ghost.send("QUIT").await;
    ghost.expect_closed().await;

    // NAME_TAKEN attempts do not use the old guest's token, so polling is fair.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut ghost2 = loop {
        let mut c = Client::connect(stack.addr, "ghost-2").await;
        c.send("JOIN other ghost").await;
        match c.recv().await {
            ServerLine::OkLogin { user, .. } => {
                assert_eq!(user, "ghost");
                break c;
            }
            ServerLine::Err { code, .. } => {
                assert_eq!(code, ErrorCode::NameTaken, "guest start with a held name");
            }
            other => panic!("guest start answered {other}"),
        }
        assert!(
            Instant::now() < deadline,
            "the expired guest's name `ghost` was not released within 15 s (dbproxy token_idle_ttl_secs = 1)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // A new guest: the old guest's rooms are forgotten.
    let lines = ghost2.sync().await;
    let joins: Vec<&ServerLine> = lines
        .iter()
        .filter(|l| matches!(l, ServerLine::OkJoin { .. }))
        .collect();
    assert_eq!(
        joins,
        vec![&ServerLine::OkJoin {
            room: "other".into(),
            last_seq: 0
        }],
        "the new guest `ghost` is only in `other` (the old guest's room `haunt` is forgotten)"
    );

    let mut c = stack.connect("old-token").await;
    c.send(&format!("RESUME {old_token}")).await;
    assert_one_err_then_closed(
        &mut c,
        ErrorCode::TokenInvalid,
        "RESUME with the expired guest token",
    )
    .await;
}

/// Failed logins are limited by the dbproxy, per account (and per source);
/// the client sees `ERR RATE_LIMITED` saying when to retry, also with the
/// right password, and the connection is closed like after any failed LOGIN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_rate_limited() {
    let stack = Stack::start_configured(|db| db.login_failures_per_account = 3, |_| {}).await;
    let (mut alice, _) = stack.login("alice", "right").await;
    alice.send("QUIT").await;
    alice.expect_closed().await;
    for i in 0..3 {
        let mut c = stack.connect(&format!("guess{i}")).await;
        c.send("LOGIN alice wrong").await;
        assert_one_err_then_closed(&mut c, ErrorCode::AuthFailed, "LOGIN with a wrong password")
            .await;
    }
    let mut c = stack.connect("limited").await;
    c.send("LOGIN alice right").await;
    let lines = c.expect_closed().await;
    match lines.as_slice() {
        [ServerLine::Err {
            code: ErrorCode::RateLimited,
            detail,
        }] => assert!(
            detail.starts_with("too many failed logins for this account, retry in "),
            "{detail:?}"
        ),
        other => panic!("LOGIN over the limit answered {other:?}"),
    }
    // Other accounts log in as before.
    let (_bob, _) = stack.login("bob", "pw").await;
}
