//! [`Backoff`]: the one reconnect delay of every dialler (the terminal
//! client, a chat server's links to its peers, the checked workload).
//!
//! The delay doubles from `min` up to `max`, and each one is drawn at random
//! from the upper half of its step ("equal jitter"): after a restart every
//! client and peer redials at once, and without jitter they would keep
//! redialling in lockstep, each round a thundering herd. The lower half is
//! kept so that a delay never collapses to nothing.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    /// The step the next delay is drawn from.
    step: Duration,
}

impl Backoff {
    /// Delays from about `min` doubling up to `max` (`min` ≤ `max`).
    pub fn new(min: Duration, max: Duration) -> Backoff {
        let max = max.max(min);
        Backoff {
            min,
            max,
            step: min,
        }
    }

    /// The delay before the next attempt, in `[step / 2, step]` where the
    /// step doubles after each call, from `min` up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_with(&mut rand::rng())
    }

    fn next_delay_with(&mut self, rng: &mut impl Rng) -> Duration {
        let step = self.step;
        self.step = step.saturating_mul(2).min(self.max);
        let half = step / 2;
        let spread = u64::try_from((step - half).as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(rng.random_range(0..=spread))
    }

    /// After a success: the next delay is back at `min`.
    pub fn reset(&mut self) {
        self.step = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    #[test]
    fn delays_double_within_bounds_and_reset() {
        let mut b = Backoff::new(MIN, MAX);
        let mut step = MIN;
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(d >= step / 2 && d <= step, "{d:?} outside {step:?}");
            assert!(d <= MAX);
            step = (step * 2).min(MAX);
        }
        // At the cap it stays there.
        assert!(b.next_delay() >= MAX / 2);
        b.reset();
        let d = b.next_delay();
        assert!(d >= MIN / 2 && d <= MIN, "{d:?}");
    }

    #[test]
    fn jitter_spreads_clients_that_start_together() {
        // A thousand clients that lost their server at the same moment.
        let delays: Vec<Duration> = (0..1000)
            .map(|_| {
                let mut b = Backoff::new(MIN, MAX);
                (0..5).map(|_| b.next_delay()).last().unwrap()
            })
            .collect();
        let mut distinct = delays.clone();
        distinct.sort();
        distinct.dedup();
        assert!(distinct.len() > 900, "{} distinct delays", distinct.len());
        let (lo, hi) = (distinct[0], *distinct.last().unwrap());
        // Step 1.6 s: spread over most of [0.8 s, 1.6 s].
        assert!(lo < Duration::from_millis(900) && hi > Duration::from_millis(1500));
    }

    #[test]
    fn degenerate_bounds_hold() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_millis(1));
        for _ in 0..5 {
            let d = b.next_delay();
            assert!(d <= Duration::from_secs(1) && d >= Duration::from_millis(500));
        }
        let mut zero = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert_eq!(zero.next_delay(), Duration::ZERO);
    }
}
