//! The deployment's configuration and monitoring against the real code.
//!
//! - every TOML that the Kubernetes ConfigMaps hold deserializes into the tier's
//!   config struct (unknown keys rejected) and validates, the proxy's included
//!   (scripts/check-deploy also loads them through the `chat` binary);
//! - a real Prometheus (`prometheus` on PATH, Debian package; scripts/check-deploy
//!   installs it) scrapes a running dbproxy + chat server + proxy, loads
//!   deploy/prometheus/rules.yml, sees every tier `up == 1`, sees
//!   `chat_messages_total` grow after traffic, and evaluates every rule without
//!   error; every metric the rules and the Grafana dashboard use is in the tiers'
//!   /metrics output — the MySQL-only ones in the /metrics of a dbproxy running
//!   on a real MariaDB primary and replica (the dbproxy's test harness).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chat_testkit::wait_for;

use serde::Deserialize;

use chat_mariadb_harness as mariadb;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

// ---- the ConfigMaps' TOML ---------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProxyFile {
    #[serde(default)]
    #[allow(dead_code)]
    log: Option<serde::de::IgnoredAny>,
    proxy: chat_proxy::Config,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerFile {
    #[serde(default)]
    #[allow(dead_code)]
    log: Option<serde::de::IgnoredAny>,
    server: chat_server::Config,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DbproxyFile {
    #[serde(default)]
    #[allow(dead_code)]
    log: Option<serde::de::IgnoredAny>,
    dbproxy: chat_dbproxy::Config,
}

fn load<T: serde::de::DeserializeOwned>(path: &Path) -> T {
    config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Toml))
        .build()
        .and_then(|c| c.try_deserialize::<T>())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn configmap_toml_loads_into_every_tier_config() {
    let k8s = root().join("deploy/k8s");
    let p: ProxyFile = load(&k8s.join("base/config/proxy.toml"));
    p.proxy.validate().expect("base proxy.toml validates");
    assert!(
        p.proxy.dns_name.is_some(),
        "the proxy finds servers through DNS"
    );
    assert_eq!(p.proxy.shutdown_grace_secs, Duration::from_secs(20));

    let mut s: ServerFile = load(&k8s.join("base/config/server.toml"));
    assert!(
        s.server.cluster.dns_name.is_some(),
        "the servers find each other through DNS"
    );
    // The pod's environment supplies the secret (Secret chat-cluster).
    assert!(
        s.server.cluster.secret.is_empty(),
        "no secret in the ConfigMap"
    );
    s.server.cluster.secret = "from-the-chat-cluster-secret".into();
    s.server.validate().expect("base server.toml validates");

    for f in [
        "base/config/dbproxy.toml",
        "overlays/production/dbproxy.toml",
    ] {
        let d: DbproxyFile = load(&k8s.join(f));
        d.dbproxy.validate().unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(d.dbproxy.backend, chat_dbproxy::StorageKind::Mysql, "{f}");
        assert!(!d.dbproxy.mysql.password_file.is_empty(), "{f}");
    }
}

// ---- Prometheus against a running stack ---------------------------------------

/// Metrics that exist only on the MySQL backend: the SQLite stack of the
/// Prometheus test lacks them; `mysql_only_metrics_are_exposed` checks them live.
const MYSQL_ONLY: &[&str] = &[
    "chat_dbproxy_replica_lag_seconds",
    "chat_dbproxy_causal_fallbacks_total",
    "chat_dbproxy_pool_connections",
];

/// Kills and reaps Prometheus however the test ends.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts Prometheus on a free port and waits until it is ready. A port found
/// free can be taken by another test process before Prometheus binds it: then
/// it exits, and the start is tried again on a fresh port.
async fn start_prometheus(targets: &[(&str, SocketAddr)]) -> Prometheus {
    const ATTEMPTS: u32 = 5;
    let bin = find_on_path("prometheus").unwrap_or_else(|| {
        panic!(
            "`prometheus` is not on PATH: install the Debian package `prometheus` \
             (scripts/check-deploy does)"
        )
    });
    let mut cfg = String::from(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n",
    );
    cfg += &format!(
        "rule_files:\n  - {}\nscrape_configs:\n",
        root().join("deploy/prometheus/rules.yml").display()
    );
    for (job, addr) in targets {
        cfg += &format!(
            "  - job_name: {job}\n    metrics_path: /metrics\n    static_configs:\n      - targets: ['{addr}']\n"
        );
    }
    for attempt in 1..=ATTEMPTS {
        let dir = tempfile::tempdir().unwrap();
        let cfg_path = dir.path().join("prometheus.yml");
        std::fs::write(&cfg_path, &cfg).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(&bin)
            .arg(format!("--config.file={}", cfg_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let mut prom = Prometheus {
            child,
            addr,
            _dir: dir,
        };
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = prom.child.try_wait() {
                let log = prom.log();
                if attempt < ATTEMPTS && log.contains("address already in use") {
                    break;
                }
                panic!("prometheus exited with {status}: {log}");
            }
            if matches!(http_get(addr, "/-/ready").await, Ok((200, _))) {
                return prom;
            }
            assert!(
                Instant::now() < end,
                "prometheus not ready after 30 s: {}",
                prom.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    unreachable!("the last attempt returns or panics")
}

impl Prometheus {
    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// The `data` of a Prometheus API answer; panics on an error answer.
    async fn api(&self, path: &str) -> Option<serde_json::Value> {
        let (status, body) = http_get(self.addr, path).await.ok()?;
        if status != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        (v["status"] == "success").then(|| v["data"].clone())
    }

    async fn query(&self, promql: &str) -> Vec<serde_json::Value> {
        let path = format!("/api/v1/query?query={}", urlencode(promql));
        self.api(&path)
            .await
            .and_then(|d| d["result"].as_array().cloned())
            .unwrap_or_default()
    }

    async fn scalar(&self, promql: &str) -> Option<f64> {
        let r = self.query(promql).await;
        r.first()?["value"][1].as_str()?.parse().ok()
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let fut = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Ok((status, body.to_owned()))
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("timeout")))
}

/// A line-protocol session.
struct Line {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
}

impl Line {
    async fn connect(addr: SocketAddr) -> Line {
        let (r, w) = TcpStream::connect(addr).await.unwrap().into_split();
        Line {
            reader: BufReader::new(r),
            writer: w,
        }
    }

    /// Sends `line` and reads until a line starting with `prefix`.
    async fn call(&mut self, line: &str, prefix: &str) -> String {
        self.writer
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .unwrap();
        let fut = async {
            loop {
                let mut l = String::new();
                assert!(
                    self.reader.read_line(&mut l).await.unwrap() > 0,
                    "closed before {prefix:?} answering {line:?}"
                );
                if l.starts_with(prefix) {
                    return l.trim_end().to_owned();
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), fut)
            .await
            .unwrap_or_else(|_| panic!("no {prefix:?} answering {line:?}"))
    }
}

struct Tiers {
    cancel: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The dbproxy's admin port (what Prometheus scrapes).
    dbproxy: SocketAddr,
    server_admin: SocketAddr,
    proxy: SocketAddr,
    proxy_admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Tiers {
    fn drop(&mut self) {
        self.cancel.cancel();
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn bind() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

async fn start_tiers() -> Tiers {
    let dir = tempfile::tempdir().unwrap();
    let cancel = CancellationToken::new();
    let mut tasks = Vec::new();

    let (api, dbproxy_api) = bind().await;
    let (admin, dbproxy) = bind().await;
    let db_cfg = chat_dbproxy::Config {
        sqlite_path: dir.path().join("chat.db").to_string_lossy().into_owned(),
        shutdown_grace_secs: Duration::from_secs(1),
        ..Default::default()
    };
    let c = cancel.clone();
    tasks.push(tokio::spawn(async move {
        let l = chat_dbproxy::Listeners { api, admin };
        chat_dbproxy::run(l, db_cfg, prometheus::Registry::new(), c)
            .await
            .expect("dbproxy run");
    }));

    let (client, server) = bind().await;
    let (admin, server_admin) = bind().await;
    let mut srv_cfg = chat_server::Config {
        dbproxy_url: format!("http://{dbproxy_api}"),
        shutdown_grace_secs: 1,
        trust_proxy_line: vec!["127.0.0.1".into()],
        ..Default::default()
    };
    // A peer that is down, so the per-peer cluster series exist.
    srv_cfg.cluster.peers = vec!["127.0.0.1:1".into()];
    srv_cfg.cluster.secret = "deploy-test-cluster-secret".into();
    let c = cancel.clone();
    tasks.push(tokio::spawn(async move {
        let l = chat_server::Listeners { client, admin };
        chat_server::run(l, srv_cfg, prometheus::Registry::new(), c)
            .await
            .expect("server run");
    }));

    let (client, proxy) = bind().await;
    let (admin, proxy_admin) = bind().await;
    let proxy_cfg = chat_proxy::Config {
        servers: vec![chat_proxy::ServerAddr {
            client: server.to_string(),
            admin: server_admin.to_string(),
        }],
        health_interval_ms: Duration::from_millis(100),
        shutdown_grace_secs: Duration::from_secs(1),
        ..Default::default()
    };
    let c = cancel.clone();
    tasks.push(tokio::spawn(async move {
        let l = chat_proxy::Listeners { client, admin };
        chat_proxy::run(l, proxy_cfg, prometheus::Registry::new(), c)
            .await
            .expect("proxy run");
    }));

    for (what, addr) in [
        ("dbproxy", dbproxy),
        ("server", server_admin),
        ("proxy", proxy_admin),
    ] {
        wait_for(
            Duration::from_secs(15),
            &format!("{what} /readyz"),
            || async move { matches!(http_get(addr, "/readyz").await, Ok((200, _))).then_some(()) },
        )
        .await;
    }
    Tiers {
        cancel,
        tasks,
        dbproxy,
        server_admin,
        proxy,
        proxy_admin,
        _dir: dir,
    }
}

/// Sends `n` room messages (and a bad command) through the proxy.
async fn traffic(proxy: SocketAddr, user: &str, n: usize) {
    let mut c = Line::connect(proxy).await;
    c.call(&format!("LOGIN {user} pw"), "OK LOGIN").await;
    c.call("JOIN lobby", "OK JOIN").await;
    for i in 0..n {
        c.call(&format!("MSG lobby hello {i}"), "OK MSG").await;
    }
    c.call("NOSUCHCOMMAND", "ERR").await;
    c.call("QUIT", "BYE").await;
}

/// Metric names (histograms by base name) in a /metrics text.
fn exposed_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(|n| base_name(n).to_owned())
        .collect()
}

fn base_name(n: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| n.strip_suffix(s))
        .unwrap_or(n)
}

/// chat_* metric names in the rules and the dashboard's queries (recording
/// rule names like `job:chat_x:rate5m` excluded).
fn used_names() -> BTreeSet<String> {
    let mut exprs = Vec::new();
    let rules = std::fs::read_to_string(root().join("deploy/prometheus/rules.yml")).unwrap();
    exprs.extend(
        rules
            .lines()
            .filter_map(|l| l.trim().strip_prefix("expr:").map(str::to_owned)),
    );
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/grafana/chat.json")).unwrap(),
    )
    .unwrap();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            exprs.push(t["expr"].as_str().unwrap().to_owned());
        }
    }
    let mut names = BTreeSet::new();
    for e in exprs {
        let b = e.as_bytes();
        let mut i = 0;
        while let Some(off) = e[i..].find("chat_") {
            let start = i + off;
            let end = start
                + e[start..]
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(e.len() - start);
            let prev = start.checked_sub(1).map(|p| b[p]);
            let next = b.get(end).copied();
            let part_of_other = prev.is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_')
                || prev == Some(b':')
                || next == Some(b':');
            if !part_of_other {
                names.insert(base_name(&e[start..end]).to_owned());
            }
            i = end;
        }
    }
    assert!(names.len() > 10, "too few metric names found: {names:?}");
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_every_tier_and_evaluates_the_rules() {
    let tiers = start_tiers().await;
    let prom = start_prometheus(&[
        ("chat-dbproxy", tiers.dbproxy),
        ("chat-server", tiers.server_admin),
        ("chat-proxy", tiers.proxy_admin),
    ])
    .await;

    // Every tier is up == 1, as Prometheus sees it.
    wait_for(
        Duration::from_secs(30),
        "up == 1 for every tier",
        || async {
            let up = prom.query("up").await;
            let ok: BTreeSet<String> = up
                .iter()
                .filter(|r| r["value"][1] == "1")
                .filter_map(|r| r["metric"]["job"].as_str().map(str::to_owned))
                .collect();
            (ok.len() == 3).then_some(())
        },
    )
    .await;
    let up = prom.query("up").await;
    assert_eq!(up.len(), 3, "{up:?}\n{}", prom.log());

    // chat_messages_total grows after traffic through the proxy.
    let before = wait_for(
        Duration::from_secs(15),
        "chat_messages_total scraped",
        || async { prom.scalar("sum(chat_messages_total)").await },
    )
    .await;
    traffic(tiers.proxy, "alice", 3).await;
    let after = wait_for(
        Duration::from_secs(15),
        "chat_messages_total to grow",
        || async {
            prom.scalar("sum(chat_messages_total)")
                .await
                .filter(|v| *v >= before + 3.0)
        },
    )
    .await;
    assert!(after >= before + 3.0);

    // The rules file loads and every rule evaluates without error.
    let groups = wait_for(Duration::from_secs(15), "every rule evaluated", || async {
        let data = prom.api("/api/v1/rules").await?;
        let groups = data["groups"].as_array()?.clone();
        let all_evaluated = groups
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .all(|r| r["health"] != "unknown");
        (all_evaluated && groups.len() == 2).then_some(groups)
    })
    .await;
    for g in &groups {
        for r in g["rules"].as_array().unwrap() {
            assert_eq!(
                r["health"], "ok",
                "rule {} failed: {}",
                r["name"], r["lastError"]
            );
        }
    }

    // Every metric the rules and the dashboard use is exposed by a tier.
    let mut exposed = BTreeSet::new();
    for addr in [tiers.dbproxy, tiers.server_admin, tiers.proxy_admin] {
        let (status, body) = http_get(addr, "/metrics").await.unwrap();
        assert_eq!(status, 200);
        exposed.extend(exposed_names(&body));
    }
    for name in used_names() {
        if exposed.contains(&name) {
            continue;
        }
        if MYSQL_ONLY.contains(&name.as_str()) {
            continue;
        }
        panic!("{name} is used by the rules or the dashboard but no tier exposes it; exposed: {exposed:?}");
    }
    drop(prom);
    drop(tiers);
}

/// The MySQL-only metrics the rules and dashboard use, live from a dbproxy on a
/// real MariaDB primary + replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_only_metrics_are_exposed() {
    let pair = tokio::task::spawn_blocking(mariadb::Pair::start)
        .await
        .expect("start MariaDB primary + replica");
    let (api, _) = bind().await;
    let (admin, addr) = bind().await;
    let config = chat_dbproxy::Config {
        backend: chat_dbproxy::StorageKind::Mysql,
        shutdown_grace_secs: Duration::from_secs(1),
        mysql: pair.mysql_config(),
        ..Default::default()
    };
    let cancel = CancellationToken::new();
    let task = tokio::spawn({
        let cancel = cancel.clone();
        let l = chat_dbproxy::Listeners { api, admin };
        async move { chat_dbproxy::run(l, config, prometheus::Registry::new(), cancel).await }
    });
    let used = used_names();
    let deadline = Instant::now() + Duration::from_secs(20);
    let missing = loop {
        let exposed = match http_get(addr, "/metrics").await {
            Ok((200, body)) => exposed_names(&body),
            _ => BTreeSet::new(),
        };
        let missing: Vec<&str> = MYSQL_ONLY
            .iter()
            .copied()
            .filter(|m| !exposed.contains(*m))
            .collect();
        if missing.is_empty() || Instant::now() > deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    drop(pair);
    assert!(
        missing.is_empty(),
        "a dbproxy on MariaDB does not expose {missing:?}"
    );
    for m in MYSQL_ONLY {
        assert!(
            used.contains(*m),
            "{m} is listed as used by the rules or dashboard but is not"
        );
    }
}
