//! The CLI side of the admin socket.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
};

use serde::de::DeserializeOwned;

use super::protocol::{Request, Response};

/// Errors talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error(
        "cannot reach the agent at {path} ({cause}); is `interceptor agent` running? (--admin-socket or INTERCEPTOR_ADMIN_SOCKET picks the socket)"
    )]
    Connect {
        /// Socket path.
        path: String,
        /// Cause, part of the message rather than a source so it is printed once.
        cause: std::io::Error,
    },
    /// The conversation broke.
    #[error("admin socket: {0}")]
    Io(#[from] std::io::Error),
    /// The agent answered something unexpected.
    #[error("unexpected answer from the agent: {0}")]
    Protocol(#[from] serde_json::Error),
    /// The agent refused the request.
    #[error("{0}")]
    Refused(String),
}

/// Sends one request and decodes the body of the answer.
pub fn call<T: DeserializeOwned>(socket: &Path, request: &Request) -> Result<T, ClientError> {
    let mut lines = send(socket, request)?;
    let mut line = String::new();
    lines.read_line(&mut line)?;
    match serde_json::from_str(&line)? {
        Response::Ok(body) => Ok(serde_json::from_value(body)?),
        Response::Error(message) => Err(ClientError::Refused(message)),
    }
}

/// Sends a request whose answer is a stream of JSON lines, calling `each` per item.
pub fn stream<T: DeserializeOwned>(
    socket: &Path,
    request: &Request,
    mut each: impl FnMut(T) -> std::io::Result<()>,
) -> Result<(), ClientError> {
    let lines = send(socket, request)?;
    for line in lines.lines() {
        match serde_json::from_str(&line?)? {
            Response::Ok(body) => each(serde_json::from_value(body)?)?,
            Response::Error(message) => return Err(ClientError::Refused(message)),
        }
    }
    Ok(())
}

fn send(socket: &Path, request: &Request) -> Result<BufReader<UnixStream>, ClientError> {
    let mut stream = UnixStream::connect(socket).map_err(|cause| ClientError::Connect {
        path: socket.display().to_string(),
        cause,
    })?;
    let mut body = serde_json::to_vec(request)?;
    body.push(b'\n');
    stream.write_all(&body)?;
    Ok(BufReader::new(stream))
}
