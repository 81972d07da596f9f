//! Bad first lines, framing errors, unknown commands and the connection
//! limits: rate, slow consumers, idle timeout.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_protocol::ServerLine;
use tokio::net::TcpSocket;

use crate::common::{
    http_get, metric, wait_until, within, Client, ErrorCode, Next, PartReason, Stack,
};
use crate::login::assert_one_err_then_closed;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_first_line_gets_one_err_and_close() {
    let stack = Stack::start().await;
    // The room exists, so a processed MSG would be stored.
    let (mut owner, _) = stack.guest("lobby", "owner").await;

    let cases: [(&[u8], Option<ErrorCode>); 7] = [
        (b"MSG lobby hi\n", Some(ErrorCode::BadFirstLine)),
        (b"FOO\n", Some(ErrorCode::BadFirstLine)),
        (b"PING\n", Some(ErrorCode::BadFirstLine)),
        (b"QUIT\n", Some(ErrorCode::BadFirstLine)),
        // Bad arguments on the first line: BAD_ARGS (or BAD_FIRST_LINE), closed.
        (b"LOGIN alice\n", None),
        (b"JOIN lobby bad/name\n", None),
        (b"RESUME nothex\n", None),
    ];
    for (line, code) in cases {
        let shown = String::from_utf8_lossy(line).trim().to_string();
        let mut c = stack.connect(&format!("first line {shown:?}")).await;
        c.send_raw(line).await;
        let lines = c.expect_closed().await;
        let shown_lines: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        match (lines.as_slice(), code) {
            ([ServerLine::Err { code: got, .. }], Some(want)) => {
                assert_eq!(*got, want, "first line {shown:?}")
            }
            ([ServerLine::Err { code: got, .. }], None) => assert!(
                matches!(got, ErrorCode::BadArgs | ErrorCode::BadFirstLine),
                "first line {shown:?}: expected BAD_ARGS, got {got}"
            ),
            _ => panic!("first line {shown:?}: expected exactly one ERR then the close, got {shown_lines:?}"),
        }
    }

    // Nothing after a bad first line is read, even when it arrived in the same packet.
    let mut c = stack.connect("pipelined").await;
    c.send_raw(b"FOO\nLOGIN mallory pw\nJOIN lobby\nMSG lobby sneaky\n")
        .await;
    assert_one_err_then_closed(&mut c, ErrorCode::BadFirstLine, "FOO then more lines").await;

    assert!(
        owner.history("lobby", 0, None).await.is_empty(),
        "no message may be stored by a connection whose first line was bad"
    );
    let lines = owner.sync().await;
    assert!(
        !lines
            .iter()
            .any(|l| matches!(l, ServerLine::Msg { .. } | ServerLine::Joined { .. })),
        "nothing was processed: {lines:?}"
    );
    // `mallory` was never registered: the name is still free for a guest.
    let (_mallory, _) = stack.guest("lobby", "mallory").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_long_line_is_rejected_and_connection_stays_usable() {
    let stack = Stack::start().await;
    let (mut alice, _) = stack.login("alice", "pw").await;
    let (mut bob, _) = stack.login("bob", "pw").await;
    alice.join("r").await;
    bob.join("r").await;

    // 100 KB in one line, a MSG that would be stored if it were not discarded.
    let mut long = b"MSG id=long r ".to_vec();
    long.extend(std::iter::repeat_n(b'a', 100 * 1024));
    long.push(b'\n');
    let writer = async {
        alice.send_raw(&long).await;
        alice.expect_err(ErrorCode::LineTooLong).await;
        alice.send("PING still-here").await;
        alice
            .expect("PONG still-here", |l| {
                *l == ServerLine::Pong {
                    word: Some("still-here".into()),
                }
            })
            .await;
    };
    let other = async {
        // Another client is served meanwhile.
        let (seq, _) = bob.msg("r", "b1", "unaffected").await;
        assert_eq!(seq, 1);
    };
    tokio::join!(writer, other);

    // The limit is max_line_bytes (4096), terminator excluded.
    let prefix = "MSG id=edge r ";
    let at_limit = format!("{prefix}{}", "b".repeat(4096 - prefix.len()));
    assert_eq!(at_limit.len(), 4096);
    alice.send(&at_limit).await;
    let (seq, _) = alice
        .msg_answer("edge")
        .await
        .expect("a line of exactly max_line_bytes is accepted");
    assert_eq!(seq, 2);
    let over = format!("{prefix}{}", "c".repeat(4097 - prefix.len()));
    alice.send(&over).await;
    alice.expect_err(ErrorCode::LineTooLong).await;
    // A CRLF line at the limit is fine too: the \r is not counted.
    alice
        .send_raw(format!("{}\r\n", at_limit.replace("edge", "edg2")).as_bytes())
        .await;
    alice
        .msg_answer("edg2")
        .await
        .expect("CRLF line at the limit");
    alice.sync().await;

    let hist = bob.history("r", 0, None).await;
    assert_eq!(
        hist.iter().map(|h| h.0).collect::<Vec<_>>(),
        vec![1, 2, 3],
        "the over-long lines were discarded, not stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_is_rejected_and_ignored() {
    let stack = Stack::start().await;
    let (mut alice, _) = stack.login("alice", "pw").await;
    alice.join("r").await;
    alice.send_raw(b"MSG r caf\xe9 \xff\xfe\n").await;
    alice.expect_err(ErrorCode::BadUtf8).await;
    alice.send("PING ok").await;
    alice
        .expect("PONG ok", |l| {
            *l == ServerLine::Pong {
                word: Some("ok".into()),
            }
        })
        .await;
    assert!(
        alice.history("r", 0, None).await.is_empty(),
        "the bad line was ignored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_commands_bad_args_and_framing() {
    let stack = Stack::start().await;
    let (mut alice, _) = stack.login("alice", "pw").await;

    alice.send("FOO bar").await;
    alice.expect_err(ErrorCode::UnknownCommand).await;
    alice.send("JOIN bad/room").await;
    alice.expect_err(ErrorCode::BadArgs).await;
    alice.send("JOIN").await;
    alice.expect_err(ErrorCode::BadArgs).await;
    alice.send("MSG id=bad!id r hi").await;
    alice.expect_err(ErrorCode::BadArgs).await;

    // Empty lines are ignored; \r\n works; keywords are case-insensitive.
    alice.send_raw(b"\n   \r\n\r\npInG word\r\n").await;
    assert_eq!(
        alice.recv().await,
        ServerLine::Pong {
            word: Some("word".into())
        },
        "empty lines get no answer and `pInG word\\r\\n` is a PING"
    );
    // A line split across writes is one line.
    alice.send_raw(b"PI").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    alice.send_raw(b"NG split\n").await;
    assert_eq!(
        alice.recv().await,
        ServerLine::Pong {
            word: Some("split".into())
        }
    );
    alice.send("PING").await;
    assert_eq!(alice.recv().await, ServerLine::Pong { word: None });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_is_rate_limited_and_others_are_served() {
    let stack = Stack::start_with(|c| {
        c.rate_per_sec = 10;
        c.rate_burst = 10;
    })
    .await;
    let (mut flooder, _) = stack.login("flooder", "pw").await;
    let (mut calm, _) = stack.login("calm", "pw").await;

    let mut burst = Vec::new();
    for i in 0..200 {
        burst.extend_from_slice(format!("PING p{i}\n").as_bytes());
    }
    let flood = async {
        flooder.send_raw(&burst).await;
        let (mut pongs, mut limited) = (0, 0);
        for _ in 0..200 {
            match flooder.recv().await {
                ServerLine::Pong { .. } => pongs += 1,
                ServerLine::Err {
                    code: ErrorCode::RateLimited,
                    ..
                } => limited += 1,
                other => panic!("unexpected answer to a flood of PINGs: {other}"),
            }
        }
        (pongs, limited)
    };
    let served = async {
        let start = Instant::now();
        calm.send("PING calm").await;
        let l = calm.recv_within(Duration::from_secs(2)).await;
        assert_eq!(
            l,
            ServerLine::Pong {
                word: Some("calm".into())
            }
        );
        start.elapsed()
    };
    let ((pongs, limited), latency) = tokio::join!(flood, served);
    assert!(
        limited > 0,
        "200 PINGs at once with rate_burst=10 must be RATE_LIMITED in part"
    );
    assert!(
        (5..=100).contains(&pongs),
        "about the burst (10) of PINGs should be answered, got {pongs} PONG and {limited} RATE_LIMITED"
    );
    assert!(
        latency < Duration::from_secs(1),
        "another client's PING took {latency:?} during the flood"
    );

    // Rate-limited commands are not executed: only acked MSGs are stored.
    tokio::time::sleep(Duration::from_millis(1500)).await; // refill the bucket
    flooder.join("r").await;
    for i in 0..40 {
        flooder.send_msg("r", &format!("f{i}"), "x").await;
    }
    // Every answer names its MSG by id (OK ... id=<cid> or ERR ... id=<cid>).
    let mut acked = 0;
    let mut answered = std::collections::HashSet::new();
    while answered.len() < 40 {
        match flooder
            .expect("an answer to MSG f<i>", |l| {
                matches!(l, ServerLine::OkMsg { .. } | ServerLine::Err { .. })
            })
            .await
        {
            ServerLine::OkMsg { cid, .. } => {
                let cid = cid.expect("OK MSG for a MSG with id= carries id=");
                assert!(answered.insert(cid.clone()), "{cid} answered twice");
                acked += 1;
            }
            ServerLine::Err { code, detail } => {
                assert_eq!(code, ErrorCode::RateLimited, "ERR {code} {detail}");
                let cid = detail
                    .strip_prefix("id=")
                    .and_then(|d| d.split(' ').next())
                    .unwrap_or_else(|| {
                        panic!(
                            "ERR RATE_LIMITED answering `MSG id=f<i> ...` must start its detail with id=<cid>, got {detail:?}"
                        )
                    })
                    .to_string();
                assert!(answered.insert(cid.clone()), "{cid} answered twice");
            }
            _ => unreachable!(),
        }
    }
    assert!(
        acked < 40,
        "40 MSGs at once with rate_burst=10 must be limited"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await; // refill before HISTORY
    let hist = flooder.history("r", 0, Some(1000)).await;
    assert_eq!(hist.len(), acked, "exactly the acked MSGs were stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_never_reads_is_disconnected_as_slow() {
    let stack = Stack::start_with(|c| c.send_queue_lines = 64).await;
    let (mut member, _) = stack.guest("r", "member").await;
    let (mut sender, _) = stack.guest("r", "sender").await;

    // The slow client asks for a small receive buffer so the kernel does not
    // absorb megabytes on its behalf; it never reads after joining.
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stream = sock.connect(stack.addr).await.expect("connect slow client");
    let mut slow = Client::from_stream(stream, "slowuser");
    slow.send("JOIN r slowuser").await;
    slow.expect("OK JOIN r", |l| matches!(l, ServerLine::OkJoin { .. }))
        .await;
    member
        .expect(
            "JOIN r slowuser",
            |l| matches!(l, ServerLine::Joined { user, .. } if user == "slowuser"),
        )
        .await;

    let slow_gone = Arc::new(AtomicBool::new(false));
    let target = Arc::new(AtomicU64::new(u64::MAX));
    let reader = {
        let (slow_gone, target) = (slow_gone.clone(), target.clone());
        tokio::spawn(async move {
            let mut seqs = Vec::new();
            let end = Instant::now() + Duration::from_secs(90);
            loop {
                if seqs.len() as u64 == target.load(Ordering::SeqCst) {
                    return (member, seqs);
                }
                // Short waits, so a target set while the member is idle is seen.
                match member.next(Duration::from_millis(100)).await {
                    Next::Line(ServerLine::Msg { seq, .. }) => seqs.push(seq),
                    Next::Line(ServerLine::Parted { user, reason, .. }) if user == "slowuser" => {
                        assert_eq!(reason, PartReason::Slow, "the slow consumer's PART reason");
                        slow_gone.store(true, Ordering::SeqCst);
                    }
                    Next::Line(_) => {}
                    Next::Closed => {
                        panic!("the normal member was disconnected (it reads everything)")
                    }
                    Next::Timeout => assert!(
                        Instant::now() < end,
                        "the normal member stalled with {} messages (target {})",
                        seqs.len(),
                        target.load(Ordering::SeqCst)
                    ),
                }
            }
        })
    };

    let text = "x".repeat(3800);
    let end = Instant::now() + Duration::from_secs(60);
    let mut sent = 0u64;
    while !slow_gone.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < end,
            "the client that never reads was not disconnected after {sent} messages of 3.8 KB"
        );
        for i in 0..32 {
            sender.send_msg("r", &format!("s{}", sent + i), &text).await;
        }
        for i in 0..32 {
            let cid = format!("s{}", sent + i);
            sender
                .msg_answer(&cid)
                .await
                .unwrap_or_else(|e| panic!("MSG {cid}: {e:?}"));
        }
        sent += 32;
    }
    target.store(sent, Ordering::SeqCst);
    let (_member, seqs) = within(
        Duration::from_secs(60),
        "the member reads every message",
        reader,
    )
    .await
    .expect("member task");
    assert_eq!(
        seqs,
        (1..=sent).collect::<Vec<u64>>(),
        "the normal member receives every message, in order, while the slow one is dropped"
    );

    // The slow client's connection was closed (after whatever was buffered).
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        match slow
            .next(end.saturating_duration_since(Instant::now()))
            .await
        {
            Next::Closed => break,
            Next::Line(_) => {}
            Next::Timeout => panic!("the slow client's connection was not closed"),
        }
    }

    // The disconnect was counted.
    let admin = stack.admin_addr;
    wait_until(
        Duration::from_secs(5),
        "chat_slow_consumer_disconnects_total counts the slow client",
        || async move { metric(admin, "chat_slow_consumer_disconnects_total").await == 1.0 },
    )
    .await;

    // The server is healthy.
    assert_eq!(http_get(stack.admin_addr, "/readyz").await.0, 200);
    let (mut fresh, _) = stack.guest("r", "fresh").await;
    fresh.sync().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connection_is_closed_and_ping_keeps_alive() {
    let stack = Stack::start_with(|c| c.idle_timeout_secs = 1).await;
    let (mut watcher, _) = stack.guest("r", "watcher").await;
    let (mut idle, _) = stack.guest("r", "idler").await;
    let (mut busy, _) = stack.guest("r", "busy").await;

    let keep_alive = async {
        for _ in 0..12 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            busy.sync().await;
        }
    };
    let idle_close = async {
        let lines = idle.expect_closed_within(Duration::from_secs(5)).await;
        assert_eq!(
            lines.last(),
            Some(&ServerLine::Bye {
                reason: "idle".into()
            }),
            "an idle connection gets `BYE idle` before the close"
        );
    };
    let watch = async {
        loop {
            // The watcher also has to speak to stay connected.
            match watcher.next(Duration::from_millis(300)).await {
                Next::Line(ServerLine::Parted { user, reason, .. }) if user == "idler" => {
                    assert_eq!(reason, PartReason::Idle, "others see PART r idler idle");
                    break;
                }
                Next::Line(_) | Next::Timeout => watcher.send("PING").await,
                Next::Closed => panic!("the watcher (which PINGs) was closed"),
            }
        }
    };
    within(Duration::from_secs(10), "idle test", async {
        tokio::join!(keep_alive, idle_close, watch)
    })
    .await;
    // Three seconds after the start, the client that PINGs is still connected.
    busy.send("PING alive").await;
    busy.expect("PONG alive", |l| {
        *l == ServerLine::Pong {
            word: Some("alive".into()),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_staying_over_the_rate_is_kicked() {
    let stack = Stack::start_with(|c| {
        c.rate_per_sec = 10;
        c.rate_burst = 10;
        c.rate_limit_kick = 50;
    })
    .await;
    let (mut flooder, _) = stack.login("flooder", "pw").await;
    let mut burst = Vec::new();
    for i in 0..300 {
        burst.extend_from_slice(format!("PING k{i}\n").as_bytes());
    }
    // The server may close while we are still writing.
    let _ = flooder.try_send_raw(&burst).await;
    let lines = flooder.expect_closed().await;
    let limited = lines
        .iter()
        .filter(|l| {
            matches!(
                l,
                ServerLine::Err {
                    code: ErrorCode::RateLimited,
                    ..
                }
            )
        })
        .count();
    assert!(
        // The 50th limited command in a row may get the close instead of an ERR.
        (49..=55).contains(&limited),
        "a client over the limit for rate_limit_kick (50) commands in a row is disconnected; \
         it got {limited} RATE_LIMITED before the close"
    );
    // Others are fine.
    let (mut calm, _) = stack.login("calm", "pw").await;
    calm.sync().await;
}

/// Every class of control character text may not hold (C0 but TAB, DEL, C1
/// with NEL, U+2028/2029, the bidi controls), inside `MSG` and `DM` text:
/// each is answered `ERR BAD_ARGS` carrying its id, and nothing reaches the
/// other member or storage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_with_a_control_character_is_refused_and_reaches_nobody() {
    let stack = Stack::start().await;
    let (mut alice, _) = stack.login("alice", "pw").await;
    let (mut bob, _) = stack.login("bob", "pw").await;
    alice.join("r").await;
    bob.join("r").await;
    bob.sync().await;
    alice.sync().await;

    // LF ends the line, so it cannot be inside one; a CR right before the
    // LF is part of the terminator, so CR is tested mid-text.
    let mut forbidden: Vec<char> = ('\u{0}'..='\u{1f}')
        .filter(|c| *c != '\t' && *c != '\n')
        .collect();
    forbidden.extend('\u{7f}'..='\u{9f}');
    forbidden.extend(['\u{2028}', '\u{2029}', '\u{61c}', '\u{200e}', '\u{200f}']);
    forbidden.extend('\u{202a}'..='\u{202e}');
    forbidden.extend('\u{2066}'..='\u{2069}');
    let mut batch = String::new();
    let mut ids = std::collections::BTreeSet::new();
    for (i, c) in forbidden.iter().enumerate() {
        batch.push_str(&format!("MSG id=m{i} r before{c}after\n"));
        batch.push_str(&format!("DM id=d{i} bob before{c}after\n"));
        ids.insert(format!("m{i}"));
        ids.insert(format!("d{i}"));
    }
    alice.send_raw(batch.as_bytes()).await;
    let mut refused = std::collections::BTreeSet::new();
    within(
        Duration::from_secs(30),
        "every control character refused",
        async {
            while refused.len() < ids.len() {
                match alice.recv().await {
                    ServerLine::Err {
                        code: ErrorCode::BadArgs,
                        detail,
                    } => {
                        let id = detail
                            .strip_prefix("id=")
                            .and_then(|d| d.split(' ').next())
                            .unwrap_or_else(|| panic!("ERR BAD_ARGS without its id: {detail:?}"));
                        assert!(refused.insert(id.to_string()), "{id} refused twice");
                    }
                    other => panic!("text with a control character answered {other}"),
                }
            }
        },
    )
    .await;
    assert_eq!(refused, ids);

    // Nothing reached bob, live or stored.
    let seen = bob.sync().await;
    assert!(
        !seen
            .iter()
            .any(|l| matches!(l, ServerLine::Msg { .. } | ServerLine::Dm { .. })),
        "bob got {seen:?}"
    );
    assert!(alice.history("r", 0, None).await.is_empty());
    drop(bob);
    let (mut bob, _) = stack.login("bob", "pw").await;
    let welcome = bob.sync().await;
    assert!(
        !welcome.iter().any(|l| matches!(l, ServerLine::Dm { .. })),
        "no DM waited for bob: {welcome:?}"
    );
}
