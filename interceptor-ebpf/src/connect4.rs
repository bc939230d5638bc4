//! cgroup/connect4: redirect TCP connects of enrolled pods to the agent's outbound listener.
//!
//! Minimum kernel: 5.7 (`bpf_get_netns_cookie` in cgroup/connect4; the program type came in
//! 4.17, `bpf_get_current_cgroup_id` in 4.18). Tested on 6.18.
//!
//! **The agent is never captured.** The agent makes sockets inside pods' network namespaces
//! (outbound tunnels to `<peer>:15008`, plaintext upstream connects, deliveries to the pod's
//! own address). As a DaemonSet its own pod sits in the node's pods cgroup, where this program
//! is attached, so without a rule those connects would be redirected back to the agent: a
//! loop. The rule: a connect made by a task in the agent's own cgroup (its cgroup v2 id,
//! which the agent writes into `AGENT_CGROUP` at start, before it makes any socket in a pod)
//! passes untouched. `bpf_get_current_cgroup_id` is the cgroup of the task calling
//! `connect`, and the agent creates and connects its sockets on its own threads.
//!
//! Why the cgroup and not a socket mark: `SO_MARK` needs only `CAP_NET_ADMIN` in the
//! socket's network namespace, which pods may hold (init containers that set up routing,
//! VPN sidecars), so a mark would let any such pod opt out of capture. A pod cannot enter
//! the agent's cgroup: the kubelet and the runtime choose cgroups, and moving a process
//! needs write access to the host's cgroup filesystem, which only a privileged pod has (and
//! a privileged pod can detach these programs anyway). The match is exact: child or sibling
//! cgroups of the agent's are captured like any pod. Capture is not a cage in any case: a
//! connection that escapes it (or that a pod sends through a raw socket, which no connect
//! hook sees) leaves in plaintext, and the destination's door judges it (STRICT refuses it).

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use interceptor_common::{COUNTER_REDIRECTED, OUTBOUND_PORT, OriginalDst};

use crate::maps::{AGENT_CGROUP, ENROLLED, ORIG_BY_COOKIE, count, is_local_only};

const SOCK_STREAM: u32 = 1;
const ALLOW: i32 = 1;

/// Rewrites the destination of a pod's TCP connect to 127.0.0.1:OUTBOUND_PORT, which is the
/// agent's listener inside that pod's own network namespace, and saves the original.
#[cgroup_sock_addr(connect4)]
pub fn redirect_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr for the duration of the program.
    let addr = unsafe { &mut *ctx.sock_addr };
    if addr.type_ != SOCK_STREAM || is_local_only(addr.user_ip4) {
        return ALLOW;
    }
    // SAFETY: helpers allowed for cgroup_sock_addr programs.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if ENROLLED.get_ptr(netns_cookie).is_none() || is_agent() {
        return ALLOW;
    }
    // user_port holds a network-order u16 in its low bytes; read it as the full u32.
    let port = u16::from_be(addr.user_port as u16);
    let original = OriginalDst {
        ip4: addr.user_ip4,
        port,
        _pad: 0,
    };
    // SAFETY: as above.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if ORIG_BY_COOKIE.insert(cookie, original, 0).is_err() {
        // Without a saved destination the agent could not proxy; the app gets a plain connect.
        return ALLOW;
    }
    // Volatile writes keep LLVM from merging the two 32-bit context stores into one 64-bit
    // store, which the verifier rejects.
    // SAFETY: both fields are writable in connect4.
    unsafe {
        core::ptr::write_volatile(&mut addr.user_ip4, u32::from_ne_bytes([127, 0, 0, 1]));
        core::ptr::write_volatile(&mut addr.user_port, u32::from(OUTBOUND_PORT.to_be()));
    }
    count(COUNTER_REDIRECTED);
    ALLOW
}

/// The calling task is in the agent's cgroup (see the module comment).
fn is_agent() -> bool {
    let Some(&agent) = AGENT_CGROUP.get(0) else {
        return false;
    };
    // SAFETY: helper allowed for cgroup_sock_addr programs; connect runs in the caller's task.
    agent != 0 && unsafe { bpf_get_current_cgroup_id() } == agent
}
