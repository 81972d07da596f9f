/// Failures that stop the chat server (client-visible errors are protocol
/// `ERR` lines, not this type).
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
