//! The embedded store behind durable channels (PROTOCOL.md section 10): the sender's streams
//! and outbox, the receiver's high marks and inbox, and the node's stable secret, in one
//! [redb](https://docs.rs/redb) file.
//!
//! Every write that must survive a crash goes through one **committer** thread, which gathers
//! whatever writes are waiting into one transaction and makes it durable with one fsync (group
//! commit): with many writes in flight, each costs a share of one fsync rather than one each.
//! A write's future completes only after its transaction is on disk. redb writes each commit
//! with checksums into the inactive of two commit slots and flips between them, so a crash or a
//! torn write leaves the last complete commit; a file that is damaged beyond that is refused
//! with [`StoreError::Corrupted`], never a panic.
//!
//! Sizes are bounded ([`StoreLimits`]): an outbox at its limit makes a durable send wait for
//! receipts; an inbox at its limit makes the receiver stop taking durable messages, so the
//! sender is held back by flow control.
//!
//! **Retention.** Nothing acknowledged is kept: a RECEIPT removes the messages it covers from
//! the sender's outbox, and consuming a message removes it from the receiver's inbox, each in
//! the same transaction that records it. What stays is one stream record per peer on the
//! sending side and [`STREAMS_PER_PEER`] high marks per peer on the receiving side. redb
//! reuses the pages freed, so a store's file stays the size of its largest backlog.
//!
//! **Other backends.** Durable channels reach their store through the [`DurableStore`] trait:
//! [`Store`] (this module's redb store) and [`MemoryStore`] (nothing on disk: for tests, and
//! for delivery that needs receipts but not restarts) implement it, and
//! [`NodeConfig::store_backend`](crate::NodeConfig::store_backend) takes any other.

use std::any::Any;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use bytes::Bytes;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};
use tokio::sync::{Notify, oneshot};

use crate::identity::Fingerprint;
use crate::proto::durable::{Arrival, StreamId, judge};

/// The storage engine, re-exported: [`Store::consume_with`] and [`Store::write_with`] hand the
/// application a [`redb::WriteTransaction`] for tables of its own.
pub use redb;

/// The file a store keeps in its directory.
pub const FILE_NAME: &str = "quicseal.redb";

/// Stream ids of the store's version, and the node's stable secret.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// Sender: peer names digest -> (stream id, next dseq).
const OUT_STREAMS: TableDefinition<[u8; 32], ([u8; 16], u64)> = TableDefinition::new("out_streams");
/// Sender: (peer, dseq) -> (application channel, payload), until a receipt covers it.
const OUTBOX: TableDefinition<OutKey, Entry> = TableDefinition::new("outbox");
/// Receiver: (peer, stream) -> (high mark, last use): the last use orders streams for eviction.
const IN_STREAMS: TableDefinition<([u8; 32], [u8; 16]), (u64, u64)> = TableDefinition::new("in_streams");
/// Receiver: (peer, stream, dseq) -> (application channel, payload), until the application
/// consumes it.
const INBOX: TableDefinition<InKey, Entry> = TableDefinition::new("inbox");

/// Outbox key: (peer names digest, dseq).
type OutKey = ([u8; 32], u64);
/// Inbox key: (peer names digest, stream id, dseq).
type InKey = ([u8; 32], [u8; 16], u64);
/// A stored message: (application channel, payload).
type Entry = (u16, &'static [u8]);

/// The layout version in META; a store of another version is refused, not misread.
const VERSION: &[u8] = b"1";

/// High marks kept per peer (PROTOCOL.md section 10): a peer that keeps starting new streams
/// pushes out its own oldest, not other peers'.
pub const STREAMS_PER_PEER: usize = 16;

/// Most writes gathered into one transaction.
const MAX_GROUP: usize = 1024;

/// Bounds of a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreLimits {
    /// Most messages waiting for a receipt, all peers together; a durable send waits beyond.
    pub outbox_messages: usize,
    /// Most payload bytes waiting for a receipt.
    pub outbox_bytes: usize,
    /// Most messages received and not yet consumed; the receiver stops taking more beyond.
    pub inbox_messages: usize,
    /// Most payload bytes received and not yet consumed.
    pub inbox_bytes: usize,
}

impl Default for StoreLimits {
    /// 1,000,000 messages and 1 GiB each way.
    fn default() -> StoreLimits {
        StoreLimits {
            outbox_messages: 1_000_000,
            outbox_bytes: 1 << 30,
            inbox_messages: 1_000_000,
            inbox_bytes: 1 << 30,
        }
    }
}

/// Why the store failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The file is damaged beyond the last complete commit, or is not a quicseal store.
    #[error("store {path} is damaged or not a quicseal store: {reason}")]
    Corrupted {
        /// The store's file.
        path: PathBuf,
        /// What the engine said.
        reason: String,
    },
    /// Another process (or another store in this one) has the file open.
    #[error("store {0} is in use by another process")]
    InUse(PathBuf),
    /// Reading or writing failed (disk full, permissions, I/O error).
    #[error("store {path}: {reason}")]
    Io {
        /// The store's file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// The store was closed.
    #[error("store closed")]
    Closed,
}

/// Counters of a store, totals since it was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreStats {
    /// Commits, one fsync each (none while [`Store::set_fsync`] has it off).
    pub commits: u64,
    /// Writes made durable, over all commits: `writes / commits` is the mean group size.
    pub writes: u64,
    /// The largest group committed at once.
    pub largest_group: u64,
    /// Messages found in the outbox and inbox when the store was opened.
    pub recovered: u64,
    /// DATA frames dropped as gaps: not the next of their stream (PROTOCOL.md section 10; the
    /// sign of a receiver store that lost a stream's state).
    pub gaps: u64,
    /// Messages waiting for a receipt now.
    pub outbox_messages: u64,
    /// Their payload bytes.
    pub outbox_bytes: u64,
    /// Messages received and not consumed now.
    pub inbox_messages: u64,
    /// Their payload bytes.
    pub inbox_bytes: u64,
}

/// A message in a store: the sender's outbox, or the receiver's inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The peer: its certificate's names digest.
    pub peer: Fingerprint,
    /// The stream.
    pub stream: StreamId,
    /// Its sequence number in the stream.
    pub dseq: u64,
    /// The application channel.
    pub channel: u16,
    /// The application's bytes.
    pub payload: Bytes,
}

impl Stored {
    /// A message as a table holds it: (channel, payload) under (peer, stream, dseq).
    fn read(peer: [u8; 32], stream: [u8; 16], dseq: u64, (channel, payload): (u16, &[u8])) -> Stored {
        Stored {
            peer: Fingerprint(peer),
            stream: StreamId(stream),
            dseq,
            channel,
            payload: Bytes::copy_from_slice(payload),
        }
    }
}

/// What a receiver did with a DATA frame ([`Store::accept`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// The decision.
    pub arrival: Arrival,
    /// The stream's high mark after it (what a RECEIPT carries); 0 if the stream is unknown.
    pub high: u64,
}

/// A store operation in progress: `'static`, so any task may await it.
pub type StoreFuture<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'static>>;

/// Runs once a receiver's decision is durable ([`DurableStore::accept_in_order`]).
pub type OnCommit = Box<dyn FnOnce(&Accepted) + Send + 'static>;

/// What durable channels need of a store (PROTOCOL.md section 10). [`Store`] is the one on
/// disk; [`MemoryStore`] keeps everything in memory. A backend of one's own must keep the
/// contract below, on which exactly-once delivery rests; `src/store/tests.rs` has the tests
/// both built-in backends pass, which a new one should pass too.
///
/// - **Durable before done**: a future completes only once what it wrote survives the
///   process (for a backend on disk: after fsync).
/// - **Sender**: each peer has one stream (a random, non-zero [`StreamId`], made on the first
///   append) whose messages are numbered from 1 without gaps or reuse; the outbox keeps each
///   message until a RECEIPT of that stream covers it.
/// - **Receiver**: per (peer, stream) a high mark; a message is taken only if it is the next
///   ([`judge`]), and then the message and the new high mark are written together. A peer
///   holds at most [`STREAMS_PER_PEER`] high marks: a new stream beyond that forgets the
///   peer's least recently used one (never another peer's).
/// - **Order**: [`DurableStore::accept_in_order`] decides in call order, and runs the hooks in
///   commit order, before the next decision is made.
/// - **Bounds**: [`StoreLimits`]; appends wait for room in the outbox; the receiver asks
///   [`DurableStore::has_room`] before it takes a message.
pub trait DurableStore: std::fmt::Debug + Send + Sync + 'static {
    /// The store's bounds.
    fn limits(&self) -> StoreLimits;

    /// 32 bytes that stay the same as long as the store's contents do: the node keys its
    /// stateless resets with them, so a restarted process's resets are recognised.
    fn secret(&self) -> [u8; 32];

    /// Counters and current sizes.
    fn stats(&self) -> StoreStats;

    /// Sender: gives `payload` (for application channel `channel`) the next sequence number of
    /// the stream to `peer` and puts it in the outbox; completes once durable. Waits while the
    /// outbox is full.
    fn append(&self, peer: Fingerprint, channel: u16, payload: Bytes) -> StoreFuture<Stored>;

    /// Sender: the outbox's messages to `peer`, oldest first, at most `max` of them from
    /// sequence number `from` on.
    fn pending(&self, peer: Fingerprint, from: u64, max: usize) -> Result<Vec<Stored>, StoreError>;

    /// Sender: a RECEIPT from `peer` for `stream` up to `dseq`: removes what it covers (nothing
    /// if `stream` is not the peer's current one). Completes with how many were removed.
    fn receipt(&self, peer: Fingerprint, stream: StreamId, dseq: u64) -> StoreFuture<u64>;

    /// Receiver: a DATA frame, decided at once in call order (see the trait docs); `committed`
    /// runs with the decision once it is durable, in commit order. Does not wait for room.
    fn accept_in_order(&self, message: Stored, committed: OnCommit) -> StoreFuture<Accepted>;

    /// Receiver: messages taken and not yet consumed, in (peer, stream, dseq) order, at most
    /// `max`, after `after` if given.
    fn inbox(&self, after: Option<(Fingerprint, StreamId, u64)>, max: usize) -> Result<Vec<Stored>, StoreError>;

    /// Receiver: the application is done with `message`: removes it from the inbox, durably.
    fn consume(&self, message: &Stored) -> StoreFuture<()>;

    /// Whether the outbox (or the inbox) has room for one more message of `len` bytes now.
    fn has_room(&self, outbox: bool, len: usize) -> bool;

    /// Completes once [`DurableStore::has_room`] would say yes.
    fn wait_for_room(&self, outbox: bool, len: usize) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

    /// The backend itself, to reach what only it offers (e.g. [`Store::consume_with`]).
    fn as_any(&self) -> &dyn Any;
}

/// Whether a box holding `n` messages of `bytes` bytes has room for one more of `len` bytes
/// under `limits`: one message always fits into an empty box, whatever its size.
fn room_in(limits: &StoreLimits, outbox: bool, n: u64, bytes: u64, len: usize) -> bool {
    let (max_n, max_b) = if outbox {
        (limits.outbox_messages, limits.outbox_bytes)
    } else {
        (limits.inbox_messages, limits.inbox_bytes)
    };
    let (n, bytes) = (n as usize, bytes as usize);
    n == 0 || (n < max_n && bytes + len <= max_b)
}

/// The receiver's bookkeeping of one peer's streams when `stream` is taken: which stream the
/// peer must forget for it (its least recently used, once it holds [`STREAMS_PER_PEER`] and
/// `stream` is new), and `stream`'s new order of use (one more than the peer's latest).
/// `streams`: the peer's streams with their order of use.
fn streams_after_use(streams: impl IntoIterator<Item = ([u8; 16], u64)>, stream: StreamId) -> (Option<[u8; 16]>, u64) {
    let (mut latest, mut count, mut known) = (0, 0, false);
    let mut oldest: Option<([u8; 16], u64)> = None;
    for (s, used) in streams {
        latest = latest.max(used);
        count += 1;
        if s == stream.0 {
            known = true;
        } else if oldest.is_none_or(|(_, u)| used < u) {
            oldest = Some((s, used));
        }
    }
    let forget = if !known && count >= STREAMS_PER_PEER { oldest.map(|(s, _)| s) } else { None };
    (forget, latest + 1)
}

/// One write for the committer.
struct Job {
    /// Committed in a transaction of its own: its failure must not take other writes with it
    /// (the application's effects in [`Store::consume_with`]).
    alone: bool,
    /// Writes into the group's transaction (or hears why there is none). `Some`: its writes are
    /// in, and the reply is told how the commit went. `None`: it failed and has told its waiter.
    run: Run,
}

/// Tells a write's waiter how its commit went.
type Reply = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// A write's body (see [`Job::run`]).
type Run = Box<dyn FnOnce(Result<&WriteTransaction, StoreError>) -> Option<Reply> + Send>;

/// A durable store (see the module docs). Cheap to clone; the file is closed when the last
/// clone is dropped.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    db: Arc<Database>,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    /// Joined on drop, so that the file is closed when the last handle is gone (a reopening
    /// right after finds it free).
    committer: Mutex<Option<std::thread::JoinHandle<()>>>,
    limits: StoreLimits,
    secret: [u8; 32],
    counts: Arc<Counts>,
    /// Woken when the outbox shrinks (a receipt) or the inbox does (a consume).
    room: Notify,
    /// Whether commits wait for the disk ([`Store::set_fsync`]); read by the committer.
    fsync: Arc<AtomicBool>,
}

#[derive(Default)]
struct Counts {
    commits: AtomicU64,
    writes: AtomicU64,
    largest_group: AtomicU64,
    recovered: AtomicU64,
    gaps: AtomicU64,
    outbox_messages: AtomicU64,
    outbox_bytes: AtomicU64,
    inbox_messages: AtomicU64,
    inbox_bytes: AtomicU64,
}

impl Counts {
    fn stats(&self) -> StoreStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StoreStats {
            commits: get(&self.commits),
            writes: get(&self.writes),
            largest_group: get(&self.largest_group),
            recovered: get(&self.recovered),
            gaps: get(&self.gaps),
            outbox_messages: get(&self.outbox_messages),
            outbox_bytes: get(&self.outbox_bytes),
            inbox_messages: get(&self.inbox_messages),
            inbox_bytes: get(&self.inbox_bytes),
        }
    }

    fn has_room(&self, limits: &StoreLimits, outbox: bool, len: usize) -> bool {
        let (n, b) = if outbox {
            (&self.outbox_messages, &self.outbox_bytes)
        } else {
            (&self.inbox_messages, &self.inbox_bytes)
        };
        room_in(limits, outbox, n.load(Ordering::Relaxed), b.load(Ordering::Relaxed), len)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue ends the committer thread after its last group; the thread holds
        // the database, which it closes as it ends.
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = self.committer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl Store {
    /// Opens the store in directory `dir` (created if missing), with default limits.
    pub fn open(dir: impl AsRef<Path>) -> Result<Store, StoreError> {
        Store::open_with(dir, StoreLimits::default())
    }

    /// Opens the store in directory `dir` (created if missing).
    pub fn open_with(dir: impl AsRef<Path>, limits: StoreLimits) -> Result<Store, StoreError> {
        let dir = dir.as_ref();
        let path = dir.join(FILE_NAME);
        let io = |e: &dyn std::fmt::Display| StoreError::Io { path: path.clone(), reason: e.to_string() };
        std::fs::create_dir_all(dir).map_err(|e| io(&e))?;
        let db = open_db(&path)?;
        let engine = |e: redb::Error| engine_error(&path, e);
        // Create the tables, check the version, make the secret: one commit.
        let w = db.begin_write().map_err(|e| engine(e.into()))?;
        let secret = {
            let mut meta = w.open_table(META).map_err(|e| engine(e.into()))?;
            let version = meta.get("version").map_err(|e| engine(e.into()))?.map(|v| v.value().to_vec());
            match version {
                None => {
                    meta.insert("version", VERSION).map_err(|e| engine(e.into()))?;
                }
                Some(v) if v == VERSION => {}
                Some(v) => {
                    return Err(StoreError::Corrupted {
                        path: path.clone(),
                        reason: format!("layout version {:?}, this build reads {:?}", String::from_utf8_lossy(&v), "1"),
                    });
                }
            }
            let secret = meta.get("secret").map_err(|e| engine(e.into()))?.map(|v| v.value().to_vec());
            match secret.and_then(|s| <[u8; 32]>::try_from(s.as_slice()).ok()) {
                Some(s) => s,
                None => {
                    let mut s = [0u8; 32];
                    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut s)
                        .map_err(|_| io(&"the system random number generator failed"))?;
                    meta.insert("secret", s.as_slice()).map_err(|e| engine(e.into()))?;
                    s
                }
            }
        };
        w.open_table(OUT_STREAMS).map_err(|e| engine(e.into()))?;
        w.open_table(IN_STREAMS).map_err(|e| engine(e.into()))?;
        let counts = Arc::new(Counts::default());
        {
            let (n, b) = count(&w.open_table(OUTBOX).map_err(|e| engine(e.into()))?).map_err(engine)?;
            counts.outbox_messages.store(n, Ordering::Relaxed);
            counts.outbox_bytes.store(b, Ordering::Relaxed);
            let (m, c) = count(&w.open_table(INBOX).map_err(|e| engine(e.into()))?).map_err(engine)?;
            counts.inbox_messages.store(m, Ordering::Relaxed);
            counts.inbox_bytes.store(c, Ordering::Relaxed);
            counts.recovered.store(n + m, Ordering::Relaxed);
        }
        w.commit().map_err(|e| engine(e.into()))?;
        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel::<Job>();
        let fsync = Arc::new(AtomicBool::new(true));
        let committer = Committer { db: db.clone(), path: path.clone(), counts: counts.clone(), fsync: fsync.clone() };
        let committer = std::thread::Builder::new()
            .name("quicseal-store".into())
            .spawn(move || committer.run(rx))
            .map_err(|e| io(&e))?;
        Ok(Store {
            inner: Arc::new(Inner {
                path,
                db,
                jobs: Mutex::new(Some(tx)),
                committer: Mutex::new(Some(committer)),
                limits,
                secret,
                counts,
                room: Notify::new(),
                fsync,
            }),
        })
    }

    /// The store's limits.
    pub fn limits(&self) -> StoreLimits {
        self.inner.limits
    }

    /// The store's file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// 32 random bytes drawn when the store was created and kept in it: the key material of
    /// the node's stateless resets, so a restarted process's resets are recognised.
    pub fn secret(&self) -> [u8; 32] {
        self.inner.secret
    }

    /// Whether commits wait until the disk has them (fsync); on by default. **Off, a message
    /// that `send_durable` returned `Ok` for is lost if the process dies** (redb goes back to
    /// the last commit that was synced when it opens the file again): this is for data that
    /// may be lost, and for tests that show what the fsync buys (the crash test's control
    /// run, where a sender without it loses messages on every `kill -9`). Takes effect from
    /// the next commit.
    pub fn set_fsync(&self, on: bool) {
        self.inner.fsync.store(on, Ordering::SeqCst);
    }

    /// The store's counters and current sizes.
    pub fn stats(&self) -> StoreStats {
        self.inner.counts.stats()
    }

    /// Runs `write` in the next group's transaction (or one of its own if `alone`) and returns
    /// its result once that transaction is durable.
    async fn write<R: Send + 'static>(
        &self,
        alone: bool,
        write: impl FnOnce(&WriteTransaction) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        self.submit(alone, write).await
    }

    /// Queues `write` for the committer now (writes run in the order they are queued) and
    /// returns a future of its result once its transaction is durable.
    fn submit<R: Send + 'static>(
        &self,
        alone: bool,
        write: impl FnOnce(&WriteTransaction) -> Result<R, StoreError> + Send + 'static,
    ) -> impl Future<Output = Result<R, StoreError>> + Send + 'static {
        self.submit_then(alone, write, |_| {})
    }

    /// Like [`Store::submit`], and once the write is durable, runs `committed` with its result
    /// on the committer thread: in commit order, before any later write's waiter hears of its
    /// own commit.
    fn submit_then<R: Send + 'static>(
        &self,
        alone: bool,
        write: impl FnOnce(&WriteTransaction) -> Result<R, StoreError> + Send + 'static,
        committed: impl FnOnce(&R) + Send + 'static,
    ) -> impl Future<Output = Result<R, StoreError>> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        let run = Box::new(move |txn: Result<&WriteTransaction, StoreError>| -> Option<Reply> {
            match txn.and_then(write) {
                Ok(r) => Some(Box::new(move |result: Result<(), StoreError>| {
                    if result.is_ok() {
                        committed(&r);
                    }
                    let _ = tx.send(result.map(|()| r));
                })),
                Err(e) => {
                    let _ = tx.send(Err(e));
                    None
                }
            }
        });
        let sent = {
            let jobs = self.inner.jobs.lock().unwrap_or_else(|e| e.into_inner());
            jobs.as_ref().is_some_and(|j| j.send(Job { alone, run }).is_ok())
        };
        async move {
            if !sent {
                return Err(StoreError::Closed);
            }
            rx.await.unwrap_or(Err(StoreError::Closed))
        }
    }

    fn engine(&self, e: impl Into<redb::Error>) -> StoreError {
        engine_error(&self.inner.path, e.into())
    }

    /// Sender: gives `payload` (for application channel `channel`) the next sequence number of
    /// this node's stream to `peer` (starting the stream if there is none) and puts it in the
    /// outbox; returns once that is durable. Waits while the outbox is at its limit.
    pub async fn append(&self, peer: Fingerprint, channel: u16, payload: Bytes) -> Result<Stored, StoreError> {
        self.wait_for_room(true, payload.len()).await;
        let mut id = [0u8; 16];
        while id == [0; 16] {
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id).map_err(|_| StoreError::Io {
                path: self.inner.path.clone(),
                reason: "the system RNG failed".into(),
            })?;
        }
        let path = self.inner.path.clone();
        let counts = self.inner.counts.clone();
        let len = payload.len() as u64;
        let stored = self
            .write(false, move |txn| {
                let engine = |e: redb::Error| engine_error(&path, e);
                let mut streams = txn.open_table(OUT_STREAMS).map_err(|e| engine(e.into()))?;
                let (stream, dseq) =
                    streams.get(peer.0).map_err(|e| engine(e.into()))?.map(|v| v.value()).unwrap_or((id, 1));
                streams.insert(peer.0, (stream, dseq + 1)).map_err(|e| engine(e.into()))?;
                let mut outbox = txn.open_table(OUTBOX).map_err(|e| engine(e.into()))?;
                outbox.insert((peer.0, dseq), (channel, payload.as_ref())).map_err(|e| engine(e.into()))?;
                Ok(Stored { peer, stream: StreamId(stream), dseq, channel, payload })
            })
            .await?;
        counts.outbox_messages.fetch_add(1, Ordering::Relaxed);
        counts.outbox_bytes.fetch_add(len, Ordering::Relaxed);
        Ok(stored)
    }

    /// Sender: the outbox's messages to `peer`, oldest first, at most `max` of them from `dseq`
    /// `from` on: what to (re)send on a new session.
    pub fn pending(&self, peer: Fingerprint, from: u64, max: usize) -> Result<Vec<Stored>, StoreError> {
        let r = self.inner.db.begin_read().map_err(|e| self.engine(e))?;
        let Some((stream, _)) = r
            .open_table(OUT_STREAMS)
            .map_err(|e| self.engine(e))?
            .get(peer.0)
            .map_err(|e| self.engine(e))?
            .map(|v| v.value())
        else {
            return Ok(Vec::new());
        };
        let outbox = r.open_table(OUTBOX).map_err(|e| self.engine(e))?;
        let mut out = Vec::new();
        for e in outbox.range((peer.0, from)..=(peer.0, u64::MAX)).map_err(|e| self.engine(e))?.take(max) {
            let (k, v) = e.map_err(|e| self.engine(e))?;
            out.push(Stored::read(peer.0, stream, k.value().1, v.value()));
        }
        Ok(out)
    }

    /// Sender: a RECEIPT from `peer` for `stream` up to `dseq`: forgets the messages it covers
    /// (a receipt for another stream, an old one, is ignored). Returns how many were removed.
    pub async fn receipt(&self, peer: Fingerprint, stream: StreamId, dseq: u64) -> Result<u64, StoreError> {
        let path = self.inner.path.clone();
        let removed = self
            .write(false, move |txn| {
                let engine = |e: redb::Error| engine_error(&path, e);
                let streams = txn.open_table(OUT_STREAMS).map_err(|e| engine(e.into()))?;
                let current = streams.get(peer.0).map_err(|e| engine(e.into()))?.map(|v| v.value().0);
                if current != Some(stream.0) {
                    return Ok((0, 0));
                }
                let mut outbox = txn.open_table(OUTBOX).map_err(|e| engine(e.into()))?;
                let (mut n, mut b) = (0u64, 0u64);
                let mut gone =
                    outbox.extract_from_if((peer.0, 0)..=(peer.0, dseq), |_, _| true).map_err(|e| engine(e.into()))?;
                for e in gone.by_ref() {
                    let (_, v) = e.map_err(|e| engine(e.into()))?;
                    n += 1;
                    b += v.value().1.len() as u64;
                }
                Ok((n, b))
            })
            .await?;
        let c = &self.inner.counts;
        c.outbox_messages.fetch_sub(removed.0, Ordering::Relaxed);
        c.outbox_bytes.fetch_sub(removed.1, Ordering::Relaxed);
        if removed.0 > 0 {
            self.inner.room.notify_waiters();
        }
        Ok(removed.0)
    }

    /// Receiver: a DATA frame from `peer`. The next message of its stream is put in the inbox
    /// with the stream's new high mark, in one durable transaction; copies and gaps change
    /// nothing. Returns the decision and the high mark for the RECEIPT. Waits while the inbox
    /// is at its limit.
    pub async fn accept(
        &self,
        peer: Fingerprint,
        stream: StreamId,
        dseq: u64,
        channel: u16,
        payload: Bytes,
    ) -> Result<Accepted, StoreError> {
        // Copies and gaps are decided without a commit (most of a resend burst is copies).
        let known = self.high_mark(peer, stream)?;
        let arrival = judge(known, dseq);
        if arrival != Arrival::Next {
            if matches!(arrival, Arrival::Gap { .. }) {
                self.inner.counts.gaps.fetch_add(1, Ordering::Relaxed);
            }
            return Ok(Accepted { arrival, high: known.unwrap_or(0) });
        }
        self.wait_for_room(false, payload.len()).await;
        self.queue_accept(peer, stream, dseq, channel, payload, |_| {}).await
    }

    /// Like [`Store::accept`], but queued for the committer at once, without waiting for room:
    /// DATA frames of one session queued one after the other are decided in that order, and
    /// share commits. The caller checks for room first.
    ///
    /// `committed` runs once the decision is durable, on the committer thread, in commit order
    /// across all sessions: handing messages over there keeps them in `dseq` order even when two
    /// sessions with one peer deliver the same stream at once.
    fn queue_accept(
        &self,
        peer: Fingerprint,
        stream: StreamId,
        dseq: u64,
        channel: u16,
        payload: Bytes,
        committed: impl FnOnce(&Accepted) + Send + 'static,
    ) -> impl Future<Output = Result<Accepted, StoreError>> + Send + 'static {
        let path = self.inner.path.clone();
        let len = payload.len() as u64;
        let counts = self.inner.counts.clone();
        self.submit_then(
            false,
            move |txn| {
                let engine = |e: redb::Error| engine_error(&path, e);
                let mut streams = txn.open_table(IN_STREAMS).map_err(|e| engine(e.into()))?;
                let high = streams.get((peer.0, stream.0)).map_err(|e| engine(e.into()))?.map(|v| v.value().0);
                let arrival = judge(high, dseq);
                if arrival != Arrival::Next {
                    return Ok(Accepted { arrival, high: high.unwrap_or(0) });
                }
                let mut used = Vec::new();
                for e in streams.range((peer.0, [0; 16])..=(peer.0, [0xff; 16])).map_err(|e| engine(e.into()))? {
                    let (k, v) = e.map_err(|e| engine(e.into()))?;
                    used.push((k.value().1, v.value().1));
                }
                let (forget, order) = streams_after_use(used, stream);
                if let Some(old) = forget {
                    streams.remove((peer.0, old)).map_err(|e| engine(e.into()))?;
                }
                streams.insert((peer.0, stream.0), (dseq, order)).map_err(|e| engine(e.into()))?;
                let mut inbox = txn.open_table(INBOX).map_err(|e| engine(e.into()))?;
                inbox.insert((peer.0, stream.0, dseq), (channel, payload.as_ref())).map_err(|e| engine(e.into()))?;
                Ok(Accepted { arrival, high: dseq })
            },
            move |accepted: &Accepted| {
                // Counted before the message is handed over (and can be consumed).
                match accepted.arrival {
                    Arrival::Next => {
                        counts.inbox_messages.fetch_add(1, Ordering::Relaxed);
                        counts.inbox_bytes.fetch_add(len, Ordering::Relaxed);
                    }
                    Arrival::Gap { .. } => {
                        counts.gaps.fetch_add(1, Ordering::Relaxed);
                    }
                    Arrival::Duplicate => {}
                }
                committed(accepted);
            },
        )
    }

    /// Receiver: the high mark of `peer`'s `stream`, if the store knows the stream.
    pub fn high_mark(&self, peer: Fingerprint, stream: StreamId) -> Result<Option<u64>, StoreError> {
        let r = self.inner.db.begin_read().map_err(|e| self.engine(e))?;
        let t = r.open_table(IN_STREAMS).map_err(|e| self.engine(e))?;
        Ok(t.get((peer.0, stream.0)).map_err(|e| self.engine(e))?.map(|v| v.value().0))
    }

    /// Receiver: messages received and not yet consumed, in (peer, stream, dseq) order, at most
    /// `max`, after `after` if given.
    pub fn inbox(&self, after: Option<(Fingerprint, StreamId, u64)>, max: usize) -> Result<Vec<Stored>, StoreError> {
        let r = self.inner.db.begin_read().map_err(|e| self.engine(e))?;
        let t = r.open_table(INBOX).map_err(|e| self.engine(e))?;
        let range = match after {
            Some((p, s, d)) => t.range((p.0, s.0, d)..).map_err(|e| self.engine(e))?,
            None => t.range::<InKey>(..).map_err(|e| self.engine(e))?,
        };
        let mut out = Vec::new();
        for e in range {
            let (k, v) = e.map_err(|e| self.engine(e))?;
            let (peer, stream, dseq) = k.value();
            if after == Some((Fingerprint(peer), StreamId(stream), dseq)) {
                continue;
            }
            out.push(Stored::read(peer, stream, dseq, v.value()));
            if out.len() == max {
                break;
            }
        }
        Ok(out)
    }

    /// Receiver: the application is done with `message`: removes it from the inbox, durably
    /// (sharing a commit with other writes waiting at the same time).
    pub async fn consume(&self, message: &Stored) -> Result<(), StoreError> {
        self.remove_from_inbox(message, false, |_| Ok(())).await
    }

    /// Receiver: removes `message` from the inbox in the same transaction as the application's
    /// own writes (`effects`, on tables of its own in this file): after a crash, either both
    /// happened or neither. The transaction is this call's alone: if `effects` returns `Err`,
    /// it is aborted, so neither the application's writes nor the removal happen, and the error
    /// is returned. (The table names `meta`, `out_streams`, `outbox`, `in_streams` and `inbox`
    /// are the store's own.)
    pub async fn consume_with<R: Send + 'static>(
        &self,
        message: &Stored,
        effects: impl FnOnce(&WriteTransaction) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        self.remove_from_inbox(message, true, effects).await
    }

    /// Runs the application's own writes (`effects`, on tables of its own in this file) in a
    /// durable transaction of their own; an `Err` aborts it.
    pub async fn write_with<R: Send + 'static>(
        &self,
        effects: impl FnOnce(&WriteTransaction) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        self.write(true, effects).await
    }

    async fn remove_from_inbox<R: Send + 'static>(
        &self,
        message: &Stored,
        alone: bool,
        effects: impl FnOnce(&WriteTransaction) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let key = (message.peer.0, message.stream.0, message.dseq);
        let path = self.inner.path.clone();
        let (r, removed) = self
            .write(alone, move |txn| {
                let engine = |e: redb::Error| engine_error(&path, e);
                let r = effects(txn)?;
                let mut inbox = txn.open_table(INBOX).map_err(|e| engine(e.into()))?;
                let removed = inbox.remove(key).map_err(|e| engine(e.into()))?.map(|v| v.value().1.len() as u64);
                Ok((r, removed))
            })
            .await?;
        if let Some(len) = removed {
            self.inner.counts.inbox_messages.fetch_sub(1, Ordering::Relaxed);
            self.inner.counts.inbox_bytes.fetch_sub(len, Ordering::Relaxed);
            self.inner.room.notify_waiters();
        }
        Ok(r)
    }

    /// Sender: the first `max` messages waiting for a receipt, all peers, in (peer, dseq) order.
    pub fn outbox(&self, max: usize) -> Result<Vec<Stored>, StoreError> {
        let r = self.inner.db.begin_read().map_err(|e| self.engine(e))?;
        let streams = r.open_table(OUT_STREAMS).map_err(|e| self.engine(e))?;
        let outbox = r.open_table(OUTBOX).map_err(|e| self.engine(e))?;
        let mut out = Vec::new();
        for e in outbox.iter().map_err(|e| self.engine(e))?.take(max) {
            let (k, v) = e.map_err(|e| self.engine(e))?;
            let (peer, dseq) = k.value();
            let stream = streams.get(peer).map_err(|e| self.engine(e))?.map(|s| s.value().0).unwrap_or([0; 16]);
            out.push(Stored::read(peer, stream, dseq, v.value()));
        }
        Ok(out)
    }

    /// Reads the store: every stream and message, for `quicseal store inspect`.
    pub fn inspect(&self) -> Result<Inspection, StoreError> {
        let r = self.inner.db.begin_read().map_err(|e| self.engine(e))?;
        let mut out = Inspection::default();
        for e in r.open_table(OUT_STREAMS).map_err(|e| self.engine(e))?.iter().map_err(|e| self.engine(e))? {
            let (k, v) = e.map_err(|e| self.engine(e))?;
            let (stream, next) = v.value();
            out.out_streams.push((Fingerprint(k.value()), StreamId(stream), next));
        }
        for e in r.open_table(IN_STREAMS).map_err(|e| self.engine(e))?.iter().map_err(|e| self.engine(e))? {
            let (k, v) = e.map_err(|e| self.engine(e))?;
            let (peer, stream) = k.value();
            out.in_streams.push((Fingerprint(peer), StreamId(stream), v.value().0));
        }
        let outbox = r.open_table(OUTBOX).map_err(|e| self.engine(e))?;
        out.outbox_len = outbox.len().map_err(|e| self.engine(e))?;
        let inbox = r.open_table(INBOX).map_err(|e| self.engine(e))?;
        out.inbox_len = inbox.len().map_err(|e| self.engine(e))?;
        Ok(out)
    }

    /// Waits until the outbox (or inbox) has room for one more message of `len` bytes. One
    /// message is always let through into an empty box, whatever its size.
    async fn wait_for_room(&self, outbox: bool, len: usize) {
        crate::wait::until(&self.inner.room, || self.has_room(outbox, len)).await
    }

    /// Whether the outbox (or inbox) has room for one more message of `len` bytes now.
    fn has_room(&self, outbox: bool, len: usize) -> bool {
        self.inner.counts.has_room(&self.inner.limits, outbox, len)
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.inner.path).field("limits", &self.inner.limits).finish()
    }
}

impl DurableStore for Store {
    fn limits(&self) -> StoreLimits {
        Store::limits(self)
    }

    fn secret(&self) -> [u8; 32] {
        Store::secret(self)
    }

    fn stats(&self) -> StoreStats {
        Store::stats(self)
    }

    fn append(&self, peer: Fingerprint, channel: u16, payload: Bytes) -> StoreFuture<Stored> {
        let store = self.clone();
        Box::pin(async move { Store::append(&store, peer, channel, payload).await })
    }

    fn pending(&self, peer: Fingerprint, from: u64, max: usize) -> Result<Vec<Stored>, StoreError> {
        Store::pending(self, peer, from, max)
    }

    fn receipt(&self, peer: Fingerprint, stream: StreamId, dseq: u64) -> StoreFuture<u64> {
        let store = self.clone();
        Box::pin(async move { Store::receipt(&store, peer, stream, dseq).await })
    }

    fn accept_in_order(&self, m: Stored, committed: OnCommit) -> StoreFuture<Accepted> {
        Box::pin(self.queue_accept(m.peer, m.stream, m.dseq, m.channel, m.payload, committed))
    }

    fn inbox(&self, after: Option<(Fingerprint, StreamId, u64)>, max: usize) -> Result<Vec<Stored>, StoreError> {
        Store::inbox(self, after, max)
    }

    fn consume(&self, message: &Stored) -> StoreFuture<()> {
        let (store, message) = (self.clone(), message.clone());
        Box::pin(async move { Store::consume(&store, &message).await })
    }

    fn has_room(&self, outbox: bool, len: usize) -> bool {
        Store::has_room(self, outbox, len)
    }

    fn wait_for_room(&self, outbox: bool, len: usize) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        let store = self.clone();
        Box::pin(async move { Store::wait_for_room(&store, outbox, len).await })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// What a store holds ([`Store::inspect`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Inspection {
    /// Sender: per peer, its stream and the next sequence number.
    pub out_streams: Vec<(Fingerprint, StreamId, u64)>,
    /// Receiver: per (peer, stream), the high mark.
    pub in_streams: Vec<(Fingerprint, StreamId, u64)>,
    /// Messages waiting for a receipt.
    pub outbox_len: u64,
    /// Messages received and not consumed.
    pub inbox_len: u64,
}

/// Messages in an outbox or inbox table, and their payload bytes.
fn count<K: redb::Key + 'static>(table: &impl ReadableTable<K, Entry>) -> Result<(u64, u64), redb::Error> {
    let (mut n, mut bytes) = (0u64, 0u64);
    for e in table.iter()? {
        let (_, v) = e?;
        n += 1;
        bytes += v.value().1.len() as u64;
    }
    Ok((n, bytes))
}

fn open_db(path: &Path) -> Result<Database, StoreError> {
    match Database::create(path) {
        Ok(db) => Ok(db),
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => Err(StoreError::InUse(path.to_path_buf())),
        Err(e) => Err(engine_error(path, e.into())),
    }
}

fn engine_error(path: &Path, e: redb::Error) -> StoreError {
    match e {
        redb::Error::Corrupted(reason) => StoreError::Corrupted { path: path.to_path_buf(), reason },
        // redb reports a file that is not one of its own (a wrong magic number) as invalid data.
        redb::Error::Io(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            StoreError::Corrupted { path: path.to_path_buf(), reason: e.to_string() }
        }
        redb::Error::Io(e) => StoreError::Io { path: path.to_path_buf(), reason: e.to_string() },
        redb::Error::DatabaseAlreadyOpen => StoreError::InUse(path.to_path_buf()),
        e => StoreError::Corrupted { path: path.to_path_buf(), reason: e.to_string() },
    }
}

/// The committer thread: one transaction per group of waiting writes.
struct Committer {
    db: Arc<Database>,
    path: PathBuf,
    counts: Arc<Counts>,
    fsync: Arc<AtomicBool>,
}

impl Committer {
    fn run(self, jobs: mpsc::Receiver<Job>) {
        let mut next = None;
        while let Some(first) = next.take().or_else(|| jobs.recv().ok()) {
            let mut group = vec![first];
            // A group is writes that may share a transaction; a write that must be alone ends it
            // (and starts the next one).
            while !group[0].alone && group.len() < MAX_GROUP {
                match jobs.try_recv() {
                    Ok(j) if j.alone => {
                        next = Some(j);
                        break;
                    }
                    Ok(j) => group.push(j),
                    Err(_) => break,
                }
            }
            self.commit(group);
        }
    }

    fn commit(&self, group: Vec<Job>) {
        let synced = self.fsync.load(Ordering::SeqCst);
        let txn = match self.db.begin_write() {
            Ok(mut t) => {
                if !synced {
                    // Fails only with persistent savepoints or a file shared between processes;
                    // the store uses neither (and the commit is then simply synced).
                    let _ = t.set_durability(redb::Durability::None);
                }
                t
            }
            Err(e) => {
                let e = engine_error(&self.path, e.into());
                for job in group {
                    (job.run)(Err(e.clone()));
                }
                return;
            }
        };
        let mut replies = Vec::with_capacity(group.len());
        let mut jobs = group.into_iter();
        let mut failed = false;
        for job in jobs.by_ref() {
            match (job.run)(Ok(&txn)) {
                Some(reply) => replies.push(reply),
                None => {
                    failed = true;
                    break;
                }
            }
        }
        let result = if failed {
            // A failed write may have left part of itself in the transaction: none of the group
            // is kept. (Writes fail only when the engine does; those left unrun hear the same.)
            let _ = txn.abort();
            let e =
                StoreError::Io { path: self.path.clone(), reason: "another write in the same commit failed".into() };
            for job in jobs {
                (job.run)(Err(e.clone()));
            }
            Err(e)
        } else {
            txn.commit().map_err(|e| engine_error(&self.path, e.into()))
        };
        if result.is_ok() {
            let n = replies.len() as u64;
            self.counts.commits.fetch_add(u64::from(synced), Ordering::Relaxed);
            self.counts.writes.fetch_add(n, Ordering::Relaxed);
            self.counts.largest_group.fetch_max(n, Ordering::Relaxed);
        }
        for reply in replies {
            reply(result.clone());
        }
    }
}

mod memory;
pub use memory::MemoryStore;

#[cfg(test)]
mod tests;
