//! Node configuration: identity, trust, policy and resource limits with safe defaults.

use std::sync::Arc;
use std::time::Duration;

use quinn::{IdleTimeout, TransportConfig, VarInt};

use crate::error::{Error, Result};
use crate::identity::{Identity, TrustStore};
use crate::policy::Policy;

/// Resource limits. Every one has a safe, documented default and can be changed:
///
/// ```
/// let mut limits = quicseal::Limits::default();
/// limits.max_message_size = 64 * 1024;
/// ```
///
/// | limit | default | what it bounds |
/// |---|---|---|
/// | `max_message_size` | 1 MiB | one message's payload, both ways (1 KiB to 64 MiB); larger is refused at send and closes a peer that sends one |
/// | `max_connections` | 1,024 | open incoming connections of a node (beyond it they are refused); dials count separately |
/// | `max_handshakes` | 256 | incoming handshakes in progress (beyond it they are refused) |
/// | `max_handshakes_per_address` | 64 | incoming handshakes in progress from one IP address |
/// | `max_connections_per_peer` | 16 | incoming connections one peer identity may have open |
/// | `node_receive_buffer` | 256 MiB | received messages not yet taken, over all sessions |
/// | `retry_above` | 32 | handshakes in progress beyond which an unvalidated address gets a QUIC Retry first |
/// | `max_channels` | 64 | channels (QUIC streams) each side may open per session |
/// | `idle_timeout` | 30 s | a connection with no traffic is closed after this |
/// | `keep_alive` | 10 s | pings keep an idle but wanted connection open |
/// | `handshake_timeout` | 10 s | TLS handshake plus quicseal hello |
/// | `stream_receive_window` | 8 MiB | unread bytes a peer may send on one channel (half the connection's window) |
/// | `connection_receive_window` | 16 MiB | unread bytes a peer may send on one connection (quinn's default is unlimited) |
/// | `send_window` | 16 MiB | unacknowledged bytes we keep in flight per connection |
/// | `receive_buffer` | 8 MiB | received messages not yet taken by the application, per session |
/// | `accept_queue` | 64 | authenticated sessions waiting for [`Node::accept`](crate::Node::accept) |
/// | `replay_window` | 2,048 | width in bits of each anti-replay window (a multiple of 64, at most 65,536) |
/// | `freshness` | 2 min | messages sent longer ago are refused as stale |
/// | `max_clock_skew` | 30 s | messages stamped further in the future are refused |
/// | `max_tag_failures` | 8 | messages failing their integrity check before the connection is closed |
/// | `datagram_receive_buffer` | 1 MiB | datagrams quinn buffers before we read them (0 turns datagrams off) |
/// | `udp_socket_buffer` | 4 MiB | the node's UDP socket's kernel receive and send buffers (0 keeps the system's default) |
/// | `retired_epochs` | 4,096 peers × 16 | retired session epochs remembered per node |
/// | `outbox_messages` | 1,024 | channel messages sent and not yet acknowledged, per session (at most `replay_window`) |
/// | `outbox_bytes` | 16 MiB | their payload bytes (one larger message may still pass alone) |
/// | `reconnect_backoff` | 50 ms to 2 s | wait between reconnection attempts, doubling |
/// | `resume_timeout` | 30 s | how long a session may stay disconnected before giving up (both sides) |
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Limits {
    /// Largest message payload in bytes, from 1,024 (every peer accepts that much: a dialler's
    /// first message may be sent before the peer's limits are known) to 64 MiB.
    pub max_message_size: usize,
    /// Most open incoming connections per node (dials have their own count of the same size:
    /// incoming connections never block a node's own dials).
    pub max_connections: usize,
    /// Most incoming handshakes in progress per node (TLS handshake plus hello); beyond it new
    /// ones are refused. Kept well below `max_connections`: a handshake in progress costs
    /// memory and CPU before the peer proved anything.
    pub max_handshakes: usize,
    /// Most incoming handshakes in progress from one IP address.
    pub max_handshakes_per_address: usize,
    /// Most incoming connections one peer (one certificate identity) may have open with this
    /// node; beyond, new ones are closed with `PEER_LIMIT`.
    pub max_connections_per_peer: usize,
    /// Most bytes received and not yet taken by the application, over all the node's sessions
    /// (each session also has `receive_buffer`); beyond, QUIC flow control holds peers back.
    pub node_receive_buffer: usize,
    /// Incoming handshakes in progress beyond which a peer whose address is not yet validated
    /// gets a QUIC Retry first (RFC 9000 section 8.1): it must echo a token, which proves it
    /// receives at its address, before it costs us any state.
    pub retry_above: usize,
    /// Most channels each side may open per session.
    pub max_channels: u16,
    /// Idle timeout.
    pub idle_timeout: Duration,
    /// Keep-alive interval (`None`: no keep-alive).
    pub keep_alive: Option<Duration>,
    /// Deadline for the TLS handshake plus the quicseal hello.
    pub handshake_timeout: Duration,
    /// Per-stream flow-control window: how far a channel's sender may run ahead of our reader.
    /// The reader opens each message (AES-GCM) before it reads the next, so a window of a few
    /// messages keeps a bulk sender busy meanwhile (`BENCHMARKS.md`, "Stream window"); the
    /// connection's window still bounds what all channels together may hold.
    pub stream_receive_window: u32,
    /// Per-connection flow-control window.
    pub connection_receive_window: u32,
    /// Per-connection send window.
    pub send_window: u64,
    /// Bytes of received messages buffered for the application per session.
    pub receive_buffer: usize,
    /// Sessions waiting in [`Node::accept`](crate::Node::accept)'s queue.
    pub accept_queue: usize,
    /// Anti-replay window width in bits.
    pub replay_window: u64,
    /// Freshness horizon: older messages are refused.
    pub freshness: Duration,
    /// Largest accepted difference between a message's send time and our clock, forward.
    pub max_clock_skew: Duration,
    /// Integrity failures tolerated per connection before it is closed.
    pub max_tag_failures: u32,
    /// Datagram receive buffer (0: datagrams off).
    pub datagram_receive_buffer: usize,
    /// Kernel receive and send buffer of the node's UDP socket, bytes (0: the system's default,
    /// often 208 KiB). Every session of a node shares this one socket: a burst of handshakes or
    /// a busy node overflows a small buffer, and the kernel drops what does not fit (each loss
    /// then costs a retransmission timeout, a second or more during a handshake). The kernel
    /// caps it at `net.core.rmem_max` and `net.core.wmem_max` (it logs at debug level when it
    /// gave less); memory is used only by datagrams actually queued.
    pub udp_socket_buffer: usize,
    /// Peers whose retired epochs are remembered (16 epochs each).
    pub retired_epochs: usize,
    /// Unacknowledged channel messages per session.
    pub outbox_messages: usize,
    /// Unacknowledged payload bytes per session.
    pub outbox_bytes: usize,
    /// Shortest and longest wait between reconnection attempts.
    pub reconnect_backoff: (Duration, Duration),
    /// How long a disconnected session waits to be resumed before it gives up.
    pub resume_timeout: Duration,
    /// Messages and bytes one message key may seal (see `proto::seal::KeyLimits`). Not a
    /// setting: the defaults are the AES-GCM limits; tests lower them to exercise key changes.
    #[doc(hidden)]
    pub test_key_limits: (u64, u64),
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: 1 << 20,
            max_connections: 1024,
            max_handshakes: 256,
            max_handshakes_per_address: 64,
            max_connections_per_peer: 16,
            node_receive_buffer: 256 << 20,
            retry_above: 32,
            max_channels: 64,
            idle_timeout: Duration::from_secs(30),
            keep_alive: Some(Duration::from_secs(10)),
            handshake_timeout: Duration::from_secs(10),
            stream_receive_window: 8 << 20,
            connection_receive_window: 16 << 20,
            send_window: 16 << 20,
            receive_buffer: 8 << 20,
            accept_queue: 64,
            replay_window: crate::proto::replay::DEFAULT_WIDTH,
            freshness: Duration::from_secs(120),
            max_clock_skew: Duration::from_secs(30),
            max_tag_failures: 8,
            datagram_receive_buffer: 1 << 20,
            udp_socket_buffer: 4 << 20,
            retired_epochs: 4096,
            outbox_messages: 1024,
            outbox_bytes: 16 << 20,
            reconnect_backoff: (Duration::from_millis(50), Duration::from_secs(2)),
            resume_timeout: Duration::from_secs(30),
            test_key_limits: (crate::proto::seal::AEAD_MAX_MESSAGES, crate::proto::seal::AEAD_MAX_BYTES),
        }
    }
}

impl Limits {
    /// Checks that the limits make sense together.
    pub fn validate(&self) -> Result<()> {
        let bad = |s: String| Err(Error::Config(s));
        use crate::proto::wire::{MAX_MESSAGE_SIZE, MIN_MESSAGE_LIMIT};
        if !(MIN_MESSAGE_LIMIT..=MAX_MESSAGE_SIZE).contains(&self.max_message_size) {
            return bad(format!("max_message_size must be between {MIN_MESSAGE_LIMIT} and {MAX_MESSAGE_SIZE} bytes"));
        }
        if self.receive_buffer < self.max_message_size {
            return bad("receive_buffer must hold at least one message of max_message_size".into());
        }
        if self.max_connections == 0 || self.max_channels == 0 || self.accept_queue == 0 {
            return bad("max_connections, max_channels and accept_queue must be at least 1".into());
        }
        if self.max_handshakes == 0 || self.max_handshakes_per_address == 0 || self.max_connections_per_peer == 0 {
            return bad(
                "max_handshakes, max_handshakes_per_address and max_connections_per_peer must be at least 1".into()
            );
        }
        if self.node_receive_buffer < self.receive_buffer {
            return bad("node_receive_buffer must be at least receive_buffer".into());
        }
        if self.stream_receive_window == 0 || self.connection_receive_window == 0 || self.send_window == 0 {
            return bad("flow-control windows must be positive".into());
        }
        if IdleTimeout::try_from(self.idle_timeout).is_err() || self.idle_timeout.is_zero() {
            return bad("idle_timeout must be positive and below 2^62 ms".into());
        }
        if self.keep_alive.is_some_and(|k| k.is_zero() || k >= self.idle_timeout) {
            return bad("keep_alive must be positive and shorter than idle_timeout".into());
        }
        if self.handshake_timeout.is_zero() {
            return bad("handshake_timeout must be positive".into());
        }
        if !crate::proto::replay::ReplayWindow::valid_width(self.replay_window) {
            return bad("replay_window must be a multiple of 64 between 64 and 65536".into());
        }
        if self.test_key_limits.0 < 2 || self.test_key_limits.1 < 2 {
            return bad("key limits must be at least 2".into());
        }
        if self.freshness.is_zero() {
            return bad("freshness must be positive".into());
        }
        if self.max_tag_failures == 0 {
            return bad("max_tag_failures must be at least 1".into());
        }
        if self.outbox_messages == 0 || self.outbox_bytes == 0 {
            return bad("outbox_messages and outbox_bytes must be positive".into());
        }
        if self.reconnect_backoff.0.is_zero() || self.reconnect_backoff.0 > self.reconnect_backoff.1 {
            return bad("reconnect_backoff must be (min, max) with 0 < min <= max".into());
        }
        // A retransmitted message must still be inside the receiver's replay window.
        if self.outbox_messages as u64 > self.replay_window {
            return bad("outbox_messages must not exceed replay_window".into());
        }
        Ok(())
    }

    /// The quinn transport configuration a node uses with these limits, every setting
    /// explicit. Public so that comparisons (the `compare` benchmark's raw quinn baseline) run
    /// with exactly the same transport.
    pub fn quinn_transport(&self) -> TransportConfig {
        self.transport()
    }

    /// The quinn transport configuration, with every limit set explicitly.
    pub(crate) fn transport(&self) -> TransportConfig {
        let mut t = TransportConfig::default();
        // One control stream, the channels, and the two RPC channels.
        t.max_concurrent_bidi_streams(VarInt::from_u32(u32::from(self.max_channels) + 3));
        t.max_concurrent_uni_streams(VarInt::from_u32(0));
        t.max_idle_timeout(Some(IdleTimeout::try_from(self.idle_timeout).expect("validated")));
        t.keep_alive_interval(self.keep_alive);
        t.stream_receive_window(VarInt::from_u32(self.stream_receive_window));
        t.receive_window(VarInt::from_u32(self.connection_receive_window));
        t.send_window(self.send_window);
        // Datagrams: buffered up to the limit on receipt (0 turns them off); one buffer's worth
        // may wait to be sent.
        t.datagram_receive_buffer_size((self.datagram_receive_buffer > 0).then_some(self.datagram_receive_buffer));
        t.datagram_send_buffer_size(self.datagram_receive_buffer.max(64 * 1024));
        t.crypto_buffer_size(16 * 1024);
        t.allow_spin(false);
        t
    }
}

/// Everything a [`Node`](crate::Node) needs: who it is, whom it trusts, whom it allows, and limits.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub(crate) identity: Identity,
    pub(crate) trust: TrustStore,
    pub(crate) policy: Policy,
    pub(crate) limits: Limits,
    pub(crate) manual_ack: bool,
    pub(crate) rpc: Option<crate::rpc::Router>,
    pub(crate) store: Option<StoreChoice>,
}

/// Where a node keeps its durable store.
#[derive(Debug, Clone)]
pub(crate) enum StoreChoice {
    /// The redb store in this directory, opened by `Node::bind`.
    Dir(std::path::PathBuf, crate::store::StoreLimits),
    /// A store the application made.
    Backend(std::sync::Arc<dyn crate::store::DurableStore>),
}

impl NodeConfig {
    /// A configuration with the default [`Policy`] (any peer the trust store accepts) and
    /// default [`Limits`].
    pub fn new(identity: Identity, trust: TrustStore) -> NodeConfig {
        NodeConfig {
            identity,
            trust,
            policy: Policy::any_authenticated(),
            limits: Limits::default(),
            manual_ack: false,
            rpc: None,
            store: None,
        }
    }

    /// Keeps a durable store in directory `dir` (created if missing; one node per directory),
    /// which enables durable channels ([`Session::send_durable_bytes`](crate::Session::send_durable_bytes),
    /// [`Node::recv_durable`](crate::Node::recv_durable)) and keys the node's stateless resets
    /// by the store's secret. [`Node::bind`](crate::Node::bind) opens it, and fails with
    /// [`Error::Store`](crate::Error::Store) if it cannot.
    pub fn store(self, dir: impl Into<std::path::PathBuf>) -> NodeConfig {
        self.store_with_limits(dir, crate::store::StoreLimits::default())
    }

    /// Like [`NodeConfig::store`], with limits of its own.
    pub fn store_with_limits(
        mut self,
        dir: impl Into<std::path::PathBuf>,
        limits: crate::store::StoreLimits,
    ) -> NodeConfig {
        self.store = Some(StoreChoice::Dir(dir.into(), limits));
        self
    }

    /// Keeps durable messages in `backend` rather than in a store directory: a
    /// [`MemoryStore`](crate::store::MemoryStore), a [`Store`](crate::store::Store) opened by
    /// the application, or a backend of its own (see
    /// [`DurableStore`](crate::store::DurableStore) for the contract it must keep). The node
    /// keys its stateless resets by the backend's secret.
    pub fn store_backend(mut self, backend: std::sync::Arc<dyn crate::store::DurableStore>) -> NodeConfig {
        self.store = Some(StoreChoice::Backend(backend));
        self
    }

    /// Serves RPC calls with these handlers, on every session of the node (accepted and
    /// dialled). Without a router, every call to this node is answered with
    /// [`RemoteError::UnknownMethod`](crate::RemoteError::UnknownMethod).
    pub fn rpc(mut self, router: crate::rpc::Router) -> NodeConfig {
        self.rpc = Some(router);
        self
    }

    /// Sets the authorization policy.
    pub fn policy(mut self, policy: Policy) -> NodeConfig {
        self.policy = policy;
        self
    }

    /// Manual-ack mode: a received channel message is acknowledged to its sender only when the
    /// application calls [`Session::ack`](crate::Session::ack), not when
    /// [`Session::recv`](crate::Session::recv) returns it. Unacknowledged messages are resent.
    pub fn manual_ack(mut self, on: bool) -> NodeConfig {
        self.manual_ack = on;
        self
    }

    /// Sets the limits.
    pub fn limits(mut self, limits: Limits) -> NodeConfig {
        self.limits = limits;
        self
    }

    pub(crate) fn transport(&self) -> Arc<TransportConfig> {
        Arc::new(self.limits.transport())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_refused() {
        Limits::default().validate().unwrap();
        let mut l = Limits::default();
        l.receive_buffer = l.max_message_size - 1;
        assert!(matches!(l.validate(), Err(Error::Config(_))));
        let mut l = Limits::default();
        l.keep_alive = Some(l.idle_timeout);
        assert!(l.validate().is_err());
        assert!(Limits { max_message_size: 0, ..Limits::default() }.validate().is_err());
        assert!(Limits { max_message_size: 1023, ..Limits::default() }.validate().is_err());
        Limits { max_message_size: 1024, ..Limits::default() }.validate().unwrap();
        assert!(
            Limits { max_message_size: 65 << 20, receive_buffer: 128 << 20, ..Limits::default() }.validate().is_err()
        );
        assert!(Limits { max_channels: 0, ..Limits::default() }.validate().is_err());
        assert!(Limits { idle_timeout: std::time::Duration::ZERO, ..Limits::default() }.validate().is_err());
        assert!(Limits { handshake_timeout: std::time::Duration::ZERO, ..Limits::default() }.validate().is_err());
        assert!(Limits { replay_window: 100, ..Limits::default() }.validate().is_err());
        assert!(Limits { freshness: std::time::Duration::ZERO, ..Limits::default() }.validate().is_err());
        assert!(Limits { max_tag_failures: 0, ..Limits::default() }.validate().is_err());
        assert!(Limits { outbox_messages: 4096, ..Limits::default() }.validate().is_err());
    }
}
