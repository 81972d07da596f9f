//! The storage interface the HTTP layer calls, implemented by SQLite
//! (`sqlite/`) and MySQL/MariaDB (`mysql/`). The HTTP layer calls them
//! through `front::Checked`, which checks every request first, so a backend
//! sees only names, ids and text that pass the protocol's rules.

use async_trait::async_trait;

use chat_storage_api::*;

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
