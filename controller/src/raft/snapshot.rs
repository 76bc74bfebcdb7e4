//! Snapshots as files: a RocksDB checkpoint of the database (hard links, consistent) is read
//! back column family by column family into SST files, which are packed into one archive on
//! disk. openraft streams that file in chunks; the receiver writes the chunks to a file and
//! ingests the SST files. Neither side holds a snapshot in memory.
//!
//! Archive layout: magic, u32 length + bincode `SnapshotMeta`, then per non-empty state
//! machine column family a u8 index into `SM_CFS`, a u64 length and the SST bytes, then 0xff.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use openraft::SnapshotMeta;
use rocksdb::checkpoint::Checkpoint;
use rocksdb::{DB, IngestExternalFileOptions, IteratorMode, Options, SstFileWriter, WriteBatch};

use super::{NodeId, store};
use crate::queue::bodies;
use crate::queue::layout::{self, ALL_CFS, CF_BODY, CF_MSG, SM_CFS, synced};
use crate::queue::log_files::LogFiles;
use crate::queue::state::QueueState;
use crate::queue::tx::Tx;

const MAGIC: &[u8; 14] = b"SLUICE-SNAP-1\n";
const END: u8 = 0xff;
pub const CURRENT: &str = "current.snap";
/// Present while an install is under way: a restart finishes it from `current.snap`.
const INSTALLING: &str = "installing";

pub type Meta = SnapshotMeta<NodeId, openraft::BasicNode>;

/// Removes a work folder however the function that made it returns.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn work_dir(dir: &Path, what: &str) -> Result<WorkDir, String> {
    let p = dir.join(format!("{what}-{:016x}", fastrand::u64(..)));
    std::fs::create_dir_all(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    Ok(WorkDir(p))
}

/// Builds `dir/current.snap` from a checkpoint of `db` and returns its meta. The applied log
/// id and membership are read from the checkpoint itself, so they match its contents even
/// while apply goes on. Bodies still held in memory are read from `log`, which must keep the
/// entries after those whose bodies are stored (a pin, taken before this is called).
pub fn build(db: &DB, log: &LogFiles, dir: &Path) -> Result<Meta, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let work = work_dir(dir, "build")?;
    let cp_dir = work.0.join("checkpoint");
    Checkpoint::new(db)
        .and_then(|c| c.create_checkpoint(&cp_dir))
        .map_err(|e| format!("checkpoint: {e}"))?;
    let cp = DB::open_cf_for_read_only(&Options::default(), &cp_dir, ALL_CFS, false)
        .map_err(|e| format!("opening checkpoint: {e}"))?;
    let (last_log_id, last_membership) = QueueState::read_applied(&cp)?;
    let meta = Meta {
        last_log_id,
        last_membership,
        snapshot_id: format!(
            "{}-{:08x}",
            last_log_id.map(|l| l.index).unwrap_or(0),
            fastrand::u32(..)
        ),
    };
    let tmp = work.0.join(CURRENT);
    let mut out = BufWriter::new(File::create(&tmp).map_err(|e| e.to_string())?);
    let io = |e: std::io::Error| e.to_string();
    let meta_bytes = bincode::serialize(&meta).map_err(|e| e.to_string())?;
    out.write_all(MAGIC).map_err(io)?;
    out.write_all(&(meta_bytes.len() as u32).to_be_bytes())
        .map_err(io)?;
    out.write_all(&meta_bytes).map_err(io)?;
    for (i, name) in SM_CFS.iter().enumerate() {
        let sst = work.0.join(format!("{name}.sst"));
        // With the column family's table options: the receiver ingests this file as it is.
        let opts = layout::cf_options(name);
        let mut writer = SstFileWriter::create(&opts);
        writer.open(&sst).map_err(|e| e.to_string())?;
        let mut n = 0u64;
        if *name == CF_BODY {
            n = write_bodies(&cp, log, &mut writer)?;
        } else {
            for kv in cp.iterator_cf(cp.cf_handle(name).unwrap(), IteratorMode::Start) {
                let (k, v) = kv.map_err(|e| e.to_string())?;
                writer.put(k, v).map_err(|e| e.to_string())?;
                n += 1;
            }
        }
        if n == 0 {
            continue;
        }
        writer.finish().map_err(|e| e.to_string())?;
        let mut f = File::open(&sst).map_err(io)?;
        let len = f.metadata().map_err(io)?.len();
        out.write_all(&[i as u8]).map_err(io)?;
        out.write_all(&len.to_be_bytes()).map_err(io)?;
        std::io::copy(&mut f, &mut out).map_err(io)?;
    }
    out.write_all(&[END]).map_err(io)?;
    let f = out.into_inner().map_err(|e| e.to_string())?;
    f.sync_all().map_err(io)?;
    drop(cp);
    std::fs::rename(&tmp, dir.join(CURRENT)).map_err(io)?;
    Ok(meta)
}

/// Writes the body of every message in the checkpoint `cp`, in id order: from the `body`
/// column family, or from the log entry that carried it while it was held in memory
/// (`queue::bodies`). Returns how many.
fn write_bodies(cp: &DB, log: &LogFiles, writer: &mut SstFileWriter) -> Result<u64, String> {
    // Without the key (a store from before bodies were held) every body is stored.
    let applied = QueueState::read_applied(cp)?.0.map_or(0, |l| l.index);
    let stored_to = layout::read_bodies_stored_to(cp)?
        .unwrap_or(applied)
        .min(applied);
    let mut stored = cp.raw_iterator_cf(layout::cf(cp, CF_BODY));
    // The bodies of the last log entry read, which holds consecutive ids.
    let mut logged: Option<(u64, Vec<bytes::Bytes>)> = None;
    let mut n = 0;
    for kv in cp.iterator_cf(layout::cf(cp, CF_MSG), IteratorMode::Start) {
        let (k, _) = kv.map_err(|e| e.to_string())?;
        let id = layout::id_of_key(&k).ok_or("bad message key")?;
        stored.seek(&k);
        if stored.key() == Some(&k[..]) {
            writer
                .put(&k, stored.value().unwrap_or_default())
                .map_err(|e| e.to_string())?;
            n += 1;
            continue;
        }
        stored.status().map_err(|e| e.to_string())?;
        let entry = bodies::entry_of(id);
        if entry <= stored_to {
            tracing::error!(
                msg = format!("{id:016x}"),
                "a queued message has no stored body"
            );
            continue;
        }
        if logged.as_ref().is_none_or(|(i, _)| *i != entry) {
            let (_, v) = log
                .read_pinned(entry, entry + 1)?
                .pop()
                .ok_or_else(|| format!("message {id:016x}: its log entry {entry} is gone"))?;
            logged = Some((entry, store::enqueued_bodies(&v)?));
        }
        let body = logged
            .as_ref()
            .and_then(|(_, b)| b.get(bodies::position_of(id)))
            .ok_or_else(|| format!("message {id:016x}: not in its log entry {entry}"))?;
        writer.put(&k, body).map_err(|e| e.to_string())?;
        n += 1;
    }
    Ok(n)
}

/// The meta at the head of an archive.
pub fn read_meta(r: &mut impl Read) -> Result<Meta, String> {
    let mut magic = [0u8; 14];
    r.read_exact(&mut magic).map_err(|e| e.to_string())?;
    if &magic != MAGIC {
        return Err("not a Sluice snapshot".into());
    }
    let mut len = [0u8; 4];
    r.read_exact(&mut len).map_err(|e| e.to_string())?;
    let mut meta = vec![0u8; u32::from_be_bytes(len) as usize];
    r.read_exact(&mut meta).map_err(|e| e.to_string())?;
    bincode::deserialize(&meta).map_err(|e| e.to_string())
}

/// The meta of `dir/current.snap`, if there is one.
pub fn current_meta(dir: &Path) -> Result<Option<Meta>, String> {
    match File::open(dir.join(CURRENT)) {
        Ok(f) => read_meta(&mut BufReader::new(f)).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// Makes a received archive the current snapshot and replaces the state machine's column
/// families with its contents.
pub fn install_received(db: &DB, dir: &Path, received: &mut File) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let tmp = dir.join(format!("received-{:016x}.tmp", fastrand::u64(..)));
    {
        let mut out = File::create(&tmp).map_err(|e| e.to_string())?;
        received
            .seek(SeekFrom::Start(0))
            .map_err(|e| e.to_string())?;
        std::io::copy(received, &mut out).map_err(|e| e.to_string())?;
        out.sync_all().map_err(|e| e.to_string())?;
    }
    let work = work_dir(dir, "install")?;
    let ssts = extract(&tmp, &work.0).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    std::fs::write(dir.join(INSTALLING), b"").map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, dir.join(CURRENT)).map_err(|e| e.to_string())?;
    replace(db, dir, ssts)
}

/// Finishes an install that a crash interrupted. Returns whether there was one.
pub fn resume_install(db: &DB, dir: &Path) -> Result<bool, String> {
    if !dir.join(INSTALLING).exists() {
        return Ok(false);
    }
    let work = work_dir(dir, "install")?;
    let ssts = extract(&dir.join(CURRENT), &work.0)?;
    replace(db, dir, ssts)?;
    Ok(true)
}

/// Unpacks and checks every SST of an archive into `work`.
type Extracted = (Meta, Vec<(&'static str, PathBuf)>);

fn extract(archive: &Path, work: &Path) -> Result<Extracted, String> {
    let mut r = BufReader::new(File::open(archive).map_err(|e| e.to_string())?);
    let meta = read_meta(&mut r)?;
    let mut ssts = Vec::new();
    loop {
        let mut b = [0u8; 1];
        r.read_exact(&mut b)
            .map_err(|e| format!("truncated snapshot: {e}"))?;
        if b[0] == END {
            break;
        }
        let name = *SM_CFS
            .get(b[0] as usize)
            .ok_or("snapshot names an unknown column family")?;
        let mut len = [0u8; 8];
        r.read_exact(&mut len).map_err(|e| e.to_string())?;
        let len = u64::from_be_bytes(len);
        let path = work.join(format!("{name}.sst"));
        let mut f = File::create(&path).map_err(|e| e.to_string())?;
        let n = std::io::copy(&mut (&mut r).take(len), &mut f).map_err(|e| e.to_string())?;
        if n != len {
            return Err("truncated snapshot".into());
        }
        ssts.push((name, path));
    }
    Ok((meta, ssts))
}

/// Replaces the state machine column families with the extracted SST files.
fn replace(db: &DB, dir: &Path, (meta, ssts): Extracted) -> Result<(), String> {
    let mut batch = WriteBatch::default();
    for name in SM_CFS {
        batch.delete_range_cf(
            db.cf_handle(name).unwrap(),
            Vec::<u8>::new(),
            vec![0xffu8; 64],
        );
    }
    db.write_opt(batch, &synced()).map_err(|e| e.to_string())?;
    let mut opts = IngestExternalFileOptions::default();
    opts.set_move_files(true);
    for (name, path) in ssts {
        db.ingest_external_file_cf_opts(db.cf_handle(name).unwrap(), &opts, vec![path])
            .map_err(|e| format!("ingesting {name}: {e}"))?;
    }
    // A snapshot holds every body: all are stored, through its last entry (this node's log
    // up to there may differ from the entries the snapshot covers).
    let mut tx = Tx::new(db);
    tx.put_bodies_stored_to(meta.last_log_id.map_or(0, |l| l.index));
    db.write_opt(tx.into_batch(), &synced())
        .map_err(|e| e.to_string())?;
    db.flush_wal(true).map_err(|e| e.to_string())?;
    std::fs::remove_file(dir.join(INSTALLING)).map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::layout::{CF_ACCT, CF_BODY, CF_MSG, CF_SM_META, open_db};
    use crate::queue::state::digest_at;
    use crate::queue::tx::Tx;

    #[test]
    fn a_checkpoint_snapshot_installs_into_another_database() {
        let tmp = tempfile::tempdir().unwrap();
        let a = open_db(&tmp.path().join("a")).unwrap();
        let b = open_db(&tmp.path().join("b")).unwrap();
        for i in 0u64..5000 {
            a.put_cf(a.cf_handle(CF_MSG).unwrap(), i.to_be_bytes(), b"m")
                .unwrap();
            a.put_cf(
                a.cf_handle(CF_BODY).unwrap(),
                i.to_be_bytes(),
                vec![7u8; 100],
            )
            .unwrap();
        }
        let st = QueueState::default();
        let mut tx = Tx::new(&a);
        st.write_meta(&mut tx);
        a.write(tx.into_batch()).unwrap();
        // Stale rows on the receiver must not survive the install.
        b.put_cf(b.cf_handle(CF_ACCT).unwrap(), 1u64.to_be_bytes(), b"old")
            .unwrap();
        b.put_cf(
            b.cf_handle(CF_MSG).unwrap(),
            99_999u64.to_be_bytes(),
            b"old",
        )
        .unwrap();

        let dir_a = tmp.path().join("snap-a");
        let dir_b = tmp.path().join("snap-b");
        let log = LogFiles::open(&tmp.path().join("log"), None).unwrap();
        let meta = build(&a, &log, &dir_a).unwrap();
        assert_eq!(current_meta(&dir_a).unwrap().unwrap(), meta);
        let mut f = File::open(dir_a.join(CURRENT)).unwrap();
        install_received(&b, &dir_b, &mut f).unwrap();
        let digest = |db: &DB| digest_at(db, &db.snapshot(), &Default::default()).unwrap();
        assert_eq!(digest(&a), digest(&b));
        assert!(
            b.get_cf(b.cf_handle(CF_SM_META).unwrap(), "meta")
                .unwrap()
                .is_some()
        );
        assert!(!dir_b.join(INSTALLING).exists());
        assert!(!resume_install(&b, &dir_b).unwrap());
    }

    #[test]
    fn a_damaged_archive_is_refused_before_anything_is_deleted() {
        let tmp = tempfile::tempdir().unwrap();
        let b = open_db(&tmp.path().join("b")).unwrap();
        b.put_cf(b.cf_handle(CF_MSG).unwrap(), 1u64.to_be_bytes(), b"keep")
            .unwrap();
        let bad = tmp.path().join("bad");
        std::fs::write(&bad, b"garbage").unwrap();
        let err = install_received(&b, &tmp.path().join("s"), &mut File::open(&bad).unwrap());
        assert!(err.is_err());
        assert!(
            b.get_cf(b.cf_handle(CF_MSG).unwrap(), 1u64.to_be_bytes())
                .unwrap()
                .is_some()
        );
    }
}
