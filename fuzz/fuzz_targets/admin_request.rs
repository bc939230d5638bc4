//! The admin socket: any line decodes to a request or an error, and a decoded policy change
//! is made on a copy of the sources as the agent (or its dry run) would, without panicking.
#![no_main]

use interceptor::{
    admin::protocol::Request,
    policy::{PolicyChange, PolicySources},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(request) = serde_json::from_slice::<Request>(data) else {
        return;
    };
    let change = match request {
        Request::PolicyApply { policies } => PolicyChange::Apply { policies },
        Request::PolicyDelete { namespace, name } => PolicyChange::Delete { namespace, name },
        Request::PolicyDryRun { change, .. } => change,
        Request::WorkloadAdd { spec } => {
            let _ = spec.validate();
            return;
        }
        _ => return,
    };
    let mut sources = PolicySources::new("istio-system");
    let _ = change.make(&mut sources);
    let _ = sources.active();
});
