//! The sans-IO core: pure functions and state machines that take bytes and return bytes and
//! decisions. No tokio, no sockets, no clock, no global RNG in here: the async shell
//! ([`Node`](crate::Node), [`Session`](crate::Session)) only moves bytes.
//!
//! Public for those who build their own shell (another runtime, another QUIC stack, a
//! simulator): [`session::SessionCore`] is the whole session protocol once a connection is up,
//! [`hello`] decides what a HELLO starts (new session, resumption, refusal), [`seal`] derives
//! the message keys from the TLS exporter. `PROTOCOL.md` is the specification they implement.
//! This is a lower-level interface than [`Node`](crate::Node): it follows the protocol's
//! versions, not the stability of the rest of the API.

pub mod durable;
pub mod epochs;
pub mod hello;
pub mod reliable;
pub mod replay;
pub mod rpc;
pub mod seal;
pub mod session;
#[cfg(test)]
pub(crate) mod test_rng;
pub mod violation;
pub mod wire;

/// A map keyed by channel number (or by a channel's kind and number), looked up several times
/// per message: hashed with FxHash rather than the standard library's SipHash, which was 6% of
/// the instructions of a stream of small messages. The keys are small integers and every such
/// map is bounded by the session's limits (`max_channels`, the number of replay windows), so
/// the hash needs no resistance to chosen keys: a peer that picks colliding channel numbers
/// lengthens a lookup by at most the number of channels it may open.
pub(crate) type ChannelMap<K, V> = rustc_hash::FxHashMap<K, V>;

/// A set of channel numbers; see [`ChannelMap`].
pub(crate) type ChannelSet<K> = rustc_hash::FxHashSet<K>;

/// Application close codes quicseal sends in QUIC `CONNECTION_CLOSE` frames.
///
/// They are part of the wire protocol (see PROTOCOL.md).
pub mod close_code {
    /// Normal close.
    pub const NO_ERROR: u32 = 0x0;
    /// The authorization policy refused the peer.
    pub const UNAUTHORIZED: u32 = 0x1;
    /// The peer broke the framing or stream rules.
    pub const PROTOCOL_VIOLATION: u32 = 0x2;
    /// The peer sent a message larger than the announced limit.
    pub const MESSAGE_TOO_LARGE: u32 = 0x3;
    /// The negotiated ALPN protocol is not `quicseal/1`.
    pub const ALPN_MISMATCH: u32 = 0x4;
    /// The peer did not complete the quicseal hello in time.
    pub const HELLO_TIMEOUT: u32 = 0x5;
    /// Too many messages failed their integrity check.
    pub const INTEGRITY_FAILURE: u32 = 0x6;
    /// The peer presented a session epoch that was retired.
    pub const RETIRED_EPOCH: u32 = 0x7;
    /// This connection is closed, the session carries on over a new one.
    pub const RECONNECT: u32 = 0x8;
    /// A resuming peer asked for a session this node does not have.
    pub const UNKNOWN_SESSION: u32 = 0x9;
    /// The peer already has as many connections with this node as it may
    /// (`Limits::max_connections_per_peer`); a later attempt may succeed.
    pub const PEER_LIMIT: u32 = 0xA;
}
