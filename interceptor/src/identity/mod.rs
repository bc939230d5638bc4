//! Mesh CA and workload identities (SPIFFE).
