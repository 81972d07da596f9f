//! Validation of the names and values that appear as protocol words.

pub const MAX_USER: usize = 32;
pub const MAX_ROOM: usize = 64;
pub const MAX_PASSWORD: usize = 128;
pub const MAX_CID: usize = 64;
pub const TOKEN_LEN: usize = 32;

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

pub fn is_token(s: &str) -> bool {
    s.len() == TOKEN_LEN
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
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
        assert!(is_token("0123456789abcdef0123456789abcdef"));
        assert!(!is_token("0123456789ABCDEF0123456789abcdef"));
    }
}
