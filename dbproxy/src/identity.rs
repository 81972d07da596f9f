//! The identity rules, written once for both backends: who may log in with
//! a password, when a name is registered or taken over from an expired
//! guest, which guest names are free, which tokens are live. The backends
//! run the SQL (each in its own dialect and with its own locking) and feed
//! what they read to these functions, so a rule changes in one place:
//!
//! - [`login`] is the one login flow, over the three storage operations of
//!   [`Accounts`]; argon2 runs between a read and a write, never inside a
//!   transaction or while holding the SQLite writer.
//! - [`claim`] decides, inside the writing transaction, what a registration
//!   or a guest start does with the name's current holder.
//! - [`resume`] decides whether a token row still names a live session.

use std::sync::Arc;

use async_trait::async_trait;
use chat_storage_api::{ApiError, ErrorKind, Identity, LoginReq};

use crate::auth;
use crate::error::{name_taken, unavailable};
use crate::hashing::HashPool;

/// How often a login starts over when the name changed hands between its
/// read and its write (a concurrent registration or guest start).
const LOGIN_ATTEMPTS: usize = 3;

/// A user row as the rules need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UserRow {
    pub(crate) id: i64,
    pub(crate) password_hash: Option<String>,
    pub(crate) guest: bool,
    /// Whether the user holds a live token (see [`live_since`]).
    pub(crate) live: bool,
}

/// A token is live while `now - last_used_ms <= ttl`: the SQL of both
/// backends asks for `last_used_ms >= live_since(now, ttl)`.
pub(crate) fn live_since(now: i64, ttl: i64) -> i64 {
    now.saturating_sub(ttl)
}

/// What a login does with the row it read for the name.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum LoginStep {
    /// A registered user: check the password against this hash, then add a
    /// token to user `id`.
    Verify { id: i64, phc: String },
    /// A guest holding the name with a live token.
    Taken,
    /// A free name, or one held by an expired guest: hash the password and
    /// register (see [`claim`]).
    Register,
}

pub(crate) fn login_step(row: Option<UserRow>) -> LoginStep {
    match row {
        Some(UserRow {
            id,
            password_hash: Some(phc),
            guest: false,
            ..
        }) => LoginStep::Verify { id, phc },
        Some(UserRow { live: true, .. }) => LoginStep::Taken,
        _ => LoginStep::Register,
    }
}

/// Who wants a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Claimant {
    /// A `LOGIN` that found the name free (or an expired guest's) and
    /// hashed the password.
    Registration,
    /// A guest start.
    Guest,
}

/// What a registration or guest start does with the name, decided in the
/// writing transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Claim {
    /// Nobody holds it: insert the user.
    Insert,
    /// An expired guest holds it: forget that guest's tokens and rooms (its
    /// DMs stay) and give the row to the claimant.
    TakeOver(i64),
    /// Someone registered it since the login read it: start the login over,
    /// so the password is checked against theirs.
    Retry,
    /// Registered (for a guest), or a guest with a live token.
    Taken,
}

/// The rule for `holder`, the name's row as the writing transaction sees it.
pub(crate) fn claim(holder: Option<&UserRow>, who: Claimant) -> Claim {
    match (holder, who) {
        (None, _) => Claim::Insert,
        (Some(UserRow { guest: false, .. }), Claimant::Registration) => Claim::Retry,
        (Some(UserRow { guest: false, .. }), Claimant::Guest) => Claim::Taken,
        (Some(UserRow { live: true, .. }), _) => Claim::Taken,
        (Some(UserRow { id, .. }), _) => Claim::TakeOver(*id),
    }
}

/// [`claim`] for a backend that inserts first and reads the holder only
/// when the insert hit the name's unique key (MySQL: a locking read of a
/// missing row takes a gap lock, and concurrent first logins then deadlock
/// on each other's inserts). A holder gone by the time of that read means
/// the name changed hands meanwhile: a login starts over, a guest start is
/// refused as taken (its client may simply try again).
pub(crate) fn claim_after_duplicate(holder: Option<&UserRow>, who: Claimant) -> Claim {
    match (claim(holder, who), who) {
        (Claim::Insert, Claimant::Registration) => Claim::Retry,
        (Claim::Insert, Claimant::Guest) => Claim::Taken,
        (c, _) => c,
    }
}

/// The session a token row names, if its token is still live: `row` is
/// (user name, guest, last use in ms). The caller then records the use.
pub(crate) fn resume(
    row: Option<(String, bool, i64)>,
    now: i64,
    ttl: i64,
) -> Result<(String, bool), ApiError> {
    match row {
        Some((name, guest, last_used)) if last_used >= live_since(now, ttl) => Ok((name, guest)),
        _ => Err(ApiError::new(
            ErrorKind::TokenInvalid,
            "unknown or expired token",
        )),
    }
}

/// Whether a registration stored the user, with the write's position.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Registered {
    Done(Option<String>),
    /// [`Claim::Retry`]: the login starts over.
    Retry,
}

/// The storage operations of a login, each its own read or write.
#[async_trait]
pub(crate) trait Accounts: Sync {
    /// The name's row, read outside any write.
    async fn user(&self, name: &str) -> Result<Option<UserRow>, ApiError>;
    /// Stores `token` for the registered user `id`; the write's position.
    async fn add_token(&self, id: i64, token: &str) -> Result<Option<String>, ApiError>;
    /// Claims `name` for a registration ([`Claimant::Registration`]) with
    /// the password hash `phc`, storing `token`, in one write; a
    /// [`Claim::Taken`] is the `NameTaken` error.
    async fn register(&self, name: &str, phc: &str, token: &str) -> Result<Registered, ApiError>;
}

/// `LOGIN`: registers the name on first use, else checks the password.
pub(crate) async fn login(
    accounts: &impl Accounts,
    hashing: &HashPool,
    req: LoginReq,
) -> Result<Identity, ApiError> {
    let password = Arc::new(req.password);
    for _ in 0..LOGIN_ATTEMPTS {
        let row = accounts.user(&req.user).await?;
        let token = auth::new_token(&req.user);
        let pos = match login_step(row) {
            LoginStep::Verify { id, phc } => {
                if !hashing.verify(password.clone(), phc).await? {
                    return Err(ApiError::new(ErrorKind::AuthFailed, "wrong password"));
                }
                accounts.add_token(id, &token).await?
            }
            LoginStep::Taken => return Err(name_taken(&req.user)),
            LoginStep::Register => {
                let phc = hashing.hash(password.clone()).await?;
                match accounts.register(&req.user, &phc, &token).await? {
                    Registered::Done(pos) => pos,
                    Registered::Retry => continue,
                }
            }
        };
        return Ok(Identity {
            user: req.user,
            token,
            guest: false,
            pos,
        });
    }
    Err(unavailable("name changed hands repeatedly during login"))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use super::*;

    fn row(guest: bool, live: bool, password: bool) -> UserRow {
        UserRow {
            id: 7,
            password_hash: password.then(|| "phc".to_string()),
            guest,
            live,
        }
    }

    #[test]
    fn login_verifies_registered_users_and_registers_free_or_expired_names() {
        assert_eq!(login_step(None), LoginStep::Register);
        assert_eq!(
            login_step(Some(row(false, false, true))),
            LoginStep::Verify {
                id: 7,
                phc: "phc".into()
            }
        );
        // A registered user's own live tokens do not stop a login.
        assert!(matches!(
            login_step(Some(row(false, true, true))),
            LoginStep::Verify { .. }
        ));
        assert_eq!(login_step(Some(row(true, true, false))), LoginStep::Taken);
        assert_eq!(
            login_step(Some(row(true, false, false))),
            LoginStep::Register
        );
    }

    #[test]
    fn claims_take_over_only_expired_guests() {
        use Claimant::*;
        for who in [Registration, Guest] {
            assert_eq!(claim(None, who), Claim::Insert);
            assert_eq!(claim(Some(&row(true, true, false)), who), Claim::Taken);
            assert_eq!(
                claim(Some(&row(true, false, false)), who),
                Claim::TakeOver(7)
            );
        }
        assert_eq!(
            claim(Some(&row(false, false, true)), Registration),
            Claim::Retry
        );
        assert_eq!(claim(Some(&row(false, false, true)), Guest), Claim::Taken);
        assert_eq!(claim(Some(&row(false, true, true)), Guest), Claim::Taken);
    }

    #[test]
    fn a_holder_gone_after_a_duplicate_insert_means_the_name_changed_hands() {
        use Claimant::*;
        assert_eq!(claim_after_duplicate(None, Registration), Claim::Retry);
        assert_eq!(claim_after_duplicate(None, Guest), Claim::Taken);
        let expired = row(true, false, false);
        assert_eq!(
            claim_after_duplicate(Some(&expired), Guest),
            Claim::TakeOver(7)
        );
        assert_eq!(
            claim_after_duplicate(Some(&expired), Registration),
            Claim::TakeOver(7)
        );
    }

    #[test]
    fn tokens_live_for_their_ttl_inclusive() {
        let r = |last| Some(("ann".to_string(), true, last));
        assert_eq!(resume(r(900), 1000, 100), Ok(("ann".into(), true)));
        assert_eq!(resume(r(1000), 1000, 100), Ok(("ann".into(), true)));
        let e = resume(r(899), 1000, 100).unwrap_err();
        assert_eq!(e.kind, ErrorKind::TokenInvalid);
        assert_eq!(
            resume(None, 1000, 100).unwrap_err().kind,
            ErrorKind::TokenInvalid
        );
        // Far in the past does not overflow.
        assert_eq!(live_since(i64::MIN + 1, 100), i64::MIN);
    }

    type Users = HashMap<String, UserRow>;

    /// Another caller's write, run before each `register`.
    type Meanwhile = Box<dyn FnMut(&mut Users) + Send>;

    /// Users by name, as a database would hold them, with a hook that
    /// changes the table between a login's read and its write.
    #[derive(Default)]
    struct Memory {
        users: Mutex<Users>,
        tokens: Mutex<Vec<(i64, String)>>,
        meanwhile: Mutex<Option<Meanwhile>>,
    }

    #[async_trait]
    impl Accounts for Memory {
        async fn user(&self, name: &str) -> Result<Option<UserRow>, ApiError> {
            Ok(self.users.lock().unwrap().get(name).cloned())
        }
        async fn add_token(&self, id: i64, token: &str) -> Result<Option<String>, ApiError> {
            self.tokens.lock().unwrap().push((id, token.into()));
            Ok(Some(format!("pos-{id}")))
        }
        async fn register(
            &self,
            name: &str,
            phc: &str,
            token: &str,
        ) -> Result<Registered, ApiError> {
            let mut users = self.users.lock().unwrap();
            if let Some(f) = self.meanwhile.lock().unwrap().as_mut() {
                f(&mut users);
            }
            let id = match claim(users.get(name), Claimant::Registration) {
                Claim::Insert => users.len() as i64 + 1,
                Claim::TakeOver(id) => id,
                Claim::Retry => return Ok(Registered::Retry),
                Claim::Taken => return Err(name_taken(name)),
            };
            let user = UserRow {
                id,
                password_hash: Some(phc.into()),
                guest: false,
                live: true,
            };
            users.insert(name.into(), user);
            self.tokens.lock().unwrap().push((id, token.into()));
            Ok(Registered::Done(None))
        }
    }

    fn hashing() -> HashPool {
        let counter = prometheus::IntCounter::new("hashes", "hashes").unwrap();
        HashPool::start(1, 4, counter).unwrap()
    }

    fn login_req(password: &str) -> LoginReq {
        LoginReq {
            user: "ann".into(),
            password: password.into(),
            source: None,
        }
    }

    #[tokio::test]
    async fn login_registers_then_checks_the_password() {
        let (db, hashing) = (Memory::default(), hashing());
        let first = login(&db, &hashing, login_req("secret-1")).await.unwrap();
        assert!(!first.guest);
        assert_eq!(first.user, "ann");
        let again = login(&db, &hashing, login_req("secret-1")).await.unwrap();
        assert_ne!(again.token, first.token);
        assert_eq!(again.pos.as_deref(), Some("pos-1"));
        let wrong = login(&db, &hashing, login_req("secret-2")).await;
        assert_eq!(wrong.unwrap_err().kind, ErrorKind::AuthFailed);
        assert_eq!(db.tokens.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn login_is_refused_a_live_guest_name_and_takes_an_expired_one() {
        let (db, hashing) = (Memory::default(), hashing());
        db.users
            .lock()
            .unwrap()
            .insert("ann".into(), row(true, true, false));
        let e = login(&db, &hashing, login_req("secret-1"))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::NameTaken);
        db.users.lock().unwrap().get_mut("ann").unwrap().live = false;
        login(&db, &hashing, login_req("secret-1")).await.unwrap();
        let users = db.users.lock().unwrap();
        assert_eq!(users["ann"].id, 7);
        assert!(!users["ann"].guest);
    }

    /// Someone registers the name between the read and the write: the
    /// login starts over and checks the password against theirs.
    #[tokio::test]
    async fn a_name_registered_meanwhile_is_checked_against_its_password() {
        let (db, hashing) = (Memory::default(), hashing());
        let theirs = hashing.hash(Arc::new("theirs-1".into())).await.unwrap();
        *db.meanwhile.lock().unwrap() = Some(Box::new(move |users| {
            users.entry("ann".into()).or_insert(UserRow {
                id: 3,
                password_hash: Some(theirs.clone()),
                guest: false,
                live: true,
            });
        }));
        let e = login(&db, &hashing, login_req("mine-111"))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::AuthFailed);
        let ok = login(&db, &hashing, login_req("theirs-1")).await.unwrap();
        assert_eq!(ok.pos.as_deref(), Some("pos-3"));
    }

    /// A name that changes hands at every attempt ends the login as
    /// retryable instead of looping.
    #[tokio::test]
    async fn a_name_changing_hands_forever_is_unavailable() {
        struct Flapping;
        #[async_trait]
        impl Accounts for Flapping {
            async fn user(&self, _: &str) -> Result<Option<UserRow>, ApiError> {
                Ok(None)
            }
            async fn add_token(&self, _: i64, _: &str) -> Result<Option<String>, ApiError> {
                unreachable!("never verified")
            }
            async fn register(&self, _: &str, _: &str, _: &str) -> Result<Registered, ApiError> {
                Ok(Registered::Retry)
            }
        }
        let e = login(&Flapping, &hashing(), login_req("secret-1"))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unavailable);
    }
}
