//! Node settings: who this node is and where it listens. Not policy. Read from a TOML file
//! (`--settings`), then `SLUICE_*` environment variables (`__` separates sections, as in
//! `SLUICE_RAFT__HEARTBEAT_MS`), then command-line flags. Unknown keys are errors.
//! Every key is documented in docs/settings.md.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Raft node id of a controller (1, 2, 3, ...). Unique in the cluster.
    pub node_id: u64,
    /// Folder for this node's state (RocksDB for controllers, accounting files).
    pub data_dir: PathBuf,
    /// Controller: address the gRPC server (Raft, queue, leases, admin) listens on.
    pub grpc_listen: SocketAddr,
    /// Controller: address other nodes use to reach it; defaults to `grpc_listen`.
    pub advertise_addr: Option<String>,
    /// Ingress, worker and CLI: controller gRPC addresses; any member will do, followers
    /// point at the leader.
    pub controllers: Vec<String>,
    /// Controller: the policy file (PowerMTA syntax) it loads and serves.
    pub policy: PathBuf,
    pub tls: TlsSettings,
    pub raft: RaftSettings,
    pub scheduler: SchedulerSettings,
    pub accounting: AccountingSettings,
    pub ingress: IngressSettings,
    pub worker: WorkerSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            node_id: 1,
            data_dir: PathBuf::from("./data"),
            grpc_listen: "127.0.0.1:7400".parse().unwrap(),
            advertise_addr: None,
            controllers: vec!["127.0.0.1:7400".to_string()],
            policy: PathBuf::from("deploy/examples/sluice.conf"),
            tls: TlsSettings::default(),
            raft: RaftSettings::default(),
            scheduler: SchedulerSettings::default(),
            accounting: AccountingSettings::default(),
            ingress: IngressSettings::default(),
            worker: WorkerSettings::default(),
        }
    }
}

/// TLS for gRPC between nodes. All three set: mutual TLS; none set: plaintext (loopback or a
/// private network only).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSettings {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RaftSettings {
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    /// Take a snapshot (and compact the log) after this many applied entries.
    pub snapshot_after_entries: u64,
    /// Keep this many entries in the log behind the last snapshot.
    pub keep_entries: u64,
    /// How long an enqueue waits for a majority before it fails.
    pub commit_timeout_ms: u64,
    /// Messages grouped into one Raft entry stop at this many bytes. A message larger than
    /// this goes alone in its own entry.
    pub max_entry_bytes: u64,
    /// The largest message a controller takes; a larger one is refused at enqueue.
    pub max_message_bytes: u64,
    /// Below this much free space on the data folder's disk, new mail is refused (ingress
    /// answers 452 4.3.1) while queued mail is still delivered.
    pub min_free_disk_bytes: u64,
}

impl Default for RaftSettings {
    fn default() -> Self {
        RaftSettings {
            heartbeat_ms: 100,
            election_min_ms: 500,
            election_max_ms: 1000,
            snapshot_after_entries: 20_000,
            keep_entries: 1_000,
            commit_timeout_ms: 5_000,
            max_entry_bytes: 16 << 20,
            max_message_bytes: 64 << 20,
            min_free_disk_bytes: 256 << 20,
        }
    }
}

impl RaftSettings {
    /// The largest gRPC message between nodes: one entry's worth, or one message alone, with
    /// room for the envelope.
    pub fn max_rpc_bytes(&self) -> u64 {
        self.max_entry_bytes.max(self.max_message_bytes) + (4 << 20)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AccountingSettings {
    /// The zone accounting times are written in: `UTC`, an offset such as `+02:00`, or
    /// `local` (then replicas in different zones write different files). Use the same on
    /// every controller.
    pub time_zone: String,
}

impl Default for AccountingSettings {
    fn default() -> Self {
        AccountingSettings {
            time_zone: "UTC".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerSettings {
    /// A lease with no word from its worker for this long ends, and its messages become ready.
    pub lease_ttl_ms: u64,
    /// Messages handed out per lease request (the worker asks for more on the same connection).
    pub batch: u32,
    /// Jitter added to retry waits, as a share of the wait (0.1 = up to 10% more).
    pub retry_jitter: f64,
    /// Lets `sluice debug advance-clock` move this controller's clock forward, so that retry
    /// schedules of hours are tested in seconds. Never for production.
    pub allow_clock_control: bool,
}

impl Default for SchedulerSettings {
    fn default() -> Self {
        SchedulerSettings {
            lease_ttl_ms: 30_000,
            batch: 50,
            retry_jitter: 0.1,
            allow_clock_control: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct IngressSettings {
    /// Name of this ingress node in Received headers and accounting (`srcMta`).
    pub name: String,
    /// SMTP listen addresses; when both this and `smtps_listen` are empty, the policy's
    /// `smtp-listener` lines apply.
    pub smtp_listen: Vec<SocketAddr>,
    /// Implicit-TLS (SMTPS) listen addresses: TLS from the first byte.
    pub smtps_listen: Vec<SocketAddr>,
    /// HTTP injection listen address; when unset, the policy's `http-mgmt-port` on 127.0.0.1.
    pub http_listen: Option<SocketAddr>,
}

impl Default for IngressSettings {
    fn default() -> Self {
        IngressSettings {
            name: "sluice-ingress".into(),
            smtp_listen: Vec::new(),
            smtps_listen: Vec::new(),
            http_listen: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerSettings {
    /// Name of this worker in logs and leases.
    pub name: String,
    /// Source IPs this worker owns. Each must be an address of this host.
    pub source_ips: Vec<IpAddr>,
    /// Concurrent outbound connections this worker runs at most.
    pub capacity: u32,
    /// DNS servers for MX lookups (`IP:PORT`); empty means the system resolver.
    pub dns_servers: Vec<SocketAddr>,
    /// Port for hosts found by MX lookup (25; tests and demos on loopback use another).
    pub smtp_port: u16,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            name: "sluice-worker".into(),
            source_ips: Vec::new(),
            capacity: 100,
            dns_servers: Vec::new(),
            smtp_port: 25,
        }
    }
}

impl Settings {
    /// Loads settings from the optional file, the environment and flag overrides (a partial
    /// structure holding only the flags that were given).
    pub fn load(file: Option<&Path>, overrides: impl Serialize) -> Result<Settings, String> {
        let mut fig = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(f) = file {
            if !f.exists() {
                return Err(format!("settings file {} does not exist", f.display()));
            }
            fig = fig.merge(Toml::file(f));
        }
        fig = fig
            .merge(Env::prefixed("SLUICE_").split("__"))
            .merge(Serialized::defaults(overrides));
        fig.extract::<Settings>().map_err(|e| {
            let mut msg = String::new();
            for err in e {
                if !msg.is_empty() {
                    msg.push('\n');
                }
                msg.push_str(&format!("settings: {err}"));
            }
            msg
        })
    }

    pub fn advertise(&self) -> String {
        self.advertise_addr
            .clone()
            .unwrap_or_else(|| self.grpc_listen.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_env_and_flags_layer_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("node.toml");
        std::fs::write(
            &f,
            "node_id = 3\ndata_dir = \"/tmp/x\"\n[raft]\nheartbeat_ms = 50\n",
        )
        .unwrap();
        let s = Settings::load(Some(&f), serde_json::json!({"data_dir": "/tmp/y"})).unwrap();
        assert_eq!(s.node_id, 3);
        assert_eq!(s.raft.heartbeat_ms, 50);
        assert_eq!(s.data_dir, PathBuf::from("/tmp/y"));
    }

    #[test]
    fn unknown_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("node.toml");
        std::fs::write(&f, "node_idd = 3\n").unwrap();
        let e = Settings::load(Some(&f), serde_json::json!({})).unwrap_err();
        assert!(e.contains("node_idd"), "{e}");
    }
}
