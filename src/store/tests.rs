use std::future::Future;
use std::pin::pin;
use std::task::{Context, Waker};

use super::*;

fn peer(n: u8) -> Fingerprint {
    Fingerprint([n; 32])
}

fn stream(n: u8) -> StreamId {
    StreamId([n; 16])
}

fn bytes(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// Polls once: whether the future is still waiting.
fn waits<F: Future>(f: std::pin::Pin<&mut F>) -> bool {
    f.poll(&mut Context::from_waker(Waker::noop())).is_pending()
}

#[tokio::test]
async fn a_senders_stream_and_outbox_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    // (Numbering itself is the contract's test, `each_peer_has_one_stream_numbered_from_one`.)
    let mut sent = Vec::new();
    for text in ["one", "two", "three"] {
        sent.push(store.append(peer(1), 7, bytes(text)).await.unwrap());
    }
    store.append(peer(2), 7, bytes("x")).await.unwrap();
    let secret = store.secret();
    drop(store);

    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.secret(), secret, "the secret is the store's, not the process's");
    assert_eq!(store.stats().recovered, 4);
    assert_eq!(store.stats().outbox_messages, 4);
    assert_eq!(store.pending(peer(1), 1, 100).unwrap(), sent);
    assert_eq!(store.pending(peer(1), 3, 100).unwrap(), sent[2..]);
    assert_eq!(store.pending(peer(1), 1, 2).unwrap(), sent[..2]);
    let next = store.append(peer(1), 8, bytes("four")).await.unwrap();
    assert_eq!((next.stream, next.dseq), (sent[0].stream, 4), "numbering carries on, never reused");
}

#[tokio::test]
async fn a_receipt_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut sent = Vec::new();
    for i in 0..5 {
        sent.push(store.append(peer(1), 1, Bytes::from(vec![i; 10])).await.unwrap());
    }
    assert_eq!(store.receipt(peer(1), sent[0].stream, 3).await.unwrap(), 3);
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.pending(peer(1), 1, 100).unwrap(), sent[3..]);
    assert_eq!((store.stats().outbox_messages, store.stats().outbox_bytes), (2, 20));
}

#[tokio::test]
async fn the_receiver_takes_each_message_once_in_order_across_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let a = |d: u64| store.accept(peer(1), stream(1), d, 3, bytes(&format!("m{d}")));
    assert_eq!(a(2).await.unwrap(), Accepted { arrival: Arrival::Gap { expected: 1 }, high: 0 });
    assert_eq!(a(1).await.unwrap(), Accepted { arrival: Arrival::Next, high: 1 });
    assert_eq!(a(1).await.unwrap(), Accepted { arrival: Arrival::Duplicate, high: 1 });
    assert_eq!(a(3).await.unwrap(), Accepted { arrival: Arrival::Gap { expected: 2 }, high: 1 });
    assert_eq!(a(2).await.unwrap(), Accepted { arrival: Arrival::Next, high: 2 });
    assert_eq!(store.stats().inbox_messages, 2);
    assert_eq!(store.stats().gaps, 2);
    drop(store);

    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.high_mark(peer(1), stream(1)).unwrap(), Some(2));
    for d in [1, 2] {
        let again = store.accept(peer(1), stream(1), d, 3, bytes("resent")).await.unwrap();
        assert_eq!(again, Accepted { arrival: Arrival::Duplicate, high: 2 }, "a copy after a restart");
    }
    let inbox = store.inbox(None, 100).unwrap();
    assert_eq!(
        inbox.iter().map(|m| (m.dseq, m.payload.clone())).collect::<Vec<_>>(),
        [(1, bytes("m1")), (2, bytes("m2"))]
    );
}

const APPLIED: TableDefinition<u64, u64> = TableDefinition::new("app_applied");

#[tokio::test]
async fn consuming_with_the_applications_writes_keeps_both_or_neither() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    for d in 1..=2 {
        store.accept(peer(1), stream(1), d, 0, bytes("x")).await.unwrap();
    }
    let inbox = store.inbox(None, 10).unwrap();
    let n = store
        .consume_with(&inbox[0], |txn| {
            let mut t = txn.open_table(APPLIED).map_err(|e| engine_error(Path::new("test"), e.into()))?;
            t.insert(1, 100).map_err(|e| engine_error(Path::new("test"), e.into()))?;
            Ok(1)
        })
        .await
        .unwrap();
    assert_eq!(n, 1);
    // An application error after a write of its own: neither that write nor the removal.
    let e = store
        .consume_with(&inbox[1], |txn| -> Result<(), StoreError> {
            let mut t = txn.open_table(APPLIED).map_err(|e| engine_error(Path::new("test"), e.into()))?;
            t.insert(2, 200).map_err(|e| engine_error(Path::new("test"), e.into()))?;
            Err(StoreError::Closed)
        })
        .await
        .unwrap_err();
    assert_eq!(e, StoreError::Closed);
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.inbox(None, 10).unwrap(), inbox[1..]);
    let r = store.inner.db.begin_read().unwrap();
    let t = r.open_table(APPLIED).unwrap();
    assert_eq!(t.get(1).unwrap().map(|v| v.value()), Some(100));
    assert_eq!(t.get(2).unwrap().map(|v| v.value()), None);
}

#[tokio::test]
async fn concurrent_writes_share_commits() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let before = store.stats();
    let appends = (0..64).map(|i| store.append(peer(1), 1, Bytes::from(vec![i as u8; 64])));
    let sent = futures_util::future::join_all(appends).await;
    let mut dseqs: Vec<u64> = sent.into_iter().map(|m| m.unwrap().dseq).collect();
    dseqs.sort_unstable();
    assert_eq!(dseqs, (1..=64).collect::<Vec<_>>());
    let after = store.stats();
    let commits = after.commits - before.commits;
    assert_eq!(after.writes - before.writes, 64);
    // All 64 are queued before the first fsync ends: a handful of commits, not 64.
    assert!(commits <= 8, "{commits} commits for 64 concurrent writes");
    assert!(after.largest_group >= 8, "{after:?}");
}

#[test]
fn a_store_in_use_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Store::open(dir.path()).unwrap();
    let second = Store::open(dir.path()).expect_err("a second open");
    assert_eq!(second, StoreError::InUse(dir.path().join(FILE_NAME)));
}

#[test]
fn a_file_that_is_not_a_store_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(FILE_NAME), b"this is not a database, it is a text file\n").unwrap();
    let e = Store::open(dir.path()).expect_err("refused");
    assert!(matches!(e, StoreError::Corrupted { .. }), "{e:?}");
}

/// A store cut at any byte (a torn write, a full disk) or with a byte changed opens as a
/// consistent earlier state or is refused with a typed error: never a panic, never a half
/// commit.
#[test]
fn a_torn_or_damaged_file_is_recovered_or_refused_never_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let sent = runtime.block_on(async {
        let store = Store::open(dir.path()).unwrap();
        let mut sent = Vec::new();
        for i in 0..50u8 {
            sent.push(store.append(peer(1), 1, Bytes::from(vec![i; 100])).await.unwrap());
        }
        sent
    });
    let whole = std::fs::read(dir.path().join(FILE_NAME)).unwrap();
    let mut rng = crate::proto::test_rng::Rng::new(0x5eed);
    let (mut opened, mut refused) = (0, 0);
    for round in 0..60 {
        let mut bytes = whole.clone();
        if round % 2 == 0 {
            bytes.truncate(rng.below(whole.len() as u64) as usize);
        } else {
            let at = rng.below(whole.len() as u64) as usize;
            bytes[at] ^= 1 << rng.below(8);
        }
        let case = tempfile::tempdir().unwrap();
        std::fs::write(case.path().join(FILE_NAME), &bytes).unwrap();
        let outcome = std::panic::catch_unwind(|| match Store::open(case.path()) {
            Ok(store) => {
                // Whatever it recovered is a prefix of what was sent, in order, intact.
                let got = store.pending(peer(1), 1, 1000).map_err(|e| format!("{e}"))?;
                if got[..] != sent[..got.len()] {
                    return Err(format!("not a prefix: {} messages", got.len()));
                }
                Ok(true)
            }
            Err(StoreError::Corrupted { .. } | StoreError::Io { .. }) => Ok(false),
            Err(e) => Err(format!("unexpected error {e:?}")),
        });
        match outcome {
            Ok(Ok(true)) => opened += 1,
            Ok(Ok(false)) => refused += 1,
            Ok(Err(e)) => panic!("round {round}: {e}"),
            Err(_) => panic!("round {round}: the store panicked on a damaged file"),
        }
    }
    eprintln!("{opened} damaged files opened as an earlier state, {refused} refused");
    assert_eq!(opened + refused, 60);
}

/// The [`DurableStore`] contract, checked on both backends through the trait alone.
mod contract {
    use super::*;

    /// A store of one backend, and the directory it lives in (if any) to keep until the end.
    type Made = (Arc<dyn DurableStore>, Option<tempfile::TempDir>);

    fn disk(limits: StoreLimits) -> Made {
        let dir = tempfile::tempdir().unwrap();
        (Arc::new(Store::open_with(dir.path(), limits).unwrap()), Some(dir))
    }

    fn memory(limits: StoreLimits) -> Made {
        (Arc::new(MemoryStore::with_limits(limits).unwrap()), None)
    }

    fn message(p: u8, s: u8, dseq: u64, text: &str) -> Stored {
        Stored { peer: peer(p), stream: stream(s), dseq, channel: 3, payload: bytes(text) }
    }

    async fn accept(store: &dyn DurableStore, m: Stored) -> Accepted {
        store.accept_in_order(m, Box::new(|_| {})).await.unwrap()
    }

    async fn each_peer_has_one_stream_numbered_from_one(make: fn(StoreLimits) -> Made) {
        let (store, _dir) = make(StoreLimits::default());
        let mut sent = Vec::new();
        for text in ["one", "two", "three"] {
            sent.push(store.append(peer(1), 7, bytes(text)).await.unwrap());
        }
        assert_eq!(sent.iter().map(|m| m.dseq).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(sent.iter().all(|m| m.stream == sent[0].stream && m.stream.0 != [0; 16]));
        let other = store.append(peer(2), 7, bytes("x")).await.unwrap();
        assert_ne!(other.stream, sent[0].stream, "another peer has a stream of its own");
        assert_eq!(other.dseq, 1);
        assert_eq!(store.pending(peer(1), 1, 100).unwrap(), sent);
        assert_eq!(store.pending(peer(1), 3, 100).unwrap(), sent[2..]);
        assert_eq!(store.pending(peer(1), 1, 2).unwrap(), sent[..2]);
        assert_eq!(store.pending(peer(3), 1, 100).unwrap(), []);
        assert_eq!(store.stats().outbox_messages, 4);
    }

    async fn a_receipt_removes_what_it_covers_of_the_current_stream(make: fn(StoreLimits) -> Made) {
        let (store, _dir) = make(StoreLimits::default());
        let mut sent = Vec::new();
        for i in 0..5 {
            sent.push(store.append(peer(1), 1, Bytes::from(vec![i; 10])).await.unwrap());
        }
        let s = sent[0].stream;
        assert_eq!(store.receipt(peer(1), stream(9), 5).await.unwrap(), 0, "another stream's receipt");
        assert_eq!(store.receipt(peer(2), s, 5).await.unwrap(), 0, "another peer's receipt");
        assert_eq!(store.receipt(peer(1), s, 3).await.unwrap(), 3);
        assert_eq!(store.receipt(peer(1), s, 3).await.unwrap(), 0, "a repeated receipt");
        assert_eq!(store.pending(peer(1), 1, 100).unwrap(), sent[3..]);
        assert_eq!((store.stats().outbox_messages, store.stats().outbox_bytes), (2, 20));
    }

    async fn the_receiver_takes_only_the_next_message_of_a_stream(make: fn(StoreLimits) -> Made) {
        let (store, _dir) = make(StoreLimits::default());
        let store = &*store;
        let a = |d: u64| accept(store, message(1, 1, d, &format!("m{d}")));
        assert_eq!(a(2).await, Accepted { arrival: Arrival::Gap { expected: 1 }, high: 0 });
        assert_eq!(a(1).await, Accepted { arrival: Arrival::Next, high: 1 });
        assert_eq!(a(1).await, Accepted { arrival: Arrival::Duplicate, high: 1 });
        assert_eq!(a(3).await, Accepted { arrival: Arrival::Gap { expected: 2 }, high: 1 });
        assert_eq!(a(2).await, Accepted { arrival: Arrival::Next, high: 2 });
        assert_eq!((store.stats().inbox_messages, store.stats().gaps), (2, 2));
        let inbox = store.inbox(None, 100).unwrap();
        assert_eq!(
            inbox.iter().map(|m| (m.dseq, m.payload.clone())).collect::<Vec<_>>(),
            [(1, bytes("m1")), (2, bytes("m2"))]
        );
        assert_eq!(store.inbox(Some((peer(1), stream(1), 1)), 100).unwrap(), inbox[1..]);
        store.consume(&inbox[0]).await.unwrap();
        assert_eq!(store.inbox(None, 100).unwrap(), inbox[1..]);
        assert_eq!(store.stats().inbox_messages, 1);
        // Consumed is not forgotten: the high mark stays, so a late copy is still a copy.
        assert_eq!(a(1).await.arrival, Arrival::Duplicate);
    }

    async fn a_full_outbox_holds_the_sender_until_a_receipt(make: fn(StoreLimits) -> Made) {
        let (store, _dir) = make(StoreLimits { outbox_messages: 2, ..StoreLimits::default() });
        let first = store.append(peer(1), 1, bytes("a")).await.unwrap();
        store.append(peer(1), 1, bytes("b")).await.unwrap();
        assert!(!store.has_room(true, 0));
        let mut third = pin!(store.append(peer(1), 1, bytes("c")));
        assert!(waits(third.as_mut()), "the outbox is full");
        assert!(waits(third.as_mut()), "still full");
        store.receipt(peer(1), first.stream, 1).await.unwrap();
        assert_eq!(third.await.unwrap().dseq, 3);
    }

    async fn a_full_inbox_has_room_again_once_the_application_consumes(make: fn(StoreLimits) -> Made) {
        let (store, _dir) = make(StoreLimits { inbox_bytes: 10, ..StoreLimits::default() });
        assert!(store.has_room(false, 1 << 20), "one message always fits into an empty inbox");
        accept(&*store, message(1, 1, 1, "12345678")).await;
        assert!(store.has_room(false, 2) && !store.has_room(false, 3));
        let mut room = pin!(store.wait_for_room(false, 8));
        assert!(waits(room.as_mut()));
        let inbox = store.inbox(None, 10).unwrap();
        store.consume(&inbox[0]).await.unwrap();
        room.await;
        assert!(store.has_room(false, 8));
    }

    async fn a_peer_starting_streams_pushes_out_only_its_own_oldest(make: fn(StoreLimits) -> Made) {
        let (store, _dir) = make(StoreLimits::default());
        accept(&*store, message(2, 1, 1, "other peer")).await;
        for s in 1..=STREAMS_PER_PEER as u8 + 2 {
            accept(&*store, message(1, s, 1, "x")).await;
        }
        // A forgotten stream takes only 1 again (a gap otherwise); a known one takes its next.
        for (p, s, expected) in [(1, 1, 1), (1, 2, 1), (1, 3, 2), (1, STREAMS_PER_PEER as u8 + 2, 2), (2, 1, 2)] {
            let a = accept(&*store, message(p, s, 3, "probe")).await;
            assert_eq!(a.arrival, Arrival::Gap { expected }, "peer {p}, stream {s}");
        }
    }

    /// The receiver hands messages over from the commit hook: hooks run in commit order, so a
    /// stream's messages come out in `dseq` order even when two sessions (two tasks) queue them.
    async fn commit_hooks_run_in_commit_order(make: fn(StoreLimits) -> Made) {
        let (store, _dir) = make(StoreLimits::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waits = Vec::new();
        for d in 1..=200u64 {
            let order = order.clone();
            let hook = Box::new(move |a: &Accepted| order.lock().unwrap().push((d, a.arrival)));
            waits.push(store.accept_in_order(message(1, 1, d, "x"), hook));
        }
        // The waiters are polled in reverse: their tasks may run in any order, the hooks do not.
        for w in waits.into_iter().rev() {
            w.await.unwrap();
        }
        let order = order.lock().unwrap();
        assert_eq!(order.iter().map(|(d, _)| *d).collect::<Vec<_>>(), (1..=200).collect::<Vec<_>>());
        assert!(order.iter().all(|(_, a)| *a == Arrival::Next));
    }

    /// Each contract test, once per backend.
    macro_rules! on_both_backends {
        ($($name:ident),* $(,)?) => {$(
            mod $name {
                #[tokio::test]
                async fn on_disk() {
                    super::$name(super::disk).await
                }
                #[tokio::test]
                async fn in_memory() {
                    super::$name(super::memory).await
                }
            }
        )*};
    }

    on_both_backends!(
        each_peer_has_one_stream_numbered_from_one,
        a_receipt_removes_what_it_covers_of_the_current_stream,
        the_receiver_takes_only_the_next_message_of_a_stream,
        a_full_outbox_holds_the_sender_until_a_receipt,
        a_full_inbox_has_room_again_once_the_application_consumes,
        a_peer_starting_streams_pushes_out_only_its_own_oldest,
        commit_hooks_run_in_commit_order,
    );
}

/// Retention: nothing acknowledged stays, and the file does not grow with traffic that is
/// acknowledged (redb reuses the pages freed): ten rounds move 10 MiB of payload through the
/// store, whose backlog is at most 0.5 MiB at a time. (The file's size moves with how writes
/// happen to group into commits, so it is bounded, not compared round by round.)
#[tokio::test]
async fn acknowledged_messages_are_not_kept_and_their_space_is_reused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let size = || std::fs::metadata(store.path()).unwrap().len();
    let mut sizes = Vec::new();
    for round in 0..10u64 {
        let appends = (0..500).map(|_| store.append(peer(1), 1, Bytes::from(vec![7; 1024])));
        let sent: Vec<Stored> = futures_util::future::join_all(appends).await.into_iter().map(|m| m.unwrap()).collect();
        let last = sent.iter().map(|m| m.dseq).max().unwrap();
        assert_eq!(store.receipt(peer(1), sent[0].stream, last).await.unwrap(), 500);
        for d in 1..=500 {
            let m = Stored {
                peer: peer(2),
                stream: stream(1),
                dseq: round * 500 + d,
                channel: 0,
                payload: Bytes::from(vec![9; 1024]),
            };
            assert_eq!(
                store.accept(m.peer, m.stream, m.dseq, 0, m.payload.clone()).await.unwrap().arrival,
                Arrival::Next
            );
            store.consume(&m).await.unwrap();
        }
        sizes.push(size());
    }
    let i = store.inspect().unwrap();
    assert_eq!((i.outbox_len, i.inbox_len), (0, 0));
    assert_eq!((i.out_streams.len(), i.in_streams.len()), (1, 1));
    println!("file size after each round of 500 + 500 acknowledged 1 KiB messages: {sizes:?}");
    let largest = sizes.iter().copied().max().unwrap();
    assert!(largest <= 3 << 20, "the file grows with acknowledged traffic: {sizes:?}");
}
