//! Bounce classification: Sluice's own default rules, after the policy's
//! `<bounce-category-patterns>` (first match wins). Patterns are matched against
//! "CODE ENHANCED TEXT" of the failure, e.g. "550 5.1.1 user unknown".

use std::sync::LazyLock;

use regex::Regex;
use sluice_common::policy::Policy;

/// (regex, category), tried in order after the policy's patterns.
const DEFAULT_RULES: &[(&str, &str)] = &[
    (r"^\d{3} 5\.1\.[01]\b|^\d{3} [45]\.1\.1\b", "bad-mailbox"),
    (r"^\d{3} [45]\.1\.2\b", "bad-domain"),
    (r"^\d{3} [45]\.1\.[78]\b", "invalid-sender"),
    (r"^\d{3} [45]\.2\.1\b", "inactive-mailbox"),
    (r"^\d{3} [45]\.2\.2\b|^\d{3} [45]\.2\.3\b", "quota-issues"),
    (r"^\d{3} [45]\.4\.7\b", "message-expired"),
    (
        r"retry time (not reached|exceeded)|delivery time expired|too long in (the )?queue|could not be delivered for \d|(message|delivery) (has )?expired|giving up on|deferred for too long|delay(ed)? for more than|could not deliver for",
        "message-expired",
    ),
    (
        r"^\d{3} [45]\.7\.1\b.*(spam|blacklist|blocklist|listed|reputation|rbl|dnsbl|spamhaus)",
        "spam-related",
    ),
    (r"virus|malware|infected", "virus-related"),
    (
        r"spam|junk|blacklist|blocklist|block ?list|rbl|dnsbl|spamhaus|spamcop|reputation|listed at",
        "spam-related",
    ),
    (
        r"mailbox (is )?full|over ?quota|quota exceeded|exceeded storage|insufficient (system )?storage|mailbox size limit",
        "quota-issues",
    ),
    (
        r"(user|mailbox|recipient|address|account)\S* (is )?(disabled|inactive|suspended|deactivated|expired)|account (has been )?(closed|disabled)",
        "inactive-mailbox",
    ),
    (
        r"no such (user|mailbox|recipient|address)|(user|mailbox|recipient|address)\S* (unknown|not found|does not exist|doesn't exist|invalid|unavailable)|unknown (user|recipient|mailbox)|invalid (recipient|mailbox|address)|not a valid (mailbox|recipient)|undeliverable address|user not found|address rejected",
        "bad-mailbox",
    ),
    (
        r"host (or domain name )?not found|domain (not found|does not exist)|no such domain|unrouteable|unroutable|nxdomain|no mx|null mx",
        "bad-domain",
    ),
    (
        r"relay(ing)? (access )?(denied|not permitted|prohibited)|not permitted to relay|unable to relay",
        "relaying-issues",
    ),
    (
        r"sender (address )?(rejected|invalid|unknown|domain)|mail from .*rejected|spf|dmarc|dkim",
        "invalid-sender",
    ),
    (
        r"message (size )?exceeds|too (big|large)|size limit|content|attachment|message rejected",
        "content-related",
    ),
    (
        r"policy|not allowed|denied|prohibited|refused|rejected|administrative",
        "policy-related",
    ),
    (
        r"timed? ?out|timeout|no answer|connection (refused|reset)|could not connect",
        "no-answer-from-host",
    ),
    (
        r"tls|ssl|certificate|connection (lost|dropped|closed)",
        "bad-connection",
    ),
    (
        r"syntax|command not recognized|bad sequence|protocol",
        "protocol-errors",
    ),
    (r"loop|too many hops|routing", "routing-errors"),
    (
        r"^\d{3} [45]\.3\.5\b|misconfigur|configuration",
        "bad-configuration",
    ),
];

static COMPILED: LazyLock<Vec<(Regex, &'static str)>> = LazyLock::new(|| {
    DEFAULT_RULES
        .iter()
        .map(|(re, cat)| {
            (
                regex::RegexBuilder::new(re)
                    .case_insensitive(true)
                    .build()
                    .expect("default rule compiles"),
                *cat,
            )
        })
        .collect()
});

/// The subject that patterns are matched against.
pub fn subject(code: u16, enhanced: &str, text: &str) -> String {
    format!("{code} {enhanced} {text}")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The bounce category of a failure: the policy's patterns, then Sluice's defaults, then
/// `other`.
pub fn classify(policy: Option<&Policy>, code: u16, enhanced: &str, text: &str) -> String {
    let s = subject(code, enhanced, text);
    if let Some(p) = policy
        && let Some(b) = p.bounce_patterns.iter().find(|b| b.regex.is_match(&s))
    {
        return b.category.clone();
    }
    COMPILED
        .iter()
        .find(|(re, _)| re.is_match(&s))
        .map(|(_, c)| c.to_string())
        .unwrap_or_else(|| "other".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        assert_eq!(classify(None, 550, "5.1.1", "user unknown"), "bad-mailbox");
        assert_eq!(classify(None, 552, "5.2.2", "mailbox full"), "quota-issues");
        assert_eq!(
            classify(None, 554, "5.7.1", "blocked using spamhaus"),
            "spam-related"
        );
        assert_eq!(
            classify(None, 550, "", "Relaying denied"),
            "relaying-issues"
        );
        assert_eq!(
            classify(None, 421, "4.4.2", "connection timed out"),
            "no-answer-from-host"
        );
        assert_eq!(classify(None, 550, "", "something odd"), "other");
    }
}
