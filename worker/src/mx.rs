//! Where to deliver: fixed routes, or MX records (RFC 5321 section 5) through hickory, with a
//! cache that keeps answers for their TTL and is shared by all leases.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::{Resolver, TokioResolver};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub name: String,
    pub addrs: Vec<SocketAddr>,
}

/// The answer for a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Hosts in the order to try.
    Hosts(Vec<Host>),
    /// Null MX (RFC 7505): the domain accepts no mail.
    NullMx,
    /// The domain does not exist.
    NoDomain,
    /// Neither MX nor address records.
    NoMx,
    /// A temporary failure (timeout, SERVFAIL).
    TempFail(String),
}

pub struct MxResolver {
    resolver: TokioResolver,
    port: u16,
    cache: Mutex<HashMap<String, (Instant, Route)>>,
}

impl MxResolver {
    pub fn new(servers: &[SocketAddr], port: u16) -> Result<MxResolver, String> {
        let provider = TokioRuntimeProvider::default();
        let builder = if servers.is_empty() {
            Resolver::builder(provider).map_err(|e| format!("system resolver: {e}"))?
        } else {
            let ns = servers
                .iter()
                .map(|s| {
                    let mut c = NameServerConfig::udp_and_tcp(s.ip());
                    for conn in &mut c.connections {
                        conn.port = s.port();
                    }
                    c
                })
                .collect();
            Resolver::builder_with_config(ResolverConfig::from_name_servers(ns), provider)
        };
        let mut builder = builder;
        builder.options_mut().attempts = 2;
        builder.options_mut().timeout = Duration::from_secs(3);
        let resolver = builder.build().map_err(|e| e.to_string())?;
        Ok(MxResolver {
            resolver,
            port,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Resolves a destination to hosts: MX by preference (shuffled among equals), or the
    /// domain's own A/AAAA when it has no MX.
    pub async fn route(&self, domain: &str) -> Route {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        if let Some((until, r)) = self.cache.lock().unwrap().get(&domain)
            && *until > Instant::now()
        {
            return r.clone();
        }
        let (route, ttl) = self.resolve(&domain).await;
        if !matches!(route, Route::TempFail(_)) {
            self.cache
                .lock()
                .unwrap()
                .insert(domain, (Instant::now() + ttl, route.clone()));
        }
        route
    }

    async fn resolve(&self, domain: &str) -> (Route, Duration) {
        let fqdn = format!("{domain}.");
        match self.resolver.mx_lookup(fqdn.as_str()).await {
            Ok(lookup) => {
                let mut mxs: Vec<(u16, String, u32)> = lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::MX(mx) => Some((
                            mx.preference,
                            mx.exchange
                                .to_ascii()
                                .trim_end_matches('.')
                                .to_ascii_lowercase(),
                            r.ttl,
                        )),
                        _ => None,
                    })
                    .collect();
                if mxs.is_empty() {
                    return self.implicit(domain).await;
                }
                if mxs.len() == 1 && mxs[0].1.is_empty() {
                    return (Route::NullMx, Duration::from_secs(mxs[0].2 as u64));
                }
                let ttl = mxs.iter().map(|m| m.2).min().unwrap_or(300);
                // Equal preferences are tried in random order to spread load.
                fastrand::shuffle(&mut mxs);
                mxs.sort_by_key(|m| m.0);
                let mut hosts = Vec::new();
                for (_, name, _) in mxs.into_iter().filter(|m| !m.1.is_empty()) {
                    let addrs = self.addresses(&name).await;
                    hosts.push(Host { name, addrs });
                }
                (Route::Hosts(hosts), Duration::from_secs(ttl as u64))
            }
            Err(e) if e.is_nx_domain() => (Route::NoDomain, Duration::from_secs(60)),
            Err(e) if e.is_no_records_found() => self.implicit(domain).await,
            Err(e) => (Route::TempFail(e.to_string()), Duration::ZERO),
        }
    }

    /// RFC 5321 5.1: with no MX, the domain itself is the host.
    async fn implicit(&self, domain: &str) -> (Route, Duration) {
        let addrs = self.addresses(domain).await;
        if addrs.is_empty() {
            (Route::NoMx, Duration::from_secs(60))
        } else {
            (
                Route::Hosts(vec![Host {
                    name: domain.to_string(),
                    addrs,
                }]),
                Duration::from_secs(300),
            )
        }
    }

    pub async fn addresses(&self, host: &str) -> Vec<SocketAddr> {
        if let Ok(ip) = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            return vec![SocketAddr::new(ip, self.port)];
        }
        match self.resolver.lookup_ip(format!("{host}.").as_str()).await {
            Ok(l) => l.iter().map(|ip| SocketAddr::new(ip, self.port)).collect(),
            Err(_) => Vec::new(),
        }
    }
}

/// Parses a fixed route "host:port" / "[ip]:port" from the lease.
pub fn parse_fixed(host: &str, default_port: u16) -> (String, Option<SocketAddr>, u16) {
    let (h, p) = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((h, p)) => (
                h.to_string(),
                p.trim_start_matches(':').parse().unwrap_or(default_port),
            ),
            None => (rest.to_string(), default_port),
        }
    } else if let Ok(sa) = host.parse::<SocketAddr>() {
        return (sa.ip().to_string(), Some(sa), sa.port());
    } else {
        match host.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() => (h.to_string(), p.parse().unwrap()),
            _ => (host.to_string(), default_port),
        }
    };
    let lit = h.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, p));
    (h, lit, p)
}
