//! The controller's promises, checked at the receiving sink: connection and rate budgets with
//! two workers on different source IPs, pause/resume and delete, and accounting rows that are
//! the same on every replica across a leader change.

use std::path::Path;
use std::time::Duration;

use crate::harness::*;

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
    let ts = |st: &serde_json::Value, ip: &str| -> Vec<u64> {
        st["queues"][format!("{ip} throttle.test")]["timestamps_ms"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
            .unwrap_or_default()
    };
    // Watch until each IP sent more than one window's worth.
    let mut st = serde_json::json!({});
    let ok = wait_until(Duration::from_secs(60), || {
        st = sink_stats(&stats);
        ["127.0.0.11", "127.0.0.12"]
            .iter()
            .all(|ip| ts(&st, ip).len() >= 13)
    });
    assert!(ok, "{st}");
    // A pool's members each have their own budget: together they exceed one member's.
    let mut both: Vec<u64> = ts(&st, "127.0.0.11");
    both.extend(ts(&st, "127.0.0.12"));
    assert!(max_in_window(&both, 2000) > 6, "the pool sent as one VMTA");
    let mut total = 0;
    for ip in ["127.0.0.11", "127.0.0.12"] {
        let q = &st["queues"][format!("{ip} throttle.test")];
        let ts = ts(&st, ip);
        total += ts.len();
        assert!(
            q["max_concurrent"].as_u64().unwrap_or(0) <= 2,
            "max-smtp-out exceeded from {ip}: {q}"
        );
        // Counted from the grant until one window after the outcome: arrivals keep the rate.
        let worst = max_in_window(&ts, 2000);
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
    let ts_of = |st: &serde_json::Value| -> Vec<u64> {
        st["queues"]["127.0.0.13 shared-ip.test"]["timestamps_ms"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
            .unwrap_or_default()
    };
    let mut st = serde_json::json!({});
    assert!(
        wait_until(Duration::from_secs(60), || {
            st = sink_stats(&stats);
            ts_of(&st).len() >= 11
        }),
        "{st}"
    );
    let q = &st["queues"]["127.0.0.13 shared-ip.test"];
    let ts = ts_of(&st);
    assert_eq!(
        q["max_concurrent"].as_u64(),
        Some(1),
        "source-ip-max-smtp-out exceeded: {q}"
    );
    let worst = max_in_window(&ts, 2000);
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
    let (ok, out, err) = c.cli(&["pause", "paused.test/*", "-c", &c.addrs[0]]);
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
    let (ok, out, err) = c.cli(&["delete", "--rcpt", "u1@paused.test", "-c", &c.addrs[0]]);
    assert!(ok && out.contains("deleted 1"), "{out}{err}");
    let (ok, _, _) = c.cli(&["resume", "paused.test/*", "-c", &c.addrs[0]]);
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
        let (_, out, _) = c.cli(&["show", "status", "--json", "-c", &leader]);
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
    let (ok, out, err) = c.cli(&["reload", "-c", &leader]);
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
        let (_, out, _) = c.cli(&["debug", "policy-version", "-c", a]);
        assert_eq!(out.trim(), format!("{v2:016x}"), "controller {a}");
    }

    // A broken file is refused with its line, and the running version stays.
    std::fs::write(
        c.path().join("policy.conf"),
        policy("<domain broken.test>\n max-smtp-out lots\n</domain>\n"),
    )
    .unwrap();
    let (ok, _, err) = c.cli(&["reload", "-c", &leader]);
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
        let (ok, _, err) = c.cli(&["debug", "advance-clock", by, "-c", &addr]);
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
    let (ok, _, err) = c2.cli(&["debug", "advance-clock", "1h", "-c", &c2.addrs[0]]);
    assert!(!ok && err.contains("clock control is off"), "{err}");
}

/// Runs an operator command on the leader.
fn op(c: &Cluster, args: &[&str]) -> String {
    let a = c.addrs[c.leader().unwrap()].clone();
    let mut v = args.to_vec();
    v.extend(["-c", &a]);
    let (ok, out, err) = c.cli(&v);
    assert!(ok, "{args:?}: {out}{err}");
    out
}

fn arrivals(st: &serde_json::Value, domain: &str) -> Vec<u64> {
    let mut ts = Vec::new();
    for (k, q) in st["queues"].as_object().cloned().unwrap_or_default() {
        if k.ends_with(&format!(" {domain}")) {
            ts.extend(
                q["timestamps_ms"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|v| v.as_u64()).collect::<Vec<_>>())
                    .unwrap_or_default(),
            );
        }
    }
    ts.sort_unstable();
    ts
}

#[test]
fn replicas_stay_identical_through_deletes_pauses_retries_and_a_follower_restart() {
    let port = free_port();
    let policy = format!(
        "<virtual-mta v1>\n smtp-source-host 127.0.0.1 v1.example.com\n</virtual-mta>\n\
         <virtual-mta-pool pool>\n virtual-mta v1\n</virtual-mta-pool>\n{SOURCE}\
         <domain *>\n route [127.0.0.1]:{port}\n retry-after 1h\n</domain>\n\
         <acct-file acct.csv>\n records r,d,b,t\n</acct-file>\n"
    );
    let fast = "[raft]\nheartbeat_ms = 50\nelection_min_ms = 300\nelection_max_ms = 600\n";
    let mut c = Cluster::start(3, &policy, fast);
    let (_, stats, _) = c.start_sink_at(format!("127.0.0.1:{port}").parse().unwrap(), &[]);
    // Everything waits in paused queues first.
    op(&c, &["pause", "*"]);
    let (smtp, _) = c.start_ingress();
    for n in 0..60 {
        let d = ["one.test", "two.test", "three.test"][n % 3];
        let job = if n % 4 == 0 { "job-x" } else { "job-y" };
        let body = format!("X-Job: {job}\nSubject: m{n}\n\nbody");
        let r = smtp_send(
            smtp,
            "s@example.com",
            &[&format!("u{n}@{d}"), &format!("v{n}@{d}")],
            &body,
        );
        assert!(r.starts_with("250"), "{r}");
    }
    // One delete spans many messages in several queues.
    let out = op(&c, &["delete", "--queue", "two.test/*"]);
    assert!(out.contains("deleted 40"), "{out}");
    let follower = (c.leader().unwrap() + 1) % 3;
    c.controllers[follower].kill9();
    op(&c, &["retry", "one.test/*"]);
    op(&c, &["resume", "three.test/*"]);
    op(&c, &["pause", "three.test/*"]);
    op(&c, &["delete", "--rcpt", "u3@one.test"]);
    c.start_controller(follower);
    assert!(wait_for_port(
        c.addrs[follower].parse().unwrap(),
        Duration::from_secs(30)
    ));
    op(&c, &["resume", "*"]);
    c.start_worker("w1", &["127.0.0.1"], "");
    // one.test: 20 messages x 2 recipients, less one deleted; three.test: 20 x 2.
    let expected = 39 + 40;
    let ok = wait_until(Duration::from_secs(60), || {
        sink_stats(&stats)["recipients"].as_u64() == Some(expected)
    });
    assert!(ok, "{}", sink_stats(&stats));
    let ok = wait_until(Duration::from_secs(60), || {
        let d: Vec<_> = (0..3).map(|i| c.digest(i)).collect();
        let files: Vec<String> = (0..3).map(|i| acct_file(&c, i)).collect();
        let drows = rows(&files[0]).iter().filter(|r| r[0] == "d").count();
        d.iter().all(|x| x.is_some())
            && d.windows(2).all(|w| w[0] == w[1])
            && drows as u64 == expected
            && files.windows(2).all(|w| w[0] == w[1])
    });
    if !ok {
        c.dump_logs();
        for i in 0..3 {
            eprintln!("node {}: {:?}", i + 1, c.digest(i));
        }
    }
    assert!(ok, "replicas differ: digests or accounting files");
    let r = rows(&acct_file(&c, 0));
    assert_eq!(r.iter().filter(|x| x[0] == "b").count(), 41);
    // One zone for the whole cluster (UTC by default), whatever the hosts' zone says.
    assert!(r.iter().all(|x| x[1].ends_with("+0000")), "{:?}", r[0]);
}

#[test]
fn rate_and_connection_limits_hold_at_the_receiver_across_a_leader_kill() {
    let port = free_port();
    // One queue (one VMTA on one IP), delivered by two workers that both own the IP.
    let policy = format!(
        "<virtual-mta v21>\n smtp-source-host 127.0.0.21 v21.example.com\n</virtual-mta>\n\
         <virtual-mta-pool pool>\n virtual-mta v21\n</virtual-mta-pool>\n{SOURCE}\
         <domain *>\n route [127.0.0.1]:{port}\n max-smtp-out 2\n max-msg-rate 30/10s\n \
         max-msg-per-connection 4\n retry-after 1h\n</domain>\n"
    );
    let fast = "[raft]\nheartbeat_ms = 50\nelection_min_ms = 300\nelection_max_ms = 600\n\
                [scheduler]\nlease_ttl_ms = 3000\n";
    let mut c = Cluster::start(3, &policy, fast);
    let (sink, stats, _) = c.start_sink_at(
        format!("127.0.0.1:{port}").parse().unwrap(),
        &["--latency-ms", "150"],
    );
    let (smtp, _) = c.start_ingress();
    // Ten times what the limit lets through while we watch.
    for n in 0..300 {
        let r = smtp_send(
            smtp,
            "s@example.com",
            &[&format!("u{n}@limit.test")],
            "Subject: l\n\nx",
        );
        assert!(r.starts_with("250"), "{r}");
    }
    c.start_worker("w21", &["127.0.0.21"], "");
    c.start_worker("w22", &["127.0.0.21"], "");
    // Kill the leader in the middle of a window, once mail flows.
    assert!(
        wait_until(Duration::from_secs(30), || arrivals(
            &sink_stats(&stats),
            "limit.test"
        )
        .len()
            >= 20),
        "{}",
        sink_stats(&stats)
    );
    let leader = c.leader().unwrap();
    c.controllers[leader].kill9();
    let killed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    // Delivery goes on under the new leader, for two more windows.
    assert!(
        wait_until(Duration::from_secs(60), || {
            let ts = arrivals(&sink_stats(&stats), "limit.test");
            ts.iter().filter(|&&t| t > killed_at + 20_000).count() > 0
        }),
        "{}",
        sink_stats(&stats)
    );
    let st = sink_stats(&stats);
    let ts = arrivals(&st, "limit.test");
    let worst = max_in_window(&ts, 10_000);
    assert!(
        worst <= 30,
        "the receiver saw {worst} messages in one 10 s window (limit 30)"
    );
    let conns = st["listeners"][sink.to_string()]["max_concurrent"]
        .as_u64()
        .unwrap();
    assert!(
        conns <= 2,
        "the receiver saw {conns} connections at once (max-smtp-out 2)"
    );
    assert!(ts.len() < 300, "the limit did not hold the backlog back");
}

#[test]
fn arrival_windows_hold_the_rate_limit_run_after_run() {
    // Behind one stable leader, the receiver's count is checked in several independent runs,
    // each with a different time on the wire: a message slow to be answered must not let the
    // next window's grants arrive early.
    for latency_ms in ["0", "150", "600"] {
        let port = free_port();
        let policy = format!(
            "<virtual-mta v23>\n smtp-source-host 127.0.0.23 v23.example.com\n</virtual-mta>\n\
             <virtual-mta-pool pool>\n virtual-mta v23\n</virtual-mta-pool>\n{SOURCE}\
             <domain *>\n route [127.0.0.1]:{port}\n max-smtp-out 2\n max-msg-rate 30/10s\n \
             max-msg-per-connection 4\n retry-after 1h\n</domain>\n"
        );
        let mut c = Cluster::start(1, &policy, "");
        let (sink, stats, _) = c.start_sink_at(
            format!("127.0.0.1:{port}").parse().unwrap(),
            &["--latency-ms", latency_ms],
        );
        let (smtp, _) = c.start_ingress();
        // Ten times what the limit lets through in a window.
        for n in 0..300 {
            let r = smtp_send(
                smtp,
                "s@example.com",
                &[&format!("u{n}@limit.test")],
                "Subject: l\n\nx",
            );
            assert!(r.starts_with("250"), "{r}");
        }
        c.start_worker("w23", &["127.0.0.23"], "");
        // 65 arrivals span at least three windows when the limit holds.
        assert!(
            wait_until(Duration::from_secs(90), || arrivals(
                &sink_stats(&stats),
                "limit.test"
            )
            .len()
                >= 65),
            "latency {latency_ms} ms: {}",
            sink_stats(&stats)
        );
        let st = sink_stats(&stats);
        let ts = arrivals(&st, "limit.test");
        let worst = max_in_window(&ts, 10_000);
        let conns = st["listeners"][sink.to_string()]["max_concurrent"]
            .as_u64()
            .unwrap();
        println!(
            "latency {latency_ms} ms: {} arrivals, at most {worst} in a 10 s window, at most \
             {conns} connections at once",
            ts.len()
        );
        assert!(
            worst <= 30,
            "latency {latency_ms} ms: the receiver saw {worst} messages in one 10 s window (limit 30)"
        );
        assert!(
            conns <= 2,
            "latency {latency_ms} ms: the receiver saw {conns} connections at once (max-smtp-out 2)"
        );
    }
}

#[test]
fn mail_past_bounce_after_bounces_in_a_paused_queue_and_where_no_worker_owns_the_ip() {
    let port = free_port();
    let policy = format!(
        "<virtual-mta v1>\n smtp-source-host 127.0.0.1 v1.example.com\n</virtual-mta>\n\
         <virtual-mta nobody>\n smtp-source-host 127.0.0.99 nobody.example.com\n</virtual-mta>\n\
         <virtual-mta-pool pool>\n virtual-mta v1\n</virtual-mta-pool>\n{SOURCE}\
         <domain *>\n route [127.0.0.1]:{port}\n bounce-after 1h\n</domain>\n\
         <acct-file acct.csv>\n records b\n record-fields b type,rcpt,bounceCat,dsnStatus\n</acct-file>\n"
    );
    let mut c = Cluster::start(1, &policy, "[scheduler]\nallow_clock_control = true\n");
    c.start_sink_at(format!("127.0.0.1:{port}").parse().unwrap(), &[]);
    let (smtp, _) = c.start_ingress();
    c.start_worker("w1", &["127.0.0.1"], "");
    let addr = c.addrs[0].clone();
    let (ok, _, err) = c.cli(&["pause", "paused.test/*", "-c", &addr]);
    assert!(ok, "{err}");
    assert!(
        smtp_send(smtp, "s@example.com", &["a@paused.test"], "Subject: p\n\nx").starts_with("250")
    );
    let r = smtp_send(
        smtp,
        "s@example.com",
        &["b@orphan.test"],
        "X-Virtual-MTA: nobody\nSubject: o\n\nx",
    );
    assert!(r.starts_with("250"), "{r}");
    let (ok, _, err) = c.cli(&["debug", "advance-clock", "61m", "-c", &addr]);
    assert!(ok, "{err}");
    let ok = wait_until(Duration::from_secs(20), || {
        rows(&acct_file(&c, 0)).len() == 2
    });
    assert!(ok, "{}", acct_file(&c, 0));
    for r in rows(&acct_file(&c, 0)) {
        assert_eq!(r[0], "b");
        assert_eq!(r[2], "message-expired", "{r:?}");
        assert!(r[3].starts_with("5.4.7"), "{r:?}");
    }
    assert!(wait_until(Duration::from_secs(10), || c
        .queues()
        .as_array()
        .is_some_and(|q| q.iter().all(|q| q["recipients"] == 0))));
}

#[test]
fn a_slow_receiver_does_not_let_the_lease_expire_under_its_worker() {
    let port = free_port();
    let policy = format!(
        "<virtual-mta v1>\n smtp-source-host 127.0.0.1 v1.example.com\n</virtual-mta>\n\
         <virtual-mta-pool pool>\n virtual-mta v1\n</virtual-mta-pool>\n{SOURCE}\
         <domain *>\n route [127.0.0.1]:{port}\n</domain>\n\
         <acct-file acct.csv>\n records d\n</acct-file>\n"
    );
    // Leases of 1.5 s; the receiver takes 5 s to answer the end of data.
    let mut c = Cluster::start(1, &policy, "[scheduler]\nlease_ttl_ms = 1500\n");
    let (_, stats, _) = c.start_sink_at(
        format!("127.0.0.1:{port}").parse().unwrap(),
        &["--latency-ms", "5000"],
    );
    let (smtp, _) = c.start_ingress();
    c.start_worker("w1", &["127.0.0.1"], "");
    for n in 0..3 {
        assert!(
            smtp_send(
                smtp,
                "s@example.com",
                &[&format!("s{n}@slow.test")],
                "Subject: s\n\nx"
            )
            .starts_with("250")
        );
    }
    assert!(
        wait_until(Duration::from_secs(60), || rows(&acct_file(&c, 0)).len()
            >= 3),
        "{}",
        acct_file(&c, 0)
    );
    // Delivered once each: the lease was renewed while the worker waited.
    assert!(wait_until(
        Duration::from_secs(10),
        || sink_stats(&stats)["messages"] == 3
    ));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        sink_stats(&stats)["messages"],
        3,
        "a message was delivered twice"
    );
    assert_eq!(rows(&acct_file(&c, 0)).len(), 3);
    let log =
        c.others.iter().map(|p| p.log_text()).collect::<String>() + &c.controllers[0].log_text();
    assert!(
        !log.contains("lease expired"),
        "a lease expired under its worker"
    );
}

#[test]
fn forged_reports_for_unknown_leases_never_freeze_the_leader() {
    let port = free_port();
    let policy = format!(
        "<virtual-mta v1>\n smtp-source-host 127.0.0.1 v1.example.com\n</virtual-mta>\n\
         <virtual-mta-pool pool>\n virtual-mta v1\n</virtual-mta-pool>\n{SOURCE}\
         <domain *>\n route [127.0.0.1]:{port}\n max-msg-per-connection 5\n</domain>\n"
    );
    let mut c = Cluster::start(1, &policy, "");
    let (_, stats, _) = c.start_sink_at(format!("127.0.0.1:{port}").parse().unwrap(), &[]);
    let (smtp, _) = c.start_ingress();
    c.start_worker("w1", &["127.0.0.1"], "");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Reports, More and Renew calls for leases that do not exist (or are someone else's),
    // while the real worker takes and reports leases.
    let mut noise = Vec::new();
    // They come from a worker certificate: the lease API's own checks must hold, not only TLS.
    let (ca, cert, key) = c.tls_files("worker", "w1");
    let files = sluice_proto::tls::TlsFiles { ca, cert, key };
    for t in 0..4 {
        let (addr, stop, files) = (c.addrs[0].clone(), stop.clone(), files.clone());
        noise.push(std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async move {
                use sluice_proto::lease::leases_client::LeasesClient;
                use sluice_proto::lease::*;
                let ch = sluice_proto::connect_as(&addr, Duration::from_secs(5), Some(&files))
                    .await
                    .unwrap();
                let mut c = LeasesClient::new(ch);
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n += 1;
                    let id = (n * 7919 + t) % 5000;
                    let _ = c
                        .report(ReportRequest {
                            worker: "w1".into(),
                            lease_id: id,
                            outcomes: vec![Outcome {
                                message_id: id,
                                code: 250,
                                ..Default::default()
                            }],
                            done: n.is_multiple_of(2),
                        })
                        .await;
                    let _ = c
                        .more(MoreRequest {
                            worker: "intruder".into(),
                            lease_id: id,
                            max_messages: 10,
                        })
                        .await;
                    let _ = c
                        .renew(RenewRequest {
                            worker: "intruder".into(),
                            lease_ids: vec![id, id + 1],
                        })
                        .await;
                }
            });
        }));
    }
    for n in 0..100 {
        assert!(
            smtp_send(
                smtp,
                "s@example.com",
                &[&format!("f{n}@forged.test")],
                "Subject: f\n\nx"
            )
            .starts_with("250")
        );
    }
    let ok = wait_until(Duration::from_secs(60), || {
        sink_stats(&stats)["messages"] == 100
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in noise {
        t.join().unwrap();
    }
    assert!(ok, "delivery stalled: {}", sink_stats(&stats));
    let (ok, _, err) = c.cli(&["show", "status", "-c", &c.addrs[0]]);
    assert!(ok, "the leader does not answer: {err}");
}

#[test]
fn a_delivery_ends_backoff_when_the_policy_says_so() {
    let port = free_port();
    let policy = format!(
        "<virtual-mta v1>\n smtp-source-host 127.0.0.1 v1.example.com\n</virtual-mta>\n\
         <virtual-mta-pool pool>\n virtual-mta v1\n</virtual-mta-pool>\n{SOURCE}\
         <smtp-pattern-list grey>\n reply /greylisted/ mode=backoff\n</smtp-pattern-list>\n\
         <domain *>\n route [127.0.0.1]:{port}\n retry-after 1h\n smtp-pattern-list grey\n \
         backoff-to-normal-after 1h\n backoff-to-normal-after-delivery yes\n</domain>\n"
    );
    let mut c = Cluster::start(1, &policy, "");
    c.start_sink_at(format!("127.0.0.1:{port}").parse().unwrap(), &[]);
    let (smtp, _) = c.start_ingress();
    c.start_worker("w1", &["127.0.0.1"], "");
    let mode = |c: &Cluster| -> String {
        c.queues()
            .as_array()
            .and_then(|a| a.iter().find(|q| q["queue"] == "bo.test").cloned())
            .map(|q| q["mode"].as_str().unwrap_or("").to_string())
            .unwrap_or_default()
    };
    // A greylisting reply puts the queue in backoff mode (tempfail@ stays queued).
    assert!(
        smtp_send(
            smtp,
            "s@example.com",
            &["tempfail@bo.test"],
            "Subject: 1\n\nx"
        )
        .starts_with("250")
    );
    assert!(
        wait_until(Duration::from_secs(20), || mode(&c) == "backoff"),
        "{}",
        c.queues()
    );
    // The next delivery to the queue ends it.
    assert!(
        smtp_send(smtp, "s@example.com", &["ok@bo.test"], "Subject: 2\n\nx").starts_with("250")
    );
    assert!(
        wait_until(Duration::from_secs(20), || mode(&c) == "normal"),
        "{}",
        c.queues()
    );
}

fn listener_times(st: &serde_json::Value, port: u16) -> Vec<u64> {
    st["listeners"][format!("127.0.0.1:{port}")]["connect_times_ms"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
        .unwrap_or_default()
}

#[test]
fn connect_rates_warmup_and_vmta_connection_caps_hold_at_the_sink() {
    let (p1, p2, p3, p4) = (free_port(), free_port(), free_port(), free_port());
    let policy = format!(
        "<virtual-mta v1>\n smtp-source-host 127.0.0.1 v1.example.com\n</virtual-mta>\n\
         <virtual-mta va>\n smtp-source-host 127.0.0.41 va.example.com\n</virtual-mta>\n\
         <virtual-mta vb>\n smtp-source-host 127.0.0.41 vb.example.com\n</virtual-mta>\n\
         <virtual-mta-pool shared>\n virtual-mta va\n virtual-mta vb\n</virtual-mta-pool>\n\
         <virtual-mta vw>\n smtp-source-host 127.0.0.42 vw.example.com\n</virtual-mta>\n\
         <virtual-mta vm>\n smtp-source-host 127.0.0.43 vm.example.com\n max-smtp-out 1\n</virtual-mta>\n\
         <virtual-mta-pool pool>\n virtual-mta v1\n</virtual-mta-pool>\n{SOURCE}\
         <domain *>\n retry-after 1h\n</domain>\n\
         <domain cr.test>\n route [127.0.0.1]:{p1}\n max-msg-per-connection 1\n max-connect-rate 3/2s\n</domain>\n\
         <domain sicr.test>\n route [127.0.0.1]:{p2}\n max-msg-per-connection 1\n source-ip-max-connect-rate 2/2s\n</domain>\n\
         <domain warm.test>\n route [127.0.0.1]:{p3}\n max-cold-virtual-mta-msg 4/3s\n</domain>\n\
         <domain warm2.test>\n route [127.0.0.1]:{p3}\n max-cold-virtual-mta-msg 4/3s\n</domain>\n\
         <domain vm1.test>\n route [127.0.0.1]:{p4}\n</domain>\n\
         <domain vm2.test>\n route [127.0.0.1]:{p4}\n</domain>\n"
    );
    let mut c = Cluster::start(1, &policy, "");
    let mut sinks = Vec::new();
    for (p, lat) in [(p1, "0"), (p2, "0"), (p3, "0"), (p4, "300")] {
        sinks.push(
            c.start_sink_at(
                format!("127.0.0.1:{p}").parse().unwrap(),
                &["--latency-ms", lat],
            )
            .1,
        );
    }
    let (smtp, _) = c.start_ingress();
    let send = |to: &str, vmta: &str| {
        let body = format!("X-Virtual-MTA: {vmta}\nSubject: b\n\nx");
        assert!(smtp_send(smtp, "s@example.com", &[to], &body).starts_with("250"));
    };
    for n in 0..12 {
        send(&format!("c{n}@cr.test"), "v1");
        send(&format!("s{n}@sicr.test"), "shared");
        send(&format!("w{n}@warm.test"), "vw");
        send(&format!("x{n}@warm2.test"), "vw");
        send(&format!("m{n}@vm1.test"), "vm");
        send(&format!("n{n}@vm2.test"), "vm");
    }
    c.start_worker(
        "w1",
        &["127.0.0.1", "127.0.0.41", "127.0.0.42", "127.0.0.43"],
        "",
    );
    // Watch long enough for each budget to have been reached several times.
    let mut st: Vec<serde_json::Value> = Vec::new();
    let ok = wait_until(Duration::from_secs(60), || {
        st = sinks.iter().map(|p| sink_stats(p)).collect();
        st[0]["messages"].as_u64() >= Some(9)
            && st[1]["messages"].as_u64() >= Some(7)
            && st[2]["messages"].as_u64() >= Some(13)
            && st[3]["messages"].as_u64() >= Some(24)
    });
    if !ok {
        c.dump_logs();
    }
    assert!(ok, "{st:?}");
    // The harness's own probe is the first connection to each sink.
    let after_probe = |t: Vec<u64>| t[1..].to_vec();
    let cr = max_in_window(&after_probe(listener_times(&st[0], p1)), 2000);
    assert!(
        cr <= 3,
        "max-connect-rate 3/2s: {cr} connections in a window"
    );
    let sicr = max_in_window(&after_probe(listener_times(&st[1], p2)), 2000);
    assert!(
        sicr <= 2,
        "source-ip-max-connect-rate 2/2s across two VMTAs: {sicr}"
    );
    let mut warm = arrivals(&st[2], "warm.test");
    warm.extend(arrivals(&st[2], "warm2.test"));
    let w = max_in_window(&warm, 3000);
    assert!(
        w <= 4,
        "max-cold-virtual-mta-msg 4/3s across two queues: {w}"
    );
    let vm = st[3]["listeners"][format!("127.0.0.1:{p4}")]["max_concurrent"]
        .as_u64()
        .unwrap();
    assert_eq!(vm, 1, "the VMTA's max-smtp-out 1 across two queues");
}

#[test]
fn total_max_smtp_out_and_queue_priority() {
    let port = free_port();
    let policy = format!(
        "total-max-smtp-out 1\n\
         <virtual-mta v1>\n smtp-source-host 127.0.0.1 v1.example.com\n</virtual-mta>\n\
         <virtual-mta-pool pool>\n virtual-mta v1\n</virtual-mta-pool>\n{SOURCE}\
         <domain *>\n route [127.0.0.1]:{port}\n max-msg-per-connection 1\n retry-after 1h\n</domain>\n\
         <domain hi.test>\n queue-priority 90\n</domain>\n\
         <domain lo.test>\n queue-priority 10\n</domain>\n"
    );
    let mut c = Cluster::start(1, &policy, "");
    let (_, stats, _) = c.start_sink_at(
        format!("127.0.0.1:{port}").parse().unwrap(),
        &["--latency-ms", "100"],
    );
    op(&c, &["pause", "*"]);
    let (smtp, _) = c.start_ingress();
    // The low-priority queue's mail is older.
    for n in 0..5 {
        assert!(
            smtp_send(
                smtp,
                "s@example.com",
                &[&format!("l{n}@lo.test")],
                "Subject: l\n\nx"
            )
            .starts_with("250")
        );
    }
    for n in 0..5 {
        assert!(
            smtp_send(
                smtp,
                "s@example.com",
                &[&format!("h{n}@hi.test")],
                "Subject: h\n\nx"
            )
            .starts_with("250")
        );
    }
    c.start_worker("w1", &["127.0.0.1"], "");
    op(&c, &["resume", "*"]);
    let mut st = serde_json::json!({});
    assert!(wait_until(Duration::from_secs(60), || {
        st = sink_stats(&stats);
        st["messages"] == 10
    }));
    assert_eq!(st["max_concurrent"], 1, "total-max-smtp-out 1: {st}");
    let hi = arrivals(&st, "hi.test");
    let lo = arrivals(&st, "lo.test");
    assert!(
        hi.last() < lo.first(),
        "queue-priority: the higher queue goes first ({hi:?} / {lo:?})"
    );
}

#[test]
fn backoff_mode_uses_its_own_limits_and_ends_on_time() {
    let port = free_port();
    let policy = format!(
        "<virtual-mta v1>\n smtp-source-host 127.0.0.1 v1.example.com\n</virtual-mta>\n\
         <virtual-mta-pool pool>\n virtual-mta v1\n</virtual-mta-pool>\n{SOURCE}\
         <smtp-pattern-list grey>\n reply /greylisted/ mode=backoff\n</smtp-pattern-list>\n\
         <domain *>\n route [127.0.0.1]:{port}\n retry-after 1h\n smtp-pattern-list grey\n \
         max-smtp-out 5\n max-msg-per-connection 2\n backoff-max-smtp-out 1\n \
         backoff-max-msg-rate 3/2s\n backoff-retry-after 5m\n backoff-to-normal-after 30m\n</domain>\n"
    );
    let mut c = Cluster::start(
        1,
        &policy,
        "[scheduler]\nretry_jitter = 0.0\nallow_clock_control = true\n",
    );
    let (_, stats, _) = c.start_sink_at(
        format!("127.0.0.1:{port}").parse().unwrap(),
        &[
            "--latency-ms",
            "200",
            "--reply",
            "hold@bo.test=451 4.3.0 busy",
        ],
    );
    let (smtp, _) = c.start_ingress();
    c.start_worker("w1", &["127.0.0.1"], "");
    let addr = c.addrs[0].clone();
    let mode = |c: &Cluster| -> String {
        c.queues()
            .as_array()
            .and_then(|a| a.iter().find(|q| q["queue"] == "bo.test").cloned())
            .map(|q| q["mode"].as_str().unwrap_or("").to_string())
            .unwrap_or_default()
    };
    assert!(
        smtp_send(
            smtp,
            "s@example.com",
            &["tempfail@bo.test"],
            "Subject: t\n\nx"
        )
        .starts_with("250")
    );
    assert!(
        wait_until(Duration::from_secs(20), || mode(&c) == "backoff"),
        "{}",
        c.queues()
    );
    for n in 0..12 {
        assert!(
            smtp_send(
                smtp,
                "s@example.com",
                &[&format!("ok{n}@bo.test")],
                "Subject: o\n\nx"
            )
            .starts_with("250")
        );
    }
    let mut st = serde_json::json!({});
    assert!(wait_until(Duration::from_secs(60), || {
        st = sink_stats(&stats);
        st["messages"] == 12
    }));
    // backoff-max-smtp-out 1 (not 5) and backoff-max-msg-rate 3/2s.
    let conns = st["queues"]["127.0.0.1 bo.test"]["max_concurrent"]
        .as_u64()
        .unwrap();
    assert_eq!(conns, 1, "{st}");
    let worst = max_in_window(&arrivals(&st, "bo.test"), 2000);
    assert!(worst <= 3, "backoff-max-msg-rate 3/2s: {worst}");
    // backoff-retry-after 5m (not 1h): a recipient that fails in backoff mode is tried again
    // five minutes later.
    let temp_failures = || sink_stats(&stats)["temp_failures"].as_u64().unwrap_or(0);
    let before = temp_failures();
    assert!(
        smtp_send(smtp, "s@example.com", &["hold@bo.test"], "Subject: h\n\nx").starts_with("250")
    );
    assert!(wait_until(Duration::from_secs(20), || temp_failures() > before));
    let (ok, _, _) = c.cli(&["delete", "--rcpt", "tempfail@bo.test", "-c", &addr]);
    assert!(ok);
    let before = temp_failures();
    let (ok, _, err) = c.cli(&["debug", "advance-clock", "6m", "-c", &addr]);
    assert!(ok, "{err}");
    assert!(wait_until(Duration::from_secs(20), || temp_failures() > before));
    assert_eq!(mode(&c), "backoff");
    // backoff-to-normal-after 30m: with hold@ still queued (its reply matches no pattern),
    // the queue is back to normal once the time is up.
    let (ok, _, err) = c.cli(&["debug", "advance-clock", "25m", "-c", &addr]);
    assert!(ok, "{err}");
    assert!(
        wait_until(Duration::from_secs(20), || mode(&c) == "normal"),
        "{}",
        c.queues()
    );
}

#[test]
fn top_level_retry_and_bounce_after_are_the_defaults() {
    let port = free_port();
    let policy = format!(
        "retry-after 20m\nbounce-after 1h\n\
         <virtual-mta v1>\n smtp-source-host 127.0.0.1 v1.example.com\n</virtual-mta>\n\
         <virtual-mta-pool pool>\n virtual-mta v1\n</virtual-mta-pool>\n{SOURCE}\
         <domain *>\n route [127.0.0.1]:{port}\n</domain>\n\
         <acct-file acct.csv>\n records t,b\n record-fields t type,rcpt\n record-fields b type,rcpt,bounceCat\n</acct-file>\n"
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
            &["tempfail@top.test"],
            "Subject: t\n\nx"
        )
        .starts_with("250")
    );
    let count = |k: &str| rows(&acct_file(&c, 0)).iter().filter(|r| r[0] == k).count();
    assert!(wait_until(Duration::from_secs(20), || count("t") == 1));
    let advance = |by: &str| {
        let (ok, _, err) = c.cli(&["debug", "advance-clock", by, "-c", &addr]);
        assert!(ok, "{err}");
    };
    advance("21m");
    assert!(
        wait_until(Duration::from_secs(20), || count("t") == 2),
        "{}",
        acct_file(&c, 0)
    );
    advance("45m");
    assert!(
        wait_until(Duration::from_secs(20), || count("b") == 1),
        "{}",
        acct_file(&c, 0)
    );
    let b = rows(&acct_file(&c, 0))
        .into_iter()
        .find(|r| r[0] == "b")
        .unwrap();
    assert_eq!(b[2], "message-expired");
}

/// One worker with 20 slots, a tarpit destination that answers each final dot after two minutes,
/// and a fast one: the fast destination's mail is all delivered while the tarpit still holds
/// every connection it was given, whether its `max-smtp-out` is below the worker's capacity
/// (it holds that many) or above it (it holds at most three quarters of the slots: a quarter
/// is kept for destinations not active yet).
#[test]
fn a_tarpit_destination_does_not_starve_a_fast_one_on_the_same_worker() {
    for (tarpit_max, expect_held) in [(5u64, 5u64), (40, 15)] {
        let fast_port = free_port();
        let tarpit_port = free_port();
        let policy = format!(
            "<virtual-mta v1>\n smtp-source-host 127.0.0.1 v1.example.com\n</virtual-mta>\n\
             <virtual-mta-pool pool>\n virtual-mta v1\n</virtual-mta-pool>\n{SOURCE}\
             <domain tarpit.test>\n route [127.0.0.1]:{tarpit_port}\n max-smtp-out {tarpit_max}\n \
             max-msg-per-connection 1\n</domain>\n\
             <domain fast.test>\n route [127.0.0.1]:{fast_port}\n max-smtp-out 20\n</domain>\n"
        );
        let mut c = Cluster::start(1, &policy, "");
        let (_, fast_stats, _) =
            c.start_sink_at(format!("127.0.0.1:{fast_port}").parse().unwrap(), &[]);
        let (tarpit, tarpit_stats, _) = c.start_sink_at(
            format!("127.0.0.1:{tarpit_port}").parse().unwrap(),
            &["--latency-ms", "120000"],
        );
        let (smtp, _) = c.start_ingress();
        for n in 0..60 {
            let r = smtp_send(
                smtp,
                "s@example.com",
                &[&format!("t{n}@tarpit.test")],
                "Subject: t\n\nx",
            );
            assert!(r.starts_with("250"), "{r}");
        }
        c.start_worker("w1", &["127.0.0.1"], "capacity = 20\n");
        let held = |st: &serde_json::Value| {
            st["listeners"][tarpit.to_string()]["max_concurrent"]
                .as_u64()
                .unwrap_or(0)
        };
        assert!(
            wait_until(Duration::from_secs(30), || held(&sink_stats(&tarpit_stats))
                >= expect_held),
            "the tarpit never held {expect_held} connections: {}",
            sink_stats(&tarpit_stats)
        );
        // What an operator sees: the tarpit holds its connections, with more mail waiting for
        // connections when its max-smtp-out is above what it was given.
        let tarpit_row = || {
            c.queues()
                .as_array()
                .into_iter()
                .flatten()
                .find(|q| q["queue"] == "tarpit.test")
                .cloned()
                .unwrap_or_default()
        };
        let row = tarpit_row();
        println!("show queues, tarpit: {row}");
        assert_eq!(row["connections"].as_u64(), Some(expect_held), "{row}");
        assert_eq!(
            row["waiting"].as_u64(),
            Some((tarpit_max - expect_held).min(60 - expect_held)),
            "{row}"
        );
        let began = std::time::Instant::now();
        for n in 0..200 {
            let r = smtp_send(
                smtp,
                "s@example.com",
                &[&format!("f{n}@fast.test")],
                "Subject: f\n\nx",
            );
            assert!(r.starts_with("250"), "{r}");
        }
        let delivered = wait_until(Duration::from_secs(90), || {
            arrivals(&sink_stats(&fast_stats), "fast.test").len() >= 200
        });
        let tarpit_st = sink_stats(&tarpit_stats);
        println!(
            "tarpit max-smtp-out {tarpit_max}: it held {} connections; 200 fast messages \
             delivered in {:?} meanwhile; tarpit messages answered so far: {}",
            held(&tarpit_st),
            began.elapsed(),
            arrivals(&tarpit_st, "tarpit.test").len()
        );
        assert!(
            delivered,
            "the fast destination starved: {}",
            sink_stats(&fast_stats)
        );
        assert_eq!(
            arrivals(&tarpit_st, "tarpit.test").len(),
            0,
            "the fast mail went only once the tarpit let go"
        );
        assert_eq!(
            held(&tarpit_st),
            expect_held,
            "the tarpit held more than its max-smtp-out or three quarters of the slots"
        );
    }
}
