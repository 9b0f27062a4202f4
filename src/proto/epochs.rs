//! Retired session epochs, per peer, bounded.
//!
//! Every logical session has a random 64-bit epoch per side. When a session ends, the peer's
//! epoch is retired: a peer that later presents it again (in a HELLO) is refused, so nothing of
//! an old session can be brought back. Memory is bounded: at most `per_peer` epochs for each of
//! at most `peers` peers, the least recently touched forgotten first.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// The book of retired epochs.
#[derive(Debug)]
pub struct EpochBook<K> {
    retired: HashMap<K, VecDeque<u64>>,
    order: VecDeque<K>,
    peers: usize,
    per_peer: usize,
}

impl<K: Hash + Eq + Clone> EpochBook<K> {
    /// A book remembering `per_peer` epochs for each of `peers` peers.
    pub fn new(peers: usize, per_peer: usize) -> EpochBook<K> {
        EpochBook { retired: HashMap::new(), order: VecDeque::new(), peers: peers.max(1), per_peer: per_peer.max(1) }
    }

    /// Whether `epoch` of `peer` was retired (and is still remembered).
    pub fn is_retired(&self, peer: &K, epoch: u64) -> bool {
        self.retired.get(peer).is_some_and(|e| e.contains(&epoch))
    }

    /// Retires `epoch` of `peer`.
    pub fn retire(&mut self, peer: K, epoch: u64) {
        if let Some(pos) = self.order.iter().position(|p| *p == peer) {
            self.order.remove(pos);
        } else if self.order.len() >= self.peers
            && let Some(oldest) = self.order.pop_front()
        {
            self.retired.remove(&oldest);
        }
        self.order.push_back(peer.clone());
        let epochs = self.retired.entry(peer).or_default();
        if !epochs.contains(&epoch) {
            if epochs.len() >= self.per_peer {
                epochs.pop_front();
            }
            epochs.push_back(epoch);
        }
    }

    /// Number of peers remembered.
    pub fn peers(&self) -> usize {
        self.retired.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retires_and_forgets_within_bounds() {
        let mut b = EpochBook::new(2, 2);
        b.retire("a", 1);
        b.retire("a", 2);
        assert!(b.is_retired(&"a", 1) && b.is_retired(&"a", 2));
        assert!(!b.is_retired(&"b", 1));
        b.retire("a", 3); // forgets epoch 1 of a
        assert!(!b.is_retired(&"a", 1) && b.is_retired(&"a", 3));
        b.retire("b", 7);
        b.retire("a", 4); // touches a: b is now the oldest
        b.retire("c", 9); // forgets b
        assert!(!b.is_retired(&"b", 7) && b.is_retired(&"a", 4) && b.is_retired(&"c", 9));
        assert_eq!(b.peers(), 2);
    }
}
