//! [`BearerToken`]: the token a chat server's [`crate::DbClient`] sends on
//! every request (`Authorization: Bearer …`), fixed or from a file that is
//! re-read when it may have changed, so a rotated Secret is picked up
//! without a restart.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chat_admin::sync::lock;
use chat_tls::Secret;
use http::HeaderValue;

/// How often the token file is looked at again while requests flow.
const RECHECK_EVERY: Duration = Duration::from_secs(10);
/// A refused token makes the file be re-read at once, but a burst of
/// refusals reads it at most this often.
const RECHECK_ON_REFUSAL: Duration = Duration::from_secs(1);

/// Where the token comes from. Cheap to share behind the client's `Arc`.
#[derive(Default)]
pub struct BearerToken {
    /// The header of a fixed token, or the last one read from `file`.
    /// A std mutex: held only to clone or replace the value.
    state: Mutex<State>,
    file: Option<PathBuf>,
}

#[derive(Default)]
struct State {
    header: Option<HeaderValue>,
    read_at: Option<Instant>,
}

/// Why a token cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no token in the file")]
    Empty { path: PathBuf },
    #[error("the token holds characters an HTTP header cannot carry")]
    NotAHeader,
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BearerToken")
            .field("file", &self.file)
            .field("token", &"<redacted>")
            .finish()
    }
}

impl BearerToken {
    /// No token: requests carry no `Authorization` header.
    pub fn none() -> BearerToken {
        BearerToken::default()
    }

    /// Always `token` (an empty one means none).
    pub fn fixed(token: &Secret) -> Result<BearerToken, TokenError> {
        let header = (!token.is_empty()).then(|| header(token)).transpose()?;
        Ok(BearerToken {
            state: Mutex::new(State {
                header,
                read_at: None,
            }),
            file: None,
        })
    }

    /// The first line of `path`, read now (an unreadable or empty file is
    /// an error) and again every 10 s and after a refusal.
    pub fn file(path: impl Into<PathBuf>) -> Result<BearerToken, TokenError> {
        let path = path.into();
        let header = read(&path)?;
        Ok(BearerToken {
            state: Mutex::new(State {
                header: Some(header),
                read_at: Some(Instant::now()),
            }),
            file: Some(path),
        })
    }

    /// The header to send now. Every [`RECHECK_EVERY`] the request that
    /// comes along re-reads the file first: a read of a few bytes, cheaper
    /// than a task of its own that would have to be stopped.
    pub(crate) fn header(&self) -> Option<HeaderValue> {
        self.refresh(RECHECK_EVERY);
        self.lock().header.clone()
    }

    /// After the dbproxy refused the token: re-reads the file (at most once
    /// a second) and says whether the token changed, i.e. whether sending
    /// the request again may help.
    pub(crate) fn refused(&self) -> bool {
        let before = self.lock().header.clone();
        self.refresh(RECHECK_ON_REFUSAL);
        self.lock().header != before
    }

    fn refresh(&self, older_than: Duration) {
        let Some(path) = &self.file else { return };
        {
            let mut state = self.lock();
            if state.read_at.is_some_and(|t| t.elapsed() < older_than) {
                return;
            }
            // Claimed before reading, so concurrent requests do not all read.
            state.read_at = Some(Instant::now());
        }
        match read(path) {
            Ok(header) => {
                let mut state = self.lock();
                if state.header.as_ref() != Some(&header) {
                    tracing::info!(file = %path.display(), "dbproxy token file changed: using the new token");
                    state.header = Some(header);
                }
            }
            // The last good token stays in use; a Secret being rewritten
            // may be missing for a moment.
            Err(e) => {
                tracing::warn!(error = %e, "dbproxy token file unusable; keeping the token read before")
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }
}

fn read(path: &std::path::Path) -> Result<HeaderValue, TokenError> {
    let token = Secret::read_file(path).map_err(|source| TokenError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if token.is_empty() {
        return Err(TokenError::Empty {
            path: path.to_path_buf(),
        });
    }
    header(&token)
}

fn header(token: &Secret) -> Result<HeaderValue, TokenError> {
    let mut value = HeaderValue::try_from(format!("Bearer {}", token.expose()))
        .map_err(|_| TokenError::NotAHeader)?;
    value.set_sensitive(true);
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_token_follows_the_file_on_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first-token-0123456\n").unwrap();
        let t = BearerToken::file(&path).unwrap();
        assert_eq!(t.header().unwrap(), "Bearer first-token-0123456");
        std::fs::write(&path, "second-token-012345\n").unwrap();
        // Within the recheck interval the old token is still sent...
        assert_eq!(t.header().unwrap(), "Bearer first-token-0123456");
        // ...until the dbproxy refuses it (once a second at most).
        t.lock().read_at = Some(Instant::now() - RECHECK_ON_REFUSAL);
        assert!(t.refused());
        assert_eq!(t.header().unwrap(), "Bearer second-token-012345");
        assert!(!t.refused());
        std::fs::remove_file(&path).unwrap();
        t.lock().read_at = None;
        assert_eq!(t.header().unwrap(), "Bearer second-token-012345");
        assert!(format!("{t:?}").contains("<redacted>"));
        assert!(BearerToken::file(&path).is_err());
        assert!(BearerToken::fixed(&Secret::default())
            .unwrap()
            .header()
            .is_none());
    }
}
