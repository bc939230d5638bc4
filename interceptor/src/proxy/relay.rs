//! Byte relay between two streams, with half-close and reset propagation.
//!
//! Relay buffers are lent, not owned: each direction borrows a buffer from a small per-thread
//! pool when it reads, and gives it back as soon as everything read has been written and the
//! next read would block. An idle connection therefore holds no relay buffer at all, which is
//! what keeps the agent's memory per proxied connection small (BENCHMARKS.md), while a busy
//! one still moves data in large chunks.

use std::{
    cell::RefCell,
    future::poll_fn,
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use crate::records::OpenRecord;

/// Size of a relay buffer: large enough for bulk transfers to use few system calls.
const BUFFER: usize = 256 * 1024;
/// After a read of at least this much (a full TLS record, or a plaintext read that found a
/// backlog), read again before writing, so bulk data goes out in large writes; a shorter
/// read is written at once, so small messages never wait for another system call.
const COALESCE_ABOVE: usize = 16 * 1024;
/// Buffers each thread keeps for reuse; more are freed when returned.
const POOL_PER_THREAD: usize = 16;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer from this thread's pool, or a new one.
fn take_buffer() -> Box<[u8]> {
    POOL.try_with(|pool| pool.borrow_mut().pop())
        .ok()
        .flatten()
        .unwrap_or_else(|| vec![0u8; BUFFER].into_boxed_slice())
}

/// Returns a buffer to this thread's pool (or frees it when the pool is full).
fn give_buffer(buffer: Box<[u8]>) {
    let _ = POOL.try_with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < POOL_PER_THREAD {
            pool.push(buffer);
        }
    });
}

/// Bytes moved by a relay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Moved {
    /// From the caller's side to the destination's side.
    pub to_destination: u64,
    /// From the destination's side to the caller's side.
    pub to_caller: u64,
}

/// Copies both ways until both sides have finished. When one side stops writing, the other
/// side's write half is shut down, so half-closed connections keep working.
pub async fn relay<A, B>(caller: &mut A, destination: &mut B) -> io::Result<Moved>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut forward = Half::default();
    let mut backward = Half::default();
    let result = poll_fn(|cx| {
        let to_destination = forward.poll(cx, &mut *caller, &mut *destination)?;
        let to_caller = backward.poll(cx, &mut *destination, &mut *caller)?;
        match (to_destination, to_caller) {
            (Poll::Ready(to_destination), Poll::Ready(to_caller)) => Poll::Ready(Ok(Moved {
                to_destination,
                to_caller,
            })),
            _ => Poll::Pending,
        }
    })
    .await;
    forward.release();
    backward.release();
    result
}

/// One direction of a relay: read, write, and at the reader's end shut the writer down.
#[derive(Default)]
struct Half {
    /// The lent buffer, while it holds data or a read is in progress.
    buffer: Option<Box<[u8]>>,
    /// Written up to here.
    pos: usize,
    /// Filled up to here.
    cap: usize,
    /// Bytes written in all.
    moved: u64,
    /// Whether the writer needs a flush before we wait for the reader.
    need_flush: bool,
    /// The reader reached its end.
    read_done: bool,
    /// The writer has been shut down: this direction is finished.
    done: bool,
}

impl Half {
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(self.moved));
        }
        loop {
            if self.pos == self.cap && !self.read_done {
                // Empty: read.
                match self.poll_read(cx, reader) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        self.release();
                        if self.need_flush {
                            ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            while self.pos < self.cap {
                let Some(buffer) = self.buffer.as_deref() else {
                    break;
                };
                let n = ready!(Pin::new(&mut *writer).poll_write(cx, &buffer[self.pos..self.cap]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "relay peer accepted no bytes",
                    )));
                }
                self.pos += n;
                self.moved += n as u64;
                self.need_flush = true;
            }
            self.pos = 0;
            self.cap = 0;
            if self.read_done {
                self.release();
                if self.need_flush {
                    ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                    self.need_flush = false;
                }
                ready!(Pin::new(&mut *writer).poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(self.moved));
            }
        }
    }

    /// Reads into the (borrowed) buffer; after a large read, keeps reading while data is
    /// ready and there is room. Ready(Ok) means data was read or the reader ended.
    fn poll_read<R>(&mut self, cx: &mut Context<'_>, reader: &mut R) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin + ?Sized,
    {
        let buffer = self.buffer.get_or_insert_with(take_buffer);
        loop {
            let mut read = ReadBuf::new(&mut buffer[self.cap..]);
            match Pin::new(&mut *reader).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {
                    let n = read.filled().len();
                    if n == 0 {
                        self.read_done = true;
                        return Poll::Ready(Ok(()));
                    }
                    self.cap += n;
                    if n < COALESCE_ABOVE || self.cap == buffer.len() {
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                // Nothing more now: write what we have, or wait if we have nothing.
                Poll::Pending if self.cap > 0 => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Gives the buffer back if it holds nothing unwritten.
    fn release(&mut self) {
        if self.pos == self.cap
            && let Some(buffer) = self.buffer.take()
        {
            give_buffer(buffer);
        }
    }
}

/// A stream whose reads are served from a lent buffer filled by large reads.
///
/// rustls reads TLS records from its transport 4 KiB at a time, so a bulk transfer over a
/// bare socket costs a system call (and often an ACK) per 4 KiB. Under TLS, this turns them
/// into one read of up to a relay buffer. The buffer is borrowed from the relay pool only
/// while it holds unread bytes, so an idle connection keeps none. Writes pass straight
/// through.
pub struct ReadAhead<S> {
    inner: S,
    buffer: Option<Box<[u8]>>,
    pos: usize,
    cap: usize,
}

impl<S> ReadAhead<S> {
    /// Wraps a transport.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            buffer: None,
            pos: 0,
            cap: 0,
        }
    }

    /// The wrapped transport.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    fn release(&mut self) {
        if self.pos == self.cap
            && let Some(buffer) = self.buffer.take()
        {
            self.pos = 0;
            self.cap = 0;
            give_buffer(buffer);
        }
    }
}

impl<S> Drop for ReadAhead<S> {
    fn drop(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            give_buffer(buffer);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos == this.cap {
            let buffer = this.buffer.get_or_insert_with(take_buffer);
            let mut read = ReadBuf::new(buffer);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {
                    this.pos = 0;
                    this.cap = read.filled().len();
                }
                Poll::Ready(Err(e)) => {
                    this.release();
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => {
                    this.release();
                    return Poll::Pending;
                }
            }
        }
        if let Some(buffer) = this.buffer.as_deref() {
            let n = out.remaining().min(this.cap - this.pos);
            out.put_slice(&buffer[this.pos..this.pos + n]);
            this.pos += n;
        }
        this.release();
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Closes a TCP connection with a reset instead of a FIN, so the peer sees the failure at once.
pub fn reset(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}

/// Relays between the caller and the destination in plaintext (a destination outside the
/// mesh), then closes the connection's record; after an error both sockets are reset, so
/// neither peer waits.
pub async fn carry(record: OpenRecord, caller: &mut TcpStream, destination: &mut TcpStream) {
    match relay(caller, destination).await {
        Ok(moved) => record.close(moved.to_destination, moved.to_caller, None),
        Err(e) => {
            reset(caller);
            reset(destination);
            record.close(0, 0, Some(format!("relay: {e}")));
        }
    }
}

/// Which end of a carried HBONE stream called.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// The app (outbound: the pod's own connect).
    App,
    /// The stream (inbound: a caller on another node).
    Stream,
}

/// Relays between an app's connection and an HBONE stream ([`super::stream::relay`]), then
/// closes the record; after an error the socket is reset and the stream reset
/// (`RST_STREAM`), so neither peer waits. With [`carry`], the one place a carried
/// connection's record is closed (a task that ends early closes it by dropping it).
pub async fn carry_stream(
    record: OpenRecord,
    app: &mut TcpStream,
    stream: &mut super::stream::H2Stream,
    caller: Caller,
) {
    match super::stream::relay(app, stream).await {
        Ok((app_to_stream, stream_to_app)) => {
            let (to_destination, to_caller) = match caller {
                Caller::App => (app_to_stream, stream_to_app),
                Caller::Stream => (stream_to_app, app_to_stream),
            };
            record.close(to_destination, to_caller, None);
        }
        Err(e) => {
            reset(app);
            stream.reset();
            record.close(0, 0, Some(format!("relay: {e}")));
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    #[tokio::test]
    async fn relays_both_ways_with_half_close() {
        let (mut client, mut caller_side) = duplex(64 * 1024);
        let (mut destination_side, mut server) = duplex(64 * 1024);
        let relay =
            tokio::spawn(async move { relay(&mut caller_side, &mut destination_side).await });
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let expected = payload.clone();
        let upload = tokio::spawn(async move {
            client.write_all(&payload).await.unwrap();
            client.shutdown().await.unwrap();
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.unwrap();
            answer
        });
        let mut received = Vec::new();
        server.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, expected);
        server.write_all(b"done").await.unwrap();
        server.shutdown().await.unwrap();
        drop(server);
        assert_eq!(upload.await.unwrap(), b"done");
        let moved = relay.await.unwrap().unwrap();
        assert_eq!(
            moved,
            Moved {
                to_destination: 3_000_000,
                to_caller: 4
            }
        );
    }

    #[tokio::test]
    async fn idle_relays_hold_no_buffer() {
        let (_client, mut caller_side) = duplex(1024);
        let (mut destination_side, _server) = duplex(1024);
        let mut forward = Half::default();
        let mut backward = Half::default();
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(
            forward
                .poll(&mut cx, &mut caller_side, &mut destination_side)
                .is_pending()
        );
        assert!(
            backward
                .poll(&mut cx, &mut destination_side, &mut caller_side)
                .is_pending()
        );
        assert!(forward.buffer.is_none() && backward.buffer.is_none());
    }

    #[tokio::test]
    async fn read_ahead_serves_small_reads_from_one_large_read_and_keeps_nothing_idle() {
        let (mut writer, reader) = duplex(1024 * 1024);
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        writer.write_all(&payload).await.unwrap();
        drop(writer);
        let mut ahead = ReadAhead::new(reader);
        let mut received = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = ahead.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            received.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(received, payload);
        assert!(ahead.buffer.is_none());
    }

    #[tokio::test]
    async fn small_messages_go_through_one_at_a_time() {
        let (mut client, mut caller_side) = duplex(1024);
        let (mut destination_side, mut server) = duplex(1024);
        tokio::spawn(async move { relay(&mut caller_side, &mut destination_side).await });
        for i in 0..100u8 {
            client.write_all(&[i]).await.unwrap();
            let mut byte = [0u8; 1];
            server.read_exact(&mut byte).await.unwrap();
            assert_eq!(byte[0], i);
            server.write_all(&[i ^ 0xff]).await.unwrap();
            client.read_exact(&mut byte).await.unwrap();
            assert_eq!(byte[0], i ^ 0xff);
        }
    }
}
