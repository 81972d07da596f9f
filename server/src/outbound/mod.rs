//! The send side of a session: a bounded queue of encoded lines drained by a
//! writer task. Producers of events (room fan-out, DM delivery) never wait: a
//! full queue marks the client as a slow consumer and disconnects it. The
//! session's own replies wait for the queue to be below half full (see
//! `Tx::send`), so they only slow down the client that asked for them.
//!
//! The queue is ours rather than a tokio `mpsc`: an `mpsc` allocates its first
//! block of slots (about 1.5 KiB here) when created, and most connections are
//! idle. This one allocates only while lines are waiting, and frees its storage
//! once a backlog has drained.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chat_protocol::PartReason;
use chat_storage_api::later_pos;
use tokio::sync::{mpsc, Notify};

use chat_admin::sync::lock;

pub mod writer;

pub enum Out {
    Line(Bytes),
    /// Several lines in one buffer (a room's batch, encoded once for every
    /// member); counts as that many lines against the queue's bound.
    Lines(Bytes, usize),
    /// A direct message: once written, its id goes to the session's
    /// [`Receipts`] (reported received at once, or when the client acks it).
    Dm(Bytes, i64),
    /// Last line; the writer flushes it and closes the socket.
    Close(Bytes),
}

impl Out {
    fn lines(&self) -> usize {
        match self {
            Out::Lines(_, n) => *n,
            _ => 1,
        }
    }
}

/// The queued items and how many lines they hold.
#[derive(Default)]
struct Queue {
    items: VecDeque<Out>,
    lines: usize,
}

/// State shared by a queue's senders and its receiver.
struct Shared {
    queue: Mutex<Queue>,
    /// Most lines queued at once; an item is refused once the queue holds
    /// this many (an empty queue takes any one item).
    cap: usize,
    /// Something was queued, or the last sender went away.
    filled: Notify,
    /// A full queue made room, or the receiver went away.
    drained: Notify,
    closed: AtomicBool,
    senders: AtomicUsize,
    /// Why the session was kicked (`KICK_NONE` while it is not); set once.
    kick_reason: AtomicU8,
    /// Wakes everyone waiting in [`SessionHandle::kicked`].
    kicked: Notify,
    /// Storage position of this session's latest write; its reads carry it so
    /// they see their own writes even when a replica serves them. A mutex
    /// because room tasks and the session both update it (never across await).
    pos: Mutex<Option<String>>,
    receipts: Mutex<Receipts>,
}

/// Most DMs a session holds written but not yet reported received; past it a
/// DM simply stays pending (and is delivered again at the next login).
pub const MAX_UNACKED_DMS: usize = 1024;

/// When the DMs written to a session count as received (docs/PROTOCOL.md,
/// "Direct messages"). Until the session's first command the writer keeps
/// their ids; that command decides: `ACK` makes the client acknowledge them
/// one by one, anything else (or the end of the connection) reports them
/// received as written.
#[derive(Default)]
struct Receipts {
    mode: ReceiptMode,
    /// Written and not yet reported received.
    ids: Vec<i64>,
}

#[derive(Default, PartialEq, Eq, Clone, Copy)]
enum ReceiptMode {
    #[default]
    Undecided,
    OnWrite,
    OnAck,
}

fn report(ids: impl IntoIterator<Item = i64>, to: &mpsc::Sender<i64>) {
    for id in ids {
        // A full receipts queue leaves the DM pending: delivered again later.
        let _ = to.try_send(id);
    }
}

enum PushError {
    Full(Out),
    Closed,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        lock(&self.queue)
    }

    fn try_push(&self, out: Out) -> Result<(), PushError> {
        self.try_push_within(out, self.cap)
    }

    /// Queues `out` unless the queue would then hold more than `limit` lines
    /// (an empty queue takes any one item).
    fn try_push_within(&self, out: Out, limit: usize) -> Result<(), PushError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(PushError::Closed);
        }
        let mut q = self.lock();
        let n = out.lines();
        if !q.items.is_empty() && q.lines + n > limit {
            return Err(PushError::Full(out));
        }
        q.lines += n;
        q.items.push_back(out);
        drop(q);
        self.filled.notify_one();
        Ok(())
    }
}

/// The sending side of a session queue; the queue closes for the receiver
/// when the last one is dropped.
struct Tx(Arc<Shared>);

impl Clone for Tx {
    fn clone(&self) -> Self {
        self.0.senders.fetch_add(1, Ordering::Relaxed);
        Tx(self.0.clone())
    }
}

impl Drop for Tx {
    fn drop(&mut self) {
        if self.0.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.closed.store(true, Ordering::Release);
            self.0.filled.notify_one();
        }
    }
}

impl Tx {
    /// Waits until the queue is below half its bound, then queues; `Err`
    /// once the receiver is gone. Only a session's own replies wait here, and
    /// they never fill more than that half: the other half stays for what
    /// arrives without waiting (room events, DMs), so a reply burst (a login's
    /// welcome for 1,000 rooms, a HISTORY of 1,000 lines) cannot by itself
    /// make a client that reads at full speed look slow.
    async fn send(&self, mut out: Out) -> Result<(), ()> {
        let limit = (self.0.cap / 2).max(1);
        loop {
            let room = self.0.drained.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            match self.0.try_push_within(out, limit) {
                Ok(()) => return Ok(()),
                Err(PushError::Closed) => return Err(()),
                Err(PushError::Full(o)) => {
                    out = o;
                    room.await;
                }
            }
        }
    }
}

/// The receiving side of a session queue (the writer task's).
pub struct Rx(Arc<Shared>);

impl Drop for Rx {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::Release);
        self.0.drained.notify_waiters();
    }
}

/// Storage kept by an empty queue; a larger one (left by a backlog) is freed.
const KEEP_SLOTS: usize = 16;

impl Rx {
    pub(crate) fn try_recv(&mut self) -> Option<Out> {
        let mut q = self.0.lock();
        // Someone may be waiting for room once the queue is half full.
        let was_full = q.lines * 2 >= self.0.cap;
        let out = q.items.pop_front();
        if let Some(o) = &out {
            q.lines -= o.lines();
        }
        let now_empty = q.items.is_empty();
        if now_empty && q.items.capacity() > KEEP_SLOTS {
            q.items = VecDeque::new();
        }
        drop(q);
        // An empty queue takes any item, so a waiter with a big one wakes too.
        if was_full || (now_empty && out.is_some()) {
            self.0.drained.notify_waiters();
        }
        out
    }

    /// The next item; `None` once the session is kicked, or every sender is
    /// gone and the queue is empty. (A kick also wakes this wait, so the
    /// writer needs no kick future of its own per line.)
    async fn recv(&mut self) -> Option<Out> {
        loop {
            if self.0.kick_reason.load(Ordering::Acquire) != KICK_NONE {
                return None;
            }
            if let Some(out) = self.try_recv() {
                return Some(out);
            }
            if self.0.senders.load(Ordering::Acquire) == 0 {
                return self.try_recv();
            }
            self.0.filled.notified().await;
        }
    }
}

const KICK_NONE: u8 = 0;
const KICK_SLOW: u8 = 1;
const KICK_GONE: u8 = 2;

/// A cheap, cloneable handle to a live session's send queue. Everything
/// shared lives in one allocation (`Shared`): a session costs memory for as
/// long as it is connected, and most sessions are idle.
#[derive(Clone)]
pub struct SessionHandle {
    pub id: u64,
    pub user: Arc<str>,
    tx: Tx,
}

impl SessionHandle {
    /// Queues a line; a full queue disconnects the session as a slow consumer.
    pub fn send(&self, out: Out) -> bool {
        match self.tx.0.try_push(out) {
            Ok(()) => true,
            Err(PushError::Full(_)) => {
                self.kick(KICK_SLOW);
                false
            }
            Err(PushError::Closed) => false,
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
            _ = self.kicked() => false,
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
        let shared = &self.tx.0;
        let first = shared
            .kick_reason
            .compare_exchange(KICK_NONE, reason, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if first {
            shared.kicked.notify_waiters();
            shared.filled.notify_one();
        }
    }

    fn is_kicked(&self) -> bool {
        self.tx.0.kick_reason.load(Ordering::Acquire) != KICK_NONE
    }

    /// Records the position of a write this session made.
    pub fn wrote(&self, pos: Option<String>) {
        if pos.is_some() {
            let mut cur = lock(&self.tx.0.pos);
            *cur = later_pos(cur.take(), pos);
        }
    }

    fn receipts(&self) -> std::sync::MutexGuard<'_, Receipts> {
        lock(&self.tx.0.receipts)
    }

    /// The writer wrote these DMs into the connection.
    fn dms_written(&self, ids: &mut Vec<i64>, to: &mpsc::Sender<i64>) {
        let mut r = self.receipts();
        if r.mode == ReceiptMode::OnWrite {
            drop(r);
            report(ids.drain(..), to);
            return;
        }
        let room = MAX_UNACKED_DMS.saturating_sub(r.ids.len());
        let n = ids.len().min(room);
        r.ids.extend(ids.drain(..n));
        ids.clear();
    }

    /// The session's first command decides how its DMs count as received:
    /// `on_ack` (it was `ACK`) or as written. Later calls change nothing.
    pub fn decide_receipts(&self, on_ack: bool, to: &mpsc::Sender<i64>) {
        let mut r = self.receipts();
        if r.mode != ReceiptMode::Undecided {
            return;
        }
        if on_ack {
            r.mode = ReceiptMode::OnAck;
        } else {
            r.mode = ReceiptMode::OnWrite;
            let ids = std::mem::take(&mut r.ids);
            drop(r);
            report(ids, to);
        }
    }

    /// The client acknowledged these DMs: those written to this session are
    /// reported received. Returns how many were.
    pub fn ack_dms(&self, acked: &[i64], to: &mpsc::Sender<i64>) -> usize {
        let mut r = self.receipts();
        if r.mode != ReceiptMode::OnAck {
            return 0;
        }
        let mut done = Vec::new();
        for id in acked {
            // A DM can be written twice (live, and again as pending at a login).
            let before = r.ids.len();
            r.ids.retain(|x| x != id);
            if r.ids.len() < before {
                done.push(*id);
            }
        }
        if r.ids.is_empty() {
            r.ids = Vec::new();
        }
        drop(r);
        let n = done.len();
        report(done, to);
        n
    }

    /// The connection ended: a session that never decided counts what was
    /// written as received; un-acked DMs of an acking one stay pending.
    fn writer_done(&self, to: &mpsc::Sender<i64>) {
        let mut r = self.receipts();
        let ids = std::mem::take(&mut r.ids);
        if r.mode == ReceiptMode::Undecided {
            r.mode = ReceiptMode::OnWrite;
            drop(r);
            report(ids, to);
        }
    }

    /// The position this session's reads must observe.
    pub fn read_pos(&self) -> Option<String> {
        lock(&self.tx.0.pos).clone()
    }

    /// Returns once the session is kicked (at once if it already was).
    pub async fn kicked(&self) {
        loop {
            let notified = self.tx.0.kicked.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_kicked() {
                return;
            }
            notified.await;
        }
    }

    /// Why the session was kicked, if it was.
    pub fn kick_reason(&self) -> Option<PartReason> {
        match self.tx.0.kick_reason.load(Ordering::Acquire) {
            KICK_SLOW => Some(PartReason::Slow),
            KICK_GONE => Some(PartReason::Disconnected),
            _ => None,
        }
    }
}

/// Creates the queue; the receiver goes to [`writer::write_loop`].
pub fn channel(id: u64, user: Arc<str>, capacity: usize) -> (SessionHandle, Rx) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue::default()),
        cap: capacity,
        filled: Notify::new(),
        drained: Notify::new(),
        closed: AtomicBool::new(false),
        senders: AtomicUsize::new(1),
        kick_reason: AtomicU8::new(KICK_NONE),
        kicked: Notify::new(),
        pos: Mutex::new(None),
        receipts: Mutex::new(Receipts::default()),
    });
    let (tx, rx) = (Tx(shared.clone()), Rx(shared));
    let handle = SessionHandle { id, user, tx };
    (handle, rx)
}
