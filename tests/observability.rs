//! What operators look at: every role's Prometheus metrics after real traffic, parsed by the
//! Prometheus project's own Python client.

use crate::harness;

use std::path::Path;
use std::time::Duration;

use crate::harness::*;
use serde_json::{Value, json};

/// (role's URL index, sample name, labels it must have, the value expected).
type Expect<'a> = (usize, &'a str, Vec<(&'a str, &'a str)>, f64);

fn acct_rows(c: &Cluster) -> usize {
    std::fs::read_to_string(c.path().join("controller-1/acct.csv"))
        .map(|t| t.lines().skip(1).count())
        .unwrap_or(0)
}

#[test]
fn every_role_serves_metrics_that_count_the_traffic() {
    let base = free_ports(4);
    let m = |i: u16| format!("127.0.0.1:{}", base + i);
    let sink_port = base + 3;
    let policy = format!(
        "<virtual-mta v1>\n smtp-source-host 127.0.0.1 v1.example.com\n</virtual-mta>\n\
         <virtual-mta-pool p>\n virtual-mta v1\n</virtual-mta-pool>\n\
         <domain *>\n retry-after 1h\n</domain>\n\
         <domain metrics.test>\n smtp-hosts [127.0.0.1]:{sink_port}\n</domain>\n\
         <acct-file acct.csv>\n records d,b,t\n</acct-file>\n\
         <source 127.0.0.1>\n always-allow-relaying yes\n default-virtual-mta p\n</source>\n"
    );
    let mut c = Cluster::start(1, &policy, &format!("[metrics]\nlisten = \"{}\"\n", m(0)));
    c.start_sink_at(format!("127.0.0.1:{sink_port}").parse().unwrap(), &[]);
    c.start_worker(
        "w1",
        &["127.0.0.1"],
        &format!("[metrics]\nlisten = \"{}\"\n", m(2)),
    );
    let (smtp, _) = c.start_ingress_with(&format!("[metrics]\nlisten = \"{}\"\n", m(1)));
    for i in 0..3 {
        let r = smtp_send(
            smtp,
            "s@example.com",
            &["a@metrics.test", "b@metrics.test"],
            &format!("Subject: m{i}\n\nbody"),
        );
        assert!(r.starts_with("250"), "{r}");
    }
    for to in ["permfail@metrics.test", "tempfail@metrics.test"] {
        let r = smtp_send(smtp, "s@example.com", &[to], "Subject: f\n\nbody");
        assert!(r.starts_with("250"), "{r}");
    }
    // 6 delivered, 1 bounced, 1 deferred.
    let done = wait_until(Duration::from_secs(30), || acct_rows(&c) >= 8);
    if !done {
        c.dump_logs();
    }
    assert!(done, "not every recipient has an outcome");

    let urls: Vec<String> = (0..3).map(|i| format!("http://{}/metrics", m(i))).collect();
    let expected: Vec<Expect> = vec![
        // ingress
        (1, "sluice_ingress_messages_accepted_total", vec![], 5.0),
        (1, "sluice_ingress_recipients_accepted_total", vec![], 8.0),
        (1, "sluice_ingress_enqueue_seconds_count", vec![], 5.0),
        // controller: per queue and VMTA, from the replicated accounting rows
        (
            0,
            "sluice_queue_outcomes_total",
            vec![("queue", "metrics.test/p"), ("outcome", "delivered")],
            6.0,
        ),
        (
            0,
            "sluice_queue_outcomes_total",
            vec![("queue", "metrics.test/p"), ("outcome", "bounced")],
            1.0,
        ),
        (
            0,
            "sluice_queue_outcomes_total",
            vec![("queue", "metrics.test/p"), ("outcome", "deferred")],
            1.0,
        ),
        (
            0,
            "sluice_vmta_outcomes_total",
            vec![("vmta", "v1"), ("outcome", "delivered")],
            6.0,
        ),
        (0, "sluice_raft_is_leader", vec![], 1.0),
        (0, "sluice_queue_recipients", vec![], 1.0),
        (0, "sluice_queue_messages", vec![], 1.0),
        (0, "sluice_raft_entry_messages_sum", vec![], 5.0),
        // worker: what the receiver said, per source IP
        (
            2,
            "sluice_worker_recipients_total",
            vec![("source_ip", "127.0.0.1"), ("outcome", "accepted")],
            6.0,
        ),
        (
            2,
            "sluice_worker_recipients_total",
            vec![("source_ip", "127.0.0.1"), ("outcome", "rejected")],
            1.0,
        ),
        (
            2,
            "sluice_worker_recipients_total",
            vec![("source_ip", "127.0.0.1"), ("outcome", "deferred")],
            1.0,
        ),
        // the three messages with an accepted recipient reached the final dot
        (2, "sluice_worker_delivery_seconds_count", vec![], 3.0),
    ];
    let mut last = Value::Null;
    let mut wrong = Vec::new();
    let settled = wait_until(Duration::from_secs(20), || {
        let v = match scrape_metrics(&urls) {
            Ok(v) => v,
            Err(e) => {
                wrong = vec![e];
                return false;
            }
        };
        wrong = expected
            .iter()
            .filter_map(|(i, name, labels, want)| {
                let got = metric_value(&v[&urls[*i]], name, labels);
                (got != *want).then(|| format!("{name}{labels:?} = {got}, want {want}"))
            })
            .collect();
        last = v;
        wrong.is_empty()
    });
    assert!(settled, "{wrong:#?}\n{last:#}");
    // The parser accepted every page (scrape fails otherwise); more that must have moved.
    let at = |i: usize| &last[&urls[i]];
    assert!(metric_value(at(1), "sluice_ingress_connections_total", &[]) >= 5.0);
    assert!(metric_value(at(1), "sluice_ingress_replies_total", &[("class", "2xx")]) >= 5.0 * 5.0);
    assert!(metric_value(at(1), "sluice_ingress_bytes_received_total", &[]) > 5.0 * 20.0);
    assert!(metric_value(at(0), "sluice_leases_granted_total", &[]) >= 1.0);
    assert!(metric_value(at(0), "sluice_raft_term", &[]) >= 1.0);
    let applied = metric_value(at(0), "sluice_raft_applied_index", &[]);
    assert!(applied >= 1.0 && metric_value(at(0), "sluice_raft_commit_index", &[]) >= applied);
    assert!(
        metric_value(
            at(2),
            "sluice_worker_connections_total",
            &[("outcome", "ok")]
        ) >= 1.0
    );
    assert!(metric_value(at(2), "sluice_worker_replies_total", &[("class", "5xx")]) >= 1.0);
    assert!(metric_value(at(2), "sluice_worker_replies_total", &[("class", "4xx")]) >= 1.0);

    // The Grafana dashboard queries only metrics that exist.
    let names: Vec<&str> = last["families"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let list = c.path().join("metric-names.txt");
    std::fs::write(&list, names.join("\n")).unwrap();
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana");
    let (ok, out, err) = tool(
        "/usr/bin/python3",
        &[
            deploy.join("check_dashboard.py").to_str().unwrap(),
            deploy.join("sluice-dashboard.json").to_str().unwrap(),
            list.to_str().unwrap(),
        ],
    );
    assert!(ok, "{out}{err}");
}

/// Outcomes are counted from the replicated accounting rows, so the three controllers of a
/// cluster (the leader and two followers) report the same figures.
#[test]
fn every_controller_reports_the_same_outcomes() {
    let base = free_ports(4);
    let sink_port = base + 3;
    let policy = format!(
        "<virtual-mta v1>\n smtp-source-host 127.0.0.1 v1.example.com\n</virtual-mta>\n\
         <domain *>\n retry-after 1h\n smtp-hosts [127.0.0.1]:{sink_port}\n</domain>\n\
         <acct-file acct.csv>\n records d,b,t\n</acct-file>\n\
         <source 127.0.0.1>\n always-allow-relaying yes\n default-virtual-mta v1\n</source>\n"
    );
    let node_extra: Vec<String> = (0..3)
        .map(|i| format!("[metrics]\nlisten = \"127.0.0.1:{}\"\n", base + i))
        .collect();
    let mut c = Cluster::start_nodes(3, &policy, "", &node_extra, |_| Vec::new());
    c.start_sink_at(format!("127.0.0.1:{sink_port}").parse().unwrap(), &[]);
    c.start_worker("w1", &["127.0.0.1"], "");
    let (smtp, _) = c.start_ingress();
    let rcpts = [
        "a@one.test",
        "b@two.test",
        "permfail@two.test",
        "tempfail@one.test",
    ];
    for i in 0..5 {
        let r = smtp_send(
            smtp,
            "s@example.com",
            &rcpts,
            &format!("Subject: {i}\n\nbody"),
        );
        assert!(r.starts_with("250"), "{r}");
    }
    let want = [
        ("one.test/v1", "delivered", 5.0),
        ("one.test/v1", "deferred", 5.0),
        ("two.test/v1", "delivered", 5.0),
        ("two.test/v1", "bounced", 5.0),
    ];
    let urls: Vec<String> = (0..3)
        .map(|i| format!("http://127.0.0.1:{}/metrics", base + i))
        .collect();
    let mut last = Value::Null;
    let mut wrong = Vec::new();
    let same = wait_until(Duration::from_secs(30), || {
        let Ok(v) = scrape_metrics(&urls) else {
            return false;
        };
        wrong.clear();
        for u in &urls {
            for (q, o, n) in want {
                let got = metric_value(
                    &v[u],
                    "sluice_queue_outcomes_total",
                    &[("queue", q), ("outcome", o)],
                );
                if got != n {
                    wrong.push(format!("{u}: {q} {o} = {got}, want {n}"));
                }
            }
        }
        last = v;
        wrong.is_empty()
    });
    if !same {
        c.dump_logs();
    }
    assert!(same, "{wrong:#?}");
    let leaders: f64 = urls
        .iter()
        .map(|u| metric_value(&last[u], "sluice_raft_is_leader", &[]))
        .sum();
    assert_eq!(leaders, 1.0, "exactly one controller says it leads");
    // The leader reports both followers' lag.
    let lagging = urls
        .iter()
        .find(|u| metric_value(&last[*u], "sluice_raft_is_leader", &[]) == 1.0)
        .map(|u| {
            last[u]
                .as_array()
                .unwrap()
                .iter()
                .filter(|s| s["name"] == "sluice_raft_follower_lag_entries")
                .count()
        });
    assert_eq!(lagging, Some(2));
}

fn json_of(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// The `pmta`-style commands against a running cluster: the views agree with the traffic that
/// was sent, and the actions act (a disabled source IP sends nothing until it is enabled).
#[test]
fn operator_views_and_actions() {
    let sink_port = free_port();
    let policy = format!(
        "<virtual-mta v1>\n smtp-source-host 127.0.0.1 v1.example.com\n</virtual-mta>\n\
         <virtual-mta v2>\n smtp-source-host 127.0.0.2 v2.example.com\n</virtual-mta>\n\
         <domain *>\n retry-after 1h\n smtp-hosts [127.0.0.1]:{sink_port}\n</domain>\n\
         <domain one.test>\n max-smtp-out 3\n</domain>\n\
         <source 127.0.0.1>\n always-allow-relaying yes\n default-virtual-mta v1\n process-x-job yes\n</source>\n"
    );
    let mut c = Cluster::start(1, &policy, "");
    c.start_sink_at(format!("127.0.0.1:{sink_port}").parse().unwrap(), &[]);
    c.start_worker("w1", &["127.0.0.1"], "");
    let (smtp, _) = c.start_ingress();
    let at = c.addrs[0].clone();
    let cli = |args: &[&str]| {
        let mut a = args.to_vec();
        a.extend(["-c", at.as_str()]);
        let (ok, out, err) = c.cli(&a);
        assert!(ok, "sluice {args:?}: {err}");
        out
    };
    let r = smtp_send(
        smtp,
        "s@example.com",
        &["a@one.test", "tempfail@one.test", "b@two.test"],
        "X-Job: job-a\nSubject: views\n\nbody",
    );
    assert!(r.starts_with("250"), "{r}");
    let id = r.rsplit(' ').next().unwrap().trim().to_string();
    let settled = wait_until(Duration::from_secs(30), || {
        let s = json_of(&cli(&["show", "status", "--json"]));
        s["traffic"]["last_hour"]["delivered"] == 2 && s["traffic"]["last_hour"]["deferred"] == 1
    });
    assert!(settled, "{}", cli(&["show", "status", "--json"]));
    let status = json_of(&cli(&["show", "status", "--json"]));
    assert_eq!(status["traffic"]["last_hour"]["received"], 3, "{status}");
    assert_eq!(status["traffic"]["last_minute"]["received"], 3, "{status}");

    // Domains and top domains: one.test holds the deferred recipient.
    let top = json_of(&cli(&["show", "topdomains", "--json", "-n", "1"]));
    assert_eq!(top.as_array().unwrap().len(), 1, "{top}");
    assert_eq!(top[0]["domain"], "one.test", "{top}");
    assert_eq!(top[0]["recipients"], 1, "{top}");
    assert_eq!(top[0]["last_hour"]["delivered"], 1, "{top}");
    assert_eq!(top[0]["last_hour"]["deferred"], 1, "{top}");
    // VMTAs: v1 sent both; v2's IP has no worker.
    let vmtas = json_of(&cli(&["show", "vmtas", "--json"]));
    let v = |n: &str| {
        vmtas
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == n)
            .unwrap()
            .clone()
    };
    assert_eq!(v("v1")["state"], "enabled", "{vmtas}");
    assert_eq!(v("v1")["last_hour"]["delivered"], 2, "{vmtas}");
    assert_eq!(v("v1")["recipients"], 1, "{vmtas}");
    assert_eq!(v("v2")["state"], "no worker", "{vmtas}");
    // Workers: w1, live, on the policy version the leader serves.
    let workers = json_of(&cli(&["show", "workers", "--json"]));
    assert_eq!(workers[0]["name"], "w1", "{workers}");
    assert_eq!(workers[0]["live"], true, "{workers}");
    assert_eq!(workers[0]["source_ips"][0], "127.0.0.1", "{workers}");
    assert_eq!(
        workers[0]["policy_version"], status["policy_version_hex"],
        "{workers}"
    );
    // Jobs.
    let jobs = json_of(&cli(&["show", "jobs", "--json"]));
    let job = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["job_id"] == "job-a")
        .unwrap();
    assert_eq!(job["queued_recipients"], 1, "{jobs}");
    assert_eq!(job["last_hour"]["delivered"], 2, "{jobs}");

    // Settings with the line each comes from (the harness puts one line before the policy).
    // Lines of the file the controllers read (the harness puts its own lines first).
    let written = std::fs::read_to_string(c.path().join("policy.conf")).unwrap();
    let line_of = |needle: &str| written.lines().position(|l| l.contains(needle)).unwrap() + 1;
    let s = json_of(&cli(&[
        "show", "settings", "one.test", "--vmta", "v1", "--json",
    ]));
    let d = |n: &str| {
        s["directives"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == n)
            .unwrap()
            .clone()
    };
    assert_eq!(d("max-smtp-out")["value"], "3", "{s}");
    assert!(
        d("max-smtp-out")["source"]
            .as_str()
            .unwrap()
            .ends_with(&format!("policy.conf:{}", line_of("max-smtp-out 3"))),
        "{s}"
    );
    assert!(
        d("retry-after")["source"]
            .as_str()
            .unwrap()
            .ends_with(&format!("policy.conf:{}", line_of("retry-after 1h"))),
        "{s}"
    );
    assert_eq!(d("connect-timeout")["source"], "default", "{s}");
    let (ok, _, err) = c.cli(&["show", "settings", "one.test", "--vmta", "nope", "-c", &at]);
    assert!(!ok && err.contains("`nope` is not a virtual-mta"), "{err}");

    // Trace and inspect the message.
    let trace = json_of(&cli(&["trace", &id, "--json"]));
    assert_eq!(trace["truncated"], false);
    let trace = trace["events"].clone();
    let kinds: Vec<(String, String)> = trace
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap().to_string(),
                e["recipient"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for want in [
        ("r", "tempfail@one.test"),
        ("t", "tempfail@one.test"),
        ("d", "a@one.test"),
        ("now", "tempfail@one.test"),
    ] {
        assert!(
            kinds.iter().any(|(k, r)| k == want.0 && r == want.1),
            "{want:?} not in {trace:#}"
        );
    }
    let t_row = trace
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "t")
        .unwrap();
    assert!(t_row["detail"].as_str().unwrap().contains("451"), "{t_row}");
    let by_rcpt = json_of(&cli(&["trace", "--rcpt", "b@two.test", "--json"]))["events"].clone();
    assert!(
        by_rcpt
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["recipient"] == "b@two.test"),
        "{by_rcpt}"
    );
    assert!(
        by_rcpt.as_array().unwrap().iter().any(|e| e["kind"] == "d"),
        "{by_rcpt}"
    );
    let m = json_of(&cli(&["inspect", &id, "--json"]));
    assert_eq!(m["mail_from"], "s@example.com", "{m}");
    assert_eq!(m["job_id"], "job-a", "{m}");
    assert!(
        m["headers"].as_str().unwrap().contains("Subject: views"),
        "{m}"
    );
    let rc = |a: &str| {
        m["recipients"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["address"] == a)
            .unwrap()
            .clone()
    };
    assert_eq!(rc("tempfail@one.test")["state"], "queued", "{m}");
    assert_eq!(rc("tempfail@one.test")["attempts"], 1, "{m}");
    assert_eq!(rc("a@one.test")["state"], "delivered", "{m}");
    let (ok, _, err) = c.cli(&["inspect", "00000000deadbeef", "-c", &at]);
    assert!(!ok && err.contains("no message"), "{err}");

    // Explain, from the cluster and from the file: the same steps.
    let args = [
        "explain",
        "x@one.test",
        "--from",
        "s@example.com",
        "--source",
        "127.0.0.1",
        "--json",
    ];
    let e = json_of(&cli(&args));
    let steps: Vec<String> = e["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            format!(
                "{}: {} [{}]",
                s["question"].as_str().unwrap(),
                s["answer"].as_str().unwrap(),
                s["source"].as_str().unwrap()
            )
        })
        .collect();
    for want in [
        format!(
            "source rule: <source 127.0.0.1/32> matches 127.0.0.1 [{}",
            c.path().join("policy.conf").display()
        ),
        "relaying: allowed".to_string(),
        "virtual MTA: v1, from 127.0.0.1".to_string(),
        "queue: one.test/v1".to_string(),
        format!("delivered to: smtp-hosts [127.0.0.1]:{sink_port}"),
    ] {
        assert!(
            steps.iter().any(|s| s.starts_with(&want)),
            "no `{want}` in {steps:#?}"
        );
    }
    let policy_file = c.path().join("policy.conf");
    let mut offline = args.to_vec();
    offline.extend(["--policy", policy_file.to_str().unwrap()]);
    let (ok, out, err) = harness::run(&offline);
    assert!(ok, "{err}");
    assert_eq!(
        json_of(&out)["steps"],
        e["steps"],
        "the file and the cluster disagree"
    );

    // Backoff by hand, and back.
    cli(&["set", "queue", "one.test/v1", "--mode", "backoff"]);
    let mode = || {
        json_of(&cli(&["show", "queues", "--json"]))
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["queue"] == "one.test")
            .map(|q| q["mode"].as_str().unwrap().to_string())
    };
    assert_eq!(mode().as_deref(), Some("backoff"));
    cli(&["set", "queue", "one.test/*", "--mode", "normal"]);
    assert_eq!(mode().as_deref(), Some("normal"));
    let (ok, _, err) = c.cli(&[
        "set",
        "queue",
        "none.test/v1",
        "--mode",
        "backoff",
        "-c",
        &at,
    ]);
    assert!(!ok && err.contains("no queue matches"), "{err}");

    // A disabled source IP sends nothing; enabled again, the mail goes.
    cli(&["disable", "source", "127.0.0.1"]);
    let vmtas = json_of(&cli(&["show", "vmtas", "--json"]));
    assert_eq!(
        vmtas
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "v1")
            .unwrap()["state"],
        "disabled"
    );
    let r = smtp_send(
        smtp,
        "s@example.com",
        &["c@three.test"],
        "Subject: held\n\nbody",
    );
    assert!(r.starts_with("250"), "{r}");
    let three = || {
        json_of(&cli(&["show", "queues", "--json"]))
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["queue"] == "three.test")
            .map(|q| q["recipients"].as_u64().unwrap())
    };
    // The scheduler looks every few hundred ms; give it several seconds to (wrongly) send.
    let sent_while_disabled = wait_until(Duration::from_secs(5), || three() != Some(1));
    assert!(!sent_while_disabled, "mail left from a disabled source IP");
    cli(&["enable", "source", "127.0.0.1"]);
    assert!(
        wait_until(Duration::from_secs(30), || three().is_none()),
        "mail stayed after the source IP was enabled"
    );
    let (ok, _, err) = c.cli(&["disable", "source", "not-an-ip", "-c", &at]);
    assert!(!ok && err.contains("not an IP address"), "{err}");
}

/// The cell `col` of the row whose `attr` is `key` in a page's DOM.
fn dom_cell(html: &str, attr: &str, key: &str, col: &str) -> Option<String> {
    let start = html.find(&format!("{attr}=\"{key}\""))?;
    let row = &html[start..start + html[start..].find("</tr>")?];
    let at = row.find(&format!("data-col=\"{col}\""))?;
    let after = &row[at..];
    let text = &after[after.find('>')? + 1..];
    // A pill holds its text in a span.
    let text = text
        .strip_prefix('<')
        .map_or(text, |t| &t[t.find('>').unwrap_or(0) + 1..]);
    Some(text[..text.find('<')?].to_string())
}

/// Headless Chromium (Debian's) with everything that could reach beyond loopback turned off.
fn chromium(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let profile = dir.join(format!("chromium-{}", free_port()));
    let profile_arg = format!("--user-data-dir={}", profile.display());
    let mut all = vec![
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-extensions",
        "--metrics-recording-only",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        &profile_arg,
    ];
    all.extend_from_slice(args);
    let (ok, out, err) = tool("chromium", &all);
    // Without a system bus Chromium logs D-Bus errors; keep the rest.
    let err: Vec<&str> = err.lines().filter(|l| !l.contains("dbus")).collect();
    (ok, out, err.join("\n"))
}

/// The monitor of a follower, loaded in a real browser, shows the leader's cluster-wide view:
/// the queues and counts the gRPC API reports, the workers only the leader knows, the members.
/// `http-access` decides who looks and who may pause.
#[test]
fn web_monitor_in_a_real_browser() {
    let base = free_ports(4);
    let sink_port = base + 3;
    let policy = format!(
        "http-access 127.0.0.1 monitor\nhttp-access 127.0.0.2 admin\nhttp-access 127.0.0.3 none\n\
         <virtual-mta v1>\n smtp-source-host 127.0.0.1 v1.example.com\n</virtual-mta>\n\
         <domain *>\n retry-after 1h\n smtp-hosts [127.0.0.1]:{sink_port}\n</domain>\n\
         <source 127.0.0.1>\n always-allow-relaying yes\n default-virtual-mta v1\n</source>\n"
    );
    let node_extra: Vec<String> = (0..3)
        .map(|i| format!("[metrics]\nlisten = \"127.0.0.1:{}\"\n", base + i))
        .collect();
    let mut c = Cluster::start_nodes(3, &policy, "", &node_extra, |_| Vec::new());
    // A receiver's reply is text the remote side chooses: it must stay text in the page.
    c.start_sink_at(
        format!("127.0.0.1:{sink_port}").parse().unwrap(),
        &[
            "--reply",
            "evil@three.test=451 4.7.1 <!--<script>alert(1)</script> & more",
        ],
    );
    c.start_worker("w1", &["127.0.0.1"], "");
    let (smtp, _) = c.start_ingress();
    for to in [
        &["a@one.test", "tempfail@one.test"][..],
        &["tempfail@two.test"],
        &["x.tempfail@two.test", "tempfail@two.test"],
        &["evil@three.test"],
    ] {
        let r = smtp_send(smtp, "s@example.com", to, "Subject: monitor\n\nbody");
        assert!(r.starts_with("250"), "{r}");
    }
    let leader = c.leader().expect("a leader");
    let at = c.addrs[leader].clone();
    let queues = || {
        let (ok, out, err) = c.cli(&["show", "queues", "--json", "-c", &at]);
        assert!(ok, "{err}");
        json_of(&out)
    };
    // one.test: 1 deferred; two.test: 2 deferred (the sink defers local part `tempfail` only).
    let settled = wait_until(Duration::from_secs(30), || {
        let q = queues();
        let n = |d: &str| {
            q.as_array()
                .unwrap()
                .iter()
                .find(|x| x["queue"] == d)
                .map(|x| x["recipients"].clone())
        };
        n("one.test") == Some(json!(1))
            && n("two.test") == Some(json!(2))
            && n("three.test") == Some(json!(1))
            && q.as_array().unwrap().iter().all(|x| x["last_error"] != "")
    });
    assert!(settled, "{}", queues());
    // The ingress reports the version it runs when it next polls (every 2 s).
    let status = || {
        let (ok, out, err) = c.cli(&["show", "status", "--json", "-c", &at]);
        assert!(ok, "{err}");
        json_of(&out)
    };
    let version = status()["policy_version_hex"].clone();
    assert!(
        wait_until(Duration::from_secs(20), || status()["peers"]
            .as_array()
            .unwrap()
            .iter()
            .any(
                |p| p["node"] == "ingress sluice-ingress" && p["policy_version_hex"] == version
            )),
        "{}",
        status()
    );
    let q = queues();
    let follower = (0..3).find(|&i| i != leader).unwrap();
    let url = format!("http://127.0.0.1:{}/", base + follower as u16);
    let (ok, html, err) = chromium(
        c.path(),
        &["--virtual-time-budget=4000", "--dump-dom", &url],
    );
    assert!(
        ok && html.contains("<table"),
        "chromium failed: {err}\n{html}"
    );
    for row in q.as_array().unwrap() {
        let key = format!(
            "{}/{}",
            row["queue"].as_str().unwrap(),
            row["vmta"].as_str().unwrap()
        );
        assert_eq!(
            dom_cell(&html, "data-queue", &key, "recipients"),
            Some(row["recipients"].to_string()),
            "queue {key} in the page:\n{html}"
        );
        assert_eq!(
            dom_cell(&html, "data-queue", &key, "mode").as_deref(),
            row["mode"].as_str()
        );
    }
    assert_eq!(
        dom_cell(&html, "data-domain", "two.test", "recipients").as_deref(),
        Some("2")
    );
    assert_eq!(
        dom_cell(&html, "data-worker", "w1", "live").as_deref(),
        Some("yes"),
        "{html}"
    );
    assert_eq!(
        dom_cell(&html, "data-ingress", "sluice-ingress", "policy").as_deref(),
        version.as_str(),
        "{html}"
    );
    assert_eq!(html.matches("data-node=").count(), 3, "{html}");
    assert_eq!(
        dom_cell(&html, "data-node", &(leader + 1).to_string(), "role").as_deref(),
        Some("leader")
    );
    assert_eq!(
        dom_cell(&html, "data-period", "last hour", "received").as_deref(),
        Some("6"),
        "{html}"
    );
    // The reply's markup is shown as text, and the page around it is whole.
    assert_eq!(
        dom_cell(&html, "data-queue", "three.test/v1", "last-error").as_deref(),
        Some("451 &lt;!--&lt;script&gt;alert(1)&lt;/script&gt; &amp; more"),
        "{html}"
    );
    assert!(
        html.contains("data-ingress="),
        "the page after the reply is cut:\n{html}"
    );
    // The page refreshed itself from /api/overview at least once.
    assert!(
        !html.contains("id=\"refreshed\">0<"),
        "the page never refreshed:\n{html}"
    );
    // A `monitor` address gets no buttons; nothing in the page comes from elsewhere.
    assert!(!html.contains("data-action"), "{html}");
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "{html}"
    );
    let (_, source, _) = tool("curl", &["-s", &url]);
    assert!(
        !source.contains(" src=") && !source.contains(" href="),
        "{source}"
    );
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("monitor.png");
    let shot_arg = format!("--screenshot={}", shot.display());
    let (ok, _, err) = chromium(
        c.path(),
        &[
            "--virtual-time-budget=4000",
            "--window-size=1280,1800",
            &shot_arg,
            &url,
        ],
    );
    assert!(
        ok && shot.metadata().map(|m| m.len() > 10_000).unwrap_or(false),
        "no screenshot: {err}"
    );
    eprintln!("screenshot of the monitor: {}", shot.display());

    // http-access: `none` sees nothing, `monitor` may not pause, `admin` may.
    let curl_from = |from: &str, args: &[&str]| {
        let mut a = vec![
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--interface",
            from,
        ];
        a.extend_from_slice(args);
        tool("curl", &a).1
    };
    assert_eq!(curl_from("127.0.0.3", &[&url]), "403");
    // Asked for under another name (DNS rebinding): refused; the page may not be framed and
    // runs only its own script.
    assert_eq!(
        curl_from("127.0.0.1", &["-H", "Host: rebound.example.com", &url]),
        "403"
    );
    let (_, head, _) = tool("curl", &["-s", "-D", "-", "-o", "/dev/null", &url]);
    let head = head.to_ascii_lowercase();
    assert!(head.contains("x-frame-options: deny"), "{head}");
    assert!(
        head.contains("content-security-policy: default-src 'none'; script-src 'nonce-"),
        "{head}"
    );
    let api = format!("{url}api/queue");
    let pause = [
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "-H",
        "x-sluice-monitor: 1",
        "-d",
        r#"{"queue":"two.test/v1","action":"pause"}"#,
        api.as_str(),
    ];
    assert_eq!(curl_from("127.0.0.1", &pause), "403");
    let no_header = [
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "-d",
        r#"{"queue":"two.test/v1","action":"pause"}"#,
        api.as_str(),
    ];
    assert_eq!(
        curl_from("127.0.0.2", &no_header),
        "403",
        "a form elsewhere must not act"
    );
    assert_eq!(curl_from("127.0.0.2", &pause), "200");
    let mode = |d: &str| {
        queues()
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["queue"] == d)
            .unwrap()["mode"]
            .clone()
    };
    assert_eq!(mode("two.test"), "paused");
    let resume: Vec<&str> = pause
        .iter()
        .map(|a| {
            if a.contains("pause") {
                r#"{"queue":"two.test/v1","action":"resume"}"#
            } else {
                a
            }
        })
        .collect();
    assert_eq!(curl_from("127.0.0.2", &resume), "200");
    assert_eq!(mode("two.test"), "normal");
}
