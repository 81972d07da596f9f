//! The one configuration of the `chat` binary: a section per tier plus `log` and
//! `up`, read from an optional TOML file and then `CHAT_`-prefixed environment
//! variables (`CHAT_SERVER__LISTEN=0.0.0.0:7000`: section and key joined by `__`),
//! the environment winning. Unknown keys are errors, so a typo is reported
//! instead of silently ignored.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use config::{Environment, File, FileFormat};
use serde::Deserialize;
use tracing_subscriber::EnvFilter;

/// Prefix of the environment variables read as configuration.
pub const ENV_PREFIX: &str = "CHAT";
/// Joins a section and a key in an environment variable name. Two underscores,
/// because keys themselves contain one (`shutdown_grace_secs`).
pub const ENV_SEPARATOR: &str = "__";

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Logging of every tier.
    pub log: LogConfig,
    /// The chat server tier (`chat server`, and the server that `chat up` starts).
    pub server: chat_server::Config,
    /// The storage tier (`chat dbproxy`, and the dbproxy that `chat up` starts).
    pub dbproxy: chat_dbproxy::Config,
    /// The client-facing proxy (`chat proxy`, and the proxy that `chat up`
    /// starts, which is pointed at the servers it starts).
    pub proxy: chat_proxy::Config,
    /// The single-machine stack that `chat up` starts.
    pub up: UpConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A tracing filter: a level (`info`) or directives (`info,chat_server=debug`).
    /// `RUST_LOG`, when set, takes precedence.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// Most chat servers `chat up` starts (their ports are 10 apart).
pub const MAX_UP_SERVERS: u32 = 8;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpConfig {
    /// Directory for the SQLite database (`<data_dir>/chat.db`); created if missing.
    pub data_dir: PathBuf,
    /// Number of chat servers to start (1 to 8). Server `i` listens on the
    /// `[server]` ports plus `10 · i` (7000, 7010, 7020 …; admin 9101, 9111 …).
    pub servers: u32,
    /// Mutual TLS on the internal hops (proxy → servers, server ↔ server,
    /// servers → dbproxy) with certificates made under `<data_dir>/tls`, and a
    /// fresh bearer token between the servers and the dbproxy. The servers
    /// then take TLS only: clients connect through the proxy. `false` runs
    /// every hop in plain TCP (to compare the cost, or to `nc` a server).
    pub tls: bool,
}

impl Default for UpConfig {
    fn default() -> Self {
        UpConfig {
            data_dir: PathBuf::from("data"),
            servers: 3,
            tls: true,
        }
    }
}

impl Config {
    /// Reads the file (if any) and the process environment.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Config> {
        Config::load_from(file, None)
    }

    /// Like [`Config::load`], with `env` standing in for the process environment
    /// when given (tests use it so that they never mutate the real one).
    pub fn load_from(
        file: Option<&Path>,
        env: Option<config::Map<String, String>>,
    ) -> anyhow::Result<Config> {
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            // An explicitly named file must exist: a typo in the path would
            // otherwise start the tier on defaults.
            builder = builder.add_source(File::from(path).format(FileFormat::Toml).required(true));
        }
        builder = builder.add_source(
            Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("_")
                .separator(ENV_SEPARATOR)
                .source(env),
        );
        let origin = match file {
            Some(p) => format!("{} and {ENV_PREFIX}_* environment", p.display()),
            None => format!("{ENV_PREFIX}_* environment"),
        };
        builder
            .build()
            .and_then(|c| c.try_deserialize::<Config>())
            .with_context(|| format!("reading configuration from {origin}"))
    }

    /// Checks every section; the error names the offending key.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.log.validate()?;
        self.up.validate()?;
        self.server.validate().context("invalid [server] section")?;
        self.dbproxy
            .validate()
            .context("invalid [dbproxy] section")?;
        self.proxy.validate().context("invalid [proxy] section")?;
        Ok(())
    }
}

impl LogConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        EnvFilter::try_new(&self.level)
            .map(drop)
            .with_context(|| format!("log.level: {:?} is not a tracing filter", self.level))
    }
}

impl UpConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.data_dir.as_os_str().is_empty() {
            bail!("up.data_dir: must not be empty");
        }
        if !(1..=MAX_UP_SERVERS).contains(&self.servers) {
            bail!(
                "up.servers: {} is out of range; start 1 to {MAX_UP_SERVERS} chat servers",
                self.servers
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::Duration;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Option<config::Map<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn toml_file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    fn error_text(r: anyhow::Result<Config>) -> String {
        format!("{:#}", r.err().expect("loading should fail"))
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::load_from(None, env(&[])).unwrap();
        c.validate().unwrap();
        assert_eq!(c.log.format, LogFormat::Text);
        assert_eq!(c.log.level, "info");
        assert_eq!(c.up.data_dir, PathBuf::from("data"));
        assert_eq!(c.up.servers, 3);
        assert_eq!(c.server.listen, chat_server::Config::default().listen);
        assert_eq!(c.dbproxy.listen, chat_dbproxy::Config::default().listen);
    }

    #[test]
    fn file_then_env_override() {
        let f = toml_file(
            r#"
            [log]
            format = "json"
            level = "debug"

            [server]
            listen = "127.0.0.1:17000"

            [dbproxy]
            listen = "127.0.0.1:17100"
            shutdown_grace_secs = 3

            [up]
            data_dir = "/tmp/chat-data"
            "#,
        );
        let c = Config::load_from(
            Some(f.path()),
            env(&[
                ("CHAT_SERVER__LISTEN", "0.0.0.0:7000"),
                ("CHAT_LOG__LEVEL", "warn"),
                ("CHAT_DBPROXY__SHUTDOWN_GRACE_SECS", "7"),
                ("OTHER_VAR", "ignored"),
            ]),
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.log.level, "warn");
        assert_eq!(c.server.listen.to_string(), "0.0.0.0:7000");
        assert_eq!(c.dbproxy.listen.to_string(), "127.0.0.1:17100");
        assert_eq!(c.dbproxy.shutdown_grace_secs, Duration::from_secs(7));
        assert_eq!(c.up.data_dir, PathBuf::from("/tmp/chat-data"));
    }

    #[test]
    fn env_only() {
        let c = Config::load_from(None, env(&[("CHAT_LOG__FORMAT", "json")])).unwrap();
        assert_eq!(c.log.format, LogFormat::Json);
    }

    #[test]
    fn unknown_key_in_file_is_named() {
        let f = toml_file("[server]\nlisten_adress = \"127.0.0.1:1\"\n");
        let e = error_text(Config::load_from(Some(f.path()), env(&[])));
        assert!(e.contains("listen_adress"), "{e}");
    }

    #[test]
    fn unknown_section_is_named() {
        let f = toml_file("[sever]\nlisten = \"127.0.0.1:1\"\n");
        let e = error_text(Config::load_from(Some(f.path()), env(&[])));
        assert!(e.contains("sever"), "{e}");
    }

    #[test]
    fn unknown_env_key_is_named() {
        let e = error_text(Config::load_from(None, env(&[("CHAT_UP__DATADIR", "x")])));
        assert!(e.contains("datadir"), "{e}");
    }

    #[test]
    fn bad_value_names_the_key() {
        let e = error_text(Config::load_from(None, env(&[("CHAT_LOG__FORMAT", "xml")])));
        assert!(e.contains("format") || e.contains("xml"), "{e}");

        let f = toml_file("[dbproxy]\nshutdown_grace_secs = \"soon\"\n");
        let e = error_text(Config::load_from(Some(f.path()), env(&[])));
        assert!(e.contains("shutdown_grace_secs"), "{e}");

        // Typed values: an address, a backend.
        for (file, key) in [
            ("[proxy]\nlisten = \"localhost:7001\"\n", "listen"),
            ("[dbproxy]\nbackend = \"oracle\"\n", "backend"),
        ] {
            let f = toml_file(file);
            let e = error_text(Config::load_from(Some(f.path()), env(&[])));
            assert!(e.contains(key), "{e}");
        }
    }

    #[test]
    fn missing_file_is_an_error() {
        let e = error_text(Config::load_from(
            Some(Path::new("/nonexistent/chat.toml")),
            env(&[]),
        ));
        assert!(e.contains("/nonexistent/chat.toml"), "{e}");
    }

    #[test]
    fn validate_names_the_key() {
        let c = Config::load_from(None, env(&[("CHAT_UP__SERVERS", "9")])).unwrap();
        let e = format!("{:#}", c.validate().unwrap_err());
        assert!(e.contains("up.servers"), "{e}");

        let c = Config::load_from(None, env(&[("CHAT_LOG__LEVEL", "info,=[")])).unwrap();
        let e = format!("{:#}", c.validate().unwrap_err());
        assert!(e.contains("log.level"), "{e}");

        for (toml, key) in [
            (
                "[server]\nfirst_line_timeout_secs = 0\n",
                "server.first_line_timeout_secs",
            ),
            (
                "[server]\nfirst_line_timeout_secs = 3601\n",
                "server.first_line_timeout_secs",
            ),
            (
                "[server]\ntrust_proxy_line = [\"10.0.0.0/8\", \"10.0.0.0/33\"]\n",
                "server.trust_proxy_line[1]",
            ),
            (
                "[server]\ntrust_proxy_line = [\"proxy.local\"]\n",
                "server.trust_proxy_line[0]",
            ),
        ] {
            let f = toml_file(toml);
            let c = Config::load_from(Some(f.path()), env(&[])).unwrap();
            let e = format!("{:#}", c.validate().unwrap_err());
            assert!(e.contains(key), "{toml:?}: {e}");
        }
    }

    #[test]
    fn first_line_and_proxy_line_keys_have_defaults() {
        let c = Config::load_from(None, env(&[])).unwrap();
        assert_eq!(c.server.first_line_timeout_secs, 10);
        assert!(c.server.trust_proxy_line.is_empty());
        assert!(c.proxy.send_proxy_line);
        let f = toml_file(
            "[server]\ntrust_proxy_line = [\"127.0.0.1\", \"fd00::/8\"]\n[proxy]\nsend_proxy_line = false\n",
        );
        let c = Config::load_from(Some(f.path()), env(&[])).unwrap();
        c.validate().unwrap();
        assert_eq!(c.server.trust_proxy_line, ["127.0.0.1", "fd00::/8"]);
        assert!(!c.proxy.send_proxy_line);
    }

    #[test]
    fn http_bounds_and_pool_keys_load_and_are_named() {
        let c = Config::load_from(
            None,
            env(&[
                ("CHAT_SERVER__ADMIN_HTTP__MAX_CONNECTIONS", "8"),
                ("CHAT_SERVER__DBPROXY_POOL_MAX", "100"),
                ("CHAT_DBPROXY__ADMIN_LISTEN", "0.0.0.0:9103"),
                ("CHAT_DBPROXY__IDLE_TIMEOUT_MS", "45000"),
                ("CHAT_PROXY__ADMIN_HTTP__HEADER_TIMEOUT_MS", "2000"),
            ]),
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.server.admin_http.max_connections, 8);
        assert_eq!(c.server.dbproxy_pool_max, 100);
        assert_eq!(c.dbproxy.admin_listen.to_string(), "0.0.0.0:9103");
        assert_eq!(c.dbproxy.idle_timeout_ms, 45_000);
        assert_eq!(c.proxy.admin_http.header_timeout_ms, 2000);
        for (key, value, named) in [
            (
                "CHAT_SERVER__ADMIN_HTTP__IDLE_TIMEOUT_MS",
                "0",
                "server.admin_http.idle_timeout_ms",
            ),
            (
                "CHAT_SERVER__DBPROXY_POOL_MAX",
                "0",
                "server.dbproxy_pool_max",
            ),
            (
                "CHAT_SERVER__DBPROXY_POOL_IDLE_MS",
                "1",
                "server.dbproxy_pool_idle_ms",
            ),
            (
                "CHAT_PROXY__ADMIN_HTTP__MAX_CONNECTIONS",
                "0",
                "proxy.admin_http.max_connections",
            ),
            (
                "CHAT_DBPROXY__ADMIN_HTTP__HEADER_TIMEOUT_MS",
                "0",
                "admin_http.header_timeout_ms",
            ),
            (
                "CHAT_DBPROXY__REQUEST_TIMEOUT_MS",
                "0",
                "request_timeout_ms",
            ),
        ] {
            let c = Config::load_from(None, env(&[(key, value)])).unwrap();
            let e = format!("{:#}", c.validate().unwrap_err());
            assert!(e.contains(named), "{key}={value}: {e}");
        }
    }

    #[test]
    fn example_config_loads_and_validates() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/chat.example.toml");
        let c = Config::load_from(Some(&path), env(&[])).unwrap();
        c.validate().unwrap();
    }
}
