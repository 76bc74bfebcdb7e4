//! The controller's clock. Every command the leader proposes carries its time, so the whole
//! cluster's schedules follow the leader's clock; apply never reads it.

use std::sync::atomic::{AtomicU64, Ordering};

/// How far `sluice debug advance-clock` moved this process's clock (tests only).
static OFFSET_MS: AtomicU64 = AtomicU64::new(0);

/// The most a test may move the clock in all: ten years.
pub const MAX_OFFSET_MS: u64 = 10 * 365 * 86_400_000;

/// Moves this controller's clock forward; refused past `MAX_OFFSET_MS` in all.
pub fn advance(ms: u64) -> Result<u64, String> {
    OFFSET_MS
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |o| {
            o.checked_add(ms).filter(|&n| n <= MAX_OFFSET_MS)
        })
        .map_err(|_| format!("the clock may move at most {MAX_OFFSET_MS} ms in all"))?;
    Ok(now_ms())
}

/// Wall time in ms, plus any test offset.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
        + OFFSET_MS.load(Ordering::SeqCst)
}
