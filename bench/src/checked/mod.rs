//! `chat-bench --scenario checked`: a workload whose every send, ack and
//! delivery is written to a JSONL file (`--record`, [`crate::record`]), so a
//! checker can prove afterwards what was lost or duplicated
//! (tests/netns/checker.rs does).
//!
//! Each client is a registered user, member of two rooms, that sends room
//! messages and DMs (to users of every client host of the run) with client ids,
//! and behaves as a careful client must under faults — the rules of
//! `chat_client::ClientState`, which the terminal client follows too:
//!
//! connect (next address of `--target a,b,…`) → `LOGIN` or `RESUME <token>` →
//! `OK JOIN <room> <last>` / a live gap ⇒ `HISTORY <room> <last-seen>` →
//! resend every un-acked `MSG`/`DM` with its original id; `ERR UNAVAILABLE`
//! ⇒ resend after a pause. At the end: senders stop, acks drain, a settle
//! pause, then a sweep (`JOIN` again for the room's last seq, `HISTORY` up to
//! it) and one more login to collect DMs that waited, then `QUIT`
//! ([`client::Client`]).

mod client;

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::record::{Entry, Record};
use crate::{Options, MAX_DURATION_SECS};
use client::Client;

/// After senders stop: at most this long for outstanding acks.
const DRAIN_CAP: Duration = Duration::from_secs(30);
/// Then this pause, so the other client hosts stop too and replicas catch up.
const SETTLE: Duration = Duration::from_secs(3);
/// The final HISTORY sweep ends after this even with gaps left (the checker
/// reports them).
const SWEEP_CAP: Duration = Duration::from_secs(20);
/// How long every local client has to log in before the senders go anyway:
/// a dead cluster must not hang the run.
const LOGIN_PHASE_CAP: Duration = Duration::from_secs(60);

/// The record file, shared by every client of the process. A std mutex: held
/// only to format one line into a buffered writer, never across an await.
struct Recorder {
    out: Mutex<std::io::BufWriter<std::fs::File>>,
}

impl Recorder {
    /// Writes one line and flushes it: a watcher (the test) follows the file
    /// while the run goes on, and a killed bench loses nothing written.
    fn write(&self, u: &str, entry: Entry) {
        let record = Record {
            t: now_ms(),
            u: u.to_string(),
            entry,
        };
        let mut out = chat_admin::sync::lock(&self.out);
        let _ = serde_json::to_writer(&mut *out, &record);
        let _ = out.write_all(b"\n");
        let _ = out.flush();
    }

    fn flush(&self) {
        let _ = chat_admin::sync::lock(&self.out).flush();
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What the whole run shares.
struct Run {
    targets: Vec<String>,
    rec: Recorder,
    /// Every user of every client host: DM recipients.
    all_users: Vec<String>,
    /// Messages per second per client.
    rate: f64,
    /// Cancelled when every local client is logged in: senders start.
    go: CancellationToken,
    /// Cancelled at the end of `--duration`: senders stop.
    stop: CancellationToken,
    logged_in: AtomicUsize,
    shutdown: CancellationToken,
}

pub fn user_name(run_id: &str, host: usize, i: usize) -> String {
    format!("{run_id}h{host}u{i}")
}

pub async fn run(o: Options, shutdown: CancellationToken) -> anyhow::Result<()> {
    let targets: Vec<String> = o
        .target
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    anyhow::ensure!(!targets.is_empty(), "--target: no address");
    let path: PathBuf = o
        .record
        .clone()
        .context("--scenario checked needs --record FILE")?;
    let run_id = o.run_id.clone().unwrap_or_else(|| "ck".into());
    anyhow::ensure!(
        o.hosts >= 1 && o.host_index < o.hosts,
        "--host-index < --hosts"
    );
    anyhow::ensure!(o.clients >= 1 && o.clients <= 10_000, "--clients 1..=10000");
    let rooms = o.rooms.unwrap_or(4).max(1);
    let file = std::fs::File::create(&path).with_context(|| format!("{}", path.display()))?;
    let all_users = (0..o.hosts)
        .flat_map(|h| (0..o.clients).map(move |i| (h, i)))
        .map(|(h, i)| user_name(&run_id, h, i))
        .collect();
    let rate = if o.rate > 0.0 {
        o.rate / o.clients as f64
    } else {
        1.0
    };
    let run = Arc::new(Run {
        targets,
        rec: Recorder {
            out: Mutex::new(std::io::BufWriter::new(file)),
        },
        all_users,
        rate,
        go: CancellationToken::new(),
        stop: CancellationToken::new(),
        logged_in: Default::default(),
        shutdown,
    });
    let duration = Duration::from_secs(o.duration.min(MAX_DURATION_SECS));
    eprintln!(
        "bench checked: {} clients, {rooms} rooms, {rate:.2} msg/s each, {:?} via {:?}",
        o.clients, duration, run.targets
    );
    let mut tasks = JoinSet::new();
    for i in 0..o.clients {
        let name = user_name(&run_id, o.host_index, i);
        // Two rooms per user, shared with the clients of the other hosts.
        let mut my_rooms = vec![format!("{run_id}r{}", i % rooms)];
        if rooms > 1 {
            my_rooms.push(format!("{run_id}r{}", (i + 1 + i / rooms) % rooms));
            my_rooms.dedup();
        }
        let seed = (o.host_index as u64 + 1) * 1_000_003 + i as u64;
        tasks.spawn(Client::new(run.clone(), name, my_rooms, seed).run());
    }
    go_when_logged_in(&run, o.clients).await;
    tokio::select! {
        _ = tokio::time::sleep(duration) => {}
        _ = run.shutdown.cancelled() => {}
    }
    run.stop.cancel();
    let ends = async { while tasks.join_next().await.is_some() {} };
    let cap = DRAIN_CAP + SETTLE + SWEEP_CAP + Duration::from_secs(15);
    if tokio::time::timeout(cap, ends).await.is_err() {
        eprintln!("bench checked: clients still running after {cap:?}; aborting them");
    }
    tasks.abort_all();
    run.rec.flush();
    eprintln!("bench checked: done, record in {}", path.display());
    Ok(())
}

/// Senders go once every local client is logged in, or after [`LOGIN_PHASE_CAP`].
async fn go_when_logged_in(run: &Run, clients: usize) {
    let t0 = Instant::now();
    while run.logged_in.load(Ordering::Relaxed) < clients
        && t0.elapsed() < LOGIN_PHASE_CAP
        && !run.shutdown.is_cancelled()
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    run.go.cancel();
    eprintln!("bench checked: go after {:.1}s", t0.elapsed().as_secs_f64());
}
