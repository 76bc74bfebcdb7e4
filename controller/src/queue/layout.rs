//! The storage layout: one RocksDB database with the Raft vote's column family and the queue
//! state machine's. Only this module names column families and builds keys.
//!
//! The Raft log itself is kept in segment files beside the database (`log_files`).
//!
//! Crash story: log appends are synced. State-machine writes skip the WAL
//! (the Raft log is their log) and the database flushes every column family together
//! (`atomic_flush`), so what reaches disk is always one consistent prefix of the applied log:
//! `last_applied` is never on disk ahead of the records it covers, and after a crash openraft
//! applies again from there (`layout_tests` kills a writer mid-run to check this).
//!
//! Message bodies from enqueue entries are not written at apply but held in memory
//! (`bodies`): until stored in `CF_BODY`, the log entry is their only copy on disk.

use std::path::Path;
use std::sync::Arc;

use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, DB, Options, WriteOptions};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::log_files::{Batch, LogFiles, direct_io_works, sync_dir};

/// Raft log entries by index, as kept before the log moved to its own files (`log_files`):
/// emptied at the first start with them.
pub const CF_LOG: &str = "log";
/// Raft vote, committed and purged ids.
pub const CF_RAFT: &str = "raft_meta";
/// In `CF_RAFT`: the last purged log id, saved before the purge removes any log file.
pub const LAST_PURGED_KEY: &str = "last_purged";
/// The state machine's own meta (`meta`), its lease records (`lease/<id>`) and how far
/// bodies are stored (`bodies_stored_to`).
pub const CF_SM_META: &str = "sm_meta";
/// Message records (envelope and per-recipient state) by message id.
pub const CF_MSG: &str = "msg";
/// Stored message bodies by message id (recent ones are held in memory, `bodies`).
pub const CF_BODY: &str = "body";
/// Accounting rows by sequence number.
pub const CF_ACCT: &str = "acct";
/// Enqueue idempotency tokens: `k` + token -> (id, time), `t` + time + token -> ().
pub const CF_DEDUP: &str = "dedup";
/// Budget usage buckets (see `ledger`).
pub const CF_LEDGER: &str = "ledger";

/// The suppression list: `e` + scope + 0 + address -> entry, and its change log
/// `c` + seq -> change, which ingress nodes follow.
pub const CF_SUPPRESS: &str = "suppress";

/// Column families that make up the state machine (and so a snapshot). Append only: a
/// snapshot names them by position.
pub const SM_CFS: [&str; 7] = [
    CF_SM_META,
    CF_MSG,
    CF_BODY,
    CF_ACCT,
    CF_DEDUP,
    CF_LEDGER,
    CF_SUPPRESS,
];
pub const ALL_CFS: [&str; 9] = [
    CF_LOG,
    CF_RAFT,
    CF_SM_META,
    CF_MSG,
    CF_BODY,
    CF_ACCT,
    CF_DEDUP,
    CF_LEDGER,
    CF_SUPPRESS,
];
/// Column families whose digest compares replicas (everything the log decides). Bodies are
/// hashed with their message, wherever they are kept (`state::digest`).
pub const DIGEST_CFS: [&str; 6] = [
    CF_SM_META,
    CF_MSG,
    CF_ACCT,
    CF_DEDUP,
    CF_LEDGER,
    CF_SUPPRESS,
];

pub const META_KEY: &[u8] = b"meta";
/// Up to which log index every queued message's body is in `CF_BODY` (`bodies`): local to
/// each replica, so outside the digest.
pub const BODIES_STORED_KEY: &[u8] = b"bodies_stored_to";
const LEASE_PREFIX: &[u8] = b"lease/";

/// Options shared by the live database and a checkpoint opened from it.
pub fn db_options() -> Options {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_max_background_jobs(2);
    // State-machine writes have no WAL: all column families must reach disk together.
    opts.set_atomic_flush(true);
    opts
}

/// A column family's options. Those that apply looks up by key for every command (tokens,
/// messages, leases) have Bloom filters: most tokens are new, and without a filter a miss
/// reads an index block from every SST file that could hold the key.
pub fn cf_options(name: &str) -> Options {
    let mut o = Options::default();
    if [CF_DEDUP, CF_MSG, CF_SM_META].contains(&name) {
        let mut t = rocksdb::BlockBasedOptions::default();
        t.set_bloom_filter(10.0, false);
        o.set_block_based_table_factory(&t);
        // And in the memtable, so that a miss skips its skiplist search too.
        o.set_memtable_prefix_bloom_ratio(0.02);
        o.set_memtable_whole_key_filtering(true);
    }
    o
}

pub fn open_db(dir: &Path) -> Result<Arc<DB>, rocksdb::Error> {
    let cfs = ALL_CFS
        .into_iter()
        .map(|n| ColumnFamilyDescriptor::new(n, cf_options(n)));
    let mut opts = db_options();
    // Flushes write SST files (bodies stored at a purge among them) that are seldom read
    // soon after: past the page cache, that costs no copy into it and no dirty pages that
    // syncs wait behind. Not every filesystem takes O_DIRECT (tmpfs before Linux 6.6), and
    // a flush that fails stops the database: so only where a probe write succeeds.
    let _ = std::fs::create_dir_all(dir);
    if direct_io_works(dir) {
        opts.set_use_direct_io_for_flush_and_compaction(true);
    }
    Ok(Arc::new(DB::open_cf_descriptors(&opts, dir, cfs)?))
}

pub fn cf<'a>(db: &'a DB, name: &str) -> &'a ColumnFamily {
    db.cf_handle(name)
        .expect("every column family is created at open")
}

/// For state-machine writes: the Raft log is their write-ahead log.
pub fn no_wal() -> WriteOptions {
    let mut w = WriteOptions::default();
    w.disable_wal(true);
    w
}

pub fn synced() -> WriteOptions {
    let mut w = WriteOptions::default();
    w.set_sync(true);
    w
}

/// A Raft log entry's key in `CF_LOG`.
pub fn log_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

/// Opens the Raft log's files in `dir`. A log still in `CF_LOG` (a node that ran an older
/// build) is first copied into a folder beside it, which is renamed into place once synced;
/// then the column family is emptied.
pub fn open_log(db: &DB, dir: &Path) -> Result<Arc<LogFiles>, String> {
    let purged = match db
        .get_cf(cf(db, CF_RAFT), LAST_PURGED_KEY)
        .map_err(|e| e.to_string())?
    {
        Some(v) => Some(de::<openraft::LogId<u64>>(&v)?.index),
        None => None,
    };
    let staging = dir.with_extension("moving");
    let at = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| at(&staging, e))?;
    }
    let mut it = db.raw_iterator_cf(cf(db, CF_LOG));
    it.seek_to_last();
    let last_in_db = it.key().and_then(id_of_key);
    it.seek_to_first();
    let in_db = it.valid();
    let mut opened = None;
    if in_db && dir.exists() {
        // Moved before, and the column family not yet emptied: it holds nothing newer,
        // unless an older build ran on this data after the move.
        let log = LogFiles::open(dir, purged)?;
        let files = log.last_index().max(purged);
        if last_in_db > files {
            return Err(format!(
                "RocksDB's log column family has entries (to {}) past those in {} (to {}): \
                 was an older build run on this data after the log moved to files?",
                last_in_db.unwrap_or(0),
                dir.display(),
                files.map_or("none".to_string(), |i| i.to_string()),
            ));
        }
        opened = Some(log);
    } else if in_db {
        let log = LogFiles::open(&staging, None)?;
        let (mut batch, mut moved) = (Batch::default(), 0u64);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let index = id_of_key(k).ok_or("a bad log key")?;
            batch.push(index, |w| w.extend_from_slice(v));
            moved += 1;
            if batch.len() > 16 << 20 {
                log.append(&std::mem::take(&mut batch))
                    .map_err(|e| at(&staging, e))?;
            }
            it.next();
        }
        it.status().map_err(|e| e.to_string())?;
        log.append(&batch).map_err(|e| at(&staging, e))?;
        drop(log);
        std::fs::rename(&staging, dir).map_err(|e| at(dir, e))?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent).map_err(|e| at(parent, e))?;
        }
        tracing::info!(entries = moved, dir = %dir.display(), "moved the Raft log out of RocksDB");
    }
    drop(it);
    if in_db {
        let log = cf(db, CF_LOG);
        db.delete_range_cf_opt(log, log_key(0), log_key(u64::MAX), &synced())
            .and_then(|()| db.delete_cf_opt(log, log_key(u64::MAX), &synced()))
            .map_err(|e| e.to_string())?;
        db.compact_range_cf(log, None::<&[u8]>, None::<&[u8]>);
    }
    match opened {
        Some(log) => Ok(Arc::new(log)),
        None => LogFiles::open(dir, purged).map(Arc::new),
    }
}

pub fn read_bodies_stored_to(db: &DB) -> Result<Option<u64>, String> {
    match db
        .get_cf(cf(db, CF_SM_META), BODIES_STORED_KEY)
        .map_err(|e| e.to_string())?
    {
        Some(v) => Ok(Some(u64::from_be_bytes(
            v.as_slice()
                .try_into()
                .map_err(|_| "a bad bodies_stored_to")?,
        ))),
        None => Ok(None),
    }
}

pub fn msg_key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

pub fn id_of_key(k: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(k.get(..8)?.try_into().ok()?))
}

pub fn lease_key(id: u64) -> Vec<u8> {
    let mut k = LEASE_PREFIX.to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

pub fn lease_range() -> (Vec<u8>, Vec<u8>) {
    let mut end = LEASE_PREFIX.to_vec();
    *end.last_mut().expect("non-empty prefix") += 1;
    (LEASE_PREFIX.to_vec(), end)
}

pub fn acct_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

pub fn dedup_key(token: u128) -> Vec<u8> {
    let mut k = vec![b'k'];
    k.extend_from_slice(&token.to_be_bytes());
    k
}

pub fn dedup_time_key(time_ms: u64, token: u128) -> Vec<u8> {
    let mut k = vec![b't'];
    k.extend_from_slice(&time_ms.to_be_bytes());
    k.extend_from_slice(&token.to_be_bytes());
    k
}

/// The token of a `dedup_time_key`.
pub fn token_of_time_key(k: &[u8]) -> Option<u128> {
    Some(u128::from_be_bytes(k.get(9..25)?.try_into().ok()?))
}

/// Ledger bucket key: granularity, bucket start (ms), then the budget key's bytes.
pub fn ledger_key(gran: u8, start_ms: u64, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + key.len());
    k.push(gran);
    k.extend_from_slice(&start_ms.to_be_bytes());
    k.extend_from_slice(key);
    k
}

pub fn ledger_range(gran: u8, until_ms: u64) -> (Vec<u8>, Vec<u8>) {
    (ledger_key(gran, 0, &[]), ledger_key(gran, until_ms, &[]))
}

/// (granularity, bucket start, budget key bytes) of a ledger key.
pub fn split_ledger_key(k: &[u8]) -> Option<(u8, u64, &[u8])> {
    let gran = *k.first()?;
    let start = u64::from_be_bytes(k.get(1..9)?.try_into().ok()?);
    Some((gran, start, &k[9..]))
}

/// A suppression entry's key: scope ("" for every sender), then the lower-cased address.
pub fn suppress_key(scope: &str, address: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + scope.len() + address.len());
    k.push(b'e');
    k.extend_from_slice(scope.as_bytes());
    k.push(0);
    k.extend_from_slice(address.to_ascii_lowercase().as_bytes());
    k
}

/// (scope, address) of an entry key.
pub fn split_suppress_key(k: &[u8]) -> Option<(String, String)> {
    let rest = k.strip_prefix(b"e")?;
    let nul = rest.iter().position(|&b| b == 0)?;
    Some((
        String::from_utf8_lossy(&rest[..nul]).into_owned(),
        String::from_utf8_lossy(&rest[nul + 1..]).into_owned(),
    ))
}

/// Every entry key lies in [from, to).
pub fn suppress_entries() -> (Vec<u8>, Vec<u8>) {
    (b"e".to_vec(), b"f".to_vec())
}

pub fn suppress_change_key(seq: u64) -> Vec<u8> {
    let mut k = vec![b'c'];
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub fn seq_of_change_key(k: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(k.strip_prefix(b"c")?.try_into().ok()?))
}

pub fn ser<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serialize(v).expect("in-memory serialisation cannot fail")
}

pub fn de<T: DeserializeOwned>(b: &[u8]) -> Result<T, String> {
    bincode::deserialize(b).map_err(|e| format!("undecodable record: {e}"))
}

#[cfg(test)]
mod direct_io_tests {
    use super::*;

    fn tmpfs_mounted_at(dir: &str) -> bool {
        std::fs::read_to_string("/proc/mounts")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(dir) && l.contains(" tmpfs "))
    }

    /// A database in the temporary folder and one on tmpfs (which takes O_DIRECT only from
    /// Linux 6.6) both flush and read back, and each uses direct I/O for flushes exactly
    /// when its filesystem takes it. A folder that cannot be written takes none.
    #[test]
    fn flushes_bypass_the_page_cache_where_the_filesystem_allows_it() {
        assert!(!direct_io_works(Path::new("/nonexistent/sluice-probe")));
        let mut dirs = vec![tempfile::tempdir().unwrap()];
        if tmpfs_mounted_at("/dev/shm") {
            dirs.push(tempfile::tempdir_in("/dev/shm").unwrap());
        } else {
            eprintln!("no tmpfs at /dev/shm: only the temporary folder is tried");
        }
        for tmp in &dirs {
            let direct = direct_io_works(tmp.path());
            let body = vec![7u8; 100_000];
            {
                let db = open_db(tmp.path()).unwrap();
                db.put_cf_opt(cf(&db, CF_BODY), msg_key(1), &body, &synced())
                    .unwrap();
                let cfs: Vec<_> = ALL_CFS.iter().map(|n| cf(&db, n)).collect();
                db.flush_cfs_opt(&cfs, &rocksdb::FlushOptions::default())
                    .unwrap();
                assert_eq!(
                    db.get_cf(cf(&db, CF_BODY), msg_key(1)).unwrap(),
                    Some(body.clone())
                );
            }
            let log = std::fs::read_to_string(tmp.path().join("LOG")).unwrap();
            let line = format!(
                "Options.use_direct_io_for_flush_and_compaction: {}",
                direct as u8
            );
            assert!(
                log.contains(&line),
                "{}: no line {line:?}",
                tmp.path().display()
            );
            let db = open_db(tmp.path()).unwrap();
            assert_eq!(db.get_cf(cf(&db, CF_BODY), msg_key(1)).unwrap(), Some(body));
        }
    }
}

#[cfg(test)]
mod layout_tests {
    //! A state-machine writer is killed mid-run (a real crash: no shutdown flush) after RocksDB
    //! flushed on its own because one column family's memtable filled. Whatever `last_applied`
    //! reached disk, every record it covers must be there too.
    use super::*;
    use rocksdb::WriteBatch;

    const CHILD: &str = "SLUICE_LAYOUT_CRASH_CHILD";

    /// Writes (message, meta) pairs the way apply does: one WAL-less batch each, the meta
    /// holding the count written so far. The meta column family gets large values so that
    /// its memtable fills long before the message one does.
    fn write_until_killed(dir: &Path) {
        let cfs = ALL_CFS.into_iter().map(|n| {
            let mut o = Options::default();
            o.set_write_buffer_size(256 << 10);
            ColumnFamilyDescriptor::new(n, o)
        });
        let db = DB::open_cf_descriptors(&db_options(), dir, cfs).unwrap();
        let pad = vec![0u8; 4096];
        for i in 1u64.. {
            let mut b = WriteBatch::default();
            b.put_cf(cf(&db, CF_MSG), msg_key(i), b"m");
            let mut meta = i.to_be_bytes().to_vec();
            meta.extend_from_slice(&pad);
            b.put_cf(cf(&db, CF_SM_META), META_KEY, meta);
            db.write_opt(b, &no_wal()).unwrap();
            if i == 2000 {
                std::fs::write(dir.join("ready"), b"").unwrap();
            }
        }
    }

    #[test]
    fn a_crash_never_leaves_last_applied_ahead_of_the_records() {
        if let Ok(dir) = std::env::var(CHILD) {
            write_until_killed(Path::new(&dir));
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "queue::layout::layout_tests::a_crash_never_leaves_last_applied_ahead_of_the_records",
                "--nocapture",
            ])
            .env(CHILD, tmp.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !tmp.path().join("ready").exists() {
            assert!(
                std::time::Instant::now() < end,
                "the writer never got going"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // Let a few automatic flushes of the meta column family happen, then crash.
        std::thread::sleep(std::time::Duration::from_millis(300));
        child.kill().unwrap();
        child.wait().unwrap();
        let db = open_db(tmp.path()).unwrap();
        let applied = db
            .get_cf(cf(&db, CF_SM_META), META_KEY)
            .unwrap()
            .map(|m| u64::from_be_bytes(m[..8].try_into().unwrap()))
            .unwrap_or(0);
        assert!(applied > 0, "nothing was flushed before the crash");
        let present = db
            .iterator_cf(cf(&db, CF_MSG), rocksdb::IteratorMode::Start)
            .count() as u64;
        assert!(
            present >= applied,
            "last_applied {applied} reached disk but only {present} records did"
        );
    }
}

#[cfg(test)]
mod log_move_tests {
    //! A node that kept its Raft log in `CF_LOG` (an older build) starts with log files.
    use super::*;

    fn old_node(dir: &Path, entries: std::ops::RangeInclusive<u64>) -> Arc<DB> {
        let db = open_db(&dir.join("raft")).unwrap();
        for i in entries {
            let value = format!("entry {i}").repeat(i as usize % 50 + 1);
            db.put_cf(cf(&db, CF_LOG), log_key(i), value).unwrap();
        }
        db
    }

    fn held(log: &LogFiles) -> Vec<(u64, String)> {
        log.read(0, u64::MAX)
            .unwrap()
            .into_iter()
            .map(|(i, v)| (i, String::from_utf8(v.to_vec()).unwrap()))
            .collect()
    }

    #[test]
    fn a_log_in_rocksdb_moves_to_files_at_the_first_start() {
        let tmp = tempfile::tempdir().unwrap();
        let db = old_node(tmp.path(), 5..=400);
        // Purged to 4 (the entries before 5 are gone), and a copy that a crash interrupted.
        let purged = openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1u64), 4);
        db.put_cf(cf(&db, CF_RAFT), LAST_PURGED_KEY, ser(&purged))
            .unwrap();
        let dir = tmp.path().join("raft-log");
        std::fs::create_dir_all(dir.with_extension("moving")).unwrap();
        std::fs::write(dir.with_extension("moving").join("junk"), b"x").unwrap();

        let log = open_log(&db, &dir).unwrap();
        let want: Vec<(u64, String)> = (5..=400u64)
            .map(|i| (i, format!("entry {i}").repeat(i as usize % 50 + 1)))
            .collect();
        assert_eq!(held(&log), want);
        assert_eq!(log.last_index(), Some(400));
        assert!(!dir.with_extension("moving").exists());
        let mut it = db.raw_iterator_cf(cf(&db, CF_LOG));
        it.seek_to_first();
        assert!(!it.valid(), "the column family is emptied");
        drop(log);
        // Later starts read the files alone.
        assert_eq!(held(&open_log(&db, &dir).unwrap()), want);
    }

    #[test]
    fn a_move_cut_short_after_the_rename_only_empties_the_column_family() {
        let tmp = tempfile::tempdir().unwrap();
        let db = old_node(tmp.path(), 1..=10);
        let dir = tmp.path().join("raft-log");
        let first = open_log(&db, &dir).unwrap();
        let want = held(&first);
        drop(first);
        // As if the crash came after the rename, before the column family was emptied.
        for i in 1..=10u64 {
            db.put_cf(cf(&db, CF_LOG), log_key(i), b"stale").unwrap();
        }
        let log = open_log(&db, &dir).unwrap();
        assert_eq!(held(&log), want);
        let mut it = db.raw_iterator_cf(cf(&db, CF_LOG));
        it.seek_to_first();
        assert!(!it.valid());
        drop((it, log));
        // An older build that wrote past the files after the move: refused, nothing emptied.
        db.put_cf(cf(&db, CF_LOG), log_key(11), b"newer").unwrap();
        let err = open_log(&db, &dir).err().expect("refused");
        assert!(err.contains("older build"), "{err}");
        assert!(db.get_cf(cf(&db, CF_LOG), log_key(11)).unwrap().is_some());
    }
}
