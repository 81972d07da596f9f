//! [`DbClient`]: the chat server's typed handle on the dbproxy API, over a
//! pooled HTTP/1.1 keep-alive client.

use std::sync::Arc;
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

use crate::api::*;

/// A request that takes longer has a stuck dbproxy behind it; the caller
/// retries (Unavailable) rather than waiting forever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds the requests (and so the connections) one chat server opens.
const MAX_IN_FLIGHT: usize = 512;
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
    base: String,
    http: Client<HttpConnector, Full<Bytes>>,
    in_flight: Semaphore,
}

impl std::fmt::Debug for DbClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbClient")
            .field("base", &self.inner.base)
            .finish()
    }
}

fn unavailable(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::Unavailable, message)
}

impl DbClient {
    /// `base_url` like `http://127.0.0.1:7100`.
    pub fn new(base_url: &str) -> DbClient {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(3)));
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(MAX_IN_FLIGHT)
            .build(connector);
        DbClient {
            inner: Arc::new(Inner {
                base: base_url.trim_end_matches('/').to_owned(),
                http,
                in_flight: Semaphore::new(MAX_IN_FLIGHT),
            }),
        }
    }

    async fn post<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        path: &str,
        req: &Req,
    ) -> Result<Resp, ApiError> {
        let body = serde_json::to_vec(req)
            .map_err(|e| ApiError::new(ErrorKind::Internal, format!("encoding: {e}")))?;
        let request = Request::post(format!("{}{}", self.inner.base, path))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ApiError::new(ErrorKind::Internal, format!("bad dbproxy url: {e}")))?;
        let _permit = self
            .inner
            .in_flight
            .acquire()
            .await
            .map_err(|_| unavailable("client closed"))?;
        let exchange = async {
            let resp = self
                .inner
                .http
                .request(request)
                .await
                .map_err(|e| unavailable(format!("dbproxy request failed: {e}")))?;
            let status = resp.status();
            let bytes = http_body_util::Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| unavailable(format!("dbproxy response failed: {e}")))?
                .to_bytes();
            Ok::<_, ApiError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| unavailable("dbproxy request timed out"))??;
        if status == StatusCode::OK {
            return serde_json::from_slice(&bytes).map_err(|e| {
                ApiError::new(ErrorKind::Internal, format!("bad dbproxy answer: {e}"))
            });
        }
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => Err(body.error),
            Err(_) if status.is_server_error() => {
                Err(unavailable(format!("dbproxy answered {status}")))
            }
            Err(_) if status == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::new(
                ErrorKind::BadRequest,
                "request too large for dbproxy",
            )),
            Err(_) => Err(ApiError::new(
                ErrorKind::Internal,
                format!("dbproxy answered {status}"),
            )),
        }
    }

    pub async fn login(
        &self,
        user: &str,
        password: &str,
        ttl_ms: i64,
    ) -> Result<Identity, ApiError> {
        let req = LoginReq {
            user: user.into(),
            password: password.into(),
            token_idle_ttl_ms: ttl_ms,
        };
        self.post(PATH_LOGIN, &req).await
    }

    pub async fn guest(&self, name: &str, ttl_ms: i64) -> Result<Identity, ApiError> {
        let req = GuestReq {
            name: name.into(),
            token_idle_ttl_ms: ttl_ms,
        };
        self.post(PATH_GUEST, &req).await
    }

    pub async fn resume(&self, token: &str, ttl_ms: i64) -> Result<Identity, ApiError> {
        let req = ResumeReq {
            token: token.into(),
            token_idle_ttl_ms: ttl_ms,
        };
        self.post(PATH_RESUME, &req).await
    }

    pub async fn touch(&self, tokens: Vec<String>) -> Result<(), ApiError> {
        let _: WriteAck = self.post(PATH_TOUCH, &TouchReq { tokens }).await?;
        Ok(())
    }

    pub async fn join(&self, room: &str, user: &str) -> Result<JoinResp, ApiError> {
        let req = JoinReq {
            room: room.into(),
            user: user.into(),
        };
        self.post(PATH_JOIN, &req).await
    }

    pub async fn part(&self, room: &str, user: &str) -> Result<WriteAck, ApiError> {
        let req = PartReq {
            room: room.into(),
            user: user.into(),
        };
        self.post(PATH_PART, &req).await
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
        self.post(PATH_USER_ROOMS, &req).await
    }

    pub async fn rooms(&self, limit: u32, min_pos: Option<String>) -> Result<RoomList, ApiError> {
        self.post(PATH_ROOMS, &RoomsReq { limit, min_pos }).await
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
        self.post(PATH_ROOM_INFO, &req).await
    }

    pub async fn append(&self, items: Vec<AppendItem>) -> Result<AppendResp, ApiError> {
        self.post(PATH_APPEND, &AppendReq { items }).await
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
        self.post(PATH_HISTORY, &req).await
    }

    pub async fn send_dms(&self, items: Vec<DmItem>) -> Result<SendDmsResp, ApiError> {
        self.post(PATH_SEND_DMS, &SendDmsReq { items }).await
    }

    pub async fn pending_dms(&self, user: &str, limit: u32) -> Result<PendingDmsResp, ApiError> {
        let req = PendingDmsReq {
            user: user.into(),
            limit,
        };
        self.post(PATH_PENDING_DMS, &req).await
    }

    pub async fn mark_received(&self, ids: Vec<i64>) -> Result<WriteAck, ApiError> {
        self.post(PATH_MARK_RECEIVED, &MarkReceivedReq { ids })
            .await
    }
}
