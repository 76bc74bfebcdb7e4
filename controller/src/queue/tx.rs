//! One apply batch: every write of a group of log entries goes into one RocksDB write batch,
//! and reads see the batch's own writes first (message records: `QueueState::read`). A read
//! error is a storage error that fails the apply; it is never taken for "the message is gone".

use std::collections::HashMap;

use rocksdb::{DB, WriteBatch};

use super::layout::{self, CF_ACCT, CF_BODY, CF_DEDUP, CF_LEDGER, CF_MSG, CF_SM_META, CF_SUPPRESS};
use super::state::{LeaseRecord, MsgRecord};

#[derive(Debug, Clone, PartialEq)]
pub struct StoreError(pub String);

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<rocksdb::Error> for StoreError {
    fn from(e: rocksdb::Error) -> Self {
        StoreError(format!("RocksDB: {e}"))
    }
}

pub struct Tx<'a> {
    pub db: &'a DB,
    pub batch: WriteBatch,
    /// Tokens remembered (Some) or forgotten (None) in this batch.
    tokens: HashMap<u128, Option<u64>>,
    /// Suppression entries written (Some) or deleted (None) in this batch, by key.
    suppressions: HashMap<Vec<u8>, Option<Vec<u8>>>,
}

impl<'a> Tx<'a> {
    pub fn new(db: &'a DB) -> Self {
        Self::with_capacity(db, 0)
    }

    /// A transaction whose batch has room for `bytes` before it grows.
    pub fn with_capacity(db: &'a DB, bytes: usize) -> Self {
        Tx {
            db,
            batch: WriteBatch::with_capacity_bytes(bytes),
            tokens: HashMap::new(),
            suppressions: HashMap::new(),
        }
    }

    /// A record as stored, without this batch's writes (`QueueState::read` adds them).
    pub fn read_stored_msg(&self, id: u64) -> Result<Option<MsgRecord>, StoreError> {
        match self
            .db
            .get_cf(layout::cf(self.db, CF_MSG), layout::msg_key(id))?
        {
            Some(b) => layout::de(&b)
                .map(Some)
                .map_err(|e| StoreError(format!("message {id:016x}: {e}"))),
            None => Ok(None),
        }
    }

    /// Writes a record; returns its encoded size.
    pub fn put_msg(&mut self, id: u64, rec: &MsgRecord) -> usize {
        let bytes = layout::ser(rec);
        let n = bytes.len();
        self.batch
            .put_cf(layout::cf(self.db, CF_MSG), layout::msg_key(id), bytes);
        n
    }

    /// Deletes a message's record and body.
    pub fn delete_msg(&mut self, id: u64) {
        self.batch
            .delete_cf(layout::cf(self.db, CF_MSG), layout::msg_key(id));
        self.batch
            .delete_cf(layout::cf(self.db, CF_BODY), layout::msg_key(id));
    }

    pub fn put_body(&mut self, id: u64, body: &[u8]) {
        self.batch
            .put_cf(layout::cf(self.db, CF_BODY), layout::msg_key(id), body);
    }

    pub fn put_bodies_stored_to(&mut self, index: u64) {
        self.batch.put_cf(
            layout::cf(self.db, CF_SM_META),
            layout::BODIES_STORED_KEY,
            index.to_be_bytes(),
        );
    }

    pub fn put_lease(&mut self, id: u64, l: &LeaseRecord) {
        self.batch.put_cf(
            layout::cf(self.db, CF_SM_META),
            layout::lease_key(id),
            layout::ser(l),
        );
    }

    pub fn delete_lease(&mut self, id: u64) {
        self.batch
            .delete_cf(layout::cf(self.db, CF_SM_META), layout::lease_key(id));
    }

    pub fn put_meta(&mut self, bytes: Vec<u8>) {
        self.batch
            .put_cf(layout::cf(self.db, CF_SM_META), layout::META_KEY, bytes);
    }

    pub fn put_acct(&mut self, seq: u64, bytes: Vec<u8>) {
        self.batch
            .put_cf(layout::cf(self.db, CF_ACCT), layout::acct_key(seq), bytes);
    }

    pub fn put_suppression(&mut self, scope: &str, address: &str, bytes: Vec<u8>) {
        let key = layout::suppress_key(scope, address);
        self.batch
            .put_cf(layout::cf(self.db, CF_SUPPRESS), &key, &bytes);
        self.suppressions.insert(key, Some(bytes));
    }

    pub fn delete_suppression(&mut self, scope: &str, address: &str) {
        let key = layout::suppress_key(scope, address);
        self.batch.delete_cf(layout::cf(self.db, CF_SUPPRESS), &key);
        self.suppressions.insert(key, None);
    }

    /// A stored suppression entry (this batch's writes first).
    pub fn read_suppression(
        &self,
        scope: &str,
        address: &str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let key = layout::suppress_key(scope, address);
        if let Some(v) = self.suppressions.get(&key) {
            return Ok(v.clone());
        }
        Ok(self.db.get_cf(layout::cf(self.db, CF_SUPPRESS), &key)?)
    }

    pub fn put_suppress_change(&mut self, seq: u64, bytes: Vec<u8>) {
        self.batch.put_cf(
            layout::cf(self.db, CF_SUPPRESS),
            layout::suppress_change_key(seq),
            bytes,
        );
    }

    /// Drops suppression changes below `seq`.
    pub fn delete_suppress_changes_before(&mut self, seq: u64) {
        self.batch.delete_range_cf(
            layout::cf(self.db, CF_SUPPRESS),
            layout::suppress_change_key(0),
            layout::suppress_change_key(seq),
        );
    }

    /// Drops accounting rows below `seq`.
    pub fn delete_acct_before(&mut self, seq: u64) {
        self.batch.delete_range_cf(
            layout::cf(self.db, CF_ACCT),
            layout::acct_key(0),
            layout::acct_key(seq),
        );
    }

    /// The message id an idempotency token was given, if it is remembered.
    pub fn dedup_get(&self, token: u128) -> Result<Option<u64>, StoreError> {
        if let Some(&id) = self.tokens.get(&token) {
            return Ok(id);
        }
        match self
            .db
            .get_cf(layout::cf(self.db, CF_DEDUP), layout::dedup_key(token))?
        {
            Some(b) => Ok(Some(layout::de::<(u64, u64)>(&b).map_err(StoreError)?.0)),
            None => Ok(None),
        }
    }

    pub fn dedup_put(&mut self, token: u128, id: u64, time_ms: u64) {
        self.tokens.insert(token, Some(id));
        let cf = layout::cf(self.db, CF_DEDUP);
        self.batch
            .put_cf(cf, layout::dedup_key(token), layout::ser(&(id, time_ms)));
        self.batch
            .put_cf(cf, layout::dedup_time_key(time_ms, token), b"");
    }

    /// Forgets tokens remembered before `cutoff_ms` (log time).
    pub fn dedup_forget_before(&mut self, cutoff_ms: u64) -> Result<(), StoreError> {
        let cf = layout::cf(self.db, CF_DEDUP);
        let from = layout::dedup_time_key(0, 0);
        let to = layout::dedup_time_key(cutoff_ms, 0);
        let mut opts = rocksdb::ReadOptions::default();
        opts.set_iterate_upper_bound(to.clone());
        let it = self.db.iterator_cf_opt(
            cf,
            opts,
            rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward),
        );
        for kv in it {
            let (k, _) = kv?;
            if let Some(token) = layout::token_of_time_key(&k) {
                self.batch.delete_cf(cf, layout::dedup_key(token));
                self.tokens.entry(token).or_insert(None);
            }
        }
        self.batch.delete_range_cf(cf, from, to);
        Ok(())
    }

    pub fn put_ledger(&mut self, key: Vec<u8>, count: u64) {
        self.batch
            .put_cf(layout::cf(self.db, CF_LEDGER), key, count.to_be_bytes());
    }

    pub fn delete_ledger_range(&mut self, (from, to): (Vec<u8>, Vec<u8>)) {
        self.batch
            .delete_range_cf(layout::cf(self.db, CF_LEDGER), from, to);
    }

    pub fn into_batch(self) -> WriteBatch {
        self.batch
    }
}
