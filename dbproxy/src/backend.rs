//! The storage interface the HTTP layer calls, implemented by SQLite
//! (`sqlite/`) and MySQL/MariaDB (`mysql/`), and what both backends share
//! besides the identity rules (`identity`): the page bound and the columns of
//! a room listing. The HTTP layer calls them through `front::Checked`, which
//! checks every request first, so a backend sees only names, ids and text
//! that pass the protocol's rules.

use async_trait::async_trait;

use chat_storage_api::*;

/// Largest page of history, rooms or pending DMs in one answer.
const MAX_PAGE: u32 = 1000;

/// A caller's page size within 1..=[`MAX_PAGE`], as an SQL parameter.
pub(crate) fn clamp_page(limit: u32) -> i64 {
    i64::from(limit.clamp(1, MAX_PAGE))
}

/// The columns of a [`RoomInfo`] (name, last seq, stored members) for a
/// query over `rooms r`; the same SQL in both dialects.
pub(crate) const ROOM_INFO_COLUMNS: &str =
    "r.name, r.last_seq, (SELECT COUNT(*) FROM memberships m WHERE m.room_id = r.id)";

#[async_trait]
pub trait Backend: Send + Sync + 'static {
    async fn login(&self, req: LoginReq) -> Result<Identity, ApiError>;
    async fn guest(&self, req: GuestReq) -> Result<Identity, ApiError>;
    async fn resume(&self, req: ResumeReq) -> Result<Identity, ApiError>;
    async fn touch(&self, req: TouchReq) -> Result<WriteAck, ApiError>;
    async fn join(&self, req: JoinReq) -> Result<JoinResp, ApiError>;
    async fn part(&self, req: PartReq) -> Result<WriteAck, ApiError>;
    async fn user_rooms(&self, req: UserRoomsReq) -> Result<RoomList, ApiError>;
    async fn rooms(&self, req: RoomsReq) -> Result<RoomList, ApiError>;
    async fn room_info(&self, req: RoomInfoReq) -> Result<RoomInfo, ApiError>;
    async fn append(&self, req: AppendReq) -> Result<AppendResp, ApiError>;
    async fn history(&self, req: HistoryReq) -> Result<HistoryResp, ApiError>;
    async fn send_dms(&self, req: SendDmsReq) -> Result<SendDmsResp, ApiError>;
    async fn pending_dms(&self, req: PendingDmsReq) -> Result<PendingDmsResp, ApiError>;
    async fn mark_received(&self, req: MarkReceivedReq) -> Result<WriteAck, ApiError>;
    /// Whether reads and writes can be served now (`/readyz` follows it).
    async fn ready(&self) -> Result<(), ApiError>;
    /// Stops taking writes, commits everything already queued, then returns.
    async fn close(&self);
}
