//! Storage for Raft: the log (`RaftLogStorage`) in segment files (`queue::log_files`), its
//! vote and purged id in RocksDB, and the queue state machine (`RaftStateMachine`) in RocksDB's
//! other column families (`queue::layout`). Log appends are synced before openraft is told
//! they are durable.

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
use rocksdb::DB;
use serde::{Deserialize, Serialize};

use super::recent::RecentEntries;
use super::{NodeId, StorageError, TypeConfig, io_err, snapshot};
use crate::queue::command::{Command, CommandResult};
use crate::queue::layout::{self, CF_RAFT, LAST_PURGED_KEY, SM_CFS, de, no_wal, ser, synced};
use crate::queue::log_files::LogFiles;
use crate::queue::state::QueueState;
use crate::queue::tx::Tx;

/// The Raft log and vote.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    log: Arc<LogFiles>,
    /// The newest entries, which apply and replication read back (`recent`).
    recent: Arc<Mutex<RecentEntries>>,
    /// The state machine's state: a purge first stores the bodies it holds from the entries
    /// purged (`queue::bodies`).
    state: Arc<Mutex<QueueState>>,
}

/// How many encoded bytes of the newest entries the log store keeps in memory.
const RECENT_BYTES: usize = 64 << 20;

impl LogStore {
    pub fn new(db: Arc<DB>, log: Arc<LogFiles>, state: Arc<Mutex<QueueState>>) -> Self {
        Self::with_recent_bytes(db, log, state, RECENT_BYTES)
    }

    /// A log store that keeps `bytes` of its newest entries in memory.
    pub fn with_recent_bytes(
        db: Arc<DB>,
        log: Arc<LogFiles>,
        state: Arc<Mutex<QueueState>>,
        bytes: usize,
    ) -> Self {
        LogStore {
            db,
            log,
            recent: Arc::new(Mutex::new(RecentEntries::new(bytes))),
            state,
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

    fn put_meta<T: Serialize>(
        &self,
        key: &str,
        v: &T,
        opts: &rocksdb::WriteOptions,
    ) -> Result<(), StorageError> {
        self.db
            .put_cf_opt(self.cf(CF_RAFT), key, ser(v), opts)
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
        let err = |e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e);
        self.log
            .read(start, end)
            .map_err(err)?
            .iter()
            .map(|(_, v)| de(v).map_err(err))
            .collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId<NodeId>> = self.get_meta(LAST_PURGED_KEY)?;
        // The log files count entries up to the purged id as gone, though a pin may keep
        // them a while.
        let last = match self.log.last_index() {
            Some(index) => Some(
                self.try_get_log_entries(index..=index)
                    .await?
                    .pop()
                    .ok_or_else(|| {
                        io_err(
                            ErrorSubject::Logs,
                            ErrorVerb::Read,
                            format!("the last entry {index} cannot be read"),
                        )
                    })?
                    .log_id,
            ),
            None => None,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last.or(last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.put_meta("vote", vote, &synced())
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
        // Saving it is optional in Raft: a start that finds an older value applies less before
        // the leader commits again. So it is not synced (its own fdatasync at each commit
        // advance cost the leader 5.7% of its CPU). It is never ahead of the log: openraft
        // 0.9 saves it only after the synced append of the entries it names has returned
        // (recheck on upgrading).
        self.put_meta("committed", &committed, &rocksdb::WriteOptions::default())
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
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        // Sized exactly up front: growing the buffer copies every body already in it.
        let encoded: u64 = entries
            .iter()
            .map(|e| bincode::serialized_size(e).expect("in-memory serialisation cannot fail"))
            .sum();
        // And a 16-byte record header each.
        let mut batch = self.log.batch(encoded as usize + entries.len() * 16);
        let sizes: Vec<usize> = entries
            .iter()
            .map(|e| {
                batch.push(e.log_id.index, |w| {
                    bincode::serialize_into(w, e).expect("in-memory serialisation cannot fail")
                })
            })
            .collect();
        // Durable before openraft counts it towards a majority.
        let res = self.log.append(&batch);
        // Nobody reads these entries before this call returns, so the order is safe.
        let mut recent = self.recent.lock().unwrap();
        match &res {
            Ok(()) => recent.appended(entries.into_iter().zip(sizes)),
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
        // Memory first: a read meanwhile finds the entries in the files or nowhere.
        self.recent.lock().unwrap().truncated(log_id.index);
        let res = self.log.truncate(log_id.index);
        if res.is_err() {
            // The files may still hold entries past the cached run.
            self.recent.lock().unwrap().clear();
        }
        res.map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        // A held body's only durable copy is its log entry: store those of the entries
        // purged first. A purge past `last_applied` comes with a snapshot being installed
        // (openraft purges up to it while the state machine installs it), which replaces every
        // body: then nothing is written, not even beside the install.
        {
            let mut st = self.state.lock().unwrap();
            let applied = st.last_applied.map_or(0, |l| l.index);
            if st.bodies.stored_to() < log_id.index && log_id.index <= applied {
                let mut tx = Tx::new(&self.db);
                st.store_bodies(&mut tx, log_id.index);
                self.db
                    .write_opt(tx.into_batch(), &no_wal())
                    .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
            }
        }
        // State machine writes skip the WAL: flush them to SST files before the log entries
        // that produced them disappear.
        let cfs: Vec<_> = SM_CFS.iter().map(|n| self.cf(n)).collect();
        self.db
            .flush_cfs_opt(&cfs, &rocksdb::FlushOptions::default())
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
        // Saved before any file goes: an open drops the files a crash left behind.
        self.put_meta(LAST_PURGED_KEY, &log_id, &synced())?;
        self.recent.lock().unwrap().purged(log_id.index);
        self.log
            .purge(log_id.index)
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }
}

/// About how many bytes the entries' commands encode to (their bodies, mostly).
fn write_size_hint(entries: &[Entry<TypeConfig>]) -> usize {
    entries
        .iter()
        .map(|e| match &e.payload {
            EntryPayload::Normal(cmd) => cmd.write_size_hint(),
            _ => 0,
        })
        .sum()
}

/// The message bodies an enqueue entry carries, by position; none for any other entry.
pub fn enqueued_bodies(stored: &[u8]) -> Result<Vec<bytes::Bytes>, String> {
    match de::<Entry<TypeConfig>>(stored)?.payload {
        EntryPayload::Normal(Command::Enqueue { messages, .. }) => {
            Ok(messages.into_iter().map(|m| m.body).collect())
        }
        _ => Ok(Vec::new()),
    }
}

/// At shutdown, once Raft has stopped: stores every held body and flushes the state machine,
/// so that the next start neither applies entries again nor reads bodies back from the log.
pub fn settle(db: &DB, state: &Mutex<QueueState>) -> Result<(), String> {
    let mut st = state.lock().unwrap();
    if QueueState::read_applied(db)?.0 != st.last_applied {
        // A failed apply left the memory ahead of the disk: the next start applies again.
        return Err("the state in memory is not the state stored".into());
    }
    let mut tx = Tx::new(db);
    st.store_bodies(&mut tx, u64::MAX);
    db.write_opt(tx.into_batch(), &no_wal())
        .map_err(|e| e.to_string())?;
    let cfs: Vec<_> = SM_CFS.iter().map(|n| layout::cf(db, n)).collect();
    db.flush_cfs_opt(&cfs, &rocksdb::FlushOptions::default())
        .map_err(|e| e.to_string())
}

/// The queue state as stored, with the bodies it held before it stopped held again: those
/// of queued messages from the entries after `stored_to` (which a purge never removes).
pub fn load_state(db: &DB, log: &LogFiles) -> Result<QueueState, String> {
    let mut st = QueueState::load(db)?;
    let applied = st.last_applied.map_or(0, |l| l.index);
    let mut from = st.bodies.stored_to() + 1;
    while from <= applied {
        // A few entries at a time: small commands lie between the enqueues.
        let to = applied.min(from + 255) + 1;
        for (index, v) in log.read(from, to)? {
            let bodies = enqueued_bodies(&v)?;
            let entry_bytes = bodies.iter().map(|b| b.len()).sum();
            for (pos, body) in bodies.into_iter().enumerate() {
                let id = (index << 20) | pos as u64;
                if st.index.msgs.contains_key(&id) {
                    st.bodies.hold(id, body, entry_bytes);
                }
            }
        }
        from = to;
    }
    Ok(st)
}

/// The queue state machine. Its records live in RocksDB; `QueueState` keeps the compact
/// scheduling index and the budget ledger in memory and is rebuilt from RocksDB at start and
/// after a snapshot.
#[derive(Clone)]
pub struct StateMachineStore {
    pub db: Arc<DB>,
    /// The log files, which hold the bodies of the newest entries (`queue::bodies`).
    log: Arc<LogFiles>,
    pub state: Arc<Mutex<QueueState>>,
    snapshot_dir: std::path::PathBuf,
}

impl StateMachineStore {
    pub fn new(db: Arc<DB>, log: Arc<LogFiles>, data_dir: &Path) -> Result<Self, String> {
        let snapshot_dir = data_dir.join("snapshots");
        if snapshot::resume_install(&db, &snapshot_dir)? {
            tracing::warn!("finished a snapshot install that was interrupted");
        }
        let t0 = std::time::Instant::now();
        let state = load_state(&db, &log)?;
        tracing::info!(
            recipients = state.queued_recipients(),
            ms = t0.elapsed().as_millis() as u64,
            "queue state loaded"
        );
        Ok(StateMachineStore {
            db,
            log,
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
        let (db, log, dir) = (self.db.clone(), self.log.clone(), self.snapshot_dir.clone());
        // The build reads the held bodies from the log: keep those entries until it is done.
        // Taken before the checkpoint, whose bodies are stored at least this far.
        let pin = log.pin(self.state.lock().unwrap().bodies.stored_to() + 1);
        let meta = tokio::task::spawn_blocking(move || {
            let meta = snapshot::build(&db, &log, &dir);
            drop(pin);
            meta
        })
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
        let size = write_size_hint(&entries);
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
        st.finish_batch(&mut tx);
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
        // Every body is stored in a snapshot: nothing is held.
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
            let err = |e| io_err(ErrorSubject::Store, ErrorVerb::Read, e);
            let db = crate::queue::layout::open_db(&dir.path().join("db"))
                .map_err(|e| err(e.to_string()))?;
            let files =
                crate::queue::layout::open_log(&db, &dir.path().join("log")).map_err(err)?;
            let sm = StateMachineStore::new(db.clone(), files.clone(), dir.path()).map_err(err)?;
            let log = LogStore::with_recent_bytes(db, files, sm.state.clone(), self.0);
            Ok((dir, log, sm))
        }
    }

    #[test]
    fn openraft_storage_suite() {
        Suite::test_all(Builder(RECENT_BYTES)).unwrap();
        Suite::test_all(Builder(0)).unwrap();
    }
}

#[cfg(test)]
mod held_bodies {
    //! Bodies held in memory (`queue::bodies`) across a purge and a restart.
    use super::*;
    use crate::queue::apply_tests::message;
    use crate::queue::layout::{CF_BODY, msg_key, open_db, open_log};
    use crate::queue::read;
    use openraft::CommittedLeaderId;

    pub(super) fn entry(index: u64) -> Entry<TypeConfig> {
        let mut message = message(0, &["r@a.test"]);
        message.body = bytes::Bytes::from(format!("Subject: {index}\r\n\r\nbody\r\n"));
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Command::Enqueue {
                now_ms: 1,
                messages: vec![message],
            }),
        }
    }

    pub(super) fn stores() -> (tempfile::TempDir, Arc<DB>, StateMachineStore, LogStore) {
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(&dir.path().join("db")).unwrap();
        let files = open_log(&db, &dir.path().join("log")).unwrap();
        let sm = StateMachineStore::new(db.clone(), files.clone(), dir.path()).unwrap();
        let log = LogStore::new(db.clone(), files, sm.state.clone());
        (dir, db, sm, log)
    }

    /// Writes entries to the log files as an append does, without openraft's callback.
    pub(super) fn write_log(log: &LogStore, entries: &[Entry<TypeConfig>]) {
        let mut batch = log.log.batch(0);
        for e in entries {
            batch.push(e.log_id.index, |w| w.extend_from_slice(&layout::ser(e)));
        }
        log.log.append(&batch).unwrap();
    }

    #[tokio::test]
    async fn a_purge_stores_the_bodies_held_from_the_entries_it_removes() {
        let (_dir, db, mut sm, mut log) = stores();
        let entries: Vec<_> = (1..=3).map(entry).collect();
        // In the log as an append leaves them, then applied.
        write_log(&log, &entries);
        sm.apply(entries).await.unwrap();
        let id = |index: u64| index << 20;
        let body = |index: u64| format!("Subject: {index}\r\n\r\nbody\r\n").into_bytes();
        let stored = |index: u64| {
            db.get_cf(layout::cf(&db, CF_BODY), msg_key(id(index)))
                .unwrap()
        };
        for i in 1..=3 {
            assert_eq!(stored(i), None, "entry {i}: held, not written");
            let b = read::body(&db, &sm.state, id(i)).unwrap().unwrap();
            assert_eq!(&b[..], &body(i)[..]);
        }

        log.purge(LogId::new(CommittedLeaderId::new(1, 1), 2))
            .await
            .unwrap();
        assert_eq!(stored(1), Some(body(1)));
        assert_eq!(stored(2), Some(body(2)));
        assert_eq!(stored(3), None);
        assert_eq!(sm.state.lock().unwrap().bodies.stored_to(), 2);

        // A restart holds entry 3's body again, from the log; the others are read from
        // RocksDB.
        let st = load_state(&db, &log.log).unwrap();
        assert_eq!(st.bodies.get(id(3)).as_deref(), Some(&body(3)[..]));
        assert_eq!(st.bodies.get(id(1)), None);
        let state = Mutex::new(st);
        for i in 1..=3 {
            let b = read::body(&db, &state, id(i)).unwrap().unwrap();
            assert_eq!(&b[..], &body(i)[..], "entry {i}");
        }

        // A clean stop stores the rest: the next start holds nothing.
        settle(&db, &state).unwrap();
        assert_eq!(stored(3), Some(body(3)));
        let st = load_state(&db, &log.log).unwrap();
        assert_eq!(st.bodies.get(id(3)), None);
        assert_eq!(st.bodies.stored_to(), 3);
    }

    #[tokio::test]
    async fn a_purge_past_the_applied_index_writes_no_body() {
        // openraft purges up to a snapshot while the state machine installs it: the old
        // state's bodies must not be written beside the install.
        let (_dir, db, mut sm, mut log) = stores();
        sm.apply((1..=3).map(entry)).await.unwrap();
        log.purge(LogId::new(CommittedLeaderId::new(1, 1), 5))
            .await
            .unwrap();
        let st = sm.state.lock().unwrap();
        assert_eq!(st.bodies.stored_to(), 0);
        for i in 1..=3u64 {
            assert!(st.bodies.get(i << 20).is_some());
            assert_eq!(
                db.get_cf(layout::cf(&db, CF_BODY), msg_key(i << 20))
                    .unwrap(),
                None
            );
        }
    }
}

#[cfg(test)]
mod committed_id {
    //! The committed log id is saved unsynced (`save_committed`): a start may find it behind.
    use super::held_bodies::{entry, stores, write_log};
    use super::*;
    use crate::queue::read;
    use openraft::{BasicNode, CommittedLeaderId, Membership};
    use std::collections::{BTreeMap, BTreeSet};

    /// A node whose saved committed id trails its log (the write that moved it on was lost)
    /// still applies every entry: here a lone voter whose vote is committed, restored as the
    /// leader of its term at start.
    #[tokio::test]
    async fn a_start_with_a_stale_committed_id_applies_every_entry() {
        let (_dir, db, sm, mut log) = stores();
        let membership = Entry::<TypeConfig> {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), 0),
            payload: EntryPayload::Membership(Membership::new(
                vec![BTreeSet::from([1])],
                BTreeMap::from([(1, BasicNode::new("127.0.0.1:1"))]),
            )),
        };
        log.save_vote(&Vote::new_committed(1, 1)).await.unwrap();
        let entries: Vec<_> = std::iter::once(membership)
            .chain((1..=3).map(entry))
            .collect();
        write_log(&log, &entries);
        // Entries 1 to 3 are in the log and none is applied; the saved id names only 1.
        let stale = LogId::new(CommittedLeaderId::new(1, 1), 1);
        log.save_committed(Some(stale)).await.unwrap();
        assert_eq!(log.read_committed().await.unwrap(), Some(stale));
        let config = openraft::Config {
            heartbeat_interval: 50,
            election_timeout_min: 150,
            election_timeout_max: 300,
            ..Default::default()
        };
        let state = sm.state.clone();
        let raft = crate::raft::Raft::new(
            1,
            Arc::new(config.validate().unwrap()),
            crate::raft::network::Network::new(1 << 20),
            log,
            sm,
        )
        .await
        .unwrap();
        raft.wait(Some(std::time::Duration::from_secs(30)))
            .applied_index_at_least(Some(3), "every entry in the log")
            .await
            .unwrap();
        assert_eq!(state.lock().unwrap().index.msgs.len(), 3);
        for index in 1..=3 {
            let b = read::body(&db, &state, index << 20).unwrap().unwrap();
            assert_eq!(
                &b[..],
                format!("Subject: {index}\r\n\r\nbody\r\n").as_bytes()
            );
        }
        raft.shutdown().await.unwrap();
    }
}
