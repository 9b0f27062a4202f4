//! W8: durable channels (PROTOCOL.md section 10), quicseal only (neither baseline has them):
//! next to W2's in-memory channels, the same message sizes with 1 and 64 sends in flight, each
//! message on disk at the sender before its send returns and consumed (another durable write)
//! by the receiving application; the fsyncs that cost per message; and the time a store holding
//! many unacknowledged messages takes to open and be read back, as after a crash.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use quicseal::store::Store;
use quicseal::{Fingerprint, Node, NodeConfig};
use tokio::sync::Semaphore;

use crate::stacks::{Pki, loopback};

/// What one W8 run measured.
pub(crate) struct Durable {
    /// Messages per second, from the first send to the last message consumed.
    pub(crate) per_second: f64,
    /// Commits (one fsync each) of both stores together, per message.
    pub(crate) fsyncs_per_message: f64,
}

/// Sends `count` messages of `size` bytes durably from one node to another (stores in temp
/// dirs), at most `window` sends waiting for their commit at once; the receiver consumes each,
/// with at most `window` consumes waiting at once.
pub(crate) async fn durable_stream(pki: &Pki, count: usize, size: usize, window: usize) -> Durable {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Node::bind(loopback(), NodeConfig::new(Pki::identity(&pki.client), pki.trust()).store(da.path())).unwrap();
    let b = Node::bind(loopback(), NodeConfig::new(Pki::identity(&pki.server), pki.trust()).store(db.path())).unwrap();
    let (ab, ba) = tokio::join!(a.connect(b.local_addr().unwrap(), "server"), b.accept());
    let (ab, _ba) = (ab.unwrap(), ba.unwrap());
    let payload = Bytes::from(vec![7u8; size]);
    let commits = |n: &Node| n.store().unwrap().stats().commits;
    let before = commits(&a) + commits(&b);
    let start = Instant::now();
    // The receiving application takes messages in order and consumes them with as many
    // consumes in flight as the sender has sends (each is a durable write, sharing commits).
    let receiver = {
        let b = b.clone();
        tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(window));
            let mut consumes = Vec::with_capacity(count);
            for _ in 0..count {
                let m = b.recv_durable().await.unwrap();
                let permit = slots.clone().acquire_owned().await.unwrap();
                let b = b.clone();
                consumes.push(tokio::spawn(async move {
                    b.consume(&m).await.unwrap();
                    drop(permit);
                }));
            }
            for c in consumes {
                c.await.unwrap();
            }
        })
    };
    let slots = Arc::new(Semaphore::new(window));
    let mut sends = Vec::with_capacity(count);
    for _ in 0..count {
        let permit = slots.clone().acquire_owned().await.unwrap();
        let (ab, payload) = (ab.clone(), payload.clone());
        sends.push(tokio::spawn(async move {
            ab.send_durable_bytes(1, payload).await.unwrap();
            drop(permit);
        }));
    }
    for s in sends {
        s.await.unwrap();
    }
    receiver.await.unwrap();
    let elapsed = start.elapsed();
    let fsyncs = (commits(&a) + commits(&b) - before) as f64;
    Durable { per_second: count as f64 / elapsed.as_secs_f64(), fsyncs_per_message: fsyncs / count as f64 }
}

/// Fills a store with `count` unacknowledged 64 B messages (1,024 appends in flight), closes it,
/// then times opening it again and reading every message back in batches, as a restarted
/// sender does before it resends.
pub(crate) async fn recovery(count: usize) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let peer = Fingerprint([1; 32]);
    {
        let store = Store::open(dir.path()).unwrap();
        let slots = Arc::new(Semaphore::new(1024));
        let mut appends = Vec::with_capacity(count);
        for _ in 0..count {
            let permit = slots.clone().acquire_owned().await.unwrap();
            let store = store.clone();
            appends.push(tokio::spawn(async move {
                store.append(peer, 1, Bytes::from_static(&[7; 64])).await.unwrap();
                drop(permit);
            }));
        }
        for a in appends {
            a.await.unwrap();
        }
    }
    let start = Instant::now();
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.stats().recovered as usize, count);
    let mut next = 0;
    let mut read = 0;
    loop {
        let batch = store.pending(peer, next, 4096).unwrap();
        let Some(last) = batch.last() else { break };
        next = last.dseq + 1;
        read += batch.len();
    }
    assert_eq!(read, count);
    start.elapsed()
}
