//! Durable channels' frames and the receiver's decision (sans-IO).
//!
//! A durable message outlives both processes: the sender keeps it in its store until the
//! receiver's store holds it. DURABLE frames travel as the payloads of ordinary sealed, reliable
//! MESSAGEs on the reserved channel [`DURABLE_CHANNEL`], so within a session they get integrity
//! tags, replay protection and exactly-once delivery like any message; what this module adds is
//! the identity that survives restarts: a **stream** per (sender, receiver) pair, named by a
//! random 128-bit [`StreamId`] the sender keeps in its store, with its own sequence numbers
//! (`dseq`, from 1, one per durable message, never reused). PROTOCOL.md section 10 is the
//! specification, with the security argument.
//!
//! Layout (integers big-endian), after a one-byte kind:
//!
//! | kind | fields |
//! |---|---|
//! | `0x01` DATA | `stream` 16 bytes, `dseq` u64, `channel` u16, payload (rest) |
//! | `0x02` RECEIPT | `stream` 16 bytes, `dseq` u64 (cumulative: every `dseq` up to it is in the receiver's store) |

use bytes::Bytes;

/// The reserved channel that carries DURABLE frames (applications cannot send on it).
pub const DURABLE_CHANNEL: u16 = 0xFFFD;

/// Bytes a DATA frame adds to its payload.
pub const DATA_OVERHEAD: usize = 1 + 16 + 8 + 2;

/// Length of an encoded RECEIPT.
pub const RECEIPT_LEN: usize = 1 + 16 + 8;

/// The name of a durable stream: 16 random bytes chosen by the sender when it first sends
/// durably to a peer, kept in its store. Never all zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub [u8; 16]);

impl std::fmt::Display for StreamId {
    /// Lower-case hex.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// One DURABLE frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DurableFrame {
    /// A durable message.
    Data {
        /// The sender's stream.
        stream: StreamId,
        /// Its sequence number in the stream, from 1.
        dseq: u64,
        /// The application channel it was sent on.
        channel: u16,
        /// The application's bytes.
        payload: Bytes,
    },
    /// The receiver's store holds every message of `stream` up to `dseq`: the sender may forget
    /// them.
    Receipt {
        /// The sender's stream.
        stream: StreamId,
        /// The highest sequence number held, cumulative.
        dseq: u64,
    },
}

/// Why bytes are not a DURABLE frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DurableError {
    /// Input ended inside a field.
    #[error("truncated DURABLE frame")]
    Truncated,
    /// A kind other than DATA or RECEIPT.
    #[error("unknown DURABLE frame kind {0:#04x}")]
    UnknownKind(u8),
    /// A stream id of all zero bytes.
    #[error("DURABLE frame with a zero stream id")]
    ZeroStream,
    /// A sequence number of zero.
    #[error("DURABLE frame with sequence number 0")]
    ZeroSeq,
    /// Bytes after a RECEIPT.
    #[error("{0} trailing bytes after a RECEIPT")]
    TrailingBytes(usize),
}

impl DurableFrame {
    /// Decodes a whole message payload as one DURABLE frame. Never panics; does not allocate
    /// (a DATA payload is a slice of `bytes`).
    pub fn decode(bytes: &Bytes) -> Result<DurableFrame, DurableError> {
        let (&kind, rest) = bytes.split_first().ok_or(DurableError::Truncated)?;
        if rest.len() < 24 {
            return Err(DurableError::Truncated);
        }
        let stream = StreamId(rest[..16].try_into().expect("16 bytes"));
        let dseq = u64::from_be_bytes(rest[16..24].try_into().expect("8 bytes"));
        if kind != 0x01 && kind != 0x02 {
            return Err(DurableError::UnknownKind(kind));
        }
        if stream.0 == [0; 16] {
            return Err(DurableError::ZeroStream);
        }
        if dseq == 0 {
            return Err(DurableError::ZeroSeq);
        }
        if kind == 0x02 {
            return match bytes.len() - RECEIPT_LEN {
                0 => Ok(DurableFrame::Receipt { stream, dseq }),
                n => Err(DurableError::TrailingBytes(n)),
            };
        }
        let channel = rest.get(24..26).ok_or(DurableError::Truncated)?;
        let channel = u16::from_be_bytes(channel.try_into().expect("2 bytes"));
        Ok(DurableFrame::Data { stream, dseq, channel, payload: bytes.slice(DATA_OVERHEAD..) })
    }

    /// Encodes the frame.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            DurableFrame::Data { stream, dseq, channel, payload } => {
                out.reserve(DATA_OVERHEAD + payload.len());
                out.push(0x01);
                out.extend_from_slice(&stream.0);
                out.extend_from_slice(&dseq.to_be_bytes());
                out.extend_from_slice(&channel.to_be_bytes());
                out.extend_from_slice(payload);
            }
            DurableFrame::Receipt { stream, dseq } => {
                out.push(0x02);
                out.extend_from_slice(&stream.0);
                out.extend_from_slice(&dseq.to_be_bytes());
            }
        }
    }

    /// The frame as bytes.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = Vec::new();
        self.encode(&mut out);
        out.into()
    }
}

/// What the receiver does with a DATA frame, given what its store says of the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// The next message of the stream: store it (with the stream's new high mark, in one
    /// transaction), then send a RECEIPT.
    Next,
    /// Already in the store (a resend after a lost RECEIPT, a restart of either side): drop it
    /// and send a RECEIPT for the high mark again, so the sender forgets it.
    Duplicate,
    /// Not the next one: `expected` is. Drop it without a RECEIPT. A sender resends in order, so
    /// this means the receiver's store lost the stream's state (a disk lost or replaced) or the
    /// sender broke the protocol; either way nothing is skipped.
    Gap {
        /// The sequence number the receiver needs next.
        expected: u64,
    },
}

/// Judges a DATA frame's `dseq` against the stream's high mark in the receiver's store (`None`:
/// the store has never seen the stream). A stream starts at 1; after that only the next number
/// is taken, so no message is delivered twice and none is skipped, whatever the sender resends.
pub fn judge(high: Option<u64>, dseq: u64) -> Arrival {
    let high = high.unwrap_or(0);
    if dseq <= high {
        Arrival::Duplicate
    } else if dseq == high + 1 {
        Arrival::Next
    } else {
        Arrival::Gap { expected: high + 1 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector(name: &str) -> Bytes {
        crate::proto::wire::tests::vector(include_str!("../../PROTOCOL.md"), name)
    }

    fn stream() -> StreamId {
        StreamId(core::array::from_fn(|i| i as u8 + 0xa0))
    }

    #[test]
    fn protocol_md_vectors() {
        let data = DurableFrame::Data { stream: stream(), dseq: 3, channel: 7, payload: Bytes::from_static(b"hi") };
        assert_eq!(data.to_bytes(), vector("vector-durable-data"));
        assert_eq!(DurableFrame::decode(&vector("vector-durable-data")), Ok(data));
        let receipt = DurableFrame::Receipt { stream: stream(), dseq: 3 };
        assert_eq!(receipt.to_bytes(), vector("vector-durable-receipt"));
        assert_eq!(DurableFrame::decode(&vector("vector-durable-receipt")), Ok(receipt));
    }

    #[test]
    fn every_prefix_and_bad_field_is_a_typed_error() {
        let data = DurableFrame::Data { stream: stream(), dseq: 3, channel: 7, payload: Bytes::new() }.to_bytes();
        for n in 0..data.len() {
            assert_eq!(DurableFrame::decode(&data.slice(..n)), Err(DurableError::Truncated), "prefix of {n}");
        }
        let receipt = DurableFrame::Receipt { stream: stream(), dseq: 3 }.to_bytes();
        let mut long = receipt.to_vec();
        long.push(0);
        assert_eq!(DurableFrame::decode(&long.into()), Err(DurableError::TrailingBytes(1)));
        let mut zero_stream = receipt.to_vec();
        zero_stream[1..17].fill(0);
        assert_eq!(DurableFrame::decode(&zero_stream.into()), Err(DurableError::ZeroStream));
        let mut zero_seq = receipt.to_vec();
        zero_seq[17..25].fill(0);
        assert_eq!(DurableFrame::decode(&zero_seq.into()), Err(DurableError::ZeroSeq));
        let mut kind = receipt.to_vec();
        kind[0] = 0x03;
        assert_eq!(DurableFrame::decode(&kind.into()), Err(DurableError::UnknownKind(0x03)));
    }

    #[test]
    fn only_the_next_message_of_a_stream_is_taken() {
        assert_eq!(judge(None, 1), Arrival::Next);
        assert_eq!(judge(None, 2), Arrival::Gap { expected: 1 });
        assert_eq!(judge(Some(5), 6), Arrival::Next);
        assert_eq!(judge(Some(5), 5), Arrival::Duplicate);
        assert_eq!(judge(Some(5), 1), Arrival::Duplicate);
        assert_eq!(judge(Some(5), 8), Arrival::Gap { expected: 6 });
        assert_eq!(judge(Some(u64::MAX - 1), u64::MAX), Arrival::Next);
    }
}
