//! `chat bench --scenario checked`: a workload whose every send, ack and
//! delivery is written to a JSONL file (`--record`), so a checker can prove
//! afterwards what was lost or duplicated (tests/netns/checker.rs does).
//!
//! Each client is a registered user, member of two rooms, that sends room
//! messages and DMs (to users of every client host of the run) with client ids,
//! and behaves as a careful client must under faults:
//!
//! connect (next address of `--target a,b,…`) → `LOGIN` or `RESUME <token>` →
//! `OK JOIN <room> <last>` / a live gap ⇒ `HISTORY <room> <last-seen>` →
//! resend every un-acked `MSG`/`DM` with its original id; `ERR UNAVAILABLE`
//! ⇒ resend after a pause. At the end: senders stop, acks drain, a settle
//! pause, then a sweep (`JOIN` again for the room's last seq, `HISTORY` up to
//! it) and one more login to collect DMs that waited, then `QUIT`.
//!
//! Record lines (`t` = Unix ms): `join`, `send`, `ack`, `err`, `msg` (first
//! receipt of a room seq, `via` live or hist), `dm` (first receipt of an id),
//! `down` / `up` (connection lost / logged in again), `end`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chat_protocol::{ErrorCode, ServerLine};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::Options;

const PASSWORD: &str = "checked-pw";
/// Un-acked MSG/DM per client: small, so a fault strands few messages.
const WINDOW: usize = 4;
/// `HISTORY` page size: the server's maximum.
const HISTORY_LIMIT: u32 = 1000;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Pause before resending after `ERR UNAVAILABLE`.
const RETRY_PAUSE: Duration = Duration::from_millis(250);
/// After senders stop: at most this long for outstanding acks.
const DRAIN_CAP: Duration = Duration::from_secs(30);
/// Then this pause, so the other client hosts stop too and replicas catch up.
const SETTLE: Duration = Duration::from_secs(3);
/// The final HISTORY sweep ends after this even with gaps left (the checker
/// reports them).
const SWEEP_CAP: Duration = Duration::from_secs(20);
/// How long the last login waits for DMs that were pending.
const RELOGIN_WAIT: Duration = Duration::from_millis(1500);
/// Every acked message whose seq is a multiple of this is read back at once.
const RYW_EVERY: u64 = 5;
/// After `QUIT`, how long to wait for the server to close.
const QUIT_WAIT: Duration = Duration::from_secs(5);
/// A gap in a room is re-asked with HISTORY at this interval.
const GAP_CHECK: Duration = Duration::from_millis(500);

/// The record file, shared by every client of the process. A std mutex: held
/// only to format one line into a buffered writer, never across an await.
struct Recorder {
    out: Mutex<std::io::BufWriter<std::fs::File>>,
}

impl Recorder {
    /// Writes one line and flushes it: a watcher (the test) follows the file
    /// while the run goes on, and a killed bench loses nothing written.
    fn write(&self, mut v: serde_json::Value) {
        v["t"] = json!(now_ms());
        let mut out = self.out.lock().expect("recorder");
        let _ = serde_json::to_writer(&mut *out, &v);
        let _ = out.write_all(b"\n");
        let _ = out.flush();
    }

    fn flush(&self) {
        let _ = self.out.lock().expect("recorder").flush();
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
    logged_in: std::sync::atomic::AtomicUsize,
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
    let duration = Duration::from_secs(o.duration.min(super::MAX_DURATION_SECS));
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
    // Senders go once everyone here is logged in (bounded: a dead cluster
    // must not hang the run).
    let t0 = Instant::now();
    while run.logged_in.load(std::sync::atomic::Ordering::Relaxed) < o.clients
        && t0.elapsed() < Duration::from_secs(60)
        && !run.shutdown.is_cancelled()
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    run.go.cancel();
    eprintln!("bench checked: go after {:.1}s", t0.elapsed().as_secs_f64());
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

#[derive(Default)]
struct RoomSeqs {
    /// Every seq up to here was received (or predates the first join).
    contiguous: u64,
    above: BTreeSet<u64>,
    /// Highest seq known to exist.
    target: u64,
    history_pending: bool,
    /// The seq a read-your-writes `HISTORY` in flight must return.
    probe: Option<u64>,
    probe_hit: bool,
}

impl RoomSeqs {
    /// True if `seq` is new.
    fn record(&mut self, seq: u64) -> bool {
        self.target = self.target.max(seq);
        if seq <= self.contiguous || !self.above.insert(seq) {
            return false;
        }
        while self.above.remove(&(self.contiguous + 1)) {
            self.contiguous += 1;
        }
        true
    }
}

struct Pending {
    line: String,
    /// When to send it again after `ERR UNAVAILABLE`; None = wait for an answer.
    retry_at: Option<Instant>,
}

enum Phase {
    Sending,
    Draining(Instant),
    Done,
}

struct Client {
    run: Arc<Run>,
    name: String,
    rooms: Vec<String>,
    token: Option<String>,
    seqs: HashMap<String, RoomSeqs>,
    pending: BTreeMap<String, Pending>,
    seen_dms: HashSet<i64>,
    n: u64,
    rng: u64,
    next_target: usize,
    counted_login: bool,
}

type Conn = (BufReader<OwnedReadHalf>, OwnedWriteHalf);

impl Client {
    fn new(run: Arc<Run>, name: String, rooms: Vec<String>, seed: u64) -> Client {
        Client {
            next_target: seed as usize % run.targets.len(),
            run,
            name,
            rooms,
            token: None,
            seqs: HashMap::new(),
            pending: BTreeMap::new(),
            seen_dms: HashSet::new(),
            n: 0,
            rng: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            counted_login: false,
        }
    }

    fn random(&mut self) -> u64 {
        // xorshift64: reproducible per client, no dependency.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn rec(&self, v: serde_json::Value) {
        let mut v = v;
        v["u"] = json!(self.name);
        self.run.rec.write(v);
    }

    async fn run(mut self) {
        let mut phase = Phase::Sending;
        let mut backoff = Duration::from_millis(100);
        let mut stopped_at: Option<Instant> = None;
        loop {
            if self.run.shutdown.is_cancelled() {
                break;
            }
            if self.run.stop.is_cancelled() {
                let since = *stopped_at.get_or_insert_with(Instant::now);
                if since.elapsed() > DRAIN_CAP + SETTLE + SWEEP_CAP {
                    self.rec(json!({"e": "err", "code": "GAVE_UP"}));
                    break;
                }
            }
            let conn = match self.connect().await {
                Ok(c) => {
                    backoff = Duration::from_millis(100);
                    c
                }
                Err(e) => {
                    tracing::debug!(user = %self.name, error = %e, "checked: connect failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            match self.session(conn, &mut phase).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::debug!(user = %self.name, error = %e, "checked: connection lost");
                    self.rec(json!({"e": "down", "why": e.to_string()}));
                }
            }
        }
        if !self.run.shutdown.is_cancelled() {
            self.relogin().await;
        }
        let rooms: HashMap<_, _> = self
            .seqs
            .iter()
            .map(|(r, s)| (r.clone(), s.contiguous))
            .collect();
        self.rec(json!({"e": "end", "rooms": rooms, "unacked": self.pending.len()}));
    }

    /// Connects to the next address and logs in (RESUME when a token is known).
    async fn connect(&mut self) -> anyhow::Result<Conn> {
        let target = self.run.targets[self.next_target % self.run.targets.len()].clone();
        self.next_target += 1;
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&target))
            .await
            .context("connect timed out")??;
        stream.set_nodelay(true)?;
        let (read, mut write) = stream.into_split();
        let mut read = BufReader::new(read);
        // `ACK` as the first command: DMs count as received only once we
        // acknowledge them, so one lost with a connection is delivered again.
        let first = match &self.token {
            Some(t) => format!("RESUME {t}\nACK\n"),
            None => format!("LOGIN {} {PASSWORD}\nACK\n", self.name),
        };
        write.write_all(first.as_bytes()).await?;
        let mut line = String::new();
        let answer = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
            line.clear();
            if read.read_line(&mut line).await? == 0 {
                bail!("closed during login");
            }
            ServerLine::from_str(line.trim_end()).map_err(|e| anyhow::anyhow!("{e:?}"))
        })
        .await
        .context("login timed out")??;
        match answer {
            ServerLine::OkLogin { token, .. } | ServerLine::OkResume { token, .. } => {
                self.token = Some(token);
            }
            ServerLine::Err {
                code: ErrorCode::TokenInvalid,
                ..
            } => {
                // The token is gone (it should not be: report it), log in anew.
                self.rec(json!({"e": "err", "code": "TOKEN_INVALID"}));
                self.token = None;
                bail!("token invalid");
            }
            other => bail!("login answered {other}"),
        }
        self.rec(json!({"e": "up", "target": target}));
        // JOIN every room not confirmed yet (an `OK JOIN`, ours or the one a
        // RESUME sends for each membership, puts it in `seqs`): a JOIN whose
        // connection broke before it reached the server goes again.
        for room in self.rooms.clone() {
            if !self.seqs.contains_key(&room) {
                write.write_all(format!("JOIN {room}\n").as_bytes()).await?;
            }
        }
        if !self.counted_login {
            self.counted_login = true;
            self.run
                .logged_in
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        // Everything not acked goes again, with its original id.
        for p in self.pending.values_mut() {
            write.write_all(p.line.as_bytes()).await?;
            p.retry_at = None;
        }
        for s in self.seqs.values_mut() {
            s.history_pending = false;
        }
        Ok((read, write))
    }

    /// Runs one connection until the client is done (Ok) or it breaks (Err).
    async fn session(
        &mut self,
        (mut read, mut write): Conn,
        phase: &mut Phase,
    ) -> anyhow::Result<()> {
        // Cleared only after a whole line was handled: `read_line` inside
        // `select!` may be cancelled with part of a line already in it.
        let mut line = String::new();
        let mut gap_check = tokio::time::interval(GAP_CHECK);
        let pace = Duration::from_secs_f64(1.0 / self.run.rate.max(0.01));
        // Each client starts at its own phase, so that sends are spread over
        // time rather than arriving in bursts (a short fault would otherwise
        // fall between bursts).
        let phase_shift = pace.mul_f64((self.random() % 1000) as f64 / 1000.0);
        let mut send_tick =
            tokio::time::interval_at(tokio::time::Instant::now() + phase_shift, pace);
        send_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if let Phase::Sending = phase {
                if self.run.stop.is_cancelled() {
                    *phase = Phase::Draining(Instant::now());
                }
            }
            if let Phase::Draining(since) = phase {
                if self.pending.is_empty() || since.elapsed() > DRAIN_CAP {
                    *phase = Phase::Done;
                }
            }
            if let Phase::Done = phase {
                return self.sweep(read, write, line).await;
            }
            let sending = matches!(phase, Phase::Sending) && self.run.go.is_cancelled();
            tokio::select! {
                r = read.read_line(&mut line) => {
                    if r? == 0 {
                        bail!("closed by server");
                    }
                    let out = self.on_line(line.trim_end());
                    line.clear();
                    for l in out? {
                        write.write_all(l.as_bytes()).await?;
                    }
                }
                _ = send_tick.tick(), if sending && self.pending.len() < WINDOW => {
                    let l = self.new_send();
                    write.write_all(l.as_bytes()).await?;
                }
                _ = gap_check.tick() => {
                    let mut out = self.history_requests();
                    let now = Instant::now();
                    for p in self.pending.values_mut() {
                        if p.retry_at.is_some_and(|t| t <= now) {
                            p.retry_at = None;
                            out.push(p.line.clone());
                        }
                    }
                    for l in out {
                        write.write_all(l.as_bytes()).await?;
                    }
                }
                _ = self.run.go.cancelled(), if !self.run.go.is_cancelled() => {}
                _ = self.run.stop.cancelled(), if !self.run.stop.is_cancelled() => {}
                _ = self.run.shutdown.cancelled() => return Ok(()),
            }
        }
    }

    fn new_send(&mut self) -> String {
        self.n += 1;
        let cid = format!("{}.{}", self.name, self.n);
        let text = format!("c={cid} checked-payload");
        let r = self.random();
        let line = if r % 5 == 0 && self.run.all_users.len() > 1 {
            let mut to = &self.run.all_users[(r / 5) as usize % self.run.all_users.len()];
            if *to == self.name {
                to = &self.run.all_users[((r / 5) as usize + 1) % self.run.all_users.len()];
            }
            let to = to.clone();
            self.rec(json!({"e": "send", "k": "dm", "to": to, "cid": cid, "text": text}));
            format!("DM id={cid} {to} {text}\n")
        } else {
            let room = self.rooms[(r / 5) as usize % self.rooms.len()].clone();
            self.rec(json!({"e": "send", "k": "msg", "to": room, "cid": cid, "text": text}));
            format!("MSG id={cid} {room} {text}\n")
        };
        self.pending.insert(
            cid,
            Pending {
                line: line.clone(),
                retry_at: None,
            },
        );
        line
    }

    /// HISTORY requests for rooms with a gap and no request in flight.
    fn history_requests(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        for (room, s) in &mut self.seqs {
            if s.contiguous < s.target && !s.history_pending {
                s.history_pending = true;
                out.push(format!("HISTORY {room} {} {HISTORY_LIMIT}\n", s.contiguous));
            }
        }
        out
    }

    /// Handles one server line; returns lines to send.
    fn on_line(&mut self, l: &str) -> anyhow::Result<Vec<String>> {
        let Ok(parsed) = ServerLine::from_str(l) else {
            return Ok(Vec::new());
        };
        match parsed {
            ServerLine::OkJoin { room, last_seq } => match self.seqs.get_mut(&room) {
                None => {
                    self.rec(json!({"e": "join", "room": room, "seq": last_seq}));
                    self.seqs.insert(
                        room,
                        RoomSeqs {
                            contiguous: last_seq,
                            target: last_seq,
                            ..Default::default()
                        },
                    );
                }
                Some(s) => {
                    s.target = s.target.max(last_seq);
                    return Ok(self.history_requests());
                }
            },
            ServerLine::Msg {
                room,
                seq,
                sender,
                text,
                ..
            }
            | ServerLine::Hist {
                room,
                seq,
                sender,
                text,
                ..
            } => {
                let via = if l.starts_with("HIST ") {
                    "hist"
                } else {
                    "live"
                };
                let Some(s) = self.seqs.get_mut(&room) else {
                    return Ok(Vec::new());
                };
                if s.probe == Some(seq) && via == "hist" {
                    s.probe_hit = true;
                }
                let new = s.record(seq);
                let gap = via == "live" && s.contiguous < s.target;
                if new {
                    self.rec(json!({"e": "msg", "room": room, "seq": seq, "from": sender,
                                    "text": text, "via": via}));
                }
                if gap {
                    return Ok(self.history_requests());
                }
            }
            ServerLine::OkHistory { room, count } => {
                if let Some(s) = self.seqs.get_mut(&room) {
                    s.history_pending = false;
                    if let Some(seq) = s.probe.take() {
                        let hit = std::mem::take(&mut s.probe_hit);
                        self.rec(json!({"e": "ryw", "room": room, "seq": seq, "ok": hit}));
                        return Ok(self.history_requests());
                    }
                    let s = self.seqs.get_mut(&room).expect("room");
                    if count >= HISTORY_LIMIT {
                        s.history_pending = true;
                        return Ok(vec![format!(
                            "HISTORY {room} {} {HISTORY_LIMIT}\n",
                            s.contiguous
                        )]);
                    }
                }
            }
            // A DM is shown once per id (delivery is at-least-once) and
            // acknowledged every time: only then does it stop being pending.
            ServerLine::Dm {
                id, sender, text, ..
            } => {
                if self.seen_dms.insert(id) {
                    self.rec(json!({"e": "dm", "id": id, "from": sender, "text": text}));
                }
                return Ok(vec![format!("ACK {id}\n")]);
            }
            ServerLine::OkMsg { room, seq, cid, .. } => {
                if let Some(cid) = cid {
                    if self.pending.remove(&cid).is_some() {
                        self.rec(
                            json!({"e": "ack", "k": "msg", "to": room, "cid": cid, "seq": seq}),
                        );
                    }
                }
                // Our own message counts as received (the sending session
                // gets no MSG line for it) ...
                if let Some(s) = self.seqs.get_mut(&room) {
                    s.record(seq);
                    // ... and now and then we check that a read sees it at
                    // once (read-your-writes, whichever replica serves it).
                    if seq % RYW_EVERY == 0 && !s.history_pending {
                        s.history_pending = true;
                        s.probe = Some(seq);
                        s.probe_hit = false;
                        return Ok(vec![format!("HISTORY {room} {} 1\n", seq - 1)]);
                    }
                }
            }
            ServerLine::OkDm {
                to,
                id,
                cid: Some(cid),
                ..
            } if self.pending.remove(&cid).is_some() => {
                self.rec(json!({"e": "ack", "k": "dm", "to": to, "cid": cid, "id": id}));
            }
            ServerLine::Err { code, detail } => {
                let cid = detail
                    .strip_prefix("id=")
                    .map(|d| d.split(' ').next().unwrap_or("").to_owned());
                self.rec(
                    json!({"e": "err", "code": code.to_string(), "cid": cid, "detail": detail}),
                );
                if let Some(cid) = cid {
                    // A DM's recipient may not have registered yet (the
                    // other client hosts start at about the same time).
                    let retry = matches!(
                        code,
                        ErrorCode::Unavailable | ErrorCode::RateLimited | ErrorCode::NoSuchUser
                    );
                    if retry {
                        if let Some(p) = self.pending.get_mut(&cid) {
                            p.retry_at = Some(Instant::now() + RETRY_PAUSE);
                        }
                    } else {
                        self.pending.remove(&cid);
                    }
                } else if code == ErrorCode::Unavailable {
                    // A HISTORY (or JOIN) that failed: ask again later.
                    for s in self.seqs.values_mut() {
                        s.history_pending = false;
                    }
                }
            }
            ServerLine::Reconnect { reason } => bail!("RECONNECT {reason}"),
            ServerLine::Bye { reason } => bail!("BYE {reason}"),
            _ => {}
        }
        Ok(Vec::new())
    }

    /// The end of the run: after a settle pause, `JOIN` each room again (its
    /// `OK JOIN` names the last seq) and `HISTORY` until nothing is missing.
    async fn sweep(
        &mut self,
        mut read: BufReader<OwnedReadHalf>,
        mut write: OwnedWriteHalf,
        mut line: String,
    ) -> anyhow::Result<()> {
        let settle_end = Instant::now() + SETTLE;
        // Keep reading while settling: live messages still arrive.
        loop {
            tokio::select! {
                r = read.read_line(&mut line) => {
                    if r? == 0 { bail!("closed by server"); }
                    let out = self.on_line(line.trim_end());
                    line.clear();
                    for l in out? { write.write_all(l.as_bytes()).await?; }
                }
                _ = tokio::time::sleep_until(settle_end.into()) => break,
            }
        }
        for room in self.rooms.clone() {
            write.write_all(format!("JOIN {room}\n").as_bytes()).await?;
        }
        let deadline = Instant::now() + SWEEP_CAP;
        let mut joins_answered = 0;
        let mut tick = tokio::time::interval(GAP_CHECK);
        loop {
            let settled = self
                .seqs
                .values()
                .all(|s| s.contiguous >= s.target && !s.history_pending);
            if joins_answered >= self.rooms.len() && settled {
                break;
            }
            if Instant::now() > deadline {
                self.rec(json!({"e": "err", "code": "SWEEP_TIMEOUT"}));
                break;
            }
            tokio::select! {
                r = read.read_line(&mut line) => {
                    if r? == 0 { bail!("closed by server"); }
                    let l = line.trim_end();
                    if l.starts_with("OK JOIN ") { joins_answered += 1; }
                    let out = self.on_line(l);
                    line.clear();
                    for l in out? { write.write_all(l.as_bytes()).await?; }
                }
                _ = tick.tick() => {
                    for l in self.history_requests() { write.write_all(l.as_bytes()).await?; }
                }
            }
        }
        self.quit(read, write, line).await;
        Ok(())
    }

    /// `QUIT`, then read to the end: the server may still write events (a DM
    /// it then counts as received) until it closes the connection.
    async fn quit(
        &mut self,
        mut read: BufReader<OwnedReadHalf>,
        mut write: OwnedWriteHalf,
        mut line: String,
    ) {
        if write.write_all(b"QUIT\n").await.is_err() {
            return;
        }
        let until = Instant::now() + QUIT_WAIT;
        loop {
            tokio::select! {
                r = read.read_line(&mut line) => match r {
                    Ok(n) if n > 0 => {
                        let ended = self.on_line(line.trim_end()).is_err();
                        line.clear();
                        if ended {
                            return;
                        }
                    }
                    _ => return,
                },
                _ = tokio::time::sleep_until(until.into()) => {
                    self.rec(json!({"e": "err", "code": "QUIT_TIMEOUT"}));
                    return;
                }
            }
        }
    }

    /// One more login: DMs that waited (their recipient was on another chat
    /// server, or offline) are delivered at login.
    async fn relogin(&mut self) {
        // Every address once (one may be down), then give up.
        let mut conn = None;
        for _ in 0..self.run.targets.len() * 2 {
            match self.connect().await {
                Ok(c) => {
                    conn = Some(c);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        let Some((mut read, mut write)) = conn else {
            self.rec(json!({"e": "err", "code": "RELOGIN_FAILED"}));
            return;
        };
        let until = Instant::now() + RELOGIN_WAIT;
        let mut line = String::new();
        loop {
            tokio::select! {
                r = read.read_line(&mut line) => match r {
                    Ok(n) if n > 0 => {
                        let out = self.on_line(line.trim_end()).unwrap_or_default();
                        line.clear();
                        for l in out {
                            if write.write_all(l.as_bytes()).await.is_err() {
                                break;
                            }
                        }
                    }
                    _ => break,
                },
                _ = tokio::time::sleep_until(until.into()) => break,
            }
        }
        self.quit(read, write, line).await;
    }
}
