//! TLS for every hop of the stack, on rustls with ring as the one crypto
//! provider (installed explicitly in each config, never process-wide).
//!
//! A tier has one [`TlsIdentity`]: its certificate chain, its key and the CA
//! bundle its peers' certificates must chain to. From it come an
//! [`Acceptor`] (the listening end: mutual TLS, the client must present a
//! certificate from the CA, optionally carrying one of a set of names) and a
//! [`Connector`] (the dialing end: verifies the server's certificate against
//! the CA and a name, presents its own). Both re-read their files when they
//! change ([`watch`]), so a rotated Kubernetes Secret takes effect without a
//! restart and without touching open connections.
//!
//! [`Stream`] is a connection that is plain TCP or TLS, with halves that keep
//! the plain case as cheap as a bare `TcpStream`. [`dev`] makes a throwaway CA
//! and certificates for `chat up`.

mod acceptor;
mod connector;
pub mod dev;
mod error;
mod identity;
mod reload;
mod secret;
mod stream;

pub use acceptor::Acceptor;
pub use connector::Connector;
pub use error::TlsError;
pub use identity::{fingerprint, TlsIdentity};
pub use reload::{watch, Reload};
pub use secret::Secret;
pub use stream::{sniff_tls, ReadHalf, Stream, WriteHalf};

/// The crypto provider every config here is built with.
fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

/// Whether `cert` is valid for `name` (a DNS name or an IP address).
fn cert_has_name(cert: &rustls::pki_types::CertificateDer<'_>, name: &str) -> bool {
    let Ok(server_name) = rustls::pki_types::ServerName::try_from(name) else {
        return false;
    };
    match webpki::EndEntityCert::try_from(cert) {
        Ok(end) => end.verify_is_valid_for_subject_name(&server_name).is_ok(),
        Err(_) => false,
    }
}

/// The DNS names the internal hops' certificates carry, one per role. A
/// dialer verifies the role it expects, not the address it dialed (pod
/// addresses come and go; a Secret's certificate stays), and a listener
/// decides by the client's role what it may do.
pub mod names {
    /// A chat server: its client port and its links to the other servers.
    pub const SERVER: &str = "chat-server";
    /// A proxy, as a client of the chat servers.
    pub const PROXY: &str = "chat-proxy";
    /// A dbproxy's API.
    pub const DBPROXY: &str = "chat-dbproxy";
}
