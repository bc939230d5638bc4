//! The tunnel header, sent inside TLS right after the handshake.
//!
//! Client to server: `ICP1` and the original destination port (big endian u16).
//! Server to client: one status byte once the server has tried the destination, so a refused
//! destination is refused for the client too. A later protocol (HBONE: HTTP/2 CONNECT) can be
//! told apart by its first bytes.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const MAGIC: &[u8; 4] = b"ICP1";

/// The server's answer to a tunnel request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TunnelStatus {
    /// Connected to the destination; relaying follows.
    Connected = 0,
    /// The destination refused the connection.
    Refused = 1,
    /// The destination could not be reached for another reason.
    Unreachable = 2,
}

impl TunnelStatus {
    fn from_byte(byte: u8) -> io::Result<Self> {
        Ok(match byte {
            0 => Self::Connected,
            1 => Self::Refused,
            2 => Self::Unreachable,
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unknown tunnel status {other}"),
                ));
            }
        })
    }

    /// What a client agent tells the record about a failed tunnel.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Connected => "connected",
            Self::Refused => "destination refused the connection",
            Self::Unreachable => "destination unreachable from its agent",
        }
    }
}

/// Writes the request for `port`.
pub async fn write_request<S: AsyncWrite + Unpin>(stream: &mut S, port: u16) -> io::Result<()> {
    let mut request = [0u8; 6];
    request[..4].copy_from_slice(MAGIC);
    request[4..].copy_from_slice(&port.to_be_bytes());
    stream.write_all(&request).await?;
    stream.flush().await
}

/// Reads a request and returns the destination port.
pub async fn read_request<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<u16> {
    let mut request = [0u8; 6];
    stream.read_exact(&mut request).await?;
    if &request[..4] != MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not an interceptor tunnel request",
        ));
    }
    let port = u16::from_be_bytes([request[4], request[5]]);
    if port == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "tunnel request for port 0",
        ));
    }
    Ok(port)
}

/// Writes the server's status.
pub async fn write_status<S: AsyncWrite + Unpin>(
    stream: &mut S,
    status: TunnelStatus,
) -> io::Result<()> {
    stream.write_all(&[status as u8]).await?;
    stream.flush().await
}

/// Reads the server's status.
pub async fn read_status<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<TunnelStatus> {
    TunnelStatus::from_byte(stream.read_u8().await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn request_and_status_round_trip() {
        let (mut a, mut b) = tokio::io::duplex(64);
        write_request(&mut a, 8080).await.unwrap();
        assert_eq!(read_request(&mut b).await.unwrap(), 8080);
        write_status(&mut b, TunnelStatus::Refused).await.unwrap();
        assert_eq!(read_status(&mut a).await.unwrap(), TunnelStatus::Refused);
    }

    #[tokio::test]
    async fn garbage_is_refused() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let err = read_request(&mut b).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        a.write_all(&[9]).await.unwrap();
    }
}
