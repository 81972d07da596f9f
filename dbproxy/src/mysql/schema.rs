//! The MySQL/MariaDB schema: the same tables as SQLite (`crate::schema`) plus
//! `heartbeat`, InnoDB, created on the primary only (replicas get it through
//! replication). Names compare byte-wise (`utf8mb4_bin`), as in SQLite.

use mysql_async::prelude::Queryable;
use mysql_async::Conn;

const TABLES: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS users (
        id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        name VARCHAR(255) COLLATE utf8mb4_bin NOT NULL,
        password_hash VARCHAR(255) NULL,
        guest TINYINT NOT NULL,
        created_at BIGINT NOT NULL,
        UNIQUE KEY users_name (name)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    "CREATE TABLE IF NOT EXISTS tokens (
        token_hash BINARY(32) NOT NULL PRIMARY KEY,
        user_id BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        last_used_ms BIGINT NOT NULL,
        KEY tokens_user (user_id, last_used_ms),
        FOREIGN KEY (user_id) REFERENCES users(id)
    ) ENGINE=InnoDB",
    "CREATE TABLE IF NOT EXISTS rooms (
        id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        name VARCHAR(255) COLLATE utf8mb4_bin NOT NULL,
        last_seq BIGINT NOT NULL DEFAULT 0,
        created_at BIGINT NOT NULL,
        UNIQUE KEY rooms_name (name)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    "CREATE TABLE IF NOT EXISTS memberships (
        room_id BIGINT NOT NULL,
        user_id BIGINT NOT NULL,
        joined_at BIGINT NOT NULL,
        PRIMARY KEY (room_id, user_id),
        KEY memberships_user (user_id),
        FOREIGN KEY (room_id) REFERENCES rooms(id),
        FOREIGN KEY (user_id) REFERENCES users(id)
    ) ENGINE=InnoDB",
    // Room messages (room_id, seq set) and DMs (recipient_id set) share one
    // table, so (sender, client_id) idempotency spans both.
    "CREATE TABLE IF NOT EXISTS messages (
        id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        room_id BIGINT NULL,
        seq BIGINT NULL,
        sender_id BIGINT NOT NULL,
        recipient_id BIGINT NULL,
        client_id VARCHAR(255) COLLATE utf8mb4_bin NULL,
        sent_at_ms BIGINT NOT NULL,
        received_at_ms BIGINT NULL,
        body MEDIUMTEXT NOT NULL,
        UNIQUE KEY messages_room_seq (room_id, seq),
        UNIQUE KEY messages_client (sender_id, client_id),
        KEY messages_pending (recipient_id, received_at_ms),
        FOREIGN KEY (room_id) REFERENCES rooms(id),
        FOREIGN KEY (sender_id) REFERENCES users(id),
        FOREIGN KEY (recipient_id) REFERENCES users(id)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    // One row, written by every dbproxy's health loop on the primary; its age
    // on a replica is that replica's lag.
    "CREATE TABLE IF NOT EXISTS heartbeat (
        id TINYINT NOT NULL PRIMARY KEY,
        ts_ms BIGINT NOT NULL
    ) ENGINE=InnoDB",
];

/// Creates missing tables. Several dbproxies may start at once: a named lock
/// serialises them (the DDL is idempotent anyway).
pub(crate) async fn migrate(conn: &mut Conn) -> mysql_async::Result<()> {
    let _: Option<Option<i64>> = conn
        .query_first("SELECT GET_LOCK('chat_dbproxy_migrate', 30)")
        .await?;
    let mut result = Ok(());
    for sql in TABLES {
        if let Err(e) = conn.query_drop(*sql).await {
            result = Err(e);
            break;
        }
    }
    let _: Option<Option<i64>> = conn
        .query_first("SELECT RELEASE_LOCK('chat_dbproxy_migrate')")
        .await?;
    result
}
