//! [`Session`]: an authenticated connection to one peer, with reliable, ordered channels and
//! unreliable datagrams.
//!
//! The async shell around [`SessionCore`](crate::proto::session::SessionCore), which holds the
//! whole session protocol (outbox and inbox, sealing and opening, the stream rules, tag-failure
//! counting, channel limits, key wear-out) and takes every decision on it. The shell moves bytes
//! between the core and quinn, and wakes whoever waits.
//!
//! Each channel is a QUIC bidirectional stream, opened by the side that sends on it and carrying
//! MESSAGE frames one way only; ACK frames travel on the control stream. Memory is bounded: the
//! outbox by count and bytes ([`Session::send`] waits, [`Session::try_send_bytes`] fails with
//! [`Error::Full`]), the inbox by `Limits::receive_buffer` (a reader waits for room before it
//! reads a message body, so QUIC flow control slows a peer we cannot keep up with), datagrams by
//! the same budget (dropped and counted when it is full).
//!
//! # Concurrency map
//!
//! One lock holds the protocol: `SessionShared::core` (a `std::sync::Mutex<Core>`, never held across
//! an `.await`). Everything else is I/O or waiting.
//!
//! One task per session ([`run`]): it serves the current connection ([`serve`]) until the
//! connection is lost or replaced, then redials with backoff (dialling side) or waits for the
//! node to attach the peer's new connection (accepting side), or ends the session. Serving a
//! connection polls:
//! - the **readers**: datagrams, the control stream, and a reader per inbound channel stream
//!   (accepted as the peer opens them). They read frames, lock the core, hand them over
//!   ([`SessionCore::on_message`](crate::proto::session::SessionCore::on_message) and the like),
//!   unlock, then wake: `arrived` (a message for `recv`), `acked` (for `send`, `delivered`,
//!   `wait_acked`), `work` (the driver, when the core has a timer earlier than its sleep, or a
//!   worn-out key's frames were acknowledged);
//! - the **driver** ([`drive`]): locks the writer (a `tokio::sync::Mutex`, held across waits on
//!   flow control), takes [`SessionCore::poll_transmit`](crate::proto::session::SessionCore::poll_transmit)
//!   under the core lock, writes to quinn, and sleeps until `work`, the core's
//!   `poll_timeout`, or quinn taking more.
//!
//! Each part yields to the others through tokio's cooperative budget when it has frames
//! buffered, so a busy channel cannot starve the driver (and its acknowledgements).
//!
//! API handles ([`Session`], and the RPC layer's `Outlet`) lock the core, push or take, unlock,
//! and then either write their own message at once if the writer is free (`try_lock`, never
//! waiting: [`SessionShared::transmit_now`]) or wake the driver. Waiters register on a `Notify` before
//! they check the core, so a wake-up between check and wait is never lost. The lock order is
//! writer, then core; the core lock is the innermost and is never held while taking another.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use quinn::{Connection, RecvStream, SendStream, VarInt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, broadcast};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::durable::{self, Durable};
use crate::error::{Error, Limited, Result, Side, Timed, close_code, from_connection_error};
use crate::identity::{Fingerprint, PeerIdentity};
use crate::proto::ChannelMap;
use crate::proto::durable::DURABLE_CHANNEL;
use crate::proto::rpc::CallId;
use crate::proto::seal::{OpeningKey, SealError, SealingKey};
use crate::proto::session::{Arrival, DatagramError, PushError, SessionCore, Stop, Violation, seal_one};
use crate::proto::wire::{
    self, FRAME_HEADER_LEN, MESSAGE_OVERHEAD, MessageKind, STREAM_HEADER_LEN, StreamKind, WireError,
};
use crate::rpc::{self, CallOptions, RpcServer, SessionRpc, deadline_after, decode_exact};
use crate::stats::{Counter, Stats, Tally};
use crate::store::Stored;

/// Session events kept for [`Session::events`] receivers that fall behind (beyond, they get
/// `Lagged` and go on with the newest). Each slot is held by every session, idle or not.
const EVENT_BACKLOG: usize = 16;
/// A sender tries to write its message itself (no hop through the driver task) when at most
/// this many messages are unacknowledged, its own included. Measured with `benches/compare`
/// (W2, W3): writing every message at once sent a third more packets and cut the 64-in-flight
/// throughput by a quarter. It writes only if the connection's writer is free, and the driver
/// keeps the writer while it sleeps (see [`drive`]), so in practice the driver writes.
const WRITE_AT_ONCE_MAX_IN_FLIGHT: usize = 4;

/// A message received from the peer.
#[derive(Debug, Clone)]
pub struct Message {
    peer: Arc<PeerIdentity>,
    kind: MessageKind,
    channel: u16,
    seq: u64,
    payload: Bytes,
}

impl Message {
    /// Who sent it (authenticated by mutual TLS).
    pub fn peer(&self) -> &PeerIdentity {
        &self.peer
    }
    /// Whether it came as a datagram ([`Session::send_datagram`]) rather than on a channel.
    pub fn is_datagram(&self) -> bool {
        self.kind == MessageKind::Datagram
    }
    /// The channel it arrived on.
    pub fn channel(&self) -> u16 {
        self.channel
    }
    /// Its sequence number on the channel (from 1; datagrams count separately).
    pub fn seq(&self) -> u64 {
        self.seq
    }
    /// The raw payload.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }
    /// Takes the raw payload.
    pub fn into_payload(self) -> Bytes {
        self.payload
    }
    /// Decodes a typed message sent with [`Session::send`] (postcard encoding). Trailing bytes
    /// are an error.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T> {
        decode_exact(&self.payload)
    }
}

/// The session's state machine behind its one lock, with this session's part of the node's
/// unread budget.
struct Core {
    state: SessionCore,
    /// The node's budget for received-but-unread bytes, and this session's part of it.
    node: Arc<UnreadBudget>,
    accounted: usize,
}

impl std::ops::Deref for Core {
    type Target = SessionCore;
    fn deref(&self) -> &SessionCore {
        &self.state
    }
}

impl std::ops::DerefMut for Core {
    fn deref_mut(&mut self) -> &mut SessionCore {
        &mut self.state
    }
}

/// A node's budget for received-but-unread bytes, over all its sessions (`Limits::node_receive_buffer`):
/// beyond it, channel readers wait (QUIC flow control holds the peers back) and datagrams are
/// dropped. Each session may always hold one message, so every session makes progress.
#[derive(Debug)]
pub(crate) struct UnreadBudget {
    used: AtomicUsize,
    limit: usize,
    /// Readers of any session waiting for node room, and their signal.
    blocked: AtomicUsize,
    freed: Notify,
}

impl UnreadBudget {
    pub(crate) fn new(limit: usize) -> UnreadBudget {
        UnreadBudget { used: AtomicUsize::new(0), limit, blocked: AtomicUsize::new(0), freed: Notify::new() }
    }

    /// Bytes held now by all the node's sessions.
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::SeqCst)
    }
}

impl Core {
    /// Brings the node's count up to date with this session's (see [`CoreGuard`]).
    fn settle(&mut self) {
        let now = self.unread();
        if now > self.accounted {
            self.node.used.fetch_add(now - self.accounted, Ordering::SeqCst);
        } else if now < self.accounted {
            self.node.used.fetch_sub(self.accounted - now, Ordering::SeqCst);
            if self.node.blocked.load(Ordering::SeqCst) > 0 {
                self.node.freed.notify_waiters();
            }
        }
        self.accounted = now;
    }

    /// Whether the node's budget has room for `len` more bytes (the core lets a session that
    /// holds nothing take one message regardless).
    fn node_has_room(node: &UnreadBudget, len: usize) -> bool {
        node.used() + len <= node.limit
    }

    /// [`SessionCore::reserve`] against this node's budget.
    fn reserve(&mut self, channel: u16, len: usize) -> bool {
        let node = &self.node;
        self.state.reserve(channel, len, |len| Core::node_has_room(node, len))
    }

    /// [`SessionCore::on_datagram`] against this node's budget.
    fn on_datagram(&mut self, bytes: &Bytes, wall: u64) -> std::result::Result<bool, Violation> {
        let node = &self.node;
        self.state.on_datagram(bytes, wall, |len| Core::node_has_room(node, len))
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        // The session is gone: so is what it held.
        self.node.used.fetch_sub(self.accounted, Ordering::SeqCst);
        self.node.freed.notify_waiters();
    }
}

/// The core, locked; on release it settles the session's part of the node's unread budget,
/// whatever the holder changed.
struct CoreGuard<'a>(MutexGuard<'a, Core>);

impl std::ops::Deref for CoreGuard<'_> {
    type Target = Core;
    fn deref(&self) -> &Core {
        &self.0
    }
}

impl std::ops::DerefMut for CoreGuard<'_> {
    fn deref_mut(&mut self) -> &mut Core {
        &mut self.0
    }
}

impl Drop for CoreGuard<'_> {
    fn drop(&mut self) {
        self.0.settle();
    }
}

/// Something that happened to a session; see [`Session::events`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionEvent {
    /// The connection was lost; the session will try to carry on over a new one.
    Disconnected {
        /// Why, as far as we know.
        reason: String,
    },
    /// The dialling side starts reconnection attempt `attempt` (from 1).
    Reconnecting {
        /// Attempt number.
        attempt: u32,
    },
    /// A new connection carries the session; unacknowledged messages are being resent.
    Resumed,
    /// The session could not be resumed in time, or the peer refused to resume it.
    GaveUp {
        /// Why.
        reason: String,
    },
    /// The session is over (closed by either side, or gave up).
    Ended,
}

/// Runs once when a session ends, with its final counters.
pub(crate) type EndHook = Box<dyn FnOnce(Stats) + Send>;

/// How a session dials again after losing its connection (dialling side only).
pub(crate) type Redial =
    Arc<dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<LinkParts>> + Send>> + Send + Sync>;

/// What a new connection brings to a session.
pub(crate) struct LinkParts {
    pub(crate) conn: Connection,
    pub(crate) keys: (SealingKey, OpeningKey),
    pub(crate) control: (SendStream, RecvStream),
}

/// Reconnection and resumption timing.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ResumePolicy {
    /// First wait between reconnection attempts (doubles up to `backoff_max`).
    pub(crate) backoff_min: Duration,
    /// Longest wait between attempts.
    pub(crate) backoff_max: Duration,
    /// How long a session may stay disconnected before it gives up (both sides).
    pub(crate) give_up_after: Duration,
}

/// One QUIC connection carrying the session; a session has one at a time.
struct Carrier {
    conn: Connection,
    /// Its number in the session ([`SessionCore::connections`] when it was attached): once a
    /// newer one carries the session, what this one's readers and writer do is ignored
    /// ([`SessionCore::is_current`]).
    number: u64,
    /// Why we closed it, when we did because the peer misbehaved.
    failure: OnceLock<Violation>,
    /// Closed by us to move to a new connection ([`Session::force_reconnect`]).
    reconnecting: AtomicBool,
    /// Writes the channel frames; set when the connection's tasks start.
    writer: OnceLock<tokio::sync::Mutex<Writer>>,
    /// The control stream's receiving half, until the session's task takes it to serve this
    /// connection.
    control: Mutex<Option<RecvStream>>,
}

impl Carrier {
    fn new(conn: Connection, number: u64) -> Arc<Carrier> {
        Arc::new(Carrier {
            conn,
            number,
            failure: OnceLock::new(),
            reconnecting: AtomicBool::new(false),
            writer: OnceLock::new(),
            control: Mutex::new(None),
        })
    }

    /// A frame could not be sealed (its channel ran out of sequence numbers): the session
    /// cannot go on, and says why.
    fn seal_failed(&self, e: SealError) {
        warn!(error = %e, "cannot seal: closing the session");
        let reason: &[u8] = match e {
            SealError::SeqExhausted => b"sequence numbers exhausted",
            _ => b"cannot seal",
        };
        self.conn.close(VarInt::from_u32(close_code::NO_ERROR), reason);
    }

    /// Closes the connection because the peer broke the protocol (the core named how).
    fn violation(&self, v: Violation) {
        warn!(peer = %self.conn.remote_address(), reason = %v, "closing connection: protocol violation");
        let (code, reason) = (v.close_code(), v.close_reason());
        // Recorded before the close, which the session's task may see at once.
        let _ = self.failure.set(v);
        self.conn.close(VarInt::from_u32(code), reason);
    }

    /// Why this connection ended, as an error.
    fn error(&self) -> Error {
        if let Some(v) = self.failure.get() {
            return Error::ProtocolViolation { side: Side::Local, violation: v.clone() };
        }
        match self.conn.close_reason() {
            Some(e) => from_connection_error(e, None),
            None => Error::ConnectionLost { reason: "connection tasks ended".into() },
        }
    }

    /// Whether the session should carry on over a new connection after this one ended: yes for
    /// network failures and deliberate reconnects, no when either side found a violation or
    /// closed the session.
    fn resumable(&self) -> bool {
        if self.failure.get().is_some() {
            return false; // the peer misbehaved: do not invite it back
        }
        use quinn::ConnectionError as C;
        match self.conn.close_reason() {
            Some(C::LocallyClosed) => self.reconnecting.load(Ordering::Relaxed),
            Some(C::ApplicationClosed(a)) => u64::from(a.error_code) == u64::from(close_code::RECONNECT),
            Some(C::TimedOut | C::Reset | C::ConnectionClosed(_) | C::TransportError(_)) => true,
            Some(C::VersionMismatch | C::CidsExhausted) => true,
            None => true,
        }
    }
}

/// State shared by the session handle and its background tasks (never the handle itself, so
/// dropping every [`Session`] ends the session).
struct SessionShared {
    link: Mutex<Arc<Carrier>>,
    /// Bumped when a new connection is attached.
    generation: AtomicU64,
    /// Signalled when `generation` changes (see [`SessionShared::generation_changed`]).
    generation_signal: Notify,
    /// Set once, when the session is over: why (every caller gets this same error).
    ending: OnceLock<Error>,
    /// Set after `ending`, once the end hook has run (see [`SessionShared::ended`]).
    finished: AtomicBool,
    /// Wakes everything waiting for the session's end (see [`SessionShared::ended`]).
    ended_signal: Notify,
    /// Created by the first [`Session::events`] call: events nobody subscribed to are dropped
    /// either way, and an idle session need not hold the channel's slots.
    events: OnceLock<broadcast::Sender<SessionEvent>>,
    on_end: Mutex<Option<EndHook>>,
    epoch: u64,
    /// The node's budget for received-but-unread bytes (also in `Core`, which accounts to it).
    unread_budget: Arc<UnreadBudget>,
    /// The session's state machine: every protocol decision is taken under this one lock.
    core: Mutex<Core>,
    tally: Tally,
    /// Zero of the reliability core's clock.
    started: Instant,
    /// Wakes the driver: something to send.
    work: Notify,
    /// The driver's next timer while it sleeps (reliability core clock, ms; `u64::MAX`: none),
    /// 0 while it is awake (see [`SessionShared::drive_would_miss`]).
    drive_sleeps_until: AtomicU64,
    /// Wakes receivers: something to deliver.
    arrived: Notify,
    /// Wakes readers waiting for room in the inbox.
    room: Notify,
    /// Signalled whenever acknowledgements arrive (waiters re-check the outbox).
    acked: Notify,
    /// The largest payload we send: the smaller of our limit and the peer's (also in the
    /// core's configuration; here to be read without the lock).
    max_send: usize,
    /// Calls and the share of the node's RPC server.
    rpc: Arc<SessionRpc>,
    /// Held while RPC frames are taken from the reserved channels, so they are handled in
    /// order whichever task takes them (a channel reader, or one that queued an answer).
    rpc_taking: Mutex<()>,
    /// The node's durable layer, if it keeps a store (weak: the layer holds its sessions).
    durable: Option<std::sync::Weak<Durable<Outlet>>>,
    /// This session's receiving side of durable channels, made on the first DURABLE frame.
    durable_rx: OnceLock<Arc<durable::Rx>>,
    /// The peer's names digest: what its durable stream is filed under.
    peer_names: Fingerprint,
}

impl SessionShared {
    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The core, for a reader or writer of `link`: `None` once a newer connection carries the
    /// session (see [`SessionCore::is_current`]); the caller then stops.
    fn core_for(&self, link: &Carrier) -> Option<CoreGuard<'_>> {
        let core = self.core();
        core.is_current(link.number).then_some(core)
    }

    fn core(&self) -> CoreGuard<'_> {
        CoreGuard(self.core.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn link(&self) -> Arc<Carrier> {
        self.link.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn is_ended(&self) -> bool {
        self.ending.get().is_some()
    }

    /// Resolves once a connection other than generation `from` carries the session.
    async fn generation_changed(&self, from: u64) {
        crate::wait::until(&self.generation_signal, || self.generation.load(Ordering::SeqCst) != from).await;
    }

    /// Resolves once the session has ended and the node has heard of it (the end hook ran, so
    /// the peer's epoch is retired by the time [`Session::closed`] returns).
    async fn ended(&self) {
        crate::wait::until(&self.ended_signal, || self.finished.load(Ordering::SeqCst)).await;
    }

    /// The session could not be carried over to a new connection: says so and ends it.
    fn give_up(&self, reason: String, error: Error) {
        self.event(SessionEvent::GaveUp { reason });
        self.end(error, close_code::NO_ERROR);
    }

    fn event(&self, e: SessionEvent) {
        debug!(event = ?e, "session event");
        if let Some(events) = self.events.get() {
            let _ = events.send(e);
        }
    }

    /// Ends the session (once): closes the connection, wakes every waiter, runs the end hook.
    fn end(&self, why: Error, code: u32) {
        if self.ending.set(why).is_err() {
            return;
        }
        self.link().conn.close(VarInt::from_u32(code), b"session ended");
        // Before anyone waiting for the end is let go: once `closed` returns, the node has
        // retired the peer's epoch.
        if let Some(hook) = self.on_end.lock().unwrap_or_else(|e| e.into_inner()).take() {
            hook(self.tally.session.snapshot());
        }
        self.finished.store(true, Ordering::SeqCst);
        self.ended_signal.notify_waiters();
        self.event(SessionEvent::Ended);
        // Calls still waiting fail with the session's error.
        self.rpc.fail_pending();
        self.arrived.notify_waiters();
        self.room.notify_waiters();
        self.work.notify_one();
    }

    /// Queues a channel message; fails with [`Error::Full`] when the outbox is full. `user` is
    /// false for the library's own reserved channels, which do not count against
    /// `max_channels`.
    fn push(&self, channel: u16, payload: Bytes, user: bool) -> Result<u64> {
        if payload.len() > self.max_send {
            return Err(Error::MessageTooLarge { size: payload.len(), limit: self.max_send });
        }
        if self.is_ended() {
            return Err(self.error());
        }
        let (seq, in_flight) = {
            let now = self.now();
            self.core().push(channel, payload, user, now).map_err(push_error)?
        };
        // A message joining few others is written at once (latency); a busy outbox is left to
        // the driver, which gathers a batch into fewer, fuller packets (throughput).
        if in_flight <= WRITE_AT_ONCE_MAX_IN_FLIGHT {
            self.transmit_now();
        } else {
            self.work.notify_one();
        }
        Ok(seq)
    }

    /// Like [`SessionShared::push`], but waits while the outbox is full.
    async fn send(&self, channel: u16, payload: Bytes, user: bool) -> Result<u64> {
        // The usual case, room in the outbox, registers no waiter: a registration takes the
        // `Notify`'s lock twice, against the reader that wakes waiters on every acknowledgement.
        match self.push(channel, payload.clone(), user) {
            Err(Error::Full { .. }) => {}
            other => return other,
        }
        loop {
            // Registered before trying again, so an acknowledgement in between is not missed.
            let acked = self.acked.notified();
            tokio::pin!(acked);
            acked.as_mut().enable();
            match self.push(channel, payload.clone(), user) {
                Err(Error::Full { .. }) => {}
                other => return other,
            }
            tokio::select! {
                _ = &mut acked => {}
                _ = self.ended() => return Err(self.error()),
            }
        }
    }

    /// The error callers see: why the session ended, else why the current connection did.
    fn error(&self) -> Error {
        match self.ending.get() {
            Some(e) => e.clone(),
            None => self.link().error(),
        }
    }

    /// Closes `link` for a violation, recorded (and counted) by the core.
    fn violation(&self, link: &Carrier, v: Violation) {
        let v = self.core().violation(v);
        link.violation(v);
    }

    /// Readies a connection to be served by the session's task ([`run`]): its writer, and
    /// its control stream for the reader.
    /// `opened` is a channel stream the handshake already opened and wrote on.
    fn run_link(
        self: &Arc<Self>,
        link: Arc<Carrier>,
        control: (SendStream, RecvStream),
        opened: Option<(u16, (SendStream, RecvStream))>,
    ) {
        let (control_send, control_recv) = control;
        let mut writer = Writer::new(control_send);
        if let Some((channel, pair)) = opened {
            writer.streams.insert(channel, pair);
        }
        let _ = link.writer.set(tokio::sync::Mutex::new(writer));
        *link.control.lock().unwrap_or_else(|e| e.into_inner()) = Some(control_recv);
    }

    /// Puts a new connection under the session: fresh keys (the replay windows stay), the
    /// connection readied for the session's task, and every unacknowledged message due again.
    fn attach(self: &Arc<Self>, parts: LinkParts) {
        let now = self.now();
        let number = {
            let mut core = self.core();
            core.new_connection(parts.keys, now);
            core.connections()
        };
        let link = Carrier::new(parts.conn, number);
        *self.link.lock().unwrap_or_else(|e| e.into_inner()) = link.clone();
        self.run_link(link, parts.control, None);
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.generation_signal.notify_waiters();
        self.work.notify_one();
    }
}

struct SessionInner {
    shared: Arc<SessionShared>,
    peer: Arc<PeerIdentity>,
    manual_ack: bool,
    /// The session's one task ([`run`]).
    task: JoinHandle<()>,
}

impl Drop for SessionInner {
    fn drop(&mut self) {
        self.shared.end(Error::Closed, close_code::NO_ERROR);
        self.task.abort();
    }
}

/// A session with one peer: mutually authenticated, surviving the loss of its connection.
/// Cheap to clone.
///
/// When the connection is lost (network failure, idle timeout, [`Session::force_reconnect`]),
/// the dialling side reconnects with backoff, re-authenticates with mutual TLS and resumes the
/// same session; unacknowledged messages are resent and the receiver drops what it already
/// had, so each channel message is delivered exactly once, in order. The session gives up after
/// `Limits::resume_timeout`. Follow it with [`Session::events`].
///
/// The session ends when the last clone is dropped or [`Session::close`] is called, at once:
/// messages not yet acknowledged may be lost. Call [`Session::delivered`] first when they
/// matter.
#[derive(Clone)]
pub struct Session {
    inner: Arc<SessionInner>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("peer", &self.inner.peer.display_name())
            .field("remote", &self.inner.shared.link().conn.remote_address())
            .finish()
    }
}

/// A new session's first connection, as the handshake leaves it.
pub(crate) struct FirstLink {
    pub(crate) conn: Connection,
    pub(crate) control: (SendStream, RecvStream),
    /// The stream of the channel whose first message went out right behind the dialler's
    /// HELLO ([`send_first`]), with its header and that message already written.
    pub(crate) opened: Option<(u16, (SendStream, RecvStream))>,
}

/// What [`Session::start`] needs besides the connection.
pub(crate) struct SessionParams {
    pub(crate) peer: PeerIdentity,
    /// The session's protocol state, over the first connection's keys, with the peer's HELLO
    /// settled (and, for a dialler, a first message it sent early).
    pub(crate) core: SessionCore,
    /// When the core's clock started: its `now` is milliseconds since.
    pub(crate) started: Instant,
    /// The node's budget for received-but-unread bytes.
    pub(crate) unread_budget: Arc<UnreadBudget>,
    pub(crate) resume: ResumePolicy,
    /// How to dial again (the dialling side); `None` on the accepting side, which waits.
    pub(crate) redial: Option<Redial>,
    /// Runs once when the session ends, with its final counters.
    pub(crate) on_end: EndHook,
    /// The node's RPC server.
    pub(crate) rpc: Arc<RpcServer>,
    /// The node's durable layer, if it keeps a store.
    pub(crate) durable: Option<Arc<Durable<Outlet>>>,
}

/// A handle the node keeps to resume a session when its peer reconnects.
#[derive(Clone)]
pub(crate) struct Resumable {
    shared: std::sync::Weak<SessionShared>,
}

impl Resumable {
    /// The session's own epoch, if it still exists.
    pub(crate) fn epoch(&self) -> Option<u64> {
        self.shared.upgrade().filter(|s| !s.is_ended()).map(|s| s.epoch)
    }

    /// Attaches a new connection; false if the session is gone.
    pub(crate) fn resume(&self, parts: LinkParts) -> bool {
        let Some(shared) = self.shared.upgrade() else { return false };
        if shared.is_ended() {
            return false;
        }
        // Close what is left of the old connection before the new one takes over.
        let old = shared.link();
        old.reconnecting.store(true, Ordering::Relaxed);
        old.conn.close(VarInt::from_u32(close_code::RECONNECT), b"resumed elsewhere");
        shared.attach(parts);
        shared.event(SessionEvent::Resumed);
        shared.tally.add(Counter::reconnects, 1);
        true
    }
}

impl Session {
    pub(crate) fn start(first: FirstLink, p: SessionParams) -> Session {
        let config = p.core.config();
        let manual_ack = !config.inbox.auto_ack;
        let FirstLink { conn, control, opened } = first;
        let peer = Arc::new(p.peer);
        let outbox_messages = config.outbox.max_messages;
        let (epoch, max_send) = (config.epoch, config.max_send);
        let tally = p.core.tally().clone();
        let shared = Arc::new(SessionShared {
            // The first connection is number 1.
            link: Mutex::new(Carrier::new(conn.clone(), 1)),
            generation: AtomicU64::new(0),
            generation_signal: Notify::new(),
            ending: OnceLock::new(),
            finished: AtomicBool::new(false),
            ended_signal: Notify::new(),
            events: OnceLock::new(),
            on_end: Mutex::new(Some(p.on_end)),
            epoch,
            unread_budget: p.unread_budget.clone(),
            core: Mutex::new(Core { state: p.core, node: p.unread_budget, accounted: 0 }),
            tally,
            started: p.started,
            work: Notify::new(),
            drive_sleeps_until: AtomicU64::new(0),
            arrived: Notify::new(),
            room: Notify::new(),
            acked: Notify::new(),
            max_send,
            rpc: Arc::new(SessionRpc::new(p.rpc, peer.clone(), outbox_messages)),
            rpc_taking: Mutex::new(()),
            durable: p.durable.as_ref().map(Arc::downgrade),
            durable_rx: OnceLock::new(),
            peer_names: peer.names_digest,
        });
        // The first connection: its keys are already in the core.
        shared.run_link(shared.link(), control, opened);
        let task = tokio::spawn(run(shared.clone(), p.resume, p.redial));
        Session { inner: Arc::new(SessionInner { shared, peer, manual_ack, task }) }
    }

    /// The session's handle for the node's layers (durable channels).
    pub(crate) fn outlet(&self) -> Outlet {
        Outlet(self.inner.shared.clone())
    }

    pub(crate) fn resumable(&self) -> Resumable {
        Resumable { shared: Arc::downgrade(&self.inner.shared) }
    }

    /// The authenticated peer.
    pub fn peer(&self) -> &PeerIdentity {
        &self.inner.peer
    }

    /// The peer's UDP address (of the current connection).
    pub fn remote_address(&self) -> SocketAddr {
        self.inner.shared.link().conn.remote_address()
    }

    /// This side's session epoch (random per session, kept across reconnects).
    pub fn epoch(&self) -> u64 {
        self.inner.shared.epoch
    }

    /// Whether the session is over (closed, or gave up).
    pub fn is_ended(&self) -> bool {
        self.inner.shared.is_ended()
    }

    /// Session events: disconnections, reconnection attempts, resumption, giving up. The last
    /// 16 are kept for a receiver that falls behind; beyond, it gets
    /// [`RecvError::Lagged`](tokio::sync::broadcast::error::RecvError::Lagged) and goes on with
    /// the newest.
    pub fn events(&self) -> broadcast::Receiver<SessionEvent> {
        self.inner.shared.events.get_or_init(|| broadcast::channel(EVENT_BACKLOG).0).subscribe()
    }

    /// Closes the current connection and carries on over a new one (the dialling side
    /// reconnects; the accepting side waits for it). Unacknowledged messages are resent. Useful
    /// to move to a fresh connection, and to test that nothing is lost when one dies.
    pub fn force_reconnect(&self) {
        let link = self.inner.shared.link();
        link.reconnecting.store(true, Ordering::Relaxed);
        link.conn.close(VarInt::from_u32(close_code::RECONNECT), b"reconnect");
    }

    /// What this session sent, delivered and refused so far, with the reliability layer's
    /// current state (messages and bytes in flight, round-trip estimate).
    pub fn stats(&self) -> Stats {
        let mut s = self.inner.shared.tally.session.snapshot();
        let core = self.inner.shared.core();
        let (messages, bytes) = core.in_flight();
        s.in_flight_messages = messages as u64;
        s.in_flight_bytes = bytes as u64;
        s.rtt_ms = core.srtt().unwrap_or(0);
        s
    }

    /// The largest payload this session will send: the smaller of our limit and the peer's.
    pub fn max_message_size(&self) -> usize {
        self.inner.shared.max_send
    }

    /// Sends a typed message on `channel` (postcard encoding). Returns its sequence number.
    pub async fn send<T: Serialize + ?Sized>(&self, channel: u16, message: &T) -> Result<u64> {
        let bytes = postcard::to_allocvec(message)?;
        self.send_bytes(channel, bytes).await
    }

    /// Sends raw bytes on `channel`; waits while the outbox is full. Returns the message's
    /// sequence number on the channel.
    ///
    /// Messages on one channel arrive in order, exactly once; channels are independent. The
    /// message is kept and resent (across reconnects too) until the peer's application
    /// acknowledged it: see [`Session::delivered`] and [`Session::wait_acked`].
    pub async fn send_bytes(&self, channel: u16, payload: impl Into<Bytes>) -> Result<u64> {
        reserved(channel)?;
        self.inner.shared.send(channel, payload.into(), true).await
    }

    /// Sends a typed message on `channel` durably (postcard encoding); see
    /// [`Session::send_durable_bytes`].
    pub async fn send_durable<T: Serialize + ?Sized>(&self, channel: u16, message: &T) -> Result<Stored> {
        let bytes = postcard::to_allocvec(message)?;
        self.send_durable_bytes(channel, bytes).await
    }

    /// Sends raw bytes on `channel` **durably** (PROTOCOL.md section 10): returns once the
    /// message is in this node's store, on disk, with its place in this node's stream to the
    /// peer (the returned [`Stored`] names it). From then on it reaches the peer's application
    /// exactly once ([`Node::recv_durable`](crate::Node::recv_durable)), in order, even if
    /// either process is killed and restarted: it is sent on the newest session with the same
    /// peer (this one, or the next if this one ends first) until the peer's store holds it. If
    /// this node dialled the peer and every session with it has ended (the peer restarted and
    /// no longer knows this one), the node dials it again by itself while messages wait; this
    /// handle can go on being used for durable sends.
    ///
    /// Needs a store ([`NodeConfig::store`](crate::NodeConfig::store)) on both nodes.
    /// Errors: [`Error::Config`] without one, [`Error::MessageTooLarge`] beyond
    /// [`Session::max_message_size`] less 27 bytes, [`Error::Store`] if the store fails;
    /// waits while the store's outbox is full.
    pub async fn send_durable_bytes(&self, channel: u16, payload: impl Into<Bytes>) -> Result<Stored> {
        reserved(channel)?;
        let shared = &self.inner.shared;
        let Some(durable) = &shared.durable else {
            return Err(durable::no_store());
        };
        let durable = durable.upgrade().ok_or(Error::Closed)?;
        let payload = payload.into();
        let limit = shared.max_send.saturating_sub(crate::proto::durable::DATA_OVERHEAD);
        if payload.len() > limit {
            return Err(Error::MessageTooLarge { size: payload.len(), limit });
        }
        durable.send(shared.peer_names, &Outlet(shared.clone()), channel, payload).await
    }

    /// Like [`Session::send_bytes`], but fails with [`Error::Full`] instead of waiting when the
    /// outbox is full.
    pub fn try_send_bytes(&self, channel: u16, payload: impl Into<Bytes>) -> Result<u64> {
        reserved(channel)?;
        self.inner.shared.push(channel, payload.into(), true)
    }

    /// Sends `payload` as one QUIC datagram on `channel`: it may be lost, duplicated copies and
    /// replays are refused, and it may arrive out of order (inside the replay window). Returns
    /// its sequence number (datagrams have their own sequence per channel).
    ///
    /// Errors: [`Error::DatagramsUnsupported`] when the peer or path cannot carry datagrams,
    /// [`Error::MessageTooLarge`] when the payload does not fit in one (see
    /// [`Session::max_datagram_size`]).
    pub async fn send_datagram(&self, channel: u16, payload: impl Into<Bytes>) -> Result<u64> {
        let payload = payload.into();
        let shared = &self.inner.shared;
        let link = shared.link();
        let limit = self.max_datagram_size()?;
        if payload.len() > limit {
            return Err(Error::MessageTooLarge { size: payload.len(), limit });
        }
        let mut frame = Vec::with_capacity(payload.len() + MESSAGE_OVERHEAD);
        let sealed = shared.core().seal_datagram(channel, &payload, now_ms(), &mut frame);
        let seq = match sealed {
            Ok((seq, wants_fresh_key)) => {
                if wants_fresh_key {
                    shared.fresh_key(&link, "the message key reached half its usage limit");
                }
                seq
            }
            Err(DatagramError::TooManyChannels(limit)) => {
                return Err(Error::Limit { what: Limited::DatagramChannelsPerSession, limit: u64::from(limit) });
            }
            Err(DatagramError::Seal(e)) => {
                if e == SealError::KeyExhausted {
                    shared.fresh_key(&link, "the message key reached its usage limit");
                }
                return Err(seal_error(e));
            }
        };
        link.conn.send_datagram(frame.into()).map_err(|e| match e {
            quinn::SendDatagramError::UnsupportedByPeer => {
                Error::DatagramsUnsupported("the peer does not accept datagrams")
            }
            quinn::SendDatagramError::Disabled => Error::DatagramsUnsupported("datagrams are turned off locally"),
            quinn::SendDatagramError::TooLarge => Error::MessageTooLarge { size: payload.len(), limit },
            quinn::SendDatagramError::ConnectionLost(_) => shared.error(),
        })?;
        shared.tally.add(Counter::datagrams_sent, 1);
        Ok(seq)
    }

    /// The largest datagram payload the path and the peer allow now (it can change with the
    /// path MTU), or [`Error::DatagramsUnsupported`].
    pub fn max_datagram_size(&self) -> Result<usize> {
        let link = self.inner.shared.link();
        let quic =
            link.conn.max_datagram_size().ok_or(Error::DatagramsUnsupported("the peer does not accept datagrams"))?;
        Ok(quic.saturating_sub(MESSAGE_OVERHEAD).min(self.inner.shared.max_send))
    }

    /// Waits until the peer's application has taken every message sent so far on `channel`.
    pub async fn delivered(&self, channel: u16) -> Result<()> {
        let target = self.inner.shared.core().last_seq(channel);
        self.wait_until(|core| core.all_acked_through(channel, target)).await
    }

    /// Waits for the delivery receipt of message `seq` of `channel`: the peer's application took
    /// it.
    pub async fn wait_acked(&self, channel: u16, seq: u64) -> Result<()> {
        self.wait_until(|core| core.is_acked(channel, seq)).await
    }

    async fn wait_until(&self, done: impl Fn(&Core) -> bool) -> Result<()> {
        let shared = &self.inner.shared;
        // Already done: no waiter registered (see `SessionShared::send`).
        if done(&shared.core()) {
            return Ok(());
        }
        loop {
            // Registered before checking again, so an acknowledgement in between is not missed.
            let acked = shared.acked.notified();
            tokio::pin!(acked);
            acked.as_mut().enable();
            if done(&shared.core()) {
                return Ok(());
            }
            tokio::select! {
                _ = &mut acked => {}
                _ = shared.ended() => {
                    // The last acknowledgement may have raced the end.
                    return if done(&shared.core()) { Ok(()) } else { Err(shared.error()) };
                }
            }
        }
    }

    /// Receives the next message: channel messages in order per channel, exactly once, and
    /// datagrams as they come. Waits across reconnects.
    ///
    /// In the default mode the message is acknowledged to the sender when this returns it; in
    /// manual-ack mode ([`NodeConfig::manual_ack`](crate::NodeConfig::manual_ack)) only when
    /// [`Session::ack`] is called. Returns an error once the session has ended and nothing is
    /// left: its kind says why (closed by the peer, protocol violation, gave up...).
    pub async fn recv(&self) -> Result<Message> {
        let mut one = None;
        self.take_or_wait(1, |m| one = Some(m)).await?;
        Ok(one.expect("take_or_wait hands over at least one message"))
    }

    /// Like [`Session::recv`], for receivers that keep up with many messages: waits until at
    /// least one message is ready, then appends to `into` every message ready now, at most
    /// `limit`, in the order `recv` would return them, and returns how many it appended (0 only
    /// when `limit` is 0). Taking a batch costs one pass over the session's state instead of one
    /// per message, and the acknowledgements of the batch go out together.
    ///
    /// Acknowledged as by `recv`: when returned in the default mode, by [`Session::ack`] in
    /// manual-ack mode. Returns an error once the session has ended and nothing is left.
    pub async fn recv_many(&self, into: &mut Vec<Message>, limit: usize) -> Result<usize> {
        if limit == 0 {
            return Ok(0);
        }
        self.take_or_wait(limit, |m| into.push(m)).await
    }

    /// Waits until at least one message is ready (or the session ended with nothing left), then
    /// hands up to `limit` (at least 1) to `put`; returns how many.
    async fn take_or_wait(&self, limit: usize, mut put: impl FnMut(Message)) -> Result<usize> {
        let shared = &self.inner.shared;
        // Messages ready: no waiter registered (see `SessionShared::send`).
        let taken = self.take_messages(limit, &mut put);
        if taken > 0 {
            return Ok(taken);
        }
        loop {
            // Registered before taking again, so a message arriving in between is not missed.
            let arrived = shared.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            let taken = self.take_messages(limit, &mut put);
            if taken > 0 {
                return Ok(taken);
            }
            if shared.is_ended() {
                return Err(shared.error());
            }
            tokio::select! {
                _ = &mut arrived => {}
                _ = shared.ended() => {}
            }
        }
    }

    /// Hands up to `limit` deliverable messages to `put`, in order, under one lock of the core;
    /// returns how many.
    fn take_messages(&self, limit: usize, mut put: impl FnMut(Message)) -> usize {
        let shared = &self.inner.shared;
        let now = shared.now();
        let mut core = shared.core();
        let mut taken = 0;
        while taken < limit {
            let Some(d) = core.poll_deliver(now) else { break };
            put(Message {
                peer: self.inner.peer.clone(),
                kind: d.kind,
                channel: d.channel,
                seq: d.seq,
                payload: d.payload,
            });
            taken += 1;
        }
        if taken > 0 {
            // An acknowledgement may be due.
            shared.kick(&core);
            drop(core);
            // Room for readers.
            shared.room.notify_waiters();
        }
        taken
    }

    /// Acknowledges a message received in manual-ack mode (idempotent; datagrams and auto-ack
    /// sessions need no acknowledgement). Returns whether this acknowledged something new.
    pub fn ack(&self, message: &Message) -> bool {
        if !self.inner.manual_ack || message.is_datagram() {
            return false;
        }
        let shared = &self.inner.shared;
        let now = shared.now();
        let mut core = shared.core();
        let newly = core.ack(message.channel, message.seq, now);
        if newly {
            // The acknowledgement goes out like the automatic ones (see `take_messages`).
            shared.kick(&core);
        }
        newly
    }

    /// Ends the session; the peer sees a normal close.
    pub fn close(&self) {
        self.inner.shared.end(Error::Closed, close_code::NO_ERROR);
    }

    /// Waits until the session has ended and returns why.
    pub async fn closed(&self) -> Error {
        let shared = &self.inner.shared;
        shared.ended().await;
        shared.error()
    }

    /// Calls `method` on the peer with a typed request (postcard) and waits at most `timeout`
    /// for its typed response. See [`Session::request_bytes`] for the errors.
    ///
    /// ```no_run
    /// # async fn run(session: quicseal::Session) -> quicseal::Result<()> {
    /// use std::time::Duration;
    /// let sum: u64 = session.request("add", &(2u64, 3u64), Duration::from_secs(1)).await?;
    /// assert_eq!(sum, 5);
    /// # Ok(()) }
    /// ```
    pub async fn request<Req, Resp>(&self, method: &str, request: &Req, timeout: Duration) -> Result<Resp>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        self.request_with(method, request, CallOptions::new(timeout)).await
    }

    /// [`Session::request`] with [`CallOptions`].
    pub async fn request_with<Req, Resp>(&self, method: &str, request: &Req, options: CallOptions) -> Result<Resp>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        rpc::typed(request, |body| self.request_bytes(method, body, options)).await
    }

    /// Calls `method` on the peer with raw bytes and waits for the raw response.
    ///
    /// The request is a sealed channel message like any other: it is resent across reconnects
    /// and runs at most once on the server. Dropping the returned future before it completes
    /// cancels the call on the server (the handler sees [`Call::cancelled`](crate::Call::cancelled)).
    ///
    /// Errors: [`Error::Timeout`] when `options.timeout` passes (here or at the server);
    /// [`Error::Remote`] when the server answered with an error (the handler's
    /// [`ApplicationError`](crate::ApplicationError), unknown method, overloaded, handler panic,
    /// request too large...); [`Error::MessageTooLarge`] when the request does not fit in one
    /// message; the session's error when it ends first.
    pub async fn request_bytes(&self, method: &str, body: impl Into<Bytes>, options: CallOptions) -> Result<Bytes> {
        let call = CallId { epoch: self.epoch(), id: self.inner.shared.rpc.next_id() };
        self.call(call, method, body.into(), options.idempotent, deadline_after(options.timeout)).await
    }

    /// Makes a call with a given identity (an [`RpcClient`](crate::RpcClient) retrying it keeps
    /// the same one).
    pub(crate) async fn call(
        &self,
        call: CallId,
        method: &str,
        body: Bytes,
        idempotent: bool,
        deadline: Instant,
    ) -> Result<Bytes> {
        let outlet = Outlet(self.inner.shared.clone());
        self.inner.shared.rpc.call(&outlet, call, method, body, idempotent, deadline).await
    }
}

/// The RPC layer's handle on a session: sends on the reserved channels, counts, and tells
/// whether the session ended. It does not keep the session open (only [`Session`] handles do).
#[derive(Clone)]
pub(crate) struct Outlet(Arc<SessionShared>);

impl rpc::Outlet for Outlet {
    async fn send(&self, channel: u16, payload: Bytes) -> Result<()> {
        self.0.send(channel, payload, false).await.map(drop)
    }
    fn try_send(&self, channel: u16, payload: Bytes) -> Result<()> {
        self.0.push(channel, payload, false).map(drop)
    }
    fn max_send(&self) -> usize {
        self.0.max_send
    }
    fn is_ended(&self) -> bool {
        self.0.is_ended()
    }
    fn error(&self) -> Error {
        self.0.error()
    }
    fn count_n(&self, c: Counter, n: u64) {
        if n > 0 {
            self.0.tally.add(c, n);
        }
    }
    fn take_waiting_requests(&self) {
        take_rpc(self);
    }
}

impl durable::Link for Outlet {
    async fn send_frame(&self, frame: Bytes) -> Result<()> {
        self.0.send(DURABLE_CHANNEL, frame, false).await.map(drop)
    }
    fn take_frame(&self) -> Option<Bytes> {
        let now = self.0.now();
        self.0.core().poll_deliver_channel(DURABLE_CHANNEL, now).map(|(_, payload)| payload)
    }
    async fn ended(&self) {
        self.0.ended().await
    }
    fn is_ended(&self) -> bool {
        self.0.is_ended()
    }
    fn same(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
    fn violation(&self, reason: String) {
        self.0.violation(&self.0.link(), Violation::Durable(reason));
    }
    fn end_for_store(&self, error: Error) {
        self.0.end(error, close_code::NO_ERROR);
    }
    fn rx(&self) -> Arc<durable::Rx> {
        self.0.durable_rx.get_or_init(Arc::default).clone()
    }
}

thread_local! {
    /// The session whose RPC frames this thread is taking (`take_rpc`), if any.
    static TAKING_RPC: std::cell::Cell<*const SessionShared> = const { std::cell::Cell::new(std::ptr::null()) };
}

/// Marks this thread as taking a session's RPC frames until dropped (then restores the mark it
/// replaced), also when a handler unwinds.
struct Taking(*const SessionShared);

impl Drop for Taking {
    fn drop(&mut self) {
        TAKING_RPC.set(self.0);
    }
}

/// Takes the RPC frames waiting on the reserved channels, in order: responses always (they
/// complete our calls), requests while the session owes few enough answers. Channel readers
/// call it as soon as an RPC frame arrives (no task hop on the way to the handler or the
/// caller); an answer being queued calls it too, for the requests left waiting while the session
/// owed too many answers. Returns whether it took any.
fn take_rpc(outlet: &Outlet) -> bool {
    let shared = &outlet.0;
    let rpc = &shared.rpc;
    let this = Arc::as_ptr(shared);
    if TAKING_RPC.get() == this {
        // A handler's first poll, run by this very taking (`run_here_or_spawn`), answered: the
        // taking's loop asks `may_take_request` again before its next request.
        return false;
    }
    let took = {
        let _in_order = shared.rpc_taking.lock().unwrap_or_else(|e| e.into_inner());
        let _taking = Taking(TAKING_RPC.replace(this));
        drain(shared, rpc::RESPONSE_CHANNEL, || true, |p| rpc.on_response(outlet, p))
            | drain(shared, rpc::REQUEST_CHANNEL, || rpc.may_take_request(), |p| rpc.on_request(outlet, p))
    };
    if took {
        // Room for channel readers; acknowledgements may be due.
        shared.room.notify_waiters();
        shared.kick(&shared.core());
    }
    took
}

/// Hands the messages of a reserved channel to `handle`, in order, while `more` allows; a
/// handler's `Err` is a protocol violation that closes the connection. Returns whether it took
/// any.
fn drain(
    shared: &SessionShared,
    channel: u16,
    more: impl Fn() -> bool,
    mut handle: impl FnMut(&Bytes) -> std::result::Result<(), String>,
) -> bool {
    let mut took = false;
    while more() {
        let now = shared.now();
        let next = shared.core().poll_deliver_channel(channel, now);
        let Some((_, payload)) = next else { break };
        took = true;
        if let Err(reason) = handle(&payload) {
            shared.violation(&shared.link(), Violation::Rpc(reason));
            break;
        }
    }
    took
}

/// The session's task: serves the current connection ([`serve`]); when it is lost, carries
/// the session over to a new one (dialling side: reconnect with backoff; accepting side: wait
/// for the peer) or ends it. One task for all of it, so an idle session costs one task.
async fn run(shared: Arc<SessionShared>, policy: ResumePolicy, redial: Option<Redial>) {
    loop {
        let current = shared.generation.load(Ordering::SeqCst);
        let link = shared.link();
        let control = link.control.lock().unwrap_or_else(|e| e.into_inner()).take();
        let serving = async {
            if let Some(control) = control {
                serve(shared.clone(), link.clone(), control).await;
            }
            link.conn.closed().await;
        };
        // Resumed by the node on a new connection while this one still looked alive (the node
        // closed the old one): serve the new one. The link, not the generation, is compared: a
        // connection attached between the two loads above is the one being served.
        let replaced = crate::wait::until(&shared.generation_signal, || !Arc::ptr_eq(&shared.link(), &link));
        tokio::select! {
            _ = serving => {}
            _ = replaced => continue,
        }
        if shared.is_ended() {
            return;
        }
        if !link.resumable() {
            let error = link.error();
            let code =
                if matches!(error, Error::Closed) { close_code::NO_ERROR } else { close_code::PROTOCOL_VIOLATION };
            shared.end(error, code);
            return;
        }
        let reason = link.error().to_string();
        shared.event(SessionEvent::Disconnected { reason: reason.clone() });
        // Boxed: the recovery's state exists only while recovering, not in every idle session's
        // task.
        let recovered = Box::pin(recover(&shared, policy, redial.as_ref(), current)).await;
        if !recovered {
            return;
        }
    }
}

/// Carries a session whose connection was lost over to a new one: redials with backoff (the
/// dialling side), or waits for the peer to (the accepting side). Returns false when the session
/// ended instead.
async fn recover(shared: &Arc<SessionShared>, policy: ResumePolicy, redial: Option<&Redial>, current: u64) -> bool {
    let deadline = Instant::now() + policy.give_up_after;
    match redial {
        Some(redial) => {
            let mut backoff = policy.backoff_min;
            let mut attempt = 0u32;
            loop {
                attempt += 1;
                shared.event(SessionEvent::Reconnecting { attempt });
                match tokio::time::timeout_at(deadline, redial()).await {
                    Ok(Ok(parts)) => {
                        shared.attach(parts);
                        shared.tally.add(Counter::reconnects, 1);
                        shared.event(SessionEvent::Resumed);
                        break;
                    }
                    // Only a definitive refusal ends the session: the peer's policy or TLS stack
                    // refused us, or it has no such session or epoch (a protocol violation). A
                    // node refusing connections under load (`Refused`), a timeout or a lost
                    // network is retried until the resume timeout.
                    Ok(Err(e)) if e.is_refusal_by_peer() || matches!(e, Error::ProtocolViolation { .. }) => {
                        shared.give_up(e.to_string(), e);
                        return false;
                    }
                    Ok(Err(e)) => {
                        debug!(attempt, error = %e, "reconnection attempt failed");
                        let wake = (Instant::now() + backoff).min(deadline);
                        if wake < deadline {
                            tokio::time::sleep_until(wake).await;
                            backoff = (backoff * 2).min(policy.backoff_max);
                            continue;
                        }
                    }
                    // The deadline passed during the attempt.
                    Err(_) => {}
                }
                let e = Error::Timeout { what: Timed::SessionResumption };
                shared.give_up(format!("no connection after {attempt} attempts"), e);
                return false;
            }
        }
        None => {
            // The peer dials again; the node attaches its new connection (Resumable).
            let resumed = tokio::time::timeout_at(deadline, shared.generation_changed(current)).await;
            if resumed.is_err() {
                let e = Error::Timeout { what: Timed::SessionResumption };
                shared.give_up("the peer did not come back in time".into(), e);
                return false;
            }
        }
    }
    true
}

/// What writes one connection's frames: its streams, and the frames quinn has not taken yet
/// (the core seals them, see [`SessionCore::poll_transmit`]). The driver task uses it, and so
/// does a sender that finds it free ([`SessionShared::transmit_now`]): that sender writes its own
/// message without a hop through the driver, and without ever waiting on the network. The
/// driver keeps it while it sleeps, so that happens only between the driver's turns.
struct Writer {
    /// The control stream (ACK frames), and the ACK frames quinn has not taken yet.
    control: SendStream,
    control_backlog: VecDeque<Bytes>,
    /// Channel streams (nothing comes back on them; the receive half is kept so the stream
    /// stays open both ways, as the peer expects).
    streams: ChannelMap<u16, (SendStream, RecvStream)>,
    /// Per channel, in order: frames (and a new stream's header) that quinn has not taken yet.
    backlog: Vec<(u16, VecDeque<Bytes>)>,
}

/// Why a connection's writer stopped.
enum WriteFailure {
    /// The connection is gone (its close reason tells why).
    Gone,
    /// The core cannot go on over this connection: fresh keys needed, or a frame could not be
    /// sealed.
    Stop(Stop),
}

impl Writer {
    fn new(control: SendStream) -> Writer {
        Writer { control, control_backlog: VecDeque::new(), streams: ChannelMap::default(), backlog: Vec::new() }
    }

    /// Takes what the core wants written now (acknowledgements due, and up to a batch of sealed
    /// frames) into the backlog. Returns whether the batch was full (there may be more).
    /// The writer of a connection the session has left takes nothing (`Gone`).
    fn take(&mut self, shared: &SessionShared, link: &Carrier) -> Result<bool, WriteFailure> {
        let now = shared.now();
        // Nothing is taken for a channel whose earlier frames quinn has not taken yet (flow
        // control): its messages stay due, are not sealed long before they can leave, and do
        // not hold up the other channels.
        let backlog = &self.backlog;
        let out = shared
            .core_for(link)
            .ok_or(WriteFailure::Gone)?
            .poll_transmit(now, now_ms(), |c| backlog.iter().any(|(b, _)| *b == c))
            .map_err(WriteFailure::Stop)?;
        if let Some(acks) = out.control {
            self.control_backlog.push_back(acks);
        }
        // New messages are sealed here, outside the core's lock (readers and senders of this
        // session need it meanwhile), then handed back for resends.
        let mut sealed = Vec::with_capacity(out.frames.len());
        for (channel, o) in out.frames {
            let frame = seal_one(channel, o, &mut sealed);
            match self.backlog.iter_mut().find(|(c, _)| *c == channel) {
                Some((_, frames)) => frames.push_back(frame),
                None => self.backlog.push((channel, VecDeque::from([frame]))),
            }
        }
        if !sealed.is_empty() {
            shared.core().record_sealed(out.connection, sealed);
        }
        Ok(out.more)
    }

    /// Hands quinn what it takes now, without waiting: opens missing streams if the peer's
    /// stream limit allows, writes while flow control allows. Returns whether frames remain.
    fn flush_now(&mut self, conn: &Connection) -> Result<bool, WriteFailure> {
        use futures_util::FutureExt;
        write_now(&mut self.control, &mut self.control_backlog)?;
        let mut i = 0;
        while i < self.backlog.len() {
            let channel = self.backlog[i].0;
            if !self.streams.contains_key(&channel) {
                match conn.open_bi().now_or_never() {
                    Some(Ok(pair)) => self.add_stream(channel, pair),
                    Some(Err(_)) => return Err(WriteFailure::Gone),
                    None => {
                        i += 1;
                        continue;
                    }
                }
            }
            let (send, _) = self.streams.get_mut(&channel).expect("opened above");
            write_now(send, &mut self.backlog[i].1)?;
            if self.backlog[i].1.is_empty() {
                self.backlog.swap_remove(i);
            } else {
                i += 1;
            }
        }
        Ok(!self.backlog.is_empty() || !self.control_backlog.is_empty())
    }

    /// Waits until quinn takes more of the backlog, and hands it over: the first stream whose
    /// flow control opens takes what it can, or the peer's stream limit lets a missing channel
    /// stream open. Streams wait side by side, so one blocked channel holds up no other.
    async fn progress(&mut self, conn: &Connection) -> Result<(), WriteFailure> {
        use futures_util::FutureExt;
        use futures_util::future::{BoxFuture, select_all};
        /// What a wait brought: frames written, or a channel's new stream.
        enum Progress {
            Wrote,
            Opened(u16, (SendStream, RecvStream)),
        }
        let mut waits: Vec<BoxFuture<'_, Result<Progress, WriteFailure>>> = Vec::new();
        let (control, control_backlog) = (&mut self.control, &mut self.control_backlog);
        if !control_backlog.is_empty() {
            waits.push(Box::pin(write_some(control, control_backlog).map(|r| r.map(|()| Progress::Wrote))));
        }
        let mut sends: ChannelMap<u16, &mut SendStream> = self.streams.iter_mut().map(|(&c, (s, _))| (c, s)).collect();
        let mut opening = None;
        for (channel, frames) in self.backlog.iter_mut() {
            match sends.remove(channel) {
                Some(send) => waits.push(Box::pin(write_some(send, frames).map(|r| r.map(|()| Progress::Wrote)))),
                None => opening = opening.or(Some(*channel)),
            }
        }
        if let Some(channel) = opening {
            waits.push(Box::pin(async move {
                let pair = conn.open_bi().await.map_err(|_| WriteFailure::Gone)?;
                Ok(Progress::Opened(channel, pair))
            }));
        }
        if waits.is_empty() {
            return Ok(());
        }
        let (progress, _, rest) = select_all(waits).await;
        drop(rest);
        if let Progress::Opened(channel, pair) = progress? {
            self.add_stream(channel, pair);
        }
        Ok(())
    }

    /// A new channel stream: its header goes first.
    fn add_stream(&mut self, channel: u16, pair: (SendStream, RecvStream)) {
        if let Some((_, frames)) = self.backlog.iter_mut().find(|(c, _)| *c == channel) {
            frames.push_front(channel_stream_header(channel));
        }
        self.streams.insert(channel, pair);
    }
}

/// Waits until `send` takes some of `frames`; what it took leaves the front of `frames`.
async fn write_some(send: &mut SendStream, frames: &mut VecDeque<Bytes>) -> Result<(), WriteFailure> {
    let written = send.write_chunks(frames.make_contiguous()).await.map_err(|_| WriteFailure::Gone)?;
    frames.drain(..written.chunks);
    Ok(())
}

/// The first bytes of a channel stream.
fn channel_stream_header(channel: u16) -> Bytes {
    Bytes::copy_from_slice(&wire::encode_stream_header(StreamKind::Channel(channel)))
}

/// Sends a new session's first message right behind the dialler's HELLO, before the
/// acceptor's HELLO arrives (PROTOCOL.md section 2, "The early message"): queued in `core` (made
/// with [`PeerHello::EARLY`](crate::proto::session::PeerHello::EARLY), whose bounds refuse what
/// might not fit the acceptor's limits), sealed under the connection's key and written on its
/// channel's new stream. `now` is the core's clock; `lost` says why the connection closed (the
/// acceptor may already have refused us: its refusal is the error, as it is for the HELLO).
/// The caller has refused a reserved `channel` ([`reserved`]). Returns the message's sequence
/// number and the stream, for the session's writer.
pub(crate) async fn send_first(
    conn: &Connection,
    core: &mut SessionCore,
    now: u64,
    channel: u16,
    payload: Bytes,
    lost: &impl Fn(quinn::ConnectionError) -> Error,
) -> Result<(u64, (SendStream, RecvStream))> {
    let (seq, _) = core.push(channel, payload, true, now).map_err(push_error)?;
    let out = core.poll_transmit(now, now_ms(), |_| false).map_err(|e| match e {
        Stop::Seal(e) => seal_error(e),
        Stop::FreshKeys(why) => Error::Internal(format!("a new key wants fresh keys: {why}")),
    })?;
    let (_, frames) = out.seal_all(core);
    let (mut send, recv) = conn.open_bi().await.map_err(lost)?;
    let mut chunks: Vec<Bytes> =
        std::iter::once(channel_stream_header(channel)).chain(frames.into_iter().map(|(_, f)| f)).collect();
    send.write_all_chunks(&mut chunks).await.map_err(|e| match e {
        quinn::WriteError::ConnectionLost(e) => lost(e),
        e => Error::ConnectionLost { reason: format!("the first message's stream: {e}") },
    })?;
    Ok((seq, (send, recv)))
}

/// Hands quinn what of `frames` flow control lets it take now, without waiting; what it took
/// leaves the front of `frames`.
fn write_now(send: &mut SendStream, frames: &mut VecDeque<Bytes>) -> Result<(), WriteFailure> {
    use futures_util::FutureExt;
    if frames.is_empty() {
        return Ok(());
    }
    match send.write_chunks(frames.make_contiguous()).now_or_never() {
        Some(Ok(written)) => {
            frames.drain(..written.chunks);
            Ok(())
        }
        Some(Err(_)) => Err(WriteFailure::Gone),
        None => Ok(()),
    }
}

impl SessionShared {
    /// Wakes the driver if the reliability core now has a timer (an acknowledgement due, a
    /// retransmission) earlier than the one the driver sleeps on; a wake-up that would find
    /// nothing to do costs a thread switch and is skipped.
    fn kick(&self, core: &Core) {
        if self.drive_would_miss(core.poll_timeout()) {
            self.work.notify_one();
        }
    }

    /// Whether the driver must be woken for a timer at `next`: it is awake (0: it may have
    /// computed its sleep before the timer existed; a wake-up then costs nothing but a permit),
    /// or it sleeps past `next`.
    fn drive_would_miss(&self, next: Option<u64>) -> bool {
        let sleeps_until = self.drive_sleeps_until.load(Ordering::SeqCst);
        sleeps_until == 0 || next.unwrap_or(u64::MAX) < sleeps_until
    }

    /// Called when a message was queued or received, or the application took one: writes what
    /// is due (the message, acknowledgements) at once if the connection's writer is free, else
    /// leaves it to the driver; wakes the driver only when it has something to do (frames quinn
    /// could not take yet, or a timer earlier than the one it sleeps on). The driver keeps the
    /// writer while it sleeps (see [`drive`]), so this usually wakes the driver.
    fn transmit_now(&self) {
        let link = self.link();
        let Some(writer) = link.writer.get() else { return self.work.notify_one() };
        let Ok(mut w) = writer.try_lock() else { return self.work.notify_one() };
        let remains = w.take(self, &link).and_then(|_| w.flush_now(&link.conn));
        drop(w);
        match remains {
            Ok(false) => self.kick(&self.core()),
            // Frames left for the driver, or a lost connection (which the driver notices).
            Ok(true) | Err(WriteFailure::Gone) => self.work.notify_one(),
            Err(WriteFailure::Stop(stop)) => self.stop(&link, stop),
        }
    }

    /// The core cannot go on over this connection.
    fn stop(&self, link: &Carrier, stop: Stop) {
        match stop {
            Stop::FreshKeys(why) => self.fresh_key(link, why),
            Stop::Seal(e) => link.seal_failed(e),
        }
    }

    /// Moves the session to a new connection for fresh message keys (see [`Stop::FreshKeys`]):
    /// closes this one with `RECONNECT`; the dialling side redials
    /// at once, the accepting side waits for it.
    fn fresh_key(&self, link: &Carrier, why: &str) {
        if link.reconnecting.swap(true, Ordering::SeqCst) {
            return;
        }
        debug!(reason = why, "moving to a new connection for fresh message keys");
        self.tally.add(Counter::rekeys, 1);
        link.conn.close(VarInt::from_u32(close_code::RECONNECT), b"fresh keys");
    }
}

/// The driver: takes what the reliability core wants sent (messages, acknowledgements) and
/// writes it to the connection, waiting on flow control where senders do not; sleeps until the
/// next deadline or new work.
async fn drive(shared: Arc<SessionShared>, link: Arc<Carrier>) {
    let Some(writer) = link.writer.get() else { return };
    // One timer for the driver's life, moved to each new deadline: a timer made anew at every
    // turn is registered anew, and one due before the runtime's next wake-up wakes the thread
    // that waits for I/O (a timer moved later is not registered again until it fires).
    let sleep = tokio::time::sleep_until(shared.started);
    tokio::pin!(sleep);
    let mut armed = None;
    loop {
        let work = shared.work.notified();
        tokio::pin!(work);
        work.as_mut().enable();
        // Awake: senders wake us for any timer (see `SessionShared::transmit_now`).
        shared.drive_sleeps_until.store(0, Ordering::SeqCst);
        let mut w = writer.lock().await;
        let written = w.take(&shared, &link).and_then(|full| w.flush_now(&link.conn).map(|remains| (full, remains)));
        let (batch_full, remains) = match written {
            Ok(r) => r,
            Err(WriteFailure::Gone) => return,
            Err(WriteFailure::Stop(stop)) => return shared.stop(&link, stop),
        };
        if batch_full && !remains {
            drop(w);
            tokio::task::consume_budget().await;
            continue;
        }
        // The core's next timer: a resend, an acknowledgement due, or the end of a worn-out
        // key's grace period.
        let deadline = shared.core().poll_timeout();
        shared.drive_sleeps_until.store(deadline.unwrap_or(u64::MAX), Ordering::SeqCst);
        if let Some(d) = deadline
            && armed != Some(d)
        {
            sleep.as_mut().reset(shared.started + Duration::from_millis(d));
            armed = Some(d);
        }
        // The driver keeps the writer and waits for whichever comes first: quinn taking more
        // (while it holds frames back), new work, a timer. Senders that find the writer busy
        // leave their message to it (see `SessionShared::transmit_now`). Letting the writer go
        // while nothing is held back, so that senders write their own messages, was measured
        // slower for messages one at a time (BENCHMARKS.md, "W3 at concurrency 1, traced").
        let progressed = tokio::select! {
            r = w.progress(&link.conn), if remains => r,
            _ = &mut work => Ok(()),
            _ = &mut sleep, if deadline.is_some() => Ok(()),
            _ = link.conn.closed() => return,
        };
        if progressed.is_err() {
            return;
        }
    }
}

/// Reads the peer's ACK frames from the control stream.
async fn read_control(shared: Arc<SessionShared>, link: Arc<Carrier>, recv: RecvStream) {
    let mut reader = FrameReader::new(recv);
    loop {
        tokio::task::consume_budget().await;
        let head = match reader.header::<FRAME_HEADER_LEN>().await {
            Ok(Some(h)) => h,
            Ok(None) | Err(ReadFailure::Gone) => return,
            Err(ReadFailure::Wire(e)) => return shared.violation(&link, Violation::Malformed(e)),
        };
        // The header bounds the body (at most 11 + 16 x 32 bytes).
        let header = {
            let Some(mut core) = shared.core_for(&link) else { return };
            core.on_control_header(head)
        };
        let header = match header {
            Ok(h) => h,
            Err(v) => return link.violation(v),
        };
        let body = reader.body(header.length as usize).await;
        let body = match body {
            Ok(b) => b,
            Err(ReadFailure::Gone) => return,
            Err(ReadFailure::Wire(e)) => return shared.violation(&link, Violation::Malformed(e)),
        };
        let now = shared.now();
        let (acked, worn_out) = {
            let Some(mut core) = shared.core_for(&link) else { return };
            (core.on_control(header, body, now), core.worn_out())
        };
        match acked {
            Ok(_) => {
                shared.acked.notify_waiters();
                // A worn-out key moves to fresh keys once what it sealed is acknowledged.
                if worn_out {
                    shared.work.notify_one();
                }
            }
            Err(v) => return link.violation(v),
        }
    }
}

/// Most bytes taken from quinn at a time.
const READ_CHUNK: usize = 64 * 1024;

/// Reads frames off a QUIC stream a chunk at a time, as quinn hands them over: one lock of the
/// connection per chunk instead of two per frame. Holds at most the frame being read plus one
/// chunk. A body that is most of the buffer is sliced out without a copy; a small one is copied
/// into its own allocation, so a message the application keeps never pins a large buffer.
struct FrameReader {
    recv: RecvStream,
    buf: BytesMut,
}

impl FrameReader {
    fn new(recv: RecvStream) -> FrameReader {
        FrameReader { recv, buf: BytesMut::new() }
    }

    /// Makes `n` bytes available; `Ok(false)` when the stream ended cleanly before any byte.
    async fn fill(&mut self, n: usize) -> Result<bool, ReadFailure> {
        if self.buf.len() < n {
            self.buf.reserve(n - self.buf.len());
        }
        while self.buf.len() < n {
            match self.recv.read_chunk(READ_CHUNK, true).await {
                Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk.bytes),
                Ok(None) if self.buf.is_empty() => return Ok(false),
                Ok(None) => return Err(ReadFailure::Wire(WireError::Truncated)),
                Err(_) => return Err(ReadFailure::Gone),
            }
        }
        Ok(true)
    }

    /// Whether a whole frame (header and body) is already buffered: reading it will not wait.
    fn frame_buffered(&self) -> bool {
        match self.buf.get(..FRAME_HEADER_LEN) {
            Some(head) => {
                let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
                self.buf.len() - FRAME_HEADER_LEN >= len
            }
            None => false,
        }
    }

    /// The next `N` bytes (a header), or `None` at a clean end of stream between frames.
    async fn header<const N: usize>(&mut self) -> Result<Option<[u8; N]>, ReadFailure> {
        if !self.fill(N).await? {
            return Ok(None);
        }
        let mut head = [0u8; N];
        head.copy_from_slice(&self.buf[..N]);
        self.buf.advance(N);
        Ok(Some(head))
    }

    /// The next `len` bytes (a body announced by a header).
    async fn body(&mut self, len: usize) -> Result<Bytes, ReadFailure> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        if len > READ_CHUNK && self.buf.len() < len {
            // A large body is read into its own buffer, never past its end: no copy out, and
            // the body is the sole owner of its bytes (opening decrypts it in place).
            let mut body = BytesMut::with_capacity(len);
            body.extend_from_slice(&self.buf);
            self.buf.clear();
            while body.len() < len {
                match self.recv.read_chunk(len - body.len(), true).await {
                    Ok(Some(chunk)) => body.extend_from_slice(&chunk.bytes),
                    Ok(None) => return Err(ReadFailure::Wire(WireError::Truncated)),
                    Err(_) => return Err(ReadFailure::Gone),
                }
            }
            return Ok(body.freeze());
        }
        if !self.fill(len).await? {
            return Err(ReadFailure::Wire(WireError::Truncated));
        }
        if len * 2 >= self.buf.capacity() {
            Ok(self.buf.split_to(len).freeze())
        } else {
            let body = Bytes::copy_from_slice(&self.buf[..len]);
            self.buf.advance(len);
            Ok(body)
        }
    }
}

enum ReadFailure {
    /// The peer sent bytes that break the protocol.
    Wire(WireError),
    /// The stream or connection went away (the connection's close reason tells why).
    Gone,
}

/// The connection's one task: the driver, the datagram and control-stream readers, and a
/// reader for each channel the peer opens, all polled here. Every part, and every channel
/// reader, sits in a `FuturesUnordered`, which polls only those that were woken: a part polled
/// without cause would take quinn's connection lock for nothing (each of its futures looks at
/// the connection's state), and contend for it with quinn's own driver. A frame read here and
/// the acknowledgement it makes due are handled by the same task, without a hop to another.
/// Ends when the connection does.
async fn serve(shared: Arc<SessionShared>, link: Arc<Carrier>, control: RecvStream) {
    use futures_util::StreamExt;
    use futures_util::stream::FuturesUnordered;

    /// A part of the connection's service, boxed: a `FuturesUnordered` keeps a spare node the
    /// size of its futures, which for an idle session is all it holds.
    type Part<'a> = std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'a>>;
    let channels = async {
        // Made when the peer opens its first channel: an idle session has none, and a
        // `FuturesUnordered` allocates its queue as it is made.
        let mut readers: Option<FuturesUnordered<Part<'static>>> = None;
        loop {
            let any = readers.as_ref().is_some_and(|r| !r.is_empty());
            tokio::select! {
                accepted = link.conn.accept_bi() => match accepted {
                    Ok((send, recv)) => readers
                        .get_or_insert_with(FuturesUnordered::new)
                        .push(Box::pin(read_channel(shared.clone(), link.clone(), send, recv))),
                    Err(_) => break,
                },
                Some(()) = async { readers.as_mut().expect("some readers").next().await }, if any => {}
            }
        }
        // The connection is gone: the readers see it and end.
        if let Some(mut readers) = readers {
            while readers.next().await.is_some() {}
        }
    };
    let mut parts: FuturesUnordered<Part<'_>> = FuturesUnordered::new();
    parts.push(Box::pin(drive(shared.clone(), link.clone())));
    parts.push(Box::pin(read_datagrams(shared.clone(), link.clone())));
    parts.push(Box::pin(read_control(shared.clone(), link.clone(), control)));
    parts.push(Box::pin(channels));
    while parts.next().await.is_some() {}
}

async fn read_channel(shared: Arc<SessionShared>, link: Arc<Carrier>, send: SendStream, recv: RecvStream) {
    // Nothing is ever written back on a channel stream.
    let mut send = send;
    let _ = send.finish();
    let mut reader = FrameReader::new(recv);
    let head = match reader.header::<STREAM_HEADER_LEN>().await {
        Ok(Some(h)) => h,
        Ok(None) => return shared.violation(&link, Violation::Malformed(WireError::Truncated)),
        Err(ReadFailure::Gone) => return,
        Err(ReadFailure::Wire(e)) => return shared.violation(&link, Violation::Malformed(e)),
    };
    let channel = {
        let Some(mut core) = shared.core_for(&link) else { return };
        core.on_channel_stream(head)
    };
    match channel {
        Ok(channel) => read_messages(&shared, &link, &mut reader, channel).await,
        Err(v) => link.violation(v),
    }
    // Whatever ended the stream, messages already accepted are announced.
    shared.arrived.notify_waiters();
}

/// Reads a channel's messages and hands them to the core until the stream ends or breaks the
/// protocol.
async fn read_messages(shared: &Arc<SessionShared>, link: &Arc<Carrier>, reader: &mut FrameReader, channel: u16) {
    // Messages accepted and not yet announced: the application is woken once per batch that
    // arrived together, just before this reader would wait (for data or for room), not once
    // per message.
    let mut unannounced = false;
    loop {
        if unannounced && !reader.frame_buffered() {
            unannounced = false;
            shared.arrived.notify_waiters();
        }
        // Frames already buffered are read without waiting: yield now and then, so the rest of
        // the connection's task (the driver, the other readers) is not starved.
        tokio::task::consume_budget().await;
        let head = match reader.header::<FRAME_HEADER_LEN>().await {
            Ok(Some(h)) => h,
            Ok(None) | Err(ReadFailure::Gone) => return,
            Err(ReadFailure::Wire(e)) => return shared.violation(link, Violation::Malformed(e)),
        };
        let header = {
            let Some(mut core) = shared.core_for(link) else { return };
            core.on_message_header(head)
        };
        let header = match header {
            Ok(h) => h,
            Err(v) => return link.violation(v),
        };
        let len = header.length as usize;
        // Bound memory before allocating: wait until the receive buffer has room for this
        // message (see `SessionCore::reserve`); QUIC flow control holds the peer back meanwhile.
        let mut waiting = false;
        loop {
            // Usually there is room: no waiter is registered then.
            {
                let Some(mut core) = shared.core_for(link) else { return };
                if core.reserve(channel, len) {
                    if waiting {
                        core.set_waiting(channel, false);
                    }
                    break;
                }
            }
            // Registered before checking again, so room freed in between is not missed: in this
            // session, or in the node's budget (which signals only while someone is blocked).
            let node = &shared.unread_budget;
            let room = shared.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            let node_room = node.freed.notified();
            tokio::pin!(node_room);
            node_room.as_mut().enable();
            node.blocked.fetch_add(1, Ordering::SeqCst);
            let reserved = {
                let Some(mut core) = shared.core_for(link) else {
                    node.blocked.fetch_sub(1, Ordering::SeqCst);
                    if waiting {
                        shared.core().set_waiting(channel, false);
                    }
                    return;
                };
                let reserved = core.reserve(channel, len);
                if reserved == waiting {
                    // Reserved while marked waiting, or not reserved and not yet marked.
                    core.set_waiting(channel, !reserved);
                    waiting = !reserved;
                }
                reserved
            };
            if reserved {
                node.blocked.fetch_sub(1, Ordering::SeqCst);
                break;
            }
            if unannounced {
                unannounced = false;
                shared.arrived.notify_waiters();
            }
            let closed = tokio::select! {
                _ = &mut room => false,
                _ = &mut node_room => false,
                _ = link.conn.closed() => true,
            };
            node.blocked.fetch_sub(1, Ordering::SeqCst);
            if closed {
                shared.core().set_waiting(channel, false);
                return;
            }
        }
        let reservation = Reservation { shared, channel, len };
        let body = match reader.body(len).await {
            Ok(b) => b,
            Err(ReadFailure::Gone) => return,
            Err(ReadFailure::Wire(e)) => return shared.violation(link, Violation::Malformed(e)),
        };
        let (now, wall) = (shared.now(), now_ms());
        let arrival = {
            // A reader of a connection the session has left stops (the reservation is released
            // as it drops).
            let Some(mut core) = shared.core_for(link) else { return };
            let arrival = core.on_message(channel, header, body, reservation.take(), wall, now);
            // An acknowledgement may be due (a new message, or a duplicate to acknowledge again).
            shared.kick(&core);
            arrival
        };
        shared.room.notify_waiters();
        match arrival {
            Ok(Arrival::Accepted) if channel == DURABLE_CHANNEL => match &shared.durable {
                Some(durable) => {
                    if let Some(durable) = durable.upgrade() {
                        durable.take(shared.peer_names, &Outlet(shared.clone()));
                    }
                }
                None => {
                    return shared
                        .violation(link, Violation::Durable("a DURABLE frame, and this node keeps no store".into()));
                }
            },
            Ok(Arrival::Accepted) if channel >= rpc::FIRST_RESERVED_CHANNEL => {
                take_rpc(&Outlet(shared.clone()));
            }
            Ok(Arrival::Accepted) => unannounced = true,
            Ok(Arrival::Duplicate | Arrival::Dropped | Arrival::Refused) => {}
            Err(v) => return link.violation(v),
        }
    }
}

/// A channel reader's reserved receive-buffer room: handed to the core with the message it was
/// for ([`SessionCore::on_message`] releases it), or given back if the read fails.
struct Reservation<'a> {
    shared: &'a SessionShared,
    channel: u16,
    /// Bytes still reserved (0 once handed over).
    len: usize,
}

impl Reservation<'_> {
    fn take(mut self) -> usize {
        std::mem::take(&mut self.len)
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.len > 0 {
            self.shared.core().unreserve(self.channel, self.len);
            self.shared.room.notify_waiters();
        }
    }
}

/// Reads the peer's datagrams and hands them to the core. A datagram that finds no room in the
/// receive buffer is dropped and counted: datagrams may be lost, and never wait.
async fn read_datagrams(shared: Arc<SessionShared>, link: Arc<Carrier>) {
    while let Ok(bytes) = link.conn.read_datagram().await {
        tokio::task::consume_budget().await;
        let kept = {
            let Some(mut core) = shared.core_for(&link) else { return };
            core.on_datagram(&bytes, now_ms())
        };
        match kept {
            Ok(true) => shared.arrived.notify_waiters(),
            Ok(false) => {}
            Err(v) => return link.violation(v),
        }
    }
}

/// Milliseconds since the Unix epoch by the local clock (0 if the clock is before 1970).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Refuses the library's reserved channels (durable channels, RPC).
pub(crate) fn reserved(channel: u16) -> Result<()> {
    if channel >= rpc::FIRST_RESERVED_CHANNEL {
        return Err(Error::ReservedChannel(channel));
    }
    Ok(())
}

fn push_error(e: PushError) -> Error {
    match e {
        PushError::TooLarge { size, limit } => Error::MessageTooLarge { size, limit },
        PushError::Full(f) => Error::Full { messages: f.messages, bytes: f.bytes },
        PushError::TooManyChannels(limit) => {
            Error::Limit { what: Limited::ChannelsPerSession, limit: u64::from(limit) }
        }
        PushError::SeqExhausted => seal_error(SealError::SeqExhausted),
    }
}

fn seal_error(e: SealError) -> Error {
    match e {
        SealError::TooLarge(size) => Error::MessageTooLarge { size, limit: wire::MAX_MESSAGE_SIZE },
        SealError::KeyExhausted => Error::ConnectionLost { reason: "moving to fresh message keys".into() },
        SealError::SeqExhausted | SealError::SeqNotIncreasing { .. } => {
            Error::Limit { what: Limited::SequenceNumbers, limit: crate::proto::replay::MAX_SEQ }
        }
    }
}
