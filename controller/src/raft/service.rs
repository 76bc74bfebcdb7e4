//! The receiving side of Raft RPCs: decode, hand to openraft, encode its answer.

use sluice_proto::raft::RaftPayload;
use sluice_proto::raft::raft_server::Raft as RaftRpc;
use tonic::{Request, Response, Status};

use super::Raft;
use crate::auth::{self, Gate};

pub struct RaftService {
    pub raft: Raft,
    pub gate: Gate,
}

fn decode<T: serde::de::DeserializeOwned>(p: &RaftPayload) -> Result<T, Status> {
    bincode::deserialize(&p.data)
        .map_err(|e| Status::invalid_argument(format!("bad raft payload: {e}")))
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Response<RaftPayload>, Status> {
    let data = bincode::serialize(v).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(RaftPayload { data: data.into() }))
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        self.gate.check(&req, "AppendEntries", auth::CONTROLLER)?;
        let r = self.raft.append_entries(decode(req.get_ref())?).await;
        encode(&r)
    }

    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        self.gate.check(&req, "Vote", auth::CONTROLLER)?;
        let r = self.raft.vote(decode(req.get_ref())?).await;
        encode(&r)
    }

    async fn install_snapshot(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        self.gate.check(&req, "InstallSnapshot", auth::CONTROLLER)?;
        let r = self.raft.install_snapshot(decode(req.get_ref())?).await;
        encode(&r)
    }
}
