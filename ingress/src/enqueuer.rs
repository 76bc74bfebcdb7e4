//! Sends accepted messages to the controller leader, grouping concurrent ones into one request
//! (bounded by bytes, like a Raft entry). A message is reported committed only when the
//! controller said so. Each message carries an idempotency token, so that a request retried
//! after a timeout or a leader change is queued once.

use std::sync::Arc;
use std::time::Duration;

use sluice_common::group_commit::{GroupCommit, Pending};
use sluice_proto::LeaderClient;
use sluice_proto::queue::queue_client::QueueClient;
use sluice_proto::queue::{EnqueueRequest, NewMessage};
use tonic::Code;

/// Why a message was not committed, and what to answer the client.
#[derive(Debug, Clone)]
pub struct NotCommitted {
    pub code: Code,
    pub message: String,
}

impl NotCommitted {
    fn new(code: Code, message: impl Into<String>) -> Self {
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
}

fn weight(m: &NewMessage) -> usize {
    m.body.len() + 1024 + m.recipients.len() * 64
}

impl Enqueuer {
    /// `max_bytes`: the most one request carries (a larger message goes alone); `timeout`:
    /// how long a request keeps retrying, across leader changes.
    pub fn start(controllers: Vec<String>, max_bytes: usize, timeout: Duration) -> Enqueuer {
        let leader = Arc::new(LeaderClient::new(controllers));
        let group = GroupCommit::start(
            max_bytes,
            weight,
            move |jobs: Vec<Pending<NewMessage, Result1>>| {
                let leader = leader.clone();
                async move {
                    let (messages, replies): (Vec<_>, Vec<_>) = jobs.into_iter().unzip();
                    let req = EnqueueRequest { messages };
                    let deadline = tokio::time::Instant::now() + timeout;
                    let res = leader
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
                        .await;
                    for (i, r) in replies.into_iter().enumerate() {
                        let _ = r.send(match &res {
                            Ok(reply) => reply.ids.get(i).copied().ok_or_else(|| {
                                NotCommitted::new(
                                    Code::Internal,
                                    "the controller returned too few ids",
                                )
                            }),
                            Err(st) => Err(NotCommitted::new(st.code(), st.message())),
                        });
                    }
                }
            },
        );
        Enqueuer { group }
    }

    /// Returns the queue id once the message is committed on a majority.
    pub async fn enqueue(&self, mut m: NewMessage) -> Result<u64, NotCommitted> {
        if m.token.is_empty() {
            m.token = fastrand::u128(1..).to_be_bytes().to_vec().into();
        }
        self.group.submit(m).await.unwrap_or_else(|| {
            Err(NotCommitted::new(
                Code::Unavailable,
                "ingress is shutting down",
            ))
        })
    }
}
