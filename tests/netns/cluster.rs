//! One cluster on its own private network: every tier a real `chat` process
//! (or `mariadbd`) on its own host namespace.
//!
//! | host | address | runs |
//! | --- | --- | --- |
//! | proxy1, proxy2 | 10.77.0.11-12 | `chat proxy` (:7001, admin :9102) |
//! | srv1..srv3 | 10.77.0.21-23 | `chat server` (:7000, admin :9101) |
//! | dbp1, dbp2 | 10.77.0.31-32 | `chat dbproxy` (API :7100, admin :9103), both on the same MariaDB |
//! | db1 (primary), db2, db3 | 10.77.0.41-43 | `mariadbd` (:3306), semi-sync GTID replication |
//! | client1, client2 | 10.77.0.51-52 | `chat-bench --scenario checked` |
//!
//! Chat servers name both dbproxies (`dbproxy_url = "http://…31:7100,http://…32:7100"`)
//! and, where the binary knows it, their peers (`[server.cluster]`).
//! Fields drop in order: processes first, then the namespaces, then the files.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use chat_bench::record::{self, Entry};

use super::mariadb::{self, Db};
use super::net::{self, Host, Net, SUBNET};
use super::procs::Proc;

pub const CLIENT_HOSTS: usize = 2;
/// Clients per client host.
pub const CLIENTS: usize = 12;
pub const ROOMS: usize = 4;
/// Messages per second per client host.
pub const RATE: f64 = 12.0;
pub const CLUSTER_SECRET: &str = "netns-cluster-secret";

pub fn chat_bin() -> &'static str {
    env!("CARGO_BIN_EXE_chat")
}

/// The `chat-bench` binary, next to `chat`. Cargo names only the binaries of
/// a test's own package (`CARGO_BIN_EXE_*`), and `chat-bench` is another
/// package's: `cargo nextest run --workspace` builds it (its package has
/// tests); running only this test needs `cargo build -p chat-bench` first.
/// Building it from here instead would resolve other features than the
/// test's build did and recompile dependencies inside the test's time limit.
pub fn bench_bin() -> &'static str {
    static BIN: OnceLock<String> = OnceLock::new();
    BIN.get_or_init(|| {
        let bin = Path::new(chat_bin()).with_file_name("chat-bench");
        assert!(
            bin.is_file(),
            "{} is missing: run `cargo build -p chat-bench` (or `cargo nextest run --workspace`)",
            bin.display()
        );
        bin.display().to_string()
    })
}

fn addr(octet: u8, port: u16) -> String {
    format!("{SUBNET}.{octet}:{port}")
}

pub fn server_addr(i: usize) -> String {
    addr(21 + i as u8, 7000)
}
fn server_admin(i: usize) -> String {
    addr(21 + i as u8, 9101)
}
pub fn proxy_addr(i: usize) -> String {
    addr(11 + i as u8, 7001)
}
fn proxy_ip(i: usize) -> String {
    let a = proxy_addr(i);
    a.rsplit_once(':')
        .map(|(ip, _)| ip.to_string())
        .unwrap_or(a)
}
fn proxy_admin(i: usize) -> String {
    addr(11 + i as u8, 9102)
}
fn dbproxy_addr(i: usize) -> String {
    addr(31 + i as u8, 7100)
}
fn dbproxy_admin(i: usize) -> String {
    addr(31 + i as u8, 9103)
}

/// Whether this `chat` build accepts `[server.cluster]`; without
/// it a room's members on different servers see each other's messages only
/// through HISTORY.
pub fn cluster_supported() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("probe.toml");
        std::fs::write(&f, server_toml(0, true)).expect("write");
        let mut cmd = Command::new(chat_bin());
        super::procs::strip_chat_env(&mut cmd);
        let ok = cmd
            .args(["--check-config", "--config"])
            .arg(&f)
            .arg("server")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        eprintln!("netns: [server.cluster] supported by this build: {ok}");
        ok
    })
}

fn server_toml(i: usize, cluster: bool) -> String {
    let dbp: Vec<String> = (0..2)
        .map(|k| format!("http://{}", dbproxy_addr(k)))
        .collect();
    let mut s = format!(
        "[log]\nlevel = \"info\"\n[server]\nlisten = \"{}\"\nadmin_listen = \"{}\"\n\
         dbproxy_url = \"{}\"\nshutdown_grace_secs = 2\n\
         trust_proxy_line = [{}]\n",
        server_addr(i),
        server_admin(i),
        dbp.join(","),
        // The proxies' namespaces: they send a PROXY line per client.
        (0..2)
            .map(|k| format!("\"{}\"", proxy_ip(k)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if cluster {
        let peers: Vec<String> = (0..3).map(|k| format!("\"{}\"", server_addr(k))).collect();
        s.push_str(&format!(
            "[server.cluster]\nadvertise = \"{}\"\npeers = [{}]\nsecret = \"{CLUSTER_SECRET}\"\n",
            server_addr(i),
            peers.join(", ")
        ));
    }
    s
}

fn proxy_toml(i: usize) -> String {
    let servers: Vec<String> = (0..3)
        .map(|k| {
            format!(
                "{{ client = \"{}\", admin = \"{}\" }}",
                server_addr(k),
                server_admin(k)
            )
        })
        .collect();
    format!(
        "[log]\nlevel = \"info\"\n[proxy]\nlisten = \"{}\"\nadmin_listen = \"{}\"\n\
         servers = [{}]\nhealth_interval_ms = 200\nhealth_timeout_ms = 300\n\
         eject_after_failures = 2\nconnect_timeout_ms = 500\nshutdown_grace_secs = 2\n",
        proxy_addr(i),
        proxy_admin(i),
        servers.join(", ")
    )
}

fn dbproxy_toml(i: usize, password_file: &Path) -> String {
    format!(
        "[log]\nlevel = \"info\"\n[dbproxy]\nlisten = \"{}\"\nadmin_listen = \"{}\"\nbackend = \"mysql\"\nshutdown_grace_secs = 2\n\
         [dbproxy.mysql]\nprimary = \"{}\"\nreplicas = [\"{}\", \"{}\"]\nuser = \"{}\"\n\
         password_file = \"{}\"\ndatabase = \"{}\"\n",
        dbproxy_addr(i),
        dbproxy_admin(i),
        addr(41, 3306),
        addr(42, 3306),
        addr(43, 3306),
        mariadb::APP_USER,
        password_file.display(),
        mariadb::DATABASE
    )
}

pub use chat_testkit::blocking::wait_until;

pub struct Cluster {
    pub clients: Vec<Proc>,
    pub proxies: Vec<Proc>,
    pub servers: Vec<Proc>,
    pub dbproxies: Vec<Proc>,
    pub dbs: Vec<Db>,
    /// Index into `dbs` of the current primary.
    pub primary: usize,
    pub hosts: Vec<Host>,
    pub net: Net,
    pub dir: tempfile::TempDir,
    pub run_id: String,
    pub records: Vec<PathBuf>,
}

impl Cluster {
    pub fn host(&self, name: &str) -> &Host {
        self.hosts.iter().find(|h| h.name == name).expect("host")
    }

    /// The namespace probes run from (a client host).
    pub fn probe_ns(&self) -> String {
        self.host("client1").ns.clone()
    }

    pub fn start(tag: &str) -> Cluster {
        // Before anything is set up: without the bench, fail at once.
        bench_bin();
        net::remove_stale();
        let dir = tempfile::Builder::new()
            .prefix("chat-netns")
            .tempdir()
            .expect("tempdir");
        let mut net = Net::new(tag);
        let mut hosts = Vec::new();
        for (name, octet) in [
            ("proxy1", 11),
            ("proxy2", 12),
            ("srv1", 21),
            ("srv2", 22),
            ("srv3", 23),
            ("dbp1", 31),
            ("dbp2", 32),
            ("db1", 41),
            ("db2", 42),
            ("db3", 43),
            ("client1", 51),
            ("client2", 52),
        ] {
            hosts.push(net.host(name, octet));
        }
        let h = |n: &str| hosts.iter().find(|h| h.name == n).expect("host");
        let dbs = mariadb::start_cluster(h("db1"), &[h("db2"), h("db3")], dir.path());
        let password_file = dir.path().join("mysql-password");
        std::fs::write(&password_file, format!("{}\n", mariadb::APP_PASSWORD)).expect("pw");
        let cluster_keys = cluster_supported();
        let spawn = |tier: &str, name: &str, toml: String| {
            let cfg = dir.path().join(format!("{name}.toml"));
            std::fs::write(&cfg, toml).expect("config");
            let args = vec!["--config".into(), cfg.display().to_string(), tier.into()];
            Proc::spawn(
                name,
                &h(name).ns,
                chat_bin(),
                &args,
                dir.path().join(format!("{name}.log")),
            )
        };
        let dbproxies: Vec<Proc> = (0..2)
            .map(|i| {
                spawn(
                    "dbproxy",
                    &format!("dbp{}", i + 1),
                    dbproxy_toml(i, &password_file),
                )
            })
            .collect();
        let servers: Vec<Proc> = (0..3)
            .map(|i| {
                spawn(
                    "server",
                    &format!("srv{}", i + 1),
                    server_toml(i, cluster_keys),
                )
            })
            .collect();
        let proxies: Vec<Proc> = (0..2)
            .map(|i| spawn("proxy", &format!("proxy{}", i + 1), proxy_toml(i)))
            .collect();
        let run_id = format!("n{}", std::process::id() % 100_000);
        let mut c = Cluster {
            clients: Vec::new(),
            proxies,
            servers,
            dbproxies,
            dbs,
            primary: 0,
            hosts,
            net,
            dir,
            run_id,
            records: Vec::new(),
        };
        for i in 0..2 {
            c.wait_dbproxy_ready(i);
        }
        for i in 0..3 {
            c.wait_server_ready(i);
        }
        for i in 0..2 {
            c.wait_proxy_ready(i);
        }
        c
    }

    fn wait_ready(&mut self, what: &str, url: String, which: fn(&mut Cluster) -> &mut Proc) {
        let ns = self.probe_ns();
        let start = Instant::now();
        while net::http_get(&ns, &url).is_none() {
            which(self).assert_running();
            if start.elapsed() > Duration::from_secs(30) {
                panic!("{what} not ready at {url}:\n{}", which(self).log_tail());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn wait_dbproxy_ready(&mut self, i: usize) {
        // The admin port, as the kubelet probes it.
        let url = format!("http://{}/readyz", dbproxy_admin(i));
        let p: fn(&mut Cluster) -> &mut Proc = match i {
            0 => |c| &mut c.dbproxies[0],
            _ => |c| &mut c.dbproxies[1],
        };
        self.wait_ready("dbproxy", url, p);
    }

    pub fn wait_server_ready(&mut self, i: usize) {
        let url = format!("http://{}/readyz", server_admin(i));
        let p: fn(&mut Cluster) -> &mut Proc = match i {
            0 => |c| &mut c.servers[0],
            1 => |c| &mut c.servers[1],
            _ => |c| &mut c.servers[2],
        };
        self.wait_ready("chat server", url, p);
    }

    pub fn wait_proxy_ready(&mut self, i: usize) {
        let url = format!("http://{}/readyz", proxy_admin(i));
        let p: fn(&mut Cluster) -> &mut Proc = match i {
            0 => |c| &mut c.proxies[0],
            _ => |c| &mut c.proxies[1],
        };
        self.wait_ready("proxy", url, p);
    }

    /// Starts the workload on every client host for `secs` seconds.
    pub fn start_clients(&mut self, secs: u64) {
        let targets = format!("{},{}", proxy_addr(0), proxy_addr(1));
        for k in 0..CLIENT_HOSTS {
            let name = format!("client{}", k + 1);
            let record = self.dir.path().join(format!("{name}.jsonl"));
            let args: Vec<String> = [
                "--scenario",
                "checked",
                "--target",
                &targets,
                "--clients",
                &CLIENTS.to_string(),
                "--rooms",
                &ROOMS.to_string(),
                "--rate",
                &RATE.to_string(),
                "--duration",
                &secs.to_string(),
                "--run-id",
                &self.run_id,
                "--hosts",
                &CLIENT_HOSTS.to_string(),
                "--host-index",
                &k.to_string(),
                "--record",
                &record.display().to_string(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let ns = self.host(&name).ns.clone();
            let log = self.dir.path().join(format!("{name}.log"));
            self.clients
                .push(Proc::spawn(&name, &ns, bench_bin(), &args, log));
            self.records.push(record);
        }
    }

    /// Acks recorded so far over every client host.
    pub fn acks(&self) -> usize {
        self.records
            .iter()
            .map(|r| {
                // A line being written is left out until it is whole.
                let text = std::fs::read_to_string(r).unwrap_or_default();
                let records = record::parse(&text).unwrap_or_else(|e| panic!("{e:#}"));
                records
                    .iter()
                    .filter(|r| matches!(r.entry, Entry::Ack(_)))
                    .count()
            })
            .sum()
    }

    /// Waits until traffic flows: `n` acks recorded.
    pub fn wait_traffic(&mut self, n: usize) {
        let start = Instant::now();
        while self.acks() < n {
            for c in &mut self.clients {
                c.assert_running();
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "no traffic: {} acks after 60 s\n{}",
                self.acks(),
                self.clients[0].log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the workload to finish on its own (bounded).
    pub fn wait_clients(&mut self, limit: Duration) {
        for c in &mut self.clients {
            assert!(
                c.wait(limit),
                "{} did not finish within {limit:?}:\n{}",
                c.name,
                c.log_tail()
            );
        }
    }

    pub fn primary_db(&self) -> &Db {
        &self.dbs[self.primary]
    }

    /// Kills the primary, promotes the most advanced replica, repoints the
    /// other one to it. Returns the new primary's index.
    pub fn fail_over_primary(&mut self) -> usize {
        let old = self.primary;
        self.dbs[old].proc.kill();
        let candidates: Vec<usize> = (0..self.dbs.len()).filter(|&i| i != old).collect();
        for &i in &candidates {
            self.dbs[i].apply_relay_log();
        }
        let new = *candidates
            .iter()
            .max_by_key(|&&i| self.dbs[i].gtid_seq())
            .expect("a replica");
        self.dbs[new].sql(
            "STOP SLAVE; RESET SLAVE ALL; SET GLOBAL rpl_semi_sync_master_enabled = 1;
             SET GLOBAL read_only = 0;",
        );
        let new_ip = self.dbs[new].ip.clone();
        for &i in &candidates {
            if i != new {
                self.dbs[i].follow(&new_ip);
            }
        }
        self.primary = new;
        new
    }
}

impl Drop for Cluster {
    /// A failing scenario shows the end of every process's log; with
    /// `CHAT_NETNS_KEEP=1` the directory (logs, records, data) is kept.
    fn drop(&mut self) {
        if std::env::var_os("CHAT_NETNS_KEEP").is_some() {
            let kept =
                std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir")).keep();
            eprintln!("netns: kept {}", kept.display());
        }
        if !std::thread::panicking() {
            return;
        }
        let procs = self
            .clients
            .iter()
            .chain(&self.proxies)
            .chain(&self.servers)
            .chain(&self.dbproxies)
            .chain(self.dbs.iter().map(|d| &d.proc));
        for p in procs {
            eprintln!(
                "---- {} ({}) ----\n{}",
                p.name,
                p.log.display(),
                p.log_tail()
            );
        }
    }
}
