//! The ingress with real clients: swaks (STARTTLS, AUTH PLAIN, relaying refused), Python's
//! smtplib (PIPELINING, BDAT), Postfix's smtp-source (many sessions), malformed input, and a
//! controller leader change. Every test checks the committed queue, not only the replies.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use crate::harness::*;

fn policy(dir: &Path) -> String {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let (ok, _, err) = tool(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=ingress.example.com",
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
        ],
    );
    assert!(ok, "openssl: {err}");
    format!(
        "host-name ingress.example.com\n\
         smtp-server-tls-certificate {},{}\n\
         <rejectlog-file {}>\n  records c,r\n</rejectlog-file>\n\
         <virtual-mta v1>\n  smtp-source-host 127.0.0.1 v1.example.com\n</virtual-mta>\n\
         <source 127.0.0.1>\n  always-allow-relaying yes\n  process-x-virtual-mta yes\n  default-virtual-mta v1\n  max-message-size 64K\n</source>\n\
         <source 127.0.0.2>\n  require-auth yes\n  allow-unencrypted-plain-auth no\n</source>\n\
         <source 127.0.0.3>\n  smtp-service yes\n</source>\n\
         <source {{auth}}>\n  always-allow-relaying yes\n  default-virtual-mta v1\n</source>\n\
         <smtp-user alice>\n  password \"s3cret\"\n  source {{auth}}\n</smtp-user>\n\
         <domain *>\n  route [127.0.0.1]:9\n</domain>\n",
        cert.display(),
        key.display(),
        dir.join("reject.log").display()
    )
}

fn start() -> (Cluster, SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let p = policy(dir.path());
    let mut c = Cluster::start(1, &p, "");
    // The certificate files live in the first temporary folder; it goes with the cluster.
    c.kept.push(dir);
    let (smtp, _) = c.start_ingress();
    (c, smtp)
}

fn senders(c: &Cluster) -> Vec<String> {
    c.list(0)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mail_from"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn swaks_starttls_auth_and_relaying() {
    let (c, smtp) = start();
    let server = smtp.to_string();
    // Trusted by authentication: STARTTLS, then AUTH PLAIN, from an address that must log in.
    let (ok, out, err) = tool(
        "swaks",
        &[
            "--server",
            &server,
            "--local-interface",
            "127.0.0.2",
            "--tls",
            "--auth",
            "PLAIN",
            "--auth-user",
            "alice",
            "--auth-password",
            "s3cret",
            "--from",
            "auth@example.com",
            "--to",
            "x@dest.test",
        ],
    );
    assert!(ok && out.contains("250 2.0.0 OK queued as"), "{out}{err}");
    // The same address without logging in may not send.
    let (_, out, _) = tool(
        "swaks",
        &[
            "--server",
            &server,
            "--local-interface",
            "127.0.0.2",
            "--tls",
            "--from",
            "noauth@example.com",
            "--to",
            "x@dest.test",
        ],
    );
    assert!(out.contains("530 5.7.0 authentication required"), "{out}");
    // Without TLS, AUTH is not offered there, and refused if tried.
    let (_, out, err) = tool(
        "swaks",
        &[
            "--server",
            &server,
            "--local-interface",
            "127.0.0.2",
            "--auth",
            "PLAIN",
            "--auth-user",
            "alice",
            "--auth-password",
            "s3cret",
            "--from",
            "a@example.com",
            "--to",
            "x@dest.test",
        ],
    );
    assert!(
        !out.contains("AUTH PLAIN") && !out.contains("235"),
        "{out}{err}"
    );
    let out = raw(
        smtp,
        &[b"EHLO t\r\n", b"AUTH PLAIN AGFsaWNlAHMzY3JldA==\r\n"],
    );
    assert!(out.contains("538 5.7.11"), "{out}");
    // A wrong password.
    let (_, out, _) = tool(
        "swaks",
        &[
            "--server",
            &server,
            "--local-interface",
            "127.0.0.2",
            "--tls",
            "--auth",
            "PLAIN",
            "--auth-user",
            "alice",
            "--auth-password",
            "nope",
            "--from",
            "a@example.com",
            "--to",
            "x@dest.test",
        ],
    );
    assert!(out.contains("535 5.7.8"), "{out}");
    // An untrusted source may not relay.
    let (_, out, _) = tool(
        "swaks",
        &[
            "--server",
            &server,
            "--local-interface",
            "127.0.0.3",
            "--from",
            "relay@example.com",
            "--to",
            "x@dest.test",
        ],
    );
    assert!(out.contains("550 5.7.1 relaying denied"), "{out}");
    let s = senders(&c);
    assert_eq!(
        s,
        vec!["auth@example.com".to_string()],
        "only the authenticated message is queued"
    );
    let reject =
        std::fs::read_to_string(c.path().join("node/../").join("reject.log")).or_else(|_| {
            // The policy names an absolute path in the cluster's first folder.
            let text = std::fs::read_to_string(c.path().join("policy.conf")).unwrap();
            let path = text
                .lines()
                .find(|l| l.starts_with("<rejectlog-file"))
                .unwrap()
                .trim_start_matches("<rejectlog-file ")
                .trim_end_matches('>')
                .to_string();
            std::fs::read_to_string(path)
        });
    let reject = reject.expect("a reject log");
    assert!(
        reject.contains(",r,127.0.0.3,\"relaying denied for x@dest.test\""),
        "{reject}"
    );
    assert!(reject.contains(",c,127.0.0.2,"), "{reject}");
}

#[test]
fn smtplib_pipelining_and_bdat() {
    let (c, smtp) = start();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/smtp_pipelining.py");
    let (ok, out, err) = tool(
        "/usr/bin/python3",
        &[
            script.to_str().unwrap(),
            "127.0.0.1",
            &smtp.port().to_string(),
        ],
    );
    assert!(ok, "{out}{err}");
    assert_eq!(out.lines().count(), 2);
    let list = c.list(0).unwrap();
    let msgs = list.as_array().unwrap();
    assert_eq!(msgs.len(), 2);
    let piped = msgs
        .iter()
        .find(|m| m["mail_from"] == "pipe@example.com")
        .unwrap();
    assert_eq!(piped["recipients"].as_array().unwrap().len(), 2);
    assert!(msgs.iter().any(|m| m["mail_from"] == "chunk@example.com"));
}

#[test]
fn smtp_source_many_sessions() {
    let (c, smtp) = start();
    let (ok, out, err) = tool(
        "smtp-source",
        &[
            "-c",
            "-s",
            "20",
            "-m",
            "200",
            "-l",
            "5000",
            "-f",
            "load@example.com",
            "-t",
            "sink@dest.test",
            &smtp.to_string(),
        ],
    );
    assert!(ok, "{out}{err}");
    let n = senders(&c)
        .iter()
        .filter(|s| *s == "load@example.com")
        .count();
    assert_eq!(n, 200, "every message smtp-source sent is committed");
}

/// A raw session: sends each part (one command, or one message's data) and reads its one
/// reply (all lines of it) before the next; returns everything the server said.
fn raw(addr: SocketAddr, script: &[&[u8]]) -> String {
    raw_on(SmtpClient::connect(addr), script)
}

/// `raw`, from a chosen loopback address.
fn raw_from(addr: SocketAddr, from: &str, script: &[&[u8]]) -> String {
    raw_on(SmtpClient::connect_from(Some(from), addr), script)
}

fn raw_on(mut s: SmtpClient, script: &[&[u8]]) -> String {
    s.w.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut out = s.reply_text();
    for part in script {
        if s.w.write_all(part).is_err() {
            return out;
        }
        let reply = s.reply_text();
        if reply.is_empty() {
            return out;
        }
        out.push_str(&reply);
    }
    // Whatever else the server says (a 421 after the last reply, say), up to its close.
    s.raw(b"QUIT\r\n");
    loop {
        let reply = s.reply_text();
        if reply.is_empty() {
            return out;
        }
        out.push_str(&reply);
    }
}

#[test]
fn malformed_input_gets_the_right_replies_and_queues_nothing() {
    let (c, smtp) = start();
    let long = format!("NOOP {}\r\n", "x".repeat(5000));
    let out = raw(
        smtp,
        &[b"EHLO t.example.com\r\n", long.as_bytes(), b"NOOP\r\n"],
    );
    assert!(out.contains("500 5.5.2 line too long"), "{out}");
    assert!(
        out.contains("250 2.0.0 OK"),
        "the session goes on after a long line: {out}"
    );
    let out = raw(smtp, &[b"EHLO t\r\n", b"MA\0IL FROM:<a@example.com>\r\n"]);
    assert!(out.contains("500 5.5.2 NUL"), "{out}");
    let out = raw(
        smtp,
        &[
            b"EHLO t\r\n",
            b"RCPT TO:<x@dest.test>\r\n",
            b"DATA\r\n",
            b"MAIL FROM:<a@example.com>\r\n",
            b"DATA\r\n",
        ],
    );
    assert!(out.contains("503 5.5.1 send MAIL first"), "{out}");
    assert!(
        out.contains("554 5.5.1 no valid recipients") || out.contains("503"),
        "{out}"
    );
    let out = raw(smtp, &[b"MAIL FROM:<a@example.com>\r\n"]);
    assert!(out.contains("503 5.5.1 send EHLO or HELO first"), "{out}");
    // Over the 64K limit of this source: refused after the data, nothing queued.
    let big = format!(
        "Subject: big\r\n\r\n{}\r\n.\r\n",
        "y".repeat(998)
            .repeat(80)
            .as_str()
            .chars()
            .collect::<Vec<_>>()
            .chunks(998)
            .map(|c| c.iter().collect::<String>())
            .collect::<Vec<_>>()
            .join("\r\n")
    );
    let out = raw(
        smtp,
        &[
            b"EHLO t\r\n",
            b"MAIL FROM:<big@example.com>\r\n",
            b"RCPT TO:<x@dest.test>\r\n",
            b"DATA\r\n",
            big.as_bytes(),
        ],
    );
    assert!(out.contains("552 5.3.4"), "{out}");
    let out = raw(
        smtp,
        &[
            b"EHLO t\r\n",
            b"MAIL FROM:<big@example.com> SIZE=10000000\r\n",
        ],
    );
    assert!(out.contains("552 5.3.4"), "{out}");
    // A bare LF in the data is refused (no end-of-data smuggling).
    let out = raw(
        smtp,
        &[
            b"EHLO t\r\n",
            b"MAIL FROM:<lf@example.com>\r\n",
            b"RCPT TO:<x@dest.test>\r\n",
            b"DATA\r\n",
            b"Subject: x\r\n\r\nline\n.\nmore\r\n.\r\n",
        ],
    );
    assert!(out.contains("554 5.6.0 bare LF"), "{out}");
    let out = raw(
        smtp,
        &[
            b"EHLO t\r\n",
            b"MAIL FROM:<cr@example.com>\r\n",
            b"RCPT TO:<x@dest.test>\r\n",
            b"DATA\r\n",
            b"Subject: x\r\n\r\nline\r.\rmore\r\n.\r\n",
        ],
    );
    assert!(out.contains("554 5.6.0 bare CR"), "{out}");
    // A data line over 998 octets: refused after the end of data, and the session goes on.
    let long_line = format!("Subject: x\r\n\r\n{}\r\nafter\r\n.\r\n", "z".repeat(1500));
    let out = raw(
        smtp,
        &[
            b"EHLO t\r\n",
            b"MAIL FROM:<long@example.com>\r\n",
            b"RCPT TO:<x@dest.test>\r\n",
            b"DATA\r\n",
            long_line.as_bytes(),
            b"NOOP\r\n",
        ],
    );
    assert!(
        out.contains("500 5.6.0 a line in the message is longer than 998 octets"),
        "{out}"
    );
    assert!(
        out.contains("250 2.0.0 OK\r\n"),
        "NOOP got no answer: {out}"
    );
    // A bare CR in HELO or in an address never reaches the Received header or a command
    // sent onward.
    let out = raw(
        smtp,
        &[
            b"EHLO a\rb.example.com\r\n",
            b"EHLO t\r\n",
            b"MAIL FROM:<cr@example.com>\r\n",
            b"RCPT TO:<a\rRCPT TO:<b@dest.test>@dest.test>\r\n",
        ],
    );
    assert_eq!(
        out.matches("501 5.5.2 control characters").count(),
        2,
        "{out}"
    );
    // A client that stops in the middle of DATA.
    {
        let mut s = TcpStream::connect(smtp).unwrap();
        s.write_all(b"EHLO t\r\nMAIL FROM:<cut@example.com>\r\nRCPT TO:<x@dest.test>\r\nDATA\r\n")
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        s.write_all(b"Subject: cut\r\n\r\nhalf a mess").unwrap();
    }
    // A TLS handshake that fails.
    {
        let mut s = TcpStream::connect(smtp).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"EHLO t\r\nSTARTTLS\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(300));
        s.write_all(b"this is not a TLS client hello\r\n").unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        assert!(String::from_utf8_lossy(&buf).contains("220 2.0.0 ready to start TLS"));
    }
    // Too many bad commands end the session.
    let bad: Vec<&[u8]> = (0..10).map(|_| b"BOGUS\r\n" as &[u8]).collect();
    let out = raw(smtp, &bad);
    assert!(out.contains("421 4.7.0 too many bad commands"), "{out}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        senders(&c).is_empty(),
        "nothing half-queued: {:?}",
        senders(&c)
    );
    // A good message afterwards still works, with VRFY answered 252.
    let out = raw(
        smtp,
        &[
            b"EHLO t\r\n",
            b"VRFY someone\r\n",
            b"MAIL FROM:<ok@example.com>\r\n",
            b"RCPT TO:<x@dest.test>\r\n",
            b"DATA\r\n",
            b"Subject: ok\r\n\r\n..dot-stuffed\r\n.\r\n",
        ],
    );
    assert!(out.contains("252 2.5.2"), "{out}");
    assert!(out.contains("250 2.0.0 OK queued as"), "{out}");
    assert_eq!(senders(&c), vec!["ok@example.com".to_string()]);
}

#[test]
fn ingress_survives_a_leader_change() {
    let dir = tempfile::tempdir().unwrap();
    let p = policy(dir.path());
    let fast = "[raft]\nheartbeat_ms = 50\nelection_min_ms = 300\nelection_max_ms = 600\ncommit_timeout_ms = 2000\n";
    let mut c = Cluster::start(3, &p, fast);
    let (smtp, _) = c.start_ingress();
    let mut acked = Vec::new();
    let mut temp = 0;
    for n in 0..60 {
        if n == 20 {
            let l = c.leader().unwrap();
            c.controllers[l].kill9();
        }
        let from = format!("lc{n}@example.com");
        let reply = smtp_send(
            smtp,
            &from,
            &["x@dest.test"],
            "Subject: leader change\n\nbody",
        );
        if reply.starts_with("250") {
            acked.push(from);
        } else {
            assert!(
                reply.starts_with('4'),
                "a failure must be temporary, got `{reply}`"
            );
            temp += 1;
        }
    }
    assert!(
        acked.len() >= 40,
        "only {} of 60 acknowledged ({temp} deferred)",
        acked.len()
    );
    let leader = c.leader().unwrap();
    let list = c.list(leader).unwrap();
    let present: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mail_from"].as_str().unwrap().to_string())
        .collect();
    for a in &acked {
        assert_eq!(
            present.iter().filter(|p| *p == a).count(),
            1,
            "{a} acknowledged but not present exactly once"
        );
    }
}

#[test]
fn http_injection_answers_after_the_commit() {
    let dir = tempfile::tempdir().unwrap();
    let p = format!("{}http-access 127.0.0.1 admin\n", policy(dir.path()));
    let mut c = Cluster::start(1, &p, "");
    let (_, http) = c.start_ingress();
    let url = format!("http://{http}/api/inject/v1");
    let body = r#"{"envelope_sender":"api@example.com","recipients":["a@dest.test","not-an-address"],
        "message":{"headers":[["Subject","Hello"]],"text":"plain","html":"<p>html</p>"},"job_id":"job-9"}"#;
    let (ok, out, err) = tool(
        "curl",
        &[
            "-s",
            "-w",
            "\n%{http_code}",
            "-H",
            "content-type: application/json",
            "-d",
            body,
            &url,
        ],
    );
    assert!(ok, "{err}");
    let (json, code) = out.rsplit_once('\n').unwrap();
    assert_eq!(code, "200", "{json}");
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    assert!(v["id"].as_str().is_some_and(|s| !s.is_empty()));
    assert_eq!(v["recipients"][0]["accepted"], true);
    assert_eq!(v["recipients"][1]["accepted"], false);
    let list = c.list(0).unwrap();
    let m = &list.as_array().unwrap()[0];
    assert_eq!(m["mail_from"], "api@example.com");
    assert_eq!(m["job_id"], "job-9");
    assert_eq!(m["recipients"].as_array().unwrap().len(), 1);
    // An unknown VMTA is refused with a clear error, and nothing is queued.
    let bad = r#"{"envelope_sender":"api@example.com","recipients":["a@dest.test"],"content":"Subject: x\n\nbody","vmta":"nope"}"#;
    let (_, out, _) = tool(
        "curl",
        &[
            "-s",
            "-w",
            "\n%{http_code}",
            "-H",
            "content-type: application/json",
            "-d",
            bad,
            &url,
        ],
    );
    assert!(out.ends_with("422") && out.contains("`nope`"), "{out}");
    assert_eq!(c.list(0).unwrap().as_array().unwrap().len(), 1);
}

#[test]
fn implicit_tls_listener_and_starttls_before_auth() {
    let dir = tempfile::tempdir().unwrap();
    // Loopback 127.0.0.4 may authenticate in clear, except that STARTTLS must come first.
    let p = policy(dir.path()).replace(
        "<smtp-user alice>",
        "<source 127.0.0.4>\n  allow-unencrypted-plain-auth yes\n  require-starttls-before-auth yes\n</source>\n<smtp-user alice>",
    );
    let mut c = Cluster::start(1, &p, "");
    c.kept.push(dir);
    let (smtp, smtps) = c.start_ingress_smtps();
    // SMTPS: TLS from the first byte, then the greeting.
    let (ok, out, err) = tool(
        "swaks",
        &[
            "--server",
            &smtps.to_string(),
            "--tlsc",
            "--from",
            "smtps@example.com",
            "--to",
            "x@dest.test",
        ],
    );
    assert!(ok, "{out}{err}");
    assert!(out.contains("TLS started") || out.contains("TLS"), "{out}");
    assert!(out.contains("250 2.0.0 OK queued as"), "{out}");
    // A plain client on the implicit-TLS port gets no greeting.
    let mut s = TcpStream::connect(smtps).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(b"EHLO plain.example.com\r\n").unwrap();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    assert!(
        !String::from_utf8_lossy(&buf[..n]).contains("220 "),
        "a greeting in clear"
    );
    // require-starttls-before-auth: AUTH is neither offered nor taken before STARTTLS...
    let smtp_str = smtp.to_string();
    let auth = |extra: &[&str]| {
        let mut args = vec![
            "--server",
            &smtp_str,
            "--local-interface",
            "127.0.0.4",
            "--auth",
            "PLAIN",
            "--auth-user",
            "alice",
            "--auth-password",
            "s3cret",
            "--from",
            "auth@example.com",
            "--to",
            "x@dest.test",
        ];
        args.extend_from_slice(extra);
        tool("swaks", &args)
    };
    let (ok, out, _) = auth(&[]);
    assert!(!ok, "AUTH in clear was taken: {out}");
    let raw_out = raw_from(
        smtp,
        "127.0.0.4",
        &[b"EHLO t\r\n", b"AUTH PLAIN AGFsaWNlAHMzY3JldA==\r\n"],
    );
    assert!(!raw_out.contains("AUTH PLAIN LOGIN"), "{raw_out}");
    assert!(raw_out.contains("530 5.7.0"), "{raw_out}");
    // ...and after STARTTLS it works.
    let (ok, out, err) = auth(&["--tls"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("235"), "{out}");
    let s = senders(&c);
    assert!(s.contains(&"smtps@example.com".to_string()), "{s:?}");
    assert!(s.contains(&"auth@example.com".to_string()), "{s:?}");
}

#[test]
fn source_directives_act_at_the_smtp_session() {
    let dir = tempfile::tempdir().unwrap();
    let extra = "relay-domain relayed.test\n\
                 <source 127.0.0.5>\n  smtp-service no\n</source>\n\
                 <source 127.0.0.6>\n  allow-unencrypted-plain-auth yes\n</source>\n\
                 <source 127.0.0.7>\n  allow-starttls no\n</source>\n\
                 <source 127.0.0.8>\n  require-starttls yes\n  always-allow-relaying yes\n</source>\n\
                 <source 127.0.0.9>\n  always-allow-api-submission yes\n</source>\n\
                 <domain q1.test>\n  queue-to rollup\n</domain>\n";
    let p = format!("{}{extra}", policy(dir.path()));
    let mut c = Cluster::start(1, &p, "");
    c.kept.push(dir);
    let (smtp, http) = c.start_ingress();
    // host-name names the ingress in its greeting.
    let out = raw(smtp, &[b"EHLO t\r\n"]);
    assert!(out.starts_with("220 ingress.example.com"), "{out}");
    assert!(out.contains("STARTTLS"), "{out}");
    // smtp-service no: refused at connect.
    let out = raw_from(smtp, "127.0.0.5", &[]);
    assert!(out.starts_with("554 5.7.1"), "{out}");
    // allow-starttls no: not offered.
    let out = raw_from(smtp, "127.0.0.7", &[b"EHLO t\r\n"]);
    assert!(out.contains("250") && !out.contains("STARTTLS"), "{out}");
    // require-starttls: no mail in clear.
    let out = raw_from(
        smtp,
        "127.0.0.8",
        &[b"EHLO t\r\n", b"MAIL FROM:<a@example.com>\r\n"],
    );
    assert!(out.contains("530 5.7.0"), "{out}");
    // relay-domain: relaying to it only.
    let out = raw_from(
        smtp,
        "127.0.0.3",
        &[
            b"EHLO t\r\n",
            b"MAIL FROM:<a@example.com>\r\n",
            b"RCPT TO:<x@relayed.test>\r\n",
            b"RCPT TO:<y@other.test>\r\n",
        ],
    );
    assert!(out.contains("250 2.1.5"), "{out}");
    assert!(out.contains("550 5.7.1"), "{out}");
    // allow-unencrypted-plain-auth: AUTH offered and taken in clear; after it, the user's
    // `source {auth}` applies (its default-virtual-mta), and queue-to names the queue.
    let out = raw_from(
        smtp,
        "127.0.0.6",
        &[
            b"EHLO t\r\n",
            b"AUTH PLAIN AGFsaWNlAHMzY3JldA==\r\n",
            b"MAIL FROM:<authed@example.com>\r\n",
            b"RCPT TO:<x@q1.test>\r\n",
            b"DATA\r\n",
            b"Subject: authed\r\n\r\nbody\r\n.\r\n",
        ],
    );
    assert!(out.contains("AUTH PLAIN LOGIN"), "{out}");
    assert!(out.contains("235"), "{out}");
    assert!(out.contains("250 2.0.0 OK queued as"), "{out}");
    let list = c.list(0).unwrap();
    let m = list
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mail_from"] == "authed@example.com")
        .cloned()
        .unwrap();
    assert_eq!(m["vmta"], "v1", "{m}");
    assert_eq!(m["queue"], "rollup", "{m}");
    // always-allow-api-submission: HTTP injection from that source without http-access.
    let url = format!("http://{http}/api/inject/v1");
    let body = r#"{"envelope_sender":"api@example.com","recipients":["a@dest.test"],"content":"Subject: x\n\nbody"}"#;
    let code = |from: &str| {
        let (_, out, _) = tool(
            "curl",
            &[
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--interface",
                from,
                "-H",
                "content-type: application/json",
                "-d",
                body,
                &url,
            ],
        );
        out
    };
    assert_eq!(code("127.0.0.9"), "200");
    assert_eq!(code("127.0.0.1"), "403");
}

#[test]
fn max_smtp_in_caps_sessions_per_client_address() {
    let dir = tempfile::tempdir().unwrap();
    // 127.0.0.3 may hold two sessions at once; 127.0.0.1 is not capped.
    let p = policy(dir.path()).replace(
        "<source 127.0.0.3>\n  smtp-service yes\n",
        "<source 127.0.0.3>\n  smtp-service yes\n  max-smtp-in 2\n",
    );
    let mut c = Cluster::start(1, &p, "");
    c.kept.push(dir);
    let (smtp, _) = c.start_ingress();
    let open = |from: &str| {
        let s = connect_from(from, smtp);
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        (s, line)
    };
    let (a, l1) = open("127.0.0.3");
    let (b, l2) = open("127.0.0.3");
    assert!(l1.starts_with("220") && l2.starts_with("220"), "{l1}{l2}");
    let (_, l3) = open("127.0.0.3");
    assert!(
        l3.starts_with("421 4.7.0 too many connections from your address"),
        "{l3}"
    );
    // Other addresses are not held up by it.
    let others: Vec<_> = (0..3).map(|_| open("127.0.0.1")).collect();
    assert!(others.iter().all(|(_, l)| l.starts_with("220")));
    // A session that ends frees its place.
    drop(a);
    assert!(
        wait_until(Duration::from_secs(10), || open("127.0.0.3")
            .1
            .starts_with("220")),
        "the closed session's place was not given back"
    );
    drop(b);
}

#[test]
fn total_max_smtp_in_caps_concurrent_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let p = format!("total-max-smtp-in 2\n{}", policy(dir.path()));
    let mut c = Cluster::start(1, &p, "");
    c.kept.push(dir);
    let (smtp, _) = c.start_ingress();
    let open = || {
        let s = TcpStream::connect(smtp).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        (s, line)
    };
    // Two sessions (once the harness's probe session has ended), then a third is refused.
    let mut held = None;
    assert!(wait_until(Duration::from_secs(10), || {
        let (a, l1) = open();
        let (b, l2) = open();
        let ok = l1.starts_with("220") && l2.starts_with("220");
        if ok {
            held = Some((a, b));
        }
        ok
    }));
    // While both sessions are busy, a third client is refused (after waiting up to 3 s for
    // one to stall).
    let (a, b) = held.take().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let busy = {
        let stop = stop.clone();
        let (mut a, mut b) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        std::thread::spawn(move || {
            let mut ra = BufReader::new(a.try_clone().unwrap());
            let mut rb = BufReader::new(b.try_clone().unwrap());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for (w, r) in [(&mut a, &mut ra), (&mut b, &mut rb)] {
                    let _ = w.write_all(b"NOOP\r\n");
                    let mut l = String::new();
                    let _ = r.read_line(&mut l);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let (_c, l3) = open();
    assert!(l3.starts_with("421 4.7.0"), "{l3}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    busy.join().unwrap();
    // Once they stall (2 s without a command), a new client takes one's place.
    assert!(
        wait_until(Duration::from_secs(20), || open().1.starts_with("220")),
        "no stalled session gave its place"
    );
    let evicted = [a, b].into_iter().any(|s| {
        let mut all = String::new();
        let _ = BufReader::new(s).read_to_string(&mut all);
        all.contains("421 4.4.2")
    });
    assert!(
        evicted,
        "neither stalled session was told why it was closed"
    );
}

#[test]
fn listeners_and_the_http_port_come_from_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    let (plain, smtps, http) = (free_port(), free_port(), free_port());
    let p = format!(
        "smtp-listener 127.0.0.1:{plain}\nsmtp-listener 127.0.0.1:{smtps} tls=yes\n\
         http-mgmt-port {http}\nhttp-access 127.0.0.1 admin\n{}",
        policy(dir.path())
    );
    let mut c = Cluster::start(1, &p, "");
    c.kept.push(dir);
    c.start_ingress_from_policy();
    for port in [plain, smtps, http] {
        let a: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        assert!(wait_for_port(a, Duration::from_secs(30)), "nothing on {a}");
    }
    let out = raw(
        format!("127.0.0.1:{plain}").parse().unwrap(),
        &[b"EHLO t\r\n"],
    );
    assert!(out.starts_with("220 ingress.example.com"), "{out}");
    let (ok, out, err) = tool(
        "swaks",
        &[
            "--server",
            &format!("127.0.0.1:{smtps}"),
            "--tlsc",
            "--from",
            "policy-listener@example.com",
            "--to",
            "x@dest.test",
        ],
    );
    assert!(ok && out.contains("250 2.0.0 OK queued as"), "{out}{err}");
    let (_, out, _) = tool(
        "curl",
        &[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"envelope_sender":"api@example.com","recipients":["a@dest.test"],"content":"Subject: x\n\nbody"}"#,
            &format!("http://127.0.0.1:{http}/api/inject/v1"),
        ],
    );
    assert_eq!(out, "200");
}
