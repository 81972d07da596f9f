//! One client connection: first line (login), then the command loop.
//!
//! socket → `LineCodec` frames → `Command::parse` → [`Session::apply`] → hub /
//! room / dbproxy → replies and events through the session's bounded queue →
//! `outbound::write_loop` → socket.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chat_protocol::first::{self, First};
use chat_protocol::{proxy_line, ParseError};
use chat_protocol::{Command, ErrorCode, Frame, LineCodec, PartReason, ServerLine};
use chat_storage_api::{ApiError, DmItem, ErrorKind, Identity};
use chat_tls::WriteHalf;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::{sleep_until, timeout};
use tokio_util::codec::FramedRead;

use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::outbound::{self, Out, SessionHandle};
use crate::room::{with_cid, Origin, Publish};
use crate::tls::{Accepted, Refusal, Roles};

/// Pending DMs handed over at login, at most (the rest come at the next login).
const PENDING_DM_LIMIT: u32 = 1000;
const HISTORY_DEFAULT_LIMIT: u32 = 100;
const ROOMS_LIMIT: u32 = 1000;
/// Initial read buffer of a connection (most lines are short).
const READ_BUF: usize = 256;
/// How long the one `ERR` to a refused first line may take to write.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(1);

/// Maps a storage failure to the client's `ERR` line.
pub fn storage_error(metrics: &Metrics, e: &ApiError, cid: &Option<String>) -> ServerLine {
    let code = match e.kind {
        ErrorKind::AuthFailed => ErrorCode::AuthFailed,
        ErrorKind::NameTaken => ErrorCode::NameTaken,
        ErrorKind::TokenInvalid => ErrorCode::TokenInvalid,
        ErrorKind::NoSuchRoom => ErrorCode::NoSuchRoom,
        ErrorKind::NoSuchUser => ErrorCode::NoSuchUser,
        ErrorKind::BadRequest => ErrorCode::BadArgs,
        ErrorKind::TooManyRooms => ErrorCode::TooManyRooms,
        ErrorKind::RateLimited => ErrorCode::RateLimited,
        // Nothing was stored, and the client can retry once the operator
        // fixed this server's token.
        ErrorKind::Unavailable | ErrorKind::Unauthorized => ErrorCode::Unavailable,
        ErrorKind::Internal => ErrorCode::Internal,
    };
    let detail = match e.kind {
        ErrorKind::Unavailable | ErrorKind::Unauthorized => {
            "storage unavailable, nothing stored; retry".to_string()
        }
        ErrorKind::Internal => "storage failed".to_string(),
        _ => e.message.clone(),
    };
    metrics
        .errors_total
        .with_label_values(&[code.as_str()])
        .inc();
    ServerLine::err(code, with_cid(cid, &detail))
}

enum Flow {
    Continue,
    Quit,
}

type Frames = FramedRead<chat_tls::ReadHalf, LineCodec>;

/// Serves one connection to the end.
///
/// Most connections are idle, so what an idle one holds matters: the phases
/// around the command loop (first line and login, welcome, teardown) run
/// boxed, and only what the loop needs ([`Live`]) is kept between them; a
/// value kept in this function's own scope would stay in the task for the
/// connection's lifetime, even after it was moved out.
pub async fn run(
    hub: Arc<Hub>,
    stream: TcpStream,
    peer: SocketAddr,
    id: u64,
    receipts: mpsc::Sender<i64>,
) {
    let Some(mut live) = Box::pin(start(hub, stream, peer, id, receipts)).await else {
        return;
    };
    let reason = match live.refused.take() {
        None => {
            let idle = Duration::from_secs(live.session.hub.config.idle_timeout_secs);
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
    hub: Arc<Hub>,
    stream: TcpStream,
    peer: SocketAddr,
    id: u64,
    receipts: mpsc::Sender<i64>,
) -> Option<Live> {
    let (identity, guest_room, resumed, frames, wr) = open(&hub, stream, peer).await?;
    let user: Arc<str> = Arc::from(identity.user.as_str());
    tracing::debug!(%peer, user = %user, "logged in");

    let (handle, rx) = outbound::channel(id, user.clone(), hub.config.send_queue_lines);
    let writer = hub.tasks.spawn(outbound::write_loop(
        handle.clone(),
        rx,
        wr,
        receipts.clone(),
    ));
    handle.wrote(identity.pos.clone());
    hub.add_session(handle.clone(), identity.token.clone());
    let mut session = Session {
        hub: hub.clone(),
        handle,
        user,
        inflight: Arc::new(Semaphore::new(hub.config.max_inflight_per_conn)),
        bucket: TokenBucket::new(hub.config.rate_per_sec, hub.config.rate_burst),
        limited_in_a_row: 0,
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

/// Reads and answers the first line. `None` when the connection ends there
/// (refused, gone, or a peer link handed to the cluster).
async fn open(
    hub: &Arc<Hub>,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Option<(Identity, Option<String>, bool, Frames, WriteHalf)> {
    let _ = tcp.set_nodelay(true);
    // One time limit for the TLS handshake (if any) and the first line.
    let limit = Duration::from_secs(hub.config.first_line_timeout_secs);
    let deadline = tokio::time::Instant::now() + limit;
    let (stream, roles) = match crate::tls::accept(hub, tcp, peer, deadline).await {
        Accepted::Ready(stream, roles) => (stream, roles),
        Accepted::Done => return None,
        Accepted::Late(tcp) => {
            let (_, wr) = tcp.into_split();
            let late = first_line_error(hub, ErrorCode::BadFirstLine, "no first line in time");
            farewell(WriteHalf::Plain(wr), &late).await;
            return None;
        }
    };
    let (rd, wr) = stream.into_split();
    // A small read buffer that grows for long lines: idle connections are
    // most connections.
    let mut frames =
        FramedRead::with_capacity(rd, LineCodec::new(hub.config.max_line_bytes), READ_BUF);
    let first = tokio::select! {
        f = tokio::time::timeout_at(deadline, read_first(hub, &mut frames, peer, roles)) => f,
        _ = hub.shutdown.cancelled() => return None,
    };
    let refused = match first {
        Err(_) => first_line_error(hub, ErrorCode::BadFirstLine, "no first line in time"),
        Ok(Opened::Gone) => return None,
        Ok(Opened::Refused(e)) => first_line_error(hub, e.code, &e.detail),
        Ok(Opened::Peer(line)) => {
            // Another chat server opening its link, not a client: served
            // with the background work, which outlives the clients' drain.
            if frames.read_buffer().is_empty() {
                let rd = frames.into_inner();
                let h = hub.clone();
                hub.tasks
                    .spawn(async move { crate::cluster::link::serve(h, &line, rd, wr).await });
            }
            return None;
        }
        Ok(Opened::Start(cmd, source)) => match login(hub, cmd, source).await {
            Ok((identity, guest_room, resumed)) => {
                return Some((identity, guest_room, resumed, frames, wr))
            }
            Err(err) => err,
        },
    };
    tracing::debug!(%peer, "first line refused");
    farewell(wr, &refused).await;
    None
}

/// Writes the one line refusing a connection and closes it.
async fn farewell(mut wr: WriteHalf, line: &ServerLine) {
    let _ = timeout(FAREWELL_TIMEOUT, async {
        wr.write_all(&line.to_bytes()).await?;
        wr.shutdown().await
    })
    .await;
}

/// How a connection's first line turned out.
enum Opened {
    /// A client start and the address the client connected from.
    Start(Command, IpAddr),
    /// A chat server's `PEER` line.
    Peer(String),
    Refused(ParseError),
    /// Closed (or failed) before a first line.
    Gone,
}

/// Reads the optional PROXY line of a trusted proxy, skips empty lines and
/// classifies the first line (`chat_protocol::first`, the proxy's rules too).
/// With TLS, `roles` (the certificate) decides who may send PEER or PROXY.
async fn read_first(hub: &Hub, frames: &mut Frames, peer: SocketAddr, roles: Roles) -> Opened {
    let mut source = peer.ip().to_canonical();
    let mut proxied = false;
    let mut empty = 0;
    loop {
        let line = match frames.next().await {
            Some(Ok(Frame::Line(line))) => line,
            Some(Ok(Frame::TooLong)) => {
                return Opened::Refused(ParseError::new(
                    ErrorCode::LineTooLong,
                    "first line too long",
                ))
            }
            Some(Ok(Frame::BadUtf8)) => {
                return Opened::Refused(ParseError::new(
                    ErrorCode::BadUtf8,
                    "first line is not UTF-8",
                ))
            }
            None | Some(Err(_)) => return Opened::Gone,
        };
        if !proxied && empty == 0 && proxy_line::is_proxy_line(line.as_bytes()) {
            match client_source(hub, peer, roles, line.as_bytes()) {
                Ok(ip) => source = ip,
                Err(e) => return Opened::Refused(e),
            }
            proxied = true;
            continue;
        }
        match first::classify(line.as_bytes(), empty) {
            Ok(First::Empty) => empty += 1,
            Ok(First::Start(cmd)) => return Opened::Start(cmd, source),
            // Peers dial each other directly, never through a proxy.
            Ok(First::Peer(_)) if proxied => {
                return Opened::Refused(ParseError::new(ErrorCode::BadFirstLine, first::USAGE))
            }
            Ok(First::Peer(_)) if hub.tls.is_some() && !roles.server => {
                crate::tls::refused(
                    hub,
                    Refusal::Role,
                    peer,
                    "PEER without a chat-server certificate",
                );
                return Opened::Refused(ParseError::new(
                    ErrorCode::AuthFailed,
                    "peer links need a chat-server certificate",
                ));
            }
            Ok(First::Peer(p)) => return Opened::Peer(p.to_string()),
            Err(e) => return Opened::Refused(e),
        }
    }
}

/// The client's address from a PROXY line sent by `peer`: only a proxy may
/// name another address than its own. Without TLS a proxy is an address in
/// `trust_proxy_line`; with TLS it is a `chat-proxy` certificate, and also
/// such an address when `trust_proxy_line` lists any.
fn client_source(
    hub: &Hub,
    peer: SocketAddr,
    roles: Roles,
    line: &[u8],
) -> Result<IpAddr, ParseError> {
    let trusted = &hub.trusted_proxies;
    if hub.tls.is_some() && !roles.proxy {
        crate::tls::refused(
            hub,
            Refusal::Role,
            peer,
            "PROXY line without a chat-proxy certificate",
        );
        return Err(ParseError::new(
            ErrorCode::BadFirstLine,
            "a PROXY line needs a chat-proxy certificate",
        ));
    }
    let by_address = hub.tls.is_none() || !trusted.is_empty();
    if by_address && !trusted.contains(peer.ip()) {
        return Err(ParseError::new(
            ErrorCode::BadFirstLine,
            "PROXY line from an address not in server.trust_proxy_line",
        ));
    }
    Ok(proxy_line::parse(line)?.ip().to_canonical())
}

/// Ends a session: answers what it read (on a clean close), leaves the
/// rooms, says goodbye, waits for the writer, touches the token.
async fn close(
    session: Session,
    reason: PartReason,
    writer: tokio::task::JoinHandle<()>,
    token: String,
) {
    let hub = session.hub.clone();
    let handle = session.handle.clone();
    // Every way a session is dropped as slow (an event into a full queue, a
    // reply that waited the idle time) ends here, so it is counted here once.
    if reason == PartReason::Slow {
        hub.metrics.slow_consumers_total.inc();
    }
    if matches!(
        reason,
        PartReason::Shutdown | PartReason::Quit | PartReason::Disconnected
    ) {
        // MSG/DM already read get their answers before BYE (or before the
        // close a proxy waits for when it moves the client elsewhere).
        let grace = Duration::from_secs(hub.config.shutdown_grace_secs);
        let all = hub.config.max_inflight_per_conn as u32;
        let _ = timeout(grace, session.inflight.acquire_many(all)).await;
    }
    hub.remove_session(&handle, reason);
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
    let db = hub.db.clone();
    hub.tasks.spawn(async move {
        let _ = db.touch(vec![token]).await;
    });
}

fn first_line_error(hub: &Hub, code: ErrorCode, detail: &str) -> ServerLine {
    hub.metrics
        .errors_total
        .with_label_values(&[code.as_str()])
        .inc();
    ServerLine::err(code, detail)
}

/// Logs in with the first line's command: the identity, the room of a
/// guest start, and whether it was a RESUME.
async fn login(
    hub: &Hub,
    cmd: Command,
    source: IpAddr,
) -> Result<(Identity, Option<String>, bool), ServerLine> {
    hub.metrics
        .commands_total
        .with_label_values(&[cmd.name()])
        .inc();
    let res = match cmd {
        Command::Login { user, password } => hub
            .db
            .login(&user, &password, Some(source))
            .await
            .map(|i| (i, None, false)),
        Command::Resume { token } => hub.db.resume(&token).await.map(|i| (i, None, true)),
        Command::Join {
            room,
            guest: Some(name),
        } => hub.db.guest(&name).await.map(|i| (i, Some(room), false)),
        _ => return Err(first_line_error(hub, ErrorCode::BadFirstLine, first::USAGE)),
    };
    res.map_err(|e| storage_error(&hub.metrics, &e, &None))
}

struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u32, burst: u32) -> Self {
        TokenBucket {
            rate: rate as f64,
            burst: burst as f64,
            tokens: burst as f64,
            last: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

struct Session {
    hub: Arc<Hub>,
    handle: SessionHandle,
    user: Arc<str>,
    inflight: Arc<Semaphore>,
    bucket: TokenBucket,
    limited_in_a_row: u32,
    /// Where DM receipts go (see `outbound::Receipts`).
    receipts: mpsc::Sender<i64>,
    /// The first command was seen (it decides how DMs count as received).
    receipts_decided: bool,
}

impl Session {
    /// Queues a reply, waiting for room in the queue: replies are produced by
    /// this client's own commands, so waiting only slows this client down.
    /// A client that reads nothing for the idle time is dropped as slow.
    async fn reply(&self, bytes: Bytes) {
        self.reply_out(Out::Line(bytes)).await;
    }

    /// [`Session::reply`] for any queue item (a welcome's pending DMs).
    /// A client kicked as slow is counted once, when its session closes.
    async fn reply_out(&self, out: Out) -> bool {
        let idle = Duration::from_secs(self.hub.config.idle_timeout_secs);
        self.handle.send_wait(out, idle).await
    }

    async fn error(&self, code: ErrorCode, detail: impl Into<String>) {
        self.hub
            .metrics
            .errors_total
            .with_label_values(&[code.as_str()])
            .inc();
        self.reply(ServerLine::err(code, detail).to_bytes()).await;
    }

    async fn welcome(
        &mut self,
        id: &Identity,
        guest_room: Option<String>,
        resumed: bool,
    ) -> Result<(), ServerLine> {
        let m = &self.hub.metrics;
        let (user, token) = (id.user.clone(), id.token.clone());
        let ok = if resumed {
            ServerLine::OkResume { user, token }
        } else {
            ServerLine::OkLogin { user, token }
        };
        self.reply(ok.to_bytes()).await;
        if let Some(room) = guest_room {
            let joined = self
                .hub
                .db
                .join(&room, &id.user)
                .await
                .map_err(|e| storage_error(m, &e, &None))?;
            self.handle.wrote(joined.pos);
        }
        let rooms = self
            .hub
            .db
            .user_rooms(&id.user, self.handle.read_pos())
            .await
            .map_err(|e| storage_error(m, &e, &None))?;
        for r in rooms.rooms {
            self.hub.enter_room(&self.user, &r.room);
            let ok = ServerLine::OkJoin {
                room: r.room,
                last_seq: r.last_seq,
            };
            self.reply(ok.to_bytes()).await;
        }
        let pending = self
            .hub
            .db
            .pending_dms(&id.user, PENDING_DM_LIMIT)
            .await
            .map_err(|e| storage_error(m, &e, &None))?;
        for dm in pending.dms {
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

    async fn command_loop(&mut self, frames: &mut Frames, idle: Duration) -> PartReason {
        let mut deadline = tokio::time::Instant::now() + idle;
        loop {
            let frame = tokio::select! {
                biased;
                _ = self.handle.kicked() => {
                    return self.handle.kick_reason().unwrap_or(PartReason::Disconnected);
                }
                _ = self.hub.shutdown.cancelled() => return PartReason::Shutdown,
                _ = sleep_until(deadline) => return PartReason::Idle,
                f = frames.next() => f,
            };
            deadline = tokio::time::Instant::now() + idle;
            let line = match frame {
                None | Some(Err(_)) => return PartReason::Disconnected,
                Some(Ok(Frame::Line(l))) => l,
                Some(Ok(Frame::TooLong)) => {
                    let max = self.hub.config.max_line_bytes;
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
            if !self.bucket.take() {
                self.limited_in_a_row += 1;
                if self.limited_in_a_row >= self.hub.config.rate_limit_kick {
                    tracing::info!(user = %self.user, "closing a connection that keeps flooding");
                    return PartReason::Disconnected;
                }
                let cid = match Command::parse(&line) {
                    Ok(Command::Msg { cid, .. } | Command::Dm { cid, .. }) => cid,
                    _ => None,
                };
                let detail = with_cid(&cid, "too many commands; not executed");
                Box::pin(self.error(ErrorCode::RateLimited, detail)).await;
                continue;
            }
            self.limited_in_a_row = 0;
            let cmd = match Command::parse(&line) {
                Ok(c) => c,
                Err(e) => {
                    Box::pin(self.error(e.code, e.detail)).await;
                    continue;
                }
            };
            self.hub
                .metrics
                .commands_total
                .with_label_values(&[cmd.name()])
                .inc();
            if !self.receipts_decided {
                self.receipts_decided = true;
                let on_ack = matches!(cmd, Command::Ack { .. });
                self.handle.decide_receipts(on_ack, &self.receipts);
            }
            if let Flow::Quit = Box::pin(self.apply(cmd)).await {
                return PartReason::Quit;
            }
        }
    }

    async fn apply(&mut self, cmd: Command) -> Flow {
        let hub = self.hub.clone();
        let m = &hub.metrics;
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
            Command::Join { room, guest: None }
                if hub.rooms_of(&self.user) >= hub.config.max_rooms_per_user
                    && hub.present_room(&self.user, &room).is_none() =>
            {
                let max = hub.config.max_rooms_per_user;
                self.error(
                    ErrorCode::TooManyRooms,
                    format!("at most {max} rooms per user; PART one first"),
                )
                .await;
            }
            Command::Join { room, guest: None } => match hub.db.join(&room, &self.user).await {
                Ok(j) => {
                    self.handle.wrote(j.pos);
                    hub.enter_room(&self.user, &room);
                    let ok = ServerLine::OkJoin {
                        room,
                        last_seq: j.last_seq,
                    };
                    self.reply(ok.to_bytes()).await;
                }
                Err(e) => self.reply(storage_error(m, &e, &None).to_bytes()).await,
            },
            Command::Part { room } => match hub.db.part(&room, &self.user).await {
                Ok(ack) => {
                    self.handle.wrote(ack.pos);
                    hub.leave_room(&self.user, &room);
                    self.reply(ServerLine::OkPart { room }.to_bytes()).await;
                }
                Err(e) => self.reply(storage_error(m, &e, &None).to_bytes()).await,
            },
            Command::Msg { cid, room, text } => {
                let Some(r) = hub.present_room(&self.user, &room) else {
                    self.error(
                        ErrorCode::NotMember,
                        with_cid(&cid, &format!("JOIN {room} first")),
                    )
                    .await;
                    return Flow::Continue;
                };
                let received = Instant::now();
                let Ok(permit) = self.inflight.clone().acquire_owned().await else {
                    return Flow::Continue;
                };
                let p = Publish {
                    origin: Origin::Local {
                        session: self.handle.clone(),
                        permit,
                    },
                    room,
                    sender: self.user.clone(),
                    cid,
                    text,
                    received,
                };
                hub.publish(&r, p).await;
            }
            Command::Dm { cid, to, text } => {
                let received = Instant::now();
                let Ok(permit) = self.inflight.clone().acquire_owned().await else {
                    return Flow::Continue;
                };
                let item = DmItem {
                    sender: self.user.to_string(),
                    recipient: to.clone(),
                    client_id: cid.clone(),
                    body: text.clone(),
                };
                let (hub2, handle) = (hub.clone(), self.handle.clone());
                hub.tasks.spawn(async move {
                    let reply = send_dm(&hub2, item, &handle, received).await;
                    handle.line(reply.to_bytes());
                    drop(permit);
                });
            }
            Command::History { room, after, limit } => {
                let limit = limit.unwrap_or(HISTORY_DEFAULT_LIMIT);
                match hub
                    .db
                    .history(&room, after, limit, self.handle.read_pos())
                    .await
                {
                    Ok(h) => {
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
                    Err(e) => self.reply(storage_error(m, &e, &None).to_bytes()).await,
                }
            }
            Command::Rooms => match hub.db.rooms(ROOMS_LIMIT, self.handle.read_pos()).await {
                Ok(list) => {
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
                Err(e) => self.reply(storage_error(m, &e, &None).to_bytes()).await,
            },
            Command::Who { room } => {
                let Some(members) = hub.present_members(&room).await else {
                    self.error(
                        ErrorCode::Unavailable,
                        "the room's server did not answer; retry",
                    )
                    .await;
                    return Flow::Continue;
                };
                if members.is_empty() {
                    // Nobody present: the room may not exist at all.
                    if let Err(e) = hub.db.room_info(&room, self.handle.read_pos()).await {
                        self.reply(storage_error(m, &e, &None).to_bytes()).await;
                        return Flow::Continue;
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
            Command::Ping { word } => self.reply(ServerLine::Pong { word }.to_bytes()).await,
            Command::Ack { ids } => {
                let count = self.handle.ack_dms(&ids, &self.receipts) as u32;
                self.reply(ServerLine::OkAck { count }.to_bytes()).await;
            }
            Command::Quit => return Flow::Quit,
        }
        Flow::Continue
    }
}

async fn send_dm(hub: &Hub, item: DmItem, sender: &SessionHandle, received: Instant) -> ServerLine {
    let m = &hub.metrics;
    let cid = item.client_id.clone();
    let started = Instant::now();
    let result = hub.db.send_dms(vec![item.clone()]).await;
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
        hub.route_dm(
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
