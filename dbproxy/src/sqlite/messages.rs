//! Storing room messages and DMs on SQLite, inside the writer's batches.

use std::collections::{HashMap, HashSet};

use rusqlite::{params, Connection, OptionalExtension};

use super::user_id;
use crate::error::from_sqlite;
use crate::error::{no_such_room, no_such_user};
use crate::writer::{Batch, JobResult};
use chat_storage_api::*;

fn append_one(c: &Connection, b: &mut Batch, item: &AppendItem) -> JobResult<Appended> {
    let Some(sender) = user_id(c, &item.sender)? else {
        return Ok(Err(no_such_user(&item.sender)));
    };
    if let Some(cid) = &item.client_id {
        if let Some(prior) = prior_append(c, sender, cid)? {
            return Ok(prior);
        }
    }
    let next = c
        .prepare_cached(
            "UPDATE rooms SET last_seq = last_seq + 1 WHERE name = ?1 RETURNING id, last_seq",
        )?
        .query_row(params![item.room], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
        })
        .optional()?;
    let Some((room, seq)) = next else {
        return Ok(Err(no_such_room(&item.room)));
    };
    c.prepare_cached(
        "INSERT INTO messages (room_id, seq, sender_id, client_id, sent_at_ms, body)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![room, seq, sender, item.client_id, b.now, item.body])?;
    b.stored += 1;
    Ok(Ok(Appended {
        seq: seq as u64,
        ts: b.now,
        duplicate: false,
    }))
}

/// Appends a request's items. The usual request (no item repeats another's
/// client id) goes through [`append_grouped`]: one `UPDATE rooms` per room
/// and no savepoint per item; savepoints per item cost more than the inserts
/// (each copies every page it touches). Anything else, and any storage error
/// on the way, goes item by item, each in its own savepoint, as before.
pub(super) fn append_all(
    c: &Connection,
    b: &mut Batch,
    items: &[AppendItem],
) -> rusqlite::Result<Vec<Result<Appended, ApiError>>> {
    let stored = b.stored;
    c.execute_batch("SAVEPOINT grouped")?;
    match append_grouped(c, b, items) {
        Ok(Some(results)) => {
            c.execute_batch("RELEASE grouped")?;
            return Ok(results);
        }
        Ok(None) => {}
        Err(e) => tracing::debug!(error = %e, "grouped append failed; storing item by item"),
    }
    c.execute_batch("ROLLBACK TO grouped; RELEASE grouped")?;
    b.stored = stored;
    per_item(c, b, items, append_one)
}

/// Answers per item, filled in as they are known.
type Answers = Vec<Option<Result<Appended, ApiError>>>;

/// Per room, in first-seen order: the new items (index, sender id).
type ByRoom<'a> = Vec<(&'a str, Vec<(usize, i64)>)>;

/// Same results as [`append_one`] on each item in turn, or `None` (before
/// writing anything) when two items carry the same (sender, client id).
fn append_grouped(
    c: &Connection,
    b: &mut Batch,
    items: &[AppendItem],
) -> rusqlite::Result<Option<Vec<Result<Appended, ApiError>>>> {
    let mut results: Answers = vec![None; items.len()];
    let Some(rooms) = group_new(c, items, &mut results)? else {
        return Ok(None);
    };
    for (room, new) in rooms {
        store_room(c, b, items, room, new, &mut results)?;
    }
    Ok(Some(
        results
            .into_iter()
            .map(|r| r.expect("every item answered"))
            .collect(),
    ))
}

/// The items to store, by room; answers unknown senders and client ids
/// stored before. `None` when two items carry the same (sender, client id).
fn group_new<'a>(
    c: &Connection,
    items: &'a [AppendItem],
    results: &mut Answers,
) -> rusqlite::Result<Option<ByRoom<'a>>> {
    let mut users: HashMap<&str, Option<i64>> = HashMap::new();
    let mut ids: HashSet<(i64, &str)> = HashSet::new();
    let mut rooms: ByRoom<'a> = Vec::new();
    let mut room_at: HashMap<&str, usize> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        let sender = match users.get(item.sender.as_str()) {
            Some(id) => *id,
            None => {
                let id = user_id(c, &item.sender)?;
                users.insert(&item.sender, id);
                id
            }
        };
        let Some(sender) = sender else {
            results[i] = Some(Err(no_such_user(&item.sender)));
            continue;
        };
        if let Some(cid) = &item.client_id {
            if !ids.insert((sender, cid.as_str())) {
                return Ok(None);
            }
            if let Some(prior) = prior_append(c, sender, cid)? {
                results[i] = Some(prior);
                continue;
            }
        }
        let k = *room_at.entry(&item.room).or_insert_with(|| {
            rooms.push((&item.room, Vec::new()));
            rooms.len() - 1
        });
        rooms[k].1.push((i, sender));
    }
    Ok(Some(rooms))
}

/// Stores one room's new items with consecutive seqs from one `UPDATE`.
fn store_room(
    c: &Connection,
    b: &mut Batch,
    items: &[AppendItem],
    room: &str,
    new: Vec<(usize, i64)>,
    results: &mut Answers,
) -> rusqlite::Result<()> {
    let next = c
        .prepare_cached(
            "UPDATE rooms SET last_seq = last_seq + ?2 WHERE name = ?1 RETURNING id, last_seq",
        )?
        .query_row(params![room, new.len() as i64], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
        })
        .optional()?;
    let Some((room_id, last)) = next else {
        for (i, _) in new {
            results[i] = Some(Err(no_such_room(room)));
        }
        return Ok(());
    };
    let first = last - new.len() as i64 + 1;
    let mut insert = c.prepare_cached(
        "INSERT INTO messages (room_id, seq, sender_id, client_id, sent_at_ms, body)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    for (k, (i, sender)) in new.into_iter().enumerate() {
        let seq = first + k as i64;
        let item = &items[i];
        insert.execute(params![
            room_id,
            seq,
            sender,
            item.client_id,
            b.now,
            item.body
        ])?;
        b.stored += 1;
        results[i] = Some(Ok(Appended {
            seq: seq as u64,
            ts: b.now,
            duplicate: false,
        }));
    }
    Ok(())
}

/// What storing (sender, client id) again answers, if it was stored before.
fn prior_append(
    c: &Connection,
    sender: i64,
    cid: &str,
) -> rusqlite::Result<Option<Result<Appended, ApiError>>> {
    let prior = c
        .prepare_cached(
            "SELECT seq, sent_at_ms FROM messages WHERE sender_id = ?1 AND client_id = ?2",
        )?
        .query_row(params![sender, cid], |r| {
            Ok((r.get::<_, Option<i64>>(0)?, r.get::<_, i64>(1)?))
        })
        .optional()?;
    Ok(prior.map(|p| match p {
        (Some(seq), ts) => Ok(Appended {
            seq: seq as u64,
            ts,
            duplicate: true,
        }),
        (None, _) => Err(ApiError::new(
            ErrorKind::BadRequest,
            "client_id already used for a direct message",
        )),
    }))
}

pub(super) fn send_dm(c: &Connection, b: &mut Batch, item: &DmItem) -> JobResult<DmSent> {
    let Some(sender) = user_id(c, &item.sender)? else {
        return Ok(Err(no_such_user(&item.sender)));
    };
    if let Some(cid) = &item.client_id {
        let prior = c
            .prepare_cached(
                "SELECT id, sent_at_ms, recipient_id FROM messages WHERE sender_id = ?1 AND client_id = ?2",
            )?
            .query_row(params![sender, cid], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, Option<i64>>(2)?))
            })
            .optional()?;
        match prior {
            Some((id, ts, Some(_))) => {
                return Ok(Ok(DmSent {
                    id,
                    ts,
                    duplicate: true,
                }))
            }
            Some((_, _, None)) => {
                return Ok(Err(ApiError::new(
                    ErrorKind::BadRequest,
                    "client_id already used for a room message",
                )))
            }
            None => {}
        }
    }
    let Some(recipient) = user_id(c, &item.recipient)? else {
        return Ok(Err(no_such_user(&item.recipient)));
    };
    c.prepare_cached(
        "INSERT INTO messages (sender_id, recipient_id, client_id, sent_at_ms, body)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![sender, recipient, item.client_id, b.now, item.body])?;
    b.stored += 1;
    Ok(Ok(DmSent {
        id: c.last_insert_rowid(),
        ts: b.now,
        duplicate: false,
    }))
}

/// Runs `f` per item in its own savepoint, so a failing item leaves the others.
pub(super) fn per_item<I, T>(
    c: &Connection,
    b: &mut Batch,
    items: &[I],
    f: impl Fn(&Connection, &mut Batch, &I) -> JobResult<T>,
) -> rusqlite::Result<Vec<Result<T, ApiError>>> {
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        c.execute_batch("SAVEPOINT item")?;
        let stored = b.stored;
        match f(c, b, item) {
            Ok(Ok(v)) => {
                c.execute_batch("RELEASE item")?;
                out.push(Ok(v));
            }
            Ok(Err(e)) => {
                c.execute_batch("ROLLBACK TO item; RELEASE item")?;
                b.stored = stored;
                out.push(Err(e));
            }
            Err(e) => {
                tracing::warn!(error = %e, "item failed");
                c.execute_batch("ROLLBACK TO item; RELEASE item")?;
                b.stored = stored;
                out.push(Err(from_sqlite(&e)));
            }
        }
    }
    Ok(out)
}
