//! A logged-in session: its welcome and its commands.
//!
//! `LineCodec` frames → rate limit → `Command::parse` → [`Session::apply`]
//! → node / room / dbproxy → replies and events through the session's
//! bounded queue.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chat_protocol::{Command, ErrorCode, Frame, PartReason, ServerLine};
use chat_storage_api::{ApiError, DmItem, ErrorKind, Identity};
use futures::StreamExt;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::sleep_until;

use super::open::Frames;
use super::rate::{Admit, Limiter};
use crate::node::Node;
use crate::outbound::{Out, SessionHandle};
use crate::reply::{error_line, storage_error, with_cid};
use crate::room::{Answer, Answered, Publish};

/// Pending DMs handed over at login, at most (the rest come at the next login).
const PENDING_DM_LIMIT: u32 = 1000;
const HISTORY_DEFAULT_LIMIT: u32 = 100;
const ROOMS_LIMIT: u32 = 1000;

enum Flow {
    Continue,
    Quit,
}

pub struct Session {
    pub node: Arc<Node>,
    pub handle: SessionHandle,
    pub user: Arc<str>,
    pub inflight: Arc<Semaphore>,
    pub limiter: Limiter,
    /// Where DM receipts go (see `outbound::Receipts`).
    pub receipts: mpsc::Sender<i64>,
    /// The first command was seen (it decides how DMs count as received).
    pub receipts_decided: bool,
}

impl Session {
    /// Queues a reply, waiting for room in the queue: replies are produced by
    /// this client's own commands, so waiting only slows this client down.
    /// A client that reads nothing for the idle time is dropped as slow.
    pub async fn reply(&self, bytes: Bytes) {
        self.reply_out(Out::Line(bytes)).await;
    }

    /// [`Session::reply`] for any queue item (a welcome's pending DMs).
    /// A client kicked as slow is counted once, when its session closes.
    async fn reply_out(&self, out: Out) -> bool {
        let idle = self.node.config.idle_timeout();
        self.handle.send_wait(out, idle).await
    }

    async fn error(&self, code: ErrorCode, detail: impl Into<String>) {
        let line = error_line(&self.node.metrics, code, detail);
        self.reply(line.to_bytes()).await;
    }

    async fn storage_error(&self, e: &ApiError) {
        let line = storage_error(&self.node.metrics, e, &None);
        self.reply(line.to_bytes()).await;
    }

    pub async fn welcome(
        &mut self,
        id: &Identity,
        guest_room: Option<String>,
        resumed: bool,
    ) -> Result<(), ServerLine> {
        let node = self.node.clone();
        let m = &node.metrics;
        let (user, token) = (id.user.clone(), id.token.clone());
        let ok = if resumed {
            ServerLine::OkResume { user, token }
        } else {
            ServerLine::OkLogin { user, token }
        };
        self.reply(ok.to_bytes()).await;
        let refused = |e: ApiError| storage_error(m, &e, &None);
        if let Some(room) = guest_room {
            let joined = node.db.join(&room, &id.user).await.map_err(refused)?;
            self.handle.wrote(joined.pos);
        }
        let rooms = node.db.user_rooms(&id.user, self.handle.read_pos());
        for r in rooms.await.map_err(refused)?.rooms {
            node.enter_room(&self.user, &r.room);
            let ok = ServerLine::OkJoin {
                room: r.room,
                last_seq: r.last_seq,
            };
            self.reply(ok.to_bytes()).await;
        }
        let pending = node.db.pending_dms(&id.user, PENDING_DM_LIMIT);
        for dm in pending.await.map_err(refused)?.dms {
            let line = ServerLine::Dm {
                id: dm.id,
                ts: dm.ts,
                sender: dm.sender,
                text: dm.body,
            };
            // Waits like a reply: up to 1000 pending DMs are a burst of
            // this client's own login, not a sign that it reads slowly.
            if self.reply_out(Out::Dm(line.to_bytes(), dm.id)).await {
                m.deliveries_total.inc();
            }
        }
        Ok(())
    }

    pub async fn command_loop(&mut self, frames: &mut Frames, idle: Duration) -> PartReason {
        let mut deadline = tokio::time::Instant::now() + idle;
        loop {
            let frame = tokio::select! {
                biased;
                _ = self.handle.kicked() => {
                    return self.handle.kick_reason().unwrap_or(PartReason::Disconnected);
                }
                _ = self.node.shutdown.cancelled() => return PartReason::Shutdown,
                _ = sleep_until(deadline) => return PartReason::Idle,
                f = frames.next() => f,
            };
            deadline = tokio::time::Instant::now() + idle;
            let line = match frame {
                None | Some(Err(_)) => return PartReason::Disconnected,
                Some(Ok(Frame::Line(l))) => l,
                Some(Ok(Frame::TooLong)) => {
                    let max = self.node.config.max_line_bytes;
                    Box::pin(self.error(
                        ErrorCode::LineTooLong,
                        format!("lines are limited to {max} bytes; discarded"),
                    ))
                    .await;
                    continue;
                }
                Some(Ok(Frame::BadUtf8)) => {
                    Box::pin(self.error(ErrorCode::BadUtf8, "line is not valid UTF-8; ignored"))
                        .await;
                    continue;
                }
            };
            if line.trim().is_empty() {
                continue;
            }
            if let Some(reason) = Box::pin(self.command(&line)).await {
                return reason;
            }
        }
    }

    /// Runs one line's command; the reason to close, if it closes.
    async fn command(&mut self, line: &str) -> Option<PartReason> {
        match self.limiter.admit(Instant::now()) {
            Admit::Run => {}
            Admit::Kick => {
                tracing::info!(user = %self.user, "closing a connection that keeps flooding");
                return Some(PartReason::Disconnected);
            }
            Admit::Refuse => {
                let cid = match Command::parse(line) {
                    Ok(Command::Msg { cid, .. } | Command::Dm { cid, .. }) => cid,
                    _ => None,
                };
                let detail = with_cid(&cid, "too many commands; not executed");
                self.error(ErrorCode::RateLimited, detail).await;
                return None;
            }
        }
        let cmd = match Command::parse(line) {
            Ok(c) => c,
            Err(e) => {
                self.error(e.code, e.detail).await;
                return None;
            }
        };
        self.node
            .metrics
            .commands_total
            .with_label_values(&[cmd.name()])
            .inc();
        if !self.receipts_decided {
            self.receipts_decided = true;
            let on_ack = matches!(cmd, Command::Ack { .. });
            self.handle.decide_receipts(on_ack, &self.receipts);
        }
        match self.apply(cmd).await {
            Flow::Quit => Some(PartReason::Quit),
            Flow::Continue => None,
        }
    }

    async fn apply(&mut self, cmd: Command) -> Flow {
        match cmd {
            Command::Login { .. } | Command::Resume { .. } => {
                self.error(ErrorCode::AlreadyLoggedIn, "already logged in")
                    .await;
            }
            Command::Join { guest: Some(_), .. } => {
                self.error(
                    ErrorCode::BadArgs,
                    "JOIN <room> (a name only on the first line)",
                )
                .await;
            }
            Command::Join { room, guest: None } => self.join(room).await,
            Command::Part { room } => self.part(room).await,
            Command::Msg { cid, room, text } => self.msg(cid, room, text).await,
            Command::Dm { cid, to, text } => self.dm(cid, to, text).await,
            Command::History { room, after, limit } => self.history(room, after, limit).await,
            Command::Rooms => self.rooms().await,
            Command::Who { room } => self.who(room).await,
            Command::Ping { word } => self.reply(ServerLine::Pong { word }.to_bytes()).await,
            Command::Ack { ids } => {
                let count = self.handle.ack_dms(&ids, &self.receipts) as u32;
                self.reply(ServerLine::OkAck { count }.to_bytes()).await;
            }
            Command::Quit => return Flow::Quit,
        }
        Flow::Continue
    }

    async fn join(&mut self, room: String) {
        let node = self.node.clone();
        let max = node.config.max_rooms_per_user;
        if node.rooms_of(&self.user) >= max && node.present_room(&self.user, &room).is_none() {
            let detail = format!("at most {max} rooms per user; PART one first");
            self.error(ErrorCode::TooManyRooms, detail).await;
            return;
        }
        match node.db.join(&room, &self.user).await {
            Ok(j) => {
                self.handle.wrote(j.pos);
                node.enter_room(&self.user, &room);
                let ok = ServerLine::OkJoin {
                    room,
                    last_seq: j.last_seq,
                };
                self.reply(ok.to_bytes()).await;
            }
            Err(e) => self.storage_error(&e).await,
        }
    }

    async fn part(&mut self, room: String) {
        let node = self.node.clone();
        match node.db.part(&room, &self.user).await {
            Ok(ack) => {
                self.handle.wrote(ack.pos);
                node.leave_room(&self.user, &room);
                self.reply(ServerLine::OkPart { room }.to_bytes()).await;
            }
            Err(e) => self.storage_error(&e).await,
        }
    }

    async fn msg(&mut self, cid: Option<String>, room: String, text: String) {
        let node = self.node.clone();
        let Some(r) = node.present_room(&self.user, &room) else {
            let detail = with_cid(&cid, &format!("JOIN {room} first"));
            self.error(ErrorCode::NotMember, detail).await;
            return;
        };
        let received = Instant::now();
        let Ok(permit) = self.inflight.clone().acquire_owned().await else {
            return;
        };
        let p = Publish {
            room,
            sender: self.user.clone(),
            cid,
            text,
            from: (node.cluster.me.clone(), self.handle.id),
            answer: self.answer(permit, received),
        };
        node.publish(&r, p).await;
    }

    /// How this session hears about its message: `OK MSG` or `ERR`, after
    /// adopting the write's storage position; the permit held until then.
    fn answer(&self, permit: OwnedSemaphorePermit, received: Instant) -> Answer {
        let (node, session) = (self.node.clone(), self.handle.clone());
        Box::new(move |a: Answered| {
            session.wrote(a.pos);
            let reply = match a.result {
                Ok(stored) => {
                    node.metrics
                        .ack_latency
                        .observe(received.elapsed().as_secs_f64());
                    ServerLine::OkMsg {
                        room: a.room,
                        seq: stored.seq,
                        ts: stored.ts,
                        cid: a.cid,
                    }
                }
                Err(f) => f.line(&node.metrics, &a.cid),
            };
            session.line(reply.to_bytes());
            drop(permit);
        })
    }

    async fn dm(&mut self, cid: Option<String>, to: String, text: String) {
        let received = Instant::now();
        let Ok(permit) = self.inflight.clone().acquire_owned().await else {
            return;
        };
        let item = DmItem {
            sender: self.user.to_string(),
            recipient: to,
            client_id: cid,
            body: text,
        };
        let (node, handle) = (self.node.clone(), self.handle.clone());
        self.node.tasks.spawn(async move {
            let reply = send_dm(&node, item, &handle, received).await;
            handle.line(reply.to_bytes());
            drop(permit);
        });
    }

    async fn history(&mut self, room: String, after: u64, limit: Option<u32>) {
        let node = self.node.clone();
        let limit = limit.unwrap_or(HISTORY_DEFAULT_LIMIT);
        let read_pos = self.handle.read_pos();
        let h = match node.db.history(&room, after, limit, read_pos).await {
            Ok(h) => h,
            Err(e) => return self.storage_error(&e).await,
        };
        let count = h.messages.len() as u32;
        for msg in h.messages {
            let line = ServerLine::Hist {
                room: msg.room,
                seq: msg.seq,
                ts: msg.ts,
                sender: msg.sender,
                text: msg.body,
            };
            self.reply(line.to_bytes()).await;
        }
        self.reply(ServerLine::OkHistory { room, count }.to_bytes())
            .await;
    }

    async fn rooms(&mut self) {
        let node = self.node.clone();
        let list = match node.db.rooms(ROOMS_LIMIT, self.handle.read_pos()).await {
            Ok(list) => list,
            Err(e) => return self.storage_error(&e).await,
        };
        let count = list.rooms.len() as u32;
        for r in list.rooms {
            let line = ServerLine::Room {
                room: r.room,
                last_seq: r.last_seq,
                members: r.members,
            };
            self.reply(line.to_bytes()).await;
        }
        self.reply(ServerLine::OkRooms { count }.to_bytes()).await;
    }

    async fn who(&mut self, room: String) {
        let node = self.node.clone();
        let Some(members) = node.present_members(&room).await else {
            let detail = "the room's server did not answer; retry";
            self.error(ErrorCode::Unavailable, detail).await;
            return;
        };
        if members.is_empty() {
            // Nobody present: the room may not exist at all.
            if let Err(e) = node.db.room_info(&room, self.handle.read_pos()).await {
                return self.storage_error(&e).await;
            }
        }
        let count = members.len() as u32;
        for user in members {
            let line = ServerLine::Member {
                room: room.clone(),
                user,
            };
            self.reply(line.to_bytes()).await;
        }
        self.reply(ServerLine::OkWho { room, count }.to_bytes())
            .await;
    }
}

async fn send_dm(
    node: &Node,
    item: DmItem,
    sender: &SessionHandle,
    received: Instant,
) -> ServerLine {
    let m = &node.metrics;
    let cid = item.client_id.clone();
    let started = Instant::now();
    let result = node.db.send_dms(vec![item.clone()]).await;
    m.storage_latency
        .with_label_values(&["send_dm"])
        .observe(started.elapsed().as_secs_f64());
    let sent = match result.map(|r| {
        sender.wrote(r.pos);
        r.results.into_iter().next()
    }) {
        Ok(Some(Ok(sent))) => sent,
        Ok(Some(Err(e))) | Err(e) => return storage_error(m, &e, &cid),
        Ok(None) => {
            let e = ApiError::new(ErrorKind::Internal, "storage answered no result");
            return storage_error(m, &e, &cid);
        }
    };
    if !sent.duplicate {
        m.dms_total.inc();
        let line = ServerLine::Dm {
            id: sent.id,
            ts: sent.ts,
            sender: sender.user.to_string(),
            text: item.body,
        };
        node.route_dm(
            &item.recipient,
            &line.to_bytes(),
            sent.id,
            sender.read_pos(),
        );
    }
    m.ack_latency.observe(received.elapsed().as_secs_f64());
    ServerLine::OkDm {
        to: item.recipient,
        id: sent.id,
        ts: sent.ts,
        cid,
    }
}
