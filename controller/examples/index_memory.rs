//! The leader's scheduling index: memory per queued recipient, and the cost of taking the next
//! due part of a queue and putting it back (what every lease and release does), at growing
//! queue sizes. Prints a table: `cargo run -p sluice-controller --example index_memory`
//! (an example rather than a bench, so that it reuses the test build's RocksDB).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use sluice_controller::queue::command::QueueKey;
use sluice_controller::queue::state::{MsgRecord, QueueState, RcptRecord, RcptState};

/// Counts live heap bytes, so that the index's size is measured, not estimated.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        LIVE.fetch_add(n, Ordering::Relaxed);
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn record(queue: usize) -> MsgRecord {
    MsgRecord {
        mail_from: String::new(),
        envid: String::new(),
        ret: String::new(),
        job_id: String::new(),
        received_by: String::new(),
        client_ip: String::new(),
        received_ms: 0,
        size: 0,
        priority: 0,
        acct_headers: Vec::new(),
        queues: vec![QueueKey {
            dest: format!("d{queue}.test"),
            vmta: "v1".into(),
        }],
        rcpts: vec![RcptRecord {
            address: String::new(),
            orcpt: String::new(),
            notify: 0,
            queue: 0,
            state: RcptState::Queued,
            attempts: 0,
            next_attempt_ms: 0,
            lease: 0,
            last_error: String::new(),
        }],
    }
}

fn main() {
    let queues = 10_000;
    println!(
        "| queued recipients | queues | index bytes per recipient | take+put back per op (ns) |"
    );
    println!("|---|---|---|---|");
    for n in [10_000u64, 100_000, 1_000_000] {
        let before = LIVE.load(Ordering::Relaxed);
        let mut st = QueueState::default();
        for id in 0..n {
            // The records themselves live in RocksDB; only the index stays in memory.
            let rec = record((id % queues) as usize);
            st.index_message(id, &rec);
        }
        let bytes = LIVE.load(Ordering::Relaxed) - before;
        let ops = 200_000u64;
        let t = Instant::now();
        for i in 0..ops {
            let q = &mut st.queues[(i % queues) as usize];
            if let Some(first) = q.ready.pop_first() {
                q.ready.insert((first.0 + 1, first.1, first.2));
            }
        }
        let per = t.elapsed().as_nanos() as f64 / ops as f64;
        println!(
            "| {n} | {queues} | {:.0} | {per:.0} |",
            bytes as f64 / n as f64
        );
    }
}
