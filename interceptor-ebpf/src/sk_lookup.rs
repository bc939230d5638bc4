//! sk_lookup in each enrolled pod's network namespace: the pod's door for plaintext.
//!
//! Minimum kernel: 5.17 (sk_lookup programs came in 5.9; the `ingress_ifindex` field the door
//! rule reads, in 5.17). Tested on 6.18.
//!
//! Runs for every new inbound TCP connection before the listener is chosen. A SYN to a STRICT
//! port is refused here (SK_DROP makes the kernel answer with a reset), so STRICT holds while
//! the agent is down.
//!
//! The door judges where a SYN entered the namespace, not what its addresses say. The agent
//! delivers mesh traffic to the app's own address (with the caller's address as source), and
//! such a SYN is made inside the namespace, so it arrives on the loopback device: it passes.
//! Everything that came in through the pod's network interface is outside traffic and is
//! judged by the mode, whatever its source address claims; an outside host cannot make a
//! packet arrive on the pod's loopback. The tunnel port is exempt, so mutual TLS from other
//! agents is never refused.

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::bpf_ktime_get_ns,
    macros::sk_lookup,
    programs::SkLookupContext,
};
use interceptor_common::{
    COUNTER_STRICT_DROPS, EVENT_STRICT_DROP, KernelEvent, MODE_STRICT, TUNNEL_PORT, decision_of,
    mode_of,
};

use crate::maps::{count, emit, inbound_mode_value, is_local_only};

const AF_INET: u32 = 2;
const IPPROTO_TCP: u32 = 6;
/// The loopback device has this index in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// Refuses plaintext SYNs to STRICT ports of enrolled pods and reports each refusal.
#[sk_lookup]
pub fn pod_door(ctx: SkLookupContext) -> u32 {
    // SAFETY: the kernel passes a valid bpf_sk_lookup for the duration of the program.
    let lookup = unsafe { &*ctx.lookup };
    if lookup.family != AF_INET || lookup.protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    if lookup.ingress_ifindex == LOOPBACK_IFINDEX {
        // Made inside the pod's namespace: the agent's delivery or the pod itself.
        return SK_PASS;
    }
    let local_ip4 = lookup.local_ip4;
    let local_port = lookup.local_port as u16;
    if is_local_only(local_ip4) || local_port == TUNNEL_PORT {
        return SK_PASS;
    }
    let Some(value) = inbound_mode_value(local_ip4, local_port) else {
        return SK_PASS;
    };
    if mode_of(value) != MODE_STRICT {
        return SK_PASS;
    }
    count(COUNTER_STRICT_DROPS);
    emit(KernelEvent {
        kind: EVENT_STRICT_DROP,
        local_ip4,
        remote_ip4: lookup.remote_ip4,
        local_port,
        remote_port: u16::from_be(lookup.remote_port),
        sock_cookie: 0,
        // SAFETY: helper allowed for sk_lookup programs.
        monotonic_ns: unsafe { bpf_ktime_get_ns() },
        bytes_received: 0,
        bytes_acked: 0,
        // The decision read together with the mode: the event names the policy in force now.
        decision: decision_of(value),
        _pad: 0,
    });
    SK_DROP
}
