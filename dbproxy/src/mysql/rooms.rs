//! The MySQL transactions of a join (the per-user room limit under the
//! user's row lock) and of a batch of DMs (deduplicated by client id).

use mysql_async::prelude::Queryable;
use mysql_async::Conn;

use super::Tx;
use crate::error::{no_such_room, no_such_user, too_many_rooms};
use chat_storage_api::{ApiError, DmItem, DmSent, ErrorKind};

async fn user_id(c: &mut Conn, name: &str) -> mysql_async::Result<Option<i64>> {
    c.exec_first("SELECT id FROM users WHERE name = ?", (name,))
        .await
}

pub(super) async fn join_tx(
    c: &mut Conn,
    room: &str,
    user: &str,
    now: i64,
    max_rooms: i64,
) -> Tx<u64> {
    // The user's row lock orders the joins of one user, so two of them
    // cannot both pass the count below at the limit; the reads after it see
    // what the previous join committed.
    let Some(uid): Option<i64> = c
        .exec_first("SELECT id FROM users WHERE name = ? FOR UPDATE", (user,))
        .await?
    else {
        return Ok(Err(no_such_user(user)));
    };
    let member: Option<i64> = c
        .exec_first(
            "SELECT EXISTS(SELECT 1 FROM memberships m JOIN rooms r ON r.id = m.room_id
             WHERE r.name = ? AND m.user_id = ?)",
            (room, uid),
        )
        .await?;
    if member.unwrap_or(0) == 0 {
        let rooms: Option<i64> = c
            .exec_first("SELECT COUNT(*) FROM memberships WHERE user_id = ?", (uid,))
            .await?;
        if rooms.unwrap_or(0) >= max_rooms {
            return Ok(Err(too_many_rooms(max_rooms)));
        }
    }
    c.exec_drop(
        "INSERT IGNORE INTO rooms (name, last_seq, created_at) VALUES (?, 0, ?)",
        (room, now),
    )
    .await?;
    // A locking read: it sees the room another join committed after this
    // transaction's snapshot was taken (a plain SELECT would not, and the
    // membership would then silently fail its foreign key), and the current
    // `last_seq` rather than the snapshot's.
    let Some((rid, last_seq)): Option<(i64, i64)> = c
        .exec_first(
            "SELECT id, last_seq FROM rooms WHERE name = ? LOCK IN SHARE MODE",
            (room,),
        )
        .await?
    else {
        return Ok(Err(no_such_room(room)));
    };
    c.exec_drop(
        "INSERT IGNORE INTO memberships (room_id, user_id, joined_at) VALUES (?, ?, ?)",
        (rid, uid, now),
    )
    .await?;
    Ok(Ok(last_seq as u64))
}

pub(super) async fn send_dms_tx(
    c: &mut Conn,
    items: &[DmItem],
    now: i64,
) -> Tx<Vec<Result<DmSent, ApiError>>> {
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Some(sender) = user_id(c, &item.sender).await? else {
            out.push(Err(no_such_user(&item.sender)));
            continue;
        };
        if let Some(cid) = &item.client_id {
            let prior: Option<(i64, i64, Option<i64>)> = c
                .exec_first(
                    "SELECT id, sent_at_ms, recipient_id FROM messages
                     WHERE sender_id = ? AND client_id = ?",
                    (sender, cid.as_str()),
                )
                .await?;
            match prior {
                Some((id, ts, Some(_))) => {
                    out.push(Ok(DmSent {
                        id,
                        ts,
                        duplicate: true,
                    }));
                    continue;
                }
                Some((_, _, None)) => {
                    out.push(Err(ApiError::new(
                        ErrorKind::BadRequest,
                        "client_id already used for a room message",
                    )));
                    continue;
                }
                None => {}
            }
        }
        let Some(recipient) = user_id(c, &item.recipient).await? else {
            out.push(Err(no_such_user(&item.recipient)));
            continue;
        };
        c.exec_drop(
            "INSERT INTO messages (sender_id, recipient_id, client_id, sent_at_ms, body)
             VALUES (?, ?, ?, ?, ?)",
            (
                sender,
                recipient,
                item.client_id.as_deref(),
                now,
                item.body.as_str(),
            ),
        )
        .await?;
        out.push(Ok(DmSent {
            id: c.last_insert_id().unwrap_or(0) as i64,
            ts: now,
            duplicate: false,
        }));
    }
    Ok(Ok(out))
}
