//! The Sluice worker: registers the source IPs it owns, takes leases from the controller
//! leader, delivers over SMTP (with DKIM), and reports every recipient's outcome.

pub mod deliver;
pub mod dkim;
pub mod mx;
pub mod smtp_client;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context;
use sluice_common::policy::Policy;
use sluice_common::settings::Settings;
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
    controllers: Vec<String>,
    client: Mutex<Option<(String, LeasesClient<Channel>)>>,
    policy: RwLock<(u64, Arc<Policy>)>,
    signers: Mutex<HashMap<(String, String), Arc<dkim::Signer>>>,
    /// MX hosts that a `skip-mx` reply pattern took out of use, until the given time.
    skipped: Mutex<HashMap<String, std::time::Instant>>,
}

/// A source IP must be an address of this host: binding to it proves it.
fn check_local_ip(ip: IpAddr) -> Result<(), String> {
    std::net::TcpListener::bind(SocketAddr::new(ip, 0))
        .map(|_| ())
        .map_err(|e| format!("source IP {ip} is not an address of this host ({e})"))
}

impl Worker {
    async fn leader(&self, prefer: Option<String>) -> Result<LeasesClient<Channel>, String> {
        if prefer.is_none()
            && let Some((_, c)) = self.client.lock().unwrap().clone()
        {
            return Ok(c);
        }
        let mut last = "no controller configured".to_string();
        for addr in prefer.iter().chain(self.controllers.iter()) {
            match sluice_proto::connect(addr).await {
                Ok(ch) => {
                    let c = LeasesClient::new(ch).max_decoding_message_size(512 << 20);
                    *self.client.lock().unwrap() = Some((addr.clone(), c.clone()));
                    return Ok(c);
                }
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        Err(last)
    }

    /// Calls the leader, following a follower's hint and re-registering after a leader change.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, tonic::Status>
    where
        F: Fn(LeasesClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut prefer = None;
        for attempt in 0..20 {
            let c = match self.leader(prefer.take()).await {
                Ok(c) => c,
                Err(e) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if attempt == 19 {
                        return Err(tonic::Status::unavailable(e));
                    }
                    continue;
                }
            };
            match f(c).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(st) => {
                    *self.client.lock().unwrap() = None;
                    if st.code() == tonic::Code::FailedPrecondition {
                        let _ = self.register_once().await;
                    }
                    prefer = sluice_proto::leader_hint(&st);
                    if prefer.is_none() {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    if attempt == 19 {
                        return Err(st);
                    }
                }
            }
        }
        Err(tonic::Status::unavailable("no leader"))
    }

    async fn register_once(&self) -> Result<(), tonic::Status> {
        let c = self
            .leader(None)
            .await
            .map_err(tonic::Status::unavailable)?;
        let version = self.policy.read().unwrap().0;
        let req = RegisterRequest {
            worker: self.name.clone(),
            source_ips: self.ips.iter().map(|i| i.to_string()).collect(),
            capacity: self.capacity,
            policy_version: version,
        };
        let mut c = c;
        match c.register(req.clone()).await {
            Ok(_) => Ok(()),
            Err(st) => {
                *self.client.lock().unwrap() = None;
                if let Some(l) = sluice_proto::leader_hint(&st) {
                    let mut c = self
                        .leader(Some(l))
                        .await
                        .map_err(tonic::Status::unavailable)?;
                    c.register(req).await?;
                    return Ok(());
                }
                Err(st)
            }
        }
    }

    pub async fn report(&self, lease_id: u64, outcomes: Vec<Outcome>, done: bool) {
        let req = ReportRequest {
            worker: self.name.clone(),
            lease_id,
            outcomes,
            done,
        };
        if let Err(e) = self
            .call(|mut c| {
                let r = req.clone();
                async move { c.report(r).await }
            })
            .await
        {
            // The lease will expire and the messages will be delivered again (at least once).
            tracing::warn!(lease = lease_id, "report failed: {}", e.message());
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

    /// The first matching smtp-pattern-list rule's actions for a reply, as "a,b".
    pub fn pattern_action(&self, list: &str, reply: &str) -> String {
        if list.is_empty() {
            return String::new();
        }
        let p = self.policy.read().unwrap().1.clone();
        let Some(l) = p.smtp_pattern_lists.get(list) else {
            return String::new();
        };
        let Some(rule) = l.first_match(reply) else {
            return String::new();
        };
        let a = &rule.actions;
        let mut v = Vec::new();
        match a.backoff {
            Some(true) => v.push("mode=backoff".to_string()),
            Some(false) => v.push("mode=normal".to_string()),
            None => {}
        }
        if let Some(secs) = a.backoff_to_normal_after {
            v.push(format!("backoff-to-normal-after={secs}"));
        }
        if let Some(secs) = a.reenable_after {
            v.push(format!("reenable-after={secs}"));
        }
        for (flag, name) in [
            (a.skip_mx, "skip-mx"),
            (a.bounce_queue, "bounce-queue"),
            (a.bounce_rcpt, "bounce-rcpt"),
            (a.defer_queue, "defer-queue"),
            (a.disable_source_ip, "disable-source-ip"),
        ] {
            if flag {
                v.push(name.to_string());
            }
        }
        v.join(",")
    }

    /// The DKIM-Signature for a message when the lease says to sign: the key is chosen by the
    /// From domain among the VMTA's and the global keys.
    pub fn signer_for(&self, s: &DeliverySettings, body: &[u8]) -> Result<Option<String>, String> {
        if s.dkim_selector.is_empty() {
            return Ok(None);
        }
        let from = dkim::from_domain(body);
        let policy = self.policy.read().unwrap().1.clone();
        let vmta = s.vmta.as_str();
        let (selector, domain, pem) = match from
            .as_deref()
            .and_then(|d| policy.dkim_key(Some(vmta), d).map(|k| (k, d)))
        {
            Some((k, d)) => (
                k.selector.clone(),
                if k.domain == "*" {
                    d.to_string()
                } else {
                    k.domain.clone()
                },
                k.key_pem.clone(),
            ),
            None if !s.dkim_key_pem.is_empty() => {
                let d = if s.dkim_domain == "*" {
                    from.clone().unwrap_or_default()
                } else {
                    s.dkim_domain.clone()
                };
                (s.dkim_selector.clone(), d, s.dkim_key_pem.clone())
            }
            // No key for this From domain: sent unsigned, as PowerMTA does.
            None => return Ok(None),
        };
        if domain.is_empty() || pem.is_empty() {
            return Ok(None);
        }
        let key = (selector.clone(), domain.clone());
        let signer = {
            let mut cache = self.signers.lock().unwrap();
            match cache.get(&key) {
                Some(s) => s.clone(),
                None => {
                    let s = Arc::new(dkim::Signer::new(&pem, &domain, &selector)?);
                    cache.insert(key, s.clone());
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

pub async fn run(
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let w = &settings.worker;
    let node = format!("worker {}", w.name);
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
    let worker = Arc::new(Worker {
        name: w.name.clone(),
        ips: w.source_ips.clone(),
        capacity: w.capacity.max(1),
        batch: settings.scheduler.batch.max(1),
        smtp_port: w.smtp_port,
        mx: mx::MxResolver::new(&w.dns_servers, w.smtp_port)
            .map_err(anyhow::Error::msg)
            .context("DNS resolver")?,
        controllers: settings.controllers.clone(),
        client: Mutex::new(None),
        policy: RwLock::new((version, Arc::new(policy))),
        signers: Mutex::new(HashMap::new()),
        skipped: Mutex::new(HashMap::new()),
    });
    let refresher = worker.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let have = refresher.policy.read().unwrap().0;
            if let Ok(Some((v, p))) = sluice_proto::fetch_policy(
                &refresher.controllers,
                have,
                &node,
                Policy::from_served_json,
            )
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
    while let Err(e) = worker.register_once().await {
        tracing::info!("waiting to register with the leader: {}", e.message());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tracing::info!(worker = %worker.name, ips = ?worker.ips, "worker registered");
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
                            tokio::spawn(async move {
                                deliver::run(w, lease).await;
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
