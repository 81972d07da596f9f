//! The line codec (`protocol/src/codec.rs`) on arbitrary bytes split at
//! arbitrary points.
//!
//! Input: byte 0 picks the maximum line length (1..=256), byte 1 seeds the
//! split points, the rest is what a client sends. Checked: every way of
//! splitting the bytes decodes to the same frames, and those are what a
//! plain reference model of the framing rules says; no line is longer than
//! the limit or holds a `\n`; the codec never holds more than the limit
//! plus a terminator between reads.
#![no_main]

use bytes::BytesMut;
use chat_protocol::{Frame, LineCodec};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let [max, seed, input @ ..] = data else {
        return;
    };
    let max_line = 1 + usize::from(*max);
    let expected = model(input, max_line);
    assert_eq!(
        feed(input, max_line, &[input.len().max(1)]),
        expected,
        "in one piece"
    );
    assert_eq!(feed(input, max_line, &[1]), expected, "byte by byte");
    let sizes = split_sizes(*seed, max_line);
    assert_eq!(
        feed(input, max_line, &sizes),
        expected,
        "in pieces {sizes:?}"
    );
});

/// Feeds `input` in chunks of the given sizes (repeated), as a socket would.
fn feed(input: &[u8], max_line: usize, sizes: &[usize]) -> Vec<Frame> {
    let mut codec = LineCodec::new(max_line);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut rest = input;
    let mut i = 0;
    while !rest.is_empty() {
        let n = sizes[i % sizes.len()].clamp(1, rest.len());
        i += 1;
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        while let Some(frame) = codec.decode(&mut buf).expect("decode never fails") {
            check(&frame, max_line);
            out.push(frame);
        }
        assert!(
            buf.len() <= max_line + 2,
            "holds {} bytes, limit {max_line}",
            buf.len()
        );
    }
    while let Some(frame) = codec.decode_eof(&mut buf).expect("decode never fails") {
        check(&frame, max_line);
        out.push(frame);
    }
    out
}

fn check(frame: &Frame, max_line: usize) {
    if let Frame::Line(line) = frame {
        assert!(line.len() <= max_line, "line of {} bytes", line.len());
        assert!(!line.contains('\n'));
    }
}

/// The framing rules, stated directly: lines end at `\n`, one `\r` before
/// it is dropped, a last line without terminator counts, a line longer than
/// the limit is one `TooLong`, one that is not UTF-8 one `BadUtf8`.
fn model(input: &[u8], max_line: usize) -> Vec<Frame> {
    let mut out = Vec::new();
    let mut segments: Vec<&[u8]> = input.split(|&b| b == b'\n').collect();
    if segments.last().is_some_and(|s| s.is_empty()) {
        segments.pop();
    }
    for seg in segments {
        let line = seg.strip_suffix(b"\r").unwrap_or(seg);
        out.push(if line.len() > max_line {
            Frame::TooLong
        } else {
            match std::str::from_utf8(line) {
                Ok(s) => Frame::Line(s.to_string()),
                Err(_) => Frame::BadUtf8,
            }
        });
    }
    out
}

/// A few chunk sizes around the limit, from `seed` (xorshift).
fn split_sizes(seed: u8, max_line: usize) -> Vec<usize> {
    let mut x = u32::from(seed) | 0x100;
    (0..8)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            1 + (x as usize) % (max_line + 4)
        })
        .collect()
}
