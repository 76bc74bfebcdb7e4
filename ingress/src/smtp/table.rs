//! The open SMTP sessions of this node. When `total-max-smtp-in` is reached, the session that
//! has gone longest without completing a command (or a chunk of message data) gives its place
//! to the new client, so slow or idle connections cannot lock everyone out.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

pub struct Slot {
    id: u64,
    epoch: Instant,
    /// Milliseconds from `epoch` to the last completed line or chunk.
    progress_ms: AtomicU64,
    evict: Notify,
}

impl Slot {
    pub fn touch(&self) {
        self.progress_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Resolves once the session is asked to give its place.
    pub async fn evicted(&self) {
        self.evict.notified().await
    }
}

pub struct SessionTable {
    epoch: Instant,
    next: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Slot>>>,
}

impl Default for SessionTable {
    fn default() -> Self {
        SessionTable {
            epoch: Instant::now(),
            next: AtomicU64::new(1),
            open: Mutex::new(HashMap::new()),
        }
    }
}

/// A session's entry; leaves the table when dropped.
pub struct Entry<'a> {
    table: &'a SessionTable,
    pub slot: Arc<Slot>,
}

impl Drop for Entry<'_> {
    fn drop(&mut self) {
        self.table.open.lock().unwrap().remove(&self.slot.id);
    }
}

impl SessionTable {
    pub fn register(&self) -> Entry<'_> {
        let slot = Arc::new(Slot {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            epoch: self.epoch,
            progress_ms: AtomicU64::new(0),
            evict: Notify::new(),
        });
        slot.touch();
        self.open.lock().unwrap().insert(slot.id, slot.clone());
        Entry { table: self, slot }
    }

    pub fn len(&self) -> usize {
        self.open.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Asks the session stalled longest, if for at least `min_stall`, to close. The session
    /// leaves the table at once, so two new clients never evict the same one.
    pub fn evict_stalled(&self, min_stall: Duration) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64;
        let Some(limit) = now.checked_sub(min_stall.as_millis() as u64) else {
            return false;
        };
        let mut open = self.open.lock().unwrap();
        let oldest = open
            .values()
            .map(|s| (s.progress_ms.load(Ordering::Relaxed), s.id))
            .filter(|(p, _)| *p <= limit)
            .min();
        let Some((_, id)) = oldest else { return false };
        let slot = open.remove(&id).expect("found above");
        // notify_one keeps the wake-up if the session is not reading right now.
        slot.evict.notify_one();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_stalled_session_is_evicted_and_only_once() {
        let t = SessionTable::default();
        let a = t.register();
        std::thread::sleep(Duration::from_millis(30));
        let b = t.register();
        std::thread::sleep(Duration::from_millis(30));
        // Nothing has stalled for a second yet.
        assert!(!t.evict_stalled(Duration::from_secs(1)));
        a.slot.touch();
        // b has now gone longest without progress.
        assert!(t.evict_stalled(Duration::from_millis(10)));
        assert_eq!(t.len(), 1);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), b.slot.evicted())
                .await
                .expect("b was told to go");
        });
        drop(a);
        assert!(t.is_empty());
    }
}
