//! The chat server's connections to each dbproxy, capped: a connect waits
//! for one of `max_per_host` permits of its host (dbproxy), held for the
//! connection's life. With the pool's idle timeout this bounds what one chat
//! server holds open at a dbproxy, so that the servers' pools together fit
//! the dbproxy's `max_connections` (docs/OPERATIONS.md states the rule).
//!
//! `https://` dbproxies are dialed over mutual TLS with the chat server's
//! identity; their certificate must carry `chat-dbproxy` (the role, not the
//! address: pod addresses come and go, the Secret's certificate stays).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use chat_admin::sync::lock;
use chat_tls::Stream;
use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How the chat server pools its connections to dbproxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolOptions {
    /// Connections open at once to one dbproxy (busy and idle together).
    pub max_per_host: usize,
    /// A pooled connection unused this long is closed by the pool.
    pub idle_timeout: Duration,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            max_per_host: 256,
            idle_timeout: Duration::from_secs(30),
        }
    }
}

/// [`HttpConnector`] with a cap per `host:port`, and TLS for `https://`.
#[derive(Clone)]
pub(crate) struct CappedConnector {
    inner: HttpConnector,
    tls: Option<chat_tls::Connector>,
    max_per_host: usize,
    /// How long a connect waits for a permit: a request whose host is at its
    /// cap usually gets a pooled connection back meanwhile.
    wait: Duration,
    /// One semaphore per host. A std mutex: held only to look one up.
    hosts: Arc<Mutex<HashMap<String, Arc<Semaphore>>>>,
}

impl CappedConnector {
    /// `wait` bounds both the wait for a permit and the TLS handshake.
    pub(crate) fn new(
        mut inner: HttpConnector,
        tls: Option<chat_tls::Connector>,
        max_per_host: usize,
        wait: Duration,
    ) -> Self {
        // `https://` is ours to handle (below), not a refusal.
        inner.enforce_http(false);
        CappedConnector {
            inner,
            tls,
            max_per_host,
            wait,
            hosts: Arc::default(),
        }
    }

    fn permits(&self, uri: &Uri) -> Arc<Semaphore> {
        let key = uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default();
        let mut hosts = lock(&self.hosts);
        hosts
            .entry(key)
            .or_insert_with(|| Arc::new(Semaphore::new(self.max_per_host)))
            .clone()
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for CappedConnector {
    type Response = Capped;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Capped, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let permits = self.permits(&uri);
        let wait = self.wait;
        let mut inner = self.inner.clone();
        let tls = match uri.scheme_str() {
            Some("http") => None,
            Some("https") => match &self.tls {
                Some(tls) => Some(tls.clone()),
                None => {
                    return Box::pin(std::future::ready(Err(io::Error::other(
                        "an https:// dbproxy needs this server's [server.tls] identity",
                    )
                    .into())))
                }
            },
            _ => {
                return Box::pin(std::future::ready(Err(io::Error::other(
                    "a dbproxy URL must be http:// or https://",
                )
                .into())))
            }
        };
        Box::pin(async move {
            let permit = tokio::time::timeout(wait, permits.acquire_owned())
                .await
                .map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        "every pooled connection to this dbproxy is busy",
                    )
                })?
                .map_err(io::Error::other)?;
            let tcp = inner.call(uri).await?.into_inner();
            let io = match tls {
                None => Stream::Plain(tcp),
                Some(tls) => tokio::time::timeout(wait, tls.connect(chat_tls::names::DBPROXY, tcp))
                    .await
                    .map_err(|_| {
                        io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")
                    })??,
            };
            Ok(Capped {
                io: TokioIo::new(io),
                _permit: permit,
            })
        })
    }
}

/// A connection holding its host's permit until it is closed.
pub(crate) struct Capped {
    io: TokioIo<Stream>,
    _permit: OwnedSemaphorePermit,
}

impl Connection for Capped {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl Read for Capped {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl Write for Capped {
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

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}
