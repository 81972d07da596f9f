//! The one way every tier serves HTTP (the admin ports of proxy, chat server
//! and dbproxy, and the dbproxy API): hyper http1 connections accepted by
//! [`Acceptor::next_or_full`], each bounded in time and all of them in number.
//!
//! accept → [`Wrap::wrap`] (plain TCP, or a TLS handshake: the dbproxy API)
//! → one tracked task per connection: hyper `serve_connection` raced against
//! the connection's deadline, an eviction signal and shutdown.
//!
//! Each connection is always in one phase, with one deadline:
//! - *head*: accepted, or bytes arrived after an idle spell, and no complete
//!   request head yet: closed `header_timeout_ms` after the phase began, so a
//!   silent socket or one that dribbles a header byte by byte costs a slot
//!   for a few seconds only;
//! - *busy*: the handler is running (the dbproxy reads the body here):
//!   closed `request_timeout_ms` after the head arrived;
//! - *idle*: keep-alive between requests: closed `idle_timeout_ms` after the
//!   last answer.
//!
//! When all `max_connections` slots are taken, a new connection takes the
//! slot of another, which is closed: of those that never had a request
//! answered, the oldest silent one, else the one whose head has been
//! dribbling in longest; else the longest-idle keep-alive connection. Only
//! when every connection is in a request is the new one closed at once. So a flood of silent or idle sockets cannot keep a
//! real prober out: it always finds a slot within one accept.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use ::http::{Request, Response};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accept::{Accepted, Acceptor, Admission};

/// Time and count bounds of one HTTP listener, a config section of each tier
/// (`[server.admin_http]`, `[proxy.admin_http]`, `[dbproxy.admin_http]`; the
/// dbproxy API's are keys of `[dbproxy]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpLimits {
    /// A request head (request line and headers) must arrive within this
    /// long of the connection opening, or of its first byte after an idle
    /// keep-alive spell.
    pub header_timeout_ms: u64,
    /// A keep-alive connection with no request for this long is closed.
    pub idle_timeout_ms: u64,
    /// Longest a request may take once its head arrived: reading the body
    /// and computing the answer.
    pub request_timeout_ms: u64,
    /// Connections open at once; when full, the longest-idle one makes room.
    pub max_connections: usize,
}

impl Default for HttpLimits {
    /// An admin port's: probes and scrapers are few and quick, and a
    /// Prometheus scrape every 15 s keeps its connection under 30 s idle.
    fn default() -> Self {
        HttpLimits {
            header_timeout_ms: 5_000,
            idle_timeout_ms: 30_000,
            request_timeout_ms: 10_000,
            max_connections: 64,
        }
    }
}

impl HttpLimits {
    /// The first bad field and why, e.g. `("max_connections", "must be 1..=1000000")`.
    pub fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        if !(100..=60_000).contains(&self.header_timeout_ms) {
            return Err(("header_timeout_ms", "must be 100..=60000"));
        }
        if !(100..=3_600_000).contains(&self.idle_timeout_ms) {
            return Err(("idle_timeout_ms", "must be 100..=3600000"));
        }
        if !(100..=600_000).contains(&self.request_timeout_ms) {
            return Err(("request_timeout_ms", "must be 100..=600000"));
        }
        if !(1..=1_000_000).contains(&self.max_connections) {
            return Err(("max_connections", "must be 1..=1000000"));
        }
        Ok(())
    }
}

/// Turns an accepted TCP stream into the byte stream HTTP is spoken over.
/// [`Plain`] uses it as it is; a TLS acceptor implements this with its
/// handshake and whatever check of the peer it needs. `serve` bounds it by
/// `header_timeout_ms`, like a request head, and it holds the connection's
/// slot meanwhile, so an eviction or shutdown can end it too.
pub trait Wrap: Clone + Send + Sync + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// An error refuses the connection; the implementation logs or counts
    /// it as it sees fit (`serve` logs it at debug).
    fn wrap(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> impl Future<Output = io::Result<Self::Io>> + Send;
    /// Called when `wrap` did not finish within `header_timeout_ms` (a slow
    /// or stalled handshake) and the connection was closed.
    fn timed_out(&self, _peer: SocketAddr) {}
}

/// Plain TCP.
#[derive(Clone, Copy, Debug, Default)]
pub struct Plain;

impl Wrap for Plain {
    type Io = TcpStream;
    async fn wrap(&self, stream: TcpStream, _peer: SocketAddr) -> io::Result<TcpStream> {
        Ok(stream)
    }
}

pub type HttpResponse = Response<Full<Bytes>>;

/// Serves `handler` on connections from `acceptor` until `shutdown`, then
/// lets open requests finish for at most `grace`. The acceptor's permit
/// count is the connection cap (build it with `limits.max_connections`).
pub async fn serve<W, H, Fut>(
    acceptor: Acceptor,
    limits: HttpLimits,
    wrap: W,
    handler: H,
    shutdown: CancellationToken,
    grace: Duration,
) where
    W: Wrap,
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = HttpResponse> + Send + 'static,
{
    let tracker = TaskTracker::new();
    let table = Arc::new(Table::default());
    let times = Times::from(&limits);
    let mut next_id: u64 = 0;
    while let Some(admission) = acceptor.next_or_full(&shutdown).await {
        let (stream, peer, permit) = match admission {
            Admission::Admitted(Accepted {
                stream,
                peer,
                permit,
            }) => (stream, peer, permit),
            Admission::Full { stream, peer } => match table.evict_longest_idle() {
                Some(permit) => {
                    // A connect flood keeps this loop busy: let the
                    // connections just accepted read what they were sent
                    // (a prober's request) before the next one is let in,
                    // so they do not look silent when room is made again.
                    tokio::task::yield_now().await;
                    (stream, peer, permit)
                }
                None => {
                    // Every connection is in a request: refusing at once
                    // beats a client waiting for a slot it cannot see.
                    tracing::debug!(%peer, "every connection busy: refused");
                    continue;
                }
            },
        };
        next_id += 1;
        let _ = stream.set_nodelay(true);
        let state = Arc::new(ConnState::new(times));
        table.insert(next_id, state.clone(), permit);
        let guard = Leave {
            table: table.clone(),
            id: next_id,
        };
        let span = tracing::debug_span!("http", %peer, id = next_id);
        tracker.spawn(tracing::Instrument::instrument(
            connection(
                stream,
                peer,
                state,
                guard,
                wrap.clone(),
                handler.clone(),
                shutdown.clone(),
            ),
            span,
        ));
    }
    drop(acceptor);
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            open = tracker.len(),
            "HTTP connections still open after the grace period"
        );
    }
}

/// The connection's IO once `wrap` (a TLS handshake) is done, within the
/// header timeout; `None` when it failed, timed out, or the connection was
/// evicted or shut down meanwhile.
async fn setup<W: Wrap>(
    stream: TcpStream,
    peer: SocketAddr,
    state: &ConnState,
    wrap: &W,
    shutdown: &CancellationToken,
) -> Option<W::Io> {
    tokio::select! {
        r = tokio::time::timeout(state.times.header, wrap.wrap(stream, peer)) => match r {
            Ok(Ok(io)) => Some(io),
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "connection setup failed");
                None
            }
            Err(_) => {
                tracing::debug!(%peer, "connection setup timed out");
                wrap.timed_out(peer);
                None
            }
        },
        _ = state.evicted.cancelled() => None,
        _ = shutdown.cancelled() => None,
    }
}

async fn connection<W, H, Fut>(
    stream: TcpStream,
    peer: SocketAddr,
    state: Arc<ConnState>,
    _guard: Leave,
    wrap: W,
    handler: H,
    shutdown: CancellationToken,
) where
    W: Wrap,
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = HttpResponse> + Send + 'static,
{
    let Some(io) = setup(stream, peer, &state, &wrap, &shutdown).await else {
        return;
    };
    let svc = {
        let state = state.clone();
        service_fn(move |req: Request<Incoming>| {
            let (handler, state) = (handler.clone(), state.clone());
            async move {
                state.enter(Phase::Busy);
                let resp = handler(req).await;
                state.enter(Phase::Idle);
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let io = Tracked {
        io,
        state: state.clone(),
    };
    let mut builder = http1::Builder::new();
    // hyper's own header timeout also runs while a keep-alive connection
    // waits for its next request, which would make the idle bound the
    // header bound; the phases above keep the two apart.
    builder
        .keep_alive(true)
        .header_read_timeout(None)
        // What one connection may buffer (a request head, a read of the
        // body): 64 KiB instead of hyper's ~400 KiB, so a full listener of
        // huge heads costs max_connections × 64 KiB at most.
        .max_buf_size(MAX_BUF_BYTES)
        .max_headers(MAX_HEADERS);
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        let deadline = state.deadline();
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "connection ended with error");
                }
                return;
            }
            _ = state.changed.notified() => {}
            _ = tokio::time::sleep_until(deadline) => {
                if Instant::now() >= state.deadline() {
                    tracing::debug!(%peer, phase = ?state.phase(), "connection timed out: closed");
                    return;
                }
            }
            _ = state.evicted.cancelled() => {
                tracing::debug!(%peer, "longest-idle connection closed for a new one");
                return;
            }
            _ = shutdown.cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Our requests have a handful of headers; a head larger than this is an
/// attack or a mistake.
const MAX_BUF_BYTES: usize = 64 * 1024;
const MAX_HEADERS: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    Head = 0,
    Busy = 1,
    Idle = 2,
}

#[derive(Clone, Copy)]
struct Times {
    header: Duration,
    idle: Duration,
    request: Duration,
}

impl From<&HttpLimits> for Times {
    fn from(l: &HttpLimits) -> Times {
        Times {
            header: Duration::from_millis(l.header_timeout_ms),
            idle: Duration::from_millis(l.idle_timeout_ms),
            request: Duration::from_millis(l.request_timeout_ms),
        }
    }
}

/// What the accept loop, the connection's task and its IO share.
struct ConnState {
    times: Times,
    epoch: Instant,
    phase: AtomicU8,
    /// Milliseconds after `epoch` when the current phase began (for
    /// eviction: the oldest non-busy phase goes first) and when it ends.
    since_ms: AtomicU64,
    deadline_ms: AtomicU64,
    /// Whether a request was ever answered here: connections that never got
    /// that far (silent or dribbling sockets) are closed first when the
    /// listener is full, before a client's pooled keep-alive connection.
    answered: AtomicBool,
    /// Whether any byte arrived: of the connections without an answered
    /// request, the silent ones are closed first, before one (a prober's)
    /// whose request is arriving.
    heard: AtomicBool,
    /// Wakes the connection's task when a phase change moves the deadline.
    changed: Notify,
    evicted: CancellationToken,
}

impl ConnState {
    fn new(times: Times) -> ConnState {
        ConnState {
            times,
            epoch: Instant::now(),
            phase: AtomicU8::new(Phase::Head as u8),
            since_ms: AtomicU64::new(0),
            deadline_ms: AtomicU64::new(millis(times.header)),
            answered: AtomicBool::new(false),
            heard: AtomicBool::new(false),
            changed: Notify::new(),
            evicted: CancellationToken::new(),
        }
    }

    fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Relaxed) {
            1 => Phase::Busy,
            2 => Phase::Idle,
            _ => Phase::Head,
        }
    }

    fn enter(&self, phase: Phase) {
        let now = millis(self.epoch.elapsed());
        let limit = match phase {
            Phase::Head => self.times.header,
            Phase::Busy => self.times.request,
            Phase::Idle => self.times.idle,
        };
        self.since_ms.store(now, Ordering::Relaxed);
        self.deadline_ms
            .store(now.saturating_add(millis(limit)), Ordering::Relaxed);
        self.phase.store(phase as u8, Ordering::Relaxed);
        if phase == Phase::Idle {
            self.answered.store(true, Ordering::Relaxed);
        }
        self.changed.notify_one();
    }

    fn deadline(&self) -> Instant {
        self.epoch + Duration::from_millis(self.deadline_ms.load(Ordering::Relaxed))
    }

    /// When the current phase began, as an instant comparable across
    /// connections.
    fn since(&self) -> Instant {
        self.epoch + Duration::from_millis(self.since_ms.load(Ordering::Relaxed))
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The open connections and their permits. A std mutex: held only to insert,
/// remove or scan, never across an await.
#[derive(Default)]
struct Table {
    conns: Mutex<HashMap<u64, (Arc<ConnState>, OwnedSemaphorePermit)>>,
}

impl Table {
    fn insert(&self, id: u64, state: Arc<ConnState>, permit: OwnedSemaphorePermit) {
        self.lock().insert(id, (state, permit));
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<u64, (Arc<ConnState>, OwnedSemaphorePermit)>> {
        crate::sync::lock(&self.conns)
    }

    /// Closes, of the connections not in a request, the one that has never
    /// had a request answered and sent nothing for longest, else the one
    /// whose request head has been arriving longest, else the longest-idle
    /// one, and hands over its permit; `None` when every one is busy.
    /// O(open connections), paid only when the listener is full.
    fn evict_longest_idle(&self) -> Option<OwnedSemaphorePermit> {
        let mut conns = self.lock();
        let victim = conns
            .iter()
            .filter(|(_, (s, _))| s.phase() != Phase::Busy)
            .min_by_key(|(_, (s, _))| {
                (
                    s.answered.load(Ordering::Relaxed),
                    s.heard.load(Ordering::Relaxed),
                    s.since(),
                )
            })
            .map(|(id, _)| *id)?;
        let (state, permit) = conns.remove(&victim)?;
        state.evicted.cancel();
        Some(permit)
    }
}

/// Removes a connection from the table when its task ends, freeing its
/// permit (unless an eviction already took it).
struct Leave {
    table: Arc<Table>,
    id: u64,
}

impl Drop for Leave {
    fn drop(&mut self) {
        self.table.lock().remove(&self.id);
    }
}

/// The connection's IO, noticing the first bytes of a request after an idle
/// spell (which start its head phase).
struct Tracked<IO> {
    io: IO,
    state: Arc<ConnState>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Tracked<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.state.heard.store(true, Ordering::Relaxed);
            if self.state.phase() == Phase::Idle {
                self.state.enter(Phase::Head);
            }
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Tracked<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_fields_named() {
        HttpLimits::default().validate().unwrap();
        let bad = [
            (
                HttpLimits {
                    header_timeout_ms: 0,
                    ..HttpLimits::default()
                },
                "header_timeout_ms",
            ),
            (
                HttpLimits {
                    idle_timeout_ms: 10,
                    ..HttpLimits::default()
                },
                "idle_timeout_ms",
            ),
            (
                HttpLimits {
                    request_timeout_ms: 600_001,
                    ..HttpLimits::default()
                },
                "request_timeout_ms",
            ),
            (
                HttpLimits {
                    max_connections: 0,
                    ..HttpLimits::default()
                },
                "max_connections",
            ),
        ];
        for (limits, key) in bad {
            assert_eq!(limits.validate().unwrap_err().0, key);
        }
    }
}
