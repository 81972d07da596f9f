//! `chat`: one binary for every tier. Parses flags, loads and validates the
//! configuration, sets up tracing and hands over to a library `run`
//! (through [`tiers`]), to [`up`] for the single-machine stack, or to
//! [`client`] for the terminal client; `chat bench` runs the separate
//! `chat-bench` binary ([`bench`]).

mod bench;
mod certs;
mod client;
mod config;
mod telemetry;
mod tiers;
mod up;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use chat_admin::shutdown;
use clap::{Parser, Subcommand};

/// Exit status for configuration errors and commands that cannot run at all.
const EXIT_USAGE: u8 = 2;

#[derive(Parser, Debug)]
#[command(name = "chat", version, about)]
struct Cli {
    /// TOML configuration file; `CHAT_<SECTION>__<KEY>` environment variables
    /// override it (e.g. `CHAT_SERVER__LISTEN=0.0.0.0:7000`).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Load and validate the configuration, print "config ok" and exit.
    #[arg(long, global = true)]
    check_config: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a chat server (client protocol + admin endpoint).
    Server,
    /// Run the dbproxy, the storage tier.
    Dbproxy,
    /// Run the client-facing proxy: routes each client to its chat server.
    Proxy,
    /// Run the whole stack in one process: a dbproxy (SQLite, or an existing
    /// MySQL/MariaDB), `up.servers` chat servers (3 by default) as one cluster,
    /// and a proxy in front of them.
    Up {
        /// Where the SQLite database lives (overrides `up.data_dir`).
        #[arg(long, value_name = "DIR", conflicts_with = "mysql")]
        data_dir: Option<PathBuf>,
        /// Store in an existing MySQL/MariaDB whose primary is at HOST:PORT
        /// instead of SQLite. User, password source, database and replicas
        /// come from `[dbproxy.mysql]` / `CHAT_DBPROXY__MYSQL__*`.
        #[arg(long, value_name = "HOST:PORT")]
        mysql: Option<String>,
    },
    /// Interactive terminal client.
    Client {
        /// Proxy (or server) addresses, tried in turn on connect failure or
        /// disconnect; the default is the proxy of `chat up`.
        #[arg(value_name = "ADDR", default_value = "127.0.0.1:7001")]
        addrs: Vec<String>,
    },
    /// Make a throwaway CA and a certificate per tier (server, proxy,
    /// dbproxy, each with its role's name) for a development cluster; kept
    /// if they already exist.
    Certs {
        /// Directory for ca.pem, server.pem/.key, proxy.pem/.key, dbproxy.pem/.key.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Load generator: connections, fan-out, durable writes, DMs (see
    /// docs/BENCHMARKS.md). Runs `chat-bench` with the arguments that follow;
    /// `chat bench --help` lists them.
    #[command(disable_help_flag = true)]
    Bench {
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<OsString>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Bench { args } = &cli.command {
        return bench::forward(args);
    }
    if let Command::Certs { out } = &cli.command {
        return match certs::run(out) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("chat: {e:#}");
                ExitCode::FAILURE
            }
        };
    }

    let config = match config::Config::load(cli.config.as_deref()).and_then(|c| {
        c.validate()?;
        Ok(c)
    }) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("chat: config error: {e:#}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if cli.check_config {
        println!("config ok");
        return ExitCode::SUCCESS;
    }

    if let Err(e) = telemetry::init(&config.log) {
        eprintln!("chat: {e:#}");
        return ExitCode::from(EXIT_USAGE);
    }

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chat: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chat: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, config: config::Config) -> anyhow::Result<()> {
    let signals = tokio_util::task::TaskTracker::new();
    let shutdown = shutdown::on_signal(&signals);
    let result = run_tier(command, config, shutdown.clone()).await;
    shutdown.cancel();
    signals.close();
    signals.wait().await;
    result
}

async fn run_tier(
    command: Command,
    config: config::Config,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    match command {
        Command::Server => tiers::server(config.server, shutdown).await,
        Command::Dbproxy => tiers::dbproxy(config.dbproxy, shutdown).await,
        Command::Up { data_dir, mysql } => {
            up::run(config, up::Options { data_dir, mysql }, shutdown).await
        }
        Command::Client { addrs } => client::run(addrs, shutdown).await,
        Command::Proxy => tiers::proxy(config.proxy, shutdown).await,
        Command::Bench { .. } | Command::Certs { .. } => {
            unreachable!("run before the configuration is loaded")
        }
    }
}
