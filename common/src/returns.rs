//! What Sluice puts into outgoing mail so that what comes back (a late bounce, a complaint)
//! can be matched to it: a VERP return path, which names the recipient, and the
//! `X-Sluice-Ref` header, which names the job and the envelope id.
//!
//! VERP form: `LOCAL+RCPTLOCAL=RCPTDOMAIN@DOMAIN` for sender `LOCAL@DOMAIN` (Postfix's
//! default delimiters).

use crate::dsn::{xtext_decode, xtext_encode};

/// The header Sluice adds at injection when a message has a job id or an envelope id.
pub const REF_HEADER: &str = "X-Sluice-Ref";

/// The VERP return path for one recipient. The sender stays as it is when it is null, when
/// its local part already holds `+` or `=` (it would not decode back), when either local part
/// is quoted, or when the result would pass RFC 5321's 64 octets for a local part.
pub fn verp_encode(sender: &str, rcpt: &str) -> String {
    let (Some((local, domain)), Some((rl, rd))) = (sender.rsplit_once('@'), rcpt.rsplit_once('@'))
    else {
        return sender.to_string();
    };
    let plain = |s: &str| !s.is_empty() && !s.contains(['"', '\\', ' ', '@']);
    if local.contains(['+', '=']) || !plain(local) || !plain(rl) || !plain(rd) {
        return sender.to_string();
    }
    let verp_local = format!("{local}+{rl}={rd}");
    if verp_local.len() > 64 {
        return sender.to_string();
    }
    format!("{verp_local}@{domain}")
}

/// (the original sender, the recipient) of a VERP address; None for any other address.
pub fn verp_decode(address: &str) -> Option<(String, String)> {
    let (local, domain) = address.rsplit_once('@')?;
    let (base, tail) = local.split_once('+')?;
    let (rl, rd) = tail.rsplit_once('=')?;
    if base.is_empty() || rl.is_empty() || !rd.contains('.') || domain.is_empty() {
        return None;
    }
    Some((format!("{base}@{domain}"), format!("{rl}@{rd}")))
}

/// The `X-Sluice-Ref` field (name, value and CRLF), or None when there is nothing to say.
pub fn ref_header(job_id: &str, envid: &str) -> Option<String> {
    let mut parts = Vec::new();
    if !job_id.is_empty() {
        parts.push(format!("job={}", xtext_encode(job_id, 256)));
    }
    if !envid.is_empty() {
        parts.push(format!("envid={}", xtext_encode(envid, 256)));
    }
    (!parts.is_empty()).then(|| format!("{REF_HEADER}: {}\r\n", parts.join(" ")))
}

/// (job id, envelope id) from an `X-Sluice-Ref` value.
pub fn parse_ref(value: &str) -> (String, String) {
    let (mut job, mut envid) = (String::new(), String::new());
    for part in value.split_whitespace() {
        match part.split_once('=') {
            Some(("job", v)) => job = xtext_decode(v),
            Some(("envid", v)) => envid = xtext_decode(v),
            _ => {}
        }
    }
    (job, envid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verp_round_trip() {
        let v = verp_encode("bounces@mail.example.com", "joe.x@d.test");
        assert_eq!(v, "bounces+joe.x=d.test@mail.example.com");
        assert_eq!(
            verp_decode(&v),
            Some(("bounces@mail.example.com".into(), "joe.x@d.test".into()))
        );
        assert_eq!(verp_encode("", "joe@d.test"), "");
        // Not encodable: left as it is.
        assert_eq!(verp_encode("b+list@d.test", "joe@x.test"), "b+list@d.test");
        assert_eq!(verp_encode("b@d.test", "\"j s\"@x.test"), "b@d.test");
        let long = format!("{}@x.test", "j".repeat(60));
        assert_eq!(verp_encode("b@d.test", &long), "b@d.test");
        assert_eq!(verp_decode("bounces@mail.example.com"), None);
        assert_eq!(verp_decode("a+b@mail.example.com"), None);
    }

    #[test]
    fn ref_round_trip() {
        let h = ref_header("spring sale=1", "e+1").unwrap();
        assert_eq!(h, "X-Sluice-Ref: job=spring+20sale+3D1 envid=e+2B1\r\n");
        let value = h.trim_end().split_once(": ").unwrap().1;
        assert_eq!(parse_ref(value), ("spring sale=1".into(), "e+1".into()));
        assert_eq!(ref_header("", ""), None);
        assert_eq!(xtext_decode("a+4"), "a+4");
    }
}
