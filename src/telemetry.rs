//! Tracing setup: text or JSON lines on stderr, filtered by `RUST_LOG` when set,
//! otherwise by `log.level` from the configuration.

use std::io::IsTerminal;

use anyhow::Context;
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

pub fn init(log: &LogConfig) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => {
            EnvFilter::try_new(&directives).context("RUST_LOG is not a tracing filter")?
        }
        _ => EnvFilter::try_new(&log.level).context("log.level is not a tracing filter")?,
    };
    // stderr, so that `chat client` keeps stdout for the conversation.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let installed = match log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    installed.map_err(|e| anyhow::anyhow!("installing the tracing subscriber: {e}"))
}
