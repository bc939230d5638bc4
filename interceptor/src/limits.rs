//! Process limits: the open-file limit, and what the agent does when descriptors run out;
//! and the agent's scheduling niceness.
//!
//! Every proxied connection costs two descriptors in each agent, so the agent raises its soft
//! `RLIMIT_NOFILE` to the hard limit at start. When descriptors do run out anyway, a listener
//! cannot accept, and the waiting connection would hang in the kernel's accept queue. The
//! [`FdReserve`] keeps one descriptor aside so that the agent can still accept such a
//! connection, reset it and say why (the reserve-descriptor technique of servers such as
//! nginx and libev).

use std::{
    fs::File,
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::Mutex,
};

/// Below this open-file limit the agent warns at start: it serves at most half as many
/// proxied connections.
pub const LOW_NOFILE: u64 = 65_536;

/// The open-file limit before and after [`raise_nofile`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NofileLimit {
    /// Soft limit the agent was started with.
    pub before: u64,
    /// Soft limit now.
    pub soft: u64,
    /// Hard limit (the ceiling an unprivileged raise can reach).
    pub hard: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit.
pub fn raise_nofile() -> io::Result<NofileLimit> {
    let mut limit = get_nofile()?;
    let before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit with a valid pointer to an initialised struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let now = get_nofile()?;
    Ok(NofileLimit {
        before,
        soft: now.rlim_cur,
        hard: now.rlim_max,
    })
}

/// The current soft open-file limit (`u64::MAX` when unlimited or unknown).
pub fn nofile_soft() -> u64 {
    get_nofile().map_or(u64::MAX, |l| l.rlim_cur)
}

fn get_nofile() -> io::Result<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit with a valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(limit)
}

/// Whether an error means the process (EMFILE) or the system (ENFILE) has no descriptor left.
pub fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// The same error, with the limit and what to do named when it is descriptor exhaustion.
pub fn explain(e: io::Error) -> io::Error {
    if !is_fd_exhaustion(&e) {
        return e;
    }
    io::Error::new(e.kind(), fd_exhaustion_message(&e))
}

/// "no free file descriptor (...)": the text records and logs use for descriptor exhaustion.
pub fn fd_exhaustion_message(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENFILE) => {
            "no free file descriptor: the system-wide limit (fs.file-max) is reached".to_owned()
        }
        _ => format!(
            "no free file descriptor: the agent's open-file limit (RLIMIT_NOFILE {}) is reached; raise its hard limit",
            nofile_soft()
        ),
    }
}

/// Sets the calling thread's niceness; threads it starts afterwards inherit it (on Linux
/// niceness belongs to each thread, and a new thread copies its creator's). Lowering it below
/// 0 needs `CAP_SYS_NICE`.
pub fn set_niceness(nice: i32) -> io::Result<()> {
    // SAFETY: setpriority with PRIO_PROCESS and who = 0 changes only the calling thread.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The calling thread's niceness.
pub fn niceness() -> io::Result<i32> {
    // getpriority can return -1 legitimately, so errors are told apart through errno.
    // SAFETY: errno is thread-local; getpriority reads no memory of ours.
    unsafe { *libc::__errno_location() = 0 };
    // SAFETY: as above.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    let e = io::Error::last_os_error();
    if nice == -1 && e.raw_os_error() != Some(0) {
        return Err(e);
    }
    Ok(nice)
}

/// One descriptor kept aside, so a listener can still accept and reset a connection while
/// the process is out of descriptors.
pub struct FdReserve {
    spare: Mutex<Option<File>>,
}

impl FdReserve {
    /// Opens the spare descriptor.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            spare: Mutex::new(Some(open_spare()?)),
        })
    }

    /// Frees the spare descriptor, accepts one connection waiting on `listener`, resets it
    /// (`SO_LINGER` 0, so the caller sees a reset at once rather than a hang) and takes the
    /// spare back. Returns the caller's address; `None` when the spare is in use by another
    /// listener or was not available (the caller should back off briefly and retry).
    pub fn reset_one(&self, listener: &impl AsRawFd) -> Option<io::Result<SocketAddr>> {
        let mut spare = crate::sync::lock(&self.spare);
        // Closing the spare frees one descriptor for the accept below. A spare lost earlier
        // (no descriptor was free to take it back) is tried again first.
        drop(spare.take().or_else(|| open_spare().ok())?);
        let result = accept_and_reset(listener.as_raw_fd());
        *spare = open_spare().ok();
        Some(result)
    }
}

fn open_spare() -> io::Result<File> {
    File::open("/dev/null")
}

fn accept_and_reset(listener: RawFd) -> io::Result<SocketAddr> {
    // SAFETY: sockaddr_in is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: accept4 on a listening socket with a valid out-buffer and length.
    let fd = unsafe {
        libc::accept4(
            listener,
            (&mut addr as *mut libc::sockaddr_in).cast(),
            &mut len,
            libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: accept4 returned a new descriptor that we own.
    let stream = unsafe { OwnedFd::from_raw_fd(fd) };
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt with a valid linger struct and its size.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(stream);
    Ok(SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
        u16::from_be(addr.sin_port),
    )))
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn exhaustion_is_recognised_and_explained() {
        let e = explain(io::Error::from_raw_os_error(libc::EMFILE));
        assert!(e.to_string().contains("RLIMIT_NOFILE"), "{e}");
        let other = explain(io::Error::from_raw_os_error(libc::ECONNREFUSED));
        assert_eq!(other.raw_os_error(), Some(libc::ECONNREFUSED));
    }

    #[test]
    fn niceness_is_set_for_the_thread_and_inherited_by_the_threads_it_starts() {
        // A thread of its own, so the test harness keeps its niceness.
        let harness = niceness().unwrap();
        std::thread::spawn(|| {
            let before = niceness().unwrap();
            let wanted = if before == -3 { -4 } else { -3 };
            set_niceness(wanted).expect("setting niceness needs root (CAP_SYS_NICE)");
            assert_eq!(niceness().unwrap(), wanted);
            let child = std::thread::spawn(|| niceness().unwrap()).join().unwrap();
            assert_eq!(child, wanted);
        })
        .join()
        .unwrap();
        assert_eq!(
            niceness().unwrap(),
            harness,
            "the harness thread was not changed"
        );
    }

    #[test]
    fn the_reserve_resets_a_waiting_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let reserve = FdReserve::new().unwrap();
        let peer = reserve.reset_one(&listener).unwrap().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        let err = client.read(&mut [0u8; 1]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert!(reserve.spare.lock().unwrap().is_some());
    }
}
