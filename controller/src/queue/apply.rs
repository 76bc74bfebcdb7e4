//! Applying commands: one function per command. Apply is a pure function of the log and the
//! stored records: time and ids come from the command and the log index, iteration is in key
//! order, and every decision that needs the policy or a clock was made by the leader and
//! travels in the command.

use std::collections::BTreeMap;
use std::net::IpAddr;

use sluice_common::dsn::{self, DsnKind};
use sluice_common::policy::RecordType;

use super::acct_event::AcctEvent;
use super::command::*;
use super::layout;
use super::state::queue_matches;
use super::state::{
    DSN_DELAY_SENT, DSN_OWE_FAILURE, DSN_OWE_RELAYED, LeaseRecord, LeasedPart, MsgRecord,
    QueueState, RcptRecord, RcptState,
};
use super::tx::{StoreError, Tx};

/// How long an enqueue's idempotency token is remembered (log time). An ingress retries a
/// transaction for seconds; this is the margin.
pub const TOKEN_RETAIN_MS: u64 = 3_600_000;
/// Messages in one enqueue entry: ids are `log index << 20 | position`.
pub const MAX_MESSAGES_PER_ENTRY: usize = 1 << 20;
/// Suppression changes kept for ingress nodes to catch up with; one further behind reloads
/// the whole list.
pub const SUPPRESS_CHANGES_KEPT: u64 = 1_000_000;

type Applied = Result<CommandResult, StoreError>;

/// One lease's reports in one outcomes command.
#[derive(Default)]
struct LeaseReports {
    /// The connection's first report.
    first: bool,
    /// Parts whose first outcome this was.
    parts: u64,
}

impl QueueState {
    pub fn apply(&mut self, tx: &mut Tx, log_index: u64, cmd: Command) -> Applied {
        match cmd {
            Command::Enqueue { now_ms, messages } => {
                self.enqueue(tx, log_index, now_ms, messages, true)
            }
            Command::Lease {
                now_ms,
                lease_id,
                worker,
                expires_ms,
                queue,
                member,
                source_ip,
                new_connection,
                parts,
            } => self.lease(
                tx,
                now_ms,
                lease_id,
                NewLease {
                    worker,
                    expires_ms,
                    queue,
                    member,
                    source_ip,
                    new_connection,
                },
                parts,
            ),
            Command::Release {
                now_ms,
                lease_id,
                expired,
            } => self.release(tx, now_ms, lease_id, expired),
            Command::Outcomes { now_ms, outcomes } => self.outcomes(tx, now_ms, outcomes),
            Command::Expire {
                now_ms,
                parts,
                reply,
            } => self.bounce_parts(tx, now_ms, &parts, &reply),
            Command::Delete {
                now_ms,
                queue_pattern,
                recipient,
                job_id,
            } => self.delete(tx, now_ms, &queue_pattern, &recipient, &job_id),
            Command::Pause { pattern } => Ok(self.pause(pattern)),
            Command::Resume { pattern } => Ok(self.resume(&pattern)),
            Command::RetryNow { now_ms, pattern } => {
                self.reschedule(tx, &pattern, |t| t.min(now_ms))
            }
            Command::DeferQueue { queue, until_ms } => {
                self.reschedule(tx, &queue.to_string(), |t| t.max(until_ms))
            }
            Command::BounceQueue {
                now_ms,
                queue,
                reply,
            } => {
                let parts = self.index.ready_parts(&queue);
                self.bounce_parts(tx, now_ms, &parts, &reply)
            }
            Command::SetMode {
                queue,
                backoff_until_ms,
            } => Ok(self.set_mode(queue, backoff_until_ms)),
            Command::DisableSourceIp { ip, until_ms } => Ok(self.disable_ip(ip, until_ms)),
            Command::QueueFailure {
                now_ms,
                queue,
                member,
                attempt,
            } => Ok(self.queue_failure(tx, now_ms, queue, member, attempt)),
            Command::Notify { now_ms, notices } => self.notify(tx, log_index, now_ms, notices),
            Command::Inbound {
                now_ms,
                token,
                events,
                suppress,
            } => self.inbound(tx, now_ms, token, events, suppress),
            Command::Suppress {
                now_ms,
                add,
                mut remove,
                expire,
            } => {
                for (scope, address) in expire {
                    let Some(v) = tx.read_suppression(&scope, &address)? else {
                        continue;
                    };
                    let e: Suppression = layout::de(&v).map_err(StoreError)?;
                    if e.expires_ms != 0 && e.expires_ms <= now_ms {
                        remove.push((scope, address));
                    }
                }
                Ok(self.suppress(tx, add, remove))
            }
        }
    }

    fn enqueue(
        &mut self,
        tx: &mut Tx,
        log_index: u64,
        now_ms: u64,
        messages: Vec<NewMessage>,
        // Hold the bodies in memory (`bodies`): true when each message's position in
        // `messages` is its position in the entry.
        hold: bool,
    ) -> Applied {
        if messages.len() > MAX_MESSAGES_PER_ENTRY {
            return Err(StoreError(format!(
                "an entry with {} messages: at most {MAX_MESSAGES_PER_ENTRY}",
                messages.len()
            )));
        }
        if now_ms >= self.dedup_swept_ms + 60_000 {
            tx.dedup_forget_before(now_ms.saturating_sub(TOKEN_RETAIN_MS))?;
            self.dedup_swept_ms = now_ms;
        }
        let mut ids = Vec::with_capacity(messages.len());
        let entry_bytes = messages.iter().map(|m| m.body.len()).sum();
        for (i, m) in messages.into_iter().enumerate() {
            if m.token != 0
                && let Some(id) = tx.dedup_get(m.token)?
            {
                ids.push(id); // a retry of a transaction already queued
                continue;
            }
            // Unique across the cluster and the same on every replica.
            let id = (log_index << 20) | i as u64;
            let suppressed: Vec<Option<String>> =
                m.recipients.iter().map(|r| r.suppressed.clone()).collect();
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
                verp: m.verp,
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
                        dsn: 0,
                        last_status: String::new(),
                        last_mx: String::new(),
                        last_attempt_ms: 0,
                    })
                    .collect(),
            };
            for r in &rec.rcpts {
                self.acct(
                    tx,
                    RecordType::Received,
                    now_ms,
                    id,
                    &rec,
                    r,
                    None,
                    None,
                    "",
                );
            }
            let mut rec = rec;
            for (i, why) in suppressed.into_iter().enumerate() {
                if let Some(why) = why {
                    let reply = LocalReply {
                        code: 550,
                        enhanced: "5.7.1".into(),
                        text: format!("the recipient is on the suppression list ({why})"),
                        category: "suppressed".into(),
                    };
                    self.bounce_here(tx, now_ms, id, &mut rec, i, &reply);
                }
            }
            if hold {
                self.bodies.hold(id, m.body, entry_bytes);
            } else {
                tx.put_body(id, &m.body);
            }
            self.put(tx, id, rec);
            if m.token != 0 {
                tx.dedup_put(m.token, id, now_ms);
            }
            ids.push(id);
        }
        Ok(CommandResult::Enqueued { ids })
    }

    fn lease(
        &mut self,
        tx: &mut Tx,
        now_ms: u64,
        lease_id: u64,
        new: NewLease,
        parts: Vec<Part>,
    ) -> Applied {
        self.ledger.maintain(tx, now_ms)?;
        // Taken out while parts are added; `put_lease` puts it back.
        let mut lease = match (new.new_connection, self.leases.remove(&lease_id)) {
            (true, None) => LeaseRecord {
                worker: new.worker,
                granted_ms: now_ms,
                expires_ms: new.expires_ms,
                queue: new.queue,
                member: new.member,
                source_ip: new.source_ip,
                parts: Vec::new(),
                reported: false,
            },
            // More parts for an open connection of the same worker.
            (false, Some(l)) if l.worker == new.worker => l,
            // The lease ended meanwhile (or the id is taken): nothing is leased.
            (_, other) => {
                if let Some(l) = other {
                    self.leases.insert(lease_id, l);
                }
                return Ok(CommandResult::Leased { parts: Vec::new() });
            }
        };
        let mut taken = Vec::new();
        for (id, part) in parts {
            let Some(mut rec) = self.read(tx, id)? else {
                continue;
            };
            if rec.queues.get(part as usize) != Some(&lease.queue) || rec.ready_at(part).is_none() {
                continue; // already leased, finished or not in this queue
            }
            for r in rec
                .rcpts
                .iter_mut()
                .filter(|r| r.queue == part && r.state == RcptState::Queued)
            {
                r.lease = lease_id;
            }
            self.put(tx, id, rec);
            lease.parts.push(LeasedPart {
                msg: id,
                part,
                done: false,
            });
            taken.push((id, part));
        }
        if new.new_connection && taken.is_empty() {
            return Ok(CommandResult::Leased { parts: taken });
        }
        let keys = lease.budget_keys();
        if new.new_connection {
            self.ledger.lease_opened(&keys);
        }
        self.ledger.parts_leased(&keys, taken.len() as u64);
        lease.expires_ms = lease.expires_ms.max(new.expires_ms);
        self.put_lease(tx, lease_id, lease);
        Ok(CommandResult::Leased { parts: taken })
    }

    fn release(&mut self, tx: &mut Tx, now_ms: u64, lease_id: u64, expired: bool) -> Applied {
        self.ledger.maintain(tx, now_ms)?;
        let Some(lease) = self.remove_lease(tx, lease_id) else {
            return Ok(CommandResult::Count(0));
        };
        let keys = lease.budget_keys();
        let undone = lease.parts.iter().filter(|p| !p.done).count() as u64;
        if expired {
            // The worker went quiet: what it was sending may have arrived.
            self.ledger.parts_done(tx, &keys, undone, now_ms);
            if !lease.reported {
                self.ledger.connected(tx, &keys, now_ms);
            }
        } else {
            // The worker said it is done: what it did not report was never tried.
            self.ledger.parts_returned(&keys, undone);
            if !lease.reported {
                self.ledger.connected_unrecorded(&keys);
            }
        }
        self.ledger.lease_closed(&keys);
        let mut n = 0;
        for p in &lease.parts {
            let Some(mut rec) = self.read(tx, p.msg)? else {
                continue;
            };
            let mut changed = false;
            for r in rec
                .rcpts
                .iter_mut()
                .filter(|r| r.queue == p.part && r.lease == lease_id)
            {
                r.lease = 0;
                if r.state == RcptState::Queued {
                    r.next_attempt_ms = r.next_attempt_ms.max(now_ms);
                }
                changed = true;
            }
            if changed {
                self.put(tx, p.msg, rec);
                n += 1;
            }
        }
        Ok(CommandResult::Count(n))
    }

    fn outcomes(&mut self, tx: &mut Tx, now_ms: u64, outcomes: Vec<RecipientOutcome>) -> Applied {
        self.ledger.maintain(tx, now_ms)?;
        let mut n = 0;
        // What each lease's reports changed, written once per lease after the last outcome:
        // a lease holds every part of its connection, so writing it per outcome cost as much
        // as the outcome itself.
        let mut reports: BTreeMap<u64, LeaseReports> = BTreeMap::new();
        for o in outcomes {
            let Some(mut rec) = self.read(tx, o.msg)? else {
                continue;
            };
            let Some(r) = rec.rcpts.get(o.rcpt as usize).cloned() else {
                continue;
            };
            // Only the lease that holds a queued recipient may decide it: a report of an
            // expired lease, or a second report, changes nothing.
            if r.state != RcptState::Queued || r.lease == 0 || r.lease != o.lease {
                continue;
            }
            let Some(lease) = self.leases.get(&o.lease) else {
                continue;
            };
            let (member, lease_queue) = (lease.member.clone(), lease.queue.clone());
            let (kind, state, category) = match &o.kind {
                OutcomeKind::Delivered => (RecordType::Delivery, RcptState::Delivered, ""),
                OutcomeKind::Transient { .. } => (RecordType::Transient, RcptState::Queued, ""),
                OutcomeKind::Bounced { category, .. } => {
                    (RecordType::Bounce, RcptState::Bounced, category.as_str())
                }
            };
            let sender = Some((member.as_str(), lease_queue.vmta.as_str()));
            self.acct(
                tx,
                kind,
                now_ms,
                o.msg,
                &rec,
                &r,
                sender,
                Some(&o.attempt),
                category,
            );
            let rr = &mut rec.rcpts[o.rcpt as usize];
            rr.state = state;
            rr.attempts = rr.attempts.saturating_add(1);
            rr.last_error = if state == RcptState::Delivered {
                String::new()
            } else {
                format!("{} {}", o.attempt.code, o.attempt.text)
            };
            rr.last_status = dsn::status_of(&o.attempt.enhanced, o.attempt.code);
            // A notice names the receiver only for a reply a receiver made.
            rr.last_mx = if o.attempt.local {
                String::new()
            } else {
                o.attempt.mx_host.clone()
            };
            rr.last_attempt_ms = now_ms;
            let owed = match &o.kind {
                OutcomeKind::Bounced { .. } => Some((DsnKind::Failure, DSN_OWE_FAILURE)),
                OutcomeKind::Delivered if !o.attempt.next_hop_dsn => {
                    Some((DsnKind::Relayed, DSN_OWE_RELAYED))
                }
                _ => None,
            };
            if let Some((kind, bit)) = owed
                && !rec.mail_from.is_empty()
                && dsn::wants(rr.notify, kind)
            {
                rr.dsn |= bit;
            }
            if let OutcomeKind::Transient { next_attempt_ms } = o.kind {
                rr.next_attempt_ms = next_attempt_ms;
            }
            if state != RcptState::Delivered
                && let Some(qid) = self.index.queue_index(&lease_queue)
            {
                self.index.queues[qid as usize].last_error = rr.last_error.clone();
            }
            if let OutcomeKind::Bounced {
                category,
                suppress: true,
            } = &o.kind
            {
                let entry = Suppression {
                    address: r.address.to_ascii_lowercase(),
                    scope: String::new(),
                    reason: category.clone(),
                    source: format!("b {:016x}", o.msg),
                    time_ms: now_ms,
                    expires_ms: 0,
                };
                self.suppress_unless_permanent(tx, entry)?;
            }
            self.put(tx, o.msg, rec);
            self.count_report(&mut reports, o.lease, o.msg, r.queue);
            n += 1;
        }
        for (lease_id, done) in reports {
            let Some(lease) = self.leases.get(&lease_id) else {
                continue;
            };
            let keys = lease.budget_keys();
            if done.first {
                self.ledger.connected(tx, &keys, now_ms);
            }
            if done.parts > 0 {
                self.ledger.parts_done(tx, &keys, done.parts, now_ms);
            }
            tx.put_lease(lease_id, lease);
        }
        Ok(CommandResult::Count(n))
    }

    /// A lease's first report counts its connection; a part's first outcome counts its message.
    /// The lease record is changed here; the counts and its write wait in `reports`.
    fn count_report(
        &mut self,
        reports: &mut BTreeMap<u64, LeaseReports>,
        lease_id: u64,
        msg: u64,
        part: u32,
    ) {
        let Some(lease) = self.leases.get_mut(&lease_id) else {
            return;
        };
        let mut first = false;
        if !lease.reported {
            lease.reported = true;
            first = true;
        }
        let mut parts = 0;
        if let Some(p) = lease
            .parts
            .iter_mut()
            .find(|p| p.msg == msg && p.part == part && !p.done)
        {
            p.done = true;
            parts = 1;
        }
        if first || parts > 0 {
            let r = reports.entry(lease_id).or_default();
            r.first |= first;
            r.parts += parts;
        }
    }

    /// Bounces the queued, unleased recipients of these parts with a reply made here.
    fn bounce_parts(
        &mut self,
        tx: &mut Tx,
        now_ms: u64,
        parts: &[Part],
        reply: &LocalReply,
    ) -> Applied {
        let mut n = 0;
        for &(id, part) in parts {
            let Some(mut rec) = self.read(tx, id)? else {
                continue;
            };
            let mut changed = false;
            for i in 0..rec.rcpts.len() {
                let r = &rec.rcpts[i];
                if r.queue != part || r.state != RcptState::Queued || r.lease != 0 {
                    continue;
                }
                self.bounce_here(tx, now_ms, id, &mut rec, i, reply);
                changed = true;
                n += 1;
            }
            if changed {
                self.put(tx, id, rec);
            }
        }
        Ok(CommandResult::Count(n))
    }

    fn delete(
        &mut self,
        tx: &mut Tx,
        now_ms: u64,
        queue_pattern: &str,
        recipient: &str,
        job_id: &str,
    ) -> Applied {
        let reply = LocalReply {
            code: 554,
            enhanced: "5.3.0".into(),
            text: "deleted by the operator".into(),
            category: "other".into(),
        };
        // In id order: the accounting rows get the same seq on every replica.
        let ids: Vec<u64> = self.index.msgs.keys().copied().collect();
        let mut n = 0;
        for id in ids {
            let Some(mut rec) = self.read(tx, id)? else {
                continue;
            };
            if !job_id.is_empty() && rec.job_id != job_id {
                continue;
            }
            let mut changed = false;
            for i in 0..rec.rcpts.len() {
                let r = &rec.rcpts[i];
                if r.state != RcptState::Queued
                    || (!queue_pattern.is_empty()
                        && !queue_matches(queue_pattern, &rec.queue_of(r)))
                    || (!recipient.is_empty() && !r.address.eq_ignore_ascii_case(recipient))
                {
                    continue;
                }
                self.bounce_here(tx, now_ms, id, &mut rec, i, &reply);
                changed = true;
                n += 1;
            }
            if changed {
                self.put(tx, id, rec);
            }
        }
        Ok(CommandResult::Count(n))
    }

    /// Bounces recipient `i` with a reply made here: a `b` row and the recipient final. The
    /// caller stores the record.
    fn bounce_here(
        &mut self,
        tx: &mut Tx,
        now_ms: u64,
        id: u64,
        rec: &mut MsgRecord,
        i: usize,
        reply: &LocalReply,
    ) {
        let attempt = Attempt {
            code: reply.code,
            enhanced: reply.enhanced.clone(),
            text: reply.text.clone(),
            ..Default::default()
        };
        let r = rec.rcpts[i].clone();
        self.acct(
            tx,
            RecordType::Bounce,
            now_ms,
            id,
            rec,
            &r,
            None,
            Some(&attempt),
            &reply.category,
        );
        let owed = !rec.mail_from.is_empty();
        let r = &mut rec.rcpts[i];
        r.state = RcptState::Bounced;
        r.last_error = format!("{} {}", reply.code, reply.text);
        r.last_status = dsn::status_of(&reply.enhanced, reply.code);
        // Sluice's own reply: no receiver said it.
        r.last_mx.clear();
        if owed && dsn::wants(r.notify, DsnKind::Failure) {
            r.dsn |= DSN_OWE_FAILURE;
        }
    }

    /// Adds an automatic entry. A permanent entry already there (an operator's, with its note)
    /// stays as it is; one that expires is replaced by this permanent one.
    fn suppress_unless_permanent(
        &mut self,
        tx: &mut Tx,
        entry: Suppression,
    ) -> Result<(), StoreError> {
        if let Some(v) = tx.read_suppression(&entry.scope, &entry.address)?
            && layout::de::<Suppression>(&v)
                .map_err(StoreError)?
                .expires_ms
                == 0
        {
            return Ok(());
        }
        self.suppress(tx, vec![entry], Vec::new());
        Ok(())
    }

    /// Rows and suppression entries from reports that came back.
    fn inbound(
        &mut self,
        tx: &mut Tx,
        now_ms: u64,
        token: u128,
        events: Vec<AcctEvent>,
        suppress: Vec<Suppression>,
    ) -> Applied {
        if token != 0 {
            if tx.dedup_get(token)?.is_some() {
                return Ok(CommandResult::Count(0)); // the same report, sent again
            }
            tx.dedup_put(token, 0, now_ms);
        }
        let n = events.len() as u64;
        for ev in events {
            self.push_acct(tx, ev);
        }
        for mut e in suppress {
            e.address = e.address.to_ascii_lowercase();
            self.suppress_unless_permanent(tx, e)?;
        }
        Ok(CommandResult::Count(n))
    }

    fn suppress(
        &mut self,
        tx: &mut Tx,
        add: Vec<Suppression>,
        remove: Vec<(String, String)>,
    ) -> CommandResult {
        let n = (add.len() + remove.len()) as u64;
        let changes = remove
            .into_iter()
            .map(|(scope, address)| SuppressChange::Removed {
                scope,
                address: address.to_ascii_lowercase(),
            })
            .chain(add.into_iter().map(|mut e| {
                e.address = e.address.to_ascii_lowercase();
                SuppressChange::Added(e)
            }));
        for c in changes {
            match &c {
                SuppressChange::Added(e) => {
                    tx.put_suppression(&e.scope, &e.address, layout::ser(e))
                }
                SuppressChange::Removed { scope, address } => tx.delete_suppression(scope, address),
            }
            self.suppress_seq += 1;
            tx.put_suppress_change(self.suppress_seq, layout::ser(&c));
            if self.suppress_seq > SUPPRESS_CHANGES_KEPT && self.suppress_seq.is_multiple_of(1024) {
                tx.delete_suppress_changes_before(self.suppress_seq - SUPPRESS_CHANGES_KEPT);
            }
        }
        CommandResult::Count(n)
    }

    fn notify(
        &mut self,
        tx: &mut Tx,
        log_index: u64,
        now_ms: u64,
        notices: Vec<Notice>,
    ) -> Applied {
        let mut dsns = Vec::new();
        for n in notices {
            let Some(mut rec) = self.read(tx, n.msg)? else {
                continue;
            };
            // Only a notice whose every recipient is still owed it goes out; any other (a
            // duplicate, or one built before part of it went out) changes nothing, and the
            // leader builds an exact one from what is still owed.
            let owed = |r: &RcptRecord| match n.kind {
                DsnKind::Failure => r.dsn & DSN_OWE_FAILURE != 0,
                DsnKind::Relayed => r.dsn & DSN_OWE_RELAYED != 0,
                DsnKind::Delay => r.state == RcptState::Queued && r.dsn & DSN_DELAY_SENT == 0,
            };
            let exact = !n.rcpts.is_empty()
                && n.rcpts
                    .iter()
                    .all(|&i| rec.rcpts.get(i as usize).is_some_and(owed));
            if !exact {
                continue;
            }
            for &i in &n.rcpts {
                let r = &mut rec.rcpts[i as usize];
                match n.kind {
                    DsnKind::Failure => r.dsn &= !DSN_OWE_FAILURE,
                    DsnKind::Relayed => r.dsn &= !DSN_OWE_RELAYED,
                    DsnKind::Delay => r.dsn |= DSN_DELAY_SENT,
                }
            }
            self.put(tx, n.msg, rec);
            dsns.extend(n.dsn);
        }
        // A notice's position in the entry is not its position among the notices sent, so
        // its body is stored at once (notices are few).
        self.enqueue(tx, log_index, now_ms, dsns, false)
    }

    fn pause(&mut self, pattern: String) -> CommandResult {
        let mut n = 0;
        for q in self
            .index
            .queues
            .iter_mut()
            .filter(|q| queue_matches(&pattern, &q.key))
        {
            q.paused = true;
            // Counted only where mail is queued: a replica that restarted has no entry for a
            // queue that emptied, and the answer must not differ.
            n += u64::from(q.recipients > 0);
        }
        if !self.modes.paused.contains(&pattern) {
            self.modes.paused.push(pattern);
        }
        CommandResult::Count(n)
    }

    /// Lifts every pause whose pattern `pattern` covers (`resume *` lifts them all).
    fn resume(&mut self, pattern: &str) -> CommandResult {
        self.modes.paused.retain(|p| {
            let (dest, vmta) = p.split_once('/').unwrap_or((p, "*"));
            let as_key = QueueKey {
                dest: dest.to_string(),
                vmta: vmta.to_string(),
            };
            p != pattern && !queue_matches(pattern, &as_key)
        });
        let mut n = 0;
        let paused = &self.modes.paused;
        for q in self
            .index
            .queues
            .iter_mut()
            .filter(|q| queue_matches(pattern, &q.key))
        {
            q.paused = paused.iter().any(|p| queue_matches(p, &q.key));
            n += u64::from(q.recipients > 0);
        }
        CommandResult::Count(n)
    }

    /// Moves the next attempt of every ready part of the matching queues (`retry-now`,
    /// `defer-queue`). The new times are stored in the records, so the index built from them
    /// after a restart is the same.
    fn reschedule(&mut self, tx: &mut Tx, pattern: &str, at: impl Fn(u64) -> u64) -> Applied {
        let mut parts = Vec::new();
        for q in self
            .index
            .queues
            .iter()
            .filter(|q| queue_matches(pattern, &q.key))
        {
            parts.extend(q.ready.iter().map(|&(_, m, p)| (m, p)));
        }
        let mut n = 0;
        for (id, part) in parts {
            let Some(mut rec) = self.read(tx, id)? else {
                continue;
            };
            let mut changed = false;
            for r in rec
                .rcpts
                .iter_mut()
                .filter(|r| r.queue == part && r.state == RcptState::Queued && r.lease == 0)
            {
                let t = at(r.next_attempt_ms);
                changed |= t != r.next_attempt_ms;
                r.next_attempt_ms = t;
            }
            if changed {
                self.put(tx, id, rec);
            }
            n += 1;
        }
        Ok(CommandResult::Count(n))
    }

    fn queue_failure(
        &mut self,
        tx: &mut Tx,
        now_ms: u64,
        queue: QueueKey,
        member: String,
        a: Attempt,
    ) -> CommandResult {
        let (vmta, pool) = if !member.is_empty() && member != queue.vmta {
            (member, queue.vmta)
        } else {
            (queue.vmta, String::new())
        };
        let ev = super::acct_event::AcctEvent {
            kind: RecordType::TransientQueue,
            time_ms: now_ms,
            code: a.code,
            enhanced: a.enhanced,
            diag: a.text,
            mx: a.mx_host,
            mx_ip: a.mx_ip,
            source_ip: a.source_ip,
            tls_version: a.tls_version,
            tls_cipher: a.tls_cipher,
            esmtp: a.esmtp,
            vmta,
            vmta_pool: pool,
            queue: queue.dest,
            ..Default::default()
        };
        self.push_acct(tx, ev);
        CommandResult::Count(1)
    }

    fn set_mode(&mut self, queue: QueueKey, backoff_until_ms: u64) -> CommandResult {
        if backoff_until_ms == 0 {
            self.modes.backoff.remove(&queue);
        } else {
            self.modes.backoff.insert(queue, backoff_until_ms);
        }
        CommandResult::Count(1)
    }

    fn disable_ip(&mut self, ip: IpAddr, until_ms: u64) -> CommandResult {
        if until_ms == 0 {
            self.modes.disabled_ips.remove(&ip);
        } else {
            self.modes.disabled_ips.insert(ip, until_ms);
        }
        CommandResult::Count(1)
    }
}

/// The lease a `Lease` command asks for.
struct NewLease {
    worker: String,
    expires_ms: u64,
    queue: QueueKey,
    member: String,
    source_ip: Option<IpAddr>,
    new_connection: bool,
}
