//! Header processing at injection: only as far as routing needs. Sluice headers (X-Virtual-MTA,
//! the job header, X-Envid) are read and, unless retained, removed; Received and Message-ID
//! are added per the source policy, and `X-Sluice-Ref` when the message has a job or envelope
//! id. The rest of the message is stored as received.

use std::net::SocketAddr;

use sluice_common::policy::{Policy, SourceSettings};
use sluice_common::smtp::header;

pub struct Context<'a> {
    pub policy: &'a Policy,
    pub source: &'a SourceSettings,
    pub helo: &'a str,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub hostname: &'a str,
    pub protocol: &'a str,
    pub mail_from: &'a str,
    pub first_rcpt: &'a str,
    pub envid: &'a str,
}

#[derive(Debug)]
pub struct Prepared {
    pub body: Vec<u8>,
    pub vmta: String,
    pub job_id: String,
    pub envid: String,
}

pub fn prepare(mut body: Vec<u8>, cx: &Context) -> Result<Prepared, String> {
    let header_len = header::header_len(&body);
    let header = &body[..header_len];
    let job_header = cx
        .source
        .jobid_header
        .as_deref()
        .unwrap_or("x-job")
        .to_ascii_lowercase();
    let mut vmta_hdr = None;
    let mut job_id = String::new();
    let mut envid = cx.envid.to_string();
    let mut has_msgid = false;
    let mut kept: Vec<&[u8]> = Vec::new();
    for f in header::fields(header) {
        let name = header::field_name(f).unwrap_or_default();
        let drop = match name.as_str() {
            "x-virtual-mta" if cx.source.process_x_virtual_mta == Some(true) => {
                vmta_hdr = Some(header::field_value(f));
                cx.source.retain_x_virtual_mta != Some(true)
            }
            n if n == job_header && cx.source.process_x_job == Some(true) => {
                job_id = header::field_value(f);
                cx.source.retain_x_job != Some(true)
            }
            "x-envid" if cx.source.process_x_envid == Some(true) => {
                // A header value goes on as an ENVID parameter: xtext, as RFC 3461 says.
                if envid.is_empty() {
                    envid = sluice_common::dsn::xtext_encode(&header::field_value(f), 100);
                }
                true
            }
            "received" => cx.source.remove_received_headers == Some(true),
            // Only Sluice writes it (below), so that what comes back is matched to this.
            "x-sluice-ref" => true,
            "message-id" => {
                has_msgid = true;
                false
            }
            _ => false,
        };
        if !drop {
            kept.push(f);
        }
    }
    let vmta = match vmta_hdr {
        Some(v) => {
            if cx.policy.target(&v).is_none() {
                return Err(format!(
                    "550 5.7.1 X-Virtual-MTA names `{v}`, which is not a virtual-mta or pool of this cluster"
                ));
            }
            v
        }
        None => cx
            .policy
            .vmta_for(cx.source, cx.mail_from, cx.first_rcpt, cx.local.ip())?,
    };
    // The new header is built apart and put in place of the old one, so the body (up to the
    // size limit) is never copied whole.
    let mut out = Vec::with_capacity(header_len + 512);
    if cx.source.add_received_header != Some(false) {
        let date = chrono::Local::now().format("%a, %d %b %Y %H:%M:%S %z");
        let from = if cx.source.hide_message_source == Some(true) {
            String::new()
        } else {
            format!("from {} ([{}])\r\n\t", cx.helo, cx.peer.ip())
        };
        out.extend_from_slice(
            format!(
                "Received: {from}by {} (Sluice) with {}; {date}\r\n",
                cx.hostname, cx.protocol
            )
            .as_bytes(),
        );
    }
    if !has_msgid && cx.source.add_message_id_header == Some(true) {
        let id = format!("{:016x}{:08x}", fastrand::u64(..), fastrand::u32(..));
        out.extend_from_slice(format!("Message-ID: <{id}@{}>\r\n", cx.hostname).as_bytes());
    }
    if let Some(h) = sluice_common::returns::ref_header(&job_id, &envid) {
        out.extend_from_slice(h.as_bytes());
    }
    for f in kept {
        out.extend_from_slice(f);
    }
    body.splice(..header_len, out);
    Ok(Prepared {
        body,
        vmta,
        job_id,
        envid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_common::policy::{LoadOptions, load_str};

    fn policy() -> Policy {
        let text = "<virtual-mta v1>\nsmtp-source-host 127.0.0.1 a.example\n</virtual-mta>\n<virtual-mta-pool p>\nvirtual-mta v1\n</virtual-mta-pool>\n<source 0/0>\nprocess-x-virtual-mta yes\nprocess-x-job yes\nadd-message-id-header yes\ndefault-virtual-mta p\n</source>\n";
        load_str(
            std::path::Path::new("t.conf"),
            text,
            LoadOptions { read_files: false },
        )
        .unwrap()
        .policy
    }

    fn cx<'a>(p: &'a Policy, s: &'a SourceSettings) -> Context<'a> {
        Context {
            policy: p,
            source: s,
            helo: "client.test",
            peer: "127.0.0.9:5000".parse().unwrap(),
            local: "127.0.0.1:25".parse().unwrap(),
            hostname: "mx.example.com",
            protocol: "ESMTP",
            mail_from: "a@b.test",
            first_rcpt: "c@d.test",
            envid: "",
        }
    }

    #[test]
    fn headers_route_and_are_removed() {
        let p = policy();
        let s = p.source_for_ip("127.0.0.9".parse().unwrap());
        let body =
            b"Subject: hi\r\nX-Virtual-MTA: v1\r\nX-Job: j-7\r\nX-Sluice-Ref: job=forged\r\n\r\nbody\r\n"
                .to_vec();
        let out = prepare(body, &cx(&p, &s)).unwrap();
        assert_eq!(out.vmta, "v1");
        assert_eq!(out.job_id, "j-7");
        let text = String::from_utf8(out.body).unwrap();
        assert!(
            text.starts_with("Received: from client.test ([127.0.0.9])"),
            "{text}"
        );
        assert!(text.contains("Message-ID: <"));
        assert!(!text.contains("X-Virtual-MTA") && !text.contains("X-Job"));
        // The job is named for what comes back; a client's own X-Sluice-Ref is dropped.
        assert!(text.contains("X-Sluice-Ref: job=j-7\r\n"), "{text}");
        assert!(!text.contains("forged"), "{text}");
        assert!(text.ends_with("Subject: hi\r\n\r\nbody\r\n"));
    }

    #[test]
    fn unknown_vmta_is_refused_and_default_applies() {
        let p = policy();
        let s = p.source_for_ip("127.0.0.9".parse().unwrap());
        let e = prepare(b"X-Virtual-MTA: nope\r\n\r\nx\r\n".to_vec(), &cx(&p, &s)).unwrap_err();
        assert!(e.starts_with("550 5.7.1") && e.contains("`nope`"), "{e}");
        let ok = prepare(b"Subject: x\r\n\r\nx\r\n".to_vec(), &cx(&p, &s)).unwrap();
        assert_eq!(ok.vmta, "p");
    }

    fn source_with(extra: &str) -> (Policy, SourceSettings) {
        let text = format!(
            "<virtual-mta v1>\nsmtp-source-host 127.0.0.1 a.example\n</virtual-mta>\n\
             <virtual-mta v2>\nsmtp-source-host 127.0.0.2 b.example\n</virtual-mta>\n\
             <pattern-list pl>\nrcpt-to /@routed\\.test$/ virtual-mta=v2\n</pattern-list>\n\
             <source 0/0>\n{extra}</source>\n"
        );
        let p = load_str(
            std::path::Path::new("t.conf"),
            &text,
            LoadOptions { read_files: false },
        )
        .map_err(|e| e.to_string())
        .unwrap()
        .policy;
        let s = p.source_for_ip("127.0.0.9".parse().unwrap());
        (p, s)
    }

    #[test]
    fn received_header_directives() {
        let body = || b"Received: from old.test\r\nSubject: hi\r\n\r\nx\r\n".to_vec();
        let (p, s) = source_with("");
        let t = String::from_utf8(prepare(body(), &cx(&p, &s)).unwrap().body).unwrap();
        assert!(
            t.starts_with("Received: from client.test ([127.0.0.9])"),
            "{t}"
        );
        assert!(t.contains("Received: from old.test"));
        let (p, s) = source_with("hide-message-source yes\n");
        let t = String::from_utf8(prepare(body(), &cx(&p, &s)).unwrap().body).unwrap();
        assert!(t.starts_with("Received: by mx.example.com"), "{t}");
        assert!(!t.contains("127.0.0.9"), "{t}");
        let (p, s) = source_with("add-received-header no\n");
        let t = String::from_utf8(prepare(body(), &cx(&p, &s)).unwrap().body).unwrap();
        assert!(t.starts_with("Received: from old.test"), "{t}");
        let (p, s) = source_with("remove-received-headers yes\n");
        let t = String::from_utf8(prepare(body(), &cx(&p, &s)).unwrap().body).unwrap();
        assert!(!t.contains("old.test"), "{t}");
    }

    #[test]
    fn job_envid_and_vmta_headers() {
        let body = || {
            b"X-Campaign: c-1\r\nX-Virtual-MTA: v2\r\nX-Envid: e-9\r\nSubject: s\r\n\r\nx\r\n"
                .to_vec()
        };
        let (p, s) = source_with(
            "process-x-job yes\njobid-header X-Campaign\nprocess-x-virtual-mta yes\nprocess-x-envid yes\n",
        );
        let out = prepare(body(), &cx(&p, &s)).unwrap();
        assert_eq!(
            (out.job_id.as_str(), out.vmta.as_str(), out.envid.as_str()),
            ("c-1", "v2", "e-9")
        );
        let t = String::from_utf8(out.body).unwrap();
        assert!(
            !t.contains("X-Campaign") && !t.contains("X-Virtual-MTA") && !t.contains("X-Envid")
        );
        let (p, s) = source_with(
            "process-x-job yes\njobid-header X-Campaign\nretain-x-job yes\nprocess-x-virtual-mta yes\nretain-x-virtual-mta yes\n",
        );
        let t = String::from_utf8(prepare(body(), &cx(&p, &s)).unwrap().body).unwrap();
        assert!(
            t.contains("X-Campaign: c-1") && t.contains("X-Virtual-MTA: v2"),
            "{t}"
        );
        // Without the process-* directives the headers are neither read nor removed.
        let (p, s) = source_with("");
        let out = prepare(body(), &cx(&p, &s)).unwrap();
        assert_eq!((out.job_id.as_str(), out.envid.as_str()), ("", ""));
    }

    #[test]
    fn routing_by_pattern_list_and_by_source_ip() {
        let (p, s) = source_with("pattern-list pl\ndefault-virtual-mta v1\n");
        let mut c = cx(&p, &s);
        c.first_rcpt = "x@routed.test";
        assert_eq!(
            prepare(b"S: x\r\n\r\nx\r\n".to_vec(), &c).unwrap().vmta,
            "v2"
        );
        c.first_rcpt = "x@other.test";
        assert_eq!(
            prepare(b"S: x\r\n\r\nx\r\n".to_vec(), &c).unwrap().vmta,
            "v1"
        );
        // by-smtp-source-ip: the VMTA whose IP the message arrived on.
        let (p, s) = source_with("default-virtual-mta by-smtp-source-ip\n");
        let mut c = cx(&p, &s);
        c.local = "127.0.0.2:25".parse().unwrap();
        assert_eq!(
            prepare(b"S: x\r\n\r\nx\r\n".to_vec(), &c).unwrap().vmta,
            "v2"
        );
        c.local = "127.0.0.7:25".parse().unwrap();
        assert!(
            prepare(b"S: x\r\n\r\nx\r\n".to_vec(), &c)
                .unwrap_err()
                .starts_with("451")
        );
    }
}
