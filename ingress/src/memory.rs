//! Message bytes held at once by all SMTP sessions and HTTP requests of this node are capped
//! (`ingress.max_bytes_in_flight`): each takes a share before it keeps data.

use std::sync::Arc;

use tokio::sync::Semaphore;

/// Reservations grow in steps of this many KiB.
const STEP_KIB: u64 = 64;

/// One message's share of the cap; given back when dropped.
pub struct Reservation {
    pool: Arc<Semaphore>,
    kib: u64,
}

impl Reservation {
    pub fn new(pool: &Arc<Semaphore>) -> Reservation {
        Reservation {
            pool: pool.clone(),
            kib: 0,
        }
    }

    /// Grows the share to cover `bytes`; false when the cap would be passed.
    pub fn cover(&mut self, bytes: u64) -> bool {
        let need = (bytes >> 10).div_ceil(STEP_KIB).saturating_add(1) * STEP_KIB;
        if need <= self.kib {
            return true;
        }
        let Ok(more) = u32::try_from(need - self.kib) else {
            return false;
        };
        match self.pool.try_acquire_many(more) {
            Ok(p) => {
                p.forget();
                self.kib = need;
                true
            }
            Err(_) => false,
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.pool.add_permits(self.kib as usize);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_stop_at_the_cap_and_come_back() {
        let pool = Arc::new(Semaphore::new(1024)); // 1 MiB
        let mut a = Reservation::new(&pool);
        assert!(a.cover(100));
        assert!(a.cover(700 << 10));
        let mut b = Reservation::new(&pool);
        assert!(!b.cover(400 << 10), "a holds most of the MiB");
        assert!(!a.cover(u64::MAX), "no overflow, no grant");
        drop(a);
        assert!(b.cover(900 << 10));
        drop(b);
        assert_eq!(pool.available_permits(), 1024);
    }
}
