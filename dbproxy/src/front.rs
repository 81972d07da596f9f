//! [`Checked`]: the layer every request passes on its way from the HTTP
//! router to a backend, written once for SQLite and MySQL: the protocol's
//! rules for what may be stored (`validate`) and the failed-login limits
//! (`limiter`), checked before any storage work or password hashing.

use std::sync::Arc;

use async_trait::async_trait;

use crate::backend::Backend;
use crate::error::internal;
use crate::limiter::LoginLimiter;
use crate::validate;
use chat_storage_api::*;

pub(crate) struct Checked {
    inner: Arc<dyn Backend>,
    max_text_bytes: usize,
    limiter: LoginLimiter,
}

impl Checked {
    pub(crate) fn new(
        inner: Arc<dyn Backend>,
        max_text_bytes: usize,
        limiter: LoginLimiter,
    ) -> Self {
        Checked {
            inner,
            max_text_bytes,
            limiter,
        }
    }
}

/// The results of a batch whose items were checked one by one: each bad
/// item answers its own `BadRequest`, the others go to `store` (not called
/// when none is left) and their results are put back in request order.
async fn per_item<I, O, F, Fut>(
    items: Vec<I>,
    check: impl Fn(&I) -> Result<(), ApiError>,
    store: F,
) -> Result<(Vec<Result<O, ApiError>>, Option<String>), ApiError>
where
    F: FnOnce(Vec<I>) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<Result<O, ApiError>>, Option<String>), ApiError>>,
{
    let mut verdicts = Vec::with_capacity(items.len());
    let mut good = Vec::with_capacity(items.len());
    for item in items {
        match check(&item) {
            Ok(()) => {
                verdicts.push(None);
                good.push(item);
            }
            Err(e) => verdicts.push(Some(e)),
        }
    }
    let (stored, pos) = if good.is_empty() {
        (Vec::new(), None)
    } else {
        let n = good.len();
        let (stored, pos) = store(good).await?;
        if stored.len() != n {
            return Err(internal(format!(
                "storage answered {} results for {n} items",
                stored.len()
            )));
        }
        (stored, pos)
    };
    let mut stored = stored.into_iter();
    let results = verdicts
        .into_iter()
        .map(|v| match v {
            Some(e) => Err(e),
            None => stored.next().expect("one stored result per good item"),
        })
        .collect();
    Ok((results, pos))
}

#[async_trait]
impl Backend for Checked {
    async fn login(&self, req: LoginReq) -> Result<Identity, ApiError> {
        validate::user("user", &req.user)?;
        validate::password(&req.password)?;
        let source = validate::source(req.source.as_deref())?;
        // Before any hashing: a flood of refused logins costs no argon2 work.
        self.limiter.check(&req.user, source)?;
        let user = req.user.clone();
        let result = self.inner.login(req).await;
        if matches!(&result, Err(e) if e.kind == ErrorKind::AuthFailed) {
            self.limiter.failed(&user, source);
        }
        result
    }

    async fn guest(&self, req: GuestReq) -> Result<Identity, ApiError> {
        validate::user("name", &req.name)?;
        self.inner.guest(req).await
    }

    async fn resume(&self, req: ResumeReq) -> Result<Identity, ApiError> {
        validate::token(&req.token)?;
        self.inner.resume(req).await
    }

    async fn touch(&self, req: TouchReq) -> Result<WriteAck, ApiError> {
        for t in &req.tokens {
            validate::token(t)?;
        }
        self.inner.touch(req).await
    }

    async fn join(&self, req: JoinReq) -> Result<JoinResp, ApiError> {
        validate::room(&req.room)?;
        validate::user("user", &req.user)?;
        self.inner.join(req).await
    }

    async fn part(&self, req: PartReq) -> Result<WriteAck, ApiError> {
        validate::room(&req.room)?;
        validate::user("user", &req.user)?;
        self.inner.part(req).await
    }

    async fn user_rooms(&self, req: UserRoomsReq) -> Result<RoomList, ApiError> {
        validate::user("user", &req.user)?;
        self.inner.user_rooms(req).await
    }

    async fn rooms(&self, req: RoomsReq) -> Result<RoomList, ApiError> {
        self.inner.rooms(req).await
    }

    async fn room_info(&self, req: RoomInfoReq) -> Result<RoomInfo, ApiError> {
        validate::room(&req.room)?;
        self.inner.room_info(req).await
    }

    async fn append(&self, req: AppendReq) -> Result<AppendResp, ApiError> {
        let max = self.max_text_bytes;
        let (results, pos) = per_item(
            req.items,
            |i| validate::append_item(i, max),
            |items| async {
                let r = self.inner.append(AppendReq { items }).await?;
                Ok((r.results, r.pos))
            },
        )
        .await?;
        Ok(AppendResp { results, pos })
    }

    async fn history(&self, req: HistoryReq) -> Result<HistoryResp, ApiError> {
        validate::room(&req.room)?;
        self.inner.history(req).await
    }

    async fn send_dms(&self, req: SendDmsReq) -> Result<SendDmsResp, ApiError> {
        let max = self.max_text_bytes;
        let (results, pos) = per_item(
            req.items,
            |i| validate::dm_item(i, max),
            |items| async {
                let r = self.inner.send_dms(SendDmsReq { items }).await?;
                Ok((r.results, r.pos))
            },
        )
        .await?;
        Ok(SendDmsResp { results, pos })
    }

    async fn pending_dms(&self, req: PendingDmsReq) -> Result<PendingDmsResp, ApiError> {
        validate::user("user", &req.user)?;
        self.inner.pending_dms(req).await
    }

    async fn mark_received(&self, req: MarkReceivedReq) -> Result<WriteAck, ApiError> {
        self.inner.mark_received(req).await
    }

    async fn ready(&self) -> Result<(), ApiError> {
        self.inner.ready().await
    }

    async fn close(&self) {
        self.inner.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad(i: &u32) -> Result<(), ApiError> {
        if i % 2 == 0 {
            Ok(())
        } else {
            Err(ApiError::new(ErrorKind::BadRequest, "odd"))
        }
    }

    #[tokio::test]
    async fn bad_items_answer_alone_in_request_order() {
        let (results, pos) = per_item(vec![0u32, 1, 2, 3, 4], bad, |good| async move {
            assert_eq!(good, [0, 2, 4]);
            Ok((good.into_iter().map(Ok).collect(), Some("p".into())))
        })
        .await
        .unwrap();
        let shown: Vec<_> = results
            .iter()
            .map(|r| r.as_ref().map_err(|e| e.kind))
            .collect();
        assert_eq!(
            shown,
            [
                Ok(&0),
                Err(ErrorKind::BadRequest),
                Ok(&2),
                Err(ErrorKind::BadRequest),
                Ok(&4)
            ]
        );
        assert_eq!(pos.as_deref(), Some("p"));
        // Nothing good: storage is not asked.
        let (results, pos) = per_item(vec![1u32, 3], bad, |_| async {
            Err::<(Vec<Result<u32, ApiError>>, _), _>(internal("must not be called"))
        })
        .await
        .unwrap();
        assert_eq!(results.len(), 2);
        assert!(pos.is_none());
    }
}
