//! Server-to-server links: [`dial_loop`] keeps this server's link to one peer
//! up; [`serve`] handles a link a peer opened to this server's client port.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chat_admin::backoff::Backoff;
use chat_tls::{ReadHalf, Stream, WriteHalf};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

use super::wire::{self, NodeId, PeerMsg, Published, HELLO};
use super::{Cluster, Handler, Queued, Reply};
use crate::logs::quote;

/// Longest handshake answer read.
const HELLO_MAX: usize = 512;

/// Dials `node` and keeps the link up until `stop`, reconnecting with backoff.
pub async fn dial_loop(
    cluster: Arc<Cluster>,
    handler: Arc<dyn Handler>,
    node: NodeId,
    stop: CancellationToken,
) {
    let cfg = cluster.config.clone();
    let timeout = cfg.peer_timeout();
    // Jittered, so that after a restart every server does not redial its
    // peers in the same instant.
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        let attempt = tokio::select! {
            r = tokio::time::timeout(timeout, handshake(&cluster, &node)) => r,
            _ = stop.cancelled() => return,
        };
        match attempt {
            Ok(Ok((rd, wr))) => {
                backoff.reset();
                let (tx, rx) = mpsc::channel(cfg.peer_queue);
                let conn = stop.child_token();
                cluster.link_up(&node, tx, conn.clone());
                run_link(&cluster, &node, rd, wr, rx, conn).await;
                cluster.link_down(&node);
                handler.lost(&node);
            }
            Ok(Err(e)) => tracing::debug!(peer = %node, error = %e, "cannot link to chat server"),
            Err(_) => tracing::debug!(peer = %node, "linking to chat server timed out"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Connects to `node` (over TLS with this server's identity when `tls` is
/// set: the peer must present a `chat-server` certificate, whatever its
/// address) and says `PEER`.
async fn handshake(
    cluster: &Cluster,
    node: &str,
) -> std::io::Result<(BufReader<ReadHalf>, WriteHalf)> {
    let tcp = TcpStream::connect(node).await?;
    tcp.set_nodelay(true)?;
    let stream = match &cluster.connector {
        Some(connector) => connector.connect(chat_tls::names::SERVER, tcp).await?,
        None => Stream::Plain(tcp),
    };
    let (rd, mut wr) = stream.into_split();
    let (me, secret) = (&cluster.me, cluster.config.secret.expose());
    wr.write_all(format!("{HELLO} {me} {secret}\n").as_bytes())
        .await?;
    wr.flush().await?;
    let mut rd = BufReader::with_capacity(HELLO_MAX, rd);
    let mut answer = String::new();
    tokio::io::AsyncReadExt::take(&mut rd, HELLO_MAX as u64)
        .read_line(&mut answer)
        .await?;
    if answer.trim_end() != format!("OK {HELLO} {node}") {
        return Err(std::io::Error::other(format!(
            "handshake refused: {}",
            answer.trim_end()
        )));
    }
    // The peer's first frames may follow its answer in the same read (a
    // heartbeat does at once): the buffer goes on into the link.
    Ok((rd, wr))
}

/// Writes queued frames (and a heartbeat every `heartbeat_ms`) and reads the
/// peer's answers until the connection fails, stays silent for
/// `peer_timeout_ms`, or `conn` is cancelled.
async fn run_link(
    cluster: &Cluster,
    node: &NodeId,
    rd: BufReader<ReadHalf>,
    wr: WriteHalf,
    mut rx: mpsc::Receiver<Queued>,
    conn: CancellationToken,
) {
    let cfg = &cluster.config;
    let heartbeat = cfg.heartbeat();
    let silence = cfg.peer_timeout();
    let mut sink = FramedWrite::new(wr, wire::codec());
    let mut frames = FramedRead::new(rd, wire::codec());
    let metrics = cluster.metrics.clone();
    let writer = async {
        let mut tick = chat_admin::tick::interval(heartbeat);
        loop {
            let q = tokio::select! {
                q = rx.recv() => q,
                _ = tick.tick() => Some(Queued { msg: PeerMsg::Ping, fanout_started: None }),
            };
            let Some(q) = q else { return };
            // Feed what is queued, flush once.
            let mut started = Vec::new();
            let mut next = Some(q);
            while let Some(q) = next.take() {
                if let Some(s) = q.fanout_started {
                    started.push(s);
                }
                if tokio::time::timeout(silence, sink.feed(q.msg.encode()))
                    .await
                    .map_or(true, |r| r.is_err())
                {
                    return;
                }
                if started.len() < 1024 {
                    next = rx.try_recv().ok();
                }
            }
            if tokio::time::timeout(silence, SinkExt::<Bytes>::flush(&mut sink))
                .await
                .map_or(true, |r| r.is_err())
            {
                return;
            }
            for s in started {
                metrics.fanout_latency.observe(s.elapsed().as_secs_f64());
            }
        }
    };
    let reader = async {
        while let Some(msg) = next_frame(&mut frames, silence, node).await {
            match msg {
                PeerMsg::Members { req, users } => cluster.requests.members(req, users),
                // The owner's answer, when its own link to us was down.
                PeerMsg::Published { req, result, pos } => {
                    cluster.requests.published(req, Published { result, pos })
                }
                PeerMsg::Pong => {}
                _ => tracing::warn!(peer = %node, "unexpected frame on an outgoing link"),
            }
        }
    };
    tokio::select! {
        _ = writer => {}
        _ = reader => {}
        _ = conn.cancelled() => {}
    }
}

/// Serves a link a peer opened with `PEER <id> <secret>` (the first line,
/// already read). Refuses a wrong secret or our own id.
pub async fn serve(
    cluster: Arc<Cluster>,
    handler: Arc<dyn Handler>,
    hello: &str,
    rd: ReadHalf,
    mut wr: WriteHalf,
) {
    let silence = cluster.config.peer_timeout();
    let mut words = hello.split(' ');
    let (Some(HELLO), Some(id), Some(secret), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        refused(&cluster, "malformed", hello);
        let _ = answer(&mut wr, b"ERR BAD_ARGS PEER <id> <secret>\n", true, silence).await;
        return;
    };
    if !cluster.config.is_clustered() || !cluster.config.secret.matches(secret.as_bytes()) {
        refused(&cluster, "auth", id);
        let line = b"ERR AUTH_FAILED peer links need the cluster secret\n";
        let _ = answer(&mut wr, line, true, silence).await;
        return;
    }
    if *id == *cluster.me {
        refused(&cluster, "self", id);
        let _ = answer(&mut wr, b"ERR BAD_ARGS that is my own id\n", true, silence).await;
        return;
    }
    let node: NodeId = Arc::from(id);
    let ok = format!("OK {HELLO} {}\n", cluster.me);
    if answer(&mut wr, ok.as_bytes(), false, silence)
        .await
        .is_err()
    {
        return;
    }
    tracing::info!(peer = %node, "chat server linked to us");
    handler.linked(&node);

    // Answers to requests and heartbeats; as deep as the requests' queue.
    let (tx, rx) = mpsc::channel::<PeerMsg>(cluster.config.peer_queue);
    let heartbeat = cluster.config.heartbeat();
    let writer = write_answers(FramedWrite::new(wr, wire::codec()), rx, heartbeat, silence);
    let frames = FramedRead::new(rd, wire::codec());
    let reader = read_incoming(&cluster, &*handler, &node, frames, tx);
    tokio::select! {
        _ = writer => {}
        _ = reader => {}
        _ = cluster.stopped().cancelled() => {}
    }
    tracing::info!(peer = %node, "chat server link closed");
    // Answers to what we forwarded to this peer came on this connection.
    cluster.requests.fail_node(&node);
}

/// Writes the answers of an incoming link and its heartbeats until the
/// queue closes or a write takes longer than `silence`. Heartbeats go out
/// on a timer, not in reply to pings: a reader held up by a full room queue
/// (backpressure) must not look like a dead server.
async fn write_answers(
    mut sink: FramedWrite<WriteHalf, LengthDelimitedCodec>,
    mut rx: mpsc::Receiver<PeerMsg>,
    heartbeat: Duration,
    silence: Duration,
) {
    let mut tick = chat_admin::tick::interval(heartbeat);
    loop {
        let m = tokio::select! {
            m = rx.recv() => match m {
                Some(m) => m,
                None => return,
            },
            _ = tick.tick() => PeerMsg::Pong,
        };
        let fed = tokio::time::timeout(silence, sink.feed(m.encode())).await;
        if fed.map_or(true, |r| r.is_err()) {
            return;
        }
        if rx.is_empty() {
            let flushed = tokio::time::timeout(silence, SinkExt::<Bytes>::flush(&mut sink)).await;
            if flushed.map_or(true, |r| r.is_err()) {
                return;
            }
        }
    }
}

/// Writes a handshake answer within `limit` and puts it on the wire (TLS
/// holds bytes until flushed); `close` ends the connection after it.
async fn answer(
    wr: &mut WriteHalf,
    line: &[u8],
    close: bool,
    limit: Duration,
) -> std::io::Result<()> {
    let write = async {
        wr.write_all(line).await?;
        if close {
            wr.shutdown().await
        } else {
            wr.flush().await
        }
    };
    tokio::time::timeout(limit, write)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

async fn read_incoming(
    cluster: &Cluster,
    handler: &dyn Handler,
    node: &NodeId,
    mut frames: FramedRead<impl AsyncRead + Unpin, LengthDelimitedCodec>,
    reply: Reply,
) {
    let silence = cluster.config.peer_timeout();
    while let Some(msg) = next_frame(&mut frames, silence, node).await {
        match msg {
            // Waits while the room's queue is full: backpressure on the link.
            PeerMsg::Publish(f) => handler.publish(node, f, reply.clone()).await,
            // Keeps this side's read timeout from firing; our own heartbeats
            // go out on a timer.
            PeerMsg::Ping => {}
            PeerMsg::Draining => cluster.peer_draining(node),
            PeerMsg::Published { req, result, pos } => {
                cluster.requests.published(req, Published { result, pos })
            }
            PeerMsg::Members { .. } | PeerMsg::Pong => {
                tracing::warn!(peer = %node, "unexpected answer on an incoming link");
            }
            other => {
                if !handler.frame(node, other, &reply) {
                    return;
                }
            }
        }
    }
}

/// The next frame of a link; `None` (logged) when it closed, broke, stayed
/// silent for `silence` or sent something undecodable.
async fn next_frame(
    frames: &mut FramedRead<impl AsyncRead + Unpin, LengthDelimitedCodec>,
    silence: Duration,
    node: &NodeId,
) -> Option<PeerMsg> {
    let frame = match tokio::time::timeout(silence, frames.next()).await {
        Ok(Some(Ok(f))) => f,
        // A peer that stops, restarts or is cut off ends its links with a
        // reset or without a TLS close_notify: a lost link, not a bad frame.
        Ok(Some(Err(e))) if link_lost(&e) => {
            tracing::debug!(peer = %node, error = %e, "chat server link lost");
            return None;
        }
        Ok(Some(Err(e))) => {
            tracing::warn!(peer = %node, error = %e, "bad frame from chat server");
            return None;
        }
        Ok(None) => return None,
        Err(_) => {
            tracing::warn!(peer = %node, "chat server silent; dropping the link");
            return None;
        }
    };
    match PeerMsg::decode(frame.freeze()) {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::warn!(peer = %node, error = %e, "undecodable frame from chat server");
            None
        }
    }
}

/// Counts a refused handshake and logs it, rate limited; `what` is the
/// peer's claimed id (or its whole line when malformed), never the secret.
fn refused(cluster: &Cluster, reason: &'static str, what: &str) {
    cluster
        .metrics
        .handshake_failures_total
        .with_label_values(&[reason])
        .inc();
    if let Some(suppressed) = cluster.refusals.admit() {
        let claimed = if reason == "malformed" {
            // The line may hold a secret in an unexpected place: show its
            // first word only.
            quote(what.split(' ').nth(1).unwrap_or(""))
        } else {
            quote(what)
        };
        tracing::warn!(
            reason,
            peer = %claimed,
            suppressed,
            "refused a chat server link (PEER handshake)"
        );
    }
}

/// Whether a read error means the connection went away (rather than that
/// the peer sent something that is not a frame).
fn link_lost(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe | TimedOut
    )
}

#[cfg(test)]
mod tests {
    use super::link_lost;
    use std::io::{Error, ErrorKind};

    #[test]
    fn a_reset_is_a_lost_link_and_garbage_is_not() {
        assert!(link_lost(&Error::from(ErrorKind::ConnectionReset)));
        assert!(link_lost(&Error::from(ErrorKind::UnexpectedEof)));
        assert!(!link_lost(&Error::new(
            ErrorKind::InvalidData,
            "frame too large"
        )));
    }
}
