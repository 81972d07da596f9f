//! `chat-bench` (also run as `chat bench`): a load generator for the chat
//! protocol (and, through a small adapter, for IRC servers, to compare), and
//! the checked workload the fault tests check.
//!
//! Load scenarios ([`load::run`]): plan connections (per scenario) → connect +
//! log in, bounded concurrency ([`conn::run`]) → every connection up: RSS
//! sample, senders go → run for `--duration` with a progress line per second
//! → senders stop → drain acks and deliveries → connections close →
//! [`stats::Report`] (stdout, `--json`).
//!
//! The checked scenario ([`checked::run`]): clients driven by the client
//! state machine of `chat-client`, every send, ack and delivery written as a
//! [`record::Record`] to a JSONL file that tests/netns checks.
//!
//! Every phase has a deadline, so a stuck server cannot hang the bench.

mod checked;
mod conn;
mod load;
pub mod record;
mod stats;

use std::path::PathBuf;

use tokio_util::sync::CancellationToken;

use conn::{Plan, Protocol};

/// The longest any run may take, whatever `--duration` says.
const MAX_DURATION_SECS: u64 = 600;
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

#[derive(clap::Parser, Debug, Clone)]
#[command(name = "chat-bench", version, about)]
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
pub(crate) struct Layout {
    plans: Vec<Plan>,
    room_size: usize,
    /// Senders per room.
    senders: usize,
}

pub(crate) fn layout(o: &Options, run_id: &str) -> anyhow::Result<Layout> {
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

/// Runs the scenario `o` names until it ends or `shutdown` is cancelled.
pub async fn run(o: Options, shutdown: CancellationToken) -> anyhow::Result<()> {
    match o.scenario {
        Scenario::Checked => checked::run(o, shutdown).await,
        _ => load::run(o, shutdown).await,
    }
}
