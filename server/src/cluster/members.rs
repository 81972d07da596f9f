//! Who is in the cluster: the static `peers` list or a DNS name, resolved
//! every `dns_refresh_secs`; each new peer gets a dial loop. The same loop
//! reports ring changes to the handler and expires unanswered requests.

use std::sync::Arc;

use chat_admin::members::Members;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{link, Cluster, Handler};

/// Keeps the membership, follows ring changes and expires requests until
/// `stop`. Dial loops (and the DNS follower) run on `tasks`.
pub async fn run(
    cluster: Arc<Cluster>,
    handler: Arc<dyn Handler>,
    tasks: TaskTracker,
    stop: CancellationToken,
) {
    match cluster.config.members() {
        Members::Static(peers) => set_members(&cluster, &handler, &tasks, &peers),
        Members::Dns(dns) => {
            let (cluster, handler, spawner) = (cluster.clone(), handler.clone(), tasks.clone());
            let stop = stop.clone();
            tasks.spawn(async move {
                dns.follow(stop, |found| {
                    let list: Vec<String> = found.iter().map(|a| a.to_string()).collect();
                    set_members(&cluster, &handler, &spawner, &list);
                })
                .await
            });
        }
    }
    let mut ring = cluster.subscribe();
    let mut tick = chat_admin::tick::interval(cluster.config.heartbeat());
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = ring.changed() => {
                if changed.is_err() {
                    return;
                }
                ring.borrow_and_update();
                handler.ring_changed();
            }
            _ = tick.tick() => {
                cluster.expire_requests();
                cluster.observe_queues();
            }
        }
    }
}

/// Makes `list` the cluster's members; each new peer gets a dial loop.
fn set_members(
    cluster: &Arc<Cluster>,
    handler: &Arc<dyn Handler>,
    tasks: &TaskTracker,
    list: &[String],
) {
    cluster.set_members(list, |node, stop| {
        let dial = link::dial_loop(cluster.clone(), handler.clone(), node, stop);
        tasks.spawn(dial);
    })
}
