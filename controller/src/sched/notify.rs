//! Notices to senders (RFC 3461, 3464). Apply marks what each recipient is owed (a failure,
//! or a "relayed" notice); this leader loop builds the notice for each such message, and a
//! delay notice for mail queued past `delay-dsn-after` whose sender asked for one, and proposes
//! it together with the recipients it covers. The entry that enqueues a notice is the one that
//! marks it sent, so a notice survives a leader's loss and is never sent twice.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use sluice_common::dsn::{self, DsnInput, DsnKind, DsnRecipient, xtext_decode};
use sluice_common::policy::Policy;

use super::Scheduler;
use crate::clock::now_ms;
use crate::enqueue::header_values;
use crate::node::ServedPolicy;
use crate::queue::command::{Command, NewMessage, NewRecipient, Notice, QueueKey};
use crate::queue::state::{DSN_DELAY_SENT, DSN_OWE_FAILURE, DSN_OWE_RELAYED, MsgRecord, RcptState};

/// Messages looked at per round.
const BATCH: usize = 500;
/// When `delay-dsn-after` is not set and NOTIFY=DELAY was asked.
const DEFAULT_DELAY_MS: u64 = 4 * 3_600_000;

pub async fn notify_loop(s: Arc<Scheduler>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if s.ctl.leader_only().is_err() {
            continue;
        }
        let served = s.ctl.policy();
        let now = now_ms();
        let (owed, delayed) = candidates(&s, &served.policy, now);
        let work: Vec<(u64, &'static [DsnKind])> = owed
            .iter()
            .map(|&id| (id, &[DsnKind::Failure, DsnKind::Relayed][..]))
            .chain(delayed.iter().map(|&id| (id, &[DsnKind::Delay][..])))
            .collect();
        // Built and proposed an entry at a time, so that notices holding whole messages
        // never pile up in memory.
        let max_entry = s.ctl.settings.raft.max_entry_bytes as usize;
        let mut next = 0;
        while next < work.len() {
            let ctl = s.ctl.clone();
            let served = served.clone();
            let chunk_start = next;
            let work_c = work.clone();
            let built = tokio::task::spawn_blocking(move || {
                let max_message = ctl.settings.raft.max_message_bytes;
                let host = reporting_mta(&served.policy);
                let mut notices = Vec::new();
                let mut bytes = 0;
                let mut i = chunk_start;
                while i < work_c.len() {
                    let (id, kinds) = work_c[i];
                    let (rec, body) = match (
                        crate::queue::read::message(&ctl.db, id),
                        crate::queue::read::body(&ctl.db, &ctl.state, id),
                    ) {
                        (Ok(Some(r)), Ok(b)) => (r, b.unwrap_or_default()),
                        (Ok(None), _) => {
                            i += 1;
                            continue;
                        }
                        (Err(e), _) | (_, Err(e)) => {
                            tracing::warn!("notices: {e}");
                            i += 1;
                            continue;
                        }
                    };
                    let mine: Vec<Notice> = kinds
                        .iter()
                        .filter_map(|&kind| {
                            notice(&served, &host, max_message, id, &rec, &body, kind, now)
                        })
                        .collect();
                    let w: usize = mine.iter().map(weight).sum();
                    // This message's notices go in the next entry if they would make this one
                    // too large; one alone always goes, as a large message does in an enqueue.
                    if !notices.is_empty() && bytes + w > max_entry {
                        break;
                    }
                    i += 1;
                    for n in mine {
                        if !notices.is_empty() && bytes + weight(&n) > max_entry {
                            // A failure and a relayed notice too large together: the second
                            // is built again next round.
                            break;
                        }
                        bytes += weight(&n);
                        notices.push(n);
                    }
                }
                (notices, i)
            })
            .await;
            let Ok((notices, upto)) = built else {
                break;
            };
            next = upto;
            if notices.is_empty() {
                continue;
            }
            let n = notices.len();
            if let Err(e) = s
                .ctl
                .raft
                .client_write(Command::Notify {
                    now_ms: now,
                    notices,
                })
                .await
            {
                tracing::warn!(notices = n, "could not record notices to senders: {e}");
                break;
            }
        }
    }
}

/// What a notice weighs in an entry.
fn weight(n: &Notice) -> usize {
    n.dsn.as_ref().map_or(64, |m| m.body.len() + 1024)
}

/// Messages that owe a notice, and messages with a delay notice due (id order, at most
/// `BATCH` each).
fn candidates(s: &Scheduler, policy: &Policy, now: u64) -> (Vec<u64>, Vec<u64>) {
    let st = s.ctl.state.lock().unwrap();
    let owed: Vec<u64> = st.index.dsn_owed.iter().take(BATCH).copied().collect();
    let mut delayed = Vec::new();
    let mut delays: Vec<Option<u64>> = vec![None; st.index.queues.len()];
    for id in &st.index.delay_wanted {
        let Some(m) = st.index.msgs.get(id) else {
            continue;
        };
        if delayed.len() >= BATCH || m.received_ms > now {
            break;
        }
        let due = m.queued_queue_ids().any(|qid| {
            let d = *delays[qid as usize].get_or_insert_with(|| {
                let q = &st.index.queues[qid as usize].key;
                delay_after(policy, q)
            });
            m.received_ms.saturating_add(d) <= now
        });
        if due {
            delayed.push(*id);
        }
    }
    (owed, delayed)
}

fn delay_after(policy: &Policy, q: &QueueKey) -> u64 {
    policy
        .domain_settings(&q.dest, Some(&q.vmta))
        .delay_dsn_after
        .map(|d| d.secs() * 1000)
        .unwrap_or(DEFAULT_DELAY_MS)
}

fn reporting_mta(policy: &Policy) -> String {
    policy
        .global
        .host_name
        .clone()
        .unwrap_or_else(|| "localhost".into())
}

/// The notice of one kind a message owes, if any: which recipients it covers, and the message
/// to send (None when the policy or the message says no notice goes out).
#[allow(clippy::too_many_arguments)]
fn notice(
    served: &ServedPolicy,
    host: &str,
    max_message: u64,
    id: u64,
    rec: &MsgRecord,
    body: &[u8],
    kind: DsnKind,
    now: u64,
) -> Option<Notice> {
    let policy = &served.policy;
    let mut rcpts = Vec::new();
    let mut told = Vec::new();
    for (i, r) in rec.rcpts.iter().enumerate() {
        let due = match kind {
            DsnKind::Failure => r.dsn & DSN_OWE_FAILURE != 0,
            DsnKind::Relayed => r.dsn & DSN_OWE_RELAYED != 0,
            DsnKind::Delay => {
                r.state == RcptState::Queued
                    && r.dsn & DSN_DELAY_SENT == 0
                    && dsn::wants(r.notify, DsnKind::Delay)
                    && rec
                        .received_ms
                        .saturating_add(delay_after(policy, &rec.queue_of(r)))
                        <= now
            }
        };
        if !due {
            continue;
        }
        rcpts.push(i as u32);
        let (code, diagnostic) = match kind {
            DsnKind::Relayed => (250, "delivered to a receiver without DSN".to_string()),
            _ => split_reply(&r.last_error),
        };
        let bounce_after = policy
            .domain_settings(&rec.queue_of(r).dest, Some(&rec.queue_of(r).vmta))
            .bounce_after
            .map(|d| rec.received_ms.saturating_add(d.secs() * 1000))
            .unwrap_or(0);
        told.push(DsnRecipient {
            address: r.address.clone(),
            orcpt: xtext_decode(&r.orcpt),
            status: match kind {
                DsnKind::Relayed => "2.0.0".into(),
                DsnKind::Delay if r.last_status.is_empty() => "4.0.0".into(),
                _ => r.last_status.clone(),
            },
            code,
            diagnostic,
            remote_mta: r.last_mx.clone(),
            last_attempt_ms: r.last_attempt_ms,
            retry_until_ms: bounce_after,
        });
    }
    if rcpts.is_empty() {
        return None;
    }
    let dsn = sendable(policy, rec, body).then(|| {
        let full = !rec.ret.eq_ignore_ascii_case("HDRS") && (body.len() as u64) < max_message / 2;
        let from = policy
            .global
            .postmaster
            .clone()
            .unwrap_or_else(|| format!("postmaster@{host}"));
        let envid = xtext_decode(&rec.envid);
        let message = dsn::build(&DsnInput {
            kind,
            reporting_mta: host,
            from: &from,
            to: &rec.mail_from,
            envid: &envid,
            arrival_ms: rec.received_ms,
            now_ms: now,
            unique: id,
            recipients: &told,
            original: body,
            full,
        });
        let domain = rec.mail_from.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
        NewMessage {
            token: 0,
            mail_from: String::new(),
            recipients: vec![NewRecipient {
                address: rec.mail_from.clone(),
                orcpt: String::new(),
                notify: 0,
                queue: 0,
                suppressed: None,
            }],
            queues: vec![QueueKey {
                dest: policy.queue_name(&domain.to_ascii_lowercase()),
                vmta: rec
                    .queues
                    .first()
                    .map(|q| q.vmta.clone())
                    .unwrap_or_default(),
            }],
            envid: String::new(),
            ret: String::new(),
            job_id: String::new(),
            received_by: host.to_string(),
            client_ip: String::new(),
            priority: rec.priority,
            verp: false,
            acct_headers: header_values(&message, &served.acct_headers),
            body: message.into(),
        }
    });
    Some(Notice {
        msg: id,
        kind,
        rcpts,
        dsn,
    })
}

/// Whether a notice goes out: never to a null sender or for a notice, and not where the policy
/// says `deliver-local-dsn no` (at top level for the whole cluster, for the sender's domain, or
/// for the source the mail came from).
fn sendable(policy: &Policy, rec: &MsgRecord, body: &[u8]) -> bool {
    let Some((_, domain)) = rec.mail_from.rsplit_once('@') else {
        return false;
    };
    if domain.is_empty() || dsn::is_dsn(body) || policy.global.deliver_local_dsn == Some(false) {
        return false;
    }
    let vmta = rec.queues.first().map(|q| q.vmta.as_str());
    let dest = policy.queue_name(&domain.to_ascii_lowercase());
    if policy.domain_settings(&dest, vmta).deliver_local_dsn == Some(false) {
        return false;
    }
    if let Ok(ip) = rec.client_ip.parse::<IpAddr>()
        && policy.source_for_ip(ip).deliver_local_dsn == Some(false)
    {
        return false;
    }
    true
}

/// "550 5.1.1 text" as stored in `last_error`: (550, "5.1.1 text").
fn split_reply(last: &str) -> (u16, String) {
    match last.split_once(' ') {
        Some((c, rest)) => match c.parse() {
            Ok(code) => (code, rest.to_string()),
            Err(_) => (0, last.to_string()),
        },
        None => (last.parse().unwrap_or(0), String::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xtext_and_stored_replies() {
        assert_eq!(xtext_decode("rfc822;a+2Bb@x.test"), "rfc822;a+b@x.test");
        assert_eq!(xtext_decode("a+"), "a+");
        assert_eq!(xtext_decode("é+4"), "é+4");
        assert_eq!(
            split_reply("550 5.1.1 no such user"),
            (550, "5.1.1 no such user".into())
        );
    }
}
