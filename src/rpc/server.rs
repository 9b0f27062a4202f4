//! The serving side: the node's RPC server ([`RpcServer`]: concurrency limits, the at-most-once
//! cache, handlers in flight) and each session's share of it ([`SessionRpc`], which also holds
//! the session's pending calls; the calling side is in `caller.rs`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use rustc_hash::FxHashMap;
use tokio::sync::{Semaphore, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::router::{Call, CancelReason, Handler, Router, RouterConfig};
use super::{Outlet, RESPONSE_CHANNEL, RESPONSE_OVERHEAD};
use crate::error::{Error, Result};
use crate::identity::{Fingerprint, PeerIdentity};
use crate::proto::rpc::{Begin, CallId, ResponseCache, RpcFrame, Status};
use crate::stats::Counter;

/// Polls `work` once here, in the caller's task, and gives it a task of its own only if it has
/// to wait: a handler that answers at once (and a quick refusal) costs no task hop on the way
/// back to the caller. The task polls it again at once, registering a waker that works (the
/// first poll's waker does nothing), so nothing it was waiting for is missed.
///
/// Callers hold the session's RPC taking lock (`session::take_rpc`); what `work` does under it
/// must not take that lock again (the answer path skips it; see `Outlet::take_waiting_requests`).
fn run_here_or_spawn(work: impl Future<Output = ()> + Send + 'static) {
    let mut work = Box::pin(work);
    if work.as_mut().poll(&mut Context::from_waker(Waker::noop())).is_pending() {
        tokio::spawn(work);
    }
}

/// A call's key in the server's memory: who called, and which call.
type Key = (Fingerprint, CallId);

/// A call whose handler is running.
struct Inflight {
    cancel: watch::Sender<Option<CancelReason>>,
    /// The result, for attempts of the same call that arrive while it runs: made by the first
    /// such attempt. Most calls have none, and a watch channel costs an allocation and a wake-up
    /// of each of its eight notifiers when it is sent to and when it is dropped.
    done: Option<watch::Sender<Option<(Status, Bytes)>>>,
}

/// A node's RPC server state, shared by all its sessions.
pub(crate) struct RpcServer {
    router: Option<Router>,
    config: RouterConfig,
    node_permits: Arc<Semaphore>,
    /// Lock order: `cache`, then `inflight`.
    cache: Mutex<ResponseCache<Key>>,
    inflight: Mutex<HashMap<Key, Inflight>>,
    /// Handlers running per peer (see [`RouterConfig::per_peer`]). Keyed by authenticated
    /// peers' certificate fingerprints (SHA-256, not chosen freely), so hashed with FxHash;
    /// `inflight` and the cache, keyed by the call ids peers choose, keep SipHash.
    per_peer: Arc<Mutex<FxHashMap<Fingerprint, usize>>>,
    started: Instant,
}

/// One handler slot of a peer: counted until dropped.
struct PeerSlot {
    running: Arc<Mutex<FxHashMap<Fingerprint, usize>>>,
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
    pub(super) server: Arc<RpcServer>,
    pub(super) peer: Arc<PeerIdentity>,
    pub(super) session_permits: Arc<Semaphore>,
    /// Requests taken from the peer and not yet answered (running or waiting to be queued).
    pub(super) owed: AtomicUsize,
    /// Our calls waiting for their response. Keyed by the ids we choose (a response with any
    /// other id finds nothing), so hashed with FxHash: the map is looked up on every response.
    pub(super) pending: Mutex<FxHashMap<CallId, oneshot::Sender<(Status, Bytes)>>>,
    pub(super) pending_permits: Arc<Semaphore>,
    pub(super) next_id: AtomicU64,
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
            pending: Mutex::new(FxHashMap::default()),
            pending_permits: Arc::new(Semaphore::new(max_pending)),
            next_id: AtomicU64::new(1),
        }
    }

    pub(super) fn pending(&self) -> MutexGuard<'_, FxHashMap<CallId, oneshot::Sender<(Status, Bytes)>>> {
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

    /// Handles one message from the request channel. `Err` is a protocol violation.
    pub(crate) fn on_request<O: Outlet>(
        self: &Arc<Self>,
        outlet: &O,
        payload: &Bytes,
    ) -> std::result::Result<(), String> {
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

    fn serve<O: Outlet>(
        self: &Arc<Self>,
        outlet: &O,
        call: CallId,
        method: String,
        budget_ms: u32,
        idem: bool,
        body: Bytes,
    ) {
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
                let done = server
                    .inflight()
                    .get_mut(&key)
                    .map(|r| r.done.get_or_insert_with(|| watch::channel(None).0).subscribe());
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
                server.inflight().insert(key, Inflight { cancel, done: None });
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
                run_here_or_spawn(async move {
                    this.run(&outlet, key, handler, ctx, body).await;
                    drop((session_permit, node_permit, peer_slot));
                });
            }
        }
    }

    /// Runs a handler to its end, its deadline, or its cancellation; records and sends the
    /// result; then lets a cancelled handler finish within the grace period.
    async fn run<O: Outlet>(&self, outlet: &O, key: Key, handler: Handler, ctx: Call, body: Bytes) {
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
        // Attempts waiting on this one (they subscribed under the cache's lock, which this
        // took to finish the call and take it out of `inflight`) get its result.
        if let Some(done) = running.and_then(|r| r.done) {
            done.send_replace(Some((status.clone(), response.clone())));
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
    fn paid_one<O: Outlet>(&self, outlet: &O) {
        self.owed.fetch_sub(1, Ordering::Relaxed);
        outlet.take_waiting_requests();
    }

    /// Answers a request at once (in a task: the outbox may be full).
    fn answer<O: Outlet>(self: &Arc<Self>, outlet: &O, call: CallId, status: Status, body: Bytes) {
        self.owe();
        let (this, outlet) = (self.clone(), outlet.clone());
        run_here_or_spawn(async move { this.send_answer(&outlet, call, status, body).await });
    }

    async fn send_answer<O: Outlet>(&self, outlet: &O, call: CallId, status: Status, body: Bytes) {
        let mut frame = Vec::with_capacity(body.len() + 32);
        let encoded = RpcFrame::Response { call, status, body }.encode(&mut frame);
        if encoded.is_ok() {
            // A session that ended takes nothing more; a retry on another session finds the
            // answer in the cache.
            let _ = outlet.send(RESPONSE_CHANNEL, frame.into()).await;
        }
        self.paid_one(outlet);
    }
}
