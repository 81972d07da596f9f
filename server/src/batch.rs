//! A room's lines for the members on one server, encoded once: one buffer
//! holding every line, and per line its length and the session that must
//! not receive it (its sender). The owner builds the buffer once per batch
//! and hands the same bytes to every server and every session; only a
//! session that skips one of the lines gets a copy without it.

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    /// Bytes of the line in the buffer, `\n` included.
    pub len: u32,
    /// A session of the receiving server that must not get it.
    pub except: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Batch {
    bytes: Bytes,
    lines: Vec<Line>,
}

impl Batch {
    /// `None` unless the lines' lengths add up to the buffer.
    pub fn new(bytes: Bytes, lines: Vec<Line>) -> Option<Batch> {
        let total: u64 = lines.iter().map(|l| u64::from(l.len)).sum();
        (total == bytes.len() as u64).then_some(Batch { bytes, lines })
    }

    /// The lines in one buffer (one line is used as it is, not copied).
    pub fn concat<'a>(lines: impl ExactSizeIterator<Item = &'a Bytes> + Clone) -> Bytes {
        if lines.len() == 1 {
            return lines.clone().next().cloned().unwrap_or_default();
        }
        let mut buf = BytesMut::with_capacity(lines.clone().map(Bytes::len).sum());
        for l in lines {
            buf.extend_from_slice(l);
        }
        buf.freeze()
    }

    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    pub fn lines(&self) -> &[Line] {
        &self.lines
    }

    /// What session `id` receives and how many lines that is: the shared
    /// buffer when it skips none, else a copy without its own lines;
    /// `None` when every line is its own.
    pub fn for_session(&self, id: u64) -> Option<(Bytes, usize)> {
        let skips = self.lines.iter().filter(|l| l.except == Some(id)).count();
        let count = self.lines.len() - skips;
        if count == 0 {
            return None;
        }
        if skips == 0 {
            return Some((self.bytes.clone(), count));
        }
        let mut buf = BytesMut::new();
        let mut at = 0;
        for l in &self.lines {
            let end = at + l.len as usize;
            if l.except != Some(id) {
                buf.extend_from_slice(&self.bytes[at..end]);
            }
            at = end;
        }
        Some((buf.freeze(), count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> Batch {
        let lines = [Bytes::from_static(b"a 1\n"), Bytes::from_static(b"bb 2\n")];
        let bytes = Batch::concat(lines.iter());
        let meta = vec![
            Line {
                len: 4,
                except: Some(7),
            },
            Line {
                len: 5,
                except: None,
            },
        ];
        Batch::new(bytes, meta).unwrap()
    }

    #[test]
    fn sessions_skip_only_their_own_lines() {
        let b = batch();
        assert_eq!(b.bytes().as_ref(), b"a 1\nbb 2\n");
        let (all, n) = b.for_session(1).unwrap();
        assert_eq!((all.as_ref(), n), (&b"a 1\nbb 2\n"[..], 2));
        assert_eq!(all.as_ptr(), b.bytes().as_ptr(), "shared, not copied");
        let (mine, n) = b.for_session(7).unwrap();
        assert_eq!((mine.as_ref(), n), (&b"bb 2\n"[..], 1));
    }

    #[test]
    fn lengths_must_cover_the_buffer() {
        let one = vec![Line {
            len: 3,
            except: None,
        }];
        assert!(Batch::new(Bytes::from_static(b"abcd"), one).is_none());
        let own = Batch::new(
            Bytes::from_static(b"x\n"),
            vec![Line {
                len: 2,
                except: Some(1),
            }],
        )
        .unwrap();
        assert!(own.for_session(1).is_none());
    }
}
