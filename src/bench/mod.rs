//! `chat bench`: a load generator for the chat protocol (and, through a small
//! adapter, for IRC servers, to compare).
//!
//! plan connections (per scenario) → connect + log in, bounded concurrency
//! ([`conn::run`]) → every connection up: RSS sample, senders go → run for
//! `--duration` with a progress line per second → senders stop → drain acks
//! and deliveries → connections close → [`stats::Report`] (stdout, `--json`).
//!
//! Every phase has a deadline, so a stuck server cannot hang the bench.

mod checked;
mod conn;
mod stats;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use conn::{Plan, Protocol, Shared};
use stats::{Counters, Percentiles, Report};

/// The longest any run may take, whatever `--duration` says.
const MAX_DURATION_SECS: u64 = 600;
/// The connect phase ends after this even if connections are still pending.
const CONNECT_PHASE_CAP: Duration = Duration::from_secs(180);
/// After the senders stop, how long to wait for outstanding acks and deliveries.
const DRAIN_CAP: Duration = Duration::from_secs(5);
/// At most this many connections at once: the bench's own fd and memory bound.
const MAX_CLIENTS: usize = 100_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// N connections logged in and idle: connect rate and RSS per connection.
    Idle,
    /// rooms × room-size members, a few senders per room, every message to all members.
    Fanout,
    /// Many small rooms, every member sends; throughput of messages acked after commit.
    Durable,
    /// Pairs of users sending each other direct messages.
    Dm,
    /// Room messages and DMs from clients that reconnect, resume, fill gaps with
    /// HISTORY and resend un-acked messages; every send, ack and delivery is
    /// written to `--record` for a checker (tests/netns).
    Checked,
}

#[derive(clap::Args, Debug, Clone)]
pub struct Options {
    /// Where to connect (the proxy of `chat up` by default). Several
    /// addresses, comma-separated: connections are spread over them in turn
    /// (checked: each client tries them in turn).
    #[arg(long, default_value = "127.0.0.1:7001")]
    target: String,
    #[arg(long, value_enum, default_value = "fanout")]
    scenario: Scenario,
    /// Connections for idle and dm (fanout and durable use rooms × room-size).
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Rooms (fanout: 10, durable: 200).
    #[arg(long)]
    rooms: Option<usize>,
    /// Members per room (fanout: 500, durable: 2).
    #[arg(long)]
    room_size: Option<usize>,
    /// Senders per room (fanout; durable: every member).
    #[arg(long, default_value_t = 2)]
    senders: usize,
    /// Total messages per second over all senders; 0 = as fast as the
    /// in-flight window allows.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Messages in flight per sending connection (the server allows 64).
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// Seconds to send (idle: to hold the connections).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Concurrent handshakes during the connect phase.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Write the report as JSON here.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "chat")]
    protocol: Protocol,
    /// Server process ids whose VmRSS is read before and after connecting,
    /// and whose CPU time is read before and after the sending phase.
    #[arg(long, value_delimiter = ',')]
    server_pids: Vec<u32>,
    /// checked: the JSONL file every send, ack and delivery is written to.
    #[arg(long, value_name = "FILE")]
    record: Option<PathBuf>,
    /// checked: a name shared by the client hosts of one run; user and room
    /// names start with it.
    #[arg(long)]
    run_id: Option<String>,
    /// checked: how many client hosts take part (DMs go to users of all of them).
    #[arg(long, default_value_t = 1)]
    hosts: usize,
    /// checked: which of the client hosts this is (0-based).
    #[arg(long, default_value_t = 0)]
    host_index: usize,
}

/// The connections of a run, and the shape of their rooms.
struct Layout {
    plans: Vec<Plan>,
    room_size: usize,
    /// Senders per room.
    senders: usize,
}

fn layout(o: &Options, run_id: &str) -> anyhow::Result<Layout> {
    let irc = o.protocol == Protocol::Irc;
    let room_name = |k: usize| {
        if irc {
            format!("#r{k}")
        } else {
            format!("b{run_id}r{k}")
        }
    };
    let user = |i: usize| {
        if irc {
            format!("n{i}")
        } else {
            format!("b{run_id}u{i}")
        }
    };
    let (clients, room_size, senders) = match o.scenario {
        Scenario::Idle => (o.clients, o.room_size.unwrap_or(10), 0),
        Scenario::Fanout => {
            let size = o.room_size.unwrap_or(500);
            (o.rooms.unwrap_or(10) * size, size, o.senders.min(size))
        }
        Scenario::Durable => {
            let size = o.room_size.unwrap_or(2);
            (o.rooms.unwrap_or(200) * size, size, size)
        }
        Scenario::Dm => (o.clients & !1, 2, 2),
        Scenario::Checked => anyhow::bail!("the checked scenario plans its own clients"),
    };
    anyhow::ensure!(room_size > 0, "--room-size must be at least 1");
    anyhow::ensure!(
        (1..=MAX_CLIENTS).contains(&clients),
        "between 1 and {MAX_CLIENTS} connections, not {clients}"
    );
    let n_senders = (clients / room_size) * senders + (clients % room_size).min(senders);
    let per_sender = if n_senders == 0 {
        0.0
    } else {
        o.rate / n_senders as f64
    };
    let plans = (0..clients)
        .map(|i| Plan {
            index: i,
            name: user(i),
            room: room_name(i / room_size),
            dm_peer: (o.scenario == Scenario::Dm).then(|| user(i ^ 1)),
            rate: (i % room_size < senders).then_some(per_sender),
        })
        .collect();
    Ok(Layout {
        plans,
        room_size,
        senders: senders.min(room_size),
    })
}

pub async fn run(o: Options, shutdown: CancellationToken) -> anyhow::Result<()> {
    if o.scenario == Scenario::Checked {
        return checked::run(o, shutdown).await;
    }
    anyhow::ensure!(o.window >= 1, "--window must be at least 1");
    anyhow::ensure!(o.rate >= 0.0, "--rate must not be negative");
    let duration = Duration::from_secs(o.duration.min(MAX_DURATION_SECS));
    let mut targets: Vec<SocketAddr> = Vec::new();
    for t in o.target.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let addr = tokio::net::lookup_host(t)
            .await
            .with_context(|| format!("--target {t}"))?
            .next()
            .with_context(|| format!("--target {t}: no address"))?;
        targets.push(addr);
    }
    anyhow::ensure!(!targets.is_empty(), "--target: no address");
    let target = o.target.clone();
    let run_id = format!("{:x}", std::process::id() ^ (now_unix_ms() as u32));
    let Layout {
        plans,
        room_size,
        senders,
    } = layout(&o, &run_id)?;
    let clients = plans.len();
    let shared = Arc::new(Shared {
        targets,
        protocol: o.protocol,
        window: o.window,
        t0: Instant::now(),
        counters: Counters::default(),
        latencies: Default::default(),
        connecting: Semaphore::new(o.connect_concurrency.max(1)),
        go: CancellationToken::new(),
        stop: CancellationToken::new(),
        end: CancellationToken::new(),
    });
    let rss = |pids: &[u32]| -> Vec<u64> {
        pids.iter()
            .map(|&p| stats::vm_rss_kib(p).unwrap_or(0))
            .collect()
    };
    let rss_before = rss(&o.server_pids);
    eprintln!(
        "bench: {:?} over {:?}, {clients} connections to {target}",
        o.scenario, o.protocol
    );

    let mut tasks = JoinSet::new();
    let connect_start = Instant::now();
    for plan in plans {
        tasks.spawn(conn::run(shared.clone(), plan));
    }
    let c = &shared.counters;
    let settled = || Counters::get(&c.connected) + Counters::get(&c.connect_failed);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    while (settled() as usize) < clients && connect_start.elapsed() < CONNECT_PHASE_CAP {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = tick.tick() => eprintln!(
                "bench: connecting {}/{clients} ({} failed)",
                Counters::get(&c.connected),
                Counters::get(&c.connect_failed)
            ),
            _ = shutdown.cancelled() => break,
        }
    }
    let connect_secs = connect_start.elapsed().as_secs_f64();
    let connected = Counters::get(&c.connected);
    eprintln!(
        "bench: {connected} connected in {connect_secs:.2}s ({} failed)",
        Counters::get(&c.connect_failed)
    );
    if o.scenario == Scenario::Idle {
        // Let the servers settle (buffers allocated on login freed) before sampling.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let rss_after = rss(&o.server_pids);

    let cpu_before = stats::CpuSample::take(&o.server_pids);
    shared.go.cancel();
    let run_start = Instant::now();
    let (mut last_acked, mut last_delivered) = (0, 0);
    while run_start.elapsed() < duration && !shutdown.is_cancelled() {
        tokio::select! {
            _ = tick.tick() => {
                let (a, d) = (Counters::get(&c.acked), Counters::get(&c.delivered));
                eprintln!(
                    "bench: {:>4.0}s sent {} acked {} (+{}/s) delivered {} (+{}/s) errors {} closed {}",
                    run_start.elapsed().as_secs_f64(),
                    Counters::get(&c.sent), a, a - last_acked, d, d - last_delivered,
                    Counters::get(&c.errors), Counters::get(&c.closed),
                );
                (last_acked, last_delivered) = (a, d);
            }
            _ = tokio::time::sleep(duration.saturating_sub(run_start.elapsed())) => {}
            _ = shutdown.cancelled() => {}
        }
    }
    shared.stop.cancel();
    let run_secs = run_start.elapsed().as_secs_f64();
    let (cpu_percent, bench_cpu_percent) =
        stats::CpuSample::take(&o.server_pids).since(&cpu_before);

    // Drain: outstanding acks, then the deliveries that follow them.
    let drain_start = Instant::now();
    while drain_start.elapsed() < DRAIN_CAP
        && Counters::get(&c.acked) + Counters::get(&c.errors) < Counters::get(&c.sent)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut last = u64::MAX;
    while drain_start.elapsed() < DRAIN_CAP && Counters::get(&c.delivered) != last {
        last = Counters::get(&c.delivered);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    shared.end.cancel();
    let join_all = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(10), join_all)
        .await
        .is_err()
    {
        eprintln!("bench: connections still open after 10s; aborting them");
    }
    tasks.abort_all();

    let (acked, delivered) = (Counters::get(&c.acked), Counters::get(&c.delivered));
    let deliver_latency = Percentiles::of(&shared.latencies.deliver.lock().expect("histogram"));
    let ack_latency = Percentiles::of(&shared.latencies.ack.lock().expect("histogram"));
    let rss_growth: i64 = rss_after
        .iter()
        .zip(&rss_before)
        .map(|(&a, &b)| a as i64 - b as i64)
        .sum();
    let report = Report {
        scenario: format!("{:?}", o.scenario).to_lowercase(),
        protocol: format!("{:?}", o.protocol).to_lowercase(),
        target: target.to_string(),
        clients: clients as u64,
        room_size: room_size as u64,
        senders_per_room: senders as u64,
        connected,
        connect_failed: Counters::get(&c.connect_failed),
        connect_secs,
        connects_per_sec: connected as f64 / connect_secs.max(1e-9),
        run_secs,
        sent: Counters::get(&c.sent),
        acked,
        delivered,
        errors: Counters::get(&c.errors),
        closed_by_server: Counters::get(&c.closed),
        acked_per_sec: acked as f64 / run_secs.max(1e-9),
        delivered_per_sec: delivered as f64 / run_secs.max(1e-9),
        deliver_latency,
        ack_latency,
        rss_per_conn_bytes: (!o.server_pids.is_empty() && connected > 0)
            .then(|| rss_growth as f64 * 1024.0 / connected as f64),
        rss_before_kib: rss_before,
        rss_after_kib: rss_after,
        cpu_percent,
        bench_cpu_percent,
    };
    print_summary(&report);
    if let Some(path) = &o.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("--json {}", path.display()))?;
    }
    Ok(())
}

fn now_unix_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

fn print_summary(r: &Report) {
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}ms"));
    println!(
        "{} ({}) → {}\n  connections: {}/{} in {:.2}s ({:.0}/s, {} failed, {} closed by server)\n  \
         sent {} acked {} ({:.0}/s) delivered {} ({:.0}/s) errors {} over {:.2}s\n  \
         deliver latency p50 {} p99 {} p999 {} max {}\n  ack latency p50 {} p99 {}",
        r.scenario,
        r.protocol,
        r.target,
        r.connected,
        r.clients,
        r.connect_secs,
        r.connects_per_sec,
        r.connect_failed,
        r.closed_by_server,
        r.sent,
        r.acked,
        r.acked_per_sec,
        r.delivered,
        r.delivered_per_sec,
        r.errors,
        r.run_secs,
        ms(r.deliver_latency.p50_ms),
        ms(r.deliver_latency.p99_ms),
        ms(r.deliver_latency.p999_ms),
        ms(r.deliver_latency.max_ms),
        ms(r.ack_latency.p50_ms),
        ms(r.ack_latency.p99_ms),
    );
    if !r.cpu_percent.is_empty() || r.bench_cpu_percent.is_some() {
        let each: Vec<String> = r.cpu_percent.iter().map(|c| format!("{c:.0}%")).collect();
        println!(
            "  CPU while sending: servers {} bench {}",
            each.join(" "),
            r.bench_cpu_percent
                .map_or("-".to_string(), |c| format!("{c:.0}%"))
        );
    }
    if let Some(b) = r.rss_per_conn_bytes {
        println!(
            "  RSS {:?} → {:?} KiB: {:.0} bytes per connection",
            r.rss_before_kib, r.rss_after_kib, b
        );
    }
}
