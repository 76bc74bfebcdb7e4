//! The replicated queue with real `sluice controller` processes, real RocksDB and real sockets:
//! leader kills, a follower catching up by snapshot, loss of majority, and a 1-node cluster.

mod harness;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness::*;
use sluice_proto::queue::queue_client::QueueClient;
use sluice_proto::queue::{EnqueueRequest, NewMessage, Recipient};

const POLICY: &str = "<virtual-mta v1>\nsmtp-source-host 127.0.0.1 v1.example.com\n</virtual-mta>\n<domain *>\nroute [127.0.0.1]:9\n</domain>\n";
/// Fast elections and frequent snapshots, so that the tests run in seconds.
const FAST: &str = "[raft]\nheartbeat_ms = 50\nelection_min_ms = 300\nelection_max_ms = 600\nsnapshot_after_entries = 40\nkeep_entries = 5\ncommit_timeout_ms = 2000\n";

fn message(tag: &str) -> NewMessage {
    NewMessage {
        mail_from: format!("{tag}@example.com"),
        recipients: vec![Recipient {
            address: "user@dest.test".into(),
            orcpt: String::new(),
            notify: 0,
        }],
        vmta: "v1".into(),
        body: format!("Subject: {tag}\r\n\r\nbody of {tag}\r\n")
            .into_bytes()
            .into(),
        ..Default::default()
    }
}

/// One enqueue of a tag, following the leader; Ok = acknowledged. The tag is sent again only
/// when the previous attempt surely queued nothing (no connection, or a follower's redirect);
/// after any other failure it may have been committed, so it is given up.
async fn enqueue_once(addrs: &[String], tag: &str, deadline: Duration) -> Result<String, String> {
    let end = Instant::now() + deadline;
    let mut target: Option<String> = None;
    let mut last = String::new();
    while Instant::now() < end {
        for a in target.clone().into_iter().chain(addrs.iter().cloned()) {
            let Ok(ch) = sluice_proto::connect(&a).await else {
                continue;
            };
            let mut req = tonic::Request::new(EnqueueRequest {
                messages: vec![message(tag)],
            });
            req.set_timeout(
                end.saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(10)),
            );
            match QueueClient::new(ch).enqueue(req).await {
                Ok(r) => return Ok(r.into_inner().ids[0].clone()),
                Err(st) => {
                    last = st.message().to_string();
                    let redirect = st.message().starts_with("not the leader")
                        || st.message().starts_with("no leader");
                    if let Some(l) = sluice_proto::leader_hint(&st) {
                        target = Some(l);
                        break;
                    }
                    if !redirect && st.code() != tonic::Code::Unavailable {
                        return Err(last);
                    }
                    if !redirect && !st.message().starts_with("no majority") {
                        return Err(last);
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(last)
}

/// Tags of every message on node `i`, counted.
fn tags_on(c: &Cluster, i: usize) -> Option<HashMap<String, usize>> {
    let list = c.list(i)?;
    let mut out = HashMap::new();
    for m in list.as_array()? {
        let tag = m["mail_from"]
            .as_str()?
            .trim_end_matches("@example.com")
            .to_string();
        *out.entry(tag).or_insert(0) += 1;
    }
    Some(out)
}

fn all_converged(c: &Cluster) -> bool {
    let d: Vec<_> = (0..c.addrs.len()).map(|i| c.digest(i)).collect();
    d.iter().all(|x| x.is_some()) && d.windows(2).all(|w| w[0] == w[1])
}

#[test]
fn acknowledged_messages_survive_repeated_leader_kills() {
    let mut c = Cluster::start(3, POLICY, FAST);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicU64::new(0));
    // A steady stream of enqueues from two clients; each tag is sent once, never retried.
    let mut streams = Vec::new();
    for client in 0..2 {
        let (addrs, acked, stop, counter) = (
            c.addrs.clone(),
            acked.clone(),
            stop.clone(),
            counter.clone(),
        );
        streams.push(std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            while !stop.load(Ordering::Relaxed) {
                let tag = format!("c{client}-m{}", counter.fetch_add(1, Ordering::Relaxed));
                if rt
                    .block_on(enqueue_once(&addrs, &tag, Duration::from_secs(3)))
                    .is_ok()
                {
                    acked.lock().unwrap().push(tag);
                }
            }
        }));
    }
    for round in 0..2 {
        let before = acked.lock().unwrap().len();
        assert!(
            wait_until(Duration::from_secs(30), || acked.lock().unwrap().len()
                >= before + 30),
            "round {round}: enqueues stalled"
        );
        let leader = c.leader().expect("a leader");
        c.controllers[leader].kill9();
        // A new leader is elected among the survivors and the stream goes on.
        let after_kill = acked.lock().unwrap().len();
        let ok = wait_until(Duration::from_secs(30), || {
            acked.lock().unwrap().len() >= after_kill + 30
        });
        if !ok {
            c.dump_logs();
        }
        assert!(ok, "round {round}: no progress after killing the leader");
        c.start_controller(leader);
        assert!(wait_for_port(
            c.addrs[leader].parse().unwrap(),
            Duration::from_secs(30)
        ));
    }
    stop.store(true, Ordering::Relaxed);
    for s in streams {
        s.join().unwrap();
    }
    drop(rt);
    // Every node, the restarted ones included, converges on the same state.
    let ok = wait_until(Duration::from_secs(60), || all_converged(&c));
    if !ok {
        c.dump_logs();
    }
    assert!(ok, "replicas did not converge");
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= 120,
        "only {} messages were acknowledged",
        acked.len()
    );
    for i in 0..3 {
        let tags = tags_on(&c, i).expect("list");
        for t in &acked {
            assert_eq!(
                tags.get(t),
                Some(&1),
                "node {} holds acknowledged message {t} {:?} times",
                i + 1,
                tags.get(t)
            );
        }
    }
}

#[test]
fn a_paused_follower_catches_up_by_snapshot() {
    let c = Cluster::start(3, POLICY, FAST);
    let leader = c.leader().unwrap();
    let follower = (leader + 1) % 3;
    c.controllers[follower].signal(libc::SIGSTOP);
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Enqueue until the leader has purged its log past what the paused follower holds; only
    // a snapshot can bring it back then.
    let follower_id = (follower + 1) as u64;
    let mut n = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        rt.block_on(enqueue_once(
            &c.addrs,
            &format!("s{n}"),
            Duration::from_secs(5),
        ))
        .expect("enqueue with one follower paused");
        n += 1;
        if n % 20 == 0 {
            let (_, out, _) = run(&["cluster", "status", "--json", "-c", &c.addrs[leader]]);
            let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
            let matched = v["nodes"]
                .as_array()
                .and_then(|ns| ns.iter().find(|x| x["node_id"] == follower_id))
                .and_then(|x| x["matched"].as_u64())
                .unwrap_or(0);
            if v["purged_index"].as_u64().unwrap_or(0) > matched + 1 {
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the leader never purged its log past the paused follower"
        );
    }
    let leader_log = c.controllers[leader].log_text();
    c.controllers[follower].signal(libc::SIGCONT);
    let ok = wait_until(Duration::from_secs(60), || all_converged(&c));
    if !ok {
        c.dump_logs();
    }
    assert!(ok, "the follower did not catch up");
    let (d_leader, applied) = c.digest(leader).unwrap();
    let (d_follower, applied_f) = c.digest(follower).unwrap();
    assert_eq!(d_leader, d_follower);
    assert_eq!(applied, applied_f);
    assert_eq!(tags_on(&c, follower).unwrap().len(), n);
    // The status shows each node's own log, commit and applied index.
    let (_, out, _) = run(&["cluster", "status", "--json", "-c", &c.addrs[leader]]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    for node in nodes {
        assert_eq!(node["reachable"], true, "{node}");
        assert!(node["applied"].as_u64().unwrap() >= applied, "{node}");
        assert!(
            node["committed"].as_u64().unwrap() >= node["applied"].as_u64().unwrap(),
            "{node}"
        );
    }
    let _ = leader_log;
    // The leader's log was compacted past the follower: it cannot have replayed entries only.
    assert!(
        c.controllers[follower]
            .log_text()
            .contains("installed a snapshot"),
        "no snapshot reached the follower"
    );
}

#[test]
fn without_a_majority_enqueue_fails_and_nothing_appears_later() {
    let c = Cluster::start(3, POLICY, FAST);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(enqueue_once(&c.addrs, "before", Duration::from_secs(5)))
        .expect("enqueue with all nodes up");
    let leader = c.leader().unwrap();
    let others: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    for &o in &others {
        c.controllers[o].signal(libc::SIGSTOP);
    }
    std::thread::sleep(Duration::from_millis(800));
    let started = Instant::now();
    let res = rt.block_on(enqueue_once(
        &[c.addrs[leader].clone()],
        "lost",
        Duration::from_secs(3),
    ));
    assert!(
        res.is_err(),
        "an enqueue without a majority was acknowledged"
    );
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "the failure took {:?}",
        started.elapsed()
    );
    for &o in &others {
        c.controllers[o].signal(libc::SIGCONT);
    }
    rt.block_on(enqueue_once(&c.addrs, "after", Duration::from_secs(10)))
        .expect("enqueue after the majority is back");
    assert!(wait_until(Duration::from_secs(30), || all_converged(&c)));
    for i in 0..3 {
        let tags = tags_on(&c, i).unwrap();
        assert_eq!(tags.get("before"), Some(&1));
        assert_eq!(tags.get("after"), Some(&1));
        assert_eq!(
            tags.get("lost"),
            None,
            "a refused message became visible on node {}",
            i + 1
        );
    }
}

#[test]
fn a_single_node_cluster_is_durable_across_kill() {
    let mut c = Cluster::start(1, POLICY, FAST);
    let rt = tokio::runtime::Runtime::new().unwrap();
    for n in 0..20 {
        rt.block_on(enqueue_once(
            &c.addrs,
            &format!("one{n}"),
            Duration::from_secs(5),
        ))
        .expect("enqueue");
    }
    // Acknowledged means fsynced: a kill -9 right after loses nothing.
    c.controllers[0].kill9();
    c.start_controller(0);
    assert!(wait_until(Duration::from_secs(30), || c.leader() == Some(0)));
    let tags = tags_on(&c, 0).unwrap();
    for n in 0..20 {
        assert_eq!(tags.get(&format!("one{n}")), Some(&1));
    }
}

#[test]
fn membership_add_learner_promote_and_remove() {
    let mut c = Cluster::start(1, POLICY, FAST);
    let rt = tokio::runtime::Runtime::new().unwrap();
    for n in 0..30 {
        rt.block_on(enqueue_once(
            &c.addrs,
            &format!("m{n}"),
            Duration::from_secs(5),
        ))
        .expect("enqueue");
    }
    // Two new controllers join; each catches up as a learner and then votes.
    for i in 1..3 {
        c.addrs.push(format!("127.0.0.1:{}", free_port()));
        c.start_controller(i);
        assert!(wait_for_port(
            c.addrs[i].parse().unwrap(),
            Duration::from_secs(30)
        ));
        let (ok, out, err) = run(&[
            "cluster",
            "add",
            &(i + 1).to_string(),
            &c.addrs[i],
            "-c",
            &c.addrs[0],
        ]);
        assert!(ok, "cluster add failed: {out}{err}");
    }
    let (ok, out, _) = run(&["cluster", "status", "--json", "-c", &c.addrs[1]]);
    assert!(ok);
    let st: serde_json::Value = serde_json::from_str(&out).unwrap();
    let voters = st["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["voter"] == true)
        .count();
    assert_eq!(voters, 3, "{st}");
    assert!(
        wait_until(Duration::from_secs(30), || all_converged(&c)),
        "the new members did not catch up"
    );
    assert_eq!(tags_on(&c, 2).unwrap().len(), 30);
    // Remove node 3: the group goes on with two voters.
    let (ok, out, err) = run(&["cluster", "remove", "3", "-c", &c.addrs[0]]);
    assert!(ok, "{out}{err}");
    let (_, out, _) = run(&["cluster", "status", "--json", "-c", &c.addrs[0]]);
    let st: serde_json::Value = serde_json::from_str(&out).unwrap();
    let voters: Vec<u64> = st["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["voter"] == true)
        .filter_map(|n| n["node_id"].as_u64())
        .collect();
    assert_eq!(voters, vec![1, 2], "{st}");
    rt.block_on(enqueue_once(
        &c.addrs[..2],
        "after-remove",
        Duration::from_secs(5),
    ))
    .expect("enqueue after removing a node");
}
