//! The last batches published, kept so a subscriber that missed some (it joined late, its queue
//! overflowed) can ask for them again on the replay socket, as vLLM's publisher allows.

use std::collections::VecDeque;

use bytes::Bytes;

/// At most `capacity` batches by sequence number, oldest dropped first.
pub struct ReplayBuffer {
    capacity: usize,
    batches: VecDeque<(u64, Bytes)>,
}

impl ReplayBuffer {
    /// An empty buffer keeping `capacity` batches (at least one).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            capacity,
            batches: VecDeque::with_capacity(capacity.min(1 << 16)),
        }
    }

    /// Keeps batch `seq`; sequence numbers only grow.
    pub fn push(&mut self, seq: u64, payload: Bytes) {
        if self.batches.len() == self.capacity {
            self.batches.pop_front();
        }
        self.batches.push_back((seq, payload));
    }

    /// The kept batches numbered `start` or later, oldest first.
    pub fn since(&self, start: u64) -> impl Iterator<Item = &(u64, Bytes)> {
        let first = self.batches.partition_point(|(seq, _)| *seq < start);
        self.batches.range(first..)
    }

    /// Batches kept.
    pub fn len(&self) -> usize {
        self.batches.len()
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seqs(buffer: &ReplayBuffer, start: u64) -> Vec<u64> {
        buffer.since(start).map(|(seq, _)| *seq).collect()
    }

    #[test]
    fn keeps_only_the_newest_batches() {
        let mut buffer = ReplayBuffer::new(3);
        for seq in 0..5 {
            buffer.push(seq, Bytes::from(vec![seq as u8]));
        }
        assert_eq!(buffer.len(), 3);
        assert_eq!(
            seqs(&buffer, 0),
            [2, 3, 4],
            "older than the buffer: what is left"
        );
        assert_eq!(seqs(&buffer, 3), [3, 4]);
        assert_eq!(seqs(&buffer, 5), Vec::<u64>::new(), "nothing newer yet");
        let payloads: Vec<&[u8]> = buffer.since(4).map(|(_, p)| p.as_ref()).collect();
        assert_eq!(payloads, [&[4u8][..]]);
    }

    #[test]
    fn gaps_in_the_numbers_stay_gaps() {
        let mut buffer = ReplayBuffer::new(10);
        for seq in [0, 1, 3, 4] {
            buffer.push(seq, Bytes::new());
        }
        assert_eq!(seqs(&buffer, 2), [3, 4]);
    }

    #[test]
    fn a_zero_capacity_keeps_one() {
        let mut buffer = ReplayBuffer::new(0);
        assert!(buffer.is_empty());
        buffer.push(0, Bytes::new());
        buffer.push(1, Bytes::new());
        assert_eq!(seqs(&buffer, 0), [1]);
    }
}
