//! One client for every caller of the controllers (ingress, workers, the CLI): it finds the
//! leader among the configured controllers, follows a follower's hint, and retries what may
//! succeed on another attempt until a deadline.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::tls::TlsFiles;
use crate::{client_tls, connect_as, leader_hint};

pub struct LeaderClient {
    controllers: Vec<String>,
    current: Mutex<Option<(String, Channel)>>,
    /// Certificates to connect with; None: the process's (see `use_tls_as`).
    tls: Option<TlsFiles>,
}

/// Whether another attempt (on the leader, or later) may succeed: the controller is not the
/// leader, has no majority, could not be reached, or timed out.
pub fn retryable(st: &Status) -> bool {
    matches!(
        st.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
    )
}

impl LeaderClient {
    pub fn new(controllers: Vec<String>) -> Self {
        LeaderClient {
            controllers,
            current: Mutex::new(None),
            tls: None,
        }
    }

    /// A client that connects with these certificates rather than the process's.
    pub fn with_tls(controllers: Vec<String>, tls: TlsFiles) -> Self {
        LeaderClient {
            tls: Some(tls),
            ..LeaderClient::new(controllers)
        }
    }

    /// The channel to the controller last found leading, or a new one.
    async fn channel(&self, prefer: Option<String>) -> Result<(String, Channel), String> {
        if prefer.is_none()
            && let Some(c) = self.current.lock().unwrap().clone()
        {
            return Ok(c);
        }
        let mut last = "no controller configured".to_string();
        for addr in prefer.iter().chain(self.controllers.iter()) {
            let tls = self.tls.as_ref().or_else(|| client_tls());
            match connect_as(addr, Duration::from_secs(2), tls).await {
                Ok(ch) => {
                    *self.current.lock().unwrap() = Some((addr.clone(), ch.clone()));
                    return Ok((addr.clone(), ch));
                }
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        Err(last)
    }

    pub fn forget(&self) {
        *self.current.lock().unwrap() = None;
    }

    /// Calls `f` on the leader, following hints and retrying retryable errors until
    /// `deadline`; other errors are answered at once.
    pub async fn call<T, F, Fut>(&self, deadline: Instant, mut f: F) -> Result<T, Status>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut prefer = None;
        loop {
            let (addr, ch) = match self.channel(prefer.take()).await {
                Ok(c) => c,
                Err(e) => {
                    if Instant::now() + Duration::from_millis(100) >= deadline {
                        return Err(Status::unavailable(e));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // An answer that never comes (a controller cut off mid-call) ends at the deadline,
            // and the channel is dropped so that the next call looks for the leader afresh.
            let Ok(answer) = tokio::time::timeout_at(deadline, f(ch)).await else {
                self.forget();
                return Err(Status::deadline_exceeded(format!(
                    "{addr} did not answer in time"
                )));
            };
            match answer {
                Ok(r) => return Ok(r.into_inner()),
                Err(st) if retryable(&st) => {
                    self.forget();
                    if Instant::now() + Duration::from_millis(100) >= deadline {
                        return Err(st);
                    }
                    prefer = leader_hint(&st).filter(|h| *h != addr);
                    if prefer.is_none() {
                        // No leader known (an election is under way): wait a little.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                Err(st) => return Err(st),
            }
        }
    }
}
