//! bytes ↔ lines. The decoder never buffers more than `max_line` bytes of one
//! line: as soon as a line is longer, it reports [`Frame::TooLong`] and drops
//! bytes until the next `\n`.

use bytes::{Buf, BytesMut};
use tokio_util::codec::Decoder;

/// One decoded unit of client input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A complete line, terminator and a trailing `\r` removed.
    Line(String),
    /// A line exceeded the limit; its bytes are being discarded.
    TooLong,
    /// A complete line that is not UTF-8; it was discarded.
    BadUtf8,
}

#[derive(Debug)]
pub struct LineCodec {
    max_line: usize,
    /// How far `buf` has already been searched for `\n`.
    scanned: usize,
    /// Inside an over-long line: drop everything up to the next `\n`.
    discarding: bool,
}

impl LineCodec {
    pub fn new(max_line: usize) -> Self {
        LineCodec {
            max_line,
            scanned: 0,
            discarding: false,
        }
    }

    pub fn max_line(&self) -> usize {
        self.max_line
    }
}

impl Decoder for LineCodec {
    type Item = Frame;
    type Error = std::io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, std::io::Error> {
        loop {
            if self.discarding {
                match buf.iter().position(|&b| b == b'\n') {
                    Some(i) => {
                        buf.advance(i + 1);
                        self.discarding = false;
                        self.scanned = 0;
                        continue;
                    }
                    None => {
                        buf.clear();
                        return Ok(None);
                    }
                }
            }
            // The terminator (and a `\r` before it) may follow the last allowed byte.
            let limit = buf.len().min(self.max_line + 2);
            match buf[self.scanned..limit].iter().position(|&b| b == b'\n') {
                Some(off) => {
                    let nl = self.scanned + off;
                    self.scanned = 0;
                    let mut line = buf.split_to(nl + 1);
                    line.truncate(nl);
                    if line.last() == Some(&b'\r') {
                        line.truncate(nl - 1);
                    }
                    if line.len() > self.max_line {
                        return Ok(Some(Frame::TooLong));
                    }
                    return Ok(Some(match String::from_utf8(line.to_vec()) {
                        Ok(s) => Frame::Line(s),
                        Err(_) => Frame::BadUtf8,
                    }));
                }
                None if buf.len() > self.max_line + 1 => {
                    // No terminator within the limit (+1 for a `\r`): too long.
                    // The rest is dropped by the next call, up to the next `\n`.
                    self.discarding = true;
                    self.scanned = 0;
                    return Ok(Some(Frame::TooLong));
                }
                None => {
                    self.scanned = limit;
                    return Ok(None);
                }
            }
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, std::io::Error> {
        match self.decode(buf)? {
            Some(frame) => Ok(Some(frame)),
            None => {
                // A last line without terminator still counts (`printf 'QUIT' | nc`).
                if buf.is_empty() || self.discarding {
                    buf.clear();
                    return Ok(None);
                }
                buf.extend_from_slice(b"\n");
                self.decode(buf)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(codec: &mut LineCodec, input: &[u8], byte_by_byte: bool) -> Vec<Frame> {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let chunks: Vec<&[u8]> = if byte_by_byte {
            input.chunks(1).collect()
        } else {
            vec![input]
        };
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            while let Some(f) = codec.decode(&mut buf).unwrap() {
                out.push(f);
            }
            assert!(buf.len() <= codec.max_line() + 2, "buffered {}", buf.len());
        }
        while let Some(f) = codec.decode_eof(&mut buf).unwrap() {
            out.push(f);
        }
        out
    }

    fn line(s: &str) -> Frame {
        Frame::Line(s.to_string())
    }

    #[test]
    fn splits_lines_crlf_and_lf() {
        for bb in [false, true] {
            let mut c = LineCodec::new(16);
            let got = feed(&mut c, b"PING\r\nJOIN a\n\nQUIT", bb);
            assert_eq!(
                got,
                vec![line("PING"), line("JOIN a"), line(""), line("QUIT")]
            );
        }
    }

    #[test]
    fn over_long_line_is_reported_once_and_discarded() {
        for bb in [false, true] {
            let mut c = LineCodec::new(8);
            let mut input = b"ok\n".to_vec();
            input.extend(std::iter::repeat_n(b'x', 100));
            input.extend_from_slice(b"\nafter\n");
            let got = feed(&mut c, &input, bb);
            assert_eq!(got, vec![line("ok"), Frame::TooLong, line("after")]);
        }
    }

    #[test]
    fn exactly_max_is_accepted_with_crlf() {
        for bb in [false, true] {
            let mut c = LineCodec::new(4);
            let got = feed(&mut c, b"abcd\r\nabcd\nabcde\nz\n", bb);
            assert_eq!(
                got,
                vec![line("abcd"), line("abcd"), Frame::TooLong, line("z")]
            );
        }
    }

    #[test]
    fn invalid_utf8_is_reported() {
        let mut c = LineCodec::new(16);
        let got = feed(&mut c, b"\xff\xfe\nPING\n", true);
        assert_eq!(got, vec![Frame::BadUtf8, line("PING")]);
    }

    #[test]
    fn multibyte_utf8_split_across_reads() {
        let mut c = LineCodec::new(16);
        let got = feed(&mut c, "héllo ✓\n".as_bytes(), true);
        assert_eq!(got, vec![line("héllo ✓")]);
    }
}
