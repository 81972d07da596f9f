use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use chat_admin::sync::lock;
use tokio_util::sync::CancellationToken;

use crate::identity::Material;
use crate::{TlsError, TlsIdentity};

type Build<T> = Box<dyn Fn(Material) -> Result<T, TlsError> + Send + Sync>;

/// A rustls config built from a [`TlsIdentity`], rebuilt when its files
/// change. New handshakes take the new config; open connections keep theirs.
pub(crate) struct Reloading<T> {
    identity: TlsIdentity,
    build: Build<T>,
    /// A std mutex: held only to swap or clone an `Arc`, never across an await.
    state: Mutex<State<T>>,
}

struct State<T> {
    stamps: [Option<SystemTime>; 3],
    current: Arc<T>,
}

impl<T> Reloading<T> {
    pub(crate) fn new(identity: TlsIdentity, build: Build<T>) -> Result<Self, TlsError> {
        let stamps = identity.stamps();
        let current = Arc::new(build(identity.load()?)?);
        Ok(Reloading {
            identity,
            build,
            state: Mutex::new(State { stamps, current }),
        })
    }

    pub(crate) fn current(&self) -> Arc<T> {
        lock(&self.state).current.clone()
    }

    /// Rebuilds the config if a file changed since the last good load. On
    /// an error the old config stays in use and the next call tries again
    /// (a Secret being rewritten may be half new for a moment).
    pub(crate) fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let stamps = self.identity.stamps();
        if lock(&self.state).stamps == stamps {
            return Ok(false);
        }
        let next = Arc::new((self.build)(self.identity.load()?)?);
        let mut state = lock(&self.state);
        state.stamps = stamps;
        state.current = next;
        Ok(true)
    }

    pub(crate) fn identity(&self) -> &TlsIdentity {
        &self.identity
    }
}

/// Something whose certificates can be re-read: an [`crate::Acceptor`] or a
/// [`crate::Connector`].
pub trait Reload: Send + Sync + 'static {
    /// Re-reads the files if they changed; `Ok(true)` when the new ones are
    /// in use.
    fn reload_if_changed(&self) -> Result<bool, TlsError>;
    /// The certificate file, for log lines.
    fn cert_path(&self) -> String;
}

/// Checks every `every` whether a certificate file changed and reloads it,
/// until `stop`. A failed reload is logged and keeps the old certificates.
pub async fn watch(items: Vec<Arc<dyn Reload>>, every: Duration, stop: CancellationToken) {
    if items.is_empty() {
        return;
    }
    let mut tick = chat_admin::tick::Ticker::after(every, stop);
    while tick.tick().await {
        for item in &items {
            match item.reload_if_changed() {
                Ok(true) => tracing::info!(cert = %item.cert_path(), "TLS certificates reloaded"),
                Ok(false) => {}
                Err(e) => tracing::warn!(
                    cert = %item.cert_path(),
                    error = %e,
                    "TLS certificates changed but cannot be loaded; keeping the old ones"
                ),
            }
        }
    }
}
