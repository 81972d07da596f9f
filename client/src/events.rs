//! What happened, for a caller that keeps a record of a run (the bench's
//! checked workload): first receipts, acknowledgements, read-your-writes
//! probes. Collected only when [`crate::Options::events`] asks for them.

/// How a room message arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// A `MSG` line, pushed to the room's members.
    Live,
    /// A `HIST` line, the answer to a `HISTORY` request.
    History,
}

/// Where the server stored an acknowledged message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    Room { room: String, seq: u64 },
    Dm { to: String, id: i64 },
}

impl Stored {
    pub(crate) fn dm(to: &str, id: i64) -> Stored {
        Stored::Dm {
            to: to.to_string(),
            id,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The first `OK JOIN` of a room: every message after `seq` is ours to receive.
    Joined { room: String, seq: u64 },
    /// The first receipt of a room seq.
    Message {
        room: String,
        seq: u64,
        from: String,
        text: String,
        via: Via,
    },
    /// The first receipt of a DM id.
    Dm { id: i64, from: String, text: String },
    /// A tracked send ([`crate::Unacked`]) was acknowledged.
    Acked { cid: String, stored: Stored },
    /// A read-your-writes probe was answered; `ok` if it returned the message.
    ReadYourWrites { room: String, seq: u64, ok: bool },
}
