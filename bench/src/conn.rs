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
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chat_protocol::ServerLine;
use memchr::memmem;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use super::stats::{new_histogram, record, Counters, Latencies};

/// Login and join must finish within this, or the connection counts as failed
/// (ngircd, registering 5,000 clients at ~150/s, needed more than 30 s for
/// the last few).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
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
    /// Connection `i` goes to `targets[i % targets.len()]`.
    pub targets: Vec<SocketAddr>,
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
        let target = shared.targets[plan.index % shared.targets.len()];
        let stream = connect(target, plan.index).await?;
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
        // Everything queued goes out in one write, as a real client's
        // buffered writer would send it.
        let (mut lines, mut out) = (Vec::new(), Vec::new());
        while rx.recv_many(&mut lines, WRITE_QUEUE).await > 0 {
            out.clear();
            for line in lines.drain(..) {
                out.extend_from_slice(line.as_bytes());
            }
            if write.write_all(&out).await.is_err() {
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
        // Each sender starts at its own point of the period (spread by the
        // golden ratio over the connection index): if all started together,
        // a paced run would offer every sender's message in the same instant
        // once a period, a burst instead of the rate asked for.
        let period = Duration::from_secs_f64(1.0 / rate);
        let phase = (plan.index as f64 * 0.618_033_988_749_895).fract();
        let start = tokio::time::Instant::now() + period.mul_f64(phase);
        chat_admin::tick::interval_at(start, period)
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

/// Most bytes read at once; a member of a busy room gets its backlog in few reads.
const READ_BUF: usize = 64 * 1024;

/// A substring search built once: `memmem::find` builds its searcher on
/// every call, which cost the reader more than the search itself.
struct Needle {
    bytes: &'static [u8],
    finder: OnceLock<memmem::Finder<'static>>,
}

impl Needle {
    const fn new(bytes: &'static [u8]) -> Needle {
        Needle {
            bytes,
            finder: OnceLock::new(),
        }
    }

    fn find(&self, haystack: &[u8]) -> Option<usize> {
        self.finder
            .get_or_init(|| memmem::Finder::new(self.bytes))
            .find(haystack)
    }

    fn len(&self) -> usize {
        self.bytes.len()
    }
}

static TIME_KEY: Needle = Needle::new(b" t=");
static ID_KEY: Needle = Needle::new(b" id=");
static IRC_TIME_KEY: Needle = Needle::new(b" :t=");
static PRIVMSG: Needle = Needle::new(b" PRIVMSG ");

/// The number after the first `key` in `line` (digits only; `None` when
/// there are none or they overflow a `u64`).
fn number_after(line: &[u8], key: &Needle) -> Option<u64> {
    let at = key.find(line)? + key.len();
    digits_at(&line[at..])
}

/// The decimal number `s` starts with.
fn digits_at(s: &[u8]) -> Option<u64> {
    let end = s
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(s.len());
    if end == 0 {
        return None;
    }
    s[..end].iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// What one connection counted since the counters were last published.
#[derive(Default)]
struct Tally {
    delivered: u64,
    acked: u64,
    errors: u64,
}

impl Tally {
    fn publish(&mut self, c: &Counters) {
        if self.delivered > 0 {
            Counters::add(&c.delivered, self.delivered);
        }
        if self.acked > 0 {
            Counters::add(&c.acked, self.acked);
        }
        if self.errors > 0 {
            Counters::add(&c.errors, self.errors);
        }
        *self = Tally::default();
    }
}

/// What a line meant for the reader.
enum Seen {
    Nothing,
    /// Window slots to give back.
    Release(usize),
    /// The server ended the session.
    Closed,
}

/// Reads lines without allocating per line: whole reads of up to
/// [`READ_BUF`], scanned for newlines in place, counted locally and
/// published once per read, and the clock read once per read (every line
/// of one read arrived at the same moment). The bench shares the machine
/// with what it measures, so its own cost per delivery matters.
async fn read_loop(
    shared: Arc<Shared>,
    read: BufReader<OwnedReadHalf>,
    tx: mpsc::Sender<String>,
    window: Arc<Semaphore>,
) {
    let mut hist = Hists::default();
    let c = &shared.counters;
    let mut buf = bytes::BytesMut::with_capacity(READ_BUF);
    buf.extend_from_slice(read.buffer());
    let read = read.into_inner();
    let mut tally = Tally::default();
    let mut irc_acked: u64 = 0;
    let mut closed = false;
    while !closed {
        let now_us = shared.now_nanos() / 1000;
        let mut pos = 0;
        while let Some(i) = memchr::memchr(b'\n', &buf[pos..]) {
            let mut line = &buf[pos..pos + i];
            pos += i + 1;
            if let [rest @ .., b'\r'] = line {
                line = rest;
            }
            let seen = match shared.protocol {
                Protocol::Chat => chat_line(line, now_us, &mut tally, &mut hist),
                Protocol::Irc => irc_line(line, now_us, &mut tally, &mut hist, &mut irc_acked, &tx),
            };
            match seen {
                Seen::Nothing => {}
                Seen::Release(k) => window.add_permits(k),
                Seen::Closed => {
                    Counters::add(&c.closed, 1);
                    closed = true;
                    break;
                }
            }
        }
        bytes::Buf::advance(&mut buf, pos);
        tally.publish(c);
        if closed {
            break;
        }
        if buf.capacity() - buf.len() < READ_BUF / 4 {
            // What is left is at most a partial line, so this moves it to the
            // front of the same allocation. Reserving a whole READ_BUF more
            // could not fit and allocated a fresh buffer every time: fresh
            // pages, each faulted in and zeroed by the kernel, took a quarter
            // of the reader's time.
            buf.reserve(READ_BUF / 2);
        }
        let n = loop {
            let ready = tokio::select! {
                r = read.readable() => r,
                _ = shared.end.cancelled() => break None,
            };
            match ready.and_then(|()| chat_proxy::read_drained(read.as_ref(), &mut buf)) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                r => break Some(r),
            }
        };
        match n {
            None => break,
            Some(Ok(0) | Err(_)) => {
                if !shared.end.is_cancelled() {
                    Counters::add(&c.closed, 1);
                }
                break;
            }
            Some(Ok(_)) => {}
        }
    }
    shared
        .latencies
        .merge(hist.deliver.as_ref(), hist.ack.as_ref());
}

/// Latency histograms of one connection, made on first use: an idle
/// connection (most of them, in the idle scenario) keeps none.
#[derive(Default)]
struct Hists {
    deliver: Option<hdrhistogram::Histogram<u64>>,
    ack: Option<hdrhistogram::Histogram<u64>>,
}

fn record_since(h: &mut Option<hdrhistogram::Histogram<u64>>, now_us: u64, sent_nanos: u64) {
    let h = h.get_or_insert_with(new_histogram);
    record(h, now_us.saturating_sub(sent_nanos / 1000));
}

fn chat_line(line: &[u8], now_us: u64, tally: &mut Tally, hist: &mut Hists) -> Seen {
    if line.starts_with(b"MSG ") || line.starts_with(b"DM ") {
        tally.delivered += 1;
        if let Some(t) = number_after(line, &TIME_KEY) {
            record_since(&mut hist.deliver, now_us, t);
        }
        Seen::Nothing
    } else if line.starts_with(b"OK MSG ") || line.starts_with(b"OK DM ") {
        tally.acked += 1;
        // The id is `id=<n>.<nanos at send>`.
        if let Some(t) = ID_KEY
            .find(line)
            .and_then(|at| memchr::memchr(b'.', &line[at..]).map(|d| at + d + 1))
            .and_then(|after_dot| digits_at(&line[after_dot..]))
        {
            record_since(&mut hist.ack, now_us, t);
        }
        Seen::Release(1)
    } else if line.starts_with(b"ERR ") {
        tally.errors += 1;
        // An error about one of our messages names its id: its slot is free.
        let about_message = line
            .splitn(3, |b| *b == b' ')
            .nth(2)
            .is_some_and(|detail| detail.starts_with(b"id="));
        if about_message {
            Seen::Release(1)
        } else {
            Seen::Nothing
        }
    } else if line.starts_with(b"BYE") || line.starts_with(b"RECONNECT") {
        Seen::Closed
    } else {
        Seen::Nothing
    }
}

fn irc_line(
    line: &[u8],
    now_us: u64,
    tally: &mut Tally,
    hist: &mut Hists,
    acked: &mut u64,
    tx: &mpsc::Sender<String>,
) -> Seen {
    if let Some(arg) = line.strip_prefix(b"PING ") {
        let _ = tx.try_send(format!("PONG {}\r\n", String::from_utf8_lossy(arg)));
        Seen::Nothing
    } else if let Some(i) = PRIVMSG.find(line) {
        tally.delivered += 1;
        if let Some(t) = number_after(&line[i..], &IRC_TIME_KEY) {
            record_since(&mut hist.deliver, now_us, t);
        }
        Seen::Nothing
    } else if line.split(|b| *b == b' ').nth(1) == Some(b"PONG") {
        // `:server PONG server :<n>`: everything up to message n was handled.
        let upto = line
            .rsplit(|b| *b == b' ')
            .next()
            .map(|s| s.strip_prefix(b":").unwrap_or(s))
            .and_then(|s| std::str::from_utf8(s).ok()?.parse::<u64>().ok())
            .unwrap_or(*acked);
        if upto > *acked {
            let k = upto - *acked;
            *acked = upto;
            tally.acked += k;
            Seen::Release(k as usize)
        } else {
            Seen::Nothing
        }
    } else if line.starts_with(b"ERROR") {
        Seen::Closed
    } else {
        Seen::Nothing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_lines_are_counted_and_timed() {
        let mut t = Tally::default();
        let mut h = Hists::default();
        let seen = chat_line(b"MSG r 7 1700 alice t=3000000 pad", 5000, &mut t, &mut h);
        assert!(matches!(seen, Seen::Nothing));
        assert_eq!(t.delivered, 1);
        let d = h.deliver.as_ref().unwrap();
        assert_eq!(d.len(), 1);
        assert!(d.equivalent(d.max(), 2000), "{}", d.max());
        let seen = chat_line(b"OK MSG r 7 1700 id=12.4000000", 5000, &mut t, &mut h);
        assert!(matches!(seen, Seen::Release(1)));
        assert_eq!(t.acked, 1);
        let a = h.ack.as_ref().unwrap();
        assert!(a.equivalent(a.max(), 1000), "{}", a.max());
        assert!(matches!(
            chat_line(b"ERR UNAVAILABLE id=3 storage down", 0, &mut t, &mut h),
            Seen::Release(1)
        ));
        assert!(matches!(
            chat_line(b"ERR BAD_ARGS no", 0, &mut t, &mut h),
            Seen::Nothing
        ));
        assert_eq!(t.errors, 2);
        assert!(matches!(
            chat_line(b"BYE shutdown", 0, &mut t, &mut h),
            Seen::Closed
        ));
        assert!(matches!(
            chat_line(b"JOIN r bob", 0, &mut t, &mut h),
            Seen::Nothing
        ));
    }

    #[test]
    fn numbers_are_read_digit_by_digit() {
        assert_eq!(digits_at(b"1234 rest"), Some(1234));
        assert_eq!(digits_at(b"7"), Some(7));
        assert_eq!(digits_at(b"x12"), None);
        assert_eq!(digits_at(b""), None);
        assert_eq!(digits_at(b"99999999999999999999"), None, "overflows u64");
        assert_eq!(number_after(b"MSG r 1 2 a t=42 pad", &TIME_KEY), Some(42));
        assert_eq!(number_after(b"MSG r 1 2 a pad", &TIME_KEY), None);
    }

    #[test]
    fn irc_lines_are_counted() {
        let (tx, mut rx) = mpsc::channel(4);
        let mut t = Tally::default();
        let mut h = Hists::default();
        let mut acked = 0;
        let l = b":n1!n1@x PRIVMSG #r0 :t=1000000 pad";
        irc_line(l, 3000, &mut t, &mut h, &mut acked, &tx);
        assert_eq!(t.delivered, 1);
        assert_eq!(h.deliver.as_ref().unwrap().len(), 1);
        irc_line(b"PING :abc", 0, &mut t, &mut h, &mut acked, &tx);
        assert_eq!(rx.try_recv().unwrap(), "PONG :abc\r\n");
        let seen = irc_line(
            b":bench.local PONG bench.local :8",
            0,
            &mut t,
            &mut h,
            &mut acked,
            &tx,
        );
        assert!(matches!(seen, Seen::Release(8)));
        assert_eq!((acked, t.acked), (8, 8));
        let seen = irc_line(
            b":bench.local PONG bench.local :8",
            0,
            &mut t,
            &mut h,
            &mut acked,
            &tx,
        );
        assert!(matches!(seen, Seen::Nothing));
    }
}
