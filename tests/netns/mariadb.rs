//! MariaDB servers in host namespaces: a primary and GTID replicas with
//! semi-synchronous replication (a commit returns only once a replica has
//! the transaction, so promoting the most advanced replica loses nothing
//! acknowledged), `log_slave_updates` so a promoted replica can feed the
//! others. Data directories are copies of one `mariadb-install-db` template
//! (the same one dbproxy/tests/mariadb_harness makes). Root speaks SQL over the
//! Unix socket, which needs no network.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::net::{Host, SUBNET};
use super::procs::Proc;

pub const APP_USER: &str = "chat";
pub const APP_PASSWORD: &str = "chat-netns-pw";
pub const DATABASE: &str = "chat";
pub const PORT: u16 = 3306;

fn binary(name: &str) -> PathBuf {
    ["/usr/sbin", "/usr/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{name} not found: install mariadb-server (scripts/test does)"))
}

fn template() -> PathBuf {
    static TEMPLATE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    TEMPLATE.get_or_init(make_template).clone()
}

fn make_template() -> PathBuf {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
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
        .expect("mariadb-install-db");
    assert!(
        out.status.success(),
        "mariadb-install-db: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if std::fs::rename(&work, &done).is_err() {
        let _ = std::fs::remove_dir_all(&work);
    }
    done
}

pub struct Db {
    pub ip: String,
    socket: PathBuf,
    pub proc: Proc,
}

impl Db {
    pub fn start(host: &Host, dir: &Path, server_id: u32, read_only: bool) -> Db {
        let dir = dir.join(&host.name);
        std::fs::create_dir_all(&dir).expect("db dir");
        let datadir = dir.join("data");
        let ok = Command::new("cp")
            .arg("-a")
            .arg(template())
            .arg(&datadir)
            .status()
            .expect("cp");
        assert!(ok.success(), "copying the MariaDB template");
        let socket = dir.join("s.sock");
        let args: Vec<String> = vec![
            "--no-defaults".into(),
            format!("--datadir={}", datadir.display()),
            format!("--socket={}", socket.display()),
            format!("--port={PORT}"),
            format!("--bind-address={}", host.ip),
            format!("--server-id={server_id}"),
            "--log-bin=binlog".into(),
            "--log-slave-updates=1".into(),
            "--gtid-strict-mode=1".into(),
            format!("--pid-file={}", dir.join("pid").display()),
            format!("--tmpdir={}", dir.display()),
            "--skip-name-resolve".into(),
            "--innodb-buffer-pool-size=32M".into(),
            "--innodb-flush-log-at-trx-commit=2".into(),
            "--sync-binlog=0".into(),
            "--performance-schema=OFF".into(),
            "--max-connections=300".into(),
            // The master side is switched on for the primary once its
            // replicas are attached (see start_cluster and promote).
            "--rpl-semi-sync-master-enabled=0".into(),
            "--rpl-semi-sync-slave-enabled=1".into(),
            "--rpl-semi-sync-master-wait-point=AFTER_SYNC".into(),
            "--rpl-semi-sync-master-timeout=5000".into(),
            format!("--read-only={}", u8::from(read_only)),
            "--user=root".into(),
        ];
        let proc = Proc::spawn(
            &host.name,
            &host.ns,
            binary("mariadbd"),
            &args,
            dir.join("mariadbd.log"),
        );
        let mut db = Db {
            ip: host.ip.clone(),
            socket,
            proc,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while db.try_sql("SELECT 1").is_err() {
            db.proc.assert_running();
            assert!(
                Instant::now() < deadline,
                "mariadbd {} not ready:\n{}",
                host.name,
                db.proc.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        db
    }

    /// SQL as root over the socket: tab-separated rows, no header.
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
            .unwrap_or_else(|e| panic!("mariadb {}: {sql}: {e}", self.ip))
    }

    /// Makes this server follow `primary` by GTID.
    pub fn follow(&self, primary: &str) {
        self.sql(&format!(
            "STOP SLAVE; CHANGE MASTER TO MASTER_HOST='{primary}', MASTER_PORT={PORT},
                MASTER_USER='repl', MASTER_PASSWORD='repl', MASTER_USE_GTID=slave_pos,
                MASTER_CONNECT_RETRY=1;
             START SLAVE;"
        ));
    }

    /// The sequence number of the last transaction applied here.
    pub fn gtid_seq(&self) -> u64 {
        let pos = self.sql("SELECT @@gtid_current_pos");
        pos.split(',')
            .filter_map(|g| g.rsplit('-').next()?.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
    }

    /// Waits (bounded) until the relay log received here is applied.
    pub fn apply_relay_log(&self) {
        let status = self.sql("SHOW SLAVE STATUS\\G");
        let io_pos = status
            .lines()
            .find_map(|l| l.trim().strip_prefix("Gtid_IO_Pos:"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        if !io_pos.is_empty() {
            let _ = self.try_sql(&format!("SELECT MASTER_GTID_WAIT('{io_pos}', 10)"));
        }
    }
}

/// A primary and replicas, replication running, database and accounts made.
pub fn start_cluster(primary: &Host, replicas: &[&Host], dir: &Path) -> Vec<Db> {
    let mut dbs = std::thread::scope(|s| {
        let p = s.spawn(|| Db::start(primary, dir, 1, false));
        let rs: Vec<_> = replicas
            .iter()
            .enumerate()
            .map(|(i, h)| s.spawn(move || Db::start(h, dir, 2 + i as u32, true)))
            .collect();
        let mut v = vec![p.join().expect("primary")];
        v.extend(rs.into_iter().map(|r| r.join().expect("replica")));
        v
    });
    // The app account must not bypass read_only (no SUPER / READ ONLY ADMIN).
    dbs[0].sql(&format!(
        "CREATE DATABASE {DATABASE};
         CREATE USER '{APP_USER}'@'{SUBNET}.%' IDENTIFIED BY '{APP_PASSWORD}';
         GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, INDEX, ALTER, REFERENCES
            ON {DATABASE}.* TO '{APP_USER}'@'{SUBNET}.%';
         CREATE USER 'repl'@'{SUBNET}.%' IDENTIFIED BY 'repl';
         GRANT REPLICATION SLAVE ON *.* TO 'repl'@'{SUBNET}.%';"
    ));
    let primary_ip = dbs[0].ip.clone();
    for r in &dbs[1..] {
        r.follow(&primary_ip);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for r in &dbs[1..] {
        while r.sql(&format!("SHOW DATABASES LIKE '{DATABASE}'")) != DATABASE {
            assert!(
                Instant::now() < deadline,
                "replication to {} never started",
                r.ip
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    dbs[0].sql("SET GLOBAL rpl_semi_sync_master_enabled = 1");
    dbs.iter_mut().for_each(|d| d.proc.assert_running());
    dbs
}
