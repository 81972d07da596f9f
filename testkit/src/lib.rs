//! Test helpers shared by every tier's tests (dev-dependency only, never in
//! a product binary): waiting for a condition with a deadline instead of
//! sleeping a guessed time.
//!
//! [`wait_until`] polls an async condition and panics naming what it waited
//! for; [`poll_until`] is the same returning whether it held; [`wait_for`]
//! polls until a value is there and returns it; [`within`]
//! bounds one future; [`blocking::wait_until`] is for tests that drive
//! processes from plain threads.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// How often a condition is checked again.
const POLL: Duration = Duration::from_millis(20);

/// Polls `cond` every 20 ms until it is true; `false` once `limit` passed
/// without it.
pub async fn poll_until<F, Fut>(limit: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = Instant::now() + limit;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `cond` every 20 ms until it is true; panics naming `what` after
/// `limit`.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    if !poll_until(limit, cond).await {
        panic!("timed out after {limit:?} waiting until {what}");
    }
}

/// Polls `get` every 20 ms until it has a value and returns it; panics
/// naming `what` after `limit`.
pub async fn wait_for<T, F, Fut>(limit: Duration, what: &str, mut get: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = Instant::now() + limit;
    loop {
        if let Some(v) = get().await {
            return v;
        }
        assert!(
            Instant::now() < end,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Runs `fut` with a deadline; panics naming `what` when it runs out.
pub async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// For tests on plain threads (processes in network namespaces).
pub mod blocking {
    use std::time::{Duration, Instant};

    /// Checks `ok` every 100 ms until it holds and returns how long that
    /// took; panics naming `what` after `limit`.
    pub fn wait_until(limit: Duration, what: &str, mut ok: impl FnMut() -> bool) -> Duration {
        let start = Instant::now();
        while !ok() {
            assert!(start.elapsed() < limit, "timed out after {limit:?}: {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
        start.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[tokio::test(start_paused = true)]
    async fn waits_until_the_condition_holds() {
        let start = Instant::now();
        let n = Cell::new(0);
        wait_until(Duration::from_secs(1), "three polls", || async {
            n.set(n.get() + 1);
            n.get() == 3
        })
        .await;
        assert_eq!(start.elapsed(), 2 * POLL);
        assert!(!poll_until(Duration::from_millis(100), || async { false }).await);
        let n = Cell::new(0);
        let got = wait_for(Duration::from_secs(1), "a value", || async {
            n.set(n.get() + 1);
            (n.get() == 2).then_some("v")
        })
        .await;
        assert_eq!(got, "v");
        assert_eq!(
            within(Duration::from_secs(1), "ready", async { 5 }).await,
            5
        );
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "waiting until never")]
    async fn names_what_it_waited_for() {
        wait_until(Duration::from_millis(50), "never", || async { false }).await;
    }

    #[test]
    fn blocking_returns_the_time_taken() {
        let mut n = 0;
        let took = blocking::wait_until(Duration::from_secs(5), "two checks", || {
            n += 1;
            n == 2
        });
        assert!(took >= Duration::from_millis(100));
    }
}
