//! Authentication failures counted in a sliding window per client address and per user name
//! (`smtp-max-auth-failure-rate`). Once either has reached the rate, AUTH is refused without
//! looking at the password, so guessing gains nothing.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sluice_common::policy::value::Rate;

/// Used where the source sets no `smtp-max-auth-failure-rate`.
pub const DEFAULT_RATE: Rate = Rate {
    count: 10,
    per_secs: 60,
};

/// Entries kept before old ones are swept (each holds at most `rate.count` times).
const SWEEP_AT: usize = 10_000;

#[derive(Hash, PartialEq, Eq, Clone)]
enum Key {
    Address(IpAddr),
    User(String),
}

#[derive(Default)]
pub struct AuthFailures {
    recent: Mutex<HashMap<Key, VecDeque<Instant>>>,
}

impl AuthFailures {
    /// Why AUTH is refused for this address (and user, if named), or None.
    pub fn blocked(&self, ip: IpAddr, user: Option<&str>, rate: Rate) -> Option<&'static str> {
        if rate.is_unlimited() {
            return None;
        }
        let window = Duration::from_secs(rate.per_secs);
        let mut recent = self.recent.lock().unwrap();
        let mut full = |k: Key| {
            recent.get_mut(&k).is_some_and(|q| {
                while q.front().is_some_and(|t| t.elapsed() > window) {
                    q.pop_front();
                }
                q.len() as u64 >= rate.count
            })
        };
        if full(Key::Address(ip)) {
            return Some("too many authentication failures from your address");
        }
        if user.is_some_and(|u| full(Key::User(u.to_string()))) {
            return Some("too many authentication failures for this user");
        }
        None
    }

    /// Counts a failure; `user` only when it names a real account, so that made-up names
    /// cannot fill the table.
    pub fn record(&self, ip: IpAddr, user: Option<&str>, rate: Rate) {
        if rate.is_unlimited() {
            return;
        }
        let window = Duration::from_secs(rate.per_secs);
        let now = Instant::now();
        let mut recent = self.recent.lock().unwrap();
        if recent.len() >= SWEEP_AT {
            recent.retain(|_, q| q.back().is_some_and(|t| t.elapsed() <= window));
        }
        let keys = std::iter::once(Key::Address(ip)).chain(user.map(|u| Key::User(u.into())));
        for k in keys {
            let q = recent.entry(k).or_default();
            q.push_back(now);
            while q.len() as u64 > rate.count {
                q.pop_front();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_block_the_address_and_the_user_until_the_window_passes() {
        let f = AuthFailures::default();
        let rate = Rate {
            count: 3,
            per_secs: 1,
        };
        let a: IpAddr = "127.0.0.5".parse().unwrap();
        let b: IpAddr = "::1".parse().unwrap();
        for _ in 0..3 {
            assert!(f.blocked(a, Some("alice"), rate).is_none());
            f.record(a, Some("alice"), rate);
        }
        assert!(f.blocked(a, None, rate).is_some());
        // Another address, same user: refused too.
        assert!(f.blocked(b, Some("alice"), rate).is_some());
        assert!(f.blocked(b, Some("bob"), rate).is_none());
        std::thread::sleep(Duration::from_millis(1100));
        assert!(f.blocked(a, Some("alice"), rate).is_none());
        let unlimited = Rate {
            count: 0,
            per_secs: 0,
        };
        f.record(b, None, unlimited);
        assert!(f.blocked(b, None, unlimited).is_none());
    }
}
