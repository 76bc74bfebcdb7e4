//! A controller process: RocksDB, the Raft node, the loaded policy, and what every service
//! shares. The services themselves are wired in `server`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};

use anyhow::Context;
use openraft::{BasicNode, Config, SnapshotPolicy};
use rocksdb::DB;
use sluice_common::policy::{self, LoadOptions, Policy};
use sluice_common::settings::Settings;
use tonic::Status;

use crate::acct::Zone;
use crate::clock::now_ms;
use crate::disk::DiskGuard;
use crate::queue::layout::{open_db, open_log};
use crate::queue::state::QueueState;
use crate::raft::network::Network;
use crate::raft::store::{LogStore, StateMachineStore};
use crate::raft::{NodeId, Raft};

/// The loaded policy and its version, as served to ingress nodes and workers.
pub struct ServedPolicy {
    pub version: u64,
    pub policy: Arc<Policy>,
    /// What an ingress node is served: password hashes, no DKIM key (made once per load, as
    /// hashing costs).
    pub ingress_json: String,
    /// Headers the accounting files record, taken from each message at enqueue.
    pub acct_headers: Vec<String>,
}

/// The most ingress nodes and workers listed in `show status`.
const MAX_PEERS: usize = 1000;

pub struct Controller {
    pub id: NodeId,
    pub addr: String,
    pub raft: Raft,
    pub db: Arc<DB>,
    /// The queue state machine's in-memory state (index, ledger, leases).
    pub state: Arc<Mutex<QueueState>>,
    pub log: LogStore,
    pub settings: Settings,
    pub policy: RwLock<Arc<ServedPolicy>>,
    /// Ingress nodes and workers that asked for the policy: (version, when in ms).
    peers: Mutex<HashMap<String, (u64, u64)>>,
    pub acct_zone: Zone,
    pub disk: DiskGuard,
    pub gate: crate::auth::Gate,
    /// Counts of the replicated accounting rows (`crate::traffic`).
    pub traffic: Arc<crate::traffic::Traffic>,
}

/// Loads and serves a policy file. Its version is a digest of the resolved policy, so every
/// controller that reads the same file serves the same version, across restarts and leader
/// changes.
pub fn load_policy(path: &std::path::Path) -> Result<(ServedPolicy, Vec<String>), String> {
    use sha2::Digest;
    let loaded = policy::load(path, LoadOptions::default()).map_err(|e| e.to_string())?;
    let json = serde_json::to_string(&loaded.policy).map_err(|e| e.to_string())?;
    let ingress_json =
        serde_json::to_string(&loaded.policy.for_ingress()).map_err(|e| e.to_string())?;
    let digest = sha2::Sha256::digest(json.as_bytes());
    let version = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes")).max(1);
    let warnings = loaded.warnings.iter().map(|w| w.to_string()).collect();
    Ok((
        ServedPolicy {
            acct_headers: loaded.policy.acct_headers(),
            version,
            policy: Arc::new(loaded.policy),
            ingress_json,
        },
        warnings,
    ))
}

impl Controller {
    pub async fn start(settings: Settings) -> anyhow::Result<Arc<Controller>> {
        let settings_tls = settings
            .check_transport(&[settings.grpc_listen.to_string(), settings.advertise()])
            .map_err(anyhow::Error::msg)?;
        sluice_proto::use_tls_as(
            settings.tls.files().map_err(anyhow::Error::msg)?,
            sluice_proto::tls::Role::Controller,
        )
        .map_err(anyhow::Error::msg)?;
        sluice_common::privilege::private_dir(&settings.data_dir)
            .with_context(|| format!("creating {}", settings.data_dir.display()))?;
        let acct_zone = Zone::parse(&settings.accounting.time_zone)
            .map_err(|e| anyhow::anyhow!("settings: accounting.time_zone: {e}"))?;
        let (served, warnings) = load_policy(&settings.policy).map_err(|e| {
            anyhow::anyhow!(
                "the policy {} does not load:\n{e}",
                settings.policy.display()
            )
        })?;
        for w in warnings {
            tracing::warn!("{w}");
        }
        let g = &served.policy.global;
        let mut readable = sluice_proto::own_tls_paths();
        readable.push(settings.policy.as_path());
        sluice_common::privilege::drop_privileges(
            g.process_user.as_deref(),
            g.run_as_root == Some(true),
            &[settings.data_dir.as_path()],
            &readable,
        )
        .map_err(anyhow::Error::msg)?;
        let db = open_db(&settings.data_dir.join("raft")).context("opening RocksDB")?;
        let log_files = open_log(&db, &settings.data_dir.join("raft-log"))
            .map_err(|e| anyhow::anyhow!("opening the Raft log: {e}"))?;
        let sm = StateMachineStore::new(db.clone(), log_files.clone(), &settings.data_dir)
            .map_err(|e| anyhow::anyhow!("loading the queue state: {e}"))?;
        let state = sm.state.clone();
        let log = LogStore::new(db.clone(), log_files, state.clone());
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
        let network = Network::new(settings.raft.max_rpc_bytes());
        let raft = Raft::new(settings.node_id, Arc::new(config), network, log.clone(), sm)
            .await
            .context("starting raft")?;
        let disk = DiskGuard::new(&settings.data_dir, settings.raft.min_free_disk_bytes);
        let traffic = crate::traffic::Traffic::new(settings.metrics.top_queues);
        tokio::spawn(crate::traffic::follow(db.clone(), traffic.clone()));
        let ctl = Arc::new(Controller {
            traffic,
            id: settings.node_id,
            addr: settings.advertise(),
            raft,
            db,
            state,
            log,
            policy: RwLock::new(Arc::new(served)),
            settings,
            peers: Default::default(),
            acct_zone,
            disk,
            gate: crate::auth::Gate { tls: settings_tls },
        });
        tokio::spawn(exit_on_fatal(ctl.raft.clone()));
        Ok(ctl)
    }

    pub fn policy(&self) -> Arc<ServedPolicy> {
        self.policy.read().unwrap().clone()
    }

    /// Ok on the leader; otherwise the error to answer with, naming the leader's address in
    /// `x-sluice-leader` when one is known.
    pub fn leader_only(&self) -> Result<(), Status> {
        let m = self.raft.metrics().borrow().clone();
        if m.current_leader == Some(self.id) {
            return Ok(());
        }
        let leader = m.current_leader.and_then(|l| {
            m.membership_config
                .membership()
                .get_node(&l)
                .map(|n| n.addr.clone())
        });
        Err(sluice_proto::not_leader(leader.as_deref()))
    }

    /// The leader has applied an entry of its own term, so everything its predecessors
    /// committed (their leases among it) is in its state: only then may it spend budgets.
    pub fn leader_ready(&self) -> bool {
        let m = self.raft.metrics().borrow().clone();
        m.current_leader == Some(self.id)
            && m.last_applied
                .is_some_and(|l| l.leader_id.term == m.current_term)
    }

    /// Records which policy version an ingress node or worker runs.
    pub fn note_peer(&self, node: &str, version: u64) {
        let mut p = self.peers.lock().unwrap();
        if p.len() >= MAX_PEERS && !p.contains_key(node) {
            // Forget the one heard from longest ago.
            if let Some(old) = p.iter().min_by_key(|(_, v)| v.1).map(|(k, _)| k.clone()) {
                p.remove(&old);
            }
        }
        p.insert(node.to_string(), (version, now_ms()));
    }

    pub fn peers(&self) -> Vec<(String, u64, u64)> {
        let mut v: Vec<_> = self
            .peers
            .lock()
            .unwrap()
            .iter()
            .map(|(n, (ver, seen))| (n.clone(), *ver, *seen))
            .collect();
        v.sort();
        v
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

/// A storage error stops openraft for good. The process then exits, so that its supervisor
/// restarts it and the state is rebuilt from disk, rather than serving on as a node that can
/// never apply again.
async fn exit_on_fatal(raft: Raft) {
    let mut rx = raft.metrics();
    loop {
        match &rx.borrow().running_state {
            Err(openraft::error::Fatal::Stopped) => return,
            Err(e) => {
                tracing::error!("raft stopped: {e}; exiting so that a restart recovers from disk");
                std::process::exit(70);
            }
            Ok(()) => {}
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}
