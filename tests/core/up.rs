//! `chat up` as a user runs it: the one binary, every port chosen by the
//! kernel, clients through the proxy. With `up.tls` (the default) every
//! internal hop is mutual TLS, so a server's client port refuses plain text;
//! with `CHAT_UP__TLS=false` it is the plain stack of before.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use chat_protocol::{ErrorCode, ServerLine};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::common::{wait_until, within, Client};

/// What the banner of a started `chat up` says.
struct Up {
    child: Child,
    proxy: SocketAddr,
    servers: Vec<SocketAddr>,
    banner: String,
}

/// Starts `chat up` under `data_dir` with `env` on top of loopback port-0
/// listeners, and reads its banner.
async fn start(data_dir: &Path, env: &[(&str, &str)]) -> Up {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chat"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CHAT_") {
            cmd.env_remove(k);
        }
    }
    for key in [
        "SERVER__LISTEN",
        "SERVER__ADMIN_LISTEN",
        "PROXY__LISTEN",
        "PROXY__ADMIN_LISTEN",
        "DBPROXY__LISTEN",
        "DBPROXY__ADMIN_LISTEN",
    ] {
        cmd.env(format!("CHAT_{key}"), "127.0.0.1:0");
    }
    cmd.env("CHAT_LOG__LEVEL", "warn")
        .env("CHAT_DBPROXY__HASH_THREADS", "1")
        .envs(env.iter().copied())
        .env_remove("RUST_LOG")
        .arg("up")
        .arg("--data-dir")
        .arg(data_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn chat up");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut banner = String::new();
    within(Duration::from_secs(60), "chat up banner", async {
        while let Some(line) = lines.next_line().await.expect("read chat up stdout") {
            banner.push_str(&line);
            banner.push('\n');
            if line.contains("Ctrl-C to stop") {
                return;
            }
        }
        panic!("chat up exited before its banner:\n{banner}");
    })
    .await;
    // Keep draining stdout so the process never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let addr = |s: &str| s.parse::<SocketAddr>().ok();
    let proxy = banner
        .lines()
        .find_map(|l| {
            let rest = l.split("nc ").nth(1)?;
            let mut it = rest.split_whitespace();
            addr(&format!("{}:{}", it.next()?, it.next()?))
        })
        .unwrap_or_else(|| panic!("no proxy address in the banner:\n{banner}"));
    let servers = banner
        .lines()
        .filter(|l| l.contains("(metrics http://") && !l.contains("proxy"))
        .filter_map(|l| l.split_whitespace().find_map(addr))
        .collect();
    Up {
        child,
        proxy,
        servers,
        banner,
    }
}

impl Up {
    /// SIGTERM and a bounded wait for a clean exit.
    async fn stop(mut self) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        let exit = within(Duration::from_secs(20), "chat up exit", self.child.wait())
            .await
            .expect("wait for chat up");
        assert!(exit.success(), "chat up exited with {exit}");
    }
}

/// Three users chat in one room through the proxy; their servers reach each
/// other and the dbproxy over TLS only.
async fn three_users_chat(up: &Up, tag: &str) {
    wait_for_a_server(up.proxy).await;
    let mut clients = Vec::new();
    for name in ["ana", "ben", "cai"] {
        let user = format!("{name}{tag}");
        let (mut c, _) = Client::login(up.proxy, &user, "correct-horse-1").await;
        c.join("lobby").await;
        clients.push((user, c));
    }
    // Joins of later members reach earlier ones; read them off.
    for (_, c) in &mut clients {
        c.sync().await;
    }
    let (sender, c) = &mut clients[0];
    let sender = sender.clone();
    // A fresh client id each time: a repeated one is a resend, acked with
    // the original and not delivered again.
    static SENT: AtomicU32 = AtomicU32::new(0);
    let cid = format!("m{}", SENT.fetch_add(1, Ordering::Relaxed));
    c.msg("lobby", &cid, "hello over tls").await;
    for (_, c) in &mut clients[1..] {
        c.expect("the message", |l| {
            matches!(l, ServerLine::Msg { sender: s, text, .. } if *s == sender && text == "hello over tls")
        })
        .await;
    }
}

/// The proxy starts with the servers and its first health round may run
/// before they are ready; until a later round finds one it answers
/// `ERR UNAVAILABLE`.
async fn wait_for_a_server(proxy: SocketAddr) {
    // Guest names outlive their connections (the token keeps them), so
    // every probe of the test binary takes a name no earlier one held.
    static PROBES: AtomicU32 = AtomicU32::new(0);
    wait_until(
        Duration::from_secs(10),
        "the proxy finds a chat server",
        || {
            let guest = format!("prober{}", PROBES.fetch_add(1, Ordering::Relaxed));
            async move {
                let mut c = Client::connect(proxy, "probe").await;
                c.send(&format!("JOIN probes {guest}")).await;
                match c.recv().await {
                    ServerLine::OkLogin { .. } => true,
                    ServerLine::Err {
                        code: ErrorCode::Unavailable,
                        ..
                    } => false,
                    other => panic!("a guest JOIN through the proxy answered {other}"),
                }
            }
        },
    )
    .await;
}

#[tokio::test]
async fn up_runs_the_internal_hops_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let up = start(dir.path(), &[]).await;
    assert!(up.banner.contains("mutual TLS"), "{}", up.banner);
    assert_eq!(up.servers.len(), 3, "three servers in:\n{}", up.banner);
    three_users_chat(&up, "1").await;

    // A server's client port takes TLS only: a plain login is refused.
    let mut direct = Client::connect(up.servers[0], "direct").await;
    direct.send("LOGIN eve correct-horse-1").await;
    let lines = direct.expect_closed().await;
    assert!(
        lines
            .iter()
            .all(|l| !matches!(l, ServerLine::OkLogin { .. })),
        "plain LOGIN to a TLS server answered {lines:?}"
    );

    #[cfg(unix)]
    for key in ["server.key", "proxy.key", "dbproxy.key"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("tls").join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key} is private");
    }
    let ca = std::fs::read(dir.path().join("tls/ca.pem")).unwrap();
    up.stop().await;

    // A restart keeps the CA (and the users).
    let up = start(dir.path(), &[]).await;
    assert!(up.banner.contains("kept from before"), "{}", up.banner);
    assert_eq!(std::fs::read(dir.path().join("tls/ca.pem")).unwrap(), ca);
    three_users_chat(&up, "1").await;
    up.stop().await;
}

#[tokio::test]
async fn up_without_tls_is_plain() {
    let dir = tempfile::tempdir().unwrap();
    let up = start(dir.path(), &[("CHAT_UP__TLS", "false")]).await;
    assert!(up.banner.contains("plain TCP"), "{}", up.banner);
    three_users_chat(&up, "2").await;
    // Plain TCP straight to a server works again.
    let (mut c, _) = Client::login(up.servers[1], "dee2", "correct-horse-1").await;
    c.join("lobby").await;
    assert!(!dir.path().join("tls").exists(), "no certificates made");
    up.stop().await;
}
