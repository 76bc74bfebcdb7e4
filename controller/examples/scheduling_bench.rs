//! Scheduling decisions per second on the leader with 10 k, 1 M and 10 M queued recipients over
//! 10 k queues, and the index's memory per queued recipient. One decision is what a worker's
//! Acquire costs: find the due queues, order them by priority and age, check the budgets, and
//! take a connection's worth of parts. After each decision the taken parts go back one
//! millisecond later, as a lease's release or retry would, so every queue takes its turn.
//! The last column is the worker's fair share worked out while its slots are scarce (once per
//! Acquire, then only when more than half its slots are taken), with every queue due.
//! `cargo run -p sluice-controller --example scheduling_bench -- [MAX_RECIPIENTS]`

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sluice_controller::clock::now_ms;
use sluice_controller::queue::command::QueueKey;
use sluice_controller::queue::state::{LeaseRecord, MsgRecord, QueueState, RcptRecord, RcptState};
use sluice_controller::sched::{due, share};

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

const QUEUES: u64 = 10_000;

fn record(queue: u64, next_attempt_ms: u64) -> MsgRecord {
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
        verp: false,
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
            next_attempt_ms,
            lease: 0,
            last_error: String::new(),
            dsn: 0,
            last_status: String::new(),
            last_mx: String::new(),
            last_attempt_ms: 0,
        }],
    }
}

fn main() {
    let max: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000_000);
    // A tenth of the destinations have their own rule and priority; the rest fall to `*`.
    let mut text = String::from(
        "<virtual-mta v1>\nsmtp-source-host 127.0.0.1 a.example.com\n</virtual-mta>\n",
    );
    text.push_str("<domain *>\nmax-smtp-out 20\nmax-msg-per-connection 100\n</domain>\n");
    for q in (0..QUEUES).step_by(10) {
        text.push_str(&format!(
            "<domain d{q}.test>\nmax-smtp-out 5\nqueue-priority {}\n</domain>\n",
            q % 100
        ));
    }
    let policy = sluice_common::policy::load_str(
        std::path::Path::new("bench.conf"),
        &text,
        Default::default(),
    )
    .map_err(|e| e.to_string())
    .unwrap()
    .policy;
    // The decision is a pure function of the state: no node, no RocksDB.
    let mut st = QueueState::default();
    let ips = ["127.0.0.1".parse().unwrap()];

    println!(
        "| queued recipients | queues | index bytes per recipient | decisions/s | µs per decision | vs 10 k | parts granted/s | ns per granted part | µs per fair share (scarce) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut base = 0.0;
    let mut queued = 0u64;
    for n in [10_000u64, 1_000_000, 10_000_000] {
        if n > max {
            break;
        }
        let before = LIVE.load(Ordering::Relaxed);
        for id in queued..n {
            // The records live in RocksDB; only the index is kept in memory.
            st.index.insert(id, &record(id % QUEUES, 0), &st.modes);
        }
        let grown = LIVE.load(Ordering::Relaxed) - before;
        queued = n;
        let per_rcpt = if n == 10_000 {
            grown as f64 / n as f64
        } else {
            // Measured on the growth, so the fixed part is left out.
            grown as f64 / (n - n / 10) as f64
        };
        let prios: Vec<u8> = st
            .index
            .queues
            .iter()
            .map(|q| {
                policy
                    .domain_settings(&q.key.dest, None)
                    .queue_priority
                    .map(|p| p.0)
                    .unwrap_or(50)
            })
            .collect();
        let now = now_ms();
        let decisions = 2_000u32;
        let t = Instant::now();
        let mut granted = 0u64;
        for _ in 0..decisions {
            let Some(pick) =
                due::pick(&st, &policy, &prios, &ips, now, 100, &|_| true, &mut [0; 7])
            else {
                continue;
            };
            granted += pick.parts.len() as u64;
            // The parts come back a millisecond later, as after a lease.
            for (id, _) in pick.parts {
                let t = st.index.msgs[&id].ready_at(0).unwrap_or(0);
                st.index.insert(id, &record(id % QUEUES, t + 1), &st.modes);
            }
        }
        let secs = t.elapsed().as_secs_f64();
        assert!(granted > 0, "nothing was granted");
        // One lease on a worker of two slots: half are taken, so the shares are worked out.
        st.leases.insert(
            u64::MAX,
            LeaseRecord {
                worker: "bench".into(),
                granted_ms: now,
                expires_ms: now + 60_000,
                queue: st.index.queues[0].key.clone(),
                member: "v1".into(),
                source_ip: None,
                parts: Vec::new(),
                reported: false,
            },
        );
        let recent = share::Recent::new();
        let rounds = 20u32;
        let ts = Instant::now();
        for _ in 0..rounds {
            let s = share::Shares::of(&st, &policy, "bench", &ips, 2, &recent, now + 10);
            assert!(
                !s.allows(&st.index.queues[0].key),
                "the shares were not worked out"
            );
        }
        let share_us = ts.elapsed().as_secs_f64() * 1e6 / rounds as f64;
        st.leases.remove(&u64::MAX);
        let rate = decisions as f64 / secs;
        if base == 0.0 {
            base = rate;
        }
        println!(
            "| {n} | {QUEUES} | {per_rcpt:.0} | {rate:.0} | {:.1} | {:.2}x | {:.0} | {:.0} | {share_us:.0} |",
            1e6 / rate,
            rate / base,
            granted as f64 / secs,
            secs * 1e9 / granted as f64
        );
    }
    let _ = Duration::ZERO;
}
