//! The first line, straight to a chat server and through the proxy: the
//! command word in exact case, leading empty lines skipped, the first-line
//! timeout, idle sockets that must not make a healthy tier look unhealthy,
//! and the PROXY line that carries a client's address through the proxy.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chat_protocol::ServerLine;
use tokio::net::{TcpSocket, TcpStream};

use crate::common::{http_get, open_files_limit, within, Client, ErrorCode, Stack};
use crate::login::assert_one_err_then_closed;
use crate::proxy::start_proxy;

/// Where clients reach the tier under test.
async fn entry_points(stack: &Stack) -> (crate::proxy::Proxy, Vec<(&'static str, SocketAddr)>) {
    let proxy = start_proxy(stack).await;
    let addr = proxy.addr;
    (proxy, vec![("server", stack.addr), ("proxy", addr)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_command_word_is_matched_in_exact_case() {
    let stack = Stack::start().await;
    let (_proxy, entries) = entry_points(&stack).await;
    let mut guests = Vec::new();
    for (tier, addr) in entries {
        for line in [
            "JoiN cooking x",
            "join cooking x",
            "Login ann pw",
            "login ann pw",
            "resume ann.0123456789abcdef0123456789abcdef",
        ] {
            let mut c = Client::connect(addr, &format!("{tier}: {line}")).await;
            // Pipelined lines after a refused first line are never read.
            c.send(&format!("{line}\nJOIN cooking y")).await;
            assert_one_err_then_closed(
                &mut c,
                ErrorCode::BadFirstLine,
                &format!("{tier}: {line:?}"),
            )
            .await;
        }
        // The exact words still work, and commands after login are
        // case-insensitive as before.
        let (mut c, _) = Client::guest(addr, "cooking", &format!("{tier}_guest")).await;
        c.send("ping x").await;
        c.expect(
            "PONG x",
            |l| matches!(l, ServerLine::Pong { word: Some(w) } if w == "x"),
        )
        .await;
        guests.push(c);
    }
    // None of the refused lines made a guest or a room member (WHO lists
    // who is online).
    let (mut owner, _) = stack.guest("cooking", "owner").await;
    owner.send("WHO cooking").await;
    let mut members = Vec::new();
    loop {
        match owner.recv().await {
            ServerLine::Member { user, .. } => members.push(user),
            ServerLine::OkWho { .. } => break,
            _ => {}
        }
    }
    members.sort();
    assert_eq!(members, ["owner", "proxy_guest", "server_guest"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leading_empty_lines_are_skipped_up_to_a_bound() {
    let stack = Stack::start().await;
    let (_proxy, entries) = entry_points(&stack).await;
    let bound = chat_protocol::first::MAX_EMPTY_LINES;
    for (tier, addr) in entries {
        let name = format!("{tier}_ann");
        let mut c = Client::connect(addr, &name).await;
        c.send_raw(format!("\r\n\n   \r\nJOIN lobby {name}\n").as_bytes())
            .await;
        c.expect(
            "OK LOGIN after empty lines",
            |l| matches!(l, ServerLine::OkLogin { user, .. } if *user == name),
        )
        .await;
        c.expect("OK JOIN lobby", |l| matches!(l, ServerLine::OkJoin { .. }))
            .await;

        // Empty lines sent one by one, as a person presses Enter.
        let name = format!("{tier}_bob");
        let mut c = Client::connect(addr, &name).await;
        for _ in 0..3 {
            c.send("").await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        c.send(&format!("LOGIN {name} pw")).await;
        c.expect("OK LOGIN", |l| matches!(l, ServerLine::OkLogin { .. }))
            .await;

        let mut c = Client::connect(addr, &format!("{tier}: too many empty lines")).await;
        c.send_raw("\n".repeat(bound + 1).as_bytes()).await;
        assert_one_err_then_closed(&mut c, ErrorCode::BadFirstLine, "too many empty lines").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_socket_on_the_client_port_is_closed_after_the_first_line_timeout() {
    let stack = Stack::start_with(|c| c.first_line_timeout_secs = 1).await;
    let started = Instant::now();
    let mut silent = stack.connect("silent").await;
    let lines = silent.expect_closed_within(Duration::from_secs(10)).await;
    let took = started.elapsed();
    assert!(
        matches!(
            lines.as_slice(),
            [ServerLine::Err {
                code: ErrorCode::BadFirstLine,
                ..
            }]
        ),
        "a silent connection gets one ERR BAD_FIRST_LINE, got {lines:?}"
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "closed after {took:?}, expected about the 1 s first-line timeout"
    );
    // Empty lines do not restart the wait: the timeout bounds the whole
    // first-line phase.
    let started = Instant::now();
    let mut c = stack.connect("blank lines").await;
    for _ in 0..3 {
        c.send("").await;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    c.expect_closed_within(Duration::from_secs(10)).await;
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// 2000 sockets that never send a line, on both client ports at once: the
/// server's and the proxy's `/readyz` still answer 200 and a real client
/// still logs in, straight and through the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_on_the_client_ports_do_not_make_healthy_tiers_look_unhealthy() {
    const IDLE: usize = 2000;
    // Each idle socket costs two descriptors in this process (both ends).
    let limit = open_files_limit().expect("read the open files limit from /proc/self/limits");
    assert!(
        limit >= 4 * IDLE as u64 + 1000,
        "the open files limit ({limit}) is too low for {IDLE} idle sockets per port; raise `ulimit -n`"
    );
    let stack = Stack::start().await;
    let proxy = start_proxy(&stack).await;
    let mut idle = Vec::with_capacity(2 * IDLE);
    for addr in [stack.addr, proxy.addr] {
        for _ in 0..IDLE {
            let s = within(
                Duration::from_secs(10),
                "idle connect",
                TcpStream::connect(addr),
            )
            .await
            .expect("idle connect");
            idle.push(s);
        }
    }
    let (code, _) = within(
        Duration::from_secs(3),
        "server /readyz",
        http_get(stack.admin_addr, "/readyz"),
    )
    .await;
    assert_eq!(code, 200, "the server is healthy");
    let (code, _) = within(
        Duration::from_secs(3),
        "proxy /readyz",
        http_get(proxy.admin_addr, "/readyz"),
    )
    .await;
    assert_eq!(code, 200, "the proxy is healthy");
    let (mut direct, _) = within(
        Duration::from_secs(5),
        "login straight to the server",
        stack.login("direct", "pw"),
    )
    .await;
    let (mut proxied, _) = within(
        Duration::from_secs(5),
        "login through the proxy",
        Client::login(proxy.addr, "proxied", "pw"),
    )
    .await;
    direct.sync().await;
    proxied.sync().await;
    drop(idle);
}

/// A client socket bound to `ip` (any 127.x address is loopback on Linux).
async fn connect_from(ip: &str, to: SocketAddr, label: &str) -> Client {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(format!("{ip}:0").parse().unwrap())
        .unwrap_or_else(|e| panic!("bind {ip}: {e}"));
    let stream = within(Duration::from_secs(5), "connect", socket.connect(to))
        .await
        .unwrap_or_else(|e| panic!("{label}: connect from {ip}: {e}"));
    Client::from_stream(stream, label)
}

async fn failed_login(addr: SocketAddr, from: &str, user: &str) -> ErrorCode {
    let mut c = connect_from(from, addr, &format!("{user} from {from}")).await;
    c.send(&format!("LOGIN {user} wrong")).await;
    match c.expect_closed().await.as_slice() {
        [ServerLine::Err { code, .. }] => *code,
        other => panic!("{user} from {from}: expected one ERR, got {other:?}"),
    }
}

/// Failed logins through the proxy count per client address, not per proxy:
/// the proxy names each client in a PROXY line and the server (trusting the
/// proxy) passes that address to storage's limiter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_through_the_proxy_are_limited_per_client_address() {
    let stack = Stack::start_configured(
        |db| {
            db.login_failures_per_source = 3;
            db.login_failures_per_account = 1000;
        },
        |_| {},
    )
    .await;
    for user in ["u0", "u1", "u2", "u3", "u4", "u5"] {
        let (mut c, _) = stack.login(user, "right").await;
        c.send("QUIT").await;
        c.expect_closed().await;
    }
    let proxy = start_proxy(&stack).await;
    for user in ["u0", "u1", "u2"] {
        assert_eq!(
            failed_login(proxy.addr, "127.0.0.2", user).await,
            ErrorCode::AuthFailed
        );
    }
    assert_eq!(
        failed_login(proxy.addr, "127.0.0.2", "u3").await,
        ErrorCode::RateLimited,
        "the fourth failure from 127.0.0.2 is over its limit"
    );
    // Another client behind the same proxy has failures of its own left.
    for user in ["u3", "u4", "u5"] {
        assert_eq!(
            failed_login(proxy.addr, "127.0.0.3", user).await,
            ErrorCode::AuthFailed,
            "127.0.0.3 is not limited by 127.0.0.2's failures"
        );
    }
    // And a right password from a third address still logs in.
    let mut c = connect_from("127.0.0.4", proxy.addr, "u0 from 127.0.0.4").await;
    c.send("LOGIN u0 right").await;
    c.expect("OK LOGIN", |l| matches!(l, ServerLine::OkLogin { .. }))
        .await;
}

/// Only a trusted proxy may name another address: a PROXY line from anyone
/// else is refused, and a trusted one must be well formed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_line_from_an_untrusted_address_is_refused() {
    let stack = Stack::start().await;
    // The tests' servers trust 127.0.0.1 only.
    let mut c = connect_from("127.0.0.2", stack.addr, "untrusted").await;
    c.send("PROXY TCP4 192.0.2.1 127.0.0.1 5000 7000\r").await;
    c.send("LOGIN mallory pw").await;
    assert_one_err_then_closed(&mut c, ErrorCode::BadFirstLine, "untrusted PROXY line").await;

    let mut c = connect_from("127.0.0.1", stack.addr, "malformed").await;
    c.send("PROXY TCP4 192.0.2.1 127.0.0.1 5000\r").await;
    assert_one_err_then_closed(&mut c, ErrorCode::BadFirstLine, "malformed PROXY line").await;

    // A trusted one is followed by the first line as usual.
    let mut c = connect_from("127.0.0.1", stack.addr, "trusted").await;
    c.send("PROXY TCP4 192.0.2.1 127.0.0.1 5000 7000\r").await;
    c.send("LOGIN carol pw").await;
    c.expect("OK LOGIN", |l| matches!(l, ServerLine::OkLogin { .. }))
        .await;
    // The mallory line never logged anyone in: the name is free.
    let (_m, _) = stack.guest("lobby", "mallory").await;
}
