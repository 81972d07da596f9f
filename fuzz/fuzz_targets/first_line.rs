//! The proxy's first-line handling (`proxy/src/conn.rs`): bytes as a client
//! sends them, split at arbitrary points, through the `LineCodec` the proxy
//! reads with, then `judge_first`, which skips leading empty lines and
//! picks the routing key or the refusal.
//!
//! Input: byte 0 seeds the split points, the rest is what the client sends
//! (the proxy's default `max_line_bytes`, 4096, with `-max_len` above it).
//! Checked: no panic; the answer does not depend on how the bytes were
//! split; a key is a user name that the line itself names (what the chat
//! server will log in); a refusal is one `ERR` line without control
//! characters (it is written to the client as is).
#![no_main]

use bytes::BytesMut;
use chat_protocol::first::First;
use chat_protocol::{names, text, Command, Frame, LineCodec, ServerLine};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

/// The proxy's default `max_line_bytes`.
const MAX_LINE: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let [seed, input @ ..] = data else {
        return;
    };
    let whole = first(input, &[input.len().max(1)]);
    assert_eq!(first(input, &[1]), whole, "byte by byte");
    let sizes = [1 + usize::from(*seed), 1 + usize::from(seed.rotate_left(4))];
    assert_eq!(first(input, &sizes), whole, "in pieces of {sizes:?}");
    let Some((frame, answer)) = whole else {
        return;
    };
    match answer {
        Ok(key) => {
            let user = std::str::from_utf8(&key).expect("a key is a user name");
            assert!(names::is_user(user), "key {user:?}");
            let Frame::Line(line) = frame else {
                panic!("a key from a {frame:?}");
            };
            let named = match Command::parse(&line) {
                Ok(Command::Login { user, .. }) => user,
                Ok(Command::Join { guest: Some(g), .. }) => g,
                Ok(Command::Resume { token }) => names::token_user(&token).unwrap().to_string(),
                other => panic!("{line:?} routed as {user:?}, parses as {other:?}"),
            };
            assert_eq!(named, user);
        }
        Err(reply) => {
            assert!(matches!(reply, ServerLine::Err { .. }), "{reply:?}");
            let wire = reply.to_bytes();
            let line = std::str::from_utf8(&wire[..wire.len() - 1]).expect("replies are UTF-8");
            assert!(wire.ends_with(b"\n") && !line.contains('\n'));
            assert!(text::is_text(line), "reply {line:?}");
        }
    }
});

type Answer = Result<Vec<u8>, ServerLine>;

/// What the proxy decides for the first line, fed in chunks of `sizes` as
/// `read_first_line` feeds its codec, leading empty lines skipped by
/// `judge_first`; `None` when the client closes first.
fn first(input: &[u8], sizes: &[usize]) -> Option<(Frame, Answer)> {
    let mut codec = LineCodec::new(MAX_LINE);
    let mut pending = BytesMut::new();
    let mut rest = input;
    let mut i = 0;
    let mut empty = 0;
    loop {
        let frame = match codec.decode(&mut pending).expect("decode never fails") {
            Some(frame) => frame,
            None if rest.is_empty() => codec
                .decode_eof(&mut pending)
                .expect("decode never fails")?,
            None => {
                let n = sizes[i % sizes.len()].clamp(1, rest.len());
                i += 1;
                pending.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
                continue;
            }
        };
        let Some(judged) = chat_proxy::judge_first(frame.clone(), &mut empty) else {
            assert!(
                matches!(&frame, Frame::Line(l) if l.trim().is_empty()),
                "skipped {frame:?}"
            );
            continue;
        };
        let answer = judged
            .map(|cmd| {
                First::Start(cmd)
                    .routing_key()
                    .map(<[u8]>::to_vec)
                    .unwrap_or_default()
            })
            .map_err(|e| ServerLine::err(e.code, e.detail));
        return Some((frame, answer));
    }
}
