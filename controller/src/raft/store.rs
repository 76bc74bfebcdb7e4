//! RocksDB storage for Raft: the log and vote (`RaftLogStorage`) and the queue state machine
//! (`RaftStateMachine`), in separate column families of one database (`queue::layout`). Log
//! appends are written with a synced WAL before openraft is told they are durable.

// openraft's StorageError is large by design; it is the trait's error type.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogReader,
    RaftSnapshotBuilder, SnapshotMeta, StoredMembership, Vote,
};
use rocksdb::{DB, IteratorMode, WriteBatch};
use serde::{Deserialize, Serialize};

use super::recent::RecentEntries;
use super::{NodeId, StorageError, TypeConfig, io_err, snapshot};
use crate::queue::command::CommandResult;
use crate::queue::layout::{self, CF_LOG, CF_RAFT, SM_CFS, de, no_wal, ser, synced};
use crate::queue::state::QueueState;
use crate::queue::tx::Tx;

/// The Raft log and vote.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    /// The newest entries, which apply and replication read back (`recent`).
    recent: Arc<Mutex<RecentEntries>>,
}

/// How many encoded bytes of the newest entries the log store keeps in memory.
const RECENT_BYTES: usize = 64 << 20;

impl LogStore {
    pub fn new(db: Arc<DB>) -> Self {
        Self::with_recent_bytes(db, RECENT_BYTES)
    }

    /// A log store that keeps `bytes` of its newest entries in memory.
    pub fn with_recent_bytes(db: Arc<DB>, bytes: usize) -> Self {
        LogStore {
            db,
            recent: Arc::new(Mutex::new(RecentEntries::new(bytes))),
        }
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        layout::cf(&self.db, name)
    }

    /// The committed log id as last saved (for status; openraft keeps the live one).
    pub fn committed(&self) -> Option<LogId<NodeId>> {
        self.get_meta::<Option<LogId<NodeId>>>("committed")
            .ok()
            .flatten()
            .flatten()
    }

    fn get_meta<T: for<'a> Deserialize<'a>>(&self, key: &str) -> Result<Option<T>, StorageError> {
        let v = self
            .db
            .get_cf(self.cf(CF_RAFT), key)
            .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Read, e))?;
        v.map(|b| de(&b).map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Read, e)))
            .transpose()
    }

    fn put_meta<T: Serialize>(&self, key: &str, v: &T) -> Result<(), StorageError> {
        self.db
            .put_cf_opt(self.cf(CF_RAFT), key, ser(v), &synced())
            .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Write, e))
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        use std::ops::Bound;
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => e.saturating_add(1),
            Bound::Excluded(&e) => e,
            Bound::Unbounded => u64::MAX,
        };
        if let Some(entries) = self.recent.lock().unwrap().get(start, end) {
            return Ok(entries);
        }
        let mut out = Vec::new();
        // A raw iterator decodes each entry from RocksDB's own buffer, without first copying
        // every (body-sized) value into a boxed slice.
        let mut it = self.db.raw_iterator_cf(self.cf(CF_LOG));
        it.seek(start.to_be_bytes());
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let idx = u64::from_be_bytes(k[..8].try_into().unwrap());
            if !range.contains(&idx) {
                break;
            }
            out.push(de(v).map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?);
            it.next();
        }
        it.status()
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId<NodeId>> = self.get_meta("last_purged")?;
        let last = self
            .db
            .iterator_cf(self.cf(CF_LOG), IteratorMode::End)
            .next()
            .transpose()
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?
            .map(|(_, v)| de::<Entry<TypeConfig>>(&v).map(|e| e.log_id))
            .transpose()
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
        // Never behind what was purged (entries below it may linger until removed).
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last.or(last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.put_meta("vote", vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.get_meta("vote")
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError> {
        crate::metrics::METRICS
            .commit_index
            .set(committed.map_or(0, |l| l.index) as i64);
        self.put_meta("committed", &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError> {
        Ok(self
            .get_meta::<Option<LogId<NodeId>>>("committed")?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let cf = self.cf(CF_LOG);
        let encoded: Vec<(Entry<TypeConfig>, Vec<u8>)> = entries
            .into_iter()
            .map(|e| {
                let v = ser(&e);
                (e, v)
            })
            .collect();
        // Sized up front: growing the batch copies every body already in it.
        let size = encoded.iter().map(|(_, v)| v.len() + 32).sum::<usize>() + 64;
        let mut batch = WriteBatch::with_capacity_bytes(size);
        for (e, value) in &encoded {
            batch.put_cf(cf, e.log_id.index.to_be_bytes(), value);
        }
        // Durable before openraft counts it towards a majority.
        let res = self.db.write_opt(batch, &synced());
        // Nobody reads these entries before this call returns, so the order is safe.
        let mut recent = self.recent.lock().unwrap();
        match &res {
            Ok(()) => recent.appended(encoded.into_iter().map(|(e, v)| (e, v.len()))),
            Err(_) => recent.clear(),
        }
        drop(recent);
        callback.log_io_completed(
            res.as_ref()
                .map(|_| ())
                .map_err(|e| std::io::Error::other(e.to_string())),
        );
        res.map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, e))
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        // Memory first: a read meanwhile finds the entries in RocksDB or nowhere.
        self.recent.lock().unwrap().truncated(log_id.index);
        let cf = self.cf(CF_LOG);
        let res = self
            .db
            .delete_range_cf_opt(
                cf,
                log_id.index.to_be_bytes(),
                u64::MAX.to_be_bytes(),
                &synced(),
            )
            // delete_range excludes the end key.
            .and_then(|()| self.db.delete_cf_opt(cf, u64::MAX.to_be_bytes(), &synced()));
        if res.is_err() {
            // RocksDB may still hold entries past the cached run.
            self.recent.lock().unwrap().clear();
        }
        res.map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        // State machine writes skip the WAL: flush them to SST files before the log entries
        // that produced them disappear.
        let cfs: Vec<_> = SM_CFS.iter().map(|n| self.cf(n)).collect();
        self.db
            .flush_cfs_opt(&cfs, &rocksdb::FlushOptions::default())
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
        self.put_meta("last_purged", &log_id)?;
        self.recent.lock().unwrap().purged(log_id.index);
        self.db
            .delete_range_cf_opt(
                self.cf(CF_LOG),
                0u64.to_be_bytes(),
                (log_id.index + 1).to_be_bytes(),
                &synced(),
            )
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }
}

/// The queue state machine. Its records live in RocksDB; `QueueState` keeps the compact
/// scheduling index and the budget ledger in memory and is rebuilt from RocksDB at start and
/// after a snapshot.
#[derive(Clone)]
pub struct StateMachineStore {
    pub db: Arc<DB>,
    pub state: Arc<Mutex<QueueState>>,
    snapshot_dir: std::path::PathBuf,
}

impl StateMachineStore {
    pub fn new(db: Arc<DB>, data_dir: &Path) -> Result<Self, String> {
        let snapshot_dir = data_dir.join("snapshots");
        if snapshot::resume_install(&db, &snapshot_dir)? {
            tracing::warn!("finished a snapshot install that was interrupted");
        }
        let t0 = std::time::Instant::now();
        let state = QueueState::load(&db)?;
        tracing::info!(
            recipients = state.queued_recipients(),
            ms = t0.elapsed().as_millis() as u64,
            "queue state loaded"
        );
        Ok(StateMachineStore {
            db,
            state: Arc::new(Mutex::new(state)),
            snapshot_dir,
        })
    }

    async fn open_current(
        &self,
        meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    ) -> Result<Snapshot<TypeConfig>, StorageError> {
        let f = tokio::fs::File::open(self.snapshot_dir.join(snapshot::CURRENT))
            .await
            .map_err(|e| {
                io_err(
                    ErrorSubject::Snapshot(Some(meta.signature())),
                    ErrorVerb::Read,
                    e,
                )
            })?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(f),
        })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (db, dir) = (self.db.clone(), self.snapshot_dir.clone());
        let meta = tokio::task::spawn_blocking(move || snapshot::build(&db, &dir))
            .await
            .map_err(|e| io_err(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))?
            .map_err(|e| io_err(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))?;
        self.open_current(meta).await
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<
        (
            Option<LogId<NodeId>>,
            StoredMembership<NodeId, openraft::BasicNode>,
        ),
        StorageError,
    > {
        let st = self.state.lock().unwrap();
        Ok((st.last_applied, st.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let err = |e: crate::queue::tx::StoreError| {
            io_err(ErrorSubject::StateMachine, ErrorVerb::Write, e)
        };
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let size = entries
            .iter()
            .map(|e| match &e.payload {
                EntryPayload::Normal(cmd) => cmd.write_size_hint(),
                _ => 0,
            })
            .sum::<usize>();
        let mut st = self.state.lock().unwrap();
        // Room for the bodies and the records beside them: a batch that grows copies every
        // body already in it.
        let mut tx = Tx::with_capacity(&self.db, size + 4096);
        let mut out = Vec::new();
        for e in entries {
            let r = match e.payload {
                EntryPayload::Blank => CommandResult::None,
                // A storage error here is fatal for this node: openraft stops, and the
                // controller exits so that a restart rebuilds the state from disk.
                EntryPayload::Normal(cmd) => st.apply(&mut tx, e.log_id.index, cmd).map_err(err)?,
                EntryPayload::Membership(m) => {
                    st.membership = StoredMembership::new(Some(e.log_id), m);
                    CommandResult::None
                }
            };
            st.last_applied = Some(e.log_id);
            out.push(r);
        }
        st.write_meta(&mut tx);
        // No WAL: the Raft log is the state machine's log. The database flushes all column
        // families together, so after a crash openraft applies again from a consistent
        // `last_applied`, and apply is deterministic.
        self.db
            .write_opt(tx.into_batch(), &no_wal())
            .map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Write, e))?;
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        let err = |e| io_err(ErrorSubject::Snapshot(None), ErrorVerb::Write, e);
        std::fs::create_dir_all(&self.snapshot_dir).map_err(err)?;
        // Unlinked at once: the open handle keeps the data, and an aborted transfer leaves
        // nothing behind.
        let path = self
            .snapshot_dir
            .join(format!("receiving-{:016x}", fastrand::u64(..)));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(err)?;
        std::fs::remove_file(&path).map_err(err)?;
        Ok(Box::new(tokio::fs::File::from_std(f)))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        let err = |e: String| {
            io_err(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Write,
                e,
            )
        };
        let mut received = snapshot.into_std().await;
        let (db, dir) = (self.db.clone(), self.snapshot_dir.clone());
        tokio::task::spawn_blocking(move || snapshot::install_received(&db, &dir, &mut received))
            .await
            .map_err(|e| err(e.to_string()))?
            .map_err(err)?;
        let mut fresh = QueueState::load(&self.db).map_err(err)?;
        fresh.last_applied = meta.last_log_id;
        fresh.membership = meta.last_membership.clone();
        let mut tx = Tx::new(&self.db);
        fresh.write_meta(&mut tx);
        self.db
            .write_opt(tx.into_batch(), &synced())
            .map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Write, e))?;
        *self.state.lock().unwrap() = fresh;
        tracing::info!(id = %meta.snapshot_id, last = ?meta.last_log_id, "installed a snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        match snapshot::current_meta(&self.snapshot_dir)
            .map_err(|e| io_err(ErrorSubject::Snapshot(None), ErrorVerb::Read, e))?
        {
            Some(meta) => self.open_current(meta).await.map(Some),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod conformance {
    //! openraft's storage test suite, run on the RocksDB log store and state machine.
    use super::*;
    use openraft::testing::{StoreBuilder, Suite};

    /// The bytes of recent entries the log store keeps: the default, and 0 (only the newest
    /// entry), so that reads are served both from memory and from RocksDB.
    struct Builder(usize);

    impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for Builder {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
            let dir = tempfile::tempdir().expect("temp dir");
            let db = crate::queue::layout::open_db(&dir.path().join("db"))
                .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Read, e))?;
            let sm = StateMachineStore::new(db.clone(), dir.path())
                .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Read, e))?;
            Ok((dir, LogStore::with_recent_bytes(db, self.0), sm))
        }
    }

    #[test]
    fn openraft_storage_suite() {
        Suite::test_all(Builder(RECENT_BYTES)).unwrap();
        Suite::test_all(Builder(0)).unwrap();
    }
}
