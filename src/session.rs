//! [`Session`]: an authenticated connection to one peer, with ordered message channels.
//!
//! Each channel is one QUIC bidirectional stream, opened by the side that sends on it: the
//! MESSAGE frames go one way and the receiver's ACK frames come back the other. Datagrams are
//! single MESSAGE frames in QUIC DATAGRAM frames. Every message is sealed and opened by the
//! sans-IO core ([`crate::proto::seal`]): tag, replay window, freshness, epoch. Receiving is
//! bounded by a byte budget (`Limits::receive_buffer`): a reader waits for budget before it
//! allocates a message body, so QUIC flow control slows a peer we cannot keep up with instead of
//! our memory growing.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use quinn::{Connection, RecvStream, SendStream, VarInt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tracing::{debug, warn};

use crate::error::{Error, Result, Side, close_code, from_connection_error};
use crate::identity::PeerIdentity;
use crate::proto::channel::Outbound;
use crate::proto::seal::{ChannelSealer, OpenConfig, Opened, Opener, OpeningKey, Reject, SealError, SealingKey};
use crate::proto::wire::{
    self, FRAME_HEADER_LEN, Frame, FrameHeader, MESSAGE_OVERHEAD, MessageKind, STREAM_HEADER_LEN, StreamKind,
    WireError, frame_type,
};
use crate::stats::{Counter, Stats, Tally};

/// Budget charged per message on top of its payload, so that empty messages are bounded too.
const PER_MESSAGE_OVERHEAD: usize = 64;

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

/// What a channel reader hands to [`Session::recv`].
struct Delivery {
    opened: Opened,
    /// Where and what to acknowledge once the application takes it: `None` for datagrams
    /// (never acknowledged) and for stream messages after a gap (see [`read_channel`]).
    ack: Option<(Arc<watch::Sender<u64>>, u64)>,
    _budget: OwnedSemaphorePermit,
}

/// State shared by the session handle and its background tasks (never the handle itself, so
/// dropping every [`Session`] closes the connection).
struct Shared {
    conn: Connection,
    /// Why we closed the connection, when we did because the peer misbehaved.
    failure: OnceLock<String>,
    max_recv: usize,
    budget: Arc<Semaphore>,
    budget_total: usize,
    seen_channels: Mutex<HashSet<u16>>,
    opener: Mutex<Opener>,
    tally: Tally,
    tag_failures: AtomicU32,
    max_tag_failures: u32,
}

impl Shared {
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
    /// integrity check. Returns whether the connection is still usable.
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

struct ChannelState {
    out: Mutex<Outbound>,
    acked: watch::Sender<u64>,
}

struct ChannelSender {
    /// The stream and the sealer, locked together so sequence order is write order.
    stream: tokio::sync::Mutex<(SendStream, ChannelSealer)>,
    state: Arc<ChannelState>,
}

struct SessionInner {
    shared: Arc<Shared>,
    peer: Arc<PeerIdentity>,
    max_send: usize,
    max_channels: u16,
    senders: tokio::sync::Mutex<HashMap<u16, Arc<ChannelSender>>>,
    seal_key: Arc<SealingKey>,
    epoch: u64,
    datagram_sealers: Mutex<HashMap<u16, ChannelSealer>>,
    incoming: tokio::sync::Mutex<mpsc::UnboundedReceiver<Delivery>>,
    _control: (SendStream, RecvStream),
}

impl Drop for SessionInner {
    fn drop(&mut self) {
        self.shared.conn.close(VarInt::from_u32(close_code::NO_ERROR), b"session closed");
    }
}

/// An authenticated connection to one peer. Cheap to clone.
///
/// The connection closes when the last clone is dropped or [`Session::close`] is called, at
/// once, as a quinn connection does: data not yet transmitted is discarded. Call
/// [`Session::delivered`] first when the messages matter.
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
        let shared = Arc::new(Shared {
            conn,
            failure: OnceLock::new(),
            max_recv: p.local_max,
            budget: Arc::new(Semaphore::new(p.receive_buffer)),
            budget_total: p.receive_buffer,
            seen_channels: Mutex::new(HashSet::new()),
            opener: Mutex::new(Opener::new(p.keys.1, p.peer_epoch, p.open)),
            tally: p.tally,
            tag_failures: AtomicU32::new(0),
            max_tag_failures: p.max_tag_failures,
        });
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(read_datagrams(shared.clone(), tx.clone()));
        tokio::spawn(accept_channels(shared.clone(), tx));
        Session {
            inner: Arc::new(SessionInner {
                shared,
                peer: Arc::new(p.peer),
                max_send: p.local_max.min(p.peer_max),
                max_channels: p.max_channels,
                senders: tokio::sync::Mutex::new(HashMap::new()),
                seal_key: Arc::new(p.keys.0),
                epoch: p.epoch,
                datagram_sealers: Mutex::new(HashMap::new()),
                incoming: tokio::sync::Mutex::new(rx),
                _control: p.control,
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

    /// What this session sent, delivered and refused so far.
    pub fn stats(&self) -> Stats {
        self.inner.shared.tally.session.snapshot()
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

    /// Sends raw bytes on `channel`. Returns the message's sequence number on the channel.
    ///
    /// Messages on one channel arrive in order; channels are independent. Returns when the
    /// message is handed to QUIC, not when it arrived: see [`Session::delivered`].
    pub async fn send_bytes(&self, channel: u16, payload: impl Into<Bytes>) -> Result<u64> {
        let payload = payload.into();
        if payload.len() > self.inner.max_send {
            return Err(Error::MessageTooLarge { size: payload.len(), limit: self.inner.max_send });
        }
        let sender = self.channel(channel).await?;
        let mut guard = sender.stream.lock().await;
        let (stream, sealer) = &mut *guard;
        let seq = sender
            .state
            .out
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .next_seq()
            .map_err(|_| Error::Limit { what: "sequence numbers per channel", limit: u64::MAX })?;
        let mut frame = Vec::with_capacity(payload.len() + MESSAGE_OVERHEAD);
        sealer.seal(seq, now_ms(), &payload, &mut frame).map_err(seal_error)?;
        stream.write_all(&frame).await.map_err(|e| self.write_error(e))?;
        self.inner.shared.tally.add(Counter::messages_sent, 1);
        self.inner.shared.tally.add(Counter::bytes_sent, payload.len() as u64);
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

    /// Waits until the peer's application has taken every message sent so far on `channel`
    /// (the peer acknowledges a message when [`Session::recv`] returns it).
    pub async fn delivered(&self, channel: u16) -> Result<()> {
        let Some(sender) = self.inner.senders.lock().await.get(&channel).cloned() else {
            return Ok(()); // nothing was ever sent on it
        };
        let target = sender.state.out.lock().unwrap_or_else(|e| e.into_inner()).sent();
        let mut rx = sender.state.acked.subscribe();
        let reached = tokio::select! {
            r = rx.wait_for(|acked| *acked >= target) => r.is_ok(),
            _ = self.inner.shared.conn.closed() => false,
        };
        // The last ack may have raced the close.
        if reached || *rx.borrow() >= target { Ok(()) } else { Err(self.inner.shared.error()) }
    }

    /// Receives the next message from any channel. Messages of one channel come in order.
    ///
    /// Returns an error once the session has ended: its kind says why (closed by the peer,
    /// protocol violation, idle timeout...).
    pub async fn recv(&self) -> Result<Message> {
        let mut rx = self.inner.incoming.lock().await;
        match rx.recv().await {
            Some(d) => {
                if let Some((ack, seq)) = &d.ack {
                    ack.send_replace(*seq);
                }
                let tally = &self.inner.shared.tally;
                tally.add(Counter::messages_delivered, 1);
                tally.add(Counter::bytes_delivered, d.opened.payload.len() as u64);
                if d.opened.kind == MessageKind::Datagram {
                    tally.add(Counter::datagrams_delivered, 1);
                }
                Ok(Message {
                    peer: self.inner.peer.clone(),
                    kind: d.opened.kind,
                    channel: d.opened.channel,
                    seq: d.opened.seq,
                    payload: d.opened.payload,
                })
            }
            None => Err(self.inner.shared.error()),
        }
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

    async fn channel(&self, channel: u16) -> Result<Arc<ChannelSender>> {
        let mut senders = self.inner.senders.lock().await;
        if let Some(s) = senders.get(&channel) {
            return Ok(s.clone());
        }
        if senders.len() >= usize::from(self.inner.max_channels) {
            return Err(Error::Limit { what: "channels per session", limit: u64::from(self.inner.max_channels) });
        }
        let conn = &self.inner.shared.conn;
        let (mut send, recv) = conn.open_bi().await.map_err(|e| from_connection_error(e, None))?;
        send.write_all(&wire::encode_stream_header(StreamKind::Channel(channel)))
            .await
            .map_err(|e| self.write_error(e))?;
        let state = Arc::new(ChannelState { out: Mutex::new(Outbound::default()), acked: watch::Sender::new(0) });
        tokio::spawn(read_acks(self.inner.shared.clone(), state.clone(), recv));
        let sealer = ChannelSealer::new(self.inner.seal_key.clone(), self.inner.epoch, MessageKind::Stream, channel);
        let sender = Arc::new(ChannelSender { stream: tokio::sync::Mutex::new((send, sealer)), state });
        senders.insert(channel, sender.clone());
        Ok(sender)
    }

    fn write_error(&self, e: quinn::WriteError) -> Error {
        match e {
            quinn::WriteError::ConnectionLost(_) => self.inner.shared.error(),
            quinn::WriteError::Stopped(code) => {
                Error::ProtocolViolation { side: Side::Remote, reason: format!("peer stopped the channel ({code})") }
            }
            quinn::WriteError::ClosedStream | quinn::WriteError::ZeroRttRejected => Error::Closed,
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
async fn accept_channels(shared: Arc<Shared>, tx: mpsc::UnboundedSender<Delivery>) {
    while let Ok((send, recv)) = shared.conn.accept_bi().await {
        tokio::spawn(read_channel(shared.clone(), send, recv, tx.clone()));
    }
}

async fn read_channel(
    shared: Arc<Shared>,
    send: SendStream,
    mut recv: RecvStream,
    tx: mpsc::UnboundedSender<Delivery>,
) {
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
    let (ack_tx, ack_rx) = watch::channel(0u64);
    // Acknowledgements are cumulative, so they may only cover an unbroken run from 1: once a
    // message of this channel was refused (a gap), nothing more is acknowledged, and the sender's
    // `delivered` never reports a message that did not arrive.
    let mut contiguous = Some(0u64);
    let ack_tx = Arc::new(ack_tx);
    tokio::spawn(write_acks(send, ack_rx));
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
        // Bound memory before allocating: wait for budget (released when the application takes
        // the message). A message never costs more than the whole budget, or it could never be
        // admitted.
        let cost = (header.length as usize + PER_MESSAGE_OVERHEAD).min(shared.budget_total);
        let permit = tokio::select! {
            p = shared.budget.clone().acquire_many_owned(cost as u32) => match p { Ok(p) => p, Err(_) => return },
            _ = shared.conn.closed() => return,
        };
        let mut body = vec![0u8; header.length as usize];
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
        match shared.open(frame) {
            Ok(opened) => {
                contiguous = contiguous.filter(|c| opened.seq == c + 1).map(|_| opened.seq);
                let ack = contiguous.map(|seq| (ack_tx.clone(), seq));
                if tx.send(Delivery { opened, ack, _budget: permit }).is_err() {
                    return; // the session handle is gone
                }
            }
            Err(r) => shared.reject(MessageKind::Stream, &r),
        }
    }
}

/// Reads, opens and delivers the peer's datagrams. A datagram that finds no room in the
/// receive budget is dropped and counted: datagrams may be lost, and never wait.
async fn read_datagrams(shared: Arc<Shared>, tx: mpsc::UnboundedSender<Delivery>) {
    while let Ok(bytes) = shared.conn.read_datagram().await {
        let cost = (bytes.len() + PER_MESSAGE_OVERHEAD).min(shared.budget_total);
        let Ok(permit) = shared.budget.clone().try_acquire_many_owned(cost as u32) else {
            shared.tally.add(Counter::datagrams_dropped, 1);
            continue;
        };
        let opened = shared.opener.lock().unwrap_or_else(|e| e.into_inner()).open_bytes(&bytes, now_ms());
        match opened {
            Ok(opened) => {
                if tx.send(Delivery { opened, ack: None, _budget: permit }).is_err() {
                    return;
                }
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

/// Writes the latest acknowledged sequence number back on an inbound channel, coalescing.
async fn write_acks(mut send: SendStream, mut acked: watch::Receiver<u64>) {
    while acked.changed().await.is_ok() {
        let seq = *acked.borrow_and_update();
        let mut buf = Vec::with_capacity(13);
        Frame::Ack { seq }.encode(&mut buf);
        if send.write_all(&buf).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
}

/// Reads the peer's ACK frames for one of our channels.
async fn read_acks(shared: Arc<Shared>, state: Arc<ChannelState>, mut recv: RecvStream) {
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
                    format!("frame type {:#04x} on a channel's return direction", h.frame_type),
                );
            }
            Err(e) => return shared.wire_violation(e),
        };
        let mut body = [0u8; 8];
        match read_exact(&mut recv, &mut body).await {
            Ok(()) => {}
            Err(ReadFailure::Gone) => return,
            Err(ReadFailure::Wire(e)) => return shared.wire_violation(e),
        }
        let seq = match header.decode_body(Bytes::copy_from_slice(&body)) {
            Ok(Frame::Ack { seq }) => seq,
            Ok(_) => return shared.violation(close_code::PROTOCOL_VIOLATION, "not an ACK".into()),
            Err(e) => return shared.wire_violation(e),
        };
        let r = state.out.lock().unwrap_or_else(|e| e.into_inner()).on_ack(seq);
        if let Err(e) = r {
            return shared.violation(close_code::PROTOCOL_VIOLATION, e.to_string());
        }
        debug!(seq, "ack");
        state.acked.send_replace(seq);
    }
}
