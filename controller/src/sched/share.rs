//! A worker's connection slots shared among the queues active on it, so that a slow
//! destination cannot take every slot while its old connections are still busy.
//!
//! A queue is active on a worker when it has due mail this worker can send, holds one of its
//! connections, or was granted one within the last `RECENT_MS`. A quarter of the slots is
//! headroom for queues that are not active yet (a destination whose mail arrives next must
//! not wait for a slow one's connections to end); each active queue's share is the rest
//! divided by their number. While more than half the slots are free, any queue may take one.
//! Beyond that, a queue under its share may take one, and a queue past it only if the free
//! slots still cover the headroom and what the other active queues lack of their shares.
//! `max-smtp-out` stays each queue's ceiling. Working the shares out is one pass over the
//! queues' due times, without policy lookups (it runs under the state lock). A pure function
//! of the state, the policy and the time, tested without a node.

use std::collections::HashMap;
use std::net::IpAddr;

use sluice_common::policy::{Policy, Target};

use super::due;
use crate::queue::command::QueueKey;
use crate::queue::state::QueueState;

/// A queue granted a connection this recently stays active on the worker: its mail comes in
/// bursts, and a slot taken between two bursts would be held long by a slow peer.
pub const RECENT_MS: u64 = 10_000;

/// When each queue last was granted a connection on one worker.
pub type Recent = HashMap<QueueKey, u64>;

#[derive(Debug)]
pub struct Shares {
    capacity: u32,
    /// None while slots are plenty: then any queue may take one, `plenty_left` more times
    /// (until half the slots are used), and then the shares are worked out anew.
    active: Option<Active>,
    plenty_left: u32,
}

#[derive(Debug, Default)]
struct Active {
    /// Connections held on this worker by each queue that holds some or was recent.
    held: HashMap<QueueKey, u32>,
    /// Due queues this worker can serve that are not in `held` (each holds none).
    others: u32,
}

impl Active {
    fn count(&self) -> usize {
        self.held.len() + self.others as usize
    }
}

/// Whether a worker owning `ips` can send for a queue through `vmta`.
fn servable(policy: &Policy, vmta: &str, ips: &[IpAddr]) -> bool {
    match policy.target(vmta) {
        Some(Target::Pool(p)) => p
            .members
            .iter()
            .any(|m| due::source_ip(policy, m, ips).is_some()),
        Some(Target::Vmta(v)) => due::source_ip(policy, &v.name, ips).is_some(),
        None => due::source_ip(policy, "", ips).is_some(),
    }
}

impl Shares {
    /// The shares on the worker `worker` (owning `ips`, with `capacity` slots) now.
    pub fn of(
        st: &QueueState,
        policy: &Policy,
        worker: &str,
        ips: &[IpAddr],
        capacity: u32,
        recent: &Recent,
        now: u64,
    ) -> Shares {
        let capacity = capacity.max(1);
        let mut held: HashMap<QueueKey, u32> = HashMap::new();
        for l in st.leases.values().filter(|l| l.worker == worker) {
            *held.entry(l.queue.clone()).or_default() += 1;
        }
        let used: u32 = held.values().sum();
        let free = capacity.saturating_sub(used);
        if free * 2 > capacity {
            return Shares {
                capacity,
                active: None,
                plenty_left: free - capacity / 2,
            };
        }
        for (q, &t) in recent {
            if now.saturating_sub(t) < RECENT_MS {
                held.entry(q.clone()).or_default();
            }
        }
        let mut others = 0;
        for (i, &head) in st.index.heads.iter().enumerate() {
            if head > now {
                continue;
            }
            let q = &st.index.queues[i];
            if !q.paused && !held.contains_key(&q.key) && servable(policy, &q.key.vmta, ips) {
                others += 1;
            }
        }
        Shares {
            capacity,
            active: Some(Active { held, others }),
            plenty_left: 0,
        }
    }

    /// Whether `queue` may open one more connection on this worker.
    pub fn allows(&self, queue: &QueueKey) -> bool {
        let Some(active) = &self.active else {
            return self.plenty_left > 0;
        };
        let share = share_of(self.capacity, active.count());
        let mine = active.held.get(queue).copied().unwrap_or(0);
        if mine < share {
            return true;
        }
        let used: u32 = active.held.values().sum();
        let free = self.capacity.saturating_sub(used);
        let owed: u32 = active
            .held
            .iter()
            .filter(|(q, _)| *q != queue)
            .map(|(_, &n)| share.saturating_sub(n))
            .sum::<u32>()
            .saturating_add(active.others.saturating_mul(share));
        free > owed.saturating_add(headroom(self.capacity))
    }

    /// `queue` was granted a connection.
    pub fn took(&mut self, queue: &QueueKey) {
        match &mut self.active {
            Some(active) => {
                let n = active.held.entry(queue.clone()).or_insert_with(|| {
                    // A due queue counted among the others now holds a connection.
                    active.others = active.others.saturating_sub(1);
                    0
                });
                *n += 1;
            }
            None => self.plenty_left = self.plenty_left.saturating_sub(1),
        }
    }
}

/// Slots kept for queues that are not active yet.
fn headroom(capacity: u32) -> u32 {
    capacity / 4
}

fn share_of(capacity: u32, active: usize) -> u32 {
    ((capacity - headroom(capacity)) / active.max(1) as u32).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(d: &str) -> QueueKey {
        QueueKey {
            dest: d.into(),
            vmta: "v".into(),
        }
    }

    /// Shares with the given connections held, and `others` due queues holding none.
    fn shares(capacity: u32, held: &[(&str, u32)], others: u32) -> Shares {
        Shares {
            capacity,
            active: Some(Active {
                held: held.iter().map(|&(d, n)| (key(d), n)).collect(),
                others,
            }),
            plenty_left: 0,
        }
    }

    fn take_all(s: &mut Shares, q: &str) -> u32 {
        let mut n = 0;
        while s.allows(&key(q)) {
            s.took(&key(q));
            n += 1;
        }
        n
    }

    #[test]
    fn a_slow_queue_stops_where_another_queue_s_share_begins() {
        // 20 slots, 5 of them headroom: shares of 7. Whether the fast queue holds 2 of its
        // share or none (between bursts), the tarpit grows to 20 - 5 - 7 = 8 and no more.
        for fast_held in [2, 0] {
            let mut s = shares(20, &[("tarpit.test", 7), ("fast.test", fast_held)], 0);
            take_all(&mut s, "tarpit.test");
            assert_eq!(s.active.as_ref().unwrap().held[&key("tarpit.test")], 8);
            assert!(s.allows(&key("fast.test")));
        }
    }

    #[test]
    fn a_queue_alone_leaves_headroom_for_the_next_one() {
        let mut s = shares(20, &[("tarpit.test", 10)], 0);
        assert_eq!(take_all(&mut s, "tarpit.test"), 5);
        // A queue not active before is entitled to its share at once.
        assert!(s.allows(&key("fast.test")));
    }

    #[test]
    fn due_queues_without_connections_are_owed_their_share() {
        // 40 slots, 10 headroom; a big queue holding 3 and 9 due queues holding none: shares
        // of 3, and 27 owed, so the big one may not grow.
        let mut s = shares(40, &[("big.test", 3)], 9);
        assert_eq!(take_all(&mut s, "big.test"), 0);
        // One of them takes its first connection: it is no longer among the others.
        s.took(&key("small.test"));
        let a = s.active.as_ref().unwrap();
        assert_eq!((a.others, a.held[&key("small.test")]), (8, 1));
        // Once the small ones hold their shares, the rest short of the headroom is the big
        // one's: nobody else is owed anything.
        let held: Vec<(String, u32)> = (0..9).map(|i| (format!("s{i}.test"), 3)).collect();
        let mut refs: Vec<(&str, u32)> = held.iter().map(|(d, n)| (d.as_str(), *n)).collect();
        refs.push(("big.test", 3));
        let mut s = shares(40, &refs, 0);
        assert_eq!(take_all(&mut s, "big.test"), 0, "30 used, 10 headroom");
        // 80 slots: shares of 6. The big one grows to its share; then the 47 free slots are
        // the 27 the small ones are owed and the 20 of headroom.
        let mut s = shares(80, &refs, 0);
        assert_eq!(take_all(&mut s, "big.test"), 3);
        // With the small ones at their shares, it takes the rest short of the headroom.
        let held: Vec<(String, u32)> = (0..9).map(|i| (format!("s{i}.test"), 6)).collect();
        let mut refs: Vec<(&str, u32)> = held.iter().map(|(d, n)| (d.as_str(), *n)).collect();
        refs.push(("big.test", 6));
        let mut s = shares(80, &refs, 0);
        assert_eq!(take_all(&mut s, "big.test"), 80 - 60 - 20);
        let mut s = shares(100, &refs, 0);
        // 100 slots: shares of 7; the small ones are owed 9, the headroom is 25.
        assert_eq!(take_all(&mut s, "big.test"), 1 + (100 - 54 - 7 - 9 - 25));
    }

    #[test]
    fn while_slots_are_plenty_nothing_is_restricted_until_half_are_used() {
        let mut s = Shares {
            capacity: 20,
            active: None,
            plenty_left: 10,
        };
        assert_eq!(take_all(&mut s, "any.test"), 10);
        assert!(
            !s.allows(&key("any.test")),
            "the shares must be worked out anew"
        );
    }
}
