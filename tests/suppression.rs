//! The replicated suppression list: a hard bounce the policy names suppresses the address,
//! ingress refuses it at RCPT (SMTP and HTTP), scoped entries bounce at enqueue with category
//! `suppressed`, every controller holds the same list, and `sluice suppress` adds, lifts,
//! lists, exports and imports.

use std::net::SocketAddr;
use std::time::Duration;

use crate::harness::*;

fn acct(c: &Cluster) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(c.path().join("controller-1/acct.csv")).unwrap_or_default();
    text.lines()
        .skip(1)
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

/// The reply to RCPT TO for `to`.
fn rcpt_reply(smtp: SocketAddr, to: &str) -> String {
    let mut s = SmtpClient::connect(smtp);
    s.reply();
    s.send("EHLO test.example.com");
    s.send("MAIL FROM:<s@senders.test>");
    let r = s.send(&format!("RCPT TO:<{to}>"));
    s.raw(b"QUIT\r\n");
    r
}

fn list(c: &Cluster) -> Vec<serde_json::Value> {
    let (ok, out, err) = c.cli(&["suppress", "list", "--json", "-c", &c.addrs[0]]);
    assert!(ok, "{err}");
    serde_json::from_str::<Vec<serde_json::Value>>(&out).unwrap()
}

fn policy(port: u16, extra: &str) -> String {
    format!(
        "suppress-on-bounce bad-mailbox,inactive-mailbox\n{extra}\
         <virtual-mta v1>\n smtp-source-host 127.0.0.1 v1.example.com\n</virtual-mta>\n\
         <domain *>\n route [127.0.0.1]:{port}\n retry-after 1h\n</domain>\n\
         <acct-file acct.csv>\n records d,b\n record-fields d type,rcpt,bounceCat,jobId\n\
         record-fields b type,rcpt,bounceCat,jobId\n</acct-file>\n\
         <source 127.0.0.1>\n always-allow-relaying yes\n default-virtual-mta v1\n\
         process-x-job yes\n</source>\nhttp-access 127.0.0.1 admin\n"
    )
}

#[test]
fn suppressed_addresses_are_refused_and_the_list_is_replicated() {
    let port = free_port();
    let mut c = Cluster::start(3, &policy(port, ""), "");
    c.start_sink_at(
        format!("127.0.0.1:{port}").parse().unwrap(),
        &["--reply", "gone@x.test=550 5.1.1 no such user"],
    );
    let (smtp, http) = c.start_ingress();
    c.start_worker("w1", &["127.0.0.1"], "");
    let at = c.addrs[0].clone();

    // A hard bounce of a category the policy names puts the address on the list.
    assert!(
        smtp_send(smtp, "s@senders.test", &["gone@x.test"], "Subject: a\n\nx").starts_with("250")
    );
    assert!(
        wait_until(Duration::from_secs(30), || list(&c).iter().any(
            |e| e["address"] == "gone@x.test" && e["reason"] == "bad-mailbox"
        )),
        "{:?} {:?}",
        list(&c),
        acct(&c)
    );
    let e = list(&c)
        .into_iter()
        .find(|e| e["address"] == "gone@x.test")
        .unwrap();
    assert!(e["source"].as_str().unwrap().starts_with("b "), "{e}");
    assert_eq!(e["scope"], "");
    // Ingress follows the list: RCPT is refused with the reason.
    let mut last = String::new();
    assert!(
        wait_until(Duration::from_secs(20), || {
            last = rcpt_reply(smtp, "gone@x.test");
            last.starts_with("550 5.7.1")
        }),
        "{last}"
    );
    assert!(last.contains("suppression list (bad-mailbox)"), "{last}");

    // Operators add addresses and whole domains.
    let (ok, out, err) = c.cli(&[
        "suppress",
        "add",
        "blocked@x.test",
        "@wholedomain.test",
        "--note",
        "ticket 7",
        "-c",
        &at,
    ]);
    assert!(ok && out.contains("2 suppressed"), "{out} {err}");
    assert!(wait_until(Duration::from_secs(20), || {
        rcpt_reply(smtp, "Blocked@X.test").starts_with("550 5.7.1")
            && rcpt_reply(smtp, "anyone@wholedomain.test").starts_with("550 5.7.1")
    }));
    assert!(rcpt_reply(smtp, "fine@x.test").starts_with("250"));
    // An entry with --for stops counting at its time (ingress and leader alike).
    let (ok, _, err) = c.cli(&["suppress", "add", "brief@x.test", "--for", "20s", "-c", &at]);
    assert!(ok, "{err}");
    let brief = || rcpt_reply(smtp, "brief@x.test");
    assert!(wait_until(Duration::from_secs(20), || brief().starts_with("550 5.7.1")));
    assert!(wait_until(Duration::from_secs(60), || brief().starts_with("250")));
    let (ok, _, err) = c.cli(&["suppress", "remove", "brief@x.test", "-c", &at]);
    assert!(ok, "{err}");
    // HTTP injection reports it per recipient.
    let body = r#"{"envelope_sender":"api@senders.test","recipients":["blocked@x.test","fine@x.test"],
        "message":{"headers":[["Subject","Hi"]],"text":"plain"}}"#;
    let (ok, out, err) = tool(
        "curl",
        &[
            "-s",
            "-H",
            "content-type: application/json",
            "-d",
            body,
            &format!("http://{http}/api/inject/v1"),
        ],
    );
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["recipients"][0]["accepted"], false, "{v}");
    assert!(
        v["recipients"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("550 5.7.1"),
        "{v}"
    );
    assert_eq!(v["recipients"][1]["accepted"], true, "{v}");

    // A scoped entry: accepted at RCPT, bounced at enqueue for that job only.
    let (ok, _, err) = c.cli(&[
        "suppress",
        "add",
        "scoped@x.test",
        "--scope",
        "job:j1",
        "-c",
        &at,
    ]);
    assert!(ok, "{err}");
    for job in ["j1", "j2"] {
        let r = smtp_send(
            smtp,
            "s@senders.test",
            &["scoped@x.test"],
            &format!("X-Job: {job}\nSubject: scoped\n\nx"),
        );
        assert!(r.starts_with("250"), "{r}");
    }
    assert!(
        wait_until(Duration::from_secs(30), || {
            let rows = acct(&c);
            rows.iter().any(|r| {
                r[0] == "b" && r[1] == "scoped@x.test" && r[2] == "suppressed" && r[3] == "j1"
            }) && rows
                .iter()
                .any(|r| r[0] == "d" && r[1] == "scoped@x.test" && r[3] == "j2")
        }),
        "{:?}",
        acct(&c)
    );

    // Every controller holds the same list.
    let per_node: Vec<String> = (0..3)
        .map(|i| {
            let (ok, out, err) = c.cli(&["suppress", "export", "-c", &c.addrs[i]]);
            assert!(ok, "{err}");
            out
        })
        .collect();
    assert!(per_node.iter().all(|o| *o == per_node[0]), "{per_node:?}");
    assert_eq!(per_node[0].lines().count(), 5, "{}", per_node[0]);

    // Export, lift everything, import: the same list again.
    let csv = c.path().join("suppressed.csv");
    let (ok, _, err) = c.cli(&["suppress", "export", csv.to_str().unwrap(), "-c", &at]);
    assert!(ok, "{err}");
    let before = list(&c);
    let (ok, out, err) = c.cli(&[
        "suppress",
        "remove",
        "gone@x.test",
        "blocked@x.test",
        "@wholedomain.test",
        "-c",
        &at,
    ]);
    assert!(ok && out.contains("3 lifted"), "{out} {err}");
    let (ok, _, err) = c.cli(&[
        "suppress",
        "remove",
        "scoped@x.test",
        "--scope",
        "job:j1",
        "-c",
        &at,
    ]);
    assert!(ok, "{err}");
    assert!(list(&c).is_empty());
    assert!(wait_until(Duration::from_secs(20), || rcpt_reply(
        smtp,
        "blocked@x.test"
    )
    .starts_with("250")));
    let (ok, out, err) = c.cli(&["suppress", "import", csv.to_str().unwrap(), "-c", &at]);
    assert!(ok && out.contains("4 imported"), "{out} {err}");
    assert_eq!(list(&c), before);

    // Bad input gets a clear error.
    let (ok, _, err) = c.cli(&["suppress", "add", "not-an-address", "-c", &at]);
    assert!(!ok && err.contains("is not an address"), "{err}");
    let (ok, _, err) = c.cli(&[
        "suppress", "add", "a@x.test", "--scope", "team:x", "-c", &at,
    ]);
    assert!(!ok && err.contains("expected vmta:NAME"), "{err}");
    std::fs::write(
        c.path().join("bad.csv"),
        "address\nok@x.test,,,,not-a-time\n",
    )
    .unwrap();
    let (ok, _, err) = c.cli(&[
        "suppress",
        "import",
        c.path().join("bad.csv").to_str().unwrap(),
        "-c",
        &at,
    ]);
    assert!(!ok && err.contains("bad.csv:2"), "{err}");

    // `suppressed-recipients bounce`: accepted at RCPT, bounced with category `suppressed`.
    std::fs::write(
        c.path().join("policy.conf"),
        policy(port, "suppressed-recipients bounce\n"),
    )
    .unwrap();
    let (ok, out, err) = c.cli(&["reload", "-c", &at]);
    assert!(ok, "{out} {err}");
    assert!(
        wait_until(Duration::from_secs(20), || rcpt_reply(
            smtp,
            "blocked@x.test"
        )
        .starts_with("250")),
        "the ingress node did not take the new policy"
    );
    assert!(
        smtp_send(
            smtp,
            "s@senders.test",
            &["blocked@x.test"],
            "Subject: b\n\nx"
        )
        .starts_with("250")
    );
    assert!(
        wait_until(Duration::from_secs(30), || acct(&c)
            .iter()
            .any(|r| r[0] == "b"
                && r[1] == "blocked@x.test"
                && r[2] == "suppressed")),
        "{:?}",
        acct(&c)
    );
}
