//! rustls configurations for the agent-to-agent tunnel.
