//! Group commit: requests that arrive while a group is being committed wait and then go into
//! the next group together, so groups grow with the load and each write carries as much as it
//! can. Used by the controller for Raft entries (enqueues, outcomes) and by ingress for
//! enqueue requests.

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
    /// `weight` sizes an item (bytes or messages); a group never weighs more than
    /// `max_weight`, unless it is one item that alone weighs more. `commit` writes one group
    /// and answers every item of it.
    pub fn start<F, Fut>(max_weight: usize, weight: fn(&T) -> usize, commit: F) -> Self
    where
        F: Fn(Vec<Pending<T, R>>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<Pending<T, R>>(4096);
        // One group in flight: while it commits, the next one forms.
        let inflight = Arc::new(Semaphore::new(1));
        tokio::spawn(async move {
            // An item that did not fit in the last group starts the next one.
            let mut carry: Option<Pending<T, R>> = None;
            loop {
                let first = match carry.take() {
                    Some(p) => p,
                    None => match rx.recv().await {
                        Some(p) => p,
                        None => break,
                    },
                };
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
                            let w = weight(&next.0);
                            if total + w > max_weight {
                                carry = Some(next);
                                break;
                            }
                            total += w;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[tokio::test]
    async fn groups_stay_within_their_weight_unless_one_item_is_heavier() {
        let groups: Arc<Mutex<Vec<Vec<usize>>>> = Arc::default();
        let seen = groups.clone();
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let g2 = gate.clone();
        let gc: GroupCommit<usize, ()> = GroupCommit::start(
            10,
            |w| *w,
            move |group| {
                let seen = seen.clone();
                let gate = g2.clone();
                async move {
                    seen.lock()
                        .unwrap()
                        .push(group.iter().map(|(w, _)| *w).collect());
                    // Hold the first group so that the rest queue up behind it.
                    let _ = gate.acquire().await;
                    for (_, r) in group {
                        let _ = r.send(());
                    }
                }
            },
        );
        let mut waits = Vec::new();
        for w in [1, 4, 4, 4, 25, 3, 3] {
            let gc = gc.clone();
            waits.push(tokio::spawn(async move { gc.submit(w).await }));
            tokio::task::yield_now().await;
        }
        // Wait until the first group is committing, then let everything through.
        while groups.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        gate.add_permits(100);
        for w in waits {
            w.await.unwrap().unwrap();
        }
        let groups = groups.lock().unwrap().clone();
        let all: Vec<usize> = groups.iter().flatten().copied().collect();
        assert_eq!(
            all,
            vec![1, 4, 4, 4, 25, 3, 3],
            "in order, none lost: {groups:?}"
        );
        for g in &groups {
            let sum: usize = g.iter().sum();
            assert!(sum <= 10 || g.len() == 1, "{groups:?}");
        }
        assert!(groups.contains(&vec![25]), "{groups:?}");
    }
}
