//! Requests this server sent to a peer and waits to hear about: forwarded
//! messages (answered by [`PeerMsg::Published`](super::wire::PeerMsg)) and
//! `WHO` (answered by `Members`). Each waits for its answer, the link's
//! loss, or `request_timeout_ms`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::wire::{NodeId, Published};
use chat_admin::sync::lock;

/// What a forwarded message's sender hears: the owner's answer, or `None`
/// when none will come (the link was lost, the owner did not answer in
/// time). Runs once, on whichever task learnt it.
pub type Done = Box<dyn FnOnce(Option<Published>) + Send>;

enum Pending {
    Publish {
        node: NodeId,
        at: Instant,
        done: Done,
    },
    Who {
        node: NodeId,
        at: Instant,
        tx: oneshot::Sender<Vec<String>>,
    },
}

impl Pending {
    fn node(&self) -> &NodeId {
        match self {
            Pending::Publish { node, .. } | Pending::Who { node, .. } => node,
        }
    }

    fn at(&self) -> Instant {
        match self {
            Pending::Publish { at, .. } | Pending::Who { at, .. } => *at,
        }
    }
}

#[derive(Default)]
pub struct Requests {
    pending: Mutex<HashMap<u64, Pending>>,
    next: AtomicU64,
}

impl Requests {
    fn next(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A forwarded message to `node`: its request id.
    pub fn publish(&self, node: &NodeId, done: Done) -> u64 {
        let req = self.next();
        let p = Pending::Publish {
            node: node.clone(),
            at: Instant::now(),
            done,
        };
        lock(&self.pending).insert(req, p);
        req
    }

    /// A `WHO` to `node`: its request id and where the answer arrives.
    pub fn who(&self, node: &NodeId) -> (u64, oneshot::Receiver<Vec<String>>) {
        let req = self.next();
        let (tx, rx) = oneshot::channel();
        let p = Pending::Who {
            node: node.clone(),
            at: Instant::now(),
            tx,
        };
        lock(&self.pending).insert(req, p);
        (req, rx)
    }

    /// Takes back a forwarded message that was never sent; `None` when it
    /// was answered or failed meanwhile.
    pub fn take_publish(&self, req: u64) -> Option<Done> {
        let mut pending = lock(&self.pending);
        if !matches!(pending.get(&req), Some(Pending::Publish { .. })) {
            return None;
        }
        match pending.remove(&req) {
            Some(Pending::Publish { done, .. }) => Some(done),
            _ => None,
        }
    }

    pub fn forget(&self, req: u64) {
        lock(&self.pending).remove(&req);
    }

    /// The owner's answer to request `req`.
    pub fn published(&self, req: u64, answer: Published) {
        if let Some(done) = self.take_publish(req) {
            done(Some(answer));
        }
    }

    /// The answer to a `WHO`.
    pub fn members(&self, req: u64, users: Vec<String>) {
        if let Some(Pending::Who { tx, .. }) = lock(&self.pending).remove(&req) {
            let _ = tx.send(users);
        }
    }

    /// Everything waiting on `node` fails.
    pub fn fail_node(&self, node: &NodeId) {
        self.fail(|p| p.node() == node);
    }

    /// Everything waiting longer than `limit` fails.
    pub fn expire(&self, limit: Duration) {
        self.fail(|p| p.at().elapsed() > limit);
    }

    fn fail(&self, which: impl Fn(&Pending) -> bool) {
        let failed: Vec<Pending> = {
            let mut pending = lock(&self.pending);
            let ids: Vec<u64> = pending
                .iter()
                .filter(|(_, p)| which(p))
                .map(|(id, _)| *id)
                .collect();
            ids.iter().filter_map(|id| pending.remove(id)).collect()
        };
        for p in failed {
            // A dropped `Who` sender ends its wait with no answer.
            if let Pending::Publish { done, .. } = p {
                done(None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn recorder() -> (Done, Arc<Mutex<Vec<Option<u64>>>>) {
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        let done: Done = Box::new(move |p: Option<Published>| {
            let seq = p.and_then(|p| p.result.ok()).map(|a| a.seq);
            lock(&g).push(seq);
        });
        (done, got)
    }

    #[test]
    fn an_answer_completes_its_request_once() {
        let r = Requests::default();
        let a: NodeId = Arc::from("a:1");
        let (done, got) = recorder();
        let req = r.publish(&a, done);
        let answer = Published {
            result: Ok(chat_storage_api::Appended {
                seq: 3,
                ts: 1,
                duplicate: false,
            }),
            pos: None,
        };
        r.published(req, answer.clone());
        r.published(req, answer);
        r.fail_node(&a);
        assert_eq!(*lock(&got), vec![Some(3)]);
    }

    #[test]
    fn losing_a_node_fails_only_its_requests() {
        let r = Requests::default();
        let (a, b): (NodeId, NodeId) = (Arc::from("a:1"), Arc::from("b:1"));
        let (done_a, got_a) = recorder();
        let (done_b, got_b) = recorder();
        r.publish(&a, done_a);
        let req_b = r.publish(&b, done_b);
        let (_, mut who_a) = r.who(&a);
        r.fail_node(&a);
        assert_eq!(*lock(&got_a), vec![None]);
        assert!(lock(&got_b).is_empty());
        assert!(who_a.try_recv().is_err(), "WHO ends without an answer");
        assert!(r.take_publish(req_b).is_some());
        r.expire(Duration::ZERO);
        assert!(lock(&got_b).is_empty(), "taken back, so not failed");
    }
}
