//! Sockets inside a pod's network namespace.
//!
//! A socket belongs to the network namespace of the thread that created it, for its whole
//! life. Each enrolled pod gets one [`PodNetns`] thread that has joined the pod's namespace and
//! does nothing but create sockets on request; binding, connecting and all I/O then happen on
//! the agent's ordinary runtime threads.

use std::{
    fs::File,
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{Mutex, mpsc},
};

use nix::sched::{CloneFlags, setns};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// A request to the namespace thread: the socket type, and where to send the new socket.
type SocketRequest = (libc::c_int, mpsc::Sender<io::Result<OwnedFd>>);

/// A handle on a pod's network namespace that can create sockets in it.
pub struct PodNetns {
    path: PathBuf,
    cookie: u64,
    requests: Mutex<mpsc::Sender<SocketRequest>>,
}

impl PodNetns {
    /// Opens the namespace at `path` (for example `/run/netns/NAME` or `/proc/PID/ns/net`)
    /// and starts its socket thread.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("network namespace {}: {e}", path.display()),
            )
        })?;
        let (requests, receiver) = mpsc::channel::<SocketRequest>();
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("netns-{}", path.display()))
            .spawn(move || {
                if let Err(e) = setns(file.as_fd(), CloneFlags::CLONE_NEWNET) {
                    let _ = ready_tx.send(Err(io::Error::from(e)));
                    return;
                }
                let _ = ready_tx.send(new_socket(libc::SOCK_STREAM).and_then(|s| netns_cookie(&s)));
                for (socket_type, reply) in receiver {
                    let _ = reply.send(new_socket(socket_type));
                }
            })?;
        let cookie = ready_rx
            .recv()
            .map_err(|_| io::Error::other("network namespace thread exited"))??;
        Ok(Self {
            path: path.to_owned(),
            cookie,
            requests: Mutex::new(requests),
        })
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
        let (reply, response) = mpsc::channel();
        let gone = || io::Error::other("network namespace thread exited");
        self.requests
            .lock()
            .map_err(|_| io::Error::other("netns lock poisoned"))?
            .send((socket_type, reply))
            .map_err(|_| gone())?;
        response.recv().map_err(|_| gone())?
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
        return Err(io::Error::last_os_error());
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
