//! Which queue gets the next connection: due queues by queue-priority, then the longest
//! waiting (within the worker's fair share, `share`), and for a pool the member with the most free connections within its budgets.
//! A pure function of the state, the policy and the time, so it is tested without a node.

use std::collections::BinaryHeap;
use std::net::IpAddr;

use sluice_common::policy::{DomainSettings, Policy, Target};

use super::budgets::{self, Sender};
use crate::queue::command::{Part, QueueKey};
use crate::queue::state::QueueState;

/// A queue, the member VMTA that will send, its source IP, its effective rule and the parts
/// to lease.
#[derive(Debug, Clone)]
pub struct Pick {
    pub queue: QueueKey,
    pub member: String,
    pub source_ip: Option<IpAddr>,
    pub rule: DomainSettings,
    pub parts: Vec<Part>,
}

/// Priority, then earlier time, then lower index, packed so that a larger number comes first
/// and comparing is one branch-free integer compare.
type DueKey = u128;

fn due_key(prio: u8, t: u64, i: usize) -> DueKey {
    ((prio as u128) << 112) | (((!t) as u128) << 48) | (!(i as u64) & 0xffff_ffff_ffff) as u128
}

fn due_index(k: DueKey) -> usize {
    (!(k as u64) & 0xffff_ffff_ffff) as usize
}

/// Due queues, highest queue-priority first, then the longest waiting. Usually the first is
/// granted, so it comes from one pass over the contiguous heads; the rest are ordered (a
/// heap) only when it is not.
pub struct DueQueues<'a> {
    heads: &'a [u64],
    prios: &'a [u8],
    now: u64,
    first: Option<DueKey>,
    rest: Option<BinaryHeap<DueKey>>,
}

impl<'a> DueQueues<'a> {
    pub fn new(heads: &'a [u64], prios: &'a [u8], now: u64) -> Self {
        let mut d = DueQueues {
            heads,
            prios,
            now,
            first: None,
            rest: None,
        };
        d.first = d.keys().max();
        d
    }

    fn keys(&self) -> impl Iterator<Item = DueKey> + '_ {
        self.heads
            .iter()
            .zip(self.prios)
            .enumerate()
            .filter(|&(_, (&t, _))| t <= self.now)
            .map(|(i, (&t, &p))| due_key(p, t, i))
    }
}

impl Iterator for DueQueues<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        if let Some(k) = self.first.take() {
            return Some(due_index(k));
        }
        if self.rest.is_none() {
            let mut heap: BinaryHeap<DueKey> = self.keys().collect();
            heap.pop(); // the first, already given
            self.rest = Some(heap);
        }
        self.rest.as_mut()?.pop().map(due_index)
    }
}

/// The rule for a queue sent through a member VMTA, with backoff values in backoff mode.
pub fn effective(policy: &Policy, dest: &str, member: &str, backoff: bool) -> DomainSettings {
    let mut s = policy.domain_settings(dest, Some(member));
    if backoff {
        if let Some(r) = s.backoff_max_msg_rate {
            s.max_msg_rate = Some(r);
        }
        if let Some(n) = s.backoff_max_smtp_out {
            s.max_smtp_out = Some(n);
        }
        if let Some(r) = s.backoff_retry_after.clone() {
            s.retry_after = Some(r);
        }
    }
    s
}

/// The VMTAs a queue may send through: its VMTA, or its pool's members.
pub fn members(policy: &Policy, vmta: &str) -> Vec<String> {
    match policy.target(vmta) {
        Some(Target::Vmta(v)) => vec![v.name.clone()],
        Some(Target::Pool(p)) => p.members.clone(),
        None => vec![String::new()],
    }
}

/// The source IP a member sends from on this worker: its own, or the worker's first. None
/// when the member's IP is not this worker's.
pub fn source_ip(policy: &Policy, member: &str, worker_ips: &[IpAddr]) -> Option<Option<IpAddr>> {
    match policy.vmtas.get(member).and_then(|v| v.source_ip) {
        Some(ip) if worker_ips.contains(&ip) => Some(Some(ip)),
        Some(_) => None,
        None => Some(worker_ips.first().copied()),
    }
}

/// Picks the queue and member VMTA for a new connection from a worker owning `worker_ips`,
/// and up to `batch` due parts for it, among the queues `allowed` (the worker's fair share).
/// Each budget that kept a member of a due queue from a connection is added to `waits`.
#[allow(clippy::too_many_arguments)]
pub fn pick(
    st: &QueueState,
    policy: &Policy,
    prios: &[u8],
    worker_ips: &[IpAddr],
    now: u64,
    batch: u32,
    allowed: &dyn Fn(&QueueKey) -> bool,
    waits: &mut budgets::Waits,
) -> Option<Pick> {
    for i in DueQueues::new(&st.index.heads, prios, now) {
        let q = &st.index.queues[i];
        if q.paused || !allowed(&q.key) {
            continue;
        }
        let backoff = st.modes.in_backoff(&q.key, now);
        // Spread a pool by each member's free connection capacity.
        let mut best: Option<(u32, String, Option<IpAddr>, DomainSettings)> = None;
        for m in members(policy, &q.key.vmta) {
            let Some(ip) = source_ip(policy, &m, worker_ips) else {
                continue;
            };
            if ip.is_some_and(|ip| st.modes.ip_disabled(&ip, now)) {
                continue;
            }
            let rule = effective(policy, &q.key.dest, &m, backoff);
            let s = Sender {
                dest: &q.key.dest,
                member: &m,
                ip,
            };
            let free = match budgets::may_connect(st, policy, &rule, &s, now) {
                Ok(free) => free,
                Err(w) => {
                    waits[w as usize] += 1;
                    continue;
                }
            };
            if best.as_ref().is_none_or(|(f, ..)| free > *f) {
                best = Some((free, m, ip, rule));
            }
        }
        let Some((_, member, ip, rule)) = best else {
            continue;
        };
        let s = Sender {
            dest: &q.key.dest,
            member: &member,
            ip,
        };
        let mut cap = batch as u64;
        if let Some(n) = rule.max_msg_per_connection.filter(|&n| n > 0) {
            cap = cap.min(n as u64);
        }
        let n = budgets::message_allowance(st, &rule, &s, now, cap);
        let parts: Vec<Part> = q
            .ready
            .iter()
            .take_while(|&&(t, _, _)| t <= now)
            .take(n as usize)
            .map(|&(_, m, p)| (m, p))
            .collect();
        if parts.is_empty() {
            continue;
        }
        return Some(Pick {
            queue: q.key.clone(),
            member,
            source_ip: ip,
            rule,
            parts,
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::DueQueues;

    #[test]
    fn due_queues_come_by_priority_then_age_then_index() {
        let heads = [50, 10, u64::MAX, 10, 5, 200];
        let prios = [50, 50, 90, 50, 10, 90];
        let order: Vec<usize> = DueQueues::new(&heads, &prios, 100).collect();
        // 2 has nothing ready and 5 is not due yet; 4 has the lowest priority.
        assert_eq!(order, vec![1, 3, 0, 4]);
        assert_eq!(DueQueues::new(&heads, &prios, 0).count(), 0);
    }
}
