//! Delivery status notifications (RFC 3461, 3464): the message Sluice sends to an envelope
//! sender when recipients failed, are delayed, or were relayed to a receiver without DSN.
//! A pure function of its input, so the leader builds it once and every replica stores the
//! same bytes.

use std::fmt::Write;

use chrono::{DateTime, FixedOffset, TimeZone, Utc};

/// RFC 3461 NOTIFY bits as stored per recipient (0: NOTIFY not given).
pub const NOTIFY_SUCCESS: u8 = 1;
pub const NOTIFY_FAILURE: u8 = 2;
pub const NOTIFY_DELAY: u8 = 4;
pub const NOTIFY_NEVER: u8 = 8;

/// Whether a recipient with these NOTIFY bits wants a notice of this kind. Without NOTIFY, a
/// failure is reported and a delay is not (RFC 3461 4.1 leaves DELAY to the MTA).
pub fn wants(notify: u8, kind: DsnKind) -> bool {
    if notify & NOTIFY_NEVER != 0 {
        return false;
    }
    match kind {
        DsnKind::Failure => notify == 0 || notify & NOTIFY_FAILURE != 0,
        DsnKind::Delay => notify & NOTIFY_DELAY != 0,
        DsnKind::Relayed => notify & NOTIFY_SUCCESS != 0,
    }
}

/// The NOTIFY parameter to pass on to a next hop, if one was given.
pub fn notify_param(notify: u8) -> Option<String> {
    if notify == 0 {
        return None;
    }
    if notify & NOTIFY_NEVER != 0 {
        return Some("NEVER".into());
    }
    let names: Vec<&str> = [
        (NOTIFY_SUCCESS, "SUCCESS"),
        (NOTIFY_FAILURE, "FAILURE"),
        (NOTIFY_DELAY, "DELAY"),
    ]
    .iter()
    .filter(|(b, _)| notify & b != 0)
    .map(|(_, n)| *n)
    .collect();
    Some(names.join(","))
}

/// Whether a value may go out as an RFC 3461 xtext parameter (ENVID, ORCPT): printable
/// ASCII without `=` or space, `+` only as `+XX`, at most 100 characters for ENVID.
pub fn is_xtext(v: &str) -> bool {
    let b = v.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                if i + 2 >= b.len()
                    || !(b[i + 1].is_ascii_hexdigit() && b[i + 2].is_ascii_hexdigit())
                {
                    return false;
                }
                i += 3;
                continue;
            }
            33..=126 if b[i] != b'=' => {}
            _ => return false,
        }
        i += 1;
    }
    true
}

/// Encodes text as xtext (`+XX` for `+`, `=`, and anything outside printable ASCII), at most
/// `max` characters: it stops before a byte whose encoding would go over.
pub fn xtext_encode(v: &str, max: usize) -> String {
    let mut out = String::with_capacity(v.len().min(max));
    for &b in v.as_bytes() {
        let enc = if (33..=126).contains(&b) && b != b'+' && b != b'=' {
            (b as char).to_string()
        } else {
            format!("+{b:02X}")
        };
        if out.len() + enc.len() > max {
            break;
        }
        out.push_str(&enc);
    }
    out
}

/// Decodes xtext (`+XX`); a malformed escape is kept as it is.
pub fn xtext_decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'+'
            && i + 2 < b.len()
            && b[i + 1].is_ascii_hexdigit()
            && b[i + 2].is_ascii_hexdigit()
        {
            let hex = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
            out.push(hex(b[i + 1]) << 4 | hex(b[i + 2]));
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DsnKind {
    Failure,
    Delay,
    /// Delivered to a next hop that does not offer DSN, while SUCCESS was asked.
    Relayed,
}

impl DsnKind {
    fn action(self) -> &'static str {
        match self {
            DsnKind::Failure => "failed",
            DsnKind::Delay => "delayed",
            DsnKind::Relayed => "relayed",
        }
    }
}

/// One recipient's part of a notice.
#[derive(Debug, Clone, Default)]
pub struct DsnRecipient {
    pub address: String,
    /// The ORCPT parameter as given ("rfc822;user@example.com"), or empty.
    pub orcpt: String,
    /// Enhanced status code ("5.1.1"); derived from `code` when the reply had none.
    pub status: String,
    pub code: u16,
    pub diagnostic: String,
    pub remote_mta: String,
    pub last_attempt_ms: u64,
    /// Delay notices: when Sluice gives up.
    pub retry_until_ms: u64,
}

pub struct DsnInput<'a> {
    pub kind: DsnKind,
    /// The name in Reporting-MTA and the text.
    pub reporting_mta: &'a str,
    /// The From of the notice (`postmaster`).
    pub from: &'a str,
    /// The original envelope sender: the notice's only recipient.
    pub to: &'a str,
    pub envid: &'a str,
    pub arrival_ms: u64,
    pub now_ms: u64,
    /// A token that makes the Message-ID and boundary unique (the original's queue id).
    pub unique: u64,
    pub recipients: &'a [DsnRecipient],
    /// The original message; only its header is returned when `full` is false.
    pub original: &'a [u8],
    pub full: bool,
}

fn date(ms: u64) -> String {
    let t: DateTime<FixedOffset> = Utc
        .timestamp_millis_opt(ms as i64)
        .single()
        .unwrap_or_default()
        .fixed_offset();
    t.format("%a, %d %b %Y %H:%M:%S %z").to_string()
}

/// Keeps a header-field value on one line and printable.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_string()
}

/// The status for a reply: its enhanced code, or the class of its basic code.
pub fn status_of(enhanced: &str, code: u16) -> String {
    if crate::smtp::reply::is_enhanced(enhanced) {
        return enhanced.to_string();
    }
    match code / 100 {
        2 => "2.0.0".into(),
        4 => "4.0.0".into(),
        _ => "5.0.0".into(),
    }
}

/// Builds the notice as a complete message (CRLF line ends).
pub fn build(d: &DsnInput) -> Vec<u8> {
    let boundary = format!("dsn={:016x}.{}", d.unique, d.now_ms);
    let (subject, intro) = match d.kind {
        DsnKind::Failure => (
            "Undelivered Mail Returned to Sender",
            "Your message could not be delivered to one or more recipients. It has been \
             returned below, with the reason for each recipient.",
        ),
        DsnKind::Delay => (
            "Delayed Mail (still being retried)",
            "Your message has not been delivered to one or more recipients yet. Delivery will \
             be tried again; you need not send it again. A further notice follows if it fails.",
        ),
        DsnKind::Relayed => (
            "Successful Mail Relay",
            "Your message was delivered to a mail system that does not report delivery status: \
             no further notices will come for these recipients.",
        ),
    };
    let mut m = String::new();
    let host = one_line(d.reporting_mta);
    let _ = write!(
        m,
        "From: Mail Delivery System <{}>\r\nTo: <{}>\r\nSubject: {subject}\r\nDate: {}\r\n\
         Message-ID: <dsn.{:016x}.{}@{host}>\r\nAuto-Submitted: auto-replied\r\n\
         MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status;\r\n\
         \tboundary=\"{boundary}\"\r\n\r\nThis is a MIME-encapsulated message.\r\n\r\n",
        one_line(d.from),
        one_line(d.to),
        date(d.now_ms),
        d.unique,
        d.now_ms,
    );
    let _ = write!(
        m,
        "--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Transfer-Encoding: 8bit\r\n\r\nThis is the mail system at {host}.\r\n\r\n\
         {intro}\r\n\r\n"
    );
    for r in d.recipients {
        let _ = write!(m, "<{}>: {}\r\n", one_line(&r.address), text_reason(r));
    }
    let _ = write!(
        m,
        "\r\n--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n\
         Reporting-MTA: dns; {host}\r\n"
    );
    if !d.envid.is_empty() {
        let _ = write!(m, "Original-Envelope-Id: {}\r\n", one_line(d.envid));
    }
    let _ = write!(m, "Arrival-Date: {}\r\n", date(d.arrival_ms));
    for r in d.recipients {
        m.push_str("\r\n");
        if !r.orcpt.is_empty() {
            let _ = write!(m, "Original-Recipient: {}\r\n", one_line(&r.orcpt));
        }
        let _ = write!(
            m,
            "Final-Recipient: rfc822; {}\r\nAction: {}\r\nStatus: {}\r\n",
            one_line(&r.address),
            d.kind.action(),
            status_of(&r.status, r.code),
        );
        if !r.remote_mta.is_empty() {
            let _ = write!(m, "Remote-MTA: dns; {}\r\n", one_line(&r.remote_mta));
        }
        if r.code != 0 {
            let _ = write!(m, "Diagnostic-Code: smtp; {}\r\n", diagnostic(r));
        }
        if r.last_attempt_ms != 0 {
            let _ = write!(m, "Last-Attempt-Date: {}\r\n", date(r.last_attempt_ms));
        }
        if d.kind == DsnKind::Delay && r.retry_until_ms != 0 {
            let _ = write!(m, "Will-Retry-Until: {}\r\n", date(r.retry_until_ms));
        }
    }
    // Headers only: at most 64 KiB of them (a message without a blank line is all header).
    let header_len = crate::smtp::header::header_len(d.original).min(64 << 10);
    let (ctype, part) = if d.full {
        ("message/rfc822", d.original)
    } else {
        ("text/rfc822-headers", &d.original[..header_len])
    };
    let cte = if part.iter().any(|&b| b >= 0x80) {
        "Content-Transfer-Encoding: 8bit\r\n"
    } else {
        ""
    };
    let _ = write!(m, "\r\n--{boundary}\r\nContent-Type: {ctype}\r\n{cte}\r\n");
    let mut out = m.into_bytes();
    out.extend_from_slice(part);
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    out
}

fn diagnostic(r: &DsnRecipient) -> String {
    let text = one_line(&r.diagnostic);
    if crate::smtp::reply::is_enhanced(&r.status) && !text.starts_with(&r.status) {
        format!("{} {} {text}", r.code, r.status)
    } else {
        format!("{} {text}", r.code)
    }
}

fn text_reason(r: &DsnRecipient) -> String {
    let mut s = if r.code == 0 {
        "delivery status ".to_string() + &status_of(&r.status, r.code)
    } else {
        diagnostic(r)
    };
    if !r.remote_mta.is_empty() {
        s = format!("host {} said: {s}", one_line(&r.remote_mta));
    }
    s
}

/// Whether a message is itself a delivery status notification (never answered with one).
pub fn is_dsn(message: &[u8]) -> bool {
    let header = &message[..crate::smtp::header::header_len(message)];
    crate::smtp::header::fields(header).iter().any(|f| {
        crate::smtp::header::field_name(f).is_some_and(|n| n.eq_ignore_ascii_case("content-type"))
            && {
                let v = crate::smtp::header::field_value(f).to_ascii_lowercase();
                v.starts_with("multipart/report")
                    && v.replace([' ', '"'], "")
                        .contains("report-type=delivery-status")
            }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input<'a>(rcpts: &'a [DsnRecipient], original: &'a [u8], full: bool) -> DsnInput<'a> {
        DsnInput {
            kind: DsnKind::Failure,
            reporting_mta: "mta.example.com",
            from: "postmaster@example.com",
            to: "sender@example.com",
            envid: "job-7",
            arrival_ms: 1_700_000_000_000,
            now_ms: 1_700_000_060_000,
            unique: 42,
            recipients: rcpts,
            original,
            full,
        }
    }

    #[test]
    fn one_block_per_recipient_and_the_original_as_ret_asks() {
        let rcpts: Vec<DsnRecipient> = (0..3)
            .map(|i| DsnRecipient {
                address: format!("u{i}@x.test"),
                orcpt: if i == 0 {
                    "rfc822;U0@x.test".into()
                } else {
                    String::new()
                },
                status: "5.1.1".into(),
                code: 550,
                diagnostic: "5.1.1 no such user".into(),
                remote_mta: "mx.x.test".into(),
                last_attempt_ms: 1_700_000_050_000,
                retry_until_ms: 0,
            })
            .collect();
        let original = b"Subject: hi\r\nFrom: a@b.test\r\n\r\nthe body\r\n";
        let full = String::from_utf8(build(&input(&rcpts, original, true))).unwrap();
        assert_eq!(full.matches("Final-Recipient: rfc822; u").count(), 3);
        assert_eq!(full.matches("Action: failed").count(), 3);
        assert!(full.contains("Original-Recipient: rfc822;U0@x.test\r\n"));
        assert!(full.contains("Diagnostic-Code: smtp; 550 5.1.1 no such user\r\n"));
        assert!(full.contains("Original-Envelope-Id: job-7\r\n"));
        assert!(full.contains("message/rfc822\r\n\r\nSubject: hi") && full.contains("the body"));
        let hdrs = String::from_utf8(build(&input(&rcpts, original, false))).unwrap();
        assert!(hdrs.contains("text/rfc822-headers") && !hdrs.contains("the body"));
        assert!(is_dsn(full.as_bytes()));
        assert!(!is_dsn(original));
    }

    #[test]
    fn notify_bits() {
        assert!(wants(0, DsnKind::Failure) && !wants(0, DsnKind::Delay));
        assert!(!wants(NOTIFY_NEVER, DsnKind::Failure));
        assert!(
            wants(NOTIFY_SUCCESS, DsnKind::Relayed) && !wants(NOTIFY_SUCCESS, DsnKind::Failure)
        );
        assert_eq!(
            notify_param(NOTIFY_SUCCESS | NOTIFY_DELAY).as_deref(),
            Some("SUCCESS,DELAY")
        );
        assert_eq!(notify_param(0), None);
        assert_eq!(status_of("", 451), "4.0.0");
        assert!(is_xtext("env+2B1") && !is_xtext("a b") && !is_xtext("a=b") && !is_xtext("a+2"));
        assert_eq!(xtext_encode("j 1=x+é", 100), "j+201+3Dx+2B+C3+A9");
        assert!(is_xtext(&xtext_encode("x AUTH=<a@b> y", 100)));
        for long in [
            "é".repeat(40),
            format!("ab{}", "é".repeat(40)),
            format!("{}    ", "x".repeat(94)),
        ] {
            let e = xtext_encode(&long, 100);
            assert!(e.len() <= 100 && is_xtext(&e), "{e}");
        }
    }
}
