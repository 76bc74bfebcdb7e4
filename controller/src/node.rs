//! A controller process: RocksDB, the Raft node, and the gRPC services on one port.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use openraft::{BasicNode, Config, SnapshotPolicy};
use sluice_common::policy::{self, LoadOptions, Policy};
use sluice_common::settings::Settings;
use tonic::Status;

use crate::enqueue::Batcher;
use crate::raft::network::Network;
use crate::raft::store::{LogStore, StateMachineStore, open_db};
use crate::raft::{NodeId, Raft};

/// The loaded policy and its version, as served to ingress nodes and workers.
pub struct ServedPolicy {
    pub version: u64,
    pub policy: Arc<Policy>,
    pub json: String,
    /// Headers the accounting files record, taken from each message at enqueue.
    pub acct_headers: Vec<String>,
}

pub struct Controller {
    pub id: NodeId,
    pub addr: String,
    pub raft: Raft,
    pub sm: StateMachineStore,
    pub settings: Settings,
    pub policy: RwLock<Arc<ServedPolicy>>,
    pub batcher: Batcher,
    /// Ingress nodes and workers that asked for the policy: (version, when in ms).
    pub peers: std::sync::Mutex<std::collections::HashMap<String, (u64, u64)>>,
}

/// How far `sluice debug advance-clock` moved this process's clock (tests only).
static CLOCK_OFFSET_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Moves this controller's clock forward. Every command the leader proposes carries its time,
/// so the whole cluster's schedules follow the leader's clock.
pub fn advance_clock(ms: u64) -> u64 {
    CLOCK_OFFSET_MS.fetch_add(ms, std::sync::atomic::Ordering::SeqCst);
    now_ms()
}

/// The controller's clock: wall time, plus any test offset.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
        + CLOCK_OFFSET_MS.load(std::sync::atomic::Ordering::SeqCst)
}

/// Loads and serves a policy file. Its version is a digest of the resolved policy, so every
/// controller that reads the same file serves the same version, across restarts and leader
/// changes.
pub fn load_policy(path: &std::path::Path) -> Result<(ServedPolicy, Vec<String>), String> {
    use sha2::Digest;
    let loaded = policy::load(path, LoadOptions::default()).map_err(|e| e.to_string())?;
    let json = serde_json::to_string(&loaded.policy).map_err(|e| e.to_string())?;
    let digest = sha2::Sha256::digest(json.as_bytes());
    let version = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes")).max(1);
    let warnings = loaded.warnings.iter().map(|w| w.to_string()).collect();
    Ok((
        ServedPolicy {
            acct_headers: loaded.policy.acct_headers(),
            version,
            policy: Arc::new(loaded.policy),
            json,
        },
        warnings,
    ))
}

impl Controller {
    pub async fn start(settings: Settings) -> anyhow::Result<Arc<Controller>> {
        std::fs::create_dir_all(&settings.data_dir)
            .with_context(|| format!("creating {}", settings.data_dir.display()))?;
        let (served, warnings) = load_policy(&settings.policy).map_err(|e| {
            anyhow::anyhow!(
                "the policy {} does not load:\n{e}",
                settings.policy.display()
            )
        })?;
        for w in warnings {
            tracing::warn!("{w}");
        }
        let db = open_db(&settings.data_dir.join("raft")).context("opening RocksDB")?;
        let log = LogStore::new(db.clone());
        let sm = StateMachineStore::new(db, &settings.data_dir)
            .map_err(|e| anyhow::anyhow!("loading the queue state: {e}"))?;
        let r = &settings.raft;
        let config = Config {
            cluster_name: "sluice".into(),
            heartbeat_interval: r.heartbeat_ms,
            election_timeout_min: r.election_min_ms,
            election_timeout_max: r.election_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(r.snapshot_after_entries),
            max_in_snapshot_log_to_keep: r.keep_entries,
            purge_batch_size: 256,
            max_payload_entries: 64,
            snapshot_max_chunk_size: 4 << 20,
            install_snapshot_timeout: 10_000,
            ..Default::default()
        }
        .validate()
        .context("invalid raft settings")?;
        let raft = Raft::new(settings.node_id, Arc::new(config), Network, log, sm.clone())
            .await
            .context("starting raft")?;
        let batcher = Batcher::start(
            raft.clone(),
            settings.raft.max_batch,
            Duration::from_millis(settings.raft.commit_timeout_ms),
            Duration::from_millis(settings.raft.election_min_ms),
        );
        Ok(Arc::new(Controller {
            id: settings.node_id,
            addr: settings.advertise(),
            raft,
            sm,
            policy: RwLock::new(Arc::new(served)),
            settings,
            batcher,
            peers: Default::default(),
        }))
    }

    pub fn policy(&self) -> Arc<ServedPolicy> {
        self.policy.read().unwrap().clone()
    }

    /// The leader's address when this node is not the leader, as a gRPC error to follow.
    pub fn not_leader(&self) -> Option<Status> {
        let m = self.raft.metrics().borrow().clone();
        if m.current_leader == Some(self.id) {
            return None;
        }
        let leader = m.current_leader.and_then(|l| {
            m.membership_config
                .membership()
                .get_node(&l)
                .map(|n| n.addr.clone())
        });
        let mut st = Status::unavailable(match &leader {
            Some(a) => format!("not the leader; the leader is {a}"),
            None => "no leader is elected at the moment".to_string(),
        });
        if let Some(a) = leader
            && let Ok(v) = a.parse()
        {
            st.metadata_mut().insert(sluice_proto::LEADER_METADATA, v);
        }
        Some(st)
    }

    pub async fn init(&self, members: BTreeMap<u64, String>) -> Result<(), Status> {
        let members: BTreeMap<NodeId, BasicNode> = if members.is_empty() {
            [(
                self.id,
                BasicNode {
                    addr: self.addr.clone(),
                },
            )]
            .into()
        } else {
            members
                .into_iter()
                .map(|(k, v)| (k, BasicNode { addr: v }))
                .collect()
        };
        self.raft
            .initialize(members)
            .await
            .map_err(|e| Status::failed_precondition(e.to_string()))
    }
}

/// Serves every controller API on the node's gRPC address until `shutdown` resolves.
pub async fn serve(
    ctl: Arc<Controller>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    use sluice_proto::admin::admin_server::AdminServer;
    use sluice_proto::queue::queue_server::QueueServer;
    use sluice_proto::raft::raft_server::RaftServer;
    let addr = ctl.settings.grpc_listen;
    let raft_svc = RaftServer::new(crate::raft::service::RaftService {
        raft: ctl.raft.clone(),
    })
    .max_decoding_message_size(1 << 30)
    .max_encoding_message_size(1 << 30);
    let queue_svc = QueueServer::new(crate::enqueue::QueueService { ctl: ctl.clone() })
        .max_decoding_message_size(256 << 20);
    let sched = crate::scheduler::Scheduler::new(ctl.clone());
    tokio::spawn(crate::acct::export_loop(ctl.clone()));
    let admin_svc = AdminServer::new(crate::admin::AdminService {
        ctl: ctl.clone(),
        sched: sched.clone(),
    });
    let lease_svc =
        sluice_proto::lease::leases_server::LeasesServer::new(crate::scheduler::LeaseService {
            sched,
        })
        .max_encoding_message_size(256 << 20);
    tracing::info!(node = ctl.id, %addr, "controller listening");
    tonic::transport::Server::builder()
        .add_service(raft_svc)
        .add_service(queue_svc)
        .add_service(admin_svc)
        .add_service(lease_svc)
        .serve_with_shutdown(addr, shutdown)
        .await
        .context("gRPC server")?;
    let _ = ctl.raft.shutdown().await;
    Ok(())
}
