//! Mutual TLS on the API listener: only chat servers (a certificate from
//! the CA carrying `chat-server`) get in; plain TCP, a foreign CA's
//! certificate and a proxy's certificate are refused and counted by reason;
//! the dbproxy's own certificate files are re-read when they change.

mod common;

use std::path::Path;
use std::time::Duration;

use chat_dbproxy::Config;
use chat_storage_client::DbClient;
use chat_storage_client::{ClientOptions, Probe};
use chat_tls::dev::{ensure, ROLES};
use chat_tls::TlsIdentity;
use common::{raw_request, wait_until, Proxy};

const PROBE: Duration = Duration::from_secs(2);

fn certs(dir: &Path) -> std::collections::BTreeMap<String, TlsIdentity> {
    ensure(dir, &ROLES).unwrap().0
}

/// A client dialing `https://` with `identity`, a new pool each time (so
/// every call is a new handshake).
fn client(p: &Proxy, identity: &TlsIdentity) -> DbClient {
    let base = p.base.replace("http://", "https://");
    let options = ClientOptions {
        tls: Some(chat_tls::Connector::new(identity).unwrap()),
        ..ClientOptions::default()
    };
    DbClient::with_options(&base, options)
}

/// A dbproxy on `config` and a chat server's client, once it is ready.
async fn start(dir: &Path, config: Config, server: &TlsIdentity) -> (Proxy, DbClient) {
    let p = Proxy::spawn(dir, config).await;
    let server = client(&p, server);
    wait_until(
        Duration::from_secs(10),
        "dbproxy ready over TLS",
        || async { server.probe(PROBE).await == Probe::Ready },
    )
    .await;
    (p, server)
}

fn refused(p: &Proxy, reason: &str) -> f64 {
    p.metric("chat_dbproxy_tls_refused_total", &[("reason", reason)])
}

fn copy_identity(from: &TlsIdentity, to: &TlsIdentity) {
    std::fs::copy(&from.ca, &to.ca).unwrap();
    std::fs::copy(&from.key, &to.key).unwrap();
    std::fs::copy(&from.cert, &to.cert).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_chat_servers_get_in_and_rotated_certificates_are_used() {
    let dir = tempfile::tempdir().unwrap();
    let ids = certs(&dir.path().join("a"));
    let foreign = certs(&dir.path().join("b"));
    let rotated = certs(&dir.path().join("c"));
    // The dbproxy's files live where a mounted Secret would.
    let live = TlsIdentity {
        cert: dir.path().join("tls.crt"),
        key: dir.path().join("tls.key"),
        ca: dir.path().join("ca.crt"),
    };
    copy_identity(&ids["dbproxy"], &live);
    let config = Config {
        tls: Some(live.clone()),
        reload_interval_ms: Duration::from_millis(100),
        ..Config::default()
    };
    let (p, server) = start(dir.path(), config, &ids["server"]).await;
    // A write and a read through the TLS hop.
    server.guest("tlsguest").await.unwrap();
    server.join("tlsroom", "tlsguest").await.unwrap();
    assert!(server
        .user_rooms("tlsguest", None)
        .await
        .unwrap()
        .rooms
        .iter()
        .any(|r| r.room == "tlsroom"));

    // Plain HTTP: refused, health included.
    assert!(raw_request(&p.base, "GET", "/healthz", b"")
        .await
        .map_or(true, |(status, _)| status == 0));
    wait_until(Duration::from_secs(5), "plain refusal counted", || async {
        refused(&p, "plain") >= 1.0
    })
    .await;

    // A certificate from another CA (presented with our CA as its trust, so
    // that the dbproxy, not the client, is the one to refuse).
    let stranger = TlsIdentity {
        ca: ids["server"].ca.clone(),
        ..foreign["server"].clone()
    };
    assert_eq!(client(&p, &stranger).probe(PROBE).await, Probe::NotReady);
    wait_until(Duration::from_secs(5), "foreign CA refused", || async {
        refused(&p, "handshake") >= 1.0
    })
    .await;

    // A proxy's certificate is from the CA but not a chat server's.
    assert_eq!(
        client(&p, &ids["proxy"]).probe(PROBE).await,
        Probe::NotReady
    );
    wait_until(Duration::from_secs(5), "proxy role refused", || async {
        refused(&p, "role") >= 1.0
    })
    .await;
    assert_eq!(refused(&p, "role"), 1.0);

    // A broken certificate file keeps the old certificates in use.
    std::fs::write(&live.cert, "not a certificate\n").unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(client(&p, &ids["server"]).probe(PROBE).await, Probe::Ready);

    // Rotation to a new CA and certificate: new handshakes use them.
    copy_identity(&rotated["dbproxy"], &live);
    let rotated_server = client(&p, &rotated["server"]);
    wait_until(
        Duration::from_secs(5),
        "rotated certificates in use",
        || async { rotated_server.probe(PROBE).await == Probe::Ready },
    )
    .await;
    assert_eq!(
        client(&p, &ids["server"]).probe(PROBE).await,
        Probe::NotReady
    );
    rotated_server.rooms(10, None).await.unwrap();
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_handshake_is_closed_within_the_header_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let ids = certs(&dir.path().join("a"));
    let config = Config {
        tls: Some(ids["dbproxy"].clone()),
        header_timeout_ms: 300,
        ..Config::default()
    };
    let (p, _server) = start(dir.path(), config, &ids["server"]).await;
    let addr = p.base.trim_start_matches("http://");
    let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The first byte of a TLS record, then nothing.
    tokio::io::AsyncWriteExt::write_all(&mut stalled, &[0x16])
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::io::AsyncReadExt::read(&mut stalled, &mut buf),
    )
    .await
    .expect("closed within the header timeout");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    assert_eq!(refused(&p, "timeout"), 1.0);
    p.stop().await;
}
