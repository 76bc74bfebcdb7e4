//! Reports that came back to a processor's address, turned into what the replicated queue
//! records: `rb` rows for the failures an asynchronous bounce names, `rs` rows for the
//! recipients it says were delivered, relayed or delayed, an `f` row for a complaint, and the
//! suppression entries the policy asks for (`suppress-on-bounce`, `suppress-on-complaint`).
//! The leader does this once and proposes the result, so every replica records the same.

use sluice_common::policy::{Policy, RecordType};
use sluice_common::returns;

use crate::inbound;
use crate::queue::acct_event::{AcctEvent, ReportFields};
use crate::queue::command::Suppression;

/// One message that came to processor addresses.
pub struct Incoming<'a> {
    /// `bounce` or `feedback`.
    pub kind: &'a str,
    pub mail_from: &'a str,
    pub recipients: &'a [String],
    pub client_ip: &'a str,
    pub received_by: &'a str,
    pub body: &'a [u8],
}

/// What to record for a report; None when the message is not a report of its kind.
pub struct Records {
    pub events: Vec<AcctEvent>,
    pub suppress: Vec<Suppression>,
}

/// The job and envelope id of the returned message: Sluice's `X-Sluice-Ref`, else the job
/// header of the source that took it (`x-job` unless `jobid-header` says otherwise).
fn job_and_envid(policy: &Policy, returned: &[(String, String)]) -> (String, String) {
    let find = |name: &str| {
        returned
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
    };
    if let Some(v) = find(returns::REF_HEADER) {
        return returns::parse_ref(&v);
    }
    let job_header = policy
        .sources
        .iter()
        .find_map(|s| s.settings.jobid_header.clone())
        .unwrap_or_else(|| "x-job".into());
    (find(&job_header).unwrap_or_default(), String::new())
}

pub fn records(
    policy: &Policy,
    acct_headers: &[String],
    now_ms: u64,
    m: &Incoming,
) -> Option<Records> {
    // A VERP address names the original sender and the recipient exactly.
    let verp = m.recipients.iter().find_map(|r| returns::verp_decode(r));
    let orig = verp
        .as_ref()
        .map(|(s, _)| s.clone())
        .or_else(|| m.recipients.first().cloned())
        .unwrap_or_default();
    let base = |kind: RecordType, rcpt: String, returned: &[(String, String)]| {
        let (job_id, envid) = job_and_envid(policy, returned);
        AcctEvent {
            kind,
            time_ms: now_ms,
            orig: orig.clone(),
            rcpt,
            client_ip: m.client_ip.to_string(),
            src_mta: m.received_by.to_string(),
            job_id,
            envid,
            headers: returned
                .iter()
                .filter(|(n, _)| acct_headers.contains(n))
                .cloned()
                .collect(),
            ..Default::default()
        }
    };
    let mut events = Vec::new();
    let mut suppress = Vec::new();
    let entry = |address: &str, reason: &str, source: String| Suppression {
        address: address.to_ascii_lowercase(),
        scope: String::new(),
        reason: reason.to_string(),
        source,
        time_ms: now_ms,
        expires_ms: 0,
    };
    if m.kind == "feedback" {
        let c = inbound::parse_complaint(m.body)?;
        // The reported message's return path, when the report gives it, may be a VERP one.
        let from_verp = returns::verp_decode(&c.mail_from);
        let rcpt = match (verp.as_ref().or(from_verp.as_ref()), c.recipient.is_empty()) {
            (Some((_, r)), true) => r.clone(),
            _ => c.recipient.clone(),
        };
        let mut ev = base(RecordType::Feedback, rcpt.clone(), &c.original_headers);
        if verp.is_none() {
            match from_verp {
                Some((sender, _)) => ev.orig = sender,
                None if !c.mail_from.is_empty() => ev.orig = c.mail_from.clone(),
                None => {}
            }
        }
        ev.report = Some(Box::new(ReportFields {
            feedback_type: c.feedback_type.clone(),
            format: c.format.clone(),
            user_agent: c.user_agent.clone(),
            reporting_mta: c.reporting_mta.clone(),
            reported_domain: c.reported_domain.clone(),
            orig_ip: c.source_ip.clone(),
            arrival_ms: c.arrival_ms,
            action: String::new(),
        }));
        events.push(ev);
        let wanted =
            policy.global.suppress_on_complaint != Some(false) && c.feedback_type != "not-spam";
        if wanted && rcpt.contains('@') {
            let from = if c.reporting_mta.is_empty() {
                m.mail_from
            } else {
                &c.reporting_mta
            };
            suppress.push(entry(&rcpt, "complaint", format!("f {from}")));
        }
        return Some(Records { events, suppress });
    }
    let b = inbound::parse_bounce(m.body, Some(policy));
    let found = b.recipients.iter().any(|r| !r.address.is_empty()) || !b.statuses.is_empty();
    // A bounce: it reads as one, and names a recipient or came to a VERP address.
    if !b.evidence || (!found && verp.is_none()) {
        return None;
    }
    let format = if sluice_common::dsn::is_dsn(m.body) {
        "dsn"
    } else {
        "text"
    };
    let report = |action: &str| {
        Some(Box::new(ReportFields {
            format: format.into(),
            reporting_mta: b.reporting_mta.clone(),
            action: action.into(),
            ..Default::default()
        }))
    };
    let suppressing = |category: &str| {
        policy
            .global
            .suppress_on_bounce
            .as_ref()
            .is_some_and(|l| l.0.iter().any(|c| c.eq_ignore_ascii_case(category)))
    };
    let only = b.recipients.len() == 1;
    for r in &b.recipients {
        // With one recipient, VERP says who it was for certain; the report may name the
        // address a forward led to.
        let rcpt = match &verp {
            Some((_, v)) if only || r.address.is_empty() => v.clone(),
            _ => r.address.clone(),
        };
        let mut ev = base(RecordType::RemoteBounce, rcpt.clone(), &b.original_headers);
        ev.code = r.code;
        ev.diag = r.diagnostic.clone();
        ev.enhanced = r.enhanced.clone();
        ev.category = r.category.clone();
        ev.report = report("failed");
        events.push(ev);
        // Only a permanent failure suppresses.
        let permanent = r.code >= 500 || r.enhanced.starts_with('5');
        if rcpt.contains('@') && permanent && suppressing(&r.category) {
            let from = if b.reporting_mta.is_empty() {
                m.mail_from
            } else {
                &b.reporting_mta
            };
            suppress.push(entry(&rcpt, &r.category, format!("rb {from}")));
        }
    }
    for s in &b.statuses {
        let mut ev = base(
            RecordType::RemoteStatus,
            s.address.clone(),
            &b.original_headers,
        );
        ev.enhanced = s.status.clone();
        ev.diag = s.diagnostic.clone();
        ev.report = report(&s.action);
        events.push(ev);
    }
    Some(Records { events, suppress })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_common::policy::{LoadOptions, load_str};

    fn policy(text: &str) -> Policy {
        load_str(
            std::path::Path::new("t.conf"),
            text,
            LoadOptions { read_files: false },
        )
        .unwrap()
        .policy
    }

    fn complaint(feedback_type: &str) -> String {
        format!(
            "From: fbl@isp.test\r\nTo: fbl@example.com\r\nMIME-Version: 1.0\r\n\
             Content-Type: multipart/report; report-type=feedback-report; boundary=\"f\"\r\n\r\n\
             --f\r\nContent-Type: text/plain\r\n\r\nreport\r\n\
             --f\r\nContent-Type: message/feedback-report\r\n\r\n\
             Feedback-Type: {feedback_type}\r\nUser-Agent: t/1\r\nVersion: 1\r\n\
             Original-Rcpt-To: <u@x.test>\r\n\r\n\
             --f\r\nContent-Type: message/rfc822\r\n\r\nFrom: s@example.com\r\nTo: u@x.test\r\n\
             Subject: hi\r\n\r\nhi\r\n--f--\r\n"
        )
    }

    fn run(p: &Policy, kind: &str, rcpt: &str, body: &str) -> Option<Records> {
        let rcpts = [rcpt.to_string()];
        let m = Incoming {
            kind,
            mail_from: "",
            recipients: &rcpts,
            client_ip: "192.0.2.1",
            received_by: "in1",
            body: body.as_bytes(),
        };
        records(p, &[], 5, &m)
    }

    #[test]
    fn complaints_suppress_unless_not_spam_or_switched_off() {
        let on = policy("");
        let r = run(&on, "feedback", "fbl@example.com", &complaint("abuse")).unwrap();
        assert_eq!(r.events.len(), 1);
        assert_eq!(r.events[0].kind, RecordType::Feedback);
        assert_eq!(r.events[0].rcpt, "u@x.test");
        assert_eq!(r.suppress.len(), 1);
        assert_eq!(r.suppress[0].reason, "complaint");
        let r = run(&on, "feedback", "fbl@example.com", &complaint("not-spam")).unwrap();
        assert!(r.suppress.is_empty());
        let off = policy("suppress-on-complaint no\n");
        let r = run(&off, "feedback", "fbl@example.com", &complaint("abuse")).unwrap();
        assert_eq!(r.events.len(), 1);
        assert!(r.suppress.is_empty());
    }

    #[test]
    fn what_is_no_report_is_not_recognized() {
        let p = policy("");
        let note = "From: a@b.test\r\nTo: fbl@example.com\r\nSubject: hi\r\n\r\njust a note\r\n";
        assert!(run(&p, "feedback", "fbl@example.com", note).is_none());
        assert!(run(&p, "bounce", "rb@example.com", note).is_none());
        // Text with an address in it is no bounce, even to a VERP address.
        let reply = "From: u@x.test\r\nTo: rb@example.com\r\nSubject: Re: offer\r\n\r\n\
                     Please write to u2@x.test instead.\r\n";
        assert!(run(&p, "bounce", "rb@example.com", reply).is_none());
        assert!(run(&p, "bounce", "rb+u=x.test@example.com", reply).is_none());
        // Through VERP with a failure reply, a bounce that names nobody is still one.
        let bounce = "From: MAILER-DAEMON@mx.test\r\nTo: x\r\nSubject: failure\r\n\r\n\
                      Remote host said: 550 5.1.1 no such user\r\n";
        let r = run(&p, "bounce", "rb+u=x.test@example.com", bounce).unwrap();
        assert_eq!(r.events[0].rcpt, "u@x.test");
        assert_eq!(r.events[0].orig, "rb@example.com");
        assert_eq!(r.events[0].category, "bad-mailbox");
        // Without suppress-on-bounce nothing is suppressed.
        assert!(r.suppress.is_empty());
    }
}
