//! The queue state machine's state: message records and lease records in RocksDB, and in
//! memory the scheduling index and the budget ledger, both functions of those records. Every
//! record write goes through `put`/`remove`, which re-derive the message's index entries from
//! the record itself, so a replica that reloads from RocksDB (or installs a snapshot) holds the
//! same index as one that never stopped (`tests/restart_equivalence` checks it).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use openraft::{LogId, StoredMembership};
use rocksdb::{DB, IteratorMode};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sluice_common::policy::RecordType;

use super::acct_event::AcctEvent;
use super::bodies::HeldBodies;
use super::command::{Attempt, Part, QueueKey};
use super::layout::{self, CF_BODY, CF_MSG, CF_SM_META};
use super::ledger::{BudgetKey, Ledger};
use super::records::RecordCache;
use super::tx::{StoreError, Tx};

/// Raft node ids (openraft's `NodeId` in `crate::raft`).
type NodeId = u64;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum RcptState {
    Queued,
    Delivered,
    Bounced,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RcptRecord {
    pub address: String,
    pub orcpt: String,
    pub notify: u8,
    /// Index into `MsgRecord::queues`: the part the recipient belongs to.
    pub queue: u32,
    pub state: RcptState,
    pub attempts: u16,
    pub next_attempt_ms: u64,
    /// Lease holding this recipient, or 0. All queued recipients of a part share it.
    pub lease: u64,
    pub last_error: String,
    /// Notices owed or sent (`DSN_*` bits).
    pub dsn: u8,
    /// The last attempt's enhanced status, receiver and time (what a notice reports).
    pub last_status: String,
    pub last_mx: String,
    pub last_attempt_ms: u64,
}

/// A failure notice is owed to the sender.
pub const DSN_OWE_FAILURE: u8 = 1;
/// A "relayed" notice is owed (delivered to a receiver without DSN, SUCCESS asked).
pub const DSN_OWE_RELAYED: u8 = 2;
/// The delay notice was sent.
pub const DSN_DELAY_SENT: u8 = 4;

/// A queued message as stored (the body is stored apart, under the same id).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
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
    /// One return path per recipient (VERP).
    pub verp: bool,
    pub queues: Vec<QueueKey>,
    pub rcpts: Vec<RcptRecord>,
    pub acct_headers: Vec<(String, String)>,
}

impl MsgRecord {
    pub fn queue_of(&self, r: &RcptRecord) -> QueueKey {
        self.queues
            .get(r.queue as usize)
            .cloned()
            .unwrap_or_default()
    }

    /// When a part is ready: the earliest next attempt of its queued recipients, if it has
    /// any and none is leased.
    pub fn ready_at(&self, part: u32) -> Option<u64> {
        let mut t: Option<u64> = None;
        for r in self
            .rcpts
            .iter()
            .filter(|r| r.queue == part && r.state == RcptState::Queued)
        {
            if r.lease != 0 {
                return None;
            }
            t = Some(t.map_or(r.next_attempt_ms, |t| t.min(r.next_attempt_ms)));
        }
        t
    }

    fn queued_in(&self, part: u32) -> u32 {
        self.rcpts
            .iter()
            .filter(|r| r.queue == part && r.state == RcptState::Queued)
            .count() as u32
    }

    /// Every recipient is final and none is held by a lease: the record can go.
    pub fn is_finished(&self) -> bool {
        self.rcpts.iter().all(|r| {
            r.state != RcptState::Queued
                && r.lease == 0
                && r.dsn & (DSN_OWE_FAILURE | DSN_OWE_RELAYED) == 0
        })
    }

    /// Some recipient is owed a failure or relayed notice.
    pub fn dsn_owed(&self) -> bool {
        self.rcpts
            .iter()
            .any(|r| r.dsn & (DSN_OWE_FAILURE | DSN_OWE_RELAYED) != 0)
    }

    /// Some queued recipient asked for a delay notice and has not had one.
    pub fn delay_wanted(&self) -> bool {
        !self.mail_from.is_empty()
            && self.rcpts.iter().any(|r| {
                r.state == RcptState::Queued
                    && r.dsn & DSN_DELAY_SENT == 0
                    && sluice_common::dsn::wants(r.notify, sluice_common::dsn::DsnKind::Delay)
            })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LeasedPart {
    pub msg: u64,
    pub part: u32,
    /// Its outcome is known (it counts in the ledger by outcome time).
    pub done: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LeaseRecord {
    pub worker: String,
    pub granted_ms: u64,
    pub expires_ms: u64,
    pub queue: QueueKey,
    pub member: String,
    pub source_ip: Option<IpAddr>,
    pub parts: Vec<LeasedPart>,
    /// The connection reported at least once.
    pub reported: bool,
}

impl LeaseRecord {
    /// The budgets this lease's connection and messages count against.
    pub fn budget_keys(&self) -> Vec<BudgetKey> {
        let mut k = vec![
            BudgetKey::Queue(self.queue.dest.clone(), self.member.clone()),
            BudgetKey::Vmta(self.member.clone()),
        ];
        if let Some(ip) = self.source_ip {
            k.push(BudgetKey::SourceIp(self.queue.dest.clone(), ip));
        }
        k
    }
}

/// Replicated operator and reply-pattern modes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Modes {
    /// Pause patterns ("dest/vmta" with `*`).
    pub paused: Vec<String>,
    /// Queues in backoff mode until the given log time.
    pub backoff: BTreeMap<QueueKey, u64>,
    /// Source IPs out of use until the given log time.
    pub disabled_ips: BTreeMap<IpAddr, u64>,
}

impl Modes {
    pub fn in_backoff(&self, q: &QueueKey, now: u64) -> bool {
        self.backoff.get(q).is_some_and(|&u| u > now)
    }

    pub fn ip_disabled(&self, ip: &IpAddr, now: u64) -> bool {
        self.disabled_ips.get(ip).is_some_and(|&u| u > now)
    }
}

/// Persisted small state of the machine (the `meta` key).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Meta {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, openraft::BasicNode>,
    modes: Modes,
    acct_seq: u64,
    acct_marks: Vec<(u64, u64)>,
    dedup_swept_ms: u64,
    suppress_seq: u64,
}

/// Per queue: what is ready and when. Entries are (next attempt ms, message id, part).
#[derive(Debug, Default)]
pub struct QueueEntry {
    pub key: QueueKey,
    pub ready: BTreeSet<(u64, u64, u32)>,
    pub recipients: u64,
    pub paused: bool,
    /// The last failure reply seen in this queue (not replicated: display only).
    pub last_error: String,
}

/// One part of a message in the index.
#[derive(Debug, Clone, Copy, PartialEq)]
struct PartIndex {
    qid: u32,
    queued: u32,
    ready_at: Option<u64>,
}

/// A message in the index: when it arrived, and where its parts are.
#[derive(Debug, Clone, PartialEq)]
pub struct MsgIndex {
    pub received_ms: u64,
    parts: Vec<PartIndex>,
}

impl MsgIndex {
    pub fn ready_at(&self, part: u32) -> Option<u64> {
        self.parts.get(part as usize).and_then(|p| p.ready_at)
    }

    /// The queues (by id) where the message has queued recipients.
    pub fn queued_queue_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.parts.iter().filter(|p| p.queued > 0).map(|p| p.qid)
    }

    /// Parts that are queued and not leased.
    pub fn ready_parts(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.parts
            .iter()
            .enumerate()
            .filter(|(_, p)| p.ready_at.is_some())
            .map(|(i, p)| (i as u32, p.qid))
    }
}

/// The in-memory scheduling index, derived from the message records.
#[derive(Debug, Default)]
pub struct Index {
    pub queues: Vec<QueueEntry>,
    /// The earliest ready time of each queue (u64::MAX when nothing is ready), side by side
    /// so that the scheduler finds due queues without touching every queue's tree.
    pub heads: Vec<u64>,
    queue_ids: HashMap<QueueKey, u32>,
    /// Every stored message, in id (and so arrival) order.
    pub msgs: BTreeMap<u64, MsgIndex>,
    /// Messages that owe their sender a notice, in id order.
    pub dsn_owed: BTreeSet<u64>,
    /// Messages with a queued recipient waiting for a delay notice, in id order.
    pub delay_wanted: BTreeSet<u64>,
}

impl Index {
    pub fn queue_id(&mut self, key: &QueueKey, modes: &Modes) -> u32 {
        if let Some(&id) = self.queue_ids.get(key) {
            return id;
        }
        let id = self.queues.len() as u32;
        self.queues.push(QueueEntry {
            key: key.clone(),
            paused: modes.paused.iter().any(|p| queue_matches(p, key)),
            ..Default::default()
        });
        self.queue_ids.insert(key.clone(), id);
        self.heads.push(u64::MAX);
        id
    }

    pub fn queue_index(&self, key: &QueueKey) -> Option<u32> {
        self.queue_ids.get(key).copied()
    }

    pub fn queue(&self, key: &QueueKey) -> Option<&QueueEntry> {
        self.queue_ids.get(key).map(|&i| &self.queues[i as usize])
    }

    fn sync_head(&mut self, qid: u32) {
        self.heads[qid as usize] = self.queues[qid as usize]
            .ready
            .first()
            .map(|e| e.0)
            .unwrap_or(u64::MAX);
    }

    /// Adds or replaces a message's entries (benchmarks build an index without a database).
    pub fn insert(&mut self, id: u64, rec: &MsgRecord, modes: &Modes) {
        self.reindex(id, Some(rec), modes);
    }

    /// Re-derives a message's entries from its record (None: the record is gone).
    fn reindex(&mut self, id: u64, rec: Option<&MsgRecord>, modes: &Modes) {
        let old = self.msgs.remove(&id);
        if rec.is_some_and(|r| r.dsn_owed()) {
            self.dsn_owed.insert(id);
        } else {
            self.dsn_owed.remove(&id);
        }
        if rec.is_some_and(|r| r.delay_wanted()) {
            self.delay_wanted.insert(id);
        } else {
            self.delay_wanted.remove(&id);
        }
        let new = rec.map(|r| MsgIndex {
            received_ms: r.received_ms,
            parts: (0..r.queues.len() as u32)
                .map(|p| PartIndex {
                    qid: self.queue_id(&r.queues[p as usize], modes),
                    queued: r.queued_in(p),
                    ready_at: r.ready_at(p),
                })
                .collect(),
        });
        let n = old
            .as_ref()
            .map_or(0, |o| o.parts.len())
            .max(new.as_ref().map_or(0, |n| n.parts.len()));
        for p in 0..n {
            let o = old.as_ref().and_then(|o| o.parts.get(p)).copied();
            let nw = new.as_ref().and_then(|n| n.parts.get(p)).copied();
            if o == nw {
                continue;
            }
            if let Some(o) = o {
                let q = &mut self.queues[o.qid as usize];
                q.recipients -= o.queued as u64;
                if let Some(t) = o.ready_at {
                    q.ready.remove(&(t, id, p as u32));
                    self.sync_head(o.qid);
                }
            }
            if let Some(nw) = nw {
                let q = &mut self.queues[nw.qid as usize];
                q.recipients += nw.queued as u64;
                if let Some(t) = nw.ready_at {
                    q.ready.insert((t, id, p as u32));
                    self.sync_head(nw.qid);
                }
            }
        }
        if let Some(n) = new {
            self.msgs.insert(id, n);
        }
    }

    pub fn messages(&self) -> u64 {
        self.msgs.len() as u64
    }

    /// When the oldest message still queued in each queue arrived (by queue id). Messages are
    /// kept in arrival order, so the scan stops once every queue with recipients has its
    /// oldest; it reads the whole index only when some queue holds nothing but recent mail.
    pub fn oldest_received(&self) -> Vec<Option<u64>> {
        let mut oldest = vec![None; self.queues.len()];
        let mut missing = self.queues.iter().filter(|q| q.recipients > 0).count();
        for m in self.msgs.values() {
            if missing == 0 {
                break;
            }
            for p in m.parts.iter().filter(|p| p.queued > 0) {
                let o = &mut oldest[p.qid as usize];
                if o.is_none() {
                    *o = Some(m.received_ms);
                    missing -= 1;
                }
            }
        }
        oldest
    }

    pub fn queued_recipients(&self) -> u64 {
        self.queues.iter().map(|q| q.recipients).sum()
    }

    /// Ready parts of a queue in the order they come due.
    pub fn ready_parts(&self, key: &QueueKey) -> Vec<Part> {
        self.queue(key)
            .map(|q| q.ready.iter().map(|&(_, m, p)| (m, p)).collect())
            .unwrap_or_default()
    }

    /// Every message's index entries, with queue keys (queue ids differ between replicas).
    #[allow(clippy::type_complexity)]
    pub fn msgs_snapshot(&self) -> Vec<(u64, u64, Vec<(QueueKey, u32, Option<u64>)>)> {
        self.msgs
            .iter()
            .map(|(id, m)| {
                let parts = m
                    .parts
                    .iter()
                    .map(|p| {
                        (
                            self.queues[p.qid as usize].key.clone(),
                            p.queued,
                            p.ready_at,
                        )
                    })
                    .collect();
                (*id, m.received_ms, parts)
            })
            .collect()
    }

    /// Everything, for comparing two states in tests.
    #[allow(clippy::type_complexity)]
    pub fn snapshot(&self) -> Vec<(QueueKey, Vec<(u64, u64, u32)>, u64, bool)> {
        let mut v: Vec<_> = self
            .queues
            .iter()
            .filter(|q| q.recipients > 0 || !q.ready.is_empty())
            .map(|q| {
                (
                    q.key.clone(),
                    q.ready.iter().copied().collect::<Vec<_>>(),
                    q.recipients,
                    q.paused,
                )
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// Leader-only overlay: budgets granted by proposals not applied yet, so that two picks
/// before an apply cannot both spend the same budget. Not replicated, not persisted.
#[derive(Debug, Default)]
pub struct Proposed {
    grants: HashMap<u64, (Vec<BudgetKey>, u64, bool)>,
    by_key: HashMap<BudgetKey, (u32, u64)>,
    next: u64,
}

impl Proposed {
    /// Records a grant about to be proposed; returns the handle to end it with.
    pub fn add(&mut self, keys: Vec<BudgetKey>, msgs: u64, new_connection: bool) -> u64 {
        self.next += 1;
        for k in &keys {
            let e = self.by_key.entry(k.clone()).or_default();
            e.0 += u32::from(new_connection);
            e.1 += msgs;
        }
        self.grants.insert(self.next, (keys, msgs, new_connection));
        self.next
    }

    /// The proposal was applied (or failed): its budgets now show in the ledger (or not).
    pub fn end(&mut self, handle: u64) {
        if let Some((keys, msgs, conn)) = self.grants.remove(&handle) {
            for k in keys {
                if let Some(e) = self.by_key.get_mut(&k) {
                    e.0 -= u32::from(conn);
                    e.1 -= msgs;
                    if *e == (0, 0) {
                        self.by_key.remove(&k);
                    }
                }
            }
        }
    }

    /// (connections, messages) proposed for a budget.
    pub fn get(&self, k: &BudgetKey) -> (u32, u64) {
        self.by_key.get(k).copied().unwrap_or((0, 0))
    }

    pub fn connections(&self) -> u32 {
        self.grants.values().filter(|g| g.2).count() as u32
    }
}

#[derive(Debug, Default)]
pub struct QueueState {
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, openraft::BasicNode>,
    pub modes: Modes,
    pub(super) acct_seq: u64,
    /// The last change to the suppression list (ingress nodes follow the changes by seq).
    pub suppress_seq: u64,
    /// (first seq, log time) at each hour of log time: the rows before a mark older than
    /// `ACCT_RETAIN_MS` are dropped, the same way on every replica.
    pub(super) acct_marks: Vec<(u64, u64)>,
    pub(super) dedup_swept_ms: u64,
    pub leases: BTreeMap<u64, LeaseRecord>,
    pub index: Index,
    pub ledger: Ledger,
    pub proposed: Proposed,
    /// Bodies of recently queued messages, not yet in RocksDB (`bodies`).
    pub bodies: HeldBodies,
    /// The records apply wrote last (`records`).
    pub(super) records: RecordCache,
}

/// How long accounting rows stay in the replicated store (log time). Every replica exports
/// them to its CSV files as they are applied; this is the margin for a replica that was down.
pub const ACCT_RETAIN_MS: u64 = 24 * 3_600_000;
pub(super) const ACCT_MARK_MS: u64 = 3_600_000;

/// The last applied log id and the membership it established.
pub type Applied = (
    Option<LogId<NodeId>>,
    StoredMembership<NodeId, openraft::BasicNode>,
);

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

fn read_meta(db: &DB) -> Result<Option<Meta>, String> {
    match db
        .get_cf(layout::cf(db, CF_SM_META), layout::META_KEY)
        .map_err(|e| e.to_string())?
    {
        Some(b) => layout::de(&b).map(Some),
        None => Ok(None),
    }
}

impl QueueState {
    /// Rebuilds the state, index and ledger from RocksDB.
    pub fn load(db: &DB) -> Result<Self, String> {
        let mut st = QueueState::default();
        if let Some(m) = read_meta(db)? {
            st.last_applied = m.last_applied;
            st.membership = m.membership;
            st.modes = m.modes;
            st.acct_seq = m.acct_seq;
            st.suppress_seq = m.suppress_seq;
            st.acct_marks = m.acct_marks;
            st.dedup_swept_ms = m.dedup_swept_ms;
        }
        // Without the key (a store from before bodies were held; the key is written with the
        // meta) every body is stored.
        let applied = st.last_applied.map_or(0, |l| l.index);
        // Never past applied: entries applied again after a failed apply hold their bodies.
        let stored_to = layout::read_bodies_stored_to(db)?.unwrap_or(applied);
        st.bodies = HeldBodies::new(stored_to.min(applied));
        let (from, to) = layout::lease_range();
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_upper_bound(to);
        for kv in db.iterator_cf_opt(
            layout::cf(db, CF_SM_META),
            ro,
            IteratorMode::From(&from, rocksdb::Direction::Forward),
        ) {
            let (k, v) = kv.map_err(|e| e.to_string())?;
            let id = layout::id_of_key(&k[from.len()..]).ok_or("bad lease key")?;
            st.leases.insert(id, layout::de(&v)?);
        }
        st.ledger = Ledger::load(db)?;
        for l in st.leases.values() {
            let keys = l.budget_keys();
            st.ledger.lease_opened(&keys);
            if l.reported {
                st.ledger.connected_unrecorded(&keys);
            }
            let out = l.parts.iter().filter(|p| !p.done).count() as u64;
            st.ledger.parts_leased(&keys, out);
        }
        for kv in db.iterator_cf(layout::cf(db, CF_MSG), IteratorMode::Start) {
            let (k, v) = kv.map_err(|e| e.to_string())?;
            let id = layout::id_of_key(&k).ok_or("bad message key")?;
            let rec: MsgRecord = layout::de(&v)?;
            st.index.reindex(id, Some(&rec), &st.modes);
        }
        Ok(st)
    }

    /// The applied log id and membership stored in `db` (a live database or a checkpoint).
    pub fn read_applied(db: &DB) -> Result<Applied, String> {
        Ok(read_meta(db)?
            .map(|m| (m.last_applied, m.membership))
            .unwrap_or_default())
    }

    /// Ends an apply batch: stores the bodies held too long or over the limit (`bodies`) and
    /// writes the meta.
    pub fn finish_batch(&mut self, tx: &mut Tx) {
        self.records.end_batch();
        let applied = self.last_applied.map_or(0, |l| l.index);
        self.bodies.store(tx, 0, applied);
        self.write_meta(tx);
    }

    /// Stores every held body from an entry at or below `through` (before a purge, or all at
    /// shutdown). Writes only bodies and `bodies_stored_to`, never the meta: outside apply,
    /// the meta on disk is apply's alone.
    pub fn store_bodies(&mut self, tx: &mut Tx, through: u64) {
        let applied = self.last_applied.map_or(0, |l| l.index);
        self.bodies.store(tx, through, applied);
        tx.put_bodies_stored_to(self.bodies.stored_to());
    }

    pub fn write_meta(&self, tx: &mut Tx) {
        let m = Meta {
            last_applied: self.last_applied,
            membership: self.membership.clone(),
            modes: self.modes.clone(),
            acct_seq: self.acct_seq,
            suppress_seq: self.suppress_seq,
            acct_marks: self.acct_marks.clone(),
            dedup_swept_ms: self.dedup_swept_ms,
        };
        tx.put_meta(layout::ser(&m));
        tx.put_bodies_stored_to(self.bodies.stored_to());
    }

    /// Stores a record (or deletes it, with its body, once it is finished) and re-derives its
    /// index entries.
    pub(super) fn put(&mut self, tx: &mut Tx, id: u64, rec: MsgRecord) {
        if rec.is_finished() {
            tx.delete_msg(id);
            self.records.put(id, None, 0);
            self.bodies.forget(id);
            self.index.reindex(id, None, &self.modes);
        } else {
            self.index.reindex(id, Some(&rec), &self.modes);
            let bytes = tx.put_msg(id, &rec);
            self.records.put(id, Some(rec), bytes);
        }
    }

    /// A message's record as apply last wrote it: from the cache of recent writes, which
    /// holds every write of the current batch, else from the store.
    pub(super) fn read(&mut self, tx: &Tx, id: u64) -> Result<Option<MsgRecord>, StoreError> {
        match self.records.get(id) {
            Some(rec) => Ok(rec),
            None => tx.read_stored_msg(id),
        }
    }

    pub(super) fn put_lease(&mut self, tx: &mut Tx, id: u64, l: LeaseRecord) {
        tx.put_lease(id, &l);
        self.leases.insert(id, l);
    }

    pub(super) fn remove_lease(&mut self, tx: &mut Tx, id: u64) -> Option<LeaseRecord> {
        let l = self.leases.remove(&id)?;
        tx.delete_lease(id);
        Some(l)
    }

    /// An accounting row for one recipient, with the remote's reply when there was an attempt.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn acct(
        &mut self,
        tx: &mut Tx,
        kind: RecordType,
        now_ms: u64,
        id: u64,
        rec: &MsgRecord,
        r: &RcptRecord,
        sender: Option<(&str, &str)>,
        attempt: Option<&Attempt>,
        category: &str,
    ) {
        let q = rec.queue_of(r);
        // The VMTA that sent, and the pool it was picked from when the queue names a pool.
        let (vmta, pool) = match sender {
            Some((member, queue_vmta)) if !member.is_empty() && member != queue_vmta => {
                (member.to_string(), queue_vmta.to_string())
            }
            _ => (q.vmta.clone(), String::new()),
        };
        let a = attempt.cloned().unwrap_or_default();
        let ev = AcctEvent {
            kind,
            time_ms: now_ms,
            queued_ms: rec.received_ms,
            msg: id,
            orig: rec.mail_from.clone(),
            rcpt: r.address.clone(),
            orcpt: r.orcpt.clone(),
            code: a.code,
            enhanced: a.enhanced,
            diag: a.text,
            category: category.to_string(),
            mx: a.mx_host,
            mx_ip: a.mx_ip,
            source_ip: a.source_ip,
            src_mta: rec.received_by.clone(),
            client_ip: rec.client_ip.clone(),
            tls_version: a.tls_version,
            tls_cipher: a.tls_cipher,
            esmtp: a.esmtp,
            size: rec.size,
            vmta,
            vmta_pool: pool,
            queue: q.dest,
            job_id: rec.job_id.clone(),
            envid: rec.envid.clone(),
            headers: rec.acct_headers.clone(),
            report: None,
        };
        self.push_acct(tx, ev);
    }

    pub(super) fn push_acct(&mut self, tx: &mut Tx, ev: AcctEvent) {
        self.acct_seq += 1;
        tx.put_acct(self.acct_seq, layout::ser(&ev));
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
            tx.delete_acct_before(seq);
            self.acct_marks.remove(0);
        }
    }

    pub fn queued_recipients(&self) -> u64 {
        self.index.queued_recipients()
    }
}

/// A digest of every state machine record, for comparing replicas. Reads a RocksDB snapshot
/// taken with the bodies held at the same point, so it may run beside apply; `applied` is the
/// log index that snapshot holds.
pub fn digest(db: &DB, state: &std::sync::Mutex<QueueState>) -> Result<(String, u64, u64), String> {
    let (snap, held) = {
        let st = state.lock().unwrap();
        (db.snapshot(), st.bodies.snapshot())
    };
    digest_at(db, &snap, &held)
}

/// The digest of `snap`, whose held bodies are `held`. A body counts with its message,
/// whether it is held or stored.
pub fn digest_at(
    db: &DB,
    snap: &rocksdb::Snapshot,
    held: &std::collections::BTreeMap<u64, bytes::Bytes>,
) -> Result<(String, u64, u64), String> {
    let mut h = Sha256::new();
    let mut messages = 0u64;
    let mut applied = 0u64;
    let read = || {
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_snapshot(snap);
        ro
    };
    let mut stored = db.raw_iterator_cf_opt(layout::cf(db, CF_BODY), read());
    for name in layout::DIGEST_CFS {
        for kv in db.iterator_cf_opt(layout::cf(db, name), read(), IteratorMode::Start) {
            let (k, v) = kv.map_err(|e| e.to_string())?;
            if name == CF_SM_META && &*k == layout::BODIES_STORED_KEY {
                continue;
            }
            if name == CF_SM_META && &*k == layout::META_KEY {
                // The meta holds the applied index and the membership, which differ between
                // replicas at the same state only in what was applied last.
                let m: Meta = layout::de(&v)?;
                applied = m.last_applied.map(|l| l.index).unwrap_or(0);
                h.update(layout::ser(&(
                    &m.modes,
                    m.acct_seq,
                    m.suppress_seq,
                    &m.acct_marks,
                    m.dedup_swept_ms,
                )));
                continue;
            }
            h.update(name.as_bytes());
            h.update((k.len() as u32).to_be_bytes());
            h.update(&k);
            h.update((v.len() as u32).to_be_bytes());
            h.update(&v);
            if name == CF_MSG {
                messages += 1;
                let id = layout::id_of_key(&k).ok_or("bad message key")?;
                stored.seek(&k);
                let body = match held.get(&id) {
                    Some(b) => Some(&b[..]),
                    None => stored.key().filter(|s| *s == &*k).and(stored.value()),
                };
                stored.status().map_err(|e| e.to_string())?;
                match body {
                    Some(b) => {
                        h.update(b"body");
                        h.update((b.len() as u32).to_be_bytes());
                        h.update(b);
                    }
                    None => h.update(b"no body"),
                }
            }
        }
    }
    let hex = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok((hex, applied, messages))
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
