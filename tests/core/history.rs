//! HISTORY: catch-up after a gap, limits, unknown rooms.

use chat_protocol::ServerLine;

use crate::common::{ErrorCode, Stack};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_returns_exactly_the_missed_messages() {
    let stack = Stack::start().await;
    let (mut alice, _) = stack.login("alice", "pw").await;
    let (mut bob, _) = stack.login("bob", "pw").await;
    alice.join("r").await;
    bob.join("r").await;

    let mut acked = Vec::new();
    for i in 1..=3 {
        acked.push(
            alice
                .msg("r", &format!("a{i}"), &format!("before {i}"))
                .await,
        );
    }
    let mut last_seen = 0;
    while last_seen < 3 {
        if let ServerLine::Msg { seq, .. } = bob
            .expect("MSG r", |l| matches!(l, ServerLine::Msg { .. }))
            .await
        {
            last_seen = seq;
        }
    }
    bob.send("QUIT").await;
    bob.expect_closed().await;

    for i in 4..=10 {
        acked.push(
            alice
                .msg("r", &format!("a{i}"), &format!("while away {i}"))
                .await,
        );
    }
    let seqs: Vec<u64> = acked.iter().map(|a| a.0).collect();
    assert_eq!(seqs, (1..=10).collect::<Vec<u64>>(), "acked seqs are dense");

    let (mut bob, _) = stack.login("bob", "pw").await;
    bob.expect("OK JOIN r 10", |l| {
        *l == ServerLine::OkJoin {
            room: "r".into(),
            last_seq: 10,
        }
    })
    .await;

    let hist = bob.history("r", last_seen, None).await;
    let want: Vec<(u64, i64, String, String)> = (4..=10)
        .map(|i| {
            (
                i,
                acked[i as usize - 1].1,
                "alice".to_string(),
                format!("while away {i}"),
            )
        })
        .collect();
    assert_eq!(
        hist, want,
        "HISTORY r 3 returns exactly seqs 4..=10 with their facts"
    );

    // The limit is respected; a count equal to the limit means "ask again".
    let page = bob.history("r", 3, Some(2)).await;
    assert_eq!(page.iter().map(|h| h.0).collect::<Vec<_>>(), vec![4, 5]);
    let page = bob.history("r", 5, Some(2)).await;
    assert_eq!(page.iter().map(|h| h.0).collect::<Vec<_>>(), vec![6, 7]);
    assert!(
        bob.history("r", 10, None).await.is_empty(),
        "nothing after the last seq"
    );

    bob.send("HISTORY nowhere 0").await;
    bob.expect_err(ErrorCode::NoSuchRoom).await;
    bob.send("HISTORY r notanumber").await;
    bob.expect_err(ErrorCode::BadArgs).await;
    bob.sync().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_limit_defaults_to_100() {
    let stack = Stack::start().await;
    let (mut alice, _) = stack.login("alice", "pw").await;
    alice.join("big").await;
    for i in 1..=105 {
        alice
            .send_msg("big", &format!("m{i}"), &format!("n{i}"))
            .await;
    }
    for i in 1..=105 {
        alice
            .msg_answer(&format!("m{i}"))
            .await
            .unwrap_or_else(|e| panic!("MSG m{i}: {e:?}"));
    }
    let first = alice.history("big", 0, None).await;
    assert_eq!(first.len(), 100, "HISTORY without a limit returns 100");
    assert_eq!(
        first.iter().map(|h| h.0).collect::<Vec<_>>(),
        (1..=100).collect::<Vec<_>>()
    );
    let rest = alice.history("big", 100, None).await;
    assert_eq!(
        rest.iter().map(|h| h.0).collect::<Vec<_>>(),
        (101..=105).collect::<Vec<_>>()
    );
    assert_eq!(rest[4].3, "n105");
    let all = alice.history("big", 0, Some(1000)).await;
    assert_eq!(all.len(), 105);
}
