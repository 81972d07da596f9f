//! Certificates for the internal hops of a stack that has no CA of its own:
//! `chat up` makes them under its data directory, `chat certs --out DIR`
//! makes the same set for a development cluster (deploy/kind). Each tier gets
//! one certificate carrying its role's name, all from one throwaway CA whose
//! key is never written down.

use std::path::Path;

use anyhow::Context;
use chat_tls::dev;
use chat_tls::{names, TlsIdentity};

/// The three tiers' identities, and whether they were made just now.
pub struct DevIdentities {
    pub server: TlsIdentity,
    pub proxy: TlsIdentity,
    pub dbproxy: TlsIdentity,
    pub made: bool,
}

/// The identities under `dir`, made (all of them, with a new CA) if any
/// file is missing or unreadable; existing ones are kept, so a restart keeps
/// the CA that clients may have been told to trust.
pub fn ensure(dir: &Path) -> anyhow::Result<DevIdentities> {
    let (mut ids, made) = dev::ensure(dir, &dev::ROLES)
        .with_context(|| format!("making development certificates under {}", dir.display()))?;
    let mut take = |stem: &str| ids.remove(stem).expect("dev::ensure returns every leaf");
    Ok(DevIdentities {
        server: take("server"),
        proxy: take("proxy"),
        dbproxy: take("dbproxy"),
        made,
    })
}

/// `chat certs --out DIR`: makes (or keeps) the set and says where it is.
pub fn run(out: &Path) -> anyhow::Result<()> {
    let ids = ensure(out)?;
    let fingerprint = chat_tls::fingerprint(&ids.server.ca)?;
    println!(
        "{} development certificates in {}\n  CA       {} (SHA-256 {fingerprint})\n  server   {} (name {})\n  proxy    {} (name {})\n  dbproxy  {} (name {})\n\
         The CA's key was not kept: to rotate, delete the directory and run this again.",
        if ids.made { "made" } else { "kept" },
        out.display(),
        ids.server.ca.display(),
        ids.server.cert.display(),
        names::SERVER,
        ids.proxy.cert.display(),
        names::PROXY,
        ids.dbproxy.cert.display(),
        names::DBPROXY,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn makes_once_and_keeps_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let first = ensure(dir.path()).unwrap();
        assert!(first.made);
        let ca = std::fs::read(&first.server.ca).unwrap();
        let again = ensure(dir.path()).unwrap();
        assert!(!again.made);
        assert_eq!(std::fs::read(&again.server.ca).unwrap(), ca);
        // A lost key means a new set, from a new CA.
        std::fs::remove_file(&first.proxy.key).unwrap();
        let remade = ensure(dir.path()).unwrap();
        assert!(remade.made);
        assert_ne!(std::fs::read(&remade.server.ca).unwrap(), ca);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&remade.dbproxy.key)
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
