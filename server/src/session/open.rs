//! A connection's first line: TLS (when configured), an optional PROXY
//! line from a trusted proxy, then a login, a `PEER` link, or a refusal.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use chat_protocol::first::{self, First};
use chat_protocol::{proxy_line, ParseError};
use chat_protocol::{Command, ErrorCode, Frame, LineCodec, ServerLine};
use chat_storage_api::Identity;
use chat_tls::{Stream, WriteHalf};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_util::codec::FramedRead;

use crate::cluster::link;
use crate::node::Node;
use crate::reply::{error_line, storage_error};
use crate::tls::{Accepted, Refusal, Roles};

/// Initial read buffer of a connection (most lines are short).
const READ_BUF: usize = 256;
/// How long the one `ERR` to a refused first line may take to write.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(1);

pub type Frames = FramedRead<chat_tls::ReadHalf, LineCodec>;

/// A client that logged in with its first line.
pub struct Opened {
    pub identity: Identity,
    /// The room of a guest start (`JOIN <room> <name>`).
    pub guest_room: Option<String>,
    /// It was a `RESUME`.
    pub resumed: bool,
    pub frames: Frames,
    pub writer: WriteHalf,
}

/// Reads and answers the first line. `None` when the connection ends there
/// (refused, gone, or a peer link handed to the cluster).
pub async fn open(node: &Arc<Node>, tcp: TcpStream, peer: SocketAddr) -> Option<Opened> {
    let _ = tcp.set_nodelay(true);
    // One time limit for the TLS handshake (if any) and the first line.
    let limit = node.config.first_line_timeout();
    let deadline = tokio::time::Instant::now() + limit;
    let accepted = match &node.tls {
        Some(tls) => {
            let max_line = node.config.max_line_bytes;
            tls.accept(tcp, peer, deadline, &node.shutdown, max_line)
                .await
        }
        None => Accepted::Ready(Stream::Plain(tcp), Roles::default()),
    };
    let (stream, roles) = match accepted {
        Accepted::Ready(stream, roles) => (stream, roles),
        Accepted::Done => return None,
        Accepted::Late(tcp) => {
            let (_, wr) = tcp.into_split();
            let late = error_line(
                &node.metrics,
                ErrorCode::BadFirstLine,
                "no first line in time",
            );
            farewell(WriteHalf::Plain(wr), &late).await;
            return None;
        }
    };
    let (rd, wr) = stream.into_split();
    // A small read buffer that grows for long lines: idle connections are
    // most connections.
    let mut frames =
        FramedRead::with_capacity(rd, LineCodec::new(node.config.max_line_bytes), READ_BUF);
    let first = tokio::select! {
        f = tokio::time::timeout_at(deadline, read_first(node, &mut frames, peer, roles)) => f,
        _ = node.shutdown.cancelled() => return None,
    };
    let refused = match first {
        Err(_) => error_line(
            &node.metrics,
            ErrorCode::BadFirstLine,
            "no first line in time",
        ),
        Ok(FirstLine::Gone) => return None,
        Ok(FirstLine::Refused(e)) => error_line(&node.metrics, e.code, e.detail),
        Ok(FirstLine::Peer(line)) => {
            // Another chat server opening its link, not a client: served
            // with the background work, which outlives the clients' drain.
            if frames.read_buffer().is_empty() {
                let rd = frames.into_inner();
                let (cluster, handler) = (node.cluster.clone(), node.clone());
                node.tasks
                    .spawn(async move { link::serve(cluster, handler, &line, rd, wr).await });
            }
            return None;
        }
        Ok(FirstLine::Start(cmd, source)) => match login(node, cmd, source).await {
            Ok((identity, guest_room, resumed)) => {
                return Some(Opened {
                    identity,
                    guest_room,
                    resumed,
                    frames,
                    writer: wr,
                })
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
enum FirstLine {
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
async fn read_first(node: &Node, frames: &mut Frames, peer: SocketAddr, roles: Roles) -> FirstLine {
    let mut source = peer.ip().to_canonical();
    let mut proxied = false;
    let mut empty = 0;
    loop {
        let line = match frames.next().await {
            Some(Ok(Frame::Line(line))) => line,
            Some(Ok(Frame::TooLong)) => {
                return FirstLine::Refused(ParseError::new(
                    ErrorCode::LineTooLong,
                    "first line too long",
                ))
            }
            Some(Ok(Frame::BadUtf8)) => {
                return FirstLine::Refused(ParseError::new(
                    ErrorCode::BadUtf8,
                    "first line is not UTF-8",
                ))
            }
            None | Some(Err(_)) => return FirstLine::Gone,
        };
        if !proxied && empty == 0 && proxy_line::is_proxy_line(line.as_bytes()) {
            match client_source(node, peer, roles, line.as_bytes()) {
                Ok(ip) => source = ip,
                Err(e) => return FirstLine::Refused(e),
            }
            proxied = true;
            continue;
        }
        match first::classify(line.as_bytes(), empty) {
            Ok(First::Empty) => empty += 1,
            Ok(First::Start(cmd)) => return FirstLine::Start(cmd, source),
            // Peers dial each other directly, never through a proxy.
            Ok(First::Peer(_)) if proxied => {
                return FirstLine::Refused(ParseError::new(ErrorCode::BadFirstLine, first::USAGE))
            }
            Ok(First::Peer(_)) if node.tls.is_some() && !roles.server => {
                if let Some(tls) = &node.tls {
                    tls.refused(
                        Refusal::Role,
                        peer,
                        "PEER without a chat-server certificate",
                    );
                }
                return FirstLine::Refused(ParseError::new(
                    ErrorCode::AuthFailed,
                    "peer links need a chat-server certificate",
                ));
            }
            Ok(First::Peer(p)) => return FirstLine::Peer(p.to_string()),
            Err(e) => return FirstLine::Refused(e),
        }
    }
}

/// The client's address from a PROXY line sent by `peer`: only a proxy may
/// name another address than its own. Without TLS a proxy is an address in
/// `trust_proxy_line`; with TLS it is a `chat-proxy` certificate, and also
/// such an address when `trust_proxy_line` lists any.
fn client_source(
    node: &Node,
    peer: SocketAddr,
    roles: Roles,
    line: &[u8],
) -> Result<IpAddr, ParseError> {
    let trusted = &node.trusted_proxies;
    if let Some(tls) = node.tls.as_ref().filter(|_| !roles.proxy) {
        tls.refused(
            Refusal::Role,
            peer,
            "PROXY line without a chat-proxy certificate",
        );
        return Err(ParseError::new(
            ErrorCode::BadFirstLine,
            "a PROXY line needs a chat-proxy certificate",
        ));
    }
    let by_address = node.tls.is_none() || !trusted.is_empty();
    if by_address && !trusted.contains(peer.ip()) {
        return Err(ParseError::new(
            ErrorCode::BadFirstLine,
            "PROXY line from an address not in server.trust_proxy_line",
        ));
    }
    Ok(proxy_line::parse(line)?.ip().to_canonical())
}

/// Logs in with the first line's command: the identity, the room of a
/// guest start, and whether it was a RESUME.
async fn login(
    node: &Node,
    cmd: Command,
    source: IpAddr,
) -> Result<(Identity, Option<String>, bool), ServerLine> {
    node.metrics
        .commands_total
        .with_label_values(&[cmd.name()])
        .inc();
    let res = match cmd {
        Command::Login { user, password } => node
            .db
            .login(&user, &password, Some(source))
            .await
            .map(|i| (i, None, false)),
        Command::Resume { token } => node.db.resume(&token).await.map(|i| (i, None, true)),
        Command::Join {
            room,
            guest: Some(name),
        } => node.db.guest(&name).await.map(|i| (i, Some(room), false)),
        _ => {
            let usage = error_line(&node.metrics, ErrorCode::BadFirstLine, first::USAGE);
            return Err(usage);
        }
    };
    res.map_err(|e| storage_error(&node.metrics, &e, &None))
}
