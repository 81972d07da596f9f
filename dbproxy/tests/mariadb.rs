//! The MySQL backend against real MariaDB servers (a primary and a GTID
//! replica per test, see `chat_mariadb_harness`), driven through `run` and the real
//! `DbClient`. Routing is observed through `chat_dbproxy_route_total`.

mod common;

use std::time::{Duration, Instant};

use chat_dbproxy::config::MysqlConfig;
use chat_dbproxy::{Config, StorageKind};
use chat_mariadb_harness::{Pair, Server, ServerTls};
use chat_storage_api::{AppendItem, ErrorKind};
use chat_storage_client::DbClient;
use chat_testkit::wait_until;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

struct Proxy {
    client: DbClient,
    base: String,
    registry: prometheus::Registry,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), chat_dbproxy::DbProxyError>>,
}

impl Proxy {
    async fn start(pair: &Pair) -> Proxy {
        Proxy::start_with(pair, Config::default()).await
    }

    /// `config` with its `mysql` section pointed at `pair`.
    async fn start_with(pair: &Pair, config: Config) -> Proxy {
        Proxy::start_on(pair.mysql_config(), config).await
    }

    /// `config` with `mysql` as its `mysql` section (short timeouts).
    async fn start_on(mysql: MysqlConfig, config: Config) -> Proxy {
        let listeners = chat_dbproxy::Listeners::bind("127.0.0.1:0", "127.0.0.1:0")
            .await
            .unwrap();
        let base = format!("http://{}", listeners.api.local_addr().unwrap());
        let config = Config {
            backend: StorageKind::Mysql,
            shutdown_grace_secs: Duration::from_secs(2),
            mysql: MysqlConfig {
                pool_min: 1,
                pool_max: 8,
                acquire_timeout_ms: 1000,
                connect_timeout_ms: 500,
                ..mysql
            },
            ..config
        };
        let registry = prometheus::Registry::new();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(chat_dbproxy::run(
            listeners,
            config,
            registry.clone(),
            shutdown.clone(),
        ));
        let client = DbClient::new(&base);
        let proxy = Proxy {
            client,
            base,
            registry,
            shutdown,
            task,
        };
        wait_until(Duration::from_secs(15), "dbproxy ready", || async {
            proxy.client.rooms(1, None).await.is_ok()
        })
        .await;
        proxy
    }

    /// Sum of a counter's samples whose labels include all of `labels`.
    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        common::metric(&self.registry, name, labels)
    }

    async fn readyz(&self) -> u16 {
        common::raw_request(&self.base, "GET", "/readyz", b"")
            .await
            .map_or(0, |(s, _)| s)
    }

    fn routed(&self, route: &str, backend: &str) -> f64 {
        self.counter(
            "chat_dbproxy_route_total",
            &[("route", route), ("backend", backend)],
        )
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

fn item(room: &str, sender: &str, client_id: Option<&str>, body: &str) -> AppendItem {
    AppendItem {
        room: room.into(),
        sender: sender.into(),
        client_id: client_id.map(Into::into),
        body: body.into(),
    }
}

async fn start() -> (Pair, Proxy) {
    let pair = tokio::task::spawn_blocking(Pair::start).await.unwrap();
    let proxy = Proxy::start(&pair).await;
    (pair, proxy)
}

/// Waits until reads are served by the replica (replication caught up).
async fn wait_replica_serving(proxy: &Proxy, pair: &Pair, room: &str) {
    let replica = pair.replica.addr();
    wait_until(Duration::from_secs(10), "replica serving reads", || async {
        let before = proxy.routed("replica", &replica);
        proxy.client.room_info(room, None).await.is_ok()
            && proxy.routed("replica", &replica) > before
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_idempotency_and_dense_seq_across_two_proxies() {
    let (pair, a) = start().await;
    let b = Proxy::start(&pair).await;
    let (primary, replica) = (pair.primary.addr(), pair.replica.addr());

    let id = a.client.guest("alice").await.unwrap();
    assert!(id.pos.is_some(), "writes answer a GTID");
    b.client.guest("bob").await.unwrap();
    a.client.join("r", "alice").await.unwrap();
    a.client.join("r", "bob").await.unwrap();

    // Idempotent retry: same (sender, client_id) → same seq, nothing new stored.
    let first = a
        .client
        .append(vec![item("r", "alice", Some("c1"), "hello")])
        .await
        .unwrap();
    let again = b
        .client
        .append(vec![item("r", "alice", Some("c1"), "hello")])
        .await
        .unwrap();
    let (f, g) = (
        first.results[0].clone().unwrap(),
        again.results[0].clone().unwrap(),
    );
    assert!(!f.duplicate && g.duplicate);
    assert_eq!((f.seq, f.ts), (g.seq, g.ts));
    // Per-item errors leave the other items alone.
    let mixed = a
        .client
        .append(vec![
            item("nope", "alice", None, "x"),
            item("r", "ghost", None, "x"),
            item("r", "alice", Some("c1"), "dup in batch"),
        ])
        .await
        .unwrap();
    assert_eq!(
        mixed.results[0].clone().unwrap_err().kind,
        ErrorKind::NoSuchRoom
    );
    assert_eq!(
        mixed.results[1].clone().unwrap_err().kind,
        ErrorKind::NoSuchUser
    );
    assert!(mixed.results[2].clone().unwrap().duplicate);

    // Read/write split: writes on the primary, plain reads on the replica.
    wait_replica_serving(&a, &pair, "r").await;
    let (p0, r0) = (a.routed("primary", &primary), a.routed("replica", &replica));
    for _ in 0..5 {
        a.client.history("r", 0, 10, None).await.unwrap();
    }
    assert_eq!(a.routed("replica", &replica) - r0, 5.0);
    assert_eq!(
        a.routed("primary", &primary),
        p0,
        "plain reads stay off the primary"
    );
    a.client
        .append(vec![item("r", "bob", None, "w")])
        .await
        .unwrap();
    assert!(a.routed("primary", &primary) > p0);

    // Two dbproxies appending to one room at once: seq stays dense and unique.
    let mut tasks = Vec::new();
    for (k, proxy) in [&a, &b].into_iter().enumerate() {
        for t in 0..4 {
            let client = proxy.client.clone();
            tasks.push(tokio::spawn(async move {
                for n in 0..10 {
                    let items = (0..5)
                        .map(|i| item("r", "bob", Some(&format!("p{k}t{t}n{n}i{i}")), "m"))
                        .collect();
                    let resp = client.append(items).await.unwrap();
                    assert!(resp.results.iter().all(|r| r.is_ok()));
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let info = a.client.room_info("r", None).await;
    let last = a
        .client
        .append(vec![item("r", "bob", None, "last")])
        .await
        .unwrap();
    let history = a
        .client
        .history("r", 0, 1000, last.pos.clone())
        .await
        .unwrap();
    let seqs: Vec<u64> = history.messages.iter().map(|m| m.seq).collect();
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "dense, unique, ordered");
    assert_eq!(seqs.len(), 1 + 1 + 2 * 4 * 10 * 5 + 1);
    assert!(info.is_ok());
    b.stop().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_under_replica_lag() {
    let (pair, proxy) = start().await;
    proxy.client.guest("carol").await.unwrap();
    proxy.client.join("lag", "carol").await.unwrap();
    wait_replica_serving(&proxy, &pair, "lag").await;

    pair.replica.sql("STOP SLAVE SQL_THREAD");
    let fallbacks = proxy.counter("chat_dbproxy_causal_fallbacks_total", &[]);
    let written = proxy
        .client
        .append(vec![item("lag", "carol", None, "fresh")])
        .await
        .unwrap();
    let pos = written.pos.clone().expect("append answers a GTID");
    let history = proxy
        .client
        .history("lag", 0, 10, Some(pos.clone()))
        .await
        .unwrap();
    assert_eq!(history.messages.len(), 1, "the write is visible");
    assert_eq!(history.messages[0].body, "fresh");
    assert!(proxy.counter("chat_dbproxy_causal_fallbacks_total", &[]) > fallbacks);
    // Without min_pos the lagging replica (still inside the budget) may answer stale.
    let stale = proxy.client.history("lag", 0, 10, None).await.unwrap();
    assert!(stale.messages.len() <= 1);

    pair.replica.sql("START SLAVE SQL_THREAD");
    let replica = pair.replica.addr();
    wait_until(Duration::from_secs(10), "replica catches up", || async {
        let before = proxy.routed("replica", &replica);
        let h = proxy.client.history("lag", 0, 10, Some(pos.clone())).await;
        h.is_ok_and(|h| h.messages.len() == 1) && proxy.routed("replica", &replica) > before
    })
    .await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_down_is_skipped() {
    let (mut pair, proxy) = start().await;
    proxy.client.guest("dave").await.unwrap();
    proxy.client.join("down", "dave").await.unwrap();
    wait_replica_serving(&proxy, &pair, "down").await;
    let replica = pair.replica.addr();
    pair.replica.kill();
    for _ in 0..3 {
        let started = Instant::now();
        proxy.client.room_info("down", None).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    // Once the health loop noticed, the replica is not even tried.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let r0 = proxy.routed("replica", &replica);
    let p0 = proxy.routed("primary", &pair.primary.addr());
    for _ in 0..5 {
        proxy.client.history("down", 0, 10, None).await.unwrap();
    }
    assert_eq!(proxy.routed("replica", &replica), r0);
    assert_eq!(proxy.routed("primary", &pair.primary.addr()) - p0, 5.0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_down_then_promotion() {
    let (mut pair, proxy) = start().await;
    proxy.client.guest("erin").await.unwrap();
    proxy.client.join("fail", "erin").await.unwrap();
    proxy
        .client
        .append(vec![item("fail", "erin", Some("m1"), "before")])
        .await
        .unwrap();
    wait_replica_serving(&proxy, &pair, "fail").await;
    let replica = pair.replica.addr();
    assert_eq!(proxy.readyz().await, 200);
    pair.primary.kill();
    // Without a writable server the dbproxy is not ready.
    wait_until(
        Duration::from_secs(5),
        "/readyz 503 without a primary",
        || async { proxy.readyz().await == 503 },
    )
    .await;

    // Writes fail fast and retryably; reads go on from the replica.
    for n in 0..3 {
        let started = Instant::now();
        let e = proxy
            .client
            .append(vec![item("fail", "erin", Some(&format!("x{n}")), "lost")])
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unavailable, "{e:?}");
        assert!(e.kind.retryable());
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let r0 = proxy.routed("replica", &replica);
    let h = proxy.client.history("fail", 0, 10, None).await.unwrap();
    assert_eq!(h.messages.len(), 1);
    assert!(proxy.routed("replica", &replica) > r0);

    // Promote the replica: writes resume within 2 s.
    pair.replica.sql("STOP SLAVE; SET GLOBAL read_only = 0;");
    let promoted = Instant::now();
    wait_until(Duration::from_secs(5), "writes resume", || async {
        proxy
            .client
            .append(vec![item("fail", "erin", Some("after"), "after")])
            .await
            .is_ok()
    })
    .await;
    assert!(
        promoted.elapsed() < Duration::from_secs(2),
        "{:?}",
        promoted.elapsed()
    );
    wait_until(
        Duration::from_secs(5),
        "/readyz 200 after the promotion",
        || async { proxy.readyz().await == 200 },
    )
    .await;
    assert!(proxy.routed("primary", &replica) > 0.0);
    let h = proxy.client.history("fail", 0, 10, None).await.unwrap();
    let seqs: Vec<u64> = h.messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![1, 2]);
    proxy.stop().await;
}

/// Appends of many rooms per request, several requests at once (the writer
/// commits more than one batch at a time), client-id retries inside and across
/// requests, awkward text (for the JSON the writer sends: quotes,
/// backslashes, non-ASCII) and a request larger than one statement's JSON
/// document: every room's seqs stay dense and unique, a retry answers the
/// first copy's seq, and names and bodies come back byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_room_appends_stay_dense_and_exact() {
    let (pair, proxy) = start().await;
    let rooms: Vec<String> = (0..12).map(|r| format!("mr{r}")).collect();
    let senders = ["zoe.2", "bob", "x-y_z"];
    for s in senders {
        proxy.client.guest(s).await.unwrap();
    }
    proxy.client.join("#cafe.1", "zoe.2").await.unwrap();
    for r in &rooms {
        proxy.client.join(r, "bob").await.unwrap();
    }

    // 8 tasks × 6 requests, each request covering every room; every item is
    // sent twice in one request and every second request is sent twice.
    let mut tasks = Vec::new();
    for t in 0..8 {
        let client = proxy.client.clone();
        let rooms = rooms.clone();
        tasks.push(tokio::spawn(async move {
            let mut firsts = Vec::new();
            for n in 0..6 {
                let items: Vec<AppendItem> = rooms
                    .iter()
                    .flat_map(|r| {
                        let cid = format!("t{t}n{n}{r}");
                        let one = item(r, "bob", Some(&cid), &format!("{t} {n}"));
                        [one.clone(), one]
                    })
                    .collect();
                let resp = client.append(items.clone()).await.unwrap();
                let seqs: Vec<u64> = resp
                    .results
                    .iter()
                    .map(|r| r.clone().unwrap().seq)
                    .collect();
                for pair in resp.results.chunks(2) {
                    let (a, b) = (pair[0].clone().unwrap(), pair[1].clone().unwrap());
                    assert!(!a.duplicate && b.duplicate, "{pair:?}");
                    assert_eq!((a.seq, a.ts), (b.seq, b.ts));
                }
                if n % 2 == 1 {
                    let again = client.append(items).await.unwrap();
                    let seqs_again: Vec<u64> = again
                        .results
                        .iter()
                        .map(|r| r.clone().unwrap().seq)
                        .collect();
                    assert_eq!(seqs, seqs_again, "a resent request answers the same seqs");
                    assert!(again.results.iter().all(|r| r.clone().unwrap().duplicate));
                }
                firsts.extend(seqs.into_iter().step_by(2));
            }
            firsts
        }));
    }
    let mut stored = 0;
    for t in tasks {
        stored += t.await.unwrap().len();
    }
    assert_eq!(stored, 8 * 6 * rooms.len());

    // Awkward text, an over-long client id, unknown and invalid names, and
    // one request whose bodies take more than one INSERT statement.
    let odd = "quote \" backslash \\ tab \t json \\u0000 emoji 😀 ünï ☕ <&>'";
    let long_cid = "c".repeat(300);
    // 4000 bytes: the longest text stored (max_text_bytes 4096).
    let big = "é".repeat(2000);
    let mut items = vec![
        item("#cafe.1", "zoe.2", Some("o-1"), odd),
        item("mr0", "x-y_z", None, odd),
        item("mr0", "bob", Some(&long_cid), "x"),
        item("mr0", "nobody", None, "x"),
        item("nosuch", "bob", None, "x"),
        item("mr0", &"n".repeat(300), None, "x"),
        item(&"r".repeat(300), "bob", None, "x"),
    ];
    items.extend((0..400).map(|i| item("mr1", "bob", Some(&format!("big{i}")), &big)));
    // A client id a DM already took is refused, in the fast path's INSERT
    // (a lone item) as in a batch that is looked up first (the big one).
    let dm = chat_storage_api::DmItem {
        sender: "bob".into(),
        recipient: "zoe.2".into(),
        client_id: Some("dm-1".into()),
        body: "psst".into(),
    };
    proxy.client.send_dms(vec![dm]).await.unwrap();
    let taken = proxy
        .client
        .append(vec![item("mr0", "bob", Some("dm-1"), "x")])
        .await
        .unwrap();
    assert_eq!(
        taken.results[0].clone().unwrap_err().kind,
        ErrorKind::BadRequest
    );
    items.push(item("mr0", "bob", Some("dm-1"), "x"));
    let mut resp = proxy.client.append(items).await.unwrap();
    assert_eq!(
        resp.results.pop().unwrap().unwrap_err().kind,
        ErrorKind::BadRequest
    );
    assert_eq!(resp.results[0].clone().unwrap().seq, 1);
    assert_eq!(resp.results[1].clone().unwrap().seq, 8 * 6 + 1);
    assert_eq!(
        resp.results[2].clone().unwrap_err().kind,
        ErrorKind::BadRequest
    );
    assert_eq!(
        resp.results[3].clone().unwrap_err().kind,
        ErrorKind::NoSuchUser
    );
    assert_eq!(
        resp.results[4].clone().unwrap_err().kind,
        ErrorKind::NoSuchRoom
    );
    for i in [5, 6] {
        assert_eq!(
            resp.results[i].clone().unwrap_err().kind,
            ErrorKind::BadRequest
        );
    }
    let big_seqs: Vec<u64> = resp.results[7..]
        .iter()
        .map(|r| r.clone().unwrap().seq)
        .collect();
    assert_eq!(big_seqs, (8 * 6 + 1..=8 * 6 + 400).collect::<Vec<u64>>());

    let pos = resp.pos.clone();
    let odd_room = proxy
        .client
        .history("#cafe.1", 0, 10, pos.clone())
        .await
        .unwrap();
    assert_eq!(odd_room.messages.len(), 1);
    assert_eq!(odd_room.messages[0].sender, "zoe.2");
    assert_eq!(odd_room.messages[0].body, odd);
    for r in &rooms {
        let mut seqs = Vec::new();
        let mut after = 0;
        loop {
            let page = proxy
                .client
                .history(r, after, 1000, pos.clone())
                .await
                .unwrap();
            let Some(last) = page.messages.last() else {
                break;
            };
            after = last.seq;
            seqs.extend(page.messages.iter().map(|m| m.seq));
            if r == "mr0" && seqs.len() == 8 * 6 + 1 {
                assert_eq!(last.sender, "x-y_z");
                assert_eq!(last.body, odd);
            }
            if r == "mr1" && seqs.len() == 8 * 6 + 400 {
                assert_eq!(last.body, big);
            }
        }
        let extra = match r.as_str() {
            "mr0" => 1,
            "mr1" => 400,
            _ => 0,
        };
        let expected: Vec<u64> = (1..=8 * 6 + extra).collect();
        assert_eq!(seqs, expected, "room {r}: dense, unique, ordered");
        let info = proxy.client.room_info(r, pos.clone()).await.unwrap();
        assert_eq!(info.last_seq, 8 * 6 + extra);
    }
    drop(pair);
    proxy.stop().await;
}

/// What the dbproxy enforces on MySQL as on SQLite: rooms per user (under
/// concurrent joins of one user), the protocol's rules per batch item (on
/// the append writer's path), the dbproxy's own token lifetime, failed-login
/// limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_checks_hold_on_mysql() {
    let pair = tokio::task::spawn_blocking(Pair::start).await.unwrap();
    let config = Config {
        max_rooms_per_user: 3,
        login_failures_per_account: 2,
        ..Config::default()
    };
    let proxy = Proxy::start_with(&pair, config).await;
    let c = &proxy.client;
    c.guest("u").await.unwrap();
    c.join("r0", "u").await.unwrap();
    // Eight joins of one user at once: exactly two more fit.
    let joins: Vec<_> = (1..=8)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move { c.join(&format!("r{i}"), "u").await })
        })
        .collect();
    let mut kinds = Vec::new();
    for j in joins {
        kinds.push(j.await.unwrap().map(|_| ()).map_err(|e| e.kind));
    }
    assert_eq!(kinds.iter().filter(|k| k.is_ok()).count(), 2, "{kinds:?}");
    assert!(kinds
        .iter()
        .all(|k| k.is_ok() || *k == Err(ErrorKind::TooManyRooms)));
    assert_eq!(c.user_rooms("u", None).await.unwrap().rooms.len(), 3);
    c.join("r0", "u").await.unwrap();

    let r = c
        .append(vec![
            item("r0", "u", Some("a1"), "fine"),
            item("r0", "u", None, "forged\nOK LOGIN admin x"),
            item("r0", "u", Some("a2"), "also fine"),
        ])
        .await
        .unwrap();
    let seqs: Vec<_> = r
        .results
        .iter()
        .map(|x| x.as_ref().map(|a| a.seq).map_err(|e| e.kind))
        .collect();
    assert_eq!(seqs, [Ok(1), Err(ErrorKind::BadRequest), Ok(2)]);

    let (status, answer) = common::raw_request(
        &proxy.base,
        "POST",
        "/v1/guest",
        br#"{"name":"u","token_idle_ttl_ms":-9223372036854775808}"#,
    )
    .await
    .unwrap();
    assert_eq!(status, 409, "{answer}");

    c.login("acct", "right", None).await.unwrap();
    for _ in 0..2 {
        let e = c.login("acct", "wrong", None).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::AuthFailed);
    }
    let e = c.login("acct", "right", None).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::RateLimited);
    proxy.stop().await;
    drop(pair);
}

/// The dbproxy's verdict on a TLS-only MariaDB under `mysql`: the start
/// error, if any.
async fn start_error(mysql: MysqlConfig) -> Option<String> {
    let listeners = chat_dbproxy::Listeners::bind("127.0.0.1:0", "127.0.0.1:0")
        .await
        .unwrap();
    let config = Config {
        backend: StorageKind::Mysql,
        mysql: MysqlConfig {
            acquire_timeout_ms: 1000,
            connect_timeout_ms: 500,
            ..mysql
        },
        ..Config::default()
    };
    let shutdown = CancellationToken::new();
    let run = chat_dbproxy::run(
        listeners,
        config,
        prometheus::Registry::new(),
        shutdown.clone(),
    );
    tokio::pin!(run);
    // A start that works serves until told to stop.
    match tokio::time::timeout(Duration::from_secs(10), &mut run).await {
        Ok(r) => r.err().map(|e| e.to_string()),
        Err(_) => {
            shutdown.cancel();
            let _ = run.await;
            None
        }
    }
}

/// A MariaDB that requires TLS (`require_secure_transport`, certificates
/// from a throwaway CA, valid for 127.0.0.1): `disabled` is refused with
/// the server's reason, `verify_ca` and `verify_identity` with its CA store
/// and read, `required` works without a CA, a foreign CA is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_over_tls() {
    use chat_tls::dev::{ensure, Leaf};
    let dir = tempfile::tempdir().unwrap();
    let leaf = [Leaf {
        stem: "mariadb",
        names: &["127.0.0.1"],
    }];
    let (ids, _) = ensure(&dir.path().join("ca"), &leaf).unwrap();
    let (foreign, _) = ensure(&dir.path().join("other"), &leaf).unwrap();
    let id = ids["mariadb"].clone();
    let server = tokio::task::spawn_blocking(move || {
        let tls = ServerTls {
            cert: &id.cert,
            key: &id.key,
            ca: &id.ca,
        };
        let server = Server::start_tls(1, &tls);
        server.create_app_account();
        server
    })
    .await
    .unwrap();
    assert_eq!(
        server.sql("SELECT @@require_secure_transport"),
        "1",
        "the server must refuse plain connections for this test to mean anything"
    );
    let (_pw_dir, password_file) = chat_mariadb_harness::password_file();
    let mysql = |ssl_mode: &str, ssl_ca: &std::path::Path| MysqlConfig {
        primary: server.addr(),
        user: chat_mariadb_harness::APP_USER.into(),
        password_file: password_file.to_string_lossy().into_owned(),
        database: chat_mariadb_harness::DATABASE.into(),
        ssl_mode: ssl_mode.into(),
        ssl_ca: ssl_ca.to_string_lossy().into_owned(),
        ..MysqlConfig::default()
    };
    let no_ca = std::path::Path::new("");

    let e = start_error(mysql("disabled", no_ca))
        .await
        .expect("a plain connection to a TLS-only server fails");
    // MariaDB answers a plain login to a TLS-only server "access denied";
    // the dbproxy says what to look at.
    assert!(e.contains("1045") && e.contains("ssl_mode"), "{e}");

    let e = start_error(mysql("verify_ca", &foreign["mariadb"].ca))
        .await
        .expect("a certificate from another CA is refused");
    assert!(
        e.to_lowercase().contains("certificate") || e.contains("UnknownIssuer"),
        "{e}"
    );

    for mode in ["verify_ca", "verify_identity"] {
        let proxy = Proxy::start_on(mysql(mode, &ids["mariadb"].ca), Config::default()).await;
        let c = &proxy.client;
        let user = format!("tls_{mode}");
        c.guest(&user).await.unwrap();
        c.join("tlsroom", &user).await.unwrap();
        let stored = c
            .append(vec![item("tlsroom", &user, Some(mode), "over TLS")])
            .await
            .unwrap();
        let seq = stored.results[0].as_ref().unwrap().seq;
        let history = c.history("tlsroom", seq - 1, 10, stored.pos).await.unwrap();
        assert_eq!(history.messages.len(), 1, "{mode}");
        assert_eq!(history.messages[0].body, "over TLS");
        proxy.stop().await;
    }

    assert_eq!(start_error(mysql("required", no_ca)).await, None);
}
