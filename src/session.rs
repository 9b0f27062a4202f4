//! [`Session`]: an authenticated connection to one peer, with reliable, ordered channels and
//! unreliable datagrams.
//!
//! The async shell around the sans-IO cores:
//!
//! - [`proto::reliable`](crate::proto::reliable) numbers and keeps every channel message until
//!   the peer's *application* acknowledged it ([`Outbox`]), and restores order and drops
//!   duplicates on receipt ([`Inbox`]);
//! - [`proto::seal`](crate::proto::seal) seals every message and opens what arrives (tag, replay
//!   window, freshness, epoch).
//!
//! Each channel is a QUIC bidirectional stream, opened by the side that sends on it and carrying
//! MESSAGE frames one way only; ACK frames travel on the control stream. A driver task moves
//! what the cores produce onto the connection. Memory is bounded: the outbox by count and bytes
//! ([`Session::send`] waits, [`Session::try_send_bytes`] fails with [`Error::Full`]), the inbox by
//! `Limits::receive_buffer` (a reader waits for room before it reads a message body, so QUIC
//! flow control slows a peer we cannot keep up with), datagrams by the same budget (dropped and
//! counted when it is full).

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use quinn::{Connection, RecvStream, SendStream, VarInt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::error::{Error, Result, Side, close_code, from_connection_error};
use crate::identity::PeerIdentity;
use crate::proto::reliable::{Inbox, InboxConfig, Outbox, OutboxConfig, Received};
use crate::proto::seal::{ChannelSealer, OpenConfig, Opened, Opener, OpeningKey, Reject, SealError, SealingKey};
use crate::proto::wire::{
    self, FRAME_HEADER_LEN, Frame, FrameHeader, MESSAGE_OVERHEAD, MessageKind, STREAM_HEADER_LEN, StreamKind,
    WireError, frame_type,
};
use crate::stats::{Counter, Stats, Tally};

/// Most transmissions the driver takes from the outbox before it looks at acks again.
const TRANSMIT_BATCH: usize = 64;

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
        let (value, rest) = postcard::take_from_bytes(&self.payload)?;
        if !rest.is_empty() {
            return Err(Error::Encoding(postcard::Error::DeserializeBadEncoding));
        }
        Ok(value)
    }
}

/// The reliability state, behind one lock.
struct Core {
    outbox: Outbox,
    inbox: Inbox,
    datagrams: VecDeque<Opened>,
    datagram_bytes: usize,
}

/// State shared by the session handle and its background tasks (never the handle itself, so
/// dropping every [`Session`] closes the connection).
struct Shared {
    conn: Connection,
    /// Why we closed the connection, when we did because the peer misbehaved.
    failure: OnceLock<String>,
    max_recv: usize,
    receive_buffer: usize,
    seen_channels: Mutex<HashSet<u16>>,
    opener: Mutex<Opener>,
    core: Mutex<Core>,
    tally: Tally,
    tag_failures: AtomicU32,
    max_tag_failures: u32,
    /// Zero of the reliability core's clock.
    started: Instant,
    /// Wakes the driver: something to send.
    work: Notify,
    /// Wakes receivers: something to deliver.
    arrived: Notify,
    /// Wakes readers waiting for room in the inbox.
    room: Notify,
    /// Bumped whenever acknowledgements arrive (waiters re-check the outbox).
    acked: watch::Sender<u64>,
}

impl Shared {
    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn core(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes the connection because the peer broke the protocol.
    fn violation(&self, code: u32, reason: String) {
        warn!(peer = %self.conn.remote_address(), %reason, "closing connection: protocol violation");
        let _ = self.failure.set(reason);
        let wire_reason: &[u8] = match code {
            close_code::MESSAGE_TOO_LARGE => b"message too large",
            close_code::INTEGRITY_FAILURE => b"integrity failure",
            _ => b"protocol violation",
        };
        self.conn.close(VarInt::from_u32(code), wire_reason);
    }

    fn error(&self) -> Error {
        if let Some(reason) = self.failure.get() {
            return Error::ProtocolViolation { side: Side::Local, reason: reason.clone() };
        }
        match self.conn.close_reason() {
            Some(e) => from_connection_error(e, None),
            None => Error::ConnectionLost { reason: "session tasks ended".into() },
        }
    }

    /// Counts and logs a refused message; closes the connection when too many failed their
    /// integrity check.
    fn reject(&self, kind: MessageKind, r: &Reject) {
        let counter = match r {
            Reject::Tag => Counter::tag_failures,
            Reject::Stale { .. } | Reject::Future { .. } => Counter::stale_rejected,
            Reject::Malformed(_) => Counter::malformed_frames,
            Reject::TooManyChannels => Counter::datagrams_dropped,
            _ => Counter::replays_rejected,
        };
        self.tally.add(counter, 1);
        if kind == MessageKind::Datagram && counter != Counter::datagrams_dropped {
            self.tally.add(Counter::datagrams_dropped, 1);
        }
        debug!(target: "quicseal::reject", peer = %self.conn.remote_address(), ?kind, reason = %r, "message refused");
        if matches!(r, Reject::Tag) {
            let failures = self.tag_failures.fetch_add(1, Ordering::Relaxed) + 1;
            if failures >= self.max_tag_failures {
                self.violation(
                    close_code::INTEGRITY_FAILURE,
                    format!("{failures} messages failed their integrity check"),
                );
            }
        }
    }

    fn open(&self, frame: wire::MessageFrame) -> Result<Opened, Reject> {
        self.opener.lock().unwrap_or_else(|e| e.into_inner()).open(frame, now_ms())
    }

    fn wire_violation(&self, e: WireError) {
        self.tally.add(Counter::malformed_frames, 1);
        let code = if matches!(e, WireError::TooLarge { .. }) {
            close_code::MESSAGE_TOO_LARGE
        } else {
            close_code::PROTOCOL_VIOLATION
        };
        self.violation(code, e.to_string());
    }
}

struct SessionInner {
    shared: Arc<Shared>,
    peer: Arc<PeerIdentity>,
    max_send: usize,
    max_channels: u16,
    seal_key: Arc<SealingKey>,
    epoch: u64,
    datagram_sealers: Mutex<HashMap<u16, ChannelSealer>>,
    manual_ack: bool,
    driver: JoinHandle<()>,
    _control_recv: JoinHandle<()>,
}

impl Drop for SessionInner {
    fn drop(&mut self) {
        self.shared.conn.close(VarInt::from_u32(close_code::NO_ERROR), b"session closed");
        self.driver.abort();
    }
}

/// An authenticated connection to one peer. Cheap to clone.
///
/// The connection closes when the last clone is dropped or [`Session::close`] is called, at
/// once, as a quinn connection does: messages not yet acknowledged may be lost. Call
/// [`Session::delivered`] first when they matter.
#[derive(Clone)]
pub struct Session {
    inner: Arc<SessionInner>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("peer", &self.inner.peer.display_name())
            .field("remote", &self.inner.shared.conn.remote_address())
            .finish()
    }
}

/// What [`Session::start`] needs besides the connection.
pub(crate) struct SessionParams {
    pub(crate) peer: PeerIdentity,
    pub(crate) keys: (SealingKey, OpeningKey),
    pub(crate) epoch: u64,
    pub(crate) peer_epoch: u64,
    pub(crate) open: OpenConfig,
    pub(crate) outbox: OutboxConfig,
    pub(crate) inbox: InboxConfig,
    pub(crate) tally: Tally,
    pub(crate) max_tag_failures: u32,
    pub(crate) local_max: usize,
    pub(crate) peer_max: usize,
    pub(crate) max_channels: u16,
    pub(crate) receive_buffer: usize,
    pub(crate) control: (SendStream, RecvStream),
}

impl Session {
    pub(crate) fn start(conn: Connection, p: SessionParams) -> Session {
        let manual_ack = !p.inbox.auto_ack;
        let seed = p.epoch ^ p.peer_epoch;
        let shared = Arc::new(Shared {
            conn,
            failure: OnceLock::new(),
            max_recv: p.local_max,
            receive_buffer: p.receive_buffer,
            seen_channels: Mutex::new(HashSet::new()),
            opener: Mutex::new(Opener::new(p.keys.1, p.peer_epoch, p.open)),
            core: Mutex::new(Core {
                outbox: Outbox::new(p.outbox, seed),
                inbox: Inbox::new(p.inbox),
                datagrams: VecDeque::new(),
                datagram_bytes: 0,
            }),
            tally: p.tally,
            tag_failures: AtomicU32::new(0),
            max_tag_failures: p.max_tag_failures,
            started: Instant::now(),
            work: Notify::new(),
            arrived: Notify::new(),
            room: Notify::new(),
            acked: watch::Sender::new(0),
        });
        let seal_key = Arc::new(p.keys.0);
        let (control_send, control_recv) = p.control;
        tokio::spawn(read_datagrams(shared.clone()));
        tokio::spawn(accept_channels(shared.clone()));
        let control_recv = tokio::spawn(read_control(shared.clone(), control_recv));
        let driver = tokio::spawn(drive(shared.clone(), seal_key.clone(), p.epoch, control_send));
        Session {
            inner: Arc::new(SessionInner {
                shared,
                peer: Arc::new(p.peer),
                max_send: p.local_max.min(p.peer_max),
                max_channels: p.max_channels,
                seal_key,
                epoch: p.epoch,
                datagram_sealers: Mutex::new(HashMap::new()),
                manual_ack,
                driver,
                _control_recv: control_recv,
            }),
        }
    }

    /// The authenticated peer.
    pub fn peer(&self) -> &PeerIdentity {
        &self.inner.peer
    }

    /// The peer's UDP address.
    pub fn remote_address(&self) -> SocketAddr {
        self.inner.shared.conn.remote_address()
    }

    /// This side's session epoch (random per session).
    pub fn epoch(&self) -> u64 {
        self.inner.epoch
    }

    /// What this session sent, delivered and refused so far, with the reliability layer's
    /// current state (messages and bytes in flight, round-trip estimate).
    pub fn stats(&self) -> Stats {
        let mut s = self.inner.shared.tally.session.snapshot();
        let core = self.inner.shared.core();
        let (messages, bytes) = core.outbox.in_flight();
        s.in_flight_messages = messages as u64;
        s.in_flight_bytes = bytes as u64;
        s.rtt_ms = core.outbox.srtt().unwrap_or(0);
        s
    }

    /// The largest payload this session will send: the smaller of our limit and the peer's.
    pub fn max_message_size(&self) -> usize {
        self.inner.max_send
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
    /// message is kept and retransmitted until the peer's application acknowledged it: see
    /// [`Session::delivered`] and [`Session::wait_acked`].
    pub async fn send_bytes(&self, channel: u16, payload: impl Into<Bytes>) -> Result<u64> {
        let payload = payload.into();
        let mut acked = self.inner.shared.acked.subscribe();
        loop {
            match self.try_send_bytes(channel, payload.clone()) {
                Err(Error::Full { .. }) => {}
                other => return other,
            }
            tokio::select! {
                r = acked.changed() => if r.is_err() { return Err(self.inner.shared.error()) },
                _ = self.inner.shared.conn.closed() => return Err(self.inner.shared.error()),
            }
        }
    }

    /// Like [`Session::send_bytes`], but fails with [`Error::Full`] instead of waiting when the
    /// outbox is full.
    pub fn try_send_bytes(&self, channel: u16, payload: impl Into<Bytes>) -> Result<u64> {
        let payload = payload.into();
        if payload.len() > self.inner.max_send {
            return Err(Error::MessageTooLarge { size: payload.len(), limit: self.inner.max_send });
        }
        if let Some(reason) = self.inner.shared.conn.close_reason() {
            return Err(self.inner.shared.failure.get().map_or_else(
                || from_connection_error(reason, None),
                |r| Error::ProtocolViolation { side: Side::Local, reason: r.clone() },
            ));
        }
        let len = payload.len() as u64;
        let now = self.inner.shared.now();
        let seq = {
            let mut core = self.inner.shared.core();
            let new_channel = core.outbox.last_seq(channel) == 0;
            if new_channel && core.outbox.channel_count() >= usize::from(self.inner.max_channels) {
                return Err(Error::Limit { what: "channels per session", limit: u64::from(self.inner.max_channels) });
            }
            if core.outbox.last_seq(channel) >= crate::proto::replay::MAX_SEQ {
                return Err(seal_error(SealError::SeqExhausted));
            }
            core.outbox.push(channel, payload, now).map_err(|f| Error::Full { messages: f.messages, bytes: f.bytes })?
        };
        self.inner.shared.tally.add(Counter::messages_sent, 1);
        self.inner.shared.tally.add(Counter::bytes_sent, len);
        self.inner.shared.work.notify_one();
        Ok(seq)
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
        let limit = self.max_datagram_size()?;
        if payload.len() > limit {
            return Err(Error::MessageTooLarge { size: payload.len(), limit });
        }
        let mut frame = Vec::with_capacity(payload.len() + MESSAGE_OVERHEAD);
        let seq = {
            let mut sealers = self.inner.datagram_sealers.lock().unwrap_or_else(|e| e.into_inner());
            if !sealers.contains_key(&channel) && sealers.len() >= usize::from(self.inner.max_channels) {
                return Err(Error::Limit {
                    what: "datagram channels per session",
                    limit: u64::from(self.inner.max_channels),
                });
            }
            let sealer = sealers.entry(channel).or_insert_with(|| {
                ChannelSealer::new(self.inner.seal_key.clone(), self.inner.epoch, MessageKind::Datagram, channel)
            });
            let seq = sealer.last_seq() + 1;
            sealer.seal(seq, now_ms(), &payload, &mut frame).map_err(seal_error)?;
            seq
        };
        self.inner.shared.conn.send_datagram(frame.into()).map_err(|e| match e {
            quinn::SendDatagramError::UnsupportedByPeer => {
                Error::DatagramsUnsupported("the peer does not accept datagrams")
            }
            quinn::SendDatagramError::Disabled => Error::DatagramsUnsupported("datagrams are turned off locally"),
            quinn::SendDatagramError::TooLarge => Error::MessageTooLarge { size: payload.len(), limit },
            quinn::SendDatagramError::ConnectionLost(_) => self.inner.shared.error(),
        })?;
        self.inner.shared.tally.add(Counter::datagrams_sent, 1);
        Ok(seq)
    }

    /// The largest datagram payload the path and the peer allow now (it can change with the
    /// path MTU), or [`Error::DatagramsUnsupported`].
    pub fn max_datagram_size(&self) -> Result<usize> {
        let conn = &self.inner.shared.conn;
        let quic = conn.max_datagram_size().ok_or(Error::DatagramsUnsupported("the peer does not accept datagrams"))?;
        Ok(quic.saturating_sub(MESSAGE_OVERHEAD).min(self.inner.max_send))
    }

    /// Waits until the peer's application has taken every message sent so far on `channel`.
    pub async fn delivered(&self, channel: u16) -> Result<()> {
        let target = self.inner.shared.core().outbox.last_seq(channel);
        self.wait_until(|core| core.outbox.all_acked_through(channel, target)).await
    }

    /// Waits for the delivery receipt of message `seq` of `channel`: the peer's application took
    /// it.
    pub async fn wait_acked(&self, channel: u16, seq: u64) -> Result<()> {
        self.wait_until(|core| core.outbox.is_acked(channel, seq)).await
    }

    async fn wait_until(&self, done: impl Fn(&Core) -> bool) -> Result<()> {
        let shared = &self.inner.shared;
        let mut acked = shared.acked.subscribe();
        loop {
            if done(&shared.core()) {
                return Ok(());
            }
            tokio::select! {
                r = acked.changed() => if r.is_err() { return Err(shared.error()) },
                _ = shared.conn.closed() => {
                    // The last acknowledgement may have raced the close.
                    return if done(&shared.core()) { Ok(()) } else { Err(shared.error()) };
                }
            }
        }
    }

    /// Receives the next message: channel messages in order per channel, exactly once, and
    /// datagrams as they come.
    ///
    /// In the default mode the message is acknowledged to the sender when this returns it; in
    /// manual-ack mode ([`NodeConfig::manual_ack`](crate::NodeConfig::manual_ack)) only when
    /// [`Session::ack`] is called. Returns an error once the session has ended and nothing is
    /// left: its kind says why (closed by the peer, protocol violation, idle timeout...).
    pub async fn recv(&self) -> Result<Message> {
        let shared = &self.inner.shared;
        loop {
            let arrived = shared.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if let Some(m) = self.poll_message() {
                return Ok(m);
            }
            if shared.conn.close_reason().is_some() {
                return Err(shared.error());
            }
            tokio::select! {
                _ = &mut arrived => {}
                _ = shared.conn.closed() => {}
            }
        }
    }

    fn poll_message(&self) -> Option<Message> {
        let shared = &self.inner.shared;
        let now = shared.now();
        let mut core = shared.core();
        let (kind, channel, seq, payload) = if let Some((channel, seq, payload)) = core.inbox.poll_deliver(now) {
            (MessageKind::Stream, channel, seq, payload)
        } else {
            let d = core.datagrams.pop_front()?;
            core.datagram_bytes -= d.payload.len();
            shared.tally.add(Counter::datagrams_delivered, 1);
            (MessageKind::Datagram, d.channel, d.seq, d.payload)
        };
        drop(core);
        shared.tally.add(Counter::messages_delivered, 1);
        shared.tally.add(Counter::bytes_delivered, payload.len() as u64);
        // Room for readers; an acknowledgement may be due.
        shared.room.notify_waiters();
        shared.work.notify_one();
        Some(Message { peer: self.inner.peer.clone(), kind, channel, seq, payload })
    }

    /// Acknowledges a message received in manual-ack mode (idempotent; datagrams and auto-ack
    /// sessions need no acknowledgement). Returns whether this acknowledged something new.
    pub fn ack(&self, message: &Message) -> bool {
        if !self.inner.manual_ack || message.is_datagram() {
            return false;
        }
        let shared = &self.inner.shared;
        let now = shared.now();
        let newly = shared.core().inbox.ack(message.channel, message.seq, now);
        if newly {
            shared.work.notify_one();
        }
        newly
    }

    /// Closes the session; the peer sees a normal close.
    pub fn close(&self) {
        self.inner.shared.conn.close(VarInt::from_u32(close_code::NO_ERROR), b"closed");
    }

    /// Waits until the session has ended and returns why.
    pub async fn closed(&self) -> Error {
        self.inner.shared.conn.closed().await;
        self.inner.shared.error()
    }
}

/// The driver: takes what the reliability core wants sent (messages, acknowledgements) and
/// writes it to the connection; sleeps until the next deadline or new work.
async fn drive(shared: Arc<Shared>, key: Arc<SealingKey>, epoch: u64, mut control: SendStream) {
    // Per channel: its stream and sealer on this connection.
    let mut streams: HashMap<u16, (SendStream, RecvStream, ChannelSealer)> = HashMap::new();
    // Sealed frames already sent on this connection, for retransmission: a (channel, seq) is
    // sealed once per key (GCM nonces never repeat), and resent byte for byte.
    let mut sealed: HashMap<(u16, u64), Bytes> = HashMap::new();
    loop {
        let work = shared.work.notified();
        tokio::pin!(work);
        work.as_mut().enable();
        let now = shared.now();
        let (transmits, acks, deadline) = {
            let mut core = shared.core();
            let mut t = Vec::new();
            while t.len() < TRANSMIT_BATCH {
                match core.outbox.poll_transmit(now) {
                    Some(x) => t.push(x),
                    None => break,
                }
            }
            let mut a = Vec::new();
            while let Some(x) = core.inbox.poll_ack(now) {
                a.push(x);
            }
            if sealed.len() > 2 * core.outbox.in_flight().0 + TRANSMIT_BATCH {
                sealed.retain(|&(c, s), _| !core.outbox.is_acked(c, s));
            }
            let deadline = [core.outbox.next_deadline(), core.inbox.next_deadline()].into_iter().flatten().min();
            (t, a, deadline)
        };
        if !acks.is_empty() {
            let mut buf = Vec::new();
            for a in acks {
                Frame::Ack(a).encode(&mut buf);
            }
            if control.write_all(&buf).await.is_err() {
                return;
            }
        }
        let batch_full = transmits.len() == TRANSMIT_BATCH;
        for t in transmits {
            if t.retransmission {
                shared.tally.add(Counter::retransmissions, 1);
            }
            let frame = match sealed.get(&(t.channel, t.seq)) {
                Some(f) => f.clone(),
                None => {
                    let (_, _, sealer) = match streams.entry(t.channel) {
                        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                        std::collections::hash_map::Entry::Vacant(v) => {
                            let Ok((mut send, recv)) = shared.conn.open_bi().await else { return };
                            let header = wire::encode_stream_header(StreamKind::Channel(t.channel));
                            if send.write_all(&header).await.is_err() {
                                return;
                            }
                            let sealer = ChannelSealer::new(key.clone(), epoch, MessageKind::Stream, t.channel);
                            v.insert((send, recv, sealer))
                        }
                    };
                    let mut out = Vec::with_capacity(t.payload.len() + MESSAGE_OVERHEAD);
                    if let Err(e) = sealer.seal(t.seq, now_ms(), &t.payload, &mut out) {
                        warn!(error = %e, "cannot seal: closing the session");
                        shared.conn.close(VarInt::from_u32(close_code::NO_ERROR), b"sequence numbers exhausted");
                        return;
                    }
                    let f = Bytes::from(out);
                    sealed.insert((t.channel, t.seq), f.clone());
                    f
                }
            };
            let Some((send, _, _)) = streams.get_mut(&t.channel) else { continue };
            if send.write_all(&frame).await.is_err() {
                return;
            }
        }
        if batch_full {
            continue;
        }
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(shared.started + std::time::Duration::from_millis(d)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut work => {}
            _ = sleep => {}
            _ = shared.conn.closed() => return,
        }
    }
}

/// Reads the peer's ACK frames from the control stream.
async fn read_control(shared: Arc<Shared>, mut recv: RecvStream) {
    loop {
        let head = match read_frame_header(&mut recv).await {
            Ok(Some(h)) => h,
            Ok(None) | Err(ReadFailure::Gone) => return,
            Err(ReadFailure::Wire(e)) => return shared.wire_violation(e),
        };
        let header = match FrameHeader::decode(head, 0) {
            Ok(h) if h.frame_type == frame_type::ACK => h,
            Ok(h) => {
                return shared.violation(
                    close_code::PROTOCOL_VIOLATION,
                    format!("frame type {:#04x} on the control stream after the hello", h.frame_type),
                );
            }
            Err(e) => return shared.wire_violation(e),
        };
        // The header bounds the body (at most 11 + 16 x 32 bytes).
        let mut body = vec![0u8; header.length as usize];
        match read_exact(&mut recv, &mut body).await {
            Ok(()) => {}
            Err(ReadFailure::Gone) => return,
            Err(ReadFailure::Wire(e)) => return shared.wire_violation(e),
        }
        let ack = match header.decode_body(body.into()) {
            Ok(Frame::Ack(a)) => a,
            Ok(_) => return shared.violation(close_code::PROTOCOL_VIOLATION, "not an ACK".into()),
            Err(e) => return shared.wire_violation(e),
        };
        let now = shared.now();
        let result = shared.core().outbox.on_ack(&ack, now);
        match result {
            Ok(acked) => {
                shared.tally.add(Counter::acked, acked.newly.len() as u64);
                shared.acked.send_modify(|n| *n = n.wrapping_add(1));
            }
            Err(e) => return shared.violation(close_code::PROTOCOL_VIOLATION, e.to_string()),
        }
    }
}

/// Reads a frame header, or `None` at a clean end of stream between frames.
async fn read_frame_header(recv: &mut RecvStream) -> Result<Option<[u8; FRAME_HEADER_LEN]>, ReadFailure> {
    let mut head = [0u8; FRAME_HEADER_LEN];
    match recv.read_exact(&mut head).await {
        Ok(()) => Ok(Some(head)),
        Err(quinn::ReadExactError::FinishedEarly(0)) => Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(_)) => Err(ReadFailure::Wire(WireError::Truncated)),
        Err(quinn::ReadExactError::ReadError(_)) => Err(ReadFailure::Gone),
    }
}

enum ReadFailure {
    /// The peer sent bytes that break the protocol.
    Wire(WireError),
    /// The stream or connection went away (the connection's close reason tells why).
    Gone,
}

async fn read_exact(recv: &mut RecvStream, buf: &mut [u8]) -> Result<(), ReadFailure> {
    recv.read_exact(buf).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(_) => ReadFailure::Wire(WireError::Truncated),
        quinn::ReadExactError::ReadError(_) => ReadFailure::Gone,
    })
}

/// Accepts the channels the peer opens and spawns a reader for each.
async fn accept_channels(shared: Arc<Shared>) {
    while let Ok((send, recv)) = shared.conn.accept_bi().await {
        tokio::spawn(read_channel(shared.clone(), send, recv));
    }
}

async fn read_channel(shared: Arc<Shared>, send: SendStream, mut recv: RecvStream) {
    // Nothing is ever written back on a channel stream.
    let mut send = send;
    let _ = send.finish();
    let mut head = [0u8; STREAM_HEADER_LEN];
    match read_exact(&mut recv, &mut head).await {
        Ok(()) => {}
        Err(ReadFailure::Gone) => return,
        Err(ReadFailure::Wire(e)) => return shared.wire_violation(e),
    }
    let channel = match wire::decode_stream_header(head) {
        Ok(StreamKind::Channel(c)) => c,
        Ok(StreamKind::Control) => {
            return shared.violation(close_code::PROTOCOL_VIOLATION, "second control stream".into());
        }
        Err(e) => return shared.wire_violation(e),
    };
    if !shared.seen_channels.lock().unwrap_or_else(|e| e.into_inner()).insert(channel) {
        return shared.violation(close_code::PROTOCOL_VIOLATION, format!("channel {channel} opened twice"));
    }
    loop {
        let head = match read_frame_header(&mut recv).await {
            Ok(Some(h)) => h,
            Ok(None) | Err(ReadFailure::Gone) => return,
            Err(ReadFailure::Wire(e)) => return shared.wire_violation(e),
        };
        let header = match FrameHeader::decode(head, shared.max_recv) {
            Ok(h) if h.frame_type == frame_type::MESSAGE => h,
            Ok(h) => {
                return shared.violation(
                    close_code::PROTOCOL_VIOLATION,
                    format!("frame type {:#04x} on an inbound channel", h.frame_type),
                );
            }
            Err(e) => return shared.wire_violation(e),
        };
        // Bound memory before allocating: wait until the inbox has room for this message (or is
        // empty, so a single message larger than the buffer can still pass).
        let len = header.length as usize;
        loop {
            let room = shared.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            let held = shared.core().inbox.held_bytes();
            if held == 0 || held + len <= shared.receive_buffer {
                break;
            }
            tokio::select! {
                _ = &mut room => {}
                _ = shared.conn.closed() => return,
            }
        }
        let mut body = vec![0u8; len];
        match read_exact(&mut recv, &mut body).await {
            Ok(()) => {}
            Err(ReadFailure::Gone) => return,
            Err(ReadFailure::Wire(e)) => return shared.wire_violation(e),
        }
        let frame = match header.decode_body(body.into()) {
            Ok(Frame::Message(m)) if m.kind == MessageKind::Stream && m.channel == channel => m,
            Ok(_) => {
                return shared.violation(
                    close_code::PROTOCOL_VIOLATION,
                    format!("channel {channel} stream carries a datagram or another channel's message"),
                );
            }
            Err(e) => return shared.wire_violation(e),
        };
        let seq = frame.seq;
        match shared.open(frame) {
            Ok(opened) => {
                let now = shared.now();
                let received = shared.core().inbox.on_message(channel, opened.seq, opened.payload, now);
                match received {
                    Received::Accepted => shared.arrived.notify_waiters(),
                    Received::Duplicate => shared.tally.add(Counter::duplicates_dropped, 1),
                    Received::Dropped => {}
                }
                shared.work.notify_one();
            }
            Err(Reject::Replay(_)) => {
                // A copy of something already received: count it, and re-acknowledge it so the
                // sender stops resending.
                shared.tally.add(Counter::replays_rejected, 1);
                shared.tally.add(Counter::duplicates_dropped, 1);
                let now = shared.now();
                shared.core().inbox.note_duplicate(channel, seq, now);
                shared.work.notify_one();
            }
            Err(r) => shared.reject(MessageKind::Stream, &r),
        }
    }
}

/// Reads, opens and queues the peer's datagrams. A datagram that finds no room in the receive
/// buffer is dropped and counted: datagrams may be lost, and never wait.
async fn read_datagrams(shared: Arc<Shared>) {
    while let Ok(bytes) = shared.conn.read_datagram().await {
        let opened = shared.opener.lock().unwrap_or_else(|e| e.into_inner()).open_bytes(&bytes, now_ms());
        match opened {
            Ok(opened) => {
                let mut core = shared.core();
                let used = core.datagram_bytes + core.inbox.held_bytes();
                if used + opened.payload.len() > shared.receive_buffer {
                    drop(core);
                    shared.tally.add(Counter::datagrams_dropped, 1);
                    continue;
                }
                core.datagram_bytes += opened.payload.len();
                core.datagrams.push_back(opened);
                drop(core);
                shared.arrived.notify_waiters();
            }
            // A malformed datagram is dropped like any refused one: it cannot desynchronise a
            // stream, so it does not close the connection.
            Err(r) => shared.reject(MessageKind::Datagram, &r),
        }
    }
}

/// Milliseconds since the Unix epoch by the local clock (0 if the clock is before 1970).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn seal_error(e: SealError) -> Error {
    match e {
        SealError::TooLarge(size) => Error::MessageTooLarge { size, limit: wire::MAX_MESSAGE_SIZE },
        SealError::SeqExhausted | SealError::SeqNotIncreasing { .. } => {
            Error::Limit { what: "sequence numbers in this epoch", limit: crate::proto::replay::MAX_SEQ }
        }
    }
}
