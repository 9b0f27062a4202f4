//! Durable channels (PROTOCOL.md section 10) between real nodes over loopback, each with a store
//! in a temp dir: exactly once and in order across restarts of either node (in-process: the
//! node is dropped and bound again on the same store), and the errors a user can hit.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::common::*;
use quicseal::store::{StoreError, Stored};
use quicseal::{Error, Limits, Node, NodeConfig, Session, SessionEvent};

const WAIT: Duration = Duration::from_secs(30);

/// Binds a node with a store in `dir` on `addr` (see `bind_again`: a dropped node may still
/// hold both).
async fn bind_with_store(pki: &Pki, name: &str, dir: &Path, addr: SocketAddr) -> Node {
    bind_again(addr, || NodeConfig::new(pki.identity(name), pki.trust()).store(dir).limits(quick_limits())).await
}

/// Nodes "a" and "b", each with a store in a temp dir of its own: (a's dir, b's dir, a, b).
async fn stored_pair(pki: &Pki) -> (tempfile::TempDir, tempfile::TempDir, Node, Node) {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = bind_with_store(pki, "a", da.path(), any_port()).await;
    let b = bind_with_store(pki, "b", db.path(), any_port()).await;
    (da, db, a, b)
}

fn quick_limits() -> Limits {
    let mut l = Limits::default();
    l.reconnect_backoff = (Duration::from_millis(20), Duration::from_millis(200));
    l.resume_timeout = Duration::from_secs(2);
    l
}

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

async fn dial(a: &Node, b: &Node) -> (Session, Session) {
    let (ab, ba) = connect(a, b, "b").await;
    (ab.unwrap(), ba.unwrap())
}

/// Receives `n` durable messages, checks they are the numbers `from..from+n` in order, and
/// consumes each unless `consume` is false.
async fn receive_numbers(node: &Node, from: u32, n: u32, consume: bool) -> Vec<Stored> {
    let mut got = Vec::new();
    for expected in from..from + n {
        let m = tokio::time::timeout(WAIT, node.recv_durable())
            .await
            .unwrap_or_else(|_| {
                panic!("durable message {expected} in time: {:?}", node.durable_store().unwrap().stats())
            })
            .unwrap();
        let v: u32 = postcard::from_bytes(&m.payload).unwrap();
        assert_eq!(v, expected, "out of order or duplicated");
        assert_eq!(m.channel, 3);
        if consume {
            node.consume(&m).await.unwrap();
        }
        got.push(m);
    }
    got
}

#[tokio::test]
async fn durable_messages_arrive_once_in_order_and_what_was_not_consumed_survives_a_restart() {
    let pki = Pki::new("durable");
    let (_da, db, a, b) = stored_pair(&pki).await;
    let (ab, _ba) = dial(&a, &b).await;
    for i in 0..100u32 {
        let sent = ab.send_durable(3, &i).await.unwrap();
        assert_eq!(sent.dseq, u64::from(i) + 1);
    }
    receive_numbers(&b, 0, 60, true).await;
    // 40 more are in b's store (received, not consumed); wait until a has its receipts, so
    // the sender has nothing left to resend.
    let deadline = tokio::time::Instant::now() + WAIT;
    while a.store().unwrap().stats().outbox_messages > 0 {
        assert!(tokio::time::Instant::now() < deadline, "receipts: {:?}", a.store().unwrap().stats());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let b_addr = b.local_addr().unwrap();
    drop((b, _ba));

    // b restarts on its store: the 40 come again, once, in order, and nothing else does.
    let b = bind_with_store(&pki, "b", db.path(), b_addr).await;
    assert_eq!(b.store().unwrap().stats().recovered, 40);
    receive_numbers(&b, 60, 40, true).await;
    let (ab, _ba) = dial(&a, &b).await;
    ab.send_durable(3, &100u32).await.unwrap();
    receive_numbers(&b, 100, 1, true).await;
}

/// Any [`DurableStore`](quicseal::store::DurableStore) backend: here a sender that keeps its
/// messages in memory and a receiver with a redb store the application opened itself.
#[tokio::test]
async fn durable_channels_run_on_any_store_backend() {
    use quicseal::store::{DurableStore, MemoryStore, Store};
    use std::sync::Arc;
    let pki = Pki::new("durable");
    let dir = tempfile::tempdir().unwrap();
    let memory: Arc<dyn DurableStore> = Arc::new(MemoryStore::new().unwrap());
    let on_disk = Store::open(dir.path()).unwrap();
    let bind = |name: &str, backend: Arc<dyn DurableStore>| {
        let config = NodeConfig::new(pki.identity(name), pki.trust()).store_backend(backend).limits(quick_limits());
        Node::bind(any_port(), config).unwrap()
    };
    let a = bind("a", memory.clone());
    let b = bind("b", Arc::new(on_disk.clone()));
    assert!(a.store().is_none(), "a memory store is not a Store on disk");
    assert_eq!(b.store().map(|s| s.path()), Some(on_disk.path()));
    let (ab, _ba) = dial(&a, &b).await;
    for i in 0..200u32 {
        ab.send_durable(3, &i).await.unwrap();
    }
    receive_numbers(&b, 0, 200, true).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while memory.stats().outbox_messages > 0 {
        assert!(tokio::time::Instant::now() < deadline, "receipts: {:?}", memory.stats());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(on_disk.stats().inbox_messages, 0);
    assert_eq!(memory.stats().commits, 0, "nothing is synced in memory");
    assert_eq!(on_disk.inspect().unwrap().in_streams.len(), 1);
}

#[tokio::test]
async fn a_restarted_sender_sends_again_what_its_peer_never_stored_and_nothing_twice() {
    let pki = Pki::new("durable");
    let (da, db, a, b) = stored_pair(&pki).await;
    let (ab, ba) = dial(&a, &b).await;
    for i in 0..10u32 {
        ab.send_durable(3, &i).await.unwrap();
    }
    receive_numbers(&b, 0, 10, true).await;
    // b goes away; a keeps sending into its store (its session is reconnecting, then gives up).
    let b_addr = b.local_addr().unwrap();
    drop((b, ba));
    for i in 10..30u32 {
        ab.send_durable(3, &i).await.unwrap();
    }
    // a restarts too, before anything could reach b.
    drop((a, ab));
    let a = bind_with_store(&pki, "a", da.path(), any_port()).await;
    assert!(a.store().unwrap().stats().outbox_messages >= 20, "{:?}", a.store().unwrap().stats());
    let b = bind_with_store(&pki, "b", db.path(), b_addr).await;
    let (ab, _ba) = dial(&a, &b).await;
    // The 20 from a's store, then a new one: nothing of 0..10 again.
    receive_numbers(&b, 10, 20, true).await;
    ab.send_durable(3, &30u32).await.unwrap();
    receive_numbers(&b, 30, 1, true).await;
}

#[tokio::test]
async fn a_durable_send_without_a_store_or_on_a_reserved_channel_is_a_clear_error() {
    let pki = Pki::new("durable");
    let d = tempfile::tempdir().unwrap();
    let plain = bind(NodeConfig::new(pki.identity("a"), pki.trust()));
    let stored = bind_with_store(&pki, "b", d.path(), any_port()).await;
    let (ab, ba) = dial(&plain, &stored).await;
    assert!(matches!(ab.send_durable(1, &1u32).await, Err(Error::Config(_))));
    assert!(matches!(plain.recv_durable().await, Err(Error::Config(_))));
    assert!(matches!(ab.send_bytes(0xFFFD, &b"x"[..]).await, Err(Error::ReservedChannel(0xFFFD))));
    assert!(matches!(ba.send_durable_bytes(0xFFFD, &b"x"[..]).await, Err(Error::ReservedChannel(0xFFFD))));
    let too_big = vec![0u8; ba.max_message_size()];
    assert!(matches!(ba.send_durable_bytes(1, too_big).await, Err(Error::MessageTooLarge { .. })));
    // A durable message to a node that keeps no store: that node closes the session, saying
    // why, and the sender keeps the message in its store.
    ba.send_durable(1, &7u32).await.unwrap();
    let e = tokio::time::timeout(WAIT, ab.closed()).await.expect("closed in time");
    assert!(matches!(e, Error::ProtocolViolation { .. }), "{e:?}");
    assert_eq!(stored.store().unwrap().stats().outbox_messages, 1);
}

#[tokio::test]
async fn a_second_node_on_the_same_store_is_refused() {
    let pki = Pki::new("durable");
    let d = tempfile::tempdir().unwrap();
    let _first = bind_with_store(&pki, "a", d.path(), any_port()).await;
    let config = NodeConfig::new(pki.identity("a"), pki.trust()).store(d.path());
    match Node::bind(any_port(), config) {
        Err(Error::Store(StoreError::InUse(path))) => assert!(path.starts_with(d.path())),
        other => panic!("{other:?}"),
    }
}

/// With a store, a node's stateless resets are keyed by the store's secret: a peer of the
/// process before a restart learns of it at its next packet, not after its idle timeout (30 s).
#[tokio::test]
async fn a_restart_on_the_same_store_is_seen_by_the_peer_at_once() {
    let pki = Pki::new("durable");
    let (_da, db, a, b) = stored_pair(&pki).await;
    let (proxy, ab, ba) = connect_via_proxy(&a, &b, "b").await;
    let mut events = ab.events();
    let b_addr = b.local_addr().unwrap();
    // The crash: the link goes dark, so the old process's goodbye (CONNECTION_CLOSE) never
    // reaches a, as with a process that is killed; a new process takes its place.
    proxy.set_blackout(true);
    drop((b, ba));
    let b = bind_with_store(&pki, "b", db.path(), b_addr).await;
    proxy.set_blackout(false);
    let started = tokio::time::Instant::now();
    // a's next packet to the old connection draws a stateless reset from the new process.
    ab.send_bytes(1, &b"are you there"[..]).await.unwrap();
    loop {
        let e =
            tokio::time::timeout(Duration::from_secs(10), events.recv()).await.expect("an event within 10 s").unwrap();
        if let SessionEvent::Disconnected { reason } = e {
            assert!(reason.contains("reset"), "{reason}");
            break;
        }
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    drop(b);
}

/// `quicseal store inspect` lists what a store holds, refuses a store a node has open, and
/// says so when a directory holds no store.
#[tokio::test]
async fn the_cli_inspects_a_store() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = quicseal::store::Store::open(dir.path()).unwrap();
        let peer = quicseal::Fingerprint([0xab; 32]);
        for i in 0..3u8 {
            store.append(peer, 4, bytes::Bytes::from(vec![i; 10])).await.unwrap();
        }
        let stream = quicseal::proto::durable::StreamId([0xcd; 16]);
        store.accept(peer, stream, 1, 5, bytes::Bytes::from_static(b"hello")).await.unwrap();
        let inspect =
            |args: &[&str]| std::process::Command::new(env!("CARGO_BIN_EXE_quicseal")).args(args).output().unwrap();
        // Open here: the command refuses, with a sentence.
        let busy = inspect(&["store", "inspect", dir.path().to_str().unwrap()]);
        assert_eq!(busy.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&busy.stderr).contains("in use by a running node"), "{busy:?}");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_quicseal"))
        .args(["store", "inspect", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains("outbox   3 messages waiting for a receipt"), "{text}");
    assert!(text.contains("inbox    1 messages received, not consumed"), "{text}");
    assert!(
        text.contains(&format!("receiving from peer {}  stream {}  high mark 1", "ab".repeat(32), "cd".repeat(16))),
        "{text}"
    );
    assert!(text.contains("dseq 3  channel 4  10 bytes"), "{text}");
    let json = std::process::Command::new(env!("CARGO_BIN_EXE_quicseal"))
        .args(["store", "inspect", "--json", "--messages", "1", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["outbox_messages"], 3);
    assert_eq!(v["outbox"].as_array().unwrap().len(), 1);
    assert_eq!(v["inbox"][0]["bytes"], 5);
    assert_eq!(v["sending_streams"][0]["next_dseq"], 4);
    let empty = tempfile::tempdir().unwrap();
    let none = std::process::Command::new(env!("CARGO_BIN_EXE_quicseal"))
        .args(["store", "inspect", empty.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(none.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&none.stderr).contains("no quicseal store here"), "{none:?}");
}

/// After the peer restarted, the old session ends ("unknown session"); the node dials a new one
/// by itself for the messages that wait, and the application keeps sending on its old handle.
#[tokio::test]
async fn the_node_dials_a_restarted_peer_again_for_the_messages_that_wait() {
    let pki = Pki::new("durable");
    let (_da, db, a, b) = stored_pair(&pki).await;
    let (proxy, ab, ba) = connect_via_proxy(&a, &b, "b").await;
    for i in 0..5u32 {
        ab.send_durable(3, &i).await.unwrap();
    }
    receive_numbers(&b, 0, 5, true).await;
    let b_addr = b.local_addr().unwrap();
    // A crash: no goodbye gets through; a new process takes the port.
    proxy.set_blackout(true);
    drop((b, ba));
    let b = bind_with_store(&pki, "b", db.path(), b_addr).await;
    proxy.set_blackout(false);
    // The old session's resumption reaches a process that does not know it: it ends.
    let e = tokio::time::timeout(WAIT, ab.closed()).await.expect("the old session ends");
    assert!(
        matches!(
            &e,
            Error::ProtocolViolation { violation: quicseal::proto::violation::Violation::UnknownSession(_), .. }
        ),
        "{e:?}"
    );
    // Sent on the ended session's handle: stored, and carried by a session the node dials.
    for i in 5..10u32 {
        ab.send_durable(3, &i).await.unwrap();
    }
    receive_numbers(&b, 5, 5, true).await;
}
