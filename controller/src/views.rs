//! What operators read, built from the queue state, the policy and the traffic counts:
//! `show vmtas`, `show workers`, `show jobs`, `inspect` and `trace`. Read-only.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use sluice_common::policy::Policy;
use sluice_proto::admin::*;

use crate::queue::acct_event::AcctEvent;
use crate::queue::read;
use crate::queue::state::{MsgRecord, QueueState, RcptState};
use crate::traffic::{By, Counts, Traffic};

fn state_name(s: RcptState) -> &'static str {
    match s {
        RcptState::Queued => "queued",
        RcptState::Delivered => "delivered",
        RcptState::Bounced => "bounced",
    }
}

/// Every VMTA of the policy: its IP and its state, what waits for it and what it sent in the
/// last hour.
pub fn vmtas(
    st: &QueueState,
    policy: &Policy,
    traffic: &Traffic,
    live_ips: &[IpAddr],
    leading: bool,
    now: u64,
) -> Vec<VmtaInfo> {
    let hour = traffic.last_hour(By::Vmta);
    let mut recipients: HashMap<&str, u64> = HashMap::new();
    for q in &st.index.queues {
        // A pool's queue waits for all its members; count it for each.
        for m in crate::sched::due::members(policy, &q.key.vmta) {
            if let Some(v) = policy.vmtas.get(&m) {
                *recipients.entry(v.name.as_str()).or_default() += q.recipients;
            }
        }
    }
    let mut connections: HashMap<&str, u32> = HashMap::new();
    for l in st.leases.values() {
        *connections.entry(l.member.as_str()).or_default() += 1;
    }
    policy
        .vmtas
        .values()
        .map(|v| {
            let disabled = v
                .source_ip
                .and_then(|ip| st.modes.disabled_ips.get(&ip).copied())
                .filter(|&until| until > now);
            let state = match (disabled, v.source_ip) {
                (Some(_), _) => "disabled",
                (None, Some(ip)) if leading && !live_ips.contains(&ip) => "no worker",
                _ => "enabled",
            };
            VmtaInfo {
                name: v.name.clone(),
                source_ip: v.source_ip.map(|ip| ip.to_string()).unwrap_or_default(),
                host_name: v.ehlo_name.clone().unwrap_or_default(),
                pools: policy
                    .pools
                    .values()
                    .filter(|p| p.members.contains(&v.name))
                    .map(|p| p.name.clone())
                    .collect(),
                state: state.into(),
                disabled_for_s: disabled
                    .filter(|&u| u != u64::MAX)
                    .map_or(0, |u| u.saturating_sub(now) / 1000),
                recipients: recipients.get(v.name.as_str()).copied().unwrap_or(0),
                connections: connections.get(v.name.as_str()).copied().unwrap_or(0),
                last_hour: Some(hour.get(&v.name).copied().unwrap_or_default().proto()),
            }
        })
        .collect()
}

/// Messages and queued recipients per job, read from a snapshot (call off the async threads).
pub fn job_queues(db: &rocksdb::DB) -> Result<BTreeMap<String, (u64, u64)>, String> {
    let mut jobs: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    read::each_message(db, |_, m| {
        let queued = m
            .rcpts
            .iter()
            .filter(|r| r.state == RcptState::Queued)
            .count() as u64;
        if queued > 0 {
            let j = jobs.entry(m.job_id).or_default();
            j.0 += 1;
            j.1 += queued;
        }
    })?;
    Ok(jobs)
}

/// Jobs with mail queued now or traffic in the last hour.
pub fn jobs(queued: BTreeMap<String, (u64, u64)>, traffic: &Traffic) -> Vec<JobInfo> {
    let mut jobs: BTreeMap<String, JobInfo> = queued
        .into_iter()
        .map(|(id, (messages, queued_recipients))| {
            (
                id,
                JobInfo {
                    messages,
                    queued_recipients,
                    ..Default::default()
                },
            )
        })
        .collect();
    for (job, c) in traffic.last_hour(By::Job) {
        jobs.entry(job).or_default().last_hour = Some(c.proto());
    }
    jobs.into_iter()
        .map(|(id, mut j)| {
            j.job_id = id;
            j.last_hour.get_or_insert_with(|| Counts::default().proto());
            j
        })
        .collect()
}

/// The most of a header section `inspect` returns (a message without one would be all header).
const MAX_INSPECT_HEADER: usize = 64 << 10;

/// One message as stored, with its header section.
pub fn inspect(id: u64, m: &MsgRecord, body: Option<&[u8]>, now: u64) -> InspectReply {
    let headers = body
        .map(|b| {
            let n = sluice_common::smtp::header::header_len(b).min(MAX_INSPECT_HEADER);
            String::from_utf8_lossy(&b[..n]).into_owned()
        })
        .unwrap_or_default();
    InspectReply {
        id,
        mail_from: m.mail_from.clone(),
        envid: m.envid.clone(),
        ret: m.ret.clone(),
        job_id: m.job_id.clone(),
        received_by: m.received_by.clone(),
        client_ip: m.client_ip.clone(),
        received_ms: m.received_ms,
        size: m.size,
        priority: m.priority as u32,
        recipients: m
            .rcpts
            .iter()
            .map(|r| {
                let q = m.queue_of(r);
                RecipientDetail {
                    address: r.address.clone(),
                    orcpt: r.orcpt.clone(),
                    state: state_name(r.state).into(),
                    attempts: r.attempts as u32,
                    next_attempt_in_s: if r.state == RcptState::Queued {
                        r.next_attempt_ms.saturating_sub(now) / 1000
                    } else {
                        0
                    },
                    last_error: r.last_error.clone(),
                    queue: format!("{}/{}", q.dest, q.vmta),
                    lease: r.lease,
                }
            })
            .collect(),
        headers,
    }
}

fn event_detail(ev: &AcctEvent) -> String {
    let mut parts = Vec::new();
    if !ev.queue.is_empty() {
        parts.push(format!("queue {}/{}", ev.queue, ev.vmta));
    }
    if !ev.source_ip.is_empty() {
        parts.push(format!("from {}", ev.source_ip));
    }
    if !ev.mx.is_empty() {
        parts.push(format!("to {} [{}]", ev.mx, ev.mx_ip));
    }
    if ev.code != 0 || !ev.diag.is_empty() {
        parts.push(
            format!("{} {} {}", ev.code, ev.enhanced, ev.diag)
                .trim()
                .to_string(),
        );
    }
    if !ev.category.is_empty() {
        parts.push(format!("category {}", ev.category));
    }
    if !ev.client_ip.is_empty() {
        parts.push(format!("client {}", ev.client_ip));
    }
    parts.join("; ")
}

/// Reads at most this many accounting rows for one trace.
pub const TRACE_SCAN_ROWS: usize = 2_000_000;

/// The accounting rows still held for a message or a recipient (each attempt is a `t` row
/// with the reply), oldest first, then each matching recipient's present state; and whether
/// older rows were left unread. Rows are read from the newest back, down to a queued
/// message's arrival.
pub fn trace(
    db: &rocksdb::DB,
    message_id: u64,
    recipient: &str,
    now: u64,
) -> Result<(Vec<TraceEvent>, bool), String> {
    let rcpt = recipient.to_ascii_lowercase();
    let wanted = |ev: &AcctEvent| {
        (message_id == 0 || ev.msg == message_id)
            && (rcpt.is_empty() || ev.rcpt.eq_ignore_ascii_case(&rcpt))
    };
    let event = |ev: &AcctEvent| TraceEvent {
        time_ms: ev.time_ms,
        message_id: ev.msg,
        recipient: ev.rcpt.clone(),
        kind: ev.kind.code().to_string(),
        detail: event_detail(ev),
    };
    let mut out = Vec::new();
    let record = match message_id {
        0 => None,
        id => read::message(db, id)?,
    };
    // A message's rows are never older than its arrival: the scan stops there.
    let oldest = record
        .as_ref()
        .map_or(0, |m| m.received_ms.saturating_sub(1000));
    let truncated = read::each_acct_newest(db, TRACE_SCAN_ROWS, |_, ev| {
        if wanted(&ev) {
            out.push(event(&ev));
        }
        oldest == 0 || ev.time_ms >= oldest
    })?;
    out.reverse();
    let mut ids: Vec<u64> = out.iter().map(|e| e.message_id).collect();
    if message_id != 0 {
        ids.push(message_id);
    }
    ids.sort_unstable();
    ids.dedup();
    for id in ids {
        let m = match (&record, id == message_id) {
            (Some(m), true) => m.clone(),
            _ => match read::message(db, id)? {
                Some(m) => m,
                None => continue,
            },
        };
        for r in m
            .rcpts
            .iter()
            .filter(|r| rcpt.is_empty() || r.address.eq_ignore_ascii_case(&rcpt))
        {
            let q = m.queue_of(r);
            let mut detail = format!("{} in {}/{}", state_name(r.state), q.dest, q.vmta);
            if r.state == RcptState::Queued {
                detail.push_str(&format!(
                    ", {} attempt(s), next in {} s",
                    r.attempts,
                    r.next_attempt_ms.saturating_sub(now) / 1000
                ));
                if r.lease != 0 {
                    detail.push_str(&format!(", leased ({})", r.lease));
                }
            }
            if !r.last_error.is_empty() {
                detail.push_str(&format!("; last error: {}", r.last_error));
            }
            out.push(TraceEvent {
                time_ms: now,
                message_id: id,
                recipient: r.address.clone(),
                kind: "now".into(),
                detail,
            });
        }
    }
    Ok((out, truncated))
}

/// Effective directives as the Admin API carries them.
pub fn directives(d: Vec<sluice_common::policy::explain::Effective>) -> Vec<Directive> {
    d.into_iter()
        .map(|e| Directive {
            name: e.name,
            value: e.value,
            source: e.source,
        })
        .collect()
}

/// `sluice explain` on a policy, for the Admin API and for `explain --policy FILE` alike; an
/// error is the request's fault.
pub fn explain(policy: &Policy, r: &ExplainRequest) -> Result<ExplainReply, String> {
    use sluice_common::policy::explain;
    if !r.rcpt.contains('@') {
        return Err(format!("`{}` is not an address", r.rcpt));
    }
    let source_ip = match r.source_ip.as_str() {
        "" => None,
        s => Some(
            s.parse()
                .map_err(|_| format!("`{s}` is not an IP address"))?,
        ),
    };
    let e = explain::explain(
        policy,
        &explain::Question {
            rcpt: r.rcpt.clone(),
            mail_from: r.mail_from.clone(),
            source_ip,
            vmta: r.vmta.clone(),
            headers: r.headers.clone(),
        },
    );
    Ok(ExplainReply {
        steps: e
            .steps
            .into_iter()
            .map(|s| ExplainStep {
                question: s.question,
                answer: s.answer,
                source: s.source,
            })
            .collect(),
        settings: directives(e.settings),
        mx_domain: e.mx_domain,
    })
}
