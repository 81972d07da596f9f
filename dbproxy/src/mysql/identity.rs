//! Identity rules on MySQL: which tokens are live, who holds a name,
//! registration, guest names and resume. The same rules as SQLite's
//! (`sqlite::identity`); inserts come before row locks to keep concurrent
//! first logins from deadlocking.

use mysql_async::prelude::Queryable;
use mysql_async::Conn;

use super::{name_taken, Tx};
use crate::auth;
use chat_storage_api::{ApiError, ErrorKind};

pub(super) struct UserRow {
    pub(super) id: i64,
    pub(super) password_hash: Option<String>,
    pub(super) guest: bool,
    pub(super) live: bool,
}

/// `lock`: take the row lock (inside a write transaction).
pub(super) async fn load_user(
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
            (id, now.saturating_sub(ttl)),
        )
        .await?;
    Ok(Some(UserRow {
        id,
        password_hash,
        guest: guest != 0,
        live: live.unwrap_or(0) != 0,
    }))
}

pub(super) async fn insert_token(
    c: &mut Conn,
    user: i64,
    token: &str,
    now: i64,
) -> mysql_async::Result<()> {
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

pub(super) enum Registered {
    Done,
    /// Someone registered the name between our read and our write.
    Retry,
}

pub(super) async fn register(
    c: &mut Conn,
    name: &str,
    phc: &str,
    ttl: i64,
    token: &str,
    now: i64,
) -> Tx<Registered> {
    // INSERT first and lock the existing row only when the name is taken: a
    // `FOR UPDATE` on a missing name takes a gap lock, and concurrent first
    // logins of new names then deadlock on each other's inserts.
    let inserted = c
        .exec_drop(
            "INSERT INTO users (name, password_hash, guest, created_at) VALUES (?, ?, 0, ?)",
            (name, phc, now),
        )
        .await;
    let id = match inserted {
        Ok(()) => c.last_insert_id().unwrap_or(0) as i64,
        Err(e) if !is_duplicate(&e) => return Err(e),
        Err(_) => match load_user(c, name, now, ttl, true).await? {
            None | Some(UserRow { guest: false, .. }) => return Ok(Ok(Registered::Retry)),
            Some(UserRow { live: true, .. }) => return Ok(Err(name_taken(name))),
            Some(UserRow { id, .. }) => {
                forget_holder(c, id).await?;
                c.exec_drop(
                    "UPDATE users SET password_hash = ?, guest = 0 WHERE id = ?",
                    (phc, id),
                )
                .await?;
                id
            }
        },
    };
    insert_token(c, id, token, now).await?;
    Ok(Ok(Registered::Done))
}

fn is_duplicate(e: &mysql_async::Error) -> bool {
    matches!(e, mysql_async::Error::Server(s) if s.code == 1062)
}

pub(super) async fn take_guest(
    c: &mut Conn,
    name: &str,
    ttl: i64,
    token: &str,
    now: i64,
) -> Tx<()> {
    // INSERT first, as in `register`.
    let inserted = c
        .exec_drop(
            "INSERT INTO users (name, password_hash, guest, created_at) VALUES (?, NULL, 1, ?)",
            (name, now),
        )
        .await;
    let id = match inserted {
        Ok(()) => c.last_insert_id().unwrap_or(0) as i64,
        Err(e) if !is_duplicate(&e) => return Err(e),
        Err(_) => match load_user(c, name, now, ttl, true).await? {
            None | Some(UserRow { guest: false, .. }) | Some(UserRow { live: true, .. }) => {
                return Ok(Err(name_taken(name)))
            }
            Some(UserRow { id, .. }) => {
                forget_holder(c, id).await?;
                id
            }
        },
    };
    insert_token(c, id, token, now).await?;
    Ok(Ok(()))
}

pub(super) async fn resume_tx(c: &mut Conn, hash: &[u8], ttl: i64, now: i64) -> Tx<(String, bool)> {
    let row: Option<(String, i64, i64)> = c
        .exec_first(
            "SELECT u.name, u.guest, t.last_used_ms FROM tokens t
             JOIN users u ON u.id = t.user_id WHERE t.token_hash = ? FOR UPDATE",
            (hash,),
        )
        .await?;
    let invalid = || ApiError::new(ErrorKind::TokenInvalid, "unknown or expired token");
    let Some((name, guest, last_used)) = row else {
        return Ok(Err(invalid()));
    };
    if now.saturating_sub(last_used) > ttl {
        return Ok(Err(invalid()));
    }
    c.exec_drop(
        "UPDATE tokens SET last_used_ms = GREATEST(last_used_ms, ?) WHERE token_hash = ?",
        (now, hash),
    )
    .await?;
    Ok(Ok((name, guest != 0)))
}
