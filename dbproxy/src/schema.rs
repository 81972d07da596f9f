//! Opening SQLite connections and migrating the schema (versioned by
//! `PRAGMA user_version`).

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

/// Each entry moves the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE users (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    password_hash TEXT,            -- NULL for guests
    guest INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE tokens (
    token_hash BLOB PRIMARY KEY,   -- SHA-256 of the token; the token itself is never stored
    user_id INTEGER NOT NULL REFERENCES users(id),
    created_at INTEGER NOT NULL,
    last_used_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX tokens_user ON tokens(user_id, last_used_ms);
CREATE TABLE rooms (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    last_seq INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL
);
CREATE TABLE memberships (
    room_id INTEGER NOT NULL REFERENCES rooms(id),
    user_id INTEGER NOT NULL REFERENCES users(id),
    joined_at INTEGER NOT NULL,
    PRIMARY KEY (room_id, user_id)
) WITHOUT ROWID;
CREATE INDEX memberships_user ON memberships(user_id);
-- Room messages (room_id, seq set) and DMs (recipient_id set) share one table,
-- so (sender, client_id) idempotency spans both.
CREATE TABLE messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    room_id INTEGER REFERENCES rooms(id),
    seq INTEGER,
    sender_id INTEGER NOT NULL REFERENCES users(id),
    recipient_id INTEGER REFERENCES users(id),
    client_id TEXT,
    sent_at_ms INTEGER NOT NULL,
    received_at_ms INTEGER,
    body TEXT NOT NULL,
    UNIQUE (room_id, seq),
    UNIQUE (sender_id, client_id)
);
CREATE INDEX messages_pending ON messages(recipient_id, received_at_ms);
"#];

const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens the writer connection, creating the file and its parent directories,
/// and brings the schema up to date. The database holds password and token
/// hashes: a directory created here is 0700, the file 0600 (SQLite gives its
/// -wal and -shm files the database file's mode), and an existing file
/// readable by others is made 0600.
pub(crate) fn open_writer(path: &Path) -> rusqlite::Result<Connection> {
    private_file(path).map_err(|e| {
        rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
            Some(e),
        )
    })?;
    let mut conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // WAL lets readers run next to the writer; FULL because an ack promises durability.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", true)?;
    // Every job and item runs in a savepoint, and a savepoint keeps the old
    // content of each page it changes in a sub-journal: in a temporary file
    // by default (a write, and an open and close, per savepoint), in memory
    // with this. Nothing in it needs to survive a crash: the WAL does.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // The checkpointer (see `open_checkpointer`) copies the WAL into the
    // database in the background; the writer does so itself only if the WAL
    // grows past this many pages (64 MiB) because the checkpointer fell
    // behind. A checkpoint inside a commit is what made some commits take
    // 50-150 ms.
    conn.pragma_update(None, "wal_autocheckpoint", WRITER_CHECKPOINT_PAGES)?;
    migrate(&mut conn)?;
    Ok(conn)
}

const WRITER_CHECKPOINT_PAGES: i64 = 16_384;

/// Creates `path`'s missing parent directories (0700) and the file itself
/// (0600) if needed; takes group and other access away from an existing
/// database and its -wal / -shm files.
fn private_file(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() && !parent.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(|e| format!("creating {}: {e}", parent.display()))?;
        }
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("creating {}: {e}", path.display()))?;
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    let mut shm = path.as_os_str().to_owned();
    shm.push("-shm");
    for file in [path.to_path_buf(), wal.into(), shm.into()] {
        let Ok(meta) = std::fs::metadata(&file) else {
            continue;
        };
        if meta.permissions().mode() & 0o077 != 0 {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| format!("making {} private: {e}", file.display()))?;
            tracing::info!(file = %file.display(), "database file was readable by others; now 0600");
        }
    }
    Ok(())
}

/// A connection that only runs checkpoints, off the writer's path.
pub(crate) fn open_checkpointer(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // Its own commits (none) would not checkpoint, and FULL makes the
    // checkpoint fsync the database before the WAL is reused.
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(conn)
}

/// Copies committed WAL frames into the database file without blocking the
/// writer (`PASSIVE`); returns the frames still in the WAL.
pub(crate) fn checkpoint(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        let log: i64 = r.get(1)?;
        let done: i64 = r.get(2)?;
        Ok(log - done)
    })
}

pub(crate) fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "migrated schema");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn database_files_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data/sub/chat.db");
        let conn = open_writer(&path).unwrap();
        conn.execute_batch("CREATE TABLE t (v); INSERT INTO t VALUES (1);")
            .unwrap();
        let reader = open_reader(&path).unwrap();
        let _: i64 = reader
            .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode(&dir.path().join("data")), 0o700);
        assert_eq!(mode(&dir.path().join("data/sub")), 0o700);
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir.path().join("data/sub/chat.db-wal")), 0o600);
        assert_eq!(mode(&dir.path().join("data/sub/chat.db-shm")), 0o600);
        drop((conn, reader));

        // A database created world-readable before is made private.
        use std::os::unix::fs::PermissionsExt;
        let old = dir.path().join("old.db");
        drop(open_writer(&old).unwrap());
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(open_writer(&old).unwrap());
        assert_eq!(mode(&old), 0o600);
    }

    #[test]
    fn migrates_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/chat.db");
        drop(open_writer(&path).unwrap());
        let conn = open_writer(&path).unwrap();
        let v: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, MIGRATIONS.len() as i64);
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        open_reader(&path).unwrap();
        let ck = open_checkpointer(&path).unwrap();
        conn.execute_batch("CREATE TABLE t (v); INSERT INTO t VALUES (1);")
            .unwrap();
        assert_eq!(checkpoint(&ck).unwrap(), 0, "every frame copied");
    }
}
