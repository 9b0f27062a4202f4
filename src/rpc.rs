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
//!   [`RemoteError::HandlerPanicked`] and the server carries on.
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

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Semaphore, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::error::{ApplicationError, Error, Limited, RemoteError, Result, Timed};
use crate::identity::{Fingerprint, PeerIdentity};
use crate::proto::rpc::{
    Begin, CacheConfig, CallId, MAX_ERROR_MESSAGE_LEN, MAX_METHOD_LEN, ResponseCache, RpcFrame, Status,
};
use crate::session::Outlet;
use crate::stats::Counter;

/// Channels from this number up are reserved for RPC.
pub const FIRST_RESERVED_CHANNEL: u16 = crate::proto::session::FIRST_RESERVED_CHANNEL;
/// The reserved channel that carries RPC requests and cancels (applications cannot send on it).
pub const REQUEST_CHANNEL: u16 = FIRST_RESERVED_CHANNEL;
/// The reserved channel that carries RPC responses (applications cannot send on it).
pub const RESPONSE_CHANNEL: u16 = FIRST_RESERVED_CHANNEL + 1;

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
    peer: Arc<PeerIdentity>,
    method: Arc<str>,
    id: CallId,
    deadline: Instant,
    idempotent: bool,
    cancel: watch::Receiver<Option<CancelReason>>,
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
type Handler = Arc<dyn Fn(Call, Bytes) -> BoxFuture<Result<Bytes, Status>> + Send + Sync>;

/// Limits of a [`Router`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RouterConfig {
    /// Handlers running at once for one session (beyond: [`RemoteError::Overloaded`]). Default 256.
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
    /// Largest request body accepted (beyond: [`RemoteError::RequestTooLarge`]); the session's
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
///   [`REQUEST_CHANNEL`] and [`RESPONSE_CHANNEL`]: integrity tags, replay windows and
///   exactly-once delivery across reconnects apply to them.
/// - Concurrency is limited per session and per node ([`RouterConfig`]); beyond, callers get
///   [`RemoteError::Overloaded`] and nothing runs.
/// - A handler whose deadline passed or whose caller cancelled is told through
///   [`Call::cancelled`], no longer waited for, and dropped after
///   [`RouterConfig::cancel_grace`]. A panicking handler is answered with
///   [`RemoteError::HandlerPanicked`]; the server carries on.
/// - **At most once.** The server remembers each call by (the caller's key fingerprint, caller
///   epoch, request id) in a bounded cache. A request that arrives again (a retry on a new
///   session, see [`RpcClient`]) is answered from the cache, or joined to the same call still
///   running, and never runs its handler twice. **Horizon**: a finished call is remembered for
///   [`CacheConfig::horizon_ms`] (2 minutes by default), fewer when more than `max_entries`
///   calls or `max_bytes` of responses pile up (oldest first, counted in
///   `Stats::rpc_cache_evictions`), and not across a restart of the node. A retry after that
///   runs the handler again, which is why [`RpcClient`] retries calls that are not idempotent
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
    handlers: HashMap<String, Handler>,
    config: RouterConfig,
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
    /// does not decode is answered with [`RemoteError::InvalidRequest`]), the response encoded
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

/// A call's key in the server's memory: who called, and which call.
type Key = (Fingerprint, CallId);

/// A call whose handler is running.
struct Inflight {
    cancel: watch::Sender<Option<CancelReason>>,
    done: watch::Sender<Option<(Status, Bytes)>>,
}

/// A node's RPC server state, shared by all its sessions.
pub(crate) struct RpcServer {
    router: Option<Router>,
    config: RouterConfig,
    node_permits: Arc<Semaphore>,
    /// Lock order: `cache`, then `inflight`.
    cache: Mutex<ResponseCache<Key>>,
    inflight: Mutex<HashMap<Key, Inflight>>,
    /// Handlers running per peer (see [`RouterConfig::per_peer`]).
    per_peer: Arc<Mutex<HashMap<Fingerprint, usize>>>,
    started: Instant,
}

/// One handler slot of a peer: counted until dropped.
struct PeerSlot {
    running: Arc<Mutex<HashMap<Fingerprint, usize>>>,
    peer: Fingerprint,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = running.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                running.remove(&self.peer);
            }
        }
    }
}

impl RpcServer {
    pub(crate) fn new(router: Option<Router>) -> Arc<RpcServer> {
        let config = router.as_ref().map(|r| r.config.clone()).unwrap_or_default();
        Arc::new(RpcServer {
            node_permits: Arc::new(Semaphore::new(config.per_node)),
            cache: Mutex::new(ResponseCache::new(config.cache)),
            inflight: Mutex::new(HashMap::new()),
            per_peer: Arc::default(),
            started: Instant::now(),
            router,
            config,
        })
    }

    /// Checks a router's limits (at [`Node::bind`](crate::Node::bind)).
    pub(crate) fn validate(router: &Router) -> Result<()> {
        let c = &router.config;
        if c.per_session == 0 || c.per_node == 0 || c.per_peer == 0 || c.cache.max_entries == 0 {
            return Err(Error::Config(
                "RPC per_session, per_node, per_peer and cache.max_entries must be at least 1".into(),
            ));
        }
        if c.max_budget.is_zero() {
            return Err(Error::Config("RPC max_budget must be positive".into()));
        }
        if c.per_node > Semaphore::MAX_PERMITS || c.per_session > Semaphore::MAX_PERMITS {
            return Err(Error::Config("RPC concurrency limits are too large".into()));
        }
        Ok(())
    }

    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn cache(&self) -> MutexGuard<'_, ResponseCache<Key>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn inflight(&self) -> MutexGuard<'_, HashMap<Key, Inflight>> {
        self.inflight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A handler slot for `peer`, if it has fewer than `per_peer` running.
    fn peer_slot(&self, peer: Fingerprint) -> Option<PeerSlot> {
        let mut running = self.per_peer.lock().unwrap_or_else(|e| e.into_inner());
        let n = running.entry(peer).or_insert(0);
        if *n >= self.config.per_peer {
            return None;
        }
        *n += 1;
        Some(PeerSlot { running: self.per_peer.clone(), peer })
    }
}

/// A session's RPC state: its pending calls (caller side) and its share of the server.
pub(crate) struct SessionRpc {
    server: Arc<RpcServer>,
    peer: Arc<PeerIdentity>,
    session_permits: Arc<Semaphore>,
    /// Requests taken from the peer and not yet answered (running or waiting to be queued).
    owed: AtomicUsize,
    pending: Mutex<HashMap<CallId, oneshot::Sender<(Status, Bytes)>>>,
    pending_permits: Arc<Semaphore>,
    next_id: AtomicU64,
}

/// Most calls one session has waiting for a response; more wait for a slot. At most half of
/// the outbox, so that our requests never fill it: responses (which the peer always takes at
/// once) find room next to them, and two nodes calling each other cannot both stall.
const MAX_PENDING_CALLS: usize = 512;

impl SessionRpc {
    pub(crate) fn new(server: Arc<RpcServer>, peer: Arc<PeerIdentity>, outbox_messages: usize) -> SessionRpc {
        let max_pending = MAX_PENDING_CALLS.min(outbox_messages / 2).max(1);
        SessionRpc {
            session_permits: Arc::new(Semaphore::new(server.config.per_session)),
            server,
            peer,
            owed: AtomicUsize::new(0),
            pending: Mutex::new(HashMap::new()),
            pending_permits: Arc::new(Semaphore::new(max_pending)),
            next_id: AtomicU64::new(1),
        }
    }

    fn pending(&self) -> MutexGuard<'_, HashMap<CallId, oneshot::Sender<(Status, Bytes)>>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new request id for a call made in this session's own epoch.
    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether the session may take another request from the peer: requests answered but not
    /// yet queued are bounded (twice the handler limit: running ones plus quick refusals), so a
    /// peer that floods us while we cannot send is slowed by flow control, not by our memory.
    /// The requests left waiting are taken as answers are queued.
    pub(crate) fn may_take_request(&self) -> bool {
        self.owed.load(Ordering::Relaxed) < 2 * self.server.config.per_session
    }

    /// The session ended: every call still waiting fails (with the session's error).
    pub(crate) fn fail_pending(&self) {
        self.pending().clear();
    }

    /// Handles one message from the response channel. `Err` is a protocol violation.
    pub(crate) fn on_response(&self, outlet: &Outlet, payload: &Bytes) -> std::result::Result<(), String> {
        match RpcFrame::decode(payload) {
            Ok(RpcFrame::Response { call, status, body }) => {
                match self.pending().remove(&call) {
                    Some(tx) => {
                        let _ = tx.send((status, body));
                    }
                    None => outlet.count(Counter::rpc_late_responses),
                }
                Ok(())
            }
            Ok(_) => Err("a request or cancel on the RPC response channel".into()),
            Err(e) => Err(format!("malformed RPC response: {e}")),
        }
    }

    /// Handles one message from the request channel. `Err` is a protocol violation.
    pub(crate) fn on_request(self: &Arc<Self>, outlet: &Outlet, payload: &Bytes) -> std::result::Result<(), String> {
        match RpcFrame::decode(payload) {
            Ok(RpcFrame::Request { call, method, budget_ms, idempotent, body }) => {
                outlet.count(Counter::rpc_requests);
                self.serve(outlet, call, method, budget_ms, idempotent, body);
                Ok(())
            }
            Ok(RpcFrame::Cancel { call }) => {
                let key = (self.peer.fingerprint, call);
                if let Some(running) = self.server.inflight().get(&key) {
                    let mut cancelled = false;
                    running.cancel.send_if_modified(|c| {
                        if c.is_none() {
                            outlet.count(Counter::rpc_cancelled);
                            *c = Some(CancelReason::Caller);
                            cancelled = true;
                        }
                        cancelled
                    });
                }
                Ok(())
            }
            Ok(RpcFrame::Response { .. }) => Err("a response on the RPC request channel".into()),
            Err(e) => Err(format!("malformed RPC request: {e}")),
        }
    }

    fn serve(self: &Arc<Self>, outlet: &Outlet, call: CallId, method: String, budget_ms: u32, idem: bool, body: Bytes) {
        let budget = Duration::from_millis(u64::from(budget_ms)).min(self.server.config.max_budget);
        let deadline = Instant::now() + budget;
        let Some(router) = &self.server.router else {
            return self.answer(outlet, call, Status::UnknownMethod, Bytes::new());
        };
        if body.len() > self.server.config.max_request_size {
            return self.answer(outlet, call, Status::RequestTooLarge, Bytes::new());
        }
        let Some(handler) = router.handlers.get(&method) else {
            debug!(%method, "RPC call to an unknown method");
            return self.answer(outlet, call, Status::UnknownMethod, Bytes::new());
        };
        let key = (self.peer.fingerprint, call);
        let server = &self.server;
        let mut cache = server.cache();
        let begun = cache.begin(key, server.now());
        outlet.count_n(Counter::rpc_cache_evictions, cache.take_early_evictions());
        match begun {
            None => {
                drop(cache);
                outlet.count(Counter::rpc_overloaded);
                self.answer(outlet, call, Status::Overloaded, Bytes::new());
            }
            Some(Begin::Answer(status, response)) => {
                drop(cache);
                outlet.count(Counter::rpc_cache_hits);
                self.answer(outlet, call, status, response);
            }
            Some(Begin::Running) => {
                let done = server.inflight().get(&key).map(|r| r.done.subscribe());
                drop(cache);
                outlet.count(Counter::rpc_cache_hits);
                let Some(mut done) = done else {
                    return self.answer(outlet, call, Status::Internal, Bytes::new());
                };
                // The same call is running (the first attempt, on this session or another):
                // answer this attempt with its result.
                let (this, outlet) = (self.clone(), outlet.clone());
                self.owe();
                tokio::spawn(async move {
                    let (status, response) =
                        match tokio::time::timeout_at(deadline, done.wait_for(Option::is_some)).await {
                            Ok(Ok(r)) => r.as_ref().cloned().unwrap_or((Status::Internal, Bytes::new())),
                            Ok(Err(_)) => (Status::Internal, Bytes::new()),
                            Err(_) => (Status::DeadlineExceeded, Bytes::new()),
                        };
                    this.send_answer(&outlet, call, status, response).await;
                });
            }
            Some(Begin::Run) => {
                let permits = (
                    self.session_permits.clone().try_acquire_owned(),
                    server.node_permits.clone().try_acquire_owned(),
                    server.peer_slot(self.peer.fingerprint),
                );
                let (Ok(session_permit), Ok(node_permit), Some(peer_slot)) = permits else {
                    cache.abandon(&key);
                    drop(cache);
                    outlet.count(Counter::rpc_overloaded);
                    return self.answer(outlet, call, Status::Overloaded, Bytes::new());
                };
                let (cancel, cancel_rx) = watch::channel(None);
                server.inflight().insert(key, Inflight { cancel, done: watch::channel(None).0 });
                drop(cache);
                outlet.count(Counter::rpc_handled);
                let ctx = Call {
                    peer: self.peer.clone(),
                    method: Arc::from(method.as_str()),
                    id: call,
                    deadline,
                    idempotent: idem,
                    cancel: cancel_rx,
                };
                let (this, outlet, handler) = (self.clone(), outlet.clone(), handler.clone());
                self.owe();
                tokio::spawn(async move {
                    this.run(&outlet, key, handler, ctx, body).await;
                    drop((session_permit, node_permit, peer_slot));
                });
            }
        }
    }

    /// Runs a handler to its end, its deadline, or its cancellation; records and sends the
    /// result; then lets a cancelled handler finish within the grace period.
    async fn run(&self, outlet: &Outlet, key: Key, handler: Handler, ctx: Call, body: Bytes) {
        let deadline = ctx.deadline;
        let mut cancelled = ctx.cancel.clone();
        let server = &self.server;
        // The handler runs in this task (no hop to another task and back); a panic in it is
        // caught here and answered, and the server carries on.
        let mut task = std::panic::AssertUnwindSafe(handler(ctx, body)).catch_unwind();
        let mut task_done = false;
        // A cancelled call stays cancelled even if its handler finished in the same instant (its
        // caller is gone); a result that is ready wins over a deadline that is too.
        let finished = tokio::select! {
            biased;
            _ = cancelled.wait_for(Option::is_some) => None,
            r = &mut task => {
                task_done = true;
                Some(r)
            }
            _ = tokio::time::sleep_until(deadline) => None,
        };
        let (status, response) = match finished {
            Some(Ok(Ok(response))) if response.len() + RESPONSE_OVERHEAD > outlet.max_send() => {
                warn!(size = response.len(), "RPC response over the message size limit");
                (Status::Internal, Bytes::new())
            }
            Some(Ok(Ok(response))) => (Status::Ok, response),
            Some(Ok(Err(status))) => (status, Bytes::new()),
            Some(Err(_panic)) => {
                outlet.count(Counter::rpc_panics);
                warn!(call = ?key.1, "RPC handler panicked");
                (Status::HandlerPanicked, Bytes::new())
            }
            None => {
                // The caller's cancel, or else the deadline (decided once, under the watch's lock).
                let mut reason = CancelReason::Caller;
                if let Some(r) = server.inflight().get(&key) {
                    r.cancel.send_if_modified(|c| {
                        if c.is_some() {
                            return false;
                        }
                        outlet.count(Counter::rpc_deadline_exceeded);
                        *c = Some(CancelReason::Deadline);
                        true
                    });
                    reason = r.cancel.borrow().unwrap_or(CancelReason::Caller);
                }
                match reason {
                    CancelReason::Deadline => (Status::DeadlineExceeded, Bytes::new()),
                    CancelReason::Caller => (Status::Cancelled, Bytes::new()),
                }
            }
        };
        let running = {
            let mut cache = server.cache();
            cache.finish(key, status.clone(), response.clone(), server.now());
            outlet.count_n(Counter::rpc_cache_evictions, cache.take_early_evictions());
            server.inflight().remove(&key)
        };
        if let Some(r) = running {
            r.done.send_replace(Some((status.clone(), response.clone())));
        }
        if status != Status::Cancelled {
            self.send_answer(outlet, key.1, status, response).await;
        } else {
            self.paid_one(outlet);
        }
        if !task_done && tokio::time::timeout(server.config.cancel_grace, &mut task).await.is_err() {
            debug!("RPC handler did not stop within the grace period: dropping it");
        }
    }

    fn owe(&self) {
        self.owed.fetch_add(1, Ordering::Relaxed);
    }

    /// An answer was queued (or given up): requests left waiting may be taken now.
    fn paid_one(&self, outlet: &Outlet) {
        self.owed.fetch_sub(1, Ordering::Relaxed);
        outlet.take_waiting_requests();
    }

    /// Answers a request at once (in a task: the outbox may be full).
    fn answer(self: &Arc<Self>, outlet: &Outlet, call: CallId, status: Status, body: Bytes) {
        self.owe();
        let (this, outlet) = (self.clone(), outlet.clone());
        tokio::spawn(async move { this.send_answer(&outlet, call, status, body).await });
    }

    async fn send_answer(&self, outlet: &Outlet, call: CallId, status: Status, body: Bytes) {
        let mut frame = Vec::with_capacity(body.len() + 32);
        let encoded = RpcFrame::Response { call, status, body }.encode(&mut frame);
        if encoded.is_ok() {
            // A session that ended takes nothing more; a retry on another session finds the
            // answer in the cache.
            let _ = outlet.send(RESPONSE_CHANNEL, frame.into()).await;
        }
        self.paid_one(outlet);
    }

    /// Makes a call on this session and waits for its response. The call's identity is
    /// chosen by the caller (the session's own epoch, or an [`RpcClient`]'s).
    pub(crate) async fn call(
        &self,
        outlet: &Outlet,
        call: CallId,
        method: &str,
        body: Bytes,
        idempotent: bool,
        deadline: Instant,
    ) -> Result<Bytes> {
        let timeout = || Error::Timeout { what: Timed::RpcCall };
        if method.is_empty() || method.len() > MAX_METHOD_LEN {
            return Err(Error::Config(format!("RPC method names are 1 to {MAX_METHOD_LEN} bytes")));
        }
        let overhead = REQUEST_OVERHEAD + method.len();
        let size = body.len() + overhead;
        if size > outlet.max_send() {
            return Err(Error::MessageTooLarge { size: body.len(), limit: outlet.max_send().saturating_sub(overhead) });
        }
        let _slot = tokio::select! {
            p = self.pending_permits.clone().acquire_owned() => p.map_err(|_| Error::Closed)?,
            _ = tokio::time::sleep_until(deadline) => return Err(timeout()),
        };
        let (tx, rx) = oneshot::channel();
        if self.pending().insert(call, tx).is_some() {
            return Err(Error::Config(format!("RPC call {call:?} is already waiting on this session")));
        }
        let mut guard = Pending { rpc: self, outlet, call, answered: false };
        if outlet.is_ended() {
            return Err(outlet.error());
        }
        let budget = deadline.saturating_duration_since(Instant::now()).as_millis().clamp(1, u128::from(u32::MAX));
        let mut frame = Vec::with_capacity(size);
        RpcFrame::Request { call, method: method.to_owned(), budget_ms: budget as u32, idempotent, body }
            .encode(&mut frame)
            .map_err(|e| Error::Config(e.to_string()))?;
        outlet.count(Counter::rpc_calls);
        tokio::select! {
            r = outlet.send(REQUEST_CHANNEL, frame.into()) => r?,
            _ = tokio::time::sleep_until(deadline) => return Err(timeout()),
        }
        let (status, body) = tokio::select! {
            r = rx => match r {
                Ok(answer) => answer,
                // The session ended and took the pending call with it.
                Err(_) => return Err(outlet.error()),
            },
            _ = tokio::time::sleep_until(deadline) => return Err(timeout()),
        };
        guard.answered = true;
        match status {
            Status::Ok => Ok(body),
            Status::Application { code, message } => {
                Err(Error::Remote(RemoteError::Application(ApplicationError { code, message })))
            }
            Status::UnknownMethod => Err(Error::Remote(RemoteError::UnknownMethod)),
            Status::Overloaded => Err(Error::Remote(RemoteError::Overloaded)),
            Status::DeadlineExceeded => Err(Error::Timeout { what: Timed::RpcDeadlineAtServer }),
            Status::HandlerPanicked => Err(Error::Remote(RemoteError::HandlerPanicked)),
            Status::RequestTooLarge => Err(Error::Remote(RemoteError::RequestTooLarge)),
            Status::Cancelled => Err(Error::Remote(RemoteError::Cancelled)),
            Status::InvalidRequest => Err(Error::Remote(RemoteError::InvalidRequest)),
            Status::Internal => Err(Error::Remote(RemoteError::Internal)),
        }
    }
}

/// A call waiting for its response. Dropped before the response came (the caller's future was
/// dropped, or its timeout fired), it tells the server to cancel the call.
struct Pending<'a> {
    rpc: &'a SessionRpc,
    outlet: &'a Outlet,
    call: CallId,
    answered: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.rpc.pending().remove(&self.call);
        if !self.answered && !self.outlet.is_ended() {
            let mut frame = Vec::with_capacity(17);
            if (RpcFrame::Cancel { call: self.call }).encode(&mut frame).is_ok() {
                // Best effort: with a full outbox the server's deadline ends the call instead.
                let _ = self.outlet.try_send(REQUEST_CHANNEL, frame.into());
            }
        }
    }
}

/// An RPC caller that outlives its sessions: it dials the server when it needs a session, and
/// when the session is lost during a call (it could not be resumed in time), it dials a new one
/// and sends the same call again, with the same identity, until the call's timeout.
///
/// A retried call runs at most once on the server: the server answers it from its at-most-once
/// cache, or joins it to the first attempt still running. That holds within the cache's horizon
/// ([`CacheConfig::horizon_ms`], 2 minutes by default), so a call that is not marked idempotent
/// is retried only while it is younger than [`RpcClient::retry_horizon`] (the same 2 minutes by
/// default; keep it at most the server's horizon). Idempotent calls are retried until their
/// timeout. Calls are not retried when the server answered (any [`Error::Remote`]), when the
/// call's own timeout passed, or when the peer refused us (TLS, authorization).
///
/// ```no_run
/// # async fn run(node: quicseal::Node) -> quicseal::Result<()> {
/// use std::time::Duration;
/// let client = quicseal::RpcClient::new(node, "127.0.0.1:4433".parse().unwrap(), "kv-server")?;
/// let value: Option<String> = client.request("get", "colour", Duration::from_secs(2)).await?;
/// # Ok(()) }
/// ```
pub struct RpcClient {
    node: crate::Node,
    addr: std::net::SocketAddr,
    server_name: String,
    epoch: u64,
    next_id: AtomicU64,
    session: tokio::sync::Mutex<Option<crate::Session>>,
    retry_horizon: Duration,
}

impl std::fmt::Debug for RpcClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcClient").field("addr", &self.addr).field("server_name", &self.server_name).finish()
    }
}

impl RpcClient {
    /// A client of the server at `addr`, whose certificate must carry `server_name`. Nothing is
    /// dialled until the first call.
    pub fn new(node: crate::Node, addr: std::net::SocketAddr, server_name: impl Into<String>) -> Result<RpcClient> {
        Ok(RpcClient {
            node,
            addr,
            server_name: server_name.into(),
            epoch: crate::node::random_epoch()?,
            next_id: AtomicU64::new(1),
            session: tokio::sync::Mutex::new(None),
            retry_horizon: Duration::from_millis(CacheConfig::default().horizon_ms),
        })
    }

    /// How long after its first attempt a call that is not idempotent may still be retried.
    pub fn retry_horizon(mut self, horizon: Duration) -> RpcClient {
        self.retry_horizon = horizon;
        self
    }

    /// The session calls go over now, dialling one if there is none or it ended.
    pub async fn session(&self) -> Result<crate::Session> {
        let mut current = self.session.lock().await;
        if let Some(s) = current.as_ref().filter(|s| !s.is_ended()) {
            return Ok(s.clone());
        }
        *current = None;
        let session = self.node.connect(self.addr, &self.server_name).await?;
        *current = Some(session.clone());
        Ok(session)
    }

    /// Typed call, as [`Session::request`](crate::Session::request), with retries.
    pub async fn request<Req, Resp>(&self, method: &str, request: &Req, timeout: Duration) -> Result<Resp>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        self.request_with(method, request, CallOptions::new(timeout)).await
    }

    /// [`RpcClient::request`] with [`CallOptions`].
    pub async fn request_with<Req, Resp>(&self, method: &str, request: &Req, options: CallOptions) -> Result<Resp>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        typed(request, |body| self.request_bytes(method, body, options)).await
    }

    /// Raw call, as [`Session::request_bytes`](crate::Session::request_bytes), with retries.
    pub async fn request_bytes(&self, method: &str, body: impl Into<Bytes>, options: CallOptions) -> Result<Bytes> {
        let body = body.into();
        let call = CallId { epoch: self.epoch, id: self.next_id.fetch_add(1, Ordering::Relaxed) };
        let first = Instant::now();
        let deadline = crate::session::deadline_after(options.timeout);
        let mut backoff = Duration::from_millis(50);
        loop {
            let may_retry =
                || (options.idempotent || first.elapsed() < self.retry_horizon) && Instant::now() + backoff < deadline;
            let session = match tokio::time::timeout_at(deadline, self.session()).await {
                Err(_) => return Err(Error::Timeout { what: Timed::RpcCall }),
                Ok(Ok(s)) => s,
                Ok(Err(e)) if transient(&e) && may_retry() => {
                    debug!(error = %e, "RPC client: dialling failed, trying again");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
                Ok(Err(e)) => return Err(e),
            };
            match session.call(call, method, body.clone(), options.idempotent, deadline).await {
                Err(e) if session.is_ended() && transient(&e) && may_retry() => {
                    debug!(error = %e, ?call, "RPC client: session lost during a call, retrying it");
                    continue;
                }
                other => return other,
            }
        }
    }
}

/// A typed call over a raw one: postcard in, postcard out (trailing bytes are an error).
pub(crate) async fn typed<Req, Resp, Fut>(request: &Req, call: impl FnOnce(Vec<u8>) -> Fut) -> Result<Resp>
where
    Req: Serialize + ?Sized,
    Resp: DeserializeOwned,
    Fut: Future<Output = Result<Bytes>>,
{
    let response = call(postcard::to_allocvec(request)?).await?;
    crate::session::decode_exact(&response)
}

/// Failures that a new connection may cure: the network, not the peer's judgement of us.
fn transient(e: &Error) -> bool {
    match e {
        Error::Timeout { what } => what.is_transient(),
        _ => matches!(
            e,
            Error::ConnectionLost { .. }
                | Error::Refused
                | Error::Io(_)
                | Error::Limit { what: Limited::ConnectionsPerNode, .. }
        ),
    }
}
