//! The client side of the chat protocol without I/O, shared by the terminal
//! client (`chat client`) and the bench's checked workload (`chat-bench
//! --scenario checked`), so both follow one set of rules, unit-tested here.
//!
//! server line → [`ClientState::on_line`] → [`Reaction`]: show it or not (a
//! duplicate), what to send back (`RESUME` + `ACK` on reconnect, `HISTORY`
//! for gaps, `ACK <id>` per DM), reconnect or not; the un-acked sends
//! ([`Unacked`]) to resend on a new connection; and, when asked for,
//! [`Event`]s for a recorder.

mod events;
mod state;
#[cfg(test)]
mod tests;
mod unacked;

pub use events::{Event, Stored, Via};
pub use state::{ClientState, Options, Reaction, HISTORY_PAGE};
pub use unacked::Unacked;
