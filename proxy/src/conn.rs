//! One client connection: first line → routing key → chat server → bytes both
//! ways, until either side closes, the ring moves the user elsewhere
//! (`RECONNECT moved`) or the proxy shuts down (`RECONNECT shutdown`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use chat_protocol::{Command, ErrorCode, Frame, LineCodec, ServerLine};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::ReadHalf;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::timeout;
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;

use crate::error::ConnError;
use crate::metrics::Metrics;
use crate::upstreams::{has_moved, Snapshot, Upstreams};
use crate::Config;

/// Largest read per direction. The buffer exists only while bytes are moving
/// (see `read_ready`): idle connections, most of them, hold none.
const PUMP_BUF: usize = 2048;

/// A line the proxy writes itself (an error, a RECONNECT) to a client that does
/// not read gets this long, then the connection is dropped.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a moved or draining client's server may take to flush and close
/// before the proxy cuts it off.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

const FIRST_LINE_USAGE: &str =
    "first line must be LOGIN <user> <password>, RESUME <token> or JOIN <room> <name>";

pub(crate) struct Ctx {
    pub config: Config,
    pub upstreams: Arc<Upstreams>,
    pub metrics: Metrics,
    pub shutdown: CancellationToken,
}

/// The first line, as read.
struct FirstLine {
    /// Routing key: the user name, or the token of a RESUME.
    key: Vec<u8>,
    /// Every byte read so far (the line, its terminator and whatever followed),
    /// replayed to the chat server unchanged.
    raw: BytesMut,
}

/// Serves one client connection to the end.
pub(crate) async fn serve(ctx: Arc<Ctx>, mut client: TcpStream, peer: SocketAddr) {
    let _ = client.set_nodelay(true);
    // The first-line and connect phases are boxed, each in a statement of its
    // own: the connection's task then keeps only the copy phase's state for
    // its lifetime.
    let read = Box::pin(read_first_line(&ctx, &mut client)).await;
    let first = match read {
        Ok(Some(first)) => first,
        Ok(None) => return,
        Err(reply) => {
            ctx.metrics.first_line_errors_total.inc();
            tracing::debug!(%peer, reply = %reply, "first line refused");
            farewell(&mut client, &reply, true).await;
            return;
        }
    };
    let mut ring_rx = ctx.upstreams.subscribe();
    let placed = ring_rx.borrow_and_update().clone();
    let connected = Box::pin(connect(&ctx, &placed, &first.key)).await;
    let (upstream, server) = match connected {
        Ok(pair) => pair,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "no chat server for the connection");
            let reply = ServerLine::err(ErrorCode::Unavailable, "no chat server available");
            farewell(&mut client, &reply, true).await;
            return;
        }
    };
    let _load = ctx.upstreams.acquire(&server);
    tracing::debug!(%peer, upstream = %server, "routed");
    if let Err(e) = proxy(&ctx, client, upstream, first, &server, ring_rx, placed).await {
        tracing::debug!(%peer, upstream = %server, error = %e, "connection ended");
    }
}

/// Reads up to the end of the first line. `Ok(None)`: the client left (or the
/// proxy is shutting down) before sending one; `Err`: the line to answer with.
async fn read_first_line(
    ctx: &Ctx,
    client: &mut TcpStream,
) -> Result<Option<FirstLine>, ServerLine> {
    let mut codec = LineCodec::new(ctx.config.max_line_bytes);
    let mut raw = BytesMut::with_capacity(256);
    // The codec consumes what it decodes; `raw` keeps every byte for the replay.
    // Both stay within max_line_bytes + 2 + one read: the codec reports an
    // over-long line as soon as it is longer than the limit.
    let mut pending = BytesMut::new();
    let limit = Duration::from_secs(ctx.config.first_line_timeout_secs);
    let read = async {
        loop {
            if let Some(frame) = codec.decode(&mut pending).map_err(|_| ())? {
                return Ok(Some(frame));
            }
            raw.reserve(1024);
            let before = raw.len();
            match client.read_buf(&mut raw).await {
                Ok(0) => return codec.decode_eof(&mut pending).map_err(|_| ()),
                Ok(_) => pending.extend_from_slice(&raw[before..]),
                Err(_) => return Err(()),
            }
        }
    };
    let frame = tokio::select! {
        r = timeout(limit, read) => match r {
            Ok(Ok(Some(frame))) => frame,
            Ok(Ok(None)) | Ok(Err(())) => return Ok(None),
            Err(_) => return Err(ServerLine::err(
                ErrorCode::BadFirstLine,
                "no first line in time",
            )),
        },
        _ = ctx.shutdown.cancelled() => return Ok(None),
    };
    let line = match frame {
        Frame::Line(line) => line,
        Frame::TooLong => {
            return Err(ServerLine::err(
                ErrorCode::LineTooLong,
                "first line too long",
            ))
        }
        Frame::BadUtf8 => {
            return Err(ServerLine::err(
                ErrorCode::BadUtf8,
                "first line is not UTF-8",
            ))
        }
    };
    let key = routing_key(&line)?;
    Ok(Some(FirstLine { key, raw }))
}

/// The routing key of a first line, answering exactly as a chat server would
/// (`BAD_ARGS` for a malformed LOGIN/RESUME/JOIN, else `BAD_FIRST_LINE`).
///
/// LOGIN, guest JOIN and RESUME all route by the user name (a token is
/// `<user>.<secret>`), so a user's connections meet on one server.
fn routing_key(line: &str) -> Result<Vec<u8>, ServerLine> {
    match Command::parse(line) {
        Ok(Command::Login { user, .. }) => Ok(user.into_bytes()),
        Ok(Command::Join {
            guest: Some(name), ..
        }) => Ok(name.into_bytes()),
        Ok(Command::Resume { token }) => {
            let user = chat_protocol::names::token_user(&token).unwrap_or(&token);
            Ok(user.as_bytes().to_vec())
        }
        Err(e) if e.code == ErrorCode::BadArgs => Err(ServerLine::err(e.code, e.detail)),
        _ => Err(ServerLine::err(ErrorCode::BadFirstLine, FIRST_LINE_USAGE)),
    }
}

/// Connects to the first server in `key`'s order that answers; each failure
/// counts toward that server's ejection.
async fn connect(ctx: &Ctx, snap: &Snapshot, key: &[u8]) -> Result<(TcpStream, String), ConnError> {
    let limit = Duration::from_millis(ctx.config.connect_timeout_ms);
    let order = ctx.upstreams.order(snap, key);
    if order.is_empty() {
        return Err(ConnError::Upstream("no healthy chat server".into()));
    }
    for id in order {
        match timeout(limit, TcpStream::connect(id.as_str())).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok((stream, id));
            }
            Ok(Err(e)) => tracing::warn!(upstream = %id, error = %e, "connect failed"),
            Err(_) => tracing::warn!(upstream = %id, "connect timed out"),
        }
        ctx.upstreams.connect_failed(&id);
    }
    Err(ConnError::Upstream("every chat server refused".into()))
}

enum Down {
    /// The chat server closed (after its own `BYE`/`ERR`, or it died).
    UpstreamClosed { at_line_start: bool },
    /// Writing to the client failed.
    ClientGone,
    /// Stopped on request between two writes.
    Stopped { at_line_start: bool },
}

/// Replays the first line, then copies both ways. Not `copy_bidirectional`:
/// the proxy must be able to stop the server→client direction between two
/// writes, know whether the client is at the start of a line, and then write
/// its own `RECONNECT` line on the same socket.
async fn proxy(
    ctx: &Ctx,
    mut client: TcpStream,
    mut upstream: TcpStream,
    first: FirstLine,
    server: &str,
    mut ring_rx: watch::Receiver<Arc<Snapshot>>,
    mut placed: Arc<Snapshot>,
) -> Result<(), ConnError> {
    upstream
        .write_all(&first.raw)
        .await
        .map_err(|e| ConnError::Upstream(format!("replaying the first line: {e}")))?;
    drop(first.raw);
    let key = first.key;
    let (cr, mut cw) = client.split();
    let (ur, mut uw) = upstream.split();
    // Moving a client: stop reading it and half-close the server side; the
    // server answers what it read, writes what it queued and closes, and all
    // of that still reaches the client before `RECONNECT`. Cutting the server
    // off instead would drop lines it already wrote, DMs it counts as
    // delivered among them. `stop` cuts it off after `DRAIN_TIMEOUT`.
    let stop = CancellationToken::new();
    let stop_up = CancellationToken::new();
    let mut reason: Option<&'static str> = None;
    let drain = tokio::time::sleep(Duration::from_secs(3600));
    tokio::pin!(drain);
    let end = {
        let down = pump_down(&ur, &mut cw, &stop);
        let up = pump_up(&cr, &mut uw, &stop_up);
        tokio::pin!(down, up);
        let mut client_done = false;
        loop {
            tokio::select! {
                end = &mut down => break end,
                gone = &mut up, if !client_done => {
                    client_done = true;
                    if gone.is_err() {
                        break Down::ClientGone;
                    }
                    // Client EOF (or a move): the half-close went to the
                    // server, which answers what it read and closes; `down`
                    // sees that.
                }
                _ = wait_moved(&mut ring_rx, &mut placed, &key, server), if reason.is_none() => {
                    reason = Some("moved");
                    stop_up.cancel();
                    drain.as_mut().reset(tokio::time::Instant::now() + DRAIN_TIMEOUT);
                }
                _ = ctx.shutdown.cancelled(), if reason.is_none() => {
                    reason = Some("shutdown");
                    stop_up.cancel();
                    drain.as_mut().reset(tokio::time::Instant::now() + DRAIN_TIMEOUT);
                }
                _ = &mut drain, if reason.is_some() => stop.cancel(),
            }
        }
    };
    drop(upstream);
    match (end, reason) {
        (
            Down::Stopped { at_line_start } | Down::UpstreamClosed { at_line_start },
            Some(reason),
        ) => {
            if reason == "moved" {
                ctx.metrics.rebalance_moves_total.inc();
            }
            let line = ServerLine::Reconnect {
                reason: reason.into(),
            };
            farewell(&mut client, &line, at_line_start).await;
            Ok(())
        }
        (Down::ClientGone, _) => Err(ConnError::Client("client went away".into())),
        _ => {
            let _ = timeout(FAREWELL_TIMEOUT, client.shutdown()).await;
            Ok(())
        }
    }
}

/// Reads what `r` has ready into a buffer allocated for it: waits for
/// readability first, so an idle connection holds no copy buffer. `Ok(None)`
/// is end of stream.
async fn read_ready(r: &ReadHalf<'_>) -> std::io::Result<Option<Vec<u8>>> {
    loop {
        r.readable().await?;
        let mut buf = vec![0u8; PUMP_BUF];
        match r.try_read(&mut buf) {
            Ok(0) => return Ok(None),
            Ok(n) => {
                buf.truncate(n);
                return Ok(Some(buf));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Server → client until the server closes, the client fails or `stop`.
async fn pump_down<W>(ur: &ReadHalf<'_>, cw: &mut W, stop: &CancellationToken) -> Down
where
    W: AsyncWrite + Unpin,
{
    let mut at_line_start = true;
    loop {
        let buf = tokio::select! {
            biased;
            _ = stop.cancelled() => return Down::Stopped { at_line_start },
            r = read_ready(ur) => match r {
                Ok(Some(buf)) => buf,
                Ok(None) | Err(_) => return Down::UpstreamClosed { at_line_start },
            },
        };
        if cw.write_all(&buf).await.is_err() {
            return Down::ClientGone;
        }
        at_line_start = buf.last() == Some(&b'\n');
    }
}

/// Client → server until the client's EOF or `stop` (either passed on as a
/// half-close) or an error (`Err`).
async fn pump_up<W>(cr: &ReadHalf<'_>, uw: &mut W, stop: &CancellationToken) -> Result<(), ()>
where
    W: AsyncWrite + Unpin,
{
    loop {
        let read = tokio::select! {
            biased;
            _ = stop.cancelled() => {
                let _ = uw.shutdown().await;
                return Ok(());
            }
            r = read_ready(cr) => r,
        };
        match read {
            Ok(None) => {
                let _ = uw.shutdown().await;
                return Ok(());
            }
            Ok(Some(buf)) => uw.write_all(&buf).await.map_err(|_| ())?,
            Err(_) => return Err(()),
        }
    }
}

/// Returns once a ring change moves this connection (see [`has_moved`]);
/// pending forever once the ring can no longer change.
async fn wait_moved(
    rx: &mut watch::Receiver<Arc<Snapshot>>,
    placed: &mut Arc<Snapshot>,
    key: &[u8],
    server: &str,
) {
    loop {
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        let new = rx.borrow_and_update().clone();
        let moved = has_moved(&placed.ring, &new.ring, key, server);
        *placed = new;
        if moved {
            return;
        }
    }
}

/// Writes one last line (after a `\n` if the client is mid-line) and closes.
async fn farewell(client: &mut TcpStream, line: &ServerLine, at_line_start: bool) {
    let mut out = Vec::with_capacity(64);
    if !at_line_start {
        out.push(b'\n');
    }
    out.extend_from_slice(&line.to_bytes());
    let _ = timeout(FAREWELL_TIMEOUT, async {
        client.write_all(&out).await?;
        client.shutdown().await
    })
    .await;
}
