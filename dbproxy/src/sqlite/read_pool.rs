//! The SQLite read pool: a few read-only connections (WAL lets them read
//! next to the writer), each read on a blocking thread.

use std::path::Path;
use std::sync::{Arc, Mutex};

use chat_admin::sync::lock;
use rusqlite::Connection;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{from_sqlite, internal};
use crate::schema;
use crate::writer::JobResult;
use chat_storage_api::ApiError;

/// Read-only connections; the semaphore bounds concurrent reads to the pool size.
///
/// Invariant: a connection taken from the pool comes back on every path. It
/// travels inside a [`Lease`], which puts it back (and only then releases the
/// permit) when dropped: after the read, when the blocking task unwinds
/// from a panic, or when the task is dropped unrun. The caller's future may
/// be dropped at any await (a client that resets its HTTP request drops the
/// handler); the lease is not in it but in the blocking task.
pub(super) struct ReadPool {
    pub(super) permits: Arc<Semaphore>,
    // std Mutex: held only to push/pop a connection, never across an await.
    conns: Arc<Mutex<Vec<Connection>>>,
}

/// A connection out of the pool, with the permit that accounts for it.
struct Lease {
    conn: Option<Connection>,
    conns: Arc<Mutex<Vec<Connection>>>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            let mut pool = lock(&self.conns);
            pool.push(conn);
        }
        // `_permit` is released after this body: the next reader finds the
        // connection back in the pool.
    }
}

impl ReadPool {
    pub(super) fn open(path: &Path, n: usize) -> rusqlite::Result<Self> {
        let conns = (0..n)
            .map(|_| schema::open_reader(path))
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(ReadPool {
            permits: Arc::new(Semaphore::new(n)),
            conns: Arc::new(Mutex::new(conns)),
        })
    }

    pub(super) async fn read<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> JobResult<T> + Send + 'static,
    {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| internal("read pool closed"))?;
        let conn = lock(&self.conns)
            .pop()
            .ok_or_else(|| internal("read pool empty"))?;
        let lease = Lease {
            conn: Some(conn),
            conns: self.conns.clone(),
            _permit: permit,
        };
        let done = tokio::task::spawn_blocking(move || {
            // The whole lease moves here and is dropped at the end, also
            // when `f` panics.
            let lease = lease;
            f(lease.conn.as_ref().expect("a lease holds its connection"))
        })
        .await;
        match done {
            Ok(result) => result.map_err(|e| from_sqlite(&e))?,
            Err(e) => Err(internal(format!("read task failed: {e}"))),
        }
    }

    #[cfg(test)]
    fn idle(&self) -> usize {
        self.conns.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_storage_api::ErrorKind;

    /// Many more concurrent reads than connections: each waits for one and
    /// none finds the pool empty (a permit used to come back before its
    /// connection did, and the next reader failed with "read pool empty").
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_beyond_the_pool_size_wait_for_a_connection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chat.db");
        drop(schema::open_writer(&path).unwrap());
        let pool = Arc::new(ReadPool::open(&path, 2).unwrap());
        let mut reads = Vec::new();
        for _ in 0..200 {
            let pool = pool.clone();
            reads.push(tokio::spawn(async move {
                pool.read(|c| Ok(Ok(c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))?)))
                    .await
            }));
        }
        for r in reads {
            assert_eq!(r.await.unwrap().unwrap(), 1);
        }
    }

    fn pool(dir: &tempfile::TempDir, n: usize) -> Arc<ReadPool> {
        let path = dir.path().join("chat.db");
        drop(schema::open_writer(&path).unwrap());
        Arc::new(ReadPool::open(&path, n).unwrap())
    }

    async fn select_one(pool: &ReadPool) -> Result<i64, ApiError> {
        let read = pool.read(|c| Ok(Ok(c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))?)));
        tokio::time::timeout(std::time::Duration::from_secs(5), read)
            .await
            .expect("a read waited 5 s for a connection: the pool lost one")
    }

    async fn wait_idle(pool: &ReadPool, n: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while pool.idle() != n {
            assert!(
                std::time::Instant::now() < deadline,
                "{} of {n} connections back in the pool",
                pool.idle()
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// A caller that goes away while its read runs (an HTTP request reset
    /// mid-read drops the handler's future) must not take the connection
    /// with it: it used to, and after `read_connections` such resets every
    /// read failed with "read pool empty" until a restart.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_cancelled_mid_flight_give_their_connection_back() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool(&dir, 2);
        for _ in 0..3 {
            let mut releases = Vec::new();
            let mut reads = Vec::new();
            for _ in 0..2 {
                let (started_tx, started) = tokio::sync::oneshot::channel::<()>();
                let (release, released) = std::sync::mpsc::channel::<()>();
                let p = pool.clone();
                reads.push(tokio::spawn(async move {
                    p.read(move |_| {
                        let _ = started_tx.send(());
                        let _ = released.recv();
                        Ok(Ok(()))
                    })
                    .await
                }));
                started.await.unwrap();
                releases.push(release);
            }
            // Both closures are running; their callers go away.
            for r in &reads {
                r.abort();
            }
            for r in reads {
                assert!(r.await.unwrap_err().is_cancelled());
            }
            drop(releases);
            wait_idle(&pool, 2).await;
        }
        for _ in 0..20 {
            assert_eq!(select_one(&pool).await.unwrap(), 1);
        }
    }

    /// A read whose closure panics fails alone; the pool keeps its size
    /// (it used to lose a connection and a permit for good).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_read_gives_its_connection_back() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool(&dir, 2);
        for _ in 0..3 {
            let read = pool.read(|_| -> JobResult<()> { panic!("a bug in a read") });
            let e = tokio::time::timeout(std::time::Duration::from_secs(5), read)
                .await
                .expect("a read waited 5 s for a connection: the pool lost one")
                .unwrap_err();
            assert_eq!(e.kind, ErrorKind::Internal);
        }
        wait_idle(&pool, 2).await;
        let reads: Vec<_> = (0..10)
            .map(|_| {
                let p = pool.clone();
                tokio::spawn(async move { select_one(&p).await })
            })
            .collect();
        for r in reads {
            assert_eq!(r.await.unwrap().unwrap(), 1);
        }
    }
}
