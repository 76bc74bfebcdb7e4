//! Bounce classification: Sluice's own default rules, after the policy's
//! `<bounce-category-patterns>` (first match wins). Patterns are matched against
//! "CODE ENHANCED TEXT" of the failure, e.g. "550 5.1.1 user unknown".

use std::sync::LazyLock;

use regex::Regex;
use sluice_common::policy::Policy;

/// (regex, category), tried in order after the policy's patterns.
const DEFAULT_RULES: &[(&str, &str)] = &[
    // A reply about the sender is never about the recipient, whatever its status code.
    (
        r"sender (address )?(rejected|invalid|unknown|denied|refused)|not allowed to send from|spf (record|check|fail)",
        "invalid-sender",
    ),
    (r"^\d{3} 5\.1\.[01]\b|^\d{3} [45]\.1\.1\b", "bad-mailbox"),
    // X.1.6: the mailbox has moved, no forwarding address.
    (r"^\d{3} [45]\.1\.6\b", "bad-mailbox"),
    // X.1.2 bad destination system, X.1.10 null MX (RFC 7505), X.4.4 unable to route.
    (
        r"^\d{3} [45]\.1\.2\b|^\d{3} [45]\.1\.10\b|^\d{3} [45]\.4\.4\b",
        "bad-domain",
    ),
    // What the text says about the address outweighs a vaguer status code.
    (
        r"mailbox (is )?full|over ?quota|quota exceeded|exceeded storage|insufficient (system )?storage|mailbox size limit",
        "quota-issues",
    ),
    (
        r"(user|mailbox|recipient|address|account)\S* (is )?(temporar(il)?y )?(disabled|inactive|suspended|deactivated|expired|locked)|account (has been )?(closed|disabled)",
        "inactive-mailbox",
    ),
    (
        r"no such (user|mailbox|recipient|address)|(user|mailbox|recipient|address|userid)\S* (is )?(unknown|not found|does not exist|doesn't exist|not exist|invalid|not listed)|unknown (user|recipient|mailbox|address)|invalid (recipient|mailbox|address|final delivery userid)|not a valid (mailbox|recipient)|undeliverable address|address rejected: user|(user|recipient|address) not found|not listed in (the )?(domino directory|public name|address book)|doesn'?t have an? \S+ account|no longer on (this )?server|not our (user|customer)|address wasn\S{0,3}t found|no valid recipients|no mailbox (here )?by that name|recipient address rejected: access denied|recipient name is not recognized",
        "bad-mailbox",
    ),
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
    // A resolver that failed is not an answer about the domain.
    (
        r"name service error|name server reply|dns (lookup )?(error|failure|timeout)|temporary (dns|lookup) failure",
        "routing-errors",
    ),
    (
        r"host (or domain name )?not found|host unknown|unknown host|domain (not found|does not exist)|no such domain|invalid domain|domain is not reachable|unrouteable|unroutable|nxdomain|no mx|null mx|does not accept mail|host name lookup|(couldn't|could not|cannot|can't) find (a )?mail exchanger|no mail exchanger",
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
/// `other`. `after_data` says the reply came to DATA or to the end of data, when every
/// recipient had already been accepted: an "unknown user" there without an X.1.1 status is
/// a filter's verdict (policy-related).
pub fn classify(
    policy: Option<&Policy>,
    code: u16,
    enhanced: &str,
    text: &str,
    after_data: bool,
) -> String {
    let s = subject(code, enhanced, text);
    if let Some(p) = policy
        && let Some(b) = p.bounce_patterns.iter().find(|b| b.regex.is_match(&s))
    {
        return b.category.clone();
    }
    let cat = COMPILED
        .iter()
        .find(|(re, _)| re.is_match(&s))
        .map(|(_, c)| *c)
        .unwrap_or("other");
    if after_data && cat == "bad-mailbox" && !enhanced.ends_with(".1.1") {
        return "policy-related".into();
    }
    cat.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        assert_eq!(
            classify(None, 550, "5.1.1", "user unknown", false),
            "bad-mailbox"
        );
        assert_eq!(
            classify(None, 552, "5.2.2", "mailbox full", false),
            "quota-issues"
        );
        assert_eq!(
            classify(None, 554, "5.7.1", "blocked using spamhaus", false),
            "spam-related"
        );
        assert_eq!(
            classify(None, 550, "", "Relaying denied", false),
            "relaying-issues"
        );
        assert_eq!(
            classify(None, 421, "4.4.2", "connection timed out", false),
            "no-answer-from-host"
        );
        assert_eq!(classify(None, 550, "", "something odd", false), "other");
    }

    #[test]
    fn the_stage_and_the_subject_of_the_reply_count() {
        // After DATA every recipient was accepted: a generic "user unknown" is a filter.
        assert_eq!(
            classify(None, 550, "", "Unknown user k@example.jp", true),
            "policy-related"
        );
        assert_eq!(
            classify(None, 550, "", "Unknown user k@example.jp", false),
            "bad-mailbox"
        );
        // An explicit X.1.1 still says the mailbox does not exist.
        assert_eq!(
            classify(None, 550, "5.1.1", "mailbox unavailable", true),
            "bad-mailbox"
        );
        // A reply about the sender is not about the recipient, whatever the code.
        assert_eq!(
            classify(None, 550, "5.1.0", "<b@example.com> sender rejected", false),
            "invalid-sender"
        );
        // The remote's "mailbox full" inside a relay's "unknown address" wrapper.
        assert_eq!(
            classify(
                None,
                550,
                "5.0.0",
                "5.1.0 - Unknown address error 550-'5.2.2 <k@example.jp>... Mailbox Full'",
                false
            ),
            "quota-issues"
        );
        assert_eq!(
            classify(
                None,
                550,
                "5.4.4",
                "Sorry, I couldn't find a mail exchanger",
                false
            ),
            "bad-domain"
        );
    }
}
