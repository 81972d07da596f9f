//! The chat server's side of the storage tier: [`DbClient`] speaks the
//! HTTP/JSON contract of `chat_storage_api` to one or more dbproxies.
//!
//! Modules: `client` ([`DbClient`]: failover between dbproxies, what may be
//! resent, readiness probes), `coalesce` (concurrent appends and DMs into few
//! requests), `bearer` ([`BearerToken`], fixed or re-read from a file),
//! `pool` (connections capped per dbproxy, mutual TLS for `https://`).
//!
//! Path of an append: `DbClient::append` → `coalesce` queue → one
//! `POST /v1/append` for every caller waiting → `client::post` (token,
//! failover) → `pool` connection → each caller's slice of the answer.
//!
//! It holds no SQL and no storage engine: a chat server links this crate,
//! never `chat-dbproxy`.

mod bearer;
mod client;
mod coalesce;
mod pool;

pub use bearer::{BearerToken, TokenError};
pub use client::{ClientOptions, DbClient, Probe};
pub use pool::PoolOptions;
