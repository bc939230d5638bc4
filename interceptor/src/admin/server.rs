//! The agent side of the admin socket.

use std::{io, path::Path, sync::Arc};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};
use tracing::warn;

use super::protocol::{Request, Response};
use crate::agent::Agent;

/// Longest request accepted; a policy batch fits easily.
const MAX_REQUEST: usize = 16 * 1024 * 1024;

/// Binds the socket (replacing a stale one), readable by root only.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves requests until the task is aborted.
pub async fn serve(listener: UnixListener, agent: Arc<Agent>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(handle(stream, agent.clone()));
            }
            Err(e) => warn!("admin accept: {e}"),
        }
    }
}

async fn handle(stream: UnixStream, agent: Arc<Agent>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST as u64));
    if reader.read_line(&mut line).await.is_err() {
        return;
    }
    // A request may be a large policy batch: decode it off the runtime's workers.
    let decoded = tokio::task::spawn_blocking(move || serde_json::from_str::<Request>(&line))
        .await
        .map_err(|e| e.to_string())
        .and_then(|decoded| decoded.map_err(|e| e.to_string()));
    let request = match decoded {
        Ok(request) => request,
        Err(e) => {
            let _ = send(
                &mut write,
                &Response::Error(format!("bad admin request: {e}")),
            )
            .await;
            return;
        }
    };
    if let Request::Watch = request {
        let mut updates = agent.records().subscribe();
        loop {
            let record = match updates.recv().await {
                Ok(record) => record,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return,
            };
            let body = serde_json::to_value(record).unwrap_or_default();
            if send(&mut write, &Response::Ok(body)).await.is_err() {
                return;
            }
        }
    }
    let response = match agent.handle(request).await {
        Ok(body) => Response::Ok(body),
        Err(message) => Response::Error(message),
    };
    let _ = send(&mut write, &response).await;
}

async fn send(write: &mut tokio::net::unix::OwnedWriteHalf, response: &Response) -> io::Result<()> {
    let mut body = serde_json::to_vec(response)?;
    body.push(b'\n');
    write.write_all(&body).await
}
