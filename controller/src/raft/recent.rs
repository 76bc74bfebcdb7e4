//! The last appended Raft entries, kept in memory by the log store. Every entry is read back
//! soon after it is appended: by apply on every node, and on the leader once more for each
//! follower it is sent to. Serving those reads from here spares decoding each body again from
//! RocksDB; bodies are `Bytes`, so a clone shares them.
//!
//! Invariant: the entries held are a contiguous run that ends at the last entry in the log
//! and equals what RocksDB holds for those indexes. Appends, truncations and purges reach the
//! store and this run together (a failed write empties the run), so a read of indexes from
//! the run's first onward can be answered from here alone. This relies on openraft
//! truncating the log before it appends over a conflict, as its storage contract requires.
//!
//! On the leader a body shares the buffer of the gRPC request it came in, so the memory kept
//! can exceed the limit, up to about the size of the requests those entries came from.

use std::collections::VecDeque;

use openraft::Entry;

use super::TypeConfig;

pub struct RecentEntries {
    /// Each entry with its encoded size.
    entries: VecDeque<(Entry<TypeConfig>, usize)>,
    bytes: usize,
    limit: usize,
}

/// At most this many entries, whatever their size: small commands (leases, outcomes) take
/// several times their encoded size in memory, and reading them back from RocksDB is cheap.
/// Apply and replication read within the last few hundred entries.
const MAX_ENTRIES: usize = 512;

impl RecentEntries {
    /// Holds entries up to `limit` encoded bytes (at least the newest entry).
    pub fn new(limit: usize) -> Self {
        RecentEntries {
            entries: VecDeque::new(),
            bytes: 0,
            limit,
        }
    }

    fn first(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index)
    }

    fn last(&self) -> Option<u64> {
        self.entries.back().map(|(e, _)| e.log_id.index)
    }

    /// After `entries` (with their encoded sizes) reached the log: they replace any held
    /// entries from their first index on.
    pub fn appended(&mut self, entries: impl IntoIterator<Item = (Entry<TypeConfig>, usize)>) {
        for (e, size) in entries {
            let index = e.log_id.index;
            self.truncated(index);
            if self.last().is_some_and(|last| last + 1 != index) {
                self.clear();
            }
            self.bytes += size;
            self.entries.push_back((e, size));
        }
        while (self.bytes > self.limit || self.entries.len() > MAX_ENTRIES)
            && self.entries.len() > 1
        {
            let (_, size) = self.entries.pop_front().expect("more than one entry");
            self.bytes -= size;
        }
    }

    /// After the log dropped every entry from `index` on.
    pub fn truncated(&mut self, index: u64) {
        while self.last().is_some_and(|last| last >= index) {
            let (_, size) = self.entries.pop_back().expect("an entry");
            self.bytes -= size;
        }
    }

    /// After the log dropped every entry up to and including `index`.
    pub fn purged(&mut self, index: u64) {
        while self.first().is_some_and(|first| first <= index) {
            let (_, size) = self.entries.pop_front().expect("an entry");
            self.bytes -= size;
        }
    }

    /// Forgets everything (the log's state is unknown after a failed write).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// The entries with indexes in `start..end`, if the run begins at or before `start` (it
    /// reaches the end of the log, so nothing past it is missing); `None` sends the read to
    /// RocksDB.
    pub fn get(&self, start: u64, end: u64) -> Option<Vec<Entry<TypeConfig>>> {
        let first = self.first()?;
        if start < first {
            return None;
        }
        let skip = ((start - first) as usize).min(self.entries.len());
        Some(
            self.entries
                .range(skip..)
                .take_while(|(e, _)| e.log_id.index < end)
                .map(|(e, _)| e.clone())
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload, LogId};

    fn entry(term: u64, index: u64) -> (Entry<TypeConfig>, usize) {
        (
            Entry {
                log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
                payload: EntryPayload::Blank,
            },
            100,
        )
    }

    fn indexes(v: Option<Vec<Entry<TypeConfig>>>) -> Option<Vec<(u64, u64)>> {
        v.map(|v| {
            v.iter()
                .map(|e| (e.log_id.leader_id.term, e.log_id.index))
                .collect()
        })
    }

    #[test]
    fn follows_appends_truncations_and_purges() {
        let mut r = RecentEntries::new(1000);
        assert_eq!(indexes(r.get(1, 10)), None);
        r.appended((1..=5).map(|i| entry(1, i)));
        assert_eq!(indexes(r.get(2, 4)), Some(vec![(1, 2), (1, 3)]));
        assert_eq!(indexes(r.get(4, u64::MAX)), Some(vec![(1, 4), (1, 5)]));
        assert_eq!(indexes(r.get(9, u64::MAX)), Some(vec![]));
        // A new leader overwrites from 4: the old 4 and 5 are gone.
        r.truncated(4);
        r.appended([entry(2, 4)]);
        assert_eq!(indexes(r.get(3, u64::MAX)), Some(vec![(1, 3), (2, 4)]));
        // An append that overlaps without a truncation replaces the overlap too.
        r.appended([entry(3, 3), entry(3, 4)]);
        assert_eq!(
            indexes(r.get(1, u64::MAX)),
            Some(vec![(1, 1), (1, 2), (3, 3), (3, 4)])
        );
        r.purged(2);
        assert_eq!(indexes(r.get(2, u64::MAX)), None, "2 is purged");
        assert_eq!(indexes(r.get(3, 4)), Some(vec![(3, 3)]));
        // A gap (cannot happen through openraft) drops the run rather than serve it.
        r.appended([entry(3, 9)]);
        assert_eq!(indexes(r.get(3, u64::MAX)), None);
        assert_eq!(indexes(r.get(9, u64::MAX)), Some(vec![(3, 9)]));
    }

    #[test]
    fn keeps_at_most_the_limit_and_always_the_newest() {
        let mut r = RecentEntries::new(350);
        r.appended((1..=10).map(|i| entry(1, i)));
        assert_eq!(indexes(r.get(7, u64::MAX)), None, "7 was dropped for room");
        assert_eq!(
            indexes(r.get(8, u64::MAX)),
            Some(vec![(1, 8), (1, 9), (1, 10)])
        );
        let mut many = RecentEntries::new(usize::MAX);
        many.appended((1..=MAX_ENTRIES as u64 + 10).map(|i| entry(1, i)));
        assert_eq!(indexes(many.get(10, u64::MAX)), None, "past the entry cap");
        assert_eq!(many.get(11, u64::MAX).map(|v| v.len()), Some(MAX_ENTRIES));
        let mut one = RecentEntries::new(10);
        one.appended([entry(1, 1), entry(1, 2)]);
        assert_eq!(indexes(one.get(2, u64::MAX)), Some(vec![(1, 2)]));
        assert_eq!(indexes(one.get(1, u64::MAX)), None);
    }
}
