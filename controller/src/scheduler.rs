//! The leader's scheduler: which queue gets the next connection, within the policy's budgets,
//! and the lease service through which workers take work and report outcomes.
//!
//! Budgets live in the leader's memory. Connections are counted from active leases, which are
//! replicated, so a new leader starts from the true count; rate windows start afresh.
//! Delivery is at least once: a worker may deliver and die before it reports, and then the
//! lease expires and the message is delivered again.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_common::policy::{DomainSettings, Policy, Target};
use sluice_proto::lease::leases_server::Leases;
use sluice_proto::lease::*;
use tonic::{Request, Response, Status};

use crate::group_commit::{GroupCommit, Pending};
use crate::node::{Controller, now_ms};
use crate::queue::command::{Command, CommandResult, OutcomeKind, QueueKey, RecipientOutcome};
use crate::queue::state::{MsgRecord, RcptState};

/// A queue, the member VMTA that will send, its effective rule and the parts to lease.
pub type Pick = (QueueKey, String, DomainSettings, Vec<(u64, u64, u16)>);

struct WorkerInfo {
    ips: Vec<IpAddr>,
    last_seen_ms: u64,
}

struct Active {
    worker: String,
    /// Budget key: destination and the member VMTA that sends.
    budget: (String, String),
    queue: QueueKey,
    member: String,
    /// The member's source IP, for the `source-ip-max-*` budgets (per destination and IP).
    ip: Option<IpAddr>,
    sent: u32,
    last_activity_ms: u64,
}

#[derive(Default)]
struct Budgets {
    /// Message grant times per (dest, vmta), for max-msg-rate.
    msgs: HashMap<(String, String), VecDeque<u64>>,
    /// Connection grant times per (dest, vmta), for max-connect-rate.
    connects: HashMap<(String, String), VecDeque<u64>>,
    /// The same per (dest, source IP), for source-ip-max-msg-rate and -connect-rate.
    ip_msgs: HashMap<(String, IpAddr), VecDeque<u64>>,
    ip_connects: HashMap<(String, IpAddr), VecDeque<u64>>,
    /// Messages per VMTA per day, for max-cold-virtual-mta-msg.
    warmup: HashMap<String, (u64, u64)>,
    /// Queues in backoff mode until the given time.
    backoff: HashMap<QueueKey, u64>,
    /// Source IPs disabled by `disable-source-ip` until the given time.
    disabled_ips: HashMap<IpAddr, u64>,
    last_error: HashMap<QueueKey, String>,
}

/// Groups the outcomes of concurrent reports into one Raft entry, as enqueue does.
struct OutcomeBatcher {
    group: GroupCommit<Vec<RecipientOutcome>, Result<(), String>>,
}

impl OutcomeBatcher {
    fn start(ctl: Arc<Controller>) -> OutcomeBatcher {
        let group = GroupCommit::start(
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
        );
        OutcomeBatcher { group }
    }

    async fn record(&self, outcomes: Vec<RecipientOutcome>) -> Result<(), String> {
        self.group
            .submit(outcomes)
            .await
            .unwrap_or_else(|| Err("shutting down".to_string()))
    }
}

pub struct Scheduler {
    ctl: Arc<Controller>,
    /// queue-priority by queue index, for the policy version in the first field.
    priorities: Mutex<(u64, Vec<u8>)>,
    outcomes: OutcomeBatcher,
    workers: Mutex<HashMap<String, WorkerInfo>>,
    active: Mutex<HashMap<u64, Active>>,
    budgets: Mutex<Budgets>,
    next_lease: Mutex<u64>,
}

fn window_count(q: &mut VecDeque<u64>, now: u64, per_ms: u64) -> u64 {
    while q.front().is_some_and(|&t| t + per_ms <= now) {
        q.pop_front();
    }
    q.len() as u64
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
struct DueQueues<'a> {
    heads: &'a [u64],
    prios: &'a [u8],
    now: u64,
    first: Option<DueKey>,
    rest: Option<std::collections::BinaryHeap<DueKey>>,
}

impl<'a> DueQueues<'a> {
    fn new(heads: &'a [u64], prios: &'a [u8], now: u64) -> Self {
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
            let mut heap: std::collections::BinaryHeap<DueKey> = self.keys().collect();
            heap.pop(); // the first, already given
            self.rest = Some(heap);
        }
        self.rest.as_mut()?.pop().map(due_index)
    }
}

/// Rule for a queue sent through a member VMTA, with backoff values in backoff mode.
fn effective(policy: &Policy, dest: &str, member: &str, backoff: bool) -> DomainSettings {
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

impl Scheduler {
    pub fn new(ctl: Arc<Controller>) -> Arc<Scheduler> {
        let s = Arc::new(Scheduler {
            priorities: Mutex::new((0, Vec::new())),
            outcomes: OutcomeBatcher::start(ctl.clone()),
            ctl,
            workers: Mutex::new(HashMap::new()),
            active: Mutex::new(HashMap::new()),
            budgets: Mutex::new(Budgets::default()),
            // Unique across leaders: time-based high bits.
            next_lease: Mutex::new(now_ms() << 12),
        });
        let me = s.clone();
        tokio::spawn(async move { me.expiry_loop().await });
        s
    }

    fn is_leader(&self) -> bool {
        self.ctl.not_leader().is_none()
    }

    /// Ends leases whose worker went quiet, so their messages become ready again.
    async fn expiry_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if !self.is_leader() {
                self.active.lock().unwrap().clear();
                continue;
            }
            let now = now_ms();
            let ttl = self.ctl.settings.scheduler.lease_ttl_ms;
            let leases: Vec<(u64, u64)> = {
                let st = self.ctl.sm.state.lock().unwrap();
                st.leases
                    .iter()
                    .map(|(id, l)| (*id, l.expires_ms))
                    .collect()
            };
            let expired: Vec<u64> = {
                let active = self.active.lock().unwrap();
                leases
                    .into_iter()
                    .filter(|(id, exp)| {
                        let last = active
                            .get(id)
                            .map(|a| a.last_activity_ms + ttl)
                            .unwrap_or(0);
                        now > (*exp).max(last)
                    })
                    .map(|(id, _)| id)
                    .collect()
            };
            for id in expired {
                tracing::warn!(lease = id, "lease expired; its messages are ready again");
                self.active.lock().unwrap().remove(&id);
                let _ = self
                    .ctl
                    .raft
                    .client_write(Command::Release {
                        now_ms: now,
                        lease_id: id,
                    })
                    .await;
            }
        }
    }

    fn connections(&self, budget: &(String, String)) -> (u32, u32) {
        let active = self.active.lock().unwrap();
        let per = active.values().filter(|a| &a.budget == budget).count() as u32;
        (per, active.len() as u32)
    }

    /// Picks the queue and member VMTA for a new connection from this worker, if any is due
    /// and within budget.
    pub fn pick(&self, worker_ips: &[IpAddr], policy: &Policy, now: u64) -> Option<Pick> {
        let st = self.ctl.sm.state.lock().unwrap();
        let mut budgets = self.budgets.lock().unwrap();
        let total_cap = policy.global.total_max_smtp_out.unwrap_or(u32::MAX);
        // queue-priority per queue, resolved once per policy version, not per grant.
        let version = self.ctl.policy().version;
        let mut prio_cache = self.priorities.lock().unwrap();
        if prio_cache.0 != version {
            *prio_cache = (version, Vec::new());
        }
        let prios = &mut prio_cache.1;
        while prios.len() < st.queues.len() {
            let dest = &st.queues[prios.len()].key.dest;
            prios.push(
                policy
                    .domain_settings(dest, None)
                    .queue_priority
                    .map(|p| p.0)
                    .unwrap_or(50),
            );
        }
        for i in DueQueues::new(&st.heads, prios, now) {
            if st.queues[i].paused {
                continue;
            }
            let q = &st.queues[i];
            let members: Vec<String> = match policy.target(&q.key.vmta) {
                Some(Target::Vmta(v)) => vec![v.name.clone()],
                Some(Target::Pool(p)) => p.members.clone(),
                None => vec![String::new()],
            };
            let backoff = budgets
                .backoff
                .get(&q.key)
                .is_some_and(|&until| until > now);
            // Spread a pool by each member's free connection capacity.
            let mut best: Option<(u32, String, DomainSettings)> = None;
            for m in members {
                let ip = policy.vmtas.get(&m).and_then(|v| v.source_ip);
                if let Some(ip) = ip
                    && (!worker_ips.contains(&ip)
                        || budgets
                            .disabled_ips
                            .get(&ip)
                            .is_some_and(|&until| until > now))
                {
                    continue;
                }
                let rule = effective(policy, &q.key.dest, &m, backoff);
                let budget = (q.key.dest.clone(), m.clone());
                let (conns, total) = self.connections(&budget);
                let max = rule.max_smtp_out.unwrap_or(20);
                if conns >= max || total >= total_cap {
                    continue;
                }
                if let Some(vmax) = policy.vmtas.get(&m).and_then(|v| v.settings.max_smtp_out) {
                    let vconns = self
                        .active
                        .lock()
                        .unwrap()
                        .values()
                        .filter(|a| a.member == m)
                        .count() as u32;
                    if vconns >= vmax {
                        continue;
                    }
                }
                if let Some(r) = rule.max_msg_rate.filter(|r| !r.is_unlimited()) {
                    let q = budgets.msgs.entry(budget.clone()).or_default();
                    if window_count(q, now, r.per_secs * 1000) >= r.count {
                        continue;
                    }
                }
                if let Some(r) = rule.max_connect_rate.filter(|r| !r.is_unlimited()) {
                    let q = budgets.connects.entry(budget.clone()).or_default();
                    if window_count(q, now, r.per_secs * 1000) >= r.count {
                        continue;
                    }
                }
                if let Some(ip) = ip
                    && !self.source_ip_allows(&mut budgets, &rule, &q.key.dest, ip, now)
                {
                    continue;
                }
                if let Some(r) = rule.max_cold_virtual_mta_msg.filter(|r| !r.is_unlimited()) {
                    let day = now / (r.per_secs * 1000);
                    let e = budgets.warmup.entry(m.clone()).or_insert((day, 0));
                    if e.0 != day {
                        *e = (day, 0);
                    }
                    if e.1 >= r.count {
                        continue;
                    }
                }
                let free = max - conns;
                if best.as_ref().is_none_or(|(f, _, _)| free > *f) {
                    best = Some((free, m, rule));
                }
            }
            let Some((_, member, rule)) = best else {
                continue;
            };
            let ip = policy.vmtas.get(&member).and_then(|v| v.source_ip);
            let parts = self.take_parts(
                &mut budgets,
                &q.key,
                &member,
                ip,
                &rule,
                q.ready.iter().copied(),
                now,
            );
            if parts.is_empty() {
                continue;
            }
            let budget = (q.key.dest.clone(), member.clone());
            budgets.connects.entry(budget).or_default().push_back(now);
            if let Some(ip) = ip {
                budgets
                    .ip_connects
                    .entry((q.key.dest.clone(), ip))
                    .or_default()
                    .push_back(now);
            }
            return Some((q.key.clone(), member, rule, parts));
        }
        None
    }

    /// Whether the `source-ip-max-*` budgets of (dest, ip) allow one more connection.
    fn source_ip_allows(
        &self,
        budgets: &mut Budgets,
        rule: &DomainSettings,
        dest: &str,
        ip: IpAddr,
        now: u64,
    ) -> bool {
        if let Some(max) = rule.source_ip_max_smtp_out {
            let conns = self
                .active
                .lock()
                .unwrap()
                .values()
                .filter(|a| a.ip == Some(ip) && a.queue.dest == dest)
                .count() as u32;
            if conns >= max {
                return false;
            }
        }
        let key = (dest.to_string(), ip);
        for (rate, windows) in [
            (rule.source_ip_max_msg_rate, &mut budgets.ip_msgs),
            (rule.source_ip_max_connect_rate, &mut budgets.ip_connects),
        ] {
            if let Some(r) = rate.filter(|r| !r.is_unlimited()) {
                let q = windows.entry(key.clone()).or_default();
                if window_count(q, now, r.per_secs * 1000) >= r.count {
                    return false;
                }
            }
        }
        true
    }

    /// Due parts of a queue, as many as the per-connection and rate budgets allow; their grant
    /// is counted against the rate now.
    #[allow(clippy::too_many_arguments)]
    fn take_parts(
        &self,
        budgets: &mut Budgets,
        key: &QueueKey,
        member: &str,
        ip: Option<IpAddr>,
        rule: &DomainSettings,
        ready: impl Iterator<Item = (u64, u64, u16)>,
        now: u64,
    ) -> Vec<(u64, u64, u16)> {
        let mut limit = self.ctl.settings.scheduler.batch as u64;
        // One lease is one connection: never more than it may carry.
        if let Some(n) = rule.max_msg_per_connection.filter(|&n| n > 0) {
            limit = limit.min(n as u64);
        }
        let budget = (key.dest.clone(), member.to_string());
        if let Some(r) = rule.max_msg_rate.filter(|r| !r.is_unlimited()) {
            let q = budgets.msgs.entry(budget.clone()).or_default();
            limit = limit.min(
                r.count
                    .saturating_sub(window_count(q, now, r.per_secs * 1000)),
            );
        }
        let ip_rate = ip.zip(rule.source_ip_max_msg_rate.filter(|r| !r.is_unlimited()));
        if let Some((ip, r)) = ip_rate {
            let q = budgets.ip_msgs.entry((key.dest.clone(), ip)).or_default();
            limit = limit.min(
                r.count
                    .saturating_sub(window_count(q, now, r.per_secs * 1000)),
            );
        }
        if let Some(r) = rule.max_cold_virtual_mta_msg.filter(|r| !r.is_unlimited()) {
            let used = budgets.warmup.get(member).map(|e| e.1).unwrap_or(0);
            limit = limit.min(r.count.saturating_sub(used));
        }
        let parts: Vec<(u64, u64, u16)> = ready
            .take_while(|&(t, _, _)| t <= now)
            .take(limit as usize)
            .collect();
        if rule.max_msg_rate.is_some_and(|r| !r.is_unlimited()) {
            let q = budgets.msgs.entry(budget).or_default();
            q.extend(std::iter::repeat_n(now, parts.len()));
        }
        if let Some((ip, _)) = ip_rate {
            let q = budgets.ip_msgs.entry((key.dest.clone(), ip)).or_default();
            q.extend(std::iter::repeat_n(now, parts.len()));
        }
        if let Some(e) = budgets.warmup.get_mut(member) {
            e.1 += parts.len() as u64;
        }
        parts
    }

    fn settings_for(
        &self,
        policy: &Policy,
        key: &QueueKey,
        member: &str,
        rule: &DomainSettings,
        worker_ips: &[IpAddr],
    ) -> DeliverySettings {
        let vmta = policy.vmtas.get(member);
        let source_ip = vmta
            .and_then(|v| v.source_ip)
            .or_else(|| worker_ips.first().copied())
            .map(|i| i.to_string())
            .unwrap_or_default();
        let ehlo = vmta
            .and_then(|v| v.ehlo_name.clone().or_else(|| v.settings.host_name.clone()))
            .or_else(|| policy.global.host_name.clone())
            .unwrap_or_else(|| "localhost".into());
        let (hosts, mx_domain) = match (&rule.route, &rule.smtp_hosts) {
            (Some(r), _) => (vec![r.to_string()], String::new()),
            (None, Some(sluice_common::policy::SmtpHosts::Hosts(h))) => {
                (h.iter().map(|h| h.to_string()).collect(), String::new())
            }
            (None, Some(sluice_common::policy::SmtpHosts::LookupMx(d))) => (Vec::new(), d.clone()),
            (None, None) => (Vec::new(), key.dest.clone()),
        };
        let ms = |d: Option<sluice_common::policy::value::PDuration>, default: u64| {
            d.map(|d| d.secs() * 1000).unwrap_or(default)
        };
        let mut s = DeliverySettings {
            hosts,
            mx_domain,
            source_ip,
            ehlo_name: ehlo,
            use_starttls: rule.use_starttls.unwrap_or(true),
            require_starttls: rule.require_starttls.unwrap_or(false),
            connect_timeout_ms: ms(rule.connect_timeout, 60_000),
            greeting_timeout_ms: ms(rule.smtp_greeting_timeout, 300_000),
            data_timeout_ms: ms(rule.data_send_timeout, 600_000),
            max_msg_per_connection: rule.max_msg_per_connection.unwrap_or(0),
            max_rcpt_per_message: rule.max_rcpt_per_message.unwrap_or(100),
            max_errors_per_connection: rule.max_errors_per_connection.unwrap_or(10),
            bounce_upon_no_mx: rule.bounce_upon_no_mx.unwrap_or(false),
            mx_connection_attempts: rule.mx_connection_attempts.unwrap_or(10),
            smtp_421_means_mx_unavailable: rule.smtp_421_means_mx_unavailable.unwrap_or(false),
            assume_delivery_upon_data_termination_timeout: rule
                .assume_delivery_upon_data_termination_timeout
                .unwrap_or(false),
            ignore_8bitmime: rule.ignore_8bitmime.unwrap_or(false),
            smtp_pattern_list: rule.smtp_pattern_list.clone().unwrap_or_default(),
            vmta: member.to_string(),
            ..Default::default()
        };
        if rule.dkim_sign == Some(true) {
            // The key is chosen per message by its From domain on the worker; here the
            // identity's domain (if any) preselects one.
            let ident = rule
                .dkim_identity
                .as_deref()
                .and_then(|i| i.rsplit('@').next())
                .unwrap_or("");
            let domain = if ident.is_empty() { "*" } else { ident };
            match policy.dkim_key(Some(member), domain) {
                Some(k) => {
                    s.dkim_selector = k.selector.clone();
                    s.dkim_domain = k.domain.clone();
                    s.dkim_key_pem = k.key_pem.clone();
                }
                // Sign with the key of each message's From domain, if there is one.
                None => s.dkim_selector = "*".into(),
            }
        }
        s
    }

    fn leased_messages(&self, parts: &[(u64, u64, u16)], lease_id: u64) -> Vec<LeasedMessage> {
        let db = &self.ctl.sm.db;
        let mut out = Vec::new();
        for &(_, id, part) in parts {
            let rec: Option<MsgRecord> = self.ctl.sm.state.lock().unwrap().read_message(db, id);
            let Some(rec) = rec else { continue };
            let rcpts: Vec<LeasedRecipient> = rec
                .rcpts
                .iter()
                .enumerate()
                .filter(|(_, r)| {
                    r.queue == part && r.state == RcptState::Queued && r.lease == lease_id
                })
                .map(|(i, r)| LeasedRecipient {
                    index: i as u32,
                    address: r.address.clone(),
                })
                .collect();
            if rcpts.is_empty() {
                continue;
            }
            let body = db
                .get_cf(
                    db.cf_handle(crate::raft::store::CF_BODY).unwrap(),
                    id.to_be_bytes(),
                )
                .ok()
                .flatten()
                .unwrap_or_default();
            out.push(LeasedMessage {
                id: format!("{id:016x}"),
                mail_from: rec.mail_from.clone(),
                recipients: rcpts,
                body: body.into(),
                envid: rec.envid.clone(),
            });
        }
        out
    }

    async fn grant(&self, worker: &str, ips: &[IpAddr]) -> Result<Option<Lease>, Status> {
        let policy = self.ctl.policy().policy.clone();
        let now = now_ms();
        let Some((key, member, rule, parts)) = self.pick(ips, &policy, now) else {
            return Ok(None);
        };
        let lease_id = {
            let mut n = self.next_lease.lock().unwrap();
            *n += 1;
            *n
        };
        let ttl = self.ctl.settings.scheduler.lease_ttl_ms;
        let budget = (key.dest.clone(), member.clone());
        self.active.lock().unwrap().insert(
            lease_id,
            Active {
                worker: worker.to_string(),
                budget,
                queue: key.clone(),
                member: member.clone(),
                ip: policy.vmtas.get(&member).and_then(|v| v.source_ip),
                sent: 0,
                last_activity_ms: now,
            },
        );
        let cmd = Command::Lease {
            now_ms: now,
            lease_id,
            worker: worker.to_string(),
            expires_ms: now + ttl,
            queue: key.clone(),
            parts: parts.clone(),
        };
        if let Err(e) = self.ctl.raft.client_write(cmd).await {
            self.active.lock().unwrap().remove(&lease_id);
            return Err(Status::unavailable(e.to_string()));
        }
        let messages = self.leased_messages(&parts, lease_id);
        if messages.is_empty() {
            self.active.lock().unwrap().remove(&lease_id);
            let _ = self
                .ctl
                .raft
                .client_write(Command::Release {
                    now_ms: now,
                    lease_id,
                })
                .await;
            return Ok(None);
        }
        let settings = self.settings_for(&policy, &key, &member, &rule, ips);
        Ok(Some(Lease {
            lease_id,
            queue: key.dest.clone(),
            vmta: member,
            settings: Some(settings),
            messages,
            expires_in_ms: ttl,
        }))
    }

    #[allow(clippy::too_many_arguments)]
    fn outcome_kind(
        &self,
        policy: &Policy,
        q: &QueueKey,
        member: &str,
        rec: Option<&MsgRecord>,
        rcpt: u32,
        o: &Outcome,
        now: u64,
    ) -> OutcomeKind {
        let kind = outcome::Kind::try_from(o.kind).unwrap_or(outcome::Kind::Transient);
        let bounce_rcpt = o
            .pattern_action
            .split(',')
            .any(|a| a == "bounce-rcpt" || a == "bounce-queue");
        match kind {
            outcome::Kind::Delivered => OutcomeKind::Delivered,
            outcome::Kind::Bounced => OutcomeKind::Bounced {
                category: crate::bounce::classify(
                    Some(policy),
                    o.code as u16,
                    &o.enhanced,
                    &o.text,
                    o.after_data,
                ),
            },
            outcome::Kind::Transient if bounce_rcpt => OutcomeKind::Bounced {
                category: crate::bounce::classify(
                    Some(policy),
                    o.code as u16,
                    &o.enhanced,
                    &o.text,
                    o.after_data,
                ),
            },
            outcome::Kind::Transient => {
                let backoff = self
                    .budgets
                    .lock()
                    .unwrap()
                    .backoff
                    .get(q)
                    .is_some_and(|&u| u > now);
                let rule = effective(policy, &q.dest, member, backoff);
                let received = rec.map(|r| r.received_ms).unwrap_or(now);
                let bounce_after = rule
                    .bounce_after
                    .map(|d| d.secs() * 1000)
                    .unwrap_or(u64::MAX);
                if now >= received.saturating_add(bounce_after) {
                    return OutcomeKind::Bounced {
                        category: "message-expired".into(),
                    };
                }
                let attempts = rec
                    .and_then(|r| r.rcpts.get(rcpt as usize))
                    .map(|r| r.attempts as usize)
                    .unwrap_or(0);
                let schedule = rule.retry_after.map(|l| l.0).unwrap_or_default();
                let wait = schedule
                    .get(attempts)
                    .or(schedule.last())
                    .map(|d| d.secs() * 1000)
                    .unwrap_or(600_000);
                let jitter = (wait as f64
                    * self.ctl.settings.scheduler.retry_jitter
                    * fastrand::f64()) as u64;
                // Never retry past the expiry: the last attempt lands on it, and then bounces.
                let next = (now + wait + jitter).min(received.saturating_add(bounce_after));
                OutcomeKind::Transient {
                    next_attempt_ms: next,
                }
            }
        }
    }

    async fn report(&self, worker: &str, r: ReportRequest) -> Result<(), Status> {
        let now = now_ms();
        let policy = self.ctl.policy().policy.clone();
        let (queue, member) = {
            let mut active = self.active.lock().unwrap();
            match active.get_mut(&r.lease_id) {
                Some(a) => {
                    a.last_activity_ms = now;
                    a.sent += r.outcomes.len() as u32;
                    (a.queue.clone(), a.member.clone())
                }
                None => {
                    let st = self.ctl.sm.state.lock().unwrap();
                    match st.leases.get(&r.lease_id) {
                        Some(l) => (l.queue.clone(), String::new()),
                        None => (QueueKey::default(), String::new()),
                    }
                }
            }
        };
        let _ = worker;
        let mut follow_up: Vec<Command> = Vec::new();
        let mut outcomes = Vec::with_capacity(r.outcomes.len());
        for o in &r.outcomes {
            let Ok(msg) = u64::from_str_radix(&o.message_id, 16) else {
                continue;
            };
            let rec = self
                .ctl
                .sm
                .state
                .lock()
                .unwrap()
                .read_message(&self.ctl.sm.db, msg);
            let kind =
                self.outcome_kind(&policy, &queue, &member, rec.as_ref(), o.rcpt_index, o, now);
            if !o.pattern_action.is_empty() {
                follow_up.extend(self.pattern_action(&policy, &queue, &member, o, now));
            }
            if !matches!(kind, OutcomeKind::Delivered) {
                self.budgets
                    .lock()
                    .unwrap()
                    .last_error
                    .insert(queue.clone(), format!("{} {}", o.code, o.text));
            }
            outcomes.push(RecipientOutcome {
                msg,
                rcpt: o.rcpt_index,
                kind,
                code: o.code as u16,
                enhanced: o.enhanced.clone(),
                text: o.text.clone(),
                mx_host: o.mx_host.clone(),
                mx_ip: o.mx_ip.clone(),
                source_ip: o.source_ip.clone(),
                tls: if o.tls {
                    format!("{} {}", o.tls_version, o.tls_cipher)
                } else {
                    String::new()
                },
                esmtp: o.esmtp,
            });
        }
        if !outcomes.is_empty() {
            self.outcomes
                .record(outcomes)
                .await
                .map_err(Status::unavailable)?;
        }
        follow_up.dedup();
        for cmd in follow_up {
            self.ctl
                .raft
                .client_write(cmd)
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
        }
        if r.done {
            self.active.lock().unwrap().remove(&r.lease_id);
            self.ctl
                .raft
                .client_write(Command::Release {
                    now_ms: now,
                    lease_id: r.lease_id,
                })
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
        }
        Ok(())
    }

    /// Acts on the smtp-pattern-list actions a worker reported with an outcome. Queue-wide
    /// actions become Raft commands; backoff and disabled source IPs live in the leader.
    fn pattern_action(
        &self,
        policy: &Policy,
        queue: &QueueKey,
        member: &str,
        o: &Outcome,
        now: u64,
    ) -> Vec<Command> {
        let mut cmds = Vec::new();
        let arg = |name: &str| -> Option<u64> {
            o.pattern_action
                .split(',')
                .find_map(|a| a.strip_prefix(name).and_then(|v| v.parse::<u64>().ok()))
        };
        let rule = policy.domain_settings(&queue.dest, Some(member));
        for a in o.pattern_action.split(',') {
            match a {
                "mode=backoff" => {
                    let dur = arg("backoff-to-normal-after=")
                        .map(|s| s * 1000)
                        .or(rule.backoff_to_normal_after.map(|d| d.secs() * 1000))
                        .unwrap_or(3_600_000);
                    self.budgets
                        .lock()
                        .unwrap()
                        .backoff
                        .insert(queue.clone(), now + dur);
                    tracing::info!(queue = %queue, "queue in backoff mode");
                }
                "mode=normal" => {
                    self.budgets.lock().unwrap().backoff.remove(queue);
                }
                "disable-source-ip" => {
                    let until = now
                        + arg("reenable-after=")
                            .map(|s| s * 1000)
                            .unwrap_or(3_600_000);
                    if let Ok(ip) = o.source_ip.parse::<IpAddr>() {
                        tracing::warn!(%ip, "source IP disabled by a reply pattern");
                        self.budgets.lock().unwrap().disabled_ips.insert(ip, until);
                    }
                }
                "bounce-queue" => cmds.push(Command::BounceQueue {
                    now_ms: now,
                    queue: queue.clone(),
                    code: o.code as u16,
                    enhanced: o.enhanced.clone(),
                    text: o.text.clone(),
                    category: crate::bounce::classify(
                        Some(policy),
                        o.code as u16,
                        &o.enhanced,
                        &o.text,
                        o.after_data,
                    ),
                }),
                "defer-queue" => {
                    let wait = rule
                        .retry_after
                        .as_ref()
                        .and_then(|l| l.0.first())
                        .map(|d| d.secs() * 1000)
                        .unwrap_or(600_000);
                    cmds.push(Command::DeferQueue {
                        queue: queue.clone(),
                        until_ms: now + wait,
                    });
                }
                _ => {}
            }
        }
        cmds
    }

    /// Mode and budget figures for `sluice show queues`.
    pub fn queue_view(&self, key: &QueueKey, now: u64) -> (String, u32, u64, String) {
        let b = self.budgets.lock().unwrap();
        let mode = if b.backoff.get(key).is_some_and(|&u| u > now) {
            "backoff"
        } else {
            "normal"
        };
        let conns = self
            .active
            .lock()
            .unwrap()
            .values()
            .filter(|a| &a.queue == key)
            .count() as u32;
        let rate: u64 = b
            .msgs
            .iter()
            .filter(|((d, _), _)| *d == key.dest)
            .map(|(_, q)| q.iter().filter(|&&t| t + 3_600_000 > now).count() as u64)
            .sum();
        (
            mode.to_string(),
            conns,
            rate,
            b.last_error.get(key).cloned().unwrap_or_default(),
        )
    }
}

pub struct LeaseService {
    pub sched: Arc<Scheduler>,
}

#[tonic::async_trait]
impl Leases for LeaseService {
    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<Response<RegisterReply>, Status> {
        if let Some(st) = self.sched.ctl.not_leader() {
            return Err(st);
        }
        let r = req.into_inner();
        let ips: Vec<IpAddr> = r.source_ips.iter().filter_map(|s| s.parse().ok()).collect();
        tracing::info!(worker = %r.worker, ?ips, "worker registered");
        self.sched
            .ctl
            .peers
            .lock()
            .unwrap()
            .insert(format!("worker {}", r.worker), (r.policy_version, now_ms()));
        self.sched.workers.lock().unwrap().insert(
            r.worker,
            WorkerInfo {
                ips,
                last_seen_ms: now_ms(),
            },
        );
        Ok(Response::new(RegisterReply {
            lease_ttl_ms: self.sched.ctl.settings.scheduler.lease_ttl_ms,
        }))
    }

    async fn acquire(
        &self,
        req: Request<AcquireRequest>,
    ) -> Result<Response<AcquireReply>, Status> {
        if let Some(st) = self.sched.ctl.not_leader() {
            return Err(st);
        }
        let r = req.into_inner();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(r.wait_ms.min(10_000));
        let mut leases = Vec::new();
        loop {
            let ips = {
                let mut w = self.sched.workers.lock().unwrap();
                let Some(info) = w.get_mut(&r.worker) else {
                    return Err(Status::failed_precondition(
                        "unknown worker: register first",
                    ));
                };
                info.last_seen_ms = now_ms();
                info.ips.clone()
            };
            // Touch this worker's leases so that they do not expire while it is busy.
            {
                let now = now_ms();
                for a in self
                    .sched
                    .active
                    .lock()
                    .unwrap()
                    .values_mut()
                    .filter(|a| a.worker == r.worker)
                {
                    a.last_activity_ms = now;
                }
            }
            while leases.len() < r.free_slots as usize {
                match self.sched.grant(&r.worker, &ips).await? {
                    Some(l) => leases.push(l),
                    None => break,
                }
            }
            if !leases.is_empty() || tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Response::new(AcquireReply { leases }))
    }

    async fn more(&self, req: Request<MoreRequest>) -> Result<Response<MoreReply>, Status> {
        if let Some(st) = self.sched.ctl.not_leader() {
            return Err(st);
        }
        let r = req.into_inner();
        let now = now_ms();
        let policy = self.sched.ctl.policy().policy.clone();
        let Some((queue, member, ip)) =
            self.sched
                .active
                .lock()
                .unwrap()
                .get_mut(&r.lease_id)
                .map(|a| {
                    a.last_activity_ms = now;
                    (a.queue.clone(), a.member.clone(), a.ip)
                })
        else {
            return Ok(Response::new(MoreReply {
                messages: Vec::new(),
            }));
        };
        let parts = {
            let st = self.sched.ctl.sm.state.lock().unwrap();
            let mut budgets = self.sched.budgets.lock().unwrap();
            let backoff = budgets.backoff.get(&queue).is_some_and(|&u| u > now);
            let rule = effective(&policy, &queue.dest, &member, backoff);
            let entry = st.queue(&queue);
            if entry.is_none_or(|q| q.paused) {
                Vec::new()
            } else {
                let ready: Vec<(u64, u64, u16)> = entry
                    .map(|q| {
                        q.ready
                            .iter()
                            .take(r.max_messages.max(1) as usize)
                            .copied()
                            .collect()
                    })
                    .unwrap_or_default();
                self.sched.take_parts(
                    &mut budgets,
                    &queue,
                    &member,
                    ip,
                    &rule,
                    ready.into_iter(),
                    now,
                )
            }
        };
        if parts.is_empty() {
            return Ok(Response::new(MoreReply {
                messages: Vec::new(),
            }));
        }
        let cmd = Command::Lease {
            now_ms: now,
            lease_id: r.lease_id,
            worker: r.worker,
            expires_ms: now + self.sched.ctl.settings.scheduler.lease_ttl_ms,
            queue: queue.clone(),
            parts: parts.clone(),
        };
        match self.sched.ctl.raft.client_write(cmd).await {
            Ok(resp) if matches!(resp.data, CommandResult::Count(_)) => {}
            Ok(_) => {}
            Err(e) => return Err(Status::unavailable(e.to_string())),
        }
        Ok(Response::new(MoreReply {
            messages: self.sched.leased_messages(&parts, r.lease_id),
        }))
    }

    async fn report(&self, req: Request<ReportRequest>) -> Result<Response<ReportReply>, Status> {
        if let Some(st) = self.sched.ctl.not_leader() {
            return Err(st);
        }
        let r = req.into_inner();
        let worker = r.worker.clone();
        self.sched.report(&worker, r).await?;
        Ok(Response::new(ReportReply {}))
    }
}

#[cfg(test)]
mod due_tests {
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
