//! The leader's scheduler: which queue gets the next connection within the budgets, the leases
//! through which workers take work, and the decisions on what they report.
//!
//! - `due`: which queue and member VMTA is next (a pure function of the state).
//! - `share`: a worker's slots shared fairly among the queues active on it.
//! - `budgets`: connection and rate limits, from the replicated ledger.
//! - `disposition`: delivered, retry or bounce, and reply-pattern actions.
//! - `delivery`: the settings a worker delivers a lease with.
//! - `expiry`: leases whose worker went quiet, and mail past `bounce-after`.
//! - `lease_service`: the gRPC API.
//!
//! Locking: the queue state (`Controller::state`) and each of this module's own mutexes are
//! never held together, so there is no lock order to get wrong.

pub mod budgets;
pub mod delivery;
pub mod disposition;
pub mod due;
pub mod expiry;
pub mod lease_service;
pub mod notify;
pub mod share;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use sluice_common::group_commit::{GroupCommit, Pending};
use sluice_common::policy::Policy;
use sluice_proto::lease::{Lease, LeasedMessage, LeasedRecipient, Outcome};
use tonic::Status;

use crate::clock::now_ms;
use crate::node::Controller;
use crate::queue::command::{Command, CommandResult, Part, QueueKey, RecipientOutcome};
use crate::queue::read;
use crate::queue::state::RcptState;
use budgets::Sender;
use disposition::LeaseView;

struct WorkerInfo {
    ips: Vec<IpAddr>,
    /// Its connection slots (`worker.capacity`).
    capacity: u32,
    /// When each queue was last granted a connection on it (for `share`).
    recent: share::Recent,
    /// When it last called (ms).
    seen_ms: u64,
}

/// A worker not heard from for this long counts as gone: while it runs it asks for work at
/// least every 10 s, or renews its leases every few seconds while all its slots are busy.
const WORKER_GONE_MS: u64 = 20_000;

/// Groups the outcomes of concurrent reports into one Raft entry, as enqueue does.
type OutcomeGroup = GroupCommit<Vec<RecipientOutcome>, Result<(), String>>;

fn outcome_group(ctl: Arc<Controller>) -> OutcomeGroup {
    GroupCommit::start(
        4096,
        Vec::len,
        move |group: Vec<Pending<Vec<RecipientOutcome>, Result<(), String>>>| {
            let ctl = ctl.clone();
            async move {
                let mut outcomes = Vec::new();
                let mut replies = Vec::new();
                for (o, r) in group {
                    outcomes.extend(o);
                    replies.push(r);
                }
                let res = ctl
                    .raft
                    .client_write(Command::Outcomes {
                        now_ms: now_ms(),
                        outcomes,
                    })
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string());
                for r in replies {
                    let _ = r.send(res.clone());
                }
            }
        },
    )
}

pub struct Scheduler {
    ctl: Arc<Controller>,
    workers: Mutex<HashMap<String, WorkerInfo>>,
    /// queue-priority by queue index, for the policy version in the first field.
    priorities: Mutex<(u64, Arc<Vec<u8>>)>,
    /// When each lease last heard from its worker (leader memory), and since when this node
    /// leads.
    activity: Mutex<expiry::Activity>,
    outcomes: OutcomeGroup,
    next_lease: AtomicU32,
}

fn unavailable(e: impl std::fmt::Display) -> Status {
    Status::unavailable(e.to_string())
}

impl Scheduler {
    pub fn new(ctl: Arc<Controller>) -> Arc<Scheduler> {
        let s = Arc::new(Scheduler {
            outcomes: outcome_group(ctl.clone()),
            ctl,
            workers: Mutex::new(HashMap::new()),
            priorities: Mutex::new((0, Arc::new(Vec::new()))),
            activity: Mutex::new(expiry::Activity::default()),
            next_lease: AtomicU32::new(0),
        });
        tokio::spawn(expiry::lease_expiry_loop(s.clone()));
        tokio::spawn(expiry::bounce_after_loop(s.clone()));
        tokio::spawn(notify::notify_loop(s.clone()));
        tokio::spawn(crate::suppress::sweep_loop(s.ctl.clone()));
        s
    }

    /// Lease ids are unique across leaders: the term in the high bits.
    fn lease_id(&self) -> u64 {
        let term = self.ctl.raft.metrics().borrow().current_term;
        (term << 32) | self.next_lease.fetch_add(1, Ordering::Relaxed) as u64
    }

    fn register(&self, worker: String, ips: Vec<IpAddr>, capacity: u32) {
        let mut workers = self.workers.lock().unwrap();
        let recent = workers
            .remove(&worker)
            .map(|w| w.recent)
            .unwrap_or_default();
        workers.insert(
            worker,
            WorkerInfo {
                ips,
                capacity: capacity.max(1),
                recent,
                seen_ms: now_ms(),
            },
        );
    }

    /// The worker's source IPs, noting that it is alive.
    fn worker_ips(&self, worker: &str) -> Option<Vec<IpAddr>> {
        let mut workers = self.workers.lock().unwrap();
        let w = workers.get_mut(worker)?;
        w.seen_ms = now_ms();
        Some(w.ips.clone())
    }

    /// Notes that a worker is alive (any call it makes).
    fn seen(&self, worker: &str) {
        if let Some(w) = self.workers.lock().unwrap().get_mut(worker) {
            w.seen_ms = now_ms();
        }
    }

    /// Source IPs owned by workers that called lately.
    pub fn live_source_ips(&self, now: u64) -> Vec<IpAddr> {
        let workers = self.workers.lock().unwrap();
        let mut ips: Vec<IpAddr> = workers
            .values()
            .filter(|w| now.saturating_sub(w.seen_ms) < WORKER_GONE_MS)
            .flat_map(|w| w.ips.iter().copied())
            .collect();
        ips.sort_unstable();
        ips.dedup();
        ips
    }

    /// Workers that asked this leader for work: (name, source IPs, capacity, ms since last
    /// heard, live).
    pub fn workers_seen(&self, now: u64) -> Vec<(String, Vec<IpAddr>, u32, u64, bool)> {
        let workers = self.workers.lock().unwrap();
        let mut v: Vec<_> = workers
            .iter()
            .map(|(n, w)| {
                let ago = now.saturating_sub(w.seen_ms);
                (
                    n.clone(),
                    w.ips.clone(),
                    w.capacity,
                    ago,
                    ago < WORKER_GONE_MS,
                )
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The worker's slots as shared among the queues active on it now.
    fn shares(&self, worker: &str, ips: &[IpAddr]) -> share::Shares {
        let now = now_ms();
        let (capacity, recent) = {
            let mut workers = self.workers.lock().unwrap();
            match workers.get_mut(worker) {
                Some(w) => {
                    w.recent
                        .retain(|_, t| now.saturating_sub(*t) < share::RECENT_MS);
                    (w.capacity, w.recent.clone())
                }
                None => (1, share::Recent::new()),
            }
        };
        let policy = self.ctl.policy().policy.clone();
        let st = self.ctl.state.lock().unwrap();
        share::Shares::of(&st, &policy, worker, ips, capacity, &recent, now)
    }

    fn granted_to(&self, worker: &str, queue: &QueueKey, now: u64) {
        if let Some(w) = self.workers.lock().unwrap().get_mut(worker) {
            w.recent.insert(queue.clone(), now);
        }
    }

    /// queue-priority per queue index for the current policy, extended for queues that
    /// appeared since (which needs the state, so the caller passes the keys).
    fn priorities(&self, version: u64) -> Arc<Vec<u8>> {
        let p = self.priorities.lock().unwrap();
        if p.0 == version {
            p.1.clone()
        } else {
            Arc::new(Vec::new())
        }
    }

    fn store_priorities(&self, version: u64, prios: Arc<Vec<u8>>) {
        let mut p = self.priorities.lock().unwrap();
        if p.0 != version || p.1.len() < prios.len() {
            *p = (version, prios);
        }
    }

    /// Grants one new lease to a worker, if a queue is due within its budgets and its share
    /// of the worker's slots.
    async fn grant(
        &self,
        worker: &str,
        ips: &[IpAddr],
        shares: &mut share::Shares,
    ) -> Result<Option<Lease>, Status> {
        if !self.ctl.leader_ready() {
            return Ok(None);
        }
        let served = self.ctl.policy();
        let policy = served.policy.clone();
        let now = now_ms();
        let mut prios = self.priorities(served.version);
        let (pick, handle, grown) = {
            let mut st = self.ctl.state.lock().unwrap();
            let grown = prios.len() < st.index.queues.len();
            if grown {
                let mut v = (*prios).clone();
                for q in &st.index.queues[v.len()..] {
                    v.push(
                        policy
                            .domain_settings(&q.key.dest, None)
                            .queue_priority
                            .map(|p| p.0)
                            .unwrap_or(50),
                    );
                }
                prios = Arc::new(v);
            }
            let batch = self.ctl.settings.scheduler.batch;
            let allowed = |q: &QueueKey| shares.allows(q);
            let mut waits = [0; 7];
            let pick = due::pick(&st, &policy, &prios, ips, now, batch, &allowed, &mut waits);
            crate::metrics::METRICS.budget_waits(&waits);
            let Some(pick) = pick else {
                drop(st);
                if grown {
                    self.store_priorities(served.version, prios);
                }
                return Ok(None);
            };
            let s = Sender {
                dest: &pick.queue.dest,
                member: &pick.member,
                ip: pick.source_ip,
            };
            let handle = st.proposed.add(s.keys(), pick.parts.len() as u64, true);
            (pick, handle, grown)
        };
        if grown {
            self.store_priorities(served.version, prios);
        }
        let lease_id = self.lease_id();
        let ttl = self.ctl.settings.scheduler.lease_ttl_ms;
        let res = self
            .ctl
            .raft
            .client_write(Command::Lease {
                now_ms: now,
                lease_id,
                worker: worker.to_string(),
                expires_ms: now + ttl,
                queue: pick.queue.clone(),
                member: pick.member.clone(),
                source_ip: pick.source_ip,
                new_connection: true,
                parts: pick.parts.clone(),
            })
            .await;
        self.ctl.state.lock().unwrap().proposed.end(handle);
        let taken = match res.map_err(unavailable)?.data {
            CommandResult::Leased { parts } => parts,
            _ => Vec::new(),
        };
        if taken.is_empty() {
            return Ok(None);
        }
        shares.took(&pick.queue);
        crate::metrics::METRICS.leases_granted.inc();
        self.granted_to(worker, &pick.queue, now);
        self.activity.lock().unwrap().touch(lease_id, now);
        let messages = self.leased_messages(&taken, lease_id);
        if messages.is_empty() {
            self.release(lease_id, false).await?;
            return Ok(None);
        }
        let settings = delivery::settings_for(
            &policy,
            &pick.queue,
            &pick.member,
            pick.source_ip,
            &pick.rule,
        );
        Ok(Some(Lease {
            lease_id,
            queue: pick.queue.dest.clone(),
            vmta: pick.member,
            settings: Some(settings),
            messages,
            expires_in_ms: ttl,
        }))
    }

    /// More parts of the same queue for an open connection.
    async fn more(
        &self,
        worker: &str,
        lease_id: u64,
        max: u32,
    ) -> Result<Vec<LeasedMessage>, Status> {
        if !self.ctl.leader_ready() {
            return Ok(Vec::new());
        }
        let policy = self.ctl.policy().policy.clone();
        let now = now_ms();
        let (lease, parts, handle) = {
            let mut st = self.ctl.state.lock().unwrap();
            let lease = match st.leases.get(&lease_id) {
                Some(l) if l.worker == worker => l.clone(),
                Some(_) => return Err(Status::permission_denied("not this worker's lease")),
                None => return Err(Status::not_found("the lease ended")),
            };
            let backoff = st.modes.in_backoff(&lease.queue, now);
            let rule = due::effective(&policy, &lease.queue.dest, &lease.member, backoff);
            let s = Sender {
                dest: &lease.queue.dest,
                member: &lease.member,
                ip: lease.source_ip,
            };
            let mut cap = max.max(1) as u64;
            if let Some(n) = rule.max_msg_per_connection.filter(|&n| n > 0) {
                cap = cap.min((n as u64).saturating_sub(lease.parts.len() as u64));
            }
            let n = budgets::message_allowance(&st, &rule, &s, now, cap);
            let parts: Vec<Part> = match st.index.queue(&lease.queue) {
                Some(q) if !q.paused => q
                    .ready
                    .iter()
                    .take_while(|&&(t, _, _)| t <= now)
                    .take(n as usize)
                    .map(|&(_, m, p)| (m, p))
                    .collect(),
                _ => Vec::new(),
            };
            if parts.is_empty() {
                return Ok(Vec::new());
            }
            let handle = st.proposed.add(s.keys(), parts.len() as u64, false);
            (lease, parts, handle)
        };
        self.activity.lock().unwrap().touch(lease_id, now);
        let res = self
            .ctl
            .raft
            .client_write(Command::Lease {
                now_ms: now,
                lease_id,
                worker: worker.to_string(),
                expires_ms: now + self.ctl.settings.scheduler.lease_ttl_ms,
                queue: lease.queue,
                member: lease.member,
                source_ip: lease.source_ip,
                new_connection: false,
                parts,
            })
            .await;
        self.ctl.state.lock().unwrap().proposed.end(handle);
        let taken = match res.map_err(unavailable)?.data {
            CommandResult::Leased { parts } => parts,
            _ => Vec::new(),
        };
        Ok(self.leased_messages(&taken, lease_id))
    }

    fn leased_messages(&self, parts: &[Part], lease_id: u64) -> Vec<LeasedMessage> {
        leased_messages(&self.ctl.db, &self.ctl.state, parts, lease_id)
    }

    async fn release(&self, lease_id: u64, expired: bool) -> Result<(), Status> {
        self.activity.lock().unwrap().forget(lease_id);
        self.ctl
            .raft
            .client_write(Command::Release {
                now_ms: now_ms(),
                lease_id,
                expired,
            })
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    /// Decides and records a worker's outcomes, then what their reply patterns ask for.
    async fn report(
        &self,
        worker: &str,
        lease_id: u64,
        outcomes: Vec<Outcome>,
        done: bool,
    ) -> Result<(), Status> {
        let now = now_ms();
        let policy: Arc<Policy> = self.ctl.policy().policy.clone();
        let (lease, modes) = {
            let st = self.ctl.state.lock().unwrap();
            match st.leases.get(&lease_id) {
                Some(l) if l.worker == worker => (l.clone(), st.modes.clone()),
                Some(_) => return Err(Status::permission_denied("not this worker's lease")),
                // Ended already (it expired): its outcomes are not accepted.
                None if done => return Ok(()),
                None => return Err(Status::not_found("the lease ended")),
            }
        };
        self.activity.lock().unwrap().touch(lease_id, now);
        let view = LeaseView {
            queue: &lease.queue,
            member: &lease.member,
        };
        let jitter = self.ctl.settings.scheduler.retry_jitter;
        let mut follow_up: Vec<Command> = Vec::new();
        let mut decided = Vec::with_capacity(outcomes.len());
        let mut queue_failure = None;
        for o in &outcomes {
            let rec = read::message(&self.ctl.db, o.message_id).map_err(Status::internal)?;
            let d = disposition::decide(
                &policy,
                &view,
                &modes,
                rec.as_ref(),
                o,
                now,
                jitter * fastrand::f64(),
            );
            for c in disposition::follow_up(&policy, &view, &modes, &d, now) {
                if !follow_up.contains(&c) {
                    follow_up.push(c);
                }
            }
            if queue_failure.is_none() && disposition::queue_level(o, &d) {
                queue_failure = Some(Command::QueueFailure {
                    now_ms: now,
                    queue: lease.queue.clone(),
                    member: lease.member.clone(),
                    attempt: d.attempt.clone(),
                });
            }
            decided.push(RecipientOutcome {
                msg: o.message_id,
                rcpt: o.rcpt_index,
                lease: lease_id,
                kind: d.kind,
                attempt: d.attempt,
            });
        }
        if !decided.is_empty() {
            self.outcomes
                .submit(decided)
                .await
                .unwrap_or_else(|| Err("shutting down".to_string()))
                .map_err(Status::unavailable)?;
        }
        follow_up.extend(queue_failure);
        for cmd in follow_up {
            tracing::info!(queue = %lease.queue, "follow-up: {cmd:?}");
            self.ctl.raft.client_write(cmd).await.map_err(unavailable)?;
        }
        if done {
            self.release(lease_id, false).await?;
        }
        Ok(())
    }

    /// Keeps a worker's leases alive; returns those it no longer holds.
    fn renew(&self, worker: &str, ids: &[u64]) -> Vec<u64> {
        let now = now_ms();
        let held: Vec<bool> = {
            let st = self.ctl.state.lock().unwrap();
            ids.iter()
                .map(|id| st.leases.get(id).is_some_and(|l| l.worker == worker))
                .collect()
        };
        let mut act = self.activity.lock().unwrap();
        let mut gone = Vec::new();
        for (id, held) in ids.iter().zip(held) {
            if held {
                act.touch(*id, now);
            } else {
                gone.push(*id);
            }
        }
        gone
    }

    /// Mode and budget figures for `sluice show queues`: `members` are the VMTAs the queue
    /// sends through.
    pub fn queue_view(
        st: &crate::queue::state::QueueState,
        key: &QueueKey,
        members: &[String],
        now: u64,
    ) -> QueueView {
        use crate::queue::ledger::BudgetKey;
        let connections = st.leases.values().filter(|l| &l.queue == key).count() as u32;
        let sent_last_hour = members
            .iter()
            .filter_map(|m| {
                st.ledger
                    .usage(&BudgetKey::Queue(key.dest.clone(), m.clone()))
            })
            .map(|u| u.msgs.count_since(now.saturating_sub(3_600_000)))
            .sum();
        QueueView {
            mode: if st.modes.in_backoff(key, now) {
                "backoff"
            } else {
                "normal"
            },
            connections,
            sent_last_hour,
        }
    }
}

/// The leased parts as the worker gets them. A message whose record or body cannot be read
/// is left out (it stays leased, and returns to the queue when the lease ends): it is never
/// sent without its body.
pub fn leased_messages(
    db: &rocksdb::DB,
    state: &std::sync::Mutex<crate::queue::state::QueueState>,
    parts: &[Part],
    lease_id: u64,
) -> Vec<LeasedMessage> {
    let mut out = Vec::new();
    for &(id, part) in parts {
        let read = read::message(db, id).and_then(|rec| match rec {
            Some(rec) => read::body(db, state, id).map(|b| b.map(|b| (rec, b))),
            None => Ok(None),
        });
        let (rec, body) = match read {
            Ok(Some(x)) => x,
            Ok(None) => {
                tracing::error!(
                    msg = format!("{id:016x}"),
                    "a leased message has no record or no body; not sent"
                );
                continue;
            }
            Err(e) => {
                tracing::error!(msg = format!("{id:016x}"), "not sent: {e}");
                continue;
            }
        };
        let recipients: Vec<LeasedRecipient> = rec
            .rcpts
            .iter()
            .enumerate()
            .filter(|(_, r)| r.queue == part && r.state == RcptState::Queued && r.lease == lease_id)
            .map(|(i, r)| LeasedRecipient {
                index: i as u32,
                address: r.address.clone(),
                orcpt: r.orcpt.clone(),
                notify: r.notify.into(),
            })
            .collect();
        if recipients.is_empty() {
            continue;
        }
        out.push(LeasedMessage {
            id,
            mail_from: rec.mail_from,
            recipients,
            body,
            envid: rec.envid,
            ret: rec.ret,
            verp: rec.verp,
        });
    }
    out
}

pub struct QueueView {
    pub mode: &'static str,
    pub connections: u32,
    pub sent_last_hour: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::layout::{self, no_wal, open_db};
    use crate::queue::state::QueueState;
    use crate::queue::tx::Tx;

    #[test]
    fn a_message_whose_body_cannot_be_read_is_never_leased_out() {
        let tmp = tempfile::tempdir().unwrap();
        let db = open_db(tmp.path()).unwrap();
        let mut st = QueueState::default();
        let msg = |to: &str| crate::queue::command::NewMessage {
            token: 0,
            mail_from: "s@example.com".into(),
            recipients: vec![crate::queue::command::NewRecipient {
                address: to.into(),
                orcpt: String::new(),
                notify: 0,
                queue: 0,
                suppressed: None,
            }],
            queues: vec![QueueKey {
                dest: "a.test".into(),
                vmta: "v1".into(),
            }],
            envid: String::new(),
            ret: String::new(),
            job_id: String::new(),
            received_by: String::new(),
            client_ip: String::new(),
            priority: 0,
            verp: false,
            acct_headers: Vec::new(),
            body: bytes::Bytes::from_static(b"Subject: x\r\n\r\nbody\r\n"),
        };
        let mut apply = |i: u64, cmd: Command| {
            let mut tx = Tx::new(&db);
            let r = st.apply(&mut tx, i, cmd).unwrap();
            db.write_opt(tx.into_batch(), &no_wal()).unwrap();
            r
        };
        let CommandResult::Enqueued { ids } = apply(
            1,
            Command::Enqueue {
                now_ms: 1,
                messages: vec![msg("a@a.test"), msg("b@a.test")],
            },
        ) else {
            panic!()
        };
        let parts: Vec<Part> = ids.iter().map(|&id| (id, 0)).collect();
        apply(
            2,
            Command::Lease {
                now_ms: 2,
                lease_id: 9,
                worker: "w".into(),
                expires_ms: 100,
                queue: QueueKey {
                    dest: "a.test".into(),
                    vmta: "v1".into(),
                },
                member: "v1".into(),
                source_ip: None,
                new_connection: true,
                parts: parts.clone(),
            },
        );
        // Both bodies stored, then the first one's is gone (a damaged store): it is not
        // sent, empty or not.
        let mut tx = Tx::new(&db);
        st.store_bodies(&mut tx, u64::MAX);
        db.write_opt(tx.into_batch(), &no_wal()).unwrap();
        db.delete_cf(layout::cf(&db, layout::CF_BODY), layout::msg_key(ids[0]))
            .unwrap();
        let out = leased_messages(&db, &std::sync::Mutex::new(st), &parts, 9);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].id, ids[1]);
        assert_eq!(&out[0].body[..], b"Subject: x\r\n\r\nbody\r\n");
    }
}
