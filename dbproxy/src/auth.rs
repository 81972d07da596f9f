//! Password hashing (argon2id, PHC strings) and session tokens. The hashing is
//! CPU-heavy on purpose, so it runs on blocking threads, at most one per core
//! at a time ([`hash_password_async`], [`verify_password_async`]): a burst of
//! logins queues here instead of starving every other task of the process
//! (in `chat up`, the servers' and the proxy's health checks included).

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use sha2::{Digest, Sha256};

use std::sync::LazyLock;

use tokio::sync::Semaphore;

use crate::api::ApiError;
use crate::error::internal;

/// Password hashes computed at once: one per core.
static HASHING: LazyLock<Semaphore> =
    LazyLock::new(|| Semaphore::new(std::thread::available_parallelism().map_or(1, |n| n.get())));

async fn hashing<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let _permit = HASHING
        .acquire()
        .await
        .map_err(|_| internal("hashing closed"))?;
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| internal(format!("hashing task failed: {e}")))?
}

/// [`hash_password`] on a blocking thread, bounded per core.
pub(crate) async fn hash_password_async(
    password: std::sync::Arc<String>,
) -> Result<String, ApiError> {
    hashing(move || hash_password(&password)).await
}

/// [`verify_password`] on a blocking thread, bounded per core.
pub(crate) async fn verify_password_async(
    password: std::sync::Arc<String>,
    phc: String,
) -> Result<bool, ApiError> {
    hashing(move || verify_password(&password, &phc)).await
}

pub(crate) fn hash_password(password: &str) -> Result<String, ApiError> {
    let salt_bytes: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| internal(format!("salt: {e}")))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| internal(format!("hashing: {e}")))
}

pub(crate) fn verify_password(password: &str, phc: &str) -> Result<bool, ApiError> {
    let parsed = PasswordHash::new(phc).map_err(|e| internal(format!("stored hash: {e}")))?;
    Ok(Argon2::default()
        .verify_password(password.as_bytes(), &parsed)
        .is_ok())
}

/// A new token for `user`: `<user>.<16 random bytes as 32 lower-case hex>`
/// (the protocol's token form; the user part is for routing, not a secret).
pub(crate) fn new_token(user: &str) -> String {
    format!("{user}.{}", hex::encode(rand::random::<[u8; 16]>()))
}

/// What is stored instead of the token, so a leaked database holds no live tokens.
pub(crate) fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_roundtrip() {
        let h = hash_password("s3cret").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("s3cret", &h).unwrap());
        assert!(!verify_password("wrong", &h).unwrap());
        assert_ne!(h, hash_password("s3cret").unwrap(), "salt is random");
    }

    #[test]
    fn token_shape() {
        let t = new_token("al.ice");
        let (user, secret) = t.rsplit_once('.').unwrap();
        assert_eq!(user, "al.ice");
        assert_eq!(secret.len(), 32);
        assert!(secret
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)));
        assert_eq!(token_hash(&t).len(), 32);
    }
}
