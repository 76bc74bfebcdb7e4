//! Raft RPCs to other controllers over tonic, with openraft's messages as bincode payloads.
//! An AppendEntries larger than the RPC limit is sent as consecutive smaller ones, each a
//! valid AppendEntries on its own, so that no request grows with the number of entries.

use bytes::{BufMut, Bytes, BytesMut};
use openraft::BasicNode;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sluice_proto::raft::RaftPayload;
use sluice_proto::raft::raft_client::RaftClient;
use tonic::transport::Channel;

use super::{NodeId, TypeConfig};
use openraft::Entry;

#[derive(Clone)]
pub struct Network {
    max_rpc_bytes: u64,
}

impl Network {
    pub fn new(max_rpc_bytes: u64) -> Self {
        Network { max_rpc_bytes }
    }
}

pub struct Connection {
    addr: String,
    client: Option<RaftClient<Channel>>,
    max_rpc_bytes: u64,
    /// The request payloads are written here, and its memory is taken back once the previous
    /// request is sent: a fresh allocation for each multi-megabyte AppendEntries made the
    /// kernel fault in and zero every page (`docs/benchmarks.md`). It keeps the largest
    /// payload's size for the life of the connection.
    buf: BytesMut,
}

/// `v` in bincode, in `buf`'s reused memory where the last payload has been dropped.
fn encode_reusing<T: Serialize>(buf: &mut BytesMut, v: &T) -> Result<Bytes, bincode::Error> {
    let n = bincode::serialized_size(v)? as usize;
    buf.clear();
    buf.reserve(n);
    bincode::serialize_into((&mut *buf).writer(), v)?;
    Ok(buf.split().freeze())
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, _target: NodeId, node: &BasicNode) -> Self::Network {
        Connection {
            addr: node.addr.clone(),
            client: None,
            max_rpc_bytes: self.max_rpc_bytes,
            buf: BytesMut::new(),
        }
    }
}

/// Splits entries into runs whose encoded size stays under `limit` (a run holds at least
/// one entry).
fn runs(entries: Vec<Entry<TypeConfig>>, limit: u64) -> Vec<Vec<Entry<TypeConfig>>> {
    let mut out: Vec<Vec<Entry<TypeConfig>>> = Vec::new();
    let mut size = 0u64;
    for e in entries {
        let n = bincode::serialized_size(&e).unwrap_or(u64::MAX);
        match out.last_mut() {
            Some(run) if size + n <= limit => {
                size += n;
                run.push(e);
            }
            _ => {
                size = n;
                out.push(vec![e]);
            }
        }
    }
    out
}

impl Connection {
    async fn client(&mut self) -> Result<&mut RaftClient<Channel>, Unreachable> {
        if self.client.is_none() {
            let ch =
                sluice_proto::connect_within(&self.addr, std::time::Duration::from_millis(500))
                    .await
                    .map_err(|e| Unreachable::new(&e))?;
            let limit = self.max_rpc_bytes as usize;
            self.client = Some(
                RaftClient::new(ch)
                    .max_decoding_message_size(limit)
                    .max_encoding_message_size(limit),
            );
        }
        Ok(self.client.as_mut().unwrap())
    }

    async fn call<Req, Resp, E>(
        &mut self,
        which: Rpc,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let data = encode_reusing(&mut self.buf, req)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let timeout = option.hard_ttl();
        let client = self.client().await.map_err(RPCError::Unreachable)?;
        let mut request = tonic::Request::new(RaftPayload { data });
        request.set_timeout(timeout);
        let reply = match which {
            Rpc::Append => client.append_entries(request).await,
            Rpc::Vote => client.vote(request).await,
            Rpc::Snapshot => client.install_snapshot(request).await,
        };
        let reply = match reply {
            Ok(r) => r.into_inner(),
            Err(status) => {
                self.client = None;
                return Err(RPCError::Unreachable(Unreachable::new(&status)));
            }
        };
        let res: Result<Resp, E> = bincode::deserialize(&reply.data)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        res.map_err(|e| RPCError::RemoteError(openraft::error::RemoteError::new(0, e)))
    }
}

#[derive(Clone, Copy)]
enum Rpc {
    Append,
    Vote,
    Snapshot,
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        // Leave room for the request's other fields.
        let limit = self.max_rpc_bytes.saturating_sub(1 << 20).max(1);
        let AppendEntriesRequest {
            vote,
            prev_log_id,
            leader_commit,
            entries,
        } = rpc;
        let mut runs = runs(entries, limit);
        if runs.len() <= 1 {
            let req: AppendEntriesRequest<TypeConfig> = AppendEntriesRequest {
                vote,
                prev_log_id,
                leader_commit,
                entries: runs.pop().unwrap_or_default(),
            };
            return self.call(Rpc::Append, &req, &option).await;
        }
        let mut prev = prev_log_id;
        let mut accepted = None;
        for run in runs {
            let last = run.last().map(|e| e.log_id);
            let req: AppendEntriesRequest<TypeConfig> = AppendEntriesRequest {
                vote,
                prev_log_id: prev,
                leader_commit,
                entries: run,
            };
            match self.call(Rpc::Append, &req, &option).await? {
                AppendEntriesResponse::Success => {
                    accepted = last;
                    prev = last;
                }
                // A later run refused for a conflict: the earlier runs stand.
                AppendEntriesResponse::Conflict if accepted.is_some() => {
                    return Ok(AppendEntriesResponse::PartialSuccess(accepted));
                }
                other => return Ok(other),
            }
        }
        Ok(AppendEntriesResponse::Success)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(Rpc::Snapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(Rpc::Vote, &rpc, &option).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_memory_is_reused_once_the_last_payload_is_dropped() {
        let mut buf = BytesMut::new();
        let big = vec![7u8; 1 << 20];
        let first = encode_reusing(&mut buf, &big).unwrap();
        assert_eq!(bincode::deserialize::<Vec<u8>>(&first).unwrap(), big);
        let at = first.as_ptr();
        // Sent and dropped (calls on one connection are sequential): its memory is taken back.
        drop(first);
        let second = encode_reusing(&mut buf, &big).unwrap();
        assert_eq!(second.as_ptr(), at, "the payload memory is reused");
        assert_eq!(bincode::deserialize::<Vec<u8>>(&second).unwrap(), big);
        // Still in flight: the next payload gets other memory and both stay intact.
        let third = encode_reusing(&mut buf, &vec![1u8; 1000]).unwrap();
        assert_ne!(third.as_ptr(), at);
        assert_eq!(bincode::deserialize::<Vec<u8>>(&second).unwrap(), big);
        assert_eq!(
            bincode::deserialize::<Vec<u8>>(&third).unwrap(),
            vec![1u8; 1000]
        );
    }
}
