//! Bearer tokens on the API: a request without the token or with a wrong
//! one is answered 401 with the API's error body and counted; the right one
//! passes; the token file is re-read, so a token can be rotated; `/healthz`
//! and `/readyz` stay open to probes.

mod common;

use std::time::Duration;

use chat_dbproxy::Config;
use chat_storage_api::{ErrorBody, ErrorKind, PATH_ROOMS};
use chat_storage_client::DbClient;
use chat_storage_client::{BearerToken, ClientOptions, Probe};
use chat_tls::Secret;
use common::{raw_request_with, wait_until, Proxy};

const OLD: &str = "old-token-0123456789";
const NEW: &str = "new-token-0123456789";

fn client(p: &Proxy, token: &str) -> DbClient {
    let options = ClientOptions {
        token: BearerToken::fixed(&Secret::new(token)).unwrap(),
        ..ClientOptions::default()
    };
    DbClient::with_options(&p.base, options)
}

async fn rooms_status(p: &Proxy, auth: &str) -> (u16, String) {
    raw_request_with(&p.base, "POST", PATH_ROOMS, auth, br#"{"limit":1}"#)
        .await
        .unwrap()
}

fn body_of(answer: &str) -> ErrorBody {
    let json = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_need_an_accepted_token_and_the_file_rotates() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    std::fs::write(&file, format!("{OLD}\n")).unwrap();
    let config = Config {
        api_tokens: vec![Secret::new("fixed-token-0123456789")],
        api_tokens_file: file.to_string_lossy().into_owned(),
        reload_interval_ms: Duration::from_millis(100),
        ..Config::default()
    };
    let p = Proxy::start(dir.path(), config).await;
    let unauthorized = |reason| p.metric("chat_dbproxy_unauthorized_total", &[("reason", reason)]);

    // Health stays open: the kubelet and the servers' probes carry no token.
    assert_eq!(p.status("/healthz").await, Some(200));
    assert_eq!(p.status("/readyz").await, Some(200));

    let (status, answer) = rooms_status(&p, "").await;
    assert_eq!(status, 401, "{answer}");
    assert!(answer
        .to_ascii_lowercase()
        .contains("www-authenticate: bearer"));
    assert_eq!(body_of(&answer).error.kind, ErrorKind::Unauthorized);
    assert_eq!(unauthorized("missing"), 1.0);

    let (status, answer) = rooms_status(&p, "authorization: Bearer not-the-token-at-all\r\n").await;
    assert_eq!(status, 401);
    assert_eq!(body_of(&answer).error.kind, ErrorKind::Unauthorized);
    assert!(
        !answer.contains("not-the-token-at-all"),
        "the token is not echoed"
    );
    assert_eq!(unauthorized("wrong"), 1.0);

    // A wrong token on /readyz is refused too: that is how a server learns
    // its token is not accepted before a client's request fails on it.
    let (status, _) = raw_request_with(
        &p.base,
        "GET",
        "/readyz",
        "authorization: Bearer not-the-token-at-all\r\n",
        b"",
    )
    .await
    .unwrap();
    assert_eq!(status, 401);

    let (status, answer) = rooms_status(&p, &format!("authorization: Bearer {OLD}\r\n")).await;
    assert_eq!(status, 200, "{answer}");
    client(&p, "fixed-token-0123456789")
        .rooms(1, None)
        .await
        .unwrap();

    // The typed client: a refused token is Unavailable (nothing was done),
    // and its probe says why the dbproxy is no use to it.
    let wrong = client(&p, "not-the-token-at-all");
    let e = wrong.rooms(1, None).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unavailable, "{e:?}");
    assert!(e.message.contains("token"), "{e:?}");
    assert_eq!(
        wrong.probe(Duration::from_secs(2)).await,
        Probe::TokenRefused
    );
    let old = client(&p, OLD);
    assert_eq!(old.probe(Duration::from_secs(2)).await, Probe::Ready);

    // Rotation: accept old and new, move the callers, drop the old.
    std::fs::write(&file, format!("{OLD}\n{NEW}\n")).unwrap();
    let new = client(&p, NEW);
    wait_until(
        Duration::from_secs(5),
        "the new token is accepted",
        || async { new.rooms(1, None).await.is_ok() },
    )
    .await;
    old.rooms(1, None).await.unwrap();
    std::fs::write(&file, format!("{NEW}\n")).unwrap();
    wait_until(
        Duration::from_secs(5),
        "the old token is refused",
        || async { old.rooms(1, None).await.is_err() },
    )
    .await;
    new.rooms(1, None).await.unwrap();

    // A file that breaks keeps the tokens read before.
    std::fs::write(&file, "short\n").unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    new.rooms(1, None).await.unwrap();
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_following_a_token_file_picks_up_the_rotated_token() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        api_tokens: vec![Secret::new(NEW)],
        ..Config::default()
    };
    let p = Proxy::start(dir.path(), config).await;
    let file = dir.path().join("server-token");
    std::fs::write(&file, format!("{OLD}\n")).unwrap();
    let options = ClientOptions {
        token: BearerToken::file(&file).unwrap(),
        ..ClientOptions::default()
    };
    let c = DbClient::with_options(&p.base, options);
    assert!(c.rooms(1, None).await.is_err());
    std::fs::write(&file, format!("{NEW}\n")).unwrap();
    // A refusal re-reads the file (at most once a second) and sends again.
    wait_until(
        Duration::from_secs(5),
        "the client sends the new token",
        || async { c.rooms(1, None).await.is_ok() },
    )
    .await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tokens_the_api_stays_open_and_bad_token_files_stop_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proxy::start(dir.path(), Config::default()).await;
    let (status, _) = rooms_status(&p, "").await;
    assert_eq!(status, 200);
    client(&p, "whatever-is-sent-here")
        .rooms(1, None)
        .await
        .unwrap();
    p.stop().await;

    let missing = Config {
        api_tokens_file: dir.path().join("nope").to_string_lossy().into_owned(),
        ..Config::default()
    };
    let listeners = chat_dbproxy::Listeners::bind("127.0.0.1:0", "127.0.0.1:0")
        .await
        .unwrap();
    let e = chat_dbproxy::run(
        listeners,
        missing,
        prometheus::Registry::new(),
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("api_tokens_file"), "{e}");
}
