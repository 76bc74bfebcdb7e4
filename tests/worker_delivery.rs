//! Workers delivering from pinned source IPs, all on loopback: MX resolution against dnsmasq,
//! source IPs, STARTTLS, DKIM (RSA and Ed25519) checked with python3-dkim, reply handling,
//! connection reuse and a worker killed mid-delivery.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::*;

struct Dns(std::process::Child);

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// dnsmasq on a free loopback port, authoritative for `.test` and `example.com`.
fn start_dns(dir: &Path, records: &[String]) -> (Dns, u16) {
    let port = free_port();
    let mut args = vec![
        "--no-daemon".to_string(),
        "--conf-file=/dev/null".into(),
        "--no-resolv".into(),
        "--no-hosts".into(),
        "--bind-interfaces".into(),
        "--listen-address=127.0.0.1".into(),
        format!("--port={port}"),
        "--local=/test/".into(),
        "--local=/example.com/".into(),
        format!(
            "--pid-file={}",
            dir.join(format!("dnsmasq-{port}.pid")).display()
        ),
    ];
    args.extend(records.iter().cloned());
    let child = Command::new("dnsmasq")
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dnsmasq (tests/run.sh installs it)");
    assert!(
        wait_until(Duration::from_secs(10), || dns_answers(port)),
        "dnsmasq did not answer on port {port}"
    );
    (Dns(child), port)
}

fn txt_record(name: &str, txt: &str) -> String {
    let chunks: Vec<String> = txt
        .as_bytes()
        .chunks(250)
        .map(|c| String::from_utf8_lossy(c).to_string())
        .collect();
    format!("--txt-record={name},{}", chunks.join(","))
}

fn acct(c: &Cluster) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(c.path().join("controller-1/acct.csv")).unwrap_or_default();
    text.lines()
        .skip(1)
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

fn saved(dir: &Path) -> Vec<String> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v.iter()
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .collect()
}

/// A CA (its certificate written to `ca.pem`) and a certificate it signed for `names` (DNS
/// names or IP addresses): returns (ca file, certificate file, key file).
fn test_ca(dir: &Path, names: &[&str]) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Sluice test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let leaf = rcgen::CertificateParams::new(names)
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let files = (dir.join("ca.pem"), dir.join("mx.pem"), dir.join("mx.key"));
    std::fs::write(&files.0, ca.pem()).unwrap();
    std::fs::write(&files.1, leaf.pem()).unwrap();
    std::fs::write(&files.2, key.serialize_pem()).unwrap();
    files
}

const ACCT: &str = "<acct-file acct.csv>\n  records d,b,t\n</acct-file>\n<source 127.0.0.1>\n  always-allow-relaying yes\n  process-x-virtual-mta yes\n  default-virtual-mta v1\n</source>\n";

#[test]
fn mx_order_fallback_implicit_null_and_nxdomain() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let (_dns, dns_port) = start_dns(
        dir.path(),
        &[
            "--mx-host=pref.test,mx1.pref.test,10".into(),
            "--mx-host=pref.test,mx2.pref.test,20".into(),
            "--host-record=mx1.pref.test,127.0.0.21".into(),
            "--host-record=mx2.pref.test,127.0.0.22".into(),
            "--host-record=implicit.test,127.0.0.22".into(),
            "--mx-host=nullmx.test,.,0".into(),
            // Domains that exist (a TXT record) with neither MX nor address.
            "--txt-record=noaddr.test,exists".into(),
            "--txt-record=keep.test,exists".into(),
        ],
    );
    let policy = format!(
        "<virtual-mta v1>\n smtp-source-host 127.0.0.1 v1.example.com\n</virtual-mta>\n<domain *>\n retry-after 1h\n bounce-upon-no-mx yes\n</domain>\n<domain keep.test>\n bounce-upon-no-mx no\n</domain>\n{ACCT}"
    );
    let mut c = Cluster::start(1, &policy, "");
    // mx1 (preference 10) has no listener: the worker falls back to mx2.
    let (_, stats, saved_dir) = c.start_sink_at(format!("127.0.0.22:{port}").parse().unwrap(), &[]);
    c.start_worker(
        "w1",
        &["127.0.0.1"],
        &format!("dns_servers = [\"127.0.0.1:{dns_port}\"]\nsmtp_port = {port}\n"),
    );
    let (smtp, _) = c.start_ingress();
    for to in [
        "a@pref.test",
        "b@implicit.test",
        "c@nullmx.test",
        "d@nx.test",
        "e@noaddr.test",
        "f@keep.test",
    ] {
        let r = smtp_send(smtp, "s@example.com", &[to], "Subject: mx\n\nbody");
        assert!(r.starts_with("250"), "{to}: {r}");
    }
    let ok = wait_until(Duration::from_secs(30), || acct(&c).len() >= 6);
    if !ok {
        c.dump_logs();
    }
    assert!(ok, "not every recipient has an outcome: {:?}", acct(&c));
    let rows = acct(&c);
    let row = |rcpt: &str| rows.iter().find(|r| r[4] == rcpt).cloned().unwrap();
    assert_eq!(row("a@pref.test")[0], "d");
    assert_eq!(
        row("a@pref.test")[15],
        "127.0.0.22",
        "delivered to the second MX"
    );
    assert_eq!(
        row("b@implicit.test")[0],
        "d",
        "implicit MX from the A record"
    );
    assert_eq!(row("c@nullmx.test")[0], "b", "null MX bounces at once");
    assert!(
        row("c@nullmx.test")[8].contains("556"),
        "{:?}",
        row("c@nullmx.test")
    );
    assert_eq!(row("d@nx.test")[0], "b", "NXDOMAIN bounces");
    assert_eq!(row("d@nx.test")[10], "bad-domain");
    // No MX and no address: bounced under bounce-upon-no-mx, retried without it.
    assert_eq!(row("e@noaddr.test")[0], "b", "{:?}", row("e@noaddr.test"));
    assert_eq!(row("f@keep.test")[0], "t", "{:?}", row("f@keep.test"));
    // The sink's stats file is written once a second: wait for it to count both.
    assert!(
        wait_until(Duration::from_secs(10), || sink_stats(&stats)["messages"]
            == 2),
        "{}",
        sink_stats(&stats)
    );
    assert_eq!(saved(&saved_dir).len(), 2);
    // `sluice explain --dns` shows the hosts in the order the worker tried them.
    let (ok, out, err) = c.cli(&[
        "explain",
        "a@pref.test",
        "--source",
        "127.0.0.1",
        "--dns",
        &format!("127.0.0.1:{dns_port}"),
        "--json",
        "-c",
        &c.addrs[0],
    ]);
    assert!(ok, "{err}");
    let e: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(e["mx_domain"], "pref.test", "{e}");
    assert_eq!(e["mx"][0]["host"], "mx1.pref.test", "{e}");
    assert_eq!(e["mx"][0]["addresses"][0], "127.0.0.21", "{e}");
    assert_eq!(e["mx"][1]["host"], "mx2.pref.test", "{e}");
}

#[test]
fn source_ips_tls_and_dkim() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // An RSA and an Ed25519 key, with their public halves in DNS.
    let rsa = d.join("rsa.pem");
    let ed = d.join("ed.pem");
    assert!(
        tool(
            "openssl",
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                rsa.to_str().unwrap()
            ]
        )
        .0
    );
    // The RSA key in PKCS#1 form ("BEGIN RSA PRIVATE KEY"), as older DKIM tooling writes it;
    // the worker's unit tests cover PKCS#8.
    let rsa_pkcs8 = rsa.to_str().unwrap().to_string();
    let rsa = d.join("rsa1.pem");
    assert!(
        tool(
            "openssl",
            &[
                "rsa",
                "-in",
                &rsa_pkcs8,
                "-traditional",
                "-out",
                rsa.to_str().unwrap()
            ]
        )
        .0
    );
    assert!(
        std::fs::read_to_string(&rsa)
            .unwrap()
            .contains("BEGIN RSA PRIVATE KEY")
    );
    assert!(
        tool(
            "openssl",
            &[
                "genpkey",
                "-algorithm",
                "ed25519",
                "-out",
                ed.to_str().unwrap()
            ]
        )
        .0
    );
    let pub_b64 = |key: &Path, raw_ed: bool| -> String {
        let der = Command::new("openssl")
            .args([
                "pkey",
                "-in",
                key.to_str().unwrap(),
                "-pubout",
                "-outform",
                "DER",
            ])
            .output()
            .unwrap()
            .stdout;
        let bytes = if raw_ed {
            der[der.len() - 32..].to_vec()
        } else {
            der
        };
        let out = Command::new("base64")
            .arg("-w0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        out.stdin.as_ref().unwrap().write_all(&bytes).unwrap();
        String::from_utf8(out.wait_with_output().unwrap().stdout).unwrap()
    };
    let rsa_txt = format!("v=DKIM1; k=rsa; p={}", pub_b64(&rsa, false));
    let ed_txt = format!("v=DKIM1; k=ed25519; p={}", pub_b64(&ed, true));
    let (_dns, dns_port) = start_dns(
        d,
        &[
            txt_record("rsa._domainkey.rsa.example.com", &rsa_txt),
            txt_record("ed._domainkey.ed.example.com", &ed_txt),
        ],
    );
    let policy = format!(
        "domain-key rsa,rsa.example.com,{}\n\
         <virtual-mta v11>\n smtp-source-host 127.0.0.11 v11.example.com\n domain-key ed,ed.example.com,{}\n</virtual-mta>\n\
         <virtual-mta v12>\n smtp-source-host 127.0.0.12 v12.example.com\n</virtual-mta>\n\
         <domain *>\n route [127.0.0.1]:{port}\n dkim-sign yes\n retry-after 1h\n</domain>\n\
         <domain tls.test>\n route [127.0.0.31]:{port}\n require-starttls yes\n</domain>\n\
         <domain ident.test>\n route [127.0.0.1]:{port}\n dkim-identity @rsa.example.com\n</domain>\n\
         <domain cleartext.test>\n route [127.0.0.32]:{port}\n require-starttls yes\n</domain>\n\
         <virtual-mta v1>\n smtp-source-host 127.0.0.11 v1.example.com\n</virtual-mta>\n{ACCT}",
        rsa.display(),
        ed.display()
    );
    let mut c = Cluster::start(1, &policy, "");
    let (_, _, plain_dir) =
        c.start_sink_at(format!("127.0.0.1:{port}").parse().unwrap(), &["--tls"]);
    // Required TLS checks the certificate: the fixed route's IP is in it, signed by a CA the
    // worker trusts.
    let (ca_file, cert_file, key_file) = test_ca(d, &["127.0.0.31"]);
    let (_, _, tls_dir) = c.start_sink_at(
        format!("127.0.0.31:{port}").parse().unwrap(),
        &[
            "--tls",
            "--tls-cert",
            cert_file.to_str().unwrap(),
            "--tls-key",
            key_file.to_str().unwrap(),
        ],
    );
    let (_, clear_stats, clear_dir) =
        c.start_sink_at(format!("127.0.0.32:{port}").parse().unwrap(), &[]);
    c.start_worker_env(
        "w1",
        &["127.0.0.11", "127.0.0.12"],
        "",
        &[("SSL_CERT_FILE", ca_file.to_str().unwrap())],
    );
    let (smtp, _) = c.start_ingress();
    let send = |vmta: &str, from: &str, to: &str| {
        let r = smtp_send(
            smtp,
            from,
            &[to],
            &format!(
                "From: <{from}>\nTo: <{to}>\nSubject: via {vmta}\nX-Virtual-MTA: {vmta}\n\nhello from {vmta}"
            ),
        );
        assert!(r.starts_with("250"), "{r}");
    };
    send("v11", "a@ed.example.com", "x@one.test");
    send("v12", "b@rsa.example.com", "y@one.test");
    send("v11", "c@rsa.example.com", "z@tls.test");
    send("v12", "d@rsa.example.com", "w@cleartext.test");
    // dkim-identity: a From domain with no key of its own is signed for the identity's.
    let r = smtp_send(
        smtp,
        "e@nokey.example.com",
        &["i@ident.test"],
        "From: <e@nokey.example.com>\nSubject: identity\nX-Virtual-MTA: v12\n\nsigned for another domain",
    );
    assert!(r.starts_with("250"), "{r}");
    let ok = wait_until(Duration::from_secs(30), || acct(&c).len() >= 5);
    if !ok {
        c.dump_logs();
    }
    assert!(ok, "{:?}", acct(&c));
    let msgs = saved(&plain_dir);
    assert_eq!(msgs.len(), 3);
    let ident = msgs
        .iter()
        .find(|m| m.contains("Subject: identity"))
        .unwrap();
    assert!(ident.contains("d=rsa.example.com"), "{ident}");
    let by_subject = |s: &str| msgs.iter().find(|m| m.contains(s)).cloned().unwrap();
    assert!(
        by_subject("Subject: via v11").contains("X-Sink-Peer: 127.0.0.11"),
        "v11 sends from 127.0.0.11"
    );
    assert!(
        by_subject("Subject: via v12").contains("X-Sink-Peer: 127.0.0.12"),
        "v12 sends from 127.0.0.12"
    );
    assert!(
        by_subject("Subject: via v12").contains("X-Sink-TLS: TLS"),
        "opportunistic STARTTLS"
    );
    // Both signatures verify with python3-dkim against the keys in DNS.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/dkim_verify.py");
    for (i, m) in msgs.iter().enumerate() {
        let f = d.join(format!("msg{i}.eml"));
        std::fs::write(&f, m).unwrap();
        let (ok, out, err) = tool(
            "/usr/bin/python3",
            &[
                script.to_str().unwrap(),
                &dns_port.to_string(),
                f.to_str().unwrap(),
            ],
        );
        assert!(ok, "message {i} does not verify: {out}{err}\n{m}");
    }
    assert!(
        by_subject("Subject: via v11").contains("a=ed25519-sha256"),
        "the VMTA's Ed25519 key signs ed.example.com"
    );
    assert!(by_subject("Subject: via v12").contains("a=rsa-sha256"));
    // Required TLS: delivered over TLS where offered, never in clear where not.
    assert_eq!(saved(&tls_dir).len(), 1);
    assert!(saved(&tls_dir)[0].contains("X-Sink-TLS: TLS"));
    // The saved messages are written before the sink answers: none means none was accepted.
    assert!(
        saved(&clear_dir).is_empty(),
        "sent in clear to a require-starttls destination"
    );
    let _ = clear_stats;
    let rows = acct(&c);
    let clear = rows.iter().find(|r| r[4] == "w@cleartext.test").unwrap();
    assert_eq!(clear[0], "t");
    assert!(
        clear[8].contains("4.7.5") || clear[7].contains("4.7.5"),
        "{clear:?}"
    );
}

#[test]
fn replies_patterns_and_connection_reuse() {
    let port = free_port();
    let policy = format!(
        "<virtual-mta v1>\n smtp-source-host 127.0.0.1 v1.example.com\n</virtual-mta>\n\
         <smtp-pattern-list pl>\n reply /rate limit exceeded/ mode=backoff\n</smtp-pattern-list>\n\
         <domain *>\n route [127.0.0.1]:{port}\n retry-after 1h\n max-msg-per-connection 3\n smtp-pattern-list pl\n</domain>\n{ACCT}"
    );
    let mut c = Cluster::start(1, &policy, "");
    let (_, stats, _) = c.start_sink_at(
        format!("127.0.0.1:{port}").parse().unwrap(),
        &[
            "--reply",
            "r421@codes.test=421 4.7.0 rate limit exceeded, try later",
            "--reply",
            "r450@codes.test=450 4.2.1 mailbox busy",
            "--reply",
            "r550@codes.test=550 5.1.1 no such user",
            "--reply",
            "r552@codes.test=552 5.2.2 mailbox full",
        ],
    );
    let (smtp, _) = c.start_ingress();
    for n in 0..10 {
        let r = smtp_send(
            smtp,
            "s@example.com",
            &[&format!("u{n}@reuse.test")],
            "Subject: reuse\n\nbody",
        );
        assert!(r.starts_with("250"));
    }
    let r = smtp_send(
        smtp,
        "s@example.com",
        &[
            "r421@codes.test",
            "r450@codes.test",
            "r550@codes.test",
            "r552@codes.test",
        ],
        "Subject: codes\n\nbody",
    );
    assert!(r.starts_with("250"));
    // The harness's port probe is a connection too: count from here.
    let before = sink_stats(&stats)["connections"].as_u64().unwrap_or(1);
    // The worker starts with everything queued: 10 messages at 3 per connection.
    c.start_worker("w1", &["127.0.0.1"], "");
    let ok = wait_until(Duration::from_secs(30), || acct(&c).len() >= 14);
    if !ok {
        c.dump_logs();
    }
    assert!(ok, "{:?}", acct(&c));
    // The sink writes its records once a second.
    let reuse_count = || {
        sink_stats(&stats)["queues"]["127.0.0.1 reuse.test"]["timestamps_ms"]
            .as_array()
            .map(|a| a.len())
            .unwrap_or(0)
    };
    // One snapshot of the stats that shows both queues' connections.
    let mut st = serde_json::json!({});
    assert!(
        wait_until(Duration::from_secs(10), || {
            st = sink_stats(&stats);
            reuse_count() == 10 && st["connections"].as_u64().unwrap_or(0) >= before + 5
        }),
        "{}",
        sink_stats(&stats)
    );
    let rows = acct(&c);
    let row = |r: &str| rows.iter().find(|x| x[4] == r).cloned().unwrap();
    assert_eq!(row("r421@codes.test")[0], "t");
    assert_eq!(row("r450@codes.test")[0], "t");
    assert_eq!(row("r550@codes.test")[0], "b");
    assert_eq!(row("r550@codes.test")[10], "bad-mailbox");
    assert_eq!(row("r552@codes.test")[0], "b");
    assert_eq!(row("r552@codes.test")[10], "quota-issues");
    // The pattern list put the queue in backoff mode.
    let q = c.queues();
    let codes = q
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == "codes.test")
        .cloned()
        .unwrap();
    assert_eq!(codes["mode"], "backoff", "{codes}");
    // ceil(10 / 3) = 4 connections for reuse.test, plus one for codes.test.
    assert_eq!(st["connections"].as_u64().unwrap() - before, 5, "{st}");
}

#[test]
fn a_killed_worker_s_lease_expires_and_another_delivers() {
    let port = free_port();
    let policy = format!(
        "<virtual-mta v1>\n smtp-source-host 127.0.0.1 v1.example.com\n</virtual-mta>\n<domain *>\n route [127.0.0.1]:{port}\n retry-after 1h\n</domain>\n{ACCT}"
    );
    let mut c = Cluster::start(1, &policy, "[scheduler]\nlease_ttl_ms = 2000\n");
    // A slow receiver: the first worker dies while it waits for the end-of-data reply.
    let (_, stats, _) = c.start_sink_at(
        format!("127.0.0.1:{port}").parse().unwrap(),
        &["--latency-ms", "3000"],
    );
    let (smtp, _) = c.start_ingress();
    assert!(
        smtp_send(
            smtp,
            "s@example.com",
            &["slow@slow.test"],
            "Subject: slow\n\nbody"
        )
        .starts_with("250")
    );
    let first = c.start_worker("w1", &["127.0.0.1"], "");
    // The first worker is past RCPT (the sink counts the queue), waiting for the reply.
    assert!(wait_until(Duration::from_secs(30), || {
        !sink_stats(&stats)["queues"]["127.0.0.1 slow.test"].is_null()
    }));
    c.others[first].kill9();
    c.start_worker("w2", &["127.0.0.1"], "");
    let ok = wait_until(Duration::from_secs(30), || {
        acct(&c).iter().any(|r| r[0] == "d")
    });
    if !ok {
        c.dump_logs();
    }
    assert!(ok, "the message was not delivered after the lease expired");
    // At least once: the sink may have it twice (the first worker may have finished sending).
    assert!(wait_until(Duration::from_secs(10), || {
        sink_stats(&stats)["messages"].as_u64().unwrap_or(0) >= 1
    }));
}

#[test]
fn bounce_queue_and_defer_queue_patterns_act_on_the_whole_queue() {
    let port = free_port();
    let policy = format!(
        "<virtual-mta v1>\n smtp-source-host 127.0.0.1 v1.example.com\n</virtual-mta>\n\
         <smtp-pattern-list pl>\n reply /bouncethequeue/ bounce-queue\n reply /deferthequeue/ defer-queue\n</smtp-pattern-list>\n\
         <domain *>\n route [127.0.0.1]:{port}\n retry-after 1h\n max-smtp-out 1\n max-msg-per-connection 1\n smtp-pattern-list pl\n</domain>\n{ACCT}"
    );
    let mut c = Cluster::start(1, &policy, "");
    let mut replies = Vec::new();
    for n in 0..3 {
        replies.push(format!(
            "b{n}@bq.test=450 4.2.1 mailbox busy, bouncethequeue"
        ));
        replies.push(format!("d{n}@dq.test=451 4.3.0 deferthequeue"));
    }
    let mut args: Vec<&str> = Vec::new();
    for r in &replies {
        args.push("--reply");
        args.push(r);
    }
    let (_, stats, _) = c.start_sink_at(format!("127.0.0.1:{port}").parse().unwrap(), &args);
    let (smtp, _) = c.start_ingress();
    for n in 0..3 {
        assert!(
            smtp_send(
                smtp,
                "s@example.com",
                &[&format!("b{n}@bq.test")],
                "Subject: bq\n\nbody"
            )
            .starts_with("250")
        );
        assert!(
            smtp_send(
                smtp,
                "s@example.com",
                &[&format!("d{n}@dq.test")],
                "Subject: dq\n\nbody"
            )
            .starts_with("250")
        );
    }
    let before = sink_stats(&stats)["temp_failures"].as_u64().unwrap_or(0);
    c.start_worker("w1", &["127.0.0.1"], "");
    // bounce-queue: the first refusal bounces every recipient of bq.test.
    let ok = wait_until(Duration::from_secs(20), || {
        acct(&c)
            .iter()
            .filter(|r| r[0] == "b" && r[4].ends_with("@bq.test"))
            .count()
            == 3
    });
    if !ok {
        c.dump_logs();
    }
    assert!(ok, "{:?}", acct(&c));
    // defer-queue: one attempt, then the whole queue waits for its retry time.
    let dq_t = || {
        acct(&c)
            .iter()
            .filter(|r| r[0] == "t" && r[4].ends_with("@dq.test"))
            .count()
    };
    assert!(
        wait_until(Duration::from_secs(20), || dq_t() >= 1),
        "{:?}",
        acct(&c)
    );
    std::thread::sleep(Duration::from_secs(2));
    let rows = acct(&c);
    assert_eq!(
        rows.iter()
            .filter(|r| r[0] == "t" && r[4].ends_with("@dq.test"))
            .count(),
        1,
        "{rows:?}"
    );
    assert!(wait_until(
        Duration::from_secs(10),
        || sink_stats(&stats)["temp_failures"].as_u64().unwrap_or(0) - before == 2
    ));
    let q = c.queues();
    let dq = q
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == "dq.test")
        .cloned()
        .unwrap();
    assert_eq!(dq["recipients"], 3, "{dq}");
}

#[test]
fn a_421_greeting_moves_to_the_next_mx_when_configured() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let (_dns, dns_port) = start_dns(
        dir.path(),
        &[
            "--mx-host=busy.test,mx1.busy.test,10".into(),
            "--mx-host=busy.test,mx2.busy.test,20".into(),
            "--host-record=mx1.busy.test,127.0.0.41".into(),
            "--host-record=mx2.busy.test,127.0.0.42".into(),
        ],
    );
    let policy = format!(
        "<virtual-mta v1>\n smtp-source-host 127.0.0.1 v1.example.com\n</virtual-mta>\n<domain *>\n retry-after 1h\n smtp-421-means-mx-unavailable yes\n</domain>\n{ACCT}"
    );
    let mut c = Cluster::start(1, &policy, "");
    let (_, busy, _) = c.start_sink_at(
        format!("127.0.0.41:{port}").parse().unwrap(),
        &["--greeting", "421 4.3.2 too busy, come back later"],
    );
    let (_, good, _) = c.start_sink_at(format!("127.0.0.42:{port}").parse().unwrap(), &[]);
    c.start_worker(
        "w1",
        &["127.0.0.1"],
        &format!("dns_servers = [\"127.0.0.1:{dns_port}\"]\nsmtp_port = {port}\n"),
    );
    let (smtp, _) = c.start_ingress();
    assert!(
        smtp_send(
            smtp,
            "s@example.com",
            &["a@busy.test"],
            "Subject: busy\n\nbody"
        )
        .starts_with("250")
    );
    let ok = wait_until(Duration::from_secs(20), || {
        acct(&c).iter().any(|r| r[0] == "d")
    });
    if !ok {
        c.dump_logs();
    }
    assert!(ok, "{:?}", acct(&c));
    assert_eq!(
        acct(&c).iter().find(|r| r[0] == "d").unwrap()[15],
        "127.0.0.42"
    );
    assert!(wait_until(
        Duration::from_secs(5),
        || sink_stats(&good)["messages"] == 1
    ));
    assert_eq!(sink_stats(&busy)["messages"], 0);
}

#[test]
fn a_stopping_worker_finishes_the_lease_in_flight() {
    let port = free_port();
    let policy = format!(
        "<virtual-mta v1>\n smtp-source-host 127.0.0.1 v1.example.com\n</virtual-mta>\n<domain *>\n route [127.0.0.1]:{port}\n retry-after 1h\n</domain>\n{ACCT}"
    );
    let mut c = Cluster::start(1, &policy, "");
    let (_, stats, _) = c.start_sink_at(
        format!("127.0.0.1:{port}").parse().unwrap(),
        &["--latency-ms", "2000"],
    );
    let (smtp, _) = c.start_ingress();
    assert!(
        smtp_send(
            smtp,
            "s@example.com",
            &["slow@graceful.test"],
            "Subject: g\n\nbody"
        )
        .starts_with("250")
    );
    let w = c.start_worker("w1", &["127.0.0.1"], "");
    let before = 1; // the harness's port probe
    assert!(wait_until(
        Duration::from_secs(10),
        || sink_stats(&stats)["connections"].as_u64().unwrap_or(0) > before
    ));
    // SIGTERM while the sink holds the end-of-data reply: the worker finishes, reports, exits.
    let status = c.others[w].stop().expect("the worker exits");
    assert!(status.success(), "{status:?}");
    let rows = acct(&c);
    assert!(
        wait_until(Duration::from_secs(5), || acct(&c)
            .iter()
            .any(|r| r[0] == "d")),
        "{rows:?}"
    );
    assert_eq!(
        c.queues().as_array().map(|a| a.len()),
        Some(0),
        "nothing is left leased or queued"
    );
}

#[test]
fn each_time_limit_ends_its_own_step_and_only_the_final_dot_may_assume_delivery() {
    let slow = free_port();
    let stall = free_port();
    let slow_mail = free_port();
    let assume = "assume-delivery-upon-data-termination-timeout yes\n retry-after 1h\n";
    let policy = format!(
        "<virtual-mta v1>\n smtp-source-host 127.0.0.1 v1.example.com\n</virtual-mta>\n{ACCT}\
         <domain slow.test>\n route [127.0.0.1]:{slow}\n smtp-data-termination-timeout 1s\n {assume}</domain>\n\
         <domain patient.test>\n route [127.0.0.1]:{slow}\n data-send-timeout 1s\n smtp-command-timeout 1s\n {assume}</domain>\n\
         <domain stall.test>\n route [127.0.0.1]:{stall}\n data-send-timeout 1s\n {assume}</domain>\n\
         <domain slowmail.test>\n route [127.0.0.1]:{slow_mail}\n smtp-command-timeout 1s\n {assume}</domain>\n"
    );
    let mut c = Cluster::start(1, &policy, "");
    // One receiver answers the final dot after 3 s, one stops reading the content, one answers
    // MAIL after 3 s.
    c.start_sink_at(
        format!("127.0.0.1:{slow}").parse().unwrap(),
        &["--latency-ms", "3000"],
    );
    c.start_sink_at(
        format!("127.0.0.1:{stall}").parse().unwrap(),
        &["--stall-data"],
    );
    c.start_sink_at(
        format!("127.0.0.1:{slow_mail}").parse().unwrap(),
        &["--mail-latency-ms", "3000"],
    );
    let (smtp, _) = c.start_ingress();
    c.start_worker("w1", &["127.0.0.1"], "");
    for to in ["a@slow.test", "p@patient.test", "m@slowmail.test"] {
        let r = smtp_send(smtp, "s@example.com", &[to], "Subject: a\n\nsmall");
        assert!(r.starts_with("250"), "{r}");
    }
    // Far more than the socket buffers hold: the sender cannot finish.
    let big = format!("Subject: b\n\n{}", "0123456789abcdef\n".repeat(700_000));
    let r = smtp_send(smtp, "s@example.com", &["b@stall.test"], &big);
    assert!(r.starts_with("250"), "{r}");
    let all = [
        "a@slow.test",
        "p@patient.test",
        "m@slowmail.test",
        "b@stall.test",
    ];
    let ok = wait_until(Duration::from_secs(60), || {
        let rows = acct(&c);
        all.iter().all(|a| rows.iter().any(|r| r[4] == *a))
    });
    assert!(ok, "{:?}", acct(&c));
    let rows = acct(&c);
    let row = |rcpt: &str| rows.iter().find(|r| r[4] == rcpt).cloned().unwrap();
    let a = row("a@slow.test");
    assert_eq!(
        a[0], "d",
        "sent whole, no reply in time: assumed delivered {a:?}"
    );
    assert!(a.join(",").contains("assumed delivered"), "{a:?}");
    // The final dot has its own limit (10 minutes by default): neither the content's nor the
    // commands' 1 s cuts the 3 s wait short, and the receiver's own reply is recorded.
    let p = row("p@patient.test");
    assert_eq!(p[0], "d", "{p:?}");
    assert!(p.join(",").contains("accepted by the sink"), "{p:?}");
    let b = row("b@stall.test");
    assert_eq!(
        b[0], "t",
        "a timeout while sending is never a delivery: {b:?}"
    );
    let m = row("m@slowmail.test");
    assert_eq!(m[0], "t", "a timeout on a command is retried: {m:?}");
    assert!(m[8].contains("MAIL"), "{m:?}");
    // Both stay queued for their retry.
    let queued: Vec<String> = c
        .queues()
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["queue"].as_str().unwrap_or("").to_string())
        .collect();
    for d in ["stall.test", "slowmail.test"] {
        assert!(queued.iter().any(|q| q.starts_with(d)), "{d} in {queued:?}");
    }
}

#[test]
fn require_starttls_verifies_the_certificate_against_trusted_roots_and_the_mx_name() {
    let dir = tempfile::tempdir().unwrap();
    // A CA the worker trusts (through SSL_CERT_FILE), and a certificate for mx.secure.test.
    let (ca_file, cert_file, key_file) = test_ca(dir.path(), &["mx.secure.test"]);

    let port = free_port();
    let (_dns, dns_port) = start_dns(
        dir.path(),
        &[
            "--mx-host=secure.test,mx.secure.test,10".into(),
            "--mx-host=wrong.test,mx.wrong.test,10".into(),
            "--mx-host=open.test,mx.wrong.test,10".into(),
            "--host-record=mx.secure.test,127.0.0.1".into(),
            "--host-record=mx.wrong.test,127.0.0.1".into(),
        ],
    );
    let policy = format!(
        "<virtual-mta v1>\n smtp-source-host 127.0.0.1 v1.example.com\n</virtual-mta>\n\
         <domain *>\n retry-after 1h\n</domain>\n\
         <domain secure.test>\n require-starttls yes\n</domain>\n\
         <domain wrong.test>\n require-starttls yes\n</domain>\n\
         <domain open.test>\n use-starttls yes\n</domain>\n{ACCT}"
    );
    let mut c = Cluster::start(1, &policy, "");
    let (_, _, saved_dir) = c.start_sink_at(
        format!("127.0.0.1:{port}").parse().unwrap(),
        &[
            "--tls",
            "--tls-cert",
            cert_file.to_str().unwrap(),
            "--tls-key",
            key_file.to_str().unwrap(),
        ],
    );
    c.start_worker_env(
        "w1",
        &["127.0.0.1"],
        &format!("dns_servers = [\"127.0.0.1:{dns_port}\"]\nsmtp_port = {port}\n"),
        &[("SSL_CERT_FILE", ca_file.to_str().unwrap())],
    );
    let (smtp, _) = c.start_ingress();
    for to in ["a@secure.test", "b@wrong.test", "c@open.test"] {
        let r = smtp_send(smtp, "s@example.com", &[to], "Subject: tls\n\nbody");
        assert!(r.starts_with("250"), "{to}: {r}");
    }
    let ok = wait_until(Duration::from_secs(30), || acct(&c).len() >= 3);
    assert!(ok, "{:?}", acct(&c));
    let rows = acct(&c);
    let row = |rcpt: &str| rows.iter().find(|r| r[4] == rcpt).cloned().unwrap();
    // Verified: trusted chain and the MX name.
    assert_eq!(row("a@secure.test")[0], "d", "{:?}", row("a@secure.test"));
    // The same receiver under another MX name: not sent, retried later.
    let b = row("b@wrong.test");
    assert_eq!(b[0], "t", "{b:?}");
    assert!(b.join(",").contains("4.7.5"), "{b:?}");
    // Opportunistic TLS takes the certificate as it is (RFC 7435).
    assert_eq!(row("c@open.test")[0], "d");
    let saved = saved(&saved_dir);
    assert_eq!(saved.len(), 2);
    assert!(
        saved.iter().all(|m| m.contains("X-Sink-TLS: TLS")),
        "{saved:?}"
    );
}

#[test]
fn a_queue_that_cannot_connect_gets_a_tq_row() {
    let closed = free_port();
    let policy = format!(
        "<virtual-mta v1>\n smtp-source-host 127.0.0.1 v1.example.com\n</virtual-mta>\n\
         <domain *>\n route [127.0.0.1]:{closed}\n retry-after 1h\n</domain>\n\
         <acct-file acct.csv>\n  records t,tq\n</acct-file>\n\
         <source 127.0.0.1>\n  always-allow-relaying yes\n  default-virtual-mta v1\n</source>\n"
    );
    let mut c = Cluster::start(1, &policy, "");
    let (smtp, _) = c.start_ingress();
    c.start_worker("w1", &["127.0.0.1"], "");
    let r = smtp_send(
        smtp,
        "s@example.com",
        &["a@down.test", "b@down.test"],
        "Subject: q\n\nx",
    );
    assert!(r.starts_with("250"), "{r}");
    let ok = wait_until(Duration::from_secs(30), || {
        let rows = acct(&c);
        rows.iter().filter(|r| r[0] == "t").count() == 2 && rows.iter().any(|r| r[0] == "tq")
    });
    assert!(ok, "{:?}", acct(&c));
    let rows = acct(&c);
    let tq: Vec<_> = rows.iter().filter(|r| r[0] == "tq").collect();
    // One row for the queue, not one per recipient: no recipient, the queue and the reason.
    assert_eq!(tq.len(), 1, "{rows:?}");
    assert_eq!(tq[0][4], "", "{:?}", tq[0]);
    assert_eq!(tq[0][21], "down.test/v1", "{:?}", tq[0]);
    assert!(tq[0][8].contains("451"), "{:?}", tq[0]);
}

/// Connections accepted so far by the sink listening on `addr`.
fn connections_at(stats: &Path, addr: std::net::SocketAddr) -> u64 {
    sink_stats(stats)["listeners"][addr.to_string()]["connections"]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn delivery_directives_shape_what_the_receiver_sees() {
    let (pa, pb, pc, pd) = (free_port(), free_port(), free_port(), free_port());
    let dead = free_port();
    let policy = format!(
        "domain-macro mac m1.test,m2.test\n\
         <virtual-mta v1>\n smtp-source-host 127.0.0.1 v1.example.com\n\
          <domain override.test>\n  route [127.0.0.1]:{pc}\n </domain>\n</virtual-mta>\n\
         <virtual-mta v2>\n smtp-source-host 127.0.0.1\n host-name v2.host.test\n</virtual-mta>\n\
         <bounce-category-patterns>\n /gone for good/ inactive-mailbox\n</bounce-category-patterns>\n\
         <domain *>\n route [127.0.0.1]:{pa}\n retry-after 1h\n</domain>\n\
         <domain clear.test>\n route [127.0.0.1]:{pa}\n use-starttls no\n</domain>\n\
         <domain chunk.test>\n route [127.0.0.1]:{pa}\n max-rcpt-per-message 2\n</domain>\n\
         <domain errs.test>\n route [127.0.0.1]:{pb}\n max-errors-per-connection 2\n max-msg-per-connection 10\n</domain>\n\
         <domain hosts.test>\n smtp-hosts [127.0.0.1]:{pc}\n</domain>\n\
         <domain attempts1.test>\n smtp-hosts [127.0.0.1]:{dead},[127.0.0.1]:{pc}\n mx-connection-attempts 1\n</domain>\n\
         <domain attempts.test>\n smtp-hosts [127.0.0.1]:{dead},[127.0.0.1]:{pc}\n</domain>\n\
         <domain greet5.test>\n route [127.0.0.1]:{pd}\n bounce-upon-5xx-greeting yes\n</domain>\n\
         <domain greet5b.test>\n route [127.0.0.1]:{pd}\n</domain>\n\
         <domain $mac>\n route [127.0.0.1]:{pc}\n</domain>\n\
         <domain no8bit.test>\n route [127.0.0.1]:{pa}\n ignore-8bitmime yes\n</domain>\n{ACCT}"
    );
    let mut c = Cluster::start(1, &policy, "");
    let addr = |p: u16| -> std::net::SocketAddr { format!("127.0.0.1:{p}").parse().unwrap() };
    let (_, stats_a, saved_a) = c.start_sink_at(
        addr(pa),
        &[
            "--tls",
            "--reply",
            "gone@cat.test=550 5.0.0 mailbox gone for good",
        ],
    );
    let (_, stats_b, _) = c.start_sink_at(
        addr(pb),
        &["--reply", "bad@errs.test=550 5.1.1 no such user"],
    );
    let (_, _, saved_c) = c.start_sink_at(addr(pc), &[]);
    c.start_sink_at(addr(pd), &["--greeting", "554 5.7.1 go away"]);
    let (smtp, _) = c.start_ingress();
    c.start_worker("w1", &["127.0.0.1"], "");
    let send = |to: &[&str], body: &str| {
        let r = smtp_send(smtp, "s@example.com", to, body);
        assert!(r.starts_with("250"), "{to:?}: {r}");
    };
    send(&["a@clear.test"], "Subject: clear\n\nx");
    send(
        &[
            "1@chunk.test",
            "2@chunk.test",
            "3@chunk.test",
            "4@chunk.test",
            "5@chunk.test",
        ],
        "Subject: chunk\n\nx",
    );
    // Six refused messages, queued before the worker takes any: one lease for all six.
    let (ok, _, err) = c.cli(&["pause", "errs.test/*", "-c", &c.addrs[0]]);
    assert!(ok, "{err}");
    for _ in 0..6 {
        send(&["bad@errs.test"], "Subject: errs\n\nx");
    }
    let (ok, _, err) = c.cli(&["resume", "errs.test/*", "-c", &c.addrs[0]]);
    assert!(ok, "{err}");
    send(&["a@hosts.test"], "Subject: hosts\n\nx");
    send(&["a@attempts1.test"], "Subject: attempts1\n\nx");
    send(&["a@attempts.test"], "Subject: attempts\n\nx");
    send(&["a@greet5.test"], "Subject: greet5\n\nx");
    send(&["a@greet5b.test"], "Subject: greet5b\n\nx");
    send(&["gone@cat.test"], "Subject: cat\n\nx");
    send(&["a@override.test"], "Subject: override\n\nx");
    send(&["a@m1.test", "b@m2.test"], "Subject: macro\n\nx");
    send(&["a@eight.test"], "Subject: eight\n\ncaf\u{e9}");
    send(&["a@no8bit.test"], "Subject: no8bit\n\ncaf\u{e9}");
    send(&["a@v2.test"], "X-Virtual-MTA: v2\nSubject: v2\n\nx");
    let expected = 1 + 5 + 6 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 2 + 1 + 1 + 1;
    let ok = wait_until(Duration::from_secs(60), || acct(&c).len() >= expected);
    if !ok {
        c.dump_logs();
    }
    assert!(ok, "{} of {expected}: {:?}", acct(&c).len(), acct(&c));
    let rows = acct(&c);
    let kind = |rcpt: &str| -> String {
        rows.iter()
            .find(|r| r[4] == rcpt)
            .map(|r| r[0].clone())
            .unwrap_or_default()
    };
    let a = saved(&saved_a);
    let c_msgs = saved(&saved_c);
    let msg = |list: &[String], subject: &str| -> Vec<String> {
        list.iter()
            .filter(|m| m.contains(&format!("Subject: {subject}")))
            .cloned()
            .collect()
    };
    // use-starttls no: in clear to a receiver that offers TLS.
    assert!(msg(&a, "clear")[0].contains("X-Sink-TLS: none"));
    // max-rcpt-per-message 2: five recipients in three transactions.
    assert_eq!(msg(&a, "chunk").len(), 3);
    // max-errors-per-connection 2: six refused messages take three connections (and the
    // harness's probe made one before).
    assert!(
        wait_until(Duration::from_secs(10), || connections_at(
            &stats_b,
            addr(pb)
        ) == 4),
        "{} connections",
        connections_at(&stats_b, addr(pb))
    );
    // smtp-hosts, and mx-connection-attempts: one attempt stops at the dead first host.
    assert_eq!(kind("a@hosts.test"), "d");
    assert_eq!(
        msg(&c_msgs, "hosts").len(),
        1,
        "{:?} / {:?}",
        rows.iter().find(|r| r[4] == "a@hosts.test"),
        msg(&a, "hosts")
    );
    assert_eq!(kind("a@attempts1.test"), "t");
    assert_eq!(kind("a@attempts.test"), "d");
    // bounce-upon-5xx-greeting.
    assert_eq!(kind("a@greet5.test"), "b");
    assert_eq!(kind("a@greet5b.test"), "t");
    // <bounce-category-patterns> before Sluice's own rules.
    let cat = rows.iter().find(|r| r[4] == "gone@cat.test").unwrap();
    assert_eq!(cat[0], "b");
    assert_eq!(cat[10], "inactive-mailbox", "{cat:?}");
    // <domain> inside <virtual-mta>, and domain-macro.
    assert_eq!(msg(&c_msgs, "override").len(), 1);
    assert_eq!(msg(&c_msgs, "macro").len(), 2);
    // 8BITMIME is declared for an 8-bit body, unless ignore-8bitmime.
    assert!(
        msg(&a, "eight")[0].contains("BODY=8BITMIME"),
        "{}",
        msg(&a, "eight")[0]
    );
    assert!(!msg(&a, "no8bit")[0].contains("BODY=8BITMIME"));
    // The EHLO name: smtp-source-host's, or the VMTA's host-name.
    assert!(msg(&a, "clear")[0].contains("X-Sink-Helo: v1.example.com"));
    assert!(msg(&a, "v2")[0].contains("X-Sink-Helo: v2.host.test"));
    let _ = stats_a;
}

#[test]
fn greeting_and_connect_timeouts_end_a_stuck_attempt() {
    // A receiver that accepts and never greets, and one whose accept queue is full.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (full_port, _full, _held) = rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let l = sock.listen(1).unwrap();
        let port = l.local_addr().unwrap().port();
        // Fill the queue: nothing is accepted, so later connections are never answered.
        let mut held = Vec::new();
        for _ in 0..8 {
            if let Ok(Ok(s)) = tokio::time::timeout(
                Duration::from_millis(300),
                tokio::net::TcpStream::connect(("127.0.0.1", port)),
            )
            .await
            {
                held.push(s);
            }
        }
        (port, l, held)
    });
    let policy = format!(
        "<virtual-mta v1>\n smtp-source-host 127.0.0.1 v1.example.com\n</virtual-mta>\n\
         <domain silent.test>\n route [127.0.0.1]:{silent_port}\n smtp-greeting-timeout 2s\n retry-after 1h\n</domain>\n\
         <domain full.test>\n route [127.0.0.1]:{full_port}\n connect-timeout 2s\n retry-after 1h\n</domain>\n{ACCT}"
    );
    let mut c = Cluster::start(1, &policy, "");
    let (smtp, _) = c.start_ingress();
    c.start_worker("w1", &["127.0.0.1"], "");
    for to in ["a@silent.test", "b@full.test"] {
        assert!(smtp_send(smtp, "s@example.com", &[to], "Subject: t\n\nx").starts_with("250"));
    }
    // Without the directives these would wait 5 and 1 minutes.
    let ok = wait_until(Duration::from_secs(30), || acct(&c).len() >= 2);
    assert!(ok, "{:?}", acct(&c));
    let rows = acct(&c);
    let row = |rcpt: &str| rows.iter().find(|r| r[4] == rcpt).cloned().unwrap();
    assert_eq!(row("a@silent.test")[0], "t");
    assert!(
        row("a@silent.test")[8].contains("greeting"),
        "{:?}",
        row("a@silent.test")
    );
    assert_eq!(row("b@full.test")[0], "t");
    assert!(
        row("b@full.test")[8].contains("connection"),
        "{:?}",
        row("b@full.test")
    );
    drop(silent);
}

#[test]
fn reply_pattern_actions_skip_mx_bounce_rcpt_normal_and_disable_source_ip() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (_dns, dns_port) = start_dns(
        dir.path(),
        &[
            "--mx-host=skip.test,mx1.skip.test,10".into(),
            "--mx-host=skip.test,mx2.skip.test,20".into(),
            "--host-record=mx1.skip.test,127.0.0.61".into(),
            "--host-record=mx2.skip.test,127.0.0.62".into(),
            "--mx-host=acts.test,mx.acts.test,10".into(),
            "--host-record=mx.acts.test,127.0.0.62".into(),
        ],
    );
    let policy = format!(
        "<virtual-mta v1>\n smtp-source-host 127.0.0.1 v1.example.com\n</virtual-mta>\n\
         <smtp-pattern-list acts>\n\
          reply /try another mx/ skip-mx\n\
          reply /blocked for spam/ bounce-rcpt\n\
          reply /greylisted/ mode=backoff\n\
          reply /accepted by the sink/ mode=normal\n\
          reply /ip banned/ disable-source-ip,reenable-after=1h\n\
         </smtp-pattern-list>\n\
         <domain *>\n retry-after 2s\n smtp-pattern-list acts\n</domain>\n{ACCT}"
    );
    let mut c = Cluster::start(1, &policy, "[scheduler]\nallow_clock_control = true\n");
    // mx1 turns skip@ away with a skip-mx reply; mx2 takes everything else.
    let (_, _, saved1) = c.start_sink_at(
        format!("127.0.0.61:{port}").parse().unwrap(),
        &["--reply", "s@skip.test=451 4.7.0 try another mx"],
    );
    let (_, _, saved2) = c.start_sink_at(
        format!("127.0.0.62:{port}").parse().unwrap(),
        &[
            "--reply",
            "br@acts.test=451 4.7.1 blocked for spam",
            "--reply",
            "ban@acts.test=451 4.7.0 ip banned",
        ],
    );
    c.start_worker(
        "w1",
        &["127.0.0.1"],
        &format!("dns_servers = [\"127.0.0.1:{dns_port}\"]\nsmtp_port = {port}\n"),
    );
    let (smtp, _) = c.start_ingress();
    let send = |to: &str| {
        let r = smtp_send(smtp, "s@example.com", &[to], &format!("Subject: {to}\n\nx"));
        assert!(r.starts_with("250"), "{to}: {r}");
    };
    let kinds = |rcpt: &str| -> Vec<String> {
        acct(&c)
            .into_iter()
            .filter(|r| r[4] == rcpt)
            .map(|r| r[0].clone())
            .collect()
    };
    // skip-mx: the retry goes to the second MX.
    send("s@skip.test");
    assert!(
        wait_until(Duration::from_secs(30), || kinds("s@skip.test")
            == ["t", "d"]),
        "{:?}",
        acct(&c)
    );
    assert!(saved(&saved1).is_empty());
    assert!(
        saved(&saved2)
            .iter()
            .any(|m| m.contains("Subject: s@skip.test"))
    );
    // bounce-rcpt: a temporary reply bounces the recipient.
    send("br@acts.test");
    assert!(wait_until(Duration::from_secs(20), || kinds(
        "br@acts.test"
    ) == ["b"]));
    // mode=backoff, then mode=normal on a later delivery.
    let mode = || -> String {
        c.queues()
            .as_array()
            .and_then(|a| a.iter().find(|q| q["queue"] == "acts.test").cloned())
            .map(|q| q["mode"].as_str().unwrap_or("").to_string())
            .unwrap_or_default()
    };
    send("tempfail@acts.test");
    assert!(
        wait_until(Duration::from_secs(20), || mode() == "backoff"),
        "{}",
        c.queues()
    );
    send("ok@acts.test");
    assert!(
        wait_until(Duration::from_secs(20), || mode() == "normal"),
        "{}",
        c.queues()
    );
    // disable-source-ip: the worker's only IP is out of use for an hour.
    let (ok, _, _) = c.cli(&["delete", "--rcpt", "tempfail@acts.test", "-c", &c.addrs[0]]);
    assert!(ok);
    send("ban@acts.test");
    assert!(wait_until(Duration::from_secs(20), || kinds(
        "ban@acts.test"
    ) == ["t"]));
    send("after@acts.test");
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        kinds("after@acts.test").is_empty(),
        "sent from a disabled IP"
    );
    let (ok, _, _) = c.cli(&["delete", "--rcpt", "ban@acts.test", "-c", &c.addrs[0]]);
    assert!(ok);
    let (ok, _, err) = c.cli(&["debug", "advance-clock", "61m", "-c", &c.addrs[0]]);
    assert!(ok, "{err}");
    assert!(wait_until(Duration::from_secs(20), || kinds(
        "after@acts.test"
    ) == ["d"]));
}
