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
