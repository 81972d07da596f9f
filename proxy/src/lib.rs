//! The client-facing proxy tier: reads a client's first line, picks its chat
//! server by consistent hashing and forwards bytes both ways. It arrives with
//! issue #4; until then clients connect to a chat server directly and
//! `chat proxy` says so.
