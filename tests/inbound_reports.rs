//! Reports that come back: mail to `<bounce-processor>` and `<feedback-loop-processor>`
//! addresses is read at ingress instead of relayed. A late bounce becomes `rb` rows (the
//! recipient from the DSN's fields or from the VERP return path, the job from the
//! `X-Sluice-Ref` header Sluice put in the outgoing message), a delay report an `rs` row, an
//! ARF complaint an `f` row; hard bounces of the policy's categories and complaints go on the
//! suppression list, and every controller records the same rows.

use std::time::Duration;

use crate::harness::*;

fn acct_text(c: &Cluster, node: usize) -> String {
    std::fs::read_to_string(c.path().join(format!("controller-{node}/acct.csv")))
        .unwrap_or_default()
}

/// Rows as (type, the rest of the line).
fn rows(c: &Cluster) -> Vec<Vec<String>> {
    acct_text(c, 1)
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

fn suppressed(c: &Cluster) -> Vec<serde_json::Value> {
    let (ok, out, err) = c.cli(&["suppress", "list", "--json", "-c", &c.addrs[0]]);
    assert!(ok, "{err}");
    serde_json::from_str::<Vec<serde_json::Value>>(&out).unwrap()
}

const FIELDS: &str = "type,orig,rcpt,dsnAction,dsnStatus,bounceCat,jobId,envId,dsnReportingMta,\
                      format,feedbackType,userAgent,reportedDomain,origIp,arrivalDate";

#[test]
fn bounces_and_complaints_become_records_and_suppressions() {
    let port = free_port();
    let policy = format!(
        "suppress-on-bounce bad-mailbox\n\
         <virtual-mta v1>\n smtp-source-host 127.0.0.1 v1.example.com\n</virtual-mta>\n\
         <domain *>\n route [127.0.0.1]:{port}\n retry-after 1h\n</domain>\n\
         <bounce-processor>\n deliver-unmatched-email yes\n <address-list>\n\
         domain bounces.example.com\n </address-list>\n</bounce-processor>\n\
         <feedback-loop-processor>\n deliver-matched-email yes\n <address-list>\n\
         address fbl@example.com\n\
         address /^arf-[0-9]+@example\\.net$/\n </address-list>\n</feedback-loop-processor>\n\
         <acct-file acct.csv>\n records d,rb,rs,f\n record-fields d {FIELDS}\n\
         record-fields rb {FIELDS}\n record-fields rs {FIELDS}\n record-fields f {FIELDS}\n\
         </acct-file>\n\
         <source 127.0.0.1>\n always-allow-relaying yes\n default-virtual-mta v1\n\
         process-x-job yes\n</source>\n\
         <source 127.0.0.3>\n always-allow-relaying yes\n default-virtual-mta v1\n\
         verp-default yes\n</source>\n\
         <source 0/0>\n default-virtual-mta v1\n</source>\n"
    );
    let mut c = Cluster::start(3, &policy, "");
    let (_, _, saved) = c.start_sink_at(format!("127.0.0.1:{port}").parse().unwrap(), &[]);
    let (smtp, _) = c.start_ingress();
    c.start_worker("w1", &["127.0.0.1"], "");

    // Outgoing mail with XVERP: one return path per recipient, and the job named in
    // X-Sluice-Ref.
    let r = send_from(
        "127.0.0.1",
        smtp,
        "<news@bounces.example.com> XVERP",
        &["<a@x.test>", "<b@x.test>"],
        "X-Job: spring\nSubject: offer\n\nhello",
    );
    assert!(r.starts_with("250"), "{r}");
    let delivered = || {
        std::fs::read_dir(&saved)
            .map(|d| {
                d.flatten()
                    .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    assert!(
        wait_until(Duration::from_secs(30), || delivered().len() == 2),
        "{:?}",
        rows(&c)
    );
    for m in delivered() {
        let verp_a = m.contains("X-Sink-Mail-From: news+a=x.test@bounces.example.com\r\n")
            && m.contains("X-Sink-Rcpt: a@x.test");
        let verp_b = m.contains("X-Sink-Mail-From: news+b=x.test@bounces.example.com\r\n")
            && m.contains("X-Sink-Rcpt: b@x.test");
        assert!(verp_a || verp_b, "{m}");
        assert!(m.contains("X-Sluice-Ref: job=spring\r\n"), "{m}");
        assert!(!m.contains("X-Job"), "{m}");
    }

    // verp-default in a <source> does the same without XVERP.
    let r = send_from(
        "127.0.0.3",
        smtp,
        "<news@bounces.example.com>",
        &["<v@x.test>"],
        "Subject: offer\n\nhello",
    );
    assert!(r.starts_with("250"), "{r}");
    assert!(
        wait_until(Duration::from_secs(30), || delivered()
            .iter()
            .any(|m| m.contains(
                "X-Sink-Mail-From: news+v=x.test@bounces.example.com\r\n"
            ))),
        "{:?}",
        delivered()
    );

    // 1. A bounce in plain text that does not name the recipient, to b's VERP address, from
    // a host that may not relay: the recipient comes from the return path, the job from the
    // returned header.
    let text_bounce = "From: MAILER-DAEMON@mx.x.test\nTo: news+b=x.test@bounces.example.com\n\
         Subject: failure notice\n\n\
         I'm afraid I wasn't able to deliver your message.\n\
         Remote host said: 550 5.1.1 The email account that you tried to reach does not exist\n\n\
         --- Below this line is a copy of the message.\n\n\
         Message-ID: <m1@bounces.example.com>\nX-Sluice-Ref: job=spring\nSubject: offer\n\nhello\n";
    let r = send_from(
        "127.0.0.2",
        smtp,
        "<>",
        &["<news+b=x.test@bounces.example.com>"],
        text_bounce,
    );
    assert_eq!(r.trim_end(), "250 2.0.0 OK report processed");

    // 2. An RFC 3464 report to the plain address: one recipient failed, one delayed.
    let dsn = "From: MAILER-DAEMON@mx.y.test\nTo: news@bounces.example.com\nSubject: report\n\
         MIME-Version: 1.0\n\
         Content-Type: multipart/report; report-type=delivery-status; boundary=\"b1\"\n\n\
         --b1\nContent-Type: text/plain\n\nSome recipients failed.\n\n\
         --b1\nContent-Type: message/delivery-status\n\n\
         Reporting-MTA: dns; mx.y.test\nOriginal-Envelope-Id: E7\n\n\
         Original-Recipient: rfc822;c@y.test\nFinal-Recipient: rfc822;c@y.test\n\
         Action: failed\nStatus: 5.1.1\n\
         Diagnostic-Code: smtp; 550 5.1.1 <c@y.test>: Recipient address rejected: User unknown\n\n\
         Final-Recipient: rfc822;d@y.test\nAction: delayed\nStatus: 4.4.7\n\n\
         --b1\nContent-Type: text/rfc822-headers\n\n\
         From: news@bounces.example.com\nTo: c@y.test\nX-Sluice-Ref: job=autumn envid=E7\n\
         Subject: offer\n\n--b1--\n";
    let r = send_from(
        "127.0.0.2",
        smtp,
        "<>",
        &["<news@bounces.example.com>"],
        dsn,
    );
    assert_eq!(r.trim_end(), "250 2.0.0 OK report processed");
    // The reporter sends it again (as after a 451): nothing is recorded twice.
    let r = send_from(
        "127.0.0.2",
        smtp,
        "<>",
        &["<news@bounces.example.com>"],
        dsn,
    );
    assert_eq!(r.trim_end(), "250 2.0.0 OK report processed");

    // 2b. A delay report whose text quotes a temporary reply: an `rs` row, no failure.
    let delay = "From: MAILER-DAEMON@mx.y.test\nTo: news@bounces.example.com\n\
         Subject: Delayed Mail (still being retried)\nMIME-Version: 1.0\n\
         Content-Type: multipart/report; report-type=delivery-status; boundary=\"b2\"\n\n\
         --b2\nContent-Type: text/plain\n\n\
         <e@y.test>: host mx.y.test said: 452 4.2.2 Mailbox full (in reply to RCPT TO)\n\n\
         --b2\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; mx.y.test\n\n\
         Final-Recipient: rfc822;e@y.test\nAction: delayed\nStatus: 4.2.2\n\n--b2--\n";
    let r = send_from(
        "127.0.0.2",
        smtp,
        "<>",
        &["<news@bounces.example.com>"],
        delay,
    );
    assert_eq!(r.trim_end(), "250 2.0.0 OK report processed");

    // 3. An ARF complaint about a@x.test.
    let arf = "From: feedback@isp.test\nTo: fbl@example.com\nSubject: complaint\nMIME-Version: 1.0\n\
         Content-Type: multipart/report; report-type=feedback-report; boundary=\"f1\"\n\n\
         --f1\nContent-Type: text/plain\n\nThis is an email abuse report.\n\n\
         --f1\nContent-Type: message/feedback-report\n\n\
         Feedback-Type: abuse\nUser-Agent: ExampleFBL/1.0\nVersion: 1\n\
         Original-Mail-From: <news+a=x.test@bounces.example.com>\n\
         Original-Rcpt-To: <a@x.test>\nArrival-Date: Mon, 30 Nov 2026 10:00:00 +0000\n\
         Reporting-MTA: dns; fbl.isp.test\nSource-IP: 127.0.0.1\nReported-Domain: example.com\n\n\
         --f1\nContent-Type: message/rfc822\n\n\
         From: news@example.com\nTo: a@x.test\nX-Sluice-Ref: job=spring\nSubject: offer\n\n\
         hello\n--f1--\n";
    let r = send_from("127.0.0.2", smtp, "<>", &["<fbl@example.com>"], arf);
    // deliver-matched-email yes, but this client may not relay to example.com: consumed.
    assert_eq!(r.trim_end(), "250 2.0.0 OK report processed");
    // From a client that may relay, the report is recorded (once: the same report) and
    // passed on to fbl@example.com.
    let r = send_from("127.0.0.1", smtp, "<>", &["<fbl@example.com>"], arf);
    assert!(r.contains("queued as"), "{r}");

    // 4. Mail to a processor's address that is no report: the bounce processor delivers it
    // (deliver-unmatched-email yes), but only for a client that may relay there; the
    // feedback processor, by default, does not.
    let r = send_from(
        "127.0.0.2",
        smtp,
        "<someone@elsewhere.test>",
        &["<arf-7@example.net>"],
        "Subject: hello\n\njust a note",
    );
    assert_eq!(r.trim_end(), "250 2.0.0 OK report processed");
    let r = send_from(
        "127.0.0.2",
        smtp,
        "<someone@elsewhere.test>",
        &["<relay-me@bounces.example.com>"],
        "Subject: hello\n\nnot from a client that may relay",
    );
    assert_eq!(r.trim_end(), "250 2.0.0 OK report processed");
    let r = send_from(
        "127.0.0.1",
        smtp,
        "<someone@elsewhere.test>",
        &["<postmaster@bounces.example.com>"],
        "Subject: hello\n\nplease read",
    );
    assert!(r.contains("queued as"), "{r}");
    // No route through a processor's address, and no look-alike of a pattern.
    let mut s = SmtpClient::connect_from(Some("127.0.0.2"), smtp);
    s.reply();
    s.send("EHLO reporter.example.net");
    s.send("MAIL FROM:<>");
    let r = s.send("RCPT TO:<a%victim.test@bounces.example.com>");
    assert!(r.starts_with("550 5.7.1 sender-specified routing"), "{r}");
    let r = s.send("RCPT TO:<arf-7@example.net.victim.test>");
    assert!(r.starts_with("550 5.7.1 relaying denied"), "{r}");
    s.raw(b"QUIT\r\n");
    let mut s = SmtpClient::connect(smtp);
    s.reply();
    s.send("EHLO test.example.com");
    let r = s.send("MAIL FROM:<news@bounces.example.com> XVERP=-=");
    assert!(r.starts_with("555"), "{r}");
    s.raw(b"QUIT\r\n");

    let find = |t: &str, rcpt: &str| {
        rows(&c)
            .into_iter()
            .find(|r| r[0] == t && r.get(2).is_some_and(|x| x == rcpt))
    };
    assert!(
        wait_until(Duration::from_secs(30), || find(
            "d",
            "postmaster@bounces.example.com"
        )
        .is_some()
            && find("f", "a@x.test").is_some()),
        "{}",
        acct_text(&c, 1)
    );
    // type,orig,rcpt,dsnAction,dsnStatus,bounceCat,jobId,envId,dsnReportingMta,format,
    // feedbackType,userAgent,reportedDomain,origIp,arrivalDate
    let b = find("rb", "b@x.test").unwrap_or_else(|| panic!("{}", acct_text(&c, 1)));
    assert_eq!(b[1], "news@bounces.example.com", "{b:?}");
    assert_eq!(
        &b[3..10],
        [
            "failed",
            "5.1.1 (bad-mailbox)",
            "bad-mailbox",
            "spring",
            "",
            "",
            "text"
        ],
        "{b:?}"
    );
    let c1 = find("rb", "c@y.test").unwrap();
    assert_eq!(c1[1], "news@bounces.example.com");
    assert_eq!(
        &c1[3..10],
        [
            "failed",
            "5.1.1 (bad-mailbox)",
            "bad-mailbox",
            "autumn",
            "E7",
            "mx.y.test",
            "dsn"
        ],
        "{c1:?}"
    );
    let d = find("rs", "d@y.test").unwrap();
    assert_eq!(&d[3..5], ["delayed", "4.4.7"], "{d:?}");
    assert!(find("rb", "d@y.test").is_none());
    let e = find("rs", "e@y.test").unwrap_or_else(|| panic!("{}", acct_text(&c, 1)));
    assert_eq!(&e[3..5], ["delayed", "4.2.2"], "{e:?}");
    assert!(find("rb", "e@y.test").is_none(), "{}", acct_text(&c, 1));
    // The report sent twice gave its rows once.
    let count = |t: &str, rcpt: &str| {
        rows(&c)
            .iter()
            .filter(|r| r[0] == t && r[2] == rcpt)
            .count()
    };
    assert_eq!(count("rb", "c@y.test"), 1, "{}", acct_text(&c, 1));
    assert_eq!(count("rs", "d@y.test"), 1, "{}", acct_text(&c, 1));
    assert_eq!(count("f", "a@x.test"), 1, "{}", acct_text(&c, 1));
    assert!(
        wait_until(Duration::from_secs(30), || find("d", "fbl@example.com")
            .is_some()),
        "{}",
        acct_text(&c, 1)
    );
    let f = find("f", "a@x.test").unwrap();
    assert_eq!(f[1], "news@bounces.example.com", "{f:?}");
    assert_eq!(f[6], "spring", "{f:?}");
    assert_eq!(
        &f[9..15],
        [
            "arf",
            "abuse",
            "ExampleFBL/1.0",
            "example.com",
            "127.0.0.1",
            f[14].as_str()
        ]
    );
    assert!(f[14].starts_with("2026-11-30"), "{f:?}");
    // What was consumed was not delivered; no row names it.
    assert!(!acct_text(&c, 1).contains("arf-7@"));
    assert!(!acct_text(&c, 1).contains("relay-me@"));
    // The VERP message was one message: its rows name the sender as given.
    assert_eq!(
        find("d", "a@x.test").unwrap()[1],
        "news@bounces.example.com"
    );

    // Suppression: the hard bounces and the complaint.
    let list = suppressed(&c);
    let entry = |a: &str| list.iter().find(|e| e["address"] == a).cloned();
    let eb = entry("b@x.test").unwrap_or_else(|| panic!("{list:?}"));
    assert_eq!(eb["reason"], "bad-mailbox");
    assert!(eb["source"].as_str().unwrap().starts_with("rb "), "{eb}");
    assert_eq!(entry("c@y.test").unwrap()["reason"], "bad-mailbox");
    let ea = entry("a@x.test").unwrap();
    assert_eq!(ea["reason"], "complaint");
    assert_eq!(ea["source"], "f fbl.isp.test");
    assert!(entry("d@y.test").is_none(), "a delay suppresses nothing");
    assert!(entry("e@y.test").is_none(), "a delay suppresses nothing");
    // Ingress refuses the complainer.
    let mut last = String::new();
    assert!(
        wait_until(Duration::from_secs(20), || {
            let mut s = SmtpClient::connect(smtp);
            s.reply();
            s.send("EHLO test.example.com");
            s.send("MAIL FROM:<news@bounces.example.com>");
            last = s.send("RCPT TO:<a@x.test>");
            s.raw(b"QUIT\r\n");
            last.starts_with("550 5.7.1")
        }),
        "{last}"
    );
    assert!(last.contains("(complaint)"), "{last}");

    // Every controller wrote the same rows.
    assert!(
        wait_until(Duration::from_secs(30), || {
            let one = acct_text(&c, 1);
            one == acct_text(&c, 2) && one == acct_text(&c, 3)
        }),
        "{}\n---\n{}\n---\n{}",
        acct_text(&c, 1),
        acct_text(&c, 2),
        acct_text(&c, 3)
    );
}
