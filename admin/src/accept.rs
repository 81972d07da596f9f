//! The bounded accept loop every tier uses: a connection is accepted only
//! once a permit is free, so a flood of connects waits in the kernel backlog
//! instead of growing the process. HTTP listeners use [`Acceptor::next_or_full`]
//! instead: a keep-alive or silent connection may hold a permit for a long
//! time, and a prober waiting behind such connections would time out, so they
//! accept at once and make room themselves (see `http`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

pub struct Acceptor {
    listener: TcpListener,
    permits: Arc<Semaphore>,
}

/// One accepted connection; dropping `permit` frees its slot.
pub struct Accepted {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub permit: OwnedSemaphorePermit,
}

/// What [`Acceptor::next_or_full`] accepted.
pub enum Admission {
    /// A permit was free.
    Admitted(Accepted),
    /// Every permit is taken: the caller frees one for it or closes it.
    Full { stream: TcpStream, peer: SocketAddr },
}

impl Acceptor {
    pub fn new(listener: TcpListener, max_connections: usize) -> Acceptor {
        Acceptor {
            listener,
            permits: Arc::new(Semaphore::new(max_connections)),
        }
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The next connection, or `None` once `shutdown` is cancelled.
    pub async fn next(&self, shutdown: &CancellationToken) -> Option<Accepted> {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return None,
            p = self.permits.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let (stream, peer) = self.accept(shutdown).await?;
        Some(Accepted {
            stream,
            peer,
            permit,
        })
    }

    /// The next connection without waiting for a permit, or `None` once
    /// `shutdown` is cancelled.
    pub async fn next_or_full(&self, shutdown: &CancellationToken) -> Option<Admission> {
        let (stream, peer) = self.accept(shutdown).await?;
        Some(match self.permits.clone().try_acquire_owned() {
            Ok(permit) => Admission::Admitted(Accepted {
                stream,
                peer,
                permit,
            }),
            Err(_) => Admission::Full { stream, peer },
        })
    }

    async fn accept(&self, shutdown: &CancellationToken) -> Option<(TcpStream, SocketAddr)> {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                r = self.listener.accept() => match r {
                    Ok(accepted) => return Some(accepted),
                    Err(e) => {
                        // Usually EMFILE: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
    }
}
