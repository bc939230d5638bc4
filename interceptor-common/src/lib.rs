//! `#[repr(C)]` types and constants shared by interceptor's eBPF programs and its agent.
//!
//! Everything the kernel and userspace exchange through maps is defined here, once.
#![no_std]

/// Port of the agent's outbound listener, bound on 127.0.0.1 inside every enrolled pod.
pub const OUTBOUND_PORT: u16 = 15001;
/// Port of the agent's mutual-TLS tunnel listener, bound on each enrolled pod's address.
pub const TUNNEL_PORT: u16 = 15008;

/// Socket mark (`SO_MARK`) of the agent's delivery connections inside a pod's network
/// namespace. The pod's policy routing sends packets with this mark to the loopback, which
/// is how the app's replies to a caller address it does not own come back to the agent; the
/// pod accepts it on its connections (`tcp_fwmark_accept`), so sockops can tell a mesh
/// delivery from plaintext. Packets from outside the namespace never carry it: a mark is
/// cleared when a packet crosses into another network namespace.
pub const DELIVERY_MARK: u32 = 0x1508_0000;

/// Inbound mode value: plaintext accepted, nothing recorded by the mesh.
pub const MODE_DISABLE: u32 = 1;
/// Inbound mode value: plaintext accepted and recorded.
pub const MODE_PERMISSIVE: u32 = 2;
/// Inbound mode value: plaintext refused with a reset and recorded.
pub const MODE_STRICT: u32 = 3;

/// Bits of an inbound mode map value that hold the mode (`MODE_*`); the bits above hold the
/// number of the agent's decision behind the mode, which the kernel copies into its events
/// so the agent can say which policy decided, even for events it reads much later.
pub const INBOUND_MODE_BITS: u32 = 8;
/// Largest decision number an inbound mode map value can carry; 0 means "not recorded".
pub const MAX_DECISION: u32 = u32::MAX >> INBOUND_MODE_BITS;

/// An inbound mode map value: `mode` (a `MODE_*`) and the decision number behind it.
pub const fn inbound_value(mode: u32, decision: u32) -> u32 {
    (decision << INBOUND_MODE_BITS) | (mode & ((1 << INBOUND_MODE_BITS) - 1))
}

/// The `MODE_*` of an inbound mode map value.
pub const fn mode_of(value: u32) -> u32 {
    value & ((1 << INBOUND_MODE_BITS) - 1)
}

/// The decision number of an inbound mode map value.
pub const fn decision_of(value: u32) -> u32 {
    value >> INBOUND_MODE_BITS
}

/// Key of the connection maps: the network namespace of a pod and a local TCP port (host order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodPortKey {
    /// Cookie of the pod's network namespace (`SO_NETNS_COOKIE`).
    pub netns_cookie: u64,
    /// Local port of the pod's client socket, host byte order.
    pub port: u16,
    /// Explicit padding so the key has no uninitialised bytes.
    pub _pad: [u8; 6],
}

/// The destination a pod asked for before the connect was redirected to the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OriginalDst {
    /// IPv4 address, network byte order.
    pub ip4: u32,
    /// Port, host byte order.
    pub port: u16,
    /// Explicit padding.
    pub _pad: u16,
}

/// Key of the inbound mode map: a pod address and a port (port 0 holds the workload default).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InboundKey {
    /// Pod IPv4 address, network byte order.
    pub ip4: u32,
    /// Destination port, host byte order; 0 for the workload-wide default.
    pub port: u16,
    /// Explicit padding.
    pub _pad: u16,
}

/// Event kind: a plaintext SYN to a STRICT port was refused by the kernel.
pub const EVENT_STRICT_DROP: u32 = 1;
/// Event kind: a plaintext connection from outside the mesh was accepted by a pod.
pub const EVENT_PLAINTEXT_OPEN: u32 = 2;
/// Event kind: such a plaintext connection closed; carries its byte counts.
pub const EVENT_PLAINTEXT_CLOSE: u32 = 3;

/// A kernel-decided or kernel-observed inbound event, sent through the events ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelEvent {
    /// One of the `EVENT_*` constants.
    pub kind: u32,
    /// Pod address, network byte order.
    pub local_ip4: u32,
    /// Caller address, network byte order.
    pub remote_ip4: u32,
    /// Pod port, host byte order.
    pub local_port: u16,
    /// Caller port, host byte order.
    pub remote_port: u16,
    /// Socket cookie; pairs an open event with its close event (0 for drops).
    pub sock_cookie: u64,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) at the event.
    pub monotonic_ns: u64,
    /// Bytes received by the pod (close events only).
    pub bytes_received: u64,
    /// Bytes sent by the pod and acknowledged (close events only).
    pub bytes_acked: u64,
    /// Number of the agent's decision that the kernel applied (drop and open events), read
    /// from the inbound mode map value at the time; 0 when not recorded.
    pub decision: u32,
    /// Explicit padding.
    pub _pad: u32,
}

/// Index in the per-CPU counters array: connects redirected to the agent.
pub const COUNTER_REDIRECTED: u32 = 0;
/// Index in the per-CPU counters array: plaintext SYNs refused under STRICT.
pub const COUNTER_STRICT_DROPS: u32 = 1;
/// Index in the per-CPU counters array: events lost because the ring buffer was full.
pub const COUNTER_EVENTS_LOST: u32 = 2;
/// Index in the per-CPU counters array: plaintext connections accepted from outside the mesh.
pub const COUNTER_PLAINTEXT_ACCEPTED: u32 = 3;
/// Number of per-CPU counters.
pub const COUNTERS: u32 = 4;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all types are #[repr(C)], Copy, and have no padding that is not an explicit field.
    unsafe impl aya::Pod for super::PodPortKey {}
    unsafe impl aya::Pod for super::OriginalDst {}
    unsafe impl aya::Pod for super::InboundKey {}
    unsafe impl aya::Pod for super::KernelEvent {}
}
