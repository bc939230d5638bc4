//! One HBONE stream, and the relay between it and the app's TCP connection.
//!
//! HTTP/2 flow control is kept honest: received bytes are released to the peer's window only
//! once they have been copied out to the relay, and writes wait for send capacity, so a slow
//! reader slows its own stream, never the tunnel's other streams. The end of the stream
//! (`END_STREAM`) is the half-close; a reset of the stream (`RST_STREAM`) or of the tunnel
//! is an error, which the relay turns into a reset of the TCP connection on the other side.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::{io::AsyncWrite, net::TcpStream};

use super::pool::Lease;

/// An HTTP/2 stream carrying one proxied connection.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// The pool's count of the tunnel's streams, on the client side: released on drop.
    lease: Option<Lease>,
}

impl H2Stream {
    /// Serial number of the certificate the destination agent presented on the stream's
    /// tunnel (client side only).
    pub fn peer_certificate_serial(&self) -> Option<&str> {
        self.lease.as_ref()?.peer_certificate_serial()
    }

    /// Wraps the two halves of an accepted or opened stream; `lease` counts it against its
    /// tunnel's stream limit until the stream is dropped.
    pub fn new(send: SendStream<Bytes>, recv: RecvStream, lease: Option<Lease>) -> Self {
        Self { send, recv, lease }
    }

    /// Resets the stream (`RST_STREAM CANCEL`): the peer's side fails at once, and the tunnel
    /// and its other streams go on.
    pub fn reset(&mut self) {
        self.send.send_reset(Reason::CANCEL);
    }

    /// The error for a stream the peer reset, or whose tunnel failed.
    fn stream_error(&mut self, cx: &mut Context<'_>, error: Option<h2::Error>) -> io::Error {
        if let Some(error) = error {
            return to_io(error);
        }
        match self.send.poll_reset(cx) {
            Poll::Ready(Ok(reason)) => io::Error::new(
                io::ErrorKind::ConnectionReset,
                format!("stream reset by the peer agent ({reason})"),
            ),
            Poll::Ready(Err(error)) => to_io(error),
            Poll::Pending => io::Error::new(io::ErrorKind::BrokenPipe, "stream closed"),
        }
    }
}

/// An HTTP/2 error as an I/O error a relay understands: a reset of the stream or the tunnel
/// is a connection reset.
fn to_io(error: h2::Error) -> io::Error {
    if error.is_io() {
        return error
            .into_io()
            .unwrap_or_else(|| io::Error::other("tunnel I/O error"));
    }
    let kind = if error.is_go_away() {
        io::ErrorKind::ConnectionAborted
    } else {
        io::ErrorKind::ConnectionReset
    };
    io::Error::new(kind, format!("tunnel: {error}"))
}

/// Largest read from the app handed to the tunnel at once, as one DATA frame's payload.
const CHUNK: usize = 256 * 1024;
/// A connection's first read buffer. A payload holds its whole buffer until HTTP/2 has sent
/// it, so a few bytes in a `CHUNK`-sized buffer pinned 256 KiB of address space each: 10,000
/// connections answering at once made the allocator map 2 GB and keep 9 MiB of bookkeeping
/// for it (RELIABILITY.md, "Soak"). 8 KiB stays in the allocator's small size classes.
const FIRST_READ: usize = 8 * 1024;
/// A read buffer with less room than this left is replaced by a new one.
const MIN_ROOM: usize = 16 * 1024;

/// Relays between a TCP connection to an app and an HBONE stream until both directions
/// have ended, without copying in user space: bytes read from the app are handed to HTTP/2
/// as they are, and DATA frames are written to the app from HTTP/2's own buffers. Returns the
/// bytes moved (app to stream, stream to app).
///
/// Memory follows the relay's rule: a buffer exists only while a direction holds data, so an
/// idle connection keeps none.
pub async fn relay(app: &mut TcpStream, stream: &mut H2Stream) -> io::Result<(u64, u64)> {
    let mut up = Up::default();
    let mut down = Down::default();
    std::future::poll_fn(|cx| {
        let sent = up.poll(cx, app, stream)?;
        let received = down.poll(cx, stream, app)?;
        match (sent, received) {
            (Poll::Ready(sent), Poll::Ready(received)) => Poll::Ready(Ok((sent, received))),
            _ => Poll::Pending,
        }
    })
    .await
}

/// App to stream.
struct Up {
    /// Where reads from the app land; split off and frozen into the payload.
    buffer: Option<BytesMut>,
    /// Capacity of the next buffer: from [`FIRST_READ`], doubled after each read that filled
    /// its buffer, up to [`CHUNK`], so bulk transfers soon read in large chunks.
    capacity: usize,
    /// Read, not yet given to HTTP/2.
    pending: Bytes,
    moved: u64,
    /// The app half-closed.
    read_done: bool,
    done: bool,
}

impl Default for Up {
    fn default() -> Self {
        Self {
            buffer: None,
            capacity: FIRST_READ,
            pending: Bytes::new(),
            moved: 0,
            read_done: false,
            done: false,
        }
    }
}

impl Up {
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        app: &TcpStream,
        stream: &mut H2Stream,
    ) -> Poll<io::Result<u64>> {
        while !self.done {
            if !self.pending.is_empty() {
                let capacity = ready!(stream.poll_send_capacity(cx, self.pending.len()))?;
                let chunk = self.pending.split_to(capacity.min(self.pending.len()));
                self.moved += chunk.len() as u64;
                stream.send(chunk, false)?;
            } else if self.read_done {
                stream.send(Bytes::new(), true)?;
                self.done = true;
            } else {
                match ready!(self.poll_read(cx, app)) {
                    Ok(0) => self.read_done = true,
                    Ok(_) => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
        }
        Poll::Ready(Ok(self.moved))
    }

    /// Reads what the app has sent into `pending`; 0 at its end.
    fn poll_read(&mut self, cx: &mut Context<'_>, app: &TcpStream) -> Poll<io::Result<usize>> {
        loop {
            if let Err(e) = ready!(app.poll_read_ready(cx)) {
                return Poll::Ready(Err(e));
            }
            let capacity = self.capacity;
            let buffer = self
                .buffer
                .get_or_insert_with(|| BytesMut::with_capacity(capacity));
            let room = buffer.capacity() - buffer.len();
            match app.try_read_buf(buffer) {
                Ok(n) => {
                    if n == room {
                        self.capacity = (capacity * 2).min(CHUNK);
                    }
                    self.pending = buffer.split().freeze();
                    if buffer.capacity() < MIN_ROOM {
                        self.buffer = None;
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Nothing to read: an idle connection keeps no buffer.
                    self.buffer = None;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// Stream to app.
#[derive(Default)]
struct Down {
    /// The DATA frame being written to the app.
    chunk: Bytes,
    moved: u64,
    done: bool,
}

impl Down {
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        stream: &mut H2Stream,
        app: &mut TcpStream,
    ) -> Poll<io::Result<u64>> {
        while !self.done {
            if self.chunk.is_empty() {
                match ready!(stream.poll_chunk(cx))? {
                    Some(chunk) => self.chunk = chunk,
                    None => {
                        ready!(Pin::new(&mut *app).poll_shutdown(cx))?;
                        self.done = true;
                    }
                }
                continue;
            }
            let n = ready!(Pin::new(&mut *app).poll_write(cx, &self.chunk))?;
            if n == 0 {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the app accepted no bytes",
                )));
            }
            let _ = self.chunk.split_to(n);
            self.moved += n as u64;
            // The window reopens only for what the app has taken.
            stream.release(n);
        }
        Poll::Ready(Ok(self.moved))
    }
}

impl H2Stream {
    /// Waits for room to send up to `wanted` bytes; the room, at least 1.
    fn poll_send_capacity(
        &mut self,
        cx: &mut Context<'_>,
        wanted: usize,
    ) -> Poll<io::Result<usize>> {
        let mut capacity = self.send.capacity();
        while capacity == 0 {
            self.send.reserve_capacity(wanted);
            capacity = match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(capacity)) => capacity,
                Some(Err(error)) => return Poll::Ready(Err(self.stream_error(cx, Some(error)))),
                None => return Poll::Ready(Err(self.stream_error(cx, None))),
            };
        }
        Poll::Ready(Ok(capacity))
    }

    /// Queues `data` (within the capacity granted), or the end of the stream.
    fn send(&mut self, data: Bytes, end: bool) -> io::Result<()> {
        self.send.send_data(data, end).map_err(to_io)
    }

    /// The next DATA payload; `None` at the end of the stream.
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        loop {
            return match ready!(self.recv.poll_data(cx)) {
                None => Poll::Ready(Ok(None)),
                Some(Ok(data)) if data.is_empty() => continue,
                Some(Ok(data)) => Poll::Ready(Ok(Some(data))),
                Some(Err(error)) => Poll::Ready(Err(self.stream_error(cx, Some(error)))),
            };
        }
    }

    /// Returns `n` received bytes to the peer's window.
    fn release(&mut self, n: usize) {
        let _ = self.recv.flow_control().release_capacity(n);
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::AsyncWriteExt,
        net::{TcpListener, TcpStream},
    };

    use super::*;

    /// A connected pair on loopback: (the app's end, the relay's end).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        (app, listener.accept().await.unwrap().0)
    }

    /// What one read hands to HTTP/2.
    async fn read_once(up: &mut Up, relay_end: &TcpStream) -> Bytes {
        std::future::poll_fn(|cx| up.poll_read(cx, relay_end))
            .await
            .unwrap();
        std::mem::take(&mut up.pending)
    }

    #[tokio::test]
    async fn a_small_message_is_read_into_a_small_buffer() {
        let (mut app, relay_end) = pair().await;
        app.write_all(b"x").await.unwrap();
        let mut up = Up::default();
        let payload = read_once(&mut up, &relay_end).await;
        assert_eq!(&payload[..], b"x");
        assert_eq!(up.capacity, FIRST_READ);
        // The payload keeps its whole buffer alive until HTTP/2 has sent it: once the relay's
        // share is gone, the payload owns that buffer, and it is small.
        drop(up);
        let buffer = BytesMut::from(payload);
        assert!(buffer.capacity() <= 8 * 1024, "{}", buffer.capacity());
    }

    #[tokio::test]
    async fn a_bulk_transfer_grows_its_reads_up_to_a_chunk() {
        const SENT: usize = 32 * CHUNK;
        let (mut app, relay_end) = pair().await;
        let writer = tokio::spawn(async move { app.write_all(&vec![7u8; SENT]).await });
        let mut up = Up::default();
        let mut sizes = Vec::new();
        let mut received = 0;
        while received < SENT {
            let size = read_once(&mut up, &relay_end).await.len();
            received += size;
            sizes.push(size);
        }
        writer.await.unwrap().unwrap();
        // How much each read finds depends on how fast the writer refills the socket; what
        // holds is where the reads start, where they stop, and that they grow.
        assert!(sizes[0] <= 8 * 1024, "first read {}", sizes[0]);
        assert!(sizes.iter().all(|&size| size <= CHUNK), "{sizes:?}");
        assert!(
            sizes.iter().any(|&size| size > 8 * FIRST_READ),
            "reads never grew past {} bytes: {sizes:?}",
            8 * FIRST_READ
        );
    }
}
