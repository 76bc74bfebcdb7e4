//! Sends accepted messages to the controller leader, grouping concurrent ones into one request,
//! and follows the leader when a follower names it. A message is reported committed only when
//! the controller said so.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_proto::queue::queue_client::QueueClient;
use sluice_proto::queue::{EnqueueRequest, NewMessage};
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Channel;

/// Why a message was not committed (the SMTP side answers 451).
#[derive(Debug, Clone)]
pub struct NotCommitted(pub String);

type Job = (NewMessage, oneshot::Sender<Result<String, NotCommitted>>);

#[derive(Clone)]
pub struct Enqueuer {
    tx: mpsc::Sender<Job>,
}

/// Finds and remembers the leader among the configured controllers.
pub struct Leader {
    controllers: Vec<String>,
    current: Mutex<Option<(String, QueueClient<Channel>)>>,
}

impl Leader {
    pub fn new(controllers: Vec<String>) -> Arc<Leader> {
        Arc::new(Leader {
            controllers,
            current: Mutex::new(None),
        })
    }

    async fn client(
        &self,
        prefer: Option<String>,
    ) -> Result<(String, QueueClient<Channel>), String> {
        if prefer.is_none()
            && let Some(c) = self.current.lock().unwrap().clone()
        {
            return Ok(c);
        }
        let mut candidates: Vec<String> = prefer.into_iter().collect();
        candidates.extend(self.controllers.iter().cloned());
        let mut last = String::from("no controller configured");
        for addr in candidates {
            match sluice_proto::connect(&addr).await {
                Ok(ch) => {
                    let c = QueueClient::new(ch)
                        .max_decoding_message_size(64 << 20)
                        .max_encoding_message_size(256 << 20);
                    *self.current.lock().unwrap() = Some((addr.clone(), c.clone()));
                    return Ok((addr, c));
                }
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        Err(last)
    }

    fn forget(&self) {
        *self.current.lock().unwrap() = None;
    }

    /// Sends one request, following leader hints and retrying until `deadline`.
    pub async fn enqueue(
        &self,
        req: EnqueueRequest,
        deadline: Instant,
    ) -> Result<Vec<String>, NotCommitted> {
        let mut prefer = None;
        loop {
            let attempt = async {
                let (addr, mut c) = self.client(prefer.take()).await.map_err(|e| (None, e))?;
                let mut r = tonic::Request::new(req.clone());
                r.set_timeout(
                    deadline
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(50)),
                );
                match c.enqueue(r).await {
                    Ok(reply) => Ok(reply.into_inner().ids),
                    Err(st) => {
                        let hint = sluice_proto::leader_hint(&st).filter(|h| *h != addr);
                        Err((hint, format!("{addr}: {}", st.message())))
                    }
                }
            };
            match attempt.await {
                Ok(ids) => return Ok(ids),
                Err((hint, e)) => {
                    self.forget();
                    if Instant::now() + Duration::from_millis(100) >= deadline {
                        return Err(NotCommitted(e));
                    }
                    if hint.is_some() {
                        prefer = hint;
                    } else {
                        // No leader known (an election is under way): wait a little and retry.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    }
}

impl Enqueuer {
    pub fn start(leader: Arc<Leader>, max_batch: usize, timeout: Duration) -> Enqueuer {
        let (tx, mut rx) = mpsc::channel::<Job>(8192);
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut jobs = vec![first];
                while jobs.len() < max_batch {
                    match rx.try_recv() {
                        Ok(j) => jobs.push(j),
                        Err(_) => break,
                    }
                }
                let leader = leader.clone();
                tokio::spawn(async move {
                    let (messages, replies): (Vec<_>, Vec<_>) = jobs.into_iter().unzip();
                    let res = leader
                        .enqueue(EnqueueRequest { messages }, Instant::now() + timeout)
                        .await;
                    for (i, r) in replies.into_iter().enumerate() {
                        let _ = r.send(match &res {
                            Ok(ids) => ids.get(i).cloned().ok_or_else(|| {
                                NotCommitted("the controller returned too few ids".into())
                            }),
                            Err(e) => Err(e.clone()),
                        });
                    }
                });
            }
        });
        Enqueuer { tx }
    }

    /// Returns the queue id once the message is committed on a majority.
    pub async fn enqueue(&self, m: NewMessage) -> Result<String, NotCommitted> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((m, tx))
            .await
            .map_err(|_| NotCommitted("ingress is shutting down".into()))?;
        rx.await
            .map_err(|_| NotCommitted("ingress is shutting down".into()))?
    }
}
