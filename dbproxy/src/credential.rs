//! The bearer tokens the API accepts: `api_tokens` from config plus the
//! lines of `api_tokens_file`, which [`watch`] re-reads so that a token can
//! be rotated without a restart (accept old and new, move the servers to the
//! new one, drop the old).
//!
//! A request's `Authorization: Bearer <token>` is compared with every
//! accepted token in constant time ([`chat_tls::Secret::matches`]); the
//! token itself is never logged.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chat_admin::sync::lock;
use chat_tls::Secret;
use http::HeaderValue;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::DbProxyError;

/// Shortest token accepted: a guessable token would defeat the check.
pub(crate) const MIN_TOKEN_CHARS: usize = 16;
/// A token file larger than this is a mistake (a wrong path), not tokens:
/// it is refused instead of read into memory.
const MAX_FILE_BYTES: u64 = 64 * 1024;

/// What a request's credentials amount to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// No token configured: the API is open.
    Open,
    Accepted,
    /// No `Authorization: Bearer` header.
    Missing,
    /// A bearer token that is not accepted.
    Wrong,
}

impl Verdict {
    pub(crate) fn allowed(self) -> bool {
        matches!(self, Verdict::Open | Verdict::Accepted)
    }
}

pub(crate) struct Tokens {
    fixed: Vec<Secret>,
    file: Option<PathBuf>,
    /// The file's tokens as last read well. A std mutex: held only to clone
    /// or swap the `Arc`, never across an await.
    from_file: Mutex<Arc<Vec<Secret>>>,
}

impl Tokens {
    /// The tokens of `config`, reading `api_tokens_file` now: a missing,
    /// empty or bad file stops the start (the key is named).
    pub(crate) fn load(config: &Config) -> Result<Tokens, DbProxyError> {
        let file =
            (!config.api_tokens_file.is_empty()).then(|| PathBuf::from(&config.api_tokens_file));
        let from_file = match &file {
            Some(path) => read(path).map_err(|message| DbProxyError::Config {
                key: "api_tokens_file",
                message,
            })?,
            None => Vec::new(),
        };
        Ok(Tokens {
            fixed: config.api_tokens.clone(),
            file,
            from_file: Mutex::new(Arc::new(from_file)),
        })
    }

    /// Whether any token is configured; without one the API is open.
    pub(crate) fn required(&self) -> bool {
        !self.fixed.is_empty() || self.file.is_some()
    }

    /// Judges a request's `Authorization` header.
    pub(crate) fn check(&self, header: Option<&HeaderValue>) -> Verdict {
        if !self.required() {
            return Verdict::Open;
        }
        let Some(token) = header.and_then(bearer) else {
            return Verdict::Missing;
        };
        let from_file = self.current();
        // Every token is compared, so the time taken does not tell which
        // one (if any) matched.
        let hit = self
            .fixed
            .iter()
            .chain(from_file.iter())
            .fold(false, |hit, t| t.matches(token) | hit);
        if hit {
            Verdict::Accepted
        } else {
            Verdict::Wrong
        }
    }

    fn current(&self) -> Arc<Vec<Secret>> {
        lock(&self.from_file).clone()
    }

    /// Re-reads the file; `Ok(true)` when its tokens changed. On an error
    /// the tokens read before stay accepted.
    fn reload(&self) -> Result<bool, String> {
        let Some(path) = &self.file else {
            return Ok(false);
        };
        let next = read(path)?;
        let mut current = lock(&self.from_file);
        if **current == next {
            return Ok(false);
        }
        *current = Arc::new(next);
        Ok(true)
    }
}

/// The token of an `Authorization: Bearer <token>` header (the scheme is
/// case-insensitive, RFC 7235).
fn bearer(value: &HeaderValue) -> Option<&[u8]> {
    let bytes = value.as_bytes();
    let (scheme, rest) = bytes.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// The tokens of a file, or why it cannot serve: unreadable, too large, no
/// token in it, a token too short.
fn read(path: &Path) -> Result<Vec<Secret>, String> {
    let shown = path.display();
    let len = std::fs::metadata(path)
        .map_err(|e| format!("{shown}: {e}"))?
        .len();
    if len > MAX_FILE_BYTES {
        return Err(format!(
            "{shown}: {len} bytes, more than a token file holds ({MAX_FILE_BYTES})"
        ));
    }
    let tokens = Secret::read_list(path).map_err(|e| format!("{shown}: {e}"))?;
    if tokens.is_empty() {
        return Err(format!("{shown}: no token in the file"));
    }
    if let Some(i) = tokens
        .iter()
        .position(|t| t.expose().chars().count() < MIN_TOKEN_CHARS)
    {
        return Err(format!(
            "{shown}: token {} of the file has fewer than {MIN_TOKEN_CHARS} characters",
            i + 1
        ));
    }
    Ok(tokens)
}

/// Re-reads the token file every `every` until `stop`. A file that cannot
/// be read or holds no usable token is logged and the old tokens stay
/// accepted (a Secret being rewritten may be half there for a moment).
pub(crate) async fn watch(tokens: Arc<Tokens>, every: Duration, stop: CancellationToken) {
    if tokens.file.is_none() {
        return;
    }
    let mut tick = chat_admin::tick::Ticker::after(every, stop);
    let mut failing = false;
    while tick.tick().await {
        // A small file, but still blocking I/O: off the runtime's threads.
        let t = tokens.clone();
        let result = tokio::task::spawn_blocking(move || t.reload())
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        match result {
            Ok(changed) => {
                if changed {
                    tracing::info!(
                        accepted = tokens.fixed.len() + tokens.current().len(),
                        "API tokens reloaded"
                    );
                } else if failing {
                    tracing::info!("API token file readable again");
                }
                failing = false;
            }
            Err(error) => {
                // Once per bad spell, not every interval.
                if !failing {
                    tracing::warn!(%error, "API token file unusable; keeping the tokens read before");
                }
                failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(fixed: &[&str]) -> Tokens {
        Tokens {
            fixed: fixed.iter().map(|t| Secret::new(*t)).collect(),
            file: None,
            from_file: Mutex::default(),
        }
    }

    #[test]
    fn bearer_header_judged() {
        let t = tokens(&["0123456789abcdef"]);
        let h = |s: &str| HeaderValue::from_str(s).unwrap();
        assert_eq!(t.check(None), Verdict::Missing);
        assert_eq!(
            t.check(Some(&h("Bearer 0123456789abcdef"))),
            Verdict::Accepted
        );
        assert_eq!(
            t.check(Some(&h("bearer  0123456789abcdef "))),
            Verdict::Accepted
        );
        assert_eq!(t.check(Some(&h("Bearer 0123456789abcdeX"))), Verdict::Wrong);
        assert_eq!(t.check(Some(&h("Basic abc"))), Verdict::Missing);
        assert_eq!(t.check(Some(&h("Bearer "))), Verdict::Missing);
        assert_eq!(tokens(&[]).check(None), Verdict::Open);
    }

    #[test]
    fn bad_files_refused_and_reload_keeps_the_old_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "# current\nold-token-0123456789\n").unwrap();
        let config = Config {
            api_tokens_file: path.to_string_lossy().into_owned(),
            ..Config::default()
        };
        let t = Tokens::load(&config).unwrap();
        let h = |s: &str| HeaderValue::from_str(&format!("Bearer {s}")).unwrap();
        assert_eq!(t.check(Some(&h("old-token-0123456789"))), Verdict::Accepted);
        std::fs::write(&path, "short\n").unwrap();
        assert!(t.reload().unwrap_err().contains("fewer than 16"));
        std::fs::write(&path, "\n").unwrap();
        assert!(t.reload().unwrap_err().contains("no token"));
        assert_eq!(t.check(Some(&h("old-token-0123456789"))), Verdict::Accepted);
        std::fs::write(&path, "new-token-0123456789\n").unwrap();
        assert!(t.reload().unwrap());
        assert_eq!(t.check(Some(&h("old-token-0123456789"))), Verdict::Wrong);
        assert_eq!(t.check(Some(&h("new-token-0123456789"))), Verdict::Accepted);
        std::fs::remove_file(&path).unwrap();
        assert!(Tokens::load(&config)
            .err()
            .unwrap()
            .to_string()
            .contains("api_tokens_file"));
    }
}
