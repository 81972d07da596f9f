//! One client connection: first line → routing key → chat server → bytes both
//! ways, until either side closes, the ring moves the user elsewhere
//! (`RECONNECT moved`) or the proxy shuts down (`RECONNECT shutdown`).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use chat_protocol::first::{self, First};
use chat_protocol::{Command, ErrorCode, Frame, LineCodec, ParseError, ServerLine};

use chat_tls::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::timeout;
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;

use crate::error::ConnError;
use crate::metrics::Metrics;
use crate::pump::Pump;
use crate::upstreams::{has_moved, LoadGuard, Snapshot, Upstreams};
use crate::Config;

/// A line the proxy writes itself (an error, a RECONNECT) to a client that does
/// not read gets this long, then the connection is dropped.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a moved or draining client's server may take to flush and close
/// before the proxy cuts it off.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) struct Ctx {
    pub config: Config,
    /// Set with `upstream_tls`: chat servers are dialed over mutual TLS.
    pub upstream_tls: Option<chat_tls::Connector>,
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
///
/// The first-line and connect phases run boxed, and the copy phase gets
/// only what it needs ([`Link`]): most connections are idle, and whatever a
/// long-lived async function keeps in scope stays in its task's memory.
pub(crate) async fn serve(ctx: Arc<Ctx>, client: TcpStream, peer: SocketAddr) {
    let Some(link) = Box::pin(setup(&ctx, client, peer)).await else {
        return;
    };
    let mut link = link;
    if let Err(e) = link.relay(&ctx).await {
        tracing::debug!(%peer, error = %e, "connection ended");
    }
}

/// A client routed to its chat server, the first line not yet replayed.
struct Link {
    client: TcpStream,
    upstream: Stream,
    first: FirstLine,
    server: String,
    ring_rx: watch::Receiver<Arc<Snapshot>>,
    placed: Arc<Snapshot>,
    _load: LoadGuard,
}

/// Reads the first line and connects to the user's chat server; `None`
/// once the connection was answered and closed here.
async fn setup(ctx: &Ctx, mut client: TcpStream, peer: SocketAddr) -> Option<Link> {
    let _ = client.set_nodelay(true);
    let mut first = match read_first_line(ctx, &mut client).await {
        Ok(Some(first)) => first,
        Ok(None) => return None,
        Err(reply) => {
            ctx.metrics.first_line_errors_total.inc();
            tracing::debug!(%peer, reply = %reply, "first line refused");
            farewell(&mut client, &reply, true).await;
            return None;
        }
    };
    let mut ring_rx = ctx.upstreams.subscribe();
    let placed = ring_rx.borrow_and_update().clone();
    let (upstream, server) = match connect(ctx, &placed, &first.key).await {
        Ok(pair) => pair,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "no chat server for the connection");
            let reply = ServerLine::err(ErrorCode::Unavailable, "no chat server available");
            farewell(&mut client, &reply, true).await;
            return None;
        }
    };
    if ctx.config.send_proxy_line {
        first.raw = with_proxy_line(peer, &client, &first.raw);
    }
    let load = ctx.upstreams.acquire(&server);
    tracing::debug!(%peer, upstream = %server, "routed");
    Some(Link {
        client,
        upstream,
        first,
        server,
        ring_rx,
        placed,
        _load: load,
    })
}

/// Reads up to the end of the first line (after any empty lines, see
/// [`chat_protocol::first`]). `Ok(None)`: the client left (or the proxy is
/// shutting down) before sending one; `Err`: the line to answer with.
async fn read_first_line(
    ctx: &Ctx,
    client: &mut TcpStream,
) -> Result<Option<FirstLine>, ServerLine> {
    let mut codec = LineCodec::new(ctx.config.max_line_bytes);
    let mut raw = BytesMut::with_capacity(256);
    // The codec consumes what it decodes; `raw` keeps the bytes from the
    // first line on for the replay (skipped empty lines are dropped from it).
    // Both stay within max_line_bytes + 2 + one read: the codec reports an
    // over-long line as soon as it is longer than the limit.
    let mut pending = BytesMut::new();
    let limit = ctx.config.first_line_timeout_secs;
    let mut empty = 0;
    let read = async {
        loop {
            if let Some(frame) = codec.decode(&mut pending).map_err(|_| ())? {
                match judge_first(frame, &mut empty) {
                    Some(start) => return Ok(start),
                    None => {
                        // A skipped empty line is not replayed.
                        raw.advance(raw.len() - pending.len());
                        continue;
                    }
                }
            }
            raw.reserve(1024);
            let before = raw.len();
            match client.read_buf(&mut raw).await {
                // A last line without terminator still counts; nothing at
                // all (or only empty lines) is a client that left.
                Ok(0) => {
                    return match codec.decode_eof(&mut pending).map_err(|_| ())? {
                        Some(frame) => judge_first(frame, &mut empty).ok_or(()),
                        None => Err(()),
                    }
                }
                Ok(_) => pending.extend_from_slice(&raw[before..]),
                Err(_) => return Err(()),
            }
        }
    };
    let start = tokio::select! {
        r = timeout(limit, read) => match r {
            Ok(Ok(start)) => start,
            Ok(Err(())) => return Ok(None),
            Err(_) => return Err(ServerLine::err(
                ErrorCode::BadFirstLine,
                "no first line in time",
            )),
        },
        _ = ctx.shutdown.cancelled() => return Ok(None),
    };
    let cmd = start.map_err(|e| ServerLine::err(e.code, e.detail))?;
    let key = First::Start(cmd)
        .routing_key()
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    Ok(Some(FirstLine { key, raw }))
}

/// What is replayed to the chat server, behind the PROXY line naming the
/// client's address (`raw` is everything the client sent so far).
fn with_proxy_line(peer: SocketAddr, client: &TcpStream, raw: &[u8]) -> BytesMut {
    let local = client.local_addr().unwrap_or(peer);
    let line = chat_protocol::proxy_line::format(peer, local);
    let mut out = BytesMut::with_capacity(line.len() + raw.len());
    out.extend_from_slice(line.as_bytes());
    out.extend_from_slice(raw);
    out
}

/// One line read before the first line: `None` for an empty line to skip,
/// else the start or the refusal, by the rules every chat server applies.
/// Pure (no I/O), so it can be fuzzed on its own; `empty` counts the empty
/// lines skipped so far.
pub fn judge_first(frame: Frame, empty: &mut usize) -> Option<Result<Command, ParseError>> {
    let line = match frame {
        Frame::Line(line) => line,
        Frame::TooLong => {
            let e = ParseError::new(ErrorCode::LineTooLong, "first line too long");
            return Some(Err(e));
        }
        Frame::BadUtf8 => {
            let e = ParseError::new(ErrorCode::BadUtf8, "first line is not UTF-8");
            return Some(Err(e));
        }
    };
    match first::classify(line.as_bytes(), *empty) {
        Ok(First::Empty) => {
            *empty += 1;
            None
        }
        Ok(First::Start(cmd)) => Some(Ok(cmd)),
        // Server links never pass through the proxy.
        Ok(First::Peer(_)) => Some(Err(ParseError::new(ErrorCode::BadFirstLine, first::USAGE))),
        Err(e) => Some(Err(e)),
    }
}

/// Connects to the first server in `key`'s order that answers (within
/// `connect_timeout_ms`, the TLS handshake included); each failure counts
/// toward that server's ejection.
async fn connect(ctx: &Ctx, snap: &Snapshot, key: &[u8]) -> Result<(Stream, String), ConnError> {
    let limit = ctx.config.connect_timeout_ms;
    let order = ctx.upstreams.order(snap, key);
    if order.is_empty() {
        return Err(ConnError::Upstream("no healthy chat server".into()));
    }
    for id in order {
        match timeout(limit, dial(ctx, &id)).await {
            Ok(Ok(stream)) => return Ok((stream, id)),
            Ok(Err(e)) => tracing::warn!(upstream = %id, error = %e, "connect failed"),
            Err(_) => tracing::warn!(upstream = %id, "connect timed out"),
        }
        ctx.upstreams.connect_failed(&id);
    }
    Err(ConnError::Upstream("every chat server refused".into()))
}

/// One chat server's client port: plain TCP, or mutual TLS with the
/// server's certificate required to carry `chat-server` (its address is
/// not what the certificate names: pods come and go).
async fn dial(ctx: &Ctx, id: &str) -> std::io::Result<Stream> {
    let tcp = TcpStream::connect(id).await?;
    let _ = tcp.set_nodelay(true);
    match &ctx.upstream_tls {
        Some(connector) => connector.connect(chat_tls::names::SERVER, tcp).await,
        None => Ok(Stream::Plain(tcp)),
    }
}

/// What woke the copy loop.
enum Event {
    UpstreamReadable,
    ClientWritable,
    ClientReadable,
    UpstreamWritable,
    /// The ring moved this client, or the proxy is shutting down.
    Stop(&'static str),
    DrainOver,
    /// A socket reported an error.
    Failed(End),
}

/// How the copy phase ended.
enum End {
    /// The chat server closed (after its own `BYE`/`ERR`, or it died), or a
    /// drain ran out of time.
    Upstream,
    /// The client went away (or writing to either side failed).
    Client,
}

impl Link {
    /// Replays the first line, then copies both ways. Not
    /// `copy_bidirectional`: the proxy must be able to stop the
    /// server→client direction, know whether the client is at the start of
    /// a line, and then write its own `RECONNECT` line on the same socket.
    ///
    /// One loop over readiness events rather than a task or future per
    /// direction: an idle connection then holds only its sockets, its two
    /// pending-free pumps and the move and shutdown waits. Each direction reads again only once its last read
    /// is written (backpressure both ways).
    ///
    /// Moving a client: stop reading it and half-close the server side (after
    /// passing on what the client already sent); the server answers what it
    /// read, writes what it queued and closes, and all of that still reaches
    /// the client before `RECONNECT`. Cutting the server off instead would
    /// drop lines it already wrote, DMs it counts as delivered among them.
    /// A server that does not close within `DRAIN_TIMEOUT` is cut off.
    async fn relay(&mut self, ctx: &Ctx) -> Result<(), ConnError> {
        self.replay().await?;
        let mut copy = CopyState {
            down: Pump::new(),
            up: Pump::new(),
            up_open: true,
            reason: None,
            drain: None,
        };
        // Created once and polled in place: an idle connection waits in
        // `poll_fn` below with no per-wait futures of its own.
        let moved = wait_moved(
            &mut self.ring_rx,
            &mut self.placed,
            &self.first.key,
            &self.server,
        );
        let shutdown = ctx.shutdown.cancelled();
        tokio::pin!(moved, shutdown);
        let end = loop {
            let event = std::future::poll_fn(|cx| {
                copy.poll_event(
                    cx,
                    (&self.client, &mut self.upstream),
                    moved.as_mut(),
                    shutdown.as_mut(),
                )
            })
            .await;
            if let Some(end) = copy.apply(event, &self.client, &mut self.upstream).await {
                break end;
            }
        };
        let at_line_start = copy.down.at_line_start();
        match (end, copy.reason) {
            (End::Upstream, Some(reason)) => {
                if reason == "moved" {
                    ctx.metrics.rebalance_moves_total.inc();
                }
                let line = ServerLine::Reconnect {
                    reason: reason.into(),
                };
                Box::pin(farewell(&mut self.client, &line, at_line_start)).await;
                Ok(())
            }
            (End::Client, _) => Err(ConnError::Client("client went away".into())),
            (End::Upstream, None) => {
                let _ = timeout(FAREWELL_TIMEOUT, self.client.shutdown()).await;
                Ok(())
            }
        }
    }

    /// Writes what the client sent so far (the first line) to the server.
    async fn replay(&mut self) -> Result<(), ConnError> {
        let replay = async {
            self.upstream.write_all(&self.first.raw).await?;
            self.upstream.flush().await
        };
        replay
            .await
            .map_err(|e| ConnError::Upstream(format!("replaying the first line: {e}")))?;
        self.first.raw = BytesMut::new();
        Ok(())
    }
}

/// The copy loop's state besides the sockets.
struct CopyState {
    /// Server → client.
    down: Pump,
    /// Client → server.
    up: Pump,
    /// Client → server still open (no EOF, no stop, no half-close yet).
    up_open: bool,
    /// Why the proxy is ending the connection (`moved`, `shutdown`).
    reason: Option<&'static str>,
    /// Ends the wait for a stopped connection's server to close.
    drain: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl CopyState {
    /// The next thing to do: a direction whose next step is ready, or a
    /// stop. Each direction waits either to write what it holds or, empty,
    /// to read.
    fn poll_event(
        &mut self,
        cx: &mut Context<'_>,
        (client, upstream): (&TcpStream, &mut Stream),
        moved: Pin<&mut impl Future<Output = ()>>,
        shutdown: Pin<&mut impl Future<Output = ()>>,
    ) -> Poll<Event> {
        use std::task::Poll::{Pending, Ready};
        let failed = |end: End| move |_: std::io::Error| Event::Failed(end);
        if let Some(d) = self.drain.as_mut() {
            if d.as_mut().poll(cx).is_ready() {
                return Ready(Event::DrainOver);
            }
        }
        if self.down.busy() {
            if let Ready(r) = client.poll_write_ready(cx) {
                return Ready(r.map_or_else(failed(End::Client), |()| Event::ClientWritable));
            }
        } else {
            let read = match &mut *upstream {
                Stream::Plain(s) => s.poll_read_ready(cx).map(|r| r.map(|()| true)),
                tls => self.down.poll_read_tls(tls, cx),
            };
            if let Ready(r) = read {
                return Ready(match r {
                    Ok(true) => Event::UpstreamReadable,
                    Ok(false) | Err(_) => Event::Failed(End::Upstream),
                });
            }
        }
        if self.up.busy() {
            let wrote = match &mut *upstream {
                Stream::Plain(s) => s.poll_write_ready(cx),
                tls => self.up.poll_write_tls(tls, cx),
            };
            if let Ready(r) = wrote {
                return Ready(r.map_or_else(failed(End::Client), |()| Event::UpstreamWritable));
            }
        } else if self.up_open {
            if let Ready(r) = client.poll_read_ready(cx) {
                return Ready(r.map_or_else(failed(End::Client), |()| Event::ClientReadable));
            }
        }
        if self.reason.is_none() {
            if moved.poll(cx).is_ready() {
                return Ready(Event::Stop("moved"));
            }
            if shutdown.poll(cx).is_ready() {
                return Ready(Event::Stop("shutdown"));
            }
        }
        Pending
    }

    /// Does what `event` calls for; `Some` once the copy is over.
    async fn apply(
        &mut self,
        event: Event,
        client: &TcpStream,
        upstream: &mut Stream,
    ) -> Option<End> {
        match event {
            Event::Failed(end) => return Some(end),
            Event::UpstreamReadable => match self.down.read_upstream(upstream) {
                Ok(true) => {
                    if self.down.write(client).is_err() {
                        return Some(End::Client);
                    }
                }
                Ok(false) | Err(_) => return Some(End::Upstream),
            },
            Event::ClientWritable => {
                if self.down.write(client).is_err() {
                    return Some(End::Client);
                }
            }
            Event::ClientReadable => match self.up.read(client) {
                Ok(true) => {
                    if self.up.write_upstream(upstream).is_err() {
                        return Some(End::Client);
                    }
                }
                // Client EOF: the half-close goes to the server, which
                // answers what it read and closes; `down` sees that.
                Ok(false) => {
                    self.up_open = false;
                    let _ = upstream.shutdown().await;
                }
                Err(_) => return Some(End::Client),
            },
            Event::UpstreamWritable => {
                if self.up.write_upstream(upstream).is_err() {
                    return Some(End::Client);
                }
                if !self.up_open && !self.up.busy() {
                    let _ = upstream.shutdown().await;
                }
            }
            Event::Stop(why) => {
                self.reason = Some(why);
                self.drain = Some(Box::pin(tokio::time::sleep(DRAIN_TIMEOUT)));
                if self.up_open {
                    self.up_open = false;
                    if !self.up.busy() {
                        let _ = upstream.shutdown().await;
                    }
                }
            }
            Event::DrainOver => return Some(End::Upstream),
        }
        None
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
