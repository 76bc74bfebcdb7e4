//! Why the policy does what it does: the settings for a destination with the `file:line` each
//! comes from (`sluice show settings`), and one recipient's way through the policy step by step
//! (`sluice explain`). Both follow the same functions ingress and the scheduler use.

use std::collections::BTreeSet;
use std::net::IpAddr;

use super::model::*;
use super::resolve::Target;
use super::value::unquote;

/// One effective directive: its value as written and where (`default`: Sluice's own).
#[derive(Debug, Clone, PartialEq)]
pub struct Effective {
    pub name: String,
    pub value: String,
    pub source: String,
}

/// Sluice's built-in delivery defaults as text (`resolve::builtin_domain_defaults`, which a
/// test holds these to).
pub const BUILTIN_DEFAULT_TEXT: &[(&str, &str)] = &[
    ("max-smtp-out", "20"),
    ("max-msg-per-connection", "100"),
    ("max-errors-per-connection", "10"),
    ("max-rcpt-per-message", "100"),
    ("retry-after", "10m"),
    ("bounce-after", "4d12h"),
    ("connect-timeout", "1m"),
    ("smtp-greeting-timeout", "5m"),
    ("smtp-command-timeout", "5m"),
    ("data-send-timeout", "3m"),
    ("smtp-data-termination-timeout", "10m"),
    ("mx-connection-attempts", "10"),
    ("use-starttls", "yes"),
    ("backoff-retry-after", "1h"),
    ("backoff-max-smtp-out", "2"),
    ("queue-priority", "50"),
];

/// The `<domain>` rules that apply to a destination through a VMTA, most specific first, as
/// `Policy::domain_settings` applies them.
pub fn rules_for<'a>(policy: &'a Policy, domain: &str, vmta: Option<&str>) -> Vec<&'a DomainRule> {
    let domain = domain.to_ascii_lowercase();
    let mut out = Vec::new();
    if let Some(v) = vmta.and_then(|v| policy.vmtas.get(v))
        && let Some(ix) = policy.vmta_index.get(&v.name)
    {
        out.extend(ix.best(&domain).map(|i| &v.domains[i]));
        out.extend(ix.any().map(|i| &v.domains[i]));
    }
    out.extend(policy.index.best(&domain).map(|i| &policy.domains[i]));
    out.extend(policy.index.any().map(|i| &policy.domains[i]));
    out
}

/// The effective delivery directives for a destination and where each comes from: the value
/// `Policy::domain_settings` resolves to, in the words of the file.
pub fn settings_for(policy: &Policy, domain: &str, vmta: Option<&str>) -> Vec<Effective> {
    let mut seen: BTreeSet<&'static str> = BTreeSet::new();
    let mut out = Vec::new();
    let mut take = |w_name: &str, value: &str, source: String, out: &mut Vec<Effective>| {
        if let Some(field) = DomainSettings::field_of(w_name)
            && seen.insert(field)
        {
            out.push(Effective {
                name: w_name.to_string(),
                value: unquote(value).to_string(),
                source,
            });
        }
    };
    // `route` and `smtp-hosts` are one choice: the most specific rule that makes it decides.
    let mut routed = false;
    for rule in rules_for(policy, domain, vmta) {
        let routes_here = rule.settings.route.is_some() || rule.settings.smtp_hosts.is_some();
        for w in &rule.written {
            if routed && matches!(w.name.as_str(), "route" | "smtp-hosts") {
                continue;
            }
            take(&w.name, &w.value, w.loc.to_string(), &mut out);
        }
        routed |= routes_here;
    }
    for w in &policy.global_written {
        take(&w.name, &w.value, w.loc.to_string(), &mut out);
    }
    for (name, value) in BUILTIN_DEFAULT_TEXT {
        take(name, value, "default".to_string(), &mut out);
    }
    out
}

/// A message's way through the policy, as `sluice explain` asks it.
#[derive(Debug, Default, Clone)]
pub struct Question {
    pub rcpt: String,
    pub mail_from: String,
    pub source_ip: Option<IpAddr>,
    /// The VMTA or pool asked for outside the headers (HTTP injection's `vmta`).
    pub vmta: String,
    /// Header fields, `Name: value`.
    pub headers: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub question: String,
    pub answer: String,
    pub source: String,
}

#[derive(Debug, Clone)]
pub struct Explanation {
    pub steps: Vec<Step>,
    pub settings: Vec<Effective>,
    /// The domain whose MX records the worker looks up; empty when the route is fixed.
    pub mx_domain: String,
}

fn loc_text(l: &Option<super::diag::Loc>) -> String {
    l.as_ref().map(|l| l.to_string()).unwrap_or_default()
}

/// Follows one recipient through the policy: the source rule, relaying, the VMTA or pool,
/// the queue, the domain rules and the effective settings, each with where it is written.
pub fn explain(policy: &Policy, q: &Question) -> Explanation {
    let mut steps = Vec::new();
    let mut step = |question: &str, answer: String, source: String| {
        steps.push(Step {
            question: question.to_string(),
            answer,
            source,
        })
    };
    let (local, domain) = q.rcpt.rsplit_once('@').unwrap_or((&q.rcpt, ""));
    let domain = domain.to_ascii_lowercase();
    // The source rule.
    let rule = q.source_ip.and_then(|ip| policy.source_rule_for_ip(ip));
    let source = rule.map(|r| r.settings.clone()).unwrap_or_default();
    match (q.source_ip, rule) {
        (None, _) => step(
            "source rule",
            "no client address given (--source): none".into(),
            String::new(),
        ),
        (Some(ip), Some(r)) => {
            let m = match &r.matches {
                SourceMatch::Cidr(c) => c.to_string(),
                SourceMatch::Named(n) => format!("{{{n}}}"),
            };
            step(
                "source rule",
                format!("<source {m}> matches {ip}"),
                loc_text(&r.loc),
            )
        }
        (Some(ip), None) => step(
            "source rule",
            format!("no <source> matches {ip}: Sluice's defaults (no relaying)"),
            String::new(),
        ),
    }
    // Relaying, as ingress decides it at RCPT.
    let trusted = source.always_allow_relaying == Some(true);
    let relay_domain = policy.is_relay_domain(&domain);
    let (relay, why) = if trusted {
        (
            true,
            "always-allow-relaying yes in the source rule".to_string(),
        )
    } else if relay_domain && local.contains(['%', '!', '@']) {
        (
            false,
            "550 5.7.1: a route in the local part of a relay-domain address is refused from an untrusted client".to_string(),
        )
    } else if relay_domain {
        (true, format!("{domain} is a relay-domain"))
    } else {
        (
            false,
            "550 5.7.1 relaying denied: not always-allow-relaying, not a relay-domain, not authenticated".to_string(),
        )
    };
    step(
        "relaying",
        format!("{} ({why})", if relay { "allowed" } else { "refused" }),
        String::new(),
    );
    // The VMTA or pool, as ingress picks it.
    let header_vmta = (source.process_x_virtual_mta == Some(true))
        .then(|| {
            // Ingress acts on the last one.
            q.headers.iter().rev().find_map(|h| {
                let (n, v) = h.split_once(':')?;
                n.trim()
                    .eq_ignore_ascii_case("x-virtual-mta")
                    .then(|| v.trim().to_string())
            })
        })
        .flatten();
    let (vmta, why) = if let Some(v) = header_vmta {
        (
            Ok(v),
            "X-Virtual-MTA header (process-x-virtual-mta yes)".to_string(),
        )
    } else if !q.vmta.is_empty() {
        (Ok(q.vmta.clone()), "asked for (--vmta)".to_string())
    } else {
        let local_ip = q
            .source_ip
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        let why = match (&source.pattern_list, &source.default_virtual_mta) {
            (Some(l), _) if policy
                .route_by_pattern_list(l, &q.mail_from, &q.rcpt)
                .is_some() => format!("pattern-list {l}"),
            (_, Some(v)) if v == BY_SOURCE_IP => {
                "default-virtual-mta by-smtp-source-ip (the VMTA of the address the message arrives on; --source stands in for it)".to_string()
            }
            (_, Some(_)) => "default-virtual-mta of the source rule".to_string(),
            _ => "the source rule names none".to_string(),
        };
        (
            policy.vmta_for(&source, &q.mail_from, &q.rcpt, local_ip),
            why,
        )
    };
    let vmta = match vmta {
        Ok(v) if v.is_empty() => {
            step(
                "virtual MTA",
                format!("none ({why}): sent from any worker's first source IP"),
                String::new(),
            );
            String::new()
        }
        Ok(v) => match policy.target(&v) {
            Some(Target::Vmta(t)) => {
                let ip = t
                    .source_ip
                    .map_or("any worker's first IP".to_string(), |ip| ip.to_string());
                step(
                    "virtual MTA",
                    format!("{v}, from {ip} ({why})"),
                    loc_text(&t.loc),
                );
                v
            }
            Some(Target::Pool(p)) => {
                step(
                    "virtual MTA",
                    format!("pool {v}: {} ({why})", p.members.join(", ")),
                    loc_text(&p.loc),
                );
                v
            }
            None => {
                step(
                    "virtual MTA",
                    format!("`{v}` is not a virtual-mta or pool: 550 5.7.1 ({why})"),
                    String::new(),
                );
                v
            }
        },
        Err(e) => {
            step("virtual MTA", format!("{e} ({why})"), String::new());
            String::new()
        }
    };
    // The queue.
    let queue = policy.queue_name(&domain);
    let rollup = if queue != domain {
        format!(" (queue-to rolls {domain} up into it)")
    } else {
        String::new()
    };
    step("queue", format!("{queue}/{vmta}{rollup}"), String::new());
    // A pool's members share the queue; its settings are read per member.
    let member = match policy.target(&vmta) {
        Some(Target::Pool(p)) => p.members.first().cloned(),
        Some(Target::Vmta(_)) => Some(vmta.clone()),
        None => None,
    };
    if let (Some(Target::Pool(_)), Some(m)) = (policy.target(&vmta), &member) {
        step(
            "pool member",
            format!(
                "settings below are {m}'s; other members differ only where their own <domain> blocks say so"
            ),
            String::new(),
        );
    }
    let rules = rules_for(policy, &queue, member.as_deref());
    if rules.is_empty() {
        step(
            "domain rules",
            "none: Sluice's defaults".into(),
            String::new(),
        );
    }
    for r in &rules {
        let scope = match &member {
            Some(m)
                if policy
                    .vmtas
                    .get(m)
                    .is_some_and(|v| v.domains.iter().any(|d| std::ptr::eq(d, *r))) =>
            {
                format!(" inside <virtual-mta {m}>")
            }
            _ => String::new(),
        };
        step(
            "domain rule",
            format!("<domain {}>{scope}", pattern_text(&r.pattern)),
            loc_text(&r.loc),
        );
    }
    let settings = settings_for(policy, &queue, member.as_deref());
    let chosen = settings
        .iter()
        .find(|e| e.name == "route" || e.name == "smtp-hosts");
    let (route, route_src) = match chosen {
        Some(e) => (format!("{} {}", e.name, e.value), e.source.clone()),
        None => (
            format!("MX records of {queue}, looked up by the worker"),
            String::new(),
        ),
    };
    step("delivered to", route, route_src);
    // As the scheduler tells the worker (`sched::delivery`).
    let eff = policy.domain_settings(&queue, member.as_deref());
    let mx_domain = match (&eff.route, &eff.smtp_hosts) {
        (Some(_), _) | (None, Some(SmtpHosts::Hosts(_))) => String::new(),
        (None, Some(SmtpHosts::LookupMx(d))) => d.clone(),
        (None, None) => queue.clone(),
    };
    Explanation {
        steps,
        settings,
        mx_domain,
    }
}

pub fn pattern_text(p: &DomainPattern) -> String {
    match p {
        DomainPattern::Exact(d) => d.clone(),
        DomainPattern::Wildcard(s) => format!("*.{s}"),
        DomainPattern::WithSubdomains(s) => format!(".{s}"),
        DomainPattern::Macro(m) => format!("${m}"),
        DomainPattern::Named(n) => format!("{{{n}}}"),
        DomainPattern::Any => "*".into(),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::policy::{LoadOptions, load_str, resolve::builtin_domain_defaults};

    const POLICY: &str = "\
retry-after 20m
<virtual-mta v1>
  smtp-source-host 127.0.0.11 v1.example.com
  <domain big.test>
    max-smtp-out 7
  </domain>
</virtual-mta>
<virtual-mta v2>
  smtp-source-host 127.0.0.12 v2.example.com
</virtual-mta>
<virtual-mta-pool p>
  virtual-mta v1
  virtual-mta v2
</virtual-mta-pool>
<source 10.0.0.0/8>
  always-allow-relaying yes
  process-x-virtual-mta yes
  default-virtual-mta p
</source>
<domain *>
  max-smtp-out 30
  bounce-after 3d
  route [127.0.0.1]:2526
</domain>
<domain big.test>
  max-msg-rate 100/m
  smtp-hosts [127.0.0.9]:25
</domain>
<domain *.rolled.test>
  queue-to rollup
</domain>
";

    fn policy() -> Policy {
        load_str(
            Path::new("p.conf"),
            POLICY,
            LoadOptions { read_files: false },
        )
        .unwrap()
        .policy
    }

    /// The explained directives, stored into a fresh block, give exactly what the resolver
    /// gives: the provenance is the resolution, not a second opinion.
    #[test]
    fn the_settings_explained_are_the_settings_applied() {
        let p = policy();
        for (domain, vmta) in [
            ("big.test", Some("v1")),
            ("big.test", Some("v2")),
            ("big.test", None),
            ("other.test", Some("v1")),
            ("x.rolled.test", None),
        ] {
            let mut rebuilt = DomainSettings::default();
            for e in settings_for(&p, domain, vmta) {
                assert!(
                    matches!(rebuilt.set(&e.name, &e.value), Some(Ok(()))),
                    "{domain}: {e:?} does not store"
                );
            }
            assert_eq!(
                rebuilt,
                p.domain_settings(domain, vmta),
                "{domain} via {vmta:?}"
            );
        }
        // With no rule at all, the text of the defaults is the defaults.
        let empty = Policy::default();
        let mut rebuilt = DomainSettings::default();
        for e in settings_for(&empty, "a.test", None) {
            assert_eq!(e.source, "default");
            rebuilt.set(&e.name, &e.value);
        }
        assert_eq!(rebuilt, builtin_domain_defaults());
    }

    #[test]
    fn each_setting_names_the_line_it_comes_from() {
        let p = policy();
        let s = settings_for(&p, "big.test", Some("v1"));
        let at = |n: &str| s.iter().find(|e| e.name == n).unwrap().source.clone();
        assert_eq!(at("max-smtp-out"), "p.conf:5", "the VMTA's own block wins");
        assert_eq!(at("max-msg-rate"), "p.conf:26");
        assert_eq!(at("smtp-hosts"), "p.conf:27");
        assert_eq!(at("bounce-after"), "p.conf:22");
        assert_eq!(at("retry-after"), "p.conf:1");
        assert_eq!(at("connect-timeout"), "default");
        // The more specific rule chose where to connect: `<domain *>`'s route is not applied.
        assert!(!s.iter().any(|e| e.name == "route"), "{s:?}");
    }

    #[test]
    fn explain_follows_source_relaying_vmta_queue_and_rules() {
        let p = policy();
        let e = explain(
            &p,
            &Question {
                rcpt: "u@big.test".into(),
                mail_from: "s@example.com".into(),
                source_ip: Some("10.1.2.3".parse().unwrap()),
                headers: vec!["X-Virtual-MTA: v1".into()],
                ..Default::default()
            },
        );
        let text: Vec<String> = e
            .steps
            .iter()
            .map(|s| format!("{}: {} @{}", s.question, s.answer, s.source))
            .collect();
        let has = |want: &str| {
            assert!(
                text.iter().any(|t| t.contains(want)),
                "no `{want}` in {text:#?}"
            )
        };
        has("source rule: <source 10.0.0.0/8> matches 10.1.2.3 @p.conf:15");
        has("relaying: allowed (always-allow-relaying yes");
        has("virtual MTA: v1, from 127.0.0.11 (X-Virtual-MTA header");
        has("queue: big.test/v1");
        has("domain rule: <domain big.test> inside <virtual-mta v1> @p.conf:4");
        has("domain rule: <domain big.test> @p.conf:25");
        has("domain rule: <domain *> @p.conf:20");
        has("delivered to: smtp-hosts [127.0.0.9]:25 @p.conf:27");
        // Without the header: the source's default pool; a rollup; refused relaying.
        let e = explain(
            &p,
            &Question {
                rcpt: "u@x.rolled.test".into(),
                source_ip: Some("192.0.2.1".parse().unwrap()),
                ..Default::default()
            },
        );
        let text: Vec<String> = e
            .steps
            .iter()
            .map(|s| format!("{}: {}", s.question, s.answer))
            .collect();
        assert!(
            text.iter().any(|t| t.starts_with("relaying: refused")),
            "{text:#?}"
        );
        assert!(
            text.iter().any(|t| t.contains("queue: rollup/")),
            "{text:#?}"
        );
        assert_eq!(e.mx_domain, "", "<domain *> routes to a fixed host");
        let e = explain(
            &p,
            &Question {
                rcpt: "u@other.test".into(),
                source_ip: Some("10.0.0.1".parse().unwrap()),
                ..Default::default()
            },
        );
        let text: Vec<String> = e
            .steps
            .iter()
            .map(|s| format!("{}: {}", s.question, s.answer))
            .collect();
        assert!(
            text.iter()
                .any(|t| t.contains("virtual MTA: pool p: v1, v2 (default-virtual-mta")),
            "{text:#?}"
        );
        assert!(
            text.iter()
                .any(|t| t.contains("delivered to: route [127.0.0.1]:2526")),
            "{text:#?}"
        );
    }
}
