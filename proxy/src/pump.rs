//! The copy loop's two directions ([`Pump`]): bytes read from one side
//! and not yet written to the other, in a buffer that exists only while
//! bytes move and grows for busy connections; and [`read_drained`], a read
//! that clears a drained socket's readiness at once.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use chat_tls::Stream;
use tokio::io::Interest;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Reads per direction start this large and grow (×4 while reads fill them)
/// up to [`PUMP_BUF_MAX`], so a busy connection (a member of a busy room)
/// moves its backlog in few large reads while a chatty one stays small. The
/// buffer exists only while bytes are moving (see `read_ready`): idle
/// connections, most of them, hold none.
const PUMP_BUF_MIN: usize = 2048;
const PUMP_BUF_MAX: usize = 64 * 1024;

/// One direction of the copy: bytes read but not yet written, and the
/// size of the next read (grown while reads fill it, see [`PUMP_BUF_MIN`]).
pub(crate) struct Pump {
    pending: Vec<u8>,
    written: usize,
    size: usize,
    /// The last byte written so far.
    last: Option<u8>,
    /// TLS only: bytes taken by the session but not yet flushed to the
    /// socket (still this direction's, so it reads no more meanwhile).
    unflushed: bool,
    /// TLS only: the buffer a pending read of a TLS stream waits with.
    /// Unlike a socket, a TLS stream has no readiness to wait on without
    /// a buffer; rustls holds buffers of its own on such a connection.
    spare: Vec<u8>,
}

impl Pump {
    pub(crate) fn new() -> Pump {
        Pump {
            pending: Vec::new(),
            written: 0,
            size: PUMP_BUF_MIN,
            last: None,
            unflushed: false,
            spare: Vec::new(),
        }
    }

    pub(crate) fn busy(&self) -> bool {
        self.written < self.pending.len() || self.unflushed
    }

    /// A read of `n` bytes into `buf` is what is pending now; the next
    /// read's size follows how full this one was.
    fn filled(&mut self, mut buf: Vec<u8>, n: usize) {
        if n == self.size {
            self.size = (self.size * 4).min(PUMP_BUF_MAX);
        } else if n < self.size / 8 {
            self.size = (self.size / 2).max(PUMP_BUF_MIN);
        }
        buf.truncate(n);
        self.pending = buf;
        self.written = 0;
    }

    /// Reads what `from` has ready; `Ok(false)` at end of stream. The buffer
    /// is allocated only now and freed once written, so an idle connection
    /// holds none.
    pub(crate) fn read(&mut self, from: &TcpStream) -> std::io::Result<bool> {
        let mut buf = Vec::with_capacity(self.size);
        match read_drained(from, &mut buf) {
            Ok(0) => Ok(false),
            Ok(n) => {
                self.filled(buf, n);
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// Writes as much of what is pending as `to` takes now.
    pub(crate) fn write(&mut self, to: &TcpStream) -> std::io::Result<()> {
        while self.busy() {
            match to.try_write(&self.pending[self.written..]) {
                Ok(n) => {
                    self.written += n;
                    self.last = self.pending.get(self.written.wrapping_sub(1)).copied();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        self.pending = Vec::new();
        self.written = 0;
        Ok(())
    }

    /// Reads what a TLS stream has decrypted; `Ready(Ok(false))` at its end.
    pub(crate) fn poll_read_tls(
        &mut self,
        from: &mut Stream,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<bool>> {
        let mut buf = std::mem::take(&mut self.spare);
        if buf.len() != self.size {
            buf = vec![0; self.size];
        }
        let mut read = ReadBuf::new(&mut buf);
        match Pin::new(from).poll_read(cx, &mut read) {
            Poll::Pending => {
                self.spare = buf;
                Poll::Pending
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => {
                let n = read.filled().len();
                if n == 0 {
                    return Poll::Ready(Ok(false));
                }
                self.filled(buf, n);
                Poll::Ready(Ok(true))
            }
        }
    }

    /// Writes what is pending into a TLS stream and flushes it to the
    /// socket; `Ready(Ok)` once all of it is on the socket.
    pub(crate) fn poll_write_tls(
        &mut self,
        to: &mut Stream,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        while self.written < self.pending.len() {
            let n = ready!(Pin::new(&mut *to).poll_write(cx, &self.pending[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
            self.last = self.pending.get(self.written - 1).copied();
            self.unflushed = true;
        }
        if self.unflushed {
            ready!(Pin::new(&mut *to).poll_flush(cx))?;
            self.unflushed = false;
        }
        self.pending = Vec::new();
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    /// After [`Event::UpstreamReadable`]: reads the plain socket, which is
    /// ready; a TLS upstream's bytes were read by the poll that raised it.
    pub(crate) fn read_upstream(&mut self, from: &Stream) -> std::io::Result<bool> {
        match from {
            Stream::Plain(s) => self.read(s),
            Stream::Tls(_) => Ok(true),
        }
    }

    /// Writes to the plain socket now; a TLS upstream is written (and
    /// flushed) by the copy loop's poll, see [`Pump::poll_write_tls`].
    pub(crate) fn write_upstream(&mut self, to: &Stream) -> std::io::Result<()> {
        match to {
            Stream::Plain(s) => self.write(s),
            Stream::Tls(_) => Ok(()),
        }
    }

    /// Whether what was written so far ends a line (or nothing was).
    pub(crate) fn at_line_start(&self) -> bool {
        self.last.is_none_or(|b| b == b'\n')
    }
}

/// A read buffer that knows its spare capacity (what [`read_drained`] needs:
/// `BufMut` alone may grow a `Vec` and so cannot tell a filled buffer).
pub trait SpareCapacity: bytes::BufMut {
    fn spare(&self) -> usize;
}

impl SpareCapacity for Vec<u8> {
    fn spare(&self) -> usize {
        self.capacity() - self.len()
    }
}

impl SpareCapacity for BytesMut {
    fn spare(&self) -> usize {
        self.capacity() - self.len()
    }
}

/// Reads what `from` has ready into the spare capacity of `buf`. A read
/// that does not fill the buffer emptied the socket, so its readiness is
/// cleared right away; otherwise tokio learns that only from one more read
/// that finds nothing, a system call per chunk copied.
pub fn read_drained<B: SpareCapacity>(from: &TcpStream, buf: &mut B) -> std::io::Result<usize> {
    let mut got = None;
    let r = from.try_io(Interest::READABLE, || {
        let n = from.try_read_buf(buf)?;
        got = Some(n);
        if n > 0 && buf.spare() > 0 {
            // Clears the readiness (unless an event came in meanwhile).
            Err(std::io::ErrorKind::WouldBlock.into())
        } else {
            Ok(n)
        }
    });
    match (got, r) {
        (Some(n), _) => Ok(n),
        (None, r) => r,
    }
}
