//! Sliding anti-replay window in the RFC 6479 layout: a ring of 64-bit blocks, so advancing the
//! window clears whole blocks instead of shifting bits.
//!
//! Use it in two steps, as boringtun and IPsec do: [`ReplayWindow::check`] before the (more
//! expensive) tag verification, [`ReplayWindow::commit`] only after the tag verified, so a forged
//! message can never move the window.
//!
//! ## The accept rule, exactly
//!
//! With `top` the highest committed sequence number (0 before the first) and `W` the window
//! width in bits, a sequence number `s` is accepted when
//!
//! - `1 <= s <= MAX_SEQ`, and
//! - `s > top` (new), or `top - W < s <= top` and `s` was not committed before.
//!
//! So at `top = T` the oldest acceptable number is `T - W + 1`; `T - W` is too old. Numbers
//! above [`MAX_SEQ`] are refused outright: a sender must start a new epoch before it gets there,
//! and no arithmetic on a wire value can overflow.
//!
//! References: RFC 6479 (the block ring), RFC 4303 section 3.4.3 and RFC 9147 section 4.5.1
//! (check before, update after the integrity check), WireGuard (a hard limit below 2^64).

/// The highest sequence number ever accepted: 2^64 - 2^32. A sender starts a new epoch before
/// reaching it (at one million messages a second that takes over half a million years).
pub const MAX_SEQ: u64 = u64::MAX - (1 << 32) + 1;

/// Default window width in bits.
pub const DEFAULT_WIDTH: u64 = 2048;

/// Largest supported window width in bits.
pub const MAX_WIDTH: u64 = 1 << 16;

/// Why a sequence number is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// Sequence number 0, or above [`MAX_SEQ`].
    #[error("sequence number {0} outside 1..=MAX_SEQ")]
    OutOfRange(u64),
    /// Older than the window: `s <= top - W`.
    #[error("sequence number {seq} is older than the window (top {top})")]
    TooOld {
        /// The refused number.
        seq: u64,
        /// The window's top.
        top: u64,
    },
    /// Already committed.
    #[error("sequence number {0} was already received")]
    Replayed(u64),
}

/// One anti-replay window.
#[derive(Debug, Clone)]
pub struct ReplayWindow {
    /// `width / 64 + 1` blocks: the extra block lets the ring advance into a fresh block
    /// without clearing bits still inside the window.
    blocks: Box<[u64]>,
    top: u64,
    width: u64,
}

impl ReplayWindow {
    /// A window `width` bits wide.
    ///
    /// # Panics
    /// If `width` is not a multiple of 64 between 64 and [`MAX_WIDTH`]: configurations are
    /// validated before windows are made (see [`ReplayWindow::valid_width`]).
    pub fn new(width: u64) -> ReplayWindow {
        assert!(Self::valid_width(width), "invalid replay window width {width}");
        ReplayWindow { blocks: vec![0; (width / 64 + 1) as usize].into_boxed_slice(), top: 0, width }
    }

    /// Whether `width` is usable: a multiple of 64 between 64 and [`MAX_WIDTH`].
    pub fn valid_width(width: u64) -> bool {
        (64..=MAX_WIDTH).contains(&width) && width % 64 == 0
    }

    /// The highest committed sequence number (0 before the first).
    pub fn top(&self) -> u64 {
        self.top
    }

    /// The window width in bits.
    pub fn width(&self) -> u64 {
        self.width
    }

    fn slot(&self, seq: u64) -> (usize, u64) {
        let block = (seq >> 6) % self.blocks.len() as u64;
        (block as usize, 1u64 << (seq & 63))
    }

    /// Whether `seq` would be accepted. Does not change the window.
    pub fn check(&self, seq: u64) -> Result<(), ReplayError> {
        if seq == 0 || seq > MAX_SEQ {
            return Err(ReplayError::OutOfRange(seq));
        }
        if seq > self.top {
            return Ok(());
        }
        // seq <= top here, so the subtraction cannot underflow.
        if self.top - seq >= self.width {
            return Err(ReplayError::TooOld { seq, top: self.top });
        }
        let (block, bit) = self.slot(seq);
        if self.blocks[block] & bit != 0 {
            return Err(ReplayError::Replayed(seq));
        }
        Ok(())
    }

    /// Records `seq` as received, after its tag verified. Re-checks, so a caller that skipped
    /// [`ReplayWindow::check`] still cannot accept a replay.
    pub fn commit(&mut self, seq: u64) -> Result<(), ReplayError> {
        self.check(seq)?;
        if seq > self.top {
            let old_block = self.top >> 6;
            let new_block = seq >> 6;
            // Clear every block the window moves into (at most the whole ring).
            let advance = (new_block - old_block).min(self.blocks.len() as u64);
            for i in 1..=advance {
                let b = ((old_block + i) % self.blocks.len() as u64) as usize;
                self.blocks[b] = 0;
            }
            self.top = seq;
        }
        let (block, bit) = self.slot(seq);
        self.blocks[block] |= bit;
        Ok(())
    }
}

/// The accept rule written as plainly as possible, with a set of seen numbers: the reference
/// that differential tests and the `replay_window` fuzz target compare [`ReplayWindow`] with.
/// It forgets numbers that fell out of the window, so its memory stays bounded too. A test
/// oracle: compiled only for tests and fuzzing.
#[cfg(any(test, fuzzing))]
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct ReferenceWindow {
    seen: std::collections::BTreeSet<u64>,
    top: u64,
    width: u64,
}

#[cfg(any(test, fuzzing))]
impl ReferenceWindow {
    /// A reference window `width` bits wide.
    pub fn new(width: u64) -> ReferenceWindow {
        ReferenceWindow { seen: std::collections::BTreeSet::new(), top: 0, width }
    }

    /// The highest committed number.
    pub fn top(&self) -> u64 {
        self.top
    }

    /// What the accept rule says about `seq`.
    pub fn check(&self, seq: u64) -> Result<(), ReplayError> {
        if seq == 0 || seq > MAX_SEQ {
            Err(ReplayError::OutOfRange(seq))
        } else if seq > self.top {
            Ok(())
        } else if self.top - seq >= self.width {
            Err(ReplayError::TooOld { seq, top: self.top })
        } else if self.seen.contains(&seq) {
            Err(ReplayError::Replayed(seq))
        } else {
            Ok(())
        }
    }

    /// Records `seq` if the rule accepts it.
    pub fn commit(&mut self, seq: u64) -> Result<(), ReplayError> {
        self.check(seq)?;
        self.seen.insert(seq);
        self.top = self.top.max(seq);
        self.seen = self.seen.split_off(&self.top.saturating_sub(self.width));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edges() {
        let w = 1024;
        let mut r = ReplayWindow::new(w);
        assert_eq!(r.check(0), Err(ReplayError::OutOfRange(0)));
        r.commit(5000).unwrap();
        // Exactly at the lower edge: accepted. One below: too old.
        assert_eq!(r.check(5000 - w + 1), Ok(()));
        assert_eq!(r.check(5000 - w), Err(ReplayError::TooOld { seq: 5000 - w, top: 5000 }));
        r.commit(5000 - w + 1).unwrap();
        assert_eq!(r.check(5000 - w + 1), Err(ReplayError::Replayed(5000 - w + 1)));
        assert_eq!(r.check(5000), Err(ReplayError::Replayed(5000)));
        // The hard limit and one above.
        assert_eq!(r.check(MAX_SEQ), Ok(()));
        assert_eq!(r.check(MAX_SEQ + 1), Err(ReplayError::OutOfRange(MAX_SEQ + 1)));
        assert_eq!(r.check(u64::MAX), Err(ReplayError::OutOfRange(u64::MAX)));
        r.commit(MAX_SEQ).unwrap();
        assert_eq!(r.check(MAX_SEQ), Err(ReplayError::Replayed(MAX_SEQ)));
        assert_eq!(r.check(MAX_SEQ - w + 1), Ok(()));
        assert_eq!(r.check(MAX_SEQ - w), Err(ReplayError::TooOld { seq: MAX_SEQ - w, top: MAX_SEQ }));
        // Committing a refused number fails and changes nothing.
        assert!(r.commit(MAX_SEQ).is_err());
        assert_eq!(r.top(), MAX_SEQ);
    }

    #[test]
    fn first_numbers_and_small_windows() {
        let mut r = ReplayWindow::new(64);
        assert_eq!(r.check(1), Ok(()));
        r.commit(1).unwrap();
        r.commit(3).unwrap();
        assert_eq!(r.check(2), Ok(()));
        assert_eq!(r.check(1), Err(ReplayError::Replayed(1)));
        r.commit(66).unwrap();
        assert_eq!(r.check(2), Err(ReplayError::TooOld { seq: 2, top: 66 }));
        // 66 - 3 = 63 < 64: still inside the window, and seen.
        assert_eq!(r.check(3), Err(ReplayError::Replayed(3)));
        assert_eq!(r.check(4), Ok(()));
        assert!(!ReplayWindow::valid_width(0));
        assert!(!ReplayWindow::valid_width(100));
        assert!(!ReplayWindow::valid_width(MAX_WIDTH + 64));
        assert!(ReplayWindow::valid_width(MAX_WIDTH));
    }

    /// A long random walk against a set-based model: the window must accept exactly what the
    /// accept rule says, for 1,000,000 operations, with jumps that cross many blocks.
    #[test]
    fn matches_a_set_model_for_a_million_operations() {
        for &width in &[64u64, 1024, 2048] {
            let mut r = ReplayWindow::new(width);
            let mut model = ReferenceWindow::new(width);
            let mut x: u64 = 0x2545F4914F6CDD1D ^ width;
            let ops = if width == 1024 { 1_000_000 } else { 200_000 };
            for _ in 0..ops {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let top = model.top();
                let seq = match x % 16 {
                    0 => top + 1 + (x >> 8) % (3 * width),                           // jump ahead
                    1 => top.saturating_sub(width) + (x >> 8) % 3,                   // around the lower edge
                    2 => (x >> 8) % 4,                                               // tiny numbers, incl. 0
                    _ => top.saturating_sub((x >> 8) % (width + 8)) + (x >> 40) % 4, // inside or near
                };
                let expected = model.check(seq);
                assert_eq!(r.check(seq), expected, "width {width} top {top} seq {seq}");
                if expected.is_ok() && (x >> 60) != 0 {
                    r.commit(seq).unwrap();
                    model.commit(seq).unwrap();
                }
            }
        }
    }
}
