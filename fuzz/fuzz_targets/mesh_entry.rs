//! A mesh directory entry: any file content is a membership (meshed, outside or unknown),
//! never a panic.
#![no_main]

use std::net::Ipv4Addr;

use interceptor::directory::membership_of;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = membership_of(Ipv4Addr::new(198, 19, 2, 10), data);
});
