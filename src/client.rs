//! `chat client`: an interactive terminal client. stdin lines go to the server
//! verbatim; server lines are printed as they arrive, lightly formatted.
//! Status notes (connecting, reconnecting) go to stderr, prefixed with `--`.
//!
//! stdin thread → channel → [`session`] → socket; socket → [`LineCodec`] →
//! [`ServerLine`] → [`ClientState::on_line`] (what to show, what to send back:
//! `RESUME` and `ACK`, `HISTORY` for gaps, `ACK <id>` per DM) → stdout. On connect failure or disconnect the
//! client moves to the next address after a bounded, jittered backoff
//! (`chat_admin::backoff`).

use std::borrow::Cow;
use std::collections::VecDeque;
use std::io::BufRead;
use std::time::Duration;

use anyhow::{bail, Context};
use chat_admin::backoff::Backoff;
use chat_protocol::text::escape_controls;
use chat_protocol::{Frame, LineCodec, ServerLine};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use chat_client::ClientState;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Server lines are a client line (4096 bytes by default) plus a short header;
/// this leaves room for servers configured with longer lines.
const MAX_SERVER_LINE: usize = 64 * 1024;
/// stdin is read ahead this many lines; a person never gets near it, a pipe
/// simply waits.
const STDIN_QUEUE: usize = 64;
/// Lines typed while disconnected, sent after reconnecting; beyond this they
/// are dropped with a note, so a dead server cannot grow memory without bound.
const MAX_OUTBOX: usize = 256;
/// After `QUIT`, how long to wait for the server's `BYE` and close.
const QUIT_WAIT: Duration = Duration::from_secs(2);
/// A connection that lived this long resets the backoff.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);

/// Reconnect delays: about 100 ms doubling up to 5 s, jittered.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How a connection ended.
enum Outcome {
    /// The user is done (QUIT answered, stdin closed, Ctrl-C).
    Done,
    /// The connection was lost or refused: try the next address.
    Lost,
}

pub async fn run(addrs: Vec<String>, shutdown: CancellationToken) -> anyhow::Result<()> {
    if addrs.is_empty() {
        bail!("no server address given");
    }
    let (tx, mut stdin) = mpsc::channel::<String>(STDIN_QUEUE);
    // A plain thread, not tokio's stdin: a blocked read there would keep the
    // runtime from shutting down after `QUIT`.
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || read_stdin(tx))
        .context("starting the stdin reader")?;

    let mut client = Client {
        state: ClientState::new(),
        outbox: VecDeque::new(),
        stdin_open: true,
    };
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
    for addr in addrs.iter().cycle() {
        let started = Instant::now();
        let outcome = match connect(addr).await {
            Ok(stream) => {
                eprintln!("-- connected to {addr}");
                client.session(stream, &mut stdin, &shutdown).await
            }
            Err(e) => {
                eprintln!("-- cannot connect to {addr}: {e:#}");
                if !client.stdin_open {
                    bail!("cannot deliver the remaining input: no server reachable");
                }
                Outcome::Lost
            }
        };
        if matches!(outcome, Outcome::Done) || client.state.quitting() || shutdown.is_cancelled() {
            return Ok(());
        }
        if !client.stdin_open && client.outbox.is_empty() {
            return Ok(());
        }
        if started.elapsed() >= STABLE_CONNECTION {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        eprintln!("-- reconnecting in {} ms", delay.as_millis());
        if !client.wait(delay, &mut stdin, &shutdown).await {
            return Ok(());
        }
    }
    Ok(())
}

async fn connect(addr: &str) -> anyhow::Result<TcpStream> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .context("timed out")??;
    // Interactive lines are small and should leave at once.
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn read_stdin(tx: mpsc::Sender<String>) {
    for line in std::io::stdin().lock().lines() {
        match line {
            Ok(line) => {
                if tx.blocking_send(line).is_err() {
                    return;
                }
            }
            Err(e) => {
                eprintln!("-- cannot read stdin: {e}");
                return;
            }
        }
    }
}

struct Client {
    state: ClientState,
    /// Typed lines not yet written to a connection.
    outbox: VecDeque<String>,
    stdin_open: bool,
}

impl Client {
    fn queue(&mut self, line: String) {
        if self.outbox.len() >= MAX_OUTBOX {
            eprintln!("-- not connected and {MAX_OUTBOX} lines queued: dropped {line:?}");
        } else {
            self.outbox.push_back(line);
        }
    }

    /// Sleeps `delay`, queueing what the user types. False if the client should
    /// stop (Ctrl-C, or stdin closed with nothing left to send).
    async fn wait(
        &mut self,
        delay: Duration,
        stdin: &mut mpsc::Receiver<String>,
        shutdown: &CancellationToken,
    ) -> bool {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => return true,
                _ = shutdown.cancelled() => return false,
                line = stdin.recv(), if self.stdin_open => match line {
                    Some(line) => self.queue(line),
                    None => {
                        self.stdin_open = false;
                        if self.outbox.is_empty() {
                            return false;
                        }
                    }
                },
            }
        }
    }

    async fn session(
        &mut self,
        stream: TcpStream,
        stdin: &mut mpsc::Receiver<String>,
        shutdown: &CancellationToken,
    ) -> Outcome {
        let (read, mut write) = stream.into_split();
        let mut lines = FramedRead::new(read, LineCodec::new(MAX_SERVER_LINE));
        if let Err(e) = self.catch_up(&mut write).await {
            eprintln!("-- connection lost: {e}");
            return Outcome::Lost;
        }
        let mut quit_deadline = None;
        if !self.stdin_open {
            quit_deadline = Some(self.quit(&mut write).await);
        }
        loop {
            let deadline = quit_deadline.unwrap_or_else(|| Instant::now() + QUIT_WAIT);
            tokio::select! {
                frame = lines.next() => match frame {
                    Some(Ok(Frame::Line(text))) => {
                        match self.on_server_line(&text, &mut write).await {
                            Ok(true) => {}
                            Ok(false) => return Outcome::Lost,
                            Err(e) => {
                                eprintln!("-- connection lost: {e}");
                                return self.lost_or_done();
                            }
                        }
                    }
                    Some(Ok(Frame::TooLong)) => {
                        eprintln!("-- dropped a server line over {MAX_SERVER_LINE} bytes");
                    }
                    Some(Ok(Frame::BadUtf8)) => eprintln!("-- dropped a server line that is not UTF-8"),
                    Some(Err(e)) => {
                        eprintln!("-- connection lost: {e}");
                        return self.lost_or_done();
                    }
                    None => {
                        if !self.state.quitting() {
                            eprintln!("-- connection closed by the server");
                        }
                        return self.lost_or_done();
                    }
                },
                line = stdin.recv(), if self.stdin_open && quit_deadline.is_none() => match line {
                    Some(line) => {
                        let then = self.state.on_user_line(&line);
                        if let Err(e) = send_then(&mut write, &line, then).await {
                            self.outbox.push_front(line);
                            eprintln!("-- connection lost: {e}");
                            return self.lost_or_done();
                        }
                        if self.state.quitting() {
                            quit_deadline = Some(Instant::now() + QUIT_WAIT);
                        }
                    }
                    None => {
                        self.stdin_open = false;
                        quit_deadline = Some(self.quit(&mut write).await);
                    }
                },
                _ = tokio::time::sleep_until(deadline), if quit_deadline.is_some() => {
                    return Outcome::Done;
                }
                _ = shutdown.cancelled() => {
                    let _ = self.quit(&mut write).await;
                    return Outcome::Done;
                }
            }
        }
    }

    /// On a new connection: resumes the session (`RESUME`, when there is
    /// one), then sends what was typed while disconnected.
    async fn catch_up(&mut self, write: &mut OwnedWriteHalf) -> std::io::Result<()> {
        for line in self.state.on_connected() {
            eprintln!(
                "-- resuming the session of {}",
                escape_controls(self.state.user().unwrap_or("?"))
            );
            send(write, &line).await?;
        }
        while let Some(line) = self.outbox.pop_front() {
            let then = self.state.on_user_line(&line);
            if let Err(e) = send_then(write, &line, then).await {
                self.outbox.push_front(line);
                return Err(e);
            }
        }
        Ok(())
    }

    fn lost_or_done(&self) -> Outcome {
        if self.state.quitting() {
            Outcome::Done
        } else {
            Outcome::Lost
        }
    }

    /// Says `QUIT` (best effort) and returns how long to wait for the `BYE`.
    async fn quit(&mut self, write: &mut OwnedWriteHalf) -> Instant {
        self.state.on_user_line("QUIT");
        let _ = send(write, "QUIT").await;
        Instant::now() + QUIT_WAIT
    }

    /// Shows one server line and sends what the state asks for. `Ok(false)`
    /// when the server asked us to reconnect.
    async fn on_server_line(
        &mut self,
        text: &str,
        write: &mut OwnedWriteHalf,
    ) -> std::io::Result<bool> {
        let Ok(line) = text.parse::<ServerLine>() else {
            println!("{}", escape_controls(text));
            return Ok(true);
        };
        let reaction = self.state.on_line(&line);
        if reaction.show {
            println!("{}", render(&line));
        }
        for out in &reaction.send {
            if !out.starts_with("ACK ") {
                eprintln!("-- catching up: {}", escape_controls(out));
            }
            send(write, out).await?;
        }
        if reaction.reconnect {
            eprintln!("-- the server asked us to reconnect");
            return Ok(false);
        }
        Ok(true)
    }
}

/// Sends a line the user typed and what the state asked to follow it.
async fn send_then(
    write: &mut OwnedWriteHalf,
    line: &str,
    then: Option<&str>,
) -> std::io::Result<()> {
    send(write, line).await?;
    match then {
        Some(next) => send(write, next).await,
        None => Ok(()),
    }
}

async fn send(write: &mut OwnedWriteHalf, line: &str) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line.as_bytes());
    buf.push(b'\n');
    write.write_all(&buf).await
}

/// How a server line is shown: conversation lines in a chat-like form, errors
/// marked so they stand out, everything else as the protocol line itself.
///
/// Whatever came from the network has its control characters escaped
/// (`\u{001B}`): a server or another member (an older server, a forged
/// line) must not be able to move the cursor, clear the screen, end a line
/// with a CR or reorder the text on this terminal.
pub fn render(line: &ServerLine) -> String {
    let shown = render_raw(line);
    match escape_controls(&shown) {
        Cow::Borrowed(_) => shown,
        Cow::Owned(escaped) => escaped,
    }
}

fn render_raw(line: &ServerLine) -> String {
    match line {
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
        } => format!("[{room} #{seq}] {sender}: {text}"),
        ServerLine::Dm {
            id, sender, text, ..
        } => format!("[DM #{id}] {sender}: {text}"),
        ServerLine::Joined { room, user } => format!("* {user} joined {room}"),
        ServerLine::Parted { room, user, reason } => {
            format!("* {user} left {room} ({})", reason.as_str())
        }
        ServerLine::Err { .. } => format!("!! {line}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendering() {
        let r = |s: &str| render(&s.parse().unwrap());
        assert_eq!(
            r("MSG lobby 3 100 bob hi there"),
            "[lobby #3] bob: hi there"
        );
        assert_eq!(r("HIST lobby 2 100 bob old"), "[lobby #2] bob: old");
        assert_eq!(r("DM 7 100 carol psst"), "[DM #7] carol: psst");
        assert_eq!(r("JOIN lobby bob"), "* bob joined lobby");
        assert_eq!(r("PART lobby bob idle"), "* bob left lobby (idle)");
        assert_eq!(r("ERR NOT_MEMBER lobby"), "!! ERR NOT_MEMBER lobby");
        assert_eq!(r("OK JOIN lobby 3"), "OK JOIN lobby 3");
    }

    /// No control character a server line carries reaches the terminal
    /// raw: C0 (TAB aside), DEL, C1 (NEL, CSI), U+2028/2029, bidi controls.
    #[test]
    fn rendering_escapes_control_characters() {
        let forged = [
            "x\u{1b}[2J\u{1b}[31mred",
            "a\rOK LOGIN admin",
            "nul\0bell\u{7}bs\u{8}del\u{7f}",
            "nel\u{85}csi\u{9b}31m",
            "ls\u{2028}ps\u{2029}",
            "rlo\u{202e}gpj.exe lri\u{2066} alm\u{61c} rlm\u{200f}",
        ];
        let bad = |c: char| !chat_protocol::text::is_allowed_char(c);
        for text in forged {
            for line in [
                format!("MSG lobby 3 100 bob {text}"),
                format!("HIST lobby 2 100 bob {text}"),
                format!("DM 7 100 carol {text}"),
                format!("ERR BAD_ARGS {text}"),
            ] {
                let parsed: ServerLine = line.parse().unwrap_or_else(|e| panic!("{line:?}: {e:?}"));
                let shown = render(&parsed);
                assert!(!shown.chars().any(bad), "{line:?} shown as {shown:?}");
                assert!(shown.contains("\\u{"), "{shown:?} marks what was escaped");
            }
            // A line the client cannot parse is printed escaped too.
            assert!(!escape_controls(text).chars().any(bad));
        }
        assert_eq!(
            render(&"MSG r 1 1 bob tab\tok".parse().unwrap()),
            "[r #1] bob: tab\tok",
            "TAB is text"
        );
    }
}
