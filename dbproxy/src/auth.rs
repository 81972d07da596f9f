//! Password hashes (argon2id, PHC strings) and session tokens.
//!
//! The hashing functions here take the argon2 memory as an argument instead
//! of allocating it: they run on the threads of `hashing::HashPool`, each of
//! which keeps one block of [`PARAMS`]'s size for its whole life (see there
//! for why).

use argon2::password_hash::{Output, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use sha2::{Digest, Sha256};

use crate::error::internal;
use chat_storage_api::ApiError;

/// The parameters of every new hash: argon2id v0x13 with the argon2 crate's
/// defaults (OWASP's first recommendation): m = 19 MiB, t = 2, p = 1, 32
/// bytes of output, 16 bytes of salt. Stored hashes carry their own
/// parameters; any whose memory fits in [`PARAMS`]'s verifies.
pub(crate) const PARAMS: Params = Params::DEFAULT;

/// Blocks (of 1 KiB) the argon2 memory of one hashing thread holds.
pub(crate) fn memory_blocks() -> usize {
    PARAMS.block_count()
}

/// A new PHC string for `password`, computed in `memory`.
pub(crate) fn hash_password(password: &str, memory: &mut [Block]) -> Result<String, ApiError> {
    let salt_bytes: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| internal(format!("salt: {e}")))?;
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, PARAMS);
    let len = PARAMS.output_len().unwrap_or(Params::DEFAULT_OUTPUT_LEN);
    let output = Output::init_with(len, |out| {
        argon
            .hash_password_into_with_memory(password.as_bytes(), &salt_bytes, out, &mut *memory)
            .map_err(|_| argon2::password_hash::Error::Crypto)
    })
    .map_err(|e| internal(format!("hashing: {e}")))?;
    let hash = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: PARAMS
            .try_into()
            .map_err(|e| internal(format!("hashing: {e}")))?,
        salt: Some(salt.as_salt()),
        hash: Some(output),
    };
    Ok(hash.to_string())
}

/// Whether `password` matches the stored PHC string, computed in `memory`
/// with the parameters the string names (compared in constant time).
pub(crate) fn verify_password(
    password: &str,
    phc: &str,
    memory: &mut [Block],
) -> Result<bool, ApiError> {
    let stored = |e: argon2::password_hash::Error| internal(format!("stored hash: {e}"));
    let parsed = PasswordHash::new(phc).map_err(stored)?;
    let algorithm = Algorithm::try_from(parsed.algorithm).map_err(stored)?;
    let version = match parsed.version {
        Some(v) => Version::try_from(v).map_err(|e| internal(format!("stored hash: {e}")))?,
        None => Version::default(),
    };
    let params = Params::try_from(&parsed).map_err(stored)?;
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
        return Err(internal("stored hash: no salt or no hash"));
    };
    if params.block_count() > memory.len() {
        return Err(internal(
            "stored hash: needs more memory than a hashing thread holds",
        ));
    }
    let mut salt_buf = [0u8; 64];
    let salt = salt.decode_b64(&mut salt_buf).map_err(stored)?;
    let argon = Argon2::new(algorithm, version, params);
    let computed = Output::init_with(expected.len(), |out| {
        argon
            .hash_password_into_with_memory(password.as_bytes(), salt, out, &mut *memory)
            .map_err(|_| argon2::password_hash::Error::Crypto)
    })
    .map_err(|e| internal(format!("hashing: {e}")))?;
    // `Output`'s equality is constant time.
    Ok(computed == expected)
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
    use argon2::password_hash::{PasswordHasher, PasswordVerifier};

    fn memory() -> Vec<Block> {
        vec![Block::default(); memory_blocks()]
    }

    #[test]
    fn password_roundtrip() {
        let mut m = memory();
        let h = hash_password("s3cret", &mut m).unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(verify_password("s3cret", &h, &mut m).unwrap());
        assert!(!verify_password("wrong", &h, &mut m).unwrap());
        assert_ne!(
            h,
            hash_password("s3cret", &mut m).unwrap(),
            "salt is random"
        );
    }

    /// Hashes stored before the hashing pool (argon2's own allocating API,
    /// the same defaults) still verify, and the pool's verify with it.
    #[test]
    fn compatible_with_the_allocating_api() {
        let mut m = memory();
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let old = Argon2::default()
            .hash_password(b"pass word", &salt)
            .unwrap()
            .to_string();
        assert!(verify_password("pass word", &old, &mut m).unwrap());
        assert!(!verify_password("pass-word", &old, &mut m).unwrap());
        let new = hash_password("pass word", &mut m).unwrap();
        let parsed = PasswordHash::new(&new).unwrap();
        assert!(Argon2::default()
            .verify_password(b"pass word", &parsed)
            .is_ok());
        // A smaller memory cost (an older setting) fits the block and verifies.
        let small = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(8 * 1024, 1, 1, None).unwrap(),
        )
        .hash_password(b"pw", &salt)
        .unwrap()
        .to_string();
        assert!(verify_password("pw", &small, &mut m).unwrap());
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
