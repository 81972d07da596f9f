//! Who is in the cluster: the static `peers` list or a DNS name, resolved
//! every `dns_refresh_secs`; each new peer gets a dial loop. The same loop
//! reports ring changes to the handler and expires unanswered requests.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{link, Cluster, Handler};

/// Keeps the membership, follows ring changes and expires requests until
/// `stop`. Dial loops run on `tasks`.
pub async fn run(
    cluster: Arc<Cluster>,
    handler: Arc<dyn Handler>,
    tasks: TaskTracker,
    stop: CancellationToken,
) {
    let cfg = cluster.config.clone();
    let set_members = |list: &[String]| {
        cluster.set_members(list, |node, stop| {
            let dial = link::dial_loop(cluster.clone(), handler.clone(), node, stop);
            tasks.spawn(dial);
        })
    };
    if cfg.dns_name.is_none() {
        set_members(&cfg.peers);
    }
    let mut ring = cluster.subscribe();
    let mut tick = tokio::time::interval(Duration::from_millis(cfg.heartbeat_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let dns_every = Duration::from_secs(cfg.dns_refresh_secs);
    let mut dns_next = Instant::now();
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
                let Some(name) = cfg.dns_name.as_deref() else { continue };
                if Instant::now() < dns_next {
                    continue;
                }
                dns_next = Instant::now() + dns_every;
                let found = tokio::select! {
                    r = resolve(name, cfg.dns_port) => r,
                    _ = stop.cancelled() => return,
                };
                if let Some(list) = found {
                    set_members(&list);
                }
            }
        }
    }
}

/// The chat servers `name` lists, sorted; `None` (logged) when the lookup
/// failed or found none, so the last list stays.
async fn resolve(name: &str, port: u16) -> Option<Vec<String>> {
    match tokio::net::lookup_host((name, port)).await {
        Ok(addrs) => {
            let mut list: Vec<String> = addrs.map(|a| a.to_string()).collect();
            list.sort();
            list.dedup();
            if list.is_empty() {
                tracing::warn!(%name, "DNS returned no chat servers; keeping the last list");
                return None;
            }
            Some(list)
        }
        Err(e) => {
            tracing::warn!(%name, error = %e, "DNS lookup failed; keeping the last list");
            None
        }
    }
}
