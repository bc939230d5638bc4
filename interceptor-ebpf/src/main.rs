//! interceptor's kernel programs, one file per program type.
//!
//! - `connect4`: steers TCP connects of enrolled pods to the agent (cgroup/connect4).
//! - `sock_ops`: re-keys the original destination by local port, and observes plaintext
//!   connections accepted by pods (sockops).
//! - `sk_lookup`: refuses plaintext SYNs to STRICT pod ports in the pod's network namespace.
#![no_std]
#![no_main]

mod connect4;
mod maps;
mod sk_lookup;
mod sock_ops;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
