//! Enqueue throughput and latency of the replicated queue, with 1 and 3 `sluice controller`
//! processes on loopback, against a RocksDB-only baseline that writes the same batches with a
//! synced WAL, in the same run. Prints a markdown table:
//! `cargo build -p sluice && cargo run -p sluice-controller --example enqueue_bench -- [MESSAGES]`

use std::time::{Duration, Instant};

use sluice_proto::queue::queue_client::QueueClient;
use sluice_proto::queue::{EnqueueRequest, NewMessage, Recipient};

const CONCURRENCY: usize = 64;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn pct(v: &mut [u64], p: f64) -> f64 {
    v.sort_unstable();
    if v.is_empty() {
        return 0.0;
    }
    v[((v.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
}

fn message(size: usize) -> NewMessage {
    NewMessage {
        mail_from: "bench@example.com".into(),
        recipients: vec![Recipient {
            address: "user@bench.test".into(),
            orcpt: String::new(),
            notify: 0,
        }],
        vmta: "v1".into(),
        body: vec![b'x'; size].into(),
        ..Default::default()
    }
}

/// Controller processes that die with the benchmark.
struct Procs(Vec<std::process::Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The `sluice` binary of this build (`cargo build -p sluice` first), or `SLUICE_BIN`.
fn sluice_bin() -> std::path::PathBuf {
    if let Ok(b) = std::env::var("SLUICE_BIN") {
        return b.into();
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let bin = target.join("debug/sluice");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p sluice` first, or set SLUICE_BIN",
        bin.display()
    );
    bin
}

/// Starts `n` `sluice controller` processes on loopback and forms a cluster; returns the
/// leader's address and the processes.
async fn cluster(dir: &std::path::Path, n: usize) -> (String, Procs) {
    std::fs::create_dir_all(dir).unwrap();
    let policy = dir.join("policy.conf");
    std::fs::write(
        &policy,
        "<virtual-mta v1>\nsmtp-source-host 127.0.0.1 a.example.com\n</virtual-mta>\n",
    )
    .unwrap();
    let addrs: Vec<String> = (0..n)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let mut procs = Procs(Vec::new());
    for (i, a) in addrs.iter().enumerate() {
        let settings = dir.join(format!("c{i}.toml"));
        std::fs::write(
            &settings,
            format!(
                "node_id = {}\ndata_dir = \"{}\"\ngrpc_listen = \"{a}\"\npolicy = \"{}\"\n\
                 [raft]\nsnapshot_after_entries = 1000000\n",
                i + 1,
                dir.join(format!("c{i}")).display(),
                policy.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join(format!("c{i}.log"))).unwrap();
        procs.0.push(
            std::process::Command::new(sluice_bin())
                .args(["controller", "--settings", settings.to_str().unwrap()])
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("start sluice controller"),
        );
    }
    let mut ch = None;
    for _ in 0..100 {
        if let Ok(c) = sluice_proto::connect(&addrs[0]).await {
            ch = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let members = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| (i as u64 + 1, a.clone()))
        .collect();
    sluice_proto::admin::admin_client::AdminClient::new(ch.expect("controller 1 listens"))
        .init(sluice_proto::admin::InitRequest { members })
        .await
        .unwrap();
    for _ in 0..100 {
        let ch = sluice_proto::connect(&addrs[0]).await.unwrap();
        let st = sluice_proto::admin::admin_client::AdminClient::new(ch)
            .status(sluice_proto::admin::Empty {})
            .await
            .unwrap()
            .into_inner();
        if st.leader_id != 0 {
            return (addrs[st.leader_id as usize - 1].clone(), procs);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no leader");
}

async fn run_enqueue(addr: &str, total: usize, size: usize) -> (f64, f64, f64) {
    let ch = sluice_proto::connect(addr).await.unwrap();
    let client = QueueClient::new(ch).max_encoding_message_size(64 << 20);
    let per = total / CONCURRENCY;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per);
            for _ in 0..per {
                let t = Instant::now();
                c.enqueue(EnqueueRequest {
                    messages: vec![message(size)],
                })
                .await
                .expect("enqueue");
                lat.push(t.elapsed().as_micros() as u64);
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let secs = start.elapsed().as_secs_f64();
    (
        (per * CONCURRENCY) as f64 / secs,
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99),
    )
}

/// The same messages written straight to RocksDB in groups of CONCURRENCY, WAL synced.
fn baseline(dir: &std::path::Path, total: usize, size: usize) -> f64 {
    let db = sluice_controller::queue::layout::open_db(&dir.join("baseline")).unwrap();
    let cf = sluice_controller::queue::layout::cf(&db, sluice_controller::queue::layout::CF_BODY);
    let body = vec![b'x'; size];
    let mut w = rocksdb::WriteOptions::default();
    w.set_sync(true);
    let start = Instant::now();
    let mut id = 0u64;
    while (id as usize) < total {
        let mut batch = rocksdb::WriteBatch::default();
        for _ in 0..CONCURRENCY {
            batch.put_cf(cf, id.to_be_bytes(), &body);
            id += 1;
        }
        db.write_opt(batch, &w).unwrap();
    }
    total as f64 / start.elapsed().as_secs_f64()
}

/// What apply writes per group, straight to RocksDB: the log entry with a synced WAL, then
/// the state machine's records without one, as the controller does; with and without
/// `atomic_flush`, the durability fix for WAL-less state-machine writes.
fn apply_pattern(dir: &std::path::Path, total: usize, size: usize, atomic: bool) -> f64 {
    use sluice_controller::queue::layout::{self, ALL_CFS};
    let mut opts = layout::db_options();
    opts.set_atomic_flush(atomic);
    let cfs = ALL_CFS
        .into_iter()
        .map(|n| rocksdb::ColumnFamilyDescriptor::new(n, rocksdb::Options::default()));
    let db =
        rocksdb::DB::open_cf_descriptors(&opts, dir.join(format!("apply-{atomic}")), cfs).unwrap();
    let body = vec![b'x'; size];
    let record = vec![b'r'; 300];
    let start = Instant::now();
    let mut id = 0u64;
    let mut index = 0u64;
    while (id as usize) < total {
        index += 1;
        let mut log = rocksdb::WriteBatch::default();
        let mut sm = rocksdb::WriteBatch::default();
        for _ in 0..CONCURRENCY {
            log.put_cf(layout::cf(&db, layout::CF_LOG), index.to_be_bytes(), &body);
            sm.put_cf(layout::cf(&db, layout::CF_BODY), id.to_be_bytes(), &body);
            sm.put_cf(layout::cf(&db, layout::CF_MSG), id.to_be_bytes(), &record);
            sm.put_cf(layout::cf(&db, layout::CF_ACCT), id.to_be_bytes(), &record);
            id += 1;
        }
        sm.put_cf(
            layout::cf(&db, layout::CF_SM_META),
            b"meta",
            index.to_be_bytes(),
        );
        db.write_opt(log, &layout::synced()).unwrap();
        db.write_opt(sm, &layout::no_wal()).unwrap();
    }
    total as f64 / start.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let total: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    println!("| size | setup | enqueued msg/s | p50 ms | p99 ms | vs RocksDB-only |");
    println!("|---|---|---|---|---|---|");
    for size in [5 * 1024, 100 * 1024] {
        let n = if size > 10_000 { total / 5 } else { total };
        let dir = tempfile::tempdir().unwrap();
        let base = baseline(dir.path(), n, size);
        println!(
            "| {} KB | RocksDB only, batches of {CONCURRENCY}, WAL synced | {base:.0} | | | 1.00x |",
            size / 1024
        );
        for atomic in [false, true] {
            let r = apply_pattern(dir.path(), n, size, atomic);
            println!(
                "| {} KB | RocksDB only, apply's writes (log synced, records without WAL), atomic_flush {} | {r:.0} | | | {:.2}x |",
                size / 1024,
                if atomic { "on" } else { "off" },
                r / base
            );
        }
        for nodes in [1usize, 3] {
            let d = dir.path().join(format!("n{nodes}"));
            let (leader, procs) = cluster(&d, nodes).await;
            let (rate, p50, p99) = run_enqueue(&leader, n, size).await;
            drop(procs);
            println!(
                "| {} KB | Sluice, {nodes} node{} ({CONCURRENCY} concurrent clients) | {rate:.0} | {p50:.1} | {p99:.1} | {:.2}x |",
                size / 1024,
                if nodes > 1 { "s" } else { "" },
                rate / base
            );
        }
    }
    std::process::exit(0);
}
