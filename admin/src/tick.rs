//! [`Ticker`]: the one "do this every period until stopped" loop of every
//! tier (health checks, DNS refreshes, file watchers, storage probes).
//!
//! ```ignore
//! let mut tick = Ticker::new(every, stop.clone());
//! while tick.tick().await {
//!     let Some(found) = tick.unless_stopped(probe()).await else { break };
//!     …
//! }
//! ```
//!
//! Missed ticks are delayed, not burst: a round that overran its period is
//! followed by one full period of rest, never by a catch-up volley.

use std::future::Future;
use std::time::Duration;

use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// An interval whose missed ticks are delayed rather than burst; its first
/// tick is at once. For loops that also wait on something else (a link's
/// heartbeat next to its queue).
pub fn interval(period: Duration) -> Interval {
    interval_at(Instant::now(), period)
}

/// [`interval`] whose first tick is at `start` (a phase shift that spreads
/// many clients' timers).
pub fn interval_at(start: Instant, period: Duration) -> Interval {
    let mut tick = tokio::time::interval_at(start, period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tick
}

/// Ticks every period until its token is cancelled.
#[derive(Debug)]
pub struct Ticker {
    interval: Interval,
    stop: CancellationToken,
}

impl Ticker {
    /// First tick at once.
    pub fn new(period: Duration, stop: CancellationToken) -> Ticker {
        Ticker {
            interval: interval(period),
            stop,
        }
    }

    /// First tick one period from now (the caller did the first round).
    pub fn after(period: Duration, stop: CancellationToken) -> Ticker {
        Ticker {
            interval: interval_at(Instant::now() + period, period),
            stop,
        }
    }

    /// Waits for the next tick: `true` then, `false` once stopped.
    pub async fn tick(&mut self) -> bool {
        if self.stop.is_cancelled() {
            return false;
        }
        tokio::select! {
            _ = self.interval.tick() => true,
            _ = self.stop.cancelled() => false,
        }
    }

    /// Runs one round's `work` unless stopped first (`None`): a slow probe
    /// does not hold up shutdown.
    pub async fn unless_stopped<T>(&self, work: impl Future<Output = T>) -> Option<T> {
        tokio::select! {
            r = work => Some(r),
            _ = self.stop.cancelled() => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn ticks_every_period_until_stopped() {
        let stop = CancellationToken::new();
        let start = Instant::now();
        let mut t = Ticker::new(Duration::from_secs(1), stop.clone());
        assert!(t.tick().await);
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert!(t.tick().await);
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        // A round that overran: the next tick comes a full period later.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(t.tick().await);
        assert!(t.tick().await);
        assert_eq!(start.elapsed(), Duration::from_millis(4500));
        let waiting = tokio::spawn(async move { t.tick().await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        stop.cancel();
        assert!(!waiting.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn after_waits_a_period_and_work_yields_to_stop() {
        let stop = CancellationToken::new();
        let start = Instant::now();
        let mut t = Ticker::after(Duration::from_secs(2), stop.clone());
        assert!(t.tick().await);
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        assert_eq!(t.unless_stopped(async { 7 }).await, Some(7));
        stop.cancel();
        assert_eq!(t.unless_stopped(std::future::pending::<()>()).await, None);
        assert!(!t.tick().await);
    }
}
