//! The Raft log as append-only segment files beside RocksDB. Each entry is written once and
//! synced before openraft counts it. (In a RocksDB column family every entry, body and all,
//! was written twice: into the WAL, and again when its memtable was flushed to SST files that
//! a purge then dropped unread.)
//!
//! A folder of segments, each named by the index of its first entry (`{:020}.log`). A record
//! is `payload length: u32, crc32: u32 (of the index and the payload), index: u64` (little
//! endian) and the payload; indexes follow each other without a gap, across segments too. A
//! batch goes to the last segment in one write and one `fdatasync`; its last record has the
//! length's top bit set (`BATCH_END`). A new segment is started once the last has passed its
//! size, and the folder is synced so that the file outlives a crash.
//!
//! Crash story: an append returns only once synced, and a failed one stops every later write
//! (the node restarts), so only the last segment can end in a torn batch: opening cuts it
//! there. Damage with a whole batch after it is no crash's (the pages of the last, unsynced
//! batch may reach the disk in any order, but no later batch exists): then the open fails
//! rather than drop acknowledged entries. A truncation removes later segments, the newest
//! first, syncing the folder after each, then cuts the file and syncs it, so a crash leaves
//! at worst a prefix of the old log. A purge removes whole segments once all their entries are
//! purged and no reader holds them (`pin`); segments that a crash or a pin left behind are
//! removed at the next open or purge.
//!
//! Where the filesystem takes O_DIRECT, appends bypass the page cache: copying each body into
//! it was a quarter of the controller's CPU at 100 KB, for pages that are seldom read (recent
//! entries are read from memory, `raft::store`). A direct write covers whole aligned blocks,
//! so it rewrites the last partial block with the bytes it already holds (kept in memory,
//! `Segment::tail`) and pads the new last block with zeros. An open takes zeros after the
//! last record, fewer than a block and up to a block's end, as that padding.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

const HEADER: u64 = 16;
/// Direct writes go in whole blocks of this size, from memory aligned to it.
const BLOCK: u64 = 4096;
/// In a record's length field: the last record of an append.
const BATCH_END: u32 = 1 << 31;
/// A segment takes no more batches once it is this long.
pub const SEGMENT_BYTES: u64 = 64 << 20;

pub struct LogFiles {
    dir: PathBuf,
    segment_bytes: u64,
    /// Appends use O_DIRECT.
    direct: bool,
    inner: Mutex<Inner>,
    /// Held through each append, truncation and purge: they change files outside `inner`.
    writer: Mutex<()>,
}

#[derive(Default)]
struct Inner {
    segments: VecDeque<Segment>,
    /// Entries up to here are dropped (their segments removed once no pin holds them).
    purged: Option<u64>,
    /// Readers' pins: entries from each index on stay on disk.
    pins: Vec<(u64, u64)>,
    next_pin: u64,
    /// Set when a write failed: the tail of the last segment is unknown until a reopen.
    broken: Option<String>,
    /// Counts appends and truncations: a batch whose prefix was copied at another count
    /// cannot be written as it is.
    changes: u64,
}

struct Segment {
    first: u64,
    path: PathBuf,
    file: Arc<File>,
    /// Where each record starts, for the entries `first`, `first + 1`, ...
    offsets: Vec<u64>,
    /// Where the last record ends.
    end: u64,
    /// The bytes from the start of the block that `end` falls in up to `end`.
    tail: Vec<u8>,
    /// The writer with O_DIRECT, opened at the segment's first direct append.
    direct: Option<Arc<File>>,
}

impl Segment {
    /// The index after its last entry.
    fn next(&self) -> u64 {
        self.first + self.offsets.len() as u64
    }

    fn record_end(&self, i: usize) -> u64 {
        self.offsets.get(i + 1).copied().unwrap_or(self.end)
    }
}

/// Entries encoded for one append, in index order.
#[derive(Default)]
pub struct Batch {
    buf: Vec<u8>,
    /// Where the first record starts in `buf`. Before it, from an aligned address, a batch
    /// made by `LogFiles::batch` holds a copy of the last segment's `tail`, so that a direct
    /// write can go from `buf` without another copy.
    start: usize,
    /// `Inner::changes` when that copy was taken.
    made_at: Option<u64>,
    /// Each entry's index and where its record starts in `buf`.
    records: Vec<(u64, usize)>,
}

impl Batch {
    pub fn with_capacity(bytes: usize) -> Self {
        Batch {
            buf: Vec::with_capacity(bytes),
            ..Default::default()
        }
    }

    /// The bytes encoded so far.
    pub fn len(&self) -> usize {
        self.buf.len() - self.start
    }

    fn records_bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Adds the entry `index`, whose payload `encode` writes. Returns the payload's length.
    pub fn push(&mut self, index: u64, encode: impl FnOnce(&mut Vec<u8>)) -> usize {
        // Only the newest record ends the batch.
        if let Some(&(_, prev)) = self.records.last() {
            self.buf[prev + 3] &= !((BATCH_END >> 24) as u8);
        }
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; HEADER as usize]);
        encode(&mut self.buf);
        let len = self.buf.len() - start - HEADER as usize;
        let crc = crc(index, &self.buf[start + HEADER as usize..]);
        let header = &mut self.buf[start..start + HEADER as usize];
        // The gRPC limit on a request keeps an entry far below 2 GiB.
        let len32 = u32::try_from(len)
            .ok()
            .filter(|l| l & BATCH_END == 0)
            .expect("an entry under 2 GiB");
        header[..4].copy_from_slice(&(len32 | BATCH_END).to_le_bytes());
        header[4..8].copy_from_slice(&crc.to_le_bytes());
        header[8..].copy_from_slice(&index.to_le_bytes());
        self.records.push((index, start));
        len
    }
}

fn crc(index: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&index.to_le_bytes());
    h.update(payload);
    h.finalize()
}

fn segment_name(first: u64) -> String {
    format!("{first:020}.log")
}

pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Whether a file in `dir` can be written with O_DIRECT: tried with one aligned block.
pub fn direct_io_works(dir: &Path) -> bool {
    use std::io::Write;
    let path = dir.join(format!(".direct-io-probe-{:016x}", fastrand::u64(..)));
    let (buf, at) = aligned_zeroed(BLOCK as usize);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .and_then(|mut f| f.write_all(&buf[at..at + BLOCK as usize]));
    let _ = std::fs::remove_file(&path);
    written.is_ok()
}

/// How many bytes from `p` to the next address aligned to `BLOCK`.
fn to_block(p: *const u8) -> usize {
    let b = BLOCK as usize;
    (b - p.addr() % b) % b
}

/// Zeros, `len` of them from an address aligned to `BLOCK`: the vector and that offset.
fn aligned_zeroed(len: usize) -> (Vec<u8>, usize) {
    let v = vec![0u8; len + BLOCK as usize];
    let at = to_block(v.as_ptr());
    (v, at)
}

/// Writes `region` at the aligned offset `base` with O_DIRECT, its last partial block padded
/// with zeros. `region` starts at an aligned address.
fn write_direct(file: &File, region: &[u8], base: u64) -> io::Result<()> {
    let whole = region.len() - region.len() % BLOCK as usize;
    if whole > 0 {
        file.write_all_at(&region[..whole], base)?;
    }
    if whole < region.len() {
        let (mut last, at) = aligned_zeroed(BLOCK as usize);
        last[at..at + region.len() - whole].copy_from_slice(&region[whole..]);
        file.write_all_at(&last[at..at + BLOCK as usize], base + whole as u64)?;
    }
    Ok(())
}

/// A segment's `tail` once `records` follow the bytes up to `end` (whose tail is `tail`).
fn tail_after(tail: &[u8], end: u64, records: &[u8]) -> Vec<u8> {
    let new_end = end + records.len() as u64;
    let new_base = new_end - new_end % BLOCK;
    if new_base >= end {
        records[(new_base - end) as usize..].to_vec()
    } else {
        let mut t = tail[(tail.len() as u64 - (end - new_base)) as usize..].to_vec();
        t.extend_from_slice(records);
        t
    }
}

/// The bytes of `file` from the start of the block that `end` falls in up to `end`.
fn read_tail(file: &File, end: u64) -> io::Result<Vec<u8>> {
    let mut tail = vec![0u8; (end % BLOCK) as usize];
    file.read_exact_at(&mut tail, end - end % BLOCK)?;
    Ok(tail)
}

/// Releases its hold on the log when dropped.
pub struct Pin {
    log: Arc<LogFiles>,
    id: u64,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut inner = self.log.inner.lock().unwrap();
        inner.pins.retain(|(id, _)| *id != self.id);
    }
}

impl LogFiles {
    /// Opens (or creates) the log in `dir`. `purged` is the last index purged, as saved
    /// before the purge removed any file.
    pub fn open(dir: &Path, purged: Option<u64>) -> Result<LogFiles, String> {
        Self::open_with(dir, purged, SEGMENT_BYTES)
    }

    /// With segments of `segment_bytes`, and direct appends where the filesystem takes them.
    pub fn open_with(
        dir: &Path,
        purged: Option<u64>,
        segment_bytes: u64,
    ) -> Result<LogFiles, String> {
        Self::create_dir(dir)?;
        Self::open_in(dir, purged, segment_bytes, direct_io_works(dir))
    }

    fn create_dir(dir: &Path) -> Result<(), String> {
        if !dir.exists() {
            let at = |e: io::Error| format!("{}: {e}", dir.display());
            std::fs::create_dir_all(dir).map_err(at)?;
            // The folder's own name must outlive a crash, as its files' names do.
            if let Some(parent) = dir.parent() {
                sync_dir(parent).map_err(at)?;
            }
        }
        Ok(())
    }

    fn open_in(
        dir: &Path,
        purged: Option<u64>,
        segment_bytes: u64,
        direct: bool,
    ) -> Result<LogFiles, String> {
        let at = |e: io::Error| format!("{}: {e}", dir.display());
        let mut firsts = Vec::new();
        for f in std::fs::read_dir(dir).map_err(at)? {
            let name = f.map_err(at)?.file_name();
            let name = name.to_string_lossy();
            if let Some(first) = name
                .strip_suffix(".log")
                .filter(|n| n.len() == 20)
                .and_then(|n| n.parse::<u64>().ok())
            {
                firsts.push(first);
            }
        }
        firsts.sort_unstable();
        let mut segments = VecDeque::new();
        for (i, &first) in firsts.iter().enumerate() {
            let last = i + 1 == firsts.len();
            segments.push_back(scan(&dir.join(segment_name(first)), first, last)?);
        }
        // Segments whose entries are all purged: a crash came between the purge's record
        // and the removal.
        while let Some(s) = segments.front() {
            if purged.is_none_or(|p| s.next() > p + 1) {
                break;
            }
            std::fs::remove_file(&s.path).map_err(at)?;
            segments.pop_front();
        }
        for pair in segments.iter().collect::<Vec<_>>().windows(2) {
            if pair[0].next() != pair[1].first {
                return Err(format!(
                    "{}: the Raft log has a gap: {} ends before entry {}, and {} starts at {}",
                    dir.display(),
                    pair[0].path.display(),
                    pair[0].next(),
                    pair[1].path.display(),
                    pair[1].first
                ));
            }
        }
        if let (Some(p), Some(s)) = (purged, segments.front())
            && s.first > p + 1
            && !s.offsets.is_empty()
        {
            return Err(format!(
                "{}: entries {} to {} are missing from the Raft log",
                dir.display(),
                p + 1,
                s.first - 1
            ));
        }
        Ok(LogFiles {
            dir: dir.to_path_buf(),
            segment_bytes,
            direct,
            inner: Mutex::new(Inner {
                segments,
                purged,
                ..Default::default()
            }),
            writer: Mutex::new(()),
        })
    }

    /// The index of the last entry, unless every entry held is purged.
    pub fn last_index(&self) -> Option<u64> {
        self.inner.lock().unwrap().last_index()
    }

    /// An empty batch of about `bytes`, laid out so that `append` can write it with O_DIRECT
    /// as it is (unless the log changes meanwhile).
    pub fn batch(&self, bytes: usize) -> Batch {
        if !self.direct {
            return Batch::with_capacity(bytes);
        }
        let inner = self.inner.lock().unwrap();
        let tail = inner.segments.back().map_or(&[][..], |s| &s.tail[..]);
        let mut buf: Vec<u8> = Vec::with_capacity(bytes + tail.len() + BLOCK as usize);
        let pad = to_block(buf.as_ptr());
        buf.resize(pad, 0);
        buf.extend_from_slice(tail);
        Batch {
            start: buf.len(),
            buf,
            made_at: Some(inner.changes),
            records: Vec::new(),
        }
    }

    /// Writes and syncs a batch whose first entry follows the last (any, in an empty log).
    pub fn append(&self, batch: &Batch) -> io::Result<()> {
        let Some(&(first, _)) = batch.records.first() else {
            return Ok(());
        };
        let _writer = self.writer.lock().unwrap();
        let (file, offset, direct, tail) = {
            let mut inner = self.inner.lock().unwrap();
            inner.check_running()?;
            if let Some(last) = inner.last_index()
                && first != last + 1
            {
                return Err(invalid(format!("entry {first} does not follow {last}")));
            }
            let reuse = inner.segments.back().is_some_and(|s| {
                s.next() == first && (s.end < self.segment_bytes || s.offsets.is_empty())
            });
            if !reuse && let Err(e) = self.start_segment(&mut inner, first) {
                inner.broken = Some(e.to_string());
                return Err(e);
            }
            let changes = inner.changes;
            let s = inner.segments.back_mut().expect("a segment");
            if self.direct && s.direct.is_none() {
                match open_direct(&s.path) {
                    Ok(f) => s.direct = Some(Arc::new(f)),
                    Err(e) => {
                        let why = format!("{}: {e}", s.path.display());
                        inner.broken = Some(why.clone());
                        return Err(io::Error::other(why));
                    }
                }
            }
            // A batch laid out at this count holds the tail before its records; any other
            // takes a copy.
            let head = (s.end % BLOCK) as usize;
            let laid_out = batch.made_at == Some(changes) && batch.start >= head;
            let tail = (self.direct && !laid_out).then(|| s.tail.clone());
            (s.file.clone(), s.end, s.direct.clone(), tail)
        };
        let records = batch.records_bytes();
        let written = match &direct {
            None => file.write_all_at(records, offset),
            Some(d) => {
                let base = offset - offset % BLOCK;
                let head = (offset - base) as usize;
                let from = match &tail {
                    Some(_) => &[][..],
                    None => &batch.buf[batch.start - head..],
                };
                if tail.is_none() && to_block(from.as_ptr()) == 0 {
                    write_direct(d, from, base)
                } else {
                    // Not laid out, or moved when the batch outgrew its capacity.
                    let head_bytes = match &tail {
                        Some(t) => &t[..],
                        None => &from[..head],
                    };
                    let (mut v, at) = aligned_zeroed(head + records.len());
                    v[at..at + head].copy_from_slice(head_bytes);
                    v[at + head..at + head + records.len()].copy_from_slice(records);
                    write_direct(d, &v[at..at + head + records.len()], base)
                }
            }
        }
        .and_then(|()| file.sync_data());
        let mut inner = self.inner.lock().unwrap();
        if let Err(e) = &written {
            inner.broken = Some(e.to_string());
            return written;
        }
        inner.changes += 1;
        let s = inner.segments.back_mut().expect("a segment");
        s.offsets.extend(
            batch
                .records
                .iter()
                .map(|&(_, at)| offset + (at - batch.start) as u64),
        );
        s.tail = tail_after(&s.tail, s.end, records);
        s.end = offset + records.len() as u64;
        Ok(())
    }

    /// A new last segment for entries from `first`, replacing an empty last one.
    fn start_segment(&self, inner: &mut Inner, first: u64) -> io::Result<()> {
        if inner.segments.back().is_some_and(|s| s.offsets.is_empty()) {
            let s = inner.segments.pop_back().expect("a segment");
            std::fs::remove_file(&s.path)?;
        }
        let path = self.dir.join(segment_name(first));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        sync_dir(&self.dir)?;
        inner.changes += 1;
        inner.segments.push_back(Segment {
            first,
            path,
            file: Arc::new(file),
            offsets: Vec::new(),
            end: 0,
            tail: Vec::new(),
            direct: None,
        });
        Ok(())
    }

    /// The payloads of the entries in `start..end` that the log holds, in order.
    pub fn read(&self, start: u64, end: u64) -> Result<Vec<(u64, Bytes)>, String> {
        self.read_from_disk(start, end, false)
    }

    /// As `read`, with entries that are purged but still on disk (under a pin).
    pub fn read_pinned(&self, start: u64, end: u64) -> Result<Vec<(u64, Bytes)>, String> {
        self.read_from_disk(start, end, true)
    }

    fn read_from_disk(
        &self,
        start: u64,
        end: u64,
        purged_too: bool,
    ) -> Result<Vec<(u64, Bytes)>, String> {
        // Once more on failure: a truncation may have cut the bytes found under the lock
        // (on a deposed leader whose replication still reads); the second look sees it.
        self.read_once(start, end, purged_too)
            .or_else(|_| self.read_once(start, end, purged_too))
    }

    fn read_once(
        &self,
        start: u64,
        end: u64,
        purged_too: bool,
    ) -> Result<Vec<(u64, Bytes)>, String> {
        // Which bytes of which files, taken under the lock and read outside it.
        let mut spans = Vec::new();
        {
            let inner = self.inner.lock().unwrap();
            let start = match inner.purged {
                Some(p) if !purged_too => start.max(p + 1),
                _ => start,
            };
            for s in &inner.segments {
                let (from, to) = (start.max(s.first), end.min(s.next()));
                if from >= to {
                    continue;
                }
                let (i, j) = ((from - s.first) as usize, (to - s.first) as usize);
                let at = s.offsets[i];
                let ends: Vec<u64> = (i..j).map(|k| s.record_end(k) - at).collect();
                spans.push((s.file.clone(), s.path.clone(), from, at, ends));
            }
        }
        let mut out = Vec::new();
        for (file, path, from, at, ends) in spans {
            let mut buf = vec![0u8; *ends.last().expect("a record") as usize];
            file.read_exact_at(&mut buf, at)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let buf = Bytes::from(buf);
            let mut pos = 0;
            for (k, &stop) in ends.iter().enumerate() {
                let index = from + k as u64;
                let payload = check(&buf[pos..stop as usize], index)
                    .map_err(|e| format!("{} at byte {}: {e}", path.display(), at + pos as u64))?;
                out.push((index, buf.slice_ref(payload)));
                pos = stop as usize;
            }
        }
        Ok(out)
    }

    /// Drops every entry from `index` on, durably.
    pub fn truncate(&self, index: u64) -> io::Result<()> {
        let _writer = self.writer.lock().unwrap();
        let (removed, cut) = {
            let mut inner = self.inner.lock().unwrap();
            inner.check_running()?;
            inner.changes += 1;
            let mut removed = Vec::new();
            while inner.segments.back().is_some_and(|s| s.first >= index) {
                removed.push(inner.segments.pop_back().expect("a segment").path);
            }
            let cut = inner.segments.back_mut().and_then(|s| {
                let i = (index.checked_sub(s.first)?) as usize;
                (i < s.offsets.len()).then(|| {
                    let old_end = s.end;
                    s.end = s.offsets[i];
                    s.offsets.truncate(i);
                    // Within the tail's block: from memory, as a direct write will put it.
                    let in_tail = s.end - s.end % BLOCK == old_end - old_end % BLOCK;
                    if in_tail {
                        s.tail.truncate((s.end % BLOCK) as usize);
                    }
                    (s.file.clone(), s.end, !in_tail)
                })
            });
            (removed, cut)
        };
        let done = (|| -> io::Result<()> {
            // The newest first, each removal synced, so that a crash leaves a prefix.
            for path in &removed {
                std::fs::remove_file(path)?;
                sync_dir(&self.dir)?;
            }
            if let Some((file, len, read)) = cut {
                file.set_len(len)?;
                file.sync_data()?;
                // Elsewhere from the file: the kernel drops the pages a direct write covers,
                // so a buffered read sees what the disk holds.
                if read {
                    let tail = read_tail(&file, len)?;
                    let mut inner = self.inner.lock().unwrap();
                    inner.changes += 1;
                    if let Some(s) = inner.segments.back_mut() {
                        s.tail = tail;
                    }
                }
            }
            Ok(())
        })();
        if let Err(e) = &done {
            self.inner.lock().unwrap().broken = Some(e.to_string());
        }
        done
    }

    /// Drops every entry up to and including `index`. Whole segments are removed, once no
    /// pin holds an entry in them.
    pub fn purge(&self, index: u64) -> io::Result<()> {
        let _writer = self.writer.lock().unwrap();
        let removed = {
            let mut inner = self.inner.lock().unwrap();
            inner.purged = inner.purged.max(Some(index));
            let keep_from = inner
                .pins
                .iter()
                .map(|(_, from)| *from)
                .min()
                .unwrap_or(u64::MAX)
                .min(index + 1);
            let mut removed = Vec::new();
            while inner
                .segments
                .front()
                .is_some_and(|s| s.next() <= keep_from)
            {
                removed.push(inner.segments.pop_front().expect("a segment").path);
            }
            removed
        };
        // Not synced: a removal lost in a crash is done again at the next open.
        for path in removed {
            std::fs::remove_file(path)?;
        }
        Ok(())
    }

    /// Keeps the entries from `from` on until the pin is dropped, even if purged meanwhile.
    pub fn pin(self: &Arc<Self>, from: u64) -> Pin {
        let mut inner = self.inner.lock().unwrap();
        inner.next_pin += 1;
        let id = inner.next_pin;
        inner.pins.push((id, from));
        Pin {
            log: self.clone(),
            id,
        }
    }
}

impl Inner {
    /// An error once a failed write has stopped the log.
    fn check_running(&self) -> io::Result<()> {
        match &self.broken {
            Some(why) => Err(io::Error::other(format!("the Raft log is stopped: {why}"))),
            None => Ok(()),
        }
    }

    fn last_index(&self) -> Option<u64> {
        let last = self
            .segments
            .iter()
            .rev()
            .find(|s| !s.offsets.is_empty())
            .map(|s| s.next() - 1)?;
        self.purged.is_none_or(|p| last > p).then_some(last)
    }
}

/// A record header's fields: payload length, whether it ends its batch, CRC and index.
fn header_fields(h: &[u8]) -> (usize, bool, u32, u64) {
    let raw = u32::from_le_bytes(h[..4].try_into().expect("4 bytes"));
    let sum = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes"));
    let index = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
    (
        (raw & !BATCH_END) as usize,
        raw & BATCH_END != 0,
        sum,
        index,
    )
}

/// The payload of a whole record, after checking its header.
fn check(record: &[u8], index: u64) -> Result<&[u8], String> {
    if record.len() < HEADER as usize {
        return Err(format!("entry {index} cut short"));
    }
    let (len, _, sum, at) = header_fields(record);
    let payload = &record[HEADER as usize..];
    if at != index || len != payload.len() {
        return Err(format!(
            "entry {at} of {len} bytes where entry {index} was expected"
        ));
    }
    if crc(index, payload) != sum {
        return Err(format!("entry {index} fails its checksum"));
    }
    Ok(payload)
}

/// Reads a segment's record boundaries. The last segment's records are checked in full and
/// a torn one at its end is cut off; earlier segments were synced before the next began, so
/// their headers are enough, and damage there is an error.
fn scan(path: &Path, first: u64, last: bool) -> Result<Segment, String> {
    let at = |e: io::Error| format!("{}: {e}", path.display());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(at)?;
    let len = file.metadata().map_err(at)?.len();
    let mut offsets = Vec::new();
    let mut pos = 0u64;
    let mut header = [0u8; HEADER as usize];
    let mut record = Vec::new();
    let damage = loop {
        if pos == len || padding(&file, pos, len).map_err(at)? {
            break None;
        }
        if pos + HEADER > len {
            break Some("a record header cut short".to_string());
        }
        file.read_exact_at(&mut header, pos).map_err(at)?;
        let (size, _, _, at_index) = header_fields(&header);
        let size = size as u64;
        let index = first + offsets.len() as u64;
        if pos + HEADER + size > len {
            break Some(format!("entry {index} cut short"));
        }
        if last {
            record.resize((HEADER + size) as usize, 0);
            file.read_exact_at(&mut record, pos).map_err(at)?;
            if let Err(e) = check(&record, index) {
                break Some(e);
            }
        } else if at_index != index {
            break Some(format!("no entry {index}"));
        }
        offsets.push(pos);
        pos += HEADER + size;
    };
    if let Some(what) = damage {
        if !last {
            return Err(format!(
                "{}: {what} at byte {pos}, and later segments follow",
                path.display()
            ));
        }
        let next = first + offsets.len() as u64;
        if let Some(later) = later_batch(&file, pos, len, next).map_err(at)? {
            return Err(format!(
                "{}: {what} at byte {pos}, but a whole later batch follows (up to entry \
                 {later}): the file is damaged, not cut short by a crash",
                path.display()
            ));
        }
        tracing::warn!(
            file = %path.display(),
            at = pos,
            "cut the Raft log where a crash left {what}"
        );
        file.set_len(pos).map_err(at)?;
        file.sync_data().map_err(at)?;
    }
    Ok(Segment {
        first,
        path: path.to_path_buf(),
        tail: read_tail(&file, pos).map_err(at)?,
        file: Arc::new(file),
        offsets,
        end: pos,
        direct: None,
    })
}

/// Whether the bytes from `pos` to the end (`len`) are a direct write's padding: zeros,
/// fewer than a block, up to a block's end.
fn padding(file: &File, pos: u64, len: u64) -> io::Result<bool> {
    if len - pos >= BLOCK || !len.is_multiple_of(BLOCK) {
        return Ok(false);
    }
    let mut rest = vec![0u8; (len - pos) as usize];
    file.read_exact_at(&mut rest, pos)?;
    Ok(rest.iter().all(|&b| b == 0))
}

fn open_direct(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

/// Whether intact records of a later batch lie after the damage at `pos` (where entry `next`
/// was expected): the index of the first such record, found by trying every offset.
fn later_batch(file: &File, pos: u64, len: u64, next: u64) -> io::Result<Option<u64>> {
    let mut rest = vec![0u8; (len - pos) as usize];
    file.read_exact_at(&mut rest, pos)?;
    let mut batch_end: Option<u64> = None;
    let mut o = 1;
    while o + HEADER as usize <= rest.len() {
        let (size, ends_batch, _, index) = header_fields(&rest[o..o + HEADER as usize]);
        let end = o + HEADER as usize + size;
        if index > next
            && index - next < 1 << 24
            && end <= rest.len()
            && check(&rest[o..end], index).is_ok()
        {
            match batch_end {
                Some(e) if index > e => return Ok(Some(index)),
                None if ends_batch => batch_end = Some(index),
                _ => {}
            }
            o = end;
        } else {
            o += 1;
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(index: u64) -> Vec<u8> {
        let mut p = format!("entry {index} ").into_bytes();
        p.resize(100 + (index as usize * 37) % 900, b'x');
        p
    }

    /// Appends as the store does: a batch laid out for a direct write, sized exactly.
    fn append(log: &LogFiles, indexes: std::ops::Range<u64>) {
        let size = indexes.clone().map(|i| payload(i).len() + 16).sum();
        let mut b = log.batch(size);
        for i in indexes {
            b.push(i, |w| w.extend_from_slice(&payload(i)));
        }
        log.append(&b).unwrap();
    }

    fn assert_holds(log: &LogFiles, indexes: std::ops::Range<u64>) {
        let got = log.read(0, u64::MAX).unwrap();
        let want: Vec<(u64, Bytes)> = indexes.map(|i| (i, Bytes::from(payload(i)))).collect();
        assert_eq!(got, want);
    }

    /// Where each segment's last record ends.
    fn ends(log: &LogFiles) -> Vec<u64> {
        let inner = log.inner.lock().unwrap();
        inner.segments.iter().map(|s| s.end).collect()
    }

    fn segments(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|f| f.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn entries_read_back_across_segments_and_a_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let log = LogFiles::open_with(tmp.path(), None, 4096).unwrap();
        for start in (1..200).step_by(7) {
            append(&log, start..start + 7);
        }
        assert_eq!(log.last_index(), Some(203));
        assert!(segments(tmp.path()).len() > 10);
        assert_holds(&log, 1..204);
        assert_eq!(
            log.read(50, 53).unwrap(),
            (50..53)
                .map(|i| (i, Bytes::from(payload(i))))
                .collect::<Vec<_>>()
        );
        drop(log);
        let log = LogFiles::open_with(tmp.path(), None, 4096).unwrap();
        assert_holds(&log, 1..204);
        append(&log, 204..210);
        assert_holds(&log, 1..210);
        // Out of order is refused.
        let mut b = Batch::default();
        b.push(300, |w| w.push(1));
        assert!(log.append(&b).is_err());
    }

    #[test]
    fn a_torn_last_record_is_cut_at_open_and_the_log_goes_on() {
        let tmp = tempfile::tempdir().unwrap();
        let log = LogFiles::open(tmp.path(), None).unwrap();
        append(&log, 1..6);
        let good = log.inner.lock().unwrap().segments[0].end;
        drop(log);
        let path = tmp.path().join(segment_name(1));
        // Half of a sixth record, then a whole one whose payload a crash left unwritten.
        let mut b = Batch::default();
        b.push(6, |w| w.extend_from_slice(&payload(6)));
        for torn in [&b.buf[..b.buf.len() / 2], &b.buf[..]] {
            let mut bytes = std::fs::read(&path).unwrap();
            bytes.truncate(good as usize);
            bytes.extend_from_slice(torn);
            if torn.len() == b.buf.len() {
                let n = bytes.len();
                bytes[n - 10..].fill(0);
            }
            std::fs::write(&path, &bytes).unwrap();
            let log = LogFiles::open(tmp.path(), None).unwrap();
            assert_eq!(std::fs::metadata(&path).unwrap().len(), good);
            assert_holds(&log, 1..6);
        }
        let log = LogFiles::open(tmp.path(), None).unwrap();
        append(&log, 6..8);
        assert_holds(&log, 1..8);
    }

    /// Damage in the last batch is a crash's (its pages reach the disk in any order), and is
    /// cut; damage with a whole batch after it is not, and stops the open.
    #[test]
    fn damage_followed_by_a_later_batch_stops_the_open() {
        let tmp = tempfile::tempdir().unwrap();
        let log = LogFiles::open(tmp.path(), None).unwrap();
        append(&log, 1..6);
        append(&log, 6..9);
        append(&log, 9..11);
        let at = |i: u64| log.inner.lock().unwrap().segments[0].offsets[(i - 1) as usize];
        let (seven, nine) = (at(7), at(9));
        drop(log);
        let path = tmp.path().join(segment_name(1));
        let good = std::fs::read(&path).unwrap();
        let flip = |offset: u64| {
            let mut bytes = good.clone();
            bytes[offset as usize + HEADER as usize + 3] ^= 0xff;
            std::fs::write(&path, &bytes).unwrap();
        };
        // Entry 9 torn, 10 written: the last batch, cut at 9.
        flip(nine);
        let log = LogFiles::open(tmp.path(), None).unwrap();
        assert_holds(&log, 1..9);
        drop(log);
        // Entry 7 damaged with the batch 9-10 whole after it: refused, and nothing cut.
        flip(seven);
        let err = LogFiles::open(tmp.path(), None).err().expect("refused");
        assert!(err.contains("a whole later batch follows"), "{err}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good.len() as u64);
    }

    #[test]
    fn damage_before_the_last_segment_stops_the_open() {
        let tmp = tempfile::tempdir().unwrap();
        let log = LogFiles::open_with(tmp.path(), None, 1024).unwrap();
        for start in (1..30).step_by(3) {
            append(&log, start..start + 3);
        }
        let len = log.inner.lock().unwrap().segments[0].end;
        drop(log);
        let first = tmp.path().join(segment_name(1));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&first)
            .unwrap()
            .set_len(len - 5)
            .unwrap();
        let err = LogFiles::open_with(tmp.path(), None, 1024)
            .err()
            .expect("refused");
        assert!(err.contains("later segments follow"), "{err}");
    }

    #[test]
    fn a_truncation_survives_a_reopen_and_appends_continue_from_it() {
        let tmp = tempfile::tempdir().unwrap();
        let log = LogFiles::open_with(tmp.path(), None, 2048).unwrap();
        for start in (1..60).step_by(4) {
            append(&log, start..start + 4);
        }
        log.truncate(23).unwrap();
        assert_eq!(log.last_index(), Some(22));
        assert_holds(&log, 1..23);
        drop(log);
        let log = LogFiles::open_with(tmp.path(), None, 2048).unwrap();
        assert_holds(&log, 1..23);
        append(&log, 23..30);
        assert_holds(&log, 1..30);
        // Down to nothing, then from the same index again.
        log.truncate(1).unwrap();
        assert_eq!(log.last_index(), None);
        drop(log);
        let log = LogFiles::open_with(tmp.path(), None, 2048).unwrap();
        assert_eq!(log.read(0, u64::MAX).unwrap(), vec![]);
        append(&log, 1..3);
        assert_holds(&log, 1..3);
    }

    #[test]
    fn a_purge_removes_whole_segments_that_no_pin_holds() {
        let tmp = tempfile::tempdir().unwrap();
        let log = Arc::new(LogFiles::open_with(tmp.path(), None, 2048).unwrap());
        for start in (1..100).step_by(4) {
            append(&log, start..start + 4);
        }
        let before = segments(tmp.path()).len();
        let pin = log.pin(10);
        log.purge(50).unwrap();
        // Entries from 10 are kept while pinned; the segments wholly before it are gone.
        let held = log.read_pinned(0, u64::MAX).unwrap();
        assert!(held.first().unwrap().0 <= 10 && held.first().unwrap().0 > 1);
        assert_eq!(log.read_pinned(10, 11).unwrap().len(), 1);
        assert_eq!(log.read(10, 11).unwrap().len(), 0, "purged");
        assert_eq!(log.read(0, 52).unwrap().len(), 1);
        drop(pin);
        log.purge(50).unwrap();
        let held = log.read_pinned(0, u64::MAX).unwrap();
        let first = held.first().unwrap().0;
        assert!(first > 40 && first <= 51, "{first}");
        assert!(segments(tmp.path()).len() < before);
        // A reopen told of a later purge drops the segments it covers, as after a crash
        // between the purge's record and the removal.
        drop(log);
        let log = LogFiles::open_with(tmp.path(), Some(80), 2048).unwrap();
        let first = log.read_pinned(0, u64::MAX).unwrap().first().unwrap().0;
        assert!(first > 70 && first <= 81, "{first}");
        assert_eq!(log.last_index(), Some(100));
        // Everything purged: the next append may start past the end.
        log.purge(150).unwrap();
        assert_eq!(log.last_index(), None);
        append(&log, 151..153);
        assert_holds(&log, 151..153);
        drop(log);
        let log = LogFiles::open_with(tmp.path(), Some(150), 2048).unwrap();
        assert_holds(&log, 151..153);
    }

    #[test]
    fn a_failed_write_stops_later_appends() {
        let tmp = tempfile::tempdir().unwrap();
        let log = LogFiles::open(tmp.path(), None).unwrap();
        append(&log, 1..3);
        log.inner.lock().unwrap().broken = Some("disk full".into());
        let mut b = Batch::default();
        b.push(3, |w| w.push(0));
        let err = log.append(&b).unwrap_err().to_string();
        assert!(err.contains("disk full"), "{err}");
    }

    /// The same appends and truncations give the same log bytes with direct writes and
    /// without, whether a batch was laid out for a direct write, outgrew that layout, or was
    /// laid out before the log changed; either kind of log reopens as the other.
    #[test]
    fn direct_and_buffered_appends_write_the_same_log() {
        let tmp = tempfile::tempdir().unwrap();
        if !direct_io_works(tmp.path()) {
            eprintln!("skipped: {} takes no O_DIRECT", tmp.path().display());
            return;
        }
        let run = |dir: &Path, direct: bool| {
            LogFiles::create_dir(dir).unwrap();
            let log = LogFiles::open_in(dir, None, 8192, direct).unwrap();
            let push = |b: &mut Batch, r: std::ops::Range<u64>| {
                for i in r {
                    b.push(i, |w| w.extend_from_slice(&payload(i)));
                }
            };
            let mut next = 1;
            for round in 0..40u64 {
                let n = 1 + round % 5;
                // Room for all, for none (the buffer moves as it grows), or laid out before
                // another append.
                let mut b = log.batch(if round % 3 == 0 { 0 } else { 1 << 16 });
                if round % 4 == 3 {
                    let mut other = log.batch(1 << 16);
                    push(&mut other, next..next + 1);
                    log.append(&other).unwrap();
                    next += 1;
                }
                push(&mut b, next..next + n);
                log.append(&b).unwrap();
                next += n;
                if round % 7 == 6 {
                    next -= 2;
                    log.truncate(next).unwrap();
                }
                // Back into an earlier segment, with a batch laid out before the cut.
                if round % 13 == 12 {
                    let mut stale = log.batch(1 << 16);
                    next -= 9;
                    log.truncate(next).unwrap();
                    push(&mut stale, next..next + 2);
                    log.append(&stale).unwrap();
                    next += 2;
                }
            }
            // Back to the last record of an earlier segment that ends in the block where
            // that record starts: its tail then comes from memory.
            let cut = {
                let inner = log.inner.lock().unwrap();
                let n = inner.segments.len();
                inner
                    .segments
                    .iter()
                    .take(n - 1)
                    .rev()
                    .find(|s| {
                        let at = *s.offsets.last().unwrap();
                        at - at % BLOCK == s.end - s.end % BLOCK && s.next() + 20 < next
                    })
                    .map(|s| s.next() - 1)
                    .expect("such a segment")
            };
            log.truncate(cut).unwrap();
            let mut b = log.batch(1 << 16);
            push(&mut b, cut..cut + 4);
            log.append(&b).unwrap();
            next = cut + 4;
            assert_holds(&log, 1..next);
            let ends = ends(&log);
            (log, next, ends)
        };
        let (direct, next, ends) = run(&tmp.path().join("direct"), true);
        let (buffered, next_b, ends_b) = run(&tmp.path().join("buffered"), false);
        assert_eq!((next, &ends), (next_b, &ends_b));
        assert!(segments(&tmp.path().join("direct")).len() > 3);
        // Past each end: a direct write's zeros up to a block's end; nothing in the other.
        for (name, end) in segments(&tmp.path().join("direct")).iter().zip(&ends) {
            let d = std::fs::read(tmp.path().join("direct").join(name)).unwrap();
            let b = std::fs::read(tmp.path().join("buffered").join(name)).unwrap();
            assert_eq!(b.len() as u64, *end, "{name}");
            assert_eq!(&d[..*end as usize], &b[..], "{name}");
            // (None after a truncation that no append followed.)
            assert!(
                d.len() as u64 == *end || (d.len() as u64).is_multiple_of(BLOCK),
                "{name}"
            );
            assert!(d.len() as u64 - end < BLOCK, "{name}");
            assert!(d[*end as usize..].iter().all(|&x| x == 0), "{name}");
        }
        drop((direct, buffered));
        // Each reopens as the other kind and goes on; the padding is not taken for damage.
        for (name, direct) in [("direct", false), ("buffered", true)] {
            let dir = tmp.path().join(name);
            let log = LogFiles::open_in(&dir, None, 8192, direct).unwrap();
            assert_holds(&log, 1..next);
            append(&log, next..next + 3);
            let mut b = log.batch(1 << 16);
            b.push(next + 3, |w| w.extend_from_slice(&payload(next + 3)));
            log.append(&b).unwrap();
            assert_holds(&log, 1..next + 4);
            drop(log);
            let log = LogFiles::open_in(&dir, None, 8192, !direct).unwrap();
            assert_holds(&log, 1..next + 4);
        }
    }

    /// Zeros after the last record are a direct write's padding only when they are fewer
    /// than a block and end on a block's end. Otherwise they are damage: cut in the last
    /// segment (as a crash leaves them), refused in an earlier one.
    #[test]
    fn zeros_past_a_block_or_off_a_block_end_are_damage_not_padding() {
        let tmp = tempfile::tempdir().unwrap();
        let log = LogFiles::open_with(tmp.path(), None, 2048).unwrap();
        for start in (1..40).step_by(4) {
            append(&log, start..start + 4);
        }
        let ends = ends(&log);
        drop(log);
        let names = segments(tmp.path());
        assert!(names.len() > 2);
        let (first, last) = (
            tmp.path().join(&names[0]),
            tmp.path().join(names.last().unwrap()),
        );
        let (first_end, last_end) = (ends[0] as usize, *ends.last().unwrap() as usize);
        let saved = (
            std::fs::read(&first).unwrap(),
            std::fs::read(&last).unwrap(),
        );
        let with_zeros = |path: &Path, bytes: &[u8], end: usize, zeros: usize| {
            let mut b = bytes[..end].to_vec();
            b.resize(end + zeros, 0);
            std::fs::write(path, b).unwrap();
        };
        let to_block_end = |end: usize| (BLOCK as usize - end % BLOCK as usize) % BLOCK as usize;
        // Fewer zeros than that, and not none.
        let short = |end: usize| if to_block_end(end) == 7 { 6 } else { 7 };
        // Up to the block's end: padding, in either segment.
        with_zeros(&first, &saved.0, first_end, to_block_end(first_end));
        with_zeros(&last, &saved.1, last_end, to_block_end(last_end));
        let log = LogFiles::open_with(tmp.path(), None, 2048).unwrap();
        assert_holds(&log, 1..41);
        drop(log);
        assert_eq!(
            std::fs::metadata(&last).unwrap().len() as usize,
            last_end + to_block_end(last_end)
        );
        // A block of zeros, or zeros that stop short of a block's end: damage.
        for zeros in [to_block_end(first_end) + BLOCK as usize, short(first_end)] {
            with_zeros(&first, &saved.0, first_end, zeros);
            let err = LogFiles::open_with(tmp.path(), None, 2048)
                .err()
                .expect("refused");
            assert!(err.contains("later segments follow"), "{err}");
        }
        with_zeros(&first, &saved.0, first_end, 0);
        for zeros in [to_block_end(last_end) + BLOCK as usize, short(last_end)] {
            with_zeros(&last, &saved.1, last_end, zeros);
            let log = LogFiles::open_with(tmp.path(), None, 2048).unwrap();
            assert_holds(&log, 1..41);
            assert_eq!(
                std::fs::metadata(&last).unwrap().len() as usize,
                last_end,
                "cut"
            );
        }
    }

    /// Appends go through a descriptor opened with O_DIRECT where the filesystem takes it.
    #[test]
    fn appends_bypass_the_page_cache_where_the_filesystem_allows_it() {
        assert!(!direct_io_works(Path::new("/nonexistent/sluice-probe")));
        let tmp = tempfile::tempdir().unwrap();
        let log = LogFiles::open(tmp.path(), None).unwrap();
        append(&log, 1..4);
        let direct = direct_io_works(tmp.path());
        assert_eq!(log.direct, direct);
        let writer = log.inner.lock().unwrap().segments[0].direct.clone();
        assert_eq!(writer.is_some(), direct);
        if let Some(f) = writer {
            use std::os::fd::AsRawFd;
            let info =
                std::fs::read_to_string(format!("/proc/self/fdinfo/{}", f.as_raw_fd())).unwrap();
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .map(|f| i64::from_str_radix(f.trim(), 8).unwrap())
                .unwrap();
            assert_ne!(flags & libc::O_DIRECT as i64, 0, "{info}");
        } else {
            eprintln!(
                "{} takes no O_DIRECT: appends are buffered",
                tmp.path().display()
            );
        }
    }

    const CHILD: &str = "SLUICE_LOG_FILES_CRASH_CHILD";

    /// Appends until killed, recording after each synced append the last index written.
    fn append_until_killed(dir: &Path) {
        let log = LogFiles::open_with(&dir.join("log"), None, 1 << 20).unwrap();
        let mut next = 1;
        loop {
            let n = fastrand::u64(1..20);
            append(&log, next..next + n);
            next += n;
            std::fs::write(dir.join("acked.tmp"), (next - 1).to_string()).unwrap();
            std::fs::rename(dir.join("acked.tmp"), dir.join("acked")).unwrap();
        }
    }

    /// A writer killed mid-append (a real crash): every entry it was told is written reads
    /// back intact, and the log goes on from where it stopped.
    #[test]
    fn a_crash_keeps_every_acknowledged_entry() {
        if let Ok(dir) = std::env::var(CHILD) {
            append_until_killed(Path::new(&dir));
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "queue::log_files::tests::a_crash_keeps_every_acknowledged_entry",
                "--nocapture",
            ])
            .env(CHILD, tmp.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let acked = |p: &Path| -> u64 {
            std::fs::read_to_string(p.join("acked"))
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0)
        };
        let end = std::time::Instant::now() + std::time::Duration::from_secs(120);
        // Past a few segments' worth of entries before the kill.
        while acked(tmp.path()) < 4000 {
            assert!(std::time::Instant::now() < end, "the writer fell behind");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let acked = acked(tmp.path());
        let log = LogFiles::open_with(&tmp.path().join("log"), None, 1 << 20).unwrap();
        let last = log.last_index().unwrap();
        assert!(last >= acked, "acknowledged {acked}, found {last}");
        assert_holds(&log, 1..last + 1);
        append(&log, last + 1..last + 3);
        assert_holds(&log, 1..last + 3);
    }
}
