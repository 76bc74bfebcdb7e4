//! The message records apply wrote last, kept in memory: a message is enqueued, leased and
//! reported within moments, and each step read its record back from RocksDB and decoded it
//! (a tenth of a follower's CPU). Every record write goes through here as well as into the
//! batch, so the cache never holds anything but the latest value. Past `limit` bytes it
//! forgets the oldest, only at the end of a batch (`finish_batch`, which the batch's write
//! follows under the same lock), so that a record it forgot is read back from RocksDB.

use std::collections::{HashMap, HashSet, VecDeque};

use super::state::MsgRecord;

/// Bytes of encoded records kept.
pub const RECORD_CACHE_BYTES: usize = 16 << 20;

struct Cached {
    /// None: deleted.
    rec: Option<MsgRecord>,
    seq: u64,
    bytes: usize,
}

pub struct RecordCache {
    map: HashMap<u64, Cached>,
    /// (seq, id) by age; an id written again has a newer seq, and the older pair is skipped.
    order: VecDeque<(u64, u64)>,
    /// Ids written in the current batch: their stored value is older until it is written.
    batch: HashSet<u64>,
    next_seq: u64,
    bytes: usize,
    limit: usize,
}

impl Default for RecordCache {
    fn default() -> Self {
        Self::with_limit(RECORD_CACHE_BYTES)
    }
}

impl std::fmt::Debug for RecordCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RecordCache({} records, {} bytes)",
            self.map.len(),
            self.bytes
        )
    }
}

impl RecordCache {
    pub fn with_limit(limit: usize) -> Self {
        RecordCache {
            map: HashMap::new(),
            order: VecDeque::new(),
            batch: HashSet::new(),
            next_seq: 0,
            bytes: 0,
            limit,
        }
    }

    /// A record written (Some) or deleted (None) in the current batch; `bytes` is its size.
    pub fn put(&mut self, id: u64, rec: Option<MsgRecord>, bytes: usize) {
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some(old) = self.map.insert(id, Cached { rec, seq, bytes }) {
            self.bytes -= old.bytes;
        }
        self.bytes += bytes;
        self.order.push_back((seq, id));
        self.batch.insert(id);
    }

    /// The latest record of `id` if held: `Some(None)` when it was deleted. A record not
    /// written in this batch is handed over (the store holds the same), one written in this
    /// batch is copied (the store does not hold it yet).
    pub fn get(&mut self, id: u64) -> Option<Option<MsgRecord>> {
        if self.batch.contains(&id) {
            return self.map.get(&id).map(|c| c.rec.clone());
        }
        let c = self.map.remove(&id)?;
        self.bytes -= c.bytes;
        Some(c.rec)
    }

    /// The batch is about to be written: forget the oldest records over the limit.
    pub fn end_batch(&mut self) {
        self.batch.clear();
        while self.bytes > self.limit || self.order.len() > 2 * self.map.len() + 1024 {
            let Some((seq, id)) = self.order.pop_front() else {
                break;
            };
            if self.map.get(&id).is_some_and(|c| c.seq == seq)
                && let Some(c) = self.map.remove(&id)
            {
                self.bytes -= c.bytes;
            }
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(from: &str) -> MsgRecord {
        MsgRecord {
            mail_from: from.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_batch_keeps_its_writes_and_the_limit_applies_between_batches() {
        let mut c = RecordCache::with_limit(100);
        c.put(1, Some(rec("a")), 60);
        c.put(2, Some(rec("b")), 60);
        c.put(3, None, 1);
        // Within the batch everything is held, over the limit or not, and reads copy.
        assert_eq!(c.get(1), Some(Some(rec("a"))));
        assert_eq!(c.get(1), Some(Some(rec("a"))));
        assert_eq!(c.get(3), Some(None));
        c.end_batch();
        // The oldest went; the rest is handed over once, then read from the store.
        assert_eq!(c.get(1), None);
        assert_eq!(c.get(2), Some(Some(rec("b"))));
        assert_eq!(c.get(2), None);
        assert_eq!(c.get(3), Some(None));
        assert!(c.is_empty());
    }

    #[test]
    fn a_record_written_again_is_not_forgotten_for_its_older_write() {
        let mut c = RecordCache::with_limit(100);
        c.put(1, Some(rec("old")), 40);
        c.put(2, Some(rec("b")), 40);
        c.put(1, Some(rec("new")), 40);
        c.put(3, Some(rec("c")), 40);
        c.end_batch();
        // 120 bytes over 100: id 2 is the oldest live write; 1's first write is skipped.
        assert_eq!(c.len(), 2);
        assert_eq!(c.get(2), None);
        assert_eq!(c.get(1), Some(Some(rec("new"))));
    }
}
