//! The client line protocol, shared by the chat server, the proxy, `chat client`
//! and `chat bench`. Pure: no sockets, no tasks, no clocks.
//!
//! bytes → [`codec::LineCodec`] (frames, with a maximum line length checked before
//! buffering) → [`Command::parse`] (typed client commands) / [`ServerLine`]
//! (typed server lines, `Display` for the wire form and `FromStr` for clients).
//! A connection's first line is classified by [`first::classify`] (the proxy
//! and the chat server apply the same rules); [`proxy_line`] is the PROXY v1
//! line the proxy sends ahead of it.
//! [`ErrorCode`] holds the stable `ERR` codes documented in docs/PROTOCOL.md.

pub mod codec;
pub mod command;
pub mod error;
pub mod first;
pub mod names;
pub mod proxy_line;
pub mod reply;
pub mod text;

pub use codec::{Frame, LineCodec};
pub use command::Command;
pub use error::{ErrorCode, ParseError};
pub use reply::{PartReason, ServerLine};
