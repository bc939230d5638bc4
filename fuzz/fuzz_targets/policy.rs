//! Any bytes as a policy file: parsing never panics, and what parses is applied to a policy
//! set and resolved for a few workloads, as the agent would, without panicking either.
#![no_main]

use std::collections::BTreeMap;

use interceptor::policy::{PolicySources, WorkloadRef, parse::parse_str};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(policies) = parse_str(text, "fuzz.yaml") else {
        return;
    };
    let namespaces: Vec<String> = policies.iter().map(|p| p.namespace.clone()).collect();
    let mut sources = PolicySources::new("istio-system");
    if sources.apply(policies).is_err() {
        return;
    }
    let set = sources.active();
    let labels = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
    for namespace in namespaces.iter().map(String::as_str).chain(["default"]) {
        let _ = set.effective(&WorkloadRef {
            namespace,
            labels: &labels,
        });
    }
});
