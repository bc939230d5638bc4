//! Admission on the tunnel port: how many connections may be unauthenticated at once, and
//! for how long.
//!
//! Anyone who can route to a pod's address can connect to its tunnel port. Until a caller
//! has completed the mutual-TLS handshake and sent its tunnel request, it costs the agent a
//! descriptor and a task while proving nothing, so such connections are capped per source
//! address and per agent, and each stage has a deadline. A connection over a cap is reset at
//! once; one past a deadline is reset then.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

/// Deadlines and caps for the tunnel port (agent flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelLimits {
    /// Longest time from accept to a completed TLS handshake.
    pub handshake_timeout: Duration,
    /// Longest time from the completed handshake to the whole tunnel request.
    pub request_timeout: Duration,
    /// Unauthenticated connections at once, all pods of the agent together.
    pub max_pending: usize,
    /// Unauthenticated connections at once from one source address.
    pub max_pending_per_source: usize,
}

impl Default for TunnelLimits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            max_pending: 4096,
            max_pending_per_source: 512,
        }
    }
}

/// Why a connection was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Its source address already has `max_pending_per_source` unauthenticated connections.
    SourceLimit(usize),
    /// The agent already has `max_pending` unauthenticated connections.
    AgentLimit(usize),
}

impl Refusal {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::SourceLimit(_) => "pending_limit_source",
            Self::AgentLimit(_) => "pending_limit_agent",
        }
    }

    /// The record's reason.
    pub fn describe(self) -> String {
        match self {
            Self::SourceLimit(n) => format!(
                "reset: {n} unauthenticated tunnel connections from this address already (--tunnel-max-pending-per-source)"
            ),
            Self::AgentLimit(n) => format!(
                "reset: {n} unauthenticated tunnel connections on this agent already (--tunnel-max-pending)"
            ),
        }
    }
}

#[derive(Default)]
struct Pending {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// Counts unauthenticated tunnel connections.
pub struct Admission {
    limits: TunnelLimits,
    pending: Mutex<Pending>,
}

/// An admitted, not yet authenticated connection; dropping it ends its unauthenticated stage.
pub struct Permit {
    admission: Arc<Admission>,
    source: IpAddr,
}

impl Admission {
    /// Admission with these limits.
    pub fn new(limits: TunnelLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            pending: Mutex::new(Pending::default()),
        })
    }

    /// The limits in force.
    pub fn limits(&self) -> &TunnelLimits {
        &self.limits
    }

    /// Admits a connection from `source`, or says which cap it is over.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Permit, Refusal> {
        let mut pending = self.lock();
        if pending.total >= self.limits.max_pending {
            return Err(Refusal::AgentLimit(self.limits.max_pending));
        }
        let from_source = pending.by_source.entry(source).or_default();
        if *from_source >= self.limits.max_pending_per_source {
            return Err(Refusal::SourceLimit(self.limits.max_pending_per_source));
        }
        *from_source += 1;
        pending.total += 1;
        Ok(Permit {
            admission: self.clone(),
            source,
        })
    }

    /// Unauthenticated connections now.
    pub fn pending(&self) -> usize {
        self.lock().total
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        crate::sync::lock(&self.pending)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut pending = self.admission.lock();
        pending.total = pending.total.saturating_sub(1);
        if let Some(n) = pending.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                pending.by_source.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_pending: usize, max_pending_per_source: usize) -> TunnelLimits {
        TunnelLimits {
            max_pending,
            max_pending_per_source,
            ..TunnelLimits::default()
        }
    }

    #[test]
    fn one_source_cannot_take_the_agent_budget() {
        let admission = Admission::new(limits(4, 2));
        let attacker: IpAddr = "198.18.0.11".parse().unwrap();
        let peer: IpAddr = "198.19.1.10".parse().unwrap();
        let held: Vec<Permit> = (0..2).map(|_| admission.admit(attacker).unwrap()).collect();
        assert_eq!(
            admission.admit(attacker).err(),
            Some(Refusal::SourceLimit(2))
        );
        let _p1 = admission.admit(peer).unwrap();
        let _p2 = admission.admit(peer).unwrap();
        let other: IpAddr = "198.19.1.11".parse().unwrap();
        assert_eq!(admission.admit(other).err(), Some(Refusal::AgentLimit(4)));
        drop(held);
        assert_eq!(admission.pending(), 2);
        let _again = admission.admit(attacker).unwrap();
        assert_eq!(admission.lock().by_source.len(), 2);
    }
}
