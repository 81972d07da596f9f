//! `chat up`: the whole stack in one process for a single machine — a dbproxy
//! on embedded SQLite under the data directory (or, with `--mysql` or
//! `[dbproxy] backend = "mysql"`, on an existing MySQL/MariaDB), `up.servers`
//! chat servers (default 3) forming one cluster, and a proxy in front of them
//! — each a task on its own listeners, stopped by Ctrl-C: proxy and servers
//! first, then the dbproxy.

use std::path::PathBuf;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::tiers;

/// What `chat up` was asked for on the command line.
#[derive(Debug, Default)]
pub struct Options {
    /// Where the SQLite database lives (overrides `up.data_dir`).
    pub data_dir: Option<PathBuf>,
    /// `host:port` of an existing MySQL/MariaDB primary: the dbproxy uses the
    /// mysql backend there, the rest of `[dbproxy.mysql]` (user, password
    /// source, database, replicas) from the config.
    pub mysql: Option<String>,
}

pub async fn run(
    mut config: Config,
    options: Options,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (storage, hops) = prepare(&mut config, options)?;
    // Bind everything before starting anything: a busy port fails the whole
    // command at once instead of leaving half a stack running.
    let bound_db = tiers::bind_dbproxy(&config.dbproxy).await?;
    let db_admin = bound_db.admin_addr;
    let servers = bind_servers(&mut config, bound_db.api_addr).await?;
    let listing: String = servers
        .iter()
        .map(|(_, b)| {
            format!(
                "\n                {} (metrics http://{}/metrics)",
                b.client_addr, b.admin_addr
            )
        })
        .collect();
    let bound_proxy = tiers::bind_proxy(&config.proxy).await?;
    let (proxy_addr, proxy_admin) = (bound_proxy.client_addr, bound_proxy.admin_addr);
    let n = servers.len();
    let running = start(config, bound_db, servers, bound_proxy, shutdown);

    println!(
        "chat is up: a proxy, {n} chat server{}, dbproxy on {storage}\n\
         \n  talk to it:   nc {} {}          (the proxy)\
         \n                cargo run -- client {proxy_addr}\
         \n  servers:{listing}\
         \n  internal hops: {hops}\
         \n  metrics:      http://{proxy_admin}/metrics (proxy)\
         \n                http://{db_admin}/metrics (dbproxy)\
         \n\nCtrl-C to stop.",
        if n == 1 { "" } else { "s" },
        proxy_addr.ip(),
        proxy_addr.port(),
    );
    running.await?;
    println!("chat stopped");
    Ok(())
}

/// Applies the command line and `[up]` to the tiers' sections: storage (the
/// SQLite file under the data directory, or `--mysql`) and the internal
/// hops' TLS; returns the banner's descriptions of both.
fn prepare(config: &mut Config, options: Options) -> anyhow::Result<(String, String)> {
    if let Some(primary) = options.mysql {
        config.dbproxy.backend = chat_dbproxy::StorageKind::Mysql;
        config.dbproxy.mysql.primary = primary;
        config
            .dbproxy
            .validate()
            .context("--mysql: invalid [dbproxy] settings")?;
    }
    let data_dir = options
        .data_dir
        .unwrap_or_else(|| config.up.data_dir.clone());
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("up.data_dir: cannot create {}", data_dir.display()))?;
    let storage = if config.dbproxy.backend == chat_dbproxy::StorageKind::Mysql {
        let m = &config.dbproxy.mysql;
        let replicas = if m.replicas.is_empty() {
            "no replicas".to_string()
        } else {
            format!("replicas {}", m.replicas.join(", "))
        };
        format!(
            "MySQL/MariaDB primary {} database {} ({replicas})",
            m.primary, m.database
        )
    } else {
        let db_path = data_dir.join("chat.db");
        config.dbproxy.sqlite_path = db_path
            .to_str()
            .with_context(|| format!("up.data_dir: {} is not UTF-8", data_dir.display()))?
            .to_string();
        format!("SQLite at {}", db_path.display())
    };
    let hops = if config.up.tls {
        secure_hops(config, &data_dir.join("tls"))?
    } else {
        "plain TCP (up.tls = false)".to_string()
    };

    // Every server's dbproxy pool must fit what the one dbproxy accepts.
    let pooled = u64::from(config.up.servers) * config.server.dbproxy_pool_max as u64;
    if pooled > config.dbproxy.max_connections as u64 {
        anyhow::bail!(
            "server.dbproxy_pool_max: {} servers × {} connections exceed dbproxy.max_connections ({})",
            config.up.servers,
            config.server.dbproxy_pool_max,
            config.dbproxy.max_connections
        );
    }
    Ok((storage, hops))
}

/// Binds `up.servers` chat servers, ports 10 apart, as one cluster with a
/// fresh secret storing at `db_addr`, and points the proxy at them.
async fn bind_servers(
    config: &mut Config,
    db_addr: std::net::SocketAddr,
) -> anyhow::Result<Vec<(chat_server::Config, tiers::BoundServer)>> {
    let scheme = if config.server.tls.is_some() {
        "https"
    } else {
        "http"
    };
    config.server.dbproxy_url = format!("{scheme}://{db_addr}");
    let n = config.up.servers;
    let mut servers = Vec::new();
    for i in 0..n {
        let mut c = config.server.clone();
        c.listen = offset_port("server.listen", c.listen, i)?;
        c.admin_listen = offset_port("server.admin_listen", c.admin_listen, i)?;
        let bound = tiers::bind_server(&c).await?;
        servers.push((c, bound));
    }
    let secret = chat_server::cluster::new_secret();
    let peers: Vec<String> = servers
        .iter()
        .map(|(_, b)| b.client_addr.to_string())
        .collect();
    for (c, b) in &mut servers {
        c.cluster.advertise = b.client_addr.to_string();
        c.cluster.peers = if n > 1 { peers.clone() } else { Vec::new() };
        c.cluster.dns_name = None;
        c.cluster.secret = secret.as_str().into();
        if config.proxy.send_proxy_line {
            trust_local_proxy(c, b.client_addr);
        }
    }
    // The proxy routes to the servers just bound, whatever `[proxy] servers` says.
    config.proxy.dns_name = None;
    config.proxy.servers = servers
        .iter()
        .map(|(_, b)| chat_proxy::ServerAddr {
            client: b.client_addr.to_string(),
            admin: b.admin_addr.to_string(),
        })
        .collect();
    Ok(servers)
}

/// Starts every tier on its listeners; the future ends when all have
/// stopped, with the first error. Shutdown order: the servers drain first
/// (their in-flight messages still need storage), then the dbproxy. Any
/// tier failing stops the others.
fn start(
    config: Config,
    bound_db: tiers::BoundDbproxy,
    servers: Vec<(chat_server::Config, tiers::BoundServer)>,
    bound_proxy: tiers::BoundProxy,
    shutdown: CancellationToken,
) -> impl std::future::Future<Output = anyhow::Result<()>> {
    let server_stop = shutdown.child_token();
    let dbproxy_stop = CancellationToken::new();
    let dbproxy = tokio::spawn({
        let (own, server_stop) = (dbproxy_stop.clone(), server_stop.clone());
        let dbproxy_config = config.dbproxy;
        async move {
            // A drop guard, so that a panic stops the other tiers too.
            let _stop_server = server_stop.drop_guard();
            tiers::run_dbproxy(bound_db, dbproxy_config, own).await
        }
    });
    // The proxy stops with the servers (and, failing, stops them).
    let proxy = tokio::spawn({
        let server_stop = server_stop.clone();
        let proxy_config = config.proxy;
        async move {
            let _stop_server = server_stop.clone().drop_guard();
            tiers::run_proxy(bound_proxy, proxy_config, server_stop).await
        }
    });
    // The dbproxy stops once every server has stopped.
    let servers_done = tokio::spawn({
        let mut running = tokio::task::JoinSet::new();
        for (c, bound) in servers {
            let own = server_stop.clone();
            running.spawn(async move {
                let _stop_all = own.clone().drop_guard();
                tiers::run_server(bound, c, own).await
            });
        }
        async move {
            let _stop_dbproxy = dbproxy_stop.drop_guard();
            let mut result = Ok(());
            while let Some(r) = running.join_next().await {
                let r = r.context("chat server task panicked").and_then(|r| r);
                if result.is_ok() {
                    result = r;
                }
            }
            result
        }
    });
    // Every task above is joined here.
    async move {
        let (proxy_result, server_result, dbproxy_result) =
            tokio::join!(proxy, servers_done, dbproxy);
        proxy_result.context("proxy task panicked")??;
        let server_result = server_result.context("chat server task panicked")?;
        let dbproxy_result = dbproxy_result.context("dbproxy task panicked")?;
        server_result?;
        dbproxy_result?;
        Ok(())
    }
}

/// Turns on mutual TLS for every internal hop, with the certificates under
/// `dir` (made at first start), and a fresh bearer token from the servers to
/// the dbproxy; returns the banner's description.
fn secure_hops(config: &mut Config, dir: &std::path::Path) -> anyhow::Result<String> {
    let ids = crate::certs::ensure(dir)?;
    let token = chat_tls::Secret::new(chat_server::cluster::new_secret());
    config.dbproxy.tls = Some(ids.dbproxy);
    config.dbproxy.api_tokens = vec![token.clone()];
    config.server.tls = Some(ids.server.clone());
    config.server.dbproxy_token = token;
    config.proxy.upstream_tls = Some(ids.proxy);
    let fingerprint = chat_tls::fingerprint(&ids.server.ca)?;
    Ok(format!(
        "mutual TLS, CA {} ({}; SHA-256 {fingerprint})\
         \n                the servers take TLS only: clients use the proxy",
        ids.server.ca.display(),
        if ids.made {
            "made now"
        } else {
            "kept from before"
        },
    ))
}

/// `addr` with its port raised by `10 · i` (port 0 stays 0: any free port).
fn offset_port(
    key: &str,
    mut a: std::net::SocketAddr,
    i: u32,
) -> anyhow::Result<std::net::SocketAddr> {
    if a.port() != 0 {
        let port = u32::from(a.port()) + 10 * i;
        a.set_port(u16::try_from(port).with_context(|| format!("{key}: port {port} is too high"))?);
    }
    Ok(a)
}

/// The proxy of `chat up` runs on this machine and dials the servers' client
/// addresses, so its connections come from loopback or from the address the
/// server listens on: those may send the PROXY line (added to whatever
/// `[server] trust_proxy_line` lists already).
fn trust_local_proxy(c: &mut chat_server::Config, client_addr: std::net::SocketAddr) {
    let mut local = vec!["127.0.0.0/8".to_string(), "::1".to_string()];
    if !client_addr.ip().is_unspecified() {
        local.push(client_addr.ip().to_string());
    }
    for block in local {
        if !c.trust_proxy_line.contains(&block) {
            c.trust_proxy_line.push(block);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The servers `chat up` starts trust its proxy's PROXY line, whichever
    /// address they listen on, and keep what the config already trusted.
    #[test]
    fn servers_trust_the_local_proxy() {
        let mut c = chat_server::Config {
            trust_proxy_line: vec!["10.0.0.0/8".into()],
            ..Default::default()
        };
        trust_local_proxy(&mut c, "192.0.2.7:7000".parse().unwrap());
        trust_local_proxy(&mut c, "192.0.2.7:7010".parse().unwrap());
        assert_eq!(
            c.trust_proxy_line,
            ["10.0.0.0/8", "127.0.0.0/8", "::1", "192.0.2.7"]
        );
        c.validate().unwrap();
        let mut c = chat_server::Config::default();
        trust_local_proxy(&mut c, "0.0.0.0:7000".parse().unwrap());
        assert_eq!(c.trust_proxy_line, ["127.0.0.0/8", "::1"]);
    }
}
