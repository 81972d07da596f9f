//! Where every password hash is computed: a fixed pool of dedicated threads,
//! each reusing one argon2 memory block, behind a bounded queue.
//!
//! Why not `spawn_blocking`: each argon2 hash needs 19 MiB. Allocated per
//! hash on whichever blocking thread ran it, that memory stayed with the
//! process: glibc gives each thread its own malloc arena, and after the first
//! 19 MiB `free` it raises its mmap threshold to that size, so later blocks
//! come from the arenas and go back to them, not to the system. A burst of a
//! few hundred logins left 1–2 GB resident. Here the memory is allocated
//! once per thread (on its first hash) and reused for every hash after, so
//! the process holds `threads × 19 MiB` for hashing, whatever the load.
//!
//! A hash waits in a queue of `hash_queue` jobs; when it is full the caller
//! gets `Unavailable` at once. A job whose caller went away before a thread
//! took it is skipped.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use argon2::Block;
use prometheus::IntCounter;
use tokio::sync::oneshot;

use crate::auth;
use crate::error::{internal, unavailable};
use chat_storage_api::ApiError;

type Job = Box<dyn FnOnce(&mut Vec<Block>) + Send>;

/// Handle on the hashing threads; they end when the last handle is dropped.
pub(crate) struct HashPool {
    jobs: SyncSender<Job>,
    /// `chat_dbproxy_password_hashes_total`.
    hashes: IntCounter,
}

impl HashPool {
    /// Starts `threads` hashing threads behind a queue of `queue` jobs.
    pub(crate) fn start(
        threads: usize,
        queue: usize,
        hashes: IntCounter,
    ) -> std::io::Result<HashPool> {
        let (jobs, rx) = sync_channel::<Job>(queue);
        // std Mutex: the threads take turns waiting on the one receiver.
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || work(&rx))?;
        }
        Ok(HashPool { jobs, hashes })
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut [Block]) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let (reply, answer) = oneshot::channel();
        let hashes = self.hashes.clone();
        let job: Job = Box::new(move |memory| {
            if reply.is_closed() {
                return;
            }
            hashes.inc();
            if memory.is_empty() {
                *memory = vec![Block::default(); auth::memory_blocks()];
            }
            let _ = reply.send(f(memory));
        });
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(unavailable("password hashing queue full")),
            Err(TrySendError::Disconnected(_)) => return Err(internal("hashing threads gone")),
        }
        answer
            .await
            .map_err(|_| internal("password hashing failed"))?
    }

    /// A new PHC string for `password`.
    pub(crate) async fn hash(&self, password: Arc<String>) -> Result<String, ApiError> {
        self.run(move |m| auth::hash_password(&password, m)).await
    }

    /// Whether `password` matches the stored PHC string.
    pub(crate) async fn verify(
        &self,
        password: Arc<String>,
        phc: String,
    ) -> Result<bool, ApiError> {
        self.run(move |m| auth::verify_password(&password, &phc, m))
            .await
    }
}

fn work(rx: &Mutex<Receiver<Job>>) {
    let mut memory: Vec<Block> = Vec::new();
    loop {
        let job = match rx.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        // A panic ends the job (its caller sees the reply dropped), not the
        // thread: the pool keeps its size.
        let run = std::panic::AssertUnwindSafe(|| job(&mut memory));
        if std::panic::catch_unwind(run).is_err() {
            tracing::error!("password hashing panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter() -> IntCounter {
        IntCounter::new("t_total", "t").unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hashes_verify_and_a_full_queue_is_unavailable() {
        let pool = Arc::new(HashPool::start(1, 2, counter()).unwrap());
        let pw = Arc::new("pass word".to_string());
        let phc = pool.hash(pw.clone()).await.unwrap();
        assert!(pool.verify(pw, phc.clone()).await.unwrap());
        assert!(!pool
            .verify(Arc::new("other".into()), phc.clone())
            .await
            .unwrap());

        // One thread, two queue slots: of many at once, some are refused
        // at once and every one accepted is answered.
        let mut tasks = Vec::new();
        for _ in 0..12 {
            let (pool, phc) = (pool.clone(), phc.clone());
            tasks.push(tokio::spawn(async move {
                pool.verify(Arc::new("x".into()), phc).await
            }));
        }
        let mut refused = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(ok) => assert!(!ok),
                Err(e) => {
                    assert_eq!(e.kind, chat_storage_api::ErrorKind::Unavailable, "{e:?}");
                    refused += 1;
                }
            }
        }
        assert!(refused > 0, "a queue of 2 took 12 hashes");
    }

    #[tokio::test]
    async fn a_panicking_job_leaves_the_pool_working() {
        let pool = HashPool::start(1, 4, counter()).unwrap();
        let e = pool
            .run(|_| -> Result<(), ApiError> { panic!("boom") })
            .await
            .unwrap_err();
        assert_eq!(e.kind, chat_storage_api::ErrorKind::Internal);
        let phc = pool.hash(Arc::new("pw".into())).await.unwrap();
        assert!(pool.verify(Arc::new("pw".into()), phc).await.unwrap());
    }
}
