//! [`MemoryStore`]: the [`DurableStore`] contract kept in memory.

use std::any::Any;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::Notify;

use super::{
    Accepted, Counts, DurableStore, InKey, OnCommit, OutKey, StoreError, StoreFuture, StoreLimits, StoreStats, Stored,
    streams_after_use,
};
use crate::identity::Fingerprint;
use crate::proto::durable::{Arrival, StreamId, judge};

/// A store that keeps everything in memory: durable channels with receipts, ordering and
/// exactly-once delivery **while both processes live**, and nothing across a restart (a
/// restarted process starts a new stream, and what its outbox and inbox held is gone). For
/// tests, for messages that may be lost with the process, and as the model of the
/// [`DurableStore`] contract.
///
/// Its secret is drawn at random when it is made, so its node's stateless resets are not
/// recognised after a restart either. [`StoreStats::commits`] stays 0 (nothing is synced);
/// every operation counts as a write of its own.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    limits: StoreLimits,
    secret: [u8; 32],
    state: Mutex<State>,
    counts: Counts,
    /// Woken when the outbox or the inbox shrinks.
    room: Notify,
}

/// The same tables as the store on disk (see `src/store.rs`).
#[derive(Default)]
struct State {
    out_streams: BTreeMap<[u8; 32], ([u8; 16], u64)>,
    outbox: BTreeMap<OutKey, (u16, Bytes)>,
    in_streams: BTreeMap<([u8; 32], [u8; 16]), (u64, u64)>,
    inbox: BTreeMap<InKey, (u16, Bytes)>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore").field("limits", &self.inner.limits).finish()
    }
}

impl MemoryStore {
    /// An empty store with default limits.
    pub fn new() -> Result<MemoryStore, StoreError> {
        MemoryStore::with_limits(StoreLimits::default())
    }

    /// An empty store with limits of its own.
    pub fn with_limits(limits: StoreLimits) -> Result<MemoryStore, StoreError> {
        let secret = random::<32>()?;
        Ok(MemoryStore {
            inner: Arc::new(Inner {
                limits,
                secret,
                state: Mutex::default(),
                counts: Counts::default(),
                room: Notify::new(),
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wrote(&self) {
        let c = &self.inner.counts;
        c.writes.fetch_add(1, Ordering::Relaxed);
        c.largest_group.store(1, Ordering::Relaxed);
    }

    fn stored(((peer, dseq), (channel, payload)): (&OutKey, &(u16, Bytes)), stream: [u8; 16]) -> Stored {
        Stored {
            peer: Fingerprint(*peer),
            stream: StreamId(stream),
            dseq: *dseq,
            channel: *channel,
            payload: payload.clone(),
        }
    }
}

fn random<const N: usize>() -> Result<[u8; N], StoreError> {
    let mut b = [0u8; N];
    while b == [0; N] {
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
            .map_err(|_| StoreError::Io { path: "memory".into(), reason: "the system RNG failed".into() })?;
    }
    Ok(b)
}

impl DurableStore for MemoryStore {
    fn limits(&self) -> StoreLimits {
        self.inner.limits
    }

    fn secret(&self) -> [u8; 32] {
        self.inner.secret
    }

    fn stats(&self) -> StoreStats {
        self.inner.counts.stats()
    }

    fn append(&self, peer: Fingerprint, channel: u16, payload: Bytes) -> StoreFuture<Stored> {
        let this = self.clone();
        Box::pin(async move {
            this.wait_for_room(true, payload.len()).await;
            let fresh = random::<16>()?;
            let len = payload.len() as u64;
            let stored = {
                let mut state = this.state();
                let (stream, dseq) = state.out_streams.get(&peer.0).copied().unwrap_or((fresh, 1));
                state.out_streams.insert(peer.0, (stream, dseq + 1));
                state.outbox.insert((peer.0, dseq), (channel, payload.clone()));
                Stored { peer, stream: StreamId(stream), dseq, channel, payload }
            };
            let c = &this.inner.counts;
            c.outbox_messages.fetch_add(1, Ordering::Relaxed);
            c.outbox_bytes.fetch_add(len, Ordering::Relaxed);
            this.wrote();
            Ok(stored)
        })
    }

    fn pending(&self, peer: Fingerprint, from: u64, max: usize) -> Result<Vec<Stored>, StoreError> {
        let state = self.state();
        let Some(&(stream, _)) = state.out_streams.get(&peer.0) else { return Ok(Vec::new()) };
        Ok(state.outbox.range((peer.0, from)..=(peer.0, u64::MAX)).take(max).map(|e| Self::stored(e, stream)).collect())
    }

    fn receipt(&self, peer: Fingerprint, stream: StreamId, dseq: u64) -> StoreFuture<u64> {
        let (n, bytes) = {
            let mut state = self.state();
            if state.out_streams.get(&peer.0).map(|s| s.0) != Some(stream.0) {
                (0, 0)
            } else {
                let covered: Vec<_> = state.outbox.range((peer.0, 0)..=(peer.0, dseq)).map(|(k, _)| *k).collect();
                let mut bytes = 0;
                for k in &covered {
                    bytes += state.outbox.remove(k).map_or(0, |(_, p)| p.len() as u64);
                }
                (covered.len() as u64, bytes)
            }
        };
        let c = &self.inner.counts;
        c.outbox_messages.fetch_sub(n, Ordering::Relaxed);
        c.outbox_bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.wrote();
        if n > 0 {
            self.inner.room.notify_waiters();
        }
        Box::pin(std::future::ready(Ok(n)))
    }

    fn accept_in_order(&self, m: Stored, committed: OnCommit) -> StoreFuture<Accepted> {
        // Decided and handed over under the lock: call order is commit order.
        let mut state = self.state();
        let high = state.in_streams.get(&(m.peer.0, m.stream.0)).map(|v| v.0);
        let arrival = judge(high, m.dseq);
        let accepted = if arrival == Arrival::Next {
            let used = state.in_streams.range((m.peer.0, [0; 16])..=(m.peer.0, [0xff; 16])).map(|(k, v)| (k.1, v.1));
            let (forget, order) = streams_after_use(used.collect::<Vec<_>>(), m.stream);
            if let Some(old) = forget {
                state.in_streams.remove(&(m.peer.0, old));
            }
            state.in_streams.insert((m.peer.0, m.stream.0), (m.dseq, order));
            let c = &self.inner.counts;
            c.inbox_messages.fetch_add(1, Ordering::Relaxed);
            c.inbox_bytes.fetch_add(m.payload.len() as u64, Ordering::Relaxed);
            state.inbox.insert((m.peer.0, m.stream.0, m.dseq), (m.channel, m.payload));
            self.wrote();
            Accepted { arrival, high: m.dseq }
        } else {
            if let Arrival::Gap { .. } = arrival {
                self.inner.counts.gaps.fetch_add(1, Ordering::Relaxed);
            }
            Accepted { arrival, high: high.unwrap_or(0) }
        };
        committed(&accepted);
        drop(state);
        Box::pin(std::future::ready(Ok(accepted)))
    }

    fn inbox(&self, after: Option<(Fingerprint, StreamId, u64)>, max: usize) -> Result<Vec<Stored>, StoreError> {
        let state = self.state();
        let from = after.map_or(([0; 32], [0; 16], 0), |(p, s, d)| (p.0, s.0, d));
        let out = state
            .inbox
            .range(from..)
            .filter(|(k, _)| after.is_none() || **k != from)
            .take(max)
            .map(|(&(peer, stream, dseq), (channel, payload))| Stored {
                peer: Fingerprint(peer),
                stream: StreamId(stream),
                dseq,
                channel: *channel,
                payload: payload.clone(),
            })
            .collect();
        Ok(out)
    }

    fn consume(&self, message: &Stored) -> StoreFuture<()> {
        let removed = self.state().inbox.remove(&(message.peer.0, message.stream.0, message.dseq));
        if let Some((_, payload)) = removed {
            let c = &self.inner.counts;
            c.inbox_messages.fetch_sub(1, Ordering::Relaxed);
            c.inbox_bytes.fetch_sub(payload.len() as u64, Ordering::Relaxed);
            self.inner.room.notify_waiters();
        }
        self.wrote();
        Box::pin(std::future::ready(Ok(())))
    }

    fn has_room(&self, outbox: bool, len: usize) -> bool {
        self.inner.counts.has_room(&self.inner.limits, outbox, len)
    }

    fn wait_for_room(&self, outbox: bool, len: usize) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        let this = self.clone();
        Box::pin(async move { crate::wait::until(&this.inner.room, || this.has_room(outbox, len)).await })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
