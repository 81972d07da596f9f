//! `chat up`: the whole stack in one process for a single machine — a dbproxy
//! on embedded SQLite under the data directory (or, with `--mysql` or
//! `[dbproxy] backend = "mysql"`, on an existing MySQL/MariaDB), one chat
//! server talking to it and a proxy in front of the server — each a task on its
//! own listener, stopped by Ctrl-C: proxy and server first, then the dbproxy.

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
    if let Some(primary) = options.mysql {
        config.dbproxy.backend = "mysql".into();
        config.dbproxy.mysql.primary = primary;
        config
            .dbproxy
            .validate()
            .context("--mysql: invalid [dbproxy] settings")?;
    }
    let storage = if config.dbproxy.backend == "mysql" {
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
        let data_dir = options
            .data_dir
            .unwrap_or_else(|| config.up.data_dir.clone());
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("up.data_dir: cannot create {}", data_dir.display()))?;
        let db_path = data_dir.join("chat.db");
        config.dbproxy.sqlite_path = db_path
            .to_str()
            .with_context(|| format!("up.data_dir: {} is not UTF-8", data_dir.display()))?
            .to_string();
        format!("SQLite at {}", db_path.display())
    };

    // Bind everything before starting anything: a busy port fails the whole
    // command at once instead of leaving half a stack running.
    let (db_listener, db_addr) = tiers::bind("dbproxy.listen", &config.dbproxy.listen).await?;
    config.server.dbproxy_url = format!("http://{db_addr}");
    let bound = tiers::bind_server(&config.server).await?;
    let (client_addr, admin_addr) = (bound.client_addr, bound.admin_addr);
    // The proxy routes to the server just bound, whatever `[proxy] servers` says.
    config.proxy.dns_name = None;
    config.proxy.servers = vec![chat_proxy::ServerAddr {
        client: client_addr.to_string(),
        admin: admin_addr.to_string(),
    }];
    let bound_proxy = tiers::bind_proxy(&config.proxy).await?;
    let (proxy_addr, proxy_admin) = (bound_proxy.client_addr, bound_proxy.admin_addr);

    // Shutdown order: the server drains first (its in-flight messages still
    // need storage), then the dbproxy. Either tier failing stops the other.
    let server_stop = shutdown.child_token();
    let dbproxy_stop = CancellationToken::new();
    let dbproxy = tokio::spawn({
        let (own, server_stop) = (dbproxy_stop.clone(), server_stop.clone());
        let dbproxy_config = config.dbproxy;
        async move {
            // A drop guard, so that a panic stops the other tier too.
            let _stop_server = server_stop.drop_guard();
            tiers::run_dbproxy(db_listener, dbproxy_config, own).await
        }
    });
    // The proxy stops with the server (and, failing, stops it).
    let proxy = tokio::spawn({
        let server_stop = server_stop.clone();
        let proxy_config = config.proxy;
        async move {
            let _stop_server = server_stop.clone().drop_guard();
            tiers::run_proxy(bound_proxy, proxy_config, server_stop).await
        }
    });
    let server = tokio::spawn({
        let (own, dbproxy_stop) = (server_stop.clone(), dbproxy_stop.clone());
        let server_config = config.server;
        async move {
            let _stop_dbproxy = dbproxy_stop.drop_guard();
            tiers::run_server(bound, server_config, own).await
        }
    });

    println!(
        "chat is up: a proxy, 1 chat server, dbproxy on {storage}\n\
         \n  talk to it:   nc {} {}          (the proxy)\
         \n                cargo run -- client {proxy_addr}\
         \n                nc {} {}          (the chat server directly)\
         \n  metrics:      http://{proxy_admin}/metrics (proxy)\
         \n                http://{admin_addr}/metrics (server)\
         \n                http://{db_addr}/metrics (dbproxy)\
         \n  health:       http://{admin_addr}/healthz  http://{admin_addr}/readyz\
         \n\nCtrl-C to stop.",
        proxy_addr.ip(),
        proxy_addr.port(),
        client_addr.ip(),
        client_addr.port(),
    );

    let (proxy_result, server_result, dbproxy_result) = tokio::join!(proxy, server, dbproxy);
    proxy_result.context("proxy task panicked")??;
    let server_result = server_result.context("chat server task panicked")?;
    let dbproxy_result = dbproxy_result.context("dbproxy task panicked")?;
    server_result?;
    dbproxy_result?;
    println!("chat stopped");
    Ok(())
}
