//! Starting one tier: bind its configured addresses, make its metrics registry,
//! call the library's `run`. Shared by `chat server`, `chat dbproxy`, `chat proxy` and `chat up`.

use std::net::SocketAddr;

use anyhow::Context;
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Binds `addr`; the error names the configuration key it came from.
pub async fn bind(key: &str, addr: SocketAddr) -> anyhow::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("{key}: cannot listen on {addr}"))?;
    let local = listener
        .local_addr()
        .with_context(|| format!("{key}: {addr}"))?;
    Ok((listener, local))
}

/// A chat server whose listeners are already bound.
pub struct BoundServer {
    pub listeners: chat_server::Listeners,
    pub client_addr: SocketAddr,
    pub admin_addr: SocketAddr,
}

pub async fn bind_server(config: &chat_server::Config) -> anyhow::Result<BoundServer> {
    let (client, client_addr) = bind("server.listen", config.listen).await?;
    let (admin, admin_addr) = bind("server.admin_listen", config.admin_listen).await?;
    Ok(BoundServer {
        listeners: chat_server::Listeners { client, admin },
        client_addr,
        admin_addr,
    })
}

pub async fn run_server(
    bound: BoundServer,
    config: chat_server::Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    tracing::info!(
        listen = %bound.client_addr,
        admin = %bound.admin_addr,
        dbproxy = %config.dbproxy_url,
        "chat server starting"
    );
    chat_server::run(bound.listeners, config, Registry::new(), shutdown)
        .await
        .context("chat server failed")
}

/// A dbproxy whose listeners are already bound.
pub struct BoundDbproxy {
    pub listeners: chat_dbproxy::Listeners,
    pub api_addr: SocketAddr,
    pub admin_addr: SocketAddr,
}

pub async fn bind_dbproxy(config: &chat_dbproxy::Config) -> anyhow::Result<BoundDbproxy> {
    let (api, api_addr) = bind("dbproxy.listen", config.listen).await?;
    let (admin, admin_addr) = bind("dbproxy.admin_listen", config.admin_listen).await?;
    Ok(BoundDbproxy {
        listeners: chat_dbproxy::Listeners { api, admin },
        api_addr,
        admin_addr,
    })
}

pub async fn run_dbproxy(
    bound: BoundDbproxy,
    config: chat_dbproxy::Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    tracing::info!(
        listen = %bound.api_addr,
        admin = %bound.admin_addr,
        backend = %config.backend,
        "dbproxy starting"
    );
    chat_dbproxy::run(bound.listeners, config, Registry::new(), shutdown)
        .await
        .context("dbproxy failed")
}

/// `chat server`: runs until Ctrl-C / SIGTERM.
pub async fn server(
    config: chat_server::Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let bound = bind_server(&config).await?;
    run_server(bound, config, shutdown).await
}

/// `chat dbproxy`: runs until Ctrl-C / SIGTERM.
pub async fn dbproxy(
    config: chat_dbproxy::Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let bound = bind_dbproxy(&config).await?;
    run_dbproxy(bound, config, shutdown).await
}

/// A proxy whose listeners are already bound.
pub struct BoundProxy {
    pub listeners: chat_proxy::Listeners,
    pub client_addr: SocketAddr,
    pub admin_addr: SocketAddr,
}

pub async fn bind_proxy(config: &chat_proxy::Config) -> anyhow::Result<BoundProxy> {
    let (client, client_addr) = bind("proxy.listen", config.listen).await?;
    let (admin, admin_addr) = bind("proxy.admin_listen", config.admin_listen).await?;
    Ok(BoundProxy {
        listeners: chat_proxy::Listeners { client, admin },
        client_addr,
        admin_addr,
    })
}

pub async fn run_proxy(
    bound: BoundProxy,
    config: chat_proxy::Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    tracing::info!(
        listen = %bound.client_addr,
        admin = %bound.admin_addr,
        servers = config.servers.len(),
        dns = config.dns_name.as_deref().unwrap_or("-"),
        "proxy starting"
    );
    chat_proxy::run(bound.listeners, config, Registry::new(), shutdown)
        .await
        .context("proxy failed")
}

/// `chat proxy`: runs until Ctrl-C / SIGTERM.
pub async fn proxy(config: chat_proxy::Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let bound = bind_proxy(&config).await?;
    run_proxy(bound, config, shutdown).await
}
