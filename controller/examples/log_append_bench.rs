//! What a synced Raft log append costs: the log as it is stored (a column family of the queue's
//! RocksDB, `LogStore::append`: a write batch, the memtable, a synced WAL, and later a flush of
//! every entry to an SST file) against plain files written once (a growing file, and
//! segments zero-filled ahead so that a sync carries no size change; the zero-filling is done
//! inline here and counted). Same entries, same disk, same run. Prints a markdown table; CPU is the whole process's, RocksDB's threads included.
//! `cargo run -p sluice-controller --example log_append_bench -- [MB_PER_ROW]`
//! (run it on the disk the queue uses: it writes under the system's temporary folder).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use rocksdb::WriteBatch;
use sluice_controller::queue::layout::{self, CF_LOG};

/// How big a zero-filled segment is.
const SEGMENT: u64 = 64 << 20;

/// The process's CPU seconds so far (all threads) and bytes it had written to storage.
fn usage() -> (f64, u64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // clock ticks are 100 per second on Linux.
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let io = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    let written = io
        .lines()
        .find_map(|l| l.strip_prefix("write_bytes: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    (cpu, written)
}

/// Entry contents: `repetitive` compresses about 20:1 (like `sluice gen`'s bodies), otherwise
/// base64-like text that hardly compresses (like attachments).
fn entry(size: usize, repetitive: bool) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut random = vec![0u8; size];
    fastrand::fill(&mut random);
    (0..size)
        .map(|i| {
            if i % 78 == 77 {
                b'\n'
            } else if repetitive {
                b"The quick brown fox jumps over the lazy dog. "[i % 45]
            } else {
                ALPHABET[(random[i] & 63) as usize]
            }
        })
        .collect()
}

struct Row {
    wall: Duration,
    cpu: f64,
    written: u64,
    lat_us: Vec<u64>,
}

trait Log {
    fn append(&mut self, index: u64, value: &[u8]);
    /// Waits for background work the appends caused (RocksDB's flushes).
    fn settle(&mut self) {}
}

struct Rocks {
    db: std::sync::Arc<rocksdb::DB>,
}

impl Log for Rocks {
    fn append(&mut self, index: u64, value: &[u8]) {
        let mut batch = WriteBatch::with_capacity_bytes(value.len() + 64);
        batch.put_cf(layout::cf(&self.db, CF_LOG), layout::log_key(index), value);
        self.db.write_opt(batch, &layout::synced()).expect("write");
    }

    fn settle(&mut self) {
        let end = Instant::now() + Duration::from_secs(120);
        while Instant::now() < end {
            let busy = [
                "rocksdb.num-running-flushes",
                "rocksdb.mem-table-flush-pending",
            ]
            .iter()
            .map(|p| self.db.property_int_value(*p).ok().flatten().unwrap_or(0))
            .sum::<u64>();
            if busy == 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// One file, appended to and synced: each sync also writes the inode (the size grew).
struct Growing {
    file: File,
}

impl Log for Growing {
    fn append(&mut self, index: u64, value: &[u8]) {
        self.file.write_all(&index.to_be_bytes()).expect("write");
        self.file.write_all(value).expect("write");
        self.file.sync_data().expect("sync");
    }
}

/// Segments zero-filled and synced when opened, then overwritten in place: a sync writes data
/// blocks only. The zero-filling is counted (a real log would do it ahead, off the append path).
struct Prefilled {
    dir: std::path::PathBuf,
    file: Option<File>,
    offset: u64,
    segments: u32,
}

impl Prefilled {
    fn next_segment(&mut self) {
        let path = self.dir.join(format!("{:08}.seg", self.segments));
        self.segments += 1;
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .expect("segment");
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..SEGMENT >> 20 {
            f.write_all(&zeros).expect("zero-fill");
        }
        f.sync_all().expect("sync");
        // Out of the page cache: the zeros sit there in large folios, and an append that
        // dirties part of one writes the whole folio back (9x the bytes on this kernel).
        use std::os::fd::AsRawFd;
        // SAFETY: a valid descriptor; the call only drops clean cached pages.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .expect("sync dir");
        self.file = Some(f);
        self.offset = 0;
    }
}

impl Log for Prefilled {
    fn append(&mut self, index: u64, value: &[u8]) {
        let need = 8 + value.len() as u64;
        if self.file.is_none() || self.offset + need > SEGMENT {
            self.next_segment();
        }
        let f = self.file.as_ref().expect("segment open");
        f.write_all_at(&index.to_be_bytes(), self.offset)
            .and_then(|()| f.write_all_at(value, self.offset + 8))
            .expect("write");
        f.sync_data().expect("sync");
        self.offset += need;
    }
}

fn run(log: &mut dyn Log, value: &[u8], count: u64) -> Row {
    let (cpu0, w0) = usage();
    let t0 = Instant::now();
    let mut lat_us = Vec::with_capacity(count as usize);
    for i in 1..=count {
        let t = Instant::now();
        log.append(i, value);
        lat_us.push(t.elapsed().as_micros() as u64);
    }
    log.settle();
    let wall = t0.elapsed();
    let (cpu1, w1) = usage();
    Row {
        wall,
        cpu: cpu1 - cpu0,
        written: w1 - w0,
        lat_us,
    }
}

fn pct(v: &mut [u64], p: f64) -> f64 {
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
}

fn main() {
    let mb: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(512);
    println!(
        "| entry | contents | log | appends/s | MB/s | CPU ms per MB | disk MB written per MB | p50 / p99 append (ms) | vs RocksDB (appends/s, CPU per MB) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for size in [128usize << 10, 1 << 20] {
        for repetitive in [true, false] {
            let value = entry(size, repetitive);
            let count = (mb << 20) / size as u64;
            let logical_mb = (count * size as u64) as f64 / (1u64 << 20) as f64;
            let mut base: Option<(f64, f64)> = None;
            for kind in [
                "RocksDB column family (as stored)",
                "growing file",
                "zero-filled segments",
            ] {
                let tmp = tempfile::tempdir().expect("temp dir");
                let mut log: Box<dyn Log> = match kind {
                    "growing file" => Box::new(Growing {
                        file: File::create(tmp.path().join("log")).expect("file"),
                    }),
                    "zero-filled segments" => Box::new(Prefilled {
                        dir: tmp.path().to_path_buf(),
                        file: None,
                        offset: 0,
                        segments: 0,
                    }),
                    _ => Box::new(Rocks {
                        db: layout::open_db(tmp.path()).expect("open"),
                    }),
                };
                let mut r = run(log.as_mut(), &value, count);
                drop(log);
                let rate = count as f64 / r.wall.as_secs_f64();
                let cpu_per_mb = r.cpu * 1000.0 / logical_mb;
                let (b_rate, b_cpu) = *base.get_or_insert((rate, cpu_per_mb));
                println!(
                    "| {} KB | {} | {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} / {:.2} | {:.2}x, {:.2}x |",
                    size >> 10,
                    if repetitive {
                        "repetitive"
                    } else {
                        "base64-like"
                    },
                    kind,
                    rate,
                    logical_mb / r.wall.as_secs_f64(),
                    cpu_per_mb,
                    r.written as f64 / (1u64 << 20) as f64 / logical_mb,
                    pct(&mut r.lat_us, 0.5),
                    pct(&mut r.lat_us, 0.99),
                    rate / b_rate,
                    if b_cpu > 0.0 { cpu_per_mb / b_cpu } else { 0.0 },
                );
            }
        }
    }
}
