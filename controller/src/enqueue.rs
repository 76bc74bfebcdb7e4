//! The enqueue API. Concurrent requests are grouped into one Raft entry (group commit), and a
//! caller is answered only once that entry is committed on a majority and applied.

use std::sync::Arc;
use std::time::Duration;

use sluice_proto::queue::queue_server::Queue;
use sluice_proto::queue::{EnqueueReply, EnqueueRequest, PolicyReply, PolicyRequest};
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

use crate::group_commit::GroupCommit;
use crate::node::{Controller, now_ms};
use crate::queue::command::{Command, CommandResult, NewMessage, NewRecipient, QueueKey};
use crate::raft::Raft;

type Reply = oneshot::Sender<Result<Vec<u64>, Status>>;

/// Enqueue requests grouped into Raft entries.
#[derive(Clone)]
pub struct Batcher {
    group: GroupCommit<Vec<NewMessage>, Result<Vec<u64>, Status>>,
}

impl Batcher {
    pub fn start(
        raft: Raft,
        max_batch: usize,
        timeout: Duration,
        quorum_window: Duration,
    ) -> Batcher {
        let group = GroupCommit::start(max_batch, Vec::len, move |group| {
            commit_group(raft.clone(), group, timeout, quorum_window)
        });
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
            let _ = r.send(Err(Status::unavailable(
                "no majority of controllers is reachable; nothing was queued",
            )));
        }
        return;
    }
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
        // The entry may still commit later; the client was told it did not, so it will retry
        // and the message may be queued twice. It is never acknowledged and lost.
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

pub struct QueueService {
    pub ctl: Arc<Controller>,
}

/// Formats a message id for SMTP replies and accounting.
pub fn format_id(id: u64) -> String {
    format!("{id:016x}")
}

#[tonic::async_trait]
impl Queue for QueueService {
    async fn enqueue(
        &self,
        req: Request<EnqueueRequest>,
    ) -> Result<Response<EnqueueReply>, Status> {
        if let Some(st) = self.ctl.not_leader() {
            return Err(st);
        }
        let policy = self.ctl.policy();
        let mut messages = Vec::new();
        for m in req.into_inner().messages {
            if m.recipients.is_empty() {
                return Err(Status::invalid_argument(
                    "a message needs at least one recipient",
                ));
            }
            let mut queues: Vec<QueueKey> = Vec::new();
            let mut recipients = Vec::new();
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
                recipients.push(NewRecipient {
                    address: r.address,
                    orcpt: r.orcpt,
                    notify: r.notify as u8,
                    queue: qi as u16,
                });
            }
            messages.push(NewMessage {
                mail_from: m.mail_from,
                recipients,
                queues,
                envid: m.envid,
                ret: m.ret,
                job_id: m.job_id,
                received_by: m.received_by,
                client_ip: m.client_ip,
                priority: m.priority.min(100) as u8,
                acct_headers: header_values(&m.body, &policy.acct_headers),
                body: m.body.to_vec(),
            });
        }
        let ids = self.ctl.batcher.enqueue(messages).await?;
        Ok(Response::new(EnqueueReply {
            ids: ids.into_iter().map(format_id).collect(),
        }))
    }

    async fn get_policy(
        &self,
        req: Request<PolicyRequest>,
    ) -> Result<Response<PolicyReply>, Status> {
        // The leader answers, so that it knows every node's version; without a leader any
        // controller does.
        if let Some(st) = self.ctl.not_leader()
            && sluice_proto::leader_hint(&st).is_some()
        {
            return Err(st);
        }
        let p = self.ctl.policy();
        if !req.get_ref().node.is_empty() {
            self.ctl.peers.lock().unwrap().insert(
                req.get_ref().node.clone(),
                (req.get_ref().have_version, crate::node::now_ms()),
            );
        }
        let json = if req.get_ref().have_version == p.version {
            String::new()
        } else {
            p.json.clone()
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
