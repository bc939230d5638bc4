//! Delivering mesh traffic to the app at the pod's own address, from the caller's address.
//!
//! The agent's delivery socket lives in the pod's network namespace, carries
//! [`DELIVERY_MARK`], binds the caller's address with `IP_TRANSPARENT` and connects to
//! `<pod ip>:<port>`. The app accepts the connection where an outside caller would reach it
//! (a service bound only to 127.0.0.1 stays private; one bound to the pod's address works)
//! and sees who called. No iptables or nftables rule is involved; [`prepare`] sets up the
//! pod's namespace once, with policy routing and two sysctls:
//!
//! - `ip rule pref 1 fwmark DELIVERY_MARK lookup DELIVERY_TABLE`, with `local 0.0.0.0/0 dev
//!   lo` in that table: every packet with the mark is delivered inside the namespace over
//!   the loopback device. The app's replies go to the caller's address, which the pod does
//!   not own; without the rule they would leave through the pod's interface to the real
//!   caller. The rule comes before the `local` table, whose rule moves from priority 0 to 2:
//!   otherwise the delivery's SYN to the pod's address would match the pod's local route,
//!   whose device is the pod's interface, and the kernel's door (sk_lookup) would see it
//!   arrive on that interface, like outside traffic. Through the delivery table it arrives
//!   on the loopback device, which nothing from outside can.
//! - `net.ipv4.tcp_fwmark_accept = 1`: a connection the app accepts takes the mark of the SYN
//!   that opened it, so the app's replies carry the mark, and sockops can tell a delivery
//!   from plaintext;
//! - `net.ipv4.fwmark_reflect = 1`: the reset for a closed port carries the mark of the SYN it
//!   answers, so a closed port is refused at once instead of timing out.
//!
//! All of it is per network namespace and only acts on packets with the mark, which only the
//! agent's sockets (root in the pod's namespace) carry: a packet loses its mark when it
//! crosses into another network namespace.

use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    time::Duration,
};

use interceptor_common::DELIVERY_MARK;
use tokio::net::TcpStream;

use crate::netns::PodNetns;

/// Routing table of the pod's namespace that sends marked packets to the loopback.
pub const DELIVERY_TABLE: u32 = 15008;
/// Priority of the rule that selects [`DELIVERY_TABLE`] for marked packets: first.
pub const DELIVERY_RULE_PRIORITY: u32 = 1;
/// Priority the `local` table's rule moves to (from 0), right after the delivery rule.
pub const LOCAL_RULE_PRIORITY: u32 = 2;
/// The kernel's `local` routing table.
const LOCAL_TABLE: u32 = 255;
/// How long the app may take to accept a delivery. A refused port answers at once; a
/// delivery only waits this long when the app's replies do not come back to the agent.
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(5);

/// Preparing or undoing a pod's reply routing failed.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// A sysctl of the pod's namespace could not be written.
    #[error("setting {key}=1 in network namespace {netns}: {source}")]
    Sysctl {
        /// The sysctl, as a path under /proc/sys.
        key: &'static str,
        /// The pod's namespace.
        netns: String,
        /// What the kernel said.
        source: io::Error,
    },
    /// The kernel refused a routing change.
    #[error("{what} in network namespace {netns}: {source}")]
    Netlink {
        /// The change, as `ip` would spell it.
        what: &'static str,
        /// The pod's namespace.
        netns: String,
        /// What the kernel said.
        source: io::Error,
    },
}

const SYSCTLS: [&str; 2] = ["net/ipv4/tcp_fwmark_accept", "net/ipv4/fwmark_reflect"];
const ROUTE: &str = "ip route local 0.0.0.0/0 dev lo table 15008";
const DELIVERY_RULE: &str = "ip rule pref 1 fwmark 0x15080000 lookup 15008";
const MOVED_LOCAL_RULE: &str = "ip rule pref 2 lookup local";
const LOCAL_RULE: &str = "ip rule pref 0 lookup local";

/// Sets up the pod's namespace so deliveries from foreign addresses get their replies.
/// Idempotent (a restarted agent calls it again for the pods it restores), and the local
/// table is reachable at every step: its new rule is added before the old one goes.
pub fn prepare(netns: &PodNetns) -> Result<(), DeliveryError> {
    for key in SYSCTLS {
        netns
            .run_inside(|| std::fs::write(format!("/proc/sys/{key}"), b"1"))
            .map_err(|source| DeliveryError::Sysctl {
                key,
                netns: netns.path().display().to_string(),
                source,
            })?;
    }
    let routing = Routing::open(netns)?;
    routing.change(ROUTE, netlink::local_default_route(true), 0)?;
    routing.change(
        MOVED_LOCAL_RULE,
        netlink::rule(true, LOCAL_RULE_PRIORITY, LOCAL_TABLE, None),
        libc::EEXIST,
    )?;
    routing.change(
        DELIVERY_RULE,
        netlink::rule(
            true,
            DELIVERY_RULE_PRIORITY,
            DELIVERY_TABLE,
            Some(DELIVERY_MARK),
        ),
        libc::EEXIST,
    )?;
    routing.change(
        LOCAL_RULE,
        netlink::rule(false, 0, LOCAL_TABLE, None),
        libc::ENOENT,
    )
}

/// Restores the pod's rules and removes the route of [`prepare`] (the sysctls stay: without
/// the mark they change nothing). Succeeds when they are already gone.
pub fn withdraw(netns: &PodNetns) -> Result<(), DeliveryError> {
    let routing = Routing::open(netns)?;
    routing.change(
        LOCAL_RULE,
        netlink::rule(true, 0, LOCAL_TABLE, None),
        libc::EEXIST,
    )?;
    routing.change(
        DELIVERY_RULE,
        netlink::rule(
            false,
            DELIVERY_RULE_PRIORITY,
            DELIVERY_TABLE,
            Some(DELIVERY_MARK),
        ),
        libc::ENOENT,
    )?;
    routing.change(
        MOVED_LOCAL_RULE,
        netlink::rule(false, LOCAL_RULE_PRIORITY, LOCAL_TABLE, None),
        libc::ENOENT,
    )?;
    routing.change(ROUTE, netlink::local_default_route(false), libc::ESRCH)
}

/// A routing socket of a pod's namespace: its requests change that namespace.
struct Routing<'a> {
    netns: &'a PodNetns,
    socket: OwnedFd,
}

impl<'a> Routing<'a> {
    fn open(netns: &'a PodNetns) -> Result<Self, DeliveryError> {
        let socket = netns
            .run_inside(|| {
                // SAFETY: plain socket(2); the result is checked.
                let fd = unsafe {
                    libc::socket(
                        libc::AF_NETLINK,
                        libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                        libc::NETLINK_ROUTE,
                    )
                };
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: a new descriptor we own.
                Ok(unsafe { OwnedFd::from_raw_fd(fd) })
            })
            .map_err(|source| routing_error(netns, "opening a routing socket", source))?;
        Ok(Self { netns, socket })
    }

    /// Sends one change; `tolerated` (an errno, or 0) means it was already made.
    fn change(
        &self,
        what: &'static str,
        message: Vec<u8>,
        tolerated: i32,
    ) -> Result<(), DeliveryError> {
        netlink::request(&self.socket, &message, tolerated)
            .map_err(|source| routing_error(self.netns, what, source))
    }
}

fn routing_error(netns: &PodNetns, what: &'static str, source: io::Error) -> DeliveryError {
    DeliveryError::Netlink {
        what,
        netns: netns.path().display().to_string(),
        source,
    }
}

/// Connects to the app at `app` (the pod's address) from inside the pod's namespace, with
/// the caller's address as source when it can be used, and [`DELIVERY_MARK`] on the socket.
pub async fn connect(
    netns: &PodNetns,
    caller: Ipv4Addr,
    app: SocketAddrV4,
) -> io::Result<TcpStream> {
    let socket = netns.tcp_socket()?;
    let fd = socket.as_raw_fd();
    set_int_option(
        fd,
        libc::SOL_SOCKET,
        libc::SO_MARK,
        DELIVERY_MARK as libc::c_int,
    )?;
    if is_usable_source(caller) {
        set_int_option(fd, libc::SOL_IP, libc::IP_TRANSPARENT, 1)?;
        // The port is chosen at connect, where the kernel checks the whole 4-tuple.
        set_int_option(fd, libc::SOL_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)?;
        socket.bind(SocketAddr::V4(SocketAddrV4::new(caller, 0)))?;
    }
    socket.set_nodelay(true)?;
    match tokio::time::timeout(DELIVERY_TIMEOUT, socket.connect(SocketAddr::V4(app))).await {
        Ok(connected) => connected,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "no answer from the app within {} s",
                DELIVERY_TIMEOUT.as_secs()
            ),
        )),
    }
}

/// A caller address the app may be shown. Loopback, unspecified, multicast and broadcast
/// addresses are never borrowed (a caller inside the pod could otherwise pose as its
/// localhost); such deliveries come from the pod's own address.
fn is_usable_source(ip: Ipv4Addr) -> bool {
    !(ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast())
}

fn set_int_option(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: valid fd, pointer to a live c_int and its length.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The rtnetlink messages [`prepare`] and [`withdraw`] need, and their exchange.
mod netlink {
    use std::{io, os::fd::AsRawFd, os::fd::OwnedFd};

    use super::DELIVERY_TABLE;

    const RTM_NEWROUTE: u16 = 24;
    const RTM_DELROUTE: u16 = 25;
    const RTM_NEWRULE: u16 = 32;
    const RTM_DELRULE: u16 = 33;
    const NLMSG_ERROR: u16 = 2;
    const NLM_F_REQUEST: u16 = 0x1;
    const NLM_F_ACK: u16 = 0x4;
    const NLM_F_REPLACE: u16 = 0x100;
    const NLM_F_EXCL: u16 = 0x200;
    const NLM_F_CREATE: u16 = 0x400;
    const AF_INET: u8 = 2;
    const RTN_LOCAL: u8 = 2;
    const RT_SCOPE_HOST: u8 = 254;
    const RT_SCOPE_NOWHERE: u8 = 255;
    const RTPROT_STATIC: u8 = 4;
    const FR_ACT_TO_TBL: u8 = 1;
    const RTA_OIF: u16 = 4;
    const RTA_TABLE: u16 = 15;
    const FRA_PRIORITY: u16 = 6;
    const FRA_FWMARK: u16 = 10;
    const FRA_TABLE: u16 = 15;
    const FRA_FWMASK: u16 = 16;
    const LOOPBACK_IFINDEX: u32 = 1;
    const HEADER_LEN: usize = 16;

    /// `ip rule add|del pref <priority> [fwmark <mark>/0xffffffff] lookup <table>`. Adding is
    /// exclusive, so an existing rule answers EEXIST instead of being doubled.
    pub(super) fn rule(add: bool, priority: u32, table: u32, fwmark: Option<u32>) -> Vec<u8> {
        let (kind, flags) = if add {
            (RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL)
        } else {
            (RTM_DELRULE, 0)
        };
        // struct fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action, flags.
        let mut body = vec![AF_INET, 0, 0, 0, 0, 0, 0, FR_ACT_TO_TBL, 0, 0, 0, 0];
        attribute(&mut body, FRA_PRIORITY, priority);
        if let Some(mark) = fwmark {
            attribute(&mut body, FRA_FWMARK, mark);
            attribute(&mut body, FRA_FWMASK, u32::MAX);
        }
        attribute(&mut body, FRA_TABLE, table);
        message(kind, flags, &body)
    }

    /// `ip route replace|del local 0.0.0.0/0 dev lo table DELIVERY_TABLE`.
    pub(super) fn local_default_route(add: bool) -> Vec<u8> {
        let (kind, flags, scope) = if add {
            (RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, RT_SCOPE_HOST)
        } else {
            (RTM_DELROUTE, 0, RT_SCOPE_NOWHERE)
        };
        // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
        let mut body = vec![
            AF_INET,
            0,
            0,
            0,
            0,
            RTPROT_STATIC,
            scope,
            RTN_LOCAL,
            0,
            0,
            0,
            0,
        ];
        attribute(&mut body, RTA_TABLE, DELIVERY_TABLE);
        attribute(&mut body, RTA_OIF, LOOPBACK_IFINDEX);
        message(kind, flags, &body)
    }

    fn attribute(body: &mut Vec<u8>, kind: u16, value: u32) {
        body.extend_from_slice(&8u16.to_ne_bytes());
        body.extend_from_slice(&kind.to_ne_bytes());
        body.extend_from_slice(&value.to_ne_bytes());
    }

    fn message(kind: u16, flags: u16, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        out.extend_from_slice(&((HEADER_LEN + body.len()) as u32).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        out.extend_from_slice(&1u32.to_ne_bytes()); // sequence number
        out.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        out.extend_from_slice(body);
        out
    }

    /// Sends one request and waits for its acknowledgement; `tolerated` (an errno, or 0) is
    /// taken as success.
    pub(super) fn request(socket: &OwnedFd, message: &[u8], tolerated: i32) -> io::Result<()> {
        let fd = socket.as_raw_fd();
        // SAFETY: valid fd and buffer; the kernel address is the default (zeroed) one.
        let sent = unsafe { libc::send(fd, message.as_ptr().cast(), message.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut answer = [0u8; 4096];
        // SAFETY: valid fd and buffer.
        let got = unsafe { libc::recv(fd, answer.as_mut_ptr().cast(), answer.len(), 0) };
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        ack_status(&answer[..got as usize], tolerated)
    }

    /// Reads the acknowledgement (struct nlmsgerr after the header).
    pub(super) fn ack_status(answer: &[u8], tolerated: i32) -> io::Result<()> {
        let field = |at: usize| -> Option<[u8; 4]> { answer.get(at..at + 4)?.try_into().ok() };
        let kind = answer.get(4..6).map(|b| u16::from_ne_bytes([b[0], b[1]]));
        let (Some(NLMSG_ERROR), Some(errno)) = (kind, field(HEADER_LEN).map(i32::from_ne_bytes))
        else {
            return Err(io::Error::other(
                "unexpected answer from the kernel's routing socket",
            ));
        };
        match -errno {
            0 => Ok(()),
            e if e == tolerated => Ok(()),
            e => Err(io::Error::from_raw_os_error(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_message_matches_the_kernel_layout() {
        let add = netlink::rule(true, 1, 15008, Some(DELIVERY_MARK));
        // header 16 + fib_rule_hdr 12 + four 8-byte attributes.
        assert_eq!(add.len(), 16 + 12 + 4 * 8);
        assert_eq!(u32::from_ne_bytes(add[0..4].try_into().unwrap()), 60);
        assert_eq!(u16::from_ne_bytes(add[4..6].try_into().unwrap()), 32);
        let flags = u16::from_ne_bytes(add[6..8].try_into().unwrap());
        assert_eq!(flags, 0x1 | 0x4 | 0x400 | 0x200);
        // fwmark attribute: len 8, type 10, the mark.
        let fwmark = &add[16 + 12 + 8..16 + 12 + 16];
        assert_eq!(u16::from_ne_bytes(fwmark[2..4].try_into().unwrap()), 10);
        assert_eq!(
            u32::from_ne_bytes(fwmark[4..8].try_into().unwrap()),
            DELIVERY_MARK
        );
        let del = netlink::rule(false, 1, 15008, Some(DELIVERY_MARK));
        assert_eq!(u16::from_ne_bytes(del[4..6].try_into().unwrap()), 33);
        assert_eq!(del[16..], add[16..]);
        // Without a mark: priority and table only.
        assert_eq!(netlink::rule(true, 2, 255, None).len(), 16 + 12 + 2 * 8);
    }

    #[test]
    fn acknowledgements_are_read_with_the_tolerated_error() {
        let ack = |errno: i32| {
            let mut m = vec![0u8; 36];
            m[4..6].copy_from_slice(&2u16.to_ne_bytes());
            m[16..20].copy_from_slice(&(-errno).to_ne_bytes());
            m
        };
        assert!(netlink::ack_status(&ack(0), 0).is_ok());
        assert!(netlink::ack_status(&ack(libc::EEXIST), libc::EEXIST).is_ok());
        let refused = netlink::ack_status(&ack(libc::EPERM), libc::EEXIST).unwrap_err();
        assert_eq!(refused.raw_os_error(), Some(libc::EPERM));
        assert!(netlink::ack_status(&[0u8; 8], 0).is_err());
    }

    #[test]
    fn callers_inside_the_pod_never_borrow_loopback() {
        assert!(is_usable_source(Ipv4Addr::new(198, 19, 1, 10)));
        assert!(!is_usable_source(Ipv4Addr::LOCALHOST));
        assert!(!is_usable_source(Ipv4Addr::UNSPECIFIED));
        assert!(!is_usable_source(Ipv4Addr::BROADCAST));
        assert!(!is_usable_source(Ipv4Addr::new(224, 0, 0, 1)));
    }

    /// Needs root (a new network namespace), like the lab tests; CI runs as root.
    #[test]
    fn a_fresh_namespace_is_prepared_idempotently_and_withdrawn() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (a network namespace of its own)"
        );
        // A thread of our own moves into a new namespace; the test works through its path.
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            tx.send(format!("/proc/{}/task/{tid}/ns/net", std::process::id()))
                .unwrap();
            let _ = done_rx.recv();
        });
        let path = rx.recv().unwrap();
        let netns = PodNetns::open(std::path::Path::new(&path)).unwrap();
        prepare(&netns).unwrap();
        prepare(&netns).unwrap();
        let read = |key: &str| {
            netns
                .run_inside(|| std::fs::read_to_string(format!("/proc/sys/{key}")))
                .unwrap()
        };
        assert_eq!(read("net/ipv4/tcp_fwmark_accept").trim(), "1");
        assert_eq!(read("net/ipv4/fwmark_reflect").trim(), "1");
        let ip = |args: &[&str]| {
            let out = std::process::Command::new("nsenter")
                .arg(format!("--net={path}"))
                .arg("ip")
                .args(args)
                .output()
                .unwrap();
            String::from_utf8(out.stdout).unwrap()
        };
        let rules = ip(&["rule", "show"]);
        let expected =
            "1:\tfrom all fwmark 0x15080000 lookup 15008\n2:\tfrom all lookup local\n32766:";
        assert!(rules.starts_with(expected), "{rules}");
        let routes = ip(&["route", "show", "table", "15008"]);
        assert!(routes.contains("local default dev lo"), "{routes}");
        withdraw(&netns).unwrap();
        withdraw(&netns).unwrap();
        let rules = ip(&["rule", "show"]);
        assert!(
            rules.starts_with("0:\tfrom all lookup local\n32766:"),
            "{rules}"
        );
        assert!(ip(&["route", "show", "table", "15008"]).trim().is_empty());
        done_tx.send(()).unwrap();
        holder.join().unwrap();
    }
}
