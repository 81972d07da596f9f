//! Thousands of idle TCP sockets on the HTTP ports (a chat server's admin
//! port, the dbproxy's API port) do not make a healthy stack look unhealthy:
//! `/readyz` keeps answering, the proxy keeps the server in its ring, and
//! logins keep going through. The sockets only connect and stay silent, as
//! a careless client or a cheap attack would.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::common::{open_files_limit, try_http_get, within, Client, Stack};
use crate::proxy::start_proxy;

/// As many idle sockets as the open-files limit allows (each costs this
/// process a descriptor, plus one for the listener's side while accepted),
/// at most 3000.
fn flood_size() -> usize {
    let limit = open_files_limit().unwrap_or(4096) as usize;
    let n = limit.saturating_sub(1024) / 2;
    assert!(
        n >= 1000,
        "the open-files limit ({limit}) is too low for this test: raise it (ulimit -n)"
    );
    n.min(3000)
}

/// Opens `n` connections to `addr` at once and keeps those that connected
/// within a second (with a full accept queue, the rest never do).
async fn open_idle(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut connecting = JoinSet::new();
    for _ in 0..n {
        connecting.spawn(async move {
            tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await
        });
    }
    let mut open = Vec::with_capacity(n);
    while let Some(r) = connecting.join_next().await {
        if let Ok(Ok(Ok(s))) = r {
            open.push(s);
        }
    }
    open
}

/// Opens `n` connections to `addr` that each send a never-ending request
/// head, one byte every 200 ms, until `stop`.
async fn dribble(addr: SocketAddr, n: usize, stop: &CancellationToken) -> JoinSet<()> {
    let mut dribblers = JoinSet::new();
    for _ in 0..n {
        let stop = stop.clone();
        dribblers.spawn(async move {
            let Ok(Ok(mut s)) =
                tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await
            else {
                return;
            };
            let head = b"GET /readyz HTTP/1.1\r\nX-Slow: ";
            let _ = s.write_all(head).await;
            // Bounded: the test stops it, and a closed socket ends it.
            for _ in 0..200 {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
                if s.write_all(b"a").await.is_err() {
                    return;
                }
            }
        });
    }
    dribblers
}

/// `/readyz` on `admin` answers 200 within 2 s every 250 ms for `period`.
async fn stays_ready(admin: SocketAddr, period: Duration) {
    let end = Instant::now() + period;
    while Instant::now() < end {
        let started = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(2), try_http_get(admin, "/readyz")).await;
        assert!(
            matches!(r, Ok(Ok((200, _)))),
            "GET /readyz on {admin} under a flood of idle sockets: {r:?} after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_on_a_server_admin_port_leave_it_in_the_ring() {
    let stack = Stack::start().await;
    let proxy = start_proxy(&stack).await;
    let (mut alice, _) = Client::login(proxy.addr, "alice", "pw").await;
    alice.join("lobby").await;

    let n = flood_size();
    let mut flood = open_idle(stack.admin_addr, n).await;
    // Long enough for the proxy (a check every 100 ms, ejected after two
    // failed ones) to eject a server whose /readyz does not answer.
    stays_ready(stack.admin_addr, Duration::from_secs(2)).await;
    // A second wave while the first is still open.
    flood.extend(open_idle(stack.admin_addr, n).await);
    stays_ready(stack.admin_addr, Duration::from_secs(2)).await;

    // The proxy kept the server: alice was not moved, and new users get in.
    within(
        Duration::from_secs(5),
        "alice's MSG under the flood",
        async { alice.msg("lobby", "m1", "still here").await },
    )
    .await;
    let (mut bob, _) = within(
        Duration::from_secs(5),
        "bob's login through the proxy",
        async { Client::login(proxy.addr, "bob", "pw").await },
    )
    .await;
    bob.join("lobby").await;
    drop(flood);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_on_the_dbproxy_port_do_not_stop_logins() {
    let mut stack = Stack::storage().await;
    let n = flood_size();
    let mut flood = open_idle(stack.db_addr, n).await;
    // A chat server starting during the flood has no pooled connection to
    // the dbproxy: it must get one past the idle sockets to become ready.
    within(
        Duration::from_secs(10),
        "a chat server started during the flood is ready",
        stack.start_server(),
    )
    .await;
    for wave in 0..2 {
        // Concurrent logins need more connections to the dbproxy than the
        // server holds pooled, so they must get past the idle sockets.
        let mut logins = JoinSet::new();
        for i in 0..16 {
            let addr = stack.addr;
            logins.spawn(async move {
                let user = format!("u{wave}x{i}");
                let (mut c, _) = Client::login(addr, &user, "pw").await;
                c.join("lobby").await;
            });
        }
        within(
            Duration::from_secs(10),
            "16 logins under the flood",
            async {
                while let Some(r) = logins.join_next().await {
                    r.expect("login task");
                }
            },
        )
        .await;
        stays_ready(stack.admin_addr, Duration::from_millis(500)).await;
        if wave == 0 {
            flood.extend(open_idle(stack.db_addr, n).await);
        }
    }
    drop(flood);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_dribbling_sockets_on_the_dbproxy_and_proxy_admin_ports() {
    let stack = Stack::start().await;
    let proxy = start_proxy(&stack).await;
    let n = flood_size() / 2;
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let mut flood = Vec::new();
    let mut dribblers = Vec::new();
    for admin in [stack.db_admin_addr, proxy.admin_addr] {
        flood.extend(open_idle(admin, n / 2).await);
        dribblers.push(dribble(admin, n / 2, &stop).await);
    }
    for admin in [stack.db_admin_addr, proxy.admin_addr] {
        stays_ready(admin, Duration::from_millis(1_500)).await;
    }
    // The scrape still works, and the stack still serves logins.
    let r = tokio::time::timeout(
        Duration::from_secs(2),
        try_http_get(stack.db_admin_addr, "/metrics"),
    )
    .await;
    assert!(
        matches!(&r, Ok(Ok((200, body))) if body.contains("chat_dbproxy_")),
        "{r:?}"
    );
    within(Duration::from_secs(5), "a login through the proxy", async {
        Client::login(proxy.addr, "carol", "pw").await
    })
    .await;
    stop.cancel();
    drop(flood);
}
