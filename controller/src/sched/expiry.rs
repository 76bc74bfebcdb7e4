//! Two leader loops that end things on time: leases whose worker went quiet, and mail past
//! its `bounce-after`, also in queues that nothing delivers (paused, or whose source IP no
//! worker owns).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::Scheduler;
use crate::clock::now_ms;
use crate::queue::command::{Command, LocalReply, Part};

/// When each lease last heard from its worker, and since when this node leads.
#[derive(Default)]
pub struct Activity {
    leader_since: Option<u64>,
    last: HashMap<u64, u64>,
}

impl Activity {
    pub fn touch(&mut self, lease: u64, now: u64) {
        self.last.insert(lease, now);
    }

    pub fn forget(&mut self, lease: u64) {
        self.last.remove(&lease);
    }
}

/// Ends leases with no word from their worker for a lease TTL past their expiry, so their
/// messages become ready again. A new leader first waits one TTL, so that the workers of its
/// predecessor's leases have time to renew them with it.
pub async fn lease_expiry_loop(s: Arc<Scheduler>) {
    let ttl = s.ctl.settings.scheduler.lease_ttl_ms;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = now_ms();
        if s.ctl.leader_only().is_err() {
            let mut a = s.activity.lock().unwrap();
            a.leader_since = None;
            a.last.clear();
            continue;
        }
        let since = *s.activity.lock().unwrap().leader_since.get_or_insert(now);
        if now < since + ttl {
            continue;
        }
        let leases: Vec<(u64, u64)> = {
            let st = s.ctl.state.lock().unwrap();
            st.leases
                .iter()
                .map(|(id, l)| (*id, l.expires_ms))
                .collect()
        };
        let expired: Vec<u64> = {
            let a = s.activity.lock().unwrap();
            leases
                .into_iter()
                .filter(|(id, exp)| {
                    let last = a.last.get(id).map_or(0, |t| t + ttl);
                    now > (*exp).max(last)
                })
                .map(|(id, _)| id)
                .collect()
        };
        for id in expired {
            tracing::warn!(lease = id, "lease expired; its messages are ready again");
            crate::metrics::METRICS.leases_expired.inc();
            if let Err(e) = s.release(id, true).await {
                tracing::warn!(lease = id, "could not end the lease: {}", e.message());
            }
        }
    }
}

/// At most this many parts per expiry command.
const EXPIRE_BATCH: usize = 5000;
/// Leaders' clocks may differ by this much: the sweep looks this far past the first message
/// too young to expire.
const CLOCK_SLACK_MS: u64 = 600_000;

/// Bounces queued recipients past their queue's `bounce-after`, every two seconds.
pub async fn bounce_after_loop(s: Arc<Scheduler>) {
    // bounce-after per queue index, for a policy version.
    let mut cache: (u64, Vec<u64>) = (0, Vec::new());
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        if s.ctl.leader_only().is_err() {
            continue;
        }
        let served = s.ctl.policy();
        if cache.0 != served.version {
            cache = (served.version, Vec::new());
        }
        let now = now_ms();
        let parts: Vec<Part> = {
            let st = s.ctl.state.lock().unwrap();
            let ba = &mut cache.1;
            for q in &st.index.queues[ba.len()..] {
                ba.push(
                    served
                        .policy
                        .domain_settings(&q.key.dest, Some(&q.key.vmta))
                        .bounce_after
                        .map(|d| d.secs() * 1000)
                        .unwrap_or(u64::MAX),
                );
            }
            let Some(&min) = ba.iter().min() else {
                continue;
            };
            let mut parts = Vec::new();
            for (&id, m) in &st.index.msgs {
                if m.received_ms.saturating_add(min) > now + CLOCK_SLACK_MS
                    || parts.len() >= EXPIRE_BATCH
                {
                    break;
                }
                for (part, qid) in m.ready_parts() {
                    if m.received_ms.saturating_add(ba[qid as usize]) <= now {
                        parts.push((id, part));
                    }
                }
            }
            parts
        };
        if parts.is_empty() {
            continue;
        }
        tracing::info!(parts = parts.len(), "bouncing mail past bounce-after");
        let cmd = Command::Expire {
            now_ms: now,
            parts,
            reply: LocalReply {
                code: 554,
                enhanced: "5.4.7".into(),
                text: "delivery time expired: queued longer than bounce-after".into(),
                category: "message-expired".into(),
            },
        };
        if let Err(e) = s.ctl.raft.client_write(cmd).await {
            tracing::warn!("could not expire mail: {e}");
        }
    }
}
