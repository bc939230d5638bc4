//! The tunnel port's server side: any bytes after the TLS handshake, read as a tunnel
//! request, give a port or an error, never a panic or a hang.
#![no_main]

use std::sync::OnceLock;

use interceptor::proxy::header::read_request;
use libfuzzer_sys::fuzz_target;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let mut bytes = data;
    let _ = runtime().block_on(read_request(&mut bytes));
});
