//! Integration test support for interceptor: the lab (a multi-node cluster on one host), the
//! fake Kubernetes API server, headless Chromium for the traffic page, and the payload
//! pattern shared by tests and the `lab-fixture` tool.

pub mod bench;
pub mod browser;
pub mod fake_apiserver;
pub mod kube_lab;
pub mod lab;
pub mod pattern;
pub mod scenario;
