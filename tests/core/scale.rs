//! Many senders and many receivers: dense ordered seqs, fan-out to 1,000 clients.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use chat_protocol::ServerLine;
use futures::stream::{self, StreamExt};

use crate::common::{open_files_limit, within, Client, Next, Stack};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seqs_are_dense_and_ordered_under_concurrent_senders() {
    const SENDERS: usize = 20;
    const PER_SENDER: usize = 25;
    const TOTAL: u64 = (SENDERS * PER_SENDER) as u64;
    let stack = Stack::start().await;
    let (mut listener, _) = stack.guest("busy", "listener").await;
    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let (c, _) = stack.guest("busy", &format!("sender{s}")).await;
        senders.push(c);
    }
    listener.sync().await;

    let listen = tokio::spawn(async move {
        let mut got = Vec::new();
        while (got.len() as u64) < TOTAL {
            if let ServerLine::Msg {
                room,
                seq,
                sender,
                text,
                ..
            } = listener
                .expect("MSG busy", |l| matches!(l, ServerLine::Msg { .. }))
                .await
            {
                assert_eq!(room, "busy");
                got.push((seq, sender, text));
            }
        }
        (listener, got)
    });
    let mut tasks = Vec::new();
    for (s, mut c) in senders.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            for i in 0..PER_SENDER {
                c.send_msg("busy", &format!("{s}.{i}"), &format!("from {s} number {i}"))
                    .await;
            }
            let mut seqs = Vec::new();
            for i in 0..PER_SENDER {
                let cid = format!("{s}.{i}");
                let (seq, _) = c
                    .msg_answer(&cid)
                    .await
                    .unwrap_or_else(|e| panic!("MSG id={cid}: {e:?}"));
                seqs.push((seq, s, i));
            }
            // One sender's messages keep their order.
            assert!(
                seqs.windows(2).all(|w| w[0].0 < w[1].0),
                "sender {s}: seqs of pipelined messages increase: {seqs:?}"
            );
            seqs
        }));
    }
    let mut acks = Vec::new();
    for t in tasks {
        acks.extend(
            within(Duration::from_secs(60), "senders finish", t)
                .await
                .unwrap(),
        );
    }
    let unique: HashSet<u64> = acks.iter().map(|a| a.0).collect();
    assert_eq!(unique.len(), acks.len(), "acked seqs are unique");
    assert_eq!(
        unique,
        (1..=TOTAL).collect::<HashSet<u64>>(),
        "acked seqs are exactly 1..={TOTAL}"
    );

    let (mut listener, got) = within(Duration::from_secs(60), "listener receives all", listen)
        .await
        .unwrap();
    let seqs: Vec<u64> = got.iter().map(|g| g.0).collect();
    assert_eq!(
        seqs,
        (1..=TOTAL).collect::<Vec<u64>>(),
        "a member receives seqs 1..={TOTAL} in order, no gaps, no duplicates"
    );
    for (seq, s, i) in &acks {
        let (_, sender, text) = &got[*seq as usize - 1];
        assert_eq!(
            (sender.as_str(), text.as_str()),
            (
                format!("sender{s}").as_str(),
                format!("from {s} number {i}").as_str()
            ),
            "seq {seq} delivered with the acked message"
        );
    }
    let hist = listener.history("busy", 0, Some(1000)).await;
    assert_eq!(
        hist.iter()
            .map(|h| (h.0, h.2.clone(), h.3.clone()))
            .collect::<Vec<_>>(),
        got,
        "HISTORY equals what was delivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_clients_in_one_room_receive_every_message() {
    const CLIENTS: usize = 1000;
    const SENDERS: usize = 5;
    const PER_SENDER: usize = 4;
    const TOTAL: u64 = (SENDERS * PER_SENDER) as u64;
    // Each client costs two descriptors in this process (both ends).
    let limit = open_files_limit().expect("read the open files limit from /proc/self/limits");
    assert!(
        limit >= 2 * CLIENTS as u64 + 500,
        "the open files limit ({limit}) is too low for {CLIENTS} clients; raise `ulimit -n`"
    );
    let started = Instant::now();
    let stack = Stack::start_with(|c| c.send_queue_lines = 4096).await;
    let addr = stack.addr;

    let clients: Vec<Client> = within(
        Duration::from_secs(60),
        "1000 guests join",
        stream::iter(0..CLIENTS)
            .map(|i| async move { Client::guest(addr, "crowd", &format!("g{i}")).await.0 })
            .buffer_unordered(50)
            .collect(),
    )
    .await;
    assert_eq!(clients.len(), CLIENTS);
    let joined_after = started.elapsed();

    let mut receivers = Vec::new();
    for mut c in clients {
        receivers.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            let end = Instant::now() + Duration::from_secs(45);
            while (seqs.len() as u64) < TOTAL {
                match c.next(end.saturating_duration_since(Instant::now())).await {
                    Next::Line(ServerLine::Msg { seq, .. }) => seqs.push(seq),
                    Next::Line(_) => {}
                    Next::Closed => {
                        panic!("{}: closed after {} MSG: {seqs:?}", c.label, seqs.len())
                    }
                    Next::Timeout => {
                        panic!("{}: only {} of {TOTAL} MSG: {seqs:?}", c.label, seqs.len())
                    }
                }
            }
            (c.label.clone(), seqs)
        }));
    }

    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let (c, _) = Client::guest(addr, "crowd", &format!("poster{s}")).await;
        senders.push(c);
    }
    let mut tasks = Vec::new();
    for (s, mut c) in senders.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            for i in 0..PER_SENDER {
                c.msg(
                    "crowd",
                    &format!("p{s}-{i}"),
                    &format!("hello crowd {s}/{i}"),
                )
                .await;
            }
            c
        }));
    }
    for t in tasks {
        within(Duration::from_secs(30), "posters finish", t)
            .await
            .unwrap();
    }
    for r in receivers {
        let (label, seqs) = within(Duration::from_secs(60), "receivers finish", r)
            .await
            .unwrap();
        assert_eq!(
            seqs,
            (1..=TOTAL).collect::<Vec<u64>>(),
            "{label} receives all {TOTAL} messages in seq order"
        );
    }
    let total = started.elapsed();
    assert!(
        total < Duration::from_secs(60),
        "1000 clients took {total:?} (joins {joined_after:?}); expected well under a minute"
    );
}

/// A member of 1,000 rooms (the most allowed) logs in again and again and
/// reads at full speed: every login's welcome (OK LOGIN, 1,000 `OK JOIN`, the
/// `JOIN` events its own return causes) arrives whole, never `BYE slow`,
/// with the default send queue of 1,024 lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_of_1000_rooms_is_never_slow_at_login() {
    const ROOMS: usize = 1000;
    const LOGINS: usize = 8;
    let stack = Stack::start().await;
    let (mut c, _) = stack.login("many", "pw").await;
    let mut joins = String::new();
    for r in 0..ROOMS {
        joins.push_str(&format!("JOIN room{r}\n"));
    }
    c.send_raw(joins.as_bytes()).await;
    let mut joined = 0;
    within(Duration::from_secs(120), "1000 JOINs answered", async {
        while joined < ROOMS {
            if let ServerLine::OkJoin { .. } = c.recv().await {
                joined += 1;
            }
        }
    })
    .await;
    c.send("QUIT").await;
    c.expect_closed().await;

    for login in 0..LOGINS {
        let (mut c, _) = stack.login("many", "pw").await;
        c.send("PING done").await;
        let mut ok_joins = HashSet::new();
        let lines = within(Duration::from_secs(60), "the welcome", async {
            let mut n = 0usize;
            loop {
                match c.next(Duration::from_secs(30)).await {
                    Next::Line(ServerLine::OkJoin { room, .. }) => {
                        ok_joins.insert(room);
                    }
                    Next::Line(ServerLine::Pong { .. }) => return n,
                    Next::Line(ServerLine::Bye { reason }) => {
                        panic!("login {login}: BYE {reason} after {n} lines")
                    }
                    Next::Line(_) => {}
                    Next::Closed => panic!("login {login}: closed after {n} lines"),
                    Next::Timeout => panic!("login {login}: stalled after {n} lines"),
                }
                n += 1;
            }
        })
        .await;
        assert_eq!(ok_joins.len(), ROOMS, "login {login}: an OK JOIN per room");
        assert!(lines >= ROOMS, "login {login}: {lines} lines");
        c.send("QUIT").await;
        c.expect_closed().await;
    }
    assert_eq!(
        crate::common::metric(stack.admin_addr, "chat_slow_consumer_disconnects_total").await,
        0.0
    );
}
