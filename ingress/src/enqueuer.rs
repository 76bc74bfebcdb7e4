//! Sends accepted messages to the controller leader, grouping concurrent ones into one request
//! (bounded by bytes, like a Raft entry). A message is reported committed only when the
//! controller said so. Each message carries an idempotency token, so that a request retried
//! after a timeout or a leader change is queued once.

use std::sync::Arc;
use std::time::Duration;

use sluice_common::group_commit::{GroupCommit, Pending};
use sluice_proto::LeaderClient;
use sluice_proto::queue::queue_client::QueueClient;
use sluice_proto::queue::{EnqueueRequest, NewMessage, ReportRequest};
use tonic::Code;

/// Why a message was not committed, and what to answer the client.
#[derive(Debug, Clone)]
pub struct NotCommitted {
    pub code: Code,
    pub message: String,
}

impl NotCommitted {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        NotCommitted {
            code,
            message: message.into(),
        }
    }

    /// The SMTP reply: 452 when the controllers are out of disk space, 552 for a message
    /// larger than they take, else 451 (try again).
    pub fn smtp_reply(&self) -> &'static str {
        match self.code {
            Code::ResourceExhausted => "452 4.3.1 insufficient system storage; try again later",
            Code::InvalidArgument if self.message.contains("larger than") => {
                "552 5.3.4 message too big for the queue"
            }
            Code::InvalidArgument => "554 5.6.0 the queue refused the message",
            _ => "451 4.3.0 the queue could not commit the message; try again later",
        }
    }

    /// The HTTP status for the same.
    pub fn http_status(&self) -> u16 {
        match self.code {
            Code::ResourceExhausted => 507,
            Code::InvalidArgument => 400,
            _ => 503,
        }
    }
}

impl std::fmt::Display for NotCommitted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

type Result1 = Result<u64, NotCommitted>;

#[derive(Clone)]
pub struct Enqueuer {
    group: GroupCommit<NewMessage, Result1>,
    /// For reports (None: in-memory commits, which take none).
    leader: Option<(Arc<LeaderClient>, Duration)>,
}

fn weight(m: &NewMessage) -> usize {
    m.body.len() + 1024 + m.recipients.len() * 64
}

impl Enqueuer {
    /// `max_bytes`: the most one request carries (a larger message goes alone); `timeout`:
    /// how long a request keeps retrying, across leader changes.
    pub fn start(controllers: Vec<String>, max_bytes: usize, timeout: Duration) -> Enqueuer {
        let leader = Arc::new(LeaderClient::new(controllers));
        let for_reports = leader.clone();
        let mut e = Enqueuer::with_commit(max_bytes, move |req: EnqueueRequest| {
            let leader = leader.clone();
            async move {
                let deadline = tokio::time::Instant::now() + timeout;
                leader
                    .call(deadline, |ch| {
                        let r = req.clone();
                        async move {
                            QueueClient::new(ch)
                                .max_decoding_message_size(64 << 20)
                                .max_encoding_message_size(usize::MAX)
                                .enqueue(tonic::Request::new(r))
                                .await
                        }
                    })
                    .await
                    .map(|reply| reply.ids)
                    .map_err(|st| NotCommitted::new(st.code(), st.message()))
            }
        });
        e.leader = Some((for_reports, timeout));
        e
    }

    /// Hands a message for a processor's addresses to the leader; returns whether it was a
    /// report of that kind, once its rows are committed.
    pub async fn report(&self, req: ReportRequest) -> Result<bool, NotCommitted> {
        let Some((leader, timeout)) = &self.leader else {
            return Err(NotCommitted::new(
                Code::Unavailable,
                "no controller for reports",
            ));
        };
        let deadline = tokio::time::Instant::now() + *timeout;
        leader
            .call(deadline, |ch| {
                let r = req.clone();
                async move {
                    QueueClient::new(ch)
                        .max_encoding_message_size(usize::MAX)
                        .report(tonic::Request::new(r))
                        .await
                }
            })
            .await
            .map(|reply| reply.recognized)
            .map_err(|st| NotCommitted::new(st.code(), st.message()))
    }

    /// Groups messages and hands each group to `commit`, which returns their queue ids in
    /// order once committed. `start` commits through the controller leader; the session fuzz
    /// target commits in memory.
    pub fn with_commit<F, Fut>(max_bytes: usize, commit: F) -> Enqueuer
    where
        F: Fn(EnqueueRequest) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<u64>, NotCommitted>> + Send + 'static,
    {
        let commit = Arc::new(commit);
        let group = GroupCommit::start(
            max_bytes,
            weight,
            move |jobs: Vec<Pending<NewMessage, Result1>>| {
                let commit = commit.clone();
                async move {
                    let (messages, replies): (Vec<_>, Vec<_>) = jobs.into_iter().unzip();
                    let res = commit(EnqueueRequest { messages }).await;
                    for (i, r) in replies.into_iter().enumerate() {
                        let _ = r.send(match &res {
                            Ok(ids) => ids.get(i).copied().ok_or_else(|| {
                                NotCommitted::new(
                                    Code::Internal,
                                    "the controller returned too few ids",
                                )
                            }),
                            Err(e) => Err(e.clone()),
                        });
                    }
                }
            },
        );
        Enqueuer {
            group,
            leader: None,
        }
    }

    /// Returns the queue id once the message is committed on a majority.
    pub async fn enqueue(&self, mut m: NewMessage) -> Result<u64, NotCommitted> {
        if m.token.is_empty() {
            // The top bit is clear: report tokens (made by the leader) have it set.
            m.token = fastrand::u128(1..1 << 127).to_be_bytes().to_vec().into();
        }
        let (rcpts, bytes) = (m.recipients.len() as u64, m.body.len() as u64);
        let began = std::time::Instant::now();
        let r = self.group.submit(m).await.unwrap_or_else(|| {
            Err(NotCommitted::new(
                Code::Unavailable,
                "ingress is shutting down",
            ))
        });
        if r.is_ok() {
            let m = &crate::metrics::METRICS;
            m.enqueue_seconds.observe(began.elapsed().as_secs_f64());
            m.messages.inc();
            m.recipients.inc_by(rcpts);
            m.bytes.inc_by(bytes);
        }
        r
    }
}
