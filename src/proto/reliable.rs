//! The reliability core: an [`Outbox`] that numbers, keeps and retransmits messages until the
//! peer's application acknowledged them, and an [`Inbox`] that de-duplicates, reorders and
//! delivers in order per channel, and says what to acknowledge.
//!
//! Sans-IO: time (`now`, milliseconds on any monotonic clock) and randomness (a seed) are
//! arguments. The shell moves [`Transmit`]s and [`AckRanges`] over whatever transport it has and
//! calls these methods in this order, as often as it likes:
//!
//! - sender: [`Outbox::push`] new messages; send everything [`Outbox::poll_transmit`] returns;
//!   feed peer acks to [`Outbox::on_ack`]; wake up at [`Outbox::next_deadline`]; after a
//!   reconnect call [`Outbox::retransmit_all`].
//! - receiver: feed messages to [`Inbox::on_message`]; hand [`Inbox::poll_deliver`] results to
//!   the application; call [`Inbox::ack`] when the application took one (or let
//!   [`Inbox::poll_deliver`] do it in auto-ack mode); send what [`Inbox::poll_ack`] returns; wake up
//!   at [`Inbox::next_deadline`].
//!
//! Acknowledgements are end to end: they cover messages the application took, never merely
//! received ones. The cumulative part covers `1..=cumulative`; selective ranges above it cover
//! messages acknowledged out of order (manual-ack mode).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};

use bytes::Bytes;

use super::ChannelMap;

/// Most selective ranges carried in one acknowledgement.
pub const MAX_ACK_RANGES: usize = 32;

/// What the receiver acknowledges on one channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckRanges {
    /// The channel.
    pub channel: u16,
    /// Every sequence number in `1..=cumulative` was taken by the application.
    pub cumulative: u64,
    /// Further inclusive ranges taken, above `cumulative + 1`, ascending and disjoint, at most
    /// [`MAX_ACK_RANGES`].
    pub ranges: Vec<(u64, u64)>,
}

/// How long a channel refused for lack of room counts as waiting for its share (see
/// [`Outbox::has_room`]), ms: its sender retries on every acknowledgement, so a sender still
/// waiting renews it often.
pub const WANTING_FRESH_MS: u64 = 1000;

/// Sender limits and timers.
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    /// Most unacknowledged messages, all channels together.
    pub max_messages: usize,
    /// Most unacknowledged payload bytes, all channels together.
    pub max_bytes: usize,
    /// Widest span of unacknowledged sequence numbers on one channel, from the oldest
    /// unacknowledged message to the newest, inclusive: the receiver's replay window (announced
    /// in its HELLO). Within it every message we resend is still inside the receiver's window
    /// and reorder range, so it can never be refused as too old or dropped as too far ahead.
    pub max_per_channel: u64,
    /// Retransmission timeout before any round-trip sample, ms.
    pub initial_rto_ms: u64,
    /// Smallest retransmission timeout, ms.
    pub min_rto_ms: u64,
    /// Largest retransmission timeout (the backoff's ceiling), ms.
    pub max_rto_ms: u64,
    /// Whether timeouts trigger retransmission (a transport that is itself reliable while a
    /// connection lasts only needs [`Outbox::retransmit_all`] after a reconnect).
    pub retransmit_on_timeout: bool,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            max_messages: 1024,
            max_bytes: 16 << 20,
            max_per_channel: 2048,
            initial_rto_ms: 1000,
            min_rto_ms: 200,
            max_rto_ms: 60_000,
            retransmit_on_timeout: true,
        }
    }
}

/// The outbox is full: wait for acknowledgements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("outbox full: {messages} messages, {bytes} bytes unacknowledged")]
pub struct Full {
    /// Unacknowledged messages.
    pub messages: usize,
    /// Unacknowledged bytes.
    pub bytes: usize,
}

/// An acknowledgement that cannot be right.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AckError {
    /// It covers sequence numbers never sent.
    #[error("ack for channel {channel} covers {seq}, never sent (last {sent})")]
    BeyondSent {
        /// Channel.
        channel: u16,
        /// The offending number.
        seq: u64,
        /// Highest number sent.
        sent: u64,
    },
    /// Ranges not ascending, overlapping, empty, too many, or touching the cumulative part.
    #[error("malformed ack ranges for channel {0}")]
    BadRanges(u16),
}

/// A message to put on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Channel.
    pub channel: u16,
    /// Sequence number.
    pub seq: u64,
    /// Payload.
    pub payload: Bytes,
    /// Whether it was sent before.
    pub retransmission: bool,
}

/// What acknowledgements did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acked {
    /// (channel, seq) newly acknowledged, in order.
    pub newly: Vec<(u16, u64)>,
}

/// Sender counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Messages accepted by [`Outbox::push`].
    pub pushed: u64,
    /// First transmissions.
    pub transmitted: u64,
    /// Retransmissions.
    pub retransmitted: u64,
    /// Messages acknowledged.
    pub acked: u64,
}

#[derive(Debug)]
struct Unacked {
    payload: Bytes,
    /// When it is due (None: never, waiting for an ack; Some(t): transmit at t).
    due: Option<u64>,
    /// Last transmission time.
    sent_at: Option<u64>,
    attempts: u32,
}

#[derive(Debug, Default)]
struct OutChannel {
    last_seq: u64,
    /// Payload bytes of `unacked`.
    bytes: usize,
    /// When the last message was queued: a later one is never due before it, so first
    /// transmissions leave in sequence order even if callers' clocks were read out of order.
    last_push: u64,
    cumulative: u64,
    unacked: UnackedQueue,
}

/// A channel's unacknowledged messages, oldest first. Sequence numbers are pushed in increasing
/// order and acknowledged mostly from the oldest, so a deque sorted by sequence number does
/// what an ordered map did at a fraction of its cost (the map's insertions and removals were
/// among the largest costs per message, BENCHMARKS.md "CPU time per message"): a push and a
/// cumulative acknowledgement touch only its ends, and a lookup is an index, or a binary search
/// once selective acknowledgements left holes. It holds exactly the unacknowledged messages,
/// never a slot for an acknowledged one, so a peer's acknowledgements cannot make it larger.
#[derive(Debug, Default)]
struct UnackedQueue(VecDeque<(u64, Unacked)>);

impl UnackedQueue {
    fn len(&self) -> usize {
        self.0.len()
    }

    /// The oldest unacknowledged sequence number.
    fn first_seq(&self) -> Option<u64> {
        self.0.front().map(|&(s, _)| s)
    }

    /// Appends `seq`, newer than every message held.
    fn push(&mut self, seq: u64, message: Unacked) {
        debug_assert!(self.0.back().is_none_or(|&(s, _)| s < seq));
        self.0.push_back((seq, message));
    }

    /// Where `seq` is held.
    fn position(&self, seq: u64) -> Option<usize> {
        let &(first, _) = self.0.front()?;
        // Without holes, `seq` sits at its distance from the oldest.
        let guess = usize::try_from(seq.checked_sub(first)?).ok()?;
        if self.0.get(guess).is_some_and(|&(s, _)| s == seq) {
            return Some(guess);
        }
        self.0.binary_search_by_key(&seq, |&(s, _)| s).ok()
    }

    fn contains(&self, seq: u64) -> bool {
        self.position(seq).is_some()
    }

    fn get(&self, seq: u64) -> Option<&Unacked> {
        Some(&self.0[self.position(seq)?].1)
    }

    fn get_mut(&mut self, seq: u64) -> Option<&mut Unacked> {
        let i = self.position(seq)?;
        Some(&mut self.0[i].1)
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = (u64, &mut Unacked)> {
        self.0.iter_mut().map(|(s, m)| (*s, m))
    }

    /// Removes, oldest first, every message up to `highest` that `acked` says was acknowledged,
    /// showing each to `removed` first. One pass at most, however the acknowledgement is shaped.
    fn remove_acked(&mut self, highest: u64, acked: impl Fn(u64) -> bool, mut removed: impl FnMut(u64, &Unacked)) {
        // A cumulative acknowledgement takes from the front.
        while let Some((s, m)) = self.0.front().filter(|&&(s, _)| s <= highest && acked(s)) {
            removed(*s, m);
            self.0.pop_front();
        }
        // Selective ranges past a hole: one pass over what is left, order kept.
        if self.0.iter().take_while(|&&(s, _)| s <= highest).any(|&(s, _)| acked(s)) {
            self.0.retain(|(s, m)| {
                let gone = *s <= highest && acked(*s);
                if gone {
                    removed(*s, m);
                }
                !gone
            });
        }
    }
}

/// When a message is next due: (due time, channel, seq). Ordered by due time, then channel,
/// then sequence number: the order in which due messages leave.
type DueKey = (u64, u16, u64);

/// Whether `key` is the schedule of a message still waiting (unacknowledged, and due then).
fn is_scheduled(channels: &ChannelMap<u16, OutChannel>, &(due, channel, seq): &DueKey) -> bool {
    channels.get(&channel).and_then(|c| c.unacked.get(seq)).is_some_and(|p| p.due == Some(due))
}

/// Smoothed round-trip estimate (RFC 6298).
#[derive(Debug, Clone, Copy)]
struct Rtt {
    srtt: Option<u64>,
    rttvar: u64,
}

/// The sending half of the reliability core.
#[derive(Debug)]
pub struct Outbox {
    config: OutboxConfig,
    channels: ChannelMap<u16, OutChannel>,
    /// The schedule of every message waiting to be (re)transmitted, earliest first.
    ///
    /// A min-heap with lazy removal. Each message with a due time has exactly one entry that
    /// matches it ([`is_scheduled`]); an acknowledgement does not look for its message's entry
    /// (a search in a heap), it leaves it behind, stale. Stale entries are dropped when they
    /// reach the top ([`Outbox::settle_due`] keeps the top current, so [`Outbox::next_deadline`]
    /// is exact) and swept out whenever they could outnumber the live ones, so the heap never
    /// holds more than about twice the unacknowledged messages. A message is scheduled in
    /// increasing time order almost always, so an insertion is one comparison; a removal is
    /// logarithmic. This replaced an ordered set whose two insertions and two removals per
    /// message were the reliability core's largest cost (BENCHMARKS.md "CPU time per message").
    due: BinaryHeap<Reverse<DueKey>>,
    messages: usize,
    bytes: usize,
    rtt: Rtt,
    /// Channels refused for lack of room, and when (see [`Outbox::has_room`]).
    wanting: BTreeMap<u16, u64>,
    rng: u64,
    stats: OutboxStats,
}

impl Outbox {
    /// An empty outbox; `seed` drives the retransmission jitter.
    pub fn new(config: OutboxConfig, seed: u64) -> Outbox {
        Outbox {
            config,
            channels: ChannelMap::default(),
            due: BinaryHeap::new(),
            messages: 0,
            bytes: 0,
            rtt: Rtt { srtt: None, rttvar: 0 },
            wanting: BTreeMap::new(),
            rng: seed | 1,
            stats: OutboxStats::default(),
        }
    }

    /// Raises the span of unacknowledged messages one channel may have
    /// ([`OutboxConfig::max_per_channel`]), once the peer's HELLO announced its replay window.
    /// It never shrinks: what is already queued stays within the new bound.
    pub fn raise_max_per_channel(&mut self, max: u64) {
        self.config.max_per_channel = self.config.max_per_channel.max(max);
    }

    /// Queues a message for `channel`, due at once. Returns its sequence number, or [`Full`]
    /// when the count or byte bound would be exceeded, or the channel's span of unacknowledged
    /// messages would outgrow [`OutboxConfig::max_per_channel`] (a message larger than the byte
    /// bound is accepted only into an empty outbox, so it can never wait forever).
    pub fn push(&mut self, channel: u16, payload: Bytes, now: u64) -> Result<u64, Full> {
        if !self.has_room(channel, payload.len(), now) {
            // Remembered, so that channels that keep sending leave this one its share.
            self.wanting.insert(channel, now);
            return Err(Full { messages: self.messages, bytes: self.bytes });
        }
        self.wanting.remove(&channel);
        let ch = self.channels.entry(channel).or_default();
        ch.last_seq += 1;
        let seq = ch.last_seq;
        let due = now.max(ch.last_push);
        ch.last_push = due;
        ch.bytes += payload.len();
        self.messages += 1;
        self.bytes += payload.len();
        ch.unacked.push(seq, Unacked { payload, due: Some(due), sent_at: None, attempts: 0 });
        self.due.push(Reverse((due, channel, seq)));
        self.stats.pushed += 1;
        Ok(seq)
    }

    /// Whether [`Outbox::push`] would accept a message of `len` bytes on `channel` at `now`.
    ///
    /// Fair shares: while other channels were refused for lack of room within the last
    /// [`WANTING_FRESH_MS`] (their senders wait and retry on every acknowledgement), room that
    /// frees up goes to the waiting channel that holds the fewest unacknowledged messages, and a
    /// channel holds at most an equal share of the count and byte bounds: one busy sender cannot
    /// keep the whole outbox and starve the others. A channel holding nothing always may.
    pub fn has_room(&self, channel: u16, len: usize, now: u64) -> bool {
        let fits = self.messages < self.config.max_messages
            && (self.messages == 0 || self.bytes + len <= self.config.max_bytes)
            && self.channel_has_room(channel);
        if !fits {
            return false;
        }
        let held = |c: u16| self.channels.get(&c).map_or(0, |ch| ch.unacked.len());
        let mine = held(channel);
        let (mut others, mut least_other) = (0, usize::MAX);
        for (&c, &t) in &self.wanting {
            if c != channel && now.saturating_sub(t) <= WANTING_FRESH_MS {
                others += 1;
                least_other = least_other.min(held(c));
            }
        }
        if others == 0 || mine == 0 {
            return true;
        }
        // Room that frees up goes to the waiting channel holding least, then within equal shares.
        let share = others + 1;
        let my_bytes = self.channels.get(&channel).map_or(0, |ch| ch.bytes);
        mine <= least_other
            && mine < (self.config.max_messages / share).max(1)
            && my_bytes + len <= (self.config.max_bytes / share).max(1)
    }

    /// Whether one more message on `channel` keeps its unacknowledged span within
    /// [`OutboxConfig::max_per_channel`].
    fn channel_has_room(&self, channel: u16) -> bool {
        let Some(ch) = self.channels.get(&channel) else { return self.config.max_per_channel > 0 };
        let next = ch.last_seq + 1;
        let oldest = ch.unacked.first_seq().unwrap_or(next);
        next - oldest < self.config.max_per_channel
    }

    /// The next message due at `now`, if any, lowest due time first (then channel, then seq).
    pub fn poll_transmit(&mut self, now: u64) -> Option<Transmit> {
        let &Reverse(key @ (due, _, _)) = self.due.peek()?;
        if due > now {
            return None;
        }
        self.due.pop();
        let transmit = self.transmit(key, now);
        self.settle_due();
        transmit
    }

    /// Up to `max` messages due at `now`, in the order of [`Outbox::poll_transmit`], skipping
    /// channels `send_on` refuses (a transport that cannot take more on them now): they stay
    /// due, and are not sealed long before they can leave.
    pub fn poll_transmits(&mut self, now: u64, max: usize, send_on: impl Fn(u16) -> bool) -> Vec<Transmit> {
        let mut picked = Vec::with_capacity(max.min(self.due.len()));
        let mut skipped = Vec::new();
        while picked.len() < max {
            let Some(&Reverse(key @ (due, channel, _))) = self.due.peek() else { break };
            if due > now {
                break;
            }
            self.due.pop();
            if !is_scheduled(&self.channels, &key) {
                continue; // acknowledged since it was scheduled
            }
            if send_on(channel) { picked.push(key) } else { skipped.push(key) }
        }
        // Scheduled again only after the picking: a message due again at once (a zero
        // timeout) is not taken twice in one call.
        self.due.extend(skipped.into_iter().map(Reverse));
        let mut out = Vec::with_capacity(picked.len());
        out.extend(picked.into_iter().filter_map(|key| self.transmit(key, now)));
        self.settle_due();
        out
    }

    /// Returns the transmission of `key`, just taken off the schedule, and schedules its next
    /// attempt.
    fn transmit(&mut self, key: DueKey, now: u64) -> Option<Transmit> {
        let (_, channel, seq) = key;
        let rto = self.rto();
        let jitter = self.next_jitter(rto);
        let retransmit_on_timeout = self.config.retransmit_on_timeout;
        let max_rto = self.config.max_rto_ms;
        let p = self.channels.get_mut(&channel)?.unacked.get_mut(seq)?;
        let retransmission = p.attempts > 0;
        p.attempts += 1;
        p.sent_at = Some(now);
        // Exponential backoff: rto * 2^(attempts-1), capped, plus up to a quarter of jitter.
        let backoff = rto.saturating_mul(1u64 << (p.attempts - 1).min(20)).min(max_rto);
        p.due = retransmit_on_timeout.then(|| now.saturating_add(backoff).saturating_add(jitter));
        if let Some(d) = p.due {
            self.due.push(Reverse((d, channel, seq)));
        }
        let payload = p.payload.clone();
        if retransmission {
            self.stats.retransmitted += 1;
        } else {
            self.stats.transmitted += 1;
        }
        Some(Transmit { channel, seq, payload, retransmission })
    }

    /// Drops stale entries from the top of the schedule, and sweeps them all out once they
    /// could outnumber the live ones (each message with a due time has one live entry).
    fn settle_due(&mut self) {
        while let Some(Reverse(key)) = self.due.peek()
            && !is_scheduled(&self.channels, key)
        {
            self.due.pop();
        }
        if self.due.len() > 2 * self.messages + 64 {
            let channels = &self.channels;
            self.due.retain(|Reverse(key)| is_scheduled(channels, key));
        }
    }

    /// When the next message falls due.
    pub fn next_deadline(&self) -> Option<u64> {
        // The top is always current (`settle_due`).
        self.due.peek().map(|&Reverse((t, _, _))| t)
    }

    /// Makes every unacknowledged message due at `now` (after a reconnect), in channel and
    /// sequence order.
    pub fn retransmit_all(&mut self, now: u64) {
        let mut due = Vec::with_capacity(self.messages);
        for (&channel, ch) in &mut self.channels {
            for (seq, p) in ch.unacked.iter_mut() {
                p.due = Some(now);
                due.push(Reverse((now, channel, seq)));
            }
        }
        self.due = BinaryHeap::from(due);
    }

    /// Applies an acknowledgement from the peer.
    pub fn on_ack(&mut self, ack: &AckRanges, now: u64) -> Result<Acked, AckError> {
        let Some(ch) = self.channels.get_mut(&ack.channel) else {
            if ack.cumulative == 0 && ack.ranges.is_empty() {
                return Ok(Acked::default());
            }
            return Err(AckError::BeyondSent { channel: ack.channel, seq: ack.cumulative, sent: 0 });
        };
        validate_ranges(ack)?;
        let highest = ack.ranges.last().map_or(ack.cumulative, |r| r.1).max(ack.cumulative);
        if highest > ch.last_seq {
            return Err(AckError::BeyondSent { channel: ack.channel, seq: highest, sent: ch.last_seq });
        }
        let mut acked = Acked::default();
        let mut sample = None;
        let covers = |s: u64| s <= ack.cumulative || ack.ranges.iter().any(|&(a, b)| a <= s && s <= b);
        let stats = &mut self.stats;
        let (mut messages, mut bytes) = (0, 0);
        // The messages' schedule entries are left behind, stale (see `Outbox::due`).
        ch.unacked.remove_acked(highest, covers, |seq, p| {
            // Karn: only messages sent once give a round-trip sample.
            if p.attempts == 1
                && let Some(t) = p.sent_at
            {
                sample = Some(now.saturating_sub(t));
            }
            messages += 1;
            bytes += p.payload.len();
            stats.acked += 1;
            acked.newly.push((ack.channel, seq));
        });
        self.messages -= messages;
        self.bytes -= bytes;
        ch.bytes -= bytes;
        ch.cumulative = ch.cumulative.max(ack.cumulative);
        if let Some(s) = sample {
            self.rtt_sample(s);
        }
        if messages > 0 {
            self.settle_due();
        }
        Ok(acked)
    }

    /// Whether every message of `channel` up to and including `seq` was acknowledged.
    pub fn all_acked_through(&self, channel: u16, seq: u64) -> bool {
        match self.channels.get(&channel) {
            None => seq == 0,
            Some(c) => seq <= c.last_seq && c.unacked.first_seq().is_none_or(|first| first > seq),
        }
    }

    /// The last sequence number pushed on `channel` (0 if none).
    pub fn last_seq(&self, channel: u16) -> u64 {
        self.channels.get(&channel).map_or(0, |c| c.last_seq)
    }

    /// Channels used so far.
    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }

    /// Whether `seq` of `channel` was acknowledged.
    pub fn is_acked(&self, channel: u16, seq: u64) -> bool {
        self.channels.get(&channel).is_some_and(|c| seq <= c.last_seq && !c.unacked.contains(seq))
    }

    /// Unacknowledged messages and bytes.
    pub fn in_flight(&self) -> (usize, usize) {
        (self.messages, self.bytes)
    }

    /// Smoothed round-trip time, once measured (ms).
    pub fn srtt(&self) -> Option<u64> {
        self.rtt.srtt
    }

    /// Counters.
    pub fn stats(&self) -> OutboxStats {
        self.stats
    }

    fn rto(&self) -> u64 {
        match self.rtt.srtt {
            None => self.config.initial_rto_ms,
            Some(srtt) => srtt.saturating_add(4 * self.rtt.rttvar),
        }
        .clamp(self.config.min_rto_ms, self.config.max_rto_ms)
    }

    fn rtt_sample(&mut self, r: u64) {
        match self.rtt.srtt {
            None => {
                self.rtt.srtt = Some(r);
                self.rtt.rttvar = r / 2;
            }
            Some(srtt) => {
                self.rtt.rttvar = (3 * self.rtt.rttvar + srtt.abs_diff(r)) / 4;
                self.rtt.srtt = Some((7 * srtt + r) / 8);
            }
        }
    }

    fn next_jitter(&mut self, rto: u64) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % (rto / 4 + 1)
    }
}

fn validate_ranges(ack: &AckRanges) -> Result<(), AckError> {
    if ack.ranges.len() > MAX_ACK_RANGES {
        return Err(AckError::BadRanges(ack.channel));
    }
    let mut floor = ack.cumulative.saturating_add(1); // a range must start above cumulative + 1
    for &(a, b) in &ack.ranges {
        if a <= floor || b < a {
            return Err(AckError::BadRanges(ack.channel));
        }
        floor = b.saturating_add(1);
    }
    Ok(())
}

/// Receiver limits and ack batching.
#[derive(Debug, Clone)]
pub struct InboxConfig {
    /// How far ahead of the next expected sequence number a message may be and still be kept
    /// (and at most how many are kept per channel). Keep it at most the replay window.
    pub reorder_window: u64,
    /// Most payload bytes held out of order (behind a gap), all channels together. Messages in
    /// order are not counted here: they are always kept, and the shell bounds them by reading
    /// no more than its receive buffer allows (QUIC flow control holds the peer back).
    pub max_buffered_bytes: usize,
    /// Most channels.
    pub max_channels: usize,
    /// Longest an acknowledgement waits to be batched, ms.
    pub ack_delay_ms: u64,
    /// Send an acknowledgement at once after this many newly taken messages.
    pub ack_every: u64,
    /// Also acknowledge at once when the application has taken everything received on the
    /// channel (nothing is held): a sender waiting on its last messages hears back without the
    /// batching delay, while a busy stream, whose receiver always has more to take, still
    /// batches.
    pub ack_when_drained: bool,
    /// A channel exempt from `ack_when_drained`: its acknowledgement waits `ack_delay_ms`, or
    /// rides along with the next frames the shell writes anyway ([`Inbox::poll_ack_owed`]).
    /// For a channel whose receiver usually answers at once, as an RPC caller taking a
    /// response goes on to its next request: its acknowledgement then costs no packet of its
    /// own.
    pub lazy_ack_channel: Option<u16>,
    /// Acknowledge when [`Inbox::poll_deliver`] hands a message over (otherwise the application
    /// calls [`Inbox::ack`]).
    pub auto_ack: bool,
    /// Channels from this number up are the library's own (RPC): [`Inbox::poll_deliver`] skips
    /// them (they are taken with [`Inbox::poll_deliver_channel`]) and they do not count
    /// against `max_channels`.
    pub reserved_from: Option<u16>,
}

impl Default for InboxConfig {
    fn default() -> Self {
        InboxConfig {
            reorder_window: 1024,
            max_buffered_bytes: 16 << 20,
            max_channels: 64,
            ack_delay_ms: 5,
            ack_every: 32,
            ack_when_drained: false,
            lazy_ack_channel: None,
            auto_ack: true,
            reserved_from: None,
        }
    }
}

/// What became of a received message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// New; it will be delivered in order.
    Accepted,
    /// Seen before: dropped (an acknowledgement is scheduled so the sender stops resending).
    Duplicate,
    /// Too far ahead, or no room: dropped, the sender will resend it.
    Dropped,
}

/// Receiver counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InboxStats {
    /// New messages accepted.
    pub accepted: u64,
    /// Duplicates dropped.
    pub duplicates: u64,
    /// Messages dropped for lack of room or too far ahead.
    pub dropped: u64,
    /// Messages handed to the application.
    pub delivered: u64,
}

#[derive(Debug, Default)]
struct InChannel {
    /// Everything up to here was handed to the application.
    delivered: u64,
    /// Received in order, not yet delivered: `delivered + 1..=ready_to()`, oldest first, which
    /// the application can take. A deque, since messages nearly always arrive in order and
    /// leave from the front (an ordered map here was a large part of the cost per message).
    ready: VecDeque<Bytes>,
    /// Received behind a gap (every key above `ready_to() + 1`), waiting for the gap to fill.
    gapped: BTreeMap<u64, Bytes>,
    /// Their payload bytes.
    ready_bytes: usize,
    /// Taken by the application: all of 1..=cumulative, plus `above`.
    cumulative: u64,
    above: BTreeSet<u64>,
    /// Newly taken or duplicates seen since the last acknowledgement was sent.
    unreported: u64,
    dirty_since: Option<u64>,
}

/// The receiving half of the reliability core.
#[derive(Debug)]
pub struct Inbox {
    config: InboxConfig,
    channels: BTreeMap<u16, InChannel>,
    held_bytes: usize,
    /// The part of `held_bytes` in order (see `InChannel::ready_to`).
    ready_bytes: usize,
    /// The channel [`Inbox::poll_deliver`] served last (it goes round the channels).
    served_last: Option<u16>,
    stats: InboxStats,
}

impl InChannel {
    /// The last message of the run the application can take (`delivered` when there is none).
    fn ready_to(&self) -> u64 {
        self.delivered + self.ready.len() as u64
    }
}

/// When `ch`'s acknowledgement falls due, if it owes one: at once (from the first unreported
/// message) after `ack_every` newly taken messages or, with `ack_when_drained` (unless `channel`
/// is the lazy one), when nothing is left to take; `ack_delay_ms` after the first unreported
/// one otherwise. [`Inbox::poll_ack`] and the timer of [`Inbox::next_deadline`] both follow
/// it, so the timer never sleeps past an acknowledgement already due.
fn ack_due(config: &InboxConfig, channel: u16, ch: &InChannel) -> Option<u64> {
    let drained = config.ack_when_drained
        && config.lazy_ack_channel != Some(channel)
        && ch.ready.is_empty()
        && ch.gapped.is_empty();
    let at_once = ch.unreported >= config.ack_every || drained;
    ch.dirty_since.map(|t| if at_once { t } else { t.saturating_add(config.ack_delay_ms) })
}

impl Inbox {
    /// An empty inbox.
    pub fn new(config: InboxConfig) -> Inbox {
        Inbox {
            config,
            channels: BTreeMap::new(),
            held_bytes: 0,
            ready_bytes: 0,
            served_last: None,
            stats: InboxStats::default(),
        }
    }

    /// What [`Inbox::on_message`] would do with message `seq` of `channel`, `len` payload bytes,
    /// without changing anything. A shell that commits the sequence number elsewhere (a replay
    /// window) asks this first and commits only an `Accepted` message, so a message is never
    /// recorded as received and then dropped.
    pub fn check(&self, channel: u16, seq: u64, len: usize) -> Received {
        if seq == 0 {
            return Received::Duplicate;
        }
        let (delivered, ready_to) = match self.channels.get(&channel) {
            Some(ch) if seq <= ch.ready_to() || ch.gapped.contains_key(&seq) => return Received::Duplicate,
            Some(ch) => (ch.delivered, ch.ready_to()),
            None => {
                let user_channels = self.channels.keys().filter(|&&c| !self.is_reserved(c)).count();
                if !self.is_reserved(channel) && user_channels >= self.config.max_channels {
                    return Received::Dropped;
                }
                (0, 0)
            }
        };
        let too_far = seq - delivered > self.config.reorder_window;
        // Messages in order (they extend what the application can take) are always kept: the
        // shell bounds them by waiting for room before it reads. Messages behind a gap share
        // `max_buffered_bytes`, so they can never crowd out the one that fills the gap.
        let out_of_order = seq != ready_to + 1;
        let no_room = out_of_order && self.held_bytes - self.ready_bytes + len > self.config.max_buffered_bytes;
        if too_far || no_room { Received::Dropped } else { Received::Accepted }
    }

    /// Takes in a message from the transport.
    pub fn on_message(&mut self, channel: u16, seq: u64, payload: Bytes, now: u64) -> Received {
        match self.check(channel, seq, payload.len()) {
            Received::Accepted => {}
            Received::Dropped => {
                self.stats.dropped += 1;
                return Received::Dropped;
            }
            Received::Duplicate => {
                self.note_duplicate(channel, seq, now);
                return Received::Duplicate;
            }
        }
        let ch = self.channels.entry(channel).or_default();
        self.held_bytes += payload.len();
        if seq == ch.ready_to() + 1 {
            // The run the application can take grows, maybe across messages that were waiting.
            let mut next = Some(payload);
            while let Some(p) = next {
                ch.ready_bytes += p.len();
                self.ready_bytes += p.len();
                ch.ready.push_back(p);
                next = ch.gapped.remove(&(ch.ready_to() + 1));
            }
        } else {
            ch.gapped.insert(seq, payload);
        }
        self.stats.accepted += 1;
        Received::Accepted
    }

    /// Records a duplicate found before the inbox saw it (for example by a replay window): counts
    /// it, and re-acknowledges it if the application took it, so a sender that missed our
    /// acknowledgement stops resending.
    pub fn note_duplicate(&mut self, channel: u16, seq: u64, now: u64) {
        self.stats.duplicates += 1;
        if let Some(ch) = self.channels.get_mut(&channel)
            && seq != 0
            && (seq <= ch.cumulative || ch.above.contains(&seq))
        {
            ch.unreported += 1;
            ch.dirty_since.get_or_insert(now);
        }
    }

    /// The next message to hand to the application, in order per channel; channels take turns
    /// (round robin), so none starves while others are busy. In auto-ack mode it counts as
    /// taken.
    pub fn poll_deliver(&mut self, now: u64) -> Option<(u16, u64, Bytes)> {
        let reserved_from = self.config.reserved_from.unwrap_or(u16::MAX);
        let reserved = self.config.reserved_from.is_some();
        // Round robin: start after the channel served last, so a busy channel cannot starve the
        // others (channels in ascending order would always serve the lowest first).
        use std::ops::Bound::{Excluded, Included, Unbounded};
        let (after, upto) = match self.served_last {
            Some(c) => ((Excluded(c), Unbounded), (Unbounded, Included(c))),
            None => ((Unbounded, Unbounded), (Unbounded, Excluded(0))),
        };
        let channel = *self
            .channels
            .range(after)
            .chain(self.channels.range(upto))
            .find(|&(&c, ch)| !(ch.ready.is_empty() || reserved && c >= reserved_from))?
            .0;
        self.served_last = Some(channel);
        let (seq, payload) = self.take_next(channel)?;
        if self.config.auto_ack {
            self.ack(channel, seq, now);
        }
        Some((channel, seq, payload))
    }

    /// The next message of `channel` in order, if it is here; it counts as taken (acknowledged)
    /// at once, whatever the ack mode. For the library's own reserved channels.
    pub fn poll_deliver_channel(&mut self, channel: u16, now: u64) -> Option<(u64, Bytes)> {
        let (seq, payload) = self.take_next(channel)?;
        self.ack(channel, seq, now);
        Some((seq, payload))
    }

    fn is_reserved(&self, channel: u16) -> bool {
        self.config.reserved_from.is_some_and(|r| channel >= r)
    }

    fn take_next(&mut self, channel: u16) -> Option<(u64, Bytes)> {
        let ch = self.channels.get_mut(&channel)?;
        let payload = ch.ready.pop_front()?;
        let seq = ch.delivered + 1;
        ch.delivered = seq;
        self.held_bytes -= payload.len();
        self.ready_bytes -= payload.len();
        ch.ready_bytes -= payload.len();
        self.stats.delivered += 1;
        Some((seq, payload))
    }

    /// Records that the application took `seq` of `channel` (manual-ack mode; idempotent).
    /// Only delivered messages can be acknowledged.
    pub fn ack(&mut self, channel: u16, seq: u64, now: u64) -> bool {
        let Some(ch) = self.channels.get_mut(&channel) else { return false };
        if seq == 0 || seq > ch.delivered || seq <= ch.cumulative || ch.above.contains(&seq) {
            return false;
        }
        if seq == ch.cumulative + 1 {
            ch.cumulative = seq;
            while ch.above.first() == Some(&(ch.cumulative + 1)) {
                ch.above.pop_first();
                ch.cumulative += 1;
            }
        } else {
            ch.above.insert(seq);
        }
        ch.unreported += 1;
        ch.dirty_since.get_or_insert(now);
        true
    }

    /// An acknowledgement to send now, if one is due (after `ack_delay_ms`, at once after
    /// `ack_every` new ones, or at once when the channel is drained and `ack_when_drained`).
    /// Call until it returns `None`.
    pub fn poll_ack(&mut self, now: u64) -> Option<AckRanges> {
        self.take_ack(|due| due <= now)
    }

    /// An acknowledgement owed, due or not: for a shell about to write frames anyway, so that
    /// acknowledgements ride along instead of costing a packet of their own later. Call until
    /// it returns `None`.
    pub fn poll_ack_owed(&mut self) -> Option<AckRanges> {
        self.take_ack(|_| true)
    }

    /// The acknowledgement of the first channel that owes one and whose due time `take` accepts.
    fn take_ack(&mut self, take: impl Fn(u64) -> bool) -> Option<AckRanges> {
        let config = &self.config;
        let (&channel, ch) = self.channels.iter_mut().find(|(c, ch)| ack_due(config, **c, ch).is_some_and(&take))?;
        ch.unreported = 0;
        ch.dirty_since = None;
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for &s in &ch.above {
            if let Some(r) = ranges.last_mut()
                && r.1 + 1 == s
            {
                r.1 = s;
            } else if ranges.len() == MAX_ACK_RANGES {
                break;
            } else {
                ranges.push((s, s));
            }
        }
        Some(AckRanges { channel, cumulative: ch.cumulative, ranges })
    }

    /// When the next batched acknowledgement falls due (the rules of [`Inbox::poll_ack`]).
    pub fn next_deadline(&self) -> Option<u64> {
        self.channels.iter().filter_map(|(&n, c)| ack_due(&self.config, n, c)).min()
    }

    /// Payload bytes held (received, not yet delivered).
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Payload bytes the application can take now (held in order); the rest of
    /// [`Inbox::held_bytes`] waits behind a gap.
    pub fn ready_bytes(&self) -> usize {
        self.ready_bytes
    }

    /// The part of [`Inbox::ready_bytes`] on `channel`.
    pub fn ready_bytes_of(&self, channel: u16) -> usize {
        self.channels.get(&channel).map_or(0, |c| c.ready_bytes)
    }

    /// Counters.
    pub fn stats(&self) -> InboxStats {
        self.stats
    }
}

#[cfg(test)]
mod tests;
