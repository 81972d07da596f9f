//! MariaDB servers in host namespaces: a primary and GTID replicas with
//! semi-synchronous replication (a commit returns only once a replica has
//! the transaction, so promoting the most advanced replica loses nothing
//! acknowledged), `log_slave_updates` so a promoted replica can feed the
//! others. Data directories, the common server arguments and root's SQL over
//! the Unix socket (which needs no network) come from
//! `chat_mariadb_harness`, the harness of the other suites.

use std::path::Path;

use chat_mariadb_harness::{binary, copy_template, server_args, Layout, Root};
pub use chat_mariadb_harness::{APP_PASSWORD, APP_USER, DATABASE};

use super::net::{Host, SUBNET};
use super::procs::Proc;

pub const PORT: u16 = 3306;

pub struct Db {
    pub ip: String,
    root: Root,
    pub proc: Proc,
}

impl Db {
    pub fn start(host: &Host, dir: &Path, server_id: u32, read_only: bool) -> Db {
        let dir = dir.join(&host.name);
        std::fs::create_dir_all(&dir).expect("db dir");
        let datadir = dir.join("data");
        copy_template(&datadir);
        let socket = dir.join("s.sock");
        let mut args = server_args(&Layout {
            dir: &dir,
            datadir: &datadir,
            socket: &socket,
            bind: &host.ip,
            port: PORT,
            server_id,
            read_only,
        });
        args.extend(
            [
                "--log-slave-updates=1",
                "--max-connections=300",
                // The master side is switched on for the primary once its
                // replicas are attached (see start_cluster and promote).
                "--rpl-semi-sync-master-enabled=0",
                "--rpl-semi-sync-slave-enabled=1",
                "--rpl-semi-sync-master-wait-point=AFTER_SYNC",
                "--rpl-semi-sync-master-timeout=5000",
            ]
            .map(String::from),
        );
        let proc = Proc::spawn(
            &host.name,
            &host.ns,
            binary("mariadbd"),
            &args,
            dir.join("mariadbd.log"),
        );
        let mut db = Db {
            ip: host.ip.clone(),
            root: Root::new(socket, &host.name),
            proc,
        };
        let ready = db.root.wait_ready(|| {
            db.proc.assert_running();
            None
        });
        if let Err(e) = ready {
            panic!(
                "mariadbd {} not ready: {e}\n{}",
                host.name,
                db.proc.log_tail()
            );
        }
        db
    }

    /// SQL as root over the socket: tab-separated rows, no header.
    pub fn try_sql(&self, sql: &str) -> Result<String, String> {
        self.root.try_sql(sql)
    }

    pub fn sql(&self, sql: &str) -> String {
        self.root.sql(sql)
    }

    /// Makes this server follow `primary` by GTID.
    pub fn follow(&self, primary: &str) {
        self.root.follow(primary, PORT);
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
    let from = format!("{SUBNET}.%");
    dbs[0].root.create_app_account(&from);
    dbs[0].root.create_repl_account(&from);
    let primary_ip = dbs[0].ip.clone();
    for r in &dbs[1..] {
        r.follow(&primary_ip);
    }
    for r in &dbs[1..] {
        r.root.wait_replicating();
    }
    dbs[0].sql("SET GLOBAL rpl_semi_sync_master_enabled = 1");
    dbs.iter_mut().for_each(|d| d.proc.assert_running());
    dbs
}
