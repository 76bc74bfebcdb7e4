//! What a worker needs to deliver a lease: the route, the source IP and EHLO name, TLS
//! policy, time limits, and which DKIM key. Decided here only.

use std::net::IpAddr;

use sluice_common::policy::{DomainSettings, Policy, SmtpHosts};
use sluice_proto::lease::DeliverySettings;

use crate::queue::command::QueueKey;

fn ms(d: Option<sluice_common::policy::value::PDuration>, default: u64) -> u64 {
    d.map(|d| d.secs() * 1000).unwrap_or(default)
}

pub fn settings_for(
    policy: &Policy,
    key: &QueueKey,
    member: &str,
    source_ip: Option<IpAddr>,
    rule: &DomainSettings,
) -> DeliverySettings {
    let vmta = policy.vmtas.get(member);
    let ehlo = vmta
        .and_then(|v| v.ehlo_name.clone().or_else(|| v.settings.host_name.clone()))
        .or_else(|| policy.global.host_name.clone())
        .unwrap_or_else(|| "localhost".into());
    let (hosts, mx_domain) = match (&rule.route, &rule.smtp_hosts) {
        (Some(r), _) => (vec![r.to_string()], String::new()),
        (None, Some(SmtpHosts::Hosts(h))) => {
            (h.iter().map(|h| h.to_string()).collect(), String::new())
        }
        (None, Some(SmtpHosts::LookupMx(d))) => (Vec::new(), d.clone()),
        (None, None) => (Vec::new(), key.dest.clone()),
    };
    let mut s = DeliverySettings {
        hosts,
        mx_domain,
        source_ip: source_ip.map(|i| i.to_string()).unwrap_or_default(),
        ehlo_name: ehlo,
        use_starttls: rule.use_starttls.unwrap_or(true),
        require_starttls: rule.require_starttls.unwrap_or(false),
        connect_timeout_ms: ms(rule.connect_timeout, 60_000),
        greeting_timeout_ms: ms(rule.smtp_greeting_timeout, 300_000),
        command_timeout_ms: ms(rule.smtp_command_timeout, 300_000),
        data_send_timeout_ms: ms(rule.data_send_timeout, 180_000),
        data_termination_timeout_ms: ms(rule.smtp_data_termination_timeout, 600_000),
        data_timeout_ms: ms(rule.data_send_timeout, 180_000)
            .max(ms(rule.smtp_data_termination_timeout, 600_000)),
        max_msg_per_connection: rule.max_msg_per_connection.unwrap_or(0),
        max_rcpt_per_message: rule.max_rcpt_per_message.unwrap_or(100),
        max_errors_per_connection: rule.max_errors_per_connection.unwrap_or(10),
        bounce_upon_no_mx: rule.bounce_upon_no_mx.unwrap_or(false),
        mx_connection_attempts: rule.mx_connection_attempts.unwrap_or(10),
        smtp_421_means_mx_unavailable: rule.smtp_421_means_mx_unavailable.unwrap_or(false),
        ignore_8bitmime: rule.ignore_8bitmime.unwrap_or(false),
        smtp_pattern_list: rule.smtp_pattern_list.clone().unwrap_or_default(),
        vmta: member.to_string(),
        ..Default::default()
    };
    if rule.dkim_sign == Some(true) {
        // The worker signs each message with the key of its From domain; the identity's
        // domain, when set, names the key to use for every message instead.
        let ident = rule
            .dkim_identity
            .as_deref()
            .and_then(|i| i.rsplit('@').next())
            .unwrap_or("");
        match policy.dkim_key(Some(member), if ident.is_empty() { "*" } else { ident }) {
            Some(k) if !ident.is_empty() => {
                s.dkim_selector = k.selector.clone();
                s.dkim_domain = k.domain.clone();
            }
            _ => s.dkim_selector = "*".into(),
        }
    }
    s
}
