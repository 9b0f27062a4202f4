//! The session protocol as one deterministic state machine: [`SessionCore`].
//!
//! A session is a conversation with one peer that outlives its connections. The core holds all
//! of its protocol state and every decision taken on it; the async shell
//! ([`Session`](crate::Session)) only moves bytes between the core and quinn, under one lock on
//! the core, and wakes whoever waits. Nothing here does I/O, reads a clock or draws randomness:
//! time comes in as arguments (`now`, ms on any monotonic clock, for the reliability timers;
//! `wall`, ms since the Unix epoch, for the send times that freshness checks compare), and the
//! retransmission jitter from a seed. So the same inputs always give the same outputs, and the
//! two-node harness in this module's tests runs thousands of seeded interleavings of loss,
//! duplication, reordering, corruption, blackouts and reconnects in a few seconds.
//!
//! What the core owns:
//!
//! - the [`Outbox`] (numbering, retransmission, bounds) and the [`Inbox`] (order, de-duplication,
//!   acknowledgements), and the receive buffer's accounting ([`SessionCore::reserve`]);
//! - the [`Opener`] (tag, epoch, freshness, replay windows) and, per connection, the sealers and
//!   the cache of sealed frames: a message is sealed once per key, and every resend on the same
//!   connection is the identical frame, so no AES-GCM nonce is ever used for two plaintexts;
//! - the stream rules: one control stream carrying ACK frames, one stream per channel and
//!   direction carrying that channel's MESSAGE frames, each channel opened once per connection;
//!   any other frame is a [`Violation`], which names the close code;
//! - tag-failure counting (too many close the connection), the channel limits, the datagram
//!   sealers (re-made under each new key, continuing their numbering) and the AEAD usage limits
//!   (a key that sealed half its limit asks for a fresh connection).
//!
//! The inputs are [`SessionCore::new_connection`], the application's [`SessionCore::push`],
//! [`SessionCore::poll_deliver`] and [`SessionCore::ack`], and what the connection reads
//! ([`SessionCore::on_channel_stream`], [`SessionCore::on_message`],
//! [`SessionCore::on_control`], [`SessionCore::on_datagram`]); the outputs are
//! [`SessionCore::poll_transmit`] (ACK frames for the control stream, sealed MESSAGE frames per
//! channel stream) and [`SessionCore::poll_timeout`]. Decisions come back as return values: a
//! [`Violation`] means "close this connection with `violation.close_code()`", a
//! [`Stop::FreshKeys`] means "move the session to a new connection". Timers fire by calling
//! [`SessionCore::poll_transmit`] at or after [`SessionCore::poll_timeout`].
//!
//! The hello (new session, resume, retired epochs) is decided in [`super::hello`].

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;

pub use super::hello::PeerHello;
use super::reliable::{Full, Inbox, InboxConfig, Outbox, OutboxConfig, Received};
use super::replay::MAX_SEQ;
use super::seal::{ChannelSealer, OpenConfig, Opened, Opener, OpeningKey, Reject, SealError, SealTicket, SealingKey};
pub use super::violation::Violation;
use super::wire::{
    self, FRAME_HEADER_LEN, Frame, FrameHeader, MESSAGE_OVERHEAD, MessageKind, STREAM_HEADER_LEN, StreamKind,
    frame_type,
};
use super::{ChannelMap, ChannelSet};
use crate::stats::{Counter, Tally};

/// Channels from this one up are the library's own (durable channels, RPC requests and
/// responses): they do not count against the channel limit, and the application cannot send on
/// them.
pub const FIRST_RESERVED_CHANNEL: u16 = super::durable::DURABLE_CHANNEL;

/// Most transmissions [`SessionCore::poll_transmit`] takes from the outbox in one call.
pub const TRANSMIT_BATCH: usize = 64;

/// How long a worn-out key (see [`SessionCore::worn_out`]) waits for what it sealed to be
/// acknowledged before the session moves to fresh keys anyway, ms (what is not acknowledged
/// then is resent on the new connection).
pub const KEY_DRAIN_GRACE_MS: u64 = 2_000;

/// What a session is configured with (negotiated in the hello where it involves the peer).
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Our session epoch (random, non-zero): it goes into every frame we seal.
    pub epoch: u64,
    /// The peer's session epoch: frames sealed under any other are refused.
    pub peer_epoch: u64,
    /// Opening rules: limits, replay window, freshness.
    pub open: OpenConfig,
    /// Sender bounds and timers.
    pub outbox: OutboxConfig,
    /// Receiver bounds and acknowledgement batching.
    pub inbox: InboxConfig,
    /// Tag failures on one connection that close it.
    pub max_tag_failures: u32,
    /// Largest payload we accept.
    pub max_recv: usize,
    /// Largest payload we send (the smaller of ours and the peer's).
    pub max_send: usize,
    /// Most application channels we open (reserved channels aside), and most datagram
    /// channels.
    pub max_channels: u16,
    /// Received-but-unread bytes this session holds before its channel readers wait.
    pub receive_buffer: usize,
}

impl SessionConfig {
    /// Settles what the peer's HELLO decides: its epoch, the largest payload we send (the
    /// smaller of ours and its limit), the channels we open (no more than it accepts: a message
    /// on a channel it could not open would be dropped and resent for ever) and the span of
    /// unacknowledged messages per channel (its replay window, so a resend is never too old for
    /// it). Our own limits are [`SessionConfig::max_recv`] and the inbox's channel count.
    ///
    /// A dialler's session made before the acceptor's HELLO takes [`PeerHello::EARLY`] here,
    /// then the real one with [`SessionCore::on_peer_hello`].
    pub fn with_peer(mut self, peer: &PeerHello) -> SessionConfig {
        self.peer_epoch = peer.epoch;
        self.max_send = self.max_recv.min(peer.max_message_size);
        let ours = u16::try_from(self.inbox.max_channels).unwrap_or(u16::MAX);
        self.max_channels = ours.min(peer.max_channels);
        self.outbox.max_per_channel = peer.window;
        self
    }
}

/// Why [`SessionCore::push`] refused a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PushError {
    /// Larger than the largest payload both sides accept.
    #[error("message of {size} bytes is over the limit of {limit}")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The outbox is full: wait for acknowledgements.
    #[error("{0}")]
    Full(Full),
    /// A new channel beyond [`SessionConfig::max_channels`].
    #[error("more than {0} channels")]
    TooManyChannels(u16),
    /// The channel used every sequence number of this epoch.
    #[error("sequence numbers exhausted on this channel")]
    SeqExhausted,
}

/// Why [`SessionCore::poll_transmit`] cannot go on over this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Sending on needs a fresh message key: move the session to a new connection (what is
    /// unacknowledged is sealed again under the new key).
    FreshKeys(&'static str),
    /// A frame could not be sealed: the session cannot go on.
    Seal(SealError),
}

/// What to write now: ACK frames for the control stream and MESSAGE frames per channel stream.
#[derive(Debug, Default)]
pub struct Transmits {
    /// ACK frames, concatenated, for the control stream.
    pub control: Option<Bytes>,
    /// MESSAGE frames, each for its channel's stream, in order per channel: resends as the
    /// frames sealed before, new messages as tickets to seal (see [`Outgoing`]).
    pub frames: Vec<(u16, Outgoing)>,
    /// The batch was full: call again, there may be more.
    pub more: bool,
    /// The connection these frames are for (see [`SessionCore::record_sealed`]).
    pub connection: u64,
}

/// One MESSAGE frame to write.
#[derive(Debug)]
pub enum Outgoing {
    /// A frame sealed before on this connection, sent again byte for byte.
    Sealed(Bytes),
    /// A new message: its sequence number is taken; seal the payload with the ticket (no lock
    /// needed), write the frame, and hand it back with [`SessionCore::record_sealed`] so that a
    /// resend on this connection is the same frame.
    Seal(SealTicket, Bytes),
}

impl Transmits {
    /// Seals what is to be sealed here and now, and records it in `core`: the frames to
    /// write, in order. (The shell seals outside its lock instead; this is the same, in one
    /// step.)
    pub fn seal_all(self, core: &mut SessionCore) -> (Option<Bytes>, Vec<(u16, Bytes)>) {
        let mut frames = Vec::with_capacity(self.frames.len());
        let mut sealed = Vec::new();
        for (channel, o) in self.frames {
            frames.push((channel, seal_one(channel, o, &mut sealed)));
        }
        core.record_sealed(self.connection, sealed);
        (self.control, frames)
    }
}

/// A frame to write: as it was, or sealed now (and then noted in `sealed` for
/// [`SessionCore::record_sealed`]).
pub fn seal_one(channel: u16, o: Outgoing, sealed: &mut Vec<SealedFrame>) -> Bytes {
    match o {
        Outgoing::Sealed(f) => f,
        Outgoing::Seal(ticket, payload) => {
            let (seq, sent_at) = (ticket.seq(), ticket.sent_at_ms());
            let mut buf = Vec::with_capacity(payload.len() + MESSAGE_OVERHEAD);
            ticket.seal(&payload, &mut buf);
            let frame = Bytes::from(buf);
            sealed.push(SealedFrame { channel, seq, sent_at, frame: frame.clone() });
            frame
        }
    }
}

/// A frame sealed from a ticket, handed back to [`SessionCore::record_sealed`].
#[derive(Debug)]
pub struct SealedFrame {
    /// Its channel.
    pub channel: u16,
    /// Its sequence number.
    pub seq: u64,
    /// The send time sealed into it (ms since the Unix epoch).
    pub sent_at: u64,
    /// The frame.
    pub frame: Bytes,
}

/// What became of a message read from a channel stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// New: it will be delivered in order.
    Accepted,
    /// A copy of one already received: dropped and acknowledged again.
    Duplicate,
    /// Dropped before anything recorded it, for lack of room (the sender resends it).
    Dropped,
    /// Refused by a check (tag, freshness, epoch...): counted and dropped.
    Refused,
}

/// A message for the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Channel message or datagram.
    pub kind: MessageKind,
    /// Its channel.
    pub channel: u16,
    /// Its sequence number.
    pub seq: u64,
    /// The payload.
    pub payload: Bytes,
}

/// One channel's sealing on one connection.
struct SealedChannel {
    sealer: ChannelSealer,
    /// Frames sealed and not yet acknowledged, by sequence number (ascending), with their
    /// wall-clock send time: a (channel, seq) is sealed once per key, and resent byte for byte.
    /// Acknowledged frames leave from the front.
    sent: VecDeque<(u64, u64, Bytes)>,
}

impl SealedChannel {
    fn get(&self, seq: u64) -> Option<(u64, &Bytes)> {
        self.sent.binary_search_by_key(&seq, |(s, _, _)| *s).ok().map(|i| (self.sent[i].1, &self.sent[i].2))
    }

    fn insert(&mut self, seq: u64, sent_at: u64, frame: Bytes) {
        match self.sent.back() {
            Some(&(last, _, _)) if last >= seq => {
                // Not expected (first transmissions come in order), but kept sorted regardless.
                if let Err(i) = self.sent.binary_search_by_key(&seq, |(s, _, _)| *s) {
                    self.sent.insert(i, (seq, sent_at, frame));
                }
            }
            _ => self.sent.push_back((seq, sent_at, frame)),
        }
    }
}

/// What the core keeps about the current connection.
struct Conn {
    key: Arc<SealingKey>,
    /// Per channel: its sealer and the frames sealed under this key.
    channels: ChannelMap<u16, SealedChannel>,
    /// Channel streams the peer opened.
    seen_channels: ChannelSet<u16>,
    tag_failures: u32,
    /// Since when the key has sealed half its usage limit: nothing new is sealed on this
    /// connection, and the session moves to fresh keys once what it sealed is acknowledged.
    worn_out: Option<u64>,
    /// Why we close this connection, once we decided to.
    failure: Option<Violation>,
}

impl Conn {
    fn new(key: SealingKey) -> Conn {
        Conn {
            key: Arc::new(key),
            channels: ChannelMap::default(),
            seen_channels: ChannelSet::default(),
            tag_failures: 0,
            worn_out: None,
            failure: None,
        }
    }
}

/// The whole session protocol, sans-IO; see the module docs.
pub struct SessionCore {
    config: SessionConfig,
    outbox: Outbox,
    inbox: Inbox,
    opener: Opener,
    conn: Conn,
    /// Connections the session has had (1 for the first).
    connections: u64,
    datagram_sealers: ChannelMap<u16, ChannelSealer>,
    datagrams: VecDeque<Opened>,
    datagram_bytes: usize,
    /// Receive-buffer room channel readers reserved for message bodies they are reading, in all
    /// and per channel.
    reserved: usize,
    reserved_by: ChannelMap<u16, usize>,
    /// Channels whose readers wait for receive-buffer room, with how many readers.
    waiting: ChannelMap<u16, usize>,
    tally: Tally,
}

impl std::fmt::Debug for SessionCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionCore")
            .field("epoch", &self.config.epoch)
            .field("connections", &self.connections)
            .field("in_flight", &self.outbox.in_flight())
            .field("unread", &self.unread())
            .finish()
    }
}

impl SessionCore {
    /// A session over its first connection, with that connection's message keys (see
    /// [`derive_keys`](super::seal::derive_keys)). `seed` drives the retransmission jitter (any
    /// value; a random one in production). Its counters are its own: [`SessionCore::stats`].
    pub fn new(config: SessionConfig, keys: (SealingKey, OpeningKey), seed: u64) -> SessionCore {
        SessionCore::with_tally(config, keys, seed, Tally::standalone())
    }

    /// What this session counted so far (sent, delivered, refused...; the gauges are zero).
    pub fn stats(&self) -> crate::Stats {
        self.tally.session.snapshot()
    }

    /// The counters it counts into.
    pub(crate) fn tally(&self) -> &Tally {
        &self.tally
    }

    /// [`SessionCore::new`], counting into a node's counters too.
    pub(crate) fn with_tally(
        config: SessionConfig,
        keys: (SealingKey, OpeningKey),
        seed: u64,
        tally: Tally,
    ) -> SessionCore {
        let (sealing, opening) = keys;
        let mut inbox = config.inbox.clone();
        inbox.reserved_from = inbox.reserved_from.or(Some(FIRST_RESERVED_CHANNEL));
        SessionCore {
            outbox: Outbox::new(config.outbox.clone(), seed),
            inbox: Inbox::new(inbox),
            opener: Opener::new(opening, config.peer_epoch, config.open.clone()),
            conn: Conn::new(sealing),
            connections: 1,
            datagram_sealers: ChannelMap::default(),
            datagrams: VecDeque::new(),
            datagram_bytes: 0,
            reserved: 0,
            reserved_by: ChannelMap::default(),
            waiting: ChannelMap::default(),
            tally,
            config,
        }
    }

    /// The session moves to a new connection with fresh message keys: the replay windows stay
    /// (nothing accepted before is accepted again), every unacknowledged message is due again,
    /// sealed under the new key, and the datagram sealers continue their numbering under it.
    pub fn new_connection(&mut self, keys: (SealingKey, OpeningKey), now: u64) {
        let (sealing, opening) = keys;
        self.opener.rekey(opening);
        self.conn = Conn::new(sealing);
        self.connections += 1;
        for (&channel, sealer) in self.datagram_sealers.iter_mut() {
            let last = sealer.last_seq();
            *sealer = ChannelSealer::new(self.conn.key.clone(), self.config.epoch, MessageKind::Datagram, channel);
            sealer.skip_to(last);
        }
        self.outbox.retransmit_all(now);
    }

    /// The peer's HELLO arrived, for a session made before it (a dialler's, with
    /// [`SessionConfig::with_peer`] of [`PeerHello::EARLY`], so that its first message could
    /// leave right behind its own HELLO). Its epoch opens the peer's frames from now on, and its
    /// limits replace the early ones; every valid HELLO allows at least those, so what was
    /// queued or sent early stays within bounds. A session that already knows its peer's
    /// epoch keeps it (an epoch never changes within a session).
    pub fn on_peer_hello(&mut self, peer: &PeerHello) {
        if self.config.peer_epoch != 0 {
            return;
        }
        self.config = self.config.clone().with_peer(peer);
        self.opener.learn_epoch(peer.epoch);
        self.outbox.raise_max_per_channel(peer.window);
    }

    /// Whether the peer's HELLO is still awaited ([`SessionCore::on_peer_hello`]).
    pub fn awaits_peer_hello(&self) -> bool {
        self.config.peer_epoch == 0
    }

    /// Whether connection number `connection` (what [`SessionCore::connections`] said when it
    /// started carrying the session) still carries it.
    ///
    /// The rule for a connection the session has left: nothing it still delivers is handed to
    /// the core, and its writer takes nothing. Its readers may still hold frames the peer sealed
    /// under the old key: opened under the new one they would count as tag failures (enough of
    /// them close the new connection), its streams would count as channels opened twice, and
    /// what its writer sealed under the new key would go out on a dead connection. Ignoring them
    /// loses nothing: the peer sends again on the new connection whatever it has not seen
    /// acknowledged, and acknowledges again what it receives twice.
    pub fn is_current(&self, connection: u64) -> bool {
        connection == self.connections
    }

    /// Connections the session has had, the current one included.
    pub fn connections(&self) -> u64 {
        self.connections
    }

    /// Our epoch.
    pub fn epoch(&self) -> u64 {
        self.config.epoch
    }

    /// The configuration.
    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// Why we decided to close the current connection, if we did.
    pub fn failure(&self) -> Option<&Violation> {
        self.conn.failure.as_ref()
    }

    /// Records a violation on the current connection (the caller closes it with its code).
    pub fn violation(&mut self, v: Violation) -> Violation {
        if matches!(v, Violation::Malformed(_) | Violation::Rpc(_) | Violation::Durable(_)) {
            self.tally.add(Counter::malformed_frames, 1);
        }
        if self.conn.failure.is_none() {
            self.conn.failure = Some(v.clone());
        }
        v
    }

    // ---- sending ----

    /// Queues a channel message at `now`: its sequence number, and how many messages are now
    /// unacknowledged. `user` is false for the reserved (RPC) channels, which do not count
    /// against the channel limit or the application's counters.
    pub fn push(&mut self, channel: u16, payload: Bytes, user: bool, now: u64) -> Result<(u64, usize), PushError> {
        if payload.len() > self.config.max_send {
            return Err(PushError::TooLarge { size: payload.len(), limit: self.config.max_send });
        }
        let last = self.outbox.last_seq(channel);
        if user && last == 0 {
            let reserved = (FIRST_RESERVED_CHANNEL..=u16::MAX).filter(|&c| self.outbox.last_seq(c) != 0).count();
            if self.outbox.channel_count() - reserved >= usize::from(self.config.max_channels) {
                return Err(PushError::TooManyChannels(self.config.max_channels));
            }
        }
        if last >= MAX_SEQ {
            return Err(PushError::SeqExhausted);
        }
        let len = payload.len() as u64;
        let seq = self.outbox.push(channel, payload, now).map_err(PushError::Full)?;
        if user {
            self.tally.add(Counter::messages_sent, 1);
            self.tally.add(Counter::bytes_sent, len);
        }
        Ok((seq, self.outbox.in_flight().0))
    }

    /// What to write now: the acknowledgements due (with frames to write, every one owed), and
    /// up to [`TRANSMIT_BATCH`] sealed frames of what the outbox wants sent (new messages, and
    /// resends whose timer expired). Channels for which `busy` is true (their stream has not
    /// taken earlier frames yet) are skipped: their messages stay due and are not sealed long
    /// before they can leave.
    ///
    /// A worn-out key ([`SessionCore::worn_out`]) seals nothing more; once the peer acknowledged
    /// what it sealed, or [`KEY_DRAIN_GRACE_MS`] after it wore out, this returns
    /// [`Stop::FreshKeys`] (acknowledgements due then wait for the new connection).
    pub fn poll_transmit(&mut self, now: u64, wall: u64, busy: impl Fn(u16) -> bool) -> Result<Transmits, Stop> {
        let mut out = Transmits { connection: self.connections, ..Transmits::default() };
        self.forget_acked();
        if let Some(since) = self.conn.worn_out
            && (self.key_drained() || now >= since.saturating_add(KEY_DRAIN_GRACE_MS))
        {
            return Err(Stop::FreshKeys("the message key reached half its usage limit"));
        }
        let transmits = match self.conn.worn_out {
            Some(_) => Vec::new(),
            None => self.outbox.poll_transmits(now, TRANSMIT_BATCH, |c| !busy(c)),
        };
        // Frames go out now anyway: every acknowledgement owed rides along, due or not, rather
        // than costing a packet of its own later (an RPC caller's next request carries the
        // acknowledgement of the response it just took).
        let riding = !transmits.is_empty();
        let mut acks = Vec::new();
        while let Some(a) = if riding { self.inbox.poll_ack_owed() } else { self.inbox.poll_ack(now) } {
            Frame::Ack(a).encode(&mut acks);
            self.tally.add(Counter::acks_sent, 1);
        }
        if !acks.is_empty() {
            out.control = Some(acks.into());
        }
        if self.conn.worn_out.is_some() {
            return Ok(out);
        }
        out.more = transmits.len() == TRANSMIT_BATCH;
        out.frames.reserve_exact(transmits.len());
        let reseal_after = self.config.open.freshness_ms / 2;
        for t in transmits {
            if t.retransmission {
                self.tally.add(Counter::retransmissions, 1);
            }
            let (key, epoch) = (&self.conn.key, self.config.epoch);
            let ch = self.conn.channels.entry(t.channel).or_insert_with(|| SealedChannel {
                sealer: ChannelSealer::new(key.clone(), epoch, MessageKind::Stream, t.channel),
                sent: VecDeque::new(),
            });
            let frame = match ch.get(t.seq) {
                // A resend is the identical frame, with its original send time: once that is
                // half the peer's freshness horizon old, the peer may refuse it as stale, and
                // sealing it again under this key would reuse a nonce. Move to a fresh key
                // instead (what this batch took is resent on the new connection).
                Some((sent_at, _)) if wall.saturating_sub(sent_at) > reseal_after => {
                    return Err(Stop::FreshKeys("a resend would be stale"));
                }
                Some((_, f)) => Outgoing::Sealed(f.clone()),
                // The key wore out in this batch: the rest goes on the next connection.
                None if self.conn.worn_out.is_some() => continue,
                None => {
                    let ticket = match ch.sealer.ticket(t.seq, wall, t.payload.len()) {
                        Ok(ticket) => ticket,
                        Err(SealError::KeyExhausted) => {
                            self.conn.worn_out.get_or_insert(now);
                            continue;
                        }
                        Err(e) => return Err(Stop::Seal(e)),
                    };
                    if self.conn.key.wants_fresh_key() {
                        self.conn.worn_out.get_or_insert(now);
                    }
                    Outgoing::Seal(ticket, t.payload)
                }
            };
            out.frames.push((t.channel, frame));
        }
        out.more &= self.conn.worn_out.is_none();
        Ok(out)
    }

    /// Keeps the frames sealed from the tickets of [`SessionCore::poll_transmit`] on
    /// `connection`, so that a resend on that connection is the same frame. Frames of an
    /// earlier connection are dropped (their key is gone). Call it before the next
    /// `poll_transmit` of that connection.
    pub fn record_sealed(&mut self, connection: u64, frames: Vec<SealedFrame>) {
        if connection != self.connections {
            return;
        }
        for f in frames {
            if let Some(ch) = self.conn.channels.get_mut(&f.channel) {
                ch.insert(f.seq, f.sent_at, f.frame);
            }
        }
    }

    /// Forgets sealed frames the peer acknowledged (in order: one acknowledged out of order
    /// goes once the ones before it did).
    fn forget_acked(&mut self) {
        for (&c, ch) in self.conn.channels.iter_mut() {
            while ch.sent.front().is_some_and(|&(s, _, _)| self.outbox.is_acked(c, s)) {
                ch.sent.pop_front();
            }
        }
    }

    /// Whether this connection's key sealed half its usage limit: nothing new is sealed on it,
    /// and [`SessionCore::poll_transmit`] asks for fresh keys once what it sealed is
    /// acknowledged (call it when acknowledgements arrive) or after [`KEY_DRAIN_GRACE_MS`].
    pub fn worn_out(&self) -> bool {
        self.conn.worn_out.is_some()
    }

    /// Whether everything sealed under this connection's key was acknowledged.
    fn key_drained(&self) -> bool {
        self.conn.channels.iter().all(|(&c, ch)| ch.sent.iter().all(|&(s, _, _)| self.outbox.is_acked(c, s)))
    }

    /// Seals a datagram on `channel` into `out` at `wall`: its sequence number, and whether the
    /// key now wants replacing (move to a new connection soon).
    pub fn seal_datagram(
        &mut self,
        channel: u16,
        payload: &[u8],
        wall: u64,
        out: &mut Vec<u8>,
    ) -> Result<(u64, bool), DatagramError> {
        if !self.datagram_sealers.contains_key(&channel)
            && self.datagram_sealers.len() >= usize::from(self.config.max_channels)
        {
            return Err(DatagramError::TooManyChannels(self.config.max_channels));
        }
        let (key, epoch) = (&self.conn.key, self.config.epoch);
        let sealer = self
            .datagram_sealers
            .entry(channel)
            .or_insert_with(|| ChannelSealer::new(key.clone(), epoch, MessageKind::Datagram, channel));
        let seq = sealer.last_seq() + 1;
        let sealed = sealer.seal(seq, wall, payload, out);
        let wants_fresh = self.conn.key.wants_fresh_key();
        sealed.map_err(DatagramError::Seal)?;
        // Counted as sent by the caller, once the connection took it.
        Ok((seq, wants_fresh))
    }

    // ---- receiving ----

    /// The peer opened a stream whose first bytes are `head`: the channel it carries.
    pub fn on_channel_stream(&mut self, head: [u8; STREAM_HEADER_LEN]) -> Result<u16, Violation> {
        match wire::decode_stream_header(head) {
            Ok(StreamKind::Channel(c)) if self.conn.seen_channels.insert(c) => Ok(c),
            Ok(StreamKind::Channel(c)) => Err(self.violation(Violation::ChannelOpenedTwice(c))),
            Ok(StreamKind::Control) => Err(self.violation(Violation::SecondControlStream)),
            Err(e) => Err(self.violation(Violation::Malformed(e))),
        }
    }

    /// The header of the next frame on a channel stream, validated (a MESSAGE within the size
    /// limit): its `length` is the body's, to read next and hand to [`SessionCore::on_message`].
    pub fn on_message_header(&mut self, head: [u8; FRAME_HEADER_LEN]) -> Result<FrameHeader, Violation> {
        match FrameHeader::decode(head, self.config.max_recv) {
            Ok(h) if h.frame_type == frame_type::MESSAGE => Ok(h),
            Ok(h) => Err(self.violation(Violation::FrameOnChannel(h.frame_type))),
            Err(e) => Err(self.violation(Violation::Malformed(e))),
        }
    }

    /// A MESSAGE frame's body read from `channel`'s stream after `header` (from
    /// [`SessionCore::on_message_header`]), for which `reserved` bytes of
    /// receive buffer were reserved ([`SessionCore::reserve`]; released here whatever becomes of
    /// it). Opens it and keeps it, or refuses it; only a message the inbox keeps is recorded
    /// in the replay window, so a message dropped for lack of room is accepted when resent.
    pub fn on_message(
        &mut self,
        channel: u16,
        header: FrameHeader,
        body: Bytes,
        reserved: usize,
        wall: u64,
        now: u64,
    ) -> Result<Arrival, Violation> {
        self.unreserve(channel, reserved);
        let frame = match header.decode_body(body) {
            Ok(Frame::Message(m)) if m.kind == MessageKind::Stream && m.channel == channel => m,
            Ok(_) => return Err(self.violation(Violation::ForeignMessage(channel))),
            Err(e) => return Err(self.violation(Violation::Malformed(e))),
        };
        let seq = frame.seq;
        let opened = match self.opener.verify(frame, wall) {
            Ok(opened) => opened,
            Err(Reject::Replay(_)) => {
                self.tally.add(Counter::replays_rejected, 1);
                self.duplicate(channel, seq, now);
                return Ok(Arrival::Duplicate);
            }
            Err(r) => {
                self.reject(MessageKind::Stream, &r)?;
                return Ok(Arrival::Refused);
            }
        };
        let received = match self.inbox.check(channel, seq, opened.payload.len()) {
            Received::Accepted => match self.opener.commit(opened.kind, channel, seq) {
                Ok(()) => self.inbox.on_message(channel, seq, opened.payload, now),
                Err(_) => {
                    self.inbox.note_duplicate(channel, seq, now);
                    Received::Duplicate
                }
            },
            // Counted (and a duplicate acknowledged again) by the inbox; nothing is kept.
            _ => self.inbox.on_message(channel, seq, opened.payload, now),
        };
        Ok(match received {
            Received::Accepted => Arrival::Accepted,
            Received::Duplicate => {
                self.tally.add(Counter::duplicates_dropped, 1);
                Arrival::Duplicate
            }
            Received::Dropped => {
                self.tally.add(Counter::inbox_dropped, 1);
                Arrival::Dropped
            }
        })
    }

    /// A copy of something already received: counted, and acknowledged again so the sender
    /// stops resending.
    fn duplicate(&mut self, channel: u16, seq: u64, now: u64) {
        self.tally.add(Counter::duplicates_dropped, 1);
        self.inbox.note_duplicate(channel, seq, now);
    }

    /// Counts a refused message; too many tag failures on one connection close it.
    fn reject(&mut self, kind: MessageKind, r: &Reject) -> Result<(), Violation> {
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
        tracing::debug!(target: "quicseal::reject", ?kind, reason = %r, "message refused");
        if matches!(r, Reject::Tag) {
            self.conn.tag_failures += 1;
            if self.conn.tag_failures >= self.config.max_tag_failures {
                let failures = self.conn.tag_failures;
                return Err(self.violation(Violation::IntegrityFailures(Some(failures))));
            }
        }
        Ok(())
    }

    /// The header of the next frame on the control stream, validated (an ACK, whose header
    /// bounds its body): its `length` is the body's, for [`SessionCore::on_control`].
    pub fn on_control_header(&mut self, head: [u8; FRAME_HEADER_LEN]) -> Result<FrameHeader, Violation> {
        match FrameHeader::decode(head, 0) {
            Ok(h) if h.frame_type == frame_type::ACK => Ok(h),
            Ok(h) => Err(self.violation(Violation::FrameOnControl(h.frame_type))),
            Err(e) => Err(self.violation(Violation::Malformed(e))),
        }
    }

    /// An ACK frame's body from the control stream, after `header` (from
    /// [`SessionCore::on_control_header`]): how many messages it newly acknowledged.
    pub fn on_control(&mut self, header: FrameHeader, body: Bytes, now: u64) -> Result<usize, Violation> {
        let ack = match header.decode_body(body) {
            Ok(Frame::Ack(a)) => a,
            Ok(_) => return Err(self.violation(Violation::FrameOnControl(header.frame_type))),
            Err(e) => return Err(self.violation(Violation::Malformed(e))),
        };
        match self.outbox.on_ack(&ack, now) {
            Ok(acked) => {
                self.tally.add(Counter::acked, acked.newly.len() as u64);
                Ok(acked.newly.len())
            }
            Err(e) => Err(self.violation(Violation::Ack(e))),
        }
    }

    /// A datagram: kept for the application if it opens and the receive buffer has room
    /// (`node_room` says whether the node's budget has room for its payload), else dropped and
    /// counted. Returns whether it was kept.
    pub fn on_datagram(
        &mut self,
        bytes: &Bytes,
        wall: u64,
        node_room: impl Fn(usize) -> bool,
    ) -> Result<bool, Violation> {
        match self.opener.open_bytes(bytes, wall) {
            Ok(opened) => {
                let len = opened.payload.len();
                let used = self.datagram_bytes + self.inbox.held_bytes();
                if used + len > self.config.receive_buffer || !(self.unread() == 0 || node_room(len)) {
                    self.tally.add(Counter::datagrams_dropped, 1);
                    return Ok(false);
                }
                self.datagram_bytes += len;
                self.datagrams.push_back(opened);
                Ok(true)
            }
            // A malformed datagram is dropped like any refused one: it cannot desynchronise a
            // stream, so it does not close the connection.
            Err(r) => self.reject(MessageKind::Datagram, &r).map(|()| false),
        }
    }

    // ---- the application ----

    /// The next message for the application: channel messages in order per channel (taking
    /// channels in turn), then datagrams. The reserved channels are left to
    /// [`SessionCore::poll_deliver_channel`].
    pub fn poll_deliver(&mut self, now: u64) -> Option<Delivery> {
        let d = if let Some((channel, seq, payload)) = self.inbox.poll_deliver(now) {
            Delivery { kind: MessageKind::Stream, channel, seq, payload }
        } else {
            let d = self.datagrams.pop_front()?;
            self.datagram_bytes -= d.payload.len();
            self.tally.add(Counter::datagrams_delivered, 1);
            Delivery { kind: MessageKind::Datagram, channel: d.channel, seq: d.seq, payload: d.payload }
        };
        self.tally.add(Counter::messages_delivered, 1);
        self.tally.add(Counter::bytes_delivered, d.payload.len() as u64);
        Some(d)
    }

    /// The next message of one channel, in order (the RPC layer takes its reserved channels
    /// this way).
    pub fn poll_deliver_channel(&mut self, channel: u16, now: u64) -> Option<(u64, Bytes)> {
        self.inbox.poll_deliver_channel(channel, now)
    }

    /// Acknowledges a message in manual-ack mode; whether it was new.
    pub fn ack(&mut self, channel: u16, seq: u64, now: u64) -> bool {
        self.inbox.ack(channel, seq, now)
    }

    /// The next timer (reliability clock, ms): a resend or an acknowledgement due.
    pub fn poll_timeout(&self) -> Option<u64> {
        let grace = self.conn.worn_out.map(|since| since.saturating_add(KEY_DRAIN_GRACE_MS));
        [self.outbox.next_deadline(), self.inbox.next_deadline(), grace].into_iter().flatten().min()
    }

    /// The last sequence number given out on `channel` (0 before the first).
    pub fn last_seq(&self, channel: u16) -> u64 {
        self.outbox.last_seq(channel)
    }

    /// Whether message `seq` of `channel` was acknowledged.
    pub fn is_acked(&self, channel: u16, seq: u64) -> bool {
        self.outbox.is_acked(channel, seq)
    }

    /// Whether every message of `channel` up to `seq` was acknowledged.
    pub fn all_acked_through(&self, channel: u16, seq: u64) -> bool {
        self.outbox.all_acked_through(channel, seq)
    }

    /// Unacknowledged messages and bytes.
    pub fn in_flight(&self) -> (usize, usize) {
        self.outbox.in_flight()
    }

    /// Smoothed round-trip time of acknowledgements, ms.
    pub fn srtt(&self) -> Option<u64> {
        self.outbox.srtt()
    }

    // ---- the receive buffer ----

    /// What this session holds received and unread: messages kept (in order or not), room
    /// reserved for bodies being read, and datagrams.
    pub fn unread(&self) -> usize {
        self.inbox.held_bytes() + self.reserved + self.datagram_bytes
    }

    /// Reserves room for a message body of `len` bytes that follows in order on `channel`, if
    /// the receive buffer has it (`node_room` says whether the node's budget, over all its
    /// sessions, has room for `len` more): what the application can take now plus what readers
    /// reserved must leave room (an empty buffer takes any one message, so a message larger
    /// than the buffer still passes). Messages held behind a gap do not count: they have their
    /// own bound in the inbox and must never keep out the message that fills the gap.
    ///
    /// Fair shares: while readers of other channels wait for room, a channel that already has
    /// messages buffered may fill no more than an equal share of the buffer; a channel with none
    /// gets in as soon as one message fits. So a busy channel cannot take all the room and starve
    /// the others (the application takes channels in turn).
    pub fn reserve(&mut self, channel: u16, len: usize, node_room: impl Fn(usize) -> bool) -> bool {
        let budget = self.config.receive_buffer;
        let total = self.inbox.ready_bytes() + self.reserved;
        let mine = self.inbox.ready_bytes_of(channel) + self.reserved_by.get(&channel).copied().unwrap_or(0);
        let others_waiting = self.waiting.keys().filter(|&&c| c != channel).count();
        let fits = (total == 0 || total + len <= budget) && (self.unread() == 0 || node_room(len));
        let within_share = others_waiting == 0 || mine == 0 || mine + len <= budget / (others_waiting + 1);
        if !(fits && within_share) {
            return false;
        }
        self.reserved += len;
        *self.reserved_by.entry(channel).or_insert(0) += len;
        true
    }

    /// Gives back room reserved for `channel` (a read that failed).
    pub fn unreserve(&mut self, channel: u16, len: usize) {
        if len == 0 {
            return;
        }
        self.reserved = self.reserved.saturating_sub(len);
        if let std::collections::hash_map::Entry::Occupied(mut e) = self.reserved_by.entry(channel) {
            *e.get_mut() = e.get().saturating_sub(len);
            if *e.get() == 0 {
                e.remove();
            }
        }
    }

    /// Marks (or, with `false`, unmarks) a reader of `channel` as waiting for room.
    pub fn set_waiting(&mut self, channel: u16, waiting: bool) {
        let entry = self.waiting.entry(channel).or_insert(0);
        if waiting {
            *entry += 1;
        } else {
            *entry = entry.saturating_sub(1);
        }
        if self.waiting.get(&channel) == Some(&0) {
            self.waiting.remove(&channel);
        }
    }
}

/// Why a datagram could not be sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DatagramError {
    /// A new datagram channel beyond [`SessionConfig::max_channels`].
    #[error("more than {0} datagram channels")]
    TooManyChannels(u16),
    /// The sealer refused it.
    #[error("{0}")]
    Seal(SealError),
}

#[cfg(test)]
mod tests;
