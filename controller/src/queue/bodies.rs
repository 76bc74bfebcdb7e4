//! Bodies of recently queued messages, held in memory instead of the `body` column family.
//!
//! Most messages leave the queue within a second, and a body written to RocksDB costs every
//! replica a copy into the memtable, a flush to an SST file and a compaction. So apply holds
//! the body of each message it queues from an `Enqueue` entry; while held, the body's durable
//! copy is that Raft log entry (a message's id names its entry and position in it). A held
//! body is stored (written to the `body` column family) when it has been held for
//! `hold_entries` log entries, when more than `hold_bytes` are held, and before the log entry
//! that carries it may be purged. Finished messages are simply forgotten.
//!
//! On the leader a body shares the buffer of the gRPC request it came in, with the other
//! messages of that request: so while any body of an entry is held, all the entry's bodies
//! count towards `hold_bytes`.
//!
//! `stored_to` (kept in the state machine's meta, written in the same batch as the bodies)
//! is the log index up to which every queued message's body is stored. After a restart, the
//! bodies of queued messages from later entries are held again from the log
//! (`raft::store::load_state`); a snapshot carries every body, stored or held.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::tx::Tx;

/// The log index of the entry that queued message `id` (see `apply::enqueue`).
pub fn entry_of(id: u64) -> u64 {
    id >> 20
}

/// The message's position among the entry's messages.
pub fn position_of(id: u64) -> usize {
    (id & ((1 << 20) - 1)) as usize
}

/// How many log entries a body stays held at most.
pub const HOLD_ENTRIES: u64 = 1_000;
/// How many bytes of bodies are held at most.
pub const HOLD_BYTES: usize = 64 << 20;

#[derive(Debug)]
pub struct HeldBodies {
    held: BTreeMap<u64, Bytes>,
    /// Per entry with held bodies: the bytes of all its bodies, and how many are held.
    entries: BTreeMap<u64, (usize, usize)>,
    /// The bytes of the entries with held bodies.
    bytes: usize,
    stored_to: u64,
    pub hold_entries: u64,
    pub hold_bytes: usize,
}

impl Default for HeldBodies {
    fn default() -> Self {
        HeldBodies::new(0)
    }
}

impl HeldBodies {
    pub fn new(stored_to: u64) -> Self {
        HeldBodies {
            held: BTreeMap::new(),
            entries: BTreeMap::new(),
            bytes: 0,
            stored_to,
            hold_entries: HOLD_ENTRIES,
            hold_bytes: HOLD_BYTES,
        }
    }

    /// Up to which log index every queued message's body is stored.
    pub fn stored_to(&self) -> u64 {
        self.stored_to
    }

    /// Holds a body from an entry whose bodies take `entry_bytes` in all.
    pub fn hold(&mut self, id: u64, body: Bytes, entry_bytes: usize) {
        if self.held.insert(id, body).is_some() {
            return;
        }
        let e = self.entries.entry(entry_of(id)).or_insert_with(|| {
            self.bytes += entry_bytes;
            (entry_bytes, 0)
        });
        e.1 += 1;
    }

    fn release(&mut self, id: u64) -> Option<Bytes> {
        let body = self.held.remove(&id)?;
        let entry = entry_of(id);
        if let Some(e) = self.entries.get_mut(&entry) {
            e.1 -= 1;
            if e.1 == 0 {
                self.bytes -= e.0;
                self.entries.remove(&entry);
            }
        }
        Some(body)
    }

    pub fn get(&self, id: u64) -> Option<Bytes> {
        self.held.get(&id).cloned()
    }

    /// The message is finished: its body is no longer needed.
    pub fn forget(&mut self, id: u64) {
        self.release(id);
    }

    pub fn held_bytes(&self) -> usize {
        self.bytes
    }

    /// Every held body, for a digest taken at the same point.
    pub fn snapshot(&self) -> BTreeMap<u64, Bytes> {
        self.held.clone()
    }

    /// Stores the oldest bodies until at most `hold_bytes` stay held and none is from an
    /// entry at or below `through` (or older than `hold_entries` before `applied`), then
    /// advances `stored_to` as far as the bodies still held allow, up to `applied`.
    pub fn store(&mut self, tx: &mut Tx, through: u64, applied: u64) {
        let through = through.max(applied.saturating_sub(self.hold_entries));
        while let Some((&id, _)) = self.held.first_key_value() {
            if entry_of(id) > through && self.bytes <= self.hold_bytes {
                break;
            }
            let body = self.release(id).expect("held");
            tx.put_body(id, &body);
        }
        // A body stored above from the first held entry's lower positions stays below.
        let to = match self.held.first_key_value() {
            Some((&id, _)) => entry_of(id).saturating_sub(1),
            None => applied,
        };
        // Written with the meta (`QueueState::write_meta`).
        self.stored_to = self.stored_to.max(to);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::layout::{self, CF_BODY, open_db};

    fn id(entry: u64, pos: u64) -> u64 {
        (entry << 20) | pos
    }

    #[test]
    fn bodies_are_stored_oldest_first_past_the_byte_and_entry_limits() {
        let tmp = tempfile::tempdir().unwrap();
        let db = open_db(tmp.path()).unwrap();
        let mut h = HeldBodies::new(0);
        h.hold_bytes = 14;
        h.hold_entries = 100;
        // Entry 1 has a third message of 4 bytes, not held (a retried token, say): it counts.
        h.hold(id(1, 0), Bytes::from_static(b"aaaa"), 12);
        h.hold(id(1, 1), Bytes::from_static(b"bbbb"), 12);
        h.hold(id(2, 0), Bytes::from_static(b"cccc"), 4);
        assert_eq!(h.held_bytes(), 16);

        let mut tx = Tx::new(&db);
        h.store(&mut tx, 0, 2);
        db.write(tx.into_batch()).unwrap();
        let stored = |i| {
            db.get_cf(layout::cf(&db, CF_BODY), layout::msg_key(i))
                .unwrap()
        };
        // Over the byte limit: the oldest is stored, the rest stays held; entry 1 counts
        // while one of its bodies is held.
        assert_eq!(stored(id(1, 0)).as_deref(), Some(&b"aaaa"[..]));
        assert_eq!(stored(id(1, 1)).as_deref(), Some(&b"bbbb"[..]));
        assert_eq!(stored(id(2, 0)), None);
        assert_eq!(h.get(id(1, 0)), None);
        assert_eq!(h.get(id(2, 0)).as_deref(), Some(&b"cccc"[..]));
        assert_eq!(h.held_bytes(), 4);
        assert_eq!(h.stored_to(), 1);

        // A finished message is forgotten, never stored.
        h.hold(id(2, 1), Bytes::from_static(b"dd"), 4);
        h.forget(id(2, 1));
        let mut tx = Tx::new(&db);
        h.store(&mut tx, 0, 2);
        db.write(tx.into_batch()).unwrap();
        assert_eq!(stored(id(2, 1)), None);
        assert_eq!(h.get(id(2, 1)), None);
        // Entry 2 still has a held body: nothing is stored through it yet.
        assert_eq!(h.stored_to(), 1);

        // Held for more than `hold_entries` entries: stored.
        let mut tx = Tx::new(&db);
        h.store(&mut tx, 0, 102);
        db.write(tx.into_batch()).unwrap();
        assert_eq!(stored(id(2, 0)).as_deref(), Some(&b"cccc"[..]));
        assert_eq!(h.stored_to(), 102);
        assert_eq!(h.held_bytes(), 0);

        // Before a purge: everything through the purged index.
        h.hold(id(103, 0), Bytes::from_static(b"d"), 1);
        h.hold(id(104, 0), Bytes::from_static(b"e"), 1);
        let mut tx = Tx::new(&db);
        h.store(&mut tx, 103, 104);
        db.write(tx.into_batch()).unwrap();
        assert_eq!(stored(id(103, 0)).as_deref(), Some(&b"d"[..]));
        assert_eq!(stored(id(104, 0)), None);
        assert_eq!(h.stored_to(), 103);
    }
}
