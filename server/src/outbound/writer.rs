//! The writer task of a session: drains its queue into the socket.

use std::time::Duration;

use bytes::Bytes;
use chat_protocol::PartReason;
use chat_tls::WriteHalf;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;

use super::{Out, Rx, SessionHandle, KICK_GONE};

/// How long the last words (`BYE …`) to a client may take before we drop it.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(1);

/// Most bytes gathered from the queue into one write.
const WRITE_CHUNK: usize = 64 * 1024;

/// Most queued buffers handed to one vectored write.
const MAX_IOV: usize = 64;

/// Drains the queue into the socket until `Out::Close` or the socket fails.
/// Ids of written DMs go to the session's [`Receipts`], which report them to
/// `receipts` as received (best effort: a full receipts queue leaves the DM
/// pending, so it is delivered again at the next login).
///
/// Nothing is copied and no buffer is kept between writes: the queued buffers
/// (a room's batch is one buffer shared by every member) go to the socket as
/// they are, a backlog of them (up to [`WRITE_CHUNK`] bytes, [`MAX_IOV`]
/// buffers) in one vectored write.
pub async fn write_loop(
    handle: SessionHandle,
    mut rx: Rx,
    mut w: WriteHalf,
    receipts: mpsc::Sender<i64>,
) {
    let mut written_dms = Vec::new();
    loop {
        let Some(out) = rx.recv().await else { break };
        let (first, mut last) = unpack(out, &mut written_dms);
        let mut total = first.len();
        // Made per write and gone before the next wait for the queue: an
        // idle connection keeps no gather list.
        let mut bufs: Vec<Bytes> = vec![first];
        while !last && total < WRITE_CHUNK && bufs.len() < MAX_IOV {
            match rx.try_recv() {
                Some(out) => {
                    let (b, l) = unpack(out, &mut written_dms);
                    total += b.len();
                    bufs.push(b);
                    last = l;
                }
                None => break,
            }
        }
        let res = write_bufs(&handle, &mut w, &bufs).await;
        drop(bufs);
        match res {
            Written::All => {}
            Written::Kicked => break,
            Written::Failed => {
                handle.kick(KICK_GONE);
                break;
            }
        }
        if !written_dms.is_empty() {
            handle.dms_written(&mut written_dms, &receipts);
        }
        if last {
            handle.writer_done(&receipts);
            let _ = tokio::time::timeout(FAREWELL_TIMEOUT, w.shutdown()).await;
            return;
        }
    }
    handle.writer_done(&receipts);
    if handle.kick_reason() == Some(PartReason::Slow) {
        // The client does not read: skip its queue, say why (best effort), close.
        let bye = async {
            w.write_all(b"BYE slow\n").await?;
            // TLS holds the line until flushed; plain TCP has nothing to flush.
            w.flush().await
        };
        let _ = tokio::time::timeout(FAREWELL_TIMEOUT, bye).await;
    }
}

enum Written {
    All,
    Kicked,
    Failed,
}

/// Writes every byte of `bufs`: on plain TCP without a wait unless the
/// socket is full, on TLS through the session's encryption (boxed: only TLS
/// sessions pay for its future).
async fn write_bufs(handle: &SessionHandle, w: &mut WriteHalf, bufs: &[Bytes]) -> Written {
    match w {
        WriteHalf::Plain(w) => write_bufs_plain(handle, w, bufs).await,
        WriteHalf::Tls(w) => Box::pin(write_bufs_tls(handle, w, bufs)).await,
    }
}

/// TLS: one vectored write after another, then a flush that puts the
/// records on the socket; a kick ends the wait for a full socket.
async fn write_bufs_tls(
    handle: &SessionHandle,
    w: &mut (impl tokio::io::AsyncWrite + Unpin),
    bufs: &[Bytes],
) -> Written {
    let write = async {
        let (mut i, mut off) = (0, 0);
        while i < bufs.len() {
            if bufs[i].len() == off {
                i += 1;
                off = 0;
                continue;
            }
            let n = {
                let iov: Vec<std::io::IoSlice<'_>> = bufs[i..]
                    .iter()
                    .enumerate()
                    .map(|(k, b)| std::io::IoSlice::new(if k == 0 { &b[off..] } else { b }))
                    .collect();
                w.write_vectored(&iov).await?
            };
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            advance(bufs, &mut i, &mut off, n);
        }
        w.flush().await
    };
    tokio::select! {
        r = write => if r.is_ok() { Written::All } else { Written::Failed },
        _ = handle.kicked() => Written::Kicked,
    }
}

/// Moves the position (buffer `i`, `off` bytes into it) past `n` written bytes.
fn advance(bufs: &[Bytes], i: &mut usize, off: &mut usize, n: usize) {
    let mut left = n;
    while left > 0 {
        let rest = bufs[*i].len() - *off;
        if left >= rest {
            left -= rest;
            *i += 1;
            *off = 0;
        } else {
            *off += left;
            left = 0;
        }
    }
}

/// Writes every byte of `bufs`. Most writes go through at once; only one
/// that would block waits, and only that wait also listens for a kick.
async fn write_bufs_plain(
    handle: &SessionHandle,
    w: &mut OwnedWriteHalf,
    bufs: &[Bytes],
) -> Written {
    // Position: buffer `i`, `off` bytes into it.
    let (mut i, mut off) = (0, 0);
    loop {
        // Skip what is written, and empty buffers (an empty farewell).
        while i < bufs.len() && bufs[i].len() == off {
            i += 1;
            off = 0;
        }
        if i == bufs.len() {
            return Written::All;
        }
        // The slices live in this block only: in scope across the wait
        // below, they would be part of every session's writer task, 1 KiB
        // per connection even while idle.
        let tried = {
            let mut iov = [std::io::IoSlice::new(&[]); MAX_IOV];
            let mut n_iov = 0;
            for (k, b) in bufs[i..].iter().enumerate() {
                iov[k] = std::io::IoSlice::new(if k == 0 { &b[off..] } else { b });
                n_iov += 1;
            }
            w.try_write_vectored(&iov[..n_iov])
        };
        let n = match tried {
            Ok(n) => n,
            // Boxed: the wait's state exists only while a write waits.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                match Box::pin(writable_or_kicked(handle, w)).await {
                    Ok(()) => continue,
                    Err(ended) => return ended,
                }
            }
            Err(_) => return Written::Failed,
        };
        if n == 0 {
            return Written::Failed;
        }
        advance(bufs, &mut i, &mut off, n);
    }
}

/// Waits until `w` takes bytes again; `Err` once the session is kicked or
/// the socket fails.
async fn writable_or_kicked(handle: &SessionHandle, w: &OwnedWriteHalf) -> Result<(), Written> {
    tokio::select! {
        r = w.as_ref().writable() => r.map_err(|_| Written::Failed),
        _ = handle.kicked() => Err(Written::Kicked),
    }
}

/// The bytes of a queued item, and whether it is the last; notes DM ids.
fn unpack(out: Out, dms: &mut Vec<i64>) -> (Bytes, bool) {
    match out {
        Out::Line(b) | Out::Lines(b, _) => (b, false),
        Out::Dm(b, id) => {
            dms.push(id);
            (b, false)
        }
        Out::Close(b) => (b, true),
    }
}

#[cfg(test)]
mod tests {
    use super::super::channel;
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    /// Buffers bigger than the socket can take at once, empty ones among
    /// them, arrive whole and in order: partial vectored writes resume where
    /// they stopped.
    #[tokio::test]
    async fn vectored_writes_resume_after_partial_writes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let (_rd, mut w) = client.unwrap().into_split();
        let (mut peer, _) = accepted.unwrap();
        let (handle, _rx) = channel(1, "u".into(), 16);

        let bufs: Vec<Bytes> = (0..40u8)
            .map(|k| match k % 5 {
                0 => Bytes::new(),
                _ => Bytes::from(vec![k; 50_000 + k as usize]),
            })
            .collect();
        let want: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut chunk = vec![0u8; 7_000];
            loop {
                let n = peer.read(&mut chunk).await.unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&chunk[..n]);
                tokio::task::yield_now().await;
            }
            got
        });
        assert!(matches!(
            write_bufs_plain(&handle, &mut w, &bufs).await,
            Written::All
        ));
        drop(w);
        let got = reader.await.unwrap();
        assert_eq!(got.len(), want.len());
        assert!(got == want, "bytes arrive in order");
    }

    /// Every connection has a writer task, idle or not, and its future is
    /// the task's size: whatever is in scope across a wait is paid per
    /// connection (a gather array of `MAX_IOV` slices kept across the wait
    /// makes it 1,624 bytes: 1.3 KiB more per idle connection).
    #[tokio::test]
    async fn the_writer_task_of_an_idle_connection_stays_small() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (_rd, w) = client.into_split();
        let (handle, rx) = channel(1, "u".into(), 16);
        let (receipts, _receipts_rx) = mpsc::channel(1);
        let writer = write_loop(handle, rx, WriteHalf::Plain(w), receipts);
        let size = std::mem::size_of_val(&writer);
        assert!(size <= 512, "write_loop's future is {size} bytes");
    }
}
