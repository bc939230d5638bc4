//! A change to the applied policies, as the CLI asks for it. The agent makes it with
//! [`PolicyChange::make`], and `policy apply --dry-run` makes the very same call on a copy
//! of the sources, so a dry run and the real change cannot resolve differently.

use serde::{Deserialize, Serialize};

use super::{PeerAuthentication, PolicyError, PolicySources};

/// `policy apply` or `policy delete`.
#[derive(Clone, Debug, Serialize, Deserialize)]
// Externally tagged, like the admin requests that carry it: portLevelMtls ports are integer
// map keys, which internally tagged enums lose.
#[serde(rename_all = "snake_case")]
pub enum PolicyChange {
    /// Apply a batch, all or nothing.
    Apply {
        /// The batch.
        policies: Vec<PeerAuthentication>,
    },
    /// Delete one policy.
    Delete {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
}

impl PolicyChange {
    /// Makes the change on `sources`; on error nothing changes.
    pub fn make(self, sources: &mut PolicySources) -> Result<(), PolicyError> {
        match self {
            PolicyChange::Apply { policies } => sources.apply(policies),
            PolicyChange::Delete { namespace, name } => sources.delete(&namespace, &name),
        }
    }

    /// What the change is, for people: "apply of 2 object(s)", "delete of ns/name".
    pub fn describe(&self) -> String {
        match self {
            PolicyChange::Apply { policies } => {
                format!("apply of {} PeerAuthentication object(s)", policies.len())
            }
            PolicyChange::Delete { namespace, name } => format!("delete of {namespace}/{name}"),
        }
    }
}
