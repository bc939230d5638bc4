//! The agent's admin API: a unix socket that the CLI talks to.
//!
//! One JSON request per connection, one JSON line per response; `watch` keeps the connection
//! open and streams records.

pub mod client;
pub mod protocol;
pub mod server;

/// Default path of the admin socket.
pub const DEFAULT_SOCKET: &str = "/run/interceptor/admin.sock";
