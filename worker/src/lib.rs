//! The Sluice worker: registers the source IPs it owns, takes leases from the controller
//! leader, delivers over SMTP (with DKIM), and reports every recipient's outcome.

pub mod deliver;
pub mod dkim;
pub mod metrics;
pub mod mx;
pub mod smtp_client;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context;
use sluice_common::policy::Policy;
use sluice_common::settings::Settings;
use sluice_proto::LeaderClient;
use sluice_proto::lease::leases_client::LeasesClient;
use sluice_proto::lease::*;
use tokio::sync::Semaphore;
use tonic::transport::Channel;

pub struct Worker {
    pub name: String,
    pub ips: Vec<IpAddr>,
    pub capacity: u32,
    pub batch: u32,
    pub smtp_port: u16,
    pub mx: mx::MxResolver,
    leader: LeaderClient,
    policy: RwLock<(u64, Arc<Policy>)>,
    signers: Mutex<HashMap<(String, String), Arc<dkim::Signer>>>,
    /// MX hosts that a `skip-mx` reply pattern took out of use, until the given time.
    skipped: Mutex<HashMap<String, std::time::Instant>>,
    /// Leases in flight, renewed while they work; and those the leader said it no longer
    /// holds for this worker (their connection stops after the current message).
    leases: Mutex<HashSet<u64>>,
    gone: Mutex<HashSet<u64>>,
}

/// A source IP must be an address of this host: binding to it proves it.
fn check_local_ip(ip: IpAddr) -> Result<(), String> {
    std::net::TcpListener::bind(SocketAddr::new(ip, 0))
        .map(|_| ())
        .map_err(|e| format!("source IP {ip} is not an address of this host ({e})"))
}

/// How long a call to the leader keeps retrying (an election takes about a second).
const CALL_DEADLINE: Duration = Duration::from_secs(15);

impl Worker {
    /// Calls the leader; an unknown worker (a new leader) registers again first.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, tonic::Status>
    where
        F: Fn(LeasesClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let client = |ch: Channel| LeasesClient::new(ch).max_decoding_message_size(512 << 20);
        let deadline = tokio::time::Instant::now() + CALL_DEADLINE;
        match self.leader.call(deadline, |ch| f(client(ch))).await {
            Err(st) if st.code() == tonic::Code::FailedPrecondition => {
                self.register_once().await?;
                self.leader.call(deadline, |ch| f(client(ch))).await
            }
            r => r,
        }
    }

    async fn register_once(&self) -> Result<(), tonic::Status> {
        let version = self.policy.read().unwrap().0;
        let req = RegisterRequest {
            worker: self.name.clone(),
            source_ips: self.ips.iter().map(|i| i.to_string()).collect(),
            capacity: self.capacity,
            policy_version: version,
        };
        let deadline = tokio::time::Instant::now() + CALL_DEADLINE;
        self.leader
            .call(deadline, |ch| {
                let r = req.clone();
                async move { LeasesClient::new(ch).register(r).await }
            })
            .await
            .map(|_| ())
    }

    /// Reports outcomes; false when the lease is no longer this worker's (stop using it).
    pub async fn report(&self, lease_id: u64, outcomes: Vec<Outcome>, done: bool) -> bool {
        for o in &outcomes {
            metrics::METRICS.recipient(&o.source_ip, o.code);
        }
        let req = ReportRequest {
            worker: self.name.clone(),
            lease_id,
            outcomes,
            done,
        };
        match self
            .call(|mut c| {
                let r = req.clone();
                async move { c.report(r).await }
            })
            .await
        {
            Ok(_) => true,
            Err(e) => {
                // The lease will expire and the messages will be delivered again (at least
                // once).
                tracing::warn!(lease = lease_id, "report failed: {}", e.message());
                if matches!(
                    e.code(),
                    tonic::Code::NotFound | tonic::Code::PermissionDenied
                ) {
                    self.gone.lock().unwrap().insert(lease_id);
                }
                false
            }
        }
    }

    pub async fn more(&self, lease_id: u64, max: u32) -> Option<Vec<LeasedMessage>> {
        let req = MoreRequest {
            worker: self.name.clone(),
            lease_id,
            max_messages: max,
        };
        self.call(|mut c| {
            let r = req.clone();
            async move { c.more(r).await }
        })
        .await
        .ok()
        .map(|r| r.messages)
    }

    /// Whether the leader said it no longer holds this lease for us.
    pub fn lease_gone(&self, lease_id: u64) -> bool {
        self.gone.lock().unwrap().contains(&lease_id)
    }

    fn lease_started(&self, lease_id: u64) {
        self.leases.lock().unwrap().insert(lease_id);
    }

    fn lease_ended(&self, lease_id: u64) {
        self.leases.lock().unwrap().remove(&lease_id);
        self.gone.lock().unwrap().remove(&lease_id);
    }

    /// Renews the leases in flight, a third of a lease TTL apart, so that a slow receiver
    /// does not let them expire while they are being delivered.
    async fn renew_loop(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            let ids: Vec<u64> = self.leases.lock().unwrap().iter().copied().collect();
            if ids.is_empty() {
                continue;
            }
            let req = RenewRequest {
                worker: self.name.clone(),
                lease_ids: ids,
            };
            match self
                .call(|mut c| {
                    let r = req.clone();
                    async move { c.renew(r).await }
                })
                .await
            {
                Ok(r) if !r.gone.is_empty() => {
                    tracing::warn!(leases = ?r.gone, "the leader no longer holds these leases");
                    self.gone.lock().unwrap().extend(r.gone);
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("renewing leases failed: {}", e.message()),
            }
        }
    }

    /// Takes an MX host out of use for ten minutes (`skip-mx`).
    pub fn skip_host(&self, host: &str) {
        tracing::warn!(host, "skipping this MX after a reply pattern");
        self.skipped.lock().unwrap().insert(
            host.to_string(),
            std::time::Instant::now() + Duration::from_secs(600),
        );
    }

    pub fn is_skipped(&self, host: &str) -> bool {
        self.skipped
            .lock()
            .unwrap()
            .get(host)
            .is_some_and(|&t| t > std::time::Instant::now())
    }

    /// Whether the reply matches a `skip-mx` rule of the lease's smtp-pattern-list: the
    /// worker acts on that one itself; the leader decides everything else.
    pub fn skips_mx(&self, list: &str, reply: &str) -> bool {
        if list.is_empty() {
            return false;
        }
        let p = self.policy.read().unwrap().1.clone();
        p.smtp_pattern_lists
            .get(list)
            .and_then(|l| l.first_match(reply))
            .is_some_and(|r| r.actions.skip_mx)
    }

    /// The DKIM-Signature for a message when the lease says to sign: with the key the lease
    /// names, or else the key of the message's From domain (the VMTA's keys first).
    pub fn signer_for(&self, s: &DeliverySettings, body: &[u8]) -> Result<Option<String>, String> {
        if s.dkim_selector.is_empty() {
            return Ok(None);
        }
        let policy = self.policy.read().unwrap().1.clone();
        let vmta = Some(s.vmta.as_str());
        let (key, domain) = if s.dkim_selector != "*" {
            match policy
                .dkim_key(vmta, &s.dkim_domain)
                .filter(|k| k.selector == s.dkim_selector)
            {
                Some(k) => (k, s.dkim_domain.clone()),
                None => {
                    return Err(format!(
                        "no DKIM key {} for {} in policy version {}",
                        s.dkim_selector,
                        s.dkim_domain,
                        self.policy.read().unwrap().0
                    ));
                }
            }
        } else {
            let Some(from) = dkim::from_domain(body) else {
                return Ok(None);
            };
            // No key for this From domain: sent unsigned, as PowerMTA does.
            let Some(k) = policy.dkim_key(vmta, &from) else {
                return Ok(None);
            };
            (k, from)
        };
        let domain = if key.domain == "*" {
            domain
        } else {
            key.domain.clone()
        };
        if domain.is_empty() || key.key_pem.is_empty() {
            return Ok(None);
        }
        let id = (key.selector.clone(), domain.clone());
        let signer = {
            let mut cache = self.signers.lock().unwrap();
            match cache.get(&id) {
                Some(s) => s.clone(),
                None => {
                    let s = Arc::new(dkim::Signer::new(&key.key_pem, &domain, &key.selector)?);
                    cache.insert(id, s.clone());
                    s
                }
            }
        };
        signer.sign(body).map(Some)
    }
}

/// Checks every DKIM key of the policy, so that a bad key stops the worker at start.
fn check_keys(p: &Policy) -> Result<(), String> {
    for k in p
        .domain_keys
        .iter()
        .chain(p.vmtas.values().flat_map(|v| v.domain_keys.iter()))
    {
        let d = if k.domain == "*" {
            "example.com"
        } else {
            &k.domain
        };
        dkim::Signer::new(&k.key_pem, d, &k.selector).map_err(|e| {
            format!(
                "{e} (domain-key {},{},{})",
                k.selector, k.domain, k.key_file
            )
        })?;
    }
    Ok(())
}

/// The most connections `capacity = 0` (automatic) opens.
const AUTO_CAPACITY_MAX: u32 = 5000;
/// Descriptors kept for everything but outbound connections (DNS, gRPC, logs).
const RESERVED_FILES: u64 = 256;
/// Memory one connection may take at most (read buffer, the message, TLS state), for the
/// automatic capacity.
const BYTES_PER_CONNECTION: u64 = 256 << 10;

/// The connection slots: as configured, or (0) what the open-files limit and a quarter of the
/// memory allow, up to `AUTO_CAPACITY_MAX`. Says what it chose and why.
fn capacity(configured: u32) -> u32 {
    let files = sluice_common::privilege::raise_open_files_limit();
    let by_files = files.saturating_sub(RESERVED_FILES).max(1);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let kib: u64 = m
                .lines()
                .find(|l| l.starts_with("MemTotal:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some(kib << 10)
        })
        .unwrap_or(u64::MAX);
    let by_memory = (memory / 4 / BYTES_PER_CONNECTION).max(1);
    if configured > 0 {
        if configured as u64 > by_files {
            tracing::warn!(
                capacity = configured,
                open_files = files,
                "worker.capacity is above what the open-files limit allows; raise it (ulimit -n, LimitNOFILE)"
            );
        }
        return configured;
    }
    let auto = by_files.min(by_memory).min(AUTO_CAPACITY_MAX as u64) as u32;
    tracing::info!(
        capacity = auto,
        open_files = files,
        by_memory,
        "worker capacity chosen from the open-files limit and memory"
    );
    auto
}

pub async fn run(
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    settings.check_transport(&[]).map_err(anyhow::Error::msg)?;
    sluice_proto::use_tls_as(
        settings.tls.files().map_err(anyhow::Error::msg)?,
        sluice_proto::tls::Role::Worker,
    )
    .map_err(anyhow::Error::msg)?;
    let w = &settings.worker;
    if let Some(t) = sluice_proto::client_tls() {
        let id = t.identity().map_err(anyhow::Error::msg)?;
        if id.name != w.name {
            anyhow::bail!(
                "{} is worker `{}`'s certificate, but worker.name is `{}`",
                t.cert.display(),
                id.name,
                w.name
            );
        }
        if let Some(ip) = w.source_ips.iter().find(|ip| !id.ips.contains(ip)) {
            anyhow::bail!(
                "{} does not name source IP {ip}: issue it with --san {ip}",
                t.cert.display()
            );
        }
    }
    let node = sluice_proto::queue::PolicyRequest {
        node: format!("worker {}", w.name),
        role: "worker".into(),
        source_ips: w.source_ips.iter().map(|ip| ip.to_string()).collect(),
        ..Default::default()
    };
    if w.source_ips.is_empty() {
        anyhow::bail!("worker.source_ips is empty: list the source IPs this worker owns");
    }
    for ip in &w.source_ips {
        check_local_ip(*ip).map_err(anyhow::Error::msg)?;
    }
    let mut tries = 0;
    let (version, policy) = loop {
        match sluice_proto::fetch_policy(&settings.controllers, 0, &node, Policy::from_served_json)
            .await
        {
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
    check_keys(&policy).map_err(anyhow::Error::msg)?;
    if let Some(addr) = settings.metrics.listen {
        let registry = std::sync::Arc::new(metrics::METRICS.registry());
        sluice_common::metrics::serve(addr, sluice_common::metrics::router(registry))
            .await
            .map_err(|e| anyhow::anyhow!("binding the metrics listener {addr}: {e}"))?;
    }
    sluice_common::privilege::drop_privileges(
        policy.global.process_user.as_deref(),
        policy.global.run_as_root == Some(true),
        &[],
        &sluice_proto::own_tls_paths(),
    )
    .map_err(anyhow::Error::msg)?;
    let worker = Arc::new(Worker {
        name: w.name.clone(),
        ips: w.source_ips.clone(),
        capacity: capacity(w.capacity),
        batch: settings.scheduler.batch.max(1),
        smtp_port: w.smtp_port,
        mx: mx::MxResolver::new(&w.dns_servers, w.smtp_port)
            .map_err(anyhow::Error::msg)
            .context("DNS resolver")?,
        leader: LeaderClient::new(settings.controllers.clone()),
        policy: RwLock::new((version, Arc::new(policy))),
        signers: Mutex::new(HashMap::new()),
        skipped: Mutex::new(HashMap::new()),
        leases: Mutex::new(HashSet::new()),
        gone: Mutex::new(HashSet::new()),
    });
    let refresher = worker.clone();
    let controllers = settings.controllers.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let have = refresher.policy.read().unwrap().0;
            if let Ok(Some((v, p))) =
                sluice_proto::fetch_policy(&controllers, have, &node, Policy::from_served_json)
                    .await
            {
                if let Err(e) = check_keys(&p) {
                    tracing::error!(
                        "policy version {v} has a bad DKIM key; keeping version {have}: {e}"
                    );
                    continue;
                }
                tracing::info!(version = v, "policy updated");
                *refresher.policy.write().unwrap() = (v, Arc::new(p));
                refresher.signers.lock().unwrap().clear();
            }
        }
    });
    let ttl = loop {
        let version = worker.policy.read().unwrap().0;
        let req = RegisterRequest {
            worker: worker.name.clone(),
            source_ips: worker.ips.iter().map(|i| i.to_string()).collect(),
            capacity: worker.capacity,
            policy_version: version,
        };
        let deadline = tokio::time::Instant::now() + CALL_DEADLINE;
        match worker
            .leader
            .call(deadline, |ch| {
                let r = req.clone();
                async move { LeasesClient::new(ch).register(r).await }
            })
            .await
        {
            Ok(r) => break r.lease_ttl_ms,
            Err(e) => {
                tracing::info!("waiting to register with the leader: {}", e.message());
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    tracing::info!(worker = %worker.name, ips = ?worker.ips, "worker registered");
    tokio::spawn(
        worker
            .clone()
            .renew_loop(Duration::from_millis((ttl / 3).max(100))),
    );
    let slots = Arc::new(Semaphore::new(worker.capacity as usize));
    let acquire = {
        let worker = worker.clone();
        let slots = slots.clone();
        async move {
            loop {
                let free = slots.available_permits() as u32;
                if free == 0 {
                    let p = slots.clone().acquire_owned().await;
                    drop(p);
                    continue;
                }
                let req = AcquireRequest {
                    worker: worker.name.clone(),
                    free_slots: free,
                    wait_ms: 1000,
                };
                match worker
                    .call(|mut c| {
                        let r = req.clone();
                        async move { c.acquire(r).await }
                    })
                    .await
                {
                    Ok(reply) => {
                        for lease in reply.leases {
                            let permit =
                                slots.clone().acquire_owned().await.expect("semaphore open");
                            let w = worker.clone();
                            w.lease_started(lease.lease_id);
                            tokio::spawn(async move {
                                let id = lease.lease_id;
                                deliver::run(w.clone(), lease).await;
                                w.lease_ended(id);
                                drop(permit);
                            });
                        }
                    }
                    Err(e) => {
                        tracing::warn!("acquire failed: {}", e.message());
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                }
            }
        }
    };
    tokio::select! {
        _ = acquire => {}
        _ = shutdown => {}
    }
    // Graceful stop: take no new leases, let those in flight finish and report.
    tracing::info!("worker stopping; finishing leases in flight");
    let all = worker.capacity;
    let _ = tokio::time::timeout(Duration::from_secs(60), slots.acquire_many(all)).await;
    Ok(())
}
