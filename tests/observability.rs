//! What operators look at: every role's Prometheus metrics after real traffic, parsed by the
//! Prometheus project's own Python client.

mod harness;

use std::path::Path;
use std::time::Duration;

use harness::*;
use serde_json::Value;

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
         <domain *>\n retry-after 1h\n</domain>\n\
         <domain metrics.test>\n smtp-hosts [127.0.0.1]:{sink_port}\n</domain>\n\
         <acct-file acct.csv>\n records d,b,t\n</acct-file>\n\
         <source 127.0.0.1>\n always-allow-relaying yes\n default-virtual-mta v1\n</source>\n"
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
            vec![("queue", "metrics.test/v1"), ("outcome", "delivered")],
            6.0,
        ),
        (
            0,
            "sluice_queue_outcomes_total",
            vec![("queue", "metrics.test/v1"), ("outcome", "bounced")],
            1.0,
        ),
        (
            0,
            "sluice_queue_outcomes_total",
            vec![("queue", "metrics.test/v1"), ("outcome", "deferred")],
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
