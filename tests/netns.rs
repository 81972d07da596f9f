//! Multi-host cluster tests in Linux network namespaces.
//!
//! Each scenario starts its own cluster (tests/netns/cluster.rs: 2 proxies,
//! 3 chat servers, 2 dbproxies, a MariaDB primary and 2 replicas, 2 client
//! hosts, each a namespace on a private bridge), runs the checked workload
//! (`chat-bench --scenario checked`) for [`TRAFFIC_SECS`], injects one fault
//! while traffic flows, lets the clients finish, and hands their records and
//! the database to the checker (tests/netns/checker.rs). It prints a table
//! row (sent, acked, delivered, lost, duplicated, recovery time) and fails on
//! anything lost, duplicated or otherwise wrong.
//!
//! Needs root and `ip netns`: without them the tests fail when `CI` is set
//! and are skipped, saying why, otherwise. docs/RELIABILITY.md has the latest
//! figures and how to run them.

mod netns {
    pub mod checker;
    pub mod cluster;
    pub mod mariadb;
    pub mod net;
    pub mod procs;
}

use std::io::Write;
use std::time::{Duration, Instant};

use netns::checker;
use netns::cluster::{self, Cluster};
use netns::net;

/// How long the clients send, per scenario.
const TRAFFIC_SECS: u64 = 20;
/// Acks seen before the fault is injected: traffic is flowing.
const ACKS_BEFORE_FAULT: usize = 40;
/// How long a fault lasts before it is healed.
const FAULT_SECS: u64 = 5;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn enabled() -> bool {
    match net::available() {
        Ok(()) => true,
        Err(why) if std::env::var_os("CI").is_some() => {
            panic!("netns tests need root and `ip netns` (CI is set, so this fails): {why}")
        }
        Err(why) => {
            eprintln!("netns: skipping, {why}");
            false
        }
    }
}

/// Runs one scenario: `fault` injects and heals its fault while traffic
/// flows and returns when it was injected (Unix ms).
fn scenario(tag: &str, name: &str, fault: impl FnOnce(&mut Cluster) -> u64) -> checker::Outcome {
    if !enabled() {
        return checker::Outcome::default();
    }
    let started = Instant::now();
    let mut c = Cluster::start(tag);
    let setup = started.elapsed();
    c.start_clients(TRAFFIC_SECS);
    c.wait_traffic(ACKS_BEFORE_FAULT);
    let fault_ms = fault(&mut c);
    c.wait_clients(Duration::from_secs(TRAFFIC_SECS + 90));
    let users = cluster::CLIENTS * cluster::CLIENT_HOSTS;
    let o = checker::check(&c.records, c.primary_db(), users, Some(fault_ms));
    let row = checker::table_row(name, &o);
    println!("{}\n{row}", checker::table_header());
    println!(
        "{name}: setup {:.1}s, total {:.1}s; {} DMs and {} room messages delivered, {} of those live (rest HISTORY); \
         {} ERR UNAVAILABLE retried, {} DMs pending, {} read-your-writes probes, [server.cluster] {}",
        setup.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        o.delivered_dms,
        o.delivered - o.delivered_dms,
        o.delivered_live,
        o.unavailable,
        o.dms_pending,
        o.ryw_probes,
        if cluster::cluster_supported() {
            "on"
        } else {
            "not supported by this build"
        }
    );
    let report = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("netns-report.md");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(report)
    {
        let _ = writeln!(f, "{row}");
    }
    assert!(
        o.lost == 0 && o.duplicated == 0 && o.problems.is_empty(),
        "{name}: lost {}, duplicated {}, problems:\n{}",
        o.lost,
        o.duplicated,
        o.problems.join("\n")
    );
    assert!(
        o.acked > 0 && o.acked == o.sent,
        "{name}: {} sent, {} acked",
        o.sent,
        o.acked
    );
    o
}

/// The fault reached clients: some lost their connection (skipped runs pass).
fn assert_clients_reconnected(o: &checker::Outcome) {
    assert!(
        o.acked == 0 || o.reconnects > 0,
        "no client lost its connection: the fault missed"
    );
}

fn sleep_secs(s: u64) {
    std::thread::sleep(Duration::from_secs(s));
}

#[test]
fn kill_chat_server_then_restart() {
    let o = scenario("ks", "kill -9 chat server", |c| {
        let t = now_ms();
        c.servers[0].kill();
        sleep_secs(FAULT_SECS);
        c.servers[0].start();
        c.wait_server_ready(0);
        t
    });
    assert_clients_reconnected(&o);
}

#[test]
fn partition_chat_server() {
    let o = scenario("ps", "partition chat server", |c| {
        let t = now_ms();
        let host = c.host("srv2");
        c.net.set_link(host, false);
        sleep_secs(FAULT_SECS);
        let host = c.host("srv2");
        c.net.set_link(host, true);
        t
    });
    assert_clients_reconnected(&o);
}

/// A metric's value in a Prometheus text exposition (`+Inf` included).
fn metric(text: &str, series: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.starts_with(series))?;
    let v = line[series.len()..].trim();
    if v == "+Inf" {
        return Some(f64::INFINITY);
    }
    v.parse().ok()
}

#[test]
fn partition_replica() {
    scenario("pr", "partition replica", |c| {
        // The replica is cut off from the primary only: the dbproxies still
        // reach it and watch its lag grow.
        let t = now_ms();
        let (primary, replica) = (c.host("db1"), c.host("db2"));
        net::set_pair_cut(primary, replica, true);
        let ns = c.probe_ns();
        let lag = format!(
            r#"chat_dbproxy_replica_lag_seconds{{backend="{}:3306"}}"#,
            replica.ip
        );
        for dbp in ["10.77.0.31", "10.77.0.32"] {
            // Lag past the budget (1 s) and reads moved away from the replica.
            cluster::wait_until(
                Duration::from_secs(15),
                &format!("dbproxy {dbp} sees the replica lag and stops reading from it"),
                || {
                    net::http_get(&ns, &format!("http://{dbp}:9103/metrics")).is_some_and(|m| {
                        metric(&m, &lag).is_some_and(|l| l > 1.0)
                            && metric(&m, "chat_dbproxy_replicas_unhealthy ")
                                .is_some_and(|u| u >= 1.0)
                    })
                },
            );
        }
        sleep_secs(FAULT_SECS);
        let (primary, replica) = (c.host("db1"), c.host("db2"));
        net::set_pair_cut(primary, replica, false);
        t
    });
}

#[test]
fn kill_primary_promote_replica() {
    scenario("kp", "kill primary, promote", |c| {
        let t = now_ms();
        let new = c.fail_over_primary();
        eprintln!("netns: promoted {}", c.dbs[new].ip);
        t
    });
}

#[test]
fn kill_dbproxy() {
    scenario("kd", "kill -9 dbproxy", |c| {
        let t = now_ms();
        c.dbproxies[0].kill();
        // Every chat server moves to the other dbproxy (DbClient failover).
        for s in &c.servers {
            cluster::wait_until(
                Duration::from_secs(10),
                &format!("{} fails over to the other dbproxy", s.name),
                || std::fs::read_to_string(&s.log).is_ok_and(|l| l.contains("dbproxy failover")),
            );
        }
        sleep_secs(FAULT_SECS);
        c.dbproxies[0].start();
        c.wait_dbproxy_ready(0);
        t
    });
}

#[test]
fn kill_proxy() {
    let o = scenario("kx", "kill -9 proxy", |c| {
        let t = now_ms();
        c.proxies[0].kill();
        // Its clients move to the other proxy; it stays down for the rest of the run.
        sleep_secs(FAULT_SECS);
        t
    });
    assert_clients_reconnected(&o);
}

#[test]
fn rolling_restart_of_chat_servers() {
    let o = scenario("rr", "rolling restart", |c| {
        let t = now_ms();
        for i in 0..c.servers.len() {
            c.servers[i].stop(Duration::from_secs(5));
            c.servers[i].start();
            c.wait_server_ready(i);
            sleep_secs(1);
        }
        t
    });
    assert_clients_reconnected(&o);
}

/// The checker itself, on a small made-up history: it passes a correct one
/// and finds each kind of fault. Needs no root.
#[test]
fn checker_finds_what_is_wrong() {
    use chat_bench::record::{Ack, Entry, Kind, Record, Via};
    use checker::{check_data, Stored};
    use std::collections::HashMap;

    let r = |t: u64, u: &str, entry: Entry| Record {
        t,
        u: u.into(),
        entry,
    };
    let join = || Entry::Join {
        room: "r".into(),
        seq: 0,
    };
    let send = |k, to: &str, cid: &str, text: &str| Entry::Send {
        k,
        to: to.into(),
        cid: cid.into(),
        text: text.into(),
    };
    let end = || Entry::End {
        rooms: Default::default(),
        unacked: 0,
    };
    let good_records = || -> Vec<Record> {
        vec![
            r(1, "a", join()),
            r(1, "b", join()),
            r(10, "a", send(Kind::Msg, "r", "a.1", "c=a.1 x")),
            r(
                20,
                "a",
                Entry::Ack(Ack::Msg {
                    to: "r".into(),
                    cid: "a.1".into(),
                    seq: 1,
                }),
            ),
            r(
                21,
                "b",
                Entry::Msg {
                    room: "r".into(),
                    seq: 1,
                    from: "a".into(),
                    text: "c=a.1 x".into(),
                    via: Via::Live,
                },
            ),
            r(30, "a", send(Kind::Dm, "b", "a.2", "c=a.2 y")),
            r(
                40,
                "a",
                Entry::Ack(Ack::Dm {
                    to: "b".into(),
                    cid: "a.2".into(),
                    id: 2,
                }),
            ),
            r(
                41,
                "b",
                Entry::Dm {
                    id: 2,
                    from: "a".into(),
                    text: "c=a.2 y".into(),
                },
            ),
            r(50, "a", end()),
            r(50, "b", end()),
        ]
    };
    let row =
        |room: &str, seq: u64, cid: &str, body: &str, to: &str, id: i64, received: bool| Stored {
            room: room.into(),
            seq,
            sender: "a".into(),
            cid: cid.into(),
            body: body.into(),
            recipient: to.into(),
            id,
            received,
        };
    let good_rows = || {
        vec![
            row("r", 1, "a.1", "c=a.1 x", "", 1, false),
            row("", 0, "a.2", "c=a.2 y", "b", 2, true),
        ]
    };
    let last: HashMap<String, u64> = [("r".to_string(), 1)].into();
    let check = |recs: &[Record], rows: &[Stored], last: &HashMap<String, u64>| {
        check_data(recs, rows, last, 2, Some(15))
    };

    let o = check(&good_records(), &good_rows(), &last);
    assert!(
        o.lost == 0 && o.duplicated == 0 && o.problems.is_empty(),
        "{:?}",
        o.problems
    );
    assert_eq!((o.sent, o.acked, o.delivered), (2, 2, 2));
    assert_eq!(o.recovery_secs, Some(0.01));

    // An acked message missing from storage.
    let o = check(&good_records(), &good_rows()[1..], &HashMap::new());
    assert!(o.lost >= 1, "{o:?}");

    // A member that never received a room message.
    let mut recs = good_records();
    recs.retain(|r| !matches!(r.entry, Entry::Msg { .. }));
    let o = check(&recs, &good_rows(), &last);
    assert_eq!(o.lost, 1, "{o:?}");

    // The same message stored twice (same text at two seqs).
    let mut rows = good_rows();
    rows.push(row("r", 2, "a.9", "c=a.1 x", "", 3, false));
    let two: HashMap<String, u64> = [("r".to_string(), 2)].into();
    let o = check(&good_records(), &rows, &two);
    assert!(o.duplicated >= 1, "{o:?}");

    // A DM neither delivered nor pending is lost; still pending is fine.
    let mut recs = good_records();
    recs.retain(|r| !matches!(r.entry, Entry::Dm { .. }));
    let o = check(&recs, &good_rows(), &last);
    assert_eq!(o.lost, 1, "{o:?}");
    let mut rows = good_rows();
    rows[1].received = false;
    let o = check(&recs, &rows, &last);
    assert_eq!((o.lost, o.dms_pending), (0, 1), "{o:?}");

    // Stored but never sent, and a seq gap.
    let mut rows = good_rows();
    rows[0].seq = 2;
    rows[0].body = "c=zz forged".into();
    let o = check(&good_records(), &rows, &last);
    assert!(o.problems.iter().any(|p| p.contains("never sent")), "{o:?}");
    assert!(o.problems.iter().any(|p| p.contains("not dense")), "{o:?}");

    // A client that did not finish, and a send never acked.
    let mut recs = good_records();
    recs.pop();
    recs.push(r(45, "b", send(Kind::Msg, "r", "b.1", "c=b.1 z")));
    let o = check(&recs, &good_rows(), &last);
    assert!(o.problems.iter().any(|p| p.contains("finished")), "{o:?}");
    assert_eq!((o.sent, o.acked), (3, 2));
}
