//! Validation of the names and values that appear as protocol words.

pub const MAX_USER: usize = 32;
pub const MAX_ROOM: usize = 64;
pub const MAX_PASSWORD: usize = 128;
pub const MAX_CID: usize = 64;
/// Hex digits of a token's secret part.
pub const TOKEN_SECRET_LEN: usize = 32;

fn all_bytes(s: &str, max: usize, ok: impl Fn(u8) -> bool) -> bool {
    !s.is_empty() && s.len() <= max && s.bytes().all(ok)
}

pub fn is_user(s: &str) -> bool {
    all_bytes(s, MAX_USER, |b| {
        b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-'
    })
}

pub fn is_room(s: &str) -> bool {
    all_bytes(s, MAX_ROOM, |b| {
        b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-' || b == b'#'
    })
}

pub fn is_cid(s: &str) -> bool {
    all_bytes(s, MAX_CID, |b| {
        b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b':' || b == b'-'
    })
}

/// A token is `<user>.<32 lower-case hex digits>`: the user part lets the proxy
/// route a `RESUME` to the user's server without asking storage; the hex part is
/// the secret (only its holder can resume).
pub fn is_token(s: &str) -> bool {
    token_user(s).is_some()
}

/// The user a well-formed token names.
pub fn token_user(s: &str) -> Option<&str> {
    let (user, secret) = s.rsplit_once('.')?;
    let hex = secret.len() == TOKEN_SECRET_LEN
        && secret
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    (hex && is_user(user)).then_some(user)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(is_user("alice_01.x-y"));
        assert!(!is_user(""));
        assert!(!is_user("al ice"));
        assert!(!is_user("a#b"));
        assert!(!is_user(&"a".repeat(33)));
        assert!(is_room("#general"));
        assert!(!is_room("id=3"));
        assert!(is_cid("abc:1-2"));
        assert!(!is_cid("a b"));
        assert!(!is_token("0123456789abcdef0123456789abcdef"));
        assert!(is_token("al.ice.0123456789abcdef0123456789abcdef"));
        assert_eq!(
            token_user("al.ice.0123456789abcdef0123456789abcdef"),
            Some("al.ice")
        );
        assert!(!is_token("alice.0123456789ABCDEF0123456789abcdef"));
        assert!(!is_token("a b.0123456789abcdef0123456789abcdef"));
    }
}
