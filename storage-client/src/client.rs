//! [`DbClient`]: the chat server's typed handle on the dbproxy API, over a
//! pooled HTTP/1.1 keep-alive client.
//!
//! Several dbproxies may be named (`dbproxy_url = "http://a:7100,http://b:7100"`).
//! Requests go to the one that answered last; when it cannot be reached, the
//! next is tried. A request that may already have been applied is sent again
//! only if repeating it is harmless ([`Retry::Safe`]): reads, joins, parts,
//! receipts, and appends / DMs whose every item carries a client id (storage
//! dedups by (sender, client id), so a resend returns the original). Anything
//! else moves on only when the connect itself failed, i.e. the first dbproxy
//! never saw the request.
//!
//! Every request carries the server's bearer token ([`BearerToken`]); a
//! dbproxy that refuses it (401 `unauthorized`) did nothing, so the request
//! moves on like one never sent, and callers see `Unavailable`. The refusal
//! is logged at most once a second and `ready` reports it
//! ([`Probe::TokenRefused`]), so the server leaves the rings instead of
//! failing every client. `https://` URLs are dialed over mutual TLS
//! (`pool`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::bearer::BearerToken;
use crate::coalesce::{self, Coalescer, SendFn};
use crate::pool::CappedConnector;
use crate::pool::PoolOptions;
use chat_admin::throttle::LogThrottle;
use chat_storage_api::*;

/// A request that takes longer has a stuck dbproxy behind it; the caller
/// retries (Unavailable) rather than waiting forever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting to a dbproxy may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest answer read from dbproxy. The biggest legitimate one (1000 history
/// messages of at most a 4 KiB line each, or 1000 rooms) is a few MiB; this
/// guards against a misbehaving peer, not a real answer.
const MAX_RESPONSE_BYTES: usize = 32 << 20;

/// Cheap to clone: clones share the connection pool and the in-flight bound.
#[derive(Clone)]
pub struct DbClient {
    inner: Arc<Inner>,
}

struct Inner {
    /// Base URLs without a trailing slash; never empty.
    bases: Vec<String>,
    /// Index into `bases` of the dbproxy that answered last.
    current: AtomicUsize,
    http: Client<CappedConnector, Full<Bytes>>,
    in_flight: Semaphore,
    /// Appends and DMs of concurrent callers, sent together (see
    /// [`coalesce`]).
    appends: Coalescer<AppendItem, Result<Appended, ApiError>>,
    dms: Coalescer<DmItem, Result<DmSent, ApiError>>,
    token: BearerToken,
    /// 401s from a dbproxy are logged at most once a second.
    refusals: LogThrottle,
}

/// How a [`DbClient`] reaches the dbproxies besides their URLs.
#[derive(Default)]
pub struct ClientOptions {
    pub pool: PoolOptions,
    /// The chat server's identity, for `https://` URLs.
    pub tls: Option<chat_tls::Connector>,
    pub token: BearerToken,
}

/// What a readiness probe of the dbproxies found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// Some dbproxy is ready and takes this server's token.
    Ready,
    /// No dbproxy answered ready.
    NotReady,
    /// A dbproxy answered but refuses this server's token (and none took it).
    TokenRefused,
}

impl coalesce::Item for AppendItem {
    fn idempotent(&self) -> bool {
        self.client_id.is_some()
    }
    fn weight(&self) -> usize {
        64 + self.room.len() + self.sender.len() + self.body.len()
    }
}

impl coalesce::Item for DmItem {
    fn idempotent(&self) -> bool {
        self.client_id.is_some()
    }
    fn weight(&self) -> usize {
        64 + self.sender.len() + self.recipient.len() + self.body.len()
    }
}

/// How a coalescer sends: through the client, as long as it exists (the
/// coalescers' tasks hold only a weak reference, so dropping the last
/// `DbClient` ends them).
fn sender<I, O, F, Fut>(inner: &Weak<Inner>, f: F) -> SendFn<I, O>
where
    I: Send + 'static,
    F: Fn(DbClient, Vec<I>, Retry) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = coalesce::Outcome<O>> + Send + 'static,
{
    let inner = inner.clone();
    let f = Arc::new(f);
    Arc::new(move |items, safe| {
        let inner = inner.upgrade();
        let f = f.clone();
        Box::pin(async move {
            let inner = inner.ok_or_else(|| unavailable("client closed"))?;
            let retry = if safe {
                Retry::Safe
            } else {
                Retry::ConnectOnly
            };
            f(DbClient { inner }, items, retry).await
        })
    })
}

impl std::fmt::Debug for DbClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbClient")
            .field("bases", &self.inner.bases)
            .finish()
    }
}

fn unavailable(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::Unavailable, message)
}

/// Whether a request may be sent to another dbproxy after one failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Retry {
    /// Repeating it is harmless: retry on any unavailability.
    Safe,
    /// Retry only when the connect failed (the request was never sent).
    ConnectOnly,
}

/// How one attempt failed: whether the request surely never left (or was
/// refused before anything was done), and whether it was refused for the
/// token.
struct Failure {
    error: ApiError,
    not_sent: bool,
    refused: bool,
}

impl From<ApiError> for Failure {
    fn from(error: ApiError) -> Failure {
        Failure {
            error,
            not_sent: false,
            refused: false,
        }
    }
}

/// Splits a `dbproxy_url` setting into base URLs: comma-separated, blanks
/// ignored, trailing slashes dropped.
fn parse_bases(urls: &str) -> Vec<String> {
    urls.split(',')
        .map(|u| u.trim().trim_end_matches('/'))
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect()
}

impl DbClient {
    /// `base_url` like `http://127.0.0.1:7100`, or several of them separated
    /// by commas (`http://10.0.0.1:7100,http://10.0.0.2:7100`) to fail over.
    pub fn new(base_url: &str) -> DbClient {
        DbClient::with_pool(base_url, PoolOptions::default())
    }

    /// [`DbClient::new`] with the connection pool sized by `pool`: at most
    /// `pool.max_per_host` connections to each dbproxy, and as many requests
    /// in flight (a request past it waits for one to finish), idle ones
    /// closed after `pool.idle_timeout`.
    pub fn with_pool(base_url: &str, pool: PoolOptions) -> DbClient {
        DbClient::with_options(
            base_url,
            ClientOptions {
                pool,
                ..ClientOptions::default()
            },
        )
    }

    /// [`DbClient::with_pool`] with TLS for `https://` URLs and a bearer
    /// token on every request.
    pub fn with_options(base_url: &str, options: ClientOptions) -> DbClient {
        let ClientOptions { pool, tls, token } = options;
        let max = pool.max_per_host.max(1);
        let mut bases = parse_bases(base_url);
        if bases.is_empty() {
            // Fails at request time with a clear "bad dbproxy url".
            bases.push(String::new());
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(pool.idle_timeout)
            .pool_max_idle_per_host(max)
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .build(CappedConnector::new(connector, tls, max, CONNECT_TIMEOUT));
        let inner = Arc::new_cyclic(|weak| Inner {
            bases,
            current: AtomicUsize::new(0),
            http,
            in_flight: Semaphore::new(max),
            appends: Coalescer::new(sender(weak, |c, items, retry| async move {
                let r: AppendResp = c.post(PATH_APPEND, &AppendReq { items }, retry).await?;
                Ok((r.results, r.pos))
            })),
            dms: Coalescer::new(sender(weak, |c, items, retry| async move {
                let r: SendDmsResp = c.post(PATH_SEND_DMS, &SendDmsReq { items }, retry).await?;
                Ok((r.results, r.pos))
            })),
            token,
            refusals: LogThrottle::default(),
        });
        DbClient { inner }
    }

    /// Whether some dbproxy answers `GET /readyz` with 200 within `timeout`
    /// (each is asked in turn until one does) and takes this server's token.
    pub async fn ready(&self, timeout: Duration) -> bool {
        self.probe(timeout).await == Probe::Ready
    }

    /// Asks each dbproxy's `/readyz` in turn, with the token (a dbproxy
    /// refuses a wrong one there too), until one is ready.
    pub async fn probe(&self, timeout: Duration) -> Probe {
        let mut found = Probe::NotReady;
        for base in &self.inner.bases {
            let mut request = Request::get(format!("{base}/readyz"));
            if let Some(auth) = self.inner.token.header() {
                request = request.header(header::AUTHORIZATION, auth);
            }
            let Ok(request) = request.body(Full::default()) else {
                continue;
            };
            let exchange = async {
                let resp = self.inner.http.request(request).await.ok()?;
                let status = resp.status();
                // Read the (short) body so the connection can be reused.
                let _ = http_body_util::Limited::new(resp.into_body(), 4096)
                    .collect()
                    .await;
                Some(status)
            };
            match tokio::time::timeout(timeout, exchange).await {
                Ok(Some(StatusCode::OK)) => return Probe::Ready,
                Ok(Some(StatusCode::UNAUTHORIZED)) => {
                    self.token_refused(base);
                    found = Probe::TokenRefused;
                }
                _ => {}
            }
        }
        found
    }

    /// Logs (at most once a second) that `base` refused this server's token.
    fn token_refused(&self, base: &str) {
        if let Some(suppressed) = self.inner.refusals.admit() {
            tracing::warn!(
                dbproxy = %base,
                suppressed,
                "the dbproxy refused this server's bearer token (dbproxy_token / dbproxy_token_file \
                 is not among its api_tokens): storage unavailable"
            );
        }
    }

    /// The dbproxy base URLs, in failover order.
    pub fn bases(&self) -> &[String] {
        &self.inner.bases
    }

    async fn post<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        path: &str,
        req: &Req,
        retry: Retry,
    ) -> Result<Resp, ApiError> {
        let body = Bytes::from(
            serde_json::to_vec(req)
                .map_err(|e| ApiError::new(ErrorKind::Internal, format!("encoding: {e}")))?,
        );
        let _permit = self
            .inner
            .in_flight
            .acquire()
            .await
            .map_err(|_| unavailable("client closed"))?;
        let n = self.inner.bases.len();
        let first = self.inner.current.load(Ordering::Relaxed) % n;
        let mut last = unavailable("no dbproxy configured");
        // Each dbproxy once, starting with the one that answered last.
        for k in 0..n {
            let i = (first + k) % n;
            match self.attempt(&self.inner.bases[i], path, body.clone()).await {
                Ok(bytes) => {
                    if i != first {
                        tracing::info!(dbproxy = %self.inner.bases[i], "dbproxy failover");
                        self.inner.current.store(i, Ordering::Relaxed);
                    }
                    return serde_json::from_slice(&bytes).map_err(|e| {
                        ApiError::new(ErrorKind::Internal, format!("bad dbproxy answer: {e}"))
                    });
                }
                Err(f) => {
                    let next = f.error.kind == ErrorKind::Unavailable
                        && (f.not_sent || retry == Retry::Safe);
                    last = f.error;
                    if !next {
                        break;
                    }
                    tracing::debug!(dbproxy = %self.inner.bases[i], error = %last.message, "dbproxy attempt failed");
                }
            }
        }
        Err(last)
    }

    /// One request to one dbproxy: the body of a 200 answer, or why not. A
    /// refused token is sent once more if the token file changed meanwhile
    /// (a rotation the 10 s recheck has not seen yet).
    async fn attempt(&self, base: &str, path: &str, body: Bytes) -> Result<Bytes, Failure> {
        match self.attempt_once(base, path, body.clone()).await {
            Err(f) if f.refused && self.inner.token.refused() => {
                self.attempt_once(base, path, body).await
            }
            r => r,
        }
    }

    async fn attempt_once(&self, base: &str, path: &str, body: Bytes) -> Result<Bytes, Failure> {
        let mut request =
            Request::post(format!("{base}{path}")).header(header::CONTENT_TYPE, "application/json");
        if let Some(auth) = self.inner.token.header() {
            request = request.header(header::AUTHORIZATION, auth);
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| ApiError::new(ErrorKind::Internal, format!("bad dbproxy url: {e}")))?;
        let exchange = async {
            let resp = self
                .inner
                .http
                .request(request)
                .await
                .map_err(|e| Failure {
                    not_sent: e.is_connect(),
                    refused: false,
                    error: unavailable(format!("dbproxy request failed: {e}")),
                })?;
            let status = resp.status();
            let bytes = http_body_util::Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| unavailable(format!("dbproxy response failed: {e}")))?
                .to_bytes();
            Ok::<_, Failure>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| unavailable("dbproxy request timed out"))??;
        if status == StatusCode::OK {
            return Ok(bytes);
        }
        Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) if body.error.kind == ErrorKind::Unauthorized => {
                self.token_refused(base);
                // Nothing was done: another dbproxy (one that already
                // accepts a rotated token) may take it.
                return Err(Failure {
                    error: unavailable("the dbproxy refused this server's bearer token"),
                    not_sent: true,
                    refused: true,
                });
            }
            Ok(body) => body.error,
            Err(_) if status.is_server_error() => unavailable(format!("dbproxy answered {status}")),
            Err(_) if status == StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::new(ErrorKind::BadRequest, "request too large for dbproxy")
            }
            Err(_) => ApiError::new(ErrorKind::Internal, format!("dbproxy answered {status}")),
        }
        .into())
    }

    pub async fn login(
        &self,
        user: &str,
        password: &str,
        source: Option<std::net::IpAddr>,
    ) -> Result<Identity, ApiError> {
        let req = LoginReq {
            user: user.into(),
            password: password.into(),
            source: source.map(|ip| ip.to_string()),
        };
        // A login that registered the user answers the same when repeated.
        self.post(PATH_LOGIN, &req, Retry::Safe).await
    }

    pub async fn guest(&self, name: &str) -> Result<Identity, ApiError> {
        let req = GuestReq { name: name.into() };
        // A repeated guest start would find its own name taken.
        self.post(PATH_GUEST, &req, Retry::ConnectOnly).await
    }

    pub async fn resume(&self, token: &str) -> Result<Identity, ApiError> {
        let req = ResumeReq {
            token: token.into(),
        };
        self.post(PATH_RESUME, &req, Retry::Safe).await
    }

    pub async fn touch(&self, tokens: Vec<String>) -> Result<(), ApiError> {
        let _: WriteAck = self
            .post(PATH_TOUCH, &TouchReq { tokens }, Retry::Safe)
            .await?;
        Ok(())
    }

    pub async fn join(&self, room: &str, user: &str) -> Result<JoinResp, ApiError> {
        let req = JoinReq {
            room: room.into(),
            user: user.into(),
        };
        self.post(PATH_JOIN, &req, Retry::Safe).await
    }

    pub async fn part(&self, room: &str, user: &str) -> Result<WriteAck, ApiError> {
        let req = PartReq {
            room: room.into(),
            user: user.into(),
        };
        self.post(PATH_PART, &req, Retry::Safe).await
    }

    pub async fn user_rooms(
        &self,
        user: &str,
        min_pos: Option<String>,
    ) -> Result<RoomList, ApiError> {
        let req = UserRoomsReq {
            user: user.into(),
            min_pos,
        };
        self.post(PATH_USER_ROOMS, &req, Retry::Safe).await
    }

    pub async fn rooms(&self, limit: u32, min_pos: Option<String>) -> Result<RoomList, ApiError> {
        self.post(PATH_ROOMS, &RoomsReq { limit, min_pos }, Retry::Safe)
            .await
    }

    pub async fn room_info(
        &self,
        room: &str,
        min_pos: Option<String>,
    ) -> Result<RoomInfo, ApiError> {
        let req = RoomInfoReq {
            room: room.into(),
            min_pos,
        };
        self.post(PATH_ROOM_INFO, &req, Retry::Safe).await
    }

    /// Stores room messages, in one request with other callers' appends
    /// waiting at the same time.
    pub async fn append(&self, items: Vec<AppendItem>) -> Result<AppendResp, ApiError> {
        let (results, pos) = self.inner.appends.call(items).await?;
        Ok(AppendResp { results, pos })
    }

    pub async fn history(
        &self,
        room: &str,
        after: u64,
        limit: u32,
        min_pos: Option<String>,
    ) -> Result<HistoryResp, ApiError> {
        let req = HistoryReq {
            room: room.into(),
            after,
            limit,
            min_pos,
        };
        self.post(PATH_HISTORY, &req, Retry::Safe).await
    }

    /// Stores DMs, in one request with other callers' DMs waiting at the
    /// same time.
    pub async fn send_dms(&self, items: Vec<DmItem>) -> Result<SendDmsResp, ApiError> {
        let (results, pos) = self.inner.dms.call(items).await?;
        Ok(SendDmsResp { results, pos })
    }

    pub async fn pending_dms(&self, user: &str, limit: u32) -> Result<PendingDmsResp, ApiError> {
        let req = PendingDmsReq {
            user: user.into(),
            limit,
        };
        self.post(PATH_PENDING_DMS, &req, Retry::Safe).await
    }

    pub async fn mark_received(&self, ids: Vec<i64>) -> Result<WriteAck, ApiError> {
        self.post(PATH_MARK_RECEIVED, &MarkReceivedReq { ids }, Retry::Safe)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::parse_bases;

    #[test]
    fn bases_are_comma_separated() {
        assert_eq!(parse_bases("http://a:1"), ["http://a:1"]);
        assert_eq!(
            parse_bases(" http://a:1/ ,http://b:2,, "),
            ["http://a:1", "http://b:2"]
        );
        assert!(parse_bases(" , ").is_empty());
    }
}
