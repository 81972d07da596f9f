//! Messages sent with a client id and not yet acknowledged: resent with the
//! same id after a reconnect (the server stores an id once, so a resend of a
//! message that was stored returns its original seq), and after a pause when
//! the server answered that it could not store it yet.

use std::collections::BTreeMap;
use std::time::Instant;

#[derive(Debug)]
struct Pending {
    line: String,
    /// When to send it again after a retryable error; `None` while an answer
    /// is awaited.
    retry_at: Option<Instant>,
}

/// The un-acked sends of one client, by client id.
#[derive(Debug, Default)]
pub struct Unacked {
    pending: BTreeMap<String, Pending>,
}

impl Unacked {
    /// `line` (a `MSG id=<cid> …` or `DM id=<cid> …`, without newline) was sent.
    pub fn insert(&mut self, cid: String, line: String) {
        self.pending.insert(
            cid,
            Pending {
                line,
                retry_at: None,
            },
        );
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Every un-acked line, to send again on a new connection.
    pub fn resend_all(&mut self) -> Vec<String> {
        self.pending
            .values_mut()
            .map(|p| {
                p.retry_at = None;
                p.line.clone()
            })
            .collect()
    }

    /// The lines whose retry pause ended by `now`.
    pub fn due(&mut self, now: Instant) -> Vec<String> {
        self.pending
            .values_mut()
            .filter(|p| p.retry_at.is_some_and(|t| t <= now))
            .map(|p| {
                p.retry_at = None;
                p.line.clone()
            })
            .collect()
    }

    /// The server acknowledged `cid`; false if it was not pending (a
    /// duplicate answer, or a line this client did not track).
    pub(crate) fn acked(&mut self, cid: &str) -> bool {
        self.pending.remove(cid).is_some()
    }

    /// The server refused `cid`: send it again at `retry_at`, or give it up.
    pub(crate) fn refused(&mut self, cid: &str, retry_at: Option<Instant>) {
        match retry_at {
            Some(t) => {
                if let Some(p) = self.pending.get_mut(cid) {
                    p.retry_at = Some(t);
                }
            }
            None => {
                self.pending.remove(cid);
            }
        }
    }
}
