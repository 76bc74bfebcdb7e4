//! Resolution: which settings apply to a client, a destination and a recipient. The other roles
//! call these; none of them reads the policy file.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use super::model::*;
use super::value::*;

/// Lookup tables over `Policy::domains`, rebuilt by `Policy::finish`.
#[derive(Debug, Clone, Default)]
pub struct DomainIndex {
    exact: HashMap<String, usize>,
    /// Wildcard suffix -> rule; looked up from the longest suffix of a name down.
    wildcard: HashMap<String, usize>,
    /// Domain named in a macro -> the first `<domain $macro>` rule that lists it.
    by_macro: HashMap<String, usize>,
    /// Wildcard entries inside macros (`*.example.com` in a domain-macro list).
    macro_wildcard: HashMap<String, usize>,
    named: HashMap<String, usize>,
    any: Option<usize>,
}

impl DomainIndex {
    pub fn build(
        rules: &[DomainRule],
        macros: &std::collections::BTreeMap<String, Vec<String>>,
    ) -> Self {
        let mut ix = DomainIndex::default();
        for (i, r) in rules.iter().enumerate() {
            match &r.pattern {
                DomainPattern::Exact(d) => {
                    ix.exact.entry(d.clone()).or_insert(i);
                }
                DomainPattern::Wildcard(s) => {
                    ix.wildcard.entry(s.clone()).or_insert(i);
                }
                DomainPattern::WithSubdomains(s) => {
                    ix.exact.entry(s.clone()).or_insert(i);
                    ix.wildcard.entry(s.clone()).or_insert(i);
                }
                DomainPattern::Macro(m) => {
                    for d in macros.get(m).into_iter().flatten() {
                        match d.strip_prefix("*.") {
                            Some(s) => ix.macro_wildcard.entry(s.to_string()).or_insert(i),
                            None => ix.by_macro.entry(d.clone()).or_insert(i),
                        };
                    }
                }
                DomainPattern::Named(n) => {
                    ix.named.entry(n.clone()).or_insert(i);
                }
                DomainPattern::Any => {
                    ix.any.get_or_insert(i);
                }
            }
        }
        ix
    }

    /// Exact, then the longest wildcard, then macro, then named queue; `*` is applied by the
    /// caller as the fallback layer.
    pub fn best(&self, domain: &str) -> Option<usize> {
        if let Some(&i) = self.exact.get(domain) {
            return Some(i);
        }
        let mut rest = domain;
        while let Some((_, suffix)) = rest.split_once('.') {
            if let Some(&i) = self.wildcard.get(suffix) {
                return Some(i);
            }
            rest = suffix;
        }
        if let Some(&i) = self.by_macro.get(domain) {
            return Some(i);
        }
        let mut rest = domain;
        while let Some((_, suffix)) = rest.split_once('.') {
            if let Some(&i) = self.macro_wildcard.get(suffix) {
                return Some(i);
            }
            rest = suffix;
        }
        self.named.get(domain).copied()
    }

    pub fn any(&self) -> Option<usize> {
        self.any
    }
}

/// Sluice's built-in delivery defaults, used where the policy says nothing.
pub fn builtin_domain_defaults() -> DomainSettings {
    DomainSettings {
        max_smtp_out: Some(20),
        // PowerMTA's own default (0: never close) keeps connections open for ever; operators
        // set 50-200. Sluice closes after 100.
        max_msg_per_connection: Some(100),
        max_errors_per_connection: Some(10),
        max_rcpt_per_message: Some(100),
        retry_after: Some(List(vec![PDuration(Duration::from_secs(600))])),
        bounce_after: Some(PDuration(Duration::from_secs(4 * 86400 + 12 * 3600))),
        connect_timeout: Some(PDuration(Duration::from_secs(60))),
        smtp_greeting_timeout: Some(PDuration(Duration::from_secs(300))),
        // RFC 5321 4.5.3.2: 5 minutes for a reply to a command, 3 for each block of content
        // and 10 for the reply to the final dot (shorter invites duplicates).
        smtp_command_timeout: Some(PDuration(Duration::from_secs(300))),
        data_send_timeout: Some(PDuration(Duration::from_secs(180))),
        smtp_data_termination_timeout: Some(PDuration(Duration::from_secs(600))),
        mx_connection_attempts: Some(10),
        use_starttls: Some(true),
        backoff_retry_after: Some(List(vec![PDuration(Duration::from_secs(3600))])),
        backoff_max_smtp_out: Some(2),
        queue_priority: Some(QueuePriority(50)),
        ..Default::default()
    }
}

/// Where mail for a recipient goes: a VMTA or a pool.
#[derive(Debug, Clone)]
pub enum Target<'a> {
    Vmta(&'a Vmta),
    Pool(&'a Pool),
}

impl Policy {
    /// Every header name some accounting file records, lower-cased.
    pub fn acct_headers(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .acct_files
            .iter()
            .flat_map(|f| f.wanted_headers())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Rebuilds lookup tables; call after parsing or deserialising.
    pub fn finish(&mut self) {
        self.index = DomainIndex::build(&self.domains, &self.domain_macros);
        self.vmta_index = self
            .vmtas
            .values()
            .map(|v| {
                (
                    v.name.clone(),
                    DomainIndex::build(&v.domains, &self.domain_macros),
                )
            })
            .collect();
    }

    /// The `<source>` that applies to a client address: the most specific CIDR match (see
    /// `cidr_rank` for IPv6 clients and `0/0`).
    pub fn source_for_ip(&self, ip: IpAddr) -> SourceSettings {
        self.source_rule_for_ip(ip)
            .map(|s| s.settings.clone())
            .unwrap_or_default()
    }

    /// The `<source>` block that applies to a client address, if any.
    pub fn source_rule_for_ip(&self, ip: IpAddr) -> Option<&Source> {
        // On a tie the first rule in the file wins (max_by_key keeps the last it sees).
        self.sources
            .iter()
            .rev()
            .filter_map(|s| match &s.matches {
                SourceMatch::Cidr(c) => cidr_rank(c, ip).map(|r| (r, s)),
                _ => None,
            })
            .max_by_key(|(r, _)| *r)
            .map(|(_, s)| s)
    }

    /// The VMTA or pool for a message without X-Virtual-MTA: the source's `pattern-list`
    /// match, then its `default-virtual-mta` (`by-smtp-source-ip`: the VMTA whose source IP
    /// the message arrived on). Empty when the source names none. An error is an SMTP reply.
    pub fn vmta_for(
        &self,
        source: &SourceSettings,
        mail_from: &str,
        first_rcpt: &str,
        local_ip: IpAddr,
    ) -> Result<String, String> {
        if let Some(list) = &source.pattern_list
            && let Some(v) = self.route_by_pattern_list(list, mail_from, first_rcpt)
        {
            return Ok(v.to_string());
        }
        match source.default_virtual_mta.as_deref() {
            Some(BY_SOURCE_IP) => self
                .vmtas
                .values()
                .find(|v| v.source_ip == Some(local_ip))
                .map(|v| v.name.clone())
                .ok_or_else(|| {
                    format!(
                        "451 4.3.0 no virtual-mta has the source IP {local_ip} this message arrived on"
                    )
                }),
            Some(v) => Ok(v.to_string()),
            None => Ok(String::new()),
        }
    }

    /// The `http-access` level of a client address: the most specific rule that matches.
    pub fn http_access_for(&self, ip: IpAddr) -> Option<AccessLevel> {
        self.http_access
            .iter()
            .filter_map(|a| cidr_rank(&a.cidr, ip).map(|r| (r, a.level)))
            .max_by_key(|(r, _)| *r)
            .map(|(_, l)| l)
    }

    /// A `<source {name}>` block, as applied after AUTH by an smtp-user's `source`.
    pub fn named_source(&self, name: &str) -> Option<&SourceSettings> {
        self.sources.iter().find_map(|s| match &s.matches {
            SourceMatch::Named(n) if n == name => Some(&s.settings),
            _ => None,
        })
    }

    /// The effective delivery settings for a destination domain (or rollup queue name) sent
    /// through a VMTA: the VMTA's override first, then the best global rule, then
    /// `<domain *>`, then top-level defaults, then Sluice's built-in defaults.
    pub fn domain_settings(&self, domain: &str, vmta: Option<&str>) -> DomainSettings {
        let domain = domain.to_ascii_lowercase();
        let mut out = DomainSettings::default();
        // `route` and `smtp-hosts` are one choice (where to connect): the most specific rule
        // that makes it decides, and a more general rule's other half does not override it.
        let fill = |out: &mut DomainSettings, from: &DomainSettings| {
            let routes = |s: &DomainSettings| s.route.is_some() || s.smtp_hosts.is_some();
            if routes(out) && routes(from) {
                let mut from = from.clone();
                from.route = None;
                from.smtp_hosts = None;
                out.fill_from(&from);
            } else {
                out.fill_from(from);
            }
        };
        if let Some(v) = vmta.and_then(|v| self.vmtas.get(v))
            && let Some(ix) = self.vmta_index.get(&v.name)
        {
            if let Some(i) = ix.best(&domain) {
                fill(&mut out, &v.domains[i].settings);
            }
            if let Some(i) = ix.any() {
                fill(&mut out, &v.domains[i].settings);
            }
        }
        if let Some(i) = self.index.best(&domain) {
            fill(&mut out, &self.domains[i].settings);
        }
        if let Some(i) = self.index.any() {
            fill(&mut out, &self.domains[i].settings);
        }
        let top = DomainSettings {
            retry_after: self.global.retry_after.clone(),
            bounce_after: self.global.bounce_after,
            ..Default::default()
        };
        out.fill_from(&top);
        out.fill_from(&builtin_domain_defaults());
        out
    }

    /// The queue name a recipient domain lands in: its `queue-to` rollup, or the domain.
    pub fn queue_name(&self, domain: &str) -> String {
        let domain = domain.to_ascii_lowercase();
        let rule = self.index.best(&domain).map(|i| &self.domains[i].settings);
        match rule.and_then(|s| s.queue_to.as_ref()) {
            Some(q) => q.trim_start_matches('{').trim_end_matches('}').to_string(),
            None => domain,
        }
    }

    pub fn target(&self, name: &str) -> Option<Target<'_>> {
        if let Some(v) = self.vmtas.get(name) {
            return Some(Target::Vmta(v));
        }
        self.pools.get(name).map(Target::Pool)
    }

    /// The VMTA (or pool) a `<pattern-list>` routes this envelope to, if any rule matches.
    pub fn route_by_pattern_list(&self, list: &str, mail_from: &str, rcpt: &str) -> Option<&str> {
        let l = self.routing_lists.get(list)?;
        l.rules.iter().find_map(|r| {
            let subject = if r.field == "mail-from" {
                mail_from
            } else {
                rcpt
            };
            r.regex.is_match(subject).then_some(r.virtual_mta.as_str())
        })
    }

    /// Whether any client may relay to this domain (`relay-domain`).
    pub fn is_relay_domain(&self, domain: &str) -> bool {
        let d = domain.to_ascii_lowercase();
        self.relay_domains
            .iter()
            .any(|r| match r.strip_prefix("*.") {
                Some(s) => d.ends_with(&format!(".{s}")),
                None => *r == d,
            })
    }

    /// The processor that consumes mail to `address`: `("feedback", ..)` for
    /// `<feedback-loop-processor>` (checked first), `("bounce", ..)` for `<bounce-processor>`.
    pub fn report_processor(&self, address: &str) -> Option<(&'static str, &Processor)> {
        if let Some(p) = self
            .feedback_processor
            .as_ref()
            .filter(|p| p.matches(address))
        {
            return Some(("feedback", p));
        }
        self.bounce_processor
            .as_ref()
            .filter(|p| p.matches(address))
            .map(|p| ("bounce", p))
    }

    /// DKIM key for a From domain: the VMTA's keys first, then global ones; `*` matches any.
    pub fn dkim_key(&self, vmta: Option<&str>, from_domain: &str) -> Option<&DomainKey> {
        let d = from_domain.to_ascii_lowercase();
        let vkeys = vmta
            .and_then(|v| self.vmtas.get(v))
            .map(|v| v.domain_keys.as_slice())
            .unwrap_or(&[]);
        let pick = |keys: &'_ [DomainKey]| -> Option<usize> {
            keys.iter()
                .position(|k| k.domain == d)
                .or_else(|| keys.iter().position(|k| k.domain == "*"))
        };
        if let Some(i) = pick(vkeys) {
            return Some(&vkeys[i]);
        }
        pick(&self.domain_keys).map(|i| &self.domain_keys[i])
    }

    /// An smtp-user's password check: a constant-time comparison with a plain `password`, or
    /// an argon2 verification against `password-hash` (tens of milliseconds: call it off the
    /// async threads).
    pub fn check_user(&self, user: &str, password: &str) -> Option<&SmtpUserSettings> {
        let u = self.smtp_users.get(user)?;
        let ok = match (&u.password, &u.password_hash) {
            (Some(want), _) => super::secrets::same_bytes(want.as_bytes(), password.as_bytes()),
            (None, Some(hash)) => super::secrets::verify(&hash.0, password),
            (None, None) => false,
        };
        ok.then_some(u)
    }
}

/// How specifically a CIDR rule matches a client, or None. A rule of prefix 0 (`0/0`,
/// `0.0.0.0/0`, `::/0`) matches every client, IPv4 and IPv6: that is what an operator writing
/// `<source 0/0>` means. Other rules match their own family; an IPv4-mapped IPv6 client is an
/// IPv4 client. Between equal prefixes, a rule of the client's own family wins.
pub fn cidr_rank(c: &ipnet::IpNet, ip: IpAddr) -> Option<(u8, bool)> {
    let ip = canonical_ip(ip);
    let same_family = c.addr().is_ipv4() == ip.is_ipv4();
    (c.prefix_len() == 0 || c.contains(&ip)).then_some((c.prefix_len(), same_family))
}

/// IPv4-mapped IPv6 clients are matched as IPv4.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}
