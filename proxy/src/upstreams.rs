//! The chat servers the proxy knows, their health, their load, and the ring
//! built from the healthy ones.
//!
//! Membership comes from the config's static list or from DNS ([`dns_loop`]).
//! [`health_loop`] checks every server's `/readyz`; failed connects count
//! too ([`Upstreams::connect_failed`]). A server that fails
//! `eject_after_failures` times in a row leaves the ring; one passing check
//! brings it back. Each change publishes a new [`Snapshot`] on a watch channel,
//! which open connections follow to learn that their user moved.
//!
//! Panic routing: a server whose `/readyz` says its storage is unavailable is
//! alive but cannot store anything. One such server leaves the ring and its
//! users move to servers that can. When no server is ready but some are
//! alive in that way, storage is down for all of them, and ejecting every
//! one would only disconnect every user and refuse every login: the ring is
//! then built over those alive servers instead (as Envoy's panic threshold
//! does), so users stay connected, read what replicas serve and retry writes.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chat_admin::members::{Dns, Members};
use chat_admin::sync::lock;
use chat_admin::tick::Ticker;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ServerAddr};
use crate::metrics::Metrics;
use crate::ring::Ring;

/// One version of the ring over the healthy servers. A server's id is its
/// client address.
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub version: u64,
    pub ring: Ring,
}

struct ServerState {
    admin: String,
    /// In the ring. New servers start out and join after their first passing check.
    healthy: bool,
    /// Failed checks or connects in a row.
    failures: u32,
    /// The last check answered that the server is up but its storage is not
    /// (a candidate for panic routing).
    degraded: bool,
    /// Open proxied connections, for bounded loads.
    active: u64,
}

pub(crate) struct Upstreams {
    /// std Mutex: every critical section is a few map operations and never
    /// awaits, so an async mutex would only add overhead.
    servers: Mutex<BTreeMap<String, ServerState>>,
    ring: watch::Sender<Arc<Snapshot>>,
    vnodes: u32,
    load_factor: Option<f64>,
    eject_after: u32,
    metrics: Metrics,
}

impl Upstreams {
    pub fn new(config: &Config, metrics: Metrics) -> Arc<Upstreams> {
        let empty = Snapshot {
            version: 0,
            ring: Ring::with_vnodes(&[], config.vnodes),
        };
        let up = Arc::new(Upstreams {
            servers: Mutex::new(BTreeMap::new()),
            ring: watch::Sender::new(Arc::new(empty)),
            vnodes: config.vnodes,
            load_factor: config.load_factor(),
            eject_after: config.eject_after_failures,
            metrics,
        });
        if let Members::Static(list) = config.members() {
            up.set_servers(&list);
        }
        up
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, ServerState>> {
        lock(&self.servers)
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.ring.subscribe()
    }

    /// Replaces the membership: new servers are added (out of the ring until
    /// a check passes), missing ones removed.
    pub fn set_servers(&self, list: &[ServerAddr]) {
        let mut servers = self.lock();
        let before = servers.len();
        servers.retain(|id, _| list.iter().any(|s| &s.client == id));
        let mut changed = servers.len() != before;
        for s in list {
            if let Some(state) = servers.get_mut(&s.client) {
                state.admin.clone_from(&s.admin);
                continue;
            }
            tracing::info!(upstream = %s.client, "chat server added");
            self.metrics
                .upstream_healthy
                .with_label_values(&[s.client.as_str()])
                .set(0);
            // Present from the start (at 0), so rates and alerts see the series.
            self.metrics
                .upstream_ejections_total
                .with_label_values(&[s.client.as_str()]);
            servers.insert(
                s.client.clone(),
                ServerState {
                    admin: s.admin.clone(),
                    healthy: false,
                    failures: 0,
                    degraded: false,
                    active: 0,
                },
            );
            changed = true;
        }
        if changed {
            self.publish(&servers);
        }
    }

    /// Builds and publishes the ring over the healthy servers, or over the
    /// degraded ones when none is healthy (panic routing).
    fn publish(&self, servers: &BTreeMap<String, ServerState>) {
        let (members, panic) = membership(servers);
        let nodes: Vec<(String, u32)> = members.into_iter().map(|id| (id, 1)).collect();
        if panic {
            tracing::warn!(
                servers = nodes.len(),
                "no chat server ready; routing over the ones whose storage is unavailable"
            );
        }
        self.metrics.panic_routing.set(i64::from(panic));
        let version = self.ring.borrow().version + 1;
        let mut ring = Ring::with_vnodes(&nodes, self.vnodes);
        if let Some(c) = self.load_factor {
            ring = ring.with_load_factor(c);
        }
        tracing::info!(version, servers = nodes.len(), "ring changed");
        self.ring.send_replace(Arc::new(Snapshot { version, ring }));
    }

    /// (id, admin address) of every known server.
    pub fn admin_targets(&self) -> Vec<(String, String)> {
        self.lock()
            .iter()
            .map(|(id, s)| (id.clone(), s.admin.clone()))
            .collect()
    }

    /// Records one health check result.
    pub fn record(&self, id: &str, check: Check) {
        let mut servers = self.lock();
        let before = membership(&servers);
        let Some(state) = servers.get_mut(id) else {
            return; // removed while being checked
        };
        state.degraded = check == Check::Degraded;
        if check == Check::Ready {
            state.failures = 0;
            if !state.healthy {
                state.healthy = true;
                tracing::info!(upstream = %id, "chat server healthy");
                self.metrics
                    .upstream_healthy
                    .with_label_values(&[id])
                    .set(1);
            }
        } else {
            self.fail(&mut servers, id);
        }
        if membership(&servers) != before {
            self.publish(&servers);
        }
    }

    /// A connect to `id` failed: counts like a failed check.
    pub fn connect_failed(&self, id: &str) {
        self.metrics
            .upstream_connect_failures_total
            .with_label_values(&[id])
            .inc();
        let mut servers = self.lock();
        let before = membership(&servers);
        if let Some(state) = servers.get_mut(id) {
            state.degraded = false;
        }
        self.fail(&mut servers, id);
        if membership(&servers) != before {
            self.publish(&servers);
        }
    }

    /// Counts a failure; ejects after `eject_after` in a row (the caller
    /// publishes the ring if its membership changed).
    fn fail(&self, servers: &mut BTreeMap<String, ServerState>, id: &str) {
        let Some(state) = servers.get_mut(id) else {
            return;
        };
        state.failures = state.failures.saturating_add(1);
        if state.healthy && state.failures >= self.eject_after {
            state.healthy = false;
            tracing::warn!(upstream = %id, failures = state.failures, "chat server ejected");
            self.metrics
                .upstream_healthy
                .with_label_values(&[id])
                .set(0);
            self.metrics
                .upstream_ejections_total
                .with_label_values(&[id])
                .inc();
        }
    }

    /// Servers to try for `key`, best first: the bounded-load choice (when
    /// enabled), then the rest of the ring's failover order.
    pub fn order(&self, snap: &Snapshot, key: &[u8]) -> Vec<String> {
        let mut order: Vec<String> = snap.ring.candidates(key).map(str::to_owned).collect();
        if self.load_factor.is_some() {
            let loads: HashMap<String, u64> = self
                .lock()
                .iter()
                .map(|(id, s)| (id.clone(), s.active))
                .collect();
            let total = loads.values().sum();
            let load = |id: &str| loads.get(id).copied().unwrap_or(0);
            if let Some(pos) = snap
                .ring
                .pick_bounded(key, &load, total)
                .and_then(|best| order.iter().position(|id| id == best))
            {
                let best = order.remove(pos);
                order.insert(0, best);
            }
        }
        order
    }

    /// Counts one open connection on `id` until the guard drops.
    pub fn acquire(self: &Arc<Self>, id: &str) -> LoadGuard {
        if let Some(s) = self.lock().get_mut(id) {
            s.active += 1;
        }
        self.metrics
            .connections_active
            .with_label_values(&[id])
            .inc();
        LoadGuard {
            upstreams: self.clone(),
            id: id.to_owned(),
        }
    }
}

/// What one `/readyz` check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Check {
    Ready,
    /// Up, but its storage is unavailable.
    Degraded,
    /// Anything else: no answer, starting, draining, an error.
    Down,
}

/// The servers the ring is built over, and whether that is panic routing.
fn membership(servers: &BTreeMap<String, ServerState>) -> (Vec<String>, bool) {
    let pick = |f: fn(&ServerState) -> bool| -> Vec<String> {
        servers
            .iter()
            .filter(|(_, s)| f(s))
            .map(|(id, _)| id.clone())
            .collect()
    };
    let healthy = pick(|s| s.healthy);
    if !healthy.is_empty() {
        return (healthy, false);
    }
    let degraded = pick(|s| s.degraded);
    let panic = !degraded.is_empty();
    (degraded, panic)
}

pub(crate) struct LoadGuard {
    upstreams: Arc<Upstreams>,
    id: String,
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        if let Some(s) = self.upstreams.lock().get_mut(&self.id) {
            s.active = s.active.saturating_sub(1);
        }
        self.upstreams
            .metrics
            .connections_active
            .with_label_values(&[self.id.as_str()])
            .dec();
    }
}

/// Whether a connection of `key` placed on `server` by ring `old` must move
/// under ring `new`: its server left the ring, or the key's pick is a server
/// that joined (a new or recovered one). Connections elsewhere stay put, so
/// bounded-load placements are not reshuffled by unrelated changes.
pub(crate) fn has_moved(old: &Ring, new: &Ring, key: &[u8], server: &str) -> bool {
    if !new.contains(server) {
        return true;
    }
    match new.pick(key) {
        Some(pick) => pick != server && !old.contains(pick),
        None => true,
    }
}

/// Checks every known server each `interval` until `stop`, starting one
/// interval from now (`run` does the first round itself).
pub(crate) async fn health_loop(
    up: Arc<Upstreams>,
    interval: Duration,
    timeout: Duration,
    stop: CancellationToken,
) {
    let mut tick = Ticker::after(interval, stop);
    while tick.tick().await {
        if tick.unless_stopped(check_all(&up, timeout)).await.is_none() {
            return;
        }
    }
}

/// One round of checks, all servers at once.
pub(crate) async fn check_all(up: &Upstreams, timeout: Duration) {
    let mut checks = JoinSet::new();
    for (id, admin) in up.admin_targets() {
        checks.spawn(async move {
            let check = check_readyz(&admin, timeout).await;
            if check != Check::Ready {
                tracing::debug!(upstream = %id, %admin, ?check, "readiness check failed");
            }
            (id, check)
        });
    }
    while let Some(res) = checks.join_next().await {
        if let Ok((id, check)) = res {
            up.record(&id, check);
        }
    }
}

/// Longest `/readyz` answer read: a status line, a few headers and a reason.
const READYZ_MAX: usize = 1024;

/// `GET /readyz` over HTTP/1.0: ready iff the status is 200, degraded iff it
/// is 503 saying the storage is unavailable (`chat_admin::Readiness`).
/// Deliberately minimal: one request per connection, read until the server
/// closes it or [`READYZ_MAX`] bytes.
async fn check_readyz(admin: &str, timeout: Duration) -> Check {
    let check = async {
        let mut stream = TcpStream::connect(admin).await?;
        stream
            .write_all(format!("GET /readyz HTTP/1.0\r\nHost: {admin}\r\n\r\n").as_bytes())
            .await?;
        let mut answer = Vec::with_capacity(256);
        let mut buf = [0u8; 256];
        while answer.len() < READYZ_MAX {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
        }
        Ok::<Check, std::io::Error>(classify_readyz(&answer))
    };
    match tokio::time::timeout(timeout, check).await {
        Ok(Ok(c)) => c,
        _ => Check::Down,
    }
}

fn classify_readyz(answer: &[u8]) -> Check {
    let status = answer
        .starts_with(b"HTTP/1.")
        .then(|| answer.get(8..13))
        .flatten();
    let degraded_body = chat_admin::Readiness::StorageUnavailable.body().trim_end();
    match status {
        Some(b" 200 ") => Check::Ready,
        Some(b" 503 ") if memchr::memmem::find(answer, degraded_body.as_bytes()).is_some() => {
            Check::Degraded
        }
        _ => Check::Down,
    }
}

/// Follows the DNS name's answers (every `dns.refresh`, the first at once)
/// into the membership until `stop`; a failed or empty answer keeps the
/// previous servers ([`Dns::follow`]).
pub(crate) async fn dns_loop(
    up: Arc<Upstreams>,
    dns: Dns,
    admin_port: u16,
    stop: CancellationToken,
) {
    dns.follow(stop, |found| {
        up.set_servers(&servers_at(&found, admin_port))
    })
    .await;
}

/// The servers at `found` (client addresses, sorted), each with its admin
/// listener at `admin_port` on the same address.
pub(crate) fn servers_at(found: &[SocketAddr], admin_port: u16) -> Vec<ServerAddr> {
    found
        .iter()
        .map(|a| ServerAddr {
            client: a.to_string(),
            admin: SocketAddr::new(a.ip(), admin_port).to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(ids: &[&str]) -> Ring {
        Ring::new(&ids.iter().map(|s| (s.to_string(), 1)).collect::<Vec<_>>())
    }

    fn upstreams(ids: &[&str]) -> Arc<Upstreams> {
        let config = Config {
            servers: ids
                .iter()
                .map(|id| ServerAddr {
                    client: id.to_string(),
                    admin: format!("{id}-admin"),
                })
                .collect(),
            eject_after_failures: 2,
            ..Config::default()
        };
        Upstreams::new(&config, Metrics::new(&prometheus::Registry::new()).unwrap())
    }

    fn in_ring(up: &Upstreams) -> Vec<String> {
        let snap = up.subscribe().borrow().clone();
        let mut ids: Vec<String> = snap.ring.servers().map(str::to_owned).collect();
        ids.sort();
        ids
    }

    fn checks(up: &Upstreams, id: &str, check: Check, n: usize) {
        for _ in 0..n {
            up.record(id, check);
        }
    }

    #[test]
    fn storage_outage_everywhere_routes_over_the_alive_servers() {
        let up = upstreams(&["a", "b"]);
        checks(&up, "a", Check::Ready, 1);
        checks(&up, "b", Check::Ready, 1);
        assert_eq!(in_ring(&up), ["a", "b"]);
        // One server without storage leaves: its users move to one that has it.
        checks(&up, "a", Check::Degraded, 2);
        assert_eq!(in_ring(&up), ["b"]);
        assert_eq!(up.metrics.panic_routing.get(), 0);
        // Storage gone for all: nobody is ejected for what they all share.
        checks(&up, "b", Check::Degraded, 2);
        assert_eq!(in_ring(&up), ["a", "b"]);
        assert_eq!(up.metrics.panic_routing.get(), 1);
        // A dead server is not routed to, panic or not.
        checks(&up, "b", Check::Down, 1);
        assert_eq!(in_ring(&up), ["a"]);
        // One ready server ends panic routing.
        checks(&up, "b", Check::Ready, 1);
        assert_eq!(in_ring(&up), ["b"]);
        assert_eq!(up.metrics.panic_routing.get(), 0);
        // Starting or draining servers are never panic candidates.
        let up = upstreams(&["c"]);
        checks(&up, "c", Check::Down, 3);
        assert!(in_ring(&up).is_empty());
        assert_eq!(up.metrics.panic_routing.get(), 0);
    }

    #[test]
    fn readyz_answers_are_classified() {
        use chat_admin::Readiness;
        let answer = |status: &str, r: Readiness| {
            format!(
                "HTTP/1.0 {status}\r\ncontent-type: text/plain\r\n\r\n{}",
                r.body()
            )
        };
        assert_eq!(
            classify_readyz(answer("200 OK", Readiness::Ready).as_bytes()),
            Check::Ready
        );
        assert_eq!(
            classify_readyz(
                answer("503 Service Unavailable", Readiness::StorageUnavailable).as_bytes()
            ),
            Check::Degraded
        );
        for r in [Readiness::Starting, Readiness::Draining] {
            let a = answer("503 Service Unavailable", r);
            assert_eq!(classify_readyz(a.as_bytes()), Check::Down, "{a}");
        }
        assert_eq!(classify_readyz(b""), Check::Down);
        assert_eq!(classify_readyz(b"garbage"), Check::Down);
    }

    #[test]
    fn only_connections_whose_pick_changed_move() {
        let (ab, abc) = (ring(&["a", "b"]), ring(&["a", "b", "c"]));
        for i in 0..500 {
            let key = format!("user{i}");
            let key = key.as_bytes();
            let on = ab.pick(key).unwrap();
            // c joins: only keys that now belong to c move.
            assert_eq!(has_moved(&ab, &abc, key, on), abc.pick(key) == Some("c"));
            // c leaves: only keys that were on c move.
            let on = abc.pick(key).unwrap();
            assert_eq!(has_moved(&abc, &ab, key, on), on == "c");
            // A bounded-load placement on a non-first candidate stays put when
            // an unrelated server joins.
            let second = ab.candidates(key).nth(1).unwrap();
            let moved = has_moved(&ab, &abc, key, second);
            assert_eq!(moved, abc.pick(key) == Some("c"));
        }
    }
}
