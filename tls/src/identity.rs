use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::TlsError;

/// One end's TLS material, as PEM files (in Kubernetes, a mounted Secret).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsIdentity {
    /// Certificate chain this end presents, leaf first.
    pub cert: PathBuf,
    /// Private key of the leaf certificate (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates the other end's certificate must chain to.
    pub ca: PathBuf,
}

/// What a [`TlsIdentity`] names, read and parsed.
pub(crate) struct Material {
    pub certs: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub roots: Arc<RootCertStore>,
}

impl TlsIdentity {
    /// Reads and parses the three files; the error names the file at fault.
    pub(crate) fn load(&self) -> Result<Material, TlsError> {
        let certs = read_certs(&self.cert)?;
        let key = PrivateKeyDer::from_pem_slice(&read(&self.key)?).map_err(|e| TlsError::Pem {
            path: self.key.clone(),
            what: format!("no usable private key ({e})"),
        })?;
        let mut roots = RootCertStore::empty();
        for ca in read_certs(&self.ca)? {
            roots.add(ca).map_err(|e| TlsError::Pem {
                path: self.ca.clone(),
                what: format!("not a CA certificate: {e}"),
            })?;
        }
        Ok(Material {
            certs,
            key,
            roots: Arc::new(roots),
        })
    }

    /// The first of `cert`, `key` and `ca` left empty, for config validation
    /// to name.
    pub fn empty_field(&self) -> Option<&'static str> {
        [("cert", &self.cert), ("key", &self.key), ("ca", &self.ca)]
            .into_iter()
            .find(|(_, path)| path.as_os_str().is_empty())
            .map(|(field, _)| field)
    }

    /// Checks that the files exist and parse, for config validation at start.
    pub fn check(&self) -> Result<(), TlsError> {
        self.load().map(|_| ())
    }

    /// Modification times of the three files, to notice a rotation.
    pub(crate) fn stamps(&self) -> [Option<SystemTime>; 3] {
        let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        [m(&self.cert), m(&self.key), m(&self.ca)]
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            what: format!("bad PEM certificate: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            what: "no certificate in the file".into(),
        });
    }
    Ok(certs)
}

/// SHA-256 fingerprint of the first certificate in a PEM file, as
/// colon-separated hex (what browsers and `openssl x509 -fingerprint` show).
pub fn fingerprint(cert_pem: &Path) -> Result<String, TlsError> {
    let first = read_certs(cert_pem)?.remove(0);
    let digest = Sha256::digest(first.as_ref());
    Ok(digest
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":"))
}
