//! Operator commands over gRPC: membership, status, queues. Changes go through Raft.

use std::sync::Arc;

use crate::auth;
use openraft::{BasicNode, ChangeMembers};
use sluice_proto::admin::admin_server::Admin;
use sluice_proto::admin::*;
use sluice_proto::tls::Role;
use tonic::{Request, Response, Status};

use crate::clock::now_ms;
use crate::node::Controller;
use crate::queue::command::{Command, CommandResult};
use crate::queue::read;
use crate::queue::state::RcptState;
use crate::sched::Scheduler;

pub struct AdminService {
    pub ctl: Arc<Controller>,
    pub sched: Arc<Scheduler>,
}

/// The largest queues (at most `MAX_WORKERLESS`) holding mail that no live worker can send:
/// none owns a source IP of any member of their VMTA. A member without its own source IP can
/// go from any worker.
fn workerless(
    st: &crate::queue::state::QueueState,
    policy: &sluice_common::policy::Policy,
    live: &[std::net::IpAddr],
) -> Vec<WorkerlessQueue> {
    let mut out: Vec<WorkerlessQueue> = st
        .index
        .queues
        .iter()
        .filter(|q| q.recipients > 0 && !q.paused)
        .filter_map(|q| {
            let members = crate::sched::due::members(policy, &q.key.vmta);
            let servable = members.iter().any(|m| {
                crate::sched::due::source_ip(policy, m, live).is_some_and(|ip| ip.is_some())
            });
            (!servable).then(|| WorkerlessQueue {
                queue: q.key.dest.clone(),
                vmta: q.key.vmta.clone(),
                recipients: q.recipients,
                source_ips: members
                    .iter()
                    .filter_map(|m| policy.vmtas.get(m).and_then(|v| v.source_ip))
                    .map(|ip| ip.to_string())
                    .collect(),
            })
        })
        .collect();
    out.sort_by_key(|w| std::cmp::Reverse(w.recipients));
    out.truncate(MAX_WORKERLESS);
    out
}

const MAX_WORKERLESS: usize = 20;

static TRACE_SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

/// The longest an operator may put a queue in backoff or a source IP out of use for.
const MAX_FOR_SECS: u64 = 366 * 86_400;

/// Runs a RocksDB scan on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(Status::internal)
}

impl AdminService {
    async fn write(&self, cmd: Command) -> Result<u64, Status> {
        self.ctl.leader_only()?;
        match self.ctl.raft.client_write(cmd).await {
            Ok(r) => Ok(match r.data {
                CommandResult::Count(n) => n,
                _ => 0,
            }),
            Err(e) => Err(Status::unavailable(e.to_string())),
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    type AccountingStream = tokio_stream::wrappers::ReceiverStream<Result<AcctRow, Status>>;

    /// Served from this node's replica: every replica holds the same rows under the same seq.
    async fn accounting(
        &self,
        req: Request<AcctStreamRequest>,
    ) -> Result<Response<Self::AccountingStream>, Status> {
        self.ctl.gate.check(&req, "Accounting", auth::READER)?;
        let r = req.into_inner();
        let cols: Vec<String> = if r.fields.is_empty() {
            sluice_common::acct::DEFAULT_FIELDS
                .iter()
                .map(|s| s.to_string())
                .collect()
        } else {
            r.fields
        };
        if let Some(bad) = cols.iter().find(|c| {
            !c.starts_with("header_") && !sluice_common::acct::all_fields().any(|f| f == *c)
        }) {
            return Err(Status::invalid_argument(format!(
                "unknown accounting field `{bad}`"
            )));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let db = self.ctl.db.clone();
        let zone = self.ctl.acct_zone;
        let records = r.records;
        tokio::spawn(async move {
            let mut after = r.after_seq;
            loop {
                let (db2, cols2, rec2) = (db.clone(), cols.clone(), records.clone());
                let res = tokio::task::spawn_blocking(move || {
                    crate::acct::stream_rows(&db2, after, &cols2, &rec2, 2000, &zone)
                })
                .await;
                let (rows, last) = match res {
                    Ok(Ok(x)) => x,
                    Ok(Err(e)) => {
                        let _ = tx.send(Err(Status::internal(e))).await;
                        return;
                    }
                    Err(_) => return,
                };
                for row in rows {
                    if tx.send(Ok(row)).await.is_err() {
                        return;
                    }
                }
                if last == after {
                    if !r.follow || tx.is_closed() {
                        return;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                after = last;
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn init(&self, req: Request<InitRequest>) -> Result<Response<Empty>, Status> {
        self.ctl.gate.check(&req, "Init", auth::OPERATOR)?;
        let members = req.into_inner().members.into_iter().collect();
        self.ctl.init(members).await?;
        Ok(Response::new(Empty {}))
    }

    async fn add_node(&self, req: Request<AddNodeRequest>) -> Result<Response<Empty>, Status> {
        self.ctl.gate.check(&req, "AddNode", auth::OPERATOR)?;
        self.ctl.leader_only()?;
        let r = req.into_inner();
        // As a learner first; `blocking` waits until it has caught up, then it becomes a voter.
        self.ctl
            .raft
            .add_learner(r.node_id, BasicNode { addr: r.addr }, true)
            .await
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        self.ctl
            .raft
            .change_membership(ChangeMembers::AddVoterIds([r.node_id].into()), false)
            .await
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        Ok(Response::new(Empty {}))
    }

    async fn remove_node(
        &self,
        req: Request<RemoveNodeRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.ctl.gate.check(&req, "RemoveNode", auth::OPERATOR)?;
        self.ctl.leader_only()?;
        let id = req.into_inner().node_id;
        self.ctl
            .raft
            .change_membership(ChangeMembers::RemoveVoters([id].into()), false)
            .await
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        Ok(Response::new(Empty {}))
    }

    async fn status(&self, req: Request<Empty>) -> Result<Response<StatusReply>, Status> {
        self.ctl.gate.check(&req, "Status", auth::MONITOR_READ)?;
        let m = self.ctl.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: Vec<u64> = membership.voter_ids().collect();
        let last = m.last_log_index.unwrap_or(0);
        let nodes = membership
            .nodes()
            .map(|(id, n)| {
                let matched = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(id).cloned().flatten())
                    .map(|l| l.index);
                let matched = if *id == self.ctl.id {
                    Some(last)
                } else {
                    matched
                };
                NodeStatus {
                    node_id: *id,
                    addr: n.addr.clone(),
                    voter: voters.contains(id),
                    matched: matched.unwrap_or(0),
                    lag: matched.map(|x| last.saturating_sub(x)).unwrap_or(u64::MAX),
                }
            })
            .collect();
        let leader_addr = m
            .current_leader
            .and_then(|l| membership.get_node(&l))
            .map(|n| n.addr.clone())
            .unwrap_or_default();
        let now = now_ms();
        // Only the leader knows the workers.
        let leading = m.current_leader == Some(self.ctl.id);
        let live = self.sched.live_source_ips(now);
        let policy = self.ctl.policy();
        let (queued_messages, queued_recipients, workerless) = {
            let st = self.ctl.state.lock().unwrap();
            (
                st.index.messages(),
                st.queued_recipients(),
                if leading {
                    workerless(&st, &policy.policy, &live)
                } else {
                    Vec::new()
                },
            )
        };
        Ok(Response::new(StatusReply {
            node_id: self.ctl.id,
            leader_id: m.current_leader.unwrap_or(0),
            leader_addr,
            term: m.current_term,
            last_log_index: last,
            // The saved value is written unsynced and may trail what was applied.
            committed: self
                .ctl
                .log
                .committed()
                .max(m.last_applied)
                .map(|l| l.index)
                .unwrap_or(0),
            applied: m.last_applied.map(|l| l.index).unwrap_or(0),
            state: format!("{:?}", m.state),
            nodes,
            workerless,
            last_minute: Some(self.ctl.traffic.last_minute().proto()),
            last_hour: Some(self.ctl.traffic.last_hour_all().proto()),
            peers: {
                self.ctl
                    .peers()
                    .into_iter()
                    .map(|(node, policy_version, seen)| PeerVersion {
                        node,
                        policy_version,
                        last_seen_ms_ago: now.saturating_sub(seen),
                    })
                    .collect()
            },
            snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
            purged_index: m.purged.map(|l| l.index).unwrap_or(0),
            policy_version: self.ctl.policy().version,
            queued_messages,
            queued_recipients,
        }))
    }

    async fn queues(&self, req: Request<Empty>) -> Result<Response<QueuesReply>, Status> {
        self.ctl.gate.check(&req, "Queues", auth::MONITOR_READ)?;
        let now = now_ms();
        let policy = self.ctl.policy();
        let hour = self.ctl.traffic.last_hour(crate::traffic::By::Queue);
        let st = self.ctl.state.lock().unwrap();
        let received = st.index.oldest_received();
        let queues = st
            .index
            .queues
            .iter()
            .zip(&received)
            .filter(|(q, _)| q.recipients > 0 || q.paused)
            .map(|(q, received)| {
                let rule = policy
                    .policy
                    .domain_settings(&q.key.dest, Some(&q.key.vmta));
                // The age of the oldest message waiting, as PowerMTA shows it.
                let oldest = received.map_or(0, |r| now.saturating_sub(r) / 1000);
                let members = crate::sched::due::members(&policy.policy, &q.key.vmta);
                let view = Scheduler::queue_view(&st, &q.key, &members, now);
                let max = rule
                    .max_smtp_out
                    .unwrap_or(crate::sched::budgets::DEFAULT_MAX_SMTP_OUT);
                let room = max.saturating_sub(view.connections);
                let due = q
                    .ready
                    .iter()
                    .take_while(|&&(t, _, _)| t <= now)
                    .take(room as usize)
                    .count() as u32;
                QueueInfo {
                    queue: q.key.dest.clone(),
                    vmta: q.key.vmta.clone(),
                    mode: if q.paused {
                        "paused".into()
                    } else {
                        view.mode.into()
                    },
                    recipients: q.recipients,
                    oldest_age_s: oldest,
                    connections: view.connections,
                    max_connections: rule.max_smtp_out.unwrap_or(0),
                    rate_used: view.sent_last_hour,
                    rate_allowed: rule
                        .max_msg_rate
                        .map(|r| format!("{}/{}s", r.count, r.per_secs))
                        .unwrap_or_else(|| "unlimited".into()),
                    last_error: q.last_error.clone(),
                    waiting: if q.paused { 0 } else { due },
                    last_hour: Some(
                        hour.get(&format!("{}/{}", q.key.dest, q.key.vmta))
                            .copied()
                            .unwrap_or_default()
                            .proto(),
                    ),
                }
            })
            .collect();
        Ok(Response::new(QueuesReply { queues }))
    }

    async fn pause(&self, req: Request<QueueSelector>) -> Result<Response<CountReply>, Status> {
        self.ctl.gate.check(&req, "Pause", auth::MONITOR_WRITE)?;
        let count = self
            .write(Command::Pause {
                pattern: req.into_inner().pattern,
            })
            .await?;
        Ok(Response::new(CountReply { count }))
    }

    async fn resume(&self, req: Request<QueueSelector>) -> Result<Response<CountReply>, Status> {
        self.ctl.gate.check(&req, "Resume", auth::MONITOR_WRITE)?;
        let count = self
            .write(Command::Resume {
                pattern: req.into_inner().pattern,
            })
            .await?;
        Ok(Response::new(CountReply { count }))
    }

    async fn delete(&self, req: Request<DeleteRequest>) -> Result<Response<CountReply>, Status> {
        self.ctl.gate.check(&req, "Delete", auth::OPERATOR)?;
        let r = req.into_inner();
        if r.queue_pattern.is_empty() && r.recipient.is_empty() && r.job_id.is_empty() {
            return Err(Status::invalid_argument(
                "say what to delete: a queue pattern, a recipient or a job id",
            ));
        }
        let count = self
            .write(Command::Delete {
                now_ms: now_ms(),
                queue_pattern: r.queue_pattern,
                recipient: r.recipient,
                job_id: r.job_id,
            })
            .await?;
        Ok(Response::new(CountReply { count }))
    }

    async fn retry_now(&self, req: Request<QueueSelector>) -> Result<Response<CountReply>, Status> {
        self.ctl.gate.check(&req, "RetryNow", auth::OPERATOR)?;
        let count = self
            .write(Command::RetryNow {
                now_ms: now_ms(),
                pattern: req.into_inner().pattern,
            })
            .await?;
        Ok(Response::new(CountReply { count }))
    }

    async fn set_queue_mode(
        &self,
        req: Request<SetModeRequest>,
    ) -> Result<Response<CountReply>, Status> {
        self.ctl.gate.check(&req, "SetQueueMode", auth::OPERATOR)?;
        self.ctl.leader_only()?;
        let r = req.into_inner();
        let backoff = match r.mode.as_str() {
            "backoff" => true,
            "normal" => false,
            other => {
                return Err(Status::invalid_argument(format!(
                    "mode `{other}`: say backoff or normal"
                )));
            }
        };
        if r.for_secs > MAX_FOR_SECS {
            return Err(Status::invalid_argument("--for: at most 366 days"));
        }
        let now = now_ms();
        let policy = self.ctl.policy();
        let queues: Vec<crate::queue::command::QueueKey> = {
            let st = self.ctl.state.lock().unwrap();
            st.index
                .queues
                .iter()
                .filter(|q| crate::queue::state::queue_matches(&r.pattern, &q.key))
                .map(|q| q.key.clone())
                .collect()
        };
        if queues.is_empty() {
            return Err(Status::not_found(format!(
                "no queue matches `{}` (see `sluice show queues`)",
                r.pattern
            )));
        }
        let mut count = 0;
        for q in queues {
            let until = if !backoff {
                0
            } else if r.for_secs > 0 {
                now + r.for_secs * 1000
            } else {
                let rule = policy.policy.domain_settings(&q.dest, Some(&q.vmta));
                let secs = rule.backoff_to_normal_after.map_or(3600, |d| d.secs());
                now.saturating_add(secs.min(MAX_FOR_SECS) * 1000)
            };
            self.write(Command::SetMode {
                queue: q,
                backoff_until_ms: until,
            })
            .await?;
            count += 1;
        }
        Ok(Response::new(CountReply { count }))
    }

    async fn set_source(
        &self,
        req: Request<SourceRequest>,
    ) -> Result<Response<CountReply>, Status> {
        self.ctl.gate.check(&req, "SetSource", auth::OPERATOR)?;
        let r = req.into_inner();
        let ip: std::net::IpAddr = r
            .ip
            .parse()
            .map_err(|_| Status::invalid_argument(format!("`{}` is not an IP address", r.ip)))?;
        if r.for_secs > MAX_FOR_SECS {
            return Err(Status::invalid_argument("--for: at most 366 days"));
        }
        let until = match (r.enable, r.for_secs) {
            (true, _) => 0,
            (false, 0) => u64::MAX,
            (false, s) => now_ms() + s * 1000,
        };
        let count = self
            .write(Command::DisableSourceIp {
                ip,
                until_ms: until,
            })
            .await?;
        Ok(Response::new(CountReply { count }))
    }

    async fn suppress(
        &self,
        req: Request<SuppressRequest>,
    ) -> Result<Response<CountReply>, Status> {
        self.ctl.gate.check(&req, "Suppress", auth::OPERATOR)?;
        let r = req.into_inner();
        if r.add.len() + r.remove.len() > crate::suppress::PAGE {
            return Err(Status::invalid_argument(format!(
                "at most {} entries per request",
                crate::suppress::PAGE
            )));
        }
        let now = now_ms();
        let add = r
            .add
            .into_iter()
            .map(|e| crate::suppress::from_proto(e, now))
            .collect::<Result<Vec<_>, _>>()?;
        let remove = r
            .remove
            .into_iter()
            .map(|e| crate::suppress::from_proto(e, now).map(|e| (e.scope, e.address)))
            .collect::<Result<Vec<_>, _>>()?;
        let count = self
            .write(Command::Suppress {
                now_ms: now,
                add,
                remove,
                expire: Vec::new(),
            })
            .await?;
        Ok(Response::new(CountReply { count }))
    }

    async fn suppress_list(
        &self,
        req: Request<SuppressListRequest>,
    ) -> Result<Response<SuppressListReply>, Status> {
        self.ctl.gate.check(&req, "SuppressList", auth::READER)?;
        let r = req.into_inner();
        let db = self.ctl.db.clone();
        let limit = (r.limit as usize).clamp(1, crate::suppress::PAGE);
        let (entries, next_key) = blocking(move || {
            if r.address.is_empty() {
                read::suppress_page(&db, &r.start_key, limit)
            } else {
                read::suppressions_of(&db, &r.address).map(|v| (v, Vec::new()))
            }
        })
        .await?;
        Ok(Response::new(SuppressListReply {
            entries: entries.into_iter().map(crate::suppress::to_proto).collect(),
            next_key: next_key.into(),
            total: 0,
        }))
    }

    async fn vmtas(&self, req: Request<Empty>) -> Result<Response<VmtasReply>, Status> {
        self.ctl.gate.check(&req, "Vmtas", auth::MONITOR_READ)?;
        let now = now_ms();
        let leading = self.ctl.raft.metrics().borrow().current_leader == Some(self.ctl.id);
        let live = self.sched.live_source_ips(now);
        let policy = self.ctl.policy();
        let st = self.ctl.state.lock().unwrap();
        let vmtas =
            crate::views::vmtas(&st, &policy.policy, &self.ctl.traffic, &live, leading, now);
        Ok(Response::new(VmtasReply { vmtas }))
    }

    async fn workers(&self, req: Request<Empty>) -> Result<Response<WorkersReply>, Status> {
        self.ctl.gate.check(&req, "Workers", auth::MONITOR_READ)?;
        self.ctl.leader_only()?;
        let now = now_ms();
        let versions: std::collections::HashMap<String, u64> = self
            .ctl
            .peers()
            .into_iter()
            .map(|(n, v, _)| (n, v))
            .collect();
        let leases: std::collections::HashMap<String, u32> = {
            let st = self.ctl.state.lock().unwrap();
            let mut m = std::collections::HashMap::new();
            for l in st.leases.values() {
                *m.entry(l.worker.clone()).or_default() += 1;
            }
            m
        };
        let workers = self
            .sched
            .workers_seen(now)
            .into_iter()
            .map(|(name, ips, capacity, ago, live)| WorkerInfo {
                policy_version: versions
                    .get(&format!("worker {name}"))
                    .copied()
                    .unwrap_or(0),
                leases: leases.get(&name).copied().unwrap_or(0),
                source_ips: ips.iter().map(|ip| ip.to_string()).collect(),
                last_seen_ms_ago: ago,
                capacity,
                live,
                name,
            })
            .collect();
        Ok(Response::new(WorkersReply { workers }))
    }

    async fn jobs(&self, req: Request<Empty>) -> Result<Response<JobsReply>, Status> {
        self.ctl.gate.check(&req, "Jobs", auth::READER)?;
        let db = self.ctl.db.clone();
        let queued = blocking(move || crate::views::job_queues(&db)).await?;
        let jobs = crate::views::jobs(queued, &self.ctl.traffic);
        Ok(Response::new(JobsReply { jobs }))
    }

    async fn settings(
        &self,
        req: Request<SettingsRequest>,
    ) -> Result<Response<SettingsReply>, Status> {
        self.ctl.gate.check(&req, "Settings", auth::READER)?;
        let r = req.into_inner();
        let policy = self.ctl.policy();
        let p = &policy.policy;
        let vmta = (!r.vmta.is_empty()).then_some(r.vmta.as_str());
        match vmta.map(|v| p.target(v)) {
            Some(None) => {
                return Err(Status::invalid_argument(format!(
                    "`{}` is not a virtual-mta of the policy",
                    r.vmta
                )));
            }
            Some(Some(sluice_common::policy::Target::Pool(pool))) => {
                return Err(Status::invalid_argument(format!(
                    "`{}` is a pool; settings are per member: {}",
                    r.vmta,
                    pool.members.join(", ")
                )));
            }
            _ => {}
        }
        let queue = p.queue_name(&r.domain);
        let mut rules: Vec<String> = sluice_common::policy::explain::rules_for(p, &queue, vmta)
            .iter()
            .map(|rule| {
                let at = rule.loc.as_ref().map(|l| l.to_string()).unwrap_or_default();
                format!(
                    "<domain {}> at {at}",
                    sluice_common::policy::explain::pattern_text(&rule.pattern)
                )
            })
            .collect();
        if queue != r.domain.to_ascii_lowercase() {
            rules.insert(0, format!("{} is queued as {queue} (queue-to)", r.domain));
        }
        let directives = crate::views::directives(sluice_common::policy::explain::settings_for(
            p, &queue, vmta,
        ));
        Ok(Response::new(SettingsReply { rules, directives }))
    }

    async fn explain(
        &self,
        req: Request<ExplainRequest>,
    ) -> Result<Response<ExplainReply>, Status> {
        self.ctl.gate.check(&req, "Explain", auth::READER)?;
        let r = req.into_inner();
        let policy = self.ctl.policy();
        crate::views::explain(&policy.policy, &r)
            .map(Response::new)
            .map_err(Status::invalid_argument)
    }

    async fn inspect(
        &self,
        req: Request<MessageRequest>,
    ) -> Result<Response<InspectReply>, Status> {
        self.ctl.gate.check(&req, "Inspect", auth::READER)?;
        let id = req.into_inner().message_id;
        let ctl = self.ctl.clone();
        let found = blocking(move || {
            Ok((
                read::message(&ctl.db, id)?,
                read::body(&ctl.db, &ctl.state, id)?,
            ))
        })
        .await?;
        match found {
            (Some(m), body) => Ok(Response::new(crate::views::inspect(
                id,
                &m,
                body.as_deref(),
                now_ms(),
            ))),
            (None, _) => Err(Status::not_found(format!(
                "no message {id:016x} on this replica (delivered and removed, or never queued)"
            ))),
        }
    }

    async fn trace(&self, req: Request<MessageRequest>) -> Result<Response<TraceReply>, Status> {
        self.ctl.gate.check(&req, "Trace", auth::READER)?;
        let r = req.into_inner();
        if r.message_id == 0 && r.recipient.is_empty() {
            return Err(Status::invalid_argument(
                "say what to trace: a message id, a recipient, or both",
            ));
        }
        // A trace may read millions of rows: one at a time.
        let Ok(permit) = TRACE_SLOTS.try_acquire() else {
            return Err(Status::resource_exhausted(
                "another trace is running on this controller; try again when it ends",
            ));
        };
        let db = self.ctl.db.clone();
        let now = now_ms();
        // The permit goes with the scan: a client that gives up does not free it early.
        let (events, truncated) = blocking(move || {
            let _permit = permit;
            crate::views::trace(&db, r.message_id, &r.recipient, now)
        })
        .await?;
        Ok(Response::new(TraceReply { events, truncated }))
    }

    async fn reload(&self, req: Request<ReloadRequest>) -> Result<Response<ReloadReply>, Status> {
        // Controllers pass a reload on to each other; operators start it.
        let roles = if req.get_ref().local {
            &[Role::Operator, Role::Controller][..]
        } else {
            auth::OPERATOR
        };
        self.ctl.gate.check(&req, "Reload", roles)?;
        let (served, warnings) =
            crate::node::load_policy(&self.ctl.settings.policy).map_err(|e| {
                Status::invalid_argument(format!(
                    "the new policy was rejected; the running one stays:\n{e}"
                ))
            })?;
        let version = served.version;
        let summary = served.policy.summary();
        *self.ctl.policy.write().unwrap() = Arc::new(served);
        tracing::info!(version = format!("{version:016x}"), "policy reloaded");
        let mut failed = Vec::new();
        if !req.into_inner().local {
            // Every controller reads its own copy of the file; each must have the same.
            let m = self.ctl.raft.metrics().borrow().clone();
            let others: Vec<(u64, String)> = m
                .membership_config
                .membership()
                .nodes()
                .filter(|(id, _)| **id != self.ctl.id)
                .map(|(id, n)| (*id, n.addr.clone()))
                .collect();
            for (id, addr) in others {
                let res = async {
                    let ch = sluice_proto::connect(&addr)
                        .await
                        .map_err(|e| e.to_string())?;
                    admin_client::AdminClient::new(ch)
                        .reload(ReloadRequest { local: true })
                        .await
                        .map(|r| r.into_inner().version)
                        .map_err(|s| s.message().to_string())
                }
                .await;
                match res {
                    Ok(v) if v == version => {}
                    Ok(v) => failed.push(format!(
                        "node {id} ({addr}) loaded version {v:016x}: its policy file differs"
                    )),
                    Err(e) => failed.push(format!("node {id} ({addr}): {e}")),
                }
            }
        }
        Ok(Response::new(ReloadReply {
            version,
            summary,
            warnings,
            failed,
        }))
    }

    async fn advance_clock(
        &self,
        req: Request<AdvanceClockRequest>,
    ) -> Result<Response<AdvanceClockReply>, Status> {
        self.ctl.gate.check(&req, "AdvanceClock", auth::OPERATOR)?;
        if !self.ctl.settings.scheduler.allow_clock_control {
            return Err(Status::failed_precondition(
                "clock control is off (scheduler.allow_clock_control, for tests only)",
            ));
        }
        let ms = req.into_inner().ms;
        let now_ms = crate::clock::advance(ms).map_err(Status::invalid_argument)?;
        tracing::warn!(ms, "clock moved forward by an operator (test)");
        Ok(Response::new(AdvanceClockReply { now_ms }))
    }

    async fn digest(&self, req: Request<Empty>) -> Result<Response<DigestReply>, Status> {
        self.ctl.gate.check(&req, "Digest", auth::READER)?;
        let ctl = self.ctl.clone();
        let (digest, applied, messages) =
            blocking(move || crate::queue::state::digest(&ctl.db, &ctl.state)).await?;
        Ok(Response::new(DigestReply {
            digest,
            applied,
            messages,
        }))
    }

    async fn list(&self, req: Request<Empty>) -> Result<Response<ListReply>, Status> {
        self.ctl.gate.check(&req, "List", auth::READER)?;
        let db = self.ctl.db.clone();
        let all = blocking(move || read::messages(&db)).await?;
        let messages = all
            .into_iter()
            .map(|(id, rec)| MessageInfo {
                id,
                recipients: rec.rcpts.iter().map(|r| r.address.clone()).collect(),
                states: rec
                    .rcpts
                    .iter()
                    .map(|r| match r.state {
                        RcptState::Queued => "queued".to_string(),
                        RcptState::Delivered => "delivered".to_string(),
                        RcptState::Bounced => "bounced".to_string(),
                    })
                    .collect(),
                queue: rec
                    .queues
                    .first()
                    .map(|q| q.dest.clone())
                    .unwrap_or_default(),
                vmta: rec
                    .queues
                    .first()
                    .map(|q| q.vmta.clone())
                    .unwrap_or_default(),
                job_id: rec.job_id,
                mail_from: rec.mail_from,
            })
            .collect();
        Ok(Response::new(ListReply { messages }))
    }
}
