//! Acks only after commit, dbproxy outages, restarts on the same SQLite file,
//! shutdown, and the admin endpoints.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chat_protocol::ServerLine;
use tokio_util::sync::CancellationToken;

use crate::common::{http_get, within, Client, ErrorCode, Stack};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn msg_is_unavailable_not_acked_while_dbproxy_is_down() {
    let mut stack = Stack::start().await;
    let (mut alice, _) = stack.login("alice", "pw").await;
    let (mut bob, _) = stack.login("bob", "pw").await;
    alice.join("r").await;
    bob.join("r").await;
    assert_eq!(alice.msg("r", "m1", "one").await.0, 1);

    stack.stop_dbproxy().await;
    alice.send_msg("r", "m2", "two").await;
    let answer = within(
        Duration::from_secs(15),
        "the answer to a MSG while the dbproxy is down",
        alice.msg_answer("m2"),
    )
    .await;
    match answer {
        Err((ErrorCode::Unavailable, detail)) => assert!(
            detail == "id=m2" || detail.starts_with("id=m2 "),
            "ERR UNAVAILABLE for MSG id=m2 starts its detail with id=m2: {detail:?}"
        ),
        other => panic!("MSG with the dbproxy down must answer ERR UNAVAILABLE, got {other:?}"),
    }
    alice.sync().await; // the connection stays open

    stack.start_dbproxy().await;
    // Resend with the same id until the server reaches the dbproxy again.
    let deadline = Instant::now() + Duration::from_secs(15);
    let seq = loop {
        alice.send_msg("r", "m2", "two").await;
        match alice.msg_answer("m2").await {
            Ok((seq, _)) => break seq,
            Err((ErrorCode::Unavailable, _)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("MSG id=m2 after the dbproxy restart: {e:?}"),
        }
    };
    assert_eq!(
        seq, 2,
        "the retried message gets the next seq (nothing was stored before)"
    );
    let hist = alice.history("r", 0, None).await;
    assert_eq!(
        hist.iter().map(|h| (h.0, h.3.as_str())).collect::<Vec<_>>(),
        vec![(1, "one"), (2, "two")],
        "HISTORY after the outage"
    );
    // bob saw each stored message once, and nothing for the refused attempt.
    let mut seen = Vec::new();
    while seen.len() < 2 {
        if let ServerLine::Msg { seq, text, .. } = bob
            .expect("MSG r", |l| matches!(l, ServerLine::Msg { .. }))
            .await
        {
            seen.push((seq, text));
        }
    }
    seen.extend(bob.sync().await.into_iter().filter_map(|l| match l {
        ServerLine::Msg { seq, text, .. } => Some((seq, text)),
        _ => None,
    }));
    assert_eq!(
        seen,
        vec![(1, "one".to_string()), (2, "two".to_string())],
        "members get a message only once it is stored, and only once"
    );
}

/// Several senders post continuously, retrying `UNAVAILABLE` with the same id,
/// while the dbproxy is killed and restarted: every acked message must be in
/// HISTORY, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acked_message_is_lost_across_dbproxy_restart() {
    const SENDERS: usize = 3;
    const PER_SENDER: usize = 60;
    let mut stack = Stack::start().await;
    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let (mut c, _) = stack.guest("r", &format!("s{s}")).await;
        c.sync().await;
        senders.push(c);
    }
    let started = CancellationToken::new();
    let mut tasks = Vec::new();
    for (s, mut c) in senders.into_iter().enumerate() {
        let started = started.clone();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(60);
            for i in 0..PER_SENDER {
                if i == 10 {
                    started.cancel();
                }
                let cid = format!("s{s}-{i}");
                loop {
                    c.send_msg("r", &cid, &format!("text {cid}")).await;
                    match c.msg_answer(&cid).await {
                        Ok((seq, ts)) => {
                            acked.push((seq, ts, cid.clone()));
                            break;
                        }
                        Err((ErrorCode::Unavailable, _)) => {
                            assert!(
                                Instant::now() < deadline,
                                "{cid}: still UNAVAILABLE after 60 s"
                            );
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => panic!("MSG {cid} during the dbproxy restart: {e:?}"),
                    }
                }
            }
            acked
        }));
    }
    within(
        Duration::from_secs(30),
        "senders start",
        started.cancelled(),
    )
    .await;
    stack.stop_dbproxy().await;
    tokio::time::sleep(Duration::from_millis(500)).await; // traffic meets the outage
    stack.start_dbproxy().await;

    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(
            within(Duration::from_secs(90), "senders finish", t)
                .await
                .expect("sender task"),
        );
    }
    assert_eq!(acked.len(), SENDERS * PER_SENDER);

    let (mut reader, _) = stack.guest("r", "reader").await;
    let hist = reader.history("r", 0, Some(1000)).await;
    let seqs: Vec<u64> = hist.iter().map(|h| h.0).collect();
    assert_eq!(
        seqs,
        (1..=hist.len() as u64).collect::<Vec<_>>(),
        "stored seqs are dense"
    );
    let by_seq: HashMap<u64, &(u64, i64, String, String)> = hist.iter().map(|h| (h.0, h)).collect();
    for (seq, ts, cid) in &acked {
        let h = by_seq
            .get(seq)
            .unwrap_or_else(|| panic!("acked message {cid} (seq {seq}) is missing from HISTORY"));
        assert_eq!(
            h.3,
            format!("text {cid}"),
            "seq {seq} holds the acked message {cid}"
        );
        assert_eq!(h.1, *ts, "seq {seq}: HIST ts = acked ts");
    }
    assert_eq!(
        hist.len(),
        acked.len(),
        "every message is stored exactly once (retries with the same id add nothing)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_users_rooms_history_and_waiting_dms() {
    let mut stack = Stack::start().await;
    let (mut alice, _) = stack.login("alice", "pw").await;
    alice.join("r1").await;
    alice.join("r2").await;
    let a = alice.msg("r1", "a", "first").await;
    let b = alice.msg("r1", "b", "second").await;
    let (mut bob, _) = stack.login("bob", "pw").await;
    bob.send("QUIT").await;
    bob.expect_closed().await;
    alice.send("DM id=d bob while you were out").await;
    alice.msg_answer("d").await.expect("DM acked");

    stack.restart_all().await;

    // The old connection is gone.
    alice.expect_closed().await;

    let (mut alice, _) = stack.login("alice", "pw").await;
    let mut joins: Vec<ServerLine> = alice
        .sync()
        .await
        .into_iter()
        .filter(|l| matches!(l, ServerLine::OkJoin { .. }))
        .collect();
    joins.sort_by_key(|l| l.to_string());
    assert_eq!(
        joins,
        vec![
            ServerLine::OkJoin {
                room: "r1".into(),
                last_seq: 2
            },
            ServerLine::OkJoin {
                room: "r2".into(),
                last_seq: 0
            }
        ],
        "rooms and memberships survive a restart"
    );
    let mut wrong = stack.connect("alice-wrong").await;
    wrong.send("LOGIN alice nope").await;
    crate::login::assert_one_err_then_closed(
        &mut wrong,
        ErrorCode::AuthFailed,
        "wrong password after restart",
    )
    .await;

    alice.send("ROOMS").await;
    let mut rooms = Vec::new();
    loop {
        match alice.recv().await {
            ServerLine::Room { room, last_seq, .. } => rooms.push((room, last_seq)),
            ServerLine::OkRooms { .. } => break,
            ServerLine::Err { code, detail } => panic!("ROOMS: ERR {code} {detail}"),
            _ => {}
        }
    }
    assert_eq!(rooms, vec![("r1".to_string(), 2), ("r2".to_string(), 0)]);

    let hist = alice.history("r1", 0, None).await;
    assert_eq!(
        hist,
        vec![
            (1, a.1, "alice".to_string(), "first".to_string()),
            (2, b.1, "alice".to_string(), "second".to_string())
        ],
        "history survives a restart"
    );
    // Seqs continue after the restart.
    assert_eq!(alice.msg("r1", "c", "third").await.0, 3);

    let (mut bob, _) = stack.login("bob", "pw").await;
    let lines = bob.sync().await;
    assert!(
        lines.iter().any(|l| matches!(l, ServerLine::Dm { sender, text, .. } if sender == "alice" && text == "while you were out")),
        "a DM waiting across a restart is delivered at login: {lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_shutdown_says_bye_shutdown() {
    let mut stack = Stack::start().await;
    let (mut alice, _) = stack.login("alice", "pw").await;
    alice.join("r").await;
    let (mut guest, _) = stack.guest("r", "g").await;
    let stop = async { stack.stop_server().await };
    let check = async {
        for c in [&mut alice, &mut guest] {
            let lines = c.expect_closed().await;
            assert_eq!(
                lines.last(),
                Some(&ServerLine::Bye {
                    reason: "shutdown".into()
                }),
                "{}: on drain every client gets BYE shutdown before the close",
                c.label
            );
        }
    };
    tokio::join!(stop, check);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_endpoints() {
    let stack = Stack::start().await;
    let (mut alice, _) = stack.login("alice", "pw").await;
    alice.join("r").await;
    alice.msg("r", "m", "counted").await;
    alice.history("r", 0, None).await;

    for (tier, addr) in [
        ("server", stack.admin_addr),
        ("dbproxy", stack.db_admin_addr),
    ] {
        let (status, body) = http_get(addr, "/metrics").await;
        assert_eq!(status, 200, "{tier} GET /metrics");
        assert!(
            body.lines().any(|l| l.starts_with("chat_")),
            "{tier} /metrics has `chat_` metrics after traffic:\n{body}"
        );
        assert!(
            body.contains("# TYPE chat_"),
            "{tier} /metrics is Prometheus text (with # TYPE lines)"
        );
        assert_eq!(http_get(addr, "/readyz").await.0, 200, "{tier} GET /readyz");
        assert_eq!(
            http_get(addr, "/healthz").await.0,
            200,
            "{tier} GET /healthz"
        );
    }
    // The client port does not serve HTTP: it speaks the line protocol.
    let mut c = Client::connect(stack.addr, "http-on-client-port").await;
    c.send("GET /metrics HTTP/1.1").await;
    let lines = c.expect_closed().await;
    assert!(
        matches!(
            lines.as_slice(),
            [ServerLine::Err {
                code: ErrorCode::BadFirstLine,
                ..
            }]
        ),
        "an HTTP request on the client port is a bad first line: {lines:?}"
    );
}

/// The server's /readyz follows storage: not ready within a few seconds of
/// its only dbproxy stopping (so proxies and the Service stop sending it
/// clients it would have to refuse), ready again once the dbproxy is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_readiness_follows_storage() {
    let mut stack = Stack::start().await;
    assert_eq!(http_get(stack.admin_addr, "/readyz").await.0, 200);
    stack.stop_dbproxy().await;
    crate::common::wait_until(
        Duration::from_secs(10),
        "the server's /readyz is 503 with its dbproxy down",
        || async { http_get(stack.admin_addr, "/readyz").await.0 == 503 },
    )
    .await;
    // Still alive, and sessions already open stay open.
    assert_eq!(http_get(stack.admin_addr, "/healthz").await.0, 200);
    stack.start_dbproxy().await;
    crate::common::wait_until(
        Duration::from_secs(10),
        "the server's /readyz is 200 again with its dbproxy back",
        || async { http_get(stack.admin_addr, "/readyz").await.0 == 200 },
    )
    .await;
    let (_alice, _) = stack.login("alice", "pw").await;
}
