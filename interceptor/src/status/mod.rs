//! `interceptor status`: how the CLI shows the agent's [`crate::admin::protocol::StatusReport`].

pub mod graph;
pub mod render;
