//! The one lock-poisoning policy: a poisoned `std` mutex is used as it is.
//!
//! Every critical section in the tiers is a few map operations or the swap
//! of a value, never held across an await and never leaving the data half
//! updated for a panic to expose; a panic in one task (already logged by
//! tokio) must not turn every later lock into a second panic that takes
//! the process down. So no `lock().unwrap()` / `expect`: lock through
//! [`lock`].

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, poisoned or not.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_is_still_usable() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let held = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = held.lock().unwrap();
            panic!("poisons the lock");
        })
        .join();
        assert!(m.is_poisoned());
        *lock(&m) += 1;
        assert_eq!(*lock(&m), 2);
    }
}
