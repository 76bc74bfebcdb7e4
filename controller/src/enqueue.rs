//! The queue API for ingress nodes: enqueue and the policy fetch. Concurrent enqueues are
//! grouped into one Raft entry (group commit) bounded by bytes, and a caller is answered only
//! once that entry is committed on a majority and applied.

use std::sync::Arc;
use std::time::Duration;

use crate::auth;
use sluice_common::group_commit::GroupCommit;
use sluice_proto::queue::queue_server::Queue;
use sluice_proto::queue::{
    EnqueueReply, EnqueueRequest, PolicyReply, PolicyRequest, ReportReply, ReportRequest,
    SuppressionsReply, SuppressionsRequest,
};
use sluice_proto::tls::Role;
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

use crate::clock::now_ms;
use crate::node::Controller;
use crate::queue::command::{
    Command, CommandResult, NewMessage, NewRecipient, QueueKey, SuppressChange,
};
use crate::queue::read;
use crate::raft::Raft;
use crate::suppress;

type Reply = oneshot::Sender<Result<Vec<u64>, Status>>;

/// What a message weighs in an entry besides its body (envelope, ids, encoding).
const MESSAGE_OVERHEAD: usize = 1024;

fn weight(messages: &[NewMessage]) -> usize {
    messages
        .iter()
        .map(|m| m.body.len() + MESSAGE_OVERHEAD + m.recipients.len() * 64)
        .sum()
}

/// Enqueue requests grouped into Raft entries of at most `max_entry_bytes` (a single message
/// larger than that goes alone in its own entry).
#[derive(Clone)]
pub struct Batcher {
    group: GroupCommit<Vec<NewMessage>, Result<Vec<u64>, Status>>,
}

impl Batcher {
    pub fn start(
        raft: Raft,
        max_entry_bytes: usize,
        timeout: Duration,
        quorum_window: Duration,
    ) -> Batcher {
        let group = GroupCommit::start(
            max_entry_bytes,
            |m: &Vec<NewMessage>| weight(m),
            move |group| commit_group(raft.clone(), group, timeout, quorum_window),
        );
        Batcher { group }
    }

    pub async fn enqueue(&self, messages: Vec<NewMessage>) -> Result<Vec<u64>, Status> {
        self.group
            .submit(messages)
            .await
            .unwrap_or_else(|| Err(Status::unavailable("the controller is shutting down")))
    }
}

/// Whether a majority answered the leader recently. Without one, a proposal could sit in the
/// leader's log and commit much later, after the client was told it failed; so nothing is
/// proposed then.
fn quorum_recent(raft: &Raft, window: Duration) -> bool {
    let m = raft.metrics().borrow().clone();
    m.millis_since_quorum_ack
        .is_some_and(|ms| ms <= window.as_millis() as u64)
}

async fn commit_group(
    raft: Raft,
    group: Vec<(Vec<NewMessage>, Reply)>,
    timeout: Duration,
    quorum_window: Duration,
) {
    let sizes: Vec<usize> = group.iter().map(|(m, _)| m.len()).collect();
    let mut messages = Vec::with_capacity(sizes.iter().sum());
    let mut replies = Vec::with_capacity(group.len());
    for (m, r) in group {
        messages.extend(m);
        replies.push(r);
    }
    if !quorum_recent(&raft, quorum_window) {
        for r in replies {
            let _ = r.send(Err(sluice_proto::no_quorum()));
        }
        return;
    }
    let m = &crate::metrics::METRICS;
    m.entry_messages.observe(messages.len() as f64);
    m.entry_bytes
        .observe(messages.iter().map(|x| x.body.len()).sum::<usize>() as f64);
    let cmd = Command::Enqueue {
        now_ms: now_ms(),
        messages,
    };
    let res = tokio::time::timeout(timeout, raft.client_write(cmd)).await;
    let outcome: Result<Vec<u64>, Status> = match res {
        Ok(Ok(resp)) => match resp.data {
            CommandResult::Enqueued { ids } => Ok(ids),
            other => Err(Status::internal(format!(
                "unexpected apply result {other:?}"
            ))),
        },
        Ok(Err(e)) => Err(Status::unavailable(format!("not committed: {e}"))),
        // The entry may still commit later. The ingress retries with the same tokens, and
        // the copy that commits second gets the first one's id instead of being queued again.
        Err(_) => Err(Status::deadline_exceeded(
            "no majority committed the messages in time",
        )),
    };
    let mut offset = 0;
    for (reply, n) in replies.into_iter().zip(sizes) {
        let part = outcome
            .as_ref()
            .map(|ids| ids[offset..offset + n].to_vec())
            .map_err(Clone::clone);
        offset += n;
        let _ = reply.send(part);
    }
}

/// The values of the named headers (lower-cased names) in a message's header section,
/// unfolded and trimmed. The first occurrence of each counts.
pub fn header_values(body: &[u8], names: &[String]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    if names.is_empty() {
        return out;
    }
    let mut current: Option<(String, String)> = None;
    let keep = |cur: Option<(String, String)>, out: &mut Vec<(String, String)>| {
        if let Some((n, v)) = cur
            && names.contains(&n)
            && !out.iter().any(|(x, _)| *x == n)
        {
            out.push((n, v.trim().to_string()));
        }
    };
    for line in body.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        let text = String::from_utf8_lossy(line);
        if line[0] == b' ' || line[0] == b'\t' {
            if let Some((_, v)) = current.as_mut() {
                v.push(' ');
                v.push_str(text.trim());
            }
            continue;
        }
        keep(current.take(), &mut out);
        current = text
            .split_once(':')
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.to_string()));
    }
    keep(current, &mut out);
    out
}

/// A report's idempotency token: SHA-256 of what it says, so that a client's retry of the
/// same report (after a 451) is recorded once, whichever ingress and leader it reaches. The
/// top bit is set, so that it never equals an enqueue token, whose top bit ingress clears.
fn report_token(r: &ReportRequest) -> u128 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for part in [r.kind.as_bytes(), r.mail_from.as_bytes()] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    for a in &r.recipients {
        h.update((a.len() as u64).to_be_bytes());
        h.update(a.as_bytes());
    }
    h.update(&r.body);
    let d = h.finalize();
    u128::from_be_bytes(d[..16].try_into().expect("16 bytes")) | (1 << 127)
}

pub struct QueueService {
    pub ctl: Arc<Controller>,
    pub batcher: Batcher,
}

fn token(raw: &[u8]) -> Result<u128, Status> {
    match raw.len() {
        0 => Ok(0),
        16 => Ok(u128::from_be_bytes(raw.try_into().expect("16 bytes"))),
        n => Err(Status::invalid_argument(format!(
            "an idempotency token has 16 bytes, not {n}"
        ))),
    }
}

#[tonic::async_trait]
impl Queue for QueueService {
    async fn enqueue(
        &self,
        req: Request<EnqueueRequest>,
    ) -> Result<Response<EnqueueReply>, Status> {
        self.ctl.gate.check(&req, "Enqueue", auth::INGRESS)?;
        self.ctl.leader_only()?;
        let policy = self.ctl.policy();
        let max_message = self.ctl.settings.raft.max_message_bytes;
        let req = req.into_inner();
        let bytes: u64 = req.messages.iter().map(|m| m.body.len() as u64).sum();
        self.ctl.disk.admit(bytes)?;
        let mut messages = Vec::with_capacity(req.messages.len());
        // The list is read only when it ever held an entry.
        let suppressing = self.ctl.state.lock().unwrap().suppress_seq > 0;
        let now = now_ms();
        for m in req.messages {
            let scopes = crate::suppress::scopes(&m.vmta, &m.job_id);
            if m.recipients.is_empty() {
                return Err(Status::invalid_argument(
                    "a message needs at least one recipient",
                ));
            }
            if m.body.len() as u64 > max_message {
                return Err(Status::invalid_argument(format!(
                    "a message of {} bytes is larger than the {max_message} this controller takes \
                     (raft.max_message_bytes)",
                    m.body.len()
                )));
            }
            let mut queues: Vec<QueueKey> = Vec::new();
            let mut recipients = Vec::with_capacity(m.recipients.len());
            for r in m.recipients {
                let domain = r
                    .address
                    .rsplit_once('@')
                    .map(|(_, d)| d)
                    .unwrap_or("")
                    .to_ascii_lowercase();
                if domain.is_empty() {
                    return Err(Status::invalid_argument(format!(
                        "recipient `{}` has no domain",
                        r.address
                    )));
                }
                let key = QueueKey {
                    dest: policy.policy.queue_name(&domain),
                    vmta: m.vmta.clone(),
                };
                let qi = match queues.iter().position(|q| *q == key) {
                    Some(i) => i,
                    None => {
                        queues.push(key);
                        queues.len() - 1
                    }
                };
                let suppressed = if suppressing {
                    crate::suppress::check(&self.ctl.db, &r.address, &scopes, now)
                        .map_err(|e| Status::internal(format!("the suppression list: {e}")))?
                } else {
                    None
                };
                recipients.push(NewRecipient {
                    address: r.address,
                    orcpt: r.orcpt,
                    notify: r.notify.min(15) as u8,
                    queue: qi as u32,
                    suppressed,
                });
            }
            messages.push(NewMessage {
                token: token(&m.token)?,
                mail_from: m.mail_from,
                recipients,
                queues,
                envid: m.envid,
                ret: m.ret,
                job_id: m.job_id,
                received_by: m.received_by,
                client_ip: m.client_ip,
                priority: m.priority.min(100) as u8,
                verp: m.verp,
                acct_headers: header_values(&m.body, &policy.acct_headers),
                body: m.body,
            });
        }
        // A request larger than an entry goes as several, committed concurrently. If one part
        // fails, the caller retries the request; the parts already committed keep their ids
        // (the tokens see to it).
        let max = self.ctl.settings.raft.max_entry_bytes as usize;
        let mut parts: Vec<Vec<NewMessage>> = Vec::new();
        let mut size = 0;
        for m in messages {
            let w = weight(std::slice::from_ref(&m));
            match parts.last_mut() {
                Some(p) if size + w <= max => {
                    size += w;
                    p.push(m);
                }
                _ => {
                    size = w;
                    parts.push(vec![m]);
                }
            }
        }
        let results =
            futures::future::join_all(parts.into_iter().map(|p| self.batcher.enqueue(p))).await;
        let mut ids = Vec::new();
        for r in results {
            ids.extend(r?);
        }
        Ok(Response::new(EnqueueReply { ids }))
    }

    async fn suppressions(
        &self,
        req: Request<SuppressionsRequest>,
    ) -> Result<Response<SuppressionsReply>, Status> {
        self.ctl.gate.check(&req, "Suppressions", auth::INGRESS)?;
        let r = req.into_inner();
        let db = self.ctl.db.clone();
        let seq = self.ctl.state.lock().unwrap().suppress_seq;
        let reply = tokio::task::spawn_blocking(move || {
            if r.full {
                let (page, next) = read::suppress_page(&db, &r.start_key, suppress::PAGE)?;
                return Ok::<_, String>(SuppressionsReply {
                    changes: page
                        .into_iter()
                        .map(|e| suppress::change_to_proto(0, SuppressChange::Added(e)))
                        .collect(),
                    reload: false,
                    seq,
                    next_key: next.into(),
                });
            }
            // A reader ahead of this list (the cluster was restored from older data, or
            // started again from empty folders) or too far behind it loads the whole list.
            let changes = if r.after > seq {
                None
            } else {
                read::suppress_changes(&db, r.after, suppress::PAGE)?
            };
            Ok(match changes {
                None => SuppressionsReply {
                    reload: true,
                    seq,
                    ..Default::default()
                },
                Some(changes) => SuppressionsReply {
                    seq: changes.last().map_or(r.after, |c| c.0),
                    changes: changes
                        .into_iter()
                        .map(|(s, c)| suppress::change_to_proto(s, c))
                        .collect(),
                    reload: false,
                    next_key: Default::default(),
                },
            })
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::internal(format!("the suppression list: {e}")))?;
        Ok(Response::new(reply))
    }

    async fn report(&self, req: Request<ReportRequest>) -> Result<Response<ReportReply>, Status> {
        self.ctl.gate.check(&req, "Report", auth::INGRESS)?;
        self.ctl.leader_only()?;
        let r = req.into_inner();
        if r.kind != "bounce" && r.kind != "feedback" {
            return Err(Status::invalid_argument(format!(
                "a report is `bounce` or `feedback`, not `{}`",
                r.kind
            )));
        }
        let max_message = self.ctl.settings.raft.max_message_bytes;
        if r.body.len() as u64 > max_message {
            return Err(Status::invalid_argument(format!(
                "a report of {} bytes is larger than the {max_message} this controller takes",
                r.body.len()
            )));
        }
        let token = report_token(&r);
        let policy = self.ctl.policy();
        let now = now_ms();
        let ctl = self.ctl.clone();
        // Parsing is CPU work on untrusted text: off the async threads.
        let records = tokio::task::spawn_blocking(move || {
            let incoming = crate::reports::Incoming {
                kind: &r.kind,
                mail_from: &r.mail_from,
                recipients: &r.recipients,
                client_ip: &r.client_ip,
                received_by: &r.received_by,
                body: &r.body,
            };
            crate::reports::records(&policy.policy, &policy.acct_headers, now, &incoming)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        let Some(records) = records else {
            return Ok(Response::new(ReportReply {
                recognized: false,
                rows: 0,
            }));
        };
        let rows = records.events.len() as u32;
        let cmd = Command::Inbound {
            now_ms: now,
            token,
            events: records.events,
            suppress: records.suppress,
        };
        let timeout = Duration::from_millis(self.ctl.settings.raft.commit_timeout_ms);
        match tokio::time::timeout(timeout, ctl.raft.client_write(cmd)).await {
            Ok(Ok(_)) => Ok(Response::new(ReportReply {
                recognized: true,
                rows,
            })),
            Ok(Err(e)) => Err(Status::unavailable(format!("not committed: {e}"))),
            Err(_) => Err(Status::deadline_exceeded(
                "no majority committed the report in time",
            )),
        }
    }

    async fn get_policy(
        &self,
        req: Request<PolicyRequest>,
    ) -> Result<Response<PolicyReply>, Status> {
        // The leader answers, so that it knows every node's version; without a leader any
        // controller does.
        if let Err(st) = self.ctl.leader_only()
            && sluice_proto::leader_hint(&st).is_some()
        {
            return Err(st);
        }
        let id = self.ctl.gate.check(&req, "GetPolicy", auth::NODE)?;
        let p = self.ctl.policy();
        let r = req.get_ref();
        let role = match &id {
            Some(id) => id.role,
            None => match r.role.as_str() {
                "ingress" => Role::Ingress,
                "worker" => Role::Worker,
                other => {
                    return Err(Status::invalid_argument(format!(
                        "a policy request names the role `ingress` or `worker`, not `{other}`"
                    )));
                }
            },
        };
        let mut ips = Vec::new();
        for s in &r.source_ips {
            ips.push(s.parse::<std::net::IpAddr>().map_err(|_| {
                Status::invalid_argument(format!("source IP `{s}` is not an IP address"))
            })?);
        }
        if let Some(id) = &id
            && id.role == Role::Worker
            && let Some(ip) = ips.iter().find(|ip| !id.ips.contains(ip))
        {
            return Err(Status::permission_denied(format!(
                "worker `{}` asked for the keys of {ip}, which its certificate does not name",
                id.name
            )));
        }
        if !r.node.is_empty() {
            self.ctl.note_peer(&r.node, r.have_version);
        }
        let json = if r.have_version == p.version {
            String::new()
        } else if role == Role::Ingress {
            p.ingress_json.clone()
        } else {
            serde_json::to_string(&p.policy.for_worker(&ips))
                .map_err(|e| Status::internal(e.to_string()))?
        };
        Ok(Response::new(PolicyReply {
            version: p.version,
            policy_json: json,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::header_values;

    #[test]
    fn header_values_unfold_and_stop_at_the_body() {
        let body = b"From: a@example.com\r\nSubject: one\r\n two\r\nX-Campaign: c-7\r\nx-campaign: later\r\n\r\nSubject: not a header\r\n";
        let names = vec![
            "subject".to_string(),
            "x-campaign".into(),
            "x-missing".into(),
        ];
        assert_eq!(
            header_values(body, &names),
            vec![
                ("subject".to_string(), "one two".to_string()),
                ("x-campaign".to_string(), "c-7".to_string()),
            ]
        );
        assert!(header_values(body, &[]).is_empty());
    }
}
