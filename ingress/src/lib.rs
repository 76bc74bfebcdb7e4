//! Sluice ingress: an ESMTP server and HTTP injection. Stateless; a message is acknowledged
//! only once the controllers committed it on a majority.

pub mod enqueuer;
pub mod http;
pub mod memory;
pub mod message;
pub mod metrics;
pub mod rejectlog;
pub mod smtp;
pub mod suppress;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use sluice_common::policy::Policy;
use sluice_common::settings::Settings;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// What every session of this node shares.
pub struct Shared {
    policy: RwLock<(u64, Arc<Policy>)>,
    pub enqueuer: enqueuer::Enqueuer,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub hostname: String,
    pub node_name: String,
    pub conn_limit: Arc<Semaphore>,
    /// `total-max-smtp-in`, the size of `conn_limit`.
    pub conn_total: usize,
    pub sessions: smtp::table::SessionTable,
    pub auth_failures: smtp::auth_limit::AuthFailures,
    /// Message data held by all sessions, in KiB (`ingress.max_bytes_in_flight`).
    pub bytes_in_flight: Arc<Semaphore>,
    pub limits: SmtpLimits,
    /// Open sessions per client address (for `<source> max-smtp-in`).
    pub per_ip: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, u32>>,
    pub reject_log: rejectlog::RejectLog,
    /// Recipients refused at RCPT (`suppress`).
    pub suppressions: Arc<suppress::SuppressionSet>,
}

/// How long and how slowly an SMTP client may take (from the node settings).
pub struct SmtpLimits {
    pub write_timeout: Duration,
    pub session_lifetime: Duration,
    /// Bytes per second.
    pub min_data_rate: u64,
}

impl Shared {
    /// Three quarters of the session slots are taken: idle clients get short timeouts.
    pub fn stressed(&self) -> bool {
        self.conn_limit.available_permits() * 4 < self.conn_total
    }

    pub fn policy(&self) -> Arc<Policy> {
        self.policy.read().unwrap().1.clone()
    }

    pub fn policy_version(&self) -> u64 {
        self.policy.read().unwrap().0
    }

    /// Everything a session needs, from the node settings and the policy the controller served.
    pub fn new(
        settings: &Settings,
        version: u64,
        policy: Policy,
        enqueuer: enqueuer::Enqueuer,
    ) -> anyhow::Result<Shared> {
        let tls = match &policy.global.smtp_server_tls_certificate {
            Some(c) => Some(
                smtp::conn::tls_acceptor(
                    std::path::Path::new(&c.cert),
                    std::path::Path::new(&c.key),
                )
                .map_err(anyhow::Error::msg)?,
            ),
            None => None,
        };
        let hostname = policy
            .global
            .host_name
            .clone()
            .unwrap_or_else(|| "localhost".into());
        let reject_log = match &policy.reject_log {
            Some(r) => {
                let p = PathBuf::from(&r.path);
                let p = if p.is_absolute() {
                    p
                } else {
                    settings.data_dir.join(p)
                };
                if let Some(dir) = p.parent() {
                    std::fs::create_dir_all(dir).ok();
                }
                let records = r
                    .settings
                    .records
                    .as_ref()
                    .map(|l| l.0.iter().filter_map(|s| s.chars().next()).collect())
                    .unwrap_or_default();
                let max = r.settings.max_size.and_then(|s| s.0).unwrap_or(100 << 20);
                rejectlog::RejectLog::new(Some(p), records, max)
            }
            None => rejectlog::RejectLog::new(None, Vec::new(), 0),
        };
        let limit = policy.global.total_max_smtp_in.unwrap_or(1000) as usize;
        Ok(Shared {
            policy: RwLock::new((version, Arc::new(policy))),
            enqueuer,
            tls,
            hostname,
            node_name: settings.ingress.name.clone(),
            conn_limit: Arc::new(Semaphore::new(limit)),
            conn_total: limit,
            sessions: Default::default(),
            auth_failures: Default::default(),
            bytes_in_flight: Arc::new(Semaphore::new(
                (settings.ingress.max_bytes_in_flight >> 10).min(u32::MAX as u64) as usize,
            )),
            limits: SmtpLimits {
                write_timeout: Duration::from_millis(settings.ingress.smtp_write_timeout_ms),
                session_lifetime: Duration::from_secs(settings.ingress.smtp_session_lifetime_secs),
                min_data_rate: settings.ingress.smtp_min_data_rate.max(1),
            },
            per_ip: Default::default(),
            reject_log,
            suppressions: Default::default(),
        })
    }

    pub fn reject(&self, peer: SocketAddr, kind: char, reason: &str) {
        self.reject_log.write(peer, kind, reason);
    }
}

/// A listening socket with room for `backlog` connections waiting to be accepted.
fn listen_on(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(backlog)
}

pub async fn run(
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    settings.check_transport(&[]).map_err(anyhow::Error::msg)?;
    sluice_proto::use_tls_as(
        settings.tls.files().map_err(anyhow::Error::msg)?,
        sluice_proto::tls::Role::Ingress,
    )
    .map_err(anyhow::Error::msg)?;
    let controllers = settings.controllers.clone();
    let node = sluice_proto::queue::PolicyRequest {
        node: format!("ingress {}", settings.ingress.name),
        role: "ingress".into(),
        ..Default::default()
    };
    // Wait for a controller: ingress may start before the cluster is up.
    let mut tries = 0;
    let (version, policy) = loop {
        match sluice_proto::fetch_policy(&controllers, 0, &node, Policy::from_served_json).await {
            Ok(Some(p)) => break p,
            Ok(None) => anyhow::bail!("the controller sent an empty policy"),
            Err(e) if tries < 100 => {
                tries += 1;
                tracing::info!("waiting for a controller: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => anyhow::bail!("no controller answered: {e}"),
        }
    };
    let enqueuer = enqueuer::Enqueuer::start(
        controllers.clone(),
        settings.raft.max_entry_bytes as usize,
        Duration::from_millis(settings.raft.commit_timeout_ms + 2000),
    );
    let tls = policy.global.smtp_server_tls_certificate.is_some();
    let shared = Arc::new(Shared::new(&settings, version, policy, enqueuer)?);
    let policy = shared.policy();
    tokio::spawn(suppress::follow(
        shared.suppressions.clone(),
        controllers.clone(),
    ));
    let limit = shared.conn_total;
    let files = sluice_common::privilege::raise_open_files_limit();
    if files < limit as u64 + 64 {
        tracing::warn!(
            open_files = files,
            total_max_smtp_in = limit,
            "the open-files limit is below total-max-smtp-in; raise it (ulimit -n, LimitNOFILE)"
        );
    }
    // (address, implicit TLS)
    let listen: Vec<(SocketAddr, bool)> =
        if !settings.ingress.smtp_listen.is_empty() || !settings.ingress.smtps_listen.is_empty() {
            let plain = settings.ingress.smtp_listen.iter().map(|a| (*a, false));
            let tls = settings.ingress.smtps_listen.iter().map(|a| (*a, true));
            plain.chain(tls).collect()
        } else {
            policy
                .listeners
                .iter()
                .map(|l| {
                    let ip = l
                        .addr
                        .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
                    (SocketAddr::new(ip, l.port), l.implicit_tls)
                })
                .collect()
        };
    if listen.iter().any(|(_, tls)| *tls) && !tls {
        anyhow::bail!(
            "an implicit-TLS listener (smtp-listener ... tls=yes) needs smtp-server-tls-certificate"
        );
    }
    if listen.is_empty() {
        anyhow::bail!(
            "no SMTP listener: set smtp-listener in the policy or ingress.smtp_listen in the settings"
        );
    }
    let http_listen = settings.ingress.http_listen.or_else(|| {
        policy
            .global
            .http_mgmt_port
            .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
    });
    // A burst of clients must wait in the listen queue, not lose their handshake's last ACK:
    // a client whose ACK was dropped believes it is connected and waits for a greeting that
    // never comes. The kernel caps this at net.core.somaxconn.
    let backlog = (limit as u32).clamp(1024, 65535);
    for (addr, implicit_tls) in listen {
        let l =
            listen_on(addr, backlog).with_context(|| format!("binding SMTP listener {addr}"))?;
        tracing::info!(%addr, implicit_tls, "SMTP listening");
        tokio::spawn(smtp::accept_loop(l, shared.clone(), implicit_tls));
    }
    if let Some(addr) = http_listen {
        let guard =
            http::HttpGuard::from_settings(&settings.ingress, addr).map_err(anyhow::Error::msg)?;
        let l =
            listen_on(addr, backlog).with_context(|| format!("binding HTTP listener {addr}"))?;
        tracing::info!(%addr, tls = guard.tls.is_some(), auth = guard.require_auth, "HTTP injection listening");
        tokio::spawn(http::serve(l, shared.clone(), Arc::new(guard)));
    }
    if let Some(addr) = settings.metrics.listen {
        let registry = Arc::new(metrics::METRICS.registry());
        sluice_common::metrics::serve(addr, sluice_common::metrics::router(registry))
            .await
            .with_context(|| format!("binding the metrics listener {addr}"))?;
    }
    // Every port is bound: give up root.
    sluice_common::privilege::drop_privileges(
        policy.global.process_user.as_deref(),
        policy.global.run_as_root == Some(true),
        &[settings.data_dir.as_path()],
        &sluice_proto::own_tls_paths(),
    )
    .map_err(anyhow::Error::msg)?;
    // New policy versions are picked up without dropping connections.
    let refresher = shared.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            if let Ok(Some((v, p))) = sluice_proto::fetch_policy(
                &controllers,
                refresher.policy_version(),
                &node,
                Policy::from_served_json,
            )
            .await
            {
                tracing::info!(version = v, "policy updated");
                *refresher.policy.write().unwrap() = (v, Arc::new(p));
            }
        }
    });
    shutdown.await;
    Ok(())
}
