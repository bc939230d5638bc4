//! sockops on the pods' cgroup: re-key redirected connects by local port, and report plaintext
//! connections that pods accept from outside the mesh.
//!
//! Minimum kernel: 5.15 (`bpf_get_netns_cookie` in sockops; the ring buffer it reports
//! through came in 5.8, `BPF_SOCK_OPS_STATE_CB` in 4.16). Tested on 6.18.
//!
//! The agent delivers mesh traffic to the pod's own address, so an accepted connection on
//! that address is not by itself plaintext: the agent's deliveries carry `DELIVERY_MARK`,
//! which the pod's accepted socket inherits (`tcp_fwmark_accept`, set by the agent in the
//! pod's namespace) and which no packet from outside the namespace can carry.
//!
//! The agent's own listeners in the pod are not the app: `127.0.0.1:15001` is loopback, and
//! connections accepted on `<pod ip>:15008` are mesh tunnels. This program only sees those
//! when the agent itself runs inside the pods cgroup (a DaemonSet does; accepted sockets
//! belong to their listener's cgroup), and must not report them as plaintext.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_getsockopt, bpf_ktime_get_ns},
    macros::sock_ops,
    programs::SockOpsContext,
};
use interceptor_common::{
    COUNTER_PLAINTEXT_ACCEPTED, DELIVERY_MARK, EVENT_PLAINTEXT_CLOSE, EVENT_PLAINTEXT_OPEN,
    InboundKey, KernelEvent, PodPortKey, TUNNEL_PORT, decision_of,
};

use crate::maps::{
    INBOUND_MODE, ORIG_BY_COOKIE, ORIG_BY_PORT, count, emit, inbound_mode_value, is_local_only,
};

const AF_INET: u32 = 2;
const SOL_SOCKET: i32 = 1;
const SO_MARK: i32 = 36;

/// Dispatches on the sockops callback.
#[sock_ops]
pub fn observe_sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.family() != AF_INET {
        return 1;
    }
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => rekey_original_dst(&ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => report_plaintext_open(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => report_plaintext_close(&ctx),
        _ => {}
    }
    1
}

/// The agent finds a redirected connection by the peer port it sees after accept, so move the
/// saved destination from the socket cookie to (netns, local port) now that the port is bound.
fn rekey_original_dst(ctx: &SockOpsContext) {
    // SAFETY: helpers allowed for sockops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out before the entry is removed.
    let Some(original) = (unsafe { ORIG_BY_COOKIE.get(cookie) }).copied() else {
        return;
    };
    let key = PodPortKey {
        // SAFETY: as above.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        port: ctx.local_port() as u16,
        _pad: [0; 6],
    };
    let _ = ORIG_BY_PORT.insert(key, original, 0);
    let _ = ORIG_BY_COOKIE.remove(cookie);
}

/// A pod accepted a connection on its own address that the agent did not deliver: that is
/// plaintext from outside the mesh, which the mode allowed.
fn report_plaintext_open(ctx: &SockOpsContext) {
    let local_ip4 = ctx.local_ip4();
    if is_local_only(local_ip4)
        || ctx.local_port() == u32::from(TUNNEL_PORT)
        || !is_enrolled_address(local_ip4)
        || is_delivery(ctx)
    {
        return;
    }
    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    count(COUNTER_PLAINTEXT_ACCEPTED);
    let mut open = event(ctx, EVENT_PLAINTEXT_OPEN);
    open.decision = inbound_mode_value(local_ip4, open.local_port).map_or(0, decision_of);
    emit(open);
}

fn report_plaintext_close(ctx: &SockOpsContext) {
    let mut close = event(ctx, EVENT_PLAINTEXT_CLOSE);
    // SAFETY: the context pointer is valid; these fields are readable in every callback.
    unsafe {
        close.bytes_received = (*ctx.ops).bytes_received;
        close.bytes_acked = (*ctx.ops).bytes_acked;
    }
    emit(close);
}

/// The accepted socket carries the mark of the agent's delivery connection that opened it.
fn is_delivery(ctx: &SockOpsContext) -> bool {
    let mut mark: u32 = 0;
    // SAFETY: sockops may read SOL_SOCKET options of its full socket; `mark` is a valid
    // 4-byte buffer for the duration of the call.
    let read = unsafe {
        bpf_getsockopt(
            ctx.as_ptr(),
            SOL_SOCKET,
            SO_MARK,
            (&mut mark as *mut u32).cast(),
            core::mem::size_of::<u32>() as i32,
        )
    };
    read == 0 && mark == DELIVERY_MARK
}

fn is_enrolled_address(ip4: u32) -> bool {
    let key = InboundKey {
        ip4,
        port: 0,
        _pad: 0,
    };
    INBOUND_MODE.get_ptr(key).is_some()
}

fn event(ctx: &SockOpsContext, kind: u32) -> KernelEvent {
    KernelEvent {
        kind,
        local_ip4: ctx.local_ip4(),
        remote_ip4: ctx.remote_ip4(),
        local_port: ctx.local_port() as u16,
        remote_port: remote_port_host_order(ctx.remote_port()),
        // SAFETY: helpers allowed for sockops programs.
        sock_cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        // SAFETY: as above.
        monotonic_ns: unsafe { bpf_ktime_get_ns() },
        bytes_received: 0,
        bytes_acked: 0,
        decision: 0,
        _pad: 0,
    }
}

/// sockops exposes the network-order port in the upper 16 bits on little-endian machines.
fn remote_port_host_order(raw: u32) -> u16 {
    let network_order = if raw > 0xffff {
        (raw >> 16) as u16
    } else {
        raw as u16
    };
    u16::from_be(network_order)
}
