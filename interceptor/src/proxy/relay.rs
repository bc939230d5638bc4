//! Byte relay between two streams, with half-close and reset propagation.

use std::io;

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

/// Relay buffer per direction; large enough for bulk transfers to use few syscalls.
const BUFFER: usize = 256 * 1024;

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
    let (to_destination, to_caller) =
        tokio::io::copy_bidirectional_with_sizes(caller, destination, BUFFER, BUFFER).await?;
    Ok(Moved {
        to_destination,
        to_caller,
    })
}

/// Closes a TCP connection with a reset instead of a FIN, so the peer sees the failure at once.
pub fn reset(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}
