//! The per-connection rate limit: a token bucket of commands, and the
//! connection closed once it keeps sending while limited.

use std::time::Instant;

/// What to do with a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Run,
    /// Over the rate: answer `ERR RATE_LIMITED`, do not run it.
    Refuse,
    /// Over the rate `kick_after` times in a row: close the connection.
    Kick,
}

pub struct Limiter {
    bucket: TokenBucket,
    limited_in_a_row: u32,
    kick_after: u32,
}

impl Limiter {
    /// `rate` commands a second, `burst` at once; closed after `kick_after`
    /// refusals in a row.
    pub fn new(rate: u32, burst: u32, kick_after: u32, now: Instant) -> Limiter {
        Limiter {
            bucket: TokenBucket::new(rate, burst, now),
            limited_in_a_row: 0,
            kick_after,
        }
    }

    pub fn admit(&mut self, now: Instant) -> Admit {
        if self.bucket.take(now) {
            self.limited_in_a_row = 0;
            return Admit::Run;
        }
        self.limited_in_a_row += 1;
        if self.limited_in_a_row >= self.kick_after {
            Admit::Kick
        } else {
            Admit::Refuse
        }
    }
}

struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u32, burst: u32, now: Instant) -> Self {
        TokenBucket {
            rate: rate as f64,
            burst: burst as f64,
            tokens: burst as f64,
            last: now,
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_passes_then_the_rate_holds() {
        let t0 = Instant::now();
        let mut l = Limiter::new(10, 3, 100, t0);
        for _ in 0..3 {
            assert_eq!(l.admit(t0), Admit::Run);
        }
        assert_eq!(l.admit(t0), Admit::Refuse);
        // 10 a second: one more after 100 ms, not before.
        assert_eq!(l.admit(t0 + Duration::from_millis(50)), Admit::Refuse);
        assert_eq!(l.admit(t0 + Duration::from_millis(150)), Admit::Run);
        assert_eq!(l.admit(t0 + Duration::from_millis(150)), Admit::Refuse);
    }

    #[test]
    fn an_idle_connection_saves_no_more_than_its_burst() {
        let t0 = Instant::now();
        let mut l = Limiter::new(10, 2, 100, t0);
        let later = t0 + Duration::from_secs(60);
        assert_eq!(l.admit(later), Admit::Run);
        assert_eq!(l.admit(later), Admit::Run);
        assert_eq!(l.admit(later), Admit::Refuse);
    }

    #[test]
    fn flooding_while_limited_closes_the_connection() {
        let t0 = Instant::now();
        let mut l = Limiter::new(1, 1, 3, t0);
        assert_eq!(l.admit(t0), Admit::Run);
        assert_eq!(l.admit(t0), Admit::Refuse);
        assert_eq!(l.admit(t0), Admit::Refuse);
        assert_eq!(l.admit(t0), Admit::Kick);
    }

    #[test]
    fn a_command_that_runs_resets_the_count() {
        let t0 = Instant::now();
        let mut l = Limiter::new(1, 1, 3, t0);
        assert_eq!(l.admit(t0), Admit::Run);
        assert_eq!(l.admit(t0), Admit::Refuse);
        assert_eq!(l.admit(t0), Admit::Refuse);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(l.admit(t1), Admit::Run);
        assert_eq!(l.admit(t1), Admit::Refuse);
        assert_eq!(l.admit(t1), Admit::Refuse);
        assert_eq!(l.admit(t1), Admit::Kick);
    }
}
