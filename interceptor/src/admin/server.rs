//! The agent side of the admin socket.

use std::{io, path::Path, sync::Arc};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};
use tracing::warn;

use super::{
    AdminHandler,
    protocol::{Request, Response},
};

/// Longest request accepted; a policy batch fits easily.
const MAX_REQUEST: usize = 16 * 1024 * 1024;

/// Binds the socket (replacing a stale one), usable by its owner (root) only.
///
/// The socket must never exist with a wider mode than 0600, not even between `bind` and a
/// `chmod`: a caller that connects in that window keeps its connection. A unix socket's mode
/// is fixed at `bind` from the umask (`0777 & !umask`), and `fchmod` before `bind` has no
/// effect on it, so the socket is bound under a umask of 0177. The umask belongs to the
/// process's filesystem context, which all threads share; changing it would race with every
/// other thread creating files. So the bind runs on a short-lived thread that first gives
/// itself a private copy of that context (`unshare(CLONE_FS)`, which needs no privilege),
/// then sets the umask there: the socket is created 0600 and nothing else is affected.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let path = path.to_owned();
    let listener = std::thread::spawn(move || -> io::Result<std::os::unix::net::UnixListener> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS).map_err(io::Error::from)?;
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
        std::os::unix::net::UnixListener::bind(&path)
    })
    .join()
    .map_err(|_| io::Error::other("the admin socket's bind thread panicked"))??;
    listener.set_nonblocking(true)?;
    UnixListener::from_std(listener)
}

/// Serves requests until the task is aborted.
pub async fn serve<H: AdminHandler>(listener: UnixListener, handler: Arc<H>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(handle(stream, handler.clone()));
            }
            Err(e) => warn!("admin accept: {e}"),
        }
    }
}

async fn handle<H: AdminHandler>(stream: UnixStream, handler: Arc<H>) {
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
        let mut updates = handler.watch();
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
    let response = match handler.answer(request).await {
        Ok(body) => Response::Ok(body),
        Err(e) => Response::Error(e.to_string()),
    };
    let _ = send(&mut write, &response).await;
}

async fn send(write: &mut tokio::net::unix::OwnedWriteHalf, response: &Response) -> io::Result<()> {
    let mut body = serde_json::to_vec(response)?;
    body.push(b'\n');
    write.write_all(&body).await
}

#[cfg(test)]
#[allow(unsafe_code)] // inotify, to see that the socket's mode never changes after bind
mod tests {
    use std::{ffi::CString, os::unix::ffi::OsStrExt, os::unix::fs::PermissionsExt};

    use super::*;

    /// The socket is born 0600: right after `bind` its mode is 0600 although the caller's
    /// umask is 0, and inotify saw no attribute change on it (no `chmod` after the fact), so
    /// there was never a moment with another mode.
    #[tokio::test]
    async fn the_socket_is_created_0600_whatever_the_umask() {
        // A permissive umask for this thread only (its own filesystem context).
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS).unwrap();
        nix::sys::stat::umask(nix::sys::stat::Mode::empty());
        let dir = std::env::temp_dir().join(format!("admin-sock-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("admin.sock");
        // A stale socket is replaced.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        // SAFETY: plain inotify calls on a descriptor we own; the buffer is large enough.
        let inotify = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(inotify >= 0);
        let dir_c = CString::new(dir.as_os_str().as_bytes()).unwrap();
        let watch = unsafe {
            libc::inotify_add_watch(inotify, dir_c.as_ptr(), libc::IN_CREATE | libc::IN_ATTRIB)
        };
        assert!(watch >= 0);

        let _listener = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "mode right after bind is {mode:o}");

        let mut events = Vec::new();
        let mut buf = [0u8; 4096];
        let n = unsafe { libc::read(inotify, buf.as_mut_ptr().cast(), buf.len()) };
        let mut offset = 0;
        while n > 0 && offset < n as usize {
            // SAFETY: the kernel wrote whole inotify_event records into buf.
            let event = unsafe { &*(buf.as_ptr().add(offset) as *const libc::inotify_event) };
            let name_start = offset + std::mem::size_of::<libc::inotify_event>();
            let name = &buf[name_start..name_start + event.len as usize];
            let name = String::from_utf8_lossy(name)
                .trim_end_matches('\0')
                .to_owned();
            events.push((event.mask, name));
            offset = name_start + event.len as usize;
        }
        unsafe { libc::close(inotify) };
        assert!(
            events
                .iter()
                .any(|(mask, name)| mask & libc::IN_CREATE != 0 && name == "admin.sock"),
            "no creation seen: {events:?}"
        );
        assert!(
            !events.iter().any(|(mask, _)| mask & libc::IN_ATTRIB != 0),
            "the socket's attributes changed after it was created: {events:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
