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
    /// Allows gRPC without TLS on addresses outside loopback (logged loudly at start). For a
    /// private network you trust entirely; without it such a node refuses to start.
    pub insecure_plaintext: bool,
    pub raft: RaftSettings,
    pub scheduler: SchedulerSettings,
    pub accounting: AccountingSettings,
    pub ingress: IngressSettings,
    pub worker: WorkerSettings,
    pub metrics: MetricsSettings,
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
            insecure_plaintext: false,
            raft: RaftSettings::default(),
            scheduler: SchedulerSettings::default(),
            accounting: AccountingSettings::default(),
            ingress: IngressSettings::default(),
            worker: WorkerSettings::default(),
            metrics: MetricsSettings::default(),
        }
    }
}

/// Mutual TLS for gRPC between nodes (`sluice cert` makes the files). All three set: every
/// connection is TLS 1.3 with certificates from `ca`; none set: plaintext, which only
/// loopback addresses (or `insecure_plaintext`) allow.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSettings {
    /// The cluster CA bundle (may hold the old and the new CA during a rotation).
    pub ca: Option<PathBuf>,
    /// This node's certificate, naming its role (`sluice://ROLE/NAME`).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl TlsSettings {
    /// (ca, cert, key) when TLS is on; an error when only some are set.
    pub fn files(&self) -> Result<Option<(PathBuf, PathBuf, PathBuf)>, String> {
        match (&self.ca, &self.cert, &self.key) {
            (Some(a), Some(c), Some(k)) => Ok(Some((a.clone(), c.clone(), k.clone()))),
            (None, None, None) => Ok(None),
            _ => Err(
                "settings: tls.ca, tls.cert and tls.key go together: set all three or none".into(),
            ),
        }
    }
}

/// Whether `addr` (`host:port` or an IP with a port) stays on this host.
pub fn is_loopback(addr: &str) -> bool {
    if let Ok(sa) = addr.parse::<SocketAddr>() {
        return sa.ip().is_loopback();
    }
    let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
    host.eq_ignore_ascii_case("localhost")
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

/// Prometheus metrics (`/metrics`), for every role.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSettings {
    /// Address of the metrics (and, on a controller, monitor) HTTP server; none serves none.
    pub listen: Option<SocketAddr>,
    /// Queues and VMTAs with series of their own; the rest add to `other`.
    pub top_queues: usize,
    /// Host names the web monitor answers to besides IP addresses and `localhost` (a page
    /// reached under any other name is refused: DNS rebinding).
    pub monitor_hosts: Vec<String>,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        MetricsSettings {
            listen: None,
            top_queues: 50,
            monitor_hosts: Vec::new(),
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
    /// HTTPS for injection: certificate and key files (PEM). Unset: plain HTTP.
    pub http_tls_cert: Option<PathBuf>,
    pub http_tls_key: Option<PathBuf>,
    /// Whether an injection must authenticate (HTTP basic, or `Authorization: Bearer
    /// NAME.SECRET`), on top of `http-access`. Unset: required unless HTTP listens on
    /// loopback only.
    pub http_require_auth: Option<bool>,
    /// Users and API keys for injection, one `NAME ARGON2-HASH` per line (`sluice config
    /// hash-password` makes the hash); the policy's `<smtp-user>`s also authenticate.
    pub http_users_file: Option<PathBuf>,
    /// The largest request body taken (bytes); a larger one is refused with 413 unread.
    pub http_max_body_bytes: u64,
    /// The most recipients one injection may name.
    pub http_max_recipients: u32,
    /// The most headers a `message` may give.
    pub http_max_headers: u32,
    /// Time allowed to send a request's headers and its body (milliseconds).
    pub http_read_timeout_ms: u64,
    /// HTTP connections open at once; one more is answered 503 and closed.
    pub http_max_connections: u32,
    /// Bytes of message data all SMTP sessions of this node may hold at once. A message that
    /// would pass it is answered `452 4.3.1` (at DATA when its SIZE does not fit, otherwise at
    /// its end), so memory stays bounded however many clients send large messages.
    pub max_bytes_in_flight: u64,
    /// How long a write to an SMTP client may block (a client that does not read its replies
    /// is dropped after this; milliseconds).
    pub smtp_write_timeout_ms: u64,
    /// The longest an SMTP session lasts; at the next command outside a transaction after it,
    /// the client is asked to reconnect (`421 4.4.2`). Seconds.
    pub smtp_session_lifetime_secs: u64,
    /// The slowest message data accepted (bytes per second, after a 30 s grace period).
    pub smtp_min_data_rate: u64,
}

impl Default for IngressSettings {
    fn default() -> Self {
        IngressSettings {
            name: "sluice-ingress".into(),
            smtp_listen: Vec::new(),
            smtps_listen: Vec::new(),
            http_listen: None,
            http_tls_cert: None,
            http_tls_key: None,
            http_require_auth: None,
            http_users_file: None,
            http_max_body_bytes: 64 << 20,
            http_max_recipients: 1000,
            http_max_headers: 200,
            http_read_timeout_ms: 30_000,
            http_max_connections: 256,
            max_bytes_in_flight: 256 << 20,
            smtp_write_timeout_ms: 60_000,
            smtp_session_lifetime_secs: 3600,
            smtp_min_data_rate: 1000,
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
    /// Concurrent outbound connections this worker runs at most; 0 chooses from the
    /// open-files limit and memory (up to 5000).
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
            capacity: 0,
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
            // The CLI's own variables are not node settings.
            .merge(
                Env::prefixed("SLUICE_")
                    .ignore(&["controller", "tls_dir", "tls_name"])
                    .split("__"),
            )
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

    /// Refuses gRPC without TLS beyond loopback unless `insecure_plaintext` says so: returns
    /// whether TLS is on. `listens` are the gRPC addresses this node serves (controllers).
    pub fn check_transport(&self, listens: &[String]) -> Result<bool, String> {
        if self.tls.files()?.is_some() {
            return Ok(true);
        }
        let exposed: Vec<&str> = listens
            .iter()
            .chain(self.controllers.iter())
            .map(String::as_str)
            .filter(|a| !is_loopback(a))
            .collect();
        if exposed.is_empty() {
            return Ok(false);
        }
        if self.insecure_plaintext {
            tracing::warn!(
                addresses = ?exposed,
                "INSECURE: gRPC without TLS beyond loopback (insecure_plaintext = true): anyone who reaches these addresses can read the policy's secrets, inject mail and take over the cluster"
            );
            return Ok(false);
        }
        Err(format!(
            "refusing to start: gRPC to {} would travel without TLS. Set tls.ca, tls.cert and tls.key (`sluice cert` makes them), or insecure_plaintext = true for a network you trust entirely",
            exposed.join(", ")
        ))
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
    fn plaintext_beyond_loopback_is_refused_unless_insecure_plaintext() {
        let mut s = Settings::default();
        assert_eq!(s.check_transport(&["127.0.0.1:7400".into()]), Ok(false));
        s.controllers = vec!["localhost:7400".into(), "[::1]:7400".into()];
        assert_eq!(s.check_transport(&[]), Ok(false));
        let e = s.check_transport(&["0.0.0.0:7400".into()]).unwrap_err();
        assert!(
            e.contains("0.0.0.0:7400") && e.contains("insecure_plaintext"),
            "{e}"
        );
        s.controllers = vec!["ctl1.example.com:7400".into()];
        assert!(s.check_transport(&[]).is_err());
        s.insecure_plaintext = true;
        assert_eq!(s.check_transport(&[]), Ok(false));
        s.tls.ca = Some("ca.pem".into());
        assert!(s.check_transport(&[]).unwrap_err().contains("all three"));
        s.tls.cert = Some("c.pem".into());
        s.tls.key = Some("c.key".into());
        assert_eq!(s.check_transport(&[]), Ok(true));
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
