//! What every tier shares: the bounded accept loop ([`accept::Acceptor`]) and the
//! admin HTTP endpoint: `/metrics` (Prometheus text from an
//! explicit registry), `/healthz` (the process is alive) and `/readyz` (it
//! accepts work: not starting up, not draining).
//!
//! accept → [`http::serve`] (the one HTTP serving mechanism: time and
//! connection bounds) → [`respond`] → registry gather / health flag. The
//! dbproxy serves its API through [`http::serve`] too, and this endpoint on
//! a port of its own. [`shutdown::on_signal`] is the Ctrl-C / SIGTERM token
//! of every binary (`chat`, `chat-bench`); [`throttle::LogThrottle`] keeps
//! events a peer can repeat at will to one log line a second.
//!
//! The other mechanisms every tier shares, one copy each:
//! [`tick::Ticker`] (do this every period until stopped),
//! [`backoff::Backoff`] (jittered exponential reconnect delays),
//! [`members::Members`] (the chat servers from a static list or DNS) and
//! [`units`] (config durations in the unit their key names), and
//! [`sync::lock`], the lock-poisoning policy.

pub mod accept;
pub mod backoff;
pub mod http;
pub mod members;
pub mod shutdown;
pub mod sync;
pub mod throttle;
pub mod tick;
pub mod units;

pub use crate::http::HttpLimits;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ::http::{Response, StatusCode};
use bytes::Bytes;
use http_body_util::Full;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

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
    /// A proxy with no chat server to route to.
    NoServer = 4,
}

impl Readiness {
    /// The `/readyz` body.
    pub fn body(self) -> &'static str {
        match self {
            Readiness::Starting => "not ready: starting\n",
            Readiness::Ready => "ready\n",
            Readiness::StorageUnavailable => "not ready: storage unavailable\n",
            Readiness::Draining => "not ready: draining\n",
            Readiness::NoServer => "not ready: no chat server\n",
        }
    }

    fn from_u8(v: u8) -> Readiness {
        match v {
            1 => Readiness::Ready,
            2 => Readiness::StorageUnavailable,
            3 => Readiness::Draining,
            4 => Readiness::NoServer,
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

    /// Sets `state` unless the tier is already draining: draining is final,
    /// so a task that follows some condition cannot make a draining tier
    /// look ready again.
    pub fn follow(&self, state: Readiness) {
        let draining = Readiness::Draining as u8;
        let _ = self
            .state
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |now| {
                (now != draining).then_some(state as u8)
            });
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
    if path != "/metrics" {
        return respond_health(path, health);
    }
    let mut buf = Vec::new();
    let encoder = TextEncoder::new();
    if let Err(e) = encoder.encode(&registry.gather(), &mut buf) {
        tracing::error!(error = %e, "encoding metrics failed");
        return Some(text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "metrics encoding failed\n",
        ));
    }
    Some(
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", encoder.format_type())
            .body(Full::new(Bytes::from(buf)))
            .expect("static response parts are valid"),
    )
}

/// Answers `/healthz` and `/readyz` only (what a tier may answer on a port
/// that is not its admin port); `None` for any other path.
pub fn respond_health(path: &str, health: &Health) -> Option<Response<Full<Bytes>>> {
    let (status, body) = match path {
        "/healthz" => (StatusCode::OK, "ok\n"),
        "/readyz" => {
            let state = health.state();
            let status = if state == Readiness::Ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (status, state.body())
        }
        _ => return None,
    };
    Some(text(status, body))
}

pub fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("static response parts are valid")
}

/// Serves the admin endpoint until `shutdown`, then lets open requests finish
/// for at most `grace`.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    health: Health,
    limits: HttpLimits,
    shutdown: CancellationToken,
    grace: Duration,
) -> std::io::Result<()> {
    let acceptor = accept::Acceptor::new(listener, limits.max_connections);
    let handler = move |req: ::http::Request<hyper::body::Incoming>| {
        let resp = respond(req.uri().path(), &registry, &health)
            .unwrap_or_else(|| text(StatusCode::NOT_FOUND, "not found\n"));
        std::future::ready(resp)
    };
    http::serve(acceptor, limits, http::Plain, handler, shutdown, grace).await;
    Ok(())
}
