//! The agent's admin API: a unix socket that the CLI talks to.
//!
//! One JSON request per connection, one JSON line per response; `watch` keeps the connection
//! open and streams records.

pub mod client;
pub mod protocol;
pub mod server;

/// Default path of the admin socket.
pub const DEFAULT_SOCKET: &str = "/run/interceptor/admin.sock";

use tokio::sync::broadcast;

use crate::records::ConnectionRecord;

/// What the admin server needs from whoever answers requests (the agent), so it depends on
/// this interface and not on the agent.
pub trait AdminHandler: Send + Sync + 'static {
    /// The error an answer can carry; it is sent as its text.
    type Error: std::fmt::Display;

    /// Answers one request (every request but `watch`).
    fn answer(
        &self,
        request: protocol::Request,
    ) -> impl Future<Output = Result<serde_json::Value, Self::Error>> + Send;

    /// Connection records as they are written, for `watch`.
    fn watch(&self) -> broadcast::Receiver<ConnectionRecord>;
}
