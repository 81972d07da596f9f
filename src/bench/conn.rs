//! One benchmark connection: connect from a spread-out loopback source
//! address, log in and join (chat protocol, or the IRC adapter), then a
//! reader task counting acks and deliveries, a writer task owning the socket's
//! write half, and — for senders — a paced send loop with an in-flight window.
//!
//! Every message carries `t=<nanos since bench start>` in its text, so the
//! receiver measures send → deliver latency without a lookup; chat message
//! ids carry the same time (`id=<n>.<nanos>`) for ack latency.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chat_protocol::ServerLine;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use super::stats::{new_histogram, record, Counters, Latencies};

/// Login and join must finish within this, or the connection counts as failed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Lines queued for the writer task: a window's worth plus PONGs and control lines.
const WRITE_QUEUE: usize = 256;
/// Filler after the timestamp, so a message has a realistic size (~64 bytes).
const PAD: &str = "benchmark-payload-0123456789abcdefghijklmnopqrstuvwxyz";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Chat,
    Irc,
}

/// What one connection does.
#[derive(Debug, Clone)]
pub struct Plan {
    pub index: usize,
    pub name: String,
    pub room: String,
    /// For the DM scenario: whom this connection sends to.
    pub dm_peer: Option<String>,
    /// Messages per second for this sender; None = not a sender, Some(0.0) = unpaced.
    pub rate: Option<f64>,
}

/// Everything the connections of one run share.
pub struct Shared {
    pub target: SocketAddr,
    pub protocol: Protocol,
    pub window: usize,
    pub t0: Instant,
    pub counters: Counters,
    pub latencies: Latencies,
    /// Bounds concurrent handshakes so that the connect phase does not flood
    /// the server's accept queue.
    pub connecting: Semaphore,
    /// Cancelled when every connection is up: senders start.
    pub go: CancellationToken,
    /// Cancelled when the run's duration is over: senders stop.
    pub stop: CancellationToken,
    /// Cancelled after the drain: readers stop and connections close.
    pub end: CancellationToken,
}

impl Shared {
    fn now_nanos(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }
}

/// Runs one connection to the end of the run. Failures are counted, not returned.
pub async fn run(shared: Arc<Shared>, plan: Plan) {
    let handshake = async {
        let _permit = shared.connecting.acquire().await?;
        let stream = connect(shared.target, plan.index).await?;
        tokio::time::timeout(HANDSHAKE_TIMEOUT, login(&shared, &plan, stream))
            .await
            .context("handshake timed out")?
    };
    let (reader, write) = tokio::select! {
        r = handshake => match r {
            Ok(halves) => halves,
            Err(e) => {
                tracing::debug!(index = plan.index, error = %e, "bench connection failed");
                Counters::add(&shared.counters.connect_failed, 1);
                return;
            }
        },
        _ = shared.end.cancelled() => return,
    };
    Counters::add(&shared.counters.connected, 1);

    let (tx, mut rx) = mpsc::channel::<String>(WRITE_QUEUE);
    let writer = tokio::spawn(async move {
        let mut write = write;
        while let Some(line) = rx.recv().await {
            if write.write_all(line.as_bytes()).await.is_err() {
                break;
            }
        }
        let _ = write.shutdown().await;
    });
    let window = Arc::new(Semaphore::new(shared.window));
    let reading = tokio::spawn(read_loop(
        shared.clone(),
        reader,
        tx.clone(),
        window.clone(),
    ));
    if let Some(rate) = plan.rate {
        send_loop(&shared, &plan, rate, &tx, &window).await;
    }
    drop(tx);
    let _ = reading.await;
    let _ = writer.await;
}

/// Connects from 127.0.0.(1 + index % 250) when the target is loopback, so
/// that many connections do not exhaust one source address's ephemeral ports.
async fn connect(target: SocketAddr, index: usize) -> anyhow::Result<TcpStream> {
    if let IpAddr::V4(ip) = target.ip() {
        if ip.is_loopback() {
            let socket = TcpSocket::new_v4()?;
            let source = Ipv4Addr::new(127, 0, 0, 1 + (index % 250) as u8);
            socket.bind(SocketAddr::new(source.into(), 0))?;
            return Ok(socket.connect(target).await?);
        }
    }
    Ok(TcpStream::connect(target).await?)
}

type Halves = (BufReader<OwnedReadHalf>, tokio::net::tcp::OwnedWriteHalf);

async fn login(shared: &Shared, plan: &Plan, stream: TcpStream) -> anyhow::Result<Halves> {
    stream.set_nodelay(true)?;
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut line = String::new();
    match shared.protocol {
        Protocol::Chat => {
            write
                .write_all(format!("JOIN {} {}\n", plan.room, plan.name).as_bytes())
                .await?;
            loop {
                line.clear();
                if read.read_line(&mut line).await? == 0 {
                    bail!("closed during login");
                }
                match ServerLine::from_str(line.trim_end()) {
                    Ok(ServerLine::OkJoin { room, .. }) if room == plan.room => break,
                    Ok(ServerLine::Err { code, detail }) => bail!("login: {code:?} {detail}"),
                    _ => {}
                }
            }
        }
        Protocol::Irc => {
            let nick = &plan.name;
            write
                .write_all(format!("NICK {nick}\r\nUSER {nick} 0 * :{nick}\r\n").as_bytes())
                .await?;
            let mut joined = false;
            loop {
                line.clear();
                if read.read_line(&mut line).await? == 0 {
                    bail!("closed during registration");
                }
                let l = line.trim_end();
                if let Some(arg) = l.strip_prefix("PING ") {
                    write
                        .write_all(format!("PONG {arg}\r\n").as_bytes())
                        .await?;
                    continue;
                }
                let numeric = l.split(' ').nth(1).unwrap_or("");
                match numeric {
                    "001" if !joined => {
                        joined = true;
                        write
                            .write_all(format!("JOIN {}\r\n", plan.room).as_bytes())
                            .await?;
                    }
                    "366" => break,
                    "432" | "433" | "465" | "471" | "473" | "474" | "475" => {
                        bail!("irc registration refused: {l}")
                    }
                    _ if l.starts_with("ERROR") => bail!("irc: {l}"),
                    _ => {}
                }
            }
        }
    }
    Ok((read, write))
}

async fn send_loop(
    shared: &Shared,
    plan: &Plan,
    rate: f64,
    tx: &mpsc::Sender<String>,
    window: &Semaphore,
) {
    tokio::select! {
        _ = shared.go.cancelled() => {}
        _ = shared.stop.cancelled() => return,
    }
    let mut pace = (rate > 0.0).then(|| {
        let mut i = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    // IRC has no acks: a PING after every half window, answered in order by
    // the server, stands in for them.
    let ping_every = (shared.window / 2).max(1) as u64;
    let mut n: u64 = 0;
    loop {
        if shared.stop.is_cancelled() {
            return;
        }
        if let Some(pace) = pace.as_mut() {
            tokio::select! {
                _ = pace.tick() => {}
                _ = shared.stop.cancelled() => return,
            }
        }
        let permit = tokio::select! {
            p = window.acquire() => p,
            _ = shared.stop.cancelled() => return,
        };
        match permit {
            Ok(p) => p.forget(),
            Err(_) => return,
        }
        n += 1;
        let t = shared.now_nanos();
        let line = match (shared.protocol, &plan.dm_peer) {
            (Protocol::Chat, None) => format!("MSG id={n}.{t} {} t={t} {PAD}\n", plan.room),
            (Protocol::Chat, Some(peer)) => format!("DM id={n}.{t} {peer} t={t} {PAD}\n"),
            (Protocol::Irc, _) => {
                let mut l = format!("PRIVMSG {} :t={t} {PAD}\r\n", plan.room);
                if n % ping_every == 0 {
                    l.push_str(&format!("PING :{n}\r\n"));
                }
                l
            }
        };
        if tx.send(line).await.is_err() {
            return;
        }
        Counters::add(&shared.counters.sent, 1);
    }
}

/// The time embedded after `t=` in a message text, as a latency in µs.
fn latency_from_text(shared: &Shared, text: &str) -> Option<u64> {
    let t: u64 = text.strip_prefix("t=")?.split(' ').next()?.parse().ok()?;
    Some(shared.now_nanos().saturating_sub(t) / 1000)
}

/// The time embedded in a message id `<n>.<nanos>`, as a latency in µs.
fn latency_from_cid(shared: &Shared, cid: &str) -> Option<u64> {
    let t: u64 = cid.split_once('.')?.1.parse().ok()?;
    Some(shared.now_nanos().saturating_sub(t) / 1000)
}

async fn read_loop(
    shared: Arc<Shared>,
    mut read: BufReader<OwnedReadHalf>,
    tx: mpsc::Sender<String>,
    window: Arc<Semaphore>,
) {
    let mut deliver = new_histogram();
    let mut ack = new_histogram();
    let c = &shared.counters;
    let mut line = String::new();
    let mut irc_acked: u64 = 0;
    loop {
        line.clear();
        let n = tokio::select! {
            r = read.read_line(&mut line) => r,
            _ = shared.end.cancelled() => break,
        };
        match n {
            Ok(0) | Err(_) => {
                if !shared.end.is_cancelled() {
                    Counters::add(&c.closed, 1);
                }
                break;
            }
            Ok(_) => {}
        }
        let l = line.trim_end();
        match shared.protocol {
            Protocol::Chat => match ServerLine::from_str(l) {
                Ok(ServerLine::Msg { text, .. }) | Ok(ServerLine::Dm { text, .. }) => {
                    Counters::add(&c.delivered, 1);
                    if let Some(us) = latency_from_text(&shared, &text) {
                        record(&mut deliver, us);
                    }
                }
                Ok(ServerLine::OkMsg { cid, .. }) | Ok(ServerLine::OkDm { cid, .. }) => {
                    Counters::add(&c.acked, 1);
                    window.add_permits(1);
                    if let Some(us) = cid.as_deref().and_then(|x| latency_from_cid(&shared, x)) {
                        record(&mut ack, us);
                    }
                }
                Ok(ServerLine::Err { detail, .. }) => {
                    Counters::add(&c.errors, 1);
                    if detail.starts_with("id=") {
                        window.add_permits(1);
                    }
                }
                Ok(ServerLine::Bye { .. }) | Ok(ServerLine::Reconnect { .. }) => {
                    Counters::add(&c.closed, 1);
                    break;
                }
                _ => {}
            },
            Protocol::Irc => {
                if let Some(arg) = l.strip_prefix("PING ") {
                    let _ = tx.try_send(format!("PONG {arg}\r\n"));
                } else if let Some(i) = l.find(" PRIVMSG ") {
                    Counters::add(&c.delivered, 1);
                    let text = l[i..].split_once(" :").map(|x| x.1).unwrap_or("");
                    if let Some(us) = latency_from_text(&shared, text) {
                        record(&mut deliver, us);
                    }
                } else if l.split(' ').nth(1) == Some("PONG") {
                    let upto: u64 = l
                        .rsplit(' ')
                        .next()
                        .map(|s| s.trim_start_matches(':'))
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(irc_acked);
                    if upto > irc_acked {
                        let k = upto - irc_acked;
                        irc_acked = upto;
                        Counters::add(&c.acked, k);
                        window.add_permits(k as usize);
                    }
                } else if l.starts_with("ERROR") {
                    Counters::add(&c.closed, 1);
                    break;
                }
            }
        }
    }
    shared.latencies.merge(&deliver, &ack);
}
