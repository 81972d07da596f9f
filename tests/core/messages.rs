//! MSG: acknowledgement, fan-out to every session, membership, idempotent resend.

use chat_protocol::ServerLine;

use crate::common::{assert_recent_ts, ErrorCode, Stack};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn msg_is_acked_and_delivered_to_every_session() {
    let stack = Stack::start().await;
    let (mut alice1, _) = stack.login("alice", "pw").await;
    let (mut alice2, _) = stack.login("alice", "pw").await;
    let (mut bob, _) = stack.login("bob", "pw").await;
    alice1.join("lobby").await;
    bob.join("lobby").await;

    let text = "hello  big world: ünïcode ✓";
    alice1.send(&format!("MSG id=m-1 lobby {text}")).await;
    let (seq, ts) = match alice1
        .expect("OK MSG", |l| {
            matches!(l, ServerLine::OkMsg { .. } | ServerLine::Err { .. })
        })
        .await
    {
        ServerLine::OkMsg { room, seq, ts, cid } => {
            assert_eq!(room, "lobby");
            assert_eq!(cid.as_deref(), Some("m-1"), "OK MSG echoes id=<cid>");
            (seq, ts)
        }
        other => panic!("MSG answered {other}"),
    };
    assert_eq!(seq, 1, "the first message of a room has seq 1");
    assert_recent_ts(ts);

    let expected = ServerLine::Msg {
        room: "lobby".into(),
        seq,
        ts,
        sender: "alice".into(),
        text: text.into(),
    };
    for c in [&mut bob, &mut alice2] {
        let got = c
            .expect("MSG lobby 1", |l| matches!(l, ServerLine::Msg { .. }))
            .await;
        assert_eq!(
            got, expected,
            "{}: the delivered MSG carries the acked facts",
            c.label
        );
    }

    // Without an id: no id= in the ack.
    alice2.send("MSG lobby second").await;
    match alice2
        .expect("OK MSG", |l| {
            matches!(l, ServerLine::OkMsg { .. } | ServerLine::Err { .. })
        })
        .await
    {
        ServerLine::OkMsg { seq, cid, .. } => {
            assert_eq!(seq, 2);
            assert_eq!(cid, None, "no id=, no id= in the ack");
        }
        other => panic!("MSG answered {other}"),
    }
    let got = alice1
        .expect("MSG lobby 2", |l| matches!(l, ServerLine::Msg { .. }))
        .await;
    assert!(
        matches!(&got, ServerLine::Msg { seq: 2, sender, text, .. } if sender == "alice" && text == "second"),
        "alice's other session gets her message: {got}"
    );

    // The sending session has the facts in its OK MSG and is not sent its own message.
    let lines = alice1.sync().await;
    assert!(
        !lines
            .iter()
            .any(|l| matches!(l, ServerLine::Msg { seq: 1, .. })),
        "the sending session must not get its own MSG event: {lines:?}"
    );
    let lines = alice2.sync().await;
    assert!(
        !lines
            .iter()
            .any(|l| matches!(l, ServerLine::Msg { seq: 2, .. })),
        "the sending session must not get its own MSG event: {lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn msg_to_room_not_joined_is_not_member() {
    let stack = Stack::start().await;
    let (mut alice, _) = stack.login("alice", "pw").await;
    let (mut bob, _) = stack.login("bob", "pw").await;
    alice.join("lobby").await;

    bob.send("MSG lobby let me in").await;
    bob.expect_err(ErrorCode::NotMember).await;
    bob.send("MSG id=x7 lobby let me in").await;
    let detail = bob.expect_err(ErrorCode::NotMember).await;
    assert!(
        detail == "id=x7" || detail.starts_with("id=x7 "),
        "an ERR answering a MSG with an id starts its detail with id=<cid>: {detail:?}"
    );
    bob.sync().await;
    assert!(
        alice.history("lobby", 0, None).await.is_empty(),
        "nothing was stored"
    );
    let lines = alice.sync().await;
    assert!(
        !lines.iter().any(|l| matches!(l, ServerLine::Msg { .. })),
        "nothing was delivered: {lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resent_client_id_is_idempotent() {
    let stack = Stack::start().await;
    let (mut alice, _) = stack.login("alice", "pw").await;
    let (mut bob, _) = stack.login("bob", "pw").await;
    let (mut carol, _) = stack.login("carol", "pw").await;
    alice.join("lobby").await;
    bob.join("lobby").await;
    carol.join("lobby").await;

    let (seq1, ts1) = alice.msg("lobby", "dup", "only once").await;
    assert_eq!(seq1, 1);
    // Same id again on the same connection: same seq and ts, nothing new.
    assert_eq!(alice.msg("lobby", "dup", "only once").await, (seq1, ts1));
    // And after a reconnect (the lost-ack case).
    let (mut alice2, _) = stack.login("alice", "pw").await;
    assert_eq!(alice2.msg("lobby", "dup", "only once").await, (seq1, ts1));

    // The key is (sender, cid): bob's id=dup is his own message.
    let (seq2, _) = bob.msg("lobby", "dup", "bob's").await;
    assert_eq!(seq2, 2);
    let (seq3, _) = alice.msg("lobby", "next", "then this").await;
    assert_eq!(seq3, 3);

    // carol, who only listens, got each message exactly once.
    let mut got = Vec::new();
    while got.last() != Some(&3) {
        if let ServerLine::Msg { seq, .. } = carol
            .expect("MSG lobby", |l| matches!(l, ServerLine::Msg { .. }))
            .await
        {
            got.push(seq);
        }
    }
    let late = carol.sync().await;
    got.extend(late.iter().filter_map(|l| match l {
        ServerLine::Msg { seq, .. } => Some(*seq),
        _ => None,
    }));
    assert_eq!(got, vec![1, 2, 3], "a resent MSG is not delivered again");

    let hist = bob.history("lobby", 0, None).await;
    let seqs: Vec<u64> = hist.iter().map(|h| h.0).collect();
    assert_eq!(seqs, vec![1, 2, 3], "HISTORY holds the resent message once");
    assert_eq!(hist[0].3, "only once");
    assert_eq!(hist[0].1, ts1);
}

/// `MSG` then `QUIT` in one write: the message is acknowledged before `BYE`,
/// because a clean close answers what it already read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quit_answers_messages_already_sent() {
    let stack = Stack::start().await;
    let (mut alice, _) = stack.login("alice", "pw").await;
    alice.join("r").await;
    alice.send_raw(b"MSG id=q1 r last words\nQUIT\n").await;
    let lines = alice.expect_closed().await;
    let ok = lines
        .iter()
        .position(|l| matches!(l, ServerLine::OkMsg { cid: Some(c), .. } if c == "q1"));
    let bye = lines
        .iter()
        .position(|l| matches!(l, ServerLine::Bye { reason } if reason == "quit"));
    assert!(
        matches!((ok, bye), (Some(o), Some(b)) if o < b),
        "OK MSG comes before BYE quit: {lines:?}"
    );
}
