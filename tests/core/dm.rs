//! Direct messages: online delivery, offline delivery at next login, once.

use std::time::Duration;

use chat_protocol::ServerLine;

use crate::common::{assert_recent_ts, wait_until, ErrorCode, Stack};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_dm_is_delivered_at_once_to_every_session() {
    let stack = Stack::start().await;
    let (mut alice, _) = stack.login("alice", "pw").await;
    let (mut bob1, _) = stack.login("bob", "pw").await;
    let (mut bob2, _) = stack.login("bob", "pw").await;

    alice.send("DM id=d1 bob hi  there").await;
    let (id, ts) = match alice.recv().await {
        ServerLine::OkDm { to, id, ts, cid } => {
            assert_eq!(to, "bob");
            assert_eq!(cid.as_deref(), Some("d1"));
            (id, ts)
        }
        other => panic!("DM answered {other}, expected OK DM bob <id> <ts> id=d1"),
    };
    assert_recent_ts(ts);
    let expected = ServerLine::Dm {
        id,
        ts,
        sender: "alice".into(),
        text: "hi  there".into(),
    };
    for b in [&mut bob1, &mut bob2] {
        let got = b
            .expect_within(Duration::from_secs(5), "DM from alice", |l| {
                matches!(l, ServerLine::Dm { .. })
            })
            .await;
        assert_eq!(got, expected, "{}: the delivered DM", b.label);
    }

    // It was received: a later login does not get it again.
    wait_until(
        Duration::from_secs(5),
        "a new bob login gets no DM",
        || async {
            let (mut b, _) = stack.login("bob", "pw").await;
            !b.sync()
                .await
                .iter()
                .any(|l| matches!(l, ServerLine::Dm { .. }))
        },
    )
    .await;

    // Without an id.
    alice.send("DM bob plain").await;
    match alice.recv().await {
        ServerLine::OkDm { cid, id: id2, .. } => {
            assert_eq!(cid, None);
            assert_ne!(id2, id, "each DM has its own id");
        }
        other => panic!("DM answered {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_dm_waits_for_next_login_and_is_delivered_once() {
    let stack = Stack::start().await;
    let (mut carol, _) = stack.login("carol", "pw").await;
    carol.join("r").await;
    carol.send("QUIT").await;
    carol.expect_closed().await;

    let (mut alice, _) = stack.login("alice", "pw").await;
    alice.send("DM carol see you at 5").await;
    let (id, ts) = match alice.recv().await {
        ServerLine::OkDm { to, id, ts, cid } => {
            assert_eq!(to, "carol");
            assert_eq!(cid, None);
            (id, ts)
        }
        other => panic!("DM to an offline user answered {other}, expected OK DM"),
    };
    alice.send("DM id=second carol and another").await;
    let (id2, _) = alice.msg_answer("second").await.expect("second DM acked");

    let (mut carol, _) = stack.login("carol", "pw").await;
    let lines = carol.sync().await;
    let dms: Vec<(i64, i64, String, String)> = lines
        .iter()
        .filter_map(|l| match l {
            ServerLine::Dm {
                id,
                ts,
                sender,
                text,
            } => Some((*id, *ts, sender.clone(), text.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(dms.len(), 2, "both waiting DMs arrive at login: {lines:?}");
    assert_eq!(
        dms[0],
        (id, ts, "alice".to_string(), "see you at 5".to_string()),
        "the first waiting DM"
    );
    assert_eq!(
        (dms[1].0, dms[1].2.as_str(), dms[1].3.as_str()),
        (id2 as i64, "alice", "and another"),
        "the second waiting DM"
    );
    // DMs come after the restored rooms.
    let last_join = lines
        .iter()
        .rposition(|l| matches!(l, ServerLine::OkJoin { .. }))
        .expect("carol's room is restored");
    let first_dm = lines
        .iter()
        .position(|l| matches!(l, ServerLine::Dm { .. }))
        .unwrap();
    assert!(
        last_join < first_dm,
        "login sends OK JOINs first, then waiting DMs: {lines:?}"
    );
    carol.send("QUIT").await;
    carol.expect_closed().await;

    // Marked received: the next logins do not get them again.
    wait_until(
        Duration::from_secs(5),
        "a new carol login gets no DM",
        || async {
            let (mut c, _) = stack.login("carol", "pw").await;
            !c.sync()
                .await
                .iter()
                .any(|l| matches!(l, ServerLine::Dm { .. }))
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dm_to_unknown_user_is_no_such_user() {
    let stack = Stack::start().await;
    let (mut alice, _) = stack.login("alice", "pw").await;
    alice.send("DM nobody hello?").await;
    alice.expect_err(ErrorCode::NoSuchUser).await;
    alice.send("DM id=q nobody hello?").await;
    let detail = alice.expect_err(ErrorCode::NoSuchUser).await;
    assert!(
        detail == "id=q" || detail.starts_with("id=q "),
        "detail starts with id=<cid>: {detail:?}"
    );
    alice.sync().await;
}
