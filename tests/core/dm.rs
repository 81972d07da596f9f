//! Direct messages: online delivery, offline delivery at next login, once.

use std::time::Duration;

use chat_protocol::ServerLine;

use crate::common::{assert_recent_ts, wait_until, ErrorCode, Stack};

/// Logs `user` in (password `pw`), and returns the ids of the DMs that waited.
/// The login's first command is a `PING`: it takes them as received.
async fn waiting_dms(stack: &Stack, user: &str) -> Vec<i64> {
    let (mut c, _) = stack.login(user, "pw").await;
    c.sync()
        .await
        .iter()
        .filter_map(|l| match l {
            ServerLine::Dm { id, .. } => Some(*id),
            _ => None,
        })
        .collect()
}

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
        || async { waiting_dms(&stack, "bob").await.is_empty() },
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
        || async { waiting_dms(&stack, "carol").await.is_empty() },
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

/// A session whose first command is `ACK` acknowledges its DMs: one it did
/// not acknowledge (its connection died first) is delivered again at the next
/// login, one it did is not, and an `ACK` counts only DMs written to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_dm_is_delivered_again_at_next_login() {
    let stack = Stack::start().await;
    let (mut bob, _) = stack.login("bob", "pw").await;
    bob.send("ACK").await;
    assert_eq!(bob.recv().await, ServerLine::OkAck { count: 0 });
    let (mut alice, _) = stack.login("alice", "pw").await;
    alice.send("DM id=a bob first").await;
    let (first, _) = alice.msg_answer("a").await.expect("first DM acked");
    alice.send("DM id=b bob second").await;
    let (second, _) = alice.msg_answer("b").await.expect("second DM acked");
    let (first, second) = (first as i64, second as i64);
    for want in [first, second] {
        bob.expect_within(
            Duration::from_secs(5),
            "a DM from alice",
            |l| matches!(l, ServerLine::Dm { id, .. } if *id == want),
        )
        .await;
    }

    // Only DMs written to this session count, each once.
    alice.send(&format!("ACK {second}")).await;
    assert_eq!(
        alice.recv().await,
        ServerLine::OkAck { count: 0 },
        "not alice's DM"
    );
    bob.send(&format!("ACK {first} 999999")).await;
    assert_eq!(bob.recv().await, ServerLine::OkAck { count: 1 });
    bob.send(&format!("ACK {first}")).await;
    assert_eq!(
        bob.recv().await,
        ServerLine::OkAck { count: 0 },
        "acked before"
    );
    bob.send("ACK x").await;
    bob.expect_err(ErrorCode::BadArgs).await;

    // The connection dies with the second DM unacknowledged.
    drop(bob);
    wait_until(
        Duration::from_secs(5),
        "bob's next login gets the unacknowledged DM, and only it",
        || async {
            let dms = waiting_dms(&stack, "bob").await;
            assert!(
                !dms.contains(&first),
                "an acknowledged DM came again: {dms:?}"
            );
            dms == [second]
        },
    )
    .await;

    // That login's first command was a PING: it took the DM as received when
    // written, as a session that does not acknowledge does.
    wait_until(
        Duration::from_secs(5),
        "no DM is pending any more",
        || async { waiting_dms(&stack, "bob").await.is_empty() },
    )
    .await;
}
