//! What every tier shares: the bounded accept loop ([`accept::Acceptor`]) and the
//! admin HTTP endpoint: `/metrics` (Prometheus text from an
//! explicit registry), `/healthz` (the process is alive) and `/readyz` (it
//! accepts work: not starting up, not draining).
//!
//! accept → hyper http1 connection → [`respond`] → registry gather / health flag.
//! Tiers that already speak HTTP (dbproxy) call [`respond`] from their own
//! service instead of running [`serve`]. [`shutdown::on_signal`] is the
//! Ctrl-C / SIGTERM token of every binary (`chat`, `chat-bench`).

pub mod accept;
pub mod shutdown;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Why a tier is or is not ready. `/readyz` answers 200 only for
/// [`Readiness::Ready`]; the other states answer 503 with their reason in
/// the body, so a health checker can tell a tier that is alive but whose
/// storage is down (every peer probably shares that fate) from one that is
/// starting, draining or gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Readiness {
    Starting = 0,
    Ready = 1,
    StorageUnavailable = 2,
    Draining = 3,
}

impl Readiness {
    /// The `/readyz` body.
    pub fn body(self) -> &'static str {
        match self {
            Readiness::Starting => "not ready: starting\n",
            Readiness::Ready => "ready\n",
            Readiness::StorageUnavailable => "not ready: storage unavailable\n",
            Readiness::Draining => "not ready: draining\n",
        }
    }

    fn from_u8(v: u8) -> Readiness {
        match v {
            1 => Readiness::Ready,
            2 => Readiness::StorageUnavailable,
            3 => Readiness::Draining,
            _ => Readiness::Starting,
        }
    }
}

/// The tier's readiness, shared by whoever decides it and the admin endpoint.
/// Starts as [`Readiness::Starting`].
#[derive(Clone, Default, Debug)]
pub struct Health {
    state: Arc<AtomicU8>,
}

impl Health {
    pub fn set(&self, state: Readiness) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    pub fn state(&self) -> Readiness {
        Readiness::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// Ready, or back to starting (tests and tiers without a finer reason).
    pub fn set_ready(&self, ready: bool) {
        self.set(if ready {
            Readiness::Ready
        } else {
            Readiness::Starting
        });
    }

    pub fn is_ready(&self) -> bool {
        self.state() == Readiness::Ready
    }
}

/// Answers the admin paths; `None` for any other path.
pub fn respond(path: &str, registry: &Registry, health: &Health) -> Option<Response<Full<Bytes>>> {
    let (status, content_type, body) = match path {
        "/metrics" => {
            let mut buf = Vec::new();
            let encoder = TextEncoder::new();
            if let Err(e) = encoder.encode(&registry.gather(), &mut buf) {
                tracing::error!(error = %e, "encoding metrics failed");
                return Some(text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "metrics encoding failed\n",
                ));
            }
            (
                StatusCode::OK,
                encoder.format_type().to_string(),
                Bytes::from(buf),
            )
        }
        "/healthz" => (
            StatusCode::OK,
            "text/plain".into(),
            Bytes::from_static(b"ok\n"),
        ),
        "/readyz" => {
            let state = health.state();
            let status = if state == Readiness::Ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (
                status,
                "text/plain".into(),
                Bytes::from_static(state.body().as_bytes()),
            )
        }
        _ => return None,
    };
    Some(
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Full::new(body))
            .expect("static response parts are valid"),
    )
}

pub fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("static response parts are valid")
}

/// Admin connections are few (scrapers, probes): this caps them anyway.
const MAX_ADMIN_CONNECTIONS: usize = 64;

/// Serves the admin endpoint until `shutdown`, then lets open requests finish
/// for at most `grace`.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    health: Health,
    shutdown: CancellationToken,
    grace: Duration,
) -> std::io::Result<()> {
    let tracker = TaskTracker::new();
    let acceptor = accept::Acceptor::new(listener, MAX_ADMIN_CONNECTIONS);
    while let Some(accept::Accepted { stream, permit, .. }) = acceptor.next(&shutdown).await {
        let (registry, health, shutdown) = (registry.clone(), health.clone(), shutdown.clone());
        tracker.spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let resp = respond(req.uri().path(), &registry, &health)
                    .unwrap_or_else(|| text(StatusCode::NOT_FOUND, "not found\n"));
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    tracker.close();
    let _ = tokio::time::timeout(grace, tracker.wait()).await;
    Ok(())
}
