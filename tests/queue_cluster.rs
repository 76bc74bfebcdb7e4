//! The replicated queue with real `sluice controller` processes, real RocksDB and real sockets:
//! leader kills, a follower catching up by snapshot, loss of majority, a 1-node cluster,
//! entries bounded by bytes, an entry slower to send than a heartbeat, idempotent enqueue, and a
//! full disk.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::*;
use sluice_proto::queue::queue_client::QueueClient;
use sluice_proto::queue::{EnqueueRequest, NewMessage, Recipient};

const POLICY: &str = "<virtual-mta v1>\nsmtp-source-host 127.0.0.1 v1.example.com\n</virtual-mta>\n<domain *>\nroute [127.0.0.1]:9\n</domain>\n";
/// Fast elections and frequent snapshots, so that the tests run in seconds.
const FAST: &str = "[raft]\nheartbeat_ms = 50\nelection_min_ms = 300\nelection_max_ms = 600\nsnapshot_after_entries = 40\nkeep_entries = 5\ncommit_timeout_ms = 2000\n";

/// A tag's idempotency token: the same tag is the same transaction.
fn token(tag: &str) -> Vec<u8> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    tag.hash(&mut h);
    let a = h.finish();
    "second half".hash(&mut h);
    let b = h.finish();
    (((a as u128) << 64) | b as u128).to_be_bytes().to_vec()
}

fn message(tag: &str) -> NewMessage {
    NewMessage {
        token: token(tag).into(),
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

/// One enqueue of a tag, following the leader; Ok = acknowledged. Every attempt carries the
/// tag's token, so the tag may be sent again after any failure: a copy that was committed
/// anyway is not queued twice.
async fn enqueue_once(
    tls: &sluice_proto::tls::TlsFiles,
    addrs: &[String],
    tag: &str,
    deadline: Duration,
) -> Result<u64, String> {
    let client = sluice_proto::LeaderClient::with_tls(addrs.to_vec(), tls.clone());
    let end = tokio::time::Instant::now() + deadline;
    client
        .call(end, |ch| async move {
            let mut req = tonic::Request::new(EnqueueRequest {
                messages: vec![message(tag)],
            });
            req.set_timeout(Duration::from_secs(2));
            QueueClient::new(ch).enqueue(req).await
        })
        .await
        .map(|r| r.ids[0])
        .map_err(|st| st.message().to_string())
}

/// One Enqueue of `messages` through the leader, with no client-side size limit (the
/// controller's own limit is what large-message tests check).
fn enqueue_all(
    rt: &tokio::runtime::Runtime,
    c: &Cluster,
    messages: Vec<NewMessage>,
    within: Duration,
) -> Result<Vec<u64>, tonic::Status> {
    let client = sluice_proto::LeaderClient::with_tls(c.addrs.clone(), c.ingress_tls());
    rt.block_on(client.call(tokio::time::Instant::now() + within, |ch| {
        let m = messages.clone();
        async move {
            QueueClient::new(ch)
                .max_encoding_message_size(usize::MAX)
                .enqueue(EnqueueRequest { messages: m })
                .await
        }
    }))
    .map(|r| r.ids)
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
        let (tls, addrs, acked, stop, counter) = (
            c.ingress_tls(),
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
                    .block_on(enqueue_once(&tls, &addrs, &tag, Duration::from_secs(3)))
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
            &c.ingress_tls(),
            &c.addrs,
            &format!("s{n}"),
            Duration::from_secs(5),
        ))
        .expect("enqueue with one follower paused");
        n += 1;
        if n % 20 == 0 {
            let (_, out, _) = c.cli(&["cluster", "status", "--json", "-c", &c.addrs[leader]]);
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
    // The status shows each node's own log, commit and applied index (each node is asked
    // directly, with a short timeout: a node busy after the install may need a moment).
    let mut v = serde_json::json!({});
    let ok = wait_until(Duration::from_secs(15), || {
        let (_, out, _) = c.cli(&["cluster", "status", "--json", "-c", &c.addrs[leader]]);
        v = serde_json::from_str(&out).unwrap_or_default();
        v["nodes"].as_array().is_some_and(|ns| {
            ns.len() == 3
                && ns.iter().all(|n| {
                    n["reachable"] == true && n["applied"].as_u64().unwrap_or(0) >= applied
                })
        })
    });
    assert!(ok, "{v}");
    for node in v["nodes"].as_array().unwrap() {
        assert!(
            node["committed"].as_u64().unwrap() >= node["applied"].as_u64().unwrap(),
            "{node}"
        );
    }
    // The leader's log was compacted past the follower: it cannot have replayed entries only.
    assert!(
        wait_until(Duration::from_secs(5), || c.controllers[follower]
            .log_text()
            .contains("installed a snapshot")),
        "no snapshot reached the follower"
    );
}

#[test]
fn without_a_majority_enqueue_fails_and_nothing_appears_later() {
    let c = Cluster::start(3, POLICY, FAST);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(enqueue_once(
        &c.ingress_tls(),
        &c.addrs,
        "before",
        Duration::from_secs(5),
    ))
    .expect("enqueue with all nodes up");
    let leader = c.leader().unwrap();
    let others: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    for &o in &others {
        c.controllers[o].signal(libc::SIGSTOP);
    }
    std::thread::sleep(Duration::from_millis(800));
    let started = Instant::now();
    let res = rt.block_on(enqueue_once(
        &c.ingress_tls(),
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
    rt.block_on(enqueue_once(
        &c.ingress_tls(),
        &c.addrs,
        "after",
        Duration::from_secs(30),
    ))
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
    let mut ids = Vec::new();
    // 45 entries: past FAST's snapshot every 40, whose checkpoint flushes the state while
    // the bodies are held (no purge yet: openraft purges 256 entries at a time).
    for n in 0..45 {
        ids.push(
            rt.block_on(enqueue_once(
                &c.ingress_tls(),
                &c.addrs,
                &format!("one{n}"),
                Duration::from_secs(5),
            ))
            .expect("enqueue"),
        );
    }
    let snapshot = wait_until(Duration::from_secs(30), || {
        let (_, out, _) = c.cli(&["cluster", "status", "--json", "-c", &c.addrs[0]]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        v["snapshot_index"].as_u64().unwrap_or(0) > 0
    });
    assert!(snapshot, "no snapshot was taken");
    // A kill -9 right after loses nothing: the state machine replays from the synced log.
    // The bodies too: they were held in memory and never reached RocksDB (`queue::bodies`);
    // those of entries applied before the snapshot come back from the log at start, the
    // later ones with their entries applied again.
    c.controllers[0].kill9();
    c.start_controller(0);
    assert!(wait_until(Duration::from_secs(30), || c.leader() == Some(0)));
    let tags = tags_on(&c, 0).unwrap();
    for n in 0..45 {
        assert_eq!(tags.get(&format!("one{n}")), Some(&1));
    }
    for (n, id) in ids.iter().enumerate() {
        let (ok, out, err) = c.cli(&[
            "inspect",
            &format!("{id:016x}"),
            "--json",
            "-c",
            &c.addrs[0],
        ]);
        assert!(ok, "{err}");
        let m: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert!(
            m["headers"]
                .as_str()
                .unwrap_or("")
                .contains(&format!("Subject: one{n}\r\n")),
            "message {n}: {m}"
        );
    }
}

#[test]
fn membership_add_learner_promote_and_remove() {
    let mut c = Cluster::start(1, POLICY, FAST);
    let rt = tokio::runtime::Runtime::new().unwrap();
    for n in 0..30 {
        rt.block_on(enqueue_once(
            &c.ingress_tls(),
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
        // A readiness probe says no until the node is in the group and caught up.
        let (ok, out, err) = c.cli(&["cluster", "status", "--ready", "-c", &c.addrs[i]]);
        assert!(!ok, "{out}");
        assert!(err.contains("knows no leader"), "{err}");
        let (ok, out, err) = c.cli(&[
            "cluster",
            "add",
            &(i + 1).to_string(),
            &c.addrs[i],
            "-c",
            &c.addrs[0],
        ]);
        assert!(ok, "cluster add failed: {out}{err}");
    }
    let (ok, out, _) = c.cli(&["cluster", "status", "--json", "-c", &c.addrs[1]]);
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
    for a in &c.addrs {
        let (ok, out, err) = c.cli(&["cluster", "status", "--ready", "-c", a]);
        assert!(ok && out.contains("ready"), "{a}: {out}{err}");
    }
    // Remove node 3: the group goes on with two voters.
    let (ok, out, err) = c.cli(&["cluster", "remove", "3", "-c", &c.addrs[0]]);
    assert!(ok, "{out}{err}");
    let (_, out, _) = c.cli(&["cluster", "status", "--json", "-c", &c.addrs[0]]);
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
        &c.ingress_tls(),
        &c.addrs[..2],
        "after-remove",
        Duration::from_secs(5),
    ))
    .expect("enqueue after removing a node");
}

#[test]
fn a_retried_enqueue_is_queued_once() {
    let c = Cluster::start(1, POLICY, FAST);
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The same transaction three times, as an ingress retrying after a timeout would.
    let ids: Vec<u64> = (0..3)
        .map(|_| {
            rt.block_on(enqueue_once(
                &c.ingress_tls(),
                &c.addrs,
                "same",
                Duration::from_secs(5),
            ))
            .unwrap()
        })
        .collect();
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "{ids:?}");
    rt.block_on(enqueue_once(
        &c.ingress_tls(),
        &c.addrs,
        "other",
        Duration::from_secs(5),
    ))
    .unwrap();
    let tags = tags_on(&c, 0).unwrap();
    assert_eq!(tags.get("same"), Some(&1));
    assert_eq!(tags.get("other"), Some(&1));
}

#[test]
fn entries_are_bounded_by_bytes_and_a_lagging_follower_gets_them_in_parts() {
    // Entries of at most 512 KB; gRPC between nodes then takes at most 1 MB + 4 MB.
    let settings = format!("{FAST}max_entry_bytes = 524288\nmax_message_bytes = 1048576\n")
        .replace(
            "snapshot_after_entries = 40",
            "snapshot_after_entries = 100000",
        );
    let c = Cluster::start(3, POLICY, &settings);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let big = |tag: &str| {
        let mut m = message(tag);
        m.body = vec![b'x'; 150_000].into();
        m
    };
    let send = |messages: Vec<NewMessage>| -> Vec<u64> {
        enqueue_all(&rt, &c, messages, Duration::from_secs(10)).unwrap()
    };
    // Eight messages of 150 KB in one request: no entry holds more than three of them.
    let ids = send((0..8).map(|i| big(&format!("b{i}"))).collect());
    let entries: std::collections::BTreeSet<u64> = ids.iter().map(|id| id >> 20).collect();
    assert!(
        entries.len() >= 3,
        "1.2 MB went into {} entries: {ids:x?}",
        entries.len()
    );
    // One message larger than an entry's bound goes alone; one larger than the controller
    // takes is refused.
    let mut huge = big("huge");
    huge.body = vec![b'y'; 900_000].into();
    send(vec![huge]);
    let mut too_big = big("too-big");
    too_big.body = vec![b'z'; 2_000_000].into();
    let refused = enqueue_all(&rt, &c, vec![too_big], Duration::from_secs(10));
    let st = refused.unwrap_err();
    assert_eq!(st.code(), tonic::Code::InvalidArgument, "{st:?}");
    // A follower away while 12 MB is written gets it back in AppendEntries of a few MB each.
    let leader = c.leader().unwrap();
    let follower = (leader + 1) % 3;
    c.controllers[follower].signal(libc::SIGSTOP);
    for round in 0..10 {
        send((0..8).map(|i| big(&format!("lag{round}-{i}"))).collect());
    }
    c.controllers[follower].signal(libc::SIGCONT);
    let ok = wait_until(Duration::from_secs(60), || all_converged(&c));
    if !ok {
        c.dump_logs();
    }
    assert!(ok, "the follower did not catch up");
    let tags = tags_on(&c, follower).unwrap();
    assert_eq!(tags.len(), 8 + 1 + 80, "{} messages", tags.len());
    assert!(!tags.contains_key("too-big"));
}

#[test]
fn a_full_disk_refuses_new_mail_with_452_and_takes_it_again_once_there_is_room() {
    let port = free_port();
    let policy = format!(
        "<virtual-mta v1>\n smtp-source-host 127.0.0.1 v1.example.com\n</virtual-mta>\n\
         <source 127.0.0.1>\n always-allow-relaying yes\n default-virtual-mta v1\n</source>\n\
         <domain *>\n route [127.0.0.1]:{port}\n</domain>\n"
    );
    let mut mounted = true;
    // The controller's data folder on a 256 MB filesystem; below 96 MB free it refuses mail.
    let mut c = Cluster::start_with(
        1,
        &policy,
        "[raft]\nmin_free_disk_bytes = 100663296\n",
        |dir| match Tmpfs::mount(&dir.join("controller-1"), 256) {
            Some(m) => vec![m],
            None => {
                mounted = false;
                Vec::new()
            }
        },
    );
    if !mounted {
        eprintln!("SKIPPED: mounting a tmpfs needs root, which this run does not have");
        return;
    }
    let (_, stats, _) = c.start_sink_at(format!("127.0.0.1:{port}").parse().unwrap(), &[]);
    let (smtp, _) = c.start_ingress();
    c.start_worker("w1", &["127.0.0.1"], "");
    let send = |n: &str| {
        smtp_send(
            smtp,
            "s@example.com",
            &[&format!("{n}@disk.test")],
            "Subject: d\n\nx",
        )
    };
    for n in 0..5 {
        let r = send(&format!("before{n}"));
        assert!(r.starts_with("250"), "{r}");
    }
    // Fill the disk to just under the floor.
    let data = c.path().join("controller-1");
    let free = |p: &Path| -> u64 {
        let out = std::process::Command::new("df")
            .args(["-B1", "--output=avail"])
            .arg(p)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .unwrap()
    };
    let filler = data.join("filler");
    let fill = free(&data).saturating_sub(80 << 20);
    let f = std::fs::File::create(&filler).unwrap();
    f.set_len(0).unwrap();
    // tmpfs allocates on write: write the bytes for real.
    {
        use std::io::Write;
        let mut w = std::io::BufWriter::new(f);
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..fill >> 20 {
            w.write_all(&chunk).unwrap();
        }
    }
    let r = send("while-full");
    assert!(r.starts_with("452 4.3.1"), "{r}");
    // Queued mail still goes out meanwhile, and the controller stays up.
    assert!(
        wait_until(Duration::from_secs(30), || sink_stats(&stats)["messages"]
            == 5),
        "{}",
        sink_stats(&stats)
    );
    assert!(c.controllers[0].is_running());
    std::fs::remove_file(&filler).unwrap();
    let ok = wait_until(Duration::from_secs(10), || send("after").starts_with("250"));
    assert!(ok, "mail is still refused once there is room");
    assert!(
        wait_until(Duration::from_secs(30), || sink_stats(&stats)["messages"]
            .as_u64()
            >= Some(6)),
        "{}",
        sink_stats(&stats)
    );
    let saved = sink_stats(&stats);
    assert_eq!(saved["messages"], 6, "{saved}");
}

#[test]
fn an_entry_slower_to_send_than_a_heartbeat_still_reaches_every_follower() {
    // openraft waits one heartbeat interval for an AppendEntries. Encoding, sending and
    // syncing 48 MB takes longer than 20 ms on any machine: the request must still land
    // rather than be sent again and again from the start.
    let settings = FAST
        .replace("heartbeat_ms = 50", "heartbeat_ms = 20")
        .replace("commit_timeout_ms = 2000", "commit_timeout_ms = 60000");
    let c = Cluster::start(3, POLICY, &settings);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut big = message("big");
    big.body = vec![b'x'; 48 << 20].into();
    let sent = enqueue_all(&rt, &c, vec![big], Duration::from_secs(60));
    if sent.is_err() {
        c.dump_logs();
    }
    sent.expect("the 48 MB message is committed");
    // The log moves on after it.
    rt.block_on(enqueue_once(
        &c.ingress_tls(),
        &c.addrs,
        "after",
        Duration::from_secs(30),
    ))
    .expect("a small message after it is committed");
    let ok = wait_until(Duration::from_secs(60), || all_converged(&c));
    assert!(ok, "the followers did not get the entry");
    for i in 0..3 {
        let tags = tags_on(&c, i).unwrap();
        assert_eq!(tags.get("big"), Some(&1), "node {i}: {tags:?}");
        assert_eq!(tags.get("after"), Some(&1), "node {i}: {tags:?}");
    }
}
