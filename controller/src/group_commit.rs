//! Group commit: requests that arrive while a Raft entry is being committed wait and then go
//! into the next entry together, so entries grow with the load and each synced write carries
//! as much as it can. Used for enqueues and for delivery outcomes.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

/// One submitted item and where its result goes.
pub type Pending<T, R> = (T, oneshot::Sender<R>);

pub struct GroupCommit<T, R> {
    tx: mpsc::Sender<Pending<T, R>>,
}

impl<T, R> Clone for GroupCommit<T, R> {
    fn clone(&self) -> Self {
        GroupCommit {
            tx: self.tx.clone(),
        }
    }
}

impl<T: Send + 'static, R: Send + 'static> GroupCommit<T, R> {
    /// `weight` sizes an item (messages in a request); a group stops growing at `max_weight`.
    /// `commit` writes one group and answers every item of it.
    pub fn start<F, Fut>(max_weight: usize, weight: fn(&T) -> usize, commit: F) -> Self
    where
        F: Fn(Vec<Pending<T, R>>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<Pending<T, R>>(4096);
        // One group in flight: while it commits, the next one forms.
        let inflight = Arc::new(Semaphore::new(1));
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let permit = inflight
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("semaphore open");
                let mut total = weight(&first.0);
                let mut group = vec![first];
                while total < max_weight {
                    match rx.try_recv() {
                        Ok(next) => {
                            total += weight(&next.0);
                            group.push(next);
                        }
                        Err(_) => break,
                    }
                }
                let fut = commit(group);
                tokio::spawn(async move {
                    fut.await;
                    drop(permit);
                });
            }
        });
        GroupCommit { tx }
    }

    /// Submits one item and waits for its result; `None` when the committer has stopped.
    pub async fn submit(&self, item: T) -> Option<R> {
        let (tx, rx) = oneshot::channel();
        self.tx.send((item, tx)).await.ok()?;
        rx.await.ok()
    }
}
