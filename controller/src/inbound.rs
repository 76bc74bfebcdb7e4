//! Reports that come back after delivery: asynchronous bounces (RFC 3464 DSNs and the common
//! non-standard texts of qmail, Exim, Postfix, Exchange, Gmail, Yahoo, ...) and feedback-loop
//! complaints (ARF, RFC 5965), parsed into what an `rb` or `f` accounting row records. For a
//! bounce, the failure of each recipient is taken as a receiver sees it (the DSN's Status and
//! Diagnostic-Code, an `<address>:` paragraph, or the first SMTP reply in the text) and
//! classified with the same categories as a synchronous bounce.

use std::sync::LazyLock;

use regex::Regex;
use sluice_common::policy::Policy;

/// One recipient an asynchronous bounce reports.
#[derive(Debug, Clone, PartialEq)]
pub struct BouncedRecipient {
    /// The recipient as the report names it (empty when none could be recovered).
    pub address: String,
    pub code: u16,
    pub enhanced: String,
    pub diagnostic: String,
    pub category: String,
}

impl BouncedRecipient {
    /// Hard: the address (or its domain) does not exist; anything else may pass later.
    /// An asynchronous bounce is final whatever its status class (a 4.x.x `Action: failed`
    /// means the reporting MTA gave up), so only the category decides.
    pub fn hard(&self) -> bool {
        matches!(self.category.as_str(), "bad-mailbox" | "bad-domain")
    }
}

/// A DSN block whose Action is not a failure: delivered, relayed, expanded or delayed.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteStatus {
    pub address: String,
    pub action: String,
    pub status: String,
    pub diagnostic: String,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Bounce {
    pub recipients: Vec<BouncedRecipient>,
    /// Recipients the report says were not failed.
    pub statuses: Vec<RemoteStatus>,
    /// The message reads as a bounce (DSN fields, a reply code, a status, a failed-recipients
    /// header, text a bounce category knows, a returned copy), not only as text with an
    /// address in it.
    pub evidence: bool,
    /// Reporting-MTA, when the report names one.
    pub reporting_mta: String,
    /// Headers of the returned original message (lower-cased names), for the job and
    /// envelope id Sluice put there.
    pub original_headers: Vec<(String, String)>,
}

/// A feedback-loop report.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Complaint {
    pub feedback_type: String,
    /// `arf`, `jmrp` or `unsubscribe`.
    pub format: String,
    pub user_agent: String,
    pub reporting_mta: String,
    pub reported_domain: String,
    pub source_ip: String,
    pub arrival_ms: u64,
    /// The complaining recipient: Original-Rcpt-To, else the returned message's To.
    pub recipient: String,
    pub mail_from: String,
    pub original_headers: Vec<(String, String)>,
}

static STATUS: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)^status:\s*([245]\.\d{1,3}\.\d{1,3})").unwrap());
static DIAG: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)^diagnostic-code:\s*[^;]*;\s*(.*)$").unwrap());
static REPLY: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\b([245]\d\d)[ -]+(?:#?([245]\.\d{1,3}\.\d{1,3})\b)?").unwrap());
static ADDR_PARAGRAPH: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^\s*<?([^\s<>@:]+@[^\s<>:]+?)>?:").unwrap());
static FINAL_RCPT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?i)^(final|original)-recipient:\s*(?:rfc822\s*;)?\s*<?([^\s<>;]+@[^\s<>;]+?)>?\s*$",
    )
    .unwrap()
});
static ANY_ADDR: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"<?([A-Za-z0-9._%+=!#$&'*/?^`{|}~-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+)>?").unwrap()
});
static QMAIL_STATUS: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\(#([245]\.\d{1,3}\.\d{1,3})\)").unwrap());

/// Header-style lines with continuations joined (not across blank lines).
pub fn unfolded(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for l in text.lines() {
        if (l.starts_with(' ') || l.starts_with('\t'))
            && lines.last().is_some_and(|p| !p.trim().is_empty())
        {
            let last = lines.last_mut().unwrap();
            last.push(' ');
            last.push_str(l.trim());
        } else {
            lines.push(l.to_string());
        }
    }
    lines
}

/// Where the returned original message starts, in the human-readable text.
fn is_original_marker(lower: &str) -> bool {
    lower.contains("original message follows")
        || lower
            .trim_start_matches(['-', ' '])
            .starts_with("original message")
        || lower.contains("below this line is a copy")
        || lower.contains("unsent message")
        || lower.contains("message header follows")
        || lower.starts_with("content-type: message/rfc822")
        || lower.starts_with("content-type: text/rfc822-headers")
        || lower.contains("this is a copy of")
}

/// Addresses that are never the failed recipient.
fn is_system_address(a: &str) -> bool {
    let local = a.split('@').next().unwrap_or("").to_ascii_lowercase();
    matches!(
        local.as_str(),
        "mailer-daemon" | "postmaster" | "noreply" | "no-reply" | "root" | "abuse"
    )
}

/// (address, code, enhanced status, diagnostic) per recipient when a bounce reports several
/// (or one, with its address): the per-recipient blocks of a DSN, or the `<address>:`
/// paragraphs qmail and others write.
/// (address, reply code, enhanced status, diagnostic) of one failed recipient.
type Failed = (String, u16, String, String);

fn per_recipient(lines: &[String]) -> (Vec<Failed>, Vec<RemoteStatus>) {
    // (address, status, diagnostic, action)
    let mut blocks: Vec<(String, String, String, String)> = Vec::new();
    let mut original: Option<String> = None;
    let mut open = false;
    for l in lines {
        if l.trim().is_empty() {
            (open, original) = (false, None);
            continue;
        }
        if let Some(c) = FINAL_RCPT.captures(l) {
            if c[1].eq_ignore_ascii_case("original") {
                original = Some(c[2].to_string());
                continue;
            }
            // The original recipient (as the sender wrote it) wins over the final one.
            let address = original.take().unwrap_or_else(|| c[2].to_string());
            blocks.push((address, String::new(), String::new(), String::new()));
            open = true;
        } else if open && let Some(b) = blocks.last_mut() {
            let lower = l.to_ascii_lowercase();
            if let Some(action) = lower.strip_prefix("action:") {
                b.3 = action
                    .trim()
                    .split([' ', '('])
                    .next()
                    .unwrap_or("")
                    .to_string();
            } else if let Some(c) = STATUS.captures(l) {
                b.1 = c[1].to_string();
            } else if let Some(c) = DIAG.captures(l) {
                b.2 = c[1].trim().to_string();
            }
        }
    }
    // Blocks whose Action is not a failure are remote status reports (`rs` rows).
    let (statuses, blocks): (Vec<_>, Vec<_>) = blocks.into_iter().partition(|b| {
        matches!(
            b.3.as_str(),
            "delivered" | "relayed" | "expanded" | "delayed"
        )
    });
    let statuses: Vec<RemoteStatus> = statuses
        .into_iter()
        .map(|(address, status, diagnostic, action)| RemoteStatus {
            address,
            action,
            status,
            diagnostic,
        })
        .collect();
    let mut blocks: Vec<(String, String, String)> =
        blocks.into_iter().map(|(a, s, d, _)| (a, s, d)).collect();
    // Text paragraphs only when the report has no DSN blocks at all: a delay or delivery
    // report's text must not turn into a failure.
    if blocks.is_empty() && statuses.is_empty() {
        for l in lines {
            let lower = l.to_ascii_lowercase();
            if is_original_marker(&lower) {
                break;
            }
            if let Some(c) = ADDR_PARAGRAPH.captures(l) {
                blocks.push((c[1].to_string(), String::new(), l.clone()));
            } else if let Some(b) = blocks.last_mut()
                && !l.trim().is_empty()
            {
                b.2.push(' ');
                b.2.push_str(l.trim());
            }
        }
        blocks.retain(|b| REPLY.is_match(&b.2) && !is_system_address(&b.0));
    }
    let failed = blocks
        .into_iter()
        .map(|(address, status, diag)| {
            let caps = REPLY.captures(&diag);
            let code = caps.as_ref().and_then(|c| c[1].parse().ok()).unwrap_or(
                match status.chars().next() {
                    Some('4') => 450,
                    Some('2') => 250,
                    _ => 550,
                },
            );
            // The remote's own reply outranks the Status the reporting MTA wrote.
            let enhanced = caps
                .and_then(|c| c.get(2))
                .map(|m| m.as_str().to_string())
                .unwrap_or(status);
            (address, code, enhanced, diag)
        })
        .collect();
    (failed, statuses)
}

/// (code, enhanced status, diagnostic text) of the whole bounce: its first Status and
/// Diagnostic-Code, or the human-readable text without its header and the returned message.
fn failure_of(lines: &[String]) -> (u16, String, String) {
    let status = lines
        .iter()
        .find_map(|l| STATUS.captures(l).map(|c| c[1].to_string()))
        .unwrap_or_default();
    let diag = lines
        .iter()
        .find_map(|l| DIAG.captures(l).map(|c| c[1].trim().to_string()));
    let (diag, code_from_text) = match diag {
        Some(d) => {
            let code = REPLY.captures(&d).and_then(|c| c[1].parse().ok());
            (d, code)
        }
        None => {
            let body_start = lines.iter().position(|l| l.trim().is_empty()).unwrap_or(0);
            let mut human = Vec::new();
            for l in &lines[body_start..] {
                let t = l.trim();
                let lower = t.to_ascii_lowercase();
                if is_original_marker(&lower) || lower.starts_with("------ this is a copy") {
                    break;
                }
                if lower.starts_with("received:")
                    || lower.starts_with("x-received:")
                    || lower.starts_with("content-")
                    || t.starts_with("--")
                {
                    continue;
                }
                human.push(t.to_string());
            }
            // The bounce's own Subject often names the failure ("Host unknown").
            let subject = lines[..body_start]
                .iter()
                .find_map(|l| l.strip_prefix("Subject:"))
                .unwrap_or("");
            human.push(subject.trim().to_string());
            let text = human.join(" ");
            let code = human
                .iter()
                .find_map(|l| REPLY.captures(l).and_then(|c| c[1].parse().ok()));
            (text, code)
        }
    };
    let code = code_from_text.unwrap_or(match status.chars().next() {
        Some('4') => 450,
        Some('2') => 250,
        _ => 550,
    });
    let enhanced = REPLY
        .captures(&diag)
        .and_then(|c| c.get(2))
        .or_else(|| QMAIL_STATUS.captures(&diag).and_then(|c| c.get(1)))
        .map(|m| m.as_str().to_string())
        .unwrap_or(status);
    (code, enhanced, diag)
}

/// Whether the failing reply answered DATA or the end of data: Postfix's "in reply to end of
/// DATA command", Exim's "after end of data", or a sendmail transcript where the only failing
/// `<<<` line follows `>>> DATA`.
pub fn after_data(text: &str) -> bool {
    static DATA: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r"(?i)in reply to (end of )?data|after (end of )?data\b").unwrap()
    });
    // Only the report speaks: not the returned message after its marker.
    let end = text
        .lines()
        .scan(0usize, |at, l| {
            let start = *at;
            *at += l.len() + 1;
            Some((start, l))
        })
        .find(|(_, l)| is_original_marker(&l.to_ascii_lowercase()))
        .map_or(text.len(), |(start, _)| start);
    let text = &text[..end.min(text.len())];
    if DATA.is_match(text) {
        return true;
    }
    let lines: Vec<&str> = text.lines().map(str::trim_start).collect();
    if let Some(at) = lines
        .iter()
        .rposition(|l| l.eq_ignore_ascii_case(">>> DATA"))
    {
        let replies: Vec<&&str> = lines[at + 1..]
            .iter()
            .take_while(|l| !l.starts_with(">>> "))
            .filter(|l| l.starts_with("<<< "))
            .collect();
        return replies.len() == 1
            && (replies[0].starts_with("<<< 5") || replies[0].starts_with("<<< 4"));
    }
    false
}

/// The header fields of the message returned inside a report (after its marker or MIME part).
fn returned_headers(lines: &[String]) -> Vec<(String, String)> {
    let Some(at) = lines
        .iter()
        .position(|l| is_original_marker(&l.to_ascii_lowercase()))
    else {
        return Vec::new();
    };
    // Blocks of header fields after the marker; the first that looks like a message's header
    // (a MIME part's own Content-* fields come first in some reports).
    let mut block: Vec<(String, String)> = Vec::new();
    let is_message = |b: &[(String, String)]| {
        b.iter()
            .any(|(n, _)| matches!(n.as_str(), "from" | "to" | "message-id"))
    };
    for l in &lines[at + 1..] {
        if l.trim().is_empty() {
            if is_message(&block) {
                return block;
            }
            block.clear();
            continue;
        }
        match l.split_once(':') {
            Some((name, value))
                if !name.is_empty()
                    && !name.contains(' ')
                    && name.bytes().all(|b| b.is_ascii_graphic()) =>
            {
                block.push((name.to_ascii_lowercase(), value.trim().to_string()));
            }
            _ => {
                if is_message(&block) {
                    return block;
                }
                block.clear();
            }
        }
    }
    if is_message(&block) {
        block
    } else {
        Vec::new()
    }
}

/// The failed recipient of a bounce that reports one without a DSN block or an `<address>:`
/// paragraph: `X-Failed-Recipients`, else the first address in the human-readable text that
/// is not the report's own sender or a system address, else the returned message's `To`.
fn lone_recipient(lines: &[String], returned: &[(String, String)]) -> String {
    let body_start = lines.iter().position(|l| l.trim().is_empty()).unwrap_or(0);
    let header = &lines[..body_start];
    if let Some(v) = header.iter().find_map(|l| {
        l.split_once(':')
            .filter(|(n, _)| n.eq_ignore_ascii_case("x-failed-recipients"))
            .map(|(_, v)| v.trim().to_string())
    }) && let Some(c) = ANY_ADDR.captures(&v)
    {
        return c[1].to_string();
    }
    let from_header = |name: &str| {
        header
            .iter()
            .find_map(|l| {
                l.split_once(':')
                    .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                    .and_then(|(_, v)| ANY_ADDR.captures(v).map(|c| c[1].to_ascii_lowercase()))
            })
            .unwrap_or_default()
    };
    let (own_from, own_to) = (from_header("from"), from_header("to"));
    for l in &lines[body_start..] {
        let lower = l.to_ascii_lowercase();
        if is_original_marker(&lower) {
            break;
        }
        if lower.starts_with("received:")
            || lower.starts_with("message-id:")
            || lower.contains("reporting-mta")
        {
            continue;
        }
        for c in ANY_ADDR.captures_iter(l) {
            let a = c[1].trim_end_matches('.').to_string();
            let al = a.to_ascii_lowercase();
            if al != own_from && al != own_to && !is_system_address(&a) {
                return a;
            }
        }
    }
    returned
        .iter()
        .find(|(n, _)| n == "to")
        .and_then(|(_, v)| ANY_ADDR.captures(v).map(|c| c[1].to_string()))
        .unwrap_or_default()
}

/// Parses an asynchronous bounce. Classification uses the policy's
/// `<bounce-category-patterns>` first, as for synchronous bounces.
pub fn parse_bounce(message: &[u8], policy: Option<&Policy>) -> Bounce {
    let text = String::from_utf8_lossy(message);
    let lines = unfolded(&text);
    let returned = returned_headers(&lines);
    let data = after_data(&text);
    let (mut each, statuses) = per_recipient(&lines);
    let had_blocks = !each.is_empty();
    let (code, enhanced, diag) = failure_of(&lines);
    // What tells a bounce from other mail: DSN blocks or `<address>:` paragraphs with a
    // reply, X-Failed-Recipients, or an SMTP reply code or status in the text.
    let evidence = had_blocks
        || !statuses.is_empty()
        || REPLY.is_match(&diag)
        || QMAIL_STATUS.is_match(&diag)
        || lines.iter().any(|l| STATUS.is_match(l));
    let failed: Vec<String> = {
        let body_start = lines.iter().position(|l| l.trim().is_empty()).unwrap_or(0);
        lines[..body_start]
            .iter()
            .filter_map(|l| {
                l.split_once(':')
                    .filter(|(n, _)| n.eq_ignore_ascii_case("x-failed-recipients"))
                    .map(|(_, v)| v.to_string())
            })
            .flat_map(|v| {
                ANY_ADDR
                    .captures_iter(&v)
                    .map(|c| c[1].to_string())
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let listed = !failed.is_empty();
    match each.len() {
        // Only remote statuses (a delay or delivery report): no failure to read.
        0 if !statuses.is_empty() => {}
        // Exim names every failed recipient in X-Failed-Recipients.
        0 if failed.len() > 1 => {
            for a in failed {
                each.push((a, code, enhanced.clone(), diag.clone()));
            }
        }
        0 => each.push((lone_recipient(&lines, &returned), code, enhanced, diag)),
        // One recipient: the whole report's failure, which also reads the text around it.
        1 => each[0] = (std::mem::take(&mut each[0].0), code, enhanced, diag),
        _ => {}
    }
    let reporting_mta = lines
        .iter()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(n, _)| n.eq_ignore_ascii_case("reporting-mta"))
                .map(|(_, v)| v.rsplit(';').next().unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let recipients: Vec<BouncedRecipient> = each
        .into_iter()
        .map(|(address, code, enhanced, diagnostic)| BouncedRecipient {
            category: crate::bounce::classify(policy, code, &enhanced, &diagnostic, data),
            address,
            code,
            enhanced,
            diagnostic,
        })
        .collect();
    // Or text that the bounce categories know ("user unknown", "mailbox full"), or a copy of
    // the message returned under a marker ("Below this line is a copy").
    let marker = lines
        .iter()
        .any(|l| is_original_marker(&l.to_ascii_lowercase()));
    let evidence = evidence || marker || recipients.iter().any(|r| r.category != "other");
    Bounce {
        recipients,
        statuses,
        evidence: evidence || listed,
        reporting_mta,
        original_headers: returned,
    }
}

/// The RFC 5965 token of a feedback type.
fn feedback_type_name(t: mail_auth::report::FeedbackType) -> &'static str {
    use mail_auth::report::FeedbackType as T;
    match t {
        T::Abuse => "abuse",
        T::AuthFailure => "auth-failure",
        T::Fraud => "fraud",
        T::NotSpam => "not-spam",
        T::Other => "other",
        T::Virus => "virus",
    }
}

/// A field of a report (the first `Name:` line, unfolded, anywhere in the text).
fn field<'a>(lines: &'a [String], name: &str) -> Option<&'a str> {
    lines.iter().find_map(|l| {
        l.split_once(':')
            .filter(|(n, _)| n.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
    })
}

fn address_in(v: &str) -> Option<String> {
    ANY_ADDR.captures(v).map(|c| c[1].to_string())
}

/// Parses a feedback-loop report: ARF (RFC 5965) with mail-auth, and the formats that are
/// not quite ARF: Hotmail's JMRP (`X-HmXmrOriginalRecipient` in the returned message), a
/// `message/feedback-report` part mislabelled or with `Removal-Recipient`, and an
/// unsubscribe sent by a mail client (`X-Apple-Unsubscribe`). None when the message is none
/// of these. The recipient is empty when the report does not name it (the RFC 5965 examples
/// redact it as `Undisclosed Recipients`).
pub fn parse_complaint(message: &[u8]) -> Option<Complaint> {
    let text = String::from_utf8_lossy(message);
    let lines = unfolded(&text);
    let body_start = lines.iter().position(|l| l.trim().is_empty()).unwrap_or(0);
    let own = &lines[..body_start];
    let own_to = field(own, "to").and_then(address_in).unwrap_or_default();
    // The returned message's header: after its part's own header, the first block of fields
    // that has a To or From.
    let returned: Vec<(String, String)> = {
        let rest = &lines[body_start..];
        let mut blocks: Vec<Vec<(String, String)>> = vec![Vec::new()];
        for l in rest {
            if l.trim().is_empty() {
                if !blocks.last().unwrap().is_empty() {
                    blocks.push(Vec::new());
                }
                continue;
            }
            if let Some((n, v)) = l.split_once(':')
                && !n.is_empty()
                && !n.contains(' ')
            {
                blocks
                    .last_mut()
                    .unwrap()
                    .push((n.to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        blocks
            .into_iter()
            .find(|b| b.iter().any(|(n, _)| n == "to") && b.iter().any(|(n, _)| n == "from"))
            .unwrap_or_default()
    };
    let returned_field = |name: &str| {
        returned
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let arf = mail_auth::report::Feedback::parse_rfc5322(message).ok();
    let unsubscribe =
        field(own, "x-apple-unsubscribe").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let jmrp = field(&lines, "x-hmxmroriginalrecipient").is_some();
    let feedback_type = match (&arf, field(&lines, "feedback-type")) {
        (Some(f), _) => feedback_type_name(f.feedback_type()).to_string(),
        (None, Some(t)) => t.to_ascii_lowercase(),
        (None, None) if jmrp => "abuse".into(),
        (None, None) if unsubscribe => "opt-out".into(),
        _ => return None,
    };
    let recipient = arf
        .as_ref()
        .and_then(|f| f.original_rcpt_to().and_then(address_in))
        .or_else(|| field(&lines, "original-rcpt-to").and_then(address_in))
        .or_else(|| field(&lines, "removal-recipient").and_then(address_in))
        .or_else(|| field(&lines, "x-hmxmroriginalrecipient").and_then(address_in))
        .or_else(|| {
            returned_field("to")
                .and_then(address_in)
                .filter(|a| !a.eq_ignore_ascii_case(&own_to))
        })
        // A mail client's unsubscribe comes from the recipient itself.
        .or_else(|| {
            unsubscribe
                .then(|| field(own, "from").and_then(address_in))
                .flatten()
        })
        .unwrap_or_default();
    let mail_from = arf
        .as_ref()
        .and_then(|f| f.original_mail_from().and_then(address_in))
        .or_else(|| field(&lines, "original-mail-from").and_then(address_in))
        .or_else(|| returned_field("from").and_then(address_in))
        .unwrap_or_default();
    let text_field = |name: &str| field(&lines, name).unwrap_or_default().to_string();
    let format = if arf.is_some() || field(&lines, "feedback-type").is_some() {
        "arf"
    } else if jmrp {
        "jmrp"
    } else {
        "unsubscribe"
    };
    Some(Complaint {
        feedback_type,
        format: format.into(),
        user_agent: arf
            .as_ref()
            .and_then(|f| f.user_agent().map(str::to_string))
            .unwrap_or_else(|| text_field("user-agent")),
        reporting_mta: arf
            .as_ref()
            .and_then(|f| f.reporting_mta().map(str::to_string))
            .unwrap_or_else(|| text_field("reporting-mta"))
            .rsplit(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_string(),
        reported_domain: arf
            .as_ref()
            .map(|f| {
                f.reported_domain()
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| text_field("reported-domain")),
        source_ip: arf
            .as_ref()
            .and_then(|f| f.source_ip().map(|ip| ip.to_string()))
            .unwrap_or_else(|| {
                let v = text_field("source-ip");
                if v.is_empty() {
                    text_field("x-reporter-ip")
                } else {
                    v
                }
            }),
        arrival_ms: arf
            .as_ref()
            .and_then(|f| f.arrival_date())
            .map(|s| s.max(0) as u64 * 1000)
            .unwrap_or(0),
        recipient,
        mail_from,
        original_headers: returned,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dsn_with_two_recipients() {
        let m = "From: MAILER-DAEMON@mx.test\r\nTo: s@senders.test\r\nSubject: failure\r\n\
                 Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n\r\n\
                 --b\r\n\r\nsorry\r\n--b\r\nContent-Type: message/delivery-status\r\n\r\n\
                 Reporting-MTA: dns; mx.test\r\n\r\nOriginal-Recipient: rfc822;A@x.test\r\n\
                 Final-Recipient: rfc822; a@x.test\r\nAction: failed\r\nStatus: 5.1.1\r\n\
                 Diagnostic-Code: smtp; 550 5.1.1 user unknown\r\n\r\n\
                 Final-Recipient: rfc822; b@x.test\r\nAction: failed\r\nStatus: 4.2.2\r\n\
                 Diagnostic-Code: smtp; 452 4.2.2 mailbox full\r\n\r\n--b\r\n\
                 Content-Type: text/rfc822-headers\r\n\r\nX-Job: j7\r\nTo: a@x.test\r\n\r\n--b--\r\n";
        let b = parse_bounce(m.as_bytes(), None);
        assert_eq!(b.reporting_mta, "mx.test");
        let got: Vec<(&str, &str, bool)> = b
            .recipients
            .iter()
            .map(|r| (r.address.as_str(), r.category.as_str(), r.hard()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("A@x.test", "bad-mailbox", true),
                ("b@x.test", "quota-issues", false)
            ]
        );
        assert!(b.original_headers.contains(&("x-job".into(), "j7".into())));
    }

    #[test]
    fn qmail_paragraphs_and_a_lone_recipient() {
        let q = "From: MAILER-DAEMON@q.test\nSubject: failure notice\n\nHi. This is the qmail-send program.\n\n\
                 <one@x.test>:\n550 5.1.1 no such user\n\n<two@x.test>:\n552 5.2.2 over quota\n\n\
                 --- Below this line is a copy of the message.\n\nTo: one@x.test\n";
        let b = parse_bounce(q.as_bytes(), None);
        let addrs: Vec<&str> = b.recipients.iter().map(|r| r.address.as_str()).collect();
        assert_eq!(addrs, vec!["one@x.test", "two@x.test"]);
        let g = "From: Mail Delivery Subsystem <mailer-daemon@googlemail.com>\nTo: s@senders.test\n\
                 Subject: Delivery Status Notification (Failure)\n\n\
                 Delivery to the following recipient failed permanently:\n\n     lost@x.test\n\n\
                 Technical details of permanent failure:\n550 5.1.1 The email account does not exist.\n";
        let b = parse_bounce(g.as_bytes(), None);
        assert_eq!(b.recipients.len(), 1);
        assert_eq!(b.recipients[0].address, "lost@x.test");
        assert!(b.recipients[0].hard());
    }
}
