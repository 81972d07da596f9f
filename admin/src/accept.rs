//! The bounded accept loop every tier uses: a connection is accepted only
//! once a permit is free, so a flood of connects waits in the kernel backlog
//! instead of growing the process.

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
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                r = self.listener.accept() => match r {
                    Ok((stream, peer)) => return Some(Accepted { stream, peer, permit }),
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
