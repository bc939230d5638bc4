//! PeerAuthentication policies.
