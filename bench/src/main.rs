//! `chat-bench`: flags, tracing, a runtime, then [`chat_bench::run`] until it
//! ends or Ctrl-C / SIGTERM. `chat bench …` runs this binary too.

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let options = chat_bench::Options::parse();
    // stderr, so that stdout keeps the report. `RUST_LOG` when set.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chat-bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let signals = tokio_util::task::TaskTracker::new();
        let shutdown = chat_admin::shutdown::on_signal(&signals);
        let result = chat_bench::run(options, shutdown.clone()).await;
        shutdown.cancel();
        signals.close();
        signals.wait().await;
        result
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chat-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
