//! Which characters message text may contain.
//!
//! Text (the body of `MSG` and `DM`) reaches other people's screens and
//! other programs' line splitters. Characters that move the cursor, end a
//! line for some reader, or reorder what is displayed would let one member
//! forge what another sees (a fake `OK LOGIN …` after a CR, an ESC sequence
//! that clears the terminal, a bidi override that reverses a URL). They are
//! refused, not replaced: the sender learns at once that the text was not
//! sent as written, and what is stored is exactly what was acknowledged.
//!
//! Refused: C0 controls except TAB (U+0000–U+0008, U+000A–U+001F), DEL
//! (U+007F), C1 controls (U+0080–U+009F, NEL among them), LINE SEPARATOR and
//! PARAGRAPH SEPARATOR (U+2028, U+2029), and the bidi controls (U+061C,
//! U+200E, U+200F, U+202A–U+202E, U+2066–U+2069).

/// Why a text was refused: the first forbidden character and its byte offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forbidden {
    pub ch: char,
    pub at: usize,
}

impl std::fmt::Display for Forbidden {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "text may not contain control character U+{:04X} (byte {})",
            u32::from(self.ch),
            self.at
        )
    }
}

/// Whether `c` may appear in text.
pub fn is_allowed_char(c: char) -> bool {
    !matches!(c,
        '\u{0}'..='\u{8}'
        | '\u{a}'..='\u{1f}'
        | '\u{7f}'..='\u{9f}'
        | '\u{2028}' | '\u{2029}'
        | '\u{61c}' | '\u{200e}' | '\u{200f}'
        | '\u{202a}'..='\u{202e}'
        | '\u{2066}'..='\u{2069}')
}

/// The first character of `s` that text may not contain.
pub fn check(s: &str) -> Result<(), Forbidden> {
    // Fast path: printable ASCII and TAB are by far the common case.
    if s.bytes().all(|b| (0x20..0x7f).contains(&b) || b == b'\t') {
        return Ok(());
    }
    match s.char_indices().find(|(_, c)| !is_allowed_char(*c)) {
        Some((at, ch)) => Err(Forbidden { ch, at }),
        None => Ok(()),
    }
}

pub fn is_text(s: &str) -> bool {
    check(s).is_ok()
}

/// `s` with every forbidden character shown as `\u{XXXX}`: for displaying
/// text that did not pass [`check`] (what a terminal client prints, what a
/// log line quotes), never for storing it.
pub fn escape_controls(s: &str) -> std::borrow::Cow<'_, str> {
    if is_text(s) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if is_allowed_char(c) {
            out.push(c);
        } else {
            out.push_str(&format!("\\u{{{:04X}}}", u32::from(c)));
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_ordinary_text() {
        for s in [
            "hello",
            "tab\there",
            "ünïcödé ✓ 日本語",
            "emoji 🎉",
            "a  b ",
        ] {
            assert!(is_text(s), "{s:?}");
        }
    }

    #[test]
    fn refuses_controls() {
        for (s, ch) in [
            ("a\rOK LOGIN admin", '\r'),
            ("x\u{1b}[2J", '\u{1b}'),
            ("nul\0", '\0'),
            ("bell\u{7}", '\u{7}'),
            ("del\u{7f}", '\u{7f}'),
            ("nel\u{85}", '\u{85}'),
            ("c1\u{9b}31m", '\u{9b}'),
            ("ls\u{2028}", '\u{2028}'),
            ("ps\u{2029}", '\u{2029}'),
            ("rlo\u{202e}gpj.exe", '\u{202e}'),
            ("lri\u{2066}", '\u{2066}'),
            ("alm\u{61c}", '\u{61c}'),
            ("rlm\u{200f}", '\u{200f}'),
            ("lf\n", '\n'),
        ] {
            let e = check(s).unwrap_err();
            assert_eq!(e.ch, ch, "{s:?}");
            assert_eq!(&s[e.at..e.at + ch.len_utf8()], ch.to_string());
        }
    }

    #[test]
    fn escapes_for_display() {
        assert_eq!(escape_controls("plain"), "plain");
        assert_eq!(escape_controls("a\rb\u{1b}c"), "a\\u{000D}b\\u{001B}c");
        assert_eq!(escape_controls("\u{202e}x"), "\\u{202E}x");
    }
}
