//! The SQL of the identity rules on SQLite: reading a name's holder, adding
//! tokens, registration, guest names and resume. What each row means is
//! decided by `crate::identity`, shared with the MySQL backend. Writes run
//! in the writer's batches, which one thread applies in order, so a row read
//! in a write cannot change before that write commits.

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};

use super::SqliteBackend;
use crate::auth;
use crate::error::name_taken;
use crate::identity::{self, claim, Accounts, Claim, Claimant, Registered, UserRow};
use crate::writer::{now_ms, Batch, JobResult};
use chat_storage_api::ApiError;

fn has_live_token(c: &Connection, user: i64, now: i64, ttl: i64) -> rusqlite::Result<bool> {
    c.prepare_cached(
        "SELECT EXISTS(SELECT 1 FROM tokens WHERE user_id = ?1 AND last_used_ms >= ?2)",
    )?
    .query_row(params![user, identity::live_since(now, ttl)], |r| r.get(0))
}

fn insert_token(c: &Connection, user: i64, token: &str, now: i64) -> rusqlite::Result<()> {
    c.prepare_cached(
        "INSERT INTO tokens (token_hash, user_id, created_at, last_used_ms) VALUES (?1, ?2, ?3, ?3)",
    )?
    .execute(params![auth::token_hash(token), user, now])?;
    Ok(())
}

/// Forgets a previous holder of a name: its tokens and rooms (DMs stay).
fn forget_holder(c: &Connection, user: i64) -> rusqlite::Result<()> {
    c.prepare_cached("DELETE FROM tokens WHERE user_id = ?1")?
        .execute(params![user])?;
    c.prepare_cached("DELETE FROM memberships WHERE user_id = ?1")?
        .execute(params![user])?;
    Ok(())
}

fn load_user(c: &Connection, name: &str, now: i64, ttl: i64) -> rusqlite::Result<Option<UserRow>> {
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

/// The user `name` for `who`, following [`claim`]: its id, or why not
/// (`Ok(None)`: start the login over). `phc` is `None` for a guest.
fn claim_name(
    c: &Connection,
    b: &Batch,
    name: &str,
    phc: Option<&str>,
    ttl: i64,
    who: Claimant,
) -> JobResult<Option<i64>> {
    let holder = load_user(c, name, b.now, ttl)?;
    let id = match claim(holder.as_ref(), who) {
        Claim::Insert => {
            c.prepare_cached(
                "INSERT INTO users (name, password_hash, guest, created_at) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![name, phc, who == Claimant::Guest, b.now])?;
            c.last_insert_rowid()
        }
        Claim::TakeOver(id) => {
            forget_holder(c, id)?;
            if let Some(phc) = phc {
                c.prepare_cached("UPDATE users SET password_hash = ?2, guest = 0 WHERE id = ?1")?
                    .execute(params![id, phc])?;
            }
            id
        }
        Claim::Retry => return Ok(Ok(None)),
        Claim::Taken => return Ok(Err(name_taken(name))),
    };
    Ok(Ok(Some(id)))
}

/// A guest start: the name (free or an expired guest's) and a token.
pub(super) fn take_guest(
    c: &Connection,
    b: &mut Batch,
    name: &str,
    ttl: i64,
    token: &str,
) -> JobResult<()> {
    match claim_name(c, b, name, None, ttl, Claimant::Guest)? {
        Ok(Some(id)) => insert_token(c, id, token, b.now).map(Ok),
        Ok(None) => Ok(Err(name_taken(name))),
        Err(e) => Ok(Err(e)),
    }
}

/// A resume: the token's user and whether a guest, its last use now.
pub(super) fn resume(
    c: &Connection,
    b: &mut Batch,
    hash: &[u8],
    ttl: i64,
) -> JobResult<(String, bool)> {
    let row = c
        .prepare_cached(
            "SELECT u.name, u.guest, t.last_used_ms FROM tokens t
             JOIN users u ON u.id = t.user_id WHERE t.token_hash = ?1",
        )?
        .query_row(params![hash], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let session = match identity::resume(row, b.now, ttl) {
        Ok(session) => session,
        Err(e) => return Ok(Err(e)),
    };
    c.prepare_cached("UPDATE tokens SET last_used_ms = ?2 WHERE token_hash = ?1")?
        .execute(params![hash, b.now])?;
    Ok(Ok(session))
}

#[async_trait]
impl Accounts for SqliteBackend {
    async fn user(&self, name: &str) -> Result<Option<UserRow>, ApiError> {
        let (name, now, ttl) = (name.to_owned(), now_ms(), self.ttl_ms);
        self.readers
            .read(move |c| load_user(c, &name, now, ttl).map(Ok))
            .await
    }

    async fn add_token(&self, id: i64, token: &str) -> Result<Option<String>, ApiError> {
        let token = token.to_owned();
        self.writer
            .submit(1, move |c, b| insert_token(c, id, &token, b.now).map(Ok))
            .await?;
        Ok(None)
    }

    async fn register(&self, name: &str, phc: &str, token: &str) -> Result<Registered, ApiError> {
        let (name, phc, token, ttl) = (
            name.to_owned(),
            phc.to_owned(),
            token.to_owned(),
            self.ttl_ms,
        );
        self.writer
            .submit(1, move |c, b| {
                match claim_name(c, b, &name, Some(&phc), ttl, Claimant::Registration)? {
                    Ok(Some(id)) => {
                        insert_token(c, id, &token, b.now).map(|()| Ok(Registered::Done(None)))
                    }
                    Ok(None) => Ok(Ok(Registered::Retry)),
                    Err(e) => Ok(Err(e)),
                }
            })
            .await
    }
}
