//! Request/response over real sessions: typed and raw calls, typed remote errors, deadlines,
//! cancellation, concurrency limits, at-most-once execution across reconnects and lost
//! sessions, many calls at once, and calls through a lossy link.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use bytes::Bytes;
use quicseal::{
    ApplicationError, Call, CallOptions, CancelReason, Error, Limits, Node, NodeConfig, RemoteError, Router,
    RouterConfig, RpcClient, Session, SessionEvent,
};
use tokio::sync::{Notify, Semaphore, mpsc};

const SECOND: Duration = Duration::from_secs(1);

fn limits_of(f: impl FnOnce(&mut RouterConfig)) -> RouterConfig {
    let mut c = RouterConfig::default();
    f(&mut c);
    c
}

fn server_node(pki: &Pki, router: Router) -> Node {
    bind(NodeConfig::new(pki.identity("server"), pki.trust()).rpc(router))
}

/// A client session to a fresh server with `router`; returns (client session, server session,
/// server node, client node).
async fn pair(router: Router) -> (Session, Session, Node, Node) {
    let pki = Pki::new("ca");
    let server = server_node(&pki, router);
    let client = bind(NodeConfig::new(pki.identity("client"), pki.trust()));
    let (c, s) = connect(&client, &server, "server").await;
    (c.unwrap(), s.unwrap(), server, client)
}

fn remote(e: Error) -> RemoteError {
    match e {
        Error::Remote(r) => r,
        other => panic!("expected a remote error, got {other:?}"),
    }
}

fn kv_router(store: Arc<Mutex<HashMap<String, String>>>) -> Router {
    let (put_store, get_store) = (store.clone(), store);
    Router::new()
        .handle("put", move |_call: Call, (k, v): (String, String)| {
            let store = put_store.clone();
            async move { Ok::<_, ApplicationError>(store.lock().unwrap().insert(k, v)) }
        })
        .handle("get", move |call: Call, k: String| {
            let store = get_store.clone();
            async move {
                assert_eq!(call.peer().dns_names, ["client"]);
                store.lock().unwrap().get(&k).cloned().ok_or(ApplicationError::new(404, format!("no key {k:?}")))
            }
        })
        .handle_bytes("echo", |_call, body| async move { Ok(body) })
}

#[tokio::test]
async fn typed_and_raw_calls_and_typed_remote_errors() {
    let (c, _s, server, _client) = pair(kv_router(Arc::default())).await;
    let old: Option<String> = c.request("put", &("colour", "blue"), SECOND).await.unwrap();
    assert_eq!(old, None);
    let old: Option<String> = c.request("put", &("colour", "green"), SECOND).await.unwrap();
    assert_eq!(old.as_deref(), Some("blue"));
    let v: String = c.request("get", "colour", SECOND).await.unwrap();
    assert_eq!(v, "green");
    let echoed = c.request_bytes("echo", &b"\x00raw\xff"[..], CallOptions::new(SECOND)).await.unwrap();
    assert_eq!(&echoed[..], b"\x00raw\xff");

    // The handler's own error: code and message, distinct from transport errors.
    let e = c.request::<_, String>("get", "shape", SECOND).await.unwrap_err();
    assert_eq!(remote(e), RemoteError::Application(ApplicationError::new(404, "no key \"shape\"")));
    // Unknown method.
    let e = c.request::<_, String>("delete", "colour", SECOND).await.unwrap_err();
    assert_eq!(remote(e), RemoteError::UnknownMethod);
    // A body that is not the method's request type.
    let e = c.request_bytes("put", &b"\xff\xff\xff"[..], CallOptions::new(SECOND)).await.unwrap_err();
    assert_eq!(remote(e), RemoteError::InvalidRequest);
    // A response that is not the caller's expected type is a local decoding error.
    let e = c.request::<_, (u64, u64, u64)>("get", "colour", SECOND).await.unwrap_err();
    assert!(matches!(e, Error::Encoding(_)), "{e:?}");

    // The session still carries ordinary messages, and the RPC channels are not the
    // application's.
    assert!(matches!(c.send(0xFFFE, &1u8).await, Err(Error::ReservedChannel(0xFFFE))));
    assert!(matches!(c.try_send_bytes(0xFFFF, Bytes::new()), Err(Error::ReservedChannel(0xFFFF))));
    let s = server.stats();
    assert_eq!((s.rpc_requests, s.rpc_handled), (8, 7), "{s:?}");
    assert_eq!(s.messages_delivered, 0, "RPC frames are not application messages");
}

#[tokio::test]
async fn a_node_without_a_router_answers_unknown_method() {
    let pki = Pki::new("ca");
    let server = bind(NodeConfig::new(pki.identity("server"), pki.trust()));
    let client = bind(NodeConfig::new(pki.identity("client"), pki.trust()));
    let (c, _s) = connect(&client, &server, "server").await;
    let e = c.unwrap().request::<_, ()>("anything", &(), SECOND).await.unwrap_err();
    assert_eq!(remote(e), RemoteError::UnknownMethod);
}

#[tokio::test]
async fn either_side_can_serve() {
    // The accepting side calls the dialling side.
    let pki = Pki::new("ca");
    let server = bind(NodeConfig::new(pki.identity("server"), pki.trust()));
    let router = Router::new()
        .handle("whoami", |call: Call, ()| async move { Ok::<_, ApplicationError>(call.peer().dns_names.clone()) });
    let client = bind(NodeConfig::new(pki.identity("client"), pki.trust()).rpc(router));
    let (_c, s) = connect(&client, &server, "server").await;
    let names: Vec<String> = s.unwrap().request("whoami", &(), SECOND).await.unwrap();
    assert_eq!(names, ["server"]);
}

#[tokio::test]
async fn deadline_exceeded_is_a_timeout_and_the_server_stops_waiting() {
    // A handler that ignores cancellation and would run for a minute; one slot per session.
    let started = Arc::new(AtomicUsize::new(0));
    let router = Router::new()
        .config(limits_of(|c| {
            c.per_session = 1;
            c.cancel_grace = Duration::from_millis(100);
        }))
        .handle("stuck", {
            let started = started.clone();
            move |call: Call, ()| {
                started.fetch_add(1, Ordering::SeqCst);
                async move {
                    assert!(call.remaining() <= Duration::from_millis(300));
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    Ok::<_, ApplicationError>(())
                }
            }
        })
        .handle("quick", |_call: Call, x: u32| async move { Ok::<_, ApplicationError>(x + 1) });
    let (c, _s, server, _client) = pair(router).await;
    let t0 = tokio::time::Instant::now();
    let e = c.request::<_, ()>("stuck", &(), Duration::from_millis(300)).await.unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(started.load(Ordering::SeqCst), 1);
    // The stuck handler holds the only slot until the grace period after its deadline (or its
    // cancellation) runs out; then it is dropped and the slot is free again.
    let mut attempts = 0;
    loop {
        attempts += 1;
        match c.request::<_, u32>("quick", &1u32, SECOND).await {
            Ok(2) => break,
            Err(Error::Remote(RemoteError::Overloaded)) if attempts < 50 => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => panic!("{other:?}"),
        }
    }
    let s = server.stats();
    assert_eq!(s.rpc_cancelled + s.rpc_deadline_exceeded, 1, "{s:?}");
}

#[tokio::test]
async fn the_server_deadline_cancels_the_handler_with_reason_deadline() {
    // The caller's CANCEL races the server's own deadline; a blackout after the request arrived
    // holds the CANCEL back, so the server's deadline (receipt + budget) fires first.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (started_tx, mut started_rx) = mpsc::unbounded_channel();
    let router = Router::new().handle("wait", move |call: Call, ()| {
        let (tx, started) = (tx.clone(), started_tx.clone());
        async move {
            started.send(()).unwrap();
            let reason = call.cancelled().await;
            tx.send((reason, call.cancellation())).unwrap();
            Ok::<_, ApplicationError>(())
        }
    });
    let pki = Pki::new("ca");
    let server = server_node(&pki, router);
    let client = bind(NodeConfig::new(pki.identity("client"), pki.trust()));
    let (proxy, c, _s) = connect_via_proxy(&client, &server, "server").await;
    let call = tokio::spawn(async move { c.request::<_, ()>("wait", &(), Duration::from_millis(300)).await });
    tokio::time::timeout(5 * SECOND, started_rx.recv()).await.unwrap().unwrap();
    proxy.set_blackout(true);
    let (reason, seen) = tokio::time::timeout(5 * SECOND, rx.recv()).await.unwrap().unwrap();
    assert_eq!((reason, seen), (CancelReason::Deadline, Some(CancelReason::Deadline)));
    let e = call.await.unwrap().unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    assert_eq!(server.stats().rpc_deadline_exceeded, 1);
    proxy.set_blackout(false);
}

#[tokio::test]
async fn dropping_the_call_cancels_it_and_the_handler_sees_it() {
    let (started_tx, mut started_rx) = mpsc::unbounded_channel();
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let router = Router::new().handle("long", move |call: Call, ()| {
        let (started, seen) = (started_tx.clone(), seen_tx.clone());
        async move {
            started.send(()).unwrap();
            let reason = call.cancelled().await;
            seen.send(reason).unwrap();
            Ok::<_, ApplicationError>(())
        }
    });
    let (c, _s, server, _client) = pair(router).await;
    let call = tokio::spawn({
        let c = c.clone();
        async move { c.request::<_, ()>("long", &(), Duration::from_secs(60)).await }
    });
    tokio::time::timeout(5 * SECOND, started_rx.recv()).await.unwrap().unwrap();
    call.abort(); // drops the future
    let reason = tokio::time::timeout(5 * SECOND, seen_rx.recv()).await.expect("the handler saw it").unwrap();
    assert_eq!(reason, CancelReason::Caller);
    assert!(call.await.unwrap_err().is_cancelled());
    let s = server.stats();
    assert_eq!((s.rpc_cancelled, s.rpc_deadline_exceeded), (1, 0), "{s:?}");
    // A cancelled call sends no response; the session is fine.
    let e = c.request::<_, ()>("nope", &(), SECOND).await.unwrap_err();
    assert_eq!(remote(e), RemoteError::UnknownMethod);
    assert_eq!(c.stats().rpc_late_responses, 0);
}

#[tokio::test]
async fn a_copy_of_the_call_kept_past_its_answer_is_told_the_call_is_over() {
    // A handler leaves a task holding a copy of its `Call`, waiting for a cancellation, and
    // answers: once the call is over, the task stops waiting (`Caller`: nobody waits for it),
    // and the call never counts as cancelled.
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let router = Router::new().handle("answer", move |call: Call, x: u64| {
        let seen = seen_tx.clone();
        async move {
            tokio::spawn(async move {
                let reason = call.cancelled().await;
                seen.send((reason, call.cancellation())).unwrap();
            });
            Ok::<_, ApplicationError>(x + 1)
        }
    });
    let (c, _s, server, _client) = pair(router).await;
    let answer: u64 = c.request("answer", &41u64, 5 * SECOND).await.unwrap();
    assert_eq!(answer, 42);
    let seen = tokio::time::timeout(5 * SECOND, seen_rx.recv()).await.expect("the task stopped waiting").unwrap();
    assert_eq!(seen, (CancelReason::Caller, None));
    let s = server.stats();
    assert_eq!((s.rpc_cancelled, s.rpc_deadline_exceeded), (0, 0), "{s:?}");
}

#[tokio::test]
async fn a_call_in_flight_across_a_forced_reconnect_runs_once_and_answers() {
    let runs = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Notify::new());
    let router = Router::new().handle("count", {
        let (runs, gate) = (runs.clone(), gate.clone());
        move |_call: Call, x: u64| {
            let (runs, gate) = (runs.clone(), gate.clone());
            async move {
                let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                gate.notified().await;
                Ok::<_, ApplicationError>((x * 10, n))
            }
        }
    });
    let (c, s, _server, _client) = pair(router).await;
    let mut events = c.events();
    let call = tokio::spawn({
        let c = c.clone();
        async move { c.request::<_, (u64, usize)>("count", &7u64, Duration::from_secs(30)).await }
    });
    while runs.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Lose the connection while the handler runs, and again while its response travels.
    c.force_reconnect();
    wait_for(&mut events, SessionEvent::Resumed).await;
    gate.notify_one();
    s.force_reconnect();
    wait_for(&mut events, SessionEvent::Resumed).await;
    let answer = tokio::time::timeout(Duration::from_secs(30), call).await.unwrap().unwrap().unwrap();
    assert_eq!(answer, (70, 1));
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran exactly once");
    assert!(c.stats().reconnects >= 1);
}

async fn wait_for(events: &mut tokio::sync::broadcast::Receiver<SessionEvent>, want: SessionEvent) {
    loop {
        let e = tokio::time::timeout(Duration::from_secs(10), events.recv()).await.expect("event in time").unwrap();
        if e == want {
            return;
        }
    }
}

fn quick_limits() -> Limits {
    let mut l = Limits::default();
    l.idle_timeout = Duration::from_millis(600);
    l.keep_alive = Some(Duration::from_millis(150));
    l.reconnect_backoff = (Duration::from_millis(20), Duration::from_millis(100));
    l.resume_timeout = Duration::from_millis(900);
    l
}

/// A server whose "transfer" handler counts its runs and takes 300 ms, behind a netsim link,
/// and an RpcClient of it.
struct LostSession {
    runs: Arc<AtomicUsize>,
    /// With [`LostSession::start_held`]: the handler waits for a permit here instead of 300 ms.
    hold: Option<Arc<Semaphore>>,
    started: mpsc::UnboundedReceiver<()>,
    server: Node,
    client_node: Node,
    proxy: quicseal::netsim::Proxy,
    serve: tokio::task::JoinHandle<()>,
}

impl LostSession {
    async fn start() -> LostSession {
        Self::start_with(None).await
    }

    /// As [`LostSession::start`], with a handler that runs until the test adds a permit to
    /// `hold`.
    async fn start_held() -> LostSession {
        Self::start_with(Some(Arc::new(Semaphore::new(0)))).await
    }

    async fn start_with(hold: Option<Arc<Semaphore>>) -> LostSession {
        let pki = Pki::new("ca");
        let runs = Arc::new(AtomicUsize::new(0));
        let (started_tx, started) = mpsc::unbounded_channel();
        let router = Router::new().handle("transfer", {
            let (runs, hold) = (runs.clone(), hold.clone());
            move |_call: Call, amount: u64| {
                let (runs, started, hold) = (runs.clone(), started_tx.clone(), hold.clone());
                async move {
                    let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                    started.send(()).unwrap();
                    match hold {
                        Some(hold) => hold.acquire().await.unwrap().forget(),
                        None => tokio::time::sleep(Duration::from_millis(300)).await,
                    }
                    Ok::<_, ApplicationError>(format!("moved {amount}, run {n}"))
                }
            }
        });
        let server = bind(NodeConfig::new(pki.identity("server"), pki.trust()).limits(quick_limits()).rpc(router));
        let client_node = bind(NodeConfig::new(pki.identity("client"), pki.trust()).limits(quick_limits()));
        let proxy = quicseal::netsim::Proxy::start(
            "127.0.0.1:0".parse().unwrap(),
            server.local_addr().unwrap(),
            quicseal::netsim::LinkConfig::default(),
        )
        .await
        .unwrap();
        let serve = tokio::spawn({
            let server = server.clone();
            async move { server.serve().await }
        });
        LostSession { runs, hold, started, server, client_node, proxy, serve }
    }

    fn client(&self) -> RpcClient {
        RpcClient::new(self.client_node.clone(), self.proxy.local_addr(), "server").unwrap()
    }

    /// Makes a call and, once its handler started, darkens the link for longer than the idle
    /// and resume timeouts, so the session gives up; then lights it again. Returns the call's
    /// result and the first session.
    async fn call_across_a_lost_session(
        &mut self,
        client: Arc<RpcClient>,
        options: CallOptions,
    ) -> (quicseal::Result<String>, Session) {
        let (call, first_session) = self.lose_the_session_during_a_call(client, options).await;
        let answer = tokio::time::timeout(Duration::from_secs(30), call).await.unwrap().unwrap();
        (answer, first_session)
    }

    /// The first part of [`LostSession::call_across_a_lost_session`]: the call, still going,
    /// and the first session, given up.
    async fn lose_the_session_during_a_call(
        &mut self,
        client: Arc<RpcClient>,
        options: CallOptions,
    ) -> (tokio::task::JoinHandle<quicseal::Result<String>>, Session) {
        let first_session = client.session().await.unwrap();
        let call = tokio::spawn({
            let client = client.clone();
            async move { client.request_with::<_, String>("transfer", &5u64, options).await }
        });
        tokio::time::timeout(5 * SECOND, self.started.recv()).await.unwrap().unwrap();
        self.proxy.set_blackout(true);
        tokio::time::timeout(Duration::from_secs(10), first_session.closed()).await.expect("the session gave up");
        self.proxy.set_blackout(false);
        (call, first_session)
    }
}

impl Drop for LostSession {
    fn drop(&mut self) {
        self.serve.abort();
    }
}

#[tokio::test]
async fn a_retry_on_a_new_session_is_answered_from_the_cache_without_running_again() {
    // The session is lost for good while the handler runs; the RpcClient dials a new session
    // and sends the same call again: the server answers it from its at-most-once cache.
    let mut t = LostSession::start().await;
    let client = Arc::new(t.client());
    let (answer, first_session) =
        t.call_across_a_lost_session(client.clone(), CallOptions::new(Duration::from_secs(30))).await;
    assert_eq!(answer.unwrap(), "moved 5, run 1");
    assert_eq!(t.runs.load(Ordering::SeqCst), 1, "the retry did not run the handler again");
    let second_session = client.session().await.unwrap();
    assert_ne!(second_session.epoch(), first_session.epoch(), "the retry went over a new session");
    assert!(t.server.stats().rpc_cache_hits >= 1, "{:?}", t.server.stats());
    assert!(t.client_node.stats().rpc_calls >= 2, "{:?}", t.client_node.stats());
    // New calls keep working.
    let again: String = second_session.request("transfer", &6u64, Duration::from_secs(5)).await.unwrap();
    assert_eq!(again, "moved 6, run 2");
}

#[tokio::test]
async fn a_retry_that_arrives_while_the_first_attempt_runs_gets_that_attempts_answer() {
    // The session is lost for good while the handler runs, and the handler is still running
    // when the RpcClient's retry arrives on a new session: the retry waits for the first
    // attempt and is answered with its result; the handler runs once.
    let mut t = LostSession::start_held().await;
    let client = Arc::new(t.client());
    let (call, first_session) =
        t.lose_the_session_during_a_call(client.clone(), CallOptions::new(Duration::from_secs(30))).await;
    // No notification says a request arrived: the server's counter does.
    eventually("the retry reached the server and found the call running", || t.server.stats().rpc_cache_hits > 0).await;
    assert!(!call.is_finished(), "the retry waits for the first attempt");
    t.hold.as_ref().unwrap().add_permits(1);
    let answer = tokio::time::timeout(Duration::from_secs(30), call).await.unwrap().unwrap();
    assert_eq!(answer.unwrap(), "moved 5, run 1");
    assert_eq!(t.runs.load(Ordering::SeqCst), 1, "the retry did not run the handler again");
    assert_ne!(client.session().await.unwrap().epoch(), first_session.epoch(), "the retry went over a new session");
}

#[tokio::test]
async fn past_the_retry_horizon_only_idempotent_calls_are_retried() {
    let mut t = LostSession::start().await;
    let client = Arc::new(t.client().retry_horizon(Duration::ZERO));
    // Not idempotent, and older than the (zero) horizon: the session's loss is the answer.
    let (answer, _) = t.call_across_a_lost_session(client.clone(), CallOptions::new(Duration::from_secs(30))).await;
    let e = answer.unwrap_err();
    assert!(matches!(e, Error::Timeout { what: quicseal::Timed::SessionResumption }), "{e:?}");
    assert_eq!(t.client_node.stats().rpc_calls, 1, "not retried");
    // Idempotent: retried on a new session.
    let options = CallOptions::new(Duration::from_secs(30)).idempotent(true);
    let (answer, _) = t.call_across_a_lost_session(client.clone(), options).await;
    assert_eq!(answer.unwrap(), "moved 5, run 2");
    assert_eq!(t.runs.load(Ordering::SeqCst), 2, "each call ran once");
    assert_eq!(t.client_node.stats().rpc_calls, 3);
}

/// A router whose "hold" handler counts itself in `running` and waits for `gate`.
fn hold_router(config: RouterConfig) -> (Router, Arc<Notify>, Arc<AtomicUsize>) {
    let gate = Arc::new(Notify::new());
    let running = Arc::new(AtomicUsize::new(0));
    let router = Router::new().config(config).handle("hold", {
        let (gate, running) = (gate.clone(), running.clone());
        move |_call: Call, i: u32| {
            let (gate, running) = (gate.clone(), running.clone());
            async move {
                running.fetch_add(1, Ordering::SeqCst);
                gate.notified().await;
                Ok::<_, ApplicationError>(i)
            }
        }
    });
    (router, gate, running)
}

#[tokio::test]
async fn concurrency_limits_per_session_and_per_node() {
    let (router, gate, running) = hold_router(limits_of(|c| {
        c.per_session = 2;
        c.per_node = 3;
    }));
    let pki = Pki::new("ca");
    let server = server_node(&pki, router);
    let client = bind(NodeConfig::new(pki.identity("client"), pki.trust()));
    let (c1, _s1) = connect(&client, &server, "server").await;
    let (c2, _s2) = connect(&client, &server, "server").await;
    let (c1, c2) = (c1.unwrap(), c2.unwrap());
    let spawn_call = |c: &Session, i: u32| {
        let c = c.clone();
        tokio::spawn(async move { c.request::<_, u32>("hold", &i, Duration::from_secs(30)).await })
    };
    let a = spawn_call(&c1, 1);
    let b = spawn_call(&c1, 2);
    while running.load(Ordering::SeqCst) < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Third call on the same session: the per-session limit.
    let e = c1.request::<_, u32>("hold", &3u32, SECOND).await.unwrap_err();
    assert_eq!(remote(e), RemoteError::Overloaded);
    // A second session has its own two slots, but the node only one more.
    let d = spawn_call(&c2, 4);
    while running.load(Ordering::SeqCst) < 3 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let e = c2.request::<_, u32>("hold", &5u32, SECOND).await.unwrap_err();
    assert_eq!(remote(e), RemoteError::Overloaded);
    assert_eq!(server.stats().rpc_overloaded, 2);
    // Release them: all three finish, and the slots are free again.
    while running.load(Ordering::SeqCst) > 0 {
        gate.notify_waiters();
        if a.is_finished() && b.is_finished() && d.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(a.await.unwrap().unwrap(), 1);
    assert_eq!(b.await.unwrap().unwrap(), 2);
    assert_eq!(d.await.unwrap().unwrap(), 4);
    let e = spawn_call(&c1, 6);
    let f = spawn_call(&c1, 7);
    while running.load(Ordering::SeqCst) < 5 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    gate.notify_waiters();
    assert_eq!(e.await.unwrap().unwrap(), 6);
    assert_eq!(f.await.unwrap().unwrap(), 7);
}

#[tokio::test]
async fn oversize_requests_are_refused_by_the_server_or_before_sending() {
    let router = Router::new()
        .config(limits_of(|c| {
            c.max_request_size = 1000;
        }))
        .handle_bytes("sink", |_call, body: Bytes| async move { Ok(Bytes::from(body.len().to_string())) });
    let (c, _s, server, _client) = pair(router).await;
    let ok = c.request_bytes("sink", vec![7u8; 1000], CallOptions::new(SECOND)).await.unwrap();
    assert_eq!(&ok[..], b"1000");
    let e = c.request_bytes("sink", vec![7u8; 1001], CallOptions::new(SECOND)).await.unwrap_err();
    assert_eq!(remote(e), RemoteError::RequestTooLarge);
    assert_eq!(server.stats().rpc_handled, 1, "the handler did not run for it");
    // Larger than one message: refused locally, nothing sent.
    let big = vec![0u8; c.max_message_size()];
    let e = c.request_bytes("sink", big, CallOptions::new(SECOND)).await.unwrap_err();
    assert!(matches!(e, Error::MessageTooLarge { .. }), "{e:?}");
    // A method name over 255 bytes is a local error too.
    let e = c.request_bytes(&"m".repeat(256), Bytes::new(), CallOptions::new(SECOND)).await.unwrap_err();
    assert!(matches!(e, Error::InvalidInput(_)), "{e:?}");
    assert_eq!(server.stats().rpc_requests, 2);
}

#[tokio::test]
async fn a_handler_panic_is_an_error_and_the_server_survives() {
    let router = Router::new()
        .handle("boom", |_call: Call, ()| async move {
            if true {
                panic!("handler bug");
            }
            Ok::<(), ApplicationError>(())
        })
        .handle("ok", |_call: Call, ()| async move { Ok::<_, ApplicationError>(42u8) });
    let (c, _s, server, _client) = pair(router).await;
    for _ in 0..3 {
        let e = c.request::<_, ()>("boom", &(), SECOND).await.unwrap_err();
        assert_eq!(remote(e), RemoteError::HandlerPanicked);
        assert_eq!(c.request::<_, u8>("ok", &(), SECOND).await.unwrap(), 42);
    }
    assert_eq!(server.stats().rpc_panics, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_calls_on_one_session() {
    let peak = Arc::new(AtomicUsize::new(0));
    let now_running = Arc::new(AtomicUsize::new(0));
    let router = Router::new()
        .config(limits_of(|c| {
            c.per_session = 1024;
        }))
        .handle("square", {
            let (peak, now_running) = (peak.clone(), now_running.clone());
            move |_call: Call, x: u64| {
                let (peak, now_running) = (peak.clone(), now_running.clone());
                async move {
                    let n = now_running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(n, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    now_running.fetch_sub(1, Ordering::SeqCst);
                    Ok::<_, ApplicationError>(x * x)
                }
            }
        });
    let (c, _s, server, _client) = pair(router).await;
    const N: u64 = 1000;
    let calls: Vec<_> = (0..N)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move { (i, c.request::<_, u64>("square", &i, Duration::from_secs(60)).await) })
        })
        .collect();
    for call in calls {
        let (i, r) = call.await.unwrap();
        assert_eq!(r.unwrap(), i * i);
    }
    let s = server.stats();
    assert_eq!((s.rpc_requests, s.rpc_handled, s.rpc_overloaded), (N, N, 0), "{s:?}");
    // Calls really overlapped (the client keeps up to 512 outstanding per session).
    assert!(peak.load(Ordering::SeqCst) >= 100, "peak concurrency {}", peak.load(Ordering::SeqCst));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_through_a_lossy_link_complete_exactly_once() {
    let pki = Pki::new("ca");
    let counts: Arc<Mutex<HashMap<u32, u32>>> = Arc::default();
    let router = Router::new().handle("record", {
        let counts = counts.clone();
        move |_call: Call, i: u32| {
            let counts = counts.clone();
            async move {
                *counts.lock().unwrap().entry(i).or_default() += 1;
                Ok::<_, ApplicationError>(i.wrapping_mul(2_654_435_761))
            }
        }
    });
    let server = server_node(&pki, router);
    let client = bind(NodeConfig::new(pki.identity("client"), pki.trust()));
    let (proxy, c, _s) = connect_via_proxy(&client, &server, "server").await;
    let mut link = quicseal::netsim::LinkConfig::default();
    link.loss = 0.05;
    link.seed = 5;
    proxy.reconfigure(link).unwrap();
    const N: u32 = 400;
    let calls: Vec<_> = (0..N)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move {
                // Stagger them a little so the link sees a stream of calls, not one burst.
                tokio::time::sleep(Duration::from_millis(u64::from(i % 50) * 4)).await;
                (i, c.request::<_, u32>("record", &i, Duration::from_secs(60)).await)
            })
        })
        .collect();
    for call in calls {
        let (i, r) = call.await.unwrap();
        assert_eq!(r.unwrap(), i.wrapping_mul(2_654_435_761));
    }
    let counts = counts.lock().unwrap();
    assert_eq!(counts.len(), N as usize);
    assert!(counts.values().all(|&n| n == 1), "every handler ran exactly once");
    let lost = proxy.stats().lost;
    assert!(lost > 0, "the link did drop packets: {:?}", proxy.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_calling_each_other_through_a_tiny_outbox_do_not_stall() {
    // Each side takes few requests at a time (one handler slot, so few answers owed) and sends
    // through an outbox of 8. Requests may fill at most half of it, so answers always find room
    // and the peer always takes answers: heavy calling in both directions keeps moving.
    let pki = Pki::new("ca");
    let mut limits = Limits::default();
    limits.outbox_messages = 8;
    let echo = || {
        Router::new()
            .config(limits_of(|c| c.per_session = 1))
            .handle_bytes("echo", |_call, body| async move { Ok(body) })
    };
    let a = bind(NodeConfig::new(pki.identity("a"), pki.trust()).limits(limits.clone()).rpc(echo()));
    let b = bind(NodeConfig::new(pki.identity("b"), pki.trust()).limits(limits).rpc(echo()));
    let (ab, ba) = connect(&a, &b, "b").await;
    let (ab, ba) = (ab.unwrap(), ba.unwrap());
    let mut calls = Vec::new();
    for i in 0..300u32 {
        for s in [&ab, &ba] {
            let s = s.clone();
            calls.push(tokio::spawn(async move {
                let body = i.to_be_bytes().to_vec();
                match s.request_bytes("echo", body.clone(), CallOptions::new(Duration::from_secs(30))).await {
                    Ok(echoed) => {
                        assert_eq!(echoed.to_vec(), body);
                        true
                    }
                    Err(Error::Remote(RemoteError::Overloaded)) => false,
                    Err(e) => panic!("{e:?}"),
                }
            }));
        }
    }
    let answered = tokio::time::timeout(Duration::from_secs(60), async {
        let mut answered = 0;
        for c in calls {
            answered += usize::from(c.await.unwrap());
        }
        answered
    })
    .await
    .expect("no stall");
    let handled = (a.stats().rpc_handled + b.stats().rpc_handled) as usize;
    assert_eq!(answered, handled);
    assert!(answered > 0);
}

/// One peer's share of the node's handler slots: across all its sessions it runs at most
/// `per_peer` handlers; another peer still gets its own.
#[tokio::test]
async fn handler_slots_are_shared_fairly_between_peers() {
    let (router, gate, running) = hold_router(limits_of(|c| {
        c.per_session = 2;
        c.per_peer = 3;
        c.per_node = 100;
    }));
    let pki = Pki::new("ca");
    let server = server_node(&pki, router);
    let greedy = bind(NodeConfig::new(pki.identity("greedy"), pki.trust()));
    let (g1, _s1) = connect(&greedy, &server, "server").await;
    let (g2, _s2) = connect(&greedy, &server, "server").await;
    let (g1, g2) = (g1.unwrap(), g2.unwrap());
    let spawn_call = |c: &Session, i: u32| {
        let c = c.clone();
        tokio::spawn(async move { c.request::<_, u32>("hold", &i, Duration::from_secs(30)).await })
    };
    let held = [spawn_call(&g1, 1), spawn_call(&g1, 2), spawn_call(&g2, 3)];
    while running.load(Ordering::SeqCst) < 3 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The greedy peer's second session has a free session slot, but the peer has used its share.
    let e = g2.request::<_, u32>("hold", &4u32, SECOND).await.unwrap_err();
    assert_eq!(remote(e), RemoteError::Overloaded);
    // Another peer is served.
    let other = bind(NodeConfig::new(pki.identity("other"), pki.trust()));
    let (o, _so) = connect(&other, &server, "server").await;
    let o = o.unwrap();
    let call = spawn_call(&o, 5);
    while running.load(Ordering::SeqCst) < 4 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    while !(call.is_finished() && held.iter().all(|h| h.is_finished())) {
        gate.notify_waiters();
        tokio::task::yield_now().await;
    }
    assert_eq!(call.await.unwrap().unwrap(), 5);
}

/// A caller's budget is cut to `max_budget`: a handler never gets weeks.
#[tokio::test]
async fn call_budgets_are_capped_by_the_server() {
    let router = Router::new()
        .config(limits_of(|c| c.max_budget = Duration::from_secs(2)))
        .handle("remaining", |call: Call, (): ()| async move {
            Ok::<_, ApplicationError>(call.remaining().as_millis() as u64)
        });
    let (client, _server_side, _server, _client_node) = pair(router).await;
    let remaining: u64 = client.request("remaining", &(), Duration::from_secs(3600)).await.unwrap();
    assert!(remaining <= 2000, "{remaining} ms left of a budget capped at 2 s");
    assert!(remaining > 0);
}

/// Slow handlers and a short freshness horizon: requests beyond the handler slots are answered
/// `Overloaded` at once instead of waiting in the receive buffer (where they could outlive the
/// horizon), so the request channel never wedges; every call ends (answered or overloaded)
/// long before its timeout, and no handler runs twice.
#[tokio::test]
async fn slow_handlers_never_wedge_the_request_channel() {
    let runs = Arc::new(AtomicUsize::new(0));
    let router = Router::new().config(limits_of(|c| c.per_session = 2)).handle_bytes("slow", {
        let runs = runs.clone();
        move |_call, body: Bytes| {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                // A slow handler, longer than the freshness horizon.
                tokio::time::sleep(Duration::from_millis(2500)).await;
                Ok(body.slice(..4))
            }
        }
    });
    let pki = Pki::new("ca");
    let mut limits = Limits::default();
    limits.freshness = Duration::from_secs(2);
    limits.max_message_size = 64 * 1024;
    limits.receive_buffer = 128 * 1024;
    let server = bind(NodeConfig::new(pki.identity("server"), pki.trust()).rpc(router).limits(limits.clone()));
    let client = bind(NodeConfig::new(pki.identity("client"), pki.trust()).limits(limits));
    let (c, _s) = connect(&client, &server, "server").await;
    let c = c.unwrap();
    let calls: Vec<_> = (0..24u32)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move {
                let mut body = vec![0u8; 32 * 1024];
                body[..4].copy_from_slice(&i.to_be_bytes());
                c.request_bytes("slow", body, CallOptions::new(Duration::from_secs(120))).await
            })
        })
        .collect();
    let mut answered = 0;
    for (i, call) in calls.into_iter().enumerate() {
        match tokio::time::timeout(Duration::from_secs(60), call).await.expect("the call ended").unwrap() {
            Ok(answer) => {
                assert_eq!(answer[..], (i as u32).to_be_bytes());
                answered += 1;
            }
            Err(e) => assert_eq!(remote(e), RemoteError::Overloaded),
        }
    }
    assert!(answered >= 2, "the slots were used: {answered}");
    assert_eq!(runs.load(Ordering::SeqCst), answered, "each handler ran once per answer");
    // The request channel still works.
    let again = c.request_bytes("slow", vec![9u8; 8], CallOptions::new(Duration::from_secs(20))).await.unwrap();
    assert_eq!(again[..], [9u8; 4]);
}
