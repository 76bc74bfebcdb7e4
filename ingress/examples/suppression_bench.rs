//! The suppression check at RCPT with a million entries: time per check (hits, misses, whole
//! domains) and memory, against a plain `HashSet<String>` of the same addresses as the
//! baseline. Prints a table. `cargo run --release -p sluice-ingress --example suppression_bench [N]`

use std::collections::HashSet;
use std::hint::black_box;
use std::time::Instant;

use sluice_ingress::suppress::SuppressionSet;

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn addr(i: u64) -> String {
    format!("user.{i:x}.mailbox@domain{}.example.com", i % 1000)
}

fn per_check(n: u64, f: impl Fn(u64) -> bool) -> (f64, u64) {
    let t = Instant::now();
    let mut hits = 0;
    for i in 0..n {
        hits += u64::from(black_box(f(i)));
    }
    (t.elapsed().as_nanos() as f64 / n as f64, hits)
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let checks = 1_000_000u64;
    let now = 1_700_000_000_000;

    let r0 = rss();
    let set = SuppressionSet::default();
    for i in 0..n {
        set.insert(&addr(i), "", "bad-mailbox", 0);
    }
    let set_bytes = rss().saturating_sub(r0);
    let (hit_ns, h1) = per_check(checks, |i| set.check(&addr(i % n), now).is_some());
    let (miss_ns, h2) = per_check(checks, |i| set.check(&addr(n + i), now).is_some());
    assert_eq!((h1, h2), (checks, 0));

    let r1 = rss();
    let base: HashSet<String> = (0..n).map(addr).collect();
    let base_bytes = rss().saturating_sub(r1);
    let (bhit_ns, _) = per_check(checks, |i| base.contains(&addr(i % n).to_ascii_lowercase()));
    let (bmiss_ns, _) = per_check(checks, |i| base.contains(&addr(n + i).to_ascii_lowercase()));
    // Formatting the address is part of every row: measure it alone.
    let (fmt_ns, _) = per_check(checks, |i| addr(i).len() > 1000);

    println!(
        "suppression check, {n} entries, {checks} checks per row (address formatting: {fmt_ns:.0} ns, included)"
    );
    println!("| structure | memory | hit | miss |");
    println!("|---|---|---|---|");
    println!(
        "| SuppressionSet (64-bit hashes) | {:.1} MB | {hit_ns:.0} ns | {miss_ns:.0} ns |",
        set_bytes as f64 / 1e6
    );
    println!(
        "| baseline HashSet<String> | {:.1} MB | {bhit_ns:.0} ns | {bmiss_ns:.0} ns |",
        base_bytes as f64 / 1e6
    );
    println!(
        "| ratio (set / baseline) | {:.2} | {:.2} | {:.2} |",
        set_bytes as f64 / base_bytes.max(1) as f64,
        hit_ns / bhit_ns,
        miss_ns / bmiss_ns
    );
}
