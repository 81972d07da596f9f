//! One client connection: first line (login), then the command loop.
//!
//! socket → `open` (TLS, PROXY line, first line, login) → the writer task
//! (`outbound::writer`) → `Session::welcome` → `Session::command_loop` →
//! `close` (answers in flight, `PART`s, `BYE`).

mod commands;
mod open;
mod rate;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use chat_protocol::{PartReason, ServerLine};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::timeout;

use crate::node::Node;
use crate::outbound::{self, writer, Out};
use commands::Session;
use open::{Frames, Opened};
use rate::Limiter;

/// Serves one connection to the end.
///
/// Most connections are idle, so what an idle one holds matters: the phases
/// around the command loop (first line and login, welcome, teardown) run
/// boxed, and only what the loop needs ([`Live`]) is kept between them; a
/// value kept in this function's own scope would stay in the task for the
/// connection's lifetime, even after it was moved out.
pub async fn run(
    node: Arc<Node>,
    stream: TcpStream,
    peer: SocketAddr,
    id: u64,
    receipts: mpsc::Sender<i64>,
) {
    let Some(mut live) = Box::pin(start(node, stream, peer, id, receipts)).await else {
        return;
    };
    let reason = match live.refused.take() {
        None => {
            let idle = live.session.node.config.idle_timeout();
            live.session.command_loop(&mut live.frames, idle).await
        }
        Some(line) => {
            Box::pin(live.session.reply(line.to_bytes())).await;
            live.session
                .handle
                .kick_reason()
                .unwrap_or(PartReason::Disconnected)
        }
    };
    let Live {
        session,
        frames,
        writer,
        token,
        ..
    } = live;
    drop(frames);
    Box::pin(close(session, reason, writer, token)).await;
}

/// A logged-in connection: what its command loop and teardown need.
struct Live {
    session: Session,
    frames: Frames,
    writer: tokio::task::JoinHandle<()>,
    token: String,
    /// The welcome failed: this line is the answer, then the connection ends.
    refused: Option<ServerLine>,
}

/// First line, login, the writer task and the welcome.
async fn start(
    node: Arc<Node>,
    stream: TcpStream,
    peer: SocketAddr,
    id: u64,
    receipts: mpsc::Sender<i64>,
) -> Option<Live> {
    let Opened {
        identity,
        guest_room,
        resumed,
        frames,
        writer: wr,
    } = open::open(&node, stream, peer).await?;
    let user: Arc<str> = Arc::from(identity.user.as_str());
    tracing::debug!(%peer, user = %user, "logged in");

    let cfg = &node.config;
    let (handle, rx) = outbound::channel(id, user.clone(), cfg.send_queue_lines);
    let writer = node
        .tasks
        .spawn(writer::write_loop(handle.clone(), rx, wr, receipts.clone()));
    handle.wrote(identity.pos.clone());
    node.add_session(handle.clone(), identity.token.clone());
    let limiter = Limiter::new(
        cfg.rate_per_sec,
        cfg.rate_burst,
        cfg.rate_limit_kick,
        Instant::now(),
    );
    let mut session = Session {
        inflight: Arc::new(Semaphore::new(cfg.max_inflight_per_conn)),
        node: node.clone(),
        handle,
        user,
        limiter,
        receipts,
        receipts_decided: false,
    };
    let refused = session.welcome(&identity, guest_room, resumed).await.err();
    Some(Live {
        session,
        frames,
        writer,
        token: identity.token,
        refused,
    })
}

/// Ends a session: answers what it read (on a clean close), leaves the
/// rooms, says goodbye, waits for the writer, touches the token.
async fn close(
    session: Session,
    reason: PartReason,
    writer: tokio::task::JoinHandle<()>,
    token: String,
) {
    let node = session.node.clone();
    let handle = session.handle.clone();
    // Every way a session is dropped as slow (an event into a full queue, a
    // reply that waited the idle time) ends here, so it is counted here once.
    if reason == PartReason::Slow {
        node.metrics.slow_consumers_total.inc();
    }
    if matches!(
        reason,
        PartReason::Shutdown | PartReason::Quit | PartReason::Disconnected
    ) {
        // MSG/DM already read get their answers before BYE (or before the
        // close a proxy waits for when it moves the client elsewhere).
        let grace = node.config.shutdown_grace();
        let all = node.config.max_inflight_per_conn as u32;
        let _ = timeout(grace, session.inflight.acquire_many(all)).await;
    }
    node.remove_session(&handle, reason);
    let bye = match reason {
        PartReason::Quit => Bytes::from_static(b"BYE quit\n"),
        PartReason::Idle => Bytes::from_static(b"BYE idle\n"),
        PartReason::Shutdown => Bytes::from_static(b"BYE shutdown\n"),
        _ => Bytes::new(),
    };
    if !handle.send(Out::Close(bye)) {
        handle.close_now();
    }
    drop(session);
    drop(handle);
    let _ = writer.await;
    let db = node.db.clone();
    node.tasks.spawn(async move {
        let _ = db.touch(vec![token]).await;
    });
}
