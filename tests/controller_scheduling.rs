//! The controller's promises, checked at the receiving sink: connection and rate budgets with
//! two workers on different source IPs, pause/resume and delete, and accounting rows that are
//! the same on every replica across a leader change.

mod harness;

use std::path::Path;
use std::time::Duration;

use harness::*;

const SOURCE: &str = "<source 127.0.0.1>\n always-allow-relaying yes\n process-x-virtual-mta yes\n default-virtual-mta pool\n</source>\n";

fn acct_file(c: &Cluster, node: usize) -> String {
    std::fs::read_to_string(c.path().join(format!("controller-{}/acct.csv", node + 1)))
        .unwrap_or_default()
}

fn rows(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .skip(1)
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

/// The largest number of timestamps inside any window of `window_ms`.
fn max_in_window(ts: &[u64], window_ms: u64) -> usize {
    let mut v = ts.to_vec();
    v.sort_unstable();
    let mut best = 0;
    let mut start = 0;
    for end in 0..v.len() {
        while v[end] - v[start] >= window_ms {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}

#[test]
fn connection_and_rate_budgets_hold_at_the_sink_with_two_workers() {
    let port = free_port();
    let policy = format!(
        "<virtual-mta v11>\n smtp-source-host 127.0.0.11 v11.example.com\n</virtual-mta>\n\
         <virtual-mta v12>\n smtp-source-host 127.0.0.12 v12.example.com\n</virtual-mta>\n\
         <virtual-mta-pool pool>\n virtual-mta v11\n virtual-mta v12\n</virtual-mta-pool>\n{SOURCE}\
         <domain *>\n route [127.0.0.1]:{port}\n max-smtp-out 2\n max-msg-rate 6/2s\n max-msg-per-connection 2\n retry-after 1h\n</domain>\n"
    );
    let mut c = Cluster::start(1, &policy, "");
    let (_, stats, _) = c.start_sink_at(
        format!("127.0.0.1:{port}").parse().unwrap(),
        &["--latency-ms", "100"],
    );
    let (smtp, _) = c.start_ingress();
    // Ten times what the budget lets through in the time we watch.
    for n in 0..120 {
        assert!(
            smtp_send(
                smtp,
                "s@example.com",
                &[&format!("u{n}@throttle.test")],
                "Subject: t\n\nbody"
            )
            .starts_with("250")
        );
    }
    c.start_worker("w11", &["127.0.0.11"], "");
    c.start_worker("w12", &["127.0.0.12"], "");
    std::thread::sleep(Duration::from_secs(8));
    let st = sink_stats(&stats);
    let mut total = 0;
    for ip in ["127.0.0.11", "127.0.0.12"] {
        let q = &st["queues"][format!("{ip} throttle.test")];
        let ts: Vec<u64> = q["timestamps_ms"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
            .unwrap_or_default();
        assert!(!ts.is_empty(), "nothing was sent from {ip}: {st}");
        total += ts.len();
        assert!(
            q["max_concurrent"].as_u64().unwrap() <= 2,
            "max-smtp-out exceeded from {ip}: {q}"
        );
        // Grants are counted when leased; allow for the few milliseconds before the send.
        let worst = max_in_window(&ts, 2000 - 150);
        assert!(
            worst <= 6,
            "max-msg-rate 6/2s exceeded from {ip}: {worst} in one window"
        );
    }
    // Both source IPs shared the work, and the budget, not the backlog, set the pace.
    assert!(total < 120, "all mail went out despite the rate: {total}");
    let q = c.queues();
    assert!(q[0]["recipients"].as_u64().unwrap() > 0);
}

#[test]
fn source_ip_budgets_hold_across_vmtas_that_share_an_ip() {
    let port = free_port();
    // Two VMTAs on one IP; each alone would allow 4 connections and 20 messages a window.
    let policy = format!(
        "<virtual-mta va>\n smtp-source-host 127.0.0.13 va.example.com\n</virtual-mta>\n\
         <virtual-mta vb>\n smtp-source-host 127.0.0.13 vb.example.com\n</virtual-mta>\n\
         <virtual-mta-pool pool>\n virtual-mta va\n virtual-mta vb\n</virtual-mta-pool>\n{SOURCE}\
         <domain *>\n route [127.0.0.1]:{port}\n max-smtp-out 4\n max-msg-rate 20/2s\n \
         max-msg-per-connection 2\n source-ip-max-smtp-out 1\n source-ip-max-msg-rate 5/2s\n \
         retry-after 1h\n</domain>\n"
    );
    let mut c = Cluster::start(1, &policy, "");
    let (_, stats, _) = c.start_sink_at(
        format!("127.0.0.1:{port}").parse().unwrap(),
        &["--latency-ms", "100"],
    );
    let (smtp, _) = c.start_ingress();
    for n in 0..60 {
        assert!(
            smtp_send(
                smtp,
                "s@example.com",
                &[&format!("u{n}@shared-ip.test")],
                "Subject: t\n\nbody"
            )
            .starts_with("250")
        );
    }
    c.start_worker("w13", &["127.0.0.13"], "");
    std::thread::sleep(Duration::from_secs(7));
    let st = sink_stats(&stats);
    let q = &st["queues"]["127.0.0.13 shared-ip.test"];
    let ts: Vec<u64> = q["timestamps_ms"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
        .unwrap_or_default();
    assert!(!ts.is_empty(), "nothing was sent: {st}");
    assert_eq!(
        q["max_concurrent"].as_u64(),
        Some(1),
        "source-ip-max-smtp-out exceeded: {q}"
    );
    let worst = max_in_window(&ts, 2000 - 150);
    assert!(worst <= 5, "source-ip-max-msg-rate 5/2s exceeded: {worst}");
    assert!(
        ts.len() < 60,
        "the per-IP rate did not hold back the backlog"
    );
}

#[test]
fn pause_resume_and_delete() {
    let port = free_port();
    let policy = format!(
        "<virtual-mta v1>\n smtp-source-host 127.0.0.1 v1.example.com\n</virtual-mta>\n<virtual-mta-pool pool>\n virtual-mta v1\n</virtual-mta-pool>\n{SOURCE}\
         <domain *>\n route [127.0.0.1]:{port}\n retry-after 1h\n</domain>\n<acct-file acct.csv>\n records d,b\n</acct-file>\n"
    );
    let mut c = Cluster::start(1, &policy, "");
    let (_, stats, _) = c.start_sink_at(format!("127.0.0.1:{port}").parse().unwrap(), &[]);
    let (ok, out, err) = run(&["pause", "paused.test/*", "-c", &c.addrs[0]]);
    assert!(ok, "{out}{err}");
    let (smtp, _) = c.start_ingress();
    c.start_worker("w1", &["127.0.0.1"], "");
    for n in 0..3 {
        assert!(
            smtp_send(
                smtp,
                "s@example.com",
                &[&format!("u{n}@paused.test")],
                "Subject: p\n\nbody"
            )
            .starts_with("250")
        );
    }
    assert!(
        smtp_send(
            smtp,
            "s@example.com",
            &["keep@other.test"],
            "Subject: o\n\nbody"
        )
        .starts_with("250")
    );
    assert!(
        wait_until(Duration::from_secs(20), || sink_stats(&stats)["messages"]
            == 1),
        "the unpaused queue is delivered"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        sink_stats(&stats)["messages"],
        1,
        "a paused queue delivered"
    );
    let q = c.queues();
    let paused = q
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == "paused.test")
        .cloned()
        .unwrap();
    assert_eq!(paused["mode"], "paused");
    assert_eq!(paused["recipients"], 3);
    // Delete one recipient: a `b` row, and it is never delivered.
    let (ok, out, err) = run(&["delete", "--rcpt", "u1@paused.test", "-c", &c.addrs[0]]);
    assert!(ok && out.contains("deleted 1"), "{out}{err}");
    let (ok, _, _) = run(&["resume", "paused.test/*", "-c", &c.addrs[0]]);
    assert!(ok);
    assert!(
        wait_until(Duration::from_secs(20), || sink_stats(&stats)["messages"]
            == 3),
        "{}",
        sink_stats(&stats)
    );
    assert!(wait_until(Duration::from_secs(5), || rows(&acct_file(
        &c, 0
    ))
    .len()
        == 4));
    let r = rows(&acct_file(&c, 0));
    let deleted = r.iter().find(|x| x[4] == "u1@paused.test").unwrap();
    assert_eq!(deleted[0], "b");
    assert_eq!(deleted[10], "other");
    assert_eq!(r.iter().filter(|x| x[0] == "d").count(), 3);
}

#[test]
fn accounting_rows_are_identical_on_three_replicas_across_a_leader_change() {
    let port = free_port();
    let policy = format!(
        "<virtual-mta v1>\n smtp-source-host 127.0.0.1 v1.example.com\n</virtual-mta>\n<virtual-mta-pool pool>\n virtual-mta v1\n</virtual-mta-pool>\n{SOURCE}\
         <domain *>\n route [127.0.0.1]:{port}\n retry-after 1h\n</domain>\n<acct-file acct.csv>\n records r,d,b,t\n</acct-file>\n"
    );
    let fast = "[raft]\nheartbeat_ms = 50\nelection_min_ms = 300\nelection_max_ms = 600\n";
    let mut c = Cluster::start(3, &policy, fast);
    let (_, stats, _) = c.start_sink_at(format!("127.0.0.1:{port}").parse().unwrap(), &[]);
    let (smtp, _) = c.start_ingress();
    c.start_worker("w1", &["127.0.0.1"], "");
    let mut sent = 0;
    for n in 0..20 {
        if smtp_send(
            smtp,
            "s@example.com",
            &[&format!("a{n}@acct.test"), "permfail@acct.test"],
            "Subject: a\n\nbody",
        )
        .starts_with("250")
        {
            sent += 1;
        }
    }
    assert!(wait_until(
        Duration::from_secs(20),
        || sink_stats(&stats)["messages"].as_u64() == Some(sent)
    ));
    let leader = c.leader().unwrap();
    c.controllers[leader].kill9();
    for n in 20..40 {
        if smtp_send(
            smtp,
            "s@example.com",
            &[&format!("a{n}@acct.test")],
            "Subject: b\n\nbody",
        )
        .starts_with("250")
        {
            sent += 1;
        }
    }
    c.start_controller(leader);
    let ok = wait_until(Duration::from_secs(60), || {
        let files: Vec<String> = (0..3).map(|i| acct_file(&c, i)).collect();
        let d = rows(&files[0]).iter().filter(|r| r[0] == "d").count();
        d as u64 == sent && files.windows(2).all(|w| w[0] == w[1])
    });
    if !ok {
        c.dump_logs();
        for i in 0..3 {
            eprintln!(
                "--- node {} acct: {} rows",
                i + 1,
                rows(&acct_file(&c, i)).len()
            );
        }
    }
    assert!(ok, "the accounting files differ or miss rows");
    let r = rows(&acct_file(&c, 0));
    for n in 0..40 {
        let rcpt = format!("a{n}@acct.test");
        let d = r.iter().filter(|x| x[0] == "d" && x[4] == rcpt).count();
        let rr = r.iter().filter(|x| x[0] == "r" && x[4] == rcpt).count();
        assert!(d <= 1 && rr <= 1, "{rcpt}: {d} d rows and {rr} r rows");
    }
    let _ = Path::new("");
}

/// Reads one (possibly multi-line) SMTP reply and returns its last line.
fn reply(r: &mut std::io::BufReader<std::net::TcpStream>) -> String {
    use std::io::BufRead;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return String::new();
        }
        let line = line.trim_end().to_string();
        if line.len() < 4 || line.as_bytes()[3] != b'-' {
            return line;
        }
    }
}

#[test]
fn reload_reaches_every_node_keeps_connections_and_refuses_a_broken_file() {
    use std::io::Write;
    let port = free_port();
    let policy = |extra: &str| {
        format!(
            "<virtual-mta v1>\n smtp-source-host 127.0.0.1 v1.example.com\n</virtual-mta>\n\
             <source 127.0.0.1>\n always-allow-relaying yes\n default-virtual-mta v1\n</source>\n\
             <domain *>\n route [127.0.0.1]:{port}\n</domain>\n{extra}"
        )
    };
    let mut c = Cluster::start(3, &policy(""), "");
    c.start_sink_at(format!("127.0.0.1:{port}").parse().unwrap(), &[]);
    let (smtp, _) = c.start_ingress();
    c.start_worker("w1", &["127.0.0.1"], "");
    let leader = c.addrs[c.leader().unwrap()].clone();
    let status = || -> serde_json::Value {
        let (_, out, _) = run(&["show", "status", "--json", "-c", &leader]);
        serde_json::from_str(&out).unwrap_or_default()
    };
    // Every node reports the version it runs.
    let all_on = |v: &serde_json::Value, version: u64| {
        let peers = v["peers"].as_array().cloned().unwrap_or_default();
        ["ingress", "worker"].iter().all(|kind| {
            peers.iter().any(|p| {
                p["node"].as_str().unwrap_or("").starts_with(kind)
                    && p["policy_version"].as_u64() == Some(version)
            })
        })
    };
    let v1 = status()["policy_version"].as_u64().unwrap();
    assert!(
        wait_until(Duration::from_secs(15), || all_on(&status(), v1)),
        "nodes do not report version {v1}: {}",
        status()
    );

    // A session stays open across the reload.
    let s = std::net::TcpStream::connect(smtp).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut r = std::io::BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    assert!(reply(&mut r).starts_with("220"));
    write!(w, "EHLO client.example.com\r\n").unwrap();
    assert!(reply(&mut r).starts_with("250"));

    std::fs::write(
        c.path().join("policy.conf"),
        policy("<domain reload.test>\n max-smtp-out 3\n</domain>\n"),
    )
    .unwrap();
    let (ok, out, err) = run(&["reload", "-c", &leader]);
    assert!(ok, "reload failed: {out} {err}");
    assert!(!err.contains("not reloaded"), "{err}");
    let v2 = status()["policy_version"].as_u64().unwrap();
    assert_ne!(v1, v2);
    assert!(
        wait_until(Duration::from_secs(15), || all_on(&status(), v2)),
        "nodes did not move to version {v2}: {}",
        status()
    );
    // Every controller runs the new version, so a new leader would serve it too.
    for a in &c.addrs {
        let (_, out, _) = run(&["debug", "policy-version", "-c", a]);
        assert_eq!(out.trim(), format!("{v2:016x}"), "controller {a}");
    }

    // A broken file is refused with its line, and the running version stays.
    std::fs::write(
        c.path().join("policy.conf"),
        policy("<domain broken.test>\n max-smtp-out lots\n</domain>\n"),
    )
    .unwrap();
    let (ok, _, err) = run(&["reload", "-c", &leader]);
    assert!(!ok, "a broken policy was accepted");
    assert!(err.contains("policy.conf:"), "no file:line in {err}");
    assert_eq!(status()["policy_version"].as_u64(), Some(v2));

    // The session opened before both reloads still takes mail.
    write!(w, "MAIL FROM:<a@example.com>\r\n").unwrap();
    assert!(reply(&mut r).starts_with("250"));
    write!(w, "RCPT TO:<b@reload.test>\r\n").unwrap();
    assert!(reply(&mut r).starts_with("250"));
    write!(w, "DATA\r\n").unwrap();
    assert!(reply(&mut r).starts_with("354"));
    write!(w, "Subject: after reload\r\n\r\nhello\r\n.\r\n").unwrap();
    let fin = reply(&mut r);
    assert!(fin.starts_with("250"), "{fin}");
}

#[test]
fn a_retry_schedule_of_hours_is_followed_on_the_log_clock() {
    let port = free_port();
    let policy = format!(
        "<virtual-mta v1>\n smtp-source-host 127.0.0.1 v1.example.com\n</virtual-mta>\n\
         <source 127.0.0.1>\n always-allow-relaying yes\n default-virtual-mta v1\n</source>\n\
         <domain *>\n route [127.0.0.1]:{port}\n retry-after 1h,2h\n bounce-after 5h\n</domain>\n\
         <acct-file acct.csv>\n records t,b\n record-fields t type,timeLogged,rcpt,bounceCat\n record-fields b type,timeLogged,rcpt,bounceCat\n</acct-file>\n"
    );
    let mut c = Cluster::start(
        1,
        &policy,
        "[scheduler]\nretry_jitter = 0.0\nallow_clock_control = true\n",
    );
    c.start_sink_at(format!("127.0.0.1:{port}").parse().unwrap(), &[]);
    let (smtp, _) = c.start_ingress();
    c.start_worker("w1", &["127.0.0.1"], "");
    let addr = c.addrs[0].clone();
    assert!(
        smtp_send(
            smtp,
            "s@example.com",
            &["tempfail@hours.test"],
            "Subject: t\n\nx"
        )
        .starts_with("250")
    );
    let rows_of = |kind: &str| -> Vec<Vec<String>> {
        rows(&acct_file(&c, 0))
            .into_iter()
            .filter(|r| r[0] == kind)
            .collect()
    };
    let wait_rows = |kind: &str, n: usize| {
        assert!(
            wait_until(Duration::from_secs(15), || rows_of(kind).len() >= n),
            "expected {n} `{kind}` rows: {}",
            acct_file(&c, 0)
        );
    };
    let advance = |by: &str| {
        let (ok, _, err) = run(&["debug", "advance-clock", by, "-c", &addr]);
        assert!(ok, "advance-clock: {err}");
    };
    wait_rows("t", 1);
    // Not due before the first hour is over.
    advance("50m");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(rows_of("t").len(), 1, "retried before retry-after");
    advance("11m");
    wait_rows("t", 2);
    // The second wait is two hours.
    advance("1h");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(rows_of("t").len(), 2, "retried before the second wait");
    advance("61m");
    wait_rows("t", 3);
    // Past bounce-after (5 h from reception): the next attempt's failure expires it.
    advance("2h");
    wait_rows("b", 1);
    let b = &rows_of("b")[0];
    assert_eq!(b[2], "tempfail@hours.test");
    assert_eq!(b[3], "message-expired");
    // The rows carry the log's time: about 1 h, then 2 h apart.
    let t: Vec<chrono::DateTime<chrono::FixedOffset>> = rows_of("t")
        .iter()
        .map(|r| chrono::DateTime::parse_from_str(&r[1], "%Y-%m-%d %H:%M:%S%z").unwrap())
        .collect();
    let gap = |a: usize, b: usize| (t[b] - t[a]).num_minutes();
    assert!(
        (60..=66).contains(&gap(0, 1)),
        "first wait {} min",
        gap(0, 1)
    );
    assert!(
        (120..=126).contains(&gap(1, 2)),
        "second wait {} min",
        gap(1, 2)
    );

    // Without the setting, the clock cannot be moved.
    let c2 = Cluster::start(1, &policy, "");
    let (ok, _, err) = run(&["debug", "advance-clock", "1h", "-c", &c2.addrs[0]]);
    assert!(!ok && err.contains("clock control is off"), "{err}");
}
