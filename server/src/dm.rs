//! Where a direct message goes when its recipient is not connected here.
//!
//! A DM goes to the recipient's hash owner (`ring.pick(user)`); a server
//! hosting a user it is not the hash owner of tells that owner with a
//! `Locate` frame, and the owner forwards the user's DMs there. "Locate" is
//! the one name for that: a server *locates* its users at their hash owners,
//! and the hash owner keeps where its users are *located* (this map).

use std::collections::HashMap;
use std::sync::Mutex;

use crate::cluster::wire::NodeId;
use chat_admin::sync::lock;

/// How a DM not delivered to a session here reached this server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Its sender is connected here (it was just stored).
    Sent,
    /// A peer sent it; `forwarded` once a hash owner passed it on.
    Peer { forwarded: bool },
}

/// Users this server is the hash owner of, connected to another server.
#[derive(Default)]
pub struct Located {
    at: Mutex<HashMap<String, NodeId>>,
}

impl Located {
    /// `node` says `user` is connected there (`here`), or no longer is.
    pub fn locate(&self, node: &NodeId, user: String, here: bool) {
        let mut at = lock(&self.at);
        if here {
            at.insert(user, node.clone());
        } else if at.get(&user) == Some(node) {
            at.remove(&user);
        }
    }

    /// `node` left the ring: it hosts nobody any more.
    pub fn forget(&self, node: &NodeId) {
        lock(&self.at).retain(|_, n| n != node);
    }

    /// The next server for a DM to `recipient` that no session here took,
    /// and whether that hop is a hash owner's forward (a DM travels at most
    /// twice); `None`: it stays pending for the next login.
    pub fn next_hop(
        &self,
        recipient: &str,
        me: &NodeId,
        hash_owner: &NodeId,
        arrival: Arrival,
    ) -> Option<(NodeId, bool)> {
        match arrival {
            Arrival::Sent if hash_owner != me => Some((hash_owner.clone(), false)),
            Arrival::Sent => self.at(recipient).map(|n| (n, false)),
            Arrival::Peer { forwarded: true } => None,
            Arrival::Peer { forwarded: false } => {
                self.at(recipient).filter(|n| n != me).map(|n| (n, true))
            }
        }
    }

    fn at(&self, user: &str) -> Option<NodeId> {
        lock(&self.at).get(user).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn node(id: &str) -> NodeId {
        Arc::from(id)
    }

    #[test]
    fn a_dm_goes_to_the_hash_owner_which_forwards_it_once() {
        let (me, owner, there) = (node("me:1"), node("owner:1"), node("there:1"));
        let here = Located::default();
        // Sent here, hash owner elsewhere: to the hash owner.
        let hop = here.next_hop("ann", &me, &owner, Arrival::Sent);
        assert_eq!(hop, Some((owner.clone(), false)));
        // This server is the hash owner and ann is located elsewhere.
        here.locate(&there, "ann".into(), true);
        let hop = here.next_hop("ann", &me, &me, Arrival::Sent);
        assert_eq!(hop, Some((there.clone(), false)));
        let arrived = Arrival::Peer { forwarded: false };
        assert_eq!(here.next_hop("ann", &me, &me, arrived), Some((there, true)));
        // A forwarded DM is not passed on again.
        let forwarded = Arrival::Peer { forwarded: true };
        assert_eq!(here.next_hop("ann", &me, &me, forwarded), None);
        // Nobody knows where bob is: pending until his next login.
        assert_eq!(here.next_hop("bob", &me, &me, Arrival::Sent), None);
        assert_eq!(here.next_hop("bob", &me, &me, arrived), None);
    }

    #[test]
    fn a_user_located_at_this_server_is_not_forwarded_to_it() {
        let me = node("me:1");
        let here = Located::default();
        here.locate(&me, "ann".into(), true);
        let arrived = Arrival::Peer { forwarded: false };
        assert_eq!(here.next_hop("ann", &me, &me, arrived), None);
    }

    #[test]
    fn only_the_server_a_user_is_located_at_unlocates_them() {
        let (me, a, b) = (node("me:1"), node("a:1"), node("b:1"));
        let here = Located::default();
        here.locate(&a, "ann".into(), true);
        here.locate(&b, "ann".into(), true);
        here.locate(&a, "ann".into(), false);
        let hop = here.next_hop("ann", &me, &me, Arrival::Sent);
        assert_eq!(
            hop,
            Some((b.clone(), false)),
            "a's late goodbye changes nothing"
        );
        here.locate(&b, "ann".into(), false);
        assert_eq!(here.next_hop("ann", &me, &me, Arrival::Sent), None);
    }

    #[test]
    fn a_lost_server_hosts_nobody() {
        let (me, a) = (node("me:1"), node("a:1"));
        let here = Located::default();
        here.locate(&a, "ann".into(), true);
        here.locate(&a, "bob".into(), true);
        here.forget(&a);
        assert_eq!(here.next_hop("ann", &me, &me, Arrival::Sent), None);
        assert_eq!(here.next_hop("bob", &me, &me, Arrival::Sent), None);
    }
}
