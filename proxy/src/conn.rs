//! One client connection: first line → routing key → chat server → bytes both
//! ways, until either side closes, the ring moves the user elsewhere
//! (`RECONNECT moved`) or the proxy shuts down (`RECONNECT shutdown`).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use chat_protocol::first::{self, First};
use chat_protocol::{Command, ErrorCode, Frame, LineCodec, ParseError, ServerLine};

use chat_tls::Stream;
use tokio::io::Interest;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::timeout;
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;

use crate::error::ConnError;
use crate::metrics::Metrics;
use crate::upstreams::{has_moved, LoadGuard, Snapshot, Upstreams};
use crate::Config;

/// Reads per direction start this large and grow (×4 while reads fill them)
/// up to [`PUMP_BUF_MAX`], so a busy connection (a member of a busy room)
/// moves its backlog in few large reads while a chatty one stays small. The
/// buffer exists only while bytes are moving (see `read_ready`): idle
/// connections, most of them, hold none.
const PUMP_BUF_MIN: usize = 2048;
const PUMP_BUF_MAX: usize = 64 * 1024;

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

/// One direction of the copy: bytes read but not yet written, and the
/// size of the next read (grown while reads fill it, see [`PUMP_BUF_MIN`]).
struct Pump {
    pending: Vec<u8>,
    written: usize,
    size: usize,
    /// The last byte written so far.
    last: Option<u8>,
    /// TLS only: bytes taken by the session but not yet flushed to the
    /// socket (still this direction's, so it reads no more meanwhile).
    unflushed: bool,
    /// TLS only: the buffer a pending read of a TLS stream waits with.
    /// Unlike a socket, a TLS stream has no readiness to wait on without
    /// a buffer; rustls holds buffers of its own on such a connection.
    spare: Vec<u8>,
}

impl Pump {
    fn new() -> Pump {
        Pump {
            pending: Vec::new(),
            written: 0,
            size: PUMP_BUF_MIN,
            last: None,
            unflushed: false,
            spare: Vec::new(),
        }
    }

    fn busy(&self) -> bool {
        self.written < self.pending.len() || self.unflushed
    }

    /// A read of `n` bytes into `buf` is what is pending now; the next
    /// read's size follows how full this one was.
    fn filled(&mut self, mut buf: Vec<u8>, n: usize) {
        if n == self.size {
            self.size = (self.size * 4).min(PUMP_BUF_MAX);
        } else if n < self.size / 8 {
            self.size = (self.size / 2).max(PUMP_BUF_MIN);
        }
        buf.truncate(n);
        self.pending = buf;
        self.written = 0;
    }

    /// Reads what `from` has ready; `Ok(false)` at end of stream. The buffer
    /// is allocated only now and freed once written, so an idle connection
    /// holds none.
    fn read(&mut self, from: &TcpStream) -> std::io::Result<bool> {
        let mut buf = Vec::with_capacity(self.size);
        match read_drained(from, &mut buf) {
            Ok(0) => Ok(false),
            Ok(n) => {
                self.filled(buf, n);
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// Writes as much of what is pending as `to` takes now.
    fn write(&mut self, to: &TcpStream) -> std::io::Result<()> {
        while self.busy() {
            match to.try_write(&self.pending[self.written..]) {
                Ok(n) => {
                    self.written += n;
                    self.last = self.pending.get(self.written.wrapping_sub(1)).copied();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        self.pending = Vec::new();
        self.written = 0;
        Ok(())
    }

    /// Reads what a TLS stream has decrypted; `Ready(Ok(false))` at its end.
    fn poll_read_tls(
        &mut self,
        from: &mut Stream,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<bool>> {
        let mut buf = std::mem::take(&mut self.spare);
        if buf.len() != self.size {
            buf = vec![0; self.size];
        }
        let mut read = ReadBuf::new(&mut buf);
        match Pin::new(from).poll_read(cx, &mut read) {
            Poll::Pending => {
                self.spare = buf;
                Poll::Pending
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => {
                let n = read.filled().len();
                if n == 0 {
                    return Poll::Ready(Ok(false));
                }
                self.filled(buf, n);
                Poll::Ready(Ok(true))
            }
        }
    }

    /// Writes what is pending into a TLS stream and flushes it to the
    /// socket; `Ready(Ok)` once all of it is on the socket.
    fn poll_write_tls(
        &mut self,
        to: &mut Stream,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        while self.written < self.pending.len() {
            let n = ready!(Pin::new(&mut *to).poll_write(cx, &self.pending[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
            self.last = self.pending.get(self.written - 1).copied();
            self.unflushed = true;
        }
        if self.unflushed {
            ready!(Pin::new(&mut *to).poll_flush(cx))?;
            self.unflushed = false;
        }
        self.pending = Vec::new();
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    /// After [`Event::UpstreamReadable`]: reads the plain socket, which is
    /// ready; a TLS upstream's bytes were read by the poll that raised it.
    fn read_upstream(&mut self, from: &Stream) -> std::io::Result<bool> {
        match from {
            Stream::Plain(s) => self.read(s),
            Stream::Tls(_) => Ok(true),
        }
    }

    /// Writes to the plain socket now; a TLS upstream is written (and
    /// flushed) by the copy loop's poll, see [`Pump::poll_write_tls`].
    fn write_upstream(&mut self, to: &Stream) -> std::io::Result<()> {
        match to {
            Stream::Plain(s) => self.write(s),
            Stream::Tls(_) => Ok(()),
        }
    }

    /// Whether what was written so far ends a line (or nothing was).
    fn at_line_start(&self) -> bool {
        self.last.is_none_or(|b| b == b'\n')
    }
}

/// A read buffer that knows its spare capacity (what [`read_drained`] needs:
/// `BufMut` alone may grow a `Vec` and so cannot tell a filled buffer).
pub trait SpareCapacity: bytes::BufMut {
    fn spare(&self) -> usize;
}

impl SpareCapacity for Vec<u8> {
    fn spare(&self) -> usize {
        self.capacity() - self.len()
    }
}

impl SpareCapacity for BytesMut {
    fn spare(&self) -> usize {
        self.capacity() - self.len()
    }
}

/// Reads what `from` has ready into the spare capacity of `buf`. A read
/// that does not fill the buffer emptied the socket, so its readiness is
/// cleared right away; otherwise tokio learns that only from one more read
/// that finds nothing, a system call per chunk copied.
pub fn read_drained<B: SpareCapacity>(from: &TcpStream, buf: &mut B) -> std::io::Result<usize> {
    let mut got = None;
    let r = from.try_io(Interest::READABLE, || {
        let n = from.try_read_buf(buf)?;
        got = Some(n);
        if n > 0 && buf.spare() > 0 {
            // Clears the readiness (unless an event came in meanwhile).
            Err(std::io::ErrorKind::WouldBlock.into())
        } else {
            Ok(n)
        }
    });
    match (got, r) {
        (Some(n), _) => Ok(n),
        (None, r) => r,
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
        let replay = async {
            self.upstream.write_all(&self.first.raw).await?;
            self.upstream.flush().await
        };
        replay
            .await
            .map_err(|e| ConnError::Upstream(format!("replaying the first line: {e}")))?;
        self.first.raw = BytesMut::new();
        let mut down = Pump::new();
        let mut up = Pump::new();
        // Client → server still open (no EOF, no stop, no half-close yet).
        let mut up_open = true;
        let mut reason: Option<&'static str> = None;
        let mut drain: Option<Pin<Box<tokio::time::Sleep>>> = None;
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
                use std::task::Poll::{Pending, Ready};
                if let Some(d) = drain.as_mut() {
                    if d.as_mut().poll(cx).is_ready() {
                        return Ready(Event::DrainOver);
                    }
                }
                if down.busy() {
                    if let Ready(r) = self.client.poll_write_ready(cx) {
                        return Ready(
                            r.map_or(Event::Failed(End::Client), |()| Event::ClientWritable),
                        );
                    }
                } else {
                    let read = match &mut self.upstream {
                        Stream::Plain(s) => s.poll_read_ready(cx).map(|r| r.map(|()| true)),
                        tls => down.poll_read_tls(tls, cx),
                    };
                    if let Ready(r) = read {
                        return Ready(match r {
                            Ok(true) => Event::UpstreamReadable,
                            Ok(false) | Err(_) => Event::Failed(End::Upstream),
                        });
                    }
                }
                if up.busy() {
                    let wrote = match &mut self.upstream {
                        Stream::Plain(s) => s.poll_write_ready(cx),
                        tls => up.poll_write_tls(tls, cx),
                    };
                    if let Ready(r) = wrote {
                        return Ready(
                            r.map_or(Event::Failed(End::Client), |()| Event::UpstreamWritable),
                        );
                    }
                } else if up_open {
                    if let Ready(r) = self.client.poll_read_ready(cx) {
                        return Ready(
                            r.map_or(Event::Failed(End::Client), |()| Event::ClientReadable),
                        );
                    }
                }
                if reason.is_none() {
                    if moved.as_mut().poll(cx).is_ready() {
                        return Ready(Event::Stop("moved"));
                    }
                    if shutdown.as_mut().poll(cx).is_ready() {
                        return Ready(Event::Stop("shutdown"));
                    }
                }
                Pending
            })
            .await;
            match event {
                Event::Failed(end) => break end,
                Event::UpstreamReadable => match down.read_upstream(&self.upstream) {
                    Ok(true) => {
                        if down.write(&self.client).is_err() {
                            break End::Client;
                        }
                    }
                    Ok(false) | Err(_) => break End::Upstream,
                },
                Event::ClientWritable => {
                    if down.write(&self.client).is_err() {
                        break End::Client;
                    }
                }
                Event::ClientReadable => match up.read(&self.client) {
                    Ok(true) => {
                        if up.write_upstream(&self.upstream).is_err() {
                            break End::Client;
                        }
                    }
                    // Client EOF: the half-close goes to the server, which
                    // answers what it read and closes; `down` sees that.
                    Ok(false) => {
                        up_open = false;
                        let _ = self.upstream.shutdown().await;
                    }
                    Err(_) => break End::Client,
                },
                Event::UpstreamWritable => {
                    if up.write_upstream(&self.upstream).is_err() {
                        break End::Client;
                    }
                    if !up_open && !up.busy() {
                        let _ = self.upstream.shutdown().await;
                    }
                }
                Event::Stop(why) => {
                    reason = Some(why);
                    drain = Some(Box::pin(tokio::time::sleep(DRAIN_TIMEOUT)));
                    if up_open {
                        up_open = false;
                        if !up.busy() {
                            let _ = self.upstream.shutdown().await;
                        }
                    }
                }
                Event::DrainOver => break End::Upstream,
            }
        };
        match (end, reason) {
            (End::Upstream, Some(reason)) => {
                if reason == "moved" {
                    ctx.metrics.rebalance_moves_total.inc();
                }
                let line = ServerLine::Reconnect {
                    reason: reason.into(),
                };
                Box::pin(farewell(&mut self.client, &line, down.at_line_start())).await;
                Ok(())
            }
            (End::Client, _) => Err(ConnError::Client("client went away".into())),
            (End::Upstream, None) => {
                let _ = timeout(FAREWELL_TIMEOUT, self.client.shutdown()).await;
                Ok(())
            }
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
