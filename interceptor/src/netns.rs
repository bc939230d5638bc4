//! Sockets inside a pod's network namespace.
//!
//! A socket belongs to the network namespace of the thread that created it, for its whole
//! life. To make one in a pod's namespace, the calling thread joins that namespace with
//! `setns`, calls `socket`, and joins its own namespace again: two cheap system calls, with
//! nothing else running on the thread in between. Binding, connecting and all I/O then happen
//! on the agent's ordinary runtime threads.
//!
//! Why not a helper thread per pod that lives in the pod's namespace and makes sockets on
//! request: every socket would cost two cross-thread wake-ups and block a runtime thread while
//! waiting, which dominated the cost of a new proxied connection (see BENCHMARKS.md).

use std::{
    cell::RefCell,
    fs::File,
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use nix::sched::{CloneFlags, setns};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// A handle on a pod's network namespace that can create sockets in it.
pub struct PodNetns {
    path: PathBuf,
    cookie: u64,
    file: File,
}

impl PodNetns {
    /// Opens the namespace at `path` (for example `/run/netns/NAME` or `/proc/PID/ns/net`).
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("network namespace {}: {e}", path.display()),
            )
        })?;
        let mut netns = Self {
            path: path.to_owned(),
            cookie: 0,
            file,
        };
        let probe = netns.socket(libc::SOCK_STREAM).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("network namespace {}: {e}", path.display()),
            )
        })?;
        netns.cookie = netns_cookie(&probe)?;
        Ok(netns)
    }

    /// The namespace's path as given at enrollment.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The kernel's cookie for this namespace (what the eBPF programs key pods by).
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// A new non-blocking TCP socket in this namespace.
    pub fn tcp_socket(&self) -> io::Result<TcpSocket> {
        let fd = self.socket(libc::SOCK_STREAM)?;
        // SAFETY: a fresh TCP socket fd that we own.
        Ok(unsafe { TcpSocket::from_raw_fd(fd.into_raw_fd()) })
    }

    fn socket(&self, socket_type: libc::c_int) -> io::Result<OwnedFd> {
        self.run_inside(|| new_socket(socket_type))
    }

    /// Runs `f` on the calling thread while it is inside this namespace, then brings the
    /// thread back. Sockets made and `/proc/sys/net` files opened by `f` belong to the pod's
    /// namespace. `f` must be short and must not await: the thread is the caller's.
    pub fn run_inside<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        HOME.with(|home| {
            let mut home = home.borrow_mut();
            if home.is_none() {
                // First use on this thread, which is in its own namespace: every switch below
                // is undone before returning.
                *home = Some(File::open("/proc/thread-self/ns/net")?);
            }
            let home = home
                .as_ref()
                .ok_or_else(|| io::Error::other("no home netns"))?;
            setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            let result = f();
            if let Err(e) = setns(home.as_fd(), CloneFlags::CLONE_NEWNET) {
                // The thread would stay in the pod's namespace and later sockets would be made
                // in the wrong place; that must never happen, so stop here.
                tracing::error!(
                    "cannot return to the agent's network namespace after {}: {e}",
                    self.path.display()
                );
                std::process::abort();
            }
            result
        })
    }

    /// A listener bound in this namespace.
    pub fn listen(&self, addr: SocketAddrV4) -> io::Result<TcpListener> {
        let socket = self.tcp_socket()?;
        socket.set_reuseaddr(true)?;
        socket.bind(SocketAddr::V4(addr))?;
        socket.listen(1024)
    }

    /// Connects from this namespace.
    pub async fn connect(&self, addr: SocketAddrV4) -> io::Result<TcpStream> {
        let socket = self.tcp_socket()?;
        socket.set_nodelay(true)?;
        socket.connect(SocketAddr::V4(addr)).await
    }

    /// The pod's address: the source address of the namespace's default route.
    pub fn pod_ip(&self) -> io::Result<Ipv4Addr> {
        // A UDP connect only asks the routing table; nothing is sent.
        let socket = std::net::UdpSocket::from(self.socket(libc::SOCK_DGRAM)?);
        socket.connect("198.18.255.254:9")?;
        match socket.local_addr()? {
            SocketAddr::V4(v4) if !v4.ip().is_loopback() && !v4.ip().is_unspecified() => {
                Ok(*v4.ip())
            }
            other => Err(io::Error::other(format!(
                "network namespace {} has no routable IPv4 address (saw {other})",
                self.path.display()
            ))),
        }
    }
}

thread_local! {
    /// The network namespace this thread lives in, opened on its first socket request.
    static HOME: RefCell<Option<File>> = const { RefCell::new(None) };
}

fn new_socket(socket_type: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            socket_type | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(crate::limits::explain(io::Error::last_os_error()));
    }
    // SAFETY: fd is a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `SO_NETNS_COOKIE` of the namespace a socket lives in.
fn netns_cookie(socket: &OwnedFd) -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, out-pointer and length for a u64 option.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs root (setns), like the lab tests; CI runs as root.
    #[test]
    fn sockets_are_made_in_the_namespace_and_the_thread_comes_back() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (setns into a network namespace)"
        );
        let inode = |f: &File| {
            use std::os::unix::fs::MetadataExt;
            f.metadata().unwrap().ino()
        };
        let own = File::open("/proc/thread-self/ns/net").unwrap();
        let netns = PodNetns::open(Path::new("/proc/self/ns/net")).unwrap();
        let probe = new_socket(libc::SOCK_STREAM).unwrap();
        assert_eq!(netns.cookie(), netns_cookie(&probe).unwrap());
        let _socket = netns.tcp_socket().unwrap();
        let after = File::open("/proc/thread-self/ns/net").unwrap();
        assert_eq!(inode(&own), inode(&after));
    }
}
