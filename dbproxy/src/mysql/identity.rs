//! The SQL of the identity rules on MySQL: reading a name's holder, adding
//! tokens, registration, guest names and resume. What each row means is
//! decided by `crate::identity`, shared with the SQLite backend. Inserts
//! come before row locks, which keeps concurrent first logins from
//! deadlocking (see [`claim_after_duplicate`]).

use async_trait::async_trait;
use mysql_async::prelude::Queryable;
use mysql_async::Conn;

use super::{db_err, MysqlBackend, Tx};
use crate::auth;
use crate::error::name_taken;
use crate::identity::{
    self, claim_after_duplicate, Accounts, Claim, Claimant, Registered, UserRow,
};
use crate::writer::now_ms;
use chat_storage_api::ApiError;

/// `lock`: take the row lock (inside a write transaction).
async fn load_user(
    c: &mut Conn,
    name: &str,
    now: i64,
    ttl: i64,
    lock: bool,
) -> mysql_async::Result<Option<UserRow>> {
    let sql = if lock {
        "SELECT id, password_hash, guest FROM users WHERE name = ? FOR UPDATE"
    } else {
        "SELECT id, password_hash, guest FROM users WHERE name = ?"
    };
    let row: Option<(i64, Option<String>, i64)> = c.exec_first(sql, (name,)).await?;
    let Some((id, password_hash, guest)) = row else {
        return Ok(None);
    };
    let live: Option<i64> = c
        .exec_first(
            "SELECT EXISTS(SELECT 1 FROM tokens WHERE user_id = ? AND last_used_ms >= ?)",
            (id, identity::live_since(now, ttl)),
        )
        .await?;
    Ok(Some(UserRow {
        id,
        password_hash,
        guest: guest != 0,
        live: live.unwrap_or(0) != 0,
    }))
}

async fn insert_token(c: &mut Conn, user: i64, token: &str, now: i64) -> mysql_async::Result<()> {
    c.exec_drop(
        "INSERT INTO tokens (token_hash, user_id, created_at, last_used_ms) VALUES (?, ?, ?, ?)",
        (auth::token_hash(token), user, now, now),
    )
    .await
}

/// Forgets a previous holder of a name: its tokens and rooms (DMs stay).
async fn forget_holder(c: &mut Conn, user: i64) -> mysql_async::Result<()> {
    c.exec_drop("DELETE FROM tokens WHERE user_id = ?", (user,))
        .await?;
    c.exec_drop("DELETE FROM memberships WHERE user_id = ?", (user,))
        .await
}

fn is_duplicate(e: &mysql_async::Error) -> bool {
    matches!(e, mysql_async::Error::Server(s) if s.code == 1062)
}

/// The user `name` for `who` with a new token: its insert first, and only
/// when the name is taken the holder's row, locked, judged by
/// [`claim_after_duplicate`]. `Ok(false)`: start the login over. `phc` is
/// `None` for a guest.
async fn claim_name(
    c: &mut Conn,
    name: &str,
    phc: Option<&str>,
    ttl: i64,
    token: &str,
    who: Claimant,
) -> Tx<bool> {
    let now = now_ms();
    let inserted = c
        .exec_drop(
            "INSERT INTO users (name, password_hash, guest, created_at) VALUES (?, ?, ?, ?)",
            (name, phc, who == Claimant::Guest, now),
        )
        .await;
    let id = match inserted {
        Ok(()) => c.last_insert_id().unwrap_or(0) as i64,
        Err(e) if !is_duplicate(&e) => return Err(e),
        Err(_) => {
            let holder = load_user(c, name, now, ttl, true).await?;
            match claim_after_duplicate(holder.as_ref(), who) {
                Claim::TakeOver(id) => {
                    forget_holder(c, id).await?;
                    if let Some(phc) = phc {
                        c.exec_drop(
                            "UPDATE users SET password_hash = ?, guest = 0 WHERE id = ?",
                            (phc, id),
                        )
                        .await?;
                    }
                    id
                }
                Claim::Retry => return Ok(Ok(false)),
                Claim::Taken | Claim::Insert => return Ok(Err(name_taken(name))),
            }
        }
    };
    insert_token(c, id, token, now).await?;
    Ok(Ok(true))
}

/// A guest start: the name (free or an expired guest's) and a token.
pub(super) async fn take_guest(c: &mut Conn, name: &str, ttl: i64, token: &str) -> Tx<()> {
    let claimed = claim_name(c, name, None, ttl, token, Claimant::Guest).await?;
    Ok(claimed.and_then(|done| if done { Ok(()) } else { Err(name_taken(name)) }))
}

/// A resume: the token's user and whether a guest, its last use now.
pub(super) async fn resume(c: &mut Conn, hash: &[u8], ttl: i64) -> Tx<(String, bool)> {
    let now = now_ms();
    let row: Option<(String, i64, i64)> = c
        .exec_first(
            "SELECT u.name, u.guest, t.last_used_ms FROM tokens t
             JOIN users u ON u.id = t.user_id WHERE t.token_hash = ? FOR UPDATE",
            (hash,),
        )
        .await?;
    let row = row.map(|(name, guest, last_used)| (name, guest != 0, last_used));
    let session = match identity::resume(row, now, ttl) {
        Ok(session) => session,
        Err(e) => return Ok(Err(e)),
    };
    c.exec_drop(
        "UPDATE tokens SET last_used_ms = GREATEST(last_used_ms, ?) WHERE token_hash = ?",
        (now, hash),
    )
    .await?;
    Ok(Ok(session))
}

#[async_trait]
impl Accounts for MysqlBackend {
    async fn user(&self, name: &str) -> Result<Option<UserRow>, ApiError> {
        let mut r = self.topo.primary().await?;
        load_user(&mut r.conn, name, now_ms(), self.ttl_ms, false)
            .await
            .map_err(db_err)
    }

    async fn add_token(&self, id: i64, token: &str) -> Result<Option<String>, ApiError> {
        let ((), pos) = self
            .write_tx(|c| {
                let token = token.to_owned();
                Box::pin(async move { insert_token(c, id, &token, now_ms()).await.map(Ok) })
            })
            .await?;
        Ok(pos)
    }

    async fn register(&self, name: &str, phc: &str, token: &str) -> Result<Registered, ApiError> {
        let ttl = self.ttl_ms;
        let (done, pos) = self
            .write_tx(|c| {
                let (name, phc, token) = (name.to_owned(), phc.to_owned(), token.to_owned());
                Box::pin(async move {
                    claim_name(c, &name, Some(&phc), ttl, &token, Claimant::Registration).await
                })
            })
            .await?;
        Ok(if done {
            Registered::Done(pos)
        } else {
            Registered::Retry
        })
    }
}
