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

/// Metadata key with which a follower names the leader's gRPC address.
pub const LEADER_METADATA: &str = "x-sluice-leader";

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

/// Fetches the served policy from the first controller that answers (followers serve it too):
/// `Ok(None)` when the caller already has version `have`, else the version and its JSON.
pub async fn fetch_policy_json(
    controllers: &[String],
    have: u64,
) -> Result<Option<(u64, String)>, String> {
    let mut last = "no controller configured".to_string();
    for addr in controllers {
        let ch = match connect(addr).await {
            Ok(c) => c,
            Err(e) => {
                last = format!("{addr}: {e}");
                continue;
            }
        };
        let mut client =
            queue::queue_client::QueueClient::new(ch).max_decoding_message_size(64 << 20);
        match client
            .get_policy(queue::PolicyRequest { have_version: have })
            .await
        {
            Ok(r) => {
                let r = r.into_inner();
                return Ok((!r.policy_json.is_empty()).then_some((r.version, r.policy_json)));
            }
            Err(e) => last = format!("{addr}: {}", e.message()),
        }
    }
    Err(last)
}
