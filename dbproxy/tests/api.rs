//! End to end: `run` on 127.0.0.1:0 with a temp SQLite file, driven by the
//! real `DbClient`.

mod common;

use std::time::{Duration, Instant};

use chat_dbproxy::Config;
use chat_storage_api::{AppendItem, DmItem, ErrorKind};
use chat_storage_client::DbClient;
use common::{raw_request, Proxy};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

async fn raw_get(base: &str, path: &str) -> std::io::Result<(u16, String)> {
    raw_request(base, "GET", path, b"").await
}

fn item(room: &str, sender: &str, cid: Option<&str>, body: &str) -> AppendItem {
    AppendItem {
        room: room.into(),
        sender: sender.into(),
        client_id: cid.map(Into::into),
        body: body.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn login_registers_then_checks_password() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proxy::start(dir.path(), Config::default()).await;
    let c = &p.client;
    let id = c.login("alice", "s3cret", None).await.unwrap();
    assert_eq!(id.user, "alice");
    assert!(!id.guest);
    assert!(id.token.starts_with("alice.") && id.token.len() == "alice.".len() + 32);
    let again = c.login("alice", "s3cret", None).await.unwrap();
    assert_ne!(again.token, id.token);
    let e = c.login("alice", "wrong", None).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::AuthFailed);
    // A registered name is never a guest name.
    assert_eq!(
        c.guest("alice").await.unwrap_err().kind,
        ErrorKind::NameTaken
    );
    // Resume works and refreshes; garbage tokens do not.
    let r = c.resume(&id.token).await.unwrap();
    assert_eq!((r.user.as_str(), r.guest), ("alice", false));
    assert_eq!(
        c.resume("alice.00000000000000000000000000000000")
            .await
            .unwrap_err()
            .kind,
        ErrorKind::TokenInvalid
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn guest_names_and_expiry() {
    let dir = tempfile::tempdir().unwrap();
    // Token lifetime is the dbproxy's own setting, never the caller's.
    let config = Config {
        token_idle_ttl_secs: Duration::from_secs(1),
        ..Config::default()
    };
    let p = Proxy::start(dir.path(), config).await;
    let c = &p.client;
    let g = c.guest("dave").await.unwrap();
    assert!(g.guest);
    assert_eq!(
        c.guest("dave").await.unwrap_err().kind,
        ErrorKind::NameTaken
    );
    // A live guest's name cannot be registered either.
    assert_eq!(
        c.login("dave", "pw", None).await.unwrap_err().kind,
        ErrorKind::NameTaken
    );
    c.join("lobby", "dave").await.unwrap();
    assert_eq!(c.user_rooms("dave", None).await.unwrap().rooms.len(), 1);

    // Unused for the ttl, the token expires and the name is free again
    // (refused attempts do not use the token).
    let deadline = Instant::now() + Duration::from_secs(10);
    let g2 = loop {
        match c.guest("dave").await {
            Ok(g2) => break g2,
            Err(e) => assert_eq!(e.kind, ErrorKind::NameTaken),
        }
        assert!(Instant::now() < deadline, "guest never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_ne!(g2.token, g.token);
    // The old guest's token and rooms are gone.
    assert_eq!(
        c.resume(&g.token).await.unwrap_err().kind,
        ErrorKind::TokenInvalid
    );
    assert!(c.user_rooms("dave", None).await.unwrap().rooms.is_empty());

    // Touched (as the chat servers do for open connections), a token
    // outlives the ttl.
    let until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < until {
        c.touch(vec![g2.token.clone()]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.resume(&g2.token).await.unwrap();

    // Left alone, it expires: an expired guest's name can be registered.
    let deadline = Instant::now() + Duration::from_secs(10);
    let reg = loop {
        match c.login("dave", "pw", None).await {
            Ok(id) => break id,
            Err(e) => assert_eq!(e.kind, ErrorKind::NameTaken),
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!reg.guest);
    assert_eq!(
        c.resume(&g2.token).await.unwrap_err().kind,
        ErrorKind::TokenInvalid
    );
    assert_eq!(
        c.login("dave", "other", None).await.unwrap_err().kind,
        ErrorKind::AuthFailed
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rooms_join_part() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proxy::start(dir.path(), Config::default()).await;
    let c = &p.client;
    c.guest("bob").await.unwrap();
    c.guest("carol").await.unwrap();
    assert_eq!(c.join("zeta", "bob").await.unwrap().last_seq, 0);
    c.join("alpha", "bob").await.unwrap();
    c.join("alpha", "carol").await.unwrap();
    c.join("alpha", "carol").await.unwrap(); // harmless twice
    assert_eq!(
        c.join("alpha", "nobody").await.unwrap_err().kind,
        ErrorKind::NoSuchUser
    );

    let rooms = c.rooms(100, None).await.unwrap().rooms;
    let names: Vec<_> = rooms.iter().map(|r| (r.room.as_str(), r.members)).collect();
    assert_eq!(names, [("alpha", 2), ("zeta", 1)]);
    assert_eq!(c.rooms(1, None).await.unwrap().rooms.len(), 1);
    let mine: Vec<_> = c
        .user_rooms("bob", None)
        .await
        .unwrap()
        .rooms
        .into_iter()
        .map(|r| r.room)
        .collect();
    assert_eq!(mine, ["alpha", "zeta"]);

    c.part("alpha", "carol").await.unwrap();
    c.part("alpha", "carol").await.unwrap(); // not a member: fine
    c.part("nowhere", "carol").await.unwrap();
    assert_eq!(c.room_info("alpha", None).await.unwrap().members, 1);
    assert_eq!(
        c.room_info("nope", None).await.unwrap_err().kind,
        ErrorKind::NoSuchRoom
    );
    assert_eq!(
        c.history("nope", 0, 10, None).await.unwrap_err().kind,
        ErrorKind::NoSuchRoom
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_get_dense_seqs() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proxy::start(dir.path(), Config::default()).await;
    let c = &p.client;
    c.guest("w").await.unwrap();
    c.join("busy", "w").await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..20 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..50 {
                let cid = format!("{t}-{i}");
                let r = c
                    .append(vec![item("busy", "w", Some(&cid), &cid)])
                    .await
                    .unwrap();
                let a = r.results[0].clone().unwrap();
                assert!(!a.duplicate);
                seqs.push(a.seq);
            }
            // Per sender, later appends get later seqs.
            assert!(seqs.windows(2).all(|w| w[0] < w[1]));
            seqs
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    assert_eq!(all, (1..=1000).collect::<Vec<u64>>());

    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let page = c.history("busy", after, 1000, None).await.unwrap().messages;
        if page.is_empty() {
            break;
        }
        after = page.last().unwrap().seq;
        seen.extend(page);
    }
    assert_eq!(seen.len(), 1000);
    assert!(seen
        .iter()
        .enumerate()
        .all(|(i, m)| m.seq == i as u64 + 1 && m.sender == "w"));
    assert_eq!(c.room_info("busy", None).await.unwrap().last_seq, 1000);
    // Limit is clamped to 1..=1000.
    assert_eq!(
        c.history("busy", 0, 0, None).await.unwrap().messages.len(),
        1
    );
    assert_eq!(
        c.history("busy", 0, 5000, None)
            .await
            .unwrap()
            .messages
            .len(),
        1000
    );

    let (_, metrics) = raw_get(&p.admin, "/metrics").await.unwrap();
    // The API port, which the chat servers reach, has no metrics.
    assert_eq!(raw_get(&p.base, "/metrics").await.unwrap().0, 404);
    assert!(
        metrics.contains("chat_dbproxy_messages_stored_total 1000"),
        "{metrics}"
    );
    assert!(metrics.contains("chat_dbproxy_batch_items_count"));
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn append_idempotency_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proxy::start(dir.path(), Config::default()).await;
    let c = &p.client;
    c.guest("a").await.unwrap();
    c.join("r1", "a").await.unwrap();
    c.join("r2", "a").await.unwrap();
    let r = c
        .append(vec![
            item("r1", "a", Some("x"), "one"),
            item("r2", "a", None, "other room"),
            item("r1", "a", Some("x"), "dup in batch"),
            item("nope", "a", None, "no room"),
            item("r1", "ghost", None, "no user"),
            item("r1", "a", None, "two"),
        ])
        .await
        .unwrap();
    let first = r.results[0].clone().unwrap();
    assert_eq!((first.seq, first.duplicate), (1, false));
    assert_eq!(r.results[1].clone().unwrap().seq, 1);
    let dup = r.results[2].clone().unwrap();
    assert_eq!((dup.seq, dup.ts, dup.duplicate), (1, first.ts, true));
    assert_eq!(
        r.results[3].clone().unwrap_err().kind,
        ErrorKind::NoSuchRoom
    );
    assert_eq!(
        r.results[4].clone().unwrap_err().kind,
        ErrorKind::NoSuchUser
    );
    assert_eq!(r.results[5].clone().unwrap().seq, 2);

    // A resend in a later request returns the original and stores nothing.
    let again = c
        .append(vec![item("r1", "a", Some("x"), "resent")])
        .await
        .unwrap();
    assert_eq!(again.results[0].clone().unwrap(), dup);
    let h = c.history("r1", 0, 100, None).await.unwrap().messages;
    let bodies: Vec<_> = h.iter().map(|m| m.body.as_str()).collect();
    assert_eq!(bodies, ["one", "two"]);
    assert_eq!(h[0].ts, first.ts);
    assert_eq!(c.room_info("r1", None).await.unwrap().last_seq, 2);
    assert!(c.append(vec![]).await.unwrap().results.is_empty());
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn direct_messages() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proxy::start(dir.path(), Config::default()).await;
    let c = &p.client;
    c.guest("s").await.unwrap();
    c.guest("r").await.unwrap();
    let dm = |to: &str, cid: Option<&str>, body: &str| DmItem {
        sender: "s".into(),
        recipient: to.into(),
        client_id: cid.map(Into::into),
        body: body.into(),
    };
    let sent = c
        .send_dms(vec![
            dm("r", Some("d1"), "hi"),
            dm("ghost", None, "x"),
            dm("r", None, "2nd"),
        ])
        .await
        .unwrap();
    let d1 = sent.results[0].clone().unwrap();
    assert!(!d1.duplicate);
    assert_eq!(
        sent.results[1].clone().unwrap_err().kind,
        ErrorKind::NoSuchUser
    );
    let d2 = sent.results[2].clone().unwrap();
    assert!(d2.id > d1.id);
    let again = c.send_dms(vec![dm("r", Some("d1"), "hi")]).await.unwrap();
    let dup = again.results[0].clone().unwrap();
    assert_eq!((dup.id, dup.ts, dup.duplicate), (d1.id, d1.ts, true));

    let pending = c.pending_dms("r", 100).await.unwrap().dms;
    let got: Vec<_> = pending
        .iter()
        .map(|d| (d.id, d.sender.as_str(), d.body.as_str()))
        .collect();
    assert_eq!(got, [(d1.id, "s", "hi"), (d2.id, "s", "2nd")]);
    assert_eq!(pending[0].recipient, "r");
    c.mark_received(vec![d1.id]).await.unwrap();
    let pending = c.pending_dms("r", 100).await.unwrap().dms;
    assert_eq!(pending.iter().map(|d| d.id).collect::<Vec<_>>(), [d2.id]);
    c.mark_received(vec![d2.id, 999_999]).await.unwrap();
    assert!(c.pending_dms("r", 100).await.unwrap().dms.is_empty());
    assert!(c.pending_dms("nobody", 100).await.unwrap().dms.is_empty());
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proxy::start(dir.path(), Config::default()).await;
    let token = p.client.login("kim", "pw", None).await.unwrap().token;
    p.client.join("keep", "kim").await.unwrap();
    p.client
        .append(vec![item("keep", "kim", Some("k1"), "persisted")])
        .await
        .unwrap();
    p.stop().await;

    let p = Proxy::start(dir.path(), Config::default()).await;
    let c = &p.client;
    assert_eq!(c.resume(&token).await.unwrap().user, "kim");
    assert_eq!(
        c.login("kim", "bad", None).await.unwrap_err().kind,
        ErrorKind::AuthFailed
    );
    assert_eq!(
        c.user_rooms("kim", None).await.unwrap().rooms[0].room,
        "keep"
    );
    let h = c.history("keep", 0, 10, None).await.unwrap().messages;
    assert_eq!((h.len(), h[0].body.as_str()), (1, "persisted"));
    let dup = c
        .append(vec![item("keep", "kim", Some("k1"), "again")])
        .await
        .unwrap();
    assert!(dup.results[0].clone().unwrap().duplicate);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_edges() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        max_body_bytes: 2048,
        ..Config::default()
    };
    let p = Proxy::start(dir.path(), config).await;
    let c = &p.client;
    c.guest("big").await.unwrap();
    let e = c
        .append(vec![item("x", "big", None, &"y".repeat(4096))])
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::BadRequest);
    let (status, _) = raw_request(&p.base, "POST", "/v1/append", &vec![b' '; 4096])
        .await
        .unwrap();
    assert_eq!(status, 413);
    let (status, body) = raw_request(&p.base, "POST", "/v1/append", b"{nope")
        .await
        .unwrap();
    assert_eq!(status, 400);
    assert!(body.contains("bad_request"));
    assert_eq!(raw_get(&p.base, "/v1/nothing").await.unwrap().0, 404);
    assert_eq!(raw_get(&p.base, "/healthz").await.unwrap().0, 200);
    assert_eq!(raw_get(&p.base, "/v1/rooms").await.unwrap().0, 405);
    let base = p.base.clone();
    p.stop().await;
    // Once stopped, the client reports the store as unavailable (retryable).
    let e = DbClient::new(&base).rooms(10, None).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unavailable);
}

#[tokio::test]
async fn invalid_config_is_refused() {
    let listeners = chat_dbproxy::Listeners::bind("127.0.0.1:0", "127.0.0.1:0")
        .await
        .unwrap();
    let config = Config {
        write_queue: 0,
        ..Config::default()
    };
    let e = chat_dbproxy::run(
        listeners,
        config,
        prometheus::Registry::new(),
        CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("write_queue"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_first_logins_agree() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proxy::start(dir.path(), Config::default()).await;
    let (a, b) = tokio::join!(
        p.client.login("twin", "pw", None),
        p.client.login("twin", "pw", None)
    );
    assert!(a.is_ok() && b.is_ok(), "{a:?} {b:?}");
    let (a, b) = tokio::join!(
        p.client.login("rival", "one", None),
        p.client.login("rival", "two", None)
    );
    let kinds = [
        a.map(|_| ()).map_err(|e| e.kind),
        b.map(|_| ()).map_err(|e| e.kind),
    ];
    assert!(kinds.contains(&Ok(())), "{kinds:?}");
    assert!(kinds.contains(&Err(ErrorKind::AuthFailed)), "{kinds:?}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_keeps_every_acked_write() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proxy::start(dir.path(), Config::default()).await;
    p.client.guest("w").await.unwrap();
    p.client.join("drain", "w").await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..10 {
        let c = p.client.clone();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..200 {
                let body = format!("{t}-{i}");
                match c.append(vec![item("drain", "w", Some(&body), &body)]).await {
                    Ok(r) => acked.push((r.results[0].clone().unwrap().seq, body)),
                    Err(e) => {
                        assert!(e.kind.retryable(), "{e:?}");
                        break;
                    }
                }
            }
            acked
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while p.client.room_info("drain", None).await.unwrap().last_seq < 50 {
        assert!(Instant::now() < deadline, "appends never got going");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    p.stop().await;
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    assert!(acked.len() >= 50);

    let p = Proxy::start(dir.path(), Config::default()).await;
    let stored = p
        .client
        .history("drain", 0, 1000, None)
        .await
        .unwrap()
        .messages;
    let mut more = p
        .client
        .history("drain", 1000, 1000, None)
        .await
        .unwrap()
        .messages;
    let mut stored = stored;
    stored.append(&mut more);
    assert!(
        stored
            .iter()
            .enumerate()
            .all(|(i, m)| m.seq == i as u64 + 1),
        "dense"
    );
    for (seq, body) in &acked {
        assert_eq!(&stored[*seq as usize - 1].body, body, "acked write lost");
    }
    p.stop().await;
}

/// A fake dbproxy that answers every request `503` without a JSON body and
/// counts them: it stands for one whose database is down.
async fn always_unavailable() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let hits = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let mut buf = [0u8; 8192];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .await;
        }
    });
    (base, hits)
}

/// A loopback address nobody listens on: connects are refused.
fn dead_base() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", l.local_addr().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn several_dbproxies_fail_over() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let p = Proxy::start(dir.path(), Config::default()).await;

    // The first one refuses connections: everything, guest start included
    // (it was never sent), moves on to the live one.
    let c = DbClient::new(&format!("{}, {}/", dead_base(), p.base));
    assert_eq!(c.bases().len(), 2);
    c.guest("a").await.unwrap();
    c.join("r", "a").await.unwrap();
    let r = c
        .append(vec![item("r", "a", Some("k1"), "one")])
        .await
        .unwrap();
    assert_eq!(r.results[0].clone().unwrap().seq, 1);

    // The first one answers 503: requests that are safe to repeat move on
    // (appends with client ids, reads); a guest start, which would not be, does not.
    let (sick, hits) = always_unavailable().await;
    let c = DbClient::new(&format!("{sick},{}", p.base));
    let r = c
        .append(vec![item("r", "a", Some("k2"), "two")])
        .await
        .unwrap();
    assert_eq!(r.results[0].clone().unwrap().seq, 2);
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    // The live one is now preferred: the next request goes straight there.
    assert_eq!(c.history("r", 0, 10, None).await.unwrap().messages.len(), 2);
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    let c = DbClient::new(&format!("{sick},{}", p.base));
    let e = c.guest("b").await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unavailable);
    let e = c
        .append(vec![item("r", "a", None, "no id")])
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unavailable);
    let h = p.client.history("r", 0, 10, None).await.unwrap().messages;
    assert_eq!(h.len(), 2, "nothing without an id was stored by a retry");

    // Every one down: unavailable, not a hang.
    let c = DbClient::new(&format!("{},{}", dead_base(), dead_base()));
    assert_eq!(
        c.rooms(10, None).await.unwrap_err().kind,
        ErrorKind::Unavailable
    );
    p.stop().await;
}
