//! Mutual TLS over loopback with certificates from `dev::ensure`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chat_tls::dev::{self, Leaf};
use chat_tls::{sniff_tls, Acceptor, Connector, Reload, Stream, TlsIdentity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LEAVES: &[Leaf<'static>] = &[
    Leaf {
        stem: "server",
        names: &["chat-server", "127.0.0.1"],
    },
    Leaf {
        stem: "proxy",
        names: &["chat-proxy"],
    },
];

fn pki(dir: &Path) -> (TlsIdentity, TlsIdentity) {
    let (ids, _) = dev::ensure(dir, LEAVES).unwrap();
    (ids["server"].clone(), ids["proxy"].clone())
}

/// Accepts one connection with `acceptor`, echoes one line back, and
/// reports whether the client carried `name`.
async fn serve_once(listener: TcpListener, acceptor: Acceptor, name: &'static str) -> bool {
    let (tcp, _) = listener.accept().await.unwrap();
    let Ok(mut tls) = acceptor.accept(tcp).await else {
        return false;
    };
    let named = tls.peer_has_name(name);
    let mut buf = [0u8; 5];
    if tls.read_exact(&mut buf).await.is_ok() {
        let _ = tls.write_all(&buf).await;
        let _ = tls.flush().await;
    }
    named
}

async fn dial(
    connector: &Connector,
    addr: std::net::SocketAddr,
    name: &str,
) -> std::io::Result<Stream> {
    let tcp = TcpStream::connect(addr).await?;
    let mut tls = connector.connect(name, tcp).await?;
    tls.write_all(b"hello").await?;
    let mut buf = [0u8; 5];
    tls.read_exact(&mut buf).await?;
    assert_eq!(&buf, b"hello");
    Ok(tls)
}

#[tokio::test]
async fn mutual_tls_names_and_wrong_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (server_id, proxy_id) = pki(dir.path());
    let acceptor = Acceptor::new(&server_id).unwrap();

    // The proxy's certificate is valid for chat-proxy, not chat-server.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(serve_once(listener, acceptor.clone(), "chat-proxy"));
    let stream = dial(&Connector::new(&proxy_id).unwrap(), addr, "chat-server")
        .await
        .unwrap();
    assert!(stream.is_tls());
    assert!(stream.peer_has_name("chat-server"));
    assert!(!stream.peer_has_name("chat-proxy"));
    assert!(server.await.unwrap(), "server sees the proxy's name");

    // The server's name is checked: its certificate is not for chat-dbproxy.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(serve_once(listener, acceptor.clone(), "chat-proxy"));
    let err = dial(&Connector::new(&proxy_id).unwrap(), addr, "chat-dbproxy").await;
    assert!(err.is_err(), "a certificate for another name is refused");
    server.abort();

    // A client whose certificate comes from another CA is refused.
    let other = tempfile::tempdir().unwrap();
    let (_, stranger) = pki(other.path());
    let stranger = TlsIdentity {
        ca: server_id.ca.clone(),
        ..stranger
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(serve_once(listener, acceptor.clone(), "chat-proxy"));
    let res = dial(&Connector::new(&stranger).unwrap(), addr, "chat-server").await;
    assert!(res.is_err(), "client certificate of a foreign CA accepted");
    assert!(!server.await.unwrap());
}

#[tokio::test]
async fn plain_client_is_not_sniffed_as_tls() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut client = TcpStream::connect(addr).await.unwrap();
    client.write_all(b"LOGIN alice pw\n").await.unwrap();
    let (tcp, _) = listener.accept().await.unwrap();
    assert!(!sniff_tls(&tcp).await.unwrap());
    // Peeking consumed nothing.
    let mut buf = [0u8; 5];
    let mut tcp = tcp;
    tcp.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"LOGIN");

    let dir = tempfile::tempdir().unwrap();
    let (server_id, proxy_id) = pki(dir.path());
    let connector = Connector::new(&proxy_id).unwrap();
    let client = tokio::spawn(async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let _ = connector.connect("chat-server", tcp).await;
    });
    let (tcp, _) = listener.accept().await.unwrap();
    assert!(sniff_tls(&tcp).await.unwrap());
    let _ = Acceptor::new(&server_id).unwrap().accept(tcp).await;
    client.abort();
}

#[tokio::test]
async fn rotation_takes_new_certificates_and_keeps_open_connections() {
    let dir = tempfile::tempdir().unwrap();
    let (server_id, proxy_id) = pki(dir.path());
    let acceptor = Acceptor::new(&server_id).unwrap();
    let old_client = Connector::new(&proxy_id).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();

    // A long-lived connection made before the rotation.
    let a = acceptor.clone();
    let open = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = a.accept(tcp).await.unwrap();
        let mut buf = [0u8; 5];
        for _ in 0..2 {
            tls.read_exact(&mut buf).await.unwrap();
            tls.write_all(&buf).await.unwrap();
        }
        listener
    });
    let mut before = dial(&old_client, addr, "chat-server").await.unwrap();

    // Rotate: a new CA and new certificates in the same files.
    std::fs::remove_file(&server_id.ca).unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    pki(dir.path());
    assert!(acceptor.reload_if_changed().unwrap());
    assert!(
        !acceptor.reload_if_changed().unwrap(),
        "no change, no reload"
    );

    // The open connection still works.
    before.write_all(b"again").await.unwrap();
    let mut buf = [0u8; 5];
    before.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"again");
    let listener = open.await.unwrap();

    // A client still on the old CA is refused now; a reloaded one gets in.
    let server = tokio::spawn(serve_once(listener, acceptor.clone(), "chat-proxy"));
    assert!(dial(&old_client, addr, "chat-server").await.is_err());
    assert!(!server.await.unwrap());
    let reloading: Arc<dyn Reload> = Arc::new(old_client.clone());
    assert!(reloading.reload_if_changed().unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(serve_once(listener, acceptor.clone(), "chat-proxy"));
    dial(&old_client, addr, "chat-server").await.unwrap();
    assert!(server.await.unwrap());
}

#[test]
fn broken_files_are_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let (server_id, _) = pki(dir.path());
    std::fs::write(&server_id.key, "not a key").unwrap();
    let err = Acceptor::new(&server_id).err().unwrap().to_string();
    assert!(err.contains("server.key"), "{err}");
    let missing = TlsIdentity {
        cert: dir.path().join("nope.pem"),
        ..server_id
    };
    let err = missing.check().unwrap_err().to_string();
    assert!(err.contains("nope.pem"), "{err}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let (ids, made) = dev::ensure(dir.path(), LEAVES).unwrap();
        assert!(made, "a broken key makes the set again");
        let mode = std::fs::metadata(&ids["proxy"].key)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(chat_tls::fingerprint(&ids["proxy"].cert).unwrap().len() == 95);
    }
}
