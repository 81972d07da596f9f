//! Group commit. Every write becomes a [`Job`] on one bounded queue; a single
//! writer task takes everything waiting (up to `batch_max_items`), applies it
//! in ONE transaction on the writer connection (in `spawn_blocking`), commits,
//! and only then answers each job. One fsync covers the whole batch.
//!
//! Each job runs inside a savepoint, so a job that fails is undone alone and
//! the rest of the batch still commits; if the commit fails, every job in the
//! batch gets `Unavailable` (nothing was written, the caller retries).

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::{from_sqlite, unavailable};
use crate::metrics::Metrics;
use chat_storage_api::ApiError;

/// State shared by the jobs of one transaction.
pub(crate) struct Batch {
    /// Timestamp of the whole batch, ms since the Unix epoch.
    pub now: i64,
    /// Messages and DMs inserted so far (for the stored-messages counter).
    pub stored: u64,
}

type Finish = Box<dyn FnOnce(bool) + Send>;
type Apply = Box<dyn FnOnce(&Connection, &mut Batch) -> Finish + Send>;

pub(crate) struct Job {
    items: usize,
    apply: Apply,
}

/// Result of a job body: the outer error is a storage failure (the job's
/// savepoint is rolled back), the inner one an answer for the caller.
pub(crate) type JobResult<T> = rusqlite::Result<Result<T, ApiError>>;

#[derive(Clone)]
pub(crate) struct WriterHandle {
    tx: mpsc::Sender<Job>,
    metrics: Arc<Metrics>,
}

impl WriterHandle {
    /// Queues `f` for the next batch and waits until that batch committed.
    /// `items` counts toward `batch_max_items`.
    pub async fn submit<T, F>(&self, items: usize, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &mut Batch) -> JobResult<T> + Send + 'static,
    {
        let (job, answer) = job(items, f);
        self.metrics.write_queue_depth.inc();
        if let Err(e) = self.tx.try_send(job) {
            self.metrics.write_queue_depth.dec();
            return Err(match e {
                mpsc::error::TrySendError::Full(_) => unavailable("write queue full"),
                mpsc::error::TrySendError::Closed(_) => unavailable("shutting down"),
            });
        }
        answer
            .await
            .map_err(|_| unavailable("writer stopped before the write committed"))?
    }
}

impl WriterHandle {
    /// Whether the writer answers: an empty job, answered once the batch it
    /// joined committed. A full queue counts as answering (the writer is
    /// alive and working it off); a writer that stopped (its task ended, a
    /// batch panicked) does not.
    pub async fn probe(&self) -> Result<(), ApiError> {
        let (job, answer) = job(1, |_, _| Ok(Ok(())));
        self.metrics.write_queue_depth.inc();
        match self.tx.try_send(job) {
            Ok(()) => {}
            Err(e) => {
                self.metrics.write_queue_depth.dec();
                return match e {
                    mpsc::error::TrySendError::Full(_) => Ok(()),
                    mpsc::error::TrySendError::Closed(_) => Err(unavailable("the writer stopped")),
                };
            }
        }
        answer
            .await
            .map_err(|_| unavailable("the writer stopped before answering"))?
    }
}

/// Wraps `f` into a job whose answer arrives on the receiver once its batch
/// committed (or failed).
fn job<T, F>(items: usize, f: F) -> (Job, oneshot::Receiver<Result<T, ApiError>>)
where
    T: Send + 'static,
    F: FnOnce(&Connection, &mut Batch) -> JobResult<T> + Send + 'static,
{
    let (reply, answer) = oneshot::channel();
    let apply: Apply = Box::new(move |conn, batch| {
        let result = in_savepoint(conn, batch, f);
        Box::new(move |committed| {
            let result = if committed {
                result
            } else {
                Err(unavailable("commit failed; nothing was written"))
            };
            let _ = reply.send(result);
        })
    });
    let job = Job {
        items: items.max(1),
        apply,
    };
    (job, answer)
}

fn in_savepoint<T>(
    conn: &Connection,
    batch: &mut Batch,
    f: impl FnOnce(&Connection, &mut Batch) -> JobResult<T>,
) -> Result<T, ApiError> {
    if let Err(e) = conn.execute_batch("SAVEPOINT job") {
        return Err(from_sqlite(&e));
    }
    let stored_before = batch.stored;
    let result = match f(conn, batch) {
        Ok(Ok(v)) => match conn.execute_batch("RELEASE job") {
            Ok(()) => return Ok(v),
            Err(e) => Err(from_sqlite(&e)),
        },
        Ok(Err(api)) => Err(api),
        Err(e) => {
            tracing::warn!(error = %e, "write job failed");
            Err(from_sqlite(&e))
        }
    };
    batch.stored = stored_before;
    if let Err(e) = conn.execute_batch("ROLLBACK TO job; RELEASE job") {
        tracing::error!(error = %e, "rollback to savepoint failed");
    }
    result
}

/// Starts the writer task. It runs until `stop` is cancelled and the queue is
/// empty (or every handle is dropped); await the handle to know it is done.
pub(crate) fn spawn(
    conn: Connection,
    queue: usize,
    batch_max_items: usize,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> (WriterHandle, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(queue);
    let handle = WriterHandle {
        tx,
        metrics: metrics.clone(),
    };
    let task = tokio::spawn(run(conn, rx, batch_max_items, metrics, stop));
    (handle, task)
}

async fn run(
    mut conn: Connection,
    mut rx: mpsc::Receiver<Job>,
    batch_max_items: usize,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    loop {
        // `biased`: after `stop`, whatever is queued is still committed.
        let first = tokio::select! {
            biased;
            job = rx.recv() => job,
            _ = stop.cancelled() => None,
        };
        let Some(first) = first else { break };
        let mut items = first.items;
        let mut jobs = vec![first];
        while items < batch_max_items {
            match rx.try_recv() {
                Ok(job) => {
                    items += job.items;
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        metrics.write_queue_depth.sub(jobs.len() as i64);
        let m = metrics.clone();
        conn = match tokio::task::spawn_blocking(move || {
            run_batch(&conn, jobs, items, &m);
            conn
        })
        .await
        {
            Ok(conn) => conn,
            Err(e) => {
                tracing::error!(error = %e, "writer batch panicked; writer stops");
                return;
            }
        };
    }
    tracing::debug!("writer stopped");
}

fn run_batch(conn: &Connection, jobs: Vec<Job>, items: usize, metrics: &Metrics) {
    let started = Instant::now();
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        // Dropping the jobs drops their reply channels: callers see Unavailable.
        tracing::warn!(error = %e, "begin failed");
        return;
    }
    let mut batch = Batch {
        now: now_ms(),
        stored: 0,
    };
    let finishers: Vec<Finish> = jobs
        .into_iter()
        .map(|job| (job.apply)(conn, &mut batch))
        .collect();
    let committed = match conn.execute_batch("COMMIT") {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, jobs = finishers.len(), "commit failed");
            if let Err(e) = conn.execute_batch("ROLLBACK") {
                tracing::warn!(error = %e, "rollback failed");
            }
            false
        }
    };
    if committed {
        metrics.batch_items.observe(items as f64);
        metrics
            .commit_duration
            .observe(started.elapsed().as_secs_f64());
        metrics.messages_stored.inc_by(batch.stored);
    }
    for finish in finishers {
        finish(committed);
    }
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Connection {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch("CREATE TABLE t (v INTEGER NOT NULL UNIQUE)")
            .unwrap();
        c
    }

    fn metrics() -> Metrics {
        Metrics::register(&prometheus::Registry::new()).unwrap()
    }

    fn count(c: &Connection) -> i64 {
        c.query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
            .unwrap()
    }

    fn insert(v: i64) -> impl FnOnce(&Connection, &mut Batch) -> JobResult<i64> + Send {
        move |c, b| {
            c.execute("INSERT INTO t (v) VALUES (?1)", [v])?;
            b.stored += 1;
            Ok(Ok(v))
        }
    }

    #[test]
    fn failing_job_is_undone_alone() {
        let c = conn();
        let m = metrics();
        let (j1, a1) = job(1, insert(1));
        // Writes 2, then hits the UNIQUE constraint: both of its rows must go.
        let (j2, a2) = job(2, |c: &Connection, b: &mut Batch| {
            c.execute("INSERT INTO t (v) VALUES (2)", [])?;
            b.stored += 1;
            c.execute("INSERT INTO t (v) VALUES (1)", [])?;
            Ok(Ok(0i64))
        });
        let (j3, a3) = job(1, |_: &Connection, _: &mut Batch| {
            Ok(Err::<i64, _>(ApiError::new(
                chat_storage_api::ErrorKind::NoSuchRoom,
                "x",
            )))
        });
        let (j4, a4) = job(1, insert(4));
        run_batch(&c, vec![j1, j2, j3, j4], 5, &m);
        assert_eq!(a1.blocking_recv().unwrap().unwrap(), 1);
        assert_eq!(
            a2.blocking_recv().unwrap().unwrap_err().kind,
            chat_storage_api::ErrorKind::Internal
        );
        assert_eq!(
            a3.blocking_recv().unwrap().unwrap_err().kind,
            chat_storage_api::ErrorKind::NoSuchRoom
        );
        assert_eq!(a4.blocking_recv().unwrap().unwrap(), 4);
        assert_eq!(count(&c), 2);
        assert_eq!(m.messages_stored.get(), 2);
        assert_eq!(m.batch_items.get_sample_count(), 1);
    }

    #[test]
    fn failed_begin_answers_unavailable() {
        let c = conn();
        c.execute_batch("BEGIN").unwrap(); // BEGIN IMMEDIATE inside a transaction fails
        let (j, a) = job(1, insert(1));
        run_batch(&c, vec![j], 1, &metrics());
        assert!(
            a.blocking_recv().is_err(),
            "reply dropped: caller maps to Unavailable"
        );
    }

    #[tokio::test]
    async fn full_queue_is_unavailable_and_stop_drains() {
        let m = Arc::new(metrics());
        let stop = CancellationToken::new();
        let (tx, rx) = mpsc::channel(2);
        let handle = WriterHandle {
            tx,
            metrics: m.clone(),
        };
        // The writer is not running yet: two jobs fit, the third is refused.
        let h1 = handle.clone();
        let first = tokio::spawn(async move { h1.submit(1, insert(1)).await });
        let h2 = handle.clone();
        let second = tokio::spawn(async move { h2.submit(1, insert(2)).await });
        while m.write_queue_depth.get() < 2 {
            tokio::task::yield_now().await;
        }
        let e = handle.submit(1, insert(3)).await.unwrap_err();
        assert_eq!(e.kind, chat_storage_api::ErrorKind::Unavailable);
        // Stopped before it starts, the writer still commits both queued jobs.
        stop.cancel();
        run(conn(), rx, 512, m.clone(), stop).await;
        assert_eq!(first.await.unwrap().unwrap(), 1);
        assert_eq!(second.await.unwrap().unwrap(), 2);
        assert_eq!(m.write_queue_depth.get(), 0);
        assert_eq!(m.batch_items.get_sample_count(), 1, "one batch for both");
    }
}
