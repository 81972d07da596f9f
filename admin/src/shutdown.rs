//! One shutdown mechanism for every subcommand: Ctrl-C or SIGTERM cancels a
//! [`CancellationToken`], and the tiers drain within their grace periods.

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Returns a token cancelled by the first Ctrl-C or SIGTERM. The watcher task
/// runs on `tasks` and ends when the token is cancelled some other way.
pub fn on_signal(tasks: &TaskTracker) -> CancellationToken {
    let token = CancellationToken::new();
    let watched = token.clone();
    tasks.spawn(async move {
        tokio::select! {
            signal = wait_for_signal() => {
                tracing::info!(signal, "shutting down");
                watched.cancel();
            }
            _ = watched.cancelled() => {}
        }
    });
    token
}

#[cfg(unix)]
async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C only");
            return ctrl_c().await;
        }
    };
    tokio::select! {
        name = ctrl_c() => name,
        _ = term.recv() => "SIGTERM",
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() -> &'static str {
    ctrl_c().await
}

async fn ctrl_c() -> &'static str {
    if let Err(e) = tokio::signal::ctrl_c().await {
        tracing::warn!(error = %e, "cannot listen for Ctrl-C");
        // Without a signal handler there is nothing to wait for: never fire.
        std::future::pending::<()>().await;
    }
    "SIGINT"
}
