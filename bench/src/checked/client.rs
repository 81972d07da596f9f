//! One client of the checked workload: the I/O, the pacing and the phases
//! around `chat_client::ClientState`, which decides what a line means and
//! what to send back, and reports first receipts and acks for the record.

use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chat_admin::backoff::Backoff;
use chat_client::{ClientState, Options as StateOptions};
use chat_protocol::{ErrorCode, ServerLine};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use super::{Run, DRAIN_CAP, SETTLE, SWEEP_CAP};
use crate::record::{Entry, Kind};

const PASSWORD: &str = "checked-pw";
/// Un-acked MSG/DM per client: small, so a fault strands few messages.
const WINDOW: usize = 4;
/// `HISTORY` page size: the server's maximum.
const HISTORY_LIMIT: u32 = 1000;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Reconnect delays: about 100 ms doubling up to 1 s, jittered.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Pause before resending after `ERR UNAVAILABLE`.
const RETRY_PAUSE: Duration = Duration::from_millis(250);
/// How long the last login waits for DMs that were pending.
const RELOGIN_WAIT: Duration = Duration::from_millis(1500);
/// Every acked message whose seq is a multiple of this is read back at once.
const RYW_EVERY: u64 = 5;
/// After `QUIT`, how long to wait for the server to close.
const QUIT_WAIT: Duration = Duration::from_secs(5);
/// A gap in a room is re-asked with HISTORY at this interval.
const GAP_CHECK: Duration = Duration::from_millis(500);

enum Phase {
    Sending,
    Draining(Instant),
    Done,
}

pub(super) struct Client {
    run: Arc<Run>,
    name: String,
    rooms: Vec<String>,
    state: ClientState,
    n: u64,
    rng: u64,
    next_target: usize,
    counted_login: bool,
}

type Conn = (BufReader<OwnedReadHalf>, OwnedWriteHalf);

/// Writes `lines`, each ended by a newline, in one write.
async fn send(write: &mut OwnedWriteHalf, lines: &[String]) -> std::io::Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut buf = String::new();
    for line in lines {
        buf.push_str(line);
        buf.push('\n');
    }
    write.write_all(buf.as_bytes()).await
}

impl Client {
    pub(super) fn new(run: Arc<Run>, name: String, rooms: Vec<String>, seed: u64) -> Client {
        let state = ClientState::with_options(StateOptions {
            history_limit: Some(HISTORY_LIMIT),
            read_your_writes_every: Some(RYW_EVERY),
            events: true,
            retry_pause: RETRY_PAUSE,
        });
        Client {
            next_target: seed as usize % run.targets.len(),
            run,
            name,
            rooms,
            state,
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

    fn rec(&self, entry: Entry) {
        self.run.rec.write(&self.name, entry);
    }

    fn rec_err(&self, code: &str) {
        self.rec(Entry::Err {
            code: code.into(),
            cid: None,
            detail: None,
        });
    }

    pub(super) async fn run(mut self) {
        let mut phase = Phase::Sending;
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        let mut stopped_at: Option<Instant> = None;
        loop {
            if self.run.shutdown.is_cancelled() {
                break;
            }
            if self.run.stop.is_cancelled() {
                let since = *stopped_at.get_or_insert_with(Instant::now);
                if since.elapsed() > DRAIN_CAP + SETTLE + SWEEP_CAP {
                    self.rec_err("GAVE_UP");
                    break;
                }
            }
            let conn = match self.connect().await {
                Ok(c) => {
                    backoff.reset();
                    c
                }
                Err(e) => {
                    tracing::debug!(user = %self.name, error = %e, "checked: connect failed");
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
            };
            match self.session(conn, &mut phase).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::debug!(user = %self.name, error = %e, "checked: connection lost");
                    self.rec(Entry::Down { why: e.to_string() });
                }
            }
        }
        if !self.run.shutdown.is_cancelled() {
            self.relogin().await;
        }
        let rooms = self.state.contiguous();
        let unacked = self.state.unacked().len();
        self.rec(Entry::End { rooms, unacked });
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
        // `RESUME <token>` + `ACK`, or a first `LOGIN` + `ACK`: DMs count as
        // received only once we acknowledge them, so one lost with a
        // connection is delivered again.
        let mut first = self.state.on_connected();
        if first.is_empty() {
            let login = format!("LOGIN {} {PASSWORD}", self.name);
            let then = self.state.on_user_line(&login);
            first.push(login);
            first.extend(then.map(str::to_string));
        }
        send(&mut write, &first).await?;
        let mut line = String::new();
        let answer = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
            if read.read_line(&mut line).await? == 0 {
                bail!("closed during login");
            }
            ServerLine::from_str(line.trim_end()).map_err(|e| anyhow::anyhow!("{e:?}"))
        })
        .await
        .context("login timed out")??;
        self.state.on_line(&answer);
        match answer {
            ServerLine::OkLogin { .. } | ServerLine::OkResume { .. } => {}
            ServerLine::Err {
                code: ErrorCode::TokenInvalid,
                ..
            } => {
                // The token is gone (it should not be: report it); the state
                // dropped it, so the next connection logs in anew.
                self.rec_err("TOKEN_INVALID");
                bail!("token invalid");
            }
            other => bail!("login answered {other}"),
        }
        self.rec(Entry::Up {
            target: target.clone(),
        });
        // JOIN every room not confirmed yet (an `OK JOIN`, ours or the one a
        // RESUME sends for each membership, tells the state): a JOIN whose
        // connection broke before it reached the server goes again.
        let mut out: Vec<String> = (self.rooms.iter())
            .filter(|room| !self.state.joined(room))
            .map(|room| format!("JOIN {room}"))
            .collect();
        if !self.counted_login {
            self.counted_login = true;
            self.run.logged_in.fetch_add(1, Ordering::Relaxed);
        }
        // Everything not acked goes again, with its original id.
        out.extend(self.state.unacked().resend_all());
        send(&mut write, &out).await?;
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
        let mut gap_check = chat_admin::tick::interval(GAP_CHECK);
        let pace = Duration::from_secs_f64(1.0 / self.run.rate.max(0.01));
        // Each client starts at its own phase, so that sends are spread over
        // time rather than arriving in bursts (a short fault would otherwise
        // fall between bursts).
        let phase_shift = pace.mul_f64((self.random() % 1000) as f64 / 1000.0);
        let mut send_tick =
            chat_admin::tick::interval_at(tokio::time::Instant::now() + phase_shift, pace);
        loop {
            self.advance(phase);
            if let Phase::Done = phase {
                return self.sweep(read, write, line).await;
            }
            let sending = matches!(phase, Phase::Sending)
                && self.run.go.is_cancelled()
                && self.state.unacked().len() < WINDOW;
            tokio::select! {
                r = read.read_line(&mut line) => {
                    if r? == 0 {
                        bail!("closed by server");
                    }
                    let out = self.on_line(line.trim_end());
                    line.clear();
                    send(&mut write, &out?).await?;
                }
                _ = send_tick.tick(), if sending => {
                    let l = self.new_send();
                    send(&mut write, &[l]).await?;
                }
                _ = gap_check.tick() => {
                    let mut out = self.state.history_requests();
                    out.extend(self.state.unacked().due(Instant::now()));
                    send(&mut write, &out).await?;
                }
                _ = self.run.go.cancelled(), if !self.run.go.is_cancelled() => {}
                _ = self.run.stop.cancelled(), if !self.run.stop.is_cancelled() => {}
                _ = self.run.shutdown.cancelled() => return Ok(()),
            }
        }
    }

    /// Sending until the run stops, then draining until every send is acked
    /// (or [`DRAIN_CAP`]), then done.
    fn advance(&mut self, phase: &mut Phase) {
        if let Phase::Sending = phase {
            if self.run.stop.is_cancelled() {
                *phase = Phase::Draining(Instant::now());
            }
        }
        if let Phase::Draining(since) = phase {
            if self.state.unacked().is_empty() || since.elapsed() > DRAIN_CAP {
                *phase = Phase::Done;
            }
        }
    }

    fn new_send(&mut self) -> String {
        self.n += 1;
        let cid = format!("{}.{}", self.name, self.n);
        let text = format!("c={cid} checked-payload");
        let r = self.random();
        let users = &self.run.all_users;
        let (k, to) = if r % 5 == 0 && users.len() > 1 {
            let mut to = &users[(r / 5) as usize % users.len()];
            if *to == self.name {
                to = &users[((r / 5) as usize + 1) % users.len()];
            }
            (Kind::Dm, to.clone())
        } else {
            let room = &self.rooms[(r / 5) as usize % self.rooms.len()];
            (Kind::Msg, room.clone())
        };
        let line = match k {
            Kind::Dm => format!("DM id={cid} {to} {text}"),
            Kind::Msg => format!("MSG id={cid} {to} {text}"),
        };
        self.rec(Entry::Send {
            k,
            to,
            cid: cid.clone(),
            text,
        });
        self.state.unacked().insert(cid, line.clone());
        line
    }

    /// Handles one server line: records what it brought, returns the lines
    /// to send; an error when the server ends the session.
    fn on_line(&mut self, l: &str) -> anyhow::Result<Vec<String>> {
        let Ok(parsed) = ServerLine::from_str(l) else {
            return Ok(Vec::new());
        };
        if let ServerLine::Err { code, detail } = &parsed {
            let cid = detail
                .strip_prefix("id=")
                .map(|d| d.split(' ').next().unwrap_or("").to_owned());
            self.rec(Entry::Err {
                code: code.to_string(),
                cid,
                detail: Some(detail.clone()),
            });
        }
        let reaction = self.state.on_line(&parsed);
        for event in self.state.take_events() {
            self.rec(Entry::of_event(event));
        }
        match parsed {
            ServerLine::Reconnect { reason } => bail!("RECONNECT {reason}"),
            ServerLine::Bye { reason } => bail!("BYE {reason}"),
            _ => Ok(reaction.send),
        }
    }

    /// Reads and handles lines until `until`; an error if the connection ends.
    async fn read_until(
        &mut self,
        read: &mut BufReader<OwnedReadHalf>,
        write: &mut OwnedWriteHalf,
        line: &mut String,
        until: Instant,
    ) -> anyhow::Result<()> {
        loop {
            tokio::select! {
                r = read.read_line(line) => {
                    if r? == 0 { bail!("closed by server"); }
                    let out = self.on_line(line.trim_end());
                    line.clear();
                    send(write, &out?).await?;
                }
                _ = tokio::time::sleep_until(until.into()) => return Ok(()),
            }
        }
    }

    /// The end of the run: after a settle pause, `JOIN` each room again (its
    /// `OK JOIN` names the last seq) and `HISTORY` until nothing is missing.
    async fn sweep(
        &mut self,
        mut read: BufReader<OwnedReadHalf>,
        mut write: OwnedWriteHalf,
        mut line: String,
    ) -> anyhow::Result<()> {
        // Keep reading while settling: live messages still arrive.
        let settle_end = Instant::now() + SETTLE;
        self.read_until(&mut read, &mut write, &mut line, settle_end)
            .await?;
        let joins: Vec<String> = self.rooms.iter().map(|r| format!("JOIN {r}")).collect();
        send(&mut write, &joins).await?;
        let deadline = Instant::now() + SWEEP_CAP;
        let mut joins_answered = 0;
        let mut tick = chat_admin::tick::interval(GAP_CHECK);
        loop {
            if joins_answered >= self.rooms.len() && self.state.caught_up() {
                break;
            }
            if Instant::now() > deadline {
                self.rec_err("SWEEP_TIMEOUT");
                break;
            }
            tokio::select! {
                r = read.read_line(&mut line) => {
                    if r? == 0 { bail!("closed by server"); }
                    let l = line.trim_end();
                    if l.starts_with("OK JOIN ") { joins_answered += 1; }
                    let out = self.on_line(l);
                    line.clear();
                    send(&mut write, &out?).await?;
                }
                _ = tick.tick() => {
                    let out = self.state.history_requests();
                    send(&mut write, &out).await?;
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
                    self.rec_err("QUIT_TIMEOUT");
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
            self.rec_err("RELOGIN_FAILED");
            return;
        };
        let until = Instant::now() + RELOGIN_WAIT;
        let mut line = String::new();
        // A connection that ends here ends the wait; the QUIT finds out.
        let _ = self
            .read_until(&mut read, &mut write, &mut line, until)
            .await;
        self.quit(read, write, line).await;
    }
}
