use serde::Deserialize;

/// A credential from config (a bearer token, a shared secret). `Debug`
/// prints `<redacted>`, so a config dump or an error never shows it, and
/// there is no `Serialize` or `Display`: the value leaves only through
/// [`Secret::expose`], where a caller must mean it. Comparisons go through
/// [`Secret::matches`], in constant time (`subtle`), e.g. a peer's
/// handshake against the cluster secret.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value, to send it (an `Authorization` header) or hash it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Its length in bytes, for a minimum-length rule.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether `candidate` equals this secret; the time taken depends on the
    /// lengths only, not on where the first differing byte is.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        self.0.as_bytes().ct_eq(candidate).into()
    }

    /// Reads a secret file: the first line, surrounding whitespace removed
    /// (a Kubernetes Secret often ends in a newline).
    pub fn read_file(path: &std::path::Path) -> std::io::Result<Secret> {
        let text = std::fs::read_to_string(path)?;
        Ok(Secret(text.lines().next().unwrap_or("").trim().to_owned()))
    }

    /// Reads a file of secrets, one per line; blank lines and `#` comments
    /// are skipped, so several can be accepted while one is rotated.
    pub fn read_list(path: &std::path::Path) -> std::io::Result<Vec<Secret>> {
        let text = std::fs::read_to_string(path)?;
        Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| Secret(l.to_owned()))
            .collect())
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Secret {
        Secret::new(value)
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Secret {
        Secret(value)
    }
}

/// In constant time too, like [`Secret::matches`].
impl PartialEq for Secret {
    fn eq(&self, other: &Secret) -> bool {
        self.matches(other.0.as_bytes())
    }
}

impl Eq for Secret {}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() {
            "<unset>"
        } else {
            "<redacted>"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let s = Secret::new("hunter2-hunter2");
        assert_eq!(format!("{s:?}"), "<redacted>");
        assert_eq!(format!("{:?}", Secret::default()), "<unset>");
    }

    #[test]
    fn matches_exactly() {
        let s = Secret::new("abc");
        assert!(s.matches(b"abc"));
        assert!(!s.matches(b"abd"));
        assert!(!s.matches(b"ab"));
        assert!(!s.matches(b"abcd"));
    }

    #[test]
    fn files_lose_newlines_and_comments() {
        let dir = tempfile::tempdir().unwrap();
        let one = dir.path().join("token");
        std::fs::write(&one, "tok-1\n").unwrap();
        assert!(Secret::read_file(&one).unwrap().matches(b"tok-1"));
        let list = dir.path().join("accepted");
        std::fs::write(&list, "# rotating\nold-1\n\n new-2 \n").unwrap();
        let got = Secret::read_list(&list).unwrap();
        assert_eq!(got.len(), 2);
        assert!(got[0].matches(b"old-1") && got[1].matches(b"new-2"));
    }
}
