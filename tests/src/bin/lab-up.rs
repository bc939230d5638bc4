//! Brings up the walkthrough lab and keeps it until standard input closes, for poking at it by
//! hand (`interceptor status` with the printed admin sockets) and for the teardown tests.

use std::io::Read;

use interceptor_tests::scenario::walkthrough_lab;

fn main() -> anyhow::Result<()> {
    let (lab, sleep, tracker) = walkthrough_lab()?;
    println!("lab {}", lab.name);
    for node in &lab.nodes {
        println!(
            "{}: netns {}, INTERCEPTOR_ADMIN_SOCKET={}",
            node.name,
            node.netns,
            node.admin_socket.display()
        );
    }
    for pod in [&sleep, &tracker] {
        println!(
            "pod {}/{}: {} (netns {})",
            pod.namespace, pod.name, pod.ip, pod.netns
        );
    }
    println!("ready; close standard input to tear down");
    std::io::stdin().read_to_end(&mut Vec::new())?;
    Ok(())
}
