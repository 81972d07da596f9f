//! The chat server's pool of dbproxy connections: a burst of concurrent
//! requests opens at most `max_per_host` connections to a dbproxy (so the
//! servers' pools together fit its `max_connections`), and pooled
//! connections left idle are closed.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chat_dbproxy::Config;
use chat_storage_client::DbClient;
use chat_storage_client::PoolOptions;
use common::{wait_until, Proxy};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A TCP relay in front of the dbproxy counting the connections open
/// through it (now and at most).
struct Relay {
    base: String,
    open: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
    _stop: tokio_util::sync::DropGuard,
}

async fn relay(to: &str) -> Relay {
    let upstream = to.trim_start_matches("http://").to_owned();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (open, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let stop = CancellationToken::new();
    let (o, m, s) = (open.clone(), most.clone(), stop.clone());
    tokio::spawn(async move {
        loop {
            let (mut down, _) = tokio::select! {
                r = listener.accept() => r.unwrap(),
                _ = s.cancelled() => return,
            };
            let now = o.fetch_add(1, Ordering::SeqCst) + 1;
            m.fetch_max(now, Ordering::SeqCst);
            let (o, s, upstream) = (o.clone(), s.clone(), upstream.clone());
            tokio::spawn(async move {
                if let Ok(mut up) = TcpStream::connect(&upstream).await {
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                        _ = s.cancelled() => {}
                    }
                }
                o.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    Relay {
        base,
        open,
        most,
        _stop: stop.drop_guard(),
    }
}

/// `n` concurrent reads through `client`; all must succeed.
async fn burst(client: &DbClient, n: usize) {
    let mut reads = tokio::task::JoinSet::new();
    for _ in 0..n {
        let c = client.clone();
        reads.spawn(async move { c.rooms(10, None).await });
    }
    while let Some(r) = reads.join_next().await {
        r.unwrap().expect("read under the pool cap");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_opens_at_most_the_pool_cap_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proxy::start(dir.path(), Config::default()).await;
    let r = relay(&p.base).await;
    // More concurrent requests than the default cap (256): a dbproxy's
    // default max_connections (1024) then holds four servers' bursts.
    let client = DbClient::new(&r.base);
    burst(&client, 400).await;
    let most = r.most.load(Ordering::SeqCst);
    assert!(
        most <= PoolOptions::default().max_per_host,
        "{most} connections to one dbproxy"
    );
    assert!(most >= 2, "the burst was concurrent ({most} connections)");
    drop(client);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_pooled_connections_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proxy::start(dir.path(), Config::default()).await;
    let r = relay(&p.base).await;
    let client = DbClient::with_pool(
        &r.base,
        PoolOptions {
            max_per_host: 8,
            idle_timeout: Duration::from_millis(300),
        },
    );
    burst(&client, 64).await;
    let most = r.most.load(Ordering::SeqCst);
    assert!(
        (2..=8).contains(&most),
        "{most} connections with a cap of 8"
    );
    // The client lives on, unused: the pool closes what it keeps.
    wait_until(
        Duration::from_secs(5),
        "idle pooled connections closed",
        || {
            let open = r.open.load(Ordering::SeqCst);
            async move { open == 0 }
        },
    )
    .await;
    // And opens new ones when needed.
    burst(&client, 4).await;
    p.stop().await;
}
