//! The tunnel port's server side: any bytes after the TLS handshake, served as HBONE (HTTP/2
//! with the agent's settings), and every request on them checked as a tunnel request: an
//! answer or an error, never a panic or a hang.
#![no_main]

use std::{net::Ipv4Addr, sync::OnceLock};

use interceptor::proxy::hbone::{Outcome, parse_request, server_builder};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const POD: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 20);
const PEER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
    })
}

async fn serve(data: Vec<u8>) {
    let (mut caller, tunnel) = tokio::io::duplex(1 << 20);
    // The caller sends the bytes, half-closes, and reads whatever the server answers.
    let caller_task = tokio::spawn(async move {
        let _ = caller.write_all(&data).await;
        let _ = caller.shutdown().await;
        let mut sink = Vec::new();
        let _ = caller.read_to_end(&mut sink).await;
    });
    if let Ok(mut connection) = server_builder().handshake::<_, bytes::Bytes>(tunnel).await {
        while let Some(Ok((request, mut respond))) = connection.accept().await {
            let (parts, _body) = request.into_parts();
            let outcome = match parse_request(&parts, POD, PEER) {
                Ok(_) => Outcome::Refused,
                Err(_) => Outcome::BadRequest,
            };
            let _ = respond.send_response(outcome.response(), true);
        }
    }
    let _ = caller_task.await;
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(serve(data.to_vec()));
});
