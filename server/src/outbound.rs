//! The send side of a session: a bounded queue of encoded lines drained by a
//! writer task. Producers (room fan-out, DM delivery, replies) never wait: a
//! full queue marks the client as a slow consumer and disconnects it.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use chat_dbproxy::api::later_pos;
use std::time::Duration;

use bytes::Bytes;
use chat_protocol::PartReason;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub enum Out {
    Line(Bytes),
    /// A direct message: once written, its id is reported as received.
    Dm(Bytes, i64),
    /// Last line; the writer flushes it and closes the socket.
    Close(Bytes),
}

const KICK_NONE: u8 = 0;
const KICK_SLOW: u8 = 1;
const KICK_GONE: u8 = 2;

/// A cheap, cloneable handle to a live session's send queue.
#[derive(Clone)]
pub struct SessionHandle {
    pub id: u64,
    pub user: Arc<str>,
    tx: mpsc::Sender<Out>,
    kick: CancellationToken,
    kick_reason: Arc<AtomicU8>,
    /// Storage position of this session's latest write; its reads carry it so
    /// they see their own writes even when a replica serves them. A mutex
    /// because room tasks and the session both update it (never across await).
    pos: Arc<Mutex<Option<String>>>,
}

impl SessionHandle {
    /// Queues a line; a full queue disconnects the session as a slow consumer.
    pub fn send(&self, out: Out) -> bool {
        match self.tx.try_send(out) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.kick(KICK_SLOW);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Queues a line, waiting up to `patience` for room; a client that stays
    /// full that long is disconnected as slow.
    pub async fn send_wait(&self, out: Out, patience: Duration) -> bool {
        tokio::select! {
            r = tokio::time::timeout(patience, self.tx.send(out)) => match r {
                Ok(Ok(())) => true,
                Ok(Err(_)) => false,
                Err(_) => {
                    self.kick(KICK_SLOW);
                    false
                }
            },
            _ = self.kick.cancelled() => false,
        }
    }

    /// Stops the writer without a farewell.
    pub fn close_now(&self) {
        self.kick(KICK_GONE);
    }

    pub fn line(&self, bytes: Bytes) -> bool {
        self.send(Out::Line(bytes))
    }

    fn kick(&self, reason: u8) {
        let _ = self.kick_reason.compare_exchange(
            KICK_NONE,
            reason,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        self.kick.cancel();
    }

    /// Records the position of a write this session made.
    pub fn wrote(&self, pos: Option<String>) {
        if pos.is_some() {
            let mut cur = self.pos.lock().expect("pos lock");
            *cur = later_pos(cur.take(), pos);
        }
    }

    /// The position this session's reads must observe.
    pub fn read_pos(&self) -> Option<String> {
        self.pos.lock().expect("pos lock").clone()
    }

    pub fn kicked(&self) -> &CancellationToken {
        &self.kick
    }

    /// Why the session was kicked, if it was.
    pub fn kick_reason(&self) -> Option<PartReason> {
        match self.kick_reason.load(Ordering::Relaxed) {
            KICK_SLOW => Some(PartReason::Slow),
            KICK_GONE => Some(PartReason::Disconnected),
            _ => None,
        }
    }
}

/// Creates the queue; the receiver goes to [`write_loop`].
pub fn channel(id: u64, user: Arc<str>, capacity: usize) -> (SessionHandle, mpsc::Receiver<Out>) {
    let (tx, rx) = mpsc::channel(capacity);
    let handle = SessionHandle {
        id,
        user,
        tx,
        kick: CancellationToken::new(),
        kick_reason: Arc::new(AtomicU8::new(KICK_NONE)),
        pos: Arc::new(Mutex::new(None)),
    };
    (handle, rx)
}

/// How long the last words (`BYE …`) to a client may take before we drop it.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(1);

/// Drains the queue into the socket until `Out::Close` or the socket fails.
/// Ids of written DMs go to `receipts` (best effort: a full receipts queue
/// leaves the DM pending, so it is delivered again at the next login).
pub async fn write_loop(
    handle: SessionHandle,
    mut rx: mpsc::Receiver<Out>,
    sock: OwnedWriteHalf,
    receipts: mpsc::Sender<i64>,
) {
    let mut w = BufWriter::new(sock);
    let mut written_dms = Vec::new();
    loop {
        let out = tokio::select! {
            biased;
            _ = handle.kick.cancelled() => break,
            out = rx.recv() => out,
        };
        let Some(out) = out else { break };
        let (bytes, last) = match out {
            Out::Line(b) => (b, false),
            Out::Dm(b, id) => {
                written_dms.push(id);
                (b, false)
            }
            Out::Close(b) => (b, true),
        };
        let flush = last || rx.is_empty();
        let res = tokio::select! {
            r = async {
                w.write_all(&bytes).await?;
                if flush {
                    w.flush().await?;
                }
                Ok::<_, std::io::Error>(())
            } => r,
            _ = handle.kick.cancelled() => break,
        };
        if res.is_err() {
            handle.kick(KICK_GONE);
            break;
        }
        if flush {
            for id in written_dms.drain(..) {
                let _ = receipts.try_send(id);
            }
        }
        if last {
            let _ = tokio::time::timeout(FAREWELL_TIMEOUT, w.shutdown()).await;
            return;
        }
    }
    if handle.kick_reason() == Some(PartReason::Slow) {
        // The client does not read: skip its queue, say why (best effort), close.
        let _ = tokio::time::timeout(FAREWELL_TIMEOUT, async {
            w.write_all(b"BYE slow\n").await?;
            w.flush().await
        })
        .await;
    }
}
