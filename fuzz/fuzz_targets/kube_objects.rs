//! Pods, Namespaces, Services, EndpointSlices (and PeerAuthentications as dynamic objects)
//! from the Kubernetes API: any JSON is decoded, converted to what the agent keeps and run
//! through the mesh decision, the peer lookup and the Service chain, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| interceptor::kube::fuzzing::decode_objects(data));
