//! Maps shared by the programs, all pinned by name so enforcement survives an agent restart.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use interceptor_common::{
    COUNTERS as COUNTER_SLOTS, InboundKey, KernelEvent, OriginalDst, PodPortKey,
};

/// Network-namespace cookies of enrolled pods; only their connects are captured.
#[map]
pub static ENROLLED: HashMap<u64, u32> = HashMap::pinned(4096, 0);

/// The cgroup v2 id of the running agent (slot 0; 0 while unknown), written by the agent at
/// start before it makes any socket in a pod. connect4 leaves connects made from this cgroup
/// alone: see `connect4.rs`.
#[map]
pub static AGENT_CGROUP: Array<u64> = Array::pinned(1, 0);

/// Original destination by socket cookie, between connect4 and the TCP connect callback.
#[map]
pub static ORIG_BY_COOKIE: LruHashMap<u64, OriginalDst> = LruHashMap::pinned(65536, 0);

/// Original destination by (pod netns, local port): what the agent looks up after accept.
#[map]
pub static ORIG_BY_PORT: LruHashMap<PodPortKey, OriginalDst> = LruHashMap::pinned(65536, 0);

/// Inbound mode per pod address and port, port 0 being the workload default: a value made by
/// `inbound_value` (the MODE_* and the number of the agent's decision behind it).
#[map]
pub static INBOUND_MODE: HashMap<InboundKey, u32> = HashMap::pinned(16384, 0);

/// Kernel events for the agent; pinned so events written while it is down wait for it.
#[map]
pub static EVENTS: RingBuf = RingBuf::pinned(1 << 20, 0);

/// Per-CPU counters indexed by the COUNTER_* constants.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_SLOTS, 0);

/// Adds one to a per-CPU counter.
pub fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *slot += 1 };
    }
}

/// Sends an event to the agent, counting it as lost when the ring buffer is full.
pub fn emit(event: KernelEvent) {
    if EVENTS.output::<KernelEvent>(&event, 0).is_err() {
        count(interceptor_common::COUNTER_EVENTS_LOST);
    }
}

/// The inbound mode map value for a pod port: the port's own if it has one, else the
/// workload default.
pub fn inbound_mode_value(ip4: u32, port: u16) -> Option<u32> {
    let key = |port| InboundKey { ip4, port, _pad: 0 };
    // SAFETY: values are plain u32s copied out at once.
    unsafe {
        INBOUND_MODE
            .get(key(port))
            .or_else(|| INBOUND_MODE.get(key(0)))
            .copied()
    }
}

/// True for 127.0.0.0/8 and 0.0.0.0, given an address in network byte order.
pub fn is_local_only(ip4_be: u32) -> bool {
    let ip = u32::from_be(ip4_be);
    ip >> 24 == 127 || ip == 0
}
