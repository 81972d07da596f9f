use std::io;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::net::TcpStream;

use crate::reload::{Reload, Reloading};
use crate::{provider, Stream, TlsError, TlsIdentity};

/// The dialing end of mutual TLS: verifies the server's certificate against
/// the identity's CA and a name, and presents the identity's certificate.
/// Cheap to clone.
#[derive(Clone)]
pub struct Connector {
    config: Arc<Reloading<ClientConfig>>,
}

impl Connector {
    pub fn new(identity: &TlsIdentity) -> Result<Connector, TlsError> {
        let config = Reloading::new(identity.clone(), Box::new(client_config))?;
        Ok(Connector {
            config: Arc::new(config),
        })
    }

    /// Runs the handshake on a connected socket; the server's certificate
    /// must be valid for `name` (a DNS name or an IP address). The caller
    /// bounds it in time.
    pub async fn connect(&self, name: &str, tcp: TcpStream) -> io::Result<Stream> {
        let server_name = ServerName::try_from(name.to_string()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name:?} is not a DNS name or IP address"),
            )
        })?;
        let connector = tokio_rustls::TlsConnector::from(self.config.current());
        let tls = connector.connect(server_name, tcp).await?;
        Ok(Stream::Tls(Box::new(tokio_rustls::TlsStream::Client(tls))))
    }
}

fn client_config(m: crate::identity::Material) -> Result<ClientConfig, TlsError> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(m.roots)
        .with_client_auth_cert(m.certs, m.key)?;
    Ok(config)
}

impl Reload for Connector {
    fn reload_if_changed(&self) -> Result<bool, TlsError> {
        self.config.reload_if_changed()
    }
    fn cert_path(&self) -> String {
        self.config.identity().cert.display().to_string()
    }
}
