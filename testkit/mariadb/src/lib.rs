//! Real MariaDB servers for tests, the one harness of every suite that needs
//! them (the dbproxy's tests, `tests/core` with `CHAT_TEST_BACKEND=mariadb`,
//! the network-namespace scenarios of `tests/netns`).
//!
//! Each server runs in its own temporary data directory, a copy of one
//! pristine directory made once per target dir with `mariadb-install-db`
//! ([`template`]), which keeps a start at about a second; root speaks SQL
//! over the server's Unix socket ([`Root`]), which needs no network. On
//! loopback, a [`Server`] takes a free port and is killed on drop (also when
//! the test panics); a primary and a GTID replica form a [`Pair`]. Missing
//! binaries make the test fail loudly: it never skips.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const APP_USER: &str = "chat";
pub const APP_PASSWORD: &str = "chat-test-pw";
pub const DATABASE: &str = "chat";

/// How long a server may take to answer its first query.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long replication may take to bring the database to a new replica.
const REPLICATION_TIMEOUT: Duration = Duration::from_secs(30);
/// How many fresh ports a server start tries: a port found free can be taken
/// by another test process before mariadbd binds it.
const START_ATTEMPTS: u32 = 5;

/// A MariaDB program from `/usr/bin` or `/usr/sbin`.
pub fn binary(name: &str) -> PathBuf {
    ["/usr/bin", "/usr/sbin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "MariaDB binary {name} not found in /usr/bin or /usr/sbin: install mariadb-server \
                 and mariadb-client (scripts/test does); these tests never skip"
            )
        })
}

/// Where the template lives: the target dir's `tmp/` (what cargo calls
/// `CARGO_TARGET_TMPDIR`, found from the test binary in `target/*/deps/`),
/// else the system temp dir.
fn template_base() -> PathBuf {
    let exe = std::env::current_exe().ok();
    let target = exe.as_deref().and_then(|e| {
        e.ancestors()
            .find(|a| a.file_name().is_some_and(|n| n == "deps"))
            .and_then(|deps| deps.parent()?.parent())
    });
    match target {
        Some(t) => t.join("tmp"),
        None => std::env::temp_dir(),
    }
}

/// The pristine data directory, made once and reused.
pub fn template() -> &'static Path {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let base = template_base();
        let done = base.join("mariadb-template");
        if done.join("mysql").exists() {
            return done;
        }
        let work = base.join(format!("mariadb-template.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).expect("template dir");
        let out = Command::new(binary("mariadb-install-db"))
            .arg("--no-defaults")
            .arg(format!("--datadir={}", work.display()))
            .arg("--auth-root-authentication-method=normal")
            .arg("--skip-test-db")
            .arg("--user=root")
            .output()
            .expect("running mariadb-install-db");
        assert!(
            out.status.success(),
            "mariadb-install-db failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // Another test process may have won the race: either copy is fine.
        if std::fs::rename(&work, &done).is_err() {
            let _ = std::fs::remove_dir_all(&work);
        }
        done
    })
}

/// Copies the template to `datadir` (which must not exist yet).
pub fn copy_template(datadir: &Path) {
    let status = Command::new("cp")
        .arg("-a")
        .arg(template())
        .arg(datadir)
        .status()
        .expect("cp");
    assert!(status.success(), "copying the MariaDB template failed");
}

/// Where one server keeps its files and listens.
pub struct Layout<'a> {
    /// Holds the pid file and temporary files.
    pub dir: &'a Path,
    pub datadir: &'a Path,
    pub socket: &'a Path,
    pub bind: &'a str,
    pub port: u16,
    pub server_id: u32,
    pub read_only: bool,
}

/// The `mariadbd` arguments every test server shares: binlog with strict
/// GTIDs (so a replica can follow and be promoted), small buffers and no
/// durability flushes (tests do not survive power cuts), root allowed to
/// run it. Callers add their own (`--max-connections`, logs, TLS, …).
pub fn server_args(l: &Layout<'_>) -> Vec<String> {
    vec![
        "--no-defaults".into(),
        format!("--datadir={}", l.datadir.display()),
        format!("--socket={}", l.socket.display()),
        format!("--port={}", l.port),
        format!("--bind-address={}", l.bind),
        format!("--server-id={}", l.server_id),
        "--log-bin=binlog".into(),
        "--gtid-strict-mode=1".into(),
        format!("--pid-file={}", l.dir.join("pid").display()),
        format!("--tmpdir={}", l.dir.display()),
        "--skip-name-resolve".into(),
        "--innodb-buffer-pool-size=32M".into(),
        "--innodb-flush-log-at-trx-commit=2".into(),
        "--sync-binlog=0".into(),
        "--performance-schema=OFF".into(),
        format!("--read-only={}", u8::from(l.read_only)),
        // mariadbd refuses to run as root without being told to.
        "--user=root".into(),
    ]
}

/// Root's SQL connection to one server, over its Unix socket.
pub struct Root {
    socket: PathBuf,
    /// Names the server in panics.
    label: String,
}

impl Root {
    pub fn new(socket: impl Into<PathBuf>, label: impl Into<String>) -> Root {
        Root {
            socket: socket.into(),
            label: label.into(),
        }
    }

    /// Runs SQL; the output as tab-separated rows, no header, values raw.
    pub fn try_sql(&self, sql: &str) -> Result<String, String> {
        let out = Command::new(binary("mariadb"))
            .arg("--no-defaults")
            .arg(format!("--socket={}", self.socket.display()))
            .args(["-uroot", "-N", "-B", "--raw", "-e", sql])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    pub fn sql(&self, sql: &str) -> String {
        self.try_sql(sql)
            .unwrap_or_else(|e| panic!("mariadb {}: {sql}: {e}", self.label))
    }

    /// Waits until the server answers, or `exited` says it is gone (its
    /// reason: the error log).
    pub fn wait_ready(&self, mut exited: impl FnMut() -> Option<String>) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(why) = exited() {
                return Err(why);
            }
            if self.try_sql("SELECT 1").is_ok() {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "mariadb {} not ready after {READY_TIMEOUT:?}",
                self.label
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Creates the database and the application account, for clients from
    /// `from` (an SQL host pattern). The account must not bypass read_only:
    /// no SUPER / READ ONLY ADMIN.
    pub fn create_app_account(&self, from: &str) {
        self.sql(&format!(
            "CREATE DATABASE {DATABASE};
             CREATE USER '{APP_USER}'@'{from}' IDENTIFIED BY '{APP_PASSWORD}';
             GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, INDEX, ALTER, REFERENCES
                ON {DATABASE}.* TO '{APP_USER}'@'{from}';"
        ));
    }

    /// The account replicas follow this server with, from `from`.
    pub fn create_repl_account(&self, from: &str) {
        self.sql(&format!(
            "CREATE USER 'repl'@'{from}' IDENTIFIED BY 'repl';
             GRANT REPLICATION SLAVE ON *.* TO 'repl'@'{from}';"
        ));
    }

    /// Makes this server follow `host:port` by GTID.
    pub fn follow(&self, host: &str, port: u16) {
        self.sql(&format!(
            "STOP SLAVE; CHANGE MASTER TO MASTER_HOST='{host}', MASTER_PORT={port},
                MASTER_USER='repl', MASTER_PASSWORD='repl', MASTER_USE_GTID=slave_pos,
                MASTER_CONNECT_RETRY=1;
             START SLAVE;"
        ));
    }

    /// Waits (bounded) until replication has brought [`DATABASE`] here.
    pub fn wait_replicating(&self) {
        let deadline = Instant::now() + REPLICATION_TIMEOUT;
        while self.sql(&format!("SHOW DATABASES LIKE '{DATABASE}'")) != DATABASE {
            assert!(
                Instant::now() < deadline,
                "replication to {} never started",
                self.label
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A server on a free loopback port.
pub struct Server {
    pub port: u16,
    pub server_id: u32,
    root: Root,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

/// PEM files a server presents for TLS and the CA it is issued by.
pub struct ServerTls<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
    pub ca: &'a Path,
}

impl Server {
    pub fn start(server_id: u32, read_only: bool) -> Server {
        Self::start_with(server_id, read_only, &[])
    }

    /// A writable server that takes TCP clients over TLS only
    /// (`require_secure_transport`; root's socket stays open for `sql`).
    pub fn start_tls(server_id: u32, tls: &ServerTls<'_>) -> Server {
        let args = [
            format!("--ssl-cert={}", tls.cert.display()),
            format!("--ssl-key={}", tls.key.display()),
            format!("--ssl-ca={}", tls.ca.display()),
            "--require-secure-transport=ON".to_string(),
        ];
        Self::start_with(server_id, false, &args)
    }

    fn start_with(server_id: u32, read_only: bool, extra: &[String]) -> Server {
        let mut attempt = 1;
        loop {
            match Self::try_start(server_id, read_only, extra) {
                Ok(server) => return server,
                Err(log) if attempt < START_ATTEMPTS && log.contains("Address already in use") => {
                    attempt += 1;
                }
                Err(log) => panic!("mariadbd (server {server_id}) did not start: {log}"),
            }
        }
    }

    /// One start on one free port; the error log when mariadbd exits early.
    fn try_start(server_id: u32, read_only: bool, extra: &[String]) -> Result<Server, String> {
        let dir = tempfile::Builder::new()
            .prefix("mdb")
            .tempdir()
            .expect("tempdir");
        let datadir = dir.path().join("data");
        copy_template(&datadir);
        let socket = dir.path().join("s.sock");
        let port = free_port();
        let args = server_args(&Layout {
            dir: dir.path(),
            datadir: &datadir,
            socket: &socket,
            bind: "127.0.0.1",
            port,
            server_id,
            read_only,
        });
        let child = Command::new(binary("mariadbd"))
            .args(args)
            .arg(format!(
                "--log-error={}",
                dir.path().join("err.log").display()
            ))
            .arg("--max-connections=200")
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning mariadbd");
        let mut server = Server {
            port,
            server_id,
            root: Root::new(socket, format!("server {server_id}")),
            child: Some(child),
            dir,
        };
        let error_log = server.dir.path().join("err.log");
        let child = server.child.as_mut().expect("just spawned");
        server.root.wait_ready(|| {
            let status = child.try_wait().ok().flatten()?;
            let log = std::fs::read_to_string(&error_log).unwrap_or_default();
            Some(format!("exited with {status}: {log}"))
        })?;
        Ok(server)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Runs SQL as root over the socket (see [`Root::try_sql`]).
    pub fn try_sql(&self, sql: &str) -> Result<String, String> {
        self.root.try_sql(sql)
    }

    pub fn sql(&self, sql: &str) -> String {
        self.root.sql(sql)
    }

    /// The database and the application account, for loopback clients.
    pub fn create_app_account(&self) {
        self.root.create_app_account("127.0.0.1");
    }

    /// SIGKILL: the server vanishes as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A primary and one replica following it by GTID.
pub struct Pair {
    pub primary: Server,
    pub replica: Server,
    pub password_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Pair {
    /// The dbproxy's `[mysql]` settings for this pair (primary, replica,
    /// application user); other keys at their defaults.
    pub fn mysql_config(&self) -> chat_dbproxy::config::MysqlConfig {
        chat_dbproxy::config::MysqlConfig {
            primary: self.primary.addr(),
            replicas: vec![self.replica.addr()],
            user: APP_USER.into(),
            password_file: self.password_file.to_string_lossy().into_owned(),
            database: DATABASE.into(),
            ..Default::default()
        }
    }

    pub fn start() -> Pair {
        let (primary, replica) = std::thread::scope(|s| {
            let p = s.spawn(|| Server::start(1, false));
            let r = s.spawn(|| Server::start(2, true));
            (p.join().expect("primary"), r.join().expect("replica"))
        });
        primary.create_app_account();
        primary.root.create_repl_account("127.0.0.1");
        replica.root.follow("127.0.0.1", primary.port);
        replica.root.wait_replicating();
        let (dir, password_file) = password_file();
        Pair {
            primary,
            replica,
            password_file,
            _dir: dir,
        }
    }
}

/// A temp dir holding the application password in a file, as the dbproxy's
/// `password_file` reads it.
pub fn password_file() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mysql-password");
    std::fs::write(&path, format!("{APP_PASSWORD}\n")).expect("password file");
    (dir, path)
}
