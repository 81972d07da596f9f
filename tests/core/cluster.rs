//! Rooms and DMs across chat servers: three `chat server` processes in one
//! cluster behind two proxies, users placed on every server, and the faults
//! of issue #4: `kill -9` of a room's owner in the middle of traffic, a
//! drained server, a fourth server joining.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chat_protocol::{ErrorCode, ServerLine};
use tokio::net::TcpStream;

use crate::common::cluster::Cluster;
use crate::common::{within, Client, Next};

/// How long a user whose server died may take to be back (the bound).
const BACK_WITHIN: Duration = Duration::from_secs(5);

/// One user of a traffic scenario: sends numbered messages to one room,
/// resends what was not acknowledged (same id) after errors and reconnects,
/// and records every live `MSG` per connection.
struct Member {
    user: String,
    token: String,
    proxies: Vec<SocketAddr>,
    client: Client,
    room: String,
    /// (seq, sender, text) of live MSG lines, one list per connection.
    live: Vec<Vec<(u64, String, String)>>,
    /// (seq, text) of acknowledged messages.
    acked: Vec<(u64, String)>,
    /// How long each reconnect took, from losing the connection to `OK RESUME`.
    reconnects: Vec<Duration>,
}

enum Answer {
    Acked(u64),
    Retry,
    Lost,
}

impl Member {
    async fn join(proxies: &[SocketAddr], i: usize, user: &str, room: &str) -> Member {
        let proxy = proxies[i % proxies.len()];
        let (mut client, token) = Client::login(proxy, user, "pw").await;
        client.join(room).await;
        Member {
            user: user.to_string(),
            token,
            proxies: proxies.to_vec(),
            client,
            room: room.to_string(),
            live: vec![Vec::new()],
            acked: Vec::new(),
            reconnects: Vec::new(),
        }
    }

    fn record(&mut self, line: &ServerLine) {
        if let ServerLine::Msg {
            room,
            seq,
            sender,
            text,
            ..
        } = line
        {
            if *room == self.room {
                let conn = self.live.last_mut().expect("a connection");
                conn.push((*seq, sender.clone(), text.clone()));
            }
        }
    }

    /// Back through any proxy with `RESUME` (bounded).
    async fn reconnect(&mut self) {
        let lost = Instant::now();
        let end = lost + Duration::from_secs(20);
        let mut k = 0;
        loop {
            assert!(
                Instant::now() < end,
                "{}: could not reconnect in 20 s",
                self.user
            );
            let addr = self.proxies[k % self.proxies.len()];
            k += 1;
            let Ok(Ok(stream)) =
                tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await
            else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let mut c = Client::from_stream(stream, &self.user);
            if c.try_send_raw(format!("RESUME {}\n", self.token).as_bytes())
                .await
                .is_err()
            {
                continue;
            }
            match c.next(Duration::from_secs(5)).await {
                Next::Line(ServerLine::OkResume { .. }) => {
                    self.client = c;
                    self.live.push(Vec::new());
                    self.reconnects.push(lost.elapsed());
                    return;
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    async fn answer(&mut self, cid: &str) -> Answer {
        let want = format!("id={cid}");
        loop {
            match self.client.next(Duration::from_secs(10)).await {
                Next::Line(ServerLine::OkMsg {
                    cid: Some(c), seq, ..
                }) if c == cid => return Answer::Acked(seq),
                Next::Line(ServerLine::Err { code, detail })
                    if detail == want || detail.starts_with(&format!("{want} ")) =>
                {
                    assert_eq!(code, ErrorCode::Unavailable, "{}: {detail}", self.user);
                    return Answer::Retry;
                }
                Next::Line(ServerLine::Reconnect { .. } | ServerLine::Bye { .. }) => {
                    return Answer::Lost
                }
                Next::Line(l) => self.record(&l),
                Next::Closed | Next::Timeout => return Answer::Lost,
            }
        }
    }

    /// Sends `count` messages, each until acknowledged.
    async fn chat(&mut self, count: usize, pause: Duration) {
        for k in 0..count {
            let cid = format!("{}-{k}", self.user);
            let text = format!("{}-{k}", self.user);
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                assert!(
                    Instant::now() < deadline,
                    "{}: {cid} never acknowledged",
                    self.user
                );
                let line = format!("MSG id={cid} {} {text}\n", self.room);
                let answer = match self.client.try_send_raw(line.as_bytes()).await {
                    Ok(()) => self.answer(&cid).await,
                    Err(_) => Answer::Lost,
                };
                match answer {
                    Answer::Acked(seq) => {
                        self.acked.push((seq, text));
                        break;
                    }
                    Answer::Retry => tokio::time::sleep(Duration::from_millis(50)).await,
                    Answer::Lost => self.reconnect().await,
                }
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// Takes in what is still on the way (a PING round trip).
    async fn settle(&mut self) {
        for l in self.client.sync().await {
            self.record(&l);
        }
    }
}

/// Checks a room's stored history against what was sent, acked and seen:
/// seq dense and unique, every acked message stored once at its seq, nothing
/// stored that was not sent, live lines true to storage and in seq order per
/// connection. Returns (stored, delivered live in total).
async fn check_room(members: &mut [Member], room: &str, sent: &HashSet<String>) -> (usize, usize) {
    let history = members[0].client.history(room, 0, Some(1000)).await;
    let mut by_seq = BTreeMap::new();
    let mut texts = HashSet::new();
    for (i, (seq, _, sender, text)) in history.iter().enumerate() {
        assert_eq!(*seq, i as u64 + 1, "seq is dense: {history:?}");
        assert!(texts.insert(text.clone()), "{text} stored twice");
        assert!(sent.contains(text), "{text} stored but never sent");
        assert!(
            text.starts_with(&format!("{sender}-")),
            "{text} stored under {sender}"
        );
        by_seq.insert(*seq, text.clone());
    }
    let mut live_total = 0;
    for m in members.iter() {
        for (seq, text) in &m.acked {
            assert_eq!(
                by_seq.get(seq),
                Some(text),
                "{}: acked {text} at seq {seq}, storage disagrees",
                m.user
            );
        }
        for conn in &m.live {
            for w in conn.windows(2) {
                assert!(
                    w[0].0 < w[1].0,
                    "{}: MSG {} after {} on one connection",
                    m.user,
                    w[1].0,
                    w[0].0
                );
            }
            for (seq, _, text) in conn {
                assert_eq!(
                    by_seq.get(seq),
                    Some(text),
                    "{}: live MSG {seq} {text} not in storage",
                    m.user
                );
            }
            live_total += conn.len();
        }
    }
    (history.len(), live_total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_spans_servers_in_seq_order() {
    let cluster = Cluster::start(101, 3, 3, 2).await;
    let proxies = cluster.proxy_addrs();
    let mut members = Vec::new();
    for s in 0..3 {
        for n in 0..2 {
            let user = cluster.user_on(s, "span", n);
            members.push(Member::join(&proxies, members.len(), &user, "lobby").await);
        }
    }
    // Presence crosses servers: everybody present, seen from every server.
    // (Presence is announced asynchronously; a link that flapped under load
    // re-announces it, so allow a bounded wait.)
    for m in members.iter_mut() {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            m.client.send("WHO lobby").await;
            let ok = m
                .client
                .expect("OK WHO", |l| matches!(l, ServerLine::OkWho { .. }))
                .await;
            if matches!(ok, ServerLine::OkWho { count: 6, .. }) {
                break;
            }
            assert!(
                Instant::now() < end,
                "{}: {ok}; logs:\n{}\n{}\n{}",
                m.user,
                cluster.log(0),
                cluster.log(1),
                cluster.log(2)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut tasks = Vec::new();
    for mut m in members {
        tasks.push(tokio::spawn(async move {
            m.chat(10, Duration::from_millis(5)).await;
            m
        }));
    }
    let mut members = Vec::new();
    for t in tasks {
        members.push(within(Duration::from_secs(60), "traffic", t).await.unwrap());
    }
    for m in members.iter_mut() {
        m.settle().await;
        assert!(
            m.reconnects.is_empty(),
            "{} reconnected without a fault",
            m.user
        );
    }
    let sent: HashSet<String> = members
        .iter()
        .flat_map(|m| m.acked.iter().map(|(_, t)| t.clone()))
        .collect();
    let (stored, _) = check_room(&mut members, "lobby", &sent).await;
    assert_eq!(stored, 60);
    // Without faults every member saw every other member's message live.
    for m in &members {
        let live: HashSet<&str> = m.live[0].iter().map(|(_, _, t)| t.as_str()).collect();
        let others = sent
            .iter()
            .filter(|t| !t.starts_with(&format!("{}-", m.user)));
        for t in others {
            assert!(live.contains(t.as_str()), "{} missed {t} live", m.user);
        }
    }

    // A PART on one server is heard on the others.
    let (leaver, rest) = members.split_first_mut().unwrap();
    leaver.client.send("PART lobby").await;
    let name = leaver.user.clone();
    for m in rest.iter_mut() {
        m.client
            .expect(
                "the PART",
                |l| matches!(l, ServerLine::Parted { user, .. } if *user == name),
            )
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dm_crosses_servers() {
    let cluster = Cluster::start(102, 3, 3, 2).await;
    let proxies = cluster.proxy_addrs();
    let alice = cluster.user_on(0, "dma", 0);
    let bob = cluster.user_on(1, "dmb", 0);
    let (mut a, _) = Client::login(proxies[0], &alice, "pw").await;
    let (mut b, _) = Client::login(proxies[1], &bob, "pw").await;
    a.send(&format!("DM id=d1 {bob} over the wire")).await;
    let (id, _) = a.msg_answer("d1").await.expect("OK DM");
    let dm = b
        .expect("the DM", |l| matches!(l, ServerLine::Dm { .. }))
        .await;
    assert!(
        matches!(&dm, ServerLine::Dm { id: i, sender, text, .. }
            if *i as u64 == id && *sender == alice && text == "over the wire"),
        "{dm}"
    );
    // Offline: pending, delivered when bob is back (on his server again).
    b.send("QUIT").await;
    b.expect_closed().await;
    a.send(&format!("DM id=d2 {bob} while you were out")).await;
    a.msg_answer("d2").await.expect("OK DM");
    let (mut b, _) = Client::login(proxies[0], &bob, "pw").await;
    b.expect(
        "the pending DM",
        |l| matches!(l, ServerLine::Dm { text, .. } if text == "while you were out"),
    )
    .await;
}

/// Six members, two per server, in one room whose owner suffers `fault` while
/// they all send; then the history checks and the reconnect bound.
async fn room_survives(net: u8, fault: impl AsyncFnOnce(&mut Cluster, usize)) {
    let mut cluster = Cluster::start(net, 3, 3, 2).await;
    let proxies = cluster.proxy_addrs();
    let ring = cluster.ring();
    let owner_id = ring.pick(b"busy").unwrap().to_string();
    let owner = cluster
        .servers
        .iter()
        .position(|s| s.id() == owner_id)
        .unwrap();
    let mut members = Vec::new();
    for s in 0..3 {
        for n in 0..2 {
            let user = cluster.user_on(s, "busy", n);
            members.push(Member::join(&proxies, members.len(), &user, "busy").await);
        }
    }
    let on_owner: Vec<String> = members
        .iter()
        .filter(|m| ring.pick(m.user.as_bytes()) == Some(owner_id.as_str()))
        .map(|m| m.user.clone())
        .collect();
    let mut tasks = Vec::new();
    for mut m in members {
        tasks.push(tokio::spawn(async move {
            m.chat(40, Duration::from_millis(15)).await;
            m
        }));
    }
    tokio::time::sleep(Duration::from_millis(250)).await;
    fault(&mut cluster, owner).await;
    let mut members = Vec::new();
    for t in tasks {
        members.push(within(Duration::from_secs(90), "traffic", t).await.unwrap());
    }
    for m in members.iter_mut() {
        m.settle().await;
    }
    for m in &members {
        if on_owner.contains(&m.user) {
            assert!(
                !m.reconnects.is_empty(),
                "{} was on the failed server",
                m.user
            );
        }
        for d in &m.reconnects {
            assert!(*d < BACK_WITHIN, "{} took {d:?} to be back", m.user);
        }
    }
    let sent: HashSet<String> = members
        .iter()
        .flat_map(|m| (0..40).map(move |k| format!("{}-{k}", m.user)))
        .collect();
    let (stored, live) = check_room(&mut members, "busy", &sent).await;
    let back: Vec<Duration> = members.iter().flat_map(|m| m.reconnects.clone()).collect();
    eprintln!(
        "stored {stored}, delivered live {live} of {}, reconnects {back:?}",
        stored * 5
    );
    // Every message was acknowledged in the end, hence stored exactly once.
    assert_eq!(stored, 240);
    assert!(live > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_room_owner_loses_nothing() {
    room_survives(103, async |cluster: &mut Cluster, owner: usize| {
        cluster.kill(owner)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_room_owner_loses_nothing() {
    room_survives(106, async |cluster: &mut Cluster, owner: usize| {
        cluster.terminate(owner).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_server_moves_few_users() {
    let mut cluster = Cluster::start(104, 4, 3, 2).await;
    let proxies = cluster.proxy_addrs();
    const USERS: usize = 300;
    let mut clients = Vec::new();
    for i in 0..USERS {
        let user = format!("mover{i}");
        let (c, _) = Client::login(proxies[i % 2], &user, "pw").await;
        clients.push((user, c));
    }
    cluster.start_server(3).await;
    cluster.wait_converged().await;
    let ring4 = cluster.ring();
    let new_id = cluster.servers[3].id();
    let expected: HashSet<String> = clients
        .iter()
        .map(|(u, _)| u.clone())
        .filter(|u| ring4.pick(u.as_bytes()) == Some(new_id.as_str()))
        .collect();
    // Who was told to move: RECONNECT, then closed.
    let mut checks = Vec::new();
    for (user, mut c) in clients {
        checks.push(tokio::spawn(async move {
            let moved = match c.next(Duration::from_secs(2)).await {
                Next::Line(ServerLine::Reconnect { .. }) => true,
                Next::Timeout => false,
                other => panic!("{user}: unexpected {other:?}"),
            };
            (user, moved)
        }));
    }
    let mut moved = HashSet::new();
    for c in checks {
        let (user, m) = c.await.unwrap();
        if m {
            moved.insert(user);
        }
    }
    assert_eq!(
        moved, expected,
        "exactly the users the new ring puts on the new server move"
    );
    let bound = 1.1 / 4.0 * USERS as f64;
    assert!(
        (moved.len() as f64) <= bound,
        "{} of {USERS} users moved, more than 1.1/N = {bound}",
        moved.len()
    );
    assert!(!moved.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dm_finds_a_user_connected_off_their_hash() {
    // Bounded loads (or a proxy with another view of the ring) can put a
    // user on a server other than their hash owner; the owner forwards.
    let cluster = Cluster::start(105, 3, 3, 1).await;
    let bob = cluster.user_on(0, "offb", 0);
    let alice = cluster.user_on(1, "offa", 0);
    let (mut b, _) = Client::login(cluster.servers[2].client, &bob, "pw").await;
    let (mut a, _) = Client::login(cluster.servers[1].client, &alice, "pw").await;
    a.send(&format!("DM id=x1 {bob} found you")).await;
    a.msg_answer("x1").await.expect("OK DM");
    b.expect(
        "the DM through bob's hash owner",
        |l| matches!(l, ServerLine::Dm { text, .. } if text == "found you"),
    )
    .await;
}

/// A PEER handshake is attacker input on the client port: refused ones are
/// counted by reason and logged at most about once a second, the claimed id
/// with its control characters escaped, so ESC sequences and CRs never reach
/// the log as they were sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_peer_handshakes_are_counted_and_logged_escaped_and_rate_limited() {
    const TRIES: usize = 40;
    let cluster = Cluster::start(106, 2, 2, 1).await;
    let target = cluster.servers[0].client;
    let started = Instant::now();
    for i in 0..TRIES {
        let mut c = Client::from_stream(
            TcpStream::connect(target).await.expect("connect"),
            &format!("forger{i}"),
        );
        c.send_raw(b"PEER \x1b[2J\x1b[31mfake\rWARN\x07forged wrong-secret-0123456789\n")
            .await;
        let lines = c.expect_closed().await;
        assert!(
            matches!(
                lines.as_slice(),
                [ServerLine::Err {
                    code: ErrorCode::AuthFailed,
                    ..
                }]
            ),
            "a wrong PEER secret gets ERR AUTH_FAILED, got {lines:?}"
        );
    }
    let elapsed = started.elapsed();
    let admin = cluster.servers[0].admin;
    let body = crate::common::http_get(admin, "/metrics").await.1;
    let auth = crate::common::metric(admin, "chat_cluster_handshake_failures_total").await;
    assert_eq!(auth, TRIES as f64, "every refusal counted:\n{body}");
    assert!(
        body.contains("chat_cluster_handshake_failures_total{reason=\"auth\"} 40"),
        "counted as auth failures:\n{body}"
    );

    let log = cluster.log_bytes(0);
    let text = String::from_utf8_lossy(&log);
    let refusals: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("refused a chat server link"))
        .collect();
    assert!(!refusals.is_empty(), "a refusal is logged:\n{text}");
    let allowed = elapsed.as_secs() as usize + 2;
    assert!(
        refusals.len() <= allowed,
        "{} refusal lines in {elapsed:?} (at most about one a second):\n{}",
        refusals.len(),
        refusals.join("\n")
    );
    assert!(
        !log.iter().any(|&b| b == 0x1b || b == b'\r'),
        "raw ESC or CR bytes in the server's log:\n{text}"
    );
    assert!(
        refusals[0].contains("\\u{001B}[2J"),
        "the claimed id is quoted escaped: {}",
        refusals[0]
    );
}
