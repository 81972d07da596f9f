//! The dbproxy side of the fuzz target `dbproxy_request` (`fuzz/`), kept in
//! the crate so it reaches the private layers and so the workspace's lints
//! and tests cover it (a unit test replays the committed corpus).
//!
//! An input is one or more requests separated by a `0xFF` byte (never part
//! of UTF-8, so never of a JSON body): the first byte of each picks the API
//! path, the rest is its body. Each goes through what a real request goes
//! through after the HTTP layer, `http::route` (serde decoding) and
//! `front::Checked` (the protocol's rules and the failed-login limiter,
//! fresh for each input and small so its eviction runs), to a backend that
//! stores nothing and panics when anything reaching it breaks the rules a
//! stored value must satisfy. Panics are what the fuzzer reports.

use std::future::Future;
use std::net::IpAddr;
use std::pin::pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use async_trait::async_trait;
use chat_protocol::{names, text};
use prometheus::{IntCounterVec, Opts};

use crate::backend::Backend;
use crate::front::Checked;
use crate::http::{route, API_PATHS};
use crate::limiter::{Limits, LoginLimiter};
use chat_storage_api::*;

/// Small, so that the length limit is reached by short inputs.
const MAX_TEXT_BYTES: usize = 64;

/// Runs every request of `data`; panics when a rule is broken.
pub fn requests(data: &[u8]) {
    // One counter for every input: building it is most of a short input's
    // cost, and what it counts does not change what the limiter decides.
    static LIMITED: LazyLock<IntCounterVec> = LazyLock::new(|| {
        IntCounterVec::new(Opts::new("fuzz_limited", "limited"), &["by"])
            .expect("static metric options are valid")
    });
    let limited = LIMITED.clone();
    let limiter = LoginLimiter::new(
        Limits {
            window: Duration::from_secs(60),
            per_account: 2,
            per_source: 3,
            capacity: 4,
        },
        limited,
    );
    let checked = Checked::new(Arc::new(Strict), MAX_TEXT_BYTES, limiter);
    for request in data.split(|&b| b == 0xFF) {
        let Some((&which, body)) = request.split_first() else {
            continue;
        };
        let path = API_PATHS[usize::from(which) % API_PATHS.len()];
        match now_or_never(route(&checked, path, body)) {
            Ok(answer) => {
                serde_json::from_slice::<serde_json::Value>(&answer).expect("an answer is JSON");
            }
            // What a caller gets back may end up in a client's ERR line.
            Err(e) => assert!(
                text::is_text(&e.message),
                "error message with a control character: {:?}",
                e.message
            ),
        }
    }
}

/// Polls `f` once: nothing on this path waits (the backend answers at
/// once), so a pending future is itself a bug.
fn now_or_never<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("request did not complete without waiting"),
    }
}

fn user(s: &str) {
    assert!(names::is_user(s), "user {s:?} reached storage");
}

fn room(s: &str) {
    assert!(names::is_room(s), "room {s:?} reached storage");
}

fn token(s: &str) {
    assert!(names::is_token(s), "token {s:?} reached storage");
}

fn cid(c: &Option<String>) {
    if let Some(c) = c {
        assert!(names::is_cid(c), "client id {c:?} reached storage");
    }
}

fn body(s: &str) {
    assert!(
        !s.is_empty() && s.len() <= MAX_TEXT_BYTES && text::is_text(s),
        "body {s:?} reached storage"
    );
}

fn identity(user: &str) -> Identity {
    Identity {
        user: user.into(),
        token: format!("{user}.0123456789abcdef0123456789abcdef"),
        guest: false,
        pos: None,
    }
}

/// The backend at the end of the fuzzed path: checks, stores nothing.
struct Strict;

#[async_trait]
impl Backend for Strict {
    async fn login(&self, req: LoginReq) -> Result<Identity, ApiError> {
        user(&req.user);
        assert!((1..=names::MAX_PASSWORD).contains(&req.password.len()));
        if let Some(s) = &req.source {
            assert!(s.parse::<IpAddr>().is_ok(), "source {s:?} reached storage");
        }
        // Every other login fails, so the limiter counts and refuses.
        if req.password.len() % 2 == 0 {
            Err(ApiError::new(ErrorKind::AuthFailed, "wrong password"))
        } else {
            Ok(identity(&req.user))
        }
    }

    async fn guest(&self, req: GuestReq) -> Result<Identity, ApiError> {
        user(&req.name);
        Ok(identity(&req.name))
    }

    async fn resume(&self, req: ResumeReq) -> Result<Identity, ApiError> {
        token(&req.token);
        let name = names::token_user(&req.token).expect("a checked token names its user");
        Ok(identity(name))
    }

    async fn touch(&self, req: TouchReq) -> Result<WriteAck, ApiError> {
        req.tokens.iter().for_each(|t| token(t));
        Ok(WriteAck::default())
    }

    async fn join(&self, req: JoinReq) -> Result<JoinResp, ApiError> {
        room(&req.room);
        user(&req.user);
        Ok(JoinResp {
            last_seq: 0,
            pos: None,
        })
    }

    async fn part(&self, req: PartReq) -> Result<WriteAck, ApiError> {
        room(&req.room);
        user(&req.user);
        Ok(WriteAck::default())
    }

    async fn user_rooms(&self, req: UserRoomsReq) -> Result<RoomList, ApiError> {
        user(&req.user);
        Ok(RoomList { rooms: Vec::new() })
    }

    async fn rooms(&self, _req: RoomsReq) -> Result<RoomList, ApiError> {
        Ok(RoomList { rooms: Vec::new() })
    }

    async fn room_info(&self, req: RoomInfoReq) -> Result<RoomInfo, ApiError> {
        room(&req.room);
        Ok(RoomInfo {
            room: req.room,
            last_seq: 0,
            members: 0,
        })
    }

    async fn append(&self, req: AppendReq) -> Result<AppendResp, ApiError> {
        assert!(!req.items.is_empty(), "an empty batch reached storage");
        let results = req
            .items
            .iter()
            .map(|i| {
                room(&i.room);
                user(&i.sender);
                cid(&i.client_id);
                body(&i.body);
                Ok(Appended {
                    seq: 1,
                    ts: 0,
                    duplicate: false,
                })
            })
            .collect();
        Ok(AppendResp { results, pos: None })
    }

    async fn history(&self, req: HistoryReq) -> Result<HistoryResp, ApiError> {
        room(&req.room);
        Ok(HistoryResp {
            messages: Vec::new(),
        })
    }

    async fn send_dms(&self, req: SendDmsReq) -> Result<SendDmsResp, ApiError> {
        assert!(!req.items.is_empty(), "an empty batch reached storage");
        let results = req
            .items
            .iter()
            .map(|i| {
                user(&i.sender);
                user(&i.recipient);
                cid(&i.client_id);
                body(&i.body);
                Ok(DmSent {
                    id: 1,
                    ts: 0,
                    duplicate: false,
                })
            })
            .collect();
        Ok(SendDmsResp { results, pos: None })
    }

    async fn pending_dms(&self, req: PendingDmsReq) -> Result<PendingDmsResp, ApiError> {
        user(&req.user);
        Ok(PendingDmsResp { dms: Vec::new() })
    }

    async fn mark_received(&self, _req: MarkReceivedReq) -> Result<WriteAck, ApiError> {
        Ok(WriteAck::default())
    }

    async fn ready(&self) -> Result<(), ApiError> {
        Ok(())
    }

    async fn close(&self) {}
}

#[cfg(test)]
mod tests {
    /// Every input of the committed corpus (seeds and what the fuzzer kept)
    /// still passes, without the fuzzer.
    #[test]
    fn corpus_replays() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/dbproxy_request");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("corpus directory") {
            let path = entry.unwrap().path();
            super::requests(&std::fs::read(&path).unwrap());
            n += 1;
        }
        assert!(n > 0, "no corpus in {}", dir.display());
    }

    #[test]
    fn bad_values_stop_before_storage() {
        // Path 0 is login, 4 join, 9 append (the order of `API_PATHS`).
        super::requests(b"\x00{\"user\":\"a\\nOK\",\"password\":\"p\"}");
        super::requests(b"\x04{\"room\":\"r\\r\",\"user\":\"u\"}");
        super::requests(
            b"\x09{\"items\":[{\"room\":\"r\",\"sender\":\"u\",\"client_id\":null,\"body\":\"\\u001b[2J\"}]}",
        );
    }
}
