//! [`LogThrottle`]: at most one log line a second for an event that whoever
//! reaches a port can cause as often as it connects (refused handshakes,
//! refused credentials). A metric counts every event; the log only says that
//! they happen and how many went unsaid.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines at most once per this.
const EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub struct LogThrottle {
    /// When a line was last let through; a `std` mutex held only to compare
    /// and set it, never across an await.
    last: Mutex<Option<Instant>>,
    /// Events not logged since the last line.
    suppressed: AtomicU64,
}

impl LogThrottle {
    /// `Some(n)` when a line may be written now, `n` being the events
    /// swallowed since the previous one; `None` to stay quiet.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut last = crate::sync::lock(&self.last);
        if last.is_some_and(|t| now.saturating_duration_since(t) < EVERY) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_second_and_the_rest_counted() {
        let t = LogThrottle::default();
        let start = Instant::now();
        assert_eq!(t.admit_at(start), Some(0));
        assert_eq!(t.admit_at(start + Duration::from_millis(10)), None);
        assert_eq!(t.admit_at(start + Duration::from_millis(900)), None);
        assert_eq!(t.admit_at(start + Duration::from_millis(1001)), Some(2));
        assert_eq!(t.admit_at(start + Duration::from_millis(1002)), None);
    }
}
