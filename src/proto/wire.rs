//! Frames on quicseal streams: encoding and bounded, panic-free decoding.
//!
//! The byte layout is specified in PROTOCOL.md, whose test vectors are checked below. Every
//! length is checked against its limit before anything is allocated; the decoder tells "need
//! more bytes" (`Ok(None)`) from "malformed" (`Err`).

use bytes::{Buf, Bytes};

use super::reliable::{AckRanges, MAX_ACK_RANGES};

/// Protocol version carried in every stream header.
pub const VERSION: u8 = 1;
/// Size of a stream header.
pub const STREAM_HEADER_LEN: usize = 4;
/// Size of a frame header (type + length).
pub const FRAME_HEADER_LEN: usize = 5;
/// Size of a MESSAGE body before the sealed payload: kind, channel, epoch, seq, sent_at.
pub const MESSAGE_PREFIX_LEN: usize = 1 + 2 + 8 + 8 + 8;
/// Size of the authentication tag that ends every MESSAGE.
pub const TAG_LEN: usize = 16;
/// Bytes a MESSAGE frame adds to its payload: frame header, prefix and tag.
pub const MESSAGE_OVERHEAD: usize = FRAME_HEADER_LEN + MESSAGE_PREFIX_LEN + TAG_LEN;
/// Size of the associated data a MESSAGE's tag covers besides the payload: the frame header and
/// the prefix.
pub const MESSAGE_AAD_LEN: usize = FRAME_HEADER_LEN + MESSAGE_PREFIX_LEN;
/// The largest message payload any configuration may allow (64 MiB).
pub const MAX_MESSAGE_SIZE: usize = 64 << 20;
/// The smallest `max_message_size` a HELLO may announce (1 KiB): every peer accepts a payload
/// this large, so a dialler's early message of at most this size fits whatever the acceptor's
/// HELLO will say (PROTOCOL.md section 2, "The early message").
pub const MIN_MESSAGE_LIMIT: usize = 1024;

/// What a stream carries, from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// The control stream (hello), opened once by the dialler.
    Control,
    /// A message channel, opened by the side that sends on it.
    Channel(u16),
}

/// Frame types.
pub mod frame_type {
    /// HELLO: the sender's limits and epoch, once per side on the control stream.
    pub const HELLO: u8 = 0x01;
    /// MESSAGE: a sealed application message.
    pub const MESSAGE: u8 = 0x02;
    /// ACK: what the peer's application took on one channel (cumulative plus ranges), on the
    /// control stream.
    pub const ACK: u8 = 0x03;
}

/// How a MESSAGE travels; bound into its tag and nonce, so one cannot pass for the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// On a channel's QUIC stream: reliable, ordered.
    Stream = 0,
    /// In a QUIC DATAGRAM: may be lost or reordered.
    Datagram = 1,
}

/// A MESSAGE frame as it is on the wire: the payload is still sealed (encrypted, with its tag).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageFrame {
    /// Stream or datagram.
    pub kind: MessageKind,
    /// The channel.
    pub channel: u16,
    /// The sender's session epoch.
    pub epoch: u64,
    /// Sequence number within (epoch, kind, channel), from 1.
    pub seq: u64,
    /// The sender's clock when it sealed the message, in milliseconds since the Unix epoch.
    pub sent_at_ms: u64,
    /// Ciphertext followed by the 16-byte tag.
    pub sealed: Bytes,
}

impl MessageFrame {
    /// The payload size once opened.
    pub fn payload_len(&self) -> usize {
        self.sealed.len().saturating_sub(TAG_LEN)
    }

    /// The associated data the tag covers: frame header and prefix, exactly as on the wire.
    pub fn aad(&self) -> [u8; MESSAGE_AAD_LEN] {
        message_aad(self.kind, self.channel, self.epoch, self.seq, self.sent_at_ms, self.payload_len())
    }
}

/// The frame header and prefix of a MESSAGE with a `payload_len`-byte payload. (A length that
/// does not fit the 32-bit length field is written as `u32::MAX`: such a frame cannot exist on
/// the wire, so its tag simply never verifies.)
pub fn message_aad(
    kind: MessageKind,
    channel: u16,
    epoch: u64,
    seq: u64,
    sent_at_ms: u64,
    payload_len: usize,
) -> [u8; MESSAGE_AAD_LEN] {
    let len = MESSAGE_PREFIX_LEN.checked_add(payload_len).and_then(|l| l.checked_add(TAG_LEN));
    let len = len.and_then(|l| u32::try_from(l).ok()).unwrap_or(u32::MAX);
    let mut h = [0u8; MESSAGE_AAD_LEN];
    h[0] = frame_type::MESSAGE;
    h[1..5].copy_from_slice(&len.to_be_bytes());
    h[5] = kind as u8;
    h[6..8].copy_from_slice(&channel.to_be_bytes());
    h[8..16].copy_from_slice(&epoch.to_be_bytes());
    h[16..24].copy_from_slice(&seq.to_be_bytes());
    h[24..32].copy_from_slice(&sent_at_ms.to_be_bytes());
    h
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The sender's announced limits and session epoch.
    Hello {
        /// Largest payload the sender accepts.
        max_message_size: u32,
        /// The sender's session epoch (random, non-zero).
        epoch: u64,
        /// Set by a dialler resuming an existing session on a new connection (see
        /// [`HELLO_RESUME`]).
        resume: bool,
        /// Most application channels the sender accepts from its peer (non-zero): the peer
        /// refuses at `send` a channel beyond it instead of sending what would be dropped.
        max_channels: u16,
        /// How far ahead of the last message it delivered on a channel the sender accepts a
        /// message (its replay window, non-zero): the peer never has more unacknowledged
        /// messages on one channel than this.
        window: u32,
    },
    /// One sealed application message.
    Message(MessageFrame),
    /// End-to-end acknowledgement of one channel's stream messages.
    Ack(AckRanges),
}

/// Length of a HELLO body.
pub const HELLO_LEN: u32 = 19;

/// HELLO flag: the dialler resumes the session of this epoch instead of starting one.
pub const HELLO_RESUME: u8 = 0x01;

/// Size of an ACK body before its ranges: channel, cumulative, range count.
pub const ACK_PREFIX_LEN: usize = 2 + 8 + 1;

/// Why bytes are not a valid frame or stream header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// A stream header with a version we do not speak.
    #[error("unknown protocol version {0}")]
    UnknownVersion(u8),
    /// A stream header with an unknown stream kind.
    #[error("unknown stream kind {0:#04x}")]
    UnknownStreamKind(u8),
    /// A control stream header whose channel field is not zero.
    #[error("control stream header with non-zero channel")]
    BadControlHeader,
    /// A frame type we do not know.
    #[error("unknown frame type {0:#04x}")]
    UnknownFrameType(u8),
    /// A HELLO with flags this version does not define.
    #[error("unknown HELLO flags {0:#04x}")]
    UnknownFlags(u8),
    /// A MESSAGE with a kind other than stream (0) or datagram (1).
    #[error("unknown message kind {0:#04x}")]
    UnknownMessageKind(u8),
    /// A frame whose length does not fit its type.
    #[error("frame type {frame_type:#04x} cannot have length {length}")]
    BadLength {
        /// The frame type.
        frame_type: u8,
        /// The length on the wire.
        length: u32,
    },
    /// A MESSAGE larger than the limit.
    #[error("message of {size} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// The payload size announced on the wire.
        size: u64,
        /// The limit in force.
        limit: usize,
    },
    /// Input ended inside a frame where a complete one was required.
    #[error("truncated frame")]
    Truncated,
    /// Bytes after a complete frame where none were allowed.
    #[error("{0} trailing bytes after the frame")]
    TrailingBytes(usize),
}

/// Encodes a stream header.
pub fn encode_stream_header(kind: StreamKind) -> [u8; STREAM_HEADER_LEN] {
    let (k, ch) = match kind {
        StreamKind::Control => (0u8, 0u16),
        StreamKind::Channel(c) => (1u8, c),
    };
    let ch = ch.to_be_bytes();
    [VERSION, k, ch[0], ch[1]]
}

/// Decodes a stream header from exactly [`STREAM_HEADER_LEN`] bytes.
pub fn decode_stream_header(b: [u8; STREAM_HEADER_LEN]) -> Result<StreamKind, WireError> {
    if b[0] != VERSION {
        return Err(WireError::UnknownVersion(b[0]));
    }
    let ch = u16::from_be_bytes([b[2], b[3]]);
    match b[1] {
        0 if ch == 0 => Ok(StreamKind::Control),
        0 => Err(WireError::BadControlHeader),
        1 => Ok(StreamKind::Channel(ch)),
        k => Err(WireError::UnknownStreamKind(k)),
    }
}

/// A validated frame header: the body that follows has exactly `length` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Frame type (see [`frame_type`]).
    pub frame_type: u8,
    /// Body length in bytes.
    pub length: u32,
}

impl FrameHeader {
    /// Decodes and validates a frame header: known type, a length that fits the type, and a
    /// MESSAGE payload no larger than `max_payload`. Call this before allocating the body.
    pub fn decode(b: [u8; FRAME_HEADER_LEN], max_payload: usize) -> Result<FrameHeader, WireError> {
        let frame_type = b[0];
        let length = u32::from_be_bytes([b[1], b[2], b[3], b[4]]);
        let bad = Err(WireError::BadLength { frame_type, length });
        match frame_type {
            frame_type::HELLO if length != HELLO_LEN => return bad,
            frame_type::ACK => {
                let Some(ranges) = (length as usize).checked_sub(ACK_PREFIX_LEN) else { return bad };
                if ranges % 16 != 0 || ranges / 16 > MAX_ACK_RANGES {
                    return bad;
                }
            }
            frame_type::MESSAGE => {
                let Some(size) = (length as usize).checked_sub(MESSAGE_PREFIX_LEN + TAG_LEN) else { return bad };
                if size > max_payload {
                    return Err(WireError::TooLarge { size: size as u64, limit: max_payload });
                }
            }
            frame_type::HELLO => {}
            t => return Err(WireError::UnknownFrameType(t)),
        }
        Ok(FrameHeader { frame_type, length })
    }

    /// Decodes the body of a frame whose header this is. `body.len()` must equal `length`.
    /// The header is validated again (its fields are public), so no header can make this panic.
    pub fn decode_body(&self, body: Bytes) -> Result<Frame, WireError> {
        let mut head = [0u8; FRAME_HEADER_LEN];
        head[0] = self.frame_type;
        head[1..].copy_from_slice(&self.length.to_be_bytes());
        FrameHeader::decode(head, usize::MAX)?;
        if body.len() != self.length as usize {
            return Err(if body.len() < self.length as usize {
                WireError::Truncated
            } else {
                WireError::TrailingBytes(body.len() - self.length as usize)
            });
        }
        let u64_at = |at: usize| u64::from_be_bytes(body[at..at + 8].try_into().expect("length checked"));
        Ok(match self.frame_type {
            frame_type::HELLO => {
                let flags = body[12];
                if flags & !HELLO_RESUME != 0 {
                    return Err(WireError::UnknownFlags(flags));
                }
                Frame::Hello {
                    max_message_size: u32::from_be_bytes(body[..4].try_into().expect("length checked")),
                    epoch: u64_at(4),
                    resume: flags & HELLO_RESUME != 0,
                    max_channels: u16::from_be_bytes([body[13], body[14]]),
                    window: u32::from_be_bytes(body[15..19].try_into().expect("length checked")),
                }
            }
            frame_type::ACK => {
                let count = body[10] as usize;
                if ACK_PREFIX_LEN + 16 * count != body.len() {
                    return Err(WireError::BadLength { frame_type: self.frame_type, length: self.length });
                }
                Frame::Ack(AckRanges {
                    channel: u16::from_be_bytes([body[0], body[1]]),
                    cumulative: u64_at(2),
                    ranges: (0..count).map(|i| (u64_at(11 + 16 * i), u64_at(19 + 16 * i))).collect(),
                })
            }
            frame_type::MESSAGE => {
                let kind = match body[0] {
                    0 => MessageKind::Stream,
                    1 => MessageKind::Datagram,
                    k => return Err(WireError::UnknownMessageKind(k)),
                };
                let (channel, epoch, seq, sent_at_ms) =
                    (u16::from_be_bytes([body[1], body[2]]), u64_at(3), u64_at(11), u64_at(19));
                // The body's own buffer, moved past the prefix: a slice of it would allocate a
                // shared header, once per message.
                let mut sealed = body;
                sealed.advance(MESSAGE_PREFIX_LEN);
                Frame::Message(MessageFrame { kind, channel, epoch, seq, sent_at_ms, sealed })
            }
            t => return Err(WireError::UnknownFrameType(t)),
        })
    }
}

impl Frame {
    /// Decodes one frame from the front of `buf`: `Ok(None)` when more bytes are needed,
    /// otherwise the frame and how many bytes it used.
    pub fn decode(buf: &Bytes, max_payload: usize) -> Result<Option<(Frame, usize)>, WireError> {
        let Some(head) = buf.get(..FRAME_HEADER_LEN) else {
            return Ok(None);
        };
        let header = FrameHeader::decode(head.try_into().expect("5 bytes"), max_payload)?;
        let end = FRAME_HEADER_LEN + header.length as usize;
        if buf.len() < end {
            return Ok(None);
        }
        Ok(Some((header.decode_body(buf.slice(FRAME_HEADER_LEN..end))?, end)))
    }

    /// Decodes a buffer that must hold exactly one frame.
    pub fn decode_exact(buf: &Bytes, max_payload: usize) -> Result<Frame, WireError> {
        match Frame::decode(buf, max_payload)? {
            None => Err(WireError::Truncated),
            Some((_, used)) if used < buf.len() => Err(WireError::TrailingBytes(buf.len() - used)),
            Some((frame, _)) => Ok(frame),
        }
    }

    /// Appends the encoded frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Frame::Hello { max_message_size, epoch, resume, max_channels, window } => {
                out.push(frame_type::HELLO);
                out.extend_from_slice(&HELLO_LEN.to_be_bytes());
                out.extend_from_slice(&max_message_size.to_be_bytes());
                out.extend_from_slice(&epoch.to_be_bytes());
                out.push(if *resume { HELLO_RESUME } else { 0 });
                out.extend_from_slice(&max_channels.to_be_bytes());
                out.extend_from_slice(&window.to_be_bytes());
            }
            Frame::Ack(a) => {
                let count = a.ranges.len().min(MAX_ACK_RANGES);
                out.push(frame_type::ACK);
                out.extend_from_slice(&((ACK_PREFIX_LEN + 16 * count) as u32).to_be_bytes());
                out.extend_from_slice(&a.channel.to_be_bytes());
                out.extend_from_slice(&a.cumulative.to_be_bytes());
                out.push(count as u8);
                for (start, end) in &a.ranges[..count] {
                    out.extend_from_slice(&start.to_be_bytes());
                    out.extend_from_slice(&end.to_be_bytes());
                }
            }
            Frame::Message(m) => {
                out.extend_from_slice(&m.aad());
                out.extend_from_slice(&m.sealed);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn hex(s: &str) -> Bytes {
        let s: String = s.split_whitespace().collect();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect::<Vec<_>>().into()
    }

    fn enc(f: &Frame) -> Bytes {
        let mut v = Vec::new();
        f.encode(&mut v);
        v.into()
    }

    fn msg(kind: MessageKind, seq: u64, sealed: &'static [u8]) -> Frame {
        Frame::Message(MessageFrame {
            kind,
            channel: 7,
            epoch: 0x0102030405060708,
            seq,
            sent_at_ms: 1_700_000_000_000,
            sealed: Bytes::from_static(sealed),
        })
    }

    // The framing vectors of PROTOCOL.md, section "Test vectors" (the sealed message's
    // cryptography is checked in proto::seal).
    #[test]
    fn protocol_md_vectors() {
        let doc = include_str!("../../PROTOCOL.md");
        let cases: [(&str, Frame); 3] = [
            (
                "vector-hello",
                Frame::Hello {
                    max_message_size: 1 << 20,
                    epoch: 0x0102030405060708,
                    resume: false,
                    max_channels: 64,
                    window: 2048,
                },
            ),
            ("vector-ack", Frame::Ack(AckRanges { channel: 7, cumulative: 258, ranges: vec![(260, 261)] })),
            (
                // Its sealing is checked in proto::seal; here, the framing: the sealed part is
                // what follows the prefix, ciphertext then tag.
                "vector-message",
                Frame::Message(MessageFrame {
                    kind: MessageKind::Stream,
                    channel: 7,
                    epoch: 0x0102030405060708,
                    seq: 1,
                    sent_at_ms: 1_700_000_000_000,
                    sealed: Bytes::from_static(&[
                        0xef, 0xeb, 0x13, 0x68, 0xcb, 0xa5, 0xd8, 0x19, 0x46, 0x4f, 0x9d, 0x1e, 0x4b, 0xc1, 0xd4, 0x55,
                        0xb5, 0x5a,
                    ]),
                }),
            ),
        ];
        for (name, frame) in cases {
            let bytes = vector(doc, name);
            assert_eq!(enc(&frame), bytes, "{name}");
            assert_eq!(Frame::decode_exact(&bytes, 1 << 20).unwrap(), frame, "{name}");
        }
        assert_eq!(encode_stream_header(StreamKind::Control).to_vec(), vector(doc, "vector-control-stream").to_vec());
        assert_eq!(
            encode_stream_header(StreamKind::Channel(7)).to_vec(),
            vector(doc, "vector-channel-stream").to_vec()
        );
    }

    /// Reads the hex under the line `<!-- name -->` in PROTOCOL.md.
    pub(crate) fn vector(doc: &str, name: &str) -> Bytes {
        let marker = format!("<!-- {name} -->");
        let after = &doc[doc.find(&marker).unwrap_or_else(|| panic!("{name} missing")) + marker.len()..];
        let block = after.split("```").nth(1).expect("code block");
        hex(block)
    }

    #[test]
    fn stream_headers() {
        for kind in [StreamKind::Control, StreamKind::Channel(0), StreamKind::Channel(u16::MAX)] {
            assert_eq!(decode_stream_header(encode_stream_header(kind)), Ok(kind));
        }
        assert_eq!(decode_stream_header([2, 1, 0, 0]), Err(WireError::UnknownVersion(2)));
        assert_eq!(decode_stream_header([1, 9, 0, 0]), Err(WireError::UnknownStreamKind(9)));
        assert_eq!(decode_stream_header([1, 0, 0, 1]), Err(WireError::BadControlHeader));
    }

    #[test]
    fn every_error_path() {
        let max = 16;
        let d = |b: &[u8]| Frame::decode(&Bytes::copy_from_slice(b), max);
        assert_eq!(d(&[0x09, 0, 0, 0, 0]), Err(WireError::UnknownFrameType(9)));
        assert_eq!(d(&[0x01, 0, 0, 0, 4]), Err(WireError::BadLength { frame_type: 1, length: 4 }));
        let mut flags = vec![0x01, 0, 0, 0, 19];
        flags.extend_from_slice(&[0; 12]);
        flags.push(0x02);
        flags.extend_from_slice(&[0; 6]);
        assert_eq!(Frame::decode_exact(&flags.into(), max), Err(WireError::UnknownFlags(2)));
        assert_eq!(d(&[0x03, 0, 0, 0, 7]), Err(WireError::BadLength { frame_type: 3, length: 7 }));
        assert_eq!(d(&[0x03, 0, 0, 0, 12]), Err(WireError::BadLength { frame_type: 3, length: 12 }));
        let too_many = (11 + 16 * 33) as u32; // 33 ranges: one more than allowed
        let l = too_many.to_be_bytes();
        assert_eq!(d(&[0x03, l[0], l[1], l[2], l[3]]), Err(WireError::BadLength { frame_type: 3, length: too_many }));
        // The range count must match the length.
        let mut lying = vec![0x03, 0, 0, 0, 27, 0, 1];
        lying.extend_from_slice(&[0; 8]);
        lying.push(2); // says 2 ranges, length has room for 1
        lying.extend_from_slice(&[0; 16]);
        assert_eq!(Frame::decode_exact(&lying.into(), max), Err(WireError::BadLength { frame_type: 3, length: 27 }));
        assert_eq!(d(&[0x02, 0, 0, 0, 42]), Err(WireError::BadLength { frame_type: 2, length: 42 }));
        assert_eq!(d(&[0x02, 0, 0, 0, 43 + 17]), Err(WireError::TooLarge { size: 17, limit: 16 }));
        // The largest length on the wire is refused from the header alone, before allocating.
        assert_eq!(
            d(&[0x02, 0xff, 0xff, 0xff, 0xff]),
            Err(WireError::TooLarge { size: u32::MAX as u64 - 43, limit: 16 })
        );
        let ok = enc(&msg(MessageKind::Datagram, 3, &[7; 16 + 16]));
        assert!(Frame::decode_exact(&ok, max).is_ok());
        let mut bad_kind = ok.to_vec();
        bad_kind[5] = 2;
        assert_eq!(Frame::decode_exact(&bad_kind.into(), max), Err(WireError::UnknownMessageKind(2)));
        let mut long = ok.to_vec();
        long.push(0);
        assert_eq!(Frame::decode_exact(&long.into(), max), Err(WireError::TrailingBytes(1)));
        let h = FrameHeader::decode([0x03, 0, 0, 0, 11], max).unwrap();
        assert_eq!(h.decode_body(Bytes::from_static(&[0; 10])), Err(WireError::Truncated));
        assert_eq!(h.decode_body(Bytes::from_static(&[0; 12])), Err(WireError::TrailingBytes(1)));
    }

    #[test]
    fn truncation_at_every_length_needs_more_and_never_errs() {
        for frame in [
            Frame::Hello { max_message_size: 77, epoch: 9, resume: true, max_channels: 3, window: 64 },
            Frame::Ack(AckRanges { channel: 1, cumulative: u64::MAX, ranges: vec![] }),
            Frame::Ack(AckRanges { channel: 2, cumulative: 1, ranges: vec![(3, 4), (9, 9)] }),
            msg(MessageKind::Stream, 9, b"0123456789abcdef0123456789"),
            msg(MessageKind::Datagram, 10, &[0; 16]),
        ] {
            let full = enc(&frame);
            for cut in 0..full.len() {
                assert_eq!(Frame::decode(&full.slice(..cut), 64), Ok(None), "{frame:?} cut at {cut}");
                assert_eq!(Frame::decode_exact(&full.slice(..cut), 64), Err(WireError::Truncated));
            }
            assert_eq!(Frame::decode(&full, 64), Ok(Some((frame, full.len()))));
        }
    }

    #[test]
    fn a_hand_made_header_cannot_make_decode_body_panic() {
        for frame_type in [frame_type::HELLO, frame_type::MESSAGE, frame_type::ACK, 0x42] {
            for length in [0u32, 2, 7, 11, 42] {
                let h = FrameHeader { frame_type, length };
                let _ = h.decode_body(Bytes::from(vec![0u8; length as usize]));
            }
        }
        let aad = message_aad(MessageKind::Stream, 0, 0, 0, 0, usize::MAX);
        assert_eq!(aad[1..5], [0xff; 4]);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A small deterministic generator: the fuzz target does this at scale.
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 40) as usize;
            let bytes: Vec<u8> = (0..len).map(|i| (x >> (i % 8 * 8)) as u8 ^ i as u8).collect();
            let _ = Frame::decode(&bytes.into(), 32);
        }
    }
}
