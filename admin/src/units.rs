//! Config durations: a key keeps its unit in its name (`health_interval_ms`,
//! `shutdown_grace_secs`) and its number in the file, and the field is a
//! [`Duration`], so no reader converts it again or mistakes the unit:
//!
//! ```ignore
//! #[serde(deserialize_with = "chat_admin::units::millis")]
//! pub health_interval_ms: Duration,
//! ```

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A whole number of milliseconds.
pub fn millis<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    u64::deserialize(d).map(Duration::from_millis)
}

/// A whole number of seconds.
pub fn secs<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    u64::deserialize(d).map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct T {
        #[serde(deserialize_with = "millis")]
        a_ms: Duration,
        #[serde(deserialize_with = "secs")]
        b_secs: Duration,
    }

    #[test]
    fn numbers_in_their_unit() {
        let t: T = serde_json::from_str(r#"{"a_ms":250,"b_secs":3}"#).unwrap();
        assert_eq!(t.a_ms, Duration::from_millis(250));
        assert_eq!(t.b_secs, Duration::from_secs(3));
        assert!(serde_json::from_str::<T>(r#"{"a_ms":-1,"b_secs":3}"#).is_err());
        assert!(serde_json::from_str::<T>(r#"{"a_ms":"1s","b_secs":3}"#).is_err());
    }
}
