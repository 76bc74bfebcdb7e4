//! Delivery status notifications end to end: mail bounced by a receiver, delayed, or relayed
//! to a receiver without DSN comes back to its sender as an RFC 3464 report, through the
//! replicated queue, checked with Python's `email` package; the DSN parameters go on to a
//! receiver that offers DSN.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::harness::*;

/// Sends one message with raw envelope lines; returns the final reply.
fn send(addr: SocketAddr, mail: &str, rcpts: &[&str], body: &str) -> String {
    send_from("127.0.0.1", addr, mail, rcpts, body)
}

fn saved_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// The saved messages with a null envelope sender: the notices.
fn notices(dir: &Path) -> Vec<std::path::PathBuf> {
    saved_files(dir)
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .contains("X-Sink-Mail-From: \r\n")
        })
        .collect()
}

fn parse(files: &[std::path::PathBuf]) -> Vec<serde_json::Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/dsn_check.py");
    let mut args = vec![script.to_str().unwrap().to_string()];
    args.extend(files.iter().map(|p| p.to_str().unwrap().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = tool("/usr/bin/python3", &args);
    assert!(ok, "dsn_check.py: {err}");
    serde_json::from_str::<Vec<serde_json::Value>>(&out).unwrap()
}

fn acct(c: &Cluster) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(c.path().join("controller-1/acct.csv")).unwrap_or_default();
    text.lines()
        .skip(1)
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

#[test]
fn notices_reach_senders_through_the_queue() {
    let port = free_port();
    let dsn_port = free_port();
    let policy = format!(
        "host-name mta.example.com\npostmaster postmaster@example.com\n\
         <virtual-mta v1>\n smtp-source-host 127.0.0.1 v1.example.com\n</virtual-mta>\n\
         <domain *>\n route [127.0.0.1]:{port}\n retry-after 1h\n</domain>\n\
         <domain delay.test>\n delay-dsn-after 2s\n</domain>\n\
         <domain dsn.test>\n route [127.0.0.1]:{dsn_port}\n</domain>\n\
         <domain quiet.test>\n deliver-local-dsn no\n</domain>\n\
         <acct-file acct.csv>\n records d,b,t,r\n record-fields r type,orig,rcpt\n\
         record-fields d type,orig,rcpt\n record-fields b type,orig,rcpt,bounceCat\n\
         record-fields t type,orig,rcpt\n</acct-file>\n\
         <source 127.0.0.1>\n always-allow-relaying yes\n default-virtual-mta v1\n</source>\n\
         <source 127.0.0.2>\n always-allow-relaying yes\n default-virtual-mta v1\n\
         deliver-local-dsn no\n</source>\n"
    );
    let mut c = Cluster::start(1, &policy, "");
    let mut sink_args = Vec::new();
    for n in 1..=5 {
        sink_args.push("--reply".to_string());
        sink_args.push(format!("bad{n}@x.test=550 5.1.1 no such user here"));
    }
    let sink_args: Vec<&str> = sink_args.iter().map(String::as_str).collect();
    let (_, _, saved) = c.start_sink_at(format!("127.0.0.1:{port}").parse().unwrap(), &sink_args);
    let (_, _, dsn_saved) =
        c.start_sink_at(format!("127.0.0.1:{dsn_port}").parse().unwrap(), &["--dsn"]);
    let (smtp, _) = c.start_ingress();

    // Three failed recipients (one report), and one delivered to a receiver without DSN
    // while SUCCESS was asked (a "relayed" report). Only the headers come back (RET=HDRS).
    let r = send(
        smtp,
        "<sender@senders.test> RET=HDRS ENVID=env+2B1",
        &[
            "<bad1@x.test>",
            "<bad2@x.test> ORCPT=rfc822;Bad2@x.test",
            "<bad3@x.test> NOTIFY=FAILURE",
            "<ok@x.test> NOTIFY=SUCCESS",
        ],
        "Subject: three fail\nFrom: sender@senders.test\n\nsecret body",
    );
    assert!(r.starts_with("250"), "{r}");
    // No report for a null sender, for NOTIFY=NEVER, or where deliver-local-dsn says no.
    assert!(send(smtp, "<>", &["<bad4@x.test>"], "Subject: null\n\nx").starts_with("250"));
    assert!(
        send(
            smtp,
            "<sender@senders.test>",
            &["<bad5@x.test> NOTIFY=NEVER"],
            "Subject: never\n\nx"
        )
        .starts_with("250")
    );
    assert!(
        send(
            smtp,
            "<a@quiet.test>",
            &["<bad1@x.test>"],
            "Subject: quiet\n\nx"
        )
        .starts_with("250")
    );
    assert!(
        send_from(
            "127.0.0.2",
            smtp,
            "<other@senders.test>",
            &["<bad2@x.test>"],
            "Subject: quiet source\n\nx"
        )
        .starts_with("250")
    );
    // Still retried after delay-dsn-after: one delay report, the whole message returned.
    assert!(
        send(
            smtp,
            "<sender@senders.test> RET=FULL",
            &["<tempfail@delay.test> NOTIFY=DELAY,FAILURE"],
            "Subject: slow\n\nslow body"
        )
        .starts_with("250")
    );
    // A receiver that offers DSN gets the parameters, and no relayed report follows.
    assert!(
        send(
            smtp,
            "<s@senders.test> RET=FULL ENVID=e5",
            &["<u@dsn.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;U@dsn.test"],
            "Subject: dsn hop\n\nx"
        )
        .starts_with("250")
    );
    c.start_worker("w1", &["127.0.0.1"], "");

    // Done when only the delayed message is left and the three reports were delivered.
    let done = wait_until(Duration::from_secs(60), || {
        let list = c.list(0).unwrap_or_default();
        let left = list.as_array().map(|a| a.len()).unwrap_or(99);
        let d_to_senders = acct(&c)
            .iter()
            .filter(|r| r[0] == "d" && r[1].is_empty() && r[2] == "sender@senders.test")
            .count();
        left == 1 && d_to_senders == 3
    });
    if !done {
        c.dump_logs();
    }
    assert!(done, "list: {:?}\nacct: {:?}", c.list(0), acct(&c));
    let files = notices(&saved);
    assert_eq!(files.len(), 3, "{files:?}");
    let reports = parse(&files);
    for d in &reports {
        assert_eq!(d["content_type"], "multipart/report", "{d}");
        assert_eq!(d["report_type"], "delivery-status", "{d}");
        assert_eq!(d["to"], "<sender@senders.test>", "{d}");
        assert_eq!(
            d["from"], "Mail Delivery System <postmaster@example.com>",
            "{d}"
        );
        assert_eq!(d["auto_submitted"], "auto-replied", "{d}");
        assert_eq!(d["defects"], serde_json::json!([]), "{d}");
        assert_eq!(d["parts"][0], "text/plain", "{d}");
        assert_eq!(d["parts"][1], "message/delivery-status", "{d}");
        assert_eq!(
            d["per_message"]["Reporting-MTA"], "dns; mta.example.com",
            "{d}"
        );
        assert!(d["per_message"]["Arrival-Date"].is_string(), "{d}");
    }
    let by_action = |a: &str| {
        reports
            .iter()
            .filter(|d| d["recipients"][0]["Action"] == a)
            .cloned()
            .collect::<Vec<_>>()
    };
    let failed = by_action("failed");
    assert_eq!(failed.len(), 1, "{reports:?}");
    let f = &failed[0];
    let rcpts = f["recipients"].as_array().unwrap();
    assert_eq!(rcpts.len(), 3, "{f}");
    for (i, r) in rcpts.iter().enumerate() {
        assert_eq!(
            r["Final-Recipient"],
            format!("rfc822; bad{}@x.test", i + 1),
            "{f}"
        );
        assert_eq!(r["Status"], "5.1.1", "{f}");
        assert_eq!(r["Remote-MTA"], "dns; 127.0.0.1", "{f}");
        assert!(
            r["Diagnostic-Code"]
                .as_str()
                .unwrap()
                .starts_with("smtp; 550 5.1.1 no such user here"),
            "{f}"
        );
        assert!(r["Last-Attempt-Date"].is_string(), "{f}");
    }
    assert_eq!(rcpts[1]["Original-Recipient"], "rfc822;Bad2@x.test", "{f}");
    assert_eq!(f["per_message"]["Original-Envelope-Id"], "env+1", "{f}");
    assert_eq!(f["parts"][2], "text/rfc822-headers", "{f}");
    assert_eq!(f["returned_subject"], "three fail", "{f}");
    assert!(!f.to_string().contains("secret body"), "RET=HDRS: {f}");

    let relayed = by_action("relayed");
    assert_eq!(relayed.len(), 1, "{reports:?}");
    assert_eq!(relayed[0]["recipients"].as_array().unwrap().len(), 1);
    assert_eq!(
        relayed[0]["recipients"][0]["Final-Recipient"],
        "rfc822; ok@x.test"
    );
    assert_eq!(relayed[0]["recipients"][0]["Status"], "2.0.0");

    let delayed = by_action("delayed");
    assert_eq!(delayed.len(), 1, "{reports:?}");
    let d = &delayed[0];
    assert_eq!(
        d["recipients"][0]["Final-Recipient"],
        "rfc822; tempfail@delay.test"
    );
    assert_eq!(d["recipients"][0]["Status"], "4.7.1", "{d}");
    assert!(d["recipients"][0]["Will-Retry-Until"].is_string(), "{d}");
    assert_eq!(d["parts"][2], "message/rfc822", "{d}");
    assert_eq!(d["returned_subject"], "slow", "{d}");
    assert!(
        d["returned_body"].as_str().unwrap().contains("slow body"),
        "{d}"
    );

    // Every bounce has its b row, the reports their own r and d rows.
    let rows = acct(&c);
    for a in ["bad1@x.test", "bad2@x.test", "bad4@x.test", "bad5@x.test"] {
        assert!(
            rows.iter().any(|r| r[0] == "b" && r[2] == a),
            "{a}: {rows:?}"
        );
    }
    assert_eq!(
        rows.iter()
            .filter(|r| r[0] == "r" && r[1].is_empty() && r[2] == "sender@senders.test")
            .count(),
        3,
        "{rows:?}"
    );

    // The receiver that offers DSN got RET, ENVID, NOTIFY and ORCPT as sent.
    let hop = saved_files(&dsn_saved);
    assert_eq!(hop.len(), 1, "{hop:?}");
    let text = std::fs::read_to_string(&hop[0]).unwrap();
    assert!(text.contains("RET=FULL ENVID=e5\r\n"), "{text}");
    assert!(
        text.contains(
            "X-Sink-Rcpt-Params: u@dsn.test NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;U@dsn.test"
        ),
        "{text}"
    );
}
