/// Failures that stop the proxy. What a client sees is a protocol `ERR` or
/// `RECONNECT` line, not this type.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid config: {0}")]
    Config(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(#[from] chat_tls::TlsError),
    #[error("metrics registration: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Why one proxied connection ended early, by whose fault.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    /// The client sent no valid first line (or went away before it).
    #[error("client: {0}")]
    Client(String),
    /// No chat server could take the connection.
    #[error("upstream: {0}")]
    Upstream(String),
}
