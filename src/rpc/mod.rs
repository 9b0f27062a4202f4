//! Request/response (RPC) over sessions: typed calls with deadlines, cancellation and
//! at-most-once execution.
//!
//! RPC frames ([`proto::rpc`](crate::proto::rpc)) travel as ordinary sealed, reliable channel
//! messages on two reserved channels: requests and cancels on [`REQUEST_CHANNEL`], responses on
//! [`RESPONSE_CHANNEL`]. So every request and response has an integrity tag, goes through the
//! replay window, and is delivered exactly once across reconnects like any channel message.
//!
//! - **Caller**: [`Session::request`](crate::Session::request) (typed, postcard) and
//!   [`Session::request_bytes`](crate::Session::request_bytes). The timeout travels as a relative
//!   budget, so clock skew does not matter. Dropping the future (or the timeout firing) sends a
//!   CANCEL. [`RpcClient`](crate::RpcClient) adds automatic retries on a new session when one is
//!   lost.
//! - **Server**: a [`Router`] of handlers by method name, given to
//!   [`NodeConfig::rpc`](crate::NodeConfig::rpc), serves every session of the node (both the ones
//!   it accepted and the ones it dialled). Concurrency is limited per session and per node
//!   (beyond, callers get [`RemoteError::Overloaded`]); a handler whose deadline passed or whose
//!   caller cancelled is told through [`Call::cancelled`], no longer waited for, and dropped after
//!   [`RouterConfig::cancel_grace`]; a panicking handler is answered with
//!   [`RemoteError::HandlerPanicked`] and the server carries on. A handler is first polled in
//!   the task that read its request (so one that answers at once costs no task switch) and gets
//!   a task of its own only when it waits: do blocking or long CPU-bound work in
//!   `tokio::task::spawn_blocking`, as anywhere in async code, or the session's reading waits
//!   with it.
//! - **At most once**: the server remembers each call by (peer key fingerprint, caller epoch,
//!   request id) in a bounded [`ResponseCache`](crate::proto::rpc::ResponseCache). A request that
//!   arrives again (a retry on a new session) is answered from the cache, or waits for the
//!   running call, and never runs its handler twice. The horizon: a finished call is remembered
//!   for [`CacheConfig::horizon_ms`] (2 minutes by default), and fewer when more than
//!   `max_entries` calls or `max_bytes` of responses pile up (oldest first; counted in
//!   `Stats::rpc_cache_evictions`). A retry after that runs the handler again, which is why
//!   [`RpcClient`](crate::RpcClient) retries a call that is not marked idempotent only while it is
//!   younger than the horizon. The cache lives in the node's memory: a restarted server has
//!   forgotten every call.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::proto::rpc::MAX_ERROR_MESSAGE_LEN;
use crate::stats::Counter;

mod caller;
mod router;
mod server;

pub use router::{Call, CancelReason, Router, RouterConfig};
pub(crate) use server::{RpcServer, SessionRpc};

/// Channels from this number up are reserved for the library: durable channels
/// ([`DURABLE_CHANNEL`](crate::proto::durable::DURABLE_CHANNEL), `0xFFFD`) and RPC (`0xFFFE`,
/// `0xFFFF`). Applications cannot send on them.
pub const FIRST_RESERVED_CHANNEL: u16 = crate::proto::session::FIRST_RESERVED_CHANNEL;
/// The reserved channel that carries RPC requests and cancels (applications cannot send on it).
pub const REQUEST_CHANNEL: u16 = 0xFFFE;
/// The reserved channel that carries RPC responses (applications cannot send on it).
pub const RESPONSE_CHANNEL: u16 = 0xFFFF;

/// Bytes a request frame adds to its body besides the method name (kind, call id, flags,
/// budget, method length).
const REQUEST_OVERHEAD: usize = 1 + 16 + 1 + 4 + 1;
/// Bytes a response frame adds to its body, at most.
const RESPONSE_OVERHEAD: usize = 1 + 16 + 1 + 4 + 2 + MAX_ERROR_MESSAGE_LEN;

/// How one call is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CallOptions {
    /// How long the caller waits for the response. It travels to the server as a relative
    /// budget (at most `u32::MAX` ms), and the server stops waiting for the handler when it is
    /// spent.
    pub timeout: Duration,
    /// The call is safe to run more than once, so [`RpcClient`](crate::RpcClient) may retry it
    /// even past the server's at-most-once horizon.
    pub idempotent: bool,
}

impl CallOptions {
    /// A non-idempotent call with this timeout.
    pub fn new(timeout: Duration) -> CallOptions {
        CallOptions { timeout, idempotent: false }
    }

    /// Marks the call idempotent (or not).
    pub fn idempotent(mut self, on: bool) -> CallOptions {
        self.idempotent = on;
        self
    }
}

/// What the RPC layer needs from a session: to send on the reserved channels, to count, to
/// know whether the session ended. The session implements it, so this layer does not depend on
/// the session (which hands it the frames of the reserved channels).
pub(crate) trait Outlet: Clone + Send + Sync + 'static {
    /// Queues a message on a reserved channel, waiting for room in the outbox.
    fn send(&self, channel: u16, payload: Bytes) -> impl Future<Output = Result<()>> + Send;
    /// Queues a message on a reserved channel if there is room now.
    fn try_send(&self, channel: u16, payload: Bytes) -> Result<()>;
    /// The largest payload the session sends.
    fn max_send(&self) -> usize;
    /// Whether the session ended.
    fn is_ended(&self) -> bool;
    /// The session's error (why it ended, or why its connection did).
    fn error(&self) -> Error;
    /// Counts one.
    fn count(&self, c: Counter) {
        self.count_n(c, 1);
    }
    /// Counts `n`.
    fn count_n(&self, c: Counter, n: u64);
    /// Takes the requests left waiting on the request channel, if the session may now. Called
    /// from within the taking itself (a handler that answered in its first poll), it does
    /// nothing: the taking under way checks again before its next request.
    fn take_waiting_requests(&self);
}

/// A typed call over a raw one: postcard in, postcard out (trailing bytes are an error).
pub(crate) async fn typed<Req, Resp, Fut>(request: &Req, call: impl FnOnce(Vec<u8>) -> Fut) -> Result<Resp>
where
    Req: Serialize + ?Sized,
    Resp: DeserializeOwned,
    Fut: Future<Output = Result<Bytes>>,
{
    let response = call(postcard::to_allocvec(request)?).await?;
    decode_exact(&response)
}

/// Decodes a postcard value that fills `bytes` exactly.
pub(crate) fn decode_exact<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    let (value, rest) = postcard::take_from_bytes(bytes)?;
    if !rest.is_empty() {
        return Err(Error::Encoding(postcard::Error::DeserializeBadEncoding));
    }
    Ok(value)
}

/// Now plus `timeout`, or a year from now if that overflows.
pub(crate) fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout).unwrap_or(now + Duration::from_secs(365 * 86_400))
}
