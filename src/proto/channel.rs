//! Per-channel sequence and acknowledgement state of the sending side.
//!
//! Acknowledgements travel back on the channel's stream and must grow monotonically without
//! passing what was sent. (What the receiving side accepts is decided by
//! [`seal::Opener`](super::seal::Opener): tag, replay window, order.)

/// Why a sequence number or acknowledgement is not acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SeqError {
    /// An ACK for a message never sent.
    #[error("ack {got} for messages never sent (last sent {sent})")]
    AckBeyondSent {
        /// Highest number sent.
        sent: u64,
        /// The ack.
        got: u64,
    },
    /// An ACK lower than a previous one.
    #[error("ack {got} went backwards (already {acked})")]
    AckBackwards {
        /// Highest ack so far.
        acked: u64,
        /// The ack.
        got: u64,
    },
    /// The channel used every sequence number (2^64 - 1 messages).
    #[error("sequence numbers exhausted")]
    Exhausted,
}

/// The sending side of a channel.
#[derive(Debug, Default, Clone)]
pub struct Outbound {
    sent: u64,
    acked: u64,
}

impl Outbound {
    /// Allocates the next sequence number.
    pub fn next_seq(&mut self) -> Result<u64, SeqError> {
        self.sent = self.sent.checked_add(1).ok_or(SeqError::Exhausted)?;
        Ok(self.sent)
    }

    /// Highest sequence number sent.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Highest sequence number acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Records a cumulative acknowledgement from the peer.
    pub fn on_ack(&mut self, seq: u64) -> Result<(), SeqError> {
        if seq > self.sent {
            return Err(SeqError::AckBeyondSent { sent: self.sent, got: seq });
        }
        if seq < self.acked {
            return Err(SeqError::AckBackwards { acked: self.acked, got: seq });
        }
        self.acked = seq;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbound_acks() {
        let mut o = Outbound::default();
        assert_eq!(o.on_ack(1), Err(SeqError::AckBeyondSent { sent: 0, got: 1 }));
        o.on_ack(0).unwrap();
        assert_eq!(o.next_seq(), Ok(1));
        assert_eq!(o.next_seq(), Ok(2));
        o.on_ack(2).unwrap();
        assert_eq!(o.on_ack(1), Err(SeqError::AckBackwards { acked: 2, got: 1 }));
        assert_eq!(o.acked(), 2);
        let mut full = Outbound { sent: u64::MAX, acked: 0 };
        assert_eq!(full.next_seq(), Err(SeqError::Exhausted));
    }
}
