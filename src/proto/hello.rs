//! The quicseal hello, decided: once the TLS handshake and the authorization policy accepted a
//! peer, whether its connection starts a new session, resumes one, or is refused, and with
//! which close code. Sans-IO: the node gathers what it knows (the peer's hello, the epochs it
//! retired, the sessions it can resume, the peer's open connections), asks here, then does the
//! I/O.
//!
//! The order of the acceptor's checks is part of the protocol: the per-peer connection limit
//! first (a resumption replaces a connection, so it is exempt), then retired epochs (an ended
//! session never comes back, resumed or not), then the session to resume.

use super::close_code;
use super::violation::Violation;
use super::wire::{Frame, MIN_MESSAGE_LIMIT};

/// What a peer's HELLO announced: its session epoch, and the limits a session with it keeps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerHello {
    /// Its session epoch (non-zero).
    pub epoch: u64,
    /// The largest payload it accepts (at least [`MIN_MESSAGE_LIMIT`]).
    pub max_message_size: usize,
    /// Application channels it accepts from us (at least 1).
    pub max_channels: u16,
    /// Its replay window: how far ahead of its last delivered message it accepts one, so the
    /// most unacknowledged messages we may have on one channel (at least 1).
    pub window: u64,
}

impl PeerHello {
    /// What every peer accepts, whatever its HELLO will say: the bounds of what a dialler may
    /// send before the acceptor's HELLO arrives (PROTOCOL.md section 2, "The early message"):
    /// one message of at most [`MIN_MESSAGE_LIMIT`] bytes, on one channel. Its epoch, 0, is
    /// none: nothing opens under it.
    pub const EARLY: PeerHello =
        PeerHello { epoch: 0, max_message_size: MIN_MESSAGE_LIMIT, max_channels: 1, window: 1 };

    /// Reads a decoded HELLO frame: what it announces and whether it asks to resume a session.
    /// A zero epoch, channel count or window, or a message limit below [`MIN_MESSAGE_LIMIT`],
    /// is [`Violation::BadHello`]; any other frame is [`Violation::ExpectedHello`].
    pub fn from_frame(frame: &Frame) -> Result<(PeerHello, bool), Violation> {
        match *frame {
            Frame::Hello { max_message_size, epoch, resume, max_channels, window } => {
                let max_message_size = max_message_size as usize;
                if epoch == 0 || max_channels == 0 || window == 0 || max_message_size < MIN_MESSAGE_LIMIT {
                    return Err(Violation::BadHello);
                }
                Ok((PeerHello { epoch, max_message_size, max_channels, window: u64::from(window) }, resume))
            }
            Frame::Message(_) => Err(Violation::ExpectedHello(super::wire::frame_type::MESSAGE)),
            Frame::Ack(_) => Err(Violation::ExpectedHello(super::wire::frame_type::ACK)),
        }
    }
}

/// Why a hello is refused; [`HelloRefusal::close_code`] is what the node closes the connection
/// with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HelloRefusal {
    /// The peer presented the epoch of a session that has ended.
    RetiredEpoch {
        /// The epoch.
        epoch: u64,
    },
    /// A dialler resuming a session was answered by another peer or another session.
    WrongSession,
    /// The peer asked to resume a session this node does not hold (ended, or never existed).
    UnknownSession {
        /// The epoch it asked for.
        epoch: u64,
    },
    /// The peer already holds as many connections as it may.
    PeerLimit {
        /// The limit.
        limit: usize,
    },
}

impl HelloRefusal {
    /// The protocol violation a refusal stands for; `None` for the peer limit, which is not
    /// one (a later attempt may succeed).
    pub fn violation(&self) -> Option<Violation> {
        match *self {
            HelloRefusal::RetiredEpoch { epoch } => Some(Violation::RetiredEpoch(Some(epoch))),
            HelloRefusal::WrongSession => Some(Violation::WrongSession),
            HelloRefusal::UnknownSession { epoch } => Some(Violation::UnknownSession(Some(epoch))),
            HelloRefusal::PeerLimit { .. } => None,
        }
    }

    /// The QUIC application close code sent with the refusal (see PROTOCOL.md).
    pub fn close_code(&self) -> u32 {
        self.violation().map_or(close_code::PEER_LIMIT, |v| v.close_code())
    }

    /// The close reason sent with the code: a few words, nothing the peer does not know.
    pub fn close_reason(&self) -> &'static [u8] {
        self.violation().map_or(b"peer limit", |v| v.close_reason())
    }
}

/// The dialler's check of the acceptor's answer. `resuming`: the peer (its names digest) and
/// the peer epoch of the session being resumed, if any; `peer` and `peer_epoch`: who answered
/// and with which epoch; `retired`: whether that epoch is one this node retired.
pub fn check_answer<N: PartialEq>(
    resuming: Option<(&N, u64)>,
    peer: &N,
    peer_epoch: u64,
    retired: bool,
) -> Result<(), HelloRefusal> {
    match resuming {
        Some((expected, epoch)) if expected != peer || epoch != peer_epoch => Err(HelloRefusal::WrongSession),
        Some(_) => Ok(()),
        None if retired => Err(HelloRefusal::RetiredEpoch { epoch: peer_epoch }),
        None => Ok(()),
    }
}

/// The acceptor's first check, before the connection counts as one of the peer's: a peer at
/// its limit of open connections may only resume (which replaces one).
pub fn check_peer_limit(wants_resume: bool, open: usize, limit: usize) -> Result<(), HelloRefusal> {
    if !wants_resume && open >= limit { Err(HelloRefusal::PeerLimit { limit }) } else { Ok(()) }
}

/// What an accepted hello starts.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission<S> {
    /// A new session.
    New,
    /// The resumption of this session.
    Resume(S),
}

/// The acceptor's decision once the peer limit passed: `retired` says whether the peer's epoch
/// is retired, `found` is the session the peer asks to resume, when this node holds it.
pub fn admit<S>(
    wants_resume: bool,
    peer_epoch: u64,
    retired: bool,
    found: Option<S>,
) -> Result<Admission<S>, HelloRefusal> {
    if retired {
        return Err(HelloRefusal::RetiredEpoch { epoch: peer_epoch });
    }
    match (wants_resume, found) {
        (false, _) => Ok(Admission::New),
        (true, Some(session)) => Ok(Admission::Resume(session)),
        (true, None) => Err(HelloRefusal::UnknownSession { epoch: peer_epoch }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hello_announces_at_least_the_early_bounds() {
        let hello = |max_message_size, epoch, max_channels, window| Frame::Hello {
            max_message_size,
            epoch,
            resume: true,
            max_channels,
            window,
        };
        let fine = PeerHello { epoch: 9, max_message_size: 1024, max_channels: 1, window: 1 };
        assert_eq!(PeerHello::from_frame(&hello(1024, 9, 1, 1)), Ok((fine, true)));
        for bad in
            [hello(1023, 9, 1, 1), hello(0, 9, 1, 1), hello(1024, 0, 1, 1), hello(1024, 9, 0, 1), hello(1024, 9, 1, 0)]
        {
            assert_eq!(PeerHello::from_frame(&bad), Err(Violation::BadHello), "{bad:?}");
        }
        // Every valid HELLO allows at least what an early message may use.
        let early = PeerHello::EARLY;
        assert!(fine.max_message_size >= early.max_message_size);
        assert!(fine.max_channels >= early.max_channels && fine.window >= early.window);
    }

    #[test]
    fn a_dialler_accepts_only_the_session_it_resumes_and_never_a_retired_epoch() {
        assert_eq!(check_answer(None, &"b", 7, false), Ok(()));
        assert_eq!(check_answer(None, &"b", 7, true), Err(HelloRefusal::RetiredEpoch { epoch: 7 }));
        assert_eq!(check_answer(Some((&"b", 7)), &"b", 7, false), Ok(()));
        // A resumption is checked against what it resumes; retirement does not apply (the
        // session is alive on our side).
        assert_eq!(check_answer(Some((&"b", 7)), &"b", 7, true), Ok(()));
        assert_eq!(check_answer(Some((&"b", 7)), &"c", 7, false), Err(HelloRefusal::WrongSession));
        assert_eq!(check_answer(Some((&"b", 7)), &"b", 8, false), Err(HelloRefusal::WrongSession));
    }

    #[test]
    fn an_acceptor_limits_new_connections_per_peer_but_not_resumptions() {
        assert_eq!(check_peer_limit(false, 15, 16), Ok(()));
        assert_eq!(check_peer_limit(false, 16, 16), Err(HelloRefusal::PeerLimit { limit: 16 }));
        assert_eq!(check_peer_limit(true, 16, 16), Ok(()), "a resumption replaces a connection");
    }

    #[test]
    fn an_acceptor_refuses_retired_epochs_and_unknown_sessions() {
        assert_eq!(admit::<()>(false, 3, false, None), Ok(Admission::New));
        assert_eq!(admit(true, 3, false, Some("s")), Ok(Admission::Resume("s")));
        assert_eq!(admit::<()>(true, 3, false, None), Err(HelloRefusal::UnknownSession { epoch: 3 }));
        // Retired wins over everything: an ended session never comes back.
        assert_eq!(admit(true, 3, true, Some("s")), Err(HelloRefusal::RetiredEpoch { epoch: 3 }));
        assert_eq!(admit::<()>(false, 3, true, None), Err(HelloRefusal::RetiredEpoch { epoch: 3 }));
    }

    #[test]
    fn every_refusal_has_its_close_code() {
        let codes = [
            (HelloRefusal::RetiredEpoch { epoch: 1 }, close_code::RETIRED_EPOCH, &b"retired epoch"[..]),
            (HelloRefusal::WrongSession, close_code::PROTOCOL_VIOLATION, b"protocol violation"),
            (HelloRefusal::UnknownSession { epoch: 1 }, close_code::UNKNOWN_SESSION, b"unknown session"),
            (HelloRefusal::PeerLimit { limit: 1 }, close_code::PEER_LIMIT, b"peer limit"),
        ];
        for (refusal, code, reason) in codes {
            assert_eq!((refusal.close_code(), refusal.close_reason()), (code, reason), "{refusal:?}");
        }
    }
}
