//! Raft RPCs to other controllers over tonic, with openraft's messages as bincode payloads.
//! An AppendEntries larger than the RPC limit is sent as consecutive smaller ones, each a
//! valid AppendEntries on its own, so that no request grows with the number of entries.
//! An AppendEntries runs in its own task, so that it still lands when it takes longer than
//! openraft waits for it (see `Connection::in_flight`).

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
use openraft::{Entry, LogId, Vote};
use std::time::Duration;

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
    /// An AppendEntries still on its way. openraft waits one heartbeat interval for each
    /// and then sends the same entries again: a request that needs longer (a large entry,
    /// a busy disk) would be started over for ever. It runs in its own task instead, and
    /// the calls after it wait for it and count what it delivered.
    in_flight: Option<InFlight>,
}

type AppendResult =
    Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>>;

struct InFlight {
    vote: Vote<NodeId>,
    /// The last entry it carries (its `prev_log_id` for a heartbeat).
    last: Option<LogId<NodeId>>,
    /// Returns the payload buffer with the answer.
    task: tokio::task::JoinHandle<(BytesMut, AppendResult)>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        // openraft drops a connection when replication to the node ends (a new term).
        if let Some(f) = &self.in_flight {
            f.task.abort();
        }
    }
}

/// `v` in bincode, in `buf`'s reused memory where the last payload has been dropped.
fn encode_reusing<T: Serialize>(buf: &mut BytesMut, v: &T) -> Result<Bytes, bincode::Error> {
    let n = bincode::serialized_size(v)? as usize;
    buf.clear();
    buf.reserve(n);
    bincode::serialize_into((&mut *buf).writer(), v)?;
    Ok(buf.split().freeze())
}

/// How long a request of `bytes` may take once sent: at least 5 s (a follower's disk may
/// stall for longer than openraft waits, whatever the size) plus a second per megabyte (a
/// large entry on a slow link). A peer that vanished is still given up: here, or sooner by
/// the channel's keepalive.
fn transfer_timeout(base: Duration, bytes: usize) -> Duration {
    base.max(Duration::from_secs(5)) + Duration::from_micros(bytes as u64)
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, _target: NodeId, node: &BasicNode) -> Self::Network {
        Connection {
            addr: node.addr.clone(),
            client: None,
            max_rpc_bytes: self.max_rpc_bytes,
            buf: BytesMut::new(),
            in_flight: None,
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

/// One RPC: `req` in bincode, its answer decoded. A gRPC failure is `Unreachable`, after
/// which the caller drops its channel.
async fn call<Req, Resp, E>(
    client: &mut RaftClient<Channel>,
    buf: &mut BytesMut,
    which: Rpc,
    req: &Req,
    base_timeout: Duration,
) -> Result<Resp, RPCError<NodeId, BasicNode, E>>
where
    Req: Serialize,
    Resp: DeserializeOwned,
    E: std::error::Error + DeserializeOwned,
{
    let data = encode_reusing(buf, req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
    let timeout = transfer_timeout(base_timeout, data.len());
    let mut request = tonic::Request::new(RaftPayload { data });
    request.set_timeout(timeout);
    let reply = match which {
        Rpc::Append => client.append_entries(request).await,
        Rpc::Vote => client.vote(request).await,
        Rpc::Snapshot => client.install_snapshot(request).await,
    }
    .map_err(|status| RPCError::Unreachable(Unreachable::new(&status)))?
    .into_inner();
    let res: Result<Resp, E> =
        bincode::deserialize(&reply.data).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
    res.map_err(|e| RPCError::RemoteError(openraft::error::RemoteError::new(0, e)))
}

/// An AppendEntries larger than `limit` goes as consecutive ones, each valid on its own.
async fn append_in_runs(
    mut client: RaftClient<Channel>,
    mut buf: BytesMut,
    rpc: AppendEntriesRequest<TypeConfig>,
    limit: u64,
    base_timeout: Duration,
) -> (BytesMut, AppendResult) {
    let AppendEntriesRequest {
        vote,
        prev_log_id,
        leader_commit,
        entries,
    } = rpc;
    let mut runs = runs(entries, limit);
    if runs.is_empty() {
        runs.push(Vec::new()); // a heartbeat
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
        match call(&mut client, &mut buf, Rpc::Append, &req, base_timeout).await {
            Ok(AppendEntriesResponse::Success) => {
                accepted = last;
                prev = last;
            }
            // A later run refused for a conflict: the earlier runs stand.
            Ok(AppendEntriesResponse::Conflict) if accepted.is_some() => {
                return (buf, Ok(AppendEntriesResponse::PartialSuccess(accepted)));
            }
            other => return (buf, other),
        }
    }
    (buf, Ok(AppendEntriesResponse::Success))
}

/// What a request that landed earlier means for `rpc`: if the follower took entries that
/// `rpc` carries too, up to its last one or part of the way. The follower's log then equals
/// the leader's up to that entry (same index and term, same leader), so openraft can count
/// it and send only the rest. openraft dates the acknowledgement from the later call, not
/// from when the request left; Sluice reads that time only to decide whether to propose
/// (`enqueue::quorum_recent`), never to answer a read.
fn landed_covers(
    f_vote: &Vote<NodeId>,
    f_last: Option<LogId<NodeId>>,
    res: &AppendResult,
    rpc: &AppendEntriesRequest<TypeConfig>,
) -> Option<AppendEntriesResponse<NodeId>> {
    let matching = match res {
        Ok(AppendEntriesResponse::Success) => f_last?,
        Ok(AppendEntriesResponse::PartialSuccess(m)) => (*m)?,
        _ => return None,
    };
    if *f_vote != rpc.vote || rpc.prev_log_id.is_some_and(|p| p.index >= matching.index) {
        return None;
    }
    let first = rpc.entries.first()?.log_id.index;
    let at = rpc
        .entries
        .get(matching.index.checked_sub(first)? as usize)?;
    if at.log_id != matching {
        return None;
    }
    Some(if rpc.entries.last().map(|e| e.log_id) == Some(matching) {
        AppendEntriesResponse::Success
    } else {
        AppendEntriesResponse::PartialSuccess(Some(matching))
    })
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
        let mut client = self.client().await.map_err(RPCError::Unreachable)?.clone();
        let res = call(&mut client, &mut self.buf, which, req, option.hard_ttl()).await;
        if let Err(RPCError::Unreachable(_)) = &res {
            self.client = None;
        }
        res
    }

    /// Waits for the request in flight (this call may be dropped meanwhile; the request
    /// stays in flight) and takes back its buffer.
    async fn finish_in_flight(&mut self) -> Option<(InFlight, AppendResult)> {
        let f = self.in_flight.as_mut()?;
        let joined = (&mut f.task).await;
        let f = self.in_flight.take()?;
        let res = match joined {
            Ok((buf, res)) => {
                self.buf = buf;
                res
            }
            Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
        };
        if let Err(RPCError::Unreachable(_)) = &res {
            self.client = None;
        }
        Some((f, res))
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
    ) -> AppendResult {
        if self.in_flight.is_some() && rpc.entries.is_empty() {
            // A heartbeat goes beside a long transfer, not behind it: it carries nothing,
            // and without it the follower would call an election.
            let mut client = self.client().await.map_err(RPCError::Unreachable)?.clone();
            let mut buf = BytesMut::new();
            return call(&mut client, &mut buf, Rpc::Append, &rpc, option.hard_ttl()).await;
        }
        if let Some((f, res)) = self.finish_in_flight().await
            && let Some(covered) = landed_covers(&f.vote, f.last, &res, &rpc)
        {
            return Ok(covered);
        }
        // Leave room for the request's other fields.
        let limit = self.max_rpc_bytes.saturating_sub(1 << 20).max(1);
        let client = self.client().await.map_err(RPCError::Unreachable)?.clone();
        let last = rpc.entries.last().map(|e| e.log_id).or(rpc.prev_log_id);
        let vote = rpc.vote;
        let task = tokio::spawn(append_in_runs(
            client,
            std::mem::take(&mut self.buf),
            rpc,
            limit,
            option.hard_ttl(),
        ));
        self.in_flight = Some(InFlight { vote, last, task });
        let (_, res) = self
            .finish_in_flight()
            .await
            .expect("the request just started");
        res
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
    use std::sync::Arc;

    fn id(term: u64, index: u64) -> LogId<NodeId> {
        LogId::new(openraft::CommittedLeaderId::new(term, 1), index)
    }

    /// An AppendEntries from leader 1 in `term` with entries `from..=to`.
    fn append(term: u64, from: u64, to: u64) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(term, 1),
            prev_log_id: (from > 1).then(|| id(term, from - 1)),
            leader_commit: None,
            entries: (from..=to)
                .map(|i| Entry {
                    log_id: id(term, i),
                    payload: openraft::EntryPayload::Blank,
                })
                .collect(),
        }
    }

    #[test]
    fn a_request_that_landed_late_counts_for_the_entries_it_shares_with_the_next() {
        use AppendEntriesResponse::*;
        let vote = Vote::new_committed(2, 1);
        let ok: AppendResult = Ok(Success);
        // It carried 1..=5; openraft now asks for 1..=8: 5 is matched, the rest follows.
        assert_eq!(
            landed_covers(&vote, Some(id(2, 5)), &ok, &append(2, 1, 8)),
            Some(PartialSuccess(Some(id(2, 5))))
        );
        assert_eq!(
            landed_covers(&vote, Some(id(2, 5)), &ok, &append(2, 3, 5)),
            Some(Success)
        );
        // Part of it was taken before a conflict.
        let partial: AppendResult = Ok(PartialSuccess(Some(id(2, 3))));
        assert_eq!(
            landed_covers(&vote, Some(id(2, 5)), &partial, &append(2, 1, 8)),
            Some(PartialSuccess(Some(id(2, 3))))
        );
        // Nothing to count: already known, not in this request, another entry at that
        // index, another leader, or a request that did not succeed.
        assert_eq!(
            landed_covers(&vote, Some(id(2, 5)), &ok, &append(2, 6, 8)),
            None
        );
        assert_eq!(
            landed_covers(&vote, Some(id(2, 9)), &ok, &append(2, 1, 8)),
            None
        );
        assert_eq!(
            landed_covers(&vote, Some(id(1, 5)), &ok, &append(2, 1, 8)),
            None
        );
        let other = Vote::new_committed(3, 1);
        assert_eq!(
            landed_covers(&other, Some(id(2, 5)), &ok, &append(2, 1, 8)),
            None
        );
        let conflict: AppendResult = Ok(Conflict);
        assert_eq!(
            landed_covers(&vote, Some(id(2, 5)), &conflict, &append(2, 1, 8)),
            None
        );
        let lost: AppendResult = Err(RPCError::Unreachable(Unreachable::new(
            &std::io::Error::other("reset"),
        )));
        assert_eq!(
            landed_covers(&vote, Some(id(2, 5)), &lost, &append(2, 1, 8)),
            None
        );
    }

    /// A follower over real gRPC whose appends of entries take `delay` (a slow link or
    /// disk) while a heartbeat is answered at once; it counts the appends it received.
    struct SlowFollower {
        delay: Duration,
        appends: Arc<std::sync::atomic::AtomicUsize>,
    }

    #[tonic::async_trait]
    impl sluice_proto::raft::raft_server::Raft for SlowFollower {
        async fn append_entries(
            &self,
            req: tonic::Request<RaftPayload>,
        ) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
            let rpc: AppendEntriesRequest<TypeConfig> =
                bincode::deserialize(&req.get_ref().data).unwrap();
            if !rpc.entries.is_empty() {
                self.appends
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(self.delay).await;
            }
            let ok: Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> =
                Ok(AppendEntriesResponse::Success);
            Ok(tonic::Response::new(RaftPayload {
                data: bincode::serialize(&ok).unwrap().into(),
            }))
        }
        async fn vote(
            &self,
            _: tonic::Request<RaftPayload>,
        ) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
            Err(tonic::Status::unimplemented("vote"))
        }
        async fn install_snapshot(
            &self,
            _: tonic::Request<RaftPayload>,
        ) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
            Err(tonic::Status::unimplemented("install_snapshot"))
        }
    }

    #[tokio::test]
    async fn an_append_openraft_gave_up_on_lands_once_and_a_heartbeat_passes_beside_it() {
        use std::sync::atomic::Ordering;
        let appends = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let follower = SlowFollower {
            delay: Duration::from_secs(2),
            appends: appends.clone(),
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(sluice_proto::raft::raft_server::RaftServer::new(follower))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let mut conn = Network::new(64 << 20)
            .new_client(2, &BasicNode { addr })
            .await;
        let wait = Duration::from_millis(50);
        let option = RPCOption::new(wait);
        // openraft stops waiting, as it does after one heartbeat interval.
        let first =
            tokio::time::timeout(wait, conn.append_entries(append(2, 1, 3), option.clone()));
        assert!(first.await.is_err(), "the follower takes 2 s");
        // A heartbeat is answered while the entries are still on their way.
        let mut beat = append(2, 1, 3);
        beat.entries.clear();
        let beat = tokio::time::timeout(
            Duration::from_secs(1),
            conn.append_entries(beat, option.clone()),
        );
        assert_eq!(
            beat.await.expect("not behind the append").unwrap(),
            AppendEntriesResponse::Success
        );
        // openraft asks again, with more entries: it is told what the first request
        // delivered, and nothing was sent twice.
        let again = tokio::time::timeout(
            Duration::from_secs(10),
            conn.append_entries(append(2, 1, 5), option),
        );
        assert_eq!(
            again.await.unwrap().unwrap(),
            AppendEntriesResponse::PartialSuccess(Some(id(2, 3)))
        );
        assert_eq!(appends.load(Ordering::SeqCst), 1);
    }

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
