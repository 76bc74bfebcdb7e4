//! The gRPC lease API workers call: register, acquire, more, report, renew. Only the leader
//! answers; a worker acts only on its own leases.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use sluice_proto::lease::leases_server::Leases;
use sluice_proto::lease::*;
use tonic::{Request, Response, Status};

use super::Scheduler;

pub struct LeaseService {
    pub sched: Arc<Scheduler>,
}

/// The most a worker may ask for in one request.
const MAX_SLOTS: u32 = 10_000;
/// Leases granted in one Acquire reply.
const MAX_PER_ACQUIRE: u32 = 64;
const MAX_RENEW: usize = 100_000;

#[tonic::async_trait]
impl Leases for LeaseService {
    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<Response<RegisterReply>, Status> {
        let ctl = &self.sched.ctl;
        ctl.leader_only()?;
        let mut ips = Vec::new();
        for s in &req.get_ref().source_ips {
            ips.push(s.parse::<IpAddr>().map_err(|_| {
                Status::invalid_argument(format!("source IP `{s}` is not an IP address"))
            })?);
        }
        ctl.gate.worker_ips(&req, &req.get_ref().worker, &ips)?;
        let r = req.into_inner();
        tracing::info!(worker = %r.worker, ?ips, "worker registered");
        ctl.note_peer(&format!("worker {}", r.worker), r.policy_version);
        self.sched.register(r.worker, ips, r.capacity);
        Ok(Response::new(RegisterReply {
            lease_ttl_ms: ctl.settings.scheduler.lease_ttl_ms,
        }))
    }

    async fn acquire(
        &self,
        req: Request<AcquireRequest>,
    ) -> Result<Response<AcquireReply>, Status> {
        self.sched.ctl.leader_only()?;
        self.sched
            .ctl
            .gate
            .worker(&req, "Acquire", &req.get_ref().worker)?;
        let r = req.into_inner();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(r.wait_ms.min(10_000));
        // A worker with thousands of free slots gets its first leases without waiting for
        // all of them to be granted (one Raft entry each); it asks again at once.
        let want = r.free_slots.min(MAX_SLOTS).min(MAX_PER_ACQUIRE) as usize;
        let mut leases = Vec::new();
        loop {
            let Some(ips) = self.sched.worker_ips(&r.worker) else {
                return Err(Status::failed_precondition(
                    "unknown worker: register first",
                ));
            };
            let mut shares = self.sched.shares(&r.worker, &ips);
            while leases.len() < want {
                match self.sched.grant(&r.worker, &ips, &mut shares).await? {
                    Some(l) => leases.push(l),
                    None => break,
                }
            }
            if !leases.is_empty() || tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Response::new(AcquireReply { leases }))
    }

    async fn more(&self, req: Request<MoreRequest>) -> Result<Response<MoreReply>, Status> {
        self.sched.ctl.leader_only()?;
        self.sched
            .ctl
            .gate
            .worker(&req, "More", &req.get_ref().worker)?;
        let r = req.into_inner();
        self.sched.seen(&r.worker);
        let messages = self
            .sched
            .more(&r.worker, r.lease_id, r.max_messages)
            .await?;
        Ok(Response::new(MoreReply { messages }))
    }

    async fn report(&self, req: Request<ReportRequest>) -> Result<Response<ReportReply>, Status> {
        self.sched.ctl.leader_only()?;
        self.sched
            .ctl
            .gate
            .worker(&req, "Report", &req.get_ref().worker)?;
        let r = req.into_inner();
        self.sched.seen(&r.worker);
        self.sched
            .report(&r.worker, r.lease_id, r.outcomes, r.done)
            .await?;
        Ok(Response::new(ReportReply {}))
    }

    async fn renew(&self, req: Request<RenewRequest>) -> Result<Response<RenewReply>, Status> {
        self.sched.ctl.leader_only()?;
        self.sched
            .ctl
            .gate
            .worker(&req, "Renew", &req.get_ref().worker)?;
        let r = req.into_inner();
        if r.lease_ids.len() > MAX_RENEW {
            return Err(Status::invalid_argument("too many leases in one renewal"));
        }
        self.sched.seen(&r.worker);
        let gone = self.sched.renew(&r.worker, &r.lease_ids);
        Ok(Response::new(RenewReply { gone }))
    }
}
