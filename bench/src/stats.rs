//! What a bench run measures: counters shared by every connection task
//! (atomics, read by the progress line) and latency histograms that each
//! connection fills locally and merges once when it ends, so the hot path
//! takes no lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use chat_admin::sync::lock;
use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies are recorded in microseconds, up to one minute, 3 significant digits.
const MAX_LATENCY_US: u64 = 60_000_000;

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

/// Records `us`, clamped into the histogram's range.
pub fn record(h: &mut Histogram<u64>, us: u64) {
    let _ = h.record(us.clamp(1, MAX_LATENCY_US));
}

#[derive(Default)]
pub struct Counters {
    pub connected: AtomicU64,
    pub connect_failed: AtomicU64,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub delivered: AtomicU64,
    pub errors: AtomicU64,
    pub closed: AtomicU64,
}

impl Counters {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// The merged histograms. A plain mutex: each connection locks it once, at its end.
pub struct Latencies {
    pub deliver: Mutex<Histogram<u64>>,
    pub ack: Mutex<Histogram<u64>>,
}

impl Default for Latencies {
    fn default() -> Self {
        Latencies {
            deliver: Mutex::new(new_histogram()),
            ack: Mutex::new(new_histogram()),
        }
    }
}

impl Latencies {
    pub fn merge(&self, deliver: Option<&Histogram<u64>>, ack: Option<&Histogram<u64>>) {
        if let Some(d) = deliver {
            let _ = lock(&self.deliver).add(d);
        }
        if let Some(a) = ack {
            let _ = lock(&self.ack).add(a);
        }
    }
}

/// Percentiles in milliseconds (None when nothing was recorded).
#[derive(Debug, Serialize, Default)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub p999_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        let ms = |q: f64| Some(h.value_at_quantile(q) as f64 / 1000.0);
        Percentiles {
            count: h.len(),
            p50_ms: ms(0.50),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: Some(h.max() as f64 / 1000.0),
        }
    }
}

/// The report: printed as a summary and written with `--json`.
#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    pub protocol: String,
    pub target: String,
    pub clients: u64,
    /// Members per room (the rooms are `clients / room_size`, the last one
    /// smaller when it does not divide), and how many of them send.
    pub room_size: u64,
    pub senders_per_room: u64,
    pub connected: u64,
    pub connect_failed: u64,
    pub connect_secs: f64,
    pub connects_per_sec: f64,
    pub run_secs: f64,
    pub sent: u64,
    pub acked: u64,
    pub delivered: u64,
    pub errors: u64,
    pub closed_by_server: u64,
    pub acked_per_sec: f64,
    pub delivered_per_sec: f64,
    pub deliver_latency: Percentiles,
    pub ack_latency: Percentiles,
    /// VmRSS (KiB) of each `--server-pids` process before connecting and
    /// after every connection is up.
    pub rss_before_kib: Vec<u64>,
    pub rss_after_kib: Vec<u64>,
    pub rss_per_conn_bytes: Option<f64>,
    /// CPU (user + system) each `--server-pids` process used while the
    /// senders ran, in % of one core; and the bench's own.
    pub cpu_percent: Vec<f64>,
    pub bench_cpu_percent: Option<f64>,
}

/// CPU time of some processes and of this one, with the moment it was read.
pub struct CpuSample {
    at: std::time::Instant,
    ticks: Vec<Option<u64>>,
    own: Option<u64>,
}

impl CpuSample {
    pub fn take(pids: &[u32]) -> CpuSample {
        CpuSample {
            at: std::time::Instant::now(),
            ticks: pids.iter().map(|&p| cpu_ticks(&p.to_string())).collect(),
            own: cpu_ticks("self"),
        }
    }

    /// % of one core per process, and this process's, between two samples.
    pub fn since(&self, before: &CpuSample) -> (Vec<f64>, Option<f64>) {
        let secs = self.at.duration_since(before.at).as_secs_f64().max(1e-9);
        let pct = |a: Option<u64>, b: Option<u64>| {
            Some(a?.saturating_sub(b?) as f64 / CLOCK_TICKS_PER_SEC / secs * 100.0)
        };
        let each = self
            .ticks
            .iter()
            .zip(&before.ticks)
            .map(|(a, b)| pct(*a, *b).unwrap_or(0.0))
            .collect();
        (each, pct(self.own, before.own))
    }
}

/// `USER_HZ`: the unit of /proc/PID/stat times, 100 on Linux.
const CLOCK_TICKS_PER_SEC: f64 = 100.0;

/// utime + stime of a process, from /proc/PID/stat (fields 14 and 15; the
/// command name before them may contain spaces, so count from its `)`).
fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// VmRSS of a process in KiB, from /proc/PID/status.
pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
