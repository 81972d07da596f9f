//! TLS on the client port and on the links to the other servers.
//!
//! accept → [`accept`]: within the first-line time, the first byte decides:
//! a TLS ClientHello gets the mutual-TLS handshake, plain TCP is refused
//! (or, with `tls_allow_plain`, served as an ordinary client) → the
//! certificate's [`Roles`] decide whether a `PEER` line (`chat-server`) or a
//! `PROXY` line (`chat-proxy`) is believed (`session::open`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chat_tls::{names, Acceptor, Connector, Reload, Stream, TlsError, TlsIdentity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, timeout_at, Instant};

use chat_admin::throttle::LogThrottle;
use prometheus::IntCounterVec;
use tokio_util::sync::CancellationToken;

use crate::logs::quote;

/// The line a plain connection to a TLS-only port gets before it is closed.
pub const PLAIN_REFUSED: &[u8] = b"ERR BAD_FIRST_LINE this port takes TLS only\n";

/// How long the refusal to a plain connection may take to write and how
/// much of what it sent is read away before closing: closing a socket with
/// unread bytes sends a reset, which can destroy the refusal line before
/// the client has read it. One line is what a client sends before its
/// answer; more is discarded with the reset.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(1);

/// The client port's TLS: the acceptor and, for links to the other servers,
/// the connector, both from the `tls` identity.
pub struct ServerTls {
    pub acceptor: Acceptor,
    pub connector: Connector,
    pub allow_plain: bool,
    /// Refusals are logged through this (at most one line a second): whoever
    /// reaches the port can cause one per connection.
    refusals: LogThrottle,
    /// `chat_tls_refused_total`, by [`Refusal`].
    refused_total: IntCounterVec,
}

impl ServerTls {
    pub fn new(
        identity: &TlsIdentity,
        allow_plain: bool,
        refused_total: IntCounterVec,
    ) -> Result<ServerTls, TlsError> {
        Ok(ServerTls {
            acceptor: Acceptor::new(identity)?,
            connector: Connector::new(identity)?,
            allow_plain,
            refusals: LogThrottle::default(),
            refused_total,
        })
    }

    /// Counts a refusal and logs it, at most once a second. `why` is ours
    /// (a rustls error, a fixed text), quoted anyway: a handshake error may
    /// carry a name from the peer's certificate.
    pub(crate) fn refused(&self, reason: Refusal, peer: SocketAddr, why: &str) {
        self.refused_total
            .with_label_values(&[reason.as_str()])
            .inc();
        if let Some(suppressed) = self.refusals.admit() {
            tracing::warn!(
                reason = reason.as_str(),
                %peer,
                why = %quote(why),
                suppressed,
                "refused a connection on the client port (TLS)"
            );
        }
    }

    /// Takes a new connection to the point where its first line can be
    /// read, all by `deadline` (the first-line time).
    pub(crate) async fn accept(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        deadline: Instant,
        shutdown: &CancellationToken,
        max_line_bytes: usize,
    ) -> Accepted {
        let sniffed = tokio::select! {
            r = timeout_at(deadline, chat_tls::sniff_tls(&tcp)) => r,
            _ = shutdown.cancelled() => return Accepted::Done,
        };
        match sniffed {
            Err(_) => Accepted::Late(tcp),
            Ok(Err(_)) => Accepted::Done,
            Ok(Ok(true)) => {
                let shaken = tokio::select! {
                    r = timeout_at(deadline, self.acceptor.accept(tcp)) => r,
                    _ = shutdown.cancelled() => return Accepted::Done,
                };
                match shaken {
                    Ok(Ok(stream)) => {
                        let roles = Roles::of(&stream);
                        Accepted::Ready(stream, roles)
                    }
                    Ok(Err(e)) => {
                        self.refused(Refusal::Handshake, peer, &e.to_string());
                        Accepted::Done
                    }
                    Err(_) => {
                        self.refused(Refusal::Handshake, peer, "handshake not done in time");
                        Accepted::Done
                    }
                }
            }
            // The peek saw no ClientHello: a plain line, or the end.
            Ok(Ok(false)) if closed(&tcp).await => Accepted::Done,
            Ok(Ok(false)) if self.allow_plain => {
                Accepted::Ready(Stream::Plain(tcp), Roles::default())
            }
            Ok(Ok(false)) => {
                self.refused(Refusal::PlainRefused, peer, "plain TCP");
                refuse_plain(tcp, max_line_bytes).await;
                Accepted::Done
            }
        }
    }

    /// What `chat_tls::watch` re-reads: both ends share the files, but each
    /// holds its own config.
    pub fn reloaders(&self) -> Vec<Arc<dyn Reload>> {
        vec![
            Arc::new(self.acceptor.clone()),
            Arc::new(self.connector.clone()),
        ]
    }
}

/// What the other end of a connection proved with its certificate. All
/// false on plain TCP.
#[derive(Clone, Copy, Debug, Default)]
pub struct Roles {
    /// A chat server: may open a `PEER` link.
    pub server: bool,
    /// A proxy: its `PROXY` line is believed.
    pub proxy: bool,
}

impl Roles {
    fn of(stream: &Stream) -> Roles {
        Roles {
            server: stream.peer_has_name(names::SERVER),
            proxy: stream.peer_has_name(names::PROXY),
        }
    }
}

/// Why a connection was refused for TLS reasons: the `reason` label of
/// `chat_tls_refused_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The handshake failed or did not finish within the first-line time
    /// (no certificate, one from another CA, a protocol error).
    Handshake,
    /// Plain TCP on a port that takes TLS only.
    PlainRefused,
    /// A `PEER` or `PROXY` line without the certificate it needs.
    Role,
}

impl Refusal {
    pub const ALL: [Refusal; 3] = [Refusal::Handshake, Refusal::PlainRefused, Refusal::Role];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Handshake => "tls",
            Refusal::PlainRefused => "plain_refused",
            Refusal::Role => "role",
        }
    }
}

/// How a new connection on the client port turned out.
pub(crate) enum Accepted {
    /// Ready for its first line: TLS after a handshake, or plain (no `tls`
    /// configured, or `tls_allow_plain`).
    Ready(Stream, Roles),
    /// Sent nothing within the first-line time.
    Late(TcpStream),
    /// Refused (and answered) or gone.
    Done,
}

/// Whether the peer closed without sending a byte (a port check), so a
/// refusal would be counted for nobody. The peek returns at once: the
/// sniff saw data or the end.
async fn closed(tcp: &TcpStream) -> bool {
    let mut first = [0u8; 1];
    matches!(tcp.peek(&mut first).await, Ok(0) | Err(_))
}

/// Writes [`PLAIN_REFUSED`], closes our side and reads away (bounded, see
/// [`FAREWELL_TIMEOUT`]) what the client sent, so the line is not lost to
/// a reset.
async fn refuse_plain(mut tcp: TcpStream, max_line_bytes: usize) {
    let _ = timeout(FAREWELL_TIMEOUT, async {
        tcp.write_all(PLAIN_REFUSED).await?;
        tcp.shutdown().await?;
        let mut sink = [0u8; 1024];
        let mut left = max_line_bytes + 2;
        while left > 0 {
            match tcp.read(&mut sink).await? {
                0 => break,
                n => left = left.saturating_sub(n),
            }
        }
        std::io::Result::Ok(())
    })
    .await;
}
