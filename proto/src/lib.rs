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
pub mod codec;
pub mod tls;

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

/// The TLS this process uses to reach controllers (None: plaintext). Set once at start.
static CLIENT_TLS: std::sync::OnceLock<Option<tls::TlsFiles>> = std::sync::OnceLock::new();

/// Sets the certificate files every connection to a controller uses from now on.
pub fn use_client_tls(files: Option<tls::TlsFiles>) {
    let _ = CLIENT_TLS.set(files);
}

/// Takes this node's certificate files (from its settings) for every connection it makes,
/// after checking that the certificate names `role`.
pub fn use_tls_as(
    files: Option<(std::path::PathBuf, std::path::PathBuf, std::path::PathBuf)>,
    role: tls::Role,
) -> Result<(), String> {
    let files = tls::TlsFiles::from_paths(files);
    if let Some(t) = &files {
        let id = t.identity()?;
        if id.role != role {
            return Err(format!(
                "{}: a {role} needs a {role} certificate, not a {} one ({})",
                t.cert.display(),
                id.role,
                id.name
            ));
        }
    }
    use_client_tls(files);
    Ok(())
}

pub fn client_tls() -> Option<&'static tls::TlsFiles> {
    CLIENT_TLS.get().and_then(|t| t.as_ref())
}

/// The certificate files this node must still read after dropping root (it reloads them).
pub fn own_tls_paths() -> Vec<&'static std::path::Path> {
    client_tls()
        .map(|t| vec![t.ca.as_path(), t.cert.as_path(), t.key.as_path()])
        .unwrap_or_default()
}

/// Why a channel could not be opened.
#[derive(Debug)]
pub struct ConnectError(pub String);

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConnectError {}

/// Opens a channel to a controller's gRPC address (`host:port`): with mutual TLS when this
/// process has certificates (the controller must present a controller certificate naming
/// that host), else plaintext.
pub async fn connect(addr: &str) -> Result<tonic::transport::Channel, ConnectError> {
    connect_within(addr, std::time::Duration::from_secs(2)).await
}

/// As `connect`, giving up on the TCP connection after `timeout`.
pub async fn connect_within(
    addr: &str,
    timeout: std::time::Duration,
) -> Result<tonic::transport::Channel, ConnectError> {
    connect_as(addr, timeout, client_tls()).await
}

/// As `connect_within`, with these certificates (or none) rather than the process's.
pub async fn connect_as(
    addr: &str,
    timeout: std::time::Duration,
    files: Option<&tls::TlsFiles>,
) -> Result<tonic::transport::Channel, ConnectError> {
    let host = addr
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    let err = |e: &dyn std::fmt::Display| ConnectError(format!("{addr}: {e}"));
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{host}"))
        .map_err(|e| err(&e))?
        .connect_timeout(timeout)
        .tcp_nodelay(true)
        // A peer that vanished without closing (a host killed or cut off) fails the channel's
        // calls within seconds rather than when TCP gives up, minutes later.
        // Not shorter: a ping queued behind a large entry on a slow link, or sent to a node
        // stalled for a moment, must not tear a working connection down.
        .http2_keep_alive_interval(std::time::Duration::from_secs(5))
        .keep_alive_timeout(std::time::Duration::from_secs(10))
        .keep_alive_while_idle(true);
    match files {
        None => endpoint.connect().await.map_err(|e| err(&e)),
        Some(files) => {
            // Checked here so that a broken file is reported at once, not as a retry loop.
            tls::client_config(files, tls::Role::Controller).map_err(|e| err(&e))?;
            endpoint
                .connect_with_connector(tls::connector(
                    files.clone(),
                    tls::Role::Controller,
                    timeout,
                ))
                .await
                .map_err(|e| err(&e))
        }
    }
}

/// Fetches the served policy, from the leader when there is one (a follower names it; without
/// a leader, any controller answers): `Ok(None)` when the caller already has version `have`,
/// else the version and its JSON. `asker` names the caller (for the leader's status) and the
/// view it needs.
pub async fn fetch_policy_json(
    controllers: &[String],
    have: u64,
    asker: &queue::PolicyRequest,
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
                ..asker.clone()
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
    asker: &queue::PolicyRequest,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<(u64, T)>, String> {
    match fetch_policy_json(controllers, have, asker).await? {
        Some((v, json)) => Ok(Some((v, parse(&json)?))),
        None => Ok(None),
    }
}
