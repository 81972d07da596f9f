use std::io;
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;
use tokio::net::TcpStream;

use crate::reload::{Reload, Reloading};
use crate::{provider, Stream, TlsError, TlsIdentity};

/// The listening end of mutual TLS: presents the identity's certificate and
/// requires one from the client that chains to the identity's CA. Which
/// names a client's certificate must carry is the caller's decision, per
/// connection ([`Stream::peer_has_name`]). Cheap to clone.
#[derive(Clone)]
pub struct Acceptor {
    config: Arc<Reloading<ServerConfig>>,
}

impl Acceptor {
    pub fn new(identity: &TlsIdentity) -> Result<Acceptor, TlsError> {
        let config = Reloading::new(identity.clone(), Box::new(server_config))?;
        Ok(Acceptor {
            config: Arc::new(config),
        })
    }

    /// Runs the handshake on an accepted connection (the caller bounds it
    /// in time).
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<Stream> {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.config.current());
        let tls = acceptor.accept(tcp).await?;
        Ok(Stream::Tls(Box::new(tokio_rustls::TlsStream::Server(tls))))
    }
}

fn server_config(m: crate::identity::Material) -> Result<ServerConfig, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(m.roots, provider())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(m.certs, m.key)?;
    Ok(config)
}

impl Reload for Acceptor {
    fn reload_if_changed(&self) -> Result<bool, TlsError> {
        self.config.reload_if_changed()
    }
    fn cert_path(&self) -> String {
        self.config.identity().cert.display().to_string()
    }
}
