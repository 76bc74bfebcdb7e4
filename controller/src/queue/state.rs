//! The queue state machine: message records in RocksDB, and a compact in-memory index of what
//! is ready when, per queue. Apply is deterministic: time and ids come from the command and the
//! log index, never from this node's clock.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use openraft::{LogId, StoredMembership};
use rocksdb::{DB, IteratorMode, WriteBatch};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::command::*;
use crate::raft::NodeId;
use crate::raft::store::{CF_ACCT, CF_BODY, CF_MSG, CF_SM_META};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum RcptState {
    Queued,
    Delivered,
    Bounced,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RcptRecord {
    pub address: String,
    pub orcpt: String,
    pub notify: u8,
    pub queue: u16,
    pub state: RcptState,
    pub attempts: u16,
    pub next_attempt_ms: u64,
    /// Lease holding this recipient, or 0.
    pub lease: u64,
    pub last_error: String,
}

/// A queued message as stored (the body is stored apart, under the same id).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MsgRecord {
    pub mail_from: String,
    pub envid: String,
    pub ret: String,
    pub job_id: String,
    pub received_by: String,
    pub client_ip: String,
    pub received_ms: u64,
    pub size: u64,
    pub priority: u8,
    pub queues: Vec<QueueKey>,
    pub rcpts: Vec<RcptRecord>,
    pub acct_headers: Vec<(String, String)>,
}

/// One accounting event, written from the applied log so that every replica holds the same.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AcctEvent {
    pub kind: String,
    pub time_ms: u64,
    pub queued_ms: u64,
    pub msg: u64,
    pub orig: String,
    pub rcpt: String,
    pub orcpt: String,
    pub code: u16,
    pub enhanced: String,
    pub diag: String,
    pub category: String,
    pub mx: String,
    pub mx_ip: String,
    pub source_ip: String,
    pub src_mta: String,
    pub client_ip: String,
    pub tls: String,
    pub esmtp: bool,
    pub size: u64,
    pub vmta: String,
    pub queue: String,
    pub job_id: String,
    pub envid: String,
    pub headers: Vec<(String, String)>,
}

/// A reply Sluice makes itself for a recipient it gives up on.
struct LocalReply<'a> {
    code: u16,
    enhanced: &'a str,
    text: &'a str,
    category: &'a str,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub worker: String,
    pub expires_ms: u64,
    pub queue: QueueKey,
    pub parts: Vec<(u64, u16)>,
}

/// Per queue: what is ready and when. Entries are (next attempt ms, message id, part).
#[derive(Debug, Default)]
pub struct QueueEntry {
    pub key: QueueKey,
    pub ready: BTreeSet<(u64, u64, u16)>,
    pub recipients: u64,
    pub paused: bool,
}

/// Persisted small state of the machine (everything but messages, bodies and acct rows).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Meta {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, openraft::BasicNode>,
    paused: Vec<String>,
    leases: BTreeMap<u64, LeaseRecord>,
    acct_seq: u64,
    acct_marks: Vec<(u64, u64)>,
}

#[derive(Debug, Default)]
pub struct QueueState {
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, openraft::BasicNode>,
    pub paused: Vec<String>,
    pub leases: BTreeMap<u64, LeaseRecord>,
    acct_seq: u64,
    /// (first seq, log time) at each hour of log time: the rows before a mark older than
    /// `ACCT_RETAIN_MS` are dropped, the same way on every replica.
    acct_marks: Vec<(u64, u64)>,
    pub queues: Vec<QueueEntry>,
    /// The earliest ready time of each queue (u64::MAX when nothing is ready), side by side
    /// so that the scheduler finds due queues without touching every queue's tree.
    pub heads: Vec<u64>,
    queue_ids: HashMap<QueueKey, u32>,
    /// Where each message part sits: message id -> (part index -> queue id).
    parts: HashMap<u64, Vec<u32>>,
    pub messages: u64,
    /// Records written in the current, not yet committed, write batch: later commands of the
    /// same batch must see them.
    pending: HashMap<u64, Option<MsgRecord>>,
}

/// How long accounting rows stay in the replicated store (log time). Every replica exports
/// them to its CSV files as they are applied; this is the margin for a replica that was down.
pub const ACCT_RETAIN_MS: u64 = 24 * 3_600_000;
const ACCT_MARK_MS: u64 = 3_600_000;

/// The last applied log id and the membership it established.
pub type Applied = (
    Option<LogId<NodeId>>,
    StoredMembership<NodeId, openraft::BasicNode>,
);

pub fn msg_key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

/// Whether `key` ("dest/vmta") matches a pattern where `*` matches any run of characters.
pub fn queue_matches(pattern: &str, key: &QueueKey) -> bool {
    let (pd, pv) = pattern.split_once('/').unwrap_or((pattern, "*"));
    glob_match(pd, &key.dest) && glob_match(pv, &key.vmta)
}

fn glob_match(p: &str, s: &str) -> bool {
    let p = p.to_ascii_lowercase();
    let s = s.to_ascii_lowercase();
    let parts: Vec<&str> = p.split('*').collect();
    if parts.len() == 1 {
        return p == s;
    }
    let mut rest = s.as_str();
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            let Some(r) = rest.strip_prefix(part) else {
                return false;
            };
            rest = r;
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(pos) => rest = &rest[pos + part.len()..],
                None => return false,
            }
        }
    }
    true
}

impl QueueState {
    /// Rebuilds the state and index from RocksDB.
    pub fn load(db: &DB) -> Result<Self, String> {
        let mut st = QueueState::default();
        let meta_cf = db.cf_handle(CF_SM_META).unwrap();
        if let Some(b) = db.get_cf(meta_cf, "meta").map_err(|e| e.to_string())? {
            let m: Meta = bincode::deserialize(&b).map_err(|e| e.to_string())?;
            st.last_applied = m.last_applied;
            st.membership = m.membership;
            st.paused = m.paused;
            st.leases = m.leases;
            st.acct_seq = m.acct_seq;
            st.acct_marks = m.acct_marks;
        }
        let cf = db.cf_handle(CF_MSG).unwrap();
        for kv in db.iterator_cf(cf, IteratorMode::Start) {
            let (k, v) = kv.map_err(|e| e.to_string())?;
            let id = u64::from_be_bytes(k[..8].try_into().map_err(|_| "bad message key")?);
            let rec: MsgRecord = bincode::deserialize(&v).map_err(|e| e.to_string())?;
            st.index_message(id, &rec);
        }
        Ok(st)
    }

    /// The applied log id and membership stored in `db` (a live database or a checkpoint).
    pub fn read_applied(db: &DB) -> Result<Applied, String> {
        let meta_cf = db.cf_handle(CF_SM_META).unwrap();
        match db.get_cf(meta_cf, "meta").map_err(|e| e.to_string())? {
            Some(b) => {
                let m: Meta = bincode::deserialize(&b).map_err(|e| e.to_string())?;
                Ok((m.last_applied, m.membership))
            }
            None => Ok((None, StoredMembership::default())),
        }
    }

    fn queue_id(&mut self, key: &QueueKey) -> u32 {
        if let Some(&id) = self.queue_ids.get(key) {
            return id;
        }
        let id = self.queues.len() as u32;
        let paused = self.paused.iter().any(|p| queue_matches(p, key));
        self.queues.push(QueueEntry {
            key: key.clone(),
            paused,
            ..Default::default()
        });
        self.queue_ids.insert(key.clone(), id);
        self.heads.push(u64::MAX);
        id
    }

    /// Re-reads a queue's earliest ready time after its ready set changed.
    pub fn sync_head(&mut self, qid: u32) {
        self.heads[qid as usize] = self.queues[qid as usize]
            .ready
            .first()
            .map(|e| e.0)
            .unwrap_or(u64::MAX);
    }

    pub fn queue_index(&self, key: &QueueKey) -> Option<u32> {
        self.queue_ids.get(key).copied()
    }

    /// Adds a stored message's queued parts to the index.
    pub fn index_message(&mut self, id: u64, rec: &MsgRecord) {
        let qids: Vec<u32> = rec.queues.iter().map(|k| self.queue_id(k)).collect();
        for (part, &qid) in qids.iter().enumerate() {
            let pending: Vec<&RcptRecord> = rec
                .rcpts
                .iter()
                .filter(|r| r.queue as usize == part && r.state == RcptState::Queued)
                .collect();
            if pending.is_empty() {
                continue;
            }
            let q = &mut self.queues[qid as usize];
            q.recipients += pending.len() as u64;
            if pending.iter().all(|r| r.lease == 0) {
                let next = pending.iter().map(|r| r.next_attempt_ms).min().unwrap_or(0);
                q.ready.insert((next, id, part as u16));
                self.sync_head(qid);
            }
        }
        self.parts.insert(id, qids);
        self.messages += 1;
    }

    pub fn write_meta(&self, db: &DB, batch: &mut WriteBatch) {
        let m = Meta {
            last_applied: self.last_applied,
            membership: self.membership.clone(),
            paused: self.paused.clone(),
            leases: self.leases.clone(),
            acct_seq: self.acct_seq,
            acct_marks: self.acct_marks.clone(),
        };
        batch.put_cf(
            db.cf_handle(CF_SM_META).unwrap(),
            "meta",
            bincode::serialize(&m).unwrap(),
        );
    }

    pub fn after_write(&mut self) {
        self.pending.clear();
    }

    pub fn apply(
        &mut self,
        db: &DB,
        batch: &mut WriteBatch,
        log_index: u64,
        cmd: Command,
    ) -> CommandResult {
        match cmd {
            Command::Enqueue { now_ms, messages } => {
                let mut ids = Vec::with_capacity(messages.len());
                for (i, m) in messages.into_iter().enumerate() {
                    // Unique across the cluster and the same on every replica.
                    let id = (log_index << 20) | i as u64;
                    let rec = MsgRecord {
                        size: m.body.len() as u64,
                        mail_from: m.mail_from,
                        envid: m.envid,
                        ret: m.ret,
                        job_id: m.job_id,
                        received_by: m.received_by,
                        client_ip: m.client_ip,
                        received_ms: now_ms,
                        priority: m.priority,
                        queues: m.queues,
                        acct_headers: m.acct_headers,
                        rcpts: m
                            .recipients
                            .into_iter()
                            .map(|r| RcptRecord {
                                address: r.address,
                                orcpt: r.orcpt,
                                notify: r.notify,
                                queue: r.queue,
                                state: RcptState::Queued,
                                attempts: 0,
                                next_attempt_ms: now_ms,
                                lease: 0,
                                last_error: String::new(),
                            })
                            .collect(),
                    };
                    for r in &rec.rcpts {
                        let q = rec
                            .queues
                            .get(r.queue as usize)
                            .cloned()
                            .unwrap_or_default();
                        self.event(db, batch, "r", now_ms, id, &rec, r, &q, None, None);
                    }
                    batch.put_cf(db.cf_handle(CF_BODY).unwrap(), msg_key(id), &m.body);
                    batch.put_cf(
                        db.cf_handle(CF_MSG).unwrap(),
                        msg_key(id),
                        bincode::serialize(&rec).unwrap(),
                    );
                    self.index_message(id, &rec);
                    self.pending.insert(id, Some(rec));
                    ids.push(id);
                }
                CommandResult::Enqueued { ids }
            }
            Command::Lease {
                now_ms: _,
                lease_id,
                worker,
                expires_ms,
                queue,
                parts,
            } => {
                let mut taken = Vec::new();
                let Some(&qid) = self.queue_ids.get(&queue) else {
                    return CommandResult::Count(0);
                };
                for (t, id, part) in parts {
                    if !self.queues[qid as usize].ready.remove(&(t, id, part)) {
                        continue; // already leased, rescheduled or gone
                    }
                    // An entry whose message is gone is dropped here, so it cannot linger.
                    let Some(mut rec) = self.read(db, id) else {
                        continue;
                    };
                    for r in rec
                        .rcpts
                        .iter_mut()
                        .filter(|r| r.queue == part && r.state == RcptState::Queued)
                    {
                        r.lease = lease_id;
                    }
                    self.write(db, batch, id, &rec, false);
                    taken.push((id, part));
                }
                self.sync_head(qid);
                let n = taken.len() as u64;
                // `More` on an open connection extends the same lease.
                let l = self.leases.entry(lease_id).or_insert(LeaseRecord {
                    worker,
                    expires_ms,
                    queue,
                    parts: Vec::new(),
                });
                l.expires_ms = l.expires_ms.max(expires_ms);
                l.parts.extend(taken);
                CommandResult::Count(n)
            }
            Command::Release { now_ms, lease_id } => {
                let Some(lease) = self.leases.remove(&lease_id) else {
                    return CommandResult::Count(0);
                };
                let mut n = 0;
                for (id, part) in lease.parts {
                    let Some(mut rec) = self.read(db, id) else {
                        continue;
                    };
                    let mut next = u64::MAX;
                    for r in rec
                        .rcpts
                        .iter_mut()
                        .filter(|r| r.queue == part && r.lease == lease_id)
                    {
                        r.lease = 0;
                        if r.state == RcptState::Queued {
                            next = next.min(r.next_attempt_ms.max(now_ms));
                        }
                    }
                    self.write(db, batch, id, &rec, false);
                    if next != u64::MAX
                        && let Some(&qid) = self.parts.get(&id).and_then(|p| p.get(part as usize))
                    {
                        self.queues[qid as usize].ready.insert((next, id, part));
                        self.sync_head(qid);
                        n += 1;
                    }
                }
                CommandResult::Count(n)
            }
            Command::Outcomes { now_ms, outcomes } => {
                let mut n = 0;
                for o in outcomes {
                    let Some(mut rec) = self.read(db, o.msg) else {
                        continue;
                    };
                    let Some(r) = rec.rcpts.get(o.rcpt as usize).cloned() else {
                        continue;
                    };
                    if r.state != RcptState::Queued {
                        continue; // a duplicate report after redelivery
                    }
                    let q = rec
                        .queues
                        .get(r.queue as usize)
                        .cloned()
                        .unwrap_or_default();
                    let (kind, state, cat) = match &o.kind {
                        OutcomeKind::Delivered => ("d", RcptState::Delivered, None),
                        OutcomeKind::Transient { .. } => ("t", RcptState::Queued, None),
                        OutcomeKind::Bounced { category } => {
                            ("b", RcptState::Bounced, Some(category.as_str()))
                        }
                    };
                    self.event(db, batch, kind, now_ms, o.msg, &rec, &r, &q, Some(&o), cat);
                    let rr = &mut rec.rcpts[o.rcpt as usize];
                    rr.state = state;
                    rr.attempts = rr.attempts.saturating_add(1);
                    rr.last_error = if kind == "d" {
                        String::new()
                    } else {
                        format!("{} {}", o.code, o.text)
                    };
                    if let OutcomeKind::Transient { next_attempt_ms } = o.kind {
                        rr.next_attempt_ms = next_attempt_ms;
                    }
                    if state != RcptState::Queued
                        && let Some(&qid) =
                            self.parts.get(&o.msg).and_then(|p| p.get(r.queue as usize))
                    {
                        let qe = &mut self.queues[qid as usize];
                        qe.recipients = qe.recipients.saturating_sub(1);
                    }
                    self.write(db, batch, o.msg, &rec, r.lease == 0);
                    n += 1;
                }
                CommandResult::Count(n)
            }
            Command::Delete {
                now_ms,
                queue_pattern,
                recipient,
                job_id,
            } => {
                let ids: Vec<u64> = self.parts.keys().copied().collect();
                let mut n = 0;
                for id in ids {
                    let Some(mut rec) = self.read(db, id) else {
                        continue;
                    };
                    if !job_id.is_empty() && rec.job_id != job_id {
                        continue;
                    }
                    let mut changed = false;
                    for i in 0..rec.rcpts.len() {
                        let r = rec.rcpts[i].clone();
                        let q = rec
                            .queues
                            .get(r.queue as usize)
                            .cloned()
                            .unwrap_or_default();
                        if r.state != RcptState::Queued
                            || (!queue_pattern.is_empty() && !queue_matches(&queue_pattern, &q))
                            || (!recipient.is_empty()
                                && !r.address.eq_ignore_ascii_case(&recipient))
                        {
                            continue;
                        }
                        let reply = LocalReply {
                            code: 554,
                            enhanced: "5.3.0",
                            text: "deleted by the operator",
                            category: "other",
                        };
                        self.bounce_here(db, batch, now_ms, id, &mut rec, i, &reply);
                        changed = true;
                        n += 1;
                    }
                    if changed {
                        self.write(db, batch, id, &rec, true);
                    }
                }
                CommandResult::Count(n)
            }
            Command::Pause { pattern } => {
                let mut n = 0;
                for q in self
                    .queues
                    .iter_mut()
                    .filter(|q| queue_matches(&pattern, &q.key))
                {
                    q.paused = true;
                    n += 1;
                }
                if !self.paused.contains(&pattern) {
                    self.paused.push(pattern);
                }
                CommandResult::Count(n)
            }
            Command::Resume { pattern } => {
                self.paused.retain(|p| *p != pattern);
                let mut n = 0;
                let paused = self.paused.clone();
                for q in self
                    .queues
                    .iter_mut()
                    .filter(|q| queue_matches(&pattern, &q.key))
                {
                    q.paused = paused.iter().any(|p| queue_matches(p, &q.key));
                    n += 1;
                }
                CommandResult::Count(n)
            }
            Command::BounceQueue {
                now_ms,
                queue,
                code,
                enhanced,
                text,
                category,
            } => {
                let Some(&qid) = self.queue_ids.get(&queue) else {
                    return CommandResult::Count(0);
                };
                let parts: Vec<(u64, u16)> = self.queues[qid as usize]
                    .ready
                    .iter()
                    .map(|&(_, m, p)| (m, p))
                    .collect();
                self.queues[qid as usize].ready.clear();
                self.sync_head(qid);
                let mut n = 0;
                for (id, part) in parts {
                    let Some(mut rec) = self.read(db, id) else {
                        continue;
                    };
                    for i in 0..rec.rcpts.len() {
                        let r = rec.rcpts[i].clone();
                        if r.queue != part || r.state != RcptState::Queued || r.lease != 0 {
                            continue;
                        }
                        let reply = LocalReply {
                            code,
                            enhanced: &enhanced,
                            text: &text,
                            category: &category,
                        };
                        self.bounce_here(db, batch, now_ms, id, &mut rec, i, &reply);
                        n += 1;
                    }
                    self.write(db, batch, id, &rec, false);
                }
                CommandResult::Count(n)
            }
            Command::DeferQueue { queue, until_ms } => {
                let Some(&qid) = self.queue_ids.get(&queue) else {
                    return CommandResult::Count(0);
                };
                let q = &mut self.queues[qid as usize];
                let old = std::mem::take(&mut q.ready);
                let n = old.len() as u64;
                q.ready = old
                    .into_iter()
                    .map(|(t, m, p)| (t.max(until_ms), m, p))
                    .collect();
                self.sync_head(qid);
                CommandResult::Count(n)
            }
            Command::RetryNow { now_ms, pattern } => {
                let mut n = 0;
                for qid in 0..self.queues.len() {
                    let q = &mut self.queues[qid];
                    if !queue_matches(&pattern, &q.key) {
                        continue;
                    }
                    let old = std::mem::take(&mut q.ready);
                    n += old.len() as u64;
                    q.ready = old
                        .into_iter()
                        .map(|(t, m, p)| (t.min(now_ms), m, p))
                        .collect();
                    self.sync_head(qid as u32);
                }
                CommandResult::Count(n)
            }
        }
    }

    /// Bounces recipient `i` with a reply made here (operator delete, bounce-queue): a `b` row,
    /// the recipient final, its queue's count lowered. The caller writes the record.
    #[allow(clippy::too_many_arguments)]
    fn bounce_here(
        &mut self,
        db: &DB,
        batch: &mut WriteBatch,
        now_ms: u64,
        id: u64,
        rec: &mut MsgRecord,
        i: usize,
        reply: &LocalReply,
    ) {
        let r = rec.rcpts[i].clone();
        let q = rec
            .queues
            .get(r.queue as usize)
            .cloned()
            .unwrap_or_default();
        let o = RecipientOutcome {
            msg: id,
            rcpt: i as u32,
            kind: OutcomeKind::Bounced {
                category: reply.category.to_string(),
            },
            code: reply.code,
            enhanced: reply.enhanced.to_string(),
            text: reply.text.to_string(),
            mx_host: String::new(),
            mx_ip: String::new(),
            source_ip: String::new(),
            tls: String::new(),
            esmtp: false,
        };
        self.event(
            db,
            batch,
            "b",
            now_ms,
            id,
            rec,
            &r,
            &q,
            Some(&o),
            Some(reply.category),
        );
        rec.rcpts[i].state = RcptState::Bounced;
        if let Some(&qid) = self.parts.get(&id).and_then(|p| p.get(r.queue as usize)) {
            let qe = &mut self.queues[qid as usize];
            qe.recipients = qe.recipients.saturating_sub(1);
        }
    }

    fn read(&self, db: &DB, id: u64) -> Option<MsgRecord> {
        if let Some(p) = self.pending.get(&id) {
            return p.clone();
        }
        let b = db
            .get_cf(db.cf_handle(CF_MSG).unwrap(), msg_key(id))
            .ok()??;
        bincode::deserialize(&b).ok()
    }

    /// Stores a record, or deletes it (and its body) once every recipient is final.
    /// `may_be_ready`: the message may still have a part in a ready set (an operator delete, or
    /// a report after its lease expired). Only then is the ready set searched on deletion;
    /// a delivery that ends a lease never leaves one there, so it costs nothing per message.
    fn write(
        &mut self,
        db: &DB,
        batch: &mut WriteBatch,
        id: u64,
        rec: &MsgRecord,
        may_be_ready: bool,
    ) {
        if rec
            .rcpts
            .iter()
            .all(|r| r.state != RcptState::Queued && r.lease == 0)
        {
            batch.delete_cf(db.cf_handle(CF_MSG).unwrap(), msg_key(id));
            batch.delete_cf(db.cf_handle(CF_BODY).unwrap(), msg_key(id));
            self.pending.insert(id, None);
            if let Some(qids) = self.parts.remove(&id) {
                if may_be_ready {
                    for qid in qids {
                        self.queues[qid as usize].ready.retain(|&(_, m, _)| m != id);
                        self.sync_head(qid);
                    }
                }
                self.messages = self.messages.saturating_sub(1);
            }
        } else {
            batch.put_cf(
                db.cf_handle(CF_MSG).unwrap(),
                msg_key(id),
                bincode::serialize(rec).unwrap(),
            );
            self.pending.insert(id, Some(rec.clone()));
        }
    }

    /// An accounting event for one recipient, without the remote's reply.
    fn base_event(
        kind: &str,
        now_ms: u64,
        id: u64,
        rec: &MsgRecord,
        r: &RcptRecord,
        q: &QueueKey,
        cat: Option<&str>,
    ) -> AcctEvent {
        AcctEvent {
            kind: kind.into(),
            time_ms: now_ms,
            queued_ms: rec.received_ms,
            msg: id,
            orig: rec.mail_from.clone(),
            rcpt: r.address.clone(),
            orcpt: r.orcpt.clone(),
            category: cat.unwrap_or("").into(),
            src_mta: rec.received_by.clone(),
            client_ip: rec.client_ip.clone(),
            size: rec.size,
            vmta: q.vmta.clone(),
            queue: q.dest.clone(),
            job_id: rec.job_id.clone(),
            envid: rec.envid.clone(),
            headers: rec.acct_headers.clone(),
            ..Default::default()
        }
    }

    /// Writes an accounting event for one recipient, with the remote's reply when there was
    /// a delivery attempt.
    #[allow(clippy::too_many_arguments)]
    fn event(
        &mut self,
        db: &DB,
        batch: &mut WriteBatch,
        kind: &str,
        now_ms: u64,
        id: u64,
        rec: &MsgRecord,
        r: &RcptRecord,
        q: &QueueKey,
        attempt: Option<&RecipientOutcome>,
        cat: Option<&str>,
    ) {
        let base = Self::base_event(kind, now_ms, id, rec, r, q, cat);
        let ev = match attempt {
            Some(o) => AcctEvent {
                code: o.code,
                enhanced: o.enhanced.clone(),
                diag: o.text.clone(),
                mx: o.mx_host.clone(),
                mx_ip: o.mx_ip.clone(),
                source_ip: o.source_ip.clone(),
                tls: o.tls.clone(),
                esmtp: o.esmtp,
                ..base
            },
            None => base,
        };
        self.push_event(db, batch, ev);
    }

    fn push_event(&mut self, db: &DB, batch: &mut WriteBatch, ev: AcctEvent) {
        self.acct_seq += 1;
        batch.put_cf(
            db.cf_handle(CF_ACCT).unwrap(),
            self.acct_seq.to_be_bytes(),
            bincode::serialize(&ev).unwrap(),
        );
        let now = ev.time_ms;
        if self
            .acct_marks
            .last()
            .is_none_or(|&(_, t)| now >= t + ACCT_MARK_MS)
        {
            self.acct_marks.push((self.acct_seq, now));
        }
        // Only log time decides what goes, so every replica drops the same rows.
        while let Some(&(seq, t)) = self.acct_marks.first()
            && t + ACCT_RETAIN_MS <= now
        {
            batch.delete_range_cf(
                db.cf_handle(CF_ACCT).unwrap(),
                0u64.to_be_bytes(),
                seq.to_be_bytes(),
            );
            self.acct_marks.remove(0);
        }
    }

    /// The index entry of a queue, if it has one.
    pub fn queue(&self, key: &QueueKey) -> Option<&QueueEntry> {
        self.queue_ids.get(key).map(|&i| &self.queues[i as usize])
    }

    pub fn queued_recipients(&self) -> u64 {
        self.queues.iter().map(|q| q.recipients).sum()
    }

    /// A digest of every state machine record, for comparing replicas.
    pub fn digest(db: &DB) -> String {
        let mut h = Sha256::new();
        for name in [CF_MSG, CF_BODY, CF_ACCT] {
            let cf = db.cf_handle(name).unwrap();
            for (k, v) in db.iterator_cf(cf, IteratorMode::Start).flatten() {
                h.update(name.as_bytes());
                h.update(&k);
                h.update(&v);
            }
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn read_message(&self, db: &DB, id: u64) -> Option<MsgRecord> {
        self.read(db, id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_patterns() {
        let k = QueueKey {
            dest: "gmail.test".into(),
            vmta: "vmta-a".into(),
        };
        assert!(queue_matches("gmail.test/vmta-a", &k));
        assert!(queue_matches("*.test/*", &k));
        assert!(queue_matches("gmail.test", &k));
        assert!(queue_matches("*/vmta-*", &k));
        assert!(!queue_matches("yahoo.test/*", &k));
    }
}

#[cfg(test)]
mod acct_retention_tests {
    use super::*;
    use crate::raft::store::open_db;

    #[test]
    fn rows_older_than_the_retention_are_dropped_by_log_time() {
        let tmp = tempfile::tempdir().unwrap();
        let db = open_db(tmp.path()).unwrap();
        let mut st = QueueState::default();
        let t0 = 1_700_000_000_000u64;
        // One row every 10 minutes for 30 hours.
        for i in 0..180u64 {
            let mut batch = WriteBatch::default();
            let ev = AcctEvent {
                kind: "d".into(),
                time_ms: t0 + i * 600_000,
                ..Default::default()
            };
            st.push_event(&db, &mut batch, ev);
            db.write(batch).unwrap();
        }
        let cf = db.cf_handle(CF_ACCT).unwrap();
        let times: Vec<u64> = db
            .iterator_cf(cf, IteratorMode::Start)
            .flatten()
            .map(|(_, v)| bincode::deserialize::<AcctEvent>(&v).unwrap().time_ms)
            .collect();
        let newest = t0 + 179 * 600_000;
        assert_eq!(times.last(), Some(&newest));
        // Nothing younger than the retention went; nothing more than an hour older stayed.
        assert!(
            times
                .iter()
                .all(|&t| t + ACCT_RETAIN_MS + ACCT_MARK_MS > newest)
        );
        assert!(times.contains(&(newest - ACCT_RETAIN_MS + 600_000)));
        assert!(st.acct_marks.len() <= 26);
    }
}
