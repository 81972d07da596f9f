//! [`Members`]: where a tier finds the chat servers: a static list from its
//! config, or a DNS name (a Kubernetes headless Service) resolved again every
//! refresh period. The proxies follow it to build their ring over the
//! servers; the chat servers to know their peers.
//!
//! A failed or empty answer keeps the previous list: a DNS blip must not
//! empty a ring (health checks and link timeouts still drop dead servers).

use std::net::SocketAddr;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::tick::Ticker;

/// The membership source named by a tier's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Members<T> {
    /// Fixed in the config.
    Static(Vec<T>),
    /// Every address `name` resolves to, at `port`.
    Dns(Dns),
}

impl<T> Members<T> {
    /// `Dns` when a name is set, else the static list: the rule of every
    /// tier's `dns_name` key.
    pub fn from_config(list: Vec<T>, dns: Option<Dns>) -> Members<T> {
        match dns {
            Some(d) => Members::Dns(d),
            None => Members::Static(list),
        }
    }
}

/// A DNS name listing the servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dns {
    pub name: String,
    /// The port every resolved address is taken at.
    pub port: u16,
    /// How often the name is resolved again.
    pub refresh: Duration,
}

impl Dns {
    /// Every address the name resolves to now, sorted, each once.
    pub async fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        let mut list: Vec<SocketAddr> = tokio::net::lookup_host((self.name.as_str(), self.port))
            .await?
            .collect();
        list.sort();
        list.dedup();
        Ok(list)
    }

    /// [`Dns::resolve`], logging a failed or empty answer: `None` then,
    /// meaning "keep the last list".
    pub async fn lookup(&self) -> Option<Vec<SocketAddr>> {
        let name = &self.name;
        match self.resolve().await {
            Ok(list) if !list.is_empty() => Some(list),
            Ok(_) => {
                tracing::warn!(%name, "DNS returned no chat servers; keeping the last list");
                None
            }
            Err(e) => {
                tracing::warn!(%name, error = %e, "DNS lookup failed; keeping the last list");
                None
            }
        }
    }

    /// Resolves the name every `refresh`, the first time at once, and hands
    /// each usable answer to `found`, until `stop`.
    pub async fn follow(&self, stop: CancellationToken, mut found: impl FnMut(Vec<SocketAddr>)) {
        let mut tick = Ticker::new(self.refresh, stop);
        while tick.tick().await {
            match tick.unless_stopped(self.lookup()).await {
                Some(Some(list)) => found(list),
                Some(None) => {}
                None => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn localhost(port: u16) -> Dns {
        Dns {
            name: "localhost".into(),
            port,
            refresh: Duration::from_millis(10),
        }
    }

    #[tokio::test]
    async fn resolves_sorted_at_the_port() {
        let list = localhost(7000).resolve().await.unwrap();
        assert!(!list.is_empty());
        assert!(list
            .iter()
            .all(|a| a.port() == 7000 && a.ip().is_loopback()));
        assert!(list.windows(2).all(|w| w[0] < w[1]));
    }

    #[tokio::test]
    async fn follow_reports_until_stopped_and_keeps_quiet_on_failure() {
        let stop = CancellationToken::new();
        let mut seen = 0;
        let s = stop.clone();
        localhost(1)
            .follow(stop.clone(), |list| {
                assert!(!list.is_empty());
                seen += 1;
                if seen == 3 {
                    s.cancel();
                }
            })
            .await;
        assert_eq!(seen, 3);
        let bad = Dns {
            name: "no-such-host.invalid".into(),
            ..localhost(1)
        };
        assert_eq!(bad.lookup().await, None);
    }

    #[test]
    fn a_dns_name_wins_over_the_list() {
        let dns = localhost(1);
        assert_eq!(
            Members::from_config(vec!["a:1"], Some(dns.clone())),
            Members::Dns(dns)
        );
        assert_eq!(
            Members::<&str>::from_config(vec!["a:1"], None),
            Members::Static(vec!["a:1"])
        );
    }
}
