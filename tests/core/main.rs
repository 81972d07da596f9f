//! Integration tests of the chat system against docs/PROTOCOL.md: a dbproxy
//! (SQLite in a temp dir) and a chat server run in-process on `127.0.0.1:0`
//! and are driven over real sockets. One test binary keeps link time down.

mod common;

mod bad_input;
mod cluster;
mod dm;
mod durability;
mod first_line;
mod history;
mod login;
mod login_memory;
mod messages;
mod proxy;
mod rooms;
mod scale;
mod slow_sockets;
mod tls;
mod up;
