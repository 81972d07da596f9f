//! Bytes from the network on their way into a log line.

/// Longest part of an attacker's bytes quoted in a log line.
const QUOTE_MAX: usize = 64;

/// `s` for a log line: control characters escaped (no raw ESC or CR reaches
/// the log), at most [`QUOTE_MAX`] characters.
pub fn quote(s: &str) -> String {
    let cut: String = s.chars().take(QUOTE_MAX).collect();
    let more = if cut.len() < s.len() { "…" } else { "" };
    format!("{}{more}", chat_protocol::text::escape_controls(&cut))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_bytes_hold_no_controls() {
        let q = quote("\u{1b}[2Jfake\rOK");
        assert!(!q.chars().any(|c| c.is_control()), "{q:?}");
        assert_eq!(q, "\\u{001B}[2Jfake\\u{000D}OK");
        let long = quote(&"x".repeat(500));
        assert!(long.chars().count() <= QUOTE_MAX + 1);
    }
}
