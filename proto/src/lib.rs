//! gRPC APIs between Sluice's roles, generated from `proto/*.proto`.

pub mod raft {
    tonic::include_proto!("sluice.raft");
}
pub mod queue {
    tonic::include_proto!("sluice.queue");
}
pub mod lease {
    tonic::include_proto!("sluice.lease");
}
pub mod admin {
    tonic::include_proto!("sluice.admin");
}

pub mod client;

pub use client::LeaderClient;

/// Metadata key with which a follower names the leader's gRPC address.
pub const LEADER_METADATA: &str = "x-sluice-leader";
/// Metadata key naming why a controller could not take a request that another attempt may
/// succeed with: `not-leader` or `no-quorum`.
pub const RETRY_METADATA: &str = "x-sluice-retry";

/// The answer of a controller that is not the leader, naming the leader when it knows it.
pub fn not_leader(leader: Option<&str>) -> tonic::Status {
    let mut st = tonic::Status::unavailable(match leader {
        Some(a) => format!("not the leader; the leader is {a}"),
        None => "no leader is elected at the moment".to_string(),
    });
    st.metadata_mut().insert(
        RETRY_METADATA,
        tonic::metadata::MetadataValue::from_static("not-leader"),
    );
    if let Some(v) = leader.and_then(|a| a.parse().ok()) {
        st.metadata_mut().insert(LEADER_METADATA, v);
    }
    st
}

/// The answer of a leader that has not heard from a majority recently: nothing was proposed.
pub fn no_quorum() -> tonic::Status {
    let mut st =
        tonic::Status::unavailable("no majority of controllers is reachable; nothing was queued");
    st.metadata_mut().insert(
        RETRY_METADATA,
        tonic::metadata::MetadataValue::from_static("no-quorum"),
    );
    st
}

/// The leader's address named by a follower's error, if any.
pub fn leader_hint(status: &tonic::Status) -> Option<String> {
    status
        .metadata()
        .get(LEADER_METADATA)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Opens a channel to a controller's gRPC address (`host:port`).
pub async fn connect(addr: &str) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let uri = if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    tonic::transport::Endpoint::from_shared(uri)?
        .connect_timeout(std::time::Duration::from_secs(2))
        .tcp_nodelay(true)
        .connect()
        .await
}

/// Fetches the served policy, from the leader when there is one (a follower names it; without
/// a leader, any controller answers): `Ok(None)` when the caller already has version `have`,
/// else the version and its JSON. `node` names the caller in the leader's status.
pub async fn fetch_policy_json(
    controllers: &[String],
    have: u64,
    node: &str,
) -> Result<Option<(u64, String)>, String> {
    let mut last = "no controller configured".to_string();
    // The leader serves the policy (and so learns every node's version); followers name it.
    let mut targets: Vec<String> = controllers.to_vec();
    let mut i = 0;
    while i < targets.len() && i < controllers.len() + 3 {
        let addr = targets[i].clone();
        i += 1;
        let ch = match connect(&addr).await {
            Ok(c) => c,
            Err(e) => {
                last = format!("{addr}: {e}");
                continue;
            }
        };
        let mut client =
            queue::queue_client::QueueClient::new(ch).max_decoding_message_size(64 << 20);
        match client
            .get_policy(queue::PolicyRequest {
                have_version: have,
                node: node.to_string(),
            })
            .await
        {
            Ok(r) => {
                let r = r.into_inner();
                return Ok((!r.policy_json.is_empty()).then_some((r.version, r.policy_json)));
            }
            Err(e) => {
                if let Some(l) = leader_hint(&e) {
                    targets.insert(i, l);
                }
                last = format!("{addr}: {}", e.message());
            }
        }
    }
    Err(last)
}

/// `fetch_policy_json`, parsed with `parse` (ingress and workers parse it into their policy).
pub async fn fetch_policy<T>(
    controllers: &[String],
    have: u64,
    node: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<(u64, T)>, String> {
    match fetch_policy_json(controllers, have, node).await? {
        Some((v, json)) => Ok(Some((v, parse(&json)?))),
        None => Ok(None),
    }
}
