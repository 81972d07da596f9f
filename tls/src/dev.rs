//! A throwaway CA and certificates for a stack on one machine (`chat up`).
//!
//! The CA's key is never written down: once the certificates exist nothing
//! can issue more, and a missing file means all are made again with a new CA.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::{TlsError, TlsIdentity};

/// One certificate to make: a file stem and the names it is valid for.
pub struct Leaf<'a> {
    pub stem: &'a str,
    pub names: &'a [&'a str],
}

/// The stack's three roles, one certificate each, stems `server`, `proxy`
/// and `dbproxy` (what `chat up` and `chat certs` make).
pub const ROLES: [Leaf<'static>; 3] = [
    Leaf {
        stem: "server",
        names: &[crate::names::SERVER],
    },
    Leaf {
        stem: "proxy",
        names: &[crate::names::PROXY],
    },
    Leaf {
        stem: "dbproxy",
        names: &[crate::names::DBPROXY],
    },
];

/// The identities for `leaves` under `dir`, made if any file is missing.
/// Returns them by stem, and whether they were made now.
pub fn ensure(
    dir: &Path,
    leaves: &[Leaf<'_>],
) -> Result<(BTreeMap<String, TlsIdentity>, bool), TlsError> {
    let ca = dir.join("ca.pem");
    let ids: BTreeMap<String, TlsIdentity> = leaves
        .iter()
        .map(|l| {
            let id = TlsIdentity {
                cert: dir.join(format!("{}.pem", l.stem)),
                key: dir.join(format!("{}.key", l.stem)),
                ca: ca.clone(),
            };
            (l.stem.to_string(), id)
        })
        .collect();
    let complete = ids.values().all(|id| id.check().is_ok());
    if complete {
        return Ok((ids, false));
    }
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "chat development CA (throwaway)");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    for leaf in leaves {
        let key = KeyPair::generate()?;
        let names: Vec<String> = leaf.names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name.push(
            DnType::CommonName,
            leaf.names.first().copied().unwrap_or(leaf.stem),
        );
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &issuer)?;
        let id = &ids[leaf.stem];
        write(&id.key, key.serialize_pem().as_bytes(), true)?;
        write(&id.cert, cert.pem().as_bytes(), false)?;
    }
    write(&ca, ca_cert.pem().as_bytes(), false)?;
    Ok((ids, true))
}

/// Writes `bytes` to `path` (replacing it); a key is readable by its owner only.
fn write(path: &PathBuf, bytes: &[u8], secret: bool) -> Result<(), TlsError> {
    let err = |source| TlsError::Write {
        path: path.clone(),
        source,
    };
    let _ = std::fs::remove_file(path);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut file = options.open(path).map_err(err)?;
    file.write_all(bytes).map_err(err)?;
    Ok(())
}
