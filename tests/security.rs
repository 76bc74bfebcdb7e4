//! The cluster's internal port under attack: every RPC family called with no certificate, a
//! certificate from another CA and every wrong role, against real controllers over mutual TLS;
//! forged Raft traffic, a worker acting for another, the policy views each role gets, a
//! certificate rotation under load, and the drop to `process-user`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::harness::*;
use sluice_proto::admin::admin_client::AdminClient;
use sluice_proto::admin::{AddNodeRequest, DeleteRequest, Empty, QueueSelector};
use sluice_proto::lease::leases_client::LeasesClient;
use sluice_proto::lease::{
    AcquireRequest, Outcome, RegisterRequest, RenewRequest, ReportRequest, Stage,
};
use sluice_proto::queue::queue_client::QueueClient;
use sluice_proto::queue::{EnqueueRequest, NewMessage, PolicyRequest, Recipient};
use sluice_proto::raft::RaftPayload;
use sluice_proto::raft::raft_client::RaftClient;
use sluice_proto::tls::TlsFiles;
use tonic::Code;
use tonic::transport::Channel;

fn files(c: &Cluster, role: &str, name: &str) -> TlsFiles {
    let (ca, cert, key) = c.tls_files(role, name);
    TlsFiles { ca, cert, key }
}

async fn channel(addr: &str, files: Option<&TlsFiles>) -> Result<Channel, String> {
    sluice_proto::connect_as(addr, Duration::from_secs(5), files)
        .await
        .map_err(|e| e.to_string())
}

/// Writes the policy's DKIM keys (two VMTAs, one key each) with `sluice config dkim-keys`.
fn policy_with_keys(dir: &Path, route: &str) -> String {
    let p = format!(
        "<virtual-mta vmta-a>\n  smtp-source-host 127.0.0.1 a.example.com\n  domain-key sela,example.com,{a}\n</virtual-mta>\n\
         <virtual-mta vmta-b>\n  smtp-source-host 127.0.0.2 b.example.com\n  domain-key selb,example.com,{b}\n</virtual-mta>\n\
         <smtp-user alice>\n  password hunter2-plain-secret\n</smtp-user>\n\
         <source 127.0.0.1>\n  always-allow-relaying yes\n  smtp-service yes\n  default-virtual-mta vmta-a\n</source>\n\
         <domain *>\n  route {route}\n  retry-after 1s\n</domain>\n",
        a = dir.join("a.pem").display(),
        b = dir.join("b.pem").display(),
    );
    let f = dir.join("keys.conf");
    std::fs::write(&f, &p).unwrap();
    let (ok, _, err) = run(&["config", "dkim-keys", f.to_str().unwrap()]);
    assert!(ok, "dkim-keys: {err}");
    p
}

fn key_body(path: &Path) -> String {
    // A line from the middle of the PEM: present in any JSON that carries the key.
    let pem = std::fs::read_to_string(path).unwrap();
    pem.lines().nth(3).unwrap().to_string()
}

fn status_code<T>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

fn message(to: &str) -> NewMessage {
    NewMessage {
        mail_from: "sender@example.com".into(),
        recipients: vec![Recipient {
            address: to.into(),
            ..Default::default()
        }],
        vmta: "vmta-a".into(),
        body: b"Subject: x\r\n\r\nbody\r\n".to_vec().into(),
        ..Default::default()
    }
}

#[test]
fn every_rpc_answers_only_the_roles_it_serves() {
    let keys = tempfile::tempdir().unwrap();
    let policy = policy_with_keys(keys.path(), "[127.0.0.1]:9");
    let mut c = Cluster::start(1, &policy, "");
    c.kept.push(keys);
    let addr = c.addrs[0].clone();
    issue_cert(&c.tls, "worker", "w1", &["127.0.0.1"]);
    issue_cert(&c.tls, "worker", "w2", &["127.0.0.2"]);
    // A second CA, with an operator and a controller certificate of its own.
    let other = c.path().join("other-ca");
    let (ok, _, err) = run(&["cert", "init", "--dir", other.to_str().unwrap()]);
    assert!(ok, "{err}");
    issue_cert(&other, "operator", "admin", &[]);
    issue_cert(&other, "controller", "9", &["127.0.0.1"]);
    let foreign = |role: &str, name: &str| TlsFiles {
        // Trusts the real CA, presents the other one's certificate.
        ca: c.tls.join("ca.pem"),
        cert: other.join(format!("{role}-{name}.pem")),
        key: other.join(format!("{role}-{name}.key")),
    };
    let rt = runtime();
    rt.block_on(async {
        let ingress = channel(&addr, Some(&files(&c, "ingress", "ingress")))
            .await
            .unwrap();
        let operator = channel(&addr, Some(&files(&c, "operator", "admin")))
            .await
            .unwrap();
        let viewer = channel(&addr, Some(&files(&c, "viewer", "viewer")))
            .await
            .unwrap();
        let w1 = channel(&addr, Some(&files(&c, "worker", "w1")))
            .await
            .unwrap();
        let w2 = channel(&addr, Some(&files(&c, "worker", "w2")))
            .await
            .unwrap();

        // No TLS, and a certificate from another CA: no RPC is served at all.
        if let Ok(plain) = channel(&addr, None).await {
            let r = AdminClient::new(plain).status(Empty {}).await;
            assert!(r.is_err(), "a plaintext client was served: {r:?}");
        }
        for (role, name) in [("operator", "admin"), ("controller", "9")] {
            if let Ok(ch) = channel(&addr, Some(&foreign(role, name))).await {
                let r = AdminClient::new(ch).status(Empty {}).await;
                assert!(r.is_err(), "a {role} certificate of another CA was served");
            }
        }

        // Raft: a vote for a far higher term from anyone but a controller changes nothing.
        let status = AdminClient::new(viewer.clone())
            .status(Empty {})
            .await
            .expect("a viewer reads the status")
            .into_inner();
        let vote = openraft::raft::VoteRequest::<u64>::new(
            openraft::Vote::new(status.term + 100, 9),
            Some(openraft::LogId::new(
                openraft::CommittedLeaderId::new(status.term + 100, 9),
                status.last_log_index + 1000,
            )),
        );
        let payload = RaftPayload {
            data: bincode::serialize(&vote).unwrap().into(),
        };
        for ch in [&ingress, &w1, &operator, &viewer] {
            let r = RaftClient::new(ch.clone()).vote(payload.clone()).await;
            assert_eq!(status_code(r), Code::PermissionDenied);
            let r = RaftClient::new(ch.clone())
                .append_entries(payload.clone())
                .await;
            assert_eq!(status_code(r), Code::PermissionDenied);
            let r = RaftClient::new(ch.clone())
                .install_snapshot(payload.clone())
                .await;
            assert_eq!(status_code(r), Code::PermissionDenied);
        }
        let after = AdminClient::new(viewer.clone())
            .status(Empty {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(after.term, status.term, "a forged vote moved the term");
        assert_eq!(after.leader_id, status.leader_id);

        // Enqueue: ingress only.
        for ch in [&w1, &operator, &viewer] {
            let r = QueueClient::new(ch.clone())
                .enqueue(EnqueueRequest {
                    messages: vec![message("forged@dest.test")],
                })
                .await;
            assert_eq!(status_code(r), Code::PermissionDenied);
        }
        let ids = QueueClient::new(ingress.clone())
            .enqueue(EnqueueRequest {
                messages: vec![message("real@dest.test")],
            })
            .await
            .expect("ingress enqueues")
            .into_inner()
            .ids;
        assert_eq!(ids.len(), 1);

        // The policy: ingress gets hashes and no key; a worker only its own VMTAs' keys.
        let ask = |role: &str, ips: &[&str]| PolicyRequest {
            have_version: 0,
            node: format!("{role} test"),
            role: role.into(),
            source_ips: ips.iter().map(|s| s.to_string()).collect(),
        };
        for ch in [&operator, &viewer] {
            let r = QueueClient::new(ch.clone())
                .get_policy(ask("ingress", &[]))
                .await;
            assert_eq!(status_code(r), Code::PermissionDenied);
        }
        let key_a = key_body(&c.kept[0].path().join("a.pem"));
        let key_b = key_body(&c.kept[0].path().join("b.pem"));
        // The certificate decides the view, whatever the request claims.
        let seen = QueueClient::new(ingress.clone())
            .get_policy(ask("worker", &["127.0.0.1"]))
            .await
            .expect("ingress fetches the policy")
            .into_inner()
            .policy_json;
        assert!(
            !seen.contains("hunter2-plain-secret"),
            "ingress saw a password"
        );
        assert!(seen.contains("$argon2"), "ingress got no password hash");
        assert!(
            !seen.contains(&key_a) && !seen.contains(&key_b),
            "ingress saw a DKIM key"
        );
        let seen = QueueClient::new(w1.clone())
            .get_policy(ask("worker", &["127.0.0.1"]))
            .await
            .expect("w1 fetches the policy")
            .into_inner()
            .policy_json;
        assert!(seen.contains(&key_a), "w1 did not get its own VMTA's key");
        assert!(
            !seen.contains(&key_b),
            "w1 got the key of a VMTA it does not own"
        );
        assert!(
            !seen.contains("hunter2") && !seen.contains("argon2"),
            "a worker saw smtp-users"
        );
        let r = QueueClient::new(w1.clone())
            .get_policy(ask("worker", &["127.0.0.2"]))
            .await;
        assert_eq!(
            status_code(r),
            Code::PermissionDenied,
            "w1 asked for w2's keys"
        );

        // Leases: workers only, each for its own name, IPs and leases.
        let reg = |name: &str, ip: &str| RegisterRequest {
            worker: name.into(),
            source_ips: vec![ip.into()],
            capacity: 10,
            policy_version: 0,
        };
        let r = LeasesClient::new(ingress.clone())
            .register(reg("w1", "127.0.0.1"))
            .await;
        assert_eq!(status_code(r), Code::PermissionDenied);
        let r = LeasesClient::new(w2.clone())
            .register(reg("w1", "127.0.0.1"))
            .await;
        assert_eq!(
            status_code(r),
            Code::PermissionDenied,
            "w2 registered as w1"
        );
        let r = LeasesClient::new(w2.clone())
            .register(reg("w2", "127.0.0.1"))
            .await;
        assert_eq!(status_code(r), Code::PermissionDenied, "w2 took w1's IP");
        LeasesClient::new(w1.clone())
            .register(reg("w1", "127.0.0.1"))
            .await
            .expect("w1 registers its own IP");
        LeasesClient::new(w2.clone())
            .register(reg("w2", "127.0.0.2"))
            .await
            .expect("w2 registers its own IP");
        let deadline = Instant::now() + Duration::from_secs(30);
        let lease = loop {
            let got = LeasesClient::new(w1.clone())
                .acquire(AcquireRequest {
                    worker: "w1".into(),
                    free_slots: 1,
                    wait_ms: 1000,
                })
                .await
                .expect("w1 acquires")
                .into_inner()
                .leases;
            if let Some(l) = got.into_iter().next() {
                break l;
            }
            assert!(Instant::now() < deadline, "no lease granted to w1");
        };
        let digest = c.digest(0).unwrap();
        let delivered = |worker: &str| ReportRequest {
            worker: worker.into(),
            lease_id: lease.lease_id,
            outcomes: vec![Outcome {
                message_id: ids[0],
                rcpt_index: 0,
                code: 250,
                enhanced: "2.0.0".into(),
                text: "forged".into(),
                stage: Stage::EndOfData as i32,
                ..Default::default()
            }],
            done: true,
        };
        let r = LeasesClient::new(w2.clone()).report(delivered("w2")).await;
        assert_eq!(
            status_code(r),
            Code::PermissionDenied,
            "w2 reported w1's lease"
        );
        let r = LeasesClient::new(w2.clone()).report(delivered("w1")).await;
        assert_eq!(status_code(r), Code::PermissionDenied, "w2 spoke as w1");
        let r = LeasesClient::new(w2.clone())
            .acquire(AcquireRequest {
                worker: "w1".into(),
                free_slots: 1,
                wait_ms: 0,
            })
            .await;
        assert_eq!(status_code(r), Code::PermissionDenied);
        let renewed = LeasesClient::new(w2.clone())
            .renew(RenewRequest {
                worker: "w2".into(),
                lease_ids: vec![lease.lease_id],
            })
            .await;
        if let Ok(r) = renewed {
            assert_eq!(
                r.into_inner().gone,
                vec![lease.lease_id],
                "w2 renewed w1's lease"
            );
        }

        // Admin: writes from operators, reads from operators and viewers.
        for ch in [&viewer, &ingress, &w1] {
            let r = AdminClient::new(ch.clone())
                .pause(QueueSelector {
                    pattern: "*/*".into(),
                })
                .await;
            assert_eq!(status_code(r), Code::PermissionDenied);
            let r = AdminClient::new(ch.clone())
                .delete(DeleteRequest {
                    queue_pattern: "*/*".into(),
                    ..Default::default()
                })
                .await;
            assert_eq!(status_code(r), Code::PermissionDenied);
            let r = AdminClient::new(ch.clone())
                .add_node(AddNodeRequest {
                    node_id: 9,
                    addr: "127.0.0.1:1".into(),
                })
                .await;
            assert_eq!(status_code(r), Code::PermissionDenied);
        }
        for ch in [&ingress, &w1] {
            let r = AdminClient::new(ch.clone()).list(Empty {}).await;
            assert_eq!(status_code(r), Code::PermissionDenied);
        }
        AdminClient::new(viewer.clone())
            .queues(Empty {})
            .await
            .expect("a viewer reads the queues");

        // None of the refused calls changed the replicated state.
        assert_eq!(
            c.digest(0).unwrap(),
            digest,
            "a refused call changed the state"
        );

        // The owner's report is taken.
        LeasesClient::new(w1.clone())
            .report(delivered("w1"))
            .await
            .expect("w1 reports its own lease");
    });
    assert!(
        wait_until(Duration::from_secs(10), || c
            .list(0)
            .is_some_and(|l| l.as_array().unwrap().is_empty())),
        "the delivered message is still queued"
    );
    // The CLI: a viewer reads and may not write, with a message that says why.
    let (ok, _, err) = c.cli_as("viewer", &["show", "queues", "-c", &addr]);
    assert!(ok, "viewer show queues: {err}");
    let (ok, _, err) = c.cli_as("viewer", &["pause", "*/*", "-c", &addr]);
    assert!(!ok && err.contains("viewer"), "viewer paused: {err}");
    // Each refusal is logged with the peer's role and name.
    let log = c.controllers[0].log_text();
    assert!(
        log.lines().any(|l| l.contains("refused: wrong role")
            && l.contains("viewer")
            && l.contains("Vote")
            && l.contains("127.0.0.1:")),
        "no refusal log line:\n{}",
        tail(&log, 30)
    );
}

/// A relay policy that delivers everything to `sink` from 127.0.0.1.
fn relay_policy(sink: SocketAddr) -> String {
    format!(
        "<virtual-mta v1>\n  smtp-source-host 127.0.0.1 v1.example.com\n</virtual-mta>\n\
         <source 127.0.0.1>\n  always-allow-relaying yes\n  smtp-service yes\n  default-virtual-mta v1\n</source>\n\
         <domain *>\n  route [127.0.0.1]:{}\n  retry-after 1s\n</domain>\n",
        sink.port()
    )
}

/// Replaces a file the way an operator's deploy tool should: whole, by rename.
fn replace_file(to: &Path, text: &[u8]) {
    let tmp = to.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

fn saved_bodies(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn certificates_rotate_to_a_new_ca_under_load_without_losing_mail() {
    let sink_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut c = Cluster::start(1, &relay_policy(sink_addr), "");
    let (_, _, saved) = c.start_sink_at(sink_addr, &[]);
    let (smtp, _) = c.start_ingress();
    c.start_worker("w1", &["127.0.0.1"], "");
    let addr = c.addrs[0].clone();
    // Keep the old operator certificate: once the old CA is gone it must be refused.
    let old = c.path().join("old-operator");
    std::fs::create_dir_all(&old).unwrap();
    for f in ["ca.pem", "operator-admin.pem", "operator-admin.key"] {
        std::fs::copy(c.tls.join(f), old.join(f)).unwrap();
    }

    // Mail flows all through the rotation; every send must be acknowledged.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut acked = Vec::new();
            let mut refused = Vec::new();
            let mut last_ack = Instant::now();
            let mut longest_gap = Duration::ZERO;
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let marker = format!("rotation-{n}");
                let reply = smtp_send(
                    smtp,
                    "sender@example.com",
                    &["to@dest.test"],
                    &format!("Subject: {marker}\n\n{marker}\n"),
                );
                if reply.starts_with("250") {
                    acked.push(marker);
                    longest_gap = longest_gap.max(last_ack.elapsed());
                    last_ack = Instant::now();
                } else {
                    refused.push(reply);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (acked, refused, longest_gap)
        })
    };
    std::thread::sleep(Duration::from_secs(2));

    // 1. Both CAs trusted everywhere.
    let new = c.path().join("new-ca");
    let (ok, _, err) = run(&["cert", "init", "--dir", new.to_str().unwrap()]);
    assert!(ok, "{err}");
    let old_ca = std::fs::read(c.tls.join("ca.pem")).unwrap();
    let new_ca = std::fs::read(new.join("ca.pem")).unwrap();
    replace_file(
        &c.tls.join("ca.pem"),
        &[old_ca.clone(), new_ca.clone()].concat(),
    );
    std::thread::sleep(Duration::from_secs(3));
    // 2. Every node's certificate reissued by the new CA, in place.
    issue_cert(&new, "controller", "1", &["127.0.0.1"]);
    issue_cert(&new, "ingress", "ingress", &[]);
    issue_cert(&new, "worker", "w1", &["127.0.0.1"]);
    issue_cert(&new, "operator", "admin", &[]);
    for name in [
        "controller-1",
        "ingress-ingress",
        "worker-w1",
        "operator-admin",
    ] {
        for ext in ["key", "pem"] {
            let f = format!("{name}.{ext}");
            replace_file(&c.tls.join(&f), &std::fs::read(new.join(&f)).unwrap());
        }
    }
    std::thread::sleep(Duration::from_secs(3));
    // The controller now presents the new certificate: a client trusting only the new CA
    // reaches it.
    let only_new = c.path().join("only-new");
    std::fs::create_dir_all(&only_new).unwrap();
    std::fs::write(only_new.join("ca.pem"), &new_ca).unwrap();
    for f in ["operator-admin.pem", "operator-admin.key"] {
        std::fs::copy(new.join(f), only_new.join(f)).unwrap();
    }
    let as_new = |args: &[&str]| run_env(args, &[("SLUICE_TLS_DIR", only_new.to_str().unwrap())]);
    assert!(
        wait_until(Duration::from_secs(10), || as_new(&[
            "show", "status", "-c", &addr
        ])
        .0),
        "the controller did not take its new certificate"
    );
    // 3. The old CA retired: its certificates are refused from now on.
    replace_file(&c.tls.join("ca.pem"), &new_ca);
    replace_file(
        &c.tls.join("ca.key"),
        &std::fs::read(new.join("ca.key")).unwrap(),
    );
    let as_old = |args: &[&str]| run_env(args, &[("SLUICE_TLS_DIR", old.to_str().unwrap())]);
    assert!(
        wait_until(Duration::from_secs(10), || !as_old(&[
            "show", "status", "-c", &addr
        ])
        .0),
        "a certificate of the retired CA is still served"
    );
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (acked, refused, longest_gap) = sender.join().unwrap();
    println!(
        "rotation under load: {} acknowledged, {} refused, longest gap between acknowledgements {:?}",
        acked.len(),
        refused.len(),
        longest_gap
    );
    assert!(
        refused.is_empty(),
        "refused during the rotation: {refused:?}"
    );
    assert!(acked.len() > 20, "too little traffic to show anything");
    let ok = wait_until(Duration::from_secs(60), || {
        let bodies = saved_bodies(&saved);
        acked
            .iter()
            .all(|m| bodies.iter().any(|b| b.contains(&format!("\n{m}"))))
    });
    if !ok {
        c.dump_logs();
    }
    assert!(ok, "an acknowledged message did not arrive");
    // New connections of every node work with the new certificates alone: restart them.
    for p in c.others.iter_mut() {
        p.stop();
    }
    c.others.clear();
    let (_, _, saved2) = c.start_sink_at(sink_addr, &[]);
    let (smtp2, _) = c.start_ingress();
    c.start_worker("w1", &["127.0.0.1"], "");
    let reply = smtp_send(
        smtp2,
        "sender@example.com",
        &["to@dest.test"],
        "Subject: after\n\nafter-rotation\n",
    );
    assert!(reply.starts_with("250"), "{reply}");
    assert!(
        wait_until(Duration::from_secs(30), || saved_bodies(&saved2)
            .iter()
            .any(|b| b.contains("after-rotation"))),
        "no delivery with the new certificates alone"
    );
}

/// `chown -R UID PATH`.
fn chown_tree(path: &Path, uid: u32) {
    let (ok, _, err) = tool("chown", &["-R", &uid.to_string(), path.to_str().unwrap()]);
    assert!(ok, "chown: {err}");
}

fn uid_of(pid: i32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse().ok())
        .unwrap_or(u32::MAX)
}

#[test]
fn every_node_drops_to_process_user_after_binding() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: dropping privileges needs the test to run as root");
        return;
    }
    const NOBODY: u32 = 65534;
    let sink_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let policy = format!(
        "process-user nobody\n<acct-file acct.csv>\n  records d\n</acct-file>\n{}",
        relay_policy(sink_addr)
    );
    let mut c = Cluster::start_with(1, &policy, "", |dir| {
        // The nodes read their certificates and policy again after the switch.
        let (ok, _, err) = tool("chmod", &["0755", dir.to_str().unwrap()]);
        assert!(ok, "{err}");
        chown_tree(&dir.join("tls"), NOBODY);
        Vec::new()
    });
    let (_, stats, _) = c.start_sink_at(sink_addr, &[]);
    let (smtp, _) = c.start_ingress();
    issue_cert(&c.tls, "worker", "w1", &["127.0.0.1"]);
    chown_tree(&c.tls, NOBODY);
    c.start_worker("w1", &["127.0.0.1"], "");
    let reply = smtp_send(
        smtp,
        "sender@example.com",
        &["to@dest.test"],
        "Subject: x\n\nx\n",
    );
    assert!(reply.starts_with("250"), "{reply}");
    let delivered = wait_until(Duration::from_secs(30), || {
        sink_stats(&stats)["messages"].as_u64().unwrap_or(0) >= 1
    });
    if !delivered {
        c.dump_logs();
    }
    assert!(delivered, "no delivery after the nodes dropped to nobody");
    let controller = c.controllers[0].pid();
    let ingress = c.others[1].pid();
    let worker = c.others[2].pid();
    for (what, pid) in [
        ("controller", controller),
        ("ingress", ingress),
        ("worker", worker),
    ] {
        assert_eq!(
            uid_of(pid),
            NOBODY,
            "the {what} still runs as uid {}",
            uid_of(pid)
        );
    }
    // What it writes belongs to it and is private.
    let data = c.path().join("controller-1");
    let meta = std::fs::metadata(&data).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(meta.uid(), NOBODY);
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o700,
        "data folder not private"
    );
    let acct = data.join("acct.csv");
    assert!(
        wait_until(Duration::from_secs(10), || acct.exists()),
        "no accounting file"
    );
    let meta = std::fs::metadata(&acct).unwrap();
    assert_eq!(
        meta.uid(),
        NOBODY,
        "the accounting file was not written as nobody"
    );
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o640,
        "accounting file mode"
    );
    for f in [
        "ca.key",
        "controller-1.key",
        "controller-1.pem",
        "worker-w1.key",
    ] {
        let mode = std::fs::metadata(c.tls.join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{f} is mode {mode:o}");
    }
}

#[test]
fn root_without_process_user_and_plaintext_beyond_loopback_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.conf");
    let start = |policy_text: &str, settings: &str| -> (bool, String) {
        std::fs::write(&policy, policy_text).unwrap();
        let s = dir.path().join(format!("node-{}.toml", free_port()));
        std::fs::write(
            &s,
            format!(
                "node_id = 1\ndata_dir = \"{}\"\npolicy = \"{}\"\n{settings}",
                dir.path().join(format!("data-{}", free_port())).display(),
                policy.display()
            ),
        )
        .unwrap();
        let mut p = spawn(
            dir.path(),
            "controller",
            &["controller", "--settings", s.to_str().unwrap()],
        );
        let exited = wait_until(Duration::from_secs(20), || !p.is_running());
        let log = p.log_text();
        p.stop();
        (exited, log)
    };
    // A controller that other hosts reach (it advertises a name outside loopback, a reserved
    // `.test` name never resolved here) in plaintext: refused, naming the fix.
    let port = free_port();
    let (exited, log) = start(
        "run-as-root yes\n",
        &format!(
            "grpc_listen = \"127.0.0.1:{port}\"\ncontrollers = [\"127.0.0.1:{port}\"]\nadvertise_addr = \"c1.sluice.test:{port}\"\n"
        ),
    );
    assert!(exited && log.contains("would travel without TLS"), "{log}");
    // ... unless the operator says so in as many words.
    let port = free_port();
    let (exited, log) = start(
        "run-as-root yes\n",
        &format!(
            "grpc_listen = \"127.0.0.1:{port}\"\ncontrollers = [\"127.0.0.1:{port}\"]\nadvertise_addr = \"c1.sluice.test:{port}\"\ninsecure_plaintext = true\n"
        ),
    );
    assert!(!exited && log.contains("INSECURE"), "{log}");
    if unsafe { libc::geteuid() } == 0 {
        let port = free_port();
        let (exited, log) = start(
            "",
            &format!("grpc_listen = \"127.0.0.1:{port}\"\ncontrollers = [\"127.0.0.1:{port}\"]\n"),
        );
        assert!(exited && log.contains("refusing to run as root"), "{log}");
    }
}

#[test]
fn config_check_json_never_prints_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let policy = policy_with_keys(dir.path(), "[127.0.0.1]:9");
    let f = dir.path().join("p.conf");
    std::fs::write(&f, &policy).unwrap();
    let (ok, out, err) = run(&["config", "check", "--json", f.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(
        !out.contains("hunter2-plain-secret"),
        "a password was printed"
    );
    assert!(
        !out.contains(&key_body(&dir.path().join("a.pem"))),
        "a DKIM key was printed"
    );
    assert!(out.contains("(hidden)"), "{out}");
}

fn curl(args: &[&str]) -> (String, String) {
    let mut all = vec![
        "-s",
        "-w",
        "\n%{http_code}",
        "-H",
        "content-type: application/json",
    ];
    all.extend_from_slice(args);
    let (_, out, _) = tool("curl", &all);
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", &out));
    (code.to_string(), body.to_string())
}

/// Sends raw bytes from `from` to `to` with Python (which can choose the source address) and
/// returns what came back within `wait` seconds.
fn raw_http(from: &str, to: SocketAddr, request: &str, wait: u32) -> String {
    let script = format!(
        "import socket,sys\n\
         s=socket.socket()\ns.bind(('{from}',0))\ns.settimeout({wait})\n\
         s.connect(('{ip}',{port}))\ns.sendall(sys.argv[1].encode())\n\
         out=b''\n\
         try:\n  while True:\n    d=s.recv(4096)\n    if not d: break\n    out+=d\n\
         except socket.timeout: pass\n\
         print(out.decode(errors='replace'))\n",
        ip = to.ip(),
        port = to.port()
    );
    tool("python3", &["-c", &script, request]).1
}

#[test]
fn http_injection_checks_access_and_credentials_before_the_body_and_bounds_it() {
    let users = tempfile::tempdir().unwrap();
    let mut hash = std::process::Command::new(BIN)
        .args(["config", "hash-password"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    hash.stdin
        .take()
        .unwrap()
        .write_all(b"api-secret\n")
        .unwrap();
    let out = hash.wait_with_output().unwrap();
    let hash = String::from_utf8(out.stdout).unwrap();
    assert!(hash.starts_with("$argon2"), "{hash}");
    let users_file = users.path().join("http-users");
    std::fs::write(&users_file, format!("# name hash\napi {}\n", hash.trim())).unwrap();
    let policy = format!(
        "http-access 127.0.0.1 inject\n{}",
        relay_policy("127.0.0.1:9".parse().unwrap())
    );
    let mut c = Cluster::start(1, &policy, "");
    let (_, http) = c.start_ingress_with(&format!(
        "http_require_auth = true\nhttp_users_file = \"{}\"\nhttp_max_body_bytes = 4096\nhttp_max_recipients = 3\nhttp_read_timeout_ms = 1500\n",
        users_file.display()
    ));
    c.kept.push(users);
    let url = format!("http://{http}/api/inject/v1");
    let body = |n: usize| {
        let rcpts: Vec<String> = (0..n).map(|i| format!("\"r{i}@dest.test\"")).collect();
        format!(
            r#"{{"envelope_sender":"api@example.com","recipients":[{}],"content":"Subject: x\r\n\r\nbody\r\n"}}"#,
            rcpts.join(",")
        )
    };
    // No credentials, and wrong ones: 401 with a challenge, nothing queued.
    let (code, _) = curl(&["-d", &body(1), &url]);
    assert_eq!(code, "401");
    let (_, head, _) = tool("curl", &["-s", "-i", "-d", &body(1), &url]);
    assert!(
        head.to_ascii_lowercase()
            .contains("www-authenticate: basic"),
        "{head}"
    );
    let (code, _) = curl(&["-u", "api:wrong", "-d", &body(1), &url]);
    assert_eq!(code, "401");
    let (code, _) = curl(&[
        "-H",
        "authorization: Bearer api.wrong",
        "-d",
        &body(1),
        &url,
    ]);
    assert_eq!(code, "401");
    // Right ones, both ways.
    let (code, out) = curl(&["-u", "api:api-secret", "-d", &body(1), &url]);
    assert_eq!(code, "200", "{out}");
    let (code, out) = curl(&[
        "-H",
        "authorization: Bearer api.api-secret",
        "-d",
        &body(2),
        &url,
    ]);
    assert_eq!(code, "200", "{out}");
    // Caps: recipients, and the body (by its length, and by what arrives).
    let (code, out) = curl(&["-u", "api:api-secret", "-d", &body(4), &url]);
    assert!(
        code == "400" && out.contains("more than 3 recipients"),
        "{code} {out}"
    );
    let big = format!(
        r#"{{"envelope_sender":"api@example.com","recipients":["a@dest.test"],"content":"{}"}}"#,
        "x".repeat(5000)
    );
    let (code, _) = curl(&["-u", "api:api-secret", "-d", &big, &url]);
    assert_eq!(code, "413");
    let (code, _) = curl(&[
        "-u",
        "api:api-secret",
        "-H",
        "transfer-encoding: chunked",
        "-d",
        &big,
        &url,
    ]);
    assert_eq!(code, "413");
    assert_eq!(
        c.list(0).unwrap().as_array().unwrap().len(),
        2,
        "only the two good requests are queued"
    );

    // An address without http-access is refused before its body: it promised a gigabyte and
    // sent none, and still hears 403 at once.
    let promise = "POST /api/inject/v1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n";
    let started = Instant::now();
    let reply = raw_http("127.0.0.2", http, promise, 10);
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the 403 waited for the body"
    );
    // An allowed client that stalls in its body is cut off by the read timeout.
    let basic = "YXBpOmFwaS1zZWNyZXQ="; // api:api-secret
    let stall = format!(
        "POST /api/inject/v1 HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {basic}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"envelope"
    );
    let reply = raw_http("127.0.0.1", http, &stall, 10);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    // Headers that never finish are cut off too (the connection closes, nothing answered 200).
    let reply = raw_http(
        "127.0.0.1",
        http,
        "POST /api/inject/v1 HTTP/1.1\r\nHost: x\r\n",
        10,
    );
    assert!(!reply.contains("200 OK"), "{reply}");
}

#[test]
fn a_source_of_0_slash_0_covers_ipv6_clients_too() {
    // Everyone is refused but 127.0.0.1; before, a client on ::1 escaped `<source 0/0>`.
    let policy = format!(
        "<source 0/0>\n  smtp-service no\n</source>\n{}",
        relay_policy("127.0.0.1:9".parse().unwrap())
    );
    let mut c = Cluster::start(1, &policy, "");
    let v6: SocketAddr = format!("[::1]:{}", free_port()).parse().unwrap();
    c.start_ingress_at(v6, "");
    let (_, out, err) = tool(
        "swaks",
        &[
            "--server",
            "::1",
            "--port",
            &v6.port().to_string(),
            "-6",
            "--from",
            "a@example.com",
            "--to",
            "b@dest.test",
            "--quit-after",
            "RCPT",
        ],
    );
    assert!(
        out.contains("<** 554") || out.contains("<** 5"),
        "::1 was served:\n{out}\n{err}"
    );
    assert!(!out.contains("<-  250 2.1.5"), "::1 could relay:\n{out}");
    assert_eq!(c.list(0).unwrap().as_array().unwrap().len(), 0);
}

#[test]
fn smtp_auth_checks_a_password_hash_from_the_policy() {
    let out = std::process::Command::new(BIN)
        .args(["config", "hash-password"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut p| {
            use std::io::Write;
            p.stdin.take().unwrap().write_all(b"correct horse\n")?;
            p.wait_with_output()
        })
        .unwrap();
    let hash = String::from_utf8(out.stdout).unwrap();
    let policy = format!(
        "<smtp-user bob>\n  password-hash {}\n</smtp-user>\n{}",
        hash.trim(),
        relay_policy("127.0.0.1:9".parse().unwrap()).replace(
            "  smtp-service yes\n",
            "  smtp-service yes\n  allow-unencrypted-plain-auth yes\n"
        )
    );
    let mut c = Cluster::start(1, &policy, "");
    let (smtp, _) = c.start_ingress();
    let swaks = |password: &str| {
        tool(
            "swaks",
            &[
                "--server",
                &smtp.to_string(),
                "--from",
                "a@example.com",
                "--to",
                "b@dest.test",
                "-a",
                "PLAIN",
                "-au",
                "bob",
                "-ap",
                password,
                "--quit-after",
                "AUTH",
            ],
        )
        .1
    };
    let good = swaks("correct horse");
    assert!(
        good.contains("<~  235") || good.contains("<-  235"),
        "{good}"
    );
    let bad = swaks("correct horse battery");
    assert!(bad.contains("535"), "{bad}");
    // The hash, not the password, is what the ingress was given.
    assert!(
        !std::fs::read_to_string(c.path().join("policy.conf"))
            .unwrap()
            .contains("correct horse")
    );
}
