//! A flood of wrong-password logins against a real `chat dbproxy` process:
//! its memory stays bounded (the argon2 memory of the hashing threads is
//! allocated once and reused) instead of growing to gigabytes.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chat_storage_api::ErrorKind;
use chat_storage_client::DbClient;
use futures::StreamExt;

use crate::common::{try_http_get, within};

/// The dbproxy's two hashing threads hold 19 MiB of argon2 memory each;
/// allocated per hash instead, the freed blocks stayed in glibc's arenas
/// and a burst of a few hundred logins left 1–2.3 GB resident.
const HASH_THREADS: u64 = 2;
const ARGON2_MIB: u64 = 19;
/// Everything else a busy dbproxy may add over its idle size (request
/// buffers, SQLite page caches, the runtime's threads).
const SLACK_MIB: u64 = 64;

struct Dbproxy {
    child: Child,
    log: std::path::PathBuf,
}

impl Drop for Dbproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Dbproxy {
    /// `chat dbproxy` on free loopback ports with its SQLite file in `dir`:
    /// the API's base URL and the admin address (`/metrics`).
    async fn start(dir: &Path) -> (Dbproxy, String, std::net::SocketAddr) {
        for attempt in 0..5 {
            // A free port; another process may take it before the child
            // binds it, so a child that exits at once is started again.
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let admin_port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let config = dir.join(format!("dbproxy{attempt}.toml"));
            let log = dir.join(format!("dbproxy{attempt}.log"));
            std::fs::write(
                &config,
                format!(
                    "[log]\nlevel = \"warn\"\n[dbproxy]\nlisten = \"127.0.0.1:{port}\"\n\
                     admin_listen = \"127.0.0.1:{admin_port}\"\n\
                     sqlite_path = \"{}\"\nhash_threads = {HASH_THREADS}\n\
                     login_failures_per_account = 1000000\n\
                     login_failures_per_source = 1000000\n",
                    dir.join("chat.db").display()
                ),
            )
            .unwrap();
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_chat"));
            // Only the file configures it.
            for (k, _) in std::env::vars_os() {
                if k.to_string_lossy().starts_with("CHAT_") {
                    cmd.env_remove(k);
                }
            }
            let out = std::fs::File::create(&log).unwrap();
            let child = cmd
                .arg("--config")
                .arg(&config)
                .arg("dbproxy")
                .env_remove("RUST_LOG")
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .spawn()
                .expect("spawn chat dbproxy");
            let mut p = Dbproxy { child, log };
            let addr = format!("127.0.0.1:{port}").parse().unwrap();
            let end = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Ok((200, _))) =
                    tokio::time::timeout(Duration::from_secs(1), try_http_get(addr, "/readyz"))
                        .await
                {
                    let admin = format!("127.0.0.1:{admin_port}").parse().unwrap();
                    return (p, format!("http://127.0.0.1:{port}"), admin);
                }
                if let Ok(Some(_)) = p.child.try_wait() {
                    break;
                }
                assert!(Instant::now() < end, "dbproxy not ready:\n{}", p.log_tail());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            eprintln!("dbproxy exited during startup, retrying:\n{}", p.log_tail());
        }
        panic!("chat dbproxy did not start in 5 attempts");
    }

    fn log_tail(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// (VmRSS, VmHWM) in KiB, from /proc/<pid>/status.
    fn memory_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("/proc/<pid>/status of the dbproxy");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} in /proc/<pid>/status"))
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_wrong_passwords_keeps_dbproxy_memory_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let (proxy, base, admin) = Dbproxy::start(dir.path()).await;
    let client = DbClient::new(&base);
    client.login("victim", "the right one", None).await.unwrap();
    let (idle_rss, _) = proxy.memory_kib();

    // 1000 wrong passwords, 64 at a time (within the hashing queue of 128,
    // so every one is really checked).
    let outcomes: Vec<_> = within(
        Duration::from_secs(600),
        "1000 wrong-password logins",
        futures::stream::iter(0..1000)
            .map(|_| {
                let c = client.clone();
                async move { c.login("victim", "wrong", None).await }
            })
            .buffer_unordered(64)
            .collect(),
    )
    .await;
    for o in &outcomes {
        assert_eq!(o.as_ref().unwrap_err().kind, ErrorKind::AuthFailed, "{o:?}");
    }
    let (_, metrics) = try_http_get(admin, "/metrics").await.unwrap();
    let hashes: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("chat_dbproxy_password_hashes_total "))
        .and_then(|v| v.parse().ok())
        .expect("chat_dbproxy_password_hashes_total");
    assert!(hashes >= 1001.0, "{hashes} hashes for 1001 logins");

    let (rss, hwm) = proxy.memory_kib();
    let bound = idle_rss + (HASH_THREADS * ARGON2_MIB + SLACK_MIB) * 1024;
    eprintln!(
        "dbproxy RSS: idle {idle_rss} KiB, after {rss} KiB, peak {hwm} KiB, bound {bound} KiB"
    );
    assert!(
        hwm <= bound,
        "dbproxy peak RSS {hwm} KiB after 1000 wrong-password logins; bound {bound} KiB \
         (idle {idle_rss} KiB + {HASH_THREADS} × {ARGON2_MIB} MiB argon2 + {SLACK_MIB} MiB)"
    );
    // Still serving.
    client.login("victim", "the right one", None).await.unwrap();
}
