//! Identity rules on SQLite: which tokens are live, who holds a name, and
//! registration (the MySQL backend keeps the same rules in `mysql::identity`).

use rusqlite::{params, Connection, OptionalExtension};

use super::name_taken;
use crate::auth;
use crate::writer::{Batch, JobResult};

/// A token is live while `now - last_used_ms <= ttl`.
fn has_live_token(c: &Connection, user: i64, now: i64, ttl: i64) -> rusqlite::Result<bool> {
    c.prepare_cached(
        "SELECT EXISTS(SELECT 1 FROM tokens WHERE user_id = ?1 AND last_used_ms >= ?2)",
    )?
    .query_row(params![user, now.saturating_sub(ttl)], |r| r.get(0))
}

pub(super) fn insert_token(
    c: &Connection,
    user: i64,
    token: &str,
    now: i64,
) -> rusqlite::Result<()> {
    c.prepare_cached(
        "INSERT INTO tokens (token_hash, user_id, created_at, last_used_ms) VALUES (?1, ?2, ?3, ?3)",
    )?
    .execute(params![auth::token_hash(token), user, now])?;
    Ok(())
}

/// Forgets a previous holder of a name: its tokens and rooms (DMs stay).
pub(super) fn forget_holder(c: &Connection, user: i64) -> rusqlite::Result<()> {
    c.prepare_cached("DELETE FROM tokens WHERE user_id = ?1")?
        .execute(params![user])?;
    c.prepare_cached("DELETE FROM memberships WHERE user_id = ?1")?
        .execute(params![user])?;
    Ok(())
}

pub(super) struct UserRow {
    pub(super) id: i64,
    pub(super) password_hash: Option<String>,
    pub(super) guest: bool,
    pub(super) live: bool,
}

pub(super) fn load_user(
    c: &Connection,
    name: &str,
    now: i64,
    ttl: i64,
) -> rusqlite::Result<Option<UserRow>> {
    let row = c
        .prepare_cached("SELECT id, password_hash, guest FROM users WHERE name = ?1")?
        .query_row(params![name], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, bool>(2)?,
            ))
        })
        .optional()?;
    match row {
        None => Ok(None),
        Some((id, password_hash, guest)) => Ok(Some(UserRow {
            id,
            password_hash,
            guest,
            live: has_live_token(c, id, now, ttl)?,
        })),
    }
}

pub(super) enum Registered {
    Done,
    /// Someone registered the name between our read and our write: check the
    /// password against theirs.
    Retry,
}

/// LOGIN of a name that is free, or held by a guest whose tokens all expired.
pub(super) fn register(
    c: &Connection,
    b: &mut Batch,
    name: &str,
    phc: &str,
    ttl: i64,
    token: &str,
) -> JobResult<Registered> {
    let id = match load_user(c, name, b.now, ttl)? {
        None => {
            c.prepare_cached(
                "INSERT INTO users (name, password_hash, guest, created_at) VALUES (?1, ?2, 0, ?3)",
            )?
            .execute(params![name, phc, b.now])?;
            c.last_insert_rowid()
        }
        Some(UserRow { guest: false, .. }) => return Ok(Ok(Registered::Retry)),
        Some(UserRow { live: true, .. }) => return Ok(Err(name_taken(name))),
        Some(UserRow { id, .. }) => {
            forget_holder(c, id)?;
            c.prepare_cached("UPDATE users SET password_hash = ?2, guest = 0 WHERE id = ?1")?
                .execute(params![id, phc])?;
            id
        }
    };
    insert_token(c, id, token, b.now)?;
    Ok(Ok(Registered::Done))
}
