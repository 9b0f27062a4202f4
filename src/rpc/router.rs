//! The server's handlers: a [`Router`] of them by method name, its limits, and what a handler
//! knows about the call it serves ([`Call`]).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::{ApplicationError, Result};
use crate::identity::PeerIdentity;
use crate::proto::rpc::{CacheConfig, CallId, MAX_ERROR_MESSAGE_LEN, MAX_METHOD_LEN, Status};

/// Why a running call was cancelled, as its handler sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CancelReason {
    /// The caller gave up (dropped the call, or its timeout fired first).
    Caller,
    /// The call's deadline passed at the server.
    Deadline,
}

/// What a handler knows about the call it serves.
#[derive(Debug, Clone)]
pub struct Call {
    pub(super) peer: Arc<PeerIdentity>,
    pub(super) method: Arc<str>,
    pub(super) id: CallId,
    pub(super) deadline: Instant,
    pub(super) idempotent: bool,
    pub(super) cancel: watch::Receiver<Option<CancelReason>>,
}

impl Call {
    /// The authenticated caller.
    pub fn peer(&self) -> &PeerIdentity {
        &self.peer
    }
    /// The method called.
    pub fn method(&self) -> &str {
        &self.method
    }
    /// The call's identity (caller epoch, request id).
    pub fn id(&self) -> CallId {
        self.id
    }
    /// When the server stops waiting for this handler (by the local clock).
    pub fn deadline(&self) -> Instant {
        self.deadline
    }
    /// Time left before the deadline.
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }
    /// Whether the caller marked the call idempotent.
    pub fn is_idempotent(&self) -> bool {
        self.idempotent
    }
    /// Whether, and why, the call was cancelled.
    pub fn cancellation(&self) -> Option<CancelReason> {
        *self.cancel.borrow()
    }
    /// Waits until the call is cancelled (the caller gave up, or the deadline passed) and says
    /// why. A handler doing long work can `select!` on it to stop early; after cancellation it
    /// has [`RouterConfig::cancel_grace`] to finish before it is dropped. (A copy of the `Call`
    /// kept by a task that outlives the call returns [`CancelReason::Caller`] once the call is
    /// over.)
    pub async fn cancelled(&self) -> CancelReason {
        let mut rx = self.cancel.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(r) => r.unwrap_or(CancelReason::Caller),
            // The call's bookkeeping is gone: nobody waits for this handler any more.
            Err(_) => CancelReason::Caller,
        }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
pub(super) type Handler = Arc<dyn Fn(Call, Bytes) -> BoxFuture<Result<Bytes, Status>> + Send + Sync>;

/// Limits of a [`Router`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RouterConfig {
    /// Handlers running at once for one session (beyond: [`RemoteError::Overloaded`](crate::RemoteError::Overloaded)). Default 256.
    pub per_session: usize,
    /// Handlers running at once for the whole node. Default 4,096.
    pub per_node: usize,
    /// Handlers running at once for one peer (by its certificate key), across all its sessions:
    /// its fair share of `per_node`. Default 1,024.
    pub per_peer: usize,
    /// Longest budget a caller's request gets: a longer one is cut to this, so a caller cannot
    /// make a handler's slot (and its place in the call cache) last for weeks. Default 5
    /// minutes.
    pub max_budget: Duration,
    /// Largest request body accepted (beyond: [`RemoteError::RequestTooLarge`](crate::RemoteError::RequestTooLarge)); the session's
    /// message size limit applies too. Default 1 MiB.
    pub max_request_size: usize,
    /// The at-most-once cache: calls remembered, bytes of responses kept, and the horizon.
    pub cache: CacheConfig,
    /// How long a cancelled handler (caller gone, deadline passed) may go on before it is
    /// dropped; it keeps its concurrency slot until then. Default 1 s.
    pub cancel_grace: Duration,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            per_session: 256,
            per_node: 4096,
            per_peer: 1024,
            max_budget: Duration::from_secs(300),
            max_request_size: 1 << 20,
            cache: CacheConfig::default(),
            cancel_grace: Duration::from_secs(1),
        }
    }
}

/// The server side of RPC: handlers by method name, and their limits. Give it to
/// [`NodeConfig::rpc`](crate::NodeConfig::rpc); it serves every session of the node.
///
/// - Requests and responses are ordinary sealed channel messages on the reserved channels
///   [`REQUEST_CHANNEL`](crate::REQUEST_CHANNEL) and [`RESPONSE_CHANNEL`](crate::RESPONSE_CHANNEL): integrity tags, replay windows and
///   exactly-once delivery across reconnects apply to them.
/// - Concurrency is limited per session and per node ([`RouterConfig`]); beyond, callers get
///   [`RemoteError::Overloaded`](crate::RemoteError::Overloaded) and nothing runs.
/// - A handler whose deadline passed or whose caller cancelled is told through
///   [`Call::cancelled`], no longer waited for, and dropped after
///   [`RouterConfig::cancel_grace`]. A panicking handler is answered with
///   [`RemoteError::HandlerPanicked`](crate::RemoteError::HandlerPanicked); the server carries on.
/// - **At most once.** The server remembers each call by (the caller's key fingerprint, caller
///   epoch, request id) in a bounded cache. A request that arrives again (a retry on a new
///   session, see [`RpcClient`](crate::RpcClient)) is answered from the cache, or joined to the same call still
///   running, and never runs its handler twice. **Horizon**: a finished call is remembered for
///   [`CacheConfig::horizon_ms`] (2 minutes by default), fewer when more than `max_entries`
///   calls or `max_bytes` of responses pile up (oldest first, counted in
///   `Stats::rpc_cache_evictions`), and not across a restart of the node. A retry after that
///   runs the handler again, which is why [`RpcClient`](crate::RpcClient) retries calls that are not idempotent
///   only within the horizon.
///
/// ```
/// use quicseal::{ApplicationError, Call, Router};
///
/// let router = Router::new()
///     .handle("add", |_call: Call, (a, b): (u64, u64)| async move {
///         a.checked_add(b).ok_or(ApplicationError::new(1, "overflow"))
///     })
///     .handle_bytes("echo", |_call, body| async move { Ok(body) });
/// assert_eq!(router.methods(), ["add", "echo"]);
/// ```
#[derive(Clone, Default)]
pub struct Router {
    pub(super) handlers: HashMap<String, Handler>,
    pub(super) config: RouterConfig,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router").field("methods", &self.methods()).field("config", &self.config).finish()
    }
}

impl Router {
    /// A router with no methods and default limits.
    pub fn new() -> Router {
        Router::default()
    }

    /// Sets the limits.
    pub fn config(mut self, config: RouterConfig) -> Router {
        self.config = config;
        self
    }

    /// The registered method names, sorted.
    pub fn methods(&self) -> Vec<&str> {
        let mut m: Vec<&str> = self.handlers.keys().map(String::as_str).collect();
        m.sort_unstable();
        m
    }

    /// Registers a typed handler: the request is decoded from postcard as `Req` (a body that
    /// does not decode is answered with [`RemoteError::InvalidRequest`](crate::RemoteError::InvalidRequest)), the response encoded
    /// as postcard.
    ///
    /// # Panics
    ///
    /// If `method` is empty, longer than 255 bytes, or already registered (a programming error,
    /// found when the router is built).
    pub fn handle<Req, Resp, F, Fut>(self, method: &str, handler: F) -> Router
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
        F: Fn(Call, Req) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<Resp, ApplicationError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        self.add(
            method,
            Arc::new(move |call: Call, body: Bytes| -> BoxFuture<Result<Bytes, Status>> {
                let request = match postcard::from_bytes::<Req>(&body) {
                    Ok(r) => r,
                    Err(_) => return Box::pin(async { Err(Status::InvalidRequest) }),
                };
                let fut = handler(call, request);
                Box::pin(async move {
                    match fut.await {
                        Ok(resp) => postcard::to_allocvec(&resp).map(Bytes::from).map_err(|_| Status::Internal),
                        Err(e) => Err(application(e)),
                    }
                })
            }),
        )
    }

    /// Registers a raw handler: bytes in, bytes out.
    ///
    /// # Panics
    ///
    /// As [`Router::handle`].
    pub fn handle_bytes<F, Fut>(self, method: &str, handler: F) -> Router
    where
        F: Fn(Call, Bytes) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<Bytes, ApplicationError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        self.add(
            method,
            Arc::new(move |call: Call, body: Bytes| -> BoxFuture<Result<Bytes, Status>> {
                let fut = handler(call, body);
                Box::pin(async move { fut.await.map_err(application) })
            }),
        )
    }

    fn add(mut self, method: &str, handler: Handler) -> Router {
        assert!(
            !method.is_empty() && method.len() <= MAX_METHOD_LEN,
            "RPC method names are 1 to {MAX_METHOD_LEN} bytes, not {:?}",
            method
        );
        assert!(!self.handlers.contains_key(method), "RPC method {method:?} is registered twice");
        self.handlers.insert(method.to_owned(), handler);
        self
    }
}

/// An application error as a status, its message cut to the wire limit at a character boundary.
fn application(e: ApplicationError) -> Status {
    let mut message = e.message;
    if message.len() > MAX_ERROR_MESSAGE_LEN {
        let mut end = MAX_ERROR_MESSAGE_LEN;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
    }
    Status::Application { code: e.code, message }
}
