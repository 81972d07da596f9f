//! The load scenarios (idle, fanout, durable, dm): the phases of one run,
//! each with a deadline, and the report at the end.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::conn::{self, Shared};
use crate::stats::{self, Counters, Percentiles, Report};
use crate::{layout, Layout, Options, Scenario, MAX_DURATION_SECS};

/// The connect phase ends after this even if connections are still pending.
const CONNECT_PHASE_CAP: Duration = Duration::from_secs(180);
/// After the senders stop, how long to wait for outstanding acks and deliveries.
const DRAIN_CAP: Duration = Duration::from_secs(5);

/// What the connect phase measured.
struct Connected {
    connected: u64,
    connect_secs: f64,
    rss_before: Vec<u64>,
    rss_after: Vec<u64>,
}

/// What the sending phase measured.
struct Sent {
    run_secs: f64,
    cpu_percent: Vec<f64>,
    bench_cpu_percent: Option<f64>,
}

pub async fn run(o: Options, shutdown: CancellationToken) -> anyhow::Result<()> {
    anyhow::ensure!(o.window >= 1, "--window must be at least 1");
    anyhow::ensure!(o.rate >= 0.0, "--rate must not be negative");
    let duration = Duration::from_secs(o.duration.min(MAX_DURATION_SECS));
    let targets = resolve(&o.target).await?;
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
    // Before the first connection: the baseline of the memory per connection.
    let rss_before = rss(&o.server_pids);
    eprintln!(
        "bench: {:?} over {:?}, {clients} connections to {}",
        o.scenario, o.protocol, o.target
    );

    let mut tasks = JoinSet::new();
    let connect_start = Instant::now();
    for plan in plans {
        tasks.spawn(conn::run(shared.clone(), plan));
    }
    let up = connect_phase(&o, &shared, (clients, connect_start), rss_before, &shutdown).await;
    let sent = send_phase(&o, &shared, duration, &shutdown).await;
    drain(&shared).await;
    shared.end.cancel();
    let join_all = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(10), join_all)
        .await
        .is_err()
    {
        eprintln!("bench: connections still open after 10s; aborting them");
    }
    tasks.abort_all();

    let report = report(&o, &shared, (clients, room_size, senders), up, sent);
    print_summary(&report);
    if let Some(path) = &o.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("--json {}", path.display()))?;
    }
    Ok(())
}

/// The addresses of `--target a,b,…`.
async fn resolve(target: &str) -> anyhow::Result<Vec<SocketAddr>> {
    let mut targets = Vec::new();
    for t in target.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let addr = tokio::net::lookup_host(t)
            .await
            .with_context(|| format!("--target {t}"))?
            .next()
            .with_context(|| format!("--target {t}: no address"))?;
        targets.push(addr);
    }
    anyhow::ensure!(!targets.is_empty(), "--target: no address");
    Ok(targets)
}

fn rss(pids: &[u32]) -> Vec<u64> {
    pids.iter()
        .map(|&p| stats::vm_rss_kib(p).unwrap_or(0))
        .collect()
}

/// Waits until every connection is up or failed (or the cap), with a
/// progress line per second; samples the servers' memory around it.
async fn connect_phase(
    o: &Options,
    shared: &Shared,
    (clients, connect_start): (usize, Instant),
    rss_before: Vec<u64>,
    shutdown: &CancellationToken,
) -> Connected {
    let c = &shared.counters;
    let settled = || Counters::get(&c.connected) + Counters::get(&c.connect_failed);
    let mut tick = chat_admin::tick::interval(Duration::from_secs(1));
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
    Connected {
        connected,
        connect_secs,
        rss_before,
        rss_after: rss(&o.server_pids),
    }
}

/// Lets the senders go for `duration`, with a progress line per second, and
/// stops them; measures the servers' CPU meanwhile.
async fn send_phase(
    o: &Options,
    shared: &Shared,
    duration: Duration,
    shutdown: &CancellationToken,
) -> Sent {
    let c = &shared.counters;
    let cpu_before = stats::CpuSample::take(&o.server_pids);
    shared.go.cancel();
    let run_start = Instant::now();
    let mut tick = chat_admin::tick::interval(Duration::from_secs(1));
    tick.tick().await;
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
    Sent {
        run_secs,
        cpu_percent,
        bench_cpu_percent,
    }
}

/// Outstanding acks, then the deliveries that follow them, within [`DRAIN_CAP`].
async fn drain(shared: &Shared) {
    let c = &shared.counters;
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
}

fn report(
    o: &Options,
    shared: &Shared,
    (clients, room_size, senders): (usize, usize, usize),
    up: Connected,
    sent: Sent,
) -> Report {
    let c = &shared.counters;
    let (acked, delivered) = (Counters::get(&c.acked), Counters::get(&c.delivered));
    let deliver_latency = Percentiles::of(&chat_admin::sync::lock(&shared.latencies.deliver));
    let ack_latency = Percentiles::of(&chat_admin::sync::lock(&shared.latencies.ack));
    let rss_growth: i64 = up
        .rss_after
        .iter()
        .zip(&up.rss_before)
        .map(|(&a, &b)| a as i64 - b as i64)
        .sum();
    let (connected, run_secs) = (up.connected, sent.run_secs);
    Report {
        scenario: format!("{:?}", o.scenario).to_lowercase(),
        protocol: format!("{:?}", o.protocol).to_lowercase(),
        target: o.target.clone(),
        clients: clients as u64,
        room_size: room_size as u64,
        senders_per_room: senders as u64,
        connected,
        connect_failed: Counters::get(&c.connect_failed),
        connect_secs: up.connect_secs,
        connects_per_sec: connected as f64 / up.connect_secs.max(1e-9),
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
        rss_before_kib: up.rss_before,
        rss_after_kib: up.rss_after,
        cpu_percent: sent.cpu_percent,
        bench_cpu_percent: sent.bench_cpu_percent,
    }
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
