//! [`Violation`]: what a peer did that breaks the protocol, with the close code it earns.

use super::close_code;
use super::reliable::AckError;
use super::wire::WireError;

/// A break of the quicseal protocol. Found by us ([`Side::Local`](crate::Side::Local) in
/// [`Error::ProtocolViolation`](crate::Error::ProtocolViolation)): the peer sent it, and we closed
/// the connection with [`Violation::close_code`]. Reported by the peer
/// ([`Side::Remote`](crate::Side::Remote)): the peer closed the connection with a close code,
/// which is all it tells us; the variant is the one that code stands for, or
/// [`Violation::Reported`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Violation {
    /// Bytes that are not a valid frame or stream header (or a message over the size limit).
    #[error("{0}")]
    Malformed(WireError),
    /// The peer opened a second control stream.
    #[error("second control stream")]
    SecondControlStream,
    /// The peer opened the stream of a channel twice on one connection.
    #[error("channel {0} opened twice")]
    ChannelOpenedTwice(u16),
    /// A frame other than MESSAGE on a channel stream.
    #[error("frame type {0:#04x} on an inbound channel")]
    FrameOnChannel(u8),
    /// A frame other than ACK on the control stream after the hello.
    #[error("frame type {0:#04x} on the control stream after the hello")]
    FrameOnControl(u8),
    /// A channel stream carried a datagram or another channel's message.
    #[error("channel {0} stream carries a datagram or another channel's message")]
    ForeignMessage(u16),
    /// Too many messages failed their integrity check on one connection (how many, when we
    /// counted them; a peer that closes for it does not say).
    #[error("{} failed their integrity check", .0.map_or("too many messages".into(), |n| format!("{n} messages")))]
    IntegrityFailures(Option<u32>),
    /// An acknowledgement that cannot be right.
    #[error("{0}")]
    Ack(AckError),
    /// An RPC frame that does not decode.
    #[error("RPC: {0}")]
    Rpc(String),
    /// A DURABLE frame that does not decode, or one sent to a node that keeps no store.
    #[error("durable: {0}")]
    Durable(String),
    /// The peer's first stream is not the control stream.
    #[error("the first stream is not the control stream")]
    NotControlStream,
    /// The peer's certificate, accepted by the TLS verifier, does not parse as an identity.
    #[error("unreadable peer certificate: {0}")]
    UnreadableCertificate(String),
    /// The control stream began with another frame than HELLO.
    #[error("expected HELLO, got frame type {0:#04x}")]
    ExpectedHello(u8),
    /// A HELLO with a zero epoch, max_channels or window, or a max_message_size below 1,024
    /// ([`MIN_MESSAGE_LIMIT`](super::wire::MIN_MESSAGE_LIMIT)).
    #[error("HELLO with a zero epoch, max_channels or window, or a max_message_size below 1024")]
    BadHello,
    /// The control stream ended or broke during the hello.
    #[error("control stream: {0}")]
    ControlStream(String),
    /// The hello did not finish in time.
    #[error("the hello did not finish in time")]
    HelloTimeout,
    /// A session epoch that was retired (its session ended) was presented again: the epoch, when
    /// we refused it.
    #[error("session epoch {} was retired", .0.map_or("(ours)".into(), |e| format!("{e:#x}")))]
    RetiredEpoch(Option<u64>),
    /// A dialler resuming a session was answered by another peer or another session.
    #[error("a different peer or session answered the resumption")]
    WrongSession,
    /// A resumption of a session that does not exist (ended, or never was): its epoch, when we
    /// refused it.
    #[error("no session {} to resume", .0.map_or("(ours)".into(), |e| format!("{e:#x}")))]
    UnknownSession(Option<u64>),
    /// A QUIC transport error (quinn found it, or the peer closed with it).
    #[error("QUIC transport: {0}")]
    Transport(String),
    /// The peer closed the connection with a violation's close code and this reason.
    #[error("{reason} (close code {code:#x})")]
    Reported {
        /// The close code.
        code: u32,
        /// The peer's close reason, or what the code means.
        reason: String,
    },
}

impl Violation {
    /// The QUIC application close code this violation closes the connection with.
    pub fn close_code(&self) -> u32 {
        match self {
            Violation::Malformed(WireError::TooLarge { .. }) => close_code::MESSAGE_TOO_LARGE,
            Violation::IntegrityFailures(_) => close_code::INTEGRITY_FAILURE,
            Violation::HelloTimeout => close_code::HELLO_TIMEOUT,
            Violation::RetiredEpoch(_) => close_code::RETIRED_EPOCH,
            Violation::UnknownSession(_) => close_code::UNKNOWN_SESSION,
            Violation::Reported { code, .. } => *code,
            _ => close_code::PROTOCOL_VIOLATION,
        }
    }

    /// The reason sent with the close: a few fixed words (details stay in our logs).
    pub fn close_reason(&self) -> &'static [u8] {
        match self.close_code() {
            close_code::MESSAGE_TOO_LARGE => b"message too large",
            close_code::INTEGRITY_FAILURE => b"integrity failure",
            close_code::HELLO_TIMEOUT => b"hello timeout",
            close_code::RETIRED_EPOCH => b"retired epoch",
            close_code::UNKNOWN_SESSION => b"unknown session",
            _ => b"protocol violation",
        }
    }
}
