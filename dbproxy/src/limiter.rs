//! Limits on failed logins, per account name and per source address, in
//! fixed memory.
//!
//! Each key (an account name, or a source: an IPv4 address, or the /64 of an
//! IPv6 one, since one host commonly holds a whole /64) has a sliding-window
//! counter: the failures of the current window of `window` seconds plus
//! those of the previous window weighted by how much of it still overlaps
//! (the usual two-bucket approximation of a sliding window, exact enough
//! for a limit and 16 bytes a key). A login is refused before any password
//! hashing once either count reached its limit. Only failures count: a
//! successful login adds nothing.
//!
//! Memory: each table holds at most `capacity` keys. Entries are added only
//! on a failure, so a full table is refilled at the rate passwords can be
//! checked (a few hundred a second at most). When full, entries whose
//! windows are over are swept out (at most once a second); if none are, an
//! arbitrary entry is dropped. An attacker can make the table forget a key
//! only by spending `capacity` full password checks, while the per-source
//! limit holds each source to its few.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus::IntCounterVec;

use chat_admin::sync::lock;
use chat_storage_api::{ApiError, ErrorKind};

#[derive(Clone, Copy, Default)]
struct Entry {
    /// Index of the window `current` counts.
    window: u64,
    previous: u32,
    current: u32,
}

impl Entry {
    /// Moves the buckets to window `now`.
    fn roll(&mut self, now: u64) {
        match now.saturating_sub(self.window) {
            0 => {}
            1 => {
                self.previous = self.current;
                self.current = 0;
            }
            _ => {
                self.previous = 0;
                self.current = 0;
            }
        }
        self.window = now;
    }
}

struct Table {
    // std Mutex: held for one map operation, never across an await.
    entries: Mutex<HashMap<Box<str>, Entry>>,
    capacity: usize,
    limit: u32,
    last_sweep: Mutex<Option<Instant>>,
}

/// Where in the windows a moment falls.
#[derive(Clone, Copy)]
struct At {
    window: u64,
    /// Fraction of the current window already past, 0..1.
    elapsed: f64,
}

impl Table {
    fn new(capacity: usize, limit: u32) -> Table {
        Table {
            entries: Mutex::new(HashMap::new()),
            capacity,
            limit,
            last_sweep: Mutex::new(None),
        }
    }

    /// Seconds until `key` may try again, if it is over the limit now.
    fn blocked(&self, key: &str, at: At, window_secs: f64) -> Option<u64> {
        let mut entries = lock(&self.entries);
        let e = entries.get_mut(key)?;
        e.roll(at.window);
        let limit = f64::from(self.limit);
        let (prev, cur) = (f64::from(e.previous), f64::from(e.current));
        if prev * (1.0 - at.elapsed) + cur < limit {
            return None;
        }
        // When the weighted count falls below the limit again: in this
        // window, or (with `current` alone at the limit) in the next one.
        let wait = if cur >= limit {
            (1.0 - at.elapsed) + (1.0 - limit / cur)
        } else {
            (1.0 - (limit - cur) / prev) - at.elapsed
        };
        Some(((wait * window_secs).ceil() as u64).max(1))
    }

    fn failed(&self, key: &str, at: At, now: Instant) {
        let mut entries = lock(&self.entries);
        if !entries.contains_key(key) && entries.len() >= self.capacity {
            self.make_room(&mut entries, at, now);
        }
        let e = entries.entry(key.into()).or_insert(Entry {
            window: at.window,
            ..Entry::default()
        });
        e.roll(at.window);
        e.current = e.current.saturating_add(1);
    }

    fn make_room(&self, entries: &mut HashMap<Box<str>, Entry>, at: At, now: Instant) {
        let mut last = lock(&self.last_sweep);
        if last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
            *last = Some(now);
            // Over: nothing counted in this window or the previous one.
            entries.retain(|_, e| e.window + 1 >= at.window);
        }
        if entries.len() >= self.capacity {
            if let Some(k) = entries.keys().next().cloned() {
                entries.remove(&k);
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().unwrap().len()
    }
}

/// The key a source counts under.
fn source_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

pub(crate) struct LoginLimiter {
    started: Instant,
    window: Duration,
    accounts: Table,
    sources: Table,
    /// `chat_dbproxy_login_rate_limited_total{by}`.
    limited: IntCounterVec,
}

/// Settings of a [`LoginLimiter`] (the `login_*` keys of the config).
pub(crate) struct Limits {
    pub window: Duration,
    pub per_account: u32,
    pub per_source: u32,
    pub capacity: usize,
}

impl LoginLimiter {
    pub(crate) fn new(limits: Limits, limited: IntCounterVec) -> LoginLimiter {
        LoginLimiter {
            started: Instant::now(),
            window: limits.window.max(Duration::from_secs(1)),
            accounts: Table::new(limits.capacity, limits.per_account),
            sources: Table::new(limits.capacity, limits.per_source),
            limited,
        }
    }

    fn at(&self, now: Instant) -> At {
        let since = now.duration_since(self.started).as_secs_f64();
        let w = self.window.as_secs_f64();
        At {
            window: (since / w) as u64,
            elapsed: (since % w) / w,
        }
    }

    /// `RateLimited` when `account` or `source` is over its limit.
    pub(crate) fn check(&self, account: &str, source: Option<IpAddr>) -> Result<(), ApiError> {
        self.check_at(account, source, Instant::now())
    }

    fn check_at(
        &self,
        account: &str,
        source: Option<IpAddr>,
        now: Instant,
    ) -> Result<(), ApiError> {
        let at = self.at(now);
        let w = self.window.as_secs_f64();
        let (by, wait) = match self.accounts.blocked(account, at, w) {
            Some(wait) => ("account", wait),
            None => match source.and_then(|ip| self.sources.blocked(&source_key(ip), at, w)) {
                Some(wait) => ("source", wait),
                None => return Ok(()),
            },
        };
        self.limited.with_label_values(&[by]).inc();
        let whose = if by == "account" {
            "this account"
        } else {
            "this address"
        };
        Err(ApiError::new(
            ErrorKind::RateLimited,
            format!("too many failed logins for {whose}, retry in {wait} s"),
        ))
    }

    /// Counts a failed login (a wrong password) against both keys.
    pub(crate) fn failed(&self, account: &str, source: Option<IpAddr>) {
        self.failed_at(account, source, Instant::now());
    }

    fn failed_at(&self, account: &str, source: Option<IpAddr>, now: Instant) {
        let at = self.at(now);
        self.accounts.failed(account, at, now);
        if let Some(ip) = source {
            self.sources.failed(&source_key(ip), at, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(per_account: u32, per_source: u32, capacity: usize) -> LoginLimiter {
        let counter = IntCounterVec::new(prometheus::Opts::new("t_total", "t"), &["by"]).unwrap();
        LoginLimiter::new(
            Limits {
                window: Duration::from_secs(60),
                per_account,
                per_source,
                capacity,
            },
            counter,
        )
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn account_limit_then_recovery() {
        let l = limiter(3, 100, 16);
        let t0 = l.started;
        for _ in 0..3 {
            l.check_at("alice", ip("10.0.0.1"), t0).unwrap();
            l.failed_at("alice", ip("10.0.0.1"), t0);
        }
        let e = l.check_at("alice", ip("10.0.0.2"), t0).unwrap_err();
        assert_eq!(e.kind, ErrorKind::RateLimited);
        assert!(e.message.contains("account"), "{}", e.message);
        // Three failures in window 0: blocked through window 1 until the
        // weighted count drops below 3, i.e. all of it (60 + 60 * (1 - 3/3)).
        assert!(e.message.contains("retry in 60 s"), "{}", e.message);
        // Other accounts are not affected.
        l.check_at("bob", ip("10.0.0.2"), t0).unwrap();
        assert_eq!(l.limited.with_label_values(&["account"]).get(), 1);
        // Two windows later nothing counts any more.
        l.check_at("alice", None, t0 + Duration::from_secs(120))
            .unwrap();
    }

    #[test]
    fn previous_window_fades() {
        let l = limiter(4, 100, 16);
        let t0 = l.started;
        for _ in 0..4 {
            l.failed_at("a", None, t0);
        }
        // 30 s into the next window: 4 * 0.5 = 2 < 4.
        l.check_at("a", None, t0 + Duration::from_secs(90)).unwrap();
        // 6 s into it: 4 * 0.9 = 3.6 < 4, but one more failure there: 4.6.
        let t = t0 + Duration::from_secs(66);
        l.failed_at("a", None, t);
        let e = l.check_at("a", None, t).unwrap_err();
        // 3.6 + 1 ≥ 4 until 4 * (1 - f) + 1 < 4, f > 0.25: 15 s in, 9 s on.
        assert!(e.message.contains("retry in 9 s"), "{}", e.message);
    }

    #[test]
    fn source_limit_spans_accounts_and_ipv6_counts_by_64() {
        let l = limiter(100, 2, 16);
        let t0 = l.started;
        l.failed_at("a", ip("2001:db8:1:2::1"), t0);
        l.failed_at("b", ip("2001:db8:1:2:ffff::9"), t0);
        let e = l.check_at("c", ip("2001:db8:1:2::77"), t0).unwrap_err();
        assert!(e.message.contains("address"), "{}", e.message);
        assert_eq!(l.limited.with_label_values(&["source"]).get(), 1);
        l.check_at("c", ip("2001:db8:1:3::1"), t0).unwrap();
        // An IPv4-mapped address is its IPv4 address.
        l.failed_at("a", ip("::ffff:10.1.1.1"), t0);
        l.failed_at("a", ip("10.1.1.1"), t0);
        assert!(l.check_at("z", ip("10.1.1.1"), t0).is_err());
        // No source: only the account counts.
        l.check_at("c", None, t0).unwrap();
    }

    #[test]
    fn tables_stay_within_capacity() {
        let l = limiter(1, 1, 8);
        let t0 = l.started;
        for i in 0..1000 {
            l.failed_at(
                &format!("user{i}"),
                ip(&format!("10.0.{}.{}", i / 256, i % 256)),
                t0,
            );
            assert!(l.accounts.len() <= 8 && l.sources.len() <= 8);
        }
        // Expired entries are swept first: after two windows the table
        // holds only the new ones.
        let later = t0 + Duration::from_secs(180);
        l.failed_at("fresh", None, later);
        assert!(l.accounts.len() <= 8);
        assert!(l.check_at("fresh", None, later).is_err());
    }
}
