//! The API over HTTP: served by `chat_admin::http::serve` (accept, time and
//! connection bounds; with `tls`, mutual TLS from chat servers only, see
//! `tls`), the bearer-token check (`credential`) and the router from API
//! paths to [`Backend`] calls. Besides the API this port answers `/readyz`
//! and `/healthz` (the chat servers probe it, and may reach no other dbproxy
//! port) without a token; a wrong token is refused there too, so that a
//! chat server's probe tells it that its token is not accepted. `/metrics`
//! is on the admin port only.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chat_admin::accept::Acceptor;
use chat_admin::http::Plain;
use chat_admin::throttle::LogThrottle;
use chat_admin::{Health, HttpLimits};
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::backend::Backend;
use crate::credential::{Tokens, Verdict};
use crate::metrics::Metrics;
use crate::tls::ApiTls;
use chat_storage_api::{self as api, ApiError, ErrorBody, ErrorKind};

pub(crate) struct Shared {
    pub backend: Arc<dyn Backend>,
    pub metrics: Arc<Metrics>,
    pub health: Health,
    pub max_body_bytes: usize,
    pub tokens: Arc<Tokens>,
    /// Refused tokens are logged at most once a second.
    pub unauthorized_log: LogThrottle,
}

/// Serves the API on `listener` (bounded as `limits` says, through the one
/// HTTP mechanism every tier uses; over mutual TLS when `tls` is given)
/// until `shutdown`, then gives open connections `grace` to finish.
pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    limits: HttpLimits,
    tls: Option<ApiTls>,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let acceptor = Acceptor::new(listener, limits.max_connections);
    let handler = move |req| {
        let shared = shared.clone();
        async move { handle(&shared, req).await }
    };
    match tls {
        Some(tls) => chat_admin::http::serve(acceptor, limits, tls, handler, shutdown, grace).await,
        None => chat_admin::http::serve(acceptor, limits, Plain, handler, shutdown, grace).await,
    }
}

/// The 401 of a request whose token is missing or not accepted: counted,
/// logged at most once a second (never the token), the API's error body.
fn unauthorized(shared: &Shared, verdict: Verdict, path: &'static str) -> Response<Full<Bytes>> {
    let reason = if verdict == Verdict::Missing {
        "missing"
    } else {
        "wrong"
    };
    shared
        .metrics
        .unauthorized
        .with_label_values(&[reason])
        .inc();
    if let Some(suppressed) = shared.unauthorized_log.admit() {
        tracing::warn!(
            path,
            reason,
            suppressed,
            "refused an API request: bearer token missing or not accepted"
        );
    }
    let mut resp = error_response(
        StatusCode::UNAUTHORIZED,
        ApiError::new(
            ErrorKind::Unauthorized,
            "bearer token missing or not accepted",
        ),
    );
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    resp
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

fn error_response(status: StatusCode, error: ApiError) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(&ErrorBody { error }).unwrap_or_default();
    json_response(status, body)
}

async fn call<Req, Resp, Fut>(body: &[u8], f: impl FnOnce(Req) -> Fut) -> Result<Vec<u8>, ApiError>
where
    Req: DeserializeOwned,
    Resp: Serialize,
    Fut: Future<Output = Result<Resp, ApiError>>,
{
    let req: Req = serde_json::from_slice(body)
        .map_err(|e| ApiError::new(ErrorKind::BadRequest, format!("bad request body: {e}")))?;
    let resp = f(req).await?;
    serde_json::to_vec(&resp).map_err(|e| crate::error::internal(format!("encoding: {e}")))
}

/// Every API path (the order is the fuzz target's path selector).
pub(crate) const API_PATHS: [&str; 14] = {
    use api::*;
    [
        PATH_LOGIN,
        PATH_GUEST,
        PATH_RESUME,
        PATH_TOUCH,
        PATH_JOIN,
        PATH_PART,
        PATH_USER_ROOMS,
        PATH_ROOMS,
        PATH_ROOM_INFO,
        PATH_APPEND,
        PATH_HISTORY,
        PATH_SEND_DMS,
        PATH_PENDING_DMS,
        PATH_MARK_RECEIVED,
    ]
};

/// The label for a path: API paths as themselves, everything else "other"
/// (keeps the metric's cardinality bounded).
fn path_label(path: &str) -> &'static str {
    API_PATHS
        .into_iter()
        .find(|p| *p == path)
        .unwrap_or("other")
}

async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let verdict = shared
        .tokens
        .check(req.headers().get(header::AUTHORIZATION));
    // Never `/metrics` here: that is for whoever may reach the admin port.
    // Health is open to probes without a token; a token that is presented
    // is checked, which is how a chat server learns that its token is
    // refused before a client's request fails on it.
    if let Some(resp) = chat_admin::respond_health(&path, &shared.health) {
        if verdict == Verdict::Wrong {
            return unauthorized(shared, verdict, "health");
        }
        return resp;
    }
    if !verdict.allowed() {
        return unauthorized(shared, verdict, path_label(&path));
    }
    let label = path_label(&path);
    if label == "other" {
        return error_response(
            StatusCode::NOT_FOUND,
            ApiError::new(ErrorKind::BadRequest, "no such path"),
        );
    }
    let started = Instant::now();
    let (_status, outcome, resp) = match dispatch(shared, label, req).await {
        Ok(body) => (StatusCode::OK, "ok", json_response(StatusCode::OK, body)),
        Err((status, e)) => {
            let kind = e.kind.as_str();
            shared.metrics.errors.with_label_values(&[kind]).inc();
            if status.is_server_error() {
                // The message is the storage's (no request data, no secrets).
                tracing::warn!(path = label, status = status.as_u16(), error = %e.message, "request failed");
            }
            (status, kind, error_response(status, e))
        }
    };
    shared
        .metrics
        .requests
        .with_label_values(&[label, outcome])
        .inc();
    shared
        .metrics
        .request_duration
        .with_label_values(&[label])
        .observe(started.elapsed().as_secs_f64());
    resp
}

async fn dispatch(
    shared: &Shared,
    path: &'static str,
    req: Request<Incoming>,
) -> Result<Vec<u8>, (StatusCode, ApiError)> {
    if req.method() != Method::POST {
        return Err((
            StatusCode::METHOD_NOT_ALLOWED,
            ApiError::new(ErrorKind::BadRequest, "use POST"),
        ));
    }
    let body = match Limited::new(req.into_body(), shared.max_body_bytes)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return Err((
                StatusCode::PAYLOAD_TOO_LARGE,
                ApiError::new(ErrorKind::BadRequest, "request body too large"),
            ))
        }
        Err(e) => {
            return Err((
                StatusCode::BAD_REQUEST,
                ApiError::new(ErrorKind::BadRequest, format!("reading body: {e}")),
            ))
        }
    };
    route(shared.backend.as_ref(), path, &body)
        .await
        .map_err(|e| {
            let status = StatusCode::from_u16(e.kind.http_status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            (status, e)
        })
}

/// Decodes `body` as the request of API `path` and calls its `Backend`
/// method: the JSON answer, or the error. No I/O of its own, so the request
/// decoding can be fuzzed without a socket.
pub(crate) async fn route(b: &dyn Backend, path: &str, body: &[u8]) -> Result<Vec<u8>, ApiError> {
    use api::*;
    match path {
        PATH_LOGIN => call(body, |r| b.login(r)).await,
        PATH_GUEST => call(body, |r| b.guest(r)).await,
        PATH_RESUME => call(body, |r| b.resume(r)).await,
        PATH_TOUCH => call(body, |r| b.touch(r)).await,
        PATH_JOIN => call(body, |r| b.join(r)).await,
        PATH_PART => call(body, |r| b.part(r)).await,
        PATH_USER_ROOMS => call(body, |r| b.user_rooms(r)).await,
        PATH_ROOMS => call(body, |r| b.rooms(r)).await,
        PATH_ROOM_INFO => call(body, |r| b.room_info(r)).await,
        PATH_APPEND => call(body, |r| b.append(r)).await,
        PATH_HISTORY => call(body, |r| b.history(r)).await,
        PATH_SEND_DMS => call(body, |r| b.send_dms(r)).await,
        PATH_PENDING_DMS => call(body, |r| b.pending_dms(r)).await,
        PATH_MARK_RECEIVED => call(body, |r| b.mark_received(r)).await,
        _ => Err(ApiError::new(ErrorKind::BadRequest, "no such path")),
    }
}
