//! A PeerAuthentication object from the Kubernetes API: any JSON is a policy or a refusal
//! naming what is wrong, never a panic.
#![no_main]

use interceptor::policy::api::from_api;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(object) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let _ = from_api(&object, Some(1_796_000_000_000));
});
