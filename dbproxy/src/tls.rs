//! Mutual TLS on the API listener: the [`chat_admin::http::Wrap`] that runs
//! the handshake for every accepted connection and lets through only chat
//! servers (a certificate from the CA carrying `chat-server`). Refusals are
//! counted by reason in `chat_dbproxy_tls_refused_total` and logged at most
//! once a second, without the peer's bytes.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use chat_admin::throttle::LogThrottle;
use chat_tls::{names, Acceptor, Stream};
use prometheus::IntCounterVec;
use tokio::net::TcpStream;

/// Why a connection was refused (the metric's `reason` label).
pub(crate) const REASONS: [&str; 4] = ["plain", "handshake", "role", "timeout"];

/// The first byte of a TLS connection (a handshake record).
const TLS_HANDSHAKE: u8 = 0x16;

/// Longest part of an error's text quoted in a log line.
const QUOTE_MAX: usize = 120;

#[derive(Clone)]
pub(crate) struct ApiTls {
    acceptor: Acceptor,
    refused: IntCounterVec,
    log: Arc<LogThrottle>,
}

impl ApiTls {
    pub(crate) fn new(acceptor: Acceptor, refused: IntCounterVec) -> ApiTls {
        ApiTls {
            acceptor,
            refused,
            log: Arc::default(),
        }
    }

    fn refuse(&self, peer: SocketAddr, reason: &'static str, error: &str) {
        self.refused.with_label_values(&[reason]).inc();
        if let Some(suppressed) = self.log.admit() {
            // rustls's messages name what went wrong, but quote them
            // escaped and cut anyway: they can carry a peer's values.
            let cut: String = error.chars().take(QUOTE_MAX).collect();
            let error = chat_protocol::text::escape_controls(&cut);
            tracing::warn!(%peer, reason, %error, suppressed, "refused an API connection (TLS)");
        }
    }
}

impl chat_admin::http::Wrap for ApiTls {
    type Io = Stream;

    async fn wrap(&self, tcp: TcpStream, peer: SocketAddr) -> io::Result<Stream> {
        // A chat server still on http:// would otherwise show as a
        // handshake error; the first byte tells the two apart. A peer that
        // closes without a byte (a TCP probe) is not counted.
        let mut first = [0u8; 1];
        if tcp.peek(&mut first).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if first[0] != TLS_HANDSHAKE {
            self.refuse(peer, "plain", "not a TLS handshake (plain HTTP?)");
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "plain TCP on a TLS listener",
            ));
        }
        let stream = match self.acceptor.accept(tcp).await {
            Ok(s) => s,
            Err(e) => {
                self.refuse(peer, "handshake", &e.to_string());
                return Err(e);
            }
        };
        if !stream.peer_has_name(names::SERVER) {
            self.refuse(
                peer,
                "role",
                &format!("client certificate does not carry {}", names::SERVER),
            );
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "client certificate is not a chat server's",
            ));
        }
        Ok(stream)
    }

    fn timed_out(&self, peer: SocketAddr) {
        self.refuse(
            peer,
            "timeout",
            "TLS handshake not done within header_timeout_ms",
        );
    }
}
