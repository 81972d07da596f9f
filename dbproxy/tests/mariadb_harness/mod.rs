//! Real MariaDB servers for tests: each in its own temporary data directory on
//! a free loopback port, killed on drop (also when the test panics). A primary
//! and a GTID replica form a [`Pair`]. The system data directory is created
//! once per machine with `mariadb-install-db` (a template under the cargo
//! target tmp dir) and copied for every server, which keeps a start at ~1 s.
//! Missing binaries make the test fail loudly: it never skips.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const MARIADBD: &str = "mariadbd";
const INSTALL_DB: &str = "mariadb-install-db";
const CLIENT: &str = "mariadb";
pub const APP_USER: &str = "chat";
pub const APP_PASSWORD: &str = "chat-test-pw";
pub const DATABASE: &str = "chat";

fn binary(name: &str) -> PathBuf {
    let candidates = [
        PathBuf::from(name),
        Path::new("/usr/bin").join(name),
        Path::new("/usr/sbin").join(name),
    ];
    candidates
        .into_iter()
        .find(|p| p.is_absolute() && p.exists())
        .unwrap_or_else(|| {
            panic!(
                "MariaDB binary {name} not found in /usr/bin or /usr/sbin: install mariadb-server \
                 and mariadb-client (scripts/test does); these tests never skip"
            )
        })
}

/// The pristine data directory, made once and reused.
fn template() -> &'static Path {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let done = base.join("mariadb-template");
        if done.join("mysql").exists() {
            return done;
        }
        let work = base.join(format!("mariadb-template.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).expect("template dir");
        let out = Command::new(binary(INSTALL_DB))
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub struct Server {
    pub port: u16,
    pub server_id: u32,
    socket: PathBuf,
    datadir: PathBuf,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

/// How many fresh ports a server start tries: a port found free can be taken
/// by another test process before mariadbd binds it.
const START_ATTEMPTS: u32 = 5;

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
        let mariadbd = binary(MARIADBD);
        let dir = tempfile::Builder::new()
            .prefix("mdb")
            .tempdir()
            .expect("tempdir");
        let datadir = dir.path().join("data");
        let status = Command::new("cp")
            .arg("-a")
            .arg(template())
            .arg(&datadir)
            .status()
            .expect("cp");
        assert!(status.success(), "copying the template data dir failed");
        let socket = dir.path().join("s.sock");
        let port = free_port();
        let mut cmd = Command::new(mariadbd);
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", datadir.display()))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--port={port}"))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--server-id={server_id}"))
            .arg("--log-bin=binlog")
            .arg("--gtid-strict-mode=1")
            .arg(format!("--pid-file={}", dir.path().join("pid").display()))
            .arg(format!(
                "--log-error={}",
                dir.path().join("err.log").display()
            ))
            .arg(format!("--tmpdir={}", dir.path().display()))
            .arg("--skip-name-resolve")
            .arg("--innodb-buffer-pool-size=32M")
            .arg("--innodb-flush-log-at-trx-commit=2")
            .arg("--sync-binlog=0")
            .arg("--performance-schema=OFF")
            .arg("--max-connections=200")
            .arg(format!("--read-only={}", u8::from(read_only)))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // mariadbd refuses to run as root without being told to.
        cmd.arg("--user=root");
        let child = cmd.spawn().expect("spawning mariadbd");
        let mut server = Server {
            port,
            server_id,
            socket,
            datadir,
            child: Some(child),
            _dir: dir,
        };
        server.wait_ready()?;
        Ok(server)
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("exited with {status}: {}", self.error_log()));
                }
            }
            if self.try_sql("SELECT 1").is_ok() {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "mariadbd not ready after 30 s: {}",
                self.error_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn error_log(&self) -> String {
        let log = self.datadir.parent().map(|d| d.join("err.log"));
        log.and_then(|l| std::fs::read_to_string(l).ok())
            .unwrap_or_default()
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Runs SQL as root over the socket; the output, tab-separated, no headers.
    pub fn try_sql(&self, sql: &str) -> Result<String, String> {
        let out = Command::new(binary(CLIENT))
            .arg("--no-defaults")
            .arg(format!("--socket={}", self.socket.display()))
            .args(["-uroot", "-N", "-B", "-e", sql])
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    pub fn sql(&self, sql: &str) -> String {
        self.try_sql(sql)
            .unwrap_or_else(|e| panic!("server {}: {sql}: {e}", self.server_id))
    }

    /// Creates the database and the application account (which must not
    /// bypass read_only: no SUPER / READ ONLY ADMIN).
    pub fn create_app_account(&self) {
        self.sql(&format!(
            "CREATE DATABASE {DATABASE};
             CREATE USER '{APP_USER}'@'127.0.0.1' IDENTIFIED BY '{APP_PASSWORD}';
             GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, INDEX, ALTER, REFERENCES
                ON {DATABASE}.* TO '{APP_USER}'@'127.0.0.1';"
        ));
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
        primary.sql(
            "CREATE USER 'repl'@'127.0.0.1' IDENTIFIED BY 'repl';
             GRANT REPLICATION SLAVE ON *.* TO 'repl'@'127.0.0.1';",
        );
        replica.sql(&format!(
            "CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT={},
                MASTER_USER='repl', MASTER_PASSWORD='repl', MASTER_USE_GTID=slave_pos,
                MASTER_CONNECT_RETRY=1;
             START SLAVE;",
            primary.port
        ));
        let deadline = Instant::now() + Duration::from_secs(20);
        while replica.sql(&format!("SHOW DATABASES LIKE '{DATABASE}'")) != DATABASE {
            assert!(Instant::now() < deadline, "replication never started");
            std::thread::sleep(Duration::from_millis(50));
        }
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
