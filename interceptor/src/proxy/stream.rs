//! One HBONE stream as a byte stream: an HTTP/2 CONNECT stream read and written like a TCP
//! connection, so the relay treats it like any other.
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

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::pool::Lease;

/// An HTTP/2 stream carrying one proxied connection.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received but not yet read: served before the next frame is polled.
    unread: Bytes,
    /// The pool's count of the tunnel's streams, on the client side: released on drop.
    _lease: Option<Lease>,
}

impl H2Stream {
    /// Wraps the two halves of an accepted or opened stream; `lease` counts it against its
    /// tunnel's stream limit until the stream is dropped.
    pub fn new(send: SendStream<Bytes>, recv: RecvStream, lease: Option<Lease>) -> Self {
        Self {
            send,
            recv,
            unread: Bytes::new(),
            _lease: lease,
        }
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

impl AsyncRead for H2Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.unread.is_empty() {
            match ready!(this.recv.poll_data(cx)) {
                // END_STREAM: the peer half-closed.
                None => return Poll::Ready(Ok(())),
                Some(Ok(data)) => this.unread = data,
                Some(Err(error)) => return Poll::Ready(Err(this.stream_error(cx, Some(error)))),
            }
        }
        let n = out.remaining().min(this.unread.len());
        out.put_slice(&this.unread.split_to(n));
        // The window reopens only for what the relay has taken.
        let _ = this.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let mut capacity = this.send.capacity();
        while capacity == 0 {
            this.send.reserve_capacity(buf.len());
            capacity = match ready!(this.send.poll_capacity(cx)) {
                Some(Ok(capacity)) => capacity,
                Some(Err(error)) => return Poll::Ready(Err(this.stream_error(cx, Some(error)))),
                None => return Poll::Ready(Err(this.stream_error(cx, None))),
            };
        }
        let n = capacity.min(buf.len());
        match this
            .send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
        {
            Ok(()) => Poll::Ready(Ok(n)),
            Err(error) => Poll::Ready(Err(this.stream_error(cx, Some(error)))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The tunnel's connection task writes and flushes queued frames.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.send.send_data(Bytes::new(), true) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(error) => Poll::Ready(Err(this.stream_error(cx, Some(error)))),
        }
    }
}
